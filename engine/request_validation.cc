#include "engine/request_validation.h"

#include <algorithm>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gradengine/quote.h"

namespace gradengine {
namespace {

// A tensor's values must be present and exactly as many as its shape says.
absl::Status ValidateTensorData(const std::string& what, const TensorView& tensor) {
  absl::StatusOr<int64_t> count = CheckedNumElements(tensor.shape, what);
  if (!count.ok()) return count.status();
  if (tensor.size != *count) {
    return absl::InvalidArgumentError(absl::StrCat(what, " has ", tensor.size,
                                                   " values but its shape ",
                                                   ShapeToString(tensor.shape), " needs ", *count));
  }
  if (tensor.size > 0 && tensor.data == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(what, " has no data"));
  }
  return absl::OkStatus();
}

// Names the layer a parameter belongs to, for messages: "layers[2] (\"conv3\")".
std::string OwnerOf(const NetworkSpec& network, const std::string& parameter) {
  for (size_t i = 0; i < network.layers.size(); ++i) {
    for (const ParameterInfo& info : LayerParameters(network.layers[i])) {
      if (info.name == parameter) {
        return absl::StrCat("layers[", i, "] (", Quote(network.layers[i].name), ")");
      }
    }
  }
  return "no layer";
}

// What the layer named by the prefix of `name` takes, for a message about a parameter it does
// not take: "layers[2] (\"c3\") takes \"c3.weight\"" or "... takes no parameters".
std::string WhatTheLayerTakes(const NetworkSpec& network, const std::string& name) {
  for (size_t i = 0; i < network.layers.size(); ++i) {
    const LayerSpec& layer = network.layers[i];
    if (!absl::StartsWith(name, layer.name + ".")) continue;
    std::string takes;
    for (const ParameterInfo& info : LayerParameters(layer)) {
      absl::StrAppend(&takes, takes.empty() ? "" : ", ", Quote(info.name));
    }
    return absl::StrCat(" but layers[", i, "] (", Quote(layer.name), ", ", LayerKindName(layer.op),
                        ") takes ", takes.empty() ? "no parameters" : takes);
  }
  return ", but it does not belong to any layer (expected \"<layer>.weight\", \"<layer>.bias\", "
         "...)";
}

absl::Status ValidateParameters(const NetworkSpec& network, const ValidatedNetwork& validated,
                                const ParameterViews& parameters) {
  if (absl::Status s =
          CheckCount("parameters", static_cast<int64_t>(parameters.size()), kMaxParameters);
      !s.ok()) {
    return s;
  }
  std::map<std::string, const ParameterInfo*> expected;
  for (const ParameterInfo& info : validated.parameters) {
    expected.emplace(info.name, &info);
    auto it = parameters.find(info.name);
    if (it == parameters.end()) {
      if (!info.required) continue;
      return absl::InvalidArgumentError(absl::StrCat(
          "parameters[", Quote(info.name), "] is missing: ", OwnerOf(network, info.name),
          " needs a tensor of shape ", ShapeToString(info.shape)));
    }
    const std::string what = absl::StrCat("parameters[", Quote(info.name), "]");
    if (it->second.shape != info.shape) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ".shape=", ShapeToString(it->second.shape), " must be ",
                       ShapeToString(info.shape), " for ", OwnerOf(network, info.name)));
    }
    if (absl::Status s = ValidateTensorData(what, it->second); !s.ok()) return s;
  }
  for (const auto& [name, tensor] : parameters) {
    if (expected.count(name) > 0) continue;
    return absl::InvalidArgumentError(
        absl::StrCat("parameters[", Quote(name), "] is given", WhatTheLayerTakes(network, name)));
  }
  return absl::OkStatus();
}

// The labels of a cross_entropy objective against logits of `output_shape`.
absl::Status ValidateCrossEntropy(const Objective& objective,
                                  const std::vector<int64_t>& output_shape) {
  const std::string what = "objective.cross_entropy";
  if (output_shape.size() != 2 && output_shape.size() != 4) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " needs logits [N, C] or [N, C, H, W], but the network's output is ",
                     ShapeToString(output_shape)));
  }
  std::vector<int64_t> labels_shape = {output_shape[0]};
  if (output_shape.size() == 4) {
    labels_shape.push_back(output_shape[2]);
    labels_shape.push_back(output_shape[3]);
  }
  const LabelsView& labels = objective.labels;
  if (labels.shape != labels_shape) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ".target.shape=", ShapeToString(labels.shape), " must be ",
                     ShapeToString(labels_shape), " for logits ", ShapeToString(output_shape)));
  }
  absl::StatusOr<int64_t> count = CheckedNumElements(labels.shape, what + ".target");
  if (!count.ok()) return count.status();
  if (labels.size != *count || (labels.size > 0 && labels.data == nullptr)) {
    return absl::InvalidArgumentError(absl::StrCat(what, ".target has ", labels.size,
                                                   " values but its shape ",
                                                   ShapeToString(labels.shape), " needs ", *count));
  }
  if (!(objective.label_smoothing >= 0.0 && objective.label_smoothing <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ".label_smoothing=", objective.label_smoothing, " must be in [0, 1]"));
  }
  const int64_t classes = output_shape[1];
  for (int64_t i = 0; i < labels.size; ++i) {
    const int64_t label = labels.data[i];
    if (label == objective.ignore_index || (label >= 0 && label < classes)) continue;
    return absl::InvalidArgumentError(absl::StrCat(what, ".target[", i, "]=", label,
                                                   " is not a class index in [0, ", classes,
                                                   ") nor ignore_index=", objective.ignore_index));
  }
  return absl::OkStatus();
}

absl::StatusOr<ValidatedNetwork> ValidateCommon(const NetworkSpec& network, const TensorView& input,
                                                const ParameterViews& parameters,
                                                int64_t max_elements) {
  absl::StatusOr<ValidatedNetwork> validated = ValidateNetwork(network, input.shape, max_elements);
  if (!validated.ok()) return validated.status();
  if (absl::Status s = ValidateTensorData("input", input); !s.ok()) return s;
  if (absl::Status s = ValidateParameters(network, *validated, parameters); !s.ok()) return s;
  return validated;
}

}  // namespace

absl::StatusOr<ValidatedNetwork> ValidateForwardRequest(const ForwardRequest& request,
                                                        int64_t max_elements) {
  return ValidateCommon(request.network, request.input, request.parameters, max_elements);
}

absl::StatusOr<ValidatedNetwork> ValidateGradientRequest(const GradientRequest& request,
                                                         int64_t max_elements) {
  absl::StatusOr<ValidatedNetwork> validated =
      ValidateCommon(request.network, request.input, request.parameters, max_elements);
  if (!validated.ok()) return validated.status();

  const std::vector<int64_t>& output_shape = validated->output_shapes.back();
  const Objective& objective = request.objective;
  switch (objective.kind) {
    case ObjectiveKind::kMse:
    case ObjectiveKind::kGradOutput: {
      const std::string what =
          objective.kind == ObjectiveKind::kMse ? "objective.mse.target" : "objective.grad_output";
      if (objective.tensor.shape != output_shape) {
        return absl::InvalidArgumentError(
            absl::StrCat(what, ".shape=", ShapeToString(objective.tensor.shape),
                         " must equal the network's output shape ", ShapeToString(output_shape)));
      }
      if (absl::Status s = ValidateTensorData(what, objective.tensor); !s.ok()) return s;
      break;
    }
    case ObjectiveKind::kSum:
      if (!objective.tensor.shape.empty() || objective.tensor.size != 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("objective.sum takes no tensor, but one of shape ",
                         ShapeToString(objective.tensor.shape), " was given"));
      }
      break;
    case ObjectiveKind::kCrossEntropy:
      if (absl::Status s = ValidateCrossEntropy(objective, output_shape); !s.ok()) return s;
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          "objective.kind=", static_cast<int>(objective.kind), " is not a known objective"));
  }

  {
    // Checked even when all_parameters is set, so a misspelled name never passes silently.
    const std::vector<std::string>& names = request.gradients.parameters;
    for (size_t i = 0; i < names.size(); ++i) {
      const auto it =
          std::find_if(validated->parameters.begin(), validated->parameters.end(),
                       [&](const ParameterInfo& info) { return info.name == names[i]; });
      if (it == validated->parameters.end()) {
        return absl::InvalidArgumentError(absl::StrCat("gradients.parameters[", i,
                                                       "]=", Quote(names[i]),
                                                       " is not a parameter of the network"));
      }
      if (!it->trainable) {
        return absl::InvalidArgumentError(
            absl::StrCat("gradients.parameters[", i, "]=", Quote(names[i]),
                         " is a running statistic, which has no gradient"));
      }
    }
  }
  return validated;
}

}  // namespace gradengine
