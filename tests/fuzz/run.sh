#!/usr/bin/env bash
# tests/fuzz/run.sh <seconds> [build-dir] — builds the libFuzzer target with clang-14
# (-fsanitize=fuzzer,address,undefined) into its own directory and fuzzes the store's
# open/verify/iterate (and writer recovery) for <seconds> in total, split over the jobs.
#
# Limits: no sanitizer report, no input slower than FUZZ_TIMEOUT s (default 1; raise it on a
# loaded machine, where a wall-clock second is not a CPU second), no allocation over 256 MB
# (-malloc_limit_mb=256, -rss_limit_mb=2048 for the process). Crashers are written to
# tests/fuzz/corpus/crashers/ (commit them: ctest replays that corpus on every run), new
# interesting inputs to the working corpus in the build dir. Prints "fuzz_execs <n>" and, when
# EMBSTORE_STATS_DIR is set, adds the count to the reliability summary.
set -euo pipefail
seconds=${1:-60}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
build=${2:-$root/build-fuzz}
jobs=${FUZZ_JOBS:-1}
timeout=${FUZZ_TIMEOUT:-1}
mkdir -p "$build"

CXX=${FUZZ_CXX:-clang++-14}
flags="-std=c++20 -O1 -g -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -DEMBSTORE_TESTING=1"
xxhash_inc=$(dirname "$(echo '#include <xxhash.h>' | cpp -H -o /dev/null 2>&1 | grep -m1 'xxhash.h' | awk '{print $2}')")
# A small make-free build: one object per source, rebuilt when the source is newer, compiled
# FUZZ_BUILD_JOBS (default: the CPUs) at a time.
build_jobs=${FUZZ_BUILD_JOBS:-$(nproc)}
objs=()
declare -A compiling=()  # pid -> source
# Waits for one compile; stops the script naming the source it could not compile.
reap() {
  local pid
  wait -n -p pid "${!compiling[@]}" && { unset "compiling[$pid]"; return; }
  echo "run.sh: $CXX cannot compile ${compiling[$pid]}" >&2
  exit 1
}
# The library's sources exactly as the top-level CMakeLists.txt lists them (both sets:
# EMBSTORE_HOOK_FREE_SOURCES and EMBSTORE_HOOKED_SOURCES).
mapfile -t lib_sources < <(sed -n '/^set(EMBSTORE_HOOK\(_FREE\|ED\)_SOURCES/,/^)/p' "$root/CMakeLists.txt" |
  grep -o 'src/[A-Za-z0-9_/]*\.cc')
for src in "${lib_sources[@]/#/$root/}" "$here"/fuzz_store.cc; do
  obj="$build/$(basename "${src%.cc}").o"
  # Any header newer: the library's own (src/) and its public ones (include/), whose structs
  # every object shares (an object left with an old layout corrupts the heap, not the build).
  if [[ ! -f $obj || $src -nt $obj ||
        $(find "$root/src" "$root/include" "$here" -name '*.h' -newer "$obj" | head -1) ]]; then
    (( ${#compiling[@]} < build_jobs )) || reap
    $CXX $flags -c "$src" -o "$obj" -I"$root/include" -I"$root/src" -I"$here" \
      -I"$xxhash_inc" -fsanitize=fuzzer-no-link &
    compiling[$!]=$src
  fi
  objs+=("$obj")
done
while (( ${#compiling[@]} > 0 )); do reap; done
$CXX $flags "${objs[@]}" -o "$build/fuzz_store" -lpthread

work="$build/corpus"
mkdir -p "$work" "$here/corpus/crashers"
if [[ -z $(ls -A "$work") ]]; then
  # Seed the working corpus with valid small stores (the committed corpus holds the same kind).
  cp "$here"/corpus/seeds/* "$work"/ 2>/dev/null || true
fi
log="$build/fuzz.log"
per_job=$(( seconds / jobs ))
(( per_job < 1 )) && per_job=1
set +e
rm -f "$build"/fuzz-*.log
# libFuzzer writes the per-job logs (fuzz-<n>.log) into the current directory.
(cd "$build" && exec "$build/fuzz_store" "$work" "$here/corpus" \
  -dict="$here/store.dict" -max_len=65536 -timeout="$timeout" -malloc_limit_mb=256 -rss_limit_mb=2048 \
  -max_total_time="$per_job" -jobs="$jobs" -workers="$jobs" -print_final_stats=1 \
  -artifact_prefix="$here/corpus/crashers/") >"$log" 2>&1
status=$?
set -e
cat "$build"/fuzz-*.log >>"$log" 2>/dev/null || true
execs=$(grep -h 'stat::number_of_executed_units' "$log" | awk '{s += $2} END {print s + 0}')
echo "fuzz_execs $execs"
if [[ -n ${EMBSTORE_STATS_DIR:-} ]]; then
  mkdir -p "$EMBSTORE_STATS_DIR"
  echo "fuzz_execs $execs" >>"$EMBSTORE_STATS_DIR/stats.fuzz.$$"
fi
if (( status != 0 )) || grep -qE 'ERROR: (AddressSanitizer|libFuzzer|UndefinedBehaviorSanitizer)|runtime error:' "$log"; then
  echo "fuzzing found a problem (exit $status); see $log and tests/fuzz/corpus/crashers/" >&2
  grep -E 'ERROR|runtime error|SUMMARY' "$log" | head -20 >&2
  exit 1
fi
echo "no crash, hang or sanitizer report in ${seconds}s of fuzzing"
