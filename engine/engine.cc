#include "gradengine/engine.h"

#include <omp.h>

#include <chrono>
#include <exception>
#include <limits>
#include <list>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "engine/plan.h"
#include "engine/request_validation.h"
#include "gradengine/quote.h"
#include "oneapi/dnnl/dnnl.hpp"

namespace gradengine {
namespace {

int64_t Nanoseconds(std::chrono::steady_clock::duration duration) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(duration).count();
}

std::string IsaName(dnnl::cpu_isa isa) {
  switch (isa) {
    case dnnl::cpu_isa::sse41:
      return "sse41";
    case dnnl::cpu_isa::avx:
      return "avx";
    case dnnl::cpu_isa::avx2:
      return "avx2";
    case dnnl::cpu_isa::avx2_vnni:
      return "avx2_vnni";
    case dnnl::cpu_isa::avx512_mic:
      return "avx512_mic";
    case dnnl::cpu_isa::avx512_mic_4ops:
      return "avx512_mic_4ops";
    case dnnl::cpu_isa::avx512_core:
      return "avx512_core";
    case dnnl::cpu_isa::avx512_core_vnni:
      return "avx512_core_vnni";
    case dnnl::cpu_isa::avx512_core_bf16:
      return "avx512_core_bf16";
    case dnnl::cpu_isa::avx512_core_amx:
      return "avx512_core_amx";
    default:
      return "unknown";
  }
}

int64_t Elements(const std::vector<int64_t>& shape) {
  int64_t elements = 1;
  for (int64_t d : shape) elements *= d;
  return elements;
}

// The bytes the engine allocates for a result of `shape`: none if the caller placed it in
// `memory`, which must then have room for exactly the result (checked before any memory is
// reserved, so a bad placement never waits for the budget). `what` names the placement.
absl::StatusOr<int64_t> ResultBytes(const std::vector<int64_t>& shape,
                                    const std::optional<ResultMemory>& memory,
                                    absl::string_view what) {
  const int64_t elements = Elements(shape);
  if (!memory.has_value()) return elements * static_cast<int64_t>(sizeof(float));
  if (memory->size != elements || (elements > 0 && memory->data == nullptr)) {
    return absl::InvalidArgumentError(
        absl::StrCat("placement.", what, " has ", memory->size, " elements",
                     memory->data == nullptr ? " and no memory" : "", "; the result ",
                     ShapeToString(shape), " has ", elements));
  }
  return 0;
}

// A result tensor of `shape`: in `memory` if the caller placed it, else freshly allocated and
// uninitialised (the plan writes every element), its buffer holding `reservation` so that the
// budget counts it for as long as it lives. REQUIRES: ResultBytes accepted the placement.
Tensor ResultTensor(const std::vector<int64_t>& shape, const std::optional<ResultMemory>& memory,
                    const std::shared_ptr<MemoryBudget::Reservation>& reservation) {
  const int64_t elements = Elements(shape);
  if (!memory.has_value()) {
    Tensor tensor = Tensor::Uninitialized(shape);
    // Members are destroyed last to first: the memory goes before its reservation.
    struct Held {
      std::shared_ptr<MemoryBudget::Reservation> reservation;
      std::shared_ptr<const void> memory;
    };
    auto held = std::make_shared<const Held>(Held{reservation, tensor.data.owner()});
    float* data = tensor.data.data();
    tensor.data = TensorBuffer::Wrap(data, static_cast<size_t>(elements), std::move(held));
    return tensor;
  }
  return Tensor(shape,
                TensorBuffer::Wrap(memory->data, static_cast<size_t>(elements), memory->owner));
}

// The parameters a call binds: `given`, or when it leaves out optional buffers, a copy with
// each of them added, filled with its default, in memory `defaults` holds.
const ParameterViews* CompleteParameters(const ValidatedNetwork& validated,
                                         const ParameterViews& given, ParameterViews* completed,
                                         std::vector<std::vector<float>>* defaults) {
  const ParameterViews* result = &given;
  for (const ParameterInfo& info : validated.parameters) {
    if (info.required || given.count(info.name) > 0) continue;
    if (result == &given) {
      *completed = given;
      result = completed;
    }
    defaults->emplace_back(static_cast<size_t>(Elements(info.shape)), info.fill);
    completed->emplace(info.name, TensorView(info.shape, absl::MakeSpan(defaults->back())));
  }
  return result;
}

// Bytes of the buffers a call returns updated (running statistics).
int64_t UpdatedBufferBytes(const ValidatedNetwork& validated) {
  int64_t bytes = 0;
  for (const ParameterInfo& info : validated.parameters) {
    if (info.updated) bytes += Elements(info.shape) * static_cast<int64_t>(sizeof(float));
  }
  return bytes;
}

ParameterTensors UpdatedBuffers(const ValidatedNetwork& validated,
                                const std::shared_ptr<MemoryBudget::Reservation>& reservation) {
  ParameterTensors buffers;
  for (const ParameterInfo& info : validated.parameters) {
    if (info.updated) {
      buffers.emplace(info.name, ResultTensor(info.shape, std::nullopt, reservation));
    }
  }
  return buffers;
}

}  // namespace

// Freeing at least this much from the plan cache at once returns the memory to the system.
constexpr int64_t kReturnFreedMemoryBytes = int64_t{64} << 20;

class Engine::Impl {
 public:
  // `own_budget` is the budget options.memory_budget points at when the caller gave none.
  Impl(const EngineOptions& options, dnnl::engine cpu, std::shared_ptr<MemoryBudget> own_budget)
      : own_budget_(std::move(own_budget)),
        options_(options),
        cpu_(std::move(cpu)),
        budget_(*options.memory_budget),
        reclaimer_id_(budget_.AddReclaimer([this](int64_t wanted) { return Reclaim(wanted); })) {}

  ~Impl() {
    budget_.RemoveReclaimer(reclaimer_id_);
    absl::MutexLock lock(&mu_);
    for (const auto& [key, entry] : plans_) budget_.Uncache(entry.plan->structure_bytes());
  }

  absl::StatusOr<ForwardResult> Forward(const ForwardRequest& request) {
    const auto start = std::chrono::steady_clock::now();
    absl::StatusOr<ValidatedNetwork> validated =
        ValidateForwardRequest(request, options_.max_elements);
    if (!validated.ok()) return validated.status();

    PlanNeeds needs;
    needs.training = false;
    absl::StatusOr<std::shared_ptr<Plan>> plan =
        GetPlan(request.network, *validated, request.input.shape, needs);
    if (!plan.ok()) return plan.status();

    const std::vector<int64_t>& output_shape = validated->output_shapes.back();
    absl::StatusOr<int64_t> output_bytes =
        ResultBytes(output_shape, request.placement.output, "output");
    if (!output_bytes.ok()) return output_bytes.status();
    std::shared_ptr<MemoryBudget::Reservation> results = NewResultsReservation();
    absl::StatusOr<Plan::WorkspaceLease> lease = (*plan)->LeaseWorkspace(
        *output_bytes + UpdatedBufferBytes(*validated), request.should_continue, results.get());
    if (!lease.ok()) return lease.status();

    PlanBindings bindings;
    bindings.input = request.input;
    ParameterViews completed;
    std::vector<std::vector<float>> defaults;
    bindings.parameters = CompleteParameters(*validated, request.parameters, &completed, &defaults);
    ForwardResult result;
    result.output = ResultTensor(output_shape, request.placement.output, results);
    result.running_stats = UpdatedBuffers(*validated, results);
    bindings.running_stats = &result.running_stats;
    bindings.output = &result.output;
    std::chrono::steady_clock::time_point forward_done;
    bindings.forward_done = &forward_done;
    absl::Status status = (*plan)->Execute(bindings, request.should_continue, *std::move(lease));
    KeepCacheWithinBytes();
    if (!status.ok()) return status;
    result.timing.forward_ns = Nanoseconds(forward_done - start);
    return result;
  }

  absl::StatusOr<GradientResult> ComputeGradients(const GradientRequest& request) {
    const auto start = std::chrono::steady_clock::now();
    absl::StatusOr<ValidatedNetwork> validated =
        ValidateGradientRequest(request, options_.max_elements);
    if (!validated.ok()) return validated.status();

    PlanNeeds needs;
    needs.training = true;
    needs.input_grad = request.gradients.input;
    for (const ParameterInfo& info : validated->parameters) {
      if (info.trainable && request.gradients.WantsParameter(info.name)) {
        needs.parameter_grads.insert(info.name);
      }
    }
    absl::StatusOr<std::shared_ptr<Plan>> plan =
        GetPlan(request.network, *validated, request.input.shape, needs);
    if (!plan.ok()) return plan.status();

    if (!needs.input_grad && request.placement.input_grad.has_value()) {
      return absl::InvalidArgumentError(
          "placement.input_grad is given, but the input gradient is not requested");
    }
    for (const auto& [name, memory] : request.placement.parameter_grads) {
      if (needs.parameter_grads.count(name) == 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            "placement.parameter_grads names ", Quote(name), ", whose gradient is not requested"));
      }
    }
    auto placed_grad = [&](const std::string& name) -> std::optional<ResultMemory> {
      const auto placed = request.placement.parameter_grads.find(name);
      if (placed == request.placement.parameter_grads.end()) return std::nullopt;
      return placed->second;
    };
    const std::vector<int64_t>& output_shape = validated->output_shapes.back();
    int64_t result_bytes = 0;
    auto count = [&result_bytes](absl::StatusOr<int64_t> bytes) {
      if (bytes.ok()) result_bytes += *bytes;
      return bytes.status();
    };
    if (absl::Status s = count(ResultBytes(output_shape, request.placement.output, "output"));
        !s.ok()) {
      return s;
    }
    if (needs.input_grad) {
      if (absl::Status s =
              count(ResultBytes(request.input.shape, request.placement.input_grad, "input_grad"));
          !s.ok()) {
        return s;
      }
    }
    for (const ParameterInfo& info : validated->parameters) {
      if (needs.parameter_grads.count(info.name) == 0) continue;
      if (absl::Status s =
              count(ResultBytes(info.shape, placed_grad(info.name),
                                absl::StrCat("parameter_grads[", Quote(info.name), "]")));
          !s.ok()) {
        return s;
      }
    }
    result_bytes += UpdatedBufferBytes(*validated);
    std::shared_ptr<MemoryBudget::Reservation> results = NewResultsReservation();
    absl::StatusOr<Plan::WorkspaceLease> lease =
        (*plan)->LeaseWorkspace(result_bytes, request.should_continue, results.get());
    if (!lease.ok()) return lease.status();

    GradientResult result;
    result.output = ResultTensor(output_shape, request.placement.output, results);
    if (needs.input_grad) {
      result.input_grad = ResultTensor(request.input.shape, request.placement.input_grad, results);
    }
    for (const ParameterInfo& info : validated->parameters) {
      if (needs.parameter_grads.count(info.name) == 0) continue;
      result.parameter_grads.emplace(info.name,
                                     ResultTensor(info.shape, placed_grad(info.name), results));
    }
    result.running_stats = UpdatedBuffers(*validated, results);

    PlanBindings bindings;
    bindings.input = request.input;
    ParameterViews completed;
    std::vector<std::vector<float>> defaults;
    bindings.parameters = CompleteParameters(*validated, request.parameters, &completed, &defaults);
    bindings.running_stats = &result.running_stats;
    bindings.output = &result.output;
    bindings.objective = &request.objective;
    bindings.loss = &result.loss;
    bindings.input_grad = result.input_grad ? &*result.input_grad : nullptr;
    bindings.parameter_grads = &result.parameter_grads;
    std::chrono::steady_clock::time_point forward_done;
    bindings.forward_done = &forward_done;
    absl::Status status = (*plan)->Execute(bindings, request.should_continue, *std::move(lease));
    KeepCacheWithinBytes();
    if (!status.ok()) return status;
    result.timing.forward_ns = Nanoseconds(forward_done - start);
    result.timing.backward_ns = Nanoseconds(std::chrono::steady_clock::now() - forward_done);
    return result;
  }

  EngineInfo info() const {
    EngineInfo info;
    const dnnl_version_t* version = dnnl_version();
    info.onednn_version = absl::StrCat(version->major, ".", version->minor, ".", version->patch);
    info.cpu_isa = IsaName(dnnl::get_effective_cpu_isa());
    info.threads_per_call = options_.threads_per_call;
    info.max_elements = options_.max_elements;
    return info;
  }

  EngineStats stats() const {
    absl::MutexLock lock(&mu_);
    EngineStats stats = stats_;
    stats.cached_plans = static_cast<int64_t>(plans_.size());
    stats.plan_cache_bytes = CacheBytes();
    return stats;
  }

 private:
  // Returns the cached plan for this exact computation, compiling it on a miss. Two threads
  // missing on the same key at once may both compile; one result is kept. Compiling outside
  // the lock keeps a slow JIT from stalling every other call.
  absl::StatusOr<std::shared_ptr<Plan>> GetPlan(const NetworkSpec& network,
                                                const ValidatedNetwork& validated,
                                                const std::vector<int64_t>& input_shape,
                                                const PlanNeeds& needs) {
    const std::string key = PlanKey(network, input_shape, needs);
    {
      absl::MutexLock lock(&mu_);
      auto it = plans_.find(key);
      if (it != plans_.end()) {
        ++stats_.plan_cache_hits;
        lru_.splice(lru_.begin(), lru_, it->second.lru_position);
        return it->second.plan;
      }
    }
    absl::StatusOr<std::unique_ptr<Plan>> created =
        Plan::Create(cpu_, network, validated, input_shape, needs, options_);
    if (!created.ok()) return created.status();
    std::shared_ptr<Plan> plan = std::move(*created);

    absl::MutexLock lock(&mu_);
    ++stats_.plans_created;
    auto it = plans_.find(key);
    if (it != plans_.end()) return it->second.plan;
    // Room for the new plan: drop least recently used ones past the count and the bytes. A plan
    // that cannot be cached alone, or whose memory the budget has no room for, serves this call
    // only.
    const int64_t bytes = plan->structure_bytes();
    if (bytes > options_.max_plan_cache_bytes || !budget_.TryCache(bytes)) return plan;
    int64_t cached = CacheBytes();
    while (!lru_.empty() && (static_cast<int>(plans_.size()) >= options_.max_cached_plans ||
                             cached + bytes > options_.max_plan_cache_bytes)) {
      cached -= EvictLeastRecentlyUsed();
    }
    lru_.push_front(key);
    plans_.emplace(key, CacheEntry{plan, lru_.begin()});
    return plan;
  }

  // An empty reservation for a call's results; with the engine's own budget it keeps that budget
  // alive, since results may outlive the engine.
  std::shared_ptr<MemoryBudget::Reservation> NewResultsReservation() const {
    struct Hold {
      std::shared_ptr<MemoryBudget> budget;  // destroyed after the reservation
      MemoryBudget::Reservation reservation;
    };
    auto hold = std::make_shared<Hold>();
    hold->budget = own_budget_;
    return std::shared_ptr<MemoryBudget::Reservation>(hold, &hold->reservation);
  }

  // A call gives its workspace back to the plan's pool, which may take the cache past
  // max_plan_cache_bytes: idle workspaces of the least recently used plans go first, and the
  // memory goes back to the system when that frees much.
  void KeepCacheWithinBytes() {
    int64_t workspace_bytes = 0;
    {
      absl::MutexLock lock(&mu_);
      ShrinkCache(CacheBytes() - options_.max_plan_cache_bytes, &workspace_bytes);
    }
    if (workspace_bytes >= kReturnFreedMemoryBytes) budget_.ReturnFreedMemory();
  }

  // Frees about `wanted` bytes of the cache, or more: idle workspaces first, least recently
  // used plan first, then whole plans. Returns the bytes freed, of which `*workspace_bytes`
  // were idle workspaces.
  int64_t ShrinkCache(int64_t wanted, int64_t* workspace_bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    int64_t freed = 0;
    for (auto key = lru_.rbegin(); key != lru_.rend() && freed < wanted; ++key) {
      freed += plans_.at(*key).plan->ReleaseIdleWorkspaces();
    }
    *workspace_bytes = freed;
    while (freed < wanted && !lru_.empty()) freed += EvictLeastRecentlyUsed();
    return freed;
  }

  // Estimated plan memory plus idle workspaces of every cached plan.
  int64_t CacheBytes() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    int64_t bytes = 0;
    for (const auto& [key, entry] : plans_) {
      bytes += entry.plan->structure_bytes() + entry.plan->idle_bytes();
    }
    return bytes;
  }

  // Drops the least recently used plan (calls using it keep it until they finish); returns the
  // cached bytes that gives up. REQUIRES: the cache is not empty.
  int64_t EvictLeastRecentlyUsed() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    auto it = plans_.find(lru_.back());
    std::shared_ptr<Plan> plan = std::move(it->second.plan);
    plans_.erase(it);
    lru_.pop_back();
    ++stats_.plans_evicted;
    const int64_t bytes = plan->ReleaseIdleWorkspaces() + plan->structure_bytes();
    budget_.Uncache(plan->structure_bytes());
    return bytes;
  }

  // The budget's reclaimer.
  int64_t Reclaim(int64_t wanted) {
    absl::MutexLock lock(&mu_);
    int64_t workspace_bytes = 0;
    return ShrinkCache(wanted, &workspace_bytes);
  }

  struct CacheEntry {
    std::shared_ptr<Plan> plan;
    std::list<std::string>::iterator lru_position;
  };

  // Shared with every result it counts, which may outlive the engine.
  const std::shared_ptr<MemoryBudget> own_budget_;
  const EngineOptions options_;
  const dnnl::engine cpu_;
  MemoryBudget& budget_;
  const int reclaimer_id_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, CacheEntry> plans_ ABSL_GUARDED_BY(mu_);
  // Most recently used first.
  std::list<std::string> lru_ ABSL_GUARDED_BY(mu_);
  EngineStats stats_ ABSL_GUARDED_BY(mu_);
};

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const EngineOptions& options) {
  EngineOptions resolved = options;
  if (resolved.threads_per_call < 0) {
    return absl::InvalidArgumentError(absl::StrCat("threads_per_call=", resolved.threads_per_call,
                                                   " must be >= 0 (0 = all cores)"));
  }
  if (resolved.threads_per_call == 0) resolved.threads_per_call = omp_get_max_threads();
  if (resolved.max_elements < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_elements=", resolved.max_elements, " must be positive"));
  }
  if (resolved.max_workspace_bytes < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_workspace_bytes=", resolved.max_workspace_bytes, " must be positive"));
  }
  if (resolved.max_cached_plans < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_cached_plans=", resolved.max_cached_plans, " must be positive"));
  }
  if (resolved.max_plan_cache_bytes < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_plan_cache_bytes=", resolved.max_plan_cache_bytes, " must be >= 0"));
  }
  std::shared_ptr<MemoryBudget> own_budget;
  if (resolved.memory_budget == nullptr) {
    MemoryBudgetOptions unlimited;
    unlimited.limit_bytes = std::numeric_limits<int64_t>::max() / 4;
    absl::StatusOr<std::unique_ptr<MemoryBudget>> created = MemoryBudget::Create(unlimited);
    if (!created.ok()) return created.status();
    own_budget = *std::move(created);
    resolved.memory_budget = own_budget.get();
  }
  try {
    dnnl::engine cpu(dnnl::engine::kind::cpu, 0);
    return std::unique_ptr<Engine>(
        new Engine(std::make_unique<Impl>(resolved, std::move(cpu), std::move(own_budget))));
  } catch (const dnnl::error& e) {
    return absl::InternalError(absl::StrCat("oneDNN could not create a CPU engine: ", e.what()));
  }
}

Engine::Engine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Engine::~Engine() = default;

// Result tensors are allocated outside the plans' own guards; running out of memory for them,
// or any other exception, is reported as a Status, never thrown at the caller.
absl::StatusOr<ForwardResult> Engine::Forward(const ForwardRequest& request) {
  try {
    return impl_->Forward(request);
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError("out of memory for the forward pass's tensors");
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("forward pass failed: ", e.what()));
  }
}

absl::StatusOr<GradientResult> Engine::ComputeGradients(const GradientRequest& request) {
  try {
    return impl_->ComputeGradients(request);
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError("out of memory for the gradient computation's tensors");
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("gradient computation failed: ", e.what()));
  }
}

EngineInfo Engine::info() const { return impl_->info(); }
EngineStats Engine::stats() const { return impl_->stats(); }

}  // namespace gradengine
