#include "tests/reference/reference.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <utility>
#include <variant>

#include "gradengine/overloaded.h"

namespace gradtest {
namespace {

using gradengine::ActivationKind;
using gradengine::ActivationSpec;
using gradengine::AddSpec;
using gradengine::AvgPool2dSpec;
using gradengine::BatchNorm2dSpec;
using gradengine::Conv2dSpec;
using gradengine::LayerSpec;
using gradengine::LinearSpec;
using gradengine::MaxPool2dSpec;
using gradengine::NetworkSpec;
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

double& RefTensor::at(int64_t i0, int64_t i1) {
  return data[static_cast<size_t>(i0 * shape[1] + i1)];
}

double RefTensor::at(int64_t i0, int64_t i1) const {
  return data[static_cast<size_t>(i0 * shape[1] + i1)];
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

int64_t RefPoolOutputSize(int64_t input, int64_t kernel, int64_t stride, int64_t pad,
                          int64_t dilation, bool ceil_mode) {
  // PyTorch's pooling_output_shape: div_rtn (division rounding towards -inf) of the room left
  // after the first window, plus stride - 1 to round up in ceil_mode.
  const int64_t numerator =
      input + 2 * pad - dilation * (kernel - 1) - 1 + (ceil_mode ? stride - 1 : 0);
  const int64_t quotient = numerator / stride - (numerator % stride < 0 ? 1 : 0);
  int64_t output = quotient + 1;
  // The last window must start inside the input or the left padding.
  if (ceil_mode && (output - 1) * stride >= input + pad) --output;
  return output;
}

// Output pixel (oh, ow) sees, through tap (kh, kw), input pixel
//   ih = oh * stride_h - pad_h + kh * dilation_h,  iw = ow * stride_w - pad_w + kw * dilation_w;
// taps outside the input read -inf and so never win. The taps are scanned row by row and only
// a strictly greater value (or, as in PyTorch, a NaN) replaces the maximum, so the first
// maximum wins a tie.
namespace {
struct PoolArgmax {
  double value = -std::numeric_limits<double>::infinity();
  int64_t ih = -1;
  int64_t iw = -1;
};

PoolArgmax MaxPoolWindow(const MaxPool2dSpec& spec, const RefTensor& x, int64_t n, int64_t c,
                         int64_t oh, int64_t ow) {
  const int64_t in_h = x.shape[2], in_w = x.shape[3];
  PoolArgmax best;
  for (int64_t kh = 0; kh < spec.kernel_h; ++kh) {
    for (int64_t kw = 0; kw < spec.kernel_w; ++kw) {
      const int64_t ih = oh * spec.stride_h - spec.pad_h + kh * spec.dilation_h;
      const int64_t iw = ow * spec.stride_w - spec.pad_w + kw * spec.dilation_w;
      if (ih < 0 || ih >= in_h || iw < 0 || iw >= in_w) continue;  // -inf padding
      const double v = x.at(n, c, ih, iw);
      if (best.ih < 0 || v > best.value || std::isnan(v)) best = {v, ih, iw};  // NaN wins
    }
  }
  Require(best.ih >= 0, "every max_pool2d window holds an input element");
  return best;
}

std::vector<int64_t> MaxPoolOutputShape(const MaxPool2dSpec& spec, const RefTensor& x) {
  Require(x.shape.size() == 4, "max_pool2d input is [N, C, H, W]");
  return {x.shape[0], x.shape[1],
          RefPoolOutputSize(x.shape[2], spec.kernel_h, spec.stride_h, spec.pad_h, spec.dilation_h,
                            spec.ceil_mode),
          RefPoolOutputSize(x.shape[3], spec.kernel_w, spec.stride_w, spec.pad_w, spec.dilation_w,
                            spec.ceil_mode)};
}
}  // namespace

RefTensor MaxPool2dForward(const MaxPool2dSpec& spec, const RefTensor& x) {
  RefTensor y = RefTensor::Zeros(MaxPoolOutputShape(spec, x));
  for (int64_t n = 0; n < y.shape[0]; ++n) {
    for (int64_t c = 0; c < y.shape[1]; ++c) {
      for (int64_t oh = 0; oh < y.shape[2]; ++oh) {
        for (int64_t ow = 0; ow < y.shape[3]; ++ow) {
          y.at(n, c, oh, ow) = MaxPoolWindow(spec, x, n, c, oh, ow).value;
        }
      }
    }
  }
  return y;
}

RefTensor MaxPool2dBackward(const MaxPool2dSpec& spec, const RefTensor& x,
                            const RefTensor& grad_output) {
  Require(grad_output.shape == MaxPoolOutputShape(spec, x),
          "max_pool2d grad_output has the output's shape");
  RefTensor grad_input = RefTensor::Zeros(x.shape);
  for (int64_t n = 0; n < grad_output.shape[0]; ++n) {
    for (int64_t c = 0; c < grad_output.shape[1]; ++c) {
      for (int64_t oh = 0; oh < grad_output.shape[2]; ++oh) {
        for (int64_t ow = 0; ow < grad_output.shape[3]; ++ow) {
          const PoolArgmax best = MaxPoolWindow(spec, x, n, c, oh, ow);
          grad_input.at(n, c, best.ih, best.iw) += grad_output.at(n, c, oh, ow);
        }
      }
    }
  }
  return grad_input;
}

// Output pixel (oh, ow) averages input rows ih = oh * stride_h - pad_h + kh, kh in
// [0, kernel_h), and likewise columns; as in PyTorch's kernel, the window is first clipped to
// the padded input [-pad, in + pad) (a ceil_mode window can run past it), which is the
// count_include_pad divisor, and then to the input [0, in), which is the other one.
namespace {
double AvgPoolDivisor(const AvgPool2dSpec& spec, int64_t in_h, int64_t in_w, int64_t oh,
                      int64_t ow) {
  const int64_t h_start = oh * spec.stride_h - spec.pad_h;
  const int64_t w_start = ow * spec.stride_w - spec.pad_w;
  const int64_t h_end = std::min(h_start + spec.kernel_h, in_h + spec.pad_h);
  const int64_t w_end = std::min(w_start + spec.kernel_w, in_w + spec.pad_w);
  if (spec.count_include_pad) return static_cast<double>((h_end - h_start) * (w_end - w_start));
  const int64_t real_h = std::min(h_end, in_h) - std::max<int64_t>(h_start, 0);
  const int64_t real_w = std::min(w_end, in_w) - std::max<int64_t>(w_start, 0);
  return static_cast<double>(real_h * real_w);
}

std::vector<int64_t> AvgPoolOutputShape(const AvgPool2dSpec& spec, const RefTensor& x) {
  Require(x.shape.size() == 4, "avg_pool2d input is [N, C, H, W]");
  return {
      x.shape[0], x.shape[1],
      RefPoolOutputSize(x.shape[2], spec.kernel_h, spec.stride_h, spec.pad_h, 1, spec.ceil_mode),
      RefPoolOutputSize(x.shape[3], spec.kernel_w, spec.stride_w, spec.pad_w, 1, spec.ceil_mode)};
}
}  // namespace

RefTensor AvgPool2dForward(const AvgPool2dSpec& spec, const RefTensor& x) {
  RefTensor y = RefTensor::Zeros(AvgPoolOutputShape(spec, x));
  const int64_t in_h = x.shape[2], in_w = x.shape[3];
  for (int64_t n = 0; n < y.shape[0]; ++n) {
    for (int64_t c = 0; c < y.shape[1]; ++c) {
      for (int64_t oh = 0; oh < y.shape[2]; ++oh) {
        for (int64_t ow = 0; ow < y.shape[3]; ++ow) {
          double sum = 0.0;
          for (int64_t kh = 0; kh < spec.kernel_h; ++kh) {
            for (int64_t kw = 0; kw < spec.kernel_w; ++kw) {
              const int64_t ih = oh * spec.stride_h - spec.pad_h + kh;
              const int64_t iw = ow * spec.stride_w - spec.pad_w + kw;
              if (ih < 0 || ih >= in_h || iw < 0 || iw >= in_w) continue;  // zero padding
              sum += x.at(n, c, ih, iw);
            }
          }
          y.at(n, c, oh, ow) = sum / AvgPoolDivisor(spec, in_h, in_w, oh, ow);
        }
      }
    }
  }
  return y;
}

RefTensor AvgPool2dBackward(const AvgPool2dSpec& spec, const RefTensor& x,
                            const RefTensor& grad_output) {
  Require(grad_output.shape == AvgPoolOutputShape(spec, x),
          "avg_pool2d grad_output has the output's shape");
  RefTensor grad_input = RefTensor::Zeros(x.shape);
  const int64_t in_h = x.shape[2], in_w = x.shape[3];
  for (int64_t n = 0; n < grad_output.shape[0]; ++n) {
    for (int64_t c = 0; c < grad_output.shape[1]; ++c) {
      for (int64_t oh = 0; oh < grad_output.shape[2]; ++oh) {
        for (int64_t ow = 0; ow < grad_output.shape[3]; ++ow) {
          const double share =
              grad_output.at(n, c, oh, ow) / AvgPoolDivisor(spec, in_h, in_w, oh, ow);
          for (int64_t kh = 0; kh < spec.kernel_h; ++kh) {
            for (int64_t kw = 0; kw < spec.kernel_w; ++kw) {
              const int64_t ih = oh * spec.stride_h - spec.pad_h + kh;
              const int64_t iw = ow * spec.stride_w - spec.pad_w + kw;
              if (ih < 0 || ih >= in_h || iw < 0 || iw >= in_w) continue;  // zero padding
              grad_input.at(n, c, ih, iw) += share;
            }
          }
        }
      }
    }
  }
  return grad_input;
}

namespace {
void CheckBatchNorm(const BatchNorm2dSpec& spec, const RefTensor& x, const RefTensor* weight,
                    const RefTensor& running_mean, const RefTensor& running_var) {
  Require(x.shape.size() == 4 && x.shape[1] == spec.num_features,
          "batch_norm2d input is [N, num_features, H, W]");
  Require((weight != nullptr) == spec.affine, "batch_norm2d weight present iff spec.affine");
  const std::vector<int64_t> channel_shape = {spec.num_features};
  Require(weight == nullptr || weight->shape == channel_shape, "batch_norm2d weight shape");
  Require(running_mean.shape == channel_shape && running_var.shape == channel_shape,
          "batch_norm2d running statistics shape");
  Require(!spec.training || x.shape[0] * x.shape[2] * x.shape[3] > 1,
          "batch_norm2d in training mode has more than one value per channel");
}

// The mean and biased variance of channel c over (N, H, W).
std::pair<double, double> ChannelMeanAndVariance(const RefTensor& x, int64_t c) {
  const int64_t batch = x.shape[0], height = x.shape[2], width = x.shape[3];
  const double count = static_cast<double>(batch * height * width);
  double sum = 0.0;
  for (int64_t n = 0; n < batch; ++n) {
    for (int64_t h = 0; h < height; ++h) {
      for (int64_t w = 0; w < width; ++w) sum += x.at(n, c, h, w);
    }
  }
  const double mean = sum / count;
  double sum_sq = 0.0;
  for (int64_t n = 0; n < batch; ++n) {
    for (int64_t h = 0; h < height; ++h) {
      for (int64_t w = 0; w < width; ++w) {
        const double diff = x.at(n, c, h, w) - mean;
        sum_sq += diff * diff;
      }
    }
  }
  return {mean, sum_sq / count};
}

// The mean and variance channel c is normalised with: the batch's or the running ones.
std::pair<double, double> NormalisingStatistics(const BatchNorm2dSpec& spec, const RefTensor& x,
                                                const RefTensor& running_mean,
                                                const RefTensor& running_var, int64_t c) {
  if (spec.training) return ChannelMeanAndVariance(x, c);
  return {running_mean.data[static_cast<size_t>(c)], running_var.data[static_cast<size_t>(c)]};
}
}  // namespace

BatchNorm2dOutput BatchNorm2dForward(const BatchNorm2dSpec& spec, const RefTensor& x,
                                     const RefTensor* weight, const RefTensor* bias,
                                     const RefTensor& running_mean, const RefTensor& running_var) {
  CheckBatchNorm(spec, x, weight, running_mean, running_var);
  Require((bias != nullptr) == spec.affine && (bias == nullptr || bias->shape == weight->shape),
          "batch_norm2d bias present iff spec.affine, shaped as the weight");
  const int64_t batch = x.shape[0], height = x.shape[2], width = x.shape[3];
  const double count = static_cast<double>(batch * height * width);
  BatchNorm2dOutput out;
  out.output = RefTensor::Zeros(x.shape);
  out.running_mean = running_mean;
  out.running_var = running_var;
  for (int64_t c = 0; c < spec.num_features; ++c) {
    const size_t ci = static_cast<size_t>(c);
    const auto [mean, variance] = NormalisingStatistics(spec, x, running_mean, running_var, c);
    if (spec.training) {
      const double unbiased = variance * count / (count - 1.0);
      out.running_mean.data[ci] =
          (1.0 - spec.momentum) * running_mean.data[ci] + spec.momentum * mean;
      out.running_var.data[ci] =
          (1.0 - spec.momentum) * running_var.data[ci] + spec.momentum * unbiased;
    }
    const double inv_std = 1.0 / std::sqrt(variance + spec.eps);
    const double scale = weight != nullptr ? weight->data[ci] : 1.0;
    const double shift = bias != nullptr ? bias->data[ci] : 0.0;
    for (int64_t n = 0; n < batch; ++n) {
      for (int64_t h = 0; h < height; ++h) {
        for (int64_t w = 0; w < width; ++w) {
          out.output.at(n, c, h, w) = (x.at(n, c, h, w) - mean) * inv_std * scale + shift;
        }
      }
    }
  }
  return out;
}

// With x_hat = (x - mean) * inv_std and y = x_hat * weight + bias, per channel:
//   dL/dbias = sum g,  dL/dweight = sum g * x_hat,  and dL/dx = g * weight * inv_std in
// inference mode. In training mode mean and inv_std depend on x too; differentiating through
// them (d mean/dx = 1/n, d var/dx = 2 (x - mean)/n) gives the usual
//   dL/dx = weight * inv_std * (g - sum(g)/n - x_hat * sum(g * x_hat)/n).
BatchNorm2dGrads BatchNorm2dBackward(const BatchNorm2dSpec& spec, const RefTensor& x,
                                     const RefTensor* weight, const RefTensor& running_mean,
                                     const RefTensor& running_var, const RefTensor& grad_output) {
  CheckBatchNorm(spec, x, weight, running_mean, running_var);
  Require(grad_output.shape == x.shape, "batch_norm2d grad_output has the input's shape");
  const int64_t batch = x.shape[0], height = x.shape[2], width = x.shape[3];
  const double count = static_cast<double>(batch * height * width);
  BatchNorm2dGrads grads;
  grads.input_grad = RefTensor::Zeros(x.shape);
  if (spec.affine) {
    grads.weight_grad = RefTensor::Zeros({spec.num_features});
    grads.bias_grad = RefTensor::Zeros({spec.num_features});
  }
  for (int64_t c = 0; c < spec.num_features; ++c) {
    const size_t ci = static_cast<size_t>(c);
    const auto [mean, variance] = NormalisingStatistics(spec, x, running_mean, running_var, c);
    const double inv_std = 1.0 / std::sqrt(variance + spec.eps);
    const double scale = weight != nullptr ? weight->data[ci] : 1.0;
    double sum_g = 0.0, sum_g_x_hat = 0.0;
    for (int64_t n = 0; n < batch; ++n) {
      for (int64_t h = 0; h < height; ++h) {
        for (int64_t w = 0; w < width; ++w) {
          const double g = grad_output.at(n, c, h, w);
          sum_g += g;
          sum_g_x_hat += g * (x.at(n, c, h, w) - mean) * inv_std;
        }
      }
    }
    if (spec.affine) {
      grads.weight_grad.data[ci] = sum_g_x_hat;
      grads.bias_grad.data[ci] = sum_g;
    }
    for (int64_t n = 0; n < batch; ++n) {
      for (int64_t h = 0; h < height; ++h) {
        for (int64_t w = 0; w < width; ++w) {
          const double g = grad_output.at(n, c, h, w);
          const double x_hat = (x.at(n, c, h, w) - mean) * inv_std;
          grads.input_grad.at(n, c, h, w) =
              spec.training ? scale * inv_std * (g - sum_g / count - x_hat * sum_g_x_hat / count)
                            : scale * inv_std * g;
        }
      }
    }
  }
  return grads;
}

// Row n of the flattened input is x.data[n * in_features .. (n + 1) * in_features).
namespace {
void CheckLinear(const LinearSpec& spec, const RefTensor& x, const RefTensor& weight) {
  Require(x.shape.size() >= 2 && x.num_elements() == x.shape[0] * spec.in_features,
          "linear input is [N, ...] with in_features elements per row");
  Require(weight.shape == std::vector<int64_t>({spec.out_features, spec.in_features}),
          "linear weight shape");
}
}  // namespace

RefTensor LinearForward(const LinearSpec& spec, const RefTensor& x, const RefTensor& weight,
                        const RefTensor* bias) {
  CheckLinear(spec, x, weight);
  Require((bias != nullptr) == spec.bias, "linear bias present iff spec.bias");
  Require(bias == nullptr || bias->shape == std::vector<int64_t>({spec.out_features}),
          "linear bias shape");
  const int64_t batch = x.shape[0];
  RefTensor y = RefTensor::Zeros({batch, spec.out_features});
  for (int64_t n = 0; n < batch; ++n) {
    for (int64_t o = 0; o < spec.out_features; ++o) {
      double sum = bias != nullptr ? bias->data[static_cast<size_t>(o)] : 0.0;
      for (int64_t i = 0; i < spec.in_features; ++i) {
        sum += x.data[static_cast<size_t>(n * spec.in_features + i)] * weight.at(o, i);
      }
      y.at(n, o) = sum;
    }
  }
  return y;
}

LinearGrads LinearBackward(const LinearSpec& spec, const RefTensor& x, const RefTensor& weight,
                           const RefTensor& grad_output) {
  CheckLinear(spec, x, weight);
  const int64_t batch = x.shape[0];
  Require(grad_output.shape == std::vector<int64_t>({batch, spec.out_features}),
          "linear grad_output is [N, out_features]");
  LinearGrads grads;
  grads.input_grad = RefTensor::Zeros(x.shape);
  grads.weight_grad = RefTensor::Zeros(weight.shape);
  if (spec.bias) grads.bias_grad = RefTensor::Zeros({spec.out_features});
  for (int64_t n = 0; n < batch; ++n) {
    for (int64_t o = 0; o < spec.out_features; ++o) {
      const double grad_y = grad_output.at(n, o);
      if (spec.bias) grads.bias_grad.data[static_cast<size_t>(o)] += grad_y;
      for (int64_t i = 0; i < spec.in_features; ++i) {
        const size_t xi = static_cast<size_t>(n * spec.in_features + i);
        grads.input_grad.data[xi] += grad_y * weight.at(o, i);
        grads.weight_grad.at(o, i) += grad_y * x.data[xi];
      }
    }
  }
  return grads;
}

RefTensor AddForward(const RefTensor& x, const RefTensor& other) {
  Require(x.shape == other.shape, "add operands have the same shape");
  RefTensor y = RefTensor::Zeros(x.shape);
  for (size_t i = 0; i < x.data.size(); ++i) y.data[i] = x.data[i] + other.data[i];
  return y;
}

namespace {

// Cross-entropy logits, [N, C] or [N, C, H, W], as `rows` = N*H*W rows of C classes; row
// n*H*W + s holds output[n, c, s] (s the flat spatial index), whose label is labels[row].
struct CrossEntropyLayout {
  int64_t rows = 0;
  int64_t classes = 0;
  int64_t spatial = 1;
};

CrossEntropyLayout CheckCrossEntropy(const RefObjective& objective, const RefTensor& output) {
  Require(output.shape.size() == 2 || output.shape.size() == 4,
          "cross_entropy logits are [N, C] or [N, C, H, W]");
  std::vector<int64_t> labels_shape = {output.shape[0]};
  if (output.shape.size() == 4) {
    labels_shape.push_back(output.shape[2]);
    labels_shape.push_back(output.shape[3]);
  }
  Require(objective.labels_shape == labels_shape, "cross_entropy labels are [N] or [N, H, W]");
  Require(static_cast<int64_t>(objective.labels.size()) == NumElements(labels_shape),
          "cross_entropy labels size matches their shape");
  CrossEntropyLayout layout;
  layout.classes = output.shape[1];
  layout.rows = NumElements(labels_shape);
  layout.spatial = layout.rows / output.shape[0];
  for (int64_t label : objective.labels) {
    Require(label == objective.ignore_index || (label >= 0 && label < layout.classes),
            "cross_entropy labels are in [0, C) or ignore_index");
  }
  return layout;
}

size_t LogitIndex(const CrossEntropyLayout& layout, int64_t row, int64_t c) {
  const int64_t n = row / layout.spatial, s = row % layout.spatial;
  return static_cast<size_t>((n * layout.classes + c) * layout.spatial + s);
}

// log softmax over the classes of one row, stably: z - max - log(sum exp(z - max)).
std::vector<double> LogSoftmaxRow(const RefTensor& output, const CrossEntropyLayout& layout,
                                  int64_t row) {
  double max_logit = -std::numeric_limits<double>::infinity();
  for (int64_t c = 0; c < layout.classes; ++c) {
    max_logit = std::max(max_logit, output.data[LogitIndex(layout, row, c)]);
  }
  double sum_exp = 0.0;
  for (int64_t c = 0; c < layout.classes; ++c) {
    sum_exp += std::exp(output.data[LogitIndex(layout, row, c)] - max_logit);
  }
  const double log_sum_exp = std::log(sum_exp);
  std::vector<double> log_p(static_cast<size_t>(layout.classes));
  for (int64_t c = 0; c < layout.classes; ++c) {
    log_p[static_cast<size_t>(c)] =
        output.data[LogitIndex(layout, row, c)] - max_logit - log_sum_exp;
  }
  return log_p;
}

}  // namespace

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
    case ObjectiveKind::kCrossEntropy: {
      const CrossEntropyLayout layout = CheckCrossEntropy(objective, output);
      const double eps = objective.label_smoothing;
      const double classes = static_cast<double>(layout.classes);
      double sum = 0.0;
      int64_t counted = 0;
      for (int64_t row = 0; row < layout.rows; ++row) {
        const int64_t label = objective.labels[static_cast<size_t>(row)];
        if (label == objective.ignore_index) continue;
        const std::vector<double> log_p = LogSoftmaxRow(output, layout, row);
        double sum_neg_log_p = 0.0;
        for (double v : log_p) sum_neg_log_p -= v;
        sum += (1.0 - eps) * -log_p[static_cast<size_t>(label)] + eps / classes * sum_neg_log_p;
        ++counted;
      }
      if (counted == 0) return std::numeric_limits<double>::quiet_NaN();  // 0 / 0 in PyTorch
      return sum / static_cast<double>(counted);
    }
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
    case ObjectiveKind::kCrossEntropy: {
      // Per counted row, d/dz_c of (1 - eps)(-log p_t) + eps/C sum_k (-log p_k) with
      // log p_k = z_k - logsumexp(z) is (1 - eps)(p_c - [c = t]) + eps/C (C p_c - 1)
      // = p_c - (1 - eps)[c = t] - eps/C; the mean divides by the counted rows.
      const CrossEntropyLayout layout = CheckCrossEntropy(objective, output);
      const double eps = objective.label_smoothing;
      const double classes = static_cast<double>(layout.classes);
      int64_t counted = 0;
      for (int64_t label : objective.labels) counted += label != objective.ignore_index;
      if (counted == 0) return grad;  // PyTorch's gradient is 0 when every label is ignored
      for (int64_t row = 0; row < layout.rows; ++row) {
        const int64_t label = objective.labels[static_cast<size_t>(row)];
        if (label == objective.ignore_index) continue;
        const std::vector<double> log_p = LogSoftmaxRow(output, layout, row);
        for (int64_t c = 0; c < layout.classes; ++c) {
          const double target = (1.0 - eps) * (c == label ? 1.0 : 0.0) + eps / classes;
          grad.data[LogitIndex(layout, row, c)] =
              (std::exp(log_p[static_cast<size_t>(c)]) - target) / static_cast<double>(counted);
        }
      }
      return grad;
    }
  }
  Require(false, "known objective kind");
  return grad;
}

// ---- Whole networks. ----

int RefLayerIndex(const NetworkSpec& network, const std::string& name, size_t before) {
  if (name == gradengine::kNetworkInput) return -1;
  for (size_t j = 0; j < before && j < network.layers.size(); ++j) {
    if (network.layers[j].name == name) return static_cast<int>(j);
  }
  Require(false, "a layer's input or an add's other names an earlier layer or the input");
  return -1;
}

int RefInputSource(const NetworkSpec& network, size_t i) {
  Require(i < network.layers.size(), "layer index in range");
  const LayerSpec& layer = network.layers[i];
  if (layer.input.empty()) return static_cast<int>(i) - 1;  // the previous layer, or the input
  return RefLayerIndex(network, layer.input, i);
}

namespace {

using gradengine::Overloaded;

// The parameter or buffer "<layer>.<suffix>" with the shape gradengine::LayerParameters gives
// it: the supplied tensor, or for an optional one that is absent its fill value.
RefTensor LayerTensor(const LayerSpec& layer, const RefParameters& parameters,
                      const std::string& suffix) {
  const std::string name = layer.name + "." + suffix;
  for (const gradengine::ParameterInfo& info : gradengine::LayerParameters(layer)) {
    if (info.name != name) continue;
    auto it = parameters.find(name);
    if (it != parameters.end()) {
      Require(it->second.shape == info.shape, "every parameter has its LayerParameters shape");
      return it->second;
    }
    Require(!info.required, "every required parameter of the network is supplied");
    RefTensor filled = RefTensor::Zeros(info.shape);
    for (double& v : filled.data) v = static_cast<double>(info.fill);
    return filled;
  }
  Require(false, "the reference reads only parameters gradengine::LayerParameters lists");
  return RefTensor();
}

// What layer i computes, and what flows back from it. `input` is the network's input and
// `outputs` the outputs of layers [0, i) (at least).
struct LayerSources {
  const NetworkSpec& network;
  size_t i;
  const RefTensor& input;
  const std::vector<RefTensor>& outputs;

  const RefTensor& Tensor(int source) const {
    return source < 0 ? input : outputs[static_cast<size_t>(source)];
  }
  int InputSource() const { return RefInputSource(network, i); }
  const RefTensor& Input() const { return Tensor(InputSource()); }
  int OtherSource(const AddSpec& add) const { return RefLayerIndex(network, add.other, i); }
};

// `running_stats` (may be null) receives a training-mode batch norm's updated statistics.
RefTensor LayerForward(const LayerSources& sources, const RefParameters& parameters,
                       std::map<std::string, RefTensor>* running_stats) {
  const LayerSpec& layer = sources.network.layers[sources.i];
  const RefTensor& x = sources.Input();
  return std::visit(
      Overloaded{
          [&](const Conv2dSpec& conv) {
            const RefTensor weight = LayerTensor(layer, parameters, "weight");
            const RefTensor bias = conv.bias ? LayerTensor(layer, parameters, "bias") : RefTensor();
            return Conv2dForward(conv, x, weight, conv.bias ? &bias : nullptr);
          },
          [&](const ActivationSpec& activation) { return ActivationForward(activation, x); },
          [&](const MaxPool2dSpec& pool) { return MaxPool2dForward(pool, x); },
          [&](const AvgPool2dSpec& pool) { return AvgPool2dForward(pool, x); },
          [&](const BatchNorm2dSpec& norm) {
            const RefTensor weight =
                norm.affine ? LayerTensor(layer, parameters, "weight") : RefTensor();
            const RefTensor bias =
                norm.affine ? LayerTensor(layer, parameters, "bias") : RefTensor();
            BatchNorm2dOutput out = BatchNorm2dForward(
                norm, x, norm.affine ? &weight : nullptr, norm.affine ? &bias : nullptr,
                LayerTensor(layer, parameters, "running_mean"),
                LayerTensor(layer, parameters, "running_var"));
            if (norm.training && running_stats != nullptr) {
              (*running_stats)[layer.name + ".running_mean"] = std::move(out.running_mean);
              (*running_stats)[layer.name + ".running_var"] = std::move(out.running_var);
            }
            return std::move(out.output);
          },
          [&](const LinearSpec& linear) {
            const RefTensor weight = LayerTensor(layer, parameters, "weight");
            const RefTensor bias =
                linear.bias ? LayerTensor(layer, parameters, "bias") : RefTensor();
            return LinearForward(linear, x, weight, linear.bias ? &bias : nullptr);
          },
          [&](const AddSpec& add) {
            return AddForward(x, sources.Tensor(sources.OtherSource(add)));
          },
      },
      layer.op);
}

struct LayerGrads {
  // dL/d(each tensor the layer reads), by source (-1: the network's input).
  std::vector<std::pair<int, RefTensor>> source_grads;
  // dL/d(each trainable parameter), by full name.
  std::map<std::string, RefTensor> parameter_grads;
};

LayerGrads LayerBackward(const LayerSources& sources, const RefParameters& parameters,
                         const RefTensor& grad_output) {
  const LayerSpec& layer = sources.network.layers[sources.i];
  const RefTensor& x = sources.Input();
  const int input_source = sources.InputSource();
  LayerGrads grads;
  const auto put = [&](const std::string& suffix, RefTensor grad) {
    grads.parameter_grads[layer.name + "." + suffix] = std::move(grad);
  };
  std::visit(
      Overloaded{
          [&](const Conv2dSpec& conv) {
            Conv2dGrads conv_grads =
                Conv2dBackward(conv, x, LayerTensor(layer, parameters, "weight"), grad_output);
            grads.source_grads.emplace_back(input_source, std::move(conv_grads.input_grad));
            put("weight", std::move(conv_grads.weight_grad));
            if (conv.bias) put("bias", std::move(conv_grads.bias_grad));
          },
          [&](const ActivationSpec& activation) {
            grads.source_grads.emplace_back(input_source,
                                            ActivationBackward(activation, x, grad_output));
          },
          [&](const MaxPool2dSpec& pool) {
            grads.source_grads.emplace_back(input_source, MaxPool2dBackward(pool, x, grad_output));
          },
          [&](const AvgPool2dSpec& pool) {
            grads.source_grads.emplace_back(input_source, AvgPool2dBackward(pool, x, grad_output));
          },
          [&](const BatchNorm2dSpec& norm) {
            const RefTensor weight =
                norm.affine ? LayerTensor(layer, parameters, "weight") : RefTensor();
            BatchNorm2dGrads norm_grads =
                BatchNorm2dBackward(norm, x, norm.affine ? &weight : nullptr,
                                    LayerTensor(layer, parameters, "running_mean"),
                                    LayerTensor(layer, parameters, "running_var"), grad_output);
            grads.source_grads.emplace_back(input_source, std::move(norm_grads.input_grad));
            if (norm.affine) {
              put("weight", std::move(norm_grads.weight_grad));
              put("bias", std::move(norm_grads.bias_grad));
            }
          },
          [&](const LinearSpec& linear) {
            LinearGrads linear_grads =
                LinearBackward(linear, x, LayerTensor(layer, parameters, "weight"), grad_output);
            grads.source_grads.emplace_back(input_source, std::move(linear_grads.input_grad));
            put("weight", std::move(linear_grads.weight_grad));
            if (linear.bias) put("bias", std::move(linear_grads.bias_grad));
          },
          [&](const AddSpec& add) {
            grads.source_grads.emplace_back(input_source, grad_output);
            grads.source_grads.emplace_back(sources.OtherSource(add), grad_output);
          },
      },
      layer.op);
  return grads;
}

std::vector<RefTensor> ForwardPass(const NetworkSpec& network, const RefParameters& parameters,
                                   const RefTensor& input,
                                   std::map<std::string, RefTensor>* running_stats) {
  std::vector<RefTensor> outputs;
  outputs.reserve(network.layers.size());
  for (size_t i = 0; i < network.layers.size(); ++i) {
    RefTensor y = LayerForward(LayerSources{network, i, input, outputs}, parameters, running_stats);
    outputs.push_back(std::move(y));
  }
  return outputs;
}

void Accumulate(const RefTensor& grad, RefTensor* total) {
  Require(grad.shape == total->shape, "a gradient has its tensor's shape");
  for (size_t i = 0; i < grad.data.size(); ++i) total->data[i] += grad.data[i];
}

}  // namespace

std::vector<RefTensor> ReferenceLayerOutputs(const NetworkSpec& network,
                                             const RefParameters& parameters,
                                             const RefTensor& input) {
  return ForwardPass(network, parameters, input, nullptr);
}

RefTensor ReferenceForward(const NetworkSpec& network, const RefParameters& parameters,
                           const RefTensor& input) {
  std::vector<RefTensor> outputs = ReferenceLayerOutputs(network, parameters, input);
  if (outputs.empty()) return input;
  return std::move(outputs.back());
}

RefTensor ReferenceForward(const NetworkSpec& network, const gradengine::ParameterViews& parameters,
                           const gradengine::TensorView& input) {
  return ReferenceForward(network, RefParametersFromViews(parameters), RefTensor::FromView(input));
}

ReferenceResult RunReference(const NetworkSpec& network, const RefParameters& parameters,
                             const RefTensor& input, const RefObjective& objective) {
  ReferenceResult result;
  const std::vector<RefTensor> outputs =
      ForwardPass(network, parameters, input, &result.running_stats);
  result.output = outputs.empty() ? input : outputs.back();
  result.loss = ObjectiveLoss(objective, result.output);

  // output_grads[i] is dL/d(output of layer i), complete once every later layer (all its
  // readers) has passed its share back; the last layer's is the objective's gradient.
  std::vector<RefTensor> output_grads;
  for (const RefTensor& output : outputs) output_grads.push_back(RefTensor::Zeros(output.shape));
  result.input_grad = RefTensor::Zeros(input.shape);
  if (outputs.empty()) {
    result.input_grad = ObjectiveGrad(objective, result.output);
  } else {
    output_grads.back() = ObjectiveGrad(objective, result.output);
  }
  for (size_t i = network.layers.size(); i-- > 0;) {
    LayerGrads grads =
        LayerBackward(LayerSources{network, i, input, outputs}, parameters, output_grads[i]);
    output_grads[i] = RefTensor();  // no longer needed
    for (const auto& [source, grad] : grads.source_grads) {
      Accumulate(grad,
                 source < 0 ? &result.input_grad : &output_grads[static_cast<size_t>(source)]);
    }
    // Exactly the trainable parameters LayerParameters lists have a gradient.
    size_t trainable = 0;
    for (const gradengine::ParameterInfo& info : gradengine::LayerParameters(network.layers[i])) {
      if (!info.trainable) continue;
      ++trainable;
      auto it = grads.parameter_grads.find(info.name);
      Require(it != grads.parameter_grads.end() && it->second.shape == info.shape,
              "every trainable parameter gets a gradient of its shape");
      result.parameter_grads[info.name] = std::move(it->second);
    }
    Require(trainable == grads.parameter_grads.size(), "only trainable parameters get a gradient");
  }
  return result;
}

ReferenceResult RunReference(const gradengine::GradientRequest& request) {
  RefObjective objective;
  objective.kind = request.objective.kind;
  switch (objective.kind) {
    case ObjectiveKind::kMse:
    case ObjectiveKind::kGradOutput:
      objective.tensor = RefTensor::FromView(request.objective.tensor);
      break;
    case ObjectiveKind::kSum:
      break;
    case ObjectiveKind::kCrossEntropy: {
      const gradengine::LabelsView& labels = request.objective.labels;
      Require(NumElements(labels.shape) == labels.size, "labels size matches their shape");
      objective.labels.assign(labels.data, labels.data + labels.size);
      objective.labels_shape = labels.shape;
      objective.label_smoothing = request.objective.label_smoothing;
      objective.ignore_index = request.objective.ignore_index;
      break;
    }
  }
  return RunReference(request.network, RefParametersFromViews(request.parameters),
                      RefTensor::FromView(request.input), objective);
}

}  // namespace gradtest
