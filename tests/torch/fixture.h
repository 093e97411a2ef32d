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
//       layer <name> max_pool2d kernel=H,W stride=H,W padding=H,W dilation=H,W ceil_mode=0|1
//       layer <name> avg_pool2d kernel=H,W stride=H,W padding=H,W ceil_mode=0|1
//                    count_include_pad=0|1
//       layer <name> batch_norm2d num_features=C eps=F momentum=F affine=0|1 training=0|1
//                    running_stats=0|1
//       layer <name> linear in_features=I out_features=O bias=0|1
//       layer <name> add other=<layer name>|input
//       objective mse | sum | grad_output
//       objective cross_entropy label_smoothing=F ignore_index=I
//       input_grad 0|1
//       param_grads all | none | <parameter name>...
//     Any layer line may end with input=<layer name>|input (LayerSpec::input): the layer
//     reads that earlier layer's output, or the network's input, instead of the previous
//     layer's. Pool padding is per side of H and of W. running_stats says whether params/
//     holds the layer's buffers (gradengine::LayerParameters entries that are not trainable);
//     0 is only valid where they are optional (training mode). Every other key is required.
//   input.npy,
//   params/<p>.npy for every p of gradengine::LayerParameters(layer), layer by layer, except
//     the buffers of a batch_norm2d with running_stats=0 ("<layer>.weight", "<layer>.bias",
//     "<layer>.running_mean", ...),
//   target.npy (mse), grad_output.npy (grad_output) or labels.npy (cross_entropy: int64 class
//     indices, [N] for [N, C] logits or [N, H, W] for [N, C, H, W]),
//   expected/output.npy, expected/loss.npy (shape [1], absent for grad_output),
//   expected/input.grad.npy (iff input_grad 1), expected/<parameter>.grad.npy per requested
//     one (only trainable parameters have gradients),
//   expected/<buffer>.npy for every buffer of a layer that updates them (batch_norm2d with
//     training=1: "<layer>.running_mean.npy", "<layer>.running_var.npy"), given or not: the
//     values after the call, as ForwardResult/GradientResult::running_stats return them.
// Every .npy but labels.npy is little-endian float32 in C order; labels.npy is little-endian
// int64. Loading is strict: an unknown directive or key, a missing or repeated one, and an
// unexpected file are all InvalidArgument, a missing file NotFound, so a case never silently
// tests less than it says.

#ifndef TESTS_TORCH_FIXTURE_H_
#define TESTS_TORCH_FIXTURE_H_

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <set>
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
  // cross_entropy only; the defaults are PyTorch's.
  double label_smoothing = 0.0;
  int64_t ignore_index = -100;
  gradengine::GradientSelection gradients;
  // The optional buffers the case does not give (running_stats=0), by name: the engine
  // starts them from ParameterInfo::fill.
  std::set<std::string> omitted_buffers;
};

// Parses the text of a case.txt. `source` names it in error messages, which also give the
// line number. Checks the grammar, and that param_grads names learnable parameters and
// running_stats=0 leaves out only optional buffers (as gradengine::LayerParameters says);
// whether the network is valid is the engine's call.
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
  // The parameters and the buffers the case gives, by name (params/).
  std::map<std::string, gradengine::Tensor> parameters;
  // The target (mse) or the gradient of the output (grad_output); empty for sum and
  // cross_entropy.
  gradengine::Tensor objective_tensor;
  // cross_entropy only: labels.npy, which request.objective.labels views.
  std::vector<int64_t> labels_shape;
  std::vector<int64_t> labels;

  gradengine::GradientRequest request;

  gradengine::Tensor expected_output;
  std::optional<gradengine::Tensor> expected_loss;        // shape [1]; absent for grad_output
  std::optional<gradengine::Tensor> expected_input_grad;  // present iff requested
  // One entry per requested parameter gradient, by parameter name.
  std::map<std::string, gradengine::Tensor> expected_parameter_grads;
  // One entry per buffer of a layer that updates them (batch_norm2d in training mode), by
  // name, as the result's running_stats should hold it.
  std::map<std::string, gradengine::Tensor> expected_running_stats;
};

// Loads the case in `directory`.
absl::StatusOr<std::unique_ptr<FixtureCase>> LoadFixtureCase(const std::string& directory);

// The case directories (those holding a case.txt) directly under `root`, sorted by name.
// NotFound if `root` is not a directory.
absl::StatusOr<std::vector<std::string>> FindFixtureCases(const std::string& root);

// Checks a ComputeGradients result against the case: output, loss, every requested gradient
// and every updated running statistic within gradtest::kRelativeTolerance, the loss present
// iff the objective has one, and exactly the requested gradients and the expected running
// statistics present. The failure message lists every mismatch.
::testing::AssertionResult GradientResultMatches(const FixtureCase& fixture,
                                                 const gradengine::GradientResult& result);

// Checks a Forward result's output and running statistics against the case's (a forward
// pass updates the running statistics as the gradient call's does).
::testing::AssertionResult ForwardResultMatches(const FixtureCase& fixture,
                                                const gradengine::ForwardResult& result);

}  // namespace gradtest

#endif  // TESTS_TORCH_FIXTURE_H_
