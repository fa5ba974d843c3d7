//! JWT identity: HS256 only, `exp` required, optional `aud`/`iss` checks.
//!
//! `jsonwebtoken` is given exactly one algorithm, so a token with `alg: none` or any other
//! algorithm fails verification before its claims are looked at.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// The secret used by `--insecure-dev` when none is configured: public on purpose, so
/// that dev instances accept each other's tokens. Never valid in production.
pub const INSECURE_DEV_SECRET: &str = "msgbuf-insecure-dev-secret-do-not-use-in-production";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
}

impl Claims {
    pub fn is_admin(&self) -> bool {
        self.role.as_deref() == Some("admin")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing token: send `Authorization: Bearer <jwt>` or `?token=<jwt>`")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("invalid token: `sub` must be 1..=128 characters of [A-Za-z0-9_.@:-]")]
    BadSubject,
}

/// Verifies and mints tokens with one secret.
#[derive(Clone)]
pub struct Auth {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    audience: Option<String>,
    issuer: Option<String>,
}

impl Auth {
    pub fn new(secret: &str, audience: Option<String>, issuer: Option<String>) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        let mut required = vec!["exp", "sub"];
        required.extend(audience.as_ref().map(|_| "aud"));
        required.extend(issuer.as_ref().map(|_| "iss"));
        validation.set_required_spec_claims(&required);
        validation.leeway = 5;
        match &audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &issuer {
            validation.set_issuer(&[iss]);
        }
        Auth {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            validation,
            audience,
            issuer,
        }
    }

    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        if !is_valid_user_id(&data.claims.sub) {
            return Err(AuthError::BadSubject);
        }
        Ok(data.claims)
    }

    /// A token for `user`, valid for `ttl`, with the configured `aud`/`iss`.
    pub fn mint(&self, user: &str, admin: bool, ttl: Duration) -> Result<String, AuthError> {
        if !is_valid_user_id(user) {
            return Err(AuthError::BadSubject);
        }
        let claims = Claims {
            sub: user.to_owned(),
            exp: unix_now() + ttl.as_secs(),
            role: admin.then(|| "admin".to_owned()),
            aud: self.audience.clone(),
            iss: self.issuer.clone(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| AuthError::Invalid(e.to_string()))
    }
}

/// User ids: 1..=128 characters of `[A-Za-z0-9_.@:-]`.
pub fn is_valid_user_id(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'@' | b':' | b'-'))
}

/// The bearer token of a request: the `Authorization` header, else `?token=`.
pub fn bearer_token<'a>(
    headers: &'a axum::http::HeaderMap,
    query: Option<&'a str>,
) -> Option<&'a str> {
    if let Some(value) = headers.get(axum::http::header::AUTHORIZATION) {
        let value = value.to_str().ok()?;
        return value.strip_prefix("Bearer ").map(str::trim);
    }
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("token="))
        .filter(|t| !t.is_empty())
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl From<AuthError> for crate::error::Error {
    fn from(e: AuthError) -> Self {
        crate::error::Error::new(crate::error::ErrorCode::Unauthorized, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejections() {
        let auth = Auth::new("s3cret", None, None);
        let token = auth
            .mint("alice", true, Duration::from_secs(60))
            .expect("mint");
        let claims = auth.verify(&token).expect("verify");
        assert_eq!(claims.sub, "alice");
        assert!(claims.is_admin());

        let other = Auth::new("other", None, None);
        assert!(other.verify(&token).is_err(), "wrong secret must fail");

        // alg: none, hand-built: header {"alg":"none","typ":"JWT"}
        let none = format!(
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
            token.split('.').nth(1).expect("payload")
        );
        assert!(auth.verify(&none).is_err(), "alg none must fail");
        let scoped = Auth::new("s3cret", Some("chat".into()), Some("issuer-1".into()));
        let scoped_token = scoped
            .mint("alice", false, Duration::from_secs(60))
            .expect("mint");
        assert!(scoped.verify(&scoped_token).is_ok(), "matching aud/iss");
        assert!(
            scoped.verify(&token).is_err(),
            "aud/iss required when configured"
        );
        let other_aud = Auth::new("s3cret", Some("other".into()), Some("issuer-1".into()));
        assert!(other_aud.verify(&scoped_token).is_err(), "wrong aud");

        assert!(!is_valid_user_id("a b"));
        assert!(!is_valid_user_id(""));
        assert!(is_valid_user_id("bob@example.com"));
    }
}
