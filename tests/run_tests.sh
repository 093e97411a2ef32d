#!/usr/bin/env bash
# The whole test suite: a warnings-as-errors build with every test and the main job
# (deploy/run-demo.sh: gradserver + gradctl demo), then the tests again under AddressSanitizer +
# UndefinedBehaviorSanitizer (all but the engine-against-PyTorch fixtures, which run in the
# first build; the Python and training tests run the sanitized gradserver and gradctl),
# then each libFuzzer target for 30 s in a clang build of its own (tests/fuzz/run_fuzzers.sh:
# the request decoders and validation, shared memory references and framing, the .npy reader,
# gradctl's network JSON, network validation; any crash, leak or timeout fails), and finally
# the container image (deploy/test-image.sh: build the Dockerfile, run gradserver from the
# image, check it with the first build's gradctl and the image's own).
#
#   bash tests/run_tests.sh
#
# GRAD_BUILD (default build/), GRAD_ASAN_BUILD (default build-asan/) and GRAD_FUZZ_BUILD
# (default build-fuzz/) choose the build folders.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${GRAD_BUILD:-$root/build}"
asan_build="${GRAD_ASAN_BUILD:-$root/build-asan}"
fuzz_build="${GRAD_FUZZ_BUILD:-$root/build-fuzz}"
jobs="$(nproc)"

echo "== build ($build)"
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DGRAD_WERROR=ON
cmake --build "$build" -j "$jobs"

echo "== tests"
ctest --test-dir "$build" --output-on-failure -j "$jobs"

echo "== the main job: gradserver and gradctl demo"
bash "$root/deploy/run-demo.sh" "$build" > "$build/run-demo.log" 2>&1 ||
  { cat "$build/run-demo.log"; exit 1; }
grep -c "^Matches PyTorch" "$build/run-demo.log" | grep -qx 3 ||
  { cat "$build/run-demo.log"; echo "run-demo: expected 3 demos matching PyTorch" >&2; exit 1; }
echo "3 demos matched PyTorch through the server"

echo "== tests under AddressSanitizer + UndefinedBehaviorSanitizer ($asan_build)"
cmake -S "$root" -B "$asan_build" -G Ninja -DCMAKE_BUILD_TYPE=Debug -DGRAD_WERROR=ON \
  -DGRAD_SANITIZE=ON -DGRAD_BUILD_BENCHMARKS=OFF
cmake --build "$asan_build" -j "$jobs"
ASAN_OPTIONS="detect_leaks=1:abort_on_error=1" UBSAN_OPTIONS="print_stacktrace=1" \
  LSAN_OPTIONS="suppressions=$root/tests/lsan.supp" \
  ctest --test-dir "$asan_build" --output-on-failure \
  -L "engine|reference|wire|client|cli|service|train|python"

echo "== fuzzing: each libFuzzer target for 30 s ($fuzz_build)"
cmake -S "$root" -B "$fuzz_build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DGRAD_WERROR=ON \
  -DGRAD_FUZZ=ON -DGRAD_BUILD_BENCHMARKS=OFF -DCMAKE_CXX_COMPILER=clang++-14
cmake --build "$fuzz_build" -j "$jobs" --target grad_fuzzers
bash "$root/tests/fuzz/run_fuzzers.sh" "$fuzz_build" 30

echo "== the container image"
bash "$root/deploy/test-image.sh" "$build"
