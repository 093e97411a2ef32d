#include "tests/torch/fixture.h"

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <system_error>
#include <utility>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "gradclient/npy.h"
#include "tests/tolerance.h"

namespace gradtest {
namespace {

namespace fs = std::filesystem;

using gradengine::ActivationKind;
using gradengine::ActivationSpec;
using gradengine::Conv2dSpec;
using gradengine::LayerSpec;
using gradengine::ObjectiveKind;
using gradengine::Tensor;

// Where in case.txt a directive came from, for error messages.
std::string Where(absl::string_view source, int line_number) {
  return absl::StrCat(source, ":", line_number);
}

// The key=value arguments of one layer directive. Each key must appear once and be consumed;
// CheckAllUsed reports what was not.
class LayerArguments {
 public:
  static absl::StatusOr<LayerArguments> Parse(absl::Span<const absl::string_view> tokens,
                                              const std::string& where) {
    LayerArguments arguments(where);
    for (absl::string_view token : tokens) {
      const size_t equals = token.find('=');
      if (equals == absl::string_view::npos || equals == 0) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": expected key=value, got '", token, "'"));
      }
      std::string key(token.substr(0, equals));
      if (!arguments.values_.emplace(key, std::string(token.substr(equals + 1))).second) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": key '", key, "' repeated"));
      }
    }
    return arguments;
  }

  // A comma-separated list of exactly `count` integers.
  absl::StatusOr<std::vector<int64_t>> Ints(const std::string& key, size_t count) {
    auto it = values_.find(key);
    if (it == values_.end()) {
      return absl::InvalidArgumentError(absl::StrCat(where_, ": missing key '", key, "'"));
    }
    std::vector<int64_t> ints;
    for (absl::string_view part : absl::StrSplit(it->second, ',')) {
      int64_t value = 0;
      if (!absl::SimpleAtoi(part, &value)) {
        return absl::InvalidArgumentError(
            absl::StrCat(where_, ": ", key, "=", it->second, " is not a list of integers"));
      }
      ints.push_back(value);
    }
    if (ints.size() != count) {
      return absl::InvalidArgumentError(absl::StrCat(where_, ": ", key, "=", it->second, " has ",
                                                     ints.size(), " values, expected ", count));
    }
    values_.erase(it);
    return ints;
  }

  absl::StatusOr<int64_t> Int(const std::string& key) {
    absl::StatusOr<std::vector<int64_t>> ints = Ints(key, 1);
    if (!ints.ok()) return ints.status();
    return (*ints)[0];
  }

  absl::StatusOr<float> Float(const std::string& key) {
    auto it = values_.find(key);
    if (it == values_.end()) {
      return absl::InvalidArgumentError(absl::StrCat(where_, ": missing key '", key, "'"));
    }
    float value = 0;
    if (!absl::SimpleAtof(it->second, &value)) {
      return absl::InvalidArgumentError(
          absl::StrCat(where_, ": ", key, "=", it->second, " is not a number"));
    }
    values_.erase(it);
    return value;
  }

  absl::Status CheckAllUsed() const {
    if (values_.empty()) return absl::OkStatus();
    return absl::InvalidArgumentError(
        absl::StrCat(where_, ": unknown key '", values_.begin()->first, "'"));
  }

 private:
  explicit LayerArguments(std::string where) : where_(std::move(where)) {}

  std::string where_;
  std::map<std::string, std::string> values_;
};

absl::StatusOr<Conv2dSpec> ParseConv2d(LayerArguments& arguments, const std::string& where) {
  Conv2dSpec conv;
  absl::StatusOr<int64_t> in_channels = arguments.Int("in_channels");
  if (!in_channels.ok()) return in_channels.status();
  absl::StatusOr<int64_t> out_channels = arguments.Int("out_channels");
  if (!out_channels.ok()) return out_channels.status();
  absl::StatusOr<std::vector<int64_t>> kernel = arguments.Ints("kernel", 2);
  if (!kernel.ok()) return kernel.status();
  absl::StatusOr<std::vector<int64_t>> stride = arguments.Ints("stride", 2);
  if (!stride.ok()) return stride.status();
  absl::StatusOr<std::vector<int64_t>> padding = arguments.Ints("padding", 4);
  if (!padding.ok()) return padding.status();
  absl::StatusOr<std::vector<int64_t>> dilation = arguments.Ints("dilation", 2);
  if (!dilation.ok()) return dilation.status();
  absl::StatusOr<int64_t> groups = arguments.Int("groups");
  if (!groups.ok()) return groups.status();
  absl::StatusOr<int64_t> bias = arguments.Int("bias");
  if (!bias.ok()) return bias.status();
  if (*bias != 0 && *bias != 1) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": bias=", *bias, " is not 0 or 1"));
  }
  conv.in_channels = *in_channels;
  conv.out_channels = *out_channels;
  conv.kernel_h = (*kernel)[0];
  conv.kernel_w = (*kernel)[1];
  conv.stride_h = (*stride)[0];
  conv.stride_w = (*stride)[1];
  conv.pad_top = (*padding)[0];
  conv.pad_bottom = (*padding)[1];
  conv.pad_left = (*padding)[2];
  conv.pad_right = (*padding)[3];
  conv.dilation_h = (*dilation)[0];
  conv.dilation_w = (*dilation)[1];
  conv.groups = *groups;
  conv.bias = *bias == 1;
  return conv;
}

absl::StatusOr<LayerSpec> ParseLayer(absl::Span<const absl::string_view> tokens,
                                     const std::string& where) {
  if (tokens.size() < 2) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": expected 'layer <name> <type>'"));
  }
  LayerSpec layer;
  layer.name = std::string(tokens[0]);
  const absl::string_view type = tokens[1];
  absl::StatusOr<LayerArguments> arguments = LayerArguments::Parse(tokens.subspan(2), where);
  if (!arguments.ok()) return arguments.status();

  static const auto* const kActivations = new std::map<absl::string_view, ActivationKind>{
      {"relu", ActivationKind::kRelu},         {"leaky_relu", ActivationKind::kLeakyRelu},
      {"tanh", ActivationKind::kTanh},         {"sigmoid", ActivationKind::kSigmoid},
      {"elu", ActivationKind::kElu},           {"gelu", ActivationKind::kGeluErf},
      {"gelu_tanh", ActivationKind::kGeluTanh}};
  if (type == "conv2d") {
    absl::StatusOr<Conv2dSpec> conv = ParseConv2d(*arguments, where);
    if (!conv.ok()) return conv.status();
    layer.op = *conv;
  } else if (auto it = kActivations->find(type); it != kActivations->end()) {
    ActivationSpec activation;
    activation.kind = it->second;
    if (activation.kind == ActivationKind::kLeakyRelu || activation.kind == ActivationKind::kElu) {
      absl::StatusOr<float> alpha = arguments->Float(
          activation.kind == ActivationKind::kLeakyRelu ? "negative_slope" : "alpha");
      if (!alpha.ok()) return alpha.status();
      activation.alpha = *alpha;
    }
    layer.op = activation;
  } else {
    return absl::InvalidArgumentError(absl::StrCat(where, ": unknown layer type '", type, "'"));
  }
  if (absl::Status status = arguments->CheckAllUsed(); !status.ok()) return status;
  return layer;
}

absl::StatusOr<bool> ParseFlag(absl::Span<const absl::string_view> tokens,
                               const std::string& where) {
  if (tokens.size() != 1 || (tokens[0] != "0" && tokens[0] != "1")) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": input_grad takes 0 or 1, got '", absl::StrJoin(tokens, " "), "'"));
  }
  return tokens[0] == "1";
}

// Every parameter `network` has, in layer order.
std::vector<std::string> ParameterNames(const gradengine::NetworkSpec& network) {
  std::vector<std::string> names;
  for (const LayerSpec& layer : network.layers) {
    if (const auto* conv = std::get_if<Conv2dSpec>(&layer.op)) {
      names.push_back(layer.name + ".weight");
      if (conv->bias) names.push_back(layer.name + ".bias");
    }
  }
  return names;
}

absl::StatusOr<std::string> ReadTextFile(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::stringstream contents;
  contents << file.rdbuf();
  if (file.bad()) return absl::UnavailableError(absl::StrCat(path, ": read failed"));
  return contents.str();
}

absl::StatusOr<Tensor> ReadTensor(const std::string& path) {
  absl::StatusOr<gradclient::NpyArray> array = gradclient::ReadNpyFile(path);
  if (!array.ok()) return array.status();
  return Tensor(std::move(array->shape), std::move(array->data));
}

// Checks that the names in `found` are exactly those in `expected`; `kind` says what they
// name ("file", "directory") in the message.
absl::Status CheckSameNames(const std::string& directory, const char* kind,
                            const std::set<std::string>& expected,
                            const std::set<std::string>& found) {
  for (const std::string& name : expected) {
    if (found.count(name) == 0) {
      return absl::NotFoundError(absl::StrCat(directory, ": missing ", kind, " ", name));
    }
  }
  for (const std::string& name : found) {
    if (expected.count(name) == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(directory, ": unexpected ", kind, " ", name, " for this case.txt"));
    }
  }
  return absl::OkStatus();
}

// Checks that `directory` holds exactly the files `files` and the subdirectories
// `subdirectories`.
absl::Status CheckDirectoryContents(const std::string& directory,
                                    const std::set<std::string>& files,
                                    const std::set<std::string>& subdirectories) {
  std::set<std::string> found_files;
  std::set<std::string> found_subdirectories;
  std::error_code error;
  for (fs::directory_iterator it(directory, error), end; !error && it != end; it.increment(error)) {
    const std::string name = it->path().filename().string();
    if (it->is_directory()) {
      found_subdirectories.insert(name);
    } else {
      found_files.insert(name);
    }
  }
  if (error) {
    return absl::NotFoundError(absl::StrCat(directory, ": cannot list: ", error.message()));
  }
  if (absl::Status status = CheckSameNames(directory, "file", files, found_files); !status.ok()) {
    return status;
  }
  return CheckSameNames(directory, "directory", subdirectories, found_subdirectories);
}

void CompareTensor(const std::string& what, const Tensor& actual, const Tensor& expected,
                   std::vector<std::string>& failures) {
  ::testing::AssertionResult close =
      TensorsClose(what, actual.shape, absl::MakeConstSpan(actual.data), expected.shape,
                   absl::MakeConstSpan(expected.data));
  if (!close) failures.push_back(close.message());
}

::testing::AssertionResult Summarize(const FixtureCase& fixture,
                                     const std::vector<std::string>& failures) {
  if (failures.empty()) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "case " << fixture.name << " (" << fixture.directory
                                       << "):\n  " << absl::StrJoin(failures, "\n  ");
}

}  // namespace

absl::StatusOr<CaseSpec> ParseCaseSpec(absl::string_view text, absl::string_view source) {
  CaseSpec spec;
  std::set<std::string> layer_names;
  std::optional<std::vector<std::string>> param_grads;
  bool seen_objective = false;
  bool seen_input_grad = false;
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_number;
    const std::string where = Where(source, line_number);
    line = line.substr(0, line.find('#'));
    std::vector<absl::string_view> tokens =
        absl::StrSplit(line, absl::ByAnyChar(" \t\r"), absl::SkipEmpty());
    if (tokens.empty()) continue;
    const absl::string_view directive = tokens[0];
    const absl::Span<const absl::string_view> rest = absl::MakeConstSpan(tokens).subspan(1);
    if (directive == "layer") {
      absl::StatusOr<LayerSpec> layer = ParseLayer(rest, where);
      if (!layer.ok()) return layer.status();
      if (!layer_names.insert(layer->name).second) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": layer name '", layer->name, "' repeated"));
      }
      spec.network.layers.push_back(*std::move(layer));
    } else if (directive == "objective") {
      if (seen_objective) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": objective repeated"));
      }
      seen_objective = true;
      const std::string value = absl::StrJoin(rest, " ");
      if (value == "mse") {
        spec.objective = ObjectiveKind::kMse;
      } else if (value == "sum") {
        spec.objective = ObjectiveKind::kSum;
      } else if (value == "grad_output") {
        spec.objective = ObjectiveKind::kGradOutput;
      } else {
        return absl::InvalidArgumentError(absl::StrCat(where, ": unknown objective '", value, "'"));
      }
    } else if (directive == "input_grad") {
      if (seen_input_grad) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": input_grad repeated"));
      }
      seen_input_grad = true;
      absl::StatusOr<bool> input_grad = ParseFlag(rest, where);
      if (!input_grad.ok()) return input_grad.status();
      spec.gradients.input = *input_grad;
    } else if (directive == "param_grads") {
      if (param_grads.has_value()) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": param_grads repeated"));
      }
      if (rest.empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": param_grads needs 'all', 'none' or parameter names"));
      }
      param_grads.emplace(rest.begin(), rest.end());
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": unknown directive '", directive, "'"));
    }
  }

  if (spec.network.layers.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": no layer"));
  }
  if (!seen_objective || !seen_input_grad || !param_grads.has_value()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": missing ",
                                                   !seen_objective    ? "objective"
                                                   : !seen_input_grad ? "input_grad"
                                                                      : "param_grads"));
  }
  const std::vector<std::string> known = ParameterNames(spec.network);
  if (*param_grads == std::vector<std::string>{"all"}) {
    spec.gradients.all_parameters = true;
  } else if (*param_grads == std::vector<std::string>{"none"}) {
    spec.gradients.all_parameters = false;
  } else {
    spec.gradients.all_parameters = false;
    std::set<std::string> seen;
    for (const std::string& name : *param_grads) {
      if (std::find(known.begin(), known.end(), name) == known.end()) {
        return absl::InvalidArgumentError(absl::StrCat(
            source, ": param_grads names '", name, "', which is not a parameter of the network"));
      }
      if (!seen.insert(name).second) {
        return absl::InvalidArgumentError(
            absl::StrCat(source, ": param_grads names '", name, "' twice"));
      }
      spec.gradients.parameters.push_back(name);
    }
  }
  return spec;
}

gradengine::ForwardRequest FixtureCase::MakeForwardRequest() const {
  gradengine::ForwardRequest forward;
  forward.network = request.network;
  forward.parameters = request.parameters;
  forward.input = request.input;
  return forward;
}

absl::StatusOr<std::unique_ptr<FixtureCase>> LoadFixtureCase(const std::string& directory) {
  auto fixture = std::make_unique<FixtureCase>();
  fixture->directory = directory;
  fixture->name = fs::path(directory).lexically_normal().filename().string();
  if (fixture->name.empty()) {
    fixture->name = fs::path(directory).lexically_normal().parent_path().filename().string();
  }
  const fs::path root(directory);
  auto path = [&root](const std::string& relative) { return (root / relative).string(); };

  absl::StatusOr<std::string> text = ReadTextFile(path("case.txt"));
  if (!text.ok()) return text.status();
  absl::StatusOr<CaseSpec> spec = ParseCaseSpec(*text, path("case.txt"));
  if (!spec.ok()) return spec.status();
  fixture->spec = *std::move(spec);
  const CaseSpec& case_spec = fixture->spec;
  const std::vector<std::string> parameter_names = ParameterNames(case_spec.network);
  const std::vector<std::string>& requested =
      case_spec.gradients.all_parameters ? parameter_names : case_spec.gradients.parameters;

  // The files this spec calls for, and no others.
  std::set<std::string> top_files = {"case.txt", "input.npy"};
  if (case_spec.objective == ObjectiveKind::kMse) top_files.insert("target.npy");
  if (case_spec.objective == ObjectiveKind::kGradOutput) top_files.insert("grad_output.npy");
  std::set<std::string> top_directories = {"expected"};
  if (!parameter_names.empty()) top_directories.insert("params");
  std::set<std::string> parameter_files;
  for (const std::string& name : parameter_names) parameter_files.insert(name + ".npy");
  std::set<std::string> expected_files = {"output.npy"};
  if (case_spec.objective != ObjectiveKind::kGradOutput) expected_files.insert("loss.npy");
  if (case_spec.gradients.input) expected_files.insert("input.grad.npy");
  for (const std::string& name : requested) expected_files.insert(name + ".grad.npy");
  if (absl::Status status = CheckDirectoryContents(directory, top_files, top_directories);
      !status.ok()) {
    return status;
  }
  if (!parameter_names.empty()) {
    if (absl::Status status = CheckDirectoryContents(path("params"), parameter_files, {});
        !status.ok()) {
      return status;
    }
  }
  if (absl::Status status = CheckDirectoryContents(path("expected"), expected_files, {});
      !status.ok()) {
    return status;
  }

  absl::StatusOr<Tensor> input = ReadTensor(path("input.npy"));
  if (!input.ok()) return input.status();
  fixture->input = *std::move(input);
  for (const std::string& name : parameter_names) {
    absl::StatusOr<Tensor> parameter = ReadTensor(path("params/" + name + ".npy"));
    if (!parameter.ok()) return parameter.status();
    fixture->parameters[name] = *std::move(parameter);
  }
  if (case_spec.objective != ObjectiveKind::kSum) {
    absl::StatusOr<Tensor> objective_tensor = ReadTensor(
        path(case_spec.objective == ObjectiveKind::kMse ? "target.npy" : "grad_output.npy"));
    if (!objective_tensor.ok()) return objective_tensor.status();
    fixture->objective_tensor = *std::move(objective_tensor);
  }

  absl::StatusOr<Tensor> output = ReadTensor(path("expected/output.npy"));
  if (!output.ok()) return output.status();
  fixture->expected_output = *std::move(output);
  if (case_spec.objective != ObjectiveKind::kGradOutput) {
    absl::StatusOr<Tensor> loss = ReadTensor(path("expected/loss.npy"));
    if (!loss.ok()) return loss.status();
    if (loss->shape != std::vector<int64_t>{1}) {
      return absl::InvalidArgumentError(absl::StrCat(path("expected/loss.npy"), ": shape ",
                                                     gradengine::ShapeToString(loss->shape),
                                                     ", expected [1]"));
    }
    fixture->expected_loss = *std::move(loss);
  }
  if (case_spec.gradients.input) {
    absl::StatusOr<Tensor> input_grad = ReadTensor(path("expected/input.grad.npy"));
    if (!input_grad.ok()) return input_grad.status();
    fixture->expected_input_grad = *std::move(input_grad);
  }
  for (const std::string& name : requested) {
    absl::StatusOr<Tensor> grad = ReadTensor(path("expected/" + name + ".grad.npy"));
    if (!grad.ok()) return grad.status();
    fixture->expected_parameter_grads[name] = *std::move(grad);
  }

  // Views into the tensors above, which stay where they are: the FixtureCase never moves.
  gradengine::GradientRequest& request = fixture->request;
  request.network = case_spec.network;
  for (const auto& [name, tensor] : fixture->parameters) request.parameters[name] = tensor.view();
  request.input = fixture->input.view();
  request.objective.kind = case_spec.objective;
  if (case_spec.objective != ObjectiveKind::kSum) {
    request.objective.tensor = fixture->objective_tensor.view();
  }
  request.gradients = case_spec.gradients;
  return fixture;
}

absl::StatusOr<std::vector<std::string>> FindFixtureCases(const std::string& root) {
  std::error_code error;
  if (!fs::is_directory(root, error)) {
    return absl::NotFoundError(absl::StrCat(root, ": not a directory"));
  }
  std::vector<std::string> cases;
  for (fs::directory_iterator it(root, error), end; !error && it != end; it.increment(error)) {
    if (it->is_directory() && fs::is_regular_file(it->path() / "case.txt")) {
      cases.push_back(it->path().string());
    }
  }
  if (error) return absl::NotFoundError(absl::StrCat(root, ": cannot list: ", error.message()));
  std::sort(cases.begin(), cases.end());
  return cases;
}

::testing::AssertionResult GradientResultMatches(const FixtureCase& fixture,
                                                 const gradengine::GradientResult& result) {
  std::vector<std::string> failures;
  CompareTensor("output", result.output, fixture.expected_output, failures);

  if (fixture.expected_loss.has_value() != result.loss.has_value()) {
    failures.push_back(absl::StrCat("loss is ", result.loss.has_value() ? "present" : "absent",
                                    ", expected ",
                                    fixture.expected_loss.has_value() ? "present" : "absent"));
  } else if (result.loss.has_value()) {
    const double loss = *result.loss;
    ::testing::AssertionResult close =
        TensorsClose("loss", {1}, absl::Span<const double>(&loss, 1), fixture.expected_loss->shape,
                     absl::MakeConstSpan(fixture.expected_loss->data));
    if (!close) failures.push_back(close.message());
  }

  if (fixture.expected_input_grad.has_value() != result.input_grad.has_value()) {
    failures.push_back(absl::StrCat(
        "input gradient is ", result.input_grad.has_value() ? "present" : "absent", ", expected ",
        fixture.expected_input_grad.has_value() ? "present" : "absent"));
  } else if (result.input_grad.has_value()) {
    CompareTensor("input.grad", *result.input_grad, *fixture.expected_input_grad, failures);
  }

  for (const auto& [name, expected] : fixture.expected_parameter_grads) {
    auto it = result.parameter_grads.find(name);
    if (it == result.parameter_grads.end()) {
      failures.push_back(absl::StrCat(name, ".grad: requested but absent"));
    } else {
      CompareTensor(name + ".grad", it->second, expected, failures);
    }
  }
  for (const auto& [name, unused] : result.parameter_grads) {
    if (fixture.expected_parameter_grads.count(name) == 0) {
      failures.push_back(absl::StrCat(name, ".grad: present but not requested"));
    }
  }
  return Summarize(fixture, failures);
}

::testing::AssertionResult ForwardResultMatches(const FixtureCase& fixture,
                                                const gradengine::ForwardResult& result) {
  std::vector<std::string> failures;
  CompareTensor("forward output", result.output, fixture.expected_output, failures);
  return Summarize(fixture, failures);
}

}  // namespace gradtest
