// The compute engine: forward and backward passes of CNNs (network.h: convolutions,
// activations, pooling, batch norm, linear layers, residual adds) on the CPU, implemented with
// oneDNN.
//
// Thread safety: an Engine is safe for concurrent use from any number of threads without
// external synchronization, and concurrent calls give exactly the results serial calls
// would. Compiled primitives are cached per (network, input shape, requested work) and shared
// across calls; each call has its own activations and scratchpad.
//
// Threading: each call runs oneDNN's OpenMP-parallel kernels on the calling thread's OpenMP
// team with up to EngineOptions::threads_per_call threads; networks too small to gain from
// more (under about 64 MFLOP of work per thread) use fewer. The caller's own OpenMP setting is
// restored before a call returns. Callers that run many calls at once should lower
// threads_per_call so that calls x threads does not exceed the cores.
//
// Errors: malformed specs, shapes and parameters are InvalidArgument with a message that names
// the layer index, field and value; tensors over Options::max_elements are ResourceExhausted;
// failures inside oneDNN are Internal. No exception leaves the engine. NaN and Inf inputs are
// computed through, as PyTorch does; channel counts that are not a multiple of oneDNN's block
// make no difference (the block's padding is kept at zero where a convolution would multiply
// it). One difference remains: a convolution's spatial zero padding is skipped, not multiplied,
// so where PyTorch computes Inf x 0 with it (a weight gradient next to an Inf, say) and gets
// NaN, the engine gives the Inf.
//
// Memory: every call reserves its workspace and its results from EngineOptions::memory_budget
// before it allocates them, waiting there if the budget is in use (ResourceExhausted if it
// never fits, or if the wait runs out). A result tensor the engine allocates holds its share
// of the reservation until the last copy of its buffer is gone, so results still being sent
// count. Compiled plans and their idle workspaces are the budget's cached memory: bounded by
// max_plan_cache_bytes, and given up, least recently used first, when a reservation needs room.

#ifndef GRADENGINE_ENGINE_H_
#define GRADENGINE_ENGINE_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "gradengine/memory_budget.h"
#include "gradengine/network.h"
#include "gradengine/tensor.h"

namespace gradengine {

struct EngineOptions {
  // Most OpenMP threads a call uses. Default: 0 = all the process may use
  // (omp_get_max_threads() when the Engine is created).
  int threads_per_call = 0;
  // Upper bound on the elements of any one tensor (input, parameter, activation, gradient).
  // Default: 2^30 (4 GiB of float32).
  int64_t max_elements = int64_t{1} << 30;
  // Upper bound on one call's intermediate buffers (every activation and gradient between
  // layers, in oneDNN's layouts); networks needing more are ResourceExhausted. Default: 8 GiB.
  int64_t max_workspace_bytes = int64_t{8} << 30;
  // Compute dense 3x3 stride-1 convolutions with symmetric padding and at least
  // `winograd_min_channels` input and output channels with oneDNN's Winograd F(4x4, 3x3)
  // kernels where it has them (AVX-512 CPUs). They need about half the arithmetic of direct
  // convolution at a small cost in rounding error, far inside the 1e-4 relative tolerance the
  // tests hold the engine to. Asymmetric padding is excluded: oneDNN 2.6.3's Winograd
  // backward-data pass gives wrong input gradients for it. Default: true, 32.
  bool winograd = true;
  int64_t winograd_min_channels = 32;
  // Compiled plans kept for reuse; least recently used ones are dropped past this.
  // Default: 64.
  int max_cached_plans = 64;
  // Bytes the cached plans may hold, their idle workspaces included; least recently used ones
  // are dropped past this. Default: 1 GiB.
  int64_t max_plan_cache_bytes = int64_t{1} << 30;
  // What every call's memory is reserved from; borrowed, and must outlive the Engine and every
  // result it returned (a result's buffer gives its share back when freed). Default: null, a
  // budget of the engine's own without a limit, which lives as long as the last result.
  MemoryBudget* memory_budget = nullptr;
};

// Counters for observability; read with Engine::stats().
struct EngineStats {
  int64_t plans_created = 0;
  int64_t plan_cache_hits = 0;
  int64_t cached_plans = 0;
  // What the cached plans hold (estimated plan memory plus idle workspaces), and how many were
  // dropped to keep within max_cached_plans, max_plan_cache_bytes or the memory budget.
  int64_t plan_cache_bytes = 0;
  int64_t plans_evicted = 0;
};

// What oneDNN is and which instruction set it runs.
struct EngineInfo {
  std::string onednn_version;  // "2.6.3"
  std::string cpu_isa;         // e.g. "avx2", as oneDNN reports what it dispatches to
  int threads_per_call = 0;
  int64_t max_elements = 0;
};

class Engine {
 public:
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const EngineOptions& options);

  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;
  ~Engine();

  // Runs the network forward (inference mode) and returns its output.
  absl::StatusOr<ForwardResult> Forward(const ForwardRequest& request);

  // Runs forward, evaluates the objective and back-propagates; returns the output, the loss
  // and the requested gradients.
  absl::StatusOr<GradientResult> ComputeGradients(const GradientRequest& request);

  EngineInfo info() const;
  EngineStats stats() const;

 private:
  class Impl;
  explicit Engine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace gradengine

#endif  // GRADENGINE_ENGINE_H_
