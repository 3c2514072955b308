//! `dps-emulator`: a local stand-in for the DPS service API (DESIGN.md §8).
//! Prints its connection string as the first stdout line, logs to stderr, and exits 0 on
//! SIGTERM or Ctrl-C. It must never print the key anywhere but that first line.
use std::io::{IsTerminal as _, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use dps_station::emulator::{self, EmulatorOptions};

/// Local Azure IoT Hub DPS service emulator (api-version 2021-10-01).
#[derive(Debug, Parser)]
#[command(name = "dps-emulator", version)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Host name for the connection string and the SAS `sr` check (default: the bound address).
    #[arg(long)]
    host_name: Option<String>,
    /// Shared access policy name.
    #[arg(long, default_value = "provisioningserviceowner")]
    policy_name: String,
    /// Base64 shared access key (default: random).
    #[arg(long, env = "DPS_EMULATOR_KEY", hide_env_values = true)]
    key: Option<String>,
    /// PEM certificate (chain) for HTTPS; needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for HTTPS; needs --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// At most N operations per minute sustained, bursts of N/10 (a token bucket);
    /// beyond that 429 + Retry-After (whole seconds until the next token).
    #[arg(long, value_name = "N")]
    ops_per_minute: Option<u32>,
    /// Faults: error-rate=0.2,status=500,latency=200ms,reset-rate=0.1,down-for=120s,down-after=10s,
    /// bad-id=ID (a bulk request naming ID is refused as a whole with HTTP 400; repeatable)
    #[arg(long, value_name = "SPEC")]
    faults: Option<String>,
    /// SQLite file that keeps records across restarts.
    #[arg(long, value_name = "PATH")]
    state: Option<PathBuf>,
    /// More logging (-v debug, -vv trace).
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // One line per request by default (the service logs requests at debug).
    let level = match args.verbose {
        0 => "info,dps_station::emulator::service=debug",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();

    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    let opts = EmulatorOptions {
        listen: args.listen,
        host_name: args.host_name,
        policy_name: args.policy_name,
        key: args.key,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        ops_per_minute: args.ops_per_minute,
        faults: args.faults,
        state: args.state,
    };
    let emu = match emulator::start(opts).await {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: {e}");
            // Bad flags are usage errors (2); a busy port or unreadable state file is 1.
            let code = match e {
                emulator::EmulatorError::Listen { .. } | emulator::EmulatorError::State(_) => 1,
                _ => 2,
            };
            return ExitCode::from(code);
        }
    };
    {
        let mut out = std::io::stdout().lock();
        if writeln!(out, "{}", emu.connection_string())
            .and_then(|_| out.flush())
            .is_err()
        {
            eprintln!("error: cannot write the connection string to stdout");
            return ExitCode::from(1);
        }
    }
    eprintln!(
        "dps-emulator: listening on {} (sr host name {})",
        emu.base_url(),
        emu.host_name()
    );

    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot watch SIGTERM: {e}");
            return ExitCode::from(1);
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down");
    emu.shutdown().await;
    ExitCode::SUCCESS
}
