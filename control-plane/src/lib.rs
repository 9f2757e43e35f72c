//! Tollgate's control plane: the only writer of configuration.
//!
//! - [`settings`]: flags and `TOLLGATE_*` variables of `tollgate control-plane`.
//! - [`app`]: startup (`Application::build`), serving and shutdown.
//! - [`api`]: admin API v1 handlers, grouped by resource, and the OpenAPI document.
//! - [`auth`]: admin bearer tokens, hashed and compared in constant time.
//! - [`extract`]: JSON extractors that reject with problem+json.
//! - [`error`]: the one mapping from errors to problem+json responses.
//! - [`store`]: the only module with SQL (Postgres or embedded SQLite).
//! - [`sync`]: snapshot publishing and the cluster listener data planes sync from.

pub mod api;
pub mod app;
pub mod auth;
pub mod error;
pub mod extract;
pub mod settings;
pub mod store;
pub mod sync;
pub mod tls;

pub use app::{AppState, Application};
pub use settings::{Secret, Settings};
pub use store::{Backend, Store};
