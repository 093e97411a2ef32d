// Reference cases computed by PyTorch (written by tests/torch/generate_fixtures.py): loading a
// case directory into an engine request, and checking an engine result against the case's
// expected tensors with the project's one tolerance (tests/tolerance.h).
//
// A case directory holds:
//   case.txt                   the spec, one directive a line ('#' starts a comment):
//       layer <name> conv2d in_channels=C out_channels=C kernel=H,W stride=H,W
//                    padding=TOP,BOTTOM,LEFT,RIGHT dilation=H,W groups=G bias=0|1
//       layer <name> relu | tanh | sigmoid | gelu | gelu_tanh
//       layer <name> leaky_relu negative_slope=F
//       layer <name> elu alpha=F
//       objective mse | sum | grad_output
//       input_grad 0|1
//       param_grads all | none | <parameter name>...
//   input.npy, params/<layer>.weight.npy, params/<layer>.bias.npy (iff bias=1),
//   target.npy (mse) or grad_output.npy (grad_output),
//   expected/output.npy, expected/loss.npy (shape [1], absent for grad_output),
//   expected/input.grad.npy (iff input_grad 1), expected/<parameter>.grad.npy per requested one.
// Every .npy is little-endian float32 in C order. Loading is strict: an unknown directive or
// key, a missing or repeated one, and a missing or unexpected file are all InvalidArgument (a
// missing file NotFound), so a case never silently tests less than it says.

#ifndef TESTS_TORCH_FIXTURE_H_
#define TESTS_TORCH_FIXTURE_H_

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "gradengine/engine.h"
#include "gradengine/network.h"
#include "gradengine/tensor.h"
#include "gtest/gtest.h"

namespace gradtest {

// What case.txt says.
struct CaseSpec {
  gradengine::NetworkSpec network;
  gradengine::ObjectiveKind objective = gradengine::ObjectiveKind::kMse;
  gradengine::GradientSelection gradients;
};

// Parses the text of a case.txt. `source` names it in error messages, which also give the
// line number. Checks the grammar only; whether the network is valid is the engine's call.
absl::StatusOr<CaseSpec> ParseCaseSpec(absl::string_view text, absl::string_view source);

// One loaded case. It owns every tensor, and `request` borrows views of them, so a
// FixtureCase is neither copied nor moved: LoadFixtureCase hands it out behind a unique_ptr.
struct FixtureCase {
  FixtureCase() = default;
  FixtureCase(const FixtureCase&) = delete;
  FixtureCase& operator=(const FixtureCase&) = delete;

  // The same network, parameters and input as `request`, for Engine::Forward.
  gradengine::ForwardRequest MakeForwardRequest() const;

  std::string name;  // the directory's base name
  std::string directory;
  CaseSpec spec;

  gradengine::Tensor input;
  std::map<std::string, gradengine::Tensor> parameters;
  // The target (mse) or the gradient of the output (grad_output); empty for sum.
  gradengine::Tensor objective_tensor;

  gradengine::GradientRequest request;

  gradengine::Tensor expected_output;
  std::optional<gradengine::Tensor> expected_loss;        // shape [1]; absent for grad_output
  std::optional<gradengine::Tensor> expected_input_grad;  // present iff requested
  // One entry per requested parameter gradient, by parameter name.
  std::map<std::string, gradengine::Tensor> expected_parameter_grads;
};

// Loads the case in `directory`.
absl::StatusOr<std::unique_ptr<FixtureCase>> LoadFixtureCase(const std::string& directory);

// The case directories (those holding a case.txt) directly under `root`, sorted by name.
// NotFound if `root` is not a directory.
absl::StatusOr<std::vector<std::string>> FindFixtureCases(const std::string& root);

// Checks a ComputeGradients result against the case: output, loss and every requested
// gradient within gradtest::kRelativeTolerance, the loss present iff the objective has one,
// and exactly the requested gradients present. The failure message lists every mismatch.
::testing::AssertionResult GradientResultMatches(const FixtureCase& fixture,
                                                 const gradengine::GradientResult& result);

// Checks a Forward result's output against the case's expected output.
::testing::AssertionResult ForwardResultMatches(const FixtureCase& fixture,
                                                const gradengine::ForwardResult& result);

}  // namespace gradtest

#endif  // TESTS_TORCH_FIXTURE_H_
