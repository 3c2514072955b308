//! Enrollment templates: the `{serial}`, `{slot}` and `{ek_hash}` placeholders, checked at
//! load and substituted per board. Unknown placeholders are refused, never passed through.
use std::collections::BTreeSet;

use serde_json::{Map, Value};

pub(super) const PLACEHOLDERS: [&str; 3] = ["serial", "slot", "ek_hash"];

/// Placeholders used in a template, or an error naming an unknown one.
pub(super) fn placeholders(t: &str) -> Result<BTreeSet<&'static str>, String> {
    let mut used = BTreeSet::new();
    let mut rest = t;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| format!("{t:?} has a '{{' without a closing '}}'"))?;
        let name = &after[..close];
        match PLACEHOLDERS.iter().find(|p| **p == name) {
            Some(p) => {
                used.insert(*p);
            }
            None => {
                return Err(format!(
                "unknown placeholder {{{name}}} in {t:?}; use {{serial}}, {{slot}} or {{ek_hash}}"
            ))
            }
        }
        rest = &after[close + 1..];
    }
    Ok(used)
}

pub(super) fn substitute(
    t: &str,
    serial: &str,
    slot: &str,
    ek_hash: Option<&str>,
) -> Result<String, String> {
    let used = placeholders(t)?;
    if used.contains("ek_hash") && ek_hash.is_none() {
        return Err(format!(
            "{t:?} uses {{ek_hash}} but this board has no TPM EK; use {{serial}} for dice slots"
        ));
    }
    // One pass over the template, so a value is never itself read as a template.
    let mut out = String::with_capacity(t.len() + serial.len());
    let mut rest = t;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after.find('}').unwrap_or(after.len());
        out.push_str(match &after[..close] {
            "serial" => serial,
            "slot" => slot,
            _ => ek_hash.unwrap_or(""),
        });
        rest = after.get(close + 1..).unwrap_or("");
    }
    out.push_str(rest);
    Ok(out)
}

pub(super) fn toml_to_json(v: &toml::Value) -> Value {
    match v {
        toml::Value::String(s) => Value::String(s.clone()),
        toml::Value::Integer(i) => Value::from(*i),
        toml::Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(Value::Number)
            .unwrap_or(Value::Null),
        toml::Value::Boolean(b) => Value::Bool(*b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(a) => Value::Array(a.iter().map(toml_to_json).collect()),
        toml::Value::Table(t) => Value::Object(
            t.iter()
                .map(|(k, v)| (k.clone(), toml_to_json(v)))
                .collect::<Map<String, Value>>(),
        ),
    }
}

/// A template string in a JSON tree that does not parse: where it is and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TemplateFault {
    /// Dotted path below the tree's root, e.g. `tags.serial`.
    pub(super) path: String,
    /// The offending string as written.
    pub(super) text: String,
    pub(super) message: String,
}

/// Check every string in a JSON tree for valid placeholders.
pub(super) fn check_json_templates(v: &Value) -> Result<(), TemplateFault> {
    fn walk(v: &Value, path: &mut Vec<String>) -> Result<(), TemplateFault> {
        match v {
            Value::String(s) => placeholders(s)
                .map(|_| ())
                .map_err(|message| TemplateFault {
                    path: path.join("."),
                    text: s.clone(),
                    message,
                }),
            Value::Array(a) => a.iter().enumerate().try_for_each(|(i, x)| {
                path.push(i.to_string());
                let r = walk(x, path);
                path.pop();
                r
            }),
            Value::Object(o) => o.iter().try_for_each(|(k, x)| {
                path.push(k.clone());
                let r = walk(x, path);
                path.pop();
                r
            }),
            _ => Ok(()),
        }
    }
    walk(v, &mut Vec::new())
}

pub(super) fn substitute_json(
    v: &Value,
    serial: &str,
    slot: &str,
    ek_hash: Option<&str>,
) -> Result<Value, String> {
    Ok(match v {
        Value::String(s) => Value::String(substitute(s, serial, slot, ek_hash)?),
        Value::Array(a) => Value::Array(
            a.iter()
                .map(|x| substitute_json(x, serial, slot, ek_hash))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, x)| Ok((k.clone(), substitute_json(x, serial, slot, ek_hash)?)))
                .collect::<Result<Map<_, _>, String>>()?,
        ),
        other => other.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_found_and_unknown_ones_refused() {
        let used = placeholders("{serial}-{slot}-{ek_hash}").unwrap();
        assert_eq!(used.len(), 3);
        assert!(placeholders("plain").unwrap().is_empty());
        let e = placeholders("{serail}").unwrap_err();
        assert!(e.contains("{serail}"), "{e}");
        assert!(placeholders("{serial").unwrap_err().contains("closing"));
    }

    #[test]
    fn substitution_replaces_every_occurrence() {
        assert_eq!(
            substitute("{serial}/{serial}@{slot}", "S1", "f-1", None).unwrap(),
            "S1/S1@f-1"
        );
        assert!(substitute("{ek_hash}", "S1", "f-1", None).is_err());
        assert_eq!(
            substitute("{ek_hash}", "S1", "f", Some("abc")).unwrap(),
            "abc"
        );
        // A serial that looks like a placeholder is data, not a template.
        assert_eq!(
            substitute("{serial}", "{slot}", "f", None).unwrap(),
            "{slot}"
        );
    }
}
