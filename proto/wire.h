// Conversion between the grad.v1 wire messages and the engine's value types
// (gradengine/network.h, gradengine/tensor.h), in both directions: the server decodes requests
// and encodes results, the client encodes requests and decodes results. Keeping both
// directions here means one definition of every field's meaning.
//
// Decoding checks everything the wire format itself can get wrong (dtypes, byte counts,
// malformed shapes, unset or unknown layers, repeated or conflicting fields) and returns
// InvalidArgument, or Unimplemented for a value this version knows but does not support (a
// BFLOAT16 tensor, a layer kind added in a later version), with a message naming the field
// path and value, e.g. "layers[1].conv2d.kernel_size has 3 values; expected 1 or 2".
// Whether the network fits its input and parameters is the engine's check, not this one.
//
// Zero copy: the Decode*Request functions return views into the message's `bytes` fields, so
// the message must outlive the returned request and stay unchanged. A field whose bytes are
// not aligned for its element type (never the case for protobuf's heap-allocated strings, but
// not promised) is copied into `storage`. Tensors given as SharedMemoryRef are resolved by the
// storage's SharedMemoryResolver into views of the mapped memory (refused without one), and a
// request's ResultPlacement into the engine's ResultPlacement; no result may overlap another
// tensor of the call.
//
// The Take*Result functions take the response's tensor bytes over (the message is left with
// empty `data` fields), so a decoded result costs no copy beyond the parse.
//
// Tensors are FLOAT32 everywhere but in a cross-entropy objective's target, which holds INT64
// class indices; either dtype where the other belongs is InvalidArgument naming the field.
//
// All functions are thread-compatible and keep no state. Tensor bytes are little-endian; the
// library only builds on little-endian hosts.

#ifndef PROTO_WIRE_H_
#define PROTO_WIRE_H_

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "google/protobuf/io/zero_copy_stream.h"
#include "grad/v1/gradient_service.pb.h"
#include "gradengine/network.h"
#include "gradengine/tensor.h"

namespace gradwire {

// Memory a SharedMemoryRef names, as its owner checked it.
struct SharedMemorySpan {
  float* data = nullptr;
  // Keeps the mapping alive while a call uses it.
  std::shared_ptr<const void> owner;
  // Identifies the bytes for overlap checks: the same (file, offset) is the same memory, even
  // under two region names.
  uint64_t file_id = 0;
  int64_t file_offset = 0;
};

// Every key of a shared memory object for this service starts with this (the client library
// makes such keys; the server refuses others).
inline constexpr char kSharedMemoryKeyPrefix[] = "gradclient-";

// Most bytes of a request's network spec (its serialized grad.v1.Network): 1 MiB, room for
// gradengine::kMaxLayers layers with the longest names. Over it: ResourceExhausted.
inline constexpr size_t kMaxNetworkSpecBytes = size_t{1} << 20;

// Resolves SharedMemoryRefs; implemented by the server's region registry.
class SharedMemoryResolver {
 public:
  virtual ~SharedMemoryResolver() = default;
  // The memory `ref` names, checked for bounds and for a region still as large as it was
  // registered. `field` is the ref's path for messages ("input.shared_memory").
  virtual absl::StatusOr<SharedMemorySpan> Resolve(const grad::v1::SharedMemoryRef& ref,
                                                   absl::string_view field) = 0;
  // Checks again that every region resolved so far is still as large as registered, right
  // before the memory is used (FailedPrecondition otherwise).
  virtual absl::Status Revalidate() { return absl::OkStatus(); }
};

// What one decoded request holds besides the message: copies made for misaligned tensor bytes,
// and the shared memory its tensors use. See above.
struct DecodeStorage {
  std::deque<std::vector<float>> copies;
  std::deque<std::vector<int64_t>> label_copies;  // of misaligned INT64 class indices
  // Null: tensors that name shared memory are refused (FAILED_PRECONDITION) with
  // `shared_memory_refusal` as the reason.
  SharedMemoryResolver* shared_memory = nullptr;
  std::string shared_memory_refusal =
      "shared memory is not enabled here (the server's --allow_shared_memory)";

  // Every shared memory range the request uses, for the overlap check.
  struct UsedRange {
    std::string field;
    uint64_t file_id = 0;
    int64_t begin = 0;
    int64_t end = 0;
    bool written = false;
  };
  std::vector<UsedRange> shared_ranges;
};

// ---- Tensors

// Writes `shape` and the FLOAT32 dtype, but no data: what framing.h completes with the bytes.
void EncodeTensorHeader(absl::Span<const int64_t> shape, grad::v1::Tensor* out);

// Writes `shape` and `values` as a FLOAT32 tensor (one memory copy of the values).
void EncodeTensor(absl::Span<const int64_t> shape, absl::Span<const float> values,
                  grad::v1::Tensor* out);
inline void EncodeTensor(const gradengine::TensorView& view, grad::v1::Tensor* out) {
  EncodeTensor(view.shape, view.values(), out);
}
inline void EncodeTensor(const gradengine::Tensor& tensor, grad::v1::Tensor* out) {
  EncodeTensor(tensor.shape, tensor.data, out);
}

// A view of `tensor`'s data. `field` is the path used in messages ("input",
// "parameters[2].tensor"). Errors: dtype unset, unknown or INT64 (InvalidArgument), BFLOAT16
// (Unimplemented), a negative dim or a shape whose element or byte count overflows int64
// (InvalidArgument), data whose length is not product(shape) * 4 (InvalidArgument, giving both
// counts).
absl::StatusOr<gradengine::TensorView> DecodeTensorView(const grad::v1::Tensor& tensor,
                                                        absl::string_view field,
                                                        DecodeStorage* storage);

// As DecodeTensorView, but copies the data into an owning Tensor.
absl::StatusOr<gradengine::Tensor> DecodeTensor(const grad::v1::Tensor& tensor,
                                                absl::string_view field);

// As DecodeTensor, but takes `tensor`'s bytes over without copying them (leaving its data
// empty), unless they are misaligned for float.
absl::StatusOr<gradengine::Tensor> TakeTensor(grad::v1::Tensor* tensor, absl::string_view field);

// ---- Networks

void EncodeNetwork(const gradengine::NetworkSpec& network, grad::v1::Network* out);

// Errors name the layer: "layers[2].op is not set", "layers[0].conv2d.padding has 3 values;
// expected 1, 2 or 4", "layers[1].activation.kind=0 (ACTIVATION_KIND_UNSPECIFIED) is not an
// activation", "layers[4].batch_norm2d.training is not set", "layers[3] has an op this server
// does not know (field 15)" (Unimplemented). Defaults are PyTorch's where the message says so
// (a pool's stride is its kernel size, batch_norm2d's eps 1e-5, momentum 0.1, affine true).
// An empty network decodes to an empty spec; the engine rejects it.
absl::StatusOr<gradengine::NetworkSpec> DecodeNetwork(const grad::v1::Network& network);

// ---- Requests (client encodes, server decodes)

// With `tensor_data` false, tensors get only their headers (EncodeTensorHeader), for
// framing.h to send the bytes from where they lie. The engine request's `placement` is not
// encoded: the client names wire placements itself (its shared memory regions).
void EncodeForwardRequest(const gradengine::ForwardRequest& request,
                          grad::v1::ForwardRequest* out, bool tensor_data = true);
void EncodeGradientRequest(const gradengine::GradientRequest& request,
                           grad::v1::ComputeGradientsRequest* out, bool tensor_data = true);

// The decoded requests' `should_continue` is left empty for the caller to set. Parameter
// names must be non-empty and unique ("parameters[3].name=\"conv1.weight\" repeats
// parameters[0]"); which names the network needs is the engine's check.
absl::StatusOr<gradengine::ForwardRequest> DecodeForwardRequest(
    const grad::v1::ForwardRequest& request, DecodeStorage* storage);
// Also checks the objective: exactly one of mse_target, sum, grad_output, cross_entropy (whose
// target must be INT64; it is a zero-copy view as the float tensors are).
absl::StatusOr<gradengine::GradientRequest> DecodeGradientRequest(
    const grad::v1::ComputeGradientsRequest& request, DecodeStorage* storage);

// ---- Results (server encodes, client decodes)

// Running statistics (batch_norm2d in training mode) are always bytes, never in shared memory:
// a running_stats entry that names shared memory does not decode.
void EncodeForwardResult(const gradengine::ForwardResult& result,
                         grad::v1::ForwardResponse* out);
// `include_output` false leaves `output` unset (ComputeGradientsRequest.skip_output).
void EncodeGradientResult(const gradengine::GradientResult& result, bool include_output,
                          grad::v1::ComputeGradientsResponse* out);

// The results' `timing` is the engine's, from the response's Timing.forward_ns/backward_ns.
// Tensors that came back as SharedMemoryRef are resolved by `shared_memory` (the client's own
// regions); without one they are an error.
absl::StatusOr<gradengine::ForwardResult> TakeForwardResult(
    grad::v1::ForwardResponse* response, SharedMemoryResolver* shared_memory = nullptr);
absl::StatusOr<gradengine::GradientResult> TakeGradientResult(
    grad::v1::ComputeGradientsResponse* response, SharedMemoryResolver* shared_memory = nullptr);
// As the Take functions, on a copy of `response` (for callers that keep the message).
absl::StatusOr<gradengine::ForwardResult> DecodeForwardResult(
    const grad::v1::ForwardResponse& response);
absl::StatusOr<gradengine::GradientResult> DecodeGradientResult(
    const grad::v1::ComputeGradientsResponse& response);

// ---- Names the server advertises in GetInfo.

// gradengine::LayerKindName of every LayerOp alternative, in the variant's order.
std::vector<std::string> SupportedLayerNames();
std::vector<std::string> SupportedActivationNames();
std::vector<std::string> SupportedObjectiveNames();

// The path of the first string field (proto3 requires UTF-8 there) whose bytes are not UTF-8
// in the serialized message of `type` that `in` reads, e.g. "network.layers[3].name"; "" if
// there is none or the bytes are not a message. For explaining a parse failure: protobuf
// refuses such a message without saying where.
std::string FindInvalidUtf8Field(const google::protobuf::Descriptor& type,
                                 google::protobuf::io::ZeroCopyInputStream* in);

}  // namespace gradwire

#endif  // PROTO_WIRE_H_
