//! Secrets audit: one demo-sized session at debug log level (the `dps-emulator` binary,
//! the DPS CLI with `--json`, the daemon with a swtpm TPM slot and a DICE slot, `scan`,
//! `status --json`, `export`, `check`, the HTTP page, and error paths: a wrong key, a bad
//! policy name, a malformed connection string, an unreachable or non-loopback endpoint,
//! expired and forged SAS tokens). Every byte any of it wrote — logs, stdout, stderr,
//! exports, the state database with its WAL — is searched for the SharedAccessKey (base64,
//! raw, hex), every SAS signature the session could have produced, the CA private keys and
//! every issued Alias private key and UDS. Zero hits. The only files allowed to hold
//! secrets are the connection-string inputs and the private-key files (mode 0600).
mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use common::campaign as camp;
use common::emulator as emu;
use common::station::{self as st, SlotSpec, StationSpec};
use common::swtpm::{self as tpm, SwtpmVariant};
use dps_station::attest::dice;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Every captured output of the session, by name.
#[derive(Default)]
struct Capture {
    dir: PathBuf,
    n: usize,
    /// Extra haystacks that are not files under the session directory.
    extra: Vec<(String, Vec<u8>)>,
}

impl Capture {
    /// Run `dps-station ARGS` at debug level; stdout and stderr are kept as files.
    fn station(&mut self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let out = Command::new(env!("CARGO_BIN_EXE_dps-station"))
            .arg("-vv")
            .args(args)
            .env_remove("DPS_STATION_CONFIG")
            .env_remove("DPS_CONNECTION_STRING")
            .env("DPS_STATION_LOG", "debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running dps-station {args:?}: {e}"));
        self.keep(&args.join(" "), &out);
        out
    }

    fn keep(&mut self, what: &str, out: &Output) {
        self.n += 1;
        let base = self.dir.join(format!("cmd-{:03}", self.n));
        std::fs::write(base.with_extension("cmd"), what).unwrap();
        std::fs::write(base.with_extension("stdout"), &out.stdout).unwrap();
        std::fs::write(base.with_extension("stderr"), &out.stderr).unwrap();
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn write_0600(path: &Path, bytes: &[u8]) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(bytes).unwrap();
}

/// Needles for one private key PEM file: the PEM body (joined and per line), the DER,
/// and the raw private scalar (bytes and hex).
fn key_needles(label: &str, path: &Path, out: &mut Vec<(String, Vec<u8>)>) {
    let pem_text = std::fs::read_to_string(path).unwrap();
    let body: Vec<&str> = pem_text
        .lines()
        .filter(|l| !l.starts_with("-----") && !l.trim().is_empty())
        .collect();
    out.push((format!("{label} PEM body"), body.concat().into_bytes()));
    let der = pem::parse(&pem_text).unwrap().into_contents();
    // ECPrivateKey: version INTEGER 1, then privateKey OCTET STRING (32 bytes for P-256).
    let pos = der
        .windows(5)
        .position(|w| w == [0x02, 0x01, 0x01, 0x04, 0x20])
        .unwrap_or_else(|| panic!("{label}: no EC private scalar in {}", path.display()));
    let (from, to) = (pos + 5, pos + 37);
    let scalar = der[from..to].to_vec();
    // PEM lines that carry scalar bytes (a line of 64 characters is 48 DER bytes). Lines
    // with only public-key bytes are no needles: certificates legitimately carry those.
    for (i, l) in body.iter().enumerate() {
        let (a, b) = (i * 48, i * 48 + l.len() / 4 * 3);
        if a < to && from < b {
            out.push((format!("{label} PEM line {i}"), l.as_bytes().to_vec()));
        }
    }
    raw_needles(&format!("{label} private scalar"), &scalar, out);
    out.push((format!("{label} DER"), der));
}

/// `bytes` raw, as hex (both cases), and base64-encoded at each of the three byte
/// alignments it could have inside a longer base64 text.
fn raw_needles(label: &str, bytes: &[u8], out: &mut Vec<(String, Vec<u8>)>) {
    out.push((format!("{label} raw"), bytes.to_vec()));
    out.push((format!("{label} hex"), hex::encode(bytes).into_bytes()));
    out.push((
        format!("{label} HEX"),
        hex::encode_upper(bytes).into_bytes(),
    ));
    for shift in 0..3 {
        let part = &bytes[shift..];
        let whole = part.len() / 3 * 3;
        out.push((
            format!("{label} base64 (offset {shift})"),
            B64.encode(&part[..whole]).into_bytes(),
        ));
    }
}

/// The `sig=` value of a SAS token (percent-encoded) and its decoded base64 form.
fn sig_of(token: &str) -> (String, String) {
    let sig = token
        .split(['&', ' '])
        .find_map(|p| p.strip_prefix("sig="))
        .unwrap()
        .to_owned();
    let raw = percent_encoding::percent_decode_str(&sig)
        .decode_utf8_lossy()
        .into_owned();
    (sig, raw)
}

/// SAS signatures for every expiry a token signed between `from` and `to` can carry.
fn sig_needles(
    label: &str,
    host: &str,
    policy: &str,
    key: &str,
    from: u64,
    to: u64,
) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for se in (from + 3600 - 5)..=(to + 3600 + 5) {
        let (enc, raw) = sig_of(&emu::sas_token_at(host, policy, key, se));
        out.push((format!("{label} sig se={se}"), enc.into_bytes()));
        out.push((format!("{label} sig (decoded) se={se}"), raw.into_bytes()));
    }
    out
}

/// A one-request HTTP proxy that records the request head it forwards (to see the real
/// Authorization header the client sent).
fn recording_proxy(upstream: std::net::SocketAddr) -> (u16, std::sync::mpsc::Receiver<String>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let Ok((mut c, _)) = l.accept() else { return };
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if c.read(&mut b).unwrap_or(0) == 0 {
                return;
            }
            head.push(b[0]);
        }
        let head_text = text(&head);
        let _ = tx.send(head_text.clone());
        let len: usize = head_text
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        let _ = c.read_exact(&mut body);
        let Ok(mut u) = std::net::TcpStream::connect(upstream) else {
            return;
        };
        // One exchange: ask the server to close so its answer ends at EOF.
        let head_close = head_text.replacen("\r\n", "\r\nConnection: close\r\n", 1);
        let _ = u.write_all(head_close.as_bytes());
        let _ = u.write_all(&body);
        let mut resp = Vec::new();
        let _ = u.read_to_end(&mut resp);
        let _ = c.write_all(&resp);
    });
    (port, rx)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            files_under(&p, out);
        } else if ft.is_file() {
            out.push(p);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debug_logged_session_leaks_no_key_token_or_private_key() {
    let t_start = now();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    let mut cap = Capture {
        dir: root.join("out"),
        ..Default::default()
    };
    std::fs::create_dir_all(&cap.dir).unwrap();

    // The emulator binary, debug logging, with a known key given through its env.
    let mut key = [0u8; 32];
    rand::Rng::fill(&mut rand::thread_rng(), &mut key[..]);
    let key_b64 = B64.encode(key);
    let emu_out_dir = tempfile::tempdir().unwrap();
    let emu_stdout = emu_out_dir.path().join("stdout");
    let mut emulator = Command::new(env!("CARGO_BIN_EXE_dps-emulator"))
        .args(["-v", "--listen", "127.0.0.1:0"])
        .env("DPS_EMULATOR_KEY", &key_b64)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&emu_stdout).unwrap())
        .stderr(std::fs::File::create(root.join("emulator.stderr")).unwrap())
        .spawn()
        .unwrap();
    let mut cs = String::new();
    let got = st::poll(Duration::from_secs(20), || {
        cs = std::fs::read_to_string(&emu_stdout).unwrap_or_default();
        cs.contains('\n')
    });
    assert!(got, "dps-emulator printed its connection string");
    let cs = cs.lines().next().unwrap().trim().to_owned();
    let parts = emu::parse_connection_string(&cs);
    assert_eq!(parts.key, key_b64);
    let host = parts.host_name.clone();
    let upstream: std::net::SocketAddr = host.parse().unwrap();
    let cs_file = root.join("dps-connection-string");
    write_0600(&cs_file, format!("{cs}\n").as_bytes());
    let csf = cs_file.to_str().unwrap();

    // --- DPS CLI with --json.
    let board = tokio::task::block_in_place(|| tpm::board(SwtpmVariant::EkPersistedWithCert));
    let tcti = board.tcti();
    let j = |c: &mut Capture, args: &[&str]| {
        let mut a = args.to_vec();
        a.extend(["--json", "--connection-string-file", csf]);
        c.station(&a, &[])
    };
    let out = j(
        &mut cap,
        &[
            "enrollment",
            "create",
            "--registration-id",
            "audit-tpm-1",
            "--tpm-tcti",
            &tcti,
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = j(&mut cap, &["enrollment", "get", "audit-tpm-1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ek = got["attestation"]["tpm"]["endorsementKey"]
        .as_str()
        .unwrap()
        .to_owned();
    j(&mut cap, &["enrollment", "attestation", "audit-tpm-1"]);
    j(
        &mut cap,
        &[
            "enrollment",
            "update",
            "audit-tpm-1",
            "--provisioning-status",
            "disabled",
        ],
    );
    j(&mut cap, &["enrollment", "query", "--page-size", "1"]);
    let bulk = root.join("bulk.json");
    std::fs::write(
        &bulk,
        serde_json::to_vec(&serde_json::json!([
            {"registrationId": "audit-bulk-1", "attestation": {"type": "tpm", "tpm": {"endorsementKey": ek}}},
            {"registrationId": "audit-bulk-2", "attestation": {"type": "tpm", "tpm": {"endorsementKey": ek}}}
        ]))
        .unwrap(),
    )
    .unwrap();
    let out = j(
        &mut cap,
        &["bulk", "create", "--file", bulk.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    j(
        &mut cap,
        &["bulk", "create", "--file", bulk.to_str().unwrap()],
    ); // all 409: exit 1
    let ca2 = root.join("ca-cli");
    let out = cap.station(&["ca", "init", "--out", ca2.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ca2_pem = ca2.join("intermediate.pem");
    let out = j(
        &mut cap,
        &[
            "group",
            "create",
            "--group-id",
            "audit-group",
            "--x509-ca-cert",
            ca2_pem.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    j(&mut cap, &["group", "get", "audit-group"]);
    j(&mut cap, &["group", "query"]);
    j(&mut cap, &["registration", "query", "audit-group"]);
    j(&mut cap, &["registration", "get", "audit-tpm-1"]); // 404
    j(&mut cap, &["enrollment", "delete", "audit-bulk-2"]);
    j(&mut cap, &["ek", "--tcti", &tcti]);
    let dice_cli = root.join("dice-cli");
    let out = cap.station(
        &[
            "dice",
            "issue",
            "--serial",
            "AUD-CLI-1",
            "--ca-cert",
            ca2_pem.to_str().unwrap(),
            "--ca-key",
            ca2.join("intermediate.key").to_str().unwrap(),
            "--out",
            dice_cli.to_str().unwrap(),
            "--json",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));

    // The real Authorization header, seen through a recording proxy: the derived signature
    // set below must contain it, or this audit would be searching for the wrong thing.
    let (pport, heads) = recording_proxy(upstream);
    let out = j(
        &mut cap,
        &[
            "enrollment",
            "get",
            "audit-tpm-1",
            "--endpoint",
            &format!("http://127.0.0.1:{pport}"),
        ],
    );
    assert!(
        out.status.success(),
        "through the proxy: {}",
        text(&out.stderr)
    );
    let head = heads.recv_timeout(Duration::from_secs(5)).unwrap();
    let auth = head
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("authorization"))
        })
        .map(|(_, v)| v.trim().to_owned())
        .expect("an Authorization header");
    let (seen_sig, _) = sig_of(&auth);

    // --- Error paths: a wrong key, a wrong policy name, a malformed string, a refused and
    // an unreachable endpoint.
    let mut key2 = [0u8; 32];
    rand::Rng::fill(&mut rand::thread_rng(), &mut key2[..]);
    let key2_b64 = B64.encode(key2);
    let wrong = root.join("wrong-key");
    write_0600(&wrong, format!("HostName={host};SharedAccessKeyName=provisioningserviceowner;SharedAccessKey={key2_b64}").as_bytes());
    let badpol = root.join("wrong-policy");
    write_0600(
        &badpol,
        format!("HostName={host};SharedAccessKeyName=nosuchpolicy;SharedAccessKey={key_b64}")
            .as_bytes(),
    );
    let malformed = root.join("malformed");
    write_0600(&malformed, format!("HostName={host};SharedAccessKeyName=provisioningserviceowner;SharedAccessKey={key_b64}!!").as_bytes());
    for (f, want) in [(&wrong, 1), (&badpol, 1), (&malformed, 2)] {
        let out = cap.station(
            &[
                "enrollment",
                "get",
                "audit-tpm-1",
                "--json",
                "--connection-string-file",
                f.to_str().unwrap(),
            ],
            &[],
        );
        assert_eq!(
            out.status.code(),
            Some(want),
            "{}: {}",
            f.display(),
            text(&out.stderr)
        );
    }
    let out = cap.station(
        &[
            "enrollment",
            "get",
            "x",
            "--connection-string-file",
            csf,
            "--endpoint",
            "http://192.0.2.1:80",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let out = cap.station(
        &[
            "enrollment",
            "get",
            "x",
            "--connection-string-file",
            csf,
            "--endpoint",
            "http://127.0.0.1:1",
            "--retry-budget",
            "1s",
        ],
        &[],
    );
    assert_ne!(out.status.code(), Some(0));
    let out = cap.station(
        &["enrollment", "get", "x"],
        &[("DPS_CONNECTION_STRING", &cs)],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr)); // 404 via the env source

    // Expired and forged tokens straight at the emulator: it must not echo them back.
    let http = reqwest::Client::new();
    let expired = emu::sas_token_at(&host, &parts.policy, &key_b64, now() - 30);
    let forged = emu::sas_token_at(&host, &parts.policy, &key2_b64, now() + 3600);
    for (what, tok) in [("expired", &expired), ("forged", &forged)] {
        let r = http
            .get(format!(
                "http://{host}/enrollments/audit-tpm-1?api-version=2021-10-01"
            ))
            .header("Authorization", tok.as_str())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401, "{what}");
        let body = r.bytes().await.unwrap().to_vec();
        cap.extra
            .push((format!("emulator answer to the {what} token"), body));
    }

    // --- The daemon: a TPM slot (swtpm) and a DICE slot, debug logging.
    let station_dir = root.join("station");
    std::fs::create_dir_all(&station_dir).unwrap();
    let board2 = tokio::task::block_in_place(|| tpm::board(SwtpmVariant::NoPersistedEk));
    let paths = st::write_station(
        &station_dir,
        &StationSpec::new(
            cs.clone(),
            vec![
                SlotSpec::Tpm {
                    name: "fixture-1".into(),
                    tcti: board2.tcti(),
                    registration_id: None,
                },
                SlotSpec::Dice {
                    name: "fixture-2".into(),
                },
            ],
        ),
    );
    let station_cs = station_dir.join("dps-connection-string");
    std::fs::set_permissions(&station_cs, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cfg = paths.config.to_str().unwrap().to_owned();
    let mut d = tokio::task::block_in_place(|| {
        let mut d = camp::spawn_daemon(&paths.config, &root.join("daemon.log"), "debug", &[]);
        d.wait_ready(&paths.socket);
        d
    });
    let c = |cap: &mut Capture, args: &[&str]| {
        let mut a = args.to_vec();
        a.extend(["--config", cfg.as_str()]);
        cap.station(&a, &[])
    };
    for (slot, serial) in [
        ("fixture-1", "AUD-TPM-1"),
        ("fixture-2", "AUD-DICE-1"),
        ("fixture-2", "AUD-DICE-2"),
        ("fixture-2", "AUD-DICE-3"),
    ] {
        let out = tokio::task::block_in_place(|| {
            c(
                &mut cap,
                &["--json", "scan", serial, "--slot", slot, "--wait"],
            )
        });
        assert!(
            out.status.success(),
            "{serial}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }
    tokio::task::block_in_place(|| {
        c(
            &mut cap,
            &["scan", "AUD-DICE-1", "--slot", "fixture-2", "--wait"],
        ); // duplicate
        c(&mut cap, &["scan", "bad serial!", "--wait"]); // bad scan
        let out = c(&mut cap, &["status", "--json"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        c(&mut cap, &["status"]);
        for f in ["csv", "jsonl"] {
            let out = c(&mut cap, &["export", "--format", f]);
            assert!(out.status.success(), "{}", text(&out.stderr));
            assert!(text(&out.stdout).contains("AUD-DICE-2"));
        }
        let out = c(&mut cap, &["check"]);
        assert!(
            out.status.success(),
            "check: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    });
    // `check` with the wrong key must fail without showing either key.
    let wrong_cfg = station_dir.join("wrong.toml");
    std::fs::write(
        &wrong_cfg,
        std::fs::read_to_string(&paths.config)
            .unwrap()
            .replace(&format!("{:?}", station_cs), &format!("{:?}", wrong)),
    )
    .unwrap();
    let out = tokio::task::block_in_place(|| {
        cap.station(&["check", "--config", wrong_cfg.to_str().unwrap()], &[])
    });
    assert_ne!(out.status.code(), Some(0), "check with a wrong key fails");
    // The operator page and metrics.
    let snap = camp::status(&paths.socket).await.unwrap();
    let http_addr = snap.http_addr.clone().unwrap();
    for p in ["/", "/metrics", "/healthz"] {
        let body = http
            .get(format!("http://{http_addr}{p}"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        cap.extra.push((format!("HTTP {p}"), body.to_vec()));
    }
    // The state database while the daemon holds it (WAL not yet checkpointed).
    for ext in ["", "-wal", "-shm"] {
        let p = PathBuf::from(format!("{}{ext}", paths.db.display()));
        if let Ok(b) = std::fs::read(&p) {
            cap.extra.push((format!("live {}", p.display()), b));
        }
    }
    assert_eq!(d.terminate(Duration::from_secs(15)), Some(0));
    // The daemon again, now with the wrong key: its batcher meets 401s at debug level.
    let mut d = tokio::task::block_in_place(|| {
        let mut d =
            camp::spawn_daemon(&wrong_cfg, &root.join("daemon-wrong-key.log"), "debug", &[]);
        d.wait_ready(&paths.socket);
        d
    });
    let r = camp::scan_once(&paths.socket, "AUD-DICE-4", Some("fixture-2")).await;
    assert!(
        r.as_deref()
            .is_some_and(|r| r.starts_with("QUEUED AUD-DICE-4 ")),
        "{r:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut refused = false;
    while !refused && Instant::now() < deadline {
        refused = camp::status(&paths.socket)
            .await
            .is_some_and(|s| s.dps.last_error.is_some());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused, "DPS refused the wrong key");
    assert_eq!(d.terminate(Duration::from_secs(15)), Some(0));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(emulator.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while emulator.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = emulator.kill();
    let _ = emulator.wait();
    let t_end = now();
    drop(board);
    drop(board2);

    // --- Needles.
    let mut needles: Vec<(String, Vec<u8>)> = Vec::new();
    for (label, k, kb) in [
        ("SharedAccessKey", &key_b64, &key[..]),
        ("wrong SharedAccessKey", &key2_b64, &key2[..]),
    ] {
        needles.push((format!("{label} base64"), k.as_bytes().to_vec()));
        needles.push((
            format!("{label} url-encoded"),
            dps_station::dps::sas::url_encode(k).into_bytes(),
        ));
        raw_needles(label, kb, &mut needles);
    }
    let sigs = sig_needles("SAS", &host, &parts.policy, &key_b64, t_start, t_end);
    assert!(
        sigs.iter().any(|(_, n)| n == seen_sig.as_bytes()),
        "the signature the client really sent ({seen_sig}) is among the derived ones"
    );
    needles.extend(sigs);
    needles.extend(sig_needles(
        "wrong-key SAS",
        &host,
        &parts.policy,
        &key2_b64,
        t_start,
        t_end,
    ));
    // (The policy name is not signed: the wrong-policy run's signatures are the SAS ones.)
    for tok in [&expired, &forged] {
        let (enc, raw) = sig_of(tok);
        needles.push(("hand-made token sig".into(), enc.into_bytes()));
        needles.push(("hand-made token sig (decoded)".into(), raw.into_bytes()));
    }

    // Files allowed to hold secrets: the connection-string inputs and private keys.
    let mut allowed: Vec<PathBuf> = vec![
        cs_file.clone(),
        wrong.clone(),
        badpol.clone(),
        malformed.clone(),
        station_cs.clone(),
    ];
    for ca_dir in [station_dir.join("ca"), ca2.clone()] {
        for e in std::fs::read_dir(&ca_dir).unwrap().flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "key") {
                key_needles(&format!("CA key {}", p.display()), &p, &mut needles);
                allowed.push(p);
            }
        }
    }
    let mut bundles = 0;
    for out_dir in [&paths.dice_out, &dice_cli] {
        for e in std::fs::read_dir(out_dir).unwrap().flatten() {
            let b = e.path();
            if !b.is_dir() {
                continue;
            }
            bundles += 1;
            let alias = b.join("alias.key");
            let uds = b.join("uds.bin");
            key_needles(
                &format!("Alias key {}", alias.display()),
                &alias,
                &mut needles,
            );
            let uds_bytes: [u8; 32] = std::fs::read(&uds).unwrap().try_into().unwrap();
            raw_needles(&format!("UDS {}", uds.display()), &uds_bytes, &mut needles);
            // The CDI and the DeviceID key never leave the station process either. Find
            // the FWID this bundle was issued with by re-deriving its Alias key.
            let alias_scalar = {
                let mut v = Vec::new();
                key_needles("probe", &alias, &mut v);
                v.into_iter()
                    .find(|(l, _)| l == "probe private scalar raw")
                    .unwrap()
                    .1
            };
            let fwids = [[0xabu8; 32], [0u8; 32]].map(dice::Fwid);
            let fwid = fwids
                .iter()
                .find(|f| {
                    dice::derive_keys(&uds_bytes, f).unwrap().alias.to_bytes()[..]
                        == alias_scalar[..]
                })
                .unwrap_or_else(|| panic!("{}: Alias key re-derived from its UDS", b.display()));
            let keys = dice::derive_keys(&uds_bytes, fwid).unwrap();
            let cdi = dice::derive_cdi(&uds_bytes, fwid).unwrap();
            raw_needles(&format!("CDI {}", b.display()), &cdi[..], &mut needles);
            raw_needles(
                &format!("DeviceID key {}", b.display()),
                &keys.device_id.to_bytes()[..],
                &mut needles,
            );
            allowed.push(alias);
            allowed.push(uds);
        }
    }
    assert_eq!(
        bundles, 5,
        "four DICE boards through the daemon and one from the CLI"
    );
    for p in &allowed {
        assert_eq!(mode(p), 0o600, "{} is mode 0600", p.display());
    }

    // --- Haystacks: every file of the session (minus the allowed ones), the captured
    // extras, and the emulator's stdout after its contractual first line.
    let mut files = Vec::new();
    files_under(&root, &mut files);
    let mut hay: Vec<(String, Vec<u8>)> = files
        .into_iter()
        .filter(|p| !allowed.contains(p))
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect();
    assert!(
        hay.iter().any(|(n, _)| n.ends_with("station.db")),
        "the state DB is searched"
    );
    let emu_rest: Vec<u8> = std::fs::read_to_string(&emu_stdout)
        .unwrap()
        .lines()
        .skip(1)
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes();
    hay.push(("dps-emulator stdout after line 1".into(), emu_rest));
    hay.append(&mut cap.extra);
    let debug_lines = hay
        .iter()
        .filter(|(n, _)| n.ends_with(".stderr") || n.ends_with(".log"))
        .map(|(_, b)| text(b).matches("DEBUG").count())
        .sum::<usize>();
    assert!(
        debug_lines > 20,
        "debug logging was on ({debug_lines} debug lines)"
    );

    let pattern = needles
        .iter()
        .map(|(_, n)| n.iter().map(|b| format!("\\x{b:02x}")).collect::<String>())
        .collect::<Vec<_>>()
        .join("|");
    let re = regex::bytes::RegexBuilder::new(&format!("(?-u){pattern}"))
        .size_limit(1 << 28)
        .build()
        .unwrap();
    // Positive control: the same search finds the secrets where they are allowed to be.
    for p in &allowed {
        let bytes = std::fs::read(p).unwrap();
        assert!(
            re.is_match(&bytes),
            "the search finds the secret in {}",
            p.display()
        );
    }
    let mut hits: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, bytes) in &hay {
        for m in re.find_iter(bytes) {
            let what = needles
                .iter()
                .filter(|(_, n)| m.as_bytes().starts_with(n) || n.as_slice() == m.as_bytes())
                .map(|(l, _)| l.clone())
                .next()
                .unwrap_or_default();
            hits.entry(name.clone()).or_default().push(what);
        }
    }
    assert!(
        hits.is_empty(),
        "secrets found in {} haystacks ({} needles searched): {hits:#?}",
        hits.len(),
        needles.len()
    );
    eprintln!(
        "secrets audit: {} haystacks ({} KiB), {} needles, 0 hits",
        hay.len(),
        hay.iter().map(|(_, b)| b.len()).sum::<usize>() / 1024,
        needles.len()
    );
}
