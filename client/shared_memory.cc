#include "gradclient/shared_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <vector>

#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "proto/wire.h"

namespace gradclient {

absl::StatusOr<std::shared_ptr<SharedMemoryRegion>> SharedMemoryRegion::Create(
    const std::string& name, size_t usable_bytes, mode_t mode) {
  if (name.empty()) return absl::InvalidArgumentError("shared memory region name is empty");
  if (usable_bytes == 0 || usable_bytes > SIZE_MAX - kHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "shared memory region \"", name, "\": byte_size=", usable_bytes, " is out of range"));
  }
  const size_t byte_size = usable_bytes + kHeaderBytes;
  absl::BitGen gen;
  const std::string key = absl::StrFormat("%s%d-%016x", gradwire::kSharedMemoryKeyPrefix,
                                          static_cast<int>(getpid()), absl::Uniform<uint64_t>(gen));
  const std::string path = "/" + key;
  const int fd = shm_open(path.c_str(), O_RDWR | O_CREAT | O_EXCL, mode);
  if (fd < 0) {
    return absl::InternalError(absl::StrCat("shared memory region \"", name,
                                            "\": shm_open failed: ", std::strerror(errno)));
  }
  // shm_open applies the umask; the mode asked for is what the server's access depends on.
  fchmod(fd, mode);
  // posix_fallocate reserves the pages now, so that touching them later cannot fail with
  // SIGBUS when /dev/shm fills up.
  const int error = ftruncate(fd, static_cast<off_t>(byte_size)) != 0
                        ? errno
                        : posix_fallocate(fd, 0, static_cast<off_t>(byte_size));
  if (error != 0) {
    close(fd);
    shm_unlink(path.c_str());
    return absl::ResourceExhaustedError(
        absl::StrCat("shared memory region \"", name, "\": ", byte_size,
                     " bytes are not available: ", std::strerror(error)));
  }
  void* data = mmap(nullptr, byte_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int map_error = errno;
  close(fd);
  if (data == MAP_FAILED) {
    shm_unlink(path.c_str());
    return absl::ResourceExhaustedError(absl::StrCat(
        "shared memory region \"", name, "\": mmap failed: ", std::strerror(map_error)));
  }
  return std::shared_ptr<SharedMemoryRegion>(
      new SharedMemoryRegion(name, key, static_cast<char*>(data), byte_size));
}

SharedMemoryRegion::SharedMemoryRegion(std::string name, std::string key, char* data,
                                       size_t byte_size)
    : name_(std::move(name)),
      key_(std::move(key)),
      data_(data),
      byte_size_(byte_size),
      allocated_(kHeaderBytes) {}

SharedMemoryRegion::~SharedMemoryRegion() {
  std::shared_ptr<Registration> registration;
  {
    absl::MutexLock lock(&mu_);
    registration = std::move(registration_);
  }
  if (registration != nullptr) {
    // Held while unregistering, so that the Client cannot go away meanwhile.
    absl::MutexLock lock(&registration->mu);
    if (registration->forget) registration->forget(this);
  }
  munmap(data_, byte_size_);
  shm_unlink(("/" + key_).c_str());
}

absl::StatusOr<absl::Span<float>> SharedMemoryRegion::Allocate(size_t elements) {
  absl::MutexLock lock(&mu_);
  const size_t bytes = elements * sizeof(float);
  if (elements > byte_size_ / sizeof(float) || bytes > byte_size_ - allocated_) {
    return absl::ResourceExhaustedError(absl::StrCat("shared memory region \"", name_, "\" has ",
                                                     byte_size_ - allocated_, " bytes free; ",
                                                     bytes, " were asked for"));
  }
  float* span = reinterpret_cast<float*>(data_ + allocated_);
  allocated_ =
      std::min(byte_size_, (allocated_ + bytes + kAlignment - 1) / kAlignment * kAlignment);
  return absl::Span<float>(span, elements);
}

size_t SharedMemoryRegion::allocated_bytes() const {
  absl::MutexLock lock(&mu_);
  return allocated_;
}

void SharedMemoryRegion::Reset() {
  absl::MutexLock lock(&mu_);
  allocated_ = kHeaderBytes;
}

std::string SharedMemoryRegion::WriteProof() {
  absl::BitGen gen;
  std::string proof(kProofBytes, '\0');
  for (char& c : proof) c = static_cast<char>(absl::Uniform<uint8_t>(gen));
  std::memcpy(data_, proof.data(), proof.size());
  return proof;
}

std::optional<int64_t> SharedMemoryRegion::OffsetOf(const void* pointer, size_t bytes) const {
  const uintptr_t begin = reinterpret_cast<uintptr_t>(data_);
  const uintptr_t p = reinterpret_cast<uintptr_t>(pointer);
  if (p < begin || p - begin > byte_size_ || bytes > byte_size_ - (p - begin)) return std::nullopt;
  return static_cast<int64_t>(p - begin);
}

absl::Status CopyRequestInto(SharedMemoryRegion& region, gradengine::GradientRequest* request) {
  std::vector<gradengine::TensorView*> views = {&request->input};
  for (auto& [name, view] : request->parameters) views.push_back(&view);
  switch (request->objective.kind) {
    case gradengine::ObjectiveKind::kMse:
    case gradengine::ObjectiveKind::kGradOutput:
      views.push_back(&request->objective.tensor);
      break;
    case gradengine::ObjectiveKind::kSum:
    case gradengine::ObjectiveKind::kCrossEntropy:  // int64 labels are sent as bytes
      break;
  }
  for (gradengine::TensorView* view : views) {
    absl::StatusOr<absl::Span<float>> copy = region.Allocate(static_cast<size_t>(view->size));
    if (!copy.ok()) return copy.status();
    std::copy(view->data, view->data + view->size, copy->begin());
    view->data = copy->data();
  }
  return absl::OkStatus();
}

}  // namespace gradclient
