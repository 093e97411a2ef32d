#include "client/grpc_status.h"

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "grpcpp/support/status.h"
#include "gtest/gtest.h"

namespace gradclient {
namespace {

TEST(FromGrpcStatusTest, OkIsOk) { EXPECT_TRUE(FromGrpcStatus(grpc::Status::OK).ok()); }

TEST(FromGrpcStatusTest, KeepsEveryCodeAndTheMessage) {
  for (int code = 1; code <= 16; ++code) {
    const absl::Status status =
        FromGrpcStatus(grpc::Status(static_cast<grpc::StatusCode>(code), "layers[1] is bad"));
    EXPECT_EQ(static_cast<int>(status.code()), code);
    EXPECT_EQ(status.message(), "layers[1] is bad");
  }
  EXPECT_EQ(FromGrpcStatus(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "x")).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(FromGrpcStatus(grpc::Status(grpc::StatusCode::UNAVAILABLE, "x")).code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(FromGrpcStatus(grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "x")).code(),
            absl::StatusCode::kDeadlineExceeded);
}

TEST(FromGrpcStatusTest, UnknownCodeIsUnknownWithTheNumber) {
  // 20 is no gRPC code but lies within the values grpc::StatusCode can hold (-32..31).
  const absl::Status status = FromGrpcStatus(grpc::Status(static_cast<grpc::StatusCode>(20), "m"));
  EXPECT_EQ(status.code(), absl::StatusCode::kUnknown);
  EXPECT_THAT(status.message(), testing::HasSubstr("gRPC status code 20"));
  EXPECT_THAT(status.message(), testing::HasSubstr("m"));
}

}  // namespace
}  // namespace gradclient
