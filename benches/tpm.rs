//! TPM EK benchmark (DESIGN §9: persistent-EK read ≤ 15 ms per board on swtpm; create-primary
//! reported separately).
//!
//! Per board the station opens a fresh ESAPI context, reads the manufacturer, reads the EK
//! (or creates it), reads the EK certificate from NV, flushes and closes: that whole
//! `attest::tpm::read_ek` call is what is timed, N times (default 100; `TPM_BENCH_N`), on one
//! swtpm board per path. Baselines in the same run: `tpm2_readpublic -c 0x81010001` and
//! `tpm2_createek -G rsa` (+ `tpm2_flushcontext -t`) as processes on the same swtpm.
//! Prints a markdown table. Run: `cargo bench --bench tpm`.
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use dps_station::attest::swtpm::{SwtpmBoard, SwtpmVariant};
use dps_station::attest::tpm::{self, EkPolicy, EkRequest};

const TARGET_MS: f64 = 15.0;

struct Row {
    what: &'static str,
    samples: Vec<Duration>,
    target: Option<f64>,
}

fn time_n(n: usize, mut f: impl FnMut()) -> Vec<Duration> {
    (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn tool(args: &[&str], tcti: &str) {
    let st = Command::new(args[0])
        .args(&args[1..])
        .args(["-T", tcti])
        .output()
        .expect("tpm2-tools installed");
    assert!(
        st.status.success(),
        "{}: {}",
        args.join(" "),
        String::from_utf8_lossy(&st.stderr)
    );
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

fn main() {
    tpm::quiet_tss_logging();
    let n: usize = std::env::var("TPM_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
        .max(1);
    let dir = tempfile::tempdir().expect("temp dir");
    let persisted = SwtpmBoard::start(SwtpmVariant::EkPersistedWithCert, &dir.path().join("a"))
        .expect("swtpm board with persisted EK");
    let empty = SwtpmBoard::start(SwtpmVariant::NoPersistedEk, &dir.path().join("b"))
        .expect("swtpm board without EK");
    let scratch = dir.path();

    let read_req = EkRequest::new(persisted.tcti(), EkPolicy::ReadOnly);
    let create_req = EkRequest::new(empty.tcti(), EkPolicy::ReadOrCreate);
    // Warm up both paths once (and check they work) before timing.
    let info = tpm::read_ek(&read_req).expect("read persisted EK");
    assert!(!info.created && info.ek_cert.is_some());
    assert!(tpm::read_ek(&create_req).expect("create EK").created);

    let ekpub = scratch.join("ek.pub");
    let createek_pub = scratch.join("createek.pub");
    let createek_ctx = scratch.join("createek.ctx");
    let rows = vec![
        Row {
            what: "station `read_ek`, persisted EK (context + manufacturer + EK + NV cert)",
            samples: time_n(n, || {
                tpm::read_ek(&read_req).expect("read EK");
            }),
            target: Some(TARGET_MS),
        },
        Row {
            what: "baseline: `tpm2_readpublic -c 0x81010001` process",
            samples: time_n(n, || {
                tool(
                    &[
                        "tpm2_readpublic",
                        "-Q",
                        "-c",
                        "0x81010001",
                        "-o",
                        path_str(&ekpub),
                    ],
                    &persisted.tcti(),
                )
            }),
            target: None,
        },
        Row {
            what: "station `read_ek`, create-primary (TCG EK, not persisted)",
            samples: time_n(n, || {
                tpm::read_ek(&create_req).expect("create EK");
            }),
            target: None,
        },
        Row {
            what: "baseline: `tpm2_createek -G rsa` + `tpm2_flushcontext -t` processes",
            samples: time_n(n, || {
                tool(
                    &[
                        "tpm2_createek",
                        "-G",
                        "rsa",
                        "-u",
                        path_str(&createek_pub),
                        "-c",
                        path_str(&createek_ctx),
                    ],
                    &empty.tcti(),
                );
                tool(&["tpm2_flushcontext", "-t"], &empty.tcti());
            }),
            target: None,
        },
    ];

    println!("## TPM EK per board (swtpm 0.7.1, N = {n} each)\n");
    println!("| path | median ms | p95 ms | target |");
    println!("|---|---:|---:|---|");
    let mut ok = true;
    for mut r in rows {
        r.samples.sort();
        let med = ms(quantile(&r.samples, 0.5));
        let p95 = ms(quantile(&r.samples, 0.95));
        let target = match r.target {
            Some(t) => {
                let pass = med <= t;
                ok &= pass;
                format!("≤ {t} ms: {}", if pass { "met" } else { "MISSED" })
            }
            None => "-".to_string(),
        };
        println!("| {} | {med:.2} | {p95:.2} | {target} |", r.what);
    }
    if !ok {
        println!("\nThe persistent-EK path missed its target.");
    }
}
