//! Shared integration-test harnesses. Each file is owned by one area:
//! `emulator` (start a DPS emulator on a free port), `swtpm` (fresh swtpm boards),
//! `pty` (a real pty pair for the scanner). Not every test binary uses every helper.
#![allow(dead_code)]
pub mod campaign;
pub mod emulator;
pub mod pty;
pub mod station;
pub mod swtpm;
pub mod tls;
