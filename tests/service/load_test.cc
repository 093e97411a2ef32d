// The server under load and when callers give up: many concurrent clients get the engine's
// exact results, a full queue refuses at once with RESOURCE_EXHAUSTED, and deadlines and
// cancellations stop a computation between layers and free its compute thread.

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/barrier.h"
#include "gmock/gmock.h"
#include "grad/v1/gradient_service.grpc.pb.h"
#include "gradclient/workloads.h"
#include "gradengine/engine.h"
#include "gtest/gtest.h"
#include "proto/wire.h"
#include "server/server.h"
#include "tests/service/service_test_util.h"

namespace gradservicetest {
namespace {

using Clock = std::chrono::steady_clock;
using gradengine::GradientSelection;
using gradengine::ObjectiveKind;
using ::testing::HasSubstr;

// One kind of request with the engine's answer to it.
struct Expected {
  bool forward = false;
  std::string wire;  // the serialized request
  gradengine::ForwardResult forward_result;
  gradengine::GradientResult gradient_result;
};

std::vector<Expected> MixedRequests(gradengine::Engine& engine,
                                    const std::vector<OwnedCase>& cases) {
  std::vector<Expected> kinds;
  for (const OwnedCase& c : cases) {
    Expected forward;
    forward.forward = true;
    grad::v1::ForwardRequest forward_wire;
    gradwire::EncodeForwardRequest(c.ForwardRequest(), &forward_wire);
    forward.wire = forward_wire.SerializeAsString();
    absl::StatusOr<gradengine::ForwardResult> forward_result = engine.Forward(c.ForwardRequest());
    EXPECT_TRUE(forward_result.ok()) << forward_result.status();
    forward.forward_result = *std::move(forward_result);
    kinds.push_back(std::move(forward));

    GradientSelection input_only;
    input_only.all_parameters = false;
    const gradengine::GradientRequest requests[] = {
        c.GradientRequest(ObjectiveKind::kMse), c.GradientRequest(ObjectiveKind::kSum),
        c.GradientRequest(ObjectiveKind::kGradOutput),
        c.GradientRequest(ObjectiveKind::kMse, input_only)};
    for (const gradengine::GradientRequest& request : requests) {
      Expected gradients;
      grad::v1::ComputeGradientsRequest wire;
      gradwire::EncodeGradientRequest(request, &wire);
      gradients.wire = wire.SerializeAsString();
      absl::StatusOr<gradengine::GradientResult> result = engine.ComputeGradients(request);
      EXPECT_TRUE(result.ok()) << result.status();
      gradients.gradient_result = *std::move(result);
      kinds.push_back(std::move(gradients));
    }
  }
  return kinds;
}

// Sends one request of `kind` and checks the answer bit for bit.
::testing::AssertionResult CallAndCompare(grad::v1::GradientService::Stub& stub,
                                          const Expected& kind, const std::string& request_id) {
  grpc::ClientContext context;
  if (kind.forward) {
    grad::v1::ForwardRequest request;
    request.ParseFromString(kind.wire);
    request.set_request_id(request_id);
    grad::v1::ForwardResponse response;
    grpc::Status status = stub.Forward(&context, request, &response);
    if (!status.ok()) return ::testing::AssertionFailure() << status.error_message();
    if (response.request_id() != request_id) {
      return ::testing::AssertionFailure() << "request_id " << response.request_id();
    }
    absl::StatusOr<gradengine::ForwardResult> result = gradwire::DecodeForwardResult(response);
    if (!result.ok()) return ::testing::AssertionFailure() << result.status();
    return SameForwardResult(*result, kind.forward_result);
  }
  grad::v1::ComputeGradientsRequest request;
  request.ParseFromString(kind.wire);
  request.set_request_id(request_id);
  grad::v1::ComputeGradientsResponse response;
  grpc::Status status = stub.ComputeGradients(&context, request, &response);
  if (!status.ok()) return ::testing::AssertionFailure() << status.error_message();
  if (response.request_id() != request_id) {
    return ::testing::AssertionFailure() << "request_id " << response.request_id();
  }
  absl::StatusOr<gradengine::GradientResult> result = gradwire::DecodeGradientResult(response);
  if (!result.ok()) return ::testing::AssertionFailure() << result.status();
  return SameGradientResult(*result, kind.gradient_result);
}

TEST(LoadTest, ConcurrentClientsGetTheEnginesExactResults) {
  constexpr int kClients = 16;
  constexpr int kCallsPerClient = 50;
  gradserver::ServerOptions options;
  options.threads_per_request = 1;
  options.max_concurrent_requests = 2;
  options.max_queued_requests = kClients;  // no caller is ever refused
  std::unique_ptr<TestServer> server = StartTestServer(options);
  ASSERT_NE(server, nullptr);
  std::unique_ptr<gradengine::Engine> engine = MakeReferenceEngine(1);
  std::vector<OwnedCase> cases;
  for (const std::string& name : SmallCaseNames()) cases.push_back(SmallCase(name));
  const std::vector<Expected> kinds = MixedRequests(*engine, cases);

  std::atomic<int> matched{0};
  std::vector<std::string> failures(kClients);
  std::vector<std::thread> clients;
  for (int client = 0; client < kClients; ++client) {
    clients.emplace_back([&, client] {
      for (int i = 0; i < kCallsPerClient; ++i) {
        const Expected& kind = kinds[(client * 7 + i) % kinds.size()];
        ::testing::AssertionResult same =
            CallAndCompare(*server->stub, kind, absl::StrCat("c", client, "-", i));
        if (same) {
          ++matched;
        } else if (failures[client].empty()) {
          failures[client] = absl::StrCat("client ", client, " call ", i, ": ", same.message());
        }
      }
    });
  }
  for (std::thread& t : clients) t.join();
  for (const std::string& failure : failures) EXPECT_EQ(failure, "");
  EXPECT_EQ(matched.load(), kClients * kCallsPerClient);
}

TEST(LoadTest, AFullQueueRefusesAtOnceAndTheRestAreCorrect) {
  constexpr int kClients = 10;
  gradserver::ServerOptions options;
  options.threads_per_request = 1;
  options.max_concurrent_requests = 1;
  options.max_queued_requests = 1;
  std::unique_ptr<TestServer> server = StartTestServer(options);
  ASSERT_NE(server, nullptr);
  std::unique_ptr<gradengine::Engine> engine = MakeReferenceEngine(1);
  // Long enough (tens of ms) that ten simultaneous callers find the one slot and the one
  // queue place taken.
  const std::vector<OwnedCase> cases = {DeepCase(/*layers=*/6, /*batch=*/4, /*channels=*/32,
                                                 /*size=*/28)};
  const Expected kind = MixedRequests(*engine, cases)[1];  // MSE with every gradient

  std::atomic<int> ok{0};
  std::atomic<int> refused{0};
  std::vector<std::string> unexpected(kClients);
  absl::Barrier* start = new absl::Barrier(kClients);
  std::vector<std::thread> clients;
  for (int client = 0; client < kClients; ++client) {
    clients.emplace_back([&, client] {
      grad::v1::ComputeGradientsRequest request;
      request.ParseFromString(kind.wire);
      grad::v1::ComputeGradientsResponse response;
      grpc::ClientContext context;
      if (start->Block()) delete start;
      grpc::Status status = server->stub->ComputeGradients(&context, request, &response);
      if (status.ok()) {
        absl::StatusOr<gradengine::GradientResult> result =
            gradwire::DecodeGradientResult(response);
        if (result.ok() && SameGradientResult(*result, kind.gradient_result)) {
          ++ok;
        } else {
          unexpected[client] = "an OK answer that differs from the engine's";
        }
      } else if (status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED &&
                 status.error_message().find("max_queued_requests=1") != std::string::npos) {
        ++refused;
      } else {
        unexpected[client] = absl::StrCat(status.error_code(), ": ", status.error_message());
      }
    });
  }
  for (std::thread& t : clients) t.join();
  for (const std::string& u : unexpected) EXPECT_EQ(u, "");
  EXPECT_GE(refused.load(), 1);
  EXPECT_GE(ok.load(), 2);  // the one computing and the one queued
  EXPECT_EQ(ok.load() + refused.load(), kClients);
}

// The long call below has many layers, so that the server can stop it within a small part of
// its run. The server has one compute slot and no queue, so that a probe
// (InstantlyRefusedRequest) tells whether the slot is taken. The call is run first to compile
// its plan, then timed: how long until it computes (the probes show) and how long it computes
// (the server's Timing). The stops below come an eighth into the computation by that timing,
// and a probe confirms the call is computing then; probes also show when its slot is free
// again. An attempt that shows nothing is repeated: a call that finished (the machine got
// faster) is timed again, one that was not computing yet is given longer to arrive (a probe
// that takes the slot just as the call arrives gets the call refused). One thread per call
// keeps the call's speed proportional to the CPU it gets (an OpenMP team slows down far more
// than that when other processes take its cores).
class StopEarlyTest : public ::testing::Test {
 protected:
  struct CallTiming {
    Clock::duration until_computing{};
    Clock::duration computing{};
  };

  // The slowest of a few probes of the idle server: what a call costs apart from computing,
  // which builds without optimization make large.
  static Clock::duration ProbeRoundTrip() {
    Clock::duration slowest{};
    for (int i = 0; i < 5; ++i) {
      const Clock::time_point start = Clock::now();
      EXPECT_FALSE(ComputeSlotsBusy(*server_->stub));
      slowest = std::max(slowest, Clock::now() - start);
    }
    return slowest;
  }

  static void SetUpTestSuite() {
    gradserver::ServerOptions options;
    options.threads_per_request = 1;
    options.max_concurrent_requests = 1;
    options.max_queued_requests = 0;
    server_ = StartTestServer(options).release();
    if (server_ == nullptr) return;
    // Small messages for the work: no target, no output, no input gradient.
    GradientSelection parameters_only;
    parameters_only.input = false;
    long_request_ = new grad::v1::ComputeGradientsRequest();
    gradwire::EncodeGradientRequest(
        DeepCase(/*layers=*/32, /*batch=*/8, /*channels=*/64, /*size=*/32)
            .GradientRequest(ObjectiveKind::kSum, parameters_only),
        long_request_);
    long_request_->set_skip_output(true);
    // The first run compiles the plan. The next is timed, probing meanwhile for when it starts
    // computing; one refused because a probe took the slot as it arrived is run again.
    for (int run = 0; run < 6 && timing_.computing.count() == 0; ++run) {
      grad::v1::ComputeGradientsResponse response;
      grpc::ClientContext context;
      grpc::Status status;
      std::atomic<bool> returned{false};
      const Clock::time_point start = Clock::now();
      std::thread caller([&] {
        status = server_->stub->ComputeGradients(&context, *long_request_, &response);
        returned = true;
      });
      const bool busy =
          run > 0 && WaitUntilComputeSlotsBusy(*server_->stub, std::chrono::minutes(1), returned);
      const Clock::duration until_computing = Clock::now() - start;
      caller.join();
      if (!busy) continue;
      ASSERT_TRUE(status.ok()) << status.error_message();
      timing_.until_computing = until_computing;
      timing_.computing = std::chrono::nanoseconds(response.timing().forward_ns() +
                                                   response.timing().backward_ns());
    }
    probe_round_trip_ = ProbeRoundTrip();
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
    delete long_request_;
    long_request_ = nullptr;
  }
  void SetUp() override {
    ASSERT_NE(server_, nullptr);
    ASSERT_GT(timing_.computing.count(), 0) << "the long call could not be timed";
  }

  static CallTiming Timed(Clock::duration total, const grad::v1::ComputeGradientsResponse& r) {
    CallTiming timing;
    timing.computing = std::chrono::nanoseconds(r.timing().forward_ns() + r.timing().backward_ns());
    timing.until_computing =
        total - timing.computing - std::chrono::nanoseconds(r.timing().encode_ns());
    return timing;
  }

  // When to stop the call: an eighth into its computation, with room for a slower arrival.
  static Clock::duration StopAfter(const CallTiming& timing) {
    return timing.until_computing * 5 / 4 + timing.computing / 8;
  }

  // Once the long call has been stopped at `stopped`, its compute slot is free again well
  // before the call would have ended (within half its computation, plus a few round trips for
  // the stop to reach the server and the probes to see the slot free), and serves the next call.
  static void ExpectComputeSlotFreedSoon(Clock::time_point stopped, const CallTiming& timing) {
    const Clock::duration bound = timing.computing / 2 + 4 * probe_round_trip_;
    const Clock::duration freed_after =
        (Clock::now() - stopped) + WaitUntilComputeSlotFree(*server_->stub, 2 * bound);
    EXPECT_LT(freed_after, bound)
        << "the compute slot stayed taken as if the long call ran to its end (it computes for "
        << std::chrono::duration_cast<std::chrono::milliseconds>(timing.computing).count()
        << " ms; a probe takes up to "
        << std::chrono::duration_cast<std::chrono::milliseconds>(probe_round_trip_).count()
        << " ms)";
    const OwnedCase small = SmallCase("conv_relu_conv_tanh");
    grad::v1::ComputeGradientsRequest request;
    gradwire::EncodeGradientRequest(small.GradientRequest(), &request);
    grad::v1::ComputeGradientsResponse response;
    grpc::ClientContext context;
    grpc::Status status = server_->stub->ComputeGradients(&context, request, &response);
    EXPECT_TRUE(status.ok()) << status.error_code() << ": " << status.error_message();
  }

  static constexpr int kAttempts = 4;

  static TestServer* server_;
  static grad::v1::ComputeGradientsRequest* long_request_;
  static CallTiming timing_;
  static Clock::duration probe_round_trip_;
};

TestServer* StopEarlyTest::server_ = nullptr;
grad::v1::ComputeGradientsRequest* StopEarlyTest::long_request_ = nullptr;
StopEarlyTest::CallTiming StopEarlyTest::timing_;
Clock::duration StopEarlyTest::probe_round_trip_{};

TEST_F(StopEarlyTest, ADeadlineStopsTheComputationAndFreesTheThread) {
  CallTiming timing = timing_;
  for (int attempt = 1; attempt <= kAttempts; ++attempt) {
    const Clock::duration timeout = StopAfter(timing);
    grad::v1::ComputeGradientsResponse response;
    grpc::ClientContext context;
    grpc::Status status;
    Clock::time_point returned;
    const Clock::time_point start = Clock::now();
    context.set_deadline(std::chrono::system_clock::now() + timeout);
    std::thread caller([&] {
      status = server_->stub->ComputeGradients(&context, *long_request_, &response);
      returned = Clock::now();
    });
    // Shortly before the deadline, the call should be computing.
    std::this_thread::sleep_until(start + timeout - timing.computing / 8);
    const bool computing = ComputeSlotsBusy(*server_->stub);
    caller.join();
    if (status.ok()) {
      timing = Timed(returned - start, response);
      continue;
    }
    if (!computing) {
      timing.until_computing *= 2;
      continue;
    }
    EXPECT_EQ(status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << status.error_message();
    ExpectComputeSlotFreedSoon(start + timeout, timing);
    return;
  }
  ADD_FAILURE() << "the long call was never computing when its deadline passed";
}

TEST_F(StopEarlyTest, ACancelledCallStopsTheComputationAndFreesTheThread) {
  CallTiming timing = timing_;
  for (int attempt = 1; attempt <= kAttempts; ++attempt) {
    grad::v1::ComputeGradientsResponse response;
    grpc::ClientContext context;
    grpc::Status status;
    Clock::time_point returned;
    const Clock::time_point start = Clock::now();
    std::thread caller([&] {
      status = server_->stub->ComputeGradients(&context, *long_request_, &response);
      returned = Clock::now();
    });
    std::this_thread::sleep_for(StopAfter(timing));
    const bool computing = ComputeSlotsBusy(*server_->stub);
    const Clock::time_point cancelled = Clock::now();
    context.TryCancel();
    caller.join();
    if (status.ok()) {
      timing = Timed(returned - start, response);
      continue;
    }
    if (!computing) {
      timing.until_computing *= 2;
      continue;
    }
    EXPECT_EQ(status.error_code(), grpc::StatusCode::CANCELLED) << status.error_message();
    ExpectComputeSlotFreedSoon(cancelled, timing);
    return;
  }
  ADD_FAILURE() << "the long call was never computing when it was cancelled";
}

TEST(DeadlineTest, ATinyDeadlineOnResblockIsDeadlineExceededAndTheServerKeepsServing) {
  gradserver::ServerOptions options;
  options.threads_per_request = 1;
  options.max_concurrent_requests = 1;
  std::unique_ptr<TestServer> server = StartTestServer(options);
  ASSERT_NE(server, nullptr);
  absl::StatusOr<gradclient::Workload> resblock = gradclient::MakeWorkload("resblock");
  ASSERT_TRUE(resblock.ok()) << resblock.status();
  grad::v1::ComputeGradientsRequest request;
  gradwire::EncodeGradientRequest(resblock->Request(), &request);
  for (int i = 0; i < 3; ++i) {
    grad::v1::ComputeGradientsResponse response;
    std::unique_ptr<grpc::ClientContext> context = ContextWithTimeout(std::chrono::milliseconds(1));
    grpc::Status status = server->stub->ComputeGradients(context.get(), request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << status.error_message();
  }

  std::unique_ptr<gradengine::Engine> engine = MakeReferenceEngine(1);
  const std::vector<Expected> kinds = MixedRequests(*engine, {SmallCase("gelu_chain")});
  for (const Expected& kind : kinds) EXPECT_TRUE(CallAndCompare(*server->stub, kind, "after"));
}

}  // namespace
}  // namespace gradservicetest
