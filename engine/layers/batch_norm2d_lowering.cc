// batch_norm2d as oneDNN batch normalization, with a following ReLU fused, and the running
// statistics' update as a host step.

#include <memory>
#include <string>
#include <vector>

#include "engine/layers/lowering.h"

namespace gradengine {
namespace {

using dnnl::memory;
using Role = Plan::Role;

class LoweredBatchNorm : public LoweredLayer {
 public:
  void Backward(PlanBuilder& b, const BackwardContext& context, BackwardResult* result) override {
    std::vector<Plan::Op>* ops = b.backward_ops();
    const std::string weight_name = name + ".weight";
    const std::string bias_name = name + ".bias";
    const memory::desc data = b.DescOf(src);
    // With a scale and shift, oneDNN 2.6 has only the full backward pass (backward_data
    // refuses them), so the affine gradients are computed even when nobody wants them.
    dnnl::batch_normalization_backward::desc desc(
        spec.affine ? dnnl::prop_kind::backward : dnnl::prop_kind::backward_data, data, data,
        static_cast<float>(spec.eps), flags);
    dnnl::batch_normalization_backward::primitive_desc pd(desc, UserScratchpadAttr(), b.cpu(),
                                                          forward);
    const int diff_dst = b.Convert(ops, context.diff_dst, pd.diff_dst_desc());
    // Computed even when only the affine gradients are wanted: one primitive does both.
    const int diff_src = b.AddSlot(pd.diff_src_desc());
    std::vector<std::pair<int, int>> args = {{DNNL_ARG_SRC, src},
                                             {DNNL_ARG_MEAN, mean},
                                             {DNNL_ARG_VARIANCE, variance},
                                             {DNNL_ARG_DIFF_DST, diff_dst},
                                             {DNNL_ARG_DIFF_SRC, diff_src}};
    if (workspace >= 0) args.emplace_back(DNNL_ARG_WORKSPACE, workspace);
    PlanBuilder::GradSlots weight_grad, bias_grad;
    if (spec.affine) {
      args.emplace_back(DNNL_ARG_SCALE, scale);
      // Not used by the arithmetic, but oneDNN 2.6 refuses to run without it.
      args.emplace_back(DNNL_ARG_SHIFT, shift);
      const memory::desc channels = PlainDesc({spec.num_features});
      weight_grad = b.ParameterGrad(weight_name, channels, channels);
      bias_grad = b.ParameterGrad(bias_name, channels, channels);
      args.emplace_back(DNNL_ARG_DIFF_SCALE, weight_grad.computed);
      args.emplace_back(DNNL_ARG_DIFF_SHIFT, bias_grad.computed);
    }
    b.AddOp(ops, pd, dnnl::batch_normalization_backward(pd), std::move(args));
    if (spec.affine) {
      b.FinishParameterGrad(weight_grad);
      b.FinishParameterGrad(bias_grad);
    }
    if (context.want_diff_src) result->diff_src = diff_src;
  }

  BatchNorm2dSpec spec;
  std::string name;
  dnnl::normalization_flags flags;
  dnnl::batch_normalization_forward::primitive_desc forward;
  int src = -1;
  int mean = -1;  // the batch's statistics in training mode, the running ones in inference
  int variance = -1;
  int scale = -1;
  int shift = -1;
  int workspace = -1;  // the fused ReLU's mask
};

// PyTorch's update of the running statistics from the batch's mean and biased variance over
// `count` values per channel: running = (1 - momentum) running + momentum batch, with the
// variance made unbiased.
void UpdateRunningStats(double momentum, int64_t channels, int64_t count,
                        const std::vector<void*>& buffers) {
  const float* mean = static_cast<const float*>(buffers[0]);
  const float* variance = static_cast<const float*>(buffers[1]);
  const float* running_mean = static_cast<const float*>(buffers[2]);
  const float* running_var = static_cast<const float*>(buffers[3]);
  float* new_mean = static_cast<float*>(buffers[4]);
  float* new_var = static_cast<float*>(buffers[5]);
  const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
  for (int64_t c = 0; c < channels; ++c) {
    new_mean[c] = static_cast<float>((1.0 - momentum) * running_mean[c] + momentum * mean[c]);
    new_var[c] =
        static_cast<float>((1.0 - momentum) * running_var[c] + momentum * variance[c] * unbias);
  }
}

}  // namespace

std::unique_ptr<LoweredLayer> Lowering<BatchNorm2dSpec>::Forward(PlanBuilder& b,
                                                                 const BatchNorm2dSpec& s,
                                                                 const ForwardContext& context) {
  auto lowered = std::make_unique<LoweredBatchNorm>();
  LoweredBatchNorm& l = *lowered;
  l.spec = s;
  l.name = context.layer->name;
  l.src = context.src;
  const auto* relu = context.fusable_next == nullptr
                         ? nullptr
                         : std::get_if<ActivationSpec>(&context.fusable_next->op);
  l.fused_next = relu != nullptr && relu->kind == ActivationKind::kRelu;
  l.flags = dnnl::normalization_flags::none;
  if (s.affine)
    l.flags |= dnnl::normalization_flags::use_scale | dnnl::normalization_flags::use_shift;
  if (!s.training) l.flags |= dnnl::normalization_flags::use_global_stats;
  if (l.fused_next) l.flags |= dnnl::normalization_flags::fuse_norm_relu;
  // Training mode normalises with the batch's statistics even in a Forward call.
  const dnnl::prop_kind prop = s.training ? dnnl::prop_kind::forward_training : b.forward_prop();
  dnnl::batch_normalization_forward::desc desc(prop, b.DescOf(context.src),
                                               static_cast<float>(s.eps), l.flags);
  l.forward =
      dnnl::batch_normalization_forward::primitive_desc(desc, UserScratchpadAttr(), b.cpu());
  std::vector<Plan::Op>* ops = b.forward_ops();
  const memory::desc channels = PlainDesc({s.num_features});
  const int running_mean = b.AddSlot(channels, Role::kParameter, l.name + ".running_mean");
  const int running_var = b.AddSlot(channels, Role::kParameter, l.name + ".running_var");
  if (s.training) {
    l.mean = b.AddSlot(channels);
    l.variance = b.AddSlot(channels);
  } else {
    l.mean = running_mean;
    l.variance = running_var;
  }
  l.dst = b.AddSlot(l.forward.dst_desc());
  std::vector<std::pair<int, int>> args = {{DNNL_ARG_SRC, context.src},
                                           {DNNL_ARG_DST, l.dst},
                                           {DNNL_ARG_MEAN, l.mean},
                                           {DNNL_ARG_VARIANCE, l.variance}};
  if (s.affine) {
    l.scale = b.AddSlot(channels, Role::kParameter, l.name + ".weight");
    args.emplace_back(DNNL_ARG_SCALE, l.scale);
    l.shift = b.AddSlot(channels, Role::kParameter, l.name + ".bias");
    args.emplace_back(DNNL_ARG_SHIFT, l.shift);
  }
  if (l.fused_next && prop == dnnl::prop_kind::forward_training) {
    l.workspace = b.AddSlot(l.forward.workspace_desc());
    args.emplace_back(DNNL_ARG_WORKSPACE, l.workspace);
  }
  b.AddOp(ops, l.forward, dnnl::batch_normalization_forward(l.forward), std::move(args));
  if (s.training) {
    const int new_mean = b.AddSlot(channels, Role::kRunningStat, l.name + ".running_mean");
    const int new_var = b.AddSlot(channels, Role::kRunningStat, l.name + ".running_var");
    const std::vector<int64_t>& in = context.in_shape;
    const int64_t count = in[0] * in[2] * in[3];
    const double momentum = s.momentum;
    const int64_t features = s.num_features;
    b.AddHostOp(ops,
                [momentum, features, count](const std::vector<void*>& buffers) {
                  UpdateRunningStats(momentum, features, count, buffers);
                },
                {l.mean, l.variance, running_mean, running_var, new_mean, new_var});
  }
  return lowered;
}

}  // namespace gradengine
