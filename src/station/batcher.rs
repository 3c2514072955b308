//! The batcher: takes `queued` rows from the store in order, sends them to DPS as bulk
//! creates (≤ `max_size` per request), and moves each row to its final state.
//!
//! A batch is recorded (rows marked with its id, committed) BEFORE its request is sent, and
//! a batch found unfinished at start is reconciled by GET before anything is re-sent, so a
//! crash at any point enrolls no board twice. Whole-request failures (429, 5xx, network)
//! leave rows queued and back off with full jitter, honouring `Retry-After`; requests are
//! paced to `max_operations_per_minute`. Besides bulk create this module sends only GETs of
//! individual enrollments — never a per-board PUT, never a delete.
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use rand::Rng as _;
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::dps::{DpsClient, DpsError, IndividualEnrollment, OperationMode};
use crate::station::pipeline::PipelineHandle;
use crate::station::store::{BoardRow, OpenBatch, StoreError, Transition};

/// DPS errorCode for "enrollment already exists" (reference/dps-api.md §4, §7.3).
const ERR_EXISTS: i32 = 409201;

/// Tuning of the batcher (from `[batch]` and `[dps]`).
#[derive(Debug, Clone)]
pub struct BatcherOptions {
    /// Rows per bulk create (1..=10).
    pub max_size: usize,
    /// Linger: send a partial batch once its oldest row is this old.
    pub max_delay: Duration,
    /// Requests (bulk or GET) per minute; 0 = unpaced.
    pub max_operations_per_minute: u32,
    /// Bulk requests outstanding at once (each with its own batch).
    pub max_in_flight: usize,
    /// After shutdown is requested, how long an in-flight request may still take.
    pub shutdown_grace: Duration,
    /// Backoff base and cap (full jitter between 0 and min(cap, base·2ⁿ)).
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
}

impl Default for BatcherOptions {
    fn default() -> Self {
        BatcherOptions {
            max_size: 10,
            max_delay: Duration::from_secs(2),
            max_operations_per_minute: 1000,
            max_in_flight: 4,
            shutdown_grace: Duration::from_secs(10),
            backoff_base: Duration::from_millis(250),
            backoff_cap: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BatcherError {
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Spacing factor over the exact quota interval.
const PACE_MARGIN: f64 = 1.01;

/// Request pacing: one request every 60/N seconds, no bursts (the service's quota is per
/// minute; spacing evenly keeps us under it without provoking 429s).
struct Pacer {
    interval: Option<Duration>,
    next: Instant,
}

impl Pacer {
    fn new(per_minute: u32) -> Pacer {
        Pacer {
            // 1 % under the quota: timer jitter must never push a sliding minute over it.
            interval: (per_minute > 0)
                .then(|| Duration::from_secs_f64(60.0 * PACE_MARGIN / f64::from(per_minute))),
            next: Instant::now(),
        }
    }

    /// When the next request may go (and reserve that slot).
    fn reserve(&mut self) -> Instant {
        let now = Instant::now();
        let Some(iv) = self.interval else {
            return now;
        };
        let at = self.next.max(now);
        self.next = at + iv;
        at
    }
}

struct Backoff {
    failures: u32,
    until: Option<Instant>,
}

/// The batcher task. Construct with [`Batcher::new`] and drive with [`Batcher::run`].
pub struct Batcher {
    core: Arc<Core>,
}

/// What the main loop and the in-flight batch tasks share.
struct Core {
    client: Arc<DpsClient>,
    pipeline: PipelineHandle,
    opts: BatcherOptions,
    pacer: Mutex<Pacer>,
    backoff: Mutex<Backoff>,
    /// Rows with ids up to this one are sent one per request (after a refused batch).
    single_until: AtomicI64,
}

enum SendOutcome {
    Done,
    /// Shutdown arrived while the request was out; the batch stays open for reconcile.
    Abandoned,
}

fn attestation_matches(row: &BoardRow, found: &IndividualEnrollment) -> bool {
    let ours: serde_json::Value = match serde_json::from_str(&row.enrollment_json) {
        Ok(v) => v,
        Err(_) => return false,
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    if row.attestation == "tpm" {
        let our_ek = ours
            .pointer("/attestation/tpm/endorsementKey")
            .and_then(|v| v.as_str())
            .and_then(|s| b64.decode(s).ok());
        let their_ek = found
            .attestation
            .tpm
            .as_ref()
            .and_then(|t| b64.decode(&t.endorsement_key).ok());
        return our_ek.is_some() && our_ek == their_ek;
    }
    // X.509: compare the SHA-256 of the device certificate (the GET answers with the
    // certificate's `info`, or echoes the certificate).
    let our_sha = row.cert_sha256.clone().or_else(|| {
        ours.pointer("/attestation/x509/clientCertificates/primary/certificate")
            .and_then(|v| v.as_str())
            .and_then(|s| b64.decode(s).ok())
            .map(|der| hex::encode(Sha256::digest(der)))
    });
    let primary = found
        .attestation
        .x509
        .as_ref()
        .and_then(|x| x.client_certificates.as_ref())
        .and_then(|c| c.primary.as_ref());
    let their_sha = primary.and_then(|p| {
        p.info
            .as_ref()
            .map(|i| i.sha256_thumbprint.clone())
            .or_else(|| {
                p.certificate.as_ref().and_then(|c| {
                    let der = b64
                        .decode(c.trim())
                        .ok()
                        .or_else(|| pem::parse(c).ok().map(|p| p.into_contents()))?;
                    Some(hex::encode(Sha256::digest(der)))
                })
            })
    });
    match (our_sha, their_sha) {
        (Some(a), Some(b)) => a.eq_ignore_ascii_case(b.trim()),
        _ => false,
    }
}

/// True when DPS refused the request because of its body (400, and 409/412/413 which a
/// bulk create should never get): an answer about the items in it. Everything else
/// (429, 5xx, 401/403, 404 on the bulk path, transport failures, an undecodable answer)
/// says nothing about the boards, so their rows must stay queued, never be rejected.
fn refused_for_its_body(e: &DpsError) -> bool {
    match e.innermost() {
        DpsError::BadRequest(_)
        | DpsError::Conflict(_)
        | DpsError::PreconditionFailed(_)
        | DpsError::InvalidInput(_) => true,
        DpsError::Service(se) => se.status == 413,
        _ => false,
    }
}

fn parse_time(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339).ok()
}

async fn wait_shutdown(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Batcher {
    pub fn new(client: Arc<DpsClient>, pipeline: PipelineHandle, opts: BatcherOptions) -> Batcher {
        let pacer = Pacer::new(opts.max_operations_per_minute);
        if let Ok(mut d) = pipeline.inner.dps.lock() {
            d.endpoint = client.base_url().to_string();
        }
        Batcher {
            core: Arc::new(Core {
                client,
                pipeline,
                opts,
                pacer: Mutex::new(pacer),
                backoff: Mutex::new(Backoff {
                    failures: 0,
                    until: None,
                }),
                single_until: AtomicI64::new(0),
            }),
        }
    }

    /// Reconcile unfinished batches, then send queued rows until `shutdown` turns true.
    /// Up to `max_in_flight` batches are outstanding at once; on shutdown the loop stops
    /// claiming rows and waits for the outstanding ones (each bounded by `shutdown_grace`).
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<(), BatcherError> {
        let core = self.core;
        core.reconcile(&mut shutdown).await?;
        let permits = Arc::new(Semaphore::new(core.opts.max_in_flight.max(1)));
        let mut inflight: JoinSet<Result<SendOutcome, BatcherError>> = JoinSet::new();
        let result = core.main_loop(&permits, &mut inflight, &mut shutdown).await;
        while let Some(done) = inflight.join_next().await {
            match done {
                Ok(Err(e)) => tracing::error!(error = %e, "batch failed"),
                Err(e) => tracing::error!(error = %e, "batch task failed"),
                Ok(Ok(_)) => {}
            }
        }
        result
    }
}

impl Core {
    async fn main_loop(
        self: &Arc<Self>,
        permits: &Arc<Semaphore>,
        inflight: &mut JoinSet<Result<SendOutcome, BatcherError>>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), BatcherError> {
        let store_failures = |r: Option<
            Result<Result<SendOutcome, BatcherError>, tokio::task::JoinError>,
        >| {
            match r {
                Some(Ok(Err(e))) => Err(e),
                Some(Err(e)) => {
                    tracing::error!(error = %e, "batch task failed");
                    Ok(())
                }
                _ => Ok(()),
            }
        };
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            // Reap finished batch tasks; a store failure stops the batcher.
            while let Some(r) = inflight.try_join_next() {
                store_failures(Some(r))?;
            }
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return Ok(()),
                },
                _ = wait_shutdown(shutdown) => return Ok(()),
            };
            let max = self.opts.max_size.clamp(1, crate::dps::MAX_BULK_ITEMS);
            let mut rows = self.pipeline.store().call(move |s| s.unsent(max)).await?;
            let single_until = self.single_until.load(Ordering::SeqCst);
            let single = rows.first().is_some_and(|r| r.id <= single_until);
            if single {
                rows.truncate(1);
            }
            if rows.is_empty() {
                drop(permit);
                tokio::select! {
                    _ = self.pipeline.inner.wake.notified() => {}
                    r = inflight.join_next(), if !inflight.is_empty() => store_failures(r)?,
                    _ = wait_shutdown(shutdown) => return Ok(()),
                }
                continue;
            }
            if rows.len() < max && !single && !self.pipeline.is_draining() {
                let oldest = parse_time(&rows[0].scanned_at);
                let age = oldest
                    .map(|t| OffsetDateTime::now_utc() - t)
                    .and_then(|d| Duration::try_from(d).ok())
                    .unwrap_or(self.opts.max_delay);
                if age < self.opts.max_delay {
                    drop(permit);
                    let wait = self.opts.max_delay - age;
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.pipeline.inner.wake.notified() => {}
                        _ = wait_shutdown(shutdown) => return Ok(()),
                    }
                    continue;
                }
            }
            if !self.wait_turn(shutdown).await {
                return Ok(());
            }
            // Claim the rows (committed) before anything is sent.
            let Some((batch, rows, items)) = self.claim(rows).await? else {
                continue;
            };
            let core = self.clone();
            let mut sd = shutdown.clone();
            inflight.spawn(async move {
                let r = core.send_batch(batch, rows, items, &mut sd).await;
                drop(permit);
                // Rows may have gone back to the queue: look again.
                core.pipeline.inner.wake.notify_one();
                r
            });
        }
    }

    /// Wait for backoff and pacing; false when shutdown came first.
    async fn wait_turn(&self, shutdown: &mut watch::Receiver<bool>) -> bool {
        let until = self.backoff.lock().ok().and_then(|b| b.until);
        if let Some(until) = until {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => {}
                _ = wait_shutdown(shutdown) => return false,
            }
        }
        let at = self
            .pacer
            .lock()
            .map(|mut p| p.reserve())
            .unwrap_or_else(|_| Instant::now());
        tokio::select! {
            _ = tokio::time::sleep_until(at) => true,
            _ = wait_shutdown(shutdown) => false,
        }
    }

    fn note_ok(&self) {
        if let Ok(mut b) = self.backoff.lock() {
            b.failures = 0;
            b.until = None;
        }
        if let Ok(mut d) = self.pipeline.inner.dps.lock() {
            d.last_ok_at = Some(crate::station::store::now_rfc3339());
            d.consecutive_failures = 0;
            d.backoff_until = None;
        }
    }

    /// Record a whole-request failure and schedule the next attempt (full jitter, and no
    /// earlier than the service's Retry-After).
    fn note_failure(&self, e: &DpsError) {
        let Ok(mut b) = self.backoff.lock() else {
            return;
        };
        b.failures = b.failures.saturating_add(1);
        let failures = b.failures;
        let exp = self
            .opts
            .backoff_base
            .saturating_mul(1u32 << failures.min(16))
            .min(self.opts.backoff_cap);
        let jitter = Duration::from_secs_f64(rand::thread_rng().gen_range(0.0..=exp.as_secs_f64()));
        let delay = match e.retry_after() {
            Some(ra) => jitter.max(ra),
            None => jitter,
        };
        // Concurrent batches may fail together: keep the latest deadline.
        let until = Instant::now() + delay;
        b.until = Some(b.until.map_or(until, |u| u.max(until)));
        drop(b);
        let throttled = matches!(e.innermost(), DpsError::Throttled(_));
        if throttled {
            self.pipeline.metrics().inc_throttled();
        }
        let msg = e.to_string();
        tracing::warn!(error = %msg, retry_in = ?delay, "DPS request failed; rows stay queued");
        if let Ok(mut d) = self.pipeline.inner.dps.lock() {
            d.last_error = Some(msg.clone());
            d.consecutive_failures = failures;
            if throttled {
                d.throttled_total += 1;
            }
            d.backoff_until = OffsetDateTime::now_utc()
                .checked_add(time::Duration::try_from(delay).unwrap_or(time::Duration::ZERO))
                .and_then(|t| t.format(&Rfc3339).ok());
        }
        if !throttled {
            self.pipeline.push_error(format!("dps: {msg}"));
        }
    }

    /// GET one enrollment, retrying transient failures until it answers. `Ok(None)` =
    /// the enrollment does not exist. `Err(None)` = shutdown.
    async fn get_settled(
        &self,
        id: &str,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Option<IndividualEnrollment>, Option<DpsError>> {
        loop {
            if !self.wait_turn(shutdown).await {
                return Err(None);
            }
            let res = tokio::select! {
                r = self.client.get_enrollment(id) => r,
                _ = wait_shutdown(shutdown) => return Err(None),
            };
            match res {
                Ok(e) => {
                    self.note_ok();
                    return Ok(Some(e));
                }
                Err(e) if e.is_not_found() => {
                    self.note_ok();
                    return Ok(None);
                }
                // DPS refused the GET of this id itself: that is the row's answer.
                Err(e) if refused_for_its_body(&e) => return Err(Some(e)),
                // Anything else (throttled, down, credentials, an unreadable answer) says
                // nothing about the board: ask again after a backoff, never guess.
                Err(e) => self.note_failure(&e),
            }
        }
    }

    /// Settle batches left open by a crash: GET each row; found with our attestation →
    /// enrolled, found with another → conflict, absent → back to the queue.
    async fn reconcile(&self, shutdown: &mut watch::Receiver<bool>) -> Result<(), BatcherError> {
        let open: Vec<OpenBatch> = self.pipeline.store().call(|s| s.open_batches()).await?;
        for batch in open {
            tracing::info!(
                batch = batch.id,
                rows = batch.rows.len(),
                "reconciling a batch that was in flight"
            );
            let mut outcomes = Vec::new();
            for row in &batch.rows {
                match self.get_settled(&row.registration_id, shutdown).await {
                    Ok(Some(found)) => outcomes.push((row.id, self.resolve_existing(row, &found))),
                    Ok(None) => {}
                    Err(None) => return Ok(()),
                    Err(Some(e)) => {
                        let code = i64::from(e.error_code().unwrap_or(0));
                        outcomes.push((
                            row.id,
                            Transition::Rejected {
                                code,
                                detail: format!("reconcile GET failed: {e}"),
                            },
                        ));
                    }
                }
            }
            let id = batch.id;
            let changed = self
                .pipeline
                .store()
                .call(move |s| s.finish_batch(id, &outcomes, "reconciled"))
                .await?;
            for row in &changed {
                self.pipeline.publish(row);
            }
        }
        Ok(())
    }

    fn resolve_existing(&self, row: &BoardRow, found: &IndividualEnrollment) -> Transition {
        if attestation_matches(row, found) {
            Transition::Enrolled {
                detail: Some("already in DPS with the same attestation".into()),
            }
        } else {
            tracing::error!(
                serial = %row.serial,
                registration_id = %row.registration_id,
                "ALARM: DPS holds this registration id with a different attestation"
            );
            Transition::Conflict {
                detail: format!(
                    "attestation-mismatch: DPS holds {} with a different {}",
                    row.registration_id,
                    if row.attestation == "tpm" {
                        "EK"
                    } else {
                        "certificate"
                    }
                ),
            }
        }
    }

    /// Parse the rows' stored bodies and record the batch (committed). Rows whose body no
    /// longer parses can never be sent: they are rejected alone.
    async fn claim(
        &self,
        rows: Vec<BoardRow>,
    ) -> Result<Option<(i64, Vec<BoardRow>, Vec<IndividualEnrollment>)>, BatcherError> {
        let mut bad = Vec::new();
        let mut items = Vec::new();
        let mut ids = Vec::new();
        for r in &rows {
            match serde_json::from_str::<IndividualEnrollment>(&r.enrollment_json) {
                Ok(e) => {
                    items.push(e);
                    ids.push(r.id);
                }
                Err(e) => bad.push((
                    r.id,
                    Transition::Rejected {
                        code: 0,
                        detail: format!("stored enrollment does not parse: {e}"),
                    },
                )),
            }
        }
        for (id, t) in bad {
            let row = self
                .pipeline
                .store()
                .call(move |s| s.transition(id, &t))
                .await?;
            self.pipeline.publish(&row);
        }
        if ids.is_empty() {
            return Ok(None);
        }
        let (batch, claimed) = self
            .pipeline
            .store()
            .call(move |s| s.begin_batch(&ids))
            .await?;
        let claimed_ids: std::collections::HashSet<i64> = claimed.iter().map(|r| r.id).collect();
        items.retain(|e| {
            claimed
                .iter()
                .any(|r| r.registration_id.eq_ignore_ascii_case(&e.registration_id))
        });
        let rows: Vec<BoardRow> = rows
            .into_iter()
            .filter(|r| claimed_ids.contains(&r.id))
            .collect();
        if rows.is_empty() {
            let _ = self
                .pipeline
                .store()
                .call(move |s| s.finish_batch(batch, &[], "empty"))
                .await?;
            return Ok(None);
        }
        Ok(Some((batch, rows, items)))
    }

    async fn send_batch(
        &self,
        batch: i64,
        rows: Vec<BoardRow>,
        items: Vec<IndividualEnrollment>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<SendOutcome, BatcherError> {
        self.pipeline
            .inner
            .in_flight
            .fetch_add(rows.len() as u64, Ordering::SeqCst);
        let started = std::time::Instant::now();
        let grace = self.opts.shutdown_grace;
        let mut sd = shutdown.clone();
        let res = tokio::select! {
            r = self.client.bulk_enrollments(OperationMode::Create, &items) => Some(r),
            _ = async { wait_shutdown(&mut sd).await; tokio::time::sleep(grace).await } => None,
        };
        self.pipeline
            .metrics()
            .observe_bulk_latency(started.elapsed().as_secs_f64());
        self.pipeline
            .inner
            .in_flight
            .fetch_sub(rows.len() as u64, Ordering::SeqCst);
        let Some(res) = res else {
            tracing::warn!(
                batch,
                "shutdown: abandoning the in-flight batch; it is reconciled at next start"
            );
            return Ok(SendOutcome::Abandoned);
        };
        let result = match res {
            Ok(r) => r,
            Err(e) if !refused_for_its_body(&e) => {
                // Not an answer about these boards (throttled, down, unreachable, bad
                // credentials or endpoint, an unreadable answer): they stay queued, and
                // the operator sees the error in `status`. A re-send after an answer we
                // could not read is safe: the items then come back 409201, resolved by GET.
                self.note_failure(&e);
                let why = format!("retry: {e}");
                self.pipeline
                    .store()
                    .call(move |s| s.finish_batch(batch, &[], &why))
                    .await?;
                return Ok(SendOutcome::Done);
            }
            Err(e) if rows.len() > 1 => {
                // DPS answers bulk items one by one (HTTP 200 + errors[]), but a body it
                // cannot take as a whole (e.g. one item failing request validation) may
                // be refused with one 400 for the whole request. Which item is at fault
                // is unknown: send these rows one by one, so only that one is rejected.
                let last = rows.iter().map(|r| r.id).max().unwrap_or(0);
                self.single_until.fetch_max(last, Ordering::SeqCst);
                tracing::warn!(batch, error = %e, "bulk create refused; re-sending its rows one by one");
                let why = format!("split: {e}");
                self.pipeline
                    .store()
                    .call(move |s| s.finish_batch(batch, &[], &why))
                    .await?;
                return Ok(SendOutcome::Done);
            }
            Err(e) => {
                // The request of this one row was refused: that is its answer.
                let code = i64::from(e.error_code().unwrap_or(0));
                let detail = e.to_string();
                tracing::error!(batch, error = %detail, "bulk create refused");
                self.pipeline.push_error(format!("dps: {detail}"));
                let outcomes: Vec<(i64, Transition)> = rows
                    .iter()
                    .map(|r| {
                        (
                            r.id,
                            Transition::Rejected {
                                code,
                                detail: detail.clone(),
                            },
                        )
                    })
                    .collect();
                let changed = self
                    .pipeline
                    .store()
                    .call(move |s| s.finish_batch(batch, &outcomes, "refused"))
                    .await?;
                for row in &changed {
                    self.pipeline.publish(row);
                }
                return Ok(SendOutcome::Done);
            }
        };
        self.note_ok();
        let errors: HashMap<String, (i32, String)> = result
            .errors
            .iter()
            .map(|e| {
                (
                    e.registration_id.to_ascii_lowercase(),
                    (e.error_code, e.error_status.clone()),
                )
            })
            .collect();
        let mut outcomes = Vec::with_capacity(rows.len());
        for row in &rows {
            match errors.get(&row.registration_id.to_ascii_lowercase()) {
                None => outcomes.push((row.id, Transition::Enrolled { detail: None })),
                Some((code, _)) if *code == ERR_EXISTS => {
                    match self.get_settled(&row.registration_id, shutdown).await {
                        Ok(Some(found)) => {
                            outcomes.push((row.id, self.resolve_existing(row, &found)))
                        }
                        // Deleted between the create and the GET: send it again later.
                        Ok(None) => {}
                        // Shutdown: the row goes back to the queue (re-sent, 409, GET).
                        Err(None) => {}
                        Err(Some(e)) => outcomes.push((
                            row.id,
                            Transition::Rejected {
                                code: i64::from(*code),
                                detail: format!("exists; GET failed: {e}"),
                            },
                        )),
                    }
                }
                Some((code, status)) => outcomes.push((
                    row.id,
                    Transition::Rejected {
                        code: i64::from(*code),
                        detail: status.clone(),
                    },
                )),
            }
        }
        let enrolled = outcomes
            .iter()
            .filter(|(_, t)| matches!(t, Transition::Enrolled { .. }))
            .count();
        let changed = self
            .pipeline
            .store()
            .call(move |s| s.finish_batch(batch, &outcomes, "sent"))
            .await?;
        self.pipeline.metrics().inc_enrolled(enrolled as u64);
        for row in &changed {
            self.pipeline.publish(row);
        }
        Ok(SendOutcome::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_refusal_of_the_body_is_an_answer_about_the_boards() {
        use crate::dps::error::{ServiceError, TransportKind};
        let status = |status: u16| {
            DpsError::from_status(ServiceError {
                operation: "IndividualEnrollment_RunBulkOperation",
                status,
                error_code: Some(u32::from(status) * 1000 + 1),
                tracking_id: None,
                message: String::from("x"),
                retry_after: None,
            })
        };
        for s in [400, 409, 412, 413] {
            assert!(refused_for_its_body(&status(s)), "{s}");
        }
        for s in [401, 403, 404, 405, 429, 500, 503] {
            assert!(!refused_for_its_body(&status(s)), "{s}");
        }
        let decode = DpsError::Decode {
            operation: "IndividualEnrollment_RunBulkOperation",
            message: String::from("not JSON"),
        };
        assert!(!refused_for_its_body(&decode));
        let tls = DpsError::Transport {
            operation: "IndividualEnrollment_RunBulkOperation",
            kind: TransportKind::Tls,
            url: String::from("https://x"),
            message: String::from("bad certificate"),
        };
        assert!(!refused_for_its_body(&tls));
        let wrapped = DpsError::RetryBudgetExhausted {
            attempts: 2,
            elapsed: Duration::from_secs(1),
            last: Box::new(status(400)),
        };
        assert!(refused_for_its_body(&wrapped));
    }

    #[test]
    fn pacer_spaces_requests_evenly() {
        let mut p = Pacer::new(600); // one per 100 ms
        let t0 = Instant::now();
        let slots: Vec<Instant> = (0..4).map(|_| p.reserve()).collect();
        assert!(slots[0] <= t0 + Duration::from_millis(5));
        for w in slots.windows(2) {
            assert_eq!(w[1] - w[0], Duration::from_millis(101));
        }
        let mut unpaced = Pacer::new(0);
        assert!(unpaced.reserve() <= Instant::now());
    }
}
