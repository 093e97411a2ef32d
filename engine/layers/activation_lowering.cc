// A standalone activation as a oneDNN eltwise primitive (one that follows a convolution, a
// linear layer or an add is fused into it instead).

#include <memory>

#include "engine/layers/lowering.h"

namespace gradengine {
namespace {

class LoweredActivation : public LoweredLayer {
 public:
  void Backward(PlanBuilder& b, const BackwardContext& context, BackwardResult* result) override {
    if (!context.want_diff_src) return;
    result->diff_src =
        AppendEltwiseBackward(b, alg, alg.backward_uses_dst ? dst : src, context.diff_dst);
  }

  EltwiseAlgorithm alg;
  int src = -1;
};

}  // namespace

std::unique_ptr<LoweredLayer> Lowering<ActivationSpec>::Forward(PlanBuilder& b,
                                                                const ActivationSpec& spec,
                                                                const ForwardContext& context) {
  auto lowered = std::make_unique<LoweredActivation>();
  lowered->alg = ToEltwise(spec);
  lowered->src = context.src;
  dnnl::eltwise_forward::desc desc(b.forward_prop(), lowered->alg.forward, b.DescOf(context.src),
                                   lowered->alg.alpha, lowered->alg.beta);
  dnnl::eltwise_forward::primitive_desc pd(desc, UserScratchpadAttr(), b.cpu());
  lowered->dst = b.AddSlot(pd.dst_desc());
  b.AddOp(b.forward_ops(), pd, dnnl::eltwise_forward(pd),
          {{DNNL_ARG_SRC, context.src}, {DNNL_ARG_DST, lowered->dst}});
  return lowered;
}

}  // namespace gradengine
