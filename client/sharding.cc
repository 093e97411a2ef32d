#include "client/sharding.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "gradengine/network.h"
#include "gradengine/quote.h"
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

// True if `view` (a TensorView or LabelsView) has `batch` whole rows: at least one dim,
// dim 0 == batch, and data that match the shape.
template <typename View>
bool HasRows(const View& view, int64_t batch) {
  return !view.shape.empty() && view.shape[0] == batch && view.data != nullptr &&
         Elements(view.shape) == view.size;
}

// The rows of `slice` of a TensorView or LabelsView, borrowed.
template <typename View>
View SliceRows(const View& view, BatchSlice slice) {
  const int64_t row = view.shape[0] == 0 ? 0 : view.size / view.shape[0];
  View part;
  part.shape = view.shape;
  part.shape[0] = slice.rows();
  part.data = view.data + slice.begin * row;
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
    // A part of weight 0 (cross-entropy labels all ignored) may report NaN gradients of 0/0;
    // its rows contribute nothing to the whole batch's loss.
    for (float value : data) {
      *out++ = scales[i] == 1.0 ? value : scales[i] == 0.0 ? 0.0f : value * scale;
    }
  }
  return whole;
}

// The labels of `slice` that count in cross-entropy's mean: those not equal to ignore_index.
int64_t CountedLabels(const gradengine::Objective& objective, BatchSlice slice) {
  const gradengine::LabelsView part = SliceRows(objective.labels, slice);
  return static_cast<int64_t>(
      std::count_if(part.data, part.data + part.size,
                    [&objective](int64_t label) { return label != objective.ignore_index; }));
}

// Part k's share w_k of the whole batch's loss (sharding.h).
std::vector<double> PartWeights(const gradengine::Objective& objective,
                                absl::Span<const BatchSlice> slices) {
  std::vector<double> weights;
  weights.reserve(slices.size());
  switch (objective.kind) {
    case gradengine::ObjectiveKind::kMse: {
      const int64_t batch = slices.back().end;
      for (const BatchSlice& slice : slices) {
        weights.push_back(static_cast<double>(slice.rows()) / static_cast<double>(batch));
      }
      break;
    }
    case gradengine::ObjectiveKind::kCrossEntropy: {
      std::vector<int64_t> counts;
      int64_t total = 0;
      for (const BatchSlice& slice : slices) {
        counts.push_back(CountedLabels(objective, slice));
        total += counts.back();
      }
      for (int64_t count : counts) {
        weights.push_back(total == 0 ? 1.0
                                     : static_cast<double>(count) / static_cast<double>(total));
      }
      break;
    }
    case gradengine::ObjectiveKind::kSum:
    case gradengine::ObjectiveKind::kGradOutput:
      weights.assign(slices.size(), 1.0);
      break;
  }
  return weights;
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

absl::Status CheckRowsIndependent(const gradengine::NetworkSpec& network, int shards) {
  if (shards <= 1) return absl::OkStatus();
  for (size_t i = 0; i < network.layers.size(); ++i) {
    const gradengine::LayerSpec& layer = network.layers[i];
    if (gradengine::MixesBatch(layer.op)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "shards=", shards, " cannot be used: layers[", i, "] (", gradengine::Quote(layer.name),
          ", ", gradengine::LayerKindName(layer.op),
          ") mixes the rows of the batch (a batch_norm2d in training mode normalises with the "
          "whole batch's statistics), so parts of the batch would not compute the whole "
          "batch's result; send it with shards=1"));
    }
  }
  return absl::OkStatus();
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
  switch (request.objective.kind) {
    case gradengine::ObjectiveKind::kMse:
    case gradengine::ObjectiveKind::kGradOutput:
      return HasRows(request.objective.tensor, batch) ? batch : 0;
    case gradengine::ObjectiveKind::kCrossEntropy:
      return HasRows(request.objective.labels, batch) ? batch : 0;
    case gradengine::ObjectiveKind::kSum:
      return batch;
  }
  return 0;
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
  part.objective = request.objective;
  switch (request.objective.kind) {
    case gradengine::ObjectiveKind::kMse:
    case gradengine::ObjectiveKind::kGradOutput:
      part.objective.tensor = SliceRows(request.objective.tensor, slice);
      break;
    case gradengine::ObjectiveKind::kCrossEntropy:
      part.objective.labels = SliceRows(request.objective.labels, slice);
      break;
    case gradengine::ObjectiveKind::kSum:
      break;
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

gradengine::GradientResult CombineGradientResults(const gradengine::Objective& objective,
                                                  absl::Span<const BatchSlice> slices,
                                                  std::vector<gradengine::GradientResult> parts) {
  if (parts.size() == 1) return std::move(parts.front());
  // Part k's share of the whole batch's mean; sums and caller-given gradients add up as they
  // are.
  const std::vector<double> weights = PartWeights(objective, slices);

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
    for (size_t i = 0; i < parts.size(); ++i) {
      if (weights[i] != 0.0) loss += weights[i] * parts[i].loss.value_or(0.0);
    }
    whole.loss = loss;
  }

  // Summed in double so that the order of the parts does not add rounding of its own.
  for (const auto& [name, first] : parts.front().parameter_grads) {
    std::vector<double> sum(first.data.size(), 0.0);
    for (size_t i = 0; i < parts.size(); ++i) {
      if (weights[i] == 0.0) continue;
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
