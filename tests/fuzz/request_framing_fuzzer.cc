// Fuzzes the request paths around the bytes: tensors and result placements in shared memory,
// resolved by an in-memory resolver (fake_shared_memory.h), and the client's framing
// (proto/framing.h) of every request that decodes.
//
// For a request that decodes:
//  - every tensor in shared memory is a view of exactly the bytes its reference names, and
//    every result placement is memory of exactly its byte_size; all of them are read, and the
//    placements written, inside heap blocks of exactly the regions' sizes, so that ASan
//    reports any access past a region;
//  - no result placement overlaps another tensor of the call (checked pairwise on the
//    resolved file ranges, and by writing the results and checking that no input changed);
//  - Frame*Request, given the request as the client would (a skeleton without tensor bytes and
//    the decoded views), writes exactly what protobuf's serializer writes for the message, in
//    Flatten() and in the gRPC slices of ToByteBuffer();
//  - what the engine's validation accepts holds the properties of request_checks.h.
//
// Input: a selector byte (RPC and element limit, see request_checks.h), the message's length
// (2 bytes, little-endian), the message, and a plan for the rest (FuzzedDataProvider): tensors
// of the parsed message moved into shared memory and result placements added, with references
// that are mostly sound (a region that exists, an aligned offset, the tensor's byte count) and
// sometimes anything. Mutating the message's bytes alone rarely keeps a request decodable.

#include <fuzzer/FuzzedDataProvider.h>
#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/support/slice.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/request_validation.h"
#include "google/protobuf/stubs/logging.h"
#include "grad/v1/gradient_service.pb.h"
#include "proto/framing.h"
#include "proto/wire.h"
#include "tests/fuzz/fake_shared_memory.h"
#include "tests/fuzz/fuzz_check.h"
#include "tests/fuzz/request_checks.h"

namespace gradfuzz {
namespace {

// As request_decode_fuzzer's, but with shared memory: an unknown region instead of a refusal.
constexpr std::initializer_list<absl::StatusCode> kDecodeCodes = {
    absl::StatusCode::kInvalidArgument, absl::StatusCode::kResourceExhausted,
    absl::StatusCode::kUnimplemented, absl::StatusCode::kNotFound};
constexpr std::initializer_list<absl::StatusCode> kValidateCodes = {
    absl::StatusCode::kInvalidArgument, absl::StatusCode::kResourceExhausted};

// Moves tensors into shared memory and adds result placements, as the plan says.
class SharedMemoryPlan {
 public:
  explicit SharedMemoryPlan(FuzzedDataProvider* plan) : plan_(*plan) {}

  void MoveTensor(grad::v1::Tensor* tensor) {
    const int64_t bytes = static_cast<int64_t>(tensor->data().size());
    // Now and then the data stays too, which the decoder must refuse.
    if (plan_.ConsumeIntegralInRange<int>(0, 7) != 0) tensor->clear_data();
    *tensor->mutable_shared_memory() = Ref(bytes);
  }

  // A placement of a result whose size the plan does not know: some multiple of 4 bytes.
  grad::v1::SharedMemoryRef Placement() {
    return Ref(4 * plan_.ConsumeIntegralInRange<int64_t>(0, 64));
  }

  FuzzedDataProvider& plan() { return plan_; }

 private:
  static constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  static constexpr int64_t kMin = std::numeric_limits<int64_t>::min();

  grad::v1::SharedMemoryRef Ref(int64_t byte_size) {
    grad::v1::SharedMemoryRef ref;
    ref.set_region(plan_.PickValueInArray<const char*>({"a", "a_tail", "b", "c", "m", "none"}));
    switch (plan_.ConsumeIntegralInRange<int>(0, 3)) {
      case 0:
        ref.set_offset(4 * plan_.ConsumeIntegralInRange<int64_t>(0, 272));
        break;
      case 1:
        ref.set_offset(plan_.ConsumeIntegralInRange<int64_t>(0, 1100));
        break;
      case 2:
        // Around the regions' ends (fake_shared_memory.h) and int64's.
        ref.set_offset(plan_.PickValueInArray<int64_t>(
            {-4, -1, 2, 6, 64, 124, 128, 252, 256, 1036, 1040, kMax - 3, kMax, kMin}));
        break;
      default:
        ref.set_offset(plan_.ConsumeIntegral<int64_t>());
    }
    switch (plan_.ConsumeIntegralInRange<int>(0, 3)) {
      case 0:
      case 1:
        ref.set_byte_size(byte_size);
        break;
      case 2:
        ref.set_byte_size(byte_size + plan_.ConsumeIntegralInRange<int64_t>(-8, 8));
        break;
      default:
        ref.set_byte_size(plan_.ConsumeIntegral<int64_t>());
    }
    return ref;
  }

  FuzzedDataProvider& plan_;
};

// The moves both RPCs share; false for a move only ComputeGradients has.
template <typename WireRequest>
bool ApplyCommonMove(int move, SharedMemoryPlan* plan, WireRequest* wire) {
  switch (move) {
    case 0:
      if (wire->has_input()) plan->MoveTensor(wire->mutable_input());
      return true;
    case 1:
      if (wire->parameters_size() > 0) {
        const int i =
            plan->plan().template ConsumeIntegralInRange<int>(0, wire->parameters_size() - 1);
        plan->MoveTensor(wire->mutable_parameters(i)->mutable_tensor());
      }
      return true;
    case 2:
      *wire->mutable_placement()->mutable_output() = plan->Placement();
      return true;
    default:
      return false;
  }
}

constexpr int kMaxMoves = 8;

void ApplyPlan(FuzzedDataProvider* data, grad::v1::ForwardRequest* wire) {
  SharedMemoryPlan plan(data);
  for (int i = 0; i < kMaxMoves && data->remaining_bytes() > 0; ++i) {
    ApplyCommonMove(data->ConsumeIntegralInRange<int>(0, 2), &plan, wire);
  }
}

void ApplyPlan(FuzzedDataProvider* data, grad::v1::ComputeGradientsRequest* wire) {
  SharedMemoryPlan plan(data);
  for (int i = 0; i < kMaxMoves && data->remaining_bytes() > 0; ++i) {
    const int move = data->ConsumeIntegralInRange<int>(0, 5);
    if (ApplyCommonMove(move, &plan, wire)) continue;
    switch (move) {
      case 3:
        if (wire->objective().has_mse_target()) {
          plan.MoveTensor(wire->mutable_objective()->mutable_mse_target());
        }
        if (wire->objective().has_grad_output()) {
          plan.MoveTensor(wire->mutable_objective()->mutable_grad_output());
        }
        break;
      case 4:
        *wire->mutable_placement()->mutable_input_grad() = plan.Placement();
        break;
      default: {
        grad::v1::NamedSharedMemoryRef* named = wire->mutable_placement()->add_parameter_grads();
        const int parameters = wire->parameters_size();
        // Half the time a parameter the request has (so now and then one named twice).
        named->set_name(
            parameters > 0 && data->ConsumeBool()
                ? wire->parameters(data->ConsumeIntegralInRange<int>(0, parameters - 1)).name()
                : "conv1.weight");
        *named->mutable_ref() = plan.Placement();
      }
    }
  }
}

// A decoded tensor given as a SharedMemoryRef views exactly the memory resolved for it.
void CheckSharedView(const gradengine::TensorView& view, const grad::v1::Tensor& wire,
                     const std::string& field, const FakeSharedMemory& memory) {
  if (!wire.has_shared_memory()) return;
  const std::string ref_field = absl::StrCat(field, ".shared_memory");
  const FakeSharedMemory::Resolved* resolved = memory.Find(ref_field);
  FUZZ_CHECK(resolved != nullptr, ref_field, " decoded but never resolved");
  FUZZ_CHECK(view.data == reinterpret_cast<const float*>(resolved->data), ref_field,
             " decoded to other memory than it names");
  FUZZ_CHECK(resolved->byte_size == view.size * static_cast<int64_t>(sizeof(float)), ref_field,
             ": ", view.size, " elements in ", resolved->byte_size, " bytes");
}

void CheckPlacement(const std::optional<gradengine::ResultMemory>& memory, const std::string& field,
                    const FakeSharedMemory& shared, std::vector<gradengine::ResultMemory>* placed) {
  if (!memory.has_value()) return;
  const FakeSharedMemory::Resolved* resolved = shared.Find(field);
  FUZZ_CHECK(resolved != nullptr, field, " decoded but never resolved");
  FUZZ_CHECK(memory->data == reinterpret_cast<float*>(resolved->data), field,
             " decoded to other memory than it names");
  FUZZ_CHECK(memory->size >= 1 &&
                 memory->size * static_cast<int64_t>(sizeof(float)) == resolved->byte_size,
             field, ": ", memory->size, " elements for byte_size=", resolved->byte_size);
  placed->push_back(*memory);
}

// No result range shares a byte of a file with any other range the call uses.
void CheckNoOverlaps(const FakeSharedMemory& memory) {
  const std::vector<FakeSharedMemory::Resolved>& all = memory.resolved();
  const auto written = [](const FakeSharedMemory::Resolved& entry) {
    return entry.field.rfind("placement.", 0) == 0;
  };
  for (size_t i = 0; i < all.size(); ++i) {
    for (size_t j = i + 1; j < all.size(); ++j) {
      if (!written(all[i]) && !written(all[j])) continue;
      if (all[i].file_id != all[j].file_id) continue;
      const int64_t begin = std::max(all[i].file_begin, all[j].file_begin);
      const int64_t end =
          std::min(all[i].file_begin + all[i].byte_size, all[j].file_begin + all[j].byte_size);
      FUZZ_CHECK(begin >= end, all[i].field, " and ", all[j].field,
                 " share bytes, yet the request decoded");
    }
  }
}

// The bits of every input view, so that a result written over one shows.
std::string InputBytes(const std::vector<const gradengine::TensorView*>& views) {
  std::string bytes;
  for (const gradengine::TensorView* view : views) {
    bytes.append(reinterpret_cast<const char*>(view->data),
                 static_cast<size_t>(view->size) * sizeof(float));
  }
  return bytes;
}

// Writes every result placement as the engine would, checking that no input view changes.
void WriteResults(const std::vector<const gradengine::TensorView*>& inputs,
                  const std::vector<gradengine::ResultMemory>& placed) {
  const std::string before = InputBytes(inputs);
  for (const gradengine::ResultMemory& memory : placed) {
    for (int64_t i = 0; i < memory.size; ++i) memory.data[i] = -1.5f;
  }
  FUZZ_CHECK(InputBytes(inputs) == before, "writing the results changed an input");
}

// The message as a client sends it: no unknown fields, parameters in the order of the decoded
// map (what EncodeParameters writes and the framing expects).
template <typename WireRequest>
WireRequest CanonicalFull(const WireRequest& wire) {
  WireRequest full = wire;
  full.DiscardUnknownFields();
  std::sort(full.mutable_parameters()->begin(), full.mutable_parameters()->end(),
            [](const grad::v1::NamedTensor& a, const grad::v1::NamedTensor& b) {
              return a.name() < b.name();
            });
  return full;
}

template <typename WireRequest>
WireRequest SkeletonOf(const WireRequest& full) {
  WireRequest skeleton = full;
  for (grad::v1::NamedTensor& named : *skeleton.mutable_parameters()) {
    if (named.has_tensor()) named.mutable_tensor()->clear_data();
  }
  if (skeleton.has_input()) skeleton.mutable_input()->clear_data();
  return skeleton;
}

void CheckFrame(gradwire::Frame frame, const std::string& serialized) {
  FUZZ_CHECK(frame.size() == serialized.size(), "the frame has ", frame.size(),
             " bytes, the serializer writes ", serialized.size());
  FUZZ_CHECK(frame.Flatten() == serialized, "the frame's bytes differ from the serializer's (",
             serialized.size(), " bytes)");
  grpc::ByteBuffer buffer = std::move(frame).ToByteBuffer();
  std::vector<grpc::Slice> slices;
  FUZZ_CHECK(buffer.Dump(&slices).ok(), "ByteBuffer::Dump failed");
  std::string sent;
  for (const grpc::Slice& slice : slices) {
    sent.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  }
  FUZZ_CHECK(sent == serialized, "the frame's gRPC slices differ from the serializer's bytes (",
             sent.size(), " and ", serialized.size(), " bytes)");
}

template <typename EngineRequest, typename WireRequest>
void CheckSharedCommon(const EngineRequest& request, const WireRequest& wire,
                       const FakeSharedMemory& memory,
                       std::vector<const gradengine::TensorView*>* inputs) {
  for (int i = 0; i < wire.parameters_size(); ++i) {
    const gradengine::TensorView& view = request.parameters.at(wire.parameters(i).name());
    CheckSharedView(view, wire.parameters(i).tensor(), absl::StrCat("parameters[", i, "].tensor"),
                    memory);
    inputs->push_back(&view);
  }
  CheckSharedView(request.input, wire.input(), "input", memory);
  inputs->push_back(&request.input);
}

void FuzzForward(const RequestInput& input, FuzzedDataProvider* plan) {
  grad::v1::ForwardRequest wire;
  if (!wire.ParseFromArray(input.message, input.message_size)) return;
  ApplyPlan(plan, &wire);
  FakeSharedMemory memory;
  gradwire::DecodeStorage storage;
  storage.shared_memory = &memory;
  absl::StatusOr<gradengine::ForwardRequest> request =
      gradwire::DecodeForwardRequest(wire, &storage);
  if (!request.ok()) {
    CheckError(request.status(), kDecodeCodes, "DecodeForwardRequest");
    return;
  }
  CheckDecodedCommon(*request, wire);
  std::vector<const gradengine::TensorView*> inputs;
  CheckSharedCommon(*request, wire, memory, &inputs);
  std::vector<gradengine::ResultMemory> placed;
  CheckPlacement(request->placement.output, "placement.output", memory, &placed);
  CheckNoOverlaps(memory);

  const grad::v1::ForwardRequest full = CanonicalFull(wire);
  CheckFrame(gradwire::FrameForwardRequest(SkeletonOf(full), *request, nullptr),
             full.SerializeAsString());

  absl::StatusOr<gradengine::ValidatedNetwork> validated =
      gradengine::ValidateForwardRequest(*request, input.max_elements);
  if (validated.ok()) {
    CheckValidatedCommon(*validated, *request, input.max_elements);
  } else {
    CheckError(validated.status(), kValidateCodes, "ValidateForwardRequest");
  }
  WriteResults(inputs, placed);
}

void FuzzGradients(const RequestInput& input, FuzzedDataProvider* plan) {
  grad::v1::ComputeGradientsRequest wire;
  if (!wire.ParseFromArray(input.message, input.message_size)) return;
  ApplyPlan(plan, &wire);
  FakeSharedMemory memory;
  gradwire::DecodeStorage storage;
  storage.shared_memory = &memory;
  absl::StatusOr<gradengine::GradientRequest> request =
      gradwire::DecodeGradientRequest(wire, &storage);
  if (!request.ok()) {
    CheckError(request.status(), kDecodeCodes, "DecodeGradientRequest");
    return;
  }
  CheckDecodedCommon(*request, wire);
  CheckDecodedGradientParts(*request, wire);
  std::vector<const gradengine::TensorView*> inputs;
  CheckSharedCommon(*request, wire, memory, &inputs);
  if (wire.objective().has_mse_target()) {
    CheckSharedView(request->objective.tensor, wire.objective().mse_target(),
                    "objective.mse_target", memory);
    inputs.push_back(&request->objective.tensor);
  } else if (wire.objective().has_grad_output()) {
    CheckSharedView(request->objective.tensor, wire.objective().grad_output(),
                    "objective.grad_output", memory);
    inputs.push_back(&request->objective.tensor);
  }
  std::vector<gradengine::ResultMemory> placed;
  CheckPlacement(request->placement.output, "placement.output", memory, &placed);
  CheckPlacement(request->placement.input_grad, "placement.input_grad", memory, &placed);
  FUZZ_CHECK(request->placement.parameter_grads.size() ==
                 static_cast<size_t>(wire.placement().parameter_grads_size()),
             "placement.parameter_grads: ", request->placement.parameter_grads.size(),
             " decoded from ", wire.placement().parameter_grads_size());
  for (int i = 0; i < wire.placement().parameter_grads_size(); ++i) {
    const grad::v1::NamedSharedMemoryRef& named = wire.placement().parameter_grads(i);
    const auto it = request->placement.parameter_grads.find(named.name());
    FUZZ_CHECK(it != request->placement.parameter_grads.end(), "placement.parameter_grads[", i,
               "] was not decoded");
    CheckPlacement(it->second, absl::StrCat("placement.parameter_grads[", i, "].ref"), memory,
                   &placed);
  }
  CheckNoOverlaps(memory);

  const grad::v1::ComputeGradientsRequest full = CanonicalFull(wire);
  grad::v1::ComputeGradientsRequest skeleton = SkeletonOf(full);
  // Decoded, so exactly one objective is set.
  grad::v1::Objective* objective = skeleton.mutable_objective();
  if (objective->has_mse_target()) objective->mutable_mse_target()->clear_data();
  if (objective->has_grad_output()) objective->mutable_grad_output()->clear_data();
  if (objective->has_cross_entropy()) {
    objective->mutable_cross_entropy()->mutable_target()->clear_data();
  }
  CheckFrame(gradwire::FrameGradientRequest(skeleton, *request, nullptr), full.SerializeAsString());

  absl::StatusOr<gradengine::ValidatedNetwork> validated =
      gradengine::ValidateGradientRequest(*request, input.max_elements);
  if (validated.ok()) {
    CheckValidatedCommon(*validated, *request, input.max_elements);
    CheckValidatedGradientParts(*validated, *request);
  } else {
    CheckError(validated.status(), kValidateCodes, "ValidateGradientRequest");
  }
  WriteResults(inputs, placed);
}

}  // namespace
}  // namespace gradfuzz

// protobuf logs each string field with invalid UTF-8 that it refuses to parse; the refusal is
// the result here, and the lines would fill the log.
extern "C" int LLVMFuzzerInitialize(int* /*argc*/, char*** /*argv*/) {
  google::protobuf::SetLogHandler(nullptr);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  gradfuzz::RequestInput input;
  if (!gradfuzz::SplitRequestInput(data, size, &input) || input.message_size < 2) return 0;
  const int length = std::min(input.message[0] | input.message[1] << 8, input.message_size - 2);
  FuzzedDataProvider plan(input.message + 2 + length,
                          static_cast<size_t>(input.message_size - 2 - length));
  input.message += 2;
  input.message_size = length;
  if (input.gradients) {
    gradfuzz::FuzzGradients(input, &plan);
  } else {
    gradfuzz::FuzzForward(input, &plan);
  }
  return 0;
}
