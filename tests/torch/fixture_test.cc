// The engine against the committed PyTorch fixtures in tests/fixtures, one test per case, and
// the strictness of the case.txt parser those fixtures rely on.

#include "tests/torch/fixture.h"

#include <cstdlib>
#include <filesystem>
#include <memory>
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
  for (const char* name : {"seed_conv1", "seed_conv4", "seed_layer"}) {
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

}  // namespace
}  // namespace gradtest
