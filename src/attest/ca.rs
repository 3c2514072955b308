//! The station CA: the certificate and signing key that certify every board's DeviceID.
//!
//! [`StationCa::load`] reads a CA certificate and its key from PEM files and refuses to go on
//! unless the certificate is a P-256 CA with keyCertSign, valid now, whose pathLen leaves room
//! for the DeviceID CA below it, and unless the key matches the certificate. A key file that
//! group or others can read is refused; the error names the file and its octal mode.
//! [`init_dev_ca`] creates a development root + intermediate (`dps-station ca init`).
//!
//! This module must never print, log or put into an error any private-key bytes, and never
//! writes a key file with a mode other than 0600.
//!
//! # Signer trait (README text)
//!
//! The CA key is used through [`CaSigner`], a three-method trait:
//!
//! ```text
//! pub trait CaSigner: Send + Sync {
//!     fn public_key(&self) -> &[u8];                                  // SEC1 uncompressed P-256 point
//!     fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignerError>; // ECDSA P-256 SHA-256, DER
//!     fn describe(&self) -> String;                                   // "file:/etc/…", "pkcs11:…"
//! }
//! ```
//!
//! The station ships [`FileSigner`] (a PKCS#8 or SEC1 PEM key file, mode 0600). To keep the
//! key in an HSM, a PKCS#11 token or the station's TPM instead, implement `CaSigner` for a
//! type that holds a session to that device: `public_key` returns the key's public point
//! (read once at start), `sign` hashes the message with SHA-256 and asks the device for an
//! ECDSA signature (PKCS#11 `CKM_ECDSA` over the digest, or TPM2_Sign with TPM_ALG_ECDSA),
//! returning it DER-encoded (`SEQUENCE { r INTEGER, s INTEGER }`; convert raw r‖s output).
//! Then build the CA with [`StationCa::from_signer`]; it runs the same certificate checks and
//! proves the signer holds the certificate's key by signing and verifying a probe message.
//! Nothing else changes: issuance only ever calls `sign`.
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use p256::ecdsa::signature::Verifier;
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use time::{Duration, OffsetDateTime};
use zeroize::Zeroizing;

use super::x509::{self, X509Error};

/// A signer failed (device error, session lost, …). The message never holds key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SignerError(pub String);

/// A P-256 signing key that certifies boards. See the module docs for how to plug in an
/// HSM, PKCS#11 token or TPM.
pub trait CaSigner: Send + Sync {
    /// The public key as an uncompressed SEC1 point (65 bytes: 0x04 ‖ X ‖ Y).
    fn public_key(&self) -> &[u8];
    /// ECDSA P-256 with SHA-256 over `message` (the signer hashes), DER-encoded.
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignerError>;
    /// Where the key lives, for messages ("file:/etc/dps-station/ca/intermediate.key").
    fn describe(&self) -> String;
}

/// Errors loading, checking or creating the station CA. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "CA key file {path} has mode {mode}; it must not be readable by group or others (chmod 600 {path})"
    )]
    KeyPermissions { path: PathBuf, mode: String },
    #[error("{path}: {detail}")]
    BadKey { path: PathBuf, detail: String },
    #[error("CA certificate {path}: {source}")]
    Cert {
        path: PathBuf,
        #[source]
        source: X509Error,
    },
    #[error("CA key {key} does not match the public key of CA certificate {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("CA signer {signer}: {detail}")]
    Signer { signer: String, detail: String },
    #[error("{0} already exists; refusing to overwrite it")]
    Exists(PathBuf),
    #[error("creating the CA: {0}")]
    Generate(String),
}

impl CaError {
    /// The §5 reply token.
    pub fn reason(&self) -> &'static str {
        "ca-error"
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Read a key file after checking (on the open descriptor) that only its owner can read it.
fn read_private_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, CaError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let mode = f.metadata().map_err(io_err(path))?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(CaError::KeyPermissions {
            path: path.to_path_buf(),
            mode: format!("{:04o}", mode & 0o7777),
        });
    }
    let mut buf = Zeroizing::new(Vec::new());
    f.read_to_end(&mut buf).map_err(io_err(path))?;
    Ok(buf)
}

/// A CA key held in a PEM file (PKCS#8 `PRIVATE KEY` or SEC1 `EC PRIVATE KEY`, P-256).
pub struct FileSigner {
    path: PathBuf,
    key: KeyPair,
}

impl FileSigner {
    /// Open a key file: refuses group/world-readable files and non-P-256 keys.
    pub fn open(path: &Path) -> Result<Self, CaError> {
        let bytes = read_private_file(path)?;
        let text = std::str::from_utf8(&bytes).map_err(|_| CaError::BadKey {
            path: path.to_path_buf(),
            detail: "not a PEM text file".into(),
        })?;
        let secret = p256::SecretKey::from_pkcs8_pem(text)
            .or_else(|_| p256::SecretKey::from_sec1_pem(text))
            .map_err(|_| CaError::BadKey {
                path: path.to_path_buf(),
                detail:
                    "not a P-256 private key in PKCS#8 (PRIVATE KEY) or SEC1 (EC PRIVATE KEY) PEM"
                        .into(),
            })?;
        let key = keypair_from_secret(&secret).map_err(|detail| CaError::BadKey {
            path: path.to_path_buf(),
            detail,
        })?;
        Ok(FileSigner {
            path: path.to_path_buf(),
            key,
        })
    }
}

/// Convert a p256 secret key into an rcgen (ring) key pair via PKCS#8 DER.
pub(crate) fn keypair_from_secret(secret: &p256::SecretKey) -> Result<KeyPair, String> {
    let doc = secret
        .to_pkcs8_der()
        .map_err(|e| format!("PKCS#8 encoding failed: {e}"))?;
    KeyPair::try_from(doc.as_bytes()).map_err(|e| format!("key rejected: {e}"))
}

impl CaSigner for FileSigner {
    fn public_key(&self) -> &[u8] {
        self.key.public_key_raw()
    }
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignerError> {
        rcgen::SigningKey::sign(&self.key, message).map_err(|e| SignerError(e.to_string()))
    }
    fn describe(&self) -> String {
        format!("file:{}", self.path.display())
    }
}

/// Adapter: any [`CaSigner`] as an rcgen signing key.
pub(crate) struct CaKey(Box<dyn CaSigner>);

impl rcgen::PublicKeyData for CaKey {
    fn der_bytes(&self) -> &[u8] {
        self.0.public_key()
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl rcgen::SigningKey for CaKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.0.sign(msg).map_err(|_| rcgen::Error::RemoteKeyError)
    }
}

/// The loaded, checked station CA: certificate plus signer. Share it with `Arc`.
pub struct StationCa {
    cert_der: Vec<u8>,
    cert_pem: String,
    info: x509::CertInfo,
    signer_description: String,
    pub(crate) issuer: Issuer<'static, CaKey>,
}

impl std::fmt::Debug for StationCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StationCa")
            .field("subject", &self.info.subject)
            .field("signer", &self.signer_description)
            .finish()
    }
}

const PROBE: &[u8] = b"dps-station CA key possession probe";

impl StationCa {
    /// Load and check a CA certificate (the first CERTIFICATE in the PEM file) and its key.
    pub fn load(cert_pem: &Path, key_pem: &Path) -> Result<Self, CaError> {
        let signer = FileSigner::open(key_pem)?;
        let text = fs::read(cert_pem).map_err(io_err(cert_pem))?;
        let ca = Self::from_signer_inner(&text, cert_pem, Box::new(signer));
        match ca {
            Err(CaError::Signer { .. }) | Err(CaError::KeyMismatch { .. }) => {
                Err(CaError::KeyMismatch {
                    cert: cert_pem.to_path_buf(),
                    key: key_pem.to_path_buf(),
                })
            }
            other => other,
        }
    }

    /// Build the CA from a certificate PEM text and any signer (HSM, PKCS#11, TPM, file).
    /// Runs the same checks as [`StationCa::load`] and a sign-and-verify probe.
    pub fn from_signer(cert_pem_text: &[u8], signer: Box<dyn CaSigner>) -> Result<Self, CaError> {
        Self::from_signer_inner(cert_pem_text, Path::new("<certificate>"), signer)
    }

    fn from_signer_inner(
        text: &[u8],
        cert_path: &Path,
        signer: Box<dyn CaSigner>,
    ) -> Result<Self, CaError> {
        let cert_err = |source| CaError::Cert {
            path: cert_path.to_path_buf(),
            source,
        };
        let der = x509::certs_from_pem(text)
            .map_err(cert_err)?
            .into_iter()
            .next()
            .ok_or(X509Error::NoCertificate)
            .map_err(cert_err)?;
        let info = x509::check_issuing_ca(&der, OffsetDateTime::now_utc()).map_err(cert_err)?;
        let describe = signer.describe();
        if signer.public_key() != info.public_key.as_slice() {
            return Err(CaError::KeyMismatch {
                cert: cert_path.to_path_buf(),
                key: PathBuf::from(describe),
            });
        }
        // Prove possession: the signer's signature must verify under the certificate's key.
        let sig = signer.sign(PROBE).map_err(|e| CaError::Signer {
            signer: describe.clone(),
            detail: e.0,
        })?;
        let verified = p256::ecdsa::VerifyingKey::from_sec1_bytes(&info.public_key)
            .ok()
            .zip(p256::ecdsa::Signature::from_der(&sig).ok())
            .is_some_and(|(vk, sig)| vk.verify(PROBE, &sig).is_ok());
        if !verified {
            return Err(CaError::Signer {
                signer: describe,
                detail: "its signature does not verify under the CA certificate's key".into(),
            });
        }
        // Issuance needs the fixed-base table; build it now rather than on the first board.
        super::fixed_base::warm_up();
        let issuer = Issuer::from_ca_cert_der(&der.clone().into(), CaKey(signer))
            .map_err(|e| cert_err(X509Error::Parse(e.to_string())))?;
        let cert_pem = super::dice::pem_lf("CERTIFICATE", &der).to_string();
        Ok(StationCa {
            cert_der: der,
            cert_pem,
            info,
            signer_description: describe,
            issuer,
        })
    }

    /// The CA certificate (DER).
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }
    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }
    /// Subject DN text of the CA certificate.
    pub fn subject(&self) -> &str {
        &self.info.subject
    }
    /// End of the CA's validity; issued certificates never outlive it.
    pub fn not_after(&self) -> OffsetDateTime {
        self.info.not_after
    }
    /// Where the key lives (never key material).
    pub fn signer_description(&self) -> &str {
        &self.signer_description
    }
}

/// Paths written by [`init_dev_ca`].
#[derive(Debug, Clone)]
pub struct DevCaPaths {
    pub root_cert: PathBuf,
    pub root_key: PathBuf,
    pub intermediate_cert: PathBuf,
    pub intermediate_key: PathBuf,
    /// intermediate + root, for `-untrusted`/chain use.
    pub chain: PathBuf,
}

/// Create a 16-byte positive random serial number.
pub(crate) fn random_serial() -> Result<SerialNumber, String> {
    let mut b = [0u8; 16];
    rand::RngCore::try_fill_bytes(&mut rand::rngs::OsRng, &mut b)
        .map_err(|e| format!("OS RNG failed: {e}"))?;
    // Positive and exactly 16 octets: top bit clear, second-highest bit set.
    b[0] = (b[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&b))
}

/// Write `bytes` to a new file with `mode`; fails if the file exists.
pub(crate) fn write_new_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), std::io::Error> {
    write_new_file_unsynced(path, bytes, mode)?.sync_all()
}

/// [`write_new_file`] without the fsync: the caller syncs the returned file (writing a set of
/// files first and syncing them afterwards lets one journal commit cover them all).
pub(crate) fn write_new_file_unsynced(
    path: &Path,
    bytes: &[u8],
    mode: u32,
) -> Result<File, std::io::Error> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    // The umask may have narrowed the mode; make it exact.
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    f.write_all(bytes)?;
    Ok(f)
}

/// Create `dir` with mode 0700 if it does not exist.
pub(crate) fn ensure_private_dir(dir: &Path) -> Result<(), std::io::Error> {
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Create a development root + intermediate CA in `dir` (root.pem, root.key,
/// intermediate.pem, intermediate.key, chain.pem). Keys are PKCS#8 PEM, mode 0600; `dir` is
/// created 0700. Refuses to overwrite any existing file. Development only: a production root
/// stays offline.
pub fn init_dev_ca(dir: &Path, name: &str) -> Result<DevCaPaths, CaError> {
    let paths = DevCaPaths {
        root_cert: dir.join("root.pem"),
        root_key: dir.join("root.key"),
        intermediate_cert: dir.join("intermediate.pem"),
        intermediate_key: dir.join("intermediate.key"),
        chain: dir.join("chain.pem"),
    };
    for p in [
        &paths.root_cert,
        &paths.root_key,
        &paths.intermediate_cert,
        &paths.intermediate_key,
        &paths.chain,
    ] {
        if p.exists() {
            return Err(CaError::Exists(p.clone()));
        }
    }
    if name.trim().is_empty() || name.chars().count() > 48 || name.chars().any(char::is_control) {
        return Err(CaError::Generate(format!(
            "--cn {name:?}: give 1-48 printable characters"
        )));
    }
    let gen = |e: rcgen::Error| CaError::Generate(e.to_string());
    let now = OffsetDateTime::now_utc();
    let ca_params = |cn: String, path_len: u8, years: i64| -> Result<CertificateParams, CaError> {
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name
            .push(DnType::OrganizationName, "dps-station development");
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.use_authority_key_identifier_extension = true;
        p.serial_number = Some(random_serial().map_err(CaError::Generate)?);
        p.not_before = now - Duration::minutes(5);
        p.not_after = now + Duration::days(365 * years);
        Ok(p)
    };
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen)?;
    let inter_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen)?;
    // root → intermediate → DeviceID → Alias: the root allows 2 CAs below it, the
    // intermediate 1 (the DeviceID).
    let mut root_params = ca_params(format!("{name} Root CA"), 2, 25)?;
    root_params.use_authority_key_identifier_extension = false;
    let root_cert = root_params.self_signed(&root_key).map_err(gen)?;
    let root_issuer = Issuer::from_params(&root_params, &root_key);
    let inter_params = ca_params(format!("{name} Intermediate CA"), 1, 20)?;
    let inter_cert = inter_params
        .signed_by(&inter_key, &root_issuer)
        .map_err(gen)?;

    ensure_private_dir(dir).map_err(io_err(dir))?;
    let key_pem = |k: &KeyPair| -> Result<Zeroizing<String>, CaError> {
        let secret = p256::SecretKey::from_pkcs8_der(k.serialized_der())
            .map_err(|e| CaError::Generate(e.to_string()))?;
        secret
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| CaError::Generate(e.to_string()))
    };
    let root_key_pem = key_pem(&root_key)?;
    let inter_key_pem = key_pem(&inter_key)?;
    write_new_file(&paths.root_key, root_key_pem.as_bytes(), 0o600)
        .map_err(io_err(&paths.root_key))?;
    write_new_file(&paths.intermediate_key, inter_key_pem.as_bytes(), 0o600)
        .map_err(io_err(&paths.intermediate_key))?;
    write_new_file(&paths.root_cert, root_cert.pem().as_bytes(), 0o644)
        .map_err(io_err(&paths.root_cert))?;
    write_new_file(&paths.intermediate_cert, inter_cert.pem().as_bytes(), 0o644)
        .map_err(io_err(&paths.intermediate_cert))?;
    let chain = format!("{}{}", inter_cert.pem(), root_cert.pem());
    write_new_file(&paths.chain, chain.as_bytes(), 0o644).map_err(io_err(&paths.chain))?;
    Ok(paths)
}
