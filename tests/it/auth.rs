//! Tokens signed by an identity provider: msgbuf verifies them with its public key, with the
//! algorithm pinned to the key's type. Keys are generated here with the `openssl` CLI.

use std::path::Path;
use std::process::Command;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

use crate::common::*;

/// A fresh key pair of `kind` (`openssl genpkey` arguments) in `dir`: (private, public) PEM.
fn key_pair(dir: &Path, name: &str, genpkey: &[&str]) -> (Vec<u8>, std::path::PathBuf) {
    let private = dir.join(format!("{name}.pem"));
    let public = dir.join(format!("{name}.pub.pem"));
    let ok = Command::new("openssl")
        .arg("genpkey")
        .args(genpkey)
        .arg("-out")
        .arg(&private)
        .status()
        .expect("openssl (scripts/test installs it)")
        .success()
        && Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&private)
            .arg("-out")
            .arg(&public)
            .status()
            .expect("openssl")
            .success();
    assert!(ok, "openssl genpkey {genpkey:?}");
    (std::fs::read(&private).expect("private key"), public)
}

fn sign(alg: Algorithm, key: &EncodingKey, claims: serde_json::Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), &claims, key).expect("sign")
}

/// The status and the error message a REST call with `token` gets.
async fn answer(a: &Instance, token: &str) -> (u16, String) {
    let (status, body) = http_get(&a.http("/api/messages/buffered/alice"), Some(token)).await;
    let message = match status {
        200 => String::new(),
        _ => json(&body)["error"]["message"]
            .as_str()
            .expect("an error message")
            .to_owned(),
    };
    (status, message)
}

#[tokio::test]
async fn public_key_tokens_are_accepted_and_other_algorithms_are_refused() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("public_keys");
    let dir = tempfile::tempdir().expect("tmp");
    let cases = [
        (
            "rsa",
            Algorithm::RS256,
            vec!["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        ),
        (
            "ec",
            Algorithm::ES256,
            vec!["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
        ),
        ("ed25519", Algorithm::EdDSA, vec!["-algorithm", "ED25519"]),
    ];
    for (name, alg, genpkey) in cases {
        let (private, public) = key_pair(dir.path(), name, &genpkey);
        let private = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&private),
            Algorithm::ES256 => EncodingKey::from_ec_pem(&private),
            _ => EncodingKey::from_ed_pem(&private),
        }
        .expect("private key");
        let mut config = test_config(&rs, &db, &format!("A-{name}"));
        config.jwt_secret = None;
        config.jwt_public_key_file = Some(public.clone());
        config.jwt_audience = Some("chat".into());
        let a = Instance::start(config).await;
        let now = msgbuf::unix_now();
        let claims = |extra: serde_json::Value| {
            let mut c = json!({"sub": "alice", "exp": now + 600, "aud": "chat"});
            for (k, v) in extra.as_object().expect("object") {
                c[k] = v.clone();
            }
            c
        };

        let good = sign(alg, &private, claims(json!({})));
        assert_eq!(answer(&a, &good).await, (200, String::new()), "{name}");
        let mut ws = a
            .connect_with(&good)
            .await
            .unwrap_or_else(|e| panic!("{name}: a valid token opens a socket: {e}"));
        ws.join(T).await.expect("joined");

        // Algorithm confusion: HS256 keyed with the public key file itself.
        let pem = std::fs::read(&public).expect("public key");
        let confused = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(&pem),
            claims(json!({})),
        );
        let payload = good.split('.').nth(1).expect("payload");
        let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.");
        // The same claims signed by the test secret (HS256): the old key type is gone.
        let by_secret = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(SECRET.as_bytes()),
            claims(json!({})),
        );
        let refusals = [
            (confused, "token algorithm not allowed"),
            (none, "token algorithm not allowed"),
            (by_secret, "token algorithm not allowed"),
            (
                sign(alg, &private, claims(json!({"exp": now - 3600}))),
                "token expired",
            ),
            (
                sign(alg, &private, claims(json!({"nbf": now + 3600}))),
                "token not yet valid",
            ),
            (
                sign(alg, &private, claims(json!({"aud": "billing"}))),
                "token audience not allowed",
            ),
            (
                sign(alg, &private, json!({"sub": "alice", "aud": "chat"})),
                "token missing exp",
            ),
            ("not-a-token".to_owned(), "malformed token"),
        ];
        for (token, message) in refusals {
            assert_eq!(
                answer(&a, &token).await,
                (401, message.to_owned()),
                "{name}: {token}"
            );
        }
        a.stop().await;
    }

    // Both a secret and a public key: refused at start-up, naming both settings.
    let (_, public) = key_pair(dir.path(), "both", &["-algorithm", "ED25519"]);
    let output = msgbuf_command()
        .arg("serve")
        .env("MSGBUF_MONGODB_URI", &rs.uri)
        .env("MSGBUF_DB", &db)
        .env("MSGBUF_BIND", format!("127.0.0.1:{}", free_port()))
        .env("MSGBUF_JWT_SECRET", SECRET)
        .env("MSGBUF_JWT_PUBLIC_KEY_FILE", &public)
        .output()
        .expect("run msgbuf");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("MSGBUF_JWT_SECRET and MSGBUF_JWT_PUBLIC_KEY_FILE are both set"),
        "{stderr}"
    );
}
