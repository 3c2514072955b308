//! Validation: turn the merged layers into a [`Config`](super::Config), one function per
//! section, refusing impossible values with the layer, line and key they came from.
use std::path::PathBuf;
use std::time::Duration;

use regex::Regex;

use super::layers::{At, Loader};
use super::template::{check_json_templates, placeholders};
use super::*;
use crate::dps::RegistrationId;

pub(super) fn parse_fwid(s: &str) -> Result<(String, Vec<u8>), String> {
    let (alg, hexd) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} must look like sha256:HEX"))?;
    let alg = alg.to_ascii_lowercase();
    let want = match alg.as_str() {
        "sha256" => 32,
        "sha384" => 48,
        "sha512" => 64,
        _ => {
            return Err(format!(
                "unknown digest {alg:?}; use sha256, sha384 or sha512"
            ))
        }
    };
    let bytes = hex::decode(hexd).map_err(|e| format!("digest is not hex: {e}"))?;
    if bytes.len() != want {
        return Err(format!(
            "a {alg} digest is {want} bytes ({} hex digits), got {}",
            want * 2,
            bytes.len()
        ));
    }
    Ok((alg, bytes))
}

pub(super) fn is_loopback_host(host: &url::Host<&str>) -> bool {
    match host {
        url::Host::Domain(d) => d.eq_ignore_ascii_case("localhost"),
        url::Host::Ipv4(a) => a.is_loopback(),
        url::Host::Ipv6(a) => a.is_loopback(),
    }
}

/// Validate the merged layers into a [`Config`]: one function per section.
pub(super) fn build(
    l: &Loader,
    sources: Vec<PathBuf>,
    credentials_directory: Option<PathBuf>,
) -> Result<Config, ConfigError> {
    let dps = build_dps(l, &credentials_directory)?;
    let batch = build_batch(l)?;
    let state = build_state(l)?;
    let enrollment = build_enrollment(l)?;
    let dice = build_dice(l)?;
    let slots = build_slots(l, &enrollment, dice.as_ref())?;
    let serial = build_serial(l)?;
    let control = build_control(l)?;
    Ok(Config {
        dps,
        batch,
        state,
        enrollment,
        slots,
        dice,
        trigger: TriggerConfig { serial },
        control,
        sources,
        credentials_directory,
    })
}

/// Put a hint on a located error.
pub(super) fn with_hint(e: ConfigError, hint: &str) -> ConfigError {
    match e {
        ConfigError::Invalid(mut d) => {
            d.hint = Some(hint.to_string());
            ConfigError::Invalid(d)
        }
        other => other,
    }
}

/// `[dps]`
pub(super) fn build_dps(
    l: &Loader,
    credentials_directory: &Option<PathBuf>,
) -> Result<DpsConfig, ConfigError> {
    let a = &l.acc;
    if a.dps_seen.is_none() {
        return Err(l.missing(
            "dps",
            "the [dps] section is required",
            "add [dps] with connection_string_file = \"/path/to/file\"",
        ));
    }
    for (key, v) in [
        ("dps.connection_string", &a.dps.connection_string),
        ("dps.shared_access_key", &a.dps.shared_access_key),
    ] {
        if let Some(v) = v {
            return Err(with_hint(
                l.at(v, key, "secrets never live in the config file"),
                "put the connection string in a file (mode 0600) and set \
                 connection_string_file, or use systemd LoadCredential=dps-connection-string:PATH",
            ));
        }
    }
    let connection_string_file = match &a.dps.connection_string_file {
        Some(v) if v.value.trim().is_empty() => {
            return Err(l.at(v, "dps.connection_string_file", "must not be empty"))
        }
        Some(v) => Some(PathBuf::from(&v.value)),
        None => None,
    };
    if connection_string_file.is_none() && credentials_directory.is_none() {
        // Point at the `[dps]` table that lacks it.
        let (layer, span) = a.dps_seen.clone().unwrap_or((0, None));
        return Err(with_hint(
            l.diag(
                layer,
                span,
                Some(String::from("dps.connection_string_file")),
                "no connection string source: set connection_string_file, or run under systemd \
                 with LoadCredential=dps-connection-string:PATH",
            ),
            "connection_string_file = \"/etc/dps-station/dps-connection-string\"",
        ));
    }
    let endpoint = match &a.dps.endpoint {
        None => None,
        Some(v) => {
            let u = url::Url::parse(&v.value).map_err(|e| {
                l.at(
                    v,
                    "dps.endpoint",
                    format!("{:?} is not a URL: {e}", v.value),
                )
            })?;
            match (u.scheme(), u.host()) {
                ("https", Some(_)) => {}
                ("http", Some(h)) if is_loopback_host(&h) => {}
                ("http", Some(_)) => {
                    return Err(with_hint(
                        l.at(
                            v,
                            "dps.endpoint",
                            "plain http is allowed only for loopback hosts",
                        ),
                        "use https://, or http://127.0.0.1:PORT for a local emulator",
                    ))
                }
                _ => {
                    return Err(l.at(
                        v,
                        "dps.endpoint",
                        format!("{:?} must be an http(s) URL with a host", v.value),
                    ))
                }
            }
            Some(v.value.clone())
        }
    };
    let api_version = match &a.dps.api_version {
        Some(v) if v.value.trim().is_empty() => {
            return Err(l.at(v, "dps.api_version", "must not be empty"))
        }
        Some(v) => v.value.clone(),
        None => String::from("2021-10-01"),
    };
    let request_timeout = match &a.dps.request_timeout {
        Some(v) => {
            let d = parse_duration(&v.value).map_err(|m| l.at(v, "dps.request_timeout", m))?;
            if d.is_zero() {
                return Err(l.at(v, "dps.request_timeout", "must be more than zero"));
            }
            d
        }
        None => Duration::from_secs(30),
    };
    let max_operations_per_minute = match &a.dps.max_operations_per_minute {
        Some(v) => u32::try_from(v.value)
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| {
                l.at(
                    v,
                    "dps.max_operations_per_minute",
                    format!("must be between 1 and {}, got {}", u32::MAX, v.value),
                )
            })?,
        None => 1000,
    };
    let dps = DpsConfig {
        connection_string_file,
        endpoint,
        ca_file: a.dps.ca_file.as_ref().map(|v| PathBuf::from(&v.value)),
        api_version,
        request_timeout,
        max_operations_per_minute,
    };
    Ok(dps)
}

/// `[batch]`
pub(super) fn build_batch(l: &Loader) -> Result<BatchConfig, ConfigError> {
    let a = &l.acc;
    let max_size = match &a.batch.max_size {
        Some(v) => usize::try_from(v.value)
            .ok()
            .filter(|n| (1..=MAX_BULK_SIZE).contains(n))
            .ok_or_else(|| {
                with_hint(
                    l.at(
                        v,
                        "batch.max_size",
                        format!("must be between 1 and {MAX_BULK_SIZE}, got {}", v.value),
                    ),
                    "DPS bulk operations take at most 10 enrollments",
                )
            })?,
        None => MAX_BULK_SIZE,
    };
    let max_delay = match &a.batch.max_delay {
        Some(v) => parse_duration(&v.value).map_err(|m| l.at(v, "batch.max_delay", m))?,
        None => Duration::from_secs(2),
    };
    let batch = BatchConfig {
        max_size,
        max_delay,
    };
    Ok(batch)
}

/// `[state]`
pub(super) fn build_state(l: &Loader) -> Result<StateConfig, ConfigError> {
    let a = &l.acc;
    let state = StateConfig {
        path: match &a.state.path {
            Some(v) if v.value.trim().is_empty() => {
                return Err(l.at(v, "state.path", "must not be empty"))
            }
            Some(v) => PathBuf::from(&v.value),
            None => PathBuf::from("/var/lib/dps-station/station.db"),
        },
    };
    Ok(state)
}

/// `[enrollment]`
pub(super) fn build_enrollment(l: &Loader) -> Result<EnrollmentTemplate, ConfigError> {
    let a = &l.acc;
    let e = &a.enrollment;
    let tmpl = |v: &Option<At<String>>, key: &str| -> Result<Option<String>, ConfigError> {
        match v {
            Some(v) => {
                placeholders(&v.value).map_err(|m| l.at(v, key, m))?;
                Ok(Some(v.value.clone()))
            }
            None => Ok(None),
        }
    };
    let registration_id = tmpl(&e.registration_id, "enrollment.registration_id")?
        .unwrap_or_else(|| String::from("{ek_hash}"));
    let device_id = match tmpl(&e.device_id, "enrollment.device_id")? {
        Some(s) if s.is_empty() => None,
        Some(s) => Some(s),
        None => Some(String::from("{serial}")),
    };
    let provisioning_status = match &e.provisioning_status {
        Some(v) if v.value == "enabled" || v.value == "disabled" => Some(v.value.clone()),
        Some(v) => {
            return Err(l.at(
                v,
                "enrollment.provisioning_status",
                format!("must be \"enabled\" or \"disabled\", got {:?}", v.value),
            ))
        }
        None => Some(String::from("enabled")),
    };
    let allocation_policy = match &e.allocation_policy {
        Some(v) => {
            let wire = match v.value.as_str() {
                "hashed" => "hashed",
                "geoLatency" | "geo_latency" | "geo-latency" => "geoLatency",
                "static" => "static",
                "custom" => "custom",
                _ => {
                    return Err(l.at(
                        v,
                        "enrollment.allocation_policy",
                        format!(
                            "must be hashed, geoLatency, static or custom, got {:?}",
                            v.value
                        ),
                    ))
                }
            };
            Some(wire.to_string())
        }
        None => None,
    };
    let initial_twin = match &e.initial_twin {
        Some((layer, twin)) => {
            let j = twin.to_json();
            check_json_templates(&j).map_err(|f| {
                // The merged twin keeps no spans: find the string in the layers, the
                // latest first (it is the one that won the merge).
                let (layer, span) = l
                    .find_text(&f.text)
                    .map(|(layer, span)| (layer, Some(span)))
                    .unwrap_or((*layer, None));
                let key = if f.path.is_empty() {
                    String::from("enrollment.initial_twin")
                } else {
                    format!("enrollment.initial_twin.{}", f.path)
                };
                l.diag(layer, span, Some(key), f.message)
            })?;
            Some(j)
        }
        None => None,
    };
    let enrollment = EnrollmentTemplate {
        registration_id,
        device_id,
        provisioning_status,
        iot_hub_host_name: tmpl(&e.iot_hub_host_name, "enrollment.iot_hub_host_name")?,
        allocation_policy,
        iot_hubs: e.iot_hubs.as_ref().map(|v| v.value.clone()),
        reprovision_policy: e.reprovision_policy.as_ref().map(|v| v.value),
        capabilities: e.capabilities.as_ref().map(|v| v.value),
        custom_allocation_definition: e
            .custom_allocation_definition
            .as_ref()
            .map(|v| v.value.clone()),
        initial_twin,
    };
    Ok(enrollment)
}

/// `[dice]` (validated before the slots that need it)
pub(super) fn build_dice(l: &Loader) -> Result<Option<DiceConfig>, ConfigError> {
    let a = &l.acc;
    let dice = match a.dice_seen {
        None => None,
        Some(_) => {
            let d = &a.dice;
            let path_or = |v: &Option<At<String>>, default: &str| {
                v.as_ref()
                    .map(|v| PathBuf::from(&v.value))
                    .unwrap_or_else(|| PathBuf::from(default))
            };
            let fwid = match &d.fwid {
                Some(v) => {
                    parse_fwid(&v.value).map_err(|m| l.at(v, "dice.fwid", m))?;
                    v.value.to_ascii_lowercase()
                }
                None => format!("sha256:{}", "0".repeat(64)),
            };
            let validity_days = match &d.validity_days {
                Some(v) => u32::try_from(v.value)
                    .ok()
                    .filter(|n| (1..=36500).contains(n))
                    .ok_or_else(|| {
                        l.at(
                            v,
                            "dice.validity_days",
                            format!("must be between 1 and 36500, got {}", v.value),
                        )
                    })?,
                None => 3650,
            };
            let enroll = match &d.enroll {
                Some(v) => match v.value.as_str() {
                    "individual" => DiceEnroll::Individual,
                    "group" => DiceEnroll::Group,
                    _ => {
                        return Err(l.at(
                            v,
                            "dice.enroll",
                            format!("must be \"individual\" or \"group\", got {:?}", v.value),
                        ))
                    }
                },
                None => DiceEnroll::Individual,
            };
            let group_id = match &d.group_id {
                Some(v) => {
                    RegistrationId::parse(&v.value)
                        .map_err(|e| l.at(v, "dice.group_id", e.to_string()))?;
                    Some(v.value.clone())
                }
                None => None,
            };
            if enroll == DiceEnroll::Group && group_id.is_none() {
                let (layer, span) = a.dice_seen.clone().unwrap_or((0, None));
                return Err(l.diag(
                    layer,
                    span,
                    Some(String::from("dice.group_id")),
                    "enroll = \"group\" needs group_id (the enrollment group the CA is enrolled as)",
                ));
            }
            Some(DiceConfig {
                ca_cert: path_or(&d.ca_cert, "/etc/dps-station/ca/intermediate.pem"),
                ca_key: path_or(&d.ca_key, "/etc/dps-station/ca/intermediate.key"),
                fwid,
                validity_days,
                out_dir: path_or(&d.out_dir, "/var/lib/dps-station/dice"),
                enroll,
                group_id,
                tcb_info_critical: d.tcb_info_critical.as_ref().is_some_and(|v| v.value),
            })
        }
    };
    Ok(dice)
}

/// `[[slot]]`
pub(super) fn build_slots(
    l: &Loader,
    enrollment: &EnrollmentTemplate,
    dice: Option<&DiceConfig>,
) -> Result<Vec<SlotConfig>, ConfigError> {
    let a = &l.acc;
    if a.slots.is_empty() {
        return Err(l.missing(
            "slot",
            "at least one [[slot]] is required",
            "add [[slot]] with name = \"fixture-1\" and attestation = \"tpm\"",
        ));
    }
    let mut slots = Vec::new();
    for entry in &a.slots {
        let s = &entry.acc;
        let name = entry.name.clone();
        let key = |k: &str| format!("slot[{name}].{k}");
        if let Some(n) = &s.name {
            let ok = !name.is_empty()
                && name.len() <= 64
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                && name
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphanumeric());
            if !ok {
                return Err(l.at(
                    n,
                    "slot.name",
                    format!(
                        "{name:?} is not a slot name: 1-64 of A-Z a-z 0-9 - _ . starting with a letter or digit"
                    ),
                ));
            }
        }
        let attestation = match &s.attestation {
            Some(v) => match v.value.as_str() {
                "tpm" => Attestation::Tpm,
                "dice" => Attestation::Dice,
                _ => {
                    return Err(l.at(
                        v,
                        &key("attestation"),
                        format!("must be \"tpm\" or \"dice\", got {:?}", v.value),
                    ))
                }
            },
            None => {
                let (layer, span) = entry.first.clone();
                return Err(l.diag(
                    layer,
                    span,
                    Some(key("attestation")),
                    "is required (\"tpm\" or \"dice\")",
                ));
            }
        };
        let tcti = match (attestation, &s.tcti) {
            (Attestation::Tpm, Some(v)) => {
                validate_tcti(&v.value).map_err(|m| l.at(v, &key("tcti"), m))?;
                Some(v.value.clone())
            }
            (Attestation::Tpm, None) => Some(DEFAULT_TCTI.to_string()),
            (Attestation::Dice, Some(v)) => {
                return Err(l.at(v, &key("tcti"), "only TPM slots have a TCTI"))
            }
            (Attestation::Dice, None) => None,
        };
        let ek = match &s.ek {
            Some(v) if attestation == Attestation::Dice => {
                return Err(l.at(v, &key("ek"), "only TPM slots have an EK policy"))
            }
            Some(v) => v
                .value
                .parse::<EkPolicy>()
                .map_err(|e| l.at(v, &key("ek"), e.to_string()))?,
            None => EkPolicy::ReadOrCreate,
        };
        if attestation == Attestation::Dice {
            if let Some(v) = &s.endorsement_auth_file {
                return Err(l.at(v, &key("endorsement_auth_file"), "only TPM slots have one"));
            }
        }
        let registration_id = match &s.registration_id {
            Some(v) => {
                placeholders(&v.value).map_err(|m| l.at(v, &key("registration_id"), m))?;
                Some(v.value.clone())
            }
            None => None,
        };
        if attestation == Attestation::Dice {
            let effective = registration_id
                .as_deref()
                .unwrap_or(&enrollment.registration_id);
            if placeholders(effective).is_ok_and(|p| p.contains("ek_hash")) {
                let (layer, span) = match &s.registration_id {
                    Some(v) => (v.layer, Some(v.span.clone())),
                    None => entry.first.clone(),
                };
                return Err(with_hint(
                    l.diag(
                        layer,
                        span,
                        Some(key("registration_id")),
                        format!("a dice slot has no EK, so {effective:?} cannot be used"),
                    ),
                    "set registration_id = \"board-{serial}\" on the dice slot",
                ));
            }
            if dice.is_none() {
                let v = s.attestation.as_ref();
                let (layer, span) = v
                    .map(|v| (v.layer, Some(v.span.clone())))
                    .unwrap_or_else(|| entry.first.clone());
                return Err(with_hint(
                    l.diag(
                        layer,
                        span,
                        Some(key("attestation")),
                        "a dice slot needs a [dice] section",
                    ),
                    "add [dice] with ca_cert, ca_key and fwid",
                ));
            }
        }
        // The template must give a valid registration id for an ordinary serial: a literal
        // that can never work (a space, a leading '-', too long for X.509) is refused here,
        // on its line, not at every scan.
        {
            let effective = registration_id
                .as_deref()
                .unwrap_or(&enrollment.registration_id);
            let ek = "a".repeat(52);
            let sample = super::template::substitute(effective, "SN0001", &name, Some(&ek))
                .map(|t| t.to_ascii_lowercase());
            let parsed = sample.and_then(|id| {
                match attestation {
                    Attestation::Tpm => RegistrationId::parse(&id),
                    Attestation::Dice => RegistrationId::parse_x509(&id),
                }
                .map(|_| ())
                .map_err(|e| format!("{effective:?} gives {id:?} for serial SN0001: {e}"))
            });
            if let Err(m) = parsed {
                return Err(match (&s.registration_id, &a.enrollment.registration_id) {
                    (Some(v), _) => l.at(v, &key("registration_id"), m),
                    (None, Some(v)) => l.at(v, "enrollment.registration_id", m),
                    (None, None) => {
                        let (layer, span) = entry.first.clone();
                        l.diag(layer, span, Some(key("registration_id")), m)
                    }
                });
            }
        }
        let tpm_timeout = match &s.tpm_timeout {
            Some(v) => {
                let d = parse_duration(&v.value).map_err(|m| l.at(v, &key("tpm_timeout"), m))?;
                if d.is_zero() {
                    return Err(l.at(v, &key("tpm_timeout"), "must be more than zero"));
                }
                d
            }
            None => Duration::from_secs(10),
        };
        slots.push(SlotConfig {
            name,
            attestation,
            tcti,
            ek,
            registration_id,
            endorsement_auth_file: s
                .endorsement_auth_file
                .as_ref()
                .map(|v| PathBuf::from(&v.value)),
            require_hardware_tpm: s.require_hardware_tpm.as_ref().is_some_and(|v| v.value),
            tpm_timeout,
        });
    }
    Ok(slots)
}

/// `[trigger.serial]`
pub(super) fn build_serial(l: &Loader) -> Result<Option<SerialConfig>, ConfigError> {
    let a = &l.acc;
    let serial = match &a.serial_seen {
        None => None,
        Some((layer, span)) => {
            let s = &a.serial;
            let port = match &s.port {
                Some(v) if v.value.trim().is_empty() => {
                    return Err(l.at(v, "trigger.serial.port", "must not be empty"))
                }
                Some(v) => PathBuf::from(&v.value),
                None => {
                    return Err(l.diag(
                        *layer,
                        span.clone(),
                        Some(String::from("trigger.serial.port")),
                        "is required in [trigger.serial] (e.g. \"/dev/ttyACM0\")",
                    ))
                }
            };
            let baud = match &s.baud {
                Some(v) => u32::try_from(v.value)
                    .ok()
                    .filter(|n| (50..=4_000_000).contains(n))
                    .ok_or_else(|| {
                        l.at(
                            v,
                            "trigger.serial.baud",
                            format!("must be between 50 and 4000000, got {}", v.value),
                        )
                    })?,
                None => 9600,
            };
            let (pattern, at) = match &s.line_pattern {
                Some(v) => (v.value.as_str(), Some(v)),
                None => (DEFAULT_LINE_PATTERN, None),
            };
            let fail = |m: String| match at {
                Some(v) => l.at(v, "trigger.serial.line_pattern", m),
                None => l.diag(
                    *layer,
                    None,
                    Some(String::from("trigger.serial.line_pattern")),
                    m,
                ),
            };
            let re = Regex::new(pattern).map_err(|e| fail(format!("not a valid regex: {e}")))?;
            if !re.capture_names().any(|n| n == Some("serial")) {
                return Err(fail(String::from(
                    "needs a named group (?P<serial>…); (?P<slot>…) is optional",
                )));
            }
            Some(SerialConfig {
                port,
                baud,
                line_pattern: re,
                reply: s.reply.as_ref().map_or(true, |v| v.value),
            })
        }
    };
    Ok(serial)
}

/// `[control]`
pub(super) fn build_control(l: &Loader) -> Result<ControlConfig, ConfigError> {
    let a = &l.acc;
    let control = ControlConfig {
        socket: match &a.control.socket {
            Some(v) if v.value.trim().is_empty() => {
                return Err(l.at(v, "control.socket", "must not be empty"))
            }
            Some(v) => PathBuf::from(&v.value),
            None => PathBuf::from("/run/dps-station/control.sock"),
        },
        http: match &a.control.http {
            Some(v) if v.value.trim().is_empty() => None,
            Some(v) => {
                v.value.parse::<std::net::SocketAddr>().map_err(|_| {
                    l.at(
                        v,
                        "control.http",
                        format!(
                            "{:?} is not ADDRESS:PORT (e.g. \"127.0.0.1:9184\"); \"\" disables it",
                            v.value
                        ),
                    )
                })?;
                Some(v.value.clone())
            }
            None => Some(String::from("127.0.0.1:9184")),
        },
    };
    Ok(control)
}
