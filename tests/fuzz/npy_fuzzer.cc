// Fuzzes the client library's .npy readers (gradclient::ParseNpy and ParseNpyInt64) with
// arbitrary file bytes.
//
// Checks what npy.h promises: an error is InvalidArgument naming the file; a parsed array has
// non-negative dims whose product is its element count, no more elements than the bytes held at
// the narrowest dtype's width (float16, int32), and records a conversion from exactly the dtypes
// that need one; SerializeNpy of a float array parses back to the same shape and bits with no
// conversion, and serializing that again gives the same bytes.

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

// The descrs each reader converts from; every other accepted one needs no conversion.
bool IsFloatConversion(const std::string& descr) {
  for (const char* each : {"<f8", "=f8", "|f8", ">f8", "<f2", "=f2", "|f2", ">f2", ">f4"}) {
    if (descr == each) return true;
  }
  return false;
}
bool IsInt64Conversion(const std::string& descr) {
  for (const char* each : {"<i4", "=i4", "|i4", ">i4", ">i8"}) {
    if (descr == each) return true;
  }
  return false;
}

template <typename Array>
void CheckArray(const Array& array, size_t input_size, size_t narrowest_width) {
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
  FUZZ_CHECK(array.data.size() * narrowest_width <= input_size, array.data.size(),
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
  } else {
    gradfuzz::CheckArray(*array, size, 2);
    FUZZ_CHECK(array->converted_from.empty() || gradfuzz::IsFloatConversion(array->converted_from),
               "a float conversion from ", array->converted_from);
  }

  absl::StatusOr<gradclient::NpyInt64Array> labels = gradclient::ParseNpyInt64(bytes, kName);
  if (!labels.ok()) {
    gradfuzz::CheckError(labels.status(), {absl::StatusCode::kInvalidArgument}, "ParseNpyInt64");
    FUZZ_CHECK(absl::StartsWith(labels.status().message(), absl::StrCat(kName, ": ")),
               "the message does not start with the file name: ", labels.status().message());
  } else {
    gradfuzz::CheckArray(*labels, size, 4);
    FUZZ_CHECK(
        labels->converted_from.empty() || gradfuzz::IsInt64Conversion(labels->converted_from),
        "an int64 conversion from ", labels->converted_from);
    FUZZ_CHECK(!array.ok(), "both readers accepted the same bytes");
  }
  if (!array.ok()) return 0;

  const std::string serialized = gradclient::SerializeNpy(array->shape, array->data);
  absl::StatusOr<gradclient::NpyArray> again = gradclient::ParseNpy(serialized, kName);
  FUZZ_CHECK(again.ok(), "SerializeNpy's output does not parse: ", again.status().ToString());
  FUZZ_CHECK(again->shape == array->shape, "the shape changed through SerializeNpy");
  FUZZ_CHECK(gradfuzz::SameBits(again->data, array->data),
             "the values changed through SerializeNpy");
  FUZZ_CHECK(again->converted_from.empty(), "SerializeNpy's output needs a conversion from ",
             again->converted_from);
  FUZZ_CHECK(gradclient::SerializeNpy(again->shape, again->data) == serialized,
             "SerializeNpy is not a fixed point");
  return 0;
}
