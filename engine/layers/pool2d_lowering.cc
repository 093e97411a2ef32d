// max_pool2d and avg_pool2d as oneDNN pooling_v2 primitives.

#include <memory>
#include <vector>

#include "engine/layers/lowering.h"

namespace gradengine {
namespace {

using dnnl::memory;

// Appends a host step computing factor * a (the factor [1, 1, H, W] broadcast over N and C)
// into a new plain slot. On the host rather than as a binary primitive: oneDNN 2.6.3's binary
// kernels write past the end of small blocked tensors on AVX-512.
int AppendMultiply(PlanBuilder& b, std::vector<Plan::Op>* ops, int a, int factor) {
  const std::vector<int64_t> shape(b.DescOf(a).dims());
  const int plain = b.Convert(ops, a, PlainDesc(shape));
  const int product = b.AddSlot(PlainDesc(shape));
  const int64_t planes = shape[0] * shape[1];
  const int64_t pixels = shape[2] * shape[3];
  b.AddHostOp(ops,
              [planes, pixels](const std::vector<void*>& buffers) {
                const float* in = static_cast<const float*>(buffers[0]);
                const float* scale = static_cast<const float*>(buffers[1]);
                float* out = static_cast<float*>(buffers[2]);
                for (int64_t plane = 0; plane < planes; ++plane) {
                  for (int64_t i = 0; i < pixels; ++i) {
                    out[plane * pixels + i] = in[plane * pixels + i] * scale[i];
                  }
                }
              },
              {plain, factor, product});
  return product;
}

class LoweredPool : public LoweredLayer {
 public:
  void Backward(PlanBuilder& b, const BackwardContext& context, BackwardResult* result) override {
    if (!context.want_diff_src) return;
    std::vector<Plan::Op>* ops = b.backward_ops();
    int diff = context.diff_dst;
    if (divisor_fix >= 0) {
      // dL/d(pooled) = dL/dy * the same factor the forward pass applied.
      diff = AppendMultiply(b, ops, diff, divisor_fix);
    }
    dnnl::pooling_v2_backward::desc desc(algorithm, AnyDesc(in_shape), forward.dst_desc(), strides,
                                         kernel, dilation, padding_l, padding_r);
    dnnl::pooling_v2_backward::primitive_desc pd(desc, UserScratchpadAttr(), b.cpu(), forward);
    const int diff_dst = b.Convert(ops, diff, pd.diff_dst_desc());
    const int diff_src = b.AddSlot(pd.diff_src_desc());
    std::vector<std::pair<int, int>> args = {{DNNL_ARG_DIFF_DST, diff_dst},
                                             {DNNL_ARG_DIFF_SRC, diff_src}};
    if (workspace >= 0) args.emplace_back(DNNL_ARG_WORKSPACE, workspace);
    b.AddOp(ops, pd, dnnl::pooling_v2_backward(pd), std::move(args));
    result->diff_src = diff_src;
  }

  dnnl::algorithm algorithm;
  std::vector<int64_t> in_shape;
  memory::dims strides, kernel, dilation, padding_l, padding_r;
  dnnl::pooling_v2_forward::primitive_desc forward;
  int workspace = -1;    // max pooling in training: where the maxima were
  int divisor_fix = -1;  // see AvgDivisorFix
};

// PyTorch's average divisor with count_include_pad counts the padding, but only up to the
// padded input's edge: a window that ceil_mode lets run past it counts fewer than kernel_h *
// kernel_w, which oneDNN always counts. Returns the factor kernel_h * kernel_w / PyTorch's
// count for every output position, or an empty vector when it is 1 everywhere.
std::vector<float> AvgDivisorFix(const AvgPool2dSpec& s, const std::vector<int64_t>& in,
                                 const std::vector<int64_t>& out) {
  if (!s.count_include_pad || !s.ceil_mode) return {};
  std::vector<float> factor(out[2] * out[3]);
  bool needed = false;
  for (int64_t oh = 0; oh < out[2]; ++oh) {
    const int64_t h0 = oh * s.stride_h - s.pad_h;
    const int64_t rows = std::min(h0 + s.kernel_h, in[2] + s.pad_h) - h0;
    for (int64_t ow = 0; ow < out[3]; ++ow) {
      const int64_t w0 = ow * s.stride_w - s.pad_w;
      const int64_t cols = std::min(w0 + s.kernel_w, in[3] + s.pad_w) - w0;
      factor[oh * out[3] + ow] =
          static_cast<float>(static_cast<double>(s.kernel_h * s.kernel_w) / (rows * cols));
      needed |= rows * cols != s.kernel_h * s.kernel_w;
    }
  }
  return needed ? factor : std::vector<float>();
}

struct Window {
  int64_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
};

std::unique_ptr<LoweredPool> LowerPool(PlanBuilder& b, dnnl::algorithm algorithm, const Window& w,
                                       const ForwardContext& context,
                                       std::vector<float> divisor_fix) {
  auto lowered = std::make_unique<LoweredPool>();
  LoweredPool& l = *lowered;
  l.algorithm = algorithm;
  l.in_shape = context.in_shape;
  const std::vector<int64_t>& out = context.out_shape;
  l.strides = {w.stride_h, w.stride_w};
  l.kernel = {w.kernel_h, w.kernel_w};
  l.dilation = {w.dilation_h - 1, w.dilation_w - 1};  // oneDNN: 0 = dense
  l.padding_l = {w.pad_h, w.pad_w};
  // As for convolutions, the right padding gives exactly PyTorch's output size (ceil_mode
  // makes it larger than the left one).
  const int64_t span_h = w.dilation_h * (w.kernel_h - 1) + 1;
  const int64_t span_w = w.dilation_w * (w.kernel_w - 1) + 1;
  l.padding_r = {(out[2] - 1) * w.stride_h + span_h - l.in_shape[2] - w.pad_h,
                 (out[3] - 1) * w.stride_w + span_w - l.in_shape[3] - w.pad_w};
  dnnl::pooling_v2_forward::desc desc(b.forward_prop(), algorithm, b.DescOf(context.src),
                                      AnyDesc(out), l.strides, l.kernel, l.dilation, l.padding_l,
                                      l.padding_r);
  l.forward = dnnl::pooling_v2_forward::primitive_desc(desc, UserScratchpadAttr(), b.cpu());
  const int pooled = b.AddSlot(l.forward.dst_desc());
  std::vector<std::pair<int, int>> args = {{DNNL_ARG_SRC, context.src}, {DNNL_ARG_DST, pooled}};
  if (algorithm == dnnl::algorithm::pooling_max && b.needs().training) {
    l.workspace = b.AddSlot(l.forward.workspace_desc());
    args.emplace_back(DNNL_ARG_WORKSPACE, l.workspace);
  }
  b.AddOp(b.forward_ops(), l.forward, dnnl::pooling_v2_forward(l.forward), std::move(args));
  l.dst = pooled;
  if (!divisor_fix.empty()) {
    // A step of its own: as a binary post-op of the pooling, oneDNN 2.6.3 computes wrong
    // values for windows past the padded edge of a blocked input.
    const memory::desc fix_desc({1, 1, out[2], out[3]}, memory::data_type::f32,
                                memory::format_tag::abcd);
    l.divisor_fix = b.AddConstant(fix_desc, std::move(divisor_fix));
    l.dst = AppendMultiply(b, b.forward_ops(), pooled, l.divisor_fix);
  }
  return lowered;
}

}  // namespace

std::unique_ptr<LoweredLayer> Lowering<MaxPool2dSpec>::Forward(PlanBuilder& b,
                                                               const MaxPool2dSpec& s,
                                                               const ForwardContext& context) {
  return LowerPool(b, dnnl::algorithm::pooling_max,
                   {s.kernel_h, s.kernel_w, s.stride_h, s.stride_w, s.pad_h, s.pad_w, s.dilation_h,
                    s.dilation_w},
                   context, {});
}

std::unique_ptr<LoweredLayer> Lowering<AvgPool2dSpec>::Forward(PlanBuilder& b,
                                                               const AvgPool2dSpec& s,
                                                               const ForwardContext& context) {
  return LowerPool(b,
                   s.count_include_pad ? dnnl::algorithm::pooling_avg_include_padding
                                       : dnnl::algorithm::pooling_avg_exclude_padding,
                   {s.kernel_h, s.kernel_w, s.stride_h, s.stride_w, s.pad_h, s.pad_w, 1, 1},
                   context, AvgDivisorFix(s, context.in_shape, context.out_shape));
}

}  // namespace gradengine
