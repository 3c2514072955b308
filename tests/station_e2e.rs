//! End-to-end stories of the station daemon against the project's own DPS emulator over
//! real HTTP, with real swtpm boards, a real pty scanner and the SQLite store on disk.
mod common;

use std::time::Duration;

use common::emulator as emu;
use common::pty::{PortLink, Scanner};
use common::station::{self as st, SlotSpec, StationSpec};
use common::swtpm::{self as tpm, SwtpmVariant};
use dps_station::station::daemon::Daemon;
use dps_station::station::pipeline::{PipelineHandle, ScanRequest};

fn load(cfg: &std::path::Path) -> dps_station::config::Config {
    dps_station::config::load(cfg).expect("generated config loads")
}

/// Submit a scan the way the control socket does and collect replies until a final one.
async fn scan(p: &PipelineHandle, slot: Option<&str>, serial: &str) -> Vec<String> {
    scan_within(p, slot, serial, Duration::from_secs(20)).await
}

async fn scan_within(
    p: &PipelineHandle,
    slot: Option<&str>,
    serial: &str,
    within: Duration,
) -> Vec<String> {
    let mut rx = p
        .submit(ScanRequest {
            slot: slot.map(str::to_owned),
            serial: serial.to_owned(),
        })
        .await;
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout(within, rx.recv()).await {
            Ok(Some(r)) => {
                let fin = r.is_final();
                out.push(r.to_string());
                if fin {
                    return out;
                }
            }
            Ok(None) => return out,
            Err(_) => panic!("no final reply for {serial} within {within:?}; got {out:?}"),
        }
    }
}

/// Poll the pipeline's status (every 20 ms) until `f` holds or `within` passed.
async fn status_until(
    p: &PipelineHandle,
    within: Duration,
    f: impl Fn(&dps_station::station::status::StatusSnapshot) -> bool,
) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if f(&p.status().await) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn scanner_connected(s: &dps_station::station::status::StatusSnapshot) -> bool {
    s.trigger
        .as_ref()
        .and_then(|t| t.get("connected"))
        .and_then(|v| v.as_bool())
        == Some(true)
}

fn line_with<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    text.split("\r\n").find(|l| l.starts_with(prefix))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dice_boards_are_enrolled_once_and_a_duplicate_scan_sends_nothing() {
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
    let d = Daemon::start(load(&paths.config))
        .await
        .expect("daemon starts");
    let p = d.pipeline.clone();

    let mut all = Vec::new();
    for i in 0..12 {
        let p = p.clone();
        all.push(tokio::spawn(async move {
            scan(&p, None, &format!("DSN-{i:04}")).await
        }));
    }
    for (i, h) in all.into_iter().enumerate() {
        let replies = h.await.unwrap();
        assert_eq!(
            replies,
            vec![
                format!("QUEUED DSN-{i:04} board-dsn-{i:04}"),
                format!("ENROLLED DSN-{i:04} board-dsn-{i:04}")
            ]
        );
    }
    let stats = e.stats();
    for i in 0..12 {
        assert_eq!(
            stats.creates.get(&format!("board-dsn-{i:04}")),
            Some(&1),
            "{stats:?}"
        );
    }
    // 12 boards at max_size 10: batched (at least 2 requests, far fewer than boards), and
    // no per-board PUT.
    let bulks = stats
        .by_operation
        .get("IndividualEnrollment_RunBulkOperation")
        .copied()
        .unwrap_or(0);
    assert!((2..=6).contains(&bulks), "{stats:?}");
    assert_eq!(
        stats
            .by_operation
            .get("IndividualEnrollment_CreateOrUpdate"),
        None
    );

    // The same serial again: the stored state, no new identity, no DPS request.
    let before = e.stats().requests;
    assert_eq!(
        scan(&p, None, "DSN-0003").await,
        vec!["ENROLLED DSN-0003 board-dsn-0003"]
    );
    assert_eq!(e.stats().requests, before);
    // The DICE bundle of each board was written for injection.
    assert!(paths.dice_out.join("DSN-0003").join("chain.pem").exists());

    // A bundle left by a crash between writing it and committing the row (no board row):
    // the board still gets a fresh identity; the orphan is set aside, not reused.
    let orphan = paths.dice_out.join("DSN-0999");
    std::fs::create_dir_all(&orphan).unwrap();
    std::fs::write(orphan.join("alias.pem"), b"left by a crash").unwrap();
    assert_eq!(
        scan(&p, None, "DSN-0999").await,
        vec![
            "QUEUED DSN-0999 board-dsn-0999".to_string(),
            "ENROLLED DSN-0999 board-dsn-0999".to_string()
        ]
    );
    assert_ne!(
        std::fs::read(orphan.join("alias.pem")).unwrap(),
        b"left by a crash".to_vec(),
        "a fresh bundle replaced the orphan"
    );
    let set_aside = std::fs::read_dir(&paths.dice_out)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("DSN-0999.orphaned-")
        })
        .count();
    assert_eq!(set_aside, 1);

    let snap = p.status().await;
    assert_eq!(snap.count("enrolled"), 13);
    assert_eq!(snap.queue_depth, 0);
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_scans_get_an_error_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let e = emu::start().await;
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
    let d = Daemon::start(load(&paths.config))
        .await
        .expect("daemon starts");
    let p = d.pipeline.clone();
    // Wait for the trigger to open the port.
    assert!(status_until(&p, Duration::from_secs(10), scanner_connected).await);

    scanner.send(b"\x01\x02\xff\xfe\r\n");
    let got = scanner.read_lines(1, Duration::from_secs(5));
    assert!(got.starts_with("ERROR - binary"), "{got:?}");
    scanner.send(format!("{}\n", "A".repeat(300)).as_bytes());
    let got = scanner.read_lines(1, Duration::from_secs(5));
    assert!(got.starts_with("ERROR - too-long"), "{got:?}");
    scanner.send(b"lower-case-serial\r");
    let got = scanner.read_lines(1, Duration::from_secs(5));
    assert!(got.starts_with("ERROR - bad-format"), "{got:?}");
    scanner.send(b"nosuchslot:SN-0001\r\n");
    let got = scanner.read_lines(1, Duration::from_secs(5));
    assert!(got.starts_with("ERROR SN-0001 unknown-slot"), "{got:?}");
    // Control-socket style scans with junk serials.
    assert!(scan(&p, None, "a b").await[0].starts_with("ERROR - bad-format"));
    assert!(scan(&p, None, &"X".repeat(500)).await[0].contains(" too-long "));
    assert!(
        st::rows(&paths.db).is_empty(),
        "nothing stored: {:?}",
        st::rows(&paths.db)
    );
    assert_eq!(e.stats().requests, 0);

    // Unplug the scanner: the daemon stays up; replug and a good scan works end to end.
    drop(scanner);
    link.unplug();
    assert_eq!(
        scan(&p, None, "DSN-0100").await.last().map(String::as_str),
        Some("ENROLLED DSN-0100 board-dsn-0100")
    );
    let mut scanner = Scanner::new();
    link.plug(&scanner);
    assert!(
        status_until(&p, Duration::from_secs(15), scanner_connected).await,
        "scanner reconnected"
    );
    scanner.send(b"DSN-0101\r\n");
    let got = scanner.read_lines(2, Duration::from_secs(10));
    assert!(
        line_with(&got, "QUEUED DSN-0101 board-dsn-0101").is_some(),
        "{got:?}"
    );
    assert!(
        line_with(&got, "ENROLLED DSN-0101 board-dsn-0101").is_some(),
        "{got:?}"
    );
    let snap = p.status().await;
    assert!(
        snap.last_errors.iter().any(|l| l.contains("binary")),
        "{:?}",
        snap.last_errors
    );
    d.shutdown().await;
}

fn read_ek(tcti: &str) -> dps_station::attest::tpm::EkInfo {
    use dps_station::attest::tpm::{read_ek, EkPolicy, EkRequest};
    read_ek(&EkRequest::new(tcti, EkPolicy::ReadOrCreate)).expect("read the board's EK")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_boards_swapped_on_one_slot_through_the_scanner() {
    use dps_station::dps::{AttestationMechanism, IndividualEnrollment};
    let dir = tempfile::tempdir().unwrap();
    let e = emu::start().await;
    let board_a = tpm::board(SwtpmVariant::EkPersistedWithCert);
    let port = board_a.port();
    let tcti = board_a.tcti();
    let ek_a = tokio::task::block_in_place(|| read_ek(&tcti));

    let scanner_link = PortLink::new();
    let mut scanner = Scanner::new();
    scanner_link.plug(&scanner);
    let mut spec = StationSpec::new(
        e.connection_string(),
        vec![SlotSpec::Tpm {
            name: "fixture-1".into(),
            tcti: tcti.clone(),
            registration_id: None,
        }],
    );
    spec.serial_port = Some(scanner_link.path.clone());
    let paths = st::write_station(dir.path(), &spec);
    let d = Daemon::start(load(&paths.config))
        .await
        .expect("daemon starts");
    let p = d.pipeline.clone();
    assert!(status_until(&p, Duration::from_secs(10), scanner_connected).await);

    // Board A on the fixture.
    scanner.send(b"SN-A001\r\n");
    let got = scanner.read_lines(2, Duration::from_secs(15));
    let hash_a = &ek_a.ek_hash;
    assert!(
        line_with(&got, &format!("QUEUED SN-A001 {hash_a}")).is_some(),
        "{got:?}"
    );
    assert!(
        line_with(&got, &format!("ENROLLED SN-A001 {hash_a}")).is_some(),
        "{got:?}"
    );

    // Swap: board B replaces A at the same TCTI.
    drop(board_a);
    let board_b = tokio::task::block_in_place(|| tpm::board_on_port(SwtpmVariant::NoEkCert, port));
    scanner.send(b"fixture-1:SN-B001\n");
    let got = scanner.read_lines(2, Duration::from_secs(15));
    let queued = line_with(&got, "QUEUED SN-B001 ")
        .unwrap_or_else(|| panic!("{got:?}"))
        .to_owned();
    let hash_b = queued.rsplit(' ').next().unwrap().to_owned();
    assert_ne!(&hash_b, hash_a, "each board has its own EK");
    assert!(
        line_with(&got, &format!("ENROLLED SN-B001 {hash_b}")).is_some(),
        "{got:?}"
    );
    let bulk_before = e
        .stats()
        .by_operation
        .get("IndividualEnrollment_RunBulkOperation")
        .copied();

    // Duplicate scan of B: re-read, same EK → stored state, no DPS request.
    scanner.send(b"SN-B001\r\n");
    let got = scanner.read_lines(1, Duration::from_secs(10));
    assert_eq!(got, format!("ENROLLED SN-B001 {hash_b}\r\n"));
    // A's serial scanned while B sits on the fixture: EK changed → alarm.
    scanner.send(b"SN-A001\r\n");
    let got = scanner.read_lines(1, Duration::from_secs(10));
    assert!(got.starts_with("CONFLICT SN-A001 ek-changed "), "{got:?}");
    // A new serial with B's EK: duplicate EK → conflict row.
    scanner.send(b"SN-C001\r\n");
    let got = scanner.read_lines(1, Duration::from_secs(10));
    assert!(got.starts_with("CONFLICT SN-C001 duplicate-ek "), "{got:?}");
    assert_eq!(
        e.stats()
            .by_operation
            .get("IndividualEnrollment_RunBulkOperation")
            .copied(),
        bulk_before,
        "no new bulk request for duplicates"
    );

    // Board D: DPS already holds its registration id with another EK (A's) → 409 → GET →
    // conflict, and the emulator's record is not touched.
    drop(board_b);
    let board_d =
        tokio::task::block_in_place(|| tpm::board_on_port(SwtpmVariant::NoPersistedEk, port));
    let ek_d = tokio::task::block_in_place(|| read_ek(&board_d.tcti()));
    let cs = dps_station::dps::ConnectionString::parse(&e.connection_string()).unwrap();
    let client = dps_station::dps::DpsClient::new(cs, Default::default()).unwrap();
    client
        .create_or_update_enrollment(
            &IndividualEnrollment::new(
                ek_d.ek_hash.clone(),
                AttestationMechanism::tpm(ek_a.ek_b64.clone()),
            ),
            None,
        )
        .await
        .expect("pre-create");
    scanner.send(b"SN-D001\r\n");
    let got = scanner.read_lines(2, Duration::from_secs(15));
    assert!(
        line_with(&got, &format!("QUEUED SN-D001 {}", ek_d.ek_hash)).is_some(),
        "{got:?}"
    );
    assert!(
        line_with(&got, "CONFLICT SN-D001 attestation-mismatch ").is_some(),
        "{got:?}"
    );
    let got = client.get_enrollment(&ek_d.ek_hash).await.unwrap();
    assert_eq!(
        got.attestation.tpm.unwrap().endorsement_key,
        ek_a.ek_b64,
        "DPS record untouched"
    );

    // Exactly once per board, per the emulator.
    let stats = e.stats();
    assert_eq!(stats.creates.get(hash_a.as_str()), Some(&1), "{stats:?}");
    assert_eq!(stats.creates.get(hash_b.as_str()), Some(&1), "{stats:?}");
    assert_eq!(
        stats.creates.get(ek_d.ek_hash.as_str()),
        Some(&1),
        "only the pre-create: {stats:?}"
    );
    let snap = p.status().await;
    assert_eq!(snap.count("enrolled"), 2, "{snap:?}");
    assert_eq!(snap.count("conflict"), 3, "{snap:?}");
    assert_eq!(snap.slots[0].boards_attested, 6);
    d.shutdown().await;
    drop(board_d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dps_down_for_a_while_then_back_the_queue_drains() {
    let dir = tempfile::tempdir().unwrap();
    let e = emu::start().await;
    e.set_faults("down-for=5s").unwrap();
    let paths = st::write_station(
        dir.path(),
        &StationSpec::new(
            e.connection_string(),
            vec![SlotSpec::Dice {
                name: "fixture-2".into(),
            }],
        ),
    );
    let d = Daemon::start(load(&paths.config))
        .await
        .expect("daemon starts");
    let p = d.pipeline.clone();
    let mut tasks = Vec::new();
    for i in 0..15 {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            scan(&p, None, &format!("OSN-{i:04}")).await
        }));
    }
    // While DPS is down the rows stay queued and DPS health shows the failures.
    assert!(
        status_until(&p, Duration::from_secs(4), |s| s.dps.consecutive_failures
            > 0
            && s.count("queued") == 15)
        .await,
        "failures recorded with every board queued: {:?}",
        p.status().await
    );
    let snap = p.status().await;
    assert_eq!(snap.count("enrolled"), 0, "{snap:?}");
    assert!(snap.dps.last_error.is_some());
    for (i, t) in tasks.into_iter().enumerate() {
        let replies = t.await.unwrap();
        assert_eq!(
            replies.last().cloned(),
            Some(format!("ENROLLED OSN-{i:04} board-osn-{i:04}"))
        );
    }
    let stats = e.stats();
    assert!(
        stats.creates.values().all(|&c| c == 1) && stats.creates.len() == 15,
        "{stats:?}"
    );
    let snap = p.status().await;
    assert_eq!(snap.dps.consecutive_failures, 0);
    assert!(snap.dps.last_ok_at.is_some());
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pacing_keeps_a_throttled_service_from_refusing_anything() {
    // DPS allows 30 operations a minute; the station is configured to that quota and
    // spaces its requests (2 s apart), so 4 bulk requests get no 429 at all.
    let dir = tempfile::tempdir().unwrap();
    let e = emu::start_with(dps_station::emulator::EmulatorOptions {
        ops_per_minute: Some(30),
        ..Default::default()
    })
    .await;
    let mut spec = StationSpec::new(
        e.connection_string(),
        vec![SlotSpec::Dice {
            name: "fixture-2".into(),
        }],
    );
    spec.ops_per_minute = 30;
    spec.max_delay = "20ms";
    let paths = st::write_station(dir.path(), &spec);
    let d = Daemon::start(load(&paths.config))
        .await
        .expect("daemon starts");
    let p = d.pipeline.clone();
    let t0 = std::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..40 {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            scan(&p, None, &format!("PSN-{i:04}")).await
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap().last().unwrap().starts_with("ENROLLED "));
    }
    let stats = e.stats();
    assert_eq!(stats.throttled, 0, "{stats:?}");
    assert_eq!(stats.creates.len(), 40);
    let bulks = stats
        .by_operation
        .get("IndividualEnrollment_RunBulkOperation")
        .copied()
        .unwrap_or(0);
    assert!(bulks >= 4, "{stats:?}");
    // n requests at 2 s spacing take at least 2·(n-1) s.
    assert!(
        t0.elapsed() >= Duration::from_secs(2 * (bulks - 1)),
        "paced: {:?}",
        t0.elapsed()
    );
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_storm_backs_off_honours_retry_after_and_drains_without_failures() {
    // The station thinks it may send 6000/min; DPS allows 3 per sliding minute. The 4th
    // request gets 429 + Retry-After; the rows stay queued and go once DPS admits them.
    let dir = tempfile::tempdir().unwrap();
    let e = emu::start_with(dps_station::emulator::EmulatorOptions {
        ops_per_minute: Some(3),
        ..Default::default()
    })
    .await;
    let mut spec = StationSpec::new(
        e.connection_string(),
        vec![SlotSpec::Dice {
            name: "fixture-2".into(),
        }],
    );
    spec.max_size = 2;
    spec.max_delay = "10ms";
    let paths = st::write_station(dir.path(), &spec);
    let d = Daemon::start(load(&paths.config))
        .await
        .expect("daemon starts");
    let p = d.pipeline.clone();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            scan_within(&p, None, &format!("RSN-{i:04}"), Duration::from_secs(80)).await
        }));
    }
    assert!(
        status_until(&p, Duration::from_secs(10), |s| s.dps.throttled_total > 0).await,
        "throttled"
    );
    let snap = p.status().await;
    assert!(snap.dps.backoff_until.is_some(), "{snap:?}");
    assert!(snap.count("queued") > 0);
    let throttled_at_first = e.stats().throttled;
    // Honouring Retry-After means no hammering during the wait.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        e.stats().throttled,
        throttled_at_first,
        "no retries before Retry-After"
    );
    // The storm ends (the quota is raised); the queue drains after the Retry-After.
    e.set_ops_per_minute(None);
    for t in tasks {
        let r = tokio::time::timeout(Duration::from_secs(75), t)
            .await
            .expect("drained")
            .unwrap();
        assert!(r.last().unwrap().starts_with("ENROLLED "), "{r:?}");
    }
    let stats = e.stats();
    assert_eq!(stats.creates.len(), 8);
    assert!(stats.creates.values().all(|&c| c == 1));
    assert_eq!(p.status().await.count("rejected"), 0);
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dice_group_enrollment_needs_the_group_and_sends_no_per_board_request() {
    use dps_station::dps::{AttestationMechanism, EnrollmentGroup};
    let dir = tempfile::tempdir().unwrap();
    let e = emu::start().await;
    let mut spec = StationSpec::new(
        e.connection_string(),
        vec![SlotSpec::Dice {
            name: "fixture-2".into(),
        }],
    );
    spec.dice_group = Some("line-a-dice".into());
    let paths = st::write_station(dir.path(), &spec);
    // The group does not exist yet: the daemon refuses to start, naming it.
    let err = Daemon::start(load(&paths.config))
        .await
        .err()
        .expect("refused without the group");
    assert!(err.to_string().contains("line-a-dice"), "{err}");

    let cs = dps_station::dps::ConnectionString::parse(&e.connection_string()).unwrap();
    let client = dps_station::dps::DpsClient::new(cs, Default::default()).unwrap();
    let ca_pem = std::fs::read_to_string(dir.path().join("ca/intermediate.pem")).unwrap();
    client
        .create_or_update_group(
            &EnrollmentGroup::new("line-a-dice", AttestationMechanism::x509_signing(ca_pem)),
            None,
        )
        .await
        .expect("create the group");
    let d = Daemon::start(load(&paths.config))
        .await
        .expect("daemon starts");
    let before = e.stats().requests;
    assert_eq!(
        scan(&d.pipeline, Some("fixture-2"), "GSN-0001").await,
        vec![
            "QUEUED GSN-0001 board-gsn-0001",
            "ENROLLED GSN-0001 board-gsn-0001"
        ]
    );
    assert_eq!(e.stats().requests, before, "no DPS call per board");
    assert!(paths.dice_out.join("GSN-0001").join("chain.pem").exists());
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partially_successful_bulk_result_rejects_only_the_bad_item() {
    use base64::Engine as _;
    use dps_station::station::store::{NewBoard, Source, Store};
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
    // Three rows journaled by an earlier run; the middle one carries an EK that is not a
    // TPM2B_PUBLIC, which DPS refuses.
    {
        let mut s = Store::open(&paths.db).unwrap();
        let mut boards = Vec::new();
        for (i, ek) in [vec![0u8, 3, 1, 2, 3], vec![9u8, 9, 9], vec![0u8, 2, 7, 7]]
            .into_iter()
            .enumerate()
        {
            let id = format!("row-{i}");
            let body = serde_json::json!({"registrationId": id, "attestation": {"type": "tpm",
                "tpm": {"endorsementKey": base64::engine::general_purpose::STANDARD.encode(&ek)}}});
            boards.push(NewBoard {
                serial: format!("BSN-{i}"),
                slot: "fixture-1".into(),
                registration_id: id.clone(),
                attestation: "tpm".into(),
                ek_hash: Some(format!("hash-{i}")),
                cert_sha256: None,
                ek_cert_issuer: None,
                enrollment_json: body.to_string(),
                source: Source::Control,
                enrolled_without_dps: false,
            });
        }
        assert!(s.admit_all(&boards).iter().all(|r| r.is_ok()));
    }
    let d = Daemon::start(load(&paths.config))
        .await
        .expect("daemon starts");
    assert!(st::poll(Duration::from_secs(10), || st::count(
        &paths.db, "queued"
    ) == 0));
    let rows = st::rows(&paths.db);
    assert_eq!(rows[0].1, "enrolled", "{rows:?}");
    assert_eq!(rows[1].1, "rejected", "{rows:?}");
    assert_eq!(rows[2].1, "enrolled", "{rows:?}");
    let stats = e.stats();
    assert_eq!(stats.creates.get("row-0"), Some(&1));
    assert_eq!(stats.creates.get("row-1"), None);
    // One bulk request; DPS answered per item (isSuccessful false, one error).
    let bulks = stats
        .by_operation
        .get("IndividualEnrollment_RunBulkOperation")
        .copied();
    assert_eq!(bulks, Some(1), "{stats:?}");
    let snap = d.pipeline.status().await;
    assert!(
        snap.last_errors
            .iter()
            .any(|l| l.contains("REJECTED BSN-1 400")),
        "{:?}",
        snap.last_errors
    );
    d.shutdown().await;
}
