// linear's shape rule and parameters: torch.nn.Linear after torch.flatten(x, 1).

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/layers/layer_kind.h"

namespace gradengine {

absl::Status LayerKind<LinearSpec>::InferShape(const LinearSpec& spec, const ShapeContext& context,
                                               std::vector<int64_t>* out) {
  const std::string p = context.prefix + ".linear.";
  if (absl::Status s = CheckPositive(p + "in_features", spec.in_features, kMaxChannels); !s.ok()) {
    return s;
  }
  if (absl::Status s = CheckPositive(p + "out_features", spec.out_features, kMaxChannels);
      !s.ok()) {
    return s;
  }
  const std::vector<int64_t>& in = context.input_shape;
  int64_t features = 1;  // cannot overflow: the input's element count was checked
  for (size_t d = 1; d < in.size(); ++d) features *= in[d];
  if (features != spec.in_features) {
    return absl::InvalidArgumentError(absl::StrCat(
        p, "in_features=", spec.in_features, " does not match its input ", ShapeToString(in),
        in.size() == 4 ? absl::StrCat(", flattened to C*H*W=", features) : std::string()));
  }
  *out = {in[0], spec.out_features};
  return absl::OkStatus();
}

void LayerKind<LinearSpec>::Parameters(const std::string& layer, const LinearSpec& spec,
                                       std::vector<ParameterInfo>* out) {
  out->push_back({layer + ".weight", {spec.out_features, spec.in_features}});
  if (spec.bias) out->push_back({layer + ".bias", {spec.out_features}});
}

void LayerKind<LinearSpec>::AppendKey(const LinearSpec& spec, std::string* key) {
  absl::StrAppend(key, spec.in_features, ",", spec.out_features, ",", spec.bias ? 1 : 0);
}

double LayerKind<LinearSpec>::Flops(const LinearSpec& spec, absl::Span<const int64_t>,
                                    absl::Span<const int64_t> out) {
  return 2.0 * static_cast<double>(out[0]) * static_cast<double>(spec.out_features) *
         static_cast<double>(spec.in_features);
}

}  // namespace gradengine
