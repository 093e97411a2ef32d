// Times the benchmark workloads' training steps for tests/bench/vs_torch and vs_engine, which
// drive it through a line protocol on stdin and stdout:
//
//   build/tests/bench/step_timer --threads=N
//
//   warmup <workload>                      runs one untimed step       -> "ok"
//   run <workload> <iterations> [<max_ms>] times that many steps       -> "times <ms> <ms> ..."
//   forward <workload> <iterations> [<max_ms>]  as run, Forward calls  -> "times <ms> <ms> ..."
//   loss <workload>                        the last step's loss        -> "loss <value>"
//   dump <workload> <dir>                  writes the step's data      -> "ok" (<dir>: no spaces)
//   quit                                   exits (so does the end of the input)
//
// `run` and `forward` stop early, after at least one step, once the batch has taken max_ms of
// wall time, so that a batch sized on a quiet machine stays short when the machine gets busy.
// A `run` step is the workload's training step (ComputeGradients); a `forward` step is
// Engine::Forward on the same network, parameters and input (what `gradctl bench
// --method=forward` sends). `warmup` and `loss` concern the training step.
//
// Every command answers with exactly one line on stdout, flushed. A workload's first step of
// each kind compiles its plan, so the first command that needs one runs one untimed: `run` and
// `forward` never time compilation. `dump` writes raw float32 little-endian files
// <dir>/input.bin, <dir>/<parameter>.bin (e.g. conv1.weight.bin) and <dir>/target.bin (or,
// for a cross-entropy workload, int64 <dir>/labels.bin), and <dir>/shapes.txt with one
// "<name> <dim> <dim> ..." line per file.
//
// With ONEDNN_VERBOSE=1 in the environment, oneDNN's own "onednn_verbose,..." lines for the
// primitives a command executes appear on stdout before that command's reply.
// Malformed commands and engine errors are printed to stderr and exit with status 1.

#include <chrono>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gradclient/workloads.h"
#include "gradengine/allocator.h"
#include "gradengine/engine.h"

namespace {

// The two kinds of step `run` and `forward` time.
enum class StepKind { kGradients, kForward };

// A workload with the requests that point into it; none moves once created.
struct LoadedWorkload {
  explicit LoadedWorkload(gradclient::Workload workload_in)
      : workload(std::move(workload_in)),
        request(workload.Request()),
        forward_request(workload.ForwardOnly()) {}

  const gradclient::Workload workload;
  const gradengine::GradientRequest request;
  const gradengine::ForwardRequest forward_request;
  // Loss of the most recent training step; empty until the first (compiling) one has run.
  std::optional<double> last_loss;
  // Whether a (compiling) Forward step has run.
  bool forward_compiled = false;
};

// Writes `values` (float32 or int64) little-endian, independent of the host's byte order.
template <typename T>
absl::Status WriteLittleEndianFile(const std::filesystem::path& path,
                                   const std::vector<T>& values) {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  std::string bytes(values.size() * sizeof(T), '\0');
  for (size_t i = 0; i < values.size(); ++i) {
    Bits bits;
    std::memcpy(&bits, &values[i], sizeof(bits));
    for (size_t b = 0; b < sizeof(T); ++b) {
      bytes[sizeof(T) * i + b] = static_cast<char>((bits >> (8 * b)) & 0xff);
    }
  }
  std::ofstream file(path, std::ios::binary | std::ios::trunc);
  file.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  file.close();
  if (!file) return absl::InternalError(absl::StrCat("cannot write ", path.string()));
  return absl::OkStatus();
}

// Runs the line protocol described at the top of this file against one Engine.
// Not thread-safe: one caller feeds it commands in order.
class StepTimer {
 public:
  static absl::StatusOr<std::unique_ptr<StepTimer>> Create(int threads_per_call) {
    gradengine::EngineOptions options;
    options.threads_per_call = threads_per_call;
    absl::StatusOr<std::unique_ptr<gradengine::Engine>> engine =
        gradengine::Engine::Create(options);
    if (!engine.ok()) return engine.status();
    return std::unique_ptr<StepTimer>(new StepTimer(*std::move(engine)));
  }

  const gradengine::Engine& engine() const { return *engine_; }

  // Executes one command line and returns its one-line reply, or an empty optional for
  // `quit`. Malformed commands are InvalidArgument; engine failures keep the engine's code.
  absl::StatusOr<std::optional<std::string>> Execute(const std::string& line) {
    std::istringstream tokens(line);
    std::vector<std::string> args;
    for (std::string token; tokens >> token;) args.push_back(token);
    if (args.empty()) return absl::InvalidArgumentError("empty command");
    const std::string& command = args[0];

    if (command == "quit" && args.size() == 1) return std::optional<std::string>();
    if (command == "warmup" && args.size() == 2) {
      absl::StatusOr<LoadedWorkload*> loaded = Load(args[1]);
      if (!loaded.ok()) return loaded.status();
      absl::StatusOr<double> ms = Step(**loaded, StepKind::kGradients);
      if (!ms.ok()) return ms.status();
      return std::optional<std::string>("ok");
    }
    if ((command == "run" || command == "forward") && (args.size() == 3 || args.size() == 4)) {
      const StepKind kind = command == "run" ? StepKind::kGradients : StepKind::kForward;
      int iterations = 0;
      if (!absl::SimpleAtoi(args[2], &iterations) || iterations < 1) {
        return absl::InvalidArgumentError(
            absl::StrCat(command, ": iterations=", args[2], " is not a positive integer"));
      }
      double max_ms = std::numeric_limits<double>::infinity();
      if (args.size() == 4 && (!absl::SimpleAtod(args[3], &max_ms) || !(max_ms > 0))) {
        return absl::InvalidArgumentError(
            absl::StrCat(command, ": max_ms=", args[3], " is not a positive number"));
      }
      absl::StatusOr<LoadedWorkload*> loaded = WarmedUp(args[1], kind);
      if (!loaded.ok()) return loaded.status();
      std::vector<double> times_ms;
      times_ms.reserve(static_cast<size_t>(iterations));
      const auto start = std::chrono::steady_clock::now();
      for (int i = 0; i < iterations; ++i) {
        absl::StatusOr<double> ms = Step(**loaded, kind);
        if (!ms.ok()) return ms.status();
        times_ms.push_back(*ms);
        if (std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
                .count() >= max_ms) {
          break;
        }
      }
      return std::optional<std::string>(absl::StrCat("times ", absl::StrJoin(times_ms, " ")));
    }
    if (command == "loss" && args.size() == 2) {
      absl::StatusOr<LoadedWorkload*> loaded = WarmedUp(args[1], StepKind::kGradients);
      if (!loaded.ok()) return loaded.status();
      std::ostringstream reply;
      reply.precision(17);
      reply << "loss " << *(*loaded)->last_loss;
      return std::optional<std::string>(reply.str());
    }
    if (command == "dump" && args.size() == 3) {
      absl::StatusOr<LoadedWorkload*> loaded = Load(args[1]);
      if (!loaded.ok()) return loaded.status();
      if (absl::Status s = Dump((*loaded)->workload, args[2]); !s.ok()) return s;
      return std::optional<std::string>("ok");
    }
    return absl::InvalidArgumentError(
        absl::StrCat("unknown command '", line,
                     "'; expected warmup <workload> | run <workload> <iterations> [<max_ms>] | "
                     "forward <workload> <iterations> [<max_ms>] | loss <workload> | "
                     "dump <workload> <dir> | quit"));
  }

 private:
  explicit StepTimer(std::unique_ptr<gradengine::Engine> engine) : engine_(std::move(engine)) {}

  // The named workload, built on first use.
  absl::StatusOr<LoadedWorkload*> Load(const std::string& name) {
    auto it = workloads_.find(name);
    if (it != workloads_.end()) return it->second.get();
    absl::StatusOr<gradclient::Workload> workload = gradclient::MakeWorkload(name);
    if (!workload.ok()) return workload.status();
    auto loaded = std::make_unique<LoadedWorkload>(*std::move(workload));
    LoadedWorkload* result = loaded.get();
    workloads_.emplace(name, std::move(loaded));
    return result;
  }

  // The named workload after at least one (untimed) step of `kind`, so its plan is compiled.
  absl::StatusOr<LoadedWorkload*> WarmedUp(const std::string& name, StepKind kind) {
    absl::StatusOr<LoadedWorkload*> loaded = Load(name);
    if (!loaded.ok()) return loaded;
    bool compiled = false;
    switch (kind) {
      case StepKind::kGradients:
        compiled = (*loaded)->last_loss.has_value();
        break;
      case StepKind::kForward:
        compiled = (*loaded)->forward_compiled;
        break;
    }
    if (!compiled) {
      absl::StatusOr<double> ms = Step(**loaded, kind);
      if (!ms.ok()) return ms.status();
    }
    return loaded;
  }

  absl::StatusOr<double> Step(LoadedWorkload& loaded, StepKind kind) {
    switch (kind) {
      case StepKind::kGradients:
        return GradientStep(loaded);
      case StepKind::kForward:
        return ForwardStep(loaded);
    }
    return absl::InternalError("unknown step kind");
  }

  // Runs one Forward call and returns its wall time in milliseconds; the output is freed
  // after the clock stops, as in GradientStep.
  absl::StatusOr<double> ForwardStep(LoadedWorkload& loaded) {
    const auto start = std::chrono::steady_clock::now();
    absl::StatusOr<gradengine::ForwardResult> result = engine_->Forward(loaded.forward_request);
    const auto stop = std::chrono::steady_clock::now();
    if (!result.ok()) return result.status();
    loaded.forward_compiled = true;
    return std::chrono::duration<double, std::milli>(stop - start).count();
  }

  // Runs one training step, records its loss and returns its wall time in milliseconds.
  // The result is freed after the clock stops, as the PyTorch side frees its gradients
  // outside its timed region.
  absl::StatusOr<double> GradientStep(LoadedWorkload& loaded) {
    const auto start = std::chrono::steady_clock::now();
    absl::StatusOr<gradengine::GradientResult> result = engine_->ComputeGradients(loaded.request);
    const auto stop = std::chrono::steady_clock::now();
    if (!result.ok()) return result.status();
    if (!result->loss.has_value()) {
      return absl::InternalError(
          absl::StrCat("workload=", loaded.workload.name, ": the engine returned no loss"));
    }
    loaded.last_loss = *result->loss;
    return std::chrono::duration<double, std::milli>(stop - start).count();
  }

  static absl::Status Dump(const gradclient::Workload& workload, const std::string& dir) {
    const std::filesystem::path root(dir);
    std::error_code error;
    std::filesystem::create_directories(root, error);
    if (error) {
      return absl::InternalError(absl::StrCat("cannot create ", dir, ": ", error.message()));
    }
    std::ostringstream shapes;
    auto write = [&](const std::string& name, const std::vector<int64_t>& shape,
                     const auto& values) {
      shapes << name << " " << absl::StrJoin(shape, " ") << "\n";
      return WriteLittleEndianFile(root / (name + ".bin"), values);
    };
    if (absl::Status s = write("input", workload.input_shape, workload.input); !s.ok()) return s;
    for (const auto& [name, parameter] : workload.parameters) {
      if (absl::Status s = write(name, parameter.shape, parameter.values); !s.ok()) return s;
    }
    absl::Status written =
        workload.labels.empty()
            ? write("target", workload.output_shape, workload.target)
            : write("labels", {static_cast<int64_t>(workload.labels.size())}, workload.labels);
    if (!written.ok()) return written;
    std::ofstream file(root / "shapes.txt", std::ios::trunc);
    file << shapes.str();
    file.close();
    if (!file) return absl::InternalError(absl::StrCat("cannot write ", dir, "/shapes.txt"));
    return absl::OkStatus();
  }

  std::unique_ptr<gradengine::Engine> engine_;
  std::map<std::string, std::unique_ptr<LoadedWorkload>> workloads_;
};

}  // namespace

int main(int argc, char** argv) {
  // As gradserver does, so that the engine-only times compare with the service's.
  gradengine::KeepFreedMemoryForReuse();
  int threads = 0;
  for (int i = 1; i < argc; ++i) {
    constexpr char kThreads[] = "--threads=";
    if (std::strncmp(argv[i], kThreads, sizeof(kThreads) - 1) == 0 &&
        absl::SimpleAtoi(argv[i] + sizeof(kThreads) - 1, &threads) && threads >= 0) {
      continue;
    }
    std::cerr << "usage: step_timer [--threads=N]   (N >= 0; 0 = all available)\n";
    return 2;
  }

  absl::StatusOr<std::unique_ptr<StepTimer>> timer = StepTimer::Create(threads);
  if (!timer.ok()) {
    std::cerr << "step_timer: " << timer.status() << "\n";
    return 1;
  }
  const gradengine::EngineInfo info = (*timer)->engine().info();
  std::cerr << "step_timer: oneDNN " << info.onednn_version << ", " << info.cpu_isa << ", "
            << info.threads_per_call << " threads per call\n";

  // oneDNN's verbose lines go through C stdio; std::cout stays synchronized with it so the
  // two keep their order on stdout.
  for (std::string line; std::getline(std::cin, line);) {
    absl::StatusOr<std::optional<std::string>> reply = (*timer)->Execute(line);
    if (!reply.ok()) {
      std::cerr << "step_timer: " << reply.status() << "\n";
      return 1;
    }
    if (!reply->has_value()) break;
    std::cout << **reply << std::endl;
  }
  return 0;
}
