// gradctl train: trains a network with cross-entropy through the server (gradclient::Trainer).
//
// <out>/history.jsonl gets one JSON line per optimizer step
//   {"kind":"step","epoch":E,"step":S,"loss":L,"samples_per_s":R,"elapsed_s":T}
// and one at the end of each epoch
//   {"kind":"epoch","epoch":E,"step":S,"train_loss":L,"test_loss":L,"test_accuracy":A,
//    "elapsed_s":T}
// (the test fields with --test_inputs only), epochs counted from 1 and steps from 1 over the
// whole run, elapsed_s the training time over every resume. <out>/checkpoint/ is rewritten every
// --checkpoint_every steps, at each epoch's end and at the end; --resume continues from it
// exactly and drops the history lines of steps after it (a run killed after a step's line but
// before its checkpoint repeats that step). At the end <out>/params/<name>.npy holds the trained
// parameters and running statistics, and stdout a summary with "test_accuracy=...".

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/gradctl/cli_util.h"
#include "client/gradctl/commands.h"
#include "gradclient/client.h"
#include "gradclient/npy.h"
#include "gradclient/optimizer.h"
#include "gradclient/trainer.h"
#include "gradengine/network.h"
#include "gradengine/tensor.h"

namespace gradctl {
namespace {

namespace fs = std::filesystem;

constexpr char kHistoryFile[] = "history.jsonl";
constexpr char kCheckpointDir[] = "checkpoint";
constexpr char kParamsDir[] = "params";
constexpr absl::Duration kProgressRefresh = absl::Milliseconds(100);

absl::Status ErrnoStatus(const std::string& what, int error) {
  return absl::Status(absl::ErrnoToStatusCode(error),
                      absl::StrCat(what, ": ", std::generic_category().message(error)));
}

// The optimizer the flags describe; flags of another optimizer are usage errors naming them.
absl::StatusOr<gradclient::OptimizerOptions> OptimizerFromFlags(const TrainOptions& options) {
  struct Given {
    const char* flag;
    bool given;
  };
  const std::vector<Given> sgd_only = {{"--momentum", options.momentum.has_value()},
                                       {"--dampening", options.dampening.has_value()},
                                       {"--nesterov", options.nesterov.has_value()}};
  const std::vector<Given> adam_only = {{"--beta1", options.beta1.has_value()},
                                        {"--beta2", options.beta2.has_value()},
                                        {"--eps", options.eps.has_value()},
                                        {"--amsgrad", options.amsgrad.has_value()}};
  auto refuse = [&](const std::vector<Given>& flags) -> absl::Status {
    for (const Given& each : flags) {
      if (each.given) {
        return UsageError(
            absl::StrCat(each.flag, " is not an option of --optimizer=", options.optimizer));
      }
    }
    return absl::OkStatus();
  };
  gradclient::OptimizerOptions optimizer;
  if (options.optimizer == "sgd") {
    if (absl::Status s = refuse(adam_only); !s.ok()) return s;
    if (!options.lr.has_value()) {
      return UsageError("--optimizer=sgd needs --lr (torch.optim.SGD has no default)");
    }
    gradclient::SgdOptions sgd;
    sgd.lr = options.lr;
    if (options.momentum) sgd.momentum = *options.momentum;
    if (options.dampening) sgd.dampening = *options.dampening;
    if (options.nesterov) sgd.nesterov = *options.nesterov;
    if (options.weight_decay) sgd.weight_decay = *options.weight_decay;
    optimizer = sgd;
  } else if (options.optimizer == "adam" || options.optimizer == "adamw") {
    if (absl::Status s = refuse(sgd_only); !s.ok()) return s;
    auto fill = [&](auto adam) {
      if (options.lr) adam.lr = *options.lr;
      if (options.beta1) adam.beta1 = *options.beta1;
      if (options.beta2) adam.beta2 = *options.beta2;
      if (options.eps) adam.eps = *options.eps;
      if (options.weight_decay) adam.weight_decay = *options.weight_decay;
      if (options.amsgrad) adam.amsgrad = *options.amsgrad;
      return adam;
    };
    if (options.optimizer == "adam") {
      optimizer = fill(gradclient::AdamOptions());
    } else {
      optimizer = fill(gradclient::AdamWOptions());
    }
  } else {
    return UsageError(absl::StrCat("--optimizer=", options.optimizer,
                                   " is unknown; expected sgd, adam or adamw"));
  }
  // The optimizer's checks name its option as "<optimizer>.<option>" ("adam.beta1=1 is not in
  // [0, 1)"); the flag is --<option>.
  if (absl::Status s = gradclient::ValidateOptimizerOptions(optimizer); !s.ok()) {
    absl::string_view message = s.message();
    const size_t dot = message.find('.');
    if (dot != absl::string_view::npos && dot < message.find(' ')) message.remove_prefix(dot + 1);
    return UsageError(absl::StrCat("--", message));
  }
  return optimizer;
}

absl::Status CheckOptions(const TrainOptions& options) {
  struct Required {
    const char* flag;
    const std::string* value;
  };
  for (const Required& required :
       {Required{"--net", &options.net_path}, Required{"--inputs", &options.inputs_path},
        Required{"--labels", &options.labels_path}, Required{"--optimizer", &options.optimizer},
        Required{"--out", &options.out_dir}}) {
    if (required.value->empty()) {
      return UsageError(absl::StrCat("gradctl train needs ", required.flag));
    }
  }
  if (options.test_inputs_path.empty() != options.test_labels_path.empty()) {
    return UsageError("--test_inputs and --test_labels go together");
  }
  struct AtLeast {
    const char* flag;
    int64_t value;
    int64_t least;
  };
  for (const AtLeast& check :
       {AtLeast{"--epochs", options.epochs, 1}, AtLeast{"--batch", options.batch, 1},
        AtLeast{"--max_steps", options.max_steps, 0},
        AtLeast{"--checkpoint_every", options.checkpoint_every, 0}}) {
    if (check.value < check.least) {
      return UsageError(absl::StrCat(check.flag, "=", check.value, " must be >= ", check.least,
                                     check.least == 1 ? " (and is required)" : ""));
    }
  }
  if (options.shards < 1 || options.shards > gradclient::kMaxShards) {
    return UsageError(
        absl::StrCat("--shards=", options.shards, " is out of range 1..", gradclient::kMaxShards));
  }
  return absl::OkStatus();
}

absl::StatusOr<gradclient::LabeledData> ReadLabeledData(const std::string& inputs_path,
                                                        const std::string& labels_path) {
  gradclient::LabeledData data;
  absl::StatusOr<gradengine::Tensor> inputs = ReadFloatNpy(inputs_path);
  if (!inputs.ok()) return inputs.status();
  data.inputs = *std::move(inputs);
  absl::StatusOr<gradclient::NpyInt64Array> labels = ReadLabelsNpy(labels_path);
  if (!labels.ok()) return labels.status();
  if (labels->shape.size() != 1) {
    return absl::InvalidArgumentError(absl::StrCat(labels_path, ": labels of shape ",
                                                   gradengine::ShapeToString(labels->shape),
                                                   "; expected one class index per example, [N]"));
  }
  if (data.inputs.shape.empty() || labels->shape[0] != data.inputs.shape[0]) {
    return absl::InvalidArgumentError(
        absl::StrCat(labels_path, ": ", labels->shape[0], " labels for the inputs of shape ",
                     gradengine::ShapeToString(data.inputs.shape), " in ", inputs_path));
  }
  data.labels = std::move(labels->data);
  return data;
}

// The step of a history line ("step":S), or nullopt for a line that is not one of ours.
std::optional<int64_t> HistoryStep(absl::string_view line) {
  constexpr absl::string_view kKey = "\"step\":";
  const size_t at = line.find(kKey);
  if (at == absl::string_view::npos) return std::nullopt;
  absl::string_view rest = line.substr(at + kKey.size());
  const size_t end = rest.find_first_not_of("0123456789");
  int64_t step = 0;
  if (!absl::SimpleAtoi(rest.substr(0, end), &step)) return std::nullopt;
  return step;
}

// On resume: keeps the history lines of the steps up to the checkpoint's (complete lines only),
// rewriting the file atomically.
absl::Status TrimHistory(const fs::path& path, int64_t last_step) {
  std::error_code error;
  if (!fs::exists(path, error)) return absl::OkStatus();
  std::ifstream in(path, std::ios::binary);
  if (!in) return ErrnoStatus(absl::StrCat("cannot open ", path.string()), errno);
  std::ostringstream text;
  text << in.rdbuf();
  const std::string all = text.str();
  std::string kept;
  size_t begin = 0;
  while (begin < all.size()) {
    const size_t newline = all.find('\n', begin);
    if (newline == std::string::npos) break;  // a line cut short by a kill
    const absl::string_view line(all.data() + begin, newline - begin);
    const std::optional<int64_t> step = HistoryStep(line);
    if (step.has_value() && *step <= last_step) absl::StrAppend(&kept, line, "\n");
    begin = newline + 1;
  }
  const fs::path staging = path.string() + ".tmp";
  {
    std::ofstream out(staging, std::ios::binary | std::ios::trunc);
    out << kept;
    out.close();
    if (!out) return ErrnoStatus(absl::StrCat("cannot write ", staging.string()), errno);
  }
  if (std::rename(staging.c_str(), path.c_str()) != 0) {
    return ErrnoStatus(absl::StrCat("cannot rename ", staging.string(), " to ", path.string()),
                       errno);
  }
  return absl::OkStatus();
}

// "1:05:09", "4:07".
std::string Clock(absl::Duration duration) {
  const int64_t seconds = std::max<int64_t>(0, absl::ToInt64Seconds(duration));
  if (seconds >= 3600) {
    return absl::StrFormat("%d:%02d:%02d", seconds / 3600, seconds / 60 % 60, seconds % 60);
  }
  return absl::StrFormat("%d:%02d", seconds / 60, seconds % 60);
}

}  // namespace

absl::Status RunTrain(const TrainOptions& options) {
  if (absl::Status s = CheckOptions(options); !s.ok()) return s;
  absl::StatusOr<gradclient::OptimizerOptions> optimizer = OptimizerFromFlags(options);
  if (!optimizer.ok()) return optimizer.status();

  absl::StatusOr<gradengine::NetworkSpec> network = ReadNetworkFile(options.net_path);
  if (!network.ok()) return network.status();
  absl::StatusOr<gradclient::LabeledData> train =
      ReadLabeledData(options.inputs_path, options.labels_path);
  if (!train.ok()) return train.status();
  std::optional<gradclient::LabeledData> test;
  if (!options.test_inputs_path.empty()) {
    absl::StatusOr<gradclient::LabeledData> data =
        ReadLabeledData(options.test_inputs_path, options.test_labels_path);
    if (!data.ok()) return data.status();
    test = *std::move(data);
  }
  gradengine::ParameterTensors parameters;
  if (options.params_dir.empty()) {
    parameters = gradclient::InitializeParameters(*network, options.seed);
  } else if (absl::Status s = ReadParameters(*network, options.params_dir, &parameters); !s.ok()) {
    return s;
  }

  const fs::path out(options.out_dir);
  std::error_code error;
  fs::create_directories(out, error);
  if (error) return ErrnoStatus(absl::StrCat("cannot create --out=", out.string()), error.value());

  absl::StatusOr<std::unique_ptr<gradclient::Client>> client = Connect(options.connection);
  if (!client.ok()) return client.status();

  gradclient::TrainerOptions trainer_options;
  trainer_options.network = *network;
  trainer_options.optimizer = *optimizer;
  trainer_options.batch_size = options.batch;
  trainer_options.epochs = options.epochs;
  trainer_options.max_steps = options.max_steps;
  trainer_options.shuffle = options.shuffle;
  trainer_options.seed = options.seed;
  trainer_options.shards = options.shards;
  trainer_options.checkpoint_dir = (out / kCheckpointDir).string();
  trainer_options.checkpoint_every = options.checkpoint_every;
  absl::StatusOr<std::unique_ptr<gradclient::Trainer>> created = gradclient::Trainer::Create(
      client->get(), std::move(trainer_options), std::move(parameters), &*train);
  if (!created.ok()) return created.status();
  gradclient::Trainer& trainer = **created;

  const fs::path history_path = out / kHistoryFile;
  if (options.resume) {
    if (absl::Status s = trainer.RestoreCheckpoint(); !s.ok()) return s;
    if (absl::Status s = TrimHistory(history_path, trainer.step()); !s.ok()) return s;
  }
  std::ofstream history(history_path,
                        std::ios::binary | (options.resume ? std::ios::app : std::ios::trunc));
  if (!history) return ErrnoStatus(absl::StrCat("cannot open ", history_path.string()), errno);
  auto write_line = [&](const std::string& line) -> absl::Status {
    history << line << "\n";
    history.flush();
    if (!history) return ErrnoStatus(absl::StrCat("cannot write ", history_path.string()), errno);
    return absl::OkStatus();
  };

  const int64_t first_step = trainer.step();
  // The ETA extrapolates this process's wall time per step, which includes the evaluations and
  // checkpoints still to come, not only the steps' own time.
  const absl::Time run_start = absl::Now();
  std::optional<gradclient::Evaluation> last_test;
  int64_t last_test_step = -1;
  double last_train_loss = std::numeric_limits<double>::quiet_NaN();
  absl::Time last_refresh = absl::InfinitePast();
  // Ends the progress line, if one is showing, so that what follows starts on a line of its own.
  bool progress_shown = false;
  auto end_progress_line = [&] {
    if (progress_shown) std::cerr << "\n";
    progress_shown = false;
  };
  while (!trainer.Done()) {
    absl::StatusOr<gradclient::StepReport> report = trainer.Step();
    if (!report.ok()) {
      end_progress_line();
      return report.status();
    }
    const double seconds = absl::ToDoubleSeconds(report->duration);
    if (absl::Status s = write_line(absl::StrCat(
            "{\"kind\":\"step\",\"epoch\":", report->epoch + 1, ",\"step\":", report->step,
            ",\"loss\":", JsonNumber(report->loss), ",\"samples_per_s\":",
            JsonNumber(seconds > 0 ? static_cast<double>(report->batch_size) / seconds : 0.0),
            ",\"elapsed_s\":", JsonNumber(absl::ToDoubleSeconds(report->elapsed)), "}"));
        !s.ok()) {
      end_progress_line();
      return s;
    }
    // At most ten refreshes a second: a small network takes a step in well under a millisecond.
    const absl::Time now = absl::Now();
    if (options.progress && (now - last_refresh >= kProgressRefresh || trainer.Done())) {
      last_refresh = now;
      const int64_t done = report->step - first_step;
      const absl::Duration eta = (now - run_start) / done * (trainer.total_steps() - report->step);
      std::cerr << absl::StrFormat(
                       "\repoch %d/%d  step %d/%d  loss %.4f  %.0f samples/s  ETA %s   ",
                       report->epoch + 1, options.epochs, report->step, trainer.total_steps(),
                       report->loss, seconds > 0 ? report->batch_size / seconds : 0.0, Clock(eta))
                << std::flush;
      progress_shown = true;
    }
    if (report->epoch_end) {
      last_train_loss = report->epoch_loss;
      std::string line = absl::StrCat("{\"kind\":\"epoch\",\"epoch\":", report->epoch + 1,
                                      ",\"step\":", report->step,
                                      ",\"train_loss\":", JsonNumber(report->epoch_loss));
      if (test.has_value()) {
        absl::StatusOr<gradclient::Evaluation> evaluation = trainer.Evaluate(*test);
        if (!evaluation.ok()) {
          end_progress_line();
          return evaluation.status();
        }
        last_test = *evaluation;
        last_test_step = report->step;
        absl::StrAppend(&line, ",\"test_loss\":", JsonNumber(evaluation->loss),
                        ",\"test_accuracy\":", JsonNumber(evaluation->accuracy));
      }
      absl::StrAppend(&line, ",\"elapsed_s\":", JsonNumber(absl::ToDoubleSeconds(report->elapsed)),
                      "}");
      if (absl::Status s = write_line(line); !s.ok()) {
        end_progress_line();
        return s;
      }
    }
    // After the step's history lines, so that a checkpoint never runs ahead of the history.
    if (report->checkpoint_due) {
      if (absl::Status s = trainer.SaveCheckpoint(); !s.ok()) {
        end_progress_line();
        return s;
      }
    }
  }
  end_progress_line();

  const fs::path params_dir = out / kParamsDir;
  if (absl::Status s = gradclient::WriteTensorFiles(params_dir.string(), trainer.parameters());
      !s.ok()) {
    return s;
  }
  if (test.has_value() && last_test_step != trainer.step()) {
    absl::StatusOr<gradclient::Evaluation> evaluation = trainer.Evaluate(*test);
    if (!evaluation.ok()) return evaluation.status();
    last_test = *evaluation;
  }

  std::cout << absl::StrFormat("trained %d steps (%d this run) with %s in %.1fs of training\n",
                               trainer.step(), trainer.step() - first_step,
                               gradclient::OptimizerName(*optimizer),
                               absl::ToDoubleSeconds(trainer.elapsed()));
  if (!std::isnan(last_train_loss)) std::cout << "train_loss=" << last_train_loss << "\n";
  if (last_test.has_value()) {
    std::cout << absl::StrFormat("test_loss=%.6f\ntest_accuracy=%.4f\n", last_test->loss,
                                 last_test->accuracy);
  }
  std::cout << "params=" << params_dir.string() << "\nhistory=" << history_path.string() << "\n";
  return absl::OkStatus();
}

}  // namespace gradctl
