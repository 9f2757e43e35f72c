//! JWT verification against configured issuers (jsonwebtoken, pure-Rust crypto).
//!
//! The algorithm allow-list comes from the issuer, never from the token: `alg: none` cannot
//! even be parsed, and HS/RS confusion is impossible because an issuer holds either an HMAC
//! secret or public keys, never both (the control plane refuses mixed lists). `exp` is
//! required; `nbf`, `iss` and `aud` are checked with the issuer's leeway.

use http::HeaderName;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use tollgate_shared::JwtIssuer;

/// An issuer compiled for verification.
pub struct IssuerKeys {
    /// Issuer name (for logs).
    pub name: String,
    keys: Vec<DecodingKey>,
    validation: Validation,
    /// Claim naming the consumer.
    pub consumer_claim: String,
    /// Claims forwarded upstream as headers.
    pub forward_claims: Vec<(String, HeaderName)>,
    /// Accept tokens whose consumer claim names no consumer.
    pub allow_anonymous: bool,
}

impl IssuerKeys {
    /// Parses the issuer's keys; a key that does not parse refuses the whole snapshot.
    pub fn compile(issuer: &JwtIssuer) -> Result<Self, String> {
        let algorithms = issuer
            .algorithms
            .iter()
            .map(|a| {
                a.parse::<Algorithm>()
                    .map_err(|_| format!("unsupported algorithm '{a}'"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let first = *algorithms.first().ok_or("no algorithms")?;
        let mut keys = Vec::new();
        if let Some(secret) = &issuer.secret {
            keys.push(DecodingKey::from_secret(secret.as_bytes()));
        }
        if let Some(pem) = &issuer.public_key_pem {
            let key = match first {
                Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(pem.as_bytes()),
                Algorithm::EdDSA => DecodingKey::from_ed_pem(pem.as_bytes()),
                _ => DecodingKey::from_rsa_pem(pem.as_bytes()),
            }
            .map_err(|e| format!("public_key_pem does not parse: {e}"))?;
            keys.push(key);
        }
        // jwks_url: keys are fetched by the JWKS support (not built yet); until then no token
        // of such an issuer verifies, so its routes stay closed.
        let mut validation = Validation::new(first);
        validation.algorithms = algorithms;
        validation.set_issuer(&[issuer.issuer.as_str()]);
        if issuer.audiences.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&issuer.audiences);
        }
        validation.leeway = u64::try_from(issuer.leeway_seconds).unwrap_or(0);
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        let forward_claims = issuer
            .forward_claims
            .iter()
            .map(|(claim, header)| {
                HeaderName::try_from(header.as_str())
                    .map(|h| (claim.clone(), h))
                    .map_err(|e| format!("forward_claims header '{header}': {e}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            name: issuer.name.clone(),
            keys,
            validation,
            consumer_claim: issuer.consumer_claim.clone(),
            forward_claims,
            allow_anonymous: issuer.allow_anonymous,
        })
    }

    /// The token's claims when it verifies against one of the issuer's keys.
    pub fn verify(&self, token: &str) -> Option<Map<String, Value>> {
        self.keys.iter().find_map(|key| {
            jsonwebtoken::decode::<Map<String, Value>>(token, key, &self.validation)
                .ok()
                .map(|data| data.claims)
        })
    }
}
