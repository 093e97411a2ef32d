// Bearer-token authentication of calls: the tokens a server accepts and the check of a call's
// `authorization` metadata against them.
//
// A call is authenticated when it carries exactly one `authorization` metadata entry of the form
// "Bearer <token>" (the scheme in any letter case, one or more spaces, then the token) and the
// token equals one of the accepted tokens. Otherwise Check() returns Unauthenticated with a
// message that says whether the header was missing, malformed, or held a token the server does
// not accept; no message ever contains what the client sent.
//
// The comparison takes the same time whichever accepted token (if any) matches and wherever the
// first differing byte is: every accepted token is compared in full, byte by byte, without an
// early exit. Its time depends only on the lengths involved.
//
// Thread safety: a BearerTokens is immutable after Create; Check may be called from any thread.

#ifndef SERVER_AUTH_H_
#define SERVER_AUTH_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace gradserver {

// The metadata key of the token, lower case as gRPC stores keys.
inline constexpr char kAuthorizationMetadataKey[] = "authorization";

// The whole contents of the file `path`, given as the option `option_name`. Errors:
// InvalidArgument "<option_name>=<path> cannot be read: <reason>".
absl::StatusOr<std::string> ReadOptionFile(absl::string_view option_name, const std::string& path);

class BearerTokens {
 public:
  // Reads the accepted tokens from `path`: one per line; surrounding whitespace is trimmed,
  // blank lines and lines starting with '#' are skipped. Several tokens allow rotation (add the
  // new one, move the clients over, remove the old one). Errors, all InvalidArgument naming
  // `option_name` and the path: the file cannot be read, holds no token, or a token has a
  // character outside printable ASCII or a space (which gRPC metadata cannot carry).
  static absl::StatusOr<std::unique_ptr<BearerTokens>> FromFile(absl::string_view option_name,
                                                                const std::string& path);
  // The same checks on tokens given directly (for tests). Errors name `option_name`.
  static absl::StatusOr<std::unique_ptr<BearerTokens>> FromTokens(absl::string_view option_name,
                                                                  std::vector<std::string> tokens);

  // OK if `authorization_values` (every value of the call's `authorization` metadata) holds
  // exactly one "Bearer <token>" with an accepted token; Unauthenticated otherwise.
  absl::Status Check(absl::Span<const absl::string_view> authorization_values) const;

  size_t size() const { return tokens_.size(); }

 private:
  explicit BearerTokens(std::vector<std::string> tokens) : tokens_(std::move(tokens)) {}

  const std::vector<std::string> tokens_;
};

}  // namespace gradserver

#endif  // SERVER_AUTH_H_
