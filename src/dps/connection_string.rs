//! DPS service connection strings:
//! `HostName=<dps host>;SharedAccessKeyName=<policy>;SharedAccessKey=<base64 key>`.
//!
//! Pairs are split on `;`, each key from its value on the first `=` (base64 keys end in
//! `=`), as the Java and C SDKs do (reference/dps-api.md §5.1). Errors name the missing or
//! malformed part and never contain the key; the key is held in a [`Secret`] and only the
//! SAS signer sees it.
use std::path::Path;

use base64::Engine;

use crate::secret::Secret;

/// Environment variable read when no `--connection-string-file` is given.
pub const CONNECTION_STRING_ENV: &str = "DPS_CONNECTION_STRING";

/// Why a connection string was refused. Never carries key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionStringError {
    #[error("connection string is empty")]
    Empty,
    #[error("connection string part {index} ({name}) has no '='; expected Name=Value pairs separated by ';'")]
    NotAPair { index: usize, name: String },
    #[error("connection string is missing {0}")]
    Missing(&'static str),
    #[error("connection string has {0} more than once")]
    Duplicate(String),
    #[error("connection string has an empty {0}")]
    EmptyValue(&'static str),
    #[error("connection string has an unknown part {0}; expected HostName, SharedAccessKeyName, SharedAccessKey")]
    UnknownPart(String),
    #[error("connection string SharedAccessKey is not valid base64 ({len} characters)")]
    KeyNotBase64 { len: usize },
    #[error(
        "connection string HostName {0:?} is not a host name (no scheme, path or spaces allowed)"
    )]
    BadHostName(String),
    #[error("connection string SharedAccessKeyName {0:?} contains characters other than A-Z a-z 0-9 - _ .")]
    BadKeyName(String),
    #[error("cannot read connection string file {path}: {reason}")]
    File { path: String, reason: String },
    #[error(
        "no DPS connection string: give --connection-string-file PATH or set DPS_CONNECTION_STRING"
    )]
    NotGiven,
}

/// A parsed, validated DPS service connection string.
#[derive(Clone)]
pub struct ConnectionString {
    host_name: String,
    key_name: String,
    key: Secret<Vec<u8>>,
}

impl std::fmt::Debug for ConnectionString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionString")
            .field("host_name", &self.host_name)
            .field("key_name", &self.key_name)
            .field("key", &self.key)
            .finish()
    }
}

impl ConnectionString {
    /// Parse `HostName=…;SharedAccessKeyName=…;SharedAccessKey=…` (surrounding whitespace
    /// and a trailing `;` are tolerated; key names are case-sensitive like the SDKs').
    pub fn parse(s: &str) -> Result<Self, ConnectionStringError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(ConnectionStringError::Empty);
        }
        let mut host = None;
        let mut name = None;
        let mut key: Option<&str> = None;
        for (i, part) in s.split(';').enumerate() {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let Some((k, v)) = part.split_once('=') else {
                // Never echo the part itself: it might be (part of) the key, e.g. a key
                // that was split at a ';' while being pasted.
                let name = format!("{} characters", part.chars().count());
                return Err(ConnectionStringError::NotAPair { index: i + 1, name });
            };
            let slot = match k.trim() {
                "HostName" => &mut host,
                "SharedAccessKeyName" => &mut name,
                "SharedAccessKey" => &mut key,
                // Accepted by the SDKs but meaningless to a service client signing its own tokens.
                "SharedAccessSignature" => {
                    return Err(ConnectionStringError::UnknownPart(
                        "SharedAccessSignature (give the key, not a token)".into(),
                    ))
                }
                other => {
                    // Echo a name only when it is a well-known connection-string key of
                    // another Azure service; anything else might be a piece of the key.
                    const KNOWN: [&str; 6] = [
                        "DeviceId",
                        "ModuleId",
                        "GatewayHostName",
                        "Endpoint",
                        "EntityPath",
                        "x509",
                    ];
                    let shown = match KNOWN.iter().find(|n| n.eq_ignore_ascii_case(other.trim())) {
                        Some(n) => format!("{n:?}"),
                        None => format!("of {} characters", part.chars().count()),
                    };
                    return Err(ConnectionStringError::UnknownPart(shown));
                }
            };
            if slot.is_some() {
                return Err(ConnectionStringError::Duplicate(k.trim().to_string()));
            }
            *slot = Some(v.trim());
        }
        let host = host.ok_or(ConnectionStringError::Missing("HostName"))?;
        let name = name.ok_or(ConnectionStringError::Missing("SharedAccessKeyName"))?;
        let key = key.ok_or(ConnectionStringError::Missing("SharedAccessKey"))?;
        if host.is_empty() {
            return Err(ConnectionStringError::EmptyValue("HostName"));
        }
        if name.is_empty() {
            return Err(ConnectionStringError::EmptyValue("SharedAccessKeyName"));
        }
        if key.is_empty() {
            return Err(ConnectionStringError::EmptyValue("SharedAccessKey"));
        }
        if !valid_host(host) {
            return Err(ConnectionStringError::BadHostName(host.to_string()));
        }
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(ConnectionStringError::BadKeyName(name.to_string()));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(key)
            .map_err(|_| ConnectionStringError::KeyNotBase64 { len: key.len() })?;
        if bytes.is_empty() {
            return Err(ConnectionStringError::EmptyValue("SharedAccessKey"));
        }
        Ok(ConnectionString {
            host_name: host.to_string(),
            key_name: name.to_string(),
            key: Secret::new(bytes),
        })
    }

    /// Read and parse a connection string file (trimmed of surrounding whitespace).
    pub fn from_file(path: &Path) -> Result<Self, ConnectionStringError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConnectionStringError::File {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let text = Secret::new(text);
        Self::parse(text.expose()).map_err(|e| match e {
            ConnectionStringError::Empty => ConnectionStringError::File {
                path: path.display().to_string(),
                reason: "the file is empty".into(),
            },
            other => other,
        })
    }

    /// The DPS connection string from `file` if given, else from `DPS_CONNECTION_STRING`.
    pub fn load(file: Option<&Path>) -> Result<Self, ConnectionStringError> {
        if let Some(p) = file {
            return Self::from_file(p);
        }
        match std::env::var(CONNECTION_STRING_ENV) {
            Ok(v) => {
                let v = Secret::new(v);
                Self::parse(v.expose())
            }
            Err(_) => Err(ConnectionStringError::NotGiven),
        }
    }

    /// `HostName` exactly as given (may carry a `:port`).
    pub fn host_name(&self) -> &str {
        &self.host_name
    }

    /// `SharedAccessKeyName`: the shared access policy.
    pub fn key_name(&self) -> &str {
        &self.key_name
    }

    /// The decoded shared access key. Only for signing.
    pub fn key(&self) -> &Secret<Vec<u8>> {
        &self.key
    }

    /// A copy with another policy name (tests of a wrong policy use this).
    pub fn with_key_name(&self, name: &str) -> Self {
        ConnectionString {
            key_name: name.to_string(),
            ..self.clone()
        }
    }
}

/// A host name with an optional port: no scheme, path, user info or whitespace.
fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && !h.contains("://")
        && h.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':' | '[' | ']' | '_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

    #[test]
    fn parses_the_three_parts_and_splits_on_the_first_equals() {
        let cs = ConnectionString::parse(&format!(
            "HostName=MyDps.azure-devices-provisioning.net;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey={KEY}"
        ))
        .unwrap();
        assert_eq!(cs.host_name(), "MyDps.azure-devices-provisioning.net");
        assert_eq!(cs.key_name(), "provisioningserviceowner");
        assert_eq!(
            cs.key().expose().as_slice(),
            b"0123456789abcdef0123456789abcdef"
        );
        assert!(!format!("{cs:?}").contains(KEY));
    }

    #[test]
    fn order_whitespace_and_trailing_semicolon_are_tolerated() {
        let cs = ConnectionString::parse(&format!(
            "  SharedAccessKey={KEY}; HostName=127.0.0.1:8443 ;SharedAccessKeyName=p;\n"
        ))
        .unwrap();
        assert_eq!(cs.host_name(), "127.0.0.1:8443");
    }

    #[test]
    fn errors_name_the_part_and_never_echo_the_key() {
        let cases = [
            ("", "empty"),
            (&format!("SharedAccessKeyName=p;SharedAccessKey={KEY}") as &str, "HostName"),
            (&format!("HostName=h;SharedAccessKey={KEY}"), "SharedAccessKeyName"),
            ("HostName=h;SharedAccessKeyName=p", "SharedAccessKey"),
            ("HostName=h;SharedAccessKeyName=p;SharedAccessKey=", "empty SharedAccessKey"),
            ("HostName=h;SharedAccessKeyName=p;SharedAccessKey=not*base64!", "base64"),
            (&format!("HostName=https://h/x;SharedAccessKeyName=p;SharedAccessKey={KEY}"), "HostName"),
            (&format!("HostName=h;HostName=g;SharedAccessKeyName=p;SharedAccessKey={KEY}"), "more than once"),
            (&format!("HostName=h;SharedAccessKeyName=p;Key={KEY}"), "unknown part"),
            (&format!("HostName=h;SharedAccessKeyName=p;{KEY}"), "unknown part of 44"),
            (&format!("HostName=h;SharedAccessKeyName=p;SharedAccessKey={KEY};garbage"), "no '='"),
            ("HostName=h;SharedAccessKeyName=p;SharedAccessKey=abc;MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3", "no '='"),
        ];
        for (input, needle) in cases {
            let e = ConnectionString::parse(input).unwrap_err().to_string();
            assert!(e.contains(needle), "{input:?} -> {e}");
            assert!(!e.contains(KEY) && !e.contains("MDEyMzQ1"), "{e}");
            assert!(!e.contains("not*base64"), "{e}");
        }
    }

    #[test]
    fn file_is_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cs");
        std::fs::write(
            &p,
            format!("\n  HostName=h;SharedAccessKeyName=p;SharedAccessKey={KEY}  \n\n"),
        )
        .unwrap();
        assert_eq!(ConnectionString::from_file(&p).unwrap().host_name(), "h");
        let e = ConnectionString::from_file(&dir.path().join("missing")).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
