// add as a oneDNN binary primitive, with a following activation fused as a post-op. Its
// backward pass is free: dL/d(input) and dL/d(other) are both dL/d(output).

#include <memory>

#include "engine/layers/lowering.h"

namespace gradengine {
namespace {

class LoweredAdd : public LoweredLayer {
 public:
  void Backward(PlanBuilder& b, const BackwardContext& context, BackwardResult* result) override {
    int diff = context.diff_dst;
    if (activation) diff = AppendEltwiseBackward(b, *activation, dst, diff);
    result->diff_src = diff;
    result->diff_other = diff;
  }

  std::optional<EltwiseAlgorithm> activation;  // fused
};

}  // namespace

std::unique_ptr<LoweredLayer> Lowering<AddSpec>::Forward(PlanBuilder& b, const AddSpec&,
                                                         const ForwardContext& context) {
  auto lowered = std::make_unique<LoweredAdd>();
  lowered->activation = FusableActivation(context.fusable_next, b.needs().training);
  lowered->fused_next = lowered->activation.has_value();
  dnnl::primitive_attr attr = UserScratchpadAttr();
  if (lowered->activation) {
    dnnl::post_ops ops;
    ops.append_eltwise(1.0f, lowered->activation->forward, lowered->activation->alpha,
                       lowered->activation->beta);
    attr.set_post_ops(ops);
  }
  const dnnl::memory::desc src = b.DescOf(context.src);
  // Both operands in one layout, the one the input has.
  const int other = b.Convert(b.forward_ops(), context.other, src);
  dnnl::binary::desc desc(dnnl::algorithm::binary_add, src, src, src);
  dnnl::binary::primitive_desc pd(desc, attr, b.cpu());
  lowered->dst = b.AddSlot(pd.dst_desc());
  b.AddOp(b.forward_ops(), pd, dnnl::binary(pd),
          {{DNNL_ARG_SRC_0, context.src}, {DNNL_ARG_SRC_1, other}, {DNNL_ARG_DST, lowered->dst}});
  return lowered;
}

}  // namespace gradengine
