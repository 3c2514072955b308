//! The `dps-station` command line (DESIGN.md §3): argument definitions and dispatch.
//!
//! Each area owns a file: `dps_cmds` (enrollment, group, bulk, registration), `ek`,
//! `dice` (ca init, dice issue), `station_cmds` (run, scan, status, export, check, demo).
//! Commands return an [`Exit`] code or a [`CliError`]; `main.rs` prints the error as one
//! `error: …` line (plus an optional `hint: …`) and exits with its code. Nothing here may
//! print a key, a SAS token or private-key material.
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub mod check;
pub mod dice;
pub mod dps_cmds;
pub mod ek;
pub mod station_cmds;

/// Documented exit codes (DESIGN.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0: success.
    Ok = 0,
    /// 1: the operation failed (DPS or a device said no).
    Failed = 1,
    /// 2: usage or configuration error; nothing was sent.
    Usage = 2,
    /// 3: partial success (some bulk items failed).
    Partial = 3,
}

/// An error for the user: one line, an optional hint, and the exit code it maps to.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CliError {
    pub exit: Exit,
    pub message: String,
    pub hint: Option<String>,
}

impl CliError {
    /// A usage/config/input error (exit 2): nothing was sent.
    pub fn usage(message: impl Into<String>) -> Self {
        CliError {
            exit: Exit::Usage,
            message: message.into(),
            hint: None,
        }
    }
    /// The operation failed (exit 1).
    pub fn failed(message: impl Into<String>) -> Self {
        CliError {
            exit: Exit::Failed,
            message: message.into(),
            hint: None,
        }
    }
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

/// Options every command accepts, before or after the subcommand.
#[derive(Debug, Clone, Args)]
pub struct GlobalOpts {
    /// Station config file.
    #[arg(
        long,
        global = true,
        env = "DPS_STATION_CONFIG",
        default_value = "/etc/dps-station/station.toml"
    )]
    pub config: PathBuf,
    /// Machine-readable output (the wire JSON for DPS commands).
    #[arg(long, global = true)]
    pub json: bool,
    /// More log output (repeatable).
    #[arg(short = 'v', long = "verbose", global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Less log output.
    #[arg(short = 'q', long = "quiet", global = true)]
    pub quiet: bool,
    /// File holding the DPS connection string (trimmed of surrounding whitespace).
    #[arg(long, global = true)]
    pub connection_string_file: Option<PathBuf>,
    /// Send requests here instead of https://{HostName}; SAS still signs HostName.
    /// Plain http:// only for loopback addresses.
    #[arg(long, global = true)]
    pub endpoint: Option<String>,
    /// Extra trust anchors (PEM) for the DPS endpoint.
    #[arg(long, global = true)]
    pub ca_file: Option<PathBuf>,
    /// Total time budget for retries of one operation (e.g. "5m", "30s").
    #[arg(long, global = true, default_value = "5m")]
    pub retry_budget: String,
    /// DNS override HOST:ADDR for DPS requests (repeatable; env: comma-separated).
    #[arg(
        long,
        global = true,
        hide_short_help = true,
        value_name = "HOST:ADDR",
        env = "DPS_STATION_RESOLVE",
        value_delimiter = ','
    )]
    pub resolve: Vec<String>,
}

#[derive(Debug, Parser)]
#[command(
    name = "dps-station",
    version,
    about = "Factory-line provisioning for Azure IoT Hub DPS"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalOpts,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the station daemon in the foreground (systemd Type=notify).
    Run(station_cmds::RunArgs),
    /// Submit a scan through the running daemon's control socket.
    Scan(station_cmds::ScanArgs),
    /// Send a rejected board (or, with --force, a conflict) to DPS again.
    Requeue(station_cmds::RequeueArgs),
    /// Queue depth, counts by state, DPS health, last errors.
    Status(station_cmds::StatusArgs),
    /// Board records for MES / traceability.
    Export(station_cmds::ExportArgs),
    /// Pause, resume or drain the running daemon's intake.
    Control(station_cmds::ControlArgs),
    /// Validate the config and reach every device and service it names.
    Check(check::CheckArgs),
    /// The embedded demo: emulator + swtpm boards + simulated scanner.
    Demo(station_cmds::DemoArgs),
    /// Print the registration id and base64 EK (TPM2B_PUBLIC) of one TPM.
    Ek(ek::EkArgs),
    /// Station certificate authority.
    #[command(subcommand)]
    Ca(dice::CaCmd),
    /// DICE identities for boards.
    #[command(subcommand)]
    Dice(dice::DiceCmd),
    /// Individual enrollments.
    #[command(subcommand)]
    Enrollment(dps_cmds::EnrollmentCmd),
    /// Enrollment groups.
    #[command(subcommand)]
    Group(dps_cmds::GroupCmd),
    /// Bulk operations on individual enrollments (chunks of at most 10).
    #[command(subcommand)]
    Bulk(dps_cmds::BulkCmd),
    /// Device registration states.
    #[command(subcommand)]
    Registration(dps_cmds::RegistrationCmd),
}

/// Run one parsed command line.
pub async fn run(cli: Cli) -> Result<Exit, CliError> {
    let g = &cli.global;
    match cli.command {
        Command::Run(a) => station_cmds::run(g, a).await,
        Command::Scan(a) => station_cmds::scan(g, a).await,
        Command::Requeue(a) => station_cmds::requeue(g, a).await,
        Command::Status(a) => station_cmds::status(g, a).await,
        Command::Export(a) => station_cmds::export(g, a).await,
        Command::Control(a) => station_cmds::control(g, a).await,
        Command::Check(a) => check::run(g, a).await,
        Command::Demo(a) => station_cmds::demo(g, a).await,
        Command::Ek(a) => ek::run(g, a).await,
        Command::Ca(c) => dice::run_ca(g, c).await,
        Command::Dice(c) => dice::run_dice(g, c).await,
        Command::Enrollment(c) => dps_cmds::enrollment(g, c).await,
        Command::Group(c) => dps_cmds::group(g, c).await,
        Command::Bulk(c) => dps_cmds::bulk(g, c).await,
        Command::Registration(c) => dps_cmds::registration(g, c).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
