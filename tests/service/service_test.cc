// The whole path through a real in-process server: every RPC through the generated stub, results
// bit-for-bit equal to the engine's own, PyTorch's numbers for the committed fixtures, GetInfo,
// the health and reflection services, option checking and shutdown.

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "grad/v1/gradient_service.grpc.pb.h"
#include "gradengine/engine.h"
#include "gtest/gtest.h"
#include "proto/wire.h"
#include "server/server.h"
#include "tests/service/service_test_util.h"
#include "tests/torch/fixture.h"

namespace gradservicetest {
namespace {

using gradengine::GradientSelection;
using gradengine::ObjectiveKind;
using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;

// The tests' servers and reference engines compute with one thread per call, so that results
// are bit-identical (oneDNN's reductions depend on the thread count).
constexpr int kThreads = 1;

class ServiceTest : public ServerAndEngineTest<kThreads, /*kMaxConcurrentRequests=*/2> {
 protected:
  // Sends `request` through the stub and checks the reply against the engine's result.
  static void ExpectGradientsMatchEngine(const gradengine::GradientRequest& request,
                                         bool skip_output = false) {
    gradservicetest::ExpectGradientsMatchEngine(*server_, *engine_, request, skip_output);
  }
};

TEST_F(ServiceTest, ForwardMatchesTheEngineBitForBit) {
  for (const std::string& name : SmallCaseNames()) {
    SCOPED_TRACE(name);
    const OwnedCase c = SmallCase(name);
    grad::v1::ForwardRequest wire;
    gradwire::EncodeForwardRequest(c.ForwardRequest(), &wire);
    grad::v1::ForwardResponse response;
    grpc::ClientContext context;
    grpc::Status status = server_->stub->Forward(&context, wire, &response);
    ASSERT_TRUE(status.ok()) << status.error_message();
    absl::StatusOr<gradengine::ForwardResult> actual = gradwire::DecodeForwardResult(response);
    ASSERT_TRUE(actual.ok()) << actual.status();
    absl::StatusOr<gradengine::ForwardResult> expected = engine_->Forward(c.ForwardRequest());
    ASSERT_TRUE(expected.ok()) << expected.status();
    EXPECT_TRUE(SameForwardResult(*actual, *expected));
  }
}

TEST_F(ServiceTest, GradientsMatchTheEngineBitForBitForEveryObjectiveAndSelection) {
  for (const std::string& name : SmallCaseNames()) {
    const OwnedCase c = SmallCase(name);
    const std::string first_parameter = c.parameters.begin()->first;
    for (ObjectiveKind objective :
         {ObjectiveKind::kMse, ObjectiveKind::kSum, ObjectiveKind::kGradOutput}) {
      SCOPED_TRACE(absl::StrCat(name, " ", gradengine::ObjectiveName(objective)));
      ExpectGradientsMatchEngine(c.GradientRequest(objective));
    }
    SCOPED_TRACE(name);
    GradientSelection input_only;
    input_only.all_parameters = false;
    ExpectGradientsMatchEngine(c.GradientRequest(ObjectiveKind::kMse, input_only));
    GradientSelection one_parameter;
    one_parameter.input = false;
    one_parameter.all_parameters = false;
    one_parameter.parameters = {first_parameter};
    ExpectGradientsMatchEngine(c.GradientRequest(ObjectiveKind::kSum, one_parameter));
    ExpectGradientsMatchEngine(c.GradientRequest(ObjectiveKind::kMse), /*skip_output=*/true);
  }
}

TEST_F(ServiceTest, FixturesMatchPyTorch) {
  const char* source_dir = std::getenv("GRAD_SOURCE_DIR");
  ASSERT_NE(source_dir, nullptr) << "GRAD_SOURCE_DIR is not set; run this test through ctest";
  for (const char* name :
       {"seed_conv1", "seed_conv4", "seed_layer", "groups3_tanh_sum", "dilation2_elu_sum",
        "chain4_activations_grad_output", "bias_grads_only", "stride3x2_kernel4x3",
        "chain2_leaky_no_input_grad", "depthwise_multiplier_gelu"}) {
    SCOPED_TRACE(name);
    absl::StatusOr<std::unique_ptr<gradtest::FixtureCase>> fixture =
        gradtest::LoadFixtureCase(absl::StrCat(source_dir, "/tests/fixtures/", name));
    ASSERT_TRUE(fixture.ok()) << fixture.status();

    grad::v1::ComputeGradientsRequest wire;
    gradwire::EncodeGradientRequest((*fixture)->request, &wire);
    grad::v1::ComputeGradientsResponse response;
    grpc::ClientContext context;
    grpc::Status status = server_->stub->ComputeGradients(&context, wire, &response);
    ASSERT_TRUE(status.ok()) << status.error_message();
    absl::StatusOr<gradengine::GradientResult> result = gradwire::DecodeGradientResult(response);
    ASSERT_TRUE(result.ok()) << result.status();
    EXPECT_TRUE(gradtest::GradientResultMatches(**fixture, *result));

    grad::v1::ForwardRequest forward_wire;
    gradwire::EncodeForwardRequest((*fixture)->MakeForwardRequest(), &forward_wire);
    grad::v1::ForwardResponse forward_response;
    grpc::ClientContext forward_context;
    status = server_->stub->Forward(&forward_context, forward_wire, &forward_response);
    ASSERT_TRUE(status.ok()) << status.error_message();
    absl::StatusOr<gradengine::ForwardResult> forward =
        gradwire::DecodeForwardResult(forward_response);
    ASSERT_TRUE(forward.ok()) << forward.status();
    EXPECT_TRUE(gradtest::ForwardResultMatches(**fixture, *forward));
  }
}

TEST_F(ServiceTest, ResponsesEchoTheRequestIdAndReportTiming) {
  const OwnedCase c = SmallCase("conv_relu_conv_tanh");
  grad::v1::ComputeGradientsRequest wire;
  gradwire::EncodeGradientRequest(c.GradientRequest(), &wire);
  const std::string longest(128, 'r');  // the longest request_id accepted
  for (const std::string& request_id : {std::string("step-17"), std::string(), longest}) {
    wire.set_request_id(request_id);
    grad::v1::ComputeGradientsResponse response;
    grpc::ClientContext context;
    ASSERT_TRUE(server_->stub->ComputeGradients(&context, wire, &response).ok());
    EXPECT_EQ(response.request_id(), request_id);
    EXPECT_GT(response.timing().decode_ns(), 0);
    EXPECT_GE(response.timing().queue_ns(), 0);
    EXPECT_GT(response.timing().forward_ns(), 0);
    EXPECT_GT(response.timing().backward_ns(), 0);
    EXPECT_GT(response.timing().encode_ns(), 0);
  }

  grad::v1::ForwardRequest forward_wire;
  gradwire::EncodeForwardRequest(c.ForwardRequest(), &forward_wire);
  forward_wire.set_request_id("fwd-1");
  grad::v1::ForwardResponse forward_response;
  grpc::ClientContext context;
  ASSERT_TRUE(server_->stub->Forward(&context, forward_wire, &forward_response).ok());
  EXPECT_EQ(forward_response.request_id(), "fwd-1");
  EXPECT_GT(forward_response.timing().forward_ns(), 0);
  EXPECT_EQ(forward_response.timing().backward_ns(), 0);
}

TEST_F(ServiceTest, GetInfoDescribesTheServerAndCountsCalls) {
  grad::v1::GetInfoResponse before;
  {
    grpc::ClientContext context;
    ASSERT_TRUE(server_->stub->GetInfo(&context, grad::v1::GetInfoRequest(), &before).ok());
  }
  // Two good calls and one bad one.
  const OwnedCase c = SmallCase("gelu_chain");
  grad::v1::ComputeGradientsRequest wire;
  gradwire::EncodeGradientRequest(c.GradientRequest(), &wire);
  for (int i = 0; i < 2; ++i) {
    grad::v1::ComputeGradientsResponse response;
    grpc::ClientContext context;
    ASSERT_TRUE(server_->stub->ComputeGradients(&context, wire, &response).ok());
  }
  wire.mutable_input()->clear_data();
  {
    grad::v1::ComputeGradientsResponse response;
    grpc::ClientContext context;
    ASSERT_FALSE(server_->stub->ComputeGradients(&context, wire, &response).ok());
  }

  grad::v1::GetInfoResponse info;
  grpc::ClientContext context;
  ASSERT_TRUE(server_->stub->GetInfo(&context, grad::v1::GetInfoRequest(), &info).ok());
  EXPECT_EQ(info.server_version(), GRAD_PROJECT_VERSION);
  const gradengine::EngineInfo engine_info = engine_->info();
  EXPECT_EQ(info.onednn_version(), engine_info.onednn_version);
  EXPECT_EQ(info.cpu_isa(), engine_info.cpu_isa);
  EXPECT_EQ(info.threads_per_request(), kThreads);
  EXPECT_EQ(info.limits().max_message_bytes(), int64_t{1024} << 20);
  EXPECT_EQ(info.limits().max_elements(), int64_t{1} << 30);
  EXPECT_EQ(info.limits().max_workspace_bytes(), int64_t{8} << 30);
  EXPECT_EQ(info.limits().max_concurrent_requests(), 2);
  EXPECT_EQ(info.limits().max_queued_requests(), 64);
  EXPECT_THAT(info.layers(), ElementsAre("conv2d", "activation", "max_pool2d", "avg_pool2d",
                                         "batch_norm2d", "linear", "add"));
  EXPECT_THAT(info.activations(), ElementsAreArray(gradwire::SupportedActivationNames()));
  EXPECT_THAT(info.activations(),
              ElementsAre("relu", "leaky_relu", "tanh", "sigmoid", "elu", "gelu", "gelu_tanh"));
  EXPECT_THAT(info.objectives(), ElementsAre("mse", "sum", "grad_output", "cross_entropy"));
  EXPECT_THAT(info.dtypes(), ElementsAre(grad::v1::DATA_TYPE_FLOAT32));
  EXPECT_EQ(info.requests_total() - before.requests_total(), 3);
  EXPECT_EQ(info.requests_failed() - before.requests_failed(), 1);
  EXPECT_GT(info.uptime_ns(), before.uptime_ns());
}

// grpc.health.v1.HealthCheckResponse.status values.
constexpr char kServing[] = "1";
constexpr char kNotServing[] = "2";

// A serialized HealthCheckRequest{service}.
std::string HealthRequest(const std::string& service) {
  if (service.empty()) return "";
  return absl::StrCat(std::string(1, '\x0a'), std::string(1, static_cast<char>(service.size())),
                      service);
}

std::string HealthStatus(const std::string& response) {
  std::multimap<int, std::string> fields = WireFields(response);
  auto it = fields.find(1);
  return it == fields.end() ? "0" : it->second;
}

TEST_F(ServiceTest, HealthCheckIsServing) {
  for (const std::string service : {"", "grad.v1.GradientService"}) {
    SCOPED_TRACE(service);
    std::string response;
    grpc::Status status = RawUnaryCall(server_->channel.get(), "/grpc.health.v1.Health/Check",
                                       HealthRequest(service), &response);
    ASSERT_TRUE(status.ok()) << status.error_code() << ": " << status.error_message();
    EXPECT_EQ(HealthStatus(response), kServing);
  }
  std::string response;
  grpc::Status status = RawUnaryCall(server_->channel.get(), "/grpc.health.v1.Health/Check",
                                     HealthRequest("no.such.Service"), &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);
}

// ServerReflectionRequest{list_services: ""} and the names in its ListServiceResponse.
TEST_F(ServiceTest, ReflectionListsTheService) {
  RawStream stream(server_->channel,
                   "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo");
  ASSERT_TRUE(stream.Write(std::string("\x3a\x00", 2)));
  ASSERT_TRUE(stream.WritesDone());
  std::string response;
  ASSERT_TRUE(stream.Read(&response));
  std::vector<std::string> services;
  std::multimap<int, std::string> fields = WireFields(response);
  auto list = fields.find(6);  // list_services_response
  ASSERT_NE(list, fields.end()) << "no list_services_response in the reply";
  for (const auto& [number, service] : WireFields(list->second)) {
    if (number != 1) continue;
    for (const auto& [name_number, name] : WireFields(service)) {
      if (name_number == 1) services.push_back(name);
    }
  }
  EXPECT_THAT(services, ::testing::Contains("grad.v1.GradientService"));
  EXPECT_TRUE(stream.Finish().ok());
}

TEST(ServerOptionsTest, CreateRejectsOptionsOutOfRangeNamingThem) {
  struct Case {
    void (*mutate)(gradserver::ServerOptions*);
    const char* message;
  };
  const Case cases[] = {
      {[](gradserver::ServerOptions* o) { o->address = ""; }, "address is empty"},
      {[](gradserver::ServerOptions* o) { o->threads_per_request = -1; }, "threads_per_request=-1"},
      {[](gradserver::ServerOptions* o) { o->max_concurrent_requests = -2; },
       "max_concurrent_requests=-2"},
      {[](gradserver::ServerOptions* o) { o->max_queued_requests = -1; }, "max_queued_requests=-1"},
      {[](gradserver::ServerOptions* o) { o->max_message_mb = 0; }, "max_message_mb=0"},
      {[](gradserver::ServerOptions* o) { o->max_message_mb = 2048; }, "max_message_mb=2048"},
      {[](gradserver::ServerOptions* o) { o->max_elements = 0; }, "max_elements=0"},
      {[](gradserver::ServerOptions* o) { o->max_workspace_bytes = -5; }, "max_workspace_bytes=-5"},
      {[](gradserver::ServerOptions* o) { o->shutdown_grace = absl::Seconds(-1); },
       "shutdown_grace=-1s"},
  };
  for (const Case& c : cases) {
    gradserver::ServerOptions options;
    options.address = "127.0.0.1:0";
    c.mutate(&options);
    absl::StatusOr<std::unique_ptr<gradserver::Server>> server =
        gradserver::Server::Create(options);
    EXPECT_EQ(server.status().code(), absl::StatusCode::kInvalidArgument) << c.message;
    EXPECT_THAT(server.status().message(), HasSubstr(c.message));
  }
}

TEST(ServerOptionsTest, AnAddressThatCannotBeBoundIsUnavailable) {
  gradserver::ServerOptions options;
  options.address = "127.0.0.1:0";
  options.log_requests = false;
  absl::StatusOr<std::unique_ptr<gradserver::Server>> first = gradserver::Server::Create(options);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ((*first)->listening_address(), absl::StrCat("127.0.0.1:", (*first)->port()));

  options.address = (*first)->listening_address();  // taken
  absl::StatusOr<std::unique_ptr<gradserver::Server>> second = gradserver::Server::Create(options);
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(second.status().message(), HasSubstr(options.address));

  options.address = "not an address";
  second = gradserver::Server::Create(options);
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
}

TEST(ServerShutdownTest, HealthTurnsNotServingWhenShutdownBegins) {
  gradserver::ServerOptions options;
  options.threads_per_request = kThreads;
  options.shutdown_grace = absl::Seconds(20);
  std::unique_ptr<TestServer> server = StartTestServer(options);
  ASSERT_NE(server, nullptr);

  RawStream watch(server->channel, "/grpc.health.v1.Health/Watch");
  ASSERT_TRUE(watch.Write(HealthRequest("")));
  ASSERT_TRUE(watch.WritesDone());
  std::string update;
  ASSERT_TRUE(watch.Read(&update));
  EXPECT_EQ(HealthStatus(update), kServing);

  // Shutdown waits for the open watch (an in-flight call), so it runs on its own thread.
  std::thread shutdown([&] { server->server->Shutdown(); });
  ASSERT_TRUE(watch.Read(&update));
  EXPECT_EQ(HealthStatus(update), kNotServing);
  // New calls are refused from the moment the service drains, right after the health change
  // (UNAVAILABLE, "the server is shutting down"); once gRPC's own shutdown has begun they find
  // the connection going away (UNAVAILABLE) or are cancelled. A call that slips in between the
  // two is still served, so calls are sent until one is refused.
  grpc::Status refused;
  for (int i = 0; i < 1000 && refused.ok(); ++i) {
    grad::v1::GetInfoResponse info;
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    refused = server->stub->GetInfo(&context, grad::v1::GetInfoRequest(), &info);
  }
  EXPECT_THAT(refused.error_code(),
              ::testing::AnyOf(grpc::StatusCode::UNAVAILABLE, grpc::StatusCode::CANCELLED))
      << refused.error_message();
  watch.Cancel();
  shutdown.join();
}

TEST(ServerShutdownTest, ShutdownIsIdempotentAndWaitReturnsAfterIt) {
  gradserver::ServerOptions options;
  options.threads_per_request = kThreads;
  std::unique_ptr<TestServer> server = StartTestServer(options);
  ASSERT_NE(server, nullptr);
  std::thread waiter([&] { server->server->Wait(); });
  std::thread first([&] { server->server->Shutdown(); });
  std::thread second([&] { server->server->Shutdown(); });
  first.join();
  second.join();
  waiter.join();
  server->server->Shutdown();

  grad::v1::GetInfoResponse info;
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  EXPECT_EQ(server->stub->GetInfo(&context, grad::v1::GetInfoRequest(), &info).error_code(),
            grpc::StatusCode::UNAVAILABLE);
}

}  // namespace
}  // namespace gradservicetest
