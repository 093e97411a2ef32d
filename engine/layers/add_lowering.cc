// add as a oneDNN sum primitive. Its backward pass is free: dL/d(input) and dL/d(other) are
// both dL/d(output).
//
// Not a binary primitive with the following activation fused: oneDNN 2.6.3's binary kernels
// write up to 128 bytes past the end of small blocked tensors on AVX-512, which corrupts
// whatever lies there.

#include <memory>

#include "engine/layers/lowering.h"

namespace gradengine {
namespace {

class LoweredAdd : public LoweredLayer {
 public:
  void Backward(PlanBuilder&, const BackwardContext& context, BackwardResult* result) override {
    result->diff_src = context.diff_dst;
    result->diff_other = context.diff_dst;
  }
};

}  // namespace

std::unique_ptr<LoweredLayer> Lowering<AddSpec>::Forward(PlanBuilder& b, const AddSpec&,
                                                         const ForwardContext& context) {
  auto lowered = std::make_unique<LoweredAdd>();
  // The sum takes each operand in its own layout and writes the input's.
  lowered->dst = b.Accumulate(b.forward_ops(), context.src, context.other);
  return lowered;
}

}  // namespace gradengine
