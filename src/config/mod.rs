//! Station configuration (DESIGN.md §4): TOML, layered, validated once at load with errors
//! that name the file, the line and the key.
//!
//! Layers, lowest first: built-in defaults < the main file < `config.d/*.toml` next to it
//! (sorted by name) < environment variables `DPS_STATION__SECTION__KEY` (values parsed as TOML
//! values, falling back to strings). A `[[slot]]` in a later layer with the name of an earlier
//! one changes that slot; a new name adds a slot.
//!
//! This module must never hold a DPS secret that came from the TOML (a `connection_string` or
//! `shared_access_key` key is refused) and never puts a secret into an error message: the
//! connection string is read from its file only by [`Config::read_connection_string`], into a
//! [`Secret`].
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use regex::Regex;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::dps::RegistrationId;
use crate::secret::Secret;

mod layers;
mod template;
mod validate;

use layers::Loader;
use template::{substitute, substitute_json};
use validate::{build, parse_fwid};

/// Where `dps-station` looks for its config when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/dps-station/station.toml";
/// The systemd credential name (`LoadCredential=dps-connection-string:…`).
pub const CREDENTIAL_NAME: &str = "dps-connection-string";
/// Prefix of configuration environment variables (`DPS_STATION__BATCH__MAX_DELAY=5s`).
pub const ENV_PREFIX: &str = "DPS_STATION__";
/// DPS bulk operations take at most this many enrollments (reference/dps-api.md).
pub const MAX_BULK_SIZE: usize = 10;
/// The default scanner line pattern (DESIGN.md §4).
pub const DEFAULT_LINE_PATTERN: &str = "^(?:(?P<slot>[a-z0-9-]+):)?(?P<serial>[A-Z0-9-]{4,32})$";
/// The default TCTI of a TPM slot.
pub const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";

// ---------------------------------------------------------------------------------------------
// The validated configuration.
// ---------------------------------------------------------------------------------------------

/// The station configuration after layering and validation.
#[derive(Debug, Clone)]
pub struct Config {
    pub dps: DpsConfig,
    pub batch: BatchConfig,
    pub state: StateConfig,
    pub enrollment: EnrollmentTemplate,
    pub slots: Vec<SlotConfig>,
    pub dice: Option<DiceConfig>,
    pub trigger: TriggerConfig,
    pub control: ControlConfig,
    /// The files that contributed, in the order they were applied.
    pub sources: Vec<PathBuf>,
    /// `$CREDENTIALS_DIRECTORY` as seen at load time (systemd `LoadCredential=`).
    pub credentials_directory: Option<PathBuf>,
}

/// `[dps]`: where and how the DPS service is reached.
#[derive(Debug, Clone)]
pub struct DpsConfig {
    /// File holding the connection string; `None` means `$CREDENTIALS_DIRECTORY/dps-connection-string`.
    pub connection_string_file: Option<PathBuf>,
    /// Override of `https://{HostName}`; plain http only for loopback hosts.
    pub endpoint: Option<String>,
    /// Extra trust anchors (PEM).
    pub ca_file: Option<PathBuf>,
    pub api_version: String,
    pub request_timeout: Duration,
    pub max_operations_per_minute: u32,
}

/// `[batch]`: bulk create batching.
#[derive(Debug, Clone)]
pub struct BatchConfig {
    /// 1..=10.
    pub max_size: usize,
    /// Linger, counted from the oldest queued row not yet sent.
    pub max_delay: Duration,
}

/// `[state]`: the SQLite journal.
#[derive(Debug, Clone)]
pub struct StateConfig {
    pub path: PathBuf,
}

/// `[enrollment]`: the template of every board's individual enrollment. Strings may hold the
/// placeholders `{serial}`, `{slot}` and `{ek_hash}`.
#[derive(Debug, Clone)]
pub struct EnrollmentTemplate {
    pub registration_id: String,
    pub device_id: Option<String>,
    pub provisioning_status: Option<String>,
    pub iot_hub_host_name: Option<String>,
    pub allocation_policy: Option<String>,
    pub iot_hubs: Option<Vec<String>>,
    pub reprovision_policy: Option<ReprovisionPolicy>,
    pub capabilities: Option<Capabilities>,
    pub custom_allocation_definition: Option<CustomAllocation>,
    /// The wire `initialTwin` object (`tags`, `properties.desired`), placeholders unsubstituted.
    pub initial_twin: Option<Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReprovisionPolicy {
    #[serde(default = "yes")]
    pub update_hub_assignment: bool,
    #[serde(default = "yes")]
    pub migrate_device_data: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    #[serde(default)]
    pub iot_edge: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomAllocation {
    pub webhook_url: String,
    pub api_version: String,
}

fn yes() -> bool {
    true
}

/// How a slot's boards prove their identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Attestation {
    Tpm,
    Dice,
}

impl Attestation {
    /// The name used in the config, the database and the export (`tpm` | `dice`).
    pub fn as_str(self) -> &'static str {
        match self {
            Attestation::Tpm => "tpm",
            Attestation::Dice => "dice",
        }
    }
}

impl fmt::Display for Attestation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a TPM slot may do when the persistent EK (0x81010001) is missing (the TPM
/// module's type, so a slot's policy goes to `read_ek` unchanged).
pub use crate::attest::tpm::EkPolicy;

/// One `[[slot]]`: a fixture position and how its boards attest.
#[derive(Debug, Clone)]
pub struct SlotConfig {
    pub name: String,
    pub attestation: Attestation,
    /// The TCTI of a TPM slot (validated); `None` for dice slots.
    pub tcti: Option<String>,
    pub ek: EkPolicy,
    /// Overrides `[enrollment] registration_id` for this slot.
    pub registration_id: Option<String>,
    /// File holding the endorsement hierarchy auth value, if the TPM has one.
    pub endorsement_auth_file: Option<PathBuf>,
    /// Refuse software TPMs (the EK certificate / manufacturer check is the TPM engineer's).
    pub require_hardware_tpm: bool,
    /// Bound on one board's TPM work.
    pub tpm_timeout: Duration,
}

/// DICE enrollment mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiceEnroll {
    /// One individual enrollment per board (the Alias certificate).
    Individual,
    /// Boards chain to a CA enrolled as a group: no per-board DPS call.
    Group,
}

/// `[dice]`: the station CA and the DICE profile (DESIGN.md §6).
#[derive(Debug, Clone)]
pub struct DiceConfig {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    /// `sha256:HEX` (validated: a known algorithm and a digest of its length).
    pub fwid: String,
    pub validity_days: u32,
    pub out_dir: PathBuf,
    pub enroll: DiceEnroll,
    /// Enrollment group id, required when `enroll = "group"`.
    pub group_id: Option<String>,
    pub tcb_info_critical: bool,
}

impl DiceConfig {
    /// The FWID split into its algorithm name and digest bytes.
    pub fn fwid_parts(&self) -> (String, Vec<u8>) {
        match parse_fwid(&self.fwid) {
            Ok(p) => p,
            // Validated at load; unreachable in practice, but never panic.
            Err(_) => (String::from("sha256"), vec![0; 32]),
        }
    }
}

/// `[trigger]`: where scans come from besides the control socket.
#[derive(Debug, Clone, Default)]
pub struct TriggerConfig {
    pub serial: Option<SerialConfig>,
}

/// `[trigger.serial]`: a barcode scanner or fixture controller on a serial line (DESIGN.md §5).
#[derive(Debug, Clone)]
pub struct SerialConfig {
    pub port: PathBuf,
    pub baud: u32,
    /// Has a `serial` named group and optionally a `slot` group.
    pub line_pattern: Regex,
    pub reply: bool,
}

/// `[control]`: the control socket and the HTTP status endpoint.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub socket: PathBuf,
    /// `None` when `http = ""` (disabled).
    pub http: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Errors.
// ---------------------------------------------------------------------------------------------

/// A config problem located in a file (with line) or an environment variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file path or `environment variable NAME`.
    pub origin: String,
    pub line: Option<usize>,
    /// Dotted key, e.g. `batch.max_size` or `slot[fixture-1].tcti`.
    pub key: Option<String>,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.origin)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        f.write_str(": ")?;
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// Everything that can go wrong loading the config or using it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value, key or structure problem, located.
    #[error("{0}")]
    Invalid(Box<Diagnostic>),
    /// The config file (or config.d) could not be read.
    #[error("config file {}: {reason}", path.display())]
    Read { path: PathBuf, reason: String },
    /// The connection string could not be read. Never carries the content.
    #[error("DPS connection string: {reason}")]
    ConnectionString {
        reason: String,
        hint: Option<String>,
    },
    /// A template could not be rendered for one board.
    #[error("slot {slot}: {message}")]
    Template { slot: String, message: String },
}

impl ConfigError {
    /// A one-line suggestion for the operator, when there is one.
    pub fn hint(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid(d) => d.hint.as_deref(),
            ConfigError::ConnectionString { hint, .. } => hint.as_deref(),
            _ => None,
        }
    }
    /// The located diagnostic, for tests and `check --json`.
    pub fn diagnostic(&self) -> Option<&Diagnostic> {
        match self {
            ConfigError::Invalid(d) => Some(d),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Loading.
// ---------------------------------------------------------------------------------------------

/// Load `path`, then `config.d/*.toml` beside it (sorted), then `DPS_STATION__*` variables.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    load_with_env(path, &env)
}

/// [`load`] with an explicit environment (tests must not mutate the process environment).
/// Only `DPS_STATION__*` and `CREDENTIALS_DIRECTORY` are looked at.
pub fn load_with_env(path: &Path, env: &[(String, String)]) -> Result<Config, ConfigError> {
    let mut loader = Loader::new();
    let mut sources = Vec::new();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: path.to_path_buf(),
        reason: io_reason(&e),
    })?;
    loader.add(path.display().to_string(), text, false)?;
    sources.push(path.to_path_buf());

    let dir = path.parent().unwrap_or(Path::new(".")).join("config.d");
    if dir.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|e| ConfigError::Read {
                path: dir.clone(),
                reason: io_reason(&e),
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
            .collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).map_err(|e| ConfigError::Read {
                path: f.clone(),
                reason: io_reason(&e),
            })?;
            loader.add(f.display().to_string(), text, false)?;
            sources.push(f);
        }
    }

    let mut vars: Vec<&(String, String)> = env
        .iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    vars.sort();
    for (k, v) in vars {
        loader.add_env(k, v)?;
    }
    let creds = env
        .iter()
        .find(|(k, _)| k == "CREDENTIALS_DIRECTORY")
        .map(|(_, v)| PathBuf::from(v))
        .filter(|p| !p.as_os_str().is_empty());
    build(&loader, sources, creds)
}

/// Parse one TOML text with no config.d and no environment (tests, fuzzing). `origin` names
/// the text in errors.
pub fn load_str(text: &str, origin: &Path) -> Result<Config, ConfigError> {
    let mut loader = Loader::new();
    loader.add(origin.display().to_string(), text.to_string(), false)?;
    build(&loader, vec![origin.to_path_buf()], None)
}

fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => String::from("no such file"),
        std::io::ErrorKind::PermissionDenied => String::from("permission denied"),
        _ => e.to_string(),
    }
}

/// Parse a duration like `2s`, `500ms`, `1m 30s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration ({e}); write e.g. \"2s\" or \"500ms\""))
}

/// Validate a TCTI string with the TPM module's parser (the one `read_ek` uses).
pub fn validate_tcti(tcti: &str) -> Result<(), String> {
    crate::attest::tpm::parse_tcti(tcti)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------------------
// Using the config.
// ---------------------------------------------------------------------------------------------

impl Config {
    /// The slot with this name (exact match).
    pub fn slot(&self, name: &str) -> Option<&SlotConfig> {
        self.slots.iter().find(|s| s.name == name)
    }

    /// Where unprefixed scans go (DESIGN.md §5). Validation guarantees at least one slot.
    pub fn first_slot(&self) -> Option<&SlotConfig> {
        self.slots.first()
    }

    /// The file the connection string is read from: `[dps] connection_string_file`, else
    /// `$CREDENTIALS_DIRECTORY/dps-connection-string`.
    pub fn connection_string_path(&self) -> Option<PathBuf> {
        self.dps.connection_string_file.clone().or_else(|| {
            self.credentials_directory
                .as_ref()
                .map(|d| d.join(CREDENTIAL_NAME))
        })
    }

    /// Read the connection string (trimmed). Errors name the file, never its content.
    pub fn read_connection_string(&self) -> Result<Secret<String>, ConfigError> {
        let path = self
            .connection_string_path()
            .ok_or_else(|| ConfigError::ConnectionString {
                reason: String::from("no source configured"),
                hint: Some(String::from(
                    "set [dps] connection_string_file or systemd LoadCredential=dps-connection-string:PATH",
                )),
            })?;
        let mut raw =
            std::fs::read_to_string(&path).map_err(|e| ConfigError::ConnectionString {
                reason: format!("{}: {}", path.display(), io_reason(&e)),
                hint: None,
            })?;
        let trimmed = raw.trim().to_string();
        zeroize::Zeroize::zeroize(&mut raw);
        if trimmed.is_empty() {
            return Err(ConfigError::ConnectionString {
                reason: format!("{} is empty", path.display()),
                hint: Some(String::from(
                    "it should hold HostName=…;SharedAccessKeyName=…;SharedAccessKey=…",
                )),
            });
        }
        Ok(Secret::new(trimmed))
    }

    /// The registration id template that applies to `slot`.
    pub fn registration_id_template<'a>(&'a self, slot: &'a SlotConfig) -> &'a str {
        slot.registration_id
            .as_deref()
            .unwrap_or(&self.enrollment.registration_id)
    }

    /// Render one board's registration id and wire `IndividualEnrollment` (without
    /// `attestation`): camelCase keys, placeholders substituted everywhere.
    pub fn render_enrollment(
        &self,
        slot: &SlotConfig,
        serial: &str,
        ek_hash: Option<&str>,
    ) -> Result<(RegistrationId, Value), ConfigError> {
        let err = |message: String| ConfigError::Template {
            slot: slot.name.clone(),
            message,
        };
        let sub = |t: &str| substitute(t, serial, &slot.name, ek_hash).map_err(err);
        let id_text = sub(self.registration_id_template(slot))?.to_ascii_lowercase();
        let id = match slot.attestation {
            Attestation::Tpm => RegistrationId::parse(&id_text),
            Attestation::Dice => RegistrationId::parse_x509(&id_text),
        }
        .map_err(|e| err(e.to_string()))?;

        let t = &self.enrollment;
        let mut m = Map::new();
        m.insert("registrationId".into(), Value::String(id.to_string()));
        if let Some(d) = &t.device_id {
            m.insert("deviceId".into(), Value::String(sub(d)?));
        }
        if let Some(s) = &t.provisioning_status {
            m.insert("provisioningStatus".into(), Value::String(s.clone()));
        }
        if let Some(h) = &t.iot_hub_host_name {
            m.insert("iotHubHostName".into(), Value::String(sub(h)?));
        }
        if let Some(p) = &t.allocation_policy {
            m.insert("allocationPolicy".into(), Value::String(p.clone()));
        }
        if let Some(hubs) = &t.iot_hubs {
            let hubs = hubs.iter().map(|h| sub(h).map(Value::String));
            m.insert(
                "iotHubs".into(),
                Value::Array(hubs.collect::<Result<_, _>>()?),
            );
        }
        if let Some(r) = &t.reprovision_policy {
            m.insert(
                "reprovisionPolicy".into(),
                serde_json::json!({
                    "updateHubAssignment": r.update_hub_assignment,
                    "migrateDeviceData": r.migrate_device_data,
                }),
            );
        }
        if let Some(c) = &t.capabilities {
            m.insert(
                "capabilities".into(),
                serde_json::json!({ "iotEdge": c.iot_edge }),
            );
        }
        if let Some(c) = &t.custom_allocation_definition {
            m.insert(
                "customAllocationDefinition".into(),
                serde_json::json!({ "webhookUrl": sub(&c.webhook_url)?, "apiVersion": c.api_version }),
            );
        }
        if let Some(twin) = &t.initial_twin {
            let twin = substitute_json(twin, serial, &slot.name, ek_hash).map_err(err)?;
            m.insert("initialTwin".into(), twin);
        }
        Ok((id, Value::Object(m)))
    }
}
