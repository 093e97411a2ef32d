#include "gradengine/engine.h"

#include <omp.h>

#include <chrono>
#include <exception>
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

// A result tensor of `shape`: in `memory` if the caller placed it, else freshly allocated and
// uninitialised (the plan writes every element). `what` names the placement in errors.
absl::StatusOr<Tensor> ResultTensor(const std::vector<int64_t>& shape,
                                    const std::optional<ResultMemory>& memory,
                                    absl::string_view what) {
  if (!memory.has_value()) return Tensor::Uninitialized(shape);
  int64_t elements = 1;
  for (int64_t d : shape) elements *= d;
  if (memory->size != elements || (elements > 0 && memory->data == nullptr)) {
    return absl::InvalidArgumentError(
        absl::StrCat("placement.", what, " has ", memory->size, " elements",
                     memory->data == nullptr ? " and no memory" : "", "; the result ",
                     ShapeToString(shape), " has ", elements));
  }
  return Tensor(shape,
                TensorBuffer::Wrap(memory->data, static_cast<size_t>(elements), memory->owner));
}

}  // namespace

class Engine::Impl {
 public:
  Impl(const EngineOptions& options, dnnl::engine cpu) : options_(options), cpu_(std::move(cpu)) {}

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

    PlanBindings bindings;
    bindings.input = request.input;
    bindings.parameters = &request.parameters;
    ForwardResult result;
    absl::StatusOr<Tensor> output =
        ResultTensor(validated->output_shapes.back(), request.placement.output, "output");
    if (!output.ok()) return output.status();
    result.output = *std::move(output);
    bindings.output = &result.output;
    std::chrono::steady_clock::time_point forward_done;
    bindings.forward_done = &forward_done;
    absl::Status status = (*plan)->Execute(bindings, request.should_continue);
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
    for (const auto& [name, shape] : validated->parameter_shapes) {
      if (request.gradients.WantsParameter(name)) needs.parameter_grads.insert(name);
    }
    absl::StatusOr<std::shared_ptr<Plan>> plan =
        GetPlan(request.network, *validated, request.input.shape, needs);
    if (!plan.ok()) return plan.status();

    GradientResult result;
    absl::StatusOr<Tensor> output =
        ResultTensor(validated->output_shapes.back(), request.placement.output, "output");
    if (!output.ok()) return output.status();
    result.output = *std::move(output);
    if (needs.input_grad) {
      absl::StatusOr<Tensor> input_grad =
          ResultTensor(request.input.shape, request.placement.input_grad, "input_grad");
      if (!input_grad.ok()) return input_grad.status();
      result.input_grad = *std::move(input_grad);
    } else if (request.placement.input_grad.has_value()) {
      return absl::InvalidArgumentError(
          "placement.input_grad is given, but the input gradient is not requested");
    }
    for (const auto& [name, memory] : request.placement.parameter_grads) {
      if (needs.parameter_grads.count(name) == 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            "placement.parameter_grads names ", Quote(name), ", whose gradient is not requested"));
      }
    }
    for (const auto& [name, shape] : validated->parameter_shapes) {
      if (needs.parameter_grads.count(name) == 0) continue;
      const auto placed = request.placement.parameter_grads.find(name);
      absl::StatusOr<Tensor> grad =
          ResultTensor(shape,
                       placed == request.placement.parameter_grads.end()
                           ? std::nullopt
                           : std::optional<ResultMemory>(placed->second),
                       absl::StrCat("parameter_grads[", Quote(name), "]"));
      if (!grad.ok()) return grad.status();
      result.parameter_grads.emplace(name, *std::move(grad));
    }

    PlanBindings bindings;
    bindings.input = request.input;
    bindings.parameters = &request.parameters;
    bindings.output = &result.output;
    bindings.objective = &request.objective;
    bindings.loss = &result.loss;
    bindings.input_grad = result.input_grad ? &*result.input_grad : nullptr;
    bindings.parameter_grads = &result.parameter_grads;
    std::chrono::steady_clock::time_point forward_done;
    bindings.forward_done = &forward_done;
    absl::Status status = (*plan)->Execute(bindings, request.should_continue);
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
    lru_.push_front(key);
    plans_.emplace(key, CacheEntry{plan, lru_.begin()});
    while (static_cast<int>(plans_.size()) > options_.max_cached_plans) {
      plans_.erase(lru_.back());
      lru_.pop_back();
    }
    return plan;
  }

  struct CacheEntry {
    std::shared_ptr<Plan> plan;
    std::list<std::string>::iterator lru_position;
  };

  const EngineOptions options_;
  const dnnl::engine cpu_;
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
  try {
    dnnl::engine cpu(dnnl::engine::kind::cpu, 0);
    return std::unique_ptr<Engine>(new Engine(std::make_unique<Impl>(resolved, std::move(cpu))));
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
