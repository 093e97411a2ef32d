#include "gradengine/tensor.h"

#include <numeric>

#include "absl/strings/str_join.h"

namespace gradengine {

Tensor Tensor::Zeros(std::vector<int64_t> shape) {
  int64_t count = 1;
  for (int64_t d : shape) count *= d;
  return Tensor(std::move(shape), std::vector<float>(static_cast<size_t>(count), 0.0f));
}

std::string ShapeToString(absl::Span<const int64_t> shape) {
  return "[" + absl::StrJoin(shape, ", ") + "]";
}

}  // namespace gradengine
