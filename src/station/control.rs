//! The daemon's control socket: a Unix stream socket (mode 0660) through which
//! `dps-station scan`, `requeue`, `status` and `control pause|resume|drain` talk to a
//! running `run`.
//!
//! Protocol: JSON lines (UTF-8, one object per `\n`-terminated line, at most
//! [`MAX_REQUEST_LINE`] bytes). A connection carries any number of requests, answered in
//! order:
//!
//! | request | response lines |
//! |---|---|
//! | `{"cmd":"scan","serial":"S","slot":null,"wait":true}` | `{"reply":"QUEUED S regid","final":false}` … then the final reply line (`"final":true`); with `"wait":false` (the default) only the first reply |
//! | `{"cmd":"requeue","serial":"S","force":false,"wait":false}` | a `rejected` row (a DPS `conflict` with `"force":true`) goes back to the queue: replies as for `scan`; a refusal (unknown serial, other state) is `{"error":"…"}` |
//! | `{"cmd":"status"}` | one line: the [`StatusSnapshot`] object |
//! | `{"cmd":"pause"}`, `{"cmd":"resume"}`, `{"cmd":"drain"}` | `{"ok":true}` |
//! | anything else (bad JSON, unknown `cmd`, unknown field, over-long, not UTF-8) | `{"error":"…"}`; the connection stays usable |
//!
//! `reply` is exactly the DESIGN §5 reply line, without terminator. If the daemon stops
//! before a final reply, the server sends `{"error":"…"}` instead.
//!
//! `pause` refuses scans until `resume`. `drain` stops intake until the daemon restarts and
//! sends the queue at once; the status then shows `"draining":true`, and `"drained":true`
//! once nothing is queued, in flight or half-way (`dps-station control drain --wait` polls
//! for that; `run --exit-when-drained` exits 0 then).
//!
//! This module must never panic on input, never delete a path that is not a socket, and
//! never take over a socket another live daemon is serving.
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::station::pipeline::{PipelineHandle, ScanRequest};
use crate::station::status::StatusSnapshot;

/// Longest request line the server reads; longer lines are discarded up to their `\n`.
pub const MAX_REQUEST_LINE: usize = 64 * 1024;
/// Permission bits of the socket file: owner and group may connect.
pub const SOCKET_MODE: u32 = 0o660;

/// Errors of the control socket, server and client side. Messages name the socket path.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path} is in use by a running daemon")]
    InUse { path: PathBuf },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("cannot bind control socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("no daemon is listening on control socket {path} ({source})")]
    NotRunning { path: PathBuf, source: io::Error },
    #[error("permission denied on control socket {path}")]
    PermissionDenied { path: PathBuf },
    #[error("control socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("control socket {path}: daemon answered something unexpected: {detail}")]
    Protocol { path: PathBuf, detail: String },
}

/// One request on the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
pub enum ControlRequest {
    Scan {
        serial: String,
        #[serde(default)]
        slot: Option<String>,
        #[serde(default)]
        wait: bool,
    },
    /// Operator requeue of a rejected (or, forced, a conflict) board.
    Requeue {
        serial: String,
        #[serde(default)]
        force: bool,
        #[serde(default)]
        wait: bool,
    },
    Status,
    Pause,
    Resume,
    Drain,
}

/// One reply line for a scan, as sent on the socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyLine {
    pub reply: String,
    #[serde(rename = "final")]
    pub is_final: bool,
}

/// Bind the control socket at `path` with mode 0660.
///
/// A socket file left behind by a dead daemon (nobody accepts on it) is replaced; a socket
/// a live process answers on is refused with [`ControlError::InUse`]; a path that exists
/// but is not a socket is never removed. A missing parent directory is created (0750).
pub async fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            if !meta.file_type().is_socket() {
                return Err(ControlError::NotASocket { path: path.into() });
            }
            match UnixStream::connect(path).await {
                Ok(_) => return Err(ControlError::InUse { path: path.into() }),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    tracing::info!(path = %path.display(), "replacing stale control socket");
                    std::fs::remove_file(path).map_err(|source| ControlError::Bind {
                        path: path.into(),
                        source,
                    })?;
                }
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                    return Err(ControlError::PermissionDenied { path: path.into() })
                }
                Err(source) => {
                    return Err(ControlError::Bind {
                        path: path.into(),
                        source,
                    })
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                if !parent.exists() {
                    std::fs::create_dir_all(parent).map_err(|source| ControlError::Bind {
                        path: path.into(),
                        source,
                    })?;
                    let _ =
                        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o750));
                }
            }
        }
        Err(source) => {
            return Err(ControlError::Bind {
                path: path.into(),
                source,
            })
        }
    }
    let listener = UnixListener::bind(path).map_err(|source| ControlError::Bind {
        path: path.into(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE)).map_err(
        |source| ControlError::Bind {
            path: path.into(),
            source,
        },
    )?;
    Ok(listener)
}

/// Bind `path` (see [`bind`]) and serve it until `shutdown` turns true.
pub async fn serve(
    path: &Path,
    pipeline: PipelineHandle,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ControlError> {
    let listener = bind(path).await?;
    serve_listener(listener, path, pipeline, shutdown).await
}

/// Serve an already bound control socket until `shutdown` turns true, then remove the
/// socket file (only if it is still the one this listener made).
pub async fn serve_listener(
    listener: UnixListener,
    path: &Path,
    pipeline: PipelineHandle,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ControlError> {
    let ino = std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
    loop {
        tokio::select! {
            _ = wait_true(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let pipeline = pipeline.clone();
                    let shutdown = shutdown.clone();
                    tokio::spawn(async move {
                        if let Err(e) = handle_connection(stream, pipeline, shutdown).await {
                            tracing::debug!(error = %e, "control connection ended");
                        }
                    });
                }
                Err(e) => {
                    // EMFILE and friends: don't spin, don't die.
                    tracing::warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    drop(listener);
    if let (Some(ours), Ok(now)) = (ino, std::fs::metadata(path)) {
        if ours == (now.dev(), now.ino()) {
            let _ = std::fs::remove_file(path);
        }
    }
    Ok(())
}

async fn wait_true(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            // Sender gone: nobody can ask us to stop any more; keep serving.
            std::future::pending::<()>().await;
        }
    }
}

/// What reading one request line produced.
enum Line {
    Text(String),
    TooLong,
    NotUtf8,
}

/// Read one `\n`-terminated line of at most `max` bytes; an over-long line is consumed up
/// to its terminator. `None` at end of stream.
async fn read_line_limited<R: AsyncBufRead + Unpin>(
    r: &mut R,
    max: usize,
) -> io::Result<Option<Line>> {
    let mut buf = Vec::new();
    let mut too_long = false;
    loop {
        let chunk = r.fill_buf().await?;
        if chunk.is_empty() {
            if buf.is_empty() && !too_long {
                return Ok(None);
            }
            break;
        }
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        if !too_long {
            if buf.len() + take > max + 1 {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(&chunk[..take]);
            }
        }
        r.consume(take);
        if done {
            break;
        }
    }
    if too_long {
        return Ok(Some(Line::TooLong));
    }
    while matches!(buf.last(), Some(b'\n' | b'\r')) {
        buf.pop();
    }
    Ok(Some(match String::from_utf8(buf) {
        Ok(s) => Line::Text(s),
        Err(_) => Line::NotUtf8,
    }))
}

async fn write_json<T: Serialize>(w: &mut OwnedWriteHalf, v: &T) -> io::Result<()> {
    let mut line = serde_json::to_vec(v).map_err(io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await
}

async fn write_error(w: &mut OwnedWriteHalf, msg: &str) -> io::Result<()> {
    write_json(w, &serde_json::json!({ "error": msg })).await
}

async fn handle_connection(
    stream: UnixStream,
    pipeline: PipelineHandle,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    loop {
        let line = tokio::select! {
            _ = wait_true(&mut shutdown) => return Ok(()),
            line = read_line_limited(&mut r, MAX_REQUEST_LINE) => line?,
        };
        let text = match line {
            None => return Ok(()),
            Some(Line::TooLong) => {
                write_error(
                    &mut w,
                    &format!("request longer than {MAX_REQUEST_LINE} bytes"),
                )
                .await?;
                continue;
            }
            Some(Line::NotUtf8) => {
                write_error(&mut w, "request is not UTF-8").await?;
                continue;
            }
            Some(Line::Text(t)) => t,
        };
        if text.trim().is_empty() {
            continue;
        }
        let req: ControlRequest = match serde_json::from_str(&text) {
            Ok(r) => r,
            Err(e) => {
                write_error(&mut w, &format!("bad request: {e}")).await?;
                continue;
            }
        };
        match req {
            ControlRequest::Status => {
                let snap = pipeline.status().await;
                write_json(&mut w, &snap).await?;
            }
            ControlRequest::Pause => {
                pipeline.pause();
                write_json(&mut w, &serde_json::json!({"ok": true})).await?;
            }
            ControlRequest::Resume => {
                pipeline.resume();
                write_json(&mut w, &serde_json::json!({"ok": true})).await?;
            }
            ControlRequest::Drain => {
                pipeline.drain();
                write_json(&mut w, &serde_json::json!({"ok": true})).await?;
            }
            ControlRequest::Scan { serial, slot, wait } => {
                let rx = pipeline.submit(ScanRequest { slot, serial }).await;
                if !stream_replies(&mut w, rx, wait, &mut shutdown).await? {
                    return Ok(());
                }
            }
            ControlRequest::Requeue {
                serial,
                force,
                wait,
            } => match pipeline.requeue(&serial, force).await {
                Ok(rx) => {
                    if !stream_replies(&mut w, rx, wait, &mut shutdown).await? {
                        return Ok(());
                    }
                }
                Err(e) => write_error(&mut w, &e.to_string()).await?,
            },
        }
    }
}

/// Write a scan's replies as [`ReplyLine`]s: the first one, or with `wait` up to the final
/// one. False when the daemon is shutting down (the connection should end).
async fn stream_replies(
    w: &mut OwnedWriteHalf,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<crate::station::pipeline::Reply>,
    wait: bool,
    shutdown: &mut watch::Receiver<bool>,
) -> io::Result<bool> {
    loop {
        let next = tokio::select! {
            _ = wait_true(shutdown) => {
                write_error(w, "daemon is shutting down").await?;
                return Ok(false);
            }
            next = rx.recv() => next,
        };
        match next {
            Some(reply) => {
                let is_final = reply.is_final();
                let line = ReplyLine {
                    reply: reply.to_string(),
                    is_final,
                };
                write_json(w, &line).await?;
                if is_final || !wait {
                    return Ok(true);
                }
            }
            None => {
                write_error(w, "the pipeline stopped before a final reply").await?;
                return Ok(true);
            }
        }
    }
}

/// Client side of the control socket (used by `scan`, `status`, `control`).
pub struct ControlClient {
    path: PathBuf,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl ControlClient {
    /// Connect; a missing socket or one nobody accepts on is [`ControlError::NotRunning`].
    pub async fn connect(path: &Path) -> Result<Self, ControlError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| match source.kind() {
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                    ControlError::NotRunning {
                        path: path.into(),
                        source,
                    }
                }
                io::ErrorKind::PermissionDenied => {
                    ControlError::PermissionDenied { path: path.into() }
                }
                _ => ControlError::Io {
                    path: path.into(),
                    source,
                },
            })?;
        let (r, w) = stream.into_split();
        Ok(ControlClient {
            path: path.into(),
            reader: BufReader::new(r),
            writer: w,
        })
    }

    fn io_err(&self, source: io::Error) -> ControlError {
        ControlError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Send one request line.
    pub async fn send(&mut self, req: &ControlRequest) -> Result<(), ControlError> {
        let mut line = serde_json::to_vec(req).map_err(|e| self.io_err(io::Error::other(e)))?;
        line.push(b'\n');
        let res = self.writer.write_all(&line).await;
        res.map_err(|e| self.io_err(e))
    }

    /// Receive one response line as JSON; `None` when the daemon closed the connection.
    pub async fn recv(&mut self) -> Result<Option<serde_json::Value>, ControlError> {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).await;
        let n = n.map_err(|e| self.io_err(e))?;
        if n == 0 {
            return Ok(None);
        }
        serde_json::from_str(line.trim_end())
            .map(Some)
            .map_err(|e| ControlError::Protocol {
                path: self.path.clone(),
                detail: e.to_string(),
            })
    }

    /// Send a request that has exactly one response line and return it.
    pub async fn call(&mut self, req: &ControlRequest) -> Result<serde_json::Value, ControlError> {
        self.send(req).await?;
        match self.recv().await? {
            Some(v) => Ok(v),
            None => Err(ControlError::Protocol {
                path: self.path.clone(),
                detail: "connection closed before an answer".into(),
            }),
        }
    }

    /// `status`: the daemon's snapshot.
    pub async fn status(&mut self) -> Result<StatusSnapshot, ControlError> {
        let v = self.call(&ControlRequest::Status).await?;
        if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
            return Err(ControlError::Protocol {
                path: self.path.clone(),
                detail: e.to_owned(),
            });
        }
        serde_json::from_value(v).map_err(|e| ControlError::Protocol {
            path: self.path.clone(),
            detail: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn limited_reader_discards_overlong_lines_and_keeps_going() {
        let mut input: Vec<u8> = vec![b'x'; 100];
        input.extend_from_slice(b"\n{\"cmd\":\"status\"}\r\n\xff\xfe\nlast");
        let mut r = BufReader::with_capacity(7, &input[..]);
        assert!(matches!(
            read_line_limited(&mut r, 50).await,
            Ok(Some(Line::TooLong))
        ));
        match read_line_limited(&mut r, 50).await {
            Ok(Some(Line::Text(t))) => assert_eq!(t, "{\"cmd\":\"status\"}"),
            _ => panic!("expected the status line"),
        }
        assert!(matches!(
            read_line_limited(&mut r, 50).await,
            Ok(Some(Line::NotUtf8))
        ));
        match read_line_limited(&mut r, 50).await {
            Ok(Some(Line::Text(t))) => assert_eq!(t, "last"),
            _ => panic!("expected the unterminated last line"),
        }
        assert!(matches!(read_line_limited(&mut r, 50).await, Ok(None)));
    }

    #[test]
    fn requests_parse_strictly() {
        let r: ControlRequest =
            serde_json::from_str(r#"{"cmd":"scan","serial":"S1","slot":null,"wait":true}"#)
                .unwrap();
        assert_eq!(
            r,
            ControlRequest::Scan {
                serial: "S1".into(),
                slot: None,
                wait: true
            }
        );
        assert!(serde_json::from_str::<ControlRequest>(r#"{"cmd":"scan"}"#).is_err());
        let r: ControlRequest = serde_json::from_str(r#"{"cmd":"requeue","serial":"S1"}"#).unwrap();
        assert_eq!(
            r,
            ControlRequest::Requeue {
                serial: "S1".into(),
                force: false,
                wait: false
            }
        );
        assert!(serde_json::from_str::<ControlRequest>(r#"{"cmd":"requeue"}"#).is_err());
        assert!(serde_json::from_str::<ControlRequest>(r#"{"cmd":"reboot"}"#).is_err());
        assert!(serde_json::from_str::<ControlRequest>(
            r#"{"cmd":"scan","serial":"S","wiat":true}"#
        )
        .is_err());
    }
}
