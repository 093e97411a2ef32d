// The metrics gradserver exports (the README's "Metrics" lists them), on a Metrics registry
// (server/metrics.h): what the service records as it answers each call (RequestMetrics), and
// what is read from the server's parts at each scrape (AddServerMetrics).
//
// Request metrics, for every grad.v1.GradientService method:
//   gradserver_requests_total{method,code}                counter, each answered call
//   gradserver_request_duration_seconds{method}           histogram, arrival to answer
// and for Forward and ComputeGradients also:
//   gradserver_request_phase_duration_seconds{method,phase}  histogram, phase = decode, queue,
//       compute or encode, each observed only for calls that reached that phase
//   gradserver_request_bytes_total{method}, gradserver_response_bytes_total{method}  counters
//
// Thread safety: RequestMetrics::Record may be called from any thread at once.

#ifndef SERVER_SERVER_METRICS_H_
#define SERVER_SERVER_METRICS_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "gradengine/engine.h"
#include "gradengine/memory_budget.h"
#include "server/compute_pool.h"
#include "server/metrics.h"
#include "server/shared_memory.h"

namespace gradserver {

// What one answered call measured.
struct CallMeasurements {
  // Bytes of the request and response messages (Forward and ComputeGradients only).
  int64_t bytes_in = 0;
  int64_t bytes_out = 0;
  // From arrival to answer.
  int64_t total_ns = 0;
  // The phases of a Forward or ComputeGradients call (as in grad.v1.Timing and the request
  // log); empty for a phase the call did not reach: no decode for a call refused before its
  // request was parsed (UNAUTHENTICATED, UNAVAILABLE), no queue, compute or encode for one that
  // never reached a compute thread (a bad request, a full queue).
  std::optional<int64_t> decode_ns;
  std::optional<int64_t> queue_ns;
  std::optional<int64_t> compute_ns;
  std::optional<int64_t> encode_ns;
};

class RequestMetrics {
 public:
  // Adds the request families to `metrics`, which must outlive this, with the series of every
  // method of grad.v1.GradientService at 0 (code OK for the request counter; the other codes
  // appear when they first occur).
  explicit RequestMetrics(Metrics* metrics);
  RequestMetrics(const RequestMetrics&) = delete;
  RequestMetrics& operator=(const RequestMetrics&) = delete;
  ~RequestMetrics();

  // Counts one answered call of `method` (the RPC's name, e.g. "ComputeGradients") with its
  // status code. A few relaxed atomic operations; the first call with a new code also takes a
  // lock once.
  void Record(absl::string_view method, absl::StatusCode code, const CallMeasurements& call);

 private:
  struct MethodMetrics;
  // The method's handles; for a name outside the service's methods, a temporary set.
  std::unique_ptr<MethodMetrics> NewMethodMetrics(absl::string_view method, bool compute) const;
  Counter* RequestCounter(MethodMetrics& method, absl::StatusCode code) const;

  CounterFamily* const requests_;
  HistogramFamily* const duration_;
  HistogramFamily* const phase_duration_;
  CounterFamily* const request_bytes_;
  CounterFamily* const response_bytes_;
  std::vector<std::unique_ptr<MethodMetrics>> methods_;
};

// The server's parts that AddServerMetrics reads; borrowed, they must outlive every Render()
// of the registry.
struct ServerMetricSources {
  const gradengine::Engine* engine = nullptr;
  const ComputePool* pool = nullptr;
  const SharedMemoryRegistry* shared_memory = nullptr;
  const gradengine::MemoryBudget* memory_budget = nullptr;
  int64_t max_plan_cache_bytes = 0;
  // Responses cancelled because their client did not read them in time.
  std::function<int64_t()> responses_cancelled_undrained;
  // Forward and ComputeGradients calls the service has admitted and not yet answered.
  std::function<int64_t()> calls_in_progress;
  std::string server_version;
  // The pool's limits.
  int compute_threads = 0;
  int max_queued_requests = 0;
};

// Adds the metrics read at each scrape: gradserver_info, gradserver_uptime_seconds (counted
// from this call), the calls in progress, the compute pool's running and queued calls and its
// limits, the engine's plan cache, the shared memory registry's regions and bytes, and the
// memory budget (limit, reserved, cached, peak, refusals) beside the process's resident bytes.
void AddServerMetrics(Metrics* metrics, const ServerMetricSources& sources);

}  // namespace gradserver

#endif  // SERVER_SERVER_METRICS_H_
