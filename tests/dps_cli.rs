//! The DPS command line against the project's DPS emulator over real HTTP: every
//! enrollment, group, bulk and registration operation, every error path, and bad input
//! that must exit 2 with nothing sent. Each test starts its own emulator on 127.0.0.1:0
//! and runs the real `dps-station` binary.
mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use dps_station::dps::{
    AttestationMechanism, ClientOptions, ConnectionString, DpsClient, DpsError,
    IndividualEnrollment, OperationMode,
};
use dps_station::emulator::{EmulatorOptions, RunningEmulator};
use serde_json::{json, Value};

/// A real TPM2B_PUBLIC EK (reference/tpm-ek.md §2).
const EK: &str = "AToAAQALAAMAsgAgg3GXZ0SEs/gakMyNRqXXJP1S124GUgtk8qHaGzMUaaoABgCAAEMAEAgAAAAAAAEAtKEADl/sNRgmYAjP6gXmbccRaJoTnVixisUaek0OwAzFGN70xt9ZOYp6fhIwfcft3fdVKOrKpXYcTe72CGNkGJGlQz5ti9n2pQ0uJhcX8aefh4Onm7lVlUCQAVp1K0r6zI8vkEXWsBIvwvxk0eMJbFaq146kbTkJHIGczb89RkFH2TX+CgXeZOG9oXQzUNwktmTUacspamune5Wywc/ce8HsDFYchyUHogFhrZ/LPnzyTDXO8sSC5z5dvsUBtUME3iRYDyKgZOfBtmRMqQewD+4iH+ZEJjtsyJiWR8hFhyKROnOuqXfNFwjd5IcNU4wtlKO0cLyXmTOfQK6Da1pr5Q==";

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\nstderr: {}",
                self.stdout, self.stderr
            )
        })
    }
    fn ok(self) -> Self {
        assert_eq!(
            self.code, 0,
            "stdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }
}

struct Env {
    emu: RunningEmulator,
    dir: tempfile::TempDir,
    cs_file: PathBuf,
    key: String,
}

impl Env {
    async fn new() -> Env {
        Env::with(EmulatorOptions::default()).await
    }

    async fn with(opts: EmulatorOptions) -> Env {
        let emu = common::emulator::start_with(opts).await;
        let dir = tempfile::tempdir().unwrap();
        let cs = emu.connection_string();
        let key = common::emulator::parse_connection_string(&cs).key;
        let cs_file = dir.path().join("dps-connection-string");
        std::fs::write(&cs_file, format!("{cs}\n")).unwrap();
        Env {
            emu,
            dir,
            cs_file,
            key,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Run `dps-station --connection-string-file CS ARGS`.
    async fn run(&self, args: &[&str]) -> Out {
        let mut full = vec!["--connection-string-file", self.cs_file.to_str().unwrap()];
        full.extend_from_slice(args);
        self.run_raw(&full, &[]).await
    }

    /// Run `dps-station ARGS` with extra env; asserts no key material is printed.
    async fn run_raw(&self, args: &[&str], env: &[(&str, &str)]) -> Out {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_dps-station"));
        cmd.args(args)
            .env_remove("DPS_CONNECTION_STRING")
            .env_remove("DPS_STATION_RESOLVE")
            .env_remove("DPS_STATION_CONFIG")
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let o = tokio::time::timeout(Duration::from_secs(60), cmd.output())
            .await
            .expect("dps-station finished within 60 s")
            .expect("run dps-station");
        let out = Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        };
        for text in [&out.stdout, &out.stderr] {
            assert!(!text.contains(&self.key), "key printed: {text}");
            assert!(
                !text.contains(&self.key[..12]),
                "key prefix printed: {text}"
            );
            assert!(
                !text.contains("SharedAccessSignature sr="),
                "token printed: {text}"
            );
            assert!(!text.contains("sig="), "signature printed: {text}");
        }
        out
    }

    fn requests(&self) -> u64 {
        self.emu.stats().requests
    }

    fn op_count(&self, op: &str) -> u64 {
        self.emu.stats().by_operation.get(op).copied().unwrap_or(0)
    }

    fn library_client(&self, opts: ClientOptions) -> DpsClient {
        let cs = ConnectionString::parse(&self.emu.connection_string()).unwrap();
        DpsClient::new(cs, opts).unwrap()
    }
}

fn assert_usage(out: &Out, needle: &str) {
    assert_eq!(
        out.code, 2,
        "expected exit 2\nstdout: {}\nstderr: {}",
        out.stdout, out.stderr
    );
    assert_one_error_line(out);
    assert!(
        out.stderr.to_lowercase().contains(&needle.to_lowercase()),
        "stderr lacks {needle:?}: {}",
        out.stderr
    );
}

/// DESIGN §3: an error is one `error: …` line on stderr, optionally one `hint: …` line,
/// and nothing else (no log lines on the way).
fn assert_one_error_line(out: &Out) {
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert!(
        matches!(lines.len(), 1 | 2) && lines[0].starts_with("error: "),
        "one error line: {}",
        out.stderr
    );
    if let Some(hint) = lines.get(1) {
        assert!(
            hint.starts_with("hint: "),
            "second line is a hint: {}",
            out.stderr
        );
    }
}

fn assert_failed(out: &Out, needle: &str) {
    assert_eq!(
        out.code, 1,
        "expected exit 1\nstdout: {}\nstderr: {}",
        out.stdout, out.stderr
    );
    assert_one_error_line(out);
    assert!(
        out.stderr.to_lowercase().contains(&needle.to_lowercase()),
        "stderr lacks {needle:?}: {}",
        out.stderr
    );
}

fn tpm_item(id: &str) -> Value {
    json!({"registrationId": id, "attestation": {"type": "tpm", "tpm": {"endorsementKey": EK}}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_enrollment_lifecycle_get_update_attestation_query_delete() {
    let env = Env::new().await;
    let twin = r#"{"tags":{"line":"A","serial":"SN-1"},"properties":{"desired":{"interval":30}}}"#;
    let out = env
        .run(&[
            "--json",
            "enrollment",
            "create",
            "--registration-id",
            "board-0001",
            "--tpm-ek",
            EK,
            "--device-id",
            "dev-0001",
            "--iot-hub",
            "line-a.azure-devices.net",
            "--provisioning-status",
            "enabled",
            "--initial-twin",
            twin,
            "--allocation-policy",
            "hashed",
            "--edge",
        ])
        .await
        .ok();
    let created = out.json();
    assert_eq!(created["registrationId"], "board-0001");
    assert_eq!(created["attestation"]["tpm"]["endorsementKey"], EK);
    assert_eq!(created["capabilities"]["iotEdge"], true);
    assert_eq!(created["initialTwin"]["tags"]["serial"], "SN-1");
    let etag1 = created["etag"].as_str().unwrap().to_string();

    // get --json prints the wire object.
    let got = env
        .run(&["enrollment", "get", "board-0001", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(got["deviceId"], "dev-0001");
    assert_eq!(got["iotHubHostName"], "line-a.azure-devices.net");
    assert_eq!(got["allocationPolicy"], "hashed");
    assert_eq!(got["etag"], etag1.as_str());
    // Human output: aligned key/value lines.
    let human = env.run(&["enrollment", "get", "board-0001"]).await.ok();
    assert!(human.stdout.contains("registrationId") && human.stdout.contains("board-0001"));

    // update: only the given field changes; the rest (twin, hub, edge) stays.
    let before = env.op_count("IndividualEnrollment_Get");
    let upd = env
        .run(&[
            "enrollment",
            "update",
            "board-0001",
            "--device-id",
            "dev-0002",
            "--provisioning-status",
            "disabled",
            "--json",
        ])
        .await
        .ok()
        .json();
    assert_eq!(
        env.op_count("IndividualEnrollment_Get"),
        before + 1,
        "update reads the latest first"
    );
    assert_eq!(upd["deviceId"], "dev-0002");
    assert_eq!(upd["provisioningStatus"], "disabled");
    assert_eq!(upd["initialTwin"]["properties"]["desired"]["interval"], 30);
    assert_eq!(upd["iotHubHostName"], "line-a.azure-devices.net");
    assert_eq!(upd["capabilities"]["iotEdge"], true);
    assert_ne!(upd["etag"], etag1.as_str(), "a new etag after update");
    // `--edge false` clears the flag.
    let upd = env
        .run(&[
            "enrollment",
            "update",
            "board-0001",
            "--edge",
            "false",
            "--json",
        ])
        .await
        .ok()
        .json();
    assert_eq!(upd["capabilities"]["iotEdge"], false);

    // attestation --json is the AttestationMechanism.
    let att = env
        .run(&["enrollment", "attestation", "board-0001", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(att["type"], "tpm");
    assert_eq!(att["tpm"]["endorsementKey"], EK);

    // query: one JSON array; the human table has a header and a count.
    let all = env
        .run(&["enrollment", "query", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(all.as_array().unwrap().len(), 1);
    let table = env.run(&["enrollment", "query"]).await.ok();
    assert!(
        table.stdout.starts_with("REGISTRATION ID"),
        "{}",
        table.stdout
    );
    assert!(table.stdout.contains("board-0001") && table.stdout.contains("1 enrollment(s)"));

    // delete, then get → 404, exit 1, naming the id and errorCode.
    env.run(&["enrollment", "delete", "board-0001"]).await.ok();
    let missing = env.run(&["enrollment", "get", "board-0001"]).await;
    assert_failed(&missing, "not found");
    assert_eq!(missing.stdout, "", "nothing on stdout for a failure");
    assert!(
        missing.stderr.contains("board-0001") && missing.stderr.contains("404"),
        "{}",
        missing.stderr
    );
    let missing = env.run(&["enrollment", "delete", "board-0001"]).await;
    assert_failed(&missing, "not found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_ek_file_raw_and_base64() {
    let env = Env::new().await;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(EK)
        .unwrap();
    let bin = env.path("ek.bin");
    std::fs::write(&bin, &raw).unwrap();
    let txt = env.write("ek.b64", &format!("{EK}\n"));
    for (id, f) in [("ek-file-bin", &bin), ("ek-file-b64", &txt)] {
        let e = env
            .run(&[
                "--json",
                "enrollment",
                "create",
                "--registration-id",
                id,
                "--tpm-ek-file",
                f.to_str().unwrap(),
            ])
            .await
            .ok()
            .json();
        assert_eq!(e["attestation"]["tpm"]["endorsementKey"], EK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_enrollment_group_and_registration_operations() {
    let env = Env::new().await;
    let leaf = env.write("leaf.pem", &common::tls::device_cert_pem("x509-board-7"));
    // CN differs only in case: accepted (ids are case-insensitive).
    let e = env
        .run(&[
            "--json",
            "enrollment",
            "create",
            "--registration-id",
            "X509-Board-7",
            "--x509-cert",
            leaf.to_str().unwrap(),
        ])
        .await
        .ok()
        .json();
    let info = &e["attestation"]["x509"]["clientCertificates"]["primary"]["info"];
    assert_eq!(
        info["subjectName"]
            .as_str()
            .map(|s| s.contains("x509-board-7")),
        Some(true),
        "{e}"
    );
    // Without --registration-id the CN is used.
    let leaf2 = env.write("leaf2.pem", &common::tls::device_cert_pem("x509-board-8"));
    let e2 = env
        .run(&[
            "--json",
            "enrollment",
            "create",
            "--x509-cert",
            leaf2.to_str().unwrap(),
        ])
        .await
        .ok()
        .json();
    assert_eq!(e2["registrationId"], "x509-board-8");
    // get → update round trip of an X.509 record (info only, no certificate text) works.
    env.run(&[
        "enrollment",
        "update",
        "x509-board-8",
        "--device-id",
        "dev-8",
    ])
    .await
    .ok();
    let att = env
        .run(&["enrollment", "attestation", "x509-board-8", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(att["type"], "x509");

    // Groups: a CA certificate, then a CA reference.
    let ca = env.write("ca.pem", &common::tls::ca_cert_pem("Line A Devices CA"));
    let g = env
        .run(&[
            "--json",
            "group",
            "create",
            "--group-id",
            "line-a",
            "--x509-ca-cert",
            ca.to_str().unwrap(),
            "--iot-hub",
            "line-a.azure-devices.net",
        ])
        .await
        .ok()
        .json();
    assert_eq!(g["enrollmentGroupId"], "line-a");
    assert!(
        g["attestation"]["x509"]["signingCertificates"]["primary"]["info"].is_object(),
        "{g}"
    );
    env.run(&[
        "group",
        "create",
        "--group-id",
        "line-b",
        "--ca-reference",
        "line-b-ca",
    ])
    .await
    .ok();
    let got = env
        .run(&["group", "get", "line-b", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(
        got["attestation"]["x509"]["caReferences"]["primary"],
        "line-b-ca"
    );
    let upd = env
        .run(&[
            "group",
            "update",
            "line-b",
            "--provisioning-status",
            "disabled",
            "--json",
        ])
        .await
        .ok()
        .json();
    assert_eq!(upd["provisioningStatus"], "disabled");
    assert_eq!(
        upd["attestation"]["x509"]["caReferences"]["primary"],
        "line-b-ca"
    );
    let ga = env
        .run(&["group", "attestation", "line-a", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(ga["type"], "x509");
    let groups = env.run(&["group", "query", "--json"]).await.ok().json();
    assert_eq!(groups.as_array().unwrap().len(), 2);
    let table = env.run(&["group", "query"]).await.ok();
    assert!(
        table.stdout.starts_with("GROUP ID") && table.stdout.contains("2 group(s)"),
        "{}",
        table.stdout
    );

    // Registration states: none exist until a device registers.
    let regs = env
        .run(&["registration", "query", "line-a", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(regs, json!([]));
    assert_failed(
        &env.run(&["registration", "get", "x509-board-7"]).await,
        "not found",
    );
    assert_failed(
        &env.run(&["registration", "delete", "x509-board-7"]).await,
        "not found",
    );
    for op in [
        "DeviceRegistrationState_Query",
        "DeviceRegistrationState_Get",
        "DeviceRegistrationState_Delete",
    ] {
        assert_eq!(env.op_count(op), 1, "{op}");
    }

    env.run(&["group", "delete", "line-a"]).await.ok();
    env.run(&["group", "delete", "line-b", "--force"])
        .await
        .ok();
    assert_failed(&env.run(&["group", "get", "line-a"]).await, "not found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etag_conflicts_exit_1_and_force_overrides() {
    let env = Env::new().await;
    let e = env
        .run(&[
            "--json",
            "enrollment",
            "create",
            "--registration-id",
            "etag-1",
            "--tpm-ek",
            EK,
        ])
        .await
        .ok()
        .json();
    let stale = e["etag"].as_str().unwrap().to_string();
    env.run(&[
        "enrollment",
        "update",
        "etag-1",
        "--etag",
        &stale,
        "--device-id",
        "d1",
    ])
    .await
    .ok();

    let out = env
        .run(&[
            "enrollment",
            "update",
            "etag-1",
            "--etag",
            &stale,
            "--device-id",
            "d2",
        ])
        .await;
    assert_failed(&out, "etag conflict");
    assert!(
        out.stderr.contains(&stale) && out.stderr.contains("412"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("hint: "), "{}", out.stderr);
    let got = env
        .run(&["enrollment", "get", "etag-1", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(got["deviceId"], "d1", "nothing changed on 412");

    let out = env
        .run(&["enrollment", "delete", "etag-1", "--etag", &stale])
        .await;
    assert_failed(&out, "etag conflict");
    env.run(&[
        "enrollment",
        "update",
        "etag-1",
        "--force",
        "--device-id",
        "d3",
    ])
    .await
    .ok();
    let current = env
        .run(&["enrollment", "get", "etag-1", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(current["deviceId"], "d3");
    env.run(&[
        "enrollment",
        "delete",
        "etag-1",
        "--etag",
        current["etag"].as_str().unwrap(),
    ])
    .await
    .ok();

    // Group 412 too.
    env.run(&[
        "group",
        "create",
        "--group-id",
        "g-etag",
        "--ca-reference",
        "ca",
    ])
    .await
    .ok();
    let out = env
        .run(&[
            "group",
            "update",
            "g-etag",
            "--etag",
            &stale,
            "--iot-hub",
            "h.azure-devices.net",
        ])
        .await;
    assert_failed(&out, "etag conflict");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_of_an_existing_id_is_409_exit_1() {
    let env = Env::new().await;
    env.run(&[
        "enrollment",
        "create",
        "--registration-id",
        "dup-1",
        "--tpm-ek",
        EK,
    ])
    .await
    .ok();
    let out = env
        .run(&[
            "enrollment",
            "create",
            "--registration-id",
            "DUP-1",
            "--tpm-ek",
            EK,
        ])
        .await;
    assert_failed(&out, "already exists");
    assert!(out.stderr.contains("409"), "{}", out.stderr);
    assert_eq!(env.emu.stats().creates.get("dup-1"), Some(&1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthorized_wrong_key_expired_token_wrong_policy() {
    let env = Env::new().await;
    let p = common::emulator::parse_connection_string(&env.emu.connection_string());
    let wrong_key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    let bad = env.write(
        "bad-cs",
        &format!(
            "HostName={};SharedAccessKeyName={};SharedAccessKey={wrong_key}",
            p.host_name, p.policy
        ),
    );
    let out = env
        .run_raw(
            &[
                "--connection-string-file",
                bad.to_str().unwrap(),
                "enrollment",
                "get",
                "any-1",
            ],
            &[],
        )
        .await;
    assert_failed(&out, "unauthorized");
    assert!(out.stderr.contains("401"), "{}", out.stderr);
    assert!(!out.stderr.contains(&wrong_key[..12]));
    // The same via the environment variable.
    let cs = format!(
        "HostName={};SharedAccessKeyName={};SharedAccessKey={wrong_key}",
        p.host_name, p.policy
    );
    let out = env
        .run_raw(
            &["enrollment", "get", "any-1"],
            &[("DPS_CONNECTION_STRING", &cs)],
        )
        .await;
    assert_failed(&out, "unauthorized");

    // Library: an expired token, and a token for another policy.
    let opts = ClientOptions {
        retry_budget: Duration::ZERO,
        ..ClientOptions::default()
    };
    let key = base64::engine::general_purpose::STANDARD
        .decode(&p.key)
        .unwrap();
    let expired = dps_station::dps::sas::sas_token(&p.host_name, &p.policy, &key, 1_000_000);
    let c = env.library_client(opts.clone()).with_sas_token(expired);
    let e = c.get_enrollment("any-1").await.unwrap_err();
    assert!(matches!(e, DpsError::Unauthorized(_)), "{e}");
    assert_eq!(e.status(), Some(401));
    assert!(!e.to_string().contains("sig="), "{e}");

    let cs = ConnectionString::parse(&env.emu.connection_string())
        .unwrap()
        .with_key_name("enrollmentread-other");
    let c = DpsClient::new(cs, opts).unwrap();
    let e = c.get_enrollment("any-1").await.unwrap_err();
    assert!(matches!(e, DpsError::Unauthorized(_)), "{e}");
    assert!(!e.is_retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_request_400_from_the_service() {
    let env = Env::new().await;
    // The CLI validates EKs, so send a bad one through the library: the service says 400.
    let c = env.library_client(ClientOptions::default());
    let e = IndividualEnrollment::new("bad-ek-1", AttestationMechanism::tpm("AA=="));
    let err = c.create_or_update_enrollment(&e, None).await.unwrap_err();
    assert!(matches!(err, DpsError::BadRequest(_)), "{err}");
    assert!(err.error_code().is_some_and(|c| c / 1000 == 400), "{err}");
    assert!(!err.is_retryable());
    assert_eq!(
        env.op_count("IndividualEnrollment_CreateOrUpdate"),
        1,
        "400 is not retried"
    );
    // A query the service refuses: exit 1 with the service's message.
    let out = env
        .run(&[
            "enrollment",
            "query",
            "--query",
            "SELECT deviceId FROM nowhere",
        ])
        .await;
    assert_failed(&out, "400");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_quietly_within_the_budget() {
    // 429 and 503 answered without Retry-After, and dropped connections: backoff with
    // jitter, then success. Retries are logged at INFO: silent by default, shown with -v.
    let env = Env::new().await;
    env.run(&[
        "enrollment",
        "create",
        "--registration-id",
        "thr-1",
        "--tpm-ek",
        EK,
    ])
    .await
    .ok();
    for (i, spec) in [
        "error-rate=1,status=429",
        "error-rate=1,status=503",
        "reset-rate=1",
    ]
    .into_iter()
    .enumerate()
    {
        env.emu.set_faults(spec).unwrap();
        let before = env.requests();
        let clear = async {
            let deadline = Instant::now() + Duration::from_secs(20);
            while env.requests() < before + 2 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            env.emu.set_faults("").unwrap();
        };
        let verbose = i == 0;
        let args: &[&str] = if verbose {
            &["-v", "enrollment", "get", "thr-1", "--json"]
        } else {
            &["enrollment", "get", "thr-1", "--json"]
        };
        let (out, ()) = tokio::join!(env.run(args), clear);
        let out = out.ok();
        assert_eq!(out.json()["registrationId"], "thr-1");
        assert!(
            env.requests() >= before + 3,
            "{spec}: failed at least twice, then succeeded"
        );
        if verbose {
            assert!(out.stderr.contains("retrying"), "{spec}: {}", out.stderr);
            assert!(!out.stderr.contains("WARN"), "{spec}: {}", out.stderr);
        } else {
            assert_eq!(out.stderr, "", "{spec}: retries are not warnings");
        }
    }

    // A service that stays down: the retry budget bounds the whole operation, and the
    // user sees one error line (no retry log lines before it).
    env.emu.set_faults("error-rate=1,status=503").unwrap();
    let t = Instant::now();
    let out = env
        .run(&["--retry-budget", "2s", "enrollment", "get", "thr-1"])
        .await;
    assert_failed(&out, "gave up after");
    assert!(out.stderr.contains("503"), "{}", out.stderr);
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
    let out = env
        .run(&["--retry-budget", "0", "enrollment", "get", "thr-1"])
        .await;
    assert_failed(&out, "503");
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    env.emu.set_faults("").unwrap();

    // The emulator's quota at 3/min: bursts of 1 and a token every 20 s. With a retry
    // budget shorter than the Retry-After the client gives up at once rather than
    // hammering or cutting the wait short: exactly one 429.
    env.emu.set_ops_per_minute(Some(3));
    env.run(&["enrollment", "get", "thr-1"]).await.ok();
    let t = Instant::now();
    let out = env
        .run(&["--retry-budget", "10s", "enrollment", "get", "thr-1"])
        .await;
    assert_failed(&out, "throttled");
    assert!(out.stderr.contains("429"), "{}", out.stderr);
    assert!(
        out.stderr.contains("hint: the service asked to wait ")
            && out.stderr.contains(" s; raise --retry-budget"),
        "{}",
        out.stderr
    );
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "did not wait for a Retry-After beyond the budget"
    );
    assert_eq!(env.emu.stats().throttled, 1);

    // Library: a response slower than the request timeout is a timeout, retried.
    env.emu.set_ops_per_minute(None);
    env.emu.set_faults("latency=600ms").unwrap();
    let slow = ClientOptions {
        request_timeout: Duration::from_millis(200),
        retry_budget: Duration::ZERO,
        ..ClientOptions::default()
    };
    let e = env
        .library_client(slow.clone())
        .get_enrollment("thr-1")
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            DpsError::Transport {
                kind: dps_station::dps::TransportKind::Timeout,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.is_retryable());
    let c = env.library_client(ClientOptions {
        retry_budget: Duration::from_secs(20),
        ..slow
    });
    let before = env.requests();
    let clear = async {
        let deadline = Instant::now() + Duration::from_secs(20);
        while env.requests() < before + 2 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        env.emu.set_faults("").unwrap();
    };
    let (r, ()) = tokio::join!(c.get_enrollment("thr-1"), clear);
    assert_eq!(r.unwrap().registration_id, "thr-1");
    assert!(
        env.requests() >= before + 3,
        "timed out twice, then answered"
    );

    // Library: the client's own pacing spaces requests evenly (120/min = 0.5 s apart).
    env.emu.set_ops_per_minute(Some(600));
    let c = env.library_client(ClientOptions {
        max_operations_per_minute: Some(120),
        ..ClientOptions::default()
    });
    let t = Instant::now();
    for _ in 0..4 {
        c.get_enrollment("thr-1").await.unwrap();
    }
    assert!(
        t.elapsed() >= Duration::from_millis(1400),
        "paced to 2/s: {:?}",
        t.elapsed()
    );
    assert_eq!(env.emu.stats().throttled, 1, "pacing avoided 429s");
    assert_eq!(env.emu.stats().by_operation.len(), 2, "create and get only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_over_the_quota_gets_429_waits_out_retry_after_and_all_succeed() {
    // 60 per minute: one token a second, bursts of 6. Ten CLI calls at once: some are
    // answered 429 + Retry-After, wait it out (well inside --retry-budget) and succeed.
    let env = Env::with(EmulatorOptions {
        ops_per_minute: Some(60),
        ..Default::default()
    })
    .await;
    env.run(&[
        "enrollment",
        "create",
        "--registration-id",
        "burst-1",
        "--tpm-ek",
        EK,
    ])
    .await
    .ok();
    let t = Instant::now();
    // -v shows each retry (at INFO) with the delay the client chose.
    let calls = (0..10).map(|_| {
        env.run(&[
            "-v",
            "--retry-budget",
            "30s",
            "enrollment",
            "get",
            "burst-1",
            "--json",
        ])
    });
    let outs = futures::future::join_all(calls).await;
    let elapsed = t.elapsed();
    let mut retries = 0;
    for out in outs {
        let out = out.ok();
        assert_eq!(out.json()["registrationId"], "burst-1");
        for line in out.stderr.lines() {
            assert!(
                line.contains("INFO") && line.contains("retrying") && line.contains("429"),
                "only INFO retry lines for 429s: {line}"
            );
            let delay_ms: u64 = line
                .split("delay_ms=")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no delay_ms in {line}"));
            assert!(delay_ms >= 1000, "waited out Retry-After (1 s): {line}");
            retries += 1;
        }
    }
    let stats = env.emu.stats();
    assert!(
        stats.throttled > 0,
        "the burst exceeded the quota: {stats:?}"
    );
    assert_eq!(
        retries, stats.throttled,
        "every 429 was retried after its Retry-After"
    );
    // Five calls beyond the bucket at one token a second: done in a few seconds.
    assert!(elapsed >= Duration::from_secs(1), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(20), "{elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_json_chunks_partial_failure_and_all_failed() {
    let env = Env::new().await;
    let items: Vec<Value> = (0..25).map(|i| tpm_item(&format!("bulk-{i:03}"))).collect();
    let f = env.write("bulk.json", &serde_json::to_string(&items).unwrap());
    let out = env
        .run(&["bulk", "create", "--file", f.to_str().unwrap(), "--json"])
        .await
        .ok();
    assert_eq!(out.json(), json!({"isSuccessful": true, "errors": []}));
    assert_eq!(
        env.op_count("IndividualEnrollment_RunBulkOperation"),
        3,
        "⌈25/10⌉ requests"
    );
    assert_eq!(env.emu.stats().creates.len(), 25);

    // 3 new + 2 existing → exit 3, merged report names the two with 409201.
    let mixed: Vec<Value> = ["bulk-003", "new-a", "bulk-017", "new-b", "new-c"]
        .iter()
        .map(|id| tpm_item(id))
        .collect();
    let f = env.write("mixed.json", &serde_json::to_string(&mixed).unwrap());
    let out = env
        .run(&["bulk", "create", "--file", f.to_str().unwrap(), "--json"])
        .await;
    assert_eq!(out.code, 3, "{}{}", out.stdout, out.stderr);
    let rep = out.json();
    assert_eq!(rep["isSuccessful"], false);
    let errs = rep["errors"].as_array().unwrap();
    assert_eq!(errs.len(), 2, "{rep}");
    assert_eq!(errs[0]["registrationId"], "bulk-003");
    assert_eq!(errs[0]["errorCode"], 409201);
    assert_eq!(errs[1]["registrationId"], "bulk-017");
    // Human output: a per-item table and a summary.
    let again = env
        .run(&["bulk", "create", "--file", f.to_str().unwrap()])
        .await;
    assert_eq!(again.code, 1, "all items failed → exit 1: {}", again.stdout);
    assert!(
        again.stdout.starts_with("REGISTRATION ID"),
        "{}",
        again.stdout
    );
    assert!(
        again.stdout.contains("409201") && again.stdout.contains("0 succeeded, 5 failed"),
        "{}",
        again.stdout
    );

    // Query output (wire format, with etags) feeds update-if-match-etag; then delete all.
    let all = env.run(&["enrollment", "query", "--json"]).await.ok();
    assert_eq!(all.json().as_array().unwrap().len(), 28);
    let f = env.write("all.json", &all.stdout);
    env.run(&[
        "bulk",
        "update-if-match-etag",
        "--file",
        f.to_str().unwrap(),
    ])
    .await
    .ok();
    // The same file again: every etag is now stale → 412 per item, exit 1.
    let stale = env
        .run(&[
            "bulk",
            "update-if-match-etag",
            "--file",
            f.to_str().unwrap(),
            "--json",
        ])
        .await;
    assert_eq!(stale.code, 1, "{}", stale.stderr);
    assert_eq!(stale.json()["errors"][0]["errorCode"], 412201);
    let fresh = env.run(&["enrollment", "query", "--json"]).await.ok();
    let f = env.write("fresh.json", &fresh.stdout);
    env.run(&["bulk", "delete", "--file", f.to_str().unwrap()])
        .await
        .ok();
    assert_eq!(
        env.run(&["enrollment", "query", "--json"])
            .await
            .ok()
            .json(),
        json!([])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_csv_with_tpm_and_x509_rows() {
    let env = Env::new().await;
    env.write("cam-1.pem", &common::tls::device_cert_pem("cam-1"));
    let csv = format!(
        "registrationId,endorsementKey,certificateFile,deviceId,provisioningStatus,iotHubHostName,tags\n\
         tpm-1,{EK},,dev-1,enabled,line-a.azure-devices.net,\"{{\"\"line\"\":\"\"A\"\"}}\"\n\
         cam-1,,cam-1.pem,,disabled,,\n"
    );
    let f = env.write("boards.csv", &csv);
    let out = env
        .run(&["bulk", "create", "--file", f.to_str().unwrap()])
        .await
        .ok();
    assert!(
        out.stdout.contains("2 succeeded, 0 failed"),
        "{}",
        out.stdout
    );
    let t = env
        .run(&["enrollment", "get", "tpm-1", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(t["initialTwin"]["tags"]["line"], "A");
    assert_eq!(t["iotHubHostName"], "line-a.azure-devices.net");
    let c = env
        .run(&["enrollment", "get", "cam-1", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(c["provisioningStatus"], "disabled");
    assert_eq!(c["attestation"]["type"], "x509");
    // --format csv for a file without the extension.
    let f2 = env.write(
        "more.txt",
        &format!("registrationId,endorsementKey\ntpm-2,{EK}\n"),
    );
    env.run(&[
        "bulk",
        "create",
        "--file",
        f2.to_str().unwrap(),
        "--format",
        "csv",
    ])
    .await
    .ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_pages_through_x_ms_continuation() {
    let env = Env::new().await;
    let items: Vec<Value> = (0..5).map(|i| tpm_item(&format!("page-{i}"))).collect();
    let f = env.write("five.json", &serde_json::to_string(&items).unwrap());
    env.run(&["bulk", "create", "--file", f.to_str().unwrap()])
        .await
        .ok();
    let out = env
        .run(&["enrollment", "query", "--page-size", "2", "--json"])
        .await
        .ok();
    let ids: Vec<String> = out
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["registrationId"].as_str().unwrap().to_string())
        .collect();
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(
        sorted,
        (0..5).map(|i| format!("page-{i}")).collect::<Vec<_>>(),
        "every record once"
    );
    assert_eq!(
        env.op_count("IndividualEnrollment_Query"),
        3,
        "pages of 2, 2, 1"
    );

    // Library: the pages themselves.
    let c = env.library_client(ClientOptions::default());
    let p1 = c
        .query_enrollments_page("SELECT *", Some(2), None)
        .await
        .unwrap();
    assert_eq!(p1.items.len(), 2);
    let tok = p1.continuation.expect("more pages");
    let p2 = c
        .query_enrollments_page("SELECT *", Some(2), Some(&tok))
        .await
        .unwrap();
    assert_eq!(p2.items.len(), 2);
    let p3 = c
        .query_enrollments_page("SELECT *", Some(2), p2.continuation.as_deref())
        .await
        .unwrap();
    assert_eq!(p3.items.len(), 1);
    assert!(p3.continuation.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_bulk_chunking_and_unknown_fields_survive_update() {
    let env = Env::new().await;
    let c = env.library_client(ClientOptions::default());
    let items: Vec<IndividualEnrollment> = (0..23)
        .map(|i| IndividualEnrollment::new(format!("lib-{i}"), AttestationMechanism::tpm(EK)))
        .collect();
    let e = c
        .bulk_enrollments(OperationMode::Create, &items)
        .await
        .unwrap_err();
    assert!(
        matches!(e, DpsError::InvalidInput(_)),
        "one request takes at most 10"
    );
    assert_eq!(env.requests(), 0);
    let mut calls = Vec::new();
    let rep = c
        .bulk_enrollments_chunked(OperationMode::Create, &items, |n| calls.push(n))
        .await;
    assert_eq!((rep.requests, rep.failed(), rep.succeeded()), (3, 0, 23));
    assert_eq!(calls, vec![10, 20, 23]);

    // Fields the model does not know (a newer service's) survive get → update, through
    // the library and through `enrollment update`.
    let mut got = c.get_enrollment("lib-0").await.unwrap();
    got.extra
        .insert("credentialPolicyName".into(), json!("line-a-policy"));
    got.extra.insert("futureField".into(), json!({"a": 1}));
    let etag = got.etag.clone();
    let put = c
        .create_or_update_enrollment(&got, etag.as_deref())
        .await
        .unwrap();
    assert_ne!(put.etag, etag);
    let upd = env
        .run(&[
            "enrollment",
            "update",
            "lib-0",
            "--device-id",
            "dev-x",
            "--json",
        ])
        .await
        .ok()
        .json();
    assert_eq!(upd["deviceId"], "dev-x");
    let again = c.get_enrollment("lib-0").await.unwrap();
    assert_eq!(again.device_id.as_deref(), Some("dev-x"));
    assert_eq!(again.extra.get("futureField"), Some(&json!({"a": 1})));
    assert_eq!(
        again.extra.get("credentialPolicyName"),
        Some(&json!("line-a-policy"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_exits_2_and_sends_nothing() {
    let env = Env::new().await;
    let p = common::emulator::parse_connection_string(&env.emu.connection_string());
    let before = env.requests();

    // Malformed connection strings and keys.
    let cases: Vec<(String, &str)> = vec![
        (
            format!("SharedAccessKeyName={};SharedAccessKey={}", p.policy, p.key),
            "HostName",
        ),
        (
            format!("HostName={};SharedAccessKey={}", p.host_name, p.key),
            "SharedAccessKeyName",
        ),
        (
            format!("HostName={};SharedAccessKeyName={}", p.host_name, p.policy),
            "SharedAccessKey",
        ),
        (
            format!(
                "HostName={};SharedAccessKeyName={};SharedAccessKey=%%%not-base64%%%",
                p.host_name, p.policy
            ),
            "base64",
        ),
        (
            format!(
                "HostName={};SharedAccessKeyName={};{}",
                p.host_name, p.policy, p.key
            ),
            "unknown part",
        ),
        (format!("{};{};{}", p.host_name, p.policy, p.key), "no '='"),
        (String::new(), "empty"),
    ];
    for (i, (cs, needle)) in cases.iter().enumerate() {
        let f = env.write(&format!("cs-{i}"), cs);
        let out = env
            .run_raw(
                &[
                    "--connection-string-file",
                    f.to_str().unwrap(),
                    "enrollment",
                    "get",
                    "x-1",
                ],
                &[],
            )
            .await;
        assert_usage(&out, needle);
    }
    let out = env.run_raw(&["enrollment", "get", "x-1"], &[]).await;
    assert_usage(&out, "connection string");
    let out = env
        .run_raw(
            &[
                "--connection-string-file",
                "/nonexistent/cs",
                "enrollment",
                "get",
                "x-1",
            ],
            &[],
        )
        .await;
    assert_usage(&out, "/nonexistent/cs");
    // Plain http to a non-loopback host.
    let out = env
        .run(&[
            "--endpoint",
            "http://dps.example.net",
            "enrollment",
            "get",
            "x-1",
        ])
        .await;
    assert_usage(&out, "loopback");
    let out = env
        .run(&["--retry-budget", "soon", "enrollment", "get", "x-1"])
        .await;
    assert_usage(&out, "--retry-budget");
    // --resolve is global: a bad one is refused before or after the subcommand.
    for args in [
        &["--resolve", "nohost", "enrollment", "get", "x-1"][..],
        &["enrollment", "get", "x-1", "--resolve", "h:not-an-ip"][..],
    ] {
        assert_usage(&env.run(args).await, "--resolve");
    }

    // Invalid registration ids.
    let long = "a".repeat(129);
    for id in ["has space", long.as_str(), "-lead"] {
        let flag = format!("--registration-id={id}");
        let out = env
            .run(&["enrollment", "create", &flag, "--tpm-ek", EK])
            .await;
        assert_usage(&out, "registration id");
        let out = env.run(&["enrollment", "get", "--", id]).await;
        assert_usage(&out, "registration id");
    }

    // An EK that is not a TPM2B: the bare TPMT (prefix stripped) is refused with a hint.
    let raw = base64::engine::general_purpose::STANDARD
        .decode(EK)
        .unwrap();
    let tpmt = base64::engine::general_purpose::STANDARD.encode(&raw[2..]);
    let out = env
        .run(&[
            "enrollment",
            "create",
            "--registration-id",
            "ek-1",
            "--tpm-ek",
            &tpmt,
        ])
        .await;
    assert_usage(&out, "TPM2B");
    assert!(
        out.stderr.contains("hint: ") && out.stderr.contains("TPMT"),
        "{}",
        out.stderr
    );
    let out = env
        .run(&[
            "enrollment",
            "create",
            "--registration-id",
            "ek-1",
            "--tpm-ek",
            "not base64!",
        ])
        .await;
    assert_usage(&out, "base64");
    let out = env
        .run(&["enrollment", "create", "--registration-id", "ek-1"])
        .await;
    assert_usage(&out, "--tpm-ek");

    // X.509: CN mismatch, over-long id, a file with a private key, a non-CA group cert.
    let leaf = env.write("leaf.pem", &common::tls::device_cert_pem("cn-one"));
    let out = env
        .run(&[
            "enrollment",
            "create",
            "--registration-id",
            "cn-two",
            "--x509-cert",
            leaf.to_str().unwrap(),
        ])
        .await;
    assert_usage(&out, "differs");
    let id65 = "b".repeat(65);
    let out = env
        .run(&[
            "enrollment",
            "create",
            "--registration-id",
            &id65,
            "--x509-cert",
            leaf.to_str().unwrap(),
        ])
        .await;
    assert_usage(&out, "64");
    let with_key = env.write(
        "with-key.pem",
        &format!(
            "{}{}",
            common::tls::device_cert_pem("k-1"),
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
        ),
    );
    let out = env
        .run(&[
            "enrollment",
            "create",
            "--registration-id",
            "k-1",
            "--x509-cert",
            with_key.to_str().unwrap(),
        ])
        .await;
    assert_usage(&out, "private key");
    let out = env
        .run(&[
            "group",
            "create",
            "--group-id",
            "g-1",
            "--x509-ca-cert",
            leaf.to_str().unwrap(),
        ])
        .await;
    assert_usage(&out, "not a CA");
    let out = env
        .run(&[
            "enrollment",
            "create",
            "--registration-id",
            "t-1",
            "--tpm-ek",
            EK,
            "--initial-twin",
            "[1]",
        ])
        .await;
    assert_usage(&out, "--initial-twin");
    let out = env
        .run(&[
            "enrollment",
            "create",
            "--registration-id",
            "t-1",
            "--tpm-ek",
            EK,
            "--provisioning-status",
            "maybe",
        ])
        .await;
    assert_usage(&out, "--provisioning-status");

    // Bulk files: non-array JSON, non-JSON, CSV without registrationId, bad items.
    let bulk_cases: Vec<(&str, String, &str)> = vec![
        (
            "obj.json",
            r#"{"registrationId":"a"}"#.into(),
            "found an object",
        ),
        (
            "text.json",
            "registrationId,endorsementKey\n".into(),
            "not JSON",
        ),
        ("empty.json", "[]".into(), "no enrollments"),
        (
            "noid.csv",
            format!("endorsementKey,deviceId\n{EK},d1\n"),
            "no registrationId column",
        ),
        (
            "both.csv",
            format!("registrationId,endorsementKey,certificateFile\nr-1,{EK},leaf.pem\n"),
            "line 2",
        ),
        (
            "short.csv",
            format!("registrationId,endorsementKey,deviceId\nr-1,{EK},d-1\nr-2,{EK}\n"),
            "line 3",
        ),
        (
            "nokey.csv",
            "registrationId,deviceId\nr-1,d-1\n".into(),
            "endorsementKey or a certificateFile column",
        ),
        (
            "typo.csv",
            format!("registrationId,endorsmentKey\nr-1,{EK}\n"),
            "unknown column",
        ),
        (
            "badek.csv",
            format!("registrationId,endorsementKey\nr-1,{EK}\nr-2,{tpmt}\n"),
            "line 3",
        ),
        (
            "badid.json",
            serde_json::to_string(&vec![tpm_item("ok-1"), tpm_item("bad id")]).unwrap(),
            "item 1",
        ),
        (
            "noatt.json",
            r#"[{"registrationId":"a-1"}]"#.into(),
            "attestation",
        ),
        (
            "dup.json",
            serde_json::to_string(&vec![tpm_item("d-1"), tpm_item("D-1")]).unwrap(),
            "already appears",
        ),
    ];
    for (name, text, needle) in &bulk_cases {
        let f = env.write(name, text);
        let out = env
            .run(&["bulk", "create", "--file", f.to_str().unwrap()])
            .await;
        assert_usage(&out, needle);
        assert!(out.stderr.contains(name), "names the file: {}", out.stderr);
    }
    let f = env.write(
        "noetag.json",
        &serde_json::to_string(&vec![tpm_item("e-1")]).unwrap(),
    );
    let out = env
        .run(&[
            "bulk",
            "update-if-match-etag",
            "--file",
            f.to_str().unwrap(),
        ])
        .await;
    assert_usage(&out, "etag");

    assert_eq!(env.requests(), before, "nothing was sent for bad input");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_tcti_reads_the_ek_from_a_swtpm_board() {
    let env = Env::new().await;
    let board = tokio::task::spawn_blocking(|| {
        common::swtpm::board(common::swtpm::SwtpmVariant::EkPersistedWithCert)
    })
    .await
    .unwrap();
    let tcti = board.tcti();
    let out = env
        .run(&["--json", "enrollment", "create", "--tpm-tcti", &tcti])
        .await
        .ok();
    let e = out.json();
    let ek = e["attestation"]["tpm"]["endorsementKey"].as_str().unwrap();
    assert!(
        ek.starts_with("AToAAQALAAMAsgAg"),
        "TPM2B of the TCG default EK: {ek}"
    );
    // The default registration id is the EK's hash id (52 base32 characters).
    assert_eq!(e["registrationId"].as_str().unwrap().len(), 52, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixture_bulk_files_are_valid() {
    let env = Env::new().await;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bulk");
    for f in ["enrollments.json", "boards.csv"] {
        let p = dir.join(f);
        let out = env
            .run(&["bulk", "create", "--file", p.to_str().unwrap(), "--json"])
            .await
            .ok();
        assert_eq!(
            out.json(),
            json!({"isSuccessful": true, "errors": []}),
            "{f}"
        );
    }
    let e = env
        .run(&["enrollment", "get", "fixture-csv-1", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(e["initialTwin"]["tags"]["slot"], "fixture-1");
    let e = env
        .run(&["enrollment", "get", "fixture-tpm-2", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(
        e["iotHubs"],
        json!(["line-a.azure-devices.net", "line-b.azure-devices.net"])
    );
}

/// Seed a device registration state through the emulator's admin endpoint, as if the
/// device had registered through `group` (not part of DPS; see src/emulator/service.rs).
async fn seed_registration(env: &Env, id: &str, group: &str) {
    let r = reqwest::Client::new()
        .put(format!(
            "{}/_emulator/registrations/{id}",
            env.emu.base_url()
        ))
        .body(
            json!({"enrollmentGroupId": group, "assignedHub": "line-a.azure-devices.net",
                   "deviceId": id})
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_states_get_query_across_pages_and_delete() {
    let env = Env::new().await;
    for i in 0..5 {
        seed_registration(&env, &format!("reg-{i}"), "line-a").await;
    }
    seed_registration(&env, "other-0", "line-b").await;

    // `registration query GROUP_ID` follows x-ms-continuation and prints one JSON array.
    let all = env
        .run(&[
            "registration",
            "query",
            "line-a",
            "--page-size",
            "2",
            "--json",
        ])
        .await
        .ok()
        .json();
    let ids: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["registrationId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["reg-0", "reg-1", "reg-2", "reg-3", "reg-4"]);
    assert_eq!(
        env.op_count("DeviceRegistrationState_Query"),
        3,
        "pages 2, 2, 1"
    );
    let table = env.run(&["registration", "query", "line-a"]).await.ok();
    assert!(
        table.stdout.starts_with("REGISTRATION ID") && table.stdout.contains("5 registration(s)"),
        "{}",
        table.stdout
    );

    let got = env
        .run(&["registration", "get", "REG-1", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(got["registrationId"], "reg-1");
    assert_eq!(got["status"], "assigned");
    assert_eq!(got["assignedHub"], "line-a.azure-devices.net");
    let etag = got["etag"].as_str().unwrap().to_string();

    // A stale etag is a 412 (exit 1); the current one deletes.
    let out = env
        .run(&["registration", "delete", "reg-1", "--etag", "c3RhbGU="])
        .await;
    assert_failed(&out, "etag conflict");
    env.run(&["registration", "delete", "reg-1", "--etag", &etag])
        .await
        .ok();
    assert_failed(
        &env.run(&["registration", "get", "reg-1"]).await,
        "not found",
    );
    let left = env
        .run(&["registration", "query", "line-a", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(left.as_array().unwrap().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_groups_chunks_partial_failure_and_delete() {
    let env = Env::new().await;
    let group = |i: usize| {
        json!({"enrollmentGroupId": format!("grp-{i}"),
               "attestation": {"type": "x509", "x509": {"caReferences": {"primary": "line-ca"}}}})
    };
    let twelve: Vec<Value> = (0..12).map(group).collect();
    let f = env.write("groups.json", &serde_json::to_string(&twelve).unwrap());
    let rep = env
        .run(&[
            "bulk",
            "create",
            "--groups",
            "--file",
            f.to_str().unwrap(),
            "--json",
        ])
        .await
        .ok()
        .json();
    assert_eq!(rep, json!({"isSuccessful": true, "errors": []}));
    assert_eq!(
        env.op_count("EnrollmentGroup_RunBulkOperation"),
        2,
        "chunks of 10 + 2"
    );
    assert_eq!(
        env.run(&["group", "query", "--json"])
            .await
            .ok()
            .json()
            .as_array()
            .unwrap()
            .len(),
        12
    );

    // Two existing groups and one new: exit 3, the group-shaped per-item errors.
    let mixed: Vec<Value> = vec![group(0), group(12), group(5)];
    let f = env.write("mixed.json", &serde_json::to_string(&mixed).unwrap());
    let out = env
        .run(&[
            "bulk",
            "create",
            "--groups",
            "--file",
            f.to_str().unwrap(),
            "--json",
        ])
        .await;
    assert_eq!(out.code, 3, "{}", out.stderr);
    let rep = out.json();
    assert_eq!(rep["isSuccessful"], false);
    let errs = rep["errors"].as_array().unwrap();
    assert_eq!(errs.len(), 2);
    assert_eq!(errs[0]["enrollmentGroupId"], "grp-0");
    assert_eq!(errs[0]["errorCode"], 409202);
    assert_eq!(errs[1]["enrollmentGroupId"], "grp-5");
    let table = env
        .run(&["bulk", "create", "--groups", "--file", f.to_str().unwrap()])
        .await;
    assert_eq!(table.code, 1, "all three exist now: {}", table.stdout);
    assert!(table.stdout.starts_with("GROUP ID"), "{}", table.stdout);

    // Bulk delete of all 13 groups (2 requests).
    let all: Vec<Value> = (0..13).map(group).collect();
    let f = env.write("all.json", &serde_json::to_string(&all).unwrap());
    env.run(&["bulk", "delete", "--groups", "--file", f.to_str().unwrap()])
        .await
        .ok();
    assert_eq!(
        env.run(&["group", "query", "--json"]).await.ok().json(),
        json!([])
    );

    // Bad group files exit 2 and send nothing.
    let before = env.requests();
    for (name, text, needle) in [
        ("g.csv", "enrollmentGroupId\ng-1\n".to_string(), "not CSV"),
        ("g-obj.json", group(1).to_string(), "JSON array"),
        (
            "g-badid.json",
            json!([{"enrollmentGroupId": "bad id", "attestation": {"type": "x509"}}]).to_string(),
            "enrollmentGroupId",
        ),
    ] {
        let f = env.write(name, &text);
        let out = env
            .run(&["bulk", "create", "--groups", "--file", f.to_str().unwrap()])
            .await;
        assert_usage(&out, needle);
    }
    assert_eq!(env.requests(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sas_tokens_are_renewed_before_they_expire() {
    // Tokens valid for 3 s are renewed once 1 s is left. The emulator refuses an expired
    // token (401), so the second call succeeds only if the client signed a fresh one.
    let env = Env::new().await;
    let c = env
        .library_client(ClientOptions {
            retry_budget: Duration::ZERO,
            ..ClientOptions::default()
        })
        .with_sas_ttl(Duration::from_secs(3));
    let e = c.get_enrollment("renew-1").await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
    tokio::time::sleep(Duration::from_millis(3300)).await;
    let e = c.get_enrollment("renew-1").await.unwrap_err();
    assert!(e.is_not_found(), "a fresh token, not a 401: {e}");
    // Control: the same wait with a token that is never renewed is refused.
    let p = common::emulator::parse_connection_string(&env.emu.connection_string());
    let se = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 2;
    let fixed = common::emulator::sas_token_at(&p.host_name, &p.policy, &p.key, se);
    let c = env
        .library_client(ClientOptions {
            retry_budget: Duration::ZERO,
            ..ClientOptions::default()
        })
        .with_sas_token(dps_station::secret::Secret::new(fixed));
    assert!(c
        .get_enrollment("renew-1")
        .await
        .unwrap_err()
        .is_not_found());
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let e = c.get_enrollment("renew-1").await.unwrap_err();
    assert!(matches!(e, DpsError::Unauthorized(_)), "{e}");
    assert_eq!(env.op_count("IndividualEnrollment_Get"), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_of_the_spec_is_reachable_from_the_command_line() {
    // The operationIds come from the vendored spec, not from the emulator or the client.
    let spec: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/spec/dps-service-2021-10-01.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut spec_ops: Vec<String> = spec["paths"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|p| p.as_object().unwrap().values())
        .filter_map(|op| op["operationId"].as_str().map(str::to_string))
        .collect();
    spec_ops.sort();
    assert_eq!(spec_ops.len(), 15, "{spec_ops:?}");

    let env = Env::new().await;
    let ca = env.write("ca.pem", &common::tls::ca_cert_pem("Line CA"));
    let ca = ca.to_str().unwrap();
    let runs: Vec<Vec<&str>> = vec![
        vec![
            "enrollment",
            "create",
            "--registration-id",
            "op-1",
            "--tpm-ek",
            EK,
        ],
        vec!["enrollment", "get", "op-1"],
        vec!["enrollment", "update", "op-1", "--device-id", "d-1"],
        vec!["enrollment", "attestation", "op-1"],
        vec!["enrollment", "query"],
        vec!["enrollment", "delete", "op-1"],
        vec!["group", "create", "--group-id", "g-1", "--x509-ca-cert", ca],
        vec!["group", "get", "g-1"],
        vec![
            "group",
            "update",
            "g-1",
            "--provisioning-status",
            "disabled",
        ],
        vec!["group", "attestation", "g-1"],
        vec!["group", "query"],
        vec!["group", "delete", "g-1"],
        vec!["registration", "get", "dev-1"],
        vec!["registration", "query", "g-1"],
        vec!["registration", "delete", "dev-1"],
    ];
    seed_registration(&env, "dev-1", "g-1").await;
    for args in &runs {
        let out = env.run(args).await;
        assert_eq!(out.code, 0, "{args:?}: {}", out.stderr);
    }
    let one = env.write(
        "one.json",
        &serde_json::to_string(&vec![tpm_item("op-2")]).unwrap(),
    );
    env.run(&["bulk", "create", "--file", one.to_str().unwrap()])
        .await
        .ok();
    let grp = env.write(
        "grp.json",
        &json!([{"enrollmentGroupId": "g-2",
                 "attestation": {"type": "x509", "x509": {"caReferences": {"primary": "ca"}}}}])
        .to_string(),
    );
    env.run(&[
        "bulk",
        "create",
        "--groups",
        "--file",
        grp.to_str().unwrap(),
    ])
    .await
    .ok();
    let seen: Vec<String> = env.emu.stats().by_operation.keys().cloned().collect();
    assert_eq!(
        seen, spec_ops,
        "every spec operation was called, and nothing else"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_shows_a_progress_bar_on_a_terminal_and_nothing_on_a_pipe() {
    use std::io::Read as _;
    let env = Env::new().await;
    // Slow answers, so the bar is drawn between chunks.
    env.emu.set_faults("latency=150ms").unwrap();
    let items: Vec<Value> = (0..25).map(|i| tpm_item(&format!("pb-{i}"))).collect();
    let f = env.write("pb.json", &serde_json::to_string(&items).unwrap());
    let pty = nix::pty::openpty(None, None).expect("open a pty pair");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_dps-station"))
        .args([
            "--connection-string-file",
            env.cs_file.to_str().unwrap(),
            "bulk",
            "create",
            "--file",
            f.to_str().unwrap(),
        ])
        .env_remove("DPS_CONNECTION_STRING")
        .env_remove("DPS_STATION_RESOLVE")
        .env("TERM", "xterm")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::from(pty.slave))
        .spawn()
        .expect("run dps-station");
    let mut master = std::fs::File::from(pty.master);
    let reader = std::thread::spawn(move || {
        // Reads end with EIO once the child (the only holder of the slave) exits.
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while let Ok(n) = master.read(&mut chunk) {
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        String::from_utf8_lossy(&buf).into_owned()
    });
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let terminal = reader.join().unwrap();
    assert_eq!(out.status.code(), Some(0), "{terminal}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("25 item(s) in 3 request(s)"), "{stdout}");
    assert!(
        terminal.contains("bulk create") && terminal.contains("/25 items"),
        "a progress bar on the terminal: {terminal:?}"
    );

    // Not a terminal: no bar, nothing on stderr.
    let items: Vec<Value> = (0..12).map(|i| tpm_item(&format!("pb2-{i}"))).collect();
    let f = env.write("pb2.json", &serde_json::to_string(&items).unwrap());
    let out = env
        .run(&["bulk", "create", "--file", f.to_str().unwrap()])
        .await
        .ok();
    assert_eq!(out.stderr, "");
    env.emu.set_faults("").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_connection_string_flag_the_station_config_dps_section_is_used() {
    let env = Env::new().await;
    let cfg = env.write(
        "station.toml",
        &format!(
            "[dps]\nconnection_string_file = {:?}\nmax_operations_per_minute = 120\n\n\
             [[slot]]\nname = \"fixture-1\"\nattestation = \"tpm\"\n",
            env.cs_file
        ),
    );
    let cfg = cfg.to_str().unwrap();
    // 25 items = 3 bulk requests, paced to 120/min (0.5 s apart) by the config.
    let items: Vec<Value> = (0..25).map(|i| tpm_item(&format!("cfg-{i}"))).collect();
    let f = env.write("cfg.json", &serde_json::to_string(&items).unwrap());
    let t = Instant::now();
    let out = env
        .run_raw(
            &[
                "--config",
                cfg,
                "bulk",
                "create",
                "--file",
                f.to_str().unwrap(),
            ],
            &[],
        )
        .await
        .ok();
    assert!(
        out.stdout.contains("25 item(s) in 3 request(s)"),
        "{}",
        out.stdout
    );
    assert!(
        t.elapsed() >= Duration::from_millis(950),
        "paced: {:?}",
        t.elapsed()
    );
    // The config may also come from the environment, like every other command.
    let got = env
        .run_raw(
            &["enrollment", "get", "cfg-3", "--json"],
            &[("DPS_STATION_CONFIG", cfg)],
        )
        .await
        .ok()
        .json();
    assert_eq!(got["registrationId"], "cfg-3");

    // A broken config is a usage error naming the file; nothing is sent.
    let before = env.requests();
    let bad = env.write("bad.toml", "[dps]\nconnection_string_file = 5\n");
    let out = env
        .run_raw(
            &[
                "--config",
                bad.to_str().unwrap(),
                "enrollment",
                "get",
                "cfg-3",
            ],
            &[],
        )
        .await;
    assert_usage(&out, "bad.toml");
    // No config file and no connection string: the error says how to give one.
    let out = env
        .run_raw(
            &[
                "--config",
                "/nonexistent/station.toml",
                "enrollment",
                "get",
                "cfg-3",
            ],
            &[],
        )
        .await;
    assert_usage(&out, "--connection-string-file");
    assert_eq!(env.requests(), before);
}
