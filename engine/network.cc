#include "gradengine/network.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "engine/layers/layer_kind.h"
#include "gradengine/quote.h"

namespace gradengine {
namespace {

// Multiplies non-negative a and b, or returns false if the product overflows int64.
bool CheckedMultiply(int64_t a, int64_t b, int64_t* product) {
  if (a != 0 && b > std::numeric_limits<int64_t>::max() / a) return false;
  *product = a * b;
  return true;
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

// Where `reference` (a layer's `input`, or an add's `other`) points: the index of an earlier
// layer, or -1 for the network's input. `layers` maps every name to its index.
absl::StatusOr<int> ResolveSource(const std::string& field, const std::string& reference, int layer,
                                  const std::map<std::string, int>& layers) {
  if (reference == kNetworkInput) return -1;
  auto it = layers.find(reference);
  if (it == layers.end()) {
    return absl::InvalidArgumentError(absl::StrCat(field, "=", Quote(reference),
                                                   " names no layer (nor \"", kNetworkInput,
                                                   "\", the network's input)"));
  }
  if (it->second >= layer) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, "=", Quote(reference), " names layers[", it->second, "]",
                     it->second == layer ? ", the layer itself" : ", a later layer",
                     ": a layer can only read the input or an earlier layer"));
  }
  return it->second;
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
    case ObjectiveKind::kCrossEntropy:
      return "cross_entropy";
  }
  return "unknown";
}

MaxPool2dSpec MaxPool2dSpec::Square(int64_t kernel, int64_t stride, int64_t padding) {
  MaxPool2dSpec spec;
  spec.kernel_h = spec.kernel_w = kernel;
  spec.stride_h = spec.stride_w = stride == 0 ? kernel : stride;
  spec.pad_h = spec.pad_w = padding;
  return spec;
}

AvgPool2dSpec AvgPool2dSpec::Square(int64_t kernel, int64_t stride, int64_t padding) {
  AvgPool2dSpec spec;
  spec.kernel_h = spec.kernel_w = kernel;
  spec.stride_h = spec.stride_w = stride == 0 ? kernel : stride;
  spec.pad_h = spec.pad_w = padding;
  return spec;
}

const char* LayerKindName(const LayerOp& op) {
  return VisitLayer(op, [](auto kind, const auto&) -> const char* { return kind.kName; });
}

bool MixesBatch(const LayerOp& op) {
  return VisitLayer(op, [](auto kind, const auto& spec) { return kind.MixesBatch(spec); });
}

std::vector<ParameterInfo> LayerParameters(const LayerSpec& layer) {
  std::vector<ParameterInfo> parameters;
  VisitLayer(layer.op,
             [&](auto kind, const auto& spec) { kind.Parameters(layer.name, spec, &parameters); });
  return parameters;
}

namespace {

// `field` is in [least, limit]; `least_text` says the lower bound in words.
absl::Status CheckRange(const std::string& field, int64_t value, int64_t least,
                        absl::string_view least_text, int64_t limit) {
  if (value < least) {
    return absl::InvalidArgumentError(absl::StrCat(field, "=", value, " must be ", least_text));
  }
  if (value > limit) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, "=", value, " exceeds the supported maximum ", limit));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckPositive(const std::string& field, int64_t value, int64_t limit) {
  return CheckRange(field, value, 1, "positive", limit);
}

absl::Status CheckNonNegative(const std::string& field, int64_t value, int64_t limit) {
  return CheckRange(field, value, 0, ">= 0", limit);
}

double ElementCount(absl::Span<const int64_t> shape) {
  double elements = 1.0;
  for (int64_t d : shape) elements *= static_cast<double>(d);
  return elements;
}

absl::Status CheckFourDims(const ShapeContext& context, absl::string_view kind) {
  if (context.input_shape.size() == 4) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(context.prefix, " (", kind, ") needs an NCHW input, but its input is ",
                   ShapeToString(context.input_shape),
                   ": after a linear layer only linear layers, activations and adds may follow"));
}

int64_t PoolOutputSize(int64_t input, int64_t kernel, int64_t stride, int64_t pad, int64_t dilation,
                       bool ceil_mode) {
  const int64_t span = dilation * (kernel - 1) + 1;
  const int64_t room = input + 2 * pad - span + (ceil_mode ? stride - 1 : 0);
  if (room < 0) return 0;
  int64_t out = room / stride + 1;
  if (ceil_mode && (out - 1) * stride >= input + pad) --out;
  return out;
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
  std::map<std::string, int> names;
  for (size_t i = 0; i < network.layers.size(); ++i) {
    const std::string field = absl::StrCat("layers[", i, "].name");
    const std::string& name = network.layers[i].name;
    if (absl::Status s = CheckName(field, name); !s.ok()) return s;
    if (name == kNetworkInput) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, "=", Quote(name), " is reserved: it names the network's input"));
    }
    if (!names.emplace(name, static_cast<int>(i)).second) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, "=", Quote(name), " is used by an earlier layer"));
    }
  }
  const std::vector<int64_t> network_input(input_shape.begin(), input_shape.end());
  std::vector<int> readers(network.layers.size(), 0);
  auto shape_of = [&](int source) -> const std::vector<int64_t>& {
    return source < 0 ? network_input : result.output_shapes[source];
  };
  for (size_t i = 0; i < network.layers.size(); ++i) {
    const LayerSpec& layer = network.layers[i];
    const int index = static_cast<int>(i);
    ShapeContext context;
    context.prefix = absl::StrCat("layers[", i, "]");
    int source = index - 1;
    if (!layer.input.empty()) {
      absl::StatusOr<int> resolved =
          ResolveSource(context.prefix + ".input", layer.input, index, names);
      if (!resolved.ok()) return resolved.status();
      source = *resolved;
    }
    int other = -1;
    if (const auto* add = std::get_if<AddSpec>(&layer.op)) {
      absl::StatusOr<int> resolved =
          ResolveSource(context.prefix + ".add.other", add->other, index, names);
      if (!resolved.ok()) return resolved.status();
      other = *resolved;
      context.other_shape = shape_of(other);
      if (other >= 0) ++readers[other];
    }
    if (source >= 0) ++readers[source];
    context.input_shape = shape_of(source);
    std::vector<int64_t> out_shape;
    result.mixes_batch |= MixesBatch(layer.op);
    absl::Status status = VisitLayer(layer.op, [&](auto kind, const auto& spec) {
      return kind.InferShape(spec, context, &out_shape);
    });
    if (!status.ok()) return status;
    if (absl::Status s = CheckElementLimit(context.prefix + ".output", out_shape, max_elements);
        !s.ok()) {
      return s;
    }
    for (ParameterInfo& parameter : LayerParameters(layer)) {
      if (absl::Status s = CheckElementLimit(absl::StrCat(context.prefix, ".", parameter.name),
                                             parameter.shape, max_elements);
          !s.ok()) {
        return s;
      }
      result.parameters.push_back(std::move(parameter));
    }
    result.input_sources.push_back(source);
    result.add_sources.push_back(other);
    result.output_shapes.push_back(std::move(out_shape));
  }
  // Every output but the last is read by some layer: a dead branch would be computed for
  // nothing and its parameters would get zero gradients.
  for (size_t i = 0; i + 1 < network.layers.size(); ++i) {
    if (readers[i] == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("layers[", i, "] (", Quote(network.layers[i].name),
                       ")'s output is never used: no later layer reads it"));
    }
  }
  return result;
}

bool GradientSelection::WantsParameter(const std::string& name) const {
  return all_parameters ||
         std::find(parameters.begin(), parameters.end(), name) != parameters.end();
}

}  // namespace gradengine
