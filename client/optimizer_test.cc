#include "gradclient/optimizer.h"

#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gradengine/network.h"
#include "gradengine/tensor.h"
#include "gtest/gtest.h"

namespace gradclient {
namespace {

using gradengine::ParameterTensors;
using gradengine::Tensor;
using ::testing::HasSubstr;

MATCHER_P2(StatusIs, code, message_part,
           absl::StrCat("has code ", absl::StatusCodeToString(code), " and a message containing \"",
                        message_part, "\"")) {
  const absl::Status status = arg;
  *result_listener << "status is " << status;
  return status.code() == code && status.message().find(message_part) != std::string::npos;
}

absl::Status CreateStatus(const OptimizerOptions& options) {
  return Optimizer::Create(options).status();
}

SgdOptions Sgd(double lr) {
  SgdOptions sgd;
  sgd.lr = lr;
  return sgd;
}

TEST(OptimizerValidationTest, SgdNeedsALearningRate) {
  EXPECT_THAT(CreateStatus(SgdOptions()),
              StatusIs(absl::StatusCode::kInvalidArgument, "sgd.lr is required"));
}

TEST(OptimizerValidationTest, SgdRefusesWhatTorchRefuses) {
  EXPECT_THAT(CreateStatus(Sgd(-0.5)),
              StatusIs(absl::StatusCode::kInvalidArgument, "sgd.lr=-0.5 must be >= 0"));
  SgdOptions momentum = Sgd(0.1);
  momentum.momentum = -1;
  EXPECT_THAT(CreateStatus(momentum),
              StatusIs(absl::StatusCode::kInvalidArgument, "sgd.momentum=-1 must be >= 0"));
  SgdOptions decay = Sgd(0.1);
  decay.weight_decay = -0.25;
  EXPECT_THAT(CreateStatus(decay),
              StatusIs(absl::StatusCode::kInvalidArgument, "sgd.weight_decay=-0.25 must be >= 0"));
  SgdOptions nesterov = Sgd(0.1);
  nesterov.nesterov = true;
  EXPECT_THAT(CreateStatus(nesterov),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       "sgd.nesterov=true requires momentum > 0 and dampening == 0; momentum=0"));
  nesterov.momentum = 0.9;
  nesterov.dampening = 0.1;
  EXPECT_THAT(CreateStatus(nesterov),
              StatusIs(absl::StatusCode::kInvalidArgument, "dampening=0.1"));
  SgdOptions nan = Sgd(std::numeric_limits<double>::quiet_NaN());
  EXPECT_THAT(CreateStatus(nan), StatusIs(absl::StatusCode::kInvalidArgument, "sgd.lr=nan"));
}

TEST(OptimizerValidationTest, SgdAcceptsWhatTorchAccepts) {
  EXPECT_TRUE(CreateStatus(Sgd(0.0)).ok());  // torch allows lr=0
  SgdOptions nesterov = Sgd(0.1);
  nesterov.momentum = 0.9;
  nesterov.nesterov = true;
  EXPECT_TRUE(CreateStatus(nesterov).ok());
  SgdOptions dampened = Sgd(0.1);
  dampened.momentum = 0.9;
  dampened.dampening = 0.5;
  dampened.weight_decay = 1e-4;
  EXPECT_TRUE(CreateStatus(dampened).ok());
}

template <typename AdamLike>
void ExpectAdamChecks(const std::string& kind) {
  AdamLike lr;
  lr.lr = -1e-3;
  EXPECT_THAT(CreateStatus(lr),
              StatusIs(absl::StatusCode::kInvalidArgument, kind + ".lr=-0.001 must be >= 0"));
  AdamLike eps;
  eps.eps = -1;
  EXPECT_THAT(CreateStatus(eps),
              StatusIs(absl::StatusCode::kInvalidArgument, kind + ".eps=-1 must be >= 0"));
  AdamLike beta1;
  beta1.beta1 = 1.0;
  EXPECT_THAT(CreateStatus(beta1),
              StatusIs(absl::StatusCode::kInvalidArgument, kind + ".beta1=1 is not in [0, 1)"));
  AdamLike beta2;
  beta2.beta2 = -0.1;
  EXPECT_THAT(CreateStatus(beta2),
              StatusIs(absl::StatusCode::kInvalidArgument, kind + ".beta2=-0.1 is not in [0, 1)"));
  AdamLike decay;
  decay.weight_decay = -0.01;
  EXPECT_THAT(CreateStatus(decay), StatusIs(absl::StatusCode::kInvalidArgument,
                                            kind + ".weight_decay=-0.01 must be >= 0"));
  AdamLike edges;  // torch accepts both ends of its ranges
  edges.lr = 0;
  edges.eps = 0;
  edges.beta1 = 0;
  edges.beta2 = 0;
  edges.weight_decay = 0;
  EXPECT_TRUE(CreateStatus(edges).ok());
  EXPECT_TRUE(CreateStatus(AdamLike()).ok());
}

TEST(OptimizerValidationTest, AdamRefusesWhatTorchRefuses) {
  ExpectAdamChecks<AdamOptions>("adam");
}

TEST(OptimizerValidationTest, AdamWRefusesWhatTorchRefuses) {
  ExpectAdamChecks<AdamWOptions>("adamw");
}

TEST(OptimizerDefaultsTest, AreTorchs) {
  const AdamOptions adam;
  EXPECT_EQ(adam.lr, 1e-3);
  EXPECT_EQ(adam.beta1, 0.9);
  EXPECT_EQ(adam.beta2, 0.999);
  EXPECT_EQ(adam.eps, 1e-8);
  EXPECT_EQ(adam.weight_decay, 0.0);
  EXPECT_FALSE(adam.amsgrad);
  const AdamWOptions adamw;
  EXPECT_EQ(adamw.weight_decay, 1e-2);
  const SgdOptions sgd;
  EXPECT_FALSE(sgd.lr.has_value());
  EXPECT_EQ(sgd.momentum, 0.0);
  EXPECT_FALSE(sgd.nesterov);
  EXPECT_STREQ(OptimizerName(sgd), "sgd");
  EXPECT_STREQ(OptimizerName(adam), "adam");
  EXPECT_STREQ(OptimizerName(adamw), "adamw");
}

TEST(OptimizerStepTest, PlainSgdIsParamMinusLrTimesGrad) {
  std::unique_ptr<Optimizer> sgd = *Optimizer::Create(Sgd(0.5));
  ParameterTensors parameters = {{"w", Tensor({2}, std::vector<float>{1.0f, -2.0f})},
                                 {"frozen", Tensor({1}, std::vector<float>{7.0f})}};
  const ParameterTensors gradients = {{"w", Tensor({2}, std::vector<float>{0.25f, 4.0f})}};
  ASSERT_TRUE(sgd->Step(gradients, &parameters).ok());
  EXPECT_EQ(parameters.at("w").data, gradengine::TensorBuffer({0.875f, -4.0f}));
  EXPECT_EQ(parameters.at("frozen").data, gradengine::TensorBuffer({7.0f}));  // no gradient
  EXPECT_TRUE(sgd->ExportState().empty());  // no momentum, no state
}

TEST(OptimizerStepTest, FirstAdamStepMovesByLrTimesSign) {
  // With zero moments, step 1 is lr * g / (|g| + eps * ...) ~ lr * sign(g).
  AdamOptions options;
  options.lr = 0.1;
  std::unique_ptr<Optimizer> adam = *Optimizer::Create(options);
  ParameterTensors parameters = {{"w", Tensor({3}, std::vector<float>{1.0f, 1.0f, 1.0f})}};
  const ParameterTensors gradients = {{"w", Tensor({3}, std::vector<float>{3.0f, -0.5f, 0.0f})}};
  ASSERT_TRUE(adam->Step(gradients, &parameters).ok());
  EXPECT_NEAR(parameters.at("w").data[0], 0.9f, 1e-6);
  EXPECT_NEAR(parameters.at("w").data[1], 1.1f, 1e-6);
  EXPECT_EQ(parameters.at("w").data[2], 1.0f);
  const ParameterTensors state = adam->ExportState();
  ASSERT_EQ(state.count("w.step"), 1u);
  EXPECT_TRUE(state.at("w.step").shape.empty());
  EXPECT_EQ(state.at("w.step").data[0], 1.0f);
  EXPECT_EQ(state.count("w.exp_avg"), 1u);
  EXPECT_EQ(state.count("w.exp_avg_sq"), 1u);
  EXPECT_EQ(state.count("w.max_exp_avg_sq"), 0u);  // not amsgrad
}

TEST(OptimizerStepTest, RefusesGradientsThatDoNotFit) {
  std::unique_ptr<Optimizer> sgd = *Optimizer::Create(Sgd(0.1));
  ParameterTensors parameters = {{"w", Tensor({2}, std::vector<float>{1.0f, 2.0f})}};
  EXPECT_THAT(
      sgd->Step({{"v", Tensor({2}, std::vector<float>{1.0f, 2.0f})}}, &parameters),
      StatusIs(absl::StatusCode::kInvalidArgument, "gradient \"v\" has no parameter of that name"));
  EXPECT_THAT(sgd->Step({{"w", Tensor({1, 2}, std::vector<float>{1.0f, 2.0f})}}, &parameters),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       "gradient \"w\" has shape [1, 2] but the parameter has shape [2]"));
  EXPECT_EQ(parameters.at("w").data, gradengine::TensorBuffer({1.0f, 2.0f}));
}

// Exported state imported into a fresh optimizer continues exactly where the first left off.
template <typename Options>
void ExpectStateRoundTrip(const Options& options) {
  const ParameterTensors start = {{"a", Tensor({2, 2}, std::vector<float>{1, -2, 3, -4})},
                                  {"b", Tensor({3}, std::vector<float>{0.5f, 0.25f, -1})}};
  auto gradients = [](int step) {
    const float s = static_cast<float>(step);
    return ParameterTensors{
        {"a", Tensor({2, 2}, std::vector<float>{0.1f * s, -0.3f, 0.7f / s, 1.5f})},
        {"b", Tensor({3}, std::vector<float>{-0.2f, 0.05f * s, 2.0f})}};
  };
  std::unique_ptr<Optimizer> unbroken = *Optimizer::Create(options);
  ParameterTensors expected = start;
  for (int step = 1; step <= 6; ++step)
    ASSERT_TRUE(unbroken->Step(gradients(step), &expected).ok());

  std::unique_ptr<Optimizer> first = *Optimizer::Create(options);
  ParameterTensors parameters = start;
  for (int step = 1; step <= 3; ++step) ASSERT_TRUE(first->Step(gradients(step), &parameters).ok());
  std::unique_ptr<Optimizer> second = *Optimizer::Create(options);
  ASSERT_TRUE(second->ImportState(first->ExportState()).ok());
  for (int step = 4; step <= 6; ++step) {
    ASSERT_TRUE(second->Step(gradients(step), &parameters).ok());
  }
  for (const auto& [name, tensor] : expected) {
    EXPECT_EQ(parameters.at(name).data, tensor.data) << OptimizerName(options) << " " << name;
  }
}

TEST(OptimizerStateTest, RoundTripsForEveryKind) {
  SgdOptions sgd = Sgd(0.05);
  sgd.momentum = 0.9;
  sgd.dampening = 0.1;
  ExpectStateRoundTrip(sgd);
  AdamOptions adam;
  adam.amsgrad = true;
  adam.weight_decay = 0.01;
  ExpectStateRoundTrip(adam);
  AdamWOptions adamw;
  adamw.amsgrad = true;
  ExpectStateRoundTrip(adamw);
}

TEST(OptimizerStateTest, ImportRefusesStateItDoesNotKeep) {
  AdamOptions options;
  options.amsgrad = true;
  std::unique_ptr<Optimizer> adam = *Optimizer::Create(options);
  const Tensor moment({2}, std::vector<float>{0, 0});
  const Tensor one_step({}, std::vector<float>{1.0f});
  EXPECT_THAT(adam->ImportState({{"w.momentum_buffer", moment}}),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       "optimizer state \"w.momentum_buffer\" is not state adam keeps"));
  EXPECT_THAT(
      adam->ImportState({{"w.step", one_step}, {"w.exp_avg", moment}, {"w.exp_avg_sq", moment}}),
      StatusIs(absl::StatusCode::kInvalidArgument, "\"w.max_exp_avg_sq\" is missing"));
  EXPECT_THAT(adam->ImportState({{"w.step", Tensor({}, std::vector<float>{1.5f})},
                                 {"w.exp_avg", moment},
                                 {"w.exp_avg_sq", moment},
                                 {"w.max_exp_avg_sq", moment}}),
              StatusIs(absl::StatusCode::kInvalidArgument, "w.step\" = 1.5"));
  EXPECT_THAT(adam->ImportState({{"w.step", one_step},
                                 {"w.exp_avg", moment},
                                 {"w.exp_avg_sq", Tensor({3}, std::vector<float>{0, 0, 0})},
                                 {"w.max_exp_avg_sq", moment}}),
              StatusIs(absl::StatusCode::kInvalidArgument, "the moments have shapes [2] and [3]"));

  // Imported state that does not fit the parameter fails the step, which changes nothing.
  ASSERT_TRUE(adam->ImportState({{"w.step", one_step},
                                 {"w.exp_avg", moment},
                                 {"w.exp_avg_sq", moment},
                                 {"w.max_exp_avg_sq", moment}})
                  .ok());
  ParameterTensors parameters = {{"w", Tensor({3}, std::vector<float>{1, 2, 3})}};
  EXPECT_THAT(
      adam->Step({{"w", Tensor({3}, std::vector<float>{1, 1, 1})}}, &parameters),
      StatusIs(absl::StatusCode::kFailedPrecondition,
               "the optimizer state of \"w\" has shape [2] but the parameter has shape [3]"));
  EXPECT_EQ(parameters.at("w").data, gradengine::TensorBuffer({1, 2, 3}));
}

}  // namespace
}  // namespace gradclient
