//! DICE identities end to end: a development CA, board chains that the real `openssl verify`
//! accepts, certificate contents read back with x509-parser, frozen derivation vectors, every
//! refused input with its message, and the `ca init` / `dice issue` command line.
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use dps_station::attest::ca::{self, CaError, CaSigner, DevCaPaths, StationCa};
use dps_station::attest::dice::{self, DiceError, DiceOptions, Fwid};
use dps_station::attest::tcbinfo::SHA256_OID;
use dps_station::attest::x509::{self, X509Error};
use dps_station::dps::ids::RegistrationId;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

const FWID: &str = "sha256:ef70c42efc1a27cbb7a80a3d24b5192d9c6c7e787cbb2132dfc5dc5aa2b49121";
// Frozen vector (src/attest/dice.rs): UDS 00..1f with FWID above.
const VEC_ALIAS: &str = "04a512c4de77977ce4bc710964afcc94fbeb7de31f0287ade6a0fd7464395fba9d\
                         17cbeeacded520792f10ef1646f249f9792f86be5fcddb3d24eddc55d5117dcd";
const VEC_DEVICE_ID: &str = "04b10a52d34cc1f4a81cdf0e2f8799b454d03cbc6fc6e7ba6b71c499e2d95122c0\
                             e60ea634ff677c5b24d3e506b78a9f1152cf5a25ee11cd18e3afbdf963e2d3dc";

fn dev_ca(dir: &Path) -> DevCaPaths {
    ca::init_dev_ca(&dir.join("ca"), "test line").unwrap()
}

fn load(paths: &DevCaPaths) -> StationCa {
    StationCa::load(&paths.intermediate_cert, &paths.intermediate_key).unwrap()
}

fn rid(s: &str) -> RegistrationId {
    RegistrationId::parse_x509(s).unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// `openssl verify -x509_strict -purpose sslclient -CAfile root -untrusted U leaf`.
fn openssl_verify(root: &Path, untrusted: &[&Path], leaf: &Path, scratch: &Path) -> Output {
    let mut bundle = String::new();
    for p in untrusted {
        bundle.push_str(&std::fs::read_to_string(p).unwrap());
    }
    let u = scratch.join(format!(
        "untrusted-{}.pem",
        leaf.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&u, bundle).unwrap();
    Command::new("openssl")
        .args(["verify", "-x509_strict", "-purpose", "sslclient", "-CAfile"])
        .arg(root)
        .arg("-untrusted")
        .arg(&u)
        .arg(leaf)
        .output()
        .expect("openssl must be installed (make deps)")
}

fn assert_verifies(out: &Output) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(": OK"),
        "openssl verify failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_issued_board_chain_verifies_with_openssl_and_reads_back() {
    let tmp = tempfile::tempdir().unwrap();
    let paths = dev_ca(tmp.path());
    let ca = load(&paths);
    let fwid: Fwid = FWID.parse().unwrap();
    let bundle = dice::issue_board(
        &ca,
        "SN-0001",
        &rid("board-sn-0001"),
        &fwid,
        &DiceOptions::default(),
    )
    .unwrap();
    let out = tmp.path().join("out");
    let dir = bundle.write_to(&out).unwrap();
    assert_eq!(dir, out.join("SN-0001"));
    assert_eq!(mode(&out), 0o700);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("alias.key")), 0o600);
    assert_eq!(mode(&dir.join("uds.bin")), 0o600);
    assert_eq!(std::fs::read(dir.join("uds.bin")).unwrap().len(), 32);
    assert_eq!(mode(&dir.join("chain.pem")), 0o644);

    // The real OpenSSL accepts the chain, for TLS client use, in strict mode.
    let v = openssl_verify(
        &paths.root_cert,
        &[&paths.intermediate_cert, &dir.join("deviceid.pem")],
        &dir.join("alias.pem"),
        tmp.path(),
    );
    assert_verifies(&v);
    // chain.pem is alias, deviceid, intermediate in that order.
    let chain = x509::certs_from_pem(&std::fs::read(dir.join("chain.pem")).unwrap()).unwrap();
    assert_eq!(chain.len(), 3);
    assert_eq!(chain[0], bundle.alias_cert_der);
    assert_eq!(chain[1], bundle.device_id_cert_der);
    assert_eq!(chain[2], ca.cert_der());
    x509::verify_signed_by(&chain[0], &chain[1]).unwrap();
    x509::verify_signed_by(&chain[1], &chain[2]).unwrap();

    // Alias: end entity, CN = registration id, clientAuth, digitalSignature, TcbInfo.
    let alias = x509::leaf_cert_info(&bundle.alias_cert_der).unwrap();
    assert_eq!(alias.common_name.as_deref(), Some("board-sn-0001"));
    assert!(!alias.is_ca);
    assert!(alias.key_usage_digital_signature && !alias.key_usage_key_cert_sign);
    assert!(alias.eku_client_auth);
    assert!(alias.p256);
    assert_eq!(alias.sha256_hex, bundle.alias_cert_sha256_hex);
    assert_eq!(alias.serial_hex.len(), 32, "16-byte serial");
    let tcb = alias.tcb_info.as_ref().expect("TcbInfo extension");
    assert!(!alias.tcb_info_critical);
    assert_eq!(tcb.fwids.len(), 1);
    assert_eq!(tcb.fwids[0].hash_alg, SHA256_OID);
    assert_eq!(tcb.sha256_fwid(), Some(fwid.0));
    let days = (alias.not_after - alias.not_before).whole_days();
    assert!((3649..=3651).contains(&days), "{days}");

    // DeviceID: CA with pathLen 0, keyCertSign, issued by the intermediate.
    let devid = x509::leaf_cert_info(&bundle.device_id_cert_der).unwrap();
    assert!(devid.is_ca);
    assert_eq!(devid.path_len, Some(0));
    assert!(devid.key_usage_key_cert_sign);
    assert!(!devid.eku_client_auth && devid.tcb_info.is_none());
    assert_eq!(devid.issuer, ca.subject());
    assert_eq!(alias.issuer, devid.subject);
    assert_ne!(alias.serial_hex, devid.serial_hex);

    // The manifest names what must be deleted and carries no secret.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["serial"], "SN-0001");
    assert_eq!(manifest["registrationId"], "board-sn-0001");
    assert_eq!(manifest["fwid"], FWID);
    assert_eq!(
        manifest["alias"]["sha256Thumbprint"],
        alias.sha256_hex.as_str()
    );
    assert_eq!(
        manifest["deleteAfterInjection"],
        serde_json::json!(["uds.bin", "alias.key"])
    );
    let text = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
    assert!(!text.contains(&hex::encode(bundle.uds.expose())));

    // The Alias key file is the key of the Alias certificate.
    let key = KeyPair::from_pem(&std::fs::read_to_string(dir.join("alias.key")).unwrap()).unwrap();
    assert_eq!(key.public_key_raw(), alias.public_key.as_slice());

    // A bundle is never overwritten.
    assert!(matches!(
        bundle.write_to(&out),
        Err(DiceError::BundleExists(_))
    ));
}

#[test]
fn tcb_info_criticality_follows_the_option_and_openssl_refuses_it_when_critical() {
    let tmp = tempfile::tempdir().unwrap();
    let paths = dev_ca(tmp.path());
    let ca = load(&paths);
    let opts = DiceOptions {
        validity_days: 30,
        tcb_info_critical: true,
    };
    let b = dice::issue_board(
        &ca,
        "SN-2",
        &rid("board-sn-2"),
        &FWID.parse().unwrap(),
        &opts,
    )
    .unwrap();
    let info = x509::leaf_cert_info(&b.alias_cert_der).unwrap();
    assert!(info.tcb_info_critical);
    let days = (info.not_after - info.not_before).whole_days();
    assert!((29..=31).contains(&days), "{days}");
    // OpenSSL does not know the TCG extension: a critical one is rejected, which is why the
    // default is non-critical.
    let dir = b.write_to(&tmp.path().join("out")).unwrap();
    let v = openssl_verify(
        &paths.root_cert,
        &[&paths.intermediate_cert, &dir.join("deviceid.pem")],
        &dir.join("alias.pem"),
        tmp.path(),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    assert!(!v.status.success(), "{text}");
    assert!(text.contains("unhandled critical extension"), "{text}");
}

#[test]
fn the_same_uds_and_fwid_always_give_the_frozen_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = load(&dev_ca(tmp.path()));
    let uds: [u8; 32] = std::array::from_fn(|i| i as u8);
    let fwid: Fwid = FWID.parse().unwrap();
    let a = dice::issue_board_with_uds(
        &ca,
        "SN-3",
        &rid("board-sn-3"),
        &fwid,
        &DiceOptions::default(),
        &uds,
    )
    .unwrap();
    let b = dice::issue_board_with_uds(
        &ca,
        "SN-3",
        &rid("board-sn-3"),
        &fwid,
        &DiceOptions::default(),
        &uds,
    )
    .unwrap();
    for bundle in [&a, &b] {
        assert_eq!(hex::encode(&bundle.alias_public_key), VEC_ALIAS);
        assert_eq!(hex::encode(&bundle.device_id_public_key), VEC_DEVICE_ID);
        let alias = x509::leaf_cert_info(&bundle.alias_cert_der).unwrap();
        assert_eq!(hex::encode(alias.public_key), VEC_ALIAS);
        let devid = x509::leaf_cert_info(&bundle.device_id_cert_der).unwrap();
        assert_eq!(hex::encode(devid.public_key), VEC_DEVICE_ID);
    }
    // Same keys, but every certificate gets its own random serial.
    let sa = x509::leaf_cert_info(&a.alias_cert_der).unwrap().serial_hex;
    let sb = x509::leaf_cert_info(&b.alias_cert_der).unwrap().serial_hex;
    assert_ne!(sa, sb);
    // issue_board draws a fresh UDS each time.
    let c = dice::issue_board(
        &ca,
        "SN-4",
        &rid("board-sn-4"),
        &fwid,
        &DiceOptions::default(),
    )
    .unwrap();
    let d = dice::issue_board(
        &ca,
        "SN-4",
        &rid("board-sn-4"),
        &fwid,
        &DiceOptions::default(),
    )
    .unwrap();
    assert_ne!(c.uds.expose(), d.uds.expose());
    assert_ne!(c.alias_public_key, d.alias_public_key);
}

// ---------------------------------------------------------------------------------------
// Refused inputs

/// Write a CA made with rcgen (optionally broken) and return (cert, key) paths.
fn write_ca(
    dir: &Path,
    name: &str,
    edit: impl FnOnce(&mut CertificateParams),
) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    p.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(2);
    p.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(2);
    edit(&mut p);
    let cert = p.self_signed(&key).unwrap();
    let cert_path = dir.join(format!("{name}.pem"));
    let key_path = dir.join(format!("{name}.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    (cert_path, key_path)
}

fn cert_err(r: Result<StationCa, CaError>) -> (X509Error, String) {
    let e = r.unwrap_err();
    let msg = e.to_string();
    match e {
        CaError::Cert { source, .. } => (source, msg),
        other => panic!("expected a certificate error, got {other:?}"),
    }
}

#[test]
fn a_good_rcgen_ca_loads_and_each_broken_one_is_refused_with_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (c, k) = write_ca(d, "good", |_| {});
    let ca = StationCa::load(&c, &k).unwrap();
    assert_eq!(ca.subject(), "CN=good");

    let (c, k) = write_ca(d, "expired", |p| {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    });
    let (e, msg) = cert_err(StationCa::load(&c, &k));
    assert!(matches!(e, X509Error::Expired { .. }), "{e:?}");
    assert!(
        msg.contains("expired at 2021-01-01T00:00:00Z") && msg.contains("expired.pem"),
        "{msg}"
    );

    let (c, k) = write_ca(d, "leaf", |p| p.is_ca = IsCa::ExplicitNoCa);
    let (e, msg) = cert_err(StationCa::load(&c, &k));
    assert!(matches!(e, X509Error::NotCa { .. }), "{e:?}");
    assert!(
        msg.contains("is not a CA") && msg.contains("leaf.pem"),
        "{msg}"
    );

    let (c, k) = write_ca(d, "nokcs", |p| {
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature]
    });
    let (e, _) = cert_err(StationCa::load(&c, &k));
    assert!(matches!(e, X509Error::NoKeyCertSign { .. }), "{e:?}");

    let (c, k) = write_ca(d, "pathlen0", |p| {
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0))
    });
    let (e, msg) = cert_err(StationCa::load(&c, &k));
    assert!(matches!(e, X509Error::PathLen { .. }), "{e:?}");
    assert!(msg.contains("pathLen"), "{msg}");

    // A key that belongs to another certificate.
    let (c1, _) = write_ca(d, "one", |_| {});
    let (_, k2) = write_ca(d, "two", |_| {});
    let e = StationCa::load(&c1, &k2).unwrap_err();
    assert!(matches!(e, CaError::KeyMismatch { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("two.key") && msg.contains("one.pem") && msg.contains("does not match"),
        "{msg}"
    );
    assert_eq!(e.reason(), "ca-error");

    // A world-readable key: named with its mode, and never read.
    let (c, k) = write_ca(d, "loose", |_| {});
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = StationCa::load(&c, &k).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, CaError::KeyPermissions { .. }), "{e:?}");
    assert!(msg.contains("loose.key") && msg.contains("0644"), "{msg}");
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o640)).unwrap();
    assert!(StationCa::load(&c, &k)
        .unwrap_err()
        .to_string()
        .contains("0640"));

    // Not a certificate at all.
    std::fs::write(d.join("junk.pem"), "hello").unwrap();
    let (e, _) = cert_err(StationCa::load(&d.join("junk.pem"), &k2));
    assert!(
        matches!(e, X509Error::NoCertificate | X509Error::Pem(_)),
        "{e:?}"
    );
}

#[test]
fn registration_ids_must_be_valid_lower_case_cns() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = load(&dev_ca(tmp.path()));
    let fwid: Fwid = FWID.parse().unwrap();
    let opts = DiceOptions::default();
    // Over 64 characters cannot be a CN.
    let long = "a".repeat(65);
    let e = RegistrationId::parse_x509(&long).unwrap_err();
    assert!(
        e.to_string().contains("65 characters; the limit is 64"),
        "{e}"
    );
    let long_id = RegistrationId::parse(&long).unwrap(); // fine as a TPM id, not as a CN
    let e = dice::issue_board(&ca, "SN-5", &long_id, &fwid, &opts).unwrap_err();
    assert!(e.to_string().contains("limit is 64"), "{e}");
    assert_eq!(e.reason(), "bad-registration-id");
    // Illegal characters never make it into a RegistrationId.
    let e = RegistrationId::parse_x509("board sn/5").unwrap_err();
    assert!(e.to_string().contains("contains ' ' at position 5"), "{e}");
    // Upper case is refused for the Alias CN.
    let e = dice::issue_board(&ca, "SN-5", &rid("Board-SN-5"), &fwid, &opts).unwrap_err();
    assert!(matches!(e, DiceError::NotLowerCase(_)), "{e:?}");
    // A serial that is not a safe name.
    let e = dice::issue_board(&ca, "../etc", &rid("board-5"), &fwid, &opts).unwrap_err();
    assert_eq!(e.reason(), "bad-format");
    // Zero validity.
    let zero = DiceOptions {
        validity_days: 0,
        tcb_info_critical: false,
    };
    assert!(matches!(
        dice::issue_board(&ca, "SN-5", &rid("board-5"), &fwid, &zero),
        Err(DiceError::BadValidity)
    ));
}

#[test]
fn device_id_lifetime_never_exceeds_the_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, k) = write_ca(tmp.path(), "short", |_| {});
    let ca = StationCa::load(&c, &k).unwrap();
    let b = dice::issue_board(
        &ca,
        "SN-6",
        &rid("board-6"),
        &FWID.parse().unwrap(),
        &DiceOptions::default(),
    )
    .unwrap();
    assert!(b.not_after <= ca.not_after());
    let info = x509::leaf_cert_info(&b.device_id_cert_der).unwrap();
    assert!(info.not_after <= ca.not_after());
}

// ---------------------------------------------------------------------------------------
// CSR path

fn board_csr(cn: &str) -> (KeyPair, Vec<u8>) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    let csr = p.serialize_request(&key).unwrap();
    (key, csr.der().to_vec())
}

#[test]
fn a_board_made_csr_is_certified_as_device_id_and_a_tampered_one_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let paths = dev_ca(tmp.path());
    let ca = load(&paths);
    let (key, csr) = board_csr("board-7 DeviceID");
    let issued =
        dice::sign_device_id_csr(&ca, "SN-7", &csr, "board.csr", &DiceOptions::default()).unwrap();
    let info = x509::leaf_cert_info(&issued.device_id_cert_der).unwrap();
    assert_eq!(info.common_name.as_deref(), Some("board-7 DeviceID"));
    assert_eq!(info.public_key, key.public_key_raw());
    assert!(info.is_ca && info.path_len == Some(0) && info.key_usage_key_cert_sign);
    let dir = issued.write_to(&tmp.path().join("out")).unwrap();
    let v = Command::new("openssl")
        .args(["verify", "-x509_strict", "-CAfile"])
        .arg(&paths.root_cert)
        .arg("-untrusted")
        .arg(&paths.intermediate_cert)
        .arg(dir.join("deviceid.pem"))
        .output()
        .unwrap();
    assert_verifies(&v);

    // Flip one byte inside the signature (the last byte of the DER is in it).
    let mut bad = csr.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0x01;
    let e = dice::sign_device_id_csr(&ca, "SN-7", &bad, "board.csr", &DiceOptions::default())
        .unwrap_err();
    let msg = e.to_string();
    assert_eq!(e.reason(), "bad-csr");
    assert!(
        msg.contains("board.csr") && msg.contains("signature does not verify"),
        "{msg}"
    );
    // Not a CSR at all.
    let e = dice::sign_device_id_csr(&ca, "SN-7", b"nonsense", "x.csr", &DiceOptions::default())
        .unwrap_err();
    assert!(e.to_string().contains("not a DER PKCS#10 request"), "{e}");
    // PEM input is accepted.
    let pem_text = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", csr.clone()));
    assert_eq!(
        dice::csr_der_from_bytes(pem_text.as_bytes(), "x").unwrap(),
        csr
    );
}

// ---------------------------------------------------------------------------------------
// A pluggable signer

/// A signer that is not a file: proves `StationCa::from_signer` takes any `CaSigner`.
struct InMemorySigner(KeyPair);
impl CaSigner for InMemorySigner {
    fn public_key(&self) -> &[u8] {
        self.0.public_key_raw()
    }
    fn sign(&self, m: &[u8]) -> Result<Vec<u8>, ca::SignerError> {
        rcgen::SigningKey::sign(&self.0, m).map_err(|e| ca::SignerError(e.to_string()))
    }
    fn describe(&self) -> String {
        "memory:test".into()
    }
}

/// Claims the CA's public key but signs with another key: the probe must catch it.
struct LyingSigner(Vec<u8>, KeyPair);
impl CaSigner for LyingSigner {
    fn public_key(&self) -> &[u8] {
        &self.0
    }
    fn sign(&self, m: &[u8]) -> Result<Vec<u8>, ca::SignerError> {
        rcgen::SigningKey::sign(&self.1, m).map_err(|e| ca::SignerError(e.to_string()))
    }
    fn describe(&self) -> String {
        "memory:liar".into()
    }
}

#[test]
fn any_signer_can_hold_the_ca_key_and_a_lying_one_is_caught() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, k) = write_ca(tmp.path(), "hsm", |_| {});
    let pem_text = std::fs::read(&c).unwrap();
    let key = KeyPair::from_pem(&std::fs::read_to_string(&k).unwrap()).unwrap();
    let public = key.public_key_raw().to_vec();
    let ca = StationCa::from_signer(&pem_text, Box::new(InMemorySigner(key))).unwrap();
    assert_eq!(ca.signer_description(), "memory:test");
    let b = dice::issue_board(
        &ca,
        "SN-8",
        &rid("board-8"),
        &FWID.parse().unwrap(),
        &DiceOptions::default(),
    )
    .unwrap();
    x509::verify_signed_by(&b.device_id_cert_der, ca.cert_der()).unwrap();

    let liar = LyingSigner(public, KeyPair::generate().unwrap());
    let e = StationCa::from_signer(&pem_text, Box::new(liar)).unwrap_err();
    assert!(e.to_string().contains("does not verify"), "{e}");
}

// ---------------------------------------------------------------------------------------
// Command line

fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dps-station"))
        .args(args)
        .env_remove("DPS_STATION_CONFIG")
        .output()
        .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn cli_ca_init_and_dice_issue_write_verifiable_bundles_with_private_modes() {
    let tmp = tempfile::tempdir().unwrap();
    let cadir = tmp.path().join("ca");
    let out = cli(&["ca", "init", "--out", s(&cadir), "--cn", "Line A"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mode(&cadir), 0o700);
    assert_eq!(mode(&cadir.join("root.key")), 0o600);
    assert_eq!(mode(&cadir.join("intermediate.key")), 0o600);
    let root = x509::leaf_cert_info_pem(&std::fs::read(cadir.join("root.pem")).unwrap())
        .unwrap()
        .1;
    assert_eq!(root.common_name.as_deref(), Some("Line A Root CA"));

    // Never overwrite an existing CA.
    let again = cli(&["ca", "init", "--out", s(&cadir)]);
    assert_eq!(again.status.code(), Some(2));
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("already exists"), "{err}");

    let bundles = tmp.path().join("bundles");
    let ica = cadir.join("intermediate.pem");
    let ikey = cadir.join("intermediate.key");
    let out = cli(&[
        "dice",
        "issue",
        "--serial",
        "SN-0100",
        "--fwid",
        FWID,
        "--ca-cert",
        s(&ica),
        "--ca-key",
        s(&ikey),
        "--out",
        s(&bundles),
        "--json",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(m["registrationId"], "board-sn-0100");
    let dir = PathBuf::from(m["path"].as_str().unwrap());
    assert_eq!(mode(&dir.join("alias.key")), 0o600);
    assert_eq!(mode(&dir.join("uds.bin")), 0o600);
    let v = openssl_verify(
        &cadir.join("root.pem"),
        &[&ica, &dir.join("deviceid.pem")],
        &dir.join("alias.pem"),
        tmp.path(),
    );
    assert_verifies(&v);
    // stdout never carries the UDS.
    let uds = std::fs::read(dir.join("uds.bin")).unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&hex::encode(uds)));

    // Bad inputs: exit 2 with one error line naming the problem.
    let long = "a".repeat(65);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--serial", "SN-1", "--fwid", "sha256:12"], "--fwid"),
        (
            vec!["--serial", "SN-1", "--registration-id", "bad id"],
            "--registration-id",
        ),
        (
            vec!["--serial", "SN-1", "--registration-id", &long],
            "limit is 64",
        ),
        (vec!["--serial", "SN 1"], "serial"),
        (vec!["--serial", "SN-0100"], "already exists"),
    ];
    for (extra, expect) in cases {
        let mut args = vec![
            "dice",
            "issue",
            "--ca-cert",
            s(&ica),
            "--ca-key",
            s(&ikey),
            "--out",
            s(&bundles),
        ];
        args.extend(extra.iter().copied());
        let o = cli(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.starts_with("error: ") && err.contains(expect),
            "{args:?}: {err}"
        );
    }

    // A world-readable CA key: exit 2, the file and its mode named, a chmod hint.
    std::fs::set_permissions(&ikey, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = cli(&[
        "dice",
        "issue",
        "--serial",
        "SN-0101",
        "--ca-cert",
        s(&ica),
        "--ca-key",
        s(&ikey),
        "--out",
        s(&bundles),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains(s(&ikey)) && err.contains("0644") && err.contains("chmod 600"),
        "{err}"
    );
    assert!(!bundles.join("SN-0101").exists());
    std::fs::set_permissions(&ikey, std::fs::Permissions::from_mode(0o600)).unwrap();

    // --csr: a good CSR gives a DeviceID; a tampered one exits 2.
    let (_, csr) = board_csr("board-0102");
    let csr_path = tmp.path().join("board.csr");
    std::fs::write(
        &csr_path,
        pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", csr.clone())),
    )
    .unwrap();
    let o = cli(&[
        "dice",
        "issue",
        "--csr",
        s(&csr_path),
        "--serial",
        "SN-0102",
        "--ca-cert",
        s(&ica),
        "--ca-key",
        s(&ikey),
        "--out",
        s(&bundles),
    ]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(bundles.join("SN-0102").join("deviceid.pem").exists());
    let mut bad = csr;
    let n = bad.len();
    bad[n - 2] ^= 0x40;
    std::fs::write(&csr_path, &bad).unwrap();
    let o = cli(&[
        "dice",
        "issue",
        "--csr",
        s(&csr_path),
        "--serial",
        "SN-0103",
        "--ca-cert",
        s(&ica),
        "--ca-key",
        s(&ikey),
        "--out",
        s(&bundles),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("board.csr") && err.contains("signature does not verify"),
        "{err}"
    );

    // No CA given.
    let o = cli(&["dice", "issue", "--serial", "SN-0104", "--out", s(&bundles)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--ca-cert"));
}

// ---------------------------------------------------------------------------------------
// Round trip through the DPS emulator with the DPS command line

fn find_str<'a>(v: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    match v {
        serde_json::Value::Object(m) => m
            .get(key)
            .and_then(|x| x.as_str())
            .or_else(|| m.values().find_map(|x| find_str(x, key))),
        serde_json::Value::Array(a) => a.iter().find_map(|x| find_str(x, key)),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alias_certificate_enrolls_individually_and_the_ca_as_a_group_in_the_emulator() {
    let emu = dps_station::emulator::start(dps_station::emulator::EmulatorOptions::default())
        .await
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cs = tmp.path().join("cs");
    std::fs::write(&cs, format!("{}\n", emu.connection_string())).unwrap();
    let paths = dev_ca(tmp.path());
    let ca = load(&paths);
    let fwid: Fwid = FWID.parse().unwrap();
    let bundle = dice::issue_board(
        &ca,
        "SN-0200",
        &rid("board-sn-0200"),
        &fwid,
        &DiceOptions::default(),
    )
    .unwrap();
    let dir = bundle.write_to(&tmp.path().join("out")).unwrap();
    let alias = dir.join("alias.pem");
    let csf = cs.clone();
    let run = move |args: Vec<String>| {
        let csf = csf.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let mut a: Vec<String> = args;
                a.push("--connection-string-file".into());
                a.push(csf.to_str().unwrap().into());
                a.push("--json".into());
                let refs: Vec<&str> = a.iter().map(String::as_str).collect();
                cli(&refs)
            })
            .await
            .unwrap()
        }
    };
    let strs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    // A registration id that is not the CN is refused before anything is sent.
    let before = emu.stats().requests;
    let o = run(strs(&[
        "enrollment",
        "create",
        "--registration-id",
        "other-board",
        "--x509-cert",
        alias.to_str().unwrap(),
    ]))
    .await;
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(emu.stats().requests, before);

    // The Alias certificate enrolls; the service answers with its certificate info.
    let o = run(strs(&[
        "enrollment",
        "create",
        "--registration-id",
        "board-sn-0200",
        "--x509-cert",
        alias.to_str().unwrap(),
    ]))
    .await;
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = run(strs(&["enrollment", "get", "board-sn-0200"])).await;
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let info = x509::leaf_cert_info(&bundle.alias_cert_der).unwrap();
    assert_eq!(got["registrationId"], "board-sn-0200");
    assert_eq!(got["attestation"]["type"], "x509");
    let thumb = find_str(&got, "sha256Thumbprint").expect("certificate info in the enrollment");
    assert!(thumb.eq_ignore_ascii_case(&info.sha256_hex), "{thumb}");
    let subject = find_str(&got, "subjectName").unwrap();
    assert!(subject.contains("CN=board-sn-0200"), "{subject}");
    assert!(find_str(&got, "issuerName").unwrap().contains("DeviceID"));
    assert_eq!(emu.stats().creates.get("board-sn-0200").copied(), Some(1));

    // The station's intermediate backs an enrollment group.
    let o = run(strs(&[
        "group",
        "create",
        "--group-id",
        "line-a-dice",
        "--x509-ca-cert",
        paths.intermediate_cert.to_str().unwrap(),
    ]))
    .await;
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = run(strs(&["group", "get", "line-a-dice"])).await;
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let g: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(g["enrollmentGroupId"], "line-a-dice");
    let subject = find_str(&g, "subjectName").unwrap();
    assert!(subject.contains("test line Intermediate CA"), "{subject}");
    let ca_info = x509::leaf_cert_info(ca.cert_der()).unwrap();
    assert!(find_str(&g, "sha256Thumbprint")
        .unwrap()
        .eq_ignore_ascii_case(&ca_info.sha256_hex));
    emu.shutdown().await;
}

#[test]
fn cli_dice_issue_takes_the_ca_fwid_out_dir_and_id_template_from_the_config() {
    let tmp = tempfile::tempdir().unwrap();
    let paths = dev_ca(tmp.path());
    let out = tmp.path().join("dice-out");
    let fwid = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    let cfg = tmp.path().join("station.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[dps]
connection_string_file = "{cs}"

[[slot]]
name = "fixture-2"
attestation = "dice"
registration_id = "line-a-{{serial}}"

[dice]
ca_cert = "{cert}"
ca_key = "{key}"
fwid = "{fwid}"
validity_days = 10
out_dir = "{out}"
"#,
            cs = s(&tmp.path().join("cs")),
            cert = s(&paths.intermediate_cert),
            key = s(&paths.intermediate_key),
            out = s(&out),
        ),
    )
    .unwrap();
    let o = cli(&[
        "dice",
        "issue",
        "--serial",
        "SN-0300",
        "--config",
        s(&cfg),
        "--json",
    ]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let m: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(m["registrationId"], "line-a-sn-0300");
    assert_eq!(m["fwid"], fwid);
    let dir = out.join("SN-0300");
    let info = x509::leaf_cert_info_pem(&std::fs::read(dir.join("alias.pem")).unwrap())
        .unwrap()
        .1;
    assert_eq!(info.common_name.as_deref(), Some("line-a-sn-0300"));
    let days = (info.not_after - info.not_before).whole_days();
    assert!((9..=11).contains(&days), "{days}");
    // Flags still win over the config.
    let o = cli(&[
        "dice",
        "issue",
        "--serial",
        "SN-0301",
        "--config",
        s(&cfg),
        "--registration-id",
        "custom-0301",
        "--out",
        s(&tmp.path().join("elsewhere")),
    ]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(tmp.path().join("elsewhere/SN-0301/alias.pem").exists());
}
