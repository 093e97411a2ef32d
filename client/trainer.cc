#include "gradclient/trainer.h"

#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <system_error>
#include <utility>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/sharding.h"
#include "google/protobuf/struct.pb.h"
#include "google/protobuf/util/json_util.h"
#include "gradclient/client.h"
#include "gradclient/npy.h"
#include "gradclient/optimizer.h"
#include "gradengine/network.h"
#include "gradengine/overloaded.h"
#include "gradengine/tensor.h"

namespace gradclient {
namespace {

namespace fs = std::filesystem;
using gradengine::ParameterTensors;
using gradengine::Tensor;

using gradengine::Overloaded;

// The checkpoint's files (see trainer.h).
constexpr char kPositionFile[] = "position.json";
constexpr char kParamsDir[] = "params";
constexpr char kOptimizerDir[] = "optimizer";
constexpr char kNpySuffix[] = ".npy";
// Bumped when the layout changes, so that an old checkpoint is refused rather than misread.
constexpr int kCheckpointFormat = 1;

// SplitMix64 (Steele, Lea, Flood 2014): a small generator whose output is the same on every
// platform, unlike the distributions of <random>, so that a seed means the same permutation and
// the same initial parameters everywhere.
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t Next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  // Uniform in [0, bound), bound >= 1, without modulo bias (rejection).
  uint64_t Below(uint64_t bound) {
    const uint64_t limit =
        std::numeric_limits<uint64_t>::max() - std::numeric_limits<uint64_t>::max() % bound;
    uint64_t value;
    do {
      value = Next();
    } while (value >= limit);
    return value % bound;
  }
  // Uniform in [0, 1) with 24 random bits, every value a float.
  float Unit() { return static_cast<float>(Next() >> 40) * 0x1.0p-24f; }

 private:
  uint64_t state_;
};

// Mixes the run's seed with a stream number (an epoch, a parameter), so that streams differ.
uint64_t StreamSeed(uint64_t seed, uint64_t stream) {
  SplitMix64 mix(seed ^ (stream * 0xd1b54a32d192ed03ULL));
  return mix.Next();
}

absl::Status ErrnoStatus(const std::string& what, int error) {
  return absl::Status(absl::ErrnoToStatusCode(error),
                      absl::StrCat(what, ": ", std::generic_category().message(error)));
}

// A parameter or state name as a file name, kept inside its directory.
absl::StatusOr<std::string> NpyFileName(const std::string& name) {
  if (name.empty() || name.find('/') != std::string::npos || name[0] == '.') {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor name \"", name, "\" cannot be a checkpoint file name"));
  }
  return name + kNpySuffix;
}

absl::StatusOr<Tensor> ReadTensor(const fs::path& path) {
  absl::StatusOr<NpyArray> array = ReadNpyFile(path.string());
  if (!array.ok()) return array.status();
  return Tensor(std::move(array->shape), std::move(array->data));
}

// Every <name>.npy in `dir`, by name.
absl::StatusOr<ParameterTensors> ReadAllTensors(const fs::path& dir) {
  ParameterTensors tensors;
  std::error_code error;
  fs::directory_iterator it(dir, error);
  if (error) return ErrnoStatus(absl::StrCat("cannot list ", dir.string()), error.value());
  for (const fs::directory_entry& entry : it) {
    const std::string file = entry.path().filename().string();
    if (!absl::EndsWith(file, kNpySuffix)) continue;
    absl::StatusOr<Tensor> tensor = ReadTensor(entry.path());
    if (!tensor.ok()) return tensor.status();
    tensors[file.substr(0, file.size() - std::strlen(kNpySuffix))] = *std::move(tensor);
  }
  return tensors;
}

absl::Status WriteTextFile(const fs::path& path, const std::string& text) {
  std::ofstream file(path, std::ios::binary | std::ios::trunc);
  if (!file) return ErrnoStatus(absl::StrCat("cannot create ", path.string()), errno);
  file << text;
  file.close();
  if (!file) return ErrnoStatus(absl::StrCat("cannot write ", path.string()), errno);
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReadTextFile(const fs::path& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) return ErrnoStatus(absl::StrCat("cannot open ", path.string()), errno);
  std::ostringstream text;
  text << file.rdbuf();
  if (file.bad()) return absl::DataLossError(absl::StrCat("cannot read ", path.string()));
  return text.str();
}

// A JSON number that reads back to the same double (NaN and infinities as protobuf's JSON
// mapping writes them).
std::string JsonDouble(double value) {
  if (std::isnan(value)) return "\"NaN\"";
  if (std::isinf(value)) return value > 0 ? "\"Infinity\"" : "\"-Infinity\"";
  return absl::StrFormat("%.17g", value);
}

// The hyperparameters of `options` by name, as position.json records them.
std::vector<std::pair<std::string, double>> Hyperparameters(const OptimizerOptions& options) {
  return std::visit(Overloaded{
                        [](const SgdOptions& sgd) {
                          return std::vector<std::pair<std::string, double>>{
                              {"lr", sgd.lr.value_or(0.0)},
                              {"momentum", sgd.momentum},
                              {"dampening", sgd.dampening},
                              {"weight_decay", sgd.weight_decay},
                              {"nesterov", sgd.nesterov ? 1.0 : 0.0}};
                        },
                        [](const auto& adam) {
                          return std::vector<std::pair<std::string, double>>{
                              {"lr", adam.lr},
                              {"beta1", adam.beta1},
                              {"beta2", adam.beta2},
                              {"eps", adam.eps},
                              {"weight_decay", adam.weight_decay},
                              {"amsgrad", adam.amsgrad ? 1.0 : 0.0}};
                        },
                    },
                    options);
}

// Reads position.json's fields, each error naming the file and the field.
class PositionReader {
 public:
  static absl::StatusOr<PositionReader> Parse(const std::string& json, const std::string& path) {
    PositionReader reader;
    reader.path_ = path;
    google::protobuf::util::JsonParseOptions options;
    const auto parsed = google::protobuf::util::JsonStringToMessage(json, &reader.root_, options);
    if (!parsed.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": not a checkpoint position: ", std::string(parsed.message())));
    }
    return reader;
  }

  absl::StatusOr<const google::protobuf::Value*> Field(const google::protobuf::Struct& object,
                                                       const std::string& key) const {
    auto it = object.fields().find(key);
    if (it == object.fields().end()) {
      return absl::InvalidArgumentError(absl::StrCat(path_, ": field \"", key, "\" is missing"));
    }
    return &it->second;
  }

  absl::StatusOr<double> Number(const google::protobuf::Struct& object,
                                const std::string& key) const {
    absl::StatusOr<const google::protobuf::Value*> value = Field(object, key);
    if (!value.ok()) return value.status();
    if ((*value)->kind_case() == google::protobuf::Value::kNumberValue) {
      return (*value)->number_value();
    }
    if ((*value)->kind_case() == google::protobuf::Value::kStringValue) {
      const std::string& text = (*value)->string_value();
      if (text == "NaN") return std::numeric_limits<double>::quiet_NaN();
      if (text == "Infinity") return std::numeric_limits<double>::infinity();
      if (text == "-Infinity") return -std::numeric_limits<double>::infinity();
    }
    return absl::InvalidArgumentError(absl::StrCat(path_, ": field \"", key, "\" is not a number"));
  }

  // A whole number in [0, 2^53].
  absl::StatusOr<int64_t> Count(const google::protobuf::Struct& object,
                                const std::string& key) const {
    absl::StatusOr<double> number = Number(object, key);
    if (!number.ok()) return number.status();
    if (!(*number >= 0) || *number > 0x1.0p53 || std::floor(*number) != *number) {
      return absl::InvalidArgumentError(
          absl::StrCat(path_, ": field \"", key, "\"=", *number, " is not a whole number >= 0"));
    }
    return static_cast<int64_t>(*number);
  }

  absl::StatusOr<std::string> String(const google::protobuf::Struct& object,
                                     const std::string& key) const {
    absl::StatusOr<const google::protobuf::Value*> value = Field(object, key);
    if (!value.ok()) return value.status();
    if ((*value)->kind_case() != google::protobuf::Value::kStringValue) {
      return absl::InvalidArgumentError(
          absl::StrCat(path_, ": field \"", key, "\" is not a string"));
    }
    return (*value)->string_value();
  }

  absl::StatusOr<const google::protobuf::Struct*> Object(const google::protobuf::Struct& object,
                                                         const std::string& key) const {
    absl::StatusOr<const google::protobuf::Value*> value = Field(object, key);
    if (!value.ok()) return value.status();
    if ((*value)->kind_case() != google::protobuf::Value::kStructValue) {
      return absl::InvalidArgumentError(
          absl::StrCat(path_, ": field \"", key, "\" is not an object"));
    }
    return &(*value)->struct_value();
  }

  // A permutation of 0..size-1.
  absl::StatusOr<std::vector<int64_t>> Permutation(const google::protobuf::Struct& object,
                                                   const std::string& key, int64_t size) const {
    absl::StatusOr<const google::protobuf::Value*> value = Field(object, key);
    if (!value.ok()) return value.status();
    const auto& values = (*value)->list_value().values();
    if ((*value)->kind_case() != google::protobuf::Value::kListValue ||
        values.size() != static_cast<int>(size)) {
      return absl::InvalidArgumentError(
          absl::StrCat(path_, ": field \"", key, "\" is not a list of ", size, " indices"));
    }
    std::vector<int64_t> permutation;
    std::vector<bool> seen(static_cast<size_t>(size), false);
    for (const google::protobuf::Value& each : values) {
      const double index = each.number_value();
      if (each.kind_case() != google::protobuf::Value::kNumberValue || !(index >= 0) ||
          index >= static_cast<double>(size) || std::floor(index) != index ||
          seen[static_cast<size_t>(index)]) {
        return absl::InvalidArgumentError(
            absl::StrCat(path_, ": field \"", key, "\" is not a permutation of 0..", size - 1));
      }
      seen[static_cast<size_t>(index)] = true;
      permutation.push_back(static_cast<int64_t>(index));
    }
    return permutation;
  }

  const google::protobuf::Struct& root() const { return root_; }

 private:
  std::string path_;
  google::protobuf::Struct root_;
};

// The mean cross-entropy of logits [rows, classes] against `labels`, and how many rows' argmax
// (the first maximum, as torch.argmax) is the label; accumulated in double.
struct LossAndHits {
  double loss_sum = 0.0;
  int64_t hits = 0;
};

// `first` is the index of the logits' first row in the data set, for messages.
absl::StatusOr<LossAndHits> ScoreLogits(const Tensor& logits, const int64_t* labels, int64_t rows,
                                        int64_t first) {
  if (logits.shape.size() != 2 || logits.shape[0] != rows) {
    return absl::InvalidArgumentError(
        absl::StrCat("the network's output has shape ", gradengine::ShapeToString(logits.shape),
                     "; evaluating needs logits [", rows, ", classes]"));
  }
  const int64_t classes = logits.shape[1];
  LossAndHits score;
  for (int64_t row = 0; row < rows; ++row) {
    const float* values = logits.data.data() + row * classes;
    const int64_t label = labels[row];
    if (label < 0 || label >= classes) {
      return absl::InvalidArgumentError(absl::StrCat("label ", label, " of example ", first + row,
                                                     " is outside [0, ", classes, ")"));
    }
    int64_t best = 0;
    for (int64_t c = 1; c < classes; ++c) {
      if (values[c] > values[best]) best = c;
    }
    const double max_value = values[best];
    double sum = 0.0;
    for (int64_t c = 0; c < classes; ++c) sum += std::exp(values[c] - max_value);
    score.loss_sum += max_value + std::log(sum) - values[label];
    if (best == label) ++score.hits;
  }
  return score;
}

}  // namespace

absl::Status WriteTensorFiles(const std::string& dir, const ParameterTensors& tensors) {
  std::error_code error;
  fs::create_directories(dir, error);
  if (error) return ErrnoStatus(absl::StrCat("cannot create ", dir), error.value());
  for (const auto& [name, tensor] : tensors) {
    absl::StatusOr<std::string> file = NpyFileName(name);
    if (!file.ok()) return file.status();
    const std::string path = (fs::path(dir) / *file).string();
    if (absl::Status s = WriteNpyFile(path, tensor.shape, tensor.data); !s.ok()) return s;
  }
  return absl::OkStatus();
}

ParameterTensors InitializeParameters(const gradengine::NetworkSpec& network, uint64_t seed) {
  ParameterTensors parameters;
  uint64_t stream = 0;
  for (const gradengine::LayerSpec& layer : network.layers) {
    // torch.nn's reset_parameters: conv and linear weights kaiming_uniform_(a=sqrt(5)), i.e.
    // U(-b, b) with b = gain * sqrt(3 / fan_in), gain = sqrt(2 / (1 + 5)), which is
    // 1 / sqrt(fan_in); biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)). fan_in is 0 for layers
    // without such parameters.
    const double fan_in = std::visit(
        Overloaded{
            [](const gradengine::Conv2dSpec& conv) {
              return static_cast<double>(conv.in_channels / std::max<int64_t>(conv.groups, 1) *
                                         conv.kernel_h * conv.kernel_w);
            },
            [](const gradengine::LinearSpec& linear) {
              return static_cast<double>(linear.in_features);
            },
            [](const auto&) { return 0.0; },
        },
        layer.op);
    for (const gradengine::ParameterInfo& info : gradengine::LayerParameters(layer)) {
      Tensor tensor = Tensor::Zeros(info.shape);
      if (fan_in > 0 && info.trainable) {
        const float bound = static_cast<float>(1.0 / std::sqrt(fan_in));
        SplitMix64 random(StreamSeed(seed, stream));
        for (float& value : tensor.data) value = (2.0f * random.Unit() - 1.0f) * bound;
      } else if (info.trainable) {
        // batch_norm2d's affine parameters: weight ones, bias zeros (reset_parameters).
        std::fill(tensor.data.begin(), tensor.data.end(),
                  info.name == layer.name + ".weight" ? 1.0f : 0.0f);
      } else {
        // Buffers start at the value an absent one takes (running_mean 0, running_var 1).
        std::fill(tensor.data.begin(), tensor.data.end(), info.fill);
      }
      ++stream;
      parameters[info.name] = std::move(tensor);
    }
  }
  return parameters;
}

absl::StatusOr<std::unique_ptr<Trainer>> Trainer::Create(Client* client, TrainerOptions options,
                                                         ParameterTensors parameters,
                                                         const LabeledData* train) {
  if (client == nullptr || train == nullptr) {
    return absl::InvalidArgumentError("Trainer::Create needs a client and training data");
  }
  if (options.batch_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("batch_size=", options.batch_size, " must be >= 1"));
  }
  if (options.epochs < 1) {
    return absl::InvalidArgumentError(absl::StrCat("epochs=", options.epochs, " must be >= 1"));
  }
  if (options.max_steps < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_steps=", options.max_steps, " must be >= 0 (0: no limit)"));
  }
  if (options.checkpoint_every < 0) {
    return absl::InvalidArgumentError(absl::StrCat("checkpoint_every=", options.checkpoint_every,
                                                   " must be >= 0 (0: epoch ends only)"));
  }
  if (options.shards < 1 || options.shards > kMaxShards) {
    return absl::InvalidArgumentError(
        absl::StrCat("shards=", options.shards, " is out of range 1..", kMaxShards));
  }
  // Refused here rather than at the first step: a batch_norm2d in training mode cannot shard.
  if (absl::Status s = CheckRowsIndependent(options.network, options.shards); !s.ok()) return s;
  const std::vector<int64_t>& input_shape = train->inputs.shape;
  const int64_t rows = input_shape.empty() ? 0 : input_shape[0];
  if (input_shape.size() < 2 || rows < 1) {
    return absl::InvalidArgumentError(absl::StrCat("the training inputs have shape ",
                                                   gradengine::ShapeToString(input_shape),
                                                   "; expected [examples >= 1, ...]"));
  }
  if (static_cast<int64_t>(train->labels.size()) != rows) {
    return absl::InvalidArgumentError(
        absl::StrCat("there are ", train->labels.size(), " labels for ", rows, " training inputs"));
  }
  std::vector<std::string> trainable;
  std::set<std::string> known;
  for (const gradengine::LayerSpec& layer : options.network.layers) {
    for (const gradengine::ParameterInfo& info : gradengine::LayerParameters(layer)) {
      known.insert(info.name);
      if (info.trainable) trainable.push_back(info.name);
      auto it = parameters.find(info.name);
      if (it == parameters.end()) {
        if (info.required) {
          return absl::InvalidArgumentError(
              absl::StrCat("parameter \"", info.name, "\" is missing"));
        }
        // Kept from the start, so that the running statistics are trained and checkpointed.
        Tensor buffer = Tensor::Zeros(info.shape);
        std::fill(buffer.data.begin(), buffer.data.end(), info.fill);
        parameters[info.name] = std::move(buffer);
        continue;
      }
      if (it->second.shape != info.shape) {
        return absl::InvalidArgumentError(absl::StrCat(
            "parameter \"", info.name, "\" has shape ", gradengine::ShapeToString(it->second.shape),
            "; the network needs ", gradengine::ShapeToString(info.shape)));
      }
    }
  }
  if (parameters.size() != known.size()) {
    for (const auto& [name, tensor] : parameters) {
      if (known.count(name) == 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("parameter \"", name, "\" is not one the network has"));
      }
    }
  }
  absl::StatusOr<std::unique_ptr<Optimizer>> optimizer = Optimizer::Create(options.optimizer);
  if (!optimizer.ok()) return optimizer.status();
  std::unique_ptr<Trainer> trainer(
      new Trainer(client, std::move(options), std::move(parameters), train, *std::move(optimizer)));
  trainer->trainable_ = std::move(trainable);
  trainer->StartEpoch();
  return trainer;
}

Trainer::Trainer(Client* client, TrainerOptions options, ParameterTensors parameters,
                 const LabeledData* train, std::unique_ptr<Optimizer> optimizer)
    : client_(client),
      options_(std::move(options)),
      parameters_(std::move(parameters)),
      train_(train),
      optimizer_(std::move(optimizer)) {}

Trainer::~Trainer() = default;

int64_t Trainer::batches_per_epoch() const {
  // Not (examples + batch_size - 1) / batch_size, which overflows for a batch_size near 2^63.
  return examples() / options_.batch_size + (examples() % options_.batch_size != 0 ? 1 : 0);
}

int64_t Trainer::total_steps() const {
  // epochs * batches_per_epoch, saturated at the int64 maximum rather than overflowing.
  const int64_t batches = batches_per_epoch();
  const int64_t all = options_.epochs > std::numeric_limits<int64_t>::max() / batches
                          ? std::numeric_limits<int64_t>::max()
                          : options_.epochs * batches;
  return options_.max_steps > 0 ? std::min(all, options_.max_steps) : all;
}

bool Trainer::Done() const { return step_ >= total_steps(); }

void Trainer::StartEpoch() {
  permutation_.resize(static_cast<size_t>(examples()));
  for (int64_t i = 0; i < examples(); ++i) permutation_[static_cast<size_t>(i)] = i;
  if (options_.shuffle) {
    // Fisher-Yates with the epoch's own stream.
    SplitMix64 random(StreamSeed(options_.seed, static_cast<uint64_t>(epoch_)));
    for (size_t i = permutation_.size() - 1; i > 0; --i) {
      std::swap(permutation_[i], permutation_[random.Below(i + 1)]);
    }
  }
  batch_in_epoch_ = 0;
  epoch_loss_sum_ = 0.0;
  epoch_examples_ = 0;
}

absl::StatusOr<StepReport> Trainer::Step() {
  if (Done()) {
    return absl::FailedPreconditionError(
        absl::StrCat("training is done: ", step_, " of ", total_steps(), " steps taken"));
  }
  const absl::Time start = absl::Now();
  const int64_t first = batch_in_epoch_ * options_.batch_size;
  const int64_t rows = std::min(options_.batch_size, examples() - first);
  const int64_t row_size = train_->inputs.num_elements() / examples();

  std::vector<int64_t> shape = train_->inputs.shape;
  shape[0] = rows;
  Tensor input = Tensor::Uninitialized(shape);
  std::vector<int64_t> labels(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t example = permutation_[static_cast<size_t>(first + r)];
    std::copy_n(train_->inputs.data.data() + example * row_size, row_size,
                input.data.data() + r * row_size);
    labels[static_cast<size_t>(r)] = train_->labels[static_cast<size_t>(example)];
  }

  gradengine::GradientRequest request;
  request.network = options_.network;
  for (const auto& [name, tensor] : parameters_) request.parameters[name] = tensor.view();
  request.input = input.view();
  request.objective.kind = gradengine::ObjectiveKind::kCrossEntropy;
  request.objective.labels = {{rows}, labels.data(), rows};
  request.gradients.input = false;
  request.gradients.all_parameters = false;
  request.gradients.parameters = trainable_;
  CallOptions call;
  call.skip_output = true;
  call.shards = options_.shards;
  absl::StatusOr<GradientReply> reply = client_->ComputeGradients(request, call);
  if (!reply.ok()) return reply.status();
  if (!reply->result.loss.has_value()) {
    return absl::InternalError("the server's cross-entropy reply holds no loss");
  }
  // Checked before anything changes, so that a failed step updates nothing.
  for (const auto& [name, tensor] : reply->result.running_stats) {
    auto it = parameters_.find(name);
    if (it == parameters_.end() || it->second.shape != tensor.shape) {
      return absl::InternalError(absl::StrCat(
          "the server returned running statistics \"", name, "\" with shape ",
          gradengine::ShapeToString(tensor.shape), ", which the network does not have"));
    }
  }
  if (absl::Status s = optimizer_->Step(reply->result.parameter_grads, &parameters_); !s.ok()) {
    return s;
  }
  for (auto& [name, tensor] : reply->result.running_stats) parameters_[name] = std::move(tensor);

  StepReport report;
  report.epoch = epoch_;
  report.step = ++step_;
  report.loss = *reply->result.loss;
  report.batch_size = rows;
  epoch_loss_sum_ += report.loss * static_cast<double>(rows);
  epoch_examples_ += rows;
  ++batch_in_epoch_;
  if (batch_in_epoch_ == batches_per_epoch()) {
    report.epoch_end = true;
    report.epoch_loss = epoch_loss_sum_ / static_cast<double>(epoch_examples_);
    ++epoch_;
    StartEpoch();
  }
  report.checkpoint_due = report.epoch_end || Done() ||
                          (options_.checkpoint_every > 0 && step_ % options_.checkpoint_every == 0);
  report.duration = absl::Now() - start;
  elapsed_ += report.duration;
  report.elapsed = elapsed_;
  return report;
}

std::string Trainer::PositionJson() const {
  std::vector<std::string> hyperparameters;
  for (const auto& [name, value] : Hyperparameters(options_.optimizer)) {
    hyperparameters.push_back(absl::StrCat("\"", name, "\":", JsonDouble(value)));
  }
  return absl::StrCat("{\"format\":", kCheckpointFormat, ",\n\"config\":{\"optimizer\":\"",
                      OptimizerName(options_.optimizer), "\",\"hyperparameters\":{",
                      absl::StrJoin(hyperparameters, ","), "},\"batch_size\":", options_.batch_size,
                      ",\"shuffle\":", options_.shuffle ? "true" : "false", ",\"seed\":\"",
                      options_.seed, "\",\"examples\":", examples(), "},\n\"epoch\":", epoch_,
                      ",\"batch_in_epoch\":", batch_in_epoch_, ",\"step\":", step_,
                      ",\"epoch_loss_sum\":", JsonDouble(epoch_loss_sum_),
                      ",\"epoch_examples\":", epoch_examples_,
                      ",\"elapsed_s\":", JsonDouble(absl::ToDoubleSeconds(elapsed_)),
                      ",\n\"permutation\":[", absl::StrJoin(permutation_, ","), "]}\n");
}

absl::Status Trainer::SaveCheckpoint() {
  if (options_.checkpoint_dir.empty()) {
    return absl::FailedPreconditionError("no checkpoint directory was given");
  }
  fs::path dir = fs::path(options_.checkpoint_dir).lexically_normal();
  // Without a trailing separator, so that the staging directory is its sibling.
  if (!dir.has_filename()) dir = dir.parent_path();
  const fs::path staging = fs::path(dir.string() + ".tmp");
  std::error_code error;
  // A staging directory left by a run killed mid-write (or the previous checkpoint, after the
  // exchange below) is stale.
  fs::remove_all(staging, error);
  if (error) return ErrnoStatus(absl::StrCat("cannot remove ", staging.string()), error.value());
  if (absl::Status s = WriteTensorFiles((staging / kParamsDir).string(), parameters_); !s.ok()) {
    return s;
  }
  if (absl::Status s =
          WriteTensorFiles((staging / kOptimizerDir).string(), optimizer_->ExportState());
      !s.ok()) {
    return s;
  }
  if (absl::Status s = WriteTextFile(staging / kPositionFile, PositionJson()); !s.ok()) return s;

  // The new checkpoint takes the old one's place in one step: a plain rename cannot replace a
  // non-empty directory, an exchange can.
  if (fs::exists(dir, error)) {
    if (renameat2(AT_FDCWD, staging.c_str(), AT_FDCWD, dir.c_str(), RENAME_EXCHANGE) != 0) {
      return ErrnoStatus(absl::StrCat("cannot exchange ", staging.string(), " and ", dir.string()),
                         errno);
    }
    fs::remove_all(staging, error);
    if (error) return ErrnoStatus(absl::StrCat("cannot remove ", staging.string()), error.value());
    return absl::OkStatus();
  }
  if (std::rename(staging.c_str(), dir.c_str()) != 0) {
    return ErrnoStatus(absl::StrCat("cannot rename ", staging.string(), " to ", dir.string()),
                       errno);
  }
  return absl::OkStatus();
}

absl::Status Trainer::RestoreCheckpoint() {
  if (options_.checkpoint_dir.empty()) {
    return absl::FailedPreconditionError("no checkpoint directory was given to resume from");
  }
  const fs::path dir(options_.checkpoint_dir);
  const fs::path position_path = dir / kPositionFile;
  std::error_code error;
  if (!fs::exists(position_path, error)) {
    return absl::NotFoundError(
        absl::StrCat(dir.string(), " holds no checkpoint (no ", kPositionFile, ")"));
  }
  absl::StatusOr<std::string> json = ReadTextFile(position_path);
  if (!json.ok()) return json.status();
  absl::StatusOr<PositionReader> reader = PositionReader::Parse(*json, position_path.string());
  if (!reader.ok()) return reader.status();
  const google::protobuf::Struct& root = reader->root();

  absl::StatusOr<int64_t> format = reader->Count(root, "format");
  if (!format.ok()) return format.status();
  if (*format != kCheckpointFormat) {
    return absl::FailedPreconditionError(absl::StrCat(position_path.string(), ": format ", *format,
                                                      " is not this version's ",
                                                      kCheckpointFormat));
  }
  // The configuration the position only makes sense with.
  absl::StatusOr<const google::protobuf::Struct*> config = reader->Object(root, "config");
  if (!config.ok()) return config.status();
  auto mismatch = [&](absl::string_view what, const std::string& was, const std::string& now) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the checkpoint in ", dir.string(), " was written with ", what, "=", was, ", not ", now));
  };
  absl::StatusOr<std::string> optimizer = reader->String(**config, "optimizer");
  if (!optimizer.ok()) return optimizer.status();
  if (*optimizer != OptimizerName(options_.optimizer)) {
    return mismatch("optimizer", *optimizer, OptimizerName(options_.optimizer));
  }
  absl::StatusOr<const google::protobuf::Struct*> hyperparameters =
      reader->Object(**config, "hyperparameters");
  if (!hyperparameters.ok()) return hyperparameters.status();
  for (const auto& [name, value] : Hyperparameters(options_.optimizer)) {
    absl::StatusOr<double> was = reader->Number(**hyperparameters, name);
    if (!was.ok()) return was.status();
    if (!(*was == value)) {
      return mismatch(absl::StrCat(*optimizer, ".", name), absl::StrCat(*was), absl::StrCat(value));
    }
  }
  absl::StatusOr<int64_t> batch_size = reader->Count(**config, "batch_size");
  if (!batch_size.ok()) return batch_size.status();
  if (*batch_size != options_.batch_size) {
    return mismatch("batch_size", absl::StrCat(*batch_size), absl::StrCat(options_.batch_size));
  }
  absl::StatusOr<const google::protobuf::Value*> shuffle = reader->Field(**config, "shuffle");
  if (!shuffle.ok()) return shuffle.status();
  if ((*shuffle)->bool_value() != options_.shuffle) {
    return mismatch("shuffle", (*shuffle)->bool_value() ? "true" : "false",
                    options_.shuffle ? "true" : "false");
  }
  absl::StatusOr<std::string> seed = reader->String(**config, "seed");
  if (!seed.ok()) return seed.status();
  if (*seed != absl::StrCat(options_.seed)) {
    return mismatch("seed", *seed, absl::StrCat(options_.seed));
  }
  absl::StatusOr<int64_t> examples_was = reader->Count(**config, "examples");
  if (!examples_was.ok()) return examples_was.status();
  if (*examples_was != examples()) {
    return mismatch("examples", absl::StrCat(*examples_was), absl::StrCat(examples()));
  }

  absl::StatusOr<int64_t> epoch = reader->Count(root, "epoch");
  if (!epoch.ok()) return epoch.status();
  absl::StatusOr<int64_t> batch_in_epoch = reader->Count(root, "batch_in_epoch");
  if (!batch_in_epoch.ok()) return batch_in_epoch.status();
  if (*batch_in_epoch >= batches_per_epoch()) {
    return absl::InvalidArgumentError(
        absl::StrCat(position_path.string(), ": batch_in_epoch=", *batch_in_epoch,
                     " is past the epoch's ", batches_per_epoch(), " batches"));
  }
  absl::StatusOr<int64_t> step = reader->Count(root, "step");
  if (!step.ok()) return step.status();
  // Every epoch has the same number of batches, one step each.
  if (*epoch > (std::numeric_limits<int64_t>::max() - *batch_in_epoch) / batches_per_epoch() ||
      *step != *epoch * batches_per_epoch() + *batch_in_epoch) {
    return absl::InvalidArgumentError(
        absl::StrCat(position_path.string(), ": step=", *step, " is not epoch=", *epoch, " times ",
                     batches_per_epoch(), " batches plus batch_in_epoch=", *batch_in_epoch));
  }
  absl::StatusOr<double> loss_sum = reader->Number(root, "epoch_loss_sum");
  if (!loss_sum.ok()) return loss_sum.status();
  absl::StatusOr<int64_t> epoch_examples = reader->Count(root, "epoch_examples");
  if (!epoch_examples.ok()) return epoch_examples.status();
  absl::StatusOr<double> elapsed = reader->Number(root, "elapsed_s");
  if (!elapsed.ok()) return elapsed.status();
  absl::StatusOr<std::vector<int64_t>> permutation =
      reader->Permutation(root, "permutation", examples());
  if (!permutation.ok()) return permutation.status();

  // The tensors: every parameter the network has, with its shape, and the optimizer's state.
  ParameterTensors parameters;
  for (const gradengine::LayerSpec& layer : options_.network.layers) {
    for (const gradengine::ParameterInfo& info : gradengine::LayerParameters(layer)) {
      absl::StatusOr<std::string> file = NpyFileName(info.name);
      if (!file.ok()) return file.status();
      absl::StatusOr<Tensor> tensor = ReadTensor(dir / kParamsDir / *file);
      if (!tensor.ok()) return tensor.status();
      if (tensor->shape != info.shape) {
        return absl::InvalidArgumentError(
            absl::StrCat((dir / kParamsDir / *file).string(), ": shape ",
                         gradengine::ShapeToString(tensor->shape), ", but the network's ",
                         info.name, " has shape ", gradengine::ShapeToString(info.shape)));
      }
      parameters[info.name] = *std::move(tensor);
    }
  }
  absl::StatusOr<ParameterTensors> state = ReadAllTensors(dir / kOptimizerDir);
  if (!state.ok()) return state.status();
  if (absl::Status s = optimizer_->ImportState(*state); !s.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat((dir / kOptimizerDir).string(), ": ", s.message()));
  }

  parameters_ = std::move(parameters);
  epoch_ = *epoch;
  batch_in_epoch_ = *batch_in_epoch;
  step_ = *step;
  epoch_loss_sum_ = *loss_sum;
  epoch_examples_ = *epoch_examples;
  elapsed_ = absl::Seconds(*elapsed);
  permutation_ = *std::move(permutation);
  return absl::OkStatus();
}

absl::StatusOr<Evaluation> Trainer::Evaluate(const LabeledData& data) {
  const std::vector<int64_t>& input_shape = data.inputs.shape;
  const int64_t rows = input_shape.empty() ? 0 : input_shape[0];
  if (input_shape.size() < 2 || rows < 1 || static_cast<int64_t>(data.labels.size()) != rows) {
    return absl::InvalidArgumentError(absl::StrCat("evaluation data: inputs of shape ",
                                                   gradengine::ShapeToString(input_shape), " and ",
                                                   data.labels.size(),
                                                   " labels; expected [examples >= 1, ...] and "
                                                   "one label per example"));
  }
  gradengine::ForwardRequest request;
  request.network = options_.network;
  for (gradengine::LayerSpec& layer : request.network.layers) {
    std::visit(Overloaded{
                   [](gradengine::BatchNorm2dSpec& batch_norm) { batch_norm.training = false; },
                   [](auto&) {},
               },
               layer.op);
  }
  for (const auto& [name, tensor] : parameters_) request.parameters[name] = tensor.view();
  CallOptions call;
  call.shards = options_.shards;
  const int64_t row_size = data.inputs.num_elements() / rows;
  LossAndHits total;
  for (int64_t first = 0; first < rows; first += options_.batch_size) {
    const int64_t count = std::min(options_.batch_size, rows - first);
    std::vector<int64_t> shape = input_shape;
    shape[0] = count;
    request.input = gradengine::TensorView(
        shape, absl::MakeConstSpan(data.inputs.data.data() + first * row_size,
                                   static_cast<size_t>(count * row_size)));
    absl::StatusOr<ForwardReply> reply = client_->Forward(request, call);
    if (!reply.ok()) return reply.status();
    absl::StatusOr<LossAndHits> score =
        ScoreLogits(reply->result.output, data.labels.data() + first, count, first);
    if (!score.ok()) return score.status();
    total.loss_sum += score->loss_sum;
    total.hits += score->hits;
  }
  Evaluation evaluation;
  evaluation.examples = rows;
  evaluation.loss = total.loss_sum / static_cast<double>(rows);
  evaluation.accuracy = static_cast<double>(total.hits) / static_cast<double>(rows);
  return evaluation;
}

}  // namespace gradclient
