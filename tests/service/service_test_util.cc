#include "tests/service/service_test_util.h"

#include <google/protobuf/unknown_field_set.h>

#include <cstring>
#include <random>
#include <thread>
#include <utility>

#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "proto/wire.h"

namespace gradservicetest {

using gradengine::ActivationKind;
using gradengine::ActivationSpec;
using gradengine::Conv2dSpec;
using gradengine::LayerSpec;
using gradengine::NetworkSpec;
using gradengine::Tensor;

std::shared_ptr<grpc::Channel> MakeChannel(const std::string& target, bool own_connection) {
  grpc::ChannelArguments arguments;
  arguments.SetMaxReceiveMessageSize(-1);
  arguments.SetMaxSendMessageSize(-1);
  if (own_connection) arguments.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  return grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), arguments);
}

std::unique_ptr<TestServer> StartTestServer(gradserver::ServerOptions options, bool log_requests,
                                            const std::string& address) {
  options.address = address;
  options.log_requests = log_requests;
  absl::StatusOr<std::unique_ptr<gradserver::Server>> server = gradserver::Server::Create(options);
  EXPECT_TRUE(server.ok()) << server.status();
  if (!server.ok()) return nullptr;
  auto test_server = std::make_unique<TestServer>();
  test_server->server = *std::move(server);
  test_server->target = absl::StartsWith(address, "unix:")
                            ? address
                            : absl::StrCat("127.0.0.1:", test_server->server->port());
  test_server->channel = MakeChannel(test_server->target);
  test_server->stub = grad::v1::GradientService::NewStub(test_server->channel);
  return test_server;
}

std::unique_ptr<gradengine::Engine> MakeReferenceEngine(int threads_per_request) {
  gradengine::EngineOptions options;
  options.threads_per_call = threads_per_request;
  absl::StatusOr<std::unique_ptr<gradengine::Engine>> engine = gradengine::Engine::Create(options);
  EXPECT_TRUE(engine.ok()) << engine.status();
  return engine.ok() ? *std::move(engine) : nullptr;
}

namespace {

Tensor RandomTensor(std::vector<int64_t> shape, std::mt19937* rng) {
  int64_t count = 1;
  for (int64_t d : shape) count *= d;
  std::normal_distribution<float> normal;
  std::vector<float> values(static_cast<size_t>(count));
  for (float& v : values) v = normal(*rng);
  return Tensor(std::move(shape), std::move(values));
}

LayerSpec Conv(const std::string& name, Conv2dSpec spec) { return LayerSpec{name, spec}; }
LayerSpec Act(const std::string& name, ActivationSpec spec) { return LayerSpec{name, spec}; }

}  // namespace

gradengine::ForwardRequest OwnedCase::ForwardRequest() const {
  gradengine::ForwardRequest request;
  request.network = network;
  request.input = input.view();
  for (const auto& [name, tensor] : parameters) request.parameters[name] = tensor.view();
  return request;
}

gradengine::GradientRequest OwnedCase::GradientRequest(
    gradengine::ObjectiveKind objective, const gradengine::GradientSelection& gradients) const {
  gradengine::GradientRequest request;
  request.network = network;
  request.input = input.view();
  for (const auto& [name, tensor] : parameters) request.parameters[name] = tensor.view();
  request.objective.kind = objective;
  if (objective != gradengine::ObjectiveKind::kSum) request.objective.tensor = output_like.view();
  request.gradients = gradients;
  return request;
}

OwnedCase MakeCase(const NetworkSpec& network, std::vector<int64_t> input_shape, uint32_t seed) {
  OwnedCase c;
  c.network = network;
  absl::StatusOr<gradengine::ValidatedNetwork> validated =
      gradengine::ValidateNetwork(network, input_shape, int64_t{1} << 40);
  EXPECT_TRUE(validated.ok()) << validated.status();
  if (!validated.ok()) return c;
  std::mt19937 rng(seed);
  c.input = RandomTensor(std::move(input_shape), &rng);
  for (const gradengine::ParameterInfo& parameter : validated->parameters) {
    // Learnable parameters random; buffers (running statistics) only where required, at their
    // initial values (a random variance could be negative).
    if (parameter.trainable) {
      c.parameters[parameter.name] = RandomTensor(parameter.shape, &rng);
    } else if (parameter.required) {
      int64_t count = 1;
      for (int64_t d : parameter.shape) count *= d;
      c.parameters[parameter.name] =
          Tensor(parameter.shape, std::vector<float>(static_cast<size_t>(count), parameter.fill));
    }
  }
  c.output_like = RandomTensor(validated->output_shapes.back(), &rng);
  return c;
}

OwnedCase SmallCase(const std::string& name) {
  NetworkSpec network;
  if (name == "conv_relu_conv_tanh") {
    network.layers = {
        Conv("conv1", Conv2dSpec::Square(3, 8, 3, /*stride=*/1, /*padding=*/1, /*bias=*/true)),
        Act("relu1", ActivationSpec{ActivationKind::kRelu}),
        Conv("conv2", Conv2dSpec::Square(8, 4, 3, /*stride=*/2, /*padding=*/0, /*bias=*/false)),
        Act("tanh2", ActivationSpec{ActivationKind::kTanh}),
    };
    return MakeCase(network, {2, 3, 12, 12}, 11);
  }
  if (name == "grouped_dilated") {
    Conv2dSpec grouped = Conv2dSpec::Square(4, 8, 3, 1, 0, true);
    grouped.groups = 2;
    grouped.dilation_h = 2;
    grouped.pad_top = 2;
    grouped.pad_bottom = 1;
    grouped.pad_left = 0;
    grouped.pad_right = 3;
    Conv2dSpec pointwise = Conv2dSpec::Square(8, 6, 1, 1, 0, true);
    pointwise.stride_w = 2;
    network.layers = {
        Conv("grouped", grouped),
        Act("leaky", ActivationSpec::LeakyRelu(0.1f)),
        Conv("pointwise", pointwise),
        Act("elu", ActivationSpec::Elu(0.7f)),
        Act("sigmoid", ActivationSpec{ActivationKind::kSigmoid}),
    };
    return MakeCase(network, {1, 4, 11, 9}, 22);
  }
  if (name == "gelu_chain") {
    Conv2dSpec wide = Conv2dSpec::Square(2, 5, 1, 1, 0, false);
    wide.kernel_w = 3;
    wide.pad_left = wide.pad_right = 1;
    Conv2dSpec tall = Conv2dSpec::Square(5, 3, 1, 1, 0, true);
    tall.kernel_h = 4;
    network.layers = {
        Conv("wide", wide),
        Act("gelu", ActivationSpec{ActivationKind::kGeluErf}),
        Conv("tall", tall),
        Act("gelu_tanh", ActivationSpec{ActivationKind::kGeluTanh}),
        Act("relu", ActivationSpec{ActivationKind::kRelu}),
    };
    return MakeCase(network, {3, 2, 8, 8}, 33);
  }
  ADD_FAILURE() << "unknown small case " << name;
  return OwnedCase();
}

std::vector<std::string> SmallCaseNames() {
  return {"conv_relu_conv_tanh", "grouped_dilated", "gelu_chain"};
}

OwnedCase DeepCase(int layers, int64_t batch, int64_t channels, int64_t size) {
  NetworkSpec network;
  for (int i = 1; i <= layers; ++i) {
    network.layers.push_back(
        Conv(absl::StrCat("conv", i), Conv2dSpec::Square(channels, channels, 3, 1, 1, true)));
    network.layers.push_back(Act(absl::StrCat("relu", i), ActivationSpec{ActivationKind::kRelu}));
  }
  return MakeCase(network, {batch, channels, size, size}, 44);
}

::testing::AssertionResult SameTensor(const std::string& what, const Tensor& actual,
                                      const Tensor& expected) {
  if (actual.shape != expected.shape) {
    return ::testing::AssertionFailure()
           << what << ": shape " << gradengine::ShapeToString(actual.shape) << " != expected "
           << gradengine::ShapeToString(expected.shape);
  }
  if (actual.data.size() != expected.data.size()) {
    return ::testing::AssertionFailure()
           << what << ": " << actual.data.size() << " values != expected " << expected.data.size();
  }
  for (size_t i = 0; i < actual.data.size(); ++i) {
    if (std::memcmp(&actual.data[i], &expected.data[i], sizeof(float)) != 0) {
      return ::testing::AssertionFailure() << what << "[" << i << "] = " << actual.data[i]
                                           << ", expected exactly " << expected.data[i];
    }
  }
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult SameForwardResult(const gradengine::ForwardResult& actual,
                                             const gradengine::ForwardResult& expected) {
  return SameTensor("output", actual.output, expected.output);
}

::testing::AssertionResult SameGradientResult(const gradengine::GradientResult& actual,
                                              const gradengine::GradientResult& expected,
                                              bool compare_output) {
  if (compare_output) {
    if (auto same = SameTensor("output", actual.output, expected.output); !same) return same;
  } else if (!actual.output.data.empty()) {
    return ::testing::AssertionFailure() << "output was returned though skip_output was set";
  }
  if (actual.loss.has_value() != expected.loss.has_value()) {
    return ::testing::AssertionFailure()
           << "loss is " << (actual.loss ? "present" : "absent") << ", expected the opposite";
  }
  if (actual.loss && std::memcmp(&*actual.loss, &*expected.loss, sizeof(double)) != 0) {
    return ::testing::AssertionFailure()
           << "loss = " << *actual.loss << ", expected exactly " << *expected.loss;
  }
  if (actual.input_grad.has_value() != expected.input_grad.has_value()) {
    return ::testing::AssertionFailure()
           << "input_grad is " << (actual.input_grad ? "present" : "absent")
           << ", expected the opposite";
  }
  if (actual.input_grad) {
    if (auto same = SameTensor("input_grad", *actual.input_grad, *expected.input_grad); !same) {
      return same;
    }
  }
  if (actual.parameter_grads.size() != expected.parameter_grads.size()) {
    return ::testing::AssertionFailure()
           << actual.parameter_grads.size() << " parameter gradients, expected "
           << expected.parameter_grads.size();
  }
  for (const auto& [name, tensor] : expected.parameter_grads) {
    auto it = actual.parameter_grads.find(name);
    if (it == actual.parameter_grads.end()) {
      return ::testing::AssertionFailure() << "no gradient for " << name;
    }
    if (auto same = SameTensor(name + ".grad", it->second, tensor); !same) return same;
  }
  return ::testing::AssertionSuccess();
}

void ExpectGradientsMatchEngine(TestServer& server, gradengine::Engine& engine,
                                const gradengine::GradientRequest& request, bool skip_output) {
  grad::v1::ComputeGradientsRequest wire;
  gradwire::EncodeGradientRequest(request, &wire);
  wire.set_skip_output(skip_output);
  grad::v1::ComputeGradientsResponse response;
  grpc::ClientContext context;
  grpc::Status status = server.stub->ComputeGradients(&context, wire, &response);
  ASSERT_TRUE(status.ok()) << status.error_code() << ": " << status.error_message();
  absl::StatusOr<gradengine::GradientResult> actual = gradwire::DecodeGradientResult(response);
  ASSERT_TRUE(actual.ok()) << actual.status();
  absl::StatusOr<gradengine::GradientResult> expected = engine.ComputeGradients(request);
  ASSERT_TRUE(expected.ok()) << expected.status();
  EXPECT_TRUE(SameGradientResult(*actual, *expected, !skip_output));
}

grad::v1::ComputeGradientsRequest InstantlyRefusedRequest() {
  NetworkSpec network;
  Conv2dSpec grouped = Conv2dSpec::Square(4, 6, 1, 1, 0, false);
  network.layers = {Conv("probe", grouped)};
  const OwnedCase c = MakeCase(network, {1, 4, 2, 2}, 5);
  gradengine::GradientRequest request = c.GradientRequest(gradengine::ObjectiveKind::kSum);
  grad::v1::ComputeGradientsRequest wire;
  gradwire::EncodeGradientRequest(request, &wire);
  wire.mutable_network()->mutable_layers(0)->mutable_conv2d()->set_groups(3);
  wire.set_request_id("probe");
  return wire;
}

bool ComputeSlotsBusy(grad::v1::GradientService::Stub& stub) {
  static const grad::v1::ComputeGradientsRequest* const probe =
      new grad::v1::ComputeGradientsRequest(InstantlyRefusedRequest());
  grad::v1::ComputeGradientsResponse response;
  std::unique_ptr<grpc::ClientContext> context = ContextWithTimeout(std::chrono::seconds(30));
  const grpc::Status status = stub.ComputeGradients(context.get(), *probe, &response);
  if (status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) return true;
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
  return false;
}

bool WaitUntilComputeSlotsBusy(grad::v1::GradientService::Stub& stub,
                               std::chrono::steady_clock::duration timeout,
                               const std::atomic<bool>& give_up) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!give_up && std::chrono::steady_clock::now() < deadline) {
    if (ComputeSlotsBusy(stub)) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return false;
}

std::chrono::steady_clock::duration WaitUntilComputeSlotFree(
    grad::v1::GradientService::Stub& stub, std::chrono::steady_clock::duration timeout) {
  const auto start = std::chrono::steady_clock::now();
  while (std::chrono::steady_clock::now() - start < timeout) {
    if (!ComputeSlotsBusy(stub)) return std::chrono::steady_clock::now() - start;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return timeout;
}

std::unique_ptr<grpc::ClientContext> ContextWithTimeout(std::chrono::milliseconds timeout) {
  auto context = std::make_unique<grpc::ClientContext>();
  context->set_deadline(std::chrono::system_clock::now() + timeout);
  return context;
}

namespace {

std::string BufferBytes(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  std::string bytes;
  if (!buffer.Dump(&slices).ok()) return bytes;
  for (const grpc::Slice& slice : slices) {
    bytes.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  }
  return bytes;
}

grpc::ByteBuffer BytesBuffer(const std::string& bytes) {
  grpc::Slice slice(bytes);
  return grpc::ByteBuffer(&slice, 1);
}

constexpr std::chrono::seconds kStepTimeout(30);

}  // namespace

grpc::Status RawUnaryCall(grpc::Channel* channel, const std::string& method,
                          const std::string& request, std::string* response,
                          std::chrono::milliseconds timeout) {
  grpc::GenericStub stub(std::shared_ptr<grpc::Channel>(channel, [](grpc::Channel*) {}));
  std::unique_ptr<grpc::ClientContext> context = ContextWithTimeout(timeout);
  grpc::ByteBuffer request_buffer = BytesBuffer(request);
  grpc::ByteBuffer response_buffer;
  grpc::Status status;
  absl::Notification done;
  stub.UnaryCall(context.get(), method, grpc::StubOptions(), &request_buffer, &response_buffer,
                 [&](grpc::Status s) {
                   status = std::move(s);
                   done.Notify();
                 });
  done.WaitForNotification();
  if (status.ok()) *response = BufferBytes(response_buffer);
  return status;
}

RawStream::RawStream(std::shared_ptr<grpc::Channel> channel, const std::string& method,
                     const std::vector<std::pair<std::string, std::string>>& metadata)
    : stub_(std::move(channel)) {
  for (const auto& [key, value] : metadata) context_.AddMetadata(key, value);
  call_ = stub_.PrepareCall(&context_, method, &queue_);
  call_->StartCall(&call_);
  started_ = Await(&call_);
}

RawStream::~RawStream() {
  if (!finished_) {
    context_.TryCancel();
    Finish();
  }
  queue_.Shutdown();
  void* tag;
  bool ok;
  while (queue_.Next(&tag, &ok)) {
  }
}

bool RawStream::Await(void* tag) {
  void* got = nullptr;
  bool ok = false;
  const grpc::CompletionQueue::NextStatus next =
      queue_.AsyncNext(&got, &ok, std::chrono::system_clock::now() + kStepTimeout);
  if (next != grpc::CompletionQueue::GOT_EVENT) {
    ADD_FAILURE() << "a streaming step did not complete in time";
    return false;
  }
  EXPECT_EQ(got, tag);
  return ok;
}

bool RawStream::Write(const std::string& message) {
  if (!started_) return false;
  grpc::ByteBuffer buffer = BytesBuffer(message);
  call_->Write(buffer, &buffer);
  return Await(&buffer);
}

bool RawStream::WritesDone() {
  if (!started_) return false;
  call_->WritesDone(&call_);
  return Await(&call_);
}

bool RawStream::Read(std::string* message) {
  if (!started_) return false;
  grpc::ByteBuffer buffer;
  call_->Read(&buffer, &buffer);
  if (!Await(&buffer)) return false;
  *message = BufferBytes(buffer);
  return true;
}

grpc::Status RawStream::Finish() {
  grpc::Status status;
  finished_ = true;
  call_->Finish(&status, &status);
  if (!Await(&status) && status.ok()) {
    return grpc::Status(grpc::StatusCode::UNKNOWN, "Finish did not complete");
  }
  return status;
}

std::multimap<int, std::string> WireFields(const std::string& bytes) {
  std::multimap<int, std::string> fields;
  google::protobuf::UnknownFieldSet set;
  if (!set.ParseFromString(bytes)) {
    ADD_FAILURE() << "not a protobuf message: " << bytes.size() << " bytes";
    return fields;
  }
  for (int i = 0; i < set.field_count(); ++i) {
    const google::protobuf::UnknownField& field = set.field(i);
    switch (field.type()) {
      case google::protobuf::UnknownField::TYPE_VARINT:
        fields.emplace(field.number(), absl::StrCat(field.varint()));
        break;
      case google::protobuf::UnknownField::TYPE_LENGTH_DELIMITED:
        fields.emplace(field.number(), field.length_delimited());
        break;
      default:
        ADD_FAILURE() << "field " << field.number() << " has an unexpected wire type";
    }
  }
  return fields;
}

}  // namespace gradservicetest
