//! A real pty pair standing in for a serial barcode scanner: the test holds the master end
//! (it "is" the scanner), the code under test opens the slave by path. A symlink in a
//! tempdir gives the port a stable name, so a test can unplug (close the master, remove the
//! link) and replug (a new pair behind the same name).
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serialport::{SerialPort, TTYPort};

/// The scanner side of one pty pair.
pub struct Scanner {
    master: TTYPort,
    /// `/dev/pts/N` of the slave end.
    pub slave_path: PathBuf,
}

impl Scanner {
    /// A fresh pty pair; the slave end is closed here so that only the code under test
    /// holds it.
    pub fn new() -> Scanner {
        let (mut master, slave) = TTYPort::pair().expect("open a pty pair");
        // serialport opens the master without close-on-exec: a child spawned later (the
        // daemon, a swtpm of a parallel test) would inherit it, and an "unplugged" scanner
        // would never hang up.
        {
            use std::os::fd::AsRawFd;
            nix::fcntl::fcntl(
                master.as_raw_fd(),
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            )
            .expect("set close-on-exec on the pty master");
        }
        let slave_path = PathBuf::from(slave.name().expect("pty slave name"));
        drop(slave);
        master
            .set_timeout(Duration::from_millis(50))
            .expect("set master timeout");
        Scanner { master, slave_path }
    }

    /// Send raw bytes as the scanner would. While nobody holds the slave end (the daemon
    /// is starting or was just killed) the master refuses writes; like an operator waiting
    /// for the station, retry for a while before calling it a failure.
    pub fn send(&mut self, bytes: &[u8]) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match self.master.write_all(bytes) {
                Ok(()) => break,
                Err(e) if Instant::now() < deadline && slave_closed(&e) => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("write to pty master: {e}"),
            }
        }
        self.master.flush().ok();
    }

    /// Read what the code under test wrote back, until `want` lines ending `\r\n` arrived
    /// or `within` passed. Returns the raw text read.
    pub fn read_lines(&mut self, want: usize, within: Duration) -> String {
        let deadline = Instant::now() + within;
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while Instant::now() < deadline {
            if got.windows(2).filter(|w| w == b"\r\n").count() >= want {
                break;
            }
            match self.master.read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                // No process holds the slave right now (e.g. the daemon is restarting):
                // nothing to read yet.
                Err(e) if slave_closed(&e) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("reading pty master: {e}"),
            }
        }
        String::from_utf8_lossy(&got).into_owned()
    }
}

/// The errors a pty master gives while no process has its slave open (EIO on Linux,
/// reported by serialport as a broken pipe or a raw EIO).
fn slave_closed(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::BrokenPipe || e.raw_os_error() == Some(libc::EIO)
}

/// A stable port name (a symlink in a tempdir) pointing at the current scanner's slave.
pub struct PortLink {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl PortLink {
    pub fn new() -> PortLink {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ttyScanner");
        PortLink { _dir: dir, path }
    }

    /// Plug `scanner` in behind the link.
    pub fn plug(&self, scanner: &Scanner) {
        let _ = std::fs::remove_file(&self.path);
        std::os::unix::fs::symlink(&scanner.slave_path, &self.path).expect("symlink");
    }

    /// Remove the link (the device node vanished).
    pub fn unplug(&self) {
        let _ = std::fs::remove_file(&self.path);
    }

    pub fn exists(&self) -> bool {
        Path::new(&self.path).exists()
    }
}

/// Poll `f` every 10 ms until it is true or `within` passed; returns the last answer.
pub fn wait_until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
