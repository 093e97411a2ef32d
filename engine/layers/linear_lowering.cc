// linear as a oneDNN inner product, which takes a 4-D input as it is (flattening is only a
// change of view), with a following activation fused as a post-op.

#include <memory>
#include <string>
#include <vector>

#include "engine/layers/lowering.h"

namespace gradengine {
namespace {

using dnnl::memory;
using Role = Plan::Role;

class LoweredLinear : public LoweredLayer {
 public:
  void Backward(PlanBuilder& b, const BackwardContext& context, BackwardResult* result) override {
    std::vector<Plan::Op>* ops = b.backward_ops();
    int diff = context.diff_dst;
    if (activation) diff = AppendEltwiseBackward(b, *activation, dst, diff);
    const std::string weight_name = name + ".weight";
    const std::string bias_name = name + ".bias";
    const bool want_weight = b.WantsGrad(weight_name);
    const bool want_bias = spec.bias && b.WantsGrad(bias_name);
    const memory::desc bias_any = spec.bias ? AnyDesc({spec.out_features}) : memory::desc();
    if (want_weight || want_bias) {
      // The forward pass's layouts, so that nothing is reordered for the backward one.
      dnnl::inner_product_backward_weights::desc desc(b.DescOf(src), AnyDesc(weights_shape),
                                                      bias_any, AnyDesc(out_shape));
      dnnl::inner_product_backward_weights::primitive_desc pd(desc, UserScratchpadAttr(), b.cpu(),
                                                              forward);
      const int src_slot = b.Convert(ops, src, pd.src_desc());
      const int diff_dst = b.Convert(ops, diff, pd.diff_dst_desc());
      const PlanBuilder::GradSlots weight_grad =
          b.ParameterGrad(weight_name, PlainDesc(weights_shape), pd.diff_weights_desc());
      std::vector<std::pair<int, int>> args = {{DNNL_ARG_SRC, src_slot},
                                               {DNNL_ARG_DIFF_DST, diff_dst},
                                               {DNNL_ARG_DIFF_WEIGHTS, weight_grad.computed}};
      PlanBuilder::GradSlots bias_grad;
      if (spec.bias) {
        bias_grad = b.ParameterGrad(bias_name, PlainDesc({spec.out_features}), pd.diff_bias_desc());
        args.emplace_back(DNNL_ARG_DIFF_BIAS, bias_grad.computed);
      }
      b.AddOp(ops, pd, dnnl::inner_product_backward_weights(pd), std::move(args));
      b.FinishParameterGrad(weight_grad);
      if (spec.bias) b.FinishParameterGrad(bias_grad);
    }
    if (context.want_diff_src) {
      dnnl::inner_product_backward_data::desc desc(b.DescOf(src), forward.weights_desc(),
                                                   AnyDesc(out_shape));
      dnnl::inner_product_backward_data::primitive_desc pd(desc, UserScratchpadAttr(), b.cpu(),
                                                           forward);
      const int weights_slot = b.DescOf(weights) == pd.weights_desc()
                                   ? weights
                                   : b.Convert(ops, weights_user, pd.weights_desc());
      const int diff_dst = b.Convert(ops, diff, pd.diff_dst_desc());
      const int diff_src = b.AddSlot(pd.diff_src_desc());
      b.AddOp(ops, pd, dnnl::inner_product_backward_data(pd),
              {{DNNL_ARG_DIFF_DST, diff_dst},
               {DNNL_ARG_WEIGHTS, weights_slot},
               {DNNL_ARG_DIFF_SRC, diff_src}});
      result->diff_src = diff_src;
    }
  }

  LinearSpec spec;
  std::string name;
  std::optional<EltwiseAlgorithm> activation;  // fused
  std::vector<int64_t> in_shape, out_shape;
  // [out, C, H, W] for a 4-D input, [out, in] for a 2-D one: PyTorch's [out, C*H*W] either way.
  std::vector<int64_t> weights_shape;
  dnnl::inner_product_forward::primitive_desc forward;
  int src = -1;
  int weights_user = -1;
  int weights = -1;
};

}  // namespace

std::unique_ptr<LoweredLayer> Lowering<LinearSpec>::Forward(PlanBuilder& b, const LinearSpec& s,
                                                            const ForwardContext& context) {
  auto lowered = std::make_unique<LoweredLinear>();
  LoweredLinear& l = *lowered;
  l.spec = s;
  l.name = context.layer->name;
  l.in_shape = context.in_shape;
  l.out_shape = context.out_shape;
  l.weights_shape = l.in_shape;
  l.weights_shape[0] = s.out_features;
  l.activation = FusableActivation(context.fusable_next, b.needs().training);
  l.fused_next = l.activation.has_value();
  dnnl::primitive_attr attr = UserScratchpadAttr();
  if (l.activation) {
    dnnl::post_ops ops;
    ops.append_eltwise(1.0f, l.activation->forward, l.activation->alpha, l.activation->beta);
    attr.set_post_ops(ops);
  }
  const memory::desc bias_any = s.bias ? AnyDesc({s.out_features}) : memory::desc();
  // The input in the layout the layer before wrote it (a blocked one after a convolution or a
  // pool): the inner product then picks weights to match instead of a reorder of the input.
  dnnl::inner_product_forward::desc desc(b.forward_prop(), b.DescOf(context.src),
                                         AnyDesc(l.weights_shape), bias_any, AnyDesc(l.out_shape));
  l.forward = dnnl::inner_product_forward::primitive_desc(desc, attr, b.cpu());
  std::vector<Plan::Op>* ops = b.forward_ops();
  l.src = b.Convert(ops, context.src, l.forward.src_desc());
  l.weights_user = b.AddSlot(PlainDesc(l.weights_shape), Role::kParameter, l.name + ".weight");
  l.weights = b.Convert(ops, l.weights_user, l.forward.weights_desc());
  std::vector<std::pair<int, int>> args = {{DNNL_ARG_SRC, l.src}, {DNNL_ARG_WEIGHTS, l.weights}};
  if (s.bias) {
    const int bias_user =
        b.AddSlot(PlainDesc({s.out_features}), Role::kParameter, l.name + ".bias");
    args.emplace_back(DNNL_ARG_BIAS, b.Convert(ops, bias_user, l.forward.bias_desc()));
  }
  l.dst = b.AddSlot(l.forward.dst_desc());
  args.emplace_back(DNNL_ARG_DST, l.dst);
  b.AddOp(ops, l.forward, dnnl::inner_product_forward(l.forward), std::move(args));
  return lowered;
}

}  // namespace gradengine
