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
#include "gradengine/overloaded.h"
#include "tests/tolerance.h"

namespace gradtest {
namespace {

namespace fs = std::filesystem;

using gradengine::ActivationKind;
using gradengine::ActivationSpec;
using gradengine::AddSpec;
using gradengine::AvgPool2dSpec;
using gradengine::BatchNorm2dSpec;
using gradengine::Conv2dSpec;
using gradengine::LayerSpec;
using gradengine::LinearSpec;
using gradengine::MaxPool2dSpec;
using gradengine::ObjectiveKind;
using gradengine::Tensor;

// Where in case.txt a directive came from, for error messages.
std::string Where(absl::string_view source, int line_number) {
  return absl::StrCat(source, ":", line_number);
}

// The key=value arguments of one directive. Each key must appear once and be consumed. A
// getter that fails records the error (the first one is kept) and returns a default value, so
// that a parser reads every field and then asks Finish() whether all was well.
class Arguments {
 public:
  static absl::StatusOr<Arguments> Parse(absl::Span<const absl::string_view> tokens,
                                         const std::string& where) {
    Arguments arguments(where);
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

  // A comma-separated list of exactly `count` integers (zeros after an error).
  std::vector<int64_t> Ints(const std::string& key, size_t count) {
    const std::string text = String(key);
    std::vector<int64_t> ints;
    if (!status_.ok()) return std::vector<int64_t>(count, 0);
    for (absl::string_view part : absl::StrSplit(text, ',')) {
      int64_t value = 0;
      if (!absl::SimpleAtoi(part, &value)) {
        Fail(absl::StrCat(key, "=", text, " is not a list of integers"));
        return std::vector<int64_t>(count, 0);
      }
      ints.push_back(value);
    }
    if (ints.size() != count) {
      Fail(absl::StrCat(key, "=", text, " has ", ints.size(), " values, expected ", count));
      return std::vector<int64_t>(count, 0);
    }
    return ints;
  }

  int64_t Int(const std::string& key) { return Ints(key, 1)[0]; }

  // 0 or 1.
  bool Flag(const std::string& key) {
    const int64_t value = Int(key);
    if (value != 0 && value != 1) Fail(absl::StrCat(key, "=", value, " is not 0 or 1"));
    return value == 1;
  }

  double Double(const std::string& key) {
    const std::string text = String(key);
    double value = 0;
    if (status_.ok() && !absl::SimpleAtod(text, &value)) {
      Fail(absl::StrCat(key, "=", text, " is not a number"));
    }
    return value;
  }

  float Float(const std::string& key) {
    const std::string text = String(key);
    float value = 0;
    if (status_.ok() && !absl::SimpleAtof(text, &value)) {
      Fail(absl::StrCat(key, "=", text, " is not a number"));
    }
    return value;
  }

  // A non-empty value.
  std::string String(const std::string& key) {
    auto it = values_.find(key);
    if (it == values_.end()) {
      Fail(absl::StrCat("missing key '", key, "'"));
      return "";
    }
    std::string value = std::move(it->second);
    values_.erase(it);
    if (value.empty()) Fail(absl::StrCat(key, "= is empty"));
    return value;
  }

  bool Has(const std::string& key) const { return values_.count(key) != 0; }

  // The first error of a getter, else InvalidArgument for a key no getter consumed.
  absl::Status Finish() const {
    if (!status_.ok() || values_.empty()) return status_;
    return absl::InvalidArgumentError(
        absl::StrCat(where_, ": unknown key '", values_.begin()->first, "'"));
  }

 private:
  explicit Arguments(std::string where) : where_(std::move(where)) {}

  void Fail(absl::string_view message) {
    if (status_.ok()) status_ = absl::InvalidArgumentError(absl::StrCat(where_, ": ", message));
  }

  std::string where_;
  std::map<std::string, std::string> values_;
  absl::Status status_;
};

Conv2dSpec ParseConv2d(Arguments& arguments) {
  Conv2dSpec conv;
  conv.in_channels = arguments.Int("in_channels");
  conv.out_channels = arguments.Int("out_channels");
  const std::vector<int64_t> kernel = arguments.Ints("kernel", 2);
  const std::vector<int64_t> stride = arguments.Ints("stride", 2);
  const std::vector<int64_t> padding = arguments.Ints("padding", 4);
  const std::vector<int64_t> dilation = arguments.Ints("dilation", 2);
  conv.groups = arguments.Int("groups");
  conv.bias = arguments.Flag("bias");
  conv.kernel_h = kernel[0];
  conv.kernel_w = kernel[1];
  conv.stride_h = stride[0];
  conv.stride_w = stride[1];
  conv.pad_top = padding[0];
  conv.pad_bottom = padding[1];
  conv.pad_left = padding[2];
  conv.pad_right = padding[3];
  conv.dilation_h = dilation[0];
  conv.dilation_w = dilation[1];
  return conv;
}

ActivationSpec ParseActivation(ActivationKind kind, Arguments& arguments) {
  ActivationSpec activation;
  activation.kind = kind;
  switch (kind) {
    case ActivationKind::kLeakyRelu:
      activation.alpha = arguments.Float("negative_slope");
      break;
    case ActivationKind::kElu:
      activation.alpha = arguments.Float("alpha");
      break;
    case ActivationKind::kRelu:
    case ActivationKind::kTanh:
    case ActivationKind::kSigmoid:
    case ActivationKind::kGeluErf:
    case ActivationKind::kGeluTanh:
      break;
  }
  return activation;
}

MaxPool2dSpec ParseMaxPool2d(Arguments& arguments) {
  MaxPool2dSpec pool;
  const std::vector<int64_t> kernel = arguments.Ints("kernel", 2);
  const std::vector<int64_t> stride = arguments.Ints("stride", 2);
  const std::vector<int64_t> padding = arguments.Ints("padding", 2);
  const std::vector<int64_t> dilation = arguments.Ints("dilation", 2);
  pool.ceil_mode = arguments.Flag("ceil_mode");
  pool.kernel_h = kernel[0];
  pool.kernel_w = kernel[1];
  pool.stride_h = stride[0];
  pool.stride_w = stride[1];
  pool.pad_h = padding[0];
  pool.pad_w = padding[1];
  pool.dilation_h = dilation[0];
  pool.dilation_w = dilation[1];
  return pool;
}

AvgPool2dSpec ParseAvgPool2d(Arguments& arguments) {
  AvgPool2dSpec pool;
  const std::vector<int64_t> kernel = arguments.Ints("kernel", 2);
  const std::vector<int64_t> stride = arguments.Ints("stride", 2);
  const std::vector<int64_t> padding = arguments.Ints("padding", 2);
  pool.ceil_mode = arguments.Flag("ceil_mode");
  pool.count_include_pad = arguments.Flag("count_include_pad");
  pool.kernel_h = kernel[0];
  pool.kernel_w = kernel[1];
  pool.stride_h = stride[0];
  pool.stride_w = stride[1];
  pool.pad_h = padding[0];
  pool.pad_w = padding[1];
  return pool;
}

BatchNorm2dSpec ParseBatchNorm2d(Arguments& arguments) {
  BatchNorm2dSpec batch_norm;
  batch_norm.num_features = arguments.Int("num_features");
  batch_norm.eps = arguments.Double("eps");
  batch_norm.momentum = arguments.Double("momentum");
  batch_norm.affine = arguments.Flag("affine");
  batch_norm.training = arguments.Flag("training");
  return batch_norm;
}

LinearSpec ParseLinear(Arguments& arguments) {
  LinearSpec linear;
  linear.in_features = arguments.Int("in_features");
  linear.out_features = arguments.Int("out_features");
  linear.bias = arguments.Flag("bias");
  return linear;
}

// One layer line, and whether it gives the layer's buffers (running_stats=1; true for the
// kinds without that key).
struct ParsedLayer {
  LayerSpec layer;
  bool gives_buffers = true;
};

absl::StatusOr<ParsedLayer> ParseLayer(absl::Span<const absl::string_view> tokens,
                                       const std::string& where) {
  if (tokens.size() < 2) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": expected 'layer <name> <type>'"));
  }
  ParsedLayer parsed;
  LayerSpec& layer = parsed.layer;
  layer.name = std::string(tokens[0]);
  const absl::string_view type = tokens[1];
  absl::StatusOr<Arguments> arguments = Arguments::Parse(tokens.subspan(2), where);
  if (!arguments.ok()) return arguments.status();
  if (arguments->Has("input")) layer.input = arguments->String("input");

  static const auto* const kActivations = new std::map<absl::string_view, ActivationKind>{
      {"relu", ActivationKind::kRelu},         {"leaky_relu", ActivationKind::kLeakyRelu},
      {"tanh", ActivationKind::kTanh},         {"sigmoid", ActivationKind::kSigmoid},
      {"elu", ActivationKind::kElu},           {"gelu", ActivationKind::kGeluErf},
      {"gelu_tanh", ActivationKind::kGeluTanh}};
  if (type == "conv2d") {
    layer.op = ParseConv2d(*arguments);
  } else if (auto it = kActivations->find(type); it != kActivations->end()) {
    layer.op = ParseActivation(it->second, *arguments);
  } else if (type == "max_pool2d") {
    layer.op = ParseMaxPool2d(*arguments);
  } else if (type == "avg_pool2d") {
    layer.op = ParseAvgPool2d(*arguments);
  } else if (type == "batch_norm2d") {
    layer.op = ParseBatchNorm2d(*arguments);
    parsed.gives_buffers = arguments->Flag("running_stats");
  } else if (type == "linear") {
    layer.op = ParseLinear(*arguments);
  } else if (type == "add") {
    layer.op = AddSpec{arguments->String("other")};
  } else {
    return absl::InvalidArgumentError(absl::StrCat(where, ": unknown layer type '", type, "'"));
  }
  if (absl::Status status = arguments->Finish(); !status.ok()) return status;
  return parsed;
}

// The objective directive's arguments: its kind, then key=value pairs (cross_entropy's).
absl::Status ParseObjective(absl::Span<const absl::string_view> tokens, const std::string& where,
                            CaseSpec& spec) {
  if (tokens.empty()) return absl::InvalidArgumentError(absl::StrCat(where, ": no objective"));
  const absl::string_view kind = tokens[0];
  absl::StatusOr<Arguments> arguments = Arguments::Parse(tokens.subspan(1), where);
  if (!arguments.ok()) return arguments.status();
  if (kind == "mse") {
    spec.objective = ObjectiveKind::kMse;
  } else if (kind == "sum") {
    spec.objective = ObjectiveKind::kSum;
  } else if (kind == "grad_output") {
    spec.objective = ObjectiveKind::kGradOutput;
  } else if (kind == "cross_entropy") {
    spec.objective = ObjectiveKind::kCrossEntropy;
    spec.label_smoothing = arguments->Double("label_smoothing");
    spec.ignore_index = arguments->Int("ignore_index");
  } else {
    return absl::InvalidArgumentError(absl::StrCat(where, ": unknown objective '", kind, "'"));
  }
  return arguments->Finish();
}

absl::StatusOr<bool> ParseFlag(absl::Span<const absl::string_view> tokens,
                               const std::string& where) {
  if (tokens.size() != 1 || (tokens[0] != "0" && tokens[0] != "1")) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": input_grad takes 0 or 1, got '", absl::StrJoin(tokens, " "), "'"));
  }
  return tokens[0] == "1";
}

using gradengine::Overloaded;

// Whether `layer` returns its buffers updated, in a result's running_stats.
bool UpdatesBuffers(const LayerSpec& layer) {
  return std::visit(Overloaded{
                        [](const Conv2dSpec&) { return false; },
                        [](const ActivationSpec&) { return false; },
                        [](const MaxPool2dSpec&) { return false; },
                        [](const AvgPool2dSpec&) { return false; },
                        [](const BatchNorm2dSpec& batch_norm) { return batch_norm.training; },
                        [](const LinearSpec&) { return false; },
                        [](const AddSpec&) { return false; },
                    },
                    layer.op);
}

// The names of a case's tensors, in layer order, as gradengine::LayerParameters gives them.
struct TensorNames {
  std::vector<std::string> learnable;  // what param_grads may name
  std::vector<std::string> given;      // params/: the parameters and the buffers given
  std::vector<std::string> updated;    // buffers the result returns updated
};

TensorNames CaseTensorNames(const CaseSpec& spec) {
  TensorNames names;
  for (const LayerSpec& layer : spec.network.layers) {
    const bool updates = UpdatesBuffers(layer);
    for (const gradengine::ParameterInfo& info : gradengine::LayerParameters(layer)) {
      if (info.trainable) names.learnable.push_back(info.name);
      if (spec.omitted_buffers.count(info.name) == 0) names.given.push_back(info.name);
      if (!info.trainable && updates) names.updated.push_back(info.name);
    }
  }
  return names;
}

// The file holding the objective's tensor or labels; null for sum, which has none.
const char* ObjectiveFile(ObjectiveKind kind) {
  switch (kind) {
    case ObjectiveKind::kMse:
      return "target.npy";
    case ObjectiveKind::kSum:
      return nullptr;
    case ObjectiveKind::kGradOutput:
      return "grad_output.npy";
    case ObjectiveKind::kCrossEntropy:
      return "labels.npy";
  }
  return nullptr;
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

// Reads the int64 class indices of labels.npy.
absl::Status ReadLabels(const std::string& path, std::vector<int64_t>& shape,
                        std::vector<int64_t>& labels) {
  absl::StatusOr<gradclient::NpyInt64Array> array = gradclient::ReadNpyInt64File(path);
  if (!array.ok()) return array.status();
  shape = std::move(array->shape);
  labels = std::move(array->data);
  return absl::OkStatus();
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

// Checks `actual` against the case's expected running statistics: the same names, each close.
void CompareRunningStats(const FixtureCase& fixture, const gradengine::ParameterTensors& actual,
                         std::vector<std::string>& failures) {
  for (const auto& [name, expected] : fixture.expected_running_stats) {
    auto it = actual.find(name);
    if (it == actual.end()) {
      failures.push_back(absl::StrCat(name, ": running statistic absent"));
    } else {
      CompareTensor(name, it->second, expected, failures);
    }
  }
  for (const auto& [name, unused] : actual) {
    if (fixture.expected_running_stats.count(name) == 0) {
      failures.push_back(absl::StrCat(name, ": running statistic present but not expected"));
    }
  }
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
      absl::StatusOr<ParsedLayer> parsed = ParseLayer(rest, where);
      if (!parsed.ok()) return parsed.status();
      const LayerSpec& layer = parsed->layer;
      if (!layer_names.insert(layer.name).second) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": layer name '", layer.name, "' repeated"));
      }
      if (!parsed->gives_buffers) {
        for (const gradengine::ParameterInfo& info : gradengine::LayerParameters(layer)) {
          if (info.trainable) continue;
          if (info.required) {
            return absl::InvalidArgumentError(absl::StrCat(where, ": running_stats=0, but layer '",
                                                           layer.name, "' requires ", info.name));
          }
          spec.omitted_buffers.insert(info.name);
        }
      }
      spec.network.layers.push_back(std::move(parsed->layer));
    } else if (directive == "objective") {
      if (seen_objective) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": objective repeated"));
      }
      seen_objective = true;
      if (absl::Status status = ParseObjective(rest, where, spec); !status.ok()) return status;
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
  const std::vector<std::string> known = CaseTensorNames(spec).learnable;
  if (*param_grads == std::vector<std::string>{"all"}) {
    spec.gradients.all_parameters = true;
  } else if (*param_grads == std::vector<std::string>{"none"}) {
    spec.gradients.all_parameters = false;
  } else {
    spec.gradients.all_parameters = false;
    std::set<std::string> seen;
    for (const std::string& name : *param_grads) {
      if (std::find(known.begin(), known.end(), name) == known.end()) {
        return absl::InvalidArgumentError(
            absl::StrCat(source, ": param_grads names '", name,
                         "', which is not a learnable parameter of the network"));
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
  const TensorNames names = CaseTensorNames(case_spec);
  const std::vector<std::string>& requested =
      case_spec.gradients.all_parameters ? names.learnable : case_spec.gradients.parameters;
  const char* const objective_file = ObjectiveFile(case_spec.objective);
  const bool has_loss = case_spec.objective != ObjectiveKind::kGradOutput;

  // The files this spec calls for, and no others.
  std::set<std::string> top_files = {"case.txt", "input.npy"};
  if (objective_file != nullptr) top_files.insert(objective_file);
  std::set<std::string> top_directories = {"expected"};
  if (!names.given.empty()) top_directories.insert("params");
  std::set<std::string> parameter_files;
  for (const std::string& name : names.given) parameter_files.insert(name + ".npy");
  std::set<std::string> expected_files = {"output.npy"};
  if (has_loss) expected_files.insert("loss.npy");
  if (case_spec.gradients.input) expected_files.insert("input.grad.npy");
  for (const std::string& name : requested) expected_files.insert(name + ".grad.npy");
  for (const std::string& name : names.updated) expected_files.insert(name + ".npy");
  if (absl::Status status = CheckDirectoryContents(directory, top_files, top_directories);
      !status.ok()) {
    return status;
  }
  if (!names.given.empty()) {
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
  for (const std::string& name : names.given) {
    absl::StatusOr<Tensor> parameter = ReadTensor(path("params/" + name + ".npy"));
    if (!parameter.ok()) return parameter.status();
    fixture->parameters[name] = *std::move(parameter);
  }
  if (case_spec.objective == ObjectiveKind::kCrossEntropy) {
    absl::Status status = ReadLabels(path(objective_file), fixture->labels_shape, fixture->labels);
    if (!status.ok()) return status;
  } else if (objective_file != nullptr) {
    absl::StatusOr<Tensor> objective_tensor = ReadTensor(path(objective_file));
    if (!objective_tensor.ok()) return objective_tensor.status();
    fixture->objective_tensor = *std::move(objective_tensor);
  }

  absl::StatusOr<Tensor> output = ReadTensor(path("expected/output.npy"));
  if (!output.ok()) return output.status();
  fixture->expected_output = *std::move(output);
  if (has_loss) {
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
  for (const std::string& name : names.updated) {
    absl::StatusOr<Tensor> stat = ReadTensor(path("expected/" + name + ".npy"));
    if (!stat.ok()) return stat.status();
    fixture->expected_running_stats[name] = *std::move(stat);
  }

  // Views into the tensors above, which stay where they are: the FixtureCase never moves.
  gradengine::GradientRequest& request = fixture->request;
  request.network = case_spec.network;
  for (const auto& [name, tensor] : fixture->parameters) request.parameters[name] = tensor.view();
  request.input = fixture->input.view();
  gradengine::Objective& objective = request.objective;
  objective.kind = case_spec.objective;
  switch (case_spec.objective) {
    case ObjectiveKind::kMse:
    case ObjectiveKind::kGradOutput:
      objective.tensor = fixture->objective_tensor.view();
      break;
    case ObjectiveKind::kSum:
      break;
    case ObjectiveKind::kCrossEntropy:
      objective.labels.shape = fixture->labels_shape;
      objective.labels.data = fixture->labels.data();
      objective.labels.size = static_cast<int64_t>(fixture->labels.size());
      objective.label_smoothing = case_spec.label_smoothing;
      objective.ignore_index = case_spec.ignore_index;
      break;
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
  CompareRunningStats(fixture, result.running_stats, failures);
  return Summarize(fixture, failures);
}

::testing::AssertionResult ForwardResultMatches(const FixtureCase& fixture,
                                                const gradengine::ForwardResult& result) {
  std::vector<std::string> failures;
  CompareTensor("forward output", result.output, fixture.expected_output, failures);
  CompareRunningStats(fixture, result.running_stats, failures);
  return Summarize(fixture, failures);
}

}  // namespace gradtest
