//! The daemon's status snapshot: one plain, serialisable value that `run` fills in and
//! that `status`, `/status.json`, the operator page and the control socket hand out.
//!
//! It is data only. It must never hold secrets (no connection string, key or SAS token)
//! and never reach into the pipeline itself: the daemon builds it, everyone else reads it.
use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// A point-in-time view of a running station.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusSnapshot {
    /// Crate version of the running daemon.
    pub version: String,
    /// RFC 3339 UTC time the daemon started.
    pub started_at: String,
    /// Intake paused by an operator (`dps-station control pause`).
    pub paused: bool,
    /// A drain was requested (`dps-station control drain`): no new scans are accepted until
    /// restart and the queue is sent without lingering.
    pub draining: bool,
    /// The drain is complete: nothing queued, in flight or half-way through the pipeline.
    #[serde(default)]
    pub drained: bool,
    /// Board rows in state `queued` not yet sent to DPS.
    pub queue_depth: u64,
    /// Board rows in a bulk request that has not been answered yet.
    pub in_flight: u64,
    /// Board rows by state name (`queued`, `enrolled`, `conflict`, `rejected`).
    pub counts: BTreeMap<String, u64>,
    /// Health of the DPS connection.
    pub dps: DpsHealth,
    /// One entry per configured `[[slot]]`.
    pub slots: Vec<SlotStatus>,
    /// The serial trigger's port status (as the trigger reports it), if a port is configured.
    pub trigger: Option<serde_json::Value>,
    /// Bound address of the HTTP server (`/healthz`, `/metrics`, `/`), if enabled.
    pub http_addr: Option<String>,
    /// Path of the control socket.
    pub control_socket: String,
    /// The most recent errors, newest last, already free of secrets.
    pub last_errors: Vec<String>,
}

/// How the DPS service has been answering.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DpsHealth {
    /// Base URL requests go to.
    pub endpoint: String,
    /// RFC 3339 UTC time of the last successful DPS answer.
    pub last_ok_at: Option<String>,
    /// The last DPS/network error (no secrets).
    pub last_error: Option<String>,
    /// 429 answers seen since start.
    pub throttled_total: u64,
    /// Failed attempts in a row (0 when healthy).
    pub consecutive_failures: u32,
    /// RFC 3339 UTC time before which no request is sent (backoff), if any.
    pub backoff_until: Option<String>,
}

/// One fixture slot.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SlotStatus {
    pub name: String,
    /// `tpm` or `dice`.
    pub attestation: String,
    pub last_error: Option<String>,
    pub boards_attested: u64,
    pub errors: u64,
}

impl StatusSnapshot {
    /// Count of rows in `state` (0 when absent).
    pub fn count(&self, state: &str) -> u64 {
        self.counts.get(state).copied().unwrap_or(0)
    }

    /// `running`, `paused`, `draining` (drain requested, queue not empty yet) or `drained`.
    pub fn mode(&self) -> &'static str {
        if self.drained {
            "drained"
        } else if self.draining {
            "draining"
        } else if self.paused {
            "paused"
        } else {
            "running"
        }
    }

    /// The human summary `dps-station status` prints.
    pub fn render_text(&self) -> String {
        let mut s = String::new();
        let mode = self.mode();
        let _ = writeln!(
            s,
            "dps-station {} — {} since {}",
            self.version, mode, self.started_at
        );
        let _ = writeln!(
            s,
            "queue: {} queued, {} in flight",
            self.queue_depth, self.in_flight
        );
        let counts = ["queued", "enrolled", "conflict", "rejected"]
            .iter()
            .map(|k| format!("{k}={}", self.count(k)))
            .collect::<Vec<_>>()
            .join(" ");
        let _ = writeln!(s, "boards: {counts}");
        let d = &self.dps;
        let _ = writeln!(
            s,
            "dps: {} last ok {} · {} throttled · {} consecutive failures{}",
            d.endpoint,
            d.last_ok_at.as_deref().unwrap_or("never"),
            d.throttled_total,
            d.consecutive_failures,
            d.backoff_until
                .as_deref()
                .map(|t| format!(" · backing off until {t}"))
                .unwrap_or_default()
        );
        if let Some(e) = &d.last_error {
            let _ = writeln!(s, "dps last error: {e}");
        }
        for slot in &self.slots {
            let _ = writeln!(
                s,
                "slot {} ({}): {} attested, {} errors{}",
                slot.name,
                slot.attestation,
                slot.boards_attested,
                slot.errors,
                slot.last_error
                    .as_deref()
                    .map(|e| format!(" · last: {e}"))
                    .unwrap_or_default()
            );
        }
        match &self.trigger {
            Some(t) => {
                let _ = writeln!(s, "scanner: {}", compact_json(t));
            }
            None => {
                let _ = writeln!(s, "scanner: none configured (control socket only)");
            }
        }
        let _ = writeln!(s, "control socket: {}", self.control_socket);
        if let Some(h) = &self.http_addr {
            let _ = writeln!(s, "http: http://{h}/");
        }
        if self.last_errors.is_empty() {
            let _ = writeln!(s, "last errors: none");
        } else {
            let _ = writeln!(s, "last errors:");
            for e in &self.last_errors {
                let _ = writeln!(s, "  {e}");
            }
        }
        s
    }
}

fn compact_json(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Object(m) => m
            .iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => format!("{k}={s}"),
                other => format!("{k}={other}"),
            })
            .collect::<Vec<_>>()
            .join(" "),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_round_trips_through_json_and_renders_counts() {
        let mut snap = StatusSnapshot {
            version: "0.1.0".into(),
            queue_depth: 3,
            ..Default::default()
        };
        snap.counts.insert("enrolled".into(), 7);
        snap.slots.push(SlotStatus {
            name: "fixture-1".into(),
            attestation: "tpm".into(),
            ..Default::default()
        });
        let json = serde_json::to_string(&snap).unwrap_or_default();
        let back: StatusSnapshot = serde_json::from_str(&json).unwrap_or_default();
        assert_eq!(back, snap);
        let text = snap.render_text();
        assert!(text.contains("enrolled=7"), "{text}");
        assert!(text.contains("3 queued"), "{text}");
        assert!(text.contains("slot fixture-1 (tpm)"), "{text}");
    }
}
