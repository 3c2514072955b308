//! X.509 certificate input for enrollments: the real service takes PEM text or base64 DER
//! (also base64 of PEM, reference/dps-api.md §3), stores the certificate and returns only
//! its `info` (subject, thumbprints, validity, serial). This module turns the submitted
//! text into that `info` object. It must never return or log the certificate text.
use base64::Engine as _;
use serde_json::{json, Value};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use x509_parser::prelude::*;

/// A certificate the emulator refuses, with a reason fit for a 400 message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CertError(pub String);

fn der_from_input(input: &str) -> Result<Vec<u8>, CertError> {
    let text = input.trim();
    if text.contains("-----BEGIN") {
        return pem_to_der(text.as_bytes());
    }
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .map_err(|_| CertError("is neither PEM text nor base64-encoded DER".to_string()))?;
    if bytes.starts_with(b"-----BEGIN") {
        return pem_to_der(&bytes);
    }
    Ok(bytes)
}

fn pem_to_der(bytes: &[u8]) -> Result<Vec<u8>, CertError> {
    let block = ::pem::parse(bytes).map_err(|e| CertError(format!("is not valid PEM ({e})")))?;
    if block.tag() != "CERTIFICATE" {
        return Err(CertError(format!(
            "PEM block is {:?}, expected CERTIFICATE",
            block.tag()
        )));
    }
    Ok(block.into_contents())
}

fn name_string(name: &X509Name<'_>) -> String {
    // Most specific first, like the service's .NET X500DistinguishedName
    // ("CN=…, OU=…, O=…, C=US", reference/dps-api.md §3 and SDK doc examples).
    let registry = x509_parser::objects::oid_registry();
    let rdns: Vec<String> =
        name.iter_rdn()
            .map(|rdn| {
                rdn.iter()
                    .map(|attr| {
                        let key = x509_parser::objects::oid2abbrev(attr.attr_type(), registry)
                            .map(str::to_string)
                            .unwrap_or_else(|_| attr.attr_type().to_id_string());
                        let val = attr.as_str().map(str::to_string).unwrap_or_else(|_| {
                            format!("#{}", hex::encode(attr.attr_value().data))
                        });
                        format!("{key}={val}")
                    })
                    .collect::<Vec<_>>()
                    .join(" + ")
            })
            .collect();
    rdns.into_iter().rev().collect::<Vec<_>>().join(", ")
}

fn utc(ts: i64) -> String {
    match ::time::OffsetDateTime::from_unix_timestamp(ts) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => "0001-01-01T00:00:00Z".to_string(),
    }
}

/// Parse the submitted certificate text and build its `X509CertificateInfo`.
pub fn certificate_info(input: &str) -> Result<Value, CertError> {
    let der = der_from_input(input)?;
    let (_, cert) = X509Certificate::from_der(&der)
        .map_err(|e| CertError(format!("is not a valid X.509 certificate ({e})")))?;
    let sha1 = hex::encode_upper(Sha1::digest(&der));
    let sha256 = hex::encode_upper(Sha256::digest(&der));
    Ok(json!({
        "subjectName": name_string(cert.subject()),
        "sha1Thumbprint": sha1,
        "sha256Thumbprint": sha256,
        "issuerName": name_string(cert.issuer()),
        "notBeforeUtc": utc(cert.validity().not_before.timestamp()),
        "notAfterUtc": utc(cert.validity().not_after.timestamp()),
        "serialNumber": hex::encode_upper(cert.raw_serial()),
        "version": cert.version().0 + 1,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert() -> rcgen::Certificate {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Line A");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "board-1");
        params.self_signed(&key).unwrap()
    }

    #[test]
    fn pem_der_and_base64_pem_give_the_same_info() {
        let c = cert();
        let pem = c.pem();
        let der_b64 = base64::engine::general_purpose::STANDARD.encode(c.der());
        let pem_b64 = base64::engine::general_purpose::STANDARD.encode(pem.as_bytes());
        let a = certificate_info(&pem).unwrap();
        assert_eq!(a, certificate_info(&der_b64).unwrap());
        assert_eq!(a, certificate_info(&pem_b64).unwrap());
        // Most specific first: the reverse of the encoded (x509-parser display) order.
        let (_, parsed) = X509Certificate::from_der(c.der()).unwrap();
        let encoded = parsed.subject().to_string();
        let mut parts: Vec<&str> = encoded.split(", ").collect();
        parts.reverse();
        assert_eq!(a["subjectName"], parts.join(", "));
        assert!(a["subjectName"].as_str().unwrap().contains("CN=board-1"));
        assert_eq!(a["version"], 3);
        let sha = a["sha256Thumbprint"].as_str().unwrap();
        assert_eq!(sha.len(), 64);
        assert_eq!(sha, sha.to_ascii_uppercase());
        assert!(a["notBeforeUtc"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn garbage_is_refused() {
        assert!(certificate_info("not a cert").is_err());
        assert!(certificate_info("AAAA").is_err());
        assert!(
            certificate_info("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----")
                .is_err()
        );
    }
}
