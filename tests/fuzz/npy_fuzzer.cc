// Fuzzes the client library's .npy reader (gradclient::ParseNpy) with arbitrary file bytes.
//
// Checks what npy.h promises: an error is InvalidArgument naming the file; a parsed array has
// non-negative dims whose product is its element count, and no more data than the bytes held;
// SerializeNpy of it parses back to the same shape and bits, and serializing that again gives
// the same bytes.

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "gradclient/npy.h"
#include "tests/fuzz/fuzz_check.h"

namespace gradfuzz {
namespace {

constexpr char kName[] = "fuzz.npy";

// Whether `a` and `b` hold the same float bit patterns (NaNs included).
bool SameBits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

void CheckArray(const gradclient::NpyArray& array, size_t input_size) {
  bool has_zero = false;
  for (int64_t dim : array.shape) {
    FUZZ_CHECK(dim >= 0, "a parsed dim is ", dim);
    has_zero = has_zero || dim == 0;
  }
  // With a zero dim the product is 0, however large the others are.
  __int128 count = has_zero ? 0 : 1;
  for (size_t i = 0; i < array.shape.size() && count != 0; ++i) {
    count *= array.shape[i];
    FUZZ_CHECK(count <= INT64_MAX, "the parsed dims' product overflows int64");
  }
  FUZZ_CHECK(count == static_cast<__int128>(array.data.size()), "shape needs ",
             static_cast<int64_t>(count), " values, ", array.data.size(), " parsed");
  FUZZ_CHECK(array.data.size() * sizeof(float) <= input_size, array.data.size(),
             " values parsed from ", input_size, " bytes");
}

}  // namespace
}  // namespace gradfuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using gradfuzz::kName;
  const absl::string_view bytes(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<gradclient::NpyArray> array = gradclient::ParseNpy(bytes, kName);
  if (!array.ok()) {
    gradfuzz::CheckError(array.status(), {absl::StatusCode::kInvalidArgument}, "ParseNpy");
    FUZZ_CHECK(absl::StartsWith(array.status().message(), absl::StrCat(kName, ": ")),
               "the message does not start with the file name: ", array.status().message());
    return 0;
  }
  gradfuzz::CheckArray(*array, size);

  const std::string serialized = gradclient::SerializeNpy(array->shape, array->data);
  absl::StatusOr<gradclient::NpyArray> again = gradclient::ParseNpy(serialized, kName);
  FUZZ_CHECK(again.ok(), "SerializeNpy's output does not parse: ", again.status().ToString());
  FUZZ_CHECK(again->shape == array->shape, "the shape changed through SerializeNpy");
  FUZZ_CHECK(gradfuzz::SameBits(again->data, array->data),
             "the values changed through SerializeNpy");
  FUZZ_CHECK(gradclient::SerializeNpy(again->shape, again->data) == serialized,
             "SerializeNpy is not a fixed point");
  return 0;
}
