// The server's registry of shared memory regions: POSIX shared memory objects that clients on
// the same host create and register, so that tensors travel as references instead of bytes
// (grad.v1 RegisterSharedMemory, SharedMemoryRef, ResultPlacement).
//
// Trust model: a region is memory the client can change at any time. The server maps it
// MAP_SHARED, reads inputs from it and writes results into it while a call runs; a client that
// changes its inputs during its own call gets results of mixed inputs, as it would with a
// local library, and nothing else. The server never trusts the region's size: every use
// checks the object's current size with fstat and fails with FAILED_PRECONDITION if it shrank
// below the registered range (a read past the end of a shrunken object would raise SIGBUS).
// What remains is a race: an object shrunk *during* a call, after that check, can still
// raise SIGBUS in the server; only clients that can already open the server's shared memory
// objects (same host, same user or group, see the README) can do that.
//
// Keys name objects under /dev/shm as shm_open does: a safe character set, no '/', and the
// prefix gradwire::kSharedMemoryKeyPrefix, so that only objects made for this service can be
// mapped, never another program's that the server's user could open too. glibc's shm_open
// refuses symbolic links, and the object must be a regular file. Its pages are reserved
// (posix_fallocate) at registration, so a sparse object cannot fault later. Keys are never
// echoed in messages or logs; region names are, cut to a bounded prefix.
//
// Regions are per caller: `owner` is an opaque string the service derives from the call's
// credentials (the bearer token, or "" without tokens), so one token's regions cannot be used
// or removed with another, and an object one caller registered cannot be registered by
// another (PermissionDenied) while it stays registered. A registration must carry a proof: the
// random bytes the caller wrote at the start of the range, so that a caller that cannot write
// an object (another user's) cannot make the server map it for them, even though keys can be
// listed in /dev/shm. The service lets only callers on this
// host (a unix socket or loopback) use shared memory at all.
//
// Thread safety: all methods may be called concurrently. A mapping lives as long as its
// registration or the last call using it, whichever ends later; the registry unmaps
// everything left when it is destroyed.

#ifndef SERVER_SHARED_MEMORY_H_
#define SERVER_SHARED_MEMORY_H_

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "proto/wire.h"

namespace gradserver {

struct SharedMemoryOptions {
  // Whether clients may register regions at all. Default: false.
  bool allowed = false;
  // Regions registered at once, over every caller. Default: 64.
  int max_regions = 64;
  // Bytes mapped at once, over every region. Default: 4 GiB.
  int64_t max_mapped_bytes = int64_t{4} << 30;
};

// What GetSharedMemoryStatus reports of one region.
struct SharedMemoryRegionInfo {
  std::string name;
  int64_t offset = 0;
  int64_t byte_size = 0;
  int64_t calls_in_progress = 0;
};

class SharedMemoryRegistry {
 public:
  static absl::StatusOr<std::unique_ptr<SharedMemoryRegistry>> Create(
      const SharedMemoryOptions& options);
  ~SharedMemoryRegistry();

  SharedMemoryRegistry(const SharedMemoryRegistry&) = delete;
  SharedMemoryRegistry& operator=(const SharedMemoryRegistry&) = delete;

  const SharedMemoryOptions& options() const { return options_; }

  // Maps [offset, offset + byte_size) of object `key` as `name` for `owner`. Errors:
  // FailedPrecondition when shared memory is not allowed; InvalidArgument for a bad name, key,
  // offset or size, or a key naming a symbolic link (the key never quoted); AlreadyExists for a
  // name the owner has registered; ResourceExhausted past max_regions or max_mapped_bytes, or
  // when the object's pages cannot be reserved; NotFound for no such object; PermissionDenied
  // when the server may not open it, another owner registered it, or the range does not begin
  // with `proof` (16 to 64 bytes the caller wrote there: a caller that cannot write the object
  // cannot have the server map it). Registering the same object, range and name again is OK.
  absl::Status Register(const std::string& owner, const std::string& name, const std::string& key,
                        int64_t offset, int64_t byte_size, const std::string& proof)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Removes `name` (empty: every region of `owner`); returns how many were removed. NotFound
  // for a name the owner has not registered; FailedPrecondition when shared memory is not
  // allowed (as for Status). Calls using a region keep its mapping until they
  // end.
  absl::StatusOr<int> Unregister(const std::string& owner, const std::string& name)
      ABSL_LOCKS_EXCLUDED(mu_);
  // The owner's regions (empty name: all of them), by name. NotFound for an unknown name.
  absl::StatusOr<std::vector<SharedMemoryRegionInfo>> Status(const std::string& owner,
                                                             const std::string& name) const
      ABSL_LOCKS_EXCLUDED(mu_);

  // A resolver for one call of `owner`; it keeps each region it resolves mapped until it is
  // destroyed.
  std::unique_ptr<gradwire::SharedMemoryResolver> NewCallResolver(const std::string& owner);

  // For metrics: the regions registered now, over every owner, and the bytes mapped now,
  // counted against max_mapped_bytes (registrations in progress, and regions unregistered
  // while a call still uses them, included).
  int regions() const ABSL_LOCKS_EXCLUDED(mu_);
  int64_t mapped_bytes() const { return mapped_bytes_->load(std::memory_order_relaxed); }

  class Region;

 private:
  explicit SharedMemoryRegistry(const SharedMemoryOptions& options);
  absl::Status CheckAllowed() const;
  // Opens, checks, reserves and maps the range; no lock held.
  absl::StatusOr<std::shared_ptr<Region>> MapRegion(const std::string& owner,
                                                    const std::string& name, const std::string& key,
                                                    int64_t offset, int64_t byte_size);
  static bool ProofMatches(const Region& region, const std::string& proof);
  std::shared_ptr<Region> Find(const std::string& owner, const std::string& name) const
      ABSL_LOCKS_EXCLUDED(mu_);
  friend class CallResolver;

  const SharedMemoryOptions options_;
  // Shared with the regions, which give their bytes back when their last user lets go.
  const std::shared_ptr<std::atomic<int64_t>> mapped_bytes_;
  mutable absl::Mutex mu_;
  std::map<std::pair<std::string, std::string>, std::shared_ptr<Region>> regions_
      ABSL_GUARDED_BY(mu_);
  // Registrations between their reservation and their insertion.
  int pending_registrations_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace gradserver

#endif  // SERVER_SHARED_MEMORY_H_
