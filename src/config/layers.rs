//! Configuration layers: each file, `config.d` file or environment variable is parsed into
//! "raw" tables whose every leaf is optional and keeps its byte span, then folded into one
//! accumulator (later layers win; `[[slot]]`s merge by name). Nothing here judges values;
//! it only knows where each one was written, so errors can name FILE:LINE and the key.
use std::collections::BTreeSet;
use std::ops::Range;

use serde::Deserialize;
use serde_json::{Map, Value};
use serde_spanned::Spanned;

use super::template::toml_to_json;
use super::{
    Capabilities, ConfigError, CustomAllocation, Diagnostic, ReprovisionPolicy, ENV_PREFIX,
};

// ---------------------------------------------------------------------------------------------
// Raw layers: every leaf is optional and remembers where it came from.
// ---------------------------------------------------------------------------------------------

/// A value plus the layer and byte span it was read from.
#[derive(Debug, Clone)]
pub(super) struct At<T> {
    pub(super) value: T,
    pub(super) layer: usize,
    pub(super) span: Range<usize>,
}

impl<T> At<T> {
    pub(super) fn new(s: Spanned<T>, layer: usize) -> Self {
        let span = s.span();
        At {
            value: s.into_inner(),
            layer,
            span,
        }
    }
}

macro_rules! section {
    ($raw:ident => $acc:ident { $($f:ident : $t:ty),* $(,)? } $(plain { $($pf:ident : $pt:ty),* $(,)? })?) => {
        #[derive(Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub(super) struct $raw {
            $( #[serde(default)] $f: Option<Spanned<$t>>, )*
            $($( #[serde(default)] $pf: Option<$pt>, )*)?
        }
        #[derive(Debug, Default)]
        pub(super) struct $acc {
            $( pub(super) $f: Option<At<$t>>, )*
            // Tables without a span of their own (implicit tables): the layer only.
            $($( pub(super) $pf: Option<(usize, $pt)>, )*)?
        }
        impl $raw {
            /// Where the earliest key of this table was written (tables themselves may be
            /// implicit, e.g. `[trigger]` + `serial.port = …`, and carry no span).
            #[allow(dead_code)]
            fn first_span(&self) -> Option<Range<usize>> {
                let mut first: Option<Range<usize>> = None;
                $( if let Some(v) = &self.$f {
                    let s = v.span();
                    if first.as_ref().map_or(true, |f| s.start < f.start) { first = Some(s); }
                } )*
                first
            }
        }
        impl $acc {
            fn absorb(&mut self, raw: $raw, layer: usize) {
                $( if let Some(v) = raw.$f { self.$f = Some(At::new(v, layer)); } )*
                $($( if let Some(v) = raw.$pf { self.$pf = Some((layer, v)); } )*)?
            }
        }
    };
}

section!(RawDps => AccDps {
    connection_string_file: String,
    endpoint: String,
    ca_file: String,
    api_version: String,
    request_timeout: String,
    max_operations_per_minute: i64,
    // Refused with a hint: secrets never live in the TOML.
    connection_string: toml::Value,
    shared_access_key: toml::Value,
});

section!(RawBatch => AccBatch { max_size: i64, max_delay: String });

section!(RawState => AccState { path: String });

section!(RawEnrollment => AccEnrollment {
    registration_id: String,
    device_id: String,
    provisioning_status: String,
    iot_hub_host_name: String,
    allocation_policy: String,
    iot_hubs: Vec<String>,
    reprovision_policy: ReprovisionPolicy,
    capabilities: Capabilities,
    custom_allocation_definition: CustomAllocation,
} plain { initial_twin: RawTwin });

/// `[enrollment.initial_twin]`: the wire InitialTwin (tags, properties.desired).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTwin {
    #[serde(default)]
    pub(super) tags: Option<toml::Table>,
    #[serde(default)]
    pub(super) properties: Option<RawTwinProperties>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTwinProperties {
    #[serde(default)]
    pub(super) desired: Option<toml::Table>,
}

impl RawTwin {
    /// Deep-merge `over` into `self` (later layers win key by key).
    fn merge(&mut self, over: RawTwin) {
        fn m(base: &mut Option<toml::Table>, over: Option<toml::Table>) {
            match (base.as_mut(), over) {
                (Some(b), Some(o)) => merge_tables(b, o),
                (None, Some(o)) => *base = Some(o),
                (_, None) => {}
            }
        }
        m(&mut self.tags, over.tags);
        if let Some(p) = over.properties {
            let mine = self
                .properties
                .get_or_insert_with(RawTwinProperties::default);
            m(&mut mine.desired, p.desired);
        }
    }

    pub(super) fn to_json(&self) -> Value {
        let mut twin = Map::new();
        if let Some(t) = &self.tags {
            twin.insert("tags".into(), toml_to_json(&toml::Value::Table(t.clone())));
        }
        if let Some(p) = &self.properties {
            let mut props = Map::new();
            if let Some(d) = &p.desired {
                props.insert(
                    "desired".into(),
                    toml_to_json(&toml::Value::Table(d.clone())),
                );
            }
            twin.insert("properties".into(), Value::Object(props));
        }
        Value::Object(twin)
    }
}

section!(RawSlot => AccSlot {
    name: String,
    attestation: String,
    tcti: String,
    ek: String,
    registration_id: String,
    endorsement_auth_file: String,
    require_hardware_tpm: bool,
    tpm_timeout: String,
});

section!(RawDice => AccDice {
    ca_cert: String,
    ca_key: String,
    fwid: String,
    validity_days: i64,
    out_dir: String,
    enroll: String,
    group_id: String,
    tcb_info_critical: bool,
});

section!(RawSerial => AccSerial { port: String, baud: i64, line_pattern: String, reply: bool });

section!(RawControl => AccControl { socket: String, http: String });

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTrigger {
    #[serde(default)]
    pub(super) serial: Option<RawSerial>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoot {
    #[serde(default)]
    pub(super) dps: Option<RawDps>,
    #[serde(default)]
    pub(super) batch: Option<RawBatch>,
    #[serde(default)]
    pub(super) state: Option<RawState>,
    #[serde(default)]
    pub(super) enrollment: Option<RawEnrollment>,
    #[serde(default)]
    pub(super) slot: Option<Vec<RawSlot>>,
    #[serde(default)]
    pub(super) dice: Option<RawDice>,
    #[serde(default)]
    pub(super) trigger: Option<RawTrigger>,
    #[serde(default)]
    pub(super) control: Option<RawControl>,
}

/// One slot as merged so far; `first` is where its `[[slot]]` table was first seen.
#[derive(Debug)]
pub(super) struct SlotEntry {
    pub(super) name: String,
    pub(super) first: (usize, Option<Range<usize>>),
    pub(super) acc: AccSlot,
}

#[derive(Debug, Default)]
pub(super) struct Acc {
    pub(super) dps_seen: Option<(usize, Option<Range<usize>>)>,
    pub(super) dps: AccDps,
    pub(super) batch: AccBatch,
    pub(super) state: AccState,
    pub(super) enrollment: AccEnrollment,
    pub(super) slots: Vec<SlotEntry>,
    pub(super) dice_seen: Option<(usize, Option<Range<usize>>)>,
    pub(super) dice: AccDice,
    pub(super) serial_seen: Option<(usize, Option<Range<usize>>)>,
    pub(super) serial: AccSerial,
    pub(super) control: AccControl,
}

/// One layer of configuration text and where it came from.
#[derive(Debug)]
pub(super) struct Layer {
    /// A file path, or `environment variable NAME`.
    pub(super) origin: String,
    pub(super) text: String,
    pub(super) is_env: bool,
}

pub(super) struct Loader {
    pub(super) layers: Vec<Layer>,
    pub(super) acc: Acc,
}

impl Loader {
    pub(super) fn new() -> Self {
        Loader {
            layers: Vec::new(),
            acc: Acc::default(),
        }
    }

    pub(super) fn diag(
        &self,
        layer: usize,
        span: Option<Range<usize>>,
        key: Option<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        let (origin, line) = match self.layers.get(layer) {
            Some(l) => (
                l.origin.clone(),
                match (&span, l.is_env) {
                    (Some(s), false) => Some(line_of(&l.text, s.start)),
                    _ => None,
                },
            ),
            None => (String::from("<config>"), None),
        };
        ConfigError::Invalid(Box::new(Diagnostic {
            origin,
            line,
            key,
            message: message.into(),
            hint: None,
        }))
    }

    /// A required thing is absent: reported against the main file, no line.
    pub(super) fn missing(&self, key: &str, message: &str, hint: &str) -> ConfigError {
        ConfigError::Invalid(Box::new(Diagnostic {
            origin: self
                .layers
                .first()
                .map(|x| x.origin.clone())
                .unwrap_or_default(),
            line: None,
            key: Some(key.to_string()),
            message: message.to_string(),
            hint: Some(hint.to_string()),
        }))
    }

    /// The latest layer and byte span where `needle` is written on a line that is not a
    /// comment (for values whose own span was lost in a merge).
    pub(super) fn find_text(&self, needle: &str) -> Option<(usize, Range<usize>)> {
        if needle.is_empty() {
            return None;
        }
        self.layers.iter().enumerate().rev().find_map(|(i, layer)| {
            let mut offset = 0;
            for line in layer.text.split_inclusive('\n') {
                if !line.trim_start().starts_with('#') {
                    if let Some(pos) = line.find(needle) {
                        let start = offset + pos;
                        return Some((i, start..start + needle.len()));
                    }
                }
                offset += line.len();
            }
            None
        })
    }

    pub(super) fn at<T>(&self, at: &At<T>, key: &str, message: impl Into<String>) -> ConfigError {
        self.diag(
            at.layer,
            Some(at.span.clone()),
            Some(key.to_string()),
            message,
        )
    }

    /// Parse `text` as one more layer and fold it in.
    pub(super) fn add(
        &mut self,
        origin: String,
        text: String,
        is_env: bool,
    ) -> Result<(), ConfigError> {
        let raw: RawRoot = toml::from_str(&text).map_err(|e| toml_error(&origin, &text, &e))?;
        let layer = self.layers.len();
        self.layers.push(Layer {
            origin,
            text,
            is_env,
        });
        self.absorb(raw, layer)
    }

    fn absorb(&mut self, raw: RawRoot, layer: usize) -> Result<(), ConfigError> {
        if let Some(d) = raw.dps {
            let span = header_span(&self.layers[layer].text, "dps", 0).or_else(|| d.first_span());
            self.acc.dps_seen.get_or_insert((layer, span));
            self.acc.dps.absorb(d, layer);
        }
        if let Some(b) = raw.batch {
            self.acc.batch.absorb(b, layer);
        }
        if let Some(s) = raw.state {
            self.acc.state.absorb(s, layer);
        }
        if let Some(e) = raw.enrollment {
            // initial_twin merges table by table; everything else replaces.
            let old_twin = self.acc.enrollment.initial_twin.take();
            self.acc.enrollment.absorb(e, layer);
            match (old_twin, self.acc.enrollment.initial_twin.as_mut()) {
                (Some((_, old)), Some((_, new))) => {
                    let mut merged = old;
                    merged.merge(std::mem::take(new));
                    *new = merged;
                }
                (Some(old), None) => self.acc.enrollment.initial_twin = Some(old),
                _ => {}
            }
        }
        if let Some(slots) = raw.slot {
            let mut names_here = BTreeSet::new();
            // `[[slot]]` headers pair with the slots in order when every slot has one (not
            // for `slot = [{ … }]`): then errors point at the header even of an empty slot.
            let text = &self.layers[layer].text;
            let headers = if count_headers(text, "[slot]") == slots.len() {
                (0..slots.len())
                    .map(|i| header_span(text, "[slot]", i))
                    .collect()
            } else {
                vec![None; slots.len()]
            };
            for (slot, header) in slots.into_iter().zip(headers) {
                let span = header.or_else(|| slot.first_span());
                let Some(name) = slot.name.as_ref() else {
                    return Err(self.diag(
                        layer,
                        span,
                        Some(String::from("slot.name")),
                        "every [[slot]] needs a name",
                    ));
                };
                let name_value = name.get_ref().clone();
                if !names_here.insert(name_value.clone()) {
                    return Err(self.diag(
                        layer,
                        Some(name.span()),
                        Some(String::from("slot.name")),
                        format!("duplicate slot name {name_value:?}"),
                    ));
                }
                match self.acc.slots.iter_mut().find(|e| e.name == name_value) {
                    Some(entry) => entry.acc.absorb(slot, layer),
                    None => {
                        let mut acc = AccSlot::default();
                        acc.absorb(slot, layer);
                        self.acc.slots.push(SlotEntry {
                            name: name_value,
                            first: (layer, span),
                            acc,
                        });
                    }
                }
            }
        }
        if let Some(d) = raw.dice {
            let span = header_span(&self.layers[layer].text, "dice", 0).or_else(|| d.first_span());
            self.acc.dice_seen.get_or_insert((layer, span));
            self.acc.dice.absorb(d, layer);
        }
        if let Some(t) = raw.trigger {
            if let Some(s) = t.serial {
                let span = header_span(&self.layers[layer].text, "trigger.serial", 0)
                    .or_else(|| s.first_span());
                self.acc.serial_seen.get_or_insert((layer, span));
                self.acc.serial.absorb(s, layer);
            }
        }
        if let Some(c) = raw.control {
            self.acc.control.absorb(c, layer);
        }
        Ok(())
    }

    /// Turn one `DPS_STATION__A__B=value` variable into a layer.
    pub(super) fn add_env(&mut self, name: &str, value: &str) -> Result<(), ConfigError> {
        let origin = format!("environment variable {name}");
        let invalid = |message: String| {
            ConfigError::Invalid(Box::new(Diagnostic {
                origin: origin.clone(),
                line: None,
                key: None,
                message,
                hint: Some(String::from(
                    "use DPS_STATION__SECTION__KEY, e.g. DPS_STATION__BATCH__MAX_DELAY=5s",
                )),
            }))
        };
        let rest = name.get(ENV_PREFIX.len()..).unwrap_or("");
        let segs: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
        if segs.len() < 2 || segs.iter().any(|s| s.is_empty()) {
            return Err(invalid(String::from("needs at least a section and a key")));
        }
        for s in &segs {
            if !s
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(invalid(format!("{s:?} is not a config key")));
            }
        }
        let header;
        let key;
        if segs[0] == "slot" {
            // DPS_STATION__SLOT__<name or index>__KEY; `_` in the name matches `-`.
            if segs.len() != 3 {
                return Err(invalid(String::from(
                    "slot variables look like DPS_STATION__SLOT__<NAME or INDEX>__KEY",
                )));
            }
            let sel = &segs[1];
            let found = self
                .acc
                .slots
                .iter()
                .find(|e| e.name.to_ascii_lowercase().replace('-', "_") == sel.replace('-', "_"))
                .or_else(|| {
                    sel.parse::<usize>()
                        .ok()
                        .and_then(|i| self.acc.slots.get(i))
                });
            let Some(entry) = found else {
                return Err(invalid(format!("no slot named or numbered {sel:?}")));
            };
            header = format!(
                "[[slot]]\nname = {}\n",
                toml::Value::String(entry.name.clone())
            );
            key = segs[2].clone();
        } else {
            header = format!("[{}]\n", segs[..segs.len() - 1].join("."));
            key = segs[segs.len() - 1].clone();
        }
        let as_string = toml::Value::String(value.to_string()).to_string();
        let typed_ok = toml::from_str::<toml::Table>(&format!("v = {value}")).is_ok();
        let first = if typed_ok { value } else { as_string.as_str() };
        let text = format!("{header}{key} = {first}\n");
        match self.add(origin.clone(), text, true) {
            Ok(()) => Ok(()),
            Err(e) if typed_ok && first != as_string => {
                // `api_version = 2021-10-01` parses as a date: try the string reading.
                let text = format!("{header}{key} = {as_string}\n");
                self.add(origin, text, true).map_err(|_| e)
            }
            Err(e) => Err(e),
        }
    }
}

/// The lines of `text` that are the table header `[name]` (`[[slot]]` is name `[slot]`),
/// as byte spans, comments and surrounding blanks allowed.
fn header_lines<'a>(text: &'a str, name: &'a str) -> impl Iterator<Item = Range<usize>> + 'a {
    let mut offset = 0;
    text.split_inclusive('\n').filter_map(move |line| {
        let start = offset;
        offset += line.len();
        let body = line.split('#').next().unwrap_or("").trim();
        let inner = body.strip_prefix('[')?.strip_suffix(']')?;
        let normalized: String = inner.chars().filter(|c| !c.is_whitespace()).collect();
        (normalized == name.replace(' ', "")).then(|| start..start + line.trim_end().len())
    })
}

fn count_headers(text: &str, name: &str) -> usize {
    header_lines(text, name).count()
}

/// The span of the `nth` header `[name]` in `text`.
fn header_span(text: &str, name: &str, nth: usize) -> Option<Range<usize>> {
    header_lines(text, name).nth(nth)
}

pub(super) fn merge_tables(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge_tables(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// 1-based line of a byte offset.
pub(super) fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Best effort dotted key at a byte offset: the nearest `[table]` header above plus the key
/// on that line.
pub(super) fn key_at(text: &str, offset: usize) -> Option<String> {
    let line_no = line_of(text, offset);
    let lines: Vec<&str> = text.lines().collect();
    let line = lines.get(line_no.checked_sub(1)?)?.trim();
    let header = lines[..line_no - 1]
        .iter()
        .rev()
        .map(|l| l.trim())
        .find(|l| l.starts_with('['))
        .map(|l| {
            l.trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        });
    if line.starts_with('[') {
        return Some(
            line.trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .trim()
                .to_string(),
        );
    }
    let k = line.split('=').next()?.trim().trim_matches('"');
    if k.is_empty() || k.starts_with('#') {
        return header;
    }
    Some(match header {
        Some(h) if !h.is_empty() => format!("{h}.{k}"),
        _ => k.to_string(),
    })
}

pub(super) fn toml_error(origin: &str, text: &str, e: &toml::de::Error) -> ConfigError {
    let span = e.span();
    let message = e.message().trim().to_string();
    let (line, key) = match span {
        Some(s) => (Some(line_of(text, s.start)), key_at(text, s.start)),
        None => (None, None),
    };
    let hint = if message.contains("unknown field") {
        Some(String::from(
            "unknown keys are errors; check the spelling against config/station.example.toml",
        ))
    } else {
        None
    };
    ConfigError::Invalid(Box::new(Diagnostic {
        origin: origin.to_string(),
        line,
        key,
        message,
        hint,
    }))
}
