// grad.v1.GradientService on gRPC's callback API: the handlers between the wire and the engine.
//
// Forward and ComputeGradients are registered as raw (ByteBuffer) methods, so the service
// parses each request itself, into a message on a per-call protobuf arena. Bytes that are not
// a valid message are INVALID_ARGUMENT "request is not a valid grad.v1.<Type>", and the
// engine request decoded from the message borrows its tensor bytes instead of copying them.
//
// A call goes: parse and decode on the gRPC thread that received it (Timing.decode_ns); wait
// for a compute thread (queue_ns); run the engine there with a check before every layer that
// stops it with DEADLINE_EXCEEDED once the call's deadline has passed and with CANCELLED once
// the client has gone (forward_ns and backward_ns as the engine measured them); encode the
// result into the response on the same compute thread (encode_ns); Finish. Errors are the
// engine's and the wire decoder's statuses, unchanged (server/status_conversion.h). A
// request_id over 128 bytes is INVALID_ARGUMENT. GetInfo answers on the gRPC thread; it does no
// compute.
//
// Each Forward or ComputeGradients call the service admits is counted (GetInfo's
// requests_total and requests_failed) and, if `log_requests`, logged as one line:
//   method=ComputeGradients request_id="abc" code=OK bytes_in=123 bytes_out=456 decode_us=12
//   queue_us=3 compute_us=4567 encode_us=89 total_us=4680 peer="ipv4:127.0.0.1:40000"
// (on one line, with error="..." added when the code is not OK). GetInfo calls are logged too,
// but not counted.
// With `metrics` set, every answered call of every method is also recorded there by method
// and code (server/server_metrics.h), refused ones (UNAUTHENTICATED, UNAVAILABLE) included.
//
// With `bearer_tokens` set, every call (Forward, ComputeGradients, GetInfo) is first
// authenticated (server/auth.h): one without an accepted "authorization: Bearer <token>" is
// answered UNAUTHENTICATED before its request is parsed, counted in GetInfo's
// requests_unauthenticated (and, for Forward and ComputeGradients, as failed), and logged with
// its code and the reason, never the token.
//
// Memory: each call reserves twice its request's size (gRPC's received bytes and the parsed
// message) from `memory_budget` before it parses, without waiting (gRPC's threads must not
// block): a request that finds the budget full is RESOURCE_EXHAUSTED at once. The engine
// reserves the rest. A response that its client has not read `response_drain_timeout` (plus
// its size at kMinDrainBytesPerSecond) after it was ready is cancelled, which frees its
// results; such calls are logged and counted in GetInfo's memory.responses_cancelled_undrained.
//
// Drain() prepares a graceful stop: new calls get UNAVAILABLE ("the server is shutting down")
// while the calls in progress are answered.
//
// Thread safety: gRPC calls the handlers from any of its threads; the engine and the pool are
// thread-safe. The engine and the pool must outlive the service, and the pool must keep
// running until the gRPC server has shut down, because the calls it holds finish there.

#ifndef SERVER_GRADIENT_SERVICE_H_
#define SERVER_GRADIENT_SERVICE_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "grad/v1/gradient_service.grpc.pb.h"
#include "gradengine/engine.h"
#include "gradengine/memory_budget.h"
#include "server/auth.h"
#include "server/compute_pool.h"
#include "server/metrics.h"
#include "server/server_metrics.h"
#include "server/shared_memory.h"

namespace gradserver {

// Receives one finished log line (without a trailing newline).
using RequestLogSink = std::function<void(absl::string_view line)>;

// The slowest a client may read a response (beyond response_drain_timeout) before the call is
// cancelled: 16 MiB/s.
inline constexpr int64_t kMinDrainBytesPerSecond = int64_t{16} << 20;

// Longest request_id accepted, in bytes.
inline constexpr size_t kMaxRequestIdBytes = 128;

struct GradientServiceOptions {
  // The server's version, reported by GetInfo. Default: empty.
  std::string server_version;
  // Limits reported by GetInfo; the service itself enforces only max_message_bytes on the
  // responses it builds (requests over it are refused by gRPC before they reach the service).
  // Defaults: 0.
  int64_t max_message_bytes = 0;
  int max_concurrent_requests = 0;
  int max_queued_requests = 0;
  int64_t max_workspace_bytes = 0;
  // Log one line per call. Default: true.
  bool log_requests = true;
  // Where log lines go. Default (empty): stderr, one write per line so that lines from
  // concurrent calls never interleave.
  RequestLogSink log_sink;
  // The tokens a call must carry one of. Default: null, no token needed.
  std::shared_ptr<const BearerTokens> bearer_tokens;
  // Reported by GetInfo (grad.v1.Security); the transport enforces them. Defaults: false.
  bool tls = false;
  bool client_certificates_required = false;
  // What every call's memory is reserved from; borrowed, it must outlive the service.
  // Required.
  gradengine::MemoryBudget* memory_budget = nullptr;
  // Reported by GetInfo. Default: 0.
  int64_t max_plan_cache_bytes = 0;
  // How long a finished call's response may wait for its client to read it. Default: 30 s.
  absl::Duration response_drain_timeout = absl::Seconds(30);
  // Where each answered call is also recorded (server/server_metrics.h: requests by method and
  // code, latencies, bytes); borrowed, it must outlive the service. Default: null, no metrics.
  Metrics* metrics = nullptr;
};

using GradientServiceBase = grad::v1::GradientService::WithRawCallbackMethod_Forward<
    grad::v1::GradientService::WithRawCallbackMethod_ComputeGradients<
        grad::v1::GradientService::WithCallbackMethod_GetInfo<
            grad::v1::GradientService::WithCallbackMethod_RegisterSharedMemory<
                grad::v1::GradientService::WithCallbackMethod_UnregisterSharedMemory<
                    grad::v1::GradientService::WithCallbackMethod_GetSharedMemoryStatus<
                        grad::v1::GradientService::Service>>>>>>;

class GradientService final : public GradientServiceBase {
 public:
  // `engine`, `pool` and `shared_memory` are borrowed; see the lifetime rule above.
  GradientService(const GradientServiceOptions& options, gradengine::Engine* engine,
                  ComputePool* pool, SharedMemoryRegistry* shared_memory);
  ~GradientService() override;

  grpc::ServerUnaryReactor* Forward(grpc::CallbackServerContext* context,
                                    const grpc::ByteBuffer* request,
                                    grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* ComputeGradients(grpc::CallbackServerContext* context,
                                             const grpc::ByteBuffer* request,
                                             grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* GetInfo(grpc::CallbackServerContext* context,
                                    const grad::v1::GetInfoRequest* request,
                                    grad::v1::GetInfoResponse* response) override;
  grpc::ServerUnaryReactor* RegisterSharedMemory(
      grpc::CallbackServerContext* context, const grad::v1::RegisterSharedMemoryRequest* request,
      grad::v1::RegisterSharedMemoryResponse* response) override;
  grpc::ServerUnaryReactor* UnregisterSharedMemory(
      grpc::CallbackServerContext* context, const grad::v1::UnregisterSharedMemoryRequest* request,
      grad::v1::UnregisterSharedMemoryResponse* response) override;
  grpc::ServerUnaryReactor* GetSharedMemoryStatus(
      grpc::CallbackServerContext* context, const grad::v1::GetSharedMemoryStatusRequest* request,
      grad::v1::GetSharedMemoryStatusResponse* response) override;

  // Refuses every new call from now on with UNAVAILABLE, and waits until each Forward and
  // ComputeGradients call in progress has been answered or `deadline` has passed. Returns
  // whether any such call was in progress when it began. Idempotent.
  bool Drain(absl::Time deadline) ABSL_LOCKS_EXCLUDED(mu_);

  // Used by the per-call code in gradient_service.cc.
  const GradientServiceOptions& options() const { return options_; }
  gradengine::Engine& engine() const { return *engine_; }
  SharedMemoryRegistry& shared_memory() const { return *shared_memory_; }
  gradengine::MemoryBudget& memory_budget() const { return *options_.memory_budget; }
  // A finished call whose `bytes` of response are on their way: cancelled if it is still not
  // done response_drain_timeout plus the time those bytes take at kMinDrainBytesPerSecond from
  // now; `what` starts the log line of that. ForgetDrain when done. REQUIRES: the call's
  // context is valid until ForgetDrain.
  void WatchDrain(grpc::CallbackServerContext* context, size_t bytes, std::string what)
      ABSL_LOCKS_EXCLUDED(drain_mu_);
  void ForgetDrain(grpc::CallbackServerContext* context) ABSL_LOCKS_EXCLUDED(drain_mu_);
  // The namespace of the caller's shared memory regions: its credentials (the authorization
  // metadata with tokens, else one namespace for every caller).
  std::string SharedMemoryOwner(const grpc::ServerContextBase& context) const;
  // For GetInfo's counters; called just before a call is answered.
  void CountCall(bool ok);
  // A call admitted by AdmitCall() has been answered.
  void CallAnswered() ABSL_LOCKS_EXCLUDED(mu_);
  // Calls cancelled because their client did not read the response within
  // response_drain_timeout.
  int64_t responses_cancelled_undrained() const {
    return responses_cancelled_undrained_.load(std::memory_order_relaxed);
  }
  // Forward and ComputeGradients calls admitted and not yet answered.
  int64_t calls_in_progress() const ABSL_LOCKS_EXCLUDED(mu_);
  // Records an answered call, if `options.metrics` is set.
  void RecordMetrics(absl::string_view method, absl::StatusCode code,
                     const CallMeasurements& call) {
    if (request_metrics_ != nullptr) request_metrics_->Record(method, code, call);
  }
  void Log(absl::string_view line) const;

  // OK if the call may proceed: no token is required, or it carries an accepted one. Otherwise
  // Unauthenticated, counted in requests_unauthenticated.
  absl::Status Authenticate(const grpc::ServerContextBase& context);
  // The same check on a call's `authorization` values, for calls seen outside the service's
  // handlers (reflection, through an AuthMetadataProcessor). Logs a refusal of `method` from
  // `peer`.
  absl::Status AuthenticateOther(absl::string_view method, absl::string_view peer,
                                 absl::Span<const absl::string_view> authorization_values);

 private:
  // Answers a shared memory call: authenticates, runs `body` unless draining, logs it.
  grpc::ServerUnaryReactor* HandleSharedMemory(grpc::CallbackServerContext* context,
                                               absl::string_view method, absl::string_view name,
                                               const std::function<absl::Status()>& body);

  template <typename Method>
  grpc::ServerUnaryReactor* HandleCompute(grpc::CallbackServerContext* context,
                                          const grpc::ByteBuffer* request,
                                          grpc::ByteBuffer* response);

  const GradientServiceOptions options_;
  gradengine::Engine* const engine_;
  ComputePool* const pool_;
  SharedMemoryRegistry* const shared_memory_;
  const gradengine::EngineInfo engine_info_;
  const absl::Time start_time_;
  std::atomic<int64_t> requests_total_{0};
  std::atomic<int64_t> requests_failed_{0};
  std::atomic<int64_t> requests_unauthenticated_{0};
  // Null without options.metrics.
  const std::unique_ptr<RequestMetrics> request_metrics_;

  // Admits a new call unless draining; an admitted call is in progress until answered.
  bool AdmitCall() ABSL_LOCKS_EXCLUDED(mu_);
  bool NoCallInProgress() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return in_progress_ == 0; }

  // Cancels the watched calls past their time, until the service is destroyed.
  void DrainWatchLoop() ABSL_LOCKS_EXCLUDED(drain_mu_);
  struct Undrained {
    absl::Time cancel_at;
    absl::Duration allowed;
    std::string what;
  };
  absl::Mutex drain_mu_;
  absl::flat_hash_map<grpc::CallbackServerContext*, Undrained> undrained_
      ABSL_GUARDED_BY(drain_mu_);
  bool stopping_ ABSL_GUARDED_BY(drain_mu_) = false;
  std::atomic<int64_t> responses_cancelled_undrained_{0};
  std::thread drain_watch_;

  mutable absl::Mutex mu_;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  int64_t in_progress_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace gradserver

#endif  // SERVER_GRADIENT_SERVICE_H_
