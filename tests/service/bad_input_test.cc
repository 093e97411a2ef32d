// Requests the server must refuse: each kind gets its specific status code and a message that
// names the offending field, and the same server answers a valid request correctly right after.
//
// Messages come from three places, all passed through unchanged: the server itself (parsing,
// request_id, limits), the wire decoder (proto/wire.h) and the engine's validation.

#include <grpcpp/grpcpp.h>

#include <cmath>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "google/protobuf/unknown_field_set.h"
#include "grad/v1/gradient_service.grpc.pb.h"
#include "gradengine/engine.h"
#include "gtest/gtest.h"
#include "proto/wire.h"
#include "server/server.h"
#include "tests/service/service_test_util.h"

namespace gradservicetest {
namespace {

using gradengine::ActivationKind;
using gradengine::ActivationSpec;
using gradengine::Conv2dSpec;
using gradengine::LayerSpec;
using ::testing::HasSubstr;

constexpr int kThreads = 1;

// layers: [0] conv1 3->8 3x3 padding 1 with bias, [1] relu1, [2] conv2 8->8 3x3 padding 1
// without bias, [3] tanh2; input [2, 3, 10, 10], output [2, 8, 10, 10]. On the wire the
// parameters are in name order: [0] conv1.bias, [1] conv1.weight, [2] conv2.weight.
OwnedCase BaseCase() {
  gradengine::NetworkSpec network;
  network.layers = {
      LayerSpec{"conv1", Conv2dSpec::Square(3, 8, 3, 1, 1, /*bias=*/true)},
      LayerSpec{"relu1", ActivationSpec{ActivationKind::kRelu}},
      LayerSpec{"conv2", Conv2dSpec::Square(8, 8, 3, 1, 1, /*bias=*/false)},
      LayerSpec{"tanh2", ActivationSpec{ActivationKind::kTanh}},
  };
  return MakeCase(network, {2, 3, 10, 10}, 7);
}

using Mutation = std::function<void(grad::v1::ComputeGradientsRequest*)>;

struct BadInput {
  const char* kind;
  Mutation mutate;
  grpc::StatusCode code;
  const char* message;
};

grad::v1::Tensor* Input(grad::v1::ComputeGradientsRequest* r) { return r->mutable_input(); }
grad::v1::Conv2d* ConvAt(grad::v1::ComputeGradientsRequest* r, int layer) {
  return r->mutable_network()->mutable_layers(layer)->mutable_conv2d();
}
grad::v1::NamedTensor* ParameterAt(grad::v1::ComputeGradientsRequest* r, int index) {
  return r->mutable_parameters(index);
}
void SetShape(grad::v1::Tensor* tensor, std::vector<int64_t> shape) {
  tensor->mutable_shape()->Assign(shape.begin(), shape.end());
}

std::vector<BadInput> BadInputs() {
  using grpc::StatusCode;
  const int64_t big = int64_t{1} << 20;
  const int64_t huge = int64_t{1} << 40;
  return {
      // Tensors.
      {"tensor bytes too short", [](auto* r) { Input(r)->mutable_data()->resize(2396); },
       StatusCode::INVALID_ARGUMENT,
       "input.data has 2396 bytes, but shape=[2, 3, 10, 10] of DATA_TYPE_FLOAT32 needs 2400"},
      {"parameter bytes too long",
       [](auto* r) { ParameterAt(r, 1)->mutable_tensor()->mutable_data()->append(4, '\0'); },
       StatusCode::INVALID_ARGUMENT, "parameters[1].tensor.data has 868 bytes"},
      {"zero dim",
       [](auto* r) {
         SetShape(Input(r), {2, 3, 0, 10});
         Input(r)->clear_data();
       },
       StatusCode::INVALID_ARGUMENT, "input.shape[2]=0 must be positive"},
      {"negative dim", [](auto* r) { Input(r)->set_shape(1, -3); }, StatusCode::INVALID_ARGUMENT,
       "input.shape[1]=-3 must be >= 0"},
      {"huge dims without the bytes",
       [=](auto* r) {
         SetShape(Input(r), {big, big, 1, 1});
       },
       StatusCode::INVALID_ARGUMENT,
       "input.data has 2400 bytes, but shape=[1048576, 1048576, 1, 1]"},
      {"dims whose product overflows int64",
       [=](auto* r) {
         SetShape(Input(r), {huge, huge, 1, 1});
       },
       StatusCode::INVALID_ARGUMENT,
       "input.shape=[1099511627776, 1099511627776, 1, 1] has more elements than"},
      {"input with 3 dims",
       [](auto* r) {
         SetShape(Input(r), {6, 10, 10});
       },
       StatusCode::INVALID_ARGUMENT, "input.shape=[6, 10, 10] must have 4 dims"},
      {"unknown dtype", [](auto* r) { Input(r)->set_dtype(static_cast<grad::v1::DataType>(7)); },
       StatusCode::INVALID_ARGUMENT, "input.dtype=7 is not a supported data type"},
      {"unset dtype", [](auto* r) { Input(r)->set_dtype(grad::v1::DATA_TYPE_UNSPECIFIED); },
       StatusCode::INVALID_ARGUMENT, "input.dtype=0 (DATA_TYPE_UNSPECIFIED)"},
      {"bfloat16 input", [](auto* r) { Input(r)->set_dtype(grad::v1::DATA_TYPE_BFLOAT16); },
       StatusCode::UNIMPLEMENTED, "input.dtype=2 (DATA_TYPE_BFLOAT16) is not supported yet"},
      {"bfloat16 target",
       [](auto* r) {
         r->mutable_objective()->mutable_mse_target()->set_dtype(grad::v1::DATA_TYPE_BFLOAT16);
       },
       StatusCode::UNIMPLEMENTED, "objective.mse_target.dtype=2"},
      {"input missing", [](auto* r) { r->clear_input(); }, StatusCode::INVALID_ARGUMENT,
       "input is not set"},
      // Layers.
      {"empty network", [](auto* r) { r->mutable_network()->clear_layers(); },
       StatusCode::INVALID_ARGUMENT, "layers is empty"},
      {"layer op unset", [](auto* r) { r->mutable_network()->mutable_layers(1)->clear_op(); },
       StatusCode::INVALID_ARGUMENT, "layers[1].op (\"relu1\") is not set"},
      {"unknown layer op",
       [](auto* r) {
         grad::v1::Layer* layer = r->mutable_network()->mutable_layers(1);
         layer->clear_op();
         layer->GetReflection()->MutableUnknownFields(layer)->AddLengthDelimited(15, "");
       },
       StatusCode::UNIMPLEMENTED,
       "layers[1] (\"relu1\") has an op this server does not know (field 15)"},
      {"empty layer name", [](auto* r) { r->mutable_network()->mutable_layers(1)->clear_name(); },
       StatusCode::INVALID_ARGUMENT, "layers[1].name is empty"},
      {"duplicate layer names",
       [](auto* r) { r->mutable_network()->mutable_layers(2)->set_name("conv1"); },
       StatusCode::INVALID_ARGUMENT, "layers[2].name=\"conv1\" is used by an earlier layer"},
      {"kernel_size with 3 values", [](auto* r) { ConvAt(r, 0)->add_kernel_size(3); },
       StatusCode::INVALID_ARGUMENT, "layers[0].conv2d.kernel_size has 3 values [3, 3, 3]"},
      {"kernel_size unset", [](auto* r) { ConvAt(r, 0)->clear_kernel_size(); },
       StatusCode::INVALID_ARGUMENT, "layers[0].conv2d.kernel_size is not set"},
      {"kernel over the cap", [](auto* r) { ConvAt(r, 0)->set_kernel_size(0, 5000); },
       StatusCode::INVALID_ARGUMENT,
       "layers[0].conv2d.kernel_size[0]=5000 exceeds the supported maximum 4096"},
      {"kernel larger than the padded input",
       [](auto* r) {
         ConvAt(r, 0)->set_kernel_size(0, 13);
         ConvAt(r, 0)->set_kernel_size(1, 13);
       },
       StatusCode::INVALID_ARGUMENT, "the output would be empty"},
      {"groups not dividing the channels", [](auto* r) { ConvAt(r, 2)->set_groups(3); },
       StatusCode::INVALID_ARGUMENT, "layers[2].conv2d.groups=3 does not divide in_channels=8"},
      {"in_channels not matching the input", [](auto* r) { ConvAt(r, 2)->set_in_channels(5); },
       StatusCode::INVALID_ARGUMENT,
       "layers[2].conv2d.in_channels=5 does not match the 8 channels of its input"},
      {"negative stride",
       [](auto* r) {
         ConvAt(r, 0)->clear_stride();
         ConvAt(r, 0)->add_stride(-1);
       },
       StatusCode::INVALID_ARGUMENT, "layers[0].conv2d.stride[0]=-1 must be positive"},
      {"zero dilation", [](auto* r) { ConvAt(r, 0)->set_dilation(1, 0); },
       StatusCode::INVALID_ARGUMENT, "layers[0].conv2d.dilation[1]=0 must be positive"},
      {"padding with 3 values",
       [](auto* r) {
         ConvAt(r, 0)->clear_padding();
         for (int i = 0; i < 3; ++i) ConvAt(r, 0)->add_padding(1);
       },
       StatusCode::INVALID_ARGUMENT, "layers[0].conv2d.padding has 3 values [1, 1, 1]"},
      {"negative padding", [](auto* r) { ConvAt(r, 0)->set_padding(0, -1); },
       StatusCode::INVALID_ARGUMENT, "layers[0].conv2d.padding[0]=-1 must be >= 0"},
      {"unknown activation kind",
       [](auto* r) {
         r->mutable_network()->mutable_layers(1)->mutable_activation()->set_kind(
             static_cast<grad::v1::ActivationKind>(42));
       },
       StatusCode::INVALID_ARGUMENT, "layers[1].activation.kind=42 is not an activation"},
      {"unset activation kind",
       [](auto* r) {
         r->mutable_network()->mutable_layers(1)->mutable_activation()->set_kind(
             grad::v1::ACTIVATION_KIND_UNSPECIFIED);
       },
       StatusCode::INVALID_ARGUMENT,
       "layers[1].activation.kind=0 (ACTIVATION_KIND_UNSPECIFIED) is not an activation"},
      {"non-finite leaky_relu slope",
       [](auto* r) {
         grad::v1::Activation* act = r->mutable_network()->mutable_layers(3)->mutable_activation();
         act->set_kind(grad::v1::LEAKY_RELU);
         act->set_alpha(std::numeric_limits<float>::quiet_NaN());
       },
       StatusCode::INVALID_ARGUMENT, "layers[3].leaky_relu.negative_slope=nan must be finite"},
      // Parameters.
      {"missing parameter", [](auto* r) { r->mutable_parameters()->DeleteSubrange(1, 1); },
       StatusCode::INVALID_ARGUMENT, "parameters[\"conv1.weight\"] is missing"},
      {"extra parameter",
       [](auto* r) {
         grad::v1::NamedTensor* extra = r->add_parameters();
         *extra = r->parameters(0);
         extra->set_name("conv9.weight");
       },
       StatusCode::INVALID_ARGUMENT,
       "parameters[\"conv9.weight\"] is given, but it does not belong to any layer"},
      {"bias for a layer without one",
       [](auto* r) {
         grad::v1::NamedTensor* extra = r->add_parameters();
         *extra = r->parameters(0);
         extra->set_name("conv2.bias");
       },
       StatusCode::INVALID_ARGUMENT,
       "parameters[\"conv2.bias\"] is given but layers[2] (\"conv2\", conv2d) takes "
       "\"conv2.weight\""},
      {"parameter for an activation",
       [](auto* r) {
         grad::v1::NamedTensor* extra = r->add_parameters();
         *extra = r->parameters(0);
         extra->set_name("relu1.weight");
       },
       StatusCode::INVALID_ARGUMENT, "activation) takes no parameters"},
      {"duplicate parameter name", [](auto* r) { *r->add_parameters() = r->parameters(0); },
       StatusCode::INVALID_ARGUMENT, "parameters[3].name=\"conv1.bias\" repeats parameters[0]"},
      {"empty parameter name", [](auto* r) { ParameterAt(r, 0)->clear_name(); },
       StatusCode::INVALID_ARGUMENT, "parameters[0].name is empty"},
      {"parameter without a tensor", [](auto* r) { ParameterAt(r, 0)->clear_tensor(); },
       StatusCode::INVALID_ARGUMENT, "parameters[0].tensor (\"conv1.bias\") is not set"},
      {"wrong weight shape",
       [](auto* r) {
         SetShape(ParameterAt(r, 1)->mutable_tensor(), {8, 3, 1, 9});
       },
       StatusCode::INVALID_ARGUMENT,
       "parameters[\"conv1.weight\"].shape=[8, 3, 1, 9] must be [8, 3, 3, 3]"},
      {"wrong bias shape",
       [](auto* r) {
         SetShape(ParameterAt(r, 0)->mutable_tensor(), {2, 4});
       },
       StatusCode::INVALID_ARGUMENT, "parameters[\"conv1.bias\"].shape=[2, 4] must be [8]"},
      // Objectives and gradient selection.
      {"target shape mismatch",
       [](auto* r) {
         SetShape(r->mutable_objective()->mutable_mse_target(), {2, 8, 100, 1});
       },
       StatusCode::INVALID_ARGUMENT,
       "objective.mse.target.shape=[2, 8, 100, 1] must equal the network's output shape "
       "[2, 8, 10, 10]"},
      {"grad_output shape mismatch",
       [](auto* r) {
         grad::v1::Objective* objective = r->mutable_objective();
         *objective->mutable_grad_output() = objective->mse_target();
         objective->clear_mse_target();
         SetShape(objective->mutable_grad_output(), {1, 8, 10, 20});
       },
       StatusCode::INVALID_ARGUMENT, "objective.grad_output.shape=[1, 8, 10, 20] must equal"},
      {"two objectives", [](auto* r) { r->mutable_objective()->mutable_sum(); },
       StatusCode::INVALID_ARGUMENT, "objective has mse_target and sum set"},
      {"no objective", [](auto* r) { r->clear_objective(); }, StatusCode::INVALID_ARGUMENT,
       "objective has none set"},
      {"unknown parameter in the gradient selection",
       [](auto* r) { r->mutable_gradients()->add_parameters("conv7.weight"); },
       StatusCode::INVALID_ARGUMENT,
       "gradients.parameters[0]=\"conv7.weight\" is not a parameter of the network"},
      {"no_parameters together with names",
       [](auto* r) {
         r->mutable_gradients()->set_no_parameters(true);
         r->mutable_gradients()->add_parameters("conv1.weight");
       },
       StatusCode::INVALID_ARGUMENT, "gradients.no_parameters is set, but gradients.parameters"},
      // The server's own checks.
      {"request_id too long", [](auto* r) { r->set_request_id(std::string(129, 'x')); },
       StatusCode::INVALID_ARGUMENT, "request_id has 129 bytes; at most 128 are allowed"},
      {"request_id not UTF-8", [](auto* r) { r->set_request_id("bad\xff\xfe"); },
       StatusCode::INVALID_ARGUMENT, "request_id is not valid UTF-8"},
      {"layer name not UTF-8",
       [](auto* r) { r->mutable_network()->mutable_layers(1)->set_name("act\xc0\xaf"); },
       StatusCode::INVALID_ARGUMENT, "network.layers[1].name is not valid UTF-8"},
      {"parameter name not UTF-8",
       [](auto* r) { r->mutable_parameters(0)->set_name("\xed\xa0\x80.weight"); },
       StatusCode::INVALID_ARGUMENT, "parameters[0].name is not valid UTF-8"},
      // Bounds on the network (GetInfo's limits), and bounded quoting of what a client sent.
      {"layer name too long",
       [](auto* r) { r->mutable_network()->mutable_layers(0)->set_name(std::string(257, 'n')); },
       StatusCode::INVALID_ARGUMENT, "\"... has 257 bytes; at most 256 are allowed"},
      {"parameter name too long",
       [](auto* r) { r->mutable_parameters(0)->set_name(std::string(1 << 20, 'p')); },
       StatusCode::INVALID_ARGUMENT, "has 1048576 bytes; at most 256 are allowed"},
      {"too many layers",
       [](auto* r) {
         for (int i = 0; i < 1100; ++i) {
           grad::v1::Layer* layer = r->mutable_network()->add_layers();
           layer->set_name(absl::StrCat("extra", i));
           layer->mutable_activation()->set_kind(grad::v1::RELU);
         }
       },
       StatusCode::RESOURCE_EXHAUSTED, "layers has 1104 entries; at most 1024 are allowed"},
      {"too many parameters",
       [](auto* r) {
         for (int i = 0; i < 4100; ++i) r->add_parameters()->set_name(absl::StrCat("p", i));
       },
       StatusCode::RESOURCE_EXHAUSTED, "parameters has 4103 entries; at most 4096 are allowed"},
      {"network spec too big",
       [](auto* r) {
         // Fields this server does not know are skipped, but they count.
         for (int i = 0; i < 1000; ++i) {
           grad::v1::Layer* layer = r->mutable_network()->add_layers();
           layer->set_name(absl::StrCat("pad", i));
           layer->mutable_activation()->set_kind(grad::v1::RELU);
           for (int k = 0; k < 600; ++k) {
             grad::v1::Activation* activation = layer->mutable_activation();
             activation->GetReflection()->MutableUnknownFields(activation)->AddVarint(15, 1);
           }
         }
       },
       StatusCode::RESOURCE_EXHAUSTED, "network has "},
      {"duplicate 200 KB layer names quoted by a prefix",
       [](auto* r) {
         r->mutable_network()->mutable_layers(0)->set_name(std::string(200000, 'd'));
         r->mutable_network()->mutable_layers(1)->set_name(std::string(200000, 'd'));
       },
       StatusCode::INVALID_ARGUMENT, "has 200000 bytes; at most 256"},
  };
}

class BadInputTest : public ServerAndEngineTest<kThreads, /*kMaxConcurrentRequests=*/1> {
 protected:
  static grad::v1::ComputeGradientsRequest BaseRequest(const OwnedCase& c) {
    grad::v1::ComputeGradientsRequest request;
    gradwire::EncodeGradientRequest(c.GradientRequest(), &request);
    request.set_request_id("base");
    return request;
  }

  // The server still computes a valid request exactly as the engine does.
  static void ExpectStillServes(TestServer* server) {
    const OwnedCase c = SmallCase("grouped_dilated");
    ExpectGradientsMatchEngine(*server, *engine_, c.GradientRequest());
  }
};

TEST_F(BadInputTest, TheBaseRequestIsValid) {
  const OwnedCase c = BaseCase();
  grad::v1::ComputeGradientsResponse response;
  grpc::ClientContext context;
  grpc::Status status = server_->stub->ComputeGradients(&context, BaseRequest(c), &response);
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(response.request_id(), "base");
}

TEST_F(BadInputTest, EachKindGetsItsCodeAndNamesTheField) {
  const OwnedCase c = BaseCase();
  const std::vector<BadInput> table = BadInputs();
  EXPECT_GE(table.size(), 30u);
  for (const BadInput& bad : table) {
    SCOPED_TRACE(bad.kind);
    grad::v1::ComputeGradientsRequest request = BaseRequest(c);
    bad.mutate(&request);
    grad::v1::ComputeGradientsResponse response;
    grpc::ClientContext context;
    grpc::Status status = server_->stub->ComputeGradients(&context, request, &response);
    EXPECT_EQ(status.error_code(), bad.code) << status.error_message();
    EXPECT_THAT(status.error_message(), HasSubstr(bad.message));
    // Whatever the client sent, the message quotes a bounded prefix of it.
    EXPECT_LT(status.error_message().size(), 1024u);
    ExpectStillServes(server_);
  }
}

TEST_F(BadInputTest, ForwardChecksItsRequestsToo) {
  const OwnedCase c = BaseCase();
  grad::v1::ForwardRequest base;
  gradwire::EncodeForwardRequest(c.ForwardRequest(), &base);
  struct Case {
    std::function<void(grad::v1::ForwardRequest*)> mutate;
    grpc::StatusCode code;
    const char* message;
  };
  const Case cases[] = {
      {[](auto* r) { r->clear_input(); }, grpc::StatusCode::INVALID_ARGUMENT, "input is not set"},
      {[](auto* r) { r->mutable_network()->mutable_layers(2)->mutable_conv2d()->set_groups(3); },
       grpc::StatusCode::INVALID_ARGUMENT, "layers[2].conv2d.groups=3 does not divide"},
      {[](auto* r) { r->mutable_input()->set_dtype(grad::v1::DATA_TYPE_BFLOAT16); },
       grpc::StatusCode::UNIMPLEMENTED, "input.dtype=2 (DATA_TYPE_BFLOAT16)"},
      {[](auto* r) { r->set_request_id(std::string(200, 'x')); },
       grpc::StatusCode::INVALID_ARGUMENT, "request_id has 200 bytes"},
  };
  for (const Case& bad : cases) {
    SCOPED_TRACE(bad.message);
    grad::v1::ForwardRequest request = base;
    bad.mutate(&request);
    grad::v1::ForwardResponse response;
    grpc::ClientContext context;
    grpc::Status status = server_->stub->Forward(&context, request, &response);
    EXPECT_EQ(status.error_code(), bad.code) << status.error_message();
    EXPECT_THAT(status.error_message(), HasSubstr(bad.message));
    // Whatever the client sent, the message quotes a bounded prefix of it.
    EXPECT_LT(status.error_message().size(), 1024u);
    ExpectStillServes(server_);
  }
}

// layers: [0] conv1 3->4 3x3 padding 1 with bias, [1] bn1 (training), [2] relu1, [3] pool1
// max 2, [4] conv2 4->4 3x3 padding 1, [5] bn2 (inference), [6] add (other pool1), [7] avg
// avg 2, [8] fc linear 16->5; input [2, 3, 8, 8]; cross-entropy on labels {1, 3}.
OwnedCase CnnCase() {
  using gradengine::AddSpec;
  using gradengine::BatchNorm2dSpec;
  gradengine::BatchNorm2dSpec train;
  train.num_features = 4;
  gradengine::BatchNorm2dSpec eval = train;
  eval.training = false;
  gradengine::NetworkSpec network;
  network.layers = {
      LayerSpec{"conv1", Conv2dSpec::Square(3, 4, 3, 1, 1, /*bias=*/true)},
      LayerSpec{"bn1", train},
      LayerSpec{"relu1", ActivationSpec{ActivationKind::kRelu}},
      LayerSpec{"pool1", gradengine::MaxPool2dSpec::Square(2)},
      LayerSpec{"conv2", Conv2dSpec::Square(4, 4, 3, 1, 1, /*bias=*/false)},
      LayerSpec{"bn2", eval},
      LayerSpec{"add", AddSpec{"pool1"}},
      LayerSpec{"avg", gradengine::AvgPool2dSpec::Square(2)},
      LayerSpec{"fc", gradengine::LinearSpec{16, 5, true}},
  };
  return MakeCase(network, {2, 3, 8, 8}, 5);
}

grad::v1::ComputeGradientsRequest CnnRequest(const OwnedCase& c) {
  static const int64_t kLabels[] = {1, 3};
  gradengine::GradientRequest request = c.GradientRequest();
  request.objective = gradengine::Objective(gradengine::ObjectiveKind::kCrossEntropy);
  request.objective.labels = {{2}, kLabels, 2};
  request.objective.label_smoothing = 0.1;
  grad::v1::ComputeGradientsRequest wire;
  gradwire::EncodeGradientRequest(request, &wire);
  return wire;
}

grad::v1::Layer* LayerAt(grad::v1::ComputeGradientsRequest* r, int layer) {
  return r->mutable_network()->mutable_layers(layer);
}
grad::v1::Tensor* Labels(grad::v1::ComputeGradientsRequest* r) {
  return r->mutable_objective()->mutable_cross_entropy()->mutable_target();
}
void EraseParameter(grad::v1::ComputeGradientsRequest* r, const std::string& name) {
  auto* parameters = r->mutable_parameters();
  for (int i = 0; i < parameters->size(); ++i) {
    if (parameters->Get(i).name() == name) {
      parameters->DeleteSubrange(i, 1);
      return;
    }
  }
}

std::vector<BadInput> CnnBadInputs() {
  using grpc::StatusCode;
  const StatusCode kInvalid = StatusCode::INVALID_ARGUMENT;
  return {
      // Pooling.
      {"pool kernel larger than the padded input",
       [](auto* r) {
         LayerAt(r, 3)->mutable_max_pool2d()->clear_kernel_size();
         LayerAt(r, 3)->mutable_max_pool2d()->add_kernel_size(9);
       },
       kInvalid,
       "layers[3].max_pool2d.kernel_size=[9, 9] with dilation=[1, 1] is larger than the padded "
       "input [2, 4, 8, 8]"},
      {"pool padding over half the kernel",
       [](auto* r) {
         LayerAt(r, 3)->mutable_max_pool2d()->clear_padding();
         LayerAt(r, 3)->mutable_max_pool2d()->add_padding(2);
       },
       kInvalid, "layers[3].max_pool2d.padding[0]=2 must be at most half the kernel size 2"},
      {"pool kernel_size with 3 entries",
       [](auto* r) {
         auto* pool = LayerAt(r, 3)->mutable_max_pool2d();
         pool->clear_kernel_size();
         for (int k = 0; k < 3; ++k) pool->add_kernel_size(2);
       },
       kInvalid, "layers[3].max_pool2d.kernel_size has 3 values [2, 2, 2]; expected 1 or 2"},
      {"pool kernel_size unset",
       [](auto* r) { LayerAt(r, 3)->mutable_max_pool2d()->clear_kernel_size(); }, kInvalid,
       "layers[3].max_pool2d.kernel_size is not set"},
      {"pool negative stride",
       [](auto* r) {
         auto* pool = LayerAt(r, 3)->mutable_max_pool2d();
         pool->clear_stride();
         pool->add_stride(-1);
       },
       kInvalid, "layers[3].max_pool2d.stride[0]=-1 must be positive"},
      {"pool zero dilation",
       [](auto* r) {
         auto* pool = LayerAt(r, 3)->mutable_max_pool2d();
         pool->clear_dilation();
         pool->add_dilation(0);
       },
       kInvalid, "layers[3].max_pool2d.dilation[0]=0 must be positive"},
      {"avg pool padding over half the kernel",
       [](auto* r) {
         LayerAt(r, 7)->mutable_avg_pool2d()->clear_padding();
         LayerAt(r, 7)->mutable_avg_pool2d()->add_padding(2);
       },
       kInvalid, "layers[7].avg_pool2d.padding[0]=2 must be at most half the kernel size 2"},
      // Batch norm.
      {"batch norm mode unset",
       [](auto* r) { LayerAt(r, 1)->mutable_batch_norm2d()->clear_training(); }, kInvalid,
       "layers[1].batch_norm2d.training is not set"},
      {"batch norm features",
       [](auto* r) { LayerAt(r, 1)->mutable_batch_norm2d()->set_num_features(5); }, kInvalid,
       "layers[1].batch_norm2d.num_features=5 does not match the 4 channels of its input"},
      {"batch norm eps", [](auto* r) { LayerAt(r, 1)->mutable_batch_norm2d()->set_eps(-1); },
       kInvalid, "layers[1].batch_norm2d.eps=-1 must be positive and finite"},
      {"batch norm momentum",
       [](auto* r) { LayerAt(r, 1)->mutable_batch_norm2d()->set_momentum(std::nan("")); }, kInvalid,
       "layers[1].batch_norm2d.momentum=nan must be finite"},
      {"batch norm training on one value per channel",
       [](auto* r) {
         SetShape(r->mutable_input(), {1, 3, 1, 1});
         r->mutable_input()->mutable_data()->resize(12);
       },
       kInvalid,
       "layers[1].batch_norm2d.training=true needs more than one value per channel, but its "
       "input is [1, 4, 1, 1]"},
      {"inference without running_var", [](auto* r) { EraseParameter(r, "bn2.running_var"); },
       kInvalid,
       "parameters[\"bn2.running_var\"] is missing: layers[5] (\"bn2\") needs a tensor of "
       "shape [4]"},
      {"gradient of a running statistic",
       [](auto* r) { r->mutable_gradients()->add_parameters("bn2.running_mean"); }, kInvalid,
       "gradients.parameters[0]=\"bn2.running_mean\" is a running statistic, which has no "
       "gradient"},
      {"running statistic of a layer without them",
       [](auto* r) {
         grad::v1::NamedTensor* extra = r->add_parameters();
         extra->set_name("conv2.running_mean");
         *extra->mutable_tensor() = r->parameters(0).tensor();
       },
       kInvalid,
       "parameters[\"conv2.running_mean\"] is given but layers[4] (\"conv2\", conv2d) takes "
       "\"conv2.weight\""},
      // Linear.
      {"linear in_features", [](auto* r) { LayerAt(r, 8)->mutable_linear()->set_in_features(17); },
       kInvalid,
       "layers[8].linear.in_features=17 does not match its input [2, 4, 2, 2], flattened to "
       "C*H*W=16"},
      {"convolution after a linear layer",
       [](auto* r) {
         grad::v1::Layer* layer = r->mutable_network()->add_layers();
         layer->set_name("conv3");
         *layer->mutable_conv2d() = LayerAt(r, 4)->conv2d();
       },
       kInvalid,
       "layers[9] (conv2d) needs an NCHW input, but its input is [2, 5]: after a linear layer "
       "only linear layers, activations and adds may follow"},
      // Branches.
      {"add naming a later layer", [](auto* r) { LayerAt(r, 6)->mutable_add()->set_other("fc"); },
       kInvalid, "layers[6].add.other=\"fc\" names layers[8], a later layer"},
      {"add of another shape", [](auto* r) { LayerAt(r, 6)->mutable_add()->set_other("relu1"); },
       kInvalid,
       "layers[6].add.other=\"relu1\" has shape [2, 4, 8, 8], but the layer's input is "
       "[2, 4, 4, 4]"},
      {"add naming no layer", [](auto* r) { LayerAt(r, 6)->mutable_add()->set_other("nope"); },
       kInvalid, "layers[6].add.other=\"nope\" names no layer"},
      {"input naming no layer", [](auto* r) { LayerAt(r, 4)->set_input("nope"); }, kInvalid,
       "layers[4].input=\"nope\" names no layer"},
      {"a layer named input", [](auto* r) { LayerAt(r, 2)->set_name("input"); }, kInvalid,
       "layers[2].name=\"input\" is reserved: it names the network's input"},
      // Cross-entropy.
      {"label out of range", [](auto* r) { Labels(r)->mutable_data()->replace(8, 1, 1, '\x05'); },
       kInvalid,
       "objective.cross_entropy.target[1]=5 is not a class index in [0, 5) nor "
       "ignore_index=-100"},
      {"float labels", [](auto* r) { Labels(r)->set_dtype(grad::v1::DATA_TYPE_FLOAT32); }, kInvalid,
       "cannot hold class indices; send DATA_TYPE_INT64"},
      {"labels of the wrong length",
       [](auto* r) {
         SetShape(Labels(r), {3});
         Labels(r)->mutable_data()->append(8, '\0');
       },
       kInvalid, "objective.cross_entropy.target.shape=[3] must be [2] for logits [2, 5]"},
      {"labels bytes short", [](auto* r) { Labels(r)->mutable_data()->resize(12); }, kInvalid,
       "has 12 bytes, but shape=[2] of DATA_TYPE_INT64 needs 16"},
      {"label smoothing over 1",
       [](auto* r) { r->mutable_objective()->mutable_cross_entropy()->set_label_smoothing(1.5); },
       kInvalid, "objective.cross_entropy.label_smoothing=1.5 must be in [0, 1]"},
      {"int64 input", [](auto* r) { r->mutable_input()->set_dtype(grad::v1::DATA_TYPE_INT64); },
       kInvalid, "input.dtype=3 (DATA_TYPE_INT64) is only for class indices"},
  };
}

TEST_F(BadInputTest, TheCnnRequestIsValidAndReturnsRunningStats) {
  const OwnedCase c = CnnCase();
  grad::v1::ComputeGradientsResponse response;
  grpc::ClientContext context;
  grpc::Status status = server_->stub->ComputeGradients(&context, CnnRequest(c), &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_TRUE(response.has_loss());
  ASSERT_EQ(response.running_stats_size(), 2);
  EXPECT_EQ(response.running_stats(0).name(), "bn1.running_mean");
  EXPECT_EQ(response.running_stats(1).name(), "bn1.running_var");
}

TEST_F(BadInputTest, EachNewLayerFieldGetsItsCodeAndNamesTheField) {
  const OwnedCase c = CnnCase();
  const std::vector<BadInput> table = CnnBadInputs();
  EXPECT_GE(table.size(), 20u);
  for (const BadInput& bad : table) {
    SCOPED_TRACE(bad.kind);
    grad::v1::ComputeGradientsRequest request = CnnRequest(c);
    bad.mutate(&request);
    grad::v1::ComputeGradientsResponse response;
    grpc::ClientContext context;
    grpc::Status status = server_->stub->ComputeGradients(&context, request, &response);
    EXPECT_EQ(status.error_code(), bad.code) << status.error_message();
    EXPECT_THAT(status.error_message(), HasSubstr(bad.message));
    EXPECT_LT(status.error_message().size(), 1024u);
    ExpectStillServes(server_);
  }
}

// Bytes that are not a message at all reach the service's own parser, which names the type.
TEST_F(BadInputTest, GarbageBytesAreInvalidArgumentNamingTheMessageType) {
  const OwnedCase c = BaseCase();
  const std::string valid = BaseRequest(c).SerializeAsString();
  const std::vector<std::string> garbage = {
      std::string("\x00\x01\x02\x03", 4),          // field number 0
      std::string(16, '\xff'),                     // a varint that never ends
      valid.substr(0, valid.size() / 2),           // cut inside a length-delimited field
      std::string("\x1a\xff\xff\xff\x0f\x00", 6),  // a field longer than the message
  };
  for (const std::string& bytes : garbage) {
    // The premise: protobuf itself rejects these bytes.
    grad::v1::ComputeGradientsRequest check;
    ASSERT_FALSE(check.ParseFromString(bytes));
    for (const auto& [method, type] :
         {std::pair<std::string, std::string>{"/grad.v1.GradientService/ComputeGradients",
                                              "grad.v1.ComputeGradientsRequest"},
          {"/grad.v1.GradientService/Forward", "grad.v1.ForwardRequest"}}) {
      SCOPED_TRACE(method);
      std::string response;
      grpc::Status status = RawUnaryCall(server_->channel.get(), method, bytes, &response);
      EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
      EXPECT_THAT(status.error_message(), HasSubstr("request is not a valid " + type));
      ExpectStillServes(server_);
    }
  }
}

// An empty message is a valid encoding (every field unset); it fails on what is missing.
TEST_F(BadInputTest, AnEmptyMessageIsParsedAndFailsOnItsMissingFields) {
  for (const std::string method :
       {"/grad.v1.GradientService/ComputeGradients", "/grad.v1.GradientService/Forward"}) {
    SCOPED_TRACE(method);
    std::string response;
    grpc::Status status = RawUnaryCall(server_->channel.get(), method, "", &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(status.error_message(), HasSubstr("input is not set"));
  }
}

// A server with small limits: over max_elements and max_workspace_bytes the engine refuses,
// a request over max_message_mb gRPC itself refuses, and a response over it the service; all
// RESOURCE_EXHAUSTED.
class LimitsTest : public BadInputTest {
 protected:
  static constexpr int64_t kMaxElements = int64_t{1} << 18;  // 1 MiB of float32

  static void SetUpTestSuite() {
    BadInputTest::SetUpTestSuite();
    gradserver::ServerOptions options;
    options.threads_per_request = kThreads;
    options.max_concurrent_requests = 1;
    options.max_message_mb = 1;
    options.max_elements = kMaxElements;
    options.max_workspace_bytes = int64_t{8} << 20;
    limited_ = StartTestServer(options).release();
  }
  static void TearDownTestSuite() {
    delete limited_;
    limited_ = nullptr;
    BadInputTest::TearDownTestSuite();
  }
  void SetUp() override {
    BadInputTest::SetUp();
    ASSERT_NE(limited_, nullptr);
  }

  static grpc::Status Send(const gradengine::GradientRequest& request) {
    grad::v1::ComputeGradientsRequest wire;
    gradwire::EncodeGradientRequest(request, &wire);
    grad::v1::ComputeGradientsResponse response;
    grpc::ClientContext context;
    return limited_->stub->ComputeGradients(&context, wire, &response);
  }

  // One pointwise convolution 1 -> `out_channels` on [1, 1, size, size], objective sum: a
  // small request whose output has out_channels * size^2 elements.
  static OwnedCase Widening(int64_t out_channels, int64_t size) {
    gradengine::NetworkSpec network;
    network.layers = {LayerSpec{"widen", Conv2dSpec::Square(1, out_channels, 1, 1, 0, false)}};
    return MakeCase(network, {1, 1, size, size}, 3);
  }

  static TestServer* limited_;
};

TestServer* LimitsTest::limited_ = nullptr;

TEST_F(LimitsTest, ATensorOverMaxElementsIsResourceExhausted) {
  const OwnedCase c = Widening(/*out_channels=*/128, /*size=*/64);  // output: 524288 elements
  grpc::Status status = Send(c.GradientRequest(gradengine::ObjectiveKind::kSum));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << status.error_message();
  EXPECT_THAT(status.error_message(),
              HasSubstr("layers[0].output has 524288 elements, over the limit of 262144"));
  ExpectStillServes(limited_);
}

TEST_F(LimitsTest, ANetworkOverMaxWorkspaceBytesIsResourceExhausted) {
  // 40 activations of [1, 16, 60, 60] (230 KB each) with their gradients; a 0.6 MB request.
  const OwnedCase c = DeepCase(/*layers=*/40, /*batch=*/1, /*channels=*/16, /*size=*/60);
  grpc::Status status = Send(c.GradientRequest(gradengine::ObjectiveKind::kSum));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << status.error_message();
  EXPECT_THAT(status.error_message(),
              HasSubstr("bytes of intermediate buffers per call, over the limit of 8388608"));
  ExpectStillServes(limited_);
}

TEST_F(LimitsTest, ARequestOverMaxMessageMbIsRefusedByGrpc) {
  const OwnedCase c = MakeCase(BaseCase().network, {1, 3, 300, 300}, 2);  // 1.08 MB of input
  grpc::Status status = Send(c.GradientRequest());
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr("larger than max"));
  ExpectStillServes(limited_);
}

TEST_F(LimitsTest, AResponseOverMaxMessageMbIsResourceExhausted) {
  // The output alone is 4096 * 8 * 8 floats = 1 MiB; the request is 16 KiB.
  const OwnedCase c = Widening(/*out_channels=*/4096, /*size=*/8);
  grpc::Status status = Send(c.GradientRequest(gradengine::ObjectiveKind::kSum));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr("the response would be"));
  EXPECT_THAT(status.error_message(), HasSubstr("over the server's limit of 1048576 bytes"));
  ExpectStillServes(limited_);
}

}  // namespace
}  // namespace gradservicetest
