// Reading and writing float32 arrays in NumPy's .npy format, and reading int64 ones (class
// labels).
//
// The format is described in numpy/lib/format.py: a magic string "\x93NUMPY", a version byte
// pair, a little-endian header length (2 bytes in version 1.0, 4 bytes in 2.0 and 3.0), a header
// that is the text of a Python dict literal with the keys 'descr', 'fortran_order' and 'shape',
// then the raw array data.
//
// Only what the gradient service exchanges is supported: little-endian float32 ('<f4', or '=f4',
// which this reader takes as little-endian), C order; and, read by the int64 functions only,
// little-endian int64 ('<i8' or '=i8'). Everything else is rejected with InvalidArgument rather
// than converted, so a file never silently changes meaning (the float reader refuses '<i8', the
// int64 reader '<f4' and '<i4').
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
};

// A dense int64 array in C order, such as cross-entropy class indices; the same invariant.
struct NpyInt64Array {
  std::vector<int64_t> shape;
  std::vector<int64_t> data;
};

// Parses the complete bytes of a .npy file, format version 1.0, 2.0 or 3.0.
//
// Returns InvalidArgument, with `name` (normally the file name) and the offending value in the
// message, for: a bad magic string; an unsupported version; a header that is not a dict literal
// with exactly the keys 'descr', 'fortran_order', 'shape' of types str, bool, tuple of int;
// fortran_order True; any dtype other than '<f4' / '=f4' (the message quotes the dtype found,
// e.g. '<f8' or '>f4'); a negative dimension; dimensions whose product overflows int64; data
// shorter or longer than the shape requires.
//
// A pure function of its input: it never reads outside `bytes` and never aborts, whatever the
// bytes are, and uses memory proportional to bytes.size().
absl::StatusOr<NpyArray> ParseNpy(absl::string_view bytes, absl::string_view name);

// As ParseNpy, for a file of dtype '<i8' (or '=i8'); any other dtype is InvalidArgument quoting
// it, e.g. "descr='<f4'; only little-endian int64 '<i8' is supported".
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
// FailedPrecondition if it is a directory, and so on. A file that is not a valid float32 .npy
// file gives the InvalidArgument errors of ParseNpy. Every message names `path`.
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
