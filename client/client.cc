#include "gradclient/client.h"

#include <arpa/inet.h>
#include <netinet/in.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/random/random.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "client/grpc_status.h"
#include "client/sharding.h"
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
#include "grpcpp/support/proto_buffer_reader.h"
#include "grpcpp/support/slice.h"
#include "proto/framing.h"
#include "proto/wire.h"

namespace gradclient {
namespace {

constexpr char kHealthCheckMethod[] = "/grpc.health.v1.Health/Check";
constexpr char kForwardMethod[] = "/grad.v1.GradientService/Forward";
constexpr char kComputeGradientsMethod[] = "/grad.v1.GradientService/ComputeGradients";
// Keepalive while calls are in flight (Client::Create).
constexpr int kKeepaliveTimeMs = 20000;
constexpr int kKeepaliveTimeoutMs = 10000;
// The client lays out results by the network's shapes; the server enforces the real limits.
constexpr int64_t kNoElementLimit = std::numeric_limits<int64_t>::max();

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

// The contents of `path`, named `option` in errors.
absl::StatusOr<std::string> ReadCredentialFile(absl::string_view option, const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) {
    return absl::InvalidArgumentError(
        absl::StrCat(option, "=", path, " cannot be read: ", std::strerror(errno)));
  }
  std::ostringstream contents;
  contents << file.rdbuf();
  if (file.bad()) {
    return absl::InvalidArgumentError(absl::StrCat(option, "=", path, " cannot be read"));
  }
  return contents.str();
}

// The channel's credentials from options.tls, after checking options.tls and auth_token.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ChannelCredentials(
    const ClientOptions& options) {
  // The token travels as a metadata value, which must be printable ASCII; it is never echoed.
  for (const char c : options.auth_token) {
    if (c <= 0x20 || c >= 0x7f) {
      return absl::InvalidArgumentError(
          "auth_token may hold only printable ASCII characters other than space");
    }
  }
  const TlsOptions& tls = options.tls;
  if (!tls.enabled) {
    for (const auto& [name, value] :
         {std::pair<const char*, const std::string&>{"tls.root_ca_file", tls.root_ca_file},
          {"tls.cert_file", tls.cert_file},
          {"tls.key_file", tls.key_file},
          {"tls.server_name_override", tls.server_name_override}}) {
      if (!value.empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat(name, "=", value, " is set but tls.enabled is false"));
      }
    }
    return grpc::InsecureChannelCredentials();
  }
  if (tls.cert_file.empty() != tls.key_file.empty()) {
    return absl::InvalidArgumentError(
        tls.cert_file.empty()
            ? absl::StrCat("tls.key_file=", tls.key_file, " is set but tls.cert_file is not")
            : absl::StrCat("tls.cert_file=", tls.cert_file, " is set but tls.key_file is not"));
  }
  grpc::SslCredentialsOptions ssl;
  for (const auto& [name, path, pem] :
       {std::tuple<const char*, const std::string&, std::string*>{
            "tls.root_ca_file", tls.root_ca_file, &ssl.pem_root_certs},
        {"tls.cert_file", tls.cert_file, &ssl.pem_cert_chain},
        {"tls.key_file", tls.key_file, &ssl.pem_private_key}}) {
    if (path.empty()) continue;
    absl::StatusOr<std::string> contents = ReadCredentialFile(name, path);
    if (!contents.ok()) return contents.status();
    *pem = *std::move(contents);
  }
  return grpc::SslCredentials(ssl);
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

// True for "A.B.C.D:PORT" (ipv6 = false) or "[V6]:PORT" (ipv6 = true).
bool IsIpAddressWithPort(absl::string_view address, bool ipv6) {
  const size_t colon = address.rfind(':');
  if (colon == absl::string_view::npos) return false;
  int port = 0;
  if (!absl::SimpleAtoi(address.substr(colon + 1), &port) || port < 0 || port > 65535) {
    return false;
  }
  absl::string_view host = address.substr(0, colon);
  if (ipv6) {
    if (host.size() < 2 || host.front() != '[' || host.back() != ']') return false;
    host = host.substr(1, host.size() - 2);
  }
  unsigned char buffer[sizeof(in6_addr)];
  return inet_pton(ipv6 ? AF_INET6 : AF_INET, std::string(host).c_str(), buffer) == 1;
}

// The gRPC channel target for `target`. gRPC's own syntax passes through unchanged; a bare
// comma-separated list of IP addresses ("127.0.0.1:5001,127.0.0.1:5002") becomes the ipv4: or
// ipv6: target that lists them.
absl::StatusOr<std::string> ChannelTarget(const std::string& target) {
  if (target.find(',') == std::string::npos || absl::StartsWith(target, "ipv4:") ||
      absl::StartsWith(target, "ipv6:")) {
    return target;
  }
  const std::vector<absl::string_view> addresses = absl::StrSplit(target, ',');
  for (const bool ipv6 : {false, true}) {
    if (std::all_of(addresses.begin(), addresses.end(), [ipv6](absl::string_view address) {
          return IsIpAddressWithPort(address, ipv6);
        })) {
      return absl::StrCat(ipv6 ? "ipv6:" : "ipv4:", target);
    }
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "target=", target,
      " lists several addresses, which must all be IP addresses with ports (A.B.C.D:PORT or "
      "[V6]:PORT); for host names use dns:///NAME:PORT with a name that resolves to every "
      "server"));
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

// The regions one call may use, held for its duration; resolves the references in its reply.
class CallRegions final : public gradwire::SharedMemoryResolver {
 public:
  explicit CallRegions(std::vector<std::shared_ptr<SharedMemoryRegion>> regions)
      : regions_(std::move(regions)) {}

  // The reference for `bytes` at `data` if they lie inside one of the regions.
  std::optional<grad::v1::SharedMemoryRef> RefFor(const void* data, size_t bytes) const {
    if (bytes == 0) return std::nullopt;
    for (const auto& region : regions_) {
      if (std::optional<int64_t> offset = region->OffsetOf(data, bytes)) {
        grad::v1::SharedMemoryRef ref;
        ref.set_region(region->name());
        ref.set_offset(*offset);
        ref.set_byte_size(static_cast<int64_t>(bytes));
        return ref;
      }
    }
    return std::nullopt;
  }

  absl::StatusOr<gradwire::SharedMemorySpan> Resolve(const grad::v1::SharedMemoryRef& ref,
                                                     absl::string_view field) override {
    for (const auto& region : regions_) {
      if (region->name() != ref.region()) continue;
      const int64_t size = static_cast<int64_t>(region->byte_size());
      if (ref.offset() < 0 || ref.byte_size() < 0 || ref.offset() > size ||
          ref.byte_size() > size - ref.offset() || ref.offset() % alignof(float) != 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            field, " (offset ", ref.offset(), ", byte_size ", ref.byte_size(),
            ") does not lie inside region \"", region->name(), "\" of ", size, " bytes"));
      }
      gradwire::SharedMemorySpan span;
      span.data = reinterpret_cast<float*>(region->data() + ref.offset());
      span.owner = region;
      return span;
    }
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".region names a region this client did not give the call"));
  }

 private:
  const std::vector<std::shared_ptr<SharedMemoryRegion>> regions_;
};

// Points every skeleton tensor whose bytes lie in one of `regions` at its place there.
void UseSharedMemory(const CallRegions& regions, const gradengine::TensorView& view,
                     grad::v1::Tensor* header) {
  if (std::optional<grad::v1::SharedMemoryRef> ref =
          regions.RefFor(view.data, static_cast<size_t>(view.size) * sizeof(float))) {
    *header->mutable_shared_memory() = *std::move(ref);
  }
}

template <typename WireRequest, typename EngineRequest>
void UseSharedMemoryForInputs(const CallRegions& regions, const EngineRequest& request,
                              WireRequest* skeleton) {
  auto view = request.parameters.begin();
  for (grad::v1::NamedTensor& named : *skeleton->mutable_parameters()) {
    UseSharedMemory(regions, view->second, named.mutable_tensor());
    ++view;
  }
  UseSharedMemory(regions, request.input, skeleton->mutable_input());
}

// One result to place: its shape and the reference that names its place.
struct PlacedResult {
  std::vector<int64_t> shape;
  grad::v1::SharedMemoryRef* ref;
};

// Lays `results` out in `region`, one after the other, each at an alignment boundary: from
// `offset` if given, else in space allocated from the region for them (so that neither later
// allocations nor concurrent calls reuse it).
absl::Status LayOutResults(SharedMemoryRegion& region, std::optional<int64_t> offset,
                           const std::vector<PlacedResult>& results) {
  constexpr int64_t kAlign = SharedMemoryRegion::kAlignment;
  const int64_t size = static_cast<int64_t>(region.byte_size());
  auto aligned = [](int64_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; };
  // Every sum and product stays at most `size`, so nothing below can overflow.
  auto no_room = [&](int64_t needed_at_least) {
    return absl::ResourceExhaustedError(
        absl::StrCat("result_region \"", region.name(), "\" (", size,
                     " bytes) has no room for the results (at least ", needed_at_least, " bytes)"));
  };
  int64_t total = 0;
  for (const PlacedResult& result : results) {
    int64_t bytes = sizeof(float);
    for (int64_t d : result.shape) {
      if (d < 0 || (d > 0 && bytes > size / d)) return no_room(size + 1);
      bytes *= d;
    }
    result.ref->set_byte_size(bytes);
    if (aligned(bytes) > size - total) return no_room(total + bytes);
    total += aligned(bytes);
  }
  int64_t next = 0;
  if (offset.has_value()) {
    if (*offset > size) return no_room(total);
    next = aligned(*offset);
    if (next > size || total > size - next) {
      return absl::ResourceExhaustedError(
          absl::StrCat("result_region \"", region.name(), "\" (", size, " bytes) has no room for ",
                       total, " bytes of results at result_offset ", *offset));
    }
  } else {
    absl::StatusOr<absl::Span<float>> space =
        region.Allocate(static_cast<size_t>(total) / sizeof(float));
    if (!space.ok()) {
      return absl::Status(space.status().code(),
                          absl::StrCat("result_region: ", space.status().message()));
    }
    next = region.OffsetOf(space->data(), 0).value_or(0);
  }
  for (const PlacedResult& result : results) {
    result.ref->set_region(region.name());
    result.ref->set_offset(next);
    next += aligned(result.ref->byte_size());
  }
  return absl::OkStatus();
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
        generic_stub_(channel_),
        registration_(std::make_shared<SharedMemoryRegion::Registration>()) {
    absl::MutexLock lock(&registration_->mu);
    registration_->forget = [this](SharedMemoryRegion* region) { ForgetSharedMemory(region); };
  }

  // Regions still alive no longer have a client to unregister from; one that is unregistering
  // right now finishes first.
  ~Impl() {
    absl::MutexLock lock(&registration_->mu);
    registration_->forget = nullptr;
  }

  const std::string& target() const { return target_; }

  absl::StatusOr<ForwardReply> Forward(const gradengine::ForwardRequest& request,
                                       const CallOptions& call) {
    return Sharded<ForwardReply>(
        request, call,
        [this](const gradengine::ForwardRequest& part, const CallOptions& part_call,
               absl::Time deadline,
               absl::Time start) { return ForwardOnce(part, part_call, deadline, start); },
        [](absl::Span<const BatchSlice> slices, std::vector<gradengine::ForwardResult> parts) {
          return CombineForwardResults(slices, std::move(parts));
        });
  }

  absl::StatusOr<GradientReply> ComputeGradients(const gradengine::GradientRequest& request,
                                                 const CallOptions& call) {
    return Sharded<GradientReply>(
        request, call,
        [this](const gradengine::GradientRequest& part, const CallOptions& part_call,
               absl::Time deadline,
               absl::Time start) { return ComputeGradientsOnce(part, part_call, deadline, start); },
        [&request](absl::Span<const BatchSlice> slices,
                   std::vector<gradengine::GradientResult> parts) {
          return CombineGradientResults(request.objective, slices, std::move(parts));
        });
  }

  absl::StatusOr<ServerInfo> GetInfo(const CallOptions& call) {
    absl::StatusOr<absl::Time> deadline = CallDeadline(call, options_, absl::Now());
    if (!deadline.ok()) return deadline.status();
    const grad::v1::GetInfoRequest request;
    grad::v1::GetInfoResponse response;
    absl::Status status = CallStub(*deadline, [&](grpc::ClientContext* context) {
      response.Clear();
      return stub_->GetInfo(context, request, &response);
    });
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
    info.max_layers = response.limits().max_layers();
    info.max_parameters = response.limits().max_parameters();
    info.max_name_bytes = response.limits().max_name_bytes();
    info.max_network_bytes = response.limits().max_network_bytes();
    info.response_drain_timeout = absl::Nanoseconds(response.limits().response_drain_timeout_ns());
    const grad::v1::MemoryStatus& memory = response.memory();
    info.memory_limit_bytes = memory.limit_bytes();
    info.memory_reserved_bytes = memory.reserved_bytes();
    info.memory_cached_bytes = memory.cached_bytes();
    info.memory_peak_bytes = memory.peak_bytes();
    info.plan_cache_bytes = memory.plan_cache_bytes();
    info.max_plan_cache_bytes = memory.max_plan_cache_bytes();
    info.memory_reservations_refused = memory.reservations_refused();
    info.responses_cancelled_undrained = memory.responses_cancelled_undrained();
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
    info.requests_unauthenticated = response.requests_unauthenticated();
    info.tls = response.security().tls();
    info.client_certificates_required = response.security().client_certificates_required();
    info.bearer_token_required = response.security().bearer_token_required();
    info.shared_memory_allowed = response.shared_memory().allowed();
    info.max_shared_memory_regions = response.shared_memory().max_regions();
    info.max_shared_memory_bytes = response.shared_memory().max_mapped_bytes();
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
        &attempts, /*send_token=*/false);
    if (!status.ok()) return status;
    absl::StatusOr<ServingStatus> serving = DecodeHealthCheckResponse(FlattenByteBuffer(response));
    if (!serving.ok()) return MalformedResponse(target_, "Health/Check", serving.status());
    return serving;
  }

 private:
  // One call for the whole of `request`, with the request id already chosen.
  absl::StatusOr<ForwardReply> ForwardOnce(const gradengine::ForwardRequest& request,
                                           const CallOptions& call, absl::Time deadline,
                                           absl::Time start) {
    grad::v1::ForwardRequest skeleton;
    gradwire::EncodeForwardRequest(request, &skeleton, /*tensor_data=*/false);
    skeleton.set_request_id(call.request_id);
    CallRegions regions(RegionsFor());
    UseSharedMemoryForInputs(regions, request, &skeleton);
    if (call.result_region != nullptr) {
      absl::StatusOr<gradengine::ValidatedNetwork> shapes =
          gradengine::ValidateNetwork(request.network, request.input.shape, kNoElementLimit);
      if (!shapes.ok()) return shapes.status();
      if (absl::Status s = LayOutResults(
              *call.result_region, call.result_offset,
              {{shapes->output_shapes.back(), skeleton.mutable_placement()->mutable_output()}});
          !s.ok()) {
        return s;
      }
    }
    ForwardReply reply;
    grad::v1::ForwardResponse response;
    absl::Status status = SendFramed(
        kForwardMethod, deadline,
        [&](const std::shared_ptr<const void>& owner) {
          return gradwire::FrameForwardRequest(skeleton, request, owner);
        },
        &response, &reply.call.attempts);
    if (!status.ok()) return status;
    absl::StatusOr<gradengine::ForwardResult> result =
        gradwire::TakeForwardResult(&response, &regions);
    if (!result.ok()) return MalformedResponse(target_, "Forward", result.status());
    reply.result = *std::move(result);
    reply.call.request_id = response.request_id();
    reply.call.timing = FromWire(response.timing());
    reply.call.round_trip = absl::Now() - start;
    return reply;
  }

  absl::StatusOr<GradientReply> ComputeGradientsOnce(const gradengine::GradientRequest& request,
                                                     const CallOptions& call, absl::Time deadline,
                                                     absl::Time start) {
    grad::v1::ComputeGradientsRequest skeleton;
    gradwire::EncodeGradientRequest(request, &skeleton, /*tensor_data=*/false);
    skeleton.set_request_id(call.request_id);
    skeleton.set_skip_output(call.skip_output);
    CallRegions regions(RegionsFor());
    UseSharedMemoryForInputs(regions, request, &skeleton);
    switch (request.objective.kind) {
      case gradengine::ObjectiveKind::kMse:
        UseSharedMemory(regions, request.objective.tensor,
                        skeleton.mutable_objective()->mutable_mse_target());
        break;
      case gradengine::ObjectiveKind::kGradOutput:
        UseSharedMemory(regions, request.objective.tensor,
                        skeleton.mutable_objective()->mutable_grad_output());
        break;
      case gradengine::ObjectiveKind::kSum:
        break;
      case gradengine::ObjectiveKind::kCrossEntropy:
        break;  // class indices go as bytes: a region holds floats
    }
    if (call.result_region != nullptr) {
      if (absl::Status s = PlaceGradientResults(request, call, skeleton.mutable_placement());
          !s.ok()) {
        return s;
      }
    }
    GradientReply reply;
    grad::v1::ComputeGradientsResponse response;
    absl::Status status = SendFramed(
        kComputeGradientsMethod, deadline,
        [&](const std::shared_ptr<const void>& owner) {
          return gradwire::FrameGradientRequest(skeleton, request, owner);
        },
        &response, &reply.call.attempts);
    if (!status.ok()) return status;
    absl::StatusOr<gradengine::GradientResult> result =
        gradwire::TakeGradientResult(&response, &regions);
    if (!result.ok()) return MalformedResponse(target_, "ComputeGradients", result.status());
    reply.result = *std::move(result);
    reply.call.request_id = response.request_id();
    reply.call.timing = FromWire(response.timing());
    reply.call.round_trip = absl::Now() - start;
    return reply;
  }

  // The registered regions a call may use: every one still alive (the result region, which
  // CheckResultRegion made sure is registered, among them).
  std::vector<std::shared_ptr<SharedMemoryRegion>> RegionsFor() {
    std::vector<std::shared_ptr<SharedMemoryRegion>> regions;
    absl::MutexLock lock(&regions_mu_);
    for (const auto& [name, entry] : regions_) {
      if (std::shared_ptr<SharedMemoryRegion> region = entry.region.lock()) {
        regions.push_back(std::move(region));
      }
    }
    return regions;
  }

  absl::Status CheckResultRegion(const CallOptions& call) {
    if (call.result_region == nullptr) return absl::OkStatus();
    if (call.shards > 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("result_region is set with shards=", call.shards,
                       "; results can be placed in shared memory only by unsharded calls"));
    }
    if (call.result_offset.has_value() && *call.result_offset < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("result_offset=", *call.result_offset, " must be >= 0"));
    }
    absl::MutexLock lock(&regions_mu_);
    const auto it = regions_.find(call.result_region->name());
    if (it == regions_.end() || it->second.pointer != call.result_region.get()) {
      return absl::FailedPreconditionError(
          absl::StrCat("result_region \"", call.result_region->name(),
                       "\" is not registered with this client; call RegisterSharedMemory first"));
    }
    return absl::OkStatus();
  }

  // The output, input gradient and parameter gradients the request asks for, laid out in
  // call.result_region.
  static absl::Status PlaceGradientResults(const gradengine::GradientRequest& request,
                                           const CallOptions& call,
                                           grad::v1::ResultPlacement* placement) {
    absl::StatusOr<gradengine::ValidatedNetwork> shapes =
        gradengine::ValidateNetwork(request.network, request.input.shape, kNoElementLimit);
    if (!shapes.ok()) return shapes.status();
    std::vector<PlacedResult> results;
    if (!call.skip_output) {
      results.push_back({shapes->output_shapes.back(), placement->mutable_output()});
    }
    if (request.gradients.input) {
      results.push_back({request.input.shape, placement->mutable_input_grad()});
    }
    std::vector<std::pair<std::string, std::vector<int64_t>>> wanted;
    for (const gradengine::ParameterInfo& parameter : shapes->parameters) {
      // Buffers (running statistics) have no gradient, and their updates come back as bytes.
      if (parameter.trainable && request.gradients.WantsParameter(parameter.name)) {
        wanted.emplace_back(parameter.name, parameter.shape);
      }
    }
    std::sort(wanted.begin(), wanted.end());
    placement->mutable_parameter_grads()->Reserve(static_cast<int>(wanted.size()));
    for (const auto& [name, shape] : wanted) {
      grad::v1::NamedSharedMemoryRef* named = placement->add_parameter_grads();
      named->set_name(name);
      results.push_back({shape, named->mutable_ref()});
    }
    return LayOutResults(*call.result_region, call.result_offset, results);
  }

 public:
  absl::Status RegisterSharedMemory(const std::shared_ptr<SharedMemoryRegion>& region,
                                    const CallOptions& call) {
    if (region == nullptr) return absl::InvalidArgumentError("region is null");
    absl::StatusOr<absl::Time> deadline = CallDeadline(call, options_, absl::Now());
    if (!deadline.ok()) return deadline.status();
    {
      absl::MutexLock lock(&region->mu_);
      if (region->registration_ != nullptr) {
        return absl::FailedPreconditionError(
            absl::StrCat("region \"", region->name(), "\" is registered with a client already"));
      }
    }
    {
      absl::MutexLock lock(&regions_mu_);
      if (regions_.count(region->name()) > 0) {
        return absl::AlreadyExistsError(absl::StrCat("a region named \"", region->name(),
                                                     "\" is already registered with this client"));
      }
    }
    grad::v1::RegisterSharedMemoryRequest request;
    request.set_name(region->name());
    request.set_key(region->key());
    request.set_offset(0);
    request.set_byte_size(static_cast<int64_t>(region->byte_size()));
    request.set_proof(region->WriteProof());
    grad::v1::RegisterSharedMemoryResponse response;
    absl::Status status = CallStub(*deadline, [&](grpc::ClientContext* context) {
      return stub_->RegisterSharedMemory(context, request, &response);
    });
    if (!status.ok()) return status;
    absl::MutexLock lock(&regions_mu_);
    regions_[region->name()] = RegionEntry{region, region.get()};
    absl::MutexLock region_lock(&region->mu_);
    region->registration_ = registration_;
    return absl::OkStatus();
  }

  absl::StatusOr<int> UnregisterSharedMemory(const std::string& name, const CallOptions& call) {
    absl::StatusOr<absl::Time> deadline = CallDeadline(call, options_, absl::Now());
    if (!deadline.ok()) return deadline.status();
    grad::v1::UnregisterSharedMemoryRequest request;
    request.set_name(name);
    grad::v1::UnregisterSharedMemoryResponse response;
    absl::Status status = CallStub(*deadline, [&](grpc::ClientContext* context) {
      return stub_->UnregisterSharedMemory(context, request, &response);
    });
    {
      absl::MutexLock lock(&regions_mu_);
      for (auto it = regions_.begin(); it != regions_.end();) {
        if (name.empty() || it->first == name) {
          if (std::shared_ptr<SharedMemoryRegion> region = it->second.region.lock()) {
            absl::MutexLock region_lock(&region->mu_);
            region->registration_ = nullptr;
          }
          it = regions_.erase(it);
        } else {
          ++it;
        }
      }
    }
    if (!status.ok()) return status;
    return response.unregistered();
  }

  absl::StatusOr<std::vector<SharedMemoryStatus>> GetSharedMemoryStatus(const std::string& name,
                                                                        const CallOptions& call) {
    absl::StatusOr<absl::Time> deadline = CallDeadline(call, options_, absl::Now());
    if (!deadline.ok()) return deadline.status();
    grad::v1::GetSharedMemoryStatusRequest request;
    request.set_name(name);
    grad::v1::GetSharedMemoryStatusResponse response;
    absl::Status status = CallStub(*deadline, [&](grpc::ClientContext* context) {
      return stub_->GetSharedMemoryStatus(context, request, &response);
    });
    if (!status.ok()) return status;
    std::vector<SharedMemoryStatus> regions;
    for (const grad::v1::SharedMemoryRegionStatus& region : response.regions()) {
      regions.push_back(
          {region.name(), region.offset(), region.byte_size(), region.calls_in_progress()});
    }
    return regions;
  }

  // From a registered region's destructor: forget it, and unregister it from the server (best
  // effort).
  void ForgetSharedMemory(SharedMemoryRegion* region) {
    {
      absl::MutexLock lock(&regions_mu_);
      const auto it = regions_.find(region->name());
      if (it == regions_.end() || it->second.pointer != region) return;
      regions_.erase(it);
    }
    // Straight to the server: UnregisterSharedMemory would also forget a newer region
    // registered under the same name meanwhile. Best effort: a server that is gone has
    // unmapped it already.
    grad::v1::UnregisterSharedMemoryRequest request;
    request.set_name(region->name());
    grad::v1::UnregisterSharedMemoryResponse response;
    CallStub(absl::Now() + absl::Seconds(2), [&](grpc::ClientContext* context) {
      return stub_->UnregisterSharedMemory(context, request, &response);
    }).IgnoreError();
  }

 private:
  // Sends the request `frame(owner)` builds (once: every retry sends the same bytes) to
  // `method` and parses the reply into `response`. The frame refers to the caller's tensor
  // memory, which must stay untouched until gRPC has released every slice of it; `owner` goes
  // with those slices, and this waits for its last reference before it returns, so the
  // caller's memory is free again even when the call ended (deadline, cancellation) while gRPC
  // was still writing. Such a wait ends when the bytes are written or the connection closes; a
  // server that stopped reading is found by keepalive (Client::Create) within about 30 s.
  template <typename Response>
  absl::Status SendFramed(
      const char* method, absl::Time deadline,
      const std::function<gradwire::Frame(const std::shared_ptr<const void>&)>& frame,
      Response* response, int* attempts) {
    absl::Notification released;
    std::shared_ptr<const void> owner(&released, [](const void* notification) {
      static_cast<absl::Notification*>(const_cast<void*>(notification))->Notify();
    });
    absl::Status status;
    {
      grpc::ByteBuffer request_buffer = frame(owner).ToByteBuffer();
      owner.reset();
      grpc::ByteBuffer response_buffer;
      status = CallWithRetry(
          deadline,
          [&](grpc::ClientContext* context) {
            response_buffer.Clear();
            // The calling thread drives the call's own completion queue, as gRPC's blocking
            // stubs do: no hop to a callback thread and back.
            grpc::CompletionQueue queue;
            std::unique_ptr<grpc::GenericClientAsyncResponseReader> call =
                generic_stub_.PrepareUnaryCall(context, method, request_buffer, &queue);
            call->StartCall();
            grpc::Status result;
            call->Finish(&response_buffer, &result, &queue);
            void* tag = nullptr;
            bool ok = false;
            if (!queue.Next(&tag, &ok) || !ok) {
              result = grpc::Status(grpc::StatusCode::INTERNAL, "the call's completion failed");
            }
            queue.Shutdown();
            while (queue.Next(&tag, &ok)) {
            }
            return result;
          },
          attempts);
      if (status.ok()) {
        grpc::ProtoBufferReader reader(&response_buffer);
        if (!response->ParseFromZeroCopyStream(&reader)) {
          status = absl::InternalError(absl::StrCat("malformed ", method, " response from ",
                                                    target_, ": ", response_buffer.Length(),
                                                    " bytes are not a ", response->GetTypeName()));
        }
      }
    }
    released.WaitForNotification();
    return status;
  }

  // A Forward or ComputeGradients call: `once(request, call, deadline, start)` for the whole
  // batch, or with call.shards > 1 for each part of it at once (parts 1.. on threads of their
  // own, part 0 on the caller's), whose results `combine(slices, results)` joins.
  template <typename Reply, typename Request, typename Once, typename Combine>
  absl::StatusOr<Reply> Sharded(const Request& request, const CallOptions& call, Once once,
                                Combine combine) {
    const absl::Time start = absl::Now();
    absl::StatusOr<absl::Time> deadline = CallDeadline(call, options_, start);
    if (!deadline.ok()) return deadline.status();
    if (call.shards < 1 || call.shards > kMaxShards) {
      return absl::InvalidArgumentError(
          absl::StrCat("shards=", call.shards, " is out of range 1..", kMaxShards));
    }
    if (absl::Status s = CheckResultRegion(call); !s.ok()) return s;
    if (absl::Status s = CheckRowsIndependent(request.network, call.shards); !s.ok()) return s;
    CallOptions part_call = call;
    if (part_call.request_id.empty()) part_call.request_id = RandomRequestId();
    const int64_t batch = call.shards > 1 ? ShardableBatch(request) : 0;
    if (batch < 2) return once(request, part_call, *deadline, start);

    const std::vector<BatchSlice> slices = SplitBatch(batch, call.shards);
    std::vector<absl::StatusOr<Reply>> replies(slices.size(), absl::UnknownError("part not run"));
    auto run_part = [&](size_t i) {
      replies[i] = once(SliceRequest(request, slices[i]), part_call, *deadline, start);
    };
    std::vector<std::thread> threads;
    threads.reserve(slices.size() - 1);
    for (size_t i = 1; i < slices.size(); ++i) threads.emplace_back(run_part, i);
    run_part(0);
    for (std::thread& thread : threads) thread.join();

    Reply whole;
    std::vector<decltype(whole.result)> results;
    results.reserve(slices.size());
    for (size_t i = 0; i < slices.size(); ++i) {
      if (!replies[i].ok()) {
        const absl::Status& status = replies[i].status();
        return absl::Status(
            status.code(),
            absl::StrCat("shard ", i + 1, " of ", slices.size(), " (batch rows ", slices[i].begin,
                         "..", slices[i].end - 1, "): ", status.message()));
      }
      const CallInfo& part = replies[i]->call;
      whole.call.attempts = std::max(whole.call.attempts, part.attempts);
      ServerTiming& timing = whole.call.timing;
      timing.decode = std::max(timing.decode, part.timing.decode);
      timing.queue = std::max(timing.queue, part.timing.queue);
      timing.forward = std::max(timing.forward, part.timing.forward);
      timing.backward = std::max(timing.backward, part.timing.backward);
      timing.encode = std::max(timing.encode, part.timing.encode);
      results.push_back(std::move(replies[i]->result));
    }
    whole.call.request_id = replies.front()->call.request_id;
    whole.result = combine(slices, std::move(results));
    whole.call.round_trip = absl::Now() - start;
    return whole;
  }

  // A small unary call of the generated stub, `rpc(context)`, retried as CallWithRetry does.
  absl::Status CallStub(absl::Time deadline,
                        const std::function<grpc::Status(grpc::ClientContext*)>& rpc) const {
    int attempts = 0;
    return CallWithRetry(deadline, rpc, &attempts);
  }

  // Runs `attempt` with a fresh context carrying `deadline` until it succeeds, fails with a
  // code other than Unavailable, or the retry budget (attempts, deadline) is spent; returns
  // the last status. Each attempt must be safe to repeat: every RPC here is idempotent.
  // The bearer token goes with every call but health checks, which never need it (and may go
  // to a plaintext health port).
  absl::Status CallWithRetry(absl::Time deadline,
                             const std::function<grpc::Status(grpc::ClientContext*)>& attempt,
                             int* attempts, bool send_token = true) const {
    const RetryOptions& retry = options_.retry;
    std::optional<absl::BitGen> jitter_source;  // seeded on the first retry only
    absl::Duration backoff = retry.initial_backoff;
    for (int n = 1;; ++n) {
      grpc::ClientContext context;
      if (deadline != absl::InfiniteFuture()) context.set_deadline(absl::ToChronoTime(deadline));
      if (send_token && !options_.auth_token.empty()) {
        context.AddMetadata("authorization", absl::StrCat("Bearer ", options_.auth_token));
      }
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

  struct RegionEntry {
    std::weak_ptr<SharedMemoryRegion> region;
    const SharedMemoryRegion* pointer = nullptr;  // identifies the entry once `region` expired
  };
  // Lock order: a Registration's mu, then regions_mu_, then a region's mu_.
  absl::Mutex regions_mu_;
  std::map<std::string, RegionEntry> regions_ ABSL_GUARDED_BY(regions_mu_);
  const std::shared_ptr<SharedMemoryRegion::Registration> registration_;
};

absl::StatusOr<std::unique_ptr<Client>> Client::Create(const std::string& target,
                                                       const ClientOptions& options) {
  if (absl::Status status = CheckOptions(target, options); !status.ok()) return status;
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> credentials =
      ChannelCredentials(options);
  if (!credentials.ok()) return credentials.status();
  grpc::ChannelArguments arguments;
  if (!options.tls.server_name_override.empty()) {
    arguments.SetSslTargetNameOverride(options.tls.server_name_override);
  }
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
  // Keepalive pings while calls are in flight: a server that stopped answering (stopped, wedged,
  // unplugged) gets its connection closed within about kKeepaliveTime + kKeepaliveTimeout,
  // which also frees what gRPC still holds of a request the caller's memory backs (see
  // SendFramed). gradserver accepts pings this often (server/server.cc).
  arguments.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, kKeepaliveTimeMs);
  arguments.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, kKeepaliveTimeoutMs);
  // Every address the target resolves to gets a connection and calls take turns over the
  // ready ones, so one client spreads its load over all replicas behind a name or list.
  arguments.SetServiceConfigJSON(R"({"loadBalancingConfig": [{"round_robin": {}}]})");
  absl::StatusOr<std::string> channel_target = ChannelTarget(target);
  if (!channel_target.ok()) return channel_target.status();
  std::shared_ptr<grpc::Channel> channel =
      grpc::CreateCustomChannel(*channel_target, *credentials, arguments);
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

absl::Status Client::RegisterSharedMemory(const std::shared_ptr<SharedMemoryRegion>& region,
                                          const CallOptions& options) {
  return impl_->RegisterSharedMemory(region, options);
}

absl::StatusOr<int> Client::UnregisterSharedMemory(const std::string& name,
                                                   const CallOptions& options) {
  return impl_->UnregisterSharedMemory(name, options);
}

absl::StatusOr<std::vector<SharedMemoryStatus>> Client::GetSharedMemoryStatus(
    const std::string& name, const CallOptions& options) {
  return impl_->GetSharedMemoryStatus(name, options);
}

const std::string& Client::target() const { return impl_->target(); }

}  // namespace gradclient
