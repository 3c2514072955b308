//! The daemon's wiring and lifecycle (`dps-station run`): build each slot's attestation
//! step (TPM worker or DICE CA), open the store, start the control socket, HTTP server,
//! serial trigger and batcher, tell systemd READY/WATCHDOG, and stop cleanly on SIGTERM.
//!
//! It must never start half-configured (a bad config, CA or credential is an error before
//! anything listens) and never hold a TPM connection between boards.
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt as _;
use tokio::sync::{mpsc, watch};

use crate::attest::ca::StationCa;
use crate::attest::dice::{issue_board, DiceOptions, Fwid};
use crate::attest::tpm::{self, EkRequest, TpmWorker};
use crate::config::{Attestation, Config, DiceEnroll, SlotConfig};
use crate::dps::{ClientOptions, ConnectionString, DpsClient};
use crate::station::batcher::{Batcher, BatcherOptions};
use crate::station::metrics::Metrics;
use crate::station::pipeline::{
    AttestFailure, AttestFn, Attested, PipelineHandle, Reply, ScanRequest, Slot, StatusExtras,
};
use crate::station::store::{Source, StoreWriter};
use crate::station::trigger::{SerialTrigger, TriggerEvent};

/// Why the daemon could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Config, credentials, CA or other setup the operator must fix (exit 2).
    #[error("{message}")]
    Setup {
        message: String,
        hint: Option<String>,
    },
    /// A runtime failure (exit 1).
    #[error("{0}")]
    Runtime(String),
}

impl DaemonError {
    fn setup(message: impl Into<String>) -> Self {
        DaemonError::Setup {
            message: message.into(),
            hint: None,
        }
    }
}

/// How long SIGTERM may take: the in-flight batch gets this long, then it is abandoned
/// (and reconciled at the next start).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How long start waits for the scanner port before sending rows whose replies go to it.
const SERIAL_REPLY_WAIT: Duration = Duration::from_secs(3);

/// A started daemon (used by `run` and by in-process tests).
pub struct Daemon {
    pub pipeline: PipelineHandle,
    pub http_addr: Option<std::net::SocketAddr>,
    shutdown_tx: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Tasks that end by themselves on shutdown (control socket: removes its file; HTTP).
    graceful: Vec<tokio::task::JoinHandle<()>>,
    batcher: tokio::task::JoinHandle<()>,
    trigger: Option<Arc<SerialTrigger>>,
}

fn dice_attester(
    cfg: Arc<Config>,
    slot: SlotConfig,
    ca: Arc<StationCa>,
    fwid: Fwid,
    opts: DiceOptions,
    out_dir: std::path::PathBuf,
    group: bool,
) -> AttestFn {
    Arc::new(move |serial: String| {
        let cfg = cfg.clone();
        let slot = slot.clone();
        let ca = ca.clone();
        let opts = opts.clone();
        let out_dir = out_dir.clone();
        async move {
            let (id, mut body) =
                cfg.render_enrollment(&slot, &serial, None)
                    .map_err(|e| AttestFailure {
                        reason: "config-error".into(),
                        detail: e.to_string(),
                    })?;
            let s2 = serial.clone();
            let id2 = id.clone();
            let bundle = tokio::task::spawn_blocking(move || {
                let b = issue_board(&ca, &s2, &id2, &fwid, &opts)?;
                set_aside_orphan_bundle(&out_dir, &s2)?;
                b.write_to(&out_dir)?;
                Ok::<_, crate::attest::dice::DiceError>(b)
            })
            .await
            .map_err(|e| AttestFailure {
                reason: "ca-error".into(),
                detail: format!("issuing task failed: {e}"),
            })?
            .map_err(|e| AttestFailure {
                reason: e.reason().into(),
                detail: e.to_string(),
            })?;
            if let Some(m) = body.as_object_mut() {
                m.insert(
                    "attestation".into(),
                    serde_json::json!({"type": "x509", "x509": {"clientCertificates": {
                        "primary": {"certificate": bundle.enrollment_certificate_b64()}}}}),
                );
            }
            Ok(Attested {
                registration_id: id.as_str().to_ascii_lowercase(),
                enrollment: body,
                attestation: "dice",
                ek_hash: None,
                cert_sha256: Some(bundle.alias_cert_sha256_hex.clone()),
                ek_cert_issuer: None,
                enrolled_without_dps: group,
            })
        }
        .boxed()
    })
}

/// The pipeline only issues for a serial it has no row for, so a bundle already on disk
/// was left by a crash between writing it and committing the row. That identity was never
/// acknowledged or enrolled: move it aside (kept for the operator, not reused) so the board
/// gets a fresh one instead of an error on every rescan.
fn set_aside_orphan_bundle(
    out_dir: &std::path::Path,
    serial: &str,
) -> Result<(), crate::attest::dice::DiceError> {
    let target = out_dir.join(serial);
    if !target.exists() {
        return Ok(());
    }
    let stamp = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
    let aside = out_dir.join(format!("{serial}.orphaned-{stamp}"));
    std::fs::rename(&target, &aside).map_err(|source| crate::attest::dice::DiceError::Io {
        path: target.clone(),
        source,
    })?;
    tracing::warn!(
        serial,
        moved_to = %aside.display(),
        "a DICE bundle without a board record (left by a crash) was set aside; issuing a new one"
    );
    Ok(())
}

fn tpm_attester(cfg: Arc<Config>, slot: SlotConfig, req: EkRequest) -> AttestFn {
    let worker = Arc::new(TpmWorker::spawn(&slot.name));
    Arc::new(move |serial: String| {
        let cfg = cfg.clone();
        let slot = slot.clone();
        let req = req.clone();
        let worker = worker.clone();
        async move {
            let ek = worker.read_ek(req).await.map_err(|e| AttestFailure {
                reason: e.reason().into(),
                detail: format!("slot {}: {e}", slot.name),
            })?;
            for w in &ek.warnings {
                tracing::info!(slot = %slot.name, %serial, warning = %w, "TPM");
            }
            let (id, mut body) = cfg
                .render_enrollment(&slot, &serial, Some(&ek.ek_hash))
                .map_err(|e| AttestFailure {
                    reason: "config-error".into(),
                    detail: e.to_string(),
                })?;
            if let Some(m) = body.as_object_mut() {
                m.insert(
                    "attestation".into(),
                    serde_json::json!({"type": "tpm", "tpm": {"endorsementKey": ek.ek_b64}}),
                );
            }
            Ok(Attested {
                registration_id: id.as_str().to_ascii_lowercase(),
                enrollment: body,
                attestation: "tpm",
                ek_hash: Some(ek.ek_hash.clone()),
                cert_sha256: ek.ek_cert.as_ref().map(|c| c.sha256_hex.clone()),
                ek_cert_issuer: ek.ek_cert.as_ref().map(|c| c.issuer.clone()),
                enrolled_without_dps: false,
            })
        }
        .boxed()
    })
}

/// Build the DPS client from the config: retry_budget 0 (the batcher does its own
/// backoff) and no client-side pacing (the batcher paces).
pub fn dps_client(cfg: &Config) -> Result<DpsClient, DaemonError> {
    let cs_text = cfg
        .read_connection_string()
        .map_err(|e| DaemonError::Setup {
            message: e.to_string(),
            hint: e.hint().map(str::to_owned),
        })?;
    let cs = ConnectionString::parse(cs_text.expose())
        .map_err(|e| DaemonError::setup(format!("DPS connection string: {e}")))?;
    let mut resolve = Vec::new();
    if let Ok(spec) = std::env::var("DPS_STATION_RESOLVE") {
        for part in spec.split(',').filter(|p| !p.trim().is_empty()) {
            resolve.push(
                crate::dps::client::parse_resolve(part.trim())
                    .map_err(|e| DaemonError::setup(format!("DPS_STATION_RESOLVE: {e}")))?,
            );
        }
    }
    let opts = ClientOptions {
        endpoint: cfg.dps.endpoint.clone(),
        ca_file: cfg.dps.ca_file.clone(),
        api_version: cfg.dps.api_version.clone(),
        request_timeout: cfg.dps.request_timeout,
        retry_budget: Duration::ZERO,
        max_operations_per_minute: None,
        resolve,
    };
    DpsClient::new(cs, opts).map_err(|e| DaemonError::setup(format!("DPS client: {e}")))
}

async fn build_slots(cfg: &Arc<Config>, client: &DpsClient) -> Result<Vec<Slot>, DaemonError> {
    let mut slots = Vec::new();
    let mut dice_ca: Option<Arc<StationCa>> = None;
    for sc in &cfg.slots {
        match sc.attestation {
            Attestation::Tpm => {
                let tcti = sc.tcti.clone().ok_or_else(|| {
                    DaemonError::setup(format!("slot {}: a tpm slot needs tcti", sc.name))
                })?;
                let policy = tpm::EkPolicy::from_str(sc.ek.as_str())
                    .map_err(|e| DaemonError::setup(format!("slot {}: {e}", sc.name)))?;
                let mut req = EkRequest::new(tcti, policy);
                req.timeout = sc.tpm_timeout;
                req.require_hardware_tpm = sc.require_hardware_tpm;
                if let Some(p) = &sc.endorsement_auth_file {
                    req.endorsement_auth = Some(
                        tpm::load_auth_file(p)
                            .map_err(|e| DaemonError::setup(format!("slot {}: {e}", sc.name)))?,
                    );
                }
                slots.push(Slot {
                    name: sc.name.clone(),
                    kind: "tpm",
                    reattest_known: true,
                    attest: tpm_attester(cfg.clone(), sc.clone(), req),
                });
            }
            Attestation::Dice => {
                let dc = cfg.dice.as_ref().ok_or_else(|| {
                    DaemonError::setup(format!("slot {}: a dice slot needs [dice]", sc.name))
                })?;
                let ca = match &dice_ca {
                    Some(ca) => ca.clone(),
                    None => {
                        let ca = StationCa::load(&dc.ca_cert, &dc.ca_key)
                            .map_err(|e| DaemonError::setup(format!("[dice] station CA: {e}")))?;
                        let ca = Arc::new(ca);
                        dice_ca = Some(ca.clone());
                        ca
                    }
                };
                let fwid = Fwid::from_str(&dc.fwid)
                    .map_err(|e| DaemonError::setup(format!("[dice] fwid: {e}")))?;
                let group = dc.enroll == DiceEnroll::Group;
                if group {
                    let gid = dc.group_id.clone().ok_or_else(|| {
                        DaemonError::setup("[dice] enroll = \"group\" needs group_id")
                    })?;
                    match client.get_group(&gid).await {
                        Ok(_) => tracing::info!(group = %gid, "DICE enrollment group exists"),
                        Err(e) if e.is_not_found() => {
                            return Err(DaemonError::Setup {
                                message: format!("[dice] enrollment group {gid} does not exist in DPS"),
                                hint: Some(format!(
                                    "create it first: dps-station group create --group-id {gid} --x509-ca-cert {}",
                                    dc.ca_cert.display()
                                )),
                            })
                        }
                        Err(e) => tracing::warn!(group = %gid, error = %e, "cannot check the DICE enrollment group now"),
                    }
                }
                slots.push(Slot {
                    name: sc.name.clone(),
                    kind: "dice",
                    reattest_known: false,
                    attest: dice_attester(
                        cfg.clone(),
                        sc.clone(),
                        ca,
                        fwid,
                        DiceOptions {
                            validity_days: dc.validity_days,
                            tcb_info_critical: dc.tcb_info_critical,
                        },
                        dc.out_dir.clone(),
                        group,
                    ),
                });
            }
        }
    }
    Ok(slots)
}

/// `WATCHDOG_USEC` as libsystemd reads it: honoured unless `WATCHDOG_PID` names another
/// process.
fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

fn sd_notify(state: &[sd_notify::NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        if let Err(e) = sd_notify::notify(false, state) {
            tracing::warn!(error = %e, "sd_notify failed");
        }
    }
}

impl Daemon {
    /// Start everything; returns once the control socket (and HTTP, if configured) listen.
    pub async fn start(cfg: Config) -> Result<Daemon, DaemonError> {
        let cfg = Arc::new(cfg);
        let client = dps_client(&cfg)?;
        let slots = build_slots(&cfg, &client).await?;
        let store =
            StoreWriter::spawn(&cfg.state.path).map_err(|e| DaemonError::Runtime(e.to_string()))?;
        let metrics = Metrics::new();
        for s in slots.iter().filter(|s| s.kind == "tpm") {
            metrics.register_tpm_slot(&s.name);
        }
        let pipeline = PipelineHandle::new(store, slots, metrics.clone());
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let mut graceful = Vec::new();

        // Control socket: bind now so that a live daemon on it is an error before READY.
        // Both listeners are bound before anything is served, so a failure of the second
        // leaves nothing running and no socket file behind.
        let sock = cfg.control.socket.clone();
        let listener = crate::station::control::bind(&sock)
            .await
            .map_err(|e| DaemonError::setup(e.to_string()))?;
        let http_listener = match &cfg.control.http {
            None => None,
            Some(addr) => {
                let bound = async {
                    let l = tokio::net::TcpListener::bind(addr.as_str()).await?;
                    let a = l.local_addr()?;
                    Ok::<_, std::io::Error>((l, a))
                }
                .await;
                match bound {
                    Ok(b) => Some(b),
                    Err(e) => {
                        drop(listener);
                        let _ = std::fs::remove_file(&sock);
                        return Err(DaemonError::setup(format!("[control] http {addr}: {e}")));
                    }
                }
            }
        };
        {
            let p = pipeline.clone();
            let rx = shutdown_rx.clone();
            graceful.push(tokio::spawn(async move {
                if let Err(e) =
                    crate::station::control::serve_listener(listener, &sock, p, rx).await
                {
                    tracing::error!(error = %e, "control socket stopped");
                }
            }));
        }

        let mut http_addr = None;
        if let Some((l, bound)) = http_listener {
            tracing::info!(addr = %bound, "HTTP status server listening");
            http_addr = Some(bound);
            let p = pipeline.clone();
            let m = metrics.clone();
            let rx = shutdown_rx.clone();
            graceful.push(tokio::spawn(async move {
                if let Err(e) = crate::station::http::serve(l, p, m, rx).await {
                    tracing::error!(error = %e, "HTTP server stopped");
                }
            }));
        }

        // Serial trigger.
        let mut trigger = None;
        if let Some(sc) = cfg.trigger.serial.clone() {
            let (tx, mut rx) = mpsc::channel::<TriggerEvent>(256);
            let t = Arc::new(SerialTrigger::spawn(sc, tx));
            trigger = Some(t.clone());
            // Replies for rows that came from the serial line, also those queued before a
            // restart.
            let (sink_tx, mut sink_rx) = mpsc::unbounded_channel::<Reply>();
            {
                let t = t.clone();
                tasks.push(tokio::spawn(async move {
                    while let Some(r) = sink_rx.recv().await {
                        t.reply(&r.to_string());
                    }
                }));
            }
            match pipeline.resubscribe(Source::Serial, sink_tx.clone()).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(
                        rows = n,
                        "serial replies will follow for rows queued before the restart"
                    );
                    // Give the reader a moment to open the port so that those replies are
                    // not dropped (bounded: a missing scanner must not block the queue).
                    let deadline = tokio::time::Instant::now() + SERIAL_REPLY_WAIT;
                    while !t.status().connected && tokio::time::Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot resubscribe queued rows"),
            }
            let p = pipeline.clone();
            let t2 = t.clone();
            tasks.push(tokio::spawn(async move {
                while let Some(ev) = rx.recv().await {
                    match ev {
                        TriggerEvent::Scan(scan) => {
                            let mut replies = p
                                .submit_from(
                                    ScanRequest {
                                        slot: scan.slot,
                                        serial: scan.serial,
                                    },
                                    Source::Serial,
                                )
                                .await;
                            let sink = sink_tx.clone();
                            tokio::spawn(async move {
                                while let Some(r) = replies.recv().await {
                                    let _ = sink.send(r);
                                }
                            });
                        }
                        TriggerEvent::Bad(e) => {
                            p.metrics().inc_scan_error(e.reason);
                            p.push_error(e.reply_line());
                            t2.reply(&e.reply_line());
                        }
                    }
                }
            }));
        }

        let trig_for_status = trigger.clone();
        pipeline.set_status_extras(StatusExtras {
            http_addr: http_addr.map(|a| a.to_string()),
            control_socket: cfg.control.socket.display().to_string(),
            trigger: trig_for_status.map(|t| {
                Arc::new(move || serde_json::to_value(t.status()).unwrap_or_default())
                    as Arc<dyn Fn() -> serde_json::Value + Send + Sync>
            }),
        });

        // Metrics mirror of the table, refreshed every 2 s.
        {
            let p = pipeline.clone();
            let mut rx = shutdown_rx.clone();
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(2));
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = rx.changed() => if *rx.borrow() { return },
                    }
                    if let Ok((counts, (unsent, _))) = p
                        .store()
                        .call(|s| Ok((s.counts()?, s.queue_depth()?)))
                        .await
                    {
                        for (state, n) in counts {
                            p.metrics().set_boards(&state, n as i64);
                        }
                        p.metrics().set_queue_depth(unsent as i64);
                    }
                }
            }));
        }

        let opts = BatcherOptions {
            max_size: cfg.batch.max_size,
            max_delay: cfg.batch.max_delay,
            max_operations_per_minute: cfg.dps.max_operations_per_minute,
            shutdown_grace: SHUTDOWN_GRACE,
            ..BatcherOptions::default()
        };
        let batcher = {
            let b = Batcher::new(Arc::new(client), pipeline.clone(), opts);
            let rx = shutdown_rx.clone();
            tokio::spawn(async move {
                if let Err(e) = b.run(rx).await {
                    tracing::error!(error = %e, "batcher stopped");
                }
            })
        };

        // Watchdog: ping at half of WATCHDOG_USEC.
        if let Some(wd) = watchdog_interval() {
            let half = wd / 2;
            let mut rx = shutdown_rx.clone();
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(half);
                loop {
                    tokio::select! {
                        _ = tick.tick() => sd_notify(&[sd_notify::NotifyState::Watchdog]),
                        _ = rx.changed() => if *rx.borrow() { return },
                    }
                }
            }));
        }
        sd_notify(&[sd_notify::NotifyState::Ready]);
        tracing::info!(
            http = %http_addr.map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
            socket = %cfg.control.socket.display(),
            db = %cfg.state.path.display(),
            slots = cfg.slots.len(),
            "dps-station ready"
        );
        Ok(Daemon {
            pipeline,
            http_addr,
            shutdown_tx,
            tasks,
            graceful,
            batcher,
            trigger,
        })
    }

    /// Stop intake, give the in-flight batch up to [`SHUTDOWN_GRACE`], stop everything.
    pub async fn shutdown(self) {
        sd_notify(&[sd_notify::NotifyState::Stopping]);
        self.pipeline.stop_intake();
        let _ = self.shutdown_tx.send(true);
        let bound = SHUTDOWN_GRACE + Duration::from_secs(2);
        if tokio::time::timeout(bound, self.batcher).await.is_err() {
            tracing::warn!("batcher did not stop in time; its batch is reconciled at next start");
        }
        // Let the control socket remove its file and HTTP finish its answers (bounded).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        for mut t in self.graceful {
            if tokio::time::timeout_at(deadline, &mut t).await.is_err() {
                t.abort();
            }
        }
        for t in self.tasks {
            t.abort();
        }
        if let Some(t) = self.trigger {
            if let Ok(t) = Arc::try_unwrap(t) {
                tokio::task::spawn_blocking(move || t.shutdown());
            }
        }
    }
}

/// Load the config at `path`, run until SIGTERM/SIGINT, stop cleanly.
pub async fn run_from_path(path: &Path) -> Result<(), DaemonError> {
    let mut signals = StopSignals::install()?;
    let cfg = crate::config::load(path).map_err(|e| DaemonError::Setup {
        message: e.to_string(),
        hint: e.hint().map(str::to_owned),
    })?;
    let d = Daemon::start(cfg).await?;
    signals.recv().await;
    tracing::info!("stopping: intake closed, finishing the in-flight batch");
    d.shutdown().await;
    Ok(())
}

/// SIGTERM and SIGINT, caught from the moment of [`install`](Self::install): install them
/// before starting the daemon, so that a SIGTERM arriving while it starts (or right after
/// its socket appears) still ends in a clean stop and exit 0, never a death by signal.
pub struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    pub fn install() -> Result<StopSignals, DaemonError> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(StopSignals {
            term: signal(SignalKind::terminate())
                .map_err(|e| DaemonError::Runtime(format!("cannot watch SIGTERM: {e}")))?,
            int: signal(SignalKind::interrupt())
                .map_err(|e| DaemonError::Runtime(format!("cannot watch SIGINT: {e}")))?,
        })
    }

    /// The next SIGTERM or SIGINT (also one that arrived since `install`).
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// Wait for SIGTERM or SIGINT (handlers installed now; prefer [`StopSignals`]).
pub async fn wait_for_signal() -> Result<(), DaemonError> {
    StopSignals::install()?.recv().await;
    Ok(())
}
