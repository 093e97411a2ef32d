#include "gradclient/optimizer.h"

#include <cmath>
#include <cstddef>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "gradengine/network.h"
#include "gradengine/overloaded.h"
#include "gradengine/tensor.h"

namespace gradclient {
namespace {

using gradengine::ParameterTensors;
using gradengine::Tensor;

using gradengine::Overloaded;

// torch's CPU kernels, element by element, as they round in float32. A Python float handed to a
// kernel as a Scalar becomes a float (Scalar::to<float>) before it meets a tensor element.
//   t.add(b, alpha=a):            the vectorized kernel is vec::fmadd(b, alpha, t), one rounding.
//   t.addcmul_(b, c, value=v):    fma(v * b, c, t), as the AVX2/AVX-512 builds compute it.
//   t.addcdiv_(b, c, value=v):    t + (v * b) / c, three roundings.
//   t / s, t * s, t + s:          one rounding each.
inline float Add(float t, float b, float alpha) { return std::fma(alpha, b, t); }
inline float AddCMul(float t, float b, float c, float value) { return std::fma(value * b, c, t); }
inline float AddCDiv(float t, float b, float c, float value) { return t + (value * b) / c; }
// torch.maximum: NaN if either is NaN.
inline float Maximum(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::numeric_limits<float>::quiet_NaN();
  return a > b ? a : b;
}

// Whether `value` is in [low, high) (NaN is not). `high` infinite means no upper bound.
absl::Status CheckRange(absl::string_view name, double value, double low, double high,
                        bool nonnegative_only) {
  if (value >= low && value < high) return absl::OkStatus();
  if (nonnegative_only) {
    return absl::InvalidArgumentError(absl::StrCat(name, "=", value, " must be >= 0"));
  }
  return absl::InvalidArgumentError(
      absl::StrCat(name, "=", value, " is not in [", low, ", ", high, ")"));
}

absl::Status CheckNonNegative(absl::string_view name, double value) {
  return CheckRange(name, value, 0.0, std::numeric_limits<double>::infinity(), true);
}

// The checks Adam.__init__ and AdamW.__init__ make, in their order.
template <typename AdamLike>
absl::Status ValidateAdamLike(absl::string_view kind, const AdamLike& options) {
  if (absl::Status s = CheckNonNegative(absl::StrCat(kind, ".lr"), options.lr); !s.ok()) return s;
  if (absl::Status s = CheckNonNegative(absl::StrCat(kind, ".eps"), options.eps); !s.ok()) {
    return s;
  }
  if (absl::Status s = CheckRange(absl::StrCat(kind, ".beta1"), options.beta1, 0.0, 1.0, false);
      !s.ok()) {
    return s;
  }
  if (absl::Status s = CheckRange(absl::StrCat(kind, ".beta2"), options.beta2, 0.0, 1.0, false);
      !s.ok()) {
    return s;
  }
  return CheckNonNegative(absl::StrCat(kind, ".weight_decay"), options.weight_decay);
}

// The state kinds each optimizer keeps, by suffix.
std::vector<absl::string_view> StateSuffixes(const OptimizerOptions& options) {
  return std::visit(
      Overloaded{
          [](const SgdOptions&) { return std::vector<absl::string_view>{kMomentumBufferSuffix}; },
          [](const auto& adam) {
            std::vector<absl::string_view> suffixes = {kStepSuffix, kExpAvgSuffix, kExpAvgSqSuffix};
            if (adam.amsgrad) suffixes.push_back(kMaxExpAvgSqSuffix);
            return suffixes;
          },
      },
      options);
}

bool SameShape(const Tensor& a, const Tensor& b) { return a.shape == b.shape; }

}  // namespace

const char* OptimizerName(const OptimizerOptions& options) {
  return std::visit(Overloaded{
                        [](const SgdOptions&) { return "sgd"; },
                        [](const AdamOptions&) { return "adam"; },
                        [](const AdamWOptions&) { return "adamw"; },
                    },
                    options);
}

absl::Status ValidateOptimizerOptions(const OptimizerOptions& options) {
  return std::visit(
      Overloaded{
          // SGD.__init__'s checks, in its order.
          [](const SgdOptions& sgd) -> absl::Status {
            if (!sgd.lr.has_value()) {
              return absl::InvalidArgumentError(
                  "sgd.lr is required (torch.optim.SGD has no default learning rate)");
            }
            if (absl::Status s = CheckNonNegative("sgd.lr", *sgd.lr); !s.ok()) return s;
            if (absl::Status s = CheckNonNegative("sgd.momentum", sgd.momentum); !s.ok()) return s;
            if (absl::Status s = CheckNonNegative("sgd.weight_decay", sgd.weight_decay); !s.ok()) {
              return s;
            }
            if (sgd.nesterov && (!(sgd.momentum > 0) || sgd.dampening != 0)) {
              return absl::InvalidArgumentError(absl::StrCat(
                  "sgd.nesterov=true requires momentum > 0 and dampening == 0; momentum=",
                  sgd.momentum, ", dampening=", sgd.dampening));
            }
            return absl::OkStatus();
          },
          [](const AdamOptions& adam) { return ValidateAdamLike("adam", adam); },
          [](const AdamWOptions& adamw) { return ValidateAdamLike("adamw", adamw); },
      },
      options);
}

absl::StatusOr<std::unique_ptr<Optimizer>> Optimizer::Create(const OptimizerOptions& options) {
  if (absl::Status s = ValidateOptimizerOptions(options); !s.ok()) return s;
  return std::unique_ptr<Optimizer>(new Optimizer(options));
}

Optimizer::~Optimizer() = default;

absl::Status Optimizer::Step(const ParameterTensors& gradients, ParameterTensors* parameters) {
  // Check everything before updating anything, so that a failed step changes nothing.
  for (const auto& [name, gradient] : gradients) {
    auto parameter = parameters->find(name);
    if (parameter == parameters->end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("gradient \"", name, "\" has no parameter of that name"));
    }
    if (!SameShape(gradient, parameter->second) ||
        gradient.data.size() != parameter->second.data.size()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "gradient \"", name, "\" has shape ", gradengine::ShapeToString(gradient.shape),
          " but the parameter has shape ", gradengine::ShapeToString(parameter->second.shape)));
    }
    auto state = state_.find(name);
    if (state == state_.end()) continue;
    for (const Tensor* tensor : StateTensors(state->second)) {
      if (!SameShape(*tensor, gradient) || tensor->data.size() != gradient.data.size()) {
        return absl::FailedPreconditionError(
            absl::StrCat("the optimizer state of \"", name, "\" has shape ",
                         gradengine::ShapeToString(tensor->shape), " but the parameter has shape ",
                         gradengine::ShapeToString(parameter->second.shape)));
      }
    }
  }

  for (const auto& [name, gradient] : gradients) {
    Tensor& parameter = parameters->at(name);
    // An entry exists from a parameter's first step on (or from ImportState).
    const auto emplaced = state_.try_emplace(name);
    const bool first_step = emplaced.second;
    ParameterState& state = emplaced.first->second;
    float* param = parameter.data.data();
    const float* grad = gradient.data.data();
    const size_t size = parameter.data.size();
    std::visit(
        Overloaded{
            // _single_tensor_sgd.
            [&](const SgdOptions& sgd) {
              const float weight_decay = static_cast<float>(sgd.weight_decay);
              const float momentum = static_cast<float>(sgd.momentum);
              const float one_minus_dampening = static_cast<float>(1.0 - sgd.dampening);
              const float minus_lr = static_cast<float>(-*sgd.lr);
              // torch's momentum_buffer is None until the first step with momentum.
              const bool new_buffer = sgd.momentum != 0 && !state.momentum_buffer.has_value();
              if (new_buffer) state.momentum_buffer = Tensor::Uninitialized(parameter.shape);
              float* buf = sgd.momentum != 0 ? state.momentum_buffer->data.data() : nullptr;
              for (size_t i = 0; i < size; ++i) {
                float d_p = grad[i];
                if (sgd.weight_decay != 0) d_p = Add(d_p, param[i], weight_decay);
                if (sgd.momentum != 0) {
                  if (new_buffer) {
                    buf[i] = d_p;  // torch.clone(d_p)
                  } else {
                    buf[i] = Add(buf[i] * momentum, d_p, one_minus_dampening);
                  }
                  d_p = sgd.nesterov ? Add(d_p, buf[i], momentum) : buf[i];
                }
                param[i] = Add(param[i], d_p, minus_lr);
              }
            },
            // _single_tensor_adam and _single_tensor_adamw: the same moments, with the weight
            // decay added to the gradient (Adam) or applied to the parameter (AdamW).
            [&](const auto& adam) {
              constexpr bool kDecoupled =
                  std::is_same_v<std::decay_t<decltype(adam)>, AdamWOptions>;
              if (first_step) {
                state.step = 0.0f;
                state.exp_avg = Tensor::Zeros(parameter.shape);
                state.exp_avg_sq = Tensor::Zeros(parameter.shape);
                if (adam.amsgrad) state.max_exp_avg_sq = Tensor::Zeros(parameter.shape);
              }
              state.step += 1.0f;
              // Python floats: step_t.item(), then the bias corrections in double.
              const double step = static_cast<double>(state.step);
              const double bias_correction1 = 1 - std::pow(adam.beta1, step);
              const double bias_correction2 = 1 - std::pow(adam.beta2, step);
              const double step_size = adam.lr / bias_correction1;
              const double bias_correction2_sqrt = std::sqrt(bias_correction2);

              const float decay_scale = static_cast<float>(1 - adam.lr * adam.weight_decay);
              const float weight_decay = static_cast<float>(adam.weight_decay);
              const float beta1 = static_cast<float>(adam.beta1);
              const float one_minus_beta1 = static_cast<float>(1 - adam.beta1);
              const float beta2 = static_cast<float>(adam.beta2);
              const float one_minus_beta2 = static_cast<float>(1 - adam.beta2);
              const float denom_divisor = static_cast<float>(bias_correction2_sqrt);
              const float eps = static_cast<float>(adam.eps);
              const float minus_step_size = static_cast<float>(-step_size);
              float* exp_avg = state.exp_avg.data.data();
              float* exp_avg_sq = state.exp_avg_sq.data.data();
              float* max_exp_avg_sq = adam.amsgrad ? state.max_exp_avg_sq.data.data() : nullptr;
              for (size_t i = 0; i < size; ++i) {
                float g = grad[i];
                if constexpr (kDecoupled) {
                  param[i] = param[i] * decay_scale;
                } else {
                  if (adam.weight_decay != 0) g = Add(g, param[i], weight_decay);
                }
                exp_avg[i] = Add(exp_avg[i] * beta1, g, one_minus_beta1);
                exp_avg_sq[i] = AddCMul(exp_avg_sq[i] * beta2, g, g, one_minus_beta2);
                float second_moment = exp_avg_sq[i];
                if (adam.amsgrad) {
                  max_exp_avg_sq[i] = Maximum(max_exp_avg_sq[i], exp_avg_sq[i]);
                  second_moment = max_exp_avg_sq[i];
                }
                const float denom = std::sqrt(second_moment) / denom_divisor + eps;
                param[i] = AddCDiv(param[i], exp_avg[i], denom, minus_step_size);
              }
            },
        },
        options_);
  }
  return absl::OkStatus();
}

std::vector<const Tensor*> Optimizer::StateTensors(const ParameterState& state) const {
  return std::visit(Overloaded{
                        [&](const SgdOptions&) {
                          std::vector<const Tensor*> tensors;
                          if (state.momentum_buffer.has_value()) {
                            tensors.push_back(&*state.momentum_buffer);
                          }
                          return tensors;
                        },
                        [&](const auto& adam) {
                          std::vector<const Tensor*> tensors = {&state.exp_avg, &state.exp_avg_sq};
                          if (adam.amsgrad) tensors.push_back(&state.max_exp_avg_sq);
                          return tensors;
                        },
                    },
                    options_);
}

ParameterTensors Optimizer::ExportState() const {
  ParameterTensors exported;
  for (const auto& [name, state] : state_) {
    std::visit(Overloaded{
                   [&](const SgdOptions&) {
                     if (state.momentum_buffer.has_value()) {
                       exported[name + kMomentumBufferSuffix] = *state.momentum_buffer;
                     }
                   },
                   [&](const auto& adam) {
                     exported[name + kStepSuffix] = Tensor({}, std::vector<float>{state.step});
                     exported[name + kExpAvgSuffix] = state.exp_avg;
                     exported[name + kExpAvgSqSuffix] = state.exp_avg_sq;
                     if (adam.amsgrad) exported[name + kMaxExpAvgSqSuffix] = state.max_exp_avg_sq;
                   },
               },
               options_);
  }
  return exported;
}

absl::Status Optimizer::ImportState(const ParameterTensors& state) {
  const std::vector<absl::string_view> suffixes = StateSuffixes(options_);
  // Parameter name -> suffix -> tensor.
  std::map<std::string, std::map<absl::string_view, const Tensor*>> by_parameter;
  for (const auto& [name, tensor] : state) {
    bool known = false;
    for (absl::string_view suffix : suffixes) {
      if (name.size() > suffix.size() && absl::EndsWith(name, suffix)) {
        by_parameter[name.substr(0, name.size() - suffix.size())][suffix] = &tensor;
        known = true;
        break;
      }
    }
    if (!known) {
      return absl::InvalidArgumentError(absl::StrCat("optimizer state \"", name, "\" is not state ",
                                                     OptimizerName(options_), " keeps"));
    }
  }
  std::map<std::string, ParameterState> imported;
  for (const auto& [parameter, tensors] : by_parameter) {
    ParameterState& s = imported[parameter];
    for (absl::string_view suffix : suffixes) {
      if (tensors.count(suffix) == 0) {
        return absl::InvalidArgumentError(absl::StrCat("optimizer state \"", parameter, suffix,
                                                       "\" is missing; the state of \"", parameter,
                                                       "\" has the others"));
      }
    }
    const absl::Status filled = std::visit(
        Overloaded{
            [&](const SgdOptions&) {
              s.momentum_buffer = *tensors.at(kMomentumBufferSuffix);
              return absl::OkStatus();
            },
            [&](const auto& adam) {
              const Tensor& step = *tensors.at(kStepSuffix);
              const float steps = step.data.size() == 1 ? step.data[0] : -1.0f;
              if (!(steps >= 0) || std::floor(steps) != steps || !step.shape.empty()) {
                return absl::InvalidArgumentError(
                    absl::StrCat("optimizer state \"", parameter, kStepSuffix, "\" = ", steps,
                                 " with shape ", gradengine::ShapeToString(step.shape),
                                 " is not a scalar whole number of steps >= 0"));
              }
              s.step = steps;
              s.exp_avg = *tensors.at(kExpAvgSuffix);
              s.exp_avg_sq = *tensors.at(kExpAvgSqSuffix);
              if (adam.amsgrad) s.max_exp_avg_sq = *tensors.at(kMaxExpAvgSqSuffix);
              // Step checks each against its parameter; here they must agree among themselves.
              for (const Tensor* other : {&s.exp_avg_sq, &s.max_exp_avg_sq}) {
                if (other == &s.max_exp_avg_sq && !adam.amsgrad) continue;
                if (!SameShape(*other, s.exp_avg) || other->data.size() != s.exp_avg.data.size()) {
                  return absl::InvalidArgumentError(absl::StrCat(
                      "optimizer state of \"", parameter, "\": the moments have shapes ",
                      gradengine::ShapeToString(s.exp_avg.shape), " and ",
                      gradengine::ShapeToString(other->shape), "; they must be the parameter's"));
                }
              }
              return absl::OkStatus();
            },
        },
        options_);
    if (!filled.ok()) return filled;
  }
  state_ = std::move(imported);
  return absl::OkStatus();
}

}  // namespace gradclient
