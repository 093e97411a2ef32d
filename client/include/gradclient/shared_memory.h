// Shared memory for a client on the same host as its gradserver: a POSIX shared memory object
// this process creates and maps, whose tensors travel to the server as references instead of
// bytes, and into which the server can write results directly.
//
//   auto region = *gradclient::SharedMemoryRegion::Create("batch", 64 << 20);
//   absl::Span<float> input = *region->Allocate(n);     // fill it in place
//   *client->RegisterSharedMemory(region);                // the server maps it
//   gradclient::CallOptions call;
//   call.result_region = region;                          // results are written there too
//   auto reply = client->ComputeGradients(request_whose_tensors_point_into_input, call);
//
// A request tensor whose memory lies entirely inside a region registered with the Client is
// sent as a SharedMemoryRef; any other tensor is sent as bytes. The server must run with
// --allow_shared_memory and be able to open the object (same user, or a `mode` that lets the
// server's group in; in Kubernetes an `emptyDir: {medium: Memory}` at /dev/shm shared by both
// containers, in Docker `--ipc=container:...` or `--ipc=host`).
//
// The object is unlinked, and the region unregistered from the server, when the last
// shared_ptr to it goes away (result tensors that live in it hold one). A region is registered
// with at most one Client at a time; if that Client is destroyed first, the region stays
// registered on the server until the caller unregisters it (an empty name: all of them) or the
// server shuts down. Shared memory is for a Client whose target is one server on this host:
// RegisterSharedMemory reaches only one of several.
//
// Thread safety: Allocate and Reset are thread-safe; the memory itself is the caller's to
// synchronize. The server writes results while a call runs.

#ifndef GRADCLIENT_SHARED_MEMORY_H_
#define GRADCLIENT_SHARED_MEMORY_H_

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "gradengine/network.h"

namespace gradclient {

class Client;

class SharedMemoryRegion {
 public:
  // Alignment of Allocate's spans, and of the results placed in a region.
  static constexpr size_t kAlignment = 64;
  // The region's first bytes, which Allocate never hands out: registering writes a random
  // proof there that the server checks (the caller can write the object).
  static constexpr size_t kHeaderBytes = kAlignment;
  static constexpr size_t kProofBytes = 32;

  // Creates and maps a new object of `usable_bytes` plus kHeaderBytes bytes under a fresh key
  // ("gradclient-" plus the pid and a random suffix) with permissions `mode`, and names it
  // `name` for the server. Errors: InvalidArgument for an empty name or a zero size,
  // ResourceExhausted or Internal when the object cannot be made.
  static absl::StatusOr<std::shared_ptr<SharedMemoryRegion>> Create(const std::string& name,
                                                                    size_t usable_bytes,
                                                                    mode_t mode = 0600);

  ~SharedMemoryRegion();
  SharedMemoryRegion(const SharedMemoryRegion&) = delete;
  SharedMemoryRegion& operator=(const SharedMemoryRegion&) = delete;

  const std::string& name() const { return name_; }
  // The shm_open name without the leading '/'; what RegisterSharedMemory sends.
  const std::string& key() const { return key_; }
  // The whole mapping, header included.
  char* data() const { return data_; }
  size_t byte_size() const { return byte_size_; }

  // `elements` floats at the next kAlignment-aligned free offset. ResourceExhausted when the
  // region is full.
  absl::StatusOr<absl::Span<float>> Allocate(size_t elements) ABSL_LOCKS_EXCLUDED(mu_);
  // The end of what Allocate has handed out so far (the header included, rounded up to
  // kAlignment).
  size_t allocated_bytes() const ABSL_LOCKS_EXCLUDED(mu_);
  // Forgets every allocation; the memory stays mapped.
  void Reset() ABSL_LOCKS_EXCLUDED(mu_);

  // The offset of [pointer, pointer + bytes) if it lies entirely inside the region.
  std::optional<int64_t> OffsetOf(const void* pointer, size_t bytes) const;

 private:
  friend class Client;
  SharedMemoryRegion(std::string name, std::string key, char* data, size_t byte_size);
  // Writes a fresh random proof into the header and returns it (for RegisterSharedMemory).
  std::string WriteProof();

  // How a registered region reaches its Client when it goes away; shared by the two, so that
  // either may be destroyed first (the Client clears `forget` when it goes).
  struct Registration {
    absl::Mutex mu;
    std::function<void(SharedMemoryRegion*)> forget ABSL_GUARDED_BY(mu);
  };

  const std::string name_;
  const std::string key_;
  char* const data_;
  const size_t byte_size_;

  mutable absl::Mutex mu_;
  size_t allocated_ ABSL_GUARDED_BY(mu_);
  // Set while registered with a Client; the destructor unregisters through it.
  std::shared_ptr<Registration> registration_ ABSL_GUARDED_BY(mu_);
};

// Copies the tensors of `request` (input, parameters, and the objective's tensor) into space
// allocated from `region`, and points the request's views at the copies, so that they travel as
// references once the region is registered. ResourceExhausted when the region is too small.
absl::Status CopyRequestInto(SharedMemoryRegion& region, gradengine::GradientRequest* request);

}  // namespace gradclient

#endif  // GRADCLIENT_SHARED_MEMORY_H_
