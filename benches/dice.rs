//! Benchmark placeholder for dice (see DESIGN.md §9).
fn main() {}
