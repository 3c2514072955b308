//! `enrollment`, `group`, `bulk` and `registration` commands (DESIGN.md §3): every
//! enrollment-management operation of the DPS service API from the command line.
//!
//! Input is validated completely before anything is sent: a bad connection string, id,
//! endorsement key, certificate or bulk file exits 2 with one `error:` line naming the
//! flag, file, line or item. Human output is aligned tables; `--json` prints the wire JSON
//! (one array for queries, one merged report for bulk; `bulk --groups` runs the enrollment
//! group bulk operation). The connection string comes from `--connection-string-file` or
//! `DPS_CONNECTION_STRING`, else from the station config's `[dps]` section when that file
//! exists. Nothing here may print the shared access key, a SAS token or private-key material.
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;
use serde_json::Value;

use super::{CliError, Exit, GlobalOpts};
use crate::dps::bulk::BulkReport;
use crate::dps::client::parse_resolve;
use crate::dps::{
    AllocationPolicy, AttestationMechanism, AttestationType, ClientOptions, ConnectionString,
    CustomAllocationDefinition, DeviceCapabilities, DeviceRegistrationState, DpsClient, DpsError,
    EnrollmentGroup, Extra, IndividualEnrollment, InitialTwin, OperationMode, ProvisioningStatus,
    RegistrationId, TransportKind, TwinCollection,
};

// ----- arguments -----------------------------------------------------------------------

/// Fields shared by individual enrollments and groups (create and update).
#[derive(Debug, Clone, Default, Args)]
pub struct CommonFields {
    /// IoT hub to assign devices to (iotHubHostName).
    #[arg(long = "iot-hub", value_name = "HOST")]
    pub iot_hub: Option<String>,
    /// IoT hubs the allocation policy chooses from (iotHubs), comma-separated.
    #[arg(long = "iot-hubs", value_name = "HOSTS", value_delimiter = ',')]
    pub iot_hubs: Option<Vec<String>>,
    /// enabled | disabled.
    #[arg(long = "provisioning-status", value_name = "STATUS")]
    pub provisioning_status: Option<String>,
    /// Initial twin as JSON: {"tags":{…},"properties":{"desired":{…}}}.
    #[arg(long = "initial-twin", value_name = "JSON")]
    pub initial_twin: Option<String>,
    /// hashed | geoLatency | static | custom.
    #[arg(long = "allocation-policy", value_name = "POLICY")]
    pub allocation_policy: Option<String>,
    /// Custom allocation webhook URL (with --allocation-policy custom).
    #[arg(long = "webhook-url", value_name = "URL")]
    pub webhook_url: Option<String>,
    /// API version of the custom allocation webhook.
    #[arg(
        long = "webhook-api-version",
        value_name = "VERSION",
        requires = "webhook_url"
    )]
    pub webhook_api_version: Option<String>,
    /// IoT Edge device (capabilities.iotEdge); `--edge false` clears it.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub edge: Option<bool>,
}

/// How an individual enrollment attests (at most one; create needs exactly one).
#[derive(Debug, Clone, Default, Args)]
#[group(multiple = false)]
pub struct AttestationArgs {
    /// TPM endorsement key: base64 of TPM2B_PUBLIC (with its 2-byte size prefix).
    #[arg(long = "tpm-ek", value_name = "B64")]
    pub tpm_ek: Option<String>,
    /// File holding the EK: raw TPM2B_PUBLIC bytes or its base64.
    #[arg(long = "tpm-ek-file", value_name = "FILE")]
    pub tpm_ek_file: Option<PathBuf>,
    /// Read the EK from this TPM (tss-esapi TCTI, e.g. swtpm:host=127.0.0.1,port=2321).
    #[arg(long = "tpm-tcti", value_name = "TCTI")]
    pub tpm_tcti: Option<String>,
    /// Device certificate (PEM file); its CN must equal the registration id.
    #[arg(long = "x509-cert", value_name = "PEM")]
    pub x509_cert: Option<PathBuf>,
}

/// If-Match for update and delete.
#[derive(Debug, Clone, Default, Args)]
pub struct ConditionArgs {
    /// Only if the record still has this etag (412 → exit 1 otherwise).
    #[arg(long, value_name = "ETAG", conflicts_with = "force")]
    pub etag: Option<String>,
    /// Unconditional: send `If-Match: *`.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Clone, Args)]
pub struct QueryArgs {
    /// Query; "*" means SELECT * (every record).
    #[arg(long, default_value = "*")]
    pub query: String,
    /// Records per page (x-ms-max-item-count); every page is fetched.
    #[arg(long = "page-size", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub page_size: Option<u32>,
}

#[derive(Debug, Subcommand)]
pub enum EnrollmentCmd {
    /// Create an individual enrollment (TPM or X.509).
    Create {
        /// Registration id (defaults to the certificate CN or the EK's id for --tpm-tcti).
        #[arg(long = "registration-id", value_name = "ID")]
        registration_id: Option<String>,
        /// Desired IoT Hub device id.
        #[arg(long = "device-id", value_name = "ID")]
        device_id: Option<String>,
        #[command(flatten)]
        attestation: AttestationArgs,
        #[command(flatten)]
        fields: CommonFields,
    },
    /// Show one individual enrollment.
    Get { id: String },
    /// Get the latest, change the given fields, put it back with If-Match: <etag>.
    Update {
        id: String,
        #[arg(long = "device-id", value_name = "ID")]
        device_id: Option<String>,
        #[command(flatten)]
        attestation: AttestationArgs,
        #[command(flatten)]
        fields: CommonFields,
        #[command(flatten)]
        cond: ConditionArgs,
    },
    /// Delete one individual enrollment.
    Delete {
        id: String,
        #[command(flatten)]
        cond: ConditionArgs,
    },
    /// List individual enrollments (all pages).
    Query {
        #[command(flatten)]
        q: QueryArgs,
    },
    /// Show an enrollment's attestation mechanism.
    Attestation { id: String },
}

/// How an enrollment group attests.
#[derive(Debug, Clone, Default, Args)]
#[group(multiple = false)]
pub struct GroupAttestationArgs {
    /// Root or intermediate CA certificate (PEM file) → signingCertificates.primary.
    #[arg(long = "x509-ca-cert", value_name = "PEM")]
    pub x509_ca_cert: Option<PathBuf>,
    /// Name of a CA certificate registered in DPS → caReferences.primary.
    #[arg(long = "ca-reference", value_name = "NAME")]
    pub ca_reference: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum GroupCmd {
    /// Create an X.509 enrollment group.
    Create {
        #[arg(long = "group-id", value_name = "ID")]
        group_id: String,
        #[command(flatten)]
        attestation: GroupAttestationArgs,
        #[command(flatten)]
        fields: CommonFields,
    },
    /// Show one enrollment group.
    Get { id: String },
    /// Get the latest, change the given fields, put it back with If-Match: <etag>.
    Update {
        id: String,
        #[command(flatten)]
        attestation: GroupAttestationArgs,
        #[command(flatten)]
        fields: CommonFields,
        #[command(flatten)]
        cond: ConditionArgs,
    },
    /// Delete one enrollment group.
    Delete {
        id: String,
        #[command(flatten)]
        cond: ConditionArgs,
    },
    /// List enrollment groups (all pages).
    Query {
        #[command(flatten)]
        q: QueryArgs,
    },
    /// Show a group's attestation mechanism.
    Attestation { id: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BulkFormat {
    Json,
    Csv,
}

#[derive(Debug, Args)]
#[command(after_help = BULK_HELP)]
pub struct BulkFileArgs {
    /// JSON array of IndividualEnrollment (wire format), or CSV (see below).
    #[arg(long, value_name = "FILE")]
    pub file: PathBuf,
    /// File format (default: csv for a .csv file, else json).
    #[arg(long, value_enum)]
    pub format: Option<BulkFormat>,
    /// The file holds enrollment groups (a JSON array of EnrollmentGroup) instead.
    #[arg(long)]
    pub groups: bool,
}

const BULK_HELP: &str = "\
CSV format: a header row, then one enrollment per line. Columns:
  registrationId       required
  endorsementKey       base64 TPM2B_PUBLIC   } exactly one of these two
  certificateFile      PEM path (relative to the CSV's folder) }
  deviceId, provisioningStatus, iotHubHostName   optional
  tags                 optional JSON object (initialTwin.tags)
With --groups the file is a JSON array of EnrollmentGroup (wire format) instead.
The whole file is checked before anything is sent. Items go in chunks of at most 10.
Exit 0: every item succeeded; 3: some failed; 1: all failed.";

#[derive(Debug, Subcommand)]
pub enum BulkCmd {
    /// Create every enrollment (or group) in the file.
    Create(BulkFileArgs),
    /// Update every enrollment (or group) in the file.
    Update(BulkFileArgs),
    /// Update every enrollment (or group) whose etag (given per item) still matches.
    UpdateIfMatchEtag(BulkFileArgs),
    /// Delete every enrollment (or group) in the file.
    Delete(BulkFileArgs),
}

#[derive(Debug, Subcommand)]
pub enum RegistrationCmd {
    /// Show one device registration state.
    Get { id: String },
    /// Delete one device registration state.
    Delete {
        id: String,
        #[command(flatten)]
        cond: ConditionArgs,
    },
    /// List the registration states of an enrollment group (all pages).
    Query {
        /// Enrollment group id.
        group_id: String,
        #[arg(long = "page-size", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        page_size: Option<u32>,
    },
}

// ----- the client --------------------------------------------------------------------

/// Parse `--retry-budget`: a humantime duration ("5m", "30s") or plain seconds.
fn retry_budget(s: &str) -> Result<Duration, CliError> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| {
        CliError::usage(format!("--retry-budget {s:?} is not a duration ({e})"))
            .with_hint("write e.g. --retry-budget 5m, 30s or 0 (no retries)")
    })
}

/// Build the client from the global options: connection string, endpoint, CA, budget.
/// The connection string comes from `--connection-string-file` or `DPS_CONNECTION_STRING`;
/// when neither is given and the station config file (`--config`) exists, its `[dps]`
/// section is used instead (connection string source, endpoint, CA file, api-version,
/// request timeout and pacing to `max_operations_per_minute`; flags still override).
/// Sends nothing; every problem is a usage error (exit 2).
pub fn client_from(g: &GlobalOpts) -> Result<DpsClient, CliError> {
    let budget = retry_budget(&g.retry_budget)?;
    let mut resolve = Vec::new();
    for r in &g.resolve {
        if r.trim().is_empty() {
            continue;
        }
        resolve
            .push(parse_resolve(r.trim()).map_err(|e| CliError::usage(format!("--resolve: {e}")))?);
    }
    let cs_hint =
        "expected HostName=<dps host>;SharedAccessKeyName=<policy>;SharedAccessKey=<base64 key>";
    let given = g.connection_string_file.is_some()
        || std::env::var_os(crate::dps::connection_string::CONNECTION_STRING_ENV).is_some();
    let cfg = if !given && g.config.is_file() {
        Some(crate::config::load(&g.config).map_err(|e| {
            let err = CliError::usage(e.to_string());
            match e.hint() {
                Some(h) => err.with_hint(h.to_string()),
                None => err,
            }
        })?)
    } else {
        None
    };
    let cs = match &cfg {
        Some(c) => {
            let text = c.read_connection_string().map_err(|e| {
                let err = CliError::usage(format!("{}: {e}", g.config.display()));
                match e.hint() {
                    Some(h) => err.with_hint(h.to_string()),
                    None => err,
                }
            })?;
            ConnectionString::parse(text.expose()).map_err(|e| {
                CliError::usage(format!("{} [dps]: {e}", g.config.display())).with_hint(cs_hint)
            })?
        }
        None => ConnectionString::load(g.connection_string_file.as_deref()).map_err(|e| {
            let err = CliError::usage(e.to_string());
            match e {
                crate::dps::ConnectionStringError::NotGiven => err.with_hint(format!(
                    "or give a station config with a [dps] section (--config; {} does not exist)",
                    g.config.display()
                )),
                crate::dps::ConnectionStringError::File { .. } => err,
                _ => err.with_hint(cs_hint),
            }
        })?,
    };
    let mut opts = ClientOptions {
        endpoint: g.endpoint.clone(),
        ca_file: g.ca_file.clone(),
        retry_budget: budget,
        resolve,
        ..ClientOptions::default()
    };
    if let Some(c) = &cfg {
        if opts.endpoint.is_none() {
            opts.endpoint = c.dps.endpoint.clone();
        }
        if opts.ca_file.is_none() {
            opts.ca_file = c.dps.ca_file.clone();
        }
        opts.api_version = c.dps.api_version.clone();
        opts.request_timeout = c.dps.request_timeout;
        opts.max_operations_per_minute = Some(c.dps.max_operations_per_minute).filter(|n| *n > 0);
    }
    DpsClient::new(cs, opts).map_err(|e| CliError::usage(e.to_string()))
}

/// What the record is, for messages: `enrollment "x"`.
struct Subject<'a> {
    kind: &'static str,
    id: &'a str,
}

/// Map a client error to the user's error: input/config problems exit 2, anything the
/// service or the network said exits 1. Messages never contain the Authorization header.
fn dps_err(e: DpsError, what: &Subject<'_>, if_match: Option<&str>) -> CliError {
    let kind = what.kind;
    let id = what.id;
    match e.innermost() {
        DpsError::Config(_) | DpsError::ConnectionString(_) | DpsError::InvalidInput(_) => {
            return CliError::usage(e.to_string())
        }
        DpsError::NotFound(s) => {
            return CliError::failed(format!(
                "{kind} {id:?} not found (HTTP 404{}{})",
                code_part(s.error_code),
                tracking_part(s.tracking_id.as_deref())
            ))
        }
        DpsError::PreconditionFailed(s) => {
            let cond = match if_match {
                Some("*") | None => "the given condition".to_string(),
                Some(tag) => format!("etag {tag}"),
            };
            return CliError::failed(format!(
                "etag conflict: {kind} {id:?} no longer has {cond}; it was changed by someone else (HTTP 412{}); nothing was changed",
                code_part(s.error_code)
            ))
            .with_hint(format!(
                "read it again (`dps-station {kind} get {id}`) and retry, or pass --force to overwrite"
            ));
        }
        DpsError::Conflict(s) => {
            return CliError::failed(format!(
                "{kind} {id:?} already exists (HTTP 409{}): {}",
                code_part(s.error_code),
                s.message
            ))
            .with_hint(format!("use `dps-station {kind} update {id}` to change it"))
        }
        DpsError::Throttled(s) => {
            let wait = match s.retry_after {
                Some(ra) => format!("the service asked to wait {} s; ", ra.as_secs()),
                None => String::new(),
            };
            return CliError::failed(e.to_string()).with_hint(format!(
                "{wait}raise --retry-budget to wait it out, or try again later"
            ));
        }
        DpsError::Unauthorized(_) => {
            return CliError::failed(e.to_string()).with_hint(
                "check the connection string's SharedAccessKey and SharedAccessKeyName, and this machine's clock",
            )
        }
        DpsError::Transport { kind: TransportKind::Tls, .. } => {
            return CliError::failed(e.to_string())
                .with_hint("if the service uses a private CA, pass it with --ca-file PEM")
        }
        _ => {}
    }
    CliError::failed(e.to_string())
}

fn code_part(c: Option<u32>) -> String {
    c.map(|c| format!(", errorCode {c}")).unwrap_or_default()
}
fn tracking_part(t: Option<&str>) -> String {
    t.map(|t| format!(", trackingId {t}")).unwrap_or_default()
}

fn if_match(c: &ConditionArgs) -> Option<&str> {
    if c.force {
        Some("*")
    } else {
        c.etag.as_deref()
    }
}

/// Validate an id; `what` is the flag (`--group-id`) or the kind (`registration id`,
/// `group id`) named in the error.
fn parse_id(id: &str, what: &str) -> Result<RegistrationId, CliError> {
    RegistrationId::parse(id).map_err(|e| {
        let msg = e.to_string();
        CliError::usage(if what.starts_with("--") {
            format!("{what}: {msg}")
        } else {
            msg.replacen("registration id", what, 1)
        })
    })
}

// ----- input checks --------------------------------------------------------------------

/// Decode a base64 EK and check it is a TPM2B_PUBLIC (2-byte big-endian size equal to the
/// rest). `what` names the flag, file or item in errors.
pub fn check_tpm2b_b64(b64: &str, what: &str) -> Result<Vec<u8>, CliError> {
    let compact: String = b64.chars().filter(|c| !c.is_whitespace()).collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(&compact)
        .map_err(|e| CliError::usage(format!("{what}: the endorsement key is not base64 ({e})")))?;
    check_tpm2b(&bytes, what)?;
    Ok(bytes)
}

/// Check raw bytes are a TPM2B_PUBLIC; a bare TPMT_PUBLIC is refused with a hint.
pub fn check_tpm2b(bytes: &[u8], what: &str) -> Result<(), CliError> {
    if bytes.len() < 4 {
        return Err(CliError::usage(format!(
            "{what}: the endorsement key is {} bytes; a TPM2B_PUBLIC is much longer",
            bytes.len()
        )));
    }
    let size = usize::from(u16::from_be_bytes([bytes[0], bytes[1]]));
    if size == bytes.len() - 2 {
        return Ok(());
    }
    // TPMT_PUBLIC starts with the key type: TPM_ALG_RSA 0x0001 or TPM_ALG_ECC 0x0023.
    let looks_tpmt = matches!(size, 0x0001 | 0x0023);
    let err = CliError::usage(format!(
        "{what}: the endorsement key is not a TPM2B_PUBLIC: its size prefix says {size} bytes but {} follow",
        bytes.len() - 2
    ));
    Err(if looks_tpmt {
        err.with_hint(format!(
            "this looks like a bare TPMT_PUBLIC ({} bytes, no size prefix); DPS wants the TPM2B: prefix it with its 2-byte big-endian length ({:#06x}), or read it with `dps-station ek --tcti …`",
            bytes.len(),
            bytes.len()
        ))
    } else {
        err.with_hint("give base64 of TPM2B_PUBLIC, e.g. the output of `dps-station ek --tcti …`")
    })
}

/// Read an EK file: base64 text or raw TPM2B bytes.
fn read_ek_file(path: &Path) -> Result<String, CliError> {
    let what = format!("--tpm-ek-file {}", path.display());
    let bytes = std::fs::read(path).map_err(|e| CliError::usage(format!("{what}: {e}")))?;
    if let Ok(text) = std::str::from_utf8(&bytes) {
        let t = text.trim();
        if !t.is_empty()
            && t.chars().all(|c| {
                c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '=') || c.is_whitespace()
            })
        {
            let raw = check_tpm2b_b64(t, &what)?;
            return Ok(base64::engine::general_purpose::STANDARD.encode(raw));
        }
    }
    check_tpm2b(&bytes, &what)?;
    Ok(base64::engine::general_purpose::STANDARD.encode(&bytes))
}

/// A certificate read from a PEM file: DER plus the facts we check.
struct Cert {
    der: Vec<u8>,
    cn: Option<String>,
    is_ca: bool,
}

fn parse_cert_der(der: &[u8], what: &str) -> Result<Cert, CliError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| CliError::usage(format!("{what}: not an X.509 certificate ({e})")))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .map(str::to_string);
    let is_ca = cert
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca);
    Ok(Cert {
        der: der.to_vec(),
        cn,
        is_ca,
    })
}

/// Read the first certificate of a PEM file; refuse files that carry a private key.
fn read_pem_cert(path: &Path, what: &str) -> Result<Cert, CliError> {
    let text = std::fs::read(path).map_err(|e| CliError::usage(format!("{what}: {e}")))?;
    let blocks = pem::parse_many(&text)
        .map_err(|e| CliError::usage(format!("{what}: not a PEM file ({e})")))?;
    if blocks.iter().any(|b| b.tag().contains("PRIVATE KEY")) {
        return Err(CliError::usage(format!(
            "{what}: the file holds a private key; give a file with only the certificate"
        ))
        .with_hint("a private key must never be sent to DPS"));
    }
    let first = blocks
        .iter()
        .find(|b| b.tag() == "CERTIFICATE")
        .ok_or_else(|| CliError::usage(format!("{what}: no CERTIFICATE block in the file")))?;
    parse_cert_der(first.contents(), what)
}

/// Check a device certificate against its registration id: CN present, equal
/// (case-insensitively), at most 64 characters.
fn check_leaf_cn(cert: &Cert, id: &str, what: &str) -> Result<(), CliError> {
    let cn = cert.cn.as_deref().ok_or_else(|| {
        CliError::usage(format!(
            "{what}: the certificate has no subject CN; DPS uses the CN as the registration id"
        ))
    })?;
    if cn.chars().count() > crate::dps::ids::MAX_X509_ID_LEN {
        return Err(CliError::usage(format!(
            "{what}: the certificate CN is {} characters; an X.509 registration id is at most 64",
            cn.chars().count()
        )));
    }
    if !cn.eq_ignore_ascii_case(id) {
        return Err(CliError::usage(format!(
            "{what}: the certificate CN {cn:?} differs from the registration id {id:?}"
        ))
        .with_hint("a device presenting this certificate would be refused; use --registration-id equal to the CN"));
    }
    Ok(())
}

/// A certificate given on the wire (PEM text or base64 DER) as DER.
fn wire_cert_der(text: &str, what: &str) -> Result<Vec<u8>, CliError> {
    if text.contains("-----BEGIN") {
        let p = pem::parse(text)
            .map_err(|e| CliError::usage(format!("{what}: bad PEM certificate ({e})")))?;
        Ok(p.contents().to_vec())
    } else {
        let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        base64::engine::general_purpose::STANDARD
            .decode(compact)
            .map_err(|e| {
                CliError::usage(format!(
                    "{what}: certificate is neither PEM nor base64 DER ({e})"
                ))
            })
    }
}

fn b64(der: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(der)
}

/// Apply the common field flags to the optional fields of a record.
struct FieldTargets<'a> {
    iot_hub_host_name: &'a mut Option<String>,
    iot_hubs: &'a mut Option<Vec<String>>,
    provisioning_status: &'a mut Option<ProvisioningStatus>,
    initial_twin: &'a mut Option<InitialTwin>,
    allocation_policy: &'a mut Option<AllocationPolicy>,
    custom_allocation_definition: &'a mut Option<CustomAllocationDefinition>,
    capabilities: &'a mut Option<DeviceCapabilities>,
}

/// Validated field flags, parsed before anything is sent.
struct Fields {
    iot_hub: Option<String>,
    iot_hubs: Option<Vec<String>>,
    provisioning_status: Option<ProvisioningStatus>,
    initial_twin: Option<InitialTwin>,
    allocation_policy: Option<AllocationPolicy>,
    webhook: Option<CustomAllocationDefinition>,
    edge: Option<bool>,
}

fn parse_fields(f: &CommonFields) -> Result<Fields, CliError> {
    let provisioning_status = match &f.provisioning_status {
        None => None,
        Some(s) => Some(ProvisioningStatus::parse_known(s).ok_or_else(|| {
            CliError::usage(format!(
                "--provisioning-status {s:?}: expected enabled or disabled"
            ))
        })?),
    };
    let allocation_policy = match &f.allocation_policy {
        None => None,
        Some(s) => Some(AllocationPolicy::parse_known(s).ok_or_else(|| {
            CliError::usage(format!(
                "--allocation-policy {s:?}: expected one of {}",
                AllocationPolicy::KNOWN.join(", ")
            ))
        })?),
    };
    let initial_twin = match &f.initial_twin {
        None => None,
        Some(s) => {
            let v: Value = serde_json::from_str(s)
                .map_err(|e| CliError::usage(format!("--initial-twin is not JSON: {e}")))?;
            if !v.is_object() {
                return Err(CliError::usage("--initial-twin must be a JSON object")
                    .with_hint(r#"e.g. --initial-twin '{"tags":{"line":"A"},"properties":{"desired":{"interval":30}}}'"#));
            }
            Some(
                serde_json::from_value::<InitialTwin>(v)
                    .map_err(|e| CliError::usage(format!("--initial-twin: {e}")))?,
            )
        }
    };
    if let Some(hubs) = &f.iot_hubs {
        if hubs.iter().any(|h| h.trim().is_empty()) {
            return Err(CliError::usage("--iot-hubs has an empty host name"));
        }
    }
    if let Some(h) = &f.iot_hub {
        if h.trim().is_empty() || h.contains("://") || h.contains('/') {
            return Err(CliError::usage(format!(
                "--iot-hub {h:?}: give the hub's host name, e.g. line-a.azure-devices.net"
            )));
        }
    }
    let webhook = f.webhook_url.as_ref().map(|u| CustomAllocationDefinition {
        webhook_url: u.clone(),
        api_version: f
            .webhook_api_version
            .clone()
            .unwrap_or_else(|| crate::dps::API_VERSION.to_string()),
        extra: Extra::new(),
    });
    if allocation_policy == Some(AllocationPolicy::Custom) && webhook.is_none() {
        return Err(CliError::usage(
            "--allocation-policy custom needs --webhook-url",
        ));
    }
    Ok(Fields {
        iot_hub: f.iot_hub.clone(),
        iot_hubs: f.iot_hubs.clone(),
        provisioning_status,
        initial_twin,
        allocation_policy,
        webhook,
        edge: f.edge,
    })
}

impl Fields {
    fn apply(self, t: FieldTargets<'_>) {
        if let Some(v) = self.iot_hub {
            *t.iot_hub_host_name = Some(v);
        }
        if let Some(v) = self.iot_hubs {
            *t.iot_hubs = Some(v);
        }
        if let Some(v) = self.provisioning_status {
            *t.provisioning_status = Some(v);
        }
        if let Some(v) = self.initial_twin {
            *t.initial_twin = Some(v);
        }
        if let Some(v) = self.allocation_policy {
            *t.allocation_policy = Some(v);
        }
        if let Some(v) = self.webhook {
            *t.custom_allocation_definition = Some(v);
        }
        if let Some(edge) = self.edge {
            match t.capabilities {
                Some(c) => c.iot_edge = edge,
                None => {
                    *t.capabilities = Some(DeviceCapabilities {
                        iot_edge: edge,
                        extra: Extra::new(),
                    })
                }
            }
        }
    }
}

fn targets_enrollment(e: &mut IndividualEnrollment) -> FieldTargets<'_> {
    FieldTargets {
        iot_hub_host_name: &mut e.iot_hub_host_name,
        iot_hubs: &mut e.iot_hubs,
        provisioning_status: &mut e.provisioning_status,
        initial_twin: &mut e.initial_twin,
        allocation_policy: &mut e.allocation_policy,
        custom_allocation_definition: &mut e.custom_allocation_definition,
        capabilities: &mut e.capabilities,
    }
}

fn targets_group(g: &mut EnrollmentGroup) -> FieldTargets<'_> {
    FieldTargets {
        iot_hub_host_name: &mut g.iot_hub_host_name,
        iot_hubs: &mut g.iot_hubs,
        provisioning_status: &mut g.provisioning_status,
        initial_twin: &mut g.initial_twin,
        allocation_policy: &mut g.allocation_policy,
        custom_allocation_definition: &mut g.custom_allocation_definition,
        capabilities: &mut g.capabilities,
    }
}

/// Resolve the attestation flags to a mechanism and (for X.509 / TCTI) a default id.
/// `id` is the registration id given, if any.
async fn enrollment_attestation(
    a: &AttestationArgs,
    id: Option<&str>,
) -> Result<Option<(AttestationMechanism, String)>, CliError> {
    if let Some(ek) = &a.tpm_ek {
        let raw = check_tpm2b_b64(ek, "--tpm-ek")?;
        let id =
            id.ok_or_else(|| CliError::usage("--registration-id is required with --tpm-ek"))?;
        return Ok(Some((AttestationMechanism::tpm(b64(&raw)), id.to_string())));
    }
    if let Some(path) = &a.tpm_ek_file {
        let ek = read_ek_file(path)?;
        let id =
            id.ok_or_else(|| CliError::usage("--registration-id is required with --tpm-ek-file"))?;
        return Ok(Some((AttestationMechanism::tpm(ek), id.to_string())));
    }
    if let Some(path) = &a.x509_cert {
        let what = format!("--x509-cert {}", path.display());
        let cert = read_pem_cert(path, &what)?;
        let id = match id {
            Some(i) => i.to_string(),
            None => cert.cn.clone().ok_or_else(|| {
                CliError::usage(format!(
                    "{what}: the certificate has no subject CN; give --registration-id"
                ))
            })?,
        };
        RegistrationId::parse_x509(&id).map_err(|e| {
            CliError::usage(format!(
                "--registration-id (X.509, at most 64 characters): {e}"
            ))
        })?;
        check_leaf_cn(&cert, &id, &what)?;
        if cert.is_ca {
            return Err(CliError::usage(format!(
                "{what}: this is a CA certificate; an individual enrollment takes the device's own certificate"
            ))
            .with_hint("for a CA, create an enrollment group: `dps-station group create --x509-ca-cert …`"));
        }
        return Ok(Some((
            AttestationMechanism::x509_client(b64(&cert.der)),
            id,
        )));
    }
    if let Some(tcti) = &a.tpm_tcti {
        let req = crate::attest::tpm::EkRequest::new(
            tcti.clone(),
            crate::attest::tpm::EkPolicy::ReadOrCreate,
        );
        // Through a worker, so a TPM that stops answering times out instead of hanging.
        let info = crate::attest::tpm::TpmWorker::spawn("cli")
            .read_ek(req)
            .await
            .map_err(|e| CliError::failed(format!("--tpm-tcti {tcti}: {e}")))?;
        let id = id
            .map(str::to_string)
            .unwrap_or_else(|| info.registration_id.to_string());
        return Ok(Some((AttestationMechanism::tpm(info.ek_b64.clone()), id)));
    }
    Ok(None)
}

// ----- output --------------------------------------------------------------------------

fn print_json<T: Serialize + ?Sized>(v: &T) -> Result<(), CliError> {
    let s = serde_json::to_string_pretty(v)
        .map_err(|e| CliError::failed(format!("cannot print JSON: {e}")))?;
    println!("{s}");
    Ok(())
}

/// Shorten a long value for a human table.
fn short(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let head: String = s.chars().take(max.saturating_sub(1)).collect();
        format!("{head}… ({} chars)", s.chars().count())
    }
}

/// Print rows as an aligned table (first row = header).
fn print_table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0usize; cols];
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                line.push_str(c);
                line.push_str(&" ".repeat(widths[i] - c.chars().count() + 2));
            }
        }
        println!("{}", line.trim_end());
    }
}

/// Flatten a JSON object to `path  value` lines.
fn flatten(prefix: &str, v: &Value, out: &mut Vec<Vec<String>>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&p, v, out);
            }
        }
        Value::String(s) => out.push(vec![prefix.to_string(), short(s, 72)]),
        other => out.push(vec![prefix.to_string(), short(&other.to_string(), 72)]),
    }
}

/// `get` / `attestation` output: the wire object with --json, else aligned key/value lines.
fn print_record<T: Serialize>(g: &GlobalOpts, v: &T) -> Result<(), CliError> {
    if g.json {
        return print_json(v);
    }
    let v = serde_json::to_value(v).map_err(|e| CliError::failed(format!("cannot print: {e}")))?;
    let mut rows = Vec::new();
    flatten("", &v, &mut rows);
    print_table(&rows);
    Ok(())
}

fn attestation_summary(a: &AttestationMechanism) -> String {
    match &a.kind {
        AttestationType::Tpm => "tpm".into(),
        AttestationType::X509 => {
            let x = a.x509.as_ref();
            if x.and_then(|x| x.ca_references.as_ref()).is_some() {
                "x509 (CA reference)".into()
            } else if x.and_then(|x| x.signing_certificates.as_ref()).is_some() {
                "x509 (signing cert)".into()
            } else {
                "x509".into()
            }
        }
        other => other.to_string(),
    }
}

fn opt(s: Option<&str>) -> String {
    s.unwrap_or("-").to_string()
}

fn print_enrollments(g: &GlobalOpts, items: &[IndividualEnrollment]) -> Result<(), CliError> {
    if g.json {
        return print_json(items);
    }
    let mut rows = vec![vec![
        "REGISTRATION ID".to_string(),
        "ATTESTATION".into(),
        "DEVICE ID".into(),
        "PROVISIONING".into(),
        "IOT HUB".into(),
        "STATE".into(),
    ]];
    for e in items {
        rows.push(vec![
            e.registration_id.clone(),
            attestation_summary(&e.attestation),
            opt(e.device_id.as_deref()),
            e.provisioning_status
                .as_ref()
                .map_or("-".into(), |p| p.to_string()),
            opt(e.iot_hub_host_name.as_deref()),
            e.registration_state
                .as_ref()
                .and_then(|r| r.status.as_ref())
                .map_or("-".into(), |s| s.to_string()),
        ]);
    }
    print_table(&rows);
    println!("{} enrollment(s)", items.len());
    Ok(())
}

fn print_groups(g: &GlobalOpts, items: &[EnrollmentGroup]) -> Result<(), CliError> {
    if g.json {
        return print_json(items);
    }
    let mut rows = vec![vec![
        "GROUP ID".to_string(),
        "ATTESTATION".into(),
        "PROVISIONING".into(),
        "IOT HUB".into(),
        "ALLOCATION".into(),
    ]];
    for e in items {
        rows.push(vec![
            e.enrollment_group_id.clone(),
            attestation_summary(&e.attestation),
            e.provisioning_status
                .as_ref()
                .map_or("-".into(), |p| p.to_string()),
            opt(e.iot_hub_host_name.as_deref()),
            e.allocation_policy
                .as_ref()
                .map_or("-".into(), |p| p.to_string()),
        ]);
    }
    print_table(&rows);
    println!("{} group(s)", items.len());
    Ok(())
}

fn print_registrations(g: &GlobalOpts, items: &[DeviceRegistrationState]) -> Result<(), CliError> {
    if g.json {
        return print_json(items);
    }
    let mut rows = vec![vec![
        "REGISTRATION ID".to_string(),
        "STATUS".into(),
        "DEVICE ID".into(),
        "ASSIGNED HUB".into(),
        "ERROR".into(),
    ]];
    for r in items {
        rows.push(vec![
            opt(r.registration_id.as_deref()),
            r.status.as_ref().map_or("-".into(), |s| s.to_string()),
            opt(r.device_id.as_deref()),
            opt(r.assigned_hub.as_deref()),
            match (r.error_code, &r.error_message) {
                (Some(c), Some(m)) => format!("{c} {m}"),
                (Some(c), None) => c.to_string(),
                (None, Some(m)) => m.clone(),
                (None, None) => "-".into(),
            },
        ]);
    }
    print_table(&rows);
    println!("{} registration(s)", items.len());
    Ok(())
}

fn print_done(g: &GlobalOpts, verb: &str, kind: &str, id: &str, etag: Option<&str>) {
    if g.json {
        return;
    }
    match etag {
        Some(t) => println!("{verb} {kind} {id} (etag {t})"),
        None => println!("{verb} {kind} {id}"),
    }
}

fn print_deleted(g: &GlobalOpts, kind: &str, key: &str, id: &str) -> Result<(), CliError> {
    if g.json {
        let mut m = serde_json::Map::new();
        m.insert(key.to_string(), Value::String(id.to_string()));
        m.insert("deleted".into(), Value::Bool(true));
        return print_json(&m);
    }
    println!("deleted {kind} {id}");
    Ok(())
}

/// `*` (or empty) means every record.
fn query_text(q: &str, from: &str) -> String {
    let t = q.trim();
    if t.is_empty() || t == "*" {
        format!("SELECT * FROM {from}")
    } else {
        t.to_string()
    }
}

// ----- commands ----------------------------------------------------------------------

pub async fn enrollment(g: &GlobalOpts, c: EnrollmentCmd) -> Result<Exit, CliError> {
    match c {
        EnrollmentCmd::Create {
            registration_id,
            device_id,
            attestation,
            fields,
        } => {
            if let Some(id) = &registration_id {
                parse_id(id, "--registration-id")?;
            }
            if let Some(d) = &device_id {
                parse_id(d, "--device-id")?;
            }
            let fields = parse_fields(&fields)?;
            let has_att = attestation.tpm_ek.is_some()
                || attestation.tpm_ek_file.is_some()
                || attestation.tpm_tcti.is_some()
                || attestation.x509_cert.is_some();
            if !has_att {
                return Err(CliError::usage(
                    "enrollment create needs one of --tpm-ek, --tpm-ek-file, --tpm-tcti, --x509-cert",
                ));
            }
            // Check everything that needs no network before touching a TPM or DPS.
            let client = client_from(g)?;
            let (mech, id) = enrollment_attestation(&attestation, registration_id.as_deref())
                .await?
                .ok_or_else(|| CliError::usage("no attestation given"))?;
            parse_id(&id, "registration id")?;
            let mut e = IndividualEnrollment::new(id.clone(), mech);
            e.device_id = device_id;
            fields.apply(targets_enrollment(&mut e));
            let subj = Subject {
                kind: "enrollment",
                id: &id,
            };
            let out = client
                .create_or_update_enrollment(&e, None)
                .await
                .map_err(|e| dps_err(e, &subj, None))?;
            if g.json {
                print_json(&out)?;
            }
            print_done(
                g,
                "created",
                "enrollment",
                &out.registration_id,
                out.etag.as_deref(),
            );
            Ok(Exit::Ok)
        }
        EnrollmentCmd::Get { id } => {
            parse_id(&id, "registration id")?;
            let client = client_from(g)?;
            let subj = Subject {
                kind: "enrollment",
                id: &id,
            };
            let e = client
                .get_enrollment(&id)
                .await
                .map_err(|e| dps_err(e, &subj, None))?;
            print_record(g, &e)?;
            Ok(Exit::Ok)
        }
        EnrollmentCmd::Update {
            id,
            device_id,
            attestation,
            fields,
            cond,
        } => {
            parse_id(&id, "registration id")?;
            if let Some(d) = &device_id {
                parse_id(d, "--device-id")?;
            }
            if attestation.tpm_tcti.is_some() {
                return Err(CliError::usage(
                    "--tpm-tcti is for create; to change the EK give --tpm-ek or --tpm-ek-file",
                ));
            }
            let fields = parse_fields(&fields)?;
            let new_att = enrollment_attestation(&attestation, Some(&id)).await?;
            let client = client_from(g)?;
            let subj = Subject {
                kind: "enrollment",
                id: &id,
            };
            let mut e = client
                .get_enrollment(&id)
                .await
                .map_err(|e| dps_err(e, &subj, None))?;
            let condition = if cond.force {
                Some("*".to_string())
            } else {
                cond.etag.clone().or_else(|| e.etag.clone())
            };
            if let Some(d) = device_id {
                e.device_id = Some(d);
            }
            if let Some((mech, _)) = new_att {
                e.attestation = mech;
            }
            fields.apply(targets_enrollment(&mut e));
            let out = client
                .create_or_update_enrollment(&e, condition.as_deref())
                .await
                .map_err(|err| dps_err(err, &subj, condition.as_deref()))?;
            if g.json {
                print_json(&out)?;
            }
            print_done(
                g,
                "updated",
                "enrollment",
                &out.registration_id,
                out.etag.as_deref(),
            );
            Ok(Exit::Ok)
        }
        EnrollmentCmd::Delete { id, cond } => {
            parse_id(&id, "registration id")?;
            let client = client_from(g)?;
            let subj = Subject {
                kind: "enrollment",
                id: &id,
            };
            client
                .delete_enrollment(&id, if_match(&cond))
                .await
                .map_err(|e| dps_err(e, &subj, if_match(&cond)))?;
            print_deleted(g, "enrollment", "registrationId", &id)?;
            Ok(Exit::Ok)
        }
        EnrollmentCmd::Query { q } => {
            let client = client_from(g)?;
            let subj = Subject {
                kind: "enrollment",
                id: "query",
            };
            let items = client
                .query_enrollments(&query_text(&q.query, "enrollments"), q.page_size)
                .await
                .map_err(|e| dps_err(e, &subj, None))?;
            print_enrollments(g, &items)?;
            Ok(Exit::Ok)
        }
        EnrollmentCmd::Attestation { id } => {
            parse_id(&id, "registration id")?;
            let client = client_from(g)?;
            let subj = Subject {
                kind: "enrollment",
                id: &id,
            };
            let a = client
                .enrollment_attestation(&id)
                .await
                .map_err(|e| dps_err(e, &subj, None))?;
            print_record(g, &a)?;
            Ok(Exit::Ok)
        }
    }
}

fn group_attestation(a: &GroupAttestationArgs) -> Result<Option<AttestationMechanism>, CliError> {
    if let Some(path) = &a.x509_ca_cert {
        let what = format!("--x509-ca-cert {}", path.display());
        let cert = read_pem_cert(path, &what)?;
        if !cert.is_ca {
            return Err(CliError::usage(format!(
                "{what}: not a CA certificate (basicConstraints cA is not set)"
            ))
            .with_hint("a group's signing certificate is the root or intermediate CA that issued the devices' certificates"));
        }
        return Ok(Some(AttestationMechanism::x509_signing(b64(&cert.der))));
    }
    if let Some(name) = &a.ca_reference {
        if name.trim().is_empty() {
            return Err(CliError::usage("--ca-reference is empty"));
        }
        return Ok(Some(AttestationMechanism::x509_ca_reference(name.trim())));
    }
    Ok(None)
}

pub async fn group(g: &GlobalOpts, c: GroupCmd) -> Result<Exit, CliError> {
    match c {
        GroupCmd::Create {
            group_id,
            attestation,
            fields,
        } => {
            parse_id(&group_id, "--group-id")?;
            let fields = parse_fields(&fields)?;
            let mech = group_attestation(&attestation)?.ok_or_else(|| {
                CliError::usage("group create needs one of --x509-ca-cert or --ca-reference")
            })?;
            let client = client_from(g)?;
            let mut grp = EnrollmentGroup::new(group_id.clone(), mech);
            fields.apply(targets_group(&mut grp));
            let subj = Subject {
                kind: "group",
                id: &group_id,
            };
            let out = client
                .create_or_update_group(&grp, None)
                .await
                .map_err(|e| dps_err(e, &subj, None))?;
            if g.json {
                print_json(&out)?;
            }
            print_done(
                g,
                "created",
                "group",
                &out.enrollment_group_id,
                out.etag.as_deref(),
            );
            Ok(Exit::Ok)
        }
        GroupCmd::Get { id } => {
            parse_id(&id, "group id")?;
            let client = client_from(g)?;
            let subj = Subject {
                kind: "group",
                id: &id,
            };
            let grp = client
                .get_group(&id)
                .await
                .map_err(|e| dps_err(e, &subj, None))?;
            print_record(g, &grp)?;
            Ok(Exit::Ok)
        }
        GroupCmd::Update {
            id,
            attestation,
            fields,
            cond,
        } => {
            parse_id(&id, "group id")?;
            let fields = parse_fields(&fields)?;
            let new_att = group_attestation(&attestation)?;
            let client = client_from(g)?;
            let subj = Subject {
                kind: "group",
                id: &id,
            };
            let mut grp = client
                .get_group(&id)
                .await
                .map_err(|e| dps_err(e, &subj, None))?;
            let condition = if cond.force {
                Some("*".to_string())
            } else {
                cond.etag.clone().or_else(|| grp.etag.clone())
            };
            if let Some(m) = new_att {
                grp.attestation = m;
            }
            fields.apply(targets_group(&mut grp));
            let out = client
                .create_or_update_group(&grp, condition.as_deref())
                .await
                .map_err(|e| dps_err(e, &subj, condition.as_deref()))?;
            if g.json {
                print_json(&out)?;
            }
            print_done(
                g,
                "updated",
                "group",
                &out.enrollment_group_id,
                out.etag.as_deref(),
            );
            Ok(Exit::Ok)
        }
        GroupCmd::Delete { id, cond } => {
            parse_id(&id, "group id")?;
            let client = client_from(g)?;
            let subj = Subject {
                kind: "group",
                id: &id,
            };
            client
                .delete_group(&id, if_match(&cond))
                .await
                .map_err(|e| dps_err(e, &subj, if_match(&cond)))?;
            print_deleted(g, "group", "enrollmentGroupId", &id)?;
            Ok(Exit::Ok)
        }
        GroupCmd::Query { q } => {
            let client = client_from(g)?;
            let subj = Subject {
                kind: "group",
                id: "query",
            };
            let items = client
                .query_groups(&query_text(&q.query, "enrollmentGroups"), q.page_size)
                .await
                .map_err(|e| dps_err(e, &subj, None))?;
            print_groups(g, &items)?;
            Ok(Exit::Ok)
        }
        GroupCmd::Attestation { id } => {
            parse_id(&id, "group id")?;
            let client = client_from(g)?;
            let subj = Subject {
                kind: "group",
                id: &id,
            };
            let a = client
                .group_attestation(&id)
                .await
                .map_err(|e| dps_err(e, &subj, None))?;
            print_record(g, &a)?;
            Ok(Exit::Ok)
        }
    }
}

pub async fn registration(g: &GlobalOpts, c: RegistrationCmd) -> Result<Exit, CliError> {
    match c {
        RegistrationCmd::Get { id } => {
            parse_id(&id, "registration id")?;
            let client = client_from(g)?;
            let subj = Subject {
                kind: "registration",
                id: &id,
            };
            let r = client
                .get_registration(&id)
                .await
                .map_err(|e| dps_err(e, &subj, None))?;
            print_record(g, &r)?;
            Ok(Exit::Ok)
        }
        RegistrationCmd::Delete { id, cond } => {
            parse_id(&id, "registration id")?;
            let client = client_from(g)?;
            let subj = Subject {
                kind: "registration",
                id: &id,
            };
            client
                .delete_registration(&id, if_match(&cond))
                .await
                .map_err(|e| dps_err(e, &subj, if_match(&cond)))?;
            print_deleted(g, "registration", "registrationId", &id)?;
            Ok(Exit::Ok)
        }
        RegistrationCmd::Query {
            group_id,
            page_size,
        } => {
            parse_id(&group_id, "group id")?;
            let client = client_from(g)?;
            let subj = Subject {
                kind: "group",
                id: &group_id,
            };
            let items = client
                .query_registrations(&group_id, page_size)
                .await
                .map_err(|e| dps_err(e, &subj, None))?;
            print_registrations(g, &items)?;
            Ok(Exit::Ok)
        }
    }
}

// ----- bulk ----------------------------------------------------------------------------

/// Read and validate a whole bulk file. Errors name the file and the item/line and field.
pub fn read_bulk_file(
    path: &Path,
    format: Option<BulkFormat>,
    mode: &OperationMode,
) -> Result<Vec<IndividualEnrollment>, CliError> {
    let fmt = format.unwrap_or_else(|| {
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("csv"))
        {
            BulkFormat::Csv
        } else {
            BulkFormat::Json
        }
    });
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::usage(format!("bulk file {name}: {e}")))?;
    let items = match fmt {
        BulkFormat::Json => parse_bulk_json(&text, &name)?,
        BulkFormat::Csv => {
            let base = path.parent().unwrap_or(Path::new("."));
            parse_bulk_csv(&text, &name, base)?
        }
    };
    if items.is_empty() {
        return Err(CliError::usage(format!(
            "bulk file {name}: no enrollments in the file"
        )));
    }
    let mut seen: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (i, (loc, e)) in items.iter().enumerate() {
        check_bulk_item(e, &format!("{name}: {loc}"), mode)?;
        if let Some(first) = seen.insert(e.registration_id.to_ascii_lowercase(), i) {
            return Err(CliError::usage(format!(
                "{name}: {loc}: registrationId {:?} already appears in {} (ids are case-insensitive)",
                e.registration_id, items[first].0
            )));
        }
    }
    Ok(items.into_iter().map(|(_, e)| e).collect())
}

fn parse_bulk_json(
    text: &str,
    name: &str,
) -> Result<Vec<(String, IndividualEnrollment)>, CliError> {
    let v: Value = serde_json::from_str(text).map_err(|e| {
        CliError::usage(format!("bulk file {name}: not JSON ({e})"))
            .with_hint("give a JSON array of IndividualEnrollment objects, or a CSV file (.csv or --format csv)")
    })?;
    let Value::Array(arr) = v else {
        let found = match v {
            Value::Object(_) => "an object",
            Value::String(_) => "a string",
            Value::Number(_) => "a number",
            Value::Bool(_) => "a boolean",
            _ => "null",
        };
        return Err(CliError::usage(format!(
            "bulk file {name}: expected a JSON array of IndividualEnrollment, found {found}"
        ))
        .with_hint(
            r#"wrap the records in [ … ]; each is {"registrationId":…,"attestation":{…}}"#,
        ));
    };
    let mut out = Vec::with_capacity(arr.len());
    for (i, item) in arr.into_iter().enumerate() {
        let loc = format!("item {i}");
        if !item.is_object() {
            return Err(CliError::usage(format!(
                "bulk file {name}: {loc} is not a JSON object"
            )));
        }
        let id_hint = item
            .get("registrationId")
            .and_then(Value::as_str)
            .map(|s| format!(" ({s})"))
            .unwrap_or_default();
        let e: IndividualEnrollment = serde_json::from_value(item)
            .map_err(|e| CliError::usage(format!("bulk file {name}: {loc}{id_hint}: {e}")))?;
        out.push((format!("{loc}{id_hint}"), e));
    }
    Ok(out)
}

const CSV_COLUMNS: &[&str] = &[
    "registrationId",
    "endorsementKey",
    "certificateFile",
    "deviceId",
    "provisioningStatus",
    "iotHubHostName",
    "tags",
];

fn parse_bulk_csv(
    text: &str,
    name: &str,
    base: &Path,
) -> Result<Vec<(String, IndividualEnrollment)>, CliError> {
    let mut rdr = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .flexible(false)
        .from_reader(text.as_bytes());
    let headers = rdr
        .headers()
        .map_err(|e| {
            CliError::usage(format!(
                "bulk file {name}: line 1: cannot read the header row ({e})"
            ))
        })?
        .clone();
    for h in headers.iter() {
        if !CSV_COLUMNS.contains(&h) {
            return Err(CliError::usage(format!(
                "bulk file {name}: line 1: unknown column {h:?}; columns are {}",
                CSV_COLUMNS.join(", ")
            )));
        }
    }
    let col = |n: &str| headers.iter().position(|h| h == n);
    let Some(c_id) = col("registrationId") else {
        return Err(CliError::usage(format!(
            "bulk file {name}: line 1: the header has no registrationId column"
        ))
        .with_hint(format!(
            "the header row names the columns: {}",
            CSV_COLUMNS.join(",")
        )));
    };
    let (c_ek, c_cert) = (col("endorsementKey"), col("certificateFile"));
    if c_ek.is_none() && c_cert.is_none() {
        return Err(CliError::usage(format!(
            "bulk file {name}: line 1: the header needs an endorsementKey or a certificateFile column"
        )));
    }
    let (c_dev, c_ps, c_hub, c_tags) = (
        col("deviceId"),
        col("provisioningStatus"),
        col("iotHubHostName"),
        col("tags"),
    );
    let mut out = Vec::new();
    for rec in rdr.records() {
        let rec = rec.map_err(|e| {
            let line = e.position().map_or(0, |p| p.line());
            CliError::usage(format!("bulk file {name}: line {line}: {e}"))
        })?;
        let line = rec.position().map_or(0, |p| p.line());
        let get = |c: Option<usize>| c.and_then(|i| rec.get(i)).filter(|s| !s.is_empty());
        let loc = format!("line {line}");
        let id = get(Some(c_id)).ok_or_else(|| {
            CliError::usage(format!("bulk file {name}: {loc}: registrationId is empty"))
        })?;
        let mech = match (get(c_ek), get(c_cert)) {
            (Some(ek), None) => {
                let raw = check_tpm2b_b64(ek, &format!("bulk file {name}: {loc}: endorsementKey"))?;
                AttestationMechanism::tpm(b64(&raw))
            }
            (None, Some(file)) => {
                let p = base.join(file);
                let what = format!("bulk file {name}: {loc}: certificateFile {}", p.display());
                let cert = read_pem_cert(&p, &what)?;
                AttestationMechanism::x509_client(b64(&cert.der))
            }
            (Some(_), Some(_)) => {
                return Err(CliError::usage(format!(
                    "bulk file {name}: {loc}: give endorsementKey or certificateFile, not both"
                )))
            }
            (None, None) => {
                return Err(CliError::usage(format!(
                    "bulk file {name}: {loc}: needs an endorsementKey or a certificateFile"
                )))
            }
        };
        let mut e = IndividualEnrollment::new(id, mech);
        e.device_id = get(c_dev).map(str::to_string);
        if let Some(ps) = get(c_ps) {
            e.provisioning_status = Some(ProvisioningStatus::parse_known(ps).ok_or_else(|| {
                CliError::usage(format!(
                    "bulk file {name}: {loc}: provisioningStatus {ps:?}: expected enabled or disabled"
                ))
            })?);
        }
        e.iot_hub_host_name = get(c_hub).map(str::to_string);
        if let Some(tags) = get(c_tags) {
            let v: Value = serde_json::from_str(tags).map_err(|err| {
                CliError::usage(format!("bulk file {name}: {loc}: tags is not JSON ({err})"))
            })?;
            let Value::Object(m) = v else {
                return Err(CliError::usage(format!(
                    "bulk file {name}: {loc}: tags must be a JSON object"
                )));
            };
            e.initial_twin = Some(InitialTwin {
                tags: Some(TwinCollection {
                    properties: m,
                    ..TwinCollection::default()
                }),
                ..InitialTwin::default()
            });
        }
        out.push((format!("{loc} ({id})"), e));
    }
    Ok(out)
}

/// Per-item checks shared by JSON and CSV: id rules, TPM2B, certificate CN, etag for
/// updateIfMatchETag.
fn check_bulk_item(
    e: &IndividualEnrollment,
    loc: &str,
    mode: &OperationMode,
) -> Result<(), CliError> {
    RegistrationId::parse(&e.registration_id)
        .map_err(|err| CliError::usage(format!("{loc}: registrationId: {err}")))?;
    if let Some(d) = &e.device_id {
        RegistrationId::parse(d)
            .map_err(|err| CliError::usage(format!("{loc}: deviceId: {err}")))?;
    }
    if let Some(tpm) = &e.attestation.tpm {
        check_tpm2b_b64(
            &tpm.endorsement_key,
            &format!("{loc}: attestation.tpm.endorsementKey"),
        )?;
    }
    if e.attestation.kind == AttestationType::Tpm && e.attestation.tpm.is_none() {
        return Err(CliError::usage(format!(
            "{loc}: attestation type tpm needs attestation.tpm.endorsementKey"
        )));
    }
    if let Some(cert) = e
        .attestation
        .x509
        .as_ref()
        .and_then(|x| x.client_certificates.as_ref())
        .and_then(|c| c.primary.as_ref())
        .and_then(|p| p.certificate.as_deref())
    {
        let what = format!("{loc}: attestation.x509.clientCertificates.primary.certificate");
        let der = wire_cert_der(cert, &what)?;
        let c = parse_cert_der(&der, &what)?;
        RegistrationId::parse_x509(&e.registration_id)
            .map_err(|err| CliError::usage(format!("{loc}: registrationId (X.509): {err}")))?;
        check_leaf_cn(&c, &e.registration_id, &what)?;
    }
    if *mode == OperationMode::UpdateIfMatchETag && e.etag.as_deref().is_none_or_empty() {
        return Err(CliError::usage(format!(
            "{loc}: has no etag; update-if-match-etag needs each item's current etag"
        )));
    }
    Ok(())
}

trait NoneOrEmpty {
    fn is_none_or_empty(&self) -> bool;
}
impl NoneOrEmpty for Option<&str> {
    fn is_none_or_empty(&self) -> bool {
        self.map_or(true, str::is_empty)
    }
}

pub async fn bulk(g: &GlobalOpts, c: BulkCmd) -> Result<Exit, CliError> {
    let (mode, args) = match c {
        BulkCmd::Create(a) => (OperationMode::Create, a),
        BulkCmd::Update(a) => (OperationMode::Update, a),
        BulkCmd::UpdateIfMatchEtag(a) => (OperationMode::UpdateIfMatchETag, a),
        BulkCmd::Delete(a) => (OperationMode::Delete, a),
    };
    if args.groups {
        return bulk_groups(g, mode, &args).await;
    }
    let items = read_bulk_file(&args.file, args.format, &mode)?;
    let client = client_from(g)?;

    let bar = progress_bar(g, items.len(), &mode);
    let report = client
        .bulk_enrollments_chunked(mode, &items, |done| {
            if let Some(b) = &bar {
                b.set_position(done as u64);
            }
        })
        .await;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    print_bulk(g, &report)?;
    Ok(bulk_exit(&report))
}

/// A progress bar on a terminal (stderr), unless `-q`.
fn progress_bar(
    g: &GlobalOpts,
    len: usize,
    mode: &OperationMode,
) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() || g.quiet {
        return None;
    }
    let pb = indicatif::ProgressBar::new(len as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} bulk {msg} [{bar:30}] {pos}/{len} items ({elapsed})",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(mode.to_string());
    Some(pb)
}

fn bulk_exit(r: &BulkReport) -> Exit {
    let failed = r.failed();
    if failed == 0 {
        Exit::Ok
    } else if failed == r.outcomes.len() {
        Exit::Failed
    } else {
        Exit::Partial
    }
}

/// Read and validate a bulk file of enrollment groups (JSON array, wire format).
pub fn read_bulk_groups_file(
    path: &Path,
    format: Option<BulkFormat>,
    mode: &OperationMode,
) -> Result<Vec<EnrollmentGroup>, CliError> {
    let name = path.display().to_string();
    let csv = format == Some(BulkFormat::Csv)
        || (format.is_none()
            && path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("csv")));
    if csv {
        return Err(CliError::usage(format!(
            "bulk file {name}: --groups takes a JSON array of EnrollmentGroup, not CSV"
        )));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::usage(format!("bulk file {name}: {e}")))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| {
        CliError::usage(format!("bulk file {name}: not JSON ({e})"))
            .with_hint("give a JSON array of EnrollmentGroup objects")
    })?;
    let Value::Array(arr) = v else {
        return Err(CliError::usage(format!(
            "bulk file {name}: expected a JSON array of EnrollmentGroup"
        ))
        .with_hint(
            r#"wrap the records in [ … ]; each is {"enrollmentGroupId":…,"attestation":{…}}"#,
        ));
    };
    if arr.is_empty() {
        return Err(CliError::usage(format!(
            "bulk file {name}: no enrollment groups in the file"
        )));
    }
    let mut out: Vec<EnrollmentGroup> = Vec::with_capacity(arr.len());
    let mut seen = std::collections::HashSet::new();
    for (i, item) in arr.into_iter().enumerate() {
        let id_hint = item
            .get("enrollmentGroupId")
            .and_then(Value::as_str)
            .map(|s| format!(" ({s})"))
            .unwrap_or_default();
        let loc = format!("bulk file {name}: item {i}{id_hint}");
        let grp: EnrollmentGroup =
            serde_json::from_value(item).map_err(|e| CliError::usage(format!("{loc}: {e}")))?;
        RegistrationId::parse(&grp.enrollment_group_id)
            .map_err(|e| CliError::usage(format!("{loc}: enrollmentGroupId: {e}")))?;
        if let Some(cert) = grp
            .attestation
            .x509
            .as_ref()
            .and_then(|x| x.signing_certificates.as_ref())
            .and_then(|c| c.primary.as_ref())
            .and_then(|p| p.certificate.as_deref())
        {
            let what = format!("{loc}: attestation.x509.signingCertificates.primary.certificate");
            parse_cert_der(&wire_cert_der(cert, &what)?, &what)?;
        }
        if *mode == OperationMode::UpdateIfMatchETag && grp.etag.as_deref().is_none_or_empty() {
            return Err(CliError::usage(format!(
                "{loc}: has no etag; update-if-match-etag needs each item's current etag"
            )));
        }
        if !seen.insert(grp.enrollment_group_id.to_ascii_lowercase()) {
            return Err(CliError::usage(format!(
                "{loc}: enrollmentGroupId {:?} appears twice (ids are case-insensitive)",
                grp.enrollment_group_id
            )));
        }
        out.push(grp);
    }
    Ok(out)
}

async fn bulk_groups(
    g: &GlobalOpts,
    mode: OperationMode,
    args: &BulkFileArgs,
) -> Result<Exit, CliError> {
    let items = read_bulk_groups_file(&args.file, args.format, &mode)?;
    let client = client_from(g)?;
    let bar = progress_bar(g, items.len(), &mode);
    let report = client
        .bulk_groups_chunked(mode, &items, |done| {
            if let Some(b) = &bar {
                b.set_position(done as u64);
            }
        })
        .await;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    if g.json {
        print_json(&report.group_result())?;
    } else {
        print_bulk_table(&report, "GROUP ID");
    }
    Ok(bulk_exit(&report))
}

fn print_bulk(g: &GlobalOpts, r: &BulkReport) -> Result<(), CliError> {
    if g.json {
        return print_json(&r.result);
    }
    print_bulk_table(r, "REGISTRATION ID");
    Ok(())
}

fn print_bulk_table(r: &BulkReport, id_header: &str) {
    let mut rows = vec![vec![
        id_header.to_string(),
        "RESULT".into(),
        "ERROR CODE".into(),
        "DETAIL".into(),
    ]];
    for o in &r.outcomes {
        match &o.error {
            None => rows.push(vec![
                o.registration_id.clone(),
                "ok".into(),
                "-".into(),
                "-".into(),
            ]),
            Some(e) => rows.push(vec![
                o.registration_id.clone(),
                "failed".into(),
                e.error_code.to_string(),
                short(&e.error_status, 100),
            ]),
        }
    }
    print_table(&rows);
    println!(
        "{} item(s) in {} request(s): {} succeeded, {} failed",
        r.outcomes.len(),
        r.requests,
        r.succeeded(),
        r.failed()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tpm2b_check() {
        let mut tpmt = vec![0x00, 0x01, 0x00, 0x0b];
        tpmt.extend(vec![0u8; 310]);
        let e = check_tpm2b(&tpmt, "--tpm-ek").unwrap_err();
        assert_eq!(e.exit, Exit::Usage);
        assert!(e.hint.unwrap_or_default().contains("TPMT"));
        let mut tpm2b = (tpmt.len() as u16).to_be_bytes().to_vec();
        tpm2b.extend(&tpmt);
        assert!(check_tpm2b(&tpm2b, "x").is_ok());
        assert!(check_tpm2b_b64("not base64!", "x").is_err());
    }

    #[test]
    fn query_star_means_select_all() {
        assert_eq!(query_text("*", "enrollments"), "SELECT * FROM enrollments");
        assert_eq!(
            query_text(" SELECT * FROM enrollments WHERE x ", "e"),
            "SELECT * FROM enrollments WHERE x"
        );
    }
}
