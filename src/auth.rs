//! JWT identity: one key, one algorithm. Either an HS256 secret (`MSGBUF_JWT_SECRET`) or an
//! identity provider's public key (`MSGBUF_JWT_PUBLIC_KEY_FILE`: RSA → RS256, EC P-256 →
//! ES256, EC P-384 → ES384, Ed25519 → EdDSA); `exp` required, `nbf` enforced, `aud`/`iss`
//! checked when configured.
//!
//! The algorithm follows the key, never the token: a header naming any other algorithm
//! (`none`, or HS256 signed with the public key's PEM as secret) is refused before its
//! signature is looked at. A header with `crit` is refused too (RFC 7515 §4.1.11: msgbuf
//! understands no extension). Refusals carry msgbuf's own words; the library's detail is
//! logged at debug.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// The secret used by `--insecure-dev` when none is configured: public on purpose, so
/// that dev instances accept each other's tokens. Never valid in production.
pub const INSECURE_DEV_SECRET: &str = "msgbuf-insecure-dev-secret-do-not-use-in-production";

/// Clock skew allowed on `exp` and `nbf`, in seconds (RFC 7519 §4.1.4 allows "some small
/// leeway"); docs/PROTOCOL.md states it.
pub const LEEWAY_SECS: u64 = 5;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    /// Defaulted only so that a token without it reaches the validation that names it
    /// (`token missing exp`) instead of failing to deserialize; `exp` is required.
    #[serde(default)]
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// One audience or several (identity providers send either form).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<Audience>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Claims {
    pub fn is_admin(&self) -> bool {
        self.role.as_deref() == Some("admin")
    }
}

/// Why a request's token was refused; the message is what the client sees (401 body).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing token: send `Authorization: Bearer <jwt>` or `?token=<jwt>`")]
    Missing,
    #[error("malformed token")]
    Malformed,
    #[error("token has critical header parameters")]
    CriticalHeader,
    #[error("token algorithm not allowed")]
    AlgorithmNotAllowed,
    #[error("token signature invalid")]
    SignatureInvalid,
    #[error("token missing exp")]
    MissingExp,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("token audience not allowed")]
    AudienceNotAllowed,
    #[error("token issuer not allowed")]
    IssuerNotAllowed,
    #[error("invalid token: `sub` must be 1..=128 characters of [A-Za-z0-9_.@:-]")]
    BadSubject,
    #[error("this instance verifies tokens with a public key and cannot mint any")]
    CannotMint,
}

impl AuthError {
    fn from_library(e: &jsonwebtoken::errors::Error) -> Self {
        match e.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => {
                AuthError::AlgorithmNotAllowed
            }
            ErrorKind::InvalidSignature => AuthError::SignatureInvalid,
            ErrorKind::InvalidAudience => AuthError::AudienceNotAllowed,
            ErrorKind::InvalidIssuer => AuthError::IssuerNotAllowed,
            ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
                "exp" => AuthError::MissingExp,
                "aud" => AuthError::AudienceNotAllowed,
                "iss" => AuthError::IssuerNotAllowed,
                _ => AuthError::Malformed,
            },
            _ => AuthError::Malformed,
        }
    }
}

/// A PEM file that cannot serve as a verification key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("not a PEM public key (expected `-----BEGIN PUBLIC KEY-----` or `-----BEGIN RSA PUBLIC KEY-----`{0})")]
    NotPublicKey(&'static str),
    #[error("an EC key on a curve other than P-256 (ES256) or P-384 (ES384)")]
    UnsupportedCurve,
    #[error("not an RSA, EC or Ed25519 public key msgbuf can read")]
    Unsupported,
}

// DER encodings of the named-curve OIDs (1.2.840.10045.3.1.7 and 1.3.132.0.34).
const P256_OID: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const P384_OID: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

/// Verifies tokens with one key and one algorithm; mints with the secret, if it has one.
#[derive(Clone)]
pub struct Auth {
    encoding: Option<EncodingKey>,
    decoding: DecodingKey,
    algorithm: Algorithm,
    validation: Validation,
    audience: Option<String>,
    issuer: Option<String>,
}

impl Auth {
    /// HS256 with `secret`: verifies and mints (`msgbuf token`, dev mode, tests).
    pub fn new(secret: &str, audience: Option<String>, issuer: Option<String>) -> Self {
        Self::build(
            Some(EncodingKey::from_secret(secret.as_bytes())),
            DecodingKey::from_secret(secret.as_bytes()),
            Algorithm::HS256,
            audience,
            issuer,
        )
    }

    /// Verification only, with a PEM public key; the algorithm is the key's.
    pub fn from_public_key_pem(
        pem: &[u8],
        audience: Option<String>,
        issuer: Option<String>,
    ) -> Result<Self, KeyError> {
        let (decoding, algorithm) = public_key(pem)?;
        Ok(Self::build(None, decoding, algorithm, audience, issuer))
    }

    fn build(
        encoding: Option<EncodingKey>,
        decoding: DecodingKey,
        algorithm: Algorithm,
        audience: Option<String>,
        issuer: Option<String>,
    ) -> Self {
        let mut validation = Validation::new(algorithm);
        validation.algorithms = vec![algorithm];
        let mut required = vec!["exp", "sub"];
        required.extend(audience.as_ref().map(|_| "aud"));
        required.extend(issuer.as_ref().map(|_| "iss"));
        validation.set_required_spec_claims(&required);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECS;
        match &audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &issuer {
            validation.set_issuer(&[iss]);
        }
        Auth {
            encoding,
            decoding,
            algorithm,
            validation,
            audience,
            issuer,
        }
    }

    /// The one algorithm tokens must name.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        self.check_header(token)
            .inspect_err(|reason| tracing::debug!(%reason, "token refused"))?;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|detail| {
                let reason = AuthError::from_library(&detail);
                tracing::debug!(%reason, %detail, "token refused");
                reason
            })?;
        if !is_valid_user_id(&data.claims.sub) {
            return Err(AuthError::BadSubject);
        }
        Ok(data.claims)
    }

    /// The header as JSON, before the library sees it: it ignores `crit`, and a header
    /// naming an algorithm it does not know (`none`) would otherwise read as malformed.
    fn check_header(&self, token: &str) -> Result<(), AuthError> {
        let encoded = token.split('.').next().unwrap_or_default();
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(encoded)
            .map_err(|_| AuthError::Malformed)?;
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&bytes).map_err(|_| AuthError::Malformed)?;
        if header.contains_key("crit") {
            return Err(AuthError::CriticalHeader);
        }
        let pinned = serde_json::to_value(self.algorithm).map_err(|_| AuthError::Malformed)?;
        if header.get("alg") != Some(&pinned) {
            return Err(AuthError::AlgorithmNotAllowed);
        }
        Ok(())
    }

    /// A token for `user`, valid for `ttl`, with the configured `aud`/`iss`.
    pub fn mint(&self, user: &str, admin: bool, ttl: Duration) -> Result<String, AuthError> {
        let Some(encoding) = &self.encoding else {
            return Err(AuthError::CannotMint);
        };
        if !is_valid_user_id(user) {
            return Err(AuthError::BadSubject);
        }
        let claims = Claims {
            sub: user.to_owned(),
            exp: unix_now() + ttl.as_secs(),
            role: admin.then(|| "admin".to_owned()),
            aud: self.audience.clone().map(Audience::One),
            iss: self.issuer.clone(),
        };
        jsonwebtoken::encode(&Header::new(self.algorithm), &claims, encoding).map_err(|e| {
            tracing::warn!(error = %e, "minting a token failed");
            AuthError::CannotMint
        })
    }
}

/// The decoding key and its algorithm. The library's constructors each accept only their
/// own key type, so trying them in turn classifies the key; the curve is read from the DER.
fn public_key(pem: &[u8]) -> Result<(DecodingKey, Algorithm), KeyError> {
    let text = std::str::from_utf8(pem).map_err(|_| KeyError::NotPublicKey(""))?;
    let label = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("-----BEGIN "))
        .and_then(|l| l.strip_suffix("-----"));
    match label {
        Some("PUBLIC KEY" | "RSA PUBLIC KEY") => {}
        Some(l) if l.contains("PRIVATE") => {
            return Err(KeyError::NotPublicKey(
                "; this is a private key: give msgbuf only the public half (`openssl pkey -in key.pem -pubout`)",
            ))
        }
        Some("CERTIFICATE") => {
            return Err(KeyError::NotPublicKey(
                "; this is a certificate: extract its key (`openssl x509 -in cert.pem -pubkey -noout`)",
            ))
        }
        _ => return Err(KeyError::NotPublicKey("")),
    }
    if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
        return Ok((key, Algorithm::RS256));
    }
    if let Ok(key) = DecodingKey::from_ed_pem(pem) {
        return Ok((key, Algorithm::EdDSA));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(pem) {
        let der = pem_body(text).ok_or(KeyError::Unsupported)?;
        let has = |oid: &[u8]| der.windows(oid.len()).any(|w| w == oid);
        return match (has(P256_OID), has(P384_OID)) {
            (true, _) => Ok((key, Algorithm::ES256)),
            (_, true) => Ok((key, Algorithm::ES384)),
            _ => Err(KeyError::UnsupportedCurve),
        };
    }
    Err(KeyError::Unsupported)
}

/// The DER bytes of the first PEM block.
fn pem_body(text: &str) -> Option<Vec<u8>> {
    let body: String = text
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN "))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END "))
        .map(str::trim)
        .collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
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
    use serde_json::json;

    const RSA_PUBLIC: &str = include_str!("../tests/fixtures/jwt/rsa-public.pem");
    const RSA_PRIVATE: &str = include_str!("../tests/fixtures/jwt/rsa-private.pem");
    const EC_PUBLIC: &str = include_str!("../tests/fixtures/jwt/ec-public.pem");
    const EC_PRIVATE: &str = include_str!("../tests/fixtures/jwt/ec-private.pem");
    const ED_PUBLIC: &str = include_str!("../tests/fixtures/jwt/ed25519-public.pem");
    const ED_PRIVATE: &str = include_str!("../tests/fixtures/jwt/ed25519-private.pem");
    const P384_PUBLIC: &str = include_str!("../tests/fixtures/jwt/ec-p384-public.pem");

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    fn claims(extra: serde_json::Value) -> serde_json::Value {
        let mut c = json!({"sub": "alice", "exp": unix_now() + 600});
        for (k, v) in extra.as_object().expect("object") {
            if v.is_null() {
                c.as_object_mut().expect("object").remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    }

    fn sign(alg: Algorithm, key: &EncodingKey, claims: &serde_json::Value) -> String {
        jsonwebtoken::encode(&Header::new(alg), claims, key).expect("sign")
    }

    /// A token with a hand-written header, signed with `secret` (HS256 maths).
    fn with_header(header: serde_json::Value, claims: &serde_json::Value, secret: &[u8]) -> String {
        let message = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let signature = jsonwebtoken::crypto::sign(
            message.as_bytes(),
            &EncodingKey::from_secret(secret),
            Algorithm::HS256,
        )
        .expect("sign");
        format!("{message}.{signature}")
    }

    #[test]
    fn secret_round_trip_and_rejections_in_msgbufs_words() {
        let auth = Auth::new("s3cret", None, None);
        let token = auth
            .mint("alice", true, Duration::from_secs(60))
            .expect("mint");
        let claims = auth.verify(&token).expect("verify");
        assert_eq!(claims.sub, "alice");
        assert!(claims.is_admin());

        let other = Auth::new("other", None, None);
        assert_eq!(
            other.verify(&token).expect_err("refused"),
            AuthError::SignatureInvalid
        );
        let payload = token.split('.').nth(1).expect("payload");
        let none = format!("{}.{payload}.", b64(br#"{"alg":"none","typ":"JWT"}"#));
        assert_eq!(
            auth.verify(&none).expect_err("refused"),
            AuthError::AlgorithmNotAllowed
        );
        assert_eq!(
            auth.verify("garbage").expect_err("refused"),
            AuthError::Malformed
        );
        // Correctly signed, but the payload is not JSON.
        let message = format!("{}.{}", b64(br#"{"alg":"HS256"}"#), b64(b"not json"));
        let signature = jsonwebtoken::crypto::sign(
            message.as_bytes(),
            &EncodingKey::from_secret(b"s3cret"),
            Algorithm::HS256,
        )
        .expect("sign");
        assert_eq!(
            auth.verify(&format!("{message}.{signature}"))
                .expect_err("refused"),
            AuthError::Malformed
        );

        let key = EncodingKey::from_secret(b"s3cret");
        let expired = sign(Algorithm::HS256, &key, &claims_at(-3600));
        assert_eq!(
            auth.verify(&expired).expect_err("refused"),
            AuthError::Expired
        );
        let no_exp = sign(Algorithm::HS256, &key, &json!({"sub": "alice"}));
        assert_eq!(
            auth.verify(&no_exp).expect_err("refused"),
            AuthError::MissingExp
        );
        assert_eq!(AuthError::MissingExp.to_string(), "token missing exp");
    }

    fn claims_at(exp_offset: i64) -> serde_json::Value {
        json!({"sub": "alice", "exp": (unix_now() as i64 + exp_offset)})
    }

    #[test]
    fn nbf_is_enforced_with_the_documented_leeway() {
        let auth = Auth::new("s3cret", None, None);
        let key = EncodingKey::from_secret(b"s3cret");
        let later = sign(
            Algorithm::HS256,
            &key,
            &claims(json!({"nbf": unix_now() + LEEWAY_SECS + 60})),
        );
        assert_eq!(
            auth.verify(&later).expect_err("refused"),
            AuthError::NotYetValid
        );
        let now = sign(Algorithm::HS256, &key, &claims(json!({"nbf": unix_now()})));
        assert!(auth.verify(&now).is_ok());
        let just_expired = sign(
            Algorithm::HS256,
            &key,
            &claims_at(-(LEEWAY_SECS as i64) - 2),
        );
        assert_eq!(
            auth.verify(&just_expired).expect_err("refused"),
            AuthError::Expired
        );
    }

    #[test]
    fn a_crit_header_is_refused_even_when_correctly_signed() {
        let auth = Auth::new("s3cret", None, None);
        let token = with_header(
            json!({"alg": "HS256", "typ": "JWT", "crit": ["exp"]}),
            &claims(json!({})),
            b"s3cret",
        );
        assert_eq!(
            auth.verify(&token).expect_err("refused"),
            AuthError::CriticalHeader
        );
        let plain = with_header(json!({"alg": "HS256"}), &claims(json!({})), b"s3cret");
        assert!(auth.verify(&plain).is_ok(), "the same token without crit");
    }

    #[test]
    fn audience_and_issuer_when_configured() {
        let scoped = Auth::new("s3cret", Some("chat".into()), Some("issuer-1".into()));
        let token = scoped
            .mint("alice", false, Duration::from_secs(60))
            .expect("mint");
        assert!(scoped.verify(&token).is_ok(), "matching aud/iss");
        let key = EncodingKey::from_secret(b"s3cret");
        let no_aud = sign(Algorithm::HS256, &key, &claims(json!({"iss": "issuer-1"})));
        assert_eq!(
            scoped.verify(&no_aud).expect_err("refused"),
            AuthError::AudienceNotAllowed
        );
        let no_iss = sign(Algorithm::HS256, &key, &claims(json!({"aud": "chat"})));
        assert_eq!(
            scoped.verify(&no_iss).expect_err("refused"),
            AuthError::IssuerNotAllowed
        );
        let other_aud = Auth::new("s3cret", Some("other".into()), Some("issuer-1".into()));
        assert_eq!(
            other_aud.verify(&token).expect_err("refused"),
            AuthError::AudienceNotAllowed
        );
        let other_iss = Auth::new("s3cret", Some("chat".into()), Some("issuer-2".into()));
        assert_eq!(
            other_iss.verify(&token).expect_err("refused"),
            AuthError::IssuerNotAllowed
        );
        let many = sign(
            Algorithm::HS256,
            &key,
            &claims(json!({"aud": ["chat", "billing"], "iss": "issuer-1"})),
        );
        assert!(scoped.verify(&many).is_ok(), "aud as an array");
    }

    #[test]
    fn each_public_key_type_pins_its_algorithm() {
        let cases = [
            (
                RSA_PUBLIC,
                Algorithm::RS256,
                EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()),
            ),
            (
                EC_PUBLIC,
                Algorithm::ES256,
                EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()),
            ),
            (
                ED_PUBLIC,
                Algorithm::EdDSA,
                EncodingKey::from_ed_pem(ED_PRIVATE.as_bytes()),
            ),
        ];
        for (public, alg, private) in cases {
            let private = private.expect("private key");
            let auth = Auth::from_public_key_pem(public.as_bytes(), None, Some("idp".into()))
                .expect("public key");
            assert_eq!(auth.algorithm(), alg);
            let good = sign(alg, &private, &claims(json!({"iss": "idp"})));
            assert_eq!(auth.verify(&good).expect("verify").sub, "alice", "{alg:?}");
            let no_iss = sign(alg, &private, &claims(json!({})));
            assert_eq!(
                auth.verify(&no_iss).expect_err("refused"),
                AuthError::IssuerNotAllowed
            );
            let no_exp = sign(alg, &private, &claims(json!({"iss": "idp", "exp": null})));
            assert_eq!(
                auth.verify(&no_exp).expect_err("refused"),
                AuthError::MissingExp
            );
            let expired = sign(
                alg,
                &private,
                &claims(json!({"iss": "idp", "exp": unix_now() - 3600})),
            );
            assert_eq!(
                auth.verify(&expired).expect_err("refused"),
                AuthError::Expired
            );

            // Algorithm confusion: HS256 keyed with the public key's PEM, as a verifier
            // that takes the algorithm from the header would accept.
            let confused = sign(
                Algorithm::HS256,
                &EncodingKey::from_secret(public.as_bytes()),
                &claims(json!({"iss": "idp"})),
            );
            assert_eq!(
                auth.verify(&confused).expect_err("refused"),
                AuthError::AlgorithmNotAllowed
            );
            let payload = good.split('.').nth(1).expect("payload");
            let none = format!("{}.{payload}.", b64(br#"{"alg":"none"}"#));
            assert_eq!(
                auth.verify(&none).expect_err("refused"),
                AuthError::AlgorithmNotAllowed
            );
            assert_eq!(
                auth.mint("alice", false, Duration::from_secs(60))
                    .expect_err("refused"),
                AuthError::CannotMint
            );
        }
        // The same family, another algorithm: an RS384 token for an RS256 key.
        let rsa = Auth::from_public_key_pem(RSA_PUBLIC.as_bytes(), None, None).expect("rsa");
        let rs384 = sign(
            Algorithm::RS384,
            &EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).expect("rsa private"),
            &claims(json!({})),
        );
        assert_eq!(
            rsa.verify(&rs384).expect_err("refused"),
            AuthError::AlgorithmNotAllowed
        );
        // A signature by another key of the right type.
        let ec = Auth::from_public_key_pem(EC_PUBLIC.as_bytes(), None, None).expect("ec");
        let by_ed = with_header(json!({"alg": "ES256"}), &claims(json!({})), b"x");
        assert_eq!(
            ec.verify(&by_ed).expect_err("refused"),
            AuthError::SignatureInvalid
        );
    }

    #[test]
    fn key_files_that_are_not_public_keys_are_refused_with_a_reason() {
        let p384 = Auth::from_public_key_pem(P384_PUBLIC.as_bytes(), None, None).expect("p384");
        assert_eq!(p384.algorithm(), Algorithm::ES384);
        let private = Auth::from_public_key_pem(RSA_PRIVATE.as_bytes(), None, None)
            .err()
            .expect("a private key is refused");
        assert!(private.to_string().contains("private key"), "{private}");
        assert!(Auth::from_public_key_pem(b"s3cret", None, None).is_err());
    }

    #[test]
    fn user_ids() {
        assert!(!is_valid_user_id("a b"));
        assert!(!is_valid_user_id(""));
        assert!(is_valid_user_id("bob@example.com"));
    }
}
