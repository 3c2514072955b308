//! The serial scanner trigger (DESIGN.md §5): a std thread owns the port (through the
//! `serialport` crate, 8N1, no flow control, short read timeout), frames lines with
//! [`Framer`], parses them with the configured pattern and sends [`TriggerEvent`]s to the
//! pipeline. A second thread writes replies, so a slow port never blocks async code.
//!
//! A port that vanishes (read error, EOF, hang-up) or cannot be opened is reopened with
//! backoff, 100 ms doubling to 5 s; [`SerialTrigger::status`] shows it. The trigger does not
//! reply on its own: the consumer answers a [`TriggerEvent::Bad`] with
//! [`LineError::reply_line`] through [`SerialTrigger::reply`].
//!
//! Nothing here may panic on any input, and no reader or writer may outlive the trigger.
use std::io::{ErrorKind, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use serialport::SerialPort;
use tokio::sync::mpsc::Sender;

use super::scanline::{parse, Framer, LineError, Scan};
use crate::config::SerialConfig;

/// How long one read waits before the reader checks whether it should stop.
const READ_TIMEOUT: Duration = Duration::from_millis(50);
/// Bound on one reply write.
const WRITE_TIMEOUT: Duration = Duration::from_millis(500);
/// First reopen delay; doubles up to [`BACKOFF_MAX`].
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Replies waiting for the writer; more are dropped (and counted) rather than blocking.
const REPLY_QUEUE: usize = 1024;

/// What the scanner sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TriggerEvent {
    /// A line that matched `line_pattern`.
    Scan(Scan),
    /// A line that was refused (binary, too long, not matching); reply `ERROR`.
    Bad(LineError),
}

/// The port as `status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PortStatus {
    pub port: String,
    pub connected: bool,
    /// The last open/read/write failure, if any (kept after a reconnect, for the operator).
    pub last_error: Option<String>,
    /// Opens tried after the first one.
    pub reopen_attempts: u64,
    /// Lines framed (good and bad).
    pub lines: u64,
    /// Lines refused.
    pub bad_lines: u64,
    /// Times the port was (re)opened successfully.
    pub connects: u64,
    /// Replies written / dropped (port absent, queue full or write failed).
    pub replies: u64,
    pub replies_dropped: u64,
}

struct Shared {
    status: Mutex<PortStatus>,
    stop: AtomicBool,
    /// A clone of the open port for the writer; `None` while disconnected.
    writer_port: Mutex<Option<Box<dyn SerialPort>>>,
}

impl Shared {
    fn status(&self) -> MutexGuard<'_, PortStatus> {
        // A poisoned lock only means another thread panicked mid-update; the counters are
        // still usable.
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn writer(&self) -> MutexGuard<'_, Option<Box<dyn SerialPort>>> {
        self.writer_port.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// A running serial trigger. Dropping it stops both threads.
pub struct SerialTrigger {
    shared: Arc<Shared>,
    reply_enabled: bool,
    reply_tx: Option<SyncSender<String>>,
    reader: Option<JoinHandle<()>>,
    writer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for SerialTrigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialTrigger")
            .field("status", &self.status())
            .finish()
    }
}

impl SerialTrigger {
    /// Start reading `cfg.port`. Events go to `tx`; when `tx` is closed the reader stops.
    /// Never fails: a port that cannot be opened is retried with backoff.
    pub fn spawn(cfg: SerialConfig, tx: Sender<TriggerEvent>) -> SerialTrigger {
        let shared = Arc::new(Shared {
            status: Mutex::new(PortStatus {
                port: cfg.port.display().to_string(),
                ..PortStatus::default()
            }),
            stop: AtomicBool::new(false),
            writer_port: Mutex::new(None),
        });
        let (reply_tx, reply_rx) = sync_channel::<String>(REPLY_QUEUE);
        let reply_enabled = cfg.reply;
        let r_shared = shared.clone();
        let reader = std::thread::Builder::new()
            .name(String::from("serial-reader"))
            .spawn(move || reader_loop(cfg, tx, r_shared));
        let w_shared = shared.clone();
        let writer = std::thread::Builder::new()
            .name(String::from("serial-writer"))
            .spawn(move || writer_loop(reply_rx, w_shared));
        let note = |e: &std::io::Error| {
            shared.status().last_error = Some(format!("cannot start serial thread: {e}"));
        };
        let reader = reader.map_err(|e| note(&e)).ok();
        let writer = writer.map_err(|e| note(&e)).ok();
        SerialTrigger {
            shared,
            reply_enabled,
            reply_tx: Some(reply_tx),
            reader,
            writer,
        }
    }

    /// Queue `line + "\r\n"` for the scanner when `reply = true` (else do nothing). Never
    /// blocks: when the port is absent or the queue is full the reply is dropped and counted.
    pub fn reply(&self, line: &str) {
        if !self.reply_enabled {
            return;
        }
        let Some(tx) = &self.reply_tx else { return };
        let mut text: String = line.chars().filter(|c| *c != '\r' && *c != '\n').collect();
        text.push_str("\r\n");
        match tx.try_send(text) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.shared.status().replies_dropped += 1;
            }
        }
    }

    /// A snapshot of the port's state and counters.
    pub fn status(&self) -> PortStatus {
        self.shared.status().clone()
    }

    /// Stop both threads and wait for them (bounded by one read timeout plus one write).
    pub fn shutdown(mut self) {
        self.stop_threads();
    }

    fn stop_threads(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.reply_tx = None;
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
        *self.shared.writer() = None;
    }
}

impl Drop for SerialTrigger {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

fn open_port(cfg: &SerialConfig) -> Result<Box<dyn SerialPort>, String> {
    let path = cfg.port.to_string_lossy().into_owned();
    if !Path::new(&path).exists() {
        return Err(format!("{path}: no such device"));
    }
    serialport::new(path.clone(), cfg.baud)
        .data_bits(serialport::DataBits::Eight)
        .parity(serialport::Parity::None)
        .stop_bits(serialport::StopBits::One)
        .flow_control(serialport::FlowControl::None)
        .timeout(READ_TIMEOUT)
        .open()
        .map_err(|e| format!("{path}: {e}"))
}

/// Sleep `d` in short slices; false when asked to stop.
fn nap(shared: &Shared, d: Duration) -> bool {
    let step = Duration::from_millis(20);
    let mut left = d;
    while !left.is_zero() {
        if shared.stopping() {
            return false;
        }
        let s = left.min(step);
        std::thread::sleep(s);
        left = left.saturating_sub(s);
    }
    !shared.stopping()
}

fn reader_loop(cfg: SerialConfig, tx: Sender<TriggerEvent>, shared: Arc<Shared>) {
    let mut backoff = BACKOFF_MIN;
    let mut first = true;
    let mut framer = Framer::new();
    let mut buf = [0u8; 512];
    while !shared.stopping() && !tx.is_closed() {
        if !first {
            shared.status().reopen_attempts += 1;
        }
        first = false;
        match open_port(&cfg) {
            Ok(mut port) => {
                backoff = BACKOFF_MIN;
                framer.reset();
                let clone = port.try_clone().ok().map(|mut c| {
                    let _ = c.set_timeout(WRITE_TIMEOUT);
                    c
                });
                *shared.writer() = clone;
                {
                    let mut st = shared.status();
                    st.connected = true;
                    st.connects += 1;
                }
                tracing::info!(port = %cfg.port.display(), "scanner port open");
                let why = read_port(&mut *port, &cfg, &tx, &shared, &mut framer, &mut buf);
                *shared.writer() = None;
                let mut st = shared.status();
                st.connected = false;
                if let Some(why) = why {
                    tracing::warn!(port = %cfg.port.display(), error = %why, "scanner port lost; reopening");
                    st.last_error = Some(why);
                }
            }
            Err(e) => {
                let mut st = shared.status();
                if st.last_error.as_deref() != Some(e.as_str()) {
                    tracing::warn!(error = %e, "cannot open scanner port; retrying");
                }
                st.last_error = Some(e);
            }
        }
        if !nap(&shared, backoff) {
            break;
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
    shared.status().connected = false;
}

/// Read until the port fails (returns why) or the trigger stops (returns None).
fn read_port(
    port: &mut dyn SerialPort,
    cfg: &SerialConfig,
    tx: &Sender<TriggerEvent>,
    shared: &Shared,
    framer: &mut Framer,
    buf: &mut [u8],
) -> Option<String> {
    loop {
        if shared.stopping() || tx.is_closed() {
            return None;
        }
        match port.read(buf) {
            Ok(0) => return Some(String::from("end of file (device gone)")),
            Ok(n) => {
                let chunk = buf.get(..n).unwrap_or(&[]);
                for framed in framer.push(chunk) {
                    let event = match framed.and_then(|l| parse(&l, &cfg.line_pattern)) {
                        Ok(scan) => TriggerEvent::Scan(scan),
                        Err(e) => TriggerEvent::Bad(e),
                    };
                    {
                        let mut st = shared.status();
                        st.lines += 1;
                        if matches!(event, TriggerEvent::Bad(_)) {
                            st.bad_lines += 1;
                        }
                    }
                    if tx.blocking_send(event).is_err() {
                        return None;
                    }
                }
            }
            Err(e) if e.kind() == ErrorKind::TimedOut || e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Some(format!("read failed: {e}")),
        }
    }
}

fn writer_loop(rx: Receiver<String>, shared: Arc<Shared>) {
    loop {
        let line = match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(l) => l,
            Err(RecvTimeoutError::Timeout) => {
                if shared.stopping() {
                    return;
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let mut guard = shared.writer();
        let result = match guard.as_mut() {
            Some(port) => port.write_all(line.as_bytes()),
            None => Err(std::io::Error::new(
                ErrorKind::NotConnected,
                "port not open",
            )),
        };
        drop(guard);
        let mut st = shared.status();
        match result {
            Ok(()) => st.replies += 1,
            Err(e) => {
                st.replies_dropped += 1;
                if e.kind() != ErrorKind::NotConnected {
                    st.last_error = Some(format!("reply write failed: {e}"));
                }
            }
        }
    }
}
