#include "server/shared_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gradengine/quote.h"

namespace gradserver {
namespace {

constexpr size_t kMaxNameBytes = 128;
constexpr size_t kMaxKeyBytes = 200;
constexpr size_t kMinProofBytes = 16;
constexpr size_t kMaxProofBytes = 64;
absl::Status CheckName(const std::string& name) {
  if (name.empty()) return absl::InvalidArgumentError("name is empty");
  if (name.size() > kMaxNameBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("name has ", name.size(), " bytes; at most ", kMaxNameBytes, " are allowed"));
  }
  for (const char c : name) {
    if (c < 0x20 || c > 0x7e) {
      return absl::InvalidArgumentError(
          absl::StrCat("name=", gradengine::Quote(name), " may hold only printable ASCII"));
    }
  }
  return absl::OkStatus();
}

// The key's problem, described without the key itself.
absl::Status CheckKey(const std::string& key) {
  if (key.empty()) return absl::InvalidArgumentError("key is empty");
  if (key.size() > kMaxKeyBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("key has ", key.size(), " bytes; at most ", kMaxKeyBytes, " are allowed"));
  }
  for (const char c : key) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '-') {
      return absl::InvalidArgumentError(
          "key may hold only letters, digits, '.', '_' and '-' (no '/'; give the name without "
          "the leading '/' shm_open takes)");
    }
  }
  // Only objects made for this service: never another program's (a database's segments,
  // glibc's sem.* semaphores), which the server's user may be able to open too.
  if (!absl::StartsWith(key, gradwire::kSharedMemoryKeyPrefix)) {
    return absl::InvalidArgumentError(
        absl::StrCat("key must start with \"", gradwire::kSharedMemoryKeyPrefix, "\""));
  }
  return absl::OkStatus();
}

}  // namespace

// One registered mapping. Immutable after creation but for the call counter.
class SharedMemoryRegistry::Region {
 public:
  Region(std::string owner, std::string name, int fd, void* map_base, size_t map_length,
         int64_t map_delta, int64_t offset, int64_t byte_size, uint64_t file_id,
         std::shared_ptr<std::atomic<int64_t>> mapped_bytes)
      : owner_(std::move(owner)),
        name_(std::move(name)),
        fd_(fd),
        map_base_(map_base),
        map_length_(map_length),
        data_(static_cast<char*>(map_base) + map_delta),
        offset_(offset),
        byte_size_(byte_size),
        file_id_(file_id),
        mapped_bytes_(std::move(mapped_bytes)) {}

  ~Region() {
    munmap(map_base_, map_length_);
    close(fd_);
    mapped_bytes_->fetch_sub(byte_size_, std::memory_order_relaxed);
  }

  const std::string& owner() const { return owner_; }
  const std::string& name() const { return name_; }
  int64_t offset() const { return offset_; }
  int64_t byte_size() const { return byte_size_; }
  uint64_t file_id() const { return file_id_; }
  char* data() const { return data_; }
  std::atomic<int64_t>& calls_in_progress() { return calls_in_progress_; }

  // FailedPrecondition if the object is no longer as large as the registered range needs.
  absl::Status CheckStillMapped() const {
    struct stat st;
    if (fstat(fd_, &st) != 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("shared memory region ", gradengine::Quote(name_),
                       " can no longer be checked: ", std::strerror(errno)));
    }
    if (st.st_size < offset_ + byte_size_) {
      return absl::FailedPreconditionError(
          absl::StrCat("shared memory region ", gradengine::Quote(name_), " has shrunk to ",
                       st.st_size, " bytes since it was registered with offset ", offset_,
                       " and byte_size ", byte_size_, "; unregister it and register it again"));
    }
    return absl::OkStatus();
  }

 private:
  const std::string owner_;
  const std::string name_;
  const int fd_;
  void* const map_base_;
  const size_t map_length_;
  char* const data_;
  const int64_t offset_;
  const int64_t byte_size_;
  const uint64_t file_id_;
  const std::shared_ptr<std::atomic<int64_t>> mapped_bytes_;
  std::atomic<int64_t> calls_in_progress_{0};
};

// Resolves the references of one call; holds each region it used until the call ends.
class CallResolver final : public gradwire::SharedMemoryResolver {
 public:
  CallResolver(const SharedMemoryRegistry* registry, std::string owner)
      : registry_(registry), owner_(std::move(owner)) {}

  ~CallResolver() override {
    for (const auto& [name, region] : used_) {
      region->calls_in_progress().fetch_sub(1, std::memory_order_relaxed);
    }
  }

  absl::StatusOr<gradwire::SharedMemorySpan> Resolve(const grad::v1::SharedMemoryRef& ref,
                                                     absl::string_view field) override {
    std::shared_ptr<SharedMemoryRegistry::Region> region;
    const auto used = used_.find(ref.region());
    if (used != used_.end()) {
      region = used->second;
    } else {
      region = registry_->Find(owner_, ref.region());
      if (region == nullptr) {
        return absl::NotFoundError(absl::StrCat(field, ".region=", gradengine::Quote(ref.region()),
                                                " is not a registered shared memory region"));
      }
    }
    const int64_t offset = ref.offset();
    const int64_t size = ref.byte_size();
    if (offset < 0 || size < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".offset=", offset, " and byte_size=", size, " must both be >= 0"));
    }
    if (offset > region->byte_size() || size > region->byte_size() - offset) {
      return absl::InvalidArgumentError(absl::StrCat(
          field, ".offset=", offset, " + byte_size=", size, " is past the end of region ",
          gradengine::Quote(ref.region()), " (", region->byte_size(), " bytes)"));
    }
    if (reinterpret_cast<uintptr_t>(region->data() + offset) % alignof(float) != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".offset=", offset,
                       " is not aligned for FLOAT32; use a multiple of 4 (with a "
                       "registered offset that is one too)"));
    }
    if (used == used_.end()) {
      if (absl::Status status = region->CheckStillMapped(); !status.ok()) return status;
      region->calls_in_progress().fetch_add(1, std::memory_order_relaxed);
      used_.emplace(ref.region(), region);
    }
    gradwire::SharedMemorySpan span;
    span.data = reinterpret_cast<float*>(region->data() + offset);
    span.owner = region;
    span.file_id = region->file_id();
    span.file_offset = region->offset() + offset;
    return span;
  }

  absl::Status Revalidate() override {
    for (const auto& [name, region] : used_) {
      if (absl::Status status = region->CheckStillMapped(); !status.ok()) return status;
    }
    return absl::OkStatus();
  }

 private:
  const SharedMemoryRegistry* const registry_;
  const std::string owner_;
  std::map<std::string, std::shared_ptr<SharedMemoryRegistry::Region>> used_;
};

absl::StatusOr<std::unique_ptr<SharedMemoryRegistry>> SharedMemoryRegistry::Create(
    const SharedMemoryOptions& options) {
  if (options.max_regions < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_shared_memory_regions=", options.max_regions, " must be >= 1"));
  }
  if (options.max_mapped_bytes < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_shared_memory_mb=", options.max_mapped_bytes >> 20, " must be >= 1"));
  }
  return std::unique_ptr<SharedMemoryRegistry>(new SharedMemoryRegistry(options));
}

SharedMemoryRegistry::SharedMemoryRegistry(const SharedMemoryOptions& options)
    : options_(options), mapped_bytes_(std::make_shared<std::atomic<int64_t>>(0)) {}

SharedMemoryRegistry::~SharedMemoryRegistry() {
  absl::MutexLock lock(&mu_);
  regions_.clear();
}

absl::Status SharedMemoryRegistry::Register(const std::string& owner, const std::string& name,
                                            const std::string& key, int64_t offset,
                                            int64_t byte_size, const std::string& proof) {
  if (absl::Status status = CheckAllowed(); !status.ok()) return status;
  if (absl::Status status = CheckName(name); !status.ok()) return status;
  if (absl::Status status = CheckKey(key); !status.ok()) return status;
  if (offset < 0) {
    return absl::InvalidArgumentError(absl::StrCat("offset=", offset, " must be >= 0"));
  }
  if (byte_size <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("byte_size=", byte_size, " must be > 0"));
  }
  if (byte_size > std::numeric_limits<int64_t>::max() - offset) {
    return absl::InvalidArgumentError(
        absl::StrCat("offset=", offset, " + byte_size=", byte_size, " overflows"));
  }
  if (proof.size() < kMinProofBytes || proof.size() > kMaxProofBytes) {
    return absl::InvalidArgumentError(absl::StrCat("proof has ", proof.size(), " bytes; give ",
                                                   kMinProofBytes, " to ", kMaxProofBytes,
                                                   " random bytes written at the range's start"));
  }
  if (byte_size < static_cast<int64_t>(proof.size())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "byte_size=", byte_size, " is smaller than the proof's ", proof.size(), " bytes"));
  }
  if (byte_size > options_.max_mapped_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat("byte_size=", byte_size, " is over the server's limit of ",
                     options_.max_mapped_bytes, " mapped bytes (max_shared_memory_mb)"));
  }

  // Reserve a slot and the bytes first; the system calls below (reserving up to gigabytes of
  // pages) run without the lock, so that calls resolving other regions are not held up.
  {
    absl::MutexLock lock(&mu_);
    if (static_cast<int>(regions_.size()) + pending_registrations_ >= options_.max_regions) {
      return absl::ResourceExhaustedError(
          absl::StrCat("the server has ", regions_.size(),
                       " shared memory regions registered, its limit "
                       "(max_shared_memory_regions); unregister some first"));
    }
    const int64_t mapped = mapped_bytes_->load(std::memory_order_relaxed);
    if (byte_size > options_.max_mapped_bytes - mapped) {
      return absl::ResourceExhaustedError(
          absl::StrCat("registering byte_size=", byte_size, " would map ", mapped + byte_size,
                       " bytes, over the server's limit of ", options_.max_mapped_bytes,
                       " (max_shared_memory_mb)"));
    }
    ++pending_registrations_;
    mapped_bytes_->fetch_add(byte_size, std::memory_order_relaxed);
  }
  absl::StatusOr<std::shared_ptr<Region>> region = MapRegion(owner, name, key, offset, byte_size);
  absl::MutexLock lock(&mu_);
  --pending_registrations_;
  if (!region.ok()) {
    mapped_bytes_->fetch_sub(byte_size, std::memory_order_relaxed);
    return region.status();
  }
  // The region gives its bytes back when it is destroyed, whatever happens below.
  if (!ProofMatches(**region, proof)) {
    return absl::PermissionDeniedError(
        "the range's first bytes do not match the proof: the caller must write the proof into "
        "the object itself before registering it");
  }
  // One caller per object: another token cannot map memory a caller registered.
  for (const auto& [owner_and_name, other] : regions_) {
    if (other->file_id() == (*region)->file_id() && other->owner() != owner) {
      return absl::PermissionDeniedError(
          "the shared memory object with the given key is registered by another caller");
    }
  }
  const auto existing = regions_.find({owner, name});
  if (existing != regions_.end()) {
    // The same registration again (a retried call whose answer was lost) is not an error.
    const Region& same = *existing->second;
    if (same.file_id() == (*region)->file_id() && same.offset() == offset &&
        same.byte_size() == byte_size) {
      return absl::OkStatus();
    }
    return absl::AlreadyExistsError(absl::StrCat("shared memory region ", gradengine::Quote(name),
                                                 " is already registered; unregister it first"));
  }
  regions_.emplace(std::make_pair(owner, name), *std::move(region));
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<SharedMemoryRegistry::Region>> SharedMemoryRegistry::MapRegion(
    const std::string& owner, const std::string& name, const std::string& key, int64_t offset,
    int64_t byte_size) {
  // glibc's shm_open adds O_NOFOLLOW and O_CLOEXEC.
  const int fd = shm_open(absl::StrCat("/", key).c_str(), O_RDWR, 0);
  if (fd < 0) {
    const int error = errno;
    if (error == ENOENT) {
      return absl::NotFoundError("no shared memory object has the given key");
    }
    if (error == EACCES || error == EPERM) {
      return absl::PermissionDeniedError(
          "the server may not open the shared memory object with the given key for reading and "
          "writing; give the server's user access");
    }
    if (error == ELOOP) {
      return absl::InvalidArgumentError(
          "the given key names a symbolic link, not a shared memory object");
    }
    return absl::FailedPreconditionError(absl::StrCat(
        "the shared memory object with the given key cannot be opened: ", std::strerror(error)));
  }
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    close(fd);
    return absl::InvalidArgumentError("the given key does not name a shared memory object");
  }
  if (st.st_size < offset + byte_size) {
    close(fd);
    return absl::InvalidArgumentError(absl::StrCat("offset=", offset, " + byte_size=", byte_size,
                                                   " is past the end of the object"));
  }
  // A sparse object (ftruncate alone makes one) would fault in pages when the engine first
  // touches them, and a full /dev/shm turns that fault into SIGBUS: reserve them now.
  if (const int error = posix_fallocate(fd, offset, byte_size); error != 0) {
    close(fd);
    if (error == ENOSPC) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "byte_size=", byte_size, " cannot be backed: the shared memory filesystem is full"));
    }
    return absl::FailedPreconditionError(
        absl::StrCat("the object's pages cannot be reserved: ", std::strerror(error)));
  }
  const int64_t page = sysconf(_SC_PAGESIZE);
  const int64_t map_start = offset / page * page;
  const int64_t map_delta = offset - map_start;
  const size_t map_length = static_cast<size_t>(map_delta + byte_size);
  void* base = mmap(nullptr, map_length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, map_start);
  if (base == MAP_FAILED) {
    const int error = errno;
    close(fd);
    return absl::ResourceExhaustedError(
        absl::StrCat("could not map byte_size=", byte_size, ": ", std::strerror(error)));
  }
  const uint64_t file_id =
      (static_cast<uint64_t>(st.st_dev) << 40) ^ static_cast<uint64_t>(st.st_ino);
  return std::make_shared<Region>(owner, name, fd, base, map_length, map_delta, offset, byte_size,
                                  file_id, mapped_bytes_);
}

bool SharedMemoryRegistry::ProofMatches(const Region& region, const std::string& proof) {
  // Compared in full, without an early exit: the time does not tell how much matched.
  unsigned char difference = 0;
  for (size_t i = 0; i < proof.size(); ++i) {
    difference |= static_cast<unsigned char>(region.data()[i] ^ proof[i]);
  }
  return difference == 0;
}

absl::Status SharedMemoryRegistry::CheckAllowed() const {
  if (options_.allowed) return absl::OkStatus();
  return absl::FailedPreconditionError(
      "shared memory is disabled on this server; start it with --allow_shared_memory");
}

absl::StatusOr<int> SharedMemoryRegistry::Unregister(const std::string& owner,
                                                     const std::string& name) {
  if (absl::Status status = CheckAllowed(); !status.ok()) return status;
  std::vector<std::shared_ptr<Region>> removed;  // unmapped outside the lock
  absl::MutexLock lock(&mu_);
  if (!name.empty()) {
    const auto it = regions_.find({owner, name});
    if (it == regions_.end()) {
      return absl::NotFoundError(
          absl::StrCat("shared memory region ", gradengine::Quote(name), " is not registered"));
    }
    removed.push_back(std::move(it->second));
    regions_.erase(it);
    return 1;
  }
  for (auto it = regions_.lower_bound({owner, ""});
       it != regions_.end() && it->first.first == owner;) {
    removed.push_back(std::move(it->second));
    it = regions_.erase(it);
  }
  return static_cast<int>(removed.size());
}

absl::StatusOr<std::vector<SharedMemoryRegionInfo>> SharedMemoryRegistry::Status(
    const std::string& owner, const std::string& name) const {
  if (absl::Status status = CheckAllowed(); !status.ok()) return status;
  std::vector<SharedMemoryRegionInfo> infos;
  absl::MutexLock lock(&mu_);
  for (auto it = regions_.lower_bound({owner, name});
       it != regions_.end() && it->first.first == owner; ++it) {
    if (!name.empty() && it->first.second != name) break;
    const Region& region = *it->second;
    infos.push_back({region.name(), region.offset(), region.byte_size(),
                     it->second->calls_in_progress().load(std::memory_order_relaxed)});
  }
  if (!name.empty() && infos.empty()) {
    return absl::NotFoundError(
        absl::StrCat("shared memory region ", gradengine::Quote(name), " is not registered"));
  }
  return infos;
}

std::unique_ptr<gradwire::SharedMemoryResolver> SharedMemoryRegistry::NewCallResolver(
    const std::string& owner) {
  return std::make_unique<CallResolver>(this, owner);
}

std::shared_ptr<SharedMemoryRegistry::Region> SharedMemoryRegistry::Find(
    const std::string& owner, const std::string& name) const {
  absl::MutexLock lock(&mu_);
  const auto it = regions_.find({owner, name});
  return it == regions_.end() ? nullptr : it->second;
}

int SharedMemoryRegistry::regions() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(regions_.size());
}

}  // namespace gradserver
