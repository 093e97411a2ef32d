// The benchmark workloads: one full training step (forward, the loss, backward with every
// gradient) on fixed random data. The same requests drive the engine's benchmarks
// (tests/bench) and the service's load generator (gradctl bench), so their timings compare.
//
//   seed1      1x1x28x28, conv 1->8 3x3 padding 1, no bias
//   seed4      1x1x28x28, conv 1->8->16->32->64 3x3 padding 1, no bias, ReLU after each
//   seed4_b32  seed4 with batch 32
//   resblock   8x64x56x56, 2 x (conv 64->64 3x3 padding 1 + bias + ReLU)
//   lenet_b64  64x1x28x28, LeNet-5: conv 1->6 5x5 padding 2, ReLU, max pool 2, conv 6->16
//              5x5, ReLU, max pool 2, linear 400->120, ReLU, linear 120->84, ReLU, linear
//              84->10, cross-entropy on random labels
//   resnet_block  8x64x56x56, a ResNet basic block: conv 64->64 3x3 padding 1 (no bias),
//              batch norm (training), ReLU, conv, batch norm, + the block's input, ReLU
//
// The losses are MSE against a random target except for lenet_b64. Weights are scaled by
// 1/sqrt(fan-in), as PyTorch initialises them, so activations stay near unit scale.
// The data are drawn from std::mt19937 seeded with 1234 and std::normal_distribution<float>,
// so a workload is the same on every run of the same build. Thread-compatible: a Workload is
// only read once made, and may be shared between threads.

#ifndef GRADCLIENT_WORKLOADS_H_
#define GRADCLIENT_WORKLOADS_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "gradengine/network.h"

namespace gradclient {

struct Workload {
  std::string name;
  gradengine::NetworkSpec network;
  std::vector<int64_t> input_shape;
  // Owning storage behind the request's views.
  std::vector<float> input;
  struct Parameter {
    std::vector<int64_t> shape;
    std::vector<float> values;
  };
  std::map<std::string, Parameter> parameters;
  std::vector<int64_t> output_shape;
  // The MSE target, or empty when `labels` are set.
  std::vector<float> target;
  // The class indices of a cross-entropy step, [N].
  std::vector<int64_t> labels;
  // 2 * N * OC * OH * OW * (IC / groups) * KH * KW summed over the convolutions, and
  // 2 * N * in * out over the linear layers: one pass.
  double flops_per_pass = 0;

  // An MSE (or cross-entropy) step with every gradient. The request borrows this workload's data:
  // it is valid while the workload is alive and unchanged.
  gradengine::GradientRequest Request() const;
  // The same network, parameters and input, forward only; borrows as Request() does.
  gradengine::ForwardRequest ForwardOnly() const;
};

// The workload called `name`, one of WorkloadNames(); InvalidArgument naming the known ones
// otherwise.
absl::StatusOr<Workload> MakeWorkload(const std::string& name);

// "seed1", "seed4", "seed4_b32", "resblock", "lenet_b64", "resnet_block", and "io64": a
// 64 MiB input [4, 16, 512, 512] through one ReLU, which measures moving tensors rather than
// computing.
std::vector<std::string> WorkloadNames();

}  // namespace gradclient

#endif  // GRADCLIENT_WORKLOADS_H_
