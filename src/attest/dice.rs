//! DICE-style board identities: derive a board's DeviceID and Alias keys from a per-board
//! secret (UDS) and the firmware measurement (FWID), and certify them with the station CA.
//!
//! This module must never log, print or put into an error the UDS, the CDI or a private key;
//! they live in [`Secret`]/`Zeroizing` buffers and leave the process only through
//! [`BoardBundle::write_to`], into files of mode 0600.
//!
//! # Derivation scheme `dps-station-dice-v1` (frozen by test vectors)
//!
//! Inputs: `UDS`, 32 bytes from the OS RNG per board; `FWID`, the 32-byte SHA-256
//! measurement of the board firmware (`--fwid sha256:HEX`). All HMACs are HMAC-SHA256.
//!
//! ```text
//! CDI       = HMAC(key = UDS, msg = SHA-256(FWID))                      (DESIGN §6)
//! DeviceID  = Scalar(CDI, "dps-station DICE v1 DeviceID", "")
//! Alias     = Scalar(CDI, "dps-station DICE v1 Alias",    FWID)
//! Scalar(K, label, context):
//!     for i = 1, 2, …, 255:
//!         c = HMAC(key = K, msg = label ‖ 0x00 ‖ context ‖ i)            (i: one byte)
//!         if 0 < c < n (big-endian, n = the P-256 group order): return c
//! ```
//! This is a one-block HKDF-Expand / SP 800-108 counter construction with the extract step
//! skipped (the CDI is already a uniform HMAC output, as open-dice's specification allows),
//! followed by rejection sampling into the P-256 order (reference/dice-x509.md §4.4 option b;
//! a retry happens with probability about 2^-32). Because the CDI measures the firmware, both
//! keys change when the FWID changes; the Alias additionally binds the FWID in its context.
//!
//! # Certificates
//!
//! station CA → DeviceID (CA:TRUE pathLen 0, keyUsage keyCertSign + cRLSign, no EKU,
//! SKI/AKI, CN "DeviceID <first 8 bytes of SHA-256(public key), hex>") → Alias (CA:FALSE,
//! keyUsage digitalSignature, EKU clientAuth, SKI/AKI, CN = registration id, TCG DiceTcbInfo
//! 2.23.133.5.4.1 with the SHA-256 FWID, non-critical unless configured critical). Serial
//! numbers are 16 random positive bytes. Validity starts 5 minutes back (clock skew) and
//! lasts `validity_days`, but never past the station CA's own notAfter. ECDSA P-256/SHA-256.
//!
//! # The board bundle (`BoardBundle::write_to`)
//!
//! One directory per board, `<out>/<serial>/`, mode 0700, written under a temporary name and
//! renamed into place (an existing bundle is never overwritten):
//!
//! | file | mode | holds |
//! |---|---|---|
//! | `chain.pem` | 0644 | Alias, DeviceID and station CA certificates (TLS client chain) |
//! | `alias.pem`, `deviceid.pem`, `ca.pem` | 0644 | the same certificates one per file |
//! | `alias.key` | 0600 | the Alias private key, PKCS#8 PEM |
//! | `uds.bin` | 0600 | the 32-byte UDS to inject into the board's DICE engine |
//! | `manifest.json` | 0644 | serial, registration id, FWID, thumbprints, serials, validity, scheme, and `deleteAfterInjection` |
//!
//! **After injection, delete `uds.bin` and `alias.key`** (listed in the manifest's
//! `deleteAfterInjection`): the station must not keep a board's UDS (open-dice "pre-generation"
//! rule), and the Alias key is derivable from it. Certificates and the manifest may be kept for
//! traceability.
//!
//! `dice issue --csr` is the production path for boards whose DICE hardware derives its own
//! DeviceID key: [`sign_device_id_csr`] checks the PKCS#10 signature and certifies the
//! requested key as the DeviceID (the board then issues its own Alias certificate).
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use hmac::{Hmac, Mac};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, CertifiedIssuer,
    CustomExtension, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose,
};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};
use zeroize::Zeroizing;

use super::ca::{self, CaError, StationCa};
use super::fixed_base;
use super::tcbinfo::{TcbFwid, TcbInfo, TCG_DICE_TCB_INFO_OID};
use super::x509::{self, rfc3339};
use crate::dps::ids::{IdError, RegistrationId};
use crate::secret::Secret;

/// Name of the derivation scheme, recorded in every manifest.
pub const SCHEME: &str = "dps-station-dice-v1";
const LABEL_DEVICE_ID: &[u8] = b"dps-station DICE v1 DeviceID";
const LABEL_ALIAS: &[u8] = b"dps-station DICE v1 Alias";
/// Bundle format tag in `manifest.json`.
pub const BUNDLE_FORMAT: &str = "dps-station-dice-bundle/1";

/// A SHA-256 firmware measurement, written `sha256:<64 hex digits>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fwid(pub [u8; 32]);

impl Fwid {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for Fwid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Fwid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why an FWID string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("fwid {input:?}: {why} (expected sha256:<64 hex digits>)")]
pub struct FwidError {
    pub input: String,
    pub why: &'static str,
}

impl FromStr for Fwid {
    type Err = FwidError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| FwidError {
            input: s.chars().take(80).collect(),
            why,
        };
        let (alg, hexpart) = s
            .split_once(':')
            .ok_or_else(|| err("missing \"sha256:\""))?;
        if !alg.eq_ignore_ascii_case("sha256") {
            return Err(err("only sha256 is supported"));
        }
        if hexpart.len() != 64 {
            return Err(err("the digest must be 64 hex digits"));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(hexpart, &mut out).map_err(|_| err("not hexadecimal"))?;
        Ok(Fwid(out))
    }
}

/// Issuance options (from `[dice]` in the config or command-line flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiceOptions {
    /// Validity of DeviceID and Alias certificates, in days (clamped to the CA's notAfter).
    pub validity_days: u32,
    /// Mark the TcbInfo extension critical (default false: webpki and others reject unknown
    /// critical extensions).
    pub tcb_info_critical: bool,
}

impl Default for DiceOptions {
    fn default() -> Self {
        DiceOptions {
            validity_days: 3650,
            tcb_info_critical: false,
        }
    }
}

/// Errors from derivation, issuance and bundle writing. `reason()` gives the §5 token.
#[derive(Debug, thiserror::Error)]
pub enum DiceError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("{0}")]
    RegistrationId(#[from] IdError),
    #[error("registration id {0:?} must be lower case (it is the Alias certificate CN)")]
    NotLowerCase(String),
    #[error("serial {serial:?}: {why}")]
    BadSerial { serial: String, why: &'static str },
    #[error("validity_days must be at least 1")]
    BadValidity,
    #[error("OS random number generator failed: {0}")]
    Rng(String),
    #[error("key derivation failed: {0}")]
    Derivation(&'static str),
    #[error("issuing the {which} certificate: {detail}")]
    Issue { which: &'static str, detail: String },
    #[error("CSR {path}: {detail}")]
    BadCsr { path: String, detail: String },
    #[error("bundle {0} already exists; refusing to overwrite it")]
    BundleExists(PathBuf),
    #[error("writing bundle {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl DiceError {
    /// The §5 reply token for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            DiceError::Ca(_) | DiceError::Issue { .. } => "ca-error",
            DiceError::RegistrationId(_) | DiceError::NotLowerCase(_) => "bad-registration-id",
            DiceError::BadSerial { .. } => "bad-format",
            DiceError::BadValidity => "config-error",
            DiceError::Rng(_) | DiceError::Derivation(_) => "dice-error",
            DiceError::BadCsr { .. } => "bad-csr",
            DiceError::BundleExists(_) | DiceError::Io { .. } => "store-error",
        }
    }
}

// ---------------------------------------------------------------------------------------
// Derivation

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> Result<Zeroizing<[u8; 32]>, DiceError> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .map_err(|_| DiceError::Derivation("HMAC key rejected"))?;
    for p in parts {
        mac.update(p);
    }
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(&mac.finalize().into_bytes());
    Ok(out)
}

fn derive_scalar(key: &[u8], label: &[u8], context: &[u8]) -> Result<p256::SecretKey, DiceError> {
    for i in 1u8..=255 {
        let c = hmac_sha256(key, &[label, &[0u8], context, &[i]])?;
        if let Ok(sk) = p256::SecretKey::from_bytes(&(*c).into()) {
            return Ok(sk);
        }
    }
    Err(DiceError::Derivation("no P-256 scalar in 255 candidates"))
}

/// The CDI of scheme v1: HMAC-SHA256(UDS, SHA-256(FWID)).
pub fn derive_cdi(uds: &[u8; 32], fwid: &Fwid) -> Result<Zeroizing<[u8; 32]>, DiceError> {
    let measurement = Sha256::digest(fwid.as_bytes());
    hmac_sha256(uds, &[&measurement])
}

/// A board's derived key pair set.
pub struct DiceKeys {
    pub device_id: p256::SecretKey,
    pub alias: p256::SecretKey,
}

impl fmt::Debug for DiceKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiceKeys")
            .field("device_id_public", &hex::encode(self.device_id_public()))
            .field("alias_public", &hex::encode(self.alias_public()))
            .finish()
    }
}

impl DiceKeys {
    /// DeviceID public key, uncompressed SEC1 (65 bytes).
    pub fn device_id_public(&self) -> Vec<u8> {
        fixed_base::public_key_uncompressed(&self.device_id).to_vec()
    }
    /// Alias public key, uncompressed SEC1 (65 bytes).
    pub fn alias_public(&self) -> Vec<u8> {
        fixed_base::public_key_uncompressed(&self.alias).to_vec()
    }
}

/// Derive the DeviceID and Alias keys from a UDS and FWID (scheme v1, see module docs).
pub fn derive_keys(uds: &[u8; 32], fwid: &Fwid) -> Result<DiceKeys, DiceError> {
    let cdi = derive_cdi(uds, fwid)?;
    Ok(DiceKeys {
        device_id: derive_scalar(&*cdi, LABEL_DEVICE_ID, &[])?,
        alias: derive_scalar(&*cdi, LABEL_ALIAS, fwid.as_bytes())?,
    })
}

/// PKCS#8 v1 DER of a P-256 key (RFC 5208 + RFC 5915, the layout ring and OpenSSL write):
/// `SEQUENCE { 0, {ecPublicKey, prime256v1}, OCTET STRING { ECPrivateKey { 1, d, [1] pub } } }`.
pub fn pkcs8_p256(secret: &p256::SecretKey, public: &[u8; 65]) -> Zeroizing<Vec<u8>> {
    const HEAD: [u8; 36] = [
        0x30, 0x81, 0x87, 0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d,
        0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x04, 0x6d, 0x30,
        0x6b, 0x02, 0x01, 0x01, 0x04, 0x20,
    ];
    const MID: [u8; 5] = [0xa1, 0x44, 0x03, 0x42, 0x00];
    let mut out = Zeroizing::new(Vec::with_capacity(138));
    out.extend_from_slice(&HEAD);
    let mut d: [u8; 32] = secret.to_bytes().into();
    out.extend_from_slice(&d);
    zeroize::Zeroize::zeroize(&mut d);
    out.extend_from_slice(&MID);
    out.extend_from_slice(public);
    out
}

/// PEM text (LF line endings) of a DER document, e.g. `PRIVATE KEY`.
pub(crate) fn pem_lf(tag: &str, der: &[u8]) -> Zeroizing<String> {
    let p = pem::Pem::new(tag, der.to_vec());
    let text = pem::encode_config(
        &p,
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    );
    let mut contents = p.into_contents();
    zeroize::Zeroize::zeroize(&mut contents);
    Zeroizing::new(text)
}

/// 32 fresh bytes from the OS RNG.
pub fn random_uds() -> Result<Zeroizing<[u8; 32]>, DiceError> {
    let mut uds = Zeroizing::new([0u8; 32]);
    rand::RngCore::try_fill_bytes(&mut rand::rngs::OsRng, &mut *uds)
        .map_err(|e| DiceError::Rng(e.to_string()))?;
    Ok(uds)
}

// ---------------------------------------------------------------------------------------
// Issuance

/// A P-256 public key (SEC1 point) for rcgen.
struct P256Public(Vec<u8>);

impl rcgen::PublicKeyData for P256Public {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// Board serials use the registration-id alphabet: 1–64 of `[A-Za-z0-9-._:]`, starting and
/// ending with a letter or digit (so they are safe as a directory name).
pub fn validate_serial(serial: &str) -> Result<(), DiceError> {
    let bad = |why| DiceError::BadSerial {
        serial: serial.chars().take(80).collect(),
        why,
    };
    if serial.is_empty() || serial.len() > 64 {
        return Err(bad("must be 1-64 characters"));
    }
    if !serial
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':'))
    {
        return Err(bad("only A-Z a-z 0-9 - . _ : are allowed"));
    }
    let ends_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !ends_ok(serial.chars().next()) || !ends_ok(serial.chars().last()) {
        return Err(bad("must start and end with a letter or digit"));
    }
    Ok(())
}

/// Check that `id` can be an Alias CN: a valid X.509 registration id (≤ 64) in lower case.
pub fn check_alias_registration_id(id: &RegistrationId) -> Result<(), DiceError> {
    RegistrationId::parse_x509(id.as_str())?;
    if id.as_str().chars().any(|c| c.is_ascii_uppercase()) {
        return Err(DiceError::NotLowerCase(id.as_str().to_string()));
    }
    Ok(())
}

fn validity(
    ca: &StationCa,
    opts: &DiceOptions,
) -> Result<(OffsetDateTime, OffsetDateTime), DiceError> {
    if opts.validity_days == 0 {
        return Err(DiceError::BadValidity);
    }
    let now = OffsetDateTime::now_utc();
    let not_before = now - Duration::minutes(5);
    let not_after = (now + Duration::days(i64::from(opts.validity_days))).min(ca.not_after());
    Ok((not_before, not_after))
}

fn device_id_params(
    public_key: &[u8],
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, DiceError> {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    let kid = Sha256::digest(public_key);
    p.distinguished_name.push(
        DnType::CommonName,
        format!("DeviceID {}", hex::encode(&kid[..8])),
    );
    device_id_profile(&mut p, not_before, not_after)?;
    Ok(p)
}

/// The DeviceID profile on top of a subject: CA pathLen 0, KU keyCertSign+cRLSign, no EKU.
fn device_id_profile(
    p: &mut CertificateParams,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<(), DiceError> {
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.extended_key_usages = Vec::new();
    p.subject_alt_names = Vec::new();
    p.name_constraints = None;
    p.crl_distribution_points = Vec::new();
    p.custom_extensions = Vec::new();
    p.use_authority_key_identifier_extension = true;
    p.key_identifier_method = rcgen::KeyIdMethod::Sha256;
    p.serial_number = Some(ca::random_serial().map_err(DiceError::Rng)?);
    p.not_before = not_before;
    p.not_after = not_after;
    Ok(())
}

/// Everything issued for one board. Secrets redact themselves in `Debug`.
#[derive(Debug)]
pub struct BoardBundle {
    pub serial: String,
    pub registration_id: RegistrationId,
    pub fwid: Fwid,
    pub alias_cert_der: Vec<u8>,
    pub alias_cert_pem: String,
    /// Lower-case hex SHA-256 of the Alias certificate DER (the `cert_sha256` column).
    pub alias_cert_sha256_hex: String,
    pub device_id_cert_der: Vec<u8>,
    pub device_id_cert_pem: String,
    /// Alias, DeviceID and station CA certificates, PEM, in that order.
    pub chain_pem: String,
    /// Subject DN of the station CA that signed the DeviceID.
    pub ca_subject: String,
    pub ca_cert_pem: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// Uncompressed SEC1 public keys.
    pub device_id_public_key: Vec<u8>,
    pub alias_public_key: Vec<u8>,
    /// The Alias private key, PKCS#8 DER.
    pub alias_key_pkcs8: Secret<Vec<u8>>,
    /// The board's UDS (32 bytes). Must be deleted after injection.
    pub uds: Secret<Vec<u8>>,
}

/// Issue one board's DICE identity with a fresh random UDS from the OS RNG.
pub fn issue_board(
    ca: &StationCa,
    serial: &str,
    registration_id: &RegistrationId,
    fwid: &Fwid,
    opts: &DiceOptions,
) -> Result<BoardBundle, DiceError> {
    let uds = random_uds()?;
    issue_board_with_uds(ca, serial, registration_id, fwid, opts, &uds)
}

/// Issue one board's DICE identity from a given UDS (tests and re-issue; production uses
/// [`issue_board`]).
pub fn issue_board_with_uds(
    ca: &StationCa,
    serial: &str,
    registration_id: &RegistrationId,
    fwid: &Fwid,
    opts: &DiceOptions,
    uds: &[u8; 32],
) -> Result<BoardBundle, DiceError> {
    validate_serial(serial)?;
    check_alias_registration_id(registration_id)?;
    let (not_before, not_after) = validity(ca, opts)?;
    let keys = derive_keys(uds, fwid)?;
    let issue = |which| {
        move |e: rcgen::Error| DiceError::Issue {
            which,
            detail: e.to_string(),
        }
    };

    // DeviceID: signed by the station CA. ring re-derives the public key from the scalar
    // when it loads the PKCS#8 and refuses a mismatch, which cross-checks the fixed-base table.
    let devid_pub = fixed_base::public_key_uncompressed(&keys.device_id);
    let devid_pkcs8 = pkcs8_p256(&keys.device_id, &devid_pub);
    let devid_kp =
        rcgen::KeyPair::try_from(devid_pkcs8.as_slice()).map_err(|e| DiceError::Issue {
            which: "DeviceID",
            detail: format!("key rejected: {e}"),
        })?;
    let device_id_public_key = devid_pub.to_vec();
    let devid_params = device_id_params(&device_id_public_key, not_before, not_after)?;
    let devid = CertifiedIssuer::signed_by(devid_params, devid_kp, &ca.issuer)
        .map_err(issue("DeviceID"))?;

    // Alias: signed by the DeviceID key.
    let alias_pub = fixed_base::public_key_uncompressed(&keys.alias);
    let alias_pkcs8 = pkcs8_p256(&keys.alias, &alias_pub);
    let alias_public_key = alias_pub.to_vec();
    let mut ap = CertificateParams::default();
    ap.distinguished_name = DistinguishedName::new();
    ap.distinguished_name
        .push(DnType::CommonName, registration_id.as_str());
    ap.is_ca = IsCa::ExplicitNoCa;
    ap.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    ap.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    ap.use_authority_key_identifier_extension = true;
    ap.serial_number = Some(ca::random_serial().map_err(DiceError::Rng)?);
    ap.not_before = not_before;
    ap.not_after = not_after;
    let tcb = TcbInfo {
        fwids: vec![TcbFwid::sha256(fwid.0)],
        ..TcbInfo::default()
    };
    let mut ext = CustomExtension::from_oid_content(TCG_DICE_TCB_INFO_OID, tcb.to_der());
    ext.set_criticality(opts.tcb_info_critical);
    ap.custom_extensions = vec![ext];
    let alias = ap
        .signed_by(&P256Public(alias_public_key.clone()), &devid)
        .map_err(issue("Alias"))?;

    let alias_cert_pem = alias.pem();
    let device_id_cert_pem = devid.pem();
    let chain_pem = format!("{alias_cert_pem}{device_id_cert_pem}{}", ca.cert_pem());
    let alias_cert_der = alias.der().to_vec();
    Ok(BoardBundle {
        serial: serial.to_string(),
        registration_id: registration_id.clone(),
        fwid: *fwid,
        alias_cert_sha256_hex: hex::encode(Sha256::digest(&alias_cert_der)),
        alias_cert_der,
        alias_cert_pem,
        device_id_cert_der: devid.der().to_vec(),
        device_id_cert_pem,
        chain_pem,
        ca_subject: ca.subject().to_string(),
        ca_cert_pem: ca.cert_pem().to_string(),
        not_before: strip_nanos(not_before),
        not_after: strip_nanos(not_after),
        device_id_public_key,
        alias_public_key,
        alias_key_pkcs8: Secret::new(alias_pkcs8.to_vec()),
        uds: Secret::new(uds.to_vec()),
    })
}

fn strip_nanos(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_nanosecond(0).unwrap_or(t)
}

impl BoardBundle {
    /// The Alias certificate as the enrollment wants it: base64 of the DER, one line.
    pub fn enrollment_certificate_b64(&self) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(&self.alias_cert_der)
    }

    /// The manifest written as `manifest.json` (no secrets).
    pub fn manifest(&self) -> serde_json::Value {
        let info = |der: &[u8]| {
            x509::leaf_cert_info(der).ok().map(|i| {
                serde_json::json!({
                    "subject": i.subject,
                    "issuer": i.issuer,
                    "serialNumber": i.serial_hex,
                    "sha256Thumbprint": i.sha256_hex,
                    "sha1Thumbprint": i.sha1_hex,
                    "notBeforeUtc": rfc3339(i.not_before),
                    "notAfterUtc": rfc3339(i.not_after),
                })
            })
        };
        serde_json::json!({
            "format": BUNDLE_FORMAT,
            "scheme": SCHEME,
            "serial": self.serial,
            "registrationId": self.registration_id.as_str(),
            "fwid": self.fwid.to_string(),
            "alias": info(&self.alias_cert_der),
            "deviceId": info(&self.device_id_cert_der),
            "ca": { "subject": self.ca_subject },
            "aliasPublicKey": hex::encode(&self.alias_public_key),
            "deviceIdPublicKey": hex::encode(&self.device_id_public_key),
            "files": {
                "chain": "chain.pem",
                "alias": "alias.pem",
                "deviceId": "deviceid.pem",
                "ca": "ca.pem",
                "aliasKey": "alias.key",
                "uds": "uds.bin",
            },
            "deleteAfterInjection": ["uds.bin", "alias.key"],
        })
    }

    /// Write the bundle to `<dir>/<serial>/` (see the module docs) and return that path.
    /// `dir` is created 0700 if missing; an existing bundle for this serial is an error.
    pub fn write_to(&self, dir: &Path) -> Result<PathBuf, DiceError> {
        let alias_key_pem = pem_lf("PRIVATE KEY", self.alias_key_pkcs8.expose());
        let manifest = serde_json::to_vec_pretty(&self.manifest())
            .map_err(|_| DiceError::Derivation("manifest serialisation failed"))?;
        let files: Vec<(&str, &[u8], u32)> = vec![
            ("chain.pem", self.chain_pem.as_bytes(), 0o644),
            ("alias.pem", self.alias_cert_pem.as_bytes(), 0o644),
            ("deviceid.pem", self.device_id_cert_pem.as_bytes(), 0o644),
            ("ca.pem", self.ca_cert_pem.as_bytes(), 0o644),
            ("alias.key", alias_key_pem.as_bytes(), 0o600),
            ("uds.bin", self.uds.expose(), 0o600),
            ("manifest.json", &manifest, 0o644),
        ];
        write_bundle_dir(dir, &self.serial, &files)
    }
}

/// Write `files` into `<dir>/<name>/` atomically (temp dir + rename); never overwrite.
fn write_bundle_dir(
    dir: &Path,
    name: &str,
    files: &[(&str, &[u8], u32)],
) -> Result<PathBuf, DiceError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DiceError::Io { path, source }
    };
    ca::ensure_private_dir(dir).map_err(io(dir))?;
    let target = dir.join(name);
    if target.exists() {
        return Err(DiceError::BundleExists(target));
    }
    let nonce = OffsetDateTime::now_utc().unix_timestamp_nanos();
    let tmp = dir.join(format!(".{name}.partial-{}-{nonce}", std::process::id()));
    let result = (|| {
        std::os::unix::fs::DirBuilderExt::mode(&mut fs::DirBuilder::new(), 0o700)
            .create(&tmp)
            .map_err(io(&tmp))?;
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(io(&tmp))?;
        let mut written = Vec::with_capacity(files.len());
        for (file, bytes, mode) in files {
            let p = tmp.join(file);
            let f = ca::write_new_file_unsynced(&p, bytes, *mode).map_err(io(&p))?;
            written.push((p, f));
        }
        // Every file is durable before the directory gets its final name.
        for (p, f) in &written {
            f.sync_all().map_err(io(p))?;
        }
        fs::File::open(&tmp)
            .and_then(|d| d.sync_all())
            .map_err(io(&tmp))?;
        if target.exists() {
            return Err(DiceError::BundleExists(target.clone()));
        }
        fs::rename(&tmp, &target).map_err(io(&target))?;
        // Make the rename durable before anyone records the board as issued.
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
        Ok(target.clone())
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

// ---------------------------------------------------------------------------------------
// CSR path

/// A DeviceID certificate issued for a board-made CSR.
#[derive(Debug, Clone)]
pub struct CsrDeviceId {
    pub serial: String,
    pub device_id_cert_der: Vec<u8>,
    pub device_id_cert_pem: String,
    /// DeviceID and station CA certificates, PEM.
    pub chain_pem: String,
    pub ca_cert_pem: String,
    pub sha256_hex: String,
    pub subject: String,
}

/// Read a CSR file's bytes as DER (PEM `CERTIFICATE REQUEST` or raw DER).
pub fn csr_der_from_bytes(bytes: &[u8], path: &str) -> Result<Vec<u8>, DiceError> {
    let bad = |detail: String| DiceError::BadCsr {
        path: path.to_string(),
        detail,
    };
    if bytes.starts_with(b"-----") || bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        let p = pem::parse(bytes).map_err(|e| bad(format!("bad PEM: {e}")))?;
        if p.tag() != "CERTIFICATE REQUEST" && p.tag() != "NEW CERTIFICATE REQUEST" {
            return Err(bad(format!(
                "PEM block is {:?}, expected CERTIFICATE REQUEST",
                p.tag()
            )));
        }
        Ok(p.into_contents())
    } else {
        Ok(bytes.to_vec())
    }
}

/// Certify a board-made PKCS#10 CSR as the board's DeviceID (CA, pathLen 0). The CSR's
/// signature is verified first; only its subject and P-256 public key are used (requested
/// extensions are replaced by the DeviceID profile). `csr_name` names the CSR in errors.
pub fn sign_device_id_csr(
    ca: &StationCa,
    serial: &str,
    csr_der: &[u8],
    csr_name: &str,
    opts: &DiceOptions,
) -> Result<CsrDeviceId, DiceError> {
    use x509_parser::prelude::FromDer;
    validate_serial(serial)?;
    let bad = |detail: String| DiceError::BadCsr {
        path: csr_name.to_string(),
        detail,
    };
    let (rest, req) =
        x509_parser::certification_request::X509CertificationRequest::from_der(csr_der)
            .map_err(|e| bad(format!("not a DER PKCS#10 request: {e}")))?;
    if !rest.is_empty() {
        return Err(bad("trailing bytes after the request".into()));
    }
    req.verify_signature().map_err(|e| {
        bad(format!(
            "signature does not verify ({e}); the CSR is corrupt or forged"
        ))
    })?;
    let parsed = CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())
        .map_err(|e| bad(format!("unsupported request: {e}")))?;
    if parsed.public_key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
        return Err(bad("the requested key is not ECDSA P-256".into()));
    }
    let (not_before, not_after) = validity(ca, opts)?;
    let mut params = parsed.params.clone();
    if params.distinguished_name.iter().next().is_none() {
        let kid = Sha256::digest(rcgen::PublicKeyData::der_bytes(&parsed.public_key));
        params.distinguished_name.push(
            DnType::CommonName,
            format!("DeviceID {}", hex::encode(&kid[..8])),
        );
    }
    device_id_profile(&mut params, not_before, not_after)?;
    let parsed = CertificateSigningRequestParams {
        params,
        public_key: parsed.public_key,
    };
    let cert = parsed.signed_by(&ca.issuer).map_err(|e| DiceError::Issue {
        which: "DeviceID",
        detail: e.to_string(),
    })?;
    let der = cert.der().to_vec();
    let subject = x509::leaf_cert_info(&der)
        .map(|i| i.subject)
        .unwrap_or_default();
    let pem_text = cert.pem();
    Ok(CsrDeviceId {
        serial: serial.to_string(),
        sha256_hex: hex::encode(Sha256::digest(&der)),
        chain_pem: format!("{pem_text}{}", ca.cert_pem()),
        ca_cert_pem: ca.cert_pem().to_string(),
        device_id_cert_der: der,
        device_id_cert_pem: pem_text,
        subject,
    })
}

impl CsrDeviceId {
    /// Write `<dir>/<serial>/` with deviceid.pem, chain.pem, ca.pem and manifest.json.
    pub fn write_to(&self, dir: &Path) -> Result<PathBuf, DiceError> {
        let info = x509::leaf_cert_info(&self.device_id_cert_der).ok();
        let manifest = serde_json::json!({
            "format": BUNDLE_FORMAT,
            "serial": self.serial,
            "source": "csr",
            "deviceId": info.map(|i| serde_json::json!({
                "subject": i.subject,
                "issuer": i.issuer,
                "serialNumber": i.serial_hex,
                "sha256Thumbprint": i.sha256_hex,
                "sha1Thumbprint": i.sha1_hex,
                "notBeforeUtc": rfc3339(i.not_before),
                "notAfterUtc": rfc3339(i.not_after),
            })),
            "files": { "deviceId": "deviceid.pem", "chain": "chain.pem", "ca": "ca.pem" },
            "deleteAfterInjection": [],
        });
        let manifest = serde_json::to_vec_pretty(&manifest)
            .map_err(|_| DiceError::Derivation("manifest serialisation failed"))?;
        let files: Vec<(&str, &[u8], u32)> = vec![
            ("deviceid.pem", self.device_id_cert_pem.as_bytes(), 0o644),
            ("chain.pem", self.chain_pem.as_bytes(), 0o644),
            ("ca.pem", self.ca_cert_pem.as_bytes(), 0o644),
            ("manifest.json", &manifest, 0o644),
        ];
        write_bundle_dir(dir, &self.serial, &files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fwid_parses_and_prints_canonically() {
        let f: Fwid = "SHA256:00112233445566778899AABBCCDDEEFF00112233445566778899aabbccddeeff"
            .parse()
            .unwrap();
        assert_eq!(
            f.to_string(),
            "sha256:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
        );
        for bad in [
            "",
            "sha256:",
            "sha1:00",
            "sha256:zz",
            &format!("sha256:{}", "0".repeat(63)),
        ] {
            let e = bad.parse::<Fwid>().unwrap_err().to_string();
            assert!(e.contains("sha256:<64 hex digits>"), "{e}");
        }
    }

    // Frozen vectors for scheme dps-station-dice-v1. UDS = 00 01 … 1f, FWID =
    // SHA-256("dps-station test firmware v1"). Cross-checked once against an independent
    // Python implementation (hmac/hashlib + textbook P-256 arithmetic).
    const VEC_FWID: &str =
        "sha256:ef70c42efc1a27cbb7a80a3d24b5192d9c6c7e787cbb2132dfc5dc5aa2b49121";
    const VEC_CDI: &str = "3238147c560c86f320b4b521ac28d1072b86be8241770daf7fb04bc0fb178b41";
    const VEC_DEVICE_ID: &str =
        "04b10a52d34cc1f4a81cdf0e2f8799b454d03cbc6fc6e7ba6b71c499e2d95122c0\
                                 e60ea634ff677c5b24d3e506b78a9f1152cf5a25ee11cd18e3afbdf963e2d3dc";
    const VEC_ALIAS: &str = "04a512c4de77977ce4bc710964afcc94fbeb7de31f0287ade6a0fd7464395fba9d\
                             17cbeeacded520792f10ef1646f249f9792f86be5fcddb3d24eddc55d5117dcd";

    fn vec_uds() -> [u8; 32] {
        std::array::from_fn(|i| i as u8)
    }

    #[test]
    fn derivation_matches_the_frozen_vectors() {
        let fwid: Fwid = VEC_FWID.parse().unwrap();
        assert_eq!(
            fwid.0,
            <[u8; 32]>::from(Sha256::digest(b"dps-station test firmware v1"))
        );
        assert_eq!(
            hex::encode(*derive_cdi(&vec_uds(), &fwid).unwrap()),
            VEC_CDI
        );
        let keys = derive_keys(&vec_uds(), &fwid).unwrap();
        assert_eq!(hex::encode(keys.device_id_public()), VEC_DEVICE_ID);
        assert_eq!(hex::encode(keys.alias_public()), VEC_ALIAS);
    }

    #[test]
    fn each_input_changes_the_keys() {
        let fwid: Fwid = VEC_FWID.parse().unwrap();
        let base = derive_keys(&vec_uds(), &fwid).unwrap();
        let mut uds2 = vec_uds();
        uds2[31] ^= 1;
        let other_uds = derive_keys(&uds2, &fwid).unwrap();
        assert_ne!(base.device_id_public(), other_uds.device_id_public());
        assert_ne!(base.alias_public(), other_uds.alias_public());
        let mut f2 = fwid;
        f2.0[0] ^= 1;
        let other_fw = derive_keys(&vec_uds(), &f2).unwrap();
        assert_ne!(base.alias_public(), other_fw.alias_public());
        assert_ne!(base.device_id_public(), base.alias_public());
        // A zero UDS does not reproduce them either.
        let zero = derive_keys(&[0u8; 32], &fwid).unwrap();
        assert_ne!(zero.device_id_public(), base.device_id_public());
    }

    #[test]
    fn random_uds_differs_each_time() {
        let a = random_uds().unwrap();
        let b = random_uds().unwrap();
        assert_ne!(*a, *b);
        assert_ne!(*a, [0u8; 32]);
    }

    #[test]
    fn debug_output_never_shows_secrets() {
        let fwid: Fwid = VEC_FWID.parse().unwrap();
        let keys = derive_keys(&vec_uds(), &fwid).unwrap();
        let dbg = format!("{keys:?}");
        assert!(dbg.contains(&VEC_ALIAS[..20]), "{dbg}");
        let secret_hex = hex::encode(keys.alias.to_bytes());
        assert!(!dbg.contains(&secret_hex));
    }

    #[test]
    fn serials_are_validated() {
        assert!(validate_serial("SN-0001").is_ok());
        for bad in ["", "has space", "-lead", "../x", &"A".repeat(65)] {
            assert!(matches!(
                validate_serial(bad),
                Err(DiceError::BadSerial { .. })
            ));
        }
    }
}
