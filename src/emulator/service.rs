//! The emulator's HTTP surface: the 15 DPS service operations of api-version 2021-10-01
//! (paths matched case-insensitively, trailing slash tolerated), SAS checks, throttling,
//! injected faults, and the unauthenticated `/_emulator/` admin endpoints.
//! Behaviour follows the spec and the recorded real responses in reference/dps-api.md;
//! where the reference is silent the choice is written next to the code.
//! It must never echo a SAS token, the key or certificate text in a response or a log.
//!
//! Choices where the reference records nothing (reference/dps-api.md §9):
//! - PUT of an existing id without `If-Match` → 409 (409201/409202), §7.2 inference;
//!   `If-Match` naming an absent record → 412; `*` creates or overwrites.
//! - Bulk: >10 items → HTTP 400 (400012); `update` with a stale etag and
//!   `updateIfMatchETag` with a missing/stale etag → per-item 412 (412201/412202);
//!   `updateIfMatchETag` of an absent id → per-item 404201/404204; successful items of a
//!   mixed batch are committed and absent from `errors`.
//! - Error codes not recorded anywhere: 400001 api-version, 400002 JSON, 400004 schema,
//!   400011 id, 400012 bulk size, 400013 path/body id, 400014 certificate, 400015 query,
//!   400016 continuation, 400017 attestation; 401002; 404202 registration; 412203
//!   registration etag; 429001 throttled; injected errors `status*1000+1`; the
//!   `bad-id=ID` fault refuses a bulk request naming that id with 400004.
//!   `x-ms-error-code` carries the numeric code.
//! - Defaults: only `provisioningStatus` is filled in; `capabilities` and
//!   `reprovisionPolicy` sent as null stay absent, as in the recorded responses.
use super::faults::{FaultSpec, Faults, Throttle, Verdict};
use super::schema::{self, SchemaError};
use super::store::{Change, Kind, Store};
use super::{sas, x509, Stats};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::Response;
use base64::Engine as _;
use percent_encoding::percent_decode_str;
use rand::Rng;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// Everything the request handlers share.
pub(crate) struct Shared {
    pub host_name: String,
    pub policy: String,
    pub key: Vec<u8>,
    pub store: Mutex<Store>,
    pub faults: Mutex<Faults>,
    pub throttle: Mutex<Throttle>,
    pub stats: Mutex<Stats>,
    pub etag_seq: AtomicU32,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

const JSON_CT: &str = "application/json; charset=utf-8";
/// Page size used when `x-ms-max-item-count` is absent or 0 (reference/dps-api.md §2).
const DEFAULT_PAGE: usize = 100;
/// "Bulk … with maximum of 10 enrollments" (operation summaries in the spec).
const BULK_MAX: usize = 10;

// ---------------------------------------------------------------------------------------
// Error bodies

/// A DPS-shaped error: HTTP status, six-digit `errorCode`, message.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: u32,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: u32, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    fn bad_request(code: u32, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }
}

// 400 sub-codes chosen here (the reference records no 400 codes, §9 item 4).
const E_API_VERSION: u32 = 400001;
const E_JSON: u32 = 400002;
const E_SCHEMA: u32 = 400004;
const E_ID: u32 = 400011;
const E_BULK_SIZE: u32 = 400012;
const E_ID_MISMATCH: u32 = 400013;
const E_CERT: u32 = 400014;
const E_QUERY: u32 = 400015;
const E_CONTINUATION: u32 = 400016;
const E_ATTESTATION: u32 = 400017;

fn tracking_id() -> String {
    let mut rng = rand::thread_rng();
    format!("{:032x}", rng.gen::<u128>())
}

/// `2023-05-19T23:10:42.3915513Z`: UTC with 7 fractional digits, as the service sends.
pub(crate) fn now_utc() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:07}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.nanosecond() / 100
    )
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut resp = Response::new(Body::from(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static(JSON_CT),
    );
    resp
}

fn error_response(e: &ApiError) -> Response {
    let body = json!({
        "errorCode": e.code,
        "trackingId": tracking_id(),
        "message": e.message,
        "timestampUtc": now_utc(),
    });
    let mut resp = json_response(e.status, &body);
    if let Ok(v) = HeaderValue::from_str(&e.code.to_string()) {
        resp.headers_mut().insert("x-ms-error-code", v);
    }
    resp
}

/// A response whose body fails at once: hyper then closes the connection without
/// sending anything, which is what a connection reset looks like to the client.
fn reset_response() -> Response {
    let stream = futures::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "injected connection reset",
        ))
    });
    Response::new(Body::from_stream(stream))
}

// ---------------------------------------------------------------------------------------
// Collections

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coll {
    Enrollments,
    Groups,
}

impl Coll {
    fn kind(self) -> Kind {
        match self {
            Coll::Enrollments => Kind::Enrollment,
            Coll::Groups => Kind::Group,
        }
    }
    fn def(self) -> &'static str {
        match self {
            Coll::Enrollments => "IndividualEnrollment",
            Coll::Groups => "EnrollmentGroup",
        }
    }
    fn id_field(self) -> &'static str {
        match self {
            Coll::Enrollments => "registrationId",
            Coll::Groups => "enrollmentGroupId",
        }
    }
    fn noun(self) -> &'static str {
        match self {
            Coll::Enrollments => "Enrollment",
            Coll::Groups => "EnrollmentGroup",
        }
    }
    fn not_found(self) -> u32 {
        match self {
            Coll::Enrollments => 404201,
            Coll::Groups => 404204,
        }
    }
    fn exists(self) -> u32 {
        match self {
            Coll::Enrollments => 409201,
            Coll::Groups => 409202,
        }
    }
    fn precondition(self) -> u32 {
        match self {
            Coll::Enrollments => 412201,
            Coll::Groups => 412202,
        }
    }
    fn op(self) -> &'static str {
        match self {
            Coll::Enrollments => "IndividualEnrollment",
            Coll::Groups => "EnrollmentGroup",
        }
    }
    fn item_type(self) -> &'static str {
        match self {
            Coll::Enrollments => "Enrollment",
            Coll::Groups => "EnrollmentGroup",
        }
    }
    fn bulk_field(self) -> &'static str {
        match self {
            Coll::Enrollments => "enrollments",
            Coll::Groups => "enrollmentGroups",
        }
    }
    fn bulk_def(self) -> &'static str {
        match self {
            Coll::Enrollments => "BulkEnrollmentOperation",
            Coll::Groups => "BulkEnrollmentGroupOperation",
        }
    }
    fn exists_message(self) -> &'static str {
        // Recorded real per-item errorStatus texts (reference/dps-api.md §7.3).
        match self {
            Coll::Enrollments => "Enrollment already exists.",
            Coll::Groups => "EnrollmentGroup already exists.",
        }
    }
}

/// Registration status of a device that never registered (recorded GET shape, §3).
const REGISTRATION_NOT_FOUND: u32 = 404202;
const REGISTRATION_PRECONDITION: u32 = 412203;

// ---------------------------------------------------------------------------------------
// Routing

#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Item(Coll, String),
    Attestation(Coll, String),
    Query(Coll),
    Bulk(Coll),
    Registration(String),
    RegistrationQuery(String),
}

fn segments(path: &str) -> Vec<String> {
    path.split('/')
        .filter(|s| !s.is_empty())
        .map(|s| percent_decode_str(s).decode_utf8_lossy().into_owned())
        .collect()
}

fn route(segs: &[String]) -> Option<Route> {
    let coll = |s: &str| match s.to_ascii_lowercase().as_str() {
        "enrollments" => Some(Coll::Enrollments),
        "enrollmentgroups" => Some(Coll::Groups),
        _ => None,
    };
    let lower = |i: usize| segs.get(i).map(|s| s.to_ascii_lowercase());
    match segs.len() {
        1 => coll(&segs[0]).map(Route::Bulk),
        2 => {
            if lower(0).as_deref() == Some("registrations") {
                return Some(Route::Registration(segs[1].clone()));
            }
            let c = coll(&segs[0])?;
            if lower(1).as_deref() == Some("query") {
                Some(Route::Query(c))
            } else {
                Some(Route::Item(c, segs[1].clone()))
            }
        }
        3 => {
            if lower(0).as_deref() == Some("registrations") && lower(2).as_deref() == Some("query")
            {
                return Some(Route::RegistrationQuery(segs[1].clone()));
            }
            let c = coll(&segs[0])?;
            (lower(2).as_deref() == Some("attestationmechanism"))
                .then(|| Route::Attestation(c, segs[1].clone()))
        }
        _ => None,
    }
}

/// The spec's operationId for a route and method, or `None` if the method is not allowed.
fn operation(route: &Route, method: &Method) -> Option<String> {
    let name = match (route, method.as_str()) {
        (Route::Item(c, _), "PUT") => format!("{}_CreateOrUpdate", c.op()),
        (Route::Item(c, _), "GET") => format!("{}_Get", c.op()),
        (Route::Item(c, _), "DELETE") => format!("{}_Delete", c.op()),
        (Route::Attestation(c, _), "POST") => format!("{}_GetAttestationMechanism", c.op()),
        (Route::Query(c), "POST") => format!("{}_Query", c.op()),
        (Route::Bulk(c), "POST") => format!("{}_RunBulkOperation", c.op()),
        (Route::Registration(_), "GET") => "DeviceRegistrationState_Get".to_string(),
        (Route::Registration(_), "DELETE") => "DeviceRegistrationState_Delete".to_string(),
        (Route::RegistrationQuery(_), "POST") => "DeviceRegistrationState_Query".to_string(),
        _ => return None,
    };
    Some(name)
}

fn query_param(uri: &Uri, name: &str) -> Option<String> {
    uri.query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode_str(k).decode_utf8_lossy();
        k.eq_ignore_ascii_case(name)
            .then(|| percent_decode_str(v).decode_utf8_lossy().into_owned())
    })
}

/// Any dated version is accepted (SDKs send 2018-04-01 … 2021-10-01, previews too);
/// bodies are validated against 2021-10-01 whatever the version says.
fn api_version_ok(v: &str) -> bool {
    let date = v.strip_suffix("-preview").unwrap_or(v);
    let b = date.as_bytes();
    b.len() == 10
        && b.iter().enumerate().all(|(i, c)| {
            if i == 4 || i == 7 {
                *c == b'-'
            } else {
                c.is_ascii_digit()
            }
        })
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// `If-Match` without the quotes some SDKs add (C# v1 wraps the etag, §5.3).
fn if_match(headers: &HeaderMap) -> Option<String> {
    header(headers, "if-match")
        .map(unquote)
        .filter(|s| !s.is_empty())
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    let s = s.strip_prefix("W/").unwrap_or(s);
    s.strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .unwrap_or(s)
        .to_string()
}

// ---------------------------------------------------------------------------------------
// Entry point

pub(crate) async fn handle(
    State(sh): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let segs = segments(uri.path());
    if segs.first().map(|s| s.eq_ignore_ascii_case("_emulator")) == Some(true) {
        return admin(&sh, &method, &segs[1..], &body);
    }
    lock(&sh.stats).requests += 1;

    // Injected faults act before anything else, like a network or front-end failure.
    let (latency, verdict) = {
        let f = lock(&sh.faults);
        let mut rng = rand::thread_rng();
        let verdict = f.decide(Instant::now(), rng.gen::<f64>(), rng.gen::<f64>());
        (f.latency(), verdict)
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    match verdict {
        Verdict::Reset => {
            tracing::info!(%method, path = uri.path(), "injected fault: connection reset");
            return reset_response();
        }
        Verdict::Error(status) => {
            tracing::info!(%method, path = uri.path(), status, "injected fault: error status");
            let st = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return error_response(&ApiError::new(
                st,
                u32::from(status) * 1000 + 1,
                "Injected fault: the service is temporarily unavailable.",
            ));
        }
        Verdict::Pass => {}
    }

    let resp = match dispatch(&sh, &method, &uri, &headers, &body, &segs) {
        Ok(r) => r,
        Err(e) => error_response(&e),
    };
    tracing::debug!(%method, path = uri.path(), status = resp.status().as_u16(), "request");
    resp
}

fn dispatch(
    sh: &Shared,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
    segs: &[String],
) -> Result<Response, ApiError> {
    let route = route(segs).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            404001,
            format!("No DPS service operation at path {}.", uri.path()),
        )
    })?;
    let op = operation(&route, method).ok_or_else(|| {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            405001,
            format!("Method {method} is not allowed on {}.", uri.path()),
        )
    })?;
    *lock(&sh.stats).by_operation.entry(op).or_insert(0) += 1;

    match query_param(uri, "api-version") {
        Some(v) if api_version_ok(&v) => {}
        Some(v) => {
            return Err(ApiError::bad_request(
                E_API_VERSION,
                format!(
                    "The api-version {v:?} is not a DPS api-version (YYYY-MM-DD, e.g. 2021-10-01)."
                ),
            ))
        }
        None => {
            return Err(ApiError::bad_request(
                E_API_VERSION,
                "The api-version query parameter is required (e.g. api-version=2021-10-01).",
            ))
        }
    }

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if let Err(e) = sas::verify(
        header(headers, "authorization"),
        &sh.host_name,
        &sh.policy,
        &sh.key,
        now,
    ) {
        tracing::info!(reason = %e, "unauthorized request");
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            401002,
            format!("Unauthorized: {e}."),
        ));
    }

    if let Err(secs) = lock(&sh.throttle).admit(Instant::now()) {
        lock(&sh.stats).throttled += 1;
        let mut resp = error_response(&ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            429001,
            format!("Too many requests: the operations-per-minute quota is used up; retry after {secs} s."),
        ));
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, v);
        }
        return Ok(resp);
    }

    match (route, method.as_str()) {
        (Route::Item(c, id), "PUT") => put_item(sh, c, &id, headers, body),
        (Route::Item(c, id), "GET") => get_item(sh, c, &id),
        (Route::Item(c, id), _) => delete_item(sh, c, &id, headers),
        (Route::Attestation(c, id), _) => attestation(sh, c, &id),
        (Route::Query(c), _) => query(sh, c, headers, body),
        (Route::Bulk(c), _) => bulk(sh, c, body),
        (Route::Registration(id), "GET") => get_registration(sh, &id),
        (Route::Registration(id), _) => delete_registration(sh, &id, headers),
        (Route::RegistrationQuery(group), _) => query_registrations(sh, &group, headers),
    }
}

// ---------------------------------------------------------------------------------------
// Normalisation of submitted records

fn strip_nulls(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, strip_nulls(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(strip_nulls).collect()),
        other => other,
    }
}

fn check_id(c: Coll, id: &str, what: &str) -> Result<(), ApiError> {
    crate::dps::RegistrationId::parse(id).map(|_| ()).map_err(|e| {
        let noun = match c {
            Coll::Enrollments => "registration id",
            Coll::Groups => "enrollment group id",
        };
        ApiError::bad_request(
            E_ID,
            format!("{what}: invalid {noun}: {e} (reference: up to 128 of A-Z a-z 0-9 - . _ :, alphanumeric at both ends)"),
        )
    })
}

fn schema_error(e: SchemaError) -> ApiError {
    ApiError::bad_request(
        E_SCHEMA,
        format!("Invalid request body: {}: {}.", e.path, e.message),
    )
}

fn b64_decodes(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .ok()
}

/// Turn a validated request body into the record the service keeps: nulls and read-only
/// fields dropped, `provisioningStatus` defaulted, certificates replaced by their info.
fn normalise(
    c: Coll,
    body: Value,
    existing: Option<&Value>,
    prefix: &str,
) -> Result<Value, ApiError> {
    let Value::Object(mut rec) = strip_nulls(body) else {
        return Err(ApiError::bad_request(
            E_SCHEMA,
            format!("{prefix}: expected an object"),
        ));
    };
    for ro in [
        "registrationState",
        "createdDateTimeUtc",
        "lastUpdatedDateTimeUtc",
        "etag",
    ] {
        rec.remove(ro);
    }
    // Spec default; the recorded service also leaves capabilities/reprovisionPolicy out
    // of its responses when they were sent as null (tpm lifecycle recording, §3).
    rec.entry("provisioningStatus")
        .or_insert_with(|| Value::String("enabled".into()));
    let p = |f: &str| {
        if prefix.is_empty() {
            f.to_string()
        } else {
            format!("{prefix}.{f}")
        }
    };
    let att_err = |m: String| ApiError::bad_request(E_ATTESTATION, m);

    let Some(Value::Object(att)) = rec.get_mut("attestation") else {
        return Err(att_err(format!("{}: is required", p("attestation"))));
    };
    let ty = att
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let old_att = existing.and_then(|e| e.get("attestation"));
    match ty.as_str() {
        "tpm" => {
            if c == Coll::Groups {
                return Err(att_err(format!(
                    "{}: enrollment groups do not support TPM attestation",
                    p("attestation.type")
                )));
            }
            att.retain(|k, _| k == "type" || k == "tpm");
            let Some(Value::Object(tpm)) = att.get("tpm") else {
                return Err(att_err(format!(
                    "{}: is required when type is tpm",
                    p("attestation.tpm")
                )));
            };
            let ek = tpm
                .get("endorsementKey")
                .and_then(Value::as_str)
                .unwrap_or("");
            let bytes = b64_decodes(ek).ok_or_else(|| {
                att_err(format!(
                    "{}: is not base64",
                    p("attestation.tpm.endorsementKey")
                ))
            })?;
            // DESIGN §6: a TPM2B_PUBLIC, i.e. a 2-byte big-endian size then that many bytes.
            let size_ok = bytes.len() > 2
                && usize::from(u16::from_be_bytes([bytes[0], bytes[1]])) == bytes.len() - 2;
            if !size_ok {
                return Err(att_err(format!(
                    "{}: is not a TPM2B_PUBLIC (its 2-byte size prefix does not match its length {})",
                    p("attestation.tpm.endorsementKey"),
                    bytes.len()
                )));
            }
            if let Some(srk) = tpm.get("storageRootKey").and_then(Value::as_str) {
                if b64_decodes(srk).is_none() {
                    return Err(att_err(format!(
                        "{}: is not base64",
                        p("attestation.tpm.storageRootKey")
                    )));
                }
            }
        }
        "x509" => {
            att.retain(|k, _| k == "type" || k == "x509");
            let Some(Value::Object(x)) = att.get_mut("x509") else {
                return Err(att_err(format!(
                    "{}: is required when type is x509",
                    p("attestation.x509")
                )));
            };
            for field in ["clientCertificates", "signingCertificates"] {
                let Some(Value::Object(certs)) = x.get_mut(field) else {
                    continue;
                };
                for slot in ["primary", "secondary"] {
                    let path = p(&format!("attestation.x509.{field}.{slot}"));
                    let Some(Value::Object(entry)) = certs.get_mut(slot) else {
                        continue;
                    };
                    if let Some(text) = entry.get("certificate").and_then(Value::as_str) {
                        let info = x509::certificate_info(text).map_err(|e| {
                            ApiError::bad_request(E_CERT, format!("{path}.certificate: {e}"))
                        })?;
                        *entry = Map::new();
                        entry.insert("info".into(), info);
                    } else if entry.contains_key("info") {
                        // Round trip of a GET (info only): keep what the service stored.
                        let stored = old_att
                            .and_then(|a| a.get("x509"))
                            .and_then(|a| a.get(field))
                            .and_then(|a| a.get(slot))
                            .and_then(|a| a.get("info"))
                            .cloned();
                        if let Some(stored) = stored {
                            entry.insert("info".into(), stored);
                        }
                    } else {
                        return Err(ApiError::bad_request(
                            E_CERT,
                            format!("{path}.certificate: is required"),
                        ));
                    }
                }
            }
            let has = |f: &str| x.get(f).and_then(|v| v.get("primary")).is_some();
            let ok = match c {
                Coll::Enrollments => has("clientCertificates") || has("caReferences"),
                Coll::Groups => has("signingCertificates") || has("caReferences"),
            };
            if !ok {
                let want = match c {
                    Coll::Enrollments => "clientCertificates.primary or caReferences.primary",
                    Coll::Groups => "signingCertificates.primary or caReferences.primary",
                };
                return Err(att_err(format!("{}: needs {want}", p("attestation.x509"))));
            }
        }
        "symmetricKey" => {
            att.retain(|k, _| k == "type" || k == "symmetricKey");
            let old_keys = old_att.and_then(|a| a.get("symmetricKey"));
            let sk = att
                .entry("symmetricKey")
                .or_insert_with(|| Value::Object(Map::new()));
            let Value::Object(sk) = sk else {
                return Err(att_err(format!(
                    "{}: expected an object",
                    p("attestation.symmetricKey")
                )));
            };
            for k in ["primaryKey", "secondaryKey"] {
                match sk.get(k).and_then(Value::as_str) {
                    Some(v) => {
                        let n = b64_decodes(v).map(|b| b.len()).unwrap_or(0);
                        if !(16..=64).contains(&n) {
                            return Err(att_err(format!(
                                "{}: must be base64 of 16 to 64 bytes",
                                p(&format!("attestation.symmetricKey.{k}"))
                            )));
                        }
                    }
                    None => {
                        // The service generates keys it was not given (kept on update).
                        let v = old_keys.and_then(|o| o.get(k)).cloned().unwrap_or_else(|| {
                            let mut b = [0u8; 64];
                            rand::thread_rng().fill(&mut b[..]);
                            Value::String(base64::engine::general_purpose::STANDARD.encode(b))
                        });
                        sk.insert(k.to_string(), v);
                    }
                }
            }
        }
        _ => {
            att.retain(|k, _| k == "type");
        }
    }
    Ok(Value::Object(rec))
}

fn new_etag(sh: &Shared) -> String {
    // base64 of a quoted uuid-like id, like "000019ed-0000-0800-0000-646801f30000" (§3).
    let seq = sh.etag_seq.fetch_add(1, Ordering::Relaxed);
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as u32)
        .unwrap_or(0);
    let inner = format!("\"{seq:08x}-0000-0800-0000-{secs:08x}0000\"");
    base64::engine::general_purpose::STANDARD.encode(inner)
}

/// Stamp etag and timestamps on a normalised record, keeping created time and id casing.
fn stamp(sh: &Shared, c: Coll, mut rec: Value, existing: Option<&Value>) -> Value {
    let now = now_utc();
    if let Value::Object(m) = &mut rec {
        if let Some(old) = existing {
            for f in [c.id_field(), "createdDateTimeUtc"] {
                if let Some(v) = old.get(f) {
                    m.insert(f.to_string(), v.clone());
                }
            }
        } else {
            m.insert("createdDateTimeUtc".into(), Value::String(now.clone()));
        }
        m.insert("lastUpdatedDateTimeUtc".into(), Value::String(now));
        m.insert("etag".into(), Value::String(new_etag(sh)));
    }
    schema::ordered(c.def(), rec)
}

fn etag_of(v: &Value) -> Option<&str> {
    v.get("etag").and_then(Value::as_str)
}

fn persist(store: &mut Store, changes: Vec<Change>) -> Result<(), ApiError> {
    store.commit(changes).map_err(|e| {
        tracing::error!(error = %e, "state file write failed");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            500001,
            "The emulator could not save its state.",
        )
    })
}

fn count_create(sh: &Shared, key: &str) {
    *lock(&sh.stats).creates.entry(key.to_string()).or_insert(0) += 1;
}

fn parse_json(body: &Bytes) -> Result<Value, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            E_JSON,
            "The request body is required.",
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(E_JSON, format!("The request body is not valid JSON: {e}."))
    })
}

// ---------------------------------------------------------------------------------------
// Single-record operations

fn put_item(
    sh: &Shared,
    c: Coll,
    id: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    check_id(c, id, "path id")?;
    let body = parse_json(body)?;
    schema::validate(c.def(), &body, "").map_err(schema_error)?;
    let body_id = body.get(c.id_field()).and_then(Value::as_str).unwrap_or("");
    if !body_id.eq_ignore_ascii_case(id) {
        return Err(ApiError::bad_request(
            E_ID_MISMATCH,
            format!(
                "{}: {body_id:?} does not match the id in the path {id:?}.",
                c.id_field()
            ),
        ));
    }
    let key = id.to_ascii_lowercase();
    let cond = if_match(headers);
    let mut store = lock(&sh.store);
    let existing = store.get(c.kind(), &key).cloned();
    match (&existing, cond.as_deref()) {
        (None, None) | (None, Some("*")) => {}
        (None, Some(_)) => {
            return Err(ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                c.precondition(),
                format!(
                    "Precondition failed: {} {id:?} does not exist, so If-Match cannot match.",
                    c.noun()
                ),
            ))
        }
        // Reference §7.2 (inference from the recorded bulk `update` → 409201): a PUT without
        // If-Match on an existing id is refused rather than overwriting it.
        (Some(_), None) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                c.exists(),
                format!(
                    "{} (id {id:?}; send If-Match with its etag, or *, to update it)",
                    c.exists_message()
                ),
            ))
        }
        (Some(_), Some("*")) => {}
        (Some(old), Some(tag)) => {
            if etag_of(old) != Some(tag) {
                return Err(ApiError::new(
                    StatusCode::PRECONDITION_FAILED,
                    c.precondition(),
                    format!("Precondition failed: the If-Match etag does not match the current etag of {} {id:?}.", c.noun()),
                ));
            }
        }
    }
    let rec = normalise(c, body, existing.as_ref(), "")?;
    let rec = stamp(sh, c, rec, existing.as_ref());
    persist(&mut store, vec![(c.kind(), key.clone(), Some(rec.clone()))])?;
    drop(store);
    if existing.is_none() {
        count_create(sh, &key);
    }
    Ok(json_response(StatusCode::OK, &rec))
}

fn not_found(c: Coll, id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        c.not_found(),
        format!("{} {id:?} was not found.", c.noun()),
    )
}

fn registration_state_for(store: &Store, rec: &Value, key: &str) -> Value {
    match store
        .get(Kind::Registration, key)
        .and_then(|r| r.get("state"))
    {
        Some(state) => state.clone(),
        None => json!({
            "registrationId": rec.get("registrationId").cloned().unwrap_or(Value::Null),
            "status": "unassigned",
        }),
    }
}

/// GET and query answers hide symmetric keys (`"attestation":{"type":"symmetricKey"}`);
/// only PUT responses and the attestation-mechanism call carry them (symmetric-key
/// group lifecycle recording, Python SDK, 2023-05-19).
fn read_view(mut rec: Value) -> Value {
    if let Some(Value::Object(att)) = rec.get_mut("attestation") {
        att.remove("symmetricKey");
    }
    rec
}

fn get_item(sh: &Shared, c: Coll, id: &str) -> Result<Response, ApiError> {
    let key = id.to_ascii_lowercase();
    let store = lock(&sh.store);
    let mut rec = read_view(
        store
            .get(c.kind(), &key)
            .cloned()
            .ok_or_else(|| not_found(c, id))?,
    );
    if c == Coll::Enrollments {
        let state = registration_state_for(&store, &rec, &key);
        if let Value::Object(m) = &mut rec {
            m.insert("registrationState".into(), state);
        }
        rec = schema::ordered(c.def(), rec);
    }
    Ok(json_response(StatusCode::OK, &rec))
}

fn delete_item(sh: &Shared, c: Coll, id: &str, headers: &HeaderMap) -> Result<Response, ApiError> {
    let key = id.to_ascii_lowercase();
    let mut store = lock(&sh.store);
    let old = store.get(c.kind(), &key).ok_or_else(|| not_found(c, id))?;
    if let Some(tag) = if_match(headers) {
        if tag != "*" && etag_of(old) != Some(tag.as_str()) {
            return Err(ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                c.precondition(),
                format!("Precondition failed: the If-Match etag does not match the current etag of {} {id:?}.", c.noun()),
            ));
        }
    }
    persist(&mut store, vec![(c.kind(), key, None)])?;
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    Ok(resp)
}

fn attestation(sh: &Shared, c: Coll, id: &str) -> Result<Response, ApiError> {
    let key = id.to_ascii_lowercase();
    let store = lock(&sh.store);
    let rec = store.get(c.kind(), &key).ok_or_else(|| not_found(c, id))?;
    let att = rec
        .get("attestation")
        .cloned()
        .unwrap_or_else(|| json!({"type":"none"}));
    Ok(json_response(
        StatusCode::OK,
        &schema::ordered("AttestationMechanism", att),
    ))
}

// ---------------------------------------------------------------------------------------
// Query and paging

fn page_size(headers: &HeaderMap) -> Result<(usize, bool), ApiError> {
    match header(headers, "x-ms-max-item-count") {
        None => Ok((DEFAULT_PAGE, false)),
        Some(v) => {
            let n: i64 = v.trim().parse().map_err(|_| {
                ApiError::bad_request(
                    E_SCHEMA,
                    format!("x-ms-max-item-count: {v:?} is not an integer."),
                )
            })?;
            if n < 0 || n > i64::from(i32::MAX) {
                return Err(ApiError::bad_request(
                    E_SCHEMA,
                    format!("x-ms-max-item-count: {n} is out of range."),
                ));
            }
            Ok((if n == 0 { DEFAULT_PAGE } else { n as usize }, true))
        }
    }
}

fn continuation_after(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(tok) = header(headers, "x-ms-continuation")
        .map(str::trim)
        .filter(|t| !t.is_empty())
    else {
        return Ok(None);
    };
    let bad = || {
        ApiError::bad_request(
            E_CONTINUATION,
            "x-ms-continuation: the continuation token is not valid.",
        )
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(tok)
        .map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    text.strip_prefix("after:")
        .map(|s| Some(s.to_string()))
        .ok_or_else(bad)
}

fn token_for(key: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("after:{key}"))
}

/// Answer one page: items are in key order; a token is returned while more remain.
fn page_response(
    items: Vec<Value>,
    more_after: Option<String>,
    item_type: &str,
    size: Option<usize>,
) -> Response {
    let mut resp = json_response(StatusCode::OK, &Value::Array(items));
    let h = resp.headers_mut();
    h.insert(
        HeaderName::from_static("x-ms-item-type"),
        HeaderValue::from_static(match item_type {
            "Enrollment" => "Enrollment",
            "EnrollmentGroup" => "EnrollmentGroup",
            _ => "DeviceRegistration",
        }),
    );
    if let Some(k) = more_after {
        if let Ok(v) = HeaderValue::from_str(&token_for(&k)) {
            h.insert(HeaderName::from_static("x-ms-continuation"), v);
        }
    }
    if let Some(n) = size {
        if let Ok(v) = HeaderValue::from_str(&n.to_string()) {
            h.insert(HeaderName::from_static("x-ms-max-item-count"), v);
        }
    }
    resp
}

/// The emulator understands `*`, `SELECT *` and `SELECT * FROM <collection>`.
fn query_supported(q: &str, coll: Coll) -> bool {
    let words: Vec<String> = q.split_whitespace().map(str::to_ascii_lowercase).collect();
    let names: &[&str] = match coll {
        Coll::Enrollments => &["enrollments", "c"],
        Coll::Groups => &["enrollmentgroups", "enrollments", "c"],
    };
    match words.as_slice() {
        [star] => star == "*",
        [select, star] => select == "select" && star == "*",
        [select, star, from, name] => {
            select == "select" && star == "*" && from == "from" && names.contains(&name.as_str())
        }
        _ => false,
    }
}

fn query(sh: &Shared, c: Coll, headers: &HeaderMap, body: &Bytes) -> Result<Response, ApiError> {
    let spec = parse_json(body)?;
    schema::validate("QuerySpecification", &spec, "").map_err(schema_error)?;
    let q = spec.get("query").and_then(Value::as_str).unwrap_or("");
    if !query_supported(q, c) {
        return Err(ApiError::bad_request(
            E_QUERY,
            format!("query: {q:?} is not supported by the emulator (use \"SELECT *\" or \"SELECT * FROM {}\").", c.bulk_field()),
        ));
    }
    let (size, echoed) = page_size(headers)?;
    let after = continuation_after(headers)?;
    let store = lock(&sh.store);
    let mut iter = store.range_after(c.kind(), after.as_deref());
    let mut items = Vec::new();
    let mut last = None;
    for (k, v) in iter.by_ref().take(size) {
        items.push(read_view(v.clone()));
        last = Some(k.clone());
    }
    let more = if iter.next().is_some() { last } else { None };
    Ok(page_response(
        items,
        more,
        c.item_type(),
        echoed.then_some(size),
    ))
}

// ---------------------------------------------------------------------------------------
// Bulk

fn item_error(c: Coll, id: &str, code: u32, status: impl Into<String>) -> Value {
    let mut m = Map::new();
    m.insert(c.id_field().into(), Value::String(id.to_string()));
    m.insert("errorCode".into(), json!(code));
    m.insert("errorStatus".into(), Value::String(status.into()));
    Value::Object(m)
}

fn bulk(sh: &Shared, c: Coll, body: &Bytes) -> Result<Response, ApiError> {
    let op = parse_json(body)?;
    let Value::Object(obj) = &op else {
        return Err(ApiError::bad_request(
            E_SCHEMA,
            format!(
                "Invalid request body: body: expected a {} object.",
                c.bulk_def()
            ),
        ));
    };
    // Top-level shape only; items are checked one by one below (per-item 400).
    let mode = match obj.get("mode") {
        Some(Value::String(m)) if ["create", "update", "updateIfMatchETag", "delete"].contains(&m.as_str()) => m.clone(),
        Some(Value::String(m)) => {
            return Err(ApiError::bad_request(E_SCHEMA, format!(
                "Invalid request body: mode: {m:?} is not one of create, update, updateIfMatchETag, delete."
            )))
        }
        _ => return Err(ApiError::bad_request(E_SCHEMA, "Invalid request body: mode: is required.")),
    };
    let items = match obj.get(c.bulk_field()) {
        Some(Value::Array(a)) => a,
        _ => {
            return Err(ApiError::bad_request(
                E_SCHEMA,
                format!(
                    "Invalid request body: {}: is required and must be an array.",
                    c.bulk_field()
                ),
            ))
        }
    };
    if items.len() > BULK_MAX {
        return Err(ApiError::bad_request(
            E_BULK_SIZE,
            format!(
                "{}: {} items; a bulk operation takes at most {BULK_MAX}.",
                c.bulk_field(),
                items.len()
            ),
        ));
    }

    // Injected `bad-id=ID` fault: the whole request is refused with one 400 naming the item,
    // the way DPS refuses a body it cannot take as a whole (nothing of it is applied).
    {
        let faults = lock(&sh.faults);
        let bad = items.iter().enumerate().find_map(|(i, item)| {
            item.get(c.id_field())
                .and_then(Value::as_str)
                .filter(|id| faults.is_bad_id(id))
                .map(|id| (i, id.to_string()))
        });
        if let Some((i, id)) = bad {
            tracing::info!(%id, "injected fault: bulk request refused as a whole (bad-id)");
            return Err(ApiError::bad_request(
                E_SCHEMA,
                format!(
                    "Invalid request body: {}[{i}].{}: {id:?} is refused (injected fault bad-id).",
                    c.bulk_field(),
                    c.id_field()
                ),
            ));
        }
    }

    let mut errors = Vec::new();
    let mut store = lock(&sh.store);
    // Changes of earlier items in this request, so later items see them.
    let mut pending: HashMap<String, Option<Value>> = HashMap::new();
    let mut changes: Vec<Change> = Vec::new();
    let mut created: Vec<String> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let prefix = format!("{}[{i}]", c.bulk_field());
        let id = item
            .get(c.id_field())
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let validated = if mode == "delete" {
            match item.get(c.id_field()) {
                Some(Value::String(_)) => Ok(()),
                _ => Err(ApiError::bad_request(
                    E_SCHEMA,
                    format!("{prefix}.{}: is required", c.id_field()),
                )),
            }
        } else {
            schema::validate(c.def(), item, &prefix)
                .map_err(|e| ApiError::bad_request(E_SCHEMA, format!("{}: {}", e.path, e.message)))
        };
        if let Err(e) = validated.and_then(|_| check_id(c, &id, &prefix)) {
            errors.push(item_error(c, &id, e.code, e.message));
            continue;
        }
        let key = id.to_ascii_lowercase();
        let existing: Option<Value> = match pending.get(&key) {
            Some(v) => v.clone(),
            None => store.get(c.kind(), &key).cloned(),
        };
        let item_etag = item.get("etag").and_then(Value::as_str).map(unquote);
        let mismatch = |old: &Value| match item_etag.as_deref() {
            Some("*") => false,
            Some(t) => etag_of(old) != Some(t),
            None => true,
        };
        let precondition = || {
            item_error(
                c,
                &id,
                c.precondition(),
                format!(
                    "Precondition failed: etag mismatch for {} {id:?}.",
                    c.noun()
                ),
            )
        };
        let not_found_err =
            || item_error(c, &id, c.not_found(), format!("{} not found.", c.noun()));

        if mode == "delete" {
            match &existing {
                None => errors.push(not_found_err()),
                Some(old) if item_etag.is_some() && mismatch(old) => errors.push(precondition()),
                Some(_) => {
                    pending.insert(key.clone(), None);
                    changes.push((c.kind(), key, None));
                }
            }
            continue;
        }
        // create / update / updateIfMatchETag (reference §7.3 for recorded outcomes).
        let allowed = match (mode.as_str(), &existing) {
            ("create", Some(_)) => Err(item_error(c, &id, c.exists(), c.exists_message())),
            ("create", None) => Ok(()),
            ("update", Some(_)) if item_etag.is_none() => {
                Err(item_error(c, &id, c.exists(), c.exists_message()))
            }
            ("update", Some(old)) => {
                if mismatch(old) {
                    Err(precondition())
                } else {
                    Ok(())
                }
            }
            ("update", None) => Ok(()),
            (_, Some(old)) => {
                if mismatch(old) {
                    Err(precondition())
                } else {
                    Ok(())
                }
            }
            (_, None) => Err(not_found_err()),
        };
        if let Err(e) = allowed {
            errors.push(e);
            continue;
        }
        let rec = match normalise(c, item.clone(), existing.as_ref(), &prefix) {
            Ok(r) => stamp(sh, c, r, existing.as_ref()),
            Err(e) => {
                errors.push(item_error(c, &id, e.code, e.message));
                continue;
            }
        };
        if existing.is_none() {
            created.push(key.clone());
        }
        pending.insert(key.clone(), Some(rec.clone()));
        changes.push((c.kind(), key, Some(rec)));
    }
    persist(&mut store, changes)?;
    drop(store);
    for k in created {
        count_create(sh, &k);
    }
    let result = json!({"errors": errors, "isSuccessful": errors.is_empty()});
    Ok(json_response(StatusCode::OK, &result))
}

// ---------------------------------------------------------------------------------------
// Device registration states

fn registration_not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        REGISTRATION_NOT_FOUND,
        format!("Device registration {id:?} was not found."),
    )
}

fn get_registration(sh: &Shared, id: &str) -> Result<Response, ApiError> {
    let store = lock(&sh.store);
    let state = store
        .get(Kind::Registration, &id.to_ascii_lowercase())
        .and_then(|r| r.get("state"))
        .cloned()
        .ok_or_else(|| registration_not_found(id))?;
    Ok(json_response(StatusCode::OK, &state))
}

fn delete_registration(sh: &Shared, id: &str, headers: &HeaderMap) -> Result<Response, ApiError> {
    let key = id.to_ascii_lowercase();
    let mut store = lock(&sh.store);
    let rec = store
        .get(Kind::Registration, &key)
        .ok_or_else(|| registration_not_found(id))?;
    if let Some(tag) = if_match(headers) {
        let current = rec.get("state").and_then(etag_of);
        if tag != "*" && current != Some(tag.as_str()) {
            return Err(ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                REGISTRATION_PRECONDITION,
                format!("Precondition failed: the If-Match etag does not match device registration {id:?}."),
            ));
        }
    }
    persist(&mut store, vec![(Kind::Registration, key, None)])?;
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    Ok(resp)
}

fn query_registrations(
    sh: &Shared,
    group: &str,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    check_id(Coll::Groups, group, "path id")?;
    let (size, echoed) = page_size(headers)?;
    let after = continuation_after(headers)?;
    let store = lock(&sh.store);
    let mut iter = store
        .range_after(Kind::Registration, after.as_deref())
        .filter(|(_, r)| {
            r.get("enrollmentGroupId")
                .and_then(Value::as_str)
                .is_some_and(|g| g.eq_ignore_ascii_case(group))
        });
    let mut items = Vec::new();
    let mut last = None;
    for (k, v) in iter.by_ref().take(size) {
        items.push(v.get("state").cloned().unwrap_or(Value::Null));
        last = Some(k.clone());
    }
    let more = if iter.next().is_some() { last } else { None };
    Ok(page_response(
        items,
        more,
        "DeviceRegistration",
        echoed.then_some(size),
    ))
}

// ---------------------------------------------------------------------------------------
// Admin endpoints (no auth; not part of DPS)

fn admin(sh: &Shared, method: &Method, segs: &[String], body: &Bytes) -> Response {
    let text = String::from_utf8_lossy(body).trim().to_string();
    let seg0 = segs.first().map(|s| s.to_ascii_lowercase());
    let bad = |m: String| error_response(&ApiError::bad_request(400000, m));
    match (method.as_str(), seg0.as_deref(), segs.len()) {
        ("GET", Some("stats"), 1) => {
            let stats = lock(&sh.stats).clone();
            json_response(
                StatusCode::OK,
                &serde_json::to_value(stats).unwrap_or(Value::Null),
            )
        }
        ("PUT", Some("faults"), 1) => match FaultSpec::parse(&text) {
            Ok(spec) => {
                *lock(&sh.faults) = Faults::new(spec);
                json_response(StatusCode::OK, &json!({"faults": text}))
            }
            Err(e) => bad(e.to_string()),
        },
        ("PUT", Some("ops-per-minute"), 1) => {
            let limit = if text.is_empty() {
                None
            } else {
                match text.parse::<u32>() {
                    Ok(n) => Some(n),
                    Err(_) => {
                        return bad(format!("ops-per-minute: {text:?} is not a whole number"))
                    }
                }
            };
            lock(&sh.throttle).set_limit(limit);
            json_response(StatusCode::OK, &json!({"opsPerMinute": limit}))
        }
        ("PUT", Some("registrations"), 2) => match seed_registration(sh, &segs[1], body) {
            Ok(v) => json_response(StatusCode::OK, &v),
            Err(e) => error_response(&e),
        },
        _ => error_response(&ApiError::new(
            StatusCode::NOT_FOUND,
            404001,
            "Unknown emulator admin endpoint.",
        )),
    }
}

/// Seed a device registration state (as if the device had registered). The body is a
/// `DeviceRegistrationState`, plus an optional `enrollmentGroupId` naming its group.
fn seed_registration(sh: &Shared, id: &str, body: &Bytes) -> Result<Value, ApiError> {
    check_id(Coll::Enrollments, id, "path id")?;
    let mut v = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        parse_json(body)?
    };
    let Value::Object(m) = &mut v else {
        return Err(ApiError::bad_request(E_SCHEMA, "body: expected an object"));
    };
    let group = m.remove("enrollmentGroupId");
    let now = now_utc();
    m.insert("registrationId".into(), Value::String(id.to_string()));
    m.entry("createdDateTimeUtc")
        .or_insert_with(|| Value::String(now.clone()));
    m.insert("lastUpdatedDateTimeUtc".into(), Value::String(now));
    m.entry("status")
        .or_insert_with(|| Value::String("assigned".into()));
    if m.get("status").and_then(Value::as_str) == Some("assigned") {
        // As the recorded registration (device registration lifecycle recording, §8).
        m.entry("substatus")
            .or_insert_with(|| Value::String("initialAssignment".into()));
    }
    m.insert("etag".into(), Value::String(new_etag(sh)));
    let state = schema::ordered("DeviceRegistrationState", strip_nulls(v));
    let mut rec = json!({"state": state});
    if let (Some(g), Value::Object(r)) = (group, &mut rec) {
        r.insert("enrollmentGroupId".into(), g);
    }
    let mut store = lock(&sh.store);
    persist(
        &mut store,
        vec![(
            Kind::Registration,
            id.to_ascii_lowercase(),
            Some(rec.clone()),
        )],
    )?;
    Ok(rec.get("state").cloned().unwrap_or(Value::Null))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(p: &str) -> Vec<String> {
        segments(p)
    }

    #[test]
    fn routes_ignore_case_and_trailing_slash() {
        assert_eq!(
            route(&segs("/enrollments/")),
            Some(Route::Bulk(Coll::Enrollments))
        );
        assert_eq!(
            route(&segs("/enrollmentgroups/G1/attestationmechanism")),
            Some(Route::Attestation(Coll::Groups, "G1".into()))
        );
        assert_eq!(
            route(&segs("/enrollmentGroups/query")),
            Some(Route::Query(Coll::Groups))
        );
        assert_eq!(
            route(&segs("/Enrollments/Dev%2D1")),
            Some(Route::Item(Coll::Enrollments, "Dev-1".into()))
        );
        assert_eq!(
            route(&segs("/registrations/g/query/")),
            Some(Route::RegistrationQuery("g".into()))
        );
        assert_eq!(route(&segs("/nope")), None);
    }

    #[test]
    fn api_versions() {
        for ok in ["2021-10-01", "2018-04-01", "2025-07-01-preview"] {
            assert!(api_version_ok(ok), "{ok}");
        }
        for bad in ["", "latest", "2021-10", "2021/10/01"] {
            assert!(!api_version_ok(bad), "{bad}");
        }
    }

    #[test]
    fn supported_queries() {
        assert!(query_supported("*", Coll::Enrollments));
        assert!(query_supported("SELECT *", Coll::Enrollments));
        assert!(query_supported(
            "select * from enrollmentGroups",
            Coll::Groups
        ));
        assert!(!query_supported(
            "select * from enrollments where x = 1",
            Coll::Enrollments
        ));
    }

    #[test]
    fn timestamps_have_seven_fraction_digits() {
        let t = now_utc();
        let frac = t.split('.').nth(1).unwrap();
        assert_eq!(frac.len(), 8, "{t}");
        assert!(frac.ends_with('Z'));
    }
}
