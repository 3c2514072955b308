//! Benchmark placeholder for tpm (see DESIGN.md §9).
fn main() {}
