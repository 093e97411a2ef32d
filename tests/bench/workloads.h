// The benchmark workloads: one full training step (forward, MSE loss, backward with every
// gradient) on fixed random data. Shared by the Google Benchmark binary and vs_torch's timer.

#ifndef TESTS_BENCH_WORKLOADS_H_
#define TESTS_BENCH_WORKLOADS_H_

#include <cstdint>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "gradengine/network.h"

namespace gradbench {

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
  std::vector<float> target;
  // 2 * N * OC * OH * OW * (IC / groups) * KH * KW summed over the convolutions: one pass.
  double flops_per_pass = 0;

  gradengine::GradientRequest Request() const;
};

// "seed1", "seed4", "seed4_b32", "resblock"; REQUIRES: a known name.
Workload MakeWorkload(const std::string& name);
std::vector<std::string> WorkloadNames();

}  // namespace gradbench

#endif  // TESTS_BENCH_WORKLOADS_H_
