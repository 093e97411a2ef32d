#include "engine/plan.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>
#include <unordered_map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/layers/layer_kind.h"
#include "engine/layers/lowering.h"

namespace gradengine {
namespace {

using dnnl::memory;
using Tag = memory::format_tag;
using DataType = memory::data_type;

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

// The arithmetic of one call: each layer's forward pass (LayerKind::Flops), three times over
// in training (forward, and up to two backward passes).
int ThreadsFor(const NetworkSpec& network, const ValidatedNetwork& validated,
               const std::vector<int64_t>& input_shape, const PlanNeeds& needs, int max_threads) {
  const double passes = needs.training ? 3.0 : 1.0;
  double flops = 0.0;
  for (size_t i = 0; i < network.layers.size(); ++i) {
    const int source = validated.input_sources[i];
    const std::vector<int64_t>& in = source < 0 ? input_shape : validated.output_shapes[source];
    flops += passes * VisitLayer(network.layers[i].op, [&](auto kind, const auto& spec) {
               return kind.Flops(spec, in, validated.output_shapes[i]);
             });
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

// F.cross_entropy(logits, labels, ignore_index, label_smoothing) with mean reduction, and its
// gradient into `grad` (shaped like the logits). Logits are [N, C] or [N, C, H, W] (C-order);
// each of the N*H*W positions is one sample. Per sample, with log-softmax p (computed after
// subtracting the largest logit) and smoothing e: loss = -(1-e) p[label] - e/C sum_c p[c],
// d/dlogit_c = softmax_c - (1-e) [c = label] - e/C. The mean is over samples not ignored.
double CrossEntropy(const Objective& objective, const std::vector<int64_t>& shape,
                    const float* logits, float* grad) {
  const int64_t batch = shape[0];
  const int64_t classes = shape[1];
  const int64_t pixels = shape.size() == 4 ? shape[2] * shape[3] : 1;
  const int64_t samples = batch * pixels;
  const double smoothing = objective.label_smoothing;
  int64_t counted = 0;
  for (int64_t s = 0; s < samples; ++s)
    counted += objective.labels.data[s] != objective.ignore_index;
  const double scale = 1.0 / static_cast<double>(counted);  // Inf (then NaN loss) if none
  double loss = 0.0;
#pragma omp parallel for reduction(+ : loss) schedule(static) if (samples * classes >= 65536)
  for (int64_t s = 0; s < samples; ++s) {
    const int64_t n = s / pixels;
    const int64_t pixel = s % pixels;
    const float* x = logits + n * classes * pixels + pixel;
    float* g = grad + n * classes * pixels + pixel;
    const int64_t label = objective.labels.data[s];
    if (label == objective.ignore_index) {
      for (int64_t c = 0; c < classes; ++c) g[c * pixels] = 0.0f;
      continue;
    }
    double largest = -std::numeric_limits<double>::infinity();
    for (int64_t c = 0; c < classes; ++c) largest = std::max(largest, double{x[c * pixels]});
    double total = 0.0;
    for (int64_t c = 0; c < classes; ++c) total += std::exp(double{x[c * pixels]} - largest);
    const double log_total = std::log(total) + largest;
    double sample_loss = -(1.0 - smoothing) * (double{x[label * pixels]} - log_total);
    double sum_log_p = 0.0;
    for (int64_t c = 0; c < classes; ++c) {
      const double log_p = double{x[c * pixels]} - log_total;
      sum_log_p += log_p;
      const double target =
          (c == label ? 1.0 - smoothing : 0.0) + smoothing / static_cast<double>(classes);
      g[c * pixels] = static_cast<float>((std::exp(log_p) - target) * scale);
    }
    sample_loss -= smoothing / static_cast<double>(classes) * sum_log_p;
    loss += sample_loss;
  }
  return loss * scale;
}

}  // namespace

std::string PlanKey(const NetworkSpec& network, const std::vector<int64_t>& input_shape,
                    const PlanNeeds& needs) {
  std::string key = absl::StrCat(needs.training ? "T" : "I", needs.input_grad ? "1" : "0", "|");
  for (int64_t d : input_shape) absl::StrAppend(&key, d, ",");
  for (const LayerSpec& layer : network.layers) {
    absl::StrAppend(&key, "|", layer.name.size(), ":", layer.name, "<", layer.input.size(), ":",
                    layer.input, "=");
    VisitLayer(layer.op, [&](auto kind, const auto& spec) {
      absl::StrAppend(&key, kind.kName, ":");
      kind.AppendKey(spec, &key);
    });
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
  std::vector<float> diff_output;  // dL/dy for the mse, sum and cross_entropy objectives
};

namespace {

// One LoweredLayer and the layers it covers: one, or a layer and the next one it fused.
struct Unit {
  int first = 0;
  int last = 0;
  std::unique_ptr<LoweredLayer> lowered;
};

struct ForwardPass {
  std::vector<Unit> units;
  std::vector<int> unit_of;  // by layer
  memory::desc output_desc;  // the network's output, plain
};

// Appends every layer's forward primitives and binds the output to the caller's tensor.
ForwardPass LowerForwardPass(PlanBuilder& b, const NetworkSpec& network,
                             const ValidatedNetwork& validated,
                             const std::vector<int64_t>& input_shape) {
  const int layers = static_cast<int>(network.layers.size());
  // How many layers read each layer's output: a lowering may fuse the next layer only when
  // that layer is the only reader.
  std::vector<int> readers(layers, 0);
  for (int i = 0; i < layers; ++i) {
    if (validated.input_sources[i] >= 0) ++readers[validated.input_sources[i]];
    if (validated.add_sources[i] >= 0) ++readers[validated.add_sources[i]];
  }
  ForwardPass pass;
  pass.unit_of.assign(layers, -1);
  const int input_slot = b.AddSlot(PlainDesc(input_shape), Plan::Role::kInput);
  std::vector<int> output_slot(layers, -1);
  auto slot_of = [&](int source) { return source < 0 ? input_slot : output_slot[source]; };
  for (int i = 0; i < layers;) {
    ForwardContext context;
    context.layer = &network.layers[i];
    const int source = validated.input_sources[i];
    context.src = slot_of(source);
    context.in_shape = source < 0 ? input_shape : validated.output_shapes[source];
    context.out_shape = validated.output_shapes[i];
    if (std::holds_alternative<AddSpec>(context.layer->op)) {
      context.other = slot_of(validated.add_sources[i]);
    }
    if (i + 1 < layers && validated.input_sources[i + 1] == i && readers[i] == 1 &&
        !std::holds_alternative<AddSpec>(network.layers[i + 1].op)) {
      context.fusable_next = &network.layers[i + 1];
    }
    const size_t first_op = b.forward_ops()->size();
    Unit unit;
    unit.first = i;
    unit.lowered = LowerForward(b, context);
    unit.last = unit.lowered->fused_next ? i + 1 : i;
    // The caller's ContinueCheck runs before each layer, whichever op comes first in it.
    if (first_op < b.forward_ops()->size()) (*b.forward_ops())[first_op].starts_layer = true;
    output_slot[unit.last] = unit.lowered->dst;
    for (int k = unit.first; k <= unit.last; ++k) {
      pass.unit_of[k] = static_cast<int>(pass.units.size());
    }
    i = unit.last + 1;
    pass.units.push_back(std::move(unit));
  }
  // The network's output goes straight into the caller's tensor when the last primitive
  // already writes it plain; otherwise one reorder at the edge. (The input itself is never
  // the output: every layer writes a slot of its own.)
  pass.output_desc = PlainDesc(validated.output_shapes.back());
  b.BindToCaller(b.forward_ops(), output_slot[layers - 1], pass.output_desc, Plan::Role::kOutput);
  return pass;
}

// Appends the backward primitives, in reverse, of the units whose gradients anyone wants,
// starting from dL/d(output) in `diff_output`.
void LowerBackwardPass(PlanBuilder& b, const NetworkSpec& network,
                       const ValidatedNetwork& validated, const std::vector<int64_t>& input_shape,
                       const ForwardPass& pass, int diff_output) {
  const PlanNeeds& needs = b.needs();
  const std::vector<Unit>& units = pass.units;
  // needed[u]: whether unit u's backward pass runs: it has a wanted parameter gradient, or what
  // it reads needs dL/d(it).
  std::vector<bool> needed(units.size(), false);
  auto wants_diff = [&](int source) {
    return source < 0 ? needs.input_grad : static_cast<bool>(needed[pass.unit_of[source]]);
  };
  auto is_add = [&](const Unit& unit) {
    return std::holds_alternative<AddSpec>(network.layers[unit.first].op);
  };
  for (size_t u = 0; u < units.size(); ++u) {
    bool own = false;
    for (int k = units[u].first; k <= units[u].last; ++k) {
      for (const ParameterInfo& parameter : LayerParameters(network.layers[k])) {
        own |= b.WantsGrad(parameter.name);
      }
    }
    const int first = units[u].first;
    needed[u] = own || wants_diff(validated.input_sources[first]) ||
                (is_add(units[u]) && wants_diff(validated.add_sources[first]));
  }
  // dL/d(output of layer k), accumulated as the layers that read it are differentiated.
  std::vector<int> diff(network.layers.size(), -1);
  int diff_input = -1;
  diff.back() = diff_output;
  auto deliver = [&](int source, int slot) {
    int& target = source < 0 ? diff_input : diff[source];
    target = target < 0 ? slot : b.Accumulate(b.backward_ops(), target, slot);
  };
  for (int u = static_cast<int>(units.size()) - 1; u >= 0; --u) {
    if (!needed[u]) continue;
    const Unit& unit = units[u];
    const int source = validated.input_sources[unit.first];
    const int other = validated.add_sources[unit.first];
    BackwardContext context;
    context.diff_dst = diff[unit.last];
    context.want_diff_src = wants_diff(source);
    context.want_diff_other = is_add(unit) && wants_diff(other);
    const size_t first_op = b.backward_ops()->size();
    BackwardResult result;
    unit.lowered->Backward(b, context, &result);
    // The caller's ContinueCheck runs before each layer's backward pass.
    if (first_op < b.backward_ops()->size()) (*b.backward_ops())[first_op].starts_layer = true;
    if (context.want_diff_src) deliver(source, result.diff_src);
    if (context.want_diff_other) deliver(other, result.diff_other);
  }
  if (needs.input_grad) {
    b.BindToCaller(b.backward_ops(), diff_input, PlainDesc(input_shape), Plan::Role::kInputGrad);
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<Plan>> Plan::Create(
    const dnnl::engine& cpu, const NetworkSpec& network, const ValidatedNetwork& validated,
    const std::vector<int64_t>& input_shape, const PlanNeeds& needs, const EngineOptions& options) {
  std::unique_ptr<Plan> plan(new Plan());
  plan->budget_ = options.memory_budget;
  plan->cpu_ = cpu;
  plan->threads_ = ThreadsFor(network, validated, input_shape, needs, options.threads_per_call);
  // oneDNN sizes its kernels' work split for the thread count in force at creation.
  ScopedOmpThreads threads(plan->threads_);
  try {
    PlanBuilder b(plan.get(), cpu, needs, options);
    const ForwardPass pass = LowerForwardPass(b, network, validated, input_shape);
    if (needs.training) {
      plan->diff_output_slot_ = b.AddSlot(pass.output_desc, Role::kDiffOutput);
      LowerBackwardPass(b, network, validated, input_shape, pass, plan->diff_output_slot_);
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
  plan->ZeroPaddingWhereMultiplied();
  plan->workspace_bytes_ = static_cast<int64_t>(workspace_bytes);
  plan->structure_bytes_ =
      static_cast<int64_t>(plan->forward_ops_.size() + plan->backward_ops_.size()) *
          kStructureBytesPerOp +
      static_cast<int64_t>(plan->slots_.size()) * kStructureBytesPerSlot;
  return plan;
}

void Plan::ZeroPaddingWhereMultiplied() {
  // Padded activations that a convolution or inner product multiplies by its weights' zero
  // padding: the source of a forward pass and the gradient a backward-data pass reads.
  // (Backward weights only fill the padding of the weight gradient, which is dropped.)
  std::set<int> multiplied;
  for (const std::vector<Op>* ops : {&forward_ops_, &backward_ops_}) {
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
  for (std::vector<Op>* ops : {&forward_ops_, &backward_ops_}) {
    for (Op& op : *ops) {
      for (const auto& [arg, slot] : op.args) {
        if ((arg == DNNL_ARG_DST || arg == DNNL_ARG_DIFF_SRC) && multiplied.count(slot) > 0 &&
            slots_[slot].role == Role::kNone && HasChannelPadding(slots_[slot].desc)) {
          op.zero_padding_after.push_back(slot);
        }
      }
    }
  }
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
    if (slot.role == Role::kConstant) {
      workspace->memories.push_back(
          memory(slot.desc, cpu_, const_cast<float*>(constants_[slot.constant].data())));
    } else if (slot.role == Role::kNone) {
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
      // A host op reads its slots' handles when it runs.
      if (!op.host) {
        for (const auto& [arg, slot] : op.args) args.emplace(arg, workspace->memories[slot]);
      }
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
      case Role::kConstant:
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
      case Role::kRunningStat:
        handle = bindings.running_stats->at(slot.parameter).data.data();
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
    if (ops[i].host) {
      workspace.stream.wait();
      std::vector<void*> buffers;
      buffers.reserve(ops[i].args.size());
      for (const auto& [arg, slot] : ops[i].args) {
        buffers.push_back(workspace.memories[slot].get_data_handle());
      }
      ops[i].host(buffers);
      continue;
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
    case ObjectiveKind::kCrossEntropy:
      *bindings.loss = CrossEntropy(*bindings.objective, bindings.output->shape, y, grad);
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
