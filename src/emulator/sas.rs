//! Verification of `SharedAccessSignature` tokens presented to the emulator
//! (reference/dps-api.md §5): signature (HMAC-SHA256 of `sr + "\n" + se` with the
//! base64-decoded key), expiry, policy name and `sr` = the emulator's host name.
//! Error messages say which check failed; they must never echo the key or the signature.
use hmac::{Hmac, Mac};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::Sha256;

/// Characters left alone by form/URL encoders (`quote_plus`, `encodeURIComponent`, …).
const URL_UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Why a token was refused (all map to HTTP 401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SasError {
    #[error("the Authorization header is missing")]
    Missing,
    #[error("the Authorization header is not a SharedAccessSignature token")]
    NotSas,
    #[error("the SharedAccessSignature token has no {0} field")]
    MissingField(&'static str),
    #[error("the SharedAccessSignature token's se field is not a number of seconds")]
    BadExpiry,
    #[error("the SharedAccessSignature token expired at {se} (now {now})")]
    Expired { se: u64, now: u64 },
    #[error("the policy (skn) {0:?} is not a shared access policy of this service")]
    WrongPolicy(String),
    #[error("the token's resource (sr) {0:?} is not this service's host name")]
    WrongResource(String),
    #[error("the SharedAccessSignature token's signature does not match")]
    BadSignature,
}

fn decode(s: &str) -> String {
    percent_decode_str(s).decode_utf8_lossy().into_owned()
}

/// Normalise an `sr` value for comparison: decoded, lower-cased, no scheme, no trailing `/`.
fn normalise_resource(sr: &str) -> String {
    let mut s = decode(sr).trim().to_ascii_lowercase();
    for scheme in ["https://", "http://"] {
        if let Some(rest) = s.strip_prefix(scheme) {
            s = rest.to_string();
        }
    }
    while s.ends_with('/') {
        s.pop();
    }
    s
}

/// Check `header` (the whole `Authorization` value). `now` is Unix seconds.
pub fn verify(
    header: Option<&str>,
    host_name: &str,
    policy: &str,
    key: &[u8],
    now: u64,
) -> Result<(), SasError> {
    let header = header.ok_or(SasError::Missing)?.trim();
    let (scheme, rest) = header.split_once(' ').ok_or(SasError::NotSas)?;
    if !scheme.eq_ignore_ascii_case("SharedAccessSignature") {
        return Err(SasError::NotSas);
    }
    let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
    for pair in rest.trim().split('&') {
        let Some((k, v)) = pair.split_once('=') else {
            continue;
        };
        match k.trim().to_ascii_lowercase().as_str() {
            "sr" => sr = Some(v),
            "sig" => sig = Some(v),
            "se" => se = Some(v),
            "skn" => skn = Some(v),
            _ => {}
        }
    }
    let sr = sr.ok_or(SasError::MissingField("sr"))?;
    let sig = sig.ok_or(SasError::MissingField("sig"))?;
    let se_raw = se.ok_or(SasError::MissingField("se"))?;
    let skn = skn.ok_or(SasError::MissingField("skn"))?;

    let se: u64 = decode(se_raw)
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|f| f.is_finite() && *f >= 0.0)
        .map(|f| f as u64)
        .ok_or(SasError::BadExpiry)?;
    if se <= now {
        return Err(SasError::Expired { se, now });
    }
    let skn = decode(skn);
    if !skn.eq_ignore_ascii_case(policy) {
        return Err(SasError::WrongPolicy(skn));
    }
    if normalise_resource(sr) != normalise_resource(host_name) {
        return Err(SasError::WrongResource(decode(sr)));
    }

    // The signature may arrive url-encoded (or, from form encoders, with '+' intact).
    let sig_text = decode(sig);
    use base64::Engine as _;
    let sig_bytes = base64::engine::general_purpose::STANDARD
        .decode(sig_text.trim())
        .map_err(|_| SasError::BadSignature)?;
    // SDKs differ in what they sign (reference/dps-api.md §5.2): the sr exactly as sent,
    // its decoded form, or its (lower-cased) url-encoding. Accept any of them.
    let decoded = decode(sr);
    let candidates = [
        sr.to_string(),
        decoded.clone(),
        utf8_percent_encode(&decoded, URL_UNRESERVED).to_string(),
        utf8_percent_encode(&decoded.to_ascii_lowercase(), URL_UNRESERVED).to_string(),
    ];
    for c in candidates.iter() {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
            return Err(SasError::BadSignature);
        };
        mac.update(c.as_bytes());
        mac.update(b"\n");
        mac.update(se_raw.as_bytes());
        if mac.verify_slice(&sig_bytes).is_ok() {
            return Ok(());
        }
    }
    Err(SasError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    // Vector from reference/dps-api.md §5.2 (computed with the documented algorithm).
    const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    const TOKEN: &str = "SharedAccessSignature sr=mydps.azure-devices-provisioning.net&sig=xXBqEKztXMACe9dg1gMBreO%2F8CMn3ovt%2B%2BxDvPb6Xl0%3D&se=1700000000&skn=provisioningserviceowner";

    fn key() -> Vec<u8> {
        base64::engine::general_purpose::STANDARD
            .decode(KEY)
            .unwrap()
    }

    #[test]
    fn accepts_the_reference_vector() {
        let host = "MyDps.azure-devices-provisioning.net";
        verify(
            Some(TOKEN),
            host,
            "provisioningserviceowner",
            &key(),
            1_600_000_000,
        )
        .unwrap();
        // Field order is free.
        let reordered = "SharedAccessSignature skn=provisioningserviceowner&se=1700000000&sig=xXBqEKztXMACe9dg1gMBreO%2F8CMn3ovt%2B%2BxDvPb6Xl0%3D&sr=mydps.azure-devices-provisioning.net";
        verify(
            Some(reordered),
            host,
            "provisioningserviceowner",
            &key(),
            1_600_000_000,
        )
        .unwrap();
    }

    #[test]
    fn refuses_expiry_policy_resource_and_key() {
        let host = "mydps.azure-devices-provisioning.net";
        let p = "provisioningserviceowner";
        assert!(matches!(
            verify(Some(TOKEN), host, p, &key(), 1_700_000_000),
            Err(SasError::Expired { .. })
        ));
        assert!(matches!(
            verify(Some(TOKEN), host, "other", &key(), 1),
            Err(SasError::WrongPolicy(_))
        ));
        assert!(matches!(
            verify(Some(TOKEN), "x.example", p, &key(), 1),
            Err(SasError::WrongResource(_))
        ));
        assert_eq!(
            verify(Some(TOKEN), host, p, b"another key", 1),
            Err(SasError::BadSignature)
        );
        assert_eq!(verify(None, host, p, &key(), 1), Err(SasError::Missing));
        assert_eq!(
            verify(Some("Bearer abc"), host, p, &key(), 1),
            Err(SasError::NotSas)
        );
    }

    #[test]
    fn error_text_never_contains_the_signature() {
        let e = verify(
            Some(TOKEN),
            "mydps.azure-devices-provisioning.net",
            "provisioningserviceowner",
            b"k",
            1,
        )
        .unwrap_err()
        .to_string();
        assert!(!e.contains("xXBq"), "{e}");
    }

    #[test]
    fn scheme_prefixed_resource_is_accepted() {
        let key = key();
        let host = "127.0.0.1:8080";
        let sr = "http%3A%2F%2F127.0.0.1%3A8080";
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
        mac.update(format!("{sr}\n2000000000").as_bytes());
        let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        let sig = utf8_percent_encode(&sig, URL_UNRESERVED).to_string();
        let tok = format!("SharedAccessSignature sr={sr}&sig={sig}&se=2000000000&skn=p");
        verify(Some(&tok), host, "p", &key, 1).unwrap();
    }
}
