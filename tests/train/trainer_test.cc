// gradclient::Trainer against an in-process server: a run stopped after k steps and resumed
// from its checkpoint ends bit for bit where an unbroken run does (parameters, batch_norm2d
// running statistics, optimizer state, epoch losses), for every optimizer kind; checkpoints are
// replaced atomically; a checkpoint of another configuration is refused; evaluation and the
// default initialisation.

#include "gradclient/trainer.h"

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gradclient/client.h"
#include "gradclient/npy.h"
#include "gradclient/optimizer.h"
#include "gradengine/network.h"
#include "gradengine/tensor.h"
#include "gtest/gtest.h"
#include "tests/service/service_test_util.h"

namespace gradclient {
namespace {

namespace fs = std::filesystem;
using gradengine::ParameterTensors;
using gradengine::Tensor;
using gradservicetest::SameTensor;

MATCHER_P2(StatusIs, code, message_part,
           absl::StrCat("has code ", absl::StatusCodeToString(code), " and a message containing \"",
                        message_part, "\"")) {
  const absl::Status status = arg;
  *result_listener << "status is " << status;
  return status.code() == code && status.message().find(message_part) != std::string::npos;
}

constexpr int64_t kClasses = 3;

// conv2d, batch_norm2d in training mode (running statistics come back every step), relu,
// max_pool2d, linear.
gradengine::NetworkSpec Network() {
  gradengine::NetworkSpec network;
  network.layers.emplace_back("conv1", gradengine::Conv2dSpec::Square(1, 3, 3, 1, 1));
  gradengine::BatchNorm2dSpec batch_norm;
  batch_norm.num_features = 3;
  network.layers.emplace_back("bn1", batch_norm);
  network.layers.emplace_back("relu1", gradengine::ActivationSpec{});
  network.layers.emplace_back("pool1", gradengine::MaxPool2dSpec::Square(2));
  network.layers.emplace_back("fc", gradengine::LinearSpec{3 * 3 * 3, kClasses, true});
  return network;
}

// 37 examples: with batches of 8, five per epoch, the last one of 5.
LabeledData Data(uint32_t seed, int64_t examples = 37) {
  std::mt19937 random(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  LabeledData data;
  data.inputs = Tensor::Uninitialized({examples, 1, 6, 6});
  for (float& value : data.inputs.data) value = normal(random);
  data.labels.resize(static_cast<size_t>(examples));
  for (int64_t& label : data.labels) label = static_cast<int64_t>(random() % kClasses);
  return data;
}

class TrainerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    gradserver::ServerOptions options;
    options.threads_per_request = 1;
    server_ = gradservicetest::StartTestServer(options).release();
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  void SetUp() override {
    ASSERT_NE(server_, nullptr);
    absl::StatusOr<std::unique_ptr<Client>> client = Client::Create(server_->target);
    ASSERT_TRUE(client.ok()) << client.status();
    client_ = *std::move(client);
    dir_ = fs::path(::testing::TempDir()) /
           absl::StrCat("trainer_test_", ::testing::UnitTest::GetInstance()->random_seed(), "_",
                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }

  TrainerOptions Options(const OptimizerOptions& optimizer) const {
    TrainerOptions options;
    options.network = Network();
    options.optimizer = optimizer;
    options.batch_size = 8;
    options.epochs = 3;
    options.seed = 5;
    options.checkpoint_dir = (dir_ / "checkpoint").string();
    return options;
  }

  std::unique_ptr<Trainer> MakeTrainer(TrainerOptions options, uint64_t init_seed = 1) {
    absl::StatusOr<std::unique_ptr<Trainer>> trainer = Trainer::Create(
        client_.get(), std::move(options), InitializeParameters(Network(), init_seed), &data_);
    EXPECT_TRUE(trainer.ok()) << trainer.status();
    return trainer.ok() ? *std::move(trainer) : nullptr;
  }

  // Steps until done; the epoch losses reported, by step.
  static std::vector<std::pair<int64_t, double>> RunToEnd(Trainer& trainer) {
    std::vector<std::pair<int64_t, double>> epoch_losses;
    while (!trainer.Done()) {
      absl::StatusOr<StepReport> report = trainer.Step();
      EXPECT_TRUE(report.ok()) << report.status();
      if (!report.ok()) break;
      if (report->epoch_end) epoch_losses.emplace_back(report->step, report->epoch_loss);
    }
    return epoch_losses;
  }

  // An unbroken run against one stopped after `stop_after` steps, checkpointed, and resumed
  // by a new Trainer that starts from other parameters.
  void ExpectResumeIsExact(const OptimizerOptions& optimizer, int64_t stop_after) {
    SCOPED_TRACE(absl::StrCat(OptimizerName(optimizer), ", stopped after ", stop_after));
    std::unique_ptr<Trainer> unbroken = MakeTrainer(Options(optimizer));
    ASSERT_NE(unbroken, nullptr);
    ASSERT_EQ(unbroken->total_steps(), 15);
    const std::vector<std::pair<int64_t, double>> expected_losses = RunToEnd(*unbroken);

    TrainerOptions first_options = Options(optimizer);
    first_options.max_steps = stop_after;
    std::unique_ptr<Trainer> first = MakeTrainer(first_options);
    ASSERT_NE(first, nullptr);
    std::vector<std::pair<int64_t, double>> losses = RunToEnd(*first);
    ASSERT_EQ(first->step(), stop_after);
    ASSERT_TRUE(first->SaveCheckpoint().ok());
    first.reset();

    std::unique_ptr<Trainer> resumed = MakeTrainer(Options(optimizer), /*init_seed=*/99);
    ASSERT_NE(resumed, nullptr);
    ASSERT_TRUE(resumed->RestoreCheckpoint().ok());
    EXPECT_EQ(resumed->step(), stop_after);
    for (const auto& each : RunToEnd(*resumed)) losses.push_back(each);

    EXPECT_EQ(losses, expected_losses);
    ASSERT_EQ(resumed->parameters().size(), unbroken->parameters().size());
    for (const auto& [name, tensor] : unbroken->parameters()) {
      EXPECT_TRUE(SameTensor(name, resumed->parameters().at(name), tensor));
    }
    const ParameterTensors expected_state = unbroken->optimizer().ExportState();
    const ParameterTensors state = resumed->optimizer().ExportState();
    ASSERT_EQ(state.size(), expected_state.size());
    for (const auto& [name, tensor] : expected_state) {
      EXPECT_TRUE(SameTensor(name, state.at(name), tensor));
    }
  }

  inline static gradservicetest::TestServer* server_ = nullptr;
  std::unique_ptr<Client> client_;
  LabeledData data_ = Data(3);
  fs::path dir_;
};

SgdOptions Momentum() {
  SgdOptions sgd;
  sgd.lr = 0.05;
  sgd.momentum = 0.9;
  sgd.weight_decay = 1e-3;
  return sgd;
}

AdamOptions AmsGrad() {
  AdamOptions adam;
  adam.lr = 0.01;
  adam.amsgrad = true;
  return adam;
}

TEST_F(TrainerTest, ResumeIsBitIdenticalMidEpoch) {
  ExpectResumeIsExact(Momentum(), 3);
  ExpectResumeIsExact(AmsGrad(), 7);
  ExpectResumeIsExact(AdamWOptions(), 12);
}

TEST_F(TrainerTest, ResumeIsBitIdenticalAtAnEpochsEnd) {
  ExpectResumeIsExact(AmsGrad(), 5);
  ExpectResumeIsExact(Momentum(), 10);
}

TEST_F(TrainerTest, TrainsAndKeepsRunningStatistics) {
  std::unique_ptr<Trainer> trainer = MakeTrainer(Options(AmsGrad()));
  ASSERT_NE(trainer, nullptr);
  const ParameterTensors start = trainer->parameters();
  double first_loss = 0.0;
  double last_loss = 0.0;
  int64_t steps = 0;
  while (!trainer->Done()) {
    absl::StatusOr<StepReport> report = trainer->Step();
    ASSERT_TRUE(report.ok()) << report.status();
    ++steps;
    EXPECT_EQ(report->step, steps);
    EXPECT_EQ(report->epoch, (steps - 1) / 5);
    EXPECT_EQ(report->batch_size, steps % 5 == 0 ? 5 : 8);  // the last batch holds the rest
    EXPECT_EQ(report->epoch_end, steps % 5 == 0);
    EXPECT_EQ(report->checkpoint_due, steps % 5 == 0);
    if (report->epoch_end && first_loss == 0.0) first_loss = report->epoch_loss;
    if (report->epoch_end) last_loss = report->epoch_loss;
  }
  EXPECT_EQ(steps, 15);
  EXPECT_LT(last_loss, first_loss);
  // The server's running statistics replaced the initial zeros and ones.
  for (const char* name : {"bn1.running_mean", "bn1.running_var", "conv1.weight", "fc.bias"}) {
    EXPECT_NE(trainer->parameters().at(name).data, start.at(name).data) << name;
  }
  ASSERT_TRUE(trainer->SaveCheckpoint().ok());
  absl::StatusOr<NpyArray> saved =
      ReadNpyFile((dir_ / "checkpoint" / "params" / "bn1.running_var.npy").string());
  ASSERT_TRUE(saved.ok()) << saved.status();
  EXPECT_EQ(gradengine::TensorBuffer(saved->data),
            trainer->parameters().at("bn1.running_var").data);
  EXPECT_THAT(trainer->Step().status(),
              StatusIs(absl::StatusCode::kFailedPrecondition, "training is done: 15 of 15"));
}

TEST_F(TrainerTest, CheckpointEveryAndMaxSteps) {
  TrainerOptions options = Options(Momentum());
  options.checkpoint_every = 4;
  options.max_steps = 9;
  std::unique_ptr<Trainer> trainer = MakeTrainer(options);
  ASSERT_NE(trainer, nullptr);
  EXPECT_EQ(trainer->total_steps(), 9);
  std::vector<int64_t> due;
  while (!trainer->Done()) {
    absl::StatusOr<StepReport> report = trainer->Step();
    ASSERT_TRUE(report.ok()) << report.status();
    if (report->checkpoint_due) due.push_back(report->step);
  }
  // Every 4 steps, each epoch's end (5) and the last step (9).
  EXPECT_EQ(due, (std::vector<int64_t>{4, 5, 8, 9}));
}

TEST_F(TrainerTest, CheckpointReplacesTheOldOneAndIgnoresAStaleStagingDirectory) {
  std::unique_ptr<Trainer> trainer = MakeTrainer(Options(AdamWOptions()));
  ASSERT_NE(trainer, nullptr);
  // What a run killed while writing leaves behind.
  fs::create_directories(dir_ / "checkpoint.tmp" / "params");
  std::ofstream(dir_ / "checkpoint.tmp" / "params" / "junk.npy") << "partial";
  ASSERT_TRUE(trainer->Step().ok());
  ASSERT_TRUE(trainer->SaveCheckpoint().ok());
  EXPECT_FALSE(fs::exists(dir_ / "checkpoint.tmp"));
  EXPECT_FALSE(fs::exists(dir_ / "checkpoint" / "params" / "junk.npy"));
  ASSERT_TRUE(trainer->Step().ok());
  ASSERT_TRUE(trainer->SaveCheckpoint().ok());  // over an existing checkpoint
  EXPECT_FALSE(fs::exists(dir_ / "checkpoint.tmp"));

  std::unique_ptr<Trainer> resumed = MakeTrainer(Options(AdamWOptions()), 42);
  ASSERT_NE(resumed, nullptr);
  ASSERT_TRUE(resumed->RestoreCheckpoint().ok());
  EXPECT_EQ(resumed->step(), 2);
  for (const auto& [name, tensor] : trainer->parameters()) {
    EXPECT_TRUE(SameTensor(name, resumed->parameters().at(name), tensor));
  }
}

TEST_F(TrainerTest, RefusesACheckpointOfAnotherConfiguration) {
  std::unique_ptr<Trainer> trainer = MakeTrainer(Options(AmsGrad()));
  ASSERT_NE(trainer, nullptr);
  ASSERT_TRUE(trainer->Step().ok());
  ASSERT_TRUE(trainer->SaveCheckpoint().ok());

  TrainerOptions batch = Options(AmsGrad());
  batch.batch_size = 4;
  EXPECT_THAT(MakeTrainer(batch)->RestoreCheckpoint(),
              StatusIs(absl::StatusCode::kFailedPrecondition, "batch_size=8, not 4"));
  EXPECT_THAT(MakeTrainer(Options(Momentum()))->RestoreCheckpoint(),
              StatusIs(absl::StatusCode::kFailedPrecondition, "optimizer=adam, not sgd"));
  AdamOptions other_lr = AmsGrad();
  other_lr.lr = 0.02;
  EXPECT_THAT(MakeTrainer(Options(other_lr))->RestoreCheckpoint(),
              StatusIs(absl::StatusCode::kFailedPrecondition, "adam.lr=0.01, not 0.02"));
  TrainerOptions seed = Options(AmsGrad());
  seed.seed = 6;
  EXPECT_THAT(MakeTrainer(seed)->RestoreCheckpoint(),
              StatusIs(absl::StatusCode::kFailedPrecondition, "seed=5, not 6"));

  TrainerOptions elsewhere = Options(AmsGrad());
  elsewhere.checkpoint_dir = (dir_ / "nothing_here").string();
  EXPECT_THAT(MakeTrainer(elsewhere)->RestoreCheckpoint(),
              StatusIs(absl::StatusCode::kNotFound, "holds no checkpoint"));
  TrainerOptions none = Options(AmsGrad());
  none.checkpoint_dir.clear();
  EXPECT_THAT(MakeTrainer(none)->RestoreCheckpoint(),
              StatusIs(absl::StatusCode::kFailedPrecondition, "no checkpoint directory"));
  EXPECT_THAT(MakeTrainer(none)->SaveCheckpoint(),
              StatusIs(absl::StatusCode::kFailedPrecondition, "no checkpoint directory"));

  // A damaged checkpoint names the file.
  std::ofstream(dir_ / "checkpoint" / "position.json", std::ios::trunc) << "{\"format\": 1}";
  EXPECT_THAT(MakeTrainer(Options(AmsGrad()))->RestoreCheckpoint(),
              StatusIs(absl::StatusCode::kInvalidArgument, "position.json: field \"config\""));
}

TEST_F(TrainerTest, RefusesACheckpointWhoseStepDisagreesWithItsPosition) {
  std::unique_ptr<Trainer> trainer = MakeTrainer(Options(AmsGrad()));
  ASSERT_NE(trainer, nullptr);
  ASSERT_TRUE(trainer->Step().ok());
  ASSERT_TRUE(trainer->SaveCheckpoint().ok());
  const fs::path position = dir_ / "checkpoint" / "position.json";
  std::string json;
  {
    std::ifstream file(position);
    json.assign(std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>());
  }
  const size_t at = json.find("\"step\":1,");
  ASSERT_NE(at, std::string::npos) << json;
  json.replace(at, 9, "\"step\":2,");
  std::ofstream(position, std::ios::trunc) << json;
  EXPECT_THAT(MakeTrainer(Options(AmsGrad()))->RestoreCheckpoint(),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       "step=2 is not epoch=0 times 5 batches plus batch_in_epoch=1"));
}

TEST_F(TrainerTest, HugeEpochsAndBatchSizeDoNotOverflow) {
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  TrainerOptions options = Options(Momentum());
  options.batch_size = kMax;
  options.epochs = kMax;
  std::unique_ptr<Trainer> whole = MakeTrainer(options);
  ASSERT_NE(whole, nullptr);
  EXPECT_EQ(whole->batches_per_epoch(), 1);
  EXPECT_EQ(whole->total_steps(), kMax);
  absl::StatusOr<StepReport> report = whole->Step();
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->batch_size, 37);  // every example in the one batch
  EXPECT_TRUE(report->epoch_end);

  options.batch_size = 8;
  std::unique_ptr<Trainer> saturated = MakeTrainer(options);
  ASSERT_NE(saturated, nullptr);
  EXPECT_EQ(saturated->batches_per_epoch(), 5);
  EXPECT_EQ(saturated->total_steps(), kMax);  // saturated, not wrapped
  EXPECT_FALSE(saturated->Done());
}

TEST_F(TrainerTest, CreateRefusesBadOptionsAndData) {
  auto create = [&](TrainerOptions options, ParameterTensors parameters, const LabeledData* data) {
    return Trainer::Create(client_.get(), std::move(options), std::move(parameters), data).status();
  };
  const ParameterTensors parameters = InitializeParameters(Network(), 1);
  TrainerOptions batch = Options(AmsGrad());
  batch.batch_size = 0;
  EXPECT_THAT(create(batch, parameters, &data_),
              StatusIs(absl::StatusCode::kInvalidArgument, "batch_size=0 must be >= 1"));
  TrainerOptions shards = Options(AmsGrad());
  shards.shards = kMaxShards + 1;
  EXPECT_THAT(create(shards, parameters, &data_),
              StatusIs(absl::StatusCode::kInvalidArgument, "shards=65 is out of range"));
  shards.shards = 2;  // bn1 is in training mode: its statistics are the whole batch's
  EXPECT_THAT(create(shards, parameters, &data_),
              StatusIs(absl::StatusCode::kInvalidArgument, "shards=2 cannot be used: layers[1]"));
  EXPECT_THAT(create(Options(SgdOptions()), parameters, &data_),
              StatusIs(absl::StatusCode::kInvalidArgument, "sgd.lr is required"));
  ParameterTensors missing = parameters;
  missing.erase("conv1.weight");
  EXPECT_THAT(
      create(Options(AmsGrad()), missing, &data_),
      StatusIs(absl::StatusCode::kInvalidArgument, "parameter \"conv1.weight\" is missing"));
  ParameterTensors misshapen = parameters;
  misshapen["fc.bias"] = Tensor::Zeros({4});
  EXPECT_THAT(create(Options(AmsGrad()), misshapen, &data_),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       "parameter \"fc.bias\" has shape [4]; the network needs [3]"));
  ParameterTensors extra = parameters;
  extra["conv2.weight"] = Tensor::Zeros({1});
  EXPECT_THAT(create(Options(AmsGrad()), extra, &data_),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       "parameter \"conv2.weight\" is not one the network has"));
  LabeledData short_labels = Data(3);
  short_labels.labels.pop_back();
  EXPECT_THAT(create(Options(AmsGrad()), parameters, &short_labels),
              StatusIs(absl::StatusCode::kInvalidArgument, "there are 36 labels for 37"));
  // Running statistics are optional in training mode; absent ones start at 0 and 1.
  ParameterTensors without_stats = parameters;
  without_stats.erase("bn1.running_var");
  absl::StatusOr<std::unique_ptr<Trainer>> trainer =
      Trainer::Create(client_.get(), Options(AmsGrad()), without_stats, &data_);
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  EXPECT_EQ((*trainer)->parameters().at("bn1.running_var").data,
            gradengine::TensorBuffer({1.0f, 1.0f, 1.0f}));
}

TEST_F(TrainerTest, ShardedTrainingOfABatchIndependentNetworkMatchesUnsharded) {
  // Without batch norm, a batch cut into parts gives the same gradients up to float rounding.
  gradengine::NetworkSpec network;
  network.layers.emplace_back("conv1", gradengine::Conv2dSpec::Square(1, 2, 3, 1, 1));
  network.layers.emplace_back("relu1", gradengine::ActivationSpec{});
  network.layers.emplace_back("fc", gradengine::LinearSpec{2 * 6 * 6, kClasses, true});
  TrainerOptions options = Options(Momentum());
  options.network = network;
  options.checkpoint_dir.clear();
  TrainerOptions sharded = options;
  sharded.shards = 3;
  absl::StatusOr<std::unique_ptr<Trainer>> whole =
      Trainer::Create(client_.get(), options, InitializeParameters(network, 1), &data_);
  absl::StatusOr<std::unique_ptr<Trainer>> parts =
      Trainer::Create(client_.get(), sharded, InitializeParameters(network, 1), &data_);
  ASSERT_TRUE(whole.ok() && parts.ok());
  RunToEnd(**whole);
  RunToEnd(**parts);
  for (const auto& [name, tensor] : (*whole)->parameters()) {
    const Tensor& actual = (*parts)->parameters().at(name);
    ASSERT_EQ(actual.shape, tensor.shape);
    for (size_t i = 0; i < tensor.data.size(); ++i) {
      EXPECT_NEAR(actual.data[i], tensor.data[i], 1e-4) << name << "[" << i << "]";
    }
  }
}

TEST_F(TrainerTest, EvaluateScoresLogits) {
  // A linear layer with the identity weight: the logits are the inputs.
  gradengine::NetworkSpec network;
  network.layers.emplace_back("fc", gradengine::LinearSpec{2, 2, true});
  LabeledData test;
  test.inputs = Tensor({3, 1, 1, 2}, std::vector<float>{1, 0, 0, 3, 2, 1});
  test.labels = {0, 1, 1};  // argmaxes 0, 1, 0: two of three right
  ParameterTensors parameters = {{"fc.weight", Tensor({2, 2}, std::vector<float>{1, 0, 0, 1})},
                                 {"fc.bias", Tensor({2}, std::vector<float>{0, 0})}};
  TrainerOptions options = Options(Momentum());
  options.network = network;
  options.batch_size = 2;  // two calls, the second of one row
  absl::StatusOr<std::unique_ptr<Trainer>> trainer =
      Trainer::Create(client_.get(), options, parameters, &test);
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  absl::StatusOr<Evaluation> evaluation = (*trainer)->Evaluate(test);
  ASSERT_TRUE(evaluation.ok()) << evaluation.status();
  EXPECT_EQ(evaluation->examples, 3);
  EXPECT_DOUBLE_EQ(evaluation->accuracy, 2.0 / 3.0);
  const double expected_loss =
      (std::log(std::exp(1.0) + 1.0) - 1.0 + std::log(1.0 + std::exp(3.0)) - 3.0 +
       std::log(std::exp(2.0) + std::exp(1.0)) - 1.0) /
      3.0;
  EXPECT_NEAR(evaluation->loss, expected_loss, 1e-6);

  LabeledData bad_label = test;
  bad_label.labels[2] = 2;
  EXPECT_THAT(
      (*trainer)->Evaluate(bad_label).status(),
      StatusIs(absl::StatusCode::kInvalidArgument, "label 2 of example 2 is outside [0, 2)"));
}

TEST(InitializeParametersTest, FollowsTorchNnDefaults) {
  const ParameterTensors parameters = InitializeParameters(Network(), 1);
  const ParameterTensors again = InitializeParameters(Network(), 1);
  const ParameterTensors other = InitializeParameters(Network(), 2);
  ASSERT_EQ(parameters.size(), 8u);
  // conv1: fan_in 1 * 3 * 3; fc: fan_in 27.
  for (const auto& [name, bound] :
       std::vector<std::pair<std::string, double>>{{"conv1.weight", 1 / 3.0},
                                                   {"conv1.bias", 1 / 3.0},
                                                   {"fc.weight", 1 / std::sqrt(27.0)},
                                                   {"fc.bias", 1 / std::sqrt(27.0)}}) {
    const gradengine::TensorBuffer& values = parameters.at(name).data;
    float low = values[0];
    float high = values[0];
    for (float v : values) {
      EXPECT_LE(std::abs(v), bound) << name;
      low = std::min(low, v);
      high = std::max(high, v);
    }
    EXPECT_LT(low, high) << name;
    EXPECT_EQ(values, again.at(name).data) << name;
    EXPECT_NE(values, other.at(name).data) << name;
  }
  // A large tensor fills its range: U(-b, b) has mean 0 and variance b^2 / 3.
  gradengine::NetworkSpec wide;
  wide.layers.emplace_back("fc", gradengine::LinearSpec{100, 200, true});
  const ParameterTensors wide_parameters = InitializeParameters(wide, 3);
  const gradengine::TensorBuffer& fc = wide_parameters.at("fc.weight").data;
  double sum = 0, sum_squares = 0;
  for (float v : fc) {
    sum += v;
    sum_squares += static_cast<double>(v) * v;
  }
  const double n = static_cast<double>(fc.size());
  EXPECT_NEAR(sum / n, 0.0, 0.003);
  EXPECT_NEAR(sum_squares / n, 0.01 / 3, 0.0003);
  EXPECT_EQ(parameters.at("bn1.weight").data, gradengine::TensorBuffer({1, 1, 1}));
  EXPECT_EQ(parameters.at("bn1.bias").data, gradengine::TensorBuffer({0, 0, 0}));
  EXPECT_EQ(parameters.at("bn1.running_mean").data, gradengine::TensorBuffer({0, 0, 0}));
  EXPECT_EQ(parameters.at("bn1.running_var").data, gradengine::TensorBuffer({1, 1, 1}));
}

}  // namespace
}  // namespace gradclient
