#include "tests/reference/reference.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <utility>
#include <variant>

namespace gradtest {
namespace {

using gradengine::ActivationKind;
using gradengine::ActivationSpec;
using gradengine::Conv2dSpec;
using gradengine::ObjectiveKind;

// The reference's REQUIRES are programming errors in a test; fail loudly even under NDEBUG.
void Require(bool condition, const char* what) {
  if (!condition) {
    std::fprintf(stderr, "gradtest reference: requirement failed: %s\n", what);
    std::abort();
  }
}

int64_t NumElements(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

const RefTensor& Parameter(const RefParameters& parameters, const std::string& name) {
  auto it = parameters.find(name);
  Require(it != parameters.end(), "every parameter of the network is supplied");
  return it->second;
}

}  // namespace

RefTensor RefTensor::Zeros(std::vector<int64_t> shape) {
  RefTensor t;
  t.data.assign(static_cast<size_t>(NumElements(shape)), 0.0);
  t.shape = std::move(shape);
  return t;
}

RefTensor RefTensor::FromView(const gradengine::TensorView& view) {
  Require(NumElements(view.shape) == view.size, "view size matches its shape");
  RefTensor t;
  t.shape = view.shape;
  t.data.assign(view.data, view.data + view.size);
  return t;
}

RefParameters RefParametersFromViews(const gradengine::ParameterViews& views) {
  RefParameters parameters;
  for (const auto& [name, view] : views) parameters[name] = RefTensor::FromView(view);
  return parameters;
}

double& RefTensor::at(int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
  return data[static_cast<size_t>(((i0 * shape[1] + i1) * shape[2] + i2) * shape[3] + i3)];
}

double RefTensor::at(int64_t i0, int64_t i1, int64_t i2, int64_t i3) const {
  return data[static_cast<size_t>(((i0 * shape[1] + i1) * shape[2] + i2) * shape[3] + i3)];
}

int64_t RefConvOutputSize(int64_t input, int64_t kernel, int64_t stride, int64_t pad_begin,
                          int64_t pad_end, int64_t dilation) {
  const int64_t span = dilation * (kernel - 1) + 1;  // input extent one output sees
  const int64_t room = input + pad_begin + pad_end - span;
  if (room < 0) return 0;
  return room / stride + 1;
}

// The textbook loop. Output pixel (oh, ow) of channel oc sees, through tap (kh, kw), input pixel
//   ih = oh * stride_h - pad_top + kh * dilation_h
//   iw = ow * stride_w - pad_left + kw * dilation_w
// of each input channel in oc's group; taps outside the input read the zero padding.
RefTensor Conv2dForward(const Conv2dSpec& spec, const RefTensor& x, const RefTensor& weight,
                        const RefTensor* bias) {
  Require(x.shape.size() == 4 && x.shape[1] == spec.in_channels, "conv input is [N, C, H, W]");
  Require(weight.shape == std::vector<int64_t>({spec.out_channels, spec.in_channels / spec.groups,
                                                spec.kernel_h, spec.kernel_w}),
          "conv weight shape");
  Require((bias != nullptr) == spec.bias, "conv bias present iff spec.bias");
  Require(bias == nullptr || bias->shape == std::vector<int64_t>({spec.out_channels}),
          "conv bias shape");
  const int64_t batch = x.shape[0], in_h = x.shape[2], in_w = x.shape[3];
  const int64_t out_h = RefConvOutputSize(in_h, spec.kernel_h, spec.stride_h, spec.pad_top,
                                          spec.pad_bottom, spec.dilation_h);
  const int64_t out_w = RefConvOutputSize(in_w, spec.kernel_w, spec.stride_w, spec.pad_left,
                                          spec.pad_right, spec.dilation_w);
  const int64_t in_per_group = spec.in_channels / spec.groups;
  const int64_t out_per_group = spec.out_channels / spec.groups;

  RefTensor y = RefTensor::Zeros({batch, spec.out_channels, out_h, out_w});
  for (int64_t n = 0; n < batch; ++n) {
    for (int64_t oc = 0; oc < spec.out_channels; ++oc) {
      const int64_t group = oc / out_per_group;
      for (int64_t oh = 0; oh < out_h; ++oh) {
        for (int64_t ow = 0; ow < out_w; ++ow) {
          double sum = bias != nullptr ? bias->data[static_cast<size_t>(oc)] : 0.0;
          for (int64_t ic = 0; ic < in_per_group; ++ic) {
            const int64_t c = group * in_per_group + ic;
            for (int64_t kh = 0; kh < spec.kernel_h; ++kh) {
              for (int64_t kw = 0; kw < spec.kernel_w; ++kw) {
                const int64_t ih = oh * spec.stride_h - spec.pad_top + kh * spec.dilation_h;
                const int64_t iw = ow * spec.stride_w - spec.pad_left + kw * spec.dilation_w;
                if (ih < 0 || ih >= in_h || iw < 0 || iw >= in_w) continue;  // zero padding
                sum += x.at(n, c, ih, iw) * weight.at(oc, ic, kh, kw);
              }
            }
          }
          y.at(n, oc, oh, ow) = sum;
        }
      }
    }
  }
  return y;
}

// The same loop as Conv2dForward; each product x * w that contributed to y[n, oc, oh, ow]
// sends grad_y[n, oc, oh, ow] * w back to x and grad_y * x back to w.
Conv2dGrads Conv2dBackward(const Conv2dSpec& spec, const RefTensor& x, const RefTensor& weight,
                           const RefTensor& grad_output) {
  Require(x.shape.size() == 4 && grad_output.shape.size() == 4, "conv tensors are 4-d");
  const int64_t batch = x.shape[0], in_h = x.shape[2], in_w = x.shape[3];
  const int64_t out_h = grad_output.shape[2], out_w = grad_output.shape[3];
  Require(grad_output.shape == std::vector<int64_t>({batch, spec.out_channels, out_h, out_w}) &&
              out_h == RefConvOutputSize(in_h, spec.kernel_h, spec.stride_h, spec.pad_top,
                                         spec.pad_bottom, spec.dilation_h) &&
              out_w == RefConvOutputSize(in_w, spec.kernel_w, spec.stride_w, spec.pad_left,
                                         spec.pad_right, spec.dilation_w),
          "conv grad_output has the conv output's shape");
  const int64_t in_per_group = spec.in_channels / spec.groups;
  const int64_t out_per_group = spec.out_channels / spec.groups;

  Conv2dGrads grads;
  grads.input_grad = RefTensor::Zeros(x.shape);
  grads.weight_grad = RefTensor::Zeros(weight.shape);
  if (spec.bias) grads.bias_grad = RefTensor::Zeros({spec.out_channels});
  for (int64_t n = 0; n < batch; ++n) {
    for (int64_t oc = 0; oc < spec.out_channels; ++oc) {
      const int64_t group = oc / out_per_group;
      for (int64_t oh = 0; oh < out_h; ++oh) {
        for (int64_t ow = 0; ow < out_w; ++ow) {
          const double grad_y = grad_output.at(n, oc, oh, ow);
          if (spec.bias) grads.bias_grad.data[static_cast<size_t>(oc)] += grad_y;
          for (int64_t ic = 0; ic < in_per_group; ++ic) {
            const int64_t c = group * in_per_group + ic;
            for (int64_t kh = 0; kh < spec.kernel_h; ++kh) {
              for (int64_t kw = 0; kw < spec.kernel_w; ++kw) {
                const int64_t ih = oh * spec.stride_h - spec.pad_top + kh * spec.dilation_h;
                const int64_t iw = ow * spec.stride_w - spec.pad_left + kw * spec.dilation_w;
                if (ih < 0 || ih >= in_h || iw < 0 || iw >= in_w) continue;  // zero padding
                grads.input_grad.at(n, c, ih, iw) += grad_y * weight.at(oc, ic, kh, kw);
                grads.weight_grad.at(oc, ic, kh, kw) += grad_y * x.at(n, c, ih, iw);
              }
            }
          }
        }
      }
    }
  }
  return grads;
}

namespace {
constexpr double kPi = 3.14159265358979323846;
// The tanh approximation of GELU is 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + c x^3).
constexpr double kGeluTanhCubic = 0.044715;
double GeluTanhArgument(double x) {
  return std::sqrt(2.0 / kPi) * (x + kGeluTanhCubic * x * x * x);
}
double GeluTanhArgumentDerivative(double x) {
  return std::sqrt(2.0 / kPi) * (1.0 + 3.0 * kGeluTanhCubic * x * x);
}
}  // namespace

double ActivationValue(const ActivationSpec& spec, double x) {
  const double alpha = static_cast<double>(spec.alpha);
  switch (spec.kind) {
    case ActivationKind::kRelu:
      return x > 0 ? x : 0.0;
    case ActivationKind::kLeakyRelu:
      return x > 0 ? x : alpha * x;
    case ActivationKind::kTanh:
      return std::tanh(x);
    case ActivationKind::kSigmoid:
      return 1.0 / (1.0 + std::exp(-x));
    case ActivationKind::kElu:
      return x > 0 ? x : alpha * (std::exp(x) - 1.0);
    case ActivationKind::kGeluErf:
      return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0)));
    case ActivationKind::kGeluTanh:
      return 0.5 * x * (1.0 + std::tanh(GeluTanhArgument(x)));
  }
  Require(false, "known activation kind");
  return 0.0;
}

double ActivationDerivative(const ActivationSpec& spec, double x) {
  const double alpha = static_cast<double>(spec.alpha);
  switch (spec.kind) {
    case ActivationKind::kRelu:
      return x > 0 ? 1.0 : 0.0;
    case ActivationKind::kLeakyRelu:
      return x > 0 ? 1.0 : alpha;
    case ActivationKind::kTanh: {
      const double t = std::tanh(x);
      return 1.0 - t * t;
    }
    case ActivationKind::kSigmoid: {
      const double s = 1.0 / (1.0 + std::exp(-x));
      return s * (1.0 - s);
    }
    case ActivationKind::kElu:
      return x > 0 ? 1.0 : alpha * std::exp(x);
    case ActivationKind::kGeluErf: {
      // d/dx [x * Phi(x)] = Phi(x) + x * phi(x), Phi the normal CDF and phi its density.
      const double cdf = 0.5 * (1.0 + std::erf(x / std::sqrt(2.0)));
      const double density = std::exp(-0.5 * x * x) / std::sqrt(2.0 * kPi);
      return cdf + x * density;
    }
    case ActivationKind::kGeluTanh: {
      // y' = 0.5 (1 + tanh(u)) + 0.5 x (1 - tanh(u)^2) u'.
      const double t = std::tanh(GeluTanhArgument(x));
      return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GeluTanhArgumentDerivative(x);
    }
  }
  Require(false, "known activation kind");
  return 0.0;
}

RefTensor ActivationForward(const ActivationSpec& spec, const RefTensor& x) {
  RefTensor y = RefTensor::Zeros(x.shape);
  for (size_t i = 0; i < x.data.size(); ++i) y.data[i] = ActivationValue(spec, x.data[i]);
  return y;
}

RefTensor ActivationBackward(const ActivationSpec& spec, const RefTensor& x,
                             const RefTensor& grad_output) {
  Require(grad_output.shape == x.shape, "activation grad_output has the input's shape");
  RefTensor grad_input = RefTensor::Zeros(x.shape);
  for (size_t i = 0; i < x.data.size(); ++i) {
    grad_input.data[i] = grad_output.data[i] * ActivationDerivative(spec, x.data[i]);
  }
  return grad_input;
}

std::optional<double> ObjectiveLoss(const RefObjective& objective, const RefTensor& output) {
  switch (objective.kind) {
    case ObjectiveKind::kMse: {
      Require(objective.tensor.shape == output.shape, "mse target has the output's shape");
      double sum_sq = 0.0;
      for (size_t i = 0; i < output.data.size(); ++i) {
        const double diff = output.data[i] - objective.tensor.data[i];
        sum_sq += diff * diff;
      }
      return sum_sq / static_cast<double>(output.num_elements());
    }
    case ObjectiveKind::kSum: {
      double sum = 0.0;
      for (double v : output.data) sum += v;
      return sum;
    }
    case ObjectiveKind::kGradOutput:
      return std::nullopt;
  }
  Require(false, "known objective kind");
  return std::nullopt;
}

RefTensor ObjectiveGrad(const RefObjective& objective, const RefTensor& output) {
  RefTensor grad = RefTensor::Zeros(output.shape);
  switch (objective.kind) {
    case ObjectiveKind::kMse: {
      // d/dy_i of (1/N) sum_j (y_j - t_j)^2 = 2 (y_i - t_i) / N.
      Require(objective.tensor.shape == output.shape, "mse target has the output's shape");
      const double count = static_cast<double>(output.num_elements());
      for (size_t i = 0; i < output.data.size(); ++i) {
        grad.data[i] = 2.0 * (output.data[i] - objective.tensor.data[i]) / count;
      }
      return grad;
    }
    case ObjectiveKind::kSum:
      for (double& g : grad.data) g = 1.0;
      return grad;
    case ObjectiveKind::kGradOutput:
      Require(objective.tensor.shape == output.shape, "grad_output has the output's shape");
      return objective.tensor;
  }
  Require(false, "known objective kind");
  return grad;
}

std::vector<RefTensor> ReferenceLayerOutputs(const gradengine::NetworkSpec& network,
                                             const RefParameters& parameters,
                                             const RefTensor& input) {
  std::vector<RefTensor> outputs;
  const RefTensor* x = &input;
  for (const gradengine::LayerSpec& layer : network.layers) {
    if (const auto* conv = std::get_if<Conv2dSpec>(&layer.op)) {
      const RefTensor& weight = Parameter(parameters, layer.name + ".weight");
      const RefTensor* bias = conv->bias ? &Parameter(parameters, layer.name + ".bias") : nullptr;
      outputs.push_back(Conv2dForward(*conv, *x, weight, bias));
    } else {
      outputs.push_back(ActivationForward(std::get<ActivationSpec>(layer.op), *x));
    }
    x = &outputs.back();
  }
  return outputs;
}

RefTensor ReferenceForward(const gradengine::NetworkSpec& network, const RefParameters& parameters,
                           const RefTensor& input) {
  std::vector<RefTensor> outputs = ReferenceLayerOutputs(network, parameters, input);
  if (outputs.empty()) return input;
  return std::move(outputs.back());
}

RefTensor ReferenceForward(const gradengine::NetworkSpec& network,
                           const gradengine::ParameterViews& parameters,
                           const gradengine::TensorView& input) {
  return ReferenceForward(network, RefParametersFromViews(parameters), RefTensor::FromView(input));
}

ReferenceResult RunReference(const gradengine::NetworkSpec& network,
                             const RefParameters& parameters, const RefTensor& input,
                             const RefObjective& objective) {
  const std::vector<RefTensor> outputs = ReferenceLayerOutputs(network, parameters, input);
  ReferenceResult result;
  result.output = outputs.empty() ? input : outputs.back();
  result.loss = ObjectiveLoss(objective, result.output);

  // Walk the chain backwards; `grad` is dL/d(output of layer i) on entry to step i.
  RefTensor grad = ObjectiveGrad(objective, result.output);
  for (size_t i = network.layers.size(); i-- > 0;) {
    const gradengine::LayerSpec& layer = network.layers[i];
    const RefTensor& layer_input = i == 0 ? input : outputs[i - 1];
    if (const auto* conv = std::get_if<Conv2dSpec>(&layer.op)) {
      Conv2dGrads conv_grads =
          Conv2dBackward(*conv, layer_input, Parameter(parameters, layer.name + ".weight"), grad);
      result.parameter_grads[layer.name + ".weight"] = std::move(conv_grads.weight_grad);
      if (conv->bias) {
        result.parameter_grads[layer.name + ".bias"] = std::move(conv_grads.bias_grad);
      }
      grad = std::move(conv_grads.input_grad);
    } else {
      grad = ActivationBackward(std::get<ActivationSpec>(layer.op), layer_input, grad);
    }
  }
  result.input_grad = std::move(grad);
  return result;
}

ReferenceResult RunReference(const gradengine::GradientRequest& request) {
  RefObjective objective;
  objective.kind = request.objective.kind;
  if (objective.kind != ObjectiveKind::kSum) {
    objective.tensor = RefTensor::FromView(request.objective.tensor);
  }
  return RunReference(request.network, RefParametersFromViews(request.parameters),
                      RefTensor::FromView(request.input), objective);
}

}  // namespace gradtest
