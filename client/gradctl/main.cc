// gradctl: the command-line client of the gradient service. This file holds the flags, copies
// them into the commands' Options (commands.h) and maps the result to the exit status.

#include <unistd.h>

#include <cstdlib>
#include <iostream>
#include <set>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/reflection.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "client/gradctl/cli_util.h"
#include "client/gradctl/commands.h"
#include "gradengine/allocator.h"

namespace gradctl {

// A duration flag that also takes a plain number of seconds: "10", "10s", "1.5m", "500ms".
struct FlagDuration {
  absl::Duration value;
};

bool AbslParseFlag(absl::string_view text, FlagDuration* flag, std::string* error) {
  double seconds = 0;
  if (absl::SimpleAtod(text, &seconds)) {
    flag->value = absl::Seconds(seconds);
    return true;
  }
  if (absl::ParseDuration(text, &flag->value)) return true;
  *error = "expected a duration such as 10s, 500ms or 2m, or a number of seconds";
  return false;
}

std::string AbslUnparseFlag(FlagDuration flag) { return absl::FormatDuration(flag.value); }

}  // namespace gradctl

ABSL_FLAG(std::string, server, "localhost:50051",
          "the server(s): HOST:PORT, IP:PORT,IP:PORT,... or a gRPC target (dns:///NAME:PORT)");
ABSL_FLAG(gradctl::FlagDuration, timeout, gradctl::FlagDuration{absl::Seconds(60)},
          "deadline of each call, retries included");
ABSL_FLAG(bool, tls, false, "speak TLS to the server (implied by the other --tls_ flags)");
ABSL_FLAG(std::string, tls_ca, "", "PEM CA certificate(s) to trust (default: the system's roots)");
ABSL_FLAG(std::string, tls_cert, "", "PEM client certificate chain, for mutual TLS");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert");
ABSL_FLAG(std::string, tls_server_name, "",
          "check the server's certificate against this name instead of the --server host");
ABSL_FLAG(std::string, auth_token_file, "",
          "send the file's first token line as 'authorization: Bearer <token>' (default: "
          "$GRADCTL_AUTH_TOKEN)");
ABSL_FLAG(bool, json, false, "info, bench: print one JSON line");
ABSL_FLAG(std::string, net, "", "grad, forward: the network, protobuf JSON of grad.v1.Network");
ABSL_FLAG(std::string, input, "", "grad, forward: the input .npy");
ABSL_FLAG(std::string, params, "",
          "grad, forward: directory of <layer>.weight.npy/.bias.npy (and .running_mean.npy/"
          ".running_var.npy)");
ABSL_FLAG(std::string, target, "", "grad: MSE objective with this target .npy");
ABSL_FLAG(std::string, grad_output, "", "grad: objective given as dL/d(output) .npy");
ABSL_FLAG(std::string, objective, "",
          "grad: 'sum' for loss = sum(output), 'cross_entropy' for F.cross_entropy with --labels");
ABSL_FLAG(std::string, labels, "", "grad: cross_entropy's class indices, an int64 .npy");
ABSL_FLAG(double, label_smoothing, 0.0, "grad: cross_entropy's label_smoothing");
ABSL_FLAG(int64_t, ignore_index, -100, "grad: cross_entropy's ignore_index");
ABSL_FLAG(bool, no_input_grad, false, "grad: do not compute the input gradient");
ABSL_FLAG(std::string, param_grads, "all", "grad: all, none or NAME,NAME,... (e.g. conv1.bias)");
ABSL_FLAG(bool, skip_output, false, "grad, bench: leave the output out of the response");
ABSL_FLAG(std::string, out, "", "grad, forward: directory for the result .npy files");
ABSL_FLAG(std::string, request_id, "", "grad, forward: request id (default: random)");
ABSL_FLAG(std::string, data, "",
          "demo: directory holding seed_conv1, seed_conv4, seed_layer (default: $GRAD_DEMO_DATA, "
          "else " GRAD_DEMO_DATA_DEFAULT ")");
ABSL_FLAG(std::string, workload, "seed4", "bench: seed1, seed4, seed4_b32, resblock or io64");
ABSL_FLAG(std::string, method, "gradients", "bench: the RPC to send, gradients or forward");
ABSL_FLAG(int, concurrency, 1, "bench: threads issuing requests back to back");
ABSL_FLAG(gradctl::FlagDuration, duration, gradctl::FlagDuration{absl::Seconds(10)},
          "bench: how long to run (unless --requests)");
ABSL_FLAG(int64_t, requests, 0, "bench: how many requests to send in all");
ABSL_FLAG(int, shards, 1,
          "grad, forward, bench: cut the batch into this many parts computed at once on the "
          "servers --server lists, and combine the results");
ABSL_FLAG(bool, shared_memory, false,
          "grad, forward, bench: pass the tensors and results through a shared memory region "
          "(the server must be on this host and run with --allow_shared_memory)");
ABSL_FLAG(bool, verify, false,
          "bench: check every reply against the warm-up reply; a mismatch counts as failed");
ABSL_FLAG(std::string, inputs, "", "train: the training inputs .npy, [N, ...]");
ABSL_FLAG(std::string, test_inputs, "", "train: test inputs .npy, evaluated at each epoch's end");
ABSL_FLAG(std::string, test_labels, "", "train: the test inputs' int64 class indices .npy");
ABSL_FLAG(int64_t, epochs, 0, "train: passes over the training data");
ABSL_FLAG(int64_t, batch, 0, "train: examples per optimizer step");
ABSL_FLAG(std::string, optimizer, "", "train: sgd, adam or adamw (torch.optim's)");
ABSL_FLAG(double, lr, 0.0, "train: learning rate (required with sgd; else torch's default)");
ABSL_FLAG(double, momentum, 0.0, "train: sgd's momentum");
ABSL_FLAG(double, dampening, 0.0, "train: sgd's dampening");
ABSL_FLAG(bool, nesterov, false, "train: sgd's Nesterov momentum");
ABSL_FLAG(double, weight_decay, 0.0,
          "train: weight decay (default: the optimizer's own, 0, or 1e-2 for adamw)");
ABSL_FLAG(double, beta1, 0.9, "train: adam's and adamw's beta1");
ABSL_FLAG(double, beta2, 0.999, "train: adam's and adamw's beta2");
ABSL_FLAG(double, eps, 1e-8,
          "train: adam's and adamw's eps; gradcheck: the finite-difference step (default 1e-3)");
ABSL_FLAG(bool, amsgrad, false, "train: adam's and adamw's AMSGrad variant");
ABSL_FLAG(bool, shuffle, true, "train: visit each epoch's examples in a permutation from --seed");
ABSL_FLAG(uint64_t, seed, 0,
          "train: seed of the permutations and of the initial parameters; gradcheck: seed of "
          "the sampled coordinates");
ABSL_FLAG(int64_t, max_steps, 0, "train: stop after this many optimizer steps (0: no limit)");
ABSL_FLAG(int64_t, checkpoint_every, 0,
          "train: checkpoint every this many steps, besides epoch ends and the end");
ABSL_FLAG(bool, resume, false, "train: continue from OUT/checkpoint");
ABSL_FLAG(int, samples, 16, "gradcheck: coordinates checked per tensor");

namespace {

constexpr char kUsage[] = R"(gradctl: the command-line client of the gradient service.

usage: gradctl COMMAND [flags]

  health    the server's grpc.health.v1 status; fails unless SERVING
  info      what the server is, runs on and accepts            [--json]
  grad      gradients of a network given as files:
              --net=NET.json --input=X.npy --params=DIR --out=OUT, and one objective:
              --target=T.npy (MSE) | --grad_output=G.npy | --objective=sum |
              --objective=cross_entropy --labels=L.npy [--label_smoothing=S] [--ignore_index=I]
              [--no_input_grad] [--param_grads=all|none|NAME,...] [--skip_output]
              [--request_id=ID] [--shards=K] [--shared_memory]
            writes OUT/output.npy, input.grad.npy, <layer>.weight.grad.npy and
            <layer>.bias.grad.npy (and a training batch_norm2d's updated
            <layer>.running_mean.npy and <layer>.running_var.npy), and prints one JSON line:
            loss, server timings, round trip
  forward   the network's output only: --net --input --params --out [--request_id] [--shards=K]
            [--shared_memory]
            writes OUT/output.npy and prints one JSON line
  demo      [conv1|conv4|layer|all] the seed notebook's demos through the server, checked
            against PyTorch                                       [--data=DIR]
  bench     closed-loop load: --workload=seed1|seed4|seed4_b32|resblock|io64 --concurrency=C
            (--duration=10s | --requests=N) [--method=gradients|forward] [--skip_output]
            [--shards=K] [--verify] [--json] [--shared_memory]
  train     trains with cross-entropy: --net=NET.json --inputs=X.npy --labels=Y.npy
              --epochs=E --batch=B --optimizer=sgd|adam|adamw --out=OUT
              [--params=DIR] [--test_inputs=X.npy --test_labels=Y.npy] [--lr=LR]
              [--momentum=M --dampening=D --nesterov] (sgd) [--beta1 --beta2 --eps --amsgrad]
              (adam, adamw) [--weight_decay=W] [--shuffle=true|false] [--seed=S]
              [--max_steps=K] [--checkpoint_every=N] [--resume] [--shards=K]
            torch.optim's update rules and defaults (sgd needs --lr). Without --params the
            parameters are drawn as torch.nn's default initialisation does (the same
            distribution, not the same numbers) from --seed. Writes OUT/history.jsonl (a
            JSON line per step and per epoch), OUT/params/<name>.npy and OUT/checkpoint/
            (every --checkpoint_every steps, each epoch's end and the end; --resume continues
            from it exactly); prints test_accuracy=A with --test_inputs. On a terminal, a
            progress line on stderr.
  gradcheck central finite differences of the loss through the server against the gradients:
              --net=NET.json --input=X.npy --params=DIR and one objective, as for grad
              [--samples=N (default 16)] [--seed=S (default 0)] [--eps=H (default 1e-3)]
            on N random coordinates of the input and of every trainable parameter, the loss
            at x+H and x-H (float32 steps, as taken) against the analytical gradient; a
            coordinate passes when |numeric - analytic| <= 1e-2 * max|analytic| (over the
            tensor's sampled coordinates) + 1e-6 * |loss| / H. Where the one-sided differences
            show a kink within the step (ReLU at 0, a max pool's argmax changing) and explain
            the difference, the coordinate is counted as a kink and skipped. Prints a table per
            tensor; exits 1 naming each tensor that disagrees (or whose every coordinate is
            at a kink)

every command takes --server=TARGET (default localhost:50051): HOST:PORT, a list of IP
addresses A:PORT,B:PORT, unix:/PATH (a unix domain socket), or a gRPC target such as
dns:///NAME:PORT. --shared_memory passes tensors and results through a POSIX shared memory
region instead of the socket, for a server on the same host started with
--allow_shared_memory. Calls are spread over
every server the target names or resolves to (round robin), and a call a server cannot take
(UNAVAILABLE) is retried, landing on another. --shards=K (at most 64) cuts each call's batch
into K parts sent at once (data-parallel), so K servers compute one call together.

every command also takes --timeout=DURATION (deadline of each call, retries included;
default 60s), and for a secured server:
  --tls [--tls_ca=CA.pem] [--tls_cert=CERT.pem --tls_key=KEY.pem] [--tls_server_name=NAME]
            TLS (any --tls_ flag implies --tls); the CA defaults to the system's roots;
            --tls_cert/--tls_key present a client certificate (mutual TLS)
  --auth_token_file=FILE
            sends the file's first token line as "authorization: Bearer <token>";
            without it, the token in $GRADCTL_AUTH_TOKEN, if set

NET.json is a grad.v1.Network in protobuf's JSON mapping, for example
  {"layers": [{"name": "conv1", "conv2d": {"inChannels": 1, "outChannels": 8,
               "kernelSize": [3], "padding": [1], "bias": true}},
              {"name": "relu1", "activation": {"kind": "RELU"}}]}
Parameters are read from DIR/<layer>.weight.npy and DIR/<layer>.bias.npy, a batch_norm2d's
running statistics from DIR/<layer>.running_mean.npy and DIR/<layer>.running_var.npy (optional
in training mode); every .npy is float32 in C order, but --labels, int64 ('<i8'); float64,
float16, big-endian and (for --labels) int32 files are converted, with a note on stderr.

exit status: 0 success; 1 failure, printed as "gradctl: CODE: message"; 2 usage error.
)";

constexpr int kExitFailure = 1;
constexpr int kExitUsage = 2;

struct Command {
  const char* name;
  int max_positional;
  std::set<std::string> flags;  // besides server and timeout
};

const std::vector<Command>& Commands() {
  static const auto* commands = new std::vector<Command>{
      {"health", 0, {}},
      {"info", 0, {"json"}},
      {"grad",
       0,
       {"net", "input", "params", "target", "grad_output", "objective", "labels", "label_smoothing",
        "ignore_index", "no_input_grad", "param_grads", "skip_output", "out", "request_id",
        "shards", "shared_memory"}},
      {"forward", 0, {"net", "input", "params", "out", "request_id", "shards", "shared_memory"}},
      {"demo", 1, {"data"}},
      {"bench",
       0,
       {"workload", "method", "concurrency", "duration", "requests", "skip_output", "shards",
        "verify", "json", "shared_memory"}},
      {"train",
       0,
       {"net", "params", "inputs", "labels", "test_inputs", "test_labels", "epochs", "batch", "out",
        "shards",
        // the optimizer's
        "optimizer", "lr", "momentum", "dampening", "nesterov", "weight_decay", "beta1", "beta2",
        "eps", "amsgrad",
        // the order of the examples, and checkpoints
        "shuffle", "seed", "max_steps", "checkpoint_every", "resume"}},
      {"gradcheck",
       0,
       {"net", "input", "params", "target", "grad_output", "objective", "labels", "label_smoothing",
        "ignore_index", "samples", "seed", "eps"}},
  };
  return *commands;
}

// The names of the flags on the command line ("nojson" counts as "json"). Flags absl would
// reject, undefined or with a malformed value, are usage errors here, before
// absl::ParseCommandLine would exit with its own status.
absl::StatusOr<std::set<std::string>> ScanFlags(int argc, char** argv) {
  std::set<std::string> given;
  for (int i = 1; i < argc; ++i) {
    absl::string_view arg = argv[i];
    if (arg == "--") break;
    if (arg.size() < 2 || arg[0] != '-') continue;
    arg.remove_prefix(arg[1] == '-' ? 2 : 1);
    const size_t equals = arg.find('=');
    const absl::string_view name = arg.substr(0, equals);
    absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
    if (flag == nullptr && absl::StartsWith(name, "no") && equals == absl::string_view::npos) {
      flag = absl::FindCommandLineFlag(name.substr(2));
      if (flag != nullptr && !flag->IsOfType<bool>()) flag = nullptr;
    }
    if (flag == nullptr) return gradctl::UsageError(absl::StrCat("unknown flag --", name));
    given.insert(std::string(flag->Name()));
    if (equals == absl::string_view::npos) continue;
    std::string error;
    if (!flag->ParseFrom(arg.substr(equals + 1), &error)) {
      return gradctl::UsageError(absl::StrCat("--", arg, ": ", error));
    }
  }
  return given;
}

// Fails if a flag given on the command line is not one `command` takes.
absl::Status CheckFlagsBelongTo(const Command& command, const std::set<std::string>& given) {
  std::set<std::string> all_flags;
  for (const Command& each : Commands()) all_flags.insert(each.flags.begin(), each.flags.end());
  for (const std::string& name : given) {
    if (all_flags.count(name) != 0 && command.flags.count(name) == 0) {
      return gradctl::UsageError(
          absl::StrCat("--", name, " is not a flag of gradctl ", command.name));
    }
  }
  return absl::OkStatus();
}

std::string DemoDataDir() {
  std::string dir = absl::GetFlag(FLAGS_data);
  if (!dir.empty()) return dir;
  if (const char* env = std::getenv("GRAD_DEMO_DATA"); env != nullptr && *env != '\0') return env;
  return GRAD_DEMO_DATA_DEFAULT;
}

absl::Status Run(const Command& command, const std::vector<std::string>& positional,
                 const std::set<std::string>& given) {
  gradctl::ConnectionOptions connection;
  connection.server = absl::GetFlag(FLAGS_server);
  connection.timeout = absl::GetFlag(FLAGS_timeout).value;
  connection.tls = absl::GetFlag(FLAGS_tls);
  connection.tls_ca = absl::GetFlag(FLAGS_tls_ca);
  connection.tls_cert = absl::GetFlag(FLAGS_tls_cert);
  connection.tls_key = absl::GetFlag(FLAGS_tls_key);
  connection.tls_server_name = absl::GetFlag(FLAGS_tls_server_name);
  connection.auth_token_file = absl::GetFlag(FLAGS_auth_token_file);
  if (const char* token = std::getenv("GRADCTL_AUTH_TOKEN"); token != nullptr) {
    connection.auth_token = token;
  }
  const std::string name = command.name;
  if (name == "health") return gradctl::RunHealth(connection);
  if (name == "info") {
    gradctl::InfoOptions options;
    options.connection = connection;
    options.json = absl::GetFlag(FLAGS_json);
    return gradctl::RunInfo(options);
  }
  if (name == "grad" || name == "forward") {
    gradctl::GradOptions options;
    options.connection = connection;
    options.gradients = name == "grad";
    options.net_path = absl::GetFlag(FLAGS_net);
    options.input_path = absl::GetFlag(FLAGS_input);
    options.params_dir = absl::GetFlag(FLAGS_params);
    options.target_path = absl::GetFlag(FLAGS_target);
    options.grad_output_path = absl::GetFlag(FLAGS_grad_output);
    options.objective = absl::GetFlag(FLAGS_objective);
    options.labels_path = absl::GetFlag(FLAGS_labels);
    if (given.count("label_smoothing") != 0) {
      options.label_smoothing = absl::GetFlag(FLAGS_label_smoothing);
    }
    if (given.count("ignore_index") != 0) options.ignore_index = absl::GetFlag(FLAGS_ignore_index);
    options.input_grad = !absl::GetFlag(FLAGS_no_input_grad);
    options.param_grads = absl::GetFlag(FLAGS_param_grads);
    options.skip_output = absl::GetFlag(FLAGS_skip_output);
    options.out_dir = absl::GetFlag(FLAGS_out);
    options.request_id = absl::GetFlag(FLAGS_request_id);
    options.shards = absl::GetFlag(FLAGS_shards);
    options.shared_memory = absl::GetFlag(FLAGS_shared_memory);
    return gradctl::RunGrad(options);
  }
  if (name == "demo") {
    gradctl::DemoOptions options;
    options.connection = connection;
    if (!positional.empty()) options.which = positional[0];
    options.data_dir = DemoDataDir();
    return gradctl::RunDemo(options);
  }
  if (name == "train") {
    gradctl::TrainOptions options;
    options.connection = connection;
    options.net_path = absl::GetFlag(FLAGS_net);
    options.params_dir = absl::GetFlag(FLAGS_params);
    options.inputs_path = absl::GetFlag(FLAGS_inputs);
    options.labels_path = absl::GetFlag(FLAGS_labels);
    options.test_inputs_path = absl::GetFlag(FLAGS_test_inputs);
    options.test_labels_path = absl::GetFlag(FLAGS_test_labels);
    options.epochs = absl::GetFlag(FLAGS_epochs);
    options.batch = absl::GetFlag(FLAGS_batch);
    options.optimizer = absl::GetFlag(FLAGS_optimizer);
    // Unset hyperparameters keep the optimizer's own defaults.
    if (given.count("lr") != 0) options.lr = absl::GetFlag(FLAGS_lr);
    if (given.count("momentum") != 0) options.momentum = absl::GetFlag(FLAGS_momentum);
    if (given.count("dampening") != 0) options.dampening = absl::GetFlag(FLAGS_dampening);
    if (given.count("nesterov") != 0) options.nesterov = absl::GetFlag(FLAGS_nesterov);
    if (given.count("weight_decay") != 0) options.weight_decay = absl::GetFlag(FLAGS_weight_decay);
    if (given.count("beta1") != 0) options.beta1 = absl::GetFlag(FLAGS_beta1);
    if (given.count("beta2") != 0) options.beta2 = absl::GetFlag(FLAGS_beta2);
    if (given.count("eps") != 0) options.eps = absl::GetFlag(FLAGS_eps);
    if (given.count("amsgrad") != 0) options.amsgrad = absl::GetFlag(FLAGS_amsgrad);
    options.shuffle = absl::GetFlag(FLAGS_shuffle);
    options.seed = absl::GetFlag(FLAGS_seed);
    options.max_steps = absl::GetFlag(FLAGS_max_steps);
    options.checkpoint_every = absl::GetFlag(FLAGS_checkpoint_every);
    options.resume = absl::GetFlag(FLAGS_resume);
    options.shards = absl::GetFlag(FLAGS_shards);
    options.out_dir = absl::GetFlag(FLAGS_out);
    options.progress = isatty(STDERR_FILENO) != 0;
    return gradctl::RunTrain(options);
  }
  if (name == "gradcheck") {
    gradctl::GradcheckOptions options;
    gradctl::GradOptions& request = options.request;
    request.connection = connection;
    request.net_path = absl::GetFlag(FLAGS_net);
    request.input_path = absl::GetFlag(FLAGS_input);
    request.params_dir = absl::GetFlag(FLAGS_params);
    request.target_path = absl::GetFlag(FLAGS_target);
    request.grad_output_path = absl::GetFlag(FLAGS_grad_output);
    request.objective = absl::GetFlag(FLAGS_objective);
    request.labels_path = absl::GetFlag(FLAGS_labels);
    if (given.count("label_smoothing") != 0) {
      request.label_smoothing = absl::GetFlag(FLAGS_label_smoothing);
    }
    if (given.count("ignore_index") != 0) request.ignore_index = absl::GetFlag(FLAGS_ignore_index);
    options.samples = absl::GetFlag(FLAGS_samples);
    options.seed = absl::GetFlag(FLAGS_seed);
    // --eps is also train's, with its own default.
    if (given.count("eps") != 0) options.eps = absl::GetFlag(FLAGS_eps);
    return gradctl::RunGradcheck(options);
  }
  gradctl::BenchOptions options;
  options.connection = connection;
  options.workload = absl::GetFlag(FLAGS_workload);
  options.concurrency = absl::GetFlag(FLAGS_concurrency);
  if (given.count("duration") != 0) {
    options.duration = absl::GetFlag(FLAGS_duration).value;
  }
  if (given.count("requests") != 0) {
    options.requests = absl::GetFlag(FLAGS_requests);
  }
  options.skip_output = absl::GetFlag(FLAGS_skip_output);
  const std::string method = absl::GetFlag(FLAGS_method);
  if (method != "gradients" && method != "forward") {
    return gradctl::UsageError(
        absl::StrCat("--method=", method, " is unknown; expected gradients or forward"));
  }
  options.forward = method == "forward";
  options.shards = absl::GetFlag(FLAGS_shards);
  options.verify = absl::GetFlag(FLAGS_verify);
  options.shared_memory = absl::GetFlag(FLAGS_shared_memory);
  options.json = absl::GetFlag(FLAGS_json);
  options.progress = isatty(STDERR_FILENO) != 0;
  return gradctl::RunBench(options);
}

int Fail(const absl::Status& status) {
  if (gradctl::IsUsageError(status)) {
    std::cerr << "gradctl: " << status.message() << "\n(gradctl help shows the usage)\n";
    return kExitUsage;
  }
  std::cerr << "gradctl: " << absl::StatusCodeToString(status.code()) << ": " << status.message()
            << "\n";
  return kExitFailure;
}

}  // namespace

int main(int argc, char** argv) {
  gradengine::KeepFreedMemoryForReuse();
  absl::SetProgramUsageMessage(kUsage);
  absl::StatusOr<std::set<std::string>> given = ScanFlags(argc, argv);
  if (!given.ok()) return Fail(given.status());
  const std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  if (args.size() < 2) {
    std::cerr << kUsage;
    return kExitUsage;
  }
  const std::string name = args[1];
  if (name == "help") {
    std::cout << kUsage;
    return 0;
  }
  const Command* command = nullptr;
  for (const Command& each : Commands()) {
    if (each.name == name) command = &each;
  }
  if (command == nullptr) {
    return Fail(gradctl::UsageError(absl::StrCat("unknown command \"", name, "\"")));
  }
  const std::vector<std::string> positional(args.begin() + 2, args.end());
  if (static_cast<int>(positional.size()) > command->max_positional) {
    return Fail(gradctl::UsageError(
        absl::StrCat("gradctl ", name, " takes ",
                     command->max_positional == 0 ? "no arguments" : "at most one argument", "; \"",
                     positional[command->max_positional], "\" is one too many")));
  }
  if (absl::Status s = CheckFlagsBelongTo(*command, *given); !s.ok()) return Fail(s);
  if (absl::Status s = Run(*command, positional, *given); !s.ok()) return Fail(s);
  return 0;
}
