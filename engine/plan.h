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
//
// Memory: a plan's calls hold workspace memory reserved from the engine's MemoryBudget
// (LeaseWorkspace), and a workspace a call gives back stays in the pool only while the budget
// has room for it as cached memory; ReleaseIdleWorkspaces frees the pool on demand.

#ifndef ENGINE_PLAN_H_
#define ENGINE_PLAN_H_

#include <chrono>
#include <functional>
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
#include "gradengine/memory_budget.h"
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
  // One entry per updated buffer (ParameterInfo::updated) of the network.
  ParameterTensors* running_stats = nullptr;
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

  struct Workspace;

  // One call's workspace and the share of the budget that pays for it. Move-only.
  class WorkspaceLease {
   public:
    WorkspaceLease();
    WorkspaceLease(WorkspaceLease&&) noexcept;
    WorkspaceLease& operator=(WorkspaceLease&&) noexcept;
    ~WorkspaceLease();

   private:
    friend class Plan;
    std::unique_ptr<Workspace> workspace_;  // null until Execute allocates one
    MemoryBudget::Reservation reservation_;
  };

  // Takes an idle workspace from the pool, or reserves workspace_bytes() for a new one, and
  // reserves `extra_bytes` more (the call's results), handed back in `*extra`: one wait for
  // both, so a call never holds one while waiting for the other. Errors: the budget's
  // ResourceExhausted, or `should_continue`'s error while waiting.
  absl::StatusOr<WorkspaceLease> LeaseWorkspace(int64_t extra_bytes,
                                                const ContinueCheck& should_continue,
                                                MemoryBudget::Reservation* extra);

  // Runs the plan in the leased workspace, which goes back to the pool (or is freed) after.
  // `should_continue` (may be empty) is consulted before every layer.
  absl::Status Execute(const PlanBindings& bindings, const ContinueCheck& should_continue,
                       WorkspaceLease lease);

  // Frees the idle workspaces; returns the bytes that frees.
  int64_t ReleaseIdleWorkspaces() ABSL_LOCKS_EXCLUDED(pool_mu_);

  // Bytes of one call's workspace (activations, gradients, scratchpad, dL/dy).
  int64_t workspace_bytes() const { return workspace_bytes_; }
  // Estimated bytes of the compiled plan itself (primitives, descriptors, kernels).
  int64_t structure_bytes() const { return structure_bytes_; }
  // Bytes held by idle workspaces right now.
  int64_t idle_bytes() const ABSL_LOCKS_EXCLUDED(pool_mu_);

  // What binds a slot to the caller's tensors; kNone slots are owned by the workspace and
  // kConstant ones by the plan.
  enum class Role {
    kNone,
    kInput,
    kOutput,
    kDiffOutput,
    kInputGrad,
    kParameter,
    kParameterGrad,
    kRunningStat,
    kConstant,
  };

  struct Slot {
    dnnl::memory::desc desc;
    Role role = Role::kNone;
    std::string parameter;  // for kParameter, kParameterGrad and kRunningStat
    int constant = -1;      // for kConstant: the index in constants_
  };

  // A step computed on the host instead of by a primitive; it gets the data of the op's slots
  // (Op::args' second members), in order.
  using HostFunction = std::function<void(const std::vector<void*>& buffers)>;

  struct Op {
    dnnl::primitive primitive;
    std::vector<std::pair<int, int>> args;  // (DNNL_ARG_*, slot index); for a host op (0, slot)
    HostFunction host;                      // set for a host op, which has no primitive
    // Whether the caller's ContinueCheck runs before this op: true for each layer's first.
    bool starts_layer = false;
    // Slots this op writes in a layout padded past the tensor's channels, whose padding is set
    // back to zero after it runs. oneDNN pads channels to its block with zeros and computes
    // the padding too (as sum(0 x value)); a non-finite value makes that NaN, and the next
    // convolution would carry the NaN into every real channel (NaN x 0 weights).
    std::vector<int> zero_padding_after;
  };

 private:
  friend class PlanBuilder;

  Plan() = default;

  // Sets Op::zero_padding_after for every op that writes a padded slot a later op multiplies.
  void ZeroPaddingWhereMultiplied();
  std::unique_ptr<Workspace> NewWorkspace() const;
  void ReleaseWorkspace(WorkspaceLease lease) ABSL_LOCKS_EXCLUDED(pool_mu_);
  // Points the workspace's caller-bound slots at this call's tensors.
  void Bind(const PlanBindings& bindings, Workspace& workspace);
  absl::Status RunOps(const std::vector<Op>& ops, Workspace& workspace,
                      const ContinueCheck& should_continue);
  // Evaluates the objective on the output and writes dL/dy into the kDiffOutput slot.
  void ApplyObjective(const PlanBindings& bindings, Workspace& workspace);

  dnnl::engine cpu_;
  MemoryBudget* budget_ = nullptr;
  int64_t workspace_bytes_ = 0;
  int64_t structure_bytes_ = 0;
  // OpenMP threads the plan runs with: EngineOptions::threads_per_call, or fewer when the work
  // is so small that waking more threads costs more than it saves.
  int threads_ = 1;
  std::vector<Slot> slots_;
  std::vector<std::vector<float>> constants_;
  int scratchpad_slot_ = -1;
  int diff_output_slot_ = -1;
  std::vector<Op> forward_ops_;
  std::vector<Op> backward_ops_;

  mutable absl::Mutex pool_mu_;
  // Idle workspaces, each charged to the budget as cached memory.
  std::vector<std::unique_ptr<Workspace>> pool_ ABSL_GUARDED_BY(pool_mu_);
};

}  // namespace gradengine

#endif  // ENGINE_PLAN_H_
