// Runs the seed notebook's three demos through the engine and prints them the way the notebook
// does: the output shape, the loss and every gradient as PyTorch prints tensors. Each number is
// checked against what PyTorch 1.13 computed for the same inputs (tests/fixtures/seed_*), and
// the exit code is non-zero if any differs beyond the project's tolerance.
//
//   seed_demo [conv1|conv4|layer|all] [--fixtures=DIR]

#include <cmath>
#include <cstdio>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "gradclient/tensor_format.h"
#include "gradengine/engine.h"
#include "tests/tolerance.h"
#include "tests/torch/fixture.h"

namespace {

struct Demo {
  std::string name;  // as given on the command line
  std::string fixture;
  std::string title;
};

const std::vector<Demo>& Demos() {
  static const auto* demos = new std::vector<Demo>{
      {"conv1", "seed_conv1",
       "Backward through 1 convolution layer: conv2d 1->8, 3x3, padding 1, MSE"},
      {"conv4", "seed_conv4",
       "Backward through 4 convolution layers: 1->8->16->32->64, 3x3, padding 1, ReLU, MSE"},
      {"layer", "seed_layer",
       "A Conv2D layer with bias: 1->8, 3x3, padding 0 -> [1, 8, 26, 26], MSE"},
  };
  return *demos;
}

// Largest |a - b| relative to max(1, max |b|), the quantity tests/tolerance.h bounds.
double RelativeError(const gradengine::Tensor& actual, const gradengine::Tensor& expected) {
  double scale = 1.0;
  double worst = 0.0;
  for (float v : expected.data) scale = std::max(scale, std::abs(static_cast<double>(v)));
  for (size_t i = 0; i < actual.data.size() && i < expected.data.size(); ++i) {
    worst = std::max(worst, std::abs(static_cast<double>(actual.data[i]) - expected.data[i]));
  }
  return worst / scale;
}

void PrintTensor(const std::string& heading, const gradengine::Tensor& tensor) {
  std::cout << heading << "\n"
            << gradclient::FormatTensorLikeTorch(tensor.shape, tensor.data) << "\n";
}

// Runs one demo; returns whether every number matched PyTorch.
bool RunDemo(gradengine::Engine& engine, const Demo& demo, const std::string& fixtures) {
  std::cout << "# " << demo.title << "\n";
  absl::StatusOr<std::unique_ptr<gradtest::FixtureCase>> fixture =
      gradtest::LoadFixtureCase(fixtures + "/" + demo.fixture);
  if (!fixture.ok()) {
    std::cerr << "cannot load " << demo.fixture << ": " << fixture.status() << "\n";
    return false;
  }
  absl::StatusOr<gradengine::GradientResult> result = engine.ComputeGradients((*fixture)->request);
  if (!result.ok()) {
    std::cerr << demo.name << ": " << result.status() << "\n";
    return false;
  }
  std::cout << "Output tensor shape: " << gradengine::ShapeToString(result->output.shape) << "\n";
  if (result->loss.has_value()) {
    std::cout << absl::StrFormat("Loss: %.6f (PyTorch: %.6f)\n", *result->loss,
                                 (*fixture)->expected_loss->data[0]);
  }
  double worst = RelativeError(result->output, (*fixture)->expected_output);
  if (result->input_grad.has_value()) {
    PrintTensor("Gradients for the input tensor:", *result->input_grad);
    worst = std::max(worst, RelativeError(*result->input_grad, *(*fixture)->expected_input_grad));
  }
  for (const auto& [name, grad] : result->parameter_grads) {
    PrintTensor(absl::StrCat("Gradients for ", name, ":"), grad);
    worst = std::max(worst, RelativeError(grad, (*fixture)->expected_parameter_grads.at(name)));
  }
  const ::testing::AssertionResult matches = gradtest::GradientResultMatches(**fixture, *result);
  std::cout << absl::StrFormat(
      "%s PyTorch: largest difference %.2e of the tensor's scale (tolerance %.0e)\n\n",
      matches ? "Matches" : "DOES NOT MATCH", worst, gradtest::kRelativeTolerance);
  if (!matches) std::cerr << matches.message() << "\n";
  return static_cast<bool>(matches);
}

}  // namespace

int main(int argc, char** argv) {
  std::string which = "all";
  std::string fixtures = GRAD_DEFAULT_FIXTURES;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (absl::StartsWith(arg, "--fixtures=")) {
      fixtures = arg.substr(std::string("--fixtures=").size());
    } else if (arg == "--help" || arg == "-h") {
      std::cout << "usage: seed_demo [conv1|conv4|layer|all] [--fixtures=DIR]\n";
      return 0;
    } else {
      which = arg;
    }
  }
  bool known = which == "all";
  for (const Demo& demo : Demos()) known = known || demo.name == which;
  if (!known) {
    std::cerr << "unknown demo \"" << which << "\"; choose conv1, conv4, layer or all\n";
    return 2;
  }

  absl::StatusOr<std::unique_ptr<gradengine::Engine>> engine = gradengine::Engine::Create({});
  if (!engine.ok()) {
    std::cerr << engine.status() << "\n";
    return 1;
  }
  bool all_match = true;
  for (const Demo& demo : Demos()) {
    if (which == "all" || which == demo.name) all_match &= RunDemo(**engine, demo, fixtures);
  }
  return all_match ? 0 : 1;
}
