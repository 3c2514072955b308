//! Validated DPS identifiers: registration ids and enrollment group ids.
//!
//! Rule (reference/dps-api.md §7.1; spec text for `/enrollments/{id}`): 1–128 characters of
//! `[A-Za-z0-9-._:]`, no special character at the start or the end. Ids are matched
//! case-insensitively by the service; ids the station generates are lower case. X.509 ids
//! are also a certificate CN, so they are at most 64 characters.
use std::fmt;

/// Longest registration id the service accepts.
pub const MAX_ID_LEN: usize = 128;
/// Longest id usable as an X.509 subject CN (RFC 5280 ub-common-name).
pub const MAX_X509_ID_LEN: usize = 64;

/// Why an id was refused. The message names the id and the rule it breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("registration id is empty")]
    Empty,
    #[error("registration id {id:?} is {len} characters; the limit is {max}")]
    TooLong { id: String, len: usize, max: usize },
    #[error("registration id {id:?} contains {ch:?} at position {pos}; only A-Z a-z 0-9 - . _ : are allowed")]
    BadChar { id: String, ch: char, pos: usize },
    #[error("registration id {id:?} must start and end with a letter or digit")]
    BadEnd { id: String },
}

/// A registration id (or enrollment group id) that the service will accept.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct RegistrationId(String);

impl RegistrationId {
    /// Validate `s` as a registration id of at most 128 characters.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        Self::parse_with_max(s, MAX_ID_LEN)
    }

    /// Validate `s` as an X.509 registration id (also a CN): at most 64 characters.
    pub fn parse_x509(s: &str) -> Result<Self, IdError> {
        Self::parse_with_max(s, MAX_X509_ID_LEN)
    }

    fn parse_with_max(s: &str, max: usize) -> Result<Self, IdError> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        let len = s.chars().count();
        if len > max {
            return Err(IdError::TooLong {
                id: s.to_string(),
                len,
                max,
            });
        }
        for (pos, ch) in s.chars().enumerate() {
            if !(ch.is_ascii_alphanumeric() || matches!(ch, '-' | '.' | '_' | ':')) {
                return Err(IdError::BadChar {
                    id: s.to_string(),
                    ch,
                    pos,
                });
            }
        }
        let first_ok = s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
        let last_ok = s.chars().last().is_some_and(|c| c.is_ascii_alphanumeric());
        if !first_ok || !last_ok {
            return Err(IdError::BadEnd { id: s.to_string() });
        }
        Ok(RegistrationId(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The service compares ids case-insensitively; so do we.
    pub fn eq_ignore_case(&self, other: &str) -> bool {
        self.0.eq_ignore_ascii_case(other)
    }
}

impl fmt::Display for RegistrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for RegistrationId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl<'de> serde::Deserialize<'de> for RegistrationId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        RegistrationId::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        for ok in [
            "a",
            "board-0001",
            "y5wivfciikcievvnsbpkhzcahwm4chuzx6v4hnqnlqfs3fjf6rxa",
            "A.b_c:d-1",
        ] {
            assert!(RegistrationId::parse(ok).is_ok(), "{ok}");
        }
        assert!(RegistrationId::parse(&"a".repeat(128)).is_ok());
    }

    #[test]
    fn refuses_space_length_and_special_ends() {
        assert!(matches!(
            RegistrationId::parse("has space"),
            Err(IdError::BadChar {
                ch: ' ',
                pos: 3,
                ..
            })
        ));
        assert!(matches!(
            RegistrationId::parse(&"a".repeat(129)),
            Err(IdError::TooLong { len: 129, .. })
        ));
        assert!(matches!(
            RegistrationId::parse("-lead"),
            Err(IdError::BadEnd { .. })
        ));
        assert!(matches!(
            RegistrationId::parse("trail."),
            Err(IdError::BadEnd { .. })
        ));
        assert!(matches!(RegistrationId::parse(""), Err(IdError::Empty)));
        assert!(matches!(
            RegistrationId::parse_x509(&"a".repeat(65)),
            Err(IdError::TooLong { max: 64, .. })
        ));
    }

    #[test]
    fn error_names_the_id() {
        let e = RegistrationId::parse("bad id").unwrap_err().to_string();
        assert!(e.contains("\"bad id\""), "{e}");
    }
}
