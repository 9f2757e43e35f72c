//! Admin API v1: handlers grouped by resource, and the OpenAPI document built from them.
//!
//! Every `/admin/v1` route is collected through `utoipa_axum::routes!`, so a route cannot be
//! served without appearing in `/openapi.json`.

mod config;
mod data_planes;
pub mod keys;
mod resources;
mod status;
mod usage;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::middleware;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use utoipa_swagger_ui::SwaggerUi;

use crate::app::AppState;
use crate::auth::require_admin;
use crate::error::ApiError;
use crate::extract::MAX_BODY_BYTES;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tollgate admin API",
        version = "1",
        description = "Configure routes, upstreams, consumers, keys, plans and JWT issuers. \
                       Every call needs `Authorization: Bearer <admin token>`. Errors are \
                       `application/problem+json` (RFC 9457) with a stable `code`. Objects are \
                       addressed by id or name."
    ),
    modifiers(&BearerAuth),
    security(("admin_token" = [])),
    tags(
        (name = "upstreams", description = "Backend services and their targets"),
        (name = "routes", description = "Which requests go where, with which policies"),
        (name = "consumers", description = "API consumers and their keys"),
        (name = "plans", description = "Rate limits and quotas"),
        (name = "jwt-issuers", description = "Trusted JWT issuers"),
        (name = "data-planes", description = "Proxy nodes and their config sync state"),
        (name = "config", description = "The whole configuration as one document"),
        (name = "status", description = "Control-plane health"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The admin router (with `/openapi.json` and `/docs`) and its OpenAPI document.
pub fn router(state: AppState) -> (Router, utoipa::openapi::OpenApi) {
    let admin = OpenApiRouter::new()
        .routes(routes!(
            resources::upstreams::list,
            resources::upstreams::create
        ))
        .routes(routes!(
            resources::upstreams::get,
            resources::upstreams::replace,
            resources::upstreams::patch,
            resources::upstreams::delete
        ))
        .routes(routes!(resources::routes::list, resources::routes::create))
        .routes(routes!(
            resources::routes::get,
            resources::routes::replace,
            resources::routes::patch,
            resources::routes::delete
        ))
        .routes(routes!(
            resources::consumers::list,
            resources::consumers::create
        ))
        .routes(routes!(
            resources::consumers::get,
            resources::consumers::replace,
            resources::consumers::patch,
            resources::consumers::delete
        ))
        .routes(routes!(keys::list, keys::create))
        .routes(routes!(keys::revoke))
        .routes(routes!(usage::get))
        .routes(routes!(resources::plans::list, resources::plans::create))
        .routes(routes!(
            resources::plans::get,
            resources::plans::replace,
            resources::plans::patch,
            resources::plans::delete
        ))
        .routes(routes!(
            resources::jwt_issuers::list,
            resources::jwt_issuers::create
        ))
        .routes(routes!(
            resources::jwt_issuers::get,
            resources::jwt_issuers::replace,
            resources::jwt_issuers::patch,
            resources::jwt_issuers::delete
        ))
        .routes(routes!(status::status))
        .routes(routes!(data_planes::list))
        .routes(routes!(config::export, config::apply))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), require_admin));

    let (router, openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .nest("/admin/v1", admin)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
        .split_for_parts();
    let router = router
        .merge(SwaggerUi::new("/docs").url("/openapi.json", openapi.clone()))
        .fallback(not_found);
    (router, openapi)
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!("no such endpoint: {}", uri.path()))
}
