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

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "gradclient/client.h"
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
    return CombineGradientResults(request.objective, slices, std::move(parts));
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
      CombineGradientResults(gradengine::Objective(ObjectiveKind::kSum), slices, std::move(parts))
          .output.data.empty());
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

// Cross-entropy on the [7, 4, 5, 5] logits: labels [7, 5, 5] in [0, 4), with the ignored ones
// spread unevenly over the rows (row 0 all ignored, row 1 half, the rest a few), so that the
// parts' counts of labels that count differ from their row counts.
class CrossEntropyShardingTest : public ShardingTest {
 protected:
  static constexpr int64_t kIgnore = 3;  // a valid class, to show it is the index that matters

  void SetUp() override {
    ShardingTest::SetUp();
    for (int64_t row = 0; row < kBatch; ++row) {
      for (int64_t i = 0; i < 25; ++i) {
        const bool ignored = row == 0 || (row == 1 && i % 2 == 0) || (i * 7 + row) % 11 == 0;
        labels_.push_back(ignored ? kIgnore : (i + row) % 3);
      }
    }
  }

  gradengine::GradientRequest Request(double label_smoothing) const {
    gradengine::GradientRequest request = case_.GradientRequest(ObjectiveKind::kSum);
    request.objective.kind = ObjectiveKind::kCrossEntropy;
    request.objective.labels = {
        {kBatch, 5, 5}, labels_.data(), static_cast<int64_t>(labels_.size())};
    request.objective.label_smoothing = label_smoothing;
    request.objective.ignore_index = kIgnore;
    return request;
  }

  std::vector<int64_t> labels_;
};

TEST_F(CrossEntropyShardingTest, WeighsPartsByTheirLabelsNotIgnored) {
  for (double label_smoothing : {0.0, 0.2}) {
    const gradengine::GradientRequest request = Request(label_smoothing);
    EXPECT_EQ(ShardableBatch(request), kBatch);
    absl::StatusOr<gradengine::GradientResult> whole = engine_->ComputeGradients(request);
    ASSERT_TRUE(whole.ok()) << whole.status();
    // 7 shards put row 0, whose labels are all ignored, in a part of its own.
    for (int shards : {2, 3, 7}) {
      SCOPED_TRACE(absl::StrCat("label_smoothing=", label_smoothing, ", shards=", shards));
      ExpectResultsClose(Sharded(request, shards), *whole);
    }
  }
}

TEST_F(CrossEntropyShardingTest, WeighingByRowsWouldBeWrong) {
  const gradengine::GradientRequest request = Request(0.0);
  absl::StatusOr<gradengine::GradientResult> whole = engine_->ComputeGradients(request);
  ASSERT_TRUE(whole.ok()) << whole.status();
  // Rows 0..3 and 4..6: 4 of 7 rows, but fewer than 4/7 of the labels that count.
  absl::StatusOr<gradengine::GradientResult> first =
      engine_->ComputeGradients(SliceRequest(request, {0, 4}));
  absl::StatusOr<gradengine::GradientResult> second =
      engine_->ComputeGradients(SliceRequest(request, {4, 7}));
  ASSERT_TRUE(first.ok() && second.ok());
  // Weighed by rows, the loss would miss the tolerance the tests above hold the parts to, with
  // room to spare.
  const double by_rows = (4.0 * *first->loss + 3.0 * *second->loss) / 7.0;
  EXPECT_GT(std::abs(by_rows - *whole->loss),
            10 * gradtest::kShardedRelativeTolerance * std::max(1.0, std::abs(*whole->loss)))
      << "the test labels should make weighing by rows differ from the whole batch's loss";
}

// The combination alone, on made-up parts: weights c_k / C, a part whose labels are all
// ignored (NaN loss and gradients, as 0/0 gives) contributing nothing.
TEST(CombineCrossEntropyTest, WeightsAreTheCountsOfLabelsNotIgnored) {
  const std::vector<int64_t> labels = {-100, -100, 1, -100, 0, 2, 1, 0};  // rows of 2
  gradengine::Objective objective(ObjectiveKind::kCrossEntropy);
  objective.labels = {{4, 2}, labels.data(), 8};
  const std::vector<BatchSlice> slices = {{0, 1}, {1, 2}, {2, 4}};  // counts 0, 1, 4
  const float nan = std::nanf("");
  std::vector<gradengine::GradientResult> parts(3);
  const std::vector<double> losses = {nan, 2.0, 0.5};
  const std::vector<float> grads = {nan, 10.0f, 20.0f};
  for (size_t i = 0; i < parts.size(); ++i) {
    const int64_t rows = slices[i].rows();
    parts[i].loss = losses[i];
    parts[i].input_grad = gradengine::Tensor({rows, 3}, std::vector<float>(rows * 3, grads[i]));
    parts[i].parameter_grads["fc.weight"] = gradengine::Tensor({2}, {grads[i], -grads[i]});
  }
  const gradengine::GradientResult whole =
      CombineGradientResults(objective, slices, std::move(parts));
  ASSERT_TRUE(whole.loss.has_value());
  EXPECT_DOUBLE_EQ(*whole.loss, (1 * 2.0 + 4 * 0.5) / 5);
  const gradengine::Tensor& weight = whole.parameter_grads.at("fc.weight");
  EXPECT_FLOAT_EQ(weight.data[0], (1 * 10.0f + 4 * 20.0f) / 5);
  EXPECT_FLOAT_EQ(weight.data[1], -(1 * 10.0f + 4 * 20.0f) / 5);
  ASSERT_TRUE(whole.input_grad.has_value());
  ASSERT_EQ(whole.input_grad->shape, (std::vector<int64_t>{4, 3}));
  for (int j = 0; j < 3; ++j) EXPECT_EQ(whole.input_grad->data[j], 0.0f);  // all ignored
  EXPECT_FLOAT_EQ(whole.input_grad->data[3], 10.0f / 5);
  EXPECT_FLOAT_EQ(whole.input_grad->data[6], 20.0f * 4 / 5);
}

TEST(CombineCrossEntropyTest, EveryLabelIgnoredGivesNaNAsTheWholeBatchDoes) {
  const std::vector<int64_t> labels = {-100, -100};
  gradengine::Objective objective(ObjectiveKind::kCrossEntropy);
  objective.labels = {{2}, labels.data(), 2};
  std::vector<gradengine::GradientResult> parts(2);
  for (gradengine::GradientResult& part : parts) part.loss = std::nan("");
  const gradengine::GradientResult whole =
      CombineGradientResults(objective, SplitBatch(2, 2), std::move(parts));
  ASSERT_TRUE(whole.loss.has_value());
  EXPECT_TRUE(std::isnan(*whole.loss));
}

TEST(ShardableBatchTest, CrossEntropyLabelsMustHaveTheBatchsRows) {
  std::vector<float> input(4 * 3 * 2 * 2);
  std::vector<int64_t> labels(4 * 2 * 2);
  gradengine::GradientRequest request;
  request.input = gradengine::TensorView({4, 3, 2, 2}, input);
  request.objective.kind = ObjectiveKind::kCrossEntropy;
  request.objective.labels = {{4, 2, 2}, labels.data(), 16};
  EXPECT_EQ(ShardableBatch(request), 4);
  const gradengine::GradientRequest part = SliceRequest(request, {1, 3});
  EXPECT_EQ(part.objective.labels.shape, (std::vector<int64_t>{2, 2, 2}));
  EXPECT_EQ(part.objective.labels.data, labels.data() + 4);
  EXPECT_EQ(part.objective.labels.size, 8);
  EXPECT_EQ(part.objective.ignore_index, request.objective.ignore_index);
  // Labels of another batch size, or fewer than their shape needs: sent whole.
  request.objective.labels.shape = {3, 2, 2};
  EXPECT_EQ(ShardableBatch(request), 0);
  request.objective.labels = {{4, 2, 2}, labels.data(), 15};
  EXPECT_EQ(ShardableBatch(request), 0);
  request.objective.labels = {{}, labels.data(), 1};
  EXPECT_EQ(ShardableBatch(request), 0);
}

gradengine::NetworkSpec NetworkWithBatchNorm(bool training) {
  gradengine::NetworkSpec network;
  network.layers.push_back({"conv1", Conv(3, 4, 3, 1, 1, false)});
  gradengine::BatchNorm2dSpec norm;
  norm.num_features = 4;
  norm.training = training;
  network.layers.push_back({"bn1", norm});
  network.layers.push_back(
      {"relu1", gradengine::ActivationSpec{gradengine::ActivationKind::kRelu}});
  return network;
}

TEST(CheckRowsIndependentTest, RefusesBatchNormInTrainingModeNamingIt) {
  const absl::Status status = CheckRowsIndependent(NetworkWithBatchNorm(true), 2);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_TRUE(absl::StrContains(status.message(),
                                "shards=2 cannot be used: layers[1] (\"bn1\", batch_norm2d) "
                                "mixes the rows of the batch"))
      << status;
  EXPECT_TRUE(CheckRowsIndependent(NetworkWithBatchNorm(true), 1).ok());
  // In inference mode a batch norm is a per-channel affine map: rows stay independent.
  EXPECT_TRUE(CheckRowsIndependent(NetworkWithBatchNorm(false), 8).ok());
}

// The client refuses before it sends anything: against an address nobody listens on, the call
// fails with the refusal, not with Unavailable.
TEST(CheckRowsIndependentTest, TheClientRefusesBeforeSending) {
  ClientOptions options;
  options.retry.max_attempts = 1;
  absl::StatusOr<std::unique_ptr<Client>> client = Client::Create("127.0.0.1:1", options);
  ASSERT_TRUE(client.ok()) << client.status();
  std::vector<float> input(4 * 3 * 5 * 5, 1.0f);
  gradengine::GradientRequest request;
  request.network = NetworkWithBatchNorm(true);
  request.input = gradengine::TensorView({4, 3, 5, 5}, input);
  request.objective = gradengine::Objective(ObjectiveKind::kSum);
  CallOptions call;
  call.shards = 2;
  call.timeout = absl::Seconds(5);
  absl::StatusOr<GradientReply> reply = (*client)->ComputeGradients(request, call);
  EXPECT_EQ(reply.status().code(), absl::StatusCode::kInvalidArgument) << reply.status();
  EXPECT_TRUE(absl::StrContains(reply.status().message(), "bn1")) << reply.status();
  gradengine::ForwardRequest forward;
  forward.network = request.network;
  forward.input = request.input;
  absl::StatusOr<ForwardReply> forward_reply = (*client)->Forward(forward, call);
  EXPECT_EQ(forward_reply.status().code(), absl::StatusCode::kInvalidArgument)
      << forward_reply.status();
}

}  // namespace
}  // namespace gradclient
