// One full training step (forward, MSE, backward with every gradient) per iteration, reported
// with GFLOP/s over the three passes (forward, backward-data, backward-weights).
//
//   build/tests/bench/engine_bench [--benchmark_filter=resblock] [--threads=N] [--no_winograd]

#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#include "benchmark/benchmark.h"
#include "gradclient/workloads.h"
#include "gradengine/engine.h"

namespace {

int g_threads = 0;
bool g_winograd = true;

void BM_TrainingStep(benchmark::State& state, const std::string& name) {
  absl::StatusOr<gradclient::Workload> made = gradclient::MakeWorkload(name);
  if (!made.ok()) {
    state.SkipWithError(std::string(made.status().message()).c_str());
    return;
  }
  const gradclient::Workload& workload = *made;
  gradengine::EngineOptions options;
  options.threads_per_call = g_threads;
  options.winograd = g_winograd;
  std::unique_ptr<gradengine::Engine> engine = *gradengine::Engine::Create(options);
  const gradengine::GradientRequest request = workload.Request();
  // The first call compiles the plan; steady-state steps are what is timed.
  if (absl::Status s = engine->ComputeGradients(request).status(); !s.ok()) {
    state.SkipWithError(std::string(s.message()).c_str());
    return;
  }
  for (auto _ : state) {
    auto result = engine->ComputeGradients(request);
    benchmark::DoNotOptimize(result);
  }
  state.counters["GFLOP/s"] = benchmark::Counter(3.0 * workload.flops_per_pass * 1e-9,
                                                 benchmark::Counter::kIsIterationInvariantRate);
  state.counters["threads"] = engine->info().threads_per_call;
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--threads=", 10) == 0) g_threads = std::atoi(argv[i] + 10);
    if (std::strcmp(argv[i], "--no_winograd") == 0) g_winograd = false;
  }
  for (const std::string& name : gradclient::WorkloadNames()) {
    benchmark::RegisterBenchmark(name.c_str(), BM_TrainingStep, name)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
  }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
