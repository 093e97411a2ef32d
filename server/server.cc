#include "server/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include <algorithm>
#include <memory>
#include <string>
#include <thread>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "gradengine/engine.h"
#include "server/compute_pool.h"
#include "server/gradient_service.h"

#ifndef GRADSERVER_VERSION
#error "GRADSERVER_VERSION must be defined by the build"
#endif

namespace gradserver {
namespace {

// gRPC takes message sizes as int; 2047 MiB is the largest whole number of MiB below 2^31.
constexpr int kMaxMessageMb = 2047;

// On shutdown, how long the connections stay open after the last call was answered, for its
// client to read the response (see Impl::Shutdown).
constexpr absl::Duration kResponseLinger = absl::Milliseconds(500);
// Then how long gRPC waits for clients to close the connections before it closes them.
constexpr absl::Duration kCloseWait = absl::Seconds(1);

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
  return absl::OkStatus();
}

// "host:port" with the port replaced; an address without a numeric port is returned as is.
std::string WithPort(const std::string& address, int port) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon + 1 == address.size()) return address;
  for (size_t i = colon + 1; i < address.size(); ++i) {
    if (!absl::ascii_isdigit(static_cast<unsigned char>(address[i]))) return address;
  }
  return absl::StrCat(address.substr(0, colon + 1), port);
}

}  // namespace

class Server::Impl {
 public:
  Impl(const ServerOptions& options, std::unique_ptr<gradengine::Engine> engine,
       std::unique_ptr<ComputePool> pool, std::unique_ptr<GradientService> service)
      : options_(options),
        engine_(std::move(engine)),
        pool_(std::move(pool)),
        service_(std::move(service)) {}

  ~Impl() { Shutdown(); }

  absl::Status Start() {
    grpc::EnableDefaultHealthCheckService(true);
    grpc::reflection::InitProtoReflectionServerBuilderPlugin();
    grpc::ServerBuilder builder;
    builder.AddListeningPort(options_.address, grpc::InsecureServerCredentials(), &port_);
    // Without SO_REUSEPORT a second server on a taken port fails to start instead of silently
    // sharing the port's connections with the first.
    builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
    const int max_bytes = options_.max_message_mb * (1 << 20);
    builder.SetMaxReceiveMessageSize(max_bytes);
    builder.SetMaxSendMessageSize(max_bytes);
    builder.RegisterService(service_.get());
    grpc_server_ = builder.BuildAndStart();
    if (grpc_server_ == nullptr || port_ == 0) {
      grpc_server_.reset();
      return absl::UnavailableError(absl::StrCat("could not listen on address=\"", options_.address,
                                                 "\" (malformed, in use, or not allowed)"));
    }
    grpc::HealthCheckServiceInterface* health = grpc_server_->GetHealthCheckService();
    if (health != nullptr) {
      health->SetServingStatus(grad::v1::GradientService::service_full_name(), true);
    }
    return absl::OkStatus();
  }

  int port() const { return port_; }
  const ServerOptions& options() const { return options_; }

  void Shutdown() ABSL_LOCKS_EXCLUDED(shutdown_mu_) {
    // Held throughout, so that a concurrent second call returns only once the server stopped.
    absl::MutexLock lock(&shutdown_mu_);
    if (stopped_.HasBeenNotified()) return;
    if (grpc_server_ != nullptr) {
      const absl::Time deadline = absl::Now() + options_.shutdown_grace;
      // NOT_SERVING for good, before anything is refused, so that watchers hear it first.
      if (grpc::HealthCheckServiceInterface* health = grpc_server_->GetHealthCheckService()) {
        health->Shutdown();
      }
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
    pool_->Stop();
    stopped_.Notify();
  }

  void Wait() { stopped_.WaitForNotification(); }

 private:
  const ServerOptions options_;
  // Destroyed in reverse order: the gRPC server before the service it calls, the service
  // before the pool and the engine it borrows.
  std::unique_ptr<gradengine::Engine> engine_;
  std::unique_ptr<ComputePool> pool_;
  std::unique_ptr<GradientService> service_;
  std::unique_ptr<grpc::Server> grpc_server_;
  int port_ = 0;

  absl::Mutex shutdown_mu_;
  absl::Notification stopped_;
};

absl::StatusOr<std::unique_ptr<Server>> Server::Create(const ServerOptions& options) {
  if (absl::Status status = ValidateOptions(options); !status.ok()) return status;

  gradengine::EngineOptions engine_options;
  engine_options.threads_per_call = options.threads_per_request;
  engine_options.max_elements = options.max_elements;
  engine_options.max_workspace_bytes = options.max_workspace_bytes;
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
  service_options.log_requests = options.log_requests;
  auto service = std::make_unique<GradientService>(service_options, engine->get(), pool->get());

  auto impl =
      std::make_unique<Impl>(options, *std::move(engine), *std::move(pool), std::move(service));
  if (absl::Status status = impl->Start(); !status.ok()) return status;
  return std::unique_ptr<Server>(new Server(std::move(impl)));
}

Server::Server(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Server::~Server() = default;

int Server::port() const { return impl_->port(); }

std::string Server::listening_address() const {
  return WithPort(impl_->options().address, impl_->port());
}

void Server::Shutdown() { impl_->Shutdown(); }

void Server::Wait() { impl_->Wait(); }

}  // namespace gradserver
