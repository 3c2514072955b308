//! The station config (DESIGN.md §4): the example loads as written, layers apply in order,
//! and every mistake names the file, the line and the key; `dps-station check` walks a
//! config against real parts (the emulator, swtpm boards, a pty scanner, a dev CA).
mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use dps_station::config::{
    self, Attestation, Config, ConfigError, DiceEnroll, EkPolicy, DEFAULT_LINE_PATTERN,
};

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/station.example.toml")
}

const MINIMAL: &str = r#"
[dps]
connection_string_file = "/tmp/cs"

[[slot]]
name = "fixture-1"
attestation = "tpm"
"#;

/// Load `text` and return the located error it must produce.
fn diag(text: &str) -> config::Diagnostic {
    match config::load_str(text, Path::new("station.toml")) {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(e) => e
            .diagnostic()
            .cloned()
            .unwrap_or_else(|| panic!("not a located error: {e}")),
    }
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in text"))
        + 1
}

#[test]
fn the_design_example_loads_as_written() {
    let cfg = config::load_with_env(&example_path(), &[]).unwrap();
    assert_eq!(
        cfg.dps.connection_string_file.as_deref(),
        Some(Path::new(
            "/run/credentials/dps-station.service/dps-connection-string"
        ))
    );
    assert_eq!(cfg.dps.endpoint, None);
    assert_eq!(cfg.dps.api_version, "2021-10-01");
    assert_eq!(cfg.dps.request_timeout, Duration::from_secs(30));
    assert_eq!(cfg.dps.max_operations_per_minute, 1000);
    assert_eq!(cfg.batch.max_size, 10);
    assert_eq!(cfg.batch.max_delay, Duration::from_secs(2));
    assert_eq!(cfg.state.path, Path::new("/var/lib/dps-station/station.db"));
    assert_eq!(cfg.slots.len(), 2);
    let s1 = &cfg.slots[0];
    assert_eq!(s1.name, "fixture-1");
    assert_eq!(s1.attestation, Attestation::Tpm);
    assert_eq!(s1.tcti.as_deref(), Some("device:/dev/tpmrm0"));
    assert_eq!(s1.ek, EkPolicy::ReadOrCreate);
    let s2 = &cfg.slots[1];
    assert_eq!(s2.attestation, Attestation::Dice);
    assert_eq!(s2.registration_id.as_deref(), Some("board-{serial}"));
    assert_eq!(s2.tcti, None);
    let dice = cfg.dice.as_ref().unwrap();
    assert_eq!(dice.enroll, DiceEnroll::Individual);
    assert_eq!(dice.validity_days, 3650);
    assert_eq!(dice.fwid_parts(), ("sha256".to_string(), vec![0u8; 32]));
    let serial = cfg.trigger.serial.as_ref().unwrap();
    assert_eq!(serial.port, Path::new("/dev/ttyACM0"));
    assert_eq!(serial.baud, 9600);
    assert!(serial.reply);
    assert_eq!(serial.line_pattern.as_str(), DEFAULT_LINE_PATTERN);
    assert_eq!(
        cfg.control.socket,
        Path::new("/run/dps-station/control.sock")
    );
    assert_eq!(cfg.control.http.as_deref(), Some("127.0.0.1:9184"));
    assert_eq!(cfg.sources, vec![example_path()]);
}

#[test]
fn a_minimal_config_gets_the_documented_defaults() {
    let cfg = config::load_str(MINIMAL, Path::new("m.toml")).unwrap();
    assert_eq!(cfg.batch.max_size, 10);
    assert_eq!(cfg.batch.max_delay, Duration::from_secs(2));
    assert_eq!(cfg.dps.api_version, "2021-10-01");
    assert_eq!(cfg.dps.request_timeout, Duration::from_secs(30));
    assert_eq!(cfg.dps.max_operations_per_minute, 1000);
    assert_eq!(cfg.enrollment.registration_id, "{ek_hash}");
    assert_eq!(cfg.slots[0].tcti.as_deref(), Some("device:/dev/tpmrm0"));
    assert_eq!(cfg.slots[0].ek, EkPolicy::ReadOrCreate);
    assert!(cfg.trigger.serial.is_none());
    assert!(cfg.dice.is_none());
    assert_eq!(
        cfg.control.socket,
        Path::new("/run/dps-station/control.sock")
    );
    assert_eq!(cfg.control.http.as_deref(), Some("127.0.0.1:9184"));
}

#[test]
fn enrollments_render_with_placeholders_everywhere_and_camel_case_keys() {
    let cfg = config::load_with_env(&example_path(), &[]).unwrap();
    let hash = "y5wivfciikcievvnsbpkhzcahwm4chuzx6v4hnqnlqfs3fjf6rxa";
    let (id, e) = cfg
        .render_enrollment(&cfg.slots[0], "SN-0001", Some(hash))
        .unwrap();
    assert_eq!(id.as_str(), hash);
    assert_eq!(
        e,
        serde_json::json!({
            "registrationId": hash,
            "deviceId": "SN-0001",
            "provisioningStatus": "enabled",
            "reprovisionPolicy": {"updateHubAssignment": true, "migrateDeviceData": true},
            "capabilities": {"iotEdge": false},
            "initialTwin": {"tags": {"line": "A", "serial": "SN-0001"}},
        })
    );
    assert!(e.get("attestation").is_none());

    // The dice slot overrides the id template; generated ids are lower case.
    let (id, e) = cfg
        .render_enrollment(&cfg.slots[1], "SN-0002", None)
        .unwrap();
    assert_eq!(id.as_str(), "board-sn-0002");
    assert_eq!(e["registrationId"], "board-sn-0002");
    assert_eq!(e["deviceId"], "SN-0002");

    // A TPM board without an EK hash cannot fill {ek_hash}.
    let err = cfg
        .render_enrollment(&cfg.slots[0], "SN-0003", None)
        .unwrap_err();
    assert!(matches!(err, ConfigError::Template { .. }), "{err}");
    assert!(err.to_string().contains("fixture-1"), "{err}");
}

#[test]
fn render_refuses_ids_the_service_would_refuse() {
    let text = format!("{MINIMAL}registration_id = \"{{serial}}-{{slot}}\"\n");
    let cfg = config::load_str(&text, Path::new("t.toml")).unwrap();
    let (id, _) = cfg.render_enrollment(&cfg.slots[0], "AB12", None).unwrap();
    assert_eq!(id.as_str(), "ab12-fixture-1");
    let err = cfg
        .render_enrollment(&cfg.slots[0], "A B", None)
        .unwrap_err();
    assert!(err.to_string().contains("' '"), "{err}");
}

#[test]
fn the_twin_gets_desired_properties_and_substitution_in_nested_values() {
    let text = format!(
        "{MINIMAL}\n[enrollment]\nregistration_id = \"dev-{{serial}}\"\niot_hubs = [\"{{slot}}.example.net\"]\nallocation_policy = \"geoLatency\"\n\
         [enrollment.initial_twin.properties.desired]\nfw = {{ want = \"{{serial}}\", list = [\"{{slot}}\", 3] }}\n"
    );
    let cfg = config::load_str(&text, Path::new("t.toml")).unwrap();
    let (_, e) = cfg.render_enrollment(&cfg.slots[0], "Q1Q1", None).unwrap();
    assert_eq!(e["iotHubs"], serde_json::json!(["fixture-1.example.net"]));
    assert_eq!(e["allocationPolicy"], "geoLatency");
    assert_eq!(
        e["initialTwin"],
        serde_json::json!({"properties": {"desired": {"fw": {"want": "Q1Q1", "list": ["fixture-1", 3]}}}})
    );
}

/// A station.toml with config.d beside it.
fn layered_dir(main: &str, extra: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("station.toml"), main).unwrap();
    if !extra.is_empty() {
        std::fs::create_dir(dir.path().join("config.d")).unwrap();
        for (name, text) in extra {
            std::fs::write(dir.path().join("config.d").join(name), text).unwrap();
        }
    }
    dir
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn layers_apply_file_then_sorted_config_d_then_environment() {
    let main = format!("{MINIMAL}\n[batch]\nmax_size = 5\nmax_delay = \"1s\"\n");
    let dir = layered_dir(
        &main,
        &[
            // Sorted by name: 10 before 20 even though written second.
            ("20-late.toml", "[batch]\nmax_size = 7\n"),
            (
                "10-early.toml",
                "[batch]\nmax_size = 3\n[dps]\nmax_operations_per_minute = 50\n\
                 [[slot]]\nname = \"fixture-1\"\ntcti = \"swtpm:host=127.0.0.1,port=2321\"\n\
                 [[slot]]\nname = \"fixture-9\"\nattestation = \"tpm\"\n",
            ),
            ("ignored.txt", "this is not toml ["),
        ],
    );
    let path = dir.path().join("station.toml");
    let cfg = config::load_with_env(
        &path,
        &env(&[
            ("DPS_STATION__BATCH__MAX_DELAY", "5s"),
            ("DPS_STATION__DPS__ENDPOINT", "http://127.0.0.1:18443"),
            ("DPS_STATION__DPS__API_VERSION", "2021-10-01"),
            ("DPS_STATION__SLOT__FIXTURE_9__EK", "read-only"),
            ("UNRELATED", "x"),
        ]),
    )
    .unwrap();
    assert_eq!(
        cfg.batch.max_size, 7,
        "20-late.toml wins over 10-early.toml"
    );
    assert_eq!(cfg.batch.max_delay, Duration::from_secs(5), "env wins");
    assert_eq!(cfg.dps.max_operations_per_minute, 50);
    assert_eq!(cfg.dps.endpoint.as_deref(), Some("http://127.0.0.1:18443"));
    assert_eq!(cfg.dps.api_version, "2021-10-01");
    // A slot with a known name is changed; a new name is added.
    assert_eq!(cfg.slots.len(), 2);
    assert_eq!(
        cfg.slots[0].tcti.as_deref(),
        Some("swtpm:host=127.0.0.1,port=2321")
    );
    assert_eq!(cfg.slots[0].attestation, Attestation::Tpm);
    assert_eq!(cfg.slots[1].name, "fixture-9");
    assert_eq!(cfg.slots[1].ek, EkPolicy::ReadOnly);
    assert_eq!(cfg.sources.len(), 3);
    assert!(cfg.sources[1].ends_with("10-early.toml"));
}

#[test]
fn environment_values_are_typed_and_errors_name_the_variable() {
    let dir = layered_dir(MINIMAL, &[]);
    let path = dir.path().join("station.toml");
    let cfg = config::load_with_env(
        &path,
        &env(&[
            ("DPS_STATION__TRIGGER__SERIAL__PORT", "/dev/ttyUSB3"),
            ("DPS_STATION__TRIGGER__SERIAL__REPLY", "false"),
        ]),
    )
    .unwrap();
    let s = cfg.trigger.serial.unwrap();
    assert_eq!(s.port, Path::new("/dev/ttyUSB3"));
    assert!(!s.reply);

    let err =
        config::load_with_env(&path, &env(&[("DPS_STATION__BATCH__MAX_SIZE", "11")])).unwrap_err();
    let d = err.diagnostic().unwrap();
    assert_eq!(
        d.origin,
        "environment variable DPS_STATION__BATCH__MAX_SIZE"
    );
    assert_eq!(d.key.as_deref(), Some("batch.max_size"));

    let err =
        config::load_with_env(&path, &env(&[("DPS_STATION__BATCH__BOGUS", "1")])).unwrap_err();
    assert!(
        err.to_string().contains("DPS_STATION__BATCH__BOGUS"),
        "{err}"
    );
    assert!(err.to_string().contains("bogus"), "{err}");
}

#[test]
fn config_d_errors_name_their_own_file_and_line() {
    let dir = layered_dir(
        MINIMAL,
        &[("50-bad.toml", "# comment\n[batch]\nmax_size = 0\n")],
    );
    let err = config::load_with_env(&dir.path().join("station.toml"), &[]).unwrap_err();
    let d = err.diagnostic().unwrap();
    assert!(d.origin.ends_with("config.d/50-bad.toml"), "{d}");
    assert_eq!(d.line, Some(3));
    assert_eq!(d.key.as_deref(), Some("batch.max_size"));
}

#[test]
fn a_missing_file_is_an_error_naming_it() {
    let err = config::load_with_env(Path::new("/nonexistent/station.toml"), &[]).unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/station.toml"),
        "{err}"
    );
    assert!(err.to_string().contains("no such file"), "{err}");
}

#[test]
fn unknown_keys_name_file_line_and_key() {
    let text = format!("{MINIMAL}\n[batch]\nmax_sise = 4\n");
    let d = diag(&text);
    assert_eq!(d.origin, "station.toml");
    assert_eq!(d.line, Some(line_of(&text, "max_sise")));
    assert_eq!(d.key.as_deref(), Some("batch.max_sise"));
    assert!(d.message.contains("unknown field"), "{d}");
    assert!(d.to_string().starts_with(&format!(
        "station.toml:{}: batch.max_sise: ",
        d.line.unwrap()
    )));

    let text = format!("{MINIMAL}\n[nonsense]\nx = 1\n");
    let d = diag(&text);
    assert_eq!(d.line, Some(line_of(&text, "[nonsense]")));

    // Unknown keys inside a slot too.
    let text = format!("{MINIMAL}tpm_timout = \"3s\"\n");
    let d = diag(&text);
    assert_eq!(d.line, Some(line_of(&text, "tpm_timout")));
}

#[test]
fn wrong_types_name_the_line_and_key() {
    let text = format!("{MINIMAL}\n[batch]\nmax_size = \"ten\"\n");
    let d = diag(&text);
    assert_eq!(d.line, Some(line_of(&text, "max_size")));
    assert_eq!(d.key.as_deref(), Some("batch.max_size"));
    assert!(d.message.contains("invalid type"), "{d}");
}

#[test]
fn impossible_values_name_the_line_and_key() {
    let cases: Vec<(String, &str, &str)> = vec![
        (format!("{MINIMAL}\n[batch]\nmax_size = 11\n"), "max_size", "batch.max_size"),
        (format!("{MINIMAL}\n[batch]\nmax_size = 0\n"), "max_size", "batch.max_size"),
        (format!("{MINIMAL}\n[batch]\nmax_delay = \"soon\"\n"), "max_delay", "batch.max_delay"),
        (
            MINIMAL.replace("[dps]\n", "[dps]\nrequest_timeout = \"0s\"\n"),
            "request_timeout",
            "dps.request_timeout",
        ),
        (
            format!("{MINIMAL}\n[trigger.serial]\nport = \"/dev/x\"\nline_pattern = \"([a-z\"\n"),
            "line_pattern",
            "trigger.serial.line_pattern",
        ),
        (
            format!("{MINIMAL}\n[trigger.serial]\nport = \"/dev/x\"\nline_pattern = \"^(?P<sn>[A-Z]+)$\"\n"),
            "line_pattern",
            "trigger.serial.line_pattern",
        ),
        (format!("{MINIMAL}tcti = \"carrier-pigeon:/x\"\n"), "tcti", "slot[fixture-1].tcti"),
        (format!("{MINIMAL}ek = \"make-one\"\n"), "ek = ", "slot[fixture-1].ek"),
        (
            format!("{MINIMAL}registration_id = \"{{serial}}-{{lot}}\"\n"),
            "registration_id",
            "slot[fixture-1].registration_id",
        ),
        // A registration id template that can never give a valid id.
        (
            format!("{MINIMAL}registration_id = \"board {{serial}}\"\n"),
            "registration_id",
            "slot[fixture-1].registration_id",
        ),
        (
            format!("{MINIMAL}\n[enrollment]\nregistration_id = \"-{{serial}}\"\n"),
            "registration_id",
            "enrollment.registration_id",
        ),
        (
            format!("{MINIMAL}\n[[slot]]\nname = \"fixture-1\"\nattestation = \"tpm\"\n"),
            "name = \"fixture-1\"\nattestation = \"tpm\"\n",
            "slot.name",
        ),
        (
            format!("{MINIMAL}\n[[slot]]\nname = \"d1\"\nattestation = \"dice\"\nregistration_id = \"b-{{serial}}\"\n"),
            "attestation = \"dice\"",
            "slot[d1].attestation",
        ),
        (
            MINIMAL.replace("[dps]\n", "[dps]\nendpoint = \"http://dps.example.com\"\n"),
            "endpoint",
            "dps.endpoint",
        ),
        (
            format!("{MINIMAL}\n[control]\nhttp = \"everywhere\"\n"),
            "http = ",
            "control.http",
        ),
    ];
    for (text, needle, key) in cases {
        let d = diag(&text);
        // Duplicate names: the second `name = "fixture-1"` line.
        let want = if key == "slot.name" {
            text.lines()
                .enumerate()
                .filter(|(_, l)| l.contains("name = \"fixture-1\""))
                .nth(1)
                .map(|(i, _)| i + 1)
        } else {
            let first = needle.lines().next().unwrap();
            Some(
                text.lines()
                    .enumerate()
                    .filter(|(_, l)| l.contains(first))
                    .last()
                    .map(|(i, _)| i + 1)
                    .unwrap(),
            )
        };
        assert_eq!(d.line, want, "{key}: {d}\n{text}");
        assert_eq!(d.key.as_deref(), Some(key), "{d}");
    }
}

#[test]
fn structural_requirements_are_checked() {
    let d = diag("[[slot]]\nname = \"a\"\nattestation = \"tpm\"\n");
    assert_eq!(d.key.as_deref(), Some("dps"));
    let d = diag("[dps]\nconnection_string_file = \"/x\"\n");
    assert_eq!(d.key.as_deref(), Some("slot"));
    // `[dps]` exists but names no connection string source: its header line.
    let d = diag("# station\n\n[dps]\n[[slot]]\nname = \"a\"\nattestation = \"tpm\"\n");
    assert_eq!(d.key.as_deref(), Some("dps.connection_string_file"));
    assert_eq!(d.line, Some(3), "{d}");
    assert!(d.to_string().starts_with("station.toml:3: "), "{d}");
    // A `[[slot]]` without a name: the slot's header line, also for an empty table.
    let d = diag("[dps]\nconnection_string_file = \"/x\"\n[[slot]]\nattestation = \"tpm\"\n");
    assert_eq!(d.key.as_deref(), Some("slot.name"));
    assert_eq!(d.line, Some(3), "{d}");
    let d = diag(&format!(
        "{MINIMAL}\n[[slot]]\n\n[control]\nsocket = \"/x\"\n"
    ));
    assert_eq!(d.key.as_deref(), Some("slot.name"));
    let want = MINIMAL.lines().count() + 2;
    assert_eq!(d.line, Some(want), "{d}");
    // A slot without attestation: its header line.
    let d = diag("[dps]\nconnection_string_file = \"/x\"\n\n[[slot]]\nname = \"a\"\n");
    assert_eq!(d.key.as_deref(), Some("slot[a].attestation"));
    assert_eq!(d.line, Some(4), "{d}");
    // An unknown placeholder deep inside initial_twin: the line of that string, the key
    // path down to it, in whichever file (config.d) wrote it.
    let text = format!(
        "{MINIMAL}\n[enrollment.initial_twin.tags]\nline = \"A\"\n\
         [enrollment.initial_twin.tags.where]\nstation = \"st-{{slott}}\"\n"
    );
    let d = diag(&text);
    assert_eq!(d.line, Some(line_of(&text, "st-{slott}")), "{d}");
    assert_eq!(
        d.key.as_deref(),
        Some("enrollment.initial_twin.tags.where.station"),
        "{d}"
    );
    assert!(d.message.contains("{slott}"), "{d}");
    let dir = layered_dir(
        MINIMAL,
        &[(
            "50-twin.toml",
            "# twin\n[enrollment.initial_twin.properties.desired]\nfw = \"{fw}\"\n",
        )],
    );
    let err = config::load_with_env(&dir.path().join("station.toml"), &[]).unwrap_err();
    let d = err.diagnostic().unwrap();
    assert!(d.origin.ends_with("config.d/50-twin.toml"), "{d}");
    assert_eq!(d.line, Some(3), "{d}");
    assert_eq!(
        d.key.as_deref(),
        Some("enrollment.initial_twin.properties.desired.fw")
    );
}

#[test]
fn a_secret_in_the_toml_is_refused_with_a_hint_and_not_echoed() {
    let secret =
        "HostName=x.azure-devices-provisioning.net;SharedAccessKeyName=p;SharedAccessKey=c2VjcmV0";
    let text = format!(
        "[dps]\nconnection_string = \"{secret}\"\n[[slot]]\nname = \"a\"\nattestation = \"tpm\"\n"
    );
    let err = config::load_str(&text, Path::new("s.toml")).unwrap_err();
    let d = err.diagnostic().unwrap();
    assert_eq!(d.line, Some(2));
    assert_eq!(d.key.as_deref(), Some("dps.connection_string"));
    assert!(err.hint().unwrap().contains("connection_string_file"));
    assert!(!err.to_string().contains("c2VjcmV0"));
    assert!(!format!("{err:?}").contains("c2VjcmV0"));

    let text = "[dps]\nconnection_string_file = \"/x\"\nshared_access_key = \"c2VjcmV0\"\n[[slot]]\nname = \"a\"\nattestation = \"tpm\"\n";
    let err = config::load_str(text, Path::new("s.toml")).unwrap_err();
    assert_eq!(err.diagnostic().unwrap().line, Some(3));
    assert!(!format!("{err:?}").contains("c2VjcmV0"));
}

#[test]
fn the_connection_string_comes_from_its_file_or_systemd_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "HostName=127.0.0.1:1;SharedAccessKeyName=p;SharedAccessKey=c2VjcmV0";
    let cs = dir.path().join("cs");
    std::fs::write(&cs, format!("  {secret}\n\n")).unwrap();
    let text = format!(
        "[dps]\nconnection_string_file = {:?}\n[[slot]]\nname = \"a\"\nattestation = \"tpm\"\n",
        cs.display().to_string()
    );
    let cfg = config::load_str(&text, Path::new("s.toml")).unwrap();
    assert_eq!(cfg.read_connection_string().unwrap().expose(), secret);

    // No file in the TOML: $CREDENTIALS_DIRECTORY/dps-connection-string.
    let creds = dir.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(creds.join("dps-connection-string"), secret).unwrap();
    let main = dir.path().join("station.toml");
    std::fs::write(
        &main,
        "[dps]\n[[slot]]\nname = \"a\"\nattestation = \"tpm\"\n",
    )
    .unwrap();
    let cfg: Config = config::load_with_env(
        &main,
        &env(&[("CREDENTIALS_DIRECTORY", creds.to_str().unwrap())]),
    )
    .unwrap();
    assert_eq!(cfg.read_connection_string().unwrap().expose(), secret);

    // An empty or missing file names the file, never a content.
    std::fs::write(&cs, "\n").unwrap();
    let cfg = config::load_str(&text, Path::new("s.toml")).unwrap();
    let err = cfg.read_connection_string().unwrap_err();
    assert!(err.to_string().contains("is empty"), "{err}");
    std::fs::remove_file(&cs).unwrap();
    let err = cfg.read_connection_string().unwrap_err();
    assert!(err.to_string().contains(&cs.display().to_string()), "{err}");
}

// ---------------------------------------------------------------------------------------------
// `dps-station check` against real parts.
// ---------------------------------------------------------------------------------------------

mod check {
    use super::common::pty::Scanner;
    use super::common::swtpm::{board, SwtpmVariant};
    use std::path::Path;
    use std::process::Command;

    struct Run {
        code: i32,
        stdout: String,
        stderr: String,
    }

    impl Run {
        fn json(&self) -> serde_json::Value {
            serde_json::from_str(&self.stdout)
                .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}\n{}", self.stdout, self.stderr))
        }
        /// name → (ok, detail)
        fn items(&self) -> Vec<(String, bool, String)> {
            self.json()["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| {
                    (
                        i["name"].as_str().unwrap().to_string(),
                        i["ok"].as_bool().unwrap(),
                        i["detail"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        }
        fn item(&self, name: &str) -> (bool, String) {
            self.items()
                .into_iter()
                .find(|(n, _, _)| n == name)
                .map(|(_, ok, d)| (ok, d))
                .unwrap_or_else(|| panic!("no item {name}: {}", self.stdout))
        }
    }

    async fn check(config: &Path, json: bool) -> Run {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dps-station"));
        cmd.arg("--config").arg(config).arg("check");
        if json {
            cmd.arg("--json");
        }
        cmd.env_remove("DPS_CONNECTION_STRING")
            .env_remove("CREDENTIALS_DIRECTORY");
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap();
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    struct Station {
        dir: tempfile::TempDir,
        ca: dps_station::attest::ca::DevCaPaths,
        http: String,
    }

    impl Station {
        fn new() -> Station {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir(dir.path().join("state")).unwrap();
            let ca = dps_station::attest::ca::init_dev_ca(&dir.path().join("ca"), "Check Test CA")
                .unwrap();
            Station {
                dir,
                ca,
                http: "127.0.0.1:0".into(),
            }
        }
        fn p(&self, rel: &str) -> String {
            self.dir.path().join(rel).display().to_string()
        }
        fn write(
            &self,
            connection_string: &str,
            tcti: &str,
            ek: &str,
            port: &str,
        ) -> std::path::PathBuf {
            std::fs::write(self.dir.path().join("cs"), format!("{connection_string}\n")).unwrap();
            let text = format!(
                r#"[dps]
connection_string_file = "{cs}"
request_timeout = "5s"

[state]
path = "{state}"

[[slot]]
name = "fixture-1"
attestation = "tpm"
tcti = "{tcti}"
ek = "{ek}"
tpm_timeout = "20s"

[[slot]]
name = "fixture-2"
attestation = "dice"
registration_id = "board-{{serial}}"

[dice]
ca_cert = "{ca_cert}"
ca_key = "{ca_key}"
out_dir = "{dice}"

[trigger.serial]
port = "{port}"

[control]
socket = "{sock}"
http = "{http}"
"#,
                http = self.http,
                cs = self.p("cs"),
                state = self.p("state/station.db"),
                ca_cert = self.ca.intermediate_cert.display(),
                ca_key = self.ca.intermediate_key.display(),
                dice = self.p("dice"),
                sock = self.p("control.sock"),
            );
            let path = self.dir.path().join("station.toml");
            std::fs::write(&path, text).unwrap();
            path
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn check_passes_when_every_part_answers() {
        let emu = dps_station::emulator::start(Default::default())
            .await
            .unwrap();
        let tpm = board(SwtpmVariant::EkPersistedWithCert);
        let scanner = Scanner::new();
        let st = Station::new();
        let cfg = st.write(
            &emu.connection_string(),
            &tpm.tcti(),
            "read-only",
            &scanner.slave_path.display().to_string(),
        );
        let run = check(&cfg, true).await;
        assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
        let names: Vec<String> = run.items().into_iter().map(|(n, _, _)| n).collect();
        assert_eq!(
            names,
            [
                "config",
                "state",
                "control",
                "http",
                "tpm fixture-1",
                "dice fixture-2",
                "scanner",
                "dps"
            ]
        );
        assert!(run.items().iter().all(|(_, ok, _)| *ok), "{}", run.stdout);
        assert_eq!(run.json()["ok"], true);
        let (_, tpm_detail) = run.item("tpm fixture-1");
        assert!(tpm_detail.contains("EK at 0x81010001 read"), "{tpm_detail}");
        assert!(
            run.item("dice fixture-2").1.contains("Check Test CA"),
            "{}",
            run.stdout
        );
        // The DPS item really reached the service.
        let stats = emu.stats();
        assert!(
            stats
                .by_operation
                .get("IndividualEnrollment_Query")
                .copied()
                .unwrap_or(0)
                >= 1,
            "{stats:?}"
        );
        // The probe file in the state directory is gone; nothing else was created there.
        assert_eq!(
            std::fs::read_dir(st.dir.path().join("state"))
                .unwrap()
                .count(),
            0
        );

        let human = check(&cfg, false).await;
        assert_eq!(human.code, 0);
        let lines: Vec<&str> = human.stdout.lines().collect();
        assert_eq!(lines.len(), 8, "{}", human.stdout);
        assert!(
            lines.iter().all(|l| l.starts_with("[ok]")),
            "{}",
            human.stdout
        );
        emu.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn check_names_every_failing_part_and_exits_1_without_leaking_the_key() {
        let emu = dps_station::emulator::start(Default::default())
            .await
            .unwrap();
        // Same host and policy, wrong key.
        let wrong_key = "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXktd3Jvbmc=";
        let cs = emu.connection_string();
        let (head, _) = cs.split_once("SharedAccessKey=").unwrap();
        let bad_cs = format!("{head}SharedAccessKey={wrong_key}");
        // A TCTI where nothing listens.
        let dead_port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut st = Station::new();
        // An HTTP address someone else holds.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        st.http = taken.local_addr().unwrap().to_string();
        let cfg = st.write(
            &bad_cs,
            &format!("swtpm:host=127.0.0.1,port={dead_port}"),
            "read-only",
            &st.p("no-such-tty"),
        );
        // A CA key others can read is refused.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            &st.ca.intermediate_key,
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        std::fs::remove_dir(st.dir.path().join("state")).unwrap();
        // A regular file where the control socket goes: `run` would refuse it.
        std::fs::write(st.dir.path().join("control.sock"), "not a socket").unwrap();

        let run = check(&cfg, true).await;
        assert_eq!(run.code, 1, "{}\n{}", run.stdout, run.stderr);
        assert_eq!(run.json()["ok"], false);
        assert!(run.item("config").0);
        for name in [
            "state",
            "control",
            "http",
            "tpm fixture-1",
            "dice fixture-2",
            "scanner",
            "dps",
        ] {
            let (ok, detail) = run.item(name);
            assert!(!ok, "{name} should fail: {detail}");
        }
        assert!(
            run.item("state").1.contains("does not exist"),
            "{}",
            run.stdout
        );
        assert!(
            run.item("tpm fixture-1").1.contains(&dead_port.to_string()),
            "{}",
            run.stdout
        );
        assert!(
            run.item("dice fixture-2").1.contains("0644"),
            "{}",
            run.stdout
        );
        assert!(
            run.item("scanner").1.contains("no-such-tty"),
            "{}",
            run.stdout
        );
        assert!(run.item("dps").1.contains("401"), "{}", run.stdout);
        assert!(
            run.item("control").1.contains("not a socket"),
            "{}",
            run.stdout
        );
        assert!(run.item("http").1.contains(&st.http), "{}", run.stdout);
        let real_key = cs.split_once("SharedAccessKey=").unwrap().1;
        for out in [&run.stdout, &run.stderr] {
            assert!(!out.contains(wrong_key) && !out.contains(real_key), "{out}");
            assert!(!out.contains("sig="), "{out}");
        }

        let human = check(&cfg, false).await;
        assert_eq!(human.code, 1);
        assert_eq!(
            human
                .stdout
                .lines()
                .filter(|l| l.starts_with("[FAIL]"))
                .count(),
            7,
            "{}",
            human.stdout
        );
        emu.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn check_never_creates_an_ek() {
        let emu = dps_station::emulator::start(Default::default())
            .await
            .unwrap();
        let tpm = board(SwtpmVariant::NoPersistedEk);
        let scanner = Scanner::new();
        let st = Station::new();
        let port = scanner.slave_path.display().to_string();
        // read-or-create: a TPM without a persistent EK is fine for the station...
        let cfg = st.write(
            &emu.connection_string(),
            &tpm.tcti(),
            "read-or-create",
            &port,
        );
        let run = check(&cfg, true).await;
        assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
        assert!(
            run.item("tpm fixture-1").1.contains("no persistent EK yet"),
            "{}",
            run.stdout
        );
        // ...and check did not create or persist one: read-only still finds none.
        let cfg = st.write(&emu.connection_string(), &tpm.tcti(), "read-only", &port);
        let run = check(&cfg, true).await;
        assert_eq!(run.code, 1, "{}", run.stdout);
        let (ok, detail) = run.item("tpm fixture-1");
        assert!(!ok);
        assert!(detail.contains("TPM_RC_HANDLE"), "{detail}");
        emu.shutdown().await;
    }

    /// On a live station the daemon holds the scanner port, the control socket and the HTTP
    /// address: `check` reports the daemon's own view instead of failing on "busy".
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn check_on_a_live_station_reports_what_the_daemon_holds() {
        let emu = dps_station::emulator::start(Default::default())
            .await
            .unwrap();
        let tpm = board(SwtpmVariant::EkPersistedWithCert);
        let scanner = Scanner::new();
        let mut st = Station::new();
        st.http = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let cfg = st.write(
            &emu.connection_string(),
            &tpm.tcti(),
            "read-only",
            &scanner.slave_path.display().to_string(),
        );
        let d =
            dps_station::station::daemon::Daemon::start(dps_station::config::load(&cfg).unwrap())
                .await
                .expect("daemon starts");
        let mut up = false;
        for _ in 0..500 {
            let t = d.pipeline.status().await.trigger.unwrap_or_default();
            if t["connected"] == true {
                up = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(up, "the daemon opened the scanner");
        let run = check(&cfg, true).await;
        assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
        assert!(
            run.item("control").1.contains("daemon is running"),
            "{}",
            run.stdout
        );
        assert!(
            run.item("http").1.contains("served by the running daemon"),
            "{}",
            run.stdout
        );
        assert!(
            run.item("scanner").1.contains("open in the running daemon"),
            "{}",
            run.stdout
        );
        d.shutdown().await;
        emu.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_config_error_exits_2_naming_file_line_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("station.toml");
        std::fs::write(
            &path,
            "[dps]\nconnection_string_file = \"/x\"\n\n[batch]\nmax_size = 25\n\n[[slot]]\nname = \"a\"\nattestation = \"tpm\"\n",
        )
        .unwrap();
        let run = check(&path, false).await;
        assert_eq!(run.code, 2, "{}\n{}", run.stdout, run.stderr);
        let first = run.stderr.lines().next().unwrap_or("");
        assert_eq!(
            first,
            format!(
                "error: {}:5: batch.max_size: must be between 1 and 10, got 25",
                path.display()
            )
        );
        assert!(run.stderr.contains("hint: "), "{}", run.stderr);
        let run = check(&path, true).await;
        assert_eq!(run.code, 2);
        assert_eq!(run.json()["ok"], false);
        assert!(!run.item("config").0);

        let run = check(&dir.path().join("missing.toml"), false).await;
        assert_eq!(run.code, 2);
        assert!(
            run.stderr.contains("missing.toml: no such file"),
            "{}",
            run.stderr
        );
    }
}

#[test]
fn inline_and_dotted_tables_are_accepted() {
    let text = "dps = { connection_string_file = \"/x\" }\nslot = [{ name = \"a\", attestation = \"tpm\" }]\n\
                [trigger]\nserial = { port = \"/dev/ttyUSB0\", baud = 115200 }\n";
    let cfg = config::load_str(text, Path::new("inline.toml")).unwrap();
    assert_eq!(cfg.trigger.serial.unwrap().baud, 115200);
    let text = format!("{MINIMAL}\n[trigger]\nserial.port = \"/dev/ttyUSB1\"\n");
    let cfg = config::load_str(&text, Path::new("dotted.toml")).unwrap();
    assert_eq!(cfg.trigger.serial.unwrap().port, Path::new("/dev/ttyUSB1"));
}

#[test]
fn the_dev_config_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/dev.toml");
    let cfg = config::load_with_env(&path, &[]).unwrap();
    assert_eq!(cfg.slots.len(), 2);
    assert_eq!(
        cfg.slots[0].tcti.as_deref(),
        Some("swtpm:host=127.0.0.1,port=2321")
    );
    assert!(cfg.trigger.serial.is_none());
    assert_eq!(cfg.control.socket, Path::new("target/dev/control.sock"));
}
