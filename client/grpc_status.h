// The client's one conversion from gRPC statuses to absl::Status, the inverse of the server's
// ToGrpcStatus. Private to client/.

#ifndef CLIENT_GRPC_STATUS_H_
#define CLIENT_GRPC_STATUS_H_

#include "absl/status/status.h"
#include "grpcpp/support/status.h"

namespace gradclient {

// The same code (gRPC's and absl's codes are the same 17 values) and the same message; a code
// outside that range becomes Unknown, with the number in the message. OK maps to OkStatus().
absl::Status FromGrpcStatus(const grpc::Status& status);

}  // namespace gradclient

#endif  // CLIENT_GRPC_STATUS_H_
