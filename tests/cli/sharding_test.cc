// Data-parallel sharding (client/sharding.h) against the engine: a batch computed in parts and
// combined equals the whole batch computed at once, for every objective and gradient
// selection, within kShardedRelativeTolerance.

#include "client/sharding.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "gradengine/engine.h"
#include "gradengine/network.h"
#include "gradengine/tensor.h"
#include "gtest/gtest.h"
#include "tests/service/service_test_util.h"
#include "tests/tolerance.h"

namespace gradclient {
namespace {

using gradengine::ObjectiveKind;

gradengine::Conv2dSpec Conv(int64_t in, int64_t out, int64_t kernel, int64_t stride, int64_t pad,
                            bool bias) {
  gradengine::Conv2dSpec conv;
  conv.in_channels = in;
  conv.out_channels = out;
  conv.kernel_h = conv.kernel_w = kernel;
  conv.stride_h = conv.stride_w = stride;
  conv.pad_top = conv.pad_bottom = conv.pad_left = conv.pad_right = pad;
  conv.bias = bias;
  return conv;
}

// conv 3->6 3x3 pad 1 + bias, leaky ReLU, conv 6->4 3x3 stride 2 + bias, tanh, on a batch of
// 7 of 3x9x9: output [7, 4, 5, 5].
class ShardingTest : public ::testing::Test {
 protected:
  static constexpr int64_t kBatch = 7;

  void SetUp() override {
    absl::StatusOr<std::unique_ptr<gradengine::Engine>> engine =
        gradengine::Engine::Create(gradengine::EngineOptions());
    ASSERT_TRUE(engine.ok()) << engine.status();
    engine_ = *std::move(engine);

    gradengine::NetworkSpec network;
    network.layers.push_back({"conv1", Conv(3, 6, 3, 1, 1, true)});
    network.layers.push_back({"act1", gradengine::ActivationSpec::LeakyRelu(0.1f)});
    network.layers.push_back({"conv2", Conv(6, 4, 3, 2, 1, true)});
    network.layers.push_back(
        {"act2", gradengine::ActivationSpec{gradengine::ActivationKind::kTanh}});
    case_ = gradservicetest::MakeCase(network, {kBatch, 3, 9, 9}, /*seed=*/1);
  }

  gradengine::GradientRequest Request(ObjectiveKind objective) const {
    return case_.GradientRequest(objective);
  }

  // The request computed in `shards` parts by the engine and combined.
  gradengine::GradientResult Sharded(const gradengine::GradientRequest& request, int shards) {
    const std::vector<BatchSlice> slices = SplitBatch(ShardableBatch(request), shards);
    std::vector<gradengine::GradientResult> parts;
    for (const BatchSlice& slice : slices) {
      absl::StatusOr<gradengine::GradientResult> part =
          engine_->ComputeGradients(SliceRequest(request, slice));
      EXPECT_TRUE(part.ok()) << part.status();
      parts.push_back(part.ok() ? *std::move(part) : gradengine::GradientResult());
    }
    return CombineGradientResults(request.objective.kind, slices, std::move(parts));
  }

  static void ExpectClose(const std::string& what, const gradengine::Tensor& actual,
                          const gradengine::Tensor& expected) {
    EXPECT_TRUE(
        (gradtest::TensorsClose<float, float>(what, actual.shape, actual.data, expected.shape,
                                              expected.data, gradtest::kShardedRelativeTolerance)));
  }

  static void ExpectResultsClose(const gradengine::GradientResult& actual,
                                 const gradengine::GradientResult& expected) {
    ExpectClose("output", actual.output, expected.output);
    ASSERT_EQ(actual.loss.has_value(), expected.loss.has_value());
    if (expected.loss.has_value()) {
      EXPECT_NEAR(*actual.loss, *expected.loss,
                  gradtest::kShardedRelativeTolerance * std::max(1.0, std::abs(*expected.loss)));
    }
    ASSERT_EQ(actual.input_grad.has_value(), expected.input_grad.has_value());
    if (expected.input_grad.has_value()) {
      ExpectClose("input_grad", *actual.input_grad, *expected.input_grad);
    }
    ASSERT_EQ(actual.parameter_grads.size(), expected.parameter_grads.size());
    for (const auto& [name, grad] : expected.parameter_grads) {
      ASSERT_TRUE(actual.parameter_grads.count(name)) << name;
      ExpectClose(name, actual.parameter_grads.at(name), grad);
    }
  }

  std::unique_ptr<gradengine::Engine> engine_;
  gradservicetest::OwnedCase case_;
};

TEST(SplitBatchTest, CoversTheBatchInOrderAsEquallyAsPossible) {
  const std::vector<BatchSlice> slices = SplitBatch(10, 3);
  ASSERT_EQ(slices.size(), 3u);
  EXPECT_EQ(slices[0].begin, 0);
  EXPECT_EQ(slices[0].end, 4);
  EXPECT_EQ(slices[1].begin, 4);
  EXPECT_EQ(slices[1].end, 7);
  EXPECT_EQ(slices[2].begin, 7);
  EXPECT_EQ(slices[2].end, 10);
}

TEST(SplitBatchTest, NeverMorePartsThanRows) {
  EXPECT_EQ(SplitBatch(2, 5).size(), 2u);
  EXPECT_EQ(SplitBatch(1, 1).size(), 1u);
  EXPECT_EQ(SplitBatch(6, 6).back().begin, 5);
}

TEST_F(ShardingTest, EveryObjectiveAndShardCountMatchesTheWholeBatch) {
  for (ObjectiveKind objective :
       {ObjectiveKind::kMse, ObjectiveKind::kSum, ObjectiveKind::kGradOutput}) {
    const gradengine::GradientRequest request = Request(objective);
    absl::StatusOr<gradengine::GradientResult> whole = engine_->ComputeGradients(request);
    ASSERT_TRUE(whole.ok()) << whole.status();
    for (int shards : {2, 3, 7, 16}) {
      SCOPED_TRACE(absl::StrCat(gradengine::ObjectiveName(objective), ", shards=", shards));
      ExpectResultsClose(Sharded(request, shards), *whole);
    }
  }
}

// The weighting matters: without it an MSE loss split in 2 would be off by the parts' sizes.
TEST_F(ShardingTest, MseWeightsUnequalPartsByTheirRows) {
  const gradengine::GradientRequest request = Request(ObjectiveKind::kMse);
  absl::StatusOr<gradengine::GradientResult> whole = engine_->ComputeGradients(request);
  ASSERT_TRUE(whole.ok()) << whole.status();
  // 7 rows in 2 parts: 4 and 3.
  const gradengine::GradientResult sharded = Sharded(request, 2);
  ExpectResultsClose(sharded, *whole);
  absl::StatusOr<gradengine::GradientResult> first =
      engine_->ComputeGradients(SliceRequest(request, {0, 4}));
  ASSERT_TRUE(first.ok());
  EXPECT_GT(std::abs(*first->loss - *whole->loss), 1e-3 * std::abs(*whole->loss))
      << "the test data should make the parts' losses differ from the whole's";
}

TEST_F(ShardingTest, GradientSubsetsAndSkippedOutputsCombine) {
  gradengine::GradientRequest request = Request(ObjectiveKind::kMse);
  request.gradients.input = false;
  request.gradients.all_parameters = false;
  request.gradients.parameters = {"conv2.bias", "conv1.weight"};
  absl::StatusOr<gradengine::GradientResult> whole = engine_->ComputeGradients(request);
  ASSERT_TRUE(whole.ok()) << whole.status();
  ExpectResultsClose(Sharded(request, 3), *whole);

  // Parts that left their output out combine to no output.
  const std::vector<BatchSlice> slices = SplitBatch(kBatch, 2);
  std::vector<gradengine::GradientResult> parts(2);
  parts[0].output = gradengine::Tensor({4, 4, 5, 5}, std::vector<float>(400, 1.0f));
  EXPECT_TRUE(
      CombineGradientResults(ObjectiveKind::kSum, slices, std::move(parts)).output.data.empty());
}

TEST_F(ShardingTest, ForwardConcatenatesTheParts) {
  const gradengine::ForwardRequest request = case_.ForwardRequest();
  absl::StatusOr<gradengine::ForwardResult> whole = engine_->Forward(request);
  ASSERT_TRUE(whole.ok()) << whole.status();
  const std::vector<BatchSlice> slices = SplitBatch(ShardableBatch(request), 3);
  std::vector<gradengine::ForwardResult> parts;
  for (const BatchSlice& slice : slices) {
    absl::StatusOr<gradengine::ForwardResult> part = engine_->Forward(SliceRequest(request, slice));
    ASSERT_TRUE(part.ok()) << part.status();
    parts.push_back(*std::move(part));
  }
  // Rows are independent; only oneDNN's choice of kernel for another batch size may round
  // differently.
  ExpectClose("output", CombineForwardResults(slices, std::move(parts)).output, whole->output);
}

TEST_F(ShardingTest, RequestsThatCannotBeCutAreSentWhole) {
  gradengine::GradientRequest request = Request(ObjectiveKind::kMse);
  EXPECT_EQ(ShardableBatch(request), kBatch);
  // A target of another batch size: the server must name it, so nothing is cut.
  const std::vector<int64_t> short_target_shape = {kBatch - 1, 4, 5, 5};
  request.objective.tensor.shape = short_target_shape;
  EXPECT_EQ(ShardableBatch(request), 0);
  // A 3-dim input.
  request = Request(ObjectiveKind::kSum);
  request.input.shape = {kBatch * 3, 9, 9};
  EXPECT_EQ(ShardableBatch(request), 0);
  // Data that do not match the shape.
  request = Request(ObjectiveKind::kSum);
  request.input.size -= 1;
  EXPECT_EQ(ShardableBatch(request), 0);
}

}  // namespace
}  // namespace gradclient
