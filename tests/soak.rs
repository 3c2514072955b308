//! Crash campaign: the real `dps-station run` binary, boards submitted through its control
//! socket, and random `kill -9` of the daemon followed by a restart, again and again.
//! Checked against the emulator's own record of creations: every acknowledged (QUEUED)
//! board ends enrolled exactly once, nothing is created twice, and nothing is created
//! under an id that no submitted board owns. Scans that were cut off by a kill are
//! scanned again after the restart, as an operator would.
//!
//! Size from the environment: `SOAK_BOARDS` (default 500), `SOAK_KILLS` (default 10),
//! `SOAK_SEED` (default: from the clock; printed). `scripts/soak.sh` runs the full form.
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::campaign::{self as camp, env_usize};
use common::emulator as emu;
use common::station::{self as st, DaemonProcess, SlotSpec, StationSpec};
use futures::StreamExt;
use rand::{Rng, SeedableRng};

/// Concurrent control-socket clients while a round submits.
const CLIENTS: usize = 8;

fn regid(serial: &str) -> String {
    format!("board-{}", serial.to_ascii_lowercase())
}

/// How one scan went.
enum Reach {
    /// The control socket refused the connection: the daemon never saw this scan.
    NotReached,
    /// Sent, but the daemon died before answering.
    CutOff,
    /// The first reply line.
    Reply(String),
}

async fn scan_one(socket: &std::path::Path, serial: &str) -> Reach {
    use dps_station::station::control::{ControlClient, ControlRequest};
    let Ok(mut c) = ControlClient::connect(socket).await else {
        return Reach::NotReached;
    };
    let req = ControlRequest::Scan {
        serial: serial.into(),
        slot: None,
        wait: false,
    };
    if c.send(&req).await.is_err() {
        return Reach::NotReached;
    }
    match tokio::time::timeout(Duration::from_secs(10), c.recv()).await {
        Ok(Ok(Some(v))) => match v.get("reply").and_then(|r| r.as_str()) {
            Some(r) => Reach::Reply(r.to_owned()),
            None => Reach::CutOff,
        },
        _ => Reach::CutOff,
    }
}

/// Submit `serials` with [`CLIENTS`] at a time.
async fn submit(
    socket: PathBuf,
    serials: Vec<String>,
    acks: Arc<AtomicUsize>,
) -> Vec<(String, Reach)> {
    futures::stream::iter(serials)
        .map(|serial| {
            let socket = socket.clone();
            let acks = acks.clone();
            async move {
                let reach = scan_one(&socket, &serial).await;
                if matches!(&reach, Reach::Reply(r) if r.starts_with("QUEUED ")) {
                    acks.fetch_add(1, Ordering::SeqCst);
                }
                (serial, reach)
            }
        })
        .buffer_unordered(CLIENTS)
        .collect()
        .await
}

fn start_daemon(paths: &st::StationPaths, dir: &std::path::Path, name: &str) -> DaemonProcess {
    tokio::task::block_in_place(|| {
        let mut d = camp::spawn_daemon(&paths.config, &dir.join(name), "warn", &[]);
        d.wait_ready(&paths.socket);
        d
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_kill_9_loses_no_acknowledged_board_and_enrolls_none_twice() {
    let boards = env_usize("SOAK_BOARDS", 500).max(1);
    let kills = env_usize("SOAK_KILLS", 10);
    // Scan again what a kill cut off (what an operator does); SOAK_RESCAN=0 leaves those
    // boards aside, which checks only the acknowledged ones.
    let rescan = env_usize("SOAK_RESCAN", 1) != 0;
    let seed = std::env::var("SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("soak: {boards} boards, {kills} kills, SOAK_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let t0 = Instant::now();

    let dir = tempfile::tempdir().unwrap();
    let e = emu::start().await;
    // Every bulk request takes a little while, so kills land on batches in flight.
    e.set_faults("latency=30ms").unwrap();
    let mut spec = StationSpec::new(
        e.connection_string(),
        vec![SlotSpec::Dice {
            name: "fixture-2".into(),
        }],
    );
    spec.max_delay = "50ms";
    let paths = st::write_station(dir.path(), &spec);
    // The store stays on disk; the DICE bundles (thousands of small files, irrelevant to
    // the invariants) go to a tmpfs when there is one, which keeps the clean-up fast.
    let bundles = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap();
    let cfg = std::fs::read_to_string(&paths.config).unwrap();
    let old_out = format!("out_dir = {:?}", paths.dice_out);
    assert!(cfg.contains(&old_out), "config has the bundle out_dir");
    std::fs::write(
        &paths.config,
        cfg.replace(
            &old_out,
            &format!("out_dir = {:?}", bundles.path().join("dice-out")),
        ),
    )
    .unwrap();

    let all: Vec<String> = (0..boards).map(|i| format!("SOAK-{i:05}")).collect();
    let per_round = boards.div_ceil(kills + 1);
    let mut next = 0usize;
    let mut acked: BTreeSet<String> = BTreeSet::new();
    let mut cut_off: BTreeSet<String> = BTreeSet::new();
    // Scans the dead daemon never received: simply scanned in the next run.
    let mut unsent: Vec<String> = Vec::new();
    let mut kills_in_flight = 0usize;
    let mut kills_during_intake = 0usize;
    let mut rescanned = 0usize;

    for round in 0..kills {
        let mut d = start_daemon(&paths, dir.path(), &format!("run{round}.log"));
        // This round's new boards, plus the ones a previous kill cut off (scanned again).
        let mut serials: Vec<String> = all[next..(next + per_round).min(boards)].to_vec();
        next = (next + per_round).min(boards);
        serials.append(&mut unsent);
        if rescan {
            rescanned += cut_off.len();
            serials.extend(std::mem::take(&mut cut_off));
        }
        let n = serials.len();
        let acks = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(submit(paths.socket.clone(), serials, acks.clone()));
        // Kill after a random share of this round's scans were acknowledged (or once the
        // round's intake is over), preferably while a batch is in flight.
        let target = rng.gen_range(0..=n);
        let deadline = Instant::now() + Duration::from_secs(60);
        while acks.load(Ordering::SeqCst) < target
            && !task.is_finished()
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let in_flight = tokio::task::block_in_place(|| {
            st::poll(Duration::from_millis(500), || {
                camp::open_batches(&paths.db) > 0
            })
        });
        kills_in_flight += usize::from(in_flight);
        kills_during_intake += usize::from(!task.is_finished());
        tokio::task::block_in_place(|| d.kill9());
        for (serial, reach) in task.await.unwrap() {
            match reach {
                Reach::Reply(r) if r.starts_with(&format!("QUEUED {serial} ")) => {
                    acked.insert(serial);
                }
                Reach::Reply(r) if r.starts_with(&format!("ENROLLED {serial} ")) => {
                    // A re-scan of a board that had already been journaled and enrolled.
                    acked.insert(serial);
                }
                Reach::NotReached => {
                    unsent.push(serial);
                }
                Reach::CutOff | Reach::Reply(_) => {
                    cut_off.insert(serial);
                }
            }
        }
        // Nothing acknowledged is lost by the kill.
        let stored: BTreeSet<String> = st::rows(&paths.db).into_iter().map(|r| r.0).collect();
        let lost: Vec<&String> = acked.iter().filter(|s| !stored.contains(*s)).collect();
        assert!(
            lost.is_empty(),
            "round {round}: acknowledged boards lost after kill -9: {lost:?} (SOAK_SEED={seed})"
        );
    }

    // The last run: the rest of the boards and every cut-off scan again, then drain.
    let gets_before = e
        .stats()
        .by_operation
        .get("IndividualEnrollment_Get")
        .copied()
        .unwrap_or(0);
    let mut d = start_daemon(&paths, dir.path(), "final.log");
    let mut serials: Vec<String> = all[next..].to_vec();
    serials.append(&mut unsent);
    if rescan {
        rescanned += cut_off.len();
        serials.extend(std::mem::take(&mut cut_off));
    }
    let results = submit(paths.socket.clone(), serials, Arc::new(AtomicUsize::new(0))).await;
    for (serial, reach) in results {
        let r = match reach {
            Reach::Reply(r) => r,
            _ => String::new(),
        };
        assert!(
            r.starts_with(&format!("QUEUED {serial} "))
                || r.starts_with(&format!("ENROLLED {serial} ")),
            "{serial} scanned on a healthy daemon: {r:?}"
        );
        acked.insert(serial);
    }
    let drain_within = Duration::from_secs(30 + boards as u64 / 20);
    let expected_rows = acked.len();
    let drained = tokio::task::block_in_place(|| {
        st::poll(drain_within, || {
            let rows = st::rows(&paths.db);
            rows.len() >= expected_rows && rows.iter().all(|r| r.1 != "queued")
        })
    });
    let rows = st::rows(&paths.db);
    assert!(
        drained,
        "queue drained: {} rows, {} queued (SOAK_SEED={seed})",
        rows.len(),
        rows.iter().filter(|r| r.1 == "queued").count()
    );
    assert_eq!(camp::open_batches(&paths.db), 0, "no batch left open");

    // The invariants, against the emulator's record.
    let stats = e.stats();
    let submitted: BTreeMap<String, &String> = all.iter().map(|s| (regid(s), s)).collect();
    let mut by_serial: BTreeMap<&str, usize> = BTreeMap::new();
    for (serial, state, reg) in &rows {
        *by_serial.entry(serial.as_str()).or_default() += 1;
        assert_eq!(state, "enrolled", "{serial} ({reg}) ends enrolled");
        assert_eq!(reg, &regid(serial), "{serial} has its own registration id");
    }
    assert!(
        by_serial.values().all(|&n| n == 1),
        "one row per board: {:?}",
        by_serial.iter().filter(|(_, &n)| n > 1).collect::<Vec<_>>()
    );
    if rescan {
        assert_eq!(
            acked.len(),
            boards,
            "every board was acknowledged in the end"
        );
    }
    for s in &acked {
        assert_eq!(
            stats.creates.get(&regid(s)),
            Some(&1),
            "acknowledged {s} created exactly once (SOAK_SEED={seed})"
        );
    }
    let twice: Vec<_> = stats.creates.iter().filter(|(_, &n)| n != 1).collect();
    assert!(twice.is_empty(), "created more than once: {twice:?}");
    let strangers: Vec<_> = stats
        .creates
        .keys()
        .filter(|k| !submitted.contains_key(*k))
        .collect();
    assert!(
        strangers.is_empty(),
        "created under ids no board owns: {strangers:?}"
    );
    // Exactly the stored boards were created: an unacknowledged scan whose row was
    // committed just before a kill is enrolled once; one that was not is never created.
    let stored_ids: BTreeSet<String> = rows.iter().map(|r| r.2.clone()).collect();
    let created_ids: BTreeSet<String> = stats.creates.keys().cloned().collect();
    assert_eq!(created_ids, stored_ids, "created ids = stored ids");
    if rescan {
        assert_eq!(stats.creates.len(), boards);
    }
    assert!(
        kills == 0 || kills_in_flight > 0,
        "at least one kill hit a batch in flight"
    );
    let gets = stats
        .by_operation
        .get("IndividualEnrollment_Get")
        .copied()
        .unwrap_or(0);
    assert_eq!(d.terminate(Duration::from_secs(15)), Some(0));
    println!(
        "soak result: boards={boards} kills={kills} kills_with_batch_in_flight={kills_in_flight} \
         kills_during_intake={kills_during_intake} rescanned_after_kill={rescanned} \
         acknowledged={} enrolled={} created_once={} created_twice=0 lost=0 reconcile_gets={} (final run {}) \
         bulk_requests={} elapsed={:.1}s seed={seed}",
        acked.len(),
        rows.len(),
        stats.creates.values().filter(|&&n| n == 1).count(),
        gets,
        gets - gets_before,
        stats
            .by_operation
            .get("IndividualEnrollment_RunBulkOperation")
            .copied()
            .unwrap_or(0),
        t0.elapsed().as_secs_f64()
    );
    e.shutdown().await;
}

/// What a kill -9 between writing a DICE bundle and committing the board's row leaves
/// behind: the board's bundle on disk and no row. The operator scans the board again; it
/// must be journaled and enrolled (not refused forever), and the identity DPS enrolls must
/// be the one in the bundle on disk (the one that gets injected).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_board_cut_off_after_its_dice_bundle_was_written_can_be_scanned_again() {
    use sha2::Digest;
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
    // The bundle as the cut-off scan wrote it (same CA, same out_dir), no row stored.
    let ca = dir.path().join("ca");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dps-station"))
        .args(["dice", "issue", "--serial", "CUT-0001", "--ca-cert"])
        .arg(ca.join("intermediate.pem"))
        .arg("--ca-key")
        .arg(ca.join("intermediate.key"))
        .arg("--out")
        .arg(&paths.dice_out)
        .env_remove("DPS_STATION_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dice issue: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(paths.dice_out.join("CUT-0001").join("alias.key").exists());

    let mut d = start_daemon(&paths, dir.path(), "run.log");
    let replies = camp::scan_wait(&paths.socket, "CUT-0001", None, Duration::from_secs(20)).await;
    assert_eq!(
        replies,
        vec![
            "QUEUED CUT-0001 board-cut-0001".to_string(),
            "ENROLLED CUT-0001 board-cut-0001".to_string()
        ],
        "a board whose earlier scan was cut off is scanned again"
    );
    assert_eq!(e.stats().creates.get("board-cut-0001"), Some(&1));
    // The enrolled identity is the bundle on disk.
    let alias = std::fs::read(paths.dice_out.join("CUT-0001").join("alias.pem")).unwrap();
    let der = pem::parse(alias).unwrap();
    let on_disk = hex::encode(sha2::Sha256::digest(der.contents()));
    let stored: String = rusqlite::Connection::open(&paths.db)
        .unwrap()
        .query_row(
            "SELECT cert_sha256 FROM boards WHERE serial = 'CUT-0001'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        stored, on_disk,
        "DPS enrolls the alias certificate that is on disk"
    );
    assert_eq!(d.terminate(Duration::from_secs(15)), Some(0));
}
