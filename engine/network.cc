#include "gradengine/network.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "gradengine/quote.h"

namespace gradengine {
namespace {

// Multiplies non-negative a and b, or returns false if the product overflows int64.
bool CheckedMultiply(int64_t a, int64_t b, int64_t* product) {
  if (a != 0 && b > std::numeric_limits<int64_t>::max() / a) return false;
  *product = a * b;
  return true;
}

absl::Status CheckPositive(const std::string& field, int64_t value) {
  if (value < 1) {
    return absl::InvalidArgumentError(absl::StrCat(field, "=", value, " must be positive"));
  }
  return absl::OkStatus();
}

absl::Status CheckNonNegative(const std::string& field, int64_t value) {
  if (value < 0) {
    return absl::InvalidArgumentError(absl::StrCat(field, "=", value, " must be >= 0"));
  }
  return absl::OkStatus();
}

// Caps far above any real network, so that the index arithmetic below can never overflow and
// a tiny request cannot make oneDNN spend minutes compiling kernels for absurd windows (padding,
// stride or dilation of 2^24 took 24-124 s to compile).
constexpr int64_t kMaxChannels = int64_t{1} << 24;
constexpr int64_t kMaxWindow = 4096;  // kernel size, stride, padding and dilation

absl::Status CheckBounded(const std::string& field, int64_t value, int64_t limit) {
  if (value > limit) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, "=", value, " exceeds the supported maximum ", limit));
  }
  return absl::OkStatus();
}

absl::Status CheckElementLimit(const std::string& what, absl::Span<const int64_t> shape,
                               int64_t max_elements) {
  absl::StatusOr<int64_t> count = CheckedNumElements(shape, what);
  if (!count.ok()) return count.status();
  if (*count > max_elements) {
    return absl::ResourceExhaustedError(absl::StrCat(
        what, " has ", *count, " elements, over the limit of ", max_elements, " per tensor"));
  }
  return absl::OkStatus();
}

absl::Status ValidateConv(const Conv2dSpec& conv, const std::string& prefix,
                          absl::Span<const int64_t> in_shape, std::vector<int64_t>* out_shape) {
  const std::string p = prefix + ".conv2d.";
  for (const auto& [field, value] :
       {std::pair<const char*, int64_t>{"in_channels", conv.in_channels},
        {"out_channels", conv.out_channels},
        {"kernel_size[0]", conv.kernel_h},
        {"kernel_size[1]", conv.kernel_w},
        {"stride[0]", conv.stride_h},
        {"stride[1]", conv.stride_w},
        {"dilation[0]", conv.dilation_h},
        {"dilation[1]", conv.dilation_w},
        {"groups", conv.groups}}) {
    if (absl::Status s = CheckPositive(p + field, value); !s.ok()) return s;
    const bool channels = absl::string_view(field) == "in_channels" ||
                          absl::string_view(field) == "out_channels" ||
                          absl::string_view(field) == "groups";
    if (absl::Status s = CheckBounded(p + field, value, channels ? kMaxChannels : kMaxWindow);
        !s.ok()) {
      return s;
    }
  }
  for (const auto& [field, value] : {std::pair<const char*, int64_t>{"padding[0]", conv.pad_top},
                                     {"padding[1]", conv.pad_bottom},
                                     {"padding[2]", conv.pad_left},
                                     {"padding[3]", conv.pad_right}}) {
    if (absl::Status s = CheckNonNegative(p + field, value); !s.ok()) return s;
    if (absl::Status s = CheckBounded(p + field, value, kMaxWindow); !s.ok()) return s;
  }
  if (conv.in_channels % conv.groups != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(p, "groups=", conv.groups, " does not divide in_channels=", conv.in_channels));
  }
  if (conv.out_channels % conv.groups != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        p, "groups=", conv.groups, " does not divide out_channels=", conv.out_channels));
  }
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

absl::Status ValidateActivation(const ActivationSpec& act, const std::string& prefix) {
  switch (act.kind) {
    case ActivationKind::kRelu:
    case ActivationKind::kTanh:
    case ActivationKind::kSigmoid:
    case ActivationKind::kGeluErf:
    case ActivationKind::kGeluTanh:
      return absl::OkStatus();
    case ActivationKind::kLeakyRelu:
    case ActivationKind::kElu:
      if (!std::isfinite(act.alpha)) {
        return absl::InvalidArgumentError(absl::StrCat(
            prefix, ".", ActivationName(act.kind),
            act.kind == ActivationKind::kElu ? ".alpha=" : ".negative_slope=", act.alpha,
            " must be finite"));
      }
      return absl::OkStatus();
  }
  return absl::InvalidArgumentError(
      absl::StrCat(prefix, ".activation=", static_cast<int>(act.kind), " is not a known kind"));
}

}  // namespace

Conv2dSpec Conv2dSpec::Square(int64_t in_channels, int64_t out_channels, int64_t kernel,
                              int64_t stride, int64_t padding, bool bias) {
  Conv2dSpec spec;
  spec.in_channels = in_channels;
  spec.out_channels = out_channels;
  spec.kernel_h = spec.kernel_w = kernel;
  spec.stride_h = spec.stride_w = stride;
  spec.pad_top = spec.pad_bottom = spec.pad_left = spec.pad_right = padding;
  spec.bias = bias;
  return spec;
}

const char* ActivationName(ActivationKind kind) {
  switch (kind) {
    case ActivationKind::kRelu:
      return "relu";
    case ActivationKind::kLeakyRelu:
      return "leaky_relu";
    case ActivationKind::kTanh:
      return "tanh";
    case ActivationKind::kSigmoid:
      return "sigmoid";
    case ActivationKind::kElu:
      return "elu";
    case ActivationKind::kGeluErf:
      return "gelu";
    case ActivationKind::kGeluTanh:
      return "gelu_tanh";
  }
  return "unknown";
}

const char* ObjectiveName(ObjectiveKind kind) {
  switch (kind) {
    case ObjectiveKind::kMse:
      return "mse";
    case ObjectiveKind::kSum:
      return "sum";
    case ObjectiveKind::kGradOutput:
      return "grad_output";
  }
  return "unknown";
}

int64_t ConvOutputSize(int64_t input, int64_t kernel, int64_t stride, int64_t pad_begin,
                       int64_t pad_end, int64_t dilation) {
  const int64_t span = dilation * (kernel - 1) + 1;
  const int64_t room = input + pad_begin + pad_end - span;
  if (room < 0) return 0;
  return room / stride + 1;
}

absl::StatusOr<int64_t> CheckedNumElements(absl::Span<const int64_t> shape,
                                           const std::string& what) {
  int64_t count = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ".shape[", i, "]=", shape[i], " must be >= 0"));
    }
    if (!CheckedMultiply(count, shape[i], &count)) {
      return absl::InvalidArgumentError(absl::StrCat(what, ".shape=", ShapeToString(shape),
                                                     " has more elements than int64 can count"));
    }
  }
  return count;
}

absl::Status CheckCount(absl::string_view field, int64_t count, int64_t max_count) {
  if (count <= max_count) return absl::OkStatus();
  return absl::ResourceExhaustedError(
      absl::StrCat(field, " has ", count, " entries; at most ", max_count, " are allowed"));
}

absl::Status CheckName(absl::string_view field, absl::string_view name) {
  if (name.empty()) return absl::InvalidArgumentError(absl::StrCat(field, " is empty"));
  if (name.size() <= kMaxNameBytes) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(field, "=", Quote(name), " has ", name.size(),
                                                 " bytes; at most ", kMaxNameBytes,
                                                 " are allowed"));
}

absl::StatusOr<ValidatedNetwork> ValidateNetwork(const NetworkSpec& network,
                                                 absl::Span<const int64_t> input_shape,
                                                 int64_t max_elements) {
  if (network.layers.empty()) {
    return absl::InvalidArgumentError("layers is empty: a network needs at least one layer");
  }
  if (absl::Status s =
          CheckCount("layers", static_cast<int64_t>(network.layers.size()), kMaxLayers);
      !s.ok()) {
    return s;
  }
  if (input_shape.size() != 4) {
    return absl::InvalidArgumentError(
        absl::StrCat("input.shape=", ShapeToString(input_shape), " must have 4 dims (N, C, H, W)"));
  }
  for (size_t i = 0; i < input_shape.size(); ++i) {
    if (input_shape[i] < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("input.shape[", i, "]=", input_shape[i], " must be positive"));
    }
  }
  if (absl::Status s = CheckElementLimit("input", input_shape, max_elements); !s.ok()) return s;

  ValidatedNetwork result;
  std::set<std::string> names;
  std::vector<int64_t> shape(input_shape.begin(), input_shape.end());
  for (size_t i = 0; i < network.layers.size(); ++i) {
    const LayerSpec& layer = network.layers[i];
    const std::string prefix = absl::StrCat("layers[", i, "]");
    if (absl::Status s = CheckName(absl::StrCat(prefix, ".name"), layer.name); !s.ok()) {
      return s;
    }
    if (!names.insert(layer.name).second) {
      return absl::InvalidArgumentError(
          absl::StrCat(prefix, ".name=", Quote(layer.name), " is used by an earlier layer"));
    }
    if (const auto* conv = std::get_if<Conv2dSpec>(&layer.op)) {
      std::vector<int64_t> out_shape;
      if (absl::Status s = ValidateConv(*conv, prefix, shape, &out_shape); !s.ok()) return s;
      std::vector<int64_t> weight_shape = {conv->out_channels, conv->in_channels / conv->groups,
                                           conv->kernel_h, conv->kernel_w};
      if (absl::Status s =
              CheckElementLimit(absl::StrCat(prefix, ".weight"), weight_shape, max_elements);
          !s.ok()) {
        return s;
      }
      if (absl::Status s =
              CheckElementLimit(absl::StrCat(prefix, ".output"), out_shape, max_elements);
          !s.ok()) {
        return s;
      }
      result.parameter_shapes.emplace_back(layer.name + ".weight", std::move(weight_shape));
      if (conv->bias) {
        result.parameter_shapes.emplace_back(layer.name + ".bias",
                                             std::vector<int64_t>{conv->out_channels});
      }
      shape = std::move(out_shape);
    } else {
      const auto& act = std::get<ActivationSpec>(layer.op);
      if (absl::Status s = ValidateActivation(act, prefix); !s.ok()) return s;
    }
    result.output_shapes.push_back(shape);
  }
  return result;
}

bool GradientSelection::WantsParameter(const std::string& name) const {
  return all_parameters ||
         std::find(parameters.begin(), parameters.end(), name) != parameters.end();
}

}  // namespace gradengine
