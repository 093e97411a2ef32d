// What the fuzz targets share: a check that aborts with a message, so that libFuzzer records
// the input as a crash, and the checks every error Status must pass.

#ifndef TESTS_FUZZ_FUZZ_CHECK_H_
#define TESTS_FUZZ_FUZZ_CHECK_H_

#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace gradfuzz {

[[noreturn]] inline void Fail(const char* file, int line, const std::string& message) {
  std::fprintf(stderr, "%s:%d: fuzz check failed: %s\n", file, line, message.c_str());
  std::abort();
}

// FUZZ_CHECK(condition, message parts...): aborts naming the condition and the parts (anything
// absl::StrCat takes) when `condition` is false.
#define FUZZ_CHECK(condition, ...)                                                         \
  do {                                                                                     \
    if (!(condition)) {                                                                    \
      ::gradfuzz::Fail(__FILE__, __LINE__, ::absl::StrCat(#condition, ": ", __VA_ARGS__)); \
    }                                                                                      \
  } while (0)

// An error from the code under test: not OK, one of `codes`, with a message.
inline void CheckError(const absl::Status& status, std::initializer_list<absl::StatusCode> codes,
                       const char* what) {
  bool expected = false;
  for (absl::StatusCode code : codes) expected = expected || status.code() == code;
  FUZZ_CHECK(expected, what, " returned ", status.ToString(), ", not one of the codes [",
             absl::StrJoin(codes, ", ",
                           [](std::string* out, absl::StatusCode code) {
                             absl::StrAppend(out, absl::StatusCodeToString(code));
                           }),
             "]");
  FUZZ_CHECK(!status.message().empty(), what, " returned ", status.ToString(),
             " without a message");
}

}  // namespace gradfuzz

#endif  // TESTS_FUZZ_FUZZ_CHECK_H_
