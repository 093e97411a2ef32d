// gradclient::Client against a real in-process gradserver::Server on an ephemeral port: every
// RPC, results bit for bit equal to the engine's, the server's errors, retries, deadlines and
// concurrent use.

#include "gradclient/client.h"

#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gradclient/workloads.h"
#include "gradengine/engine.h"
#include "gtest/gtest.h"
#include "server/server.h"
#include "tests/torch/fixture.h"

namespace gradclient {
namespace {

using ::testing::HasSubstr;
using ::testing::MatchesRegex;

// Server and engine compute with the same thread count, so their results may be compared bit
// for bit.
constexpr int kThreads = 1;

std::string FixturesDir() {
  const char* source = std::getenv("GRAD_SOURCE_DIR");
  return absl::StrCat(source != nullptr ? source : GRAD_SOURCE_DIR_DEFAULT, "/tests/fixtures");
}

gradserver::ServerOptions TestServerOptions(int port) {
  gradserver::ServerOptions options;
  options.address = absl::StrCat("127.0.0.1:", port);
  options.threads_per_request = kThreads;
  options.max_concurrent_requests = 2;
  options.log_requests = false;
  options.shutdown_grace = absl::Seconds(5);
  return options;
}

// A port nothing listens on: one a server just bound and released.
int UnusedPort() {
  absl::StatusOr<std::unique_ptr<gradserver::Server>> server =
      gradserver::Server::Create(TestServerOptions(0));
  EXPECT_TRUE(server.ok()) << server.status();
  if (!server.ok()) return 0;
  const int port = (*server)->port();
  (*server)->Shutdown();
  return port;
}

::testing::AssertionResult BitEqual(const std::string& what, const gradengine::Tensor& actual,
                                    const gradengine::Tensor& expected) {
  if (actual.shape != expected.shape) {
    return ::testing::AssertionFailure()
           << what << ": shape " << gradengine::ShapeToString(actual.shape)
           << " != " << gradengine::ShapeToString(expected.shape);
  }
  if (actual.data.size() != expected.data.size() ||
      std::memcmp(actual.data.data(), expected.data.data(), actual.data.size() * sizeof(float)) !=
          0) {
    return ::testing::AssertionFailure() << what << ": values differ";
  }
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult BitEqual(const gradengine::GradientResult& actual,
                                    const gradengine::GradientResult& expected) {
  if (auto r = BitEqual("output", actual.output, expected.output); !r) return r;
  if (actual.loss.has_value() != expected.loss.has_value() ||
      (actual.loss.has_value() &&
       std::memcmp(&*actual.loss, &*expected.loss, sizeof(double)) != 0)) {
    return ::testing::AssertionFailure() << "loss differs";
  }
  if (actual.input_grad.has_value() != expected.input_grad.has_value()) {
    return ::testing::AssertionFailure() << "input_grad present in one result only";
  }
  if (actual.input_grad.has_value()) {
    if (auto r = BitEqual("input_grad", *actual.input_grad, *expected.input_grad); !r) return r;
  }
  if (actual.parameter_grads.size() != expected.parameter_grads.size()) {
    return ::testing::AssertionFailure()
           << actual.parameter_grads.size()
           << " parameter gradients != " << expected.parameter_grads.size();
  }
  for (const auto& [name, grad] : expected.parameter_grads) {
    auto it = actual.parameter_grads.find(name);
    if (it == actual.parameter_grads.end()) {
      return ::testing::AssertionFailure() << name << " gradient missing";
    }
    if (auto r = BitEqual(name, it->second, grad); !r) return r;
  }
  return ::testing::AssertionSuccess();
}

class ClientTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<std::unique_ptr<gradserver::Server>> server =
        gradserver::Server::Create(TestServerOptions(0));
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
    gradengine::EngineOptions engine_options;
    engine_options.threads_per_call = kThreads;
    absl::StatusOr<std::unique_ptr<gradengine::Engine>> engine =
        gradengine::Engine::Create(engine_options);
    ASSERT_TRUE(engine.ok()) << engine.status();
    engine_ = engine->release();
  }

  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
    delete engine_;
    engine_ = nullptr;
  }

  void SetUp() override {
    ASSERT_NE(server_, nullptr);
    absl::StatusOr<std::unique_ptr<Client>> client = Client::Create(Target());
    ASSERT_TRUE(client.ok()) << client.status();
    client_ = *std::move(client);
  }

  static std::string Target() { return absl::StrCat("127.0.0.1:", server_->port()); }

  static gradserver::Server* server_;
  static gradengine::Engine* engine_;
  std::unique_ptr<Client> client_;
};

gradserver::Server* ClientTest::server_ = nullptr;
gradengine::Engine* ClientTest::engine_ = nullptr;

TEST_F(ClientTest, ComputeGradientsAndForwardEqualTheEngineBitForBitOnEveryFixture) {
  absl::StatusOr<std::vector<std::string>> cases = gradtest::FindFixtureCases(FixturesDir());
  ASSERT_TRUE(cases.ok()) << cases.status();
  ASSERT_GE(cases->size(), 20u);
  for (const std::string& dir : *cases) {
    SCOPED_TRACE(dir);
    absl::StatusOr<std::unique_ptr<gradtest::FixtureCase>> fixture = gradtest::LoadFixtureCase(dir);
    ASSERT_TRUE(fixture.ok()) << fixture.status();

    absl::StatusOr<GradientReply> reply = client_->ComputeGradients((*fixture)->request);
    ASSERT_TRUE(reply.ok()) << reply.status();
    absl::StatusOr<gradengine::GradientResult> expected =
        engine_->ComputeGradients((*fixture)->request);
    ASSERT_TRUE(expected.ok()) << expected.status();
    EXPECT_TRUE(BitEqual(reply->result, *expected));
    EXPECT_TRUE(gradtest::GradientResultMatches(**fixture, reply->result));

    const gradengine::ForwardRequest forward_request = (*fixture)->MakeForwardRequest();
    absl::StatusOr<ForwardReply> forward = client_->Forward(forward_request);
    ASSERT_TRUE(forward.ok()) << forward.status();
    absl::StatusOr<gradengine::ForwardResult> expected_forward = engine_->Forward(forward_request);
    ASSERT_TRUE(expected_forward.ok()) << expected_forward.status();
    EXPECT_TRUE(BitEqual("forward output", forward->result.output, expected_forward->output));
  }
}

TEST_F(ClientTest, MessagesLargerThanGrpcsDefaultGoBothWays) {
  // resblock's input, target and output are 6.4 MB each, over gRPC's 4 MiB default.
  absl::StatusOr<Workload> workload = MakeWorkload("resblock");
  ASSERT_TRUE(workload.ok()) << workload.status();
  const gradengine::GradientRequest request = workload->Request();
  absl::StatusOr<GradientReply> reply = client_->ComputeGradients(request);
  ASSERT_TRUE(reply.ok()) << reply.status();
  absl::StatusOr<gradengine::GradientResult> expected = engine_->ComputeGradients(request);
  ASSERT_TRUE(expected.ok()) << expected.status();
  EXPECT_TRUE(BitEqual(reply->result, *expected));
}

TEST_F(ClientTest, ReplyCarriesRequestIdTimingAndAttempts) {
  absl::StatusOr<Workload> workload = MakeWorkload("seed4");
  ASSERT_TRUE(workload.ok()) << workload.status();
  CallOptions call;
  call.request_id = "step-17";
  absl::StatusOr<GradientReply> reply = client_->ComputeGradients(workload->Request(), call);
  ASSERT_TRUE(reply.ok()) << reply.status();
  EXPECT_EQ(reply->call.request_id, "step-17");
  EXPECT_EQ(reply->call.attempts, 1);
  EXPECT_GT(reply->call.timing.forward, absl::ZeroDuration());
  EXPECT_GT(reply->call.timing.backward, absl::ZeroDuration());
  EXPECT_EQ(reply->result.timing.forward_ns, absl::ToInt64Nanoseconds(reply->call.timing.forward));
  EXPECT_EQ(reply->result.timing.backward_ns,
            absl::ToInt64Nanoseconds(reply->call.timing.backward));
  EXPECT_GE(reply->call.round_trip, reply->call.timing.forward + reply->call.timing.backward);

  absl::StatusOr<GradientReply> unnamed = client_->ComputeGradients(workload->Request());
  ASSERT_TRUE(unnamed.ok()) << unnamed.status();
  EXPECT_THAT(unnamed->call.request_id, MatchesRegex("[0-9a-f]{16}"));
}

TEST_F(ClientTest, SkipOutputLeavesTheOutputOut) {
  absl::StatusOr<Workload> workload = MakeWorkload("seed1");
  ASSERT_TRUE(workload.ok()) << workload.status();
  CallOptions call;
  call.skip_output = true;
  absl::StatusOr<GradientReply> reply = client_->ComputeGradients(workload->Request(), call);
  ASSERT_TRUE(reply.ok()) << reply.status();
  EXPECT_TRUE(reply->result.output.shape.empty());
  EXPECT_TRUE(reply->result.output.data.empty());
  ASSERT_TRUE(reply->result.loss.has_value());
  ASSERT_TRUE(reply->result.input_grad.has_value());
  EXPECT_EQ(reply->result.input_grad->shape, workload->input_shape);
  EXPECT_EQ(reply->result.parameter_grads.count("conv1.weight"), 1u);
}

TEST_F(ClientTest, GetInfoDescribesTheServer) {
  absl::StatusOr<ServerInfo> info = client_->GetInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_FALSE(info->server_version.empty());
  EXPECT_FALSE(info->onednn_version.empty());
  EXPECT_FALSE(info->cpu_isa.empty());
  EXPECT_EQ(info->threads_per_request, kThreads);
  EXPECT_EQ(info->max_concurrent_requests, 2);
  EXPECT_EQ(info->max_message_bytes, int64_t{1024} << 20);
  EXPECT_THAT(info->objectives,
              ::testing::ElementsAre("mse", "sum", "grad_output", "cross_entropy"));
  EXPECT_THAT(info->layers, ::testing::ElementsAre("conv2d", "activation", "max_pool2d",
                                                   "avg_pool2d", "batch_norm2d", "linear", "add"));
  EXPECT_THAT(info->activations, ::testing::Contains("relu"));
  EXPECT_THAT(info->dtypes, ::testing::ElementsAre("DATA_TYPE_FLOAT32"));
}

TEST_F(ClientTest, HealthIsServing) {
  absl::StatusOr<ServingStatus> status = client_->Health();
  ASSERT_TRUE(status.ok()) << status.status();
  EXPECT_EQ(*status, ServingStatus::kServing);
  absl::StatusOr<ServingStatus> service = client_->Health("grad.v1.GradientService");
  ASSERT_TRUE(service.ok()) << service.status();
  EXPECT_EQ(*service, ServingStatus::kServing);
  EXPECT_EQ(client_->Health("no.such.Service").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(ClientTest, ServerErrorsKeepTheirCodeAndMessage) {
  gradengine::Tensor input = gradengine::Tensor::Zeros({1, 1, 8, 8});
  gradengine::Tensor weight1 = gradengine::Tensor::Zeros({8, 1, 3, 3});
  gradengine::Tensor weight2 = gradengine::Tensor::Zeros({6, 2, 3, 3});
  gradengine::Tensor target = gradengine::Tensor::Zeros({1, 6, 4, 4});
  gradengine::GradientRequest request;
  request.network.layers = {
      {"conv1", gradengine::Conv2dSpec::Square(1, 8, 3, 1, 0, false)},
      {"conv2", gradengine::Conv2dSpec::Square(8, 6, 3, 1, 0, false)},
  };
  std::get<gradengine::Conv2dSpec>(request.network.layers[1].op).groups = 3;
  request.input = input.view();
  request.parameters = {{"conv1.weight", weight1.view()}, {"conv2.weight", weight2.view()}};
  request.objective = {gradengine::ObjectiveKind::kMse, target.view()};

  absl::StatusOr<GradientReply> reply = client_->ComputeGradients(request);
  EXPECT_EQ(reply.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(reply.status().message(),
              HasSubstr("layers[1].conv2d.groups=3 does not divide in_channels=8"));
  // Not retried: only Unavailable is.
  std::get<gradengine::Conv2dSpec>(request.network.layers[1].op).groups = 1;
  request.parameters.erase("conv2.weight");
  reply = client_->ComputeGradients(request);
  EXPECT_EQ(reply.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(reply.status().message(), HasSubstr("conv2.weight"));
}

TEST_F(ClientTest, DeadlineShorterThanTheWorkIsDeadlineExceeded) {
  absl::StatusOr<Workload> workload = MakeWorkload("resblock");
  ASSERT_TRUE(workload.ok()) << workload.status();
  CallOptions call;
  call.timeout = absl::Milliseconds(10);  // resblock takes tens of ms on one thread
  const absl::Time start = absl::Now();
  absl::StatusOr<GradientReply> reply = client_->ComputeGradients(workload->Request(), call);
  EXPECT_EQ(reply.status().code(), absl::StatusCode::kDeadlineExceeded) << reply.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(1));

  call.timeout.reset();
  call.deadline = absl::Now() - absl::Seconds(1);
  EXPECT_EQ(client_->GetInfo(call).status().code(), absl::StatusCode::kDeadlineExceeded);

  // The server is fine afterwards.
  EXPECT_TRUE(client_->ComputeGradients(workload->Request()).ok());
}

TEST_F(ClientTest, NegativeTimeoutIsInvalidArgument) {
  CallOptions call;
  call.timeout = absl::Seconds(-1);
  absl::StatusOr<ServerInfo> info = client_->GetInfo(call);
  EXPECT_EQ(info.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(info.status().message(), HasSubstr("timeout=-1s"));
}

TEST_F(ClientTest, ConcurrentCallsThroughOneClientGiveTheSerialResults) {
  absl::StatusOr<Workload> seed4 = MakeWorkload("seed4");
  absl::StatusOr<Workload> seed1 = MakeWorkload("seed1");
  ASSERT_TRUE(seed4.ok() && seed1.ok());
  const gradengine::GradientRequest requests[] = {seed4->Request(), seed1->Request()};
  std::vector<gradengine::GradientResult> expected;
  for (const gradengine::GradientRequest& request : requests) {
    absl::StatusOr<gradengine::GradientResult> result = engine_->ComputeGradients(request);
    ASSERT_TRUE(result.ok()) << result.status();
    expected.push_back(*std::move(result));
  }

  constexpr int kThreadCount = 6;
  constexpr int kCallsPerThread = 5;
  absl::Mutex mu;
  std::vector<std::string> failures;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreadCount; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kCallsPerThread; ++i) {
        const int which = (t + i) % 2;
        absl::StatusOr<GradientReply> reply = client_->ComputeGradients(requests[which]);
        std::string failure;
        if (!reply.ok()) {
          failure = reply.status().ToString();
        } else if (auto equal = BitEqual(reply->result, expected[which]); !equal) {
          failure = equal.message();
        }
        if (!failure.empty()) {
          absl::MutexLock lock(&mu);
          failures.push_back(absl::StrCat("thread ", t, " call ", i, ": ", failure));
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_THAT(failures, ::testing::IsEmpty());
}

TEST(ClientRetryTest, UnavailableIsRetriedUntilTheServerStarts) {
  const int port = UnusedPort();
  ASSERT_NE(port, 0);
  absl::StatusOr<std::unique_ptr<Client>> client = Client::Create(absl::StrCat("127.0.0.1:", port));
  ASSERT_TRUE(client.ok()) << client.status();

  std::unique_ptr<gradserver::Server> server;
  absl::Status server_status;
  std::thread starter([&] {
    absl::SleepFor(absl::Milliseconds(300));
    absl::StatusOr<std::unique_ptr<gradserver::Server>> created =
        gradserver::Server::Create(TestServerOptions(port));
    server_status = created.status();
    if (created.ok()) server = *std::move(created);
  });

  absl::StatusOr<Workload> workload = MakeWorkload("seed1");
  ASSERT_TRUE(workload.ok()) << workload.status();
  CallOptions call;
  call.timeout = absl::Seconds(20);
  absl::StatusOr<GradientReply> reply = (*client)->ComputeGradients(workload->Request(), call);
  starter.join();
  ASSERT_TRUE(server_status.ok()) << server_status;
  ASSERT_TRUE(reply.ok()) << reply.status();
  EXPECT_GT(reply->call.attempts, 1);
  EXPECT_GE(reply->call.round_trip, absl::Milliseconds(250));
  EXPECT_TRUE(reply->result.loss.has_value());
}

TEST(ClientRetryTest, GivesUpAfterMaxAttemptsWithUnavailable) {
  const int port = UnusedPort();
  ASSERT_NE(port, 0);
  ClientOptions options;
  options.retry.max_attempts = 3;
  options.retry.initial_backoff = absl::Milliseconds(10);
  absl::StatusOr<std::unique_ptr<Client>> client =
      Client::Create(absl::StrCat("127.0.0.1:", port), options);
  ASSERT_TRUE(client.ok()) << client.status();
  const absl::Time start = absl::Now();
  absl::StatusOr<ServerInfo> info = (*client)->GetInfo();
  EXPECT_EQ(info.status().code(), absl::StatusCode::kUnavailable) << info.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
}

TEST(ClientRetryTest, RetriesNeverRunPastTheDeadline) {
  const int port = UnusedPort();
  ASSERT_NE(port, 0);
  ClientOptions options;
  options.retry.max_attempts = 1000;
  options.retry.initial_backoff = absl::Milliseconds(20);
  options.retry.max_backoff = absl::Milliseconds(100);
  absl::StatusOr<std::unique_ptr<Client>> client =
      Client::Create(absl::StrCat("127.0.0.1:", port), options);
  ASSERT_TRUE(client.ok()) << client.status();
  CallOptions call;
  call.timeout = absl::Milliseconds(400);
  const absl::Time start = absl::Now();
  absl::StatusOr<ServingStatus> status = (*client)->Health("", call);
  const absl::Duration elapsed = absl::Now() - start;
  EXPECT_TRUE(absl::IsUnavailable(status.status()) || absl::IsDeadlineExceeded(status.status()))
      << status.status();
  EXPECT_LT(elapsed, absl::Milliseconds(400) + absl::Milliseconds(150));
}

TEST(ClientCreateTest, RejectsBadOptionsNamingThem) {
  EXPECT_EQ(Client::Create("").status().code(), absl::StatusCode::kInvalidArgument);
  ClientOptions options;
  options.max_message_mb = 0;
  absl::StatusOr<std::unique_ptr<Client>> client = Client::Create("localhost:1", options);
  EXPECT_EQ(client.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(client.status().message(), HasSubstr("max_message_mb=0"));
  options = ClientOptions();
  options.retry.max_attempts = 0;
  client = Client::Create("localhost:1", options);
  EXPECT_EQ(client.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(client.status().message(), HasSubstr("retry.max_attempts=0"));
  options = ClientOptions();
  options.retry.jitter = 1.5;
  EXPECT_THAT(Client::Create("localhost:1", options).status().message(),
              HasSubstr("retry.jitter=1.5"));
}

}  // namespace
}  // namespace gradclient
