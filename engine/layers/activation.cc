// The activations' shape rule: torch.nn.functional's elementwise functions.

#include <cmath>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/layers/layer_kind.h"

namespace gradengine {

absl::Status LayerKind<ActivationSpec>::InferShape(const ActivationSpec& act,
                                                   const ShapeContext& context,
                                                   std::vector<int64_t>* out) {
  switch (act.kind) {
    case ActivationKind::kRelu:
    case ActivationKind::kTanh:
    case ActivationKind::kSigmoid:
    case ActivationKind::kGeluErf:
    case ActivationKind::kGeluTanh:
      break;
    case ActivationKind::kLeakyRelu:
    case ActivationKind::kElu:
      if (!std::isfinite(act.alpha)) {
        return absl::InvalidArgumentError(absl::StrCat(
            context.prefix, ".", ActivationName(act.kind),
            act.kind == ActivationKind::kElu ? ".alpha=" : ".negative_slope=", act.alpha,
            " must be finite"));
      }
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          context.prefix, ".activation=", static_cast<int>(act.kind), " is not a known kind"));
  }
  *out = context.input_shape;
  return absl::OkStatus();
}

void LayerKind<ActivationSpec>::AppendKey(const ActivationSpec& a, std::string* key) {
  absl::StrAppend(key, static_cast<int>(a.kind), ",",
                  absl::StrFormat("%a", static_cast<double>(a.alpha)));
}

double LayerKind<ActivationSpec>::Flops(const ActivationSpec&, absl::Span<const int64_t>,
                                        absl::Span<const int64_t> out) {
  return 10.0 * ElementCount(out);  // nominal
}

}  // namespace gradengine
