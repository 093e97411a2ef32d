// The one place where the server turns an absl::Status into the grpc::Status a client sees.
//
// absl::StatusCode and grpc::StatusCode share their numbering; ToGrpcStatus keeps the code and
// the message unchanged, so "layers[1].conv2d.groups=3 does not divide in_channels=4" with
// INVALID_ARGUMENT reaches the client exactly as the engine wrote it. A code outside the
// canonical range (which absl::Status can carry) becomes UNKNOWN with the original code
// named in the message.

#ifndef SERVER_STATUS_CONVERSION_H_
#define SERVER_STATUS_CONVERSION_H_

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace gradserver {

grpc::Status ToGrpcStatus(const absl::Status& status);

}  // namespace gradserver

#endif  // SERVER_STATUS_CONVERSION_H_
