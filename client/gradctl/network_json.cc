#include "client/gradctl/network_json.h"

#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "google/protobuf/util/json_util.h"
#include "grad/v1/gradient_service.pb.h"
#include "proto/wire.h"

namespace gradctl {

absl::StatusOr<gradengine::NetworkSpec> ParseNetworkJson(const std::string& json,
                                                         const std::string& path) {
  grad::v1::Network network;
  google::protobuf::util::JsonParseOptions parse_options;
  parse_options.ignore_unknown_fields = false;
  const auto parsed = google::protobuf::util::JsonStringToMessage(json, &network, parse_options);
  if (!parsed.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": not a grad.v1.Network in protobuf JSON: ", std::string(parsed.message())));
  }
  absl::StatusOr<gradengine::NetworkSpec> spec = gradwire::DecodeNetwork(network);
  if (!spec.ok()) {
    return absl::Status(spec.status().code(), absl::StrCat(path, ": ", spec.status().message()));
  }
  return spec;
}

}  // namespace gradctl
