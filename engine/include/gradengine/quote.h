// Client-supplied strings in error messages and log lines: quoted, escaped, and cut to a
// bounded prefix, so that a hostile name can neither flood a log nor break its line format.

#ifndef GRADENGINE_QUOTE_H_
#define GRADENGINE_QUOTE_H_

#include <cstddef>
#include <string>

#include "absl/strings/string_view.h"

namespace gradengine {

// Most bytes of a client-supplied string that a message quotes.
inline constexpr size_t kMaxQuotedBytes = 64;

// `value` in double quotes, C-escaped, cut to its first `max_bytes` bytes (then followed by
// "..."): "conv1.weight", "a\001b", "nnnn…"...
std::string Quote(absl::string_view value, size_t max_bytes = kMaxQuotedBytes);

}  // namespace gradengine

#endif  // GRADENGINE_QUOTE_H_
