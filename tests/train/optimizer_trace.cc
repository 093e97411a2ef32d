// optimizer_trace OUT_DIR: records 50 optimizer steps of gradclient's optimizers on gradients
// from the service, for optimizer_torch_test.py to replay through torch.optim.
//
// It starts an in-process gradserver on a free loopback port and trains a small CNN (conv2d,
// batch_norm2d, relu, max_pool2d, linear) with cross-entropy on fixed random data, once per
// optimizer configuration. For configuration C it writes
//   OUT_DIR/C/config.json             {"optimizer": "sgd"|"adam"|"adamw", "kwargs": {...}}, the
//                                     torch.optim constructor's keyword arguments, made from
//                                     the same gradclient options the C++ side steps with
//   OUT_DIR/C/step_K/params/P.npy     parameter P before step K (K = 1..50)
//   OUT_DIR/C/step_K/grads/P.npy      the gradient of P the server returned for step K
//   OUT_DIR/C/final/P.npy             P after step 50
// and OUT_DIR/configs.txt, one configuration name a line. Exit status 0 on success, else 1 with
// the error on stderr.

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "gradclient/client.h"
#include "gradclient/npy.h"
#include "gradclient/optimizer.h"
#include "gradclient/trainer.h"
#include "gradengine/network.h"
#include "gradengine/overloaded.h"
#include "gradengine/tensor.h"
#include "server/server.h"

namespace {

namespace fs = std::filesystem;
using gradclient::AdamOptions;
using gradclient::AdamWOptions;
using gradclient::OptimizerOptions;
using gradclient::SgdOptions;
using gradengine::ParameterTensors;
using gradengine::Tensor;

constexpr int kSteps = 50;
constexpr int64_t kExamples = 64;
constexpr int64_t kBatch = 16;
constexpr int64_t kClasses = 5;

using gradengine::Overloaded;

gradengine::NetworkSpec Network() {
  gradengine::NetworkSpec network;
  network.layers.emplace_back("conv1", gradengine::Conv2dSpec::Square(1, 4, 3, 1, 1));
  gradengine::BatchNorm2dSpec batch_norm;
  batch_norm.num_features = 4;
  network.layers.emplace_back("bn1", batch_norm);
  network.layers.emplace_back("relu1", gradengine::ActivationSpec{});
  network.layers.emplace_back("pool1", gradengine::MaxPool2dSpec::Square(2));
  network.layers.emplace_back("fc", gradengine::LinearSpec{4 * 4 * 4, kClasses, true});
  return network;
}

struct Config {
  std::string name;
  OptimizerOptions options;
};

// The seven configurations, with hyperparameters away from the defaults where that exercises
// more of the update rule.
std::vector<Config> Configs() {
  SgdOptions plain;
  plain.lr = 0.05;
  SgdOptions momentum;
  momentum.lr = 0.03;
  momentum.momentum = 0.9;
  momentum.dampening = 0.3;
  momentum.weight_decay = 1e-2;
  SgdOptions nesterov;
  nesterov.lr = 0.02;
  nesterov.momentum = 0.8;
  nesterov.nesterov = true;
  AdamOptions adam;
  adam.lr = 3e-3;
  AdamOptions adam_amsgrad;
  adam_amsgrad.lr = 2e-3;
  adam_amsgrad.beta1 = 0.8;
  adam_amsgrad.beta2 = 0.99;
  adam_amsgrad.eps = 1e-6;
  adam_amsgrad.weight_decay = 5e-2;
  adam_amsgrad.amsgrad = true;
  AdamWOptions adamw;
  adamw.lr = 4e-3;
  AdamWOptions adamw_amsgrad;
  adamw_amsgrad.lr = 1e-3;
  adamw_amsgrad.beta1 = 0.85;
  adamw_amsgrad.weight_decay = 0.1;
  adamw_amsgrad.amsgrad = true;
  return {{"sgd_plain", plain},
          {"sgd_momentum_dampening_decay", momentum},
          {"sgd_nesterov", nesterov},
          {"adam", adam},
          {"adam_amsgrad_decay", adam_amsgrad},
          {"adamw", adamw},
          {"adamw_amsgrad", adamw_amsgrad}};
}

std::string Number(double value) { return absl::StrFormat("%.17g", value); }

// torch.optim's constructor arguments for `options`.
std::string ConfigJson(const OptimizerOptions& options) {
  const std::string kwargs = std::visit(
      Overloaded{
          [](const SgdOptions& sgd) {
            return absl::StrCat("{\"lr\": ", Number(*sgd.lr),
                                ", \"momentum\": ", Number(sgd.momentum),
                                ", \"dampening\": ", Number(sgd.dampening),
                                ", \"weight_decay\": ", Number(sgd.weight_decay),
                                ", \"nesterov\": ", sgd.nesterov ? "true" : "false", "}");
          },
          [](const auto& adam) {
            return absl::StrCat("{\"lr\": ", Number(adam.lr), ", \"betas\": [", Number(adam.beta1),
                                ", ", Number(adam.beta2), "], \"eps\": ", Number(adam.eps),
                                ", \"weight_decay\": ", Number(adam.weight_decay),
                                ", \"amsgrad\": ", adam.amsgrad ? "true" : "false", "}");
          },
      },
      options);
  return absl::StrCat("{\"optimizer\": \"", gradclient::OptimizerName(options),
                      "\", \"kwargs\": ", kwargs, "}\n");
}

absl::Status WriteTensors(const fs::path& dir, const ParameterTensors& tensors,
                          const std::vector<std::string>& names) {
  std::error_code error;
  fs::create_directories(dir, error);
  if (error) return absl::InternalError(absl::StrCat("cannot create ", dir.string()));
  for (const std::string& name : names) {
    const Tensor& tensor = tensors.at(name);
    if (absl::Status s =
            gradclient::WriteNpyFile((dir / (name + ".npy")).string(), tensor.shape, tensor.data);
        !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

absl::Status Trace(gradclient::Client& client, const Config& config, const fs::path& dir) {
  const gradengine::NetworkSpec network = Network();
  // The same start and data for every configuration.
  ParameterTensors parameters = gradclient::InitializeParameters(network, /*seed=*/7);
  std::vector<std::string> trainable;
  for (const gradengine::LayerSpec& layer : network.layers) {
    for (const gradengine::ParameterInfo& info : gradengine::LayerParameters(layer)) {
      if (info.trainable) trainable.push_back(info.name);
    }
  }
  std::mt19937 random(11);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Tensor inputs = Tensor::Uninitialized({kExamples, 1, 8, 8});
  for (float& value : inputs.data) value = normal(random);
  std::vector<int64_t> labels(kExamples);
  for (int64_t& label : labels) label = static_cast<int64_t>(random() % kClasses);

  absl::StatusOr<std::unique_ptr<gradclient::Optimizer>> optimizer =
      gradclient::Optimizer::Create(config.options);
  if (!optimizer.ok()) return optimizer.status();
  {
    std::ofstream json(dir / "config.json");
    json << ConfigJson(config.options);
    if (!json) return absl::InternalError(absl::StrCat("cannot write ", dir.string()));
  }
  const int64_t row_size = 8 * 8;
  for (int step = 1; step <= kSteps; ++step) {
    // Batch k holds rows (k * kBatch + i) % kExamples: every step sees other gradients.
    const int64_t first = (step - 1) * kBatch % kExamples;
    Tensor input({kBatch, 1, 8, 8}, gradengine::TensorBuffer::Uninitialized(kBatch * row_size));
    std::vector<int64_t> batch_labels(kBatch);
    for (int64_t r = 0; r < kBatch; ++r) {
      const int64_t example = (first + r) % kExamples;
      std::copy_n(inputs.data.data() + example * row_size, row_size,
                  input.data.data() + r * row_size);
      batch_labels[static_cast<size_t>(r)] = labels[static_cast<size_t>(example)];
    }
    gradengine::GradientRequest request;
    request.network = network;
    for (const auto& [name, tensor] : parameters) request.parameters[name] = tensor.view();
    request.input = input.view();
    request.objective.kind = gradengine::ObjectiveKind::kCrossEntropy;
    request.objective.labels = {{kBatch}, batch_labels.data(), kBatch};
    request.gradients.input = false;
    absl::StatusOr<gradclient::GradientReply> reply = client.ComputeGradients(request);
    if (!reply.ok()) return reply.status();
    const fs::path step_dir = dir / absl::StrCat("step_", step);
    if (absl::Status s = WriteTensors(step_dir / "params", parameters, trainable); !s.ok()) {
      return s;
    }
    if (absl::Status s = WriteTensors(step_dir / "grads", reply->result.parameter_grads, trainable);
        !s.ok()) {
      return s;
    }
    ParameterTensors gradients;
    for (const std::string& name : trainable) {
      gradients[name] = reply->result.parameter_grads.at(name);
    }
    if (absl::Status s = (*optimizer)->Step(gradients, &parameters); !s.ok()) return s;
    for (auto& [name, tensor] : reply->result.running_stats) parameters[name] = std::move(tensor);
  }
  return WriteTensors(dir / "final", parameters, trainable);
}

absl::Status Run(const fs::path& out) {
  gradserver::ServerOptions options;
  options.address = "127.0.0.1:0";
  options.threads_per_request = 1;
  options.log_requests = false;
  absl::StatusOr<std::unique_ptr<gradserver::Server>> server = gradserver::Server::Create(options);
  if (!server.ok()) return server.status();
  absl::StatusOr<std::unique_ptr<gradclient::Client>> client =
      gradclient::Client::Create((*server)->listening_address());
  if (!client.ok()) return client.status();
  std::ofstream names(out / "configs.txt");
  for (const Config& config : Configs()) {
    const fs::path dir = out / config.name;
    std::error_code error;
    fs::create_directories(dir, error);
    if (error) return absl::InternalError(absl::StrCat("cannot create ", dir.string()));
    if (absl::Status s = Trace(**client, config, dir); !s.ok()) {
      return absl::Status(s.code(), absl::StrCat(config.name, ": ", s.message()));
    }
    names << config.name << "\n";
  }
  names.close();
  if (!names) return absl::InternalError("cannot write configs.txt");
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: optimizer_trace OUT_DIR\n";
    return 2;
  }
  if (absl::Status s = Run(argv[1]); !s.ok()) {
    std::cerr << "optimizer_trace: " << s << "\n";
    return 1;
  }
  return 0;
}
