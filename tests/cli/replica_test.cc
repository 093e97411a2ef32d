// Scale-out over three real gradserver processes on loopback: one client spreads its calls over
// all of them (round robin), a sharded call computes on all three at once and equals the
// single-server result, and a replica killed with SIGKILL in the middle of `gradctl bench`
// loses no request: the calls it had are retried on the others and every reply is verified.
//
// The gradserver binary comes from GRADSERVER_BINARY (set by CTest).

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <filesystem>
#include <iostream>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gradclient/client.h"
#include "gradclient/workloads.h"
#include "gradengine/network.h"
#include "gtest/gtest.h"
#include "tests/cli/gradctl_runner.h"
#include "tests/service/server_process.h"
#include "tests/tolerance.h"

namespace gradclient {
namespace {

using ::gradservicetest::GradserverBinary;
using ::gradservicetest::ServerProcess;
using ::testing::HasSubstr;

constexpr int kReplicas = 3;

// Three gradserver processes, one OpenMP thread per call each (the machine may have 2 cores).
class ReplicaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_NE(GradserverBinary(), "") << "GRADSERVER_BINARY is not set; run through ctest";
    for (int i = 0; i < kReplicas; ++i) {
      replicas_[i] = std::make_unique<ServerProcess>();
      ASSERT_TRUE(replicas_[i]->Start(GradserverBinary(),
                                      {"--address=127.0.0.1:0", "--threads_per_request=1",
                                       "--max_concurrent_requests=2", "--log_requests=false"}));
    }
    std::vector<std::string> addresses;
    for (int i = 0; i < kReplicas; ++i) {
      ports_[i] = replicas_[i]->WaitForPort(absl::Seconds(60));
      ASSERT_GT(ports_[i], 0) << replicas_[i]->Stderr();
      addresses.push_back(absl::StrCat("127.0.0.1:", ports_[i]));
      absl::StatusOr<std::unique_ptr<Client>> direct = Client::Create(addresses.back());
      ASSERT_TRUE(direct.ok()) << direct.status();
      direct_[i] = *std::move(direct);
    }
    // The bare list form; the client turns it into gRPC's ipv4: target.
    target_ = absl::StrJoin(addresses, ",");
  }

  // Compute calls each replica has counted so far.
  std::array<int64_t, kReplicas> Counts() {
    std::array<int64_t, kReplicas> counts{};
    for (int i = 0; i < kReplicas; ++i) {
      absl::StatusOr<ServerInfo> info = direct_[i]->GetInfo();
      EXPECT_TRUE(info.ok()) << "replica " << i << ": " << info.status();
      counts[i] = info.ok() ? info->requests_total : -1;
    }
    return counts;
  }

  // Calls `request` until every replica has counted one, so that the client is connected to
  // all of them (round robin takes turns over the connected ones only).
  void ConnectToAll(Client& client, const gradengine::GradientRequest& request) {
    const absl::Time deadline = absl::Now() + absl::Seconds(30);
    const std::array<int64_t, kReplicas> before = Counts();
    while (absl::Now() < deadline) {
      ASSERT_TRUE(client.ComputeGradients(request).ok());
      const std::array<int64_t, kReplicas> now = Counts();
      bool all = true;
      for (int i = 0; i < kReplicas; ++i) all = all && now[i] > before[i];
      if (all) return;
    }
    FAIL() << "the client did not reach every replica within 30 s";
  }

  std::array<std::unique_ptr<ServerProcess>, kReplicas> replicas_;
  std::array<int, kReplicas> ports_{};
  std::array<std::unique_ptr<Client>, kReplicas> direct_;
  std::string target_;
};

TEST_F(ReplicaTest, OneClientSpreadsItsCallsOverEveryReplica) {
  absl::StatusOr<std::unique_ptr<Client>> client = Client::Create(target_);
  ASSERT_TRUE(client.ok()) << client.status();
  absl::StatusOr<Workload> workload = MakeWorkload("seed1");
  ASSERT_TRUE(workload.ok());
  const gradengine::GradientRequest request = workload->Request();
  ConnectToAll(**client, request);

  constexpr int kCalls = 30;
  const std::array<int64_t, kReplicas> before = Counts();
  for (int n = 0; n < kCalls; ++n) ASSERT_TRUE((*client)->ComputeGradients(request).ok());
  const std::array<int64_t, kReplicas> after = Counts();
  int64_t total = 0;
  for (int i = 0; i < kReplicas; ++i) {
    const int64_t calls = after[i] - before[i];
    total += calls;
    // Round robin gives each exactly kCalls / kReplicas while all stay connected; the bound
    // leaves room for a reconnect.
    EXPECT_GE(calls, kCalls / kReplicas / 2) << "replica " << i;
  }
  EXPECT_EQ(total, kCalls);

  // gRPC's own target syntax works too: a name resolved by DNS.
  absl::StatusOr<std::unique_ptr<Client>> by_name =
      Client::Create(absl::StrCat("dns:///localhost:", ports_[0]));
  ASSERT_TRUE(by_name.ok()) << by_name.status();
  EXPECT_TRUE((*by_name)->ComputeGradients(request).ok());
}

TEST_F(ReplicaTest, ShardedCallComputesOnEveryReplicaAndEqualsTheWholeBatch) {
  absl::StatusOr<std::unique_ptr<Client>> client = Client::Create(target_);
  ASSERT_TRUE(client.ok()) << client.status();
  absl::StatusOr<Workload> workload = MakeWorkload("seed4_b32");
  ASSERT_TRUE(workload.ok());
  const gradengine::GradientRequest request = workload->Request();
  ConnectToAll(**client, request);

  absl::StatusOr<GradientReply> whole = (*client)->ComputeGradients(request);
  ASSERT_TRUE(whole.ok()) << whole.status();
  const std::array<int64_t, kReplicas> before = Counts();
  CallOptions sharded;
  sharded.shards = kReplicas;
  absl::StatusOr<GradientReply> parts = (*client)->ComputeGradients(request, sharded);
  ASSERT_TRUE(parts.ok()) << parts.status();
  const std::array<int64_t, kReplicas> after = Counts();
  for (int i = 0; i < kReplicas; ++i) {
    EXPECT_EQ(after[i] - before[i], 1) << "replica " << i << " should compute one part";
  }

  const gradengine::GradientResult& a = parts->result;
  const gradengine::GradientResult& e = whole->result;
  EXPECT_TRUE(
      (gradtest::TensorsClose<float, float>("output", a.output.shape, a.output.data, e.output.shape,
                                            e.output.data, gradtest::kShardedRelativeTolerance)));
  ASSERT_TRUE(a.loss.has_value() && e.loss.has_value());
  EXPECT_NEAR(*a.loss, *e.loss, gradtest::kShardedRelativeTolerance * std::max(1.0, *e.loss));
  ASSERT_TRUE(a.input_grad.has_value() && e.input_grad.has_value());
  EXPECT_TRUE((gradtest::TensorsClose<float, float>(
      "input_grad", a.input_grad->shape, a.input_grad->data, e.input_grad->shape,
      e.input_grad->data, gradtest::kShardedRelativeTolerance)));
  ASSERT_EQ(a.parameter_grads.size(), e.parameter_grads.size());
  for (const auto& [name, grad] : e.parameter_grads) {
    ASSERT_TRUE(a.parameter_grads.count(name)) << name;
    const gradengine::Tensor& got = a.parameter_grads.at(name);
    EXPECT_TRUE((gradtest::TensorsClose<float, float>(
        name, got.shape, got.data, grad.shape, grad.data, gradtest::kShardedRelativeTolerance)));
  }
}

// A part the server refuses fails the whole call with the server's code and message, prefixed
// with the part; Forward shards too.
TEST_F(ReplicaTest, ShardedCallsReportTheFailingPartAndForwardShards) {
  absl::StatusOr<std::unique_ptr<Client>> client = Client::Create(target_);
  ASSERT_TRUE(client.ok()) << client.status();
  absl::StatusOr<Workload> workload = MakeWorkload("seed4_b32");
  ASSERT_TRUE(workload.ok());
  CallOptions sharded;
  sharded.shards = kReplicas;

  gradengine::GradientRequest bad = workload->Request();
  gradengine::TensorView& weight = bad.parameters.at("conv2.weight");
  weight.shape = {16, 8, 9, 1};
  absl::StatusOr<GradientReply> refused = (*client)->ComputeGradients(bad, sharded);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(refused.status().message()),
              HasSubstr("shard 1 of 3 (batch rows 0..10): "));
  EXPECT_THAT(std::string(refused.status().message()),
              HasSubstr("parameters[\"conv2.weight\"].shape=[16, 8, 9, 1] must be [16, 8, 3, 3]"));

  sharded.shards = 0;
  EXPECT_EQ((*client)->ComputeGradients(workload->Request(), sharded).status().code(),
            absl::StatusCode::kInvalidArgument);

  sharded.shards = 4;
  absl::StatusOr<ForwardReply> whole = (*client)->Forward(workload->ForwardOnly());
  absl::StatusOr<ForwardReply> parts = (*client)->Forward(workload->ForwardOnly(), sharded);
  ASSERT_TRUE(whole.ok() && parts.ok());
  const gradengine::Tensor& a = parts->result.output;
  const gradengine::Tensor& e = whole->result.output;
  EXPECT_TRUE((gradtest::TensorsClose<float, float>("output", a.shape, a.data, e.shape, e.data,
                                                    gradtest::kShardedRelativeTolerance)));
}

TEST_F(ReplicaTest, SigkillOfOneReplicaMidBenchLosesNoRequest) {
  absl::StatusOr<Workload> workload = MakeWorkload("seed4");
  ASSERT_TRUE(workload.ok());

  // gradctl bench at concurrency 8 for 6 s over the three replicas, every reply compared with
  // the warm-up reply; replica 1 is killed 2 s in.
  const std::string dir = absl::StrCat(::testing::TempDir(), "/replica_test_", getpid());
  std::filesystem::create_directories(dir);
  gradclitest::GradctlRun bench;
  std::thread runner([&] {
    bench =
        gradclitest::RunGradctl(dir, {"bench", "--server=" + target_, "--workload=seed4",
                                      "--concurrency=8", "--duration=6s", "--verify", "--json"});
  });
  absl::SleepFor(absl::Seconds(2));
  absl::StatusOr<ServerInfo> victim = direct_[1]->GetInfo();
  const std::array<int64_t, kReplicas> before_kill = Counts();
  replicas_[1]->Signal(SIGKILL);
  EXPECT_EQ(replicas_[1]->WaitForExit(absl::Seconds(10)), 128 + SIGKILL);
  absl::SleepFor(absl::Seconds(1));
  absl::StatusOr<ServerInfo> survivor0 = direct_[0]->GetInfo();
  absl::StatusOr<ServerInfo> survivor2 = direct_[2]->GetInfo();
  runner.join();

  // The killed replica was serving the bench when it died, and the others went on.
  ASSERT_TRUE(victim.ok()) << victim.status();
  EXPECT_GT(victim->requests_total, 0) << "replica 1 had no calls before it was killed";
  ASSERT_TRUE(survivor0.ok() && survivor2.ok());
  EXPECT_GT(survivor0->requests_total, before_kill[0]);
  EXPECT_GT(survivor2->requests_total, before_kill[2]);

  std::cout << "gradctl bench: " << bench.out;
  // Nothing lost, nothing wrong.
  EXPECT_EQ(bench.exit_code, 0) << bench;
  EXPECT_THAT(bench.out, HasSubstr("\"concurrency\":8"));
  EXPECT_THAT(bench.out, HasSubstr("\"verify\":true"));
  EXPECT_THAT(bench.out, HasSubstr("\"failed\":0,"));
  EXPECT_THAT(bench.out, HasSubstr("\"errors\":{}"));
  EXPECT_THAT(bench.out, ::testing::Not(HasSubstr("\"ok\":0,"))) << bench;
  if (!HasFailure()) std::filesystem::remove_all(dir);
}

TEST(ClientTargetTest, ListsOfHostNamesAreRefusedWithTheAlternatives) {
  absl::StatusOr<std::unique_ptr<Client>> client =
      Client::Create("replica-a:50051,replica-b:50051");
  ASSERT_FALSE(client.ok());
  EXPECT_EQ(client.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(client.status().message()), HasSubstr("dns:///NAME:PORT"));
}

}  // namespace
}  // namespace gradclient
