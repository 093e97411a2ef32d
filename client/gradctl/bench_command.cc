// gradctl bench: a closed-loop load generator.
//
// `concurrency` threads share one Client and each sends the workload's ComputeGradients
// request, waits for the reply and sends the next, until the duration has passed or the
// requests are spent. One untimed request first warms the server up (its plan for the
// workload is compiled on first use). Latency is measured on the client around each call,
// retries included; the percentiles and the throughput count successful calls only, and
// failed ones are counted by status code. With --verify every reply is also compared with the
// warm-up reply, and one that differs counts as failed (DATA_LOSS).

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <iostream>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/gradctl/cli_util.h"
#include "client/gradctl/commands.h"
#include "gradclient/client.h"
#include "gradclient/workloads.h"
#include "gradengine/network.h"
#include "gradengine/tensor.h"

namespace gradctl {
namespace {

constexpr int kMaxConcurrency = 1024;
constexpr absl::Duration kDefaultDuration = absl::Seconds(10);
constexpr absl::Duration kProgressInterval = absl::Milliseconds(250);
// --verify: how far a reply may be from the warm-up reply, relative to the largest magnitude
// of the warm-up tensor (at least 1). Identical servers answer identical requests bit for bit;
// this leaves room for replicas on CPUs whose oneDNN kernels sum in another order.
constexpr double kVerifyTolerance = 1e-4;

// OK if `actual` is within kVerifyTolerance of `expected`; DataLoss naming `what` otherwise.
absl::Status CompareTensor(const std::string& what, const gradengine::Tensor& actual,
                           const gradengine::Tensor& expected) {
  if (actual.shape != expected.shape || actual.data.size() != expected.data.size()) {
    return absl::DataLossError(
        absl::StrCat(what, " has shape ", gradengine::ShapeToString(actual.shape),
                     ", the warm-up reply ", gradengine::ShapeToString(expected.shape)));
  }
  double scale = 1.0;
  for (float value : expected.data) scale = std::max(scale, std::abs(static_cast<double>(value)));
  for (size_t i = 0; i < actual.data.size(); ++i) {
    const double diff = std::abs(static_cast<double>(actual.data[i]) - expected.data[i]);
    if (!(diff <= kVerifyTolerance * scale) &&
        !(std::isnan(actual.data[i]) && std::isnan(expected.data[i]))) {
      return absl::DataLossError(absl::StrCat(what, "[", i, "] = ", actual.data[i],
                                              " differs from the warm-up reply's ",
                                              expected.data[i]));
    }
  }
  return absl::OkStatus();
}

absl::Status CompareResults(const gradengine::ForwardResult& actual,
                            const gradengine::ForwardResult& expected) {
  return CompareTensor("output", actual.output, expected.output);
}

absl::Status CompareResults(const gradengine::GradientResult& actual,
                            const gradengine::GradientResult& expected) {
  if (absl::Status s = CompareTensor("output", actual.output, expected.output); !s.ok()) return s;
  if (actual.loss.has_value() != expected.loss.has_value() ||
      (expected.loss.has_value() &&
       !(std::abs(*actual.loss - *expected.loss) <=
         kVerifyTolerance * std::max(1.0, std::abs(*expected.loss))))) {
    return absl::DataLossError(absl::StrCat("loss = ", actual.loss.value_or(NAN),
                                            " differs from the warm-up reply's ",
                                            expected.loss.value_or(NAN)));
  }
  if (actual.input_grad.has_value() != expected.input_grad.has_value()) {
    return absl::DataLossError("input_grad is missing from one of the replies");
  }
  if (expected.input_grad.has_value()) {
    if (absl::Status s = CompareTensor("input_grad", *actual.input_grad, *expected.input_grad);
        !s.ok()) {
      return s;
    }
  }
  for (const auto& [name, grad] : expected.parameter_grads) {
    const auto found = actual.parameter_grads.find(name);
    if (found == actual.parameter_grads.end()) {
      return absl::DataLossError(absl::StrCat(name, " gradient is missing"));
    }
    if (absl::Status s = CompareTensor(absl::StrCat(name, " gradient"), found->second, grad);
        !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

// What the threads record, merged under `mu`.
struct Tally {
  absl::Mutex mu;
  std::vector<double> latencies_ms ABSL_GUARDED_BY(mu);  // successful calls
  std::map<absl::StatusCode, int64_t> errors ABSL_GUARDED_BY(mu);
  absl::Status first_error ABSL_GUARDED_BY(mu);
};

struct Report {
  std::string workload;
  std::string method;  // "gradients" or "forward"
  int concurrency = 0;
  int shards = 1;
  bool verify = false;
  bool skip_output = false;
  absl::Duration elapsed;
  int64_t ok = 0;
  int64_t failed = 0;
  double throughput = 0;                      // successful calls per second
  double p50 = 0, p90 = 0, p99 = 0, max = 0;  // ms
  std::map<absl::StatusCode, int64_t> errors;
  absl::Status first_error;
};

// The nearest-rank percentile of sorted values; 0 for none.
double Percentile(const std::vector<double>& sorted, double percent) {
  if (sorted.empty()) return 0;
  const size_t rank = static_cast<size_t>(std::ceil(percent / 100.0 * sorted.size()));
  return sorted[std::clamp<size_t>(rank, 1, sorted.size()) - 1];
}

void PrintReport(const Report& report, bool json) {
  if (json) {
    std::vector<std::string> errors;
    for (const auto& [code, count] : report.errors) {
      errors.push_back(absl::StrCat(JsonString(absl::StatusCodeToString(code)), ":", count));
    }
    std::cout << "{\"workload\":" << JsonString(report.workload)
              << ",\"method\":" << JsonString(report.method)
              << ",\"concurrency\":" << report.concurrency
              << ",\"skip_output\":" << (report.skip_output ? "true" : "false")
              << ",\"shards\":" << report.shards
              << ",\"verify\":" << (report.verify ? "true" : "false") << ",\"duration_s\":"
              << absl::StrFormat("%.3f", absl::ToDoubleSeconds(report.elapsed))
              << ",\"requests\":" << report.ok + report.failed << ",\"ok\":" << report.ok
              << ",\"failed\":" << report.failed
              << ",\"throughput_rps\":" << absl::StrFormat("%.2f", report.throughput)
              << ",\"latency_ms\":{"
              << absl::StrFormat("\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,\"max\":%.3f", report.p50,
                                 report.p90, report.p99, report.max)
              << "},\"errors\":{" << absl::StrJoin(errors, ",") << "}}\n";
    return;
  }
  std::cout << absl::StrFormat(
      "workload      %s (%s), concurrency %d%s%s%s\n", report.workload, report.method,
      report.concurrency, report.skip_output ? ", skip_output" : "",
      report.shards > 1 ? absl::StrCat(", ", report.shards, " shards") : "",
      report.verify ? ", verified" : "");
  std::cout << absl::StrFormat("requests      %d in %.2f s: %d ok, %d failed\n",
                               report.ok + report.failed, absl::ToDoubleSeconds(report.elapsed),
                               report.ok, report.failed);
  std::cout << absl::StrFormat("throughput    %.1f req/s\n", report.throughput);
  std::cout << absl::StrFormat("latency (ms)  p50 %.3f  p90 %.3f  p99 %.3f  max %.3f\n", report.p50,
                               report.p90, report.p99, report.max);
  std::vector<std::string> errors;
  for (const auto& [code, count] : report.errors) {
    errors.push_back(absl::StrCat(absl::StatusCodeToString(code), " ", count));
  }
  std::cout << "errors        " << (errors.empty() ? "none" : absl::StrJoin(errors, ", ")) << "\n";
}

absl::Status CheckOptions(const BenchOptions& options) {
  if (options.concurrency < 1 || options.concurrency > kMaxConcurrency) {
    return UsageError(absl::StrCat("--concurrency=", options.concurrency, " is out of range 1..",
                                   kMaxConcurrency));
  }
  if (options.duration.has_value() && options.requests.has_value()) {
    return UsageError("give --duration or --requests, not both");
  }
  if (options.duration.has_value() && *options.duration <= absl::ZeroDuration()) {
    return UsageError(
        absl::StrCat("--duration=", absl::FormatDuration(*options.duration), " must be positive"));
  }
  if (options.requests.has_value() && *options.requests < 1) {
    return UsageError(absl::StrCat("--requests=", *options.requests, " must be positive"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status RunBench(const BenchOptions& options) {
  if (absl::Status s = CheckOptions(options); !s.ok()) return s;
  absl::StatusOr<gradclient::Workload> workload = gradclient::MakeWorkload(options.workload);
  if (!workload.ok()) return UsageError(absl::StrCat("--", workload.status().message()));
  absl::StatusOr<std::unique_ptr<gradclient::Client>> client = Connect(options.connection);
  if (!client.ok()) return client.status();
  if (options.forward && options.skip_output) {
    return UsageError("--skip_output applies to --method=gradients only");
  }
  if (options.shards < 1 || options.shards > gradclient::kMaxShards) {
    return UsageError(
        absl::StrCat("--shards=", options.shards, " is out of range 1..", gradclient::kMaxShards));
  }
  gradengine::GradientRequest request = workload->Request();
  gradengine::ForwardRequest forward_request = workload->ForwardOnly();
  gradclient::CallOptions call;
  call.skip_output = options.skip_output;
  call.shards = options.shards;
  // With --shared_memory, each thread's results go to a place of their own in the region
  // (thread -1 is the warm-up).
  StagedRequest staged;
  if (options.shared_memory) {
    if (options.shards > 1) return UsageError("--shared_memory does not go with --shards");
    // Forward workloads share the gradient request's network, parameters and input.
    absl::StatusOr<StagedRequest> made =
        StageInSharedMemory(**client, &request, options.concurrency + 1);
    if (!made.ok()) return made.status();
    staged = *std::move(made);
    forward_request.parameters = request.parameters;
    forward_request.input = request.input;
    call.result_region = staged.region;
  }
  // The warm-up reply, which --verify compares every later one with.
  gradengine::ForwardResult forward_expected;
  gradengine::GradientResult gradient_expected;
  bool warm = false;
  auto send = [&](int thread) -> absl::Status {
    gradclient::CallOptions call_here = call;
    if (options.shared_memory) call_here.result_offset = staged.ResultOffset(thread + 1);
    const gradclient::CallOptions& call = call_here;
    if (options.forward) {
      absl::StatusOr<gradclient::ForwardReply> reply = (*client)->Forward(forward_request, call);
      if (!reply.ok()) return reply.status();
      if (!warm) forward_expected = std::move(reply->result);
      if (!warm || !options.verify) return absl::OkStatus();
      return CompareResults(reply->result, forward_expected);
    }
    absl::StatusOr<gradclient::GradientReply> reply = (*client)->ComputeGradients(request, call);
    if (!reply.ok()) return reply.status();
    if (!warm) gradient_expected = std::move(reply->result);
    if (!warm || !options.verify) return absl::OkStatus();
    return CompareResults(reply->result, gradient_expected);
  };

  if (absl::Status s = send(-1); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat("warm-up request: ", s.message()));
  }
  warm = true;

  Tally tally;
  std::atomic<int64_t> issued{0};
  std::atomic<int64_t> completed{0};
  std::atomic<int64_t> failed{0};
  std::atomic<int> running{options.concurrency};
  // When the last thread finished, for the elapsed time: the progress loop below wakes up to
  // kProgressInterval later.
  std::atomic<int64_t> last_finish_ns{0};
  const auto start = std::chrono::steady_clock::now();
  const auto end = start + absl::ToChronoNanoseconds(options.duration.value_or(kDefaultDuration));

  auto issue_requests = [&](int thread) {
    std::vector<double> latencies_ms;
    std::map<absl::StatusCode, int64_t> errors;
    absl::Status first_error;
    while (true) {
      if (options.requests.has_value()) {
        if (issued.fetch_add(1) >= *options.requests) break;
      } else if (std::chrono::steady_clock::now() >= end) {
        break;
      }
      const auto call_start = std::chrono::steady_clock::now();
      absl::Status status = send(thread);
      const auto call_end = std::chrono::steady_clock::now();
      completed.fetch_add(1, std::memory_order_relaxed);
      if (status.ok()) {
        latencies_ms.push_back(
            std::chrono::duration<double, std::milli>(call_end - call_start).count());
      } else {
        failed.fetch_add(1, std::memory_order_relaxed);
        ++errors[status.code()];
        if (first_error.ok()) first_error = status;
      }
    }
    absl::MutexLock lock(&tally.mu);
    tally.latencies_ms.insert(tally.latencies_ms.end(), latencies_ms.begin(), latencies_ms.end());
    for (const auto& [code, count] : errors) tally.errors[code] += count;
    if (tally.first_error.ok()) tally.first_error = first_error;
    const int64_t finish_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                                  std::chrono::steady_clock::now() - start)
                                  .count();
    int64_t latest = last_finish_ns.load();
    while (finish_ns > latest && !last_finish_ns.compare_exchange_weak(latest, finish_ns)) {
    }
    running.fetch_sub(1);
  };

  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(options.concurrency));
  for (int i = 0; i < options.concurrency; ++i) threads.emplace_back(issue_requests, i);
  while (running.load() > 0) {
    absl::SleepFor(kProgressInterval);
    if (!options.progress) continue;
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const int64_t done = completed.load(std::memory_order_relaxed);
    std::fprintf(stderr, "\r%6.1f s  %lld requests  %.1f req/s  %lld failed   ", seconds,
                 static_cast<long long>(done), seconds > 0 ? done / seconds : 0.0,
                 static_cast<long long>(failed.load(std::memory_order_relaxed)));
    std::fflush(stderr);
  }
  for (std::thread& thread : threads) thread.join();
  if (options.progress) std::fprintf(stderr, "\r%70s\r", "");

  Report report;
  report.workload = options.workload;
  report.method = options.forward ? "forward" : "gradients";
  report.concurrency = options.concurrency;
  report.skip_output = options.skip_output;
  report.shards = options.shards;
  report.verify = options.verify;
  report.elapsed = absl::Nanoseconds(last_finish_ns.load());
  {
    absl::MutexLock lock(&tally.mu);
    std::sort(tally.latencies_ms.begin(), tally.latencies_ms.end());
    report.ok = static_cast<int64_t>(tally.latencies_ms.size());
    report.p50 = Percentile(tally.latencies_ms, 50);
    report.p90 = Percentile(tally.latencies_ms, 90);
    report.p99 = Percentile(tally.latencies_ms, 99);
    report.max = tally.latencies_ms.empty() ? 0 : tally.latencies_ms.back();
    report.errors = tally.errors;
    report.first_error = tally.first_error;
  }
  for (const auto& [code, count] : report.errors) report.failed += count;
  const double seconds = absl::ToDoubleSeconds(report.elapsed);
  report.throughput = seconds > 0 ? report.ok / seconds : 0;
  PrintReport(report, options.json);

  if (report.failed > 0) {
    return absl::Status(
        report.first_error.code(),
        absl::StrCat(report.failed, " of ", report.ok + report.failed,
                     " requests failed; the first: ", report.first_error.message()));
  }
  return absl::OkStatus();
}

}  // namespace gradctl
