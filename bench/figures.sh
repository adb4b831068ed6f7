#!/usr/bin/env bash
# Re-measures the figures bench/RESULTS.md states targets for, in one command:
#
#   bench/figures.sh [--build-dir DIR] [--compare] [--quick]
#
# Every figure is a same-run ratio over interleaved repeats, printed as min / median / max with
# every repeat listed, and the load average is printed before each step. Runs in order:
#   1. embstore bench, 512 x 768 f32: 1, 2, 4, 8 writer processes (interleaved), 5 repeats;
#      then 512 x 64 f32 and sync on every append, 1 writer; then Python's synchronous
#      Writer.append against it (bench/python_append.py)
#   2. append_bench: the target cases and the small-batch crossover (batch 1..64), 5 interleaved
#      repetitions, with same-repetition ratios (bench/ratios.py)
#   3. read_bench: scans of a warm view, of a freshly opened Reader and of a Reader in a new process
#      against private memory
#   4. with --compare: bench/compare/run.sh --repeat 5 (installs packages, minutes)
# --quick shrinks every size (a check that the command works, not figures). Needs a build with
# -DEMBSTORE_BUILD_BENCH=ON -DEMBSTORE_BUILD_TOOLS=ON (default build dir: build).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
build="$repo/build" compare=0 quick=0
while [ $# -gt 0 ]; do
  case "$1" in
    --build-dir) build="$2"; shift 2 ;;
    --compare) compare=1; shift ;;
    --quick) quick=1; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "figures.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
rows=200000 min_time=1 scan_rows=200000 open_rows=10000000
if [ "$quick" = 1 ]; then
  rows=4096 min_time=0.01 scan_rows=4096 open_rows=20000
  export EMBSTORE_BENCH_BYTES=4194304
fi
step() { echo; echo "== $* ($(date -u +%H:%M:%S) UTC, load average $(cut -d' ' -f1-3 /proc/loadavg))"; }
out="$(mktemp -d "${TMPDIR:-/tmp}/embstore-figures-XXXXXX")"
trap 'rm -rf "$out"' EXIT

step "1a. embstore bench 512 x 768 f32, writers 1,2,4,8"
"$build/bin/embstore" bench --writers 1,2,4,8 --rows "$rows" --repeat 5 --quiet
step "1b. embstore bench 512 x 64 f32"
"$build/bin/embstore" bench --dim 64 --rows $((rows * 4)) --repeat 5 --quiet
step "1c. embstore bench, sync every append"
"$build/bin/embstore" bench --sync every --rows $((rows / 4)) --repeat 5 --quiet

step "1d. Python's synchronous Writer.append against embstore bench (bench/python_append.py)"
PYTHONPATH="$build/python" /usr/bin/python3 "$repo/bench/python_append.py" --bin "$build/bin/embstore" \
  --rounds 5 --rows "$rows"

step "2. append_bench (5 interleaved repetitions)"
"$build/bin/append_bench" --benchmark_min_time="$min_time" \
  --benchmark_filter='BM_(Append|Pwrite|Memcpy)/batch:(1|8|16|32|64|512)/dim:(64|768)/(dtype:0/)?sync:(0|1)' \
  --benchmark_out="$out/append.json" --benchmark_out_format=json >/dev/null
pairs=(
  --pair 'BM_Append/batch:512/dim:768/dtype:0/sync:0=BM_Pwrite/batch:512/dim:768/sync:0/prealloc:0' \
  --pair 'BM_Append/batch:512/dim:768/dtype:0/sync:0=BM_Pwrite/batch:512/dim:768/sync:0/prealloc:1' \
  --pair 'BM_Append/batch:512/dim:64/dtype:0/sync:0=BM_Pwrite/batch:512/dim:64/sync:0/prealloc:0' \
  --pair 'BM_Append/batch:512/dim:768/dtype:0/sync:1=BM_Pwrite/batch:512/dim:768/sync:1/prealloc:0' \
  --pair 'BM_Append/batch:1/dim:768/dtype:0/sync:0=BM_Pwrite/batch:1/dim:768/sync:0/prealloc:0' \
  --pair 'BM_Append/batch:8/dim:768/dtype:0/sync:0=BM_Pwrite/batch:8/dim:768/sync:0/prealloc:0' \
  --pair 'BM_Append/batch:16/dim:768/dtype:0/sync:0=BM_Pwrite/batch:16/dim:768/sync:0/prealloc:0' \
  --pair 'BM_Append/batch:32/dim:768/dtype:0/sync:0=BM_Pwrite/batch:32/dim:768/sync:0/prealloc:0' \
  --pair 'BM_Append/batch:64/dim:768/dtype:0/sync:0=BM_Pwrite/batch:64/dim:768/sync:0/prealloc:0'
)
/usr/bin/python3 "$repo/bench/ratios.py" "$out/append.json" --times 'BM_Append/batch:(1|8|16|32|64)/' \
  "${pairs[@]}"
echo "-- the same per CPU second (kernel time included; less disturbed by other work):"
/usr/bin/python3 "$repo/bench/ratios.py" "$out/append.json" --cpu "${pairs[@]}"

step "2b. append_floor: the floor of each way to keep the checksum rule, x pwrite-pre (5 interleaved repetitions)"
"$build/bin/append_floor" --benchmark_min_time="$min_time" --benchmark_report_aggregates_only=true |
  grep -E '_(min|median|max) ' | grep -o 'BM_Floor[^ ]*\|x_pwrite_pre=[0-9.]*\|variant_us=[0-9.]*' | paste - - -

step "3. read_bench scans and opens (5 interleaved repetitions)"
EMBSTORE_BENCH_ROWS="$scan_rows" EMBSTORE_BENCH_OPEN_ROWS="$open_rows" "$build/bin/read_bench" \
  --benchmark_min_time="$min_time" --benchmark_filter='BM_Scan|BM_OpenReader' \
  --benchmark_out="$out/read.json" --benchmark_out_format=json >/dev/null
/usr/bin/python3 "$repo/bench/ratios.py" "$out/read.json" \
  --pair 'BM_ScanViewCold/populate:0=BM_ScanMemory' --pair 'BM_ScanViewCold/populate:1=BM_ScanMemory' \
  --pair 'BM_ScanView=BM_ScanMemory' \
  --pair 'BM_ScanViewFreshProcess/huge_pages:0/read:0=BM_ScanMemory' \
  --pair 'BM_ScanViewFreshProcess/huge_pages:1/read:0=BM_ScanMemory' \
  --pair 'BM_ScanViewFreshProcess/huge_pages:0/read:1=BM_ScanMemory' \
  --times 'BM_OpenReader'
echo "-- the same per CPU second:"
/usr/bin/python3 "$repo/bench/ratios.py" "$out/read.json" --cpu \
  --pair 'BM_ScanViewCold/populate:0=BM_ScanMemory' --pair 'BM_ScanViewCold/populate:1=BM_ScanMemory' \
  --pair 'BM_ScanView=BM_ScanMemory'


if [ "$compare" = 1 ]; then
  step "4. bench/compare/run.sh --repeat 5"
  "$repo/bench/compare/run.sh" --repeat 5
fi
step "done"
