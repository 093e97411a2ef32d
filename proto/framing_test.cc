#include "proto/framing.h"

#include <grpcpp/support/proto_buffer_reader.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "google/protobuf/util/message_differencer.h"
#include "gtest/gtest.h"
#include "proto/wire.h"

namespace gradwire {
namespace {

using gradengine::ObjectiveKind;
using gradengine::Tensor;
using gradengine::TensorBuffer;

// Over 16 MiB (4.5 Mi floats = 18 MiB), so that a tensor spans many of gRPC's slices.
constexpr size_t kLargeElements = size_t{9} << 19;

TensorBuffer Filled(size_t elements, float seed) {
  TensorBuffer buffer = TensorBuffer::Uninitialized(elements);
  for (size_t i = 0; i < elements; ++i) buffer[i] = seed + static_cast<float>(i % 1013) * 0.5f;
  return buffer;
}

// A network, parameters and tensors of every size class: empty, one element, small enough to
// be copied into the frame, and large (> 16 MiB).
struct Sample {
  gradengine::NetworkSpec network;
  Tensor input;
  std::map<std::string, Tensor> parameters;
  Tensor target;

  gradengine::ParameterViews Views() const {
    gradengine::ParameterViews views;
    for (const auto& [name, tensor] : parameters) views[name] = tensor.view();
    return views;
  }
  gradengine::ForwardRequest Forward() const {
    gradengine::ForwardRequest request;
    request.network = network;
    request.parameters = Views();
    request.input = input.view();
    return request;
  }
};

Sample MakeSample(size_t input_elements) {
  Sample sample;
  sample.network.layers.push_back({"conv1", gradengine::Conv2dSpec::Square(3, 8, 3, 1, 1)});
  sample.network.layers.push_back({"act", gradengine::ActivationSpec::LeakyRelu(0.1f)});
  sample.input = Tensor({1, 3, static_cast<int64_t>(input_elements / 3), 1},
                        Filled(input_elements / 3 * 3, 1.0f));
  sample.parameters["conv1.weight"] = Tensor({8, 3, 3, 3}, Filled(8 * 27, -2.0f));
  sample.parameters["conv1.bias"] = Tensor({8}, Filled(8, 3.0f));
  sample.parameters["empty"] = Tensor({0, 4}, TensorBuffer());
  sample.parameters["scalar"] = Tensor({}, Filled(1, 7.0f));
  sample.target = Tensor({2, 1}, Filled(2, 0.25f));
  return sample;
}

// The frame's bytes must be exactly protobuf's serialization of `full`, and parse back to it.
template <typename Message>
void ExpectSameAsSerializer(const Frame& frame, const Message& full) {
  const std::string framed = frame.Flatten();
  ASSERT_EQ(framed.size(), frame.size());
  EXPECT_TRUE(framed == full.SerializeAsString())
      << "framed " << framed.size() << " bytes, serializer " << full.ByteSizeLong();
  Message parsed;
  ASSERT_TRUE(parsed.ParseFromString(framed));
  EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(parsed, full));
}

// The same through gRPC's slices: parsed by protobuf's stream parser from the ByteBuffer.
template <typename Message>
void ExpectByteBufferParses(Frame frame, const Message& full) {
  grpc::ByteBuffer buffer = std::move(frame).ToByteBuffer();
  grpc::ProtoBufferReader reader(&buffer);
  Message parsed;
  ASSERT_TRUE(parsed.ParseFromZeroCopyStream(&reader));
  EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(parsed, full));
}

// Whether some slice of `buffer` begins at `data` (the bytes were referenced, not copied).
bool HasSliceAt(const grpc::ByteBuffer& buffer, const void* data) {
  std::vector<grpc::Slice> slices;
  if (!buffer.Dump(&slices).ok()) return false;
  for (const grpc::Slice& slice : slices) {
    if (slice.begin() == data) return true;
  }
  return false;
}

class FramingTest : public ::testing::TestWithParam<size_t> {};

TEST_P(FramingTest, ForwardRequestIsWhatTheSerializerWrites) {
  const Sample sample = MakeSample(GetParam());
  const gradengine::ForwardRequest request = sample.Forward();

  grad::v1::ForwardRequest full;
  EncodeForwardRequest(request, &full);
  full.set_request_id("abc");
  grad::v1::ForwardRequest skeleton;
  EncodeForwardRequest(request, &skeleton, /*tensor_data=*/false);
  skeleton.set_request_id("abc");
  ExpectSameAsSerializer(FrameForwardRequest(skeleton, request, nullptr), full);
  ExpectByteBufferParses(FrameForwardRequest(skeleton, request, nullptr), full);

  // With a placement too.
  full.mutable_placement()->mutable_output()->set_region("r");
  *skeleton.mutable_placement() = full.placement();
  ExpectSameAsSerializer(FrameForwardRequest(skeleton, request, nullptr), full);
}

TEST_P(FramingTest, GradientRequestIsWhatTheSerializerWritesForEveryObjective) {
  const Sample sample = MakeSample(GetParam());
  for (ObjectiveKind objective :
       {ObjectiveKind::kMse, ObjectiveKind::kSum, ObjectiveKind::kGradOutput}) {
    for (bool skip_output : {false, true}) {
      SCOPED_TRACE(std::string(gradengine::ObjectiveName(objective)) +
                   (skip_output ? " skip_output" : ""));
      gradengine::GradientRequest request;
      request.network = sample.network;
      request.parameters = sample.Views();
      request.input = sample.input.view();
      request.objective.kind = objective;
      if (objective != ObjectiveKind::kSum) request.objective.tensor = sample.target.view();
      request.gradients.all_parameters = false;
      request.gradients.parameters = {"conv1.weight"};
      request.gradients.input = !skip_output;

      grad::v1::ComputeGradientsRequest full;
      EncodeGradientRequest(request, &full);
      full.set_request_id("id-1");
      full.set_skip_output(skip_output);
      grad::v1::ComputeGradientsRequest skeleton;
      EncodeGradientRequest(request, &skeleton, /*tensor_data=*/false);
      skeleton.set_request_id("id-1");
      skeleton.set_skip_output(skip_output);
      ExpectSameAsSerializer(FrameGradientRequest(skeleton, request, nullptr), full);
      ExpectByteBufferParses(FrameGradientRequest(skeleton, request, nullptr), full);
    }
  }
}

TEST_P(FramingTest, ResponsesAreWhatTheSerializerWrites) {
  const size_t elements = GetParam();
  gradengine::GradientResult result;
  result.output = Tensor({static_cast<int64_t>(elements)}, Filled(elements, 1.0f));
  result.loss = 0.125;
  result.input_grad = Tensor({0}, TensorBuffer());
  result.parameter_grads["a.weight"] = Tensor({3, 2}, Filled(6, 2.0f));
  result.parameter_grads["b.bias"] =
      Tensor({static_cast<int64_t>(elements)}, Filled(elements, 3.0f));
  grad::v1::Timing timing;
  timing.set_decode_ns(5);
  timing.set_backward_ns(7);
  for (bool include_output : {true, false}) {
    grad::v1::ComputeGradientsResponse full;
    EncodeGradientResult(result, include_output, &full);
    full.set_request_id("r");
    *full.mutable_timing() = timing;
    grad::v1::ComputeGradientsResponse skeleton;
    EncodeGradientResponseSkeleton(result, include_output, grad::v1::ResultPlacement(), &skeleton);
    skeleton.set_request_id("r");
    *skeleton.mutable_timing() = timing;
    ExpectSameAsSerializer(FrameGradientResponse(skeleton, result), full);
    ExpectByteBufferParses(FrameGradientResponse(skeleton, result), full);
  }

  gradengine::ForwardResult forward;
  forward.output = Tensor({2, static_cast<int64_t>(elements)}, Filled(2 * elements, 4.0f));
  grad::v1::ForwardResponse full;
  EncodeForwardResult(forward, &full);
  full.set_request_id("f");
  *full.mutable_timing() = timing;
  grad::v1::ForwardResponse skeleton;
  EncodeForwardResponseSkeleton(forward, grad::v1::ResultPlacement(), &skeleton);
  skeleton.set_request_id("f");
  *skeleton.mutable_timing() = timing;
  ExpectSameAsSerializer(FrameForwardResponse(skeleton, forward), full);
  ExpectByteBufferParses(FrameForwardResponse(skeleton, forward), full);
}

INSTANTIATE_TEST_SUITE_P(Sizes, FramingTest,
                         ::testing::Values(size_t{3}, size_t{3000}, kLargeElements));

TEST(FramingTest, LargeTensorsAreReferencedNotCopied) {
  const Sample sample = MakeSample(kLargeElements);
  const gradengine::ForwardRequest request = sample.Forward();
  grad::v1::ForwardRequest skeleton;
  EncodeForwardRequest(request, &skeleton, /*tensor_data=*/false);

  auto owner = std::make_shared<int>(0);
  Frame frame = FrameForwardRequest(skeleton, request, owner);
  EXPECT_GE(frame.external_bytes(), sample.input.data.size() * sizeof(float));
  {
    grpc::ByteBuffer buffer = std::move(frame).ToByteBuffer();
    EXPECT_TRUE(HasSliceAt(buffer, sample.input.data.data()));
    EXPECT_GT(owner.use_count(), 1) << "the slices must hold the owner";
  }
  EXPECT_EQ(owner.use_count(), 1) << "released with the slices";

  // A result's buffer becomes the response's slice, and keeps its memory alive.
  gradengine::ForwardResult result;
  result.output = Tensor({static_cast<int64_t>(kLargeElements)}, Filled(kLargeElements, 1.0f));
  const float* data = result.output.data.data();
  grad::v1::ForwardResponse response;
  EncodeForwardResponseSkeleton(result, grad::v1::ResultPlacement(), &response);
  grpc::ByteBuffer buffer = FrameForwardResponse(response, result).ToByteBuffer();
  result = gradengine::ForwardResult();  // the slice alone keeps the bytes now
  EXPECT_TRUE(HasSliceAt(buffer, data));
  grpc::ProtoBufferReader reader(&buffer);
  grad::v1::ForwardResponse parsed;
  ASSERT_TRUE(parsed.ParseFromZeroCopyStream(&reader));
  absl::StatusOr<gradengine::ForwardResult> decoded = TakeForwardResult(&parsed);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  ASSERT_EQ(decoded->output.data.size(), kLargeElements);
  EXPECT_EQ(decoded->output.data, Filled(kLargeElements, 1.0f));
  EXPECT_TRUE(parsed.output().data().empty()) << "TakeForwardResult takes the bytes over";
}

TEST(FramingTest, SharedMemoryTensorsCarryNoBytes) {
  const Sample sample = MakeSample(3000);
  const gradengine::ForwardRequest request = sample.Forward();
  grad::v1::ForwardRequest skeleton;
  EncodeForwardRequest(request, &skeleton, /*tensor_data=*/false);
  grad::v1::SharedMemoryRef* ref = skeleton.mutable_input()->mutable_shared_memory();
  ref->set_region("r");
  ref->set_offset(64);
  ref->set_byte_size(static_cast<int64_t>(sample.input.data.size() * sizeof(float)));
  const Frame frame = FrameForwardRequest(skeleton, request, nullptr);
  // The full message, but the input has a reference instead of bytes.
  grad::v1::ForwardRequest full;
  EncodeForwardRequest(request, &full);
  full.mutable_input()->clear_data();
  *full.mutable_input()->mutable_shared_memory() = *ref;
  ExpectSameAsSerializer(frame, full);
}

TEST(FramingTest, SharedMemoryReferencesOnParametersTheObjectiveAndResults) {
  const Sample sample = MakeSample(3000);
  gradengine::GradientRequest request;
  request.network = sample.network;
  request.parameters = sample.Views();
  request.input = sample.input.view();
  request.objective = {ObjectiveKind::kGradOutput, sample.target.view()};
  grad::v1::ComputeGradientsRequest full;
  EncodeGradientRequest(request, &full);
  grad::v1::ComputeGradientsRequest skeleton;
  EncodeGradientRequest(request, &skeleton, /*tensor_data=*/false);
  // conv1.weight and the objective's tensor in shared memory; results placed there too.
  for (auto* message : {&full, &skeleton}) {
    for (grad::v1::NamedTensor& named : *message->mutable_parameters()) {
      if (named.name() != "conv1.weight") continue;
      named.mutable_tensor()->clear_data();
      named.mutable_tensor()->mutable_shared_memory()->set_region("p");
      named.mutable_tensor()->mutable_shared_memory()->set_byte_size(8 * 27 * 4);
    }
    grad::v1::Tensor* grad_output = message->mutable_objective()->mutable_grad_output();
    grad_output->clear_data();
    grad_output->mutable_shared_memory()->set_region("o");
    grad_output->mutable_shared_memory()->set_byte_size(8);
    message->mutable_placement()->mutable_output()->set_region("r");
    grad::v1::NamedSharedMemoryRef* placed = message->mutable_placement()->add_parameter_grads();
    placed->set_name("conv1.bias");
    placed->mutable_ref()->set_offset(4096);
  }
  ExpectSameAsSerializer(FrameGradientRequest(skeleton, request, nullptr), full);

  // A response whose output and one gradient were placed, without a loss, and with a loss
  // of exactly 0 (present, so written).
  gradengine::GradientResult result;
  result.output = Tensor({2, 1}, Filled(2, 1.0f));
  result.parameter_grads["conv1.bias"] = Tensor({8}, Filled(8, 2.0f));
  result.parameter_grads["conv1.weight"] = Tensor({8, 3, 3, 3}, Filled(216, 3.0f));
  for (std::optional<double> loss : {std::optional<double>(), std::optional<double>(0.0)}) {
    result.loss = loss;
    grad::v1::ComputeGradientsResponse response_skeleton;
    EncodeGradientResponseSkeleton(result, /*include_output=*/true, full.placement(),
                                   &response_skeleton);
    EXPECT_TRUE(response_skeleton.output().has_shared_memory());
    EXPECT_EQ(response_skeleton.has_loss(), loss.has_value());
    grad::v1::ComputeGradientsResponse response_full;
    EncodeGradientResult(result, /*include_output=*/true, &response_full);
    response_full.mutable_output()->clear_data();
    *response_full.mutable_output()->mutable_shared_memory() = full.placement().output();
    for (grad::v1::NamedTensor& named : *response_full.mutable_parameter_grads()) {
      if (named.name() != "conv1.bias") continue;
      named.mutable_tensor()->clear_data();
      *named.mutable_tensor()->mutable_shared_memory() = full.placement().parameter_grads(0).ref();
    }
    ExpectSameAsSerializer(FrameGradientResponse(response_skeleton, result), response_full);
  }
}

TEST(FramingCrossEntropyTest, GradientRequestIsWhatTheSerializerWrites) {
  // Enough labels (> kMinExternalBytes) to be referenced rather than copied.
  std::vector<int64_t> labels(300);
  for (size_t i = 0; i < labels.size(); ++i) labels[i] = static_cast<int64_t>(i % 7) - 1;
  std::vector<float> input(2 * 3 * 4 * 4, 0.5f);
  for (int64_t ignore_index : {int64_t{-100}, int64_t{-1}}) {
    gradengine::GradientRequest request;
    request.network.layers.push_back({"fc", gradengine::LinearSpec{48, 7, true}});
    request.input = gradengine::TensorView({2, 3, 4, 4}, input);
    request.objective.kind = gradengine::ObjectiveKind::kCrossEntropy;
    request.objective.labels = {{300}, labels.data(), 300};
    request.objective.label_smoothing = 0.25;
    request.objective.ignore_index = ignore_index;
    grad::v1::ComputeGradientsRequest full;
    EncodeGradientRequest(request, &full);
    grad::v1::ComputeGradientsRequest skeleton;
    EncodeGradientRequest(request, &skeleton, /*tensor_data=*/false);
    const Frame frame = FrameGradientRequest(skeleton, request, nullptr);
    EXPECT_EQ(frame.Flatten(), full.SerializeAsString());
    EXPECT_GE(frame.external_bytes(), labels.size() * sizeof(int64_t));
  }
}

TEST(FramingCrossEntropyTest, ResponsesCarryRunningStats) {
  gradengine::GradientResult result;
  result.output = gradengine::Tensor({1, 2}, {1, 2});
  result.loss = 0.5;
  result.parameter_grads["bn.weight"] = gradengine::Tensor({2}, {3, 4});
  result.running_stats["bn.running_mean"] = gradengine::Tensor({2}, {5, 6});
  result.running_stats["bn.running_var"] = gradengine::Tensor({300}, std::vector<float>(300, 7));
  grad::v1::ComputeGradientsResponse full;
  EncodeGradientResult(result, /*include_output=*/true, &full);
  full.set_request_id("r");
  full.mutable_timing()->set_forward_ns(1);
  grad::v1::ComputeGradientsResponse skeleton;
  EncodeGradientResponseSkeleton(result, true, grad::v1::ResultPlacement(), &skeleton);
  skeleton.set_request_id("r");
  skeleton.mutable_timing()->set_forward_ns(1);
  EXPECT_EQ(FrameGradientResponse(skeleton, result).Flatten(), full.SerializeAsString());

  gradengine::ForwardResult forward;
  forward.output = gradengine::Tensor({1}, {1});
  forward.running_stats = result.running_stats;
  grad::v1::ForwardResponse forward_full;
  EncodeForwardResult(forward, &forward_full);
  forward_full.set_request_id("f");
  grad::v1::ForwardResponse forward_skeleton;
  EncodeForwardResponseSkeleton(forward, grad::v1::ResultPlacement(), &forward_skeleton);
  forward_skeleton.set_request_id("f");
  EXPECT_EQ(FrameForwardResponse(forward_skeleton, forward).Flatten(),
            forward_full.SerializeAsString());
}

}  // namespace
}  // namespace gradwire
