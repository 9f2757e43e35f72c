//! API keys of a consumer: issue (secret shown once), list (never the secret), revoke.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use tollgate_shared::ApiKeyDigest;
use utoipa::ToSchema;

use crate::app::AppState;
use crate::auth::generate_secret;
use crate::error::{ApiError, Problem};
use crate::extract::OptionalJson;
use crate::store::{ApiKeyRecord, Store, now_ms, rfc3339};

/// Prefix of every API key secret, so leaked keys are recognisable (and scannable).
pub const KEY_PREFIX: &str = "tg_";
/// Characters of the secret kept for display: the prefix and four more.
const DISPLAY_PREFIX_LEN: usize = KEY_PREFIX.len() + 4;

/// Options of a new key; every field is optional and `{}` (or no body) is fine.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "ci-pipeline", "ttl_seconds": 2592000}))]
pub struct NewKey {
    /// A label for the key.
    #[serde(default)]
    pub name: Option<String>,
    /// Expiry time, RFC 3339.
    #[serde(default)]
    pub expires_at: Option<String>,
    /// Expiry as seconds from now (instead of `expires_at`).
    #[serde(default)]
    pub ttl_seconds: Option<i64>,
}

/// A freshly issued key. `key` is the secret: it is shown here once and never again.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"id": "01936f3a-8d2c-7b7e-9f4e-4c1d2b3a4f5e", "key": "tg_AbCdEf…",
    "prefix": "tg_AbCd", "consumer_id": "01936f3a-0000-7000-8000-000000000001", "name": null,
    "created_at": "2026-11-28T10:00:00Z", "expires_at": null}))]
pub struct IssuedKey {
    /// Key id (use it to revoke).
    pub id: String,
    /// The secret. Store it now: only its digest is kept.
    pub key: String,
    /// First characters of the secret, shown in listings.
    pub prefix: String,
    /// Owning consumer.
    pub consumer_id: String,
    /// Label.
    pub name: Option<String>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339; never expires when null.
    pub expires_at: Option<String>,
}

/// A key as listed: metadata only.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyInfo {
    /// Key id.
    pub id: String,
    /// First characters of the secret.
    #[schema(example = "tg_AbCd")]
    pub prefix: String,
    /// Owning consumer.
    pub consumer_id: String,
    /// Label.
    pub name: Option<String>,
    /// `active`, `expired` or `revoked`.
    #[schema(example = "active")]
    pub status: &'static str,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub expires_at: Option<String>,
    /// RFC 3339.
    pub revoked_at: Option<String>,
    /// RFC 3339; reported by data planes.
    pub last_used_at: Option<String>,
}

impl From<ApiKeyRecord> for KeyInfo {
    fn from(record: ApiKeyRecord) -> Self {
        let status = if record.revoked_at.is_some() {
            "revoked"
        } else if record.expires_at.is_some_and(|at| at <= now_ms()) {
            "expired"
        } else {
            "active"
        };
        Self {
            id: record.id,
            prefix: record.prefix,
            consumer_id: record.consumer_id,
            name: record.name,
            status,
            created_at: rfc3339(record.created_at),
            expires_at: record.expires_at.map(rfc3339),
            revoked_at: record.revoked_at.map(rfc3339),
            last_used_at: record.last_used_at.map(rfc3339),
        }
    }
}

impl NewKey {
    /// Expiry in Unix milliseconds, after checking the options.
    fn expiry(&self) -> Result<Option<i64>, ApiError> {
        let invalid = |field: &str, message: &str| ApiError::Unprocessable {
            detail: format!("{field}: {message}"),
            errors: vec![tollgate_shared::FieldError {
                field: field.into(),
                message: message.into(),
            }],
        };
        if let Some(name) = &self.name
            && (name.is_empty() || name.len() > 128)
        {
            return Err(invalid("name", "must be 1 to 128 characters"));
        }
        let now = now_ms();
        match (&self.expires_at, self.ttl_seconds) {
            (Some(_), Some(_)) => Err(invalid("", "give 'expires_at' or 'ttl_seconds', not both")),
            (Some(at), None) => {
                let parsed =
                    time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
                        .map_err(|_| {
                            invalid(
                                "expires_at",
                                "must be an RFC 3339 time such as 2027-01-31T00:00:00Z",
                            )
                        })?;
                let ms =
                    i64::try_from(parsed.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX);
                if ms <= now {
                    return Err(invalid("expires_at", "must be in the future"));
                }
                Ok(Some(ms))
            }
            (None, Some(ttl)) if ttl <= 0 || ttl > 10 * 366 * 86_400 => Err(invalid(
                "ttl_seconds",
                "must be between 1 and 316224000 (ten years)",
            )),
            (None, Some(ttl)) => Ok(Some(now + ttl * 1000)),
            (None, None) => Ok(None),
        }
    }
}

/// Issue a new API key for a consumer. The secret is in this response only.
#[utoipa::path(post, path = "/consumers/{id}/keys", tag = "consumers",
    request_body(content = NewKey, description = "Optional; `{}` or no body issues a key that never expires"),
    params(("id" = String, Path, description = "Consumer id or username")),
    responses((status = 201, description = "Issued; the secret is shown once", body = IssuedKey),
              (status = 401, description = "No valid admin token", body = Problem, content_type = "application/problem+json"),
              (status = 404, description = "No such consumer", body = Problem, content_type = "application/problem+json"),
              (status = 422, description = "Invalid options", body = Problem, content_type = "application/problem+json")))]
pub async fn create(
    State(state): State<AppState>,
    Path(consumer): Path<String>,
    OptionalJson(options): OptionalJson<NewKey>,
) -> Result<(StatusCode, Json<IssuedKey>), ApiError> {
    let issued = issue(&state.store, &consumer, &options).await?;
    Ok((StatusCode::CREATED, Json(issued)))
}

/// Issues a key for `consumer` (id or username): generates the secret, stores its digest,
/// and returns the secret — the only time it exists outside the caller's hands.
pub async fn issue(store: &Store, consumer: &str, options: &NewKey) -> Result<IssuedKey, ApiError> {
    let expires_at = options.expiry()?;
    let secret = generate_secret(KEY_PREFIX);
    let digest = ApiKeyDigest::of_secret(&secret);
    let prefix = secret[..DISPLAY_PREFIX_LEN].to_string();
    let (_, record) = store
        .create_key(
            consumer,
            &digest,
            &prefix,
            options.name.as_deref(),
            expires_at,
        )
        .await?;
    Ok(IssuedKey {
        id: record.id,
        key: secret,
        prefix: record.prefix,
        consumer_id: record.consumer_id,
        name: record.name,
        created_at: rfc3339(record.created_at),
        expires_at: record.expires_at.map(rfc3339),
    })
}

/// List a consumer's keys (revoked and expired ones included), without secrets.
#[utoipa::path(get, path = "/consumers/{id}/keys", tag = "consumers",
    params(("id" = String, Path, description = "Consumer id or username")),
    responses((status = 200, description = "The keys", body = Vec<KeyInfo>),
              (status = 401, description = "No valid admin token", body = Problem, content_type = "application/problem+json"),
              (status = 404, description = "No such consumer", body = Problem, content_type = "application/problem+json")))]
pub async fn list(
    State(state): State<AppState>,
    Path(consumer): Path<String>,
) -> Result<Json<Vec<KeyInfo>>, ApiError> {
    let keys = state.store.list_keys(&consumer).await?;
    Ok(Json(keys.into_iter().map(KeyInfo::from).collect()))
}

/// Revoke a key. It stops working on every data plane with the next config push.
#[utoipa::path(delete, path = "/consumers/{id}/keys/{key_id}", tag = "consumers",
    params(("id" = String, Path, description = "Consumer id or username"),
           ("key_id" = String, Path, description = "Key id")),
    responses((status = 204, description = "Revoked (also when it already was)"),
              (status = 401, description = "No valid admin token", body = Problem, content_type = "application/problem+json"),
              (status = 404, description = "No such consumer or key", body = Problem, content_type = "application/problem+json")))]
pub async fn revoke(
    State(state): State<AppState>,
    Path((consumer, key_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    state.store.revoke_key(&consumer, &key_id).await?;
    Ok(StatusCode::NO_CONTENT)
}
