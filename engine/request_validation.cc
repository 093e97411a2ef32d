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
    const std::string& name = network.layers[i].name;
    if (parameter == name + ".weight" || parameter == name + ".bias") {
      return absl::StrCat("layers[", i, "] (", Quote(name), ")");
    }
  }
  return "no layer";
}

absl::Status ValidateParameters(const NetworkSpec& network, const ValidatedNetwork& validated,
                                const ParameterViews& parameters) {
  if (absl::Status s =
          CheckCount("parameters", static_cast<int64_t>(parameters.size()), kMaxParameters);
      !s.ok()) {
    return s;
  }
  std::map<std::string, const std::vector<int64_t>*> expected;
  for (const auto& [name, shape] : validated.parameter_shapes) {
    expected.emplace(name, &shape);
    auto it = parameters.find(name);
    if (it == parameters.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("parameters[", Quote(name), "] is missing: ", OwnerOf(network, name),
                       " needs a tensor of shape ", ShapeToString(shape)));
    }
    const std::string what = absl::StrCat("parameters[", Quote(name), "]");
    if (it->second.shape != shape) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ".shape=", ShapeToString(it->second.shape), " must be ",
                       ShapeToString(shape), " for ", OwnerOf(network, name)));
    }
    if (absl::Status s = ValidateTensorData(what, it->second); !s.ok()) return s;
  }
  for (const auto& [name, tensor] : parameters) {
    if (expected.count(name) > 0) continue;
    for (size_t i = 0; i < network.layers.size(); ++i) {
      const LayerSpec& layer = network.layers[i];
      if (name == layer.name + ".bias" && std::holds_alternative<Conv2dSpec>(layer.op)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "parameters[", Quote(name), "] is given but layers[", i, "].conv2d.bias is false"));
      }
      if (absl::StartsWith(name, layer.name + ".") &&
          std::holds_alternative<ActivationSpec>(layer.op)) {
        return absl::InvalidArgumentError(
            absl::StrCat("parameters[", Quote(name), "] is given but layers[", i, "] (",
                         Quote(layer.name), ") is an activation without parameters"));
      }
    }
    return absl::InvalidArgumentError(absl::StrCat(
        "parameters[", Quote(name),
        "] does not belong to any layer (expected \"<layer>.weight\" or \"<layer>.bias\")"));
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
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          "objective.kind=", static_cast<int>(objective.kind), " is not a known objective"));
  }

  {
    // Checked even when all_parameters is set, so a misspelled name never passes silently.
    const std::vector<std::string>& names = request.gradients.parameters;
    for (size_t i = 0; i < names.size(); ++i) {
      const bool known =
          std::any_of(validated->parameter_shapes.begin(), validated->parameter_shapes.end(),
                      [&](const auto& entry) { return entry.first == names[i]; });
      if (!known) {
        return absl::InvalidArgumentError(absl::StrCat("gradients.parameters[", i,
                                                       "]=", Quote(names[i]),
                                                       " is not a parameter of the network"));
      }
    }
  }
  return validated;
}

}  // namespace gradengine
