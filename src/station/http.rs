//! The station's small HTTP server on `[control] http`: `/healthz` (liveness),
//! `/metrics` (Prometheus/OpenMetrics text), `/status.json` (the status snapshot) and `/`
//! (an operator page that refreshes itself every 2 s).
//!
//! It is read-only: nothing here changes the pipeline. It must never expose secrets and
//! must escape every string it puts into HTML (serials and errors come from the field).
use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::station::metrics::Metrics;
use crate::station::pipeline::PipelineHandle;
use crate::station::status::StatusSnapshot;

/// Errors of the HTTP server.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("http server on {addr}: {source}")]
    Serve {
        addr: String,
        source: std::io::Error,
    },
}

#[derive(Clone)]
struct AppState {
    pipeline: PipelineHandle,
    metrics: Arc<Metrics>,
}

/// The router (exposed so the daemon can mount it elsewhere if it wants).
pub fn router(pipeline: PipelineHandle, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .route("/status.json", get(status_json))
        .route("/", get(page))
        .with_state(AppState { pipeline, metrics })
}

/// Serve on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    pipeline: PipelineHandle,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), HttpError> {
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    let app = router(pipeline, metrics);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            loop {
                if *shutdown.borrow_and_update() {
                    return;
                }
                if shutdown.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        })
        .await
        .map_err(|source| HttpError::Serve { addr, source })
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn metrics_text(State(st): State<AppState>) -> Response {
    // Refresh the gauges that mirror the database from the snapshot, so they are right
    // even if the daemon only updates them on state changes.
    let snap = st.pipeline.status().await;
    for state in ["queued", "enrolled", "conflict", "rejected"] {
        st.metrics.set_boards(state, clamp(snap.count(state)));
    }
    st.metrics.set_queue_depth(clamp(snap.queue_depth));
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.metrics.encode(),
    )
        .into_response()
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

async fn status_json(State(st): State<AppState>) -> Json<StatusSnapshot> {
    Json(st.pipeline.status().await)
}

async fn page(State(st): State<AppState>) -> Html<String> {
    Html(render_page(&st.pipeline.status().await))
}

/// Escape text for HTML element content and attribute values.
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The operator page for one snapshot (server-rendered; a meta refresh reloads it).
pub fn render_page(s: &StatusSnapshot) -> String {
    let e = html_escape;
    let mut h = String::new();
    let mode = s.mode();
    let _ = write!(
        h,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta http-equiv=\"refresh\" content=\"2\">\
<title>dps-station — {mode}</title>\
<style>body{{font-family:system-ui,sans-serif;margin:1.5em;color:#222}}\
table{{border-collapse:collapse;margin:.5em 0 1.2em}}td,th{{border:1px solid #ccc;padding:.25em .7em;text-align:left}}\
.n{{text-align:right;font-variant-numeric:tabular-nums}}.bad{{color:#a00}}.ok{{color:#070}}</style>\
</head><body>\n<h1>dps-station {} <small>({mode})</small></h1>\n<p>started {}</p>\n",
        e(&s.version),
        e(&s.started_at)
    );
    let _ = write!(
        h,
        "<h2>Boards</h2>\n<table id=\"counts\"><tr><th>state</th><th>boards</th></tr>\n"
    );
    let mut states: Vec<&str> = vec!["queued", "enrolled", "conflict", "rejected"];
    for k in s.counts.keys() {
        if !states.contains(&k.as_str()) {
            states.push(k);
        }
    }
    for k in states {
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td class=\"n\" id=\"count-{}\">{}</td></tr>",
            e(k),
            e(k),
            s.count(k)
        );
    }
    let _ = writeln!(
        h,
        "</table>\n<p>queue depth <b id=\"queue-depth\">{}</b>, in flight <b>{}</b></p>",
        s.queue_depth, s.in_flight
    );
    let d = &s.dps;
    let health = if d.consecutive_failures == 0 {
        "<span class=\"ok\">ok</span>".to_string()
    } else {
        format!(
            "<span class=\"bad\">{} consecutive failures</span>",
            d.consecutive_failures
        )
    };
    let _ = writeln!(
        h,
        "<h2>DPS</h2>\n<table><tr><td>endpoint</td><td>{}</td></tr>\
<tr><td>health</td><td>{health}</td></tr>\
<tr><td>last ok</td><td>{}</td></tr>\
<tr><td>last error</td><td>{}</td></tr>\
<tr><td>throttled (429)</td><td class=\"n\">{}</td></tr>\
<tr><td>backoff until</td><td>{}</td></tr></table>",
        e(&d.endpoint),
        e(d.last_ok_at.as_deref().unwrap_or("never")),
        e(d.last_error.as_deref().unwrap_or("—")),
        d.throttled_total,
        e(d.backoff_until.as_deref().unwrap_or("—")),
    );
    let _ = writeln!(
        h,
        "<h2>Slots</h2>\n<table><tr><th>slot</th><th>attestation</th><th>attested</th><th>errors</th><th>last error</th></tr>"
    );
    for slot in &s.slots {
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td></tr>",
            e(&slot.name),
            e(&slot.attestation),
            slot.boards_attested,
            slot.errors,
            e(slot.last_error.as_deref().unwrap_or("—"))
        );
    }
    let _ = writeln!(h, "</table>\n<h2>Scanner</h2>");
    match &s.trigger {
        Some(serde_json::Value::Object(m)) => {
            let _ = writeln!(h, "<table>");
            for (k, v) in m {
                let v = match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                let _ = writeln!(h, "<tr><td>{}</td><td>{}</td></tr>", e(k), e(&v));
            }
            let _ = writeln!(h, "</table>");
        }
        Some(other) => {
            let _ = writeln!(h, "<p>{}</p>", e(&other.to_string()));
        }
        None => {
            let _ = writeln!(
                h,
                "<p>no serial scanner configured (control socket only)</p>"
            );
        }
    }
    let _ = writeln!(h, "<h2>Last errors</h2>");
    if s.last_errors.is_empty() {
        let _ = writeln!(h, "<p>none</p>");
    } else {
        let _ = writeln!(h, "<ol id=\"last-errors\">");
        for err in &s.last_errors {
            let _ = writeln!(h, "<li class=\"bad\">{}</li>", e(err));
        }
        let _ = writeln!(h, "</ol>");
    }
    let _ = writeln!(
        h,
        "<p><small>control socket {} · <a href=\"/status.json\">status.json</a> · \
<a href=\"/metrics\">metrics</a></small></p>\n</body></html>",
        e(&s.control_socket)
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_shows_counts_and_escapes_field_text() {
        let mut s = StatusSnapshot {
            version: "0.1.0".into(),
            queue_depth: 5,
            ..Default::default()
        };
        s.counts.insert("enrolled".into(), 12);
        s.last_errors.push("ERROR - bad-format <script>".into());
        let page = render_page(&s);
        assert!(page.contains("id=\"count-enrolled\">12<"), "{page}");
        assert!(page.contains("id=\"queue-depth\">5<"), "{page}");
        assert!(page.contains("&lt;script&gt;"));
        assert!(!page.contains("<script>"));
        assert!(page.contains("http-equiv=\"refresh\""));
    }
}
