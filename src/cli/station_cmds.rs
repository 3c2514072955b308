//! Station commands: `run`, `scan`, `status`, `export`, `demo`.
use clap::Args;

use super::{CliError, Exit, GlobalOpts};

#[derive(Debug, Args)]
pub struct RunArgs {}
#[derive(Debug, Args)]
pub struct ScanArgs {
    pub serial: String,
}
#[derive(Debug, Args)]
pub struct StatusArgs {}
#[derive(Debug, Args)]
pub struct ExportArgs {}
#[derive(Debug, Args)]
pub struct DemoArgs {}

fn not_yet() -> CliError {
    CliError::failed("this command is being built")
}
pub async fn run(_g: &GlobalOpts, _a: RunArgs) -> Result<Exit, CliError> {
    Err(not_yet())
}
pub async fn scan(_g: &GlobalOpts, _a: ScanArgs) -> Result<Exit, CliError> {
    Err(not_yet())
}
pub async fn status(_g: &GlobalOpts, _a: StatusArgs) -> Result<Exit, CliError> {
    Err(not_yet())
}
pub async fn export(_g: &GlobalOpts, _a: ExportArgs) -> Result<Exit, CliError> {
    Err(not_yet())
}
pub async fn demo(_g: &GlobalOpts, _a: DemoArgs) -> Result<Exit, CliError> {
    Err(not_yet())
}
