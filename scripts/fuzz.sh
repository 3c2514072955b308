#!/usr/bin/env bash
# Long property-test ("fuzz") run of tests/fuzz_props.rs: every property with
# PROPTEST_CASES cases (default 20000; CI's short form is the test file's own default).
# A failure prints the minimal input; proptest saves its seed to
# tests/fixtures/fuzz/proptest-seeds.txt so the next run replays it first. Turn a crash
# into a fixture + regression test (see tests/fixtures/fuzz/README.md).
#   scripts/fuzz.sh                     # 20000 cases per property
#   PROPTEST_CASES=2000 scripts/fuzz.sh # shorter
#   scripts/fuzz.sh config_             # only properties whose name contains config_
set -euo pipefail
cd "$(dirname "$0")/.."
export PROPTEST_CASES="${PROPTEST_CASES:-20000}"
# Shrinking a failure may take many steps; keep it bounded.
export PROPTEST_MAX_SHRINK_ITERS="${PROPTEST_MAX_SHRINK_ITERS:-4096}"
start=$(date +%s)
echo "fuzz: PROPTEST_CASES=$PROPTEST_CASES"
status=0
cargo test --test fuzz_props -- --test-threads="${FUZZ_THREADS:-2}" "$@" || status=$?
echo "fuzz: finished in $(( $(date +%s) - start )) s (exit $status)"
exit "$status"
