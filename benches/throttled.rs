//! Throttled-quota benchmark (DESIGN §9: with DPS at 1,000 ops/min, ≥ 95 % of the 10,000
//! enrollments/min ceiling, zero lost, 429s handled by pacing rather than by failure).
//!
//! Station side: the in-process DPS emulator limited to 1,000 operations per minute, and the
//! real `dps-station run` binary (release build) with a generated config
//! (`max_operations_per_minute = 1000`, `[batch] max_size = 10`, `max_delay = "2s"`, one DICE
//! slot so every board gets its own certificate, store on disk). Boards are fed through the
//! control socket up front, a little more than the window can enroll, so the queue never
//! runs dry. The clock starts at the first scan; enrolled rows are counted at the end of the
//! window (env `BENCH_SECONDS`, default 60). The window includes the warm-up (first
//! attestations, first batch), so a shorter window over-weights it and reads lower; a
//! steady-state figure from second 10 on is printed as well. After the window the queue is
//! drained and checked against the emulator's own record: every acknowledged board created
//! exactly once, nothing rejected. 429s are counted on both sides: the daemon's
//! `status --json` `dps.throttled_total` and the emulator's `stats().throttled`.
//!
//! Last (after the baseline below), quota contention, the 429 storm: a fresh emulator admits only 500 ops/min while the
//! daemon is still configured for 1,000 (another line shares the DPS unit), for half the
//! window (at least 25 s): 429s with `Retry-After` must cost no boards and little quota.
//!
//! Baseline, same run, fresh emulator with the same quota: one PUT per device
//! (`DpsClient::create_or_update_enrollment` in a loop, client paced to 1,000 ops/min), what
//! `az iot dps enrollment create` scripts do, over the same window → devices/min.
//!
//! It never touches a real DPS and never leaves anything behind (temp dir under
//! `CARGO_TARGET_TMPDIR`, DICE bundles on tmpfs unless `BENCH_BUNDLES_ON_DISK` is set, child
//! daemon killed on every exit path; `BENCH_KEEP=1` keeps the work dir for inspection).
//! Prints markdown tables; with env `BENCH_KV_FILE` it also appends `key=value` lines there
//! for `scripts/bench.sh`. Exit status 1 when a board was lost, duplicated or rejected, the
//! storm saw no 429, or the daemon could not be run.
//! Run: `cargo bench --bench throttled`.
use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::RngCore as _;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use dps_station::dps::{
    AttestationMechanism, ClientOptions, ConnectionString, DpsClient, IndividualEnrollment,
};
use dps_station::emulator::{self, EmulatorOptions, RunningEmulator};
use dps_station::station::control::ControlClient;
use dps_station::station::status::StatusSnapshot;

/// The quota under test (DPS S1: about 1,000 operations per minute per unit).
const OPS_PER_MINUTE: u32 = 1000;
/// Bulk create carries at most 10 enrollments, so the ceiling is 10 × the quota.
const CEILING_PER_MIN: f64 = 10.0 * OPS_PER_MINUTE as f64;
const TARGET_SHARE: f64 = 0.95;
/// Warm-up cut for the steady-state figure.
const STEADY_FROM: Duration = Duration::from_secs(10);
/// Control-socket connections feeding scans at once.
const FEEDERS: usize = 32;

type BenchResult<T> = Result<T, String>;

/// The daemon child; killed when dropped, whatever path the bench leaves by.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// utime + stime of the daemon in seconds (from /proc), if readable.
    fn cpu_seconds(&self, ticks_per_s: f64) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).ok()?;
        // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        let rest = stat.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let utime: f64 = f.get(11)?.parse().ok()?;
        let stime: f64 = f.get(12)?.parse().ok()?;
        Some((utime + stime) / ticks_per_s)
    }

    fn rss_mib(&self) -> Option<f64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let kib: f64 = s
            .lines()
            .find(|l| l.starts_with("VmRSS:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        Some(kib / 1024.0)
    }
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

fn bench_seconds() -> u64 {
    std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&s: &u64| s > 0)
        .unwrap_or(60)
}

fn quoted(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// Write the station config (DESIGN §4 shape) and its connection-string file into `dir`.
fn write_station(dir: &Path, bundles: &Path, cs: &str) -> BenchResult<(PathBuf, PathBuf)> {
    let csf = dir.join("dps-connection-string");
    std::fs::write(&csf, format!("{cs}\n")).map_err(|e| format!("{}: {e}", csf.display()))?;
    let ca = dps_station::attest::ca::init_dev_ca(&dir.join("ca"), "Bench Station CA")
        .map_err(|e| format!("dev CA: {e}"))?;
    let socket = dir.join("control.sock");
    let config = dir.join("station.toml");
    let text = format!(
        "[dps]\nconnection_string_file = {csf}\nrequest_timeout = \"30s\"\n\
         max_operations_per_minute = {OPS_PER_MINUTE}\n\n\
         [batch]\nmax_size = 10\nmax_delay = \"2s\"\n\n\
         [state]\npath = {db}\n\n\
         [enrollment]\nregistration_id = \"{{ek_hash}}\"\ndevice_id = \"{{serial}}\"\n\
         provisioning_status = \"enabled\"\n\n\
         [[slot]]\nname = \"fixture-2\"\nattestation = \"dice\"\n\
         registration_id = \"board-{{serial}}\"\n\n\
         [dice]\nca_cert = {cert}\nca_key = {key}\nout_dir = {out}\nfwid = \"sha256:{fwid}\"\n\n\
         [control]\nsocket = {sock}\nhttp = \"127.0.0.1:0\"\n",
        csf = quoted(&csf),
        db = quoted(&dir.join("state/station.db")),
        cert = quoted(&ca.intermediate_cert),
        key = quoted(&ca.intermediate_key),
        out = quoted(bundles),
        fwid = "5a".repeat(32),
        sock = quoted(&socket),
    );
    std::fs::write(&config, text).map_err(|e| format!("{}: {e}", config.display()))?;
    Ok((config, socket))
}

fn spawn_daemon(config: &Path, log: &Path) -> BenchResult<Daemon> {
    let err = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let child = Command::new(env!("CARGO_BIN_EXE_dps-station"))
        .args(["run", "--config"])
        .arg(config)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env("DPS_STATION_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .map_err(|e| format!("spawn dps-station run: {e}"))?;
    Ok(Daemon {
        child,
        log: log.to_owned(),
    })
}

async fn wait_ready(d: &mut Daemon, socket: &Path) -> BenchResult<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Some(st)) = d.child.try_wait() {
            return Err(format!("daemon exited early ({st}):\n{}", d.log_tail()));
        }
        if let Ok(mut c) = ControlClient::connect(socket).await {
            if c.status().await.is_ok() {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(format!("daemon not ready in 30 s:\n{}", d.log_tail()))
}

async fn status(socket: &Path) -> BenchResult<StatusSnapshot> {
    let mut c = ControlClient::connect(socket)
        .await
        .map_err(|e| e.to_string())?;
    c.status().await.map_err(|e| e.to_string())
}

/// `dps-station --json status` through the CLI, as an operator would read it.
fn cli_status(config: &Path) -> BenchResult<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_dps-station"))
        .args(["--json", "status", "--config"])
        .arg(config)
        .output()
        .map_err(|e| format!("dps-station status: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "dps-station status exited {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("status --json is not JSON: {e}"))
}

/// Scan `serials` through `FEEDERS` pipelined control connections; the serials answered
/// `QUEUED`.
async fn feed(socket: &Path, serials: Vec<String>) -> BenchResult<BTreeSet<String>> {
    let mut tasks = Vec::new();
    for c in 0..FEEDERS {
        let mine: Vec<String> = serials
            .iter()
            .enumerate()
            .filter(|(i, _)| i % FEEDERS == c)
            .map(|(_, s)| s.clone())
            .collect();
        let socket = socket.to_owned();
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::UnixStream::connect(&socket)
                .await
                .map_err(|e| format!("connect {}: {e}", socket.display()))?;
            let (r, mut w) = stream.into_split();
            let mut buf = Vec::new();
            for s in &mine {
                buf.extend_from_slice(
                    format!("{{\"cmd\":\"scan\",\"serial\":\"{s}\",\"wait\":false}}\n").as_bytes(),
                );
            }
            let writer = tokio::spawn(async move {
                let r = w.write_all(&buf).await;
                (r, w)
            });
            let mut lines = BufReader::new(r).lines();
            let mut acked = Vec::new();
            for _ in 0..mine.len() {
                match lines.next_line().await {
                    Ok(Some(l)) => {
                        let v: serde_json::Value = serde_json::from_str(&l).unwrap_or_default();
                        let reply = v.get("reply").and_then(|r| r.as_str()).unwrap_or("");
                        let mut words = reply.split(' ');
                        if let (Some("QUEUED"), Some(serial)) = (words.next(), words.next()) {
                            acked.push(serial.to_owned());
                        } else {
                            eprintln!("throttled bench: unexpected reply: {l}");
                        }
                    }
                    _ => break,
                }
            }
            let (wr, _w) = writer.await.map_err(|e| e.to_string())?;
            wr.map_err(|e| format!("write scans: {e}"))?;
            Ok::<_, String>(acked)
        }));
    }
    let mut acked = BTreeSet::new();
    for t in tasks {
        acked.extend(t.await.map_err(|e| e.to_string())??);
    }
    Ok(acked)
}

struct StationFigures {
    /// Operations per minute the emulator admitted.
    quota: u32,
    window: Duration,
    fed: usize,
    acked: usize,
    ack_secs: f64,
    enrolled_in_window: u64,
    per_min: f64,
    steady_per_min: Option<f64>,
    drained: bool,
    enrolled_total: u64,
    rejected: u64,
    conflict: u64,
    still_queued: u64,
    lost: usize,
    duplicated: usize,
    daemon_429: u64,
    emulator_429: u64,
    bulk_requests: u64,
    get_requests: u64,
    cpu_share: Option<f64>,
    rss_mib: Option<f64>,
    bundles_on_disk: bool,
}

/// Where the daemon writes the per-board DICE bundles. tmpfs (`/dev/shm`) by default: on a
/// disk mounted with `discard` (this VM's ext4) deleting ~10,000 fsync'd bundles afterwards
/// takes minutes. `BENCH_BUNDLES_ON_DISK=1` keeps them beside the store. Either way the
/// SQLite store is on disk, and the bundles only affect how fast scans are acknowledged.
enum BundleDir {
    Tmpfs(tempfile::TempDir),
    Disk(PathBuf),
}

impl BundleDir {
    fn new(station_dir: &Path) -> BenchResult<BundleDir> {
        let shm = Path::new("/dev/shm");
        if std::env::var_os("BENCH_BUNDLES_ON_DISK").is_none() && shm.is_dir() {
            if let Ok(t) = tempfile::Builder::new()
                .prefix("dps-bench-bundles.")
                .tempdir_in(shm)
            {
                return Ok(BundleDir::Tmpfs(t));
            }
        }
        Ok(BundleDir::Disk(station_dir.join("dice-out")))
    }

    fn path(&self) -> &Path {
        match self {
            BundleDir::Tmpfs(t) => t.path(),
            BundleDir::Disk(p) => p,
        }
    }

    fn on_disk(&self) -> bool {
        matches!(self, BundleDir::Disk(_))
    }
}

/// The daemon, paced to `OPS_PER_MINUTE`, against an emulator admitting `quota` ops/min,
/// over `window` from the first scan.
async fn station_run(
    work: &Path,
    name: &str,
    window: Duration,
    quota: u32,
) -> BenchResult<StationFigures> {
    let emu = emulator::start(EmulatorOptions {
        ops_per_minute: Some(quota),
        ..Default::default()
    })
    .await
    .map_err(|e| format!("emulator: {e}"))?;
    let dir = work.join(name);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let bundles = BundleDir::new(&dir)?;
    let (config, socket) = write_station(&dir, bundles.path(), &emu.connection_string())?;
    let mut daemon = spawn_daemon(&config, &dir.join("daemon.log"))?;
    wait_ready(&mut daemon, &socket).await?;
    let ticks = clock_ticks();

    // A little more than the window can take at the ceiling (plus the emulator's initial
    // burst of ⌈quota/10⌉ operations), so the queue never runs dry.
    let ceiling = 10.0 * f64::from(quota);
    let fed = (window.as_secs_f64() * ceiling / 60.0 * 1.03).ceil() as usize + 100 + quota as usize;
    let serials: Vec<String> = (0..fed).map(|i| format!("THR-{i:06}")).collect();

    let cpu0 = daemon.cpu_seconds(ticks);
    let t0 = Instant::now();
    let feeder = {
        let socket = socket.clone();
        tokio::spawn(async move {
            let r = feed(&socket, serials).await;
            (r, t0.elapsed())
        })
    };
    let mut steady_start = None;
    if window > STEADY_FROM * 2 {
        tokio::time::sleep_until((t0 + STEADY_FROM).into()).await;
        steady_start = Some(status(&socket).await?.count("enrolled"));
    }
    tokio::time::sleep_until((t0 + window).into()).await;
    let at_end = status(&socket).await?;
    let elapsed = t0.elapsed();
    let cpu1 = daemon.cpu_seconds(ticks);
    let rss_mib = daemon.rss_mib();
    let enrolled_in_window = at_end.count("enrolled");
    let per_min = enrolled_in_window as f64 * 60.0 / elapsed.as_secs_f64();
    let steady_per_min = steady_start
        .map(|s| (enrolled_in_window - s) as f64 * 60.0 / (elapsed - STEADY_FROM).as_secs_f64());
    let cpu_share = match (cpu0, cpu1) {
        (Some(a), Some(b)) => Some((b - a) / elapsed.as_secs_f64()),
        _ => None,
    };

    let (acked, ack_time) = feeder.await.map_err(|e| e.to_string())?;
    let acked = acked?;

    // Drain: every acknowledged board must reach a final state.
    let left = acked.len() as f64 - enrolled_in_window as f64;
    let deadline = Instant::now() + Duration::from_secs_f64(60.0 + left.max(0.0) / 100.0);
    let mut snap = at_end;
    let mut drained = false;
    while Instant::now() < deadline {
        snap = status(&socket).await?;
        let done = snap.count("enrolled") + snap.count("rejected") + snap.count("conflict");
        if done as usize >= acked.len() && snap.queue_depth == 0 && snap.in_flight == 0 {
            drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cli = cli_status(&config)?;
    let daemon_429 = cli
        .pointer("/dps/throttled_total")
        .and_then(|v| v.as_u64())
        .ok_or("status --json has no dps.throttled_total")?;

    let stats = emu.stats();
    // Lost: acknowledged but never created. Duplicated: any id created more than once.
    let lost = acked
        .iter()
        .filter(|s| {
            let id = format!("board-{}", s.to_ascii_lowercase());
            stats.creates.get(&id).copied().unwrap_or(0) == 0
        })
        .count();
    let duplicated = stats.creates.values().filter(|&&n| n > 1).count();
    let op = |name: &str| stats.by_operation.get(name).copied().unwrap_or(0);
    let figures = StationFigures {
        quota,
        window,
        fed,
        acked: acked.len(),
        ack_secs: ack_time.as_secs_f64(),
        enrolled_in_window,
        per_min,
        steady_per_min,
        drained,
        enrolled_total: snap.count("enrolled"),
        rejected: snap.count("rejected"),
        conflict: snap.count("conflict"),
        still_queued: snap.count("queued"),
        lost,
        duplicated,
        daemon_429,
        emulator_429: stats.throttled,
        bulk_requests: op("IndividualEnrollment_RunBulkOperation"),
        get_requests: op("IndividualEnrollment_Get"),
        cpu_share,
        rss_mib,
        bundles_on_disk: bundles.on_disk(),
    };
    drop(daemon);
    drop(bundles);
    emu.shutdown().await;
    Ok(figures)
}

struct BaselineFigures {
    created: u64,
    failed: u64,
    per_min: f64,
    emulator_429: u64,
    duplicated: usize,
}

fn synthetic_tpm_enrollment() -> IndividualEnrollment {
    use base64::Engine as _;
    // TPM2B_PUBLIC-shaped: a valid 2-byte size prefix (0x013a = 314) over random bytes.
    let mut ek = vec![0x01, 0x3a];
    let mut body = vec![0u8; 314];
    rand::thread_rng().fill_bytes(&mut body);
    ek.extend_from_slice(&body);
    let id = dps_station::attest::tpm::ek_hash(&ek);
    IndividualEnrollment::new(
        id,
        AttestationMechanism::tpm(base64::engine::general_purpose::STANDARD.encode(&ek)),
    )
}

/// One PUT per device, sequential, client paced to the quota, for `window`.
async fn baseline_run(window: Duration) -> BenchResult<BaselineFigures> {
    let emu: RunningEmulator = emulator::start(EmulatorOptions {
        ops_per_minute: Some(OPS_PER_MINUTE),
        ..Default::default()
    })
    .await
    .map_err(|e| format!("emulator: {e}"))?;
    let cs = ConnectionString::parse(&emu.connection_string()).map_err(|e| e.to_string())?;
    let client = DpsClient::new(
        cs,
        ClientOptions {
            max_operations_per_minute: Some(OPS_PER_MINUTE),
            ..Default::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let (mut created, mut failed) = (0u64, 0u64);
    while t0.elapsed() < window {
        let e = synthetic_tpm_enrollment();
        match tokio::time::timeout_at(
            (t0 + window).into(),
            client.create_or_update_enrollment(&e, None),
        )
        .await
        {
            Ok(Ok(_)) => created += 1,
            Ok(Err(err)) => {
                failed += 1;
                eprintln!("throttled bench baseline: PUT failed: {err}");
            }
            Err(_) => break,
        }
    }
    let per_min = created as f64 * 60.0 / t0.elapsed().as_secs_f64();
    let stats = emu.stats();
    emu.shutdown().await;
    Ok(BaselineFigures {
        created,
        failed,
        per_min,
        emulator_429: stats.throttled,
        duplicated: stats.creates.values().filter(|&&n| n > 1).count(),
    })
}

fn write_kv(pairs: &[(&str, String)]) {
    let Some(path) = std::env::var_os("BENCH_KV_FILE") else {
        return;
    };
    let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    else {
        eprintln!("throttled bench: cannot append to BENCH_KV_FILE");
        return;
    };
    for (k, v) in pairs {
        let _ = writeln!(f, "throttled.{k}={v}");
    }
}

fn opt(v: Option<f64>, digits: usize, unit: &str) -> String {
    v.map(|x| format!("{x:.digits$}{unit}"))
        .unwrap_or_else(|| "n/a".into())
}

fn report(window: Duration, s: &StationFigures, b: &BaselineFigures) -> bool {
    let secs = window.as_secs();
    let share = s.per_min / CEILING_PER_MIN;
    let zero_lost = s.lost == 0 && s.duplicated == 0 && s.drained && s.rejected == 0;
    let pass = share >= TARGET_SHARE && zero_lost;
    let mark = |ok: bool| if ok { "pass" } else { "MISS" };
    println!("## Throttled at {OPS_PER_MINUTE} ops/min (window {secs} s from the first scan)\n");
    println!("| measure | station (`dps-station run`, bulk create) | baseline (one PUT per device) | target (DESIGN §9) |");
    println!("|---|---:|---:|---|");
    println!(
        "| enrollments per minute over the window | **{:.0}/min = {:.1} %** of {CEILING_PER_MIN:.0} | {:.0}/min = {:.1} % | ≥ 95 %: {} |",
        s.per_min,
        share * 100.0,
        b.per_min,
        b.per_min / CEILING_PER_MIN * 100.0,
        mark(share >= TARGET_SHARE)
    );
    println!(
        "| steady state (second {} to {secs}) | {} | — | — |",
        STEADY_FROM.as_secs(),
        s.steady_per_min
            .map(|v| format!("{v:.0}/min = {:.1} %", v / CEILING_PER_MIN * 100.0))
            .unwrap_or_else(|| "window too short".into())
    );
    println!(
        "| enrolled in the window | {} | {} | — |",
        s.enrolled_in_window, b.created
    );
    println!(
        "| lost / duplicated (vs the emulator's creates) | {} / {} (rejected {}, conflict {}, still queued {}) | {} failed / {} duplicated | zero lost: {} |",
        s.lost, s.duplicated, s.rejected, s.conflict, s.still_queued, b.failed, b.duplicated,
        mark(zero_lost)
    );
    println!(
        "| 429 answers (daemon `dps.throttled_total` / emulator `throttled`) | {} / {} | — / {} | handled by pacing |",
        s.daemon_429, s.emulator_429, b.emulator_429
    );
    println!(
        "| DPS requests: bulk creates / GETs | {} / {} | {} PUTs | — |",
        s.bulk_requests,
        s.get_requests,
        b.created + b.failed
    );
    println!(
        "| boards fed / acknowledged QUEUED (time to acknowledge all; DICE bundles on {}) | {} / {} ({:.1} s) | — | — |",
        if s.bundles_on_disk { "disk" } else { "tmpfs" },
        s.fed,
        s.acked,
        s.ack_secs
    );
    println!(
        "| daemon CPU over the window (share of one core) / RSS at its end | {} / {} | — | — |",
        opt(s.cpu_share.map(|c| c * 100.0), 1, " %"),
        opt(s.rss_mib, 1, " MiB")
    );
    println!(
        "\nAfter the window the queue was {} ({} enrolled in total). Speed-up over one PUT per device: {:.1}×.",
        if s.drained { "drained" } else { "NOT drained" },
        s.enrolled_total,
        s.per_min / b.per_min.max(f64::MIN_POSITIVE)
    );
    if secs < 60 {
        println!(
            "\nThe window is shorter than 60 s: the warm-up (first attestations and batch) weighs more and the figure reads low."
        );
    }
    write_kv(&[
        ("window_s", secs.to_string()),
        ("per_min", format!("{:.0}", s.per_min)),
        ("share_pct", format!("{:.1}", share * 100.0)),
        (
            "steady_pct",
            opt(s.steady_per_min.map(|v| v / CEILING_PER_MIN * 100.0), 1, ""),
        ),
        ("lost", s.lost.to_string()),
        ("duplicated", s.duplicated.to_string()),
        ("rejected", s.rejected.to_string()),
        ("drained", s.drained.to_string()),
        ("daemon_429", s.daemon_429.to_string()),
        ("emulator_429", s.emulator_429.to_string()),
        ("baseline_per_min", format!("{:.0}", b.per_min)),
        (
            "baseline_pct",
            format!("{:.1}", b.per_min / CEILING_PER_MIN * 100.0),
        ),
        ("baseline_429", b.emulator_429.to_string()),
        ("cpu_pct", opt(s.cpu_share.map(|c| c * 100.0), 1, "")),
        ("pass", pass.to_string()),
        ("zero_lost", zero_lost.to_string()),
    ]);
    zero_lost
}

/// Quota contention: the emulator admits half of what the station is configured for (another
/// station or a script shares the DPS unit), so 429s with `Retry-After` do arrive. Prints a
/// table; true when nothing was lost, duplicated or rejected and 429s were actually seen.
fn report_storm(s: &StationFigures) -> bool {
    let secs = s.window.as_secs();
    let ceiling = 10.0 * f64::from(s.quota);
    let zero_lost = s.lost == 0 && s.duplicated == 0 && s.drained && s.rejected == 0;
    let storm = s.emulator_429 > 0;
    let steady_pct = s.steady_per_min.map(|v| v / ceiling * 100.0);
    println!(
        "
### Quota contention: DPS admits {} ops/min, the station is configured for {OPS_PER_MINUTE} (window {secs} s)
",
        s.quota
    );
    println!("| measure | station | expected |");
    println!("|---|---:|---|");
    println!(
        "| enrollments per minute, steady state (second {} to {secs}) | **{} = {} %** of the real {ceiling:.0}/min ceiling | close to 100 %: 429s cost no quota |",
        STEADY_FROM.as_secs(),
        opt(s.steady_per_min, 0, "/min"),
        opt(steady_pct, 1, ""),
    );
    println!(
        "| over the whole window (includes the emulator's initial burst of {} operations) | {:.0}/min | — |",
        s.quota.div_ceil(10).max(1),
        s.per_min
    );
    println!(
        "| 429 answers (daemon `dps.throttled_total` / emulator `throttled`) | {} / {} | > 0 (the storm happened): {} |",
        s.daemon_429,
        s.emulator_429,
        if storm { "yes" } else { "NO" }
    );
    println!(
        "| lost / duplicated (vs the emulator's creates) | {} / {} (rejected {}, conflict {}, {}) | zero: {} |",
        s.lost,
        s.duplicated,
        s.rejected,
        s.conflict,
        if s.drained { "drained" } else { "NOT drained" },
        if zero_lost { "pass" } else { "MISS" }
    );
    println!(
        "| DPS requests: bulk creates / GETs | {} / {} | — |",
        s.bulk_requests, s.get_requests
    );
    write_kv(&[
        ("storm_quota", s.quota.to_string()),
        ("storm_window_s", secs.to_string()),
        ("storm_steady_pct", opt(steady_pct, 1, "")),
        ("storm_daemon_429", s.daemon_429.to_string()),
        ("storm_emulator_429", s.emulator_429.to_string()),
        ("storm_lost", s.lost.to_string()),
        ("storm_duplicated", s.duplicated.to_string()),
        ("storm_zero_lost", zero_lost.to_string()),
    ]);
    zero_lost && storm
}

fn main() {
    let window = Duration::from_secs(bench_seconds());
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("throttled bench: runtime: {e}");
            std::process::exit(1);
        }
    };
    // On disk (not tmpfs): the store's fsyncs are part of what is measured.
    let work = match tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("throttled bench: work dir: {e}");
            std::process::exit(1);
        }
    };
    let result = rt.block_on(async {
        eprintln!(
            "throttled bench: station run, {} s window…",
            window.as_secs()
        );
        let s = station_run(work.path(), "station", window, OPS_PER_MINUTE).await?;
        eprintln!(
            "throttled bench: baseline (one PUT per device), {} s…",
            window.as_secs()
        );
        let b = baseline_run(window).await?;
        let main_ok = report(window, &s, &b);
        let storm_window = (window / 2).max(STEADY_FROM * 2 + Duration::from_secs(5));
        eprintln!(
            "throttled bench: quota contention, {} s…",
            storm_window.as_secs()
        );
        let storm = station_run(work.path(), "storm", storm_window, OPS_PER_MINUTE / 2).await?;
        let storm_ok = report_storm(&storm);
        Ok::<_, String>(main_ok && storm_ok)
    });
    if std::env::var_os("BENCH_KEEP").is_some() {
        eprintln!("throttled bench: kept {}", work.keep().display());
    }
    match result {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("throttled bench: {e}");
            std::process::exit(1);
        }
    }
}
