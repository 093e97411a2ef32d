// The gradctl binary end to end against an in-process gradserver::Server: `grad` on every
// PyTorch fixture, `forward`, `demo`, `health`, `info`, `bench`, and how it reports errors.

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <variant>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gmock/gmock.h"
#include "google/protobuf/util/json_util.h"
#include "grad/v1/gradient_service.pb.h"
#include "gradclient/npy.h"
#include "gradclient/seed_demo.h"
#include "gtest/gtest.h"
#include "proto/wire.h"
#include "server/server.h"
#include "tests/cli/gradctl_runner.h"
#include "tests/service/test_pki.h"
#include "tests/tolerance.h"
#include "tests/torch/fixture.h"

namespace {

namespace fs = std::filesystem;
using ::gradclitest::GradctlRun;
using ::gradclitest::RunGradctl;
using ::gradservicetest::ReadTextFile;
using ::testing::HasSubstr;
using ::testing::Not;

static_assert(gradclient::kSeedDemoRelativeTolerance == gradtest::kRelativeTolerance,
              "gradclient/seed_demo.h restates the project's tolerance");

std::string SourceDir() {
  const char* source = std::getenv("GRAD_SOURCE_DIR");
  return source != nullptr ? source : GRAD_SOURCE_DIR_DEFAULT;
}

std::string FixturesDir() { return SourceDir() + "/tests/fixtures"; }

void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream file(path, std::ios::binary | std::ios::trunc);
  file << bytes;
}

class GradctlTest : public ::testing::Test {
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
    // The same on a unix socket, with shared memory allowed.
    unix_address_ = new std::string(
        absl::StrCat("unix:", ::testing::TempDir(), "/gradctl_test.", getpid(), ".sock"));
    options.address = *unix_address_;
    options.shared_memory.allowed = true;
    server = gradserver::Server::Create(options);
    ASSERT_TRUE(server.ok()) << server.status();
    unix_server_ = server->release();
  }

  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
    delete unix_server_;
    unix_server_ = nullptr;
    std::remove(unix_address_->substr(5).c_str());
    delete unix_address_;
  }

  void SetUp() override {
    ASSERT_NE(server_, nullptr);
    ASSERT_NE(unix_server_, nullptr);
    const ::testing::TestInfo* test = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = absl::StrCat(::testing::TempDir(), "/gradctl_test_", getpid(), "/", test->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }

  void TearDown() override {
    if (!HasFailure()) fs::remove_all(dir_);
  }

  static std::string ServerFlag() { return absl::StrCat("--server=127.0.0.1:", server_->port()); }

  // Runs gradctl with `args` (the server flag is not added) and captures its output.
  GradctlRun Gradctl(const std::vector<std::string>& args) { return RunGradctl(dir_, args); }

  // Writes `network` as the protobuf JSON of grad.v1.Network; returns the path.
  std::string WriteNetJson(const gradengine::NetworkSpec& network, const std::string& name) {
    grad::v1::Network wire;
    gradwire::EncodeNetwork(network, &wire);
    std::string json;
    EXPECT_TRUE(google::protobuf::util::MessageToJsonString(wire, &json).ok());
    const std::string path = dir_ + "/" + name;
    WriteFile(path, json);
    return path;
  }

  // Arguments of `gradctl grad` expressing the fixture's request, writing to `out`.
  std::vector<std::string> GradArgs(const gradtest::FixtureCase& fixture, const std::string& out) {
    std::vector<std::string> args = {
        "grad",
        ServerFlag(),
        "--net=" + WriteNetJson(fixture.spec.network, fixture.name + ".json"),
        "--input=" + fixture.directory + "/input.npy",
        "--params=" + fixture.directory + "/params",
        "--out=" + out,
    };
    switch (fixture.spec.objective) {
      case gradengine::ObjectiveKind::kMse:
        args.push_back("--target=" + fixture.directory + "/target.npy");
        break;
      case gradengine::ObjectiveKind::kGradOutput:
        args.push_back("--grad_output=" + fixture.directory + "/grad_output.npy");
        break;
      case gradengine::ObjectiveKind::kSum:
        args.push_back("--objective=sum");
        break;
      case gradengine::ObjectiveKind::kCrossEntropy:
        args.push_back("--objective=cross_entropy");
        args.push_back("--labels=" + fixture.directory + "/labels.npy");
        if (fixture.spec.label_smoothing != 0.0) {
          args.push_back(absl::StrCat("--label_smoothing=", fixture.spec.label_smoothing));
        }
        if (fixture.spec.ignore_index != -100) {
          args.push_back(absl::StrCat("--ignore_index=", fixture.spec.ignore_index));
        }
        break;
    }
    const gradengine::GradientSelection& gradients = fixture.spec.gradients;
    if (!gradients.input) args.push_back("--no_input_grad");
    if (!gradients.all_parameters) {
      args.push_back("--param_grads=" + (gradients.parameters.empty()
                                             ? std::string("none")
                                             : absl::StrJoin(gradients.parameters, ",")));
    }
    return args;
  }

  static gradserver::Server* server_;
  static gradserver::Server* unix_server_;
  static std::string* unix_address_;
  std::string dir_;
};

gradserver::Server* GradctlTest::server_ = nullptr;
gradserver::Server* GradctlTest::unix_server_ = nullptr;
std::string* GradctlTest::unix_address_ = nullptr;

// The number after "key": in a one-line JSON object.
absl::StatusOr<double> JsonNumberField(const std::string& json, const std::string& key) {
  const std::string needle = absl::StrCat("\"", key, "\":");
  const size_t at = json.find(needle);
  if (at == std::string::npos) return absl::NotFoundError(absl::StrCat(key, " not in ", json));
  const size_t begin = at + needle.size();
  const size_t end = json.find_first_of(",}", begin);
  double value = 0;
  if (!absl::SimpleAtod(json.substr(begin, end - begin), &value)) {
    return absl::InvalidArgumentError(absl::StrCat(key, " is not a number in ", json));
  }
  return value;
}

::testing::AssertionResult NpyFilesClose(const std::string& actual_path,
                                         const std::string& expected_path) {
  absl::StatusOr<gradclient::NpyArray> actual = gradclient::ReadNpyFile(actual_path);
  if (!actual.ok()) return ::testing::AssertionFailure() << actual.status();
  absl::StatusOr<gradclient::NpyArray> expected = gradclient::ReadNpyFile(expected_path);
  if (!expected.ok()) return ::testing::AssertionFailure() << expected.status();
  return gradtest::TensorsClose<float, float>(actual_path, actual->shape, actual->data,
                                              expected->shape, expected->data);
}

std::vector<std::string> FileNames(const std::string& dir) {
  std::vector<std::string> names;
  for (const fs::directory_entry& entry : fs::directory_iterator(dir)) {
    names.push_back(entry.path().filename().string());
  }
  std::sort(names.begin(), names.end());
  return names;
}

// Whether a row of `network`'s output depends on other rows (a batch_norm2d in training mode),
// so that gradctl must refuse to cut its batch.
bool MixesBatchRows(const gradengine::NetworkSpec& network) {
  return std::any_of(network.layers.begin(), network.layers.end(),
                     [](const auto& layer) { return gradengine::MixesBatch(layer.op); });
}

// Every fixture whole, with its batch cut into 3 parts (--shards=3; fixtures with a batch of 1
// or 2 are sent whole or in 2, combined by the client; a network with a batch_norm2d in training
// mode is refused), over a unix socket, and through shared memory.
TEST_F(GradctlTest, GradMatchesPyTorchOnEveryFixture) {
  absl::StatusOr<std::vector<std::string>> cases = gradtest::FindFixtureCases(FixturesDir());
  ASSERT_TRUE(cases.ok()) << cases.status();
  ASSERT_GE(cases->size(), 20u);
  const std::vector<std::vector<std::string>> variants = {
      {},
      {"--shards=3"},
      {"--server=" + *unix_address_},
      {"--server=" + *unix_address_, "--shared_memory"},
  };
  for (const std::string& case_dir : *cases) {
    for (size_t variant = 0; variant < variants.size(); ++variant) {
      SCOPED_TRACE(absl::StrCat(case_dir, " ", absl::StrJoin(variants[variant], " ")));
      absl::StatusOr<std::unique_ptr<gradtest::FixtureCase>> fixture =
          gradtest::LoadFixtureCase(case_dir);
      ASSERT_TRUE(fixture.ok()) << fixture.status();
      const std::string out = absl::StrCat(dir_, "/", (*fixture)->name, "_", variant);
      std::vector<std::string> args = GradArgs(**fixture, out);
      // A later --server wins over GradArgs' own.
      args.insert(args.end(), variants[variant].begin(), variants[variant].end());
      const GradctlRun run = Gradctl(args);
      if (variant == 1 && MixesBatchRows((*fixture)->spec.network)) {
        EXPECT_EQ(run.exit_code, 1) << run;
        EXPECT_THAT(run.err, HasSubstr("shards=3 cannot be used")) << run;
        EXPECT_THAT(run.err, HasSubstr("batch_norm2d) mixes the rows of the batch")) << run;
        continue;
      }
      ASSERT_EQ(run.exit_code, 0) << run;
      EXPECT_EQ(std::count(run.out.begin(), run.out.end(), '\n'), 1) << run;

      // Exactly the files of expected/ but loss.npy, each within the tolerance.
      std::vector<std::string> expected_files;
      for (const std::string& name : FileNames(case_dir + "/expected")) {
        if (name != "loss.npy") expected_files.push_back(name);
      }
      EXPECT_EQ(FileNames(out), expected_files) << run;
      for (const std::string& name : expected_files) {
        if (fs::exists(out + "/" + name)) {
          EXPECT_TRUE(NpyFilesClose(out + "/" + name, case_dir + "/expected/" + name));
        }
      }

      if ((*fixture)->expected_loss.has_value()) {
        absl::StatusOr<double> loss = JsonNumberField(run.out, "loss");
        ASSERT_TRUE(loss.ok()) << loss.status();
        const double value = *loss;
        const std::vector<int64_t> shape = {1};
        EXPECT_TRUE((gradtest::TensorsClose<double, float>(
            "loss", shape, absl::MakeConstSpan(&value, 1), (*fixture)->expected_loss->shape,
            absl::MakeConstSpan((*fixture)->expected_loss->data))));
      } else {
        EXPECT_THAT(run.out, HasSubstr("\"loss\":null"));
      }
      EXPECT_THAT(run.out, HasSubstr("\"round_trip_ms\":"));
      EXPECT_THAT(run.out, HasSubstr("\"server_ms\":{\"decode\":"));
      EXPECT_THAT(run.out, HasSubstr("\"backward\":"));
    }
  }
}

TEST_F(GradctlTest, GradSkipOutputWritesOnlyTheGradients) {
  const std::string case_dir = FixturesDir() + "/seed_layer";
  absl::StatusOr<std::unique_ptr<gradtest::FixtureCase>> fixture =
      gradtest::LoadFixtureCase(case_dir);
  ASSERT_TRUE(fixture.ok()) << fixture.status();
  std::vector<std::string> args = GradArgs(**fixture, dir_ + "/out");
  args.push_back("--skip_output");
  args.push_back("--request_id=skip-1");
  const GradctlRun run = Gradctl(args);
  ASSERT_EQ(run.exit_code, 0) << run;
  EXPECT_THAT(
      FileNames(dir_ + "/out"),
      ::testing::ElementsAre("conv1.bias.grad.npy", "conv1.weight.grad.npy", "input.grad.npy"));
  EXPECT_THAT(run.out, HasSubstr("\"request_id\":\"skip-1\""));
}

TEST_F(GradctlTest, ForwardWritesTheOutput) {
  const std::string case_dir = FixturesDir() + "/seed_conv4";
  absl::StatusOr<std::unique_ptr<gradtest::FixtureCase>> fixture =
      gradtest::LoadFixtureCase(case_dir);
  ASSERT_TRUE(fixture.ok()) << fixture.status();
  const GradctlRun run = Gradctl({"forward", ServerFlag(),
                                  "--net=" + WriteNetJson((*fixture)->spec.network, "net.json"),
                                  "--input=" + case_dir + "/input.npy",
                                  "--params=" + case_dir + "/params", "--out=" + dir_ + "/out"});
  ASSERT_EQ(run.exit_code, 0) << run;
  EXPECT_THAT(FileNames(dir_ + "/out"), ::testing::ElementsAre("output.npy"));
  EXPECT_TRUE(NpyFilesClose(dir_ + "/out/output.npy", case_dir + "/expected/output.npy"));
  EXPECT_THAT(run.out, HasSubstr("{\"output_shape\":[1,64,28,28],"));
}

TEST_F(GradctlTest, DemoPrintsTheNotebooksDemosAndMatchesPyTorch) {
  const GradctlRun run = Gradctl({"demo", ServerFlag()});
  ASSERT_EQ(run.exit_code, 0) << run;
  EXPECT_THAT(run.out, HasSubstr("# Backward through 1 convolution layer"));
  EXPECT_THAT(run.out, HasSubstr("Output tensor shape: [1, 8, 28, 28]\nLoss: 12.32"));
  EXPECT_THAT(run.out, HasSubstr("(PyTorch: 12.322200)"));
  EXPECT_THAT(run.out, HasSubstr("Output tensor shape: [1, 64, 28, 28]\nLoss: 8854"));
  EXPECT_THAT(run.out, HasSubstr("(PyTorch: 885466.312500)"));
  EXPECT_THAT(run.out, HasSubstr("Output tensor shape: [1, 8, 26, 26]\nLoss: 10.39"));
  EXPECT_THAT(run.out, HasSubstr("(PyTorch: 10.392983)"));
  EXPECT_THAT(run.out, HasSubstr("Gradients for the input tensor:\ntensor([[[["));
  EXPECT_THAT(run.out, HasSubstr("Gradients for conv4.weight:\ntensor("));
  EXPECT_THAT(run.out, HasSubstr("Gradients for conv1.bias:\ntensor("));
  size_t matches = 0;
  for (size_t at = run.out.find("Matches PyTorch"); at != std::string::npos;
       at = run.out.find("Matches PyTorch", at + 1)) {
    ++matches;
  }
  EXPECT_EQ(matches, 3u) << run;
  EXPECT_THAT(run.out, Not(HasSubstr("DOES NOT MATCH")));

  const GradctlRun one = Gradctl({"demo", "layer", ServerFlag()});
  ASSERT_EQ(one.exit_code, 0) << one;
  EXPECT_THAT(one.out, HasSubstr("# A Conv2D layer with bias"));
  EXPECT_THAT(one.out, Not(HasSubstr("# Backward through")));
}

TEST_F(GradctlTest, DemoFailsWhenANumberDiffersFromPyTorch) {
  // A copy of the demo data with one expected gradient value changed.
  const std::string data = dir_ + "/data";
  fs::create_directories(data);
  fs::copy(FixturesDir() + "/seed_conv1", data + "/seed_conv1", fs::copy_options::recursive);
  const std::string expected = data + "/seed_conv1/expected/conv1.weight.grad.npy";
  absl::StatusOr<gradclient::NpyArray> grad = gradclient::ReadNpyFile(expected);
  ASSERT_TRUE(grad.ok()) << grad.status();
  grad->data[5] += 0.5f;
  ASSERT_TRUE(gradclient::WriteNpyFile(expected, grad->shape, grad->data).ok());

  const GradctlRun run = Gradctl({"demo", "conv1", ServerFlag(), "--data=" + data});
  EXPECT_EQ(run.exit_code, 1) << run;
  EXPECT_THAT(run.out, HasSubstr("DOES NOT MATCH PyTorch"));
  EXPECT_THAT(run.out, HasSubstr("conv1.weight gradient: max |actual - expected|"));
  EXPECT_THAT(run.err, HasSubstr("gradctl: INTERNAL: "));

  const GradctlRun missing = Gradctl({"demo", "conv4", ServerFlag(), "--data=" + data});
  EXPECT_EQ(missing.exit_code, 1) << missing;
  EXPECT_THAT(missing.err, HasSubstr(data + "/seed_conv4/input.npy"));
}

TEST_F(GradctlTest, HealthAndInfo) {
  const GradctlRun health = Gradctl({"health", ServerFlag()});
  ASSERT_EQ(health.exit_code, 0) << health;
  EXPECT_EQ(health.out, "SERVING\n");

  const GradctlRun info = Gradctl({"info", ServerFlag()});
  ASSERT_EQ(info.exit_code, 0) << info;
  EXPECT_THAT(info.out, HasSubstr("oneDNN"));
  EXPECT_THAT(info.out, HasSubstr("objectives    mse, sum, grad_output, cross_entropy\n"));
  EXPECT_THAT(info.out, HasSubstr("layers        conv2d, activation, max_pool2d, avg_pool2d, "
                                  "batch_norm2d, linear, add\n"));
  EXPECT_THAT(info.out, HasSubstr("messages 1 GiB"));
  EXPECT_THAT(info.out, HasSubstr("network       up to 1024 layers, 4096 parameters, names of 256 "
                                  "bytes, 1 MiB of spec"));
  EXPECT_THAT(info.out, HasSubstr("memory        budget "));

  const GradctlRun json = Gradctl({"info", ServerFlag(), "--json"});
  ASSERT_EQ(json.exit_code, 0) << json;
  EXPECT_THAT(json.out,
              HasSubstr("\"objectives\":[\"mse\",\"sum\",\"grad_output\",\"cross_entropy\"]"));
  EXPECT_THAT(json.out, HasSubstr("\"max_message_bytes\":1073741824"));
  EXPECT_THAT(json.out, HasSubstr("\"max_layers\":1024,\"max_parameters\":4096"));
  EXPECT_THAT(json.out, HasSubstr("\"memory\":{\"limit_bytes\":"));
  EXPECT_EQ(std::count(json.out.begin(), json.out.end(), '\n'), 1);
}

TEST_F(GradctlTest, BenchReportsThroughputLatencyAndErrors) {
  const GradctlRun json = Gradctl(
      {"bench", ServerFlag(), "--workload=seed1", "--concurrency=3", "--requests=30", "--json"});
  ASSERT_EQ(json.exit_code, 0) << json;
  EXPECT_THAT(json.out,
              HasSubstr("\"workload\":\"seed1\",\"method\":\"gradients\",\"concurrency\":3"));
  EXPECT_THAT(json.out, HasSubstr("\"requests\":30,\"ok\":30,\"failed\":0"));
  EXPECT_THAT(json.out, HasSubstr("\"errors\":{}"));
  absl::StatusOr<double> throughput = JsonNumberField(json.out, "throughput_rps");
  ASSERT_TRUE(throughput.ok()) << throughput.status();
  EXPECT_GT(*throughput, 0);
  absl::StatusOr<double> p99 = JsonNumberField(json.out, "p99");
  ASSERT_TRUE(p99.ok()) << p99.status();
  EXPECT_GT(*p99, 0);
  EXPECT_EQ(json.err, "");  // no progress line: stderr is not a terminal

  const GradctlRun text = Gradctl({"bench", ServerFlag(), "--workload=seed4", "--concurrency=2",
                                   "--duration=0.3s", "--skip_output"});
  ASSERT_EQ(text.exit_code, 0) << text;
  EXPECT_THAT(text.out, HasSubstr("workload      seed4 (gradients), concurrency 2, skip_output"));
  EXPECT_THAT(text.out, HasSubstr("throughput    "));
  EXPECT_THAT(text.out, HasSubstr("latency (ms)  p50 "));
  EXPECT_THAT(text.out, HasSubstr("errors        none"));

  const GradctlRun forward = Gradctl(
      {"bench", ServerFlag(), "--workload=seed4", "--method=forward", "--requests=5", "--json"});
  ASSERT_EQ(forward.exit_code, 0) << forward;
  EXPECT_THAT(forward.out, HasSubstr("\"method\":\"forward\""));
  EXPECT_THAT(forward.out, HasSubstr("\"requests\":5,\"ok\":5,\"failed\":0"));

  const GradctlRun bad_method =
      Gradctl({"bench", ServerFlag(), "--method=backward", "--requests=1"});
  EXPECT_EQ(bad_method.exit_code, 2) << bad_method;
  EXPECT_THAT(bad_method.err, HasSubstr("--method=backward is unknown"));

  const GradctlRun unknown = Gradctl({"bench", ServerFlag(), "--workload=resnet"});
  EXPECT_EQ(unknown.exit_code, 2) << unknown;
  EXPECT_THAT(unknown.err, HasSubstr("workload=resnet is unknown"));
}

TEST_F(GradctlTest, UnreachableServerIsUnavailable) {
  const GradctlRun run = Gradctl({"info", "--server=127.0.0.1:1", "--timeout=5s"});
  EXPECT_EQ(run.exit_code, 1) << run;
  EXPECT_THAT(run.err, HasSubstr("gradctl: UNAVAILABLE: "));
  const GradctlRun health = Gradctl({"health", "--server=127.0.0.1:1", "--timeout=5s"});
  EXPECT_EQ(health.exit_code, 1) << health;
  EXPECT_THAT(health.err, HasSubstr("gradctl: UNAVAILABLE: "));
}

class GradctlInputTest : public GradctlTest {
 protected:
  void SetUp() override {
    GradctlTest::SetUp();
    case_dir_ = FixturesDir() + "/seed_conv1";
    absl::StatusOr<std::unique_ptr<gradtest::FixtureCase>> fixture =
        gradtest::LoadFixtureCase(case_dir_);
    ASSERT_TRUE(fixture.ok()) << fixture.status();
    net_ = WriteNetJson((*fixture)->spec.network, "net.json");
  }

  std::vector<std::string> Args(const std::string& net, const std::string& input) {
    return {"grad",
            ServerFlag(),
            "--net=" + net,
            "--input=" + input,
            "--params=" + case_dir_ + "/params",
            "--target=" + case_dir_ + "/target.npy",
            "--out=" + dir_ + "/out"};
  }

  std::string case_dir_;
  std::string net_;
};

TEST_F(GradctlInputTest, FortranOrderNpyIsRejectedNamingTheFile) {
  std::string bytes = ReadTextFile(case_dir_ + "/input.npy");
  const size_t at = bytes.find("'fortran_order': False");
  ASSERT_NE(at, std::string::npos);
  bytes.replace(at, 22, "'fortran_order': True ");
  const std::string input = dir_ + "/fortran.npy";
  WriteFile(input, bytes);
  const GradctlRun run = Gradctl(Args(net_, input));
  EXPECT_EQ(run.exit_code, 1) << run;
  EXPECT_THAT(run.err, HasSubstr("gradctl: INVALID_ARGUMENT: "));
  EXPECT_THAT(run.err, HasSubstr(input));
  EXPECT_THAT(run.err, HasSubstr("fortran_order"));
}

TEST_F(GradctlInputTest, Float64NpyIsConvertedWithANote) {
  // The same input as float64 (numpy's default dtype): the header's '<f4' becomes '<f8', which
  // keeps its length and so the data's alignment, and every value is widened.
  const std::string bytes = ReadTextFile(case_dir_ + "/input.npy");
  absl::StatusOr<gradclient::NpyArray> array = gradclient::ParseNpy(bytes, "input.npy");
  ASSERT_TRUE(array.ok()) << array.status();
  const size_t data_start = bytes.size() - array->data.size() * sizeof(float);
  std::string header = bytes.substr(0, data_start);
  const size_t at = header.find("'<f4'");
  ASSERT_NE(at, std::string::npos);
  header.replace(at, 5, "'<f8'");
  std::string float64 = header;
  for (float value : array->data) {
    const double widened = value;
    float64.append(reinterpret_cast<const char*>(&widened), sizeof(widened));
  }
  const std::string input = dir_ + "/float64.npy";
  WriteFile(input, float64);
  const GradctlRun run = Gradctl(Args(net_, input));
  EXPECT_EQ(run.exit_code, 0) << run;
  EXPECT_EQ(run.err,
            absl::StrCat("gradctl: note: ", input, " is float64 ('<f8'); converted to float32\n"));
}

TEST_F(GradctlInputTest, NetworkJsonWithATypoIsRejectedNamingTheFile) {
  const std::string net = dir_ + "/typo.json";
  WriteFile(net, R"({"layers": [{"name": "conv1", "conv2d": {"inChannels": 1, "outChanels": 8,
                     "kernelSize": [3], "padding": [1]}}]})");
  const GradctlRun run = Gradctl(Args(net, case_dir_ + "/input.npy"));
  EXPECT_EQ(run.exit_code, 1) << run;
  EXPECT_THAT(run.err, HasSubstr("gradctl: INVALID_ARGUMENT: " + net + ": "));
  EXPECT_THAT(run.err, HasSubstr("outChanels"));

  const GradctlRun missing = Gradctl(Args(dir_ + "/absent.json", case_dir_ + "/input.npy"));
  EXPECT_EQ(missing.exit_code, 1) << missing;
  EXPECT_THAT(missing.err, HasSubstr("gradctl: NOT_FOUND: " + dir_ + "/absent.json"));
}

TEST_F(GradctlInputTest, MissingParameterFileIsNotFoundNamingIt) {
  std::vector<std::string> args = Args(net_, case_dir_ + "/input.npy");
  args[4] = "--params=" + dir_;
  const GradctlRun run = Gradctl(args);
  EXPECT_EQ(run.exit_code, 1) << run;
  EXPECT_THAT(run.err, HasSubstr("gradctl: NOT_FOUND: "));
  EXPECT_THAT(run.err, HasSubstr(dir_ + "/conv1.weight.npy"));
}

TEST_F(GradctlInputTest, ServerSideInvalidArgumentIsPrintedWithTheField) {
  gradengine::NetworkSpec network;
  network.layers = {
      {"conv1", gradengine::Conv2dSpec::Square(1, 8, 3, 1, 1, false)},
      {"conv2", gradengine::Conv2dSpec::Square(8, 6, 3, 1, 1, false)},
  };
  std::get<gradengine::Conv2dSpec>(network.layers[1].op).groups = 3;
  const std::string params = dir_ + "/params";
  fs::create_directories(params);
  fs::copy_file(case_dir_ + "/params/conv1.weight.npy", params + "/conv1.weight.npy");
  const std::vector<float> zeros(6 * 2 * 9, 0.0f);
  ASSERT_TRUE(gradclient::WriteNpyFile(params + "/conv2.weight.npy", {6, 2, 3, 3}, zeros).ok());
  std::vector<std::string> args =
      Args(WriteNetJson(network, "groups.json"), case_dir_ + "/input.npy");
  args[4] = "--params=" + params;
  args[5] = "--objective=sum";
  const GradctlRun run = Gradctl(args);
  EXPECT_EQ(run.exit_code, 1) << run;
  EXPECT_THAT(run.err, HasSubstr("gradctl: INVALID_ARGUMENT: "));
  EXPECT_THAT(run.err, HasSubstr("layers[1].conv2d.groups=3 does not divide in_channels=8"));
}

TEST_F(GradctlInputTest, UsageErrorsExitWithTwo) {
  std::vector<std::string> no_objective = Args(net_, case_dir_ + "/input.npy");
  no_objective.erase(no_objective.begin() + 5);
  GradctlRun run = Gradctl(no_objective);
  EXPECT_EQ(run.exit_code, 2) << run;
  EXPECT_THAT(run.err, HasSubstr("--target=T.npy"));
  EXPECT_THAT(run.err, HasSubstr("--grad_output=G.npy"));
  EXPECT_THAT(run.err, HasSubstr("--objective=sum"));

  std::vector<std::string> two_objectives = Args(net_, case_dir_ + "/input.npy");
  two_objectives.push_back("--objective=sum");
  run = Gradctl(two_objectives);
  EXPECT_EQ(run.exit_code, 2) << run;
  EXPECT_THAT(run.err, HasSubstr("exactly one objective"));

  std::vector<std::string> bad_objective = no_objective;
  bad_objective.push_back("--objective=mse");
  run = Gradctl(bad_objective);
  EXPECT_EQ(run.exit_code, 2) << run;
  EXPECT_THAT(run.err, HasSubstr("--objective=mse"));

  std::vector<std::string> no_labels = no_objective;
  no_labels.push_back("--objective=cross_entropy");
  run = Gradctl(no_labels);
  EXPECT_EQ(run.exit_code, 2) << run;
  EXPECT_THAT(run.err, HasSubstr("--objective=cross_entropy needs --labels=L.npy"));

  // Labels must be int64: a float32 file is refused naming it (not a usage error).
  std::vector<std::string> float_labels = no_labels;
  float_labels.push_back("--labels=" + case_dir_ + "/target.npy");
  run = Gradctl(float_labels);
  EXPECT_EQ(run.exit_code, 1) << run;
  EXPECT_THAT(run.err, HasSubstr("target.npy: unsupported dtype: descr='<f4'; expected int64 or "
                                 "int32"));

  for (const char* flag : {"--labels=l.npy", "--label_smoothing=0.1", "--ignore_index=3"}) {
    std::vector<std::string> stray = Args(net_, case_dir_ + "/input.npy");
    stray.push_back(flag);
    run = Gradctl(stray);
    EXPECT_EQ(run.exit_code, 2) << run;
    EXPECT_THAT(run.err, HasSubstr("goes only with --objective=cross_entropy")) << flag;
  }

  std::vector<std::string> wrong_flag = Args(net_, case_dir_ + "/input.npy");
  wrong_flag.push_back("--json");
  run = Gradctl(wrong_flag);
  EXPECT_EQ(run.exit_code, 2) << run;
  EXPECT_THAT(run.err, HasSubstr("--json is not a flag of gradctl grad"));

  std::vector<std::string> no_shards = Args(net_, case_dir_ + "/input.npy");
  no_shards.push_back("--shards=0");
  run = Gradctl(no_shards);
  EXPECT_EQ(run.exit_code, 2) << run;
  EXPECT_THAT(run.err, HasSubstr("--shards=0 is out of range 1..64"));

  run = Gradctl({"grad", "--nett=x.json"});
  EXPECT_EQ(run.exit_code, 2) << run;
  EXPECT_THAT(run.err, HasSubstr("unknown flag --nett"));

  run = Gradctl({"bench", "--concurrency=many"});
  EXPECT_EQ(run.exit_code, 2) << run;
  EXPECT_THAT(run.err, HasSubstr("--concurrency=many"));

  run = Gradctl({"grad", ServerFlag(), "--input=x.npy"});
  EXPECT_EQ(run.exit_code, 2) << run;
  EXPECT_THAT(run.err, HasSubstr("gradctl grad needs --net"));

  run = Gradctl({"frobnicate"});
  EXPECT_EQ(run.exit_code, 2) << run;
  EXPECT_THAT(run.err, HasSubstr("unknown command \"frobnicate\""));

  run = Gradctl({"demo", "conv9", ServerFlag()});
  EXPECT_EQ(run.exit_code, 2) << run;
  EXPECT_THAT(run.err, HasSubstr("choose conv1, conv4, layer or all"));

  run = Gradctl({});
  EXPECT_EQ(run.exit_code, 2) << run;
  EXPECT_THAT(run.err, HasSubstr("usage: gradctl COMMAND"));

  run = Gradctl({"help"});
  EXPECT_EQ(run.exit_code, 0) << run;
  EXPECT_THAT(run.out, HasSubstr("usage: gradctl COMMAND"));
}

}  // namespace
