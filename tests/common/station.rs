//! Station harness (daemon engineer): write a station config for a test directory, run the
//! daemon in-process or as the real `dps-station run` binary, and wait for board states
//! through the state database. Test-only; binds 127.0.0.1 port 0 and unix sockets in the
//! test's tempdir.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rusqlite::Connection;

/// One `[[slot]]` of a generated config.
pub enum SlotSpec {
    Tpm {
        name: String,
        tcti: String,
        registration_id: Option<String>,
    },
    Dice {
        name: String,
    },
}

/// Everything a generated config varies on.
pub struct StationSpec {
    pub connection_string: String,
    pub slots: Vec<SlotSpec>,
    pub serial_port: Option<PathBuf>,
    pub max_size: usize,
    pub max_delay: &'static str,
    pub ops_per_minute: u32,
    /// DICE `enroll = "group"` with this group id.
    pub dice_group: Option<String>,
}

impl StationSpec {
    pub fn new(connection_string: String, slots: Vec<SlotSpec>) -> Self {
        StationSpec {
            connection_string,
            slots,
            serial_port: None,
            max_size: 10,
            max_delay: "200ms",
            ops_per_minute: 60_000,
            dice_group: None,
        }
    }
}

/// Paths of a generated station.
pub struct StationPaths {
    pub config: PathBuf,
    pub db: PathBuf,
    pub socket: PathBuf,
    pub dice_out: PathBuf,
}

/// Write `station.toml`, the connection-string file and (for dice slots) a dev CA into `dir`.
pub fn write_station(dir: &Path, spec: &StationSpec) -> StationPaths {
    let cs = dir.join("dps-connection-string");
    std::fs::write(&cs, format!("{}\n", spec.connection_string)).expect("write cs");
    let db = dir.join("state/station.db");
    let socket = dir.join("control.sock");
    let dice_out = dir.join("dice-out");
    let mut t = format!(
        "[dps]\nconnection_string_file = {cs:?}\nrequest_timeout = \"5s\"\n\
         max_operations_per_minute = {ops}\n\n[batch]\nmax_size = {ms}\nmax_delay = \"{md}\"\n\n\
         [state]\npath = {db:?}\n\n[enrollment]\nregistration_id = \"{{ek_hash}}\"\n\
         device_id = \"{{serial}}\"\nprovisioning_status = \"enabled\"\n\
         [enrollment.initial_twin.tags]\nserial = \"{{serial}}\"\n\n",
        ops = spec.ops_per_minute,
        ms = spec.max_size,
        md = spec.max_delay,
    );
    let mut has_dice = false;
    for s in &spec.slots {
        match s {
            SlotSpec::Tpm {
                name,
                tcti,
                registration_id,
            } => {
                t.push_str(&format!(
                    "[[slot]]\nname = \"{name}\"\nattestation = \"tpm\"\ntcti = \"{tcti}\"\n\
                     ek = \"read-or-create\"\ntpm_timeout = \"10s\"\n"
                ));
                if let Some(r) = registration_id {
                    t.push_str(&format!("registration_id = \"{r}\"\n"));
                }
                t.push('\n');
            }
            SlotSpec::Dice { name } => {
                has_dice = true;
                t.push_str(&format!(
                    "[[slot]]\nname = \"{name}\"\nattestation = \"dice\"\n\
                     registration_id = \"board-{{serial}}\"\n\n"
                ));
            }
        }
    }
    if has_dice {
        let ca = dps_station::attest::ca::init_dev_ca(&dir.join("ca"), "Test Station CA")
            .expect("dev CA");
        t.push_str(&format!(
            "[dice]\nca_cert = {:?}\nca_key = {:?}\nout_dir = {:?}\n\
             fwid = \"sha256:{}\"\n\n",
            ca.intermediate_cert,
            ca.intermediate_key,
            dice_out,
            "ab".repeat(32)
        ));
        if let Some(g) = &spec.dice_group {
            t.push_str(&format!("enroll = \"group\"\ngroup_id = \"{g}\"\n\n"));
        }
    }
    if let Some(port) = &spec.serial_port {
        t.push_str(&format!(
            "[trigger.serial]\nport = {port:?}\nbaud = 9600\n\
             line_pattern = '^(?:(?P<slot>[a-z0-9-]+):)?(?P<serial>[A-Z0-9-]{{4,32}})$'\n\
             reply = true\n\n"
        ));
    }
    t.push_str(&format!("[control]\nsocket = {socket:?}\n"));
    // Always a free port: the default 9184 would collide between parallel tests.
    t.push_str("http = \"127.0.0.1:0\"\n");
    let config = dir.join("station.toml");
    std::fs::write(&config, t).expect("write config");
    StationPaths {
        config,
        db,
        socket,
        dice_out,
    }
}

/// Board rows as (serial, state, registration_id), in id order; empty if no database yet.
pub fn rows(db: &Path) -> Vec<(String, String, String)> {
    let Ok(c) = Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY) else {
        return Vec::new();
    };
    let Ok(mut st) = c.prepare("SELECT serial, state, registration_id FROM boards ORDER BY id")
    else {
        return Vec::new();
    };
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .map(|it| it.filter_map(Result::ok).collect())
        .unwrap_or_default()
}

/// Count of rows in `state`.
pub fn count(db: &Path, state: &str) -> usize {
    rows(db).iter().filter(|r| r.1 == state).count()
}

/// Poll (every 20 ms) until `f` holds or `within` passed.
pub fn poll(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The real `dps-station run --config …` as a child process.
pub struct DaemonProcess {
    pub child: Child,
    pub log: PathBuf,
}

impl DaemonProcess {
    pub fn spawn(config: &Path, log: &Path) -> DaemonProcess {
        Self::spawn_with_env(config, log, &[])
    }

    /// Like [`spawn`](Self::spawn) with extra environment variables (e.g. NOTIFY_SOCKET).
    pub fn spawn_with_env(config: &Path, log: &Path, env: &[(&str, String)]) -> DaemonProcess {
        Self::spawn_full(config, log, &[], env)
    }

    /// `dps-station -v run --config CONFIG EXTRA…` with extra environment variables.
    pub fn spawn_full(
        config: &Path,
        log: &Path,
        extra: &[&str],
        env: &[(&str, String)],
    ) -> DaemonProcess {
        let err = std::fs::File::create(log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_dps-station"))
            .args(["-v", "run", "--config"])
            .arg(config)
            .args(extra)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("DPS_STATION_LOG", "info")
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

    /// Wait until the control socket accepts connections.
    pub fn wait_ready(&mut self, socket: &Path) {
        let ok = poll(Duration::from_secs(20), || {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "daemon exited early ({st}): {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            std::os::unix::net::UnixStream::connect(socket).is_ok()
        });
        assert!(
            ok,
            "daemon not ready: {}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// The exit code once the process ends by itself within `within` (None: still running
    /// or killed by a signal).
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM; the exit code within `within`.
    pub fn terminate(&mut self, within: Duration) -> Option<i32> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
