#include "client/gradctl/cli_util.h"

#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <string>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace gradctl {
namespace {

// Marks a status as a usage error; the payload's value is not used.
constexpr char kUsageErrorPayload[] = "type.gradctl/usage_error";

// The first line of `path` that is neither blank nor a # comment, trimmed. Never shows the line.
absl::StatusOr<std::string> ReadFirstToken(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) {
    return absl::InvalidArgumentError(
        absl::StrCat("--auth_token_file=", path, " cannot be read: ", std::strerror(errno)));
  }
  std::string line;
  while (std::getline(file, line)) {
    const absl::string_view token = absl::StripAsciiWhitespace(line);
    if (!token.empty() && token[0] != '#') return std::string(token);
  }
  return absl::InvalidArgumentError(
      absl::StrCat("--auth_token_file=", path,
                   " holds no token (blank lines and lines starting with # are skipped)"));
}

}  // namespace

absl::Status UsageError(absl::string_view message) {
  absl::Status status = absl::InvalidArgumentError(message);
  status.SetPayload(kUsageErrorPayload, absl::Cord("1"));
  return status;
}

bool IsUsageError(const absl::Status& status) {
  return status.GetPayload(kUsageErrorPayload).has_value();
}

absl::StatusOr<std::unique_ptr<gradclient::Client>> Connect(const ConnectionOptions& options) {
  if (options.timeout <= absl::ZeroDuration()) {
    return UsageError(
        absl::StrCat("--timeout=", absl::FormatDuration(options.timeout), " must be positive"));
  }
  if (options.server.empty()) return UsageError("--server is empty; expected HOST:PORT");
  gradclient::ClientOptions client_options;
  client_options.default_timeout = options.timeout;
  client_options.tls.enabled = options.tls || !options.tls_ca.empty() ||
                               !options.tls_cert.empty() || !options.tls_key.empty() ||
                               !options.tls_server_name.empty();
  client_options.tls.root_ca_file = options.tls_ca;
  client_options.tls.cert_file = options.tls_cert;
  client_options.tls.key_file = options.tls_key;
  client_options.tls.server_name_override = options.tls_server_name;
  client_options.auth_token = options.auth_token;
  if (!options.auth_token_file.empty()) {
    absl::StatusOr<std::string> token = ReadFirstToken(options.auth_token_file);
    if (!token.ok()) return token.status();
    client_options.auth_token = *std::move(token);
  }
  return gradclient::Client::Create(options.server, client_options);
}

std::string JsonString(absl::string_view text) {
  std::string out = "\"";
  for (char c : text) {
    const unsigned char byte = static_cast<unsigned char>(c);
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (byte < 0x20) {
          absl::StrAppendFormat(&out, "\\u%04x", byte);
        } else {
          out.push_back(c);
        }
    }
  }
  out += "\"";
  return out;
}

std::string JsonNumber(double value) {
  if (std::isnan(value)) return "\"NaN\"";
  if (std::isinf(value)) return value > 0 ? "\"Infinity\"" : "\"-Infinity\"";
  return absl::StrFormat("%.17g", value);
}

std::string JsonMilliseconds(absl::Duration duration) {
  return absl::StrFormat("%.3f", absl::ToDoubleMilliseconds(duration));
}

}  // namespace gradctl
