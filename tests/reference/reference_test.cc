// Proves the reference: a few cases worked out by hand, and every gradient of every op,
// objective and of small whole networks (chains, a LeNet, residual blocks) checked against
// central finite differences of the reference's own forward pass in double precision.

#include "tests/reference/reference.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iostream>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "gmock/gmock.h"
#include "gradengine/network.h"
#include "gtest/gtest-spi.h"
#include "gtest/gtest.h"

namespace gradtest {
namespace {

using gradengine::ActivationKind;
using gradengine::ActivationSpec;
using gradengine::AddSpec;
using gradengine::AvgPool2dSpec;
using gradengine::BatchNorm2dSpec;
using gradengine::Conv2dSpec;
using gradengine::kNetworkInput;
using gradengine::LayerSpec;
using gradengine::LinearSpec;
using gradengine::MaxPool2dSpec;
using gradengine::NetworkSpec;
using gradengine::ObjectiveKind;
using ::testing::DoubleNear;
using ::testing::ElementsAre;
using ::testing::ElementsAreArray;

// Central differences (f(v + h) - f(v - h)) / 2h in double: the truncation error is about
// h^2 |f'''| ~ 1e-12 and the rounding error about 1e-16 |f| / h ~ 1e-10 |f| for the O(1..100)
// losses here, so 1e-6 * max(1, |gradient|) is far above both and far below any indexing,
// sign or scale mistake (which are of the order of the values themselves, 1e-2 .. 1).
constexpr double kFiniteDifferenceStep = 1e-6;
constexpr double kFiniteDifferenceTolerance = 1e-6;
// Inputs of relu, leaky_relu and elu must stay this far from 0 so that the step never
// crosses the kink.
constexpr double kKinkMargin = 1e-3;
// Likewise the largest value of a max_pool2d window must lead the next one by this much, so
// that the step (which moves any value by ~1e-6) never changes which one wins; the only ties
// allowed are windows whose maximum is exactly 0, which only a relu's flat side produces
// (and keeps flat under the step, see kKinkMargin).
constexpr double kTieMargin = 1e-3;

int64_t finite_difference_checks = 0;

class CountReporter : public ::testing::Environment {
 public:
  void TearDown() override {
    std::cout << "finite-difference checks: " << finite_difference_checks << "\n";
  }
};
[[maybe_unused]] const auto* const kCountReporter =
    ::testing::AddGlobalTestEnvironment(new CountReporter);

RefTensor MakeTensor(std::vector<int64_t> shape, std::vector<double> values) {
  RefTensor t;
  t.shape = std::move(shape);
  t.data = std::move(values);
  return t;
}

RefTensor RandomTensor(std::vector<int64_t> shape, std::mt19937_64* rng) {
  std::uniform_real_distribution<double> uniform(-1.0, 1.0);
  RefTensor t = RefTensor::Zeros(std::move(shape));
  for (double& v : t.data) v = uniform(*rng);
  return t;
}

// Values 0.05 apart (far beyond kTieMargin) in a random order, centred on 0.
RefTensor DistinctValues(std::vector<int64_t> shape, uint64_t seed) {
  RefTensor t = RefTensor::Zeros(std::move(shape));
  const double middle = 0.5 * static_cast<double>(t.data.size());
  for (size_t i = 0; i < t.data.size(); ++i) t.data[i] = 0.05 * (static_cast<double>(i) - middle);
  std::mt19937_64 rng(seed);
  std::shuffle(t.data.begin(), t.data.end(), rng);
  return t;
}

// A layer of any kind; `input` as LayerSpec::input (empty: the previous layer).
LayerSpec Layer(std::string name, gradengine::LayerOp op, std::string input = "") {
  return {std::move(name), std::move(op), std::move(input)};
}
LayerSpec ConvLayer(std::string name, const Conv2dSpec& spec) {
  return Layer(std::move(name), spec);
}
LayerSpec ActivationLayer(std::string name, ActivationKind kind, float alpha = 0.0f) {
  return Layer(std::move(name), ActivationSpec{kind, alpha});
}
LayerSpec AddLayer(std::string name, std::string other, std::string input = "") {
  return Layer(std::move(name), AddSpec{std::move(other)}, std::move(input));
}

MaxPool2dSpec MaxPool(int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w) {
  MaxPool2dSpec spec;
  spec.kernel_h = kernel_h;
  spec.kernel_w = kernel_w;
  spec.stride_h = stride_h;
  spec.stride_w = stride_w;
  return spec;
}

AvgPool2dSpec AvgPool(int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w) {
  AvgPool2dSpec spec;
  spec.kernel_h = kernel_h;
  spec.kernel_w = kernel_w;
  spec.stride_h = stride_h;
  spec.stride_w = stride_w;
  return spec;
}

BatchNorm2dSpec BatchNorm(int64_t num_features, bool training, bool affine = true) {
  BatchNorm2dSpec spec;
  spec.num_features = num_features;
  spec.training = training;
  spec.affine = affine;
  return spec;
}

LinearSpec Linear(int64_t in_features, int64_t out_features, bool bias = true) {
  return LinearSpec{in_features, out_features, bias};
}

Conv2dSpec Conv(int64_t in_channels, int64_t out_channels, int64_t kernel_h, int64_t kernel_w) {
  Conv2dSpec spec;
  spec.in_channels = in_channels;
  spec.out_channels = out_channels;
  spec.kernel_h = kernel_h;
  spec.kernel_w = kernel_w;
  return spec;
}

// Everything a gradient depends on, in double precision.
struct Case {
  NetworkSpec network;
  RefParameters parameters;
  RefTensor input;
  RefObjective objective;
};

// The output shape, from the reference's own forward pass.
std::vector<int64_t> OutputShape(const Case& c) {
  return ReferenceForward(c.network, c.parameters, c.input).shape;
}

// The names of the network's trainable parameters, from gradengine::LayerParameters.
std::set<std::string> TrainableParameters(const NetworkSpec& network) {
  std::set<std::string> names;
  for (const LayerSpec& layer : network.layers) {
    for (const gradengine::ParameterInfo& info : gradengine::LayerParameters(layer)) {
      if (info.trainable) names.insert(info.name);
    }
  }
  return names;
}

// Labels for cross-entropy logits of `logits_shape` ([N, C] or [N, C, H, W]), uniform in
// [0, C).
void SetRandomLabels(const std::vector<int64_t>& logits_shape, std::mt19937_64* rng,
                     RefObjective* objective) {
  objective->labels_shape = {logits_shape[0]};
  if (logits_shape.size() == 4) {
    objective->labels_shape.push_back(logits_shape[2]);
    objective->labels_shape.push_back(logits_shape[3]);
  }
  int64_t count = 1;
  for (int64_t d : objective->labels_shape) count *= d;
  std::uniform_int_distribution<int64_t> label(0, logits_shape[1] - 1);
  objective->labels.resize(static_cast<size_t>(count));
  for (int64_t& l : objective->labels) l = label(*rng);
}

// A case with random parameters, buffers, input and objective tensor (or labels) for
// `network` on `input_shape`. Every parameter and buffer gradengine::LayerParameters lists is
// supplied; buffers (running statistics) are drawn from [0.5, 1.5], valid variances.
Case RandomCase(NetworkSpec network, std::vector<int64_t> input_shape, ObjectiveKind objective,
                uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> positive(0.5, 1.5);
  Case c;
  c.network = std::move(network);
  for (const LayerSpec& layer : c.network.layers) {
    for (const gradengine::ParameterInfo& info : gradengine::LayerParameters(layer)) {
      RefTensor& tensor = c.parameters[info.name] = RandomTensor(info.shape, &rng);
      if (!info.trainable) {
        for (double& v : tensor.data) v = positive(rng);
      }
    }
  }
  c.input = RandomTensor(std::move(input_shape), &rng);
  c.objective.kind = objective;
  switch (objective) {
    case ObjectiveKind::kMse:
    case ObjectiveKind::kGradOutput:
      c.objective.tensor = RandomTensor(OutputShape(c), &rng);
      break;
    case ObjectiveKind::kSum:
      break;
    case ObjectiveKind::kCrossEntropy:
      SetRandomLabels(OutputShape(c), &rng, &c.objective);
      break;
  }
  return c;
}

// The scalar whose gradient RunReference computes: the loss, or for kGradOutput the
// vector-Jacobian product's scalar sum(grad_output * y).
double ScalarObjective(const Case& c) {
  const RefTensor output = ReferenceForward(c.network, c.parameters, c.input);
  if (c.objective.kind != ObjectiveKind::kGradOutput) {
    return ObjectiveLoss(c.objective, output).value();
  }
  double dot = 0.0;
  for (size_t i = 0; i < output.data.size(); ++i)
    dot += c.objective.tensor.data[i] * output.data[i];
  return dot;
}

bool HasKink(ActivationKind kind) {
  return kind == ActivationKind::kRelu || kind == ActivationKind::kLeakyRelu ||
         kind == ActivationKind::kElu;
}

// The tensor layers[i] of `c` reads, given every layer's output.
const RefTensor& LayerInput(const Case& c, const std::vector<RefTensor>& outputs, size_t i) {
  const int source = RefInputSource(c.network, i);
  return source < 0 ? c.input : outputs[static_cast<size_t>(source)];
}

// Every input of a kinked activation is at least kKinkMargin away from 0.
::testing::AssertionResult AwayFromKinks(const Case& c) {
  const std::vector<RefTensor> outputs = ReferenceLayerOutputs(c.network, c.parameters, c.input);
  for (size_t i = 0; i < c.network.layers.size(); ++i) {
    const auto* activation = std::get_if<ActivationSpec>(&c.network.layers[i].op);
    if (activation == nullptr || !HasKink(activation->kind)) continue;
    const RefTensor& x = LayerInput(c, outputs, i);
    for (size_t j = 0; j < x.data.size(); ++j) {
      if (std::abs(x.data[j]) < kKinkMargin) {
        return ::testing::AssertionFailure()
               << "layers[" << i << "] input[" << j << "] = " << x.data[j]
               << " is too close to the kink; pick another seed";
      }
    }
  }
  return ::testing::AssertionSuccess();
}

// In every max_pool2d window the maximum leads the runner-up by kTieMargin, or is exactly 0.
// The window is walked here independently of the reference: taps (kh, kw) at
// (oh * stride - pad + k * dilation) that fall inside the input.
::testing::AssertionResult AwayFromTies(const Case& c) {
  const std::vector<RefTensor> outputs = ReferenceLayerOutputs(c.network, c.parameters, c.input);
  for (size_t i = 0; i < c.network.layers.size(); ++i) {
    const auto* pool = std::get_if<MaxPool2dSpec>(&c.network.layers[i].op);
    if (pool == nullptr) continue;
    const RefTensor& x = LayerInput(c, outputs, i);
    const RefTensor& y = outputs[i];
    for (int64_t n = 0; n < y.shape[0]; ++n) {
      for (int64_t ch = 0; ch < y.shape[1]; ++ch) {
        for (int64_t oh = 0; oh < y.shape[2]; ++oh) {
          for (int64_t ow = 0; ow < y.shape[3]; ++ow) {
            std::vector<double> window;
            for (int64_t kh = 0; kh < pool->kernel_h; ++kh) {
              for (int64_t kw = 0; kw < pool->kernel_w; ++kw) {
                const int64_t ih = oh * pool->stride_h - pool->pad_h + kh * pool->dilation_h;
                const int64_t iw = ow * pool->stride_w - pool->pad_w + kw * pool->dilation_w;
                if (ih < 0 || ih >= x.shape[2] || iw < 0 || iw >= x.shape[3]) continue;
                window.push_back(x.at(n, ch, ih, iw));
              }
            }
            std::sort(window.rbegin(), window.rend());
            if (window.size() < 2 || window[0] == 0.0 || window[0] - window[1] > kTieMargin) {
              continue;
            }
            return ::testing::AssertionFailure()
                   << "layers[" << i << "] window [" << n << ", " << ch << ", " << oh << ", " << ow
                   << "] has a near-tie " << window[0] << " vs " << window[1]
                   << "; pick other values";
          }
        }
      }
    }
  }
  return ::testing::AssertionSuccess();
}

// Compares `analytic` with central differences of ScalarObjective in every element of
// `*tensor`, which must live inside `*c`.
void ExpectMatchesFiniteDifferences(const std::string& what, Case* c, RefTensor* tensor,
                                    const RefTensor& analytic) {
  ASSERT_EQ(analytic.shape, tensor->shape) << what;
  ASSERT_EQ(analytic.data.size(), tensor->data.size()) << what;
  ASSERT_FALSE(tensor->data.empty()) << what;
  // An all-zero gradient would agree with a constant function; insist on something to compare.
  double largest = 0.0;
  for (double g : analytic.data) largest = std::max(largest, std::abs(g));
  ASSERT_GT(largest, 1e-4) << what << ": gradient is (nearly) zero, the check would be vacuous";

  for (size_t i = 0; i < tensor->data.size(); ++i) {
    const double original = tensor->data[i];
    tensor->data[i] = original + kFiniteDifferenceStep;
    const double plus = ScalarObjective(*c);
    tensor->data[i] = original - kFiniteDifferenceStep;
    const double minus = ScalarObjective(*c);
    tensor->data[i] = original;
    const double numeric = (plus - minus) / (2 * kFiniteDifferenceStep);
    EXPECT_NEAR(analytic.data[i], numeric,
                kFiniteDifferenceTolerance * std::max(1.0, std::abs(analytic.data[i])))
        << what << "[" << i << "]";
    ++finite_difference_checks;
  }
}

// Checks the gradient of the input and of every trainable parameter of `c`; buffers have
// none.
void ExpectGradientsMatchFiniteDifferences(Case c) {
  ASSERT_TRUE(AwayFromKinks(c));
  ASSERT_TRUE(AwayFromTies(c));
  const ReferenceResult result = RunReference(c.network, c.parameters, c.input, c.objective);
  ASSERT_EQ(result.output.shape, OutputShape(c));
  ASSERT_EQ(result.loss.has_value(), c.objective.kind != ObjectiveKind::kGradOutput);
  if (result.loss.has_value()) {
    EXPECT_DOUBLE_EQ(*result.loss, ScalarObjective(c));
  }

  ExpectMatchesFiniteDifferences("input", &c, &c.input, result.input_grad);
  const std::set<std::string> trainable = TrainableParameters(c.network);
  std::set<std::string> returned;
  for (const auto& [name, grad] : result.parameter_grads) returned.insert(name);
  ASSERT_EQ(returned, trainable);
  for (auto& [name, parameter] : c.parameters) {
    if (trainable.count(name) == 0) continue;  // a buffer: not differentiated
    auto it = result.parameter_grads.find(name);
    ASSERT_NE(it, result.parameter_grads.end()) << name;
    ExpectMatchesFiniteDifferences(name, &c, &parameter, it->second);
  }
}

// One conv layer with mse against a random target.
void CheckConv(const Conv2dSpec& spec, std::vector<int64_t> input_shape, uint64_t seed = 1) {
  ExpectGradientsMatchFiniteDifferences(RandomCase(
      NetworkSpec{{ConvLayer("conv", spec)}}, std::move(input_shape), ObjectiveKind::kMse, seed));
}

// ---- Worked by hand. ----

// x = 1 2 3    w = 1 2    bias 0.5
//     4 5 6        3 4
//     7 8 9
const RefTensor kHandInput = MakeTensor({1, 1, 3, 3}, {1, 2, 3, 4, 5, 6, 7, 8, 9});
const RefTensor kHandWeight = MakeTensor({1, 1, 2, 2}, {1, 2, 3, 4});

TEST(ReferenceByHand, ConvForward) {
  // y[0][0] = 1*1 + 2*2 + 4*3 + 5*4 + 0.5 = 37.5
  // y[0][1] = 2*1 + 3*2 + 5*3 + 6*4 + 0.5 = 47.5
  // y[1][0] = 4*1 + 5*2 + 7*3 + 8*4 + 0.5 = 67.5
  // y[1][1] = 5*1 + 6*2 + 8*3 + 9*4 + 0.5 = 77.5
  const RefTensor bias = MakeTensor({1}, {0.5});
  const RefTensor y = Conv2dForward(Conv(1, 1, 2, 2), kHandInput, kHandWeight, &bias);
  EXPECT_EQ(y.shape, std::vector<int64_t>({1, 1, 2, 2}));
  EXPECT_THAT(y.data, ElementsAreArray({37.5, 47.5, 67.5, 77.5}));
}

TEST(ReferenceByHand, ConvBackwardOfSum) {
  // With loss = sum(y), dL/dy = 1 everywhere, so
  //   dL/dbias = number of outputs = 4;
  //   dL/dw[kh][kw] = sum of the inputs tap (kh, kw) sees:
  //     w00: 1+2+4+5 = 12, w01: 2+3+5+6 = 16, w10: 4+5+7+8 = 24, w11: 5+6+8+9 = 28;
  //   dL/dx[i][j] = sum of the taps that see x[i][j]:
  //     1  1+2  2          1  3  2
  //     1+3  1+2+3+4  2+4  = 4 10  6
  //     3  3+4  4          3  7  4
  const Conv2dSpec spec = Conv(1, 1, 2, 2);
  const RefTensor ones = MakeTensor({1, 1, 2, 2}, {1, 1, 1, 1});
  const Conv2dGrads grads = Conv2dBackward(spec, kHandInput, kHandWeight, ones);
  EXPECT_THAT(grads.bias_grad.data, ElementsAreArray({4.0}));
  EXPECT_THAT(grads.weight_grad.data, ElementsAreArray({12.0, 16.0, 24.0, 28.0}));
  EXPECT_THAT(grads.input_grad.data,
              ElementsAreArray({1.0, 3.0, 2.0, 4.0, 10.0, 6.0, 3.0, 7.0, 4.0}));

  // The whole-network path agrees, and the sum objective's loss is 37.5+47.5+67.5+77.5.
  const NetworkSpec network{{ConvLayer("conv", spec)}};
  const RefParameters parameters{{"conv.weight", kHandWeight},
                                 {"conv.bias", MakeTensor({1}, {0.5})}};
  RefObjective sum;
  sum.kind = ObjectiveKind::kSum;
  const ReferenceResult result = RunReference(network, parameters, kHandInput, sum);
  EXPECT_EQ(result.loss, 230.0);
  EXPECT_EQ(result.input_grad.data, grads.input_grad.data);
  EXPECT_EQ(result.parameter_grads.at("conv.weight").data, grads.weight_grad.data);
  EXPECT_EQ(result.parameter_grads.at("conv.bias").data, grads.bias_grad.data);
}

TEST(ReferenceByHand, MseLossAndGradient) {
  // y = 37.5 47.5 67.5 77.5 (as above), target = 37 48 67.5 80:
  //   y - t = 0.5 -0.5 0 -2.5, loss = (0.25 + 0.25 + 0 + 6.25) / 4 = 1.6875,
  //   dL/dy = 2 (y - t) / 4 = 0.25 -0.25 0 -1.25, dL/dbias = sum = -1.25.
  const NetworkSpec network{{ConvLayer("conv", Conv(1, 1, 2, 2))}};
  const RefParameters parameters{{"conv.weight", kHandWeight},
                                 {"conv.bias", MakeTensor({1}, {0.5})}};
  RefObjective mse;
  mse.kind = ObjectiveKind::kMse;
  mse.tensor = MakeTensor({1, 1, 2, 2}, {37, 48, 67.5, 80});
  EXPECT_THAT(ObjectiveGrad(mse, MakeTensor({1, 1, 2, 2}, {37.5, 47.5, 67.5, 77.5})).data,
              ElementsAreArray({0.25, -0.25, 0.0, -1.25}));
  const ReferenceResult result = RunReference(network, parameters, kHandInput, mse);
  EXPECT_EQ(result.loss, 1.6875);
  EXPECT_THAT(result.parameter_grads.at("conv.bias").data, ElementsAreArray({-1.25}));
  // dL/dw00 = 0.25*1 - 0.25*2 + 0*4 - 1.25*5 = -6.5
  EXPECT_DOUBLE_EQ(result.parameter_grads.at("conv.weight").data[0], -6.5);
}

TEST(ReferenceByHand, StrideAndAsymmetricPadding) {
  // stride 2, one zero row on top and one zero column on the left, none bottom/right:
  // out = (3 + 1 - 2) / 2 + 1 = 2. Output (oh, ow) reads x[2oh - 1 + kh][2ow - 1 + kw]:
  //   y00 = x00*w11                         = 1*4             = 4
  //   y01 = x01*w10 + x02*w11               = 2*3 + 3*4       = 18
  //   y10 = x10*w01 + x20*w11               = 4*2 + 7*4       = 36
  //   y11 = x11*w00 + x12*w01 + x21*w10 + x22*w11 = 5 + 12 + 24 + 36 = 77
  Conv2dSpec spec = Conv(1, 1, 2, 2);
  spec.stride_h = spec.stride_w = 2;
  spec.pad_top = spec.pad_left = 1;
  spec.bias = false;
  const RefTensor y = Conv2dForward(spec, kHandInput, kHandWeight, nullptr);
  EXPECT_EQ(y.shape, std::vector<int64_t>({1, 1, 2, 2}));
  EXPECT_THAT(y.data, ElementsAreArray({4.0, 18.0, 36.0, 77.0}));
}

TEST(ReferenceByHand, Dilation) {
  // dilation 2 spreads the 2x2 kernel over the corners of the 3x3 input: one output,
  //   x00*w00 + x02*w01 + x20*w10 + x22*w11 = 1*1 + 3*2 + 7*3 + 9*4 = 64.
  Conv2dSpec spec = Conv(1, 1, 2, 2);
  spec.dilation_h = spec.dilation_w = 2;
  spec.bias = false;
  const RefTensor y = Conv2dForward(spec, kHandInput, kHandWeight, nullptr);
  EXPECT_EQ(y.shape, std::vector<int64_t>({1, 1, 1, 1}));
  EXPECT_THAT(y.data, ElementsAreArray({64.0}));
}

TEST(ReferenceByHand, Groups) {
  // Two groups of one channel: y0 = 2*5 = 10 and y1 = 3*7 = 21, no mixing between channels.
  // Without groups, the weight [2, 2, 1, 1] = (5 6; 7 8) gives y0 = 2*5+3*6, y1 = 2*7+3*8.
  const RefTensor x = MakeTensor({1, 2, 1, 1}, {2, 3});
  Conv2dSpec grouped = Conv(2, 2, 1, 1);
  grouped.groups = 2;
  grouped.bias = false;
  EXPECT_THAT(Conv2dForward(grouped, x, MakeTensor({2, 1, 1, 1}, {5, 7}), nullptr).data,
              ElementsAreArray({10.0, 21.0}));
  Conv2dSpec dense = Conv(2, 2, 1, 1);
  dense.bias = false;
  EXPECT_THAT(Conv2dForward(dense, x, MakeTensor({2, 2, 1, 1}, {5, 6, 7, 8}), nullptr).data,
              ElementsAreArray({28.0, 38.0}));
}

TEST(ReferenceByHand, OutputSize) {
  EXPECT_EQ(RefConvOutputSize(28, 3, 1, 1, 1, 1), 28);
  EXPECT_EQ(RefConvOutputSize(7, 3, 2, 0, 0, 1), 3);  // (7 - 3) / 2 + 1
  EXPECT_EQ(RefConvOutputSize(8, 3, 2, 0, 0, 1), 3);  // floor((8 - 3) / 2) + 1
  EXPECT_EQ(RefConvOutputSize(5, 3, 1, 0, 0, 2), 1);  // span 2*(3-1)+1 = 5
  EXPECT_EQ(RefConvOutputSize(4, 3, 1, 0, 0, 2), 0);  // span 5 > 4: does not fit
  EXPECT_EQ(RefConvOutputSize(4, 3, 1, 1, 0, 2), 1);  // one pad row makes it fit
  EXPECT_EQ(RefConvOutputSize(1, 1, 3, 2, 0, 1), 1);  // (1 + 2 - 1) / 3 + 1
}

TEST(ReferenceByHand, ActivationValues) {
  EXPECT_EQ(ActivationValue({ActivationKind::kRelu, 0.0f}, -1.0), 0.0);
  EXPECT_EQ(ActivationValue({ActivationKind::kRelu, 0.0f}, 2.0), 2.0);
  EXPECT_DOUBLE_EQ(ActivationValue({ActivationKind::kLeakyRelu, 0.25f}, -2.0), -0.5);
  EXPECT_EQ(ActivationValue({ActivationKind::kLeakyRelu, 0.25f}, 3.0), 3.0);
  EXPECT_DOUBLE_EQ(ActivationValue({ActivationKind::kTanh, 0.0f}, 0.5), 0.46211715726000974);
  EXPECT_DOUBLE_EQ(ActivationValue({ActivationKind::kSigmoid, 0.0f}, 0.0), 0.5);
  EXPECT_DOUBLE_EQ(ActivationValue({ActivationKind::kSigmoid, 0.0f}, 2.0), 0.8807970779778823);
  // elu(-1) = alpha (e^-1 - 1) = 2 * -0.63212...
  EXPECT_DOUBLE_EQ(ActivationValue({ActivationKind::kElu, 2.0f}, -1.0), 2 * -0.6321205588285577);
  EXPECT_EQ(ActivationValue({ActivationKind::kElu, 2.0f}, 1.5), 1.5);
  // gelu(1) = 1 * Phi(1), the standard normal CDF at 1.
  EXPECT_DOUBLE_EQ(ActivationValue({ActivationKind::kGeluErf, 0.0f}, 1.0), 0.8413447460685429);
  // gelu(-0.5) = -0.5 * Phi(-0.5)
  EXPECT_DOUBLE_EQ(ActivationValue({ActivationKind::kGeluErf, 0.0f}, -0.5), -0.15426876936299344);
  // 0.5 (1 + tanh(sqrt(2/pi) * (1 + 0.044715)))
  EXPECT_DOUBLE_EQ(ActivationValue({ActivationKind::kGeluTanh, 0.0f}, 1.0), 0.8411919906082768);
}

TEST(ReferenceByHand, DerivativesAtKinksFollowPyTorch) {
  // relu uses x > 0, so 0 at 0; leaky_relu likewise, so negative_slope at 0; elu's x <= 0
  // branch is alpha * exp(x), so alpha at 0.
  EXPECT_EQ(ActivationDerivative({ActivationKind::kRelu, 0.0f}, 0.0), 0.0);
  EXPECT_EQ(ActivationDerivative({ActivationKind::kLeakyRelu, 0.25f}, 0.0), 0.25);
  EXPECT_EQ(ActivationDerivative({ActivationKind::kElu, 2.0f}, 0.0), 2.0);
  EXPECT_EQ(ActivationDerivative({ActivationKind::kRelu, 0.0f}, 1e-300), 1.0);
  // Smooth ones at 0: tanh' = 1, sigmoid' = 1/4, both gelus' = Phi(0) = 1/2.
  EXPECT_DOUBLE_EQ(ActivationDerivative({ActivationKind::kTanh, 0.0f}, 0.0), 1.0);
  EXPECT_DOUBLE_EQ(ActivationDerivative({ActivationKind::kSigmoid, 0.0f}, 0.0), 0.25);
  EXPECT_DOUBLE_EQ(ActivationDerivative({ActivationKind::kGeluErf, 0.0f}, 0.0), 0.5);
  EXPECT_DOUBLE_EQ(ActivationDerivative({ActivationKind::kGeluTanh, 0.0f}, 0.0), 0.5);
  // Through a network: relu of [-1, 0, 2] under sum passes back [0, 0, 1].
  const NetworkSpec network{{ActivationLayer("act", ActivationKind::kRelu)}};
  RefObjective sum;
  sum.kind = ObjectiveKind::kSum;
  const ReferenceResult result =
      RunReference(network, {}, MakeTensor({1, 1, 1, 3}, {-1, 0, 2}), sum);
  EXPECT_THAT(result.input_grad.data, ElementsAreArray({0.0, 0.0, 1.0}));
  EXPECT_EQ(result.loss, 2.0);
}

TEST(ReferenceByHand, FloatRequestMatchesDoublePath) {
  // The GradientRequest overload only widens floats; the numbers are those of the double path.
  const std::vector<float> input = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  const std::vector<float> weight = {1, 2, 3, 4};
  const std::vector<float> bias = {0.5f};
  const std::vector<float> grad_output = {1, -2, 0.5f, 3};
  gradengine::GradientRequest request;
  request.network = NetworkSpec{
      {ConvLayer("conv", Conv(1, 1, 2, 2)), ActivationLayer("act", ActivationKind::kTanh)}};
  request.parameters["conv.weight"] = gradengine::TensorView({1, 1, 2, 2}, weight);
  request.parameters["conv.bias"] = gradengine::TensorView({1}, bias);
  request.input = gradengine::TensorView({1, 1, 3, 3}, input);
  request.objective.kind = ObjectiveKind::kGradOutput;
  request.objective.tensor = gradengine::TensorView({1, 1, 2, 2}, grad_output);

  RefObjective objective;
  objective.kind = ObjectiveKind::kGradOutput;
  objective.tensor = MakeTensor({1, 1, 2, 2}, {1, -2, 0.5, 3});
  const ReferenceResult expected = RunReference(
      request.network, {{"conv.weight", kHandWeight}, {"conv.bias", MakeTensor({1}, {0.5})}},
      kHandInput, objective);
  const ReferenceResult actual = RunReference(request);
  EXPECT_FALSE(actual.loss.has_value());
  EXPECT_EQ(actual.output.data, expected.output.data);
  EXPECT_EQ(actual.input_grad.data, expected.input_grad.data);
  EXPECT_EQ(actual.parameter_grads.at("conv.weight").data,
            expected.parameter_grads.at("conv.weight").data);
  EXPECT_EQ(actual.parameter_grads.at("conv.bias").data,
            expected.parameter_grads.at("conv.bias").data);
  EXPECT_EQ(ReferenceForward(request.network, request.parameters, request.input).data,
            expected.output.data);
}

TEST(ReferenceByHand, PoolOutputSize) {
  EXPECT_EQ(RefPoolOutputSize(6, 3, 2, 1, 1, false), 3);  // floor((6 + 2 - 3) / 2) + 1
  EXPECT_EQ(RefPoolOutputSize(6, 3, 2, 1, 1, true), 4);   // ceil(5 / 2) + 1
  EXPECT_EQ(RefPoolOutputSize(8, 3, 2, 0, 1, true), 4);   // ceil(5 / 2) + 1; starts at 6 < 8
  // ceil(5 / 2) + 1 = 4, but the 4th window would start at row 3*2 - 1 = 5 of a 5-row input,
  // entirely in the right padding, so PyTorch drops it.
  EXPECT_EQ(RefPoolOutputSize(5, 2, 2, 1, 1, true), 3);
  EXPECT_EQ(RefPoolOutputSize(5, 2, 2, 1, 1, false), 3);  // floor(5 / 2) + 1
  EXPECT_EQ(RefPoolOutputSize(7, 3, 1, 0, 2, false), 3);  // span 2*(3-1)+1 = 5
  // A kernel larger than the input fits only in ceil_mode: floor(-1 / 2) + 1 = 0, but
  // floor((-1 + 1) / 2) + 1 = 1.
  EXPECT_EQ(RefPoolOutputSize(3, 4, 2, 0, 1, false), 0);
  EXPECT_EQ(RefPoolOutputSize(3, 4, 2, 0, 1, true), 1);
}

//  1  3 |  2  0      windows (2x2, stride 2) and their maxima, the first in row order on ties:
//  3  2 |  5  5        [1 3; 3 2] -> 3 at (0,1)   [2 0; 5 5] -> 5 at (1,2)
// ------+------        [-1 -4; -2 -3] -> -1 at (2,0)   [7 9; 9 6] -> 9 at (2,3)
// -1 -4 |  7  9
// -2 -3 |  9  6
const RefTensor kPoolInput =
    MakeTensor({1, 1, 4, 4}, {1, 3, 2, 0, 3, 2, 5, 5, -1, -4, 7, 9, -2, -3, 9, 6});

TEST(ReferenceByHand, MaxPoolForwardAndTies) {
  const MaxPool2dSpec spec = MaxPool(2, 2, 2, 2);
  EXPECT_THAT(MaxPool2dForward(spec, kPoolInput).data, ElementsAreArray({3.0, 5.0, -1.0, 9.0}));
  const RefTensor grad_output = MakeTensor({1, 1, 2, 2}, {1, 2, 3, 4});
  EXPECT_THAT(MaxPool2dBackward(spec, kPoolInput, grad_output).data,
              ElementsAreArray({0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0,  //
                                3.0, 0.0, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0}));
}

TEST(ReferenceByHand, MaxPoolPaddingIsMinusInfinity) {
  // Padding 1 shifts the windows by one: out = (4 + 2 - 2) / 2 + 1 = 3. Window (2, 0) covers
  // rows 3..4 and columns -1..0, so only x[3][0] = -2 is real: -2, not a padding 0.
  // Window (0, 0) is x[0][0] = 1 alone; window (1, 1) is [2 5; -4 7] -> 7.
  MaxPool2dSpec spec = MaxPool(2, 2, 2, 2);
  spec.pad_h = spec.pad_w = 1;
  const RefTensor y = MaxPool2dForward(spec, kPoolInput);
  EXPECT_EQ(y.shape, std::vector<int64_t>({1, 1, 3, 3}));
  EXPECT_EQ(y.at(0, 0, 2, 0), -2.0);
  EXPECT_EQ(y.at(0, 0, 0, 0), 1.0);
  EXPECT_EQ(y.at(0, 0, 1, 1), 7.0);
  // Dilation 2, no padding: one 2x2 window on rows {0, 2}, columns {0, 2}: max(1, 2, -1, 7).
  MaxPool2dSpec dilated = MaxPool(2, 2, 2, 2);
  dilated.dilation_h = dilated.dilation_w = 2;
  EXPECT_THAT(MaxPool2dForward(dilated, kPoolInput).data, ElementsAreArray({7.0}));
}

TEST(ReferenceByHand, AvgPoolCeilModeDivisors) {
  // x = 1..16 in a 4x4, kernel 3, stride 2, pad 1, ceil_mode: out = ceil((4 + 2 - 3) / 2) + 1
  // = 3 (the last window starts at 3 < 4 + 1). Per dim the windows are [-1, 2), [1, 4) and
  // [3, 6) clipped to the padded input [-1, 5) as [3, 5): count_include_pad sizes 3, 3, 2;
  // real input elements 2, 3, 1.
  //   (0,0): 1+2+5+6 = 14,   divisor 3*3 = 9 or 2*2 = 4
  //   (0,2): 4+8 = 12,       divisor 3*2 = 6 or 2*1 = 2
  //   (1,1): 6+7+8+10+11+12+14+15+16 = 99, divisor 9 either way
  //   (2,2): 16,             divisor 2*2 = 4 or 1*1 = 1
  std::vector<double> values;
  for (int i = 1; i <= 16; ++i) values.push_back(i);
  const RefTensor x = MakeTensor({1, 1, 4, 4}, values);
  AvgPool2dSpec spec = AvgPool(3, 3, 2, 2);
  spec.pad_h = spec.pad_w = 1;
  spec.ceil_mode = true;
  spec.count_include_pad = true;
  const RefTensor with_pad = AvgPool2dForward(spec, x);
  ASSERT_EQ(with_pad.shape, std::vector<int64_t>({1, 1, 3, 3}));
  EXPECT_DOUBLE_EQ(with_pad.at(0, 0, 0, 0), 14.0 / 9);
  EXPECT_DOUBLE_EQ(with_pad.at(0, 0, 0, 2), 2.0);
  EXPECT_DOUBLE_EQ(with_pad.at(0, 0, 1, 1), 11.0);
  EXPECT_DOUBLE_EQ(with_pad.at(0, 0, 2, 2), 4.0);
  spec.count_include_pad = false;
  const RefTensor without_pad = AvgPool2dForward(spec, x);
  EXPECT_DOUBLE_EQ(without_pad.at(0, 0, 0, 0), 3.5);
  EXPECT_DOUBLE_EQ(without_pad.at(0, 0, 0, 2), 6.0);
  EXPECT_DOUBLE_EQ(without_pad.at(0, 0, 1, 1), 11.0);
  EXPECT_DOUBLE_EQ(without_pad.at(0, 0, 2, 2), 16.0);
  // Backward: output (2,2) alone sends 1/divisor to x[3][3], the only element it reads.
  RefTensor grad_output = RefTensor::Zeros({1, 1, 3, 3});
  grad_output.at(0, 0, 2, 2) = 1.0;
  EXPECT_DOUBLE_EQ(AvgPool2dBackward(spec, x, grad_output).at(0, 0, 3, 3), 1.0);
  spec.count_include_pad = true;
  EXPECT_DOUBLE_EQ(AvgPool2dBackward(spec, x, grad_output).at(0, 0, 3, 3), 0.25);
}

TEST(ReferenceByHand, Linear) {
  // x = [1 2 3; 4 5 6], W = [1 0 -1; 2 1 0], b = [0.5, -1]:
  //   y = [1 - 3 + 0.5, 2 + 2 - 1; 4 - 6 + 0.5, 8 + 5 - 1] = [-1.5 3; -1.5 12].
  // Under sum: dL/dx = column sums of W = [3 1 -1] per row, dL/dW = column sums of x for every
  // row of W = [5 7 9], dL/db = N = 2. A [2, 3, 1, 1] input is flattened to the same rows.
  const RefTensor weight = MakeTensor({2, 3}, {1, 0, -1, 2, 1, 0});
  const RefTensor bias = MakeTensor({2}, {0.5, -1});
  for (const std::vector<int64_t>& shape :
       {std::vector<int64_t>{2, 3}, std::vector<int64_t>{2, 3, 1, 1}}) {
    const RefTensor x = MakeTensor(shape, {1, 2, 3, 4, 5, 6});
    const RefTensor y = LinearForward(Linear(3, 2), x, weight, &bias);
    EXPECT_EQ(y.shape, std::vector<int64_t>({2, 2}));
    EXPECT_THAT(y.data, ElementsAreArray({-1.5, 3.0, -1.5, 12.0}));
    const LinearGrads grads =
        LinearBackward(Linear(3, 2), x, weight, MakeTensor({2, 2}, {1, 1, 1, 1}));
    EXPECT_EQ(grads.input_grad.shape, shape);
    EXPECT_THAT(grads.input_grad.data, ElementsAreArray({3.0, 1.0, -1.0, 3.0, 1.0, -1.0}));
    EXPECT_THAT(grads.weight_grad.data, ElementsAreArray({5.0, 7.0, 9.0, 5.0, 7.0, 9.0}));
    EXPECT_THAT(grads.bias_grad.data, ElementsAreArray({2.0, 2.0}));
  }
}

// x [2, 2, 1, 2]: channel 0 holds 1 3 (n = 0) and 5 7 (n = 1): mean 4, biased variance
// (9 + 1 + 1 + 9) / 4 = 5, unbiased 20/3; channel 1 holds 0 0 and 2 -2: mean 0, variance
// 8/4 = 2, unbiased 8/3.
const RefTensor kNormInput = MakeTensor({2, 2, 1, 2}, {1, 3, 0, 0, 5, 7, 2, -2});

TEST(ReferenceByHand, BatchNormTrainingUpdatesRunningStats) {
  // running_mean [1, -1], running_var [2, 0.5], momentum 0.1:
  //   mean' = 0.9 * [1, -1] + 0.1 * [4, 0]   = [1.3, -0.9]
  //   var'  = 0.9 * [2, 0.5] + 0.1 * [20/3, 8/3] = [1.8 + 2/3, 0.45 + 0.8/3]
  // y = (x - mean) / sqrt(var + eps) * weight + bias with the batch's mean and variance.
  const BatchNorm2dSpec spec = BatchNorm(2, /*training=*/true);
  const NetworkSpec network{{Layer("bn", spec)}};
  RefParameters parameters{{"bn.weight", MakeTensor({2}, {2, -1})},
                           {"bn.bias", MakeTensor({2}, {0.5, 1})},
                           {"bn.running_mean", MakeTensor({2}, {1, -1})},
                           {"bn.running_var", MakeTensor({2}, {2, 0.5})}};
  RefObjective sum;
  sum.kind = ObjectiveKind::kSum;
  const ReferenceResult result = RunReference(network, parameters, kNormInput, sum);
  ASSERT_EQ(result.running_stats.size(), 2u);
  EXPECT_DOUBLE_EQ(result.running_stats.at("bn.running_mean").data[0], 1.3);
  EXPECT_DOUBLE_EQ(result.running_stats.at("bn.running_mean").data[1], -0.9);
  EXPECT_DOUBLE_EQ(result.running_stats.at("bn.running_var").data[0], 1.8 + 2.0 / 3);
  EXPECT_DOUBLE_EQ(result.running_stats.at("bn.running_var").data[1], 0.45 + 0.8 / 3);
  const double eps = spec.eps;
  EXPECT_DOUBLE_EQ(result.output.at(0, 0, 0, 0), (1 - 4) / std::sqrt(5 + eps) * 2 + 0.5);
  EXPECT_DOUBLE_EQ(result.output.at(1, 1, 0, 1), (-2 - 0) / std::sqrt(2 + eps) * -1 + 1);
  // Buffers are not differentiated; under sum, dL/dbias = N*H*W = 4 and dL/dweight =
  // sum(x_hat) = 0 per channel, and dL/dx = 0 (the normalised batch always sums to 0).
  EXPECT_EQ(result.parameter_grads.count("bn.running_mean"), 0u);
  EXPECT_EQ(result.parameter_grads.count("bn.running_var"), 0u);
  EXPECT_THAT(result.parameter_grads.at("bn.bias").data, ElementsAreArray({4.0, 4.0}));
  for (double g : result.parameter_grads.at("bn.weight").data) EXPECT_NEAR(g, 0.0, 1e-12);
  for (double g : result.input_grad.data) EXPECT_NEAR(g, 0.0, 1e-12);

  // Without running statistics they start at PyTorch's 0 and 1:
  //   mean' = 0.1 * [4, 0] = [0.4, 0], var' = 0.9 + 0.1 * [20/3, 8/3].
  parameters.erase("bn.running_mean");
  parameters.erase("bn.running_var");
  const ReferenceResult fresh = RunReference(network, parameters, kNormInput, sum);
  EXPECT_DOUBLE_EQ(fresh.running_stats.at("bn.running_mean").data[0], 0.4);
  EXPECT_DOUBLE_EQ(fresh.running_stats.at("bn.running_mean").data[1], 0.0);
  EXPECT_DOUBLE_EQ(fresh.running_stats.at("bn.running_var").data[0], 0.9 + 2.0 / 3);
  EXPECT_DOUBLE_EQ(fresh.running_stats.at("bn.running_var").data[1], 0.9 + 0.8 / 3);
  EXPECT_EQ(fresh.output.data, result.output.data);  // training mode ignores them
}

TEST(ReferenceByHand, BatchNormInferenceUsesRunningStats) {
  // y = (x - running_mean) / sqrt(running_var + eps) * weight + bias, nothing updated;
  // under sum dL/dx = weight / sqrt(running_var + eps) everywhere in the channel.
  const BatchNorm2dSpec spec = BatchNorm(2, /*training=*/false);
  const NetworkSpec network{{Layer("bn", spec)}};
  const RefParameters parameters{{"bn.weight", MakeTensor({2}, {2, -1})},
                                 {"bn.bias", MakeTensor({2}, {0.5, 1})},
                                 {"bn.running_mean", MakeTensor({2}, {1, -1})},
                                 {"bn.running_var", MakeTensor({2}, {3, 0.5})}};
  RefObjective sum;
  sum.kind = ObjectiveKind::kSum;
  const ReferenceResult result = RunReference(network, parameters, kNormInput, sum);
  EXPECT_TRUE(result.running_stats.empty());
  const double eps = spec.eps;
  EXPECT_DOUBLE_EQ(result.output.at(1, 0, 0, 1), (7 - 1) / std::sqrt(3 + eps) * 2 + 0.5);
  EXPECT_DOUBLE_EQ(result.output.at(0, 1, 0, 0), (0 + 1) / std::sqrt(0.5 + eps) * -1 + 1);
  EXPECT_DOUBLE_EQ(result.input_grad.at(0, 0, 0, 0), 2 / std::sqrt(3 + eps));
  EXPECT_DOUBLE_EQ(result.input_grad.at(1, 1, 0, 1), -1 / std::sqrt(0.5 + eps));
  EXPECT_EQ(result.parameter_grads.size(), 2u);
}

TEST(ReferenceByHand, CrossEntropy) {
  // Logits log 1, log 2, log 3 make p = 1/6, 2/6, 3/6. With label 2:
  //   loss = -log(1/2), dL/dz = p - onehot = [1/6, 1/3, -1/2].
  // With label_smoothing 0.3 (target 0.7 onehot + 0.1 each):
  //   loss = 0.7 (-log 1/2) + 0.1 (-log 1/6 - log 1/3 - log 1/2) = 0.7 log 2 + 0.1 log 36,
  //   dL/dz = p - [0.1, 0.1, 0.8].
  // A second row labelled ignore_index adds nothing and takes no gradient; the mean is over
  // the one row counted.
  const RefTensor logits =
      MakeTensor({2, 3}, {std::log(1.0), std::log(2.0), std::log(3.0), 5.0, -7.0, 2.0});
  RefObjective objective;
  objective.kind = ObjectiveKind::kCrossEntropy;
  objective.labels = {2, -100};
  objective.labels_shape = {2};
  EXPECT_DOUBLE_EQ(ObjectiveLoss(objective, logits).value(), std::log(2.0));
  const RefTensor grad = ObjectiveGrad(objective, logits);
  EXPECT_DOUBLE_EQ(grad.at(0, 0), 1.0 / 6);
  EXPECT_DOUBLE_EQ(grad.at(0, 1), 1.0 / 3);
  EXPECT_DOUBLE_EQ(grad.at(0, 2), -0.5);
  EXPECT_THAT(std::vector<double>(grad.data.begin() + 3, grad.data.end()),
              ElementsAreArray({0.0, 0.0, 0.0}));

  objective.label_smoothing = 0.3;
  EXPECT_DOUBLE_EQ(ObjectiveLoss(objective, logits).value(),
                   0.7 * std::log(2.0) + 0.1 * std::log(36.0));
  const RefTensor smoothed = ObjectiveGrad(objective, logits);
  EXPECT_DOUBLE_EQ(smoothed.at(0, 0), 1.0 / 6 - 0.1);
  EXPECT_DOUBLE_EQ(smoothed.at(0, 1), 1.0 / 3 - 0.1);
  EXPECT_DOUBLE_EQ(smoothed.at(0, 2), 0.5 - 0.8);

  // Counting both rows halves the gradient of each: the second row's label 0 has
  // p = softmax(5, -7, 2).
  objective.label_smoothing = 0.0;
  objective.labels = {2, 0};
  const double second = -(5.0 - std::log(std::exp(5.0) + std::exp(-7.0) + std::exp(2.0)));
  EXPECT_DOUBLE_EQ(ObjectiveLoss(objective, logits).value(), (std::log(2.0) + second) / 2);
  EXPECT_DOUBLE_EQ(ObjectiveGrad(objective, logits).at(0, 2), -0.25);

  // Every label ignored: 0 / 0 = NaN, and PyTorch's gradient is 0.
  objective.labels = {-100, -100};
  EXPECT_TRUE(std::isnan(ObjectiveLoss(objective, logits).value()));
  for (double g : ObjectiveGrad(objective, logits).data) EXPECT_EQ(g, 0.0);
  // Another ignore_index: label 7 is ignored instead of -100.
  objective.ignore_index = 7;
  objective.labels = {2, 7};
  EXPECT_DOUBLE_EQ(ObjectiveLoss(objective, logits).value(), std::log(2.0));
}

TEST(ReferenceByHand, CrossEntropyIsStable) {
  // Logits 1000 and 1000 + log 3: exp overflows, the shifted form gives p = 1/4, 3/4.
  const RefTensor logits = MakeTensor({1, 2}, {1000.0, 1000.0 + std::log(3.0)});
  RefObjective objective;
  objective.kind = ObjectiveKind::kCrossEntropy;
  objective.labels = {0};
  objective.labels_shape = {1};
  EXPECT_NEAR(ObjectiveLoss(objective, logits).value(), std::log(4.0), 1e-12);
  EXPECT_NEAR(ObjectiveGrad(objective, logits).data[0], 0.25 - 1.0, 1e-12);
}

TEST(ReferenceByHand, CrossEntropySpatial) {
  // [N=1, C=2, H=1, W=2]: pixel (0, w) has logits (y[0,0,0,w], y[0,1,0,w]) and label[0][0][w].
  // Pixel 0: logits (0, 0), label 1 -> log 2. Pixel 1: logits (log 3, 0), label 0 -> log 4/3.
  const RefTensor logits = MakeTensor({1, 2, 1, 2}, {0.0, std::log(3.0), 0.0, 0.0});
  RefObjective objective;
  objective.kind = ObjectiveKind::kCrossEntropy;
  objective.labels = {1, 0};
  objective.labels_shape = {1, 1, 2};
  EXPECT_DOUBLE_EQ(ObjectiveLoss(objective, logits).value(),
                   (std::log(2.0) + std::log(4.0 / 3)) / 2);
  // dL/dlogit = (p - onehot) / 2: pixel 0 (0.5 - 0, 0.5 - 1) / 2, pixel 1 (0.75 - 1, 0.25 - 0)
  // / 2, in memory order (c0 w0, c0 w1, c1 w0, c1 w1).
  EXPECT_THAT(ObjectiveGrad(objective, logits).data,
              ElementsAre(DoubleNear(0.25, 1e-15), DoubleNear(-0.125, 1e-15),
                          DoubleNear(-0.25, 1e-15), DoubleNear(0.125, 1e-15)));
}

TEST(ReferenceByHand, AddRoutesAndAccumulates) {
  // twice = x + x; thrice = x + twice (reading the network's input by name). Under sum,
  // x reaches the loss three times: dL/dx = 3; the input tensor has three readers.
  const NetworkSpec network{
      {AddLayer("twice", kNetworkInput), AddLayer("thrice", "twice", /*input=*/kNetworkInput)}};
  RefObjective sum;
  sum.kind = ObjectiveKind::kSum;
  const RefTensor x = MakeTensor({1, 1, 1, 2}, {1.5, -2});
  const ReferenceResult result = RunReference(network, {}, x, sum);
  EXPECT_THAT(result.output.data, ElementsAreArray({4.5, -6.0}));
  EXPECT_THAT(result.input_grad.data, ElementsAreArray({3.0, 3.0}));
  EXPECT_EQ(ReferenceLayerOutputs(network, {}, x)[0].data, std::vector<double>({3.0, -4.0}));
  EXPECT_EQ(RefInputSource(network, 0), -1);
  EXPECT_EQ(RefInputSource(network, 1), -1);
  EXPECT_EQ(RefLayerIndex(network, "twice", 1), 0);
}

TEST(ReferenceByHand, FloatRequestWithLabelsAndRunningStats) {
  // The GradientRequest overload converts the labels and the cross-entropy options, and reads
  // absent optional buffers as their fill; the numbers are those of the double path.
  const std::vector<float> input = {1, 3, 0, 0, 5, 7, 2, -2};
  const std::vector<float> norm_weight = {2, -1};
  const std::vector<float> norm_bias = {0.5f, 1};
  const std::vector<float> fc_weight = {1, 0, -1, 2, 0.5f, 0.25f, 0, 1, -2, 1, 1, 1};
  const std::vector<float> fc_bias = {0.5f, -1, 0};
  const std::vector<int64_t> labels = {2, 1};
  gradengine::GradientRequest request;
  request.network = NetworkSpec{{Layer("bn", BatchNorm(2, true)), Layer("fc", Linear(4, 3))}};
  request.parameters["bn.weight"] = gradengine::TensorView({2}, norm_weight);
  request.parameters["bn.bias"] = gradengine::TensorView({2}, norm_bias);
  request.parameters["fc.weight"] = gradengine::TensorView({3, 4}, fc_weight);
  request.parameters["fc.bias"] = gradengine::TensorView({3}, fc_bias);
  request.input = gradengine::TensorView({2, 2, 1, 2}, input);
  request.objective.kind = ObjectiveKind::kCrossEntropy;
  request.objective.labels = {{2}, labels.data(), 2};
  request.objective.label_smoothing = 0.25;
  request.objective.ignore_index = 1;

  RefObjective objective;
  objective.kind = ObjectiveKind::kCrossEntropy;
  objective.labels = {2, 1};
  objective.labels_shape = {2};
  objective.label_smoothing = 0.25;
  objective.ignore_index = 1;
  const RefParameters parameters{
      {"bn.weight", MakeTensor({2}, {2, -1})},
      {"bn.bias", MakeTensor({2}, {0.5, 1})},
      {"fc.weight", MakeTensor({3, 4}, {1, 0, -1, 2, 0.5, 0.25, 0, 1, -2, 1, 1, 1})},
      {"fc.bias", MakeTensor({3}, {0.5, -1, 0})},
      {"bn.running_mean", MakeTensor({2}, {0, 0})},
      {"bn.running_var", MakeTensor({2}, {1, 1})}};
  const ReferenceResult expected = RunReference(request.network, parameters, kNormInput, objective);
  const ReferenceResult actual = RunReference(request);
  ASSERT_TRUE(actual.loss.has_value());
  EXPECT_EQ(*actual.loss, *expected.loss);
  EXPECT_EQ(actual.output.data, expected.output.data);
  EXPECT_EQ(actual.input_grad.data, expected.input_grad.data);
  ASSERT_EQ(actual.parameter_grads.size(), 4u);
  for (const auto& [name, grad] : expected.parameter_grads) {
    EXPECT_EQ(actual.parameter_grads.at(name).data, grad.data) << name;
  }
  ASSERT_EQ(actual.running_stats.size(), 2u);
  for (const auto& [name, stat] : expected.running_stats) {
    EXPECT_EQ(actual.running_stats.at(name).data, stat.data) << name;
  }
}

// ---- Finite differences: conv hyperparameters, one at a time and together. ----

TEST(ReferenceFiniteDifferences, ConvPlain) { CheckConv(Conv(2, 3, 3, 3), {1, 2, 5, 6}); }

TEST(ReferenceFiniteDifferences, ConvStride) {
  Conv2dSpec spec = Conv(2, 2, 3, 3);
  spec.stride_h = 2;
  spec.stride_w = 3;
  CheckConv(spec, {1, 2, 7, 9});
}

TEST(ReferenceFiniteDifferences, ConvAsymmetricPadding) {
  Conv2dSpec spec = Conv(2, 2, 3, 3);
  spec.pad_top = 2;
  spec.pad_bottom = 0;
  spec.pad_left = 1;
  spec.pad_right = 2;
  CheckConv(spec, {1, 2, 4, 5});
}

TEST(ReferenceFiniteDifferences, ConvDilation) {
  Conv2dSpec spec = Conv(2, 2, 2, 3);
  spec.dilation_h = 2;
  spec.dilation_w = 3;
  CheckConv(spec, {1, 2, 6, 8});
}

TEST(ReferenceFiniteDifferences, ConvGroups) {
  Conv2dSpec spec = Conv(4, 6, 3, 2);
  spec.groups = 2;
  CheckConv(spec, {1, 4, 4, 5});
}

TEST(ReferenceFiniteDifferences, ConvDepthwise) {
  Conv2dSpec spec = Conv(3, 3, 3, 3);
  spec.groups = 3;
  spec.pad_top = spec.pad_bottom = spec.pad_left = spec.pad_right = 1;
  CheckConv(spec, {1, 3, 4, 4});
}

TEST(ReferenceFiniteDifferences, ConvNonSquareKernel) { CheckConv(Conv(2, 2, 2, 4), {1, 2, 4, 6}); }

TEST(ReferenceFiniteDifferences, ConvWithoutBias) {
  Conv2dSpec spec = Conv(2, 3, 3, 3);
  spec.bias = false;
  CheckConv(spec, {1, 2, 4, 5});
}

TEST(ReferenceFiniteDifferences, ConvBatch) { CheckConv(Conv(2, 2, 3, 2), {3, 2, 4, 4}); }

TEST(ReferenceFiniteDifferences, ConvEverythingAtOnce) {
  Conv2dSpec spec = Conv(4, 2, 3, 2);
  spec.stride_h = 2;
  spec.stride_w = 1;
  spec.pad_top = 1;
  spec.pad_bottom = 0;
  spec.pad_left = 0;
  spec.pad_right = 2;
  spec.dilation_h = 1;
  spec.dilation_w = 2;
  spec.groups = 2;
  CheckConv(spec, {2, 4, 6, 5});
}

// ---- Finite differences: each activation, away from its kink. ----

class ActivationFiniteDifferences : public ::testing::TestWithParam<ActivationSpec> {};

TEST_P(ActivationFiniteDifferences, MatchesFiniteDifferences) {
  // Inputs spread over [-3, 3] (where every activation bends) but kept off 0.
  std::vector<double> values;
  for (int i = 0; i < 24; ++i) values.push_back(-2.95 + 0.25 * i + (i % 2 == 0 ? 0.01 : -0.02));
  Case c;
  c.network = NetworkSpec{{ActivationLayer("act", GetParam().kind, GetParam().alpha)}};
  c.input = MakeTensor({2, 3, 2, 2}, values);
  c.objective.kind = ObjectiveKind::kMse;
  std::mt19937_64 rng(7);
  c.objective.tensor = RandomTensor(c.input.shape, &rng);
  ExpectGradientsMatchFiniteDifferences(c);
}

INSTANTIATE_TEST_SUITE_P(AllKinds, ActivationFiniteDifferences,
                         ::testing::Values(ActivationSpec{ActivationKind::kRelu, 0.0f},
                                           ActivationSpec{ActivationKind::kLeakyRelu, 0.01f},
                                           ActivationSpec{ActivationKind::kLeakyRelu, 0.3f},
                                           ActivationSpec{ActivationKind::kTanh, 0.0f},
                                           ActivationSpec{ActivationKind::kSigmoid, 0.0f},
                                           ActivationSpec{ActivationKind::kElu, 1.0f},
                                           ActivationSpec{ActivationKind::kElu, 0.5f},
                                           ActivationSpec{ActivationKind::kGeluErf, 0.0f},
                                           ActivationSpec{ActivationKind::kGeluTanh, 0.0f}));

// ---- Finite differences: each objective, and a chain. ----

NetworkSpec ConvTanh() {
  return NetworkSpec{
      {ConvLayer("conv", Conv(2, 3, 2, 3)), ActivationLayer("act", ActivationKind::kTanh)}};
}

TEST(ReferenceFiniteDifferences, ObjectiveMse) {
  ExpectGradientsMatchFiniteDifferences(
      RandomCase(ConvTanh(), {2, 2, 4, 5}, ObjectiveKind::kMse, 3));
}

TEST(ReferenceFiniteDifferences, ObjectiveSum) {
  ExpectGradientsMatchFiniteDifferences(
      RandomCase(ConvTanh(), {2, 2, 4, 5}, ObjectiveKind::kSum, 3));
}

TEST(ReferenceFiniteDifferences, ObjectiveGradOutput) {
  ExpectGradientsMatchFiniteDifferences(
      RandomCase(ConvTanh(), {2, 2, 4, 5}, ObjectiveKind::kGradOutput, 3));
}

TEST(ReferenceFiniteDifferences, ThreeConvChain) {
  Conv2dSpec first = Conv(3, 4, 3, 2);
  first.stride_h = 2;
  first.pad_top = 1;
  first.pad_right = 1;
  Conv2dSpec second = Conv(4, 4, 2, 2);
  second.groups = 2;
  second.dilation_w = 2;
  second.bias = false;
  Conv2dSpec third = Conv(4, 2, 1, 2);
  NetworkSpec network{
      {ConvLayer("conv1", first), ActivationLayer("act1", ActivationKind::kLeakyRelu, 0.1f),
       ConvLayer("conv2", second), ActivationLayer("act2", ActivationKind::kGeluTanh),
       ConvLayer("conv3", third), ActivationLayer("act3", ActivationKind::kElu, 1.0f)}};
  ExpectGradientsMatchFiniteDifferences(
      RandomCase(std::move(network), {2, 3, 7, 6}, ObjectiveKind::kSum, 5));
}

TEST(ReferenceFiniteDifferences, ChainWithReluSigmoidGelu) {
  Conv2dSpec first = Conv(2, 3, 2, 2);
  first.pad_bottom = 1;
  Conv2dSpec second = Conv(3, 3, 2, 1);
  second.stride_w = 2;
  NetworkSpec network{{ConvLayer("a", first), ActivationLayer("a_act", ActivationKind::kRelu),
                       ConvLayer("b", second), ActivationLayer("b_act", ActivationKind::kSigmoid),
                       ActivationLayer("c_act", ActivationKind::kGeluErf)}};
  ExpectGradientsMatchFiniteDifferences(
      RandomCase(std::move(network), {1, 2, 5, 6}, ObjectiveKind::kGradOutput, 11));
}

// ---- Finite differences: pooling. ----

// One max_pool2d layer under mse, on distinct values (no near-ties).
void CheckMaxPool(const MaxPool2dSpec& spec, std::vector<int64_t> input_shape, uint64_t seed) {
  Case c = RandomCase(NetworkSpec{{Layer("pool", spec)}}, input_shape, ObjectiveKind::kMse, seed);
  c.input = DistinctValues(std::move(input_shape), seed);
  ExpectGradientsMatchFiniteDifferences(std::move(c));
}

TEST(ReferenceFiniteDifferences, MaxPoolPlain) {
  CheckMaxPool(MaxPool(2, 2, 2, 2), {2, 2, 4, 6}, 1);
}

TEST(ReferenceFiniteDifferences, MaxPoolOverlapping) {
  // Stride 1 < kernel 3: one input can win several windows, whose gradients add up.
  CheckMaxPool(MaxPool(3, 3, 1, 1), {1, 2, 5, 5}, 2);
}

TEST(ReferenceFiniteDifferences, MaxPoolPaddingDilationCeilMode) {
  MaxPool2dSpec spec = MaxPool(3, 2, 2, 1);
  spec.pad_h = 1;
  spec.pad_w = 1;
  spec.dilation_h = 2;
  spec.ceil_mode = true;
  CheckMaxPool(spec, {2, 2, 8, 5}, 3);
}

TEST(ReferenceFiniteDifferences, MaxPoolCeilModeNonSquare) {
  MaxPool2dSpec spec = MaxPool(2, 3, 2, 2);
  spec.ceil_mode = true;
  CheckMaxPool(spec, {1, 3, 5, 7}, 4);
}

void CheckAvgPool(const AvgPool2dSpec& spec, std::vector<int64_t> input_shape, uint64_t seed) {
  ExpectGradientsMatchFiniteDifferences(RandomCase(
      NetworkSpec{{Layer("pool", spec)}}, std::move(input_shape), ObjectiveKind::kMse, seed));
}

TEST(ReferenceFiniteDifferences, AvgPoolPlain) {
  CheckAvgPool(AvgPool(2, 2, 2, 2), {2, 2, 4, 6}, 1);
}

// ceil_mode with padding: 6 rows, kernel 3, stride 2, pad 1 give 4 windows, the last one
// running past the padded input (divisor 2 rows with count_include_pad, 1 real row without);
// 5 columns, kernel 2, stride 2, pad 1 give 3 (a 4th would start in the right padding).
AvgPool2dSpec CeilModePaddedAvgPool(bool count_include_pad) {
  AvgPool2dSpec spec = AvgPool(3, 2, 2, 2);
  spec.pad_h = 1;
  spec.pad_w = 1;
  spec.ceil_mode = true;
  spec.count_include_pad = count_include_pad;
  return spec;
}

TEST(ReferenceFiniteDifferences, AvgPoolCeilModePaddingCountIncludePad) {
  CheckAvgPool(CeilModePaddedAvgPool(true), {2, 2, 6, 5}, 2);
}

TEST(ReferenceFiniteDifferences, AvgPoolCeilModePaddingExcludePad) {
  CheckAvgPool(CeilModePaddedAvgPool(false), {2, 2, 6, 5}, 2);
}

TEST(ReferenceFiniteDifferences, AvgPoolCountIncludePadMatters) {
  // The two cases above differ (else one of them would not test its divisor).
  const RefTensor x = DistinctValues({1, 1, 6, 5}, 3);
  const std::vector<int64_t> expected_shape = {1, 1, 4, 3};
  const RefTensor with_pad = AvgPool2dForward(CeilModePaddedAvgPool(true), x);
  const RefTensor without_pad = AvgPool2dForward(CeilModePaddedAvgPool(false), x);
  EXPECT_EQ(with_pad.shape, expected_shape);
  EXPECT_EQ(without_pad.shape, expected_shape);
  EXPECT_NE(with_pad.data, without_pad.data);
  // The inner window (1, 1) has no padding: the same either way.
  EXPECT_EQ(with_pad.at(0, 0, 1, 1), without_pad.at(0, 0, 1, 1));
}

// ---- Finite differences: batch norm, linear, add. ----

void CheckBatchNorm(const BatchNorm2dSpec& spec, std::vector<int64_t> input_shape, uint64_t seed) {
  ExpectGradientsMatchFiniteDifferences(RandomCase(
      NetworkSpec{{Layer("bn", spec)}}, std::move(input_shape), ObjectiveKind::kMse, seed));
}

TEST(ReferenceFiniteDifferences, BatchNormTraining) {
  CheckBatchNorm(BatchNorm(3, /*training=*/true), {2, 3, 3, 4}, 1);
}

TEST(ReferenceFiniteDifferences, BatchNormTrainingWithoutAffine) {
  BatchNorm2dSpec spec = BatchNorm(2, /*training=*/true, /*affine=*/false);
  spec.eps = 1e-3;
  CheckBatchNorm(spec, {3, 2, 2, 3}, 2);
}

TEST(ReferenceFiniteDifferences, BatchNormTrainingOneRowPerChannelPixel) {
  // N = 4, H = W = 1: statistics over the batch alone.
  CheckBatchNorm(BatchNorm(3, /*training=*/true), {4, 3, 1, 1}, 3);
}

TEST(ReferenceFiniteDifferences, BatchNormInference) {
  CheckBatchNorm(BatchNorm(3, /*training=*/false), {2, 3, 3, 4}, 4);
}

TEST(ReferenceFiniteDifferences, BatchNormInferenceWithoutAffine) {
  CheckBatchNorm(BatchNorm(2, /*training=*/false, /*affine=*/false), {2, 2, 3, 3}, 5);
}

TEST(ReferenceFiniteDifferences, BatchNormTrainingAfterConv) {
  // The running statistics returned are those of the conv's output, not of the input. The
  // conv has no bias: the batch mean cancels it, so its gradient would be exactly 0.
  Conv2dSpec conv = Conv(2, 3, 2, 2);
  conv.bias = false;
  Case c = RandomCase(
      NetworkSpec{{ConvLayer("conv", conv), Layer("bn", BatchNorm(3, /*training=*/true))}},
      {2, 2, 4, 4}, ObjectiveKind::kMse, 6);
  const ReferenceResult result = RunReference(c.network, c.parameters, c.input, c.objective);
  const RefTensor conv_output = ReferenceLayerOutputs(c.network, c.parameters, c.input)[0];
  const RefTensor expected =
      BatchNorm2dForward(BatchNorm(3, true), conv_output, &c.parameters.at("bn.weight"),
                         &c.parameters.at("bn.bias"), c.parameters.at("bn.running_mean"),
                         c.parameters.at("bn.running_var"))
          .running_mean;
  EXPECT_EQ(result.running_stats.at("bn.running_mean").data, expected.data);
  ExpectGradientsMatchFiniteDifferences(std::move(c));
}

TEST(ReferenceFiniteDifferences, LinearOnNchw) {
  ExpectGradientsMatchFiniteDifferences(
      RandomCase(NetworkSpec{{Layer("fc", Linear(12, 5))}}, {3, 2, 2, 3}, ObjectiveKind::kMse, 1));
}

TEST(ReferenceFiniteDifferences, LinearChainOn2d) {
  // Linear, an activation on [N, F], linear without bias.
  NetworkSpec network{{Layer("fc1", Linear(6, 4)), ActivationLayer("act", ActivationKind::kTanh),
                       Layer("fc2", Linear(4, 3, /*bias=*/false))}};
  ExpectGradientsMatchFiniteDifferences(
      RandomCase(std::move(network), {2, 6}, ObjectiveKind::kGradOutput, 2));
}

TEST(ReferenceFiniteDifferences, AddOfTwoBranches) {
  // Two convs read the input; the add sums them; the input's gradient adds both paths.
  Conv2dSpec padded = Conv(2, 2, 3, 3);
  padded.pad_top = padded.pad_bottom = padded.pad_left = padded.pad_right = 1;
  NetworkSpec network{
      {ConvLayer("left", padded), ActivationLayer("left_act", ActivationKind::kTanh),
       Layer("right", Conv(2, 2, 1, 1), kNetworkInput), AddLayer("sum", "left_act")}};
  ExpectGradientsMatchFiniteDifferences(
      RandomCase(std::move(network), {2, 2, 3, 4}, ObjectiveKind::kMse, 3));
}

// ---- Finite differences: cross-entropy. ----

// Logits from a linear layer on a [4, 2, 1, 3] input, 5 classes.
Case LinearCrossEntropyCase(uint64_t seed) {
  return RandomCase(NetworkSpec{{Layer("fc", Linear(6, 5))}}, {4, 2, 1, 3},
                    ObjectiveKind::kCrossEntropy, seed);
}

TEST(ReferenceFiniteDifferences, CrossEntropy) {
  ExpectGradientsMatchFiniteDifferences(LinearCrossEntropyCase(1));
}

TEST(ReferenceFiniteDifferences, CrossEntropyLabelSmoothing) {
  Case c = LinearCrossEntropyCase(2);
  c.objective.label_smoothing = 0.2;
  ExpectGradientsMatchFiniteDifferences(std::move(c));
}

TEST(ReferenceFiniteDifferences, CrossEntropyIgnoreIndexAndLabelSmoothing) {
  Case c = LinearCrossEntropyCase(3);
  c.objective.label_smoothing = 0.1;
  c.objective.ignore_index = 3;
  c.objective.labels = {3, 0, 4, 3};  // two of four rows ignored
  const ReferenceResult result = RunReference(c.network, c.parameters, c.input, c.objective);
  // The ignored rows' logits take no gradient.
  for (int64_t k = 0; k < 5; ++k) {
    EXPECT_EQ(ObjectiveGrad(c.objective, result.output).at(0, k), 0.0);
    EXPECT_EQ(ObjectiveGrad(c.objective, result.output).at(3, k), 0.0);
  }
  ExpectGradientsMatchFiniteDifferences(std::move(c));
}

TEST(ReferenceFiniteDifferences, CrossEntropySpatialWithIgnoreIndex) {
  // [N, C, H, W] logits from a conv, [N, H, W] labels, some ignored (default -100).
  Case c = RandomCase(NetworkSpec{{ConvLayer("conv", Conv(2, 4, 2, 2))}}, {2, 2, 3, 4},
                      ObjectiveKind::kCrossEntropy, 4);
  ASSERT_EQ(c.objective.labels_shape, std::vector<int64_t>({2, 2, 3}));
  c.objective.labels[1] = c.objective.labels[6] = c.objective.labels[7] = -100;
  c.objective.label_smoothing = 0.3;
  ExpectGradientsMatchFiniteDifferences(std::move(c));
}

// ---- Finite differences: small whole networks. ----

TEST(ReferenceFiniteDifferences, LeNet) {
  // conv -> relu -> max pool -> conv -> relu -> max pool -> linear -> relu -> linear,
  // under cross-entropy.
  Conv2dSpec conv1 = Conv(1, 3, 3, 3);
  conv1.pad_top = conv1.pad_bottom = conv1.pad_left = conv1.pad_right = 1;
  NetworkSpec network{{ConvLayer("conv1", conv1), ActivationLayer("relu1", ActivationKind::kRelu),
                       Layer("pool1", MaxPool(2, 2, 2, 2)), ConvLayer("conv2", Conv(3, 4, 2, 2)),
                       ActivationLayer("relu2", ActivationKind::kRelu),
                       Layer("pool2", MaxPool(2, 2, 1, 1)), Layer("fc1", Linear(16, 6)),
                       ActivationLayer("relu3", ActivationKind::kRelu),
                       Layer("fc2", Linear(6, 3))}};
  ExpectGradientsMatchFiniteDifferences(
      RandomCase(std::move(network), {3, 1, 8, 8}, ObjectiveKind::kCrossEntropy, 2));
}

TEST(ReferenceFiniteDifferences, ResidualBlockWithBatchNorm) {
  // ResNet's basic block and a classifier head:
  //   x -> conv -> bn -> relu -> conv -> bn -> (+ x) -> relu -> avg pool -> linear.
  Conv2dSpec conv = Conv(2, 2, 3, 3);
  conv.pad_top = conv.pad_bottom = conv.pad_left = conv.pad_right = 1;
  conv.bias = false;
  NetworkSpec network{{ConvLayer("conv1", conv), Layer("bn1", BatchNorm(2, true)),
                       ActivationLayer("relu1", ActivationKind::kRelu), ConvLayer("conv2", conv),
                       Layer("bn2", BatchNorm(2, true)), AddLayer("residual", kNetworkInput),
                       ActivationLayer("relu2", ActivationKind::kRelu),
                       Layer("pool", AvgPool(2, 2, 2, 2)), Layer("fc", Linear(8, 3))}};
  Case c = RandomCase(std::move(network), {2, 2, 4, 4}, ObjectiveKind::kCrossEntropy, 2);
  const ReferenceResult result = RunReference(c.network, c.parameters, c.input, c.objective);
  EXPECT_EQ(result.running_stats.size(), 4u);
  ExpectGradientsMatchFiniteDifferences(std::move(c));
}

TEST(ReferenceFiniteDifferences, ResidualBranchesByName) {
  // A projection shortcut read by name, a tensor read by three layers, an add of two named
  // outputs and a batch norm in inference mode:
  //   stem = conv(x); a = tanh(stem); b = conv(a); shortcut = conv1x1(stem) (input "stem");
  //   join = b + shortcut; again = join + a (other "a"); out = bn(again).
  Conv2dSpec same = Conv(3, 3, 3, 3);
  same.pad_top = same.pad_bottom = same.pad_left = same.pad_right = 1;
  NetworkSpec network{{ConvLayer("stem", Conv(2, 3, 2, 2)),
                       ActivationLayer("a", ActivationKind::kTanh), ConvLayer("b", same),
                       Layer("shortcut", Conv(3, 3, 1, 1), "stem"),
                       AddLayer("join", "shortcut", "b"), AddLayer("again", "a"),
                       Layer("out", BatchNorm(3, /*training=*/false))}};
  ASSERT_EQ(RefInputSource(network, 3), 0);
  ASSERT_EQ(RefInputSource(network, 4), 2);
  ExpectGradientsMatchFiniteDifferences(
      RandomCase(std::move(network), {2, 2, 4, 5}, ObjectiveKind::kMse, 3));
}

// The checker itself must be able to fail: a gradient off by a small amount in one element
// is caught.
TEST(ReferenceFiniteDifferences, CheckerCatchesAWrongGradient) {
  Case c = RandomCase(ConvTanh(), {1, 2, 3, 4}, ObjectiveKind::kSum, 3);
  RefTensor wrong = RunReference(c.network, c.parameters, c.input, c.objective).input_grad;
  wrong.data[5] += 1e-4;
  const int64_t checks_before = finite_difference_checks;
  ::testing::TestPartResultArray failures;
  {
    ::testing::ScopedFakeTestPartResultReporter reporter(
        ::testing::ScopedFakeTestPartResultReporter::INTERCEPT_ONLY_CURRENT_THREAD, &failures);
    ExpectMatchesFiniteDifferences("input", &c, &c.input, wrong);
  }
  EXPECT_EQ(failures.size(), 1);
  EXPECT_EQ(finite_difference_checks - checks_before, c.input.num_elements());
}

}  // namespace
}  // namespace gradtest
