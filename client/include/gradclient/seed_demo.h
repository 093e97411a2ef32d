// The seed notebook's three demos, runnable through any gradient computation: the engine in
// process (tests/demo/seed_demo) or the service (gradctl demo).
//
//   conv1  one convolution 1->8, 3x3, padding 1, no bias, MSE
//   conv4  convolutions 1->8->16->32->64, 3x3, padding 1, no bias, ReLU after each, MSE
//   layer  one convolution 1->8, 3x3, padding 0, with bias, MSE (output [1, 8, 26, 26])
//
// The networks are built here; the data are the tensors PyTorch 1.13 used and computed, in
// <data_dir>/seed_conv1, seed_conv4 and seed_layer (tests/fixtures): input.npy, target.npy,
// params/<parameter>.npy, and expected/output.npy, loss.npy, input.grad.npy and
// <parameter>.grad.npy. Every demo requests the input gradient and every parameter gradient.
//
// Thread-compatible; keeps no state.

#ifndef GRADCLIENT_SEED_DEMO_H_
#define GRADCLIENT_SEED_DEMO_H_

#include <functional>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "gradengine/network.h"

namespace gradclient {

// A demo's numbers match PyTorch's when, for every tensor (and the loss),
//     max |actual - expected| <= kSeedDemoRelativeTolerance * max(1, max |expected|)
// and non-finite values agree in kind. This is the project's one tolerance,
// gradtest::kRelativeTolerance in tests/tolerance.h (the bound oneDNN's own tests use), restated
// here so the client does not depend on the test headers; tests/cli checks the two are equal.
inline constexpr double kSeedDemoRelativeTolerance = 1e-4;

struct SeedDemo {
  std::string name;  // "conv1", "conv4", "layer"
  std::string data;  // the directory under the data directory: "seed_conv1", ...
  std::string title;
  gradengine::NetworkSpec network;
};

// The three demos, in the notebook's order.
const std::vector<SeedDemo>& SeedDemos();

// Computes a request's result; e.g. a gradengine::Engine or a gradclient::Client.
using GradientRunner =
    std::function<absl::StatusOr<gradengine::GradientResult>(const gradengine::GradientRequest&)>;

// Runs the demo called `which` ("conv1", "conv4", "layer"), or all three for "all", through
// `runner`, and writes to `out` what the notebook printed: a title line, the output shape, the
// loss next to PyTorch's, every gradient as PyTorch prints tensors, and a line saying whether
// every number matches PyTorch's within kSeedDemoRelativeTolerance (listing each mismatch if
// not).
//
// Returns true iff every number of every demo run matches. Errors: InvalidArgument for an
// unknown `which` (naming the choices); the .npy reader's errors, which name the file, for
// missing or malformed data; the runner's own status, unchanged, if it fails. The first error
// ends the run.
absl::StatusOr<bool> RunSeedDemos(absl::string_view which, const std::string& data_dir,
                                  const GradientRunner& runner, std::ostream& out);

}  // namespace gradclient

#endif  // GRADCLIENT_SEED_DEMO_H_
