//! Tokens for tests, signed with [`SECRET`].

use std::time::Duration;

use msgbuf::Auth;

pub const SECRET: &str = "test-secret";

pub fn auth() -> Auth {
    Auth::new(SECRET, None, None)
}

pub fn token(user: &str) -> String {
    auth()
        .mint(user, false, Duration::from_secs(3600))
        .expect("token")
}

pub fn admin_token(user: &str) -> String {
    auth()
        .mint(user, true, Duration::from_secs(3600))
        .expect("token")
}

/// A correctly signed token whose `exp` is an hour ago.
pub fn expired_token(user: &str) -> String {
    let claims = serde_json::json!({"sub": user, "exp": msgbuf::unix_now() - 3600});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("encode")
}
