//! `enrollment`, `group`, `bulk` and `registration` commands (DESIGN.md §3).
use clap::{Args, Subcommand};

use super::{CliError, Exit, GlobalOpts};

#[derive(Debug, Subcommand)]
pub enum EnrollmentCmd {
    /// Get one individual enrollment.
    Get { id: String },
}

#[derive(Debug, Subcommand)]
pub enum GroupCmd {
    /// Get one enrollment group.
    Get { id: String },
}

#[derive(Debug, Subcommand)]
pub enum BulkCmd {
    /// Bulk create from a file.
    Create(BulkFileArgs),
}

#[derive(Debug, Args)]
pub struct BulkFileArgs {
    #[arg(long)]
    pub file: std::path::PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum RegistrationCmd {
    /// Get one device registration state.
    Get { id: String },
}

fn not_yet() -> CliError {
    CliError::failed("this command is being built")
}

pub async fn enrollment(_g: &GlobalOpts, _c: EnrollmentCmd) -> Result<Exit, CliError> {
    Err(not_yet())
}
pub async fn group(_g: &GlobalOpts, _c: GroupCmd) -> Result<Exit, CliError> {
    Err(not_yet())
}
pub async fn bulk(_g: &GlobalOpts, _c: BulkCmd) -> Result<Exit, CliError> {
    Err(not_yet())
}
pub async fn registration(_g: &GlobalOpts, _c: RegistrationCmd) -> Result<Exit, CliError> {
    Err(not_yet())
}
