//! swtpm "boards" for tests, benchmarks and the demo: each [`SwtpmBoard`] is one software
//! TPM with fresh state in a directory the caller owns, set up by `swtpm_setup` with a
//! PRIVATE config (its own swtpm-localca CA in that directory) and served by `swtpm socket`
//! on a loopback port pair (P, P+1: the tpm2-tss swtpm TCTI always uses P+1 for control),
//! or on unix sockets in that directory (`swtpm.sock` and `swtpm.sock.ctrl`: the tpm2-tss
//! swtpm TCTI's `path=` convention) for [`SwtpmBoard::start_unix`].
//!
//! It must never touch system paths (`/etc/swtpm_setup.conf`, `/var/lib/swtpm-localca`),
//! never bind anything but 127.0.0.1, and never leave a swtpm process behind: dropping a
//! board kills its process (SIGKILL) and reaps it.
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What the board's TPM holds after manufacturing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwtpmVariant {
    /// RSA-2048 EK persisted at 0x81010001, its certificate in NV 0x01c00002 (signed by the
    /// board directory's private swtpm-localca CA); also swtpm's ECC EK.
    EkPersistedWithCert,
    /// A manufactured TPM with no persistent EK and no EK certificate.
    NoPersistedEk,
    /// EK persisted at 0x81010001 but no EK certificate in NV.
    NoEkCert,
}

/// Why a board could not be made or started.
#[derive(Debug, thiserror::Error)]
pub enum SwtpmError {
    #[error("{step}: {source}")]
    Io {
        step: String,
        #[source]
        source: std::io::Error,
    },
    #[error("swtpm_setup failed ({status}); log {}:\n{log_tail}", log.display())]
    Setup {
        status: String,
        log: PathBuf,
        log_tail: String,
    },
    #[error("swtpm did not start on 127.0.0.1:{port}: {detail}")]
    Start { port: u16, detail: String },
}

fn io(step: impl Into<String>) -> impl FnOnce(std::io::Error) -> SwtpmError {
    let step = step.into();
    move |source| SwtpmError::Io { step, source }
}

/// One running software TPM.
#[derive(Debug)]
pub struct SwtpmBoard {
    variant: SwtpmVariant,
    dir: PathBuf,
    port: u16,
    /// Serving on this unix socket (and `<socket>.ctrl`) instead of TCP.
    socket: Option<PathBuf>,
    child: Option<Child>,
}

const START_TIMEOUT: Duration = Duration::from_secs(10);

impl SwtpmBoard {
    /// Manufacture a board in `dir` (created if missing; should be empty) and start it on
    /// free loopback ports.
    pub fn start(variant: SwtpmVariant, dir: &Path) -> Result<Self, SwtpmError> {
        Self::manufacture(variant, dir)?;
        let mut last = None;
        // Another process can take the probed ports before swtpm binds them: retry.
        for _ in 0..8 {
            let port = free_port_pair()?;
            let mut board = SwtpmBoard {
                variant,
                dir: dir.to_path_buf(),
                port,
                socket: None,
                child: None,
            };
            match board.launch() {
                Ok(()) => return Ok(board),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(SwtpmError::Start {
            port: 0,
            detail: "no free port pair".into(),
        }))
    }

    /// Manufacture a board in `dir` and start it on `port` (and `port + 1`), e.g. to swap a
    /// new board into the fixture an earlier board used.
    pub fn start_on_port(variant: SwtpmVariant, dir: &Path, port: u16) -> Result<Self, SwtpmError> {
        Self::manufacture(variant, dir)?;
        let mut board = SwtpmBoard {
            variant,
            dir: dir.to_path_buf(),
            port,
            socket: None,
            child: None,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match board.launch() {
                Ok(()) => return Ok(board),
                // The previous board's process may still be releasing the port.
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Manufacture a board in `dir` and serve it on the unix sockets `dir/swtpm.sock` (data)
    /// and `dir/swtpm.sock.ctrl` (control); its TCTI is `swtpm:path=dir/swtpm.sock`.
    pub fn start_unix(variant: SwtpmVariant, dir: &Path) -> Result<Self, SwtpmError> {
        Self::manufacture(variant, dir)?;
        let mut board = SwtpmBoard {
            variant,
            dir: dir.to_path_buf(),
            port: 0,
            socket: Some(dir.join("swtpm.sock")),
            child: None,
        };
        board.launch()?;
        Ok(board)
    }

    /// TCTI string for tss-esapi and tpm2-tools: `swtpm:host=127.0.0.1,port=P`, or
    /// `swtpm:path=SOCKET` for a board on unix sockets.
    pub fn tcti(&self) -> String {
        match &self.socket {
            Some(socket) => format!("swtpm:path={}", socket.display()),
            None => format!("swtpm:host=127.0.0.1,port={}", self.port),
        }
    }

    /// The data port (control is `port() + 1`); 0 for a board on unix sockets.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The data socket of a board on unix sockets (control: the same path plus `.ctrl`).
    pub fn socket(&self) -> Option<&Path> {
        self.socket.as_deref()
    }

    pub fn variant(&self) -> SwtpmVariant {
        self.variant
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// DER of the RSA-2048 EK certificate as written by `swtpm_setup --write-ek-cert-files`
    /// (only for [`SwtpmVariant::EkPersistedWithCert`]).
    pub fn ek_cert_file(&self) -> Option<PathBuf> {
        let p = self.dir.join("certs").join("ek-rsa2048.crt");
        p.exists().then_some(p)
    }

    /// Process id of the running swtpm.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGKILL the swtpm process (a board pulled off the fixture) and reap it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start the same board (same state, same ports) again after [`SwtpmBoard::kill`].
    pub fn restart(&mut self) -> Result<(), SwtpmError> {
        self.kill();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.launch() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Run `swtpm_setup` with a private config in `dir`.
    fn manufacture(variant: SwtpmVariant, dir: &Path) -> Result<(), SwtpmError> {
        let state = dir.join("state");
        let ca = dir.join("ca");
        let certs = dir.join("certs");
        for d in [&state, &ca, &certs] {
            std::fs::create_dir_all(d).map_err(io(format!("creating {}", d.display())))?;
        }
        let localca_conf = dir.join("swtpm-localca.conf");
        let localca_opts = dir.join("swtpm-localca.options");
        let setup_conf = dir.join("swtpm_setup.conf");
        write_file(
            &localca_conf,
            &format!(
                "statedir = {ca}\nsigningkey = {ca}/signkey.pem\nissuercert = {ca}/issuercert.pem\n\
                 certserial = {ca}/certserial\n",
                ca = ca.display()
            ),
        )?;
        write_file(
            &localca_opts,
            "--platform-manufacturer dps-station\n--platform-version 2.1\n--platform-model swtpm-board\n",
        )?;
        write_file(
            &setup_conf,
            &format!(
                "create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = {}\n\
                 create_certs_tool_options = {}\nactive_pcr_banks = sha256\n",
                localca_conf.display(),
                localca_opts.display()
            ),
        )?;
        let log = dir.join("swtpm_setup.log");
        let mut cmd = Command::new("swtpm_setup");
        cmd.arg("--tpm2")
            .arg("--tpmstate")
            .arg(&state)
            .arg("--config")
            .arg(&setup_conf)
            .arg("--pcr-banks")
            .arg("sha256")
            .arg("--overwrite")
            .arg("--logfile")
            .arg(&log);
        match variant {
            SwtpmVariant::EkPersistedWithCert => {
                cmd.arg("--create-ek-cert")
                    .arg("--write-ek-cert-files")
                    .arg(&certs);
            }
            SwtpmVariant::NoEkCert => {
                cmd.arg("--createek");
            }
            SwtpmVariant::NoPersistedEk => {}
        }
        // XDG_CONFIG_HOME too, so that no per-user default config is consulted either.
        cmd.env("XDG_CONFIG_HOME", dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let status = cmd
            .status()
            .map_err(io("running swtpm_setup (is swtpm-tools installed?)"))?;
        if !status.success() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            return Err(SwtpmError::Setup {
                status: status.to_string(),
                log,
                log_tail: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            });
        }
        Ok(())
    }

    /// Start `swtpm socket` on `self.port` (or `self.socket`) and wait until it serves.
    fn launch(&mut self) -> Result<(), SwtpmError> {
        let port = self.port;
        let (server, ctrl_arg, ctrl_probe) = match &self.socket {
            Some(socket) => {
                let ctrl = PathBuf::from(format!("{}.ctrl", socket.display()));
                // A socket file left by a killed swtpm would make the bind fail.
                let _ = std::fs::remove_file(socket);
                let _ = std::fs::remove_file(&ctrl);
                (
                    format!("type=unixio,path={}", socket.display()),
                    format!("type=unixio,path={}", ctrl.display()),
                    Probe::Unix(ctrl),
                )
            }
            None => {
                let ctrl = port.checked_add(1).ok_or(SwtpmError::Start {
                    port,
                    detail: "no room for the control port".into(),
                })?;
                (
                    format!("type=tcp,port={port},bindaddr=127.0.0.1"),
                    format!("type=tcp,port={ctrl},bindaddr=127.0.0.1"),
                    Probe::Tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, ctrl))),
                )
            }
        };
        let pid_file = self.dir.join("swtpm.pid");
        let _ = std::fs::remove_file(&pid_file);
        let mut child = Command::new("swtpm")
            .arg("socket")
            .arg("--tpm2")
            .arg("--tpmstate")
            .arg(format!("dir={}", self.state_dir().display()))
            .arg("--server")
            .arg(server)
            .arg("--ctrl")
            .arg(ctrl_arg)
            .arg("--flags")
            .arg("not-need-init,startup-clear")
            .arg("--pid")
            .arg(format!("file={}", pid_file.display()))
            .arg("--log")
            .arg(format!(
                "file={},level=1",
                self.dir.join("swtpm.log").display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io("starting swtpm (is swtpm installed?)"))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(SwtpmError::Start {
                    port,
                    detail: format!("swtpm exited ({status}); port taken?"),
                });
            }
            let pid_ok = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
                == Some(child.id());
            if pid_ok && ctrl_probe.connects() {
                // A swtpm that lost the port race exits right away; make sure ours did not.
                std::thread::sleep(Duration::from_millis(10));
                if let Ok(None) = child.try_wait() {
                    self.child = Some(child);
                    return Ok(());
                }
                continue;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(SwtpmError::Start {
                    port,
                    detail: "not serving after 10 s".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for SwtpmBoard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How [`SwtpmBoard::launch`] sees that swtpm serves: its control channel accepts.
enum Probe {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Probe {
    fn connects(&self) -> bool {
        match self {
            Probe::Tcp(addr) => {
                TcpStream::connect_timeout(addr, Duration::from_millis(200)).is_ok()
            }
            Probe::Unix(path) => std::os::unix::net::UnixStream::connect(path).is_ok(),
        }
    }
}

fn write_file(path: &Path, text: &str) -> Result<(), SwtpmError> {
    let mut f = std::fs::File::create(path).map_err(io(format!("writing {}", path.display())))?;
    f.write_all(text.as_bytes())
        .map_err(io(format!("writing {}", path.display())))
}

/// A port P such that P and P+1 are both free on 127.0.0.1 right now.
pub fn free_port_pair() -> Result<u16, SwtpmError> {
    for _ in 0..64 {
        let a = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io("probing a free port"))?;
        let p = a.local_addr().map_err(io("probing a free port"))?.port();
        if p == u16::MAX {
            continue;
        }
        if TcpListener::bind((Ipv4Addr::LOCALHOST, p + 1)).is_ok() {
            return Ok(p);
        }
    }
    Err(SwtpmError::Start {
        port: 0,
        detail: "no free port pair found".into(),
    })
}
