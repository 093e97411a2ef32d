#include "server/metrics.h"

#include <cmath>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace gradserver {
namespace {

using ::testing::HasSubstr;

TEST(MetricsTest, RendersTheExpositionFormatExactly) {
  Metrics metrics;
  CounterFamily* requests = metrics.AddCounterFamily(
      "test_requests_total", "Requests by method and code.\nA \\ and a \" in help.",
      {"method", "code"});
  requests->WithLabels({"Get", "OK"})->Increment(3);
  requests->WithLabels({"Get", "NOT_FOUND"})->Increment();
  requests->WithLabels({"we\"ird\\name\n", "OK"})->Increment(2);
  metrics.AddCounterFamily("test_unused_total", "No series yet.", {"method"});
  metrics.AddCounterFamily("test_plain_total", "No labels.", {})->WithLabels({})->Increment(5);

  HistogramFamily* latency =
      metrics.AddHistogramFamily("test_latency_seconds", "Latency.", {"method"}, {0.001, 0.5, 2});
  Histogram* get = latency->WithLabels({"Get"});
  get->Observe(0.0009765625);  // 2^-10, exact in binary, so the sum below is exact too
  get->Observe(0.5);           // on a bound: counted in le="0.5"
  get->Observe(1.5);
  get->Observe(100);  // past the last bound: only +Inf
  latency->WithLabels({"Put"});

  metrics.AddGauge("test_queue_length", "Queued now.", [] { return 7; });
  metrics.AddGauge("test_info", "Build.", {{"version", "1.2"}, {"isa", "avx2"}}, [] { return 1; });
  metrics.AddCounterCallback("test_hits_total", "Hits elsewhere.", [] { return 4294967296.0; });

  EXPECT_EQ(metrics.Render(),
            R"(# HELP test_requests_total Requests by method and code.\nA \\ and a " in help.
# TYPE test_requests_total counter
test_requests_total{method="Get",code="NOT_FOUND"} 1
test_requests_total{method="Get",code="OK"} 3
test_requests_total{method="we\"ird\\name\n",code="OK"} 2
# HELP test_unused_total No series yet.
# TYPE test_unused_total counter
# HELP test_plain_total No labels.
# TYPE test_plain_total counter
test_plain_total 5
# HELP test_latency_seconds Latency.
# TYPE test_latency_seconds histogram
test_latency_seconds_bucket{method="Get",le="0.001"} 1
test_latency_seconds_bucket{method="Get",le="0.5"} 2
test_latency_seconds_bucket{method="Get",le="2"} 3
test_latency_seconds_bucket{method="Get",le="+Inf"} 4
test_latency_seconds_sum{method="Get"} 102.0009765625
test_latency_seconds_count{method="Get"} 4
test_latency_seconds_bucket{method="Put",le="0.001"} 0
test_latency_seconds_bucket{method="Put",le="0.5"} 0
test_latency_seconds_bucket{method="Put",le="2"} 0
test_latency_seconds_bucket{method="Put",le="+Inf"} 0
test_latency_seconds_sum{method="Put"} 0
test_latency_seconds_count{method="Put"} 0
# HELP test_queue_length Queued now.
# TYPE test_queue_length gauge
test_queue_length 7
# HELP test_info Build.
# TYPE test_info gauge
test_info{version="1.2",isa="avx2"} 1
# HELP test_hits_total Hits elsewhere.
# TYPE test_hits_total counter
test_hits_total 4294967296
)");
}

TEST(MetricsTest, GaugesAreReadAtEachRender) {
  Metrics metrics;
  double value = 1;
  metrics.AddGauge("test_value", "A value.", [&] { return value; });
  EXPECT_THAT(metrics.Render(), HasSubstr("\ntest_value 1\n"));
  value = 2.5;
  EXPECT_THAT(metrics.Render(), HasSubstr("\ntest_value 2.5\n"));
}

TEST(MetricsTest, FormatsSpecialAndFractionalValuesAsPrometheusReadsThem) {
  Metrics metrics;
  const std::vector<std::pair<double, std::string>> cases = {
      {std::numeric_limits<double>::quiet_NaN(), "NaN"},
      {std::numeric_limits<double>::infinity(), "+Inf"},
      {-std::numeric_limits<double>::infinity(), "-Inf"},
      {0.1, "0.1"},
      {-2.5, "-2.5"},
      {1e-7, "1e-07"},
      {1e21, "1e+21"},
      {123456789012.0, "123456789012"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const double value = cases[i].first;
    metrics.AddGauge("test_value", "Values.", {{"case", absl::StrCat(i)}},
                     [value] { return value; });
  }
  const std::string text = metrics.Render();
  for (size_t i = 0; i < cases.size(); ++i) {
    EXPECT_THAT(text,
                HasSubstr(absl::StrCat("test_value{case=\"", i, "\"} ", cases[i].second, "\n")));
  }
}

TEST(MetricsTest, LatencyBucketsRenderAsPlainDecimals) {
  Metrics metrics;
  metrics.AddHistogramFamily("test_seconds", "Latency.", {}, LatencyBucketsSeconds())
      ->WithLabels({})
      ->Observe(0.003);
  const std::string text = metrics.Render();
  std::vector<std::string> bounds;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    const size_t at = line.find("le=\"");
    if (at == absl::string_view::npos) continue;
    bounds.emplace_back(line.substr(at + 4, line.find('"', at + 4) - at - 4));
  }
  EXPECT_THAT(bounds, ::testing::ElementsAre("0.0001", "0.00025", "0.0005", "0.001", "0.0025",
                                             "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5",
                                             "1", "2.5", "5", "10", "30", "60", "+Inf"));
  EXPECT_THAT(text, HasSubstr("test_seconds_bucket{le=\"0.0025\"} 0\n"));
  EXPECT_THAT(text, HasSubstr("test_seconds_bucket{le=\"0.005\"} 1\n"));
}

TEST(MetricsTest, AddingAFamilyAgainReturnsTheSameOne) {
  Metrics metrics;
  CounterFamily* first = metrics.AddCounterFamily("test_total", "Help.", {"a"});
  CounterFamily* second = metrics.AddCounterFamily("test_total", "Help.", {"a"});
  EXPECT_EQ(first, second);
  EXPECT_EQ(first->WithLabels({"x"}), second->WithLabels({"x"}));
  HistogramFamily* h1 = metrics.AddHistogramFamily("test_seconds", "Help.", {}, {1, 2});
  EXPECT_EQ(h1, metrics.AddHistogramFamily("test_seconds", "Help.", {}, {1, 2}));
}

TEST(MetricsDeathTest, ProgrammingErrorsAbortNamingTheMetric) {
  Metrics metrics;
  EXPECT_DEATH(metrics.AddCounterFamily("1bad", "Help.", {}), "metric 1bad: not a valid");
  EXPECT_DEATH(metrics.AddCounterFamily("test_total", "Help.", {"__reserved"}),
               "metric test_total: label name \"__reserved\"");
  EXPECT_DEATH(metrics.AddHistogramFamily("test_seconds", "Help.", {"le"}, {1}), "label named le");
  EXPECT_DEATH(metrics.AddHistogramFamily("test_seconds", "Help.", {}, {2, 1}),
               "strictly increasing");
  CounterFamily* family = metrics.AddCounterFamily("test_total", "Help.", {"a", "b"});
  EXPECT_DEATH(family->WithLabels({"x"}), "metric test_total: 1 label values for the 2");
  EXPECT_DEATH(metrics.AddCounterFamily("test_total", "Other help.", {"a", "b"}),
               "metric test_total: added twice");
  EXPECT_DEATH(metrics.AddGauge("test_total", "Help.", [] { return 0; }),
               "metric test_total: added twice");
  metrics.AddGauge("test_gauge", "Help.", {{"a", "1"}}, [] { return 0; });
  EXPECT_DEATH(metrics.AddGauge("test_gauge", "Help.", {{"a", "1"}}, [] { return 0; }),
               "added twice");
}

// Many threads record at once while another renders; nothing is lost.
TEST(MetricsTest, RecordingFromManyThreadsLosesNothing) {
  Metrics metrics;
  CounterFamily* counters = metrics.AddCounterFamily("test_total", "Help.", {"thread_kind"});
  HistogramFamily* histograms =
      metrics.AddHistogramFamily("test_seconds", "Help.", {}, LatencyBucketsSeconds());
  constexpr int kThreads = 8;
  constexpr int kPerThread = 20000;
  std::atomic<bool> done{false};
  std::thread renderer([&] {
    while (!done.load()) {
      const std::string text = metrics.Render();
      ASSERT_THAT(text, HasSubstr("# TYPE test_seconds histogram"));
    }
  });
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        // Half the threads share one series, the others each find their own: the lookups and
        // the first-use insertions race too.
        counters->WithLabels({t % 2 == 0 ? "shared" : absl::StrCat("own", t)})->Increment();
        histograms->WithLabels({})->Observe(0.25);
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  done = true;
  renderer.join();
  EXPECT_EQ(counters->WithLabels({"shared"})->value(), kThreads / 2 * kPerThread);
  EXPECT_EQ(counters->WithLabels({"own1"})->value(), kPerThread);
  const Histogram::Snapshot snapshot = histograms->WithLabels({})->Read();
  EXPECT_EQ(snapshot.count, kThreads * kPerThread);
  EXPECT_EQ(snapshot.sum, 0.25 * kThreads * kPerThread);  // exact: multiples of 2^-2
}

}  // namespace
}  // namespace gradserver
