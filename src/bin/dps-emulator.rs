//! `dps-emulator`: a local stand-in for the DPS service API (DESIGN.md §8).
fn main() {}
