//! `dps-station ca init` and `dps-station dice issue` (DESIGN §3, §6): create a development
//! CA, issue one board's DICE bundle, or certify a board-made CSR as its DeviceID.
//!
//! Flags override the config. This file only parses arguments, calls `attest::{ca, dice}`
//! and prints results; it never prints a UDS or private key (only paths and thumbprints).
use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::{CliError, Exit, GlobalOpts};
use crate::attest::ca::{self, CaError, StationCa};
use crate::attest::dice::{self, DiceError, DiceOptions, Fwid};
use crate::dps::ids::RegistrationId;

#[derive(Debug, Subcommand)]
pub enum CaCmd {
    /// Create a development root + intermediate CA (P-256; keys PKCS#8 PEM, mode 0600).
    Init {
        /// Directory to write root.pem, root.key, intermediate.pem, intermediate.key,
        /// chain.pem (created 0700; existing files are never overwritten).
        #[arg(long)]
        out: PathBuf,
        /// Name used in the CAs' common names.
        #[arg(long, default_value = "dps-station development")]
        cn: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum DiceCmd {
    /// Issue one board's DICE chain (or, with --csr, certify a board-made DeviceID key).
    Issue(IssueArgs),
}

#[derive(Debug, Args)]
pub struct IssueArgs {
    /// Board serial number (also the bundle directory name).
    #[arg(long)]
    pub serial: String,
    /// Firmware measurement, sha256:<64 hex digits> (default: all zeros).
    #[arg(long)]
    pub fwid: Option<String>,
    /// Station CA certificate (PEM).
    #[arg(long)]
    pub ca_cert: Option<PathBuf>,
    /// Station CA private key (PEM, mode 0600).
    #[arg(long)]
    pub ca_key: Option<PathBuf>,
    /// Registration id = Alias CN (default: board-{serial}, lower case).
    #[arg(long)]
    pub registration_id: Option<String>,
    /// Certificate validity in days, clamped to the CA's own validity (default: the
    /// config's `[dice] validity_days`, else 3650).
    #[arg(long)]
    pub validity_days: Option<u32>,
    /// Mark the TcbInfo extension critical.
    #[arg(long)]
    pub tcb_info_critical: bool,
    /// Sign this board-made PKCS#10 CSR (PEM or DER) as the DeviceID instead of deriving keys.
    #[arg(long, conflicts_with_all = ["fwid", "registration_id", "tcb_info_critical"])]
    pub csr: Option<PathBuf>,
    /// Output directory; the bundle goes to OUT/<serial>/ (default: `[dice] out_dir`).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// What `dice issue` takes from the station config when a flag is not given.
struct FromConfig {
    dice: Option<crate::config::DiceConfig>,
    registration_id: Option<RegistrationId>,
}

/// Read the config if its file exists. A config problem is an error only when a value
/// the flags do not supply is needed from it (`need`).
fn from_config(g: &GlobalOpts, serial: &str, need: bool) -> Result<FromConfig, CliError> {
    let none = FromConfig {
        dice: None,
        registration_id: None,
    };
    if !g.config.exists() {
        return Ok(none);
    }
    let cfg = match crate::config::load(&g.config) {
        Ok(c) => c,
        Err(e) if need => {
            return Err(CliError::usage(format!(
                "config {}: {e}",
                g.config.display()
            )))
        }
        Err(_) => return Ok(none),
    };
    let slot = cfg
        .slots
        .iter()
        .find(|s| s.attestation == crate::config::Attestation::Dice);
    let registration_id = match slot {
        Some(slot) => Some(
            cfg.render_enrollment(slot, serial, None)
                .map_err(|e| CliError::usage(format!("config {}: {e}", g.config.display())))?
                .0,
        ),
        None => None,
    };
    Ok(FromConfig {
        dice: cfg.dice.clone(),
        registration_id,
    })
}

fn ca_cli_error(e: CaError) -> CliError {
    let hint = match &e {
        CaError::KeyPermissions { path, .. } => Some(format!("chmod 600 {}", path.display())),
        CaError::Exists(_) => Some("choose another --out directory or remove the old files".into()),
        _ => None,
    };
    let err = match &e {
        CaError::Generate(_) => CliError::failed(e.to_string()),
        CaError::Io { path, source } if source.kind() != std::io::ErrorKind::NotFound => {
            CliError::failed(format!("{}: {source}", path.display()))
        }
        _ => CliError::usage(e.to_string()),
    };
    match hint {
        Some(h) => err.with_hint(h),
        None => err,
    }
}

fn dice_cli_error(e: DiceError) -> CliError {
    match e {
        DiceError::Ca(c) => ca_cli_error(c),
        DiceError::Io { .. }
        | DiceError::Rng(_)
        | DiceError::Derivation(_)
        | DiceError::Issue { .. } => CliError::failed(e.to_string()),
        DiceError::BundleExists(_) => CliError::usage(e.to_string())
            .with_hint("a board's bundle is written once; remove the old directory to re-issue"),
        _ => CliError::usage(e.to_string()),
    }
}

pub async fn run_ca(g: &GlobalOpts, c: CaCmd) -> Result<Exit, CliError> {
    match c {
        CaCmd::Init { out, cn } => {
            let paths = ca::init_dev_ca(&out, &cn).map_err(ca_cli_error)?;
            if g.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "rootCert": paths.root_cert,
                        "rootKey": paths.root_key,
                        "intermediateCert": paths.intermediate_cert,
                        "intermediateKey": paths.intermediate_key,
                        "chain": paths.chain,
                    })
                );
            } else if !g.quiet {
                println!("created a development CA in {}", out.display());
                println!("  root:         {}", paths.root_cert.display());
                println!(
                    "  intermediate: {} (key {})",
                    paths.intermediate_cert.display(),
                    paths.intermediate_key.display()
                );
                println!(
                    "  issue boards with --ca-cert {} --ca-key {}; keep root.key offline",
                    paths.intermediate_cert.display(),
                    paths.intermediate_key.display()
                );
            }
            Ok(Exit::Ok)
        }
    }
}

pub async fn run_dice(g: &GlobalOpts, c: DiceCmd) -> Result<Exit, CliError> {
    match c {
        DiceCmd::Issue(a) => issue(g, a),
    }
}

fn issue(g: &GlobalOpts, a: IssueArgs) -> Result<Exit, CliError> {
    dice::validate_serial(&a.serial).map_err(dice_cli_error)?;
    let need = a.ca_cert.is_none() || a.ca_key.is_none() || a.out.is_none();
    let cfg = from_config(g, &a.serial, need)?;
    let dc = cfg.dice.as_ref();
    let ca_cert = a.ca_cert.clone().or_else(|| dc.map(|d| d.ca_cert.clone()));
    let ca_key = a.ca_key.clone().or_else(|| dc.map(|d| d.ca_key.clone()));
    let (Some(ca_cert), Some(ca_key)) = (ca_cert, ca_key) else {
        return Err(CliError::usage(
            "the station CA is not set: give --ca-cert and --ca-key (or [dice] ca_cert/ca_key in the config)",
        )
        .with_hint("create a development CA with `dps-station ca init --out DIR`"));
    };
    let (ca_cert, ca_key) = (ca_cert.as_path(), ca_key.as_path());
    let Some(out) = a.out.clone().or_else(|| dc.map(|d| d.out_dir.clone())) else {
        return Err(CliError::usage(
            "no output directory: give --out DIR (or [dice] out_dir in the config)",
        ));
    };
    let opts = DiceOptions {
        validity_days: a
            .validity_days
            .or_else(|| dc.map(|d| d.validity_days))
            .unwrap_or(3650),
        tcb_info_critical: a.tcb_info_critical || dc.is_some_and(|d| d.tcb_info_critical),
    };
    if opts.validity_days == 0 {
        return Err(CliError::usage("--validity-days must be at least 1"));
    }
    if let Some(csr) = &a.csr {
        let bytes = std::fs::read(csr)
            .map_err(|e| CliError::usage(format!("--csr {}: {e}", csr.display())))?;
        let name = csr.display().to_string();
        let der = dice::csr_der_from_bytes(&bytes, &name).map_err(dice_cli_error)?;
        let ca = StationCa::load(ca_cert, ca_key).map_err(ca_cli_error)?;
        let issued =
            dice::sign_device_id_csr(&ca, &a.serial, &der, &name, &opts).map_err(dice_cli_error)?;
        let path = issued.write_to(&out).map_err(dice_cli_error)?;
        if g.json {
            println!(
                "{}",
                serde_json::json!({
                    "serial": issued.serial,
                    "path": path,
                    "deviceIdSubject": issued.subject,
                    "deviceIdSha256": issued.sha256_hex,
                })
            );
        } else if !g.quiet {
            println!(
                "certified the DeviceID key of board {} ({})",
                issued.serial, issued.subject
            );
            println!("  bundle: {}", path.display());
            println!("  deviceid sha256: {}", issued.sha256_hex);
        }
        return Ok(Exit::Ok);
    }

    let fwid: Fwid = match (&a.fwid, dc) {
        (Some(f), _) => f
            .parse()
            .map_err(|e: dice::FwidError| CliError::usage(format!("--fwid: {e}")))?,
        (None, Some(d)) => d.fwid.parse().map_err(|e: dice::FwidError| {
            CliError::usage(format!("config {} [dice] fwid: {e}", g.config.display()))
        })?,
        (None, None) => Fwid([0u8; 32]),
    };
    let reg_text = match (&a.registration_id, &cfg.registration_id) {
        (Some(r), _) => r.clone(),
        (None, Some(r)) => r.as_str().to_ascii_lowercase(),
        (None, None) => format!("board-{}", a.serial).to_ascii_lowercase(),
    };
    let registration_id = RegistrationId::parse_x509(&reg_text)
        .map_err(|e| CliError::usage(format!("--registration-id: {e}")))?;
    dice::check_alias_registration_id(&registration_id)
        .map_err(|e| CliError::usage(format!("--registration-id: {e}")))?;
    let ca = StationCa::load(ca_cert, ca_key).map_err(ca_cli_error)?;
    let bundle = dice::issue_board(&ca, &a.serial, &registration_id, &fwid, &opts)
        .map_err(dice_cli_error)?;
    let path = bundle.write_to(&out).map_err(dice_cli_error)?;
    if g.json {
        let mut m = bundle.manifest();
        if let Some(o) = m.as_object_mut() {
            o.insert("path".into(), serde_json::json!(path));
        }
        println!("{m}");
    } else if !g.quiet {
        println!(
            "issued board {} as registration id {}",
            bundle.serial, bundle.registration_id
        );
        println!("  bundle: {}", path.display());
        println!("  alias sha256: {}", bundle.alias_cert_sha256_hex);
        println!("  fwid: {}", bundle.fwid);
        println!(
            "  after injecting, delete {0}/uds.bin and {0}/alias.key",
            path.display()
        );
    }
    Ok(Exit::Ok)
}
