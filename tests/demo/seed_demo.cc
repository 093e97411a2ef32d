// Runs the seed notebook's three demos through the engine and prints them the way the notebook
// does: the output shape, the loss and every gradient as PyTorch prints tensors. Each number is
// checked against what PyTorch 1.13 computed for the same inputs (tests/fixtures/seed_*), and
// the exit code is non-zero if any differs beyond the project's tolerance. The demos
// themselves (networks, data, printing, checks) are gradclient/seed_demo.h, which gradctl demo
// runs through the service.
//
//   seed_demo [conv1|conv4|layer|all] [--fixtures=DIR]

#include "gradclient/seed_demo.h"

#include <iostream>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "gradengine/engine.h"

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
  for (const gradclient::SeedDemo& demo : gradclient::SeedDemos()) {
    known = known || demo.name == which;
  }
  if (!known) {
    std::cerr << "unknown demo \"" << which << "\"; choose conv1, conv4, layer or all\n";
    return 2;
  }

  absl::StatusOr<std::unique_ptr<gradengine::Engine>> engine = gradengine::Engine::Create({});
  if (!engine.ok()) {
    std::cerr << "seed_demo: " << engine.status() << "\n";
    return 1;
  }
  absl::StatusOr<bool> all_match = gradclient::RunSeedDemos(
      which, fixtures,
      [&](const gradengine::GradientRequest& request) {
        return (*engine)->ComputeGradients(request);
      },
      std::cout);
  if (!all_match.ok()) {
    std::cerr << "seed_demo: " << all_match.status() << "\n";
    return 1;
  }
  return *all_match ? 0 : 1;
}
