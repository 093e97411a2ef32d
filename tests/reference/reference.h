// The exact reference the engine is tested against: every layer, objective and gradient of a
// gradengine network written as plain loops in double precision, with PyTorch's semantics
// (torch.nn.functional.conv2d, relu, leaky_relu, tanh, sigmoid, elu, gelu, max_pool2d,
// avg_pool2d, batch_norm, linear, cross_entropy, as of PyTorch 1.13).
//
// Nothing here is fast or clever on purpose: each op is one short function whose loops can be
// checked against the formula by eye, and reference_test.cc checks every gradient against
// central finite differences. Shapes are computed here too, independently of the engine.
//
// All functions are pure and thread-safe.

#ifndef TESTS_REFERENCE_REFERENCE_H_
#define TESTS_REFERENCE_REFERENCE_H_

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "gradengine/network.h"
#include "gradengine/tensor.h"

namespace gradtest {

// A dense row-major tensor of doubles: NCHW, or [N, F] from a linear layer on.
struct RefTensor {
  std::vector<int64_t> shape;
  std::vector<double> data;

  // A zero-filled tensor of `shape`.
  static RefTensor Zeros(std::vector<int64_t> shape);
  // The float values of `view`, widened to double.
  static RefTensor FromView(const gradengine::TensorView& view);

  int64_t num_elements() const { return static_cast<int64_t>(data.size()); }
  // Element [i0, i1, i2, i3] of a 4-d tensor (unchecked).
  double& at(int64_t i0, int64_t i1, int64_t i2, int64_t i3);
  double at(int64_t i0, int64_t i1, int64_t i2, int64_t i3) const;
  // Element [i0, i1] of a 2-d tensor (unchecked).
  double& at(int64_t i0, int64_t i1);
  double at(int64_t i0, int64_t i1) const;
};

// Parameters by name ("conv1.weight", "conv1.bias"), as in gradengine::ParameterViews.
using RefParameters = std::map<std::string, RefTensor>;
RefParameters RefParametersFromViews(const gradengine::ParameterViews& views);

struct RefObjective {
  gradengine::ObjectiveKind kind = gradengine::ObjectiveKind::kMse;
  // The target for kMse, dL/dy for kGradOutput, unused for kSum and kCrossEntropy.
  RefTensor tensor;
  // kCrossEntropy only, as in gradengine::Objective: class indices of shape `labels_shape`,
  // [N] for [N, C] logits or [N, H, W] for [N, C, H, W] ones, each in [0, C) or ignore_index.
  std::vector<int64_t> labels;
  std::vector<int64_t> labels_shape;
  double label_smoothing = 0.0;
  int64_t ignore_index = -100;
};

struct ReferenceResult {
  RefTensor output;
  // Absent for kGradOutput, as in gradengine::GradientResult.
  std::optional<double> loss;
  // Always computed, whatever the request selects.
  RefTensor input_grad;
  // Every trainable parameter of the network, whatever the request selects; buffers (the
  // running statistics, ParameterInfo::trainable false) never appear.
  std::map<std::string, RefTensor> parameter_grads;
  // For every batch_norm2d layer in training mode, "<name>.running_mean" and
  // "<name>.running_var" after the update, as in gradengine::GradientResult.
  std::map<std::string, RefTensor> running_stats;
};

// ---- One function per op. ----

// PyTorch's output size of one spatial dim: floor((in + pads - dilation*(k-1) - 1)/stride) + 1.
int64_t RefConvOutputSize(int64_t input, int64_t kernel, int64_t stride, int64_t pad_begin,
                          int64_t pad_end, int64_t dilation);

// y = conv2d(x, weight, bias). `bias` is null when spec.bias is false.
// REQUIRES: x is [N, spec.in_channels, H, W], weight is
// [out_channels, in_channels / groups, kernel_h, kernel_w], bias is [out_channels].
RefTensor Conv2dForward(const gradengine::Conv2dSpec& spec, const RefTensor& x,
                        const RefTensor& weight, const RefTensor* bias);

struct Conv2dGrads {
  RefTensor input_grad;
  RefTensor weight_grad;
  RefTensor bias_grad;  // empty (no shape) when spec.bias is false
};

// dL/dx, dL/dweight and dL/dbias of Conv2dForward given dL/dy.
Conv2dGrads Conv2dBackward(const gradengine::Conv2dSpec& spec, const RefTensor& x,
                           const RefTensor& weight, const RefTensor& grad_output);

// Scalar activation and its derivative with PyTorch's choice at the kinks: relu'(0) = 0,
// leaky_relu'(0) = negative_slope, elu'(0) = alpha.
double ActivationValue(const gradengine::ActivationSpec& spec, double x);
double ActivationDerivative(const gradengine::ActivationSpec& spec, double x);

// Elementwise y = f(x), and dL/dx = dL/dy * f'(x).
RefTensor ActivationForward(const gradengine::ActivationSpec& spec, const RefTensor& x);
RefTensor ActivationBackward(const gradengine::ActivationSpec& spec, const RefTensor& x,
                             const RefTensor& grad_output);

// PyTorch's output size of one pooled dim (pooling_output_shape): floor or, with ceil_mode,
// ceil of (in + 2 pad - dilation (k - 1) - 1) / stride, plus 1; with ceil_mode the last
// window must start inside the input or the left padding, else it is dropped. A value < 1
// means the kernel does not fit.
int64_t RefPoolOutputSize(int64_t input, int64_t kernel, int64_t stride, int64_t pad,
                          int64_t dilation, bool ceil_mode);

// y = max_pool2d(x); padding reads as -inf. REQUIRES: x is 4-d.
RefTensor MaxPool2dForward(const gradengine::MaxPool2dSpec& spec, const RefTensor& x);
// dL/dx: each output's gradient goes to its window's maximum, the first in scan order (row by
// row) on ties, as PyTorch's CPU kernel.
RefTensor MaxPool2dBackward(const gradengine::MaxPool2dSpec& spec, const RefTensor& x,
                            const RefTensor& grad_output);

// y = avg_pool2d(x). With count_include_pad the divisor is the window clipped to the padded
// input, else the number of real input elements in it. REQUIRES: x is 4-d.
RefTensor AvgPool2dForward(const gradengine::AvgPool2dSpec& spec, const RefTensor& x);
RefTensor AvgPool2dBackward(const gradengine::AvgPool2dSpec& spec, const RefTensor& x,
                            const RefTensor& grad_output);

struct BatchNorm2dOutput {
  RefTensor output;
  // In training mode the updated running statistics; in inference mode the given ones.
  RefTensor running_mean;
  RefTensor running_var;
};

// batch_norm(x, running_mean, running_var, weight, bias, spec.training, spec.momentum,
// spec.eps). `weight` and `bias` are null when spec.affine is false.
// REQUIRES: x is [N, num_features, H, W] (N*H*W > 1 in training mode), every other tensor is
// [num_features].
BatchNorm2dOutput BatchNorm2dForward(const gradengine::BatchNorm2dSpec& spec, const RefTensor& x,
                                     const RefTensor* weight, const RefTensor* bias,
                                     const RefTensor& running_mean, const RefTensor& running_var);

struct BatchNorm2dGrads {
  RefTensor input_grad;
  RefTensor weight_grad;  // both empty (no shape) when spec.affine is false
  RefTensor bias_grad;
};

// dL/dx, dL/dweight, dL/dbias of BatchNorm2dForward given dL/dy; in training mode through the
// batch statistics, in inference mode with the running ones as constants.
BatchNorm2dGrads BatchNorm2dBackward(const gradengine::BatchNorm2dSpec& spec, const RefTensor& x,
                                     const RefTensor* weight, const RefTensor& running_mean,
                                     const RefTensor& running_var, const RefTensor& grad_output);

// y = flatten(x, 1) weight^T + bias, [N, out_features]. `bias` is null when spec.bias is false.
// REQUIRES: x is [N, ...] with in_features elements per row, weight [out_features,
// in_features], bias [out_features].
RefTensor LinearForward(const gradengine::LinearSpec& spec, const RefTensor& x,
                        const RefTensor& weight, const RefTensor* bias);

struct LinearGrads {
  RefTensor input_grad;  // x's own shape
  RefTensor weight_grad;
  RefTensor bias_grad;  // empty (no shape) when spec.bias is false
};

LinearGrads LinearBackward(const gradengine::LinearSpec& spec, const RefTensor& x,
                           const RefTensor& weight, const RefTensor& grad_output);

// y = x + other; the gradient of both is dL/dy. REQUIRES: equal shapes.
RefTensor AddForward(const RefTensor& x, const RefTensor& other);

// The loss of `output` (nullopt for kGradOutput) and dL/doutput. kCrossEntropy is
// F.cross_entropy(output, labels, ignore_index=, label_smoothing=) with mean reduction: per
// label not ignored (1 - eps) (-log p[label]) + eps / C sum_c (-log p[c]), averaged over those
// labels (NaN, with a zero gradient, if every label is ignored).
std::optional<double> ObjectiveLoss(const RefObjective& objective, const RefTensor& output);
RefTensor ObjectiveGrad(const RefObjective& objective, const RefTensor& output);

// ---- Whole networks. ----
// REQUIRES for all of these: the network, parameters, input and objective are valid
// (gradengine::ValidateNetwork accepts them, every required parameter is present with its
// shape, the objective tensor or labels have the output's shape). Violations abort via
// assert-like checks. Parameters and buffers are named, shaped and (when optional and absent)
// filled as gradengine::LayerParameters says.

// What `name` refers to as a layer's input or an add's other among layers[0, before): the
// index of that layer, or -1 for kNetworkInput.
int RefLayerIndex(const gradengine::NetworkSpec& network, const std::string& name, size_t before);
// What layers[i] reads: -1 for the network's input, else an earlier layer's index.
int RefInputSource(const gradengine::NetworkSpec& network, size_t i);

// The output of every layer, in order; the last one is the network's output.
std::vector<RefTensor> ReferenceLayerOutputs(const gradengine::NetworkSpec& network,
                                             const RefParameters& parameters,
                                             const RefTensor& input);

RefTensor ReferenceForward(const gradengine::NetworkSpec& network, const RefParameters& parameters,
                           const RefTensor& input);
RefTensor ReferenceForward(const gradengine::NetworkSpec& network,
                           const gradengine::ParameterViews& parameters,
                           const gradengine::TensorView& input);

// Forward, objective and backward through the whole network (gradients of a tensor read by
// several layers add up); every gradient is computed.
ReferenceResult RunReference(const gradengine::NetworkSpec& network,
                             const RefParameters& parameters, const RefTensor& input,
                             const RefObjective& objective);
ReferenceResult RunReference(const gradengine::GradientRequest& request);

}  // namespace gradtest

#endif  // TESTS_REFERENCE_REFERENCE_H_
