//! A local DPS service emulator (DESIGN.md §8), faithful to the 2021-10-01 spec.
