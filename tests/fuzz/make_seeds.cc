// Writes the generated seeds of the fuzz targets' corpora, built with the project's own
// encoders, so that each run starts from valid inputs:
//
//   build-fuzz/tests/fuzz/fuzz_make_seeds tests/fuzz/corpus
//
// writes corpus/<target>/<seed> for request_decode_fuzzer, request_framing_fuzzer, npy_fuzzer
// and network_json_fuzzer, replacing only the files it names. The regression inputs beside
// them, and validate_network_fuzzer's corpus (FuzzedDataProvider bytes, which have no encoder),
// come from fuzzing runs (tests/fuzz/README.md).

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "google/protobuf/util/json_util.h"
#include "grad/v1/gradient_service.pb.h"
#include "gradclient/npy.h"
#include "gradengine/network.h"
#include "gradengine/tensor.h"
#include "proto/wire.h"

namespace gradfuzz {
namespace {

using gradengine::ActivationKind;
using gradengine::ActivationSpec;
using gradengine::Conv2dSpec;
using gradengine::NetworkSpec;
using gradengine::Tensor;

std::filesystem::path out_dir;

void Write(const std::string& target, const std::string& name, const std::string& bytes) {
  const std::filesystem::path dir = out_dir / target;
  std::filesystem::create_directories(dir);
  std::ofstream file(dir / name, std::ios::binary | std::ios::trunc);
  file.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!file) {
    std::cerr << "cannot write " << (dir / name).string() << "\n";
    std::exit(1);
  }
}

Tensor Ramp(std::vector<int64_t> shape, float start) {
  Tensor tensor = Tensor::Zeros(std::move(shape));
  for (size_t i = 0; i < tensor.data.size(); ++i) {
    tensor.data[i] = start + 0.25f * static_cast<float>(i % 13);
  }
  return tensor;
}

// A network with its input and parameters, owning the bytes the engine request views.
struct Sample {
  NetworkSpec network;
  Tensor input;
  std::map<std::string, Tensor> parameters;
  Tensor objective;

  gradengine::ParameterViews Views() const {
    gradengine::ParameterViews views;
    for (const auto& [name, tensor] : parameters) views[name] = tensor.view();
    return views;
  }
};

// Every parameter `sample.network` must be given (gradengine::LayerParameters), as ramps;
// buffers at their initial values.
void AddParameters(Sample* sample) {
  float start = -1.0f;
  for (const gradengine::LayerSpec& layer : sample->network.layers) {
    const std::vector<gradengine::ParameterInfo> infos = gradengine::LayerParameters(layer);
    for (const gradengine::ParameterInfo& info : infos) {
      const bool bias = absl::EndsWith(info.name, ".bias");
      if (info.trainable) {
        sample->parameters[info.name] = Ramp(info.shape, bias ? 0.5f : start);
      } else if (info.required) {
        sample->parameters[info.name] = Ramp(info.shape, info.fill);
      }
    }
    if (!infos.empty()) start += 0.5f;
  }
}

// conv1 1->2 3x3, padding 1, bias; ReLU. Input [1, 1, side, side]; output [1, 2, side, side].
Sample SmallConv(int64_t side) {
  Sample sample;
  sample.network.layers.push_back({"conv1", Conv2dSpec::Square(1, 2, 3, 1, 1, true)});
  sample.network.layers.push_back({"relu1", ActivationSpec{ActivationKind::kRelu, 0.0f}});
  sample.input = Ramp({1, 1, side, side}, 0.0f);
  AddParameters(&sample);
  return sample;
}

// Every hyperparameter and activation: groups, stride, dilation, asymmetric padding.
Sample Chain() {
  Sample sample;
  Conv2dSpec grouped = Conv2dSpec::Square(4, 6, 3, 2, 1, true);
  grouped.groups = 2;
  grouped.dilation_h = 2;
  grouped.pad_bottom = 2;
  grouped.pad_right = 0;
  sample.network.layers.push_back({"grouped", grouped});
  sample.network.layers.push_back({"leaky", ActivationSpec::LeakyRelu(0.1f)});
  Conv2dSpec rect = Conv2dSpec::Square(6, 3, 1, 1, 0, false);
  rect.kernel_w = 2;
  sample.network.layers.push_back({"rect", rect});
  for (ActivationKind kind : {ActivationKind::kTanh, ActivationKind::kSigmoid,
                              ActivationKind::kGeluErf, ActivationKind::kGeluTanh}) {
    sample.network.layers.push_back({gradengine::ActivationName(kind), ActivationSpec{kind, 0}});
  }
  sample.network.layers.push_back({"elu", ActivationSpec::Elu(1.0f)});
  sample.input = Ramp({2, 4, 7, 6}, -0.5f);
  AddParameters(&sample);
  return sample;
}

// Every other kind: conv, batch norm (training) and ReLU, a 1x1 projection read from the input,
// an add, max and avg pooling, batch norm (inference), linear; input [2, 2, 6, 6], output
// [2, 3].
Sample Cnn() {
  Sample sample;
  gradengine::BatchNorm2dSpec train;
  train.num_features = 4;
  gradengine::BatchNorm2dSpec eval = train;
  eval.training = false;
  gradengine::AvgPool2dSpec avg = gradengine::AvgPool2dSpec::Square(2, 1, 1);
  avg.ceil_mode = true;
  sample.network.layers = {
      {"conv1", Conv2dSpec::Square(2, 4, 3, 1, 1, false)},
      {"bn1", train},
      {"relu1", ActivationSpec{ActivationKind::kRelu, 0.0f}},
      {"proj", Conv2dSpec::Square(2, 4, 1, 1, 0, false), gradengine::kNetworkInput},
      {"add", gradengine::AddSpec{"relu1"}},
      {"pool", gradengine::MaxPool2dSpec::Square(2)},
      {"avg", avg},
      {"bn2", eval},
      {"fc", gradengine::LinearSpec{64, 3, true}},
  };
  sample.input = Ramp({2, 2, 6, 6}, -0.5f);
  AddParameters(&sample);
  return sample;
}

gradengine::ForwardRequest Forward(const Sample& sample) {
  gradengine::ForwardRequest request;
  request.network = sample.network;
  request.parameters = sample.Views();
  request.input = sample.input.view();
  return request;
}

gradengine::GradientRequest Gradient(const Sample& sample, gradengine::ObjectiveKind kind) {
  gradengine::GradientRequest request;
  request.network = sample.network;
  request.parameters = sample.Views();
  request.input = sample.input.view();
  request.objective = {kind, sample.objective.view()};
  return request;
}

// Selector byte (request_checks.h): RPC in bit 0, element limit exponent above it.
std::string Selected(bool gradients, int limit_exponent, const std::string& message) {
  return std::string(1, static_cast<char>((limit_exponent << 1) | (gradients ? 1 : 0))) + message;
}

// A request input of `target`: request_framing_fuzzer's has the message's length (2 bytes,
// little-endian) after the selector, and no shared memory plan after the message.
void WriteRequest(const std::string& target, const std::string& name, const std::string& selected) {
  if (target != "request_framing_fuzzer") return Write(target, name, selected);
  const size_t length = selected.size() - 1;
  if (length > 0xffff) {
    std::cerr << name << ": " << length << " bytes do not fit a 2-byte length\n";
    std::exit(1);
  }
  std::string input = selected.substr(0, 1);
  input.push_back(static_cast<char>(length & 0xff));
  input.push_back(static_cast<char>(length >> 8));
  Write(target, name, input + selected.substr(1));
}

std::string ForwardBytes(const gradengine::ForwardRequest& request) {
  grad::v1::ForwardRequest wire;
  gradwire::EncodeForwardRequest(request, &wire);
  return wire.SerializeAsString();
}

std::string GradientBytes(const gradengine::GradientRequest& request) {
  grad::v1::ComputeGradientsRequest wire;
  gradwire::EncodeGradientRequest(request, &wire);
  return wire.SerializeAsString();
}

// Requests of both RPCs, every objective and gradient selection; the same for both request
// targets.
void WriteRequests(const std::string& target) {
  const Sample small = SmallConv(4);
  WriteRequest(target, "forward_conv_relu", Selected(false, 0, ForwardBytes(Forward(small))));
  // 16x16 floats: 1024 bytes, which the framing references instead of copying.
  WriteRequest(target, "forward_conv_16x16",
               Selected(false, 0, ForwardBytes(Forward(SmallConv(16)))));
  Sample chain = Chain();
  WriteRequest(target, "forward_chain_every_kind",
               Selected(false, 0, ForwardBytes(Forward(chain))));
  // A limit of 2^4 elements: the input (16) fits, conv1.weight (18) does not.
  WriteRequest(target, "forward_conv_limit_16", Selected(false, 4, ForwardBytes(Forward(small))));

  Sample mse = small;
  mse.objective = Ramp({1, 2, 4, 4}, 1.0f);
  WriteRequest(target, "gradients_mse",
               Selected(true, 0, GradientBytes(Gradient(mse, gradengine::ObjectiveKind::kMse))));
  gradengine::GradientRequest sum = Gradient(small, gradengine::ObjectiveKind::kSum);
  sum.gradients.input = false;
  sum.gradients.all_parameters = false;
  sum.gradients.parameters = {"conv1.weight"};
  WriteRequest(target, "gradients_sum_weight_only", Selected(true, 0, GradientBytes(sum)));
  gradengine::GradientRequest none = Gradient(small, gradengine::ObjectiveKind::kSum);
  none.gradients.all_parameters = false;
  WriteRequest(target, "gradients_sum_no_parameters", Selected(true, 0, GradientBytes(none)));
  const Sample cnn = Cnn();
  WriteRequest(target, "forward_cnn_every_other_kind",
               Selected(false, 0, ForwardBytes(Forward(cnn))));
  {
    static const int64_t kLabels[] = {2, -100};
    gradengine::GradientRequest request = Gradient(cnn, gradengine::ObjectiveKind::kMse);
    request.objective = gradengine::Objective(gradengine::ObjectiveKind::kCrossEntropy);
    request.objective.labels = {{2}, kLabels, 2};
    request.objective.label_smoothing = 0.1;
    WriteRequest(target, "gradients_cnn_cross_entropy", Selected(true, 0, GradientBytes(request)));
  }
  chain.objective = Ramp({2, 3, 3, 2}, 0.0f);
  WriteRequest(
      target, "gradients_chain_grad_output",
      Selected(true, 0, GradientBytes(Gradient(chain, gradengine::ObjectiveKind::kGradOutput))));
}

void PlaceShared(grad::v1::Tensor* tensor, const std::string& region, int64_t offset) {
  const int64_t bytes = static_cast<int64_t>(tensor->data().size());
  tensor->clear_data();
  grad::v1::SharedMemoryRef* ref = tensor->mutable_shared_memory();
  ref->set_region(region);
  ref->set_offset(offset);
  ref->set_byte_size(bytes);
}

grad::v1::SharedMemoryRef Ref(const std::string& region, int64_t offset, int64_t byte_size) {
  grad::v1::SharedMemoryRef ref;
  ref.set_region(region);
  ref.set_offset(offset);
  ref.set_byte_size(byte_size);
  return ref;
}

// Tensors and results in the fake regions of fake_shared_memory.h.
void WriteSharedMemoryRequests(const std::string& target) {
  const Sample small = SmallConv(4);  // input 64 bytes, output 128, weight 72, bias 8
  {
    grad::v1::ForwardRequest wire;
    gradwire::EncodeForwardRequest(Forward(small), &wire);
    PlaceShared(wire.mutable_input(), "a", 0);
    *wire.mutable_placement()->mutable_output() = Ref("a", 128, 128);
    wire.set_request_id("shm-forward");
    WriteRequest(target, "shm_forward_input_and_output",
                 Selected(false, 0, wire.SerializeAsString()));
    // The output in "a_tail" is the memory of "a" from 128: it overlaps nothing here, but
    // moved to a_tail's offset 0 and the input to a's offset 128 it would.
    *wire.mutable_placement()->mutable_output() = Ref("a_tail", 0, 128);
    WriteRequest(target, "shm_forward_output_in_alias",
                 Selected(false, 0, wire.SerializeAsString()));
    wire.mutable_input()->mutable_shared_memory()->set_offset(128);
    WriteRequest(target, "shm_forward_output_overlaps_input",
                 Selected(false, 0, wire.SerializeAsString()));
  }
  {
    Sample mse = small;
    mse.objective = Ramp({1, 2, 4, 4}, 1.0f);
    grad::v1::ComputeGradientsRequest wire;
    gradwire::EncodeGradientRequest(Gradient(mse, gradengine::ObjectiveKind::kMse), &wire);
    PlaceShared(wire.mutable_input(), "b", 0);
    for (grad::v1::NamedTensor& named : *wire.mutable_parameters()) {
      PlaceShared(named.mutable_tensor(), "b", named.name() == "conv1.bias" ? 64 : 128);
    }
    PlaceShared(wire.mutable_objective()->mutable_mse_target(), "b", 256);
    grad::v1::ResultPlacement* placement = wire.mutable_placement();
    *placement->mutable_output() = Ref("a", 0, 128);
    *placement->mutable_input_grad() = Ref("a_tail", 0, 64);
    grad::v1::NamedSharedMemoryRef* weight = placement->add_parameter_grads();
    weight->set_name("conv1.weight");
    *weight->mutable_ref() = Ref("b", 512, 72);
    grad::v1::NamedSharedMemoryRef* bias = placement->add_parameter_grads();
    bias->set_name("conv1.bias");
    *bias->mutable_ref() = Ref("m", 2, 8);
    WriteRequest(target, "shm_gradients_everything_shared",
                 Selected(true, 0, wire.SerializeAsString()));
  }
}

void WriteNpy() {
  const std::string target = "npy_fuzzer";
  const float values[] = {0.0f, -1.5f, 3.25f, 1e-38f, -0.0f, 65504.0f};
  Write(target, "scalar", gradclient::SerializeNpy({}, {values, 1}));
  Write(target, "empty_0x4", gradclient::SerializeNpy({0, 4}, {}));
  Write(target, "vector_6", gradclient::SerializeNpy({6}, values));
  Write(target, "nchw_1x1x2x3", gradclient::SerializeNpy({1, 1, 2, 3}, values));
  // Version 2.0: a 4-byte header length.
  std::string version2 = gradclient::SerializeNpy({2, 3}, values);
  const size_t header_length = static_cast<unsigned char>(version2[8]) |
                               static_cast<size_t>(static_cast<unsigned char>(version2[9])) << 8;
  version2[6] = 2;
  version2.insert(10, 2, '\0');
  version2[8] = static_cast<char>(header_length & 0xff);
  version2[9] = static_cast<char>(header_length >> 8);
  Write(target, "version2_2x3", version2);
  // What the reader refuses, for the error paths.
  std::string fortran = gradclient::SerializeNpy({2, 3}, values);
  fortran.replace(fortran.find("False"), 5, "True ");
  Write(target, "fortran_order_true", fortran);
  std::string float64 = gradclient::SerializeNpy({3}, {values, 3});
  float64.replace(float64.find("<f4"), 3, "<f8");
  Write(target, "dtype_f8", float64);
}

void WriteNetworkJson() {
  const std::string target = "network_json_fuzzer";
  // gradctl's usage text's example.
  Write(target, "usage_example",
        R"({"layers": [{"name": "conv1", "conv2d": {"inChannels": 1, "outChannels": 8,
               "kernelSize": [3], "padding": [1], "bias": true}},
              {"name": "relu1", "activation": {"kind": "RELU"}}]})");
  // protobuf's own JSON of encoded networks.
  for (const auto& [name, network] : std::map<std::string, NetworkSpec>{
           {"encoded_small", SmallConv(4).network}, {"encoded_chain", Chain().network}}) {
    grad::v1::Network wire;
    gradwire::EncodeNetwork(network, &wire);
    std::string json;
    if (!google::protobuf::util::MessageToJsonString(wire, &json).ok()) std::exit(1);
    Write(target, name, json);
  }
  // Field names as in the .proto, enums by number, 64-bit ints as strings, a NaN alpha.
  Write(target, "proto_names_numbers",
        R"({"layers": [{"name": "c", "conv2d": {"in_channels": "4", "out_channels": 4,
               "kernel_size": [1, 3], "stride": [2], "padding": [0, 1, 2, 0],
               "dilation": [1, 2], "groups": 4}},
              {"name": "a", "activation": {"kind": 5, "alpha": "NaN"}}]})");
}

}  // namespace
}  // namespace gradfuzz

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: " << argv[0] << " CORPUS_DIR (tests/fuzz/corpus)\n";
    return 2;
  }
  gradfuzz::out_dir = argv[1];
  for (const char* target : {"request_decode_fuzzer", "request_framing_fuzzer"}) {
    gradfuzz::WriteRequests(target);
  }
  gradfuzz::WriteSharedMemoryRequests("request_framing_fuzzer");
  gradfuzz::WriteNpy();
  gradfuzz::WriteNetworkJson();
  return 0;
}
