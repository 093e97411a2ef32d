// A Plan is one compiled computation: the oneDNN primitives for a given network, input shape
// and set of requested gradients, in the order they run, plus the buffers they read and write
// ("slots"). Private to the engine.
//
// Compiling (Plan::Create) is the expensive part: it picks memory formats and JIT-compiles
// kernels. Execute() only binds the caller's tensors and runs the primitives, so a Plan is made
// once and reused by every call of the same shape.
//
// Layout policy: the caller's tensors are plain NCHW/OIHW; between layers activations and their
// gradients stay in whichever blocked layout oneDNN chose (format_tag::any), and reorders are
// inserted only where a primitive wants a different layout than its producer gave, in practice
// at the network's edges.
//
// Thread safety: a Plan is immutable after Create and Execute may be called from many threads at
// once. Each call takes a private Workspace (activations, gradients, scratchpad) from a pool, so
// concurrent calls never share mutable memory.

#ifndef ENGINE_PLAN_H_
#define ENGINE_PLAN_H_

#include <chrono>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "gradengine/engine.h"
#include "gradengine/network.h"
#include "gradengine/tensor.h"
#include "oneapi/dnnl/dnnl.hpp"

namespace gradengine {

// The work a plan is compiled for.
struct PlanNeeds {
  // false: inference-mode forward only.
  bool training = false;
  bool input_grad = false;
  // Names of parameters whose gradient is wanted.
  std::set<std::string> parameter_grads;
};

// A deterministic string identifying (network, input shape, needs); equal keys mean the same
// plan.
std::string PlanKey(const NetworkSpec& network, const std::vector<int64_t>& input_shape,
                    const PlanNeeds& needs);

// The caller's tensors for one Execute. Inputs are only read; outputs are preallocated with the
// right shape by the caller and overwritten.
struct PlanBindings {
  TensorView input;
  const ParameterViews* parameters = nullptr;
  Tensor* output = nullptr;
  // Training only.
  const Objective* objective = nullptr;
  std::optional<double>* loss = nullptr;
  Tensor* input_grad = nullptr;                 // null unless PlanNeeds::input_grad
  ParameterTensors* parameter_grads = nullptr;  // one entry per PlanNeeds::parameter_grads
  // Optional: set to when the forward pass (and the objective) finished.
  std::chrono::steady_clock::time_point* forward_done = nullptr;
};

class Plan {
 public:
  // REQUIRES: `validated` is ValidateNetwork's result for (network, input_shape);
  // options.threads_per_call >= 1 (as Engine::Create resolves it).
  static absl::StatusOr<std::unique_ptr<Plan>> Create(const dnnl::engine& cpu,
                                                      const NetworkSpec& network,
                                                      const ValidatedNetwork& validated,
                                                      const std::vector<int64_t>& input_shape,
                                                      const PlanNeeds& needs,
                                                      const EngineOptions& options);

  ~Plan();

  // Runs the plan. `should_continue` (may be empty) is consulted before every layer.
  absl::Status Execute(const PlanBindings& bindings, const ContinueCheck& should_continue);

  // What binds a slot to the caller's tensors; kNone slots are owned by the workspace.
  enum class Role { kNone, kInput, kOutput, kDiffOutput, kInputGrad, kParameter, kParameterGrad };

  struct Slot {
    dnnl::memory::desc desc;
    Role role = Role::kNone;
    std::string parameter;  // for kParameter / kParameterGrad
  };

  struct Op {
    dnnl::primitive primitive;
    std::vector<std::pair<int, int>> args;  // (DNNL_ARG_*, slot index)
    // Whether the caller's ContinueCheck runs before this op: true for each layer's first.
    bool starts_layer = false;
  };

 private:
  struct Workspace;
  class Builder;
  friend class Builder;

  Plan() = default;

  std::unique_ptr<Workspace> AcquireWorkspace();
  void ReleaseWorkspace(std::unique_ptr<Workspace> workspace);
  // Points the workspace's caller-bound slots at this call's tensors.
  void Bind(const PlanBindings& bindings, Workspace& workspace);
  absl::Status RunOps(const std::vector<Op>& ops, Workspace& workspace,
                      const ContinueCheck& should_continue);
  // Evaluates the objective on the output and writes dL/dy into the kDiffOutput slot.
  void ApplyObjective(const PlanBindings& bindings, Workspace& workspace);

  dnnl::engine cpu_;
  // OpenMP threads the plan runs with: EngineOptions::threads_per_call, or fewer when the work
  // is so small that waking more threads costs more than it saves.
  int threads_ = 1;
  std::vector<Slot> slots_;
  int scratchpad_slot_ = -1;
  int diff_output_slot_ = -1;
  std::vector<Op> forward_ops_;
  std::vector<Op> backward_ops_;

  absl::Mutex pool_mu_;
  std::vector<std::unique_ptr<Workspace>> pool_ ABSL_GUARDED_BY(pool_mu_);
};

}  // namespace gradengine

#endif  // ENGINE_PLAN_H_
