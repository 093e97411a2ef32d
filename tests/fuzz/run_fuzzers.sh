#!/usr/bin/env bash
# Runs every libFuzzer target of tests/fuzz (each NAME.cc ending in _fuzzer) for a bounded time,
# starting from its committed corpus, and fails if any of them finds a crash, a sanitizer
# report, a leak or a timeout. The committed corpus is only read: inputs found on the way go to a
# temporary folder that is removed afterwards, and crashing inputs to BUILD/fuzz-artifacts/.
#
#   bash tests/fuzz/run_fuzzers.sh BUILD SECONDS
#
# BUILD is a folder configured with -DGRAD_FUZZ=ON whose fuzz targets are built
# (cmake --build BUILD --target grad_fuzzers); SECONDS is each target's time.
# Prints per target: executions per second, coverage (cov: edges, ft: features) and corpus size.
set -euo pipefail

if [[ $# -ne 2 || ! "$2" =~ ^[0-9]+$ || "$2" -lt 1 ]]; then
  echo "usage: $0 BUILD_DIR SECONDS_PER_TARGET" >&2
  exit 2
fi
fuzz_dir="$(cd "$(dirname "$0")" && pwd)"
build="$(cd "$1" && pwd)"
seconds="$2"
artifacts="$build/fuzz-artifacts"
mkdir -p "$artifacts"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

targets=()
for source in "$fuzz_dir"/*_fuzzer.cc; do
  targets+=("$(basename "$source" .cc)")
done

failed=()
for name in "${targets[@]}"; do
  binary="$build/tests/fuzz/$name"
  corpus="$fuzz_dir/corpus/$name"
  if [[ ! -x "$binary" ]]; then
    echo "$name: $binary is not built (cmake --build $build --target grad_fuzzers)" >&2
    exit 1
  fi
  if [[ ! -d "$corpus" ]]; then
    echo "$name: no seed corpus at $corpus" >&2
    exit 1
  fi
  flags=(-max_total_time="$seconds" -timeout=10 -print_final_stats=1
         -artifact_prefix="$artifacts/$name-")
  if [[ -f "$fuzz_dir/$name.dict" ]]; then
    flags+=(-dict="$fuzz_dir/$name.dict")
  fi
  mkdir "$work/$name"
  log="$build/fuzz-$name.log"
  status=0
  UBSAN_OPTIONS="print_stacktrace=1" "$binary" "${flags[@]}" "$work/$name" "$corpus" \
    > "$log" 2>&1 || status=$?

  # The last status line: "#RUNS DONE cov: N ft: N corp: N/SIZE ..." (or the last before a finding).
  last="$(grep -E '^#[0-9]+' "$log" | tail -n 1 || true)"
  cov="$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<< "$last")"
  ft="$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<< "$last")"
  corp="$(sed -nE 's/.* corp: ([0-9]+)\/.*/\1/p' <<< "$last")"
  runs="$(sed -nE 's/^stat::number_of_executed_units: *([0-9]+)/\1/p' "$log")"
  per_second="$(sed -nE 's/^stat::average_exec_per_sec: *([0-9]+)/\1/p' "$log")"
  seeds="$(find "$corpus" -type f | wc -l)"
  found="$(find "$work/$name" -type f | wc -l)"
  if [[ "$status" -eq 0 ]]; then
    outcome="no finding"
  else
    outcome="FINDING (exit $status)"
    failed+=("$name")
  fi
  printf '%-24s %4s s  %7s exec/s  %9s runs  cov %5s  ft %6s  corpus %4s (%s seeds, %s new)  %s\n' \
    "$name" "$seconds" "${per_second:-?}" "${runs:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" \
    "$seeds" "$found" "$outcome"
  if [[ "$status" -ne 0 ]]; then
    echo "---- $name: the end of $log" >&2
    tail -n 60 "$log" >&2
    echo "---- $name: reproduce with $binary $artifacts/$name-<crash-|leak-|timeout-...>" >&2
  fi
done

if [[ ${#failed[@]} -gt 0 ]]; then
  echo "fuzzing found problems in: ${failed[*]}" >&2
  exit 1
fi
echo "${#targets[@]} fuzz targets ran ${seconds} s each without a finding"
