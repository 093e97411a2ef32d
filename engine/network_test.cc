#include "gradengine/network.h"

#include <limits>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace gradengine {
namespace {

using ::testing::HasSubstr;

constexpr int64_t kNoLimit = std::numeric_limits<int64_t>::max();

LayerSpec Conv(const std::string& name, Conv2dSpec spec) { return LayerSpec{name, spec}; }
LayerSpec Act(const std::string& name, ActivationKind kind, float alpha = 0.0f) {
  return LayerSpec{name, ActivationSpec{kind, alpha}};
}

TEST(ConvOutputSizeTest, MatchesPyTorchFormula) {
  // floor((in + pad_begin + pad_end - dilation * (kernel - 1) - 1) / stride) + 1
  EXPECT_EQ(ConvOutputSize(28, 3, 1, 1, 1, 1), 28);
  EXPECT_EQ(ConvOutputSize(28, 3, 1, 0, 0, 1), 26);
  EXPECT_EQ(ConvOutputSize(7, 3, 2, 0, 0, 1), 3);
  EXPECT_EQ(ConvOutputSize(8, 3, 2, 0, 0, 1), 3);
  EXPECT_EQ(ConvOutputSize(10, 3, 3, 2, 1, 2), 3);  // (10 + 3 - 5) / 3 + 1
  EXPECT_EQ(ConvOutputSize(2, 3, 1, 0, 0, 1), 0);
  EXPECT_EQ(ConvOutputSize(2, 3, 1, 1, 0, 1), 1);
}

TEST(CheckedNumElementsTest, CountsAndRejects) {
  EXPECT_EQ(*CheckedNumElements({2, 3, 4}, "x"), 24);
  EXPECT_EQ(*CheckedNumElements({}, "x"), 1);
  EXPECT_EQ(*CheckedNumElements({5, 0}, "x"), 0);
  absl::StatusOr<int64_t> negative = CheckedNumElements({2, -1}, "input");
  EXPECT_EQ(negative.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(negative.status().message(), HasSubstr("input.shape[1]=-1"));
  absl::StatusOr<int64_t> overflow =
      CheckedNumElements({int64_t{1} << 32, int64_t{1} << 32}, "input");
  EXPECT_EQ(overflow.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(overflow.status().message(), HasSubstr("more elements than int64"));
}

TEST(ValidateNetworkTest, ComputesShapesAndParameters) {
  NetworkSpec net;
  net.layers = {Conv("c1", Conv2dSpec::Square(1, 8, 3, 1, 1, false)),
                Act("r1", ActivationKind::kRelu),
                Conv("c2", Conv2dSpec::Square(8, 16, 3, 2, 0, true))};
  absl::StatusOr<ValidatedNetwork> v = ValidateNetwork(net, {2, 1, 28, 28}, kNoLimit);
  ASSERT_TRUE(v.ok()) << v.status();
  ASSERT_EQ(v->output_shapes.size(), 3u);
  EXPECT_EQ(v->output_shapes[0], (std::vector<int64_t>{2, 8, 28, 28}));
  EXPECT_EQ(v->output_shapes[1], (std::vector<int64_t>{2, 8, 28, 28}));
  EXPECT_EQ(v->output_shapes[2], (std::vector<int64_t>{2, 16, 13, 13}));
  ASSERT_EQ(v->parameters.size(), 3u);
  EXPECT_EQ(v->parameters[0].name, "c1.weight");
  EXPECT_EQ(v->parameters[0].shape, (std::vector<int64_t>{8, 1, 3, 3}));
  EXPECT_EQ(v->parameters[1].name, "c2.weight");
  EXPECT_EQ(v->parameters[2].name, "c2.bias");
  EXPECT_EQ(v->parameters[2].shape, (std::vector<int64_t>{16}));
}

TEST(ValidateNetworkTest, GroupedWeightsHaveInPerGroupChannels) {
  Conv2dSpec conv = Conv2dSpec::Square(6, 9, 3);
  conv.groups = 3;
  NetworkSpec net;
  net.layers = {Conv("g", conv)};
  absl::StatusOr<ValidatedNetwork> v = ValidateNetwork(net, {1, 6, 5, 5}, kNoLimit);
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->parameters[0].shape, (std::vector<int64_t>{9, 2, 3, 3}));
}

struct BadNetworkCase {
  std::string label;
  NetworkSpec network;
  std::vector<int64_t> input_shape;
  absl::StatusCode code;
  std::string message;
};

TEST(ValidateNetworkTest, RejectsEachMalformedSpecWithFieldAndValue) {
  auto conv = [](auto mutate) {
    Conv2dSpec spec = Conv2dSpec::Square(4, 8, 3, 1, 1);
    mutate(spec);
    NetworkSpec net;
    net.layers = {Act("a0", ActivationKind::kTanh), Conv("c1", spec)};
    return net;
  };
  const std::vector<int64_t> in = {1, 4, 6, 6};
  const auto kInvalid = absl::StatusCode::kInvalidArgument;
  std::vector<BadNetworkCase> cases = {
      {"empty", NetworkSpec{}, in, kInvalid, "layers is empty"},
      {"zero in", conv([](Conv2dSpec& s) { s.in_channels = 0; }), in, kInvalid,
       "layers[1].conv2d.in_channels=0 must be positive"},
      {"negative out", conv([](Conv2dSpec& s) { s.out_channels = -2; }), in, kInvalid,
       "layers[1].conv2d.out_channels=-2"},
      {"zero kernel", conv([](Conv2dSpec& s) { s.kernel_w = 0; }), in, kInvalid,
       "layers[1].conv2d.kernel_size[1]=0"},
      {"zero stride", conv([](Conv2dSpec& s) { s.stride_h = 0; }), in, kInvalid,
       "layers[1].conv2d.stride[0]=0"},
      {"zero dilation", conv([](Conv2dSpec& s) { s.dilation_w = 0; }), in, kInvalid,
       "layers[1].conv2d.dilation[1]=0"},
      {"negative padding", conv([](Conv2dSpec& s) { s.pad_right = -1; }), in, kInvalid,
       "layers[1].conv2d.padding[3]=-1"},
      {"huge kernel", conv([](Conv2dSpec& s) { s.kernel_h = int64_t{1} << 40; }), in, kInvalid,
       "layers[1].conv2d.kernel_size[0]=1099511627776 exceeds the supported maximum 4096"},
      {"huge padding", conv([](Conv2dSpec& s) { s.pad_left = 5000; }), in, kInvalid,
       "layers[1].conv2d.padding[2]=5000 exceeds the supported maximum 4096"},
      {"huge channels", conv([](Conv2dSpec& s) { s.out_channels = int64_t{1} << 30; }), in,
       kInvalid, "layers[1].conv2d.out_channels=1073741824 exceeds the supported maximum"},
      {"groups vs in", conv([](Conv2dSpec& s) { s.groups = 3; }), in, kInvalid,
       "layers[1].conv2d.groups=3 does not divide in_channels=4"},
      {"groups vs out", conv([](Conv2dSpec& s) {
         s.groups = 4;
         s.out_channels = 6;
       }),
       in, kInvalid, "layers[1].conv2d.groups=4 does not divide out_channels=6"},
      {"channel mismatch", conv([](Conv2dSpec& s) { s.in_channels = 3; }), in, kInvalid,
       "layers[1].conv2d.in_channels=3 does not match the 4 channels"},
      {"kernel too big", conv([](Conv2dSpec& s) { s.kernel_h = 9; }), in, kInvalid,
       "output would be empty"},
      {"dilated too big", conv([](Conv2dSpec& s) { s.dilation_h = 4; }), in, kInvalid,
       "output would be empty"},
      {"input rank",
       conv([](Conv2dSpec&) {}),
       {4, 6, 6},
       kInvalid,
       "input.shape=[4, 6, 6] must have 4 dims"},
      {"input zero dim",
       conv([](Conv2dSpec&) {}),
       {1, 4, 0, 6},
       kInvalid,
       "input.shape[2]=0 must be positive"},
      {"input overflow",
       conv([](Conv2dSpec&) {}),
       {int64_t{1} << 20, 4, int64_t{1} << 30, int64_t{1} << 30},
       kInvalid,
       "more elements than int64"},
  };
  NetworkSpec dup;
  dup.layers = {Act("x", ActivationKind::kRelu), Act("x", ActivationKind::kTanh)};
  cases.push_back(
      {"duplicate name", dup, in, kInvalid, "layers[1].name=\"x\" is used by an earlier layer"});
  NetworkSpec unnamed;
  unnamed.layers = {Act("", ActivationKind::kRelu)};
  cases.push_back({"empty name", unnamed, in, kInvalid, "layers[0].name is empty"});
  NetworkSpec nan_slope;
  nan_slope.layers = {Act("l", ActivationKind::kLeakyRelu, std::nanf(""))};
  cases.push_back(
      {"nan slope", nan_slope, in, kInvalid, "layers[0].leaky_relu.negative_slope=nan"});

  for (const BadNetworkCase& c : cases) {
    absl::StatusOr<ValidatedNetwork> v = ValidateNetwork(c.network, c.input_shape, kNoLimit);
    EXPECT_EQ(v.status().code(), c.code) << c.label << ": " << v.status();
    EXPECT_THAT(v.status().message(), HasSubstr(c.message)) << c.label;
  }
}

TEST(ValidateNetworkTest, ElementLimitIsResourceExhausted) {
  NetworkSpec net;
  net.layers = {Conv("c", Conv2dSpec::Square(1, 64, 1))};
  // Input has 100 elements, the output 6400.
  absl::StatusOr<ValidatedNetwork> v = ValidateNetwork(net, {1, 1, 10, 10}, 1000);
  EXPECT_EQ(v.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(v.status().message(), HasSubstr("layers[0].output has 6400 elements"));
  v = ValidateNetwork(net, {1, 1, 100, 100}, 1000);
  EXPECT_EQ(v.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(v.status().message(), HasSubstr("input has 10000 elements"));
}

// Found by tests/fuzz/validate_network_fuzzer: without a limit an input side can be INT64_MAX,
// and padding it must be refused rather than overflow.
TEST(ValidateNetworkTest, PaddingASideBeyondInt64IsRejected) {
  NetworkSpec net;
  net.layers = {Conv("c", Conv2dSpec::Square(1, 1, 1, 1, 1, false))};
  absl::StatusOr<ValidatedNetwork> v = ValidateNetwork(net, {1, 1, kNoLimit, 1}, kNoLimit);
  EXPECT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(v.status().message(),
              HasSubstr("layers[0].conv2d.padding top/bottom/left/right 1/1/1/1 makes its input "
                        "[1, 1, 9223372036854775807, 1] longer than int64 can count"));
  // The same side without padding fits.
  net.layers = {Conv("c", Conv2dSpec::Square(1, 1, 1, 1, 0, false))};
  v = ValidateNetwork(net, {1, 1, kNoLimit, 1}, kNoLimit);
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->output_shapes[0], (std::vector<int64_t>{1, 1, kNoLimit, 1}));
}

TEST(ValidateNetworkTest, ShapesOfTheNewKindsAndBranches) {
  BatchNorm2dSpec bn;
  bn.num_features = 8;
  NetworkSpec net;
  net.layers = {Conv("c1", Conv2dSpec::Square(3, 8, 3, 2, 1, false)),
                LayerSpec{"bn1", bn},
                Act("r1", ActivationKind::kRelu),
                LayerSpec{"proj", Conv2dSpec::Square(3, 8, 1, 2, 0, false), kNetworkInput},
                LayerSpec{"add", AddSpec{"r1"}},
                LayerSpec{"pool", MaxPool2dSpec::Square(3, 2, 1)},
                LayerSpec{"avg", AvgPool2dSpec::Square(2)},
                LayerSpec{"fc", LinearSpec{8 * 2 * 2, 10, true}},
                Act("t", ActivationKind::kTanh)};
  absl::StatusOr<ValidatedNetwork> v = ValidateNetwork(net, {2, 3, 15, 15}, kNoLimit);
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->output_shapes[3], (std::vector<int64_t>{2, 8, 8, 8}));
  EXPECT_EQ(v->output_shapes[5], (std::vector<int64_t>{2, 8, 4, 4}));
  EXPECT_EQ(v->output_shapes[8], (std::vector<int64_t>{2, 10}));
  EXPECT_EQ(v->input_sources, (std::vector<int>{-1, 0, 1, -1, 3, 4, 5, 6, 7}));
  EXPECT_EQ(v->add_sources[4], 2);
  EXPECT_TRUE(v->mixes_batch);
  std::vector<std::string> names;
  for (const ParameterInfo& p : v->parameters) names.push_back(p.name);
  EXPECT_THAT(names,
              ::testing::ElementsAre("c1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean",
                                     "bn1.running_var", "proj.weight", "fc.weight", "fc.bias"));
  EXPECT_FALSE(v->parameters[3].trainable);
  EXPECT_FALSE(v->parameters[3].required);  // training mode: PyTorch's initial values
  EXPECT_TRUE(v->parameters[3].updated);
  EXPECT_EQ(v->parameters[6].shape, (std::vector<int64_t>{10, 32}));
}

TEST(ValidateNetworkTest, RejectsMalformedNewKindsWithFieldAndValue) {
  const std::vector<int64_t> in = {2, 4, 6, 6};
  const auto kInvalid = absl::StatusCode::kInvalidArgument;
  auto with = [](std::vector<LayerSpec> layers) {
    NetworkSpec net;
    net.layers = std::move(layers);
    return net;
  };
  BatchNorm2dSpec bn;
  bn.num_features = 4;
  BatchNorm2dSpec bn_wrong = bn;
  bn_wrong.num_features = 5;
  BatchNorm2dSpec bn_eps = bn;
  bn_eps.eps = 0.0;
  MaxPool2dSpec pad_too_big = MaxPool2dSpec::Square(2, 2, 2);
  std::vector<BadNetworkCase> cases = {
      {"pool kernel too big", with({LayerSpec{"p", MaxPool2dSpec::Square(8, 1, 0)}}), in, kInvalid,
       "layers[0].max_pool2d.kernel_size=[8, 8] with dilation=[1, 1] is larger than the "
       "padded input"},
      {"pool padding over half the kernel", with({LayerSpec{"p", pad_too_big}}), in, kInvalid,
       "layers[0].max_pool2d.padding[0]=2 must be at most half the kernel size 2"},
      {"avg pool zero stride", with({LayerSpec{"p", AvgPool2dSpec{2, 2, 0, 1}}}), in, kInvalid,
       "layers[0].avg_pool2d.stride[0]=0 must be positive"},
      {"bn features", with({LayerSpec{"b", bn_wrong}}), in, kInvalid,
       "layers[0].batch_norm2d.num_features=5 does not match the 4 channels"},
      {"bn eps", with({LayerSpec{"b", bn_eps}}), in, kInvalid,
       "layers[0].batch_norm2d.eps=0 must be positive"},
      {"bn one value per channel",
       with({LayerSpec{"b", bn}}),
       {1, 4, 1, 1},
       kInvalid,
       "layers[0].batch_norm2d.training=true needs more than one value per channel"},
      {"linear in_features", with({LayerSpec{"fc", LinearSpec{100, 3, true}}}), in, kInvalid,
       "layers[0].linear.in_features=100 does not match its input [2, 4, 6, 6], flattened to "
       "C*H*W=144"},
      {"conv after linear",
       with({LayerSpec{"fc", LinearSpec{144, 3, true}},
             LayerSpec{"c", Conv2dSpec::Square(3, 3, 1)}}),
       in, kInvalid, "layers[1] (conv2d) needs an NCHW input, but its input is [2, 3]"},
      {"add later layer", with({LayerSpec{"a", AddSpec{"r"}}, Act("r", ActivationKind::kRelu)}), in,
       kInvalid, "layers[0].add.other=\"r\" names layers[1], a later layer"},
      {"add itself", with({LayerSpec{"a", AddSpec{"a"}}}), in, kInvalid,
       "layers[0].add.other=\"a\" names layers[0], the layer itself"},
      {"add unknown", with({LayerSpec{"a", AddSpec{"nope"}}}), in, kInvalid,
       "layers[0].add.other=\"nope\" names no layer"},
      {"add shapes",
       with({LayerSpec{"p", MaxPool2dSpec::Square(2)}, LayerSpec{"a", AddSpec{kNetworkInput}}}), in,
       kInvalid,
       "layers[1].add.other=\"input\" has shape [2, 4, 6, 6], but the layer's input is "
       "[2, 4, 3, 3]"},
      {"input unknown",
       with({Act("r", ActivationKind::kRelu), LayerSpec{"t", ActivationSpec{}, "x"}}), in, kInvalid,
       "layers[1].input=\"x\" names no layer"},
      {"reserved name", with({Act("input", ActivationKind::kRelu)}), in, kInvalid,
       "layers[0].name=\"input\" is reserved"},
      {"dead output",
       with({Act("r", ActivationKind::kRelu),
             LayerSpec{"t", ActivationSpec{ActivationKind::kTanh}, kNetworkInput}}),
       in, kInvalid, "layers[0] (\"r\")'s output is never used"},
  };
  for (const BadNetworkCase& c : cases) {
    absl::StatusOr<ValidatedNetwork> v = ValidateNetwork(c.network, c.input_shape, kNoLimit);
    EXPECT_EQ(v.status().code(), c.code) << c.label << ": " << v.status();
    EXPECT_THAT(std::string(v.status().message()), HasSubstr(c.message)) << c.label;
  }
}

TEST(ValidateNetworkTest, PoolingASideBeyondInt64IsRejected) {
  NetworkSpec net;
  MaxPool2dSpec pool = MaxPool2dSpec::Square(3, 2, 1);
  pool.ceil_mode = true;
  net.layers = {LayerSpec{"p", pool}};
  absl::StatusOr<ValidatedNetwork> v = ValidateNetwork(net, {1, 1, kNoLimit, 1}, kNoLimit);
  EXPECT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(v.status().message()),
              HasSubstr("layers[0].max_pool2d.padding [1, 1] makes its input "
                        "[1, 1, 9223372036854775807, 1] longer than int64 can count"));
}

TEST(PoolOutputSizeTest, MatchesPyTorchIncludingCeilMode) {
  EXPECT_EQ(PoolOutputSize(28, 2, 2, 0, 1, false), 14);
  EXPECT_EQ(PoolOutputSize(7, 2, 2, 0, 1, false), 3);
  EXPECT_EQ(PoolOutputSize(7, 2, 2, 0, 1, true), 4);
  // The last window would start in the right padding only: dropped, as PyTorch does.
  EXPECT_EQ(PoolOutputSize(5, 3, 2, 1, 1, true), 3);
  EXPECT_EQ(PoolOutputSize(6, 3, 2, 1, 1, true), 4);
  EXPECT_EQ(PoolOutputSize(2, 3, 1, 0, 1, false), 0);
}

}  // namespace
}  // namespace gradengine
