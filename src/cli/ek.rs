//! `dps-station ek`: print one TPM's registration id, base64 EK (TPM2B_PUBLIC), EK-certificate
//! facts and manufacturer — the open replacement for the Azure SDK's `tpm_device_provision`.
//!
//! It must never print the endorsement auth, and never create or persist an EK unless asked
//! (`--create-if-missing`, `--persist`).
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::{CliError, Exit, GlobalOpts};
use crate::attest::tpm::{self, EkPolicy, EkRequest, TpmError, TpmWorker};

#[derive(Debug, Args)]
pub struct EkArgs {
    /// TCTI of the TPM, e.g. "device:/dev/tpmrm0" or "swtpm:host=127.0.0.1,port=2321".
    #[arg(long)]
    pub tcti: String,
    /// When 0x81010001 is empty, create the TCG default RSA-2048 EK (not persisted).
    #[arg(long)]
    pub create_if_missing: bool,
    /// When 0x81010001 is empty, create the TCG default EK and persist it there
    /// (implies --create-if-missing).
    #[arg(long)]
    pub persist: bool,
    /// Endorsement hierarchy auth file ("hex:…" or "str:…").
    #[arg(long)]
    pub endorsement_auth_file: Option<PathBuf>,
    /// Refuse a software TPM (swtpm, simulators).
    #[arg(long)]
    pub require_hardware_tpm: bool,
    /// Give up on the TPM after this long (e.g. "30s", "2m").
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

fn to_cli(e: TpmError) -> CliError {
    match &e {
        TpmError::BadTcti { .. } | TpmError::BadAuthFile { .. } => CliError::usage(e.to_string()),
        TpmError::NoEk => CliError::failed(e.to_string())
            .with_hint("pass --create-if-missing (and --persist to store it at 0x81010001)"),
        TpmError::Unreachable { .. } => CliError::failed(e.to_string())
            .with_hint("is the TPM present and the TCTI right? swtpm serves one client at a time"),
        TpmError::SoftwareTpmRefused { .. } => CliError::failed(e.to_string()),
        _ => CliError::failed(e.to_string()),
    }
}

pub async fn run(g: &GlobalOpts, a: EkArgs) -> Result<Exit, CliError> {
    if g.verbose == 0 {
        // Our errors name the step and code; the TSS's own stderr lines would duplicate them.
        tpm::quiet_tss_logging();
    }
    tpm::parse_tcti(&a.tcti).map_err(to_cli)?;
    let policy = if a.persist {
        EkPolicy::ReadOrCreatePersist
    } else if a.create_if_missing {
        EkPolicy::ReadOrCreate
    } else {
        EkPolicy::ReadOnly
    };
    let mut req = EkRequest::new(a.tcti.clone(), policy);
    req.timeout = a.timeout;
    req.require_hardware_tpm = a.require_hardware_tpm;
    if let Some(p) = &a.endorsement_auth_file {
        req.endorsement_auth = Some(tpm::load_auth_file(p).map_err(to_cli)?);
    }
    let worker = TpmWorker::spawn("ek");
    let info = worker.read_ek(req).await.map_err(to_cli)?;

    if g.json {
        let cert = info.ek_cert.as_ref().map(|c| {
            serde_json::json!({"subject": c.subject, "issuer": c.issuer, "sha256": c.sha256_hex})
        });
        let out = serde_json::json!({
            "registrationId": info.registration_id,
            "endorsementKey": info.ek_b64,
            "ekHash": info.ek_hash,
            "ekCertificate": cert,
            "manufacturer": info.manufacturer,
            "softwareTpm": info.software_tpm,
            "created": info.created,
            "persisted": info.persisted,
            "tcti": a.tcti,
            "warnings": info.warnings,
        });
        println!("{out}");
        return Ok(Exit::Ok);
    }

    println!("Registration Id:  {}", info.registration_id.as_str());
    println!("Endorsement Key:  {}", info.ek_b64);
    let source = match (info.created, info.persisted) {
        (false, _) => "read from persistent handle 0x81010001",
        (true, true) => "created (TCG default template) and persisted at 0x81010001",
        (true, false) => "created (TCG default template), NOT persisted",
    };
    println!("EK:               {source}");
    match &info.ek_cert {
        Some(c) => {
            println!("EK cert subject:  {}", c.subject);
            println!("EK cert issuer:   {}", c.issuer);
            println!("EK cert SHA-256:  {}", c.sha256_hex);
        }
        None => println!("EK cert:          none"),
    }
    let sw = if info.software_tpm {
        " (software TPM)"
    } else {
        ""
    };
    println!("Manufacturer:     {}{sw}", info.manufacturer);
    if !g.quiet {
        for w in &info.warnings {
            eprintln!("warning: {w}");
        }
    }
    Ok(Exit::Ok)
}
