// gradctl health and gradctl info.

#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/time.h"
#include "client/gradctl/cli_util.h"
#include "client/gradctl/commands.h"
#include "gradclient/client.h"

namespace gradctl {
namespace {

std::string JsonStrings(const std::vector<std::string>& values) {
  std::vector<std::string> quoted;
  for (const std::string& value : values) quoted.push_back(JsonString(value));
  return absl::StrCat("[", absl::StrJoin(quoted, ","), "]");
}

// 8589934592 -> "8 GiB", 1000 -> "1000 B".
std::string Bytes(int64_t bytes) {
  constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int unit = 0;
  while (unit < 4 && bytes >= 1024 && bytes % 1024 == 0) {
    bytes /= 1024;
    ++unit;
  }
  return absl::StrCat(bytes, " ", kUnits[unit]);
}

const char* JsonBool(bool value) { return value ? "true" : "false"; }

// "TLS, client certificates, bearer token" or "plaintext, no token".
std::string SecuritySummary(const gradclient::ServerInfo& info) {
  std::vector<std::string> parts;
  parts.push_back(info.tls ? "TLS" : "plaintext");
  if (info.client_certificates_required) parts.push_back("client certificates required");
  parts.push_back(info.bearer_token_required ? "bearer token required" : "no token");
  return absl::StrJoin(parts, ", ");
}

void PrintInfoJson(const std::string& server, const gradclient::ServerInfo& info) {
  std::cout << "{\"server\":" << JsonString(server)
            << ",\"server_version\":" << JsonString(info.server_version)
            << ",\"onednn_version\":" << JsonString(info.onednn_version)
            << ",\"cpu_isa\":" << JsonString(info.cpu_isa)
            << ",\"threads_per_request\":" << info.threads_per_request
            << ",\"limits\":{\"max_message_bytes\":" << info.max_message_bytes
            << ",\"max_elements\":" << info.max_elements
            << ",\"max_workspace_bytes\":" << info.max_workspace_bytes
            << ",\"max_concurrent_requests\":" << info.max_concurrent_requests
            << ",\"max_queued_requests\":" << info.max_queued_requests
            << ",\"max_layers\":" << info.max_layers
            << ",\"max_parameters\":" << info.max_parameters
            << ",\"max_name_bytes\":" << info.max_name_bytes
            << ",\"max_network_bytes\":" << info.max_network_bytes
            << ",\"response_drain_timeout_s\":"
            << JsonNumber(absl::ToDoubleSeconds(info.response_drain_timeout)) << "}"
            << ",\"memory\":{\"limit_bytes\":" << info.memory_limit_bytes
            << ",\"reserved_bytes\":" << info.memory_reserved_bytes
            << ",\"cached_bytes\":" << info.memory_cached_bytes
            << ",\"peak_bytes\":" << info.memory_peak_bytes
            << ",\"plan_cache_bytes\":" << info.plan_cache_bytes
            << ",\"max_plan_cache_bytes\":" << info.max_plan_cache_bytes
            << ",\"reservations_refused\":" << info.memory_reservations_refused
            << ",\"responses_cancelled_undrained\":" << info.responses_cancelled_undrained << "}"
            << ",\"layers\":" << JsonStrings(info.layers)
            << ",\"activations\":" << JsonStrings(info.activations)
            << ",\"objectives\":" << JsonStrings(info.objectives)
            << ",\"dtypes\":" << JsonStrings(info.dtypes)
            << ",\"requests_total\":" << info.requests_total
            << ",\"requests_failed\":" << info.requests_failed
            << ",\"requests_unauthenticated\":" << info.requests_unauthenticated
            << ",\"security\":{\"tls\":" << JsonBool(info.tls)
            << ",\"client_certificates_required\":" << JsonBool(info.client_certificates_required)
            << ",\"bearer_token_required\":" << JsonBool(info.bearer_token_required) << "}"
            << ",\"shared_memory\":{\"allowed\":" << JsonBool(info.shared_memory_allowed)
            << ",\"max_regions\":" << info.max_shared_memory_regions
            << ",\"max_mapped_bytes\":" << info.max_shared_memory_bytes << "}"
            << ",\"uptime_s\":" << JsonNumber(absl::ToDoubleSeconds(info.uptime)) << "}\n";
}

void PrintInfoText(const std::string& server, const gradclient::ServerInfo& info) {
  auto line = [](absl::string_view label, absl::string_view value) {
    std::cout << absl::StrFormat("%-13s %s\n", label, value);
  };
  line("server", absl::StrCat(server, " (version ", info.server_version, ")"));
  line("oneDNN", absl::StrCat(info.onednn_version, ", ", info.cpu_isa));
  line("compute", absl::StrCat(info.threads_per_request, " threads per request, ",
                               info.max_concurrent_requests, " requests at once, ",
                               info.max_queued_requests, " more queued"));
  line("limits",
       absl::StrCat("messages ", Bytes(info.max_message_bytes), ", tensors ", info.max_elements,
                    " elements, workspace ", Bytes(info.max_workspace_bytes), " per call"));
  line("network", absl::StrCat("up to ", info.max_layers, " layers, ", info.max_parameters,
                               " parameters, names of ", info.max_name_bytes, " bytes, ",
                               Bytes(info.max_network_bytes), " of spec"));
  line("memory",
       absl::StrCat(
           "budget ", Bytes(info.memory_limit_bytes), ": ", Bytes(info.memory_reserved_bytes),
           " reserved, ", Bytes(info.memory_cached_bytes), " cached (plans ",
           Bytes(info.plan_cache_bytes), " of ", Bytes(info.max_plan_cache_bytes), "), peak ",
           Bytes(info.memory_peak_bytes), "; ", info.memory_reservations_refused, " refused, ",
           info.responses_cancelled_undrained, " unread responses cancelled after ",
           absl::FormatDuration(info.response_drain_timeout)));
  line("layers", absl::StrJoin(info.layers, ", "));
  line("activations", absl::StrJoin(info.activations, ", "));
  line("objectives", absl::StrJoin(info.objectives, ", "));
  line("dtypes", absl::StrJoin(info.dtypes, ", "));
  line("requests", absl::StrCat(info.requests_total, " served, ", info.requests_failed, " failed, ",
                                info.requests_unauthenticated, " unauthenticated, up ",
                                absl::FormatDuration(absl::Trunc(info.uptime, absl::Seconds(1)))));
  line("security", SecuritySummary(info));
  line("shared mem",
       info.shared_memory_allowed
           ? absl::StrCat("allowed, up to ", info.max_shared_memory_regions, " regions and ",
                          Bytes(info.max_shared_memory_bytes), " mapped")
           : "not allowed (--allow_shared_memory)");
}

}  // namespace

absl::Status RunHealth(const ConnectionOptions& connection) {
  absl::StatusOr<std::unique_ptr<gradclient::Client>> client = Connect(connection);
  if (!client.ok()) return client.status();
  absl::StatusOr<gradclient::ServingStatus> status = (*client)->Health();
  if (!status.ok()) return status.status();
  std::cout << gradclient::ServingStatusName(*status) << "\n";
  if (*status != gradclient::ServingStatus::kServing) {
    return absl::UnavailableError(
        absl::StrCat(connection.server, " reports ", gradclient::ServingStatusName(*status)));
  }
  return absl::OkStatus();
}

absl::Status RunInfo(const InfoOptions& options) {
  absl::StatusOr<std::unique_ptr<gradclient::Client>> client = Connect(options.connection);
  if (!client.ok()) return client.status();
  absl::StatusOr<gradclient::ServerInfo> info = (*client)->GetInfo();
  if (!info.ok()) return info.status();
  if (options.json) {
    PrintInfoJson(options.connection.server, *info);
  } else {
    PrintInfoText(options.connection.server, *info);
  }
  return absl::OkStatus();
}

}  // namespace gradctl
