//! `dps-station check`: walk the whole config, reach every TPM, port, CA and DPS; print a checklist.
use clap::Args;

use super::{CliError, Exit, GlobalOpts};

#[derive(Debug, Args)]
pub struct CheckArgs {}

pub async fn run(_g: &GlobalOpts, _a: CheckArgs) -> Result<Exit, CliError> {
    Err(CliError::failed("this command is being built"))
}
