#include "gradclient/tensor_format.h"

#include <stdlib.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace gradclient {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

// One tensor and what torch printed for it; the format is described in make_format_cases.py.
struct FormatCase {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<float> values;
  std::string expected;
};

float FromBits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

uint32_t ToBits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// Parses a case file; adds a test failure and stops at the first malformed line.
std::vector<FormatCase> ParseCases(std::istream& in) {
  std::vector<FormatCase> cases;
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    const std::vector<absl::string_view> words = absl::StrSplit(line, ' ', absl::SkipEmpty());
    if (words[0] == "case") {
      cases.emplace_back();
      cases.back().name = line.substr(5);
      continue;
    }
    if (cases.empty()) {
      ADD_FAILURE() << "line before the first case: " << line;
      return cases;
    }
    FormatCase& current = cases.back();
    if (words[0] == "shape") {
      for (size_t i = 1; i < words.size(); ++i) {
        int64_t dim;
        if (!absl::SimpleAtoi(words[i], &dim)) ADD_FAILURE() << "bad dim in " << line;
        current.shape.push_back(dim);
      }
    } else if (words[0] == "values") {
      for (size_t i = 1; i < words.size(); ++i) {
        uint32_t bits;
        if (!absl::SimpleHexAtoi(words[i], &bits)) ADD_FAILURE() << "bad value " << words[i];
        current.values.push_back(FromBits(bits));
      }
    } else if (words[0] == "expected") {
      int count = 0;
      if (words.size() != 2 || !absl::SimpleAtoi(words[1], &count)) {
        ADD_FAILURE() << "bad line: " << line;
        return cases;
      }
      std::vector<std::string> lines(count);
      for (std::string& expected_line : lines) {
        if (!std::getline(in, expected_line)) {
          ADD_FAILURE() << "case " << current.name << " ends early";
          return cases;
        }
      }
      current.expected = absl::StrJoin(lines, "\n");
    } else {
      ADD_FAILURE() << "unknown line: " << line;
      return cases;
    }
  }
  return cases;
}

std::string SourceDir() {
  const char* dir = std::getenv("GRAD_SOURCE_DIR");
  return dir == nullptr ? std::string(".") : std::string(dir);
}

// The committed strings from torch 1.13 (client/testdata/make_format_cases.py).
TEST(FormatTensorLikeTorchTest, MatchesRecordedTorchOutput) {
  const std::string path = SourceDir() + "/client/testdata/format_cases.txt";
  std::ifstream file(path);
  ASSERT_TRUE(file.is_open()) << "cannot open " << path << " (set GRAD_SOURCE_DIR)";
  const std::vector<FormatCase> cases = ParseCases(file);
  ASSERT_GE(cases.size(), 60u);
  for (const FormatCase& c : cases) {
    ASSERT_FALSE(c.expected.empty()) << c.name;
    EXPECT_EQ(FormatTensorLikeTorch(c.shape, c.values), c.expected) << "case " << c.name;
  }
}

// A few behaviours spelled out, so they are visible without the data file.
TEST(FormatTensorLikeTorchTest, ZeroDimensional) {
  EXPECT_EQ(FormatTensorLikeTorch({}, {3.14159f}), "tensor(3.1416)");
  EXPECT_EQ(FormatTensorLikeTorch({}, {-7.0f}), "tensor(-7.)");
}

TEST(FormatTensorLikeTorchTest, IntegralValuesGetATrailingPoint) {
  EXPECT_EQ(FormatTensorLikeTorch({4}, {1, -3, 2, 0}), "tensor([ 1., -3.,  2.,  0.])");
}

TEST(FormatTensorLikeTorchTest, IntegralValuesWithWideRangeUseScientific) {
  EXPECT_EQ(FormatTensorLikeTorch({2}, {1, 2000}), "tensor([1.0000e+00, 2.0000e+03])");
}

TEST(FormatTensorLikeTorchTest, NonFiniteValuesDoNotWidenTheColumns) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(FormatTensorLikeTorch({2, 2}, {1, nan, -inf, 2}),
            "tensor([[1., nan],\n        [-inf, 2.]])");
  // Python prints every NaN as "nan", whatever its sign bit.
  EXPECT_EQ(FormatTensorLikeTorch({2}, {-nan, 0.5f}), "tensor([   nan, 0.5000])");
}

TEST(FormatTensorLikeTorchTest, NegativeZeroKeepsItsSign) {
  EXPECT_EQ(FormatTensorLikeTorch({3}, {-0.0f, 0.5f, -1.25f}),
            "tensor([-0.0000,  0.5000, -1.2500])");
}

TEST(FormatTensorLikeTorchTest, EmptyTensorsShowTheirSizeUnlessOneDimensional) {
  EXPECT_EQ(FormatTensorLikeTorch({0}, {}), "tensor([])");
  EXPECT_EQ(FormatTensorLikeTorch({2, 0}, {}), "tensor([], size=(2, 0))");
}

TEST(FormatTensorLikeTorchTest, LongEmptySizeWrapsLikeTorch) {
  // _add_suffixes moves the suffix to its own line once it would pass 80 columns.
  const std::vector<int64_t> shape = {0,          1000000000, 1000000000,
                                      1000000000, 1000000000, 1000000000};
  EXPECT_EQ(FormatTensorLikeTorch(shape, {}),
            "tensor([],\n       size=(0, 1000000000, 1000000000, 1000000000, 1000000000, "
            "1000000000))");
}

TEST(FormatTensorLikeTorchTest, SummarizedNotationComesFromPrintedElementsOnly) {
  std::vector<float> values(2000, 0.5f);
  values[1000] = 1e9f;  // Hidden by summarization; would force scientific notation.
  EXPECT_EQ(FormatTensorLikeTorch({2000}, values),
            "tensor([0.5000, 0.5000, 0.5000,  ..., 0.5000, 0.5000, 0.5000])");
}

TEST(FormatTensorLikeTorchTest, VeryDeepTensorsKeepOneElementPerLine) {
  // At 80 levels the indent passes the line width; torch still prints one element per line.
  const std::vector<int64_t> shape(80, 1);
  std::vector<int64_t> wide = shape;
  wide.back() = 2;
  const std::string text = FormatTensorLikeTorch(wide, {1.5f, 2.5f});
  EXPECT_THAT(text, HasSubstr("1.5000,\n"));
  EXPECT_THAT(text, HasSubstr(std::string(87, ' ') + "2.5000]"));
}

TEST(FormatTensorLikeTorchTest, DescribesShapeMismatchInsteadOfReadingOutOfBounds) {
  EXPECT_EQ(FormatTensorLikeTorch({2, 3}, {1, 2}), "<invalid tensor: shape [2, 3] with 2 values>");
  EXPECT_THAT(FormatTensorLikeTorch({-1}, {}), StartsWith("<invalid tensor"));
  EXPECT_THAT(FormatTensorLikeTorch({}, {}), StartsWith("<invalid tensor"));
  EXPECT_THAT(FormatTensorLikeTorch({1LL << 32, 1LL << 32, 1LL << 32}, {}),
              StartsWith("<invalid tensor"));
}

// Random tensors, printed by the installed torch through make_format_cases.py --from. Skips,
// visibly, when /usr/bin/python3 has no torch.
constexpr char kPython[] = "/usr/bin/python3";

std::vector<FormatCase> RandomCases() {
  std::mt19937 rng(2024);
  auto uniform_int = [&rng](int low, int high) {
    return std::uniform_int_distribution<int>(low, high)(rng);
  };
  const float scales[] = {1e-9f, 1e-6f, 1e-4f, 1e-2f, 1.0f, 30.0f, 1e3f, 1e5f, 1e9f, 1e20f};
  std::vector<FormatCase> cases;
  for (int index = 0; index < 300; ++index) {
    FormatCase c;
    c.name = absl::StrCat("random_", index);
    const int rank = uniform_int(0, 5);
    // Every tenth case is big enough to be summarized.
    const bool big = index % 10 == 0;
    int64_t count = 1;
    for (int d = 0; d < rank; ++d) {
      const int64_t dim =
          big ? uniform_int(1, 12) : uniform_int(rank == 1 ? 0 : 1, rank > 2 ? 4 : 9);
      c.shape.push_back(dim);
      count *= dim;
    }
    if (big && count <= 1000) {
      c.shape.push_back(1001 / count + 1);
      count *= c.shape.back();
    }
    const float scale = scales[uniform_int(0, 9)];
    const int kind = uniform_int(0, 5);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (int64_t i = 0; i < count; ++i) {
      float value = normal(rng) * scale;
      if (kind == 1) value = std::round(normal(rng) * std::max(scale, 10.0f));  // integral
      if (kind == 2) value = std::abs(value);                                   // one sign
      if (kind == 3 && uniform_int(0, 3) == 0) value = 0.0f;                    // sparse
      if (kind == 4 && uniform_int(0, 9) == 0) value = uniform_int(0, 1) ? -0.0f : 1e-5f;
      if (kind == 5 && uniform_int(0, 7) == 0) {
        const float specials[] = {std::numeric_limits<float>::quiet_NaN(),
                                  std::numeric_limits<float>::infinity(),
                                  -std::numeric_limits<float>::infinity()};
        value = specials[uniform_int(0, 2)];
      }
      c.values.push_back(value);
    }
    cases.push_back(std::move(c));
  }
  return cases;
}

TEST(FormatTensorLikeTorchTest, MatchesInstalledTorchOnRandomTensors) {
  const std::string probe = absl::StrCat(kPython, " -c 'import torch' >/dev/null 2>&1");
  if (std::system(probe.c_str()) != 0) GTEST_SKIP() << kPython << " with torch is not available";

  const std::string script = SourceDir() + "/client/testdata/make_format_cases.py";
  ASSERT_TRUE(std::filesystem::exists(script)) << "no " << script << " (set GRAD_SOURCE_DIR)";

  std::string dir = (std::filesystem::temp_directory_path() / "tensor_format_XXXXXX").string();
  ASSERT_NE(mkdtemp(dir.data()), nullptr);
  const std::string input = dir + "/random_cases.txt";
  const std::string output = dir + "/random_cases_printed.txt";
  const std::vector<FormatCase> cases = RandomCases();
  {
    std::ofstream out(input);
    for (const FormatCase& c : cases) {
      out << "case " << c.name << "\nshape";
      for (int64_t dim : c.shape) out << ' ' << dim;
      out << "\nvalues";
      for (float value : c.values)
        out << " " << absl::StrCat(absl::Hex(ToBits(value), absl::kZeroPad8));
      out << '\n';
    }
  }
  const std::string command = absl::StrCat(kPython, " ", script, " --from ", input, " > ", output);
  const int exit_code = std::system(command.c_str());
  std::ifstream printed_file(output);
  const std::vector<FormatCase> printed = ParseCases(printed_file);
  std::error_code ignored;
  std::filesystem::remove_all(dir, ignored);
  ASSERT_EQ(exit_code, 0) << command;

  ASSERT_EQ(printed.size(), cases.size());
  for (size_t i = 0; i < cases.size(); ++i) {
    ASSERT_EQ(printed[i].name, cases[i].name);
    EXPECT_EQ(FormatTensorLikeTorch(cases[i].shape, cases[i].values), printed[i].expected)
        << "case " << cases[i].name << " shape [" << absl::StrJoin(cases[i].shape, ", ") << "]";
  }
}

}  // namespace
}  // namespace gradclient
