//! DPS service client: connection strings, SAS tokens, typed models for every schema of
//! api-version 2021-10-01, the HTTP client with retries and pacing, bulk and query helpers.
//! It knows nothing of stations, boards or the SQLite store.
pub mod ids;

pub use ids::{IdError, RegistrationId};
