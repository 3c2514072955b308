//! A local DPS service emulator (DESIGN.md §8), faithful to the 2021-10-01 spec: all 15
//! operations, SAS validation, request-schema validation, etags, bulk semantics, paging,
//! throttling, injected faults, TLS and an optional state file. Used by tests, the demo
//! and the `dps-emulator` binary.
//! It must never be used as a production service: records live in memory (or a local
//! file) and its admin endpoints under `/_emulator/` have no authentication.
pub mod faults;
pub mod sas;
pub mod schema;
mod service;
pub mod store;
pub mod x509;

use base64::Engine as _;
use rand::Rng;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};

use service::{lock, Shared};

/// Options of one emulator instance (the `dps-emulator` flags, DESIGN.md §8).
#[derive(Debug, Clone)]
pub struct EmulatorOptions {
    /// Address to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Host name put in the connection string and required as SAS `sr`
    /// (default: the bound address, `127.0.0.1:PORT`).
    pub host_name: Option<String>,
    /// Shared access policy name (`skn`).
    pub policy_name: String,
    /// Base64 shared access key; `None` = random.
    pub key: Option<String>,
    /// PEM certificate chain and private key; both set = HTTPS.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Token bucket: at most N operations per minute sustained, bursts of N/10
    /// (429 + `Retry-After` beyond), see [`faults::Throttle`].
    pub ops_per_minute: Option<u32>,
    /// Fault spec, see [`faults::FaultSpec::parse`].
    pub faults: Option<String>,
    /// SQLite file that keeps records across restarts.
    pub state: Option<PathBuf>,
}

impl Default for EmulatorOptions {
    fn default() -> Self {
        EmulatorOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            host_name: None,
            policy_name: "provisioningserviceowner".to_string(),
            key: None,
            tls_cert: None,
            tls_key: None,
            ops_per_minute: None,
            faults: None,
            state: None,
        }
    }
}

/// Why the emulator could not start or a setting was refused.
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    #[error("emulator: --key is not valid base64")]
    BadKey,
    #[error("emulator: cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("emulator: --tls-cert and --tls-key must be given together")]
    TlsHalf,
    #[error("emulator: TLS file {path}: {reason}")]
    Tls { path: String, reason: String },
    #[error("emulator: {0}")]
    Faults(#[from] faults::FaultSpecError),
    #[error("emulator: {0}")]
    State(#[from] store::StoreError),
    #[error("emulator: the vendored DPS spec could not be parsed")]
    Spec,
}

/// Counters served by `GET /_emulator/stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    /// DPS requests received (admin endpoints not counted).
    pub requests: u64,
    /// Requests per spec operationId.
    pub by_operation: BTreeMap<String, u64>,
    /// Requests answered 429.
    pub throttled: u64,
    /// Successful creations per lower-case id (single PUT or bulk), to prove exactly-once.
    pub creates: BTreeMap<String, u64>,
}

/// A running emulator. Dropping it stops the server at once; `shutdown` stops it gracefully.
pub struct RunningEmulator {
    addr: SocketAddr,
    host_name: String,
    policy_name: String,
    key_b64: String,
    tls: bool,
    shared: Arc<Shared>,
    handle: axum_server::Handle,
    task: Option<tokio::task::JoinHandle<()>>,
}

fn load_tls(cert: &PathBuf, key: &PathBuf) -> Result<rustls::ServerConfig, EmulatorError> {
    let tls_err = |p: &PathBuf, reason: String| EmulatorError::Tls {
        path: p.display().to_string(),
        reason,
    };
    let cert_pem = std::fs::read(cert).map_err(|e| tls_err(cert, e.to_string()))?;
    let certs: Vec<rustls::pki_types::CertificateDer<'static>> =
        rustls_pemfile::certs(&mut cert_pem.as_slice())
            .collect::<Result<_, _>>()
            .map_err(|e| tls_err(cert, format!("not a PEM certificate file ({e})")))?;
    if certs.is_empty() {
        return Err(tls_err(cert, "no CERTIFICATE block found".into()));
    }
    let key_pem = std::fs::read(key).map_err(|e| tls_err(key, e.to_string()))?;
    let private = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| tls_err(key, format!("not a PEM key file ({e})")))?
        .ok_or_else(|| tls_err(key, "no private key block found".into()))?;
    // Explicitly the ring provider: the project uses no other (preamble).
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(cert, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, private)
        .map_err(|e| {
            tls_err(
                key,
                format!("certificate and key do not form a usable pair ({e})"),
            )
        })
}

/// Start an emulator and return once it is listening.
pub async fn start(opts: EmulatorOptions) -> Result<RunningEmulator, EmulatorError> {
    if schema::definitions().is_none() {
        return Err(EmulatorError::Spec);
    }
    let key = match &opts.key {
        Some(k) => base64::engine::general_purpose::STANDARD
            .decode(k.trim())
            .ok()
            .filter(|b| !b.is_empty())
            .ok_or(EmulatorError::BadKey)?,
        None => {
            let mut b = [0u8; 32];
            rand::thread_rng().fill(&mut b[..]);
            b.to_vec()
        }
    };
    let key_b64 = base64::engine::general_purpose::STANDARD.encode(&key);
    let fault_spec = faults::FaultSpec::parse(opts.faults.as_deref().unwrap_or(""))?;
    let tls = match (&opts.tls_cert, &opts.tls_key) {
        (Some(c), Some(k)) => Some(load_tls(c, k)?),
        (None, None) => None,
        _ => return Err(EmulatorError::TlsHalf),
    };
    let store = match &opts.state {
        Some(p) => store::Store::open(p)?,
        None => store::Store::memory(),
    };

    let listener = std::net::TcpListener::bind(opts.listen)
        .and_then(|l| l.set_nonblocking(true).map(|_| l))
        .map_err(|source| EmulatorError::Listen {
            addr: opts.listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| EmulatorError::Listen {
            addr: opts.listen,
            source,
        })?;
    // Default host name: the bound address, with a wildcard listen shown as loopback.
    let host_name = opts.host_name.clone().unwrap_or_else(|| {
        let mut shown = addr;
        if shown.ip().is_unspecified() {
            shown.set_ip(if shown.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            });
        }
        shown.to_string()
    });

    let shared = Arc::new(Shared {
        host_name: host_name.clone(),
        policy: opts.policy_name.clone(),
        key,
        store: Mutex::new(store),
        faults: Mutex::new(faults::Faults::new(fault_spec)),
        throttle: Mutex::new(faults::Throttle::new(opts.ops_per_minute)),
        stats: Mutex::new(Stats::default()),
        etag_seq: AtomicU32::new(rand::thread_rng().gen()),
    });
    let app = axum::Router::new()
        .fallback(service::handle)
        .with_state(shared.clone())
        .into_make_service();
    let handle = axum_server::Handle::new();
    let is_tls = tls.is_some();
    let task = match tls {
        Some(cfg) => {
            let cfg = axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(cfg));
            let server = axum_server::from_tcp_rustls(listener, cfg).handle(handle.clone());
            tokio::spawn(async move {
                if let Err(e) = server.serve(app).await {
                    tracing::error!(error = %e, "emulator server stopped");
                }
            })
        }
        None => {
            let server = axum_server::from_tcp(listener).handle(handle.clone());
            tokio::spawn(async move {
                if let Err(e) = server.serve(app).await {
                    tracing::error!(error = %e, "emulator server stopped");
                }
            })
        }
    };
    // The socket is already bound and listening; wait until the accept loop runs.
    let _ = handle.listening().await;
    tracing::info!(%addr, host_name, tls = is_tls, "DPS emulator listening");
    Ok(RunningEmulator {
        addr,
        host_name,
        policy_name: opts.policy_name,
        key_b64,
        tls: is_tls,
        shared,
        handle,
        task: Some(task),
    })
}

impl RunningEmulator {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` or `https://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The host name SAS tokens must name (`sr`), default the bound address.
    pub fn host_name(&self) -> &str {
        &self.host_name
    }

    /// `HostName=…;SharedAccessKeyName=…;SharedAccessKey=…`.
    pub fn connection_string(&self) -> String {
        format!(
            "HostName={};SharedAccessKeyName={};SharedAccessKey={}",
            self.host_name, self.policy_name, self.key_b64
        )
    }

    /// Same data as `GET /_emulator/stats`.
    pub fn stats(&self) -> Stats {
        lock(&self.shared.stats).clone()
    }

    /// Replace the fault spec (empty clears); the down window counts from now.
    pub fn set_faults(&self, spec: &str) -> Result<(), EmulatorError> {
        let parsed = faults::FaultSpec::parse(spec)?;
        *lock(&self.shared.faults) = faults::Faults::new(parsed);
        Ok(())
    }

    /// Change the operations-per-minute limit (`None` = unlimited).
    pub fn set_ops_per_minute(&self, n: Option<u32>) {
        lock(&self.shared.throttle).set_limit(n);
    }

    /// Stop accepting, let requests in flight finish (≤ 2 s), and wait for the server.
    pub async fn shutdown(mut self) {
        self.handle
            .graceful_shutdown(Some(std::time::Duration::from_secs(2)));
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for RunningEmulator {
    fn drop(&mut self) {
        if self.task.is_some() {
            self.handle.shutdown();
        }
    }
}
