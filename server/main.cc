// gradserver: serves grad.v1.GradientService until SIGTERM or SIGINT, then drains and exits 0.
// Prints "gradserver listening on <host>:<port>" to stderr once it accepts calls (after
// "gradserver health listening on <host>:<port>" with --health_address, and "gradserver metrics
// listening on <host>:<port>" with --metrics_address). Exit codes:
// 0 after a shutdown, 2 for invalid options, 1 if the server cannot start.

#include <pthread.h>
#include <signal.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/time/time.h"
#include "google/protobuf/stubs/logging.h"
#include "gradengine/allocator.h"
#include "server/server.h"

ABSL_FLAG(std::string, address, gradserver::ServerOptions().address,
          "Address to listen on: host:port (port 0 picks a free one), or unix:/path (or "
          "unix:///path) for a unix domain socket");
ABSL_FLAG(int, threads_per_request, gradserver::ServerOptions().threads_per_request,
          "OpenMP threads one call computes with; 0 = every core");
ABSL_FLAG(int, max_concurrent_requests, gradserver::ServerOptions().max_concurrent_requests,
          "Calls computing at once; 0 = cores / threads_per_request");
ABSL_FLAG(int, max_queued_requests, gradserver::ServerOptions().max_queued_requests,
          "Calls that may wait for a compute slot; more get RESOURCE_EXHAUSTED");
ABSL_FLAG(int, max_message_mb, gradserver::ServerOptions().max_message_mb,
          "Largest request or response message, in MiB (1 to 2047)");
ABSL_FLAG(int64_t, max_elements, gradserver::ServerOptions().max_elements,
          "Largest tensor, in elements");
ABSL_FLAG(bool, winograd, gradserver::ServerOptions().winograd,
          "Use Winograd kernels for the 3x3 convolutions that have them (faster; not "
          "bit-compatible with direct convolution)");
ABSL_FLAG(int64_t, max_memory_mb, gradserver::ServerOptions().max_memory_mb,
          "Memory budget of the whole process in MiB: calls reserve their requests, buffers and "
          "unsent responses from it, cached plans count too; 0 = 75% of the cgroup's memory "
          "limit, else of physical memory");
ABSL_FLAG(double, memory_wait_seconds,
          absl::ToDoubleSeconds(gradserver::ServerOptions().memory_wait),
          "How long a call waits for room in the memory budget before RESOURCE_EXHAUSTED");
ABSL_FLAG(double, response_drain_timeout_seconds,
          absl::ToDoubleSeconds(gradserver::ServerOptions().response_drain_timeout),
          "Cancel a call whose response the client has not read this long after it was ready");
ABSL_FLAG(double, shutdown_grace_seconds,
          absl::ToDoubleSeconds(gradserver::ServerOptions().shutdown_grace),
          "On SIGTERM/SIGINT, how long in-flight calls may take before they are cancelled");
ABSL_FLAG(bool, log_requests, gradserver::ServerOptions().log_requests,
          "Write one line per request to stderr");
ABSL_FLAG(std::string, tls_cert, "",
          "PEM certificate chain of the server; with --tls_key, --address speaks only TLS");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert");
ABSL_FLAG(std::string, tls_client_ca, "",
          "PEM CA certificate(s); clients must present a certificate signed by one (mutual TLS)");
ABSL_FLAG(std::string, auth_token_file, "",
          "File of accepted bearer tokens, one per line (# comments); calls without "
          "'authorization: Bearer <token>' get UNAUTHENTICATED, health stays open");
ABSL_FLAG(std::string, health_address, "",
          "Also serve grpc.health.v1 alone, in plaintext, on this host:port (for probes that "
          "cannot speak TLS); empty = no such listener");
ABSL_FLAG(std::string, metrics_address, gradserver::ServerOptions().metrics_address,
          "Also serve Prometheus metrics over plain HTTP at GET /metrics on this host:port "
          "(port 0 picks a free one); empty = no such listener");
ABSL_FLAG(double, max_connection_age_seconds,
          absl::ToDoubleSeconds(gradserver::ServerOptions().max_connection_age),
          "Ask clients to reconnect (GOAWAY) once a connection is this old, so they rebalance "
          "across replicas; 0 = never");
ABSL_FLAG(double, max_connection_age_grace_seconds,
          absl::ToDoubleSeconds(gradserver::ServerOptions().max_connection_age_grace),
          "How long calls on such a connection may still take before it closes; 0 = unlimited");
ABSL_FLAG(bool, allow_shared_memory, gradserver::SharedMemoryOptions().allowed,
          "Let clients on this host register POSIX shared memory regions and pass tensors in "
          "them (see the README's trust model)");
ABSL_FLAG(int, max_shared_memory_regions, gradserver::SharedMemoryOptions().max_regions,
          "Shared memory regions registered at once, over all clients");
ABSL_FLAG(int64_t, max_shared_memory_mb, gradserver::SharedMemoryOptions().max_mapped_bytes >> 20,
          "Shared memory mapped at once, over all regions, in MiB");

namespace {

// protobuf writes a line to stderr for every message it refuses for a string that is not UTF-8,
// which any client can send as often as it likes; the request log already says which field it
// was. Everything else protobuf logs goes to stderr as before.
void ProtobufLog(google::protobuf::LogLevel level, const char* filename, int line,
                 const std::string& message) {
  if (absl::StrContains(message, "invalid UTF-8")) return;
  const char* name = level == google::protobuf::LOGLEVEL_INFO      ? "INFO"
                     : level == google::protobuf::LOGLEVEL_WARNING ? "WARNING"
                     : level == google::protobuf::LOGLEVEL_ERROR   ? "ERROR"
                                                                   : "FATAL";
  std::fprintf(stderr, "[libprotobuf %s %s:%d] %s\n", name, filename, line, message.c_str());
}

const char* SignalName(int signal_number) {
  return signal_number == SIGTERM ? "SIGTERM" : signal_number == SIGINT ? "SIGINT" : "signal";
}

}  // namespace

int main(int argc, char** argv) {
  gradengine::KeepFreedMemoryForReuse();
  google::protobuf::SetLogHandler(&ProtobufLog);
  absl::SetProgramUsageMessage("Serves grad.v1.GradientService (gradient computation) over gRPC.");
  std::vector<char*> positional = absl::ParseCommandLine(argc, argv);
  if (positional.size() > 1) {
    std::fprintf(stderr, "gradserver: unexpected argument \"%s\"; see --help\n", positional[1]);
    return 2;
  }

  // Blocked before any thread starts, so that every thread inherits the mask and the signals
  // reach only the sigwait below.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  gradserver::ServerOptions options;
  options.address = absl::GetFlag(FLAGS_address);
  options.threads_per_request = absl::GetFlag(FLAGS_threads_per_request);
  options.max_concurrent_requests = absl::GetFlag(FLAGS_max_concurrent_requests);
  options.max_queued_requests = absl::GetFlag(FLAGS_max_queued_requests);
  options.max_message_mb = absl::GetFlag(FLAGS_max_message_mb);
  options.max_elements = absl::GetFlag(FLAGS_max_elements);
  options.winograd = absl::GetFlag(FLAGS_winograd);
  options.max_memory_mb = absl::GetFlag(FLAGS_max_memory_mb);
  for (auto [flag, name, duration] :
       {std::make_tuple(&FLAGS_shutdown_grace_seconds, "shutdown_grace_seconds",
                        &options.shutdown_grace),
        std::make_tuple(&FLAGS_max_connection_age_seconds, "max_connection_age_seconds",
                        &options.max_connection_age),
        std::make_tuple(&FLAGS_max_connection_age_grace_seconds, "max_connection_age_grace_seconds",
                        &options.max_connection_age_grace),
        std::make_tuple(&FLAGS_memory_wait_seconds, "memory_wait_seconds", &options.memory_wait),
        std::make_tuple(&FLAGS_response_drain_timeout_seconds, "response_drain_timeout_seconds",
                        &options.response_drain_timeout)}) {
    const double seconds = absl::GetFlag(*flag);
    if (std::isnan(seconds)) {
      std::fprintf(stderr, "gradserver: --%s=nan is not a duration\n", name);
      return 2;
    }
    *duration = absl::Seconds(seconds);
  }
  options.log_requests = absl::GetFlag(FLAGS_log_requests);
  options.tls_cert_file = absl::GetFlag(FLAGS_tls_cert);
  options.tls_key_file = absl::GetFlag(FLAGS_tls_key);
  options.tls_client_ca_file = absl::GetFlag(FLAGS_tls_client_ca);
  options.auth_token_file = absl::GetFlag(FLAGS_auth_token_file);
  options.health_address = absl::GetFlag(FLAGS_health_address);
  options.metrics_address = absl::GetFlag(FLAGS_metrics_address);
  options.shared_memory.allowed = absl::GetFlag(FLAGS_allow_shared_memory);
  options.shared_memory.max_regions = absl::GetFlag(FLAGS_max_shared_memory_regions);
  const int64_t max_shared_mb = absl::GetFlag(FLAGS_max_shared_memory_mb);
  if (max_shared_mb < 1 || max_shared_mb > (int64_t{1} << 40)) {
    std::fprintf(stderr, "gradserver: --max_shared_memory_mb=%lld is out of range 1..2^40\n",
                 static_cast<long long>(max_shared_mb));
    return 2;
  }
  options.shared_memory.max_mapped_bytes = max_shared_mb << 20;

  absl::StatusOr<std::unique_ptr<gradserver::Server>> server = gradserver::Server::Create(options);
  if (!server.ok()) {
    std::fprintf(stderr, "gradserver: %s\n", server.status().ToString().c_str());
    return absl::IsInvalidArgument(server.status()) ? 2 : 1;
  }
  if (!options.health_address.empty()) {
    std::fprintf(stderr, "gradserver health listening on %s\n",
                 (*server)->health_listening_address().c_str());
  }
  if (!options.metrics_address.empty()) {
    std::fprintf(stderr, "gradserver metrics listening on %s\n",
                 (*server)->metrics_listening_address().c_str());
  }
  std::fprintf(stderr, "gradserver listening on %s\n", (*server)->listening_address().c_str());
  std::fprintf(stderr, "gradserver: memory budget %lld MiB (%s)\n",
               static_cast<long long>((*server)->memory_budget().bytes >> 20),
               (*server)->memory_budget().source.c_str());
  if (options.shared_memory.allowed) {
    std::fprintf(stderr, "gradserver: shared memory allowed: up to %d regions, %lld MiB mapped\n",
                 options.shared_memory.max_regions,
                 static_cast<long long>(options.shared_memory.max_mapped_bytes >> 20));
  }

  siginfo_t signal_info;
  while (sigwaitinfo(&stop_signals, &signal_info) < 0) {
  }
  std::fprintf(stderr, "gradserver: %s received from pid %d; finishing in-flight calls\n",
               SignalName(signal_info.si_signo), static_cast<int>(signal_info.si_pid));
  // A second signal while draining stops at once.
  std::thread([stop_signals] {
    int second = 0;
    sigwait(&stop_signals, &second);
    std::fprintf(stderr, "gradserver: %s received during shutdown; exiting without draining\n",
                 SignalName(second));
    std::_Exit(1);
  }).detach();
  (*server)->Shutdown();
  std::fprintf(stderr, "gradserver: stopped\n");
  return 0;
}
