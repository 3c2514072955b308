//! Benchmark placeholder for pipeline (see DESIGN.md §9).
fn main() {}
