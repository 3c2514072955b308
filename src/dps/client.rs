//! The DPS service client: all 15 operations of api-version 2021-10-01 over HTTPS (rustls
//! with the ring provider; native and built-in roots plus an optional extra CA file), SAS
//! authorization, retries with exponential backoff and full jitter that honour
//! `Retry-After` within a time budget, and client-side pacing to a maximum number of
//! operations per minute (one HTTP request = one operation).
//!
//! Endpoint rule (shared contract): without an explicit endpoint, requests go to
//! `https://{HostName}`, or `http://{HostName}` when its host is a loopback address. Plain
//! http to anything else is refused. The SAS `sr` is always the connection string's HostName.
//! This module must never log or return the Authorization header, and knows nothing of
//! stations or boards.
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
use rand::Rng;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, IF_MATCH};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use url::Url;

use super::connection_string::ConnectionString;
use super::error::{DpsError, ServiceError, TransportKind};
use super::models::*;
use super::sas::SasSigner;
use crate::secret::Secret;

/// The api-version this client speaks.
pub const API_VERSION: &str = "2021-10-01";
/// Items per bulk request (spec: "maximum of 10 enrollments").
pub const MAX_BULK_ITEMS: usize = 10;
/// First backoff step and ceiling of the exponential backoff.
const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// No query is allowed to page forever.
const MAX_PAGES: usize = 100_000;

/// Path-segment encoding for ids (validated ids need none, but be safe).
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'\\')
    .add(b'^')
    .add(b'|');

/// How the client reaches the service.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Send requests here instead of the connection string's HostName.
    pub endpoint: Option<String>,
    /// Extra trust anchors (PEM bundle).
    pub ca_file: Option<PathBuf>,
    pub api_version: String,
    /// Per-request timeout (connect + response).
    pub request_timeout: Duration,
    /// Total time one operation may spend retrying; zero = never retry.
    pub retry_budget: Duration,
    /// Client-side pacing: at most this many requests per minute.
    pub max_operations_per_minute: Option<u32>,
    /// DNS overrides: host name → address (the port of the URL is kept).
    pub resolve: Vec<(String, SocketAddr)>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            endpoint: None,
            ca_file: None,
            api_version: API_VERSION.to_string(),
            request_timeout: Duration::from_secs(30),
            retry_budget: Duration::from_secs(300),
            max_operations_per_minute: None,
            resolve: Vec::new(),
        }
    }
}

/// One page of a query.
#[derive(Debug, Clone)]
pub struct QueryPage<T> {
    pub items: Vec<T>,
    /// `x-ms-continuation`: present iff there are more pages.
    pub continuation: Option<String>,
    /// `x-ms-item-type`, e.g. `Enrollment`.
    pub item_type: Option<String>,
}

/// Is this host (name or IP, no port) a loopback address?
pub fn is_loopback_host(host: &url::Host<&str>) -> bool {
    match host {
        url::Host::Ipv4(ip) => ip.is_loopback(),
        url::Host::Ipv6(ip) => ip.is_loopback(),
        url::Host::Domain(d) => d.eq_ignore_ascii_case("localhost"),
    }
}

/// Where requests go, per the endpoint rule (see the module comment).
pub fn resolve_endpoint(host_name: &str, endpoint: Option<&str>) -> Result<Url, DpsError> {
    let url = match endpoint {
        Some(ep) => {
            let u = Url::parse(ep.trim())
                .map_err(|e| DpsError::Config(format!("--endpoint {ep:?} is not a URL: {e}")))?;
            if u.query().is_some() || u.fragment().is_some() {
                return Err(DpsError::Config(format!(
                    "--endpoint {ep:?} must not have a query or fragment"
                )));
            }
            if !u.username().is_empty() || u.password().is_some() {
                return Err(DpsError::Config(
                    "--endpoint must not carry user information".into(),
                ));
            }
            u
        }
        None => {
            let probe = Url::parse(&format!("http://{host_name}/")).map_err(|e| {
                DpsError::Config(format!(
                    "connection string HostName {host_name:?} is not a host name: {e}"
                ))
            })?;
            let loopback = probe.host().as_ref().is_some_and(is_loopback_host);
            let scheme = if loopback { "http" } else { "https" };
            Url::parse(&format!("{scheme}://{host_name}/")).map_err(|e| {
                DpsError::Config(format!(
                    "connection string HostName {host_name:?} is not a host name: {e}"
                ))
            })?
        }
    };
    match url.scheme() {
        "https" => {}
        "http" => {
            let loopback = url.host().as_ref().is_some_and(is_loopback_host);
            if !loopback {
                return Err(DpsError::Config(format!(
                    "refusing plain http to {}: http:// is allowed only for loopback addresses; use https://",
                    url.host_str().unwrap_or("?")
                )));
            }
        }
        other => {
            return Err(DpsError::Config(format!(
                "endpoint scheme {other:?} is not supported; use https:// (or http:// for loopback)"
            )))
        }
    }
    if url.host_str().map_or(true, str::is_empty) {
        return Err(DpsError::Config("endpoint has no host".into()));
    }
    Ok(url)
}

/// Paces requests to at most N per minute (evenly spaced), and holds every request back
/// while the service has asked us to wait (`Retry-After`).
#[derive(Debug)]
struct Gate {
    interval: Option<Duration>,
    next: Mutex<Instant>,
}

impl Gate {
    fn new(per_minute: Option<u32>) -> Self {
        Gate {
            interval: per_minute
                .filter(|n| *n > 0)
                .map(|n| Duration::from_secs(60) / n),
            next: Mutex::new(Instant::now()),
        }
    }

    async fn wait(&self) {
        let slot = {
            let mut next = match self.next.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            let now = Instant::now();
            let slot = (*next).max(now);
            *next = slot + self.interval.unwrap_or(Duration::ZERO);
            slot
        };
        tokio::time::sleep_until(slot.into()).await;
    }

    /// No request before `until`.
    fn hold_until(&self, until: Instant) {
        let mut next = match self.next.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if *next < until {
            *next = until;
        }
    }
}

struct Request<'a> {
    op: &'static str,
    method: Method,
    path: String,
    body: Option<Vec<u8>>,
    if_match: Option<&'a str>,
    page_size: Option<u32>,
    continuation: Option<&'a str>,
}

struct Response {
    headers: HeaderMap,
    body: bytes::Bytes,
}

/// A DPS service API client. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct DpsClient {
    http: reqwest::Client,
    base: Url,
    signer: SasSigner,
    fixed_token: Option<Secret<String>>,
    opts: ClientOptions,
    gate: Gate,
}

impl std::fmt::Debug for DpsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpsClient")
            .field("base", &self.base.as_str())
            .field("signer", &self.signer)
            .finish_non_exhaustive()
    }
}

impl DpsClient {
    /// Build a client. Fails (nothing sent) on a bad endpoint, plain http to a
    /// non-loopback host, or an unreadable / empty CA file.
    pub fn new(cs: ConnectionString, opts: ClientOptions) -> Result<Self, DpsError> {
        let base = resolve_endpoint(cs.host_name(), opts.endpoint.as_deref())?;
        if opts.api_version.trim().is_empty() {
            return Err(DpsError::Config("api_version is empty".into()));
        }
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .user_agent(concat!("dps-station/", env!("CARGO_PKG_VERSION")))
            .timeout(opts.request_timeout)
            .connect_timeout(opts.request_timeout.min(Duration::from_secs(10)))
            .redirect(reqwest::redirect::Policy::none());
        if let Some(path) = &opts.ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                DpsError::Config(format!("cannot read CA file {}: {e}", path.display()))
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                DpsError::Config(format!(
                    "CA file {} is not a PEM bundle: {e}",
                    path.display()
                ))
            })?;
            if certs.is_empty() {
                return Err(DpsError::Config(format!(
                    "CA file {} holds no PEM certificate",
                    path.display()
                )));
            }
            for c in certs {
                b = b.add_root_certificate(c);
            }
        }
        for (host, addr) in &opts.resolve {
            b = b.resolve(host, *addr);
        }
        let http = b
            .build()
            .map_err(|e| DpsError::Config(format!("cannot set up the HTTP client: {e}")))?;
        Ok(DpsClient {
            http,
            base,
            signer: SasSigner::new(cs),
            fixed_token: None,
            gate: Gate::new(opts.max_operations_per_minute),
            opts,
        })
    }

    /// Use this exact Authorization value instead of signing tokens (for tests of expired
    /// or foreign tokens, or a token issued elsewhere).
    pub fn with_sas_token(mut self, token: Secret<String>) -> Self {
        self.fixed_token = Some(token);
        self
    }

    /// Sign SAS tokens valid for `ttl` instead of one hour (renewed when a fifth of it is
    /// left). For tests that watch a token being renewed before it expires.
    pub fn with_sas_ttl(mut self, ttl: Duration) -> Self {
        self.signer = self.signer.with_ttl(ttl);
        self
    }

    /// The base URL requests go to.
    pub fn base_url(&self) -> &Url {
        &self.base
    }

    /// The connection string's HostName (what the SAS token signs).
    pub fn host_name(&self) -> &str {
        self.signer.connection_string().host_name()
    }

    pub fn options(&self) -> &ClientOptions {
        &self.opts
    }

    // ----- individual enrollments -------------------------------------------------------

    /// `PUT /enrollments/{id}` (IndividualEnrollment_CreateOrUpdate). `if_match`: the etag
    /// the record must still have, or `*`.
    pub async fn create_or_update_enrollment(
        &self,
        e: &IndividualEnrollment,
        if_match: Option<&str>,
    ) -> Result<IndividualEnrollment, DpsError> {
        let r = self
            .call(Request {
                op: "IndividualEnrollment_CreateOrUpdate",
                method: Method::PUT,
                path: format!("enrollments/{}", seg(&e.registration_id)),
                body: Some(to_body(e)?),
                if_match,
                page_size: None,
                continuation: None,
            })
            .await?;
        decode("IndividualEnrollment_CreateOrUpdate", &r.body)
    }

    /// `GET /enrollments/{id}` (IndividualEnrollment_Get).
    pub async fn get_enrollment(&self, id: &str) -> Result<IndividualEnrollment, DpsError> {
        let r = self
            .call(simple(
                "IndividualEnrollment_Get",
                Method::GET,
                format!("enrollments/{}", seg(id)),
            ))
            .await?;
        decode("IndividualEnrollment_Get", &r.body)
    }

    /// `DELETE /enrollments/{id}` (IndividualEnrollment_Delete).
    pub async fn delete_enrollment(
        &self,
        id: &str,
        if_match: Option<&str>,
    ) -> Result<(), DpsError> {
        let mut req = simple(
            "IndividualEnrollment_Delete",
            Method::DELETE,
            format!("enrollments/{}", seg(id)),
        );
        req.if_match = if_match;
        self.call(req).await.map(|_| ())
    }

    /// `POST /enrollments/{id}/attestationmechanism`.
    pub async fn enrollment_attestation(&self, id: &str) -> Result<AttestationMechanism, DpsError> {
        let op = "IndividualEnrollment_GetAttestationMechanism";
        let r = self
            .call(simple(
                op,
                Method::POST,
                format!("enrollments/{}/attestationmechanism", seg(id)),
            ))
            .await?;
        decode(op, &r.body)
    }

    /// One page of `POST /enrollments/query`.
    pub async fn query_enrollments_page(
        &self,
        query: &str,
        page_size: Option<u32>,
        continuation: Option<&str>,
    ) -> Result<QueryPage<IndividualEnrollment>, DpsError> {
        self.query_page(
            "IndividualEnrollment_Query",
            "enrollments/query".into(),
            Some(query),
            page_size,
            continuation,
        )
        .await
    }

    /// Every record of `POST /enrollments/query`, following `x-ms-continuation`.
    pub async fn query_enrollments(
        &self,
        query: &str,
        page_size: Option<u32>,
    ) -> Result<Vec<IndividualEnrollment>, DpsError> {
        self.query_all(
            "IndividualEnrollment_Query",
            "enrollments/query".into(),
            Some(query),
            page_size,
        )
        .await
    }

    /// `POST /enrollments` (IndividualEnrollment_RunBulkOperation): ONE request of at most
    /// [`MAX_BULK_ITEMS`] items. See [`DpsClient::bulk_enrollments_chunked`] for more.
    pub async fn bulk_enrollments(
        &self,
        mode: OperationMode,
        items: &[IndividualEnrollment],
    ) -> Result<BulkEnrollmentOperationResult, DpsError> {
        let op = "IndividualEnrollment_RunBulkOperation";
        check_bulk_len(items.len())?;
        let body = serde_json::json!({"enrollments": items, "mode": mode});
        let r = self
            .call(with_body(
                op,
                Method::POST,
                "enrollments".into(),
                to_body(&body)?,
            ))
            .await?;
        decode(op, &r.body)
    }

    // ----- enrollment groups ------------------------------------------------------------

    /// `PUT /enrollmentGroups/{id}` (EnrollmentGroup_CreateOrUpdate).
    pub async fn create_or_update_group(
        &self,
        g: &EnrollmentGroup,
        if_match: Option<&str>,
    ) -> Result<EnrollmentGroup, DpsError> {
        let op = "EnrollmentGroup_CreateOrUpdate";
        let mut req = with_body(
            op,
            Method::PUT,
            format!("enrollmentGroups/{}", seg(&g.enrollment_group_id)),
            to_body(g)?,
        );
        req.if_match = if_match;
        let r = self.call(req).await?;
        decode(op, &r.body)
    }

    /// `GET /enrollmentGroups/{id}`.
    pub async fn get_group(&self, id: &str) -> Result<EnrollmentGroup, DpsError> {
        let op = "EnrollmentGroup_Get";
        let r = self
            .call(simple(
                op,
                Method::GET,
                format!("enrollmentGroups/{}", seg(id)),
            ))
            .await?;
        decode(op, &r.body)
    }

    /// `DELETE /enrollmentGroups/{id}`.
    pub async fn delete_group(&self, id: &str, if_match: Option<&str>) -> Result<(), DpsError> {
        let mut req = simple(
            "EnrollmentGroup_Delete",
            Method::DELETE,
            format!("enrollmentGroups/{}", seg(id)),
        );
        req.if_match = if_match;
        self.call(req).await.map(|_| ())
    }

    /// `POST /enrollmentGroups/{id}/attestationmechanism`.
    pub async fn group_attestation(&self, id: &str) -> Result<AttestationMechanism, DpsError> {
        let op = "EnrollmentGroup_GetAttestationMechanism";
        let r = self
            .call(simple(
                op,
                Method::POST,
                format!("enrollmentGroups/{}/attestationmechanism", seg(id)),
            ))
            .await?;
        decode(op, &r.body)
    }

    /// One page of `POST /enrollmentGroups/query`.
    pub async fn query_groups_page(
        &self,
        query: &str,
        page_size: Option<u32>,
        continuation: Option<&str>,
    ) -> Result<QueryPage<EnrollmentGroup>, DpsError> {
        self.query_page(
            "EnrollmentGroup_Query",
            "enrollmentGroups/query".into(),
            Some(query),
            page_size,
            continuation,
        )
        .await
    }

    /// Every record of `POST /enrollmentGroups/query`.
    pub async fn query_groups(
        &self,
        query: &str,
        page_size: Option<u32>,
    ) -> Result<Vec<EnrollmentGroup>, DpsError> {
        self.query_all(
            "EnrollmentGroup_Query",
            "enrollmentGroups/query".into(),
            Some(query),
            page_size,
        )
        .await
    }

    /// `POST /enrollmentGroups` (EnrollmentGroup_RunBulkOperation): one request, ≤ 10 groups.
    pub async fn bulk_groups(
        &self,
        mode: OperationMode,
        items: &[EnrollmentGroup],
    ) -> Result<BulkEnrollmentGroupOperationResult, DpsError> {
        let op = "EnrollmentGroup_RunBulkOperation";
        check_bulk_len(items.len())?;
        let body = serde_json::json!({"enrollmentGroups": items, "mode": mode});
        let r = self
            .call(with_body(
                op,
                Method::POST,
                "enrollmentGroups".into(),
                to_body(&body)?,
            ))
            .await?;
        decode(op, &r.body)
    }

    // ----- device registration states ---------------------------------------------------

    /// `GET /registrations/{id}`.
    pub async fn get_registration(&self, id: &str) -> Result<DeviceRegistrationState, DpsError> {
        let op = "DeviceRegistrationState_Get";
        let r = self
            .call(simple(
                op,
                Method::GET,
                format!("registrations/{}", seg(id)),
            ))
            .await?;
        decode(op, &r.body)
    }

    /// `DELETE /registrations/{id}`.
    pub async fn delete_registration(
        &self,
        id: &str,
        if_match: Option<&str>,
    ) -> Result<(), DpsError> {
        let mut req = simple(
            "DeviceRegistrationState_Delete",
            Method::DELETE,
            format!("registrations/{}", seg(id)),
        );
        req.if_match = if_match;
        self.call(req).await.map(|_| ())
    }

    /// One page of `POST /registrations/{groupId}/query` (no body).
    pub async fn query_registrations_page(
        &self,
        group_id: &str,
        page_size: Option<u32>,
        continuation: Option<&str>,
    ) -> Result<QueryPage<DeviceRegistrationState>, DpsError> {
        self.query_page(
            "DeviceRegistrationState_Query",
            format!("registrations/{}/query", seg(group_id)),
            None,
            page_size,
            continuation,
        )
        .await
    }

    /// Every registration state of an enrollment group.
    pub async fn query_registrations(
        &self,
        group_id: &str,
        page_size: Option<u32>,
    ) -> Result<Vec<DeviceRegistrationState>, DpsError> {
        self.query_all(
            "DeviceRegistrationState_Query",
            format!("registrations/{}/query", seg(group_id)),
            None,
            page_size,
        )
        .await
    }

    // ----- plumbing -----------------------------------------------------------------------

    async fn query_page<T: DeserializeOwned>(
        &self,
        op: &'static str,
        path: String,
        query: Option<&str>,
        page_size: Option<u32>,
        continuation: Option<&str>,
    ) -> Result<QueryPage<T>, DpsError> {
        let body = match query {
            Some(q) => Some(to_body(&QuerySpecification::new(q))?),
            None => None,
        };
        let r = self
            .call(Request {
                op,
                method: Method::POST,
                path,
                body,
                if_match: None,
                page_size,
                continuation,
            })
            .await?;
        let items: Vec<T> = decode(op, &r.body)?;
        let header = |name: &str| {
            r.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        Ok(QueryPage {
            items,
            continuation: header("x-ms-continuation"),
            item_type: header("x-ms-item-type"),
        })
    }

    async fn query_all<T: DeserializeOwned>(
        &self,
        op: &'static str,
        path: String,
        query: Option<&str>,
        page_size: Option<u32>,
    ) -> Result<Vec<T>, DpsError> {
        let mut all = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let page: QueryPage<T> = self
                .query_page(op, path.clone(), query, page_size, token.as_deref())
                .await?;
            all.extend(page.items);
            match page.continuation {
                None => return Ok(all),
                Some(next) if Some(&next) == token.as_ref() => {
                    return Err(DpsError::Decode {
                        operation: op,
                        message: "the service returned the same x-ms-continuation twice".into(),
                    })
                }
                Some(next) => token = Some(next),
            }
        }
        Err(DpsError::Decode {
            operation: op,
            message: format!("more than {MAX_PAGES} pages"),
        })
    }

    /// Send with pacing and retries.
    async fn call(&self, req: Request<'_>) -> Result<Response, DpsError> {
        let start = Instant::now();
        let budget = self.opts.retry_budget;
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            self.gate.wait().await;
            let err = match self.send_once(&req).await {
                Ok(r) => return Ok(r),
                Err(e) => e,
            };
            if let Some(ra) = err.retry_after() {
                // The service told every caller to wait, not just this one. Hold later
                // calls only for a wait we are prepared to sit out ourselves: a
                // Retry-After beyond the budget fails this call and must not stall the rest.
                if !budget.is_zero() && ra <= budget {
                    if let Some(until) = Instant::now().checked_add(ra) {
                        self.gate.hold_until(until);
                    }
                }
            }
            if !err.is_retryable() || budget.is_zero() {
                return Err(err);
            }
            let delay = err.retry_after().unwrap_or_else(|| backoff(attempt));
            let elapsed = start.elapsed();
            if elapsed + delay > budget {
                if attempt == 1 {
                    return Err(err);
                }
                return Err(DpsError::RetryBudgetExhausted {
                    attempts: attempt,
                    elapsed,
                    last: Box::new(err),
                });
            }
            tracing::info!(
                operation = req.op,
                attempt,
                delay_ms = delay.as_millis() as u64,
                error = %err,
                "retrying"
            );
            tokio::time::sleep(delay).await;
        }
    }

    fn url(&self, path: &str) -> String {
        let base = self.base.as_str().trim_end_matches('/');
        format!(
            "{base}/{path}?api-version={}",
            utf8_percent_encode(&self.opts.api_version, SEGMENT)
        )
    }

    async fn send_once(&self, req: &Request<'_>) -> Result<Response, DpsError> {
        let url = self.url(&req.path);
        let token = match &self.fixed_token {
            Some(t) => t.clone(),
            None => self.signer.token(),
        };
        let mut auth = HeaderValue::from_str(token.expose())
            .map_err(|_| DpsError::Config("the SAS token is not a valid header value".into()))?;
        auth.set_sensitive(true);
        let mut rb = self
            .http
            .request(req.method.clone(), &url)
            .header(AUTHORIZATION, auth)
            .header(ACCEPT, "application/json");
        if let Some(body) = &req.body {
            rb = rb
                .header(CONTENT_TYPE, "application/json; charset=utf-8")
                .body(body.clone());
        } else if req.method == Method::POST {
            rb = rb.body(Vec::new());
        }
        if let Some(m) = req.if_match {
            let v = HeaderValue::from_str(m).map_err(|_| {
                DpsError::InvalidInput(format!("etag {m:?} is not a valid If-Match value"))
            })?;
            rb = rb.header(IF_MATCH, v);
        }
        if let Some(n) = req.page_size {
            rb = rb.header("x-ms-max-item-count", n.to_string());
        }
        if let Some(c) = req.continuation {
            let v = HeaderValue::from_str(c).map_err(|_| DpsError::Decode {
                operation: req.op,
                message: "x-ms-continuation is not a valid header value".into(),
            })?;
            rb = rb.header("x-ms-continuation", v);
        }
        tracing::debug!(operation = req.op, method = %req.method, url = %url, "request");
        let resp = rb.send().await.map_err(|e| transport(req.op, &url, &e))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp
            .bytes()
            .await
            .map_err(|e| transport(req.op, &url, &e))?;
        tracing::debug!(
            operation = req.op,
            status = status.as_u16(),
            bytes = body.len(),
            "response"
        );
        if status.is_success() {
            return Ok(Response { headers, body });
        }
        Err(DpsError::from_status(service_error(
            req.op, status, &headers, &body,
        )))
    }
}

fn simple(op: &'static str, method: Method, path: String) -> Request<'static> {
    Request {
        op,
        method,
        path,
        body: None,
        if_match: None,
        page_size: None,
        continuation: None,
    }
}

fn with_body(op: &'static str, method: Method, path: String, body: Vec<u8>) -> Request<'static> {
    Request {
        body: Some(body),
        ..simple(op, method, path)
    }
}

fn seg(id: &str) -> String {
    utf8_percent_encode(id, SEGMENT).to_string()
}

fn check_bulk_len(n: usize) -> Result<(), DpsError> {
    if n == 0 || n > MAX_BULK_ITEMS {
        return Err(DpsError::InvalidInput(format!(
            "a bulk request takes 1 to {MAX_BULK_ITEMS} items, not {n}"
        )));
    }
    Ok(())
}

fn to_body<T: Serialize + ?Sized>(v: &T) -> Result<Vec<u8>, DpsError> {
    serde_json::to_vec(v)
        .map_err(|e| DpsError::InvalidInput(format!("cannot encode the request: {e}")))
}

fn decode<T: DeserializeOwned>(op: &'static str, body: &[u8]) -> Result<T, DpsError> {
    serde_json::from_slice(body).map_err(|e| DpsError::Decode {
        operation: op,
        message: e.to_string(),
    })
}

/// Full-jitter exponential backoff: uniform in [0, min(cap, base·2^(attempt-1))], at
/// least 50 ms.
fn backoff(attempt: u32) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let ceiling = exp.min(BACKOFF_CAP);
    let ms = rand::thread_rng().gen_range(0..=ceiling.as_millis() as u64);
    Duration::from_millis(ms.max(50))
}

/// `Retry-After` as delay-seconds (an HTTP-date is not used by DPS; ignored).
fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<u64>() {
        // Clamp absurd values (a day is far beyond any retry budget) so that no
        // arithmetic on Instants can overflow.
        return Some(Duration::from_secs(secs.min(86_400)));
    }
    v.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0 && *s < 86_400.0)
        .map(Duration::from_secs_f64)
}

fn service_error(
    op: &'static str,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
) -> ServiceError {
    let details: Option<ProvisioningServiceErrorDetails> = serde_json::from_slice(body).ok();
    let header_code = headers
        .get("x-ms-error-code")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<u32>().ok());
    let body_code = details
        .as_ref()
        .and_then(|d| d.error_code)
        .and_then(|c| u32::try_from(c).ok());
    let message = match details.as_ref().and_then(|d| d.message.clone()) {
        Some(m) => m,
        None => {
            // Not a DPS error body: show a short, printable prefix of what came back.
            let text: String = String::from_utf8_lossy(body)
                .chars()
                .filter(|c| !c.is_control())
                .take(200)
                .collect();
            if text.trim().is_empty() {
                status.canonical_reason().unwrap_or("").to_string()
            } else {
                text
            }
        }
    };
    ServiceError {
        operation: op,
        status: status.as_u16(),
        error_code: body_code.or(header_code),
        tracking_id: details.and_then(|d| d.tracking_id),
        message,
        retry_after: parse_retry_after(headers),
    }
}

fn transport(op: &'static str, url: &str, e: &reqwest::Error) -> DpsError {
    let mut kind = if e.is_timeout() {
        TransportKind::Timeout
    } else if e.is_connect() {
        TransportKind::Connect
    } else if e.is_builder() {
        TransportKind::Other
    } else {
        TransportKind::Reset
    };
    // Walk the cause chain: a TLS failure is not worth retrying; the innermost message is
    // the useful one (the outer ones repeat the URL and "error sending request").
    let mut message = String::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.downcast_ref::<rustls::Error>().is_some() {
            kind = TransportKind::Tls;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ) && kind != TransportKind::Tls
            {
                kind = TransportKind::Reset;
            }
        }
        let s = err.to_string();
        if !s.is_empty() {
            message = s;
        }
        // io::Error's `source()` skips the error it wraps; step into it instead.
        cur = match err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    DpsError::Transport {
        operation: op,
        kind,
        url: url.split('?').next().unwrap_or(url).to_string(),
        message,
    }
}

/// Parse a `HOST:ADDR` DNS override (`ADDR` an IP address, optionally with a port that is
/// ignored): `test-dps.azure-devices-provisioning.net:127.0.0.1`.
pub fn parse_resolve(s: &str) -> Result<(String, SocketAddr), String> {
    let (host, addr) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not HOST:ADDR"))?;
    if host.is_empty() {
        return Err(format!("{s:?} has an empty host"));
    }
    let addr = addr.trim();
    let sock = if let Ok(ip) = addr
        .trim_matches(|c| c == '[' || c == ']')
        .parse::<IpAddr>()
    {
        SocketAddr::new(ip, 0)
    } else {
        addr.parse::<SocketAddr>()
            .map_err(|_| format!("{addr:?} in {s:?} is not an IP address"))?
    };
    Ok((host.to_ascii_lowercase(), sock))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_rule() {
        let u = resolve_endpoint("127.0.0.1:8443", None).unwrap();
        assert_eq!(u.as_str(), "http://127.0.0.1:8443/");
        assert_eq!(
            resolve_endpoint("localhost:1", None).unwrap().scheme(),
            "http"
        );
        assert_eq!(resolve_endpoint("[::1]:1", None).unwrap().scheme(), "http");
        let u = resolve_endpoint("mydps.azure-devices-provisioning.net", None).unwrap();
        assert_eq!(u.as_str(), "https://mydps.azure-devices-provisioning.net/");
        // Explicit endpoints: https anywhere, http only to loopback.
        assert!(resolve_endpoint("x", Some("https://example.net:9443")).is_ok());
        assert!(resolve_endpoint("x", Some("http://127.0.0.2:80")).is_ok());
        let e = resolve_endpoint("x", Some("http://example.net"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("loopback"), "{e}");
        assert!(resolve_endpoint("x", Some("http://10.0.0.1:80")).is_err());
        assert!(resolve_endpoint("x", Some("ftp://127.0.0.1")).is_err());
        assert!(resolve_endpoint("x", Some("not a url")).is_err());
    }

    #[test]
    fn backoff_is_bounded_and_jittered() {
        for attempt in 1..40 {
            let d = backoff(attempt);
            assert!(d >= Duration::from_millis(50) && d <= BACKOFF_CAP, "{d:?}");
        }
        let first: Vec<_> = (0..50).map(|_| backoff(1)).collect();
        assert!(first.iter().all(|d| *d <= BACKOFF_BASE));
        assert!(first.windows(2).any(|w| w[0] != w[1]), "no jitter");
    }

    #[test]
    fn retry_after_seconds() {
        let mut h = HeaderMap::new();
        h.insert(reqwest::header::RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(parse_retry_after(&h), Some(Duration::from_secs(7)));
        h.insert(
            reqwest::header::RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(parse_retry_after(&h), None);
    }

    #[test]
    fn error_body_and_header_codes() {
        let mut h = HeaderMap::new();
        h.insert("x-ms-error-code", HeaderValue::from_static("404201"));
        let e = service_error("IndividualEnrollment_Get", StatusCode::NOT_FOUND, &h, b"");
        assert_eq!(e.error_code, Some(404201));
        assert_eq!(e.message, "Not Found");
        let body = br#"{"errorCode":412001,"trackingId":"tr","message":"etag mismatch","timestampUtc":"2023-01-01T00:00:00Z"}"#;
        let e = service_error(
            "op",
            StatusCode::PRECONDITION_FAILED,
            &HeaderMap::new(),
            body,
        );
        assert_eq!(
            (e.error_code, e.tracking_id.as_deref()),
            (Some(412001), Some("tr"))
        );
    }

    #[test]
    fn resolve_overrides() {
        let (h, a) = parse_resolve("Test-DPS.example.net:127.0.0.1").unwrap();
        assert_eq!(h, "test-dps.example.net");
        assert_eq!(a, "127.0.0.1:0".parse().unwrap());
        assert!(parse_resolve("host:nope").is_err());
        assert!(parse_resolve("nohost").is_err());
        assert_eq!(parse_resolve("h:[::1]").unwrap().1.ip().to_string(), "::1");
    }

    #[tokio::test]
    async fn pacing_spaces_requests() {
        let g = Gate::new(Some(600)); // 100 ms apart
        let t = Instant::now();
        for _ in 0..4 {
            g.wait().await;
        }
        let el = t.elapsed();
        assert!(
            el >= Duration::from_millis(290) && el < Duration::from_secs(2),
            "{el:?}"
        );
    }

    #[test]
    fn client_and_its_futures_can_be_shared_across_tasks() {
        fn send_sync<T: Send + Sync>() {}
        fn send_future<F: std::future::Future + Send>(_: F) {}
        send_sync::<DpsClient>();
        let cs = ConnectionString::parse(
            "HostName=127.0.0.1:1;SharedAccessKeyName=p;SharedAccessKey=AAAA",
        )
        .unwrap();
        let c = DpsClient::new(cs, ClientOptions::default()).unwrap();
        assert_eq!(c.base_url().as_str(), "http://127.0.0.1:1/");
        send_future(c.get_enrollment("x"));
        send_future(c.bulk_enrollments(OperationMode::Create, &[]));
        send_future(c.query_enrollments("SELECT *", None));
        send_future(c.bulk_enrollments_chunked(OperationMode::Create, &[], |_| {}));
    }

    #[test]
    fn bulk_size_limits() {
        assert!(check_bulk_len(10).is_ok());
        assert!(check_bulk_len(11).is_err());
        assert!(check_bulk_len(0).is_err());
    }
}
