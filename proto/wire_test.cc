#include "proto/wire.h"

#include <cmath>
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
    *result_listener << "code is " << absl::StatusCodeToString(arg.code()) << ": "
                     << arg.message();
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
  network.layers.push_back({"act2", gradengine::ActivationSpec{gradengine::ActivationKind::kGeluTanh}});
  network.layers.push_back({"conv2", gradengine::Conv2dSpec::Square(6, 1, 1, 1, 0, false)});
  return network;
}

TEST(WireTensorTest, RoundTripsBitsExactly) {
  const std::vector<float> values = {1.5f, -0.0f, std::numeric_limits<float>::infinity(),
                                     std::nanf("7"), std::numeric_limits<float>::denorm_min(),
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
      {"short data", {2, 3}, 1, 20, absl::StatusCode::kInvalidArgument,
       "x.data has 20 bytes, but shape=[2, 3] of DATA_TYPE_FLOAT32 needs 24"},
      {"long data", {2}, 1, 12, absl::StatusCode::kInvalidArgument, "x.data has 12 bytes"},
      {"negative dim", {2, -1}, 1, 0, absl::StatusCode::kInvalidArgument,
       "x.shape[1]=-1 must be >= 0"},
      {"overflowing dims", {huge, huge}, 1, 0, absl::StatusCode::kInvalidArgument,
       "more elements than a 64-bit byte count can hold"},
      {"huge dim without data", {huge}, 1, 4, absl::StatusCode::kInvalidArgument,
       "needs 4398046511104"},
      {"unset dtype", {1}, 0, 4, absl::StatusCode::kInvalidArgument,
       "x.dtype=0 (DATA_TYPE_UNSPECIFIED) is not a supported data type"},
      {"unknown dtype", {1}, 9, 4, absl::StatusCode::kInvalidArgument,
       "x.dtype=9 is not a supported data type"},
      {"bfloat16", {1}, 2, 2, absl::StatusCode::kUnimplemented,
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
             conv2d { in_channels: 1 out_channels: 8 kernel_size: 3 padding: [ 1, 2 ] }
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
      {R"pb(layers { name: "a" activation { kind: RELU } } layers { name: "b" })pb",
       absl::StatusCode::kInvalidArgument, "layers[1].op (\"b\") is not set"},
      {R"pb(layers { name: "a" conv2d { in_channels: 1 out_channels: 1 } })pb",
       absl::StatusCode::kInvalidArgument, "layers[0].conv2d.kernel_size is not set"},
      {R"pb(layers { name: "a" conv2d { in_channels: 1 out_channels: 1 kernel_size: [ 1, 2, 3 ] } })pb",
       absl::StatusCode::kInvalidArgument,
       "layers[0].conv2d.kernel_size has 3 values [1, 2, 3]; expected 1 or 2"},
      {R"pb(layers { name: "a" conv2d { in_channels: 1 out_channels: 1 kernel_size: 1 stride: [ 1, 1, 1 ] } })pb",
       absl::StatusCode::kInvalidArgument, "layers[0].conv2d.stride has 3 values"},
      {R"pb(layers { name: "a" conv2d { in_channels: 1 out_channels: 1 kernel_size: 1 dilation: [ 1, 1, 1 ] } })pb",
       absl::StatusCode::kInvalidArgument, "layers[0].conv2d.dilation has 3 values"},
      {R"pb(layers { name: "a" conv2d { in_channels: 1 out_channels: 1 kernel_size: 1 padding: [ 1, 1, 1 ] } })pb",
       absl::StatusCode::kInvalidArgument,
       "layers[0].conv2d.padding has 3 values [1, 1, 1]; expected 1, 2 or 4"},
      {R"pb(layers { name: "a" activation {} })pb", absl::StatusCode::kInvalidArgument,
       "layers[0].activation.kind=0 (ACTIVATION_KIND_UNSPECIFIED) is not an activation"},
      {R"pb(layers { name: "a" activation { kind: 42 } })pb", absl::StatusCode::kInvalidArgument,
       "layers[0].activation.kind=42 is not an activation"},
  };
  for (const Case& c : table) {
    SCOPED_TRACE(c.text);
    grad::v1::Network wire;
    ASSERT_TRUE(google::protobuf::TextFormat::ParseFromString(c.text, &wire));
    EXPECT_THAT(DecodeNetwork(wire).status(), StatusIs(c.code, c.message));
  }
}

TEST(WireNetworkTest, ReportsAnOpFromANewerVersionAsUnimplemented) {
  // A Layer carrying field 9, which this version does not define, as a newer client would send.
  grad::v1::Layer layer;
  layer.set_name("future");
  std::string bytes = layer.SerializeAsString();
  bytes += std::string("\x4a\x00", 2);  // field 9, length-delimited, empty
  grad::v1::Network wire;
  ASSERT_TRUE(wire.add_layers()->ParseFromString(bytes));
  EXPECT_THAT(DecodeNetwork(wire).status(),
              StatusIs(absl::StatusCode::kUnimplemented,
                       "layers[0] (\"future\") has an op this server does not know (field 9)"));
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
      {"duplicate parameter",
       [](auto* r) { *r->add_parameters() = r->parameters(0); },
       absl::StatusCode::kInvalidArgument,
       "parameters[1].name=\"conv1.weight\" repeats parameters[0]"},
      {"empty parameter name", [](auto* r) { r->mutable_parameters(0)->clear_name(); },
       absl::StatusCode::kInvalidArgument, "parameters[0].name is empty"},
      {"parameter without tensor", [](auto* r) { r->mutable_parameters(0)->clear_tensor(); },
       absl::StatusCode::kInvalidArgument, "parameters[0].tensor (\"conv1.weight\") is not set"},
      {"bad parameter dtype",
       [](auto* r) { r->mutable_parameters(0)->mutable_tensor()->set_dtype(grad::v1::DataType(5)); },
       absl::StatusCode::kInvalidArgument, "parameters[0].tensor.dtype=5"},
      {"no objective", [](auto* r) { r->clear_objective(); },
       absl::StatusCode::kInvalidArgument,
       "objective has none set; set exactly one of mse_target, sum, grad_output"},
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
  EXPECT_THAT(SupportedObjectiveNames(), ElementsAre("mse", "sum", "grad_output"));
}

}  // namespace
}  // namespace gradwire
