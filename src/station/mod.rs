//! The station daemon: trigger → pipeline → SQLite store → batcher → DPS → replies.
pub mod logging;
