// The one tolerance every numerical test in the project uses, and the check that applies it.
//
// A computed tensor matches its expected value when
//     max_i |actual_i - expected_i| <= kRelativeTolerance * max(1, max_i |expected_i|).
// 1e-4 is the bound oneDNN's own gtests use for float32 convolutions; it leaves room for the
// different summation orders of oneDNN, PyTorch and the double-precision reference while
// catching any wrong index, sign, scale or missing term.
// Non-finite values must match exactly in kind (NaN where NaN, +Inf where +Inf).

#ifndef TESTS_TOLERANCE_H_
#define TESTS_TOLERANCE_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "gtest/gtest.h"

namespace gradtest {

inline constexpr double kRelativeTolerance = 1e-4;

// A batch computed in parts on the same engine and combined (client/sharding.h) differs from
// the whole batch's result only by the order of float sums over the batch, so it is held to a
// tighter bound, with the same scale as above.
inline constexpr double kShardedRelativeTolerance = 1e-5;

// gradclient's optimizers (client/optimizer.h) against torch.optim fed the same gradients from
// the same start, after each of 50 steps, with the same scale as above. Both compute the same
// float32 operations in the same order, so they differ only where a compiler or kernel fuses a
// multiply-add differently (an ulp or so per step, compounding over the steps).
inline constexpr double kOptimizerRelativeTolerance = 1e-5;

template <typename A, typename E>
::testing::AssertionResult TensorsClose(const std::string& what,
                                        absl::Span<const int64_t> actual_shape,
                                        absl::Span<const A> actual,
                                        absl::Span<const int64_t> expected_shape,
                                        absl::Span<const E> expected,
                                        double relative_tolerance = kRelativeTolerance) {
  if (std::vector<int64_t>(actual_shape.begin(), actual_shape.end()) !=
      std::vector<int64_t>(expected_shape.begin(), expected_shape.end())) {
    std::string a, e;
    for (int64_t d : actual_shape) absl::StrAppend(&a, d, " ");
    for (int64_t d : expected_shape) absl::StrAppend(&e, d, " ");
    return ::testing::AssertionFailure()
           << what << ": shape [" << a << "] != expected [" << e << "]";
  }
  if (actual.size() != expected.size()) {
    return ::testing::AssertionFailure() << what << ": " << actual.size()
                                         << " values != expected " << expected.size();
  }
  double scale = 1.0;
  for (E v : expected) {
    if (std::isfinite(static_cast<double>(v))) {
      scale = std::max(scale, std::abs(static_cast<double>(v)));
    }
  }
  const double bound = relative_tolerance * scale;
  double worst = 0.0;
  size_t worst_index = 0;
  for (size_t i = 0; i < actual.size(); ++i) {
    const double a = static_cast<double>(actual[i]);
    const double e = static_cast<double>(expected[i]);
    if (!std::isfinite(e) || !std::isfinite(a)) {
      const bool same = (std::isnan(a) && std::isnan(e)) || a == e;
      if (!same) {
        return ::testing::AssertionFailure() << what << "[" << i << "] = " << a
                                             << ", expected " << e;
      }
      continue;
    }
    const double diff = std::abs(a - e);
    if (diff > worst) {
      worst = diff;
      worst_index = i;
    }
  }
  if (worst > bound) {
    return ::testing::AssertionFailure()
           << what << ": max |actual - expected| = " << worst << " at flat index "
           << worst_index << " (actual " << static_cast<double>(actual[worst_index])
           << ", expected " << static_cast<double>(expected[worst_index]) << ") exceeds "
           << bound << " = " << relative_tolerance << " * " << scale;
  }
  return ::testing::AssertionSuccess();
}

}  // namespace gradtest

#endif  // TESTS_TOLERANCE_H_
