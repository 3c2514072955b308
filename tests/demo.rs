//! `dps-station demo` end to end: the in-process emulator, three swtpm boards, a DICE slot
//! and a pty scanner driving a real `dps-station run`. The demo must exit 0 and show every
//! reply the story promises, the board table and a clean daemon stop.
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn demo_enrolls_every_board_and_handles_duplicate_bad_and_throttled_scans() {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_dps-station"))
        .arg("demo")
        .env_remove("DPS_STATION_CONFIG")
        .env_remove("DPS_CONNECTION_STRING")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "demo failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    let replies: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("reply ← "))
        .collect();
    let has = |prefix: &str| replies.iter().any(|r| r.starts_with(prefix));
    // Three TPM boards, one swapped onto fixture-1 afterwards, and three DICE boards.
    for serial in [
        "TPM-0001",
        "TPM-0002",
        "TPM-0003",
        "TPM-0004",
        "DICE-0001",
        "DICE-0002",
        "DICE-0003",
    ] {
        assert!(
            has(&format!("QUEUED {serial} ")),
            "no QUEUED for {serial}:\n{stdout}"
        );
        assert!(
            has(&format!("ENROLLED {serial} ")),
            "no ENROLLED for {serial}:\n{stdout}"
        );
    }
    // The duplicate scan is answered again, from the journal.
    let again = replies
        .iter()
        .filter(|r| r.starts_with("ENROLLED TPM-0001 "))
        .count();
    assert_eq!(again, 2, "{stdout}");
    // The bad scan: one ERROR with no serial.
    assert!(has("ERROR - "), "{stdout}");
    // TPM registration ids are the 52-char EK hash; DICE ones come from the slot template.
    let tpm_reg = replies
        .iter()
        .find(|r| r.starts_with("ENROLLED TPM-0002 "))
        .and_then(|r| r.split(' ').nth(2))
        .unwrap_or("");
    assert_eq!(tpm_reg.len(), 52, "{tpm_reg}");
    assert!(has("ENROLLED DICE-0001 board-dice-0001"), "{stdout}");
    // The 429 storm was seen by the daemon and ridden out.
    assert!(stdout.contains("the daemon saw"), "{stdout}");
    assert!(stdout.contains("each exactly once: true"), "{stdout}");
    // The final table, the operator page and the clean stop were shown.
    assert!(
        stdout.contains("operator page: http://127.0.0.1:"),
        "{stdout}"
    );
    assert!(stdout.contains("serial") && stdout.contains("registration_id"));
    assert!(stdout.contains("daemon stopped cleanly"), "{stdout}");
    assert!(stdout.contains("demo: OK"), "{stdout}");
    // Nothing secret on the terminal.
    assert!(!stdout.contains("SharedAccessKey="), "{stdout}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "demo took {:?}",
        started.elapsed()
    );
}
