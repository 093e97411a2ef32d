// How a layer kind becomes oneDNN primitives: the builder every kind's lowering appends to,
// and Lowering<Spec>, specialised once per alternative of LayerOp (engine/layers/
// <kind>_lowering.cc). See engine/layers/layer_kind.h for the whole path of a layer kind.
// Private to the engine.
//
// A lowering's Forward appends the layer's forward primitives (reading the layer's input slot,
// writing a new output slot in whatever layout oneDNN prefers) and returns a LoweredLayer that
// remembers what its backward pass needs. Plan::Create calls Backward in reverse order with
// dL/d(output), accumulated over every layer that read the output; Backward appends the
// backward primitives and returns dL/d(input) (and, for an add, dL/d(other)) when asked.

#ifndef ENGINE_LAYERS_LOWERING_H_
#define ENGINE_LAYERS_LOWERING_H_

#include <memory>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "engine/plan.h"
#include "gradengine/network.h"
#include "oneapi/dnnl/dnnl.hpp"

namespace gradengine {

// Plain row-major float32 layouts (a, ab, abcd, abcde) of `shape`, and "any" for oneDNN to pick.
dnnl::memory::desc PlainDesc(const std::vector<int64_t>& shape);
dnnl::memory::desc AnyDesc(const std::vector<int64_t>& shape);
// Every primitive takes its scratchpad from the plan's one shared slot.
dnnl::primitive_attr UserScratchpadAttr();

struct EltwiseAlgorithm {
  dnnl::algorithm forward;
  // The algorithm for the backward pass; a *_use_dst_for_bwd variant when one exists, which
  // lets the backward pass read the activation's output instead of keeping its input.
  dnnl::algorithm backward;
  bool backward_uses_dst = false;
  float alpha = 0.0f;
  float beta = 0.0f;
};
EltwiseAlgorithm ToEltwise(const ActivationSpec& activation);

// An activation that layer `next` (the fusable next layer, may be null) is, if a primitive may
// fuse it as an eltwise post-op: in training only when its backward pass can be computed from
// the fused output.
std::optional<EltwiseAlgorithm> FusableActivation(const LayerSpec* next, bool training);

// Appends an eltwise backward (dL/dx from dL/dy and x or y) reading `data` (the activation's
// output when alg.backward_uses_dst, else its input); returns the new dL/dx slot.
class PlanBuilder;
int AppendEltwiseBackward(PlanBuilder& b, const EltwiseAlgorithm& alg, int data, int diff);

// Assembles a Plan: slots, primitives and host steps, in execution order.
class PlanBuilder {
 public:
  PlanBuilder(Plan* plan, const dnnl::engine& cpu, const PlanNeeds& needs,
              const EngineOptions& options);

  int AddSlot(const dnnl::memory::desc& desc, Plan::Role role = Plan::Role::kNone,
              std::string parameter = "");
  // A slot holding `values` (float32 in layout `desc`), the same for every call.
  int AddConstant(const dnnl::memory::desc& desc, std::vector<float> values);
  // A copy: adding a slot may move the others, so a reference would not stay valid.
  dnnl::memory::desc DescOf(int slot) const;
  Plan::Slot& SlotAt(int slot);

  // Appends `primitive` to `ops`, recording how much scratchpad it needs.
  template <typename PrimitiveDesc>
  void AddOp(std::vector<Plan::Op>* ops, const PrimitiveDesc& pd, dnnl::primitive primitive,
             std::vector<std::pair<int, int>> args) {
    NoteScratchpad(pd.scratchpad_desc().get_size());
    args.emplace_back(DNNL_ARG_SCRATCHPAD, scratchpad_slot());
    ops->push_back(Plan::Op{std::move(primitive), std::move(args), {}, false, {}});
  }
  // Appends a step computed on the host: `function` gets the data of `slots`, in order.
  void AddHostOp(std::vector<Plan::Op>* ops, Plan::HostFunction function, std::vector<int> slots);

  // A slot holding `from`'s contents in layout `want`: `from` itself when the layouts agree,
  // one made by an earlier Convert of the same contents (slots are written once, and ops run
  // in the order they are added, so it is already filled), otherwise a new slot filled by a
  // reorder appended to `ops`.
  int Convert(std::vector<Plan::Op>* ops, int from, const dnnl::memory::desc& want);
  void ConvertInto(std::vector<Plan::Op>* ops, int from, int to);
  // Makes `slot`'s contents the caller's tensor of `role` (kOutput, kInputGrad), plain in
  // `plain`: the slot itself is bound to it when it already has that layout and belongs to the
  // workspace, otherwise a reorder into a new bound slot is appended to `ops`.
  void BindToCaller(std::vector<Plan::Op>* ops, int slot, const dnnl::memory::desc& plain,
                    Plan::Role role);
  // A new slot holding a + b (for a gradient that several layers contribute to).
  int Accumulate(std::vector<Plan::Op>* ops, int a, int b);

  // Where a primitive writes parameter `name`'s gradient, computed in layout `computed`: the
  // caller's tensor itself when its plain layout `plain` agrees, otherwise a workspace slot
  // that FinishParameterGrad copies into the caller's. A gradient nobody wants still needs a
  // slot when the primitive computes it anyway: `user` is then -1.
  struct GradSlots {
    int computed = -1;
    int user = -1;
  };
  GradSlots ParameterGrad(const std::string& name, const dnnl::memory::desc& plain,
                          const dnnl::memory::desc& computed);
  void FinishParameterGrad(const GradSlots& slots);

  bool WantsGrad(const std::string& parameter) const;
  std::vector<Plan::Op>* forward_ops();
  std::vector<Plan::Op>* backward_ops();
  const dnnl::engine& cpu() const { return cpu_; }
  const PlanNeeds& needs() const { return needs_; }
  const EngineOptions& options() const { return options_; }
  // forward_training when gradients follow, forward_inference otherwise.
  dnnl::prop_kind forward_prop() const;

  // Sizes the shared scratchpad slot for the largest primitive.
  void Finish();

 private:
  int scratchpad_slot() const;
  void NoteScratchpad(size_t bytes);

  Plan* plan_;
  dnnl::engine cpu_;
  // For every slot Convert made: the slot whose contents it holds.
  std::vector<std::pair<int, int>> converted_;  // (copy, original)
  const PlanNeeds& needs_;
  const EngineOptions& options_;
  size_t scratchpad_bytes_ = 0;
};

// What a layer's forward lowering sees.
struct ForwardContext {
  const LayerSpec* layer = nullptr;
  int src = -1;  // the slot holding the layer's input
  std::vector<int64_t> in_shape;
  std::vector<int64_t> out_shape;
  int other = -1;  // add only: the slot holding what it adds
  // The next layer when it reads only this layer's output and no other layer reads that
  // output, so that a lowering may fuse it (and then covers it); otherwise null.
  const LayerSpec* fusable_next = nullptr;
};

struct BackwardContext {
  int diff_dst = -1;  // dL/d(output of the last layer the LoweredLayer covers)
  bool want_diff_src = false;
  bool want_diff_other = false;  // add only
};

struct BackwardResult {
  int diff_src = -1;
  int diff_other = -1;
};

class LoweredLayer {
 public:
  virtual ~LoweredLayer() = default;
  // Appends the backward primitives: the wanted parameter gradients, and dL/d(input) when
  // context.want_diff_src.
  virtual void Backward(PlanBuilder& b, const BackwardContext& context, BackwardResult* result) = 0;

  int dst = -1;             // the output slot of the last layer covered
  bool fused_next = false;  // whether it also covers ForwardContext::fusable_next
};

// Specialised once per alternative of LayerOp:
//   static std::unique_ptr<LoweredLayer> Forward(PlanBuilder&, const Spec&,
//                                                const ForwardContext&);
template <typename Spec>
struct Lowering;

#define GRADENGINE_DECLARE_LOWERING(Spec)                                          \
  template <>                                                                      \
  struct Lowering<Spec> {                                                          \
    static std::unique_ptr<LoweredLayer> Forward(PlanBuilder& b, const Spec& spec, \
                                                 const ForwardContext& context);   \
  }

GRADENGINE_DECLARE_LOWERING(Conv2dSpec);
GRADENGINE_DECLARE_LOWERING(ActivationSpec);
GRADENGINE_DECLARE_LOWERING(MaxPool2dSpec);
GRADENGINE_DECLARE_LOWERING(AvgPool2dSpec);
GRADENGINE_DECLARE_LOWERING(BatchNorm2dSpec);
GRADENGINE_DECLARE_LOWERING(LinearSpec);
GRADENGINE_DECLARE_LOWERING(AddSpec);

#undef GRADENGINE_DECLARE_LOWERING

inline std::unique_ptr<LoweredLayer> LowerForward(PlanBuilder& b, const ForwardContext& context) {
  return std::visit(
      [&](const auto& spec) {
        using Spec = std::decay_t<decltype(spec)>;
        return Lowering<Spec>::Forward(b, spec, context);
      },
      context.layer->op);
}

}  // namespace gradengine

#endif  // ENGINE_LAYERS_LOWERING_H_
