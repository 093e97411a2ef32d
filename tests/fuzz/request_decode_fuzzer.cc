// Fuzzes what the server does with a request before computing: bytes -> grad.v1.ForwardRequest
// or ComputeGradientsRequest (protobuf's parser) -> gradwire::Decode*Request, without shared
// memory (refused, as on a server without --allow_shared_memory) -> the engine's request
// validation. Checks that decoding keeps every value (request_checks.h), that errors carry the
// documented codes, and that what passes validation is what the engine relies on.
//
// Input: a selector byte (RPC and element limit, see request_checks.h) and the message.

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "engine/request_validation.h"
#include "google/protobuf/stubs/logging.h"
#include "grad/v1/gradient_service.pb.h"
#include "proto/wire.h"
#include "tests/fuzz/fuzz_check.h"
#include "tests/fuzz/request_checks.h"

namespace gradfuzz {
namespace {

// What decoding may refuse a request with: a malformed field, a count or size over a bound, a
// value this version does not support, shared memory on a server without it.
constexpr std::initializer_list<absl::StatusCode> kDecodeCodes = {
    absl::StatusCode::kInvalidArgument, absl::StatusCode::kResourceExhausted,
    absl::StatusCode::kUnimplemented, absl::StatusCode::kFailedPrecondition};
constexpr std::initializer_list<absl::StatusCode> kValidateCodes = {
    absl::StatusCode::kInvalidArgument, absl::StatusCode::kResourceExhausted};

void FuzzForward(const RequestInput& input) {
  grad::v1::ForwardRequest wire;
  if (!wire.ParseFromArray(input.message, input.message_size)) return;
  gradwire::DecodeStorage storage;
  absl::StatusOr<gradengine::ForwardRequest> request =
      gradwire::DecodeForwardRequest(wire, &storage);
  if (!request.ok()) {
    CheckError(request.status(), kDecodeCodes, "DecodeForwardRequest");
    return;
  }
  FUZZ_CHECK(storage.shared_ranges.empty(), "shared memory used without a resolver");
  FUZZ_CHECK(!request->placement.output.has_value(), "a placement without a resolver");
  CheckDecodedCommon(*request, wire);
  absl::StatusOr<gradengine::ValidatedNetwork> validated =
      gradengine::ValidateForwardRequest(*request, input.max_elements);
  if (!validated.ok()) {
    CheckError(validated.status(), kValidateCodes, "ValidateForwardRequest");
    return;
  }
  CheckValidatedCommon(*validated, *request, input.max_elements);
}

void FuzzGradients(const RequestInput& input) {
  grad::v1::ComputeGradientsRequest wire;
  if (!wire.ParseFromArray(input.message, input.message_size)) return;
  gradwire::DecodeStorage storage;
  absl::StatusOr<gradengine::GradientRequest> request =
      gradwire::DecodeGradientRequest(wire, &storage);
  if (!request.ok()) {
    CheckError(request.status(), kDecodeCodes, "DecodeGradientRequest");
    return;
  }
  FUZZ_CHECK(storage.shared_ranges.empty(), "shared memory used without a resolver");
  FUZZ_CHECK(!request->placement.output.has_value() && !request->placement.input_grad.has_value() &&
                 request->placement.parameter_grads.empty(),
             "a placement without a resolver");
  CheckDecodedCommon(*request, wire);
  CheckDecodedGradientParts(*request, wire);
  absl::StatusOr<gradengine::ValidatedNetwork> validated =
      gradengine::ValidateGradientRequest(*request, input.max_elements);
  if (!validated.ok()) {
    CheckError(validated.status(), kValidateCodes, "ValidateGradientRequest");
    return;
  }
  CheckValidatedCommon(*validated, *request, input.max_elements);
  CheckValidatedGradientParts(*validated, *request);
}

}  // namespace
}  // namespace gradfuzz

// protobuf logs each string field with invalid UTF-8 that it refuses to parse; the refusal is
// the result here, and the lines would fill the log.
extern "C" int LLVMFuzzerInitialize(int* /*argc*/, char*** /*argv*/) {
  google::protobuf::SetLogHandler(nullptr);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  gradfuzz::RequestInput input;
  if (!gradfuzz::SplitRequestInput(data, size, &input)) return 0;
  if (input.gradients) {
    gradfuzz::FuzzGradients(input);
  } else {
    gradfuzz::FuzzForward(input);
  }
  return 0;
}
