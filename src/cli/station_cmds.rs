//! Station commands: `run`, `scan`, `status`, `export`, `control`, `demo`.
//!
//! `run` is the daemon; `scan`, `status` and `control` talk to it over its control socket
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
pub struct RunArgs {}

/// `run`: load the config (errors exit 2), start the daemon, stop on SIGTERM/SIGINT (exit 0).
/// The global `--connection-string-file`, `--endpoint` and `--ca-file` override `[dps]`.
pub async fn run(g: &GlobalOpts, _a: RunArgs) -> Result<Exit, CliError> {
    use crate::station::daemon::{Daemon, DaemonError};
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
    crate::station::daemon::wait_for_signal()
        .await
        .map_err(to_cli)?;
    tracing::warn!("stopping: intake closed, finishing the in-flight batch");
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
    /// Stop intake for good and empty the queue.
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
    let timeout = humantime::parse_duration(&a.timeout)
        .map_err(|e| CliError::usage(format!("--timeout {:?}: {e}", a.timeout)))?;
    let path = control_socket(g, a.socket)?;
    let mut client = ControlClient::connect(&path).await.map_err(control_error)?;
    let req = ControlRequest::Scan {
        serial: a.serial.clone(),
        slot: a.slot,
        wait: a.wait,
    };
    client.send(&req).await.map_err(control_error)?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let next = tokio::time::timeout_at(deadline, client.recv()).await;
        let v = match next {
            Err(_) => {
                return Err(CliError::failed(format!(
                    "no final reply for {} within {}",
                    a.serial, a.timeout
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
            "QUEUED" if !a.wait || is_final => return Ok(Exit::Ok),
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
    let v = client.call(&req).await.map_err(control_error)?;
    if v.get("ok").and_then(|o| o.as_bool()) == Some(true) {
        if g.json {
            println!("{v}");
        }
        Ok(Exit::Ok)
    } else {
        Err(CliError::failed(format!("daemon refused: {v}")))
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
