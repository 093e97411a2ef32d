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

}  // namespace gradctl

#endif  // CLIENT_GRADCTL_COMMANDS_H_
