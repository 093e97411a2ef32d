#include "gradengine/quote.h"

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"

namespace gradengine {

std::string Quote(absl::string_view value) {
  if (value.size() <= kMaxQuotedBytes) return absl::StrCat("\"", absl::CEscape(value), "\"");
  return absl::StrCat("\"", absl::CEscape(value.substr(0, kMaxQuotedBytes)), "\"...");
}

}  // namespace gradengine
