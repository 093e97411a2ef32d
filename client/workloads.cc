#include "gradclient/workloads.h"

#include <cmath>
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

// Normal values times 1/sqrt(fan_in), PyTorch's initial scale.
std::vector<float> ScaledValues(int64_t n, int64_t fan_in, std::mt19937* rng) {
  std::vector<float> values = RandomValues(n, rng);
  const float scale = 1.0f / std::sqrt(static_cast<float>(fan_in));
  for (float& v : values) v *= scale;
  return values;
}

void AddConv(Workload* w, const std::string& name, const gradengine::Conv2dSpec& conv,
             int64_t out_pixels, std::mt19937* rng) {
  w->network.layers.push_back(LayerSpec{name, conv});
  const int64_t fan_in = conv.in_channels * conv.kernel_h * conv.kernel_w;
  w->parameters[name + ".weight"] = {
      {conv.out_channels, conv.in_channels, conv.kernel_h, conv.kernel_w},
      ScaledValues(conv.out_channels * fan_in, fan_in, rng)};
  if (conv.bias) {
    w->parameters[name + ".bias"] = {{conv.out_channels},
                                     ScaledValues(conv.out_channels, fan_in, rng)};
  }
  w->flops_per_pass += 2.0 * static_cast<double>(w->input_shape[0] * out_pixels) *
                       static_cast<double>(conv.out_channels * fan_in);
}

void AddLinear(Workload* w, const std::string& name, int64_t in, int64_t out, std::mt19937* rng) {
  w->network.layers.push_back(LayerSpec{name, gradengine::LinearSpec{in, out, true}});
  w->parameters[name + ".weight"] = {{out, in}, ScaledValues(out * in, in, rng)};
  w->parameters[name + ".bias"] = {{out}, ScaledValues(out, in, rng)};
  w->flops_per_pass += 2.0 * static_cast<double>(w->input_shape[0] * in * out);
}

LayerSpec Relu(const std::string& name) {
  return LayerSpec{name, ActivationSpec{ActivationKind::kRelu}};
}

Workload LeNet(const std::string& name, int64_t batch) {
  Workload w;
  w.name = name;
  w.input_shape = {batch, 1, 28, 28};
  std::mt19937 rng(1234);
  w.input = RandomValues(Product(w.input_shape), &rng);
  AddConv(&w, "conv1", Conv2dSpec::Square(1, 6, 5, 1, 2), 28 * 28, &rng);
  w.network.layers.push_back(Relu("relu1"));
  w.network.layers.push_back(LayerSpec{"pool1", gradengine::MaxPool2dSpec::Square(2)});
  AddConv(&w, "conv2", Conv2dSpec::Square(6, 16, 5), 10 * 10, &rng);
  w.network.layers.push_back(Relu("relu2"));
  w.network.layers.push_back(LayerSpec{"pool2", gradengine::MaxPool2dSpec::Square(2)});
  AddLinear(&w, "fc1", 400, 120, &rng);
  w.network.layers.push_back(Relu("relu3"));
  AddLinear(&w, "fc2", 120, 84, &rng);
  w.network.layers.push_back(Relu("relu4"));
  AddLinear(&w, "fc3", 84, 10, &rng);
  w.output_shape = {batch, 10};
  std::uniform_int_distribution<int64_t> classes(0, 9);
  for (int64_t i = 0; i < batch; ++i) w.labels.push_back(classes(rng));
  return w;
}

// torch.nn.BatchNorm2d in training mode, its weight and bias near PyTorch's 1 and 0.
void AddBatchNorm(Workload* w, const std::string& name, int64_t channels, std::mt19937* rng) {
  gradengine::BatchNorm2dSpec bn;
  bn.num_features = channels;
  w->network.layers.push_back(LayerSpec{name, bn});
  std::vector<float> weight = RandomValues(channels, rng);
  for (float& v : weight) v = 1.0f + 0.1f * v;
  std::vector<float> bias = RandomValues(channels, rng);
  for (float& v : bias) v *= 0.1f;
  w->parameters[name + ".weight"] = {{channels}, std::move(weight)};
  w->parameters[name + ".bias"] = {{channels}, std::move(bias)};
}

Workload ResNetBlock(const std::string& name, int64_t batch, int64_t channels, int64_t size) {
  Workload w;
  w.name = name;
  w.input_shape = {batch, channels, size, size};
  std::mt19937 rng(1234);
  w.input = RandomValues(Product(w.input_shape), &rng);
  const Conv2dSpec conv = Conv2dSpec::Square(channels, channels, 3, 1, 1, /*bias=*/false);
  AddConv(&w, "conv1", conv, size * size, &rng);
  AddBatchNorm(&w, "bn1", channels, &rng);
  w.network.layers.push_back(Relu("relu1"));
  AddConv(&w, "conv2", conv, size * size, &rng);
  AddBatchNorm(&w, "bn2", channels, &rng);
  w.network.layers.push_back(
      LayerSpec{"add", gradengine::AddSpec{std::string(gradengine::kNetworkInput)}});
  w.network.layers.push_back(Relu("relu2"));
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
  if (!labels.empty()) {
    request.objective = gradengine::Objective(gradengine::ObjectiveKind::kCrossEntropy);
    request.objective.labels = {
        {output_shape[0]}, labels.data(), static_cast<int64_t>(labels.size())};
  } else {
    request.objective = {gradengine::ObjectiveKind::kMse,
                         gradengine::TensorView(output_shape, target)};
  }
  return request;
}

absl::StatusOr<Workload> MakeWorkload(const std::string& name) {
  if (name == "seed1") return ConvReluChain(name, 1, 28, {1, 8}, false, false);
  if (name == "seed4") return ConvReluChain(name, 1, 28, {1, 8, 16, 32, 64}, true, false);
  if (name == "seed4_b32") return ConvReluChain(name, 32, 28, {1, 8, 16, 32, 64}, true, false);
  if (name == "resblock") return ConvReluChain(name, 8, 56, {64, 64, 64}, true, true);
  if (name == "lenet_b64") return LeNet(name, 64);
  if (name == "resnet_block") return ResNetBlock(name, 8, 64, 56);
  if (name == "io64") return InputOutput64MiB();
  return absl::InvalidArgumentError(absl::StrCat("workload=", name, " is unknown; expected ",
                                                 absl::StrJoin(WorkloadNames(), ", ")));
}

std::vector<std::string> WorkloadNames() {
  return {"seed1", "seed4", "seed4_b32", "resblock", "lenet_b64", "resnet_block", "io64"};
}

}  // namespace gradclient
