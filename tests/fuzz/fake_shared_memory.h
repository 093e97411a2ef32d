// An in-memory gradwire::SharedMemoryResolver for the fuzz targets: a few fixed regions, each
// in a heap block of exactly its size (so that ASan reports any byte read or written past a
// region's end), with the server's checks (server/shared_memory.cc, CallResolver::Resolve):
// unknown region, negative offset or size, a range past the region's end, an offset not
// aligned for float. It records every reference it resolved.
//
// The regions, as the server would see them after registration:
//   "a"       256 bytes, file 1 from offset 0
//   "a_tail"  128 bytes, file 1 from offset 128: the same memory as the second half of "a"
//   "b"       1040 bytes, file 2 (room for a tensor the framing references instead of copying)
//   "c"       6 bytes, file 3 (not a whole number of floats)
//   "m"       64 bytes, file 4 from offset 2, starting 2 bytes into its block: offset 2 is
//             aligned for float, offset 0 is not
//
// Not thread-safe; one per input.

#ifndef TESTS_FUZZ_FAKE_SHARED_MEMORY_H_
#define TESTS_FUZZ_FAKE_SHARED_MEMORY_H_

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "grad/v1/gradient_service.pb.h"
#include "proto/wire.h"

namespace gradfuzz {

class FakeSharedMemory final : public gradwire::SharedMemoryResolver {
 public:
  struct Region {
    std::string name;
    std::shared_ptr<char[]> block;  // the heap block the region lies in
    int64_t block_offset = 0;       // where the region starts in it
    int64_t byte_size = 0;
    uint64_t file_id = 0;
    int64_t file_offset = 0;
    char* begin() const { return block.get() + block_offset; }
  };
  struct Resolved {
    std::string field;
    const Region* region = nullptr;
    char* data = nullptr;
    int64_t byte_size = 0;
    uint64_t file_id = 0;
    int64_t file_begin = 0;
  };

  FakeSharedMemory() {
    std::shared_ptr<char[]> a = NewBlock(256);
    regions_.push_back({"a", a, 0, 256, 1, 0});
    regions_.push_back({"a_tail", a, 128, 128, 1, 128});
    regions_.push_back({"b", NewBlock(1040), 0, 1040, 2, 0});
    regions_.push_back({"c", NewBlock(6), 0, 6, 3, 0});
    regions_.push_back({"m", NewBlock(66), 2, 64, 4, 2});
  }

  absl::StatusOr<gradwire::SharedMemorySpan> Resolve(const grad::v1::SharedMemoryRef& ref,
                                                     absl::string_view field) override {
    const Region* region = nullptr;
    for (const Region& candidate : regions_) {
      if (candidate.name == ref.region()) region = &candidate;
    }
    if (region == nullptr) {
      return absl::NotFoundError(
          absl::StrCat(field, ".region is not a registered shared memory region"));
    }
    const int64_t offset = ref.offset();
    const int64_t size = ref.byte_size();
    if (offset < 0 || size < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".offset=", offset, " and byte_size=", size, " must both be >= 0"));
    }
    if (offset > region->byte_size || size > region->byte_size - offset) {
      return absl::InvalidArgumentError(absl::StrCat(
          field, ".offset=", offset, " + byte_size=", size, " is past the end of the region"));
    }
    char* data = region->begin() + offset;
    if (reinterpret_cast<uintptr_t>(data) % alignof(float) != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".offset=", offset, " is not aligned for FLOAT32"));
    }
    resolved_.push_back(
        {std::string(field), region, data, size, region->file_id, region->file_offset + offset});
    gradwire::SharedMemorySpan span;
    span.data = reinterpret_cast<float*>(data);
    span.owner = region->block;
    span.file_id = region->file_id;
    span.file_offset = region->file_offset + offset;
    return span;
  }

  const std::vector<Region>& regions() const { return regions_; }
  const std::vector<Resolved>& resolved() const { return resolved_; }

  // The reference resolved for `field`, or null.
  const Resolved* Find(absl::string_view field) const {
    for (const Resolved& entry : resolved_) {
      if (entry.field == field) return &entry;
    }
    return nullptr;
  }

 private:
  static std::shared_ptr<char[]> NewBlock(size_t size) {
    std::shared_ptr<char[]> block(new char[size]);
    std::memset(block.get(), 0x3c, size);
    return block;
  }

  std::vector<Region> regions_;
  std::vector<Resolved> resolved_;
};

}  // namespace gradfuzz

#endif  // TESTS_FUZZ_FAKE_SHARED_MEMORY_H_
