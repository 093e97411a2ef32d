#include "proto/wire.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "gmock/gmock.h"
#include "google/protobuf/text_format.h"
#include "gtest/gtest.h"

namespace gradwire {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

MATCHER_P2(StatusIs, code, substring, "") {
  if (arg.code() != code) {
    *result_listener << "code is " << absl::StatusCodeToString(arg.code()) << ": " << arg.message();
    return false;
  }
  if (!absl::StrContains(arg.message(), substring)) {
    *result_listener << "message is: " << arg.message();
    return false;
  }
  return true;
}

grad::v1::Tensor FloatTensor(std::vector<int64_t> shape, std::vector<float> values) {
  grad::v1::Tensor tensor;
  EncodeTensor(shape, values, &tensor);
  return tensor;
}

gradengine::NetworkSpec SampleNetwork() {
  gradengine::NetworkSpec network;
  gradengine::Conv2dSpec conv;
  conv.in_channels = 4;
  conv.out_channels = 6;
  conv.kernel_h = 3;
  conv.kernel_w = 2;
  conv.stride_h = 2;
  conv.stride_w = 1;
  conv.pad_top = 1;
  conv.pad_bottom = 0;
  conv.pad_left = 2;
  conv.pad_right = 3;
  conv.dilation_h = 1;
  conv.dilation_w = 2;
  conv.groups = 2;
  conv.bias = true;
  network.layers.push_back({"conv1", conv});
  network.layers.push_back({"act1", gradengine::ActivationSpec::LeakyRelu(0.2f)});
  network.layers.push_back(
      {"act2", gradengine::ActivationSpec{gradengine::ActivationKind::kGeluTanh}});
  network.layers.push_back({"conv2", gradengine::Conv2dSpec::Square(6, 1, 1, 1, 0, false)});
  return network;
}

TEST(WireTensorTest, RoundTripsBitsExactly) {
  const std::vector<float> values = {1.5f,
                                     -0.0f,
                                     std::numeric_limits<float>::infinity(),
                                     std::nanf("7"),
                                     std::numeric_limits<float>::denorm_min(),
                                     -3.25f};
  grad::v1::Tensor wire = FloatTensor({2, 3}, values);
  EXPECT_EQ(wire.dtype(), grad::v1::DATA_TYPE_FLOAT32);
  EXPECT_EQ(wire.data().size(), values.size() * 4);

  DecodeStorage storage;
  absl::StatusOr<gradengine::TensorView> view = DecodeTensorView(wire, "input", &storage);
  ASSERT_TRUE(view.ok()) << view.status();
  EXPECT_THAT(view->shape, ElementsAre(2, 3));
  EXPECT_EQ(view->size, 6);
  // Zero copy: the view points into the message's bytes.
  EXPECT_EQ(static_cast<const void*>(view->data), static_cast<const void*>(wire.data().data()));
  EXPECT_TRUE(storage.copies.empty());
  EXPECT_EQ(std::memcmp(view->data, values.data(), values.size() * 4), 0);

  absl::StatusOr<gradengine::Tensor> copy = DecodeTensor(wire, "output");
  ASSERT_TRUE(copy.ok()) << copy.status();
  EXPECT_EQ(std::memcmp(copy->data.data(), values.data(), values.size() * 4), 0);
}

TEST(WireTensorTest, ScalarAndEmptyTensors) {
  DecodeStorage storage;
  absl::StatusOr<gradengine::TensorView> scalar =
      DecodeTensorView(FloatTensor({}, {2.0f}), "t", &storage);
  ASSERT_TRUE(scalar.ok()) << scalar.status();
  EXPECT_EQ(scalar->size, 1);
  absl::StatusOr<gradengine::TensorView> empty =
      DecodeTensorView(FloatTensor({2, 0, 3}, {}), "t", &storage);
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_EQ(empty->size, 0);
}

struct BadTensorCase {
  std::string name;
  std::vector<int64_t> shape;
  int dtype;
  size_t bytes;
  absl::StatusCode code;
  std::string message;
};

TEST(WireTensorTest, RejectsMalformedTensors) {
  const int64_t huge = int64_t{1} << 40;
  const std::vector<BadTensorCase> cases = {
      {"short data",
       {2, 3},
       1,
       20,
       absl::StatusCode::kInvalidArgument,
       "x.data has 20 bytes, but shape=[2, 3] of DATA_TYPE_FLOAT32 needs 24"},
      {"long data", {2}, 1, 12, absl::StatusCode::kInvalidArgument, "x.data has 12 bytes"},
      {"negative dim",
       {2, -1},
       1,
       0,
       absl::StatusCode::kInvalidArgument,
       "x.shape[1]=-1 must be >= 0"},
      {"overflowing dims",
       {huge, huge},
       1,
       0,
       absl::StatusCode::kInvalidArgument,
       "more elements than a 64-bit byte count can hold"},
      {"huge dim without data",
       {huge},
       1,
       4,
       absl::StatusCode::kInvalidArgument,
       "needs 4398046511104"},
      {"unset dtype",
       {1},
       0,
       4,
       absl::StatusCode::kInvalidArgument,
       "x.dtype=0 (DATA_TYPE_UNSPECIFIED) is not a supported data type"},
      {"unknown dtype",
       {1},
       9,
       4,
       absl::StatusCode::kInvalidArgument,
       "x.dtype=9 is not a supported data type"},
      {"bfloat16",
       {1},
       2,
       2,
       absl::StatusCode::kUnimplemented,
       "x.dtype=2 (DATA_TYPE_BFLOAT16) is not supported yet"},
  };
  for (const BadTensorCase& c : cases) {
    SCOPED_TRACE(c.name);
    grad::v1::Tensor wire;
    for (int64_t d : c.shape) wire.add_shape(d);
    wire.set_dtype(static_cast<grad::v1::DataType>(c.dtype));
    wire.set_data(std::string(c.bytes, '\0'));
    DecodeStorage storage;
    EXPECT_THAT(DecodeTensorView(wire, "x", &storage).status(), StatusIs(c.code, c.message));
    EXPECT_THAT(DecodeTensor(wire, "x").status(), StatusIs(c.code, c.message));
  }
}

TEST(WireNetworkTest, RoundTripsEveryField) {
  const gradengine::NetworkSpec network = SampleNetwork();
  grad::v1::Network wire;
  EncodeNetwork(network, &wire);
  absl::StatusOr<gradengine::NetworkSpec> decoded = DecodeNetwork(wire);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  ASSERT_EQ(decoded->layers.size(), network.layers.size());
  const auto& conv = std::get<gradengine::Conv2dSpec>(decoded->layers[0].op);
  EXPECT_EQ(decoded->layers[0].name, "conv1");
  EXPECT_EQ(conv.in_channels, 4);
  EXPECT_EQ(conv.out_channels, 6);
  EXPECT_EQ(conv.kernel_h, 3);
  EXPECT_EQ(conv.kernel_w, 2);
  EXPECT_EQ(conv.stride_h, 2);
  EXPECT_EQ(conv.stride_w, 1);
  EXPECT_EQ(conv.pad_top, 1);
  EXPECT_EQ(conv.pad_bottom, 0);
  EXPECT_EQ(conv.pad_left, 2);
  EXPECT_EQ(conv.pad_right, 3);
  EXPECT_EQ(conv.dilation_h, 1);
  EXPECT_EQ(conv.dilation_w, 2);
  EXPECT_EQ(conv.groups, 2);
  EXPECT_TRUE(conv.bias);
  const auto& leaky = std::get<gradengine::ActivationSpec>(decoded->layers[1].op);
  EXPECT_EQ(leaky.kind, gradengine::ActivationKind::kLeakyRelu);
  EXPECT_FLOAT_EQ(leaky.alpha, 0.2f);
  EXPECT_EQ(std::get<gradengine::ActivationSpec>(decoded->layers[2].op).kind,
            gradengine::ActivationKind::kGeluTanh);
  EXPECT_FALSE(std::get<gradengine::Conv2dSpec>(decoded->layers[3].op).bias);
}

TEST(WireNetworkTest, TorchStyleShorthandsAndDefaults) {
  grad::v1::Network wire;
  ASSERT_TRUE(google::protobuf::TextFormat::ParseFromString(
      R"pb(layers {
             name: "c"
             conv2d {
               in_channels: 1
               out_channels: 8
               kernel_size: 3
               padding: [ 1, 2 ]
             }
           })pb",
      &wire));
  absl::StatusOr<gradengine::NetworkSpec> decoded = DecodeNetwork(wire);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  const auto& conv = std::get<gradengine::Conv2dSpec>(decoded->layers[0].op);
  EXPECT_EQ(conv.kernel_h, 3);
  EXPECT_EQ(conv.kernel_w, 3);
  EXPECT_EQ(conv.stride_h, 1);
  EXPECT_EQ(conv.stride_w, 1);
  EXPECT_EQ(conv.dilation_h, 1);
  EXPECT_EQ(conv.dilation_w, 1);
  EXPECT_EQ(conv.pad_top, 1);
  EXPECT_EQ(conv.pad_bottom, 1);
  EXPECT_EQ(conv.pad_left, 2);
  EXPECT_EQ(conv.pad_right, 2);
  EXPECT_EQ(conv.groups, 1);
  EXPECT_FALSE(conv.bias);
}

TEST(WireNetworkTest, RejectsMalformedLayers) {
  struct Case {
    std::string text;
    absl::StatusCode code;
    std::string message;
  };
  const std::vector<Case> table = {
      {R"pb(layers {
              name: "a"
              activation { kind: RELU }
            }
            layers { name: "b" })pb",
       absl::StatusCode::kInvalidArgument, "layers[1].op (\"b\") is not set"},
      {R"pb(layers {
              name: "a"
              conv2d { in_channels: 1 out_channels: 1 }
            })pb",
       absl::StatusCode::kInvalidArgument, "layers[0].conv2d.kernel_size is not set"},
      {R"pb(layers {
              name: "a"
              conv2d {
                in_channels: 1
                out_channels: 1
                kernel_size: [ 1, 2, 3 ]
              }
            })pb",
       absl::StatusCode::kInvalidArgument,
       "layers[0].conv2d.kernel_size has 3 values [1, 2, 3]; expected 1 or 2"},
      {R"pb(layers {
              name: "a"
              conv2d {
                in_channels: 1
                out_channels: 1
                kernel_size: 1
                stride: [ 1, 1, 1 ]
              }
            })pb",
       absl::StatusCode::kInvalidArgument, "layers[0].conv2d.stride has 3 values"},
      {R"pb(layers {
              name: "a"
              conv2d {
                in_channels: 1
                out_channels: 1
                kernel_size: 1
                dilation: [ 1, 1, 1 ]
              }
            })pb",
       absl::StatusCode::kInvalidArgument, "layers[0].conv2d.dilation has 3 values"},
      {R"pb(layers {
              name: "a"
              conv2d {
                in_channels: 1
                out_channels: 1
                kernel_size: 1
                padding: [ 1, 1, 1 ]
              }
            })pb",
       absl::StatusCode::kInvalidArgument,
       "layers[0].conv2d.padding has 3 values [1, 1, 1]; expected 1, 2 or 4"},
      {R"pb(layers {
              name: "a"
              activation {}
            })pb",
       absl::StatusCode::kInvalidArgument,
       "layers[0].activation.kind=0 (ACTIVATION_KIND_UNSPECIFIED) is not an activation"},
      {R"pb(layers {
              name: "a"
              activation { kind: 42 }
            })pb",
       absl::StatusCode::kInvalidArgument, "layers[0].activation.kind=42 is not an activation"},
  };
  for (const Case& c : table) {
    SCOPED_TRACE(c.text);
    grad::v1::Network wire;
    ASSERT_TRUE(google::protobuf::TextFormat::ParseFromString(c.text, &wire));
    EXPECT_THAT(DecodeNetwork(wire).status(), StatusIs(c.code, c.message));
  }
}

TEST(WireNetworkTest, ReportsAnOpFromANewerVersionAsUnimplemented) {
  // A Layer carrying field 15, which this version does not define, as a newer client would
  // send.
  grad::v1::Layer layer;
  layer.set_name("future");
  std::string bytes = layer.SerializeAsString();
  bytes += std::string("\x7a\x00", 2);  // field 15, length-delimited, empty
  grad::v1::Network wire;
  ASSERT_TRUE(wire.add_layers()->ParseFromString(bytes));
  EXPECT_THAT(DecodeNetwork(wire).status(),
              StatusIs(absl::StatusCode::kUnimplemented,
                       "layers[0] (\"future\") has an op this server does not know (field 15)"));
}

// A network with every new layer kind, each field away from its default, and a branch.
gradengine::NetworkSpec NetworkOfEveryKind() {
  gradengine::NetworkSpec network;
  gradengine::MaxPool2dSpec max_pool;
  max_pool.kernel_h = 3;
  max_pool.kernel_w = 2;
  max_pool.stride_h = 2;
  max_pool.stride_w = 1;
  max_pool.pad_h = 1;
  max_pool.pad_w = 0;
  max_pool.dilation_h = 2;
  max_pool.dilation_w = 1;
  max_pool.ceil_mode = true;
  network.layers.push_back({"pool1", max_pool});
  gradengine::AvgPool2dSpec avg_pool;
  avg_pool.kernel_h = 2;
  avg_pool.kernel_w = 4;
  avg_pool.stride_h = 1;
  avg_pool.stride_w = 3;
  avg_pool.pad_h = 1;
  avg_pool.pad_w = 2;
  avg_pool.ceil_mode = true;
  avg_pool.count_include_pad = false;
  network.layers.push_back({"pool2", avg_pool, "input"});
  gradengine::BatchNorm2dSpec norm;
  norm.num_features = 5;
  norm.eps = 1e-3;
  norm.momentum = 0.25;
  norm.affine = false;
  norm.training = false;
  network.layers.push_back({"bn", norm});
  network.layers.push_back({"skip", gradengine::AddSpec{"pool1"}});
  gradengine::LinearSpec linear;
  linear.in_features = 20;
  linear.out_features = 7;
  linear.bias = true;
  network.layers.push_back({"fc", linear, "skip"});
  return network;
}

TEST(WireNetworkTest, RoundTripsEveryFieldOfTheNewKinds) {
  const gradengine::NetworkSpec network = NetworkOfEveryKind();
  grad::v1::Network wire;
  EncodeNetwork(network, &wire);
  EXPECT_EQ(wire.layers(1).input(), "input");
  EXPECT_TRUE(wire.layers(2).batch_norm2d().has_training());
  absl::StatusOr<gradengine::NetworkSpec> decoded = DecodeNetwork(wire);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  ASSERT_EQ(decoded->layers.size(), 5u);
  for (size_t i = 0; i < network.layers.size(); ++i) {
    EXPECT_EQ(decoded->layers[i].name, network.layers[i].name);
    EXPECT_EQ(decoded->layers[i].input, network.layers[i].input);
  }
  const auto& max_pool = std::get<gradengine::MaxPool2dSpec>(decoded->layers[0].op);
  EXPECT_EQ(max_pool.kernel_h, 3);
  EXPECT_EQ(max_pool.kernel_w, 2);
  EXPECT_EQ(max_pool.stride_h, 2);
  EXPECT_EQ(max_pool.stride_w, 1);
  EXPECT_EQ(max_pool.pad_h, 1);
  EXPECT_EQ(max_pool.pad_w, 0);
  EXPECT_EQ(max_pool.dilation_h, 2);
  EXPECT_EQ(max_pool.dilation_w, 1);
  EXPECT_TRUE(max_pool.ceil_mode);
  const auto& avg_pool = std::get<gradengine::AvgPool2dSpec>(decoded->layers[1].op);
  EXPECT_EQ(avg_pool.kernel_h, 2);
  EXPECT_EQ(avg_pool.kernel_w, 4);
  EXPECT_EQ(avg_pool.stride_h, 1);
  EXPECT_EQ(avg_pool.stride_w, 3);
  EXPECT_EQ(avg_pool.pad_h, 1);
  EXPECT_EQ(avg_pool.pad_w, 2);
  EXPECT_TRUE(avg_pool.ceil_mode);
  EXPECT_FALSE(avg_pool.count_include_pad);
  const auto& norm = std::get<gradengine::BatchNorm2dSpec>(decoded->layers[2].op);
  EXPECT_EQ(norm.num_features, 5);
  EXPECT_EQ(norm.eps, 1e-3);
  EXPECT_EQ(norm.momentum, 0.25);
  EXPECT_FALSE(norm.affine);
  EXPECT_FALSE(norm.training);
  EXPECT_EQ(std::get<gradengine::AddSpec>(decoded->layers[3].op).other, "pool1");
  const auto& linear = std::get<gradengine::LinearSpec>(decoded->layers[4].op);
  EXPECT_EQ(linear.in_features, 20);
  EXPECT_EQ(linear.out_features, 7);
  EXPECT_TRUE(linear.bias);

  // The other values of the booleans survive too.
  gradengine::NetworkSpec flipped = network;
  std::get<gradengine::BatchNorm2dSpec>(flipped.layers[2].op).training = true;
  std::get<gradengine::BatchNorm2dSpec>(flipped.layers[2].op).affine = true;
  std::get<gradengine::AvgPool2dSpec>(flipped.layers[1].op).count_include_pad = true;
  std::get<gradengine::LinearSpec>(flipped.layers[4].op).bias = false;
  wire.Clear();
  EncodeNetwork(flipped, &wire);
  decoded = DecodeNetwork(wire);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_TRUE(std::get<gradengine::BatchNorm2dSpec>(decoded->layers[2].op).training);
  EXPECT_TRUE(std::get<gradengine::BatchNorm2dSpec>(decoded->layers[2].op).affine);
  EXPECT_TRUE(std::get<gradengine::AvgPool2dSpec>(decoded->layers[1].op).count_include_pad);
  EXPECT_FALSE(std::get<gradengine::LinearSpec>(decoded->layers[4].op).bias);
}

TEST(WireNetworkTest, NewKindsTakeTorchDefaults) {
  grad::v1::Network wire;
  ASSERT_TRUE(google::protobuf::TextFormat::ParseFromString(
      R"pb(layers {
             name: "m"
             max_pool2d { kernel_size: 3 }
           }
           layers {
             name: "a"
             avg_pool2d {
               kernel_size: [ 2, 3 ]
               padding: 1
             }
           }
           layers {
             name: "b"
             batch_norm2d { num_features: 4 training: true }
           }
           layers {
             name: "l"
             linear { in_features: 2 out_features: 3 }
           }
           layers {
             name: "s"
             add { other: "m" }
           })pb",
      &wire));
  absl::StatusOr<gradengine::NetworkSpec> decoded = DecodeNetwork(wire);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  const auto& max_pool = std::get<gradengine::MaxPool2dSpec>(decoded->layers[0].op);
  EXPECT_EQ(max_pool.stride_h, 3);  // the kernel size
  EXPECT_EQ(max_pool.stride_w, 3);
  EXPECT_EQ(max_pool.pad_h, 0);
  EXPECT_EQ(max_pool.pad_w, 0);
  EXPECT_EQ(max_pool.dilation_h, 1);
  EXPECT_EQ(max_pool.dilation_w, 1);
  EXPECT_FALSE(max_pool.ceil_mode);
  const auto& avg_pool = std::get<gradengine::AvgPool2dSpec>(decoded->layers[1].op);
  EXPECT_EQ(avg_pool.stride_h, 2);
  EXPECT_EQ(avg_pool.stride_w, 3);
  EXPECT_EQ(avg_pool.pad_h, 1);
  EXPECT_EQ(avg_pool.pad_w, 1);
  EXPECT_TRUE(avg_pool.count_include_pad);
  const auto& norm = std::get<gradengine::BatchNorm2dSpec>(decoded->layers[2].op);
  EXPECT_EQ(norm.eps, 1e-5);
  EXPECT_EQ(norm.momentum, 0.1);
  EXPECT_TRUE(norm.affine);
  EXPECT_TRUE(norm.training);
  EXPECT_FALSE(std::get<gradengine::LinearSpec>(decoded->layers[3].op).bias);
  for (const gradengine::LayerSpec& layer : decoded->layers) EXPECT_EQ(layer.input, "");
}

TEST(WireNetworkTest, RejectsMalformedNewLayers) {
  struct Case {
    std::string text;
    std::string message;
  };
  const std::vector<Case> table = {
      {R"pb(layers {
              name: "a"
              max_pool2d {}
            })pb",
       "layers[0].max_pool2d.kernel_size is not set; give [k] or [kh, kw]"},
      {R"pb(layers {
              name: "a"
              activation { kind: RELU }
            }
            layers {
              name: "b"
              activation { kind: RELU }
            }
            layers {
              name: "c"
              max_pool2d { kernel_size: [ 2, 2, 2 ] }
            })pb",
       "layers[2].max_pool2d.kernel_size has 3 values [2, 2, 2]; expected 1 or 2"},
      {R"pb(layers {
              name: "a"
              max_pool2d {
                kernel_size: 2
                stride: [ 1, 1, 1 ]
              }
            })pb",
       "layers[0].max_pool2d.stride has 3 values"},
      {R"pb(layers {
              name: "a"
              max_pool2d {
                kernel_size: 2
                padding: [ 1, 1, 1, 1 ]
              }
            })pb",
       "layers[0].max_pool2d.padding has 4 values [1, 1, 1, 1]; expected 1 or 2"},
      {R"pb(layers {
              name: "a"
              max_pool2d {
                kernel_size: 2
                dilation: [ 1, 1, 1 ]
              }
            })pb",
       "layers[0].max_pool2d.dilation has 3 values"},
      {R"pb(layers {
              name: "a"
              avg_pool2d { stride: 1 }
            })pb",
       "layers[0].avg_pool2d.kernel_size is not set"},
      {R"pb(layers {
              name: "a"
              avg_pool2d {
                kernel_size: 2
                padding: [ 0, 0, 0 ]
              }
            })pb",
       "layers[0].avg_pool2d.padding has 3 values"},
      {R"pb(layers {
              name: "a"
              batch_norm2d { num_features: 3 }
            })pb",
       "layers[0].batch_norm2d.training is not set; it is required"},
      {R"pb(layers { name: "a" })pb",
       "is not set; set one of conv2d, activation, max_pool2d, avg_pool2d, batch_norm2d, "
       "linear, add"},
  };
  for (const Case& c : table) {
    SCOPED_TRACE(c.text);
    grad::v1::Network wire;
    ASSERT_TRUE(google::protobuf::TextFormat::ParseFromString(c.text, &wire));
    EXPECT_THAT(DecodeNetwork(wire).status(),
                StatusIs(absl::StatusCode::kInvalidArgument, c.message));
  }
}

grad::v1::ComputeGradientsRequest SampleGradientRequest() {
  grad::v1::ComputeGradientsRequest request;
  EncodeNetwork(SampleNetwork(), request.mutable_network());
  *request.mutable_input() = FloatTensor({1, 1}, {1.0f});
  grad::v1::NamedTensor* weight = request.add_parameters();
  weight->set_name("conv1.weight");
  *weight->mutable_tensor() = FloatTensor({1}, {0.5f});
  *request.mutable_objective()->mutable_mse_target() = FloatTensor({1}, {2.0f});
  return request;
}

TEST(WireRequestTest, GradientRequestRoundTrip) {
  std::vector<float> input = {1, 2, 3, 4};
  std::vector<float> weight = {5, 6};
  std::vector<float> grad_output = {7, 8, 9};
  gradengine::GradientRequest request;
  request.network = SampleNetwork();
  request.input = gradengine::TensorView({1, 4}, input);
  request.parameters["conv1.weight"] = gradengine::TensorView({2}, weight);
  request.objective = {gradengine::ObjectiveKind::kGradOutput,
                       gradengine::TensorView({3}, grad_output)};
  request.gradients.input = false;
  request.gradients.all_parameters = false;
  request.gradients.parameters = {"conv1.bias"};

  grad::v1::ComputeGradientsRequest wire;
  EncodeGradientRequest(request, &wire);
  DecodeStorage storage;
  absl::StatusOr<gradengine::GradientRequest> decoded = DecodeGradientRequest(wire, &storage);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(decoded->network.layers.size(), 4u);
  EXPECT_THAT(decoded->input.values(), ElementsAre(1, 2, 3, 4));
  ASSERT_EQ(decoded->parameters.count("conv1.weight"), 1u);
  EXPECT_THAT(decoded->parameters.at("conv1.weight").values(), ElementsAre(5, 6));
  EXPECT_EQ(decoded->objective.kind, gradengine::ObjectiveKind::kGradOutput);
  EXPECT_THAT(decoded->objective.tensor.values(), ElementsAre(7, 8, 9));
  EXPECT_FALSE(decoded->gradients.input);
  EXPECT_FALSE(decoded->gradients.all_parameters);
  EXPECT_THAT(decoded->gradients.parameters, ElementsAre("conv1.bias"));

  // No parameter gradients at all.
  request.gradients.parameters.clear();
  request.objective = {gradengine::ObjectiveKind::kSum, {}};
  wire.Clear();
  EncodeGradientRequest(request, &wire);
  decoded = DecodeGradientRequest(wire, &storage);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(decoded->objective.kind, gradengine::ObjectiveKind::kSum);
  EXPECT_FALSE(decoded->gradients.all_parameters);
  EXPECT_TRUE(decoded->gradients.parameters.empty());
}

TEST(WireRequestTest, RejectsMalformedRequests) {
  struct Case {
    std::string name;
    std::function<void(grad::v1::ComputeGradientsRequest*)> mutate;
    absl::StatusCode code;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"no input", [](auto* r) { r->clear_input(); }, absl::StatusCode::kInvalidArgument,
       "input is not set"},
      {"bad input bytes", [](auto* r) { r->mutable_input()->mutable_data()->push_back('x'); },
       absl::StatusCode::kInvalidArgument, "input.data has 5 bytes"},
      {"duplicate parameter", [](auto* r) { *r->add_parameters() = r->parameters(0); },
       absl::StatusCode::kInvalidArgument,
       "parameters[1].name=\"conv1.weight\" repeats parameters[0]"},
      {"empty parameter name", [](auto* r) { r->mutable_parameters(0)->clear_name(); },
       absl::StatusCode::kInvalidArgument, "parameters[0].name is empty"},
      {"parameter without tensor", [](auto* r) { r->mutable_parameters(0)->clear_tensor(); },
       absl::StatusCode::kInvalidArgument, "parameters[0].tensor (\"conv1.weight\") is not set"},
      {"bad parameter dtype",
       [](auto* r) {
         r->mutable_parameters(0)->mutable_tensor()->set_dtype(grad::v1::DataType(5));
       },
       absl::StatusCode::kInvalidArgument, "parameters[0].tensor.dtype=5"},
      {"no objective", [](auto* r) { r->clear_objective(); }, absl::StatusCode::kInvalidArgument,
       "objective has none set; set exactly one of mse_target, sum, grad_output, cross_entropy"},
      {"two objectives", [](auto* r) { r->mutable_objective()->mutable_sum(); },
       absl::StatusCode::kInvalidArgument, "objective has mse_target and sum set"},
      {"bad target", [](auto* r) { r->mutable_objective()->mutable_mse_target()->add_shape(-2); },
       absl::StatusCode::kInvalidArgument, "objective.mse_target.shape[1]=-2"},
      {"contradictory selection",
       [](auto* r) {
         r->mutable_gradients()->set_no_parameters(true);
         r->mutable_gradients()->add_parameters("conv1.weight");
       },
       absl::StatusCode::kInvalidArgument, "gradients.no_parameters is set, but"},
      {"unset layer", [](auto* r) { r->mutable_network()->add_layers()->set_name("x"); },
       absl::StatusCode::kInvalidArgument, "layers[4].op (\"x\") is not set"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    grad::v1::ComputeGradientsRequest wire = SampleGradientRequest();
    DecodeStorage storage;
    ASSERT_TRUE(DecodeGradientRequest(wire, &storage).ok());
    c.mutate(&wire);
    EXPECT_THAT(DecodeGradientRequest(wire, &storage).status(), StatusIs(c.code, c.message));
  }
}

grad::v1::Tensor LabelTensor(std::vector<int64_t> shape, std::vector<int64_t> values) {
  grad::v1::Tensor tensor;
  for (int64_t dim : shape) tensor.add_shape(dim);
  tensor.set_dtype(grad::v1::DATA_TYPE_INT64);
  tensor.set_data(std::string(reinterpret_cast<const char*>(values.data()), values.size() * 8));
  return tensor;
}

TEST(WireRequestTest, CrossEntropyRequestRoundTrip) {
  std::vector<float> input = {1, 2, 3, 4};
  const std::vector<int64_t> labels = {3, -100, 0, int64_t{1} << 40, -1, 2};
  gradengine::GradientRequest request;
  request.network = NetworkOfEveryKind();
  request.input = gradengine::TensorView({1, 4}, input);
  request.objective.kind = gradengine::ObjectiveKind::kCrossEntropy;
  request.objective.labels = {{2, 3}, labels.data(), static_cast<int64_t>(labels.size())};
  request.objective.label_smoothing = 0.125;
  request.objective.ignore_index = -1;

  grad::v1::ComputeGradientsRequest wire;
  EncodeGradientRequest(request, &wire);
  const grad::v1::Tensor& target = wire.objective().cross_entropy().target();
  EXPECT_EQ(target.dtype(), grad::v1::DATA_TYPE_INT64);
  EXPECT_EQ(target.data().size(), labels.size() * 8);
  DecodeStorage storage;
  absl::StatusOr<gradengine::GradientRequest> decoded = DecodeGradientRequest(wire, &storage);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(decoded->objective.kind, gradengine::ObjectiveKind::kCrossEntropy);
  EXPECT_THAT(decoded->objective.labels.shape, ElementsAre(2, 3));
  ASSERT_EQ(decoded->objective.labels.size, 6);
  // Zero copy, as for float tensors.
  EXPECT_EQ(static_cast<const void*>(decoded->objective.labels.data),
            static_cast<const void*>(target.data().data()));
  EXPECT_TRUE(storage.label_copies.empty());
  EXPECT_EQ(
      std::vector<int64_t>(decoded->objective.labels.data, decoded->objective.labels.data + 6),
      labels);
  EXPECT_EQ(decoded->objective.label_smoothing, 0.125);
  EXPECT_EQ(decoded->objective.ignore_index, -1);
  EXPECT_EQ(decoded->network.layers.size(), 5u);

  // Headers only, for framing.h: the shape and dtype without the bytes.
  wire.Clear();
  EncodeGradientRequest(request, &wire, /*tensor_data=*/false);
  EXPECT_THAT(wire.objective().cross_entropy().target().shape(), ElementsAre(2, 3));
  EXPECT_EQ(wire.objective().cross_entropy().target().dtype(), grad::v1::DATA_TYPE_INT64);
  EXPECT_TRUE(wire.objective().cross_entropy().target().data().empty());

  // ignore_index unset on the wire is PyTorch's -100; an empty target is fine here.
  wire.Clear();
  *wire.mutable_input() = FloatTensor({1}, {1.0f});
  *wire.mutable_objective()->mutable_cross_entropy()->mutable_target() = LabelTensor({0}, {});
  decoded = DecodeGradientRequest(wire, &storage);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(decoded->objective.ignore_index, -100);
  EXPECT_EQ(decoded->objective.label_smoothing, 0.0);
  EXPECT_EQ(decoded->objective.labels.size, 0);
}

TEST(WireRequestTest, RejectsMalformedCrossEntropy) {
  struct Case {
    std::string name;
    std::function<void(grad::v1::ComputeGradientsRequest*)> mutate;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"float labels",
       [](auto* r) {
         *r->mutable_objective()->mutable_cross_entropy()->mutable_target() =
             FloatTensor({2}, {0, 1});
       },
       "objective.cross_entropy.target.dtype=1 (DATA_TYPE_FLOAT32) cannot hold class indices; "
       "send DATA_TYPE_INT64"},
      {"unset label dtype",
       [](auto* r) {
         r->mutable_objective()->mutable_cross_entropy()->mutable_target()->clear_dtype();
       },
       "objective.cross_entropy.target.dtype=0 (DATA_TYPE_UNSPECIFIED) cannot hold"},
      {"short labels",
       [](auto* r) {
         r->mutable_objective()->mutable_cross_entropy()->mutable_target()->mutable_data()->resize(
             12);
       },
       "objective.cross_entropy.target.data has 12 bytes, but shape=[2] of DATA_TYPE_INT64 "
       "needs 16"},
      {"no target",
       [](auto* r) { r->mutable_objective()->mutable_cross_entropy()->clear_target(); },
       "objective.cross_entropy.target is not set"},
      {"two objectives", [](auto* r) { r->mutable_objective()->mutable_sum(); },
       "objective has sum and cross_entropy set; set exactly one of mse_target, sum, "
       "grad_output, cross_entropy"},
      {"int64 input", [](auto* r) { *r->mutable_input() = LabelTensor({1}, {1}); },
       "input.dtype=3 (DATA_TYPE_INT64) is only for class indices "
       "(objective.cross_entropy.target); send DATA_TYPE_FLOAT32"},
      {"int64 parameter",
       [](auto* r) { *r->mutable_parameters(0)->mutable_tensor() = LabelTensor({1}, {1}); },
       "parameters[0].tensor.dtype=3 (DATA_TYPE_INT64) is only for class indices"},
      {"int64 mse target",
       [](auto* r) {
         r->mutable_objective()->clear_cross_entropy();
         *r->mutable_objective()->mutable_mse_target() = LabelTensor({1}, {1});
       },
       "objective.mse_target.dtype=3 (DATA_TYPE_INT64) is only for class indices"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    grad::v1::ComputeGradientsRequest wire = SampleGradientRequest();
    wire.mutable_objective()->clear_mse_target();
    *wire.mutable_objective()->mutable_cross_entropy()->mutable_target() = LabelTensor({2}, {0, 1});
    DecodeStorage storage;
    ASSERT_TRUE(DecodeGradientRequest(wire, &storage).ok());
    c.mutate(&wire);
    EXPECT_THAT(DecodeGradientRequest(wire, &storage).status(),
                StatusIs(absl::StatusCode::kInvalidArgument, c.message));
  }
}

TEST(WireRequestTest, ForwardRequestRoundTrip) {
  std::vector<float> input = {1, 2};
  gradengine::ForwardRequest request;
  request.network = SampleNetwork();
  request.input = gradengine::TensorView({2}, input);
  grad::v1::ForwardRequest wire;
  EncodeForwardRequest(request, &wire);
  DecodeStorage storage;
  absl::StatusOr<gradengine::ForwardRequest> decoded = DecodeForwardRequest(wire, &storage);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_THAT(decoded->input.values(), ElementsAre(1, 2));
  EXPECT_TRUE(decoded->parameters.empty());
}

TEST(WireResultTest, GradientResultRoundTrip) {
  gradengine::GradientResult result;
  result.output = gradengine::Tensor({1, 2}, {1, 2});
  result.loss = 0.125;
  result.input_grad = gradengine::Tensor({1, 1}, {3});
  result.parameter_grads["c.weight"] = gradengine::Tensor({2}, {4, 5});
  result.parameter_grads["c.bias"] = gradengine::Tensor({1}, {6});

  grad::v1::ComputeGradientsResponse wire;
  EncodeGradientResult(result, /*include_output=*/true, &wire);
  wire.mutable_timing()->set_forward_ns(11);
  wire.mutable_timing()->set_backward_ns(22);
  absl::StatusOr<gradengine::GradientResult> decoded = DecodeGradientResult(wire);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(decoded->timing.forward_ns, 11);
  EXPECT_EQ(decoded->timing.backward_ns, 22);
  EXPECT_THAT(decoded->output.data, ElementsAre(1, 2));
  ASSERT_TRUE(decoded->loss.has_value());
  EXPECT_EQ(*decoded->loss, 0.125);
  ASSERT_TRUE(decoded->input_grad.has_value());
  EXPECT_THAT(decoded->input_grad->data, ElementsAre(3));
  EXPECT_THAT(decoded->parameter_grads.at("c.weight").data, ElementsAre(4, 5));
  EXPECT_THAT(decoded->parameter_grads.at("c.bias").data, ElementsAre(6));

  // Without output, loss or input gradient.
  result.loss.reset();
  result.input_grad.reset();
  wire.Clear();
  EncodeGradientResult(result, /*include_output=*/false, &wire);
  EXPECT_FALSE(wire.has_output());
  EXPECT_FALSE(wire.has_loss());
  decoded = DecodeGradientResult(wire);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_TRUE(decoded->output.data.empty());
  EXPECT_FALSE(decoded->loss.has_value());
  EXPECT_FALSE(decoded->input_grad.has_value());
}

TEST(WireResultTest, RunningStatsRoundTrip) {
  gradengine::GradientResult result;
  result.output = gradengine::Tensor({1, 2}, {1, 2});
  result.running_stats["bn.running_mean"] = gradengine::Tensor({2}, {0.5f, -0.25f});
  result.running_stats["bn.running_var"] = gradengine::Tensor({2}, {1.5f, 2.0f});
  grad::v1::ComputeGradientsResponse wire;
  EncodeGradientResult(result, /*include_output=*/true, &wire);
  ASSERT_EQ(wire.running_stats_size(), 2);
  EXPECT_EQ(wire.running_stats(0).name(), "bn.running_mean");
  EXPECT_FALSE(wire.running_stats(0).tensor().has_shared_memory());
  absl::StatusOr<gradengine::GradientResult> decoded = DecodeGradientResult(wire);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  ASSERT_EQ(decoded->running_stats.size(), 2u);
  EXPECT_THAT(decoded->running_stats.at("bn.running_mean").data, ElementsAre(0.5f, -0.25f));
  EXPECT_THAT(decoded->running_stats.at("bn.running_var").shape, ElementsAre(2));
  EXPECT_THAT(decoded->running_stats.at("bn.running_var").data, ElementsAre(1.5f, 2.0f));
  EXPECT_TRUE(decoded->parameter_grads.empty());

  gradengine::ForwardResult forward;
  forward.output = gradengine::Tensor({1}, {3});
  forward.running_stats["bn.running_mean"] = gradengine::Tensor({1}, {0.75f});
  grad::v1::ForwardResponse forward_wire;
  EncodeForwardResult(forward, &forward_wire);
  absl::StatusOr<gradengine::ForwardResult> forward_decoded = DecodeForwardResult(forward_wire);
  ASSERT_TRUE(forward_decoded.ok()) << forward_decoded.status();
  EXPECT_THAT(forward_decoded->running_stats.at("bn.running_mean").data, ElementsAre(0.75f));

  // Running statistics never come in shared memory, and names do not repeat.
  grad::v1::ForwardResponse shared = forward_wire;
  grad::v1::Tensor* stat = shared.mutable_running_stats(0)->mutable_tensor();
  stat->clear_data();
  stat->mutable_shared_memory()->set_region("r");
  stat->mutable_shared_memory()->set_byte_size(4);
  EXPECT_THAT(DecodeForwardResult(shared).status(),
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       "running_stats[0].tensor.shared_memory is set"));
  grad::v1::ForwardResponse repeated = forward_wire;
  *repeated.add_running_stats() = forward_wire.running_stats(0);
  EXPECT_THAT(DecodeForwardResult(repeated).status(),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       "running_stats[1].name=\"bn.running_mean\" repeats an earlier entry"));
}

TEST(WireResultTest, RejectsACorruptResponse) {
  grad::v1::ComputeGradientsResponse wire;
  *wire.mutable_input_grad() = FloatTensor({2}, {1, 2});
  wire.mutable_input_grad()->mutable_data()->resize(7);
  EXPECT_THAT(DecodeGradientResult(wire).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "input_grad.data has 7 bytes"));
}

TEST(WireNamesTest, AdvertisesWhatTheEngineAccepts) {
  EXPECT_THAT(SupportedActivationNames(),
              ElementsAre("relu", "leaky_relu", "tanh", "sigmoid", "elu", "gelu", "gelu_tanh"));
  EXPECT_THAT(SupportedObjectiveNames(), ElementsAre("mse", "sum", "grad_output", "cross_entropy"));
  EXPECT_THAT(SupportedLayerNames(), ElementsAre("conv2d", "activation", "max_pool2d", "avg_pool2d",
                                                 "batch_norm2d", "linear", "add"));
}

}  // namespace
}  // namespace gradwire
