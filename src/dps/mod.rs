//! DPS service client: connection strings, SAS tokens, typed models for every schema of
//! api-version 2021-10-01, the HTTP client with retries and pacing, bulk and query helpers.
//! It knows nothing of stations, boards or the SQLite store.
pub mod bulk;
pub mod client;
pub mod connection_string;
pub mod error;
pub mod ids;
pub mod models;
pub mod sas;

pub use client::{ClientOptions, DpsClient, QueryPage, API_VERSION, MAX_BULK_ITEMS};
pub use connection_string::{ConnectionString, ConnectionStringError};
pub use error::{DpsError, ServiceError, TransportKind};
pub use ids::{IdError, RegistrationId};
pub use models::*;
