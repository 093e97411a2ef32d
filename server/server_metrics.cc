#include "server/server_metrics.h"

#include <array>
#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "gradengine/allocator.h"

namespace gradserver {
namespace {

// grad.v1.GradientService's methods; the first two compute and have phases and byte counts.
constexpr absl::string_view kComputeMethods[] = {"Forward", "ComputeGradients"};
constexpr absl::string_view kOtherMethods[] = {"GetInfo", "RegisterSharedMemory",
                                               "UnregisterSharedMemory", "GetSharedMemoryStatus"};

// absl::StatusCode runs from kOk = 0 to kUnauthenticated = 16.
constexpr int kStatusCodes = 17;

double Seconds(int64_t nanoseconds) { return static_cast<double>(nanoseconds) * 1e-9; }

}  // namespace

struct RequestMetrics::MethodMetrics {
  std::string name;
  // Per status code, created on its first use.
  std::array<std::atomic<Counter*>, kStatusCodes> requests{};
  Histogram* duration = nullptr;
  // Compute methods only.
  Histogram* decode = nullptr;
  Histogram* queue = nullptr;
  Histogram* compute = nullptr;
  Histogram* encode = nullptr;
  Counter* request_bytes = nullptr;
  Counter* response_bytes = nullptr;
};

RequestMetrics::RequestMetrics(Metrics* metrics)
    : requests_(metrics->AddCounterFamily(
          "gradserver_requests_total",
          "grad.v1.GradientService calls answered, by method and status code.",
          {"method", "code"})),
      duration_(metrics->AddHistogramFamily(
          "gradserver_request_duration_seconds",
          "Time from a call's arrival to its answer, in seconds, by method.", {"method"},
          LatencyBucketsSeconds())),
      phase_duration_(metrics->AddHistogramFamily(
          "gradserver_request_phase_duration_seconds",
          "Time a Forward or ComputeGradients call spent in each phase, in seconds: decode "
          "(parse and check the request), queue (wait for a compute thread), compute (the "
          "engine), encode (build the response); observed only for calls that reached the "
          "phase.",
          {"method", "phase"}, LatencyBucketsSeconds())),
      request_bytes_(metrics->AddCounterFamily(
          "gradserver_request_bytes_total",
          "Bytes of Forward and ComputeGradients request messages received.", {"method"})),
      response_bytes_(metrics->AddCounterFamily(
          "gradserver_response_bytes_total",
          "Bytes of Forward and ComputeGradients response messages sent.", {"method"})) {
  for (absl::string_view method : kComputeMethods) {
    methods_.push_back(NewMethodMetrics(method, /*compute=*/true));
  }
  for (absl::string_view method : kOtherMethods) {
    methods_.push_back(NewMethodMetrics(method, /*compute=*/false));
  }
  for (const std::unique_ptr<MethodMetrics>& method : methods_) {
    RequestCounter(*method, absl::StatusCode::kOk);
  }
}

RequestMetrics::~RequestMetrics() = default;

std::unique_ptr<RequestMetrics::MethodMetrics> RequestMetrics::NewMethodMetrics(
    absl::string_view method, bool compute) const {
  auto handles = std::make_unique<MethodMetrics>();
  handles->name = std::string(method);
  handles->duration = duration_->WithLabels({method});
  if (compute) {
    handles->decode = phase_duration_->WithLabels({method, "decode"});
    handles->queue = phase_duration_->WithLabels({method, "queue"});
    handles->compute = phase_duration_->WithLabels({method, "compute"});
    handles->encode = phase_duration_->WithLabels({method, "encode"});
    handles->request_bytes = request_bytes_->WithLabels({method});
    handles->response_bytes = response_bytes_->WithLabels({method});
  }
  return handles;
}

Counter* RequestMetrics::RequestCounter(MethodMetrics& method, absl::StatusCode code) const {
  const int index = static_cast<int>(code);
  if (index < 0 || index >= kStatusCodes) {
    return requests_->WithLabels({method.name, absl::StatusCodeToString(code)});
  }
  Counter* counter = method.requests[index].load(std::memory_order_acquire);
  if (counter == nullptr) {
    // Racing threads find the same series; storing it twice is harmless.
    counter = requests_->WithLabels({method.name, absl::StatusCodeToString(code)});
    method.requests[index].store(counter, std::memory_order_release);
  }
  return counter;
}

void RequestMetrics::Record(absl::string_view method, absl::StatusCode code,
                            const CallMeasurements& call) {
  MethodMetrics* handles = nullptr;
  for (const std::unique_ptr<MethodMetrics>& known : methods_) {
    if (known->name == method) handles = known.get();
  }
  std::unique_ptr<MethodMetrics> unknown;
  if (handles == nullptr) {
    unknown = NewMethodMetrics(method, /*compute=*/false);
    handles = unknown.get();
  }
  RequestCounter(*handles, code)->Increment();
  handles->duration->Observe(Seconds(call.total_ns));
  if (handles->request_bytes != nullptr) {
    handles->request_bytes->Increment(call.bytes_in);
    handles->response_bytes->Increment(call.bytes_out);
  }
  if (handles->decode == nullptr) return;
  for (const auto& [phase, histogram] : {std::make_pair(&call.decode_ns, handles->decode),
                                         std::make_pair(&call.queue_ns, handles->queue),
                                         std::make_pair(&call.compute_ns, handles->compute),
                                         std::make_pair(&call.encode_ns, handles->encode)}) {
    if (phase->has_value()) histogram->Observe(Seconds(**phase));
  }
}

void AddServerMetrics(Metrics* metrics, const ServerMetricSources& sources) {
  const gradengine::EngineInfo info = sources.engine->info();
  metrics->AddGauge("gradserver_info",
                    "Always 1; the labels say which gradserver, oneDNN and instruction set.",
                    {{"version", sources.server_version},
                     {"onednn_version", info.onednn_version},
                     {"cpu_isa", info.cpu_isa}},
                    [] { return 1.0; });
  const auto started = std::chrono::steady_clock::now();
  metrics->AddGauge("gradserver_uptime_seconds", "Seconds since the server started.", [started] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  });

  std::function<int64_t()> calls_in_progress = sources.calls_in_progress;
  metrics->AddGauge(
      "gradserver_calls_in_progress",
      "Forward and ComputeGradients calls admitted and not yet answered (decoding, queued, "
      "computing or encoding).",
      [calls_in_progress] { return static_cast<double>(calls_in_progress()); });
  const ComputePool* pool = sources.pool;
  metrics->AddGauge("gradserver_compute_running", "Calls holding a compute thread now.",
                    [pool] { return static_cast<double>(pool->running()); });
  metrics->AddGauge("gradserver_compute_queued", "Calls waiting for a compute thread now.",
                    [pool] { return static_cast<double>(pool->queued()); });
  const double threads = sources.compute_threads;
  const double max_queued = sources.max_queued_requests;
  metrics->AddGauge("gradserver_compute_threads",
                    "Compute threads, i.e. calls that can compute at once "
                    "(--max_concurrent_requests).",
                    [threads] { return threads; });
  metrics->AddGauge("gradserver_compute_queue_limit",
                    "Calls that may wait for a compute thread before RESOURCE_EXHAUSTED "
                    "(--max_queued_requests).",
                    [max_queued] { return max_queued; });

  const gradengine::Engine* engine = sources.engine;
  metrics->AddGauge("gradserver_plan_cache_entries", "Compiled plans in the engine's cache.",
                    [engine] { return static_cast<double>(engine->stats().cached_plans); });
  metrics->AddCounterCallback(
      "gradserver_plan_cache_hits_total", "Calls that found their compiled plan in the cache.",
      [engine] { return static_cast<double>(engine->stats().plan_cache_hits); });
  metrics->AddCounterCallback(
      "gradserver_plan_cache_misses_total",
      "Plans compiled because the cache had none for the call (network, input shape and "
      "requested gradients); a compilation that failed is not counted.",
      [engine] { return static_cast<double>(engine->stats().plans_created); });

  const SharedMemoryRegistry* shared_memory = sources.shared_memory;
  metrics->AddGauge("gradserver_shared_memory_regions",
                    "Shared memory regions registered now, over all clients.",
                    [shared_memory] { return static_cast<double>(shared_memory->regions()); });
  metrics->AddGauge(
      "gradserver_shared_memory_mapped_bytes",
      "Bytes of shared memory mapped now (counted against --max_shared_memory_mb), including "
      "regions unregistered while a call still uses them.",
      [shared_memory] { return static_cast<double>(shared_memory->mapped_bytes()); });

  const gradengine::MemoryBudget* budget = sources.memory_budget;
  auto budget_stat = [budget](int64_t gradengine::MemoryBudget::Stats::*field) {
    return [budget, field] { return static_cast<double>(budget->stats().*field); };
  };
  metrics->AddGauge("gradserver_memory_limit_bytes",
                    "The memory budget every call reserves from (--max_memory_mb).",
                    budget_stat(&gradengine::MemoryBudget::Stats::limit_bytes));
  metrics->AddGauge("gradserver_memory_reserved_bytes",
                    "Bytes calls hold now: requests, intermediate buffers, unsent results.",
                    budget_stat(&gradengine::MemoryBudget::Stats::reserved_bytes));
  metrics->AddGauge("gradserver_memory_cached_bytes",
                    "Bytes of compiled plans and idle workspaces counted against the budget, "
                    "given up when a call needs the room.",
                    budget_stat(&gradengine::MemoryBudget::Stats::cached_bytes));
  metrics->AddGauge("gradserver_memory_peak_bytes",
                    "The highest reserved + cached bytes since the server started.",
                    budget_stat(&gradengine::MemoryBudget::Stats::peak_bytes));
  metrics->AddCounterCallback(
      "gradserver_memory_reservations_refused_total",
      "Reservations refused with RESOURCE_EXHAUSTED: more than the budget, or no room in time.",
      budget_stat(&gradengine::MemoryBudget::Stats::reservations_refused));
  metrics->AddGauge("gradserver_memory_reservations_waiting",
                    "Calls waiting for room in the memory budget now, served first come first "
                    "served.",
                    budget_stat(&gradengine::MemoryBudget::Stats::waiting));
  metrics->AddCounterCallback("gradserver_memory_reservations_waited_total",
                              "Reservations granted after waiting for room in the budget.",
                              budget_stat(&gradengine::MemoryBudget::Stats::reservations_waited));
  metrics->AddCounterCallback("gradserver_memory_returned_to_system_total",
                              "Times freed heap memory was given back to the system.",
                              budget_stat(&gradengine::MemoryBudget::Stats::returned_to_system));
  metrics->AddGauge("gradserver_process_resident_bytes",
                    "The process's resident memory now (/proc/self/statm): the budget's "
                    "memory plus what it does not count.",
                    [] { return static_cast<double>(gradengine::ResidentMemoryBytes()); });
  metrics->AddGauge("gradserver_plan_cache_bytes",
                    "Bytes the plan cache holds: estimated plan memory and idle workspaces.",
                    [engine] { return static_cast<double>(engine->stats().plan_cache_bytes); });
  const double max_plan_cache_bytes = static_cast<double>(sources.max_plan_cache_bytes);
  metrics->AddGauge("gradserver_plan_cache_limit_bytes",
                    "Bytes the plan cache may hold (a quarter of the memory budget).",
                    [max_plan_cache_bytes] { return max_plan_cache_bytes; });
  metrics->AddCounterCallback(
      "gradserver_plan_cache_evictions_total",
      "Plans dropped from the cache for its count or bytes, or for the memory budget.",
      [engine] { return static_cast<double>(engine->stats().plans_evicted); });
  std::function<int64_t()> cancelled = sources.responses_cancelled_undrained;
  metrics->AddCounterCallback("gradserver_responses_cancelled_undrained_total",
                              "Calls cancelled because the client did not read the response within "
                              "--response_drain_timeout_seconds.",
                              [cancelled] { return static_cast<double>(cancelled()); });
}

}  // namespace gradserver
