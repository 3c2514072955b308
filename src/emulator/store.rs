//! The emulator's records: individual enrollments, enrollment groups and device
//! registration states, kept in memory under lower-case ids, optionally mirrored to a
//! SQLite file (`--state PATH`) so they survive restarts. One transaction per request
//! (a bulk request is one transaction). It knows nothing of HTTP; it must never hold
//! anything but what the service would store (no SAS tokens, no keys of the emulator).
use rusqlite::{params, Connection};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// Which collection a record lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Enrollment,
    Group,
    Registration,
}

impl Kind {
    fn tag(self) -> &'static str {
        match self {
            Kind::Enrollment => "enrollment",
            Kind::Group => "group",
            Kind::Registration => "registration",
        }
    }
    fn from_tag(s: &str) -> Option<Kind> {
        match s {
            "enrollment" => Some(Kind::Enrollment),
            "group" => Some(Kind::Group),
            "registration" => Some(Kind::Registration),
            _ => None,
        }
    }
}

/// The state file could not be opened, read or written.
#[derive(Debug, thiserror::Error)]
#[error("emulator state file {path}: {source}")]
pub struct StoreError {
    pub path: String,
    #[source]
    pub source: rusqlite::Error,
}

/// One pending change: `Some(value)` stores, `None` deletes.
pub type Change = (Kind, String, Option<Value>);

/// In-memory maps plus the optional SQLite mirror.
#[derive(Debug, Default)]
pub struct Store {
    maps: BTreeMap<Kind, BTreeMap<String, Value>>,
    db: Option<(Connection, String)>,
}

impl Store {
    /// A store with no file behind it.
    pub fn memory() -> Store {
        Store::default()
    }

    /// Open (or create) the state file and load every record from it.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let name = path.display().to_string();
        let wrap = |source| StoreError {
            path: name.clone(),
            source,
        };
        let conn = Connection::open(path).map_err(wrap)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=NORMAL;
             CREATE TABLE IF NOT EXISTS records (
                 kind TEXT NOT NULL, id TEXT NOT NULL, body TEXT NOT NULL,
                 PRIMARY KEY (kind, id));",
        )
        .map_err(wrap)?;
        let mut maps: BTreeMap<Kind, BTreeMap<String, Value>> = BTreeMap::new();
        {
            let mut stmt = conn
                .prepare("SELECT kind, id, body FROM records")
                .map_err(wrap)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                    ))
                })
                .map_err(wrap)?;
            for row in rows {
                let (kind, id, body) = row.map_err(wrap)?;
                let (Some(kind), Ok(value)) = (Kind::from_tag(&kind), serde_json::from_str(&body))
                else {
                    tracing::warn!(kind, id, "skipping an unreadable record in the state file");
                    continue;
                };
                maps.entry(kind).or_default().insert(id, value);
            }
        }
        Ok(Store {
            maps,
            db: Some((conn, name)),
        })
    }

    pub fn get(&self, kind: Kind, key: &str) -> Option<&Value> {
        self.maps.get(&kind).and_then(|m| m.get(key))
    }

    /// Records of one kind in key order, starting after `after` (exclusive).
    pub fn range_after<'a>(
        &'a self,
        kind: Kind,
        after: Option<&'a str>,
    ) -> Box<dyn Iterator<Item = (&'a String, &'a Value)> + 'a> {
        let Some(map) = self.maps.get(&kind) else {
            return Box::new(std::iter::empty());
        };
        match after {
            Some(a) => Box::new(
                map.range::<str, _>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
            ),
            None => Box::new(map.iter()),
        }
    }

    /// Apply `changes` atomically: the file first (one transaction), then memory.
    pub fn commit(&mut self, changes: Vec<Change>) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        if let Some((conn, name)) = self.db.as_mut() {
            let wrap = |source| StoreError {
                path: name.clone(),
                source,
            };
            let tx = conn.transaction().map_err(wrap)?;
            for (kind, key, value) in &changes {
                match value {
                    Some(v) => {
                        tx.execute(
                            "INSERT OR REPLACE INTO records (kind, id, body) VALUES (?1, ?2, ?3)",
                            params![kind.tag(), key, v.to_string()],
                        )
                        .map_err(wrap)?;
                    }
                    None => {
                        tx.execute(
                            "DELETE FROM records WHERE kind = ?1 AND id = ?2",
                            params![kind.tag(), key],
                        )
                        .map_err(wrap)?;
                    }
                }
            }
            tx.commit().map_err(wrap)?;
        }
        for (kind, key, value) in changes {
            let map = self.maps.entry(kind).or_default();
            match value {
                Some(v) => {
                    map.insert(key, v);
                }
                None => {
                    map.remove(&key);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn records_survive_reopen_and_deletes_stick() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let mut s = Store::open(&path).unwrap();
            s.commit(vec![
                (
                    Kind::Enrollment,
                    "a".into(),
                    Some(json!({"registrationId":"A"})),
                ),
                (
                    Kind::Enrollment,
                    "b".into(),
                    Some(json!({"registrationId":"b"})),
                ),
                (
                    Kind::Group,
                    "g".into(),
                    Some(json!({"enrollmentGroupId":"g"})),
                ),
            ])
            .unwrap();
            s.commit(vec![(Kind::Enrollment, "b".into(), None)])
                .unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.get(Kind::Enrollment, "a").unwrap()["registrationId"], "A");
        assert!(s.get(Kind::Enrollment, "b").is_none());
        assert!(s.get(Kind::Group, "g").is_some());
        let keys: Vec<&String> = s
            .range_after(Kind::Enrollment, None)
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["a"]);
        assert_eq!(s.range_after(Kind::Enrollment, Some("a")).count(), 0);
    }
}
