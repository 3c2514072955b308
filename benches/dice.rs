//! DICE issuance benchmark (DESIGN §9: ≥ 3,000 complete board chains/s on one core).
//!
//! Measures, on one thread: complete board chains (`dice::issue_board`: OS-RNG UDS, CDI +
//! DeviceID + Alias derivation, two ECDSA signatures, PEM encoding) for about 2 s, the
//! derivation alone, and writing bundles to disk; then the baseline, `openssl` issuing the
//! same two-certificate chain with processes (ecparam + req + x509, twice per board), for a
//! handful of boards. Prints a markdown table. Run: `cargo bench --bench dice`.
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use dps_station::attest::ca::{self, StationCa};
use dps_station::attest::dice::{self, DiceOptions, Fwid};
use dps_station::attest::tcbinfo::{TcbFwid, TcbInfo};
use dps_station::dps::ids::RegistrationId;

const TARGET_PER_S: f64 = 3000.0;

fn rate<F: FnMut(u64)>(budget: Duration, mut f: F) -> (u64, Duration) {
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < budget {
        f(n);
        n += 1;
    }
    (n, start.elapsed())
}

fn openssl(args: &[&str], dir: &Path) -> bool {
    Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Issue DeviceID + Alias for one board with openssl processes; true on success.
fn openssl_chain(dir: &Path, i: u32, tcb_hex: &str) -> bool {
    let ext = format!(
        "[devid]\nbasicConstraints=critical,CA:true,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n\
         subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n\
         [alias]\nbasicConstraints=critical,CA:false\nkeyUsage=critical,digitalSignature\n\
         extendedKeyUsage=clientAuth\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n\
         2.23.133.5.4.1=DER:{tcb_hex}\n"
    );
    if std::fs::write(dir.join("ext.cnf"), ext).is_err() {
        return false;
    }
    let serial = format!(
        "0x{:032x}",
        0x4000_0000_0000_0000_0000_0000_0000_0000u128 + u128::from(i)
    );
    let alias_cn = format!("/CN=board-{i:06}");
    let steps: Vec<Vec<&str>> = vec![
        vec![
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "devid.key",
        ],
        vec![
            "req",
            "-new",
            "-key",
            "devid.key",
            "-subj",
            "/CN=DeviceID",
            "-out",
            "devid.csr",
        ],
        vec![
            "x509",
            "-req",
            "-in",
            "devid.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-set_serial",
            &serial,
            "-days",
            "3650",
            "-extfile",
            "ext.cnf",
            "-extensions",
            "devid",
            "-out",
            "devid.pem",
        ],
        vec![
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "alias.key",
        ],
        vec![
            "req",
            "-new",
            "-key",
            "alias.key",
            "-subj",
            &alias_cn,
            "-out",
            "alias.csr",
        ],
        vec![
            "x509",
            "-req",
            "-in",
            "alias.csr",
            "-CA",
            "devid.pem",
            "-CAkey",
            "devid.key",
            "-set_serial",
            &serial,
            "-days",
            "3650",
            "-extfile",
            "ext.cnf",
            "-extensions",
            "alias",
            "-out",
            "alias.pem",
        ],
    ];
    steps.iter().all(|s| openssl(s, dir))
}

fn main() {
    let tmp = match tempfile::tempdir() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("tempdir: {e}");
            std::process::exit(1);
        }
    };
    let paths = match ca::init_dev_ca(&tmp.path().join("ca"), "bench") {
        Ok(p) => p,
        Err(e) => {
            eprintln!("ca init: {e}");
            std::process::exit(1);
        }
    };
    let ca = match StationCa::load(&paths.intermediate_cert, &paths.intermediate_key) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ca load: {e}");
            std::process::exit(1);
        }
    };
    let fwid = Fwid([0x5a; 32]);
    let opts = DiceOptions::default();
    let ids: Vec<RegistrationId> = (0..1000)
        .map(|i| RegistrationId::parse_x509(&format!("board-{i:06}")))
        .collect::<Result<_, _>>()
        .unwrap_or_default();
    if ids.is_empty() {
        eprintln!("bad ids");
        std::process::exit(1);
    }

    // Warm up (builds the fixed-base table too).
    for i in 0..200 {
        let _ = dice::issue_board(&ca, "SN-1", &ids[i % ids.len()], &fwid, &opts);
    }
    let mut failures = 0u64;
    let (chains, el) = rate(Duration::from_secs(2), |n| {
        if dice::issue_board(&ca, "SN-1", &ids[n as usize % ids.len()], &fwid, &opts).is_err() {
            failures += 1;
        }
    });
    let chain_rate = chains as f64 / el.as_secs_f64();

    let uds = [7u8; 32];
    let (derivs, del) = rate(Duration::from_millis(700), |n| {
        let mut u = uds;
        u[0] = n as u8;
        let _ = dice::derive_keys(&u, &fwid);
    });
    let deriv_rate = derivs as f64 / del.as_secs_f64();

    // Component costs: P-256 public key from a scalar, the p256 crate's ladder against the
    // fixed-base table the issuer uses.
    let (ladder_us, table_us) = {
        use p256::elliptic_curve::sec1::ToEncodedPoint;
        let keys = match dice::derive_keys(&uds, &fwid) {
            Ok(k) => k,
            Err(e) => {
                eprintln!("derive: {e}");
                std::process::exit(1);
            }
        };
        let t = Instant::now();
        for _ in 0..200 {
            std::hint::black_box(keys.alias.public_key().to_encoded_point(false));
        }
        let ladder = t.elapsed().as_secs_f64() * 1e6 / 200.0;
        let t = Instant::now();
        for _ in 0..2000 {
            std::hint::black_box(dps_station::attest::fixed_base::public_key_uncompressed(
                &keys.alias,
            ));
        }
        (ladder, t.elapsed().as_secs_f64() * 1e6 / 2000.0)
    };
    let out = tmp.path().join("bundles");
    let (written, wel) = rate(Duration::from_millis(700), |n| {
        let serial = format!("SN-{n}");
        if let Ok(b) = dice::issue_board(&ca, &serial, &ids[n as usize % ids.len()], &fwid, &opts) {
            if b.write_to(&out).is_err() {
                failures += 1;
            }
        }
    });
    let write_rate = written as f64 / wel.as_secs_f64();

    // Baseline: openssl processes issuing the same chain under the same intermediate.
    let odir = tmp.path().join("openssl");
    let _ = std::fs::create_dir_all(&odir);
    let _ = std::fs::copy(&paths.intermediate_cert, odir.join("ca.pem"));
    let _ = std::fs::copy(&paths.intermediate_key, odir.join("ca.key"));
    let tcb_hex = hex::encode(
        TcbInfo {
            fwids: vec![TcbFwid::sha256(fwid.0)],
            ..TcbInfo::default()
        }
        .to_der(),
    );
    let runs = 8;
    let start = Instant::now();
    let mut ok = 0;
    for i in 0..runs {
        if openssl_chain(&odir, i, &tcb_hex) {
            ok += 1;
        }
    }
    let per_openssl = start.elapsed() / runs;
    let openssl_rate = 1.0 / per_openssl.as_secs_f64();

    println!("## DICE issuance (one thread)\n");
    println!("| measurement | result | per board |");
    println!("|---|---|---|");
    println!(
        "| complete board chains (derive + 2 signatures + PEM), {chains} in {:.2} s | **{chain_rate:.0}/s** | {:.0} µs |",
        el.as_secs_f64(),
        1e6 / chain_rate
    );
    println!(
        "| key derivation only (CDI, DeviceID, Alias) | {deriv_rate:.0}/s | {:.0} µs |",
        1e6 / deriv_rate
    );
    println!(
        "| P-256 public key, p256 crate ladder | {:.0}/s | {ladder_us:.1} µs |",
        1e6 / ladder_us
    );
    println!(
        "| P-256 public key, fixed-base table (used) | {:.0}/s | {table_us:.1} µs |",
        1e6 / table_us
    );
    println!(
        "| chains + bundle written to disk (7 files, fsync) | {write_rate:.0}/s | {:.0} µs |",
        1e6 / write_rate
    );
    println!(
        "| baseline: openssl ecparam/req/x509 ×2 processes ({ok}/{runs} ok) | {openssl_rate:.1}/s | {:.1} ms |",
        per_openssl.as_secs_f64() * 1e3
    );
    println!(
        "\nTarget (DESIGN §9): ≥ {TARGET_PER_S:.0} chains/s — {}; {:.0}× the openssl baseline.",
        if chain_rate >= TARGET_PER_S {
            "met"
        } else {
            "NOT met"
        },
        chain_rate / openssl_rate
    );
    if failures > 0 || ok != runs {
        eprintln!("failures: {failures} issuance, {} openssl", runs - ok);
        std::process::exit(1);
    }
}
