//! `dps-station ek`: print one TPM's registration id, base64 EK and EK-certificate facts.
use clap::Args;

use super::{CliError, Exit, GlobalOpts};

#[derive(Debug, Args)]
pub struct EkArgs {
    /// TCTI of the TPM, e.g. "device:/dev/tpmrm0" or "swtpm:host=127.0.0.1,port=2321".
    #[arg(long)]
    pub tcti: String,
}

pub async fn run(_g: &GlobalOpts, _a: EkArgs) -> Result<Exit, CliError> {
    Err(CliError::failed("this command is being built"))
}
