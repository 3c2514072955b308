//! Request-body validation driven by the vendored DPS OpenAPI document (api-version
//! 2021-10-01, `tests/fixtures/spec/`). It checks types, `required`, enums and int32 ranges
//! of the spec's `definitions`, skips `readOnly` properties, accepts `null` for optional
//! fields and lets unknown properties through (the real service ignores them). It also
//! orders response objects the way the spec lists their properties.
//! It must never reject a body the 2021-10-01 schema allows, and never panics on input.
use serde_json::{Map, Value};
use std::sync::OnceLock;

/// The vendored spec text (unmodified copy, see tests/fixtures/spec/README.md).
pub const SPEC_JSON: &str = include_str!("../../tests/fixtures/spec/dps-service-2021-10-01.json");

/// A body that does not match the schema; `path` names the field (`attestation.tpm.endorsementKey`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct SchemaError {
    pub path: String,
    pub message: String,
}

static DEFINITIONS: OnceLock<Option<Map<String, Value>>> = OnceLock::new();

/// The spec's `definitions`, parsed once. `None` only if the vendored file is broken.
pub fn definitions() -> Option<&'static Map<String, Value>> {
    DEFINITIONS
        .get_or_init(|| {
            let v: Value = serde_json::from_str(SPEC_JSON).ok()?;
            v.get("definitions")?.as_object().cloned()
        })
        .as_ref()
}

fn resolve<'a>(defs: &'a Map<String, Value>, schema: &'a Value) -> &'a Value {
    let mut s = schema;
    // A few hops at most (property → $ref → definition).
    for _ in 0..8 {
        match s
            .get("$ref")
            .and_then(Value::as_str)
            .and_then(|r| r.strip_prefix("#/definitions/"))
            .and_then(|name| defs.get(name))
        {
            Some(next) => s = next,
            None => break,
        }
    }
    s
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Validate `value` against definition `def` (e.g. `"IndividualEnrollment"`).
/// `prefix` is prepended to field paths (e.g. `"enrollments[3]"`).
pub fn validate(def: &str, value: &Value, prefix: &str) -> Result<(), SchemaError> {
    let defs = definitions().ok_or_else(|| SchemaError {
        path: String::new(),
        message: "the emulator's vendored spec could not be parsed".to_string(),
    })?;
    let schema = defs.get(def).ok_or_else(|| SchemaError {
        path: String::new(),
        message: format!("unknown definition {def}"),
    })?;
    if value.is_null() {
        return Err(SchemaError {
            path: if prefix.is_empty() {
                "body".into()
            } else {
                prefix.into()
            },
            message: format!("a {def} object is required"),
        });
    }
    check(defs, schema, value, prefix)
}

fn check(
    defs: &Map<String, Value>,
    schema: &Value,
    value: &Value,
    path: &str,
) -> Result<(), SchemaError> {
    let schema = resolve(defs, schema);
    let err = |message: String| SchemaError {
        path: if path.is_empty() {
            "body".to_string()
        } else {
            path.to_string()
        },
        message,
    };
    let ty = schema.get("type").and_then(Value::as_str).unwrap_or(
        if schema.get("properties").is_some() {
            "object"
        } else {
            ""
        },
    );
    match ty {
        "object" => {
            let obj = value
                .as_object()
                .ok_or_else(|| err(format!("expected an object, got {}", type_name(value))))?;
            let props = schema.get("properties").and_then(Value::as_object);
            if let Some(required) = schema.get("required").and_then(Value::as_array) {
                for name in required.iter().filter_map(Value::as_str) {
                    let read_only = props
                        .and_then(|p| p.get(name))
                        .and_then(|p| p.get("readOnly"))
                        .and_then(Value::as_bool)
                        .unwrap_or(false);
                    if read_only {
                        continue;
                    }
                    match obj.get(name) {
                        None | Some(Value::Null) => {
                            return Err(SchemaError {
                                path: join(path, name),
                                message: "is required".to_string(),
                            })
                        }
                        Some(_) => {}
                    }
                }
            }
            if let Some(props) = props {
                for (name, pschema) in props {
                    if pschema
                        .get("readOnly")
                        .and_then(Value::as_bool)
                        .unwrap_or(false)
                    {
                        continue;
                    }
                    match obj.get(name) {
                        None | Some(Value::Null) => {}
                        Some(v) => check(defs, pschema, v, &join(path, name))?,
                    }
                }
            }
            // additionalProperties are not checked: unknown fields are allowed, and the
            // spec's TwinCollection says `{"type":"object"}` while real twins hold scalars.
            Ok(())
        }
        "array" => {
            let arr = value
                .as_array()
                .ok_or_else(|| err(format!("expected an array, got {}", type_name(value))))?;
            if let Some(items) = schema.get("items") {
                for (i, v) in arr.iter().enumerate() {
                    if v.is_null() {
                        return Err(SchemaError {
                            path: format!("{path}[{i}]"),
                            message: "null is not allowed in this array".to_string(),
                        });
                    }
                    check(defs, items, v, &format!("{path}[{i}]"))?;
                }
            }
            Ok(())
        }
        "string" => {
            let s = value
                .as_str()
                .ok_or_else(|| err(format!("expected a string, got {}", type_name(value))))?;
            if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
                if !allowed.iter().any(|a| a.as_str() == Some(s)) {
                    let names: Vec<&str> = allowed.iter().filter_map(Value::as_str).collect();
                    return Err(err(format!("{s:?} is not one of {}", names.join(", "))));
                }
            }
            Ok(())
        }
        "integer" => {
            let n = value
                .as_i64()
                .ok_or_else(|| err(format!("expected an integer, got {}", type_name(value))))?;
            if schema.get("format").and_then(Value::as_str) == Some("int32")
                && i32::try_from(n).is_err()
            {
                return Err(err(format!("{n} is outside the int32 range")));
            }
            Ok(())
        }
        "boolean" => {
            if value.is_boolean() {
                Ok(())
            } else {
                Err(err(format!("expected a boolean, got {}", type_name(value))))
            }
        }
        "number" => {
            if value.is_number() {
                Ok(())
            } else {
                Err(err(format!("expected a number, got {}", type_name(value))))
            }
        }
        _ => Ok(()),
    }
}

/// Reorder the keys of `value` (recursively) in the order the spec lists the properties of
/// `def`; keys the spec does not know keep their relative order after the known ones.
pub fn ordered(def: &str, value: Value) -> Value {
    match definitions() {
        Some(defs) => match defs.get(def) {
            Some(schema) => order(defs, schema, value),
            None => value,
        },
        None => value,
    }
}

fn order(defs: &Map<String, Value>, schema: &Value, value: Value) -> Value {
    let schema = resolve(defs, schema);
    match value {
        Value::Object(mut obj) => {
            let Some(props) = schema.get("properties").and_then(Value::as_object) else {
                return Value::Object(obj);
            };
            let mut out = Map::new();
            for (name, pschema) in props {
                if let Some(v) = obj.remove(name) {
                    out.insert(name.clone(), order(defs, pschema, v));
                }
            }
            for (k, v) in obj {
                out.insert(k, v);
            }
            Value::Object(out)
        }
        Value::Array(items) => match schema.get("items") {
            Some(item_schema) => Value::Array(
                items
                    .into_iter()
                    .map(|v| order(defs, item_schema, v))
                    .collect(),
            ),
            None => Value::Array(items),
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn vendored_spec_parses_and_has_every_definition() {
        let defs = definitions().unwrap();
        for d in [
            "IndividualEnrollment",
            "EnrollmentGroup",
            "BulkEnrollmentOperation",
            "QuerySpecification",
        ] {
            assert!(defs.contains_key(d), "{d}");
        }
    }

    #[test]
    fn names_the_failing_field_path() {
        let e = validate(
            "IndividualEnrollment",
            &json!({"registrationId":"a","attestation":{"type":"tpm","tpm":{"endorsementKey":5}}}),
            "",
        )
        .unwrap_err();
        assert_eq!(e.path, "attestation.tpm.endorsementKey");
        let e = validate(
            "IndividualEnrollment",
            &json!({"registrationId":"a"}),
            "enrollments[2]",
        )
        .unwrap_err();
        assert_eq!(e.path, "enrollments[2].attestation");
        let e = validate(
            "IndividualEnrollment",
            &json!({"registrationId":"a","attestation":{"type":"magic"}}),
            "",
        )
        .unwrap_err();
        assert!(e.message.contains("magic"), "{e}");
    }

    #[test]
    fn nulls_unknown_fields_and_read_only_are_accepted() {
        validate(
            "IndividualEnrollment",
            &json!({"registrationId":"a","attestation":{"type":"tpm","tpm":{"endorsementKey":"AA=="}},
                    "capabilities":null,"iotHubs":null,"newerField":{"x":1},
                    "registrationState":"whatever","createdDateTimeUtc":7}),
            "",
        )
        .unwrap();
    }

    #[test]
    fn orders_like_the_spec() {
        let v = ordered(
            "IndividualEnrollment",
            json!({"etag":"e","zzz":1,"attestation":{"tpm":{},"type":"tpm"},"registrationId":"a"}),
        );
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["registrationId", "attestation", "etag", "zzz"]);
        let keys: Vec<&String> = v["attestation"].as_object().unwrap().keys().collect();
        assert_eq!(keys, ["type", "tpm"]);
    }
}
