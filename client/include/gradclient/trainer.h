// Training a network through the gradient service: a Trainer holds the parameters (and the
// running statistics of batch_norm2d layers) and an Optimizer's state, sends each batch to
// ComputeGradients with a cross-entropy objective (cut into CallOptions::shards parts for
// data-parallel training over several servers), applies the optimizer's update, and writes
// checkpoints from which a killed run resumes exactly, bit for bit.
//
//   absl::StatusOr<std::unique_ptr<Trainer>> trainer =
//       Trainer::Create(client.get(), options, std::move(parameters), &train_set);
//   while (!(*trainer)->Done()) {
//     absl::StatusOr<StepReport> step = (*trainer)->Step();
//     ...
//     if (step->checkpoint_due) (*trainer)->SaveCheckpoint();
//   }
//
// Order of the examples: epoch e (0-based) visits them in a permutation drawn from the seed and
// e when shuffling, else in the data's order, in batches of batch_size; the last batch of an
// epoch holds what is left.
//
// A checkpoint is a directory: position.json (the configuration that must not change on
// resume, and where training stands: epoch, batch, step, the epoch's permutation, the
// epoch's loss so far, elapsed time), params/<name>.npy (every parameter and buffer) and
// optimizer/<name>.npy (Optimizer::ExportState). It is written into a sibling directory
// "<dir>.tmp" which then atomically takes the place of <dir> (renameat2 RENAME_EXCHANGE, or a
// rename when there is none yet), so a process killed at any moment leaves a complete
// checkpoint: the previous one or the new one. Files are not fsync'ed: this protects against
// the process dying, not against the machine losing power.
//
// Thread-compatible: use a Trainer from one thread at a time. The Client must outlive it.

#ifndef GRADCLIENT_TRAINER_H_
#define GRADCLIENT_TRAINER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "gradclient/client.h"
#include "gradclient/optimizer.h"
#include "gradengine/network.h"
#include "gradengine/tensor.h"

namespace gradclient {

// Examples and their class labels.
struct LabeledData {
  // [N, ...], as the network's input.
  gradengine::Tensor inputs;
  // N class indices.
  std::vector<int64_t> labels;
};

struct TrainerOptions {
  // Its output must be logits [batch, classes].
  gradengine::NetworkSpec network;
  // Default: Adam with torch's defaults.
  OptimizerOptions optimizer = AdamOptions();
  // Examples per optimizer step, >= 1. Default: 32.
  int64_t batch_size = 32;
  // Passes over the data, >= 1. Default: 1.
  int64_t epochs = 1;
  // Stop after this many optimizer steps in all, or 0 for no such limit. Default: 0.
  int64_t max_steps = 0;
  // Visit each epoch's examples in a random permutation (from seed and the epoch), or in the
  // data's order. Default: true.
  bool shuffle = true;
  // Default: 0.
  uint64_t seed = 0;
  // CallOptions::shards of every call. Range 1..kMaxShards; above 1 only for a network without a
  // batch_norm2d in training mode, whose statistics are the whole batch's. Default: 1.
  int shards = 1;
  // Where checkpoints go (created when needed); empty for none. Default: empty.
  std::string checkpoint_dir;
  // StepReport::checkpoint_due every this many steps, besides at each epoch's end and the last
  // step; 0 for only those. Default: 0.
  int64_t checkpoint_every = 0;
};

// What one optimizer step did.
struct StepReport {
  // 0-based epoch of the batch, and the 1-based count of optimizer steps so far in the run.
  int64_t epoch = 0;
  int64_t step = 0;
  // The batch's mean cross-entropy, as the server computed it before the update.
  double loss = 0.0;
  int64_t batch_size = 0;
  // Wall time of the step: the call and the update.
  absl::Duration duration;
  // Training time of the whole run so far, over every resume.
  absl::Duration elapsed;
  // Whether the batch was its epoch's last; then epoch_loss is the mean loss per example over
  // the epoch.
  bool epoch_end = false;
  double epoch_loss = 0.0;
  // Whether options.checkpoint_every, an epoch's end or the last step calls for a checkpoint.
  bool checkpoint_due = false;
};

// Cross-entropy and accuracy of the network's predictions on a data set.
struct Evaluation {
  double loss = 0.0;      // mean cross-entropy per example
  double accuracy = 0.0;  // fraction whose argmax of the logits is the label
  int64_t examples = 0;
};

// Parameters for `network` as torch.nn's default initialisation draws them: every conv2d and
// linear weight and bias from U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform_ with
// a=sqrt(5) for the weights), fan_in being in_channels / groups * kernel_h * kernel_w or
// in_features; batch_norm2d weights 1, biases 0, running means 0 and variances 1. The same
// distribution as torch.nn, not the same numbers: the values come from `seed` through this
// library's own generator.
gradengine::ParameterTensors InitializeParameters(const gradengine::NetworkSpec& network,
                                                  uint64_t seed);

// Writes <dir>/<name>.npy for every tensor (creating `dir`): the layout of a checkpoint's
// params/ and of a trained network's parameters directory. Errors: InvalidArgument for a
// name that is not a file name inside `dir` (empty, holding a '/' or starting with '.'); file
// errors name the path.
absl::Status WriteTensorFiles(const std::string& dir, const gradengine::ParameterTensors& tensors);

class Trainer {
 public:
  // `parameters` must hold every parameter and buffer gradengine::LayerParameters lists for
  // the network (buffers optional in training mode take their fill when absent) with those
  // shapes; `train` must outlive the Trainer. Errors: InvalidArgument naming the option or the
  // tensor (an option out of range, shards > 1 with a batch_norm2d in training mode, a missing,
  // misshapen or unknown parameter, labels of another count than the inputs, no examples), and
  // ValidateOptimizerOptions' errors.
  static absl::StatusOr<std::unique_ptr<Trainer>> Create(Client* client, TrainerOptions options,
                                                         gradengine::ParameterTensors parameters,
                                                         const LabeledData* train);

  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;
  ~Trainer();

  // Replaces the parameters, the optimizer state and the position with those of the checkpoint
  // in options.checkpoint_dir. Errors: FailedPrecondition without checkpoint_dir; NotFound
  // when it holds no checkpoint; FailedPrecondition when the checkpoint was written with
  // another optimizer, hyperparameter, batch size, shuffle, seed or data size, naming it;
  // InvalidArgument (or the file's read error) for a damaged checkpoint, naming the file.
  absl::Status RestoreCheckpoint();

  // Whether the epochs or max_steps are done.
  bool Done() const;

  // One optimizer step on the next batch. Errors: FailedPrecondition when Done(); the call's
  // status (nothing updated then; a retry repeats the same batch); the Optimizer's.
  absl::StatusOr<StepReport> Step();

  // Writes the current state to options.checkpoint_dir (see the file comment).
  // FailedPrecondition without checkpoint_dir; file errors name the path.
  absl::Status SaveCheckpoint();

  // The network with every batch_norm2d in inference mode (torch's model.eval()) run forward
  // over `data` in batches of options.batch_size. Errors: the calls'; InvalidArgument for an
  // output that is not [batch, classes] or a label outside [0, classes).
  absl::StatusOr<Evaluation> Evaluate(const LabeledData& data);

  // The parameters and buffers now, by name.
  const gradengine::ParameterTensors& parameters() const { return parameters_; }
  const Optimizer& optimizer() const { return *optimizer_; }
  // Optimizer steps taken so far in the run, and the steps the whole run will take.
  int64_t step() const { return step_; }
  int64_t total_steps() const;
  // The 0-based epoch the next batch belongs to.
  int64_t epoch() const { return epoch_; }
  int64_t batches_per_epoch() const;
  absl::Duration elapsed() const { return elapsed_; }

 private:
  Trainer(Client* client, TrainerOptions options, gradengine::ParameterTensors parameters,
          const LabeledData* train, std::unique_ptr<Optimizer> optimizer);

  int64_t examples() const { return static_cast<int64_t>(train_->labels.size()); }
  // Draws (or resets to the data's order) the permutation of epoch_.
  void StartEpoch();
  // position.json's text.
  std::string PositionJson() const;

  Client* client_;
  TrainerOptions options_;
  gradengine::ParameterTensors parameters_;
  const LabeledData* train_;
  std::unique_ptr<Optimizer> optimizer_;
  // Names of the trainable parameters, whose gradients are asked for.
  std::vector<std::string> trainable_;

  // Where training stands.
  int64_t epoch_ = 0;
  int64_t batch_in_epoch_ = 0;
  int64_t step_ = 0;
  std::vector<int64_t> permutation_;
  double epoch_loss_sum_ = 0.0;  // sum over the epoch's batches of loss * batch size
  int64_t epoch_examples_ = 0;
  absl::Duration elapsed_;
};

}  // namespace gradclient

#endif  // GRADCLIENT_TRAINER_H_
