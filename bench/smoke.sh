#!/usr/bin/env bash
# bench/smoke.sh PATTERN COMMAND [ARGS...] — a benchmark's smoke run for ctest: passes when
# COMMAND exits 0 and its whole output (stdout and stderr, newlines included) matches the
# extended regular expression PATTERN. ctest's PASS_REGULAR_EXPRESSION alone ignores the exit
# status: a benchmark that printed one result and then failed passed.
set -uo pipefail
pattern=${1:?usage: smoke.sh PATTERN COMMAND [ARGS...]}
shift
out=$("$@" 2>&1)
status=$?
printf '%s\n' "$out"
if [ "$status" -ne 0 ]; then
  echo "smoke: $1 exited with status $status" >&2
  exit 1
fi
if ! printf '%s' "$out" | grep -Ezq -- "$pattern"; then
  echo "smoke: the output of $1 does not match: $pattern" >&2
  exit 1
fi
