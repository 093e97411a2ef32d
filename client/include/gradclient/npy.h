// Reading .npy files as float32 arrays and as int64 ones (class labels), and writing float32
// arrays, in NumPy's .npy format.
//
// The format is described in numpy/lib/format.py: a magic string "\x93NUMPY", a version byte
// pair, a little-endian header length (2 bytes in version 1.0, 4 bytes in 2.0 and 3.0), a header
// that is the text of a Python dict literal with the keys 'descr', 'fortran_order' and 'shape',
// then the raw array data.
//
// Dtypes, C order only:
// - The float reader returns float32. It reads float32 as is and converts float64 and float16
//   (numpy's default dtype is float64): '<f4', '<f8', '<f2' and the big-endian '>f4', '>f8',
//   '>f2'. float16 -> float32 is exact for every value (subnormals, infinities and NaNs
//   included); float64 -> float32 rounds to nearest, ties to even, so finite values beyond
//   float32's range (|x| >= FLT_MAX + 2^103, half an ulp above FLT_MAX) become +-inf.
// - The int64 reader returns int64. It reads int64 and converts int32 exactly (numpy's default
//   integer is int32 on some platforms): '<i8', '<i4', '>i8', '>i4'.
// The byte orders '=' (native) and '|' (not applicable), which numpy writes for no multi-byte
// type but accepts, are taken as little-endian, as numpy reads them on every little-endian host.
// Every other dtype is rejected with InvalidArgument rather than guessed at, so a file never
// silently changes meaning: the float reader refuses integers ('<i8'), the int64 reader floats
// ('<f4'), both unsigned, complex, bool and structured dtypes. Each parsed array records the
// dtype it was converted from (`converted_from`), so the caller can say so.
//
// All functions are thread-compatible and keep no state.

#ifndef GRADCLIENT_NPY_H_
#define GRADCLIENT_NPY_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace gradclient {

// A dense float32 array in C (row-major) order.
// Invariant when produced by this library: every shape entry is >= 0 and data.size() equals the
// product of shape (1 for a scalar, whose shape is empty).
struct NpyArray {
  std::vector<int64_t> shape;
  std::vector<float> data;
  // The file's descr when its values were converted ("<f8", "<f2", or big-endian ">f4", ...);
  // empty when the file held little-endian float32.
  std::string converted_from;
};

// A dense int64 array in C order, such as cross-entropy class indices; the same invariant.
struct NpyInt64Array {
  std::vector<int64_t> shape;
  std::vector<int64_t> data;
  // As NpyArray::converted_from: "<i4", ">i8", ...; empty for little-endian int64.
  std::string converted_from;
};

// The conversions the float reader applies. Float16ToFloat32 is exact (a NaN keeps its sign and
// payload bits); Float64ToFloat32 rounds to nearest even, overflowing to +-inf.
float Float16ToFloat32(uint16_t bits);
float Float64ToFloat32(double value);

// Parses the complete bytes of a .npy file, format version 1.0, 2.0 or 3.0.
//
// Returns InvalidArgument, with `name` (normally the file name) and the offending value in the
// message, for: a bad magic string; an unsupported version; a header that is not a dict literal
// with exactly the keys 'descr', 'fortran_order', 'shape' of types str, bool, tuple of int;
// fortran_order True; a dtype other than the float ones above (the message quotes the dtype
// found, e.g. descr='<i8'); a negative dimension; dimensions whose product overflows int64; data
// shorter or longer than the shape requires.
//
// A pure function of its input: it never reads outside `bytes` and never aborts, whatever the
// bytes are, and uses memory proportional to bytes.size().
absl::StatusOr<NpyArray> ParseNpy(absl::string_view bytes, absl::string_view name);

// As ParseNpy, for a file of an int64 or int32 dtype (above); any other dtype is
// InvalidArgument quoting it, e.g. "descr='<f4'; expected int64 or int32 ...".
absl::StatusOr<NpyInt64Array> ParseNpyInt64(absl::string_view bytes, absl::string_view name);

// Returns the bytes of a .npy file holding `data` with dtype '<f4' and fortran_order False,
// byte for byte what numpy.save writes for the same float32 C-order array: format version 1.0
// (2.0 only if the header cannot fit in 1.0's 65535 bytes, as numpy does), the same dict text and
// spare space, padded with spaces and a newline so the data starts at a multiple of 64 bytes.
//
// An empty shape means a scalar.
// REQUIRES: every shape entry >= 0 and data.size() == product of shape. If this does not hold,
// the header still records `shape` and the output will not parse back.
std::string SerializeNpy(absl::Span<const int64_t> shape, absl::Span<const float> data);

// Reads and parses the file at `path`. A failure to open or read it carries the code
// absl::ErrnoToStatusCode gives for the errno: NotFound if it does not exist, PermissionDenied,
// FailedPrecondition if it is a directory, and so on. A file that is not a valid .npy file of a
// float dtype gives the InvalidArgument errors of ParseNpy. Every message names `path`.
absl::StatusOr<NpyArray> ReadNpyFile(const std::string& path);

// As ReadNpyFile, for an int64 file (ParseNpyInt64).
absl::StatusOr<NpyInt64Array> ReadNpyInt64File(const std::string& path);

// Writes SerializeNpy(shape, data) to `path`, replacing any existing file.
// Returns InvalidArgument, without touching the file, if a shape entry is negative or
// data.size() does not match the shape. A failure to open or write carries the code
// absl::ErrnoToStatusCode gives for the errno: NotFound if the directory does not exist,
// PermissionDenied, ResourceExhausted for a full disk, and so on. Every message names `path`.
// Not atomic: a failed write can leave a partial file.
absl::Status WriteNpyFile(const std::string& path, absl::Span<const int64_t> shape,
                          absl::Span<const float> data);

}  // namespace gradclient

#endif  // GRADCLIENT_NPY_H_
