#include "engine/layers/lowering.h"

#include <algorithm>
#include <utility>

namespace gradengine {

using dnnl::memory;
using Tag = memory::format_tag;
using DataType = memory::data_type;

memory::desc PlainDesc(const std::vector<int64_t>& shape) {
  Tag tag = Tag::undef;
  switch (shape.size()) {
    case 1:
      tag = Tag::a;
      break;
    case 2:
      tag = Tag::ab;
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

dnnl::primitive_attr UserScratchpadAttr() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

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

std::optional<EltwiseAlgorithm> FusableActivation(const LayerSpec* next, bool training) {
  if (next == nullptr) return std::nullopt;
  const auto* activation = std::get_if<ActivationSpec>(&next->op);
  if (activation == nullptr) return std::nullopt;
  EltwiseAlgorithm alg = ToEltwise(*activation);
  if (training && !alg.backward_uses_dst) return std::nullopt;
  return alg;
}

int AppendEltwiseBackward(PlanBuilder& b, const EltwiseAlgorithm& alg, int data, int diff) {
  const memory::desc data_desc = b.DescOf(data);
  dnnl::eltwise_forward::desc hint_desc(dnnl::prop_kind::forward_training, alg.backward, data_desc,
                                        alg.alpha, alg.beta);
  dnnl::eltwise_forward::primitive_desc hint(hint_desc, b.cpu());
  dnnl::eltwise_backward::desc desc(alg.backward, data_desc, data_desc, alg.alpha, alg.beta);
  dnnl::eltwise_backward::primitive_desc pd(desc, UserScratchpadAttr(), b.cpu(), hint);
  const int diff_dst = b.Convert(b.backward_ops(), diff, pd.diff_dst_desc());
  const int diff_src = b.AddSlot(pd.diff_src_desc());
  b.AddOp(b.backward_ops(), pd, dnnl::eltwise_backward(pd),
          {{DNNL_ARG_DIFF_DST, diff_dst},
           {alg.backward_uses_dst ? DNNL_ARG_DST : DNNL_ARG_SRC, data},
           {DNNL_ARG_DIFF_SRC, diff_src}});
  return diff_src;
}

PlanBuilder::PlanBuilder(Plan* plan, const dnnl::engine& cpu, const PlanNeeds& needs,
                         const EngineOptions& options)
    : plan_(plan), cpu_(cpu), needs_(needs), options_(options) {
  plan_->scratchpad_slot_ = AddSlot(memory::desc());
}

int PlanBuilder::AddSlot(const memory::desc& desc, Plan::Role role, std::string parameter) {
  plan_->slots_.push_back(Plan::Slot{desc, role, std::move(parameter)});
  return static_cast<int>(plan_->slots_.size()) - 1;
}

int PlanBuilder::AddConstant(const memory::desc& desc, std::vector<float> values) {
  const int slot = AddSlot(desc, Plan::Role::kConstant);
  plan_->slots_[slot].constant = static_cast<int>(plan_->constants_.size());
  plan_->constants_.push_back(std::move(values));
  return slot;
}

memory::desc PlanBuilder::DescOf(int slot) const { return plan_->slots_[slot].desc; }

Plan::Slot& PlanBuilder::SlotAt(int slot) { return plan_->slots_[slot]; }

void PlanBuilder::AddHostOp(std::vector<Plan::Op>* ops, Plan::HostFunction function,
                            std::vector<int> slots) {
  Plan::Op op;
  for (int slot : slots) op.args.emplace_back(0, slot);
  op.host = std::move(function);
  ops->push_back(std::move(op));
}

int PlanBuilder::Convert(std::vector<Plan::Op>* ops, int from, const memory::desc& want) {
  if (DescOf(from) == want) return from;
  int original = from;
  for (const auto& [copy, source] : converted_) {
    if (copy == from) original = source;
  }
  if (DescOf(original) == want) return original;
  for (const auto& [copy, source] : converted_) {
    if (source == original && DescOf(copy) == want) return copy;
  }
  int to = AddSlot(want);
  ConvertInto(ops, original, to);
  converted_.emplace_back(to, original);
  return to;
}

void PlanBuilder::ConvertInto(std::vector<Plan::Op>* ops, int from, int to) {
  dnnl::reorder::primitive_desc pd(cpu_, DescOf(from), cpu_, DescOf(to), UserScratchpadAttr());
  AddOp(ops, pd, dnnl::reorder(pd), {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}});
}

void PlanBuilder::BindToCaller(std::vector<Plan::Op>* ops, int slot, const memory::desc& plain,
                               Plan::Role role) {
  if (DescOf(slot) == plain && SlotAt(slot).role == Plan::Role::kNone) {
    SlotAt(slot).role = role;
  } else {
    ConvertInto(ops, slot, AddSlot(plain, role));
  }
}

int PlanBuilder::Accumulate(std::vector<Plan::Op>* ops, int a, int b) {
  const memory::desc desc = DescOf(a);
  dnnl::sum::primitive_desc pd(desc, {1.0f, 1.0f}, {desc, DescOf(b)}, cpu_, UserScratchpadAttr());
  const int sum = AddSlot(pd.dst_desc());
  AddOp(ops, pd, dnnl::sum(pd),
        {{DNNL_ARG_MULTIPLE_SRC, a}, {DNNL_ARG_MULTIPLE_SRC + 1, b}, {DNNL_ARG_DST, sum}});
  return sum;
}

PlanBuilder::GradSlots PlanBuilder::ParameterGrad(const std::string& name,
                                                  const memory::desc& plain,
                                                  const memory::desc& computed) {
  GradSlots slots;
  if (WantsGrad(name)) slots.user = AddSlot(plain, Plan::Role::kParameterGrad, name);
  slots.computed =
      slots.user >= 0 && DescOf(slots.user) == computed ? slots.user : AddSlot(computed);
  return slots;
}

void PlanBuilder::FinishParameterGrad(const GradSlots& slots) {
  if (slots.user >= 0 && slots.computed != slots.user) {
    ConvertInto(backward_ops(), slots.computed, slots.user);
  }
}

bool PlanBuilder::WantsGrad(const std::string& parameter) const {
  return needs_.parameter_grads.count(parameter) > 0;
}

std::vector<Plan::Op>* PlanBuilder::forward_ops() { return &plan_->forward_ops_; }
std::vector<Plan::Op>* PlanBuilder::backward_ops() { return &plan_->backward_ops_; }

dnnl::prop_kind PlanBuilder::forward_prop() const {
  return needs_.training ? dnnl::prop_kind::forward_training : dnnl::prop_kind::forward_inference;
}

int PlanBuilder::scratchpad_slot() const { return plan_->scratchpad_slot_; }

void PlanBuilder::NoteScratchpad(size_t bytes) {
  scratchpad_bytes_ = std::max(scratchpad_bytes_, bytes);
}

void PlanBuilder::Finish() {
  plan_->slots_[plan_->scratchpad_slot_].desc = memory::desc(
      {static_cast<memory::dim>(std::max<size_t>(scratchpad_bytes_, 1))}, DataType::u8, Tag::a);
}

}  // namespace gradengine
