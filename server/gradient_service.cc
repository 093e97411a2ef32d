#include "server/gradient_service.h"

#include <google/protobuf/arena.h>
#include <grpcpp/support/proto_buffer_reader.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gradengine/quote.h"
#include "proto/framing.h"
#include "proto/wire.h"
#include "server/status_conversion.h"

namespace gradserver {
namespace {

using Clock = std::chrono::steady_clock;

constexpr char kShuttingDown[] = "the server is shutting down; retry on another server";
constexpr char kSharedMemoryNotSameHost[] =
    "shared memory is only for clients on the server's host (a unix socket or loopback), and "
    "this call came from another address";

// Whether gRPC's peer string names a unix socket or a loopback address.
bool IsSameHostPeer(absl::string_view peer) {
  if (absl::StartsWith(peer, "unix:") || absl::StartsWith(peer, "ipv4:127.")) return true;
  for (absl::string_view loopback :
       {"ipv6:[::1]:", "ipv6:%5B::1%5D:", "ipv6:[::ffff:127.", "ipv6:%5B::ffff:127."}) {
    if (absl::StartsWith(peer, loopback)) return true;
  }
  return false;
}

int64_t NanosBetween(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(to - from).count();
}

// The metrics of a call that has only a total time (GetInfo, shared memory).
CallMeasurements TotalOnly(Clock::time_point arrived) {
  CallMeasurements call;
  call.total_ns = NanosBetween(arrived, Clock::now());
  return call;
}

// The request_id as the log shows it: quoted, escaped, and cut at the longest accepted length
// so that an oversized one cannot flood the log.
std::string LoggedRequestId(const std::string& request_id) {
  return gradengine::Quote(request_id, kMaxRequestIdBytes);
}

// A status message as a log line shows it: quoted, escaped and cut to a bounded length. Messages
// quote client strings only through gradengine::Quote, so this is a second bound, not the first.
std::string LoggedError(const absl::Status& status) {
  constexpr size_t kMaxLoggedErrorBytes = 1024;
  return gradengine::Quote(status.message(), kMaxLoggedErrorBytes);
}

// What differs between Forward and ComputeGradients; everything else is ComputeCall.
struct ForwardMethod {
  static constexpr const char* kName = "Forward";
  using WireRequest = grad::v1::ForwardRequest;
  using WireResponse = grad::v1::ForwardResponse;
  using EngineRequest = gradengine::ForwardRequest;
  using EngineResult = gradengine::ForwardResult;

  static absl::StatusOr<EngineRequest> Decode(const WireRequest& request,
                                              gradwire::DecodeStorage* storage) {
    return gradwire::DecodeForwardRequest(request, storage);
  }
  static absl::StatusOr<EngineResult> Run(gradengine::Engine& engine,
                                          const EngineRequest& request) {
    return engine.Forward(request);
  }
  static void EncodeSkeleton(const EngineResult& result, const WireRequest& request,
                             WireResponse* response) {
    gradwire::EncodeForwardResponseSkeleton(result, request.placement(), response);
  }
  static gradwire::Frame Frame(const WireResponse& skeleton, const EngineResult& result) {
    return gradwire::FrameForwardResponse(skeleton, result);
  }
};

struct ComputeGradientsMethod {
  static constexpr const char* kName = "ComputeGradients";
  using WireRequest = grad::v1::ComputeGradientsRequest;
  using WireResponse = grad::v1::ComputeGradientsResponse;
  using EngineRequest = gradengine::GradientRequest;
  using EngineResult = gradengine::GradientResult;

  static absl::StatusOr<EngineRequest> Decode(const WireRequest& request,
                                              gradwire::DecodeStorage* storage) {
    return gradwire::DecodeGradientRequest(request, storage);
  }
  static absl::StatusOr<EngineResult> Run(gradengine::Engine& engine,
                                          const EngineRequest& request) {
    return engine.ComputeGradients(request);
  }
  static void EncodeSkeleton(const EngineResult& result, const WireRequest& request,
                             WireResponse* response) {
    gradwire::EncodeGradientResponseSkeleton(result, /*include_output=*/!request.skip_output(),
                                             request.placement(), response);
  }
  static gradwire::Frame Frame(const WireResponse& skeleton, const EngineResult& result) {
    return gradwire::FrameGradientResponse(skeleton, result);
  }
};

// One Forward or ComputeGradients call from arrival to done, and its own reactor. Created on
// the gRPC thread, handed to a compute thread, finished there; until Finish exactly one thread
// uses it. It is deleted once both Finish has returned and gRPC has called OnDone (the response
// sent, or the call cancelled). The message, its arena and the decoded engine request (which
// borrows the message's bytes) are freed at Finish; the reservation of the request's memory
// lasts until done, because gRPC holds the received bytes until then.
template <typename Method>
class ComputeCall final : public grpc::ServerUnaryReactor {
 public:
  ComputeCall(GradientService* service, grpc::CallbackServerContext* context,
              grpc::ByteBuffer* response_buffer)
      : service_(service),
        context_(context),
        reactor_(this),
        response_buffer_(response_buffer),
        deadline_(context->deadline()),
        peer_(context->peer()),
        arrived_(Clock::now()) {
    request_ = google::protobuf::Arena::CreateMessage<typename Method::WireRequest>(&arena_);
    if (service->shared_memory().options().allowed) {
      if (IsSameHostPeer(peer_)) {
        resolver_ = service->shared_memory().NewCallResolver(service->SharedMemoryOwner(*context));
        storage_.shared_memory = resolver_.get();
      } else {
        storage_.shared_memory_refusal = kSharedMemoryNotSameHost;
      }
    }
  }

  grpc::ServerUnaryReactor* reactor() const { return reactor_; }

  // Parses and decodes the request. On the gRPC thread.
  absl::Status Decode(const grpc::ByteBuffer& request_buffer) {
    bytes_in_ = request_buffer.Length();
    // The received bytes and their parsed copy; gRPC's thread must not wait, so a request that
    // finds the budget full is refused rather than queued.
    absl::StatusOr<gradengine::MemoryBudget::Reservation> reserved =
        service_->memory_budget().TryReserve(2 * static_cast<int64_t>(bytes_in_),
                                             "its request as received and as parsed");
    absl::Status status = reserved.status();
    if (status.ok()) {
      request_reservation_ = *std::move(reserved);
      status = ParseAndDecode(request_buffer);
    }
    decoded_ = Clock::now();
    timing_.set_decode_ns(NanosBetween(arrived_, decoded_));
    return status;
  }

  // Runs the engine and encodes the result, then finishes the call. On a compute thread, which
  // `slot` holds.
  void Compute(ComputePool::Slot& slot) {
    const Clock::time_point started = Clock::now();
    timing_.set_queue_ns(NanosBetween(decoded_, started));
    computed_ = true;
    absl::Status status = ShouldContinue();
    // The regions were checked when the request was decoded; the queue may have been long.
    if (status.ok() && resolver_ != nullptr) status = resolver_->Revalidate();
    std::optional<absl::StatusOr<typename Method::EngineResult>> result;
    if (status.ok()) {
      engine_request_->should_continue = [this] { return ShouldContinue(); };
      result.emplace(Method::Run(service_->engine(), *engine_request_));
      status = result->status();
    }
    const Clock::time_point computed = Clock::now();
    compute_ns_ = NanosBetween(started, computed);
    if (status.ok()) {
      timing_.set_forward_ns((*result)->timing.forward_ns);
      timing_.set_backward_ns((*result)->timing.backward_ns);
      status = Encode(**result);
    }
    encode_ns_ = NanosBetween(computed, Clock::now());
    // Free the slot before the reply goes out: a caller that sends its next request as soon as
    // it has this one's answer must find the slot free.
    slot.Release();
    Finish(status);
  }

  // Sends `status` (and the response if OK), counts and logs the call, and deletes this.
  void Finish(const absl::Status& status) {
    const int64_t total_ns = NanosBetween(arrived_, Clock::now());
    const size_t bytes_out = status.ok() ? response_buffer_->Length() : 0;
    // Counted first, so that a GetInfo sent after this answer arrives sees it.
    service_->CountCall(status.ok());
    service_->RecordMetrics(Method::kName, status.code(), Measurements(total_ns, bytes_out));
    // A response on its way holds its results' memory until the client has read it.
    if (status.ok()) {
      service_->WatchDrain(context_, bytes_out,
                           absl::StrCat("method=", Method::kName,
                                        " request_id=", LoggedRequestId(request_->request_id())));
    }
    // The context may be gone as soon as Finish is called; nothing below touches it.
    reactor_->Finish(ToGrpcStatus(status));
    service_->CallAnswered();
    if (service_->options().log_requests) {
      std::string line = absl::StrCat(
          "method=", Method::kName, " request_id=", LoggedRequestId(request_->request_id()),
          " code=", absl::StatusCodeToString(status.code()), " bytes_in=", bytes_in_,
          " bytes_out=", bytes_out, " decode_us=", timing_.decode_ns() / 1000,
          " queue_us=", timing_.queue_ns() / 1000, " compute_us=", compute_ns_ / 1000,
          " encode_us=", encode_ns_ / 1000, " total_us=", total_ns / 1000, " peer=\"",
          absl::CEscape(peer_), "\"");
      if (!status.ok()) absl::StrAppend(&line, " error=", LoggedError(status));
      service_->Log(line);
    }
    // The request is no longer needed; free it now rather than when the client has read the
    // response.
    engine_request_.reset();
    storage_ = gradwire::DecodeStorage();
    resolver_.reset();
    request_ = nullptr;
    arena_.Reset();
    // Half the request's reservation paid for the parsed copy; gRPC's bytes stay until done.
    request_reservation_.Split(static_cast<int64_t>(bytes_in_)).Release();
    Unref();
  }

  void OnDone() override {
    service_->ForgetDrain(context_);
    Unref();
  }

 private:
  // The phases this call went through, for the metrics.
  CallMeasurements Measurements(int64_t total_ns, size_t bytes_out) const {
    CallMeasurements call;
    call.bytes_in = static_cast<int64_t>(bytes_in_);
    call.bytes_out = static_cast<int64_t>(bytes_out);
    call.total_ns = total_ns;
    if (decoded_ != Clock::time_point()) call.decode_ns = timing_.decode_ns();
    if (computed_) {
      call.queue_ns = timing_.queue_ns();
      call.compute_ns = compute_ns_;
      call.encode_ns = encode_ns_;
    }
    return call;
  }

  // Deletes this once both Finish and OnDone are through with it.
  void Unref() {
    if (holders_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete this;
  }

  absl::Status ParseAndDecode(const grpc::ByteBuffer& request_buffer) {
    // No message at all (not even an empty one) arrives when the client gave up while sending,
    // often before gRPC has marked the call cancelled.
    if (!request_buffer.Valid()) {
      if (absl::Status stopped = ShouldContinue(); !stopped.ok()) return stopped;
      return absl::CancelledError(absl::StrCat("the call carried no ", request_->GetTypeName(),
                                               " message: the client cancelled it while "
                                               "sending, or closed it without sending one"));
    }
    // The copy shares the buffer's slices; the reader walks them without flattening.
    grpc::ByteBuffer buffer(request_buffer);
    grpc::ProtoBufferReader reader(&buffer);
    if (!reader.status().ok() || !request_->ParseFromZeroCopyStream(&reader)) {
      request_->Clear();
      grpc::ByteBuffer again(request_buffer);
      grpc::ProtoBufferReader rereader(&again);
      const std::string field =
          gradwire::FindInvalidUtf8Field(*request_->GetDescriptor(), &rereader);
      if (!field.empty()) {
        return absl::InvalidArgumentError(absl::StrCat(
            field, " is not valid UTF-8 (string fields must be; send raw bytes as ", "a tensor)"));
      }
      return absl::InvalidArgumentError(absl::StrCat("request is not a valid ",
                                                     request_->GetTypeName(), " (", bytes_in_,
                                                     " bytes could not be parsed)"));
    }
    if (request_->request_id().size() > kMaxRequestIdBytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("request_id has ", request_->request_id().size(), " bytes; at most ",
                       kMaxRequestIdBytes, " are allowed"));
    }
    absl::StatusOr<typename Method::EngineRequest> decoded = Method::Decode(*request_, &storage_);
    if (!decoded.ok()) return decoded.status();
    engine_request_.emplace(*std::move(decoded));
    return absl::OkStatus();
  }

  // Between layers: has the caller stopped waiting?
  absl::Status ShouldContinue() const {
    if (std::chrono::system_clock::now() >= deadline_) {
      return absl::DeadlineExceededError(
          "the call's deadline passed before the computation finished");
    }
    if (context_->IsCancelled()) {
      return absl::CancelledError("the call was cancelled before the computation finished");
    }
    return absl::OkStatus();
  }

  // Frames the response around the result's buffers, which the engine computed into and which
  // become the response's slices: no tensor byte is copied.
  absl::Status Encode(const typename Method::EngineResult& result) {
    auto* skeleton = google::protobuf::Arena::CreateMessage<typename Method::WireResponse>(&arena_);
    const Clock::time_point start = Clock::now();
    Method::EncodeSkeleton(result, *request_, skeleton);
    skeleton->set_request_id(request_->request_id());
    // The response cannot hold the time spent framing itself; encode_ns covers the skeleton.
    timing_.set_encode_ns(NanosBetween(start, Clock::now()));
    *skeleton->mutable_timing() = timing_;
    gradwire::Frame frame = Method::Frame(*skeleton, result);
    const int64_t limit = service_->options().max_message_bytes;
    if (limit > 0 && frame.size() > static_cast<size_t>(limit)) {
      return absl::ResourceExhaustedError(absl::StrCat("the response would be ", frame.size(),
                                                       " bytes, over the server's limit of ", limit,
                                                       " bytes per message (max_message_mb)"));
    }
    *response_buffer_ = std::move(frame).ToByteBuffer();
    return absl::OkStatus();
  }

  GradientService* const service_;
  grpc::CallbackServerContext* const context_;
  grpc::ServerUnaryReactor* const reactor_;
  grpc::ByteBuffer* const response_buffer_;
  const std::chrono::system_clock::time_point deadline_;
  const std::string peer_;
  const Clock::time_point arrived_;
  Clock::time_point decoded_;

  // Destroyed last: the memory it pays for goes first.
  gradengine::MemoryBudget::Reservation request_reservation_;
  // Finish and OnDone.
  std::atomic<int> holders_{2};
  google::protobuf::Arena arena_;
  typename Method::WireRequest* request_ = nullptr;  // on arena_
  // Keeps the shared memory the request uses mapped; destroyed after engine_request_ and
  // storage_, which point into it.
  std::unique_ptr<gradwire::SharedMemoryResolver> resolver_;
  gradwire::DecodeStorage storage_;
  std::optional<typename Method::EngineRequest> engine_request_;

  grad::v1::Timing timing_;
  size_t bytes_in_ = 0;
  int64_t compute_ns_ = 0;
  int64_t encode_ns_ = 0;
  // Whether Compute ran (Decode ran when decoded_ is set).
  bool computed_ = false;
};

}  // namespace

GradientService::GradientService(const GradientServiceOptions& options, gradengine::Engine* engine,
                                 ComputePool* pool, SharedMemoryRegistry* shared_memory)
    : options_(options),
      engine_(engine),
      pool_(pool),
      shared_memory_(shared_memory),
      engine_info_(engine->info()),
      start_time_(absl::Now()),
      request_metrics_(options.metrics == nullptr
                           ? nullptr
                           : std::make_unique<RequestMetrics>(options.metrics)) {
  drain_watch_ = std::thread([this] { DrainWatchLoop(); });
}

GradientService::~GradientService() {
  {
    absl::MutexLock lock(&drain_mu_);
    stopping_ = true;
  }
  drain_watch_.join();
}

void GradientService::WatchDrain(grpc::CallbackServerContext* context, size_t bytes,
                                 std::string what) {
  // A large response needs time to cross even when its client reads: it gets that too.
  const absl::Duration allowed =
      options_.response_drain_timeout +
      absl::Seconds(static_cast<double>(bytes) / static_cast<double>(kMinDrainBytesPerSecond));
  absl::MutexLock lock(&drain_mu_);
  undrained_[context] = Undrained{absl::Now() + allowed, allowed, std::move(what)};
}

void GradientService::ForgetDrain(grpc::CallbackServerContext* context) {
  absl::MutexLock lock(&drain_mu_);
  undrained_.erase(context);
}

void GradientService::DrainWatchLoop() {
  // Checked this often: the timeout is honoured to within this.
  const absl::Duration tick =
      std::min(absl::Milliseconds(100), options_.response_drain_timeout / 4);
  absl::MutexLock lock(&drain_mu_);
  while (!drain_mu_.AwaitWithTimeout(absl::Condition(&stopping_), tick)) {
    const absl::Time now = absl::Now();
    std::vector<std::string> lines;
    for (auto it = undrained_.begin(); it != undrained_.end();) {
      if (it->second.cancel_at > now) {
        ++it;
        continue;
      }
      // Under drain_mu_, so OnDone cannot end the call (and free the context) meanwhile.
      it->first->TryCancel();
      responses_cancelled_undrained_.fetch_add(1, std::memory_order_relaxed);
      lines.push_back(absl::StrCat(
          it->second.what, " code=CANCELLED error=\"the client did not read the response within ",
          absl::FormatDuration(it->second.allowed), "; cancelled to free its memory\""));
      undrained_.erase(it++);
    }
    if (lines.empty() || !options_.log_requests) continue;
    // Logged without the lock, so that a slow log never holds up OnDone.
    drain_mu_.Unlock();
    for (const std::string& line : lines) Log(line);
    drain_mu_.Lock();
  }
}

template <typename Method>
grpc::ServerUnaryReactor* GradientService::HandleCompute(grpc::CallbackServerContext* context,
                                                         const grpc::ByteBuffer* request,
                                                         grpc::ByteBuffer* response) {
  if (!AdmitCall()) {
    const Clock::time_point arrived = Clock::now();
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    RecordMetrics(Method::kName, absl::StatusCode::kUnavailable, TotalOnly(arrived));
    reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, kShuttingDown));
    return reactor;
  }
  auto* call = new ComputeCall<Method>(this, context, response);
  grpc::ServerUnaryReactor* reactor = call->reactor();
  absl::Status status = Authenticate(*context);
  if (status.ok()) status = call->Decode(*request);
  if (!status.ok()) {
    call->Finish(status);
    return reactor;
  }
  status = pool_->Submit([call](ComputePool::Slot& slot) { call->Compute(slot); });
  if (!status.ok()) call->Finish(status);
  return reactor;
}

grpc::ServerUnaryReactor* GradientService::Forward(grpc::CallbackServerContext* context,
                                                   const grpc::ByteBuffer* request,
                                                   grpc::ByteBuffer* response) {
  return HandleCompute<ForwardMethod>(context, request, response);
}

grpc::ServerUnaryReactor* GradientService::ComputeGradients(grpc::CallbackServerContext* context,
                                                            const grpc::ByteBuffer* request,
                                                            grpc::ByteBuffer* response) {
  return HandleCompute<ComputeGradientsMethod>(context, request, response);
}

grpc::ServerUnaryReactor* GradientService::GetInfo(grpc::CallbackServerContext* context,
                                                   const grad::v1::GetInfoRequest* /*request*/,
                                                   grad::v1::GetInfoResponse* response) {
  const Clock::time_point arrived = Clock::now();
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  {
    absl::MutexLock lock(&mu_);
    if (draining_) {
      RecordMetrics("GetInfo", absl::StatusCode::kUnavailable, TotalOnly(arrived));
      reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, kShuttingDown));
      return reactor;
    }
  }
  if (absl::Status status = Authenticate(*context); !status.ok()) {
    const std::string peer = context->peer();
    RecordMetrics("GetInfo", status.code(), TotalOnly(arrived));
    reactor->Finish(ToGrpcStatus(status));
    if (options_.log_requests) {
      Log(absl::StrCat("method=GetInfo code=", absl::StatusCodeToString(status.code()),
                       " total_us=", NanosBetween(arrived, Clock::now()) / 1000, " peer=\"",
                       absl::CEscape(peer), "\" error=", LoggedError(status)));
    }
    return reactor;
  }
  response->set_server_version(options_.server_version);
  response->set_onednn_version(engine_info_.onednn_version);
  response->set_cpu_isa(engine_info_.cpu_isa);
  response->set_threads_per_request(engine_info_.threads_per_call);
  grad::v1::Limits* limits = response->mutable_limits();
  limits->set_max_message_bytes(options_.max_message_bytes);
  limits->set_max_elements(engine_info_.max_elements);
  limits->set_max_workspace_bytes(options_.max_workspace_bytes);
  limits->set_max_concurrent_requests(options_.max_concurrent_requests);
  limits->set_max_queued_requests(options_.max_queued_requests);
  limits->set_max_layers(gradengine::kMaxLayers);
  limits->set_max_parameters(gradengine::kMaxParameters);
  limits->set_max_name_bytes(gradengine::kMaxNameBytes);
  limits->set_max_network_bytes(gradwire::kMaxNetworkSpecBytes);
  limits->set_max_memory_bytes(options_.memory_budget->limit_bytes());
  limits->set_response_drain_timeout_ns(absl::ToInt64Nanoseconds(options_.response_drain_timeout));
  const gradengine::MemoryBudget::Stats budget = options_.memory_budget->stats();
  const gradengine::EngineStats engine_stats = engine_->stats();
  grad::v1::MemoryStatus* memory = response->mutable_memory();
  memory->set_limit_bytes(budget.limit_bytes);
  memory->set_reserved_bytes(budget.reserved_bytes);
  memory->set_cached_bytes(budget.cached_bytes);
  memory->set_peak_bytes(budget.peak_bytes);
  memory->set_plan_cache_bytes(engine_stats.plan_cache_bytes);
  memory->set_max_plan_cache_bytes(options_.max_plan_cache_bytes);
  memory->set_reservations_refused(budget.reservations_refused);
  memory->set_responses_cancelled_undrained(
      responses_cancelled_undrained_.load(std::memory_order_relaxed));
  for (const std::string& name : gradwire::SupportedLayerNames()) response->add_layers(name);
  for (const std::string& name : gradwire::SupportedActivationNames()) {
    response->add_activations(name);
  }
  for (const std::string& name : gradwire::SupportedObjectiveNames()) {
    response->add_objectives(name);
  }
  response->add_dtypes(grad::v1::DATA_TYPE_FLOAT32);
  response->set_requests_total(requests_total_.load(std::memory_order_relaxed));
  response->set_requests_failed(requests_failed_.load(std::memory_order_relaxed));
  response->set_uptime_ns(absl::ToInt64Nanoseconds(absl::Now() - start_time_));
  grad::v1::Security* security = response->mutable_security();
  security->set_tls(options_.tls);
  security->set_client_certificates_required(options_.client_certificates_required);
  security->set_bearer_token_required(options_.bearer_tokens != nullptr);
  response->set_requests_unauthenticated(requests_unauthenticated_.load(std::memory_order_relaxed));
  grad::v1::SharedMemoryLimits* shared = response->mutable_shared_memory();
  shared->set_allowed(shared_memory_->options().allowed);
  shared->set_max_regions(shared_memory_->options().max_regions);
  shared->set_max_mapped_bytes(shared_memory_->options().max_mapped_bytes);

  const std::string peer = context->peer();
  RecordMetrics("GetInfo", absl::StatusCode::kOk, TotalOnly(arrived));
  reactor->Finish(grpc::Status::OK);
  if (options_.log_requests) {
    Log(absl::StrCat("method=GetInfo code=OK total_us=", NanosBetween(arrived, Clock::now()) / 1000,
                     " peer=\"", absl::CEscape(peer), "\""));
  }
  return reactor;
}

grpc::ServerUnaryReactor* GradientService::HandleSharedMemory(
    grpc::CallbackServerContext* context, absl::string_view method, absl::string_view name,
    const std::function<absl::Status()>& body) {
  const Clock::time_point arrived = Clock::now();
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const std::string peer = context->peer();
  // The region's name, cut to a bounded prefix (never its key), copied now: the request is
  // gone once the call is finished.
  const std::string logged_name = gradengine::Quote(name);
  absl::Status status;
  {
    absl::MutexLock lock(&mu_);
    if (draining_) status = absl::UnavailableError(kShuttingDown);
  }
  if (status.ok()) status = Authenticate(*context);
  if (status.ok() && shared_memory_->options().allowed && !IsSameHostPeer(peer)) {
    status = absl::PermissionDeniedError(kSharedMemoryNotSameHost);
  }
  if (status.ok()) status = body();
  RecordMetrics(method, status.code(), TotalOnly(arrived));
  reactor->Finish(ToGrpcStatus(status));
  if (options_.log_requests) {
    std::string line = absl::StrCat("method=", method, " name=", logged_name,
                                    " code=", absl::StatusCodeToString(status.code()),
                                    " total_us=", NanosBetween(arrived, Clock::now()) / 1000,
                                    " peer=\"", absl::CEscape(peer), "\"");
    if (!status.ok()) absl::StrAppend(&line, " error=", LoggedError(status));
    Log(line);
  }
  return reactor;
}

grpc::ServerUnaryReactor* GradientService::RegisterSharedMemory(
    grpc::CallbackServerContext* context, const grad::v1::RegisterSharedMemoryRequest* request,
    grad::v1::RegisterSharedMemoryResponse* /*response*/) {
  return HandleSharedMemory(context, "RegisterSharedMemory", request->name(), [&] {
    return shared_memory_->Register(SharedMemoryOwner(*context), request->name(), request->key(),
                                    request->offset(), request->byte_size(), request->proof());
  });
}

grpc::ServerUnaryReactor* GradientService::UnregisterSharedMemory(
    grpc::CallbackServerContext* context, const grad::v1::UnregisterSharedMemoryRequest* request,
    grad::v1::UnregisterSharedMemoryResponse* response) {
  return HandleSharedMemory(context, "UnregisterSharedMemory", request->name(), [&] {
    absl::StatusOr<int> removed =
        shared_memory_->Unregister(SharedMemoryOwner(*context), request->name());
    if (!removed.ok()) return removed.status();
    response->set_unregistered(*removed);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* GradientService::GetSharedMemoryStatus(
    grpc::CallbackServerContext* context, const grad::v1::GetSharedMemoryStatusRequest* request,
    grad::v1::GetSharedMemoryStatusResponse* response) {
  return HandleSharedMemory(context, "GetSharedMemoryStatus", request->name(), [&] {
    absl::StatusOr<std::vector<SharedMemoryRegionInfo>> regions =
        shared_memory_->Status(SharedMemoryOwner(*context), request->name());
    if (!regions.ok()) return regions.status();
    for (const SharedMemoryRegionInfo& info : *regions) {
      grad::v1::SharedMemoryRegionStatus* region = response->add_regions();
      region->set_name(info.name);
      region->set_offset(info.offset);
      region->set_byte_size(info.byte_size);
      region->set_calls_in_progress(info.calls_in_progress);
    }
    return absl::OkStatus();
  });
}

std::string GradientService::SharedMemoryOwner(const grpc::ServerContextBase& context) const {
  if (options_.bearer_tokens == nullptr) return "";
  const auto range = context.client_metadata().equal_range(kAuthorizationMetadataKey);
  if (range.first == range.second) return "";
  // The token itself (Authenticate accepted exactly one "Bearer <token>"), so that spellings
  // of the scheme do not make namespaces of their own.
  absl::string_view value(range.first->second.data(), range.first->second.size());
  const size_t space = value.find(' ');
  if (space != absl::string_view::npos) value.remove_prefix(space);
  return std::string(absl::StripLeadingAsciiWhitespace(value));
}

bool GradientService::AdmitCall() {
  absl::MutexLock lock(&mu_);
  if (draining_) return false;
  ++in_progress_;
  return true;
}

void GradientService::CountCall(bool ok) {
  requests_total_.fetch_add(1, std::memory_order_relaxed);
  if (!ok) requests_failed_.fetch_add(1, std::memory_order_relaxed);
}

absl::Status GradientService::Authenticate(const grpc::ServerContextBase& context) {
  if (options_.bearer_tokens == nullptr) return absl::OkStatus();
  std::vector<absl::string_view> values;
  const auto range = context.client_metadata().equal_range(kAuthorizationMetadataKey);
  for (auto it = range.first; it != range.second; ++it) {
    values.emplace_back(it->second.data(), it->second.size());
  }
  absl::Status status = options_.bearer_tokens->Check(values);
  if (!status.ok()) requests_unauthenticated_.fetch_add(1, std::memory_order_relaxed);
  return status;
}

absl::Status GradientService::AuthenticateOther(
    absl::string_view method, absl::string_view peer,
    absl::Span<const absl::string_view> authorization_values) {
  if (options_.bearer_tokens == nullptr) return absl::OkStatus();
  absl::Status status = options_.bearer_tokens->Check(authorization_values);
  if (status.ok()) return status;
  requests_unauthenticated_.fetch_add(1, std::memory_order_relaxed);
  if (options_.log_requests) {
    Log(absl::StrCat("method=", gradengine::Quote(method),
                     " code=", absl::StatusCodeToString(status.code()), " peer=\"",
                     absl::CEscape(peer), "\" error=", LoggedError(status)));
  }
  return status;
}

void GradientService::CallAnswered() {
  absl::MutexLock lock(&mu_);
  --in_progress_;
}

int64_t GradientService::calls_in_progress() const {
  absl::MutexLock lock(&mu_);
  return in_progress_;
}

bool GradientService::Drain(absl::Time deadline) {
  absl::MutexLock lock(&mu_);
  draining_ = true;
  const bool calls_in_progress = in_progress_ > 0;
  mu_.AwaitWithDeadline(absl::Condition(this, &GradientService::NoCallInProgress), deadline);
  return calls_in_progress;
}

void GradientService::Log(absl::string_view line) const {
  if (options_.log_sink) {
    options_.log_sink(line);
    return;
  }
  // One write per line: stdio locks the stream for the call, so lines never interleave.
  std::fprintf(stderr, "%.*s\n", static_cast<int>(line.size()), line.data());
}

}  // namespace gradserver
