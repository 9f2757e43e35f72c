//! `GET /admin/v1/consumers/{c}/usage`: a consumer's current counters, read from the Redis the
//! data planes count in.

use axum::Json;
use axum::extract::{Path, State};
use serde::Serialize;
use tollgate_shared::{Consumer, Plan, QuotaPeriod, limits};
use utoipa::ToSchema;

use crate::app::AppState;
use crate::error::{ApiError, Problem};
use crate::store::{now_ms, rfc3339};

/// A consumer's usage of its plan.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"consumer_id": "01936f3a-…", "username": "alice", "plan": "gold",
    "rate_limit": {"limit": 100, "window_seconds": 60, "used": 12, "remaining": 88},
    "quota": {"limit": 100000, "period": "month", "used": 4711, "remaining": 95289,
              "resets_at": "2026-12-01T00:00:00Z"}}))]
pub struct Usage {
    /// Consumer id.
    pub consumer_id: String,
    /// Username.
    pub username: String,
    /// Plan name; no limits without one.
    pub plan: Option<String>,
    /// The plan's sliding-window limit.
    pub rate_limit: Option<WindowUsage>,
    /// The plan's calendar quota.
    pub quota: Option<QuotaUsage>,
}

/// Requests in the current sliding window.
#[derive(Debug, Serialize, ToSchema)]
pub struct WindowUsage {
    /// Requests allowed per window.
    pub limit: i64,
    /// Window length.
    pub window_seconds: i64,
    /// Requests admitted in the last window.
    pub used: i64,
    /// Requests left right now.
    pub remaining: i64,
}

/// Requests in the current calendar period.
#[derive(Debug, Serialize, ToSchema)]
pub struct QuotaUsage {
    /// Requests allowed per period.
    pub limit: i64,
    /// Day or month (UTC).
    pub period: QuotaPeriod,
    /// Requests admitted this period.
    pub used: i64,
    /// Requests left this period.
    pub remaining: i64,
    /// When the period ends (RFC 3339).
    pub resets_at: String,
}

/// Current rate-limit and quota counters of a consumer (from Redis).
#[utoipa::path(get, path = "/consumers/{id}/usage", tag = "consumers",
    params(("id" = String, Path, description = "Consumer id or username")),
    responses((status = 200, description = "Current usage", body = Usage),
              (status = 401, description = "No valid admin token", body = Problem, content_type = "application/problem+json"),
              (status = 404, description = "No such consumer", body = Problem, content_type = "application/problem+json"),
              (status = 503, description = "No Redis configured or reachable", body = Problem, content_type = "application/problem+json")))]
pub async fn get(
    State(state): State<AppState>,
    Path(key): Path<String>,
) -> Result<Json<Usage>, ApiError> {
    let consumer = state.store.get::<Consumer>(&key).await?;
    let plan = match &consumer.spec.plan {
        Some(name) => Some(state.store.get::<Plan>(name).await?.spec),
        None => None,
    };
    let mut usage = Usage {
        consumer_id: consumer.id.clone(),
        username: consumer.spec.username.clone(),
        plan: plan.as_ref().map(|p| p.name.clone()),
        rate_limit: None,
        quota: None,
    };
    let Some(plan) = plan else {
        return Ok(Json(usage));
    };
    let client = state.redis.as_ref().ok_or_else(|| {
        ApiError::LimiterUnavailable(
            "usage is read from Redis: set TOLLGATE_REDIS_URL (the data planes' Redis) on the control plane".into(),
        )
    })?;
    let unavailable =
        |error: redis::RedisError| ApiError::LimiterUnavailable(format!("Redis: {error}"));
    let mut connection = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        client.get_multiplexed_async_connection(),
    )
    .await
    .map_err(|_| ApiError::LimiterUnavailable("Redis did not answer in 2 s".into()))?
    .map_err(unavailable)?;
    let now = now_ms();
    if let Some(limit) = &plan.rate_limit {
        let window_ms = limit.window_seconds.saturating_mul(1000);
        let key = limits::plan_key(&state.redis_prefix, &consumer.id);
        let used: i64 = redis::Script::new(limits::WINDOW_COUNT_SCRIPT)
            .key(&limits::window_keys(&key)[..])
            .arg(now - window_ms)
            .invoke_async(&mut connection)
            .await
            .map_err(unavailable)?;
        usage.rate_limit = Some(WindowUsage {
            limit: limit.requests,
            window_seconds: limit.window_seconds,
            used,
            remaining: (limit.requests - used).max(0),
        });
    }
    if let Some(quota) = &plan.quota {
        let (ends, stamp) = limits::period_end(quota.period, now);
        let used: Option<i64> = redis::cmd("GET")
            .arg(limits::quota_key(&state.redis_prefix, &consumer.id, &stamp))
            .query_async(&mut connection)
            .await
            .map_err(unavailable)?;
        let used = used.unwrap_or(0);
        usage.quota = Some(QuotaUsage {
            limit: quota.requests,
            period: quota.period,
            used,
            remaining: (quota.requests - used).max(0),
            resets_at: rfc3339(ends),
        });
    }
    Ok(Json(usage))
}
