// `gradctl train` end to end against an in-process server: a run SIGKILLed mid-way (with
// --checkpoint_every=1) and resumed with --resume ends with the parameters, history and test
// accuracy of an unbroken run; the history file's lines; the progress line on a terminal only;
// usage errors naming the flag.

#include <fcntl.h>
#include <pty.h>
#include <signal.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gradclient/npy.h"
#include "gtest/gtest.h"
#include "tests/cli/gradctl_runner.h"
#include "tests/service/server_process.h"
#include "tests/service/service_test_util.h"

namespace {

namespace fs = std::filesystem;
using ::gradclitest::GradctlRun;
using ::gradclitest::RunGradctl;
using ::testing::HasSubstr;

constexpr int64_t kExamples = 600;
constexpr int64_t kBatch = 4;
constexpr int64_t kEpochs = 2;
constexpr int64_t kSteps = kEpochs * kExamples / kBatch;
constexpr int64_t kClasses = 4;

constexpr char kNetwork[] = R"({"layers": [
  {"name": "conv1", "conv2d": {"inChannels": 1, "outChannels": 3, "kernelSize": [3],
                               "padding": [1], "bias": true}},
  {"name": "bn1", "batchNorm2d": {"numFeatures": 3, "training": true}},
  {"name": "relu1", "activation": {"kind": "RELU"}},
  {"name": "pool1", "maxPool2d": {"kernelSize": [2]}},
  {"name": "fc", "linear": {"inFeatures": 27, "outFeatures": 4, "bias": true}}
]})";

std::string ReadFile(const fs::path& path) {
  std::ifstream file(path, std::ios::binary);
  std::ostringstream text;
  text << file.rdbuf();
  return text.str();
}

void WriteFile(const fs::path& path, const std::string& bytes) {
  std::ofstream file(path, std::ios::binary | std::ios::trunc);
  file << bytes;
}

// An int64 .npy of shape [n], as numpy.save writes it (npy.h writes only float32).
std::string Int64Npy(const std::vector<int64_t>& values) {
  std::string header =
      absl::StrCat("{'descr': '<i8', 'fortran_order': False, 'shape': (", values.size(), ",), }");
  const size_t unpadded = 10 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header += '\n';
  std::string bytes = "\x93NUMPY";
  bytes += '\x01';
  bytes += '\x00';
  bytes += static_cast<char>(header.size() & 0xff);
  bytes += static_cast<char>(header.size() >> 8);
  bytes += header;
  bytes.append(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(int64_t));
  return bytes;
}

// Writes inputs [n, 1, 6, 6] and labels [n] whose class depends on the input, so that training
// has something to learn.
void WriteData(const fs::path& dir, const std::string& prefix, int64_t n, uint32_t seed) {
  std::mt19937 random(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> inputs(static_cast<size_t>(n * 36));
  std::vector<int64_t> labels(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t label = static_cast<int64_t>(random() % kClasses);
    labels[static_cast<size_t>(i)] = label;
    for (int64_t p = 0; p < 36; ++p) {
      // Each class lights up its own quadrant.
      const int64_t quadrant = (p / 6 >= 3) * 2 + (p % 6 >= 3);
      inputs[static_cast<size_t>(i * 36 + p)] = normal(random) + (quadrant == label ? 1.5f : 0.0f);
    }
  }
  ASSERT_TRUE(
      gradclient::WriteNpyFile((dir / (prefix + "_inputs.npy")).string(), {n, 1, 6, 6}, inputs)
          .ok());
  WriteFile(dir / (prefix + "_labels.npy"), Int64Npy(labels));
}

std::vector<std::string> Lines(const std::string& text) {
  return absl::StrSplit(text, '\n', absl::SkipEmpty());
}

// The value of "key": in a history line, as text (up to the next , or }).
std::string Field(absl::string_view line, absl::string_view key) {
  const std::string quoted = absl::StrCat("\"", key, "\":");
  const size_t at = line.find(quoted);
  if (at == absl::string_view::npos) return "";
  absl::string_view rest = line.substr(at + quoted.size());
  return std::string(rest.substr(0, rest.find_first_of(",}")));
}

// What gradctl printed with its stderr on a pseudo-terminal (stdout to a file, stdin empty).
struct TerminalRun {
  int exit_code = -1;
  std::string out;
  std::string terminal;  // stderr, as the terminal received it
};

TerminalRun RunGradctlOnTerminal(const fs::path& dir, const std::vector<std::string>& args) {
  TerminalRun run;
  int controller = -1;
  int terminal = -1;
  if (openpty(&controller, &terminal, nullptr, nullptr, nullptr) != 0) {
    ADD_FAILURE() << "openpty: " << std::strerror(errno);
    return run;
  }
  // No output processing, so that the bytes read are the bytes gradctl wrote ("\n" stays "\n"
  // rather than becoming "\r\n", which would look like a refresh).
  termios settings;
  if (tcgetattr(terminal, &settings) == 0) {
    settings.c_oflag &= ~static_cast<tcflag_t>(OPOST);
    tcsetattr(terminal, TCSANOW, &settings);
  }
  const std::string out_path = (dir / "gradctl_terminal.stdout").string();
  std::vector<std::string> argv_strings = {GRADCTL_BINARY};
  argv_strings.insert(argv_strings.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& arg : argv_strings) argv.push_back(arg.data());
  argv.push_back(nullptr);
  // The environment without GRADCTL_AUTH_TOKEN (as RunGradctl), made before fork: between fork
  // and exec only async-signal-safe calls are allowed.
  std::vector<char*> envp;
  for (char** each = environ; *each != nullptr; ++each) {
    if (std::strncmp(*each, "GRADCTL_AUTH_TOKEN=", 19) != 0) envp.push_back(*each);
  }
  envp.push_back(nullptr);
  const pid_t pid = fork();
  if (pid == 0) {
    const int out = open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const int in = open("/dev/null", O_RDONLY);
    if (out < 0 || in < 0 || dup2(in, STDIN_FILENO) < 0 || dup2(out, STDOUT_FILENO) < 0 ||
        dup2(terminal, STDERR_FILENO) < 0) {
      _exit(127);
    }
    close(controller);
    execve(argv[0], argv.data(), envp.data());
    _exit(127);
  }
  close(terminal);
  if (pid < 0) {
    ADD_FAILURE() << "fork: " << std::strerror(errno);
    close(controller);
    return run;
  }
  // Read until every writer has closed the terminal (EIO on Linux), so that the child never
  // blocks on a full terminal buffer.
  char buffer[4096];
  for (;;) {
    const ssize_t n = read(controller, buffer, sizeof(buffer));
    if (n > 0) {
      run.terminal.append(buffer, static_cast<size_t>(n));
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else {
      break;
    }
  }
  close(controller);
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  run.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  run.out = ReadFile(out_path);
  return run;
}

class GradctlTrainTest : public ::testing::Test {
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
    dir_ = fs::path(::testing::TempDir()) /
           absl::StrCat("gradctl_train_test_", getpid(), "_",
                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    WriteFile(dir_ / "net.json", kNetwork);
    WriteData(dir_, "train", kExamples, 1);
    WriteData(dir_, "test", 100, 2);
  }

  std::vector<std::string> TrainArgs(const std::string& out) const {
    return {"train",
            "--server=" + server_->target,
            "--net=" + (dir_ / "net.json").string(),
            "--inputs=" + (dir_ / "train_inputs.npy").string(),
            "--labels=" + (dir_ / "train_labels.npy").string(),
            "--test_inputs=" + (dir_ / "test_inputs.npy").string(),
            "--test_labels=" + (dir_ / "test_labels.npy").string(),
            absl::StrCat("--epochs=", kEpochs),
            absl::StrCat("--batch=", kBatch),
            "--optimizer=adamw",
            "--lr=0.01",
            "--amsgrad",
            "--seed=3",
            "--out=" + (dir_ / out).string()};
  }

  GradctlRun Gradctl(const std::vector<std::string>& args) {
    return RunGradctl(dir_.string(), args);
  }

  inline static gradservicetest::TestServer* server_ = nullptr;
  fs::path dir_;
};

TEST_F(GradctlTrainTest, WritesHistoryParamsAndTestAccuracy) {
  const GradctlRun run = Gradctl(TrainArgs("out"));
  ASSERT_EQ(run.exit_code, 0) << run;
  EXPECT_THAT(run.out, HasSubstr("test_accuracy="));
  EXPECT_EQ(run.err, "");  // no progress line off a terminal
  const std::vector<std::string> lines = Lines(ReadFile(dir_ / "out" / "history.jsonl"));
  ASSERT_EQ(static_cast<int64_t>(lines.size()), kSteps + kEpochs);
  int64_t step = 0;
  int64_t epochs = 0;
  for (const std::string& line : lines) {
    if (Field(line, "kind") == "\"epoch\"") {
      ++epochs;
      EXPECT_EQ(Field(line, "epoch"), absl::StrCat(epochs)) << line;
      EXPECT_EQ(Field(line, "step"), absl::StrCat(step)) << line;
      for (const char* key : {"train_loss", "test_loss", "test_accuracy", "elapsed_s"}) {
        EXPECT_NE(Field(line, key), "") << key << " in " << line;
      }
      continue;
    }
    ++step;
    EXPECT_EQ(Field(line, "kind"), "\"step\"") << line;
    EXPECT_EQ(Field(line, "step"), absl::StrCat(step)) << line;
    EXPECT_EQ(Field(line, "epoch"), absl::StrCat((step - 1) / (kExamples / kBatch) + 1)) << line;
    for (const char* key : {"loss", "samples_per_s", "elapsed_s"}) {
      EXPECT_NE(Field(line, key), "") << key << " in " << line;
    }
  }
  // It learnt: the data's classes are easy to tell apart.
  double accuracy = 0;
  ASSERT_TRUE(absl::SimpleAtod(Field(lines.back(), "test_accuracy"), &accuracy)) << lines.back();
  EXPECT_GT(accuracy, 0.6);
  for (const char* name : {"conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias",
                           "bn1.running_mean", "bn1.running_var", "fc.weight", "fc.bias"}) {
    EXPECT_TRUE(fs::exists(dir_ / "out" / "params" / absl::StrCat(name, ".npy"))) << name;
  }
  EXPECT_TRUE(fs::exists(dir_ / "out" / "checkpoint" / "position.json"));
}

TEST_F(GradctlTrainTest, KilledMidRunAndResumedEndsLikeAnUnbrokenRun) {
  const GradctlRun unbroken = Gradctl(TrainArgs("unbroken"));
  ASSERT_EQ(unbroken.exit_code, 0) << unbroken;

  std::vector<std::string> args = TrainArgs("killed");
  args.push_back("--checkpoint_every=1");
  gradservicetest::ServerProcess process;
  std::vector<std::string> flags(args.begin(), args.end());
  ASSERT_TRUE(process.Start(GRADCTL_BINARY, flags));
  // Kill it once it is well into the first epoch.
  const fs::path history = dir_ / "killed" / "history.jsonl";
  const absl::Time give_up = absl::Now() + absl::Seconds(120);
  while (Lines(ReadFile(history)).size() < 60 && absl::Now() < give_up) {
    absl::SleepFor(absl::Microseconds(200));
  }
  process.Signal(SIGKILL);
  ASSERT_EQ(process.WaitForExit(absl::Seconds(30)), 128 + SIGKILL)
      << "gradctl train finished before it could be killed mid-run: " << process.Stderr();
  const size_t lines_at_kill = Lines(ReadFile(history)).size();
  ASSERT_LT(static_cast<int64_t>(lines_at_kill), kSteps) << "killed too late to test a resume";

  args.push_back("--resume");
  const GradctlRun resumed = Gradctl(args);
  ASSERT_EQ(resumed.exit_code, 0) << resumed;

  // The same parameters, bit for bit, running statistics included.
  for (const fs::directory_entry& entry : fs::directory_iterator(dir_ / "unbroken" / "params")) {
    const fs::path other = dir_ / "killed" / "params" / entry.path().filename();
    ASSERT_TRUE(fs::exists(other)) << other;
    EXPECT_EQ(ReadFile(entry.path()), ReadFile(other)) << entry.path().filename();
  }
  // The same history (but for the timings): every step once, with the same losses.
  const std::vector<std::string> expected = Lines(ReadFile(dir_ / "unbroken" / "history.jsonl"));
  const std::vector<std::string> actual = Lines(ReadFile(history));
  ASSERT_EQ(actual.size(), expected.size());
  for (size_t i = 0; i < expected.size(); ++i) {
    for (const char* key :
         {"kind", "epoch", "step", "loss", "train_loss", "test_loss", "test_accuracy"}) {
      EXPECT_EQ(Field(actual[i], key), Field(expected[i], key)) << key << " of line " << i;
    }
  }
  const std::string accuracy_line = "test_accuracy=";
  const std::string unbroken_accuracy =
      unbroken.out.substr(unbroken.out.find(accuracy_line), accuracy_line.size() + 6);
  EXPECT_THAT(resumed.out, HasSubstr(unbroken_accuracy));
}

TEST_F(GradctlTrainTest, ProgressLineOnATerminalOnly) {
  const TerminalRun run = RunGradctlOnTerminal(dir_, TrainArgs("terminal"));
  ASSERT_EQ(run.exit_code, 0) << run.terminal;
  // Refreshed in place: every refresh starts with "\r" and the line ends once, at the end.
  const std::regex refresh(absl::StrCat(R"(\repoch \d+/)", kEpochs, R"(  step (\d+)/)", kSteps,
                                        R"(  loss \d+\.\d{4}  \d+ samples/s  ETA \d+:\d\d +)"));
  std::vector<int64_t> steps;
  for (std::sregex_iterator it(run.terminal.begin(), run.terminal.end(), refresh), end; it != end;
       ++it) {
    steps.push_back(std::stoll((*it)[1].str()));
  }
  ASSERT_FALSE(steps.empty()) << "no progress line in: " << run.terminal;
  EXPECT_EQ(steps.front(), 1) << run.terminal;      // the first step shows at once
  EXPECT_EQ(steps.back(), kSteps) << run.terminal;  // and the last one always
  EXPECT_EQ(run.terminal.back(), '\n') << run.terminal;
  EXPECT_EQ(std::count(run.terminal.begin(), run.terminal.end(), '\n'), 1) << run.terminal;
  EXPECT_THAT(run.out, HasSubstr("test_accuracy="));
  EXPECT_EQ(run.out.find('\r'), std::string::npos) << run.out;  // stdout is not the terminal

  // Off a terminal, stderr gets nothing at all.
  const GradctlRun piped = Gradctl(TrainArgs("piped"));
  ASSERT_EQ(piped.exit_code, 0) << piped;
  EXPECT_EQ(piped.err, "");
  EXPECT_THAT(piped.out, HasSubstr("test_accuracy="));
}

TEST_F(GradctlTrainTest, ResumeWithoutACheckpointFails) {
  std::vector<std::string> args = TrainArgs("fresh");
  args.push_back("--resume");
  const GradctlRun run = Gradctl(args);
  EXPECT_EQ(run.exit_code, 1) << run;
  EXPECT_THAT(run.err, HasSubstr("gradctl: NOT_FOUND: "));
  EXPECT_THAT(run.err, HasSubstr("holds no checkpoint"));
}

TEST_F(GradctlTrainTest, ResumeWithAnotherBatchSizeFails) {
  std::vector<std::string> args = TrainArgs("changed");
  args.push_back("--max_steps=3");
  ASSERT_EQ(Gradctl(args).exit_code, 0);
  for (std::string& arg : args) {
    if (arg.rfind("--batch=", 0) == 0) arg = "--batch=8";
  }
  args.push_back("--resume");
  const GradctlRun run = Gradctl(args);
  EXPECT_EQ(run.exit_code, 1) << run;
  EXPECT_THAT(run.err, HasSubstr("FAILED_PRECONDITION: "));
  EXPECT_THAT(run.err, HasSubstr("batch_size=4, not 8"));
}

TEST_F(GradctlTrainTest, UsageErrorsNameTheFlag) {
  struct Case {
    std::vector<std::string> change;  // flags to add (replacing one of the same name)
    std::vector<std::string> remove;  // flags to drop, by name
    std::string message;
  };
  const std::vector<Case> cases = {
      {{}, {"--optimizer"}, "gradctl train needs --optimizer"},
      {{}, {"--inputs"}, "gradctl train needs --inputs"},
      {{"--optimizer=rmsprop"}, {}, "--optimizer=rmsprop is unknown; expected sgd, adam or adamw"},
      {{"--optimizer=sgd"}, {"--lr", "--amsgrad"}, "--optimizer=sgd needs --lr"},
      {{"--momentum=0.9"}, {}, "--momentum is not an option of --optimizer=adamw"},
      {{"--optimizer=sgd"}, {}, "--amsgrad is not an option of --optimizer=sgd"},
      {{"--beta1=1"}, {}, "--beta1=1 is not in [0, 1)"},
      {{"--lr=-1"}, {}, "--lr=-1 must be >= 0"},
      {{"--optimizer=sgd", "--nesterov"},
       {"--amsgrad"},
       "--nesterov=true requires momentum > 0 and dampening == 0"},
      {{"--epochs=0"}, {}, "--epochs=0 must be >= 1"},
      {{"--batch=-2"}, {}, "--batch=-2 must be >= 1"},
      {{"--checkpoint_every=-1"}, {}, "--checkpoint_every=-1 must be >= 0"},
      {{"--shards=65"}, {}, "--shards=65 is out of range 1..64"},
      {{}, {"--test_labels"}, "--test_inputs and --test_labels go together"},
      {{"--json"}, {}, "--json is not a flag of gradctl train"},
      {{"--epochs=two"}, {}, "--epochs=two"},
  };
  for (const Case& each : cases) {
    std::vector<std::string> args;
    for (const std::string& arg : TrainArgs("usage")) {
      const std::string name = arg.substr(0, arg.find('='));
      bool drop = false;
      for (const std::string& removed : each.remove) drop = drop || name == removed;
      for (const std::string& changed : each.change) {
        drop = drop || name == changed.substr(0, changed.find('='));
      }
      if (!drop) args.push_back(arg);
    }
    for (const std::string& changed : each.change) args.push_back(changed);
    const GradctlRun run = Gradctl(args);
    EXPECT_EQ(run.exit_code, 2) << each.message << "\n" << run;
    EXPECT_THAT(run.err, HasSubstr(each.message)) << run;
  }
  EXPECT_FALSE(fs::exists(dir_ / "usage" / "history.jsonl"));
}

}  // namespace
