// A plaintext HTTP/1.1 listener that serves a Metrics registry for Prometheus to scrape:
// GET (and HEAD) /metrics answers 200 with Metrics::Render() as
// "text/plain; version=0.0.4; charset=utf-8" (gzip-compressed for a scraper that asks for it);
// every other path is 404. On cpp-httplib, with three threads of its own (one accepts, two
// answer).
//
// Each connection carries one request and is then closed (scrapes are seconds apart), so an idle
// scraper never holds a thread, and each read or write waits at most a second: Stop() waits
// about a second for a connection that has not sent its request, and a second per read for one
// that trickles it byte by byte.
//
// Thread safety: all methods may be called from any thread.

#ifndef SERVER_METRICS_HTTP_H_
#define SERVER_METRICS_HTTP_H_

#include <atomic>
#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "server/metrics.h"

namespace httplib {
class Server;
}  // namespace httplib

namespace gradserver {

// The content type of the text exposition format.
inline constexpr char kMetricsContentType[] = "text/plain; version=0.0.4; charset=utf-8";

class MetricsHttpServer {
 public:
  // Binds `address`, "HOST:PORT" ("[::]:9100" for IPv6; port 0 picks a free one, see port()),
  // and starts serving `metrics`, which must outlive the server. The port is bound exclusively
  // (no SO_REUSEPORT), so a second server on a taken port fails instead of sharing it. Errors
  // name `option_name` and the value: InvalidArgument for an address that is not HOST:PORT,
  // Unavailable when it cannot be bound.
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Create(absl::string_view option_name,
                                                                   const std::string& address,
                                                                   const Metrics* metrics);

  MetricsHttpServer(const MetricsHttpServer&) = delete;
  MetricsHttpServer& operator=(const MetricsHttpServer&) = delete;
  // Stops (as Stop()).
  ~MetricsHttpServer();

  // The port actually bound.
  int port() const { return port_; }

  // Closes the listening socket, lets requests in progress finish and joins the threads.
  // Idempotent.
  void Stop() ABSL_LOCKS_EXCLUDED(stop_mu_);

 private:
  MetricsHttpServer(std::unique_ptr<httplib::Server> server, int port);

  const std::unique_ptr<httplib::Server> server_;
  const int port_;
  std::atomic<bool> listener_done_{false};
  absl::Mutex stop_mu_;
  std::thread listener_ ABSL_GUARDED_BY(stop_mu_);
};

}  // namespace gradserver

#endif  // SERVER_METRICS_HTTP_H_
