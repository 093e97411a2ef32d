// The exact reference the engine is tested against: every layer, objective and gradient of a
// gradengine network written as plain loops in double precision, with PyTorch's semantics
// (torch.nn.functional.conv2d, relu, leaky_relu, tanh, sigmoid, elu, gelu).
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

// A dense row-major (NCHW) tensor of doubles.
struct RefTensor {
  std::vector<int64_t> shape;
  std::vector<double> data;

  // A zero-filled tensor of `shape`.
  static RefTensor Zeros(std::vector<int64_t> shape);
  // The float values of `view`, widened to double.
  static RefTensor FromView(const gradengine::TensorView& view);

  int64_t num_elements() const { return static_cast<int64_t>(data.size()); }
  // Element [i0, i1, i2, i3] of a 4-d tensor.
  double& at(int64_t i0, int64_t i1, int64_t i2, int64_t i3);
  double at(int64_t i0, int64_t i1, int64_t i2, int64_t i3) const;
};

// Parameters by name ("conv1.weight", "conv1.bias"), as in gradengine::ParameterViews.
using RefParameters = std::map<std::string, RefTensor>;
RefParameters RefParametersFromViews(const gradengine::ParameterViews& views);

struct RefObjective {
  gradengine::ObjectiveKind kind = gradengine::ObjectiveKind::kMse;
  // The target for kMse, dL/dy for kGradOutput, unused for kSum.
  RefTensor tensor;
};

struct ReferenceResult {
  RefTensor output;
  // Absent for kGradOutput, as in gradengine::GradientResult.
  std::optional<double> loss;
  // Always computed, whatever the request selects.
  RefTensor input_grad;
  // Every parameter of the network, whatever the request selects.
  std::map<std::string, RefTensor> parameter_grads;
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

// The loss of `output` (nullopt for kGradOutput) and dL/doutput.
std::optional<double> ObjectiveLoss(const RefObjective& objective, const RefTensor& output);
RefTensor ObjectiveGrad(const RefObjective& objective, const RefTensor& output);

// ---- Whole networks. ----
// REQUIRES for all of these: the network, parameters, input and objective are valid
// (gradengine::ValidateNetwork accepts them, every parameter is present with its shape, the
// objective tensor has the output's shape). Violations abort via assert-like checks.

// The output of every layer, in order; the last one is the network's output.
std::vector<RefTensor> ReferenceLayerOutputs(const gradengine::NetworkSpec& network,
                                             const RefParameters& parameters,
                                             const RefTensor& input);

RefTensor ReferenceForward(const gradengine::NetworkSpec& network, const RefParameters& parameters,
                           const RefTensor& input);
RefTensor ReferenceForward(const gradengine::NetworkSpec& network,
                           const gradengine::ParameterViews& parameters,
                           const gradengine::TensorView& input);

// Forward, objective and backward through the whole chain; every gradient is computed.
ReferenceResult RunReference(const gradengine::NetworkSpec& network,
                             const RefParameters& parameters, const RefTensor& input,
                             const RefObjective& objective);
ReferenceResult RunReference(const gradengine::GradientRequest& request);

}  // namespace gradtest

#endif  // TESTS_REFERENCE_REFERENCE_H_
