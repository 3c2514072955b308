//! The station daemon: trigger → pipeline → SQLite store → batcher → DPS → replies.
pub mod batcher;
pub mod control;
pub mod daemon;
pub mod demo;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod pipeline;
pub mod report;
pub mod scanline;
pub mod status;
pub mod store;
pub mod trigger;
