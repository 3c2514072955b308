//! Crash and shutdown stories with the real `dps-station run` binary: kill -9 while boards
//! are queued and a batch is in flight, restart, and every acknowledged board is enrolled
//! exactly once per the emulator's own record; SIGTERM exits 0 within its bound.
mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::emulator as emu;
use common::station::{self as st, DaemonProcess, SlotSpec, StationSpec};
use dps_station::station::control::{ControlClient, ControlRequest};

/// Scan `serial` through the control socket without waiting; true when it was QUEUED.
async fn scan_ack(socket: &std::path::Path, serial: &str) -> bool {
    let Ok(mut c) = ControlClient::connect(socket).await else {
        return false;
    };
    let req = ControlRequest::Scan {
        serial: serial.into(),
        slot: None,
        wait: false,
    };
    match tokio::time::timeout(Duration::from_secs(10), c.call(&req)).await {
        Ok(Ok(v)) => v
            .get("reply")
            .and_then(|r| r.as_str())
            .is_some_and(|r| r.starts_with(&format!("QUEUED {serial} "))),
        _ => false,
    }
}

fn open_batches(db: &std::path::Path) -> i64 {
    rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .and_then(|c| {
            c.query_row(
                "SELECT count(*) FROM batches WHERE finished_at IS NULL",
                [],
                |r| r.get(0),
            )
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_batch_loses_nothing_and_enrolls_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let e = emu::start().await;
    // Slow DPS: every bulk create stays in flight long enough to be killed during it.
    e.set_faults("latency=700ms").unwrap();
    let mut spec = StationSpec::new(
        e.connection_string(),
        vec![SlotSpec::Dice {
            name: "fixture-2".into(),
        }],
    );
    spec.max_delay = "50ms";
    let paths = st::write_station(dir.path(), &spec);
    let mut acked: BTreeSet<String> = BTreeSet::new();
    let mut n = 0;
    let mut saw_open_batch = false;
    for round in 0..3 {
        let mut d =
            DaemonProcess::spawn(&paths.config, &dir.path().join(format!("run{round}.log")));
        d.wait_ready(&paths.socket);
        // Scans keep arriving while batches go out.
        let mut tasks = Vec::new();
        for _ in 0..15 {
            n += 1;
            let serial = format!("KSN-{n:04}");
            let sock = paths.socket.clone();
            tasks.push(tokio::spawn(async move {
                (scan_ack(&sock, &serial).await, serial)
            }));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for t in tasks {
            let (ok, serial) = t.await.unwrap();
            if ok {
                acked.insert(serial);
            }
        }
        // Kill while a batch is in flight (recorded in the store, request outstanding).
        let in_flight = st::poll(Duration::from_secs(5), || open_batches(&paths.db) > 0);
        saw_open_batch |= in_flight;
        d.kill9();
        // Every acknowledged board is in the store.
        let stored: BTreeSet<String> = st::rows(&paths.db).into_iter().map(|r| r.0).collect();
        for s in &acked {
            assert!(
                stored.contains(s),
                "acknowledged {s} lost after kill -9 (round {round})"
            );
        }
    }
    assert!(saw_open_batch, "at least one kill hit a batch in flight");
    assert!(
        acked.len() >= 40,
        "most scans were acknowledged: {}",
        acked.len()
    );

    // DPS healthy again; restart and let the queue drain.
    e.set_faults("").unwrap();
    let gets_before = e
        .stats()
        .by_operation
        .get("IndividualEnrollment_Get")
        .copied()
        .unwrap_or(0);
    let mut d = DaemonProcess::spawn(&paths.config, &dir.path().join("final.log"));
    d.wait_ready(&paths.socket);
    let drained = st::poll(Duration::from_secs(30), || {
        let rows = st::rows(&paths.db);
        !rows.is_empty() && rows.iter().all(|r| r.1 == "enrolled")
    });
    assert!(drained, "queue drained: {:?}", st::rows(&paths.db));
    assert_eq!(open_batches(&paths.db), 0);
    // The batch left open by the last kill was reconciled by GET before anything was re-sent.
    let gets_after = e
        .stats()
        .by_operation
        .get("IndividualEnrollment_Get")
        .copied()
        .unwrap_or(0);
    assert!(gets_after > gets_before, "reconcile used GET");

    let stats = e.stats();
    for (serial, state, regid) in st::rows(&paths.db) {
        assert_eq!(state, "enrolled");
        assert_eq!(
            stats.creates.get(&regid),
            Some(&1),
            "{serial} ({regid}) created exactly once: {stats:?}"
        );
    }
    for s in &acked {
        let regid = format!("board-{}", s.to_ascii_lowercase());
        assert_eq!(
            stats.creates.get(&regid),
            Some(&1),
            "acknowledged {s} enrolled once"
        );
    }
    assert!(stats.creates.values().all(|&c| c == 1), "{stats:?}");
    assert_eq!(d.terminate(Duration::from_secs(15)), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_batch_in_flight_exits_0_within_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let e = emu::start().await;
    e.set_faults("latency=3s").unwrap();
    let mut spec = StationSpec::new(
        e.connection_string(),
        vec![SlotSpec::Dice {
            name: "fixture-2".into(),
        }],
    );
    spec.max_delay = "10ms";
    let paths = st::write_station(dir.path(), &spec);
    let mut d = DaemonProcess::spawn(&paths.config, &dir.path().join("run.log"));
    d.wait_ready(&paths.socket);
    assert!(scan_ack(&paths.socket, "TSN-0001").await);
    assert!(st::poll(Duration::from_secs(5), || open_batches(&paths.db) > 0));
    let t0 = Instant::now();
    assert_eq!(
        d.terminate(Duration::from_secs(15)),
        Some(0),
        "{}",
        std::fs::read_to_string(&d.log).unwrap_or_default()
    );
    // The in-flight request (3 s) was allowed to finish inside the 10 s grace.
    assert!(t0.elapsed() < Duration::from_secs(12));
    assert_eq!(
        st::count(&paths.db, "enrolled"),
        1,
        "{:?}",
        st::rows(&paths.db)
    );
    assert!(!paths.socket.exists(), "control socket removed on exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_gets_ready_and_watchdog_and_a_bad_config_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let e = emu::start().await;
    let paths = st::write_station(
        dir.path(),
        &StationSpec::new(
            e.connection_string(),
            vec![SlotSpec::Dice {
                name: "fixture-2".into(),
            }],
        ),
    );
    let notify = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut d = DaemonProcess::spawn_with_env(
        &paths.config,
        &dir.path().join("run.log"),
        &[
            ("NOTIFY_SOCKET", notify.display().to_string()),
            ("WATCHDOG_USEC", "400000".into()),
            // As under systemd: stderr goes to journald, lines carry <N> priorities.
            ("JOURNAL_STREAM", "8:12345".into()),
        ],
    );
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 512];
    while Instant::now() < deadline
        && !(seen.contains("READY=1") && seen.matches("WATCHDOG=1").count() >= 2)
    {
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            seen.push('\n');
        }
    }
    assert!(seen.contains("READY=1"), "{seen:?}");
    assert!(
        seen.matches("WATCHDOG=1").count() >= 2,
        "watchdog pings at half of WATCHDOG_USEC: {seen:?}"
    );
    // READY only once the control socket listens.
    assert!(std::os::unix::net::UnixStream::connect(&paths.socket).is_ok());
    // Healthy with no board on the fixture: still answering after a while.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c = ControlClient::connect(&paths.socket).await.unwrap();
    let snap = c.status().await.unwrap();
    assert_eq!(snap.queue_depth, 0);
    // `http = "127.0.0.1:0"`: the bound address is in the status and in the log.
    let http = snap.http_addr.clone().expect("http address in the status");
    assert!(!http.ends_with(":0"), "{http}");
    assert_eq!(d.terminate(Duration::from_secs(15)), Some(0));
    let log = std::fs::read_to_string(&d.log).unwrap();
    // journald levels: every line carries its priority; start-up news is info (<6>), not
    // a warning.
    assert!(
        log.lines()
            .all(|l| l.starts_with('<') && l.as_bytes().get(2) == Some(&b'>')),
        "{log}"
    );
    let ready = log
        .lines()
        .find(|l| l.contains("dps-station ready"))
        .unwrap_or_default();
    assert!(ready.starts_with("<6>"), "{log}");
    assert!(ready.contains(&http), "bound address logged: {log}");
    assert!(
        log.lines().any(|l| l.starts_with("<6>")
            && l.contains("HTTP status server listening")
            && l.contains(&http)),
        "{log}"
    );

    // A config error is exit 2 and names the key.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&paths.config)
            .unwrap()
            .replace("max_size = 10", "max_size = 11"),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dps-station"))
        .args(["run", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_size"), "{err}");

    // The HTTP address is taken: exit 2 naming it, and no control socket left behind.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let busy = dir.path().join("busy.toml");
    std::fs::write(
        &busy,
        std::fs::read_to_string(&paths.config)
            .unwrap()
            .replace("http = \"127.0.0.1:0\"", &format!("http = \"{addr}\"")),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dps-station"))
        .args(["run", "--config"])
        .arg(&busy)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(&addr) && err.contains("http"), "{err}");
    assert!(!paths.socket.exists(), "no control socket left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_board_queued_before_kill_9_still_gets_its_enrolled_reply_on_the_serial_line() {
    use common::pty::{PortLink, Scanner};
    let dir = tempfile::tempdir().unwrap();
    let e = emu::start().await;
    // DPS unreachable while the board is scanned: it stays queued.
    e.set_faults("down-for=600s").unwrap();
    let mut scanner = Scanner::new();
    let link = PortLink::new();
    link.plug(&scanner);
    let mut spec = StationSpec::new(
        e.connection_string(),
        vec![SlotSpec::Dice {
            name: "fixture-2".into(),
        }],
    );
    spec.serial_port = Some(link.path.clone());
    let paths = st::write_station(dir.path(), &spec);
    let mut d = DaemonProcess::spawn(&paths.config, &dir.path().join("run1.log"));
    d.wait_ready(&paths.socket);
    // The reader opens the port shortly after start (a pty master cannot be written while
    // no one holds the slave): wait until the daemon reports the scanner connected.
    let connected = async {
        for _ in 0..500 {
            if let Ok(mut c) = ControlClient::connect(&paths.socket).await {
                if let Ok(s) = c.status().await {
                    let up = s.trigger.as_ref().and_then(|t| t.get("connected"));
                    if up.and_then(|v| v.as_bool()) == Some(true) {
                        return true;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    };
    assert!(connected.await, "scanner port opened");
    let mut got = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !got.contains("QUEUED") && Instant::now() < deadline {
        scanner.send(b"SSN-0001\r\n");
        got.push_str(&scanner.read_lines(1, Duration::from_millis(500)));
    }
    assert!(
        got.contains("QUEUED SSN-0001 board-ssn-0001\r\n"),
        "{got:?}"
    );
    d.kill9();
    assert_eq!(st::count(&paths.db, "queued"), 1);

    e.set_faults("").unwrap();
    let mut d = DaemonProcess::spawn(&paths.config, &dir.path().join("run2.log"));
    d.wait_ready(&paths.socket);
    let got = scanner.read_lines(1, Duration::from_secs(15));
    assert!(
        got.contains("ENROLLED SSN-0001 board-ssn-0001\r\n"),
        "{got:?}"
    );
    assert_eq!(e.stats().creates.get("board-ssn-0001"), Some(&1));
    assert_eq!(d.terminate(Duration::from_secs(15)), Some(0));
}

/// `control drain --wait` returns once every queued board is answered, and a daemon started
/// with `--exit-when-drained` then exits 0 by itself, removing its socket. A SIGTERM sent
/// the moment the control socket appears (the daemon may still be starting) exits 0 too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_wait_and_exit_when_drained_and_an_early_sigterm_exit_0() {
    let dir = tempfile::tempdir().unwrap();
    let e = emu::start().await;
    let mut spec = StationSpec::new(
        e.connection_string(),
        vec![SlotSpec::Dice {
            name: "fixture-2".into(),
        }],
    );
    // Only the drain can send this partial batch within the test.
    spec.max_delay = "1h";
    let paths = st::write_station(dir.path(), &spec);
    let mut d = DaemonProcess::spawn_full(
        &paths.config,
        &dir.path().join("run1.log"),
        &["--exit-when-drained"],
        &[],
    );
    d.wait_ready(&paths.socket);
    assert!(scan_ack(&paths.socket, "XSN-0001").await);
    assert!(scan_ack(&paths.socket, "XSN-0002").await);
    assert_eq!(st::count(&paths.db, "queued"), 2);
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_dps-station"))
            .args(args)
            .arg("--config")
            .arg(&paths.config)
            .output()
            .unwrap()
    };
    let out =
        tokio::task::block_in_place(|| cli(&["control", "drain", "--wait", "--timeout", "20s"]));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Either the status said drained, or the daemon had already exited and the journal
    // shows nothing queued.
    assert!(
        stdout.contains("drained: enrolled=2") || stdout.contains("nothing is queued"),
        "{stdout}"
    );
    assert_eq!(
        tokio::task::block_in_place(|| d.wait_exit(Duration::from_secs(15))),
        Some(0),
        "{}",
        std::fs::read_to_string(&d.log).unwrap_or_default()
    );
    assert!(!paths.socket.exists(), "control socket removed on exit");
    assert_eq!(st::count(&paths.db, "enrolled"), 2);
    assert_eq!(e.stats().creates.len(), 2);

    let mut d = DaemonProcess::spawn(&paths.config, &dir.path().join("run2.log"));
    d.wait_ready(&paths.socket);
    assert_eq!(
        tokio::task::block_in_place(|| d.terminate(Duration::from_secs(15))),
        Some(0),
        "SIGTERM right after the socket appeared: {}",
        std::fs::read_to_string(&d.log).unwrap_or_default()
    );
}
