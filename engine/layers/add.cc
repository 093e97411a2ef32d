// add's shape rule: a residual connection, x + other.

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/layers/layer_kind.h"
#include "gradengine/quote.h"

namespace gradengine {

absl::Status LayerKind<AddSpec>::InferShape(const AddSpec& spec, const ShapeContext& context,
                                            std::vector<int64_t>* out) {
  if (context.other_shape != context.input_shape) {
    return absl::InvalidArgumentError(
        absl::StrCat(context.prefix, ".add.other=", Quote(spec.other), " has shape ",
                     ShapeToString(context.other_shape), ", but the layer's input is ",
                     ShapeToString(context.input_shape), ": an add needs equal shapes"));
  }
  *out = context.input_shape;
  return absl::OkStatus();
}

void LayerKind<AddSpec>::AppendKey(const AddSpec& spec, std::string* key) {
  absl::StrAppend(key, spec.other.size(), ":", spec.other);
}

double LayerKind<AddSpec>::Flops(const AddSpec&, absl::Span<const int64_t>,
                                 absl::Span<const int64_t> out) {
  return ElementCount(out);
}

}  // namespace gradengine
