// Randomized properties of gradengine::Engine: on random networks, shapes, objectives and
// gradient selections, every result matches the double-precision reference within the
// project's one tolerance (tests/tolerance.h), exactly the requested gradients are present,
// and concurrent calls on one Engine give bit-identical results to serial ones. Two
// generators: conv/activation chains (MatchesReferenceOnRandomCases), and mixed networks of
// every layer kind with every objective (MixedNetworksMatchReference), whose values are drawn
// well conditioned for float32 (see WellConditioned).
//
// Environment:
//   GRAD_TEST_SEED=<n>  reruns a run (the seed is printed and recorded as a test property);
//   GRAD_TEST_CASE=<i>  runs only case i of that seed, against the reference (the printed
//                       index of a concurrency-test case works too); a failing case prints the
//                       --gtest_filter of the test that draws it.
// A failing case is printed in full, in the grammar of the PyTorch fixtures' case.txt.

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <iterator>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <variant>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/types/span.h"
#include "gradengine/engine.h"
#include "gradengine/network.h"
#include "gradengine/overloaded.h"
#include "gradengine/tensor.h"
#include "gtest/gtest.h"
#include "tests/reference/reference.h"
#include "tests/tolerance.h"

namespace gradtest {
namespace {

using gradengine::ActivationKind;
using gradengine::ActivationSpec;
using gradengine::AddSpec;
using gradengine::AvgPool2dSpec;
using gradengine::BatchNorm2dSpec;
using gradengine::Conv2dSpec;
using gradengine::GradientRequest;
using gradengine::GradientResult;
using gradengine::LayerSpec;
using gradengine::LinearSpec;
using gradengine::MaxPool2dSpec;
using gradengine::ObjectiveKind;

constexpr int kCases = 200;
// Cases of the concurrency test, each run by every one of kThreads threads at once.
constexpr int kConcurrentCases = 50;
constexpr int kThreads = 4;
// Case streams of the concurrency test start here, apart from the main test's.
constexpr uint64_t kConcurrentCaseOffset = 1000000;

// Limits of the generator.
constexpr int64_t kMaxBatch = 4;
constexpr int64_t kMaxChannels = 24;
constexpr int64_t kMaxSpatial = 20;
constexpr int kMaxLayers = 4;
// Multiply-adds of all convolutions of a case; bigger draws are redrawn so that a run stays
// well under a minute, also under AddressSanitizer.
constexpr int64_t kMaxMultiplyAdds = 2000000;
// relu, leaky_relu and elu have a kink at 0 where the derivative jumps, so float32 rounding
// must not change the sign of their inputs. Every activation keeps the sign of its input (or
// makes it positive), so a sign is decided where it was last summed: at a conv output, or at
// the network input (exact). The rounding error of a float32 sum of terms t_k is typically
// 6e-8 * sqrt(sum t_k^2), and errors carried in from earlier layers are of the same order; a
// conv output that reaches a kink must be exactly 0 (a window of zeros, exact in float too) or
// kKinkMargin * sqrt(sum t_k^2) away from 0, a hundred times that. Values are redrawn until
// this holds, which rarely takes more than one draw.
constexpr double kKinkMargin = 1e-5;
constexpr int kMaxValueDraws = 100;

constexpr ActivationKind kActivationKinds[] = {ActivationKind::kRelu,    ActivationKind::kLeakyRelu,
                                               ActivationKind::kTanh,    ActivationKind::kSigmoid,
                                               ActivationKind::kElu,     ActivationKind::kGeluErf,
                                               ActivationKind::kGeluTanh};
constexpr ObjectiveKind kObjectiveKinds[] = {ObjectiveKind::kMse, ObjectiveKind::kSum,
                                             ObjectiveKind::kGradOutput};

// The mixed-network test: random blocks of conv, batch norm, activation and pooling layers,
// residual blocks (identity, 1x1 projection and stride-2 shortcuts, wired with
// LayerSpec::input and adds), and linear heads, under every objective. Its case streams start
// at kMixedCaseOffset, apart from the other tests'.
constexpr int kMixedCases = 250;
constexpr uint64_t kMixedCaseOffset = 2000000;
// Mixed cases the concurrency test adds to its conv/activation ones.
constexpr int kConcurrentMixedCases = 20;
// Limits of the mixed generator. A network has up to ~30 layers, so tensors are kept smaller
// than the chains' for the AddressSanitizer run.
constexpr int64_t kMixedMaxBatch = 3;
constexpr int64_t kMixedMaxChannels = 10;
constexpr int64_t kMixedMaxSpatial = 12;
constexpr int kMixedMaxBlocks = 3;
constexpr int64_t kMixedMaxMultiplyAdds = 400000;
// A linear head on more features first pools its input to 1x1.
constexpr int64_t kMaxHeadFeatures = 256;
constexpr int64_t kMaxHidden = 16;
constexpr int64_t kMaxClasses = 8;
// Value draws of one mixed network before the network itself is redrawn, and networks before
// the generator gives up (a failure: conditioning then rejects far more than it should).
constexpr int kMixedValueDraws = 20;
constexpr int kMaxNetworkDraws = 50;
// Float32 rounding of one operation, as a multiple of the magnitude it acts on: the
// conditioning below models the engine's error in a value as kUnitRoundoff * sqrt(V), V a
// sum of squared magnitudes carried through the network (see ErrorModel).
constexpr double kUnitRoundoff = 6e-8;
// A case is kept only if that modelled error of its output is a tenth of the tolerance (the
// fixtures' generator asks the same of float32 against float64, tests/fixtures/README.md).
constexpr double kModelledErrorFraction = 0.1;
// Samples of the errors a batch norm channel's reductions share, by which
// GradientsWellConditioned estimates their mean square in each gradient.
constexpr int kErrorSamples = 4;
// A batch norm in training mode divides x - mean by the batch's standard deviation, so the
// float error of x - mean (about u sqrt(x^2 + mean^2 + V_x), oneDNN's CPU kernels computing the
// variance in a second pass over x - mean) grows by 1 / std relative to the values. A channel
// whose variance is below this fraction of its mean of x^2 + V_x (an error growth over 100)
// is rejected; an all-zero channel (a relu's flat side) is exact and passes.
constexpr double kMinBatchVarianceRatio = 1e-4;

// The value of environment variable `name`, if set. A value that is not a number is a
// mistake in how the test was started, so it stops the test binary.
template <typename T>
std::optional<T> NumberFromEnvironment(const char* name) {
  const char* text = std::getenv(name);
  if (text == nullptr || *text == '\0') return std::nullopt;
  T value;
  if (!absl::SimpleAtoi(text, &value)) {
    std::cerr << name << "=" << text << " is not a number\n";
    std::abort();
  }
  return value;
}

uint64_t RunSeed() {
  static const uint64_t seed = [] {
    if (std::optional<uint64_t> seed = NumberFromEnvironment<uint64_t>("GRAD_TEST_SEED")) {
      return *seed;
    }
    std::random_device device;
    return (static_cast<uint64_t>(device()) << 32) ^ device();
  }();
  return seed;
}

void ReportSeed() {
  ::testing::Test::RecordProperty("seed", std::to_string(RunSeed()));
  std::cout << "GRAD_TEST_SEED=" << RunSeed() << "\n";
}

int64_t NumElements(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

bool HasKink(ActivationKind kind) {
  return kind == ActivationKind::kRelu || kind == ActivationKind::kLeakyRelu ||
         kind == ActivationKind::kElu;
}

using gradengine::Overloaded;

// One random case. It owns every tensor; MakeRequest() borrows views of them, so a case stays
// where it is while its requests are in use.
struct PropertyCase {
  uint64_t seed = 0;
  uint64_t index = 0;
  // The test that runs the case, for the rerun line of Describe().
  std::string test = "MatchesReferenceOnRandomCases";
  gradengine::NetworkSpec network;
  std::vector<int64_t> input_shape;
  std::vector<int64_t> output_shape;
  std::vector<float> input;
  // Every parameter and given buffer's name and shape, in layer order, and its values by name.
  std::vector<std::pair<std::string, std::vector<int64_t>>> parameter_shapes;
  std::map<std::string, std::vector<float>> parameter_values;
  // The entries of parameter_shapes that are buffers (running statistics): never
  // differentiated, so never in a gradient selection.
  std::set<std::string> buffers;
  ObjectiveKind objective = ObjectiveKind::kMse;
  std::vector<float> objective_tensor;  // target (mse) or dL/dy (grad_output)
  // kCrossEntropy only.
  std::vector<int64_t> labels;
  std::vector<int64_t> labels_shape;
  double label_smoothing = 0.0;
  int64_t ignore_index = -100;
  gradengine::GradientSelection gradients;

  GradientRequest MakeRequest() const {
    GradientRequest request;
    request.network = network;
    request.parameters = Parameters();
    request.input = gradengine::TensorView(input_shape, input);
    request.objective.kind = objective;
    if (objective == ObjectiveKind::kMse || objective == ObjectiveKind::kGradOutput) {
      request.objective.tensor = gradengine::TensorView(output_shape, objective_tensor);
    }
    if (objective == ObjectiveKind::kCrossEntropy) {
      request.objective.labels = {labels_shape, labels.data(), static_cast<int64_t>(labels.size())};
      request.objective.label_smoothing = label_smoothing;
      request.objective.ignore_index = ignore_index;
    }
    request.gradients = gradients;
    return request;
  }

  gradengine::ForwardRequest MakeForwardRequest() const {
    gradengine::ForwardRequest request;
    request.network = network;
    request.parameters = Parameters();
    request.input = gradengine::TensorView(input_shape, input);
    return request;
  }

  gradengine::ParameterViews Parameters() const {
    gradengine::ParameterViews views;
    for (const auto& [name, shape] : parameter_shapes) {
      views[name] = gradengine::TensorView(shape, parameter_values.at(name));
    }
    return views;
  }

  // The names of the parameter gradients the request asks for.
  std::set<std::string> RequestedParameters() const {
    std::set<std::string> names;
    for (const auto& [name, shape] : parameter_shapes) {
      if (gradients.all_parameters && buffers.count(name) == 0) names.insert(name);
    }
    if (!gradients.all_parameters)
      names.insert(gradients.parameters.begin(), gradients.parameters.end());
    return names;
  }

  // How to rerun the case, and the case in the PyTorch fixtures' case.txt grammar.
  std::string Describe() const {
    std::string text =
        absl::StrCat("GRAD_TEST_SEED=", seed, " GRAD_TEST_CASE=", index, " --gtest_filter=*.", test,
                     "\ninput ", gradengine::ShapeToString(input_shape), " -> output ",
                     gradengine::ShapeToString(output_shape), "\n");
    for (const LayerSpec& layer : network.layers) {
      absl::StrAppend(&text, "layer ", layer.name, " ", DescribeOp(layer));
      if (!layer.input.empty()) absl::StrAppend(&text, " input=", layer.input);
      absl::StrAppend(&text, "\n");
    }
    std::string param_grads = absl::StrJoin(gradients.parameters, " ");
    if (gradients.all_parameters) {
      param_grads = "all";
    } else if (param_grads.empty()) {
      param_grads = "none";
    }
    absl::StrAppend(&text, "objective ", gradengine::ObjectiveName(objective));
    if (objective == ObjectiveKind::kCrossEntropy) {
      absl::StrAppend(&text, " label_smoothing=", label_smoothing, " ignore_index=", ignore_index,
                      "\n# labels ", gradengine::ShapeToString(labels_shape), " ",
                      absl::StrJoin(labels, ","));
    }
    absl::StrAppend(&text, "\ninput_grad ", gradients.input ? 1 : 0, "\nparam_grads ", param_grads,
                    "\n");
    return text;
  }

 private:
  std::string DescribeOp(const LayerSpec& layer) const {
    return std::visit(
        Overloaded{
            [](const Conv2dSpec& conv) {
              return absl::StrCat(
                  "conv2d in_channels=", conv.in_channels, " out_channels=", conv.out_channels,
                  " kernel=", conv.kernel_h, ",", conv.kernel_w, " stride=", conv.stride_h, ",",
                  conv.stride_w, " padding=", conv.pad_top, ",", conv.pad_bottom, ",",
                  conv.pad_left, ",", conv.pad_right, " dilation=", conv.dilation_h, ",",
                  conv.dilation_w, " groups=", conv.groups, " bias=", conv.bias ? 1 : 0);
            },
            [](const ActivationSpec& activation) {
              std::string text = gradengine::ActivationName(activation.kind);
              if (activation.kind == ActivationKind::kLeakyRelu) {
                absl::StrAppend(&text, " negative_slope=", activation.alpha);
              } else if (activation.kind == ActivationKind::kElu) {
                absl::StrAppend(&text, " alpha=", activation.alpha);
              } else {
                absl::StrAppend(&text, "  # alpha=", activation.alpha, " (ignored)");
              }
              return text;
            },
            [](const MaxPool2dSpec& pool) {
              return absl::StrCat("max_pool2d kernel=", pool.kernel_h, ",", pool.kernel_w,
                                  " stride=", pool.stride_h, ",", pool.stride_w,
                                  " padding=", pool.pad_h, ",", pool.pad_w,
                                  " dilation=", pool.dilation_h, ",", pool.dilation_w,
                                  " ceil_mode=", pool.ceil_mode ? 1 : 0);
            },
            [](const AvgPool2dSpec& pool) {
              return absl::StrCat("avg_pool2d kernel=", pool.kernel_h, ",", pool.kernel_w,
                                  " stride=", pool.stride_h, ",", pool.stride_w,
                                  " padding=", pool.pad_h, ",", pool.pad_w,
                                  " ceil_mode=", pool.ceil_mode ? 1 : 0,
                                  " count_include_pad=", pool.count_include_pad ? 1 : 0);
            },
            [&](const BatchNorm2dSpec& norm) {
              const bool given = buffers.count(layer.name + ".running_mean") > 0;
              return absl::StrCat(
                  "batch_norm2d num_features=", norm.num_features, " eps=", norm.eps,
                  " momentum=", norm.momentum, " affine=", norm.affine ? 1 : 0,
                  " training=", norm.training ? 1 : 0, " running_stats=", given ? 1 : 0);
            },
            [](const LinearSpec& linear) {
              return absl::StrCat("linear in_features=", linear.in_features,
                                  " out_features=", linear.out_features,
                                  " bias=", linear.bias ? 1 : 0);
            },
            [](const AddSpec& add) { return absl::StrCat("add other=", add.other); },
        },
        layer.op);
  }
};

// The random draws every generator makes, from one stream.
class RandomDraws {
 protected:
  RandomDraws(uint64_t seed, uint64_t index) {
    std::seed_seq sequence{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
                           static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32)};
    rng_.seed(sequence);
  }

  int64_t Uniform(int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng_);
  }
  float UniformReal(double lo, double hi) {
    return static_cast<float>(std::uniform_real_distribution<double>(lo, hi)(rng_));
  }
  bool Chance(double p) { return std::bernoulli_distribution(p)(rng_); }
  float Normal(double stddev) {
    return static_cast<float>(std::normal_distribution<double>(0.0, stddev)(rng_));
  }

  // Every parameter gradient, or a random subset (possibly none) in a random order; the input
  // gradient or not.
  void RandomSelection(PropertyCase* c) {
    c->gradients.input = Chance(0.5);
    c->gradients.all_parameters = Chance(0.5);
    if (!c->gradients.all_parameters) {
      for (const auto& [name, shape] : c->parameter_shapes) {
        if (c->buffers.count(name) == 0 && Chance(0.5)) c->gradients.parameters.push_back(name);
      }
      std::shuffle(c->gradients.parameters.begin(), c->gradients.parameters.end(), rng_);
    }
  }

  // A conv on `shape` whose output is at least 1x1. About a third are dense 3x3 stride-1
  // convolutions, the shape the engine computes with Winograd kernels where it can. At most
  // `max_channels` output channels (or the groups, if more).
  Conv2dSpec RandomConv(const std::vector<int64_t>& shape, int64_t max_channels = kMaxChannels) {
    if (Chance(0.3)) {
      Conv2dSpec conv = Conv2dSpec::Square(shape[1], Uniform(1, max_channels), 3);
      conv.bias = Chance(0.5);
      for (int attempt = 0; attempt < 20; ++attempt) {
        conv.pad_top = Uniform(0, 2);
        conv.pad_bottom = Chance(0.7) ? conv.pad_top : Uniform(0, 2);
        conv.pad_left = Chance(0.7) ? conv.pad_top : Uniform(0, 2);
        conv.pad_right = Chance(0.7) ? conv.pad_left : Uniform(0, 2);
        if (RefConvOutputSize(shape[2], 3, 1, conv.pad_top, conv.pad_bottom, 1) >= 1 &&
            RefConvOutputSize(shape[3], 3, 1, conv.pad_left, conv.pad_right, 1) >= 1) {
          return conv;
        }
      }
    }
    Conv2dSpec conv;
    conv.in_channels = shape[1];
    std::vector<int64_t> divisors;
    for (int64_t g = 1; g <= conv.in_channels; ++g) {
      if (conv.in_channels % g == 0) divisors.push_back(g);
    }
    conv.groups = Chance(0.5) ? 1 : divisors[Uniform(0, static_cast<int64_t>(divisors.size()) - 1)];
    conv.out_channels = conv.groups * Uniform(1, std::max<int64_t>(1, max_channels / conv.groups));
    conv.stride_h = Uniform(1, 3);
    conv.stride_w = Uniform(1, 3);
    conv.bias = Chance(0.5);
    RandomWindow(shape[2], &conv.kernel_h, &conv.dilation_h, &conv.pad_top, &conv.pad_bottom);
    RandomWindow(shape[3], &conv.kernel_w, &conv.dilation_w, &conv.pad_left, &conv.pad_right);
    return conv;
  }

  // Kernel 1..5, dilation 1..3 and padding 0..2 a side that fit an input of `size`.
  void RandomWindow(int64_t size, int64_t* kernel, int64_t* dilation, int64_t* pad_begin,
                    int64_t* pad_end) {
    for (int attempt = 0; attempt < 50; ++attempt) {
      *kernel = Uniform(1, 5);
      *dilation = Uniform(1, 3);
      *pad_begin = Uniform(0, 2);
      *pad_end = Uniform(0, 2);
      if (RefConvOutputSize(size, *kernel, 1, *pad_begin, *pad_end, *dilation) >= 1) return;
    }
    *kernel = 1;  // always fits
    *dilation = Uniform(1, 3);
  }

  std::mt19937_64 rng_;
};

// Every value of `t` squared.
RefTensor Squared(RefTensor t) {
  for (double& v : t.data) v *= v;
  return t;
}

// Draws case `index` of run `seed`: the same pair always gives the same case.
class CaseGenerator : RandomDraws {
 public:
  CaseGenerator(uint64_t seed, uint64_t index)
      : RandomDraws(seed, index), seed_(seed), index_(index) {}

  PropertyCase Generate() {
    PropertyCase c;
    c.seed = seed_;
    c.index = index_;
    do {
      c.network = {};
      c.parameter_shapes.clear();
      c.input_shape = {Uniform(1, kMaxBatch), Uniform(1, kMaxChannels), Uniform(1, kMaxSpatial), 0};
      do {
        c.input_shape[3] = Uniform(1, kMaxSpatial);
      } while (c.input_shape[3] == c.input_shape[2] && c.input_shape[2] > 1);
    } while (!GenerateLayers(&c));

    c.objective = kObjectiveKinds[Uniform(0, std::size(kObjectiveKinds) - 1)];
    RandomSelection(&c);

    // Values: redraw until float noise cannot move an input of a kinked activation across 0.
    for (int draw = 1;; ++draw) {
      DrawValues(&c);
      if (AwayFromKinks(c)) break;
      if (draw == kMaxValueDraws) {
        ADD_FAILURE() << "could not draw values away from the kinks:\n" << c.Describe();
        break;
      }
    }
    return c;
  }

 private:
  // Appends 1..kMaxLayers layers to `c` for its input shape. False when the draw is too
  // expensive; the caller then starts over.
  bool GenerateLayers(PropertyCase* c) {
    std::vector<int64_t> shape = c->input_shape;
    int64_t multiply_adds = 0;
    const int layers = static_cast<int>(Uniform(1, kMaxLayers));
    for (int i = 0; i < layers; ++i) {
      const std::string name = absl::StrCat("layer", i);
      if (!Chance(0.55)) {
        ActivationSpec activation;
        activation.kind = kActivationKinds[Uniform(0, std::size(kActivationKinds) - 1)];
        // Ignored by the other kinds, so any value must do there.
        activation.alpha = activation.kind == ActivationKind::kElu ? UniformReal(0.2, 2.0)
                                                                   : UniformReal(0.01, 0.3);
        c->network.layers.push_back({name, activation});
        continue;
      }
      Conv2dSpec conv = RandomConv(shape);
      c->network.layers.push_back({name, conv});
      c->parameter_shapes.push_back(
          {name + ".weight",
           {conv.out_channels, conv.in_channels / conv.groups, conv.kernel_h, conv.kernel_w}});
      if (conv.bias) c->parameter_shapes.push_back({name + ".bias", {conv.out_channels}});
      shape = {shape[0], conv.out_channels,
               RefConvOutputSize(shape[2], conv.kernel_h, conv.stride_h, conv.pad_top,
                                 conv.pad_bottom, conv.dilation_h),
               RefConvOutputSize(shape[3], conv.kernel_w, conv.stride_w, conv.pad_left,
                                 conv.pad_right, conv.dilation_w)};
      multiply_adds +=
          NumElements(shape) * conv.in_channels / conv.groups * conv.kernel_h * conv.kernel_w;
    }
    c->output_shape = shape;
    return multiply_adds <= kMaxMultiplyAdds;
  }

  void DrawValues(PropertyCase* c) {
    c->input.resize(static_cast<size_t>(NumElements(c->input_shape)));
    for (float& v : c->input) v = Normal(1.0);
    c->parameter_values.clear();
    for (const auto& [name, shape] : c->parameter_shapes) {
      std::vector<float>& values = c->parameter_values[name];
      values.resize(static_cast<size_t>(NumElements(shape)));
      // Weights scaled by 1/sqrt(fan_in) keep activations O(1) through the chain.
      const double stddev =
          shape.size() == 4 ? 1.0 / std::sqrt(static_cast<double>(shape[1] * shape[2] * shape[3]))
                            : 0.5;
      for (float& v : values) v = Normal(stddev);
    }
    c->objective_tensor.clear();
    if (c->objective != ObjectiveKind::kSum) {
      c->objective_tensor.resize(static_cast<size_t>(NumElements(c->output_shape)));
      for (float& v : c->objective_tensor) v = Normal(1.0);
    }
  }

  // Whether every conv output whose sign reaches a relu, leaky_relu or elu is exactly 0 or
  // well clear of the rounding error of its sum (see kKinkMargin).
  static bool AwayFromKinks(const PropertyCase& c) {
    const RefParameters parameters = RefParametersFromViews(c.Parameters());
    const RefTensor input = RefTensor::FromView(gradengine::TensorView(c.input_shape, c.input));
    const std::vector<RefTensor> outputs = ReferenceLayerOutputs(c.network, parameters, input);
    std::optional<size_t> sign_source;  // the last conv before layer i; none: the exact input
    for (size_t i = 0; i < c.network.layers.size(); ++i) {
      const LayerSpec& layer = c.network.layers[i];
      const auto* activation = std::get_if<ActivationSpec>(&layer.op);
      if (activation == nullptr) {
        sign_source = i;
        continue;
      }
      if (!HasKink(activation->kind) || !sign_source.has_value()) continue;
      // sqrt(sum t_k^2) of every output is the root of the same conv of the squares.
      const LayerSpec& conv_layer = c.network.layers[*sign_source];
      const auto& conv = std::get<Conv2dSpec>(conv_layer.op);
      const RefTensor weight_squared = Squared(parameters.at(conv_layer.name + ".weight"));
      const RefTensor bias_squared =
          conv.bias ? Squared(parameters.at(conv_layer.name + ".bias")) : RefTensor();
      const RefTensor terms_squared =
          Conv2dForward(conv, Squared(*sign_source == 0 ? input : outputs[*sign_source - 1]),
                        weight_squared, conv.bias ? &bias_squared : nullptr);
      const RefTensor& sums = outputs[*sign_source];
      for (size_t k = 0; k < sums.data.size(); ++k) {
        const double sum = sums.data[k];
        if (sum != 0.0 && std::abs(sum) < kKinkMargin * std::sqrt(terms_squared.data[k])) {
          return false;
        }
      }
    }
    return true;
  }

  const uint64_t seed_;
  const uint64_t index_;
  std::mt19937_64 rng_;
};

PropertyCase MakeCase(uint64_t index) { return CaseGenerator(RunSeed(), index).Generate(); }

// Why the conditioning of the mixed generator rejected value draws, over a run.
struct Rejections {
  int value_draws = 0;
  int networks_redrawn = 0;
  std::map<std::string, int> by_reason;
};

// A parameter or buffer of `layer` as the engine reads it: given, or its fill value.
RefTensor LayerParameter(const RefParameters& parameters, const LayerSpec& layer,
                         const std::string& suffix) {
  const std::string name = layer.name + "." + suffix;
  if (auto it = parameters.find(name); it != parameters.end()) return it->second;
  for (const gradengine::ParameterInfo& info : gradengine::LayerParameters(layer)) {
    if (info.name != name) continue;
    RefTensor filled = RefTensor::Zeros(info.shape);
    for (double& v : filled.data) v = info.fill;
    return filled;
  }
  ADD_FAILURE() << "no parameter " << name;
  return RefTensor();
}

// The objective of case `c`, as RunReference reads it.
RefObjective ReferenceObjective(const PropertyCase& c) {
  RefObjective objective;
  objective.kind = c.objective;
  if (c.objective == ObjectiveKind::kMse || c.objective == ObjectiveKind::kGradOutput) {
    objective.tensor =
        RefTensor::FromView(gradengine::TensorView(c.output_shape, c.objective_tensor));
  }
  objective.labels = c.labels;
  objective.labels_shape = c.labels_shape;
  objective.label_smoothing = c.label_smoothing;
  objective.ignore_index = c.ignore_index;
  return objective;
}

// The backward half of WellConditioned: whether the gradients the request asks for are clear
// of the float32 noise of training-mode batch norms' cancellation.
//
// Elsewhere a backward op's rounding is relative to its result, which the tolerance allows
// for. A batch norm in training mode instead returns dL/dx = gain (g - mean g - x_hat
// mean(g x_hat)), gain = scale inv_std, which cancels to about 0 when g is about constant
// (or linear in x_hat) over a channel, as under a sum objective or a convolution whose every
// output reads every input; a float32 engine (and PyTorch) then returns the rounding of the
// terms that cancel, which the weight gradients upstream sum over N H W. Two parts of it, in
// units of kUnitRoundoff, are carried back to every gradient alongside the exact one (the
// reference's per-op backward functions, on RunReference's path):
//   W, independent per element: the rounding of the terms, M^2 with
//     M = |gain| (|g| + |mean g| + |x_hat| |mean(g x_hat)|), passed back as variances (conv2d
//     and linear as their backward of x^2 + V_x and weight^2, activations by f'(x)^2, pools to
//     their taps, batch norms by gain^2);
//   kErrorSamples samples of the errors shared by a whole channel: those of its reductions,
//     each a float sum of N H W terms whose partial sums S_k round in turn (about u sqrt(sum
//     S_k^2)): mean g, mean(g x_hat), and the forward pass's mean and variance, which move
//     x_hat by a + b x_hat. To first order they add gain (d_g + d_gx x_hat - a (mean(g x_hat)
//     + x_hat mean g) - 2 b x_hat mean(g x_hat)) + b dx to the channel, and a n mean g + b
//     dL/dscale + n d_gx and n d_g to the scale's and the shift's gradients. Each sample draws
//     d_g, d_gx, a and b per channel from normal distributions of those sizes and passes the
//     result back through the exact (linear) backward of every layer, so that errors of
//     different channels meet with their signs, as in the engine, and partly cancel.
// The modelled error of a gradient is u sqrt(W + the mean square of its samples); a draw is
// rejected where that of a requested gradient exceeds kModelledErrorFraction of its
// tolerance, as the forward pass's output error is.
bool GradientsWellConditioned(const PropertyCase& c, const RefParameters& parameters,
                              const RefTensor& input, const std::vector<RefTensor>& outputs,
                              const std::vector<RefTensor>& variances, std::string* reason,
                              std::string* detail) {
  const gradengine::NetworkSpec& network = c.network;
  const size_t layers = network.layers.size();
  // Without a training-mode batch norm there is nothing to carry back.
  bool any_training_norm = false;
  for (const LayerSpec& layer : network.layers) {
    const auto* norm = std::get_if<BatchNorm2dSpec>(&layer.op);
    any_training_norm = any_training_norm || (norm != nullptr && norm->training);
  }
  if (!any_training_norm) return true;
  // The samples' own draws; fixed, so that a case's conditioning is a function of the case.
  std::mt19937_64 rng(0);
  std::normal_distribution<double> normal;
  const RefTensor input_variance = RefTensor::Zeros(input.shape);
  // For the network's input (index 0) and every layer's output (index i + 1): dL/d(it),
  // accumulated over its readers, its W and its samples.
  struct Gradient {
    RefTensor exact, independent;
    std::array<RefTensor, kErrorSamples> samples;
  };
  const auto zeros = [](const std::vector<int64_t>& shape) {
    Gradient grad{RefTensor::Zeros(shape), RefTensor::Zeros(shape), {}};
    for (RefTensor& sample : grad.samples) sample = RefTensor::Zeros(shape);
    return grad;
  };
  std::vector<Gradient> grads;
  grads.push_back(zeros(input.shape));
  for (const RefTensor& output : outputs) grads.push_back(zeros(output.shape));
  grads.back().exact = ObjectiveGrad(ReferenceObjective(c), outputs.back());
  std::map<std::string, Gradient> parameter_grads;
  const auto pass_back = [&](int source, const Gradient& grad) {
    Gradient& total = grads[static_cast<size_t>(source + 1)];
    for (size_t k = 0; k < grad.exact.data.size(); ++k) {
      total.exact.data[k] += grad.exact.data[k];
      total.independent.data[k] += grad.independent.data[k];
      for (int s = 0; s < kErrorSamples; ++s) total.samples[s].data[k] += grad.samples[s].data[k];
    }
  };

  for (size_t i = layers; i-- > 0;) {
    const LayerSpec& layer = network.layers[i];
    const int source = RefInputSource(network, i);
    const RefTensor& x = source < 0 ? input : outputs[static_cast<size_t>(source)];
    const RefTensor& x_variance =
        source < 0 ? input_variance : variances[static_cast<size_t>(source)];
    const Gradient& g = grads[i + 1];
    RefTensor magnitudes = Squared(x);
    for (size_t k = 0; k < magnitudes.data.size(); ++k) magnitudes.data[k] += x_variance.data[k];
    std::visit(
        Overloaded{
            [&](const Conv2dSpec& conv) {
              const RefTensor weight = LayerParameter(parameters, layer, "weight");
              Conv2dGrads exact = Conv2dBackward(conv, x, weight, g.exact);
              Conv2dGrads independent =
                  Conv2dBackward(conv, magnitudes, Squared(weight), g.independent);
              Gradient back{std::move(exact.input_grad), std::move(independent.input_grad), {}};
              Gradient weight_grad{
                  std::move(exact.weight_grad), std::move(independent.weight_grad), {}};
              Gradient bias_grad{std::move(exact.bias_grad), std::move(independent.bias_grad), {}};
              for (int s = 0; s < kErrorSamples; ++s) {
                Conv2dGrads sample = Conv2dBackward(conv, x, weight, g.samples[s]);
                back.samples[s] = std::move(sample.input_grad);
                weight_grad.samples[s] = std::move(sample.weight_grad);
                bias_grad.samples[s] = std::move(sample.bias_grad);
              }
              pass_back(source, back);
              parameter_grads[layer.name + ".weight"] = std::move(weight_grad);
              if (conv.bias) parameter_grads[layer.name + ".bias"] = std::move(bias_grad);
            },
            [&](const LinearSpec& linear) {
              const RefTensor weight = LayerParameter(parameters, layer, "weight");
              LinearGrads exact = LinearBackward(linear, x, weight, g.exact);
              LinearGrads independent =
                  LinearBackward(linear, magnitudes, Squared(weight), g.independent);
              Gradient back{std::move(exact.input_grad), std::move(independent.input_grad), {}};
              Gradient weight_grad{
                  std::move(exact.weight_grad), std::move(independent.weight_grad), {}};
              Gradient bias_grad{std::move(exact.bias_grad), std::move(independent.bias_grad), {}};
              for (int s = 0; s < kErrorSamples; ++s) {
                LinearGrads sample = LinearBackward(linear, x, weight, g.samples[s]);
                back.samples[s] = std::move(sample.input_grad);
                weight_grad.samples[s] = std::move(sample.weight_grad);
                bias_grad.samples[s] = std::move(sample.bias_grad);
              }
              pass_back(source, back);
              parameter_grads[layer.name + ".weight"] = std::move(weight_grad);
              if (linear.bias) parameter_grads[layer.name + ".bias"] = std::move(bias_grad);
            },
            [&](const ActivationSpec& activation) {
              Gradient back{
                  ActivationBackward(activation, x, g.exact), RefTensor::Zeros(x.shape), {}};
              for (size_t k = 0; k < x.data.size(); ++k) {
                const double slope = ActivationDerivative(activation, x.data[k]);
                back.independent.data[k] = slope * slope * g.independent.data[k];
              }
              for (int s = 0; s < kErrorSamples; ++s) {
                back.samples[s] = ActivationBackward(activation, x, g.samples[s]);
              }
              pass_back(source, back);
            },
            [&](const MaxPool2dSpec& pool) {
              Gradient back{MaxPool2dBackward(pool, x, g.exact),
                            MaxPool2dBackward(pool, x, g.independent),
                            {}};
              for (int s = 0; s < kErrorSamples; ++s) {
                back.samples[s] = MaxPool2dBackward(pool, x, g.samples[s]);
              }
              pass_back(source, back);
            },
            [&](const AvgPool2dSpec& pool) {
              // The squared backward of sqrt(W) bounds the sum of W / divisor^2 over the
              // windows an input is in, and is that sum where windows do not overlap.
              RefTensor roots = g.independent;
              for (double& v : roots.data) v = std::sqrt(v);
              Gradient back{AvgPool2dBackward(pool, x, g.exact),
                            Squared(AvgPool2dBackward(pool, x, roots)),
                            {}};
              for (int s = 0; s < kErrorSamples; ++s) {
                back.samples[s] = AvgPool2dBackward(pool, x, g.samples[s]);
              }
              pass_back(source, back);
            },
            [&](const BatchNorm2dSpec& norm) {
              const RefTensor mean_given = LayerParameter(parameters, layer, "running_mean");
              const RefTensor var_given = LayerParameter(parameters, layer, "running_var");
              const RefTensor weight =
                  norm.affine ? LayerParameter(parameters, layer, "weight") : RefTensor();
              const RefTensor* scale = norm.affine ? &weight : nullptr;
              BatchNorm2dGrads exact =
                  BatchNorm2dBackward(norm, x, scale, mean_given, var_given, g.exact);
              Gradient back{std::move(exact.input_grad), RefTensor::Zeros(x.shape), {}};
              Gradient scale_grad{
                  std::move(exact.weight_grad), RefTensor::Zeros({norm.num_features}), {}};
              Gradient shift_grad{
                  std::move(exact.bias_grad), RefTensor::Zeros({norm.num_features}), {}};
              for (int s = 0; s < kErrorSamples; ++s) {
                BatchNorm2dGrads sample =
                    BatchNorm2dBackward(norm, x, scale, mean_given, var_given, g.samples[s]);
                back.samples[s] = std::move(sample.input_grad);
                scale_grad.samples[s] = std::move(sample.weight_grad);
                shift_grad.samples[s] = std::move(sample.bias_grad);
              }
              const int64_t batch = x.shape[0], height = x.shape[2], width = x.shape[3];
              const double count = static_cast<double>(batch * height * width);
              for (int64_t ch = 0; ch < norm.num_features; ++ch) {
                const size_t ci = static_cast<size_t>(ch);
                // u sqrt(sum S_k^2) of the partial sums of term(n, h, w) in (n, h, w) order,
                // in units of u, and the sum.
                const auto rounding = [&](const auto& term) {
                  double partial = 0.0, squares = 0.0;
                  for (int64_t n = 0; n < batch; ++n) {
                    for (int64_t h = 0; h < height; ++h) {
                      for (int64_t w = 0; w < width; ++w) {
                        partial += term(n, h, w);
                        squares += partial * partial;
                      }
                    }
                  }
                  return std::pair<double, double>(std::sqrt(squares), partial);
                };
                double mean = mean_given.data[ci], var = var_given.data[ci];
                double mean_error = 0.0, var_error = 0.0;
                if (norm.training) {
                  double sum = 0.0;
                  std::tie(mean_error, sum) =
                      rounding([&](int64_t n, int64_t h, int64_t w) { return x.at(n, ch, h, w); });
                  mean = sum / count;
                  double sum_squares = 0.0;
                  std::tie(var_error, sum_squares) = rounding([&](int64_t n, int64_t h, int64_t w) {
                    return (x.at(n, ch, h, w) - mean) * (x.at(n, ch, h, w) - mean);
                  });
                  var = sum_squares / count;
                  mean_error /= count;
                  var_error /= count;
                }
                const double inv_std = 1.0 / std::sqrt(var + norm.eps);
                const double gain = (norm.affine ? weight.data[ci] : 1.0) * inv_std;
                const auto x_hat_at = [&](int64_t n, int64_t h, int64_t w) {
                  return (x.at(n, ch, h, w) - mean) * inv_std;
                };
                const auto [g_error, sum_g] = rounding(
                    [&](int64_t n, int64_t h, int64_t w) { return g.exact.at(n, ch, h, w); });
                const auto [g_x_hat_error, sum_g_x_hat] =
                    rounding([&](int64_t n, int64_t h, int64_t w) {
                      return g.exact.at(n, ch, h, w) * x_hat_at(n, h, w);
                    });
                const double mean_g = sum_g / count, mean_g_x_hat = sum_g_x_hat / count;
                double sum_independent = 0.0, sum_independent_x_hat = 0.0;
                for (int64_t n = 0; n < batch; ++n) {
                  for (int64_t h = 0; h < height; ++h) {
                    for (int64_t w = 0; w < width; ++w) {
                      const double x_hat = x_hat_at(n, h, w);
                      const double independent = g.independent.at(n, ch, h, w);
                      sum_independent += independent;
                      sum_independent_x_hat += independent * x_hat * x_hat;
                      scale_grad.independent.data[ci] += independent * x_hat * x_hat;
                      shift_grad.independent.data[ci] += independent;
                    }
                  }
                }
                for (int64_t n = 0; n < batch; ++n) {
                  for (int64_t h = 0; h < height; ++h) {
                    for (int64_t w = 0; w < width; ++w) {
                      const double g_independent = g.independent.at(n, ch, h, w);
                      double& independent = back.independent.at(n, ch, h, w);
                      if (!norm.training) {
                        independent = gain * gain * g_independent;
                        continue;
                      }
                      const double x_hat = x_hat_at(n, h, w);
                      const double cancelled =
                          std::abs(gain) * (std::abs(g.exact.at(n, ch, h, w)) + std::abs(mean_g) +
                                            std::abs(x_hat) * std::abs(mean_g_x_hat));
                      independent = cancelled * cancelled +
                                    gain * gain *
                                        (g_independent +
                                         (sum_independent + x_hat * x_hat * sum_independent_x_hat) /
                                             (count * count));
                    }
                  }
                }
                if (!norm.training) continue;
                for (int s = 0; s < kErrorSamples; ++s) {
                  const double d_g = normal(rng) * g_error / count;
                  const double d_gx = normal(rng) * g_x_hat_error / count;
                  const double shift = normal(rng) * mean_error * inv_std;
                  const double stretch = normal(rng) * 0.5 * var_error * inv_std * inv_std;
                  for (int64_t n = 0; n < batch; ++n) {
                    for (int64_t h = 0; h < height; ++h) {
                      for (int64_t w = 0; w < width; ++w) {
                        const double x_hat = x_hat_at(n, h, w);
                        back.samples[s].at(n, ch, h, w) +=
                            gain * (d_g + d_gx * x_hat - shift * (mean_g_x_hat + x_hat * mean_g) -
                                    2.0 * stretch * x_hat * mean_g_x_hat) +
                            stretch * back.exact.at(n, ch, h, w);
                      }
                    }
                  }
                  if (norm.affine) {
                    scale_grad.samples[s].data[ci] +=
                        shift * sum_g + stretch * scale_grad.exact.data[ci] + d_gx * count;
                    shift_grad.samples[s].data[ci] += d_g * count;
                  }
                }
              }
              pass_back(source, back);
              if (norm.affine) {
                parameter_grads[layer.name + ".weight"] = std::move(scale_grad);
                parameter_grads[layer.name + ".bias"] = std::move(shift_grad);
              }
            },
            [&](const AddSpec& add) {
              pass_back(source, g);
              pass_back(RefLayerIndex(network, add.other, i), g);
            },
        },
        layer.op);
  }

  const auto check = [&](const std::string& what, const Gradient& grad) {
    double scale = 1.0;
    for (double v : grad.exact.data) scale = std::max(scale, std::abs(v));
    for (size_t k = 0; k < grad.exact.data.size(); ++k) {
      double variance = grad.independent.data[k];
      for (const RefTensor& sample : grad.samples) {
        variance += sample.data[k] * sample.data[k] / kErrorSamples;
      }
      const double error = kUnitRoundoff * std::sqrt(variance);
      if (error > kModelledErrorFraction * kRelativeTolerance * scale) {
        *reason = "batch_norm2d cancellation";
        *detail =
            absl::StrCat(what, "[", k, "] = ", grad.exact.data[k], ", modelled error ", error);
        return false;
      }
    }
    return true;
  };
  if (c.gradients.input && !check("input_grad", grads[0])) return false;
  for (const std::string& name : c.RequestedParameters()) {
    if (!check(name + " grad", parameter_grads.at(name))) return false;
  }
  return true;
}

// The conditioning of mixed cases: whether a correct float32 engine is certain to match the
// double-precision reference on case `c`. If not, `*reason` names the kind of problem and
// `*detail` the value.
//
// Alongside the reference's forward pass, every layer output gets a tensor V of its shape, and
// kUnitRoundoff * sqrt(V) models the typical float32 error of each value (independent
// roundings add in quadrature, as the chain test's kKinkMargin assumes):
//   the input: 0 (it is exact);
//   conv2d and linear: the conv (the linear map) of x^2 + V_x with weight^2 and bias^2: a
//     float sum of terms t_k is off by about u sqrt(sum t_k^2), and each input's own error
//     enters weighted by its weight;
//   activations: f'(x)^2 V_x + y^2;  add: V_a + V_b + y^2;
//   max_pool2d: the winner's V;  avg_pool2d: the average of x^2 + V_x (an upper bound);
//   batch_norm2d: (scale inv_std)^2 (x^2 + mean^2 + V_x) + bias^2 + y^2, and in training mode
//     the error of the batch mean and variance too.
// A draw is rejected where
//   - an input of relu, leaky_relu or elu is within kKinkMargin sqrt(V) of the kink, unless it
//     is exactly 0 with V = 0 (a window of zeros, or a relu's flat side: exact in float too);
//   - a max_pool2d window's maximum leads another tap by less than kKinkMargin sqrt(V_max +
//     V_tap) (reference_test.cc's tie margin, in these units), unless the two are exactly
//     equal with equal V: one value reached through two taps (overlapping or clipped windows,
//     a relu's flat side, copies made by an earlier pool), computed alike both times, whose
//     copies lead back to the same gradient;
//   - a batch_norm2d in training mode normalises a channel whose variance is below
//     kMinBatchVarianceRatio of its mean of x^2 + V_x (an all-zero channel excepted);
//   - the modelled error of an output exceeds kModelledErrorFraction of the tolerance;
//   - that of a requested gradient does, where training-mode batch norms cancel
//     (GradientsWellConditioned).
bool WellConditioned(const PropertyCase& c, std::string* reason, std::string* detail) {
  const RefParameters parameters = RefParametersFromViews(c.Parameters());
  const RefTensor input = RefTensor::FromView(gradengine::TensorView(c.input_shape, c.input));
  const RefTensor input_variance = RefTensor::Zeros(c.input_shape);
  const std::vector<RefTensor> outputs = ReferenceLayerOutputs(c.network, parameters, input);
  std::vector<RefTensor> variances;
  const auto tensor = [&](int source) -> const RefTensor& {
    return source < 0 ? input : outputs[static_cast<size_t>(source)];
  };
  const auto variance = [&](int source) -> const RefTensor& {
    return source < 0 ? input_variance : variances[static_cast<size_t>(source)];
  };
  const auto parameter = [&](const LayerSpec& layer, const std::string& suffix) {
    return LayerParameter(parameters, layer, suffix);
  };
  for (size_t i = 0; i < c.network.layers.size(); ++i) {
    const LayerSpec& layer = c.network.layers[i];
    const int source = RefInputSource(c.network, i);
    const RefTensor& x = tensor(source);
    const RefTensor& x_variance = variance(source);
    const RefTensor& y = outputs[i];
    // x^2 + V_x: the squared magnitudes a linear layer sums.
    RefTensor magnitudes = Squared(x);
    for (size_t k = 0; k < magnitudes.data.size(); ++k) magnitudes.data[k] += x_variance.data[k];
    RefTensor y_variance = RefTensor::Zeros(y.shape);
    const auto reject = [&](const char* why, const std::string& where) {
      *reason = why;
      *detail = absl::StrCat("layers[", i, "] ", layer.name, ": ", where);
      return false;
    };
    const bool ok = std::visit(
        Overloaded{
            [&](const Conv2dSpec& conv) {
              const RefTensor bias = conv.bias ? Squared(parameter(layer, "bias")) : RefTensor();
              y_variance = Conv2dForward(conv, magnitudes, Squared(parameter(layer, "weight")),
                                         conv.bias ? &bias : nullptr);
              return true;
            },
            [&](const LinearSpec& linear) {
              const RefTensor bias = linear.bias ? Squared(parameter(layer, "bias")) : RefTensor();
              y_variance = LinearForward(linear, magnitudes, Squared(parameter(layer, "weight")),
                                         linear.bias ? &bias : nullptr);
              return true;
            },
            [&](const ActivationSpec& activation) {
              for (size_t k = 0; k < x.data.size(); ++k) {
                const double slope = ActivationDerivative(activation, x.data[k]);
                y_variance.data[k] = slope * slope * x_variance.data[k] + y.data[k] * y.data[k];
                if (!HasKink(activation.kind) || (x.data[k] == 0.0 && x_variance.data[k] == 0.0) ||
                    std::abs(x.data[k]) >= kKinkMargin * std::sqrt(x_variance.data[k])) {
                  continue;
                }
                return reject(
                    "kink", absl::StrCat("input[", k, "] = ", x.data[k], ", modelled error scale ",
                                         std::sqrt(x_variance.data[k])));
              }
              return true;
            },
            [&](const MaxPool2dSpec& pool) {
              for (int64_t n = 0; n < y.shape[0]; ++n) {
                for (int64_t ch = 0; ch < y.shape[1]; ++ch) {
                  for (int64_t oh = 0; oh < y.shape[2]; ++oh) {
                    for (int64_t ow = 0; ow < y.shape[3]; ++ow) {
                      // The window's taps inside the input, in scan order; the first maximum
                      // wins, as in the reference.
                      std::vector<size_t> taps;
                      for (int64_t kh = 0; kh < pool.kernel_h; ++kh) {
                        for (int64_t kw = 0; kw < pool.kernel_w; ++kw) {
                          const int64_t ih = oh * pool.stride_h - pool.pad_h + kh * pool.dilation_h;
                          const int64_t iw = ow * pool.stride_w - pool.pad_w + kw * pool.dilation_w;
                          if (ih < 0 || ih >= x.shape[2] || iw < 0 || iw >= x.shape[3]) continue;
                          taps.push_back(static_cast<size_t>(
                              ((n * x.shape[1] + ch) * x.shape[2] + ih) * x.shape[3] + iw));
                        }
                      }
                      if (taps.empty()) return reject("empty pool window", "");
                      size_t best = taps[0];
                      for (size_t tap : taps) {
                        if (x.data[tap] > x.data[best]) best = tap;
                      }
                      for (size_t tap : taps) {
                        if (tap == best) continue;
                        const double lead = x.data[best] - x.data[tap];
                        const double scale =
                            std::sqrt(x_variance.data[best] + x_variance.data[tap]);
                        // An exact tie with equal V is one value reached twice (overlapping
                        // or clipped windows, a relu's flat side): the engine computes it
                        // the same way twice, and either copy leads back to the same place.
                        const bool duplicate =
                            lead == 0.0 && x_variance.data[best] == x_variance.data[tap];
                        if (duplicate || (lead > 0.0 && lead >= kKinkMargin * scale)) continue;
                        return reject("max_pool2d tie",
                                      absl::StrCat("window [", n, ", ", ch, ", ", oh, ", ", ow,
                                                   "]: ", x.data[best], " vs ", x.data[tap],
                                                   ", modelled error scale ", scale));
                      }
                      y_variance.at(n, ch, oh, ow) = x_variance.data[best];
                    }
                  }
                }
              }
              return true;
            },
            [&](const AvgPool2dSpec& pool) {
              y_variance = AvgPool2dForward(pool, magnitudes);
              for (size_t k = 0; k < y.data.size(); ++k)
                y_variance.data[k] += y.data[k] * y.data[k];
              return true;
            },
            [&](const BatchNorm2dSpec& norm) {
              const RefTensor mean_given = parameter(layer, "running_mean");
              const RefTensor var_given = parameter(layer, "running_var");
              const int64_t batch = x.shape[0], height = x.shape[2], width = x.shape[3];
              const double count = static_cast<double>(batch * height * width);
              for (int64_t ch = 0; ch < norm.num_features; ++ch) {
                double sum = 0.0, sum_magnitudes = 0.0;
                for (int64_t n = 0; n < batch; ++n) {
                  for (int64_t h = 0; h < height; ++h) {
                    for (int64_t w = 0; w < width; ++w) {
                      sum += x.at(n, ch, h, w);
                      sum_magnitudes += magnitudes.at(n, ch, h, w);
                    }
                  }
                }
                double mean = mean_given.data[static_cast<size_t>(ch)];
                double var = var_given.data[static_cast<size_t>(ch)];
                if (norm.training) {
                  mean = sum / count;
                  double sum_squares = 0.0;
                  for (int64_t n = 0; n < batch; ++n) {
                    for (int64_t h = 0; h < height; ++h) {
                      for (int64_t w = 0; w < width; ++w) {
                        sum_squares += (x.at(n, ch, h, w) - mean) * (x.at(n, ch, h, w) - mean);
                      }
                    }
                  }
                  var = sum_squares / count;
                  if (var < kMinBatchVarianceRatio * sum_magnitudes / count) {
                    return reject("batch_norm2d variance",
                                  absl::StrCat("channel ", ch, ": mean ", mean, ", variance ", var,
                                               ", mean square ", sum_magnitudes / count));
                  }
                }
                const double inv_std = 1.0 / std::sqrt(var + norm.eps);
                const double scale =
                    norm.affine ? parameter(layer, "weight").data[static_cast<size_t>(ch)] : 1.0;
                const double shift =
                    norm.affine ? parameter(layer, "bias").data[static_cast<size_t>(ch)] : 0.0;
                // In training mode the batch statistics' own error: the mean's squared error
                // is about `average` / count, the variance's 4 var `average` / count, so
                // inv_std's relative one var `average` / (count (var + eps)^2).
                const double average = (sum_magnitudes + mean * mean * count) / count;
                const double statistics_variance = norm.training ? average / count : 0.0;
                for (int64_t n = 0; n < batch; ++n) {
                  for (int64_t h = 0; h < height; ++h) {
                    for (int64_t w = 0; w < width; ++w) {
                      const double x_hat = (x.at(n, ch, h, w) - mean) * inv_std;
                      const double gain = scale * inv_std;
                      y_variance.at(n, ch, h, w) =
                          gain * gain *
                              (magnitudes.at(n, ch, h, w) + mean * mean + statistics_variance) +
                          scale * scale * x_hat * x_hat * statistics_variance * var * inv_std *
                              inv_std * inv_std * inv_std +
                          shift * shift + y.at(n, ch, h, w) * y.at(n, ch, h, w);
                    }
                  }
                }
              }
              return true;
            },
            [&](const AddSpec& add) {
              const RefTensor& other_variance = variance(RefLayerIndex(c.network, add.other, i));
              for (size_t k = 0; k < y.data.size(); ++k) {
                y_variance.data[k] =
                    x_variance.data[k] + other_variance.data[k] + y.data[k] * y.data[k];
              }
              return true;
            },
        },
        layer.op);
    if (!ok) return false;
    variances.push_back(std::move(y_variance));
  }
  const RefTensor& output = outputs.back();
  double scale = 1.0;
  for (double v : output.data) scale = std::max(scale, std::abs(v));
  for (size_t k = 0; k < output.data.size(); ++k) {
    const double error = kUnitRoundoff * std::sqrt(variances.back().data[k]);
    if (error > kModelledErrorFraction * kRelativeTolerance * scale) {
      *reason = "output error";
      *detail = absl::StrCat("output[", k, "] = ", output.data[k], ", modelled error ", error);
      return false;
    }
  }
  return GradientsWellConditioned(c, parameters, input, outputs, variances, reason, detail);
}

// Whether every window of a pooled dim (output size `out`) holds an input element: with
// dilation or ceil_mode a window can otherwise fall entirely into the padding.
bool WindowsHitInput(int64_t size, int64_t out, int64_t kernel, int64_t stride, int64_t pad,
                     int64_t dilation) {
  for (int64_t o = 0; o < out; ++o) {
    bool hit = false;
    for (int64_t k = 0; k < kernel && !hit; ++k) {
      const int64_t i = o * stride - pad + k * dilation;
      hit = i >= 0 && i < size;
    }
    if (!hit) return false;
  }
  return true;
}

// Draws mixed case `index` of run `seed`: the same pair always gives the same case.
class MixedCaseGenerator : RandomDraws {
 public:
  MixedCaseGenerator(uint64_t seed, uint64_t index)
      : RandomDraws(seed, kMixedCaseOffset + index), seed_(seed), index_(index) {}

  PropertyCase Generate(Rejections* rejections) {
    PropertyCase c;
    std::string last_detail;
    for (int network_draw = 1;; ++network_draw) {
      c = PropertyCase();
      c.seed = seed_;
      c.index = index_;
      c.test = "MixedNetworksMatchReference";
      do {
        DrawNetwork(&c);
      } while (multiply_adds_ > kMixedMaxMultiplyAdds);
      CheckShapes(c);
      DrawObjective(&c);
      RandomSelection(&c);
      for (int draw = 0; draw < kMixedValueDraws; ++draw) {
        DrawValues(&c);
        ++rejections->value_draws;
        std::string reason;
        if (WellConditioned(c, &reason, &last_detail)) return c;
        ++rejections->by_reason[reason];
      }
      ++rejections->networks_redrawn;
      if (network_draw == kMaxNetworkDraws) {
        ADD_FAILURE() << "could not draw a well-conditioned case; the last draw: " << last_detail
                      << "\n"
                      << c.Describe();
        return c;
      }
    }
  }

 private:
  // A random network of 1..kMixedMaxBlocks blocks and maybe a linear head, on a random input.
  void DrawNetwork(PropertyCase* c) {
    c->network = {};
    c->parameter_shapes.clear();
    c->buffers.clear();
    network_ = &c->network;
    shapes_.clear();
    omitted_stats_.clear();
    multiply_adds_ = 0;
    c->input_shape = {Uniform(1, kMixedMaxBatch), Uniform(1, 8), Uniform(2, kMixedMaxSpatial),
                      Uniform(2, kMixedMaxSpatial)};
    input_shape_ = shape_ = c->input_shape;
    last_ = gradengine::kNetworkInput;
    const int blocks = static_cast<int>(Uniform(1, kMixedMaxBlocks));
    for (int b = 0; b < blocks; ++b) {
      const double kind = UniformReal(0.0, 1.0);
      if (kind < 0.35) {
        ConvBlock();
      } else if (kind < 0.7) {
        ResidualBlock();
      } else if (kind < 0.85) {
        AppendPool(Chance(0.5));
      } else {
        AppendBatchNorm();
        if (Chance(0.7)) AppendActivation(0.6);
      }
    }
    if (network_->layers.empty() || Chance(0.55)) Head();
    c->output_shape = shape_;
    DropRedundantShifts(network_);
    for (const LayerSpec& layer : network_->layers) {
      for (const gradengine::ParameterInfo& info : gradengine::LayerParameters(layer)) {
        if (!info.trainable) {
          if (!info.required && omitted_stats_.count(layer.name) > 0) continue;
          c->buffers.insert(info.name);
        }
        c->parameter_shapes.push_back({info.name, info.shape});
      }
    }
  }

  // A bias whose output only shifts the inputs of training-mode batch norms (directly or
  // through adds and shift-preserving pools) has a gradient of exactly 0: each of those batch
  // norms subtracts its batch mean. A float engine returns instead the rounding noise of a
  // sum of terms that cancel, up to u sqrt(count) max|dL/dx| with dL/dx up to 1/sqrt(eps)
  // times dL/dy, which the tolerance's absolute floor (1e-4) does not allow for. PyTorch's
  // networks leave such biases out (bias=False before BatchNorm2d); so does the generator:
  // their conv loses its bias, a batch norm its affine transform.
  static void DropRedundantShifts(gradengine::NetworkSpec* network) {
    for (size_t i = 0; i < network->layers.size(); ++i) {
      if (!OnlyShiftsTrainingNorms(*network, i)) continue;
      std::visit(Overloaded{
                     [](Conv2dSpec& conv) { conv.bias = false; },
                     [](BatchNorm2dSpec& norm) { norm.affine = false; },
                     [](ActivationSpec&) {},
                     [](MaxPool2dSpec&) {},
                     [](AvgPool2dSpec&) {},
                     [](LinearSpec&) {},  // never followed by a batch norm
                     [](AddSpec&) {},
                 },
                 network->layers[i].op);
    }
  }

  // Whether every reader of layers[producer]'s output is a training-mode batch norm, or an add
  // or a shift-preserving pool whose output in turn only reaches those.
  static bool OnlyShiftsTrainingNorms(const gradengine::NetworkSpec& network, size_t producer) {
    bool read = false;
    for (size_t j = producer + 1; j < network.layers.size(); ++j) {
      const LayerSpec& layer = network.layers[j];
      const bool reads_it = RefInputSource(network, j) == static_cast<int>(producer) ||
                            (std::holds_alternative<AddSpec>(layer.op) &&
                             RefLayerIndex(network, std::get<AddSpec>(layer.op).other, j) ==
                                 static_cast<int>(producer));
      if (!reads_it) continue;
      read = true;
      const bool passes = std::visit(
          Overloaded{
              [](const BatchNorm2dSpec& norm) { return norm.training; },
              [&](const AddSpec&) { return OnlyShiftsTrainingNorms(network, j); },
              [&](const MaxPool2dSpec&) { return OnlyShiftsTrainingNorms(network, j); },
              [&](const AvgPool2dSpec& pool) {
                // Zero padding in a window's divisor scales a shift unevenly.
                const bool uniform = !pool.count_include_pad ||
                                     (pool.pad_h == 0 && pool.pad_w == 0 && !pool.ceil_mode);
                return uniform && OnlyShiftsTrainingNorms(network, j);
              },
              [](const Conv2dSpec&) { return false; },
              [](const ActivationSpec&) { return false; },
              [](const LinearSpec&) { return false; },
          },
          layer.op);
      if (!passes) return false;
    }
    return read;  // the network's output is read by the objective
  }

  // The generator's shapes are its own (the reference's size rules); the engine's validation
  // must agree with them.
  static void CheckShapes(const PropertyCase& c) {
    absl::StatusOr<gradengine::ValidatedNetwork> validated =
        gradengine::ValidateNetwork(c.network, c.input_shape, std::numeric_limits<int64_t>::max());
    if (!validated.ok()) {
      ADD_FAILURE() << "the engine rejects a generated network: " << validated.status() << "\n"
                    << c.Describe();
    } else if (validated->output_shapes.back() != c.output_shape) {
      ADD_FAILURE() << "the engine's output shape "
                    << gradengine::ShapeToString(validated->output_shapes.back())
                    << " differs from the generator's\n"
                    << c.Describe();
    }
  }

  // conv [batch norm] [activation] [pool].
  void ConvBlock() {
    AppendConv(RandomConv(shape_, kMixedMaxChannels));
    if (Chance(0.6)) AppendBatchNorm();
    if (Chance(0.8)) AppendActivation(0.6);
    if (Chance(0.35)) AppendPool(Chance(0.6));
  }

  // A ResNet basic block: conv-[bn]-activation-conv-[bn] plus a shortcut (the block's input, or
  // a 1x1 projection of it, stride 2 when the branch downsamples), an add, [activation]. The
  // shortcut is placed before or after the branch, so that either one reads the block input
  // by name, and the add takes its operands either way round.
  void ResidualBlock() {
    const std::string block_input = last_;
    const std::vector<int64_t> in_shape = shape_;
    const int64_t stride = in_shape[2] >= 3 && in_shape[3] >= 3 && Chance(0.4) ? 2 : 1;
    const int64_t channels = Chance(0.5) ? in_shape[1] : Uniform(1, kMixedMaxChannels);
    const bool identity = stride == 1 && channels == in_shape[1] && Chance(0.6);
    const bool shortcut_first = !identity && Chance(0.5);
    const bool norms = Chance(0.7);
    const auto projection = [&] {
      AppendConv(Conv2dSpec::Square(in_shape[1], channels, 1, stride, 0, Chance(0.3)), block_input);
      if (norms) AppendBatchNorm();
      return last_;
    };
    std::string shortcut = block_input;
    if (shortcut_first) shortcut = projection();
    const int64_t kernel = Chance(0.75) ? 3 : 1;
    const bool bias = Chance(0.3);
    const bool named_input = shortcut_first || Chance(0.3);
    AppendConv(Conv2dSpec::Square(in_shape[1], channels, kernel, stride, kernel / 2, bias),
               named_input ? block_input : "");
    if (norms) AppendBatchNorm();
    AppendActivation(0.7);
    const int64_t kernel2 = Chance(0.75) ? 3 : 1;
    AppendConv(Conv2dSpec::Square(channels, channels, kernel2, 1, kernel2 / 2, Chance(0.3)));
    if (norms) AppendBatchNorm();
    const std::string branch = last_;
    if (!identity && !shortcut_first) shortcut = projection();
    if (Chance(0.5)) {
      AppendAdd(branch, shortcut);
    } else {
      AppendAdd(shortcut, branch);
    }
    if (Chance(0.7)) AppendActivation(0.7);
  }

  // [global pool] linear, or linear-activation-[linear-add]-linear: logits [N, classes].
  void Head() {
    const int64_t spatial = shape_[2] * shape_[3];
    if (spatial > 1 && (shape_[1] * spatial > kMaxHeadFeatures || Chance(0.3))) {
      if (Chance(0.5)) {
        MaxPool2dSpec pool;
        pool.kernel_h = pool.stride_h = shape_[2];
        pool.kernel_w = pool.stride_w = shape_[3];
        Append("pool", pool, {shape_[0], shape_[1], 1, 1});
      } else {
        AvgPool2dSpec pool;
        pool.kernel_h = pool.stride_h = shape_[2];
        pool.kernel_w = pool.stride_w = shape_[3];
        Append("pool", pool, {shape_[0], shape_[1], 1, 1});
      }
    }
    const int64_t features = shape_[1] * shape_[2] * shape_[3];
    const int64_t classes = Uniform(2, kMaxClasses);
    if (Chance(0.25)) {
      AppendLinear(features, classes);
      return;
    }
    const int64_t hidden = Uniform(2, kMaxHidden);
    AppendLinear(features, hidden);
    const std::string activation = AppendActivation(0.5);
    if (Chance(0.35)) {
      AppendLinear(hidden, hidden);
      AppendAdd(last_, activation);
      if (Chance(0.5)) AppendActivation(0.5);
    }
    AppendLinear(hidden, classes);
  }

  // Appends a layer reading `input` (empty: the previous layer) whose output has `shape`, and
  // returns its name.
  std::string Append(const char* prefix, gradengine::LayerOp op, std::vector<int64_t> shape,
                     std::string input = "") {
    const std::string name = absl::StrCat(prefix, network_->layers.size());
    network_->layers.emplace_back(name, std::move(op), std::move(input));
    shapes_[name] = shape;
    shape_ = std::move(shape);
    last_ = name;
    return name;
  }

  const std::vector<int64_t>& ShapeOf(const std::string& name) const {
    return name == gradengine::kNetworkInput ? input_shape_ : shapes_.at(name);
  }

  void AppendConv(const Conv2dSpec& conv, const std::string& input = "") {
    const std::vector<int64_t>& in = input.empty() ? shape_ : ShapeOf(input);
    std::vector<int64_t> out = {in[0], conv.out_channels,
                                RefConvOutputSize(in[2], conv.kernel_h, conv.stride_h, conv.pad_top,
                                                  conv.pad_bottom, conv.dilation_h),
                                RefConvOutputSize(in[3], conv.kernel_w, conv.stride_w,
                                                  conv.pad_left, conv.pad_right, conv.dilation_w)};
    multiply_adds_ +=
        NumElements(out) * conv.in_channels / conv.groups * conv.kernel_h * conv.kernel_w;
    Append("conv", conv, std::move(out), input);
  }

  void AppendLinear(int64_t in_features, int64_t out_features) {
    multiply_adds_ += shape_[0] * in_features * out_features;
    Append("fc", LinearSpec{in_features, out_features, Chance(0.7)}, {shape_[0], out_features});
  }

  // Reads `input` (by name if it is not the previous layer) and adds `other`.
  void AppendAdd(const std::string& input, const std::string& other) {
    Append("add", AddSpec{other}, ShapeOf(input), input == last_ ? "" : input);
  }

  // A relu with probability `relu`, else any activation. Returns its name.
  std::string AppendActivation(double relu) {
    ActivationSpec activation;
    activation.kind = Chance(relu) ? ActivationKind::kRelu
                                   : kActivationKinds[Uniform(0, std::size(kActivationKinds) - 1)];
    activation.alpha =
        activation.kind == ActivationKind::kElu ? UniformReal(0.2, 2.0) : UniformReal(0.01, 0.3);
    return Append("act", activation, shape_);
  }

  // Training or inference mode (training needs more than one value per channel), eps and
  // momentum PyTorch's or others, affine or not, running statistics given or not.
  void AppendBatchNorm() {
    BatchNorm2dSpec norm;
    norm.num_features = shape_[1];
    if (!Chance(0.6)) norm.eps = UniformReal(1e-4, 1e-2);
    const double momentum = UniformReal(0.0, 1.0);
    if (momentum > 0.5) norm.momentum = momentum > 0.95 ? 1.0 : momentum < 0.55 ? 0.0 : momentum;
    norm.affine = Chance(0.75);
    norm.training = shape_[0] * shape_[2] * shape_[3] > 1 && Chance(0.65);
    const std::string name = Append("bn", norm, shape_);
    if (norm.training && Chance(0.5)) omitted_stats_.insert(name);
  }

  // A max or avg pool with a random window that fits: kernel 1..4, stride 1..3, padding up to
  // half the kernel, dilation 1..3 (max only), ceil_mode, count_include_pad (avg only). Skipped
  // when no draw fits the input.
  void AppendPool(bool max) {
    for (int attempt = 0; attempt < 30; ++attempt) {
      int64_t kernel[2], stride[2], pad[2], dilation[2] = {1, 1}, out[2];
      kernel[0] = Uniform(1, 4);
      kernel[1] = Chance(0.6) ? kernel[0] : Uniform(1, 4);
      stride[0] = Uniform(1, 3);
      stride[1] = Chance(0.6) ? stride[0] : Uniform(1, 3);
      const bool ceil_mode = Chance(0.4);
      bool fits = true;
      for (int d = 0; d < 2; ++d) {
        pad[d] = Uniform(0, kernel[d] / 2);
        if (max && Chance(0.3)) dilation[d] = Uniform(2, 3);
        out[d] =
            RefPoolOutputSize(shape_[2 + d], kernel[d], stride[d], pad[d], dilation[d], ceil_mode);
        fits = fits && out[d] >= 1 &&
               WindowsHitInput(shape_[2 + d], out[d], kernel[d], stride[d], pad[d], dilation[d]);
      }
      if (!fits) continue;
      const std::vector<int64_t> shape = {shape_[0], shape_[1], out[0], out[1]};
      if (max) {
        MaxPool2dSpec pool;
        pool.kernel_h = kernel[0];
        pool.kernel_w = kernel[1];
        pool.stride_h = stride[0];
        pool.stride_w = stride[1];
        pool.pad_h = pad[0];
        pool.pad_w = pad[1];
        pool.dilation_h = dilation[0];
        pool.dilation_w = dilation[1];
        pool.ceil_mode = ceil_mode;
        Append("pool", pool, shape);
      } else {
        AvgPool2dSpec pool;
        pool.kernel_h = kernel[0];
        pool.kernel_w = kernel[1];
        pool.stride_h = stride[0];
        pool.stride_w = stride[1];
        pool.pad_h = pad[0];
        pool.pad_w = pad[1];
        pool.ceil_mode = ceil_mode;
        pool.count_include_pad = Chance(0.5);
        Append("pool", pool, shape);
      }
      return;
    }
  }

  // Cross-entropy more often on [N, C] logits than per pixel; its label_smoothing and an
  // ignore_index that is PyTorch's default, another negative value, or a class index.
  void DrawObjective(PropertyCase* c) {
    const bool flat = c->output_shape.size() == 2;
    if (Chance(flat ? 0.6 : 0.25)) {
      c->objective = ObjectiveKind::kCrossEntropy;
      c->labels_shape = {c->output_shape[0]};
      if (!flat) {
        c->labels_shape.push_back(c->output_shape[2]);
        c->labels_shape.push_back(c->output_shape[3]);
      }
      c->label_smoothing = Chance(0.4) ? 0.0 : UniformReal(0.0, 0.6);
      const int64_t which = Uniform(0, 3);
      c->ignore_index = which < 2 ? -100 : which == 2 ? -1 : Uniform(0, c->output_shape[1] - 1);
    } else {
      c->objective = kObjectiveKinds[Uniform(0, std::size(kObjectiveKinds) - 1)];
    }
  }

  void DrawValues(PropertyCase* c) {
    c->input.resize(static_cast<size_t>(NumElements(c->input_shape)));
    for (float& v : c->input) v = Normal(1.0);
    c->parameter_values.clear();
    for (const auto& [name, shape] : c->parameter_shapes) {
      std::vector<float>& values = c->parameter_values[name];
      values.resize(static_cast<size_t>(NumElements(shape)));
      const std::string suffix = name.substr(name.rfind('.') + 1);
      for (float& v : values) {
        if (suffix == "running_var") {
          v = UniformReal(0.25, 2.0);
        } else if (suffix == "running_mean") {
          v = Normal(0.5);
        } else if (suffix == "bias") {
          v = Normal(0.5);
        } else if (shape.size() == 1) {  // a batch norm's scale, mostly positive
          v = (Chance(0.9) ? 1.0f : -1.0f) + Normal(0.3);
        } else {  // conv or linear: 1/sqrt(fan_in) keeps activations O(1)
          v = Normal(1.0 / std::sqrt(static_cast<double>(NumElements(shape) / shape[0])));
        }
      }
    }
    c->objective_tensor.clear();
    if (c->objective == ObjectiveKind::kMse || c->objective == ObjectiveKind::kGradOutput) {
      c->objective_tensor.resize(static_cast<size_t>(NumElements(c->output_shape)));
      for (float& v : c->objective_tensor) v = Normal(1.0);
    }
    c->labels.clear();
    if (c->objective == ObjectiveKind::kCrossEntropy) {
      c->labels.resize(static_cast<size_t>(NumElements(c->labels_shape)));
      for (int64_t& label : c->labels) {
        label = Chance(0.15) ? c->ignore_index : Uniform(0, c->output_shape[1] - 1);
      }
    }
  }

  const uint64_t seed_;
  const uint64_t index_;
  // The network being drawn, its input's and every layer's output shape, the last layer's
  // output shape and name (kNetworkInput before the first), the training-mode batch norms
  // whose running statistics the request leaves out, and the multiply-adds so far.
  gradengine::NetworkSpec* network_ = nullptr;
  std::vector<int64_t> input_shape_;
  std::map<std::string, std::vector<int64_t>> shapes_;
  std::vector<int64_t> shape_;
  std::string last_;
  std::set<std::string> omitted_stats_;
  int64_t multiply_adds_ = 0;
};

PropertyCase MakeMixedCase(uint64_t index, Rejections* rejections) {
  return MixedCaseGenerator(RunSeed(), index).Generate(rejections);
}

template <typename Values>
::testing::AssertionResult Close(const std::string& what, absl::Span<const int64_t> actual_shape,
                                 const Values& actual, const RefTensor& expected) {
  return TensorsClose(what, actual_shape, absl::MakeConstSpan(actual), expected.shape,
                      absl::MakeConstSpan(expected.data));
}

// Exactly the updated running statistics of the reference (those of every batch norm in
// training mode), each close to it.
void ExpectRunningStatsMatch(const gradengine::ParameterTensors& actual,
                             const std::map<std::string, RefTensor>& expected) {
  std::set<std::string> actual_names, expected_names;
  for (const auto& [name, stats] : actual) actual_names.insert(name);
  for (const auto& [name, stats] : expected) expected_names.insert(name);
  ASSERT_EQ(actual_names, expected_names) << "running_stats";
  for (const auto& [name, stats] : actual) {
    EXPECT_TRUE(Close(name, stats.shape, stats.data, expected.at(name)));
  }
}

// Output, loss, exactly the requested gradients and the updated running statistics, each close
// to the reference.
void ExpectMatchesReference(const PropertyCase& c, const GradientResult& actual,
                            const ReferenceResult& expected) {
  EXPECT_TRUE(Close("output", actual.output.shape, actual.output.data, expected.output));

  ASSERT_EQ(actual.loss.has_value(), expected.loss.has_value());
  if (actual.loss.has_value()) {
    const std::vector<double> actual_loss = {*actual.loss};
    RefTensor expected_loss;
    expected_loss.data = {*expected.loss};
    EXPECT_TRUE(Close("loss", {}, actual_loss, expected_loss));
  }

  ASSERT_EQ(actual.input_grad.has_value(), c.gradients.input);
  if (actual.input_grad.has_value()) {
    EXPECT_TRUE(Close("input_grad", actual.input_grad->shape, actual.input_grad->data,
                      expected.input_grad));
  }

  std::set<std::string> returned;
  for (const auto& [name, grad] : actual.parameter_grads) returned.insert(name);
  ASSERT_EQ(returned, c.RequestedParameters());
  for (const auto& [name, grad] : actual.parameter_grads) {
    EXPECT_TRUE(Close(name + " grad", grad.shape, grad.data, expected.parameter_grads.at(name)));
  }
  ExpectRunningStatsMatch(actual.running_stats, expected.running_stats);
}

bool BitIdentical(const gradengine::Tensor& a, const gradengine::Tensor& b) {
  return a.shape == b.shape && a.data.size() == b.data.size() &&
         std::memcmp(a.data.data(), b.data.data(), a.data.size() * sizeof(float)) == 0;
}

// Whether two results of the same request are the same bits; `why` says where they differ.
bool BitIdentical(const GradientResult& a, const GradientResult& b, std::string* why) {
  if (!BitIdentical(a.output, b.output)) {
    *why = "output";
    return false;
  }
  if (a.loss.has_value() != b.loss.has_value() ||
      (a.loss.has_value() && std::memcmp(&*a.loss, &*b.loss, sizeof(double)) != 0)) {
    *why = "loss";
    return false;
  }
  if (a.input_grad.has_value() != b.input_grad.has_value() ||
      (a.input_grad.has_value() && !BitIdentical(*a.input_grad, *b.input_grad))) {
    *why = "input_grad";
    return false;
  }
  if (a.parameter_grads.size() != b.parameter_grads.size()) {
    *why = "the set of parameter grads";
    return false;
  }
  for (const auto& [name, grad] : a.parameter_grads) {
    auto it = b.parameter_grads.find(name);
    if (it == b.parameter_grads.end() || !BitIdentical(grad, it->second)) {
      *why = name + " grad";
      return false;
    }
  }
  if (a.running_stats.size() != b.running_stats.size()) {
    *why = "the set of running stats";
    return false;
  }
  for (const auto& [name, stats] : a.running_stats) {
    auto it = b.running_stats.find(name);
    if (it == b.running_stats.end() || !BitIdentical(stats, it->second)) {
      *why = name;
      return false;
    }
  }
  return true;
}

// What the cases of a run covered, so that a generator change cannot quietly stop testing a
// feature.
struct Coverage {
  std::set<ActivationKind> activations;
  std::set<ObjectiveKind> objectives;
  int grouped = 0, strided = 0, padded_asymmetrically = 0, dilated = 0, non_square_kernel = 0,
      with_bias = 0, without_bias = 0, batched = 0, non_square_input = 0, multi_layer = 0,
      input_grad_on = 0, input_grad_off = 0, all_parameters = 0, parameter_list = 0,
      channels_not_multiple_of_16 = 0;
  // Layers of the mixed networks.
  int max_pool = 0, avg_pool = 0, pool_ceil_mode = 0, pool_padded = 0, pool_dilated = 0,
      pool_overlapping = 0, pool_non_square = 0, avg_pool_excluding_padding = 0,
      batch_norm_training = 0, batch_norm_inference = 0, batch_norm_not_affine = 0,
      batch_norm_default_stats = 0, batch_norm_given_stats_training = 0,
      batch_norm_odd_momentum = 0, adds = 0, adds_of_the_input = 0, adds_of_flat_tensors = 0,
      named_inputs = 0, projections = 0, strided_projections = 0, linear = 0,
      linear_without_bias = 0, linear_on_spatial_input = 0;
  // Objectives of the mixed networks.
  int cross_entropy_flat = 0, cross_entropy_per_pixel = 0, label_smoothing = 0, ignored_labels = 0,
      ignore_index_a_class = 0, loss_on_spatial_output = 0, loss_on_flat_output = 0;

  void Add(const PropertyCase& c) {
    objectives.insert(c.objective);
    batched += c.input_shape[0] > 1;
    non_square_input += c.input_shape[2] != c.input_shape[3];
    multi_layer += c.network.layers.size() > 1;
    input_grad_on += c.gradients.input;
    input_grad_off += !c.gradients.input;
    all_parameters += c.gradients.all_parameters;
    parameter_list += !c.gradients.all_parameters && !c.gradients.parameters.empty();
    const bool flat_output = c.output_shape.size() == 2;
    if (c.objective == ObjectiveKind::kCrossEntropy) {
      cross_entropy_flat += flat_output;
      cross_entropy_per_pixel += !flat_output;
      label_smoothing += c.label_smoothing > 0.0;
      ignored_labels += std::count(c.labels.begin(), c.labels.end(), c.ignore_index) > 0;
      ignore_index_a_class += c.ignore_index >= 0;
    } else {
      loss_on_spatial_output += !flat_output;
      loss_on_flat_output += flat_output;
    }
    // The rank of each layer's output: 2 from a linear layer on, else 4.
    std::vector<size_t> ranks;
    for (size_t i = 0; i < c.network.layers.size(); ++i) {
      const LayerSpec& layer = c.network.layers[i];
      const int source = RefInputSource(c.network, i);
      const size_t input_rank = source < 0 ? c.input_shape.size() : ranks[source];
      const bool is_linear = std::holds_alternative<LinearSpec>(layer.op);
      ranks.push_back(is_linear ? 2 : input_rank);
      linear_on_spatial_input += is_linear && input_rank == 4;
      adds_of_flat_tensors += std::holds_alternative<AddSpec>(layer.op) && input_rank == 2;
      named_inputs += !layer.input.empty();
      std::visit(
          Overloaded{
              [&](const Conv2dSpec& conv) {
                grouped += conv.groups > 1;
                strided += conv.stride_h > 1 || conv.stride_w > 1;
                padded_asymmetrically +=
                    conv.pad_top != conv.pad_bottom || conv.pad_left != conv.pad_right;
                dilated += conv.dilation_h > 1 || conv.dilation_w > 1;
                non_square_kernel += conv.kernel_h != conv.kernel_w;
                with_bias += conv.bias;
                without_bias += !conv.bias;
                channels_not_multiple_of_16 +=
                    conv.in_channels % 16 != 0 || conv.out_channels % 16 != 0;
                const bool projection =
                    conv.kernel_h == 1 && conv.kernel_w == 1 && !layer.input.empty();
                projections += projection;
                strided_projections += projection && conv.stride_h == 2;
              },
              [&](const ActivationSpec& activation) { activations.insert(activation.kind); },
              [&](const MaxPool2dSpec& pool) {
                ++max_pool;
                pool_ceil_mode += pool.ceil_mode;
                pool_padded += pool.pad_h > 0 || pool.pad_w > 0;
                pool_dilated += pool.dilation_h > 1 || pool.dilation_w > 1;
                pool_overlapping += pool.stride_h < pool.kernel_h || pool.stride_w < pool.kernel_w;
                pool_non_square += pool.kernel_h != pool.kernel_w;
              },
              [&](const AvgPool2dSpec& pool) {
                ++avg_pool;
                pool_ceil_mode += pool.ceil_mode;
                pool_padded += pool.pad_h > 0 || pool.pad_w > 0;
                pool_overlapping += pool.stride_h < pool.kernel_h || pool.stride_w < pool.kernel_w;
                pool_non_square += pool.kernel_h != pool.kernel_w;
                avg_pool_excluding_padding +=
                    !pool.count_include_pad && (pool.pad_h > 0 || pool.pad_w > 0 || pool.ceil_mode);
              },
              [&](const BatchNorm2dSpec& norm) {
                const bool given = c.buffers.count(layer.name + ".running_mean") > 0;
                batch_norm_training += norm.training;
                batch_norm_inference += !norm.training;
                batch_norm_not_affine += !norm.affine;
                batch_norm_default_stats += norm.training && !given;
                batch_norm_given_stats_training += norm.training && given;
                batch_norm_odd_momentum += norm.momentum != 0.1;
              },
              [&](const LinearSpec& linear_spec) {
                ++linear;
                linear_without_bias += !linear_spec.bias;
              },
              [&](const AddSpec& add) {
                ++adds;
                adds_of_the_input += add.other == gradengine::kNetworkInput;
              },
          },
          layer.op);
    }
  }

  void ExpectComplete() const {
    EXPECT_EQ(activations.size(), std::size(kActivationKinds));
    EXPECT_EQ(objectives.size(), std::size(kObjectiveKinds));
    for (int count :
         {grouped, strided, padded_asymmetrically, dilated, non_square_kernel, with_bias,
          without_bias, batched, non_square_input, multi_layer, input_grad_on, input_grad_off,
          all_parameters, parameter_list, channels_not_multiple_of_16}) {
      EXPECT_GT(count, 0);
    }
  }

  void ExpectMixedComplete() const {
    EXPECT_EQ(activations.size(), std::size(kActivationKinds));
    EXPECT_EQ(objectives.size(), std::size(kObjectiveKinds) + 1);  // and cross-entropy
    int index = 0;
    for (int count : {max_pool,
                      avg_pool,
                      pool_ceil_mode,
                      pool_padded,
                      pool_dilated,
                      pool_overlapping,
                      pool_non_square,
                      avg_pool_excluding_padding,
                      batch_norm_training,
                      batch_norm_inference,
                      batch_norm_not_affine,
                      batch_norm_default_stats,
                      batch_norm_given_stats_training,
                      batch_norm_odd_momentum,
                      adds,
                      adds_of_the_input,
                      adds_of_flat_tensors,
                      named_inputs,
                      projections,
                      strided_projections,
                      linear,
                      linear_without_bias,
                      linear_on_spatial_input,
                      cross_entropy_flat,
                      cross_entropy_per_pixel,
                      label_smoothing,
                      ignored_labels,
                      ignore_index_a_class,
                      loss_on_spatial_output,
                      loss_on_flat_output,
                      batched,
                      non_square_input,
                      input_grad_on,
                      input_grad_off,
                      all_parameters,
                      parameter_list}) {
      EXPECT_GT(count, 0) << "mixed coverage counter " << index;
      ++index;
    }
  }
};

std::unique_ptr<gradengine::Engine> MakeEngine(
    gradengine::EngineOptions options = gradengine::EngineOptions()) {
  absl::StatusOr<std::unique_ptr<gradengine::Engine>> engine = gradengine::Engine::Create(options);
  EXPECT_TRUE(engine.ok()) << engine.status();
  return engine.ok() ? *std::move(engine) : nullptr;
}

// Runs case `c` (number `index`) on `engine` and compares everything with the reference.
// Every `forward_every`-th case also runs forward-only.
void CheckCase(gradengine::Engine& engine, const PropertyCase& c, int index,
               int forward_every = 4) {
  const GradientRequest request = c.MakeRequest();
  const ReferenceResult expected = RunReference(request);

  absl::StatusOr<GradientResult> actual = engine.ComputeGradients(request);
  ASSERT_TRUE(actual.ok()) << actual.status();
  ExpectMatchesReference(c, *actual, expected);

  // Some cases also forward-only, and every tenth once more: the plan is then cached, and the
  // cached plan must give the same bits.
  if (index % forward_every == 0) {
    absl::StatusOr<gradengine::ForwardResult> forward = engine.Forward(c.MakeForwardRequest());
    ASSERT_TRUE(forward.ok()) << forward.status();
    EXPECT_TRUE(
        Close("forward output", forward->output.shape, forward->output.data, expected.output));
    SCOPED_TRACE("forward");
    ExpectRunningStatsMatch(forward->running_stats, expected.running_stats);
  }
  if (index % 10 == 0) {
    const int64_t hits_before = engine.stats().plan_cache_hits;
    absl::StatusOr<GradientResult> again = engine.ComputeGradients(request);
    ASSERT_TRUE(again.ok()) << again.status();
    std::string why;
    EXPECT_TRUE(BitIdentical(*actual, *again, &why)) << "a repeated request differs in " << why;
    EXPECT_GT(engine.stats().plan_cache_hits, hits_before);
  }
}

int FailureCount() {
  return ::testing::UnitTest::GetInstance()->current_test_info()->result()->total_part_count();
}

TEST(EnginePropertyTest, MatchesReferenceOnRandomCases) {
  ReportSeed();
  // One Engine for every case, so that plans are cached, hit and evicted along the way.
  std::unique_ptr<gradengine::Engine> engine = MakeEngine();
  ASSERT_NE(engine, nullptr);
  // The default engine keeps Winograd to channel-rich layers, which cases this small never
  // have; a second engine uses it wherever it is eligible, so those kernels are checked too.
  gradengine::EngineOptions winograd_everywhere;
  winograd_everywhere.winograd_min_channels = 1;
  std::unique_ptr<gradengine::Engine> winograd_engine = MakeEngine(winograd_everywhere);
  ASSERT_NE(winograd_engine, nullptr);
  const std::optional<int> only = NumberFromEnvironment<int>("GRAD_TEST_CASE");
  Coverage coverage;
  int cases_run = 0;
  std::vector<int> failed_cases;
  double slowest_seconds = 0.0;
  int slowest_case = 0;
  const auto start = std::chrono::steady_clock::now();
  for (int index = only.value_or(0); index < (only.has_value() ? *only + 1 : kCases); ++index) {
    const auto case_start = std::chrono::steady_clock::now();
    const PropertyCase c = MakeCase(static_cast<uint64_t>(index));
    coverage.Add(c);
    ++cases_run;
    const int failures_before = FailureCount();
    {
      SCOPED_TRACE(c.Describe());
      CheckCase(*engine, c, index);
      SCOPED_TRACE("engine with winograd_min_channels=1");
      CheckCase(*winograd_engine, c, index);
    }
    if (FailureCount() != failures_before) failed_cases.push_back(index);
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - case_start).count();
    if (seconds > slowest_seconds) {
      slowest_seconds = seconds;
      slowest_case = index;
    }
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::cout << cases_run << " cases in " << seconds << " s (slowest: case " << slowest_case << ", "
            << slowest_seconds << " s); plans created " << engine->stats().plans_created
            << ", cache hits " << engine->stats().plan_cache_hits << "\n";
  EXPECT_TRUE(failed_cases.empty()) << failed_cases.size() << " of " << cases_run
                                    << " cases failed: " << absl::StrJoin(failed_cases, ", ");
  if (!only.has_value()) {
    EXPECT_EQ(cases_run, kCases);
    coverage.ExpectComplete();
  }
}

// Random networks of every layer kind (see kMixedCases), well conditioned for float32 (see
// WellConditioned), on both engines, gradients and forward-only, against the reference.
TEST(EnginePropertyTest, MixedNetworksMatchReference) {
  ReportSeed();
  std::unique_ptr<gradengine::Engine> engine = MakeEngine();
  ASSERT_NE(engine, nullptr);
  gradengine::EngineOptions winograd_everywhere;
  winograd_everywhere.winograd_min_channels = 1;
  std::unique_ptr<gradengine::Engine> winograd_engine = MakeEngine(winograd_everywhere);
  ASSERT_NE(winograd_engine, nullptr);
  const std::optional<int> only = NumberFromEnvironment<int>("GRAD_TEST_CASE");
  Coverage coverage;
  Rejections rejections;
  int cases_run = 0;
  size_t layers = 0;
  std::vector<int> failed_cases;
  const auto start = std::chrono::steady_clock::now();
  for (int index = only.value_or(0); index < (only.has_value() ? *only + 1 : kMixedCases);
       ++index) {
    const PropertyCase c = MakeMixedCase(static_cast<uint64_t>(index), &rejections);
    coverage.Add(c);
    ++cases_run;
    layers += c.network.layers.size();
    const int failures_before = FailureCount();
    {
      SCOPED_TRACE(c.Describe());
      CheckCase(*engine, c, index, /*forward_every=*/1);
      SCOPED_TRACE("engine with winograd_min_channels=1");
      CheckCase(*winograd_engine, c, index, /*forward_every=*/3);
    }
    if (FailureCount() != failures_before) failed_cases.push_back(index);
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::string reasons;
  for (const auto& [reason, count] : rejections.by_reason) {
    absl::StrAppend(&reasons, " ", reason, ": ", count, ";");
  }
  std::cout << cases_run << " mixed cases (" << layers << " layers) in " << seconds << " s; "
            << rejections.value_draws << " value draws, rejected:" << reasons
            << " networks redrawn " << rejections.networks_redrawn << "\n";
  EXPECT_TRUE(failed_cases.empty()) << failed_cases.size() << " of " << cases_run
                                    << " cases failed: " << absl::StrJoin(failed_cases, ", ");
  if (!only.has_value()) {
    EXPECT_EQ(cases_run, kMixedCases);
    coverage.ExpectMixedComplete();
    // Conditioning that rejects most draws would test a biased sample of networks.
    EXPECT_LE(rejections.value_draws, 2 * kMixedCases);
  }
}

// An Inf passed backward (or forward) through convolutions whose channel counts are not a
// multiple of oneDNN's block: the block's zero padding must not turn it into NaN. Positive
// weights keep every value the Inf reaches at +Inf in exact arithmetic (as in PyTorch); the
// reference, like the engine, skips a convolution's spatial zero padding, so where PyTorch
// multiplies an Inf by that padding (weight gradients, NaN there) neither does.
TEST(EnginePropertyTest, AnInfCrossingPaddedChannelsStaysInf) {
  std::unique_ptr<gradengine::Engine> engine = MakeEngine();
  ASSERT_NE(engine, nullptr);
  for (const std::vector<int64_t>& channels : std::vector<std::vector<int64_t>>{
           {3, 5, 3}, {16, 3, 16}, {1, 8, 16, 4}, {32, 24, 32}, {3, 5, 7, 5, 3}, {8, 16, 8}}) {
    for (const auto& [inf_in_input, batch] :
         std::vector<std::pair<bool, int64_t>>{{false, 1}, {true, 1}, {false, 16}}) {
      SCOPED_TRACE(absl::StrCat("channels ", absl::StrJoin(channels, "-"), ", batch ", batch,
                                inf_in_input ? ", Inf in the input" : ", Inf in dL/dy"));
      gradengine::NetworkSpec network;
      std::map<std::string, std::vector<float>> weights;
      for (size_t i = 0; i + 1 < channels.size(); ++i) {
        const std::string name = absl::StrCat("conv", i);
        network.layers.push_back(
            {name, Conv2dSpec::Square(channels[i], channels[i + 1], 3, 1, 1, /*bias=*/false)});
        std::vector<float>& w = weights[name + ".weight"];
        w.resize(static_cast<size_t>(channels[i + 1] * channels[i] * 9));
        for (size_t k = 0; k < w.size(); ++k) w[k] = 0.05f + 0.1f * static_cast<float>(k % 13);
      }
      std::vector<float> input(static_cast<size_t>(batch * channels.front() * 36), 1.0f);
      std::vector<float> grad_output(static_cast<size_t>(batch * channels.back() * 36), 0.5f);
      (inf_in_input ? input : grad_output)[7] = std::numeric_limits<float>::infinity();
      GradientRequest request;
      request.network = network;
      for (const auto& [name, values] : weights) {
        const int64_t layer = std::stoll(name.substr(4));
        request.parameters[name] =
            gradengine::TensorView({channels[layer + 1], channels[layer], 3, 3}, values);
      }
      request.input = gradengine::TensorView({batch, channels.front(), 6, 6}, input);
      request.objective.kind = ObjectiveKind::kGradOutput;
      request.objective.tensor =
          gradengine::TensorView({batch, channels.back(), 6, 6}, grad_output);
      absl::StatusOr<GradientResult> actual = engine->ComputeGradients(request);
      ASSERT_TRUE(actual.ok()) << actual.status();
      const ReferenceResult expected = RunReference(request);
      EXPECT_TRUE(Close("output", actual->output.shape, actual->output.data, expected.output));
      EXPECT_TRUE(Close("input_grad", actual->input_grad->shape, actual->input_grad->data,
                        expected.input_grad));
      for (const auto& [name, grad] : actual->parameter_grads) {
        EXPECT_TRUE(
            Close(name + " grad", grad.shape, grad.data, expected.parameter_grads.at(name)));
      }
      EXPECT_EQ(std::count_if(actual->input_grad->data.begin(), actual->input_grad->data.end(),
                              [](float v) { return std::isnan(v); }),
                0);
    }
  }
}

// The channel-rich 3x3 layers the default engine computes with Winograd kernels (on CPUs
// where oneDNN has them), against the reference: every gradient, padding 0 and 1.
TEST(EnginePropertyTest, WinogradLayersMatchReference) {
  ReportSeed();
  std::unique_ptr<gradengine::Engine> engine = MakeEngine();
  ASSERT_NE(engine, nullptr);
  std::mt19937_64 rng(RunSeed());
  auto uniform = [&rng](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  std::normal_distribution<double> normal;
  for (int index = 0; index < 6; ++index) {
    PropertyCase c;
    c.seed = RunSeed();
    c.index = static_cast<uint64_t>(index);
    const int64_t in_channels = uniform(32, 48);
    const int64_t out_channels = uniform(32, 48);
    const int64_t padding = index % 2;
    c.input_shape = {uniform(1, 2), in_channels, uniform(4, 12), uniform(4, 12)};
    Conv2dSpec conv = Conv2dSpec::Square(in_channels, out_channels, 3, 1, padding, index < 3);
    c.network.layers = {{"wide", conv}, {"act", ActivationSpec{ActivationKind::kTanh}}};
    c.parameter_shapes = {{"wide.weight", {out_channels, in_channels, 3, 3}}};
    if (conv.bias) c.parameter_shapes.push_back({"wide.bias", {out_channels}});
    c.output_shape = {c.input_shape[0], out_channels, c.input_shape[2] + 2 * padding - 2,
                      c.input_shape[3] + 2 * padding - 2};
    c.input.resize(static_cast<size_t>(NumElements(c.input_shape)));
    for (float& v : c.input) v = static_cast<float>(normal(rng));
    for (const auto& [name, shape] : c.parameter_shapes) {
      std::vector<float>& values = c.parameter_values[name];
      values.resize(static_cast<size_t>(NumElements(shape)));
      for (float& v : values) v = static_cast<float>(normal(rng) / std::sqrt(in_channels * 9.0));
    }
    c.objective = ObjectiveKind::kMse;
    c.objective_tensor.resize(static_cast<size_t>(NumElements(c.output_shape)));
    for (float& v : c.objective_tensor) v = static_cast<float>(normal(rng));
    SCOPED_TRACE(c.Describe());
    CheckCase(*engine, c, index);
  }
}

TEST(EnginePropertyTest, ConcurrentCallsGiveSerialResults) {
  ReportSeed();
  std::unique_ptr<gradengine::Engine> engine = MakeEngine();
  ASSERT_NE(engine, nullptr);
  std::vector<PropertyCase> cases;
  for (int i = 0; i < kConcurrentCases; ++i) {
    cases.push_back(MakeCase(kConcurrentCaseOffset + static_cast<uint64_t>(i)));
  }
  // Mixed networks too: batch norms, whose running statistics must come out the same, and
  // branches.
  Rejections rejections;
  for (int i = 0; i < kConcurrentMixedCases; ++i) {
    cases.push_back(MakeMixedCase(kConcurrentCaseOffset + static_cast<uint64_t>(i), &rejections));
  }
  std::vector<absl::StatusOr<GradientResult>> serial;
  for (const PropertyCase& c : cases) {
    serial.push_back(engine->ComputeGradients(c.MakeRequest()));
    // A failing request is a bug MatchesReferenceOnRandomCases reports in detail; here it is
    // still run concurrently, and must fail the same way.
    EXPECT_TRUE(serial.back().ok()) << c.Describe() << serial.back().status();
  }

  // Every thread runs every case, each starting at a different case, all at once.
  using Results = std::vector<std::optional<absl::StatusOr<GradientResult>>>;
  std::vector<Results> concurrent(kThreads, Results(cases.size()));
  std::atomic<int> ready{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      ++ready;
      while (ready.load() < kThreads) std::this_thread::yield();
      for (size_t k = 0; k < cases.size(); ++k) {
        const size_t i = (k + static_cast<size_t>(t) * cases.size() / kThreads) % cases.size();
        concurrent[t][i] = engine->ComputeGradients(cases[i].MakeRequest());
      }
    });
  }
  for (std::thread& thread : threads) thread.join();

  int compared = 0;
  for (int t = 0; t < kThreads; ++t) {
    for (size_t i = 0; i < cases.size(); ++i) {
      SCOPED_TRACE(absl::StrCat("thread ", t, ", ", cases[i].Describe()));
      ASSERT_TRUE(concurrent[t][i].has_value());
      const absl::StatusOr<GradientResult>& result = *concurrent[t][i];
      ++compared;
      if (!serial[i].ok()) {
        EXPECT_EQ(result.status(), serial[i].status());
        continue;
      }
      ASSERT_TRUE(result.ok()) << result.status();
      std::string why;
      EXPECT_TRUE(BitIdentical(*result, *serial[i], &why))
          << "concurrent result differs from the serial one in " << why;
    }
  }
  EXPECT_EQ(compared, kThreads * (kConcurrentCases + kConcurrentMixedCases));
}

}  // namespace
}  // namespace gradtest
