#include "server/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/impl/server_builder_option.h>
#include <grpcpp/security/auth_metadata_processor.h>
#include <grpcpp/security/server_credentials.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "gradengine/engine.h"
#include "server/auth.h"
#include "server/compute_pool.h"
#include "server/gradient_service.h"
#include "server/memory_limit.h"
#include "server/metrics.h"
#include "server/metrics_http.h"
#include "server/server_metrics.h"
#include "server/shared_memory.h"
#include "server/status_conversion.h"

#ifndef GRADSERVER_VERSION
#error "GRADSERVER_VERSION must be defined by the build"
#endif

namespace gradserver {
namespace {

// gRPC takes message sizes as int; 2047 MiB is the largest whole number of MiB below 2^31.
constexpr int kMaxMessageMb = 2047;
// The plan cache may hold this fraction (1/n) of the memory budget.
constexpr int64_t kPlanCacheShareOfBudget = 4;

// On shutdown, how long the connections stay open after the last call was answered, for its
// client to read the response (see Impl::Shutdown).
constexpr absl::Duration kResponseLinger = absl::Milliseconds(500);
// Then how long gRPC waits for clients to close the connections before it closes them.
constexpr absl::Duration kCloseWait = absl::Seconds(1);

// gRPC takes durations as int milliseconds.
constexpr absl::Duration kMaxChannelDuration = absl::Milliseconds(INT_MAX);

// Calls to these are guarded by ReflectionTokenCheck rather than by the service's handlers.
constexpr absl::string_view kReflectionPathPrefix = "/grpc.reflection.";
// grpc::reflection::ProtoServerReflectionPlugin::name().
constexpr absl::string_view kReflectionPluginName = "proto_server_reflection";

absl::Status ValidateOptions(const ServerOptions& options) {
  if (options.address.empty()) return absl::InvalidArgumentError("address is empty");
  if (options.threads_per_request < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "threads_per_request=", options.threads_per_request, " must be >= 0 (0 = every core)"));
  }
  if (options.max_concurrent_requests < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_concurrent_requests=", options.max_concurrent_requests,
                     " must be >= 0 (0 = cores / threads_per_request)"));
  }
  if (options.max_queued_requests < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_queued_requests=", options.max_queued_requests, " must be >= 0"));
  }
  if (options.max_message_mb < 1 || options.max_message_mb > kMaxMessageMb) {
    return absl::InvalidArgumentError(absl::StrCat("max_message_mb=", options.max_message_mb,
                                                   " must be between 1 and ", kMaxMessageMb));
  }
  if (options.max_elements < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_elements=", options.max_elements, " must be positive"));
  }
  if (options.max_workspace_bytes < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_workspace_bytes=", options.max_workspace_bytes, " must be positive"));
  }
  if (options.shutdown_grace < absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "shutdown_grace=", absl::FormatDuration(options.shutdown_grace), " must be >= 0"));
  }
  if (options.max_connection_age < absl::ZeroDuration() ||
      options.max_connection_age > kMaxChannelDuration) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_connection_age=", absl::FormatDuration(options.max_connection_age),
                     " must be between 0 (never) and ", absl::FormatDuration(kMaxChannelDuration)));
  }
  if (options.max_connection_age_grace < absl::ZeroDuration() ||
      options.max_connection_age_grace > kMaxChannelDuration) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_connection_age_grace=", absl::FormatDuration(options.max_connection_age_grace),
        " must be between 0 (unlimited) and ", absl::FormatDuration(kMaxChannelDuration)));
  }
  if (options.memory_wait < absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("memory_wait=", absl::FormatDuration(options.memory_wait), " must be >= 0"));
  }
  if (options.response_drain_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "response_drain_timeout=", absl::FormatDuration(options.response_drain_timeout),
        " must be positive"));
  }
  if (!options.tls_key_file.empty() && options.tls_cert_file.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tls_key_file=", options.tls_key_file, " is set but tls_cert_file is not; TLS needs both"));
  }
  if (!options.tls_cert_file.empty() && options.tls_key_file.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tls_cert_file=", options.tls_cert_file,
                     " is set but tls_key_file is not; TLS needs both"));
  }
  if (!options.tls_client_ca_file.empty() && options.tls_cert_file.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tls_client_ca_file=", options.tls_client_ca_file,
                     " needs tls_cert_file and tls_key_file: client certificates are part of TLS"));
  }
  return absl::OkStatus();
}

// The contents of the PEM file `path`, which must hold a "-----BEGIN <what>" block.
absl::StatusOr<std::string> ReadPemFile(absl::string_view option_name, const std::string& path,
                                        absl::string_view what) {
  absl::StatusOr<std::string> contents = ReadOptionFile(option_name, path);
  if (!contents.ok()) return contents.status();
  std::string pem = *std::move(contents);
  if (!absl::StrContains(pem, "-----BEGIN ") || !absl::StrContains(pem, what)) {
    return absl::InvalidArgumentError(
        absl::StrCat(option_name, "=", path, " is not a PEM file holding a ", what));
  }
  return pem;
}

// What the security options name, read and checked before anything starts.
struct SecurityMaterial {
  std::string cert_chain;
  std::string private_key;
  std::string client_ca;
  std::shared_ptr<const BearerTokens> bearer_tokens;

  bool tls() const { return !cert_chain.empty(); }
};

absl::StatusOr<SecurityMaterial> LoadSecurityMaterial(const ServerOptions& options) {
  SecurityMaterial material;
  if (!options.tls_cert_file.empty()) {
    absl::StatusOr<std::string> cert =
        ReadPemFile("tls_cert_file", options.tls_cert_file, "CERTIFICATE");
    if (!cert.ok()) return cert.status();
    absl::StatusOr<std::string> key =
        ReadPemFile("tls_key_file", options.tls_key_file, "PRIVATE KEY");
    if (!key.ok()) return key.status();
    material.cert_chain = *std::move(cert);
    material.private_key = *std::move(key);
  }
  if (!options.tls_client_ca_file.empty()) {
    absl::StatusOr<std::string> ca =
        ReadPemFile("tls_client_ca_file", options.tls_client_ca_file, "CERTIFICATE");
    if (!ca.ok()) return ca.status();
    material.client_ca = *std::move(ca);
  }
  if (!options.auth_token_file.empty()) {
    absl::StatusOr<std::unique_ptr<BearerTokens>> tokens =
        BearerTokens::FromFile("auth_token_file", options.auth_token_file);
    if (!tokens.ok()) return tokens.status();
    material.bearer_tokens = *std::move(tokens);
  }
  return material;
}

int ChannelMilliseconds(absl::Duration duration) {
  return static_cast<int>(std::max<int64_t>(1, absl::ToInt64Milliseconds(duration)));
}

// Leaves server reflection out of one server. gRPC's reflection library adds it to every server
// the process builds once it is linked in.
class WithoutReflection : public grpc::ServerBuilderOption {
 public:
  void UpdateArguments(grpc::ChannelArguments* /*args*/) override {}
  void UpdatePlugins(std::vector<std::unique_ptr<grpc::ServerBuilderPlugin>>* plugins) override {
    plugins->erase(std::remove_if(plugins->begin(), plugins->end(),
                                  [](const std::unique_ptr<grpc::ServerBuilderPlugin>& plugin) {
                                    return plugin->name() == kReflectionPluginName;
                                  }),
                   plugins->end());
  }
};

// Refuses reflection calls without an accepted bearer token. The service's own handlers check
// their calls themselves (that works on plaintext ports too, where gRPC runs no
// AuthMetadataProcessor); everything else, health included, passes untouched.
class ReflectionTokenCheck : public grpc::AuthMetadataProcessor {
 public:
  explicit ReflectionTokenCheck(GradientService* service) : service_(service) {}

  // The check is a few comparisons; it needs no thread of its own.
  bool IsBlocking() const override { return false; }

  grpc::Status Process(const InputMetadata& auth_metadata, grpc::AuthContext* context,
                       OutputMetadata* /*consumed_auth_metadata*/,
                       OutputMetadata* /*response_metadata*/) override {
    // gRPC passes the method as ":path"; a call without one is checked rather than let through.
    const auto path = auth_metadata.find(":path");
    const absl::string_view method =
        path == auth_metadata.end() ? absl::string_view("(unknown method)")
                                    : absl::string_view(path->second.data(), path->second.size());
    if (path != auth_metadata.end() && !absl::StartsWith(method, kReflectionPathPrefix)) {
      return grpc::Status::OK;
    }
    std::vector<absl::string_view> values;
    const auto range = auth_metadata.equal_range(kAuthorizationMetadataKey);
    for (auto it = range.first; it != range.second; ++it) {
      values.emplace_back(it->second.data(), it->second.size());
    }
    // The peer's address is not known here; its certificate's names are, with mutual TLS.
    std::vector<std::string> identity;
    for (const grpc::string_ref& name : context->GetPeerIdentity()) {
      identity.emplace_back(name.data(), name.size());
    }
    return ToGrpcStatus(service_->AuthenticateOther(
        method, identity.empty() ? "tls" : absl::StrCat("tls:", absl::StrJoin(identity, ",")),
        values));
  }

 private:
  GradientService* const service_;
};

// "host:port" with the port replaced; an address without a numeric port is returned as is.
std::string WithPort(const std::string& address, int port) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon + 1 == address.size()) return address;
  for (size_t i = colon + 1; i < address.size(); ++i) {
    if (!absl::ascii_isdigit(static_cast<unsigned char>(address[i]))) return address;
  }
  return absl::StrCat(address.substr(0, colon + 1), port);
}

// The memory the process may use: its cgroups' limit if one is set below the machine's
// physical memory, else physical memory. `source` says which.
int64_t MemoryLimit(std::string* source) {
  const int64_t physical =
      static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) * static_cast<int64_t>(sysconf(_SC_PAGESIZE));
  *source = "physical memory";
  const int64_t cgroup = CgroupMemoryLimit("/proc/self/cgroup", "/sys/fs/cgroup");
  if (cgroup > 0 && cgroup < physical) {
    *source = "the cgroup memory limit";
    return cgroup;
  }
  return physical;
}

}  // namespace

absl::StatusOr<ResolvedMemoryBudget> ResolveMemoryBudget(const ServerOptions& options) {
  ResolvedMemoryBudget budget;
  if (options.max_memory_mb < 0) {
    return absl::InvalidArgumentError(absl::StrCat("max_memory_mb=", options.max_memory_mb,
                                                   " must be >= 0 (0 = a share of the memory)"));
  }
  if (options.max_memory_mb > 0) {
    if (options.max_memory_mb > (int64_t{1} << 40)) {
      return absl::InvalidArgumentError(
          absl::StrCat("max_memory_mb=", options.max_memory_mb, " is more than 2^40"));
    }
    budget.bytes = options.max_memory_mb << 20;
    budget.source = absl::StrCat("max_memory_mb=", options.max_memory_mb);
    return budget;
  }
  std::string source;
  const int64_t limit = MemoryLimit(&source);
  budget.bytes = static_cast<int64_t>(static_cast<double>(limit) * kDefaultMemoryFraction);
  budget.source = absl::StrCat(static_cast<int>(kDefaultMemoryFraction * 100), "% of ", source,
                               " of ", limit >> 20, " MiB");
  return budget;
}

class Server::Impl {
 public:
  Impl(const ServerOptions& options, SecurityMaterial security,
       std::unique_ptr<gradengine::MemoryBudget> budget, std::unique_ptr<gradengine::Engine> engine,
       std::unique_ptr<ComputePool> pool, std::unique_ptr<SharedMemoryRegistry> shared_memory,
       std::unique_ptr<GradientService> service, std::unique_ptr<Metrics> metrics)
      : options_(options),
        security_(std::move(security)),
        metrics_(std::move(metrics)),
        budget_(std::move(budget)),
        engine_(std::move(engine)),
        pool_(std::move(pool)),
        shared_memory_(std::move(shared_memory)),
        service_(std::move(service)) {}

  ~Impl() { Shutdown(); }

  absl::Status Start() {
    grpc::EnableDefaultHealthCheckService(true);
    grpc::reflection::InitProtoReflectionServerBuilderPlugin();
    if (!options_.health_address.empty()) {
      if (absl::Status status = StartHealthListener(); !status.ok()) return status;
    }
    if (!options_.metrics_address.empty()) {
      absl::StatusOr<std::unique_ptr<MetricsHttpServer>> metrics_http =
          MetricsHttpServer::Create("metrics_address", options_.metrics_address, metrics_.get());
      if (!metrics_http.ok()) return metrics_http.status();
      metrics_http_ = *std::move(metrics_http);
    }
    grpc::ServerBuilder builder;
    builder.AddListeningPort(options_.address, Credentials(), &port_);
    // Without SO_REUSEPORT a second server on a taken port fails to start instead of silently
    // sharing the port's connections with the first.
    builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
    if (options_.max_connection_age > absl::ZeroDuration()) {
      builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_MS,
                                 ChannelMilliseconds(options_.max_connection_age));
    }
    if (options_.max_connection_age_grace > absl::ZeroDuration()) {
      builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS,
                                 ChannelMilliseconds(options_.max_connection_age_grace));
    }
    // Clients ping every 20 s while they have calls in flight (gradclient's keepalive, which
    // finds a dead or stalled connection); accept that, and never GOAWAY a client for pinging
    // during a long computation, when the server sends nothing.
    builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 10000);
    builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PING_STRIKES, 0);
    const int max_bytes = options_.max_message_mb * (1 << 20);
    builder.SetMaxReceiveMessageSize(max_bytes);
    builder.SetMaxSendMessageSize(max_bytes);
    builder.RegisterService(service_.get());
    // A token on a plaintext port leaves no way to guard reflection (see ServerOptions).
    if (!security_.tls() && security_.bearer_tokens != nullptr) {
      builder.SetOption(std::make_unique<WithoutReflection>());
    }
    grpc_server_ = builder.BuildAndStart();
    if (grpc_server_ == nullptr || port_ == 0) {
      grpc_server_.reset();
      return absl::UnavailableError(absl::StrCat(
          "could not listen on address=\"", options_.address,
          "\" (malformed, in use, or not allowed",
          security_.tls() ? "; or the TLS certificate and key were rejected, see gRPC's log" : "",
          ")"));
    }
    for (grpc::Server* server : {grpc_server_.get(), health_server_.get()}) {
      if (server == nullptr) continue;
      if (grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService()) {
        health->SetServingStatus(grad::v1::GradientService::service_full_name(), true);
      }
    }
    return absl::OkStatus();
  }

  int port() const { return port_; }
  int health_port() const { return health_port_; }
  const ResolvedMemoryBudget& memory_budget() const { return memory_budget_; }
  void set_memory_budget(ResolvedMemoryBudget memory) { memory_budget_ = std::move(memory); }
  int metrics_port() const { return metrics_http_ == nullptr ? 0 : metrics_http_->port(); }
  const ServerOptions& options() const { return options_; }

  void Shutdown() ABSL_LOCKS_EXCLUDED(shutdown_mu_) {
    // Held throughout, so that a concurrent second call returns only once the server stopped.
    absl::MutexLock lock(&shutdown_mu_);
    if (stopped_.HasBeenNotified()) return;
    // NOT_SERVING for good, before anything is refused, so that watchers hear it first.
    for (grpc::Server* server : {grpc_server_.get(), health_server_.get()}) {
      if (server == nullptr) continue;
      if (grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService()) {
        health->Shutdown();
      }
    }
    if (grpc_server_ != nullptr) {
      const absl::Time deadline = absl::Now() + options_.shutdown_grace;
      // The service refuses new calls and answers those in progress (their compute threads keep
      // running) before gRPC's own shutdown begins: gRPC closes a connection as soon as its last
      // call is done, and a client still reading a large response then, and so still sending
      // flow-control updates, gets the connection reset and loses the response's tail. Hence
      // also the pause before the connections close.
      if (service_->Drain(deadline)) {
        absl::SleepFor(std::min(kResponseLinger, deadline - absl::Now()));
      }
      // Sends GOAWAY and waits for clients to close their connections, a short while: every
      // call has been answered, and idle clients can take seconds to close. Past it, gRPC
      // cancels what is left (health watches; calls still computing if the grace ran out, which
      // they see between layers) and closes the connections.
      grpc_server_->Shutdown(absl::ToChronoTime(std::min(deadline, absl::Now() + kCloseWait)));
      grpc_server_->Wait();
    }
    // Probes keep hearing NOT_SERVING until the end; then open Watch streams are cancelled at
    // once (a probe's Check takes no time), so the listener adds nothing to the stop time.
    if (health_server_ != nullptr) {
      health_server_->Shutdown(absl::ToChronoTime(absl::Now()));
      health_server_->Wait();
    }
    // Scrapes saw the drain; the last one may be in progress, and it is answered.
    if (metrics_http_ != nullptr) metrics_http_->Stop();
    pool_->Stop();
    stopped_.Notify();
  }

  void Wait() { stopped_.WaitForNotification(); }

 private:
  std::shared_ptr<grpc::ServerCredentials> Credentials() {
    if (!security_.tls()) return grpc::InsecureServerCredentials();
    grpc::SslServerCredentialsOptions ssl(
        security_.client_ca.empty() ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                                    : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
    ssl.pem_root_certs = security_.client_ca;
    ssl.pem_key_cert_pairs.push_back({security_.private_key, security_.cert_chain});
    std::shared_ptr<grpc::ServerCredentials> credentials = grpc::SslServerCredentials(ssl);
    if (security_.bearer_tokens != nullptr) {
      credentials->SetAuthMetadataProcessor(std::make_shared<ReflectionTokenCheck>(service_.get()));
    }
    return credentials;
  }

  // A plaintext server with nothing but the default health service (no reflection, no API).
  absl::Status StartHealthListener() {
    grpc::ServerBuilder builder;
    builder.AddListeningPort(options_.health_address, grpc::InsecureServerCredentials(),
                             &health_port_);
    builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
    builder.SetOption(std::make_unique<WithoutReflection>());
    // gRPC will not build a server without a service of its own; this one answers every method
    // but health's UNIMPLEMENTED, as an unknown method would be anyway.
    builder.RegisterCallbackGenericService(&health_only_);
    health_server_ = builder.BuildAndStart();
    if (health_server_ == nullptr || health_port_ == 0) {
      health_server_.reset();
      return absl::UnavailableError(absl::StrCat("could not listen on health_address=\"",
                                                 options_.health_address,
                                                 "\" (malformed, in use, or not allowed)"));
    }
    return absl::OkStatus();
  }

  const ServerOptions options_;
  const SecurityMaterial security_;
  // Destroyed last: the service records into it, and its gauges read the parts below.
  std::unique_ptr<Metrics> metrics_;
  // Destroyed in reverse order: the gRPC server before the service it calls, the service
  // before the pool and the engine it borrows, everything before the memory budget.
  std::unique_ptr<gradengine::MemoryBudget> budget_;
  std::unique_ptr<gradengine::Engine> engine_;
  std::unique_ptr<ComputePool> pool_;
  // Unmaps every region left once the service and its calls are gone.
  std::unique_ptr<SharedMemoryRegistry> shared_memory_;
  std::unique_ptr<GradientService> service_;
  std::unique_ptr<grpc::Server> grpc_server_;
  int port_ = 0;
  grpc::CallbackGenericService health_only_;
  std::unique_ptr<grpc::Server> health_server_;
  int health_port_ = 0;
  ResolvedMemoryBudget memory_budget_;
  // Stopped (in Shutdown) before anything its gauges read is destroyed.
  std::unique_ptr<MetricsHttpServer> metrics_http_;

  absl::Mutex shutdown_mu_;
  absl::Notification stopped_;
};

absl::StatusOr<std::unique_ptr<Server>> Server::Create(const ServerOptions& options) {
  if (absl::Status status = ValidateOptions(options); !status.ok()) return status;
  absl::StatusOr<SecurityMaterial> security = LoadSecurityMaterial(options);
  if (!security.ok()) return security.status();

  absl::StatusOr<ResolvedMemoryBudget> memory = ResolveMemoryBudget(options);
  if (!memory.ok()) return memory.status();
  gradengine::MemoryBudgetOptions budget_options;
  budget_options.limit_bytes = memory->bytes;
  budget_options.max_wait = options.memory_wait;
  budget_options.limit_name = absl::StrCat("memory budget (", memory->source, ")");
  absl::StatusOr<std::unique_ptr<gradengine::MemoryBudget>> budget =
      gradengine::MemoryBudget::Create(budget_options);
  if (!budget.ok()) return budget.status();

  gradengine::EngineOptions engine_options;
  engine_options.threads_per_call = options.threads_per_request;
  engine_options.max_elements = options.max_elements;
  engine_options.max_workspace_bytes = options.max_workspace_bytes;
  engine_options.winograd = options.winograd;
  engine_options.memory_budget = budget->get();
  engine_options.max_plan_cache_bytes = memory->bytes / kPlanCacheShareOfBudget;
  absl::StatusOr<std::unique_ptr<gradengine::Engine>> engine =
      gradengine::Engine::Create(engine_options);
  if (!engine.ok()) return engine.status();

  ComputePoolOptions pool_options;
  pool_options.threads = options.max_concurrent_requests;
  if (pool_options.threads == 0) {
    const int cores = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
    const int threads_per_call = std::max(1, (*engine)->info().threads_per_call);
    pool_options.threads = std::max(1, cores / threads_per_call);
  }
  pool_options.max_queued = options.max_queued_requests;
  absl::StatusOr<std::unique_ptr<ComputePool>> pool = ComputePool::Create(pool_options);
  if (!pool.ok()) return pool.status();

  GradientServiceOptions service_options;
  service_options.server_version = GRADSERVER_VERSION;
  service_options.max_message_bytes = int64_t{options.max_message_mb} << 20;
  service_options.max_concurrent_requests = pool_options.threads;
  service_options.max_queued_requests = pool_options.max_queued;
  service_options.max_workspace_bytes = options.max_workspace_bytes;
  service_options.memory_budget = budget->get();
  service_options.max_plan_cache_bytes = engine_options.max_plan_cache_bytes;
  service_options.response_drain_timeout = options.response_drain_timeout;
  service_options.log_requests = options.log_requests;
  service_options.log_sink = options.request_log_sink;
  service_options.bearer_tokens = security->bearer_tokens;
  service_options.tls = security->tls();
  service_options.client_certificates_required = !security->client_ca.empty();
  auto metrics = std::make_unique<Metrics>();
  service_options.metrics = metrics.get();
  absl::StatusOr<std::unique_ptr<SharedMemoryRegistry>> shared_memory =
      SharedMemoryRegistry::Create(options.shared_memory);
  if (!shared_memory.ok()) return shared_memory.status();
  auto service = std::make_unique<GradientService>(service_options, engine->get(), pool->get(),
                                                   shared_memory->get());
  ServerMetricSources metric_sources;
  metric_sources.engine = engine->get();
  metric_sources.pool = pool->get();
  metric_sources.shared_memory = shared_memory->get();
  metric_sources.memory_budget = budget->get();
  metric_sources.max_plan_cache_bytes = engine_options.max_plan_cache_bytes;
  metric_sources.responses_cancelled_undrained = [service = service.get()] {
    return service->responses_cancelled_undrained();
  };
  metric_sources.calls_in_progress = [service = service.get()] {
    return service->calls_in_progress();
  };
  metric_sources.server_version = GRADSERVER_VERSION;
  metric_sources.compute_threads = pool_options.threads;
  metric_sources.max_queued_requests = pool_options.max_queued;
  AddServerMetrics(metrics.get(), metric_sources);

  auto impl = std::make_unique<Impl>(
      options, *std::move(security), *std::move(budget), *std::move(engine), *std::move(pool),
      *std::move(shared_memory), std::move(service), std::move(metrics));
  impl->set_memory_budget(*std::move(memory));
  if (absl::Status status = impl->Start(); !status.ok()) return status;
  return std::unique_ptr<Server>(new Server(std::move(impl)));
}

Server::Server(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Server::~Server() = default;

int Server::port() const { return impl_->port(); }

std::string Server::listening_address() const {
  return WithPort(impl_->options().address, impl_->port());
}

const ResolvedMemoryBudget& Server::memory_budget() const { return impl_->memory_budget(); }

int Server::health_port() const { return impl_->health_port(); }

std::string Server::health_listening_address() const {
  if (impl_->options().health_address.empty()) return "";
  return WithPort(impl_->options().health_address, impl_->health_port());
}

int Server::metrics_port() const { return impl_->metrics_port(); }

std::string Server::metrics_listening_address() const {
  if (impl_->options().metrics_address.empty()) return "";
  return WithPort(impl_->options().metrics_address, impl_->metrics_port());
}

void Server::Shutdown() { impl_->Shutdown(); }

void Server::Wait() { impl_->Wait(); }

}  // namespace gradserver
