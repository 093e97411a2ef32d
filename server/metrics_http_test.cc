#include "server/metrics_http.h"

#include <httplib.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/metrics.h"

namespace gradserver {
namespace {

using ::testing::HasSubstr;

std::unique_ptr<MetricsHttpServer> StartOrDie(const std::string& address, const Metrics* metrics) {
  absl::StatusOr<std::unique_ptr<MetricsHttpServer>> server =
      MetricsHttpServer::Create("metrics_address", address, metrics);
  EXPECT_TRUE(server.ok()) << server.status();
  return server.ok() ? *std::move(server) : nullptr;
}

TEST(MetricsHttpServerTest, ServesTheRegistryAtMetricsAndNothingElse) {
  Metrics metrics;
  int value = 1;
  metrics.AddGauge("test_value", "A value.", [&] { return value; });
  std::unique_ptr<MetricsHttpServer> server = StartOrDie("127.0.0.1:0", &metrics);
  ASSERT_NE(server, nullptr);
  ASSERT_GT(server->port(), 0);

  httplib::Client client("127.0.0.1", server->port());
  httplib::Result response = client.Get("/metrics");
  ASSERT_TRUE(response) << httplib::to_string(response.error());
  EXPECT_EQ(response->status, 200);
  EXPECT_EQ(response->get_header_value("Content-Type"), kMetricsContentType);
  EXPECT_EQ(response->body, metrics.Render());
  // Each scrape renders afresh.
  value = 2;
  response = client.Get("/metrics");
  ASSERT_TRUE(response) << httplib::to_string(response.error());
  EXPECT_THAT(response->body, HasSubstr("\ntest_value 2\n"));

  for (const char* path : {"/", "/metrics/", "/metricsx", "/health", "/metrics/../x"}) {
    SCOPED_TRACE(path);
    response = client.Get(path);
    ASSERT_TRUE(response) << httplib::to_string(response.error());
    EXPECT_EQ(response->status, 404);
    EXPECT_THAT(response->body, HasSubstr("/metrics"));
  }
  response = client.Post("/metrics", "x", "text/plain");
  ASSERT_TRUE(response) << httplib::to_string(response.error());
  EXPECT_NE(response->status, 200);
}

TEST(MetricsHttpServerTest, ATakenPortIsUnavailableNamingTheOption) {
  Metrics metrics;
  std::unique_ptr<MetricsHttpServer> first = StartOrDie("127.0.0.1:0", &metrics);
  ASSERT_NE(first, nullptr);
  const std::string address = absl::StrCat("127.0.0.1:", first->port());
  absl::StatusOr<std::unique_ptr<MetricsHttpServer>> second =
      MetricsHttpServer::Create("metrics_address", address, &metrics);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(second.status().message(), HasSubstr("metrics_address=\"" + address + "\""));
}

TEST(MetricsHttpServerTest, AnAddressThatIsNotHostPortIsInvalid) {
  Metrics metrics;
  for (const char* address : {"", "127.0.0.1", ":9100", "127.0.0.1:", "127.0.0.1:http",
                              "127.0.0.1:65536", "127.0.0.1:-1", "unix:/tmp/metrics.sock"}) {
    SCOPED_TRACE(address);
    absl::StatusOr<std::unique_ptr<MetricsHttpServer>> server =
        MetricsHttpServer::Create("metrics_address", address, &metrics);
    ASSERT_FALSE(server.ok());
    EXPECT_EQ(server.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(server.status().message(),
                HasSubstr(absl::StrCat("metrics_address=\"", address, "\" is not HOST:PORT")));
  }
}

TEST(MetricsHttpServerTest, ServesIpv6WithBrackets) {
  Metrics metrics;
  absl::StatusOr<std::unique_ptr<MetricsHttpServer>> server =
      MetricsHttpServer::Create("metrics_address", "[::1]:0", &metrics);
  if (!server.ok()) GTEST_SKIP() << "no IPv6 loopback here: " << server.status();
  httplib::Client client("::1", (*server)->port());
  httplib::Result response = client.Get("/metrics");
  ASSERT_TRUE(response) << httplib::to_string(response.error());
  EXPECT_EQ(response->status, 200);
}

// A connection that never sends its request holds Stop() back about a second at most, and
// after Stop() the port refuses connections.
TEST(MetricsHttpServerTest, StopIsPromptAndIdempotent) {
  Metrics metrics;
  std::unique_ptr<MetricsHttpServer> server = StartOrDie("127.0.0.1:0", &metrics);
  ASSERT_NE(server, nullptr);
  const int port = server->port();
  const int idle = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(idle, 0);
  sockaddr_in address = {};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(port));
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(connect(idle, reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0);

  const auto start = std::chrono::steady_clock::now();
  server->Stop();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(seconds, 2.5);
  server->Stop();
  close(idle);

  httplib::Client client("127.0.0.1", port);
  client.set_connection_timeout(2);
  EXPECT_FALSE(client.Get("/metrics"));
}

}  // namespace
}  // namespace gradserver
