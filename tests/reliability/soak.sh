#!/usr/bin/env bash
# tests/reliability/soak.sh [hours] [build-dir]
#
# Runs every scenario in soak mode (EMBSTORE_SOAK=1: ~10-50x the rounds, images, fault
# countdowns and writers of the CI run, plus rows past 4 GiB) with a fresh seed each pass, and a
# libFuzzer run of FUZZ_SECONDS (default 600) per pass, until `hours` (default 4) have passed.
# Stops at the first failure; the failing scenario's seed and replay command are printed.
set -euo pipefail
hours=${1:-4}
here=$(cd "$(dirname "$0")" && pwd)
build=$(cd "${2:-$here/../../build}" && pwd)
fuzz_seconds=${FUZZ_SECONDS:-600}
cmake --build "$build" -j2 --target embstore_torture embstore_fuzz_replay
stats=$(mktemp -d "${TMPDIR:-/tmp}/embstore-soak-stats-XXXXXX")
export EMBSTORE_STATS_DIR=$stats EMBSTORE_SOAK=1
end=$(( $(date +%s) + hours * 3600 ))
pass=0
while (( $(date +%s) < end )); do
  pass=$((pass + 1))
  seed=$(od -An -N6 -tu8 /dev/urandom | tr -d ' ')
  echo "== soak pass $pass, seed $seed ($(date))"
  "$build/bin/embstore_torture" all --soak --seed "$seed"
  if [[ $fuzz_seconds != 0 ]]; then
    FUZZ_JOBS=${FUZZ_JOBS:-2} "$here/../fuzz/run.sh" "$fuzz_seconds" "$build/fuzz-soak"
  fi
done
echo "== soak: $pass passes in $hours h"
"$build/bin/embstore_torture" summary "$stats"
