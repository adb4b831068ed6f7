#!/usr/bin/env bash
# The comparison run: one workload through embstore and what users would pick instead, one table.
#
#   bench/compare/run.sh [--rows N] [--dim D] [--batch B] [--repeat R] [--seed S]
#                        [--only a,b,...] [--out FILE.md] [--build-dir DIR] [--no-settle]
#
# Default workload: 200000 rows x 768 float32, batches of 512, random u64 keys, epoch 0.
# Installs its own Debian packages (needs root), builds embstore (Release) with the comparison
# program in --build-dir (default build-compare), starts redis-server on a free 127.0.0.1 port
# and stops it afterwards. R rounds (default 5); each round runs every system once, in a fresh
# random order drawn from --seed (default: the time; printed, so a run can be replayed), with a
# settle step before each system (see settle() below). The table shows min / median / max per
# system and the ratio to pwrite() in the same round; every round is listed under it.
# Not part of the default test command: it takes minutes and writes ~GBs to $TMPDIR.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
rows=200000 dim=768 batch=512 repeat=5 out="" only="" build_dir="$repo/build-compare"
seed="$(date +%s)" settle=1
while [ $# -gt 0 ]; do
  case "$1" in
    --rows) rows="$2"; shift 2 ;;
    --dim) dim="$2"; shift 2 ;;
    --batch) batch="$2"; shift 2 ;;
    --repeat) repeat="$2"; shift 2 ;;
    --seed) seed="$2"; shift 2 ;;
    --no-settle) settle=0; shift ;;
    --only) only="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --build-dir) build_dir="$2"; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown option $1" >&2; exit 2 ;;
  esac
done

packages=(cmake g++ pkg-config libxxhash-dev libbenchmark-dev python3-numpy
          python3-pybind11 pybind11-dev libhdf5-dev liblmdb-dev libsqlite3-dev redis-server
          libhiredis-dev python3-h5py)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "run.sh: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

echo "run.sh: building in $build_dir" >&2
cmake -S "$repo" -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DEMBSTORE_BUILD_TESTS=OFF \
  -DEMBSTORE_BUILD_PYTHON=ON -DEMBSTORE_BENCH_COMPARE=ON >/dev/null
cmake --build "$build_dir" -j2 --target compare_native >&2
python_ok=1
cmake --build "$build_dir" -j2 --target _embstore >&2 || python_ok=0

work="$(mktemp -d "${TMPDIR:-/tmp}/embstore-compare-XXXXXX")"
redis_pid=""
cleanup() {
  if [ -n "$redis_pid" ]; then kill "$redis_pid" 2>/dev/null || true; wait "$redis_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

port="$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no --dir "$work" \
  --protected-mode yes --logfile "$work/redis.log" &
redis_pid=$!
for _ in $(seq 1 100); do
  redis-cli -h 127.0.0.1 -p "$port" ping >/dev/null 2>&1 && break
  sleep 0.1
done

native=(memcpy pwrite embstore hdf5 lmdb-sync lmdb-nosync sqlite-wal redis)
pythonic=(numpy h5py embstore-py)
wanted() { [ -z "$only" ] || [[ ",$only," == *",$1,"* ]]; }
results="$work/results.jsonl"
: > "$results"

# What a system pays when it runs right after another one freed ~600 MB (measured, bench/RESULTS.md
# "Comparison"): the other one's dirty pages and its deleted files' ext4 journal commit (with
# online discard) land on whoever runs next, and the VM host takes freed guest memory back (free
# page reporting), so the next process's first touches fault in the host. Before each system:
# write back everything (sync), wait until the kernel reports no dirty or writeback pages left
# (at most 30 s), and wait until the host has stopped taking memory back (the reported counter
# stays still for 1 s; at most 30 s). compare_native then touches and frees twice the payload
# right before its timed phase.
meminfo_kb() { awk -v k="$1:" '$1 == k { print $2 }' /proc/meminfo; }
reported_kib() { cat /sys/module/page_reporting/parameters/reported_kib 2>/dev/null || echo 0; }
settle() {
  [ "$settle" = 1 ] || return 0
  local start=$SECONDS
  sync
  while [ $(( $(meminfo_kb Dirty) + $(meminfo_kb Writeback) )) -gt 65536 ] \
        && [ $((SECONDS - start)) -lt 30 ]; do
    sync; sleep 0.2
  done
  local before after
  before="$(reported_kib)"
  while sleep 1; after="$(reported_kib)"; [ "$after" != "$before" ] && [ $((SECONDS - start)) -lt 30 ]; do
    before="$after"
  done
}

# Adds the round, its order and the conditions to each JSON line.
tag() {
  /usr/bin/python3 -c '
import json, sys
extra = json.loads(sys.argv[1])
for line in sys.stdin:
    if line.startswith("{"):
        r = json.loads(line); r.update(extra); print(json.dumps(r), flush=True)
' "$1"
}

all=()
for s in "${native[@]}" "${pythonic[@]}"; do wanted "$s" && all+=("$s"); done
echo "run.sh: seed $seed (replay this order with --seed $seed), settle $([ "$settle" = 1 ] && echo on || echo off)" >&2
RANDOM=$seed
for r in $(seq 1 "$repeat"); do
  order=("${all[@]}")
  for ((i = ${#order[@]} - 1; i > 0; i--)); do  # Fisher-Yates with bash's seeded RANDOM.
    j=$((RANDOM % (i + 1))); t="${order[i]}"; order[i]="${order[j]}"; order[j]="$t"
  done
  echo "run.sh: round $r/$repeat order: ${order[*]}" >&2
  pos=0
  prev=""
  for s in "${order[@]}"; do
    pos=$((pos + 1))
    if [ "$s" = embstore-py ] && [ "$python_ok" = 0 ]; then
      echo "run.sh: embstore-py skipped: the Python module did not build" >&2
      continue
    fi
    t0=$SECONDS
    settle
    extra="$(printf '{"round":%d,"position":%d,"after":"%s","seed":%s,"settle":%d,"settle_s":%d,"load1":%s,"date":"%s"}' \
      "$r" "$pos" "$prev" "$seed" "$settle" $((SECONDS - t0)) "$(cut -d' ' -f1 /proc/loadavg)" \
      "$(date -u +%Y-%m-%dT%H:%M:%SZ)")"
    echo "run.sh: [$r/$repeat] $s" >&2
    if [[ " ${pythonic[*]} " == *" $s "* ]]; then
      PYTHONPATH="$build_dir/python" /usr/bin/python3 "$here/compare_py.py" --system "$s" \
        --dir "$work" --rows "$rows" --dim "$dim" --batch "$batch" | tag "$extra" >> "$results" \
        || echo "run.sh: $s failed" >&2
    else
      "$build_dir/bin/compare_native" --system "$s" --dir "$work" --rows "$rows" --dim "$dim" \
        --batch "$batch" --redis-port "$port" | tag "$extra" >> "$results" \
        || echo "run.sh: $s failed" >&2
    fi
    prev="$s"
  done
done

command="bench/compare/run.sh --rows $rows --dim $dim --batch $batch --repeat $repeat --seed $seed${only:+ --only $only}$([ "$settle" = 1 ] || echo " --no-settle")"
table="$(/usr/bin/python3 "$here/make_table.py" --command "$command" "$results")"
echo "$table"
# Every round is kept: next to --out, or under $TMPDIR when there is none.
kept="${out:+${out%.md}.jsonl}"
kept="${kept:-${TMPDIR:-/tmp}/embstore-compare-$(date -u +%Y%m%dT%H%M%SZ).jsonl}"
cp "$results" "$kept"
[ -z "$out" ] || echo "$table" > "$out"
echo "run.sh: every round's JSON line is in $kept" >&2
