//! The one place where proxy errors become responses: a status and a JSON body with a stable
//! `code`, the request id and a short message.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::{Response, StatusCode};
use http_body_util::Full;

/// Everything the proxy can refuse or fail a request with.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No snapshot loaded yet.
    #[error("the gateway has no configuration yet")]
    NoConfig,
    /// Malformed request (path, host, framing).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// No route matches.
    #[error("no route matches this request")]
    NoRoute,
    /// The body is larger than the route allows.
    #[error("request body larger than {0} bytes")]
    BodyTooLarge(u64),
    /// No usable credential.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// A known consumer the route does not allow.
    #[error("consumer is not allowed on this route")]
    Forbidden,
    /// Over a rate limit or quota.
    #[error("{}", if usage.is_quota { "quota exceeded" } else { "rate limit exceeded" })]
    Limited {
        /// The limit that refused the request.
        usage: crate::limiter::Usage,
    },
    /// Redis is unavailable and a limit of this request fails closed.
    #[error("the rate limiter is unavailable")]
    LimiterUnavailable,
    /// The upstream could not be reached.
    #[error("upstream unreachable")]
    Unreachable,
    /// The upstream did not answer in time.
    #[error("upstream timed out")]
    Timeout,
    /// The client stopped sending its (HTTP/2) request body for longer than the body timeout.
    #[error("the client sent none of its request body within the body timeout")]
    BodyTimeout,
}

impl ProxyError {
    /// Status and stable code.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::NoConfig => (StatusCode::SERVICE_UNAVAILABLE, "no_config"),
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Self::NoRoute => (StatusCode::NOT_FOUND, "no_route"),
            Self::BodyTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::Forbidden => (StatusCode::FORBIDDEN, "forbidden"),
            Self::Limited { usage } if usage.is_quota => {
                (StatusCode::TOO_MANY_REQUESTS, "quota_exceeded")
            }
            Self::Limited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            Self::LimiterUnavailable => (StatusCode::SERVICE_UNAVAILABLE, "limiter_unavailable"),
            Self::Unreachable => (StatusCode::BAD_GATEWAY, "upstream_unreachable"),
            Self::Timeout => (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"),
            Self::BodyTimeout => (StatusCode::REQUEST_TIMEOUT, "body_timeout"),
        }
    }

    /// The response for this error.
    pub fn into_response(self, request_id: &HeaderValue) -> Response<Full<Bytes>> {
        let (status, code) = self.status_and_code();
        let body = serde_json::json!({
            "code": code,
            "message": self.to_string(),
            "request_id": request_id.to_str().unwrap_or_default(),
        });
        let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(crate::proxy::X_REQUEST_ID.clone(), request_id.clone());
        if matches!(self, Self::NoConfig | Self::LimiterUnavailable) {
            headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let Self::Limited { usage } = &self {
            crate::proxy::rate_limit_headers(headers, usage);
            headers.insert(
                RETRY_AFTER,
                HeaderValue::from(crate::proxy::ceil_seconds(usage.reset_ms)),
            );
        }
        if matches!(self, Self::Unauthorized(_)) {
            headers.insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}
