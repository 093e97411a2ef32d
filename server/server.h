// gradserver: the gRPC front end of the gradient engine.
//
// A Server owns an Engine, a fixed pool of compute threads and a gRPC server with the
// grad.v1.GradientService, the standard grpc.health.v1 health service and server reflection,
// optionally behind TLS, client certificates and bearer tokens, plus optionally a plaintext
// listener for health probes only and a plaintext HTTP listener for Prometheus metrics.
// gRPC's own threads only parse, decode and queue requests; every Forward and ComputeGradients
// runs on a compute thread, which also encodes its result. At most `max_concurrent_requests` calls
// compute at once, at most `max_queued_requests` more wait for a slot, and a call beyond that is
// refused at once with RESOURCE_EXHAUSTED. Deadlines and client cancellation are checked between
// layers.
//
// Thread safety: all methods may be called from any thread.

#ifndef SERVER_SERVER_H_
#define SERVER_SERVER_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "server/shared_memory.h"

namespace gradserver {

// The share of the memory limit (cgroup or physical) that max_memory_mb = 0 budgets: the rest
// is for what the budget does not count (the program, threads, gRPC's buffers, small objects).
inline constexpr double kDefaultMemoryFraction = 0.75;

struct ServerOptions {
  // Where to listen. A port of 0 picks a free one; see Server::port(). Default: all
  // interfaces, port 50051.
  std::string address = "0.0.0.0:50051";
  // OpenMP threads one call computes with. Default: 0 = every core.
  int threads_per_request = 0;
  // Calls that compute at once, each on its own compute thread. Default: 0 = cores divided by
  // threads_per_request (at least 1), so that computing calls do not oversubscribe the CPU.
  int max_concurrent_requests = 0;
  // Calls that may wait for a compute slot; more get RESOURCE_EXHAUSTED. Default: 64.
  int max_queued_requests = 64;
  // Largest request or response message, in MiB. gRPC's own default of 4 MiB is too small
  // for tensors. Default: 1024.
  int max_message_mb = 1024;
  // Largest tensor, in elements (the engine's limit). Default: 2^30.
  int64_t max_elements = int64_t{1} << 30;
  // Largest intermediate memory of one call (the engine's limit). Default: 8 GiB.
  int64_t max_workspace_bytes = int64_t{8} << 30;
  // Let the engine use Winograd kernels for the 3x3 convolutions that have them
  // (gradengine::EngineOptions::winograd): about half the arithmetic, at a rounding error well
  // inside the tests' tolerance but not bit-compatible with direct convolution (a weight
  // gradient that is exactly zero comes out about 1e-9). Training with Adam, which normalises
  // each gradient by its own size, follows PyTorch's trajectory more closely without them.
  // Default: true.
  bool winograd = true;
  // The memory budget of the whole process, in MiB: every call reserves what it will hold
  // (its decoded request, its intermediate buffers, its results until they are sent) before
  // it allocates, and cached plans count too (gradengine/memory_budget.h). A call that does not
  // fit waits up to `memory_wait`; one that could never fit fails at once with
  // RESOURCE_EXHAUSTED. Default: 0 = kDefaultMemoryFraction of the cgroup's memory limit when
  // there is one, else of the machine's physical memory.
  int64_t max_memory_mb = 0;
  absl::Duration memory_wait = absl::Seconds(10);
  // A response the client has not read this long after it was ready is cancelled, and its
  // memory given back. Default: 30 s.
  absl::Duration response_drain_timeout = absl::Seconds(30);
  // On Shutdown, how long in-flight calls may take to finish before they are cancelled.
  // Default: 30 s.
  absl::Duration shutdown_grace = absl::Seconds(30);
  // Write one line per request to stderr. Default: true.
  bool log_requests = true;
  // Where those lines go instead, one call per line without the newline; called from gRPC and
  // compute threads at once. Default: empty, stderr.
  std::function<void(absl::string_view line)> request_log_sink;

  // Security. With none of the fields below set the server speaks plaintext and asks for no
  // credentials, as a server behind a TLS-terminating proxy or on a trusted network may.

  // TLS: PEM files of the server's certificate chain and its private key. Both or neither; with
  // both, `address` speaks only TLS. Default: empty (plaintext).
  std::string tls_cert_file;
  std::string tls_key_file;
  // Mutual TLS: PEM file of the CA certificate(s) that client certificates must be signed by.
  // Requires tls_cert_file. A client without such a certificate fails the TLS handshake, so its
  // calls fail with UNAVAILABLE. Default: empty (no client certificate asked for).
  std::string tls_client_ca_file;
  // File of the bearer tokens the server accepts, one per line (see server/auth.h). When set,
  // every call of grad.v1.GradientService and of server reflection must carry the metadata
  // "authorization: Bearer <token>" with one of them, or it is refused with UNAUTHENTICATED;
  // grpc.health.v1 stays open for probes. gRPC offers no hook that can refuse a reflection call
  // on a plaintext port, so with a token and no TLS reflection is not served at all. Default:
  // empty (no token needed).
  std::string auth_token_file;
  // A second address, always plaintext, that serves only grpc.health.v1 with the same statuses
  // as the main one (SERVING, NOT_SERVING once Shutdown begins): for probes that cannot speak TLS,
  // such as Kubernetes' gRPC probes. A port of 0 picks a free one; see health_port(). Default:
  // empty (none).
  std::string health_address;
  // An address, always plaintext HTTP, that serves Prometheus' text format at GET /metrics
  // (server/server_metrics.h lists the metrics) and 404 elsewhere: "HOST:PORT", a port of 0
  // picks a free one; see metrics_port(). Scrapes keep working while Shutdown drains. Default:
  // empty (none).
  std::string metrics_address;

  // Connections are asked to close (HTTP/2 GOAWAY) once they are this old, give or take 10%;
  // clients reconnect for their next call, which lets a load balancer spread long-lived clients
  // over replicas as they come and go. 0 = never. Default: 300 s.
  absl::Duration max_connection_age = absl::Seconds(300);
  // How long calls in progress on such a connection may still take before it is closed.
  // 0 = as long as they need. Default: 30 s, like shutdown_grace.
  absl::Duration max_connection_age_grace = absl::Seconds(30);

  // Shared memory for clients on the same host (server/shared_memory.h): off unless
  // shared_memory.allowed. Default: off, 64 regions, 4 GiB mapped.
  SharedMemoryOptions shared_memory;
};

// The memory budget `options` give, in bytes, and where it comes from ("max_memory_mb=512",
// "75% of the cgroup memory limit of 4096 MiB"). InvalidArgument if max_memory_mb < 0.
struct ResolvedMemoryBudget {
  int64_t bytes = 0;
  std::string source;
};
absl::StatusOr<ResolvedMemoryBudget> ResolveMemoryBudget(const ServerOptions& options);

class Server {
 public:
  // Builds the engine, binds the address(es) and starts serving. Errors: InvalidArgument for
  // option values out of range and for TLS or token files that cannot be read or are incomplete
  // (naming the option and the value) and for a metrics_address that is not HOST:PORT,
  // Unavailable if an address cannot be bound or gRPC rejects the certificate or key.
  static absl::StatusOr<std::unique_ptr<Server>> Create(const ServerOptions& options);

  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;
  // Shuts down (as Shutdown()) if that has not happened yet.
  ~Server();

  // The port actually bound (useful with port 0).
  int port() const;

  // `options.address` with its port replaced by port(), e.g. "127.0.0.1:40123".
  std::string listening_address() const;

  // The memory budget the server runs with, and where it comes from.
  const ResolvedMemoryBudget& memory_budget() const;

  // The health listener's port, and `options.health_address` with it; 0 and empty without one.
  int health_port() const;
  std::string health_listening_address() const;

  // The metrics listener's port, and `options.metrics_address` with it; 0 and empty without one.
  int metrics_port() const;
  std::string metrics_listening_address() const;

  // Graceful stop: health turns NOT_SERVING (on the health listener too) and new calls are
  // refused with UNAVAILABLE; calls in progress (computing or queued) get up to
  // `options.shutdown_grace` to be answered, and past it are cancelled. Once they are answered the
  // connections stay open a moment (0.5 s) for clients to read the last responses, then clients
  // are asked to close them (GOAWAY) and those still open after at most a second more are closed,
  // along with any health Watch streams; the health listener stops next, and the metrics listener
  // last (so scrapes see the drain to its end). Returns when the server has stopped. Idempotent;
  // a concurrent second call returns once the first has finished. Must not be called from a
  // handler.
  void Shutdown();

  // Blocks until Shutdown() has completed.
  void Wait();

 private:
  class Impl;
  explicit Server(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace gradserver

#endif  // SERVER_SERVER_H_
