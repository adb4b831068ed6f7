#!/usr/bin/env bash
# tests/reliability/ci.sh <build-dir> [fuzz-seconds]
#
# Runs the reliability suites that mean something under the build's sanitizer, then a short
# libFuzzer run, then prints the summary. The build dir must already be configured (the script
# builds the targets it needs), e.g. with -DEMBSTORE_SANITIZE=address,undefined or =thread:
#   address,undefined  every scenario (9 skips itself: ASan needs RLIMIT_AS unlimited) + fuzz
#                      corpus replay, at 1/2 of the CI sizes (ASan is ~2-3x slower)
#   thread             the scenarios with threads in one process (5's threaded variant, 10) and
#                      the crash/model ones that fork (2, 15), at 1/2 size: TSan checks races,
#                      and the process-only scenarios have none to find
#   (none)             everything at full CI size
# Fuzzing (tests/fuzz/run.sh, clang-14, its own build dir <build-dir>/fuzz) runs in every case;
# FUZZ_SECONDS=0 or a second argument of 0 skips it.
set -euo pipefail
build=$(cd "${1:?usage: ci.sh <build-dir> [fuzz-seconds]}" && pwd)
fuzz_seconds=${2:-${FUZZ_SECONDS:-60}}
here=$(cd "$(dirname "$0")" && pwd)
san=$(sed -n 's/^EMBSTORE_SANITIZE:STRING=//p' "$build/CMakeCache.txt")
stats="$build/reliability-stats"

cmake --build "$build" -j2 --target embstore_torture embstore_fuzz_replay

case "$san" in
  *address*)
    export EMBSTORE_TORTURE_SCALE=${EMBSTORE_TORTURE_SCALE:-0.5}
    export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:allocator_may_return_null=1}
    export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
    select=(-L 'reliability|fuzz-replay')
    ;;
  *thread*)
    export EMBSTORE_TORTURE_SCALE=${EMBSTORE_TORTURE_SCALE:-0.5}
    export TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=1:second_deadlock_stack=1:die_after_fork=0}
    select=(-R 'reliability_(stats_reset|summary|scenario_(2|5|10|15))$')
    ;;
  *)
    select=(-L 'reliability|fuzz-replay')
    ;;
esac
echo "== reliability suites (sanitizer: ${san:-none}, scale ${EMBSTORE_TORTURE_SCALE:-1})"
ctest --test-dir "$build" "${select[@]}" -j2 --output-on-failure

if [[ $fuzz_seconds != 0 ]]; then
  echo "== libFuzzer for ${fuzz_seconds}s"
  EMBSTORE_STATS_DIR="$stats" "$here/../fuzz/run.sh" "$fuzz_seconds" "$build/fuzz"
fi
"$build/bin/embstore_torture" summary "$stats"
