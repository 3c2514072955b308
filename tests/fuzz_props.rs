//! Property tests ("fuzzing" with proptest) of every parser that reads bytes the station
//! does not control: scanner lines, connection strings, the config file, DPS responses
//! (models, and the real client against a real socket answering arbitrary HTTP), TPM2B EK
//! blobs, X.509 certificates, CSRs and the DICE TcbInfo extension.
//!
//! Each property must hold for ARBITRARY input: no panic, a typed error (never a crash,
//! never secret material in its text), and a round trip where one exists. Inputs are both
//! random and structure-aware (mutations of real example documents and certificates).
//!
//! The default case counts keep this file under ~20 s in a debug build; set
//! `PROPTEST_CASES=N` (scripts/fuzz.sh) for a long run. Regression inputs found by fuzzing
//! live in `tests/fixtures/fuzz/` and are replayed by the `regression_*` tests at the end.
//! This file must never mock a part it can run, nor weaken a property to make it pass.
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use base64::Engine as _;
use dps_station::attest::{ca, dice, tcbinfo, tpm, x509};
use dps_station::cli::dps_cmds::{check_tpm2b, check_tpm2b_b64, read_bulk_file};
use dps_station::cli::Exit;
use dps_station::config::{self, ConfigError, DEFAULT_LINE_PATTERN};
use dps_station::dps::{
    self, AttestationMechanism, BulkEnrollmentGroupOperationResult, BulkEnrollmentOperationResult,
    ClientOptions, ConnectionString, DeviceRegistrationState, DpsClient, EnrollmentGroup,
    IndividualEnrollment, OperationMode, ProvisioningServiceErrorDetails, RegistrationId,
};
use dps_station::station::scanline::{self, Framer, LineError, MAX_LINE};
use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, FileFailurePersistence, TestRunner};
use serde_json::{json, Map, Value};

// ---------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------

/// `default` cases, unless `PROPTEST_CASES` asks for more (or fewer).
fn cfg(default: u32) -> PtConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(default);
    PtConfig {
        cases,
        // Failing seeds are kept with the other fuzz fixtures and replayed first.
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/fixtures/fuzz/proptest-seeds.txt",
        ))),
        ..PtConfig::default()
    }
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz")
}

fn printable_one_line(s: &str) -> bool {
    s.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

/// Bytes biased towards what a barcode scanner sends, with line breaks and junk mixed in.
fn scanner_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        8 => prop::sample::select(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-:abcdefxyz".to_vec()),
        2 => Just(b'\r'),
        2 => Just(b'\n'),
        1 => prop::sample::select(vec![b' ', b'\t']),
        1 => any::<u8>(),
    ]
}

/// One piece of a scanner stream: a token, a run long enough to overflow a line, a
/// terminator, or binary junk.
fn scanner_stream() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        6 => prop::collection::vec(scanner_byte(), 0..40),
        1 => (250usize..300, prop::sample::select(b"A \x00".to_vec())).prop_map(|(n, b)| vec![b; n]),
        3 => prop::sample::select(vec![b"\r\n".to_vec(), b"\r".to_vec(), b"\n".to_vec(), b"\n\r".to_vec()]),
        1 => prop::collection::vec(any::<u8>(), 1..6),
    ];
    prop::collection::vec(piece, 0..24).prop_map(|v| v.concat())
}

/// Split `bytes` at the given (sorted, deduplicated) cut points.
fn split_at_cuts(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut out = Vec::new();
    let mut start = 0;
    for c in cuts {
        out.push(bytes[start..c].to_vec());
        start = c;
    }
    out.push(bytes[start..].to_vec());
    out
}

/// An independent reading of DESIGN §5 framing, to check the real framer against.
fn framer_oracle(bytes: &[u8]) -> Vec<Result<String, &'static str>> {
    fn finish(cur: &[u8], out: &mut Vec<Result<String, &'static str>>) {
        if cur.len() > MAX_LINE {
            out.push(Err("too-long"));
            return;
        }
        let blank = |c: &u8| *c == b' ' || *c == b'\t';
        let start = cur.iter().position(|c| !blank(c)).unwrap_or(cur.len());
        let end = cur.iter().rposition(|c| !blank(c)).map_or(start, |e| e + 1);
        let t = &cur[start..end];
        if t.is_empty() {
            return;
        }
        if t.iter().any(|b| !(0x20..=0x7e).contains(b)) {
            out.push(Err("binary"));
            return;
        }
        out.push(Ok(String::from_utf8(t.to_vec()).unwrap()));
    }
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'\r' || b == b'\n' {
            finish(&cur, &mut out);
            cur.clear();
            if b == b'\r' && bytes.get(i + 1) == Some(&b'\n') {
                i += 1;
            }
        } else {
            cur.push(b);
        }
        i += 1;
    }
    out
}

fn run_framer(chunks: &[Vec<u8>]) -> (Vec<Result<String, LineError>>, Framer) {
    let mut f = Framer::new();
    let mut out = Vec::new();
    for c in chunks {
        out.extend(f.push(c));
        assert!(
            f.pending() <= MAX_LINE,
            "framer holds {} bytes",
            f.pending()
        );
    }
    (out, f)
}

fn simplify(r: &[Result<String, LineError>]) -> Vec<Result<String, &'static str>> {
    r.iter()
        .map(|x| match x {
            Ok(s) => Ok(s.clone()),
            Err(e) => Err(e.reason),
        })
        .collect()
}

fn line_regex() -> &'static regex::Regex {
    static RE: OnceLock<regex::Regex> = OnceLock::new();
    RE.get_or_init(|| regex::Regex::new(DEFAULT_LINE_PATTERN).unwrap())
}

/// Arbitrary JSON, biased towards DPS member names and values so that deserialization
/// goes deep into the models instead of failing at the first member.
fn dps_json() -> impl Strategy<Value = Value> {
    const NAMES: &[&str] = &[
        "registrationId",
        "enrollmentGroupId",
        "deviceId",
        "attestation",
        "type",
        "tpm",
        "endorsementKey",
        "storageRootKey",
        "x509",
        "clientCertificates",
        "signingCertificates",
        "caReferences",
        "primary",
        "secondary",
        "info",
        "subjectName",
        "sha1Thumbprint",
        "notBeforeUtc",
        "notAfterUtc",
        "symmetricKey",
        "primaryKey",
        "capabilities",
        "iotEdge",
        "etag",
        "provisioningStatus",
        "allocationPolicy",
        "iotHubs",
        "iotHubHostName",
        "initialTwin",
        "tags",
        "properties",
        "desired",
        "reprovisionPolicy",
        "updateHubAssignment",
        "migrateDeviceData",
        "registrationState",
        "status",
        "substatus",
        "errors",
        "errorCode",
        "errorStatus",
        "isSuccessful",
        "trackingId",
        "message",
        "code",
        "timestampUtc",
        "createdDateTimeUtc",
        "lastUpdatedDateTimeUtc",
        "customAllocationDefinition",
        "webhookUrl",
        "apiVersion",
        "mode",
        "enrollments",
        "query",
        "zzUnknown",
        "",
    ];
    const STRINGS: &[&str] = &[
        "tpm",
        "x509",
        "symmetricKey",
        "none",
        "enabled",
        "disabled",
        "hashed",
        "static",
        "geoLatency",
        "custom",
        "create",
        "update",
        "updateIfMatchETag",
        "delete",
        "assigned",
        "failed",
        "AToAAQALAAMAsgAg",
        "2023-05-19T23:10:43.9486465Z",
        "",
        "\u{0}",
        "\u{fffd}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        prop::sample::select(vec![409201i64, 404201, 412, 429, 500, -1, 4_294_967_296])
            .prop_map(|n| json!(n)),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        prop::sample::select(STRINGS).prop_map(|s| Value::String(s.to_string())),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 96, 8, |inner| {
        let name = prop_oneof![
            4 => prop::sample::select(NAMES).prop_map(str::to_string),
            1 => "[a-zA-Z]{1,10}",
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((name, inner), 0..8)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Deserialize `v` into `T`; if that works, the model must be a fixed point after one
/// serialize/deserialize round.
fn model_fixed_point<T>(v: &Value) -> bool
where
    T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
{
    let Ok(m1) = serde_json::from_value::<T>(v.clone()) else {
        return false;
    };
    let v1 = serde_json::to_value(&m1).unwrap();
    let m2: T = serde_json::from_value(v1.clone())
        .unwrap_or_else(|e| panic!("re-reading our own output failed: {e}\n{v1}"));
    assert_eq!(m1, m2, "model changed on a round trip of {v}");
    assert_eq!(serde_json::to_value(&m2).unwrap(), v1);
    true
}

// ---------------------------------------------------------------------------------------
// 1. Scanner lines (DESIGN §5)
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(cfg(1024))]

    /// The framer agrees with an independent reading of §5 however the stream is cut into
    /// reads, never yields a line over 256 bytes and never holds more than 256 bytes.
    #[test]
    fn framer_matches_the_spec_for_any_chunking(
        bytes in scanner_stream(),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let chunks = split_at_cuts(&bytes, &cuts);
        let (got, _) = run_framer(&chunks);
        let (whole, _) = run_framer(std::slice::from_ref(&bytes));
        prop_assert_eq!(simplify(&got), simplify(&whole), "chunking changed the lines");
        prop_assert_eq!(simplify(&got), framer_oracle(&bytes));
        for r in &got {
            match r {
                Ok(l) => {
                    prop_assert!(!l.is_empty() && l.len() <= MAX_LINE);
                    prop_assert!(printable_one_line(l), "{:?}", l);
                }
                Err(e) => {
                    prop_assert!(matches!(e.reason, "too-long" | "binary"), "{}", e.reason);
                    let reply = e.reply_line();
                    prop_assert!(printable_one_line(&reply), "{:?}", reply);
                    prop_assert!(reply.starts_with("ERROR - "), "{}", reply);
                }
            }
        }
    }

    /// Completely arbitrary bytes in arbitrary reads: no panic, bounded memory.
    #[test]
    fn framer_survives_arbitrary_reads(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..16)) {
        let (got, _) = run_framer(&chunks);
        for r in got.iter().flatten() {
            prop_assert!(r.len() <= MAX_LINE);
        }
    }

    /// `\r\n` is one terminator even when the read boundary falls between `\r` and `\n`.
    #[test]
    fn crlf_split_across_reads_is_one_terminator(
        serials in prop::collection::vec("[A-Z0-9-]{4,32}", 1..10),
    ) {
        let mut chunks = Vec::new();
        for s in &serials {
            chunks.push(format!("{s}\r").into_bytes());
            chunks.push(b"\n".to_vec());
        }
        let (got, f) = run_framer(&chunks);
        prop_assert_eq!(f.pending(), 0);
        let want: Vec<Result<String, &'static str>> = serials.iter().map(|s| Ok(s.clone())).collect();
        prop_assert_eq!(simplify(&got), want);
    }

    /// Parsing a framed line: only the configured shape is accepted, refusals carry a §5
    /// reason and a printable reply.
    #[test]
    fn scan_parse_accepts_only_the_pattern(line in prop_oneof![
        "([a-z0-9-]{1,8}:)?[A-Z0-9-]{0,36}",
        "[ -~]{0,64}",
        ".{0,300}",
    ]) {
        match scanline::parse(&line, line_regex()) {
            Ok(scan) => {
                let serial_ok = regex::Regex::new("^[A-Z0-9-]{4,32}$").unwrap();
                prop_assert!(serial_ok.is_match(&scan.serial), "{:?}", scan);
                let rebuilt = match &scan.slot {
                    Some(slot) => format!("{slot}:{}", scan.serial),
                    None => scan.serial.clone(),
                };
                prop_assert_eq!(rebuilt, line);
            }
            Err(e) => {
                prop_assert!(matches!(e.reason, "bad-format" | "too-long" | "binary"), "{}", e.reason);
                prop_assert!(printable_one_line(&e.reply_line()));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// 2. Connection strings
// ---------------------------------------------------------------------------------------

/// A connection string built from parts, then damaged the ways people damage them.
#[derive(Debug, Clone)]
struct CsCase {
    text: String,
    key: String,
}

fn connection_string_case() -> impl Strategy<Value = CsCase> {
    let key = prop::collection::vec(any::<u8>(), 16..48)
        .prop_map(|b| base64::engine::general_purpose::STANDARD.encode(b));
    let host = prop_oneof![
        Just("mydps.azure-devices-provisioning.net".to_string()),
        Just("127.0.0.1:8443".to_string()),
        "[a-z0-9.:-]{0,20}",
        ".{0,12}",
    ];
    let policy = prop_oneof![
        Just("provisioningserviceowner".to_string()),
        "[A-Za-z0-9_. -]{0,12}"
    ];
    let mutation = prop_oneof![
        Just(0u8),
        Just(1),
        Just(2),
        Just(3),
        Just(4),
        Just(5),
        Just(6),
        Just(7),
        Just(8),
        Just(9),
        Just(10),
        Just(11)
    ];
    (key, host, policy, mutation, any::<usize>(), ".{0,6}").prop_map(
        |(key, host, policy, m, pos, junk)| {
            let mut parts = vec![
                format!("HostName={host}"),
                format!("SharedAccessKeyName={policy}"),
                format!("SharedAccessKey={key}"),
            ];
            let p = pos % parts.len();
            match m {
                0 => {}
                1 => {
                    parts.remove(p);
                }
                2 => parts.rotate_left(p),
                3 => {
                    let d = parts[p].clone();
                    parts.push(d);
                }
                4 => parts[2] = format!("SharedAccessKey {key}"),
                5 => parts[2] = format!("sharedaccesskey={key}"),
                6 => parts.push(junk.clone()),
                7 => parts[2] = format!("SharedAccessKey={key}{junk}"),
                8 => parts[2] = format!("SharedAccessKey={}", &key[..pos % key.len()]),
                9 => parts[2] = format!("SharedAccessKey=\"{key}\""),
                // A stray separator or line break pasted into the key.
                10 => {
                    let at = pos % key.len();
                    parts[2] = format!("SharedAccessKey={};{}", &key[..at], &key[at..]);
                }
                _ => {
                    let at = pos % key.len();
                    parts[2] = format!("SharedAccessKey={}\n{}", &key[..at], &key[at..]);
                }
            }
            CsCase {
                text: parts.join(if pos % 7 == 0 { " ; " } else { ";" }),
                key,
            }
        },
    )
}

proptest! {
    #![proptest_config(cfg(2048))]

    /// Never panics on any text.
    #[test]
    fn connection_string_parse_never_panics(s in ".{0,200}") {
        let _ = ConnectionString::parse(&s);
    }

    /// Well-formed strings round-trip; damaged ones give an error whose text (and the
    /// Debug of a parsed value) never contains the key or a long piece of it.
    #[test]
    fn connection_string_errors_never_show_the_key(case in connection_string_case()) {
        let shown = match ConnectionString::parse(&case.text) {
            Ok(cs) => {
                let dbg = format!("{cs:?}");
                if case.text.contains(&format!("SharedAccessKey={}", case.key)) {
                    if let Ok(want) = base64::engine::general_purpose::STANDARD.decode(&case.key) {
                        if cs.key().expose().len() == want.len() {
                            prop_assert_eq!(cs.key().expose(), &want);
                        }
                    }
                }
                dbg
            }
            Err(e) => format!("{e} {e:?}"),
        };
        // Any 12-character window of the key is evidence of a leak (a random host or
        // policy name of the generator's alphabets cannot contain one by chance).
        let k = case.key.as_bytes();
        for w in k.windows(12.min(k.len())) {
            let w = std::str::from_utf8(w).unwrap();
            prop_assert!(!shown.contains(w), "key piece {:?} shown in {:?} (input {:?})", w, shown, case.text);
        }
    }
}

// ---------------------------------------------------------------------------------------
// 3. The config loader
// ---------------------------------------------------------------------------------------

const EXAMPLE: &str = include_str!("../config/station.example.toml");

fn check_config_result(
    text: &str,
    r: Result<config::Config, ConfigError>,
) -> Result<(), TestCaseError> {
    let Err(e) = r else { return Ok(()) };
    let msg = e.to_string();
    prop_assert!(!msg.is_empty());
    match &e {
        ConfigError::Invalid(d) => {
            prop_assert!(
                msg.starts_with("station.toml"),
                "error does not name the file: {}",
                msg
            );
            if let Some(line) = d.line {
                let lines = text.lines().count().max(1);
                prop_assert!(
                    line >= 1 && line <= lines + 1,
                    "line {} of {} in {}",
                    line,
                    lines,
                    msg
                );
            }
            // Located by line, or (for something absent) named by its key.
            prop_assert!(
                d.line.is_some() || d.key.is_some(),
                "unlocated error: {}",
                msg
            );
        }
        other => prop_assert!(false, "load_str gave a non-located error: {other}"),
    }
    Ok(())
}

/// Line-level damage to the example config.
fn mutated_example() -> impl Strategy<Value = String> {
    const VALUES: &[&str] = &[
        "\"\"",
        "\"x\"",
        "0",
        "-1",
        "11",
        "99999999999999999999",
        "1e400",
        "nan",
        "true",
        "[]",
        "[1, \"a\"]",
        "{}",
        "{ a = 1 }",
        "\"{serial}\"",
        "\"{nope}\"",
        "\"2s\"",
        "\"-2s\"",
        "\"0s\"",
        "\"http://10.0.0.1\"",
        "\"swtpm:host=127.0.0.1,port=0\"",
        "\"(\"",
        "\"^(?P<serial>.*)$\"",
        "\"sha256:zz\"",
        "1979-05-27T07:32:00Z",
        "'''\n'''",
        "\"\\u0000\"",
    ];
    let lines: Vec<String> = EXAMPLE.lines().map(str::to_string).collect();
    let n = lines.len();
    let op = (0u8..8, 0..n, 0..n, prop::sample::select(VALUES), ".{0,24}");
    (Just(lines), prop::collection::vec(op, 1..4)).prop_map(|(mut lines, ops)| {
        for (kind, a, b, value, junk) in ops {
            if lines.is_empty() {
                lines.push(junk.clone());
            }
            let a = a % lines.len();
            let b = b % lines.len();
            match kind {
                0 => {
                    lines.remove(a);
                }
                1 => {
                    let l = lines[a].clone();
                    lines.insert(b, l);
                }
                2 => lines.swap(a, b),
                3 => {
                    if let Some((k, _)) = lines[a].clone().split_once('=') {
                        lines[a] = format!("{k}= {value}");
                    }
                }
                4 => lines.insert(a, junk.clone()),
                5 => {
                    let l = &lines[a];
                    let cut = junk.len() % (l.len() + 1);
                    let cut = (0..=cut)
                        .rev()
                        .find(|c| l.is_char_boundary(*c))
                        .unwrap_or(0);
                    lines[a] = l[..cut].to_string();
                }
                6 => lines[a] = lines[a].to_uppercase(),
                _ => lines[a] = lines[a].replace('_', "-"),
            }
        }
        lines.join("\n")
    })
}

/// TOML-shaped text from the config's own vocabulary.
fn toml_like() -> impl Strategy<Value = String> {
    const HEADERS: &[&str] = &[
        "[dps]",
        "[batch]",
        "[state]",
        "[enrollment]",
        "[[slot]]",
        "[dice]",
        "[trigger.serial]",
        "[control]",
        "[enrollment.initial_twin.tags]",
        "[enrollment.initial_twin.properties.desired]",
        "[trigger]",
        "[[dps]]",
        "[slot]",
    ];
    const KEYS: &[&str] = &[
        "connection_string_file",
        "endpoint",
        "ca_file",
        "api_version",
        "request_timeout",
        "max_operations_per_minute",
        "max_size",
        "max_delay",
        "path",
        "registration_id",
        "device_id",
        "provisioning_status",
        "iot_hubs",
        "allocation_policy",
        "name",
        "attestation",
        "tcti",
        "ek",
        "ca_cert",
        "ca_key",
        "fwid",
        "validity_days",
        "out_dir",
        "enroll",
        "port",
        "baud",
        "line_pattern",
        "reply",
        "socket",
        "http",
        "connection_string",
        "capabilities",
        "reprovision_policy",
        "require_hardware_tpm",
        "tpm_timeout",
        "group_id",
    ];
    const VALUES: &[&str] = &[
        "\"/tmp/cs\"",
        "\"tpm\"",
        "\"dice\"",
        "\"fixture-1\"",
        "\"read-only\"",
        "\"2s\"",
        "10",
        "11",
        "0",
        "-5",
        "true",
        "\"{serial}\"",
        "\"{ek_hash}\"",
        "\"http://127.0.0.1:1\"",
        "\"https://example.net\"",
        "\"127.0.0.1:0\"",
        "{ iot_edge = true }",
        "[\"a\"]",
        "\"\"",
        "\"device:/dev/tpmrm0\"",
        "\"mssim:host=localhost\"",
        "\"individual\"",
        "\"group\"",
    ];
    let line = prop_oneof![
        2 => prop::sample::select(HEADERS).prop_map(str::to_string),
        6 => (prop::sample::select(KEYS), prop::sample::select(VALUES)).prop_map(|(k, v)| format!("{k} = {v}")),
        1 => ".{0,30}",
        1 => Just(String::new()),
    ];
    prop::collection::vec(line, 0..30).prop_map(|l| l.join("\n"))
}

proptest! {
    #![proptest_config(cfg(512))]

    #[test]
    fn config_arbitrary_text_never_panics(text in ".{0,400}") {
        let r = config::load_str(&text, Path::new("station.toml"));
        check_config_result(&text, r)?;
    }

    #[test]
    fn config_toml_shaped_text_gives_located_errors(text in toml_like()) {
        let r = config::load_str(&text, Path::new("station.toml"));
        check_config_result(&text, r)?;
    }

    #[test]
    fn config_mutated_example_gives_located_errors(text in mutated_example()) {
        let r = config::load_str(&text, Path::new("station.toml"));
        check_config_result(&text, r)?;
    }
}

#[test]
fn config_example_loads_unmutated() {
    config::load_str(EXAMPLE, Path::new("station.toml")).unwrap();
}

// ---------------------------------------------------------------------------------------
// 4. DPS responses: models, and the real client against arbitrary HTTP answers
// ---------------------------------------------------------------------------------------

/// The recorded real-service TPM enrollment (reference/dps-api.md §3), as the base for
/// unknown-field insertion.
fn recorded_enrollment() -> Value {
    json!({
        "registrationId": "ind_enroll_tpm_9e563d5a",
        "deviceId": "dev-1",
        "registrationState": {"registrationId": "ind_enroll_tpm_9e563d5a", "status": "unassigned"},
        "attestation": {"type": "tpm", "tpm": {"endorsementKey": "AToAAQALAAMAsgAg"}},
        "capabilities": {"iotEdge": false},
        "etag": "IjAwMDAxOWVkLTAwMDAtMDgwMC0wMDAwLTY0NjgwMWYzMDAwMCI=",
        "provisioningStatus": "enabled",
        "reprovisionPolicy": {"updateHubAssignment": true, "migrateDeviceData": true},
        "createdDateTimeUtc": "2023-05-19T23:10:43.9486465Z",
        "lastUpdatedDateTimeUtc": "2023-05-19T23:10:43.9486465Z",
        "allocationPolicy": "hashed",
        "initialTwin": {"tags": {"line": "A"}, "properties": {"desired": {"x": 2}}}
    })
}

proptest! {
    #![proptest_config(cfg(1024))]

    /// Any JSON into any response model: no panic; what parses is a round-trip fixed point.
    #[test]
    fn dps_models_accept_or_refuse_any_json(v in dps_json()) {
        model_fixed_point::<IndividualEnrollment>(&v);
        model_fixed_point::<EnrollmentGroup>(&v);
        model_fixed_point::<DeviceRegistrationState>(&v);
        model_fixed_point::<AttestationMechanism>(&v);
        model_fixed_point::<BulkEnrollmentOperationResult>(&v);
        model_fixed_point::<BulkEnrollmentGroupOperationResult>(&v);
        model_fixed_point::<ProvisioningServiceErrorDetails>(&v);
        model_fixed_point::<Vec<IndividualEnrollment>>(&v);
        model_fixed_point::<Vec<DeviceRegistrationState>>(&v);
    }

    /// Arbitrary bytes (not JSON at all) are refused with an error, never a panic.
    #[test]
    fn dps_models_refuse_arbitrary_bytes(b in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = serde_json::from_slice::<IndividualEnrollment>(&b);
        let _ = serde_json::from_slice::<BulkEnrollmentOperationResult>(&b);
        let _ = serde_json::from_slice::<ProvisioningServiceErrorDetails>(&b);
        let _ = serde_json::from_slice::<Vec<EnrollmentGroup>>(&b);
    }

    /// Members this version does not know, anywhere in a record, survive get → put.
    #[test]
    fn unknown_fields_survive_the_round_trip(
        extras in prop::collection::vec((0usize..7, "zz[A-Za-z]{1,8}", dps_json()), 1..6),
    ) {
        let mut wire = recorded_enrollment();
        for (at, name, value) in extras {
            let obj = match at {
                0 => &mut wire,
                1 => &mut wire["attestation"],
                2 => &mut wire["attestation"]["tpm"],
                3 => &mut wire["capabilities"],
                4 => &mut wire["reprovisionPolicy"],
                5 => &mut wire["registrationState"],
                _ => &mut wire["initialTwin"],
            };
            obj.as_object_mut().unwrap().insert(name, value);
        }
        let e: IndividualEnrollment = serde_json::from_value(wire.clone()).unwrap();
        prop_assert_eq!(serde_json::to_value(&e).unwrap(), wire);
    }
}

/// A real TCP server on 127.0.0.1 that answers every request with the bytes in `reply`
/// and closes the connection.
struct RawServer {
    port: u16,
    reply: Arc<Mutex<Vec<u8>>>,
}

impl RawServer {
    fn start() -> RawServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let reply = Arc::new(Mutex::new(Vec::new()));
        let r = reply.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut s) = conn else { continue };
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                // Read the head, then the body it announces.
                let mut buf = Vec::new();
                let mut tmp = [0u8; 4096];
                let head_end = loop {
                    if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break Some(p + 4);
                    }
                    match s.read(&mut tmp) {
                        Ok(0) | Err(_) => break None,
                        Ok(n) => buf.extend_from_slice(&tmp[..n]),
                    }
                };
                let Some(head_end) = head_end else { continue };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                while buf.len() < head_end + len {
                    match s.read(&mut tmp) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&tmp[..n]),
                    }
                }
                let bytes = r.lock().unwrap().clone();
                let _ = s.write_all(&bytes);
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        });
        RawServer { port, reply }
    }
}

/// One HTTP answer: status, a few headers DPS clients read, and a body.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    retry_after: Option<String>,
    continuation: Option<String>,
    error_code_header: Option<String>,
    content_length: u8, // 0 right, 1 none, 2 too long, 3 too short
    body: Vec<u8>,
    raw_garbage: Option<Vec<u8>>,
}

impl Answer {
    fn bytes(&self) -> Vec<u8> {
        if let Some(g) = &self.raw_garbage {
            return g.clone();
        }
        let mut h = format!(
            "HTTP/1.1 {} X\r\nContent-Type: application/json\r\n",
            self.status
        );
        if let Some(v) = &self.retry_after {
            h.push_str(&format!("Retry-After: {v}\r\n"));
        }
        if let Some(v) = &self.continuation {
            h.push_str(&format!("x-ms-continuation: {v}\r\n"));
        }
        if let Some(v) = &self.error_code_header {
            h.push_str(&format!("x-ms-error-code: {v}\r\n"));
        }
        match self.content_length {
            0 => h.push_str(&format!("Content-Length: {}\r\n", self.body.len())),
            1 => {}
            2 => h.push_str(&format!("Content-Length: {}\r\n", self.body.len() + 7)),
            _ => h.push_str(&format!("Content-Length: {}\r\n", self.body.len() / 2)),
        }
        h.push_str("Connection: close\r\n\r\n");
        let mut out = h.into_bytes();
        out.extend_from_slice(&self.body);
        out
    }
}

fn answer() -> impl Strategy<Value = Answer> {
    let status = prop_oneof![
        prop::sample::select(vec![
            200u16, 201, 204, 400, 401, 403, 404, 409, 412, 429, 500, 502, 503
        ]),
        100u16..1000,
    ];
    let header_value = prop_oneof![
        prop::sample::select(vec![
            "0",
            "1",
            "0.001",
            "-1",
            "NaN",
            "inf",
            "1e309",
            "86399.5",
            "18446744073709551615",
            "99999999999999999999",
            "Wed, 21 Oct 2015 07:28:00 GMT",
            "",
        ])
        .prop_map(str::to_string),
        "[ -~]{0,20}",
    ];
    let body = prop_oneof![
        3 => dps_json().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        2 => (any::<i64>(), ".{0,10}", any::<bool>(), ".{0,10}").prop_map(|(code, msg, ok, id)| {
            serde_json::to_vec(&json!({
                "errorCode": code, "trackingId": id, "message": msg,
                "isSuccessful": ok, "errors": [{"registrationId": id, "errorCode": code, "errorStatus": msg}],
            })).unwrap()
        }),
        1 => prop::collection::vec(any::<u8>(), 0..200),
    ];
    (
        status,
        prop::option::weighted(0.5, header_value.clone()),
        prop::option::weighted(0.3, header_value.clone()),
        prop::option::weighted(0.3, header_value),
        0u8..4,
        body,
        prop::option::weighted(0.05, prop::collection::vec(any::<u8>(), 0..64)),
    )
        .prop_map(
            |(
                status,
                retry_after,
                continuation,
                error_code_header,
                content_length,
                body,
                raw_garbage,
            )| Answer {
                status,
                retry_after,
                continuation,
                error_code_header,
                content_length,
                body,
                raw_garbage,
            },
        )
}

const FUZZ_KEY_B64: &str = "ZnV6ei1wcm9wZXJ0eS10ZXN0LWtleS0wMTIzNDU2Nzg5YWJjZGVm";

fn fuzz_client(port: u16) -> DpsClient {
    let cs = ConnectionString::parse(&format!(
        "HostName=127.0.0.1:{port};SharedAccessKeyName=provisioningserviceowner;SharedAccessKey={FUZZ_KEY_B64}"
    ))
    .unwrap();
    DpsClient::new(
        cs,
        ClientOptions {
            request_timeout: Duration::from_secs(5),
            // One attempt per call: this property is about reading answers, not waiting.
            retry_budget: Duration::ZERO,
            ..ClientOptions::default()
        },
    )
    .unwrap()
}

/// Drive every kind of call the station makes against `answer`; every outcome must be a
/// value or a typed error whose text carries no key or signature.
async fn exercise_client(client: &DpsClient, op: u8) -> Result<(), String> {
    let item = IndividualEnrollment::new("board-1", AttestationMechanism::tpm("AToAAQALAAMAsgAg"));
    let err = match op % 6 {
        0 => client.get_enrollment("board-1").await.err(),
        1 => client
            .bulk_enrollments(OperationMode::Create, &[item])
            .await
            .err(),
        2 => client
            .query_enrollments_page("*", Some(10), None)
            .await
            .err(),
        3 => client.query_enrollments("*", Some(10)).await.err(),
        4 => client.delete_enrollment("board-1", Some("*")).await.err(),
        _ => client.get_registration("board-1").await.err(),
    };
    if let Some(e) = err {
        let text = format!("{e} {e:?}");
        // Classification must not panic either.
        let _ = (
            e.status(),
            e.error_code(),
            e.tracking_id(),
            e.retry_after(),
            e.is_retryable(),
        );
        if text.contains(FUZZ_KEY_B64)
            || text.contains("sig=")
            || text.contains("SharedAccessSignature")
        {
            return Err(format!("secret material in error: {text}"));
        }
    }
    Ok(())
}

/// The real DPS client against a real socket answering arbitrary HTTP: no panic, typed
/// errors, no secrets in them. (Includes absurd `Retry-After` values.)
#[test]
fn dps_client_survives_arbitrary_http_answers() {
    let server = RawServer::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut runner = TestRunner::new(cfg(256));
    let result = runner.run(&(answer(), any::<u8>()), |(ans, op)| {
        *server.reply.lock().unwrap() = ans.bytes();
        // A fresh client per case: a Retry-After from one case must not stall the next.
        let outcome = rt.block_on(async {
            let client = fuzz_client(server.port);
            tokio::time::timeout(Duration::from_secs(10), exercise_client(&client, op)).await
        });
        match outcome {
            Err(_) => Err(TestCaseError::fail(format!(
                "call hung for 10 s on {ans:?}"
            ))),
            Ok(Err(m)) => Err(TestCaseError::fail(m)),
            Ok(Ok(())) => Ok(()),
        }
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// What a SAS token means: the scheme and each field, names lower-cased and values
/// %-decoded (`sr` and `skn` also lower-cased), the last of a repeated field winning.
fn canonical_sas(token: &str) -> Option<(String, std::collections::BTreeMap<String, String>)> {
    let (scheme, rest) = token.trim().split_once(' ')?;
    let mut fields = std::collections::BTreeMap::new();
    for pair in rest.trim().split('&') {
        let Some((k, v)) = pair.split_once('=') else {
            continue;
        };
        let k = k.trim().to_ascii_lowercase();
        let mut v = percent_encoding::percent_decode_str(v)
            .decode_utf8_lossy()
            .into_owned();
        // The service matches the resource and the policy name case-insensitively.
        if k == "sr" || k == "skn" {
            v = v.trim().to_ascii_lowercase();
        }
        fields.insert(k, v);
    }
    Some((scheme.to_ascii_lowercase(), fields))
}

/// SAS tokens: the client's token always verifies at the emulator for any host, policy
/// and key; a token with any one byte changed never does.
fn sas_case() -> impl Strategy<Value = (String, String, Vec<u8>, u64, usize, u8)> {
    (
        "[A-Za-z0-9.-]{1,30}(:[0-9]{1,5})?",
        "[A-Za-z0-9_.-]{1,20}",
        prop::collection::vec(any::<u8>(), 1..64),
        1_000u64..4_000_000_000,
        any::<usize>(),
        1u8..=255,
    )
}

proptest! {
    #![proptest_config(cfg(1024))]

    #[test]
    fn sas_tokens_verify_and_tampering_is_caught((host, policy, key, se, at, x) in sas_case()) {
        let token = dps::sas::sas_token(&host, &policy, &key, se);
        let now = se - 1;
        let verify = dps_station::emulator::sas::verify;
        prop_assert_eq!(verify(Some(token.expose()), &host, &policy, &key, now), Ok(()));
        // Expired one second later.
        prop_assert!(verify(Some(token.expose()), &host, &policy, &key, se + 1).is_err());
        // Flip one byte after the scheme: refused (or, if it made the token unparsable, refused too).
        let mut bytes = token.expose().as_bytes().to_vec();
        let start = "SharedAccessSignature ".len();
        let i = start + at % (bytes.len() - start);
        bytes[i] ^= x;
        let tampered = String::from_utf8_lossy(&bytes).into_owned();
        let r = verify(Some(&tampered), &host, &policy, &key, now);
        // A change the verifier must treat as the same token (letter case of a field name,
        // of sr or of skn, an equivalent %-escape) may pass; anything else must be refused.
        if canonical_sas(&tampered) != canonical_sas(token.expose()) {
            prop_assert!(r.is_err(), "tampered token accepted: {:?}", tampered);
        }
        if let Err(e) = r {
            let text = e.to_string();
            prop_assert!(!text.contains("sig="), "{}", text);
        }
        // And any text at all is refused without panicking.
        let half: String = tampered.chars().take(tampered.chars().count() / 2).collect();
        let _ = verify(Some(&half), &host, &policy, &key, now);
    }

    #[test]
    fn emulator_fault_specs_parse_or_refuse(spec in prop_oneof![
        ".{0,60}",
        "((error-rate|status|latency|reset-rate|down-for|down-after|x)=[-0-9.a-z]{0,8},?){0,5}",
    ]) {
        let _ = dps_station::emulator::faults::FaultSpec::parse(&spec);
    }
}

/// The emulator answering arbitrary (authenticated) request bodies: always a DPS-shaped
/// 4xx or a success, never a 5xx, a dropped connection or a panic.
#[test]
fn emulator_answers_arbitrary_requests_with_4xx_not_5xx() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let emu = rt
        .block_on(dps_station::emulator::start(
            dps_station::emulator::EmulatorOptions::default(),
        ))
        .unwrap();
    let cs = ConnectionString::parse(&emu.connection_string()).unwrap();
    let base = emu.base_url();
    let http = reqwest::Client::new();
    let ids = prop_oneof![
        Just("board-1".to_string()),
        "[A-Za-z0-9._:-]{1,140}",
        "[ -~]{0,20}",
    ];
    let request = (0u8..6, ids, dps_json(), prop::option::of("[ -~]{0,12}"));
    let seen = Mutex::new(std::collections::BTreeMap::<u16, u32>::new());
    let mut runner = TestRunner::new(cfg(384));
    let result = runner.run(&request, |(kind, id, body, etag)| {
        let outcome: Result<(u16, Vec<u8>), String> = rt.block_on(async {
            let seg =
                percent_encoding::utf8_percent_encode(&id, percent_encoding::NON_ALPHANUMERIC)
                    .to_string();
            let (method, path, body) = match kind {
                0 => (reqwest::Method::PUT, format!("enrollments/{seg}"), body),
                1 => (
                    reqwest::Method::POST,
                    "enrollments".to_string(),
                    json!({"mode": "create", "enrollments": [body]}),
                ),
                2 => (reqwest::Method::POST, "enrollments".to_string(), body),
                3 => (reqwest::Method::POST, "enrollments/query".to_string(), body),
                4 => (
                    reqwest::Method::PUT,
                    format!("enrollmentGroups/{seg}"),
                    body,
                ),
                _ => (
                    reqwest::Method::DELETE,
                    format!("enrollments/{seg}"),
                    Value::Null,
                ),
            };
            let token = dps::sas::sas_token(
                cs.host_name(),
                cs.key_name(),
                cs.key().expose(),
                4_000_000_000,
            );
            let mut rb = http
                .request(method, format!("{base}/{path}?api-version=2021-10-01"))
                .header("Authorization", token.expose().as_str())
                .header("Content-Type", "application/json")
                .body(serde_json::to_vec(&body).unwrap());
            if let Some(e) = &etag {
                rb = rb.header("If-Match", e.as_str());
            }
            let resp = rb
                .send()
                .await
                .map_err(|e| format!("request failed: {e}"))?;
            let status = resp.status().as_u16();
            let bytes = resp
                .bytes()
                .await
                .map_err(|e| format!("body failed: {e}"))?;
            Ok((status, bytes.to_vec()))
        });
        let (status, bytes) = outcome.map_err(TestCaseError::fail)?;
        *seen.lock().unwrap().entry(status).or_default() += 1;
        prop_assert!(
            status < 500,
            "HTTP {} for kind {}: {}",
            status,
            kind,
            String::from_utf8_lossy(&bytes)
        );
        if status >= 400 {
            let e: ProvisioningServiceErrorDetails =
                serde_json::from_slice(&bytes).map_err(|e| {
                    TestCaseError::fail(format!(
                        "HTTP {status} body is not a DPS error ({e}): {}",
                        String::from_utf8_lossy(&bytes)
                    ))
                })?;
            prop_assert!(e.error_code.is_some(), "HTTP {} without errorCode", status);
        }
        Ok(())
    });
    rt.block_on(emu.shutdown());
    if let Err(e) = result {
        panic!("{e}");
    }
    // The requests really reached the service's validation (not all refused at the door).
    let seen = seen.into_inner().unwrap();
    println!("emulator statuses: {seen:?}");
    assert!(seen.keys().any(|s| *s == 400), "no 400 among {seen:?}");
    assert!(
        seen.keys().any(|s| *s != 400 && *s != 401),
        "only 400/401 among {seen:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 5. TPM2B_PUBLIC, certificates, CSRs, TcbInfo
// ---------------------------------------------------------------------------------------

/// The reference EK (reference/tpm-ek.md §2) and its registration id (DESIGN §6).
fn reference_ek() -> Vec<u8> {
    let b64 = std::fs::read_to_string(fixtures().join("reference-ek.b64")).unwrap();
    base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .unwrap()
}

proptest! {
    #![proptest_config(cfg(2048))]

    /// TPM2B check: accepted exactly when the 2-byte size matches the rest.
    #[test]
    fn tpm2b_check_matches_its_definition(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let ok = bytes.len() >= 4 && usize::from(u16::from_be_bytes([bytes[0], bytes[1]])) == bytes.len() - 2;
        let r = check_tpm2b(&bytes, "--tpm-ek");
        prop_assert_eq!(r.is_ok(), ok);
        if let Err(e) = r {
            prop_assert!(e.message.starts_with("--tpm-ek"), "{}", e.message);
        }
        let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
        prop_assert_eq!(check_tpm2b_b64(&b64, "x").map(|_| ()).is_ok(), ok);
        let h = tpm::ek_hash(&bytes);
        prop_assert_eq!(h.len(), 52);
        prop_assert!(h.bytes().all(|c| c.is_ascii_lowercase() || (b'2'..=b'7').contains(&c)));
        prop_assert!(RegistrationId::parse(&h).is_ok());
    }

    /// Any size-prefixed body is a TPM2B; a bare TPMT of the EK is refused with a hint.
    #[test]
    fn tpm2b_prefix_round_trip(body in prop::collection::vec(any::<u8>(), 2..1024), text in ".{0,40}") {
        let mut b = (body.len() as u16).to_be_bytes().to_vec();
        b.extend_from_slice(&body);
        prop_assert!(check_tpm2b(&b, "x").is_ok());
        let _ = check_tpm2b_b64(&text, "x");
        let _ = tpm::parse_tcti(&text);
        let _ = config::validate_tcti(&text);
        let _ = RegistrationId::parse(&text);
        let _ = RegistrationId::parse_x509(&text);
        let _ = text.parse::<dice::Fwid>();
    }

    /// The reference EK with bytes flipped or cut: typed answers only.
    #[test]
    fn mutated_reference_ek(flips in prop::collection::vec((any::<usize>(), any::<u8>()), 0..4), cut in any::<usize>()) {
        let mut ek = reference_ek();
        for (at, x) in flips {
            let i = at % ek.len();
            ek[i] ^= x;
        }
        let n = if cut % 3 == 0 { cut % (ek.len() + 1) } else { ek.len() };
        let ek = &ek[..n];
        let _ = check_tpm2b(ek, "x");
        // An EK certificate read from NV may be anything.
        let _ = tpm::parse_ek_cert(ek, Some(&ek[ek.len().min(4)..]));
    }
}

#[test]
fn reference_ek_is_accepted_and_hashes_to_the_design_vector() {
    let ek = reference_ek();
    assert_eq!(ek.len(), tpm::RSA2048_EK_TPM2B_LEN);
    check_tpm2b(&ek, "x").unwrap();
    // DESIGN §6 vector.
    assert_eq!(
        tpm::ek_hash(&ek),
        "y5wivfciikcievvnsbpkhzcahwm4chuzx6v4hnqnlqfs3fjf6rxa"
    );
    // The bare TPMT is refused with the TPMT hint.
    let e = check_tpm2b(&ek[2..], "x").unwrap_err();
    assert!(e.hint.unwrap_or_default().contains("TPMT"));
}

/// A dev CA and one board's DICE chain, made once with the project's own code.
struct Chain {
    _dir: tempfile::TempDir,
    ca: ca::StationCa,
    ca_der: Vec<u8>,
    alias_der: Vec<u8>,
    device_id_der: Vec<u8>,
    alias_pem: String,
    tcb_der: Vec<u8>,
    csr_der: Vec<u8>,
}

fn chain() -> &'static Chain {
    static C: OnceLock<Chain> = OnceLock::new();
    C.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let paths = ca::init_dev_ca(&dir.path().join("ca"), "Fuzz Station").unwrap();
        let station =
            ca::StationCa::load(&paths.intermediate_cert, &paths.intermediate_key).unwrap();
        let rid = RegistrationId::parse("board-fuzz-0001").unwrap();
        let fwid: dice::Fwid = format!("sha256:{}", "ab".repeat(32)).parse().unwrap();
        let b = dice::issue_board_with_uds(
            &station,
            "FUZZ-0001",
            &rid,
            &fwid,
            &dice::DiceOptions::default(),
            &[7u8; 32],
        )
        .unwrap();
        let info = x509::leaf_cert_info(&b.alias_cert_der).unwrap();
        let tcb = info.tcb_info.expect("alias has TcbInfo");
        // A CSR made by an independent tool (rcgen) with a P-256 key, as a board would.
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params = rcgen::CertificateParams::new(vec!["FUZZ-0002".to_string()]).unwrap();
        let csr = params.serialize_request(&key).unwrap();
        Chain {
            ca_der: station.cert_der().to_vec(),
            alias_der: b.alias_cert_der.clone(),
            device_id_der: b.device_id_cert_der.clone(),
            alias_pem: b.alias_cert_pem.clone(),
            tcb_der: tcb.to_der(),
            csr_der: csr.der().to_vec(),
            ca: station,
            _dir: dir,
        }
    })
}

/// Flip, cut, or splice bytes of `der`.
fn mutate(der: &[u8], flips: &[(usize, u8)], cut: usize, insert: &[u8]) -> Vec<u8> {
    let mut d = der.to_vec();
    for (at, x) in flips {
        let i = at % d.len().max(1);
        if let Some(b) = d.get_mut(i) {
            *b ^= x;
        }
    }
    if cut % 4 == 0 {
        d.truncate(cut % (d.len() + 1));
    }
    if !insert.is_empty() {
        let at = cut % (d.len() + 1);
        d.splice(at..at, insert.iter().copied());
    }
    d
}

fn der_mutation() -> impl Strategy<Value = (u8, Vec<(usize, u8)>, usize, Vec<u8>)> {
    (
        0u8..4,
        prop::collection::vec((any::<usize>(), 1u8..=255), 0..4),
        any::<usize>(),
        prop::collection::vec(any::<u8>(), 0..3),
    )
}

proptest! {
    #![proptest_config(cfg(512))]

    /// Certificates with damage anywhere: every checker answers with a value or a typed
    /// error, and the emulator's certificate reader does too.
    #[test]
    fn mutated_certificates_give_typed_errors((which, flips, cut, insert) in der_mutation()) {
        let c = chain();
        let base = match which {
            0 => &c.alias_der,
            1 => &c.device_id_der,
            2 => &c.ca_der,
            _ => &c.csr_der,
        };
        let d = mutate(base, &flips, cut, &insert);
        let now = time::OffsetDateTime::now_utc();
        if let Ok(info) = x509::leaf_cert_info(&d) {
            let _ = info.tcb_info.as_ref().map(|t| t.sha256_fwid());
        }
        let _ = x509::check_issuing_ca(&d, now);
        let _ = x509::verify_signed_by(&d, &c.ca_der);
        let _ = x509::verify_signed_by(&c.device_id_der, &d);
        let pem_text = pem::encode(&pem::Pem::new("CERTIFICATE", d.clone()));
        let _ = x509::leaf_cert_info_pem(pem_text.as_bytes());
        let _ = dps_station::emulator::x509::certificate_info(&pem_text);
        let _ = dps_station::emulator::x509::certificate_info(&base64::engine::general_purpose::STANDARD.encode(&d));
        let _ = tpm::parse_ek_cert(&d, None);
        // As a board CSR.
        let csr = dice::csr_der_from_bytes(&d, "board.csr").unwrap();
        if let Err(e) = dice::sign_device_id_csr(&c.ca, "FUZZ-0002", &csr, "board.csr", &dice::DiceOptions::default()) {
            prop_assert!(!e.reason().is_empty());
        }
    }

    /// PEM-ish text and arbitrary bytes into the PEM and CSR readers.
    #[test]
    fn arbitrary_pem_and_csr_inputs(bytes in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300),
        ("(-----BEGIN [A-Z ]{0,20}-----\n)?[A-Za-z0-9+/=\n]{0,120}(-----END [A-Z ]{0,20}-----\n)?")
            .prop_map(String::into_bytes),
    ]) {
        let _ = x509::certs_from_pem(&bytes);
        let _ = x509::leaf_cert_info_pem(&bytes);
        let _ = x509::parse(&bytes);
        if let Ok(csr) = dice::csr_der_from_bytes(&bytes, "board.csr") {
            let _ = dice::sign_device_id_csr(&chain().ca, "FUZZ-0003", &csr, "board.csr", &dice::DiceOptions::default());
        }
        let _ = dps_station::emulator::x509::certificate_info(&String::from_utf8_lossy(&bytes));
    }

    /// TcbInfo: damaged DER decodes to a value or an error; arbitrary values round-trip.
    #[test]
    fn tcbinfo_der_is_total((_, flips, cut, insert) in der_mutation(), raw in prop::collection::vec(any::<u8>(), 0..64)) {
        let d = mutate(&chain().tcb_der, &flips, cut, &insert);
        let _ = tcbinfo::TcbInfo::from_der(&d);
        let _ = tcbinfo::TcbInfo::from_der(&raw);
    }

    #[test]
    fn tcbinfo_round_trips(
        vendor in prop::option::of(".{0,12}"),
        model in prop::option::of(".{0,12}"),
        version in prop::option::of(".{0,12}"),
        svn in prop::option::of(any::<u64>()),
        layer in prop::option::of(any::<u64>()),
        index in prop::option::of(any::<u64>()),
        fwids in prop::collection::vec(
            (0u64..3, 0u64..40, prop::collection::vec(any::<u64>(), 0..5), prop::collection::vec(any::<u8>(), 0..64)),
            0..3,
        ),
        vendor_info in prop::option::of(prop::collection::vec(any::<u8>(), 0..16)),
        tcb_type in prop::option::of(prop::collection::vec(any::<u8>(), 0..16)),
    ) {
        let info = tcbinfo::TcbInfo {
            vendor, model, version, svn, layer, index,
            fwids: fwids
                .into_iter()
                .map(|(a, b, rest, digest)| {
                    let mut hash_alg = vec![a, b];
                    hash_alg.extend(rest);
                    tcbinfo::TcbFwid { hash_alg, digest }
                })
                .collect(),
            vendor_info, tcb_type,
        };
        let der = info.to_der();
        let back = tcbinfo::TcbInfo::from_der(&der);
        prop_assert_eq!(back.as_ref().ok(), Some(&info), "{:?}", back);
    }
}

/// One CSV cell of a `bulk --file` CSV, biased towards values the checker must tell apart.
fn csv_cell(ek: String) -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just(ek.clone()),
        Just(ek[..ek.len() / 2].to_string()),
        Just(ek[4..].to_string()),
        Just("board-1".to_string()),
        Just("BOARD-1".to_string()),
        Just("board-fuzz-0001".to_string()),
        Just("alias.pem".to_string()),
        Just("missing.pem".to_string()),
        Just("/dev/null".to_string()),
        Just("enabled".to_string()),
        Just("Disabled".to_string()),
        Just("{\"line\":\"A\"}".to_string()),
        Just("[1,2]".to_string()),
        Just("\"quoted, with comma\"".to_string()),
        "[A-Za-z0-9._:-]{1,70}",
        "[ -~]{0,16}",
    ]
}

/// A cell for column `col`: usually a value of the right kind, sometimes anything.
fn csv_cell_for(col: &str, ek: &str) -> BoxedStrategy<String> {
    let s = |v: &str| Just(v.to_string()).boxed();
    let right: BoxedStrategy<String> = match col {
        "registrationId" => prop_oneof![
            "board-[a-z0-9]{1,8}",
            Just("board-fuzz-0001".to_string()),
            Just("Board-FUZZ-0001".to_string()),
        ]
        .boxed(),
        "endorsementKey" => s(ek),
        "certificateFile" => prop_oneof![s("alias.pem"), s("missing.pem"), s("")].boxed(),
        "deviceId" => "[A-Za-z0-9-]{0,12}".boxed(),
        "provisioningStatus" => prop_oneof![s("enabled"), s("disabled"), s("")].boxed(),
        "iotHubHostName" => prop_oneof![s("line-a.azure-devices.net"), s("")].boxed(),
        "tags" => prop_oneof![s("\"{\"\"line\"\":\"\"A\"\"}\""), s("")].boxed(),
        _ => s("x"),
    };
    prop_oneof![4 => right, 1 => csv_cell(ek.to_string())].boxed()
}

fn bulk_csv() -> impl Strategy<Value = String> {
    const OPTIONAL: &[&str] = &["deviceId", "provisioningStatus", "iotHubHostName", "tags"];
    let ek = std::fs::read_to_string(fixtures().join("reference-ek.b64"))
        .unwrap()
        .trim()
        .to_string();
    let attestation = prop::sample::select(vec![
        vec!["endorsementKey"],
        vec!["endorsementKey"],
        vec!["certificateFile"],
        vec!["endorsementKey", "certificateFile"],
        vec![],
    ]);
    (
        prop::bool::weighted(0.85),
        attestation,
        prop::sample::subsequence(OPTIONAL, 0..=OPTIONAL.len()),
        prop::bool::weighted(0.05),
        prop::bool::weighted(0.1),
        any::<u64>(),
    )
        .prop_flat_map(move |(with_id, att, opt, unknown, ragged, seed)| {
            let mut header: Vec<&str> = Vec::new();
            if with_id {
                header.push("registrationId");
            }
            header.extend(att);
            header.extend(opt);
            if unknown {
                header.push("color");
            }
            // A fixed shuffle per case (column order must not matter).
            let n = header.len();
            for i in (1..n).rev() {
                header.swap(i, (seed as usize).wrapping_mul(i + 7) % (i + 1));
            }
            let row: Vec<BoxedStrategy<String>> =
                header.iter().map(|c| csv_cell_for(c, &ek)).collect();
            let rows = if ragged && n > 0 {
                prop::collection::vec(prop::collection::vec(csv_cell(ek.clone()), 0..9), 1..4)
                    .boxed()
            } else {
                prop::collection::vec(row, 0..6).boxed()
            };
            let header: Vec<String> = header.iter().map(|c| c.to_string()).collect();
            (Just(header), rows)
        })
        .prop_map(|(header, rows)| {
            let mut out = header.join(",");
            for r in rows {
                out.push('\n');
                out.push_str(&r.join(","));
            }
            out
        })
}

proptest! {
    #![proptest_config(cfg(512))]

    /// `bulk … --file`: any CSV or JSON is either a list of checked enrollments or a usage
    /// error naming the file; never a panic.
    #[test]
    fn bulk_files_are_checked_or_refused(
        csv_text in bulk_csv(),
        json_v in dps_json(),
        mode in prop::sample::select(vec![OperationMode::Create, OperationMode::Update, OperationMode::UpdateIfMatchETag, OperationMode::Delete]),
    ) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("alias.pem"), &chain().alias_pem).unwrap();
        let csv_path = dir.path().join("boards.csv");
        std::fs::write(&csv_path, &csv_text).unwrap();
        let json_path = dir.path().join("boards.json");
        std::fs::write(&json_path, serde_json::to_vec(&json_v).unwrap()).unwrap();
        for path in [&csv_path, &json_path] {
            match read_bulk_file(path, None, &mode) {
                Ok(items) => {
                    prop_assert!(!items.is_empty());
                    let mut ids = std::collections::HashSet::new();
                    for e in &items {
                        prop_assert!(!e.registration_id.is_empty());
                        prop_assert!(ids.insert(e.registration_id.to_ascii_lowercase()), "duplicate id accepted");
                    }
                }
                Err(e) => {
                    prop_assert_eq!(e.exit, Exit::Usage, "{}", e.message);
                    let name = path.display().to_string();
                    prop_assert!(e.message.contains(&name), "error does not name the file: {}", e.message);
                }
            }
        }
    }
}

#[test]
fn the_chain_fixtures_are_what_the_properties_mutate() {
    let c = chain();
    x509::verify_signed_by(&c.device_id_der, &c.ca_der).unwrap();
    x509::verify_signed_by(&c.alias_der, &c.device_id_der).unwrap();
    assert_eq!(
        x509::leaf_cert_info_pem(c.alias_pem.as_bytes())
            .unwrap()
            .1
            .common_name
            .as_deref(),
        Some("board-fuzz-0001")
    );
    dice::sign_device_id_csr(
        &c.ca,
        "FUZZ-0002",
        &c.csr_der,
        "board.csr",
        &dice::DiceOptions::default(),
    )
    .unwrap();
    assert!(tcbinfo::TcbInfo::from_der(&c.tcb_der)
        .unwrap()
        .sha256_fwid()
        .is_some());
    let _ = dps::API_VERSION;
}

// ---------------------------------------------------------------------------------------
// Regression inputs found by fuzzing (tests/fixtures/fuzz/)
// ---------------------------------------------------------------------------------------

/// A fixture answer: head lines end in `\n` in the file (CRLF on the wire), then an empty
/// line, then the body bytes as they are.
fn fixture_answer(name: &str) -> Vec<u8> {
    let text = std::fs::read(fixtures().join(name)).unwrap();
    let split = text
        .windows(2)
        .position(|w| w == b"\n\n")
        .expect("head and body");
    let head = String::from_utf8(text[..split].to_vec()).unwrap();
    let mut out = head.lines().collect::<Vec<_>>().join("\r\n").into_bytes();
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(&text[split + 2..]);
    out
}

/// Every `http-*.txt` answer in tests/fixtures/fuzz, against every call: no panic, no
/// hang, no secret in the error.
#[test]
fn regression_http_answers() {
    let server = RawServer::start();
    let mut names: Vec<String> = std::fs::read_dir(fixtures())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("http-") && n.ends_with(".txt"))
        .collect();
    names.sort();
    assert!(!names.is_empty());
    for name in names {
        *server.reply.lock().unwrap() = fixture_answer(&name);
        for op in 0..6u8 {
            // Each call on its own thread: a panic is reported with the fixture's name.
            let port = server.port;
            let r = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let client = fuzz_client(port);
                    tokio::time::timeout(Duration::from_secs(10), exercise_client(&client, op))
                        .await
                })
            })
            .join();
            match r {
                Err(p) => panic!(
                    "{name}, op {op}: the client panicked: {}",
                    p.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default()
                ),
                Ok(Err(_)) => panic!("{name}, op {op}: the call hung for 10 s"),
                Ok(Ok(Err(m))) => panic!("{name}, op {op}: {m}"),
                Ok(Ok(Ok(()))) => {}
            }
        }
    }
}

/// One absurd `Retry-After` (127 years) must not stall the client's later calls past its
/// retry budget: the station daemon shares one client for its whole life.
#[test]
fn regression_huge_retry_after_does_not_stall_later_calls() {
    let server = RawServer::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cs = ConnectionString::parse(&format!(
        "HostName=127.0.0.1:{};SharedAccessKeyName=provisioningserviceowner;SharedAccessKey={FUZZ_KEY_B64}",
        server.port
    ))
    .unwrap();
    let budget = Duration::from_secs(2);
    let client = DpsClient::new(
        cs,
        ClientOptions {
            request_timeout: Duration::from_secs(5),
            retry_budget: budget,
            ..ClientOptions::default()
        },
    )
    .unwrap();
    *server.reply.lock().unwrap() = fixture_answer("http-retry-after-huge.txt");
    let first = rt.block_on(async {
        tokio::time::timeout(
            budget + Duration::from_secs(5),
            client.get_enrollment("board-1"),
        )
        .await
    });
    let first = first.expect("the throttled call returns within its budget");
    assert_eq!(first.unwrap_err().status(), Some(429));
    let ok = serde_json::to_vec(&json!({
        "registrationId": "board-1",
        "attestation": {"type": "tpm", "tpm": {"endorsementKey": "AToAAQALAAMAsgAg"}}
    }))
    .unwrap();
    let mut answer = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", ok.len()).into_bytes();
    answer.extend_from_slice(&ok);
    *server.reply.lock().unwrap() = answer;
    let second = rt.block_on(async {
        tokio::time::timeout(
            budget + Duration::from_secs(5),
            client.get_enrollment("board-1"),
        )
        .await
    });
    assert!(
        second.is_ok(),
        "after a Retry-After of 4000000000 s the next call was still waiting after {:?}",
        budget + Duration::from_secs(5)
    );
}

/// Every `cs-*.txt` in tests/fixtures/fuzz (line 1: a connection string, line 2: its
/// intended key): refused or accepted, the text shown never carries 12 characters of the key.
#[test]
fn regression_connection_strings() {
    let mut n = 0;
    for e in std::fs::read_dir(fixtures()).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        if !(name.starts_with("cs-") && name.ends_with(".txt")) {
            continue;
        }
        n += 1;
        let text = std::fs::read_to_string(fixtures().join(&name)).unwrap();
        let mut lines = text.lines();
        let (input, key) = (lines.next().unwrap(), lines.next().unwrap());
        let shown = match ConnectionString::parse(input) {
            Ok(cs) => format!("{cs:?}"),
            Err(e) => format!("{e} {e:?}"),
        };
        for w in key.as_bytes().windows(12) {
            let w = std::str::from_utf8(w).unwrap();
            assert!(
                !shown.contains(w),
                "{name}: key piece {w:?} shown in {shown:?}"
            );
        }
    }
    assert!(n > 0);
}
