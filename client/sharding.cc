#include "client/sharding.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/types/span.h"
#include "gradengine/network.h"
#include "gradengine/tensor.h"

namespace gradclient {
namespace {

// The product of `shape`, or -1 if a dim is negative.
int64_t Elements(absl::Span<const int64_t> shape) {
  int64_t elements = 1;
  for (int64_t dim : shape) {
    if (dim < 0) return -1;
    elements *= dim;
  }
  return elements;
}

// True if `tensor` has `batch` whole rows: at least one dim, dim 0 == batch, and data that
// match the shape.
bool HasRows(const gradengine::TensorView& tensor, int64_t batch) {
  return !tensor.shape.empty() && tensor.shape[0] == batch && tensor.data != nullptr &&
         Elements(tensor.shape) == tensor.size;
}

gradengine::TensorView SliceRows(const gradengine::TensorView& tensor, BatchSlice slice) {
  const int64_t row = tensor.shape[0] == 0 ? 0 : tensor.size / tensor.shape[0];
  gradengine::TensorView part;
  part.shape = tensor.shape;
  part.shape[0] = slice.rows();
  part.data = tensor.data + slice.begin * row;
  part.size = slice.rows() * row;
  return part;
}

// The parts' tensors one after the other along dim 0, part i multiplied by scales[i]. Empty
// if any part is empty (an output the caller asked to skip).
gradengine::Tensor ConcatRows(const std::vector<const gradengine::Tensor*>& parts,
                              absl::Span<const double> scales) {
  gradengine::Tensor whole;
  int64_t rows = 0;
  size_t elements = 0;
  for (const gradengine::Tensor* part : parts) {
    if (part->shape.empty() || part->data.empty()) return whole;
    rows += part->shape[0];
    elements += part->data.size();
  }
  whole.shape = parts.front()->shape;
  whole.shape[0] = rows;
  whole.data = gradengine::TensorBuffer::Uninitialized(elements);
  float* out = whole.data.data();
  for (size_t i = 0; i < parts.size(); ++i) {
    const gradengine::TensorBuffer& data = parts[i]->data;
    const float scale = static_cast<float>(scales[i]);
    for (float value : data) *out++ = scales[i] == 1.0 ? value : value * scale;
  }
  return whole;
}

gradengine::ComputeTiming SlowestTiming(const std::vector<gradengine::ComputeTiming>& timings) {
  gradengine::ComputeTiming slowest;
  for (const gradengine::ComputeTiming& timing : timings) {
    slowest.forward_ns = std::max(slowest.forward_ns, timing.forward_ns);
    slowest.backward_ns = std::max(slowest.backward_ns, timing.backward_ns);
  }
  return slowest;
}

}  // namespace

std::vector<BatchSlice> SplitBatch(int64_t batch, int shards) {
  const int64_t count = std::min<int64_t>(batch, shards);
  const int64_t base = batch / count;
  const int64_t larger = batch % count;
  std::vector<BatchSlice> slices;
  slices.reserve(static_cast<size_t>(count));
  int64_t begin = 0;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t rows = base + (i < larger ? 1 : 0);
    slices.push_back({begin, begin + rows});
    begin += rows;
  }
  return slices;
}

int64_t ShardableBatch(const gradengine::ForwardRequest& request) {
  if (request.input.shape.size() != 4) return 0;
  const int64_t batch = request.input.shape[0];
  return batch >= 1 && HasRows(request.input, batch) ? batch : 0;
}

int64_t ShardableBatch(const gradengine::GradientRequest& request) {
  if (request.input.shape.size() != 4) return 0;
  const int64_t batch = request.input.shape[0];
  if (batch < 1 || !HasRows(request.input, batch)) return 0;
  if (request.objective.kind != gradengine::ObjectiveKind::kSum &&
      !HasRows(request.objective.tensor, batch)) {
    return 0;
  }
  return batch;
}

gradengine::ForwardRequest SliceRequest(const gradengine::ForwardRequest& request,
                                        BatchSlice slice) {
  gradengine::ForwardRequest part;
  part.network = request.network;
  part.parameters = request.parameters;
  part.input = SliceRows(request.input, slice);
  part.should_continue = request.should_continue;
  return part;
}

gradengine::GradientRequest SliceRequest(const gradengine::GradientRequest& request,
                                         BatchSlice slice) {
  gradengine::GradientRequest part;
  part.network = request.network;
  part.parameters = request.parameters;
  part.input = SliceRows(request.input, slice);
  part.objective.kind = request.objective.kind;
  if (request.objective.kind != gradengine::ObjectiveKind::kSum) {
    part.objective.tensor = SliceRows(request.objective.tensor, slice);
  }
  part.gradients = request.gradients;
  part.should_continue = request.should_continue;
  return part;
}

gradengine::ForwardResult CombineForwardResults(absl::Span<const BatchSlice> slices,
                                                std::vector<gradengine::ForwardResult> parts) {
  if (parts.size() == 1) return std::move(parts.front());
  std::vector<const gradengine::Tensor*> outputs;
  std::vector<gradengine::ComputeTiming> timings;
  for (const gradengine::ForwardResult& part : parts) {
    outputs.push_back(&part.output);
    timings.push_back(part.timing);
  }
  gradengine::ForwardResult whole;
  whole.output = ConcatRows(outputs, std::vector<double>(slices.size(), 1.0));
  whole.timing = SlowestTiming(timings);
  return whole;
}

gradengine::GradientResult CombineGradientResults(gradengine::ObjectiveKind objective,
                                                  absl::Span<const BatchSlice> slices,
                                                  std::vector<gradengine::GradientResult> parts) {
  if (parts.size() == 1) return std::move(parts.front());
  const int64_t batch = slices.back().end;
  // Part k's share of the whole batch's mean; sums and caller-given gradients add up as they
  // are.
  std::vector<double> weights;
  for (const BatchSlice& slice : slices) {
    weights.push_back(objective == gradengine::ObjectiveKind::kMse
                          ? static_cast<double>(slice.rows()) / static_cast<double>(batch)
                          : 1.0);
  }

  gradengine::GradientResult whole;
  std::vector<const gradengine::Tensor*> outputs;
  std::vector<const gradengine::Tensor*> input_grads;
  std::vector<gradengine::ComputeTiming> timings;
  for (const gradengine::GradientResult& part : parts) {
    outputs.push_back(&part.output);
    if (part.input_grad.has_value()) input_grads.push_back(&*part.input_grad);
    timings.push_back(part.timing);
  }
  whole.output = ConcatRows(outputs, std::vector<double>(slices.size(), 1.0));
  if (input_grads.size() == parts.size()) whole.input_grad = ConcatRows(input_grads, weights);
  whole.timing = SlowestTiming(timings);

  if (parts.front().loss.has_value()) {
    double loss = 0;
    for (size_t i = 0; i < parts.size(); ++i) loss += weights[i] * parts[i].loss.value_or(0.0);
    whole.loss = loss;
  }

  // Summed in double so that the order of the parts does not add rounding of its own.
  for (const auto& [name, first] : parts.front().parameter_grads) {
    std::vector<double> sum(first.data.size(), 0.0);
    for (size_t i = 0; i < parts.size(); ++i) {
      const auto found = parts[i].parameter_grads.find(name);
      if (found == parts[i].parameter_grads.end()) continue;
      const gradengine::TensorBuffer& grad = found->second.data;
      for (size_t j = 0; j < sum.size() && j < grad.size(); ++j) sum[j] += weights[i] * grad[j];
    }
    gradengine::Tensor& combined = whole.parameter_grads[name];
    combined.shape = first.shape;
    combined.data = gradengine::TensorBuffer(std::vector<float>(sum.begin(), sum.end()));
  }
  return whole;
}

}  // namespace gradclient
