// Proves the reference: a few cases worked out by hand, and every gradient of every op,
// objective and a chain checked against central finite differences of the reference's own
// forward pass in double precision.

#include "tests/reference/reference.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iostream>
#include <random>
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
using gradengine::Conv2dSpec;
using gradengine::LayerSpec;
using gradengine::NetworkSpec;
using gradengine::ObjectiveKind;
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

LayerSpec ConvLayer(std::string name, const Conv2dSpec& spec) { return {std::move(name), spec}; }
LayerSpec ActivationLayer(std::string name, ActivationKind kind, float alpha = 0.0f) {
  return {std::move(name), ActivationSpec{kind, alpha}};
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

// A case with random parameters, input and objective tensor for `network` on `input_shape`.
Case RandomCase(NetworkSpec network, std::vector<int64_t> input_shape, ObjectiveKind objective,
                uint64_t seed) {
  std::mt19937_64 rng(seed);
  Case c;
  c.network = std::move(network);
  for (const LayerSpec& layer : c.network.layers) {
    if (const auto* conv = std::get_if<Conv2dSpec>(&layer.op)) {
      c.parameters[layer.name + ".weight"] = RandomTensor(
          {conv->out_channels, conv->in_channels / conv->groups, conv->kernel_h, conv->kernel_w},
          &rng);
      if (conv->bias) c.parameters[layer.name + ".bias"] = RandomTensor({conv->out_channels}, &rng);
    }
  }
  c.input = RandomTensor(std::move(input_shape), &rng);
  c.objective.kind = objective;
  if (objective != ObjectiveKind::kSum) c.objective.tensor = RandomTensor(OutputShape(c), &rng);
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

// Every input of a kinked activation is at least kKinkMargin away from 0.
::testing::AssertionResult AwayFromKinks(const Case& c) {
  const std::vector<RefTensor> outputs = ReferenceLayerOutputs(c.network, c.parameters, c.input);
  for (size_t i = 0; i < c.network.layers.size(); ++i) {
    const auto* activation = std::get_if<ActivationSpec>(&c.network.layers[i].op);
    if (activation == nullptr || !HasKink(activation->kind)) continue;
    const RefTensor& x = i == 0 ? c.input : outputs[i - 1];
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

// Checks the gradient of the input and of every parameter of `c`.
void ExpectGradientsMatchFiniteDifferences(Case c) {
  ASSERT_TRUE(AwayFromKinks(c));
  const ReferenceResult result = RunReference(c.network, c.parameters, c.input, c.objective);
  ASSERT_EQ(result.output.shape, OutputShape(c));
  ASSERT_EQ(result.loss.has_value(), c.objective.kind != ObjectiveKind::kGradOutput);
  if (result.loss.has_value()) {
    EXPECT_DOUBLE_EQ(*result.loss, ScalarObjective(c));
  }

  ExpectMatchesFiniteDifferences("input", &c, &c.input, result.input_grad);
  ASSERT_EQ(result.parameter_grads.size(), c.parameters.size());
  for (auto& [name, parameter] : c.parameters) {
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
