// gradserver: the gRPC front end of the gradient engine.
//
// A Server owns an Engine, a fixed pool of compute threads and a gRPC server with the
// grad.v1.GradientService, the standard grpc.health.v1 health service and server reflection.
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
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace gradserver {

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
  // On Shutdown, how long in-flight calls may take to finish before they are cancelled.
  // Default: 30 s.
  absl::Duration shutdown_grace = absl::Seconds(30);
  // Write one line per request to stderr. Default: true.
  bool log_requests = true;
};

class Server {
 public:
  // Builds the engine, binds the address and starts serving. Errors: InvalidArgument for
  // option values out of range (naming the option), Unavailable if the address cannot be bound.
  static absl::StatusOr<std::unique_ptr<Server>> Create(const ServerOptions& options);

  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;
  // Shuts down (as Shutdown()) if that has not happened yet.
  ~Server();

  // The port actually bound (useful with port 0).
  int port() const;

  // `options.address` with its port replaced by port(), e.g. "127.0.0.1:40123".
  std::string listening_address() const;

  // Graceful stop: health turns NOT_SERVING and new calls are refused with UNAVAILABLE; calls
  // in progress (computing or queued) get up to `options.shutdown_grace` to be answered, and
  // past it are cancelled. Once they are answered the connections stay open a moment (0.5 s) for
  // clients to read the last responses, then clients are asked to close them (GOAWAY) and
  // those still open after at most a second more are closed, along with any health Watch
  // streams. Returns when the server has stopped. Idempotent; a concurrent second call returns
  // once the first has finished. Must not be called from a handler.
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
