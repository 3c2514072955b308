//! `dps-station export`: board records for MES and traceability, read straight from the
//! station's SQLite database as CSV (with a header row) or JSON lines.
//!
//! It opens the database read-only (so it works while `run` is writing, thanks to WAL)
//! and must never create, migrate or modify it. It exports no enrollment bodies, keys or
//! certificates: only the columns in [`COLUMNS`].
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};
use serde_json::{Map, Value};

use crate::station::store::State;

/// The exported columns, in order (DESIGN §5).
pub const COLUMNS: [&str; 11] = [
    "serial",
    "slot",
    "registration_id",
    "attestation",
    "ek_hash",
    "cert_sha256",
    "ek_cert_issuer",
    "state",
    "dps_error_code",
    "scanned_at",
    "enrolled_at",
];

/// Output format of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    Csv,
    Jsonl,
}

impl std::str::FromStr for ExportFormat {
    type Err = ReportError;
    fn from_str(s: &str) -> Result<Self, ReportError> {
        match s {
            "csv" => Ok(ExportFormat::Csv),
            "jsonl" => Ok(ExportFormat::Jsonl),
            other => Err(ReportError::BadFormat(other.to_owned())),
        }
    }
}

/// Errors of an export. [`ReportError::is_usage`] tells which are the user's to fix.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("--state {0:?} is not a board state (queued, enrolled, conflict, rejected)")]
    BadState(String),
    #[error("--format {0:?} is not supported (csv, jsonl)")]
    BadFormat(String),
    #[error("state database {path} does not exist (check [state] path in the config)")]
    NoDatabase { path: PathBuf },
    #[error("state database {path} has no boards table; is it a dps-station database?")]
    NotStationDb { path: PathBuf },
    #[error("state database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("writing the export: {0}")]
    Write(#[from] std::io::Error),
    #[error("writing the export: {0}")]
    Csv(#[from] csv::Error),
}

impl ReportError {
    /// True for mistakes in the command line or config (exit 2), false for failures.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            ReportError::BadState(_)
                | ReportError::BadFormat(_)
                | ReportError::NoDatabase { .. }
                | ReportError::NotStationDb { .. }
        )
    }
}

/// Parse a `--state` value into the store's [`State`].
pub fn parse_state(s: &str) -> Result<State, ReportError> {
    State::parse(s).ok_or_else(|| ReportError::BadState(s.to_owned()))
}

/// One exported record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRow {
    pub serial: String,
    pub slot: String,
    pub registration_id: String,
    pub attestation: String,
    pub ek_hash: Option<String>,
    pub cert_sha256: Option<String>,
    pub ek_cert_issuer: Option<String>,
    pub state: String,
    pub dps_error_code: Option<i64>,
    pub scanned_at: String,
    pub enrolled_at: Option<String>,
}

impl ExportRow {
    fn csv_fields(&self) -> [String; 11] {
        let o = |v: &Option<String>| v.clone().unwrap_or_default();
        [
            self.serial.clone(),
            self.slot.clone(),
            self.registration_id.clone(),
            self.attestation.clone(),
            o(&self.ek_hash),
            o(&self.cert_sha256),
            o(&self.ek_cert_issuer),
            self.state.clone(),
            self.dps_error_code
                .map(|c| c.to_string())
                .unwrap_or_default(),
            self.scanned_at.clone(),
            o(&self.enrolled_at),
        ]
    }

    fn to_json(&self) -> Value {
        let s = |v: &str| Value::String(v.to_owned());
        let o = |v: &Option<String>| v.as_deref().map(s).unwrap_or(Value::Null);
        let mut m = Map::new();
        m.insert("serial".into(), s(&self.serial));
        m.insert("slot".into(), s(&self.slot));
        m.insert("registration_id".into(), s(&self.registration_id));
        m.insert("attestation".into(), s(&self.attestation));
        m.insert("ek_hash".into(), o(&self.ek_hash));
        m.insert("cert_sha256".into(), o(&self.cert_sha256));
        m.insert("ek_cert_issuer".into(), o(&self.ek_cert_issuer));
        m.insert("state".into(), s(&self.state));
        m.insert(
            "dps_error_code".into(),
            self.dps_error_code.map(Value::from).unwrap_or(Value::Null),
        );
        m.insert("scanned_at".into(), s(&self.scanned_at));
        m.insert("enrolled_at".into(), o(&self.enrolled_at));
        Value::Object(m)
    }
}

/// Open the station database read-only; never creates it.
fn open_read_only(db: &Path) -> Result<Connection, ReportError> {
    if !db.exists() {
        return Err(ReportError::NoDatabase { path: db.into() });
    }
    let sql = |source| ReportError::Sqlite {
        path: db.into(),
        source,
    };
    let conn = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql)?;
    // The daemon may be mid-commit; wait for it rather than failing.
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(sql)?;
    let has_boards: bool = conn
        .query_row(
            "SELECT EXISTS(SELECT 1 FROM sqlite_master WHERE type='table' AND name='boards')",
            [],
            |r| r.get(0),
        )
        .map_err(sql)?;
    if !has_boards {
        return Err(ReportError::NotStationDb { path: db.into() });
    }
    Ok(conn)
}

/// Read the board records (oldest scan first), optionally only those in `state`.
pub fn read_rows(db: &Path, state: Option<State>) -> Result<Vec<ExportRow>, ReportError> {
    let mut out = Vec::new();
    for_each_row(db, state, |r| {
        out.push(r);
        Ok(())
    })?;
    Ok(out)
}

fn for_each_row(
    db: &Path,
    state: Option<State>,
    mut f: impl FnMut(ExportRow) -> Result<(), ReportError>,
) -> Result<u64, ReportError> {
    let conn = open_read_only(db)?;
    let sql_err = |source| ReportError::Sqlite {
        path: db.into(),
        source,
    };
    let mut stmt = conn
        .prepare(
            "SELECT serial, slot, registration_id, attestation, ek_hash, cert_sha256, \
             ek_cert_issuer, state, dps_error_code, scanned_at, enrolled_at \
             FROM boards WHERE (?1 IS NULL OR state = ?1) ORDER BY id",
        )
        .map_err(sql_err)?;
    let mut rows = stmt.query([state.map(|s| s.as_str())]).map_err(sql_err)?;
    let mut n = 0u64;
    while let Some(r) = rows.next().map_err(sql_err)? {
        let row = ExportRow {
            serial: r.get(0).map_err(sql_err)?,
            slot: r.get(1).map_err(sql_err)?,
            registration_id: r.get(2).map_err(sql_err)?,
            attestation: r.get(3).map_err(sql_err)?,
            ek_hash: r.get(4).map_err(sql_err)?,
            cert_sha256: r.get(5).map_err(sql_err)?,
            ek_cert_issuer: r.get(6).map_err(sql_err)?,
            state: r.get(7).map_err(sql_err)?,
            dps_error_code: r.get(8).map_err(sql_err)?,
            scanned_at: r.get(9).map_err(sql_err)?,
            enrolled_at: r.get(10).map_err(sql_err)?,
        };
        f(row)?;
        n += 1;
    }
    Ok(n)
}

/// Write the export of `db` to `out`; returns the number of records written.
pub fn export<W: Write>(
    db: &Path,
    format: ExportFormat,
    state: Option<State>,
    out: W,
) -> Result<u64, ReportError> {
    match format {
        ExportFormat::Csv => {
            let mut w = csv::Writer::from_writer(out);
            w.write_record(COLUMNS)?;
            let n = for_each_row(db, state, |r| Ok(w.write_record(r.csv_fields())?))?;
            w.flush()?;
            Ok(n)
        }
        ExportFormat::Jsonl => {
            let mut out = std::io::BufWriter::new(out);
            let n = for_each_row(db, state, |r| {
                serde_json::to_writer(&mut out, &r.to_json()).map_err(std::io::Error::other)?;
                out.write_all(b"\n")?;
                Ok(())
            })?;
            out.flush()?;
            Ok(n)
        }
    }
}

/// Export into the file `path`, atomically: readers see the old file or the whole new one.
pub fn export_to_file(
    db: &Path,
    format: ExportFormat,
    state: Option<State>,
    path: &Path,
) -> Result<u64, ReportError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    let n = export(db, format, state, tmp.as_file_mut())?;
    // Board records are not secret: readable like any report file (the temp file is 0600).
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(n)
}

/// A fixed-width table of the rows for a terminal (used by `demo`).
pub fn render_table(rows: &[ExportRow]) -> String {
    let headers = [
        "serial",
        "slot",
        "state",
        "registration_id",
        "dps_error_code",
        "enrolled_at",
    ];
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            [
                r.serial.clone(),
                r.slot.clone(),
                r.state.clone(),
                r.registration_id.clone(),
                r.dps_error_code.map(|c| c.to_string()).unwrap_or_default(),
                r.enrolled_at.clone().unwrap_or_default(),
            ]
        })
        .collect();
    let mut widths = headers.map(str::len);
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row.iter()) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |fields: Vec<&str>| {
        fields
            .iter()
            .zip(widths.iter())
            .map(|(f, w)| format!("{f:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(headers.to_vec());
    out.push('\n');
    for row in &cells {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}
