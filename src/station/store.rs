//! The station's durable journal: SQLite (WAL, synchronous=FULL) holding one row per scanned
//! board, its audit events and the bulk batches sent to DPS.
//!
//! Rows change only through [`State`] transitions (queued → enrolled | conflict | rejected,
//! or conflict at insert; rejected, or with `force` a DPS conflict, → queued by an operator's
//! [`Store::requeue`]), each written together with its audit event. Inserts that arrive
//! together share one transaction ([`StoreWriter`], group commit). This module knows nothing
//! of DPS, HTTP or serial ports, and it never reports a row as stored before its commit.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};

/// Errors of the store. Messages name the database file; they never contain secrets.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("state database {path}: cannot create its directory: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "state database {path}: schema version {found} is newer than this build knows ({known})"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("board {id}: cannot move from {from} to {to}")]
    Transition { id: i64, from: String, to: String },
    #[error("board {0} does not exist")]
    NoSuchBoard(i64),
    #[error("board {id} is {state}: {why}")]
    NotRequeueable {
        id: i64,
        state: String,
        why: &'static str,
    },
    #[error("state database writer has stopped")]
    WriterGone,
    #[error("state database {path}: cannot start the writer thread: {source}")]
    Thread {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A board row's state (DESIGN §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum State {
    Queued,
    Enrolled,
    Conflict,
    Rejected,
}

impl State {
    pub const ALL: [State; 4] = [
        State::Queued,
        State::Enrolled,
        State::Conflict,
        State::Rejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Enrolled => "enrolled",
            State::Conflict => "conflict",
            State::Rejected => "rejected",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The only ways a `queued` row may leave `queued`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// DPS holds the enrollment with our attestation (created now, or found by GET).
    Enrolled { detail: Option<String> },
    /// DPS holds a different attestation under this registration id.
    Conflict { detail: String },
    /// DPS refused the item; `code` is its errorCode.
    Rejected { code: i64, detail: String },
}

impl Transition {
    pub fn target(&self) -> State {
        match self {
            Transition::Enrolled { .. } => State::Enrolled,
            Transition::Conflict { .. } => State::Conflict,
            Transition::Rejected { .. } => State::Rejected,
        }
    }
}

/// Where a scan came from; replies after a restart go back to the serial line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Serial,
    Control,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Serial => "serial",
            Source::Control => "control",
        }
    }
}

/// What the pipeline asks to record for one attested scan.
#[derive(Debug, Clone)]
pub struct NewBoard {
    pub serial: String,
    pub slot: String,
    /// Lower case.
    pub registration_id: String,
    /// `tpm` or `dice`.
    pub attestation: String,
    pub ek_hash: Option<String>,
    pub cert_sha256: Option<String>,
    pub ek_cert_issuer: Option<String>,
    pub enrollment_json: String,
    pub source: Source,
    /// Insert as `queued` and immediately move to `enrolled` (DICE group enrollment:
    /// the group already covers the board, no per-board DPS call).
    pub enrolled_without_dps: bool,
}

/// One board row.
#[derive(Debug, Clone, PartialEq)]
pub struct BoardRow {
    pub id: i64,
    pub serial: String,
    pub slot: String,
    pub registration_id: String,
    pub attestation: String,
    pub ek_hash: Option<String>,
    pub cert_sha256: Option<String>,
    pub ek_cert_issuer: Option<String>,
    pub enrollment_json: String,
    pub state: State,
    pub dps_error_code: Option<i64>,
    pub detail: Option<String>,
    pub batch_id: Option<i64>,
    pub scanned_at: String,
    pub enrolled_at: Option<String>,
    pub source: String,
}

/// The outcome of [`Store::admit`]: dedupe and insert in one step.
#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    /// A new row (state `queued`, or `enrolled` for group enrollment).
    Inserted(BoardRow),
    /// The serial is known with the same attestation: nothing new stored.
    Known(BoardRow),
    /// The serial is known with another EK: alarm; the recorded row is untouched and a
    /// `conflict` row records the scan.
    EkChanged {
        recorded: BoardRow,
        conflict: BoardRow,
    },
    /// The EK (or registration id) is recorded under another serial: a `conflict` row.
    Duplicate {
        reason: &'static str,
        other: BoardRow,
        conflict: BoardRow,
    },
}

/// A bulk batch that was sent and never finished (the daemon died during it).
#[derive(Debug, Clone)]
pub struct OpenBatch {
    pub id: i64,
    pub rows: Vec<BoardRow>,
}

const SCHEMA_VERSION: i64 = 1;

const MIGRATION_1: &str = "
CREATE TABLE boards(
  id INTEGER PRIMARY KEY,
  serial TEXT NOT NULL,
  slot TEXT NOT NULL,
  registration_id TEXT NOT NULL,
  attestation TEXT NOT NULL CHECK (attestation IN ('tpm','dice')),
  ek_hash TEXT,
  cert_sha256 TEXT,
  ek_cert_issuer TEXT,
  enrollment_json TEXT NOT NULL,
  state TEXT NOT NULL CHECK (state IN ('queued','enrolled','conflict','rejected')),
  dps_error_code INTEGER,
  detail TEXT,
  batch_id INTEGER,
  scanned_at TEXT NOT NULL,
  enrolled_at TEXT,
  updated_at TEXT NOT NULL,
  source TEXT NOT NULL DEFAULT 'control',
  scan_conflict TEXT
);
CREATE INDEX boards_serial ON boards(serial) WHERE scan_conflict IS NULL;
CREATE INDEX boards_ek_hash ON boards(ek_hash) WHERE ek_hash IS NOT NULL;
CREATE INDEX boards_registration_id ON boards(registration_id);
CREATE INDEX boards_state ON boards(state);
CREATE INDEX boards_unsent ON boards(id) WHERE state = 'queued' AND batch_id IS NULL;
CREATE INDEX boards_batch ON boards(batch_id) WHERE batch_id IS NOT NULL;
CREATE TABLE events(
  id INTEGER PRIMARY KEY,
  board_id INTEGER,
  at TEXT NOT NULL,
  kind TEXT NOT NULL,
  detail TEXT
);
CREATE INDEX events_board ON events(board_id);
CREATE TABLE batches(
  id INTEGER PRIMARY KEY,
  started_at TEXT NOT NULL,
  finished_at TEXT,
  outcome TEXT
);
";

const MIGRATIONS: &[&str] = &[MIGRATION_1];
const _: () = assert!(MIGRATIONS.len() as i64 == SCHEMA_VERSION);

const ROW_COLUMNS: &str = "id, serial, slot, registration_id, attestation, ek_hash, cert_sha256, \
     ek_cert_issuer, enrollment_json, state, dps_error_code, detail, batch_id, scanned_at, \
     enrolled_at, source";

/// RFC 3339 UTC now.
pub fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_else(|_| String::from("1970-01-01T00:00:00Z"))
}

fn row_from(r: &rusqlite::Row<'_>) -> rusqlite::Result<BoardRow> {
    let state: String = r.get(9)?;
    Ok(BoardRow {
        id: r.get(0)?,
        serial: r.get(1)?,
        slot: r.get(2)?,
        registration_id: r.get(3)?,
        attestation: r.get(4)?,
        ek_hash: r.get(5)?,
        cert_sha256: r.get(6)?,
        ek_cert_issuer: r.get(7)?,
        enrollment_json: r.get(8)?,
        state: State::parse(&state).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                9,
                rusqlite::types::Type::Text,
                format!("unknown board state {state:?}").into(),
            )
        })?,
        dps_error_code: r.get(10)?,
        detail: r.get(11)?,
        batch_id: r.get(12)?,
        scanned_at: r.get(13)?,
        enrolled_at: r.get(14)?,
        source: r.get(15)?,
    })
}

/// Statement cache size: above the number of distinct SQL texts in this module.
const STATEMENT_CACHE_CAPACITY: usize = 48;

/// One open connection to the state database. Use it from one thread.
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl Store {
    /// Open (creating if needed) and migrate the database at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
                path: path.to_owned(),
                source,
            })?;
        }
        let conn = Connection::open(path).map_err(|source| StoreError::Sqlite {
            path: path.to_owned(),
            source,
        })?;
        let mut store = Store {
            conn,
            path: path.to_owned(),
        };
        store.setup()?;
        Ok(store)
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        move |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn setup(&mut self) -> Result<(), StoreError> {
        let path = self.path.clone();
        let e = move |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        self.conn
            .busy_timeout(std::time::Duration::from_secs(5))
            .map_err(&e)?;
        // Every statement this module runs is cached (about two dozen distinct texts);
        // rusqlite's default of 16 would evict some on every board.
        self.conn
            .set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
        self.conn
            .pragma_update(None, "journal_mode", "WAL")
            .map_err(&e)?;
        self.conn
            .pragma_update(None, "synchronous", "FULL")
            .map_err(&e)?;
        self.conn
            .pragma_update(None, "foreign_keys", "ON")
            .map_err(&e)?;
        let version: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(&e)?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::TooNew {
                path: self.path.clone(),
                found: version,
                known: SCHEMA_VERSION,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
            let tx = self.conn.transaction().map_err(&e)?;
            tx.execute_batch(sql).map_err(&e)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)
                .map_err(&e)?;
            tx.commit().map_err(&e)?;
        }
        Ok(())
    }

    /// The schema version in the file.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        self.conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(self.err())
    }

    /// Dedupe and insert a group of scans in ONE transaction (group commit). Each entry gets
    /// its own result; if the commit itself fails, every entry gets that error.
    pub fn admit_all(&mut self, boards: &[NewBoard]) -> Vec<Result<Admission, StoreError>> {
        let path = self.path.clone();
        let mk = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let mut tx = match self.conn.transaction() {
            Ok(tx) => tx,
            Err(e) => return boards.iter().map(|_| Err(mk(clone_err(&e)))).collect(),
        };
        let now = now_rfc3339();
        let mut out = Vec::with_capacity(boards.len());
        for b in boards {
            let res = (|| {
                let sp = tx.savepoint()?;
                let r = admit_one(&sp, b, &now)?;
                sp.commit()?;
                Ok(r)
            })();
            let failed = res.is_err();
            out.push(res.map_err(mk));
            // An I/O error or a full disk may roll back the whole transaction, not just the
            // savepoint: then nothing of this group is stored and every scan is refused.
            if failed && tx.is_autocommit() {
                let why = rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ABORT),
                    Some("the group commit was rolled back".into()),
                );
                return boards.iter().map(|_| Err(mk(clone_err(&why)))).collect();
            }
        }
        // Savepoints keep one bad row from failing the others; the commit decides for all.
        match tx.commit() {
            Ok(()) => out,
            Err(e) => boards.iter().map(|_| Err(mk(clone_err(&e)))).collect(),
        }
    }

    /// [`admit_all`](Self::admit_all) for one board.
    pub fn admit(&mut self, board: &NewBoard) -> Result<Admission, StoreError> {
        self.admit_all(std::slice::from_ref(board))
            .pop()
            .unwrap_or(Err(StoreError::WriterGone))
    }

    /// The row that stands for `serial` (not a conflict record), newest first.
    pub fn by_serial(&self, serial: &str) -> Result<Option<BoardRow>, StoreError> {
        by_serial(&self.conn, serial).map_err(self.err())
    }

    pub fn get(&self, id: i64) -> Result<Option<BoardRow>, StoreError> {
        row_by_id(&self.conn, id).optional().map_err(self.err())
    }

    /// Apply one transition (with its audit event) outside a batch.
    pub fn transition(&mut self, id: i64, t: &Transition) -> Result<BoardRow, StoreError> {
        let path = self.path.clone();
        let mk = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(mk)?;
        let row = apply(&tx, id, t, &now_rfc3339())?;
        tx.commit().map_err(mk)?;
        Ok(row)
    }

    /// Operator requeue: put a `rejected` row (with `force`, also a `conflict` row that
    /// DPS answered, never a scan's conflict record) back to `queued`, unsent, with its
    /// `dps_error_code` and `enrolled_at` cleared, and the audit event `requeued` /
    /// "requeued by operator (was …)". The batcher then sends it as usual.
    pub fn requeue(&mut self, id: i64, force: bool) -> Result<BoardRow, StoreError> {
        let path = self.path.clone();
        let mk = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let now = now_rfc3339();
        let tx = self.conn.transaction().map_err(mk)?;
        let current: Option<(String, Option<String>, Option<i64>)> = cached_row(
            &tx,
            "SELECT state, scan_conflict, dps_error_code FROM boards WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()
        .map_err(mk)?;
        let Some((state, scan_conflict, code)) = current else {
            return Err(StoreError::NoSuchBoard(id));
        };
        let refuse = |why| StoreError::NotRequeueable {
            id,
            state: state.clone(),
            why,
        };
        match State::parse(&state) {
            Some(State::Rejected) => {}
            Some(State::Conflict) if scan_conflict.is_some() => {
                return Err(refuse(
                    "it records a scan whose identity clashed; rescan the board instead",
                ))
            }
            Some(State::Conflict) if !force => {
                return Err(refuse(
                    "requeue it with --force once DPS no longer holds the other attestation",
                ))
            }
            Some(State::Conflict) => {}
            Some(State::Queued) => return Err(refuse("it is already waiting for DPS")),
            Some(State::Enrolled) => return Err(refuse("DPS already holds its enrollment")),
            None => return Err(refuse("unknown state")),
        }
        let was = match code {
            Some(c) => format!("requeued by operator (was {state} {c})"),
            None => format!("requeued by operator (was {state})"),
        };
        cached_exec(
            &tx,
            "UPDATE boards SET state = 'queued', dps_error_code = NULL, detail = NULL, \
             enrolled_at = NULL, batch_id = NULL, updated_at = ?1 WHERE id = ?2",
            params![now, id],
        )
        .map_err(mk)?;
        event(&tx, Some(id), &now, "requeued", Some(&was)).map_err(mk)?;
        let row = row_by_id(&tx, id).map_err(mk)?;
        tx.commit().map_err(mk)?;
        Ok(row)
    }

    /// Up to `limit` queued rows not in any batch, oldest first.
    pub fn unsent(&self, limit: usize) -> Result<Vec<BoardRow>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached(&format!(
                "SELECT {ROW_COLUMNS} FROM boards WHERE state = 'queued' AND batch_id IS NULL \
                 ORDER BY id LIMIT ?1"
            ))
            .map_err(self.err())?;
        let rows = st
            .query_map([limit as i64], row_from)
            .map_err(self.err())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.err())?;
        Ok(rows)
    }

    /// Queued rows whose replies should go back to the serial line after a restart.
    pub fn queued_from(&self, source: Source) -> Result<Vec<(String, String)>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT registration_id, serial FROM boards WHERE state = 'queued' AND source = ?1",
            )
            .map_err(self.err())?;
        let rows = st
            .query_map([source.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(self.err())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.err())?;
        Ok(rows)
    }

    /// Record a batch and mark its rows with it, committed before anything is sent.
    /// Returns the batch id and the rows actually claimed (still queued and unsent).
    pub fn begin_batch(&mut self, ids: &[i64]) -> Result<(i64, Vec<BoardRow>), StoreError> {
        let path = self.path.clone();
        let mk = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let now = now_rfc3339();
        let tx = self.conn.transaction().map_err(mk)?;
        cached_exec(&tx, "INSERT INTO batches(started_at) VALUES (?1)", [&now]).map_err(mk)?;
        let batch = tx.last_insert_rowid();
        let mut rows = Vec::with_capacity(ids.len());
        for id in ids {
            let n = cached_exec(
                &tx,
                "UPDATE boards SET batch_id = ?1, updated_at = ?2 \
                 WHERE id = ?3 AND state = 'queued' AND batch_id IS NULL",
                params![batch, now, id],
            )
            .map_err(mk)?;
            if n == 1 {
                event(
                    &tx,
                    Some(*id),
                    &now,
                    "batch",
                    Some(&format!("batch {batch}")),
                )
                .map_err(mk)?;
                if let Some(r) = row_by_id(&tx, *id).optional().map_err(mk)? {
                    rows.push(r);
                }
            }
        }
        tx.commit().map_err(mk)?;
        Ok((batch, rows))
    }

    /// Finish a batch: apply the per-row outcomes; rows of the batch without an outcome
    /// go back to the unsent queue. One transaction.
    pub fn finish_batch(
        &mut self,
        batch: i64,
        outcomes: &[(i64, Transition)],
        outcome: &str,
    ) -> Result<Vec<BoardRow>, StoreError> {
        let path = self.path.clone();
        let mk = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let now = now_rfc3339();
        let tx = self.conn.transaction().map_err(mk)?;
        let mut changed = Vec::with_capacity(outcomes.len());
        for (id, t) in outcomes {
            changed.push(apply(&tx, *id, t, &now)?);
        }
        let released: Vec<i64> = {
            let mut st = tx
                .prepare_cached("SELECT id FROM boards WHERE batch_id = ?1 AND state = 'queued'")
                .map_err(mk)?;
            let ids = st
                .query_map([batch], |r| r.get(0))
                .map_err(mk)?
                .collect::<Result<Vec<i64>, _>>()
                .map_err(mk)?;
            ids
        };
        for id in &released {
            cached_exec(
                &tx,
                "UPDATE boards SET batch_id = NULL, updated_at = ?1 WHERE id = ?2",
                params![now, id],
            )
            .map_err(mk)?;
            event(
                &tx,
                Some(*id),
                &now,
                "requeued",
                Some(&format!("batch {batch}: {outcome}")),
            )
            .map_err(mk)?;
        }
        cached_exec(
            &tx,
            "UPDATE batches SET finished_at = ?1, outcome = ?2 WHERE id = ?3",
            params![now, outcome, batch],
        )
        .map_err(mk)?;
        tx.commit().map_err(mk)?;
        Ok(changed)
    }

    /// Batches that were sent and never finished, with their still-queued rows.
    pub fn open_batches(&self) -> Result<Vec<OpenBatch>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT id FROM batches WHERE finished_at IS NULL ORDER BY id")
            .map_err(self.err())?;
        let ids = st
            .query_map([], |r| r.get::<_, i64>(0))
            .map_err(self.err())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.err())?;
        let mut out = Vec::new();
        for id in ids {
            let mut st = self
                .conn
                .prepare_cached(&format!(
                    "SELECT {ROW_COLUMNS} FROM boards WHERE batch_id = ?1 AND state = 'queued' ORDER BY id"
                ))
                .map_err(self.err())?;
            let rows = st
                .query_map([id], row_from)
                .map_err(self.err())?
                .collect::<Result<Vec<_>, _>>()
                .map_err(self.err())?;
            out.push(OpenBatch { id, rows });
        }
        Ok(out)
    }

    /// Rows by state (every state present, zero when none).
    pub fn counts(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        let mut out: BTreeMap<String, u64> = State::ALL
            .iter()
            .map(|s| (s.as_str().to_owned(), 0))
            .collect();
        let mut st = self
            .conn
            .prepare_cached("SELECT state, count(*) FROM boards GROUP BY state")
            .map_err(self.err())?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(self.err())?;
        for r in rows {
            let (s, n) = r.map_err(self.err())?;
            out.insert(s, n.max(0) as u64);
        }
        Ok(out)
    }

    /// (unsent queued rows, queued rows inside a batch).
    pub fn queue_depth(&self) -> Result<(u64, u64), StoreError> {
        cached_row(
            &self.conn,
            "SELECT count(*) FILTER (WHERE batch_id IS NULL), \
                    count(*) FILTER (WHERE batch_id IS NOT NULL) \
             FROM boards WHERE state = 'queued'",
            [],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?.max(0) as u64,
                    r.get::<_, i64>(1)?.max(0) as u64,
                ))
            },
        )
        .map_err(self.err())
    }

    /// Audit events of one board, oldest first: (kind, detail).
    pub fn events(&self, board: i64) -> Result<Vec<(String, Option<String>)>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT kind, detail FROM events WHERE board_id = ?1 ORDER BY id")
            .map_err(self.err())?;
        let rows = st
            .query_map([board], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(self.err())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.err())?;
        Ok(rows)
    }
}

fn clone_err(e: &rusqlite::Error) -> rusqlite::Error {
    match e {
        rusqlite::Error::SqliteFailure(code, msg) => {
            rusqlite::Error::SqliteFailure(*code, msg.clone())
        }
        other => rusqlite::Error::ToSqlConversionFailure(other.to_string().into()),
    }
}

fn by_serial(conn: &Connection, serial: &str) -> rusqlite::Result<Option<BoardRow>> {
    cached_row(
        conn,
        &format!(
            "SELECT {ROW_COLUMNS} FROM boards WHERE serial = ?1 \
             AND scan_conflict IS NULL ORDER BY id DESC LIMIT 1"
        ),
        [serial],
        row_from,
    )
    .optional()
}

/// `query_row` through the connection's statement cache: the SQL is parsed once per
/// connection, then only rebound. Same statement, same transaction as `query_row`.
fn cached_row<T, P, F>(conn: &Connection, sql: &str, params: P, f: F) -> rusqlite::Result<T>
where
    P: rusqlite::Params,
    F: FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
{
    conn.prepare_cached(sql)?.query_row(params, f)
}

/// `execute` through the connection's statement cache (see [`cached_row`]).
fn cached_exec<P: rusqlite::Params>(
    conn: &Connection,
    sql: &str,
    params: P,
) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(params)
}

/// The full row with this id.
fn row_by_id(conn: &Connection, id: i64) -> rusqlite::Result<BoardRow> {
    cached_row(
        conn,
        &format!("SELECT {ROW_COLUMNS} FROM boards WHERE id = ?1"),
        [id],
        row_from,
    )
}

fn event(
    tx: &Connection,
    board: Option<i64>,
    at: &str,
    kind: &str,
    detail: Option<&str>,
) -> rusqlite::Result<()> {
    cached_exec(
        tx,
        "INSERT INTO events(board_id, at, kind, detail) VALUES (?1, ?2, ?3, ?4)",
        params![board, at, kind, detail],
    )?;
    Ok(())
}

fn insert_row(
    tx: &Connection,
    b: &NewBoard,
    state: State,
    detail: Option<&str>,
    now: &str,
) -> rusqlite::Result<BoardRow> {
    cached_exec(
        tx,
        "INSERT INTO boards(serial, slot, registration_id, attestation, ek_hash, cert_sha256, \
         ek_cert_issuer, enrollment_json, state, detail, scanned_at, updated_at, source) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?11, ?12)",
        params![
            b.serial,
            b.slot,
            b.registration_id,
            b.attestation,
            b.ek_hash,
            b.cert_sha256,
            b.ek_cert_issuer,
            b.enrollment_json,
            state.as_str(),
            detail,
            now,
            b.source.as_str()
        ],
    )?;
    let id = tx.last_insert_rowid();
    event(tx, Some(id), now, state.as_str(), detail)?;
    row_by_id(tx, id)
}

fn same_attestation(row: &BoardRow, b: &NewBoard) -> bool {
    match (&row.ek_hash, &b.ek_hash) {
        (Some(a), Some(c)) => a == c,
        // DICE boards: the serial itself identifies the board; re-issuing is not re-attesting.
        (None, None) => row.attestation == b.attestation,
        _ => false,
    }
}

fn admit_one(tx: &Connection, b: &NewBoard, now: &str) -> rusqlite::Result<Admission> {
    if let Some(recorded) = by_serial(tx, &b.serial)? {
        if same_attestation(&recorded, b) {
            return Ok(Admission::Known(recorded));
        }
        let detail = format!(
            "recorded {} differs from scanned {}",
            recorded.ek_hash.as_deref().unwrap_or("none"),
            b.ek_hash.as_deref().unwrap_or("none")
        );
        let conflict = insert_conflict(tx, b, "ek-changed", &detail, now)?;
        return Ok(Admission::EkChanged { recorded, conflict });
    }
    if let Some(ek) = &b.ek_hash {
        let other = cached_row(
            tx,
            &format!(
                "SELECT {ROW_COLUMNS} FROM boards WHERE ek_hash = ?1 AND serial <> ?2 \
                 ORDER BY id LIMIT 1"
            ),
            params![ek, b.serial],
            row_from,
        )
        .optional()?;
        if let Some(other) = other {
            let detail = format!("ek {ek} is recorded under serial {}", other.serial);
            let conflict = insert_conflict(tx, b, "duplicate-ek", &detail, now)?;
            return Ok(Admission::Duplicate {
                reason: "duplicate-ek",
                other,
                conflict,
            });
        }
    }
    let other = cached_row(
        tx,
        &format!(
            "SELECT {ROW_COLUMNS} FROM boards WHERE registration_id = ?1 AND serial <> ?2 \
             AND state <> 'conflict' ORDER BY id LIMIT 1"
        ),
        params![b.registration_id, b.serial],
        row_from,
    )
    .optional()?;
    if let Some(other) = other {
        let detail = format!(
            "registration id {} is recorded under serial {}",
            b.registration_id, other.serial
        );
        let conflict = insert_conflict(tx, b, "duplicate-id", &detail, now)?;
        return Ok(Admission::Duplicate {
            reason: "duplicate-id",
            other,
            conflict,
        });
    }
    let row = insert_row(tx, b, State::Queued, None, now)?;
    if b.enrolled_without_dps {
        let row = apply_raw(
            tx,
            row.id,
            &Transition::Enrolled {
                detail: Some("covered by the enrollment group".into()),
            },
            now,
        )?;
        return Ok(Admission::Inserted(row));
    }
    Ok(Admission::Inserted(row))
}

fn insert_conflict(
    tx: &Connection,
    b: &NewBoard,
    reason: &str,
    detail: &str,
    now: &str,
) -> rusqlite::Result<BoardRow> {
    let full = format!("{reason}: {detail}");
    let row = insert_row(tx, b, State::Conflict, Some(&full), now)?;
    // A conflict row records a scan; it never stands for its serial in later dedupes.
    cached_exec(
        tx,
        "UPDATE boards SET scan_conflict = ?1 WHERE id = ?2",
        params![reason, row.id],
    )?;
    Ok(row)
}

/// Move a queued row along `t`; anything else is refused.
fn apply_raw(tx: &Connection, id: i64, t: &Transition, now: &str) -> rusqlite::Result<BoardRow> {
    let (detail, code, enrolled_at) = match t {
        Transition::Enrolled { detail } => (detail.clone(), None, Some(now)),
        Transition::Conflict { detail } => (Some(detail.clone()), None, None),
        Transition::Rejected { code, detail } => (Some(detail.clone()), Some(*code), None),
    };
    let to = t.target();
    cached_exec(
        tx,
        "UPDATE boards SET state = ?1, detail = ?2, dps_error_code = ?3, enrolled_at = ?4, \
         updated_at = ?5 WHERE id = ?6 AND state = 'queued'",
        params![to.as_str(), detail, code, enrolled_at, now, id],
    )?;
    event(tx, Some(id), now, to.as_str(), detail.as_deref())?;
    row_by_id(tx, id)
}

fn apply(tx: &Transaction<'_>, id: i64, t: &Transition, now: &str) -> Result<BoardRow, StoreError> {
    let path = PathBuf::new();
    let mk = |source| StoreError::Sqlite {
        path: path.clone(),
        source,
    };
    let current: Option<String> =
        cached_row(tx, "SELECT state FROM boards WHERE id = ?1", [id], |r| {
            r.get(0)
        })
        .optional()
        .map_err(mk)?;
    match current.as_deref() {
        None => Err(StoreError::NoSuchBoard(id)),
        Some("queued") => apply_raw(tx, id, t, now).map_err(mk),
        Some(other) => Err(StoreError::Transition {
            id,
            from: other.to_owned(),
            to: t.target().as_str().to_owned(),
        }),
    }
}

type Job = Box<dyn FnOnce(&mut Store) + Send>;

enum Cmd {
    Admit(NewBoard, oneshot::Sender<Result<Admission, StoreError>>),
    Run(Job),
}

/// The single writer: a thread owning the connection. Scans that queue up while a commit
/// is running are admitted together in the next transaction (group commit).
#[derive(Clone)]
pub struct StoreWriter {
    tx: mpsc::UnboundedSender<Cmd>,
    path: Arc<PathBuf>,
}

impl StoreWriter {
    /// Open the store and start its writer thread.
    pub fn spawn(path: &Path) -> Result<StoreWriter, StoreError> {
        let store = Store::open(path)?;
        let (tx, mut rx) = mpsc::unbounded_channel::<Cmd>();
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || {
                let mut store = store;
                let mut pending: Option<Cmd> = None;
                loop {
                    let cmd = match pending.take() {
                        Some(c) => c,
                        None => match rx.blocking_recv() {
                            Some(c) => c,
                            None => break,
                        },
                    };
                    match cmd {
                        Cmd::Run(job) => job(&mut store),
                        Cmd::Admit(first, reply) => {
                            let mut boards = vec![first];
                            let mut replies = vec![reply];
                            while let Ok(next) = rx.try_recv() {
                                match next {
                                    Cmd::Admit(b, r) => {
                                        boards.push(b);
                                        replies.push(r);
                                    }
                                    other => {
                                        pending = Some(other);
                                        break;
                                    }
                                }
                            }
                            let results = store.admit_all(&boards);
                            for (r, res) in replies.into_iter().zip(results) {
                                let _ = r.send(res);
                            }
                        }
                    }
                }
            })
            .map_err(|source| StoreError::Thread {
                path: path.to_owned(),
                source,
            })?;
        Ok(StoreWriter {
            tx,
            path: Arc::new(path.to_owned()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Dedupe and insert one scan; resolves after its group's commit.
    pub async fn admit(&self, board: NewBoard) -> Result<Admission, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Admit(board, tx))
            .map_err(|_| StoreError::WriterGone)?;
        rx.await.map_err(|_| StoreError::WriterGone)?
    }

    /// Run `f` on the writer thread with the store.
    pub async fn call<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Store) -> Result<R, StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |s| {
            let _ = tx.send(f(s));
        });
        self.tx
            .send(Cmd::Run(job))
            .map_err(|_| StoreError::WriterGone)?;
        rx.await.map_err(|_| StoreError::WriterGone)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn board(serial: &str, ek: &str) -> NewBoard {
        NewBoard {
            serial: serial.into(),
            slot: "fixture-1".into(),
            registration_id: format!("reg-{ek}"),
            attestation: "tpm".into(),
            ek_hash: Some(ek.into()),
            cert_sha256: None,
            ek_cert_issuer: None,
            enrollment_json: "{}".into(),
            source: Source::Control,
            enrolled_without_dps: false,
        }
    }

    fn inserted(a: Result<Admission, StoreError>) -> BoardRow {
        match a {
            Ok(Admission::Inserted(r)) => r,
            other => panic!("expected an insert, got {other:?}"),
        }
    }

    #[test]
    fn schema_is_versioned_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/station.db");
        let s = Store::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        let mode: String = s
            .conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = s
            .conn
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "synchronous=FULL");
        drop(s);
        let s = Store::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        s.conn
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(s);
        assert!(matches!(Store::open(&path), Err(StoreError::TooNew { .. })));
    }

    #[test]
    fn dedupe_by_serial_and_ek() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("s.db")).unwrap();
        let first = inserted(s.admit(&board("SN-1", "ek1")));
        assert_eq!(first.state, State::Queued);
        // Same serial, same EK: the stored row, nothing new.
        assert!(
            matches!(s.admit(&board("SN-1", "ek1")), Ok(Admission::Known(r)) if r.id == first.id)
        );
        // Same serial, other EK: alarm row, original untouched.
        match s.admit(&board("SN-1", "ek2")).unwrap() {
            Admission::EkChanged { recorded, conflict } => {
                assert_eq!(recorded.id, first.id);
                assert_eq!(conflict.state, State::Conflict);
                assert!(conflict.detail.unwrap().starts_with("ek-changed: "));
            }
            other => panic!("{other:?}"),
        }
        // The conflict record does not stand for the serial afterwards.
        assert_eq!(s.by_serial("SN-1").unwrap().unwrap().id, first.id);
        // Other serial, same EK: duplicate-ek conflict row.
        match s.admit(&board("SN-2", "ek1")).unwrap() {
            Admission::Duplicate {
                reason,
                other,
                conflict,
            } => {
                assert_eq!(reason, "duplicate-ek");
                assert_eq!(other.id, first.id);
                assert_eq!(conflict.state, State::Conflict);
            }
            other => panic!("{other:?}"),
        }
        let counts = s.counts().unwrap();
        assert_eq!(counts["queued"], 1);
        assert_eq!(counts["conflict"], 2);
        assert_eq!(counts["enrolled"], 0);
    }

    #[test]
    fn transitions_only_from_queued_and_audited() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("s.db")).unwrap();
        let r = inserted(s.admit(&board("SN-1", "ek1")));
        let done = s
            .transition(
                r.id,
                &Transition::Rejected {
                    code: 400004,
                    detail: "bad".into(),
                },
            )
            .unwrap();
        assert_eq!(done.state, State::Rejected);
        assert_eq!(done.dps_error_code, Some(400004));
        let again = s.transition(r.id, &Transition::Enrolled { detail: None });
        assert!(
            matches!(again, Err(StoreError::Transition { .. })),
            "{again:?}"
        );
        assert!(matches!(
            s.transition(999, &Transition::Enrolled { detail: None }),
            Err(StoreError::NoSuchBoard(999))
        ));
        let kinds: Vec<String> = s.events(r.id).unwrap().into_iter().map(|e| e.0).collect();
        assert_eq!(kinds, ["queued", "rejected"]);
    }

    #[test]
    fn operator_requeue_takes_rejected_and_forced_conflicts_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("s.db")).unwrap();
        let r = inserted(s.admit(&board("SN-1", "ek1")));
        let (batch, _) = s.begin_batch(&[r.id]).unwrap();
        let rejected = Transition::Rejected {
            code: 400004,
            detail: "bad".into(),
        };
        s.finish_batch(batch, &[(r.id, rejected)], "sent").unwrap();
        // Queued rows cannot be requeued; a rejected one can, and becomes unsent again.
        let back = s.requeue(r.id, false).unwrap();
        assert_eq!(back.state, State::Queued);
        assert_eq!((back.dps_error_code, back.batch_id), (None, None));
        assert_eq!(s.unsent(10).unwrap().len(), 1);
        assert!(matches!(
            s.requeue(r.id, true),
            Err(StoreError::NotRequeueable { .. })
        ));
        let events = s.events(r.id).unwrap();
        let last = events.last().unwrap();
        assert_eq!(last.0, "requeued");
        assert_eq!(
            last.1.as_deref(),
            Some("requeued by operator (was rejected 400004)")
        );
        // Enrolled: refused.
        let done = s
            .transition(r.id, &Transition::Enrolled { detail: None })
            .unwrap();
        assert!(matches!(
            s.requeue(done.id, true),
            Err(StoreError::NotRequeueable { .. })
        ));
        // A DPS conflict needs force; a scan's conflict record never goes back.
        let c = inserted(s.admit(&board("SN-2", "ek2")));
        s.transition(
            c.id,
            &Transition::Conflict {
                detail: "attestation-mismatch: x".into(),
            },
        )
        .unwrap();
        assert!(matches!(
            s.requeue(c.id, false),
            Err(StoreError::NotRequeueable { .. })
        ));
        assert_eq!(s.requeue(c.id, true).unwrap().state, State::Queued);
        let dup = match s.admit(&board("SN-3", "ek1")).unwrap() {
            Admission::Duplicate { conflict, .. } => conflict,
            other => panic!("{other:?}"),
        };
        assert!(matches!(
            s.requeue(dup.id, true),
            Err(StoreError::NotRequeueable { .. })
        ));
        assert!(matches!(
            s.requeue(999, true),
            Err(StoreError::NoSuchBoard(999))
        ));
    }

    #[test]
    fn batches_claim_finish_requeue_and_stay_open_until_finished() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let mut s = Store::open(&path).unwrap();
        let results = s.admit_all(&[board("A", "e1"), board("B", "e2"), board("C", "e3")]);
        let ids: Vec<i64> = results.into_iter().map(|r| inserted(r).id).collect();
        let (batch, claimed) = s.begin_batch(&ids[..2]).unwrap();
        assert_eq!(claimed.len(), 2);
        assert_eq!(s.unsent(10).unwrap().len(), 1);
        assert_eq!(s.queue_depth().unwrap(), (1, 2));
        // A second claim of the same rows gets nothing.
        let (_b2, again) = s.begin_batch(&ids[..2]).unwrap();
        assert!(again.is_empty());
        drop(s);
        // "Crash": reopen; the batch is open with its two rows.
        let mut s = Store::open(&path).unwrap();
        let open = s.open_batches().unwrap();
        let ours = open.iter().find(|b| b.id == batch).unwrap();
        assert_eq!(ours.rows.len(), 2);
        let changed = s
            .finish_batch(
                batch,
                &[(ids[0], Transition::Enrolled { detail: None })],
                "reconciled",
            )
            .unwrap();
        assert_eq!(changed[0].state, State::Enrolled);
        assert!(changed[0].enrolled_at.is_some());
        // B went back to the queue, unsent, in id order.
        let unsent: Vec<String> = s
            .unsent(10)
            .unwrap()
            .into_iter()
            .map(|r| r.serial)
            .collect();
        assert_eq!(unsent, ["B", "C"]);
        assert!(s.open_batches().unwrap().iter().all(|b| b.id != batch));
    }

    #[tokio::test]
    async fn writer_groups_concurrent_scans_into_one_commit() {
        let dir = tempfile::tempdir().unwrap();
        let w = StoreWriter::spawn(&dir.path().join("s.db")).unwrap();
        let mut tasks = Vec::new();
        for i in 0..200 {
            let w = w.clone();
            tasks.push(tokio::spawn(async move {
                w.admit(board(&format!("SN-{i}"), &format!("ek{i}"))).await
            }));
        }
        for t in tasks {
            assert!(matches!(t.await.unwrap(), Ok(Admission::Inserted(_))));
        }
        let counts = w.call(|s| s.counts()).await.unwrap();
        assert_eq!(counts["queued"], 200);
        // Commits are counted by SQLite's total_changes per transaction; fewer WAL frames
        // than rows shows grouping: check via the data_version-independent changes count.
        let commits = w
            .call(|s| {
                s.conn
                    .query_row("SELECT count(DISTINCT at) FROM events", [], |r| {
                        r.get::<_, i64>(0)
                    })
                    .map_err(|e| StoreError::Sqlite {
                        path: PathBuf::new(),
                        source: e,
                    })
            })
            .await
            .unwrap();
        assert!(commits < 200, "200 scans took {commits} commits");
    }

    #[test]
    fn a_full_disk_acknowledges_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("s.db")).unwrap();
        // Cap the database at its current size: the next insert cannot grow it (SQLITE_FULL).
        let pages: i64 = s
            .conn
            .pragma_query_value(None, "page_count", |r| r.get(0))
            .unwrap();
        s.conn.pragma_update(None, "max_page_count", pages).unwrap();
        let big = NewBoard {
            enrollment_json: "x".repeat(64 * 1024),
            ..board("SN-1", "ek1")
        };
        let res = s.admit_all(&[big, board("SN-2", "ek2")]);
        assert!(res.iter().any(|r| r.is_err()), "{res:?}");
        s.conn
            .pragma_update(None, "max_page_count", 1_000_000)
            .unwrap();
        let stored = s.by_serial("SN-1").unwrap();
        assert!(stored.is_none(), "nothing of a failed insert may be stored");
    }
}
