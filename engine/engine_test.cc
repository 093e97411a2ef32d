#include "gradengine/engine.h"

#include <omp.h>

#include <cmath>
#include <limits>
#include <optional>
#include <random>
#include <thread>
#include <vector>

#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/tolerance.h"

namespace gradengine {
namespace {

using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;

std::vector<float> Iota(int64_t n, float start = 1.0f) {
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[i] = start + static_cast<float>(i);
  return v;
}

std::vector<float> Random(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist;
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = dist(rng);
  return v;
}

std::unique_ptr<Engine> MakeEngine(EngineOptions options = {}) {
  absl::StatusOr<std::unique_ptr<Engine>> engine = Engine::Create(options);
  EXPECT_TRUE(engine.ok()) << engine.status();
  return std::move(*engine);
}

// 1x1x3x3 input 1..9, one 2x2 kernel of ones, no padding, objective sum(y).
// y = window sums: [[1+2+4+5, 2+3+5+6], [4+5+7+8, 5+6+8+9]] = [[12, 16], [24, 28]], loss 80.
// dL/dx counts how many windows cover each pixel: [[1,2,1],[2,4,2],[1,2,1]].
// dL/dw[i][j] sums the inputs each tap sees: [[1+2+4+5, 2+3+5+6], [4+5+7+8, 5+6+8+9]].
// dL/db = number of outputs = 4.
TEST(EngineTest, HandComputedSumObjective) {
  std::unique_ptr<Engine> engine = MakeEngine();
  std::vector<float> input = Iota(9);
  std::vector<float> weight(4, 1.0f);
  std::vector<float> bias = {0.5f};
  GradientRequest request;
  request.network.layers = {{"conv", Conv2dSpec::Square(1, 1, 2, 1, 0, true)}};
  request.input = TensorView({1, 1, 3, 3}, input);
  request.parameters = {{"conv.weight", TensorView({1, 1, 2, 2}, weight)},
                        {"conv.bias", TensorView({1}, bias)}};
  request.objective.kind = ObjectiveKind::kSum;

  absl::StatusOr<GradientResult> result = engine->ComputeGradients(request);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_THAT(result->output.shape, ElementsAre(1, 1, 2, 2));
  EXPECT_THAT(result->output.data, ElementsAre(12.5f, 16.5f, 24.5f, 28.5f));
  ASSERT_TRUE(result->loss.has_value());
  EXPECT_DOUBLE_EQ(*result->loss, 82.0);
  ASSERT_TRUE(result->input_grad.has_value());
  EXPECT_THAT(result->input_grad->data, ElementsAre(1, 2, 1, 2, 4, 2, 1, 2, 1));
  EXPECT_THAT(result->parameter_grads.at("conv.weight").data, ElementsAre(12, 16, 24, 28));
  EXPECT_THAT(result->parameter_grads.at("conv.bias").data, ElementsAre(4));
}

// mean((y - t)^2) on an identity-like network: relu of a positive input is the input.
TEST(EngineTest, MseLossAndGradientOnActivationOnlyNetwork) {
  std::unique_ptr<Engine> engine = MakeEngine();
  std::vector<float> input = {1, 2, 3, 4};
  std::vector<float> target = {0, 2, 5, 4};
  GradientRequest request;
  request.network.layers = {{"relu", ActivationSpec{ActivationKind::kRelu}}};
  request.input = TensorView({1, 1, 2, 2}, input);
  request.objective = {ObjectiveKind::kMse, TensorView({1, 1, 2, 2}, target)};
  absl::StatusOr<GradientResult> result = engine->ComputeGradients(request);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_DOUBLE_EQ(*result->loss, (1.0 + 0.0 + 4.0 + 0.0) / 4.0);
  // 2 (y - t) / 4
  EXPECT_THAT(result->input_grad->data, ElementsAre(0.5f, 0.0f, -1.0f, 0.0f));
  EXPECT_TRUE(result->parameter_grads.empty());
}

TEST(EngineTest, GradOutputHasNoLossAndScalesGradients) {
  std::unique_ptr<Engine> engine = MakeEngine();
  std::vector<float> input = Iota(9);
  std::vector<float> weight(4, 1.0f);
  std::vector<float> grad_output = {1, 0, 0, 2};
  GradientRequest request;
  request.network.layers = {{"conv", Conv2dSpec::Square(1, 1, 2, 1, 0, false)}};
  request.input = TensorView({1, 1, 3, 3}, input);
  request.parameters = {{"conv.weight", TensorView({1, 1, 2, 2}, weight)}};
  request.objective = {ObjectiveKind::kGradOutput, TensorView({1, 1, 2, 2}, grad_output)};
  absl::StatusOr<GradientResult> result = engine->ComputeGradients(request);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_FALSE(result->loss.has_value());
  // Window (0,0) weighted 1, window (1,1) weighted 2.
  EXPECT_THAT(result->input_grad->data, ElementsAre(1, 1, 0, 1, 3, 2, 0, 2, 2));
  EXPECT_THAT(result->parameter_grads.at("conv.weight").data,
              ElementsAre(1 + 2 * 5, 2 + 2 * 6, 4 + 2 * 8, 5 + 2 * 9));
}

// A 3-layer network used by several tests below.
struct Fixture3 {
  std::vector<float> input = Random(2 * 3 * 9 * 7, 1);
  std::vector<float> w1 = Random(5 * 3 * 3 * 3, 2);
  std::vector<float> b1 = Random(5, 3);
  std::vector<float> w3 = Random(4 * 5 * 2 * 2, 4);
  std::vector<float> target = Random(2 * 4 * 8 * 6, 5);

  GradientRequest Request() const {
    GradientRequest request;
    request.network.layers = {{"c1", Conv2dSpec::Square(3, 5, 3, 1, 1, true)},
                              {"act", ActivationSpec{ActivationKind::kTanh}},
                              {"c3", Conv2dSpec::Square(5, 4, 2, 1, 0, false)}};
    request.input = TensorView({2, 3, 9, 7}, input);
    request.parameters = {{"c1.weight", TensorView({5, 3, 3, 3}, w1)},
                          {"c1.bias", TensorView({5}, b1)},
                          {"c3.weight", TensorView({4, 5, 2, 2}, w3)}};
    request.objective = {ObjectiveKind::kMse, TensorView({2, 4, 8, 6}, target)};
    return request;
  }
};

TEST(EngineTest, ReturnsOnlyRequestedGradientsWithSameValues) {
  std::unique_ptr<Engine> engine = MakeEngine();
  Fixture3 f;
  absl::StatusOr<GradientResult> all = engine->ComputeGradients(f.Request());
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(all->parameter_grads.size(), 3u);

  GradientRequest request = f.Request();
  request.gradients.input = false;
  request.gradients.all_parameters = false;
  request.gradients.parameters = {"c3.weight"};
  absl::StatusOr<GradientResult> some = engine->ComputeGradients(request);
  ASSERT_TRUE(some.ok()) << some.status();
  EXPECT_FALSE(some->input_grad.has_value());
  ASSERT_EQ(some->parameter_grads.size(), 1u);
  EXPECT_EQ(some->parameter_grads.at("c3.weight").data, all->parameter_grads.at("c3.weight").data);
  EXPECT_EQ(some->output.data, all->output.data);
  EXPECT_EQ(*some->loss, *all->loss);

  request.gradients.parameters = {"c1.bias"};
  some = engine->ComputeGradients(request);
  ASSERT_TRUE(some.ok()) << some.status();
  ASSERT_EQ(some->parameter_grads.size(), 1u);
  // A bias-only request sums dL/dy with a reduction instead of running backward-weights, so
  // the summation order (and the last bits) may differ.
  const Tensor& bias_only = some->parameter_grads.at("c1.bias");
  const Tensor& bias_all = all->parameter_grads.at("c1.bias");
  EXPECT_TRUE((gradtest::TensorsClose<float, float>("c1.bias grad", bias_only.shape, bias_only.data,
                                                    bias_all.shape, bias_all.data)));

  // Forward alone gives the training pass's output.
  ForwardRequest forward;
  forward.network = request.network;
  forward.parameters = request.parameters;
  forward.input = request.input;
  absl::StatusOr<ForwardResult> fwd = engine->Forward(forward);
  ASSERT_TRUE(fwd.ok()) << fwd.status();
  EXPECT_EQ(fwd->output.shape, all->output.shape);
  ASSERT_EQ(fwd->output.data.size(), all->output.data.size());
  for (size_t i = 0; i < fwd->output.data.size(); ++i) {
    EXPECT_NEAR(fwd->output.data[i], all->output.data[i], 1e-5f);
  }
}

// With a single output pixel there is nothing to sum for the bias gradient: dL/dy is it.
TEST(EngineTest, BiasOnlyGradientOfSinglePixelOutput) {
  std::unique_ptr<Engine> engine = MakeEngine();
  std::vector<float> input = {2.0f, -1.0f};
  std::vector<float> weight = {1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f};
  std::vector<float> bias = {0.0f, 0.0f, 0.0f};
  GradientRequest request;
  request.network.layers = {{"conv", Conv2dSpec::Square(2, 3, 1, 1, 0, true)}};
  request.input = TensorView({1, 2, 1, 1}, input);
  request.parameters = {{"conv.weight", TensorView({3, 2, 1, 1}, weight)},
                        {"conv.bias", TensorView({3}, bias)}};
  std::vector<float> grad_output = {0.5f, -2.0f, 3.0f};
  request.objective = {ObjectiveKind::kGradOutput, TensorView({1, 3, 1, 1}, grad_output)};
  request.gradients.all_parameters = false;
  request.gradients.parameters = {"conv.bias"};
  absl::StatusOr<GradientResult> result = engine->ComputeGradients(request);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_THAT(result->parameter_grads.at("conv.bias").data, ElementsAre(0.5f, -2.0f, 3.0f));
  EXPECT_THAT(result->input_grad->data, ElementsAre(1.5f, 1.5f));
}

TEST(EngineTest, CachesPlansPerShapeAndWork) {
  std::unique_ptr<Engine> engine = MakeEngine();
  Fixture3 f;
  ASSERT_TRUE(engine->ComputeGradients(f.Request()).ok());
  ASSERT_TRUE(engine->ComputeGradients(f.Request()).ok());
  EXPECT_EQ(engine->stats().plans_created, 1);
  EXPECT_EQ(engine->stats().plan_cache_hits, 1);
  GradientRequest request = f.Request();
  request.gradients.input = false;
  ASSERT_TRUE(engine->ComputeGradients(request).ok());
  EXPECT_EQ(engine->stats().plans_created, 2);
  EXPECT_EQ(engine->stats().cached_plans, 2);
}

TEST(EngineTest, ReportsWhereTheTimeWent) {
  std::unique_ptr<Engine> engine = MakeEngine();
  Fixture3 f;
  absl::StatusOr<GradientResult> gradients = engine->ComputeGradients(f.Request());
  ASSERT_TRUE(gradients.ok()) << gradients.status();
  EXPECT_GT(gradients->timing.forward_ns, 0);
  EXPECT_GT(gradients->timing.backward_ns, 0);

  ForwardRequest request;
  request.network = f.Request().network;
  request.parameters = f.Request().parameters;
  request.input = f.Request().input;
  absl::StatusOr<ForwardResult> forward = engine->Forward(request);
  ASSERT_TRUE(forward.ok()) << forward.status();
  EXPECT_GT(forward->timing.forward_ns, 0);
  EXPECT_EQ(forward->timing.backward_ns, 0);
}

TEST(EngineTest, EvictsLeastRecentlyUsedPlans) {
  EngineOptions options;
  options.max_cached_plans = 2;
  std::unique_ptr<Engine> engine = MakeEngine(options);
  for (int64_t width : {4, 5, 6, 4}) {
    std::vector<float> input = Random(width * 4, 7);
    ForwardRequest request;
    request.network.layers = {{"s", ActivationSpec{ActivationKind::kSigmoid}}};
    request.input = TensorView({1, 1, 4, width}, input);
    ASSERT_TRUE(engine->Forward(request).ok());
  }
  EXPECT_EQ(engine->stats().cached_plans, 2);
  EXPECT_EQ(engine->stats().plans_created, 4);  // width 4 was evicted before its reuse
}

TEST(EngineTest, ConcurrentCallsMatchSerialResultsBitForBit) {
  EngineOptions options;
  options.threads_per_call = 1;
  std::unique_ptr<Engine> engine = MakeEngine(options);
  Fixture3 f;
  absl::StatusOr<GradientResult> serial = engine->ComputeGradients(f.Request());
  ASSERT_TRUE(serial.ok()) << serial.status();

  constexpr int kThreads = 8;
  constexpr int kCallsPerThread = 20;
  std::vector<std::thread> threads;
  std::vector<int> mismatches(kThreads, 0);
  absl::Notification start;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      start.WaitForNotification();
      for (int i = 0; i < kCallsPerThread; ++i) {
        absl::StatusOr<GradientResult> r = engine->ComputeGradients(f.Request());
        if (!r.ok() || r->output.data != serial->output.data ||
            r->input_grad->data != serial->input_grad->data || *r->loss != *serial->loss ||
            r->parameter_grads.at("c1.weight").data !=
                serial->parameter_grads.at("c1.weight").data ||
            r->parameter_grads.at("c1.bias").data != serial->parameter_grads.at("c1.bias").data ||
            r->parameter_grads.at("c3.weight").data !=
                serial->parameter_grads.at("c3.weight").data) {
          ++mismatches[t];
        }
      }
    });
  }
  start.Notify();
  for (std::thread& thread : threads) thread.join();
  EXPECT_THAT(mismatches, ElementsAreArray(std::vector<int>(kThreads, 0)));
}

TEST(EngineTest, NonFiniteValuesPropagateLikePyTorch) {
  std::unique_ptr<Engine> engine = MakeEngine();
  std::vector<float> input = Iota(16);
  input[5] = std::nanf("");
  std::vector<float> weight(1, 2.0f);
  ForwardRequest request;
  request.network.layers = {{"c", Conv2dSpec::Square(1, 1, 1)}};
  request.input = TensorView({1, 1, 4, 4}, input);
  std::vector<float> bias = {0.0f};
  request.parameters = {{"c.weight", TensorView({1, 1, 1, 1}, weight)},
                        {"c.bias", TensorView({1}, bias)}};
  absl::StatusOr<ForwardResult> result = engine->Forward(request);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_TRUE(std::isnan(result->output.data[5]));
  EXPECT_EQ(result->output.data[4], 10.0f);
}

TEST(EngineTest, StopsBetweenLayersWhenToldAndKeepsServing) {
  std::unique_ptr<Engine> engine = MakeEngine();
  Fixture3 f;
  GradientRequest request = f.Request();
  int checks = 0;
  request.should_continue = [&checks]() -> absl::Status {
    if (++checks == 2) return absl::DeadlineExceededError("deadline passed after layer 1");
    return absl::OkStatus();
  };
  absl::StatusOr<GradientResult> stopped = engine->ComputeGradients(request);
  EXPECT_EQ(stopped.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(checks, 2);
  // The same plan and its workspace serve the next call normally.
  absl::StatusOr<GradientResult> next = engine->ComputeGradients(f.Request());
  EXPECT_TRUE(next.ok()) << next.status();
}

TEST(EngineTest, ChecksBeforeEveryLayer) {
  std::unique_ptr<Engine> engine = MakeEngine();
  Fixture3 f;
  ForwardRequest request;
  GradientRequest gradient_request = f.Request();
  request.network = gradient_request.network;
  request.parameters = gradient_request.parameters;
  request.input = gradient_request.input;
  int checks = 0;
  request.should_continue = [&checks]() -> absl::Status {
    ++checks;
    return absl::OkStatus();
  };
  ASSERT_TRUE(engine->Forward(request).ok());
  // c1 with its tanh fused, then c3: two steps.
  EXPECT_EQ(checks, 2);
  request.should_continue = []() -> absl::Status {
    return absl::CancelledError("client went away");
  };
  EXPECT_EQ(engine->Forward(request).status().code(), absl::StatusCode::kCancelled);

  // A training step checks before each of the two steps forward and again backward.
  checks = 0;
  gradient_request.should_continue = [&checks]() -> absl::Status {
    ++checks;
    return absl::OkStatus();
  };
  ASSERT_TRUE(engine->ComputeGradients(gradient_request).ok());
  EXPECT_EQ(checks, 4);
}

struct BadRequestCase {
  std::string label;
  std::function<void(GradientRequest&)> mutate;
  absl::StatusCode code;
  std::string message;
};

TEST(EngineTest, RejectsBadRequestsAndKeepsWorking) {
  std::unique_ptr<Engine> engine = MakeEngine();
  Fixture3 f;
  std::vector<float> spare = Random(1000, 9);
  const auto kInvalid = absl::StatusCode::kInvalidArgument;
  std::vector<BadRequestCase> cases = {
      {"missing weight", [](GradientRequest& r) { r.parameters.erase("c3.weight"); }, kInvalid,
       "parameters[\"c3.weight\"] is missing: layers[2] (\"c3\") needs a tensor of shape "
       "[4, 5, 2, 2]"},
      {"missing bias", [](GradientRequest& r) { r.parameters.erase("c1.bias"); }, kInvalid,
       "parameters[\"c1.bias\"] is missing"},
      {"wrong weight shape",
       [&](GradientRequest& r) {
         r.parameters["c1.weight"] = TensorView({5, 3, 3, 2}, absl::MakeSpan(spare.data(), 90));
       },
       kInvalid, "parameters[\"c1.weight\"].shape=[5, 3, 3, 2] must be [5, 3, 3, 3]"},
      {"wrong bias shape",
       [&](GradientRequest& r) {
         r.parameters["c1.bias"] = TensorView({6}, absl::MakeSpan(spare.data(), 6));
       },
       kInvalid, "parameters[\"c1.bias\"].shape=[6] must be [5]"},
      {"bias on bias-free layer",
       [&](GradientRequest& r) {
         r.parameters["c3.bias"] = TensorView({4}, absl::MakeSpan(spare.data(), 4));
       },
       kInvalid,
       "parameters[\"c3.bias\"] is given but layers[2] (\"c3\", conv2d) takes \"c3.weight\""},
      {"parameter for activation",
       [&](GradientRequest& r) {
         r.parameters["act.weight"] = TensorView({4}, absl::MakeSpan(spare.data(), 4));
       },
       kInvalid, "layers[1] (\"act\", activation) takes no parameters"},
      {"unknown parameter",
       [&](GradientRequest& r) {
         r.parameters["nope.weight"] = TensorView({4}, absl::MakeSpan(spare.data(), 4));
       },
       kInvalid, "parameters[\"nope.weight\"] is given, but it does not belong to any layer"},
      {"input too short", [&](GradientRequest& r) { r.input.size -= 1; }, kInvalid,
       "input has 377 values but its shape [2, 3, 9, 7] needs 378"},
      {"parameter too long", [&](GradientRequest& r) { r.parameters["c1.bias"].size = 6; },
       kInvalid, "parameters[\"c1.bias\"] has 6 values but its shape [5] needs 5"},
      {"target shape",
       [&](GradientRequest& r) {
         r.objective.tensor.shape = {2, 4, 6, 8};
       },
       kInvalid,
       "objective.mse.target.shape=[2, 4, 6, 8] must equal the network's output shape "
       "[2, 4, 8, 6]"},
      {"grad_output shape",
       [&](GradientRequest& r) {
         r.objective.kind = ObjectiveKind::kGradOutput;
         r.objective.tensor.shape = {1, 4, 8, 6};
       },
       kInvalid, "objective.grad_output.shape=[1, 4, 8, 6]"},
      {"sum with tensor", [&](GradientRequest& r) { r.objective.kind = ObjectiveKind::kSum; },
       kInvalid, "objective.sum takes no tensor"},
      {"unknown objective",
       [&](GradientRequest& r) { r.objective.kind = static_cast<ObjectiveKind>(42); }, kInvalid,
       "objective.kind=42"},
      {"unknown gradient name with all_parameters",
       [&](GradientRequest& r) { r.gradients.parameters = {"c1.wieght"}; }, kInvalid,
       "gradients.parameters[0]=\"c1.wieght\" is not a parameter of the network"},
      {"unknown gradient name",
       [&](GradientRequest& r) {
         r.gradients.all_parameters = false;
         r.gradients.parameters = {"c1.weight", "c2.weight"};
       },
       kInvalid, "gradients.parameters[1]=\"c2.weight\" is not a parameter of the network"},
      {"unknown activation",
       [&](GradientRequest& r) {
         r.network.layers[1].op = ActivationSpec{static_cast<ActivationKind>(99)};
       },
       kInvalid, "layers[1].activation=99 is not a known kind"},
      {"null input data", [&](GradientRequest& r) { r.input.data = nullptr; }, kInvalid,
       "input has no data"},
  };
  for (const BadRequestCase& c : cases) {
    GradientRequest request = f.Request();
    c.mutate(request);
    absl::StatusOr<GradientResult> result = engine->ComputeGradients(request);
    EXPECT_EQ(result.status().code(), c.code) << c.label << ": " << result.status();
    EXPECT_THAT(result.status().message(), HasSubstr(c.message)) << c.label;
  }
  EXPECT_TRUE(engine->ComputeGradients(f.Request()).ok());
}

TEST(EngineTest, TensorsOverTheLimitAreResourceExhausted) {
  EngineOptions options;
  options.max_elements = 300;
  std::unique_ptr<Engine> engine = MakeEngine(options);
  Fixture3 f;
  absl::StatusOr<GradientResult> result = engine->ComputeGradients(f.Request());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(result.status().message(), HasSubstr("input has 378 elements, over the limit"));
}

TEST(EngineTest, LeavesTheCallersOpenMpSettingAlone) {
  EngineOptions options;
  options.threads_per_call = 2;
  std::unique_ptr<Engine> engine = MakeEngine(options);
  omp_set_num_threads(3);
  Fixture3 f;
  ASSERT_TRUE(engine->ComputeGradients(f.Request()).ok());
  EXPECT_EQ(omp_get_max_threads(), 3);
}

TEST(EngineTest, WorkspaceOverTheLimitIsResourceExhausted) {
  EngineOptions options;
  options.max_workspace_bytes = 1000;
  std::unique_ptr<Engine> engine = MakeEngine(options);
  Fixture3 f;
  absl::StatusOr<GradientResult> result = engine->ComputeGradients(f.Request());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(result.status().message(), HasSubstr("bytes of intermediate buffers per call"));
}

std::unique_ptr<MemoryBudget> NewBudget(int64_t limit_bytes) {
  MemoryBudgetOptions options;
  options.limit_bytes = limit_bytes;
  options.max_wait = absl::Milliseconds(200);
  absl::StatusOr<std::unique_ptr<MemoryBudget>> budget = MemoryBudget::Create(options);
  EXPECT_TRUE(budget.ok()) << budget.status();
  return *std::move(budget);
}

TEST(EngineTest, ResultsHoldTheirShareOfTheBudgetUntilFreed) {
  std::unique_ptr<MemoryBudget> budget = NewBudget(int64_t{1} << 30);
  EngineOptions options;
  options.memory_budget = budget.get();
  {
    std::unique_ptr<Engine> engine = MakeEngine(options);
    Fixture3 f;
    std::optional<GradientResult> result;
    {
      absl::StatusOr<GradientResult> computed = engine->ComputeGradients(f.Request());
      ASSERT_TRUE(computed.ok()) << computed.status();
      result = *std::move(computed);
    }
    // The call is over; its results still count, its workspace is now cached.
    int64_t result_bytes = result->output.num_elements() + result->input_grad->num_elements();
    for (const auto& [name, grad] : result->parameter_grads) result_bytes += grad.num_elements();
    result_bytes *= static_cast<int64_t>(sizeof(float));
    EXPECT_EQ(budget->stats().reserved_bytes, result_bytes);
    EXPECT_GT(budget->stats().cached_bytes, 0);
    EXPECT_EQ(budget->stats().cached_bytes, engine->stats().plan_cache_bytes);
    result.reset();
    EXPECT_EQ(budget->stats().reserved_bytes, 0);
  }
  // The engine gave back what it cached.
  EXPECT_EQ(budget->stats().cached_bytes, 0);
}

TEST(EngineTest, ResultsMayOutliveAnEngineWithItsOwnBudget) {
  std::optional<GradientResult> result;
  {
    std::unique_ptr<Engine> engine = MakeEngine();
    Fixture3 f;
    absl::StatusOr<GradientResult> computed = engine->ComputeGradients(f.Request());
    ASSERT_TRUE(computed.ok()) << computed.status();
    result = *std::move(computed);
  }
  EXPECT_GT(result->output.num_elements(), 0);
  result.reset();  // gives its share back to the engine's budget, which it kept alive
}

TEST(EngineTest, ACallLargerThanTheBudgetIsResourceExhaustedAndTheNextOneFits) {
  std::unique_ptr<MemoryBudget> budget = NewBudget(4096);
  EngineOptions options;
  options.memory_budget = budget.get();
  std::unique_ptr<Engine> engine = MakeEngine(options);
  Fixture3 f;
  absl::StatusOr<GradientResult> result = engine->ComputeGradients(f.Request());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(result.status().message(), HasSubstr("more than the whole budget"));
  EXPECT_EQ(budget->stats().reserved_bytes, 0);
  // A network that needs less fits in the same budget.
  std::vector<float> input = Random(16, 3);
  ForwardRequest small;
  small.network.layers = {{"s", ActivationSpec{ActivationKind::kSigmoid}}};
  small.input = TensorView({1, 1, 4, 4}, input);
  EXPECT_TRUE(engine->Forward(small).ok());
}

TEST(EngineTest, CachedWorkspacesGiveWayToACallThatNeedsTheRoom) {
  std::vector<float> input = Random(64 * 64, 5);
  auto request_of_width = [&](int64_t width) {
    ForwardRequest request;
    request.network.layers = {{"s", ActivationSpec{ActivationKind::kSigmoid}},
                              {"t", ActivationSpec{ActivationKind::kTanh}}};
    request.input =
        TensorView({1, 1, 64, width}, absl::MakeConstSpan(input).subspan(0, 64 * width));
    return request;
  };
  // Room for one call's workspace and output, not for a second plan's idle workspace besides.
  std::unique_ptr<Engine> probe = MakeEngine();
  ASSERT_TRUE(probe->Forward(request_of_width(64)).ok());
  const int64_t one_call = probe->stats().plan_cache_bytes + 64 * 64 * 4;
  std::unique_ptr<MemoryBudget> budget = NewBudget(one_call + one_call / 2);
  EngineOptions options;
  options.memory_budget = budget.get();
  std::unique_ptr<Engine> engine = MakeEngine(options);
  for (int64_t width : {64, 63, 64, 62}) {
    absl::StatusOr<ForwardResult> result = engine->Forward(request_of_width(width));
    ASSERT_TRUE(result.ok()) << "width " << width << ": " << result.status();
    EXPECT_LE(budget->stats().peak_bytes, budget->limit_bytes());
  }
  EXPECT_GT(budget->stats().reclaimed_bytes, 0);
  EXPECT_LE(budget->stats().cached_bytes, budget->limit_bytes());
}

TEST(EngineTest, ThePlanCacheStaysWithinItsBytes) {
  EngineOptions options;
  options.max_plan_cache_bytes = 64 << 10;
  std::unique_ptr<Engine> engine = MakeEngine(options);
  std::vector<float> input = Random(32 * 32, 9);
  for (int64_t width = 16; width <= 32; ++width) {
    ForwardRequest request;
    request.network.layers = {{"s", ActivationSpec{ActivationKind::kSigmoid}}};
    request.input =
        TensorView({1, 1, 32, width}, absl::MakeConstSpan(input).subspan(0, 32 * width));
    ASSERT_TRUE(engine->Forward(request).ok());
    EXPECT_LE(engine->stats().plan_cache_bytes, options.max_plan_cache_bytes) << width;
  }
  EXPECT_GT(engine->stats().plans_evicted, 0);
}

TEST(EngineTest, CreateRejectsBadOptions) {
  EngineOptions options;
  options.threads_per_call = -1;
  EXPECT_EQ(Engine::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
  options = {};
  options.max_elements = 0;
  EXPECT_EQ(Engine::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
  options = {};
  options.max_workspace_bytes = 0;
  EXPECT_EQ(Engine::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
  options = {};
  options.max_cached_plans = 0;
  EXPECT_EQ(Engine::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(EngineTest, ReportsVersionAndIsa) {
  std::unique_ptr<Engine> engine = MakeEngine();
  EngineInfo info = engine->info();
  EXPECT_EQ(info.onednn_version, "2.6.3");
  EXPECT_NE(info.cpu_isa, "unknown");
  EXPECT_GE(info.threads_per_call, 1);
}

}  // namespace
}  // namespace gradengine
