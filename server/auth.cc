#include "server/auth.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace gradserver {
namespace {

constexpr absl::string_view kBearerScheme = "Bearer";

constexpr char kMissing[] =
    "this server requires a bearer token: send the metadata \"authorization: Bearer <token>\"";
constexpr char kMalformed[] =
    "the authorization metadata is malformed; expected exactly one \"authorization: Bearer "
    "<token>\"";
constexpr char kRejected[] = "the bearer token is not one this server accepts";

// What gRPC metadata values may carry, minus the space that separates scheme and token.
bool IsTokenChar(char c) { return c > 0x20 && c < 0x7f; }

// Whether `presented` equals `accepted`, in a time that depends only on the two lengths: every
// byte position up to the longer length is visited and the differences are OR-ed together.
bool ConstantTimeEquals(absl::string_view presented, absl::string_view accepted) {
  const size_t length = std::max(presented.size(), accepted.size());
  // volatile: keeps the compiler from turning the loop into an early-exit comparison.
  volatile unsigned char difference = presented.size() == accepted.size() ? 0 : 1;
  for (size_t i = 0; i < length; ++i) {
    const unsigned char a = i < presented.size() ? static_cast<unsigned char>(presented[i]) : 0;
    const unsigned char b = i < accepted.size() ? static_cast<unsigned char>(accepted[i]) : 0;
    difference = difference | static_cast<unsigned char>(a ^ b);
  }
  return difference == 0;
}

}  // namespace

absl::StatusOr<std::string> ReadOptionFile(absl::string_view option_name, const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) {
    return absl::InvalidArgumentError(
        absl::StrCat(option_name, "=", path, " cannot be read: ", std::strerror(errno)));
  }
  std::ostringstream contents;
  contents << file.rdbuf();
  if (file.bad()) {
    return absl::InvalidArgumentError(absl::StrCat(option_name, "=", path, " cannot be read"));
  }
  return contents.str();
}

absl::StatusOr<std::unique_ptr<BearerTokens>> BearerTokens::FromFile(absl::string_view option_name,
                                                                     const std::string& path) {
  absl::StatusOr<std::string> contents = ReadOptionFile(option_name, path);
  if (!contents.ok()) return contents.status();
  std::vector<std::string> tokens;
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(*contents, '\n')) {
    ++line_number;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || absl::StartsWith(line, "#")) continue;
    if (!std::all_of(line.begin(), line.end(), IsTokenChar)) {
      // The line is not shown: it may be a token.
      return absl::InvalidArgumentError(
          absl::StrCat(option_name, "=", path, " line ", line_number,
                       ": a token may hold only printable ASCII characters other than space"));
    }
    tokens.emplace_back(line);
  }
  if (tokens.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        option_name, "=", path,
        " holds no token (one per line; blank lines and lines starting with # are skipped)"));
  }
  return std::unique_ptr<BearerTokens>(new BearerTokens(std::move(tokens)));
}

absl::StatusOr<std::unique_ptr<BearerTokens>> BearerTokens::FromTokens(
    absl::string_view option_name, std::vector<std::string> tokens) {
  if (tokens.empty()) return absl::InvalidArgumentError(absl::StrCat(option_name, " is empty"));
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i].empty() || !std::all_of(tokens[i].begin(), tokens[i].end(), IsTokenChar)) {
      return absl::InvalidArgumentError(
          absl::StrCat(option_name, "[", i,
                       "] must be non-empty and hold only printable ASCII characters other than "
                       "space"));
    }
  }
  return std::unique_ptr<BearerTokens>(new BearerTokens(std::move(tokens)));
}

absl::Status BearerTokens::Check(absl::Span<const absl::string_view> authorization_values) const {
  if (authorization_values.empty()) return absl::UnauthenticatedError(kMissing);
  if (authorization_values.size() > 1) return absl::UnauthenticatedError(kMalformed);
  absl::string_view value = authorization_values[0];
  // "Bearer" in any case (RFC 7235: the scheme is case-insensitive), spaces, the token.
  if (value.size() <= kBearerScheme.size() ||
      !absl::EqualsIgnoreCase(value.substr(0, kBearerScheme.size()), kBearerScheme) ||
      value[kBearerScheme.size()] != ' ') {
    return absl::UnauthenticatedError(kMalformed);
  }
  value.remove_prefix(kBearerScheme.size());
  value = absl::StripLeadingAsciiWhitespace(value);
  if (value.empty() || !std::all_of(value.begin(), value.end(), IsTokenChar)) {
    return absl::UnauthenticatedError(kMalformed);
  }
  // Every accepted token is compared, whatever matched before: the time does not tell which.
  bool accepted = false;
  for (const std::string& token : tokens_) {
    accepted = ConstantTimeEquals(value, token) | accepted;
  }
  if (!accepted) return absl::UnauthenticatedError(kRejected);
  return absl::OkStatus();
}

}  // namespace gradserver
