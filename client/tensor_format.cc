#include "gradclient/tensor_format.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/types/span.h"

namespace gradclient {
namespace {

// torch._tensor_str.PRINT_OPTS defaults.
constexpr int kPrecision = 4;
constexpr int64_t kThreshold = 1000;
constexpr int64_t kEdgeItems = 3;
constexpr int kLineWidth = 80;
constexpr absl::string_view kPrefix = "tensor(";

// Python's str.format of a float with ".{kPrecision}e", ".{kPrecision}f" or ".0f". printf and
// Python both round the exact binary value correctly (ties to even), so they agree digit for
// digit, except that Python writes every NaN as "nan" while printf writes "-nan" for a NaN with
// the sign bit set.
enum class Notation { kScientific, kFixed, kInteger };

std::string PythonFormat(double value, Notation notation) {
  if (std::isnan(value)) return "nan";
  switch (notation) {
    case Notation::kScientific:
      return absl::StrFormat("%.*e", kPrecision, value);
    case Notation::kFixed:
      return absl::StrFormat("%.*f", kPrecision, value);
    case Notation::kInteger:
      return absl::StrFormat("%.0f", value);
  }
  return "";
}

// torch._tensor_str._Formatter for a floating-point tensor.
class Formatter {
 public:
  // `values` are the elements that will be printed (after summarization).
  explicit Formatter(absl::Span<const float> values) {
    std::vector<float> nonzero_finite;
    for (float value : values) {
      if (std::isfinite(value) && value != 0.0f) nonzero_finite.push_back(value);
    }
    if (nonzero_finite.empty()) return;  // int_mode, not sci_mode, width 1.

    // torch takes abs/min/max in float32 (exact), then converts to double for the ratio.
    double min_abs = std::numeric_limits<double>::infinity();
    double max_abs = 0.0;
    for (float value : nonzero_finite) {
      const double magnitude = std::fabs(static_cast<double>(value));
      min_abs = std::min(min_abs, magnitude);
      max_abs = std::max(max_abs, magnitude);
      if (value != std::ceil(value)) int_mode_ = false;
    }
    const bool wide_range = max_abs / min_abs > 1000.0 || max_abs > 1.0e8;
    if (int_mode_) {
      sci_mode_ = wide_range;
    } else {
      sci_mode_ = wide_range || min_abs < 1.0e-4;
    }
    for (float value : nonzero_finite) {
      if (sci_mode_) {
        max_width_ = std::max(max_width_, Width(value, Notation::kScientific));
      } else if (int_mode_) {
        // Room for the '.' appended to integral values.
        max_width_ = std::max(max_width_, Width(value, Notation::kInteger) + 1);
      } else {
        max_width_ = std::max(max_width_, Width(value, Notation::kFixed));
      }
    }
  }

  size_t width() const { return max_width_; }

  // _Formatter.format: the value right-aligned to width(); longer if the value itself is (NaN
  // and infinities are not considered when choosing the width).
  std::string Format(float value) const {
    std::string text;
    if (sci_mode_) {
      text = PythonFormat(value, Notation::kScientific);
    } else if (int_mode_) {
      text = PythonFormat(value, Notation::kInteger);
      if (std::isfinite(value)) text += ".";
    } else {
      text = PythonFormat(value, Notation::kFixed);
    }
    if (text.size() < max_width_) text.insert(0, max_width_ - text.size(), ' ');
    return text;
  }

 private:
  static size_t Width(float value, Notation notation) {
    return PythonFormat(value, notation).size();
  }

  bool int_mode_ = true;
  bool sci_mode_ = false;
  size_t max_width_ = 1;
};

// Walks a row-major tensor the way torch/_tensor_str.py does.
class TorchPrinter {
 public:
  TorchPrinter(absl::Span<const int64_t> shape, absl::Span<const float> data, bool summarize)
      : shape_(shape), data_(data), summarize_(summarize), strides_(shape.size(), 1) {
    for (size_t d = shape.size(); d-- > 1;) strides_[d - 1] = strides_[d] * shape[d];
  }

  // get_summarized_data: the elements that will be printed, in order.
  std::vector<float> PrintedElements() const {
    std::vector<float> out;
    if (shape_.empty()) {
      out.push_back(data_[0]);
    } else {
      CollectPrinted(/*dim=*/0, /*offset=*/0, &out);
    }
    return out;
  }

  // _tensor_str_with_formatter.
  std::string Print(const Formatter& formatter) const {
    if (shape_.empty()) return formatter.Format(data_[0]);
    return PrintDim(/*dim=*/0, /*offset=*/0, static_cast<int>(kPrefix.size()), formatter);
  }

 private:
  // The indices of dimension `dim` that are printed; -1 stands for the "..." gap.
  std::vector<int64_t> ShownIndices(size_t dim) const {
    std::vector<int64_t> indices;
    const int64_t size = shape_[dim];
    if (summarize_ && size > 2 * kEdgeItems) {
      for (int64_t i = 0; i < kEdgeItems; ++i) indices.push_back(i);
      indices.push_back(-1);
      for (int64_t i = size - kEdgeItems; i < size; ++i) indices.push_back(i);
    } else {
      for (int64_t i = 0; i < size; ++i) indices.push_back(i);
    }
    return indices;
  }

  void CollectPrinted(size_t dim, int64_t offset, std::vector<float>* out) const {
    for (int64_t index : ShownIndices(dim)) {
      if (index < 0) continue;
      const int64_t element = offset + index * strides_[dim];
      if (dim + 1 == shape_.size()) {
        out->push_back(data_[element]);
      } else {
        CollectPrinted(dim + 1, element, out);
      }
    }
  }

  std::string PrintDim(size_t dim, int64_t offset, int indent, const Formatter& formatter) const {
    const std::vector<int64_t> indices = ShownIndices(dim);
    if (dim + 1 == shape_.size()) return PrintVector(offset, indices, indent, formatter);

    std::vector<std::string> slices;
    for (int64_t index : indices) {
      slices.push_back(
          index < 0 ? "..."
                    : PrintDim(dim + 1, offset + index * strides_[dim], indent + 1, formatter));
    }
    // One '\n' between rows of a matrix, a blank line between matrices, two between 3-d blocks.
    const size_t remaining_dims = shape_.size() - dim;
    const std::string separator =
        absl::StrCat(",", std::string(remaining_dims - 1, '\n'), std::string(indent + 1, ' '));
    return absl::StrCat("[", absl::StrJoin(slices, separator), "]");
  }

  // _vector_str.
  std::string PrintVector(int64_t offset, const std::vector<int64_t>& indices, int indent,
                          const Formatter& formatter) const {
    // Each element takes its width plus ", ". Python floors the true quotient, which matters
    // only when the indent alone exceeds the line width.
    const int64_t element_length = static_cast<int64_t>(formatter.width()) + 2;
    const int64_t room = kLineWidth - indent;
    const int64_t elements_per_line = std::max<int64_t>(1, room > 0 ? room / element_length : 0);

    std::vector<std::string> elements;
    for (int64_t index : indices) {
      elements.push_back(index < 0 ? " ..." : formatter.Format(data_[offset + index]));
    }
    std::vector<std::string> lines;
    for (size_t start = 0; start < elements.size(); start += elements_per_line) {
      const size_t end = std::min(elements.size(), start + static_cast<size_t>(elements_per_line));
      lines.push_back(absl::StrJoin(elements.begin() + start, elements.begin() + end, ", "));
    }
    return absl::StrCat(
        "[", absl::StrJoin(lines, absl::StrCat(",\n", std::string(indent + 1, ' '))), "]");
  }

  absl::Span<const int64_t> shape_;
  absl::Span<const float> data_;
  bool summarize_;
  std::vector<int64_t> strides_;
};

// Python's repr() of a shape tuple.
std::string ShapeRepr(absl::Span<const int64_t> shape) {
  if (shape.size() == 1) return absl::StrCat("(", shape[0], ",)");
  return absl::StrCat("(", absl::StrJoin(shape, ", "), ")");
}

}  // namespace

std::string FormatTensorLikeTorch(absl::Span<const int64_t> shape, absl::Span<const float> data) {
  bool has_zero = false;
  bool has_negative = false;
  for (int64_t dim : shape) {
    has_zero = has_zero || dim == 0;
    has_negative = has_negative || dim < 0;
  }
  uint64_t numel = has_zero ? 0 : 1;
  bool overflow = false;
  for (size_t i = 0; i < shape.size() && !has_negative && numel != 0; ++i) {
    const uint64_t dim = static_cast<uint64_t>(shape[i]);
    if (numel > std::numeric_limits<uint64_t>::max() / dim) {
      overflow = true;
      break;
    }
    numel *= dim;
  }
  if (has_negative || overflow || numel != data.size()) {
    return absl::StrCat("<invalid tensor: shape [", absl::StrJoin(shape, ", "), "] with ",
                        data.size(), " values>");
  }

  if (numel == 0) {
    // _str_intern prints the shape of an empty tensor unless it is 1-d, wrapping the suffix
    // onto its own line (_add_suffixes) if it would pass the line width.
    std::string text = absl::StrCat(kPrefix, "[]");
    if (shape.size() != 1) {
      const std::string suffix = absl::StrCat("size=", ShapeRepr(shape));
      const size_t last_line_length = text.size() + 2;
      if (last_line_length + suffix.size() + 2 > static_cast<size_t>(kLineWidth)) {
        absl::StrAppend(&text, ",\n", std::string(kPrefix.size(), ' '), suffix);
      } else {
        absl::StrAppend(&text, ", ", suffix);
      }
    }
    return absl::StrCat(text, ")");
  }

  const TorchPrinter printer(shape, data, /*summarize=*/numel > static_cast<uint64_t>(kThreshold));
  const std::vector<float> printed = printer.PrintedElements();
  const Formatter formatter(printed);
  return absl::StrCat(kPrefix, printer.Print(formatter), ")");
}

}  // namespace gradclient
