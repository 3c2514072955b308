//! Test harness for the DPS emulator: start one in-process on a free 127.0.0.1 port, or
//! run the `dps-emulator` binary and read its connection string from the first stdout
//! line; plus an independent SAS token builder (reference/dps-api.md §5, written here
//! so tests do not check the emulator with the client's own code). Test-only.
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use dps_station::emulator::{self, EmulatorOptions, RunningEmulator};
use hmac::{Hmac, Mac};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// `encodeURIComponent`-style encoding (alphanumerics and `-_.!~*'()` kept).
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'!')
    .remove(b'~')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

/// Start an in-process emulator with default options (HTTP, random key).
pub async fn start() -> RunningEmulator {
    start_with(EmulatorOptions::default()).await
}

/// Start an in-process emulator with the given options.
pub async fn start_with(opts: EmulatorOptions) -> RunningEmulator {
    emulator::start(opts).await.expect("start the DPS emulator")
}

/// The three parts of a DPS connection string.
#[derive(Debug, Clone)]
pub struct ConnParts {
    pub host_name: String,
    pub policy: String,
    pub key: String,
}

/// Split `HostName=…;SharedAccessKeyName=…;SharedAccessKey=…` (values split on the first `=`).
pub fn parse_connection_string(cs: &str) -> ConnParts {
    let mut parts = ConnParts {
        host_name: String::new(),
        policy: String::new(),
        key: String::new(),
    };
    for pair in cs.trim().split(';') {
        if let Some((k, v)) = pair.split_once('=') {
            match k {
                "HostName" => parts.host_name = v.to_string(),
                "SharedAccessKeyName" => parts.policy = v.to_string(),
                "SharedAccessKey" => parts.key = v.to_string(),
                _ => {}
            }
        }
    }
    parts
}

/// `SharedAccessSignature sr=…&sig=…&se=…&skn=…` for `host`, signed with `key_b64`,
/// expiring at Unix time `se`.
pub fn sas_token_at(host: &str, policy: &str, key_b64: &str, se: u64) -> String {
    let sr = utf8_percent_encode(&host.to_lowercase(), COMPONENT).to_string();
    let key = base64::engine::general_purpose::STANDARD
        .decode(key_b64)
        .expect("key is base64");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).expect("hmac key");
    mac.update(format!("{sr}\n{se}").as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let sig = utf8_percent_encode(&sig, COMPONENT);
    let skn = utf8_percent_encode(policy, COMPONENT);
    format!("SharedAccessSignature sr={sr}&sig={sig}&se={se}&skn={skn}")
}

/// A token valid for one hour from now.
pub fn sas_token(host: &str, policy: &str, key_b64: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    sas_token_at(host, policy, key_b64, now + 3600)
}

/// A token for a running emulator's own connection string.
pub fn token_for(emu: &RunningEmulator) -> String {
    let p = parse_connection_string(&emu.connection_string());
    sas_token(&p.host_name, &p.policy, &p.key)
}

/// The `dps-emulator` binary running as a child process; killed on drop.
pub struct EmulatorProcess {
    pub child: Child,
    /// The first stdout line.
    pub connection_string: String,
    /// `http://HOST:PORT` taken from the connection string's HostName.
    pub base_url: String,
}

impl EmulatorProcess {
    /// Run `dps-emulator ARGS` and wait (≤ 20 s) for its first stdout line.
    pub fn spawn(args: &[&str]) -> EmulatorProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_dps-emulator"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn dps-emulator");
        let stdout = child.stdout.take().expect("stdout pipe");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let mut r = BufReader::new(stdout);
            let _ = r.read_line(&mut line);
            let _ = tx.send(line);
            // Keep draining so the child never blocks on a full pipe.
            let mut rest = String::new();
            while r.read_line(&mut rest).map(|n| n > 0).unwrap_or(false) {
                rest.clear();
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!("dps-emulator printed no connection string within 20 s");
            }
        };
        let connection_string = line.trim().to_string();
        let host = parse_connection_string(&connection_string).host_name;
        EmulatorProcess {
            child,
            connection_string,
            base_url: format!("http://{host}"),
        }
    }

    /// Send SIGTERM and wait (≤ 10 s) for the exit status code.
    pub fn terminate(mut self) -> Option<i32> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for EmulatorProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
