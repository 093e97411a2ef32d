// Dense float32 tensors as the engine's callers see them: NCHW, contiguous, row-major.
//
// A Tensor's values live in a TensorBuffer: a pointer and a size plus a shared owner that keeps
// the memory alive, whoever produced it: the buffer's own 64-byte-aligned allocation, a
// std::vector, a gRPC slice, a protobuf string, a shared memory mapping. That lets results be
// computed straight into the memory that is sent, and received bytes be used where they lie.
// Copying a TensorBuffer (or a Tensor) copies the values into a fresh allocation, so Tensors
// keep value semantics; moving one moves the reference.
//
// A TensorView borrows values: the caller keeps the memory alive and unchanged for the
// duration of the call it is passed to. None of these types is synchronized; share one between
// threads only for reading.

#ifndef GRADENGINE_TENSOR_H_
#define GRADENGINE_TENSOR_H_

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/types/span.h"

namespace gradengine {

// Contiguous float storage with a shared owner. Its element interface (data, size, begin, end,
// operator[]) is a std::vector's, without resizing.
class TensorBuffer {
 public:
  using value_type = float;
  using size_type = size_t;
  using iterator = float*;
  using const_iterator = const float*;

  // Alignment of the buffers this class allocates itself.
  static constexpr size_t kAlignment = 64;

  TensorBuffer() = default;
  // Adopts `values` without copying them.
  TensorBuffer(std::vector<float> values);  // NOLINT(google-explicit-constructor)
  TensorBuffer(std::initializer_list<float> values);

  // `size` floats of fresh, uninitialised, kAlignment-aligned memory, for results that are
  // written in full before they are read (debug builds fill it with NaN, so that tests catch
  // an element left unwritten). Throws std::bad_alloc when memory runs out.
  static TensorBuffer Uninitialized(size_t size);
  // As Uninitialized, filled with zeros.
  static TensorBuffer Zeros(size_t size);
  // `size` floats at `data`, which stay valid as long as `owner` (or a copy of it) lives. A
  // null owner means the caller guarantees the memory outlives every use of the buffer.
  static TensorBuffer Wrap(float* data, size_t size, std::shared_ptr<const void> owner);

  TensorBuffer(const TensorBuffer& other);
  TensorBuffer& operator=(const TensorBuffer& other);
  TensorBuffer(TensorBuffer&& other) noexcept;
  TensorBuffer& operator=(TensorBuffer&& other) noexcept;
  ~TensorBuffer() = default;

  float* data() { return data_; }
  const float* data() const { return data_; }
  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  float& operator[](size_t i) { return data_[i]; }
  const float& operator[](size_t i) const { return data_[i]; }
  float* begin() { return data_; }
  float* end() { return data_ + size_; }
  const float* begin() const { return data_; }
  const float* end() const { return data_ + size_; }

  // What keeps the memory alive; null for an empty buffer or a Wrap with a null owner.
  const std::shared_ptr<const void>& owner() const { return owner_; }

  // Elementwise equality (NaN != NaN, as for std::vector<float>).
  friend bool operator==(const TensorBuffer& a, const TensorBuffer& b);
  friend bool operator!=(const TensorBuffer& a, const TensorBuffer& b) { return !(a == b); }

 private:
  TensorBuffer(float* data, size_t size, std::shared_ptr<const void> owner)
      : owner_(std::move(owner)), data_(data), size_(size) {}

  std::shared_ptr<const void> owner_;
  float* data_ = nullptr;
  size_t size_ = 0;
};

// Read-only view of a row-major float32 tensor.
struct TensorView {
  std::vector<int64_t> shape;
  const float* data = nullptr;
  // Number of elements `data` points at; must equal the product of `shape`.
  int64_t size = 0;

  TensorView() = default;
  TensorView(std::vector<int64_t> shape_in, absl::Span<const float> values)
      : shape(std::move(shape_in)),
        data(values.data()),
        size(static_cast<int64_t>(values.size())) {}

  absl::Span<const float> values() const {
    return absl::Span<const float>(data, static_cast<size_t>(size));
  }
};

// Row-major float32 tensor holding (a share of) its values.
struct Tensor {
  std::vector<int64_t> shape;
  TensorBuffer data;

  Tensor() = default;
  Tensor(std::vector<int64_t> shape_in, TensorBuffer data_in)
      : shape(std::move(shape_in)), data(std::move(data_in)) {}

  // A zero-filled tensor. REQUIRES: every dim >= 0 and the product fits in size_t.
  static Tensor Zeros(std::vector<int64_t> shape);
  // A tensor of uninitialised values, for results written in full. Same REQUIRES.
  static Tensor Uninitialized(std::vector<int64_t> shape);

  TensorView view() const { return TensorView(shape, data); }
  int64_t num_elements() const { return static_cast<int64_t>(data.size()); }
};

// "[1, 8, 26, 26]"
std::string ShapeToString(absl::Span<const int64_t> shape);

}  // namespace gradengine

#endif  // GRADENGINE_TENSOR_H_
