//! Station configuration (DESIGN.md §4): TOML, layered, validated with line-accurate errors.
