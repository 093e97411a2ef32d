// What gradctl's commands share: usage errors, JSON output, connecting.

#ifndef CLIENT_GRADCTL_CLI_UTIL_H_
#define CLIENT_GRADCTL_CLI_UTIL_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "gradclient/client.h"
#include "gradclient/npy.h"
#include "gradclient/shared_memory.h"
#include "gradengine/network.h"
#include "gradengine/tensor.h"

namespace gradctl {

// Flags every command that talks to a server takes.
struct ConnectionOptions {
  // host:port of the server. Default: localhost:50051.
  std::string server = "localhost:50051";
  // Deadline of each call, retries included. Default: 60 s.
  absl::Duration timeout = absl::Seconds(60);
  // --tls, --tls_ca, --tls_cert, --tls_key, --tls_server_name: TLS is on when `tls` is or any of
  // the others is set. Defaults: off, empty.
  bool tls = false;
  std::string tls_ca;
  std::string tls_cert;
  std::string tls_key;
  std::string tls_server_name;
  // --auth_token_file: the file whose first token line (blank lines and # comments skipped) is
  // sent as "authorization: Bearer <token>". Default: empty.
  std::string auth_token_file;
  // The token itself ($GRADCTL_AUTH_TOKEN), used when auth_token_file is empty. Default: empty.
  std::string auth_token;
};

// An InvalidArgument status marked as a mistake in the command line, which gradctl reports
// with exit status 2 rather than 1.
absl::Status UsageError(absl::string_view message);
bool IsUsageError(const absl::Status& status);

// A client for options.server whose calls default to options.timeout, with the TLS settings and
// the token of `options`. Errors name the flag: an unreadable or tokenless --auth_token_file is
// InvalidArgument, as are TLS files the client library cannot read.
absl::StatusOr<std::unique_ptr<gradclient::Client>> Connect(const ConnectionOptions& options);

// --shared_memory for grad, forward and bench: copies the request's tensors (input,
// parameters, objective tensor) into a new shared memory region with room after them for
// `result_copies` sets of the request's results, registers it with `client`, and points
// `request`'s views at the copies. Each set of results starts at ResultOffset(i). The region
// is unregistered and removed when the returned object is destroyed.
struct StagedRequest {
  std::shared_ptr<gradclient::SharedMemoryRegion> region;
  int64_t inputs_bytes = 0;   // where the inputs end in the region (its header included)
  int64_t results_bytes = 0;  // one set of results, alignment included
  int64_t ResultOffset(int i) const { return inputs_bytes + i * results_bytes; }
};
absl::StatusOr<StagedRequest> StageInSharedMemory(gradclient::Client& client,
                                                  gradengine::GradientRequest* request,
                                                  int result_copies);

// Reads the float .npy file at `path` as float32 (gradclient::ReadNpyFile: float64, float16 and
// big-endian files are converted). A converted file is reported with one line on stderr, e.g.
// "gradctl: note: x.npy is float64 ('<f8'); converted to float32". Every command reads its
// tensor files through this.
absl::StatusOr<gradengine::Tensor> ReadFloatNpy(const std::string& path);

// As ReadFloatNpy, for class labels (gradclient::ReadNpyInt64File: int32 and big-endian files
// are converted to int64, with the same kind of note).
absl::StatusOr<gradclient::NpyInt64Array> ReadLabelsNpy(const std::string& path);

// Reads `path` as a network file (network_json.h).
absl::StatusOr<gradengine::NetworkSpec> ReadNetworkFile(const std::string& path);

// Reads every parameter and buffer of `network` (gradengine::LayerParameters) from
// <params_dir>/<name>.npy with ReadFloatNpy: the required ones must be there, the optional ones
// (running statistics in training mode) are read when present.
absl::Status ReadParameters(const gradengine::NetworkSpec& network, const std::string& params_dir,
                            std::map<std::string, gradengine::Tensor>* parameters);

// `text` as a JSON string literal, quotes included.
std::string JsonString(absl::string_view text);
// `value` as a JSON number that reads back to the same double; NaN and the infinities, which
// JSON lacks, as the strings "NaN", "Infinity" and "-Infinity" (protobuf's JSON mapping).
std::string JsonNumber(double value);
// A duration in milliseconds, as a JSON number.
std::string JsonMilliseconds(absl::Duration duration);

}  // namespace gradctl

#endif  // CLIENT_GRADCTL_CLI_UTIL_H_
