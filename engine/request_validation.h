// Checks a whole request (network, input, parameters, objective, gradient selection) before
// any oneDNN object is touched. Private to the engine.

#ifndef ENGINE_REQUEST_VALIDATION_H_
#define ENGINE_REQUEST_VALIDATION_H_

#include <cstdint>

#include "absl/status/statusor.h"
#include "gradengine/network.h"

namespace gradengine {

absl::StatusOr<ValidatedNetwork> ValidateForwardRequest(const ForwardRequest& request,
                                                        int64_t max_elements);

absl::StatusOr<ValidatedNetwork> ValidateGradientRequest(const GradientRequest& request,
                                                         int64_t max_elements);

}  // namespace gradengine

#endif  // ENGINE_REQUEST_VALIDATION_H_
