//! Fault campaign against the real `dps-station run` binary: DPS connection resets, 5xx
//! answers and latency; DPS down for a while and a 429 storm; the state disk full
//! (ENOSPC on a small tmpfs); a TPM vanishing in the middle of a command; the scanner
//! unplugged and replugged. In every story the daemon stays alive, acknowledges only what
//! it journaled, and enrolls every acknowledged board exactly once (per the emulator).
//!
//! `SOAK_LONG=1` turns the short outage (3 s) into the two-minute one.
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::campaign::{self as camp, Tmpfs};
use common::emulator as emu;
use common::station::{self as st, DaemonProcess, SlotSpec, StationSpec};
use dps_station::emulator::{RunningEmulator, Stats};

fn dice_station(dir: &Path, e: &RunningEmulator) -> st::StationPaths {
    let mut spec = StationSpec::new(
        e.connection_string(),
        vec![SlotSpec::Dice {
            name: "fixture-2".into(),
        }],
    );
    spec.max_delay = "50ms";
    st::write_station(dir, &spec)
}

fn start(paths: &st::StationPaths, log: &Path) -> DaemonProcess {
    tokio::task::block_in_place(|| {
        let mut d = camp::spawn_daemon(&paths.config, log, "info", &[]);
        d.wait_ready(&paths.socket);
        d
    })
}

fn log_of(d: &DaemonProcess) -> String {
    std::fs::read_to_string(&d.log).unwrap_or_default()
}

fn alive(d: &mut DaemonProcess) -> bool {
    matches!(d.child.try_wait(), Ok(None))
}

/// Requests the emulator answered with an injected fault (they never reach an operation).
fn injected(s: &Stats) -> u64 {
    s.requests - s.by_operation.values().sum::<u64>()
}

/// Scan `serials` at once with `--wait`; every one must end `ENROLLED`.
async fn scan_all_until_enrolled(socket: &Path, serials: &[String], within: Duration) {
    let tasks: Vec<_> = serials
        .iter()
        .map(|s| {
            let socket = socket.to_owned();
            let s = s.clone();
            tokio::spawn(async move {
                let r = camp::scan_wait(&socket, &s, None, within).await;
                (s, r)
            })
        })
        .collect();
    for t in tasks {
        let (s, r) = t.await.unwrap();
        assert_eq!(
            r.last().cloned(),
            Some(format!("ENROLLED {s} board-{}", s.to_ascii_lowercase())),
            "{s}: {r:?}"
        );
        assert!(r[0].starts_with(&format!("QUEUED {s} ")), "{s}: {r:?}");
    }
}

fn assert_created_once(e: &RunningEmulator, serials: &[String]) {
    let stats = e.stats();
    for s in serials {
        assert_eq!(
            stats
                .creates
                .get(&format!("board-{}", s.to_ascii_lowercase())),
            Some(&1),
            "{s} created exactly once: {stats:?}"
        );
    }
    assert!(stats.creates.values().all(|&n| n == 1), "{stats:?}");
}

fn serials(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:04}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_5xx_and_latency_delay_boards_but_lose_and_duplicate_none() {
    let dir = tempfile::tempdir().unwrap();
    let e = emu::start().await;
    let paths = dice_station(dir.path(), &e);
    let mut d = start(&paths, &dir.path().join("run.log"));
    let phases = [
        ("RST", "reset-rate=0.5", true),
        ("SVC", "error-rate=0.5", true),
        ("ISE", "error-rate=0.5,status=500", true),
        ("LAT", "latency=400ms,reset-rate=0.2", false),
    ];
    let mut total = 0;
    for (prefix, faults, must_inject) in phases {
        let before = e.stats();
        e.set_faults(faults).unwrap();
        // Faults are random: a round of 12 boards may need only a couple of requests, all
        // of which could get through. Scan further rounds until a failure was injected
        // (0.5^k odds of needing more than k requests), so the phase always tests riding
        // one out.
        for round in 0..8 {
            let boards = serials(&format!("{prefix}{round}"), 12);
            let t0 = Instant::now();
            scan_all_until_enrolled(&paths.socket, &boards, Duration::from_secs(60)).await;
            total += boards.len();
            if !must_inject {
                assert!(t0.elapsed() >= Duration::from_millis(400), "{faults}");
            }
            assert_created_once(&e, &boards);
            assert!(alive(&mut d), "daemon alive after {faults}");
            if !must_inject || injected(&e.stats()) > injected(&before) {
                break;
            }
        }
        if must_inject {
            assert!(
                injected(&e.stats()) > injected(&before),
                "{faults}: the emulator injected failures the daemon rode out"
            );
        }
    }
    e.set_faults("").unwrap();
    let snap = camp::status(&paths.socket).await.expect("status");
    assert_eq!(snap.count("enrolled"), total as u64, "{snap:?}");
    assert_eq!(snap.count("rejected"), 0);
    assert_eq!(snap.queue_depth, 0);
    assert_eq!(
        d.terminate(Duration::from_secs(15)),
        Some(0),
        "{}",
        log_of(&d)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dps_down_for_a_while_then_a_429_storm_every_queued_board_is_enrolled_once() {
    let long = std::env::var("SOAK_LONG").is_ok_and(|v| v == "1");
    let down = if long { 120 } else { 3 };
    let dir = tempfile::tempdir().unwrap();
    let e = emu::start().await;
    let paths = dice_station(dir.path(), &e);
    let mut d = start(&paths, &dir.path().join("run.log"));

    // DPS down (every connection dropped): scans are still acknowledged, rows wait.
    e.set_faults(&format!("down-for={down}s")).unwrap();
    let t_down = Instant::now();
    let outage = serials("DOWN", 15);
    for s in &outage {
        assert!(camp::scan_acked(&paths.socket, s).await, "{s} acknowledged");
    }
    let saw_failures = {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = false;
        while !seen && Instant::now() < deadline {
            seen = camp::status(&paths.socket)
                .await
                .is_some_and(|s| s.dps.consecutive_failures > 0 && s.dps.last_error.is_some());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        seen
    };
    assert!(saw_failures, "status shows DPS failing");
    assert_eq!(st::count(&paths.db, "enrolled"), 0);
    // Back up: the queue drains without a new scan, within the backoff cap after the window.
    let drained = tokio::task::block_in_place(|| {
        st::poll(Duration::from_secs(down + 45), || {
            st::count(&paths.db, "enrolled") == outage.len()
        })
    });
    assert!(drained, "queue drained: {:?}", st::rows(&paths.db));
    assert!(t_down.elapsed() >= Duration::from_secs(down));
    assert_created_once(&e, &outage);

    // A 429 storm: every request throttled for a while. Rows stay queued, the daemon backs
    // off instead of hammering, and drains once the storm ends.
    e.set_faults("error-rate=1,status=429").unwrap();
    let before = e.stats();
    let storm = serials("STORM", 10);
    for s in &storm {
        assert!(camp::scan_acked(&paths.socket, s).await, "{s} acknowledged");
    }
    let throttled_seen = {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = false;
        while !seen && Instant::now() < deadline {
            seen = camp::status(&paths.socket)
                .await
                .is_some_and(|s| s.dps.throttled_total > 0);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        seen
    };
    assert!(throttled_seen, "the daemon counted the 429s");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = injected(&e.stats()) - injected(&before);
    assert!(
        (1..=30).contains(&during),
        "backed off during the storm: {during} requests in about 3 s"
    );
    assert_eq!(st::count(&paths.db, "rejected"), 0, "429 rejects nothing");
    e.set_faults("").unwrap();
    let drained = tokio::task::block_in_place(|| {
        st::poll(Duration::from_secs(45), || {
            st::count(&paths.db, "enrolled") == outage.len() + storm.len()
        })
    });
    assert!(
        drained,
        "drained after the storm: {:?}",
        st::rows(&paths.db)
    );
    assert_created_once(&e, &storm);
    assert!(alive(&mut d));
    assert_eq!(d.terminate(Duration::from_secs(15)), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_state_disk_refuses_the_scan_keeps_the_daemon_alive_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let e = emu::start().await;
    let paths = dice_station(dir.path(), &e);
    // `[state] path` on its own 4 MiB tmpfs.
    let disk = Tmpfs::mount(&dir.path().join("statefs"), "4m");
    let db = disk.path.join("station.db");
    let text = std::fs::read_to_string(&paths.config).unwrap();
    let text = text.replace(&format!("path = {:?}", paths.db), &format!("path = {db:?}"));
    assert!(
        text.contains(&format!("{db:?}")),
        "config points at the tmpfs"
    );
    std::fs::write(&paths.config, text).unwrap();
    let mut d = start(&paths, &dir.path().join("run.log"));
    assert_eq!(
        camp::scan_wait(&paths.socket, "FULL-0001", None, Duration::from_secs(20)).await,
        vec![
            "QUEUED FULL-0001 board-full-0001",
            "ENROLLED FULL-0001 board-full-0001"
        ]
    );

    // Fill the disk.
    let filler = disk.path.join("filler");
    assert!(disk.fill(&filler) > 0);
    let reply = camp::scan_once(&paths.socket, "FULL-0002", None)
        .await
        .expect("an answer while the disk is full");
    assert!(
        reply.starts_with("ERROR FULL-0002 store-error "),
        "not acknowledged: {reply:?}"
    );
    assert!(alive(&mut d), "daemon alive on ENOSPC: {}", log_of(&d));
    let snap = camp::status(&paths.socket).await.expect("status answers");
    assert!(
        snap.last_errors.iter().any(|l| l.contains("store-error")),
        "{:?}",
        snap.last_errors
    );
    assert!(
        !st::rows(&db).iter().any(|r| r.0 == "FULL-0002"),
        "nothing stored for the refused scan"
    );
    assert_eq!(e.stats().creates.get("board-full-0002"), None);

    // Space returns: the next scan (and the refused board scanned again) go through.
    std::fs::remove_file(&filler).unwrap();
    for s in ["FULL-0003", "FULL-0002"] {
        let r = camp::scan_wait(&paths.socket, s, None, Duration::from_secs(20)).await;
        let id = format!("board-{}", s.to_ascii_lowercase());
        assert_eq!(
            r,
            vec![format!("QUEUED {s} {id}"), format!("ENROLLED {s} {id}")],
            "after freeing space: {}",
            log_of(&d)
        );
    }
    assert_created_once(&e, &serials("FULL", 4)[1..4]);
    assert_eq!(d.terminate(Duration::from_secs(15)), Some(0));
    drop(disk);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tpm_vanishing_mid_command_is_a_tpm_error_and_the_next_board_is_fine() {
    use common::swtpm::{self as tpm, SwtpmVariant};
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let dir = tempfile::tempdir().unwrap();
    let e = emu::start().await;
    let mut board = tokio::task::block_in_place(|| tpm::board(SwtpmVariant::EkPersistedWithCert));
    let port = board.port();
    // The slot reaches the TPM through a relay. The TPM disappears (swtpm SIGKILLed) on
    // the daemon's third data-port send, in the middle of reading the EK.
    let pid = board.pid().expect("swtpm pid") as i32;
    let relay = camp::TpmRelay::start(port, 3, move || {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    });
    let relay_tcti = relay.tcti();
    let spec = StationSpec::new(
        e.connection_string(),
        vec![SlotSpec::Tpm {
            name: "fixture-1".into(),
            tcti: relay_tcti.clone(),
            registration_id: None,
        }],
    );
    let paths = st::write_station(dir.path(), &spec);
    let mut d = start(&paths, &dir.path().join("run.log"));

    let replies = camp::scan_wait(&paths.socket, "TPM-0001", None, Duration::from_secs(30)).await;
    assert!(
        relay.fired.load(std::sync::atomic::Ordering::SeqCst),
        "the TPM vanished mid-command ({} sends): {replies:?}",
        relay.sent.load(std::sync::atomic::Ordering::SeqCst)
    );
    tokio::task::block_in_place(|| board.kill());
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert!(
        replies[0].starts_with("ERROR TPM-0001 tpm-error "),
        "{replies:?}"
    );
    assert!(alive(&mut d), "daemon alive: {}", log_of(&d));
    assert!(st::rows(&paths.db).is_empty(), "nothing stored");
    assert_eq!(e.stats().requests, 0, "nothing sent to DPS");

    // The next board on the fixture enrolls normally.
    let next =
        tokio::task::block_in_place(|| tpm::board_on_port(SwtpmVariant::EkPersistedWithCert, port));
    let r = camp::scan_wait(&paths.socket, "TPM-0002", None, Duration::from_secs(30)).await;
    assert_eq!(r.len(), 2, "{r:?}\n{}", log_of(&d));
    assert!(r[0].starts_with("QUEUED TPM-0002 "), "{r:?}");
    assert!(r[1].starts_with("ENROLLED TPM-0002 "), "{r:?}");
    let id = r[1].rsplit(' ').next().unwrap().to_owned();
    assert_eq!(id.len(), 52, "EK-hash registration id");
    assert_eq!(e.stats().creates.get(&id), Some(&1));
    let snap = camp::status(&paths.socket).await.expect("status");
    assert_eq!(snap.slots[0].errors, 1, "{snap:?}");
    assert_eq!(d.terminate(Duration::from_secs(15)), Some(0));
    drop(next);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scanner_unplugged_mid_line_and_replugged_keeps_working() {
    use common::pty::{PortLink, Scanner};
    let dir = tempfile::tempdir().unwrap();
    let e = emu::start().await;
    let link = PortLink::new();
    let mut scanner = Scanner::new();
    camp::cloexec_pty_masters();
    link.plug(&scanner);
    let mut spec = StationSpec::new(
        e.connection_string(),
        vec![SlotSpec::Dice {
            name: "fixture-2".into(),
        }],
    );
    spec.serial_port = Some(link.path.clone());
    let paths = st::write_station(dir.path(), &spec);
    let mut d = start(&paths, &dir.path().join("run.log"));
    let connected = |want: bool| {
        let socket = paths.socket.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                let c = camp::status(&socket).await.and_then(|s| {
                    s.trigger
                        .and_then(|t| t.get("connected").and_then(|v| v.as_bool()))
                });
                if c == Some(want) {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            false
        }
    };
    assert!(connected(true).await, "scanner port opened");
    scanner.send(b"PLUG-0001\r\n");
    let got = scanner.read_lines(2, Duration::from_secs(15));
    assert!(
        got.contains("ENROLLED PLUG-0001 board-plug-0001\r\n"),
        "{got:?}"
    );

    // Half a scan, then the cable is pulled.
    scanner.send(b"PLUG-00");
    drop(scanner);
    link.unplug();
    assert!(
        connected(false).await,
        "status shows the scanner gone: {}",
        log_of(&d)
    );
    assert!(alive(&mut d));
    // Scans through the control socket still work meanwhile.
    assert_eq!(
        camp::scan_wait(&paths.socket, "PLUG-0002", None, Duration::from_secs(20))
            .await
            .last()
            .map(String::as_str),
        Some("ENROLLED PLUG-0002 board-plug-0002")
    );

    // Plugged back in (a new device behind the same name): the half line is gone.
    let mut scanner = Scanner::new();
    camp::cloexec_pty_masters();
    link.plug(&scanner);
    assert!(connected(true).await, "scanner reopened: {}", log_of(&d));
    scanner.send(b"03\r\nPLUG-0004\r\n");
    let got = scanner.read_lines(3, Duration::from_secs(15));
    assert!(got.starts_with("ERROR - bad-format"), "{got:?}");
    assert!(
        got.contains("QUEUED PLUG-0004 board-plug-0004\r\n"),
        "{got:?}"
    );
    assert!(
        got.contains("ENROLLED PLUG-0004 board-plug-0004\r\n"),
        "{got:?}"
    );
    let rows: Vec<String> = st::rows(&paths.db).into_iter().map(|r| r.0).collect();
    assert_eq!(rows, ["PLUG-0001", "PLUG-0002", "PLUG-0004"]);
    assert_eq!(d.terminate(Duration::from_secs(15)), Some(0));
}
