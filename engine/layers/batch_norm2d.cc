// batch_norm2d's shape rule and parameters: torch.nn.BatchNorm2d.

#include <cmath>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/layers/layer_kind.h"

namespace gradengine {

absl::Status LayerKind<BatchNorm2dSpec>::InferShape(const BatchNorm2dSpec& spec,
                                                    const ShapeContext& context,
                                                    std::vector<int64_t>* out) {
  const std::string p = context.prefix + ".batch_norm2d.";
  if (absl::Status s = CheckPositive(p + "num_features", spec.num_features, kMaxChannels);
      !s.ok()) {
    return s;
  }
  if (!(spec.eps > 0.0) || !std::isfinite(spec.eps)) {
    return absl::InvalidArgumentError(
        absl::StrCat(p, "eps=", spec.eps, " must be positive and finite"));
  }
  if (!std::isfinite(spec.momentum)) {
    return absl::InvalidArgumentError(
        absl::StrCat(p, "momentum=", spec.momentum, " must be finite"));
  }
  if (absl::Status s = CheckFourDims(context, kName); !s.ok()) return s;
  const std::vector<int64_t>& in = context.input_shape;
  if (in[1] != spec.num_features) {
    return absl::InvalidArgumentError(absl::StrCat(p, "num_features=", spec.num_features,
                                                   " does not match the ", in[1],
                                                   " channels of its input ", ShapeToString(in)));
  }
  if (spec.training && in[0] * in[2] * in[3] == 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(p, "training=true needs more than one value per channel, but its input is ",
                     ShapeToString(in), " (PyTorch refuses it too)"));
  }
  *out = in;
  return absl::OkStatus();
}

void LayerKind<BatchNorm2dSpec>::Parameters(const std::string& layer, const BatchNorm2dSpec& spec,
                                            std::vector<ParameterInfo>* out) {
  const std::vector<int64_t> shape = {spec.num_features};
  if (spec.affine) {
    out->push_back({layer + ".weight", shape});
    out->push_back({layer + ".bias", shape});
  }
  // Buffers: required in inference mode, PyTorch's initial values when absent in training.
  out->push_back({layer + ".running_mean", shape, /*trainable=*/false,
                  /*required=*/!spec.training, /*fill=*/0.0f, /*updated=*/spec.training});
  out->push_back({layer + ".running_var", shape, /*trainable=*/false,
                  /*required=*/!spec.training, /*fill=*/1.0f, /*updated=*/spec.training});
}

void LayerKind<BatchNorm2dSpec>::AppendKey(const BatchNorm2dSpec& spec, std::string* key) {
  // eps and momentum are compiled into the primitives or the update; keyed exactly.
  absl::StrAppend(key, spec.num_features, ",", absl::StrFormat("%a,%a", spec.eps, spec.momentum),
                  ",", spec.affine ? 1 : 0, spec.training ? 1 : 0);
}

double LayerKind<BatchNorm2dSpec>::Flops(const BatchNorm2dSpec&, absl::Span<const int64_t>,
                                         absl::Span<const int64_t> out) {
  return 8.0 * ElementCount(out);
}

}  // namespace gradengine
