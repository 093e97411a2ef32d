#include "server/status_conversion.h"

#include <string>

#include "absl/strings/str_cat.h"

namespace gradserver {
namespace {

// Written out rather than cast so that the table is checked by the compiler and by a reader.
bool ToGrpcCode(absl::StatusCode code, grpc::StatusCode* out) {
  switch (code) {
    case absl::StatusCode::kOk:
      *out = grpc::StatusCode::OK;
      return true;
    case absl::StatusCode::kCancelled:
      *out = grpc::StatusCode::CANCELLED;
      return true;
    case absl::StatusCode::kUnknown:
      *out = grpc::StatusCode::UNKNOWN;
      return true;
    case absl::StatusCode::kInvalidArgument:
      *out = grpc::StatusCode::INVALID_ARGUMENT;
      return true;
    case absl::StatusCode::kDeadlineExceeded:
      *out = grpc::StatusCode::DEADLINE_EXCEEDED;
      return true;
    case absl::StatusCode::kNotFound:
      *out = grpc::StatusCode::NOT_FOUND;
      return true;
    case absl::StatusCode::kAlreadyExists:
      *out = grpc::StatusCode::ALREADY_EXISTS;
      return true;
    case absl::StatusCode::kPermissionDenied:
      *out = grpc::StatusCode::PERMISSION_DENIED;
      return true;
    case absl::StatusCode::kResourceExhausted:
      *out = grpc::StatusCode::RESOURCE_EXHAUSTED;
      return true;
    case absl::StatusCode::kFailedPrecondition:
      *out = grpc::StatusCode::FAILED_PRECONDITION;
      return true;
    case absl::StatusCode::kAborted:
      *out = grpc::StatusCode::ABORTED;
      return true;
    case absl::StatusCode::kOutOfRange:
      *out = grpc::StatusCode::OUT_OF_RANGE;
      return true;
    case absl::StatusCode::kUnimplemented:
      *out = grpc::StatusCode::UNIMPLEMENTED;
      return true;
    case absl::StatusCode::kInternal:
      *out = grpc::StatusCode::INTERNAL;
      return true;
    case absl::StatusCode::kUnavailable:
      *out = grpc::StatusCode::UNAVAILABLE;
      return true;
    case absl::StatusCode::kDataLoss:
      *out = grpc::StatusCode::DATA_LOSS;
      return true;
    case absl::StatusCode::kUnauthenticated:
      *out = grpc::StatusCode::UNAUTHENTICATED;
      return true;
    default:
      return false;
  }
}

}  // namespace

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  grpc::StatusCode code;
  // raw_code(), not code(): code() already folds a non-canonical value into kUnknown.
  if (!ToGrpcCode(static_cast<absl::StatusCode>(status.raw_code()), &code)) {
    return grpc::Status(grpc::StatusCode::UNKNOWN,
                        absl::StrCat("status code ", status.raw_code(), ": ", status.message()));
  }
  return grpc::Status(code, std::string(status.message()));
}

}  // namespace gradserver
