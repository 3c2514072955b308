//! Bulk operations of any size (individual enrollments and enrollment groups): items are sent in chunks of at most
//! [`MAX_BULK_ITEMS`](super::MAX_BULK_ITEMS) (one request each, ⌈n/10⌉ requests), and the
//! per-item results are merged into one `{"isSuccessful":…,"errors":[…]}` report plus a
//! per-item outcome list. A chunk whose request fails as a whole gives each of its items
//! that error; after a failure that is not about the chunk's content (auth, transport,
//! retry budget), the remaining chunks are not sent and are reported as such.
//! This module must never retry on its own (the client does) or reorder items.
use super::client::{DpsClient, MAX_BULK_ITEMS};
use super::error::DpsError;
use super::models::{
    BulkEnrollmentGroupOperationError, BulkEnrollmentGroupOperationResult,
    BulkEnrollmentOperationError, BulkEnrollmentOperationResult, EnrollmentGroup, Extra,
    IndividualEnrollment, OperationMode,
};

/// What happened to one item.
#[derive(Debug, Clone, PartialEq)]
pub struct BulkItemOutcome {
    pub registration_id: String,
    /// `None` = succeeded; else the service's (or the chunk's) error.
    pub error: Option<BulkEnrollmentOperationError>,
}

/// The merged result of a chunked bulk operation.
#[derive(Debug, Clone, Default)]
pub struct BulkReport {
    /// The merged wire-shaped report: `isSuccessful` is true iff every item succeeded;
    /// `errors` lists every failed item in input order.
    pub result: BulkEnrollmentOperationResult,
    /// One entry per input item, in input order.
    pub outcomes: Vec<BulkItemOutcome>,
    /// HTTP bulk requests sent.
    pub requests: usize,
}

impl BulkReport {
    pub fn failed(&self) -> usize {
        self.outcomes.iter().filter(|o| o.error.is_some()).count()
    }
    pub fn succeeded(&self) -> usize {
        self.outcomes.len() - self.failed()
    }
}

/// The error code given to items of a chunk that failed as a whole: the DPS errorCode, or
/// HTTP status × 1000, or 0 when the service never answered.
fn chunk_error_code(e: &DpsError) -> i32 {
    e.error_code()
        .and_then(|c| i32::try_from(c).ok())
        .or_else(|| e.status().map(|s| i32::from(s) * 1000))
        .unwrap_or(0)
}

/// Items of one chunk that the service did not name in `errors` succeeded; a whole-request
/// failure is given to each item of the chunk.
type ChunkResult = Result<(bool, Vec<BulkEnrollmentOperationError>), DpsError>;

/// Send `items` in chunks of at most [`MAX_BULK_ITEMS`] through `send` and merge the
/// per-item results (shared by individual enrollments and enrollment groups).
async fn run_chunks<T: Clone, F, Fut>(
    items: &[T],
    id_of: impl Fn(&T) -> &str,
    mut send: F,
    mut progress: impl FnMut(usize),
) -> BulkReport
where
    F: FnMut(Vec<T>) -> Fut,
    Fut: std::future::Future<Output = ChunkResult>,
{
    let mut report = BulkReport::default();
    let mut stop: Option<(i32, String)> = None;
    let mut done = 0;
    for chunk in items.chunks(MAX_BULK_ITEMS) {
        let chunk_result = match &stop {
            Some((code, why)) => Err((*code, why.clone())),
            None => {
                report.requests += 1;
                match send(chunk.to_vec()).await {
                    Ok(r) => Ok(r),
                    Err(e) => {
                        let code = chunk_error_code(&e);
                        let msg = e.to_string();
                        if !matches!(e.innermost(), DpsError::BadRequest(_)) {
                            stop =
                                Some((code, format!("not sent: an earlier chunk failed: {msg}")));
                        }
                        Err((code, msg))
                    }
                }
            }
        };
        for item in chunk {
            let id = id_of(item);
            let error = match &chunk_result {
                Ok((_, errors)) => errors
                    .iter()
                    .find(|er| er.registration_id.eq_ignore_ascii_case(id))
                    .cloned(),
                Err((code, msg)) => Some(BulkEnrollmentOperationError {
                    registration_id: id.to_string(),
                    error_code: *code,
                    error_status: msg.clone(),
                    extra: Extra::new(),
                }),
            };
            report.outcomes.push(BulkItemOutcome {
                registration_id: id.to_string(),
                error,
            });
        }
        // A chunk the service called unsuccessful without naming an item: say so on
        // every item rather than report success.
        if let Ok((false, errors)) = &chunk_result {
            if errors.is_empty() {
                let start = report.outcomes.len() - chunk.len();
                for o in &mut report.outcomes[start..] {
                    o.error = Some(BulkEnrollmentOperationError {
                        registration_id: o.registration_id.clone(),
                        error_code: 0,
                        error_status:
                            "the service reported the chunk unsuccessful without item errors".into(),
                        extra: Extra::new(),
                    });
                }
            }
        }
        done += chunk.len();
        progress(done);
    }
    report.result.errors = report
        .outcomes
        .iter()
        .filter_map(|o| o.error.clone())
        .collect();
    report.result.is_successful = report.result.errors.is_empty();
    report
}

impl BulkReport {
    /// The merged report in the enrollment-group wire shape (`enrollmentGroupId` per
    /// error), for a report made by [`DpsClient::bulk_groups_chunked`].
    pub fn group_result(&self) -> BulkEnrollmentGroupOperationResult {
        BulkEnrollmentGroupOperationResult {
            is_successful: self.result.is_successful,
            errors: self
                .result
                .errors
                .iter()
                .map(|e| BulkEnrollmentGroupOperationError {
                    enrollment_group_id: e.registration_id.clone(),
                    error_code: e.error_code,
                    error_status: e.error_status.clone(),
                    extra: e.extra.clone(),
                })
                .collect(),
            extra: Extra::new(),
        }
    }
}

impl DpsClient {
    /// Run a bulk operation over any number of items, ≤ 10 per request. `progress` is
    /// called after each chunk with the number of items done so far.
    pub async fn bulk_enrollments_chunked(
        &self,
        mode: OperationMode,
        items: &[IndividualEnrollment],
        progress: impl FnMut(usize),
    ) -> BulkReport {
        let send = |chunk: Vec<IndividualEnrollment>| {
            let mode = mode.clone();
            async move {
                self.bulk_enrollments(mode, &chunk)
                    .await
                    .map(|r| (r.is_successful, r.errors))
            }
        };
        run_chunks(items, |e| e.registration_id.as_str(), send, progress).await
    }

    /// Bulk operation over any number of enrollment groups, ≤ 10 per request. The
    /// report's `registration_id`s are the group ids; see [`BulkReport::group_result`].
    pub async fn bulk_groups_chunked(
        &self,
        mode: OperationMode,
        items: &[EnrollmentGroup],
        progress: impl FnMut(usize),
    ) -> BulkReport {
        let send = |chunk: Vec<EnrollmentGroup>| {
            let mode = mode.clone();
            async move {
                self.bulk_groups(mode, &chunk).await.map(|r| {
                    let errors = r
                        .errors
                        .into_iter()
                        .map(|e| BulkEnrollmentOperationError {
                            registration_id: e.enrollment_group_id,
                            error_code: e.error_code,
                            error_status: e.error_status,
                            extra: e.extra,
                        })
                        .collect();
                    (r.is_successful, errors)
                })
            }
        };
        run_chunks(items, |g| g.enrollment_group_id.as_str(), send, progress).await
    }
}
