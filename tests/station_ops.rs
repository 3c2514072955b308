//! Station operations: the control socket (bind rules, protocol), `scan`/`status` against
//! a real daemon, `export` on a real SQLite database, and the HTTP endpoints.
mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};

use dps_station::station::control::{self, ControlError};
use dps_station::station::metrics::Metrics;
use dps_station::station::pipeline::{PipelineHandle, StatusExtras};
use dps_station::station::store::StoreWriter;
use dps_station::station::store::{Admission, NewBoard, Source, Store, Transition};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::watch;

const BIN: &str = env!("CARGO_BIN_EXE_dps-station");

fn station(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("DPS_STATION_CONFIG")
        .env_remove("DPS_CONNECTION_STRING")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

// ---------------------------------------------------------------- control socket binding

#[tokio::test]
async fn control_socket_is_created_mode_0660() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run").join("control.sock");
    let _listener = control::bind(&path).await.unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
}

#[tokio::test]
async fn stale_socket_left_by_a_dead_daemon_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.sock");
    // A socket file nobody listens on any more (what kill -9 leaves behind).
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let listener = control::bind(&path).await.unwrap();
    // The new listener really serves the path.
    let client = tokio::net::UnixStream::connect(&path);
    let (accepted, connected) = tokio::join!(listener.accept(), client);
    accepted.unwrap();
    connected.unwrap();
}

#[tokio::test]
async fn live_socket_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.sock");
    let first = control::bind(&path).await.unwrap();
    match control::bind(&path).await {
        Err(ControlError::InUse { path: p }) => assert_eq!(p, path),
        other => panic!("expected InUse, got {other:?}"),
    }
    // The first daemon still owns a working socket.
    let (accepted, connected) =
        tokio::join!(first.accept(), tokio::net::UnixStream::connect(&path));
    accepted.unwrap();
    connected.unwrap();
}

#[tokio::test]
async fn a_regular_file_at_the_socket_path_is_never_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.sock");
    std::fs::write(&path, b"precious").unwrap();
    assert!(matches!(
        control::bind(&path).await,
        Err(ControlError::NotASocket { .. })
    ));
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}

// ---------------------------------------------------------------- CLI without a daemon

#[test]
fn scan_without_a_daemon_exits_2_naming_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nobody-home.sock");
    let out = station(&["scan", "SN-0001", "--socket", sock.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("nobody-home.sock"), "{err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains("hint: "), "{err}");
    assert!(out.stdout.is_empty());

    // A stale socket file (nobody accepting) is the same story.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let out = station(&["status", "--socket", sock.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let out = station(&["control", "pause", "--socket", sock.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let out = station(&["requeue", "SN-0001", "--socket", sock.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("nobody-home.sock"));
}

// ---------------------------------------------------------------- export

fn board(serial: &str, attestation: &str, n: u8) -> NewBoard {
    let (ek_hash, cert_sha256, issuer) = if attestation == "tpm" {
        (
            Some(format!("ekhash{n:02}")),
            None,
            Some("CN=Test EK CA".to_string()),
        )
    } else {
        (None, Some(format!("{n:02x}").repeat(32)), None)
    };
    NewBoard {
        serial: serial.into(),
        slot: if attestation == "tpm" {
            "fixture-1"
        } else {
            "fixture-2"
        }
        .into(),
        registration_id: format!("reg-{}", serial.to_lowercase()),
        attestation: attestation.into(),
        ek_hash,
        cert_sha256,
        ek_cert_issuer: issuer,
        enrollment_json: "{\"registrationId\":\"x\"}".into(),
        source: Source::Control,
        enrolled_without_dps: false,
    }
}

fn inserted_id(a: Admission) -> i64 {
    match a {
        Admission::Inserted(row) => row.id,
        other => panic!("expected a new row, got {other:?}"),
    }
}

/// queued SN-A, enrolled SN-B (tpm), rejected SN-C (400004), enrolled SN-D (dice).
fn populated_db(dir: &Path) -> std::path::PathBuf {
    let db = dir.join("station.db");
    let mut store = Store::open(&db).unwrap();
    store.admit(&board("SN-A", "tpm", 1)).unwrap();
    let b = inserted_id(store.admit(&board("SN-B", "tpm", 2)).unwrap());
    store
        .transition(b, &Transition::Enrolled { detail: None })
        .unwrap();
    let c = inserted_id(store.admit(&board("SN-C", "tpm", 3)).unwrap());
    store
        .transition(
            c,
            &Transition::Rejected {
                code: 400004,
                detail: "bad \"attestation\", really".into(),
            },
        )
        .unwrap();
    let d = inserted_id(store.admit(&board("SN-D", "dice", 4)).unwrap());
    store
        .transition(d, &Transition::Enrolled { detail: None })
        .unwrap();
    db
}

const HEADER: &str = "serial,slot,registration_id,attestation,ek_hash,cert_sha256,ek_cert_issuer,state,dps_error_code,scanned_at,enrolled_at";

#[test]
fn export_csv_has_the_contract_columns_and_every_board() {
    let dir = tempfile::tempdir().unwrap();
    let db = populated_db(dir.path());
    let out = station(&["export", "--db", db.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let csv_text = text(&out.stdout);
    assert_eq!(csv_text.lines().next(), Some(HEADER));

    let mut rdr = csv::Reader::from_reader(csv_text.as_bytes());
    let rows: Vec<csv::StringRecord> = rdr.records().map(|r| r.unwrap()).collect();
    let serials: Vec<&str> = rows.iter().map(|r| &r[0]).collect();
    assert_eq!(serials, ["SN-A", "SN-B", "SN-C", "SN-D"]);
    let b = &rows[1];
    assert_eq!(&b[1], "fixture-1");
    assert_eq!(&b[2], "reg-sn-b");
    assert_eq!(&b[3], "tpm");
    assert_eq!(&b[4], "ekhash02");
    assert_eq!(&b[5], "");
    assert_eq!(&b[6], "CN=Test EK CA");
    assert_eq!(&b[7], "enrolled");
    assert_eq!(&b[8], "");
    assert!(
        b[9].ends_with('Z') && b[9].contains('T'),
        "scanned_at {}",
        &b[9]
    );
    assert!(!b[10].is_empty(), "enrolled_at set for an enrolled board");
    let c = &rows[2];
    assert_eq!(&c[7], "rejected");
    assert_eq!(&c[8], "400004");
    assert_eq!(&c[10], "", "a rejected board has no enrolled_at");
    let d = &rows[3];
    assert_eq!(&d[3], "dice");
    assert_eq!(&d[4], "");
    assert_eq!(d[5].len(), 64);
    // Nothing but the contract columns: the enrollment body never leaves the database.
    assert!(!csv_text.contains("registrationId"));
}

#[test]
fn export_jsonl_filters_by_state_and_writes_the_out_file() {
    let dir = tempfile::tempdir().unwrap();
    let db = populated_db(dir.path());
    let file = dir.path().join("enrolled.jsonl");
    let out = station(&[
        "export",
        "--db",
        db.to_str().unwrap(),
        "--format",
        "jsonl",
        "--state",
        "enrolled",
        "--out",
        file.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(out.stdout.is_empty());
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o644
    );
    let body = std::fs::read_to_string(&file).unwrap();
    let recs: Vec<serde_json::Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0]["serial"], "SN-B");
    assert_eq!(recs[1]["serial"], "SN-D");
    for r in &recs {
        assert_eq!(r["state"], "enrolled");
        let keys: Vec<&String> = r.as_object().unwrap().keys().collect();
        assert_eq!(
            keys.iter()
                .map(|k| k.as_str())
                .collect::<Vec<_>>()
                .join(","),
            HEADER
        );
    }
    assert_eq!(recs[0]["dps_error_code"], serde_json::Value::Null);

    let out = station(&[
        "export",
        "--db",
        db.to_str().unwrap(),
        "--format",
        "jsonl",
        "--state",
        "rejected",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let rec: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(rec["serial"], "SN-C");
    assert_eq!(rec["dps_error_code"], 400004);

    let out = station(&[
        "export",
        "--db",
        db.to_str().unwrap(),
        "--state",
        "conflict",
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        text(&out.stdout).trim(),
        HEADER,
        "header only when nothing matches"
    );
}

#[test]
fn export_refuses_bad_state_and_missing_database_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let db = populated_db(dir.path());
    let out = station(&["export", "--db", db.to_str().unwrap(), "--state", "done"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("--state") && err.contains("done"), "{err}");

    let missing = dir.path().join("nope.db");
    let out = station(&["export", "--db", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("nope.db"));
    assert!(!missing.exists(), "export must never create a database");
}

#[tokio::test]
async fn export_reads_while_the_daemon_holds_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = populated_db(dir.path());
    // The daemon's single writer keeps the database open (WAL) and keeps writing.
    let writer = dps_station::station::store::StoreWriter::spawn(&db).unwrap();
    writer.admit(board("SN-E", "tpm", 5)).await.unwrap();
    let db2 = db.clone();
    let out = tokio::task::spawn_blocking(move || {
        station(&["export", "--db", db2.to_str().unwrap(), "--state", "queued"])
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let body = text(&out.stdout);
    assert!(body.contains("SN-A") && body.contains("SN-E"), "{body}");
    // Still writable by the daemon afterwards.
    writer.admit(board("SN-F", "tpm", 6)).await.unwrap();
}

// ---------------------------------------------------------------- a live pipeline

/// A real pipeline over a real store (with the `populated_db` boards) and no fixture slots,
/// serving its control socket and HTTP endpoints like `run` does.
struct Live {
    _dir: tempfile::TempDir,
    socket: std::path::PathBuf,
    http: std::net::SocketAddr,
    pipeline: PipelineHandle,
    stop: watch::Sender<bool>,
    control_task: tokio::task::JoinHandle<Result<(), ControlError>>,
    http_task: tokio::task::JoinHandle<Result<(), dps_station::station::http::HttpError>>,
}

async fn live() -> Live {
    let dir = tempfile::tempdir().unwrap();
    let db = populated_db(dir.path());
    let store = StoreWriter::spawn(&db).unwrap();
    let metrics = Metrics::new();
    let pipeline = PipelineHandle::new(store, Vec::new(), metrics.clone());
    let socket = dir.path().join("control.sock");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = listener.local_addr().unwrap();
    pipeline.set_status_extras(StatusExtras {
        http_addr: Some(http.to_string()),
        control_socket: socket.display().to_string(),
        trigger: None,
    });
    let (stop, rx) = watch::channel(false);
    let control_task = tokio::spawn({
        let (socket, pipeline, rx) = (socket.clone(), pipeline.clone(), rx.clone());
        async move { control::serve(&socket, pipeline, rx).await }
    });
    let http_task = tokio::spawn(dps_station::station::http::serve(
        listener,
        pipeline.clone(),
        metrics,
        rx,
    ));
    // Ready when the socket answers.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while tokio::net::UnixStream::connect(&socket).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "control socket never came up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    Live {
        _dir: dir,
        socket,
        http,
        pipeline,
        stop,
        control_task,
        http_task,
    }
}

impl Live {
    async fn shutdown(self) {
        self.stop.send(true).unwrap();
        self.control_task.await.unwrap().unwrap();
        self.http_task.await.unwrap().unwrap();
        assert!(!self.socket.exists(), "socket removed on clean shutdown");
    }
}

struct Conn {
    r: BufReader<tokio::net::unix::OwnedReadHalf>,
    w: tokio::net::unix::OwnedWriteHalf,
}

impl Conn {
    async fn open(path: &Path) -> Conn {
        let (r, w) = tokio::net::UnixStream::connect(path)
            .await
            .unwrap()
            .into_split();
        Conn {
            r: BufReader::new(r),
            w,
        }
    }
    async fn send_raw(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).await.unwrap();
    }
    async fn line(&mut self) -> serde_json::Value {
        let mut s = String::new();
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), self.r.read_line(&mut s))
            .await
            .expect("an answer within 10 s")
            .unwrap();
        assert!(n > 0, "connection closed");
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("not JSON ({e}): {s:?}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_protocol_answers_errors_and_stays_usable() {
    let live = live().await;
    let mut c = Conn::open(&live.socket).await;

    let bad: Vec<Vec<u8>> = vec![
        b"this is not json\n".to_vec(),
        b"{\"cmd\":\"reboot\"}\n".to_vec(),
        b"{\"cmd\":\"scan\"}\n".to_vec(),
        b"{\"cmd\":\"scan\",\"serial\":\"S\",\"wiat\":true}\n".to_vec(),
        b"[1,2,3]\n".to_vec(),
        b"\xff\xfe\x00\x01\n".to_vec(),
        {
            let mut v = vec![b'{'; 70 * 1024];
            v.push(b'\n');
            v
        },
    ];
    for req in &bad {
        c.send_raw(req).await;
        let v = c.line().await;
        assert!(
            v["error"].as_str().is_some_and(|e| !e.is_empty()),
            "expected an error for {:?}, got {v}",
            String::from_utf8_lossy(&req[..req.len().min(40)])
        );
    }
    // Empty lines are ignored; the same connection still answers a good request.
    c.send_raw(b"\n\r\n{\"cmd\":\"status\"}\n").await;
    let v = c.line().await;
    assert_eq!(v["counts"]["enrolled"], 2, "{v}");
    assert_eq!(v["counts"]["queued"], 1, "{v}");
    assert_eq!(v["queue_depth"], 1, "{v}");
    assert_eq!(v["paused"], false);

    // pause → scans are refused with a final ERROR line; resume; drain.
    c.send_raw(b"{\"cmd\":\"pause\"}\n").await;
    assert_eq!(c.line().await, serde_json::json!({"ok": true}));
    c.send_raw(b"{\"cmd\":\"scan\",\"serial\":\"SN-NEW\",\"wait\":true}\n")
        .await;
    let v = c.line().await;
    let reply = v["reply"].as_str().unwrap_or_default();
    assert!(reply.starts_with("ERROR SN-NEW "), "{v}");
    assert_eq!(v["final"], true);
    c.send_raw(b"{\"cmd\":\"status\"}\n").await;
    assert_eq!(c.line().await["paused"], true);
    c.send_raw(b"{\"cmd\":\"resume\"}\n").await;
    assert_eq!(c.line().await, serde_json::json!({"ok": true}));
    assert!(!live.pipeline.status().await.paused);
    c.send_raw(b"{\"cmd\":\"drain\"}\n").await;
    assert_eq!(c.line().await, serde_json::json!({"ok": true}));
    assert!(live.pipeline.status().await.draining);

    drop(c);
    live.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_control_commands_talk_to_the_daemon() {
    let live = live().await;
    let sock = live.socket.display().to_string();
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            station(&args)
        })
    };
    let out = run(vec!["status".into(), "--socket".into(), sock.clone()])
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let human = text(&out.stdout);
    assert!(
        human.contains("enrolled=2") && human.contains("rejected=1"),
        "{human}"
    );
    assert!(human.contains(&format!("http://{}/", live.http)), "{human}");

    let out = run(vec![
        "status".into(),
        "--json".into(),
        "--socket".into(),
        sock.clone(),
    ])
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let snap: dps_station::station::status::StatusSnapshot =
        serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(snap.count("enrolled"), 2);
    assert_eq!(snap.http_addr, Some(live.http.to_string()));
    assert_eq!(snap.control_socket, sock);

    let out = run(vec![
        "control".into(),
        "pause".into(),
        "--socket".into(),
        sock.clone(),
    ])
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(live.pipeline.status().await.paused);
    // A scan while paused: the daemon answers ERROR, the command exits 1.
    let out = run(vec![
        "scan".into(),
        "SN-0042".into(),
        "--wait".into(),
        "--socket".into(),
        sock.clone(),
    ])
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("ERROR SN-0042 "),
        "{}",
        text(&out.stdout)
    );
    let out = run(vec![
        "control".into(),
        "resume".into(),
        "--socket".into(),
        sock.clone(),
    ])
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(!live.pipeline.status().await.paused);

    live.shutdown().await;
}

/// `requeue`: a rejected row goes back to the queue (exit 0, `QUEUED` printed, the error
/// code cleared); a conflict only with `--force`; queued/enrolled rows and unknown serials
/// are refused with exit 1 and a message naming the serial. (The daemon here has no
/// batcher, so requeued rows stay queued; the e2e suite sends them to the emulator.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requeue_exit_codes_follow_the_row_state() {
    let live = live().await;
    let sock = live.socket.display().to_string();
    let db = live.socket.parent().unwrap().join("station.db");
    {
        // A conflict DPS answered (another attestation under the id), via a second
        // connection while the daemon holds the database.
        let mut store = Store::open(&db).unwrap();
        let e = inserted_id(store.admit(&board("SN-E", "tpm", 5)).unwrap());
        store
            .transition(
                e,
                &Transition::Conflict {
                    detail: "attestation-mismatch: DPS holds reg-sn-e with a different EK".into(),
                },
            )
            .unwrap();
    }
    let run = |args: &[&str]| {
        let mut v: Vec<String> = vec!["requeue".into()];
        v.extend(args.iter().map(|a| a.to_string()));
        v.extend(["--socket".to_string(), sock.clone()]);
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = v.iter().map(String::as_str).collect();
            station(&args)
        })
    };
    for (serial, state) in [("SN-B", "enrolled"), ("SN-A", "queued")] {
        let out = run(&[serial]).await.unwrap();
        assert_eq!(
            out.status.code(),
            Some(1),
            "{serial}: {}",
            text(&out.stderr)
        );
        let err = text(&out.stderr);
        assert!(
            err.starts_with("error: ") && err.contains(&format!("board {serial} is {state}")),
            "{err}"
        );
    }
    let out = run(&["SN-NOPE"]).await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no board with serial SN-NOPE"));
    // A conflict needs --force.
    let out = run(&["SN-E"]).await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("--force"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(live.pipeline.status().await.count("conflict"), 1);

    // The rejected row: requeued, QUEUED printed, exit 0.
    let out = run(&["SN-C"]).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "QUEUED SN-C reg-sn-c\n");
    let out = run(&["SN-E", "--force", "--json"]).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["reply"], "QUEUED SN-E reg-sn-e");
    let snap = live.pipeline.status().await;
    assert_eq!(
        (
            snap.count("queued"),
            snap.count("rejected"),
            snap.count("conflict")
        ),
        (3, 0, 0)
    );
    assert_eq!(snap.queue_depth, 3, "requeued rows are unsent again");
    let code: Option<i64> = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row(
            "SELECT dps_error_code FROM boards WHERE serial = 'SN-C'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(code, None);
    // Once queued, a second requeue is refused.
    let out = run(&["SN-C"]).await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("board SN-C is queued"));
    live.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_serves_health_metrics_status_and_the_operator_page() {
    let live = live().await;
    let base = format!("http://{}", live.http);
    let client = reqwest::Client::new();

    let r = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap().trim(), "ok");

    live.pipeline.metrics().inc_throttled();
    live.pipeline.metrics().inc_tpm_error("fixture-1");
    live.pipeline.metrics().inc_scan_error("bad-format");
    live.pipeline.metrics().observe_bulk_latency(0.05);
    let r = client.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let ctype = r.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    let body = r.text().await.unwrap();
    let samples = parse_exposition(&body);
    for name in dps_station::station::metrics::METRIC_NAMES {
        assert!(
            body.contains(&format!("# TYPE {name} ")),
            "{name} missing:\n{body}"
        );
    }
    // Gauges mirror the database at scrape time.
    assert_eq!(samples["dps_station_boards{state=\"enrolled\"}"], 2.0);
    assert_eq!(samples["dps_station_boards{state=\"rejected\"}"], 1.0);
    assert_eq!(samples["dps_station_queue_depth"], 1.0);
    assert_eq!(samples["dps_station_dps_throttled_total"], 1.0);
    assert_eq!(
        samples["dps_station_tpm_errors_total{slot=\"fixture-1\"}"],
        1.0
    );
    assert_eq!(
        samples["dps_station_scan_errors_total{reason=\"bad-format\"}"],
        1.0
    );
    assert_eq!(
        samples["dps_station_bulk_request_duration_seconds_count"],
        1.0
    );
    assert_eq!(
        samples["dps_station_bulk_request_duration_seconds_bucket{le=\"+Inf\"}"],
        1.0
    );

    let r = client
        .get(format!("{base}/status.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let snap: serde_json::Value = r.json().await.unwrap();
    assert_eq!(snap["counts"]["enrolled"], 2);

    let r = client.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let page = r.text().await.unwrap();
    assert!(page.contains("id=\"count-enrolled\">2<"), "{page}");
    assert!(page.contains("id=\"count-rejected\">1<"), "{page}");
    assert!(page.contains("id=\"queue-depth\">1<"), "{page}");
    assert!(
        page.contains("http-equiv=\"refresh\" content=\"2\""),
        "{page}"
    );

    live.shutdown().await;
}

/// Parse Prometheus/OpenMetrics text: every sample line must be `name{labels} value`,
/// every other line a `#` comment, and the exposition must end with `# EOF`.
fn parse_exposition(body: &str) -> std::collections::HashMap<String, f64> {
    assert!(body.ends_with("# EOF\n"), "no # EOF terminator");
    let mut out = std::collections::HashMap::new();
    for line in body.lines() {
        if line.starts_with('#') {
            let kw = line.split(' ').nth(1).unwrap_or("");
            assert!(
                ["TYPE", "HELP", "UNIT", "EOF"].contains(&kw),
                "bad comment {line:?}"
            );
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "unterminated labels in {line:?}");
        }
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        out.insert(series.to_owned(), v);
    }
    out
}

// ---------------------------------------------------------------- the real daemon

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_status_and_export_through_a_running_daemon_found_by_its_config() {
    use common::station::{write_station, DaemonProcess, SlotSpec, StationSpec};
    let emu = common::emulator::start().await;
    let dir = tempfile::tempdir().unwrap();
    let paths = write_station(
        dir.path(),
        &StationSpec::new(
            emu.connection_string(),
            vec![SlotSpec::Dice {
                name: "dice-1".into(),
            }],
        ),
    );
    let mut daemon = DaemonProcess::spawn(&paths.config, &dir.path().join("daemon.log"));
    tokio::task::block_in_place(|| daemon.wait_ready(&paths.socket));
    let cfg = paths.config.display().to_string();
    let run = |args: &[&str]| {
        let mut v: Vec<String> = vec!["--config".into(), cfg.clone()];
        v.extend(args.iter().map(|a| a.to_string()));
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = v.iter().map(String::as_str).collect();
            station(&args)
        })
    };

    // --wait: QUEUED, then ENROLLED; exit 0.
    let out = run(&["scan", "DICE-0100", "--wait", "--timeout", "30s"])
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let lines: Vec<String> = text(&out.stdout).lines().map(str::to_owned).collect();
    assert_eq!(
        lines,
        [
            "QUEUED DICE-0100 board-dice-0100",
            "ENROLLED DICE-0100 board-dice-0100"
        ],
    );
    assert_eq!(emu.stats().creates.get("board-dice-0100"), Some(&1));

    // Without --wait: only the acknowledgement; exit 0.
    let out = run(&["scan", "DICE-0101"]).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "QUEUED DICE-0101 board-dice-0101");

    // --json prints the protocol lines themselves.
    let out = run(&["scan", "DICE-0100", "--wait", "--json"])
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(v["reply"], "ENROLLED DICE-0100 board-dice-0100");
    assert_eq!(v["final"], true);

    // A scan the daemon refuses: ERROR line, exit 1, nothing stored.
    let out = run(&["scan", "BAD SERIAL", "--wait"]).await.unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("ERROR BAD SERIAL ")
            || text(&out.stdout).starts_with("ERROR - "),
        "{}",
        text(&out.stdout)
    );
    let out = run(&["scan", "DICE-0102", "--slot", "no-such-slot", "--wait"])
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        text(&out.stdout).starts_with("ERROR DICE-0102 "),
        "{}",
        text(&out.stdout)
    );

    // status --json: counts from the database, the HTTP address the daemon bound.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let snap = loop {
        let out = run(&["status", "--json"]).await.unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let snap: dps_station::station::status::StatusSnapshot =
            serde_json::from_slice(&out.stdout).unwrap();
        if snap.count("enrolled") == 2 || std::time::Instant::now() > deadline {
            break snap;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(snap.count("enrolled"), 2, "{snap:?}");
    assert_eq!(snap.queue_depth, 0);
    assert_eq!(snap.slots.len(), 1);
    assert_eq!(snap.control_socket, paths.socket.display().to_string());
    let http = snap
        .http_addr
        .clone()
        .expect("http address in the snapshot");
    assert!(!http.ends_with(":0"), "{http}");
    let health = reqwest::get(format!("http://{http}/healthz"))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let metrics = reqwest::get(format!("http://{http}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        parse_exposition(&metrics)["dps_station_boards{state=\"enrolled\"}"],
        2.0
    );
    let page = reqwest::get(format!("http://{http}/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("id=\"count-enrolled\">2<"), "{page}");
    assert!(page.contains("dice-1"), "{page}");

    // export (read-only, while the daemon runs), found through the same config.
    let out = run(&["export", "--state", "enrolled"]).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let mut rdr = csv::Reader::from_reader(out.stdout.as_slice());
    let recs: Vec<csv::StringRecord> = rdr.records().map(|r| r.unwrap()).collect();
    assert_eq!(recs.len(), 2);
    assert_eq!(&recs[0][0], "DICE-0100");
    assert_eq!(&recs[0][3], "dice");
    assert_eq!(recs[0][5].len(), 64, "certificate thumbprint");
    assert!(recs[0][5].chars().all(|c| c.is_ascii_hexdigit()));

    let code = tokio::task::block_in_place(|| daemon.terminate(std::time::Duration::from_secs(15)));
    assert_eq!(code, Some(0));
    assert!(!paths.socket.exists(), "control socket removed on SIGTERM");
}
