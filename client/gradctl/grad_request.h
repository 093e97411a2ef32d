// The request gradctl grad and gradctl gradcheck make of their files (GradOptions): reading the
// network, input, parameters and objective, and the objective the flags select.

#ifndef CLIENT_GRADCTL_GRAD_REQUEST_H_
#define CLIENT_GRADCTL_GRAD_REQUEST_H_

#include <map>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "client/gradctl/commands.h"
#include "gradclient/npy.h"
#include "gradengine/network.h"
#include "gradengine/tensor.h"

namespace gradctl {

// The tensors a request borrows.
struct RequestData {
  gradengine::NetworkSpec network;
  gradengine::Tensor input;
  std::map<std::string, gradengine::Tensor> parameters;
  gradengine::Tensor objective_tensor;  // --target or --grad_output
  gradclient::NpyInt64Array labels;     // --objective=cross_entropy
};

// The objective flags of `options`: exactly one objective, and the cross_entropy flags only
// with it. Usage errors name `command` ("grad", "gradcheck") and the flag.
absl::Status CheckObjectiveOptions(const GradOptions& options, absl::string_view command);

// Reads the network, the input and the parameters (ReadParameters) and, when
// options.gradients, the objective's tensor or labels, every .npy through ReadFloatNpy /
// ReadLabelsNpy (cli_util.h).
absl::StatusOr<RequestData> ReadRequestData(const GradOptions& options);

// The objective the flags of `options` select, borrowing `data`'s tensors.
// REQUIRES: CheckObjectiveOptions(options) is OK; `data` outlives the result.
gradengine::Objective MakeObjective(const GradOptions& options, const RequestData& data);

}  // namespace gradctl

#endif  // CLIENT_GRADCTL_GRAD_REQUEST_H_
