// Dense float32 tensors as the engine's callers see them: NCHW, contiguous, row-major.
//
// A Tensor owns its data. A TensorView borrows it: the caller keeps the memory alive and
// unchanged for the duration of the call it is passed to. Neither type is synchronized;
// share one between threads only for reading.

#ifndef GRADENGINE_TENSOR_H_
#define GRADENGINE_TENSOR_H_

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/types/span.h"

namespace gradengine {

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

// Owning row-major float32 tensor.
struct Tensor {
  std::vector<int64_t> shape;
  std::vector<float> data;

  Tensor() = default;
  Tensor(std::vector<int64_t> shape_in, std::vector<float> data_in)
      : shape(std::move(shape_in)), data(std::move(data_in)) {}

  // A zero-filled tensor. REQUIRES: every dim >= 0 and the product fits in size_t.
  static Tensor Zeros(std::vector<int64_t> shape);

  TensorView view() const { return TensorView(shape, data); }
  int64_t num_elements() const { return static_cast<int64_t>(data.size()); }
};

// "[1, 8, 26, 26]"
std::string ShapeToString(absl::Span<const int64_t> shape);

}  // namespace gradengine

#endif  // GRADENGINE_TENSOR_H_
