//! TPM endorsement-key (EK) reading through tss-esapi (DESIGN.md §6, reference/tpm-ek.md).
//!
//! For one board: open a fresh ESAPI context on the slot's TCTI, read the EK at the
//! persistent handle 0x81010001 (or, per [`EkPolicy`], create the TCG default RSA-2048 EK
//! and optionally persist it), read the EK certificate from NV 0x01c00002, record the
//! manufacturer, flush every transient handle and close the context again. The DPS wire form
//! of the EK is the size-prefixed TPM2B_PUBLIC; `{ek_hash}` is the Azure SDK registration id
//! over exactly those bytes.
//!
//! [`TpmWorker`] is the only way the daemon reaches a slot's TPM: one thread per slot owns the
//! TPM work, async callers wait at most `timeout` for it, and a job stuck inside the TSS
//! (which cannot be cancelled) is abandoned to a replacement thread.
//!
//! `swtpm:path=SOCKET` (swtpm on unix sockets; control channel at `SOCKET.ctrl`, the
//! tpm2-tss convention) is not expressible in tss-esapi 7.7's `TctiNameConf`, so for such a
//! board a `UnixRelay` owned by that board's read forwards a loopback TCP port pair to the
//! two unix sockets, and the context is opened on `swtpm:host=127.0.0.1,port=P`. The relay
//! lives exactly as long as the board's read; when the waiting side gives up it closes every
//! relayed connection, so the abandoned TSS call returns instead of hanging.
//!
//! This module must never hold a TPM connection between boards, never call TPM2_Startup,
//! never use the Azure SDK's non-TCG EK template, never put the endorsement hierarchy auth
//! into an error message or a log line, and never let a relay outlive its board or listen
//! on anything but 127.0.0.1.
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use sha2::{Digest as _, Sha256};
use tss_esapi::abstraction::{ek, nv, AsymmetricAlgorithmSelection, DefaultKey};
use tss_esapi::attributes::SessionAttributesBuilder;
use tss_esapi::constants::response_code::{Tss2ResponseCode, Tss2ResponseCodeKind};
use tss_esapi::constants::{PropertyTag, SessionType};
use tss_esapi::handles::{
    KeyHandle, NvIndexTpmHandle, ObjectHandle, PersistentTpmHandle, SessionHandle, TpmHandle,
};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::dynamic_handles::Persistent;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::{Hierarchy, NvAuth, Provision};
use tss_esapi::structures::{Auth, Public, PublicBuffer, SymmetricDefinition};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::Marshall;
use tss_esapi::Context;
use zeroize::Zeroizing;

use crate::dps::RegistrationId;
use crate::secret::Secret;

/// Persistent handle of the RSA-2048 EK (TCG EK Credential Profile; reference/tpm-ek.md §3).
pub const EK_HANDLE: u32 = 0x8101_0001;
/// NV index of the RSA-2048 EK certificate (reference/tpm-ek.md §3).
pub const EK_CERT_NV_INDEX: u32 = 0x01c0_0002;
/// Size of the TPM2B_PUBLIC of a TCG default RSA-2048 EK (reference/tpm-ek.md §1).
pub const RSA2048_EK_TPM2B_LEN: usize = 316;
/// Default time a board's TPM work may take (an RSA CreatePrimary on hardware can take
/// minutes; reading a persisted EK takes milliseconds).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// TPM2_PT_MANUFACTURER ids of software TPMs: swtpm/libtpms and the IBM simulator report
/// "IBM", the Microsoft reference simulator "MSFT" (checked on swtpm 0.7.1: 0x49424D00).
const SOFTWARE_MANUFACTURERS: &[&str] = &["IBM", "MSFT"];

// ---------------------------------------------------------------------------------------
// Policy, request, result
// ---------------------------------------------------------------------------------------

/// What to do when 0x81010001 holds no EK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EkPolicy {
    /// A missing EK is an error ([`TpmError::NoEk`]).
    ReadOnly,
    /// Create the TCG default RSA-2048 EK transiently (not persisted).
    ReadOrCreate,
    /// Create it and persist it at 0x81010001 (EvictControl, owner hierarchy), so that the
    /// board's own DPS client later reads the same EK.
    ReadOrCreatePersist,
}

impl EkPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            EkPolicy::ReadOnly => "read-only",
            EkPolicy::ReadOrCreate => "read-or-create",
            EkPolicy::ReadOrCreatePersist => "read-or-create-persist",
        }
    }
}

impl fmt::Display for EkPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The policy text is not one of the three names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown ek policy {0:?}; expected \"read-only\", \"read-or-create\" or \"read-or-create-persist\"")]
pub struct BadEkPolicy(pub String);

impl FromStr for EkPolicy {
    type Err = BadEkPolicy;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "read-only" => Ok(EkPolicy::ReadOnly),
            "read-or-create" => Ok(EkPolicy::ReadOrCreate),
            "read-or-create-persist" => Ok(EkPolicy::ReadOrCreatePersist),
            other => Err(BadEkPolicy(other.to_string())),
        }
    }
}

/// One board's EK request.
#[derive(Debug, Clone)]
pub struct EkRequest {
    /// TCTI string, e.g. `device:/dev/tpmrm0` or `swtpm:host=127.0.0.1,port=2321`.
    pub tcti: String,
    pub policy: EkPolicy,
    /// Endorsement hierarchy auth (from the credential file); `None` = empty auth.
    pub endorsement_auth: Option<Secret<Vec<u8>>>,
    /// How long the caller waits for this board (used by [`TpmWorker::read_ek`]).
    pub timeout: Duration,
    /// Refuse software TPMs (swtpm, simulators).
    pub require_hardware_tpm: bool,
}

impl EkRequest {
    /// A request with no endorsement auth, [`DEFAULT_TIMEOUT`], software TPMs allowed.
    pub fn new(tcti: impl Into<String>, policy: EkPolicy) -> Self {
        EkRequest {
            tcti: tcti.into(),
            policy,
            endorsement_auth: None,
            timeout: DEFAULT_TIMEOUT,
            require_hardware_tpm: false,
        }
    }
}

/// Facts of the EK certificate kept in the board record.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EkCertInfo {
    pub subject: String,
    pub issuer: String,
    /// SHA-256 over the certificate's DER (NV padding after the DER is not hashed), lower hex.
    pub sha256_hex: String,
}

/// Everything read from one board's TPM.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EkInfo {
    /// TPM2B_PUBLIC of the EK, with its 2-byte size prefix (316 bytes for RSA-2048).
    #[serde(skip)]
    pub tpm2b_public: Vec<u8>,
    /// Standard padded base64 of `tpm2b_public`: the DPS `endorsementKey`.
    pub ek_b64: String,
    /// The Azure SDK registration id, equal to `ek_hash`.
    pub registration_id: RegistrationId,
    /// Lower-case unpadded base32 of SHA-256 over `tpm2b_public` (52 characters).
    pub ek_hash: String,
    pub ek_cert: Option<EkCertInfo>,
    /// TPM2_PT_MANUFACTURER as text, e.g. "IFX", "STM", "IBM" (swtpm).
    pub manufacturer: String,
    pub software_tpm: bool,
    /// The EK was created by this read (0x81010001 was empty).
    pub created: bool,
    /// The EK is at 0x81010001 after this read (it was there, or we persisted it).
    pub persisted: bool,
    pub warnings: Vec<String>,
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// A TPM failure for one board. The message names the step and, where the TPM answered,
/// the response code. It never contains the endorsement auth.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TpmError {
    #[error("TCTI {tcti:?}: {reason}")]
    BadTcti { tcti: String, reason: String },
    #[error("endorsement auth file {}: {reason}", path.display())]
    BadAuthFile { path: PathBuf, reason: String },
    #[error("{step}: TPM unreachable ({detail})")]
    Unreachable { step: String, detail: String },
    #[error("{step}: no answer from the TPM within {}", humantime::format_duration(*timeout))]
    Timeout { step: String, timeout: Duration },
    #[error(
        "reading EK at 0x81010001: TPM_RC_HANDLE (no persistent EK; set ek = \"read-or-create\")"
    )]
    NoEk,
    #[error("software TPM refused (manufacturer {manufacturer:?}); require_hardware_tpm is set")]
    SoftwareTpmRefused { manufacturer: String },
    #[error("{step}: {name} ({code:#x}){}", hint.as_deref().map(|h| format!(" ({h})")).unwrap_or_default())]
    Tpm {
        step: String,
        code: u32,
        name: String,
        hint: Option<String>,
    },
    #[error("{step}: {detail}")]
    Esapi { step: String, detail: String },
}

impl TpmError {
    /// The serial-protocol reason token (DESIGN.md §5).
    pub fn reason(&self) -> &'static str {
        match self {
            TpmError::NoEk => "no-ek",
            TpmError::SoftwareTpmRefused { .. } => "software-tpm",
            _ => "tpm-error",
        }
    }

    /// The TSS2/TPM response code, where the TPM stack gave one.
    pub fn response_code(&self) -> Option<u32> {
        match self {
            TpmError::Tpm { code, .. } => Some(*code),
            TpmError::NoEk => Some(TPM_RC_HANDLE_1),
            _ => None,
        }
    }
}

/// TPM_RC_HANDLE for handle 1 (RC_FMT1 | TPM_RC_HANDLE | TPM_RC_1): what the TPM answers for
/// an empty persistent handle or NV index (reference/tpm-ek.md §4: 395 = 0x18B).
const TPM_RC_HANDLE_1: u32 = 0x18B;

/// The numeric value of a TSS2 response code (tss-esapi keeps it private; its Display is
/// "Response code value: 0x…").
fn rc_value(rc: Tss2ResponseCode) -> u32 {
    let text = match rc {
        Tss2ResponseCode::Success => return 0,
        Tss2ResponseCode::FormatZero(z) => z.to_string(),
        Tss2ResponseCode::FormatOne(o) => o.to_string(),
    };
    text.rsplit("0x")
        .next()
        .and_then(|h| u32::from_str_radix(h.trim(), 16).ok())
        .unwrap_or(0)
}

const TSS2_LAYER_TCTI: u32 = 10;

/// Name of a TSS2 base error code (tss2_common.h `TSS2_BASE_RC_*`).
fn tss_base_name(base: u32) -> &'static str {
    match base {
        1 => "GENERAL_FAILURE",
        2 => "NOT_IMPLEMENTED",
        3 => "BAD_CONTEXT",
        4 => "ABI_MISMATCH",
        5 => "BAD_REFERENCE",
        6 => "INSUFFICIENT_BUFFER",
        7 => "BAD_SEQUENCE",
        8 => "NO_CONNECTION",
        9 => "TRY_AGAIN",
        10 => "IO_ERROR",
        11 => "BAD_VALUE",
        12 => "NOT_PERMITTED",
        13 => "INVALID_SESSIONS",
        16 => "BAD_SIZE",
        17 => "MALFORMED_RESPONSE",
        18 => "INSUFFICIENT_CONTEXT",
        19 => "INSUFFICIENT_RESPONSE",
        20 => "INCOMPATIBLE_TCTI",
        21 => "NOT_SUPPORTED",
        22 => "BAD_TCTI_STRUCTURE",
        23 => "MEMORY",
        24 => "BAD_TR",
        _ => "UNKNOWN",
    }
}

fn tss_layer_name(layer: u32) -> &'static str {
    match layer {
        6 => "FEATURE",
        7 => "ESAPI",
        8 => "SYS",
        9 => "MU",
        10 => "TCTI",
        11 => "RESMGR",
        12 => "RESMGR_TPM",
        _ => "TSS",
    }
}

/// "NvDefined" → "TPM_RC_NV_DEFINED".
fn tpm_rc_name(kind: Tss2ResponseCodeKind) -> String {
    let debug = format!("{kind:?}");
    let mut out = String::from("TPM_RC_");
    for (i, c) in debug.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// Turn a tss-esapi error at `step` into a [`TpmError`].
fn classify(step: &str, err: tss_esapi::Error) -> TpmError {
    match err {
        tss_esapi::Error::WrapperError(kind) => TpmError::Esapi {
            step: step.to_string(),
            detail: format!("tss-esapi: {kind:?}"),
        },
        tss_esapi::Error::Tss2Error(rc) => {
            let code = rc_value(rc);
            let layer = (code >> 16) & 0xff;
            if layer == 0 {
                let name = rc
                    .kind()
                    .map(tpm_rc_name)
                    .unwrap_or_else(|| "TPM_RC_UNKNOWN".to_string());
                let hint = match rc.kind() {
                    Some(Tss2ResponseCodeKind::BadAuth) | Some(Tss2ResponseCodeKind::AuthFail) => {
                        Some("check the endorsement/owner hierarchy auth".to_string())
                    }
                    Some(Tss2ResponseCodeKind::Lockout) => {
                        Some("the TPM is in dictionary-attack lockout".to_string())
                    }
                    _ => None,
                };
                TpmError::Tpm {
                    step: step.to_string(),
                    code,
                    name,
                    hint,
                }
            } else {
                let base = code & 0xffff;
                let name = format!("TSS2_{}_RC_{}", tss_layer_name(layer), tss_base_name(base));
                // Transport failures: the TPM went away (connection reset, killed, unplugged).
                if layer == TSS2_LAYER_TCTI || matches!(base, 8 | 10 | 17 | 19) {
                    TpmError::Unreachable {
                        step: step.to_string(),
                        detail: format!("{name}, {code:#x}"),
                    }
                } else {
                    TpmError::Tpm {
                        step: step.to_string(),
                        code,
                        name,
                        hint: None,
                    }
                }
            }
        }
    }
}

fn is_rc_handle(err: &tss_esapi::Error) -> bool {
    matches!(err, tss_esapi::Error::Tss2Error(rc)
        if rc.kind() == Some(Tss2ResponseCodeKind::Handle) && (rc_value(*rc) >> 16) == 0)
}

// ---------------------------------------------------------------------------------------
// TCTI
// ---------------------------------------------------------------------------------------

/// Which TCTI library a [`TctiSpec`] loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TctiKind {
    Device,
    Swtpm,
    Mssim,
    Tabrmd,
}

/// Where a [`TctiSpec`] connects.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TctiTarget {
    /// Opened directly by the tss-esapi TCTI loader.
    Loader(TctiNameConf),
    /// swtpm on unix sockets: reached through a [`UnixRelay`].
    SwtpmUnix { data: PathBuf, ctrl: PathBuf },
}

/// A validated TCTI string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TctiSpec {
    text: String,
    kind: TctiKind,
    target: TctiTarget,
}

impl TctiSpec {
    pub fn as_str(&self) -> &str {
        &self.text
    }
    pub fn kind(&self) -> TctiKind {
        self.kind
    }
    /// The tss-esapi form, for `Context::new`; `None` for `swtpm:path=…`, which tss-esapi
    /// cannot express (it is opened through a relay, see [`TctiSpec::unix_sockets`]).
    pub fn name_conf(&self) -> Option<TctiNameConf> {
        match &self.target {
            TctiTarget::Loader(conf) => Some(conf.clone()),
            TctiTarget::SwtpmUnix { .. } => None,
        }
    }
    /// For `swtpm:path=SOCKET`: the data socket and the control socket (`SOCKET.ctrl`).
    pub fn unix_sockets(&self) -> Option<(&Path, &Path)> {
        match &self.target {
            TctiTarget::SwtpmUnix { data, ctrl } => Some((data, ctrl)),
            TctiTarget::Loader(_) => None,
        }
    }
}

impl fmt::Display for TctiSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Longest unix socket path the kernel takes (`sizeof(sun_path)` on Linux, minus the NUL).
const SUN_PATH_MAX: usize = 107;

/// Validate a TCTI string (`device:/dev/tpmrm0`, `swtpm:host=H,port=P`, `swtpm:path=SOCKET`,
/// `mssim:…`, `tabrmd:bus_name=…,bus_type=session|system`). tss-esapi ignores keys it does
/// not know, which would silently turn a typo into `localhost:2321`; this refuses them.
///
/// `swtpm:path=SOCKET` means what it means to tpm2-tss 3.2.1's swtpm TCTI (and so to
/// tpm2-tools `-T`): swtpm serves TPM commands on the unix socket `SOCKET` and its control
/// channel on `SOCKET.ctrl` (`swtpm socket --server type=unixio,path=SOCKET --ctrl
/// type=unixio,path=SOCKET.ctrl`). It cannot be combined with `host=`/`port=`, and
/// `SOCKET.ctrl` must fit a unix socket address (107 bytes).
pub fn parse_tcti(s: &str) -> Result<TctiSpec, TpmError> {
    let bad = |reason: String| TpmError::BadTcti {
        tcti: s.to_string(),
        reason,
    };
    let (name, conf) = match s.split_once(':') {
        Some((n, c)) => (n, c),
        None => (s, ""),
    };
    let kind = match name {
        "device" => TctiKind::Device,
        "swtpm" => TctiKind::Swtpm,
        "mssim" => TctiKind::Mssim,
        "tabrmd" => TctiKind::Tabrmd,
        other => {
            return Err(bad(format!(
                "unknown TCTI {other:?}; expected device, swtpm, mssim or tabrmd \
                 (e.g. \"device:/dev/tpmrm0\" or \"swtpm:host=127.0.0.1,port=2321\")"
            )))
        }
    };
    match kind {
        TctiKind::Device => {
            if !conf.starts_with('/') {
                return Err(bad(
                    "a device TCTI needs an absolute device path, e.g. \"device:/dev/tpmrm0\""
                        .to_string(),
                ));
            }
        }
        TctiKind::Swtpm | TctiKind::Mssim => {
            let mut network = false;
            let mut path = None;
            for kv in conf.split(',').filter(|kv| !kv.is_empty()) {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                match k {
                    "host" if !v.is_empty() => network = true,
                    "port" => match v.parse::<u16>() {
                        Ok(p) if p > 0 && p < u16::MAX => network = true,
                        _ => return Err(bad(format!("port {v:?} is not a TCP port 1-65534"))),
                    },
                    "path" if kind == TctiKind::Mssim => {
                        return Err(bad("mssim on unix sockets (path=…) is not supported; use \
                             host=127.0.0.1,port=P"
                            .to_string()))
                    }
                    "path" if v.is_empty() => {
                        return Err(bad("path= needs the swtpm data socket, e.g. \
                             \"swtpm:path=/run/swtpm/board.sock\""
                            .to_string()))
                    }
                    "path" if path.is_some() => {
                        return Err(bad("path= is given twice".to_string()))
                    }
                    "path" => path = Some(v),
                    _ => {
                        return Err(bad(format!(
                            "unknown or empty option {kv:?}; only host=… and port=… (or, for \
                             swtpm, path=…) are allowed"
                        )))
                    }
                }
            }
            if let Some(path) = path {
                if network {
                    return Err(bad(
                        "path= (unix sockets) cannot be combined with host= or port=".to_string(),
                    ));
                }
                let ctrl = format!("{path}.ctrl");
                if ctrl.len() > SUN_PATH_MAX {
                    return Err(bad(format!(
                        "the control socket path {ctrl:?} is longer than the {SUN_PATH_MAX} \
                         bytes a unix socket address holds"
                    )));
                }
                return Ok(TctiSpec {
                    text: s.to_string(),
                    kind,
                    target: TctiTarget::SwtpmUnix {
                        data: PathBuf::from(path),
                        ctrl: PathBuf::from(ctrl),
                    },
                });
            }
        }
        TctiKind::Tabrmd => {
            for kv in conf.split(',').filter(|kv| !kv.is_empty()) {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                match k {
                    "bus_name" if !v.is_empty() => {}
                    "bus_type" if v == "session" || v == "system" => {}
                    _ => {
                        return Err(bad(format!(
                            "unknown option {kv:?}; allowed: bus_name=…, bus_type=session|system"
                        )))
                    }
                }
            }
        }
    }
    let conf =
        TctiNameConf::from_str(s).map_err(|e| bad(format!("not accepted by tss-esapi: {e}")))?;
    // Hostname checks happen only when the loader string is built; do them now.
    std::ffi::CString::try_from(conf.clone())
        .map_err(|e| bad(format!("not accepted by tss-esapi: {e}")))?;
    Ok(TctiSpec {
        text: s.to_string(),
        kind,
        target: TctiTarget::Loader(conf),
    })
}

// ---------------------------------------------------------------------------------------
// EK bytes, registration id, auth file
// ---------------------------------------------------------------------------------------

/// `{ek_hash}`: lower-case RFC 4648 base32 (no padding) of SHA-256 over the TPM2B_PUBLIC
/// bytes, size prefix included: the Azure SDKs' TPM registration id (reference/tpm-ek.md §2).
pub fn ek_hash(tpm2b_public: &[u8]) -> String {
    let digest = Sha256::digest(tpm2b_public);
    data_encoding::BASE32_NOPAD
        .encode(&digest)
        .to_ascii_lowercase()
}

/// The TCG default RSA-2048 EK template (EK Credential Profile template L-1: unique = 256
/// zero bytes). Not the Azure SDK template, whose unique is empty.
pub fn tcg_default_ek_template() -> Result<Public, TpmError> {
    ek::create_ek_public_from_default_template_2(
        AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
        DefaultKey,
    )
    .map_err(|e| classify("building the TCG default EK template", e))
}

/// Size-prefixed TPM2B_PUBLIC of `public` (`Public::marshall` alone gives TPMT_PUBLIC).
pub fn tpm2b_public_bytes(public: Public) -> Result<Vec<u8>, TpmError> {
    let step = "marshalling the EK as TPM2B_PUBLIC";
    PublicBuffer::try_from(public)
        .and_then(|b| b.marshall())
        .map_err(|e| classify(step, e))
}

/// Load a hierarchy auth value from a credential file: `hex:0011…` or `str:text`
/// (one line; surrounding whitespace and the trailing newline are ignored). At most 64 bytes.
pub fn load_auth_file(path: &Path) -> Result<Secret<Vec<u8>>, TpmError> {
    let bad = |reason: &str| TpmError::BadAuthFile {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let raw = Zeroizing::new(std::fs::read(path).map_err(|e| TpmError::BadAuthFile {
        path: path.to_path_buf(),
        reason: format!("cannot read it: {e}"),
    })?);
    let text = std::str::from_utf8(&raw).map_err(|_| bad("not UTF-8 text"))?;
    let text = text.trim_end_matches(['\r', '\n']).trim();
    let bytes = if let Some(h) = text.strip_prefix("hex:") {
        let h = h.trim();
        if h.len() % 2 != 0 {
            return Err(bad("hex: value has an odd number of digits"));
        }
        Zeroizing::new(hex::decode(h).map_err(|_| bad("hex: value has a non-hex character"))?)
    } else if let Some(s) = text.strip_prefix("str:") {
        Zeroizing::new(s.as_bytes().to_vec())
    } else {
        return Err(bad("value must start with \"hex:\" or \"str:\""));
    };
    if bytes.len() > 64 {
        return Err(bad("value is longer than 64 bytes"));
    }
    Ok(Secret::new(bytes.to_vec()))
}

// ---------------------------------------------------------------------------------------
// Reading one board
// ---------------------------------------------------------------------------------------

/// Where a running read is (the waiting side quotes it in a [`TpmError::Timeout`]), and
/// whether the waiting side has given up on it.
#[derive(Debug, Clone)]
struct Progress {
    step: Arc<Mutex<String>>,
    abandoned: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            step: Arc::default(),
            abandoned: Arc::new(tokio::sync::watch::Sender::new(false)),
        }
    }
}

impl Progress {
    fn set(&self, step: &str) {
        if let Ok(mut s) = self.step.lock() {
            s.clear();
            s.push_str(step);
        }
    }
    fn get(&self) -> String {
        self.step.lock().map(|s| s.clone()).unwrap_or_default()
    }
    /// The caller stopped waiting: anything that can unblock the read should do so.
    fn abandon(&self) {
        self.abandoned.send_replace(true);
    }
    fn abandoned(&self) -> tokio::sync::watch::Receiver<bool> {
        self.abandoned.subscribe()
    }
}

// ---------------------------------------------------------------------------------------
// swtpm on unix sockets: a per-board TCP relay
// ---------------------------------------------------------------------------------------

/// Forwards 127.0.0.1:P to swtpm's data socket and 127.0.0.1:P+1 to its control socket, for
/// one board's read (tss-esapi 7.7 can only open swtpm over TCP). One thread runs a small
/// current-thread tokio runtime that accepts and pipes every connection (the swtpm TCTI opens
/// a new connection per command). Dropping the relay, or the waiting side abandoning the read,
/// closes the listeners and every relayed connection and joins the thread.
struct UnixRelay {
    port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The first failure to reach a unix socket, for the error the TSS reports as I/O.
    failure: Arc<Mutex<Option<String>>>,
}

impl UnixRelay {
    fn start(
        data: &Path,
        ctrl: &Path,
        abandoned: tokio::sync::watch::Receiver<bool>,
        step: &str,
    ) -> Result<Self, TpmError> {
        let unreachable = |detail: String| TpmError::Unreachable {
            step: step.to_string(),
            detail,
        };
        // Fail with the socket's own error rather than the TSS's generic I/O error.
        for (what, path) in [("data", data), ("control", ctrl)] {
            std::os::unix::net::UnixStream::connect(path).map_err(|e| {
                unreachable(format!(
                    "cannot connect to the swtpm {what} socket {}: {e}",
                    path.display()
                ))
            })?;
        }
        let relay_failed = |e: std::io::Error| unreachable(format!("starting the relay: {e}"));
        let (data_l, ctrl_l) = bind_port_pair().map_err(relay_failed)?;
        let port = data_l.local_addr().map_err(relay_failed)?.port();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(relay_failed)?;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let failure = Arc::new(Mutex::new(None));
        let routes = [
            (data_l, Arc::new(data.to_path_buf())),
            (ctrl_l, Arc::new(ctrl.to_path_buf())),
        ];
        let f = failure.clone();
        let thread = std::thread::Builder::new()
            .name(format!("tpm-relay-{port}"))
            .spawn(move || runtime.block_on(relay_main(routes, stopped, abandoned, f)))
            .map_err(relay_failed)?;
        Ok(UnixRelay {
            port,
            stop: Some(stop),
            thread: Some(thread),
            failure,
        })
    }

    /// The TCTI the context is opened on.
    fn name_conf(&self, step: &str) -> Result<TctiNameConf, TpmError> {
        TctiNameConf::from_str(&format!("swtpm:host=127.0.0.1,port={}", self.port))
            .map_err(|e| classify(step, e))
    }

    fn failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }
}

impl Drop for UnixRelay {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Two listeners on 127.0.0.1:P and 127.0.0.1:P+1 (held, so nobody can take them).
fn bind_port_pair() -> std::io::Result<(std::net::TcpListener, std::net::TcpListener)> {
    use std::net::{Ipv4Addr, TcpListener};
    for _ in 0..64 {
        let first = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let p = first.local_addr()?.port();
        if p == u16::MAX {
            continue;
        }
        if let Ok(second) = TcpListener::bind((Ipv4Addr::LOCALHOST, p + 1)) {
            first.set_nonblocking(true)?;
            second.set_nonblocking(true)?;
            return Ok((first, second));
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no free loopback port pair",
    ))
}

type Route = (std::net::TcpListener, Arc<PathBuf>);

async fn relay_main(
    routes: [Route; 2],
    mut stopped: tokio::sync::oneshot::Receiver<()>,
    mut abandoned: tokio::sync::watch::Receiver<bool>,
    failure: Arc<Mutex<Option<String>>>,
) {
    let [(data_l, data_p), (ctrl_l, ctrl_p)] = routes;
    let (Ok(data_l), Ok(ctrl_l)) = (
        tokio::net::TcpListener::from_std(data_l),
        tokio::net::TcpListener::from_std(ctrl_l),
    ) else {
        note_failure(
            &failure,
            "the relay could not register its listeners".to_string(),
        );
        return;
    };
    let mut pipes = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = &mut stopped => break,
            Ok(_) = abandoned.wait_for(|gave_up| *gave_up) => break,
            Some(_) = pipes.join_next(), if !pipes.is_empty() => continue,
            a = data_l.accept() => a.map(|(tcp, _)| (tcp, data_p.clone())),
            a = ctrl_l.accept() => a.map(|(tcp, _)| (tcp, ctrl_p.clone())),
        };
        if let Ok((tcp, path)) = accepted {
            pipes.spawn(pipe(tcp, path, failure.clone()));
        }
    }
    // Closing the TCP side makes a TSS call blocked on this board return (I/O error).
    pipes.shutdown().await;
}

async fn pipe(
    mut tcp: tokio::net::TcpStream,
    path: Arc<PathBuf>,
    failure: Arc<Mutex<Option<String>>>,
) {
    let _ = tcp.set_nodelay(true);
    match tokio::net::UnixStream::connect(path.as_path()).await {
        Ok(mut unix) => {
            let _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await;
        }
        Err(e) => note_failure(
            &failure,
            format!("cannot connect to the swtpm socket {}: {e}", path.display()),
        ),
    }
}

fn note_failure(failure: &Mutex<Option<String>>, why: String) {
    if let Ok(mut f) = failure.lock() {
        f.get_or_insert(why);
    }
}

/// Silence the TSS library's own stderr logging (`ERROR:esys:…` lines for conditions this
/// module reports itself, such as an empty 0x81010001) unless `TSS2_LOG` is set. Call it
/// early, before other threads start (it sets an environment variable).
pub fn quiet_tss_logging() {
    if std::env::var_os("TSS2_LOG").is_none() {
        std::env::set_var("TSS2_LOG", "all+none");
    }
}

/// Read one board's EK (blocking): fresh context, read or create, certificate, flush, close.
/// No timeout is applied here; async code goes through [`TpmWorker`].
pub fn read_ek(req: &EkRequest) -> Result<EkInfo, TpmError> {
    read_ek_with_progress(req, &Progress::default())
}

fn read_ek_with_progress(req: &EkRequest, progress: &Progress) -> Result<EkInfo, TpmError> {
    let spec = parse_tcti(&req.tcti)?;
    let step = format!("opening TCTI {}", spec.as_str());
    progress.set(&step);
    // Declared before the context, so it is dropped after it on every path.
    let relay = match spec.unix_sockets() {
        Some((data, ctrl)) => Some(UnixRelay::start(data, ctrl, progress.abandoned(), &step)?),
        None => None,
    };
    let conf = match (&relay, spec.name_conf()) {
        (Some(relay), _) => relay.name_conf(&step)?,
        (None, Some(conf)) => conf,
        (None, None) => {
            return Err(TpmError::BadTcti {
                tcti: spec.to_string(),
                reason: "no way to open it".to_string(),
            })
        }
    };
    let opened = Context::new(conf).map_err(|e| match classify(&step, e) {
        TpmError::Tpm {
            step, code, name, ..
        } => TpmError::Unreachable {
            step,
            detail: format!("{name}, {code:#x}"),
        },
        other => other,
    });
    let result = opened.and_then(|mut ctx| {
        let result = read_with_context(&mut ctx, req, progress);
        progress.set("closing the TPM context");
        drop(ctx);
        result
    });
    // Name the unix socket that failed rather than only the TSS's I/O error.
    let failure = relay.as_ref().and_then(UnixRelay::failure);
    drop(relay);
    match (result, failure) {
        (Err(TpmError::Unreachable { step, detail }), Some(why)) => Err(TpmError::Unreachable {
            step,
            detail: format!("{detail}; {why}"),
        }),
        (result, _) => result,
    }
}

fn read_with_context(
    ctx: &mut Context,
    req: &EkRequest,
    progress: &Progress,
) -> Result<EkInfo, TpmError> {
    let mut warnings = Vec::new();

    // Manufacturer: refuse a software TPM before touching any key when asked to.
    let step = "reading TPM2_PT_MANUFACTURER";
    progress.set(step);
    let manufacturer = ctx
        .get_tpm_property(PropertyTag::Manufacturer)
        .map_err(|e| classify(step, e))?
        .map(property_text)
        .unwrap_or_default();
    let vendor = tss_esapi::utils::get_tpm_vendor(ctx).unwrap_or_default();
    let software_tpm =
        SOFTWARE_MANUFACTURERS.contains(&manufacturer.as_str()) || vendor.starts_with("SW");
    if software_tpm && req.require_hardware_tpm {
        return Err(TpmError::SoftwareTpmRefused { manufacturer });
    }
    if software_tpm {
        warnings.push(format!(
            "software TPM (manufacturer {manufacturer:?}, vendor {vendor:?})"
        ));
    }

    if let Some(auth) = &req.endorsement_auth {
        let step = "setting the endorsement hierarchy auth";
        let value = Auth::try_from(auth.expose().clone()).map_err(|e| classify(step, e))?;
        ctx.tr_set_auth(ObjectHandle::Endorsement, value)
            .map_err(|e| classify(step, e))?;
    }

    let (public, created, persisted) = read_or_create_ek(ctx, req.policy, progress)?;
    let unique = rsa_unique(&public);
    let tpm2b_public = tpm2b_public_bytes(public)?;
    if tpm2b_public.len() != RSA2048_EK_TPM2B_LEN {
        warnings.push(format!(
            "EK TPM2B_PUBLIC is {} bytes, not the {RSA2048_EK_TPM2B_LEN} of a TCG RSA-2048 EK",
            tpm2b_public.len()
        ));
    }

    let ek_cert = read_ek_cert(ctx, unique.as_deref(), progress, &mut warnings)?;

    let hash = ek_hash(&tpm2b_public);
    let registration_id = RegistrationId::parse(&hash).map_err(|e| TpmError::Esapi {
        step: "deriving the registration id".to_string(),
        detail: e.to_string(),
    })?;
    Ok(EkInfo {
        ek_b64: base64::engine::general_purpose::STANDARD.encode(&tpm2b_public),
        tpm2b_public,
        registration_id,
        ek_hash: hash,
        ek_cert,
        manufacturer,
        software_tpm,
        created,
        persisted,
        warnings,
    })
}

/// A 4-byte TPM property as text ("IBM\0" → "IBM").
fn property_text(v: u32) -> String {
    v.to_be_bytes()
        .iter()
        .filter(|b| b.is_ascii_graphic())
        .map(|b| char::from(*b))
        .collect()
}

fn rsa_unique(public: &Public) -> Option<Vec<u8>> {
    match public {
        Public::Rsa { unique, .. } => Some(unique.value().to_vec()),
        _ => None,
    }
}

/// Returns (public area, created, persisted).
fn read_or_create_ek(
    ctx: &mut Context,
    policy: EkPolicy,
    progress: &Progress,
) -> Result<(Public, bool, bool), TpmError> {
    let step = "reading EK at 0x81010001";
    progress.set(step);
    let ek_tpm = PersistentTpmHandle::new(EK_HANDLE).map_err(|e| classify(step, e))?;
    match ctx.execute_without_session(|c| c.tr_from_tpm_public(TpmHandle::Persistent(ek_tpm))) {
        Ok(mut obj) => {
            let read = ctx.read_public(KeyHandle::from(obj));
            // Closing the ESYS resource frees it in the library only; the EK stays persisted.
            let _ = ctx.tr_close(&mut obj);
            let (public, _, _) = read.map_err(|e| classify(step, e))?;
            Ok((public, false, true))
        }
        Err(e) if is_rc_handle(&e) => match policy {
            EkPolicy::ReadOnly => Err(TpmError::NoEk),
            EkPolicy::ReadOrCreate => Ok((create_ek(ctx, None, progress)?, true, false)),
            EkPolicy::ReadOrCreatePersist => {
                Ok((create_ek(ctx, Some(ek_tpm), progress)?, true, true))
            }
        },
        Err(e) => Err(classify(step, e)),
    }
}

/// CreatePrimary of the TCG default EK under the endorsement hierarchy; optionally
/// EvictControl it to `persist_at`. The transient handle is flushed on every path.
fn create_ek(
    ctx: &mut Context,
    persist_at: Option<PersistentTpmHandle>,
    progress: &Progress,
) -> Result<Public, TpmError> {
    let template = tcg_default_ek_template()?;
    let step = "creating the TCG default RSA-2048 EK (CreatePrimary, endorsement hierarchy)";
    progress.set(step);
    let created = with_hmac_session(ctx, |c| {
        c.create_primary(Hierarchy::Endorsement, template, None, None, None, None)
    })
    .map_err(|e| classify(step, e))?;
    let transient = created.key_handle;
    let persisted = match persist_at {
        None => Ok(()),
        Some(handle) => {
            let step = "persisting EK at 0x81010001 (EvictControl, owner hierarchy)";
            progress.set(step);
            with_hmac_session(ctx, |c| {
                c.evict_control(
                    Provision::Owner,
                    ObjectHandle::from(transient),
                    Persistent::Persistent(handle),
                )
            })
            .map(|mut p| {
                let _ = ctx.tr_close(&mut p);
            })
            .map_err(|e| classify(step, e))
        }
    };
    let step = "flushing the transient EK";
    progress.set(step);
    let flushed = ctx
        .flush_context(ObjectHandle::from(transient))
        .map_err(|e| classify(step, e));
    persisted?;
    flushed?;
    Ok(created.out_public)
}

/// Run `f` in a fresh HMAC session with empty salt/bind (what tss-esapi's
/// `execute_with_nullauth_session` does), but keep `f`'s error when flushing the session
/// fails too: after a lost connection the flush fails with an ESAPI sequence error that would
/// otherwise hide the real cause.
fn with_hmac_session<T>(
    ctx: &mut Context,
    f: impl FnOnce(&mut Context) -> tss_esapi::Result<T>,
) -> tss_esapi::Result<T> {
    let session = ctx
        .start_auth_session(
            None,
            None,
            None,
            SessionType::Hmac,
            SymmetricDefinition::AES_128_CFB,
            HashingAlgorithm::Sha256,
        )?
        .ok_or(tss_esapi::Error::WrapperError(
            tss_esapi::WrapperErrorKind::WrongValueFromTpm,
        ))?;
    let (attributes, mask) = SessionAttributesBuilder::new()
        .with_decrypt(true)
        .with_encrypt(true)
        .build();
    let result = ctx
        .tr_sess_set_attributes(session, attributes, mask)
        .and_then(|()| ctx.execute_with_session(Some(session), f));
    let flushed = ctx.flush_context(SessionHandle::from(session).into());
    let value = result?;
    flushed?;
    Ok(value)
}

/// Read a whole NV index with its own (empty) auth; the ESYS handle is closed afterwards.
fn read_nv_full(ctx: &mut Context, index: u32) -> tss_esapi::Result<Vec<u8>> {
    let nv_index = NvIndexTpmHandle::new(index)?;
    let mut obj = ctx.execute_without_session(|c| c.tr_from_tpm_public(nv_index.into()))?;
    let read = with_hmac_session(ctx, |c| {
        nv::read_full(c, NvAuth::NvIndex(obj.into()), nv_index)
    });
    let _ = ctx.tr_close(&mut obj);
    read
}

/// Read and parse the EK certificate. A missing or unparsable certificate is a warning; a
/// TPM that went away is an error.
fn read_ek_cert(
    ctx: &mut Context,
    ek_unique: Option<&[u8]>,
    progress: &Progress,
    warnings: &mut Vec<String>,
) -> Result<Option<EkCertInfo>, TpmError> {
    let step = "reading EK certificate from NV 0x01c00002";
    progress.set(step);
    let der = match read_nv_full(ctx, EK_CERT_NV_INDEX) {
        Ok(der) => der,
        Err(e) if is_rc_handle(&e) => {
            warnings.push("no EK certificate at NV 0x01c00002".to_string());
            return Ok(None);
        }
        Err(e) => match classify(step, e) {
            err @ TpmError::Unreachable { .. } => return Err(err),
            other => {
                warnings.push(other.to_string());
                return Ok(None);
            }
        },
    };
    match parse_ek_cert(&der, ek_unique) {
        Ok((info, warning)) => {
            warnings.extend(warning);
            Ok(Some(info))
        }
        Err(why) => {
            warnings.push(format!("EK certificate at NV 0x01c00002 {why}"));
            Ok(None)
        }
    }
}

/// Subject, issuer and thumbprint of an EK certificate read from NV (which may carry
/// padding after the DER). Also checks its RSA modulus against the EK's unique field.
pub fn parse_ek_cert(
    nv_bytes: &[u8],
    ek_unique: Option<&[u8]>,
) -> Result<(EkCertInfo, Option<String>), String> {
    use x509_parser::prelude::*;
    let (rest, cert) = X509Certificate::from_der(nv_bytes)
        .map_err(|e| format!("is not a DER X.509 certificate: {e}"))?;
    let der = &nv_bytes[..nv_bytes.len() - rest.len()];
    let mut warning = None;
    if let (Some(unique), Ok(x509_parser::public_key::PublicKey::RSA(rsa))) =
        (ek_unique, cert.public_key().parsed())
    {
        let modulus = strip_leading_zeros(rsa.modulus);
        if modulus != strip_leading_zeros(unique) {
            warning = Some(
                "EK certificate does not match the EK (RSA modulus differs): the EK at \
                 0x81010001 was not made from the TCG default template"
                    .to_string(),
            );
        }
    }
    Ok((
        EkCertInfo {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            sha256_hex: hex::encode(Sha256::digest(der)),
        },
        warning,
    ))
}

fn strip_leading_zeros(b: &[u8]) -> &[u8] {
    let n = b.iter().take_while(|x| **x == 0).count();
    &b[n..]
}

// ---------------------------------------------------------------------------------------
// The per-slot worker
// ---------------------------------------------------------------------------------------

struct Job {
    req: EkRequest,
    progress: Progress,
    reply: tokio::sync::oneshot::Sender<Result<EkInfo, TpmError>>,
}

struct Thread {
    tx: mpsc::Sender<Job>,
    generation: u64,
}

/// The one owner of a slot's TPM work: a thread that runs one board at a time. A job that
/// outlives its timeout (a hung TPM inside an uncancellable FFI call) is abandoned: the
/// caller gets [`TpmError::Timeout`] and later jobs go to a fresh thread; the stuck thread
/// exits by itself when the TSS call returns.
pub struct TpmWorker {
    slot: String,
    thread: Mutex<Option<Thread>>,
    generations: std::sync::atomic::AtomicU64,
}

impl fmt::Debug for TpmWorker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TpmWorker")
            .field("slot", &self.slot)
            .finish()
    }
}

impl TpmWorker {
    /// Start the worker thread for `slot` (the name is used for the thread name and errors).
    pub fn spawn(slot: &str) -> Self {
        let w = TpmWorker {
            slot: slot.to_string(),
            thread: Mutex::new(None),
            generations: std::sync::atomic::AtomicU64::new(0),
        };
        if let Ok(mut t) = w.thread.lock() {
            *t = spawn_thread(slot, w.next_generation()).ok();
        }
        w
    }

    fn next_generation(&self) -> u64 {
        self.generations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    pub fn slot(&self) -> &str {
        &self.slot
    }

    /// Read one board's EK on this slot's thread, giving up after `req.timeout`.
    pub async fn read_ek(&self, req: EkRequest) -> Result<EkInfo, TpmError> {
        let timeout = req.timeout;
        let progress = Progress::default();
        progress.set(&format!("waiting for the TPM worker of slot {}", self.slot));
        let (reply, rx) = tokio::sync::oneshot::channel();
        let generation = self.submit(Job {
            req,
            progress: progress.clone(),
            reply,
        })?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => {
                // The thread ended without answering (it panicked): replace it.
                self.replace(generation);
                Err(TpmError::Unreachable {
                    step: progress.get(),
                    detail: format!("the TPM worker of slot {} stopped", self.slot),
                })
            }
            Err(_) => {
                // Lets a relay close its connections, so the stuck TSS call can return.
                progress.abandon();
                self.replace(generation);
                Err(TpmError::Timeout {
                    step: progress.get(),
                    timeout,
                })
            }
        }
    }

    /// Queue a job; returns the generation of the thread that took it.
    fn submit(&self, job: Job) -> Result<u64, TpmError> {
        let mut guard = self.thread.lock().map_err(|_| self.gone("lock poisoned"))?;
        let mut job = job;
        for _ in 0..2 {
            if guard.is_none() {
                *guard = Some(
                    spawn_thread(&self.slot, self.next_generation())
                        .map_err(|e| self.gone(&format!("cannot start a thread: {e}")))?,
                );
            }
            let Some(t) = guard.as_ref() else { break };
            match t.tx.send(job) {
                Ok(()) => return Ok(t.generation),
                Err(mpsc::SendError(j)) => {
                    job = j;
                    *guard = spawn_thread(&self.slot, self.next_generation()).ok();
                }
            }
        }
        Err(self.gone("no worker thread"))
    }

    /// Abandon the thread of `generation` (if it is still current) for a fresh one.
    fn replace(&self, generation: u64) {
        if let Ok(mut guard) = self.thread.lock() {
            let current = guard.as_ref().map(|t| t.generation);
            if current == Some(generation) || current.is_none() {
                tracing::warn!(
                    slot = %self.slot,
                    "TPM worker thread is stuck or gone; starting a replacement"
                );
                *guard = spawn_thread(&self.slot, self.next_generation()).ok();
            }
        }
    }

    fn gone(&self, why: &str) -> TpmError {
        TpmError::Unreachable {
            step: format!("handing the board to the TPM worker of slot {}", self.slot),
            detail: why.to_string(),
        }
    }
}

fn spawn_thread(slot: &str, generation: u64) -> std::io::Result<Thread> {
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name(format!("tpm-{slot}"))
        .spawn(move || {
            // Ends when every sender is gone (worker dropped or this thread replaced).
            while let Ok(job) = rx.recv() {
                if job.reply.is_closed() {
                    continue; // the caller already gave up
                }
                let result = read_ek_with_progress(&job.req, &job.progress);
                let _ = job.reply.send(result);
            }
        })?;
    Ok(Thread { tx, generation })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Azure/azure-iot-sdk-c#2286 via reference/tpm-ek.md §2 and DESIGN.md §6.
    const VECTOR_EK: &str = "AToAAQALAAMAsgAgg3GXZ0SEs/gakMyNRqXXJP1S124GUgtk8qHaGzMUaaoABgCAAEMAEAgAAAAAAAEAtKEADl/sNRgmYAjP6gXmbccRaJoTnVixisUaek0OwAzFGN70xt9ZOYp6fhIwfcft3fdVKOrKpXYcTe72CGNkGJGlQz5ti9n2pQ0uJhcX8aefh4Onm7lVlUCQAVp1K0r6zI8vkEXWsBIvwvxk0eMJbFaq146kbTkJHIGczb89RkFH2TX+CgXeZOG9oXQzUNwktmTUacspamune5Wywc/ce8HsDFYchyUHogFhrZ/LPnzyTDXO8sSC5z5dvsUBtUME3iRYDyKgZOfBtmRMqQewD+4iH+ZEJjtsyJiWR8hFhyKROnOuqXfNFwjd5IcNU4wtlKO0cLyXmTOfQK6Da1pr5Q==";

    #[test]
    fn registration_id_matches_the_azure_sdk_vector() {
        let ek = base64::engine::general_purpose::STANDARD
            .decode(VECTOR_EK)
            .unwrap();
        assert_eq!(ek.len(), 316);
        assert_eq!(
            hex::encode(Sha256::digest(&ek)),
            "c76c8a944842848256ad905ea3e4403d99c11e99bfabc3b60d5c0b2d9525f46e"
        );
        assert_eq!(
            ek_hash(&ek),
            "y5wivfciikcievvnsbpkhzcahwm4chuzx6v4hnqnlqfs3fjf6rxa"
        );
        // Hashing the TPMT (no size prefix) gives the wrong id from the reference.
        assert_eq!(
            ek_hash(&ek[2..]),
            "tklqc7v6ubgesgf24bbl2snms5cj6xp66bqne6yposdwpnbcbpca"
        );
    }

    #[test]
    fn tcg_template_has_256_zero_bytes_of_unique_and_the_l1_prefix() {
        let public = tcg_default_ek_template().unwrap();
        let unique = rsa_unique(&public).unwrap();
        assert_eq!(unique, vec![0u8; 256]);
        let bytes = tpm2b_public_bytes(public).unwrap();
        assert_eq!(bytes.len(), RSA2048_EK_TPM2B_LEN);
        let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
        // reference/tpm-ek.md §0: every TCG RSA-2048 EK starts with this (modulus follows).
        assert!(b64.starts_with(
            "AToAAQALAAMAsgAgg3GXZ0SEs/gakMyNRqXXJP1S124GUgtk8qHaGzMUaaoABgCAAEMAEAgAAAAAAAEA"
        ));
    }

    #[test]
    fn policy_names_round_trip() {
        for p in [
            EkPolicy::ReadOnly,
            EkPolicy::ReadOrCreate,
            EkPolicy::ReadOrCreatePersist,
        ] {
            assert_eq!(p.as_str().parse::<EkPolicy>().unwrap(), p);
            assert_eq!(
                serde_json::to_string(&p).unwrap(),
                format!("\"{}\"", p.as_str())
            );
        }
        assert!("read_only".parse::<EkPolicy>().is_err());
    }

    #[test]
    fn tcti_strings_are_validated() {
        assert_eq!(
            parse_tcti("device:/dev/tpmrm0").unwrap().kind(),
            TctiKind::Device
        );
        assert_eq!(
            parse_tcti("swtpm:host=127.0.0.1,port=2321").unwrap().kind(),
            TctiKind::Swtpm
        );
        assert_eq!(
            parse_tcti("mssim:port=2321,host=localhost").unwrap().kind(),
            TctiKind::Mssim
        );
        assert_eq!(
            parse_tcti("tabrmd:bus_name=com.intel.tss2.Tabrmd,bus_type=session")
                .unwrap()
                .kind(),
            TctiKind::Tabrmd
        );
        let unix = parse_tcti("swtpm:path=/run/swtpm/board.sock").unwrap();
        assert_eq!(unix.kind(), TctiKind::Swtpm);
        assert!(unix.name_conf().is_none());
        assert_eq!(
            unix.unix_sockets(),
            Some((
                Path::new("/run/swtpm/board.sock"),
                Path::new("/run/swtpm/board.sock.ctrl")
            ))
        );
        assert!(parse_tcti("swtpm:host=127.0.0.1,port=2321")
            .unwrap()
            .unix_sockets()
            .is_none());
        // sun_path holds 107 bytes; the control socket's name is 5 bytes longer.
        let long = format!("/{}", "s".repeat(101));
        assert!(parse_tcti(&format!("swtpm:path={long}")).is_ok());
        let err = parse_tcti(&format!("swtpm:path={long}x")).unwrap_err();
        assert!(err.to_string().contains("107 bytes"), "{err}");
        for bad in [
            "",
            "tpm:/dev/tpm0",
            "device",
            "device:tpmrm0",
            "swtpm:host=127.0.0.1,prot=2321",
            "swtpm:port=0",
            "swtpm:port=99999",
            "swtpm:path=",
            "swtpm:path=/tmp/a.sock,port=2321",
            "swtpm:host=127.0.0.1,path=/tmp/a.sock",
            "swtpm:path=/tmp/a.sock,path=/tmp/b.sock",
            "swtpm:path=/tmp/a.sock,ctrl=/tmp/b.sock",
            "mssim:path=/tmp/a.sock",
            "swtpm:host=-bad-",
            "tabrmd:bus_type=user",
        ] {
            let err = parse_tcti(bad).unwrap_err();
            assert!(matches!(err, TpmError::BadTcti { .. }), "{bad}: {err}");
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn auth_files_take_hex_or_str_and_never_echo_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("auth");
        std::fs::write(&p, "hex:00ff10\n").unwrap();
        assert_eq!(load_auth_file(&p).unwrap().expose(), &vec![0u8, 0xff, 0x10]);
        std::fs::write(&p, "str:hunter2\n").unwrap();
        assert_eq!(load_auth_file(&p).unwrap().expose(), b"hunter2");
        std::fs::write(&p, "hunter2-secret").unwrap();
        let err = load_auth_file(&p).unwrap_err();
        assert!(matches!(err, TpmError::BadAuthFile { .. }));
        assert!(!err.to_string().contains("hunter2"), "{err}");
        std::fs::write(&p, "hex:zzsecret").unwrap();
        let err = load_auth_file(&p).unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
        std::fs::write(&p, format!("hex:{}", "00".repeat(65))).unwrap();
        assert!(load_auth_file(&p).is_err());
        assert!(load_auth_file(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn error_messages_name_the_step_and_code() {
        assert_eq!(
            TpmError::NoEk.to_string(),
            "reading EK at 0x81010001: TPM_RC_HANDLE (no persistent EK; set ek = \"read-or-create\")"
        );
        assert_eq!(TpmError::NoEk.reason(), "no-ek");
        let e = TpmError::SoftwareTpmRefused {
            manufacturer: "IBM".into(),
        };
        assert_eq!(e.reason(), "software-tpm");
        let e = classify(
            "reading EK at 0x81010001",
            tss_esapi::Error::Tss2Error(Tss2ResponseCode::from(0x18Bu32)),
        );
        assert_eq!(e.response_code(), Some(0x18B));
        assert_eq!(
            e.to_string(),
            "reading EK at 0x81010001: TPM_RC_HANDLE (0x18b)"
        );
        let e = classify(
            "reading EK at 0x81010001",
            tss_esapi::Error::Tss2Error(Tss2ResponseCode::from(0x000a_000au32)),
        );
        assert!(matches!(e, TpmError::Unreachable { .. }), "{e}");
        assert!(e.to_string().contains("TSS2_TCTI_RC_IO_ERROR"), "{e}");
        assert_eq!(e.reason(), "tpm-error");
    }
}
