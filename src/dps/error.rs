//! Errors of the DPS client. Service errors carry the HTTP status, the DPS `errorCode`,
//! the `trackingId` and the service's message; callers classify them with
//! [`DpsError::is_retryable`], [`DpsError::retry_after`] and [`DpsError::error_code`].
//! No error may contain the Authorization header, a SAS token or the shared access key.
use std::time::Duration;

use super::connection_string::ConnectionStringError;

/// One error response from the service (`ProvisioningServiceErrorDetails` + headers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceError {
    /// The operation, e.g. `IndividualEnrollment_Get`.
    pub operation: &'static str,
    pub status: u16,
    /// DPS `errorCode` from the body (or the `x-ms-error-code` header).
    pub error_code: Option<u32>,
    pub tracking_id: Option<String>,
    pub message: String,
    /// `Retry-After`, in seconds, when the service sent one.
    pub retry_after: Option<Duration>,
}

impl std::fmt::Display for ServiceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: HTTP {}", self.operation, self.status)?;
        if let Some(c) = self.error_code {
            write!(f, " errorCode {c}")?;
        }
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        if let Some(t) = &self.tracking_id {
            write!(f, " (trackingId {t})")?;
        }
        Ok(())
    }
}

/// How a request failed below HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    Timeout,
    Connect,
    /// Connection reset or closed before a full response.
    Reset,
    Tls,
    Other,
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TransportKind::Timeout => "timed out",
            TransportKind::Connect => "cannot connect",
            TransportKind::Reset => "connection reset",
            TransportKind::Tls => "TLS failure",
            TransportKind::Other => "request failed",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DpsError {
    #[error(transparent)]
    ConnectionString(#[from] ConnectionStringError),
    /// A bad endpoint, CA file or client option; nothing was sent.
    #[error("{0}")]
    Config(String),
    /// The caller asked for something the API cannot do (e.g. a bulk call of 11 items).
    #[error("{0}")]
    InvalidInput(String),
    /// 400.
    #[error("bad request: {0}")]
    BadRequest(ServiceError),
    /// 401 / 403.
    #[error("unauthorized (check the connection string's key and policy name): {0}")]
    Unauthorized(ServiceError),
    /// 404.
    #[error("not found: {0}")]
    NotFound(ServiceError),
    /// 409.
    #[error("already exists: {0}")]
    Conflict(ServiceError),
    /// 412: the If-Match etag is not the record's current etag.
    #[error("etag mismatch (the record changed since it was read): {0}")]
    PreconditionFailed(ServiceError),
    /// 429.
    #[error("throttled: {0}")]
    Throttled(ServiceError),
    /// 5xx.
    #[error("service error: {0}")]
    Server(ServiceError),
    /// Any other non-success status.
    #[error("unexpected response: {0}")]
    Service(ServiceError),
    /// The request did not get a response.
    #[error("{operation}: {kind} talking to {url}: {message}")]
    Transport {
        operation: &'static str,
        kind: TransportKind,
        url: String,
        message: String,
    },
    /// A success response whose body is not what the spec says.
    #[error("{operation}: cannot decode the response: {message}")]
    Decode {
        operation: &'static str,
        message: String,
    },
    /// Retries stopped because the retry budget is spent; `last` is the final error.
    #[error("gave up after {attempts} attempts in {elapsed:?} (retry budget): {last}")]
    RetryBudgetExhausted {
        attempts: u32,
        elapsed: Duration,
        last: Box<DpsError>,
    },
}

impl DpsError {
    /// Build the typed error for a non-success status.
    pub fn from_status(e: ServiceError) -> Self {
        match e.status {
            400 => DpsError::BadRequest(e),
            401 | 403 => DpsError::Unauthorized(e),
            404 => DpsError::NotFound(e),
            409 => DpsError::Conflict(e),
            412 => DpsError::PreconditionFailed(e),
            429 => DpsError::Throttled(e),
            500..=599 => DpsError::Server(e),
            _ => DpsError::Service(e),
        }
    }

    /// The service error behind this error, if the service answered.
    pub fn service(&self) -> Option<&ServiceError> {
        match self {
            DpsError::BadRequest(e)
            | DpsError::Unauthorized(e)
            | DpsError::NotFound(e)
            | DpsError::Conflict(e)
            | DpsError::PreconditionFailed(e)
            | DpsError::Throttled(e)
            | DpsError::Server(e)
            | DpsError::Service(e) => Some(e),
            DpsError::RetryBudgetExhausted { last, .. } => last.service(),
            _ => None,
        }
    }

    /// HTTP status, if the service answered.
    pub fn status(&self) -> Option<u16> {
        self.service().map(|e| e.status)
    }

    /// DPS `errorCode` (e.g. 404201), if the service sent one.
    pub fn error_code(&self) -> Option<u32> {
        self.service().and_then(|e| e.error_code)
    }

    /// `trackingId` of the failed request, if the service sent one.
    pub fn tracking_id(&self) -> Option<&str> {
        self.service().and_then(|e| e.tracking_id.as_deref())
    }

    /// The service's `Retry-After`, if it sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        self.service().and_then(|e| e.retry_after)
    }

    /// 429, 5xx (and 408), timeouts, connection failures and resets: worth retrying.
    pub fn is_retryable(&self) -> bool {
        match self {
            DpsError::Throttled(_) | DpsError::Server(_) => true,
            DpsError::Service(e) => e.status == 408,
            DpsError::Transport { kind, .. } => {
                matches!(
                    kind,
                    TransportKind::Timeout | TransportKind::Connect | TransportKind::Reset
                )
            }
            DpsError::RetryBudgetExhausted { last, .. } => last.is_retryable(),
            _ => false,
        }
    }

    /// True for 404 (no such record).
    pub fn is_not_found(&self) -> bool {
        matches!(self.innermost(), DpsError::NotFound(_))
    }

    /// The last error behind a [`DpsError::RetryBudgetExhausted`], else `self`.
    pub fn innermost(&self) -> &DpsError {
        match self {
            DpsError::RetryBudgetExhausted { last, .. } => last.innermost(),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn se(status: u16) -> ServiceError {
        ServiceError {
            operation: "IndividualEnrollment_Get",
            status,
            error_code: Some(u32::from(status) * 1000 + 201),
            tracking_id: Some("t-1".into()),
            message: "Enrollment not found".into(),
            retry_after: None,
        }
    }

    #[test]
    fn classification() {
        assert!(matches!(
            DpsError::from_status(se(404)),
            DpsError::NotFound(_)
        ));
        assert!(matches!(
            DpsError::from_status(se(412)),
            DpsError::PreconditionFailed(_)
        ));
        assert!(DpsError::from_status(se(429)).is_retryable());
        assert!(DpsError::from_status(se(503)).is_retryable());
        assert!(!DpsError::from_status(se(400)).is_retryable());
        assert!(!DpsError::from_status(se(409)).is_retryable());
        let e = DpsError::from_status(se(404));
        assert_eq!(e.error_code(), Some(404201));
        assert_eq!(e.tracking_id(), Some("t-1"));
        let s = e.to_string();
        assert!(
            s.contains("404201") && s.contains("t-1") && s.contains("Enrollment not found"),
            "{s}"
        );
    }
}
