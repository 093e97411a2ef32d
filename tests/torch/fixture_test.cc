// The engine against the committed PyTorch fixtures in tests/fixtures, one test per case, and
// the strictness of the case.txt parser and the loader those fixtures rely on.

#include "tests/torch/fixture.h"

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <set>
#include <string>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "gradengine/engine.h"
#include "gradengine/network.h"
#include "gtest/gtest.h"

namespace gradtest {
namespace {

// Fewer cases than this means the fixtures went missing, not that the engine passed.
constexpr size_t kMinimumCases = 20;

std::string FixtureRoot() {
  const char* source_dir = std::getenv("GRAD_SOURCE_DIR");
  if (source_dir == nullptr) return "";
  return absl::StrCat(source_dir, "/tests/fixtures");
}

std::vector<std::string> CaseDirectories() {
  absl::StatusOr<std::vector<std::string>> cases = FindFixtureCases(FixtureRoot());
  return cases.ok() ? *cases : std::vector<std::string>();
}

TEST(TorchFixturesTest, FindsAllCommittedCases) {
  ASSERT_NE(std::getenv("GRAD_SOURCE_DIR"), nullptr)
      << "GRAD_SOURCE_DIR is not set; run this test through ctest";
  absl::StatusOr<std::vector<std::string>> cases = FindFixtureCases(FixtureRoot());
  ASSERT_TRUE(cases.ok()) << cases.status();
  EXPECT_GE(cases->size(), kMinimumCases) << "in " << FixtureRoot();
  for (const char* name : {"seed_conv1", "seed_conv4", "seed_layer", "lenet5_cross_entropy",
                           "resnet_basic_block", "resnet_downsample_block"}) {
    EXPECT_TRUE(
        std::filesystem::is_regular_file(std::filesystem::path(FixtureRoot()) / name / "case.txt"))
        << name << " is missing";
  }
}

class TorchFixtureTest : public ::testing::TestWithParam<std::string> {
 protected:
  static void SetUpTestSuite() {
    engine_ = new absl::StatusOr<std::unique_ptr<gradengine::Engine>>(
        gradengine::Engine::Create(gradengine::EngineOptions()));
  }
  static void TearDownTestSuite() {
    delete engine_;
    engine_ = nullptr;
  }

  // Shared by every case, as a server shares one Engine across requests.
  static absl::StatusOr<std::unique_ptr<gradengine::Engine>>* engine_;
};

absl::StatusOr<std::unique_ptr<gradengine::Engine>>* TorchFixtureTest::engine_ = nullptr;

TEST_P(TorchFixtureTest, GradientsMatchPyTorch) {
  ASSERT_TRUE(engine_->ok()) << engine_->status();
  absl::StatusOr<std::unique_ptr<FixtureCase>> fixture = LoadFixtureCase(GetParam());
  ASSERT_TRUE(fixture.ok()) << fixture.status();
  absl::StatusOr<gradengine::GradientResult> result =
      (**engine_)->ComputeGradients((*fixture)->request);
  ASSERT_TRUE(result.ok()) << GetParam() << ": " << result.status();
  EXPECT_TRUE(GradientResultMatches(**fixture, *result));
}

TEST_P(TorchFixtureTest, ForwardMatchesPyTorch) {
  ASSERT_TRUE(engine_->ok()) << engine_->status();
  absl::StatusOr<std::unique_ptr<FixtureCase>> fixture = LoadFixtureCase(GetParam());
  ASSERT_TRUE(fixture.ok()) << fixture.status();
  absl::StatusOr<gradengine::ForwardResult> result =
      (**engine_)->Forward((*fixture)->MakeForwardRequest());
  ASSERT_TRUE(result.ok()) << GetParam() << ": " << result.status();
  EXPECT_TRUE(ForwardResultMatches(**fixture, *result));
}

INSTANTIATE_TEST_SUITE_P(Committed, TorchFixtureTest, ::testing::ValuesIn(CaseDirectories()),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return std::filesystem::path(info.param).filename().string();
                         });

constexpr char kValidSpec[] = R"(# a comment line
layer conv1 conv2d in_channels=2 out_channels=4 kernel=3,2 stride=1,2 padding=0,1,2,3 dilation=2,1 groups=2 bias=1
layer act1 leaky_relu negative_slope=0.2  # a trailing comment
layer conv2 conv2d in_channels=4 out_channels=3 kernel=1,1 stride=1,1 padding=0,0,0,0 dilation=1,1 groups=1 bias=0
layer act2 gelu_tanh
objective grad_output
input_grad 0
param_grads conv2.weight conv1.bias
)";

TEST(ParseCaseSpecTest, ParsesEveryField) {
  absl::StatusOr<CaseSpec> spec = ParseCaseSpec(kValidSpec, "valid");
  ASSERT_TRUE(spec.ok()) << spec.status();
  ASSERT_EQ(spec->network.layers.size(), 4u);
  const auto& conv = std::get<gradengine::Conv2dSpec>(spec->network.layers[0].op);
  EXPECT_EQ(spec->network.layers[0].name, "conv1");
  EXPECT_EQ(conv.in_channels, 2);
  EXPECT_EQ(conv.out_channels, 4);
  EXPECT_EQ(conv.kernel_h, 3);
  EXPECT_EQ(conv.kernel_w, 2);
  EXPECT_EQ(conv.stride_h, 1);
  EXPECT_EQ(conv.stride_w, 2);
  EXPECT_EQ(conv.pad_top, 0);
  EXPECT_EQ(conv.pad_bottom, 1);
  EXPECT_EQ(conv.pad_left, 2);
  EXPECT_EQ(conv.pad_right, 3);
  EXPECT_EQ(conv.dilation_h, 2);
  EXPECT_EQ(conv.dilation_w, 1);
  EXPECT_EQ(conv.groups, 2);
  EXPECT_TRUE(conv.bias);
  EXPECT_FALSE(std::get<gradengine::Conv2dSpec>(spec->network.layers[2].op).bias);
  const auto& leaky = std::get<gradengine::ActivationSpec>(spec->network.layers[1].op);
  EXPECT_EQ(leaky.kind, gradengine::ActivationKind::kLeakyRelu);
  EXPECT_FLOAT_EQ(leaky.alpha, 0.2f);
  EXPECT_EQ(std::get<gradengine::ActivationSpec>(spec->network.layers[3].op).kind,
            gradengine::ActivationKind::kGeluTanh);
  EXPECT_EQ(spec->objective, gradengine::ObjectiveKind::kGradOutput);
  EXPECT_FALSE(spec->gradients.input);
  EXPECT_FALSE(spec->gradients.all_parameters);
  EXPECT_EQ(spec->gradients.parameters, (std::vector<std::string>{"conv2.weight", "conv1.bias"}));
}

TEST(ParseCaseSpecTest, AllAndNone) {
  const std::string layers =
      "layer c conv2d in_channels=1 out_channels=1 kernel=1,1 "
      "stride=1,1 padding=0,0,0,0 dilation=1,1 groups=1 bias=0\n"
      "objective sum\ninput_grad 1\n";
  absl::StatusOr<CaseSpec> all = ParseCaseSpec(layers + "param_grads all\n", "all");
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_TRUE(all->gradients.all_parameters);
  EXPECT_TRUE(all->gradients.input);
  EXPECT_EQ(all->objective, gradengine::ObjectiveKind::kSum);
  absl::StatusOr<CaseSpec> none = ParseCaseSpec(layers + "param_grads none\n", "none");
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_FALSE(none->gradients.all_parameters);
  EXPECT_TRUE(none->gradients.parameters.empty());
}

// Each entry replaces one line of kValidSpec (or adds one) and must be rejected.
struct BadSpec {
  const char* what;
  const char* find;
  const char* replace;
};

TEST(ParseCaseSpecTest, RejectsMalformedSpecs) {
  const BadSpec bad_specs[] = {
      {"unknown directive", "input_grad 0", "input_grad 0\nbatch 3"},
      {"unknown conv key", "groups=2 bias=1", "groups=2 bias=1 padding_mode=zeros"},
      {"missing conv key", " dilation=2,1", ""},
      {"repeated conv key", "groups=2", "groups=2 groups=2"},
      {"short padding", "padding=0,1,2,3", "padding=0,1"},
      {"non-integer", "out_channels=4", "out_channels=4.5"},
      {"bias not 0/1", "bias=1", "bias=2"},
      {"unknown activation", "gelu_tanh", "swish"},
      {"key on a plain activation", "gelu_tanh", "gelu_tanh alpha=1"},
      {"missing negative_slope", " negative_slope=0.2", ""},
      {"unknown objective", "objective grad_output", "objective l1"},
      {"repeated objective", "objective grad_output", "objective grad_output\nobjective sum"},
      {"bad input_grad", "input_grad 0", "input_grad yes"},
      {"missing input_grad", "input_grad 0", ""},
      {"unknown parameter", "conv1.bias", "conv2.bias"},
      {"repeated parameter", "conv1.bias", "conv1.bias conv1.bias"},
      {"repeated layer name", "layer act2", "layer act1"},
      {"empty param_grads", "param_grads conv2.weight conv1.bias", "param_grads"},
      {"objective with a key", "objective grad_output", "objective grad_output ignore_index=1"},
      {"empty objective", "objective grad_output", "objective"},
      {"empty input", "negative_slope=0.2", "negative_slope=0.2 input="},
      {"input without '='", "layer act2 gelu_tanh", "layer act2 gelu_tanh input"},
  };
  for (const BadSpec& bad : bad_specs) {
    std::string text = kValidSpec;
    const size_t at = text.find(bad.find);
    ASSERT_NE(at, std::string::npos) << bad.what;
    text.replace(at, std::string(bad.find).size(), bad.replace);
    absl::StatusOr<CaseSpec> spec = ParseCaseSpec(text, "bad");
    EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument)
        << bad.what << ": " << spec.status() << "\n"
        << text;
  }
  EXPECT_EQ(
      ParseCaseSpec("objective sum\ninput_grad 1\nparam_grads all\n", "no layers").status().code(),
      absl::StatusCode::kInvalidArgument);
}

// Each layer kind added with pooling, batch norm, linear and add, input= and cross_entropy,
// with every key; a line is split only to fit this file's width.
constexpr char kNewKindsSpec[] =
    "layer c1 conv2d in_channels=3 out_channels=4 kernel=3,3 stride=1,1 padding=1,1,1,1 "
    "dilation=1,1 groups=1 bias=0\n"
    "layer mp max_pool2d kernel=3,2 stride=2,1 padding=1,0 dilation=2,1 ceil_mode=1\n"
    "layer ap avg_pool2d kernel=2,3 stride=1,2 padding=0,1 ceil_mode=0 count_include_pad=0\n"
    "layer bn batch_norm2d num_features=4 eps=0.001 momentum=0.25 affine=0 training=1 "
    "running_stats=0\n"
    "layer proj conv2d in_channels=3 out_channels=4 kernel=1,1 stride=1,1 padding=0,0,0,0 "
    "dilation=1,1 groups=1 bias=1 input=input\n"
    "layer bn2 batch_norm2d num_features=4 eps=1e-05 momentum=0.1 affine=1 training=0 "
    "running_stats=1\n"
    "layer sum add other=bn\n"
    "layer fc linear in_features=48 out_features=5 bias=1 input=sum\n"
    "objective cross_entropy label_smoothing=0.125 ignore_index=-7\n"
    "input_grad 1\n"
    "param_grads fc.weight bn2.bias\n";

TEST(ParseCaseSpecTest, ParsesPoolingBatchNormLinearAddAndCrossEntropy) {
  absl::StatusOr<CaseSpec> spec = ParseCaseSpec(kNewKindsSpec, "new kinds");
  ASSERT_TRUE(spec.ok()) << spec.status();
  const std::vector<gradengine::LayerSpec>& layers = spec->network.layers;
  ASSERT_EQ(layers.size(), 8u);

  const auto& max_pool = std::get<gradengine::MaxPool2dSpec>(layers[1].op);
  EXPECT_EQ(max_pool.kernel_h, 3);
  EXPECT_EQ(max_pool.kernel_w, 2);
  EXPECT_EQ(max_pool.stride_h, 2);
  EXPECT_EQ(max_pool.stride_w, 1);
  EXPECT_EQ(max_pool.pad_h, 1);
  EXPECT_EQ(max_pool.pad_w, 0);
  EXPECT_EQ(max_pool.dilation_h, 2);
  EXPECT_EQ(max_pool.dilation_w, 1);
  EXPECT_TRUE(max_pool.ceil_mode);

  const auto& avg_pool = std::get<gradengine::AvgPool2dSpec>(layers[2].op);
  EXPECT_EQ(avg_pool.kernel_h, 2);
  EXPECT_EQ(avg_pool.kernel_w, 3);
  EXPECT_EQ(avg_pool.stride_h, 1);
  EXPECT_EQ(avg_pool.stride_w, 2);
  EXPECT_EQ(avg_pool.pad_h, 0);
  EXPECT_EQ(avg_pool.pad_w, 1);
  EXPECT_FALSE(avg_pool.ceil_mode);
  EXPECT_FALSE(avg_pool.count_include_pad);

  const auto& batch_norm = std::get<gradengine::BatchNorm2dSpec>(layers[3].op);
  EXPECT_EQ(batch_norm.num_features, 4);
  EXPECT_DOUBLE_EQ(batch_norm.eps, 0.001);
  EXPECT_DOUBLE_EQ(batch_norm.momentum, 0.25);
  EXPECT_FALSE(batch_norm.affine);
  EXPECT_TRUE(batch_norm.training);
  const auto& inference = std::get<gradengine::BatchNorm2dSpec>(layers[5].op);
  EXPECT_TRUE(inference.affine);
  EXPECT_FALSE(inference.training);

  EXPECT_EQ(layers[4].input, gradengine::kNetworkInput);
  EXPECT_EQ(std::get<gradengine::AddSpec>(layers[6].op).other, "bn");
  const auto& linear = std::get<gradengine::LinearSpec>(layers[7].op);
  EXPECT_EQ(linear.in_features, 48);
  EXPECT_EQ(linear.out_features, 5);
  EXPECT_TRUE(linear.bias);
  EXPECT_EQ(layers[7].input, "sum");
  for (size_t i : {0, 1, 2, 3, 5, 6}) EXPECT_EQ(layers[i].input, "") << i;

  EXPECT_EQ(spec->objective, gradengine::ObjectiveKind::kCrossEntropy);
  EXPECT_DOUBLE_EQ(spec->label_smoothing, 0.125);
  EXPECT_EQ(spec->ignore_index, -7);
  // running_stats=0 leaves out the training layer's optional buffers, and only those.
  EXPECT_EQ(spec->omitted_buffers, (std::set<std::string>{"bn.running_mean", "bn.running_var"}));
  EXPECT_EQ(spec->gradients.parameters, (std::vector<std::string>{"fc.weight", "bn2.bias"}));
}

TEST(ParseCaseSpecTest, RejectsMalformedNewKinds) {
  const BadSpec bad_specs[] = {
      {"unknown pool key", "ceil_mode=1", "ceil_mode=1 return_indices=0"},
      {"missing dilation", "dilation=2,1 ceil_mode=1", "ceil_mode=1"},
      {"4-value pool padding", "padding=1,0 dilation=2,1", "padding=1,0,0,0 dilation=2,1"},
      {"ceil_mode not 0/1", "ceil_mode=1", "ceil_mode=2"},
      {"missing count_include_pad", " count_include_pad=0", ""},
      {"eps not a number", "eps=0.001", "eps=small"},
      {"missing running_stats", "training=1 running_stats=0", "training=1"},
      {"inference without running stats", "training=0 running_stats=1",
       "training=0 running_stats=0"},
      {"training not 0/1", "training=0", "training=yes"},
      {"missing in_features", "in_features=48 ", ""},
      {"linear with a conv key", "out_features=5 bias=1", "out_features=5 bias=1 groups=1"},
      {"add without other", "add other=bn", "add"},
      {"add with an empty other", "other=bn", "other="},
      {"repeated input", "input=sum", "input=sum input=bn"},
      {"missing ignore_index", " ignore_index=-7", ""},
      {"missing label_smoothing", " label_smoothing=0.125", ""},
      {"label_smoothing not a number", "label_smoothing=0.125", "label_smoothing=a"},
      {"unknown cross_entropy key", "ignore_index=-7", "ignore_index=-7 reduction=sum"},
      {"param_grads names a buffer", "fc.weight bn2.bias", "fc.weight bn2.running_mean"},
      {"param_grads names an omitted buffer", "bn2.bias", "bn.running_var"},
  };
  for (const BadSpec& bad : bad_specs) {
    std::string text = kNewKindsSpec;
    const size_t at = text.find(bad.find);
    ASSERT_NE(at, std::string::npos) << bad.what;
    text.replace(at, std::string(bad.find).size(), bad.replace);
    absl::StatusOr<CaseSpec> spec = ParseCaseSpec(text, "bad");
    EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument)
        << bad.what << ": " << spec.status() << "\n"
        << text;
  }
}

// A copy of the committed case `name` in a fresh temporary directory, to be altered.
std::string CopyCase(const std::string& name) {
  const std::filesystem::path copy =
      std::filesystem::path(::testing::TempDir()) / absl::StrCat("fixture_test_", getpid()) / name;
  std::filesystem::remove_all(copy);
  std::filesystem::create_directories(copy.parent_path());
  std::filesystem::copy(std::filesystem::path(FixtureRoot()) / name, copy,
                        std::filesystem::copy_options::recursive);
  return copy.string();
}

TEST(LoadFixtureCaseTest, RequiresExactlyTheFilesOfRunningStatsAndLabels) {
  ASSERT_NE(std::getenv("GRAD_SOURCE_DIR"), nullptr)
      << "GRAD_SOURCE_DIR is not set; run this test through ctest";
  struct Alteration {
    const char* what;
    const char* name;
    const char* remove;  // relative path, or null
    const char* add;     // relative path of an empty file, or null
    absl::StatusCode code;
  };
  const Alteration alterations[] = {
      {"updated running_var not expected", "batch_norm_train_running_stats",
       "expected/bn1.running_var.npy", nullptr, absl::StatusCode::kNotFound},
      {"given running_mean missing", "batch_norm_train_running_stats",
       "params/bn1.running_mean.npy", nullptr, absl::StatusCode::kNotFound},
      {"running stat given with running_stats=0", "batch_norm_train_default_stats", nullptr,
       "params/bn1.running_mean.npy", absl::StatusCode::kInvalidArgument},
      {"running stat expected in inference mode", "batch_norm_inference", nullptr,
       "expected/bn1.running_mean.npy", absl::StatusCode::kInvalidArgument},
      {"default running stat not expected", "resnet_downsample_block",
       "expected/proj_bn.running_mean.npy", nullptr, absl::StatusCode::kNotFound},
      {"labels missing", "lenet5_cross_entropy", "labels.npy", nullptr,
       absl::StatusCode::kNotFound},
      {"target with labels", "cross_entropy_per_pixel", nullptr, "target.npy",
       absl::StatusCode::kInvalidArgument},
  };
  for (const Alteration& alteration : alterations) {
    const std::string directory = CopyCase(alteration.name);
    if (alteration.remove != nullptr) {
      ASSERT_TRUE(std::filesystem::remove(std::filesystem::path(directory) / alteration.remove))
          << alteration.what;
    }
    if (alteration.add != nullptr) {
      std::ofstream(std::filesystem::path(directory) / alteration.add).put('\0');
    }
    absl::StatusOr<std::unique_ptr<FixtureCase>> fixture = LoadFixtureCase(directory);
    EXPECT_EQ(fixture.status().code(), alteration.code)
        << alteration.what << ": " << fixture.status();
    std::filesystem::remove_all(directory);
  }
}

// A result made of the case's expected values, which must match, and then altered.
TEST(GradientResultMatchesTest, ChecksExactlyTheExpectedRunningStats) {
  ASSERT_NE(std::getenv("GRAD_SOURCE_DIR"), nullptr)
      << "GRAD_SOURCE_DIR is not set; run this test through ctest";
  absl::StatusOr<std::unique_ptr<FixtureCase>> fixture =
      LoadFixtureCase(FixtureRoot() + "/resnet_basic_block");
  ASSERT_TRUE(fixture.ok()) << fixture.status();
  const FixtureCase& expected = **fixture;
  ASSERT_EQ(expected.expected_running_stats.size(), 4u);
  gradengine::GradientResult result;
  result.output = expected.expected_output;
  result.loss = expected.expected_loss->data[0];
  result.input_grad = expected.expected_input_grad;
  for (const auto& [name, tensor] : expected.expected_parameter_grads) {
    result.parameter_grads[name] = tensor;
  }
  for (const auto& [name, tensor] : expected.expected_running_stats) {
    result.running_stats[name] = tensor;
  }
  gradengine::ForwardResult forward;
  forward.output = expected.expected_output;
  forward.running_stats = result.running_stats;
  EXPECT_TRUE(GradientResultMatches(expected, result));
  EXPECT_TRUE(ForwardResultMatches(expected, forward));

  gradengine::GradientResult missing = result;
  missing.running_stats.erase("bn2.running_var");
  EXPECT_FALSE(GradientResultMatches(expected, missing));
  gradengine::ForwardResult forward_missing = forward;
  forward_missing.running_stats.erase("bn1.running_mean");
  EXPECT_FALSE(ForwardResultMatches(expected, forward_missing));

  gradengine::GradientResult extra = result;
  extra.running_stats["conv1.running_mean"] = expected.expected_running_stats.begin()->second;
  EXPECT_FALSE(GradientResultMatches(expected, extra));

  gradengine::GradientResult wrong = result;
  std::vector<float> values(wrong.running_stats["bn1.running_var"].data.begin(),
                            wrong.running_stats["bn1.running_var"].data.end());
  values[0] += 0.5f;
  wrong.running_stats["bn1.running_var"] =
      gradengine::Tensor(wrong.running_stats["bn1.running_var"].shape, std::move(values));
  EXPECT_FALSE(GradientResultMatches(expected, wrong));
}

}  // namespace
}  // namespace gradtest
