// gradctl gradcheck end to end against an in-process gradserver::Server: it passes on correct
// networks with every objective, and fails, naming the tensor, when a proxy in front of the
// server scales one returned gradient by 1.05, on a smooth network and on a ReLU + max pool one
// (whose kinks must not hide it). The coordinates follow --seed; the usage text states the rule
// and default --eps applied. Also: float64 / big-endian / int32 .npy files are read by
// gradcheck, grad and forward with one note each and give the same results as their float32 /
// int64 equivalents.

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <regex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "grad/v1/gradient_service.grpc.pb.h"
#include "gradclient/npy.h"
#include "gtest/gtest.h"
#include "server/server.h"
#include "tests/cli/gradctl_runner.h"
#include "tests/service/test_pki.h"

namespace {

namespace fs = std::filesystem;
using ::gradclitest::GradctlRun;
using ::gradclitest::RunGradctl;
using ::testing::HasSubstr;
using ::testing::Not;

// A grad.v1.GradientService that forwards every call to `target` and multiplies the returned
// gradient named `scaled` ("input" for the input gradient, else a parameter's name) by
// `factor`: a server whose gradients are wrong in one tensor.
class ScalingProxy final : public grad::v1::GradientService::Service {
 public:
  ScalingProxy(const std::string& target, std::string scaled, float factor)
      : scaled_(std::move(scaled)), factor_(factor) {
    grpc::ChannelArguments arguments;
    arguments.SetMaxReceiveMessageSize(-1);
    stub_ = grad::v1::GradientService::NewStub(
        grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), arguments));
  }

  grpc::Status Forward(grpc::ServerContext*, const grad::v1::ForwardRequest* request,
                       grad::v1::ForwardResponse* response) override {
    grpc::ClientContext context;
    return stub_->Forward(&context, *request, response);
  }

  grpc::Status ComputeGradients(grpc::ServerContext*,
                                const grad::v1::ComputeGradientsRequest* request,
                                grad::v1::ComputeGradientsResponse* response) override {
    grpc::ClientContext context;
    grpc::Status status = stub_->ComputeGradients(&context, *request, response);
    if (!status.ok()) return status;
    if (scaled_ == "input" && response->has_input_grad()) {
      Scale(response->mutable_input_grad());
    }
    for (grad::v1::NamedTensor& gradient : *response->mutable_parameter_grads()) {
      if (gradient.name() == scaled_) Scale(gradient.mutable_tensor());
    }
    return status;
  }

  grpc::Status GetInfo(grpc::ServerContext*, const grad::v1::GetInfoRequest* request,
                       grad::v1::GetInfoResponse* response) override {
    grpc::ClientContext context;
    return stub_->GetInfo(&context, *request, response);
  }

 private:
  // Float32 little-endian values in place; this host is little-endian, as the wire format.
  void Scale(grad::v1::Tensor* tensor) const {
    std::string* data = tensor->mutable_data();
    for (size_t offset = 0; offset + sizeof(float) <= data->size(); offset += sizeof(float)) {
      float value;
      std::memcpy(&value, data->data() + offset, sizeof(value));
      value *= factor_;
      std::memcpy(data->data() + offset, &value, sizeof(value));
    }
  }

  std::unique_ptr<grad::v1::GradientService::Stub> stub_;
  const std::string scaled_;
  const float factor_;
};

// A running ScalingProxy on 127.0.0.1.
struct RunningProxy {
  std::unique_ptr<ScalingProxy> service;
  std::unique_ptr<grpc::Server> server;
  int port = 0;

  ~RunningProxy() {
    if (server != nullptr) server->Shutdown();
  }
};

std::unique_ptr<RunningProxy> StartProxy(const std::string& target, const std::string& scaled,
                                         float factor) {
  auto proxy = std::make_unique<RunningProxy>();
  proxy->service = std::make_unique<ScalingProxy>(target, scaled, factor);
  grpc::ServerBuilder builder;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &proxy->port);
  builder.SetMaxReceiveMessageSize(-1);
  builder.RegisterService(proxy->service.get());
  proxy->server = builder.BuildAndStart();
  EXPECT_NE(proxy->server, nullptr);
  EXPECT_GT(proxy->port, 0);
  return proxy;
}

void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream file(path, std::ios::binary | std::ios::trunc);
  file << bytes;
}

int64_t Count(const std::vector<int64_t>& shape) {
  int64_t count = 1;
  for (int64_t d : shape) count *= d;
  return count;
}

std::vector<float> Normal(const std::vector<int64_t>& shape, float scale, std::mt19937& random) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> values(Count(shape));
  for (float& value : values) value = normal(random);
  return values;
}

// A .npy file of `descr` ("<f8", ">f4", "<i4", ...) holding `values` (converted to it), framed
// as numpy frames version 1.0 files.
template <typename T>
std::string NpyBytes(const std::string& descr, const std::vector<int64_t>& shape,
                     const std::vector<T>& values) {
  std::string shape_text = "(";
  for (size_t i = 0; i < shape.size(); ++i) absl::StrAppend(&shape_text, shape[i], ", ");
  if (shape.size() > 1) shape_text.resize(shape_text.size() - 2);
  if (shape.size() == 1) shape_text.resize(shape_text.size() - 1);
  shape_text += ")";
  std::string header =
      absl::StrCat("{'descr': '", descr, "', 'fortran_order': False, 'shape': ", shape_text, ", }");
  header.append(64 - (10 + header.size() + 1) % 64, ' ');
  header.push_back('\n');
  std::string bytes = absl::StrCat("\x93NUMPY", std::string(1, '\x01'), std::string(1, '\0'));
  bytes.push_back(static_cast<char>(header.size() & 0xFF));
  bytes.push_back(static_cast<char>(header.size() >> 8));
  bytes += header;
  const bool big_endian = descr[0] == '>';
  for (T value : values) {
    std::string element;
    if (descr.substr(1) == "f8") {
      const double converted = value;
      element.assign(reinterpret_cast<const char*>(&converted), 8);
    } else if (descr.substr(1) == "f4") {
      const float converted = static_cast<float>(value);
      element.assign(reinterpret_cast<const char*>(&converted), 4);
    } else if (descr.substr(1) == "i8") {
      const int64_t converted = static_cast<int64_t>(value);
      element.assign(reinterpret_cast<const char*>(&converted), 8);
    } else if (descr.substr(1) == "i4") {
      const int32_t converted = static_cast<int32_t>(value);
      element.assign(reinterpret_cast<const char*>(&converted), 4);
    } else {
      ADD_FAILURE() << "NpyBytes does not write " << descr;
    }
    if (big_endian) element = std::string(element.rbegin(), element.rend());
    bytes += element;
  }
  return bytes;
}

// conv 3->4 (bias), tanh, batch norm in training mode, conv 4->2 (bias), tanh: smooth, so a
// correct gradient passes at every coordinate. Output [2, 2, 4, 4].
constexpr char kSmoothNet[] = R"({"layers": [
  {"name": "conv1", "conv2d": {"inChannels": 3, "outChannels": 4, "kernelSize": [3],
                               "padding": [1], "bias": true}},
  {"name": "act1", "activation": {"kind": "TANH"}},
  {"name": "bn1", "batchNorm2d": {"numFeatures": 4, "training": true}},
  {"name": "conv2", "conv2d": {"inChannels": 4, "outChannels": 2, "kernelSize": [3],
                               "bias": true}},
  {"name": "act2", "activation": {"kind": "TANH"}}]})";
const std::vector<int64_t> kSmoothInputShape = {2, 3, 6, 6};
const std::vector<int64_t> kSmoothOutputShape = {2, 2, 4, 4};
const std::vector<std::pair<std::string, std::vector<int64_t>>> kSmoothParameters = {
    {"conv1.weight", {4, 3, 3, 3}}, {"conv1.bias", {4}}, {"bn1.weight", {4}}, {"bn1.bias", {4}},
    {"conv2.weight", {2, 4, 3, 3}}, {"conv2.bias", {2}}};

// conv 1->8, relu, 2x2 max pool, linear 128->10: ReLU and max pool kinks, logits [4, 10].
constexpr char kReluNet[] = R"({"layers": [
  {"name": "conv1", "conv2d": {"inChannels": 1, "outChannels": 8, "kernelSize": [3],
                               "padding": [1], "bias": true}},
  {"name": "relu1", "activation": {"kind": "RELU"}},
  {"name": "pool1", "maxPool2d": {"kernelSize": [2]}},
  {"name": "fc", "linear": {"inFeatures": 128, "outFeatures": 10, "bias": true}}]})";

class GradcheckTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    gradserver::ServerOptions options;
    options.address = "127.0.0.1:0";
    options.threads_per_request = 1;
    options.max_concurrent_requests = 2;
    options.log_requests = false;
    absl::StatusOr<std::unique_ptr<gradserver::Server>> server =
        gradserver::Server::Create(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
  }

  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }

  void SetUp() override {
    ASSERT_NE(server_, nullptr);
    const ::testing::TestInfo* test = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = absl::StrCat(::testing::TempDir(), "/gradcheck_test_", getpid(), "/", test->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_ + "/params");
  }

  void TearDown() override {
    if (!HasFailure()) fs::remove_all(dir_);
  }

  static std::string Target() { return absl::StrCat("127.0.0.1:", server_->port()); }

  std::string Path(const std::string& name) const { return dir_ + "/" + name; }

  void WriteFloat32(const std::string& name, const std::vector<int64_t>& shape,
                    const std::vector<float>& values) {
    ASSERT_TRUE(gradclient::WriteNpyFile(Path(name), shape, values).ok()) << name;
  }

  // The smooth network's files, float32 throughout: net.json, x.npy, params/, and for the
  // objectives target.npy, grad_output.npy and labels.npy (int64, [2, 4, 4] over 2 classes).
  void WriteSmoothCase() {
    WriteFile(Path("net.json"), kSmoothNet);
    std::mt19937 random(3);
    WriteFloat32("x.npy", kSmoothInputShape, Normal(kSmoothInputShape, 1.0f, random));
    for (const auto& [name, shape] : kSmoothParameters) {
      std::vector<float> values = Normal(shape, 0.3f, random);
      if (name == "bn1.weight") {
        for (float& value : values) value += 1.0f;
      }
      WriteFloat32("params/" + name + ".npy", shape, values);
    }
    WriteFloat32("target.npy", kSmoothOutputShape, Normal(kSmoothOutputShape, 1.0f, random));
    WriteFloat32("grad_output.npy", kSmoothOutputShape, Normal(kSmoothOutputShape, 1.0f, random));
    std::vector<float> labels(2 * 4 * 4);
    for (float& label : labels) label = static_cast<float>(random() % 2);
    WriteFile(Path("labels.npy"), NpyBytes("<i8", {2, 4, 4}, labels));
  }

  std::vector<std::string> GradcheckArgs(const std::string& target,
                                         const std::vector<std::string>& objective) {
    std::vector<std::string> args = {"gradcheck", "--server=" + target, "--net=" + Path("net.json"),
                                     "--input=" + Path("x.npy"), "--params=" + Path("params")};
    args.insert(args.end(), objective.begin(), objective.end());
    return args;
  }

  // The ReLU + max pool network's files: net.json, x.npy [4, 1, 8, 8], params/ and labels.npy
  // (int32 [4]), for ReluObjective().
  void WriteReluCase() {
    WriteFile(Path("net.json"), kReluNet);
    std::mt19937 random(5);
    WriteFloat32("x.npy", {4, 1, 8, 8}, Normal({4, 1, 8, 8}, 1.0f, random));
    WriteFloat32("params/conv1.weight.npy", {8, 1, 3, 3}, Normal({8, 1, 3, 3}, 0.3f, random));
    WriteFloat32("params/conv1.bias.npy", {8}, Normal({8}, 0.1f, random));
    WriteFloat32("params/fc.weight.npy", {10, 128}, Normal({10, 128}, 0.1f, random));
    WriteFloat32("params/fc.bias.npy", {10}, Normal({10}, 0.1f, random));
    WriteFile(Path("labels.npy"), NpyBytes("<i4", {4}, std::vector<float>{3, 0, 9, 5}));
  }

  std::vector<std::string> ReluObjective() const {
    return {"--objective=cross_entropy", "--labels=" + Path("labels.npy"), "--samples=48"};
  }

  GradctlRun Gradctl(const std::vector<std::string>& args) { return RunGradctl(dir_, args); }

  static inline gradserver::Server* server_ = nullptr;
  std::string dir_;
};

// Column `i` of a table row.
std::string Column(const std::string& row, size_t i) {
  std::vector<std::string> columns = absl::StrSplit(row, ' ', absl::SkipEmpty());
  return i < columns.size() ? columns[i] : "";
}

// The table's row for `tensor`, or "" if there is none.
std::string Row(const std::string& out, const std::string& tensor) {
  for (absl::string_view line : absl::StrSplit(out, '\n')) {
    if (absl::StartsWith(line, tensor + " ")) return std::string(line);
  }
  return "";
}

const std::vector<std::string> kReluTensors = {"input", "conv1.weight", "conv1.bias", "fc.weight",
                                               "fc.bias"};

const std::vector<std::string> kCheckedTensors = {
    "input", "conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias", "conv2.weight", "conv2.bias"};

TEST_F(GradcheckTest, PassesOnACorrectNetworkWithEveryObjective) {
  WriteSmoothCase();
  const std::vector<std::vector<std::string>> objectives = {
      {"--target=" + Path("target.npy")},
      {"--objective=sum"},
      {"--grad_output=" + Path("grad_output.npy")},
      {"--objective=cross_entropy", "--labels=" + Path("labels.npy"), "--label_smoothing=0.1"},
  };
  for (const std::vector<std::string>& objective : objectives) {
    const GradctlRun run = Gradctl(GradcheckArgs(Target(), objective));
    ASSERT_EQ(run.exit_code, 0) << objective[0] << "\n" << run;
    EXPECT_THAT(run.out, HasSubstr("a coordinate passes when |numeric - analytic| <= 0.01 * "
                                   "max|analytic| + 1e-06 * |loss| / eps"));
    EXPECT_THAT(run.out, HasSubstr("eps=0.001 samples=16 seed=0"));
    for (const std::string& tensor : kCheckedTensors) {
      const std::string row = Row(run.out, tensor);
      EXPECT_THAT(row, HasSubstr(" ok")) << objective[0] << " " << tensor << "\n" << run;
    }
    // Trainable parameters only: batch norm's running statistics are not differentiated.
    EXPECT_EQ(Row(run.out, "bn1.running_mean"), "") << run;
    // 16 of the input's 216 values, all 4 of a bias.
    EXPECT_EQ(Column(Row(run.out, "input"), 1), "[2,3,6,6]") << run;
    EXPECT_EQ(Column(Row(run.out, "input"), 2), "16") << run;
    EXPECT_EQ(Column(Row(run.out, "conv1.bias"), 2), "4") << run;
    EXPECT_THAT(run.out, HasSubstr("62 coordinates in 7 tensors, 126 calls")) << run;
    EXPECT_THAT(run.out, HasSubstr("0 tensors disagree"));
    EXPECT_THAT(run.err, Not(HasSubstr("note:")));
  }
}

TEST_F(GradcheckTest, PassesOnAReluMaxPoolNetwork) {
  WriteReluCase();
  const GradctlRun run = Gradctl(GradcheckArgs(Target(), ReluObjective()));
  ASSERT_EQ(run.exit_code, 0) << run;
  for (const std::string& tensor : kReluTensors) {
    EXPECT_THAT(Row(run.out, tensor), HasSubstr(" ok")) << tensor << "\n" << run;
  }
}

// Coordinates at a kink are skipped, but only those whose one-sided differences explain the
// error: a gradient 5% off still fails on the ReLU + max pool network.
TEST_F(GradcheckTest, KinksDoNotHideAWrongGradient) {
  WriteReluCase();
  for (const std::string& scaled : kReluTensors) {
    std::unique_ptr<RunningProxy> proxy = StartProxy(Target(), scaled, 1.05f);
    const GradctlRun run =
        Gradctl(GradcheckArgs(absl::StrCat("127.0.0.1:", proxy->port), ReluObjective()));
    EXPECT_EQ(run.exit_code, 1) << scaled << "\n" << run;
    for (const std::string& tensor : kReluTensors) {
      EXPECT_THAT(Row(run.out, tensor), HasSubstr(tensor == scaled ? " MISMATCH" : " ok"))
          << scaled << " " << tensor << "\n"
          << run;
    }
  }
}

// The usage text states the rule and the default --eps that gradcheck applies (and prints
// before its table), so the two cannot drift apart.
TEST_F(GradcheckTest, UsageStatesTheRuleAndDefaultEpsItApplies) {
  WriteSmoothCase();
  const GradctlRun run = Gradctl(GradcheckArgs(Target(), {"--objective=sum"}));
  ASSERT_EQ(run.exit_code, 0) << run;
  const GradctlRun help = Gradctl({"help"});
  ASSERT_EQ(help.exit_code, 0) << help;
  const std::string number = "([0-9.eE+-]+)";
  std::smatch applied, stated;
  const std::string run_out = run.out, help_out = help.out;
  ASSERT_TRUE(std::regex_search(
      run_out, applied,
      std::regex(" eps=" + number + " [\\s\\S]*\\|numeric - analytic\\| <= " + number +
                 " \\* max\\|analytic\\| \\+ " + number + " \\* \\|loss\\| / eps")))
      << run;
  ASSERT_TRUE(std::regex_search(
      help_out, stated,
      std::regex("\\[--eps=H \\(default " + number + "\\)\\][\\s\\S]*\\|numeric - analytic\\| <= " +
                 number + " \\* max\\|analytic\\|[\\s\\S]*?\\+ " + number + " \\* \\|loss\\| / H")))
      << help;
  for (int i = 1; i <= 3; ++i) {
    EXPECT_EQ(std::stod(stated[i].str()), std::stod(applied[i].str()))
        << "usage: " << stated[0] << "\napplied: " << applied[0];
  }
}

// The coordinates are drawn from --seed: the same seed gives the same table, another seed
// other coordinates.
TEST_F(GradcheckTest, SamplesAreReproducibleWithSeed) {
  WriteSmoothCase();
  const std::vector<std::string> objective = {"--objective=sum"};
  auto run_with_seed = [&](const std::string& seed) {
    std::vector<std::string> args = GradcheckArgs(Target(), objective);
    args.push_back("--seed=" + seed);
    GradctlRun run = Gradctl(args);
    EXPECT_EQ(run.exit_code, 0) << run;
    return run.out;
  };
  const std::string first = run_with_seed("7");
  EXPECT_THAT(first, HasSubstr("seed=7"));
  EXPECT_EQ(run_with_seed("7"), first);
  const std::string other = run_with_seed("8");
  // input: 16 of 216 values; conv1.weight: 16 of 108.
  for (const char* tensor : {"input", "conv1.weight", "conv2.weight"}) {
    EXPECT_NE(Row(other, tensor), Row(first, tensor)) << tensor << "\n" << first << other;
  }
}

TEST_F(GradcheckTest, NamesTheTensorWhoseGradientIsWrong) {
  WriteSmoothCase();
  // The sum objective's gradients are large next to the loss's rounding (for MSE on this
  // network the input gradient is ~0.03 for a loss of 1.5, so a 5% error there hides within
  // the allowance for rounding at eps=1e-3).
  const std::vector<std::string> objective = {"--objective=sum"};
  // The proxy itself changes nothing when it scales by 1.
  {
    std::unique_ptr<RunningProxy> proxy = StartProxy(Target(), "conv2.weight", 1.0f);
    const GradctlRun run =
        Gradctl(GradcheckArgs(absl::StrCat("127.0.0.1:", proxy->port), objective));
    ASSERT_EQ(run.exit_code, 0) << run;
  }
  for (const std::string& scaled : {std::string("conv2.weight"), std::string("input")}) {
    std::unique_ptr<RunningProxy> proxy = StartProxy(Target(), scaled, 1.05f);
    const GradctlRun run =
        Gradctl(GradcheckArgs(absl::StrCat("127.0.0.1:", proxy->port), objective));
    EXPECT_EQ(run.exit_code, 1) << scaled << "\n" << run;
    EXPECT_THAT(run.err, HasSubstr("gradctl: DATA_LOSS: the analytical gradients disagree with "
                                   "finite differences: " +
                                   scaled + "["))
        << run;
    EXPECT_THAT(run.out, HasSubstr("1 tensors disagree")) << run;
    for (const std::string& tensor : kCheckedTensors) {
      EXPECT_THAT(Row(run.out, tensor), HasSubstr(tensor == scaled ? " MISMATCH" : " ok"))
          << scaled << " " << tensor << "\n"
          << run;
    }
  }
}

TEST_F(GradcheckTest, ReadsConvertedFilesWithOneNoteEach) {
  WriteSmoothCase();
  // The same input as float64, a parameter as big-endian float64, another as big-endian
  // float32, the labels as int32: values the narrower types hold exactly, so the results must
  // be the same bit for bit.
  absl::StatusOr<gradclient::NpyArray> x = gradclient::ReadNpyFile(Path("x.npy"));
  absl::StatusOr<gradclient::NpyInt64Array> labels =
      gradclient::ReadNpyInt64File(Path("labels.npy"));
  ASSERT_TRUE(x.ok() && labels.ok());
  WriteFile(Path("x64.npy"), NpyBytes("<f8", x->shape, x->data));
  WriteFile(Path("labels32.npy"), NpyBytes("<i4", labels->shape, labels->data));
  absl::StatusOr<gradclient::NpyArray> weight =
      gradclient::ReadNpyFile(Path("params/conv2.weight.npy"));
  absl::StatusOr<gradclient::NpyArray> bias = gradclient::ReadNpyFile(Path("params/bn1.bias.npy"));
  ASSERT_TRUE(weight.ok() && bias.ok());
  fs::create_directories(Path("converted"));
  for (const auto& [name, shape] : kSmoothParameters) {
    fs::copy_file(Path("params/" + name + ".npy"), Path("converted/" + name + ".npy"));
  }
  WriteFile(Path("converted/conv2.weight.npy"), NpyBytes(">f8", weight->shape, weight->data));
  WriteFile(Path("converted/bn1.bias.npy"), NpyBytes(">f4", bias->shape, bias->data));

  const GradctlRun run = Gradctl({"gradcheck", "--server=" + Target(), "--net=" + Path("net.json"),
                                  "--input=" + Path("x64.npy"), "--params=" + Path("converted"),
                                  "--objective=cross_entropy", "--labels=" + Path("labels32.npy")});
  ASSERT_EQ(run.exit_code, 0) << run;
  // The float files' notes, in the order they are read: the input, then the parameters.
  const std::string float_notes = absl::StrCat(
      "gradctl: note: ", Path("x64.npy"), " is float64 ('<f8'); converted to float32\n",
      "gradctl: note: ", Path("converted/bn1.bias.npy"),
      " is big-endian float32 ('>f4'); converted to float32\n",
      "gradctl: note: ", Path("converted/conv2.weight.npy"),
      " is big-endian float64 ('>f8'); converted to float32\n");
  const std::string labels_note = absl::StrCat("gradctl: note: ", Path("labels32.npy"),
                                               " is int32 ('<i4'); converted to int64\n");
  EXPECT_EQ(run.err, float_notes + labels_note);

  // gradctl grad on the converted files gives what it gives on the float32 originals.
  for (const auto& [input, params, labels_file, out] :
       {std::tuple<std::string, std::string, std::string, std::string>{"x.npy", "params",
                                                                       "labels.npy", "out32"},
        {"x64.npy", "converted", "labels32.npy", "out64"}}) {
    const GradctlRun grad =
        Gradctl({"grad", "--server=" + Target(), "--net=" + Path("net.json"),
                 "--input=" + Path(input), "--params=" + Path(params), "--out=" + Path(out),
                 "--objective=cross_entropy", "--labels=" + Path(labels_file)});
    ASSERT_EQ(grad.exit_code, 0) << grad;
    EXPECT_EQ(grad.err, input == "x64.npy" ? float_notes + labels_note : "") << grad;
  }
  // gradctl forward reads no labels: the float files' notes only.
  const GradctlRun forward = Gradctl({"forward", "--server=" + Target(),
                                      "--net=" + Path("net.json"), "--input=" + Path("x64.npy"),
                                      "--params=" + Path("converted"), "--out=" + Path("fwd")});
  ASSERT_EQ(forward.exit_code, 0) << forward;
  EXPECT_EQ(forward.err, float_notes) << forward;
  for (const char* file : {"output.npy", "input.grad.npy", "conv2.weight.grad.npy",
                           "bn1.bias.grad.npy", "bn1.running_mean.npy"}) {
    EXPECT_EQ(gradservicetest::ReadTextFile(Path(absl::StrCat("out32/", file))),
              gradservicetest::ReadTextFile(Path(absl::StrCat("out64/", file))))
        << file;
  }
}

TEST_F(GradcheckTest, RejectsBadFlags) {
  WriteSmoothCase();
  const std::string target = "--target=" + Path("target.npy");
  struct Case {
    std::vector<std::string> extra;
    std::string message;
  };
  const Case cases[] = {
      {{target, "--samples=0"}, "--samples=0 must be at least 1"},
      {{target, "--eps=0"}, "--eps=0 must be a positive number"},
      {{target, "--eps=-0.5"}, "--eps=-0.5 must be a positive number"},
      {{}, "gradctl gradcheck needs exactly one objective"},
      {{target, "--objective=sum"}, "several were given"},
      {{target, "--out=" + Path("o")}, "--out is not a flag of gradctl gradcheck"},
  };
  for (const Case& c : cases) {
    const GradctlRun run = Gradctl(GradcheckArgs(Target(), c.extra));
    EXPECT_EQ(run.exit_code, 2) << run;
    EXPECT_THAT(run.err, HasSubstr(c.message)) << run;
  }
  const GradctlRun no_net = Gradctl({"gradcheck", "--server=" + Target(), "--objective=sum"});
  EXPECT_EQ(no_net.exit_code, 2) << no_net;
  EXPECT_THAT(no_net.err, HasSubstr("gradctl gradcheck needs --net")) << no_net;
}

}  // namespace
