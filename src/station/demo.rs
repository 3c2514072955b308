//! `dps-station demo`: the whole product end to end on one machine, with nothing but this
//! binary and swtpm. It starts the in-process DPS emulator, three swtpm boards (one TPM
//! slot each), a development CA for a DICE slot, writes a config and a connection-string
//! file into a private temporary directory, runs `dps-station run` as a child process,
//! and drives it through a real pty pair as the barcode scanner: good boards, a duplicate
//! scan, a bad scan and a throttle episode (the emulator's real operations-per-minute
//! quota). It prints every reply line, the final board table, and keeps the operator page
//! reachable while it runs.
//!
//! It must never touch the system's own config, state or sockets (everything lives in the
//! temporary directory), never print the emulator's key, and never leave child processes
//! behind.
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::attest::swtpm::{SwtpmBoard, SwtpmVariant};
use crate::station::control::ControlClient;
use crate::station::report;

/// Errors that stop the demo before its script could run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo setup: {step}: {detail}")]
    Setup { step: &'static str, detail: String },
    #[error("demo: the daemon did not come up within {secs} s (its log: {log})")]
    DaemonStart { secs: u64, log: PathBuf },
}

fn setup(step: &'static str) -> impl Fn(String) -> DemoError {
    move |detail| DemoError::Setup { step, detail }
}

/// Options of one demo run.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Wait for Ctrl-C after the script (operator page stays up).
    pub keep_running: bool,
    /// `[control] http` of the demo daemon.
    pub http: String,
    /// Keep the working directory instead of deleting it.
    pub keep_dir: bool,
    /// The `dps-station` binary to run as the daemon.
    pub exe: PathBuf,
}

/// What the scripted run saw.
#[derive(Debug, Clone, Default)]
pub struct DemoOutcome {
    /// Expected replies that did not arrive (empty = success).
    pub missing: Vec<String>,
    /// Every reply line the scanner received, in order.
    pub replies: Vec<String>,
}

impl DemoOutcome {
    pub fn ok(&self) -> bool {
        self.missing.is_empty()
    }
}

// ------------------------------------------------------------------------- child processes

/// A child process killed (and reaped) on drop.
struct Reaped {
    child: Option<Child>,
    name: String,
}

impl Reaped {
    fn new(child: Child, name: impl Into<String>) -> Self {
        Reaped {
            child: Some(child),
            name: name.into(),
        }
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. Returns the exit status if known.
    fn terminate(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::warn!(process = %self.name, "did not stop on SIGTERM; killing it");
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ------------------------------------------------------------------------- the scanner

/// The simulated barcode scanner: the master side of a pty whose slave is the daemon's
/// `[trigger.serial] port`.
struct Scanner {
    master: serialport::TTYPort,
    // Kept open so the pty never sees a hang-up between daemon reopens.
    _slave: serialport::TTYPort,
    slave_path: String,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
    consumed: Vec<bool>,
}

impl Scanner {
    fn open() -> Result<Scanner, String> {
        let (master, slave) = serialport::TTYPort::pair().map_err(|e| e.to_string())?;
        let slave_path = serialport::SerialPort::name(&slave)
            .ok_or_else(|| "the pty slave has no name".to_string())?;
        let mut reader = master.try_clone_native().map_err(|e| e.to_string())?;
        let _ = serialport::SerialPort::set_timeout(&mut reader, Duration::from_millis(200));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("demo-scanner".into())
            .spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 256];
                loop {
                    match reader.read(&mut chunk) {
                        Ok(0) => std::thread::sleep(Duration::from_millis(20)),
                        Ok(n) => {
                            for &b in &chunk[..n] {
                                if b == b'\n' || b == b'\r' {
                                    if !buf.is_empty() {
                                        let line = String::from_utf8_lossy(&buf).into_owned();
                                        buf.clear();
                                        if tx.send(line).is_err() {
                                            return;
                                        }
                                    }
                                } else if buf.len() < 4096 {
                                    buf.push(b);
                                }
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(20))
                        }
                        // EIO while no one has the slave open: keep polling.
                        Err(_) => std::thread::sleep(Duration::from_millis(50)),
                    }
                    if tx.is_closed() {
                        return;
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(Scanner {
            master,
            _slave: slave,
            slave_path,
            lines: rx,
            seen: Vec::new(),
            consumed: Vec::new(),
        })
    }

    /// Type one scan (as the scanner would: the text plus CR LF).
    fn scan(&mut self, text: &str) -> Result<(), String> {
        println!("  scan  → {text}");
        self.master
            .write_all(format!("{text}\r\n").as_bytes())
            .and_then(|_| self.master.flush())
            .map_err(|e| format!("writing to the pty: {e}"))
    }

    /// Record replies for `d`, however many arrive.
    async fn pump_for(&mut self, d: Duration) {
        let deadline = Instant::now() + d;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            self.pump(deadline - now).await;
        }
    }

    async fn pump(&mut self, wait: Duration) {
        if let Ok(Some(line)) = tokio::time::timeout(wait, self.lines.recv()).await {
            self.record(line);
        }
        while let Ok(line) = self.lines.try_recv() {
            self.record(line);
        }
    }

    fn record(&mut self, line: String) {
        println!("  reply ← {line}");
        self.seen.push(line);
        self.consumed.push(false);
    }

    /// Wait for an unconsumed reply `KIND SERIAL …` (serial `-` for unparsed lines).
    async fn expect(&mut self, kind: &str, serial: &str, within: Duration) -> Option<String> {
        let deadline = Instant::now() + within;
        loop {
            for (i, line) in self.seen.iter().enumerate() {
                let mut words = line.split(' ');
                if !self.consumed[i] && words.next() == Some(kind) && words.next() == Some(serial) {
                    self.consumed[i] = true;
                    return Some(line.clone());
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            self.pump((deadline - now).min(Duration::from_millis(100)))
                .await;
        }
    }
}

// ------------------------------------------------------------------------- the script

fn toml_str(s: &str) -> String {
    // TOML basic string: escape backslash and quote; paths here have no control chars.
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn write_private(path: &Path, text: &str) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(text.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))
}

#[allow(clippy::too_many_arguments)]
fn config_text(
    dir: &Path,
    cs_file: &Path,
    boards: &[SwtpmBoard],
    ca: &crate::attest::ca::DevCaPaths,
    scanner_port: &str,
    http: &str,
) -> String {
    let p = |x: &Path| toml_str(&x.display().to_string());
    let mut t = String::new();
    t.push_str(&format!(
        "# Written by `dps-station demo`; everything lives in {}\n\
[dps]\nconnection_string_file = {}\nrequest_timeout = \"5s\"\nmax_operations_per_minute = 1000\n\n\
[batch]\nmax_size = 10\nmax_delay = \"300ms\"\n\n\
[state]\npath = {}\n\n\
[enrollment]\nregistration_id = \"{{ek_hash}}\"\ndevice_id = \"{{serial}}\"\nprovisioning_status = \"enabled\"\n\
[enrollment.initial_twin.tags]\nline = \"demo\"\nserial = \"{{serial}}\"\n\n",
        dir.display(),
        p(cs_file),
        p(&dir.join("station.db")),
    ));
    for (i, b) in boards.iter().enumerate() {
        t.push_str(&format!(
            "[[slot]]\nname = \"fixture-{}\"\nattestation = \"tpm\"\ntcti = {}\nek = \"read-or-create\"\n\n",
            i + 1,
            toml_str(&b.tcti())
        ));
    }
    t.push_str(&format!(
        "[[slot]]\nname = \"dice-1\"\nattestation = \"dice\"\nregistration_id = \"board-{{serial}}\"\n\n\
[dice]\nca_cert = {}\nca_key = {}\nout_dir = {}\nenroll = \"individual\"\n\n\
[trigger.serial]\nport = {}\nbaud = 9600\nreply = true\n\n\
[control]\nsocket = {}\nhttp = {}\n",
        p(&ca.intermediate_cert),
        p(&ca.intermediate_key),
        p(&dir.join("dice")),
        toml_str(scanner_port),
        p(&dir.join("control.sock")),
        toml_str(http),
    ));
    t
}

/// Run the demo. Prints progress on stdout; returns what the script saw.
pub async fn run(opts: DemoOptions) -> Result<DemoOutcome, DemoError> {
    let dir = tempfile::Builder::new()
        .prefix("dps-station-demo-")
        .tempdir()
        .map_err(|e| setup("creating the working directory")(e.to_string()))?;
    let work = dir.path().to_owned();
    println!("dps-station demo — working directory {}", work.display());

    // 1. The DPS emulator, in process.
    let emulator = crate::emulator::start(crate::emulator::EmulatorOptions::default())
        .await
        .map_err(|e| setup("starting the DPS emulator")(e.to_string()))?;
    println!("[1/6] DPS emulator listening on {}", emulator.base_url());
    let cs_file = work.join("dps-connection-string");
    write_private(&cs_file, &emulator.connection_string())
        .map_err(setup("writing the connection string"))?;

    // 2. Three swtpm boards (manufactured in parallel: EK persisted, EK certificate in NV)
    //    and a development CA for the DICE slot.
    let mut starts = Vec::new();
    for i in 1..=3 {
        let d = work.join(format!("board-{i}"));
        starts.push(tokio::task::spawn_blocking(move || {
            SwtpmBoard::start(SwtpmVariant::EkPersistedWithCert, &d)
        }));
    }
    let mut boards = Vec::new();
    for (i, st) in starts.into_iter().enumerate() {
        let b = st
            .await
            .map_err(|e| setup("starting swtpm")(e.to_string()))?
            .map_err(|e| setup("starting swtpm")(e.to_string()))?;
        println!("[2/6] board {}: swtpm on 127.0.0.1:{}", i + 1, b.port());
        boards.push(b);
    }
    let ca = crate::attest::ca::init_dev_ca(&work.join("ca"), "dps-station demo CA")
        .map_err(|e| setup("creating the development CA")(e.to_string()))?;
    println!("[2/6] development CA in {}", work.join("ca").display());

    // 3. The scanner pty, the config, the daemon.
    let mut scanner = Scanner::open().map_err(setup("opening a pty pair"))?;
    let config = work.join("station.toml");
    write_private(
        &config,
        &config_text(
            &work,
            &cs_file,
            &boards,
            &ca,
            &scanner.slave_path,
            &opts.http,
        ),
    )
    .map_err(setup("writing the config"))?;
    let log_path = work.join("daemon.log");
    let log = std::fs::File::create(&log_path)
        .map_err(|e| setup("creating the daemon log")(e.to_string()))?;
    let child = Command::new(&opts.exe)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env_remove("DPS_CONNECTION_STRING")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .map_err(|e| setup("starting `dps-station run`")(e.to_string()))?;
    let mut daemon = Reaped::new(child, "dps-station run");
    println!(
        "[3/6] daemon started (pid {}), scanner on {}, log {}",
        daemon.pid().unwrap_or(0),
        scanner.slave_path,
        log_path.display()
    );

    let socket = work.join("control.sock");
    let snap = {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut c) = ControlClient::connect(&socket).await {
                if let Ok(s) = c.status().await {
                    break s;
                }
            }
            if daemon.exited().is_some() || Instant::now() > deadline {
                print_log_tail(&log_path);
                return Err(DemoError::DaemonStart {
                    secs: 20,
                    log: log_path,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    if let Some(h) = &snap.http_addr {
        println!("[3/6] operator page: http://{h}/  (metrics: http://{h}/metrics)");
    }

    // 4. The scripted scans.
    let outcome = tokio::select! {
        o = script(&mut scanner, &emulator, &mut boards, &work, &socket) => o,
        _ = tokio::signal::ctrl_c() => DemoOutcome {
            missing: vec!["interrupted (Ctrl-C)".into()],
            replies: scanner.seen.clone(),
        },
    };

    // 5. The result.
    println!("[5/6] final board table:");
    match report::read_rows(&work.join("station.db"), None) {
        Ok(rows) => print!("{}", report::render_table(&rows)),
        Err(e) => println!("  (cannot read the board table: {e})"),
    }
    let stats = emulator.stats();
    println!(
        "emulator: {} requests ({} throttled), {} enrollments created, each exactly once: {}",
        stats.requests,
        stats.throttled,
        stats.creates.values().sum::<u64>(),
        stats.creates.values().all(|n| *n == 1)
    );
    println!("[5/6] daemon status (`dps-station status`):");
    if let Ok(mut c) = ControlClient::connect(&socket).await {
        if let Ok(s) = c.status().await {
            print!("{}", s.render_text());
        }
    }
    let mut outcome = outcome;
    for (id, n) in &stats.creates {
        if *n != 1 {
            outcome.missing.push(format!(
                "registration {id} created {n} times (expected once)"
            ));
        }
    }

    if opts.keep_running {
        if let Some(h) = &snap.http_addr {
            println!("operator page: http://{h}/ — press Ctrl-C to stop the demo");
        }
        let _ = tokio::signal::ctrl_c().await;
    }

    // 6. Clean up.
    let status = tokio::task::spawn_blocking(move || daemon.terminate(Duration::from_secs(10)))
        .await
        .ok()
        .flatten();
    match status {
        Some(st) if st.success() => println!("[6/6] daemon stopped cleanly"),
        Some(st) => {
            println!("[6/6] daemon exited with {st}");
            outcome
                .missing
                .push(format!("daemon exit status {st} on SIGTERM"));
        }
        None => println!("[6/6] daemon stopped"),
    }
    emulator.shutdown().await;
    drop(boards);
    if !outcome.ok() {
        print_log_tail(&log_path);
    }
    if opts.keep_dir {
        let kept = dir.keep();
        println!("kept {}", kept.display());
    }
    Ok(outcome)
}

fn print_log_tail(log: &Path) {
    if let Ok(text) = std::fs::read_to_string(log) {
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(30);
        println!("--- last lines of {} ---", log.display());
        for l in &lines[from..] {
            println!("{l}");
        }
    }
}

/// The emulator's quota (operations per minute) during the throttle episode: bursts of 3,
/// then a token every 2 s, so Retry-After is 1–2 s and the episode stays short.
const THROTTLE_QUOTA: u32 = 30;
/// At most this many boards are scanned into the throttle episode.
const THROTTLE_MAX_BOARDS: u32 = 8;

/// The scanner's part: each step prints its replies; a missing reply is recorded.
async fn script(
    sc: &mut Scanner,
    emulator: &crate::emulator::RunningEmulator,
    boards: &mut [SwtpmBoard],
    work: &Path,
    socket: &Path,
) -> DemoOutcome {
    let mut out = DemoOutcome::default();
    let t = Duration::from_secs(20);

    println!("[4/6] three TPM boards and one DICE board:");
    for (slot, serial) in [
        ("fixture-1", "TPM-0001"),
        ("fixture-2", "TPM-0002"),
        ("fixture-3", "TPM-0003"),
        ("dice-1", "DICE-0001"),
    ] {
        if let Err(e) = sc.scan(&format!("{slot}:{serial}")) {
            out.missing.push(e);
            return out;
        }
        need(sc, "QUEUED", serial, t, &mut out).await;
    }
    for serial in ["TPM-0001", "TPM-0002", "TPM-0003", "DICE-0001"] {
        need(sc, "ENROLLED", serial, t, &mut out).await;
    }

    println!("[4/6] the same board scanned again (answered from the journal, no new DPS call):");
    let before = emulator.stats().requests;
    let _ = sc.scan("fixture-1:TPM-0001");
    need(sc, "ENROLLED", "TPM-0001", t, &mut out).await;
    let after = emulator.stats().requests;
    if after != before {
        out.missing.push(format!(
            "no DPS request for a duplicate scan (saw {})",
            after - before
        ));
    }

    println!("[4/6] board swap on fixture-1: TPM-0001 comes off, a new board goes on");
    if let Some(first) = boards.first_mut() {
        let port = first.port();
        first.kill();
        let dir = work.join("board-4");
        let started = tokio::task::spawn_blocking(move || {
            SwtpmBoard::start_on_port(SwtpmVariant::EkPersistedWithCert, &dir, port)
        })
        .await;
        match started {
            Ok(Ok(b)) => {
                *first = b;
                let _ = sc.scan("fixture-1:TPM-0004");
                need(sc, "QUEUED", "TPM-0004", t, &mut out).await;
                need(sc, "ENROLLED", "TPM-0004", t, &mut out).await;
            }
            Ok(Err(e)) => out.missing.push(format!("swapped board: {e}")),
            Err(e) => out.missing.push(format!("swapped board: {e}")),
        }
    }

    println!("[4/6] a bad scan:");
    let _ = sc.scan("fixture-1:not a serial!");
    need(sc, "ERROR", "-", t, &mut out).await;

    println!(
        "[4/6] throttle episode: the emulator's quota drops to {THROTTLE_QUOTA} operations/min \
         (a token bucket: bursts of {}, then one token every {} s); boards keep coming",
        THROTTLE_QUOTA.div_ceil(10),
        60 / THROTTLE_QUOTA
    );
    // The emulator's real quota: every bulk request takes a token, and a request past the
    // burst gets 429 with Retry-After = seconds to the next token. The daemon's own pacing
    // (1000/min) does not know the lower quota, so it runs into it and must back off.
    emulator.set_ops_per_minute(Some(THROTTLE_QUOTA));
    let throttled_before = emulator.stats().throttled;
    let mut serials = Vec::new();
    // One board every 450 ms: each goes alone in its own bulk request (linger 300 ms), so
    // the burst is used up after a few boards; stop scanning once DPS has refused one.
    for i in 2..=THROTTLE_MAX_BOARDS + 1 {
        let serial = format!("DICE-{i:04}");
        if let Err(e) = sc.scan(&format!("dice-1:{serial}")) {
            out.missing.push(e);
            break;
        }
        serials.push(serial);
        sc.pump_for(Duration::from_millis(450)).await;
        if emulator.stats().throttled > throttled_before && serials.len() >= 2 {
            break;
        }
    }
    for serial in &serials {
        need(sc, "QUEUED", serial, t, &mut out).await;
    }
    // Still under the quota: the refused rows stayed queued and go once Retry-After passed.
    for serial in &serials {
        need(sc, "ENROLLED", serial, t, &mut out).await;
    }
    let refused = emulator.stats().throttled - throttled_before;
    let seen = daemon_throttled(socket).await;
    println!(
        "  the daemon saw {seen} throttled answer(s) (the emulator answered {refused} request(s) \
         with 429), kept those boards queued, honoured Retry-After and enrolled all {} boards \
         under the quota; lifting the quota",
        serials.len()
    );
    if refused == 0 || seen == 0 {
        out.missing
            .push("a 429 from the emulator's quota, seen by the daemon".into());
    }
    emulator.set_ops_per_minute(None);
    sc.pump(Duration::from_millis(50)).await;
    out.replies = sc.seen.clone();
    if out.ok() {
        println!("[4/6] every expected reply arrived");
    } else {
        println!("[4/6] missing replies: {}", out.missing.join(", "));
    }
    out
}

async fn need(sc: &mut Scanner, kind: &str, serial: &str, within: Duration, out: &mut DemoOutcome) {
    if sc.expect(kind, serial, within).await.is_none() {
        out.missing.push(format!("{kind} {serial}"));
    }
}

/// 429 answers the daemon has seen so far (its status snapshot).
async fn daemon_throttled(socket: &Path) -> u64 {
    match ControlClient::connect(socket).await {
        Ok(mut c) => c.status().await.map(|s| s.dps.throttled_total).unwrap_or(0),
        Err(_) => 0,
    }
}
