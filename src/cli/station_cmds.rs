//! Station commands: `run`, `scan`, `requeue`, `status`, `export`, `control`, `demo`.
//!
//! `run` is the daemon; `scan`, `requeue`, `status` and `control` talk to it over its control socket
//! (`station::control`); `export` reads the state database directly, read-only
//! (`station::report`); `demo` drives the whole product end to end (`station::demo`).
//! Nothing here prints a key, SAS token or private key.
use std::path::{Path, PathBuf};

use clap::Args;

use super::{CliError, Exit, GlobalOpts};
use crate::station::control::{ControlClient, ControlError, ControlRequest};
use crate::station::report::{self, ExportFormat, ReportError};

/// `run`: the daemon in the foreground (systemd `Type=notify`, watchdog).
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Exit 0 once a drain (`dps-station control drain`) is complete: intake stopped and
    /// every queued board answered by DPS. Without it the daemon keeps running, drained.
    #[arg(long)]
    pub exit_when_drained: bool,
}

/// `run`: load the config (errors exit 2), start the daemon, stop on SIGTERM/SIGINT (exit 0).
/// The global `--connection-string-file`, `--endpoint` and `--ca-file` override `[dps]`.
pub async fn run(g: &GlobalOpts, a: RunArgs) -> Result<Exit, CliError> {
    use crate::station::daemon::{Daemon, DaemonError, StopSignals};
    // Caught from now on: a SIGTERM during start-up still stops cleanly with exit 0.
    let mut signals = StopSignals::install().map_err(|e| CliError::failed(e.to_string()))?;
    let mut cfg = crate::config::load(&g.config).map_err(|e| {
        let err = CliError::usage(e.to_string());
        match e.hint() {
            Some(h) => err.with_hint(h),
            None => err,
        }
    })?;
    if let Some(p) = &g.connection_string_file {
        cfg.dps.connection_string_file = Some(p.clone());
    }
    if let Some(e) = &g.endpoint {
        cfg.dps.endpoint = Some(e.clone());
    }
    if let Some(c) = &g.ca_file {
        cfg.dps.ca_file = Some(c.clone());
    }
    let to_cli = |e: DaemonError| match e {
        DaemonError::Setup { message, hint } => {
            let err = CliError::usage(message);
            match hint {
                Some(h) => err.with_hint(h),
                None => err,
            }
        }
        DaemonError::Runtime(m) => CliError::failed(m),
    };
    let daemon = Daemon::start(cfg).await.map_err(to_cli)?;
    let pipeline = daemon.pipeline.clone();
    tokio::select! {
        _ = signals.recv() => {
            tracing::info!("stopping: intake closed, finishing the in-flight batch");
        }
        _ = pipeline.drained(), if a.exit_when_drained => {
            tracing::info!("drained: every queued board is answered; exiting (--exit-when-drained)");
        }
    }
    daemon.shutdown().await;
    Ok(Exit::Ok)
}

// ---- scan, status, control, export, demo (operations) ----

/// `scan SERIAL [--slot NAME] [--wait] [--timeout 60s]`.
#[derive(Debug, Args)]
pub struct ScanArgs {
    /// Board serial, as a scanner would read it.
    pub serial: String,
    /// Fixture slot (default: the first configured slot).
    #[arg(long)]
    pub slot: Option<String>,
    /// Block until the board is enrolled or has failed.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this long (with --wait).
    #[arg(long, default_value = "60s")]
    pub timeout: String,
    /// Control socket (default: the config's [control] socket).
    #[arg(long)]
    pub socket: Option<PathBuf>,
}

/// `requeue SERIAL [--force] [--wait] [--timeout 60s]`.
#[derive(Debug, Args)]
pub struct RequeueArgs {
    /// Serial of a board whose row is `rejected` (after the cause was fixed).
    pub serial: String,
    /// Also requeue a `conflict` row (after the operator fixed the enrollment in DPS).
    #[arg(long)]
    pub force: bool,
    /// Block until DPS answered for the board again.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this long (with --wait).
    #[arg(long, default_value = "60s")]
    pub timeout: String,
    /// Control socket (default: the config's [control] socket).
    #[arg(long)]
    pub socket: Option<PathBuf>,
}

/// `status`: human summary, or the snapshot JSON with --json.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Control socket (default: the config's [control] socket).
    #[arg(long)]
    pub socket: Option<PathBuf>,
}

/// `control pause|resume|drain`.
#[derive(Debug, Args)]
pub struct ControlArgs {
    #[arg(value_enum)]
    pub action: ControlAction,
    /// With `drain`: wait until the drain is complete (exit 0), or give up after --timeout
    /// (exit 1, the daemon keeps draining).
    #[arg(long)]
    pub wait: bool,
    /// How long `drain --wait` waits.
    #[arg(long, default_value = "10m")]
    pub timeout: String,
    /// Control socket (default: the config's [control] socket).
    #[arg(long)]
    pub socket: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ControlAction {
    /// Stop taking scans; the queue keeps draining.
    Pause,
    /// Take scans again.
    Resume,
    /// Stop intake until restart and send the queue now; `status` shows `draining`, then
    /// `drained` (with `--wait`, block until then).
    Drain,
}

/// `export [--format csv|jsonl] [--state S] [--out FILE]`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Output format.
    #[arg(long, default_value = "csv", value_parser = ["csv", "jsonl"])]
    pub format: String,
    /// Only boards in this state (queued, enrolled, conflict, rejected).
    #[arg(long)]
    pub state: Option<String>,
    /// Write here (atomically) instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// State database (default: the config's [state] path).
    #[arg(long)]
    pub db: Option<PathBuf>,
}

/// `demo`: emulator + swtpm boards + DICE slot + pty scanner, end to end.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// After the scripted run, keep everything up until Ctrl-C.
    #[arg(long)]
    pub keep_running: bool,
    /// Address of the daemon's operator page.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub http: String,
    /// Keep the demo's working directory (config, database, keys) and print its path.
    #[arg(long)]
    pub keep_dir: bool,
}

/// Default `[control] socket` and `[state] path` (DESIGN §4) when no config says otherwise.
const DEFAULT_SOCKET: &str = "/run/dps-station/control.sock";
const DEFAULT_DB: &str = "/var/lib/dps-station/station.db";
const DEFAULT_CONFIG: &str = "/etc/dps-station/station.toml";

/// The station config for `scan`/`status`/`export`, when there is one. A missing file at
/// the default path means "built-in defaults"; any other load problem is a usage error.
fn station_config(g: &GlobalOpts) -> Result<Option<crate::config::Config>, CliError> {
    if g.config == Path::new(DEFAULT_CONFIG) && !g.config.exists() {
        return Ok(None);
    }
    match crate::config::load(&g.config) {
        Ok(c) => Ok(Some(c)),
        Err(e) => {
            let hint = e.hint().map(str::to_owned);
            let err = CliError::usage(e.to_string());
            Err(match hint {
                Some(h) => err.with_hint(h),
                None => err.with_hint("pass --config PATH, or --socket/--db to skip the config"),
            })
        }
    }
}

/// The control socket: `--socket`, else the config's `[control] socket`.
fn control_socket(g: &GlobalOpts, explicit: Option<PathBuf>) -> Result<PathBuf, CliError> {
    if let Some(p) = explicit {
        return Ok(p);
    }
    Ok(station_config(g)?
        .map(|c| c.control.socket)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)))
}

/// The state database: `--db`, else the config's `[state] path`.
fn state_db(g: &GlobalOpts, explicit: Option<PathBuf>) -> Result<PathBuf, CliError> {
    if let Some(p) = explicit {
        return Ok(p);
    }
    Ok(station_config(g)?
        .map(|c| c.state.path)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DB)))
}

fn control_error(e: ControlError) -> CliError {
    match e {
        ControlError::NotRunning { ref path, .. } => CliError::usage(format!(
            "no dps-station daemon is running on control socket {}",
            path.display()
        ))
        .with_hint("start it with `dps-station run --config …` (or `systemctl start dps-station`), or pass --socket PATH"),
        ControlError::PermissionDenied { ref path } => CliError::usage(e.to_string()).with_hint(
            format!(
                "the socket is mode 0660: run as the daemon's user or a member of its group ({})",
                path.display()
            ),
        ),
        other => CliError::failed(other.to_string()),
    }
}

pub async fn scan(g: &GlobalOpts, a: ScanArgs) -> Result<Exit, CliError> {
    let req = ControlRequest::Scan {
        serial: a.serial.clone(),
        slot: a.slot,
        wait: a.wait,
    };
    replies(g, a.socket, req, &a.serial, a.wait, &a.timeout).await
}

/// `requeue`: exit 0 once queued (with --wait: once enrolled), 1 when the daemon refuses
/// (unknown serial, a state that cannot be requeued) or DPS refuses again, 2 without a daemon.
pub async fn requeue(g: &GlobalOpts, a: RequeueArgs) -> Result<Exit, CliError> {
    let req = ControlRequest::Requeue {
        serial: a.serial.clone(),
        force: a.force,
        wait: a.wait,
    };
    replies(g, a.socket, req, &a.serial, a.wait, &a.timeout).await
}

/// Send a scan-like request and print its reply lines until the first (or, with `wait`,
/// the final) one; the exit code follows the last reply.
async fn replies(
    g: &GlobalOpts,
    socket: Option<PathBuf>,
    req: ControlRequest,
    serial: &str,
    wait: bool,
    timeout_text: &str,
) -> Result<Exit, CliError> {
    let timeout = humantime::parse_duration(timeout_text)
        .map_err(|e| CliError::usage(format!("--timeout {timeout_text:?}: {e}")))?;
    let path = control_socket(g, socket)?;
    let mut client = ControlClient::connect(&path).await.map_err(control_error)?;
    client.send(&req).await.map_err(control_error)?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let next = tokio::time::timeout_at(deadline, client.recv()).await;
        let v = match next {
            Err(_) => {
                return Err(CliError::failed(format!(
                    "no final reply for {serial} within {timeout_text}"
                ))
                .with_hint("the board stays queued in the daemon; check `dps-station status`"))
            }
            Ok(r) => r.map_err(control_error)?,
        };
        let Some(v) = v else {
            return Err(CliError::failed(format!(
                "the daemon closed control socket {} before replying",
                path.display()
            )));
        };
        if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
            return Err(CliError::failed(format!("daemon: {e}")));
        }
        let Some(reply) = v.get("reply").and_then(|r| r.as_str()) else {
            return Err(CliError::failed(format!(
                "daemon answered something unexpected: {v}"
            )));
        };
        if g.json {
            println!("{v}");
        } else {
            println!("{reply}");
        }
        let is_final = v.get("final").and_then(|f| f.as_bool()).unwrap_or(true);
        match reply.split(' ').next().unwrap_or("") {
            "ENROLLED" => return Ok(Exit::Ok),
            "QUEUED" if !wait || is_final => return Ok(Exit::Ok),
            "QUEUED" => continue,
            _ => return Ok(Exit::Failed),
        }
    }
}

pub async fn status(g: &GlobalOpts, a: StatusArgs) -> Result<Exit, CliError> {
    let path = control_socket(g, a.socket)?;
    let mut client = ControlClient::connect(&path).await.map_err(control_error)?;
    let snap = client.status().await.map_err(control_error)?;
    if g.json {
        let text = serde_json::to_string_pretty(&snap)
            .map_err(|e| CliError::failed(format!("encoding the status: {e}")))?;
        println!("{text}");
    } else {
        print!("{}", snap.render_text());
    }
    Ok(Exit::Ok)
}

pub async fn control(g: &GlobalOpts, a: ControlArgs) -> Result<Exit, CliError> {
    let path = control_socket(g, a.socket)?;
    let mut client = ControlClient::connect(&path).await.map_err(control_error)?;
    let req = match a.action {
        ControlAction::Pause => ControlRequest::Pause,
        ControlAction::Resume => ControlRequest::Resume,
        ControlAction::Drain => ControlRequest::Drain,
    };
    let timeout = humantime::parse_duration(&a.timeout)
        .map_err(|e| CliError::usage(format!("--timeout {:?}: {e}", a.timeout)))?;
    if a.wait && a.action != ControlAction::Drain {
        return Err(CliError::usage("--wait applies to `control drain` only"));
    }
    let v = client.call(&req).await.map_err(control_error)?;
    if v.get("ok").and_then(|o| o.as_bool()) != Some(true) {
        return Err(CliError::failed(format!("daemon refused: {v}")));
    }
    if !a.wait {
        if g.json {
            println!("{v}");
        }
        return Ok(Exit::Ok);
    }
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let snap = match client.status().await {
            Ok(s) => s,
            // The daemon went away after taking the drain: `run --exit-when-drained` does
            // that as soon as the drain completes. The journal tells whether it did.
            Err(e) => return drained_daemon_gone(g, e),
        };
        if snap.drained {
            if g.json {
                let text = serde_json::to_string(&snap)
                    .map_err(|e| CliError::failed(format!("encoding the status: {e}")))?;
                println!("{text}");
            } else {
                println!(
                    "drained: {}",
                    ["enrolled", "conflict", "rejected"]
                        .iter()
                        .map(|k| format!("{k}={}", snap.count(k)))
                        .collect::<Vec<_>>()
                        .join(" ")
                );
            }
            return Ok(Exit::Ok);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(CliError::failed(format!(
                "not drained within {}: {} queued, {} in flight",
                a.timeout, snap.queue_depth, snap.in_flight
            ))
            .with_hint(
                "the daemon keeps draining; see `dps-station status` (DPS health, last errors)",
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// `control drain --wait` lost the daemon: exit 0 if its journal holds no queued board (the
/// drain completed and the daemon exited), else report the lost connection.
fn drained_daemon_gone(g: &GlobalOpts, lost: ControlError) -> Result<Exit, CliError> {
    let db = state_db(g, None)?;
    let queued = rusqlite::Connection::open_with_flags(
        &db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .and_then(|c| {
        c.query_row(
            "SELECT count(*) FROM boards WHERE state = 'queued'",
            [],
            |r| r.get::<_, i64>(0),
        )
    });
    match queued {
        Ok(0) => {
            println!("drained: the daemon exited (--exit-when-drained); nothing is queued");
            Ok(Exit::Ok)
        }
        Ok(n) => Err(CliError::failed(format!(
            "the daemon went away while draining with {n} boards still queued ({lost})"
        ))
        .with_hint("they are kept in the journal and sent when the daemon runs again")),
        Err(e) => Err(CliError::failed(format!(
            "the daemon went away while draining ({lost}); cannot read {}: {e}",
            db.display()
        ))),
    }
}

pub async fn export(g: &GlobalOpts, a: ExportArgs) -> Result<Exit, CliError> {
    let report_error = |e: ReportError| {
        if e.is_usage() {
            CliError::usage(e.to_string())
        } else {
            CliError::failed(e.to_string())
        }
    };
    let format: ExportFormat = a.format.parse().map_err(report_error)?;
    let state = a
        .state
        .as_deref()
        .map(report::parse_state)
        .transpose()
        .map_err(report_error)?;
    let db = state_db(g, a.db)?;
    let res = tokio::task::spawn_blocking(move || match a.out {
        Some(out) => report::export_to_file(&db, format, state, &out),
        None => report::export(&db, format, state, std::io::stdout().lock()),
    })
    .await
    .map_err(|e| CliError::failed(format!("export task failed: {e}")))?;
    res.map_err(report_error)?;
    Ok(Exit::Ok)
}

pub async fn demo(_g: &GlobalOpts, a: DemoArgs) -> Result<Exit, CliError> {
    let mut exe = std::env::current_exe()
        .map_err(|e| CliError::failed(format!("cannot find the dps-station binary: {e}")))?;
    // Rebuilt while running (`cargo build` replaced the file): run the new one at that path.
    if let Some(live) = exe
        .to_str()
        .and_then(|s| s.strip_suffix(" (deleted)"))
        .map(PathBuf::from)
    {
        exe = live;
    }
    let opts = crate::station::demo::DemoOptions {
        keep_running: a.keep_running,
        http: a.http,
        keep_dir: a.keep_dir,
        exe,
    };
    let outcome = crate::station::demo::run(opts).await.map_err(|e| {
        CliError::failed(e.to_string())
            .with_hint("`make demo` installs swtpm and swtpm-tools, then builds and runs this")
    })?;
    if outcome.ok() {
        println!("demo: OK — every expected reply arrived");
        Ok(Exit::Ok)
    } else {
        Err(CliError::failed(format!(
            "demo: expected replies missing: {}",
            outcome.missing.join(", ")
        )))
    }
}
