#include "gradclient/workloads.h"

#include <random>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace gradclient {
namespace {

using gradengine::ActivationKind;
using gradengine::ActivationSpec;
using gradengine::Conv2dSpec;
using gradengine::LayerSpec;

std::vector<float> RandomValues(int64_t n, std::mt19937* rng) {
  std::normal_distribution<float> dist;
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = dist(*rng);
  return v;
}

int64_t Product(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// Builds a chain of (conv k x k, padding k/2, ReLU) layers with the given channel counts.
Workload ConvReluChain(const std::string& name, int64_t batch, int64_t size,
                       const std::vector<int64_t>& channels, bool relu, bool bias) {
  Workload w;
  w.name = name;
  w.input_shape = {batch, channels[0], size, size};
  std::mt19937 rng(1234);
  w.input = RandomValues(Product(w.input_shape), &rng);
  for (size_t i = 0; i + 1 < channels.size(); ++i) {
    const std::string conv = "conv" + std::to_string(i + 1);
    w.network.layers.push_back(
        LayerSpec{conv, Conv2dSpec::Square(channels[i], channels[i + 1], 3, 1, 1, bias)});
    w.parameters[conv + ".weight"] = {{channels[i + 1], channels[i], 3, 3},
                                      RandomValues(channels[i + 1] * channels[i] * 9, &rng)};
    if (bias) {
      w.parameters[conv + ".bias"] = {{channels[i + 1]}, RandomValues(channels[i + 1], &rng)};
    }
    if (relu) {
      w.network.layers.push_back(
          LayerSpec{"relu" + std::to_string(i + 1), ActivationSpec{ActivationKind::kRelu}});
    }
    w.flops_per_pass += 2.0 * batch * channels[i + 1] * size * size * channels[i] * 9;
  }
  w.output_shape = {batch, channels.back(), size, size};
  w.target = RandomValues(Product(w.output_shape), &rng);
  return w;
}

// A 64 MiB input through one ReLU: almost no compute, so the time is moving the tensors.
Workload InputOutput64MiB() {
  Workload w;
  w.name = "io64";
  w.input_shape = {4, 16, 512, 512};
  std::mt19937 rng(1234);
  w.input = RandomValues(Product(w.input_shape), &rng);
  w.network.layers.push_back(LayerSpec{"relu1", ActivationSpec{ActivationKind::kRelu}});
  w.output_shape = w.input_shape;
  w.target = RandomValues(Product(w.output_shape), &rng);
  return w;
}

}  // namespace

gradengine::ForwardRequest Workload::ForwardOnly() const {
  gradengine::ForwardRequest request;
  request.network = network;
  request.input = gradengine::TensorView(input_shape, input);
  for (const auto& [name, parameter] : parameters) {
    request.parameters[name] = gradengine::TensorView(parameter.shape, parameter.values);
  }
  return request;
}

gradengine::GradientRequest Workload::Request() const {
  gradengine::GradientRequest request;
  request.network = network;
  request.input = gradengine::TensorView(input_shape, input);
  for (const auto& [name, parameter] : parameters) {
    request.parameters[name] = gradengine::TensorView(parameter.shape, parameter.values);
  }
  request.objective = {gradengine::ObjectiveKind::kMse,
                       gradengine::TensorView(output_shape, target)};
  return request;
}

absl::StatusOr<Workload> MakeWorkload(const std::string& name) {
  if (name == "seed1") return ConvReluChain(name, 1, 28, {1, 8}, false, false);
  if (name == "seed4") return ConvReluChain(name, 1, 28, {1, 8, 16, 32, 64}, true, false);
  if (name == "seed4_b32") return ConvReluChain(name, 32, 28, {1, 8, 16, 32, 64}, true, false);
  if (name == "resblock") return ConvReluChain(name, 8, 56, {64, 64, 64}, true, true);
  if (name == "io64") return InputOutput64MiB();
  return absl::InvalidArgumentError(absl::StrCat("workload=", name, " is unknown; expected ",
                                                 absl::StrJoin(WorkloadNames(), ", ")));
}

std::vector<std::string> WorkloadNames() {
  return {"seed1", "seed4", "seed4_b32", "resblock", "io64"};
}

}  // namespace gradclient
