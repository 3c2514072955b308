//! dps-station: a factory-line provisioning daemon for the Azure IoT Hub Device
//! Provisioning Service (DPS), plus a command line for every enrollment operation and a
//! local DPS emulator. Data flows one way: scan → attest → store → batch → DPS → reply.
//!
//! Module map (DESIGN.md §1):
//! - [`dps`]: the DPS service client (connection string, SAS, models, retries, bulk, query).
//! - [`attest`]: TPM endorsement keys (tss-esapi) and DICE X.509 identities (rcgen).
//! - [`config`]: the station's TOML config, layered and validated at load.
//! - [`station`]: the daemon (trigger, pipeline, SQLite store, batcher, control socket).
//! - [`emulator`]: a local DPS service emulator, faithful to the 2021-10-01 spec.
//! - [`cli`]: the `dps-station` command line; `main.rs` only parses and maps exit codes.
#![forbid(unsafe_code)]
// Nothing that input, a device or the network can make fail may unwrap outside tests.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod attest;
pub mod cli;
pub mod config;
pub mod dps;
pub mod emulator;
pub mod secret;
pub mod station;
