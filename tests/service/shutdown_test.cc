// The gradserver binary end to end: it announces its port, serves, and on SIGTERM lets the
// call in flight finish with a correct result, refuses new ones, and exits 0.
//
// The binary's path comes from the GRADSERVER_BINARY environment variable (set by CTest).

#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "grad/v1/gradient_service.grpc.pb.h"
#include "gradengine/network.h"
#include "gtest/gtest.h"
#include "proto/wire.h"
#include "tests/service/server_process.h"
#include "tests/service/service_test_util.h"

namespace gradservicetest {
namespace {

using Clock = std::chrono::steady_clock;
using ::testing::HasSubstr;

// One thread per call keeps the call's speed proportional to the CPU it gets, so that the
// fractions of its length timed below hold on a loaded machine.
constexpr int kThreads = 1;

std::string Binary() { return GradserverBinary(); }

TEST(GradserverBinaryTest, InvalidOptionsExitWithCode2) {
  ASSERT_NE(Binary(), "") << "GRADSERVER_BINARY is not set; run this test through ctest";
  ServerProcess process;
  ASSERT_TRUE(process.Start(Binary(), {"--address=127.0.0.1:0", "--max_message_mb=0"}));
  EXPECT_EQ(process.WaitForExit(absl::Seconds(30)), 2);
  EXPECT_THAT(process.Stderr(), HasSubstr("max_message_mb=0 must be between 1 and 2047"));
}

// A string that is not UTF-8 is reported once, in the request's own log line naming the field;
// protobuf's own line about it (one per such request, as often as a client likes) is not
// written.
TEST(GradserverBinaryTest, AStringThatIsNotUtf8IsLoggedOnceWithItsField) {
  ASSERT_NE(Binary(), "") << "GRADSERVER_BINARY is not set; run this test through ctest";
  ServerProcess process;
  ASSERT_TRUE(process.Start(Binary(), {"--address=127.0.0.1:0"}));
  const int port = process.WaitForPort(absl::Seconds(60));
  ASSERT_GT(port, 0) << process.Stderr();
  std::unique_ptr<grad::v1::GradientService::Stub> stub =
      grad::v1::GradientService::NewStub(MakeChannel(absl::StrCat("127.0.0.1:", port)));
  grad::v1::ComputeGradientsRequest request;
  gradwire::EncodeGradientRequest(SmallCase("conv_relu_conv_tanh").GradientRequest(), &request);
  request.mutable_network()->mutable_layers(0)->set_name("conv\xff");
  for (int i = 0; i < 3; ++i) {
    grad::v1::ComputeGradientsResponse response;
    grpc::ClientContext context;
    const grpc::Status status = stub->ComputeGradients(&context, request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(status.error_message(), HasSubstr("network.layers[0].name is not valid UTF-8"));
  }
  ASSERT_TRUE(process.WaitForStderr("code=INVALID_ARGUMENT", absl::Seconds(10)));
  process.Signal(SIGTERM);
  EXPECT_EQ(process.WaitForExit(absl::Seconds(60)), 0);
  const std::string log = process.Stderr();
  EXPECT_THAT(log, HasSubstr("error=\"network.layers[0].name is not valid UTF-8"));
  EXPECT_THAT(log, ::testing::Not(HasSubstr("libprotobuf"))) << log;
}

TEST(GradserverBinaryTest, SigtermDrainsTheCallInFlightRefusesNewOnesAndExitsZero) {
  ASSERT_NE(Binary(), "") << "GRADSERVER_BINARY is not set; run this test through ctest";
  ServerProcess process;
  ASSERT_TRUE(process.Start(
      Binary(),
      {"--address=127.0.0.1:0", absl::StrCat("--threads_per_request=", kThreads),
       "--max_concurrent_requests=1", "--max_queued_requests=0", "--shutdown_grace_seconds=60"}));
  const int port = process.WaitForPort(absl::Seconds(60));
  ASSERT_GT(port, 0) << process.Stderr();
  std::shared_ptr<grpc::Channel> channel = MakeChannel(absl::StrCat("127.0.0.1:", port));
  std::unique_ptr<grad::v1::GradientService::Stub> stub =
      grad::v1::GradientService::NewStub(channel);

  // A call that computes for about half a second in many layers (small messages for the work: no
  // target, no output, no input gradient), run twice first to compile its plan and to time it:
  // how long it computes (the server's Timing) and, at most, how long until it computes.
  gradengine::GradientSelection parameters_only;
  parameters_only.input = false;
  const OwnedCase long_case = DeepCase(/*layers=*/32, /*batch=*/16, /*channels=*/64, /*size=*/32);
  grad::v1::ComputeGradientsRequest request;
  gradwire::EncodeGradientRequest(
      long_case.GradientRequest(gradengine::ObjectiveKind::kSum, parameters_only), &request);
  request.set_skip_output(true);
  request.set_request_id("long-call");
  Clock::duration until_computing{};
  Clock::duration computing{};
  auto time_call = [&](Clock::duration total, const grad::v1::ComputeGradientsResponse& r) {
    computing = std::chrono::nanoseconds(r.timing().forward_ns() + r.timing().backward_ns());
    until_computing = total - computing - std::chrono::nanoseconds(r.timing().encode_ns());
  };
  grad::v1::ComputeGradientsResponse undisturbed;
  for (int run = 0; run < 2; ++run) {
    grpc::ClientContext context;
    const Clock::time_point start = Clock::now();
    grpc::Status status = stub->ComputeGradients(&context, request, &undisturbed);
    ASSERT_TRUE(status.ok()) << status.error_message() << "\n" << process.Stderr();
    time_call(Clock::now() - start, undisturbed);
  }

  // SIGTERM a quarter into the computation, with room for a slower arrival, once a probe shows
  // the call computing: with one compute slot and no queue, the probe is refused for lack of a
  // slot. An attempt that shows nothing is repeated: a call that finished (the machine got
  // faster) is timed again, one that was not computing yet is given longer to arrive (a probe
  // that takes the slot just as the call arrives gets the call refused).
  grad::v1::ComputeGradientsResponse response;
  grpc::Status status;
  std::thread long_call;
  bool computing_now = false;
  Clock::time_point returned_at;
  for (int attempt = 1; attempt <= 4 && !computing_now; ++attempt) {
    const Clock::time_point start = Clock::now();
    long_call = std::thread([&] {
      grpc::ClientContext context;
      status = stub->ComputeGradients(&context, request, &response);
      returned_at = Clock::now();
    });
    std::this_thread::sleep_for(until_computing * 3 / 2 + computing / 4);
    computing_now = ComputeSlotsBusy(*stub);
    if (computing_now) break;
    long_call.join();
    if (status.ok()) {
      time_call(returned_at - start, response);
    } else {
      ASSERT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
          << status.error_message();
      until_computing *= 2;
    }
  }
  ASSERT_TRUE(computing_now) << "the long call was never computing when probed";
  process.Signal(SIGTERM);

  // New calls are refused once the server has begun to shut down (the SIGTERM line is written
  // just before): UNAVAILABLE while it drains, and later the connection is refused or, for a call
  // reaching gRPC in the very instant it stops accepting, the call is cancelled. One sent before
  // the server drains is still served, so calls are sent until one is refused. They come from
  // another client, on a connection of its own.
  const bool shutting_down =
      process.WaitForStderr("gradserver: SIGTERM received", absl::Seconds(30));
  EXPECT_TRUE(shutting_down) << process.Stderr();
  std::unique_ptr<grad::v1::GradientService::Stub> other_client =
      grad::v1::GradientService::NewStub(
          MakeChannel(absl::StrCat("127.0.0.1:", port), /*own_connection=*/true));
  grpc::Status refused;
  const absl::Time give_up = absl::Now() + absl::Seconds(30);
  while (shutting_down && refused.ok() && absl::Now() < give_up) {
    grad::v1::GetInfoResponse info;
    std::unique_ptr<grpc::ClientContext> context = ContextWithTimeout(std::chrono::seconds(10));
    refused = other_client->GetInfo(context.get(), grad::v1::GetInfoRequest(), &info);
    if (refused.ok()) absl::SleepFor(absl::Milliseconds(5));
  }
  EXPECT_THAT(refused.error_code(),
              ::testing::AnyOf(grpc::StatusCode::UNAVAILABLE, grpc::StatusCode::CANCELLED))
      << refused.error_message();
  long_call.join();
  ASSERT_TRUE(status.ok()) << status.error_code() << ": " << status.error_message() << "\n"
                           << (process.WaitForExit(absl::Seconds(30)), process.Stderr());
  EXPECT_EQ(response.request_id(), "long-call");

  EXPECT_EQ(process.WaitForExit(absl::Seconds(60)), 0);
  // The signal came while the call was in flight: the server logged it before the call.
  const std::string log = process.Stderr();
  const size_t signalled = log.find("gradserver: SIGTERM received");
  const size_t drained_call = log.rfind("method=ComputeGradients request_id=\"long-call\" code=OK");
  ASSERT_NE(signalled, std::string::npos) << log;
  ASSERT_NE(drained_call, std::string::npos) << log;
  EXPECT_LT(signalled, drained_call) << log;
  EXPECT_THAT(log, HasSubstr("gradserver: stopped"));

  // The drained call's result is bit for bit that of the same call undisturbed (which
  // service_test checks against the engine for other networks).
  absl::StatusOr<gradengine::GradientResult> actual = gradwire::DecodeGradientResult(response);
  ASSERT_TRUE(actual.ok()) << actual.status();
  absl::StatusOr<gradengine::GradientResult> expected = gradwire::DecodeGradientResult(undisturbed);
  ASSERT_TRUE(expected.ok()) << expected.status();
  EXPECT_EQ(expected->parameter_grads.size(), long_case.parameters.size());
  EXPECT_TRUE(SameGradientResult(*actual, *expected, /*compare_output=*/false));

  // Nothing listens any more.
  grad::v1::GetInfoResponse info;
  std::unique_ptr<grpc::ClientContext> context = ContextWithTimeout(std::chrono::seconds(10));
  EXPECT_EQ(stub->GetInfo(context.get(), grad::v1::GetInfoRequest(), &info).error_code(),
            grpc::StatusCode::UNAVAILABLE);
}

}  // namespace
}  // namespace gradservicetest
