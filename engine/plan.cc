#include "engine/plan.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <new>
#include <unordered_map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace gradengine {
namespace {

using dnnl::memory;
using Tag = memory::format_tag;
using DataType = memory::data_type;

memory::desc PlainDesc(const std::vector<int64_t>& shape) {
  Tag tag = Tag::undef;
  switch (shape.size()) {
    case 1:
      tag = Tag::a;
      break;
    case 4:
      tag = Tag::abcd;
      break;
    case 5:
      tag = Tag::abcde;
      break;
  }
  return memory::desc(memory::dims(shape.begin(), shape.end()), DataType::f32, tag);
}

memory::desc AnyDesc(const std::vector<int64_t>& shape) {
  return memory::desc(memory::dims(shape.begin(), shape.end()), DataType::f32, Tag::any);
}

// oneDNN's weights dims: OIHW, or GOIHW for grouped convolutions. Both have PyTorch's
// [out, in/groups, kh, kw] memory order.
std::vector<int64_t> OneDnnWeightsShape(const Conv2dSpec& conv) {
  if (conv.groups == 1) {
    return {conv.out_channels, conv.in_channels, conv.kernel_h, conv.kernel_w};
  }
  return {conv.groups, conv.out_channels / conv.groups, conv.in_channels / conv.groups,
          conv.kernel_h, conv.kernel_w};
}

struct EltwiseAlgorithm {
  dnnl::algorithm forward;
  // The algorithm for the backward pass; a *_use_dst_for_bwd variant when one exists, which
  // lets the backward pass read the activation's output instead of keeping its input.
  dnnl::algorithm backward;
  bool backward_uses_dst = false;
  float alpha = 0.0f;
  float beta = 0.0f;
};

EltwiseAlgorithm ToEltwise(const ActivationSpec& act) {
  using A = dnnl::algorithm;
  switch (act.kind) {
    case ActivationKind::kRelu:
      return {A::eltwise_relu, A::eltwise_relu_use_dst_for_bwd, true, 0.0f};
    case ActivationKind::kLeakyRelu:
      // The dst-based backward needs dst > 0 exactly when src > 0, true for slope >= 0.
      if (act.alpha >= 0.0f) {
        return {A::eltwise_relu, A::eltwise_relu_use_dst_for_bwd, true, act.alpha};
      }
      return {A::eltwise_relu, A::eltwise_relu, false, act.alpha};
    case ActivationKind::kTanh:
      return {A::eltwise_tanh, A::eltwise_tanh_use_dst_for_bwd, true};
    case ActivationKind::kSigmoid:
      return {A::eltwise_logistic, A::eltwise_logistic_use_dst_for_bwd, true};
    case ActivationKind::kElu:
      if (act.alpha >= 0.0f) {
        return {A::eltwise_elu, A::eltwise_elu_use_dst_for_bwd, true, act.alpha};
      }
      return {A::eltwise_elu, A::eltwise_elu, false, act.alpha};
    case ActivationKind::kGeluErf:
      return {A::eltwise_gelu_erf, A::eltwise_gelu_erf, false};
    case ActivationKind::kGeluTanh:
      return {A::eltwise_gelu_tanh, A::eltwise_gelu_tanh, false};
  }
  return {A::eltwise_relu, A::eltwise_relu, false};
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

// Sets the calling thread's OpenMP team size for a scope and restores it, so that running a
// plan never changes the caller's own OpenMP settings.
class ScopedOmpThreads {
 public:
  explicit ScopedOmpThreads(int threads) : previous_(omp_get_max_threads()) {
    omp_set_num_threads(threads);
  }
  ~ScopedOmpThreads() { omp_set_num_threads(previous_); }

 private:
  int previous_;
};

// Below this much arithmetic per thread, another thread's wake-up and barriers cost more than
// it saves. Measured on 2 cores: the 0.3 MFLOP seed1 step took 2x and the 114 MFLOP seed4 step
// 1.2x longer on 2 threads than on 1; the 3.6 GFLOP seed4_b32 step halves on 2.
constexpr double kMinFlopsPerThread = 64e6;

// The arithmetic of one call: 2 * N * OC * OH * OW * (IC / groups) * KH * KW per convolution
// pass (forward, and in training up to two backward passes), and a nominal 10 per element of
// each activation pass.
int ThreadsFor(const NetworkSpec& network, const ValidatedNetwork& validated,
               const PlanNeeds& needs, int max_threads) {
  const double passes = needs.training ? 3.0 : 1.0;
  double flops = 0.0;
  for (size_t i = 0; i < network.layers.size(); ++i) {
    const std::vector<int64_t>& out = validated.output_shapes[i];
    const double out_elements = static_cast<double>(out[0]) * out[1] * out[2] * out[3];
    if (const auto* c = std::get_if<Conv2dSpec>(&network.layers[i].op)) {
      flops += passes * 2.0 * out_elements * static_cast<double>(c->in_channels / c->groups) *
               static_cast<double>(c->kernel_h * c->kernel_w);
    } else {
      flops += passes * 10.0 * out_elements;
    }
  }
  const double useful = std::max(1.0, flops / kMinFlopsPerThread);
  return static_cast<int>(std::min<double>(max_threads, useful));
}

// Estimated memory of a compiled plan, per primitive and per buffer descriptor: oneDNN's
// primitive descriptors, kernels and argument maps. Chosen to lie just above what was measured:
// chains of 1000 1x1 and 300 3x3 convolutions on small inputs grew the heap by 30 and 46 KiB
// per layer (workspace included) and are estimated at 35 and 61 KiB. The plan cache's byte
// bound and the memory budget count this.
constexpr int64_t kStructureBytesPerOp = int64_t{4} << 10;
constexpr int64_t kStructureBytesPerSlot = 512;

// Whether `desc` is an NCHW float activation whose layout pads its channels to a block
// (nChw8c, nChw16c, NChw16n16c: oneDNN's aBcd8b, aBcd16b, ABcd16a16b, ...).
bool HasChannelPadding(const memory::desc& desc) {
  const dnnl_memory_desc_t& md = desc.data;
  return md.ndims == 4 && md.data_type == dnnl_f32 && md.format_kind == dnnl_blocked &&
         md.padded_dims[1] != md.dims[1];
}

// Writes zeros into the padded channels [C, padded C) of such an activation at `data`, for
// every real (n, h, w). oneDNN's kernels compute the padding as sums of value x 0; an Inf
// makes that NaN, which the next convolution's zero weights for those channels would carry
// into every real channel (0 x NaN). PyTorch, which has no padding, gives the Inf.
void ZeroChannelPadding(const memory::desc& desc, void* data) {
  const dnnl_memory_desc_t& md = desc.data;
  const dnnl_blocking_desc_t& blocking = md.format_desc.blocking;
  // Each dim's index splits into an outer part (times the dim's stride) and one digit per
  // inner block; the innermost block varies fastest.
  int64_t block_factor[4] = {1, 1, 1, 1};
  for (int i = 0; i < blocking.inner_nblks; ++i)
    block_factor[blocking.inner_idxs[i]] *= blocking.inner_blks[i];
  auto offset = [&](const int64_t(&index)[4]) {
    int64_t at = md.offset0;
    for (int d = 0; d < 4; ++d) at += (index[d] / block_factor[d]) * blocking.strides[d];
    int64_t later[4] = {1, 1, 1, 1};
    int64_t inner_stride = 1;
    for (int i = blocking.inner_nblks - 1; i >= 0; --i) {
      const int d = blocking.inner_idxs[i];
      at += ((index[d] / later[d]) % blocking.inner_blks[i]) * inner_stride;
      later[d] *= blocking.inner_blks[i];
      inner_stride *= blocking.inner_blks[i];
    }
    return at;
  };
  float* values = static_cast<float*>(data);
  const int64_t batch = md.dims[0];
  const int64_t height = md.dims[2];
  const int64_t width = md.dims[3];
  const int64_t padded_channels = md.padded_dims[1] - md.dims[1];
  // A parallel region costs more than zeroing a small tensor.
  const bool parallel = batch * height * width * padded_channels >= (int64_t{1} << 16);
  if (blocking.inner_nblks == 1 && blocking.inner_idxs[0] == 1) {
    // nChw8c / nChw16c, the usual case: the padding of each pixel is one contiguous run at the
    // end of its last channel block.
    const int64_t block = blocking.inner_blks[0];
    const int64_t first = md.dims[1] % block;
    const int64_t last_block = md.dims[1] / block;
    float* base = values + md.offset0 + last_block * blocking.strides[1];
#pragma omp parallel for collapse(2) schedule(static) if (parallel)
    for (int64_t n = 0; n < batch; ++n) {
      for (int64_t h = 0; h < height; ++h) {
        float* row = base + n * blocking.strides[0] + h * blocking.strides[2];
        for (int64_t w = 0; w < width; ++w) {
          std::fill(row + w * blocking.strides[3] + first, row + w * blocking.strides[3] + block,
                    0.0f);
        }
      }
    }
    return;
  }
#pragma omp parallel for collapse(2) schedule(static) if (parallel)
  for (int64_t n = 0; n < batch; ++n) {
    for (int64_t h = 0; h < height; ++h) {
      for (int64_t w = 0; w < width; ++w) {
        for (int64_t c = md.dims[1]; c < md.padded_dims[1]; ++c)
          values[offset({n, c, h, w})] = 0.0f;
      }
    }
  }
}

dnnl::primitive_attr UserScratchpadAttr() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

}  // namespace

std::string PlanKey(const NetworkSpec& network, const std::vector<int64_t>& input_shape,
                    const PlanNeeds& needs) {
  std::string key = absl::StrCat(needs.training ? "T" : "I", needs.input_grad ? "1" : "0", "|");
  for (int64_t d : input_shape) absl::StrAppend(&key, d, ",");
  for (const LayerSpec& layer : network.layers) {
    absl::StrAppend(&key, "|", layer.name.size(), ":", layer.name, "=");
    if (const auto* c = std::get_if<Conv2dSpec>(&layer.op)) {
      absl::StrAppend(&key, "conv", c->in_channels, ",", c->out_channels, ",", c->kernel_h, ",",
                      c->kernel_w, ",", c->stride_h, ",", c->stride_w, ",", c->pad_top, ",",
                      c->pad_bottom, ",", c->pad_left, ",", c->pad_right, ",", c->dilation_h, ",",
                      c->dilation_w, ",", c->groups, ",", c->bias ? 1 : 0);
    } else {
      const auto& a = std::get<ActivationSpec>(layer.op);
      absl::StrAppend(&key, "act", static_cast<int>(a.kind), ",",
                      absl::StrFormat("%a", static_cast<double>(a.alpha)));
    }
  }
  for (const std::string& name : needs.parameter_grads) {
    absl::StrAppend(&key, "|g", name.size(), ":", name);
  }
  return key;
}

// Per-call buffers. Slots bound to caller tensors are re-pointed on every call; the others are
// allocated once, zero-filled (so blocked layouts start with zero channel padding) and reused.
struct Plan::Workspace {
  dnnl::stream stream;
  std::vector<memory> memories;  // one per slot
  std::vector<std::unordered_map<int, memory>> forward_args;
  std::vector<std::unordered_map<int, memory>> backward_args;
  std::vector<float> diff_output;  // dL/dy for the mse and sum objectives
};

// Assembles a Plan: slots, primitive descriptors and ops, in execution order.
class Plan::Builder {
 public:
  Builder(Plan* plan, const dnnl::engine& cpu) : plan_(plan), cpu_(cpu) {
    plan_->scratchpad_slot_ = AddSlot(memory::desc());
  }

  int AddSlot(const memory::desc& desc, Role role = Role::kNone, std::string parameter = "") {
    plan_->slots_.push_back(Slot{desc, role, std::move(parameter)});
    return static_cast<int>(plan_->slots_.size()) - 1;
  }

  const memory::desc& DescOf(int slot) const { return plan_->slots_[slot].desc; }
  Slot& SlotAt(int slot) { return plan_->slots_[slot]; }

  // Appends `primitive` to `ops`, recording how much scratchpad it needs.
  template <typename PrimitiveDesc>
  void AddOp(std::vector<Op>* ops, const PrimitiveDesc& pd, dnnl::primitive primitive,
             std::vector<std::pair<int, int>> args) {
    scratchpad_bytes_ = std::max(scratchpad_bytes_, pd.scratchpad_desc().get_size());
    args.emplace_back(DNNL_ARG_SCRATCHPAD, plan_->scratchpad_slot_);
    ops->push_back(Op{std::move(primitive), std::move(args), false, {}});
  }

  // Returns a slot holding `from`'s contents in layout `want`: `from` itself when the layouts
  // already agree, otherwise a new slot filled by a reorder appended to `ops`.
  int Convert(std::vector<Op>* ops, int from, const memory::desc& want) {
    if (DescOf(from) == want) return from;
    int to = AddSlot(want);
    ConvertInto(ops, from, to);
    return to;
  }

  void ConvertInto(std::vector<Op>* ops, int from, int to) {
    dnnl::reorder::primitive_desc pd(cpu_, DescOf(from), cpu_, DescOf(to), UserScratchpadAttr());
    AddOp(ops, pd, dnnl::reorder(pd), {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}});
  }

  void Finish() { SlotAt(plan_->scratchpad_slot_).desc = ScratchpadDesc(); }

 private:
  memory::desc ScratchpadDesc() const {
    return memory::desc({static_cast<memory::dim>(std::max<size_t>(scratchpad_bytes_, 1))},
                        DataType::u8, Tag::a);
  }

  Plan* plan_;
  dnnl::engine cpu_;
  size_t scratchpad_bytes_ = 0;
};

namespace {

// One forward step after fusion: a convolution (possibly with its following activation fused
// as a post-op) or a standalone activation.
struct Step {
  int first_layer = 0;
  const Conv2dSpec* conv = nullptr;
  std::string conv_name;
  const ActivationSpec* activation = nullptr;  // standalone, or fused into `conv`
  EltwiseAlgorithm eltwise;

  int src_slot = -1;  // the step's input, in the layout its forward primitive reads
  int dst_slot = -1;
  // Convolution only.
  int weights_user_slot = -1;
  int weights_slot = -1;
  int bias_slot = -1;
  dnnl::convolution_forward::primitive_desc conv_pd;
  memory::dims strides, dilates, padding_l, padding_r;
  // Activation only.
  dnnl::eltwise_forward::primitive_desc eltwise_pd;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Plan>> Plan::Create(
    const dnnl::engine& cpu, const NetworkSpec& network, const ValidatedNetwork& validated,
    const std::vector<int64_t>& input_shape, const PlanNeeds& needs, const EngineOptions& options) {
  std::unique_ptr<Plan> plan(new Plan());
  plan->budget_ = options.memory_budget;
  plan->cpu_ = cpu;
  plan->threads_ = ThreadsFor(network, validated, needs, options.threads_per_call);
  // oneDNN sizes its kernels' work split for the thread count in force at creation.
  ScopedOmpThreads threads(plan->threads_);
  try {
    Builder b(plan.get(), cpu);
    const dnnl::prop_kind prop =
        needs.training ? dnnl::prop_kind::forward_training : dnnl::prop_kind::forward_inference;

    // ---- Group layers into steps, fusing an activation into the convolution before it when
    // its backward pass can be computed from the fused output.
    std::vector<Step> steps;
    for (size_t i = 0; i < network.layers.size(); ++i) {
      const LayerSpec& layer = network.layers[i];
      Step step;
      step.first_layer = static_cast<int>(i);
      if (const auto* conv = std::get_if<Conv2dSpec>(&layer.op)) {
        step.conv = conv;
        step.conv_name = layer.name;
        if (i + 1 < network.layers.size()) {
          if (const auto* act = std::get_if<ActivationSpec>(&network.layers[i + 1].op)) {
            EltwiseAlgorithm alg = ToEltwise(*act);
            if (!needs.training || alg.backward_uses_dst) {
              step.activation = act;
              step.eltwise = alg;
              ++i;
            }
          }
        }
      } else {
        step.activation = &std::get<ActivationSpec>(layer.op);
        step.eltwise = ToEltwise(*step.activation);
      }
      steps.push_back(std::move(step));
    }

    // ---- Forward.
    int current = b.AddSlot(PlainDesc(input_shape), Role::kInput);
    std::vector<int64_t> shape = input_shape;
    for (Step& step : steps) {
      const size_t first_op = plan->forward_ops_.size();
      const std::vector<int64_t>& out_shape = validated.output_shapes[step.first_layer];
      if (step.conv != nullptr) {
        const Conv2dSpec& c = *step.conv;
        const std::vector<int64_t> weights_shape = OneDnnWeightsShape(c);
        step.strides = {c.stride_h, c.stride_w};
        step.dilates = {c.dilation_h - 1, c.dilation_w - 1};  // oneDNN: 0 = dense
        step.padding_l = {c.pad_top, c.pad_left};
        // oneDNN requires (in + pad_l + pad_r - span) / stride + 1 == out exactly; trailing
        // padding that no output reads is dropped (it may even go negative) so that the
        // primitive sees precisely PyTorch's output size.
        const int64_t span_h = c.dilation_h * (c.kernel_h - 1) + 1;
        const int64_t span_w = c.dilation_w * (c.kernel_w - 1) + 1;
        step.padding_r = {(out_shape[2] - 1) * c.stride_h + span_h - shape[2] - c.pad_top,
                          (out_shape[3] - 1) * c.stride_w + span_w - shape[3] - c.pad_left};
        const bool winograd = UseWinograd(c, options);
        const memory::desc bias_any = c.bias ? AnyDesc({c.out_channels}) : memory::desc();
        auto make_desc = [&](dnnl::algorithm algorithm) {
          return dnnl::convolution_forward::desc(
              prop, algorithm, AnyDesc(shape), AnyDesc(weights_shape), bias_any, AnyDesc(out_shape),
              step.strides, step.dilates, step.padding_l, step.padding_r);
        };
        dnnl::primitive_attr attr = UserScratchpadAttr();
        if (step.activation != nullptr) {
          dnnl::post_ops ops;
          ops.append_eltwise(1.0f, step.eltwise.forward, step.eltwise.alpha, step.eltwise.beta);
          attr.set_post_ops(ops);
        }
        step.conv_pd =
            CreateConvPd<dnnl::convolution_forward::primitive_desc>(make_desc, attr, cpu, winograd);

        step.src_slot = b.Convert(&plan->forward_ops_, current, step.conv_pd.src_desc());
        step.weights_user_slot =
            b.AddSlot(PlainDesc(weights_shape), Role::kParameter, step.conv_name + ".weight");
        step.weights_slot =
            b.Convert(&plan->forward_ops_, step.weights_user_slot, step.conv_pd.weights_desc());
        std::vector<std::pair<int, int>> args = {{DNNL_ARG_SRC, step.src_slot},
                                                 {DNNL_ARG_WEIGHTS, step.weights_slot}};
        if (c.bias) {
          const int bias_user =
              b.AddSlot(PlainDesc({c.out_channels}), Role::kParameter, step.conv_name + ".bias");
          step.bias_slot = b.Convert(&plan->forward_ops_, bias_user, step.conv_pd.bias_desc());
          args.emplace_back(DNNL_ARG_BIAS, step.bias_slot);
        }
        step.dst_slot = b.AddSlot(step.conv_pd.dst_desc());
        args.emplace_back(DNNL_ARG_DST, step.dst_slot);
        b.AddOp(&plan->forward_ops_, step.conv_pd, dnnl::convolution_forward(step.conv_pd),
                std::move(args));
      } else {
        dnnl::eltwise_forward::desc desc(prop, step.eltwise.forward, b.DescOf(current),
                                         step.eltwise.alpha, step.eltwise.beta);
        step.eltwise_pd = dnnl::eltwise_forward::primitive_desc(desc, UserScratchpadAttr(), cpu);
        step.src_slot = current;
        step.dst_slot = b.AddSlot(step.eltwise_pd.dst_desc());
        b.AddOp(&plan->forward_ops_, step.eltwise_pd, dnnl::eltwise_forward(step.eltwise_pd),
                {{DNNL_ARG_SRC, step.src_slot}, {DNNL_ARG_DST, step.dst_slot}});
      }
      // The caller's ContinueCheck runs before each layer, whichever op comes first in it.
      plan->forward_ops_[first_op].starts_layer = true;
      current = step.dst_slot;
      shape = out_shape;
    }
    // The network's output goes straight into the caller's tensor when the last primitive
    // already writes plain NCHW; otherwise one reorder at the edge.
    const memory::desc output_desc = PlainDesc(shape);
    if (b.DescOf(current) == output_desc) {
      b.SlotAt(current).role = Role::kOutput;
    } else {
      b.ConvertInto(&plan->forward_ops_, current, b.AddSlot(output_desc, Role::kOutput));
    }

    // ---- Backward.
    if (needs.training) {
      // lowest_needed: the earliest step whose gradients anyone wants; nothing below it runs.
      int lowest_needed = needs.input_grad ? 0 : static_cast<int>(steps.size());
      for (size_t k = 0; k < steps.size(); ++k) {
        const Step& s = steps[k];
        if (s.conv != nullptr && (needs.parameter_grads.count(s.conv_name + ".weight") > 0 ||
                                  needs.parameter_grads.count(s.conv_name + ".bias") > 0)) {
          lowest_needed = std::min(lowest_needed, static_cast<int>(k));
        }
      }
      plan->diff_output_slot_ = b.AddSlot(output_desc, Role::kDiffOutput);
      int diff = plan->diff_output_slot_;  // dL/d(output of step k)
      std::vector<size_t> layer_starts;    // index of each step's first backward op
      for (int k = static_cast<int>(steps.size()) - 1; k >= lowest_needed; --k) {
        Step& step = steps[k];
        const bool need_diff_src = needs.input_grad || k > lowest_needed;
        layer_starts.push_back(plan->backward_ops_.size());

        // Activation backward: standalone, or the fused one of a convolution.
        if (step.activation != nullptr && (step.conv != nullptr || need_diff_src)) {
          const int data_slot = step.eltwise.backward_uses_dst ? step.dst_slot : step.src_slot;
          const memory::desc& data_desc = b.DescOf(data_slot);
          dnnl::eltwise_forward::desc hint_desc(dnnl::prop_kind::forward_training,
                                                step.eltwise.backward, data_desc,
                                                step.eltwise.alpha, step.eltwise.beta);
          dnnl::eltwise_forward::primitive_desc hint(hint_desc, cpu);
          dnnl::eltwise_backward::desc desc(step.eltwise.backward, data_desc, data_desc,
                                            step.eltwise.alpha, step.eltwise.beta);
          dnnl::eltwise_backward::primitive_desc pd(desc, UserScratchpadAttr(), cpu, hint);
          const int diff_dst = b.Convert(&plan->backward_ops_, diff, pd.diff_dst_desc());
          const int diff_src = b.AddSlot(pd.diff_src_desc());
          b.AddOp(&plan->backward_ops_, pd, dnnl::eltwise_backward(pd),
                  {{DNNL_ARG_DIFF_DST, diff_dst},
                   {step.eltwise.backward_uses_dst ? DNNL_ARG_DST : DNNL_ARG_SRC, data_slot},
                   {DNNL_ARG_DIFF_SRC, diff_src}});
          diff = diff_src;
        }
        if (step.conv == nullptr) continue;

        const Conv2dSpec& c = *step.conv;
        const std::vector<int64_t> weights_shape = OneDnnWeightsShape(c);
        const std::vector<int64_t> in_shape(b.DescOf(step.src_slot).dims());
        const std::vector<int64_t> out_shape(step.conv_pd.dst_desc().dims());
        const std::string weight_name = step.conv_name + ".weight";
        const std::string bias_name = step.conv_name + ".bias";
        const bool want_weight = needs.parameter_grads.count(weight_name) > 0;
        const bool winograd = UseWinograd(c, options);
        const bool want_bias = c.bias && needs.parameter_grads.count(bias_name) > 0;

        if (want_bias && !want_weight) {
          // Only the bias gradient: a sum of dL/dy over N, H and W is all it takes.
          const memory::dims bias_dims = {1, c.out_channels, 1, 1};
          const int bias_grad_user = b.AddSlot(memory::desc(bias_dims, DataType::f32, Tag::abcd),
                                               Role::kParameterGrad, bias_name);
          if (b.DescOf(diff).dims() == bias_dims) {
            // N = OH = OW = 1: nothing to sum (oneDNN rejects such a reduction); dL/dy is it.
            b.ConvertInto(&plan->backward_ops_, diff, bias_grad_user);
          } else {
            dnnl::reduction::desc desc(dnnl::algorithm::reduction_sum, b.DescOf(diff),
                                       memory::desc(bias_dims, DataType::f32, Tag::any), 0.0f,
                                       0.0f);
            dnnl::reduction::primitive_desc pd(desc, UserScratchpadAttr(), cpu);
            const int bias_grad = b.DescOf(bias_grad_user) == pd.dst_desc()
                                      ? bias_grad_user
                                      : b.AddSlot(pd.dst_desc());
            b.AddOp(&plan->backward_ops_, pd, dnnl::reduction(pd),
                    {{DNNL_ARG_SRC, diff}, {DNNL_ARG_DST, bias_grad}});
            if (bias_grad != bias_grad_user) {
              b.ConvertInto(&plan->backward_ops_, bias_grad, bias_grad_user);
            }
          }
        } else if (want_weight || want_bias) {
          auto make_desc = [&](dnnl::algorithm algorithm) {
            return dnnl::convolution_backward_weights::desc(
                algorithm, AnyDesc(in_shape), AnyDesc(weights_shape),
                c.bias ? AnyDesc({c.out_channels}) : memory::desc(), AnyDesc(out_shape),
                step.strides, step.dilates, step.padding_l, step.padding_r);
          };
          const auto pd = CreateConvPd<dnnl::convolution_backward_weights::primitive_desc>(
              make_desc, UserScratchpadAttr(), cpu, winograd, step.conv_pd);
          const int src = b.Convert(&plan->backward_ops_, step.src_slot, pd.src_desc());
          const int diff_dst = b.Convert(&plan->backward_ops_, diff, pd.diff_dst_desc());

          // Gradients land directly in the caller's tensors when the layouts agree.
          const int weight_grad_user =
              want_weight ? b.AddSlot(PlainDesc(weights_shape), Role::kParameterGrad, weight_name)
                          : -1;
          const int weight_grad =
              (weight_grad_user >= 0 && b.DescOf(weight_grad_user) == pd.diff_weights_desc())
                  ? weight_grad_user
                  : b.AddSlot(pd.diff_weights_desc());
          std::vector<std::pair<int, int>> args = {{DNNL_ARG_SRC, src},
                                                   {DNNL_ARG_DIFF_DST, diff_dst},
                                                   {DNNL_ARG_DIFF_WEIGHTS, weight_grad}};
          int bias_grad = -1;
          int bias_grad_user = -1;
          if (c.bias) {
            bias_grad_user =
                want_bias ? b.AddSlot(PlainDesc({c.out_channels}), Role::kParameterGrad, bias_name)
                          : -1;
            bias_grad = (bias_grad_user >= 0 && b.DescOf(bias_grad_user) == pd.diff_bias_desc())
                            ? bias_grad_user
                            : b.AddSlot(pd.diff_bias_desc());
            args.emplace_back(DNNL_ARG_DIFF_BIAS, bias_grad);
          }
          b.AddOp(&plan->backward_ops_, pd, dnnl::convolution_backward_weights(pd),
                  std::move(args));
          if (weight_grad_user >= 0 && weight_grad != weight_grad_user) {
            b.ConvertInto(&plan->backward_ops_, weight_grad, weight_grad_user);
          }
          if (bias_grad_user >= 0 && bias_grad != bias_grad_user) {
            b.ConvertInto(&plan->backward_ops_, bias_grad, bias_grad_user);
          }
        }

        if (need_diff_src) {
          auto make_desc = [&](dnnl::algorithm algorithm) {
            return dnnl::convolution_backward_data::desc(
                algorithm, AnyDesc(in_shape), AnyDesc(weights_shape), AnyDesc(out_shape),
                step.strides, step.dilates, step.padding_l, step.padding_r);
          };
          const auto pd = CreateConvPd<dnnl::convolution_backward_data::primitive_desc>(
              make_desc, UserScratchpadAttr(), cpu, winograd, step.conv_pd);
          // Reuse the weights the forward pass already reordered when the layouts agree.
          const int weights =
              b.DescOf(step.weights_slot) == pd.weights_desc()
                  ? step.weights_slot
                  : b.Convert(&plan->backward_ops_, step.weights_user_slot, pd.weights_desc());
          const int diff_dst = b.Convert(&plan->backward_ops_, diff, pd.diff_dst_desc());
          const int diff_src = b.AddSlot(pd.diff_src_desc());
          b.AddOp(&plan->backward_ops_, pd, dnnl::convolution_backward_data(pd),
                  {{DNNL_ARG_DIFF_DST, diff_dst},
                   {DNNL_ARG_WEIGHTS, weights},
                   {DNNL_ARG_DIFF_SRC, diff_src}});
          diff = diff_src;
        }
      }
      // The caller's ContinueCheck runs before each layer's backward pass.
      for (size_t start : layer_starts) {
        if (start < plan->backward_ops_.size()) plan->backward_ops_[start].starts_layer = true;
      }
      if (needs.input_grad) {
        const memory::desc input_desc = PlainDesc(input_shape);
        if (b.DescOf(diff) == input_desc && b.SlotAt(diff).role == Role::kNone) {
          b.SlotAt(diff).role = Role::kInputGrad;
        } else {
          const int input_grad = b.AddSlot(input_desc, Role::kInputGrad);
          b.ConvertInto(&plan->backward_ops_, diff, input_grad);
        }
      }
    }
    b.Finish();
  } catch (const dnnl::error& e) {
    if (e.status == dnnl_out_of_memory) {
      return absl::ResourceExhaustedError("out of memory while compiling the network");
    }
    return absl::InternalError(absl::StrCat("oneDNN could not compile the network: ", e.what()));
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError("out of memory while compiling the network");
  }
  // Each call's workspace holds every intermediate activation and gradient; refuse plans whose
  // workspace alone would exceed the limit instead of letting a call exhaust the machine.
  size_t workspace_bytes = 0;
  for (const Slot& slot : plan->slots_) {
    if (slot.role == Role::kNone) workspace_bytes += slot.desc.get_size();
  }
  if (plan->diff_output_slot_ >= 0) {
    workspace_bytes += plan->slots_[plan->diff_output_slot_].desc.get_size();
  }
  if (workspace_bytes > static_cast<size_t>(options.max_workspace_bytes)) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the network needs ", workspace_bytes,
                     " bytes of intermediate buffers per call, over "
                     "the limit of ",
                     options.max_workspace_bytes, " (EngineOptions::max_workspace_bytes)"));
  }
  // Padded activations that a convolution multiplies by its weights' zero padding: the source
  // of a forward convolution and the gradient a backward-data convolution reads. (Backward
  // weights only fill the padding of the weight gradient, which is dropped.)
  std::set<int> multiplied;
  for (const std::vector<Op>* ops : {&plan->forward_ops_, &plan->backward_ops_}) {
    for (const Op& op : *ops) {
      bool weights = false;
      bool diff_weights = false;
      for (const auto& [arg, slot] : op.args) {
        weights |= arg == DNNL_ARG_WEIGHTS;
        diff_weights |= arg == DNNL_ARG_DIFF_WEIGHTS;
      }
      if (!weights || diff_weights) continue;
      for (const auto& [arg, slot] : op.args) {
        if (arg == DNNL_ARG_SRC || arg == DNNL_ARG_DIFF_DST) multiplied.insert(slot);
      }
    }
  }
  for (std::vector<Op>* ops : {&plan->forward_ops_, &plan->backward_ops_}) {
    for (Op& op : *ops) {
      for (const auto& [arg, slot] : op.args) {
        if ((arg == DNNL_ARG_DST || arg == DNNL_ARG_DIFF_SRC) && multiplied.count(slot) > 0 &&
            plan->slots_[slot].role == Role::kNone && HasChannelPadding(plan->slots_[slot].desc)) {
          op.zero_padding_after.push_back(slot);
        }
      }
    }
  }
  plan->workspace_bytes_ = static_cast<int64_t>(workspace_bytes);
  plan->structure_bytes_ =
      static_cast<int64_t>(plan->forward_ops_.size() + plan->backward_ops_.size()) *
          kStructureBytesPerOp +
      static_cast<int64_t>(plan->slots_.size()) * kStructureBytesPerSlot;
  return plan;
}

Plan::~Plan() {
  absl::MutexLock lock(&pool_mu_);
  // A plan that failed to compile has no pool.
  if (!pool_.empty()) budget_->Uncache(static_cast<int64_t>(pool_.size()) * workspace_bytes_);
}

Plan::WorkspaceLease::WorkspaceLease() = default;
Plan::WorkspaceLease::WorkspaceLease(WorkspaceLease&&) noexcept = default;
Plan::WorkspaceLease& Plan::WorkspaceLease::operator=(WorkspaceLease&&) noexcept = default;
Plan::WorkspaceLease::~WorkspaceLease() = default;

absl::StatusOr<Plan::WorkspaceLease> Plan::LeaseWorkspace(int64_t extra_bytes,
                                                          const ContinueCheck& should_continue,
                                                          MemoryBudget::Reservation* extra) {
  WorkspaceLease lease;
  {
    absl::MutexLock lock(&pool_mu_);
    if (!pool_.empty()) {
      lease.workspace_ = std::move(pool_.back());
      pool_.pop_back();
      lease.reservation_ = budget_->ClaimCached(workspace_bytes_);
    }
  }
  if (lease.workspace_ != nullptr) {
    absl::StatusOr<MemoryBudget::Reservation> results =
        budget_->TryReserve(extra_bytes, "its results");
    if (results.ok()) {
      *extra = *std::move(results);
      return lease;
    }
    // No room for the results now: waiting while holding the idle workspace could keep every
    // such call waiting for the others. Give it back (it stays cached, and may be reclaimed)
    // and wait for both at once like a call that found none.
    ReleaseWorkspace(std::move(lease));
    lease = WorkspaceLease();
  }
  absl::StatusOr<MemoryBudget::Reservation> reserved = budget_->Reserve(
      workspace_bytes_ + extra_bytes, "its intermediate buffers and results", should_continue);
  if (!reserved.ok()) return reserved.status();
  *extra = reserved->Split(extra_bytes);
  lease.reservation_ = *std::move(reserved);
  return lease;
}

std::unique_ptr<Plan::Workspace> Plan::NewWorkspace() const {
  auto workspace = std::make_unique<Workspace>();
  workspace->stream = dnnl::stream(cpu_);
  workspace->memories.reserve(slots_.size());
  for (const Slot& slot : slots_) {
    if (slot.role == Role::kNone) {
      memory m(slot.desc, cpu_);
      std::memset(m.get_data_handle(), 0, slot.desc.get_size());
      workspace->memories.push_back(std::move(m));
    } else {
      workspace->memories.push_back(memory(slot.desc, cpu_, static_cast<void*>(nullptr)));
    }
  }
  auto make_args = [&](const std::vector<Op>& ops,
                       std::vector<std::unordered_map<int, memory>>* out) {
    for (const Op& op : ops) {
      std::unordered_map<int, memory> args;
      for (const auto& [arg, slot] : op.args) args.emplace(arg, workspace->memories[slot]);
      out->push_back(std::move(args));
    }
  };
  make_args(forward_ops_, &workspace->forward_args);
  make_args(backward_ops_, &workspace->backward_args);
  if (diff_output_slot_ >= 0) {
    workspace->diff_output.resize(slots_[diff_output_slot_].desc.get_size() / sizeof(float));
  }
  return workspace;
}

void Plan::ReleaseWorkspace(WorkspaceLease lease) {
  if (lease.workspace_ == nullptr) return;
  // Its reservation becomes cached memory, which the engine's cache bound and the budget's
  // reclaimer may take back.
  budget_->CacheReservation(std::move(lease.reservation_));
  absl::MutexLock lock(&pool_mu_);
  pool_.push_back(std::move(lease.workspace_));
}

int64_t Plan::ReleaseIdleWorkspaces() {
  std::vector<std::unique_ptr<Workspace>> idle;
  {
    absl::MutexLock lock(&pool_mu_);
    idle.swap(pool_);
  }
  const int64_t bytes = static_cast<int64_t>(idle.size()) * workspace_bytes_;
  idle.clear();  // frees the memory before the budget hears it is free
  budget_->Uncache(bytes);
  return bytes;
}

int64_t Plan::idle_bytes() const {
  absl::MutexLock lock(&pool_mu_);
  return static_cast<int64_t>(pool_.size()) * workspace_bytes_;
}

void Plan::Bind(const PlanBindings& bindings, Workspace& workspace) {
  for (size_t i = 0; i < slots_.size(); ++i) {
    const Slot& slot = slots_[i];
    void* handle = nullptr;
    switch (slot.role) {
      case Role::kNone:
        continue;
      case Role::kInput:
        // oneDNN takes non-const handles; inputs are only ever read.
        handle = const_cast<float*>(bindings.input.data);
        break;
      case Role::kOutput:
        handle = bindings.output->data.data();
        break;
      case Role::kDiffOutput:
        handle = bindings.objective->kind == ObjectiveKind::kGradOutput
                     ? const_cast<float*>(bindings.objective->tensor.data)
                     : workspace.diff_output.data();
        break;
      case Role::kInputGrad:
        handle = bindings.input_grad->data.data();
        break;
      case Role::kParameter:
        handle = const_cast<float*>(bindings.parameters->at(slot.parameter).data);
        break;
      case Role::kParameterGrad:
        handle = bindings.parameter_grads->at(slot.parameter).data.data();
        break;
    }
    workspace.memories[i].set_data_handle(handle);
  }
}

absl::Status Plan::RunOps(const std::vector<Op>& ops, Workspace& workspace,
                          const ContinueCheck& should_continue) {
  std::vector<std::unordered_map<int, memory>>& args =
      &ops == &forward_ops_ ? workspace.forward_args : workspace.backward_args;
  for (size_t i = 0; i < ops.size(); ++i) {
    if (ops[i].starts_layer && should_continue) {
      if (absl::Status status = should_continue(); !status.ok()) return status;
    }
    ops[i].primitive.execute(workspace.stream, args[i]);
    for (int slot : ops[i].zero_padding_after) {
      ZeroChannelPadding(slots_[slot].desc, workspace.memories[slot].get_data_handle());
    }
  }
  workspace.stream.wait();
  return absl::OkStatus();
}

void Plan::ApplyObjective(const PlanBindings& bindings, Workspace& workspace) {
  const float* y = bindings.output->data.data();
  const int64_t n = bindings.output->num_elements();
  float* grad = workspace.diff_output.data();
  double loss = 0.0;
  switch (bindings.objective->kind) {
    case ObjectiveKind::kMse: {
      // d/dy mean((y - t)^2) = 2 (y - t) / n, as autograd computes it in float32.
      const float* target = bindings.objective->tensor.data;
      const float scale = 2.0f / static_cast<float>(n);
#pragma omp parallel for simd reduction(+ : loss) schedule(static)
      for (int64_t i = 0; i < n; ++i) {
        const float d = y[i] - target[i];
        loss += static_cast<double>(d) * static_cast<double>(d);
        grad[i] = scale * d;
      }
      *bindings.loss = loss / static_cast<double>(n);
      break;
    }
    case ObjectiveKind::kSum: {
#pragma omp parallel for simd reduction(+ : loss) schedule(static)
      for (int64_t i = 0; i < n; ++i) {
        loss += static_cast<double>(y[i]);
        grad[i] = 1.0f;
      }
      *bindings.loss = loss;
      break;
    }
    case ObjectiveKind::kGradOutput:
      // dL/dy is the caller's tensor, bound directly; there is no loss.
      bindings.loss->reset();
      break;
  }
}

absl::Status Plan::Execute(const PlanBindings& bindings, const ContinueCheck& should_continue,
                           WorkspaceLease lease) {
  ScopedOmpThreads threads(threads_);
  absl::Status status;
  try {
    if (lease.workspace_ == nullptr) lease.workspace_ = NewWorkspace();
    Workspace& workspace = *lease.workspace_;
    Bind(bindings, workspace);
    status = RunOps(forward_ops_, workspace, should_continue);
    if (status.ok() && bindings.objective != nullptr) ApplyObjective(bindings, workspace);
    if (bindings.forward_done != nullptr) {
      *bindings.forward_done = std::chrono::steady_clock::now();
    }
    if (status.ok() && bindings.objective != nullptr) {
      status = RunOps(backward_ops_, workspace, should_continue);
    }
  } catch (const dnnl::error& e) {
    status = e.status == dnnl_out_of_memory
                 ? absl::ResourceExhaustedError("out of memory while executing the network")
                 : absl::InternalError(absl::StrCat("oneDNN failed while executing: ", e.what()));
  } catch (const std::bad_alloc&) {
    status = absl::ResourceExhaustedError("out of memory while executing the network");
  }
  ReleaseWorkspace(std::move(lease));
  return status;
}

}  // namespace gradengine
