#include "gradclient/client.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/random/random.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/grpc_status.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/wire_format_lite.h"
#include "grad/v1/gradient_service.grpc.pb.h"
#include "grad/v1/gradient_service.pb.h"
#include "grpcpp/channel.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/channel_arguments.h"
#include "grpcpp/support/slice.h"
#include "proto/wire.h"

namespace gradclient {
namespace {

constexpr char kHealthCheckMethod[] = "/grpc.health.v1.Health/Check";

absl::Status CheckOptions(const std::string& target, const ClientOptions& options) {
  if (target.empty()) return absl::InvalidArgumentError("target is empty; expected host:port");
  if (options.max_message_mb < 1 || options.max_message_mb > 2047) {
    return absl::InvalidArgumentError(absl::StrCat("max_message_mb=", options.max_message_mb,
                                                   " is out of range; expected 1..2047"));
  }
  if (options.default_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "default_timeout=", absl::FormatDuration(options.default_timeout), " must be positive"));
  }
  const RetryOptions& retry = options.retry;
  if (retry.max_attempts < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("retry.max_attempts=", retry.max_attempts, " must be >= 1"));
  }
  if (retry.initial_backoff <= absl::ZeroDuration() || retry.initial_backoff > absl::Hours(1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("retry.initial_backoff=", absl::FormatDuration(retry.initial_backoff),
                     " must be positive and at most 1h"));
  }
  if (retry.max_backoff < retry.initial_backoff || retry.max_backoff > absl::Hours(1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "retry.max_backoff=", absl::FormatDuration(retry.max_backoff),
        " must be at least retry.initial_backoff=", absl::FormatDuration(retry.initial_backoff),
        " and at most 1h"));
  }
  if (!(retry.backoff_multiplier >= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("retry.backoff_multiplier=", retry.backoff_multiplier, " must be >= 1"));
  }
  if (!(retry.jitter >= 0.0 && retry.jitter < 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("retry.jitter=", retry.jitter, " must be in [0, 1)"));
  }
  return absl::OkStatus();
}

// The deadline of a call that starts at `start`; see CallOptions.
absl::StatusOr<absl::Time> CallDeadline(const CallOptions& call, const ClientOptions& options,
                                        absl::Time start) {
  if (call.timeout.has_value() && *call.timeout < absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("timeout=", absl::FormatDuration(*call.timeout), " must be >= 0"));
  }
  if (!call.deadline.has_value() && !call.timeout.has_value()) {
    return start + options.default_timeout;
  }
  absl::Time deadline = absl::InfiniteFuture();
  if (call.deadline.has_value()) deadline = *call.deadline;
  if (call.timeout.has_value()) deadline = std::min(deadline, start + *call.timeout);
  return deadline;
}

std::string RandomRequestId() {
  absl::BitGen gen;
  return absl::StrFormat("%016x", absl::Uniform<uint64_t>(gen));
}

ServerTiming FromWire(const grad::v1::Timing& timing) {
  ServerTiming result;
  result.decode = absl::Nanoseconds(timing.decode_ns());
  result.queue = absl::Nanoseconds(timing.queue_ns());
  result.forward = absl::Nanoseconds(timing.forward_ns());
  result.backward = absl::Nanoseconds(timing.backward_ns());
  result.encode = absl::Nanoseconds(timing.encode_ns());
  return result;
}

// A response the client cannot decode is the server's fault, not the caller's request's.
absl::Status MalformedResponse(const std::string& target, absl::string_view method,
                               const absl::Status& status) {
  return absl::InternalError(
      absl::StrCat("malformed ", method, " response from ", target, ": ", status.message()));
}

// grpc.health.v1.HealthCheckRequest { string service = 1; } in the protobuf wire format.
std::string EncodeHealthCheckRequest(const std::string& service) {
  std::string bytes;
  if (service.empty()) return bytes;  // proto3 leaves a default field out
  google::protobuf::io::StringOutputStream stream(&bytes);
  google::protobuf::io::CodedOutputStream out(&stream);
  out.WriteTag(google::protobuf::internal::WireFormatLite::MakeTag(
      1, google::protobuf::internal::WireFormatLite::WIRETYPE_LENGTH_DELIMITED));
  out.WriteVarint32(static_cast<uint32_t>(service.size()));
  out.WriteString(service);
  return bytes;
}

// grpc.health.v1.HealthCheckResponse { ServingStatus status = 1; }; unknown fields skipped.
absl::StatusOr<ServingStatus> DecodeHealthCheckResponse(const std::string& bytes) {
  using google::protobuf::internal::WireFormatLite;
  google::protobuf::io::CodedInputStream in(reinterpret_cast<const uint8_t*>(bytes.data()),
                                            static_cast<int>(bytes.size()));
  uint32_t status = 0;
  while (const uint32_t tag = in.ReadTag()) {
    if (tag == WireFormatLite::MakeTag(1, WireFormatLite::WIRETYPE_VARINT)) {
      if (!in.ReadVarint32(&status)) {
        return absl::InvalidArgumentError("status field is truncated");
      }
    } else if (!WireFormatLite::SkipField(&in, tag)) {
      return absl::InvalidArgumentError(absl::StrCat("field with tag ", tag, " is malformed"));
    }
  }
  if (!in.ConsumedEntireMessage()) return absl::InvalidArgumentError("message is malformed");
  if (status > 3) {
    return absl::InvalidArgumentError(absl::StrCat("status=", status, " is not a ServingStatus"));
  }
  return static_cast<ServingStatus>(status);
}

std::string FlattenByteBuffer(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  std::string bytes;
  if (!buffer.Dump(&slices).ok()) return bytes;
  for (const grpc::Slice& slice : slices) {
    bytes.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  }
  return bytes;
}

}  // namespace

const char* ServingStatusName(ServingStatus status) {
  switch (status) {
    case ServingStatus::kUnknown:
      return "UNKNOWN";
    case ServingStatus::kServing:
      return "SERVING";
    case ServingStatus::kNotServing:
      return "NOT_SERVING";
    case ServingStatus::kServiceUnknown:
      return "SERVICE_UNKNOWN";
  }
  return "UNKNOWN";
}

class Client::Impl {
 public:
  Impl(std::string target, const ClientOptions& options, std::shared_ptr<grpc::Channel> channel)
      : target_(std::move(target)),
        options_(options),
        channel_(std::move(channel)),
        stub_(grad::v1::GradientService::NewStub(channel_)),
        generic_stub_(channel_) {}

  const std::string& target() const { return target_; }

  absl::StatusOr<ForwardReply> Forward(const gradengine::ForwardRequest& request,
                                       const CallOptions& call) {
    const absl::Time start = absl::Now();
    absl::StatusOr<absl::Time> deadline = CallDeadline(call, options_, start);
    if (!deadline.ok()) return deadline.status();
    grad::v1::ForwardRequest wire_request;
    gradwire::EncodeForwardRequest(request, &wire_request);
    wire_request.set_request_id(call.request_id.empty() ? RandomRequestId() : call.request_id);

    grad::v1::ForwardResponse response;
    ForwardReply reply;
    absl::Status status = CallWithRetry(
        *deadline,
        [&](grpc::ClientContext* context) {
          response.Clear();
          return stub_->Forward(context, wire_request, &response);
        },
        &reply.call.attempts);
    if (!status.ok()) return status;
    absl::StatusOr<gradengine::ForwardResult> result = gradwire::DecodeForwardResult(response);
    if (!result.ok()) return MalformedResponse(target_, "Forward", result.status());
    reply.result = *std::move(result);
    reply.call.request_id = response.request_id();
    reply.call.timing = FromWire(response.timing());
    reply.call.round_trip = absl::Now() - start;
    return reply;
  }

  absl::StatusOr<GradientReply> ComputeGradients(const gradengine::GradientRequest& request,
                                                 const CallOptions& call) {
    const absl::Time start = absl::Now();
    absl::StatusOr<absl::Time> deadline = CallDeadline(call, options_, start);
    if (!deadline.ok()) return deadline.status();
    grad::v1::ComputeGradientsRequest wire_request;
    gradwire::EncodeGradientRequest(request, &wire_request);
    wire_request.set_request_id(call.request_id.empty() ? RandomRequestId() : call.request_id);
    wire_request.set_skip_output(call.skip_output);

    grad::v1::ComputeGradientsResponse response;
    GradientReply reply;
    absl::Status status = CallWithRetry(
        *deadline,
        [&](grpc::ClientContext* context) {
          response.Clear();
          return stub_->ComputeGradients(context, wire_request, &response);
        },
        &reply.call.attempts);
    if (!status.ok()) return status;
    absl::StatusOr<gradengine::GradientResult> result = gradwire::DecodeGradientResult(response);
    if (!result.ok()) return MalformedResponse(target_, "ComputeGradients", result.status());
    reply.result = *std::move(result);
    reply.call.request_id = response.request_id();
    reply.call.timing = FromWire(response.timing());
    reply.call.round_trip = absl::Now() - start;
    return reply;
  }

  absl::StatusOr<ServerInfo> GetInfo(const CallOptions& call) {
    absl::StatusOr<absl::Time> deadline = CallDeadline(call, options_, absl::Now());
    if (!deadline.ok()) return deadline.status();
    const grad::v1::GetInfoRequest request;
    grad::v1::GetInfoResponse response;
    int attempts = 0;
    absl::Status status = CallWithRetry(
        *deadline,
        [&](grpc::ClientContext* context) {
          response.Clear();
          return stub_->GetInfo(context, request, &response);
        },
        &attempts);
    if (!status.ok()) return status;

    ServerInfo info;
    info.server_version = response.server_version();
    info.onednn_version = response.onednn_version();
    info.cpu_isa = response.cpu_isa();
    info.threads_per_request = response.threads_per_request();
    info.max_message_bytes = response.limits().max_message_bytes();
    info.max_elements = response.limits().max_elements();
    info.max_workspace_bytes = response.limits().max_workspace_bytes();
    info.max_concurrent_requests = response.limits().max_concurrent_requests();
    info.max_queued_requests = response.limits().max_queued_requests();
    info.layers.assign(response.layers().begin(), response.layers().end());
    info.activations.assign(response.activations().begin(), response.activations().end());
    info.objectives.assign(response.objectives().begin(), response.objectives().end());
    for (int dtype : response.dtypes()) {
      info.dtypes.push_back(grad::v1::DataType_IsValid(dtype)
                                ? grad::v1::DataType_Name(static_cast<grad::v1::DataType>(dtype))
                                : absl::StrCat("DATA_TYPE_", dtype));
    }
    info.requests_total = response.requests_total();
    info.requests_failed = response.requests_failed();
    info.uptime = absl::Nanoseconds(response.uptime_ns());
    return info;
  }

  absl::StatusOr<ServingStatus> Health(const std::string& service, const CallOptions& call) {
    absl::StatusOr<absl::Time> deadline = CallDeadline(call, options_, absl::Now());
    if (!deadline.ok()) return deadline.status();
    const std::string request_bytes = EncodeHealthCheckRequest(service);
    grpc::ByteBuffer response;
    int attempts = 0;
    absl::Status status = CallWithRetry(
        *deadline,
        [&](grpc::ClientContext* context) {
          grpc::Slice slice(request_bytes);
          const grpc::ByteBuffer request(&slice, 1);
          response.Clear();
          grpc::Status result;
          absl::Notification done;
          generic_stub_.UnaryCall(context, kHealthCheckMethod, grpc::StubOptions(), &request,
                                  &response, [&](grpc::Status call_status) {
                                    result = std::move(call_status);
                                    done.Notify();
                                  });
          done.WaitForNotification();
          return result;
        },
        &attempts);
    if (!status.ok()) return status;
    absl::StatusOr<ServingStatus> serving = DecodeHealthCheckResponse(FlattenByteBuffer(response));
    if (!serving.ok()) return MalformedResponse(target_, "Health/Check", serving.status());
    return serving;
  }

 private:
  // Runs `attempt` with a fresh context carrying `deadline` until it succeeds, fails with a
  // code other than Unavailable, or the retry budget (attempts, deadline) is spent; returns
  // the last status. Each attempt must be safe to repeat: every RPC here is idempotent.
  absl::Status CallWithRetry(absl::Time deadline,
                             const std::function<grpc::Status(grpc::ClientContext*)>& attempt,
                             int* attempts) const {
    const RetryOptions& retry = options_.retry;
    std::optional<absl::BitGen> jitter_source;  // seeded on the first retry only
    absl::Duration backoff = retry.initial_backoff;
    for (int n = 1;; ++n) {
      grpc::ClientContext context;
      if (deadline != absl::InfiniteFuture()) context.set_deadline(absl::ToChronoTime(deadline));
      *attempts = n;
      absl::Status status = FromGrpcStatus(attempt(&context));
      if (status.ok() || !absl::IsUnavailable(status) || n >= retry.max_attempts) return status;

      absl::Duration wait = backoff;
      if (retry.jitter > 0) {
        if (!jitter_source.has_value()) jitter_source.emplace();
        wait *= absl::Uniform(absl::IntervalClosed, *jitter_source, 1.0 - retry.jitter,
                              1.0 + retry.jitter);
      }
      if (absl::Now() + wait >= deadline) return status;
      absl::SleepFor(wait);
      backoff = std::min(retry.max_backoff, backoff * retry.backoff_multiplier);
    }
  }

  const std::string target_;
  const ClientOptions options_;
  const std::shared_ptr<grpc::Channel> channel_;
  const std::unique_ptr<grad::v1::GradientService::Stub> stub_;
  // grpc.health.v1 has no generated stub in the Debian packages; its two messages are
  // encoded by hand above.
  grpc::GenericStub generic_stub_;
};

absl::StatusOr<std::unique_ptr<Client>> Client::Create(const std::string& target,
                                                       const ClientOptions& options) {
  if (absl::Status status = CheckOptions(target, options); !status.ok()) return status;
  grpc::ChannelArguments arguments;
  const int max_message_bytes = options.max_message_mb * (1 << 20);
  arguments.SetMaxSendMessageSize(max_message_bytes);
  arguments.SetMaxReceiveMessageSize(max_message_bytes);
  // gRPC waits 1 s after a failed connection before it tries again, 120 s at most; calls made
  // meanwhile fail at once with Unavailable. Reconnecting on the client's own retry schedule
  // lets a retried call find a server that has just started.
  arguments.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS,
                   static_cast<int>(absl::ToInt64Milliseconds(options.retry.initial_backoff)));
  arguments.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS,
                   static_cast<int>(absl::ToInt64Milliseconds(options.retry.max_backoff)));
  std::shared_ptr<grpc::Channel> channel =
      grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), arguments);
  if (channel == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("target=", target, " gives no channel"));
  }
  return std::unique_ptr<Client>(
      new Client(std::make_unique<Impl>(target, options, std::move(channel))));
}

Client::Client(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Client::~Client() = default;

absl::StatusOr<ForwardReply> Client::Forward(const gradengine::ForwardRequest& request,
                                             const CallOptions& options) {
  return impl_->Forward(request, options);
}

absl::StatusOr<GradientReply> Client::ComputeGradients(const gradengine::GradientRequest& request,
                                                       const CallOptions& options) {
  return impl_->ComputeGradients(request, options);
}

absl::StatusOr<ServerInfo> Client::GetInfo(const CallOptions& options) {
  return impl_->GetInfo(options);
}

absl::StatusOr<ServingStatus> Client::Health(const std::string& service,
                                             const CallOptions& options) {
  return impl_->Health(service, options);
}

const std::string& Client::target() const { return impl_->target(); }

}  // namespace gradclient
