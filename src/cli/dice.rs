//! `dps-station ca init` and `dps-station dice issue`.
use clap::Subcommand;

use super::{CliError, Exit, GlobalOpts};

#[derive(Debug, Subcommand)]
pub enum CaCmd {
    /// Create a development root + intermediate CA.
    Init {
        #[arg(long)]
        out: std::path::PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum DiceCmd {
    /// Issue one board's DICE chain.
    Issue {
        #[arg(long)]
        serial: String,
    },
}

pub async fn run_ca(_g: &GlobalOpts, _c: CaCmd) -> Result<Exit, CliError> {
    Err(CliError::failed("this command is being built"))
}
pub async fn run_dice(_g: &GlobalOpts, _c: DiceCmd) -> Result<Exit, CliError> {
    Err(CliError::failed("this command is being built"))
}
