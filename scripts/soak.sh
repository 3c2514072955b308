#!/bin/sh
# Full crash campaign (issue 6 item 2): the real `dps-station run` in release mode,
# >= 2,000 boards submitted through the control socket, >= 20 random kill -9 + restart,
# checked against the emulator's record of creations (0 lost, 0 duplicated).
# Usage: scripts/soak.sh [BOARDS] [KILLS]
#   env: SOAK_SEED=N replays a run; SOAK_RESCAN=0 sets cut-off scans aside instead of
#   scanning them again; SOAK_LONG=1 also runs the fault campaign with the 2-minute outage.
set -u
cd "$(dirname "$0")/.."
export SOAK_BOARDS="${1:-${SOAK_BOARDS:-2000}}"
export SOAK_KILLS="${2:-${SOAK_KILLS:-20}}"
log="${TMPDIR:-/tmp}/dps-station-soak.$$.log"
echo "soak: ${SOAK_BOARDS} boards, ${SOAK_KILLS} kills, release build; full output in ${log}"
start=$(date +%s)
cargo test --release --test soak -- --nocapture --exact \
    random_kill_9_loses_no_acknowledged_board_and_enrolls_none_twice >"$log" 2>&1
rc=$?
grep -E '^soak|panicked|assertion|test result' "$log"
if [ "$rc" -eq 0 ] && [ "${SOAK_LONG:-0}" = "1" ]; then
    SOAK_LONG=1 cargo test --release --test faults >>"$log" 2>&1
    rc=$?
    grep -E 'test result|FAILED' "$log" | tail -n 3
fi
echo "soak: exit ${rc}, wall time $(( $(date +%s) - start )) s"
exit "$rc"
