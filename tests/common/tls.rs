//! Test PKI for TLS tests: a throw-away root CA and a server certificate for one host name,
//! made with rcgen (P-256, ring), plus small helpers for device and CA certificates used by
//! X.509 enrollment tests. Test-only: never use these keys or this CA outside a test.
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A test CA and one server certificate, written as PEM files into a directory.
pub struct TestPki {
    /// Root CA certificate (PEM): give it to the client as `--ca-file`.
    pub ca_pem: String,
    /// Server certificate (PEM) for the host name, signed by the CA.
    pub cert_pem: String,
    /// Server private key (PKCS#8 PEM).
    pub key_pem: String,
    /// `<dir>/ca.pem`
    pub ca_file: PathBuf,
    /// `<dir>/server.pem`
    pub cert_file: PathBuf,
    /// `<dir>/server.key` (mode 0600)
    pub key_file: PathBuf,
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

/// Make a root CA and a server certificate whose SANs are `host`, `localhost` and
/// `127.0.0.1`, and write `ca.pem`, `server.pem`, `server.key` into `dir`.
pub fn server_pki(dir: &Path, host: &str) -> TestPki {
    let ca_key = KeyPair::generate().expect("ca key");
    let ca = CertifiedIssuer::self_signed(ca_params("dps-station test root CA"), ca_key)
        .expect("self-sign ca");

    let sans = vec![
        host.to_string(),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
    ];
    let mut p = CertificateParams::new(sans).expect("server params");
    p.distinguished_name.push(DnType::CommonName, host);
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().expect("server key");
    let cert = p.signed_by(&key, &ca).expect("sign server cert");

    let pki = TestPki {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        ca_file: dir.join("ca.pem"),
        cert_file: dir.join("server.pem"),
        key_file: dir.join("server.key"),
    };
    std::fs::write(&pki.ca_file, &pki.ca_pem).expect("write ca.pem");
    std::fs::write(&pki.cert_file, &pki.cert_pem).expect("write server.pem");
    write_private(&pki.key_file, &pki.key_pem);
    pki
}

/// A self-signed end-entity (device) certificate with subject CN `cn` (PEM). For X.509
/// individual enrollments, where the CN must equal the registration id.
pub fn device_cert_pem(cn: &str) -> String {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("device params");
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::ExplicitNoCa;
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().expect("device key");
    p.self_signed(&key).expect("self-sign device cert").pem()
}

/// A self-signed CA certificate with subject CN `cn` (PEM). For X.509 enrollment groups.
pub fn ca_cert_pem(cn: &str) -> String {
    let key = KeyPair::generate().expect("ca key");
    ca_params(cn).self_signed(&key).expect("self-sign ca").pem()
}

/// Write `text` to `path` with mode 0600 (private keys).
pub fn write_private(path: &Path, text: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .expect("open key file");
    f.write_all(text.as_bytes()).expect("write key file");
}
