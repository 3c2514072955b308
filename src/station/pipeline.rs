//! The scan pipeline: validate → dedupe → attest on the slot's worker → registration id and
//! enrollment body → durable `queued` row (group commit) → replies as the row changes state.
//!
//! [`PipelineHandle`] is the one entry point for scans (serial trigger, control socket) and
//! the source of the status snapshot. It must never acknowledge a scan (`QUEUED`) before
//! the board's row is committed, never store anything for a scan whose attestation failed,
//! and never overwrite a recorded EK.
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use tokio::sync::{mpsc, Notify};

use crate::station::metrics::Metrics;
use crate::station::status::{DpsHealth, SlotStatus, StatusSnapshot};
use crate::station::store::{
    Admission, BoardRow, NewBoard, Source, State, StoreError, StoreWriter,
};

/// One reply line of DESIGN §5. `Display` renders exactly the line (no terminator).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Queued {
        serial: String,
        registration_id: String,
    },
    Enrolled {
        serial: String,
        registration_id: String,
    },
    Conflict {
        serial: String,
        reason: String,
        detail: String,
    },
    Rejected {
        serial: String,
        error_code: String,
        detail: String,
    },
    Error {
        serial: Option<String>,
        reason: String,
        detail: String,
    },
}

impl Reply {
    /// `QUEUED` is the only reply after which more replies follow for the same scan.
    pub fn is_final(&self) -> bool {
        !matches!(self, Reply::Queued { .. })
    }

    /// The serial this reply is about, when the scan parsed.
    pub fn serial(&self) -> Option<&str> {
        match self {
            Reply::Queued { serial, .. }
            | Reply::Enrolled { serial, .. }
            | Reply::Conflict { serial, .. }
            | Reply::Rejected { serial, .. } => Some(serial),
            Reply::Error { serial, .. } => serial.as_deref(),
        }
    }

    pub(crate) fn error(serial: Option<&str>, reason: &str, detail: impl Into<String>) -> Reply {
        Reply::Error {
            serial: serial.map(str::to_owned),
            reason: reason.to_owned(),
            detail: detail.into(),
        }
    }
}

/// Replace anything that would break the one-line protocol (CR, LF, other controls).
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reply::Queued {
                serial,
                registration_id,
            } => write!(
                f,
                "QUEUED {} {}",
                one_line(serial),
                one_line(registration_id)
            ),
            Reply::Enrolled {
                serial,
                registration_id,
            } => write!(
                f,
                "ENROLLED {} {}",
                one_line(serial),
                one_line(registration_id)
            ),
            Reply::Conflict {
                serial,
                reason,
                detail,
            } => write!(
                f,
                "CONFLICT {} {} {}",
                one_line(serial),
                one_line(reason),
                one_line(detail)
            ),
            Reply::Rejected {
                serial,
                error_code,
                detail,
            } => write!(
                f,
                "REJECTED {} {} {}",
                one_line(serial),
                one_line(error_code),
                one_line(detail)
            ),
            Reply::Error {
                serial,
                reason,
                detail,
            } => write!(
                f,
                "ERROR {} {} {}",
                serial
                    .as_deref()
                    .map(one_line)
                    .unwrap_or_else(|| "-".into()),
                one_line(reason),
                one_line(detail)
            ),
        }
    }
}

/// Why an operator requeue was refused. Messages name the serial, never a secret.
#[derive(Debug, thiserror::Error)]
pub enum RequeueError {
    #[error("no board with serial {0} is recorded")]
    UnknownSerial(String),
    #[error("board {serial} is {state}: {why}")]
    Refused {
        serial: String,
        state: String,
        why: &'static str,
    },
    #[error("the station is shutting down")]
    Stopping,
    #[error(transparent)]
    Store(StoreError),
}

/// A scan as it arrives from a trigger: an optional slot name and the board serial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanRequest {
    pub slot: Option<String>,
    pub serial: String,
}

impl Reply {
    /// The reply a board row stands for (its stored state).
    pub fn from_row(row: &BoardRow) -> Reply {
        let serial = row.serial.clone();
        let detail = row.detail.clone().unwrap_or_default();
        match row.state {
            State::Queued => Reply::Queued {
                serial,
                registration_id: row.registration_id.clone(),
            },
            State::Enrolled => Reply::Enrolled {
                serial,
                registration_id: row.registration_id.clone(),
            },
            State::Conflict => {
                // Conflict details are stored as "<reason>: <detail>".
                let (reason, rest) = match detail.split_once(": ") {
                    Some((r, d)) if !r.contains(' ') => (r.to_owned(), d.to_owned()),
                    _ => ("conflict".to_owned(), detail.clone()),
                };
                Reply::Conflict {
                    serial,
                    reason,
                    detail: if rest.is_empty() { "-".into() } else { rest },
                }
            }
            State::Rejected => Reply::Rejected {
                serial,
                error_code: row
                    .dps_error_code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "0".into()),
                detail: if detail.is_empty() {
                    "-".into()
                } else {
                    detail
                },
            },
        }
    }
}

/// What a slot's attestation produced for one board: everything the row needs.
#[derive(Debug, Clone)]
pub struct Attested {
    /// Lower-case registration id.
    pub registration_id: String,
    /// The complete wire IndividualEnrollment, attestation included.
    pub enrollment: serde_json::Value,
    /// `tpm` or `dice`.
    pub attestation: &'static str,
    pub ek_hash: Option<String>,
    pub cert_sha256: Option<String>,
    pub ek_cert_issuer: Option<String>,
    /// DICE group enrollment: the row is enrolled without a per-board DPS call.
    pub enrolled_without_dps: bool,
}

/// Why a board could not be attested: the §5 reason token and a one-line detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestFailure {
    pub reason: String,
    pub detail: String,
}

/// The attestation step of one slot: serial in, [`Attested`] out. Built by the daemon from
/// the slot's config (TPM worker or DICE CA); benchmarks may supply a synthetic one.
pub type AttestFn =
    Arc<dyn Fn(String) -> BoxFuture<'static, Result<Attested, AttestFailure>> + Send + Sync>;

/// One configured fixture slot as the pipeline sees it.
#[derive(Clone)]
pub struct Slot {
    pub name: String,
    /// `tpm` or `dice`.
    pub kind: &'static str,
    /// Re-run attestation for a known serial (TPM: re-read the EK and compare). DICE slots
    /// answer a known serial from the store without issuing a new identity.
    pub reattest_known: bool,
    pub attest: AttestFn,
}

#[derive(Default)]
struct SlotStats {
    attested: u64,
    errors: u64,
    last_error: Option<String>,
}

type SubKey = (String, String);

/// State shared by the pipeline, the batcher and the daemon.
pub(crate) struct Inner {
    store: StoreWriter,
    slots: Vec<Slot>,
    metrics: Arc<Metrics>,
    paused: AtomicBool,
    draining: AtomicBool,
    stopping: AtomicBool,
    started_at: String,
    /// Wakes the batcher when rows were queued or intake changed.
    pub(crate) wake: Notify,
    /// Subscribers by (registration id, serial).
    subs: Mutex<HashMap<SubKey, Vec<mpsc::UnboundedSender<Reply>>>>,
    /// Where replies of rows that came from the serial line go (set by `resubscribe`), so
    /// that a row requeued by the operator answers on the scanner again.
    serial_sink: Mutex<Option<mpsc::UnboundedSender<Reply>>>,
    slot_stats: Mutex<HashMap<String, SlotStats>>,
    pub(crate) dps: Mutex<DpsHealth>,
    last_errors: Mutex<Vec<String>>,
    extra: Mutex<StatusExtras>,
    pub(crate) in_flight: AtomicU64,
    /// Scans between "accepted for processing" and their first reply (attesting or
    /// committing): a drain is complete only when none is left.
    scans_in_progress: AtomicU64,
}

/// Parts of the snapshot the daemon fills in once it knows them.
#[derive(Default, Clone)]
pub struct StatusExtras {
    pub http_addr: Option<String>,
    pub control_socket: String,
    pub trigger: Option<Arc<dyn Fn() -> serde_json::Value + Send + Sync>>,
}

const LAST_ERRORS: usize = 20;
/// Longest serial the pipeline accepts (the serial line limit is 256 bytes per line).
pub const MAX_SERIAL_LEN: usize = 128;

/// Cheap, cloneable handle to the running pipeline.
#[derive(Clone)]
pub struct PipelineHandle {
    pub(crate) inner: Arc<Inner>,
}

impl PipelineHandle {
    /// A pipeline over `slots` (the first slot takes unprefixed scans) writing to `store`.
    pub fn new(store: StoreWriter, slots: Vec<Slot>, metrics: Arc<Metrics>) -> PipelineHandle {
        let slot_stats = slots
            .iter()
            .map(|s| (s.name.clone(), SlotStats::default()))
            .collect();
        PipelineHandle {
            inner: Arc::new(Inner {
                store,
                slots,
                metrics,
                paused: AtomicBool::new(false),
                draining: AtomicBool::new(false),
                stopping: AtomicBool::new(false),
                started_at: crate::station::store::now_rfc3339(),
                wake: Notify::new(),
                subs: Mutex::new(HashMap::new()),
                serial_sink: Mutex::new(None),
                slot_stats: Mutex::new(slot_stats),
                dps: Mutex::new(DpsHealth::default()),
                last_errors: Mutex::new(Vec::new()),
                extra: Mutex::new(StatusExtras::default()),
                in_flight: AtomicU64::new(0),
                scans_in_progress: AtomicU64::new(0),
            }),
        }
    }

    pub fn store(&self) -> &StoreWriter {
        &self.inner.store
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Fill in the parts of the status only the daemon knows.
    pub fn set_status_extras(&self, extras: StatusExtras) {
        if let Ok(mut e) = self.inner.extra.lock() {
            *e = extras;
        }
    }

    /// Submit one scan from the control socket. The receiver yields `QUEUED` (maybe) and
    /// then one final reply, then closes.
    pub async fn submit(&self, req: ScanRequest) -> mpsc::UnboundedReceiver<Reply> {
        self.submit_from(req, Source::Control).await
    }

    /// Submit one scan, recording where it came from.
    pub async fn submit_from(
        &self,
        req: ScanRequest,
        source: Source,
    ) -> mpsc::UnboundedReceiver<Reply> {
        let (tx, rx) = mpsc::unbounded_channel();
        let this = self.clone();
        // The scan runs on its own task: a client that goes away does not cancel a scan
        // half-way between attestation and commit.
        self.inner.scans_in_progress.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let first = this.process(req, source, tx.clone()).await;
            this.inner.scans_in_progress.fetch_sub(1, Ordering::SeqCst);
            if let Some(reply) = first {
                this.note_reply(&reply);
                let _ = tx.send(reply);
            }
        });
        rx
    }

    /// Operator requeue (`dps-station requeue SERIAL [--force]`): the row standing for
    /// `serial` goes back to `queued` if it is `rejected` (or, with `force`, a conflict DPS
    /// answered), through [`Store::requeue`](crate::station::store::Store::requeue). The
    /// receiver yields `QUEUED` and then the final reply once DPS answered; a row that came
    /// from the serial line also answers there again.
    pub async fn requeue(
        &self,
        serial: &str,
        force: bool,
    ) -> Result<mpsc::UnboundedReceiver<Reply>, RequeueError> {
        if self.inner.stopping.load(Ordering::SeqCst) {
            return Err(RequeueError::Stopping);
        }
        let s2 = serial.to_owned();
        let row = self
            .inner
            .store
            .call(move |s| s.by_serial(&s2))
            .await
            .map_err(RequeueError::Store)?
            .ok_or_else(|| RequeueError::UnknownSerial(serial.to_owned()))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let key = (row.registration_id.clone(), row.serial.clone());
        let serial_sink = if row.source == Source::Serial.as_str() {
            self.inner.serial_sink.lock().ok().and_then(|s| s.clone())
        } else {
            None
        };
        // Subscribe before the commit: the batcher may answer for the row at once.
        self.subscribe(key.clone(), &tx);
        if let Some(sink) = &serial_sink {
            self.subscribe(key.clone(), sink);
        }
        let this = self.clone();
        let id = row.id;
        let res = self
            .inner
            .store
            .call(move |s| {
                let row = s.requeue(id, force)?;
                // QUEUED goes out on the writer thread, before any batch can claim the row.
                this.publish(&row);
                Ok(row)
            })
            .await;
        match res {
            Ok(row) => {
                tracing::info!(serial = %row.serial, registration_id = %row.registration_id, "board requeued by the operator");
                self.inner.wake.notify_one();
                Ok(rx)
            }
            Err(e) => {
                self.unsubscribe(&key, &tx);
                if let Some(sink) = &serial_sink {
                    self.unsubscribe(&key, sink);
                }
                Err(match e {
                    StoreError::NotRequeueable { state, why, .. } => RequeueError::Refused {
                        serial: serial.to_owned(),
                        state,
                        why,
                    },
                    other => RequeueError::Store(other),
                })
            }
        }
    }

    /// Send every future reply of the queued rows that came from the serial line (e.g.
    /// before a restart) to `sink`.
    pub async fn resubscribe(
        &self,
        source: Source,
        sink: mpsc::UnboundedSender<Reply>,
    ) -> Result<usize, crate::station::store::StoreError> {
        let rows = self
            .inner
            .store
            .call(move |s| s.queued_from(source))
            .await?;
        let n = rows.len();
        if source == Source::Serial {
            if let Ok(mut s) = self.inner.serial_sink.lock() {
                *s = Some(sink.clone());
            }
        }
        if let Ok(mut subs) = self.inner.subs.lock() {
            for key in rows {
                subs.entry(key).or_default().push(sink.clone());
            }
        }
        Ok(n)
    }

    fn note_reply(&self, reply: &Reply) {
        if let Reply::Error { reason, .. } = reply {
            self.inner.metrics.inc_scan_error(reason);
            self.push_error(reply.to_string());
        } else if let Reply::Conflict { .. } | Reply::Rejected { .. } = reply {
            self.push_error(reply.to_string());
        }
    }

    pub(crate) fn push_error(&self, line: String) {
        if let Ok(mut v) = self.inner.last_errors.lock() {
            v.push(format!("{} {line}", crate::station::store::now_rfc3339()));
            let excess = v.len().saturating_sub(LAST_ERRORS);
            v.drain(..excess);
        }
    }

    fn subscribe(&self, key: SubKey, tx: &mpsc::UnboundedSender<Reply>) {
        if let Ok(mut subs) = self.inner.subs.lock() {
            subs.entry(key).or_default().push(tx.clone());
        }
    }

    fn unsubscribe(&self, key: &SubKey, tx: &mpsc::UnboundedSender<Reply>) {
        if let Ok(mut subs) = self.inner.subs.lock() {
            if let Some(v) = subs.get_mut(key) {
                v.retain(|s| !s.same_channel(tx));
                if v.is_empty() {
                    subs.remove(key);
                }
            }
        }
    }

    /// Deliver a row's new state to everyone waiting for it; final states end the
    /// subscriptions.
    pub(crate) fn publish(&self, row: &BoardRow) {
        let reply = Reply::from_row(row);
        if reply.is_final() {
            self.note_reply(&reply);
        }
        let key = (row.registration_id.clone(), row.serial.clone());
        let Ok(mut subs) = self.inner.subs.lock() else {
            return;
        };
        let final_ = reply.is_final();
        if let Some(v) = subs.get_mut(&key) {
            v.retain(|s| s.send(reply.clone()).is_ok());
            if final_ || v.is_empty() {
                subs.remove(&key);
            }
        }
    }

    fn slot_error(&self, slot: &str, detail: &str) {
        if let Ok(mut st) = self.inner.slot_stats.lock() {
            let e = st.entry(slot.to_owned()).or_default();
            e.errors += 1;
            e.last_error = Some(detail.to_owned());
        }
    }

    fn slot_ok(&self, slot: &str) {
        if let Ok(mut st) = self.inner.slot_stats.lock() {
            st.entry(slot.to_owned()).or_default().attested += 1;
        }
    }

    /// The scan's whole path up to its first reply. `QUEUED` and later replies go through
    /// the subscription; the returned reply (if any) is the one to send now.
    async fn process(
        &self,
        req: ScanRequest,
        source: Source,
        tx: mpsc::UnboundedSender<Reply>,
    ) -> Option<Reply> {
        let serial = req.serial.trim().to_owned();
        if let Err((reason, detail)) = validate_serial(&serial) {
            let echo = if serial.chars().all(|c| c.is_ascii_graphic()) && !serial.is_empty() {
                Some(serial.as_str())
            } else {
                None
            };
            return Some(Reply::error(echo, reason, detail));
        }
        if self.inner.stopping.load(Ordering::SeqCst) {
            return Some(Reply::error(
                Some(&serial),
                "stopping",
                "the station is shutting down",
            ));
        }
        if self.inner.draining.load(Ordering::SeqCst) {
            return Some(Reply::error(
                Some(&serial),
                "draining",
                "the station is draining and takes no scans",
            ));
        }
        if self.inner.paused.load(Ordering::SeqCst) {
            return Some(Reply::error(
                Some(&serial),
                "paused",
                "intake is paused by the operator",
            ));
        }
        let slot = match &req.slot {
            None => self.inner.slots.first(),
            Some(name) => self.inner.slots.iter().find(|s| &s.name == name),
        };
        let Some(slot) = slot.cloned() else {
            return Some(Reply::error(
                Some(&serial),
                "unknown-slot",
                format!("no slot named {}", req.slot.as_deref().unwrap_or("-")),
            ));
        };
        if !slot.reattest_known {
            let s2 = serial.clone();
            match self.inner.store.call(move |s| s.by_serial(&s2)).await {
                Ok(Some(row)) => {
                    if row.state == State::Queued {
                        let key = (row.registration_id.clone(), row.serial.clone());
                        self.subscribe(key, &tx);
                    }
                    return Some(Reply::from_row(&row));
                }
                Ok(None) => {}
                Err(e) => return Some(Reply::error(Some(&serial), "store-error", e.to_string())),
            }
        }
        let attested = match (slot.attest)(serial.clone()).await {
            Ok(a) => a,
            Err(f) => {
                self.slot_error(&slot.name, &f.detail);
                if slot.kind == "tpm" {
                    self.inner.metrics.inc_tpm_error(&slot.name);
                }
                tracing::warn!(slot = %slot.name, %serial, reason = %f.reason, detail = %f.detail, "attestation failed");
                return Some(Reply::error(Some(&serial), &f.reason, f.detail));
            }
        };
        self.slot_ok(&slot.name);
        let enrollment_json = match serde_json::to_string(&attested.enrollment) {
            Ok(j) => j,
            Err(e) => return Some(Reply::error(Some(&serial), "internal-error", e.to_string())),
        };
        let board = NewBoard {
            serial: serial.clone(),
            slot: slot.name.clone(),
            registration_id: attested.registration_id.to_ascii_lowercase(),
            attestation: attested.attestation.to_owned(),
            ek_hash: attested.ek_hash.clone(),
            cert_sha256: attested.cert_sha256.clone(),
            ek_cert_issuer: attested.ek_cert_issuer.clone(),
            enrollment_json,
            source,
            enrolled_without_dps: attested.enrolled_without_dps,
        };
        let key = (board.registration_id.clone(), serial.clone());
        // Subscribe before the commit: the batcher may answer for the row at once.
        self.subscribe(key.clone(), &tx);
        match self.inner.store.admit(board).await {
            Ok(Admission::Inserted(row)) => {
                let _ = tx.send(Reply::Queued {
                    serial: row.serial.clone(),
                    registration_id: row.registration_id.clone(),
                });
                if row.state == State::Queued {
                    self.inner.wake.notify_one();
                    None
                } else {
                    self.unsubscribe(&key, &tx);
                    Some(Reply::from_row(&row))
                }
            }
            Ok(Admission::Known(row)) => {
                if row.state != State::Queued {
                    self.unsubscribe(&key, &tx);
                }
                let reply = Reply::from_row(&row);
                if reply.is_final() {
                    Some(reply)
                } else {
                    let _ = tx.send(reply);
                    None
                }
            }
            Ok(Admission::EkChanged { recorded, conflict }) => {
                self.unsubscribe(&key, &tx);
                tracing::error!(%serial, recorded = ?recorded.ek_hash, scanned = ?conflict.ek_hash, "ALARM: board EK changed");
                Some(Reply::from_row(&conflict))
            }
            Ok(Admission::Duplicate {
                reason,
                other,
                conflict,
            }) => {
                self.unsubscribe(&key, &tx);
                tracing::error!(%serial, other = %other.serial, %reason, "ALARM: identity already recorded under another serial");
                Some(Reply::from_row(&conflict))
            }
            Err(e) => {
                self.unsubscribe(&key, &tx);
                tracing::error!(%serial, error = %e, "store failed; scan not acknowledged");
                Some(Reply::error(Some(&serial), "store-error", e.to_string()))
            }
        }
    }

    /// A point-in-time snapshot for `status`, the control socket and the HTTP page.
    pub async fn status(&self) -> StatusSnapshot {
        let counts_depth = self
            .inner
            .store
            .call(|s| Ok((s.counts()?, s.queue_depth()?)))
            .await;
        let (counts, (unsent, in_batch)) = match counts_depth {
            Ok(v) => v,
            Err(e) => {
                self.push_error(format!("status: {e}"));
                Default::default()
            }
        };
        let slots = {
            let stats = self.inner.slot_stats.lock();
            self.inner
                .slots
                .iter()
                .map(|s| {
                    let st = stats.as_ref().ok().and_then(|m| m.get(&s.name));
                    SlotStatus {
                        name: s.name.clone(),
                        attestation: s.kind.to_owned(),
                        last_error: st.and_then(|x| x.last_error.clone()),
                        boards_attested: st.map(|x| x.attested).unwrap_or(0),
                        errors: st.map(|x| x.errors).unwrap_or(0),
                    }
                })
                .collect()
        };
        let extras = self
            .inner
            .extra
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default();
        let draining = self.inner.draining.load(Ordering::SeqCst);
        let drained = draining
            && unsent == 0
            && in_batch == 0
            && self.inner.scans_in_progress.load(Ordering::SeqCst) == 0;
        StatusSnapshot {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_at: self.inner.started_at.clone(),
            paused: self.inner.paused.load(Ordering::SeqCst),
            draining,
            drained,
            queue_depth: unsent,
            in_flight: in_batch,
            counts,
            dps: self.inner.dps.lock().map(|d| d.clone()).unwrap_or_default(),
            slots,
            trigger: extras.trigger.as_ref().map(|f| f()),
            http_addr: extras.http_addr.clone(),
            control_socket: extras.control_socket.clone(),
            last_errors: self
                .inner
                .last_errors
                .lock()
                .map(|v| v.clone())
                .unwrap_or_default(),
        }
    }

    /// Stop taking scans (they get `ERROR <serial> paused …`); the queue keeps draining.
    pub fn pause(&self) {
        self.inner.paused.store(true, Ordering::SeqCst);
    }

    /// Take scans again after [`pause`](Self::pause).
    pub fn resume(&self) {
        self.inner.paused.store(false, Ordering::SeqCst);
    }

    /// Drain (end of shift, before maintenance): stop intake until the daemon restarts
    /// (scans get `ERROR <serial> draining …`; `resume` does not undo it) and send every
    /// queued row at once, without the `max_delay` linger. The status shows `draining`
    /// until no row is queued or in flight and no scan is half-way, then `drained`; `run
    /// --exit-when-drained` then exits 0. Rows DPS cannot take yet (service down) keep the
    /// drain open: nothing is dropped to finish it.
    pub fn drain(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
        self.inner.wake.notify_one();
    }

    /// Resolves once a requested drain is complete (see [`drain`](Self::drain)); pending
    /// forever if no drain is requested. Polls the store every 100 ms.
    pub async fn drained(&self) {
        loop {
            if self.is_draining() && self.inner.scans_in_progress.load(Ordering::SeqCst) == 0 {
                let depth = self.inner.store.call(|s| s.queue_depth()).await;
                if matches!(depth, Ok((0, 0)))
                    && self.inner.scans_in_progress.load(Ordering::SeqCst) == 0
                {
                    return;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Refuse every new scan from now on (SIGTERM).
    pub fn stop_intake(&self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }
}

/// Serials are 1..=128 printable ASCII characters without spaces.
fn validate_serial(serial: &str) -> Result<(), (&'static str, String)> {
    if serial.is_empty() {
        return Err(("bad-format", "empty serial".into()));
    }
    if serial.len() > MAX_SERIAL_LEN {
        return Err((
            "too-long",
            format!("serial is {} bytes, at most {MAX_SERIAL_LEN}", serial.len()),
        ));
    }
    if let Some(c) = serial.chars().find(|c| !c.is_ascii_graphic()) {
        let reason = if c.is_ascii_whitespace() {
            "bad-format"
        } else {
            "binary"
        };
        return Err((reason, format!("serial contains {:?}", c)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_lines_match_the_protocol() {
        let q = Reply::Queued {
            serial: "SN-1".into(),
            registration_id: "abc".into(),
        };
        assert_eq!(q.to_string(), "QUEUED SN-1 abc");
        assert!(!q.is_final());
        let e = Reply::error(None, "binary", "line\r\nhas controls");
        assert_eq!(e.to_string(), "ERROR - binary line  has controls");
        assert!(e.is_final());
        let r = Reply::Rejected {
            serial: "S".into(),
            error_code: "400004".into(),
            detail: "bad".into(),
        };
        assert_eq!(r.to_string(), "REJECTED S 400004 bad");
    }

    #[test]
    fn serials_are_validated() {
        assert!(validate_serial("SN-0001").is_ok());
        assert_eq!(validate_serial("").map_err(|e| e.0), Err("bad-format"));
        assert_eq!(validate_serial("a b").map_err(|e| e.0), Err("bad-format"));
        assert_eq!(validate_serial("a\u{1}").map_err(|e| e.0), Err("binary"));
        assert_eq!(
            validate_serial(&"x".repeat(129)).map_err(|e| e.0),
            Err("too-long")
        );
    }
}
