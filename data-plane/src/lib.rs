//! Tollgate's data plane: the proxy nodes. Read in this order:
//!
//! - [`settings`]: flags and `TOLLGATE_*` variables of `tollgate data-plane`.
//! - [`app`]: startup (`DataPlane::build`), serving, shutdown.
//! - [`state`]: the shared state; the current snapshot behind one `ArcSwap`.
//! - [`sync`]: the sync client (receive, validate, compile, swap, persist, ack/nack).
//! - [`config`]: compiling a snapshot into the runtime form (routes, upstream pools, keys).
//! - [`router`]: path and host normalization, the compiled route table.
//! - [`health`]: active health checks of upstream targets.
//! - [`server`]: the proxy and status listeners.
//! - [`lane`]: the HTTP/1.1 fast lane (bodyless requests), handing the rest to hyper.
//! - [`framing`]: the request-smuggling guard in front of the HTTP/1 parsers.
//! - [`watchdog`]: header, idle, send and body timeouts (slowloris guard), one timer per
//!   connection.
//! - [`proxy`]: the request pipeline, phase by phase.
//! - [`auth`], [`jwt`]: API-key and JWT authentication.
//! - [`limiter`]: rate limits and quotas (Redis script or memory) and failure policies.
//! - [`error`]: the one mapping from proxy errors to JSON answers.
//! - [`persist`]: the last good snapshot and the node id on disk.
//! - [`values`]: per-request header values without an allocation each.

pub mod app;
pub mod auth;
pub mod config;
pub mod error;
pub mod framing;
pub mod health;
pub mod jwt;
pub mod lane;
pub mod limiter;
pub mod pacing;
pub mod persist;
pub mod proxy;
pub mod router;
pub mod server;
pub mod settings;
pub mod state;
pub mod sync;
pub mod upstream;
pub mod values;
pub mod watchdog;

pub use app::DataPlane;
pub use settings::Settings;
