// gradctl against a real gradserver started with TLS, a token file and a plaintext health port:
// the TLS and token flags, $GRADCTL_AUTH_TOKEN, how refusals print, and probes on the health
// port. The gradserver binary comes from $GRADSERVER_BINARY (set by CTest).

#include <signal.h>
#include <unistd.h>

#include <filesystem>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/cli/gradctl_runner.h"
#include "tests/service/server_process.h"
#include "tests/service/test_pki.h"

namespace {

namespace fs = std::filesystem;
using ::gradclitest::GradctlRun;
using ::gradclitest::RunGradctl;
using ::gradservicetest::kFirstToken;
using ::gradservicetest::kSecondToken;
using ::testing::HasSubstr;
using ::testing::Not;

constexpr char kWrongToken[] = "wrong-token-0badf00d";

class GradctlSecurityTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = absl::StrCat(::testing::TempDir(), "/gradctl_security_test_", getpid());
    fs::remove_all(dir_);
    ASSERT_TRUE(gradservicetest::MakeTestPki(dir_ + "/pki", &pki_));
    const std::string binary = gradservicetest::GradserverBinary();
    ASSERT_FALSE(binary.empty()) << "GRADSERVER_BINARY is not set; run the test through ctest";
    ASSERT_TRUE(server_.Start(
        binary,
        {"--address=127.0.0.1:0", "--health_address=127.0.0.1:0", "--tls_cert=" + pki_.server_cert,
         "--tls_key=" + pki_.server_key, "--auth_token_file=" + pki_.token_file,
         "--threads_per_request=1", "--max_concurrent_requests=2"}));
    port_ = server_.WaitForPort(absl::Seconds(60));
    ASSERT_GT(port_, 0) << server_.Stderr();
    health_port_ = server_.WaitForPort(absl::Seconds(60), "gradserver health listening on ");
    ASSERT_GT(health_port_, 0) << server_.Stderr();
  }

  void TearDown() override {
    if (!HasFailure()) fs::remove_all(dir_);
  }

  // Runs gradctl with `args` and the environment assignments `env` (see RunGradctl).
  GradctlRun Gradctl(const std::vector<std::string>& args,
                     const std::vector<std::string>& env = {}) {
    return RunGradctl(dir_, args, env);
  }

  std::string ServerFlag() const { return absl::StrCat("--server=127.0.0.1:", port_); }
  std::string TlsCaFlag() const { return "--tls_ca=" + pki_.ca; }
  std::string TokenFlag() const { return "--auth_token_file=" + pki_.token_file; }

  std::string dir_;
  gradservicetest::TestPki pki_;
  gradservicetest::ServerProcess server_;
  int port_ = 0;
  int health_port_ = 0;
};

TEST_F(GradctlSecurityTest, TlsAndTokenFlagsReachTheService) {
  GradctlRun run = Gradctl({"info", ServerFlag(), TlsCaFlag(), TokenFlag()});
  EXPECT_EQ(run.exit_code, 0) << run;
  EXPECT_THAT(run.out, HasSubstr("TLS, bearer token required"));

  run = Gradctl({"info", "--json", ServerFlag(), TlsCaFlag(), TokenFlag()});
  EXPECT_EQ(run.exit_code, 0) << run;
  EXPECT_THAT(run.out, HasSubstr("\"security\":{\"tls\":true,\"client_certificates_required\":"
                                 "false,\"bearer_token_required\":true}"));

  // A computation over TLS with the token: the seed demo, checked against PyTorch.
  run = Gradctl({"demo", "conv1", ServerFlag(), "--tls", TlsCaFlag(), TokenFlag()});
  EXPECT_EQ(run.exit_code, 0) << run;
  EXPECT_THAT(run.out, HasSubstr("Matches PyTorch"));

  // The token from the environment (the file's second token, for rotation); the flag wins.
  run = Gradctl({"info", ServerFlag(), TlsCaFlag()},
                {absl::StrCat("GRADCTL_AUTH_TOKEN=", kSecondToken)});
  EXPECT_EQ(run.exit_code, 0) << run;
  run = Gradctl({"info", ServerFlag(), TlsCaFlag(), TokenFlag()},
                {absl::StrCat("GRADCTL_AUTH_TOKEN=", kWrongToken)});
  EXPECT_EQ(run.exit_code, 0) << run;

  // The certificate names localhost; --tls_server_name checks against it when connecting by IP.
  run = Gradctl({"info", ServerFlag(), TlsCaFlag(), TokenFlag(), "--tls_server_name=localhost"});
  EXPECT_EQ(run.exit_code, 0) << run;
}

TEST_F(GradctlSecurityTest, RefusalsPrintLikeOtherErrors) {
  GradctlRun run = Gradctl({"info", ServerFlag(), TlsCaFlag()});
  EXPECT_EQ(run.exit_code, 1) << run;
  EXPECT_THAT(run.err, HasSubstr("gradctl: UNAUTHENTICATED: "));
  EXPECT_THAT(run.err, HasSubstr("requires a bearer token"));

  run = Gradctl({"info", ServerFlag(), TlsCaFlag()},
                {absl::StrCat("GRADCTL_AUTH_TOKEN=", kWrongToken)});
  EXPECT_EQ(run.exit_code, 1) << run;
  EXPECT_THAT(run.err, HasSubstr("gradctl: UNAUTHENTICATED: "));
  EXPECT_THAT(run.err, Not(HasSubstr(kWrongToken)));

  // Plaintext to the TLS port, and TLS trusting the wrong CA: the handshake fails.
  run = Gradctl({"info", ServerFlag(), TokenFlag(), "--timeout=3s"});
  EXPECT_EQ(run.exit_code, 1) << run;
  EXPECT_THAT(run.err, HasSubstr("gradctl: UNAVAILABLE: "));
  run = Gradctl({"info", ServerFlag(), "--tls_ca=" + pki_.other_ca, TokenFlag(), "--timeout=3s"});
  EXPECT_EQ(run.exit_code, 1) << run;
  EXPECT_THAT(run.err, HasSubstr("gradctl: UNAVAILABLE: "));

  run = Gradctl({"info", ServerFlag(), "--tls_ca=" + dir_ + "/missing.pem", TokenFlag()});
  EXPECT_EQ(run.exit_code, 1) << run;
  EXPECT_THAT(run.err, HasSubstr("tls.root_ca_file=" + dir_ + "/missing.pem"));
  run = Gradctl({"info", ServerFlag(), TlsCaFlag(), "--auth_token_file=" + dir_ + "/missing"});
  EXPECT_EQ(run.exit_code, 1) << run;
  EXPECT_THAT(run.err, HasSubstr("--auth_token_file=" + dir_ + "/missing"));

  // The server still serves, and its log names the refusals but no token.
  run = Gradctl({"info", ServerFlag(), TlsCaFlag(), TokenFlag()});
  EXPECT_EQ(run.exit_code, 0) << run;
  EXPECT_THAT(run.out, HasSubstr("2 unauthenticated"));
  const std::string log = server_.Stderr();
  EXPECT_THAT(log, HasSubstr("code=UNAUTHENTICATED"));
  for (const char* secret : {kFirstToken, kSecondToken, kWrongToken}) {
    EXPECT_THAT(log, Not(HasSubstr(secret)));
  }
}

TEST_F(GradctlSecurityTest, HealthPortAnswersProbesInPlaintext) {
  GradctlRun run = Gradctl({"health", absl::StrCat("--server=127.0.0.1:", health_port_)});
  EXPECT_EQ(run.exit_code, 0) << run;
  EXPECT_EQ(run.out, "SERVING\n");
  // The main port answers health without a token too, but only over TLS.
  run = Gradctl({"health", ServerFlag(), TlsCaFlag()});
  EXPECT_EQ(run.exit_code, 0) << run;
  // The health port serves nothing else.
  run = Gradctl({"info", absl::StrCat("--server=127.0.0.1:", health_port_), TokenFlag()});
  EXPECT_EQ(run.exit_code, 1) << run;
  EXPECT_THAT(run.err, HasSubstr("gradctl: UNIMPLEMENTED"));

  server_.Signal(SIGTERM);
  EXPECT_EQ(server_.WaitForExit(absl::Seconds(60)), 0) << server_.Stderr();
}

}  // namespace
