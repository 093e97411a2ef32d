#include "gradengine/tensor.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>

#include "absl/strings/str_join.h"

namespace gradengine {
namespace {

// A fresh aligned allocation of `size` floats and the owner that frees it.
std::pair<float*, std::shared_ptr<const void>> Allocate(size_t size) {
  if (size == 0) return {nullptr, nullptr};
  if (size > (SIZE_MAX - TensorBuffer::kAlignment) / sizeof(float)) throw std::bad_alloc();
  const size_t bytes = (size * sizeof(float) + TensorBuffer::kAlignment - 1) /
                       TensorBuffer::kAlignment * TensorBuffer::kAlignment;
  void* memory = std::aligned_alloc(TensorBuffer::kAlignment, bytes);
  if (memory == nullptr) throw std::bad_alloc();
  return {static_cast<float*>(memory), std::shared_ptr<const void>(memory, [](const void* p) {
            std::free(const_cast<void*>(p));
          })};
}

int64_t NumElements(absl::Span<const int64_t> shape) {
  int64_t count = 1;
  for (int64_t d : shape) count *= d;
  return count;
}

}  // namespace

TensorBuffer::TensorBuffer(std::vector<float> values) {
  if (values.empty()) return;
  auto owned = std::make_shared<std::vector<float>>(std::move(values));
  data_ = owned->data();
  size_ = owned->size();
  owner_ = std::move(owned);
}

TensorBuffer::TensorBuffer(std::initializer_list<float> values)
    : TensorBuffer(std::vector<float>(values)) {}

TensorBuffer TensorBuffer::Uninitialized(size_t size) {
  auto [data, owner] = Allocate(size);
#ifndef NDEBUG
  // Debug builds (the sanitizer tests) fill "uninitialised" memory with NaN, so that a result
  // element nobody wrote fails every comparison instead of passing as a fresh page's zero.
  std::fill_n(data, size, std::numeric_limits<float>::quiet_NaN());
#endif
  return TensorBuffer(data, size, std::move(owner));
}

TensorBuffer TensorBuffer::Zeros(size_t size) {
  TensorBuffer buffer = Uninitialized(size);
  if (size > 0) std::memset(buffer.data_, 0, size * sizeof(float));
  return buffer;
}

TensorBuffer TensorBuffer::Wrap(float* data, size_t size, std::shared_ptr<const void> owner) {
  return TensorBuffer(size == 0 ? nullptr : data, size, size == 0 ? nullptr : std::move(owner));
}

TensorBuffer::TensorBuffer(const TensorBuffer& other) {
  if (other.size_ == 0) return;
  *this = Uninitialized(other.size_);
  std::memcpy(data_, other.data_, size_ * sizeof(float));
}

TensorBuffer& TensorBuffer::operator=(const TensorBuffer& other) {
  if (this != &other) *this = TensorBuffer(other);
  return *this;
}

TensorBuffer::TensorBuffer(TensorBuffer&& other) noexcept
    : owner_(std::move(other.owner_)), data_(other.data_), size_(other.size_) {
  other.data_ = nullptr;
  other.size_ = 0;
}

TensorBuffer& TensorBuffer::operator=(TensorBuffer&& other) noexcept {
  if (this != &other) {
    owner_ = std::move(other.owner_);
    data_ = other.data_;
    size_ = other.size_;
    other.data_ = nullptr;
    other.size_ = 0;
  }
  return *this;
}

bool operator==(const TensorBuffer& a, const TensorBuffer& b) {
  if (a.size_ != b.size_) return false;
  for (size_t i = 0; i < a.size_; ++i) {
    if (!(a.data_[i] == b.data_[i])) return false;
  }
  return true;
}

Tensor Tensor::Zeros(std::vector<int64_t> shape) {
  const int64_t count = NumElements(shape);
  return Tensor(std::move(shape), TensorBuffer::Zeros(static_cast<size_t>(count)));
}

Tensor Tensor::Uninitialized(std::vector<int64_t> shape) {
  const int64_t count = NumElements(shape);
  return Tensor(std::move(shape), TensorBuffer::Uninitialized(static_cast<size_t>(count)));
}

std::string ShapeToString(absl::Span<const int64_t> shape) {
  return "[" + absl::StrJoin(shape, ", ") + "]";
}

}  // namespace gradengine
