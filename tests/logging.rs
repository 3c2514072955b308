//! Logging under systemd: with `JOURNAL_STREAM` set (stderr connected to journald), every
//! log line carries an sd-daemon `<N>` priority prefix matching its level, with no
//! terminal colour codes; without it, piped stderr carries no colour codes either.
use std::process::Command;

fn station() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dps-station"))
}

/// A connection string pointing at a port where nothing listens (connection refused, so
/// the client logs its retries), with a made-up key.
fn refused_connection_string(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("cs");
    std::fs::write(
        &path,
        "HostName=127.0.0.1:1;SharedAccessKeyName=provisioningserviceowner;\
         SharedAccessKey=MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
    )
    .unwrap();
    path
}

#[test]
fn journald_lines_carry_priority_prefixes_matching_their_level() {
    let dir = tempfile::tempdir().unwrap();
    let cs = refused_connection_string(dir.path());
    let out = station()
        .args([
            "-vv",
            "enrollment",
            "get",
            "board-1",
            "--retry-budget",
            "1s",
        ])
        .arg("--connection-string-file")
        .arg(&cs)
        .env("JOURNAL_STREAM", "8:1234")
        .env_remove("DPS_STATION_LOG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut levels = std::collections::BTreeSet::new();
    for line in stderr.lines().filter(|l| !l.is_empty()) {
        if line.starts_with("error: ") || line.starts_with("hint: ") {
            continue;
        }
        let prio = line
            .strip_prefix('<')
            .and_then(|r| r.split_once('>'))
            .map(|(p, _)| p)
            .unwrap_or_else(|| panic!("log line without a priority prefix: {line:?}"));
        assert!(
            ["3", "4", "6", "7"].contains(&prio),
            "unexpected priority in {line:?}"
        );
        levels.insert(prio.to_string());
        assert!(!line.contains('\u{1b}'), "colour codes in {line:?}");
    }
    // -vv shows debug (7) request lines; the user-facing error stays one plain line.
    assert!(levels.contains("7"), "{stderr}");
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with("error: ")).count(),
        1,
        "{stderr}"
    );
}

#[test]
fn piped_stderr_has_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let cs = refused_connection_string(dir.path());
    let out = station()
        .args([
            "-vv",
            "enrollment",
            "get",
            "board-1",
            "--retry-budget",
            "1s",
        ])
        .arg("--connection-string-file")
        .arg(&cs)
        .env_remove("JOURNAL_STREAM")
        .env_remove("DPS_STATION_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.lines().count() > 1, "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "{stderr}");
    assert!(!stderr.contains("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY"));
}
