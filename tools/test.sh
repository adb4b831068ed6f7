#!/usr/bin/env bash
# tools/test.sh — the README's test command. Installs what is missing (apt-get), builds into
# build/, and runs every test: ctest (C++ suites, CLI, benchmark smoke runs, reliability) and
# pytest (Python bindings). Then builds the tests with ASan+UBSan and with TSan and runs them.
#
#   tools/test.sh              everything (CI runs this)
#   tools/test.sh --quick      skip the sanitizer builds
#   tools/test.sh --soak       also the long soak runs (hours; never in CI)
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
soak=0
for arg in "$@"; do
  case "$arg" in
    --quick) quick=1 ;;
    --soak) soak=1 ;;
    *) echo "usage: tools/test.sh [--quick] [--soak]" >&2; exit 2 ;;
  esac
done

jobs=2
start=$(date +%s)
step() { printf '\n==== %s (%ds)\n' "$1" $(( $(date +%s) - start )); }

step "dependencies"
tools/install-deps.sh

step "build (build/)"
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPYTHON_EXECUTABLE=/usr/bin/python3 \
  -DEMBSTORE_BUILD_TESTS=ON -DEMBSTORE_BUILD_TOOLS=ON -DEMBSTORE_BUILD_BENCH=ON \
  -DEMBSTORE_BUILD_PYTHON=ON -DEMBSTORE_SANITIZE= >/dev/null
cmake --build build -j"$jobs"

step "ctest"
(cd build && ctest --output-on-failure -j"$jobs" --timeout 900)

if [ -d tests/python ]; then
  step "pytest"
  PYTHONPATH=build/python /usr/bin/python3 -m pytest -q -p no:cacheprovider tests/python
fi

if [ "$quick" = 0 ]; then
  for sanitizer in address,undefined thread; do
    dir="build-${sanitizer%%,*}"
    step "sanitizer build: $sanitizer ($dir/)"
    # Debug (assertions on) at -O1 with line tables only, as the sanitizers' own documentation
    # advises: the suites ran ~35% faster than at -O0 (ASan: 244 -> 157 s for the five longest),
    # for ~25% more compile time, and reports still name every file and line.
    # Only what the suites run: no Python module, benchmarks or command-line tool (the tool's
    # suites need the Python module, and a sanitizer in a Python extension needs its runtime
    # preloaded into the interpreter), and so none of what only they link: the tools' library
    # and the user's build of embstore (CMakeLists.txt). That is ~40% of the compiler's time.
    cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG="-O1 -g1" \
      -DEMBSTORE_SANITIZE="$sanitizer" -DEMBSTORE_BUILD_PYTHON=OFF -DEMBSTORE_BUILD_BENCH=OFF \
      -DEMBSTORE_BUILD_TOOLS=OFF -DEMBSTORE_INSTALL=OFF >/dev/null
    cmake --build "$dir" -j"$jobs"
    # TSan allows only a few TiB of application address space: give each store a smaller
    # reservation than the 1 TiB default.
    export EMBSTORE_MAP_BYTES=$((64 << 30))
    # Tests fork children that open writers (which may start a sync thread) from multi-threaded
    # parents; TSan refuses new threads after such a fork unless told otherwise.
    export TSAN_OPTIONS="die_after_fork=0 ${TSAN_OPTIONS:-}"
    if [ -x tests/reliability/ci.sh ]; then
      tests/reliability/ci.sh "$dir" "$sanitizer"
    else
      (cd "$dir" && ctest --output-on-failure -j"$jobs" --timeout 900)
    fi
  done
  unset EMBSTORE_MAP_BYTES TSAN_OPTIONS
fi

if [ "$soak" = 1 ] && [ -x tests/reliability/soak.sh ]; then
  step "soak"
  tests/reliability/soak.sh build
fi

step "all tests passed"
