// gradctl grad and gradctl forward: a request made of files, results written as files.

#include <filesystem>
#include <iostream>
#include <map>
#include <memory>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "client/gradctl/cli_util.h"
#include "client/gradctl/commands.h"
#include "client/gradctl/grad_request.h"
#include "gradclient/client.h"
#include "gradclient/npy.h"
#include "gradengine/network.h"
#include "gradengine/tensor.h"

namespace gradctl {

using gradengine::Tensor;

absl::Status CheckObjectiveOptions(const GradOptions& options, absl::string_view command) {
  if (!options.objective.empty() && options.objective != "sum" &&
      options.objective != "cross_entropy") {
    return UsageError(
        absl::StrCat("--objective=", options.objective,
                     " is not an objective flag value; expected sum or cross_entropy (MSE is "
                     "--target=T.npy, a given dL/dy --grad_output=G.npy)"));
  }
  const int objectives =
      !options.target_path.empty() + !options.grad_output_path.empty() + !options.objective.empty();
  if (objectives != 1) {
    return UsageError(
        absl::StrCat("gradctl ", command,
                     " needs exactly one objective: --target=T.npy (MSE), --grad_output=G.npy, "
                     "--objective=sum or --objective=cross_entropy --labels=L.npy; ",
                     objectives == 0 ? "none was given" : "several were given"));
  }
  const bool cross_entropy = options.objective == "cross_entropy";
  if (cross_entropy && options.labels_path.empty()) {
    return UsageError("--objective=cross_entropy needs --labels=L.npy (int64 class indices)");
  }
  if (!cross_entropy) {
    for (const auto& [flag, given] :
         {std::pair<const char*, bool>{"--labels", !options.labels_path.empty()},
          std::pair<const char*, bool>{"--label_smoothing", options.label_smoothing.has_value()},
          std::pair<const char*, bool>{"--ignore_index", options.ignore_index.has_value()}}) {
      if (given) return UsageError(absl::StrCat(flag, " goes only with --objective=cross_entropy"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<RequestData> ReadRequestData(const GradOptions& options) {
  RequestData data;
  absl::StatusOr<gradengine::NetworkSpec> network = ReadNetworkFile(options.net_path);
  if (!network.ok()) return network.status();
  data.network = *std::move(network);
  absl::StatusOr<Tensor> input = ReadFloatNpy(options.input_path);
  if (!input.ok()) return input.status();
  data.input = *std::move(input);
  if (absl::Status s = ReadParameters(data.network, options.params_dir, &data.parameters);
      !s.ok()) {
    return s;
  }
  if (options.gradients && !options.labels_path.empty()) {
    absl::StatusOr<gradclient::NpyInt64Array> labels = ReadLabelsNpy(options.labels_path);
    if (!labels.ok()) return labels.status();
    data.labels = *std::move(labels);
  }
  const std::string& objective_path =
      !options.target_path.empty() ? options.target_path : options.grad_output_path;
  if (options.gradients && !objective_path.empty()) {
    absl::StatusOr<Tensor> tensor = ReadFloatNpy(objective_path);
    if (!tensor.ok()) return tensor.status();
    data.objective_tensor = *std::move(tensor);
  }
  return data;
}

gradengine::Objective MakeObjective(const GradOptions& options, const RequestData& data) {
  gradengine::Objective objective;
  if (!options.target_path.empty()) {
    objective = {gradengine::ObjectiveKind::kMse, data.objective_tensor.view()};
  } else if (!options.grad_output_path.empty()) {
    objective = {gradengine::ObjectiveKind::kGradOutput, data.objective_tensor.view()};
  } else if (options.objective == "cross_entropy") {
    objective.kind = gradengine::ObjectiveKind::kCrossEntropy;
    objective.labels = {data.labels.shape, data.labels.data.data(),
                        static_cast<int64_t>(data.labels.data.size())};
    objective.label_smoothing = options.label_smoothing.value_or(0.0);
    if (options.ignore_index.has_value()) objective.ignore_index = *options.ignore_index;
  } else {
    objective = {gradengine::ObjectiveKind::kSum, {}};
  }
  return objective;
}

namespace {

absl::Status CheckOptions(const GradOptions& options) {
  const char* command = options.gradients ? "grad" : "forward";
  struct Required {
    const char* flag;
    const std::string* value;
  };
  for (const Required& required :
       {Required{"--net", &options.net_path}, Required{"--input", &options.input_path},
        Required{"--params", &options.params_dir}, Required{"--out", &options.out_dir}}) {
    if (required.value->empty()) {
      return UsageError(absl::StrCat("gradctl ", command, " needs ", required.flag));
    }
  }
  if (options.shards < 1 || options.shards > gradclient::kMaxShards) {
    return UsageError(
        absl::StrCat("--shards=", options.shards, " is out of range 1..", gradclient::kMaxShards));
  }
  if (!options.gradients) return absl::OkStatus();
  if (absl::Status s = CheckObjectiveOptions(options, command); !s.ok()) return s;
  if (options.param_grads.empty()) {
    return UsageError("--param_grads is empty; expected all, none or NAME,NAME,...");
  }
  return absl::OkStatus();
}

gradengine::GradientSelection Selection(const GradOptions& options) {
  gradengine::GradientSelection selection;
  selection.input = options.input_grad;
  if (options.param_grads == "all") return selection;
  selection.all_parameters = false;
  if (options.param_grads == "none") return selection;
  for (absl::string_view name : absl::StrSplit(options.param_grads, ',', absl::SkipEmpty())) {
    selection.parameters.emplace_back(name);
  }
  return selection;
}

std::string TimingJson(const gradclient::CallInfo& call) {
  return absl::StrCat("\"request_id\":", JsonString(call.request_id),
                      ",\"round_trip_ms\":", JsonMilliseconds(call.round_trip),
                      ",\"attempts\":", call.attempts,
                      ",\"server_ms\":{\"decode\":", JsonMilliseconds(call.timing.decode),
                      ",\"queue\":", JsonMilliseconds(call.timing.queue),
                      ",\"forward\":", JsonMilliseconds(call.timing.forward),
                      ",\"backward\":", JsonMilliseconds(call.timing.backward),
                      ",\"encode\":", JsonMilliseconds(call.timing.encode), "}");
}

// Writes `tensor` to <out_dir>/<file> and records the path in `written`.
absl::Status WriteResult(const std::string& out_dir, const std::string& file, const Tensor& tensor,
                         std::vector<std::string>* written) {
  // The names come from the network's layer names; keep them inside out_dir.
  if (file.find('/') != std::string::npos || file.rfind('.', 0) == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("result name \"", file, "\" cannot be a file name in ", out_dir));
  }
  const std::string path = (std::filesystem::path(out_dir) / file).string();
  if (absl::Status s = gradclient::WriteNpyFile(path, tensor.shape, tensor.data); !s.ok()) {
    return s;
  }
  written->push_back(path);
  return absl::OkStatus();
}

// The updated running statistics as <out_dir>/<name>.npy ("bn1.running_mean.npy"), the names
// --params reads them by, so that the directory can feed the next call.
absl::Status WriteRunningStats(const std::string& out_dir,
                               const gradengine::ParameterTensors& running_stats,
                               std::vector<std::string>* written) {
  for (const auto& [name, tensor] : running_stats) {
    if (absl::Status s = WriteResult(out_dir, name + ".npy", tensor, written); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status MakeOutDir(const std::string& out_dir) {
  std::error_code error;
  std::filesystem::create_directories(out_dir, error);
  if (error) {
    return absl::Status(absl::ErrnoToStatusCode(error.value()),
                        absl::StrCat(out_dir, ": cannot create the directory: ", error.message()));
  }
  return absl::OkStatus();
}

std::string FilesJson(const std::vector<std::string>& written) {
  std::vector<std::string> quoted;
  for (const std::string& path : written) quoted.push_back(JsonString(path));
  return absl::StrCat("[", absl::StrJoin(quoted, ","), "]");
}

}  // namespace

absl::Status RunGrad(const GradOptions& options) {
  if (absl::Status s = CheckOptions(options); !s.ok()) return s;
  absl::StatusOr<RequestData> data = ReadRequestData(options);
  if (!data.ok()) return data.status();
  if (absl::Status s = MakeOutDir(options.out_dir); !s.ok()) return s;
  absl::StatusOr<std::unique_ptr<gradclient::Client>> client = Connect(options.connection);
  if (!client.ok()) return client.status();

  gradclient::CallOptions call;
  call.request_id = options.request_id;
  call.skip_output = options.skip_output;
  call.shards = options.shards;
  gradengine::ParameterViews parameters;
  for (const auto& [name, tensor] : data->parameters) parameters[name] = tensor.view();
  std::vector<std::string> written;

  gradengine::GradientRequest request;
  request.network = data->network;
  request.parameters = parameters;
  request.input = data->input.view();
  request.objective = MakeObjective(options, *data);
  request.gradients = Selection(options);
  // Declared after `client`, so destroyed (unregistered) before it.
  StagedRequest staged;
  if (options.shared_memory) {
    if (options.shards > 1) return UsageError("--shared_memory does not go with --shards");
    absl::StatusOr<StagedRequest> made = StageInSharedMemory(**client, &request, 1);
    if (!made.ok()) return made.status();
    staged = *std::move(made);
    call.result_region = staged.region;
    call.result_offset = staged.ResultOffset(0);
  }

  if (!options.gradients) {
    gradengine::ForwardRequest forward;
    forward.network = request.network;
    forward.parameters = request.parameters;
    forward.input = request.input;
    absl::StatusOr<gradclient::ForwardReply> reply = (*client)->Forward(forward, call);
    if (!reply.ok()) return reply.status();
    if (absl::Status s = WriteResult(options.out_dir, "output.npy", reply->result.output, &written);
        !s.ok()) {
      return s;
    }
    if (absl::Status s = WriteRunningStats(options.out_dir, reply->result.running_stats, &written);
        !s.ok()) {
      return s;
    }
    std::cout << "{\"output_shape\":[" << absl::StrJoin(reply->result.output.shape, ",") << "],"
              << TimingJson(reply->call) << ",\"files\":" << FilesJson(written) << "}\n";
    return absl::OkStatus();
  }

  absl::StatusOr<gradclient::GradientReply> reply = (*client)->ComputeGradients(request, call);
  if (!reply.ok()) return reply.status();

  const gradengine::GradientResult& result = reply->result;
  if (!options.skip_output) {
    if (absl::Status s = WriteResult(options.out_dir, "output.npy", result.output, &written);
        !s.ok()) {
      return s;
    }
  }
  if (result.input_grad.has_value()) {
    if (absl::Status s =
            WriteResult(options.out_dir, "input.grad.npy", *result.input_grad, &written);
        !s.ok()) {
      return s;
    }
  }
  for (const auto& [name, grad] : result.parameter_grads) {
    if (absl::Status s = WriteResult(options.out_dir, name + ".grad.npy", grad, &written);
        !s.ok()) {
      return s;
    }
  }
  if (absl::Status s = WriteRunningStats(options.out_dir, result.running_stats, &written);
      !s.ok()) {
    return s;
  }
  std::cout << "{\"loss\":" << (result.loss.has_value() ? JsonNumber(*result.loss) : "null") << ","
            << TimingJson(reply->call) << ",\"files\":" << FilesJson(written) << "}\n";
  return absl::OkStatus();
}

}  // namespace gradctl
