#include "gradengine/quote.h"

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"

namespace gradengine {

std::string Quote(absl::string_view value, size_t max_bytes) {
  if (value.size() <= max_bytes) return absl::StrCat("\"", absl::CEscape(value), "\"");
  return absl::StrCat("\"", absl::CEscape(value.substr(0, max_bytes)), "\"...");
}

}  // namespace gradengine
