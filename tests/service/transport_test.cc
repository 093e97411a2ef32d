// Every PyTorch fixture through the C++ client over each transport: loopback TCP, a unix
// domain socket, and shared memory (tensors and results in a registered region, over the unix
// socket), each bit-identical to the engine computing the same request in process. With shared
// memory the results must live in the region itself: no byte of them crossed the socket.

#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gradclient/client.h"
#include "gradclient/shared_memory.h"
#include "gtest/gtest.h"
#include "tests/service/service_test_util.h"
#include "tests/torch/fixture.h"

namespace gradservicetest {
namespace {

using gradclient::SharedMemoryRegion;

enum class Transport { kTcp, kUnix, kSharedMemory };

const char* TransportName(Transport transport) {
  switch (transport) {
    case Transport::kTcp:
      return "tcp";
    case Transport::kUnix:
      return "unix";
    case Transport::kSharedMemory:
      return "shm";
  }
  return "?";
}

constexpr int kThreads = 2;

class TransportTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    gradserver::ServerOptions options;
    options.threads_per_request = kThreads;
    options.shared_memory.allowed = true;
    tcp_ = StartTestServer(options).release();
    unix_path_ =
        new std::string(absl::StrCat(::testing::TempDir(), "/transport_test.", getpid(), ".sock"));
    unix_ = StartTestServer(options, false, "unix:" + *unix_path_).release();
    engine_ = MakeReferenceEngine(kThreads).release();
  }
  static void TearDownTestSuite() {
    delete tcp_;
    delete unix_;
    delete engine_;
    std::remove(unix_path_->c_str());
    delete unix_path_;
  }
  void SetUp() override {
    ASSERT_NE(tcp_, nullptr);
    ASSERT_NE(unix_, nullptr);
    ASSERT_NE(engine_, nullptr);
  }

  static std::unique_ptr<gradclient::Client> ClientFor(Transport transport) {
    absl::StatusOr<std::unique_ptr<gradclient::Client>> client =
        gradclient::Client::Create(transport == Transport::kTcp ? tcp_->target : unix_->target);
    EXPECT_TRUE(client.ok()) << client.status();
    return client.ok() ? *std::move(client) : nullptr;
  }

  inline static TestServer* tcp_ = nullptr;
  inline static TestServer* unix_ = nullptr;
  inline static std::string* unix_path_ = nullptr;
  inline static gradengine::Engine* engine_ = nullptr;
};

// Copies every tensor of `request` into `region` and points the request at the copies.
void MoveInto(SharedMemoryRegion& region, gradengine::GradientRequest* request) {
  ASSERT_TRUE(gradclient::CopyRequestInto(region, request).ok());
  // The results go into the rest: NaN there, so that an element the server does not write
  // cannot pass for a computed zero.
  float* rest = reinterpret_cast<float*>(region.data() + region.allocated_bytes());
  std::fill(rest, rest + (region.byte_size() - region.allocated_bytes()) / sizeof(float),
            std::numeric_limits<float>::quiet_NaN());
}

bool InRegion(const SharedMemoryRegion& region, const gradengine::Tensor& tensor) {
  return tensor.data.empty() ||
         region.OffsetOf(tensor.data.data(), tensor.data.size() * sizeof(float)).has_value();
}

TEST_F(TransportTest, EveryFixtureIsBitIdenticalToTheEngineOverEveryTransport) {
  const char* source_dir = std::getenv("GRAD_SOURCE_DIR");
  ASSERT_NE(source_dir, nullptr) << "GRAD_SOURCE_DIR is not set; run this test through ctest";
  absl::StatusOr<std::vector<std::string>> cases =
      gradtest::FindFixtureCases(absl::StrCat(source_dir, "/tests/fixtures"));
  ASSERT_TRUE(cases.ok()) << cases.status();
  ASSERT_GE(cases->size(), 20u);
  for (Transport transport : {Transport::kTcp, Transport::kUnix, Transport::kSharedMemory}) {
    std::unique_ptr<gradclient::Client> client = ClientFor(transport);
    ASSERT_NE(client, nullptr);
    for (const std::string& directory : *cases) {
      SCOPED_TRACE(absl::StrCat(TransportName(transport), " ", directory));
      absl::StatusOr<std::unique_ptr<gradtest::FixtureCase>> fixture =
          gradtest::LoadFixtureCase(directory);
      ASSERT_TRUE(fixture.ok()) << fixture.status();
      gradengine::GradientRequest request = (*fixture)->request;
      absl::StatusOr<gradengine::GradientResult> expected = engine_->ComputeGradients(request);
      ASSERT_TRUE(expected.ok()) << expected.status();
      gradengine::ForwardRequest forward_request = (*fixture)->MakeForwardRequest();
      absl::StatusOr<gradengine::ForwardResult> expected_forward =
          engine_->Forward(forward_request);
      ASSERT_TRUE(expected_forward.ok()) << expected_forward.status();

      gradclient::CallOptions call;
      std::shared_ptr<SharedMemoryRegion> region;
      if (transport == Transport::kSharedMemory) {
        absl::StatusOr<std::shared_ptr<SharedMemoryRegion>> made =
            SharedMemoryRegion::Create("fixture", 32 << 20);
        ASSERT_TRUE(made.ok()) << made.status();
        region = *std::move(made);
        MoveInto(*region, &request);
        forward_request.input = request.input;
        forward_request.parameters = request.parameters;
        ASSERT_TRUE(client->RegisterSharedMemory(region).ok());
        call.result_region = region;
      }
      absl::StatusOr<gradclient::GradientReply> reply = client->ComputeGradients(request, call);
      ASSERT_TRUE(reply.ok()) << reply.status();
      EXPECT_TRUE(SameGradientResult(reply->result, *expected));
      absl::StatusOr<gradclient::ForwardReply> forward = client->Forward(forward_request, call);
      ASSERT_TRUE(forward.ok()) << forward.status();
      EXPECT_TRUE(SameForwardResult(forward->result, *expected_forward));
      if (region != nullptr) {
        EXPECT_TRUE(InRegion(*region, reply->result.output));
        if (reply->result.input_grad) {
          EXPECT_TRUE(InRegion(*region, *reply->result.input_grad));
        }
        for (const auto& [name, grad] : reply->result.parameter_grads) {
          EXPECT_TRUE(InRegion(*region, grad)) << name;
        }
        EXPECT_TRUE(InRegion(*region, forward->result.output));
      }
    }
  }
}

}  // namespace
}  // namespace gradservicetest
