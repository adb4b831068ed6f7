#!/usr/bin/env bash
# The comparison run: one workload through embstore and what users would pick instead, one table.
#
#   bench/compare/run.sh [--rows N] [--dim D] [--batch B] [--repeat R] [--only a,b,...]
#                        [--out FILE.md] [--build-dir DIR]
#
# Default workload: 200000 rows x 768 float32, batches of 512, random u64 keys, epoch 0.
# Installs its own Debian packages (needs root), builds embstore (Release) with the comparison
# program in --build-dir (default build-compare), starts redis-server on a free 127.0.0.1 port
# and stops it afterwards. Each system runs R times (default 3); the table shows medians.
# Not part of the default test command: it takes minutes and writes ~GBs to $TMPDIR.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
rows=200000 dim=768 batch=512 repeat=3 out="" only="" build_dir="$repo/build-compare"
while [ $# -gt 0 ]; do
  case "$1" in
    --rows) rows="$2"; shift 2 ;;
    --dim) dim="$2"; shift 2 ;;
    --batch) batch="$2"; shift 2 ;;
    --repeat) repeat="$2"; shift 2 ;;
    --only) only="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --build-dir) build_dir="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
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
# Each round starts one system later in the list, so no system always runs right after the same
# one (what the previous run left behind, deleted files and all, slows whichever comes next).
rotate() { local k=$(( $1 % $# + 1 )); shift; local a=("$@"); echo "${a[@]:k-1}" "${a[@]:0:k-1}"; }
for r in $(seq 1 "$repeat"); do
  for s in $(rotate $((r - 1)) "${native[@]}"); do
    wanted "$s" || continue
    echo "run.sh: [$r/$repeat] $s" >&2
    "$build_dir/bin/compare_native" --system "$s" --dir "$work" --rows "$rows" --dim "$dim" \
      --batch "$batch" --redis-port "$port" >> "$results" || echo "run.sh: $s failed" >&2
  done
  for s in $(rotate $((r - 1)) "${pythonic[@]}"); do
    wanted "$s" || continue
    if [ "$s" = embstore-py ] && [ "$python_ok" = 0 ]; then
      echo "run.sh: embstore-py skipped: the Python module did not build" >&2
      continue
    fi
    echo "run.sh: [$r/$repeat] $s" >&2
    PYTHONPATH="$build_dir/python" /usr/bin/python3 "$here/compare_py.py" --system "$s" \
      --dir "$work" --rows "$rows" --dim "$dim" --batch "$batch" >> "$results" \
      || echo "run.sh: $s failed" >&2
  done
done

command="bench/compare/run.sh --rows $rows --dim $dim --batch $batch --repeat $repeat${only:+ --only $only}"
table="$(/usr/bin/python3 "$here/make_table.py" --command "$command" "$results")"
echo "$table"
if [ -n "$out" ]; then
  echo "$table" > "$out"
  cp "$results" "${out%.md}.jsonl"
fi
