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
    // `status` shows the port gone and being reopened.
    assert!(
        status_until(&p, Duration::from_secs(10), |s| {
            let t = s.trigger.clone().unwrap_or_default();
            t["connected"] == false
                && t["reopen_attempts"].as_u64().unwrap_or(0) >= 1
                && t["last_error"].is_string()
        })
        .await,
        "{:?}",
        p.status().await.trigger
    );
    assert!(p.status().await.render_text().contains("connected=false"));
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

    // Board A removed, nothing on the fixture yet: the TPM does not answer → ERROR
    // tpm-error, nothing stored, the daemon carries on.
    drop(board_a);
    let rows_before = st::rows(&paths.db).len();
    scanner.send(b"SN-X001\r\n");
    let got = scanner.read_lines(1, Duration::from_secs(15));
    assert!(got.starts_with("ERROR SN-X001 tpm-error "), "{got:?}");
    assert_eq!(st::rows(&paths.db).len(), rows_before, "nothing stored");

    // Swap: board B replaces A at the same TCTI. DPS already holds B's enrollment with B's
    // own EK (e.g. made by hand): the create answers 409201, the GET shows the same
    // attestation → ENROLLED, and DPS's record is not created twice.
    let board_b = tokio::task::block_in_place(|| tpm::board_on_port(SwtpmVariant::NoEkCert, port));
    let ek_b = tokio::task::block_in_place(|| read_ek(&board_b.tcti()));
    let cs = dps_station::dps::ConnectionString::parse(&e.connection_string()).unwrap();
    let client = dps_station::dps::DpsClient::new(cs, Default::default()).unwrap();
    client
        .create_or_update_enrollment(
            &IndividualEnrollment::new(
                ek_b.ek_hash.clone(),
                AttestationMechanism::tpm(ek_b.ek_b64.clone()),
            ),
            None,
        )
        .await
        .expect("pre-create B");
    let gets_before = e
        .stats()
        .by_operation
        .get("IndividualEnrollment_Get")
        .copied()
        .unwrap_or(0);
    scanner.send(b"fixture-1:SN-B001\n");
    let got = scanner.read_lines(2, Duration::from_secs(15));
    let queued = line_with(&got, "QUEUED SN-B001 ")
        .unwrap_or_else(|| panic!("{got:?}"))
        .to_owned();
    let hash_b = queued.rsplit(' ').next().unwrap().to_owned();
    assert_ne!(&hash_b, hash_a, "each board has its own EK");
    assert_eq!(hash_b, ek_b.ek_hash);
    assert!(
        line_with(&got, &format!("ENROLLED SN-B001 {hash_b}")).is_some(),
        "{got:?}"
    );
    assert_eq!(
        e.stats()
            .by_operation
            .get("IndividualEnrollment_Get")
            .copied(),
        Some(gets_before + 1),
        "the 409 was resolved by one GET"
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
    assert_eq!(
        stats.creates.get(hash_b.as_str()),
        Some(&1),
        "only the pre-create: {stats:?}"
    );
    assert_eq!(
        stats.creates.get(ek_d.ek_hash.as_str()),
        Some(&1),
        "only the pre-create: {stats:?}"
    );
    let snap = p.status().await;
    assert_eq!(snap.count("enrolled"), 2, "{snap:?}");
    assert_eq!(snap.count("conflict"), 3, "{snap:?}");
    assert_eq!(snap.slots[0].boards_attested, 6);
    assert_eq!(snap.slots[0].errors, 1);

    // /metrics shows what happened, from the real pipeline.
    let http = d.http_addr.expect("http bound");
    let body = reqwest::get(format!("http://{http}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for want in [
        "dps_station_boards{state=\"enrolled\"} 2",
        "dps_station_boards{state=\"conflict\"} 3",
        "dps_station_queue_depth 0",
        "dps_station_tpm_errors_total{slot=\"fixture-1\"} 1",
        "dps_station_scan_errors_total{reason=\"tpm-error\"} 1",
        "dps_station_dps_throttled_total 0",
    ] {
        assert!(body.contains(want), "{want} missing:\n{body}");
    }
    let bulks: f64 = body
        .lines()
        .find_map(|l| l.strip_prefix("dps_station_bulk_request_duration_seconds_count "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(bulks >= 3.0, "{body}");
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
        // Backoff grows while DPS is down (full jitter, capped at 30 s), so the first
        // attempt after the outage may come up to the cap later.
        tasks.push(tokio::spawn(async move {
            scan_within(&p, None, &format!("OSN-{i:04}"), Duration::from_secs(75)).await
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
    // DPS allows 120 operations a minute (a token every 0.5 s, bursts of 12); the station
    // is configured to that quota and spaces its requests ≥ 0.5 s apart: no 429 at all.
    let dir = tempfile::tempdir().unwrap();
    let e = emu::start_with(dps_station::emulator::EmulatorOptions {
        ops_per_minute: Some(120),
        ..Default::default()
    })
    .await;
    let mut spec = StationSpec::new(
        e.connection_string(),
        vec![SlotSpec::Dice {
            name: "fixture-2".into(),
        }],
    );
    spec.ops_per_minute = 120;
    spec.max_size = 5;
    spec.max_delay = "20ms";
    let paths = st::write_station(dir.path(), &spec);
    let d = Daemon::start(load(&paths.config))
        .await
        .expect("daemon starts");
    let p = d.pipeline.clone();
    let t0 = std::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            scan(&p, None, &format!("PSN-{i:04}")).await
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap().last().unwrap().starts_with("ENROLLED "));
    }
    let elapsed = t0.elapsed();
    let stats = e.stats();
    assert_eq!(stats.throttled, 0, "{stats:?}");
    assert_eq!(stats.creates.len(), 20);
    let bulks = stats
        .by_operation
        .get("IndividualEnrollment_RunBulkOperation")
        .copied()
        .unwrap_or(0);
    assert!(bulks >= 4, "{stats:?}");
    // n requests at 0.5 s spacing take at least 0.5·(n-1) s.
    assert!(
        elapsed >= Duration::from_millis(500 * (bulks - 1)),
        "paced: {elapsed:?} for {bulks} bulk requests"
    );
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_storm_backs_off_honours_retry_after_and_drains_without_failures() {
    // The station thinks it may send 60000/min; DPS allows 120/min (bursts of 12, then a
    // token every 0.5 s, Retry-After 1 s). 16 bulk requests: the ones past the burst get
    // 429 + Retry-After; the rows stay queued and go once DPS admits them.
    let dir = tempfile::tempdir().unwrap();
    let e = emu::start_with(dps_station::emulator::EmulatorOptions {
        ops_per_minute: Some(120),
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
    let t0 = std::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..32 {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            scan_within(&p, None, &format!("RSN-{i:04}"), Duration::from_secs(40)).await
        }));
    }
    assert!(
        status_until(&p, Duration::from_secs(10), |s| s.dps.throttled_total > 0
            && s.dps.backoff_until.is_some())
        .await,
        "throttled, and backing off"
    );
    assert!(p.status().await.count("queued") > 0);
    // Honouring Retry-After (1 s) means no request at all while it runs: let requests
    // already in flight land, then watch the emulator for most of the second.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (requests, throttled) = (e.stats().requests, e.stats().throttled);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        e.stats().requests,
        requests,
        "no request before Retry-After"
    );
    assert_eq!(e.stats().throttled, throttled);
    // The queue drains through the quota.
    for t in tasks {
        let r = tokio::time::timeout(Duration::from_secs(40), t)
            .await
            .expect("drained")
            .unwrap();
        assert!(r.last().unwrap().starts_with("ENROLLED "), "{r:?}");
    }
    let elapsed = t0.elapsed();
    let stats = e.stats();
    assert_eq!(stats.creates.len(), 32);
    assert!(stats.creates.values().all(|&c| c == 1), "{stats:?}");
    assert!(stats.throttled > 0);
    assert_eq!(p.status().await.count("rejected"), 0);
    // At least 4 bulks beyond the burst at 2 per second.
    assert!(elapsed >= Duration::from_millis(1500), "{elapsed:?}");
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

/// Three rows journaled by an earlier run (valid TPM enrollments, ids `split-0..2`).
fn journal_three(db: &std::path::Path) {
    use base64::Engine as _;
    use dps_station::station::store::{NewBoard, Source, Store};
    let mut s = Store::open(db).unwrap();
    let boards: Vec<NewBoard> = (0..3)
        .map(|i| {
            let id = format!("split-{i}");
            let ek = base64::engine::general_purpose::STANDARD.encode([0u8, 3, 1, 2, i]);
            let body = serde_json::json!({"registrationId": id,
                "attestation": {"type": "tpm", "tpm": {"endorsementKey": ek}}});
            NewBoard {
                serial: format!("SPL-{i}"),
                slot: "fixture-2".into(),
                registration_id: id,
                attestation: "tpm".into(),
                ek_hash: Some(format!("split-hash-{i}")),
                cert_sha256: None,
                ek_cert_issuer: None,
                enrollment_json: body.to_string(),
                source: Source::Control,
                enrolled_without_dps: false,
            }
        })
        .collect();
    assert!(s.admit_all(&boards).iter().all(|r| r.is_ok()));
}

/// A bulk create refused as a whole with HTTP 400 (the emulator answers per item, so the
/// refusal is injected: `status=400`): the batch is re-sent one row per request, and each
/// lone row's 400 is that row's answer (rejected, with DPS's errorCode). Later batches are
/// whole again. A refusal that says nothing about the body (404 on the bulk path) leaves
/// the rows queued instead of rejecting them. Finally a batch with ONE item DPS cannot take
/// (`bad-id`: the whole request refused with 400): only that item ends rejected, every other
/// item of the batch is enrolled exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_refused_as_a_whole_is_resent_row_by_row() {
    let dir = tempfile::tempdir().unwrap();
    let e = emu::start().await;
    let mut spec = StationSpec::new(
        e.connection_string(),
        vec![SlotSpec::Dice {
            name: "fixture-2".into(),
        }],
    );
    // Full batches of three go at once; a lone row waits 2 s.
    spec.max_size = 3;
    spec.max_delay = "2s";
    let paths = st::write_station(dir.path(), &spec);
    journal_three(&paths.db);
    e.set_faults("error-rate=1,status=400").unwrap();
    let d = Daemon::start(load(&paths.config))
        .await
        .expect("daemon starts");
    assert!(st::poll(Duration::from_secs(10), || st::count(
        &paths.db, "rejected"
    ) == 3));
    // One request for the batch, then one per row: 4, and nothing created.
    let stats = e.stats();
    assert_eq!(stats.requests, 4, "{stats:?}");
    assert!(stats.creates.is_empty());
    let codes: Vec<Option<i64>> = {
        let c = rusqlite::Connection::open(&paths.db).unwrap();
        let mut q = c
            .prepare("SELECT dps_error_code FROM boards ORDER BY id")
            .unwrap();
        q.query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    assert_eq!(codes, vec![Some(400001); 3]);

    // A 404 for the bulk path is no answer about the boards: they stay queued.
    e.set_faults("error-rate=1,status=404").unwrap();
    let before = e.stats().requests;
    let mut rx = d
        .pipeline
        .submit(ScanRequest {
            slot: None,
            serial: "SPL-404".into(),
        })
        .await;
    assert_eq!(
        rx.recv().await.map(|r| r.to_string()).as_deref(),
        Some("QUEUED SPL-404 board-spl-404")
    );
    assert!(
        status_until(&d.pipeline, Duration::from_secs(10), |s| {
            s.dps.consecutive_failures >= 1
        })
        .await
    );
    assert!(e.stats().requests > before);
    assert_eq!(d.pipeline.status().await.count("rejected"), 3);
    assert_eq!(d.pipeline.status().await.count("queued"), 1);

    // Healthy again: the queued board goes, and new boards share one bulk request.
    e.set_faults("").unwrap();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(40), rx.recv())
            .await
            .expect("the queued board is answered once DPS is back")
            .map(|r| r.to_string())
            .as_deref(),
        Some("ENROLLED SPL-404 board-spl-404")
    );
    let bulks_before = e
        .stats()
        .by_operation
        .get("IndividualEnrollment_RunBulkOperation")
        .copied()
        .unwrap_or(0);
    let p = d.pipeline.clone();
    let (a, b, c) = tokio::join!(
        scan(&p, None, "SPL-A"),
        scan(&p, None, "SPL-B"),
        scan(&p, None, "SPL-C")
    );
    for r in [a, b, c] {
        assert!(r.last().unwrap().starts_with("ENROLLED "), "{r:?}");
    }
    let bulks = e
        .stats()
        .by_operation
        .get("IndividualEnrollment_RunBulkOperation")
        .copied()
        .unwrap_or(0);
    assert_eq!(bulks - bulks_before, 1, "three scans, one bulk request");

    // One bad item in a full batch: the batch is refused as a whole, split, and only the
    // bad item is rejected; the others are created once each.
    e.set_faults("bad-id=board-spl-y").unwrap();
    let before = e.stats();
    let (x, y, z) = tokio::join!(
        scan(&p, None, "SPL-X"),
        scan(&p, None, "SPL-Y"),
        scan(&p, None, "SPL-Z")
    );
    assert_eq!(x.last().unwrap(), "ENROLLED SPL-X board-spl-x", "{x:?}");
    assert_eq!(z.last().unwrap(), "ENROLLED SPL-Z board-spl-z", "{z:?}");
    let y_final = y.last().unwrap();
    assert!(
        y_final.starts_with("REJECTED SPL-Y 400004 "),
        "only the bad item is rejected: {y:?}"
    );
    let after = e.stats();
    let bulk_op = |s: &dps_station::emulator::Stats| {
        s.by_operation
            .get("IndividualEnrollment_RunBulkOperation")
            .copied()
            .unwrap_or(0)
    };
    assert_eq!(
        bulk_op(&after) - bulk_op(&before),
        4,
        "the refused batch, then one request per row: {after:?}"
    );
    assert_eq!(after.creates.get("board-spl-x"), Some(&1));
    assert_eq!(after.creates.get("board-spl-z"), Some(&1));
    assert_eq!(after.creates.get("board-spl-y"), None);
    let by_serial: std::collections::HashMap<String, String> = st::rows(&paths.db)
        .into_iter()
        .map(|(serial, state, _)| (serial, state))
        .collect();
    assert_eq!(by_serial["SPL-X"], "enrolled");
    assert_eq!(by_serial["SPL-Y"], "rejected");
    assert_eq!(by_serial["SPL-Z"], "enrolled");
    d.shutdown().await;
}

/// A board DPS rejected stays rejected: a rescan answers the stored REJECTED and sends
/// nothing. Once the cause is removed the operator requeues it: the reply goes to the
/// control caller AND back to the scanner it came from, and DPS creates it exactly once.
/// Requeue refuses unknown serials and rows that are not rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_board_requeued_by_the_operator_is_enrolled_exactly_once() {
    use dps_station::station::pipeline::RequeueError;
    let dir = tempfile::tempdir().unwrap();
    let e = emu::start().await;
    let scanner_link = PortLink::new();
    let mut scanner = Scanner::new();
    scanner_link.plug(&scanner);
    let mut spec = StationSpec::new(
        e.connection_string(),
        vec![SlotSpec::Dice {
            name: "fixture-2".into(),
        }],
    );
    spec.serial_port = Some(scanner_link.path.clone());
    let paths = st::write_station(dir.path(), &spec);
    let d = Daemon::start(load(&paths.config))
        .await
        .expect("daemon starts");
    let p = d.pipeline.clone();
    assert!(status_until(&p, Duration::from_secs(10), scanner_connected).await);

    // DPS refuses the board (the emulator's bad-id fault: a 400 for its request).
    e.set_faults("bad-id=board-rq-0001").unwrap();
    scanner.send(b"RQ-0001\r\n");
    let got = tokio::task::block_in_place(|| scanner.read_lines(2, Duration::from_secs(15)));
    assert!(
        line_with(&got, "QUEUED RQ-0001 board-rq-0001").is_some(),
        "{got:?}"
    );
    assert!(
        line_with(&got, "REJECTED RQ-0001 400004 ").is_some(),
        "{got:?}"
    );
    // A rescan answers the stored REJECTED; nothing is sent.
    let requests = e.stats().requests;
    scanner.send(b"RQ-0001\r\n");
    let got = tokio::task::block_in_place(|| scanner.read_lines(1, Duration::from_secs(15)));
    assert!(got.starts_with("REJECTED RQ-0001 400004 "), "{got:?}");
    assert_eq!(e.stats().requests, requests);

    // Refusals: unknown serial; (below) a row that is not rejected.
    assert!(matches!(
        p.requeue("RQ-NOPE", false).await,
        Err(RequeueError::UnknownSerial(_))
    ));

    // The cause is removed; the operator requeues the board.
    e.set_faults("").unwrap();
    let mut rx = p.requeue("RQ-0001", false).await.expect("requeued");
    let mut control = Vec::new();
    while let Ok(Some(r)) = tokio::time::timeout(Duration::from_secs(15), rx.recv()).await {
        control.push(r.to_string());
    }
    assert_eq!(
        control,
        vec![
            "QUEUED RQ-0001 board-rq-0001",
            "ENROLLED RQ-0001 board-rq-0001"
        ]
    );
    let got = tokio::task::block_in_place(|| scanner.read_lines(2, Duration::from_secs(15)));
    assert!(
        line_with(&got, "QUEUED RQ-0001 board-rq-0001").is_some(),
        "the scanner hears the requeue: {got:?}"
    );
    assert!(
        line_with(&got, "ENROLLED RQ-0001 board-rq-0001").is_some(),
        "{got:?}"
    );
    assert_eq!(e.stats().creates.get("board-rq-0001"), Some(&1));
    assert_eq!(st::rows(&paths.db)[0].1, "enrolled");
    match p.requeue("RQ-0001", true).await {
        Err(RequeueError::Refused { state, .. }) => assert_eq!(state, "enrolled"),
        other => panic!("an enrolled board is not requeued: {other:?}"),
    }
    // The audit trail names the operator's requeue; the error code is gone.
    {
        let c = rusqlite::Connection::open(&paths.db).unwrap();
        let (code, kinds): (Option<i64>, String) = c
            .query_row(
                "SELECT b.dps_error_code, group_concat(e.kind || '=' || coalesce(e.detail, ''), '|') \
                 FROM boards b JOIN events e ON e.board_id = b.id WHERE b.serial = 'RQ-0001'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(code, None);
        assert!(
            kinds.contains("requeued=requeued by operator (was rejected 400004)"),
            "{kinds}"
        );
    }
    // A rescan now answers ENROLLED, still without a DPS call.
    let requests = e.stats().requests;
    scanner.send(b"RQ-0001\r\n");
    let got = tokio::task::block_in_place(|| scanner.read_lines(1, Duration::from_secs(15)));
    assert!(got.starts_with("ENROLLED RQ-0001 "), "{got:?}");
    assert_eq!(e.stats().requests, requests);
    assert_eq!(e.stats().creates.get("board-rq-0001"), Some(&1));
    d.shutdown().await;
}

/// `control drain`: intake stops (a scan gets `ERROR … draining`), the queue is sent at once
/// without the linger, and the status goes `draining` → `drained`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_stops_intake_sends_the_queue_and_reports_drained() {
    let dir = tempfile::tempdir().unwrap();
    let e = emu::start().await;
    let mut spec = StationSpec::new(
        e.connection_string(),
        vec![SlotSpec::Dice {
            name: "fixture-2".into(),
        }],
    );
    // A linger far longer than the test: only the drain can send a partial batch.
    spec.max_delay = "1h";
    let paths = st::write_station(dir.path(), &spec);
    let d = Daemon::start(load(&paths.config))
        .await
        .expect("daemon starts");
    let mut rx = d
        .pipeline
        .submit(ScanRequest {
            slot: None,
            serial: "DRN-0001".into(),
        })
        .await;
    assert_eq!(
        rx.recv().await.map(|r| r.to_string()).as_deref(),
        Some("QUEUED DRN-0001 board-drn-0001")
    );
    let snap = d.pipeline.status().await;
    assert_eq!((snap.mode(), snap.queue_depth), ("running", 1));
    d.pipeline.drain();
    let snap = d.pipeline.status().await;
    assert!(snap.draining);
    assert_eq!(
        scan(&d.pipeline, None, "DRN-0002").await,
        vec!["ERROR DRN-0002 draining the station is draining and takes no scans"]
    );
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("sent without waiting for max_delay")
            .map(|r| r.to_string())
            .as_deref(),
        Some("ENROLLED DRN-0001 board-drn-0001")
    );
    tokio::time::timeout(Duration::from_secs(5), d.pipeline.drained())
        .await
        .expect("drained");
    let snap = d.pipeline.status().await;
    assert!(snap.drained && snap.draining, "{snap:?}");
    assert_eq!(snap.mode(), "drained");
    assert!(
        snap.render_text().contains("drained since"),
        "{}",
        snap.render_text()
    );
    assert_eq!(snap.count("enrolled"), 1);
    d.shutdown().await;
}
