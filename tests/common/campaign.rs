//! Campaign harness (crash/fault/secrets engineer): drive the real `dps-station run`
//! binary through its control socket, spawn it with a chosen log level and environment,
//! read the store's batch table, and mount a small tmpfs for disk-full stories.
//! Test-only. It must never touch system paths other than the tmpfs mount points it
//! creates itself inside a test's tempdir, and it never kills a process it did not start.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use dps_station::station::control::{ControlClient, ControlRequest};
use dps_station::station::status::StatusSnapshot;

use super::station::DaemonProcess;

/// The real `dps-station -v run --config CONFIG`, stderr to `log`, `DPS_STATION_LOG=level`
/// and extra environment variables (the station harness pins the level to `info`).
pub fn spawn_daemon(config: &Path, log: &Path, level: &str, env: &[(&str, &str)]) -> DaemonProcess {
    let err = std::fs::File::create(log).expect("daemon log file");
    let child = Command::new(env!("CARGO_BIN_EXE_dps-station"))
        .args(["-v", "run", "--config"])
        .arg(config)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .env_remove("DPS_CONNECTION_STRING")
        .env_remove("DPS_STATION_CONFIG")
        .env("DPS_STATION_LOG", level)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .expect("spawn dps-station run");
    DaemonProcess {
        child,
        log: log.to_owned(),
    }
}

/// One scan through the control socket without waiting: the first reply line, or `None`
/// when the daemon went away (or did not answer within 10 s) before answering.
pub async fn scan_once(socket: &Path, serial: &str, slot: Option<&str>) -> Option<String> {
    let mut c = ControlClient::connect(socket).await.ok()?;
    let req = ControlRequest::Scan {
        serial: serial.into(),
        slot: slot.map(str::to_owned),
        wait: false,
    };
    match tokio::time::timeout(Duration::from_secs(10), c.call(&req)).await {
        Ok(Ok(v)) => v.get("reply").and_then(|r| r.as_str()).map(str::to_owned),
        _ => None,
    }
}

/// True when the scan was acknowledged (`QUEUED <serial> …`).
pub async fn scan_acked(socket: &Path, serial: &str) -> bool {
    scan_once(socket, serial, None)
        .await
        .is_some_and(|r| r.starts_with(&format!("QUEUED {serial} ")))
}

/// A scan with `wait`: every reply line until the final one (or the connection ends, or
/// `within` passes).
pub async fn scan_wait(
    socket: &Path,
    serial: &str,
    slot: Option<&str>,
    within: Duration,
) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(mut c) = ControlClient::connect(socket).await else {
        return out;
    };
    let req = ControlRequest::Scan {
        serial: serial.into(),
        slot: slot.map(str::to_owned),
        wait: true,
    };
    if c.send(&req).await.is_err() {
        return out;
    }
    let deadline = tokio::time::Instant::now() + within;
    while let Ok(Ok(Some(v))) = tokio::time::timeout_at(deadline, c.recv()).await {
        if let Some(r) = v.get("reply").and_then(|r| r.as_str()) {
            out.push(r.to_owned());
        } else if let Some(e) = v.get("error").and_then(|r| r.as_str()) {
            out.push(format!("control-error {e}"));
        }
        if v.get("final").and_then(|f| f.as_bool()) != Some(false) {
            break;
        }
    }
    out
}

/// The daemon's status snapshot, if it answers.
pub async fn status(socket: &Path) -> Option<StatusSnapshot> {
    let mut c = ControlClient::connect(socket).await.ok()?;
    tokio::time::timeout(Duration::from_secs(10), c.status())
        .await
        .ok()?
        .ok()
}

/// Batches recorded as sent but not finished (the in-flight batch).
pub fn open_batches(db: &Path) -> i64 {
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

/// An environment number (`SOAK_BOARDS=2000`), or `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// A tmpfs of a fixed size mounted on a fresh directory; unmounted (lazily) on drop.
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    /// `mount -t tmpfs -o size=SIZE tmpfs DIR`. Fails the test with a clear message when
    /// mounting is not permitted: a disk-full story that cannot run must not pass.
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("create the mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("tmpfs")
            .arg(dir)
            .output()
            .unwrap_or_else(|e| panic!("cannot run mount(8) for the disk-full test: {e}"));
        assert!(
            out.status.success(),
            "the disk-full test needs `mount -t tmpfs` (run as root, or with CAP_SYS_ADMIN); \
             mount said: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Tmpfs {
            path: dir.to_owned(),
        }
    }

    /// Fill the filesystem: write `filler` until the kernel says ENOSPC. Returns the bytes
    /// written.
    pub fn fill(&self, filler: &Path) -> u64 {
        use std::io::Write;
        let mut f = std::fs::File::create(filler).expect("create the filler file");
        let chunk = vec![0x5au8; 4096];
        let mut written = 0u64;
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", filler.display()),
            }
        }
        let _ = f.flush();
        written
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Mark every open pty master (`/dev/ptmx`) of this process close-on-exec. `TTYPort::pair`
/// opens the master without `O_CLOEXEC`, so every child spawned afterwards (the daemon,
/// swtpm of a parallel test) inherits it and an "unplugged" scanner never hangs up.
pub fn cloexec_pty_masters() {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let is_ptmx = std::fs::read_link(entry.path())
            .map(|t| t == Path::new("/dev/ptmx") || t.starts_with("/dev/pts/ptmx"))
            .unwrap_or(false);
        if is_ptmx {
            let _ = fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
        }
    }
}

/// A TCP relay in front of a swtpm board (data port and control port + 1). Once the
/// daemon has sent `kill_at` chunks on the data port, `on_kill` runs (the test kills
/// swtpm) instead of forwarding that chunk: the TPM vanishes in the middle of a command.
/// It fires once; later connections (the next board) pass through.
pub struct TpmRelay {
    /// Data port; the control port is `port + 1`.
    pub port: u16,
    /// Chunks the client sent on the data port so far.
    pub sent: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Set once `on_kill` ran (it runs at most once).
    pub fired: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl TpmRelay {
    pub fn start(
        upstream: u16,
        kill_at: usize,
        on_kill: impl Fn() + Send + Sync + 'static,
    ) -> TpmRelay {
        use std::net::{TcpListener, TcpStream};
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::Arc;
        let port = super::swtpm::free_port_pair().expect("a free port pair for the relay");
        let sent = Arc::new(AtomicUsize::new(0));
        let fired = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let on_kill: Arc<dyn Fn() + Send + Sync> = Arc::new(on_kill);
        for offset in 0..2u16 {
            let l = TcpListener::bind(("127.0.0.1", port + offset)).expect("relay bind");
            l.set_nonblocking(true).expect("nonblocking");
            let (sent, fired, stop, on_kill) =
                (sent.clone(), fired.clone(), stop.clone(), on_kill.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let Ok((client, _)) = l.accept() else {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    };
                    let _ = client.set_nonblocking(false);
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream + offset)) else {
                        continue;
                    };
                    let pump = |mut from: TcpStream, mut to: TcpStream, count: bool| {
                        let (sent, fired, on_kill) = (sent.clone(), fired.clone(), on_kill.clone());
                        std::thread::spawn(move || {
                            use std::io::{Read, Write};
                            let mut buf = [0u8; 8192];
                            loop {
                                let n = match from.read(&mut buf) {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => n,
                                };
                                if count
                                    && sent.fetch_add(1, Ordering::SeqCst) + 1 >= kill_at
                                    && !fired.swap(true, Ordering::SeqCst)
                                {
                                    // The TPM is gone before this command reaches it.
                                    on_kill();
                                    break;
                                }
                                if to.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                            let _ = from.shutdown(std::net::Shutdown::Both);
                            let _ = to.shutdown(std::net::Shutdown::Both);
                        });
                    };
                    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                        continue;
                    };
                    pump(client, server, offset == 0);
                    pump(s2, c2, false);
                }
            });
        }
        TpmRelay {
            port,
            sent,
            fired,
            stop,
        }
    }

    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }
}

impl Drop for TpmRelay {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}
