#include "proto/framing.h"

#include <cstring>
#include <utility>

#include "google/protobuf/wire_format_lite.h"
#include "proto/wire.h"

namespace gradwire {
namespace {

using google::protobuf::internal::WireFormatLite;

// Referenced ranges shorter than this are copied: a slice of their own costs more than the
// copy.
constexpr size_t kMinExternalBytes = 1024;

// The owner of a referenced slice, freed when gRPC releases the slice.
void ReleaseOwner(void* owner) { delete static_cast<std::shared_ptr<const void>*>(owner); }

// A tensor field: the skeleton's header fields, then the bytes (unless the tensor is in shared
// memory, whose reference the skeleton already holds).
void AddTensor(Frame* frame, int field, const grad::v1::Tensor& header, const float* data,
               size_t elements, const std::shared_ptr<const void>& owner) {
  Frame tensor;
  tensor.AppendFields(header);
  if (!header.has_shared_memory() && elements > 0) {
    tensor.AddExternal(grad::v1::Tensor::kDataFieldNumber, data, elements * sizeof(float), owner);
  }
  frame->AddFrame(field, std::move(tensor));
}

void AddNamedTensor(Frame* frame, int field, const grad::v1::NamedTensor& skeleton,
                    const float* data, size_t elements, const std::shared_ptr<const void>& owner) {
  Frame named;
  if (!skeleton.name().empty()) {
    named.AddString(grad::v1::NamedTensor::kNameFieldNumber, skeleton.name());
  }
  if (skeleton.has_tensor()) {
    AddTensor(&named, grad::v1::NamedTensor::kTensorFieldNumber, skeleton.tensor(), data, elements,
              owner);
  }
  frame->AddFrame(field, std::move(named));
}

void AddResult(Frame* frame, int field, const grad::v1::Tensor& header,
               const gradengine::Tensor& tensor) {
  AddTensor(frame, field, header, tensor.data.data(), tensor.data.size(), tensor.data.owner());
}

// The cross-entropy objective: the target's header, then its int64 bytes as a referenced
// range, then the fields after the target.
void AddCrossEntropy(Frame* frame, int field, const grad::v1::CrossEntropy& skeleton,
                     const gradengine::LabelsView& labels,
                     const std::shared_ptr<const void>& owner) {
  Frame cross_entropy;
  if (skeleton.has_target()) {
    Frame target;
    target.AppendFields(skeleton.target());
    if (!skeleton.target().has_shared_memory() && labels.size > 0) {
      target.AddExternal(grad::v1::Tensor::kDataFieldNumber, labels.data,
                         static_cast<size_t>(labels.size) * sizeof(int64_t), owner);
    }
    cross_entropy.AddFrame(grad::v1::CrossEntropy::kTargetFieldNumber, std::move(target));
  }
  grad::v1::CrossEntropy rest = skeleton;
  rest.clear_target();
  cross_entropy.AppendFields(rest);
  frame->AddFrame(field, std::move(cross_entropy));
}

// Named results in the order of `tensors` (a map), which is the order the skeleton lists them.
void AddNamedResults(Frame* frame, int field,
                     const google::protobuf::RepeatedPtrField<grad::v1::NamedTensor>& skeleton,
                     const gradengine::ParameterTensors& tensors) {
  auto tensor = tensors.begin();
  for (const grad::v1::NamedTensor& named : skeleton) {
    AddNamedTensor(frame, field, named, tensor->second.data.data(), tensor->second.data.size(),
                   tensor->second.data.owner());
    ++tensor;
  }
}

// The headers of results that always travel as bytes (running statistics).
void AddNamedHeaders(const gradengine::ParameterTensors& tensors,
                     google::protobuf::RepeatedPtrField<grad::v1::NamedTensor>* out) {
  out->Reserve(static_cast<int>(tensors.size()));
  for (const auto& [name, tensor] : tensors) {
    grad::v1::NamedTensor* named = out->Add();
    named->set_name(name);
    EncodeTensorHeader(tensor.shape, named->mutable_tensor());
  }
}

// The fields both requests start with: network (1), parameters (2), input (3).
template <typename WireRequest, typename EngineRequest>
void FrameNetworkParametersInput(const WireRequest& skeleton, const EngineRequest& request,
                                 const std::shared_ptr<const void>& owner, Frame* frame) {
  if (skeleton.has_network())
    frame->AddMessage(WireRequest::kNetworkFieldNumber, skeleton.network());
  // The skeleton lists the parameters in the order EncodeParameters walked the map.
  auto view = request.parameters.begin();
  for (const grad::v1::NamedTensor& named : skeleton.parameters()) {
    AddNamedTensor(frame, WireRequest::kParametersFieldNumber, named, view->second.data,
                   static_cast<size_t>(view->second.size), owner);
    ++view;
  }
  if (skeleton.has_input()) {
    AddTensor(frame, WireRequest::kInputFieldNumber, skeleton.input(), request.input.data,
              static_cast<size_t>(request.input.size), owner);
  }
}

// The fields both responses end with: request_id, then timing.
template <typename WireResponse>
void AddRequestIdAndTiming(const WireResponse& skeleton, Frame* frame) {
  if (!skeleton.request_id().empty()) {
    frame->AddString(WireResponse::kRequestIdFieldNumber, skeleton.request_id());
  }
  if (skeleton.has_timing()) frame->AddMessage(WireResponse::kTimingFieldNumber, skeleton.timing());
}

void AddSharedRefOrHeader(const gradengine::Tensor& tensor, const grad::v1::SharedMemoryRef* ref,
                          grad::v1::Tensor* out) {
  EncodeTensorHeader(tensor.shape, out);
  if (ref != nullptr) *out->mutable_shared_memory() = *ref;
}

}  // namespace

void Frame::FlushPending() {
  if (!pending_.empty()) pieces_.push_back(Piece{std::move(pending_), nullptr, 0, nullptr});
  pending_.clear();
}

void Frame::AppendRaw(absl::string_view bytes) {
  pending_.append(bytes.data(), bytes.size());
  size_ += bytes.size();
}

void Frame::AppendVarint(uint64_t value) {
  char buffer[10];
  size_t n = 0;
  while (value >= 0x80) {
    buffer[n++] = static_cast<char>((value & 0x7f) | 0x80);
    value >>= 7;
  }
  buffer[n++] = static_cast<char>(value);
  AppendRaw(absl::string_view(buffer, n));
}

void Frame::AppendTag(int field, int wire_type) {
  AppendVarint((static_cast<uint64_t>(field) << 3) | static_cast<uint64_t>(wire_type));
}

void Frame::AddVarint(int field, uint64_t value) {
  AppendTag(field, WireFormatLite::WIRETYPE_VARINT);
  AppendVarint(value);
}

void Frame::AddDouble(int field, double value) {
  AppendTag(field, WireFormatLite::WIRETYPE_FIXED64);
  char bytes[sizeof(double)];
  std::memcpy(bytes, &value, sizeof(bytes));  // little-endian hosts only (wire.cc asserts it)
  AppendRaw(absl::string_view(bytes, sizeof(bytes)));
}

void Frame::AddString(int field, absl::string_view value) {
  AppendTag(field, WireFormatLite::WIRETYPE_LENGTH_DELIMITED);
  AppendVarint(value.size());
  AppendRaw(value);
}

void Frame::AddMessage(int field, const google::protobuf::MessageLite& message) {
  AddString(field, message.SerializeAsString());
}

void Frame::AppendFields(const google::protobuf::MessageLite& message) {
  AppendRaw(message.SerializeAsString());
}

void Frame::AddFrame(int field, Frame child) {
  AppendTag(field, WireFormatLite::WIRETYPE_LENGTH_DELIMITED);
  AppendVarint(child.size_);
  if (child.pieces_.empty()) {
    AppendRaw(child.pending_);
    return;
  }
  FlushPending();
  for (Piece& piece : child.pieces_) pieces_.push_back(std::move(piece));
  pending_ = std::move(child.pending_);
  size_ += child.size_;
  external_bytes_ += child.external_bytes_;
}

void Frame::AddExternal(int field, const void* data, size_t size,
                        std::shared_ptr<const void> owner) {
  AppendTag(field, WireFormatLite::WIRETYPE_LENGTH_DELIMITED);
  AppendVarint(size);
  if (size < kMinExternalBytes) {
    AppendRaw(absl::string_view(static_cast<const char*>(data), size));
    return;
  }
  FlushPending();
  pieces_.push_back(Piece{std::string(), data, size, std::move(owner)});
  size_ += size;
  external_bytes_ += size;
}

grpc::ByteBuffer Frame::ToByteBuffer() && {
  std::vector<grpc::Slice> slices;
  slices.reserve(pieces_.size() + 1);
  auto add_owned = [&slices](std::string* bytes) {
    // The string moves into the slice's owner: no copy of it either.
    auto* owned = new std::shared_ptr<const void>(std::make_shared<std::string>(std::move(*bytes)));
    auto* text = static_cast<const std::string*>(owned->get());
    slices.emplace_back(const_cast<char*>(text->data()), text->size(), &ReleaseOwner, owned);
  };
  for (Piece& piece : pieces_) {
    if (piece.data == nullptr) {
      add_owned(&piece.owned);
    } else if (piece.owner == nullptr) {
      slices.emplace_back(piece.data, piece.size, grpc::Slice::STATIC_SLICE);
    } else {
      slices.emplace_back(const_cast<void*>(piece.data), piece.size, &ReleaseOwner,
                          new std::shared_ptr<const void>(std::move(piece.owner)));
    }
  }
  if (!pending_.empty()) add_owned(&pending_);
  pieces_.clear();
  pending_.clear();
  return grpc::ByteBuffer(slices.data(), slices.size());
}

std::string Frame::Flatten() const {
  std::string bytes;
  bytes.reserve(size_);
  for (const Piece& piece : pieces_) {
    if (piece.data == nullptr) {
      bytes += piece.owned;
    } else {
      bytes.append(static_cast<const char*>(piece.data), piece.size);
    }
  }
  bytes += pending_;
  return bytes;
}

Frame FrameForwardRequest(const grad::v1::ForwardRequest& skeleton,
                          const gradengine::ForwardRequest& request,
                          const std::shared_ptr<const void>& owner) {
  using Wire = grad::v1::ForwardRequest;
  Frame frame;
  FrameNetworkParametersInput(skeleton, request, owner, &frame);
  if (!skeleton.request_id().empty()) {
    frame.AddString(Wire::kRequestIdFieldNumber, skeleton.request_id());
  }
  if (skeleton.has_placement()) frame.AddMessage(Wire::kPlacementFieldNumber, skeleton.placement());
  return frame;
}

Frame FrameGradientRequest(const grad::v1::ComputeGradientsRequest& skeleton,
                           const gradengine::GradientRequest& request,
                           const std::shared_ptr<const void>& owner) {
  using Wire = grad::v1::ComputeGradientsRequest;
  Frame frame;
  FrameNetworkParametersInput(skeleton, request, owner, &frame);
  if (skeleton.has_objective()) {
    const grad::v1::Objective& objective = skeleton.objective();
    const float* data = request.objective.tensor.data;
    const size_t elements = static_cast<size_t>(request.objective.tensor.size);
    Frame child;
    if (objective.has_mse_target()) {
      AddTensor(&child, grad::v1::Objective::kMseTargetFieldNumber, objective.mse_target(), data,
                elements, owner);
    }
    if (objective.has_sum())
      child.AddMessage(grad::v1::Objective::kSumFieldNumber, objective.sum());
    if (objective.has_grad_output()) {
      AddTensor(&child, grad::v1::Objective::kGradOutputFieldNumber, objective.grad_output(), data,
                elements, owner);
    }
    if (objective.has_cross_entropy()) {
      AddCrossEntropy(&child, grad::v1::Objective::kCrossEntropyFieldNumber,
                      objective.cross_entropy(), request.objective.labels, owner);
    }
    frame.AddFrame(Wire::kObjectiveFieldNumber, std::move(child));
  }
  if (skeleton.has_gradients()) frame.AddMessage(Wire::kGradientsFieldNumber, skeleton.gradients());
  if (!skeleton.request_id().empty()) {
    frame.AddString(Wire::kRequestIdFieldNumber, skeleton.request_id());
  }
  if (skeleton.skip_output()) frame.AddVarint(Wire::kSkipOutputFieldNumber, 1);
  if (skeleton.has_placement()) frame.AddMessage(Wire::kPlacementFieldNumber, skeleton.placement());
  return frame;
}

Frame FrameForwardResponse(const grad::v1::ForwardResponse& skeleton,
                           const gradengine::ForwardResult& result) {
  using Wire = grad::v1::ForwardResponse;
  Frame frame;
  if (skeleton.has_output())
    AddResult(&frame, Wire::kOutputFieldNumber, skeleton.output(), result.output);
  AddRequestIdAndTiming(skeleton, &frame);
  AddNamedResults(&frame, Wire::kRunningStatsFieldNumber, skeleton.running_stats(),
                  result.running_stats);
  return frame;
}

Frame FrameGradientResponse(const grad::v1::ComputeGradientsResponse& skeleton,
                            const gradengine::GradientResult& result) {
  using Wire = grad::v1::ComputeGradientsResponse;
  Frame frame;
  if (skeleton.has_output())
    AddResult(&frame, Wire::kOutputFieldNumber, skeleton.output(), result.output);
  if (skeleton.has_loss()) frame.AddDouble(Wire::kLossFieldNumber, skeleton.loss());
  if (skeleton.has_input_grad()) {
    AddResult(&frame, Wire::kInputGradFieldNumber, skeleton.input_grad(), *result.input_grad);
  }
  // The skeleton lists the gradients in the order of the result's map.
  AddNamedResults(&frame, Wire::kParameterGradsFieldNumber, skeleton.parameter_grads(),
                  result.parameter_grads);
  AddRequestIdAndTiming(skeleton, &frame);
  AddNamedResults(&frame, Wire::kRunningStatsFieldNumber, skeleton.running_stats(),
                  result.running_stats);
  return frame;
}

void EncodeForwardResponseSkeleton(const gradengine::ForwardResult& result,
                                   const grad::v1::ResultPlacement& placement,
                                   grad::v1::ForwardResponse* out) {
  AddSharedRefOrHeader(result.output, placement.has_output() ? &placement.output() : nullptr,
                       out->mutable_output());
  AddNamedHeaders(result.running_stats, out->mutable_running_stats());
}

void EncodeGradientResponseSkeleton(const gradengine::GradientResult& result, bool include_output,
                                    const grad::v1::ResultPlacement& placement,
                                    grad::v1::ComputeGradientsResponse* out) {
  if (include_output) {
    AddSharedRefOrHeader(result.output, placement.has_output() ? &placement.output() : nullptr,
                         out->mutable_output());
  }
  if (result.loss.has_value()) out->set_loss(*result.loss);
  if (result.input_grad.has_value()) {
    AddSharedRefOrHeader(*result.input_grad,
                         placement.has_input_grad() ? &placement.input_grad() : nullptr,
                         out->mutable_input_grad());
  }
  out->mutable_parameter_grads()->Reserve(static_cast<int>(result.parameter_grads.size()));
  for (const auto& [name, grad] : result.parameter_grads) {
    grad::v1::NamedTensor* named = out->add_parameter_grads();
    named->set_name(name);
    const grad::v1::SharedMemoryRef* ref = nullptr;
    for (const grad::v1::NamedSharedMemoryRef& placed : placement.parameter_grads()) {
      if (placed.name() == name) ref = &placed.ref();
    }
    AddSharedRefOrHeader(grad, ref, named->mutable_tensor());
  }
  AddNamedHeaders(result.running_stats, out->mutable_running_stats());
}

}  // namespace gradwire
