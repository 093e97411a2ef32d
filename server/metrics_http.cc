#include "server/metrics_http.h"

#include <httplib.h>
#include <sys/socket.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"

namespace gradserver {
namespace {

// Threads answering requests: a scrape renders a few kilobytes, and scrapers are few.
constexpr size_t kHttpThreads = 2;
// How long a connection may wait before its request arrives; Stop() waits for it too.
constexpr time_t kRequestWaitSeconds = 1;
// No request to this server has a body.
constexpr size_t kMaxRequestBodyBytes = 64 << 10;

struct HostPort {
  std::string host;
  int port = 0;
};

absl::StatusOr<HostPort> ParseHostPort(absl::string_view option_name, const std::string& address) {
  const size_t colon = address.rfind(':');
  HostPort parsed;
  if (colon != std::string::npos) parsed.host = address.substr(0, colon);
  if (parsed.host.size() >= 2 && parsed.host.front() == '[' && parsed.host.back() == ']') {
    parsed.host = parsed.host.substr(1, parsed.host.size() - 2);
  }
  const std::string port = colon == std::string::npos ? "" : address.substr(colon + 1);
  const bool port_is_digits =
      !port.empty() && port.size() <= 5 && std::all_of(port.begin(), port.end(), [](char c) {
        return absl::ascii_isdigit(static_cast<unsigned char>(c));
      });
  if (parsed.host.empty() || !port_is_digits || !absl::SimpleAtoi(port, &parsed.port) ||
      parsed.port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat(option_name, "=\"", address,
                     "\" is not HOST:PORT (a host name or IP address and a port 0..65535; "
                     "[ADDRESS]:PORT for IPv6)"));
  }
  return parsed;
}

}  // namespace

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Create(
    absl::string_view option_name, const std::string& address, const Metrics* metrics) {
  absl::StatusOr<HostPort> host_port = ParseHostPort(option_name, address);
  if (!host_port.ok()) return host_port.status();

  auto server = std::make_unique<httplib::Server>();
  // httplib's default adds SO_REUSEPORT, which would let a second server share a taken port.
  // SO_REUSEADDR alone only allows rebinding while old connections linger in TIME_WAIT.
  server->set_socket_options([](socket_t sock) {
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
  });
  server->new_task_queue = [] { return new httplib::ThreadPool(kHttpThreads); };
  server->set_keep_alive_max_count(1);
  server->set_keep_alive_timeout(kRequestWaitSeconds);
  // A client that trickles its request (or reads the answer a byte at a time) holds a thread,
  // and Stop() waits for it: each read and write gets no longer than the keep-alive wait.
  server->set_read_timeout(kRequestWaitSeconds, 0);
  server->set_write_timeout(kRequestWaitSeconds, 0);
  server->set_payload_max_length(kMaxRequestBodyBytes);
  server->Get("/metrics",
              [metrics](const httplib::Request& /*request*/, httplib::Response& response) {
                response.set_content(metrics->Render(), kMetricsContentType);
              });
  server->set_error_handler([](const httplib::Request& /*request*/, httplib::Response& response) {
    if (response.status == 404) {
      response.set_content("not found: metrics are at /metrics\n", "text/plain; charset=utf-8");
    }
  });

  int port = host_port->port;
  const bool bound = port == 0 ? (port = server->bind_to_any_port(host_port->host)) > 0
                               : server->bind_to_port(host_port->host, port);
  if (!bound) {
    return absl::UnavailableError(absl::StrCat("could not listen on ", option_name, "=\"", address,
                                               "\" (in use, not an address of this host, "
                                               "or not allowed)"));
  }
  std::unique_ptr<MetricsHttpServer> http(new MetricsHttpServer(std::move(server), port));
  {
    absl::MutexLock lock(&http->stop_mu_);
    http->listener_ = std::thread([server = http->server_.get(), done = &http->listener_done_] {
      server->listen_after_bind();
      done->store(true);
    });
  }
  // httplib's stop() does nothing until the listener runs, so wait for that; then Stop() from
  // any thread, at any time, ends it.
  while (!http->server_->is_running() && !http->listener_done_.load()) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return http;
}

MetricsHttpServer::MetricsHttpServer(std::unique_ptr<httplib::Server> server, int port)
    : server_(std::move(server)), port_(port) {}

MetricsHttpServer::~MetricsHttpServer() { Stop(); }

void MetricsHttpServer::Stop() {
  absl::MutexLock lock(&stop_mu_);
  if (!listener_.joinable()) return;
  server_->stop();
  listener_.join();
}

}  // namespace gradserver
