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
// not aligned for float (never the case for protobuf's heap-allocated strings, but not
// promised) is copied into `storage`.
//
// All functions are thread-compatible and keep no state. Tensor bytes are little-endian; the
// library only builds on little-endian hosts.

#ifndef PROTO_WIRE_H_
#define PROTO_WIRE_H_

#include <cstdint>
#include <deque>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "grad/v1/gradient_service.pb.h"
#include "gradengine/network.h"
#include "gradengine/tensor.h"

namespace gradwire {

// Owns the copies made for misaligned tensor bytes; see above.
using DecodeStorage = std::deque<std::vector<float>>;

// ---- Tensors

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
// "parameters[2].tensor"). Errors: dtype unset or unknown (InvalidArgument), BFLOAT16
// (Unimplemented), a negative dim or a shape whose element or byte count overflows int64
// (InvalidArgument), data whose length is not product(shape) * 4 (InvalidArgument, giving both
// counts).
absl::StatusOr<gradengine::TensorView> DecodeTensorView(const grad::v1::Tensor& tensor,
                                                        absl::string_view field,
                                                        DecodeStorage* storage);

// As DecodeTensorView, but copies the data into an owning Tensor.
absl::StatusOr<gradengine::Tensor> DecodeTensor(const grad::v1::Tensor& tensor,
                                                absl::string_view field);

// ---- Networks

void EncodeNetwork(const gradengine::NetworkSpec& network, grad::v1::Network* out);

// Errors name the layer: "layers[2].op is not set", "layers[0].conv2d.padding has 3 values;
// expected 1, 2 or 4", "layers[1].activation.kind=0 (ACTIVATION_KIND_UNSPECIFIED) is not an
// activation", "layers[3] has an op this server does not know (field 9)" (Unimplemented).
// An empty network decodes to an empty spec; the engine rejects it.
absl::StatusOr<gradengine::NetworkSpec> DecodeNetwork(const grad::v1::Network& network);

// ---- Requests (client encodes, server decodes)

void EncodeForwardRequest(const gradengine::ForwardRequest& request,
                          grad::v1::ForwardRequest* out);
void EncodeGradientRequest(const gradengine::GradientRequest& request,
                           grad::v1::ComputeGradientsRequest* out);

// The decoded requests' `should_continue` is left empty for the caller to set. Parameter
// names must be non-empty and unique ("parameters[3].name=\"conv1.weight\" repeats
// parameters[0]"); which names the network needs is the engine's check.
absl::StatusOr<gradengine::ForwardRequest> DecodeForwardRequest(
    const grad::v1::ForwardRequest& request, DecodeStorage* storage);
// Also checks the objective: exactly one of mse_target, sum, grad_output.
absl::StatusOr<gradengine::GradientRequest> DecodeGradientRequest(
    const grad::v1::ComputeGradientsRequest& request, DecodeStorage* storage);

// ---- Results (server encodes, client decodes)

void EncodeForwardResult(const gradengine::ForwardResult& result,
                         grad::v1::ForwardResponse* out);
// `include_output` false leaves `output` unset (ComputeGradientsRequest.skip_output).
void EncodeGradientResult(const gradengine::GradientResult& result, bool include_output,
                          grad::v1::ComputeGradientsResponse* out);

// The results' `timing` is the engine's, from the response's Timing.forward_ns/backward_ns.
absl::StatusOr<gradengine::ForwardResult> DecodeForwardResult(
    const grad::v1::ForwardResponse& response);
absl::StatusOr<gradengine::GradientResult> DecodeGradientResult(
    const grad::v1::ComputeGradientsResponse& response);

// ---- Names the server advertises in GetInfo.

std::vector<std::string> SupportedActivationNames();
std::vector<std::string> SupportedObjectiveNames();

}  // namespace gradwire

#endif  // PROTO_WIRE_H_
