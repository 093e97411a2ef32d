// Text rendering of float32 tensors that matches what PyTorch prints, so a gradient computed by
// the service can be compared with one computed in PyTorch by eye or with diff.

#ifndef GRADCLIENT_TENSOR_FORMAT_H_
#define GRADCLIENT_TENSOR_FORMAT_H_

#include <cstdint>
#include <string>

#include "absl/types/span.h"

namespace gradclient {

// Returns exactly what PyTorch 1.13's print(tensor) writes (without the final newline) for a
// float32 CPU tensor of this shape holding `data` in row-major order, under the default print
// options: precision 4, threshold 1000, edgeitems 3, linewidth 80, sci_mode chosen
// automatically. For example "tensor([[ 1.0482e-02, -1.1246e-03],\n        [ ..." or
// "tensor([1., 2.])".
//
// This follows torch/_tensor_str.py: values print as integers with a trailing '.' when all of
// them are integral; in scientific notation when the nonzero finite magnitudes span a ratio over
// 1000, exceed 1e8, or (non-integral values only) go below 1e-4; otherwise with 4 decimals. All
// values are right-aligned to a common width, rows wrap at 80 columns, and tensors with more than
// 1000 elements show only the first and last 3 entries of each dimension longer than 6, with the
// notation chosen from the entries shown.
//
// An empty shape is a 0-d tensor holding data[0]. Thread-safe; keeps no state.
// REQUIRES: every shape entry >= 0 and data.size() equals the product of shape. Otherwise the
// result is a one-line description of the mismatch, "<invalid tensor: ...>", not a torch string.
std::string FormatTensorLikeTorch(absl::Span<const int64_t> shape, absl::Span<const float> data);

}  // namespace gradclient

#endif  // GRADCLIENT_TENSOR_FORMAT_H_
