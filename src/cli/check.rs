//! `dps-station check`: load the config (errors exit 2), then walk everything it names and
//! print one checklist line per item: the state directory, the control socket's place (and
//! whether a daemon already runs there), the HTTP address, each TPM slot's TCTI and EK (read
//! only: nothing is created or persisted), the station CA and DICE `out_dir`, the scanner
//! port, the DPS trust anchors (`ca_file`) and DPS authentication with one cheap query.
//! Exit 0 when every item is ok, 1 otherwise.
//!
//! It must never change a TPM, write outside a probe file it removes at once, or print the
//! connection string, a SAS token or key material.
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::Serialize;

use super::{CliError, Exit, GlobalOpts};
use crate::attest::tpm::{self, EkPolicy, EkRequest, TpmError};
use crate::config::{self, Attestation, Config, SerialConfig, SlotConfig};
use crate::dps::client::{ClientOptions, DpsClient};
use crate::dps::connection_string::ConnectionString;

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Skip the DPS authentication item (offline stations).
    #[arg(long)]
    pub no_dps: bool,
}

/// One line of the checklist.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CheckItem {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

impl CheckItem {
    fn ok(name: impl Into<String>, detail: impl Into<String>) -> Self {
        CheckItem {
            name: name.into(),
            ok: true,
            detail: detail.into(),
        }
    }
    fn fail(name: impl Into<String>, detail: impl Into<String>) -> Self {
        CheckItem {
            name: name.into(),
            ok: false,
            detail: detail.into(),
        }
    }
}

/// The whole checklist, as `--json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub ok: bool,
    pub items: Vec<CheckItem>,
}

pub async fn run(g: &GlobalOpts, a: CheckArgs) -> Result<Exit, CliError> {
    let cfg = match config::load(&g.config) {
        Ok(c) => c,
        Err(e) => {
            if g.json {
                let report = CheckReport {
                    ok: false,
                    items: vec![CheckItem::fail("config", e.to_string())],
                };
                print_json(&report);
            }
            let mut err = CliError::usage(e.to_string());
            if let Some(h) = e.hint() {
                err = err.with_hint(h);
            }
            return Err(err);
        }
    };
    let report = check_all(&cfg, g, !a.no_dps).await;
    if g.json {
        print_json(&report);
    } else {
        let width = report.items.iter().map(|i| i.name.len()).max().unwrap_or(0);
        for i in &report.items {
            let mark = if i.ok { "[ok]  " } else { "[FAIL]" };
            println!("{mark} {:width$}  {}", i.name, i.detail);
        }
    }
    Ok(if report.ok { Exit::Ok } else { Exit::Failed })
}

fn print_json(report: &CheckReport) {
    match serde_json::to_string_pretty(report) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("error: cannot encode the checklist: {e}"),
    }
}

/// Run every check the config implies (the library side of `check`, also used by tests).
pub async fn check_all(cfg: &Config, g: &GlobalOpts, with_dps: bool) -> CheckReport {
    let mut items = vec![CheckItem::ok("config", describe_config(cfg))];
    items.push(check_state_dir(&cfg.state.path));
    let (control, daemon) = check_control(&cfg.control.socket).await;
    items.push(control);
    let daemon_http = daemon.as_ref().and_then(|d| d.http_addr.clone());
    items.push(check_http(cfg.control.http.as_deref(), daemon_http.as_deref()).await);
    for slot in &cfg.slots {
        match slot.attestation {
            Attestation::Tpm => items.push(check_tpm_slot(slot).await),
            Attestation::Dice => items.push(check_dice_slot(cfg, slot).await),
        }
    }
    if let Some(serial) = &cfg.trigger.serial {
        let held = daemon.as_ref().and_then(|d| d.trigger.clone());
        items.push(check_serial(serial.clone(), held).await);
    }
    if with_dps {
        if let Some(ca) = g.ca_file.as_ref().or(cfg.dps.ca_file.as_ref()) {
            items.push(check_dps_ca(ca));
        }
        items.push(check_dps(cfg, g).await);
    }
    CheckReport {
        ok: items.iter().all(|i| i.ok),
        items,
    }
}

fn describe_config(cfg: &Config) -> String {
    let files: Vec<String> = cfg
        .sources
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let slots: Vec<String> = cfg
        .slots
        .iter()
        .map(|s| format!("{} ({})", s.name, s.attestation))
        .collect();
    format!("{}; slots: {}", files.join(" + "), slots.join(", "))
}

/// The directory holding the SQLite file must exist and take a new file.
fn check_state_dir(db: &Path) -> CheckItem {
    let name = "state";
    let dir = match db.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return CheckItem::fail(
            name,
            format!(
                "{} does not exist (systemd creates it with StateDirectory=)",
                dir.display()
            ),
        );
    }
    match tempfile::Builder::new()
        .prefix(".dps-station-check")
        .tempfile_in(&dir)
    {
        Ok(probe) => {
            drop(probe);
            let db_note = if db.exists() {
                "existing database"
            } else {
                "database will be created"
            };
            CheckItem::ok(name, format!("{} writable ({db_note})", dir.display()))
        }
        Err(e) => CheckItem::fail(name, format!("{} is not writable: {e}", dir.display())),
    }
}

/// The nearest existing ancestor of `p` (itself included) and whether we may write there.
fn writable_dir(p: &Path) -> Result<PathBuf, String> {
    let mut cur = Some(p);
    while let Some(d) = cur {
        if d.is_dir() {
            return nix::unistd::access(
                d,
                nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
            )
            .map(|()| d.to_path_buf())
            .map_err(|e| format!("{} is not writable: {e}", d.display()));
        }
        if d.exists() {
            return Err(format!("{} is not a directory", d.display()));
        }
        cur = d.parent().filter(|x| !x.as_os_str().is_empty());
    }
    Ok(PathBuf::from("."))
}

/// The control socket's place: a writable directory (or one `run` can create), and what is
/// there now (nothing, a stale socket `run` replaces, a running daemon, or a file `run`
/// refuses to touch). Also returns the running daemon's status, if one answers.
async fn check_control(sock: &Path) -> (CheckItem, Option<crate::station::status::StatusSnapshot>) {
    use crate::station::control::ControlClient;
    use std::os::unix::fs::FileTypeExt;
    let name = "control";
    let shown = sock.display();
    match std::fs::symlink_metadata(sock) {
        Ok(m) if !m.file_type().is_socket() => {
            return (
                CheckItem::fail(
                    name,
                    format!("{shown} exists and is not a socket; run refuses to replace it"),
                ),
                None,
            )
        }
        Ok(_) => {
            return match ControlClient::connect(sock).await {
                Ok(mut c) => {
                    let http = c.status().await.ok();
                    (
                        CheckItem::ok(
                            name,
                            format!("{shown}: a dps-station daemon is running on it"),
                        ),
                        http,
                    )
                }
                Err(crate::station::control::ControlError::NotRunning { .. }) => (
                    CheckItem::ok(
                        name,
                        format!("{shown}: stale socket of a stopped daemon (replaced at start)"),
                    ),
                    None,
                ),
                Err(e) => (CheckItem::fail(name, e.to_string()), None),
            };
        }
        Err(_) => {}
    }
    let dir = sock.parent().unwrap_or(Path::new("."));
    match writable_dir(dir) {
        Ok(d) if d == dir => (
            CheckItem::ok(name, format!("{shown}: {} is writable", d.display())),
            None,
        ),
        Ok(d) => (
            CheckItem::ok(
                name,
                format!(
                    "{shown}: {} will be created in {} (systemd: RuntimeDirectory=)",
                    dir.display(),
                    d.display()
                ),
            ),
            None,
        ),
        // Missing and not creatable by us: under systemd, RuntimeDirectory= makes it when
        // the service starts (and removes it when it stops), so that alone is no failure.
        Err(_) if !dir.exists() => (
            CheckItem::ok(
                name,
                format!(
                    "{shown}: {} does not exist now; systemd creates it when the service \
                     starts (RuntimeDirectory=dps-station)",
                    dir.display()
                ),
            ),
            None,
        ),
        Err(e) => (CheckItem::fail(name, format!("{shown}: {e}")), None),
    }
}

/// `[control] http`: the address can be bound (or the running daemon serves it).
async fn check_http(addr: Option<&str>, daemon_http: Option<&str>) -> CheckItem {
    let name = "http";
    let Some(addr) = addr else {
        return CheckItem::ok(name, "disabled (http = \"\")");
    };
    match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => {
            let bound = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
            CheckItem::ok(name, format!("{addr} can be bound ({bound})"))
        }
        Err(e) => {
            let served = daemon_http.is_some_and(|h| {
                let (want, have) = (addr.parse::<std::net::SocketAddr>(), h.parse::<std::net::SocketAddr>());
                matches!((want, have), (Ok(w), Ok(h)) if w == h || (w.port() == 0 && w.ip() == h.ip()))
            });
            if served {
                CheckItem::ok(name, format!("{addr}: served by the running daemon"))
            } else {
                CheckItem::fail(name, format!("{addr}: cannot bind: {e}"))
            }
        }
    }
}

/// `[dps] ca_file` / `--ca-file`: PEM certificates that parse.
fn check_dps_ca(path: &Path) -> CheckItem {
    let name = "dps ca_file";
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) => return CheckItem::fail(name, format!("{}: {e}", path.display())),
    };
    let blocks = match pem::parse_many(&text) {
        Ok(b) => b,
        Err(e) => return CheckItem::fail(name, format!("{}: not PEM: {e}", path.display())),
    };
    let certs: Vec<_> = blocks.iter().filter(|b| b.tag() == "CERTIFICATE").collect();
    if certs.is_empty() {
        return CheckItem::fail(name, format!("{}: no CERTIFICATE in it", path.display()));
    }
    let mut subjects = Vec::new();
    for c in &certs {
        match x509_parser::parse_x509_certificate(c.contents()) {
            Ok((_, cert)) => subjects.push(cert.subject().to_string()),
            Err(e) => {
                return CheckItem::fail(
                    name,
                    format!("{}: a certificate does not parse: {e}", path.display()),
                )
            }
        }
    }
    CheckItem::ok(
        name,
        format!(
            "{}: {} trust anchor(s): {}",
            path.display(),
            certs.len(),
            subjects.join("; ")
        ),
    )
}

async fn check_tpm_slot(slot: &SlotConfig) -> CheckItem {
    let name = format!("tpm {}", slot.name);
    let Some(tcti) = slot.tcti.clone() else {
        return CheckItem::fail(name, "no TCTI configured");
    };
    let mut req = EkRequest::new(tcti.clone(), EkPolicy::ReadOnly);
    req.timeout = slot.tpm_timeout;
    req.require_hardware_tpm = slot.require_hardware_tpm;
    if let Some(path) = &slot.endorsement_auth_file {
        match tpm::load_auth_file(path) {
            Ok(auth) => req.endorsement_auth = Some(auth),
            Err(e) => return CheckItem::fail(name, e.to_string()),
        }
    }
    let timeout = slot.tpm_timeout;
    let work = tokio::task::spawn_blocking(move || tpm::read_ek(&req));
    let result = match tokio::time::timeout(timeout, work).await {
        Err(_) => {
            return CheckItem::fail(
                name,
                format!(
                    "{tcti}: no answer within {}",
                    humantime::format_duration(timeout)
                ),
            )
        }
        Ok(Err(e)) => return CheckItem::fail(name, format!("{tcti}: TPM task failed: {e}")),
        Ok(Ok(r)) => r,
    };
    match result {
        Ok(ek) => {
            let soft = if ek.software_tpm {
                ", software TPM"
            } else {
                ""
            };
            let cert = match &ek.ek_cert {
                Some(c) => format!(", EK certificate from {}", c.issuer),
                None => String::from(", no EK certificate"),
            };
            CheckItem::ok(
                name,
                format!(
                    "{tcti}: EK at 0x81010001 read (registration id {}; manufacturer {}{soft}{cert})",
                    ek.registration_id, ek.manufacturer
                ),
            )
        }
        // A missing persistent EK is fine when the slot may create one on the first scan.
        Err(TpmError::NoEk) if slot.ek != EkPolicy::ReadOnly => CheckItem::ok(
            name,
            format!(
                "{tcti}: TPM reachable; no persistent EK yet (ek = \"{}\" creates it per board)",
                slot.ek
            ),
        ),
        Err(e) => {
            let msg = e.to_string();
            if msg.contains(&tcti) {
                CheckItem::fail(name, msg)
            } else {
                CheckItem::fail(name, format!("{tcti}: {msg}"))
            }
        }
    }
}

async fn check_dice_slot(cfg: &Config, slot: &SlotConfig) -> CheckItem {
    let name = format!("dice {}", slot.name);
    let Some(dice) = cfg.dice.clone() else {
        return CheckItem::fail(name, "no [dice] section");
    };
    let loaded = tokio::task::spawn_blocking(move || {
        crate::attest::ca::StationCa::load(&dice.ca_cert, &dice.ca_key).map(|ca| (ca, dice))
    })
    .await;
    match loaded {
        Err(e) => CheckItem::fail(name, format!("CA check failed: {e}")),
        Ok(Err(e)) => CheckItem::fail(name, e.to_string()),
        Ok(Ok((ca, dice))) => {
            let now = time::OffsetDateTime::now_utc();
            if ca.not_after() <= now {
                return CheckItem::fail(
                    name,
                    format!("CA {} expired at {}", ca.subject(), ca.not_after()),
                );
            }
            if let Err(e) = writable_dir(&dice.out_dir) {
                return CheckItem::fail(name, format!("out_dir {}: {e}", dice.out_dir.display()));
            }
            let days_left = (ca.not_after() - now).whole_days();
            let mut detail = format!(
                "CA {} loaded ({}), valid for {days_left} more days",
                ca.subject(),
                ca.signer_description()
            );
            if i64::from(dice.validity_days) > days_left {
                detail.push_str(&format!(
                    "; device certificates will be cut to the CA's end (validity_days = {})",
                    dice.validity_days
                ));
            }
            CheckItem::ok(name, detail)
        }
    }
}

/// Open the scanner port the way the trigger does, then close it.
async fn check_serial(cfg: SerialConfig, daemon_port: Option<serde_json::Value>) -> CheckItem {
    let name = "scanner";
    let path = cfg.port.display().to_string();
    // The running daemon holds the port: its own view is the answer.
    if let Some(t) = daemon_port.filter(|t| t["port"] == path.as_str()) {
        return if t["connected"] == true {
            CheckItem::ok(name, format!("{path}: open in the running daemon"))
        } else {
            CheckItem::fail(
                name,
                format!(
                    "{path}: the running daemon cannot open it ({})",
                    t["last_error"].as_str().unwrap_or("not connected")
                ),
            )
        };
    }
    let opened = tokio::task::spawn_blocking(move || {
        serialport::new(cfg.port.to_string_lossy().into_owned(), cfg.baud)
            .data_bits(serialport::DataBits::Eight)
            .parity(serialport::Parity::None)
            .stop_bits(serialport::StopBits::One)
            .flow_control(serialport::FlowControl::None)
            .timeout(Duration::from_millis(50))
            .open()
            .map(drop)
            .map(|_| cfg.baud)
    })
    .await;
    match opened {
        Ok(Ok(baud)) => CheckItem::ok(name, format!("{path} opens at {baud} baud 8N1")),
        Ok(Err(e)) => {
            let busy = matches!(
                e.kind(),
                serialport::ErrorKind::Io(std::io::ErrorKind::ResourceBusy)
            ) || e.to_string().contains("busy");
            let hint = if busy {
                " (in use: is dps-station running?)"
            } else {
                ""
            };
            CheckItem::fail(name, format!("{path}: {e}{hint}"))
        }
        Err(e) => CheckItem::fail(name, format!("{path}: check failed: {e}")),
    }
}

async fn check_dps(cfg: &Config, g: &GlobalOpts) -> CheckItem {
    let name = "dps";
    let cs = match &g.connection_string_file {
        Some(p) => ConnectionString::from_file(p).map_err(|e| e.to_string()),
        None => cfg
            .read_connection_string()
            .map_err(|e| e.to_string())
            .and_then(|s| ConnectionString::parse(s.expose()).map_err(|e| e.to_string())),
    };
    let cs = match cs {
        Ok(cs) => cs,
        Err(e) => return CheckItem::fail(name, e),
    };
    let host = cs.host_name().to_string();
    let opts = ClientOptions {
        endpoint: g.endpoint.clone().or_else(|| cfg.dps.endpoint.clone()),
        ca_file: g.ca_file.clone().or_else(|| cfg.dps.ca_file.clone()),
        api_version: cfg.dps.api_version.clone(),
        request_timeout: cfg.dps.request_timeout,
        // A check answers quickly: a short retry window, not the daemon's budget.
        retry_budget: Duration::from_secs(10),
        max_operations_per_minute: None,
        ..ClientOptions::default()
    };
    let client = match DpsClient::new(cs, opts) {
        Ok(c) => c,
        Err(e) => return CheckItem::fail(name, e.to_string()),
    };
    let url = client.base_url().to_string();
    match client.query_enrollments_page("*", Some(1), None).await {
        Ok(_) => CheckItem::ok(name, format!("authenticated to {host} at {url}")),
        Err(e) => CheckItem::fail(name, format!("{host} at {url}: {e}")),
    }
}
