// The engine against PyTorch on configurations drawn afresh on each run: the generator
// (tests/torch/generate_fixtures.py --live) writes random cases into a temporary directory,
// and each is checked as the committed fixtures are. The seed is printed; set GRAD_TEST_SEED
// to rerun the same cases. Skipped where /usr/bin/python3 cannot import torch.

#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>

#include <cstdint>
#include <filesystem>
#include <iostream>
#include <memory>
#include <random>
#include <string>
#include <system_error>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "gradengine/engine.h"
#include "gtest/gtest.h"
#include "tests/torch/fixture.h"

namespace gradtest {
namespace {

constexpr char kPython[] = "/usr/bin/python3";
constexpr int kLiveCases = 5;

// `text` as one word for /bin/sh.
std::string ShellQuote(const std::string& text) {
  return absl::StrCat("'", absl::StrReplaceAll(text, {{"'", "'\\''"}}), "'");
}

struct CommandResult {
  int exit_status = -1;
  std::string output;  // stdout and stderr together
};

CommandResult RunCommand(const std::string& command) {
  CommandResult result;
  FILE* pipe = popen(absl::StrCat(command, " 2>&1").c_str(), "r");
  if (pipe == nullptr) return result;
  char buffer[4096];
  size_t n;
  while ((n = fread(buffer, 1, sizeof(buffer), pipe)) > 0) result.output.append(buffer, n);
  const int status = pclose(pipe);
  result.exit_status = (status != -1 && WIFEXITED(status)) ? WEXITSTATUS(status) : -1;
  return result;
}

bool TorchImportable() {
  return RunCommand(absl::StrCat(kPython, " -c 'import torch'")).exit_status == 0;
}

TEST(LiveTorchTest, RandomConfigurationsMatchPyTorch) {
  if (!TorchImportable()) {
    GTEST_SKIP() << "PyTorch is not importable from " << kPython
                 << " ('import torch' failed), so no live reference can be computed; the "
                    "committed fixtures (fixture_test) still run";
  }
  const char* source_dir = std::getenv("GRAD_SOURCE_DIR");
  ASSERT_NE(source_dir, nullptr) << "GRAD_SOURCE_DIR is not set; run this test through ctest";

  int64_t seed = 0;
  if (const char* seed_text = std::getenv("GRAD_TEST_SEED"); seed_text != nullptr) {
    ASSERT_TRUE(absl::SimpleAtoi(seed_text, &seed) && seed >= 0)
        << "GRAD_TEST_SEED=" << seed_text << " is not a non-negative integer";
  } else {
    std::random_device device;
    seed = std::uniform_int_distribution<int64_t>(0, (int64_t{1} << 31) - 1)(device);
  }
  std::cout << "GRAD_TEST_SEED=" << seed << " (set it to rerun these cases)" << std::endl;
  RecordProperty("GRAD_TEST_SEED", static_cast<int>(seed));

  std::string temp_template =
      (std::filesystem::path(::testing::TempDir()) / "live_torch_XXXXXX").string();
  ASSERT_NE(mkdtemp(temp_template.data()), nullptr) << "mkdtemp " << temp_template;
  const std::string out_dir = temp_template;

  const std::string generator =
      (std::filesystem::path(source_dir) / "tests" / "torch" / "generate_fixtures.py").string();
  const std::string command =
      absl::StrCat(kPython, " ", ShellQuote(generator), " --live --out ", ShellQuote(out_dir),
                   " --seed ", seed, " --count ", kLiveCases);
  const CommandResult generated = RunCommand(command);
  ASSERT_EQ(generated.exit_status, 0) << command << "\n" << generated.output;

  absl::StatusOr<std::vector<std::string>> cases = FindFixtureCases(out_dir);
  ASSERT_TRUE(cases.ok()) << cases.status();
  ASSERT_EQ(cases->size(), static_cast<size_t>(kLiveCases)) << generated.output;

  absl::StatusOr<std::unique_ptr<gradengine::Engine>> engine =
      gradengine::Engine::Create(gradengine::EngineOptions());
  ASSERT_TRUE(engine.ok()) << engine.status();
  for (const std::string& directory : *cases) {
    SCOPED_TRACE(absl::StrCat(directory, " (GRAD_TEST_SEED=", seed, ")"));
    absl::StatusOr<std::unique_ptr<FixtureCase>> fixture = LoadFixtureCase(directory);
    ASSERT_TRUE(fixture.ok()) << fixture.status();
    absl::StatusOr<gradengine::GradientResult> result =
        (*engine)->ComputeGradients((*fixture)->request);
    ASSERT_TRUE(result.ok()) << result.status();
    EXPECT_TRUE(GradientResultMatches(**fixture, *result));
    absl::StatusOr<gradengine::ForwardResult> forward =
        (*engine)->Forward((*fixture)->MakeForwardRequest());
    ASSERT_TRUE(forward.ok()) << forward.status();
    EXPECT_TRUE(ForwardResultMatches(**fixture, *forward));
  }

  if (HasFailure()) {
    std::cout << "cases kept for inspection in " << out_dir << std::endl;
  } else {
    std::error_code ignored;
    std::filesystem::remove_all(out_dir, ignored);
  }
}

}  // namespace
}  // namespace gradtest
