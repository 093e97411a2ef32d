// The memory budget of the gradserver binary against requests that could take the server's
// memory: tiny requests with huge results, networks whose compiled plans are huge,
// clients that never read their responses, and a soak of mixed traffic. The server runs with
// --max_memory_mb=kBudgetMb; its resident memory, read from /proc, must stay under the budget
// plus kSlackMb (the program itself and what the budget does not count, see
// gradengine/memory_budget.h), and a normal call must be answered correctly meanwhile and after.
//
// The binary's path comes from the GRADSERVER_BINARY environment variable (set by CTest).

#include <arpa/inet.h>
#include <grpcpp/grpcpp.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
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

using ::testing::HasSubstr;

constexpr int64_t kBudgetMb = 512;
// Under AddressSanitizer (this build's server binary is built the same way) freed memory sits
// in ASan's quarantine, every allocation has redzones and an eighth more of shadow memory,
// and malloc_trim does nothing: resident memory says nothing about the budget there, so only
// the release build checks it. Every other expectation holds in both.
#if defined(__SANITIZE_ADDRESS__)
constexpr bool kCheckResidentMemory = false;
#else
constexpr bool kCheckResidentMemory = true;
#endif
// What the process holds beyond the budget: the binary and its libraries, oneDNN's kernels,
// gRPC's buffers and threads, plans being compiled: about 25 MiB at start, more once oneDNN has
// compiled kernels.
constexpr int64_t kSlackMb = 160;

// VmRSS (now) or VmHWM (the highest so far) of `pid`, in MiB; -1 if it cannot be read.
int64_t ResidentMb(pid_t pid, const std::string& field = "VmRSS:") {
  std::ifstream status(absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind(field, 0) != 0) continue;
    std::vector<std::string> parts = absl::StrSplit(line, ' ', absl::SkipEmpty());
    int64_t kb = 0;
    if (parts.size() >= 2 && absl::SimpleAtoi(parts[1], &kb)) return kb >> 10;
  }
  return -1;
}

class MemoryBudgetTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_NE(GradserverBinary(), "") << "GRADSERVER_BINARY is not set; run through ctest";
  }

  // Starts gradserver with the budget and `flags`.
  void Start(std::vector<std::string> flags = {}) {
    // Later flags win: the caller's come last.
    flags.insert(
        flags.begin(),
        {"--address=127.0.0.1:0", absl::StrCat("--max_memory_mb=", kBudgetMb),
         "--threads_per_request=1", "--max_concurrent_requests=2", "--log_requests=false"});
    ASSERT_TRUE(process_.Start(GradserverBinary(), flags));
    port_ = process_.WaitForPort(absl::Seconds(60));
    ASSERT_GT(port_, 0) << process_.Stderr();
    channel_ = MakeChannel(absl::StrCat("127.0.0.1:", port_));
    stub_ = grad::v1::GradientService::NewStub(channel_);
    engine_ = MakeReferenceEngine(1);
    normal_ = SmallCase("conv_relu_conv_tanh");
  }

  pid_t pid() const { return process_.pid(); }

  // A small gradient call, checked bit for bit against the engine in this process.
  void ExpectNormalCallAnswered() {
    grad::v1::ComputeGradientsRequest request;
    const gradengine::GradientRequest engine_request = normal_.GradientRequest();
    gradwire::EncodeGradientRequest(engine_request, &request);
    grad::v1::ComputeGradientsResponse response;
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    grpc::Status status = stub_->ComputeGradients(&context, request, &response);
    ASSERT_TRUE(status.ok()) << status.error_code() << " " << status.error_message();
    absl::StatusOr<gradengine::GradientResult> got = gradwire::DecodeGradientResult(response);
    ASSERT_TRUE(got.ok()) << got.status();
    absl::StatusOr<gradengine::GradientResult> want = engine_->ComputeGradients(engine_request);
    ASSERT_TRUE(want.ok()) << want.status();
    EXPECT_TRUE(SameGradientResult(*got, *want));
  }

  // Whether the budget comes to have nothing reserved within `timeout`.
  bool NothingReservedWithin(absl::Duration timeout) {
    const absl::Time give_up = absl::Now() + timeout;
    while (Info().memory().reserved_bytes() != 0) {
      if (absl::Now() >= give_up) return false;
      absl::SleepFor(absl::Milliseconds(20));
    }
    return true;
  }

  grad::v1::GetInfoResponse Info() {
    grad::v1::GetInfoResponse info;
    grpc::ClientContext context;
    grpc::Status status = stub_->GetInfo(&context, grad::v1::GetInfoRequest(), &info);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return info;
  }

  void ExpectResidentWithinBudget(const std::string& when) {
    if (!kCheckResidentMemory) return;
    const int64_t peak = ResidentMb(pid(), "VmHWM:");
    ASSERT_GT(peak, 0);
    std::cout << when << ": resident " << ResidentMb(pid()) << " MiB, peak " << peak
              << " MiB (budget " << kBudgetMb << " MiB)\n";
    EXPECT_LE(peak, kBudgetMb + kSlackMb)
        << when << ": the server's resident memory peaked at " << peak << " MiB";
  }

  ServerProcess process_;
  int port_ = 0;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<grad::v1::GradientService::Stub> stub_;
  std::unique_ptr<gradengine::Engine> engine_;
  OwnedCase normal_;
};

// One conv2d (1 -> out_channels, kernel 1, padding `padding`) on a [1, 1, 1, 1] input with the
// sum objective: a request of about 100 bytes whose output is out_channels x (2 padding + 1)^2.
grad::v1::ComputeGradientsRequest TinyRequestHugeResult(int64_t out_channels, int64_t padding) {
  grad::v1::ComputeGradientsRequest request;
  grad::v1::Layer* layer = request.mutable_network()->add_layers();
  layer->set_name("c");
  grad::v1::Conv2d* conv = layer->mutable_conv2d();
  conv->set_in_channels(1);
  conv->set_out_channels(out_channels);
  conv->add_kernel_size(1);
  conv->add_padding(padding);
  grad::v1::NamedTensor* weight = request.add_parameters();
  weight->set_name("c.weight");
  std::vector<float> ones(static_cast<size_t>(out_channels), 1.0f);
  gradwire::EncodeTensor(gradengine::TensorView({out_channels, 1, 1, 1}, ones),
                         weight->mutable_tensor());
  std::vector<float> one = {1.0f};
  gradwire::EncodeTensor(gradengine::TensorView({1, 1, 1, 1}, one), request.mutable_input());
  request.mutable_objective()->mutable_sum();
  return request;
}

TEST_F(MemoryBudgetTest, TinyRequestsWithHugeResultsAreRefusedOrServedWithinTheBudget) {
  Start();
  ExpectNormalCallAnswered();
  // Padding 4096: 256 MiB of output per channel, and more in oneDNN's blocked layout.
  for (int64_t k = 2; k <= 6; ++k) {
    grad::v1::ComputeGradientsRequest request = TinyRequestHugeResult(k, 4096);
    EXPECT_LT(request.ByteSizeLong(), 200u);
    grad::v1::ComputeGradientsResponse response;
    grpc::ClientContext context;
    grpc::Status status = stub_->ComputeGradients(&context, request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << "K=" << k;
    EXPECT_THAT(status.error_message(), HasSubstr("bytes"));
    EXPECT_THAT(status.error_message(), HasSubstr("max_memory_mb=512"));
  }
  // Padding 1536: each K is a new plan whose call needs 100 to 300 MiB, which fits one at a time;
  // each one's idle workspace must give way to the next.
  for (int64_t k = 2; k <= 6; ++k) {
    grad::v1::ComputeGradientsRequest request = TinyRequestHugeResult(k, 1536);
    grad::v1::ComputeGradientsResponse response;
    grpc::ClientContext context;
    grpc::Status status = stub_->ComputeGradients(&context, request, &response);
    if (status.ok()) {
      EXPECT_DOUBLE_EQ(response.loss(), static_cast<double>(k));  // one non-zero output each
    } else {
      EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
          << status.error_message();
    }
    ExpectNormalCallAnswered();
  }
  ExpectResidentWithinBudget("after the huge results");
  const grad::v1::GetInfoResponse info = Info();
  EXPECT_EQ(info.limits().max_memory_bytes(), kBudgetMb << 20);
  EXPECT_LE(info.memory().peak_bytes(), kBudgetMb << 20);
  EXPECT_GE(info.memory().reservations_refused(), 5);
  // The last calls' memory is given back when gRPC is done with them, just after their answers.
  EXPECT_TRUE(NothingReservedWithin(absl::Seconds(10)));
}

// `layers` 1x1 convolutions 1 -> 1 on a [1, 1, 1, width] input: a plan of tens of KiB per layer.
grad::v1::ComputeGradientsRequest DeepRequest(int layers, int64_t width) {
  grad::v1::ComputeGradientsRequest request;
  const std::vector<float> weight = {0.5f};
  for (int i = 0; i < layers; ++i) {
    grad::v1::Layer* layer = request.mutable_network()->add_layers();
    layer->set_name(absl::StrCat("c", i));
    grad::v1::Conv2d* conv = layer->mutable_conv2d();
    conv->set_in_channels(1);
    conv->set_out_channels(1);
    conv->add_kernel_size(1);
    grad::v1::NamedTensor* parameter = request.add_parameters();
    parameter->set_name(absl::StrCat("c", i, ".weight"));
    gradwire::EncodeTensor(gradengine::TensorView({1, 1, 1, 1}, weight),
                           parameter->mutable_tensor());
  }
  const std::vector<float> input(static_cast<size_t>(width), 1.0f);
  gradwire::EncodeTensor(gradengine::TensorView({1, 1, 1, width}, input), request.mutable_input());
  request.mutable_objective()->mutable_sum();
  return request;
}

TEST_F(MemoryBudgetTest, NetworksBeyondTheBoundsAreRefusedAndThePlanCacheStaysWithinItsBytes) {
  Start();
  {
    grad::v1::ComputeGradientsRequest request = DeepRequest(40000, 1);
    grad::v1::ComputeGradientsResponse response;
    grpc::ClientContext context;
    grpc::Status status = stub_->ComputeGradients(&context, request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
    EXPECT_THAT(status.error_message(), HasSubstr("layers has 40000 entries; at most 1024"));
  }
  const grad::v1::GetInfoResponse before = Info();
  EXPECT_EQ(before.limits().max_layers(), gradengine::kMaxLayers);
  // The most layers allowed, with a new input shape (so a new plan) each time.
  for (int64_t width = 1; width <= 12; ++width) {
    grad::v1::ComputeGradientsRequest request = DeepRequest(gradengine::kMaxLayers, width);
    grad::v1::ComputeGradientsResponse response;
    grpc::ClientContext context;
    grpc::Status status = stub_->ComputeGradients(&context, request, &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    const grad::v1::GetInfoResponse info = Info();
    EXPECT_LE(info.memory().plan_cache_bytes(), info.memory().max_plan_cache_bytes());
  }
  ExpectNormalCallAnswered();
  ExpectResidentWithinBudget("after the deep networks");
}

// A client that speaks just enough HTTP/2 to send one call, advertises a zero flow-control
// window so that the server can send no response byte, and never reads.
class StalledClient {
 public:
  explicit StalledClient(int port) {
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = htons(static_cast<uint16_t>(port));
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    connected_ = connect(fd_, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0;
  }
  ~StalledClient() { close(fd_); }

  bool Send(const std::string& method, const std::string& message) {
    std::string out = Preface(method);
    std::string data(5, '\0');  // gRPC message prefix: uncompressed, length
    const uint32_t length = htonl(static_cast<uint32_t>(message.size()));
    std::memcpy(&data[1], &length, 4);
    data += message;
    AppendFrame(&out, 0x0, 0x1, 1, data);  // DATA, END_STREAM
    return Write(out);
  }

  // Starts a call whose message is `declared_bytes` long, sends only its first `sent_bytes`,
  // and then resets the stream with CANCEL, as a client that gives up mid-send does.
  bool SendPartThenCancel(const std::string& method, uint32_t declared_bytes, uint32_t sent_bytes) {
    std::string out = Preface(method);
    std::string data(5, '\0');
    const uint32_t length = htonl(declared_bytes);
    std::memcpy(&data[1], &length, 4);
    data.append(sent_bytes, '\0');
    AppendFrame(&out, 0x0, 0x0, 1, data);  // DATA, stream still open
    if (!Write(out)) return false;
    absl::SleepFor(absl::Milliseconds(100));  // let the server start the call
    std::string reset;
    const uint32_t cancel = htonl(0x8);
    reset.append(reinterpret_cast<const char*>(&cancel), 4);
    std::string frame;
    AppendFrame(&frame, 0x3, 0x0, 1, reset);  // RST_STREAM, CANCEL
    return Write(frame);
  }

 private:
  // The connection preface, settings and the HEADERS frame of stream 1.
  static std::string Preface(const std::string& method) {
    std::string out = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    // SETTINGS: INITIAL_WINDOW_SIZE = 0, ENABLE_PUSH = 0; then acknowledge the server's.
    std::string settings;
    AppendSetting(&settings, 0x4, 0);
    AppendSetting(&settings, 0x2, 0);
    AppendFrame(&out, 0x4, 0, 0, settings);
    AppendFrame(&out, 0x4, 0x1, 0, "");
    std::string headers;
    for (const auto& [name, value] :
         std::vector<std::pair<std::string, std::string>>{{":method", "POST"},
                                                          {":scheme", "http"},
                                                          {":path", method},
                                                          {":authority", "127.0.0.1"},
                                                          {"content-type", "application/grpc"},
                                                          {"te", "trailers"}}) {
      // Literal header field without indexing, new name, no Huffman coding (RFC 7541 6.2.2).
      headers.push_back('\0');
      headers.push_back(static_cast<char>(name.size()));
      headers += name;
      headers.push_back(static_cast<char>(value.size()));
      headers += value;
    }
    AppendFrame(&out, 0x1, 0x4, 1, headers);  // HEADERS, END_HEADERS
    return out;
  }
  bool Write(const std::string& bytes) {
    return connected_ &&
           write(fd_, bytes.data(), bytes.size()) == static_cast<ssize_t>(bytes.size());
  }
  static void AppendSetting(std::string* out, uint16_t id, uint32_t value) {
    const uint16_t id_be = htons(id);
    const uint32_t value_be = htonl(value);
    out->append(reinterpret_cast<const char*>(&id_be), 2);
    out->append(reinterpret_cast<const char*>(&value_be), 4);
  }
  static void AppendFrame(std::string* out, uint8_t type, uint8_t flags, uint32_t stream,
                          const std::string& payload) {
    const uint32_t length = static_cast<uint32_t>(payload.size());
    out->push_back(static_cast<char>(length >> 16));
    out->push_back(static_cast<char>(length >> 8));
    out->push_back(static_cast<char>(length));
    out->push_back(static_cast<char>(type));
    out->push_back(static_cast<char>(flags));
    const uint32_t stream_be = htonl(stream);
    out->append(reinterpret_cast<const char*>(&stream_be), 4);
    *out += payload;
  }

  int fd_ = -1;
  bool connected_ = false;
};

TEST_F(MemoryBudgetTest, ResponsesNobodyReadsAreCancelledAndTheirMemoryGivenBack) {
  Start({"--response_drain_timeout_seconds=2", "--memory_wait_seconds=30"});
  // A 76-byte Forward whose response is 64 MiB (4 channels, padding 1024).
  grad::v1::ForwardRequest forward;
  {
    grad::v1::ComputeGradientsRequest gradient = TinyRequestHugeResult(4, 1024);
    *forward.mutable_network() = gradient.network();
    *forward.mutable_parameters() = gradient.parameters();
    *forward.mutable_input() = gradient.input();
  }
  const std::string message = forward.SerializeAsString();
  EXPECT_LT(message.size(), 100u);
  std::vector<std::unique_ptr<StalledClient>> clients;
  constexpr int kClients = 12;  // 768 MiB of responses if none were ever freed
  for (int i = 0; i < kClients; ++i) {
    clients.push_back(std::make_unique<StalledClient>(port_));
    ASSERT_TRUE(clients.back()->Send("/grad.v1.GradientService/Forward", message));
  }
  // Meanwhile the server answers others, and stays within its budget.
  const absl::Time give_up = absl::Now() + absl::Seconds(120);
  int64_t cancelled = 0;
  while (absl::Now() < give_up) {
    ExpectNormalCallAnswered();
    ExpectResidentWithinBudget("with stalled clients");
    const grad::v1::GetInfoResponse info = Info();
    cancelled = info.memory().responses_cancelled_undrained();
    if (cancelled >= kClients && info.memory().reserved_bytes() == 0) break;
    absl::SleepFor(absl::Milliseconds(250));
  }
  EXPECT_EQ(cancelled, kClients);
  EXPECT_TRUE(NothingReservedWithin(absl::Seconds(10)));
  ExpectNormalCallAnswered();
  ExpectResidentWithinBudget("after the stalled clients");
}

TEST_F(MemoryBudgetTest, AClientThatCancelsWhileSendingIsLoggedAsCancelled) {
  Start({"--log_requests=true"});
  // The client declares a 64 MiB message, sends 1000 bytes of it and gives up.
  StalledClient client(port_);
  ASSERT_TRUE(client.SendPartThenCancel("/grad.v1.GradientService/ComputeGradients",
                                        uint32_t{64} << 20, 1000));
  int cancelled_lines = 0;
  const absl::Time give_up = absl::Now() + absl::Seconds(30);
  while (cancelled_lines == 0 && absl::Now() < give_up) {
    absl::SleepFor(absl::Milliseconds(100));
    for (absl::string_view line : absl::StrSplit(process_.Stderr(), '\n')) {
      if (!absl::StrContains(line, "method=ComputeGradients")) continue;
      EXPECT_THAT(line, ::testing::Not(HasSubstr("INVALID_ARGUMENT")));
      if (absl::StrContains(line, "code=CANCELLED")) ++cancelled_lines;
    }
  }
  EXPECT_EQ(cancelled_lines, 1) << process_.Stderr();
  ExpectNormalCallAnswered();
}

TEST_F(MemoryBudgetTest, MixedTrafficSoakKeepsResidentMemoryFlat) {
  Start({"--response_drain_timeout_seconds=2"});
  std::atomic<bool> stop{false};
  std::atomic<int64_t> calls{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 2; ++t) {
    threads.emplace_back([&, t] {
      auto stub =
          grad::v1::GradientService::NewStub(MakeChannel(absl::StrCat("127.0.0.1:", port_)));
      for (int i = 0; !stop.load(); ++i) {
        grad::v1::ComputeGradientsRequest request;
        switch ((i + t) % 4) {
          case 0:
            request = TinyRequestHugeResult(2 + i % 3, 4096);  // refused
            break;
          case 1:
            request = TinyRequestHugeResult(1 + i % 4, 256);  // served, a new plan now and then
            break;
          case 2:
            request = DeepRequest(64, 1 + i % 7);
            break;
          default:
            request.mutable_network()->add_layers()->set_name(std::string(1 << 16, 'x'));
            break;
        }
        grad::v1::ComputeGradientsResponse response;
        grpc::ClientContext context;
        stub->ComputeGradients(&context, request, &response).ok();
        calls.fetch_add(1);
      }
    });
  }
  std::vector<int64_t> samples;
  const absl::Time end = absl::Now() + absl::Seconds(24);
  while (absl::Now() < end) {
    absl::SleepFor(absl::Milliseconds(500));
    samples.push_back(ResidentMb(pid()));
  }
  stop.store(true);
  for (std::thread& thread : threads) thread.join();
  ExpectNormalCallAnswered();
  ExpectResidentWithinBudget("after the soak");
  ASSERT_GE(samples.size(), 9u);
  const size_t third = samples.size() / 3;
  const int64_t early = *std::max_element(samples.begin(), samples.begin() + third);
  const int64_t late = *std::max_element(samples.end() - third, samples.end());
  if (kCheckResidentMemory) {
    EXPECT_LE(late, early + 32) << "resident memory grew from " << early << " to " << late
                                << " MiB over " << calls.load() << " calls";
  }
  EXPECT_GT(calls.load(), 20);
}

}  // namespace
}  // namespace gradservicetest
