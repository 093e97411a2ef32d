// Fuzzes gradengine::ValidateNetwork on structured random specs: chains of conv2d and
// activation layers with random hyperparameters (small values, limits and their neighbours,
// and any int64), names (empty, repeated, random), input shapes of any rank and element
// limits, built with FuzzedDataProvider.
//
// For a network that passes, checks the shapes against a model of PyTorch's shape rule
// computed in 128 bits: one output per layer, every dim positive, every output and parameter
// within the element limit, the parameters exactly each conv layer's weight and bias at
// PyTorch's shapes. An error must be InvalidArgument or ResourceExhausted and name the input
// or the layers.

#include <fuzzer/FuzzedDataProvider.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gradengine/network.h"
#include "tests/fuzz/fuzz_check.h"

namespace gradfuzz {
namespace {

using gradengine::ActivationKind;
using gradengine::ActivationSpec;
using gradengine::Conv2dSpec;
using gradengine::LayerSpec;
using gradengine::NetworkSpec;

constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();
constexpr int64_t kInt64Min = std::numeric_limits<int64_t>::min();

// A value for a dim or hyperparameter: mostly small, sometimes a limit of the validator or of
// int64 (and its neighbours), sometimes anything.
int64_t PickValue(FuzzedDataProvider& fdp) {
  static constexpr int64_t kEdges[] = {0,
                                       -1,
                                       4096,
                                       4097,
                                       int64_t{1} << 24,
                                       (int64_t{1} << 24) + 1,
                                       int64_t{1} << 31,
                                       int64_t{1} << 32,
                                       int64_t{1} << 62,
                                       kInt64Max,
                                       kInt64Max - 1,
                                       kInt64Min};
  switch (fdp.ConsumeIntegralInRange<int>(0, 3)) {
    case 0:
    case 1:
      return fdp.ConsumeIntegralInRange<int64_t>(1, 8);
    case 2:
      return fdp.PickValueInArray(kEdges);
    default:
      return fdp.ConsumeIntegral<int64_t>();
  }
}

std::vector<int64_t> PickShape(FuzzedDataProvider& fdp) {
  // Rank 4 most of the time; any of 0-6 otherwise.
  const size_t rank =
      fdp.ConsumeBool() ? 4 : static_cast<size_t>(fdp.ConsumeIntegralInRange<int>(0, 6));
  std::vector<int64_t> shape;
  for (size_t i = 0; i < rank; ++i) shape.push_back(PickValue(fdp));
  return shape;
}

std::string PickName(FuzzedDataProvider& fdp, size_t index, const NetworkSpec& network) {
  switch (fdp.ConsumeIntegralInRange<int>(0, 3)) {
    case 0:
      return fdp.ConsumeRandomLengthString(12);
    case 1:
      if (!network.layers.empty()) {
        return network.layers[fdp.ConsumeIntegralInRange<size_t>(0, network.layers.size() - 1)]
            .name;
      }
      return "";
    default:
      return absl::StrCat("layer", index);
  }
}

float PickAlpha(FuzzedDataProvider& fdp) {
  static constexpr float kEdges[] = {0.0f,
                                     0.01f,
                                     1.0f,
                                     -1.0f,
                                     std::numeric_limits<float>::infinity(),
                                     -std::numeric_limits<float>::infinity(),
                                     std::numeric_limits<float>::quiet_NaN()};
  return fdp.ConsumeBool() ? fdp.PickValueInArray(kEdges) : fdp.ConsumeFloatingPoint<float>();
}

LayerSpec PickLayer(FuzzedDataProvider& fdp, size_t index, const NetworkSpec& network,
                    int64_t channels) {
  LayerSpec layer;
  layer.name = PickName(fdp, index, network);
  if (fdp.ConsumeBool()) {
    ActivationSpec activation;
    // One past the last kind too: a value no enumerator names.
    activation.kind = static_cast<ActivationKind>(fdp.ConsumeIntegralInRange<int>(0, 7));
    activation.alpha = PickAlpha(fdp);
    layer.op = activation;
    return layer;
  }
  Conv2dSpec conv;
  // Usually the channels the previous layer produced, so that chains get deep.
  conv.in_channels = fdp.ConsumeBool() ? channels : PickValue(fdp);
  conv.out_channels = PickValue(fdp);
  conv.kernel_h = PickValue(fdp);
  conv.kernel_w = fdp.ConsumeBool() ? conv.kernel_h : PickValue(fdp);
  conv.stride_h = fdp.ConsumeBool() ? 1 : PickValue(fdp);
  conv.stride_w = fdp.ConsumeBool() ? conv.stride_h : PickValue(fdp);
  const bool padded = fdp.ConsumeBool();
  conv.pad_top = padded ? PickValue(fdp) : 0;
  conv.pad_bottom = fdp.ConsumeBool() ? conv.pad_top : PickValue(fdp);
  conv.pad_left = fdp.ConsumeBool() ? conv.pad_top : PickValue(fdp);
  conv.pad_right = fdp.ConsumeBool() ? conv.pad_left : PickValue(fdp);
  conv.dilation_h = fdp.ConsumeBool() ? 1 : PickValue(fdp);
  conv.dilation_w = fdp.ConsumeBool() ? conv.dilation_h : PickValue(fdp);
  conv.groups = fdp.ConsumeBool() ? 1 : PickValue(fdp);
  conv.bias = fdp.ConsumeBool();
  layer.op = conv;
  return layer;
}

std::string ShapeText(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// product(shape) of positive dims, or INT64_MAX + 1 once it exceeds INT64_MAX.
__int128 Product(const std::vector<int64_t>& shape) {
  __int128 count = 1;
  for (int64_t dim : shape) {
    count *= dim;
    if (count > kInt64Max) return static_cast<__int128>(kInt64Max) + 1;
  }
  return count;
}

// PyTorch's output size, floor((in + pads - dilation * (k - 1) - 1) / stride) + 1, in 128 bits.
__int128 ModelOutputSize(int64_t input, int64_t kernel, int64_t stride, int64_t pad_begin,
                         int64_t pad_end, int64_t dilation) {
  const __int128 room = static_cast<__int128>(input) + pad_begin + pad_end -
                        static_cast<__int128>(dilation) * (kernel - 1) - 1;
  if (room < 0) return 0;
  return room / stride + 1;
}

void CheckAccepted(const NetworkSpec& network, const std::vector<int64_t>& input_shape,
                   int64_t max_elements, const gradengine::ValidatedNetwork& validated) {
  FUZZ_CHECK(input_shape.size() == 4, "input ", ShapeText(input_shape), " accepted");
  for (int64_t dim : input_shape) FUZZ_CHECK(dim >= 1, "input ", ShapeText(input_shape));
  FUZZ_CHECK(Product(input_shape) <= max_elements, "input ", ShapeText(input_shape),
             " over the limit ", max_elements);
  FUZZ_CHECK(validated.output_shapes.size() == network.layers.size(),
             validated.output_shapes.size(), " output shapes for ", network.layers.size(),
             " layers");
  std::vector<std::pair<std::string, std::vector<int64_t>>> parameters;
  std::vector<int64_t> shape = input_shape;
  for (size_t i = 0; i < network.layers.size(); ++i) {
    const LayerSpec& layer = network.layers[i];
    FUZZ_CHECK(!layer.name.empty(), "layers[", i, "] has no name");
    for (size_t j = 0; j < i; ++j) {
      FUZZ_CHECK(network.layers[j].name != layer.name, "layers[", j, "] and [", i,
                 "] share a name");
    }
    if (const auto* conv = std::get_if<Conv2dSpec>(&layer.op)) {
      for (int64_t value :
           {conv->in_channels, conv->out_channels, conv->kernel_h, conv->kernel_w, conv->stride_h,
            conv->stride_w, conv->dilation_h, conv->dilation_w, conv->groups}) {
        FUZZ_CHECK(value >= 1, "layers[", i, "] has a hyperparameter ", value);
      }
      for (int64_t pad : {conv->pad_top, conv->pad_bottom, conv->pad_left, conv->pad_right}) {
        FUZZ_CHECK(pad >= 0, "layers[", i, "] has padding ", pad);
      }
      FUZZ_CHECK(conv->in_channels == shape[1], "layers[", i, "].in_channels=", conv->in_channels,
                 " for input ", ShapeText(shape));
      FUZZ_CHECK(conv->in_channels % conv->groups == 0 && conv->out_channels % conv->groups == 0,
                 "layers[", i, "].groups=", conv->groups);
      const __int128 out_h = ModelOutputSize(shape[2], conv->kernel_h, conv->stride_h,
                                             conv->pad_top, conv->pad_bottom, conv->dilation_h);
      const __int128 out_w = ModelOutputSize(shape[3], conv->kernel_w, conv->stride_w,
                                             conv->pad_left, conv->pad_right, conv->dilation_w);
      FUZZ_CHECK(out_h >= 1 && out_w >= 1 && out_h <= kInt64Max && out_w <= kInt64Max, "layers[", i,
                 "] accepted with an empty or huge output");
      shape = {shape[0], conv->out_channels, static_cast<int64_t>(out_h),
               static_cast<int64_t>(out_w)};
      parameters.emplace_back(
          layer.name + ".weight",
          std::vector<int64_t>{conv->out_channels, conv->in_channels / conv->groups, conv->kernel_h,
                               conv->kernel_w});
      if (conv->bias) {
        parameters.emplace_back(layer.name + ".bias", std::vector<int64_t>{conv->out_channels});
      }
    } else {
      const auto& activation = std::get<ActivationSpec>(layer.op);
      const int kind = static_cast<int>(activation.kind);
      FUZZ_CHECK(kind >= 0 && kind <= static_cast<int>(ActivationKind::kGeluTanh), "layers[", i,
                 "] accepted activation kind ", kind);
      if (activation.kind == ActivationKind::kLeakyRelu ||
          activation.kind == ActivationKind::kElu) {
        FUZZ_CHECK(std::isfinite(activation.alpha), "layers[", i, "] accepted alpha ",
                   activation.alpha);
      }
    }
    FUZZ_CHECK(validated.output_shapes[i] == shape, "layers[", i, "] output ",
               ShapeText(validated.output_shapes[i]), ", PyTorch's rule gives ", ShapeText(shape));
    FUZZ_CHECK(Product(shape) <= max_elements, "layers[", i, "] output ", ShapeText(shape),
               " over the limit ", max_elements);
  }
  std::vector<std::pair<std::string, std::vector<int64_t>>> reported;
  for (const gradengine::ParameterInfo& parameter : validated.parameters) {
    FUZZ_CHECK(parameter.trainable && parameter.required, parameter.name,
               " is a buffer or optional, but conv2d has neither");
    reported.emplace_back(parameter.name, parameter.shape);
  }
  FUZZ_CHECK(reported == parameters, reported.size(), " parameters reported, ", parameters.size(),
             " expected");
  for (const auto& [name, parameter_shape] : parameters) {
    FUZZ_CHECK(Product(parameter_shape) <= max_elements, name, " ", ShapeText(parameter_shape),
               " over the limit ", max_elements);
  }
}

void FuzzValidateNetwork(FuzzedDataProvider& fdp) {
  // A power of two, no limit at all, or any positive value.
  int64_t max_elements = kInt64Max;
  switch (fdp.ConsumeIntegralInRange<int>(0, 2)) {
    case 0:
      max_elements = int64_t{1} << fdp.ConsumeIntegralInRange<int>(0, 62);
      break;
    case 1:
      break;
    default:
      max_elements = fdp.ConsumeIntegralInRange<int64_t>(1, kInt64Max);
  }
  const std::vector<int64_t> input_shape = PickShape(fdp);
  NetworkSpec network;
  const int layers = fdp.ConsumeIntegralInRange<int>(0, 12);
  int64_t channels = input_shape.size() > 1 ? input_shape[1] : 1;
  for (int i = 0; i < layers; ++i) {
    network.layers.push_back(PickLayer(fdp, static_cast<size_t>(i), network, channels));
    if (const auto* conv = std::get_if<Conv2dSpec>(&network.layers.back().op)) {
      channels = conv->out_channels;
    }
  }

  absl::StatusOr<gradengine::ValidatedNetwork> validated =
      gradengine::ValidateNetwork(network, input_shape, max_elements);
  if (!validated.ok()) {
    CheckError(validated.status(),
               {absl::StatusCode::kInvalidArgument, absl::StatusCode::kResourceExhausted},
               "ValidateNetwork");
    const absl::string_view message = validated.status().message();
    FUZZ_CHECK(absl::StartsWith(message, "layers") || absl::StartsWith(message, "input"),
               "the error names neither the input nor a layer: ", message);
    return;
  }
  CheckAccepted(network, input_shape, max_elements, *validated);
}

}  // namespace
}  // namespace gradfuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider fdp(data, size);
  gradfuzz::FuzzValidateNetwork(fdp);
  return 0;
}
