// max_pool2d's and avg_pool2d's shape rules: F.max_pool2d and F.avg_pool2d.

#include <limits>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/layers/layer_kind.h"

namespace gradengine {
namespace {

// What the two pools share: a window (kernel, stride, symmetric padding, dilation).
struct Window {
  int64_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  bool ceil_mode;
};

absl::Status InferPoolShape(const Window& w, absl::string_view kind, const ShapeContext& context,
                            bool dilated, std::vector<int64_t>* out) {
  const std::string p = absl::StrCat(context.prefix, ".", kind, ".");
  for (const auto& [field, value] : {std::pair<const char*, int64_t>{"kernel_size[0]", w.kernel_h},
                                     {"kernel_size[1]", w.kernel_w},
                                     {"stride[0]", w.stride_h},
                                     {"stride[1]", w.stride_w},
                                     {"dilation[0]", w.dilation_h},
                                     {"dilation[1]", w.dilation_w}}) {
    if (!dilated && absl::string_view(field).substr(0, 8) == "dilation") continue;
    if (absl::Status s = CheckPositive(p + field, value, kMaxWindow); !s.ok()) return s;
  }
  for (const auto& [field, value, kernel] :
       {std::tuple<const char*, int64_t, int64_t>{"padding[0]", w.pad_h, w.kernel_h},
        {"padding[1]", w.pad_w, w.kernel_w}}) {
    if (absl::Status s = CheckNonNegative(p + field, value, kMaxWindow); !s.ok()) return s;
    if (value > kernel / 2) {
      return absl::InvalidArgumentError(absl::StrCat(p, field, "=", value,
                                                     " must be at most half the kernel size ",
                                                     kernel, ", as in PyTorch"));
    }
  }
  if (absl::Status s = CheckFourDims(context, kind); !s.ok()) return s;
  const std::vector<int64_t>& in = context.input_shape;
  // As for conv2d: without an element limit a side can be near INT64_MAX, and the padded side
  // plus a stride (ceil_mode's rounding) must still be countable; padding and stride are at
  // most kMaxWindow by now.
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  if (in[2] > kMax - 2 * w.pad_h - kMaxWindow || in[3] > kMax - 2 * w.pad_w - kMaxWindow) {
    return absl::InvalidArgumentError(absl::StrCat(p, "padding [", w.pad_h, ", ", w.pad_w,
                                                   "] makes its input ", ShapeToString(in),
                                                   " longer than int64 can count"));
  }
  const int64_t sizes[2] = {
      PoolOutputSize(in[2], w.kernel_h, w.stride_h, w.pad_h, w.dilation_h, w.ceil_mode),
      PoolOutputSize(in[3], w.kernel_w, w.stride_w, w.pad_w, w.dilation_w, w.ceil_mode)};
  if (sizes[0] < 1 || sizes[1] < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        p, "kernel_size=[", w.kernel_h, ", ", w.kernel_w, "]",
        dilated ? absl::StrCat(" with dilation=[", w.dilation_h, ", ", w.dilation_w, "]") : "",
        " is larger than the padded input ", ShapeToString(in), " (padding [", w.pad_h, ", ",
        w.pad_w, "]): the output would be empty"));
  }
  *out = {in[0], in[1], sizes[0], sizes[1]};
  return absl::OkStatus();
}

void AppendWindowKey(const Window& w, std::string* key) {
  absl::StrAppend(key, w.kernel_h, ",", w.kernel_w, ",", w.stride_h, ",", w.stride_w, ",", w.pad_h,
                  ",", w.pad_w, ",", w.dilation_h, ",", w.dilation_w, ",", w.ceil_mode ? 1 : 0);
}

double WindowFlops(const Window& w, absl::Span<const int64_t> out) {
  return ElementCount(out) * static_cast<double>(w.kernel_h * w.kernel_w);
}

Window WindowOf(const MaxPool2dSpec& s) {
  return {s.kernel_h, s.kernel_w,   s.stride_h,   s.stride_w, s.pad_h,
          s.pad_w,    s.dilation_h, s.dilation_w, s.ceil_mode};
}

Window WindowOf(const AvgPool2dSpec& s) {
  return {s.kernel_h, s.kernel_w, s.stride_h, s.stride_w, s.pad_h, s.pad_w, 1, 1, s.ceil_mode};
}

}  // namespace

absl::Status LayerKind<MaxPool2dSpec>::InferShape(const MaxPool2dSpec& spec,
                                                  const ShapeContext& context,
                                                  std::vector<int64_t>* out) {
  return InferPoolShape(WindowOf(spec), kName, context, /*dilated=*/true, out);
}

void LayerKind<MaxPool2dSpec>::AppendKey(const MaxPool2dSpec& spec, std::string* key) {
  AppendWindowKey(WindowOf(spec), key);
}

double LayerKind<MaxPool2dSpec>::Flops(const MaxPool2dSpec& spec, absl::Span<const int64_t>,
                                       absl::Span<const int64_t> out) {
  return WindowFlops(WindowOf(spec), out);
}

absl::Status LayerKind<AvgPool2dSpec>::InferShape(const AvgPool2dSpec& spec,
                                                  const ShapeContext& context,
                                                  std::vector<int64_t>* out) {
  return InferPoolShape(WindowOf(spec), kName, context, /*dilated=*/false, out);
}

void LayerKind<AvgPool2dSpec>::AppendKey(const AvgPool2dSpec& spec, std::string* key) {
  AppendWindowKey(WindowOf(spec), key);
  absl::StrAppend(key, ",", spec.count_include_pad ? 1 : 0);
}

double LayerKind<AvgPool2dSpec>::Flops(const AvgPool2dSpec& spec, absl::Span<const int64_t>,
                                       absl::Span<const int64_t> out) {
  return WindowFlops(WindowOf(spec), out);
}

}  // namespace gradengine
