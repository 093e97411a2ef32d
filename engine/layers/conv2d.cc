// conv2d's shape rule and parameters: torch.nn.Conv2d.

#include <limits>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/layers/layer_kind.h"

namespace gradengine {

absl::Status LayerKind<Conv2dSpec>::InferShape(const Conv2dSpec& conv, const ShapeContext& context,
                                               std::vector<int64_t>* out_shape) {
  const std::string p = context.prefix + ".conv2d.";
  for (const auto& [field, value, limit] :
       {std::tuple<const char*, int64_t, int64_t>{"in_channels", conv.in_channels, kMaxChannels},
        {"out_channels", conv.out_channels, kMaxChannels},
        {"kernel_size[0]", conv.kernel_h, kMaxWindow},
        {"kernel_size[1]", conv.kernel_w, kMaxWindow},
        {"stride[0]", conv.stride_h, kMaxWindow},
        {"stride[1]", conv.stride_w, kMaxWindow},
        {"dilation[0]", conv.dilation_h, kMaxWindow},
        {"dilation[1]", conv.dilation_w, kMaxWindow},
        {"groups", conv.groups, kMaxChannels}}) {
    if (absl::Status s = CheckPositive(p + field, value, limit); !s.ok()) return s;
  }
  for (const auto& [field, value] : {std::pair<const char*, int64_t>{"padding[0]", conv.pad_top},
                                     {"padding[1]", conv.pad_bottom},
                                     {"padding[2]", conv.pad_left},
                                     {"padding[3]", conv.pad_right}}) {
    if (absl::Status s = CheckNonNegative(p + field, value, kMaxWindow); !s.ok()) return s;
  }
  if (conv.in_channels % conv.groups != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(p, "groups=", conv.groups, " does not divide in_channels=", conv.in_channels));
  }
  if (conv.out_channels % conv.groups != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        p, "groups=", conv.groups, " does not divide out_channels=", conv.out_channels));
  }
  if (absl::Status s = CheckFourDims(context, kName); !s.ok()) return s;
  const std::vector<int64_t>& in_shape = context.input_shape;
  if (in_shape[1] != conv.in_channels) {
    return absl::InvalidArgumentError(
        absl::StrCat(p, "in_channels=", conv.in_channels, " does not match the ", in_shape[1],
                     " channels of its input ", ShapeToString(in_shape)));
  }
  // The padded input must be countable: with max_elements near INT64_MAX an input side can be
  // too, and ConvOutputSize would overflow adding the padding (at most kMaxWindow by now).
  if (in_shape[2] > std::numeric_limits<int64_t>::max() - conv.pad_top - conv.pad_bottom ||
      in_shape[3] > std::numeric_limits<int64_t>::max() - conv.pad_left - conv.pad_right) {
    return absl::InvalidArgumentError(
        absl::StrCat(p, "padding top/bottom/left/right ", conv.pad_top, "/", conv.pad_bottom, "/",
                     conv.pad_left, "/", conv.pad_right, " makes its input ",
                     ShapeToString(in_shape), " longer than int64 can count"));
  }
  const int64_t out_h = ConvOutputSize(in_shape[2], conv.kernel_h, conv.stride_h, conv.pad_top,
                                       conv.pad_bottom, conv.dilation_h);
  const int64_t out_w = ConvOutputSize(in_shape[3], conv.kernel_w, conv.stride_w, conv.pad_left,
                                       conv.pad_right, conv.dilation_w);
  if (out_h < 1 || out_w < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        p, "kernel_size=[", conv.kernel_h, ", ", conv.kernel_w, "] with dilation=[",
        conv.dilation_h, ", ", conv.dilation_w, "] is larger than the padded input ",
        ShapeToString(in_shape), " (padding top/bottom/left/right ", conv.pad_top, "/",
        conv.pad_bottom, "/", conv.pad_left, "/", conv.pad_right, "): the output would be empty"));
  }
  *out_shape = {in_shape[0], conv.out_channels, out_h, out_w};
  return absl::OkStatus();
}

void LayerKind<Conv2dSpec>::Parameters(const std::string& layer, const Conv2dSpec& conv,
                                       std::vector<ParameterInfo>* out) {
  out->push_back(
      {layer + ".weight",
       {conv.out_channels, conv.in_channels / conv.groups, conv.kernel_h, conv.kernel_w}});
  if (conv.bias) out->push_back({layer + ".bias", {conv.out_channels}});
}

void LayerKind<Conv2dSpec>::AppendKey(const Conv2dSpec& c, std::string* key) {
  absl::StrAppend(key, c.in_channels, ",", c.out_channels, ",", c.kernel_h, ",", c.kernel_w, ",",
                  c.stride_h, ",", c.stride_w, ",", c.pad_top, ",", c.pad_bottom, ",", c.pad_left,
                  ",", c.pad_right, ",", c.dilation_h, ",", c.dilation_w, ",", c.groups, ",",
                  c.bias ? 1 : 0);
}

double LayerKind<Conv2dSpec>::Flops(const Conv2dSpec& c, absl::Span<const int64_t>,
                                    absl::Span<const int64_t> out) {
  const double out_elements = ElementCount(out);
  return 2.0 * out_elements * static_cast<double>(c.in_channels / c.groups) *
         static_cast<double>(c.kernel_h * c.kernel_w);
}

}  // namespace gradengine
