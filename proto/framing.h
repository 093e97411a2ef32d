// Messages of grad.v1 in the protobuf wire format, assembled as gRPC slices so that tensor
// bytes are sent from where they lie instead of being copied into the message.
//
// A Frame is a list of pieces: small bytes it owns (tags, lengths, shapes, names, the network)
// and large byte ranges it only refers to, each kept alive by a shared owner until gRPC has
// sent it. The Frame*Request and Frame*Response functions walk a *skeleton* message (the full
// message with every tensor's `data` left empty, see wire.h's EncodeTensorHeader) in field
// order and insert each tensor's bytes as a referenced range, so the result is byte for byte
// what protobuf's serializer writes for the full message; a tensor given as a SharedMemoryRef
// has no bytes and is written as the skeleton has it.
//
// Thread-compatible; no state.

#ifndef PROTO_FRAMING_H_
#define PROTO_FRAMING_H_

#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/support/slice.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "google/protobuf/message_lite.h"
#include "grad/v1/gradient_service.pb.h"
#include "gradengine/network.h"
#include "gradengine/tensor.h"

namespace gradwire {

class Frame {
 public:
  Frame() = default;
  Frame(Frame&&) = default;
  Frame& operator=(Frame&&) = default;

  // Field `field` as a varint (wire type 0), a fixed64 double (1), or length-delimited bytes
  // (2, copied). Written even when the value is a default: callers follow proto3's presence.
  void AddVarint(int field, uint64_t value);
  void AddDouble(int field, double value);
  void AddString(int field, absl::string_view value);
  // `message` serialized as field `field`.
  void AddMessage(int field, const google::protobuf::MessageLite& message);
  // `child` as a length-delimited field `field`, its pieces moved in.
  void AddFrame(int field, Frame child);
  // `message`'s fields, serialized, without a tag of its own.
  void AppendFields(const google::protobuf::MessageLite& message);
  // A bytes field whose `size` bytes at `data` are referenced, not copied; `owner` (may be
  // null if the caller keeps the bytes alive until gRPC releases the slices) goes with them.
  void AddExternal(int field, const void* data, size_t size, std::shared_ptr<const void> owner);

  // Bytes in all.
  size_t size() const { return size_; }
  // How many of them are referenced rather than copied.
  size_t external_bytes() const { return external_bytes_; }

  // The pieces as gRPC slices; referenced ranges become slices that hold their owner.
  grpc::ByteBuffer ToByteBuffer() &&;
  // All bytes in one string (for tests).
  std::string Flatten() const;

 private:
  struct Piece {
    std::string owned;  // used when data == nullptr
    const void* data = nullptr;
    size_t size = 0;
    std::shared_ptr<const void> owner;
  };

  // Closes the owned bytes so far into a piece, before a referenced one.
  void FlushPending();
  void AppendRaw(absl::string_view bytes);
  void AppendTag(int field, int wire_type);
  void AppendVarint(uint64_t value);

  std::vector<Piece> pieces_;
  std::string pending_;  // owned bytes not yet closed into a piece
  size_t size_ = 0;
  size_t external_bytes_ = 0;
};

// The request frames (client side). `skeleton` is the request with tensor headers only (and
// SharedMemoryRefs where the caller placed tensors in shared memory), `request` the engine
// request whose views hold the bytes, `owner` what keeps those bytes alive (may be null).
Frame FrameForwardRequest(const grad::v1::ForwardRequest& skeleton,
                          const gradengine::ForwardRequest& request,
                          const std::shared_ptr<const void>& owner);
Frame FrameGradientRequest(const grad::v1::ComputeGradientsRequest& skeleton,
                           const gradengine::GradientRequest& request,
                           const std::shared_ptr<const void>& owner);

// The response frames (server side), from a skeleton response (see EncodeForwardResponseSkeleton)
// and the results whose buffers hold the bytes; each buffer's owner goes with its slice.
Frame FrameForwardResponse(const grad::v1::ForwardResponse& skeleton,
                           const gradengine::ForwardResult& result);
Frame FrameGradientResponse(const grad::v1::ComputeGradientsResponse& skeleton,
                            const gradengine::GradientResult& result);

// Skeleton responses: every result's header, or, where `placement` put the result in shared
// memory, its SharedMemoryRef; loss and parameter names as EncodeGradientResult writes them.
void EncodeForwardResponseSkeleton(const gradengine::ForwardResult& result,
                                   const grad::v1::ResultPlacement& placement,
                                   grad::v1::ForwardResponse* out);
void EncodeGradientResponseSkeleton(const gradengine::GradientResult& result, bool include_output,
                                    const grad::v1::ResultPlacement& placement,
                                    grad::v1::ComputeGradientsResponse* out);

}  // namespace gradwire

#endif  // PROTO_FRAMING_H_
