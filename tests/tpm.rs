//! TPM attestation against real software TPMs: every test manufactures its own swtpm board
//! (fresh state, private swtpm_setup config, free loopback ports) and compares what
//! `dps_station::attest::tpm` reads with what tpm2-tools reads from the same TPM.
mod common;

use std::net::{Ipv4Addr, TcpListener};
use std::process::Command;
use std::time::{Duration, Instant};

use common::swtpm::{self as h, SwtpmVariant};
use dps_station::attest::tpm::{self, EkPolicy, EkRequest, TpmError, TpmWorker};

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The registration-id rule computed by an independent implementation (Python's hashlib and
/// base64, as in reference/tpm-ek.md §6.3), over the bytes tpm2-tools wrote.
fn python_registration_id(file: &std::path::Path) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(
            "import sys,hashlib,base64;d=open(sys.argv[1],'rb').read();\
             print(base64.b32encode(hashlib.sha256(d).digest()).decode().lower().rstrip('='))",
        )
        .arg(file)
        .output()
        .expect("python3");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn req(tcti: &str, policy: EkPolicy) -> EkRequest {
    let mut r = EkRequest::new(tcti, policy);
    r.timeout = Duration::from_secs(20);
    r
}

#[test]
fn persisted_ek_equals_tpm2_readpublic_byte_for_byte_with_cert_facts() {
    let board = h::board(SwtpmVariant::EkPersistedWithCert);
    let info = tpm::read_ek(&req(&board.tcti(), EkPolicy::ReadOnly)).unwrap();

    let theirs = h::tpm2_readpublic_ek(&board.tcti(), board.dir.path());
    assert_eq!(info.tpm2b_public, theirs);
    assert_eq!(info.tpm2b_public.len(), 316);
    assert_eq!(info.ek_b64, b64(&theirs));
    assert!(info.ek_b64.starts_with("AToAAQALAAMAsgAg"));
    assert!(!info.created && info.persisted);

    // Registration id: the Azure SDK rule, computed by Python over tpm2-tools' file.
    let file = board.dir.path().join("readpublic-ek.pub");
    let expected = python_registration_id(&file);
    assert_eq!(expected.len(), 52);
    assert_eq!(info.ek_hash, expected);
    assert_eq!(info.registration_id.as_str(), expected);

    // EK certificate: the same certificate swtpm_setup wrote out, same thumbprint.
    let cert = info.ek_cert.as_ref().expect("EK cert read from NV");
    let der = std::fs::read(board.ek_cert_file().expect("ek cert file")).unwrap();
    let sha = Command::new("sha256sum")
        .arg(board.ek_cert_file().unwrap())
        .output()
        .unwrap();
    let sha = String::from_utf8(sha.stdout).unwrap();
    assert_eq!(cert.sha256_hex, sha.split_whitespace().next().unwrap());
    assert!(!der.is_empty());
    // swtpm-localca issues EK certs under its own intermediate and leaves the subject empty
    // apart from the TPM identity in the SAN; the issuer names the local CA.
    let openssl_issuer = Command::new("openssl")
        .args([
            "x509", "-inform", "DER", "-noout", "-issuer", "-nameopt", "RFC2253", "-in",
        ])
        .arg(board.ek_cert_file().unwrap())
        .output()
        .unwrap();
    let openssl_issuer = String::from_utf8(openssl_issuer.stdout).unwrap();
    let cn = openssl_issuer
        .split("CN=")
        .nth(1)
        .map(|s| s.split(',').next().unwrap().trim().to_string())
        .expect("issuer CN");
    assert!(
        cert.issuer.contains(&format!("CN={cn}")),
        "{cert:?} vs {openssl_issuer}"
    );
    assert!(
        !info.warnings.iter().any(|w| w.contains("certificate")),
        "{:?}",
        info.warnings
    );

    // Software TPM recognised from TPM2_PT_MANUFACTURER.
    assert_eq!(info.manufacturer, "IBM");
    assert!(info.software_tpm);
    // Nothing left loaded in the TPM.
    assert!(h::transient_handles(&board.tcti()).is_empty());
}

#[test]
fn created_ek_equals_tpm2_createek_and_is_not_persisted_or_left_loaded() {
    let board = h::board(SwtpmVariant::NoPersistedEk);
    let info = tpm::read_ek(&req(&board.tcti(), EkPolicy::ReadOrCreate)).unwrap();
    assert!(info.created && !info.persisted);
    assert!(h::transient_handles(&board.tcti()).is_empty());
    assert!(!h::ek_is_persisted(&board.tcti()));

    let theirs = h::tpm2_createek_rsa(&board.tcti(), board.dir.path());
    assert_eq!(info.tpm2b_public, theirs);
    assert_eq!(info.ek_b64, b64(&theirs));
    assert_eq!(
        info.ek_hash,
        python_registration_id(&board.dir.path().join("createek.pub"))
    );
    // No certificate on this board: a warning, not an error.
    assert!(info.ek_cert.is_none());
    assert!(
        info.warnings
            .iter()
            .any(|w| w == "no EK certificate at NV 0x01c00002"),
        "{:?}",
        info.warnings
    );
}

#[test]
fn persist_policy_leaves_the_ek_at_0x81010001() {
    let board = h::board(SwtpmVariant::NoPersistedEk);
    assert!(!h::ek_is_persisted(&board.tcti()));
    let first = tpm::read_ek(&req(&board.tcti(), EkPolicy::ReadOrCreatePersist)).unwrap();
    assert!(first.created && first.persisted);
    assert!(h::transient_handles(&board.tcti()).is_empty());

    let theirs = h::tpm2_readpublic_ek(&board.tcti(), board.dir.path());
    assert_eq!(first.tpm2b_public, theirs);

    // The next read finds it (no create) and it is the same key.
    let second = tpm::read_ek(&req(&board.tcti(), EkPolicy::ReadOnly)).unwrap();
    assert!(!second.created && second.persisted);
    assert_eq!(second.tpm2b_public, first.tpm2b_public);
}

#[test]
fn read_only_without_a_persisted_ek_is_no_ek() {
    let board = h::board(SwtpmVariant::NoPersistedEk);
    let err = tpm::read_ek(&req(&board.tcti(), EkPolicy::ReadOnly)).unwrap_err();
    assert_eq!(err, TpmError::NoEk);
    assert_eq!(err.reason(), "no-ek");
    assert_eq!(
        err.to_string(),
        "reading EK at 0x81010001: TPM_RC_HANDLE (no persistent EK; set ek = \"read-or-create\")"
    );
    // Nothing was created behind our back.
    assert!(!h::ek_is_persisted(&board.tcti()));
}

#[test]
fn ek_without_certificate_is_read_with_a_warning() {
    let board = h::board(SwtpmVariant::NoEkCert);
    let info = tpm::read_ek(&req(&board.tcti(), EkPolicy::ReadOnly)).unwrap();
    assert_eq!(
        info.tpm2b_public,
        h::tpm2_readpublic_ek(&board.tcti(), board.dir.path())
    );
    assert!(info.ek_cert.is_none());
    assert!(info
        .warnings
        .contains(&"no EK certificate at NV 0x01c00002".to_string()));
}

#[test]
fn require_hardware_tpm_refuses_swtpm() {
    let board = h::board(SwtpmVariant::NoEkCert);
    let mut r = req(&board.tcti(), EkPolicy::ReadOnly);
    r.require_hardware_tpm = true;
    let err = tpm::read_ek(&r).unwrap_err();
    assert!(
        matches!(&err, TpmError::SoftwareTpmRefused { manufacturer } if manufacturer == "IBM"),
        "{err}"
    );
    assert_eq!(err.reason(), "software-tpm");
}

#[test]
fn endorsement_auth_comes_from_the_credential_file() {
    let board = h::board(SwtpmVariant::NoPersistedEk);
    let status = Command::new("tpm2_changeauth")
        .args(["-c", "e", "str:s3cret-endorsement", "-T", &board.tcti()])
        .status()
        .unwrap();
    assert!(status.success());

    // Without the auth the TPM refuses CreatePrimary under the endorsement hierarchy.
    let err = tpm::read_ek(&req(&board.tcti(), EkPolicy::ReadOrCreate)).unwrap_err();
    match &err {
        TpmError::Tpm { step, name, .. } => {
            assert!(step.contains("CreatePrimary"), "{err}");
            assert!(name.contains("AUTH"), "{err}");
        }
        other => panic!("expected a TPM auth error, got {other}"),
    }
    assert!(h::transient_handles(&board.tcti()).is_empty());

    let auth_file = board.dir.path().join("endorsement-auth");
    std::fs::write(&auth_file, "str:s3cret-endorsement\n").unwrap();
    let mut r = req(&board.tcti(), EkPolicy::ReadOrCreate);
    r.endorsement_auth = Some(tpm::load_auth_file(&auth_file).unwrap());
    let info = tpm::read_ek(&r).unwrap();
    assert!(info.created);
    assert!(!format!("{r:?}").contains("s3cret"));
    assert!(h::transient_handles(&board.tcti()).is_empty());
    // tpm2_createek with the same auth makes the same key.
    let u = board.dir.path().join("ek-auth.pub");
    let c = board.dir.path().join("ek-auth.ctx");
    let status = Command::new("tpm2_createek")
        .args(["-G", "rsa", "-P", "str:s3cret-endorsement", "-u"])
        .arg(&u)
        .arg("-c")
        .arg(&c)
        .args(["-T", &board.tcti()])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(info.tpm2b_public, std::fs::read(&u).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapping_boards_on_one_slot_gives_each_board_its_own_ek() {
    let worker = TpmWorker::spawn("fixture-1");
    let mut first = h::board(SwtpmVariant::NoEkCert);
    let tcti = first.tcti();
    let port = first.port();
    let a = worker
        .read_ek(req(&tcti, EkPolicy::ReadOnly))
        .await
        .unwrap();
    assert_eq!(
        a.tpm2b_public,
        h::tpm2_readpublic_ek(&tcti, first.dir.path())
    );

    // Pull the board, put another one on the same fixture (same TCTI).
    first.kill();
    let second = h::board_on_port(SwtpmVariant::NoPersistedEk, port);
    assert_eq!(second.tcti(), tcti);
    let b = worker
        .read_ek(req(&tcti, EkPolicy::ReadOrCreatePersist))
        .await
        .unwrap();
    assert!(b.created);
    assert_eq!(
        b.tpm2b_public,
        h::tpm2_readpublic_ek(&tcti, second.dir.path())
    );
    assert_ne!(a.tpm2b_public, b.tpm2b_public);
    assert_ne!(a.registration_id, b.registration_id);

    // A third board on another TCTI, same worker.
    let third = h::board(SwtpmVariant::NoEkCert);
    let c = worker
        .read_ek(req(&third.tcti(), EkPolicy::ReadOnly))
        .await
        .unwrap();
    assert_eq!(
        c.tpm2b_public,
        h::tpm2_readpublic_ek(&third.tcti(), third.dir.path())
    );
    assert_ne!(c.tpm2b_public, a.tpm2b_public);
    assert_ne!(c.tpm2b_public, b.tpm2b_public);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_listening_is_unreachable() {
    let port = h::free_port_pair().unwrap();
    let worker = TpmWorker::spawn("empty-fixture");
    let started = Instant::now();
    let err = worker
        .read_ek(req(
            &format!("swtpm:host=127.0.0.1,port={port}"),
            EkPolicy::ReadOnly,
        ))
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    match &err {
        TpmError::Unreachable { step, .. } => {
            assert_eq!(
                step,
                &format!("opening TCTI swtpm:host=127.0.0.1,port={port}")
            )
        }
        other => panic!("expected Unreachable, got {other}"),
    }
    assert_eq!(err.reason(), "tpm-error");
}

#[test]
fn a_missing_tpm_device_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let tcti = format!("device:{}", dir.path().join("tpmrm0").display());
    let err = tpm::read_ek(&req(&tcti, EkPolicy::ReadOnly)).unwrap_err();
    match &err {
        TpmError::Unreachable { step, .. } => assert_eq!(step, &format!("opening TCTI {tcti}")),
        other => panic!("expected Unreachable, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tpm_that_never_answers_times_out_and_the_slot_keeps_working() {
    // A "TPM" that accepts connections on both ports and never answers.
    let (data, ctrl) = loop {
        let p = h::free_port_pair().unwrap();
        let d = TcpListener::bind((Ipv4Addr::LOCALHOST, p));
        let c = TcpListener::bind((Ipv4Addr::LOCALHOST, p + 1));
        if let (Ok(d), Ok(c)) = (d, c) {
            break (d, c);
        }
    };
    let port = data.local_addr().unwrap().port();
    for l in [data, ctrl] {
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for s in l.incoming() {
                held.push(s); // keep the connection open, say nothing
            }
        });
    }
    let worker = TpmWorker::spawn("hung-fixture");
    let mut r = req(
        &format!("swtpm:host=127.0.0.1,port={port}"),
        EkPolicy::ReadOnly,
    );
    r.timeout = Duration::from_millis(800);
    let started = Instant::now();
    let err = worker.read_ek(r).await.unwrap_err();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(3),
        "{took:?}"
    );
    match &err {
        TpmError::Timeout { step, timeout } => {
            assert_eq!(*timeout, Duration::from_millis(800));
            // The step the worker was in when the caller gave up.
            assert_eq!(
                step,
                &format!("opening TCTI swtpm:host=127.0.0.1,port={port}")
            );
        }
        other => panic!("expected Timeout, got {other}"),
    }
    assert!(
        err.to_string()
            .contains("no answer from the TPM within 800ms"),
        "{err}"
    );

    // The stuck TSS call cannot be cancelled, but the slot's worker takes the next board.
    let board = h::board(SwtpmVariant::NoEkCert);
    let info = worker
        .read_ek(req(&board.tcti(), EkPolicy::ReadOnly))
        .await
        .unwrap();
    assert_eq!(
        info.tpm2b_public,
        h::tpm2_readpublic_ek(&board.tcti(), board.dir.path())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tpm_killed_during_reads_gives_unreachable_not_a_hang() {
    let mut board = h::board(SwtpmVariant::NoPersistedEk);
    let tcti = board.tcti();
    let worker = std::sync::Arc::new(TpmWorker::spawn("flaky-fixture"));
    // Keep the TPM busy with create-primary reads, then kill -9 swtpm under them.
    let w = worker.clone();
    let t = tcti.clone();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let d = done.clone();
    let reads = tokio::spawn(async move {
        let mut ok = 0;
        loop {
            match w.read_ek(req(&t, EkPolicy::ReadOrCreate)).await {
                Ok(_) => {
                    ok += 1;
                    d.store(ok, std::sync::atomic::Ordering::SeqCst);
                }
                Err(e) => return (ok, e, Instant::now()),
            }
        }
    });
    // Kill only once the loop is demonstrably reading (a loaded CI machine can take a
    // while for the first create-primary), then shortly into a later read.
    let deadline = Instant::now() + Duration::from_secs(30);
    while done.load(std::sync::atomic::Ordering::SeqCst) < 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    let pid = board.pid().unwrap();
    let killed = Instant::now();
    let status = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let (ok, err, at) = tokio::time::timeout(Duration::from_secs(10), reads)
        .await
        .expect("the read loop must not hang")
        .unwrap();
    board.kill(); // reap
    eprintln!("after {ok} reads: {err}");
    assert!(ok >= 1, "reads before the kill succeeded");
    assert!(at.duration_since(killed) < Duration::from_secs(5));
    assert!(
        matches!(err, TpmError::Unreachable { .. }),
        "expected Unreachable, got {err}"
    );

    // The board comes back (same state, same TCTI): the slot's worker reads it again.
    board.restart().unwrap();
    let info = worker
        .read_ek(req(&tcti, EkPolicy::ReadOrCreate))
        .await
        .unwrap();
    assert!(info.created);
    assert!(h::transient_handles(&tcti).is_empty());
}

#[test]
fn a_failed_persist_flushes_the_created_ek() {
    let board = h::board(SwtpmVariant::NoPersistedEk);
    // An owner hierarchy auth the station does not know: EvictControl is refused.
    let status = Command::new("tpm2_changeauth")
        .args(["-c", "o", "str:owner-secret", "-T", &board.tcti()])
        .status()
        .unwrap();
    assert!(status.success());
    let err = tpm::read_ek(&req(&board.tcti(), EkPolicy::ReadOrCreatePersist)).unwrap_err();
    match &err {
        TpmError::Tpm {
            step, name, code, ..
        } => {
            assert_eq!(
                step,
                "persisting EK at 0x81010001 (EvictControl, owner hierarchy)"
            );
            assert_eq!(name, "TPM_RC_BAD_AUTH");
            assert_eq!(err.response_code(), Some(*code));
        }
        other => panic!("expected a TPM error, got {other}"),
    }
    assert!(h::transient_handles(&board.tcti()).is_empty());
    assert!(!h::ek_is_persisted(&board.tcti()));
}

#[test]
fn ek_command_prints_json_and_maps_exit_codes() {
    let board = h::board(SwtpmVariant::EkPersistedWithCert);
    let exe = env!("CARGO_BIN_EXE_dps-station");
    let out = Command::new(exe)
        .args(["ek", "--tcti", &board.tcti(), "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let theirs = h::tpm2_readpublic_ek(&board.tcti(), board.dir.path());
    assert_eq!(v["endorsementKey"], b64(&theirs));
    assert_eq!(
        v["registrationId"],
        python_registration_id(&board.dir.path().join("readpublic-ek.pub"))
    );
    assert_eq!(v["manufacturer"], "IBM");
    assert_eq!(v["softwareTpm"], true);
    assert_eq!(v["created"], false);
    assert_eq!(v["ekCertificate"]["sha256"].as_str().unwrap().len(), 64);

    // Plain text output names the same registration id.
    let out = Command::new(exe)
        .args(["ek", "--tcti", &board.tcti()])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains(v["registrationId"].as_str().unwrap()),
        "{text}"
    );
    assert!(
        text.contains("Endorsement Key:  AToAAQALAAMAsgAg"),
        "{text}"
    );

    // A bad TCTI is a usage error (2); an absent TPM is a failure (1).
    let out = Command::new(exe)
        .args(["ek", "--tcti", "swtpm:prot=1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("error: TCTI"));
    let port = h::free_port_pair().unwrap();
    let out = Command::new(exe)
        .args(["ek", "--tcti", &format!("swtpm:host=127.0.0.1,port={port}")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("TPM unreachable"));
}

#[test]
fn ek_command_creates_and_persists_only_when_asked() {
    let board = h::board(SwtpmVariant::NoPersistedEk);
    let exe = env!("CARGO_BIN_EXE_dps-station");
    let out = Command::new(exe)
        .args(["ek", "--tcti", &board.tcti()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("TPM_RC_HANDLE"), "{stderr}");
    assert!(
        stderr.contains("hint: pass --create-if-missing"),
        "{stderr}"
    );
    // One error line; the TSS C library's own log lines are silenced.
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with("error:")).count(),
        1,
        "{stderr}"
    );
    assert!(!stderr.contains("ERROR:esys"), "{stderr}");

    let out = Command::new(exe)
        .args(["ek", "--tcti", &board.tcti(), "--persist", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["created"], true);
    assert_eq!(v["persisted"], true);
    let theirs = h::tpm2_readpublic_ek(&board.tcti(), board.dir.path());
    assert_eq!(v["endorsementKey"], b64(&theirs));
}

#[test]
fn a_non_tcg_ek_already_persisted_is_read_as_is_and_flagged_against_the_cert() {
    // What `tpm_device_provision` leaves behind: the Azure SDK template (unique empty)
    // persisted at 0x81010001 on a TPM whose EK certificate is for the TCG EK.
    let board = h::board(SwtpmVariant::EkPersistedWithCert);
    let t = board.tcti();
    let d = board.dir.path();
    let run = |args: &[&str]| {
        let out = Command::new(args[0])
            .args(&args[1..])
            .args(["-T", &t])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let policy = d.join("policy-a.bin");
    // PolicySecret(TPM_RH_ENDORSEMENT), reference/tpm-ek.md §3.
    std::fs::write(
        &policy,
        hex::decode("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa").unwrap(),
    )
    .unwrap();
    let ctx = d.join("sdk-ek.ctx");
    run(&["tpm2_evictcontrol", "-C", "o", "-c", "0x81010001"]);
    run(&[
        "tpm2_createprimary",
        "-C",
        "e",
        "-g",
        "sha256",
        "-G",
        "rsa2048:null:aes128cfb",
        "-a",
        "restricted|decrypt|fixedtpm|fixedparent|adminwithpolicy|sensitivedataorigin",
        "-L",
        policy.to_str().unwrap(),
        "-c",
        ctx.to_str().unwrap(),
    ]);
    run(&[
        "tpm2_evictcontrol",
        "-C",
        "o",
        "-c",
        ctx.to_str().unwrap(),
        "0x81010001",
    ]);
    run(&["tpm2_flushcontext", "-t"]);

    let info = tpm::read_ek(&req(&t, EkPolicy::ReadOrCreatePersist)).unwrap();
    assert!(!info.created, "an occupied 0x81010001 is never replaced");
    assert_eq!(info.tpm2b_public, h::tpm2_readpublic_ek(&t, d));
    assert!(info.ek_cert.is_some());
    assert!(
        info.warnings
            .iter()
            .any(|w| w.contains("EK certificate does not match the EK")),
        "{:?}",
        info.warnings
    );
}

// ---------------------------------------------------------------------------------------
// swtpm on unix sockets (`swtpm:path=SOCKET`, control channel `SOCKET.ctrl`)
// ---------------------------------------------------------------------------------------

/// Thread ids of this test process with the given (kernel-truncated, 15-byte) name.
fn threads_named(name: &str) -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| {
            let t = t.ok()?;
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            (comm.trim_end() == name).then(|| t.file_name().to_string_lossy().into_owned())
        })
        .collect()
}

fn thread_alive(tid: &str) -> bool {
    std::path::Path::new("/proc/self/task").join(tid).exists()
}

#[test]
fn unix_socket_tcti_reads_the_ek_tpm2_tools_reads_and_holds_nothing_after() {
    let mut board = h::board_unix(SwtpmVariant::EkPersistedWithCert);
    let tcti = board.tcti();
    let socket = board.socket().unwrap().to_path_buf();
    assert_eq!(tcti, format!("swtpm:path={}", socket.display()));
    let info = tpm::read_ek(&req(&tcti, EkPolicy::ReadOnly)).unwrap();

    // tpm2-tools opens the same string with tpm2-tss's own swtpm TCTI (no relay).
    let theirs = h::tpm2_readpublic_ek(&tcti, board.dir.path());
    assert_eq!(info.tpm2b_public, theirs);
    assert_eq!(
        info.ek_hash,
        python_registration_id(&board.dir.path().join("readpublic-ek.pub"))
    );
    let cert = info.ek_cert.as_ref().expect("EK cert read from NV");
    let sha = Command::new("sha256sum")
        .arg(board.ek_cert_file().unwrap())
        .output()
        .unwrap();
    let sha = String::from_utf8(sha.stdout).unwrap();
    assert_eq!(cert.sha256_hex, sha.split_whitespace().next().unwrap());
    assert_eq!(info.manufacturer, "IBM");
    // swtpm serves one client at a time: tpm2-tools got in, so nothing is held; and
    // nothing is left loaded.
    assert!(h::transient_handles(&tcti).is_empty());

    // A second read of the same board gives the same key.
    let again = tpm::read_ek(&req(&tcti, EkPolicy::ReadOnly)).unwrap();
    assert_eq!(again.tpm2b_public, info.tpm2b_public);

    // The board is pulled (swtpm killed; its socket files stay, nobody listens).
    board.kill();
    let err = tpm::read_ek(&req(&tcti, EkPolicy::ReadOnly)).unwrap_err();
    match &err {
        TpmError::Unreachable { step, detail } => {
            assert_eq!(step, &format!("opening TCTI {tcti}"));
            assert!(
                detail.contains(&format!("swtpm data socket {}", socket.display())),
                "{err}"
            );
            assert!(detail.contains("refused"), "{err}");
        }
        other => panic!("expected Unreachable, got {other}"),
    }
}

#[test]
fn a_missing_unix_socket_is_unreachable_naming_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("no-board.sock");
    let tcti = format!("swtpm:path={}", socket.display());
    let started = Instant::now();
    let err = tpm::read_ek(&req(&tcti, EkPolicy::ReadOnly)).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(
        err,
        TpmError::Unreachable {
            step: format!("opening TCTI {tcti}"),
            detail: format!(
                "cannot connect to the swtpm data socket {}: No such file or directory (os error 2)",
                socket.display()
            ),
        }
    );
    assert_eq!(err.reason(), "tpm-error");
    // A data socket without its control socket is named too.
    let _data = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let err = tpm::read_ek(&req(&tcti, EkPolicy::ReadOnly)).unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("swtpm control socket {}.ctrl", socket.display())),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_unix_socket_times_out_and_the_stuck_read_is_released() {
    // A "swtpm" that accepts on both sockets and never answers.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("hung.sock");
    let ctrl = dir.path().join("hung.sock.ctrl");
    for path in [&socket, &ctrl] {
        let l = std::os::unix::net::UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for s in l.incoming() {
                held.push(s); // keep the connection open, say nothing
            }
        });
    }
    let tcti = format!("swtpm:path={}", socket.display());
    // "tpm-" + slot is the worker thread's name.
    let worker = TpmWorker::spawn("hung-unix");
    // A thread names itself once it runs: wait for that.
    let deadline = Instant::now() + Duration::from_secs(5);
    while threads_named("tpm-hung-unix").len() != 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let first = threads_named("tpm-hung-unix");
    assert_eq!(first.len(), 1);
    let stuck = &first[0];
    let mut r = req(&tcti, EkPolicy::ReadOnly);
    r.timeout = Duration::from_millis(800);
    let started = Instant::now();
    let err = worker.read_ek(r).await.unwrap_err();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(3),
        "{took:?}"
    );
    match &err {
        TpmError::Timeout { step, timeout } => {
            assert_eq!(*timeout, Duration::from_millis(800));
            assert_eq!(step, &format!("opening TCTI {tcti}"));
        }
        other => panic!("expected Timeout, got {other}"),
    }

    // The relay closed the connections the TSS was blocked on, so the abandoned worker
    // thread (and the relay thread it joins) ends instead of hanging for ever; only the
    // replacement worker thread is left.
    let deadline = Instant::now() + Duration::from_secs(5);
    while thread_alive(stuck) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!thread_alive(stuck), "the stuck read was released");

    // The slot's worker takes the next board, on unix sockets too.
    let board = h::board_unix(SwtpmVariant::NoEkCert);
    let info = worker
        .read_ek(req(&board.tcti(), EkPolicy::ReadOnly))
        .await
        .unwrap();
    assert_eq!(
        info.tpm2b_public,
        h::tpm2_readpublic_ek(&board.tcti(), board.dir.path())
    );
    assert!(info
        .warnings
        .contains(&"no EK certificate at NV 0x01c00002".to_string()));
}

#[test]
fn ek_command_reads_a_unix_socket_swtpm() {
    let board = h::board_unix(SwtpmVariant::NoPersistedEk);
    let exe = env!("CARGO_BIN_EXE_dps-station");
    let out = Command::new(exe)
        .args(["ek", "--tcti", &board.tcti(), "--persist", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["created"], true);
    assert_eq!(v["persisted"], true);
    let theirs = h::tpm2_readpublic_ek(&board.tcti(), board.dir.path());
    assert_eq!(v["endorsementKey"], b64(&theirs));
    assert_eq!(
        v["registrationId"],
        python_registration_id(&board.dir.path().join("readpublic-ek.pub"))
    );

    // No board on that fixture: exit 1 naming the socket.
    let missing = board.dir.path().join("other.sock");
    let out = Command::new(exe)
        .args(["ek", "--tcti", &format!("swtpm:path={}", missing.display())])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("TPM unreachable"), "{stderr}");
    assert!(
        stderr.contains(&format!("swtpm data socket {}", missing.display())),
        "{stderr}"
    );
    // Mixing unix and TCP options is a usage error.
    let out = Command::new(exe)
        .args(["ek", "--tcti", "swtpm:path=/tmp/x.sock,port=2321"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
