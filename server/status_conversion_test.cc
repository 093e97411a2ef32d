#include "server/status_conversion.h"

#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "gtest/gtest.h"

namespace gradserver {
namespace {

TEST(ToGrpcStatusTest, OkIsOk) { EXPECT_TRUE(ToGrpcStatus(absl::OkStatus()).ok()); }

TEST(ToGrpcStatusTest, EveryCanonicalCodeMapsOneToOneAndKeepsTheMessage) {
  const std::vector<std::pair<absl::StatusCode, grpc::StatusCode>> table = {
      {absl::StatusCode::kCancelled, grpc::StatusCode::CANCELLED},
      {absl::StatusCode::kUnknown, grpc::StatusCode::UNKNOWN},
      {absl::StatusCode::kInvalidArgument, grpc::StatusCode::INVALID_ARGUMENT},
      {absl::StatusCode::kDeadlineExceeded, grpc::StatusCode::DEADLINE_EXCEEDED},
      {absl::StatusCode::kNotFound, grpc::StatusCode::NOT_FOUND},
      {absl::StatusCode::kAlreadyExists, grpc::StatusCode::ALREADY_EXISTS},
      {absl::StatusCode::kPermissionDenied, grpc::StatusCode::PERMISSION_DENIED},
      {absl::StatusCode::kResourceExhausted, grpc::StatusCode::RESOURCE_EXHAUSTED},
      {absl::StatusCode::kFailedPrecondition, grpc::StatusCode::FAILED_PRECONDITION},
      {absl::StatusCode::kAborted, grpc::StatusCode::ABORTED},
      {absl::StatusCode::kOutOfRange, grpc::StatusCode::OUT_OF_RANGE},
      {absl::StatusCode::kUnimplemented, grpc::StatusCode::UNIMPLEMENTED},
      {absl::StatusCode::kInternal, grpc::StatusCode::INTERNAL},
      {absl::StatusCode::kUnavailable, grpc::StatusCode::UNAVAILABLE},
      {absl::StatusCode::kDataLoss, grpc::StatusCode::DATA_LOSS},
      {absl::StatusCode::kUnauthenticated, grpc::StatusCode::UNAUTHENTICATED},
  };
  for (const auto& [absl_code, grpc_code] : table) {
    const grpc::Status converted =
        ToGrpcStatus(absl::Status(absl_code, "layers[1].conv2d.groups=3 does not divide 8"));
    EXPECT_EQ(converted.error_code(), grpc_code) << absl::StatusCodeToString(absl_code);
    EXPECT_EQ(static_cast<int>(converted.error_code()), static_cast<int>(absl_code));
    EXPECT_EQ(converted.error_message(), "layers[1].conv2d.groups=3 does not divide 8");
  }
}

TEST(ToGrpcStatusTest, NonCanonicalCodeBecomesUnknownAndNamesTheCode) {
  const grpc::Status converted = ToGrpcStatus(absl::Status(static_cast<absl::StatusCode>(42), "x"));
  EXPECT_EQ(converted.error_code(), grpc::StatusCode::UNKNOWN);
  EXPECT_EQ(converted.error_message(), "status code 42: x");
}

}  // namespace
}  // namespace gradserver
