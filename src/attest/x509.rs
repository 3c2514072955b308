//! X.509 checks with x509-parser: what the station needs to know about a certificate
//! (CN, thumbprints, issuer, validity, CA flags, DICE TcbInfo) and whether a certificate
//! may act as the station's issuing CA.
//!
//! Other areas use [`leaf_cert_info`] (e.g. `enrollment create --x509-cert` checks that the
//! CN equals the registration id) and [`certs_from_pem`] to read PEM files. This module only
//! reads and checks certificates; it never signs, and never sees private keys.
use std::fmt::Write as _;

use sha1::Digest as _;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::FromDer;

use super::tcbinfo::{TcbInfo, TCG_DICE_TCB_INFO_OID};

/// Why a certificate could not be read or does not qualify. `reason()` gives the one-word
/// token used in replies and logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum X509Error {
    #[error("no PEM CERTIFICATE block found")]
    NoCertificate,
    #[error("bad PEM: {0}")]
    Pem(String),
    #[error("not a DER X.509 certificate: {0}")]
    Parse(String),
    #[error("trailing bytes after the certificate")]
    Trailing,
    #[error("certificate {subject:?} is not a CA (basicConstraints cA is not set)")]
    NotCa { subject: String },
    #[error("CA certificate {subject:?} lacks keyUsage keyCertSign")]
    NoKeyCertSign { subject: String },
    #[error("CA certificate {subject:?} expired at {not_after}")]
    Expired { subject: String, not_after: String },
    #[error("CA certificate {subject:?} is not valid before {not_before}")]
    NotYetValid { subject: String, not_before: String },
    #[error(
        "CA certificate {subject:?} has pathLenConstraint 0, which forbids the DeviceID CA below it \
         (needs pathLen >= 1 or none)"
    )]
    PathLen { subject: String },
    #[error("certificate {subject:?} key is not ECDSA P-256 (the station signs with P-256 only)")]
    NotP256 { subject: String },
    #[error("certificate {subject:?}: bad extension: {detail}")]
    Extension { subject: String, detail: String },
}

impl X509Error {
    /// The §5 reply token for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            X509Error::NotCa { .. }
            | X509Error::NoKeyCertSign { .. }
            | X509Error::Expired { .. }
            | X509Error::NotYetValid { .. }
            | X509Error::PathLen { .. }
            | X509Error::NotP256 { .. } => "ca-error",
            _ => "bad-certificate",
        }
    }
}

/// What the station records about a certificate (the same facts DPS returns in
/// `X509CertificateInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Subject common name (first CN), if any.
    pub common_name: Option<String>,
    /// Subject DN as text (RFC 4514 style, e.g. `CN=board-1`).
    pub subject: String,
    /// Issuer DN as text.
    pub issuer: String,
    /// Lower-case hex SHA-256 over the DER.
    pub sha256_hex: String,
    /// Upper-case hex SHA-1 over the DER (as DPS shows thumbprints).
    pub sha1_hex: String,
    /// Serial number, upper-case hex without separators.
    pub serial_hex: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// basicConstraints cA.
    pub is_ca: bool,
    /// basicConstraints pathLenConstraint.
    pub path_len: Option<u32>,
    pub key_usage_digital_signature: bool,
    pub key_usage_key_cert_sign: bool,
    pub eku_client_auth: bool,
    /// Decoded TCG DiceTcbInfo, if the extension is present.
    pub tcb_info: Option<TcbInfo>,
    /// Whether the TcbInfo extension is marked critical.
    pub tcb_info_critical: bool,
    /// Subject public key (for EC keys: the SEC1 point).
    pub public_key: Vec<u8>,
    /// True when the subject key is ECDSA P-256.
    pub p256: bool,
}

/// All CERTIFICATE blocks of a PEM text, as DER, in file order.
pub fn certs_from_pem(pem_text: &[u8]) -> Result<Vec<Vec<u8>>, X509Error> {
    let blocks = pem::parse_many(pem_text).map_err(|e| X509Error::Pem(e.to_string()))?;
    let certs: Vec<Vec<u8>> = blocks
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| p.into_contents())
        .collect();
    if certs.is_empty() {
        return Err(X509Error::NoCertificate);
    }
    Ok(certs)
}

/// Parse one DER certificate; trailing bytes are refused.
pub fn parse(der: &[u8]) -> Result<X509Certificate<'_>, X509Error> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| X509Error::Parse(e.to_string()))?;
    if !rest.is_empty() {
        return Err(X509Error::Trailing);
    }
    Ok(cert)
}

fn upper_hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02X}");
    }
    s
}

fn to_offset(t: x509_parser::time::ASN1Time) -> OffsetDateTime {
    t.to_datetime()
}

/// RFC 3339 text of a time (UTC), as used in manifests and messages.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// The facts of a certificate given as DER: CN, thumbprints, issuer, validity, constraints,
/// and the DICE TcbInfo if present.
pub fn leaf_cert_info(der: &[u8]) -> Result<CertInfo, X509Error> {
    let cert = parse(der)?;
    let subject = cert.subject().to_string();
    let ext_err = |e: x509_parser::error::X509Error| X509Error::Extension {
        subject: subject.clone(),
        detail: e.to_string(),
    };
    let common_name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    let bc = cert.basic_constraints().map_err(ext_err)?;
    let ku = cert.key_usage().map_err(ext_err)?;
    let eku = cert.extended_key_usage().map_err(ext_err)?;
    let tcb_oid = x509_parser::der_parser::oid::Oid::from(TCG_DICE_TCB_INFO_OID).map_err(|_| {
        X509Error::Extension {
            subject: subject.clone(),
            detail: "bad TcbInfo OID".into(),
        }
    })?;
    let (tcb_info, tcb_info_critical) =
        match cert.get_extension_unique(&tcb_oid).map_err(ext_err)? {
            Some(ext) => (
                Some(
                    TcbInfo::from_der(ext.value).map_err(|e| X509Error::Extension {
                        subject: subject.clone(),
                        detail: e.to_string(),
                    })?,
                ),
                ext.critical,
            ),
            None => (None, false),
        };
    let spki = cert.public_key();
    let p256 = spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY
        && spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .is_some_and(|o| o == OID_EC_P256);
    Ok(CertInfo {
        common_name,
        issuer: cert.issuer().to_string(),
        sha256_hex: hex::encode(sha2::Sha256::digest(der)),
        sha1_hex: upper_hex(&sha1::Sha1::digest(der)),
        serial_hex: upper_hex(cert.raw_serial()),
        not_before: to_offset(cert.validity().not_before),
        not_after: to_offset(cert.validity().not_after),
        is_ca: bc.as_ref().is_some_and(|b| b.value.ca),
        path_len: bc.as_ref().and_then(|b| b.value.path_len_constraint),
        key_usage_digital_signature: ku.as_ref().is_some_and(|k| k.value.digital_signature()),
        key_usage_key_cert_sign: ku.as_ref().is_some_and(|k| k.value.key_cert_sign()),
        eku_client_auth: eku.as_ref().is_some_and(|e| e.value.client_auth),
        tcb_info,
        tcb_info_critical,
        public_key: spki.subject_public_key.data.to_vec(),
        p256,
        subject,
    })
}

/// The first certificate of a PEM text, with its facts.
pub fn leaf_cert_info_pem(pem_text: &[u8]) -> Result<(Vec<u8>, CertInfo), X509Error> {
    let der = certs_from_pem(pem_text)?
        .into_iter()
        .next()
        .ok_or(X509Error::NoCertificate)?;
    let info = leaf_cert_info(&der)?;
    Ok((der, info))
}

/// Check that `der` may act as the station's issuing CA at time `at`: a CA certificate with
/// keyUsage keyCertSign (a CA certificate without a keyUsage extension is refused too),
/// valid at `at`, a pathLen that allows one more CA (the DeviceID) below it, and a P-256 key.
pub fn check_issuing_ca(der: &[u8], at: OffsetDateTime) -> Result<CertInfo, X509Error> {
    let info = leaf_cert_info(der)?;
    let subject = info.subject.clone();
    if !info.is_ca {
        return Err(X509Error::NotCa { subject });
    }
    if !info.key_usage_key_cert_sign {
        return Err(X509Error::NoKeyCertSign { subject });
    }
    if at > info.not_after {
        return Err(X509Error::Expired {
            subject,
            not_after: rfc3339(info.not_after),
        });
    }
    if at < info.not_before {
        return Err(X509Error::NotYetValid {
            subject,
            not_before: rfc3339(info.not_before),
        });
    }
    if info.path_len == Some(0) {
        return Err(X509Error::PathLen { subject });
    }
    if !info.p256 {
        return Err(X509Error::NotP256 { subject });
    }
    Ok(info)
}

/// Verify that `child_der` was signed by the key of `issuer_der` (one link, no path logic).
pub fn verify_signed_by(child_der: &[u8], issuer_der: &[u8]) -> Result<(), X509Error> {
    let child = parse(child_der)?;
    let issuer = parse(issuer_der)?;
    child
        .verify_signature(Some(issuer.public_key()))
        .map_err(|e| X509Error::Parse(format!("signature does not verify: {e}")))
}
