// First-order optimizers with torch.optim's update rules, defaults and checks (PyTorch 1.13,
// the single-tensor code path torch takes on CPU): SGD, Adam and AdamW.
//
// The updates compute in float32 with the same operations in the same order as torch's CPU
// kernels (fused multiply-adds where torch's vectorized kernels use them; scalar factors such as
// the bias corrections computed in double, as Python floats, and rounded to float where torch
// hands them to a kernel), so that a parameter updated here agrees with torch.optim's to about
// 1e-7 relative per step.
//
//   AdamOptions adam;
//   adam.lr = 3e-4;
//   absl::StatusOr<std::unique_ptr<Optimizer>> optimizer = Optimizer::Create(adam);
//   absl::Status status = (*optimizer)->Step(reply->result.parameter_grads, &parameters);
//
// The optimizer's state (momentum buffers, Adam's moments, step counts) is kept per parameter
// name and can be exported and imported as named tensors, for checkpoints.
//
// Thread-compatible: an Optimizer is not synchronized; use one from one thread at a time.

#ifndef GRADCLIENT_OPTIMIZER_H_
#define GRADCLIENT_OPTIMIZER_H_

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gradengine/network.h"
#include "gradengine/tensor.h"

namespace gradclient {

// torch.optim.SGD(params, lr, momentum, dampening, weight_decay, nesterov).
struct SgdOptions {
  // Learning rate, >= 0. Required: torch.optim.SGD has no default for it. Default: unset.
  std::optional<double> lr;
  // Momentum factor, >= 0. Default: 0 (plain SGD).
  double momentum = 0.0;
  // Dampening of the momentum's new gradient term. Default: 0.
  double dampening = 0.0;
  // L2 penalty added to the gradient, >= 0. Default: 0.
  double weight_decay = 0.0;
  // Nesterov momentum; requires momentum > 0 and dampening == 0. Default: false.
  bool nesterov = false;
};

// torch.optim.Adam(params, lr, betas, eps, weight_decay, amsgrad).
struct AdamOptions {
  // Learning rate, >= 0. Default: 1e-3.
  double lr = 1e-3;
  // Decay rates of the first and second moment estimates, each in [0, 1). Default: 0.9, 0.999.
  double beta1 = 0.9;
  double beta2 = 0.999;
  // Added to the denominator for numerical stability, >= 0. Default: 1e-8.
  double eps = 1e-8;
  // L2 penalty added to the gradient, >= 0. Default: 0.
  double weight_decay = 0.0;
  // Normalise with the maximum of all second moment estimates so far (AMSGrad). Default: false.
  bool amsgrad = false;
};

// torch.optim.AdamW(params, lr, betas, eps, weight_decay, amsgrad): Adam with decoupled weight
// decay (the parameter is scaled by 1 - lr * weight_decay before the update).
struct AdamWOptions {
  // Learning rate, >= 0. Default: 1e-3.
  double lr = 1e-3;
  // Each in [0, 1). Default: 0.9, 0.999.
  double beta1 = 0.9;
  double beta2 = 0.999;
  // >= 0. Default: 1e-8.
  double eps = 1e-8;
  // Decoupled weight decay, >= 0. Default: 1e-2 (unlike Adam's 0).
  double weight_decay = 1e-2;
  // Default: false.
  bool amsgrad = false;
};

// Every optimizer kind; code that handles one dispatches with std::visit over all of them.
using OptimizerOptions = std::variant<SgdOptions, AdamOptions, AdamWOptions>;

// "sgd", "adam", "adamw".
const char* OptimizerName(const OptimizerOptions& options);

// torch's constructor checks, as InvalidArgument naming the option and its value
// ("adam.beta1=1 is not in [0, 1)"), plus SGD's lr being set. NaN fails every range check.
absl::Status ValidateOptimizerOptions(const OptimizerOptions& options);

// The names ExportState gives the state of parameter "<p>": "<p>.momentum_buffer" (SGD with
// momentum, after the first step), "<p>.step" (Adam and AdamW: a scalar float32, the steps
// taken, as torch's state['step']), "<p>.exp_avg", "<p>.exp_avg_sq", "<p>.max_exp_avg_sq"
// (amsgrad only). These are torch's state_dict keys.
inline constexpr char kMomentumBufferSuffix[] = ".momentum_buffer";
inline constexpr char kStepSuffix[] = ".step";
inline constexpr char kExpAvgSuffix[] = ".exp_avg";
inline constexpr char kExpAvgSqSuffix[] = ".exp_avg_sq";
inline constexpr char kMaxExpAvgSqSuffix[] = ".max_exp_avg_sq";

class Optimizer {
 public:
  // Errors: those of ValidateOptimizerOptions.
  static absl::StatusOr<std::unique_ptr<Optimizer>> Create(const OptimizerOptions& options);

  Optimizer(const Optimizer&) = delete;
  Optimizer& operator=(const Optimizer&) = delete;
  ~Optimizer();

  // One optimizer step (torch's optimizer.step()): updates, in place, every parameter in
  // `parameters` that has a gradient in `gradients`; parameters without one are left alone, as
  // torch skips a parameter whose .grad is None. Each parameter's state is created on its first
  // step. Errors, with nothing updated: InvalidArgument for a gradient without a parameter of
  // its name, or of another shape than its parameter, naming both shapes; FailedPrecondition for
  // imported state whose shape differs from its parameter's.
  absl::Status Step(const gradengine::ParameterTensors& gradients,
                    gradengine::ParameterTensors* parameters);

  // The state as named tensors (see the suffixes above), copies of the optimizer's.
  gradengine::ParameterTensors ExportState() const;

  // Replaces the whole state with `state`, as ExportState returned it, so that the next Step
  // continues exactly where the exporting optimizer left off. Errors, with the state unchanged:
  // InvalidArgument for a name this kind of optimizer does not keep, a step that is not a
  // scalar holding a non-negative whole number, a moment without its step (or a step without
  // its moments), or tensors of one parameter with different shapes; each names the tensor.
  absl::Status ImportState(const gradengine::ParameterTensors& state);

  const OptimizerOptions& options() const { return options_; }

 private:
  // One parameter's state; which fields are used depends on the kind.
  struct ParameterState {
    std::optional<gradengine::Tensor> momentum_buffer;  // SGD with momentum
    float step = 0.0f;  // Adam, AdamW: torch keeps it as a float32 tensor
    gradengine::Tensor exp_avg;
    gradengine::Tensor exp_avg_sq;
    gradengine::Tensor max_exp_avg_sq;  // amsgrad
  };

  explicit Optimizer(const OptimizerOptions& options) : options_(options) {}

  // The tensors of `state` this kind of optimizer uses.
  std::vector<const gradengine::Tensor*> StateTensors(const ParameterState& state) const;

  OptimizerOptions options_;
  std::map<std::string, ParameterState> state_;
};

}  // namespace gradclient

#endif  // GRADCLIENT_OPTIMIZER_H_
