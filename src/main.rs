//! `dps-station` binary: parse the command line, set up logging, run, map the exit code.
//! anyhow lives here only; the library returns typed errors.
use std::process::ExitCode;

use clap::Parser;
use dps_station::cli::{self, Cli, Exit};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { Exit::Usage as u8 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    // Before any thread starts: silence the TSS C library's own stderr logging; TPM errors
    // reach the user through our typed errors instead.
    dps_station::attest::tpm::quiet_tss_logging();
    // The daemon logs at info by default (journald keeps it); one-shot commands at warn.
    let verbose = match cli.command {
        cli::Command::Run(_) => cli.global.verbose.max(1),
        _ => cli.global.verbose,
    };
    dps_station::station::logging::init(verbose, cli.global.quiet);
    match run(cli) {
        Ok(Ok(exit)) => ExitCode::from(exit as u8),
        Ok(Err(e)) => {
            eprintln!("error: {}", e.message);
            if let Some(h) = &e.hint {
                eprintln!("hint: {h}");
            }
            ExitCode::from(e.exit as u8)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(Exit::Failed as u8)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<Result<Exit, cli::CliError>> {
    // A bounded blocking pool: a burst of scans on a DICE slot must not grow hundreds of
    // threads (each with its own allocator arena) on a two-core station.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(32)
        .build()?;
    let outcome = rt.block_on(cli::run(cli));
    // Do not wait at exit for a blocking task stuck in a device call (a TPM that stopped
    // answering after its timeout fired): the answer has been given already.
    rt.shutdown_timeout(std::time::Duration::from_millis(500));
    Ok(outcome)
}
