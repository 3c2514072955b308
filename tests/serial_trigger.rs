//! The serial trigger against a real pty pair (DESIGN.md §5): framing with every terminator,
//! refusals that are ready to answer `ERROR`, replies ending `\r\n`, and a scanner that is
//! unplugged and plugged back in.
mod common;

use std::time::Duration;

use common::pty::{wait_until, PortLink, Scanner};
use dps_station::config::{SerialConfig, DEFAULT_LINE_PATTERN};
use dps_station::station::scanline::Scan;
use dps_station::station::trigger::{SerialTrigger, TriggerEvent};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(5);

fn cfg(link: &PortLink, reply: bool) -> SerialConfig {
    SerialConfig {
        port: link.path.clone(),
        baud: 9600,
        line_pattern: regex::Regex::new(DEFAULT_LINE_PATTERN).unwrap(),
        reply,
    }
}

/// A trigger reading a fresh pty behind a link, connected and ready.
fn start(
    reply: bool,
) -> (
    PortLink,
    Scanner,
    SerialTrigger,
    mpsc::Receiver<TriggerEvent>,
) {
    let link = PortLink::new();
    let scanner = Scanner::new();
    link.plug(&scanner);
    let (tx, rx) = mpsc::channel(64);
    let trigger = SerialTrigger::spawn(cfg(&link, reply), tx);
    assert!(
        wait_until(WAIT, || trigger.status().connected),
        "never connected: {:?}",
        trigger.status()
    );
    (link, scanner, trigger, rx)
}

async fn next(rx: &mut mpsc::Receiver<TriggerEvent>) -> TriggerEvent {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("an event within 5 s")
        .expect("channel open")
}

fn scan(slot: Option<&str>, serial: &str) -> TriggerEvent {
    TriggerEvent::Scan(Scan {
        slot: slot.map(str::to_string),
        serial: serial.to_string(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scans_are_framed_by_every_terminator_even_when_split() {
    let (_link, mut scanner, trigger, mut rx) = start(true);
    scanner.send(b"AB12\r");
    scanner.send(b"CD34\n");
    scanner.send(b"EF56\r");
    // The \n of this \r\n arrives in the next write: still one terminator.
    tokio::time::sleep(Duration::from_millis(120)).await;
    scanner.send(b"\nfixture-2:GH");
    scanner.send(b"78\r\n\r\n\n");
    assert_eq!(next(&mut rx).await, scan(None, "AB12"));
    assert_eq!(next(&mut rx).await, scan(None, "CD34"));
    assert_eq!(next(&mut rx).await, scan(None, "EF56"));
    assert_eq!(next(&mut rx).await, scan(Some("fixture-2"), "GH78"));
    // Nothing else: the empty lines were ignored.
    assert!(tokio::time::timeout(Duration::from_millis(300), rx.recv())
        .await
        .is_err());
    let st = trigger.status();
    assert_eq!((st.lines, st.bad_lines), (4, 0), "{st:?}");
    trigger.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_lines_become_error_ready_refusals_and_the_reader_survives() {
    let (_link, mut scanner, trigger, mut rx) = start(true);
    scanner.send(b"AB\x00\xffCD\r\n");
    let long = vec![b'A'; 300];
    scanner.send(&long[..150]);
    scanner.send(&long[150..]);
    scanner.send(b"\r\nlower-case-serial\r\nGOOD-1\r\n");
    let mut reasons = Vec::new();
    for _ in 0..3 {
        match next(&mut rx).await {
            TriggerEvent::Bad(e) => {
                assert!(e.serial.is_none());
                let reply = e.reply_line();
                assert!(
                    reply.starts_with(&format!("ERROR - {} ", e.reason)),
                    "{reply}"
                );
                assert!(reply.bytes().all(|b| (0x20..=0x7e).contains(&b)), "{reply}");
                reasons.push(e.reason);
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    assert_eq!(reasons, ["binary", "too-long", "bad-format"]);
    assert_eq!(next(&mut rx).await, scan(None, "GOOD-1"));
    let st = trigger.status();
    assert_eq!((st.lines, st.bad_lines), (4, 3), "{st:?}");
    assert!(st.connected);

    // Answer the refusal the way the station does: it arrives with \r\n.
    trigger.reply("ERROR - binary non-printable byte 0x00 at offset 2");
    let got = scanner.read_lines(1, WAIT);
    assert_eq!(
        got,
        "ERROR - binary non-printable byte 0x00 at offset 2\r\n"
    );
    trigger.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_arrive_on_the_scanner_side_with_crlf() {
    let (_link, mut scanner, trigger, _rx) = start(true);
    trigger.reply("QUEUED SN-0001 y5wivfciikcievvnsbpkhzcahwm4chuzx6v4hnqnlqfs3fjf6rxa");
    trigger.reply("ENROLLED SN-0001 y5wivfciikcievvnsbpkhzcahwm4chuzx6v4hnqnlqfs3fjf6rxa");
    // A stray line break inside a reply cannot split it into two protocol lines.
    trigger.reply("CONFLICT SN-0002 ek-changed a\r\nb");
    let got = scanner.read_lines(3, WAIT);
    assert_eq!(
        got,
        "QUEUED SN-0001 y5wivfciikcievvnsbpkhzcahwm4chuzx6v4hnqnlqfs3fjf6rxa\r\n\
         ENROLLED SN-0001 y5wivfciikcievvnsbpkhzcahwm4chuzx6v4hnqnlqfs3fjf6rxa\r\n\
         CONFLICT SN-0002 ek-changed ab\r\n"
    );
    assert!(wait_until(WAIT, || trigger.status().replies == 3));
    trigger.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_reply_false_nothing_is_written_back() {
    let (_link, mut scanner, trigger, mut rx) = start(false);
    scanner.send(b"AB12\r\n");
    assert_eq!(next(&mut rx).await, scan(None, "AB12"));
    trigger.reply("QUEUED AB12 x");
    assert_eq!(scanner.read_lines(1, Duration::from_millis(400)), "");
    assert_eq!(trigger.status().replies, 0);
    trigger.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unplugged_scanner_is_reopened_when_it_comes_back() {
    let (link, mut scanner, trigger, mut rx) = start(true);
    scanner.send(b"BEFORE-1\r\n");
    assert_eq!(next(&mut rx).await, scan(None, "BEFORE-1"));

    // Unplug: the device goes away (master closed, node gone).
    drop(scanner);
    link.unplug();
    assert!(
        wait_until(WAIT, || !trigger.status().connected),
        "{:?}",
        trigger.status()
    );
    let st = trigger.status();
    assert!(st.last_error.is_some(), "{st:?}");
    // It keeps trying while the port is gone.
    assert!(
        wait_until(WAIT, || trigger.status().reopen_attempts >= 2),
        "{:?}",
        trigger.status()
    );
    // Replies while unplugged are dropped, not queued forever, and never block.
    trigger.reply("QUEUED X y");

    // Replug: a new device behind the same name.
    let mut scanner = Scanner::new();
    link.plug(&scanner);
    assert!(
        wait_until(Duration::from_secs(8), || trigger.status().connected),
        "{:?}",
        trigger.status()
    );
    let st = trigger.status();
    assert_eq!(st.connects, 2, "{st:?}");
    assert!(st.port.ends_with("ttyScanner"), "{st:?}");
    scanner.send(b"AFTER-1\r\n");
    assert_eq!(next(&mut rx).await, scan(None, "AFTER-1"));
    trigger.reply("QUEUED AFTER-1 board-after-1");
    assert_eq!(
        scanner.read_lines(1, WAIT),
        "QUEUED AFTER-1 board-after-1\r\n"
    );
    trigger.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_that_is_missing_at_start_is_retried_with_backoff() {
    let link = PortLink::new();
    let (tx, mut rx) = mpsc::channel(8);
    let trigger = SerialTrigger::spawn(cfg(&link, true), tx);
    assert!(wait_until(WAIT, || trigger.status().reopen_attempts >= 2));
    let st = trigger.status();
    assert!(!st.connected);
    assert!(
        st.last_error
            .as_deref()
            .unwrap_or("")
            .contains("ttyScanner"),
        "{st:?}"
    );
    let mut scanner = Scanner::new();
    link.plug(&scanner);
    assert!(wait_until(Duration::from_secs(8), || trigger
        .status()
        .connected));
    scanner.send(b"LATE-1\n");
    assert_eq!(next(&mut rx).await, scan(None, "LATE-1"));
    trigger.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reader_stops_when_the_consumer_goes_away() {
    let (_link, mut scanner, trigger, rx) = start(true);
    drop(rx);
    scanner.send(b"AB12\r\n");
    assert!(wait_until(WAIT, || !trigger.status().connected));
    trigger.shutdown();
}
