// gradctl's network files: a grad.v1.Network in protobuf's JSON mapping, decoded into the
// engine's spec. Used by `gradctl grad` and `gradctl forward`, and fuzzed by tests/fuzz.
//
// Thread-compatible; no state.

#ifndef CLIENT_GRADCTL_NETWORK_JSON_H_
#define CLIENT_GRADCTL_NETWORK_JSON_H_

#include <string>

#include "absl/status/statusor.h"
#include "gradengine/network.h"

namespace gradctl {

// Parses `json`, the contents of the file `path`, as the protobuf JSON mapping of
// grad.v1.Network (unknown fields are errors, so a misspelt field is reported rather than
// ignored) and decodes it with gradwire::DecodeNetwork. Every message starts with "<path>: ".
// Errors: JSON that is not such a Network is InvalidArgument ("<path>: not a grad.v1.Network in
// protobuf JSON: ..."); a Network that does not decode keeps DecodeNetwork's code and message.
absl::StatusOr<gradengine::NetworkSpec> ParseNetworkJson(const std::string& json,
                                                         const std::string& path);

}  // namespace gradctl

#endif  // CLIENT_GRADCTL_NETWORK_JSON_H_
