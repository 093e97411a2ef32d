// Shared by the service tests: in-process servers on an ephemeral port, channels and stubs,
// randomly filled requests that own their data, and bit-for-bit comparison of results.

#ifndef TESTS_SERVICE_SERVICE_TEST_UTIL_H_
#define TESTS_SERVICE_SERVICE_TEST_UTIL_H_

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "grad/v1/gradient_service.grpc.pb.h"
#include "gradengine/engine.h"
#include "gradengine/network.h"
#include "gradengine/tensor.h"
#include "gtest/gtest.h"
#include "server/server.h"

namespace gradservicetest {

// A channel with no limit on the messages it receives (gRPC's client default is 4 MiB). With
// `own_connection`, it does not share a connection with other channels to the same target.
std::shared_ptr<grpc::Channel> MakeChannel(const std::string& target, bool own_connection = false);

// A Server listening on 127.0.0.1 with a stub connected to it.
struct TestServer {
  std::unique_ptr<gradserver::Server> server;
  // What a client connects to: 127.0.0.1:PORT, or the unix: address.
  std::string target;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<grad::v1::GradientService::Stub> stub;
};

// Starts a server with `options`, except that the address is `address` (127.0.0.1:0, or a
// unix:PATH) and request logging is off unless `log_requests`. Fails the current test (and
// returns null) if it cannot start.
std::unique_ptr<TestServer> StartTestServer(gradserver::ServerOptions options,
                                            bool log_requests = false,
                                            const std::string& address = "127.0.0.1:0");

// An engine configured like a server started with `threads_per_request`, so that its results
// are bit-for-bit the server's.
std::unique_ptr<gradengine::Engine> MakeReferenceEngine(int threads_per_request);

// A network with its input, parameters and an output-shaped tensor (the MSE target or the
// grad_output), all filled with N(0, 1) values from a fixed seed. The requests it makes borrow
// its data.
struct OwnedCase {
  gradengine::NetworkSpec network;
  gradengine::Tensor input;
  std::map<std::string, gradengine::Tensor> parameters;
  gradengine::Tensor output_like;

  gradengine::ForwardRequest ForwardRequest() const;
  gradengine::GradientRequest GradientRequest(
      gradengine::ObjectiveKind objective = gradengine::ObjectiveKind::kMse,
      const gradengine::GradientSelection& gradients = {}) const;
};

// REQUIRES: `network` is valid for `input_shape`.
OwnedCase MakeCase(const gradengine::NetworkSpec& network, std::vector<int64_t> input_shape,
                   uint32_t seed);

// Three small networks that cover conv2d's hyperparameters and every activation.
// "conv_relu_conv_tanh": [2, 3, 12, 12], bias, stride 2.
// "grouped_dilated": [1, 4, 11, 9], groups 2, dilation 2, asymmetric padding, leaky_relu,
//   elu, sigmoid.
// "gelu_chain": [3, 2, 8, 8], non-square kernels, gelu, gelu_tanh, relu.
OwnedCase SmallCase(const std::string& name);
std::vector<std::string> SmallCaseNames();

// `layers` convolutions `channels` -> `channels`, 3x3 padding 1 with bias, each followed by a
// ReLU, on [batch, channels, size, size]: a call whose length grows with every dimension and
// that the server can stop between any two of its many layers.
OwnedCase DeepCase(int layers, int64_t batch, int64_t channels, int64_t size);

// Exact comparison: equal shapes and bit-identical values (NaN payloads included).
::testing::AssertionResult SameTensor(const std::string& what, const gradengine::Tensor& actual,
                                      const gradengine::Tensor& expected);
::testing::AssertionResult SameForwardResult(const gradengine::ForwardResult& actual,
                                             const gradengine::ForwardResult& expected);
// Compares the output too unless `compare_output` is false (skip_output).
::testing::AssertionResult SameGradientResult(const gradengine::GradientResult& actual,
                                              const gradengine::GradientResult& expected,
                                              bool compare_output = true);

// Sends `request` through `server`'s stub and expects the reply to equal `engine`'s result bit
// for bit (the output too unless `skip_output`, which is also sent).
void ExpectGradientsMatchEngine(TestServer& server, gradengine::Engine& engine,
                                const gradengine::GradientRequest& request,
                                bool skip_output = false);

// A test suite's server and reference engine, made once for the suite. Both compute with
// kThreadsPerRequest threads per call, so that their results are bit-identical (oneDNN's
// reductions depend on the thread count); kMaxConcurrentRequests calls compute at once on the
// server.
template <int kThreadsPerRequest, int kMaxConcurrentRequests>
class ServerAndEngineTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    gradserver::ServerOptions options;
    options.threads_per_request = kThreadsPerRequest;
    options.max_concurrent_requests = kMaxConcurrentRequests;
    server_ = StartTestServer(options).release();
    engine_ = MakeReferenceEngine(kThreadsPerRequest).release();
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
    delete engine_;
    engine_ = nullptr;
  }
  void SetUp() override {
    ASSERT_NE(server_, nullptr);
    ASSERT_NE(engine_, nullptr);
  }

  inline static TestServer* server_ = nullptr;
  inline static gradengine::Engine* engine_ = nullptr;
};

// A request that passes the wire decoder but that the engine refuses at once
// (layers[0].conv2d.groups=3 does not divide in_channels=4): it holds a compute slot for
// microseconds. Used to probe whether the slots are free.
grad::v1::ComputeGradientsRequest InstantlyRefusedRequest();

// Whether every compute slot of a server with max_queued_requests=0 is taken right now: the
// probe above is refused with RESOURCE_EXHAUSTED (taken) rather than INVALID_ARGUMENT (free).
bool ComputeSlotsBusy(grad::v1::GradientService::Stub& stub);

// Probes until the slots are busy (true) or `give_up` becomes true or `timeout` passes (false).
bool WaitUntilComputeSlotsBusy(grad::v1::GradientService::Stub& stub,
                               std::chrono::steady_clock::duration timeout,
                               const std::atomic<bool>& give_up);

// Probes until a slot is free; returns how long that took, or `timeout` if it never was.
std::chrono::steady_clock::duration WaitUntilComputeSlotFree(
    grad::v1::GradientService::Stub& stub, std::chrono::steady_clock::duration timeout);

// A context whose deadline is `timeout` from now.
std::unique_ptr<grpc::ClientContext> ContextWithTimeout(std::chrono::milliseconds timeout);

// Calls the unary `method` ("/package.Service/Method") with `request` as the message bytes,
// whatever they are, and stores the response's bytes in `response`.
grpc::Status RawUnaryCall(grpc::Channel* channel, const std::string& method,
                          const std::string& request, std::string* response,
                          std::chrono::milliseconds timeout = std::chrono::seconds(30));

// A streaming call of any kind on raw bytes, driven step by step; each step fails the test and
// returns false if it does not complete within 30 s. Not thread-safe.
class RawStream {
 public:
  // `metadata` is sent with the call (e.g. {"authorization", "Bearer ..."}).
  RawStream(std::shared_ptr<grpc::Channel> channel, const std::string& method,
            const std::vector<std::pair<std::string, std::string>>& metadata = {});
  // Cancels the call if it has not finished.
  ~RawStream();

  bool Write(const std::string& message);
  bool WritesDone();
  // False at the end of the stream.
  bool Read(std::string* message);
  void Cancel() { context_.TryCancel(); }
  grpc::Status Finish();

 private:
  bool Await(void* tag);

  grpc::ClientContext context_;
  grpc::CompletionQueue queue_;
  grpc::GenericStub stub_;
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> call_;
  bool started_ = false;
  bool finished_ = false;
};

// The bytes of a message's fields, from its serialized form: field number -> values, each a
// varint (as a decimal string) or a length-delimited payload. Fails the test on bad bytes.
std::multimap<int, std::string> WireFields(const std::string& bytes);

}  // namespace gradservicetest

#endif  // TESTS_SERVICE_SERVICE_TEST_UTIL_H_
