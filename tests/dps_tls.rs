//! The DPS command line over TLS: a test CA, an emulator serving a certificate for a
//! real-looking DPS host name, and the client resolving that name to 127.0.0.1 with
//! `--resolve`, so SAS signs `test-dps.azure-devices-provisioning.net` as in production.
//! Covers the lifecycle, bulk and paged queries, and every error path (400, the three 401s,
//! 404, 409, 412, 429 then success, bulk partial failure) once more over TLS.
mod common;

use std::path::PathBuf;
use std::time::Duration;

use dps_station::dps::{ClientOptions, ConnectionString, DpsClient, DpsError, TransportKind};
use dps_station::emulator::{EmulatorOptions, RunningEmulator};
use serde_json::{json, Value};

const HOST: &str = "test-dps.azure-devices-provisioning.net";
/// A real TPM2B_PUBLIC EK (reference/tpm-ek.md §2).
const EK: &str = "AToAAQALAAMAsgAgg3GXZ0SEs/gakMyNRqXXJP1S124GUgtk8qHaGzMUaaoABgCAAEMAEAgAAAAAAAEAtKEADl/sNRgmYAjP6gXmbccRaJoTnVixisUaek0OwAzFGN70xt9ZOYp6fhIwfcft3fdVKOrKpXYcTe72CGNkGJGlQz5ti9n2pQ0uJhcX8aefh4Onm7lVlUCQAVp1K0r6zI8vkEXWsBIvwvxk0eMJbFaq146kbTkJHIGczb89RkFH2TX+CgXeZOG9oXQzUNwktmTUacspamune5Wywc/ce8HsDFYchyUHogFhrZ/LPnzyTDXO8sSC5z5dvsUBtUME3iRYDyKgZOfBtmRMqQewD+4iH+ZEJjtsyJiWR8hFhyKROnOuqXfNFwjd5IcNU4wtlKO0cLyXmTOfQK6Da1pr5Q==";

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn ok(self) -> Self {
        assert_eq!(
            self.code, 0,
            "stdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

struct TlsEnv {
    emu: RunningEmulator,
    dir: tempfile::TempDir,
    pki: common::tls::TestPki,
    cs_file: PathBuf,
    endpoint: String,
}

impl TlsEnv {
    async fn new() -> TlsEnv {
        let dir = tempfile::tempdir().unwrap();
        let pki = common::tls::server_pki(dir.path(), HOST);
        let emu = common::emulator::start_with(EmulatorOptions {
            host_name: Some(HOST.to_string()),
            tls_cert: Some(pki.cert_file.clone()),
            tls_key: Some(pki.key_file.clone()),
            ..EmulatorOptions::default()
        })
        .await;
        let cs = emu.connection_string();
        assert!(cs.starts_with(&format!("HostName={HOST};")), "{cs}");
        let cs_file = dir.path().join("cs");
        std::fs::write(&cs_file, &cs).unwrap();
        let endpoint = format!("https://{HOST}:{}", emu.addr().port());
        TlsEnv {
            emu,
            dir,
            pki,
            cs_file,
            endpoint,
        }
    }

    /// Run with the connection string, endpoint, CA file and DNS override.
    async fn run(&self, args: &[&str]) -> Out {
        let resolve = format!("{HOST}:127.0.0.1");
        let mut full = vec![
            "--connection-string-file",
            self.cs_file.to_str().unwrap(),
            "--endpoint",
            &self.endpoint,
            "--ca-file",
            self.pki.ca_file.to_str().unwrap(),
            // A global option: before the subcommand here, after it in other tests.
            "--resolve",
            &resolve,
        ];
        full.extend_from_slice(args);
        self.run_raw(&full, &[]).await
    }

    async fn run_raw(&self, args: &[&str], env: &[(&str, &str)]) -> Out {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_dps-station"));
        cmd.args(args)
            .env_remove("DPS_CONNECTION_STRING")
            .env_remove("DPS_STATION_RESOLVE")
            .stdin(std::process::Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let o = tokio::time::timeout(Duration::from_secs(60), cmd.output())
            .await
            .unwrap()
            .unwrap();
        let out = Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        };
        let key = common::emulator::parse_connection_string(&self.emu.connection_string()).key;
        for t in [&out.stdout, &out.stderr] {
            assert!(
                !t.contains(&key) && !t.contains("sig="),
                "secret printed: {t}"
            );
        }
        out
    }
}

#[test]
fn test_pki_makes_a_server_cert_for_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let pki = common::tls::server_pki(dir.path(), HOST);
    let pem = pem::parse(&pki.cert_pem).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(pem.contents()).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert!(format!("{:?}", san.value).contains(HOST));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&pki.key_file)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_lifecycle_over_tls_with_a_real_looking_host() {
    let env = TlsEnv::new().await;
    let created = env
        .run(&[
            "--json",
            "enrollment",
            "create",
            "--registration-id",
            "tls-board-1",
            "--tpm-ek",
            EK,
            "--device-id",
            "d1",
        ])
        .await
        .ok()
        .json();
    assert_eq!(created["registrationId"], "tls-board-1");
    let got = env
        .run(&["enrollment", "get", "tls-board-1", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(got["deviceId"], "d1");
    let upd = env
        .run(&[
            "enrollment",
            "update",
            "tls-board-1",
            "--device-id",
            "d2",
            "--json",
        ])
        .await
        .ok()
        .json();
    assert_eq!(upd["deviceId"], "d2");
    let stale = created["etag"].as_str().unwrap();
    let out = env
        .run(&[
            "enrollment",
            "update",
            "tls-board-1",
            "--etag",
            stale,
            "--device-id",
            "d3",
        ])
        .await;
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("etag conflict"), "{}", out.stderr);
    assert_eq!(
        env.run(&["enrollment", "attestation", "tls-board-1", "--json"])
            .await
            .ok()
            .json()["type"],
        "tpm"
    );

    // Bulk (3 chunks) and a paged query over the same TLS connection setup.
    let items: Vec<Value> = (0..21)
        .map(|i| json!({"registrationId": format!("tls-bulk-{i}"), "attestation": {"type": "tpm", "tpm": {"endorsementKey": EK}}}))
        .collect();
    let f = env.dir.path().join("bulk.json");
    std::fs::write(&f, serde_json::to_string(&items).unwrap()).unwrap();
    let rep = env
        .run(&["bulk", "create", "--file", f.to_str().unwrap(), "--json"])
        .await
        .ok()
        .json();
    assert_eq!(rep, json!({"isSuccessful": true, "errors": []}));
    let all = env
        .run(&["enrollment", "query", "--page-size", "5", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(all.as_array().unwrap().len(), 22);
    let stats = env.emu.stats();
    assert_eq!(
        stats
            .by_operation
            .get("IndividualEnrollment_RunBulkOperation"),
        Some(&3)
    );
    assert_eq!(
        stats.by_operation.get("IndividualEnrollment_Query"),
        Some(&5)
    );

    // Groups and registrations.
    env.run(&[
        "group",
        "create",
        "--group-id",
        "tls-group",
        "--ca-reference",
        "line-ca",
    ])
    .await
    .ok();
    assert_eq!(
        env.run(&["registration", "query", "tls-group", "--json"])
            .await
            .ok()
            .json(),
        json!([])
    );
    env.run(&["group", "delete", "tls-group"]).await.ok();

    // The DNS override also works from the environment.
    let resolve = format!("{HOST}:127.0.0.1");
    let out = env
        .run_raw(
            &[
                "--connection-string-file",
                env.cs_file.to_str().unwrap(),
                "--endpoint",
                &env.endpoint,
                "--ca-file",
                env.pki.ca_file.to_str().unwrap(),
                "enrollment",
                "delete",
                "tls-board-1",
            ],
            &[("DPS_STATION_RESOLVE", &resolve)],
        )
        .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "deleted enrollment tls-board-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_certificate_fails_fast_with_a_hint_and_no_retries() {
    let env = TlsEnv::new().await;
    let resolve = format!("{HOST}:127.0.0.1");
    let t = std::time::Instant::now();
    let out = env
        .run_raw(
            &[
                "--connection-string-file",
                env.cs_file.to_str().unwrap(),
                "--endpoint",
                &env.endpoint,
                "enrollment",
                "get",
                "tls-board-1",
                "--resolve",
                &resolve,
            ],
            &[],
        )
        .await;
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("--ca-file"),
        "hint names --ca-file: {}",
        out.stderr
    );
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert!(
        lines.len() == 2 && lines[0].starts_with("error: ") && lines[1].starts_with("hint: "),
        "one error line and a hint, no TLS library warnings: {}",
        out.stderr
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "a TLS failure is not retried for 5 minutes"
    );
    assert_eq!(env.emu.stats().requests, 0);

    // Library: the typed error says TLS.
    let cs = ConnectionString::parse(&env.emu.connection_string()).unwrap();
    let c = DpsClient::new(
        cs.clone(),
        ClientOptions {
            endpoint: Some(env.endpoint.clone()),
            resolve: vec![(HOST.to_string(), "127.0.0.1:0".parse().unwrap())],
            ..ClientOptions::default()
        },
    )
    .unwrap();
    let e = c.get_enrollment("x-1").await.unwrap_err();
    assert!(
        matches!(
            e,
            DpsError::Transport {
                kind: TransportKind::Tls,
                ..
            }
        ),
        "{e}"
    );
    assert!(!e.is_retryable());

    // A CA file with no certificate in it is a usage error.
    let empty = env.dir.path().join("empty.pem");
    std::fs::write(&empty, "nothing here\n").unwrap();
    let e = DpsClient::new(
        cs,
        ClientOptions {
            ca_file: Some(empty),
            ..ClientOptions::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e, DpsError::Config(_)), "{e}");

    // Plain http to the real-looking (non-loopback) name is refused before sending.
    let out = env
        .run_raw(
            &[
                "--connection-string-file",
                env.cs_file.to_str().unwrap(),
                "--endpoint",
                &format!("http://{HOST}:{}", env.emu.addr().port()),
                "enrollment",
                "get",
                "x-1",
                "--resolve",
                &resolve,
            ],
            &[],
        )
        .await;
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("loopback"), "{}", out.stderr);
}

impl TlsEnv {
    /// A library client that reaches the emulator the way the CLI does here.
    fn library_client(&self, cs: ConnectionString) -> DpsClient {
        DpsClient::new(
            cs,
            ClientOptions {
                endpoint: Some(self.endpoint.clone()),
                ca_file: Some(self.pki.ca_file.clone()),
                resolve: vec![(HOST.to_string(), "127.0.0.1:0".parse().unwrap())],
                retry_budget: Duration::from_secs(20),
                ..ClientOptions::default()
            },
        )
        .unwrap()
    }
}

fn assert_one_error_line(out: &Out, code: i32, needle: &str) {
    assert_eq!(
        out.code, code,
        "stdout: {}\nstderr: {}",
        out.stdout, out.stderr
    );
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert!(
        matches!(lines.len(), 1 | 2) && lines[0].starts_with("error: "),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.to_lowercase().contains(&needle.to_lowercase()),
        "stderr lacks {needle:?}: {}",
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_path_over_tls() {
    use dps_station::dps::{AttestationMechanism, IndividualEnrollment};
    let env = TlsEnv::new().await;
    let cs = ConnectionString::parse(&env.emu.connection_string()).unwrap();
    env.run(&[
        "enrollment",
        "create",
        "--registration-id",
        "e-1",
        "--tpm-ek",
        EK,
    ])
    .await
    .ok();

    // 404 and 409: exit 1, one line.
    assert_one_error_line(
        &env.run(&["enrollment", "get", "missing-1"]).await,
        1,
        "not found",
    );
    assert_one_error_line(
        &env.run(&[
            "enrollment",
            "create",
            "--registration-id",
            "e-1",
            "--tpm-ek",
            EK,
        ])
        .await,
        1,
        "already exists",
    );

    // 400: the service refuses an EK that is not a TPM2B (sent through the library,
    // because the CLI refuses it before sending).
    let c = env.library_client(cs.clone());
    let err = c
        .create_or_update_enrollment(
            &IndividualEnrollment::new("bad-ek-1", AttestationMechanism::tpm("AA==")),
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, DpsError::BadRequest(_)), "{err}");

    // 401: wrong key (CLI), expired token, wrong policy (library).
    let p = common::emulator::parse_connection_string(&env.emu.connection_string());
    let wrong = env.dir.path().join("wrong-cs");
    std::fs::write(
        &wrong,
        format!(
            "HostName={};SharedAccessKeyName={};SharedAccessKey=MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
            p.host_name, p.policy
        ),
    )
    .unwrap();
    let resolve = format!("{HOST}:127.0.0.1");
    let out = env
        .run_raw(
            &[
                "--connection-string-file",
                wrong.to_str().unwrap(),
                "--endpoint",
                &env.endpoint,
                "--ca-file",
                env.pki.ca_file.to_str().unwrap(),
                "--resolve",
                &resolve,
                "enrollment",
                "get",
                "e-1",
            ],
            &[],
        )
        .await;
    assert_one_error_line(&out, 1, "401");
    let expired = common::emulator::sas_token_at(&p.host_name, &p.policy, &p.key, 1_000_000);
    let e = env
        .library_client(cs.clone())
        .with_sas_token(dps_station::secret::Secret::new(expired))
        .get_enrollment("e-1")
        .await
        .unwrap_err();
    assert!(matches!(e, DpsError::Unauthorized(_)), "{e}");
    let e = env
        .library_client(cs.with_key_name("enrollmentread"))
        .get_enrollment("e-1")
        .await
        .unwrap_err();
    assert!(matches!(e, DpsError::Unauthorized(_)), "{e}");

    // Bulk partial failure: one existing id among new ones → exit 3.
    let items: Vec<Value> = ["e-1", "e-2", "e-3"]
        .iter()
        .map(|id| json!({"registrationId": id, "attestation": {"type": "tpm", "tpm": {"endorsementKey": EK}}}))
        .collect();
    let f = env.dir.path().join("partial.json");
    std::fs::write(&f, serde_json::to_string(&items).unwrap()).unwrap();
    let out = env
        .run(&["bulk", "create", "--file", f.to_str().unwrap(), "--json"])
        .await;
    assert_eq!(out.code, 3, "{}", out.stderr);
    let rep = out.json();
    assert_eq!(rep["errors"][0]["registrationId"], "e-1");
    assert_eq!(rep["errors"][0]["errorCode"], 409201);

    // 429 + Retry-After, then success: a quota of 60/min (bursts of 6), 9 calls at once.
    env.emu.set_ops_per_minute(Some(60));
    let c = env.library_client(cs.clone());
    let calls = (0..9).map(|_| c.get_enrollment("e-2"));
    for r in futures::future::join_all(calls).await {
        assert_eq!(r.unwrap().registration_id, "e-2");
    }
    assert!(env.emu.stats().throttled > 0, "{:?}", env.emu.stats());
}
