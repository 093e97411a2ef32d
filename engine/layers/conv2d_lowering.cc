// conv2d as oneDNN convolutions, with a following activation fused as a post-op.

#include <memory>
#include <string>
#include <vector>

#include "engine/layers/lowering.h"

namespace gradengine {
namespace {

using dnnl::memory;
using Role = Plan::Role;

// oneDNN's weights dims: OIHW, or GOIHW for grouped convolutions. Both have PyTorch's
// [out, in/groups, kh, kw] memory order.
std::vector<int64_t> OneDnnWeightsShape(const Conv2dSpec& conv) {
  if (conv.groups == 1) {
    return {conv.out_channels, conv.in_channels, conv.kernel_h, conv.kernel_w};
  }
  return {conv.groups, conv.out_channels / conv.groups, conv.in_channels / conv.groups,
          conv.kernel_h, conv.kernel_w};
}

// Creates a convolution primitive descriptor, preferring oneDNN's Winograd F(4x4, 3x3)
// kernels (about half the arithmetic of a direct 3x3 convolution) where `winograd` allows and
// oneDNN implements them for this shape and CPU, and the direct algorithm otherwise.
template <typename PrimitiveDesc, typename MakeDesc, typename... Hint>
PrimitiveDesc CreateConvPd(const MakeDesc& make_desc, const dnnl::primitive_attr& attr,
                           const dnnl::engine& cpu, bool winograd, const Hint&... hint) {
  if (winograd) {
    PrimitiveDesc pd(make_desc(dnnl::algorithm::convolution_winograd), attr, cpu, hint...,
                     /*allow_empty=*/true);
    if (pd) return pd;
  }
  return PrimitiveDesc(make_desc(dnnl::algorithm::convolution_direct), attr, cpu, hint...);
}

// Winograd pays off on channel-rich 3x3 convolutions (measured here: 1.3-1.6x on 32->64 and
// 64->64 layers, but 3-15x slower on 1->8 and 8->16 ones). Symmetric padding only: oneDNN
// 2.6.3's Winograd backward-data accepts asymmetric padding but computes wrong input gradients.
bool UseWinograd(const Conv2dSpec& c, const EngineOptions& options) {
  return options.winograd && c.kernel_h == 3 && c.kernel_w == 3 && c.stride_h == 1 &&
         c.stride_w == 1 && c.dilation_h == 1 && c.dilation_w == 1 && c.groups == 1 &&
         c.pad_top == c.pad_bottom && c.pad_left == c.pad_right &&
         c.in_channels >= options.winograd_min_channels &&
         c.out_channels >= options.winograd_min_channels;
}

class LoweredConv2d : public LoweredLayer {
 public:
  void Backward(PlanBuilder& b, const BackwardContext& context, BackwardResult* result) override;

  Conv2dSpec conv;
  std::string name;
  std::optional<EltwiseAlgorithm> activation;  // fused
  bool winograd = false;
  std::vector<int64_t> in_shape, out_shape, weights_shape;
  memory::dims strides, dilates, padding_l, padding_r;
  int src = -1;  // in the layout the forward primitive reads
  int weights_user = -1;
  int weights = -1;
  dnnl::convolution_forward::primitive_desc pd;
};

void LoweredConv2d::Backward(PlanBuilder& b, const BackwardContext& context,
                             BackwardResult* result) {
  const dnnl::engine& cpu = b.cpu();
  int diff = context.diff_dst;
  if (activation) diff = AppendEltwiseBackward(b, *activation, dst, diff);

  const Conv2dSpec& c = conv;
  const std::string weight_name = name + ".weight";
  const std::string bias_name = name + ".bias";
  const bool want_weight = b.WantsGrad(weight_name);
  const bool want_bias = c.bias && b.WantsGrad(bias_name);
  std::vector<Plan::Op>* ops = b.backward_ops();

  if (want_bias && !want_weight) {
    // Only the bias gradient: a sum of dL/dy over N, H and W is all it takes.
    const memory::dims bias_dims = {1, c.out_channels, 1, 1};
    const int bias_grad_user =
        b.AddSlot(memory::desc(bias_dims, memory::data_type::f32, memory::format_tag::abcd),
                  Role::kParameterGrad, bias_name);
    if (b.DescOf(diff).dims() == bias_dims) {
      // N = OH = OW = 1: nothing to sum (oneDNN rejects such a reduction); dL/dy is it.
      b.ConvertInto(ops, diff, bias_grad_user);
    } else {
      dnnl::reduction::desc desc(
          dnnl::algorithm::reduction_sum, b.DescOf(diff),
          memory::desc(bias_dims, memory::data_type::f32, memory::format_tag::any), 0.0f, 0.0f);
      dnnl::reduction::primitive_desc rpd(desc, UserScratchpadAttr(), cpu);
      const int bias_grad =
          b.DescOf(bias_grad_user) == rpd.dst_desc() ? bias_grad_user : b.AddSlot(rpd.dst_desc());
      b.AddOp(ops, rpd, dnnl::reduction(rpd), {{DNNL_ARG_SRC, diff}, {DNNL_ARG_DST, bias_grad}});
      if (bias_grad != bias_grad_user) b.ConvertInto(ops, bias_grad, bias_grad_user);
    }
  } else if (want_weight || want_bias) {
    auto make_desc = [&](dnnl::algorithm algorithm) {
      return dnnl::convolution_backward_weights::desc(
          algorithm, AnyDesc(in_shape), AnyDesc(weights_shape),
          c.bias ? AnyDesc({c.out_channels}) : memory::desc(), AnyDesc(out_shape), strides, dilates,
          padding_l, padding_r);
    };
    const auto wpd = CreateConvPd<dnnl::convolution_backward_weights::primitive_desc>(
        make_desc, UserScratchpadAttr(), cpu, winograd, pd);
    const int src_slot = b.Convert(ops, src, wpd.src_desc());
    const int diff_dst = b.Convert(ops, diff, wpd.diff_dst_desc());
    // Gradients land directly in the caller's tensors when the layouts agree.
    const PlanBuilder::GradSlots weight_grad =
        b.ParameterGrad(weight_name, PlainDesc(weights_shape), wpd.diff_weights_desc());
    std::vector<std::pair<int, int>> args = {{DNNL_ARG_SRC, src_slot},
                                             {DNNL_ARG_DIFF_DST, diff_dst},
                                             {DNNL_ARG_DIFF_WEIGHTS, weight_grad.computed}};
    PlanBuilder::GradSlots bias_grad;
    if (c.bias) {
      bias_grad = b.ParameterGrad(bias_name, PlainDesc({c.out_channels}), wpd.diff_bias_desc());
      args.emplace_back(DNNL_ARG_DIFF_BIAS, bias_grad.computed);
    }
    b.AddOp(ops, wpd, dnnl::convolution_backward_weights(wpd), std::move(args));
    b.FinishParameterGrad(weight_grad);
    if (c.bias) b.FinishParameterGrad(bias_grad);
  }

  if (context.want_diff_src) {
    auto make_desc = [&](dnnl::algorithm algorithm) {
      return dnnl::convolution_backward_data::desc(algorithm, AnyDesc(in_shape),
                                                   AnyDesc(weights_shape), AnyDesc(out_shape),
                                                   strides, dilates, padding_l, padding_r);
    };
    const auto dpd = CreateConvPd<dnnl::convolution_backward_data::primitive_desc>(
        make_desc, UserScratchpadAttr(), cpu, winograd, pd);
    // Reuse the weights the forward pass already reordered when the layouts agree.
    const int weights_slot = b.DescOf(weights) == dpd.weights_desc()
                                 ? weights
                                 : b.Convert(ops, weights_user, dpd.weights_desc());
    const int diff_dst = b.Convert(ops, diff, dpd.diff_dst_desc());
    const int diff_src = b.AddSlot(dpd.diff_src_desc());
    b.AddOp(ops, dpd, dnnl::convolution_backward_data(dpd),
            {{DNNL_ARG_DIFF_DST, diff_dst},
             {DNNL_ARG_WEIGHTS, weights_slot},
             {DNNL_ARG_DIFF_SRC, diff_src}});
    result->diff_src = diff_src;
  }
}

}  // namespace

std::unique_ptr<LoweredLayer> Lowering<Conv2dSpec>::Forward(PlanBuilder& b, const Conv2dSpec& c,
                                                            const ForwardContext& context) {
  auto lowered = std::make_unique<LoweredConv2d>();
  LoweredConv2d& l = *lowered;
  l.conv = c;
  l.name = context.layer->name;
  l.in_shape = context.in_shape;
  l.weights_shape = OneDnnWeightsShape(c);
  // A following activation runs as the convolution's post-op.
  l.activation = FusableActivation(context.fusable_next, b.needs().training);
  l.fused_next = l.activation.has_value();
  l.out_shape = context.out_shape;
  l.strides = {c.stride_h, c.stride_w};
  l.dilates = {c.dilation_h - 1, c.dilation_w - 1};  // oneDNN: 0 = dense
  l.padding_l = {c.pad_top, c.pad_left};
  // oneDNN requires (in + pad_l + pad_r - span) / stride + 1 == out exactly; trailing padding
  // that no output reads is dropped (it may even go negative) so that the primitive sees
  // precisely PyTorch's output size.
  const int64_t span_h = c.dilation_h * (c.kernel_h - 1) + 1;
  const int64_t span_w = c.dilation_w * (c.kernel_w - 1) + 1;
  l.padding_r = {(l.out_shape[2] - 1) * c.stride_h + span_h - l.in_shape[2] - c.pad_top,
                 (l.out_shape[3] - 1) * c.stride_w + span_w - l.in_shape[3] - c.pad_left};
  l.winograd = UseWinograd(c, b.options());
  const memory::desc bias_any = c.bias ? AnyDesc({c.out_channels}) : memory::desc();
  auto make_desc = [&](dnnl::algorithm algorithm) {
    return dnnl::convolution_forward::desc(b.forward_prop(), algorithm, AnyDesc(l.in_shape),
                                           AnyDesc(l.weights_shape), bias_any, AnyDesc(l.out_shape),
                                           l.strides, l.dilates, l.padding_l, l.padding_r);
  };
  dnnl::primitive_attr attr = UserScratchpadAttr();
  if (l.activation) {
    dnnl::post_ops ops;
    ops.append_eltwise(1.0f, l.activation->forward, l.activation->alpha, l.activation->beta);
    attr.set_post_ops(ops);
  }
  l.pd =
      CreateConvPd<dnnl::convolution_forward::primitive_desc>(make_desc, attr, b.cpu(), l.winograd);
  std::vector<Plan::Op>* ops = b.forward_ops();
  l.src = b.Convert(ops, context.src, l.pd.src_desc());
  l.weights_user = b.AddSlot(PlainDesc(l.weights_shape), Role::kParameter, l.name + ".weight");
  l.weights = b.Convert(ops, l.weights_user, l.pd.weights_desc());
  std::vector<std::pair<int, int>> args = {{DNNL_ARG_SRC, l.src}, {DNNL_ARG_WEIGHTS, l.weights}};
  if (c.bias) {
    const int bias_user =
        b.AddSlot(PlainDesc({c.out_channels}), Role::kParameter, l.name + ".bias");
    args.emplace_back(DNNL_ARG_BIAS, b.Convert(ops, bias_user, l.pd.bias_desc()));
  }
  l.dst = b.AddSlot(l.pd.dst_desc());
  args.emplace_back(DNNL_ARG_DST, l.dst);
  b.AddOp(ops, l.pd, dnnl::convolution_forward(l.pd), std::move(args));
  return lowered;
}

}  // namespace gradengine
