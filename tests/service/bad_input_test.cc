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
         layer->GetReflection()->MutableUnknownFields(layer)->AddLengthDelimited(9, "");
       },
       StatusCode::UNIMPLEMENTED,
       "layers[1] (\"relu1\") has an op this server does not know (field 9)"},
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
       StatusCode::INVALID_ARGUMENT, "parameters[\"conv9.weight\"] does not belong to any layer"},
      {"bias for a layer without one",
       [](auto* r) {
         grad::v1::NamedTensor* extra = r->add_parameters();
         *extra = r->parameters(0);
         extra->set_name("conv2.bias");
       },
       StatusCode::INVALID_ARGUMENT,
       "parameters[\"conv2.bias\"] is given but layers[2].conv2d.bias is false"},
      {"parameter for an activation",
       [](auto* r) {
         grad::v1::NamedTensor* extra = r->add_parameters();
         *extra = r->parameters(0);
         extra->set_name("relu1.weight");
       },
       StatusCode::INVALID_ARGUMENT, "is an activation without parameters"},
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
         for (int i = 0; i < 2100; ++i) r->add_parameters()->set_name(absl::StrCat("p", i));
       },
       StatusCode::RESOURCE_EXHAUSTED, "parameters has 2103 entries; at most 2048 are allowed"},
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
