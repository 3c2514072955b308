//! Shared access signature (SAS) tokens for the DPS service API (DESIGN.md §7,
//! reference/dps-api.md §5): `sr` = url-encoded lower-case HostName, signature =
//! base64(HMAC-SHA256(key, sr + "\n" + se)), token lifetime one hour, renewed once 80 % of
//! its life has passed. Tokens are [`Secret`]s: they must never reach a log or an error.
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use hmac::{Hmac, Mac};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::Sha256;

use super::connection_string::ConnectionString;
use crate::secret::Secret;

/// Token lifetime (the SDKs all use one hour).
pub const TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Renew when less than this much lifetime is left (20 % of the TTL).
pub const RENEW_MARGIN: Duration = Duration::from_secs(720);

/// Characters left as-is by URL encoding (RFC 3986 unreserved), like `encodeURIComponent`
/// minus `!'()*`.
const ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// URL-encode a value for a SAS field.
pub fn url_encode(s: &str) -> String {
    utf8_percent_encode(s, ENCODE).to_string()
}

/// Build the `Authorization` header value for `host`, `policy` and `key`, valid until
/// `expiry` (seconds since the Unix epoch).
pub fn sas_token(host: &str, policy: &str, key: &[u8], expiry: u64) -> Secret<String> {
    let sr = url_encode(&host.to_ascii_lowercase());
    let to_sign = format!("{sr}\n{expiry}");
    // HMAC-SHA256 takes keys of any length; this cannot fail.
    let mut mac = match Hmac::<Sha256>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable_hmac(),
    };
    mac.update(to_sign.as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    Secret::new(format!(
        "SharedAccessSignature sr={sr}&sig={}&se={expiry}&skn={}",
        url_encode(&sig),
        url_encode(policy)
    ))
}

#[allow(clippy::panic)]
fn unreachable_hmac() -> ! {
    // `Hmac::new_from_slice` only fails for fixed-key-size MACs; HMAC accepts any length.
    panic!("HMAC-SHA256 rejected a key")
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Signs tokens for one connection string and caches the current one until it is due for
/// renewal.
pub struct SasSigner {
    cs: ConnectionString,
    ttl: Duration,
    cached: Mutex<Option<(u64, Secret<String>)>>,
}

impl std::fmt::Debug for SasSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SasSigner")
            .field("host", &self.cs.host_name())
            .field("policy", &self.cs.key_name())
            .finish_non_exhaustive()
    }
}

impl SasSigner {
    pub fn new(cs: ConnectionString) -> Self {
        SasSigner {
            cs,
            ttl: TOKEN_TTL,
            cached: Mutex::new(None),
        }
    }

    /// Use tokens valid for `ttl` (at least 1 s) instead of [`TOKEN_TTL`]; they are renewed
    /// once less than a fifth of it (at least 1 s) is left.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl.max(Duration::from_secs(1));
        self.cached = Mutex::new(None);
        self
    }

    /// The current token, signing a new one when none is cached or the cached one has
    /// less than [`RENEW_MARGIN`] (scaled to the TTL) left.
    pub fn token(&self) -> Secret<String> {
        self.token_at(now_secs())
    }

    /// [`SasSigner::token`] at a given clock reading (seconds since the epoch).
    pub fn token_at(&self, now: u64) -> Secret<String> {
        let margin = (self.ttl.as_secs() / 5).max(1);
        let mut guard = match self.cached.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some((se, tok)) = guard.as_ref() {
            if now + margin < *se {
                return tok.clone();
            }
        }
        let se = now + self.ttl.as_secs();
        let tok = sas_token(
            self.cs.host_name(),
            self.cs.key_name(),
            self.cs.key().expose(),
            se,
        );
        *guard = Some((se, tok.clone()));
        tok
    }

    pub fn connection_string(&self) -> &ConnectionString {
        &self.cs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// reference/dps-api.md §5.2 test vector.
    #[test]
    fn matches_the_reference_vector() {
        let key = base64::engine::general_purpose::STANDARD
            .decode("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=")
            .unwrap();
        let t = sas_token(
            "MyDps.azure-devices-provisioning.net",
            "provisioningserviceowner",
            &key,
            1_700_000_000,
        );
        assert_eq!(
            t.expose(),
            "SharedAccessSignature sr=mydps.azure-devices-provisioning.net&sig=xXBqEKztXMACe9dg1gMBreO%2F8CMn3ovt%2B%2BxDvPb6Xl0%3D&se=1700000000&skn=provisioningserviceowner"
        );
    }

    #[test]
    fn host_with_port_is_encoded() {
        let t = sas_token("127.0.0.1:8443", "p", b"k", 1);
        assert!(
            t.expose()
                .starts_with("SharedAccessSignature sr=127.0.0.1%3A8443&sig="),
            "{t:?}"
        );
    }

    #[test]
    fn tokens_are_cached_then_renewed_at_80_percent() {
        let cs = ConnectionString::parse(
            "HostName=h.example;SharedAccessKeyName=p;SharedAccessKey=MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
        )
        .unwrap();
        let s = SasSigner::new(cs);
        let t0 = s.token_at(1_000_000);
        assert!(t0.expose().ends_with("&se=1003600&skn=p"));
        // Still within the first 80 %: same token.
        assert_eq!(s.token_at(1_000_000 + 2879).expose(), t0.expose());
        // Past 80 %: a new token with a new expiry.
        let t1 = s.token_at(1_000_000 + 2881);
        assert!(t1
            .expose()
            .ends_with(&format!("&se={}&skn=p", 1_000_000 + 2881 + 3600)));
        assert!(!format!("{s:?}").contains("sig="));
    }
}
