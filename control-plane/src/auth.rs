//! Admin authentication: bearer tokens stored as SHA-256 digests, compared in constant time.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::app::AppState;
use crate::error::ApiError;
use crate::settings::Secret;
use crate::store::{Store, StoreError};

/// A new random secret: `prefix` + 43 URL-safe characters (256 bits from the OS CSPRNG).
pub fn generate_secret(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

fn token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Makes sure an admin token exists. A configured token is stored (hashed) if new; with none
/// configured and none stored, one is generated and returned so the caller prints it once.
pub async fn bootstrap(
    store: &Store,
    configured: Option<&Secret>,
) -> Result<Option<String>, StoreError> {
    if let Some(token) = configured {
        let digest = hex::encode(token_digest(token.expose()));
        store
            .add_admin_token(&digest, "from TOLLGATE_ADMIN_TOKEN")
            .await?;
        return Ok(None);
    }
    if !store.admin_token_digests().await?.is_empty() {
        return Ok(None);
    }
    let token = generate_secret("tgadm_");
    let digest = hex::encode(token_digest(&token));
    Ok(store
        .add_admin_token(&digest, "generated at first start")
        .await?
        .then_some(token))
}

/// Middleware: 401 unless `Authorization: Bearer <token>` matches a stored admin token.
pub async fn require_admin(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .filter(|token| !token.is_empty())
        .ok_or(ApiError::Unauthorized)?;
    let presented = token_digest(presented);
    let stored = state.store.admin_token_digests().await?;
    // Compare against every stored digest without stopping early.
    let mut matched = subtle::Choice::from(0u8);
    for digest in &stored {
        let Ok(digest) = hex::decode(digest) else {
            continue;
        };
        matched |= digest.as_slice().ct_eq(&presented);
    }
    if bool::from(matched) {
        Ok(next.run(request).await)
    } else {
        Err(ApiError::Unauthorized)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_long_random_and_prefixed() {
        let a = generate_secret("tg_");
        let b = generate_secret("tg_");
        assert!(a.starts_with("tg_"));
        assert_eq!(a.len(), 3 + 43);
        assert_ne!(a, b);
    }
}
