// Fuzzes gradctl's network files (client/gradctl/network_json.h): arbitrary bytes as the JSON
// of a grad.v1.Network, parsed by protobuf's JSON parser and decoded.
//
// Checks: every error names the file and is InvalidArgument, ResourceExhausted or
// Unimplemented; a network that parses is a fixed point of writing it back as JSON (protobuf's
// MessageToJsonString of its encoding) and reading that again.

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "client/gradctl/network_json.h"
#include "google/protobuf/stubs/logging.h"
#include "google/protobuf/util/json_util.h"
#include "grad/v1/gradient_service.pb.h"
#include "proto/wire.h"
#include "tests/fuzz/fuzz_check.h"

namespace {

constexpr char kPath[] = "net.json";

std::string EncodedBytes(const gradengine::NetworkSpec& spec) {
  grad::v1::Network network;
  gradwire::EncodeNetwork(spec, &network);
  return network.SerializeAsString();
}

}  // namespace

// protobuf logs each string field with invalid UTF-8 that it refuses to parse; the refusal is
// the result here, and the lines would fill the log.
extern "C" int LLVMFuzzerInitialize(int* /*argc*/, char*** /*argv*/) {
  google::protobuf::SetLogHandler(nullptr);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string json(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<gradengine::NetworkSpec> spec = gradctl::ParseNetworkJson(json, kPath);
  if (!spec.ok()) {
    gradfuzz::CheckError(spec.status(),
                         {absl::StatusCode::kInvalidArgument, absl::StatusCode::kResourceExhausted,
                          absl::StatusCode::kUnimplemented},
                         "ParseNetworkJson");
    FUZZ_CHECK(absl::StartsWith(spec.status().message(), absl::StrCat(kPath, ": ")),
               "the message does not start with the path: ", spec.status().message());
    return 0;
  }
  grad::v1::Network network;
  gradwire::EncodeNetwork(*spec, &network);
  std::string written;
  const auto status = google::protobuf::util::MessageToJsonString(network, &written);
  FUZZ_CHECK(status.ok(), "MessageToJsonString: ", std::string(status.message()));
  absl::StatusOr<gradengine::NetworkSpec> again = gradctl::ParseNetworkJson(written, kPath);
  FUZZ_CHECK(again.ok(), "the written JSON does not read back: ", again.status().ToString(),
             "; JSON: ", written);
  FUZZ_CHECK(EncodedBytes(*again) == EncodedBytes(*spec),
             "the network changed through JSON: ", written);
  return 0;
}
