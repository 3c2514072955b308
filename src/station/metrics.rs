//! Prometheus metrics of the station (served as text on `/metrics`), built on the
//! `prometheus-client` crate.
//!
//! Handles are cheap to update from any task or thread. Labels are only slot names,
//! board states and error reasons: never a serial, registration id, key or token, so the
//! series count stays bounded and nothing secret is exported.
use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// Metric family names as exported (`# TYPE` lines), for tests and dashboards. Counter
/// samples carry the `_total` suffix, histogram samples `_bucket`/`_sum`/`_count`.
pub const METRIC_NAMES: &[&str] = &[
    "dps_station_boards",
    "dps_station_queue_depth",
    "dps_station_bulk_request_duration_seconds",
    "dps_station_dps_throttled",
    "dps_station_tpm_errors",
    "dps_station_scan_errors",
    "dps_station_enrolled",
];

/// The station's metric registry and handles.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    boards: Family<Labels, Gauge>,
    queue_depth: Gauge,
    bulk_latency: Histogram,
    throttled: Counter,
    tpm_errors: Family<Labels, Counter>,
    scan_errors: Family<Labels, Counter>,
    enrolled: Counter,
}

impl Metrics {
    /// A fresh registry with every metric registered (all at zero).
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("dps_station");
        let boards = Family::<Labels, Gauge>::default();
        registry.register(
            "boards",
            "Board rows in the station database by state",
            boards.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Board rows queued and not yet answered by DPS",
            queue_depth.clone(),
        );
        // 5 ms … ~41 s: a bulk create is normally tens of ms; retries stretch it.
        let bulk_latency = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.005, 2.0, 14),
        );
        registry.register_with_unit(
            "bulk_request_duration",
            "Duration of one bulk create request to DPS",
            prometheus_client::registry::Unit::Seconds,
            bulk_latency.clone(),
        );
        let throttled = Counter::default();
        registry.register(
            "dps_throttled",
            "HTTP 429 answers received from DPS",
            throttled.clone(),
        );
        let tpm_errors = Family::<Labels, Counter>::default();
        registry.register(
            "tpm_errors",
            "TPM errors while attesting a board, by slot",
            tpm_errors.clone(),
        );
        let scan_errors = Family::<Labels, Counter>::default();
        registry.register(
            "scan_errors",
            "Scans answered with ERROR, by reason",
            scan_errors.clone(),
        );
        let enrolled = Counter::default();
        registry.register(
            "enrolled",
            "Boards that reached state enrolled",
            enrolled.clone(),
        );
        Arc::new(Metrics {
            registry,
            boards,
            queue_depth,
            bulk_latency,
            throttled,
            tpm_errors,
            scan_errors,
            enrolled,
        })
    }

    pub fn observe_bulk_latency(&self, secs: f64) {
        self.bulk_latency.observe(secs);
    }
    pub fn inc_throttled(&self) {
        self.throttled.inc();
    }
    /// Export a TPM slot's error counter at 0 from the start (so alerts on its rate work
    /// before the first error).
    pub fn register_tpm_slot(&self, slot: &str) {
        let _ = self
            .tpm_errors
            .get_or_create(&vec![("slot".to_string(), slot.to_string())]);
    }
    pub fn inc_tpm_error(&self, slot: &str) {
        self.tpm_errors
            .get_or_create(&vec![("slot".to_string(), slot.to_string())])
            .inc();
    }
    pub fn inc_scan_error(&self, reason: &str) {
        self.scan_errors
            .get_or_create(&vec![("reason".to_string(), reason.to_string())])
            .inc();
    }
    pub fn set_queue_depth(&self, n: i64) {
        self.queue_depth.set(n);
    }
    pub fn set_boards(&self, state: &str, n: i64) {
        self.boards
            .get_or_create(&vec![("state".to_string(), state.to_string())])
            .set(n);
    }
    pub fn inc_enrolled(&self, n: u64) {
        self.enrolled.inc_by(n);
    }

    /// The OpenMetrics text exposition (served with
    /// `application/openmetrics-text; version=1.0.0; charset=utf-8`).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            // Writing into a String cannot fail; keep the endpoint answering regardless.
            out.clear();
            out.push_str("# EOF\n");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exported_with_its_labels() {
        let m = Metrics::new();
        m.set_boards("enrolled", 4);
        m.set_queue_depth(2);
        m.observe_bulk_latency(0.02);
        m.inc_throttled();
        m.inc_tpm_error("fixture-1");
        m.inc_scan_error("bad-format");
        m.inc_enrolled(4);
        let text = m.encode();
        for name in METRIC_NAMES {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
        assert!(
            text.contains("dps_station_boards{state=\"enrolled\"} 4"),
            "{text}"
        );
        assert!(
            text.contains("dps_station_tpm_errors_total{slot=\"fixture-1\"} 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
