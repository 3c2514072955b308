//! Pipeline benchmark (DESIGN.md §9): boards/s from scan to `enrolled`, through the control
//! socket, against the in-process DPS emulator (unthrottled), with the SQLite store on disk;
//! beside a baseline of one PUT per device (what the CLI tools do). Then restart time and
//! RSS of the real `dps-station run` with 100,000 queued rows.
//!
//! Attestation path: SYNTHETIC. Each board gets a random 316-byte TPM2B_PUBLIC-shaped EK
//! (valid size prefix, so the emulator accepts it) and `{ek_hash}` as its registration id;
//! no TPM or CA is involved, so the figure measures journal + batcher + DPS round trips.
//! TPM and DICE costs are measured by `benches/tpm.rs` and `benches/dice.rs`.
//!
//! Run: `cargo bench --bench pipeline` (env BENCH_BOARDS, default 5000).
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use rand::RngCore as _;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use dps_station::dps::{
    AttestationMechanism, ClientOptions, ConnectionString, DpsClient, IndividualEnrollment,
};
use dps_station::emulator::{self, EmulatorOptions};
use dps_station::station::batcher::{Batcher, BatcherOptions};
use dps_station::station::metrics::Metrics;
use dps_station::station::pipeline::{AttestFn, Attested, PipelineHandle, Slot};
use dps_station::station::store::{NewBoard, Source, Store, StoreWriter};

fn synthetic_ek() -> Vec<u8> {
    let mut body = vec![0u8; 314];
    rand::thread_rng().fill_bytes(&mut body);
    let mut ek = vec![0x01, 0x3a];
    ek.extend_from_slice(&body);
    ek
}

fn synthetic_enrollment(serial: &str) -> (String, String, serde_json::Value) {
    use base64::Engine as _;
    let ek = synthetic_ek();
    let hash = dps_station::attest::tpm::ek_hash(&ek);
    let body = serde_json::json!({
        "registrationId": hash,
        "deviceId": serial,
        "provisioningStatus": "enabled",
        "attestation": {"type": "tpm", "tpm": {"endorsementKey":
            base64::engine::general_purpose::STANDARD.encode(&ek)}},
    });
    (hash.clone(), hash, body)
}

fn synthetic_slot() -> Slot {
    let attest: AttestFn = Arc::new(|serial: String| {
        async move {
            let (id, hash, body) = synthetic_enrollment(&serial);
            Ok(Attested {
                registration_id: id,
                enrollment: body,
                attestation: "tpm",
                ek_hash: Some(hash),
                cert_sha256: None,
                ek_cert_issuer: None,
                enrolled_without_dps: false,
            })
        }
        .boxed()
    });
    Slot {
        name: "bench".into(),
        kind: "tpm",
        reattest_known: true,
        attest,
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

async fn pipeline_run(n: usize, work: &Path, cs: &str) -> (f64, u64) {
    let store = StoreWriter::spawn(&work.join("pipeline.db")).expect("store");
    let metrics = Metrics::new();
    let p = PipelineHandle::new(store, vec![synthetic_slot()], metrics);
    let client = DpsClient::new(
        ConnectionString::parse(cs).expect("cs"),
        ClientOptions {
            retry_budget: Duration::ZERO,
            ..Default::default()
        },
    )
    .expect("client");
    let opts = BatcherOptions {
        max_size: 10,
        max_delay: Duration::from_millis(20),
        max_operations_per_minute: 0,
        ..Default::default()
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let b = Batcher::new(Arc::new(client), p.clone(), opts);
    let batcher = tokio::spawn(b.run(stop_rx.clone()));
    let sock = work.join("control.sock");
    let listener = dps_station::station::control::bind(&sock)
        .await
        .expect("bind");
    {
        let p = p.clone();
        let sock = sock.clone();
        let rx = stop_rx.clone();
        tokio::spawn(async move {
            let _ = dps_station::station::control::serve_listener(listener, &sock, p, rx).await;
        });
    }
    let conns = 16;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..conns {
        let sock = sock.clone();
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::UnixStream::connect(&sock)
                .await
                .expect("connect");
            let (r, mut w) = stream.into_split();
            let mine: Vec<usize> = (0..n).filter(|i| i % conns == c).collect();
            let writer = tokio::spawn(async move {
                let mut buf = Vec::new();
                for i in &mine {
                    buf.extend_from_slice(
                        format!(
                            "{{\"cmd\":\"scan\",\"serial\":\"BENCH-{i:06}\",\"wait\":false}}\n"
                        )
                        .as_bytes(),
                    );
                }
                w.write_all(&buf).await.expect("write");
                (mine.len(), w)
            });
            let mut lines = BufReader::new(r).lines();
            let (count, _w) = writer.await.expect("writer");
            let mut ok = 0;
            for _ in 0..count {
                match lines.next_line().await {
                    Ok(Some(l)) if l.contains("QUEUED") => ok += 1,
                    Ok(Some(l)) => eprintln!("unexpected: {l}"),
                    _ => break,
                }
            }
            ok
        }));
    }
    let mut acked = 0;
    for t in tasks {
        acked += t.await.expect("client");
    }
    let t_ack = t0.elapsed();
    loop {
        let s = p.status().await;
        if s.count("enrolled") as usize >= n {
            break;
        }
        if t0.elapsed() > Duration::from_secs(300) {
            eprintln!("timeout: {:?}", s.counts);
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    eprintln!("pipeline: {acked} acknowledged in {t_ack:?}, all enrolled in {secs:.2} s");
    let _ = stop_tx.send(true);
    let _ = batcher.await;
    (n as f64 / secs, acked as u64)
}

/// §9 quota figure: DPS at 1,000 ops/min, the station paced to the same quota, 12,000
/// boards queued up front; enrollments counted over one minute after a 5 s warm-up.
async fn quota_run(work: &Path) -> (f64, u64, u64) {
    let emu = emulator::start(EmulatorOptions {
        ops_per_minute: Some(1000),
        ..Default::default()
    })
    .await
    .expect("emulator");
    let cs = emu.connection_string();
    let store = StoreWriter::spawn(&work.join("quota.db")).expect("store");
    let p = PipelineHandle::new(store, vec![synthetic_slot()], Metrics::new());
    let client = DpsClient::new(
        ConnectionString::parse(&cs).expect("cs"),
        ClientOptions {
            retry_budget: Duration::ZERO,
            ..Default::default()
        },
    )
    .expect("client");
    let opts = BatcherOptions {
        max_operations_per_minute: 1000,
        ..Default::default()
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let batcher = tokio::spawn(Batcher::new(Arc::new(client), p.clone(), opts).run(stop_rx));
    let mut acks = Vec::new();
    for i in 0..12_000 {
        let p = p.clone();
        acks.push(tokio::spawn(async move {
            let mut rx = p
                .submit(dps_station::station::pipeline::ScanRequest {
                    slot: None,
                    serial: format!("QUOTA-{i:06}"),
                })
                .await;
            rx.recv().await
        }));
    }
    for a in acks {
        let _ = a.await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let start = p.status().await.count("enrolled");
    tokio::time::sleep(Duration::from_secs(60)).await;
    let end = p.status().await.count("enrolled");
    let stats = emu.stats();
    let _ = stop_tx.send(true);
    let _ = batcher.await;
    emu.shutdown().await;
    let per_min = (end - start) as f64;
    (per_min, stats.throttled, p.status().await.count("rejected"))
}

async fn baseline_put(m: usize, cs: &str) -> f64 {
    let client = DpsClient::new(
        ConnectionString::parse(cs).expect("cs"),
        ClientOptions {
            retry_budget: Duration::ZERO,
            ..Default::default()
        },
    )
    .expect("client");
    let t0 = Instant::now();
    for i in 0..m {
        let (id, _, body) = synthetic_enrollment(&format!("PUT-{i:06}"));
        let ek = body["attestation"]["tpm"]["endorsementKey"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let e = IndividualEnrollment::new(id, AttestationMechanism::tpm(ek));
        client
            .create_or_update_enrollment(&e, None)
            .await
            .expect("put");
    }
    m as f64 / t0.elapsed().as_secs_f64()
}

fn restart_with_queue(work: &Path, cs: &str, rows: usize) -> (Duration, Option<u64>) {
    let db = work.join("big/station.db");
    {
        let mut s = Store::open(&db).expect("store");
        let mut batch = Vec::with_capacity(1000);
        for i in 0..rows {
            let (id, hash, body) = synthetic_enrollment(&format!("Q-{i:06}"));
            batch.push(NewBoard {
                serial: format!("Q-{i:06}"),
                slot: "fixture-1".into(),
                registration_id: id,
                attestation: "tpm".into(),
                ek_hash: Some(hash),
                cert_sha256: None,
                ek_cert_issuer: None,
                enrollment_json: body.to_string(),
                source: Source::Serial,
                enrolled_without_dps: false,
            });
            if batch.len() == 1000 {
                for r in s.admit_all(&batch) {
                    r.expect("insert");
                }
                batch.clear();
            }
        }
    }
    let csf = work.join("cs");
    std::fs::write(&csf, cs).expect("cs file");
    let sock = work.join("big/control.sock");
    let cfg = work.join("big/station.toml");
    std::fs::write(
        &cfg,
        format!(
            "[dps]\nconnection_string_file = {csf:?}\nmax_operations_per_minute = 1\n\
             [state]\npath = {db:?}\n[[slot]]\nname = \"fixture-1\"\nattestation = \"tpm\"\n\
             tcti = \"swtpm:host=127.0.0.1,port=1\"\n[control]\nsocket = {sock:?}\nhttp = \"127.0.0.1:0\"\n"
        ),
    )
    .expect("config");
    let t0 = Instant::now();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dps-station"))
        .args(["-q", "run", "--config"])
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn daemon");
    let mut ready = None;
    while t0.elapsed() < Duration::from_secs(60) {
        if let Ok(mut s) = std::os::unix::net::UnixStream::connect(&sock) {
            use std::io::{BufRead, Write};
            let _ = s.write_all(b"{\"cmd\":\"status\"}\n");
            let mut line = String::new();
            let _ = std::io::BufReader::new(&s).read_line(&mut line);
            if line.contains("\"queue_depth\"") {
                ready = Some(t0.elapsed());
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(500));
    let rss = rss_kib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    (ready.unwrap_or(Duration::MAX), rss)
}

fn main() {
    let n: usize = std::env::var("BENCH_BOARDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("work dir on disk");
    rt.block_on(async {
        let emu = emulator::start(EmulatorOptions::default()).await.expect("emulator");
        let cs = emu.connection_string();
        let (rate, acked) = pipeline_run(n, work.path(), &cs).await;
        let base = baseline_put(1000.min(n), &cs).await;
        let (restart, rss) = tokio::task::block_in_place(|| restart_with_queue(work.path(), &cs, 100_000));
        println!("| measure | value | target (DESIGN §9) |");
        println!("|---|---|---|");
        println!("| pipeline scan→enrolled, {n} boards ({acked} acknowledged), synthetic EK, store on disk | {rate:.0} boards/s | ≥ 2,000 boards/s |");
        println!("| baseline: one PUT per device (sequential) | {base:.0} devices/s | — |");
        println!("| restart with 100,000 queued rows, until the control socket answers status | {:.2} s | < 2 s |", restart.as_secs_f64());
        println!("| RSS with 100,000 queued rows | {} | < 64 MiB |", rss.map(|k| format!("{:.1} MiB", k as f64 / 1024.0)).unwrap_or_else(|| "n/a".into()));
        emu.shutdown().await;
        if std::env::var_os("BENCH_QUOTA").is_some() {
            let (per_min, throttled, rejected) = quota_run(work.path()).await;
            println!(
                "| DPS at 1,000 ops/min: enrollments in one minute (429s seen, rejected) | {per_min:.0}/min = {:.1} % of 10,000 ({throttled}, {rejected}) | ≥ 95 %, zero lost |",
                per_min / 100.0
            );
        }
    });
}
