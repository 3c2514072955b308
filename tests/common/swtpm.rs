//! Test side of the swtpm harness: fresh boards in temp dirs (the harness itself lives in
//! the library, `dps_station::attest::swtpm`, so the demo can use it too) and the
//! tpm2-tools oracles the TPM tests compare against. Never touches system paths.
use std::path::Path;
use std::process::Command;

#[allow(unused_imports)] // not every test binary uses every re-export
pub use dps_station::attest::swtpm::{free_port_pair, SwtpmBoard, SwtpmError, SwtpmVariant};

/// A running board plus the temp dir that holds its state; dropping it kills swtpm first.
pub struct TestBoard {
    pub board: SwtpmBoard,
    pub dir: tempfile::TempDir,
}

impl std::ops::Deref for TestBoard {
    type Target = SwtpmBoard;
    fn deref(&self) -> &SwtpmBoard {
        &self.board
    }
}

impl std::ops::DerefMut for TestBoard {
    fn deref_mut(&mut self) -> &mut SwtpmBoard {
        &mut self.board
    }
}

/// A fresh swtpm board of `variant` on free loopback ports.
pub fn board(variant: SwtpmVariant) -> TestBoard {
    let dir = tempfile::tempdir().expect("temp dir");
    let board = SwtpmBoard::start(variant, dir.path()).expect("swtpm board");
    TestBoard { board, dir }
}

/// A fresh swtpm board of `variant` on unix sockets in its temp dir (TCTI
/// `swtpm:path=DIR/swtpm.sock`, control channel `DIR/swtpm.sock.ctrl`).
pub fn board_unix(variant: SwtpmVariant) -> TestBoard {
    let dir = tempfile::tempdir().expect("temp dir");
    let board = SwtpmBoard::start_unix(variant, dir.path()).expect("swtpm board on unix sockets");
    TestBoard { board, dir }
}

/// A fresh board of `variant` on a given data port (a board swapped into the same fixture).
pub fn board_on_port(variant: SwtpmVariant, port: u16) -> TestBoard {
    let dir = tempfile::tempdir().expect("temp dir");
    let board = SwtpmBoard::start_on_port(variant, dir.path(), port).expect("swtpm board");
    TestBoard { board, dir }
}

fn tool(args: &[&str], tcti: &str) -> std::process::Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .arg("-T")
        .arg(tcti)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e} (is tpm2-tools installed?)", args[0]));
    assert!(
        out.status.success(),
        "{} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `tpm2_readpublic -c 0x81010001 -o FILE` (TPM2B_PUBLIC, the default `tss` format).
pub fn tpm2_readpublic_ek(tcti: &str, scratch: &Path) -> Vec<u8> {
    let f = scratch.join("readpublic-ek.pub");
    tool(
        &[
            "tpm2_readpublic",
            "-Q",
            "-c",
            "0x81010001",
            "-o",
            f.to_str().expect("utf-8 path"),
        ],
        tcti,
    );
    std::fs::read(&f).expect("tpm2_readpublic output")
}

/// `tpm2_createek -G rsa -u FILE -c CTX` (transient TCG EK) followed by
/// `tpm2_flushcontext -t`, as the reference recipe does.
pub fn tpm2_createek_rsa(tcti: &str, scratch: &Path) -> Vec<u8> {
    let u = scratch.join("createek.pub");
    let c = scratch.join("createek.ctx");
    tool(
        &[
            "tpm2_createek",
            "-G",
            "rsa",
            "-u",
            u.to_str().expect("utf-8 path"),
            "-c",
            c.to_str().expect("utf-8 path"),
        ],
        tcti,
    );
    tool(&["tpm2_flushcontext", "-t"], tcti);
    std::fs::read(&u).expect("tpm2_createek output")
}

/// Does `tpm2_readpublic -c 0x81010001` succeed (is an EK persisted)?
pub fn ek_is_persisted(tcti: &str) -> bool {
    Command::new("tpm2_readpublic")
        .args(["-Q", "-c", "0x81010001", "-T", tcti])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Transient objects currently loaded (`tpm2_getcap handles-transient`).
pub fn transient_handles(tcti: &str) -> Vec<String> {
    let out = tool(&["tpm2_getcap", "handles-transient"], tcti);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().trim_start_matches("- ").to_string())
        .filter(|l| !l.is_empty())
        .collect()
}
