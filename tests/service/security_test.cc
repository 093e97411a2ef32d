// The server's security options end to end, on in-process servers: TLS, mutual TLS, bearer
// tokens (on the service, on reflection, never on health), the plaintext health listener,
// connection-age rebalancing, and the options' checks in Server::Create and Client::Create.
// Certificates come from a throwaway CA made with openssl when the suite starts.

#include <grpcpp/grpcpp.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "grad/v1/gradient_service.grpc.pb.h"
#include "gradclient/client.h"
#include "gtest/gtest.h"
#include "server/server.h"
#include "tests/service/service_test_util.h"
#include "tests/service/test_pki.h"

namespace gradservicetest {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using ::testing::Not;

constexpr char kReflectionMethod[] =
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo";
// ServerReflectionRequest{list_services: ""}.
const std::string kListServices("\x3a\x00", 2);
constexpr char kWrongToken[] = "wrong-token-c0ffee";

// The log lines of one server, collected from its request_log_sink.
class LogCollector {
 public:
  std::function<void(absl::string_view)> Sink() {
    return [this](absl::string_view line) {
      absl::MutexLock lock(&mu_);
      lines_.emplace_back(line);
    };
  }
  std::vector<std::string> Lines() {
    absl::MutexLock lock(&mu_);
    return lines_;
  }
  std::string All() {
    std::string all;
    for (const std::string& line : Lines()) absl::StrAppend(&all, line, "\n");
    return all;
  }

 private:
  absl::Mutex mu_;
  std::vector<std::string> lines_ ABSL_GUARDED_BY(mu_);
};

class SecurityTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new std::string(absl::StrCat(::testing::TempDir(), "/security_test_", getpid()));
    fs::remove_all(*dir_);
    pki_ = new TestPki;
    if (!MakeTestPki(*dir_, pki_)) {
      delete pki_;
      pki_ = nullptr;
    }
  }

  static void TearDownTestSuite() {
    if (!::testing::UnitTest::GetInstance()->Failed()) fs::remove_all(*dir_);
    delete pki_;
    pki_ = nullptr;
    delete dir_;
    dir_ = nullptr;
  }

  void SetUp() override { ASSERT_NE(pki_, nullptr) << "the test PKI could not be made"; }

  // A server on 127.0.0.1 with one compute thread; its log goes to log_.
  std::unique_ptr<gradserver::Server> StartServer(gradserver::ServerOptions options) {
    options.address = "127.0.0.1:0";
    options.threads_per_request = 1;
    if (options.max_concurrent_requests == 0) options.max_concurrent_requests = 2;
    options.log_requests = true;
    options.request_log_sink = log_.Sink();
    absl::StatusOr<std::unique_ptr<gradserver::Server>> server =
        gradserver::Server::Create(options);
    EXPECT_TRUE(server.ok()) << server.status();
    return server.ok() ? *std::move(server) : nullptr;
  }

  gradserver::ServerOptions TlsOptions() const {
    gradserver::ServerOptions options;
    options.tls_cert_file = pki_->server_cert;
    options.tls_key_file = pki_->server_key;
    return options;
  }

  // A client that does not retry, so that a refused handshake fails at once.
  static std::unique_ptr<gradclient::Client> MakeClient(const std::string& target,
                                                        gradclient::ClientOptions options = {}) {
    options.retry.max_attempts = 1;
    options.default_timeout = absl::Seconds(20);
    absl::StatusOr<std::unique_ptr<gradclient::Client>> client =
        gradclient::Client::Create(target, options);
    EXPECT_TRUE(client.ok()) << client.status();
    return client.ok() ? *std::move(client) : nullptr;
  }

  static std::string Target(int port) { return absl::StrCat("127.0.0.1:", port); }

  gradclient::ClientOptions TrustingCa(const std::string& ca) const {
    gradclient::ClientOptions options;
    options.tls.enabled = true;
    options.tls.root_ca_file = ca;
    return options;
  }

  // A raw TLS channel trusting the test CA, for calls with hand-made metadata.
  std::shared_ptr<grpc::Channel> TlsChannel(int port) const {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = ReadTextFile(pki_->ca);
    return grpc::CreateChannel(Target(port), grpc::SslCredentials(ssl));
  }

  static grpc::Status GetInfoWithMetadata(grpc::Channel* channel,
                                          const std::vector<std::string>& authorization) {
    auto stub = grad::v1::GradientService::NewStub(
        std::shared_ptr<grpc::Channel>(channel, [](grpc::Channel*) {}));
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
    for (const std::string& value : authorization) context.AddMetadata("authorization", value);
    grad::v1::GetInfoResponse response;
    return stub->GetInfo(&context, grad::v1::GetInfoRequest(), &response);
  }

  static grpc::Status ListServices(std::shared_ptr<grpc::Channel> channel,
                                   const std::vector<std::pair<std::string, std::string>>& metadata,
                                   std::string* response) {
    RawStream stream(std::move(channel), kReflectionMethod, metadata);
    if (stream.Write(kListServices) && stream.WritesDone()) stream.Read(response);
    return stream.Finish();
  }

  static std::string* dir_;
  static TestPki* pki_;
  LogCollector log_;
};

std::string* SecurityTest::dir_ = nullptr;
TestPki* SecurityTest::pki_ = nullptr;

TEST_F(SecurityTest, TlsServerRefusesPlaintextClients) {
  std::unique_ptr<gradserver::Server> server = StartServer(TlsOptions());
  ASSERT_NE(server, nullptr);
  std::unique_ptr<gradclient::Client> client = MakeClient(Target(server->port()));
  ASSERT_NE(client, nullptr);
  EXPECT_EQ(client->GetInfo().status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(client->Health().status().code(), absl::StatusCode::kUnavailable);
}

TEST_F(SecurityTest, TlsClientRefusesServerSignedByAnotherCa) {
  std::unique_ptr<gradserver::Server> server = StartServer(TlsOptions());
  ASSERT_NE(server, nullptr);
  std::unique_ptr<gradclient::Client> client =
      MakeClient(Target(server->port()), TrustingCa(pki_->other_ca));
  ASSERT_NE(client, nullptr);
  EXPECT_EQ(client->GetInfo().status().code(), absl::StatusCode::kUnavailable);
}

TEST_F(SecurityTest, TlsResultsEqualPlaintextResultsBitForBit) {
  std::unique_ptr<gradserver::Server> tls_server = StartServer(TlsOptions());
  std::unique_ptr<gradserver::Server> plain_server = StartServer({});
  ASSERT_NE(tls_server, nullptr);
  ASSERT_NE(plain_server, nullptr);
  std::unique_ptr<gradclient::Client> tls_client =
      MakeClient(Target(tls_server->port()), TrustingCa(pki_->ca));
  std::unique_ptr<gradclient::Client> plain_client = MakeClient(Target(plain_server->port()));
  ASSERT_NE(tls_client, nullptr);
  ASSERT_NE(plain_client, nullptr);

  const OwnedCase c = SmallCase("conv_relu_conv_tanh");
  absl::StatusOr<gradclient::GradientReply> over_tls =
      tls_client->ComputeGradients(c.GradientRequest());
  absl::StatusOr<gradclient::GradientReply> in_plaintext =
      plain_client->ComputeGradients(c.GradientRequest());
  ASSERT_TRUE(over_tls.ok()) << over_tls.status();
  ASSERT_TRUE(in_plaintext.ok()) << in_plaintext.status();
  EXPECT_TRUE(SameGradientResult(over_tls->result, in_plaintext->result));

  absl::StatusOr<gradclient::ServerInfo> info = tls_client->GetInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_TRUE(info->tls);
  EXPECT_FALSE(info->client_certificates_required);
  EXPECT_FALSE(info->bearer_token_required);
  absl::StatusOr<gradclient::ServerInfo> plain_info = plain_client->GetInfo();
  ASSERT_TRUE(plain_info.ok()) << plain_info.status();
  EXPECT_FALSE(plain_info->tls);

  // The certificate names localhost too, which a client reaching it by address may check.
  gradclient::ClientOptions by_name = TrustingCa(pki_->ca);
  by_name.tls.server_name_override = "localhost";
  std::unique_ptr<gradclient::Client> named = MakeClient(Target(tls_server->port()), by_name);
  ASSERT_NE(named, nullptr);
  EXPECT_TRUE(named->GetInfo().ok());
  by_name.tls.server_name_override = "elsewhere.example";
  std::unique_ptr<gradclient::Client> misnamed = MakeClient(Target(tls_server->port()), by_name);
  ASSERT_NE(misnamed, nullptr);
  EXPECT_EQ(misnamed->GetInfo().status().code(), absl::StatusCode::kUnavailable);
}

TEST_F(SecurityTest, MutualTlsNeedsAClientCertificateFromTheClientCa) {
  gradserver::ServerOptions options = TlsOptions();
  options.tls_client_ca_file = pki_->ca;
  std::unique_ptr<gradserver::Server> server = StartServer(options);
  ASSERT_NE(server, nullptr);

  std::unique_ptr<gradclient::Client> no_cert =
      MakeClient(Target(server->port()), TrustingCa(pki_->ca));
  ASSERT_NE(no_cert, nullptr);
  EXPECT_EQ(no_cert->GetInfo().status().code(), absl::StatusCode::kUnavailable);

  gradclient::ClientOptions foreign = TrustingCa(pki_->ca);
  foreign.tls.cert_file = pki_->other_client_cert;
  foreign.tls.key_file = pki_->other_client_key;
  std::unique_ptr<gradclient::Client> foreign_cert = MakeClient(Target(server->port()), foreign);
  ASSERT_NE(foreign_cert, nullptr);
  EXPECT_EQ(foreign_cert->GetInfo().status().code(), absl::StatusCode::kUnavailable);

  gradclient::ClientOptions signed_by_ca = TrustingCa(pki_->ca);
  signed_by_ca.tls.cert_file = pki_->client_cert;
  signed_by_ca.tls.key_file = pki_->client_key;
  std::unique_ptr<gradclient::Client> client = MakeClient(Target(server->port()), signed_by_ca);
  ASSERT_NE(client, nullptr);
  absl::StatusOr<gradclient::ServerInfo> info = client->GetInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_TRUE(info->tls);
  EXPECT_TRUE(info->client_certificates_required);
  const OwnedCase c = SmallCase("gelu_chain");
  EXPECT_TRUE(client->ComputeGradients(c.GradientRequest()).ok());
}

TEST_F(SecurityTest, TokenIsRequiredOnTheServiceButNotOnHealth) {
  gradserver::ServerOptions options;
  options.auth_token_file = pki_->token_file;
  std::unique_ptr<gradserver::Server> server = StartServer(options);
  ASSERT_NE(server, nullptr);
  const OwnedCase c = SmallCase("grouped_dilated");

  std::unique_ptr<gradclient::Client> anonymous = MakeClient(Target(server->port()));
  ASSERT_NE(anonymous, nullptr);
  absl::StatusOr<gradclient::GradientReply> refused =
      anonymous->ComputeGradients(c.GradientRequest());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_THAT(refused.status().message(), HasSubstr("requires a bearer token"));
  EXPECT_EQ(anonymous->Forward(c.ForwardRequest()).status().code(),
            absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(anonymous->GetInfo().status().code(), absl::StatusCode::kUnauthenticated);
  // Probes need no token.
  absl::StatusOr<gradclient::ServingStatus> health = anonymous->Health();
  ASSERT_TRUE(health.ok()) << health.status();
  EXPECT_EQ(*health, gradclient::ServingStatus::kServing);
  health = anonymous->Health("grad.v1.GradientService");
  ASSERT_TRUE(health.ok()) << health.status();
  EXPECT_EQ(*health, gradclient::ServingStatus::kServing);

  gradclient::ClientOptions wrong;
  wrong.auth_token = kWrongToken;
  std::unique_ptr<gradclient::Client> wrong_client = MakeClient(Target(server->port()), wrong);
  ASSERT_NE(wrong_client, nullptr);
  refused = wrong_client->ComputeGradients(c.GradientRequest());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_THAT(refused.status().message(), HasSubstr("not one this server accepts"));
  EXPECT_THAT(refused.status().message(), Not(HasSubstr(kWrongToken)));

  // Malformed headers, sent by hand.
  std::shared_ptr<grpc::Channel> channel = MakeChannel(Target(server->port()));
  for (const std::vector<std::string>& authorization : std::vector<std::vector<std::string>>{
           {absl::StrCat("Basic ", kFirstToken)},
           {"Bearer"},
           {kFirstToken},
           {absl::StrCat("Bearer ", kFirstToken, " extra")},
           {absl::StrCat("Bearer ", kFirstToken), absl::StrCat("Bearer ", kSecondToken)}}) {
    const grpc::Status status = GetInfoWithMetadata(channel.get(), authorization);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAUTHENTICATED) << authorization[0];
    EXPECT_THAT(status.error_message(), HasSubstr("malformed")) << authorization[0];
    EXPECT_THAT(status.error_message(), Not(HasSubstr(kFirstToken)));
  }

  // Both tokens in the file are accepted (rotation), and refusals left the server serving.
  std::unique_ptr<gradengine::Engine> engine = MakeReferenceEngine(1);
  ASSERT_NE(engine, nullptr);
  absl::StatusOr<gradengine::GradientResult> expected =
      engine->ComputeGradients(c.GradientRequest());
  ASSERT_TRUE(expected.ok()) << expected.status();
  for (const char* token : {kFirstToken, kSecondToken}) {
    gradclient::ClientOptions right;
    right.auth_token = token;
    std::unique_ptr<gradclient::Client> client = MakeClient(Target(server->port()), right);
    ASSERT_NE(client, nullptr);
    absl::StatusOr<gradclient::GradientReply> reply = client->ComputeGradients(c.GradientRequest());
    ASSERT_TRUE(reply.ok()) << reply.status();
    EXPECT_TRUE(SameGradientResult(reply->result, *expected));
    EXPECT_EQ(client->Health().value_or(gradclient::ServingStatus::kUnknown),
              gradclient::ServingStatus::kServing);
  }
  EXPECT_TRUE(GetInfoWithMetadata(channel.get(), {absl::StrCat("bEaReR   ", kSecondToken)}).ok());

  gradclient::ClientOptions right;
  right.auth_token = kFirstToken;
  std::unique_ptr<gradclient::Client> client = MakeClient(Target(server->port()), right);
  ASSERT_NE(client, nullptr);
  absl::StatusOr<gradclient::ServerInfo> info = client->GetInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_TRUE(info->bearer_token_required);
  EXPECT_FALSE(info->tls);
  // Refused: anonymous ComputeGradients, Forward and GetInfo, the wrong token's
  // ComputeGradients, five malformed GetInfo. Forward and ComputeGradients count as failed too.
  EXPECT_EQ(info->requests_unauthenticated, 9);
  EXPECT_EQ(info->requests_failed, 3);
  EXPECT_EQ(info->requests_total, 5);

  const std::string log = log_.All();
  EXPECT_THAT(log, HasSubstr("method=ComputeGradients"));
  EXPECT_THAT(log, HasSubstr("code=UNAUTHENTICATED"));
  EXPECT_THAT(log, HasSubstr("method=GetInfo code=UNAUTHENTICATED"));
  for (const char* secret : {kFirstToken, kSecondToken, kWrongToken}) {
    EXPECT_THAT(log, Not(HasSubstr(secret))) << "the log shows a token";
  }
}

TEST_F(SecurityTest, TokenGuardsReflectionOverTls) {
  gradserver::ServerOptions options = TlsOptions();
  options.auth_token_file = pki_->token_file;
  std::unique_ptr<gradserver::Server> server = StartServer(options);
  ASSERT_NE(server, nullptr);

  std::string response;
  grpc::Status status = ListServices(TlsChannel(server->port()), {}, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAUTHENTICATED) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr("requires a bearer token"));
  status = ListServices(TlsChannel(server->port()),
                        {{"authorization", absl::StrCat("Bearer ", kWrongToken)}}, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAUTHENTICATED) << status.error_message();

  response.clear();
  status = ListServices(TlsChannel(server->port()),
                        {{"authorization", absl::StrCat("Bearer ", kSecondToken)}}, &response);
  EXPECT_TRUE(status.ok()) << status.error_code() << ": " << status.error_message();
  EXPECT_THAT(response, HasSubstr("grad.v1.GradientService"));

  // The check in front of reflection lets health through without a token, and the service's
  // calls to its own check.
  gradclient::ClientOptions anonymous = TrustingCa(pki_->ca);
  std::unique_ptr<gradclient::Client> client = MakeClient(Target(server->port()), anonymous);
  ASSERT_NE(client, nullptr);
  EXPECT_EQ(client->Health().value_or(gradclient::ServingStatus::kUnknown),
            gradclient::ServingStatus::kServing);
  EXPECT_EQ(client->GetInfo().status().code(), absl::StatusCode::kUnauthenticated);
  gradclient::ClientOptions with_token = TrustingCa(pki_->ca);
  with_token.auth_token = kFirstToken;
  client = MakeClient(Target(server->port()), with_token);
  ASSERT_NE(client, nullptr);
  absl::StatusOr<gradclient::ServerInfo> info = client->GetInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->requests_unauthenticated, 3);
  EXPECT_THAT(log_.All(), HasSubstr("ServerReflectionInfo\" code=UNAUTHENTICATED"));
  EXPECT_THAT(log_.All(), Not(HasSubstr(kWrongToken)));
}

// On a plaintext port gRPC runs no check before reflection's handler, so reflection is off there
// while a token is required; the service itself still answers with its token.
TEST_F(SecurityTest, PlaintextServerWithTokenServesNoReflection) {
  gradserver::ServerOptions options;
  options.auth_token_file = pki_->token_file;
  std::unique_ptr<gradserver::Server> server = StartServer(options);
  ASSERT_NE(server, nullptr);
  std::string response;
  const grpc::Status status =
      ListServices(MakeChannel(Target(server->port())),
                   {{"authorization", absl::StrCat("Bearer ", kFirstToken)}}, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNIMPLEMENTED) << status.error_message();
  EXPECT_THAT(response, Not(HasSubstr("grad.v1.GradientService")));
}

TEST_F(SecurityTest, HealthListenerIsPlaintextAndServesOnlyHealth) {
  gradserver::ServerOptions options = TlsOptions();
  options.health_address = "127.0.0.1:0";
  options.shutdown_grace = absl::Seconds(60);
  // One slot and no queue, so that a probe can tell when the long call below is computing.
  options.max_concurrent_requests = 1;
  options.max_queued_requests = 0;
  std::unique_ptr<gradserver::Server> server = StartServer(options);
  ASSERT_NE(server, nullptr);
  ASSERT_GT(server->health_port(), 0);
  EXPECT_NE(server->health_port(), server->port());
  EXPECT_EQ(server->health_listening_address(), Target(server->health_port()));

  std::unique_ptr<gradclient::Client> probe = MakeClient(Target(server->health_port()));
  ASSERT_NE(probe, nullptr);
  for (const std::string& service : {std::string(), std::string("grad.v1.GradientService")}) {
    absl::StatusOr<gradclient::ServingStatus> health = probe->Health(service);
    ASSERT_TRUE(health.ok()) << health.status();
    EXPECT_EQ(*health, gradclient::ServingStatus::kServing) << service;
  }
  // Not the API, not reflection.
  std::unique_ptr<gradclient::Client> api_client = MakeClient(Target(server->health_port()));
  ASSERT_NE(api_client, nullptr);
  EXPECT_EQ(api_client->GetInfo().status().code(), absl::StatusCode::kUnimplemented);
  std::string response;
  EXPECT_EQ(ListServices(MakeChannel(Target(server->health_port())), {}, &response).error_code(),
            grpc::StatusCode::UNIMPLEMENTED);

  // While the server drains a call in progress, the health listener says NOT_SERVING.
  std::unique_ptr<gradclient::Client> client =
      MakeClient(Target(server->port()), TrustingCa(pki_->ca));
  ASSERT_NE(client, nullptr);
  const OwnedCase long_case = DeepCase(/*layers=*/32, /*batch=*/8, /*channels=*/64, /*size=*/32);
  std::atomic<bool> call_done{false};
  std::atomic<bool> call_ok{false};
  std::thread call([&] {
    // A probe below may hold the only slot for a moment, which refuses the call at once.
    absl::Status status;
    for (int attempt = 0; attempt < 100; ++attempt) {
      status = client->ComputeGradients(long_case.GradientRequest()).status();
      if (!absl::IsResourceExhausted(status)) break;
    }
    call_ok = status.ok();
    call_done = true;
  });
  auto stub = grad::v1::GradientService::NewStub(TlsChannel(server->port()));
  const bool computing = WaitUntilComputeSlotsBusy(*stub, std::chrono::seconds(60), call_done);
  std::thread shutdown([&] { server->Shutdown(); });
  bool saw_not_serving = false;
  const absl::Time give_up = absl::Now() + absl::Seconds(30);
  while (!saw_not_serving && absl::Now() < give_up) {
    absl::StatusOr<gradclient::ServingStatus> health = probe->Health();
    if (health.ok() && *health == gradclient::ServingStatus::kNotServing) saw_not_serving = true;
    if (!health.ok()) break;  // the listener has stopped
    absl::SleepFor(absl::Milliseconds(10));
  }
  call.join();
  shutdown.join();
  ASSERT_TRUE(computing) << "the long call was never seen computing";
  EXPECT_TRUE(saw_not_serving);
  EXPECT_TRUE(call_ok);
  EXPECT_EQ(probe->Health().status().code(), absl::StatusCode::kUnavailable);
}

// With a maximum connection age the server closes a client's connection (GOAWAY) every ~second;
// the client reconnects by itself, every call succeeds, and the server sees several connections
// (peer ports) from one Client.
TEST_F(SecurityTest, ConnectionsAreReplacedAfterTheirMaximumAge) {
  gradserver::ServerOptions options;
  options.max_connection_age = absl::Seconds(1);
  options.max_connection_age_grace = absl::Seconds(1);
  std::unique_ptr<gradserver::Server> server = StartServer(options);
  ASSERT_NE(server, nullptr);
  std::unique_ptr<gradclient::Client> client = MakeClient(Target(server->port()));
  ASSERT_NE(client, nullptr);
  const OwnedCase c = SmallCase("conv_relu_conv_tanh");
  int calls = 0;
  const absl::Time end = absl::Now() + absl::Milliseconds(3500);
  while (absl::Now() < end) {
    absl::StatusOr<gradclient::GradientReply> reply = client->ComputeGradients(c.GradientRequest());
    ASSERT_TRUE(reply.ok()) << "call " << calls << ": " << reply.status();
    ++calls;
    absl::SleepFor(absl::Milliseconds(50));
  }
  std::set<std::string> peers;
  for (const std::string& line : log_.Lines()) {
    const size_t at = line.find(" peer=\"");
    ASSERT_NE(at, std::string::npos) << line;
    peers.insert(line.substr(at, line.find('"', at + 7) - at));
  }
  EXPECT_GE(peers.size(), 2u) << calls << " calls; log:\n" << log_.All();
}

TEST_F(SecurityTest, ServerOptionsAreChecked) {
  struct Case {
    const char* what;
    std::function<void(gradserver::ServerOptions*)> set;
    const char* message;
  };
  const std::string missing = pki_->dir + "/no_such.pem";
  const std::string empty_tokens = pki_->dir + "/empty_tokens";
  std::ofstream(empty_tokens) << "# none yet\n\n";
  const std::vector<Case> cases = {
      {"key without cert", [&](auto* o) { o->tls_key_file = pki_->server_key; }, "tls_key_file="},
      {"cert without key", [&](auto* o) { o->tls_cert_file = pki_->server_cert; },
       "tls_cert_file="},
      {"client CA without TLS", [&](auto* o) { o->tls_client_ca_file = pki_->ca; },
       "tls_client_ca_file="},
      {"unreadable cert",
       [&](auto* o) {
         o->tls_cert_file = missing;
         o->tls_key_file = pki_->server_key;
       },
       "tls_cert_file="},
      {"key that is no key",
       [&](auto* o) {
         o->tls_cert_file = pki_->server_cert;
         o->tls_key_file = pki_->server_cert;
       },
       "tls_key_file="},
      {"unreadable client CA",
       [&](auto* o) {
         o->tls_cert_file = pki_->server_cert;
         o->tls_key_file = pki_->server_key;
         o->tls_client_ca_file = missing;
       },
       "tls_client_ca_file="},
      {"unreadable token file", [&](auto* o) { o->auth_token_file = missing; }, "auth_token_file="},
      {"token file without tokens", [&](auto* o) { o->auth_token_file = empty_tokens; },
       "auth_token_file="},
      {"negative age", [](auto* o) { o->max_connection_age = absl::Seconds(-1); },
       "max_connection_age="},
      {"negative grace", [](auto* o) { o->max_connection_age_grace = absl::Seconds(-1); },
       "max_connection_age_grace="},
  };
  for (const Case& c : cases) {
    gradserver::ServerOptions options;
    options.address = "127.0.0.1:0";
    c.set(&options);
    absl::StatusOr<std::unique_ptr<gradserver::Server>> server =
        gradserver::Server::Create(options);
    EXPECT_EQ(server.status().code(), absl::StatusCode::kInvalidArgument) << c.what;
    EXPECT_THAT(server.status().message(), HasSubstr(c.message)) << c.what;
  }
  gradserver::ServerOptions options;
  options.address = "127.0.0.1:0";
  options.auth_token_file = missing;
  EXPECT_THAT(gradserver::Server::Create(options).status().message(), HasSubstr(missing));
}

TEST_F(SecurityTest, ClientOptionsAreChecked) {
  const std::string missing = pki_->dir + "/no_such.pem";
  struct Case {
    const char* what;
    std::function<void(gradclient::ClientOptions*)> set;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"unreadable CA",
       [&](auto* o) {
         o->tls.enabled = true;
         o->tls.root_ca_file = missing;
       },
       absl::StrCat("tls.root_ca_file=", missing)},
      {"cert without key",
       [&](auto* o) {
         o->tls.enabled = true;
         o->tls.cert_file = pki_->client_cert;
       },
       "tls.cert_file="},
      {"unreadable key",
       [&](auto* o) {
         o->tls.enabled = true;
         o->tls.cert_file = pki_->client_cert;
         o->tls.key_file = missing;
       },
       absl::StrCat("tls.key_file=", missing)},
      {"TLS file without TLS", [&](auto* o) { o->tls.root_ca_file = pki_->ca; },
       "tls.enabled is false"},
      {"token with a space", [](auto* o) { o->auth_token = "two words"; }, "auth_token"},
  };
  for (const Case& c : cases) {
    gradclient::ClientOptions options;
    c.set(&options);
    absl::StatusOr<std::unique_ptr<gradclient::Client>> client =
        gradclient::Client::Create("127.0.0.1:1", options);
    EXPECT_EQ(client.status().code(), absl::StatusCode::kInvalidArgument) << c.what;
    EXPECT_THAT(client.status().message(), HasSubstr(c.message)) << c.what;
  }
}

}  // namespace
}  // namespace gradservicetest
