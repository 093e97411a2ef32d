// gradctl's commands. main.cc copies the flags into these Options structs and calls one Run
// function; each writes its results to stdout and returns a status, which main.cc prints as
// "gradctl: CODE: message". Usage mistakes are UsageError()s (cli_util.h).

#ifndef CLIENT_GRADCTL_COMMANDS_H_
#define CLIENT_GRADCTL_COMMANDS_H_

#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "client/gradctl/cli_util.h"

namespace gradctl {

// gradctl health: prints the server's grpc.health.v1 status; an error unless SERVING.
absl::Status RunHealth(const ConnectionOptions& connection);

struct InfoOptions {
  ConnectionOptions connection;
  // One JSON line instead of the readable summary. Default: false.
  bool json = false;
};

// gradctl info: what the server is, runs on and accepts.
absl::Status RunInfo(const InfoOptions& options);

// gradctl grad and gradctl forward.
struct GradOptions {
  ConnectionOptions connection;
  // false for `forward`: run inference only, no objective or gradients.
  bool gradients = true;
  // The protobuf JSON mapping of a grad.v1.Network.
  std::string net_path;
  std::string input_path;
  // Holds <name>.npy for every parameter gradengine::LayerParameters names (<layer>.weight.npy,
  // <layer>.bias.npy, ...); an optional one (a batch_norm2d's <layer>.running_mean.npy and
  // <layer>.running_var.npy in training mode) is read when present.
  std::string params_dir;
  // The objective: exactly one of target_path (MSE), grad_output_path, objective == "sum" and
  // objective == "cross_entropy" (which needs labels_path).
  std::string target_path;
  std::string grad_output_path;
  std::string objective;
  // cross_entropy only: an int64 .npy of class indices, and F.cross_entropy's label_smoothing
  // (default 0) and ignore_index (default -100); unset unless given.
  std::string labels_path;
  std::optional<double> label_smoothing;
  std::optional<int64_t> ignore_index;
  // Return the input gradient. Default: true.
  bool input_grad = true;
  // "all", "none" or a comma-separated list of parameter names. Default: all.
  std::string param_grads = "all";
  // Leave the network's output out of the reply (and output.npy unwritten). Default: false.
  bool skip_output = false;
  // Where the .npy results go; created if missing.
  std::string out_dir;
  // Default: empty, for a random id.
  std::string request_id;
  // Parts the batch is cut into, computed at once (gradclient::CallOptions::shards).
  // Default: 1.
  int shards = 1;
  // Pass the tensors and results through a shared memory region (StageInSharedMemory) instead
  // of the socket; the server must run on this host with --allow_shared_memory. Default: false.
  bool shared_memory = false;
};

// Reads the network, input, parameters and objective tensor (or labels), calls the server and
// writes <out>/output.npy, <out>/input.grad.npy, <out>/<parameter>.grad.npy and, for every
// batch_norm2d in training mode, the updated <out>/<layer>.running_mean.npy and
// <out>/<layer>.running_var.npy; prints one JSON line with the loss and the timings.
absl::Status RunGrad(const GradOptions& options);

struct DemoOptions {
  ConnectionOptions connection;
  // "conv1", "conv4", "layer" or "all".
  std::string which = "all";
  // The directory holding seed_conv1, seed_conv4 and seed_layer.
  std::string data_dir;
};

// gradctl demo: the seed notebook's demos through the server, checked against PyTorch.
absl::Status RunDemo(const DemoOptions& options);

struct BenchOptions {
  ConnectionOptions connection;
  // One of gradclient::WorkloadNames(). Default: seed4.
  std::string workload = "seed4";
  // Threads issuing requests back to back. Default: 1.
  int concurrency = 1;
  // How long to run, or how many requests in all; at most one. Default: 10 s.
  std::optional<absl::Duration> duration;
  std::optional<int64_t> requests;
  bool skip_output = false;
  // Send Forward instead of ComputeGradients. Default: false.
  bool forward = false;
  // Parts each call's batch is cut into (gradclient::CallOptions::shards). Default: 1.
  int shards = 1;
  // Compare every reply with the warm-up reply (within kVerifyTolerance, bench_command.cc);
  // a mismatch counts as a failed request (DATA_LOSS). Default: false.
  bool verify = false;
  // One JSON line instead of the readable report. Default: false.
  bool json = false;
  // Refresh a progress line on stderr while running. Default: false.
  bool progress = false;
  // As GradOptions::shared_memory, with one set of results per concurrent thread.
  bool shared_memory = false;
};

// gradctl bench: a closed-loop load generator; see bench_command.cc.
absl::Status RunBench(const BenchOptions& options);

struct TrainOptions {
  ConnectionOptions connection;
  // The network (protobuf JSON of grad.v1.Network); its output must be logits [N, classes].
  std::string net_path;
  // Initial parameters as GradOptions::params_dir; empty for torch.nn's default
  // initialisation drawn from `seed` (gradclient::InitializeParameters).
  std::string params_dir;
  // Training inputs [N, ...] (float .npy) and int64 class indices [N].
  std::string inputs_path;
  std::string labels_path;
  // Optional test set, evaluated at each epoch's end and at the end: both or neither.
  std::string test_inputs_path;
  std::string test_labels_path;
  // Passes over the data and examples per step. Required (>= 1).
  int64_t epochs = 0;
  int64_t batch = 0;
  // "sgd", "adam" or "adamw". Required.
  std::string optimizer;
  // Required with sgd; torch's default for adam and adamw when unset.
  std::optional<double> lr;
  // sgd only (torch's defaults when unset): --momentum, --dampening, --nesterov.
  std::optional<double> momentum;
  std::optional<double> dampening;
  std::optional<bool> nesterov;
  // Every optimizer; the default is the optimizer's own (adamw: 1e-2, else 0).
  std::optional<double> weight_decay;
  // adam and adamw only (torch's defaults when unset).
  std::optional<double> beta1;
  std::optional<double> beta2;
  std::optional<double> eps;
  std::optional<bool> amsgrad;
  // Default: true.
  bool shuffle = true;
  // Default: 0.
  uint64_t seed = 0;
  // Stop after this many steps in all; 0 for no limit. Default: 0.
  int64_t max_steps = 0;
  // Checkpoint every this many steps (besides epoch ends and the end); 0 for only those.
  // Default: 0.
  int64_t checkpoint_every = 0;
  // Continue from <out>/checkpoint. Default: false.
  bool resume = false;
  // gradclient::CallOptions::shards of every call. Default: 1.
  int shards = 1;
  // Where history.jsonl, params/ and checkpoint/ go; created if missing. Required.
  std::string out_dir;
  // Refresh a progress line on stderr ("\r"); main.cc sets it when stderr is a terminal.
  bool progress = false;
};

// gradctl train: trains with cross-entropy through the server and the gradclient Trainer,
// writing <out>/history.jsonl, <out>/params/<name>.npy and <out>/checkpoint/; see
// train_command.cc.
absl::Status RunTrain(const TrainOptions& options);

struct GradcheckOptions {
  // The network, input, parameters and objective, as for grad (connection included);
  // `gradients` must be true. Its out_dir, input_grad, param_grads, skip_output, shards and
  // shared_memory are not used: gradcheck checks the input and every trainable parameter.
  GradOptions request;
  // Coordinates drawn per tensor (all of a smaller tensor). Default: 16.
  int samples = 16;
  // Seeds the choice of coordinates. Default: 0.
  uint64_t seed = 0;
  // The finite-difference step. Default: 1e-3 (kGradcheckTolerance in gradcheck_command.cc
  // says why).
  double eps = 1e-3;
};

// gradctl gradcheck: central finite differences of the loss through the server, on a random
// sample of coordinates of the input and of every trainable parameter, against the gradients
// of one ComputeGradients call. Prints a table per tensor; a DataLoss error names the tensors
// past the tolerance. See gradcheck_command.cc.
absl::Status RunGradcheck(const GradcheckOptions& options);

}  // namespace gradctl

#endif  // CLIENT_GRADCTL_COMMANDS_H_
