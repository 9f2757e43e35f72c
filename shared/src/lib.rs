//! Tollgate's shared contract between the control plane and the data plane.
//!
//! No I/O lives here (no tokio, axum, hyper, sqlx or redis). Read in this order:
//!
//! - [`validate`]: how every problem in a piece of config is reported at once, with a field path.
//! - [`model`]: the configuration resources operators write (upstreams, routes, consumers,
//!   plans, JWT issuers) and the stored envelope around them.
//! - [`snapshot`]: everything a data plane needs, with its revision and content hash.
//! - [`sync`]: the messages control and data planes exchange.
//! - [`secret`]: a string whose `Debug` never shows it.
//! - [`limits`]: limiter key names and UTC calendar periods.

pub mod limits;
pub mod model;
pub mod secret;
pub mod snapshot;
pub mod sync;
pub mod validate;

pub use model::{
    ApiKeyAuth, AuthPolicy, Consumer, DeclarativeConfig, FailurePolicy, HeaderTransform,
    HealthCheck, JwtAuth, JwtIssuer, LoadBalancing, PathMatch, Plan, Quota, QuotaPeriod, RateLimit,
    RateLimitBy, Reference, ResourceKind, Route, RouteRateLimit, Stored, Target, Timeouts,
    Transforms, Upstream,
};
pub use secret::Secret;
pub use snapshot::{ApiKeyDigest, ApiKeyEntry, Snapshot};
pub use validate::{FieldError, Validate, ValidationErrors};
