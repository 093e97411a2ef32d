// gradctl demo: the seed notebook's demos (gradclient/seed_demo.h) through the server.

#include <iostream>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "client/gradctl/cli_util.h"
#include "client/gradctl/commands.h"
#include "gradclient/client.h"
#include "gradclient/seed_demo.h"

namespace gradctl {

absl::Status RunDemo(const DemoOptions& options) {
  bool known = options.which == "all";
  for (const gradclient::SeedDemo& demo : gradclient::SeedDemos()) {
    known = known || demo.name == options.which;
  }
  if (!known) {
    return UsageError(
        absl::StrCat("demo \"", options.which, "\" is unknown; choose conv1, conv4, layer or all"));
  }
  absl::StatusOr<std::unique_ptr<gradclient::Client>> client = Connect(options.connection);
  if (!client.ok()) return client.status();
  absl::StatusOr<bool> all_match = gradclient::RunSeedDemos(
      options.which, options.data_dir,
      [&](const gradengine::GradientRequest& request)
          -> absl::StatusOr<gradengine::GradientResult> {
        absl::StatusOr<gradclient::GradientReply> reply = (*client)->ComputeGradients(request);
        if (!reply.ok()) return reply.status();
        return std::move(reply->result);
      },
      std::cout);
  if (!all_match.ok()) return all_match.status();
  if (!*all_match) {
    return absl::InternalError(
        "the server's results differ from PyTorch's beyond the tolerance; see DOES NOT MATCH "
        "above");
  }
  return absl::OkStatus();
}

}  // namespace gradctl
