// The C++ client of the gradient service (grad.v1.GradientService).
//
// A Client holds one gRPC channel to one or more servers and turns the engine's value types
// (gradengine/network.h, gradengine/tensor.h) into calls and back, so callers never see
// protobuf or gRPC types:
//
//   std::unique_ptr<gradclient::Client> client = *gradclient::Client::Create("localhost:50051");
//   absl::StatusOr<gradclient::GradientReply> reply = client->ComputeGradients(request);
//   // reply->result.loss, reply->result.input_grad, reply->result.parameter_grads, ...
//
// Errors are the server's, with its code and message (a malformed network is InvalidArgument
// naming the layer and field, a full server ResourceExhausted, a call past its deadline
// DeadlineExceeded); an unreachable server is Unavailable. Every RPC of the service is
// idempotent, so a call that fails with Unavailable is retried with exponential backoff, never
// past the call's deadline (ClientOptions::retry).
//
// Thread safety: a Client is safe for concurrent use from any number of threads without
// external synchronization; concurrent calls share the channel (and its connection).

#ifndef GRADCLIENT_CLIENT_H_
#define GRADCLIENT_CLIENT_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "gradclient/shared_memory.h"
#include "gradengine/network.h"
#include "gradengine/tensor.h"

namespace gradclient {

// How a call that failed with Unavailable (no connection, or a server shutting down) is
// retried. Attempt n (n >= 1) waits min(max_backoff, initial_backoff * multiplier^(n-1)),
// scaled by a random factor in [1 - jitter, 1 + jitter] so that many clients do not retry in
// lockstep. No attempt starts if its wait would end past the call's deadline; the last
// attempt's status is returned instead.
struct RetryOptions {
  // Attempts in total, the first included; 1 disables retrying. Default: 5.
  int max_attempts = 5;
  // Wait before the second attempt. Default: 50 ms.
  absl::Duration initial_backoff = absl::Milliseconds(50);
  // Longest wait between two attempts. Default: 2 s.
  absl::Duration max_backoff = absl::Seconds(2);
  // Growth of the wait from one attempt to the next. Default: 2.
  double backoff_multiplier = 2.0;
  // Relative random spread of each wait, in [0, 1). Default: 0.2.
  double jitter = 0.2;
};

// TLS on the channel. The server's certificate must be signed by a trusted CA and name the
// target's host (or server_name_override).
struct TlsOptions {
  // Speak TLS. The other fields require it. Default: false (plaintext).
  bool enabled = false;
  // PEM file of the CA certificate(s) to trust. Default: empty, the system's roots (gRPC reads
  // GRPC_DEFAULT_SSL_ROOTS_FILE_PATH, else its own bundle).
  std::string root_ca_file;
  // Mutual TLS: PEM files of the client's certificate chain and its private key, both or
  // neither. Default: empty (no client certificate).
  std::string cert_file;
  std::string key_file;
  // The name to check the server's certificate against instead of the target's host, e.g. when
  // connecting by IP address to a server whose certificate names its DNS name. Default: empty.
  std::string server_name_override;
};

struct ClientOptions {
  // Deadline of a call that sets none in its CallOptions, counted from the call's start and
  // covering every retry. absl::InfiniteDuration() means no deadline. Default: 60 s.
  absl::Duration default_timeout = absl::Seconds(60);
  RetryOptions retry;
  // Largest message sent or received, in MiB, set on the channel for both directions. gRPC's
  // own receive default of 4 MiB is too small for tensors. Range 1..2047. Default: 1024, the
  // server's default.
  int max_message_mb = 1024;
  TlsOptions tls;
  // Sent as the metadata "authorization: Bearer <auth_token>" with every call but Health (which
  // needs none, and may go to a plaintext health port), for a server started with a token file.
  // Printable ASCII without spaces. Default: empty, none sent.
  std::string auth_token;
};

// Most parts CallOptions::shards may cut a call into; each part is sent from a thread of its
// own.
inline constexpr int kMaxShards = 64;

// Per-call settings.
struct CallOptions {
  // Absolute deadline of the call, retries included. Default: unset.
  std::optional<absl::Time> deadline;
  // Deadline relative to the call's start; with `deadline` also set, the earlier one applies.
  // With neither set, ClientOptions::default_timeout applies. Must be >= 0. Default: unset.
  std::optional<absl::Duration> timeout;
  // Echoed by the server in its reply and its log (at most 128 bytes). Default: empty, for
  // which the client makes up a random 16-hex-digit id.
  std::string request_id;
  // ComputeGradients only: leave the network's output out of the reply, for callers that need
  // only the loss and the gradients. The reply's result.output is then empty. Default: false.
  bool skip_output = false;
  // Forward and ComputeGradients: data-parallel sharding. The batch (dim 0 of the input) is cut
  // into min(shards, batch) contiguous parts that are sent at once; over a channel to several
  // servers (see Client::Create) consecutive calls go to different servers, so the parts
  // compute in parallel. The reply combines them: outputs and input gradients concatenated,
  // parameter gradients summed and the loss recombined, with the weighting the means of MSE and
  // cross-entropy need (by rows, and by labels not ignored; client/sharding.h). It equals the
  // unsharded result up to float rounding. A network whose rows are not independent (a
  // batch_norm2d layer with training=true) cannot be cut: shards > 1 is then InvalidArgument
  // naming the layer, and nothing is sent. All parts share
  // the deadline and the request id; the reply's timing is the slowest part's and `attempts`
  // the most any part needed. The first part to fail (in batch order) fails the call, its
  // message prefixed with the part. A request whose tensors cannot be cut (e.g. a target of
  // another batch size) is sent whole, for the server to report. Range 1..kMaxShards.
  // Default: 1.
  int shards = 1;
  // Forward and ComputeGradients: a region registered with this Client (RegisterSharedMemory)
  // that the server writes the results into: the output (unless skip_output), the input
  // gradient and the parameter gradients, in that order (parameters by name), each at a
  // SharedMemoryRegion::kAlignment boundary. The reply's tensors then live in the region, with
  // no copy, and hold it alive (running statistics still come back as bytes). Not with
  // shards > 1. Default: null, results come back as bytes.
  std::shared_ptr<SharedMemoryRegion> result_region;
  // Where in result_region the results go, in bytes from its start; they stay valid until
  // those bytes are written again (by the next call given the same offset), and concurrent
  // calls need offsets of their own. Default: unset, space the call allocates from the region
  // (SharedMemoryRegion::Allocate; Reset() reclaims it), so every call's results stay valid.
  std::optional<int64_t> result_offset;
};

// Server-side durations of one call (grad.v1.Timing).
struct ServerTiming {
  absl::Duration decode;    // request -> engine types
  absl::Duration queue;     // waiting for a compute slot
  absl::Duration forward;   // forward pass, up to and including the loss
  absl::Duration backward;  // backward pass (zero for Forward)
  absl::Duration encode;    // engine result -> response
};

// What every successful call reports besides its result.
struct CallInfo {
  std::string request_id;  // as echoed by the server
  ServerTiming timing;
  // Wall time of the whole call on the client: encoding, every attempt and the waits between
  // them, and decoding.
  absl::Duration round_trip;
  // Attempts made; more than 1 when Unavailable was retried.
  int attempts = 1;
};

// A call's result as the engine would return it (its `timing` holds the server's forward and
// backward times), and what the call reported besides.
struct ForwardReply {
  gradengine::ForwardResult result;
  CallInfo call;
};

struct GradientReply {
  gradengine::GradientResult result;
  CallInfo call;
};

// What GetInfo reports (grad.v1.GetInfoResponse).
struct ServerInfo {
  std::string server_version;
  std::string onednn_version;
  std::string cpu_isa;  // the instruction set oneDNN dispatches to, e.g. "avx512_core"
  int threads_per_request = 0;
  int64_t max_message_bytes = 0;
  int64_t max_elements = 0;
  int64_t max_workspace_bytes = 0;
  int max_concurrent_requests = 0;
  int max_queued_requests = 0;
  // Bounds on a network (beyond them RESOURCE_EXHAUSTED, or INVALID_ARGUMENT for a name).
  int64_t max_layers = 0;
  int64_t max_parameters = 0;
  int64_t max_name_bytes = 0;
  int64_t max_network_bytes = 0;
  // The server's memory budget (grad.v1.MemoryStatus), as of the call.
  int64_t memory_limit_bytes = 0;
  int64_t memory_reserved_bytes = 0;
  int64_t memory_cached_bytes = 0;
  int64_t memory_peak_bytes = 0;
  int64_t plan_cache_bytes = 0;
  int64_t max_plan_cache_bytes = 0;
  int64_t memory_reservations_refused = 0;
  int64_t responses_cancelled_undrained = 0;
  absl::Duration response_drain_timeout;
  std::vector<std::string> layers;       // "conv2d", "activation", "max_pool2d", ...
  std::vector<std::string> activations;  // "relu", "leaky_relu", ...
  std::vector<std::string> objectives;   // "mse", "sum", "grad_output", "cross_entropy"
  std::vector<std::string> dtypes;       // accepted tensor dtypes, e.g. "DATA_TYPE_FLOAT32"
  int64_t requests_total = 0;
  int64_t requests_failed = 0;
  // Calls refused for a missing, malformed or unaccepted bearer token (GetInfo included).
  int64_t requests_unauthenticated = 0;
  absl::Duration uptime;
  // How the server authenticates clients (grad.v1.Security).
  bool tls = false;
  bool client_certificates_required = false;
  bool bearer_token_required = false;
  // Shared memory (grad.v1.SharedMemoryLimits).
  bool shared_memory_allowed = false;
  int max_shared_memory_regions = 0;
  int64_t max_shared_memory_bytes = 0;
};

// What GetSharedMemoryStatus reports of one registered region.
struct SharedMemoryStatus {
  std::string name;
  int64_t offset = 0;
  int64_t byte_size = 0;
  int64_t calls_in_progress = 0;
};

// grpc.health.v1.HealthCheckResponse.ServingStatus.
enum class ServingStatus {
  kUnknown = 0,
  kServing = 1,
  kNotServing = 2,
  kServiceUnknown = 3,
};

// "UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN".
const char* ServingStatusName(ServingStatus status);

class Client {
 public:
  // Makes a client for the server(s) at `target`: "host:port", a list of IP addresses
  // "127.0.0.1:5001,127.0.0.1:5002" (or gRPC's "ipv4:127.0.0.1:5001,127.0.0.1:5002"), or any
  // gRPC target such as "dns:///name:port" or "unix:/path". The client connects to every
  // address the target names or resolves to and spreads calls over the ready ones in turn
  // (gRPC's round_robin policy); a call that fails with Unavailable is retried, which can land
  // on another server. Does not connect: the first call does, so Create succeeds while the
  // server is still starting. Errors: InvalidArgument for an empty target, a list of host
  // names, an option out of range, naming the option and its value, or a TLS file that cannot be
  // read, naming the option and the path. A server that refuses the TLS handshake (wrong CA,
  // missing client certificate) fails calls with Unavailable; one that refuses the token, with
  // Unauthenticated.
  static absl::StatusOr<std::unique_ptr<Client>> Create(const std::string& target,
                                                        const ClientOptions& options = {});

  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;
  ~Client();

  // Runs the network forward on the server. The request's tensors are only read during the
  // call; its should_continue is not sent (the deadline stands in for it).
  absl::StatusOr<ForwardReply> Forward(const gradengine::ForwardRequest& request,
                                       const CallOptions& options = {});

  // Runs forward, the objective and backward on the server; the result holds the output
  // (unless options.skip_output), the loss (absent for a grad_output objective), the
  // requested gradients and the updated running statistics of batch_norm2d layers in training
  // mode, exactly as gradengine::Engine::ComputeGradients returns them. A cross-entropy
  // objective's labels are always sent as bytes, never from shared memory.
  absl::StatusOr<GradientReply> ComputeGradients(const gradengine::GradientRequest& request,
                                                 const CallOptions& options = {});

  absl::StatusOr<ServerInfo> GetInfo(const CallOptions& options = {});

  // The standard gRPC health check (grpc.health.v1.Health/Check) for `service`; the empty
  // name asks about the server as a whole. A server that does not know `service` answers
  // NotFound.
  absl::StatusOr<ServingStatus> Health(const std::string& service = "",
                                       const CallOptions& options = {});

  // Registers `region` with the server, which maps it (grad.v1 RegisterSharedMemory); from
  // then on request tensors that lie inside it are sent as references, and calls may place
  // their results in it (CallOptions::result_region). FailedPrecondition if the region is
  // registered with a Client already; otherwise errors are the server's: FailedPrecondition
  // from a server without --allow_shared_memory, AlreadyExists for a name this caller
  // registered, PermissionDenied when the server may not open the object or the caller is not
  // on the server's host.
  absl::Status RegisterSharedMemory(const std::shared_ptr<SharedMemoryRegion>& region,
                                    const CallOptions& options = {});
  // Unregisters the region named `name` (empty: every region of this caller on the server);
  // returns how many the server removed.
  absl::StatusOr<int> UnregisterSharedMemory(const std::string& name,
                                             const CallOptions& options = {});
  // The server's view of this caller's regions (empty name: all of them).
  absl::StatusOr<std::vector<SharedMemoryStatus>> GetSharedMemoryStatus(
      const std::string& name = "", const CallOptions& options = {});

  const std::string& target() const;

 private:
  class Impl;
  explicit Client(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace gradclient

#endif  // GRADCLIENT_CLIENT_H_
