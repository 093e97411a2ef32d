#include "gradclient/seed_demo.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/types/span.h"
#include "gradclient/npy.h"
#include "gradclient/tensor_format.h"
#include "gradengine/tensor.h"

namespace gradclient {
namespace {

using gradengine::ActivationKind;
using gradengine::ActivationSpec;
using gradengine::Conv2dSpec;
using gradengine::LayerSpec;
using gradengine::NetworkSpec;
using gradengine::Tensor;

NetworkSpec OneConvolution(int64_t padding, bool bias) {
  NetworkSpec network;
  network.layers.push_back(LayerSpec{"conv1", Conv2dSpec::Square(1, 8, 3, 1, padding, bias)});
  return network;
}

NetworkSpec FourConvolutionsWithRelu() {
  NetworkSpec network;
  const int64_t channels[] = {1, 8, 16, 32, 64};
  for (int i = 1; i <= 4; ++i) {
    network.layers.push_back(LayerSpec{
        absl::StrCat("conv", i), Conv2dSpec::Square(channels[i - 1], channels[i], 3, 1, 1, false)});
    network.layers.push_back(
        LayerSpec{absl::StrCat("relu", i), ActivationSpec{ActivationKind::kRelu}});
  }
  return network;
}

// The names of the learnable parameters `network` uses, in layer order: those the demo data
// hold a value and an expected gradient for.
std::vector<std::string> ParameterNames(const NetworkSpec& network) {
  std::vector<std::string> names;
  for (const LayerSpec& layer : network.layers) {
    for (const gradengine::ParameterInfo& parameter : gradengine::LayerParameters(layer)) {
      if (parameter.trainable) names.push_back(parameter.name);
    }
  }
  return names;
}

absl::StatusOr<Tensor> ReadTensor(const std::string& path) {
  absl::StatusOr<NpyArray> array = ReadNpyFile(path);
  if (!array.ok()) return array.status();
  return Tensor(std::move(array->shape), std::move(array->data));
}

// A demo's tensors as stored in its data directory.
struct DemoData {
  Tensor input;
  Tensor target;
  std::map<std::string, Tensor> parameters;
  Tensor expected_output;
  double expected_loss = 0;
  Tensor expected_input_grad;
  std::map<std::string, Tensor> expected_parameter_grads;
};

absl::StatusOr<DemoData> LoadDemoData(const SeedDemo& demo, const std::string& data_dir) {
  const std::string dir = absl::StrCat(data_dir, "/", demo.data, "/");
  DemoData data;
  auto read = [&](const std::string& file, Tensor* tensor) {
    absl::StatusOr<Tensor> read_tensor = ReadTensor(dir + file);
    if (!read_tensor.ok()) return read_tensor.status();
    *tensor = *std::move(read_tensor);
    return absl::OkStatus();
  };
  if (absl::Status s = read("input.npy", &data.input); !s.ok()) return s;
  if (absl::Status s = read("target.npy", &data.target); !s.ok()) return s;
  if (absl::Status s = read("expected/output.npy", &data.expected_output); !s.ok()) return s;
  if (absl::Status s = read("expected/input.grad.npy", &data.expected_input_grad); !s.ok()) {
    return s;
  }
  Tensor loss;
  if (absl::Status s = read("expected/loss.npy", &loss); !s.ok()) return s;
  if (loss.data.size() != 1) {
    return absl::InvalidArgumentError(absl::StrCat(dir, "expected/loss.npy: shape ",
                                                   gradengine::ShapeToString(loss.shape), " holds ",
                                                   loss.data.size(), " values; expected one"));
  }
  data.expected_loss = loss.data[0];
  for (const std::string& name : ParameterNames(demo.network)) {
    if (absl::Status s = read(absl::StrCat("params/", name, ".npy"), &data.parameters[name]);
        !s.ok()) {
      return s;
    }
    if (absl::Status s = read(absl::StrCat("expected/", name, ".grad.npy"),
                              &data.expected_parameter_grads[name]);
        !s.ok()) {
      return s;
    }
  }
  return data;
}

// How one computed tensor compares with PyTorch's.
struct Comparison {
  // max |actual - expected| / max(1, max |expected|) over the finite values.
  double relative_error = 0;
  // Empty when the tensor matches; otherwise why not.
  std::string mismatch;
};

Comparison Compare(const std::string& what, absl::Span<const int64_t> actual_shape,
                   absl::Span<const float> actual, const Tensor& expected) {
  Comparison comparison;
  if (std::vector<int64_t>(actual_shape.begin(), actual_shape.end()) != expected.shape ||
      actual.size() != expected.data.size()) {
    comparison.mismatch = absl::StrCat(what, ": shape ", gradengine::ShapeToString(actual_shape),
                                       " with ", actual.size(), " values; PyTorch's is ",
                                       gradengine::ShapeToString(expected.shape));
    return comparison;
  }
  double scale = 1.0;
  for (float v : expected.data) {
    if (std::isfinite(v)) scale = std::max(scale, std::abs(static_cast<double>(v)));
  }
  double worst = 0.0;
  size_t worst_index = 0;
  for (size_t i = 0; i < actual.size(); ++i) {
    const double a = actual[i];
    const double e = expected.data[i];
    if (!std::isfinite(a) || !std::isfinite(e)) {
      if (!((std::isnan(a) && std::isnan(e)) || a == e)) {
        comparison.mismatch = absl::StrCat(what, "[", i, "] = ", a, "; PyTorch's is ", e);
        return comparison;
      }
      continue;
    }
    if (std::abs(a - e) > worst) {
      worst = std::abs(a - e);
      worst_index = i;
    }
  }
  comparison.relative_error = worst / scale;
  if (comparison.relative_error > kSeedDemoRelativeTolerance) {
    comparison.mismatch = absl::StrFormat(
        "%s: max |actual - expected| = %g at flat index %d (%g; PyTorch's is %g) exceeds "
        "%g * %g",
        what, worst, worst_index, actual[worst_index], expected.data[worst_index],
        kSeedDemoRelativeTolerance, scale);
  }
  return comparison;
}

void PrintTensor(const std::string& heading, const Tensor& tensor, std::ostream& out) {
  out << heading << "\n" << FormatTensorLikeTorch(tensor.shape, tensor.data) << "\n";
}

// Runs one demo; returns whether every number matched PyTorch's.
absl::StatusOr<bool> RunDemo(const SeedDemo& demo, const std::string& data_dir,
                             const GradientRunner& runner, std::ostream& out) {
  absl::StatusOr<DemoData> data = LoadDemoData(demo, data_dir);
  if (!data.ok()) return data.status();
  gradengine::GradientRequest request;
  request.network = demo.network;
  request.input = data->input.view();
  for (const auto& [name, tensor] : data->parameters) request.parameters[name] = tensor.view();
  request.objective = {gradengine::ObjectiveKind::kMse, data->target.view()};

  out << "# " << demo.title << "\n";
  absl::StatusOr<gradengine::GradientResult> result = runner(request);
  if (!result.ok()) return result.status();

  std::vector<std::string> mismatches;
  double worst = 0.0;
  auto check = [&](const std::string& what, const Tensor& actual, const Tensor& expected) {
    Comparison comparison = Compare(what, actual.shape, actual.data, expected);
    worst = std::max(worst, comparison.relative_error);
    if (!comparison.mismatch.empty()) mismatches.push_back(std::move(comparison.mismatch));
  };

  out << "Output tensor shape: " << gradengine::ShapeToString(result->output.shape) << "\n";
  check("output", result->output, data->expected_output);
  if (result->loss.has_value()) {
    out << absl::StrFormat("Loss: %.6f (PyTorch: %.6f)\n", *result->loss, data->expected_loss);
    const float loss = static_cast<float>(*result->loss);
    Tensor expected_loss({1}, {static_cast<float>(data->expected_loss)});
    Comparison comparison = Compare("loss", {1}, absl::MakeConstSpan(&loss, 1), expected_loss);
    worst = std::max(worst, comparison.relative_error);
    if (!comparison.mismatch.empty()) mismatches.push_back(std::move(comparison.mismatch));
  } else {
    mismatches.push_back("loss: missing from the result");
  }
  if (result->input_grad.has_value()) {
    PrintTensor("Gradients for the input tensor:", *result->input_grad, out);
    check("input gradient", *result->input_grad, data->expected_input_grad);
  } else {
    mismatches.push_back("input gradient: missing from the result");
  }
  for (const auto& [name, grad] : result->parameter_grads) {
    PrintTensor(absl::StrCat("Gradients for ", name, ":"), grad, out);
    auto expected = data->expected_parameter_grads.find(name);
    if (expected == data->expected_parameter_grads.end()) {
      mismatches.push_back(absl::StrCat(name, " gradient: not a parameter of the network"));
    } else {
      check(absl::StrCat(name, " gradient"), grad, expected->second);
    }
  }
  for (const auto& [name, expected] : data->expected_parameter_grads) {
    if (result->parameter_grads.count(name) == 0) {
      mismatches.push_back(absl::StrCat(name, " gradient: missing from the result"));
    }
  }

  out << absl::StrFormat(
      "%s PyTorch: largest difference %.2e of the tensor's scale (tolerance %.0e)\n",
      mismatches.empty() ? "Matches" : "DOES NOT MATCH", worst, kSeedDemoRelativeTolerance);
  for (const std::string& mismatch : mismatches) out << "  " << mismatch << "\n";
  out << "\n";
  return mismatches.empty();
}

}  // namespace

const std::vector<SeedDemo>& SeedDemos() {
  static const auto* demos = new std::vector<SeedDemo>{
      {"conv1", "seed_conv1",
       "Backward through 1 convolution layer: conv2d 1->8, 3x3, padding 1, MSE",
       OneConvolution(/*padding=*/1, /*bias=*/false)},
      {"conv4", "seed_conv4",
       "Backward through 4 convolution layers: 1->8->16->32->64, 3x3, padding 1, ReLU, MSE",
       FourConvolutionsWithRelu()},
      {"layer", "seed_layer",
       "A Conv2D layer with bias: 1->8, 3x3, padding 0 -> [1, 8, 26, 26], MSE",
       OneConvolution(/*padding=*/0, /*bias=*/true)},
  };
  return *demos;
}

absl::StatusOr<bool> RunSeedDemos(absl::string_view which, const std::string& data_dir,
                                  const GradientRunner& runner, std::ostream& out) {
  bool known = which == "all";
  for (const SeedDemo& demo : SeedDemos()) known = known || demo.name == which;
  if (!known) {
    return absl::InvalidArgumentError(
        absl::StrCat("demo \"", which, "\" is unknown; choose conv1, conv4, layer or all"));
  }
  bool all_match = true;
  for (const SeedDemo& demo : SeedDemos()) {
    if (which != "all" && which != demo.name) continue;
    absl::StatusOr<bool> matches = RunDemo(demo, data_dir, runner, out);
    if (!matches.ok()) return matches.status();
    all_match = all_match && *matches;
  }
  return all_match;
}

}  // namespace gradclient
