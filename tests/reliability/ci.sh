#!/usr/bin/env bash
# tests/reliability/ci.sh <build-dir> [fuzz-seconds | sanitizer-name]
#
# Runs the test suites that mean something under the build's sanitizer (read from the build's
# CMakeCache.txt: EMBSTORE_SANITIZE), a short libFuzzer run, and prints the reliability summary.
# The build dir must be configured; the script builds it first.
#   address,undefined  every ctest suite (unit, multiprocess, crash, corruption, faults, cli,
#                      every reliability scenario at 1/2 of the CI sizes, fuzz corpus replay;
#                      scenario 9 skips itself: ASan needs RLIMIT_AS unlimited), then 60 s of
#                      libFuzzer (clang-14, -fsanitize=fuzzer,address,undefined)
#   thread             every suite except the fork tests and the process-only reliability
#                      scenarios (TSan cannot follow threads started after a fork; it finds
#                      races between threads of one process, and those have none to find):
#                      reliability scenarios 2, 5 (threaded variant), 10, 15 at 1/2 size; no fuzz
#   (none)             every suite at full CI size, then the fuzz run
# The second argument is either the fuzz seconds (0 skips fuzzing; default $FUZZ_SECONDS or 60)
# or the sanitizer name (ignored: the cache says which it is).
set -euo pipefail
build=$(cd "${1:?usage: ci.sh <build-dir> [fuzz-seconds]}" && pwd)
fuzz_seconds=${FUZZ_SECONDS:-60}
if [[ ${2:-} =~ ^[0-9]+$ ]]; then fuzz_seconds=$2; fi
here=$(cd "$(dirname "$0")" && pwd)
san=$(sed -n 's/^EMBSTORE_SANITIZE:STRING=//p' "$build/CMakeCache.txt")
stats="$build/reliability-stats"
jobs=${CI_JOBS:-2}

cmake --build "$build" -j"$jobs"

# The numbers of the tests a ctest selection picks, one a line.
tests_in() { ctest --test-dir "$build" -N "$@" | sed -n 's/^ *Test *#\([0-9]*\):.*/\1/p'; }

case "$san" in
  *address*)
    export EMBSTORE_TORTURE_SCALE=${EMBSTORE_TORTURE_SCALE:-0.5}
    export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:allocator_may_return_null=1}
    export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
    runs=("")
    ;;
  *thread*)
    export EMBSTORE_TORTURE_SCALE=${EMBSTORE_TORTURE_SCALE:-0.5}
    export TSAN_OPTIONS="die_after_fork=0 halt_on_error=1 second_deadlock_stack=1 ${TSAN_OPTIONS:-}"
    # TSan cannot follow a child that starts threads after forking a multi-threaded parent
    # ("dup thread with used id"): the fork tests run in the other builds only.
    # Both selections in one ctest run, so that its scheduler packs them onto the cores (run one
    # after the other, the second ended with scenario 15 alone on one core for ~30 s).
    numbers=$({ tests_in -LE reliability -E forked
                tests_in -R 'reliability_(stats_reset|summary|scenario_(2|5|10|15))$'; } | sort -nu |
              paste -sd, -)
    [[ -n $numbers ]] || { echo "ci.sh: no tests selected in $build" >&2; exit 1; }
    runs=("-I 0,0,0,$numbers")
    fuzz_seconds=0
    ;;
  *)
    runs=("")
    ;;
esac

echo "== ctest (sanitizer: ${san:-none}, reliability scale ${EMBSTORE_TORTURE_SCALE:-1})"
for selection in "${runs[@]}"; do
  # shellcheck disable=SC2086  # the selection is two words on purpose
  ctest --test-dir "$build" $selection -j"$jobs" --timeout 900 --output-on-failure
done

if [[ $fuzz_seconds != 0 ]]; then
  # The fuzz seconds are split over one job per CI core: as much fuzzing in half the wall time.
  fuzz_jobs=${FUZZ_JOBS:-$jobs}
  echo "== libFuzzer for ${fuzz_seconds}s ($fuzz_jobs jobs)"
  EMBSTORE_STATS_DIR="$stats" FUZZ_JOBS=$fuzz_jobs "$here/../fuzz/run.sh" "$fuzz_seconds" "$build/fuzz"
fi
"$build/bin/embstore_torture" summary "$stats"
