//! JWT minting for tests, including deliberately broken tokens.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// Standard claims: `sub`, `orgs`, `scope`, `exp` one hour ahead.
pub fn claims(sub: &str, orgs: &[&str], scope: &str) -> Value {
    json!({ "sub": sub, "orgs": orgs, "scope": scope, "exp": now() + 3600 })
}

/// Signs arbitrary claims with HS256.
pub fn hs256(secret: &[u8], claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .expect("sign")
}

/// Signs with a PEM private key (`RS256`, `ES256` or `EdDSA`).
pub fn signed(alg: &str, private_pem: &[u8], claims: &Value) -> String {
    let (alg, key) = match alg {
        "RS256" => (Algorithm::RS256, EncodingKey::from_rsa_pem(private_pem)),
        "ES256" => (Algorithm::ES256, EncodingKey::from_ec_pem(private_pem)),
        "EdDSA" => (Algorithm::EdDSA, EncodingKey::from_ed_pem(private_pem)),
        other => panic!("unknown alg {other}"),
    };
    jsonwebtoken::encode(&Header::new(alg), claims, &key.expect("key")).expect("sign")
}

/// An unsigned token with `alg: none`.
pub fn alg_none(claims: &Value) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let body = b64.encode(serde_json::to_vec(claims).expect("json"));
    format!("{header}.{body}.")
}

/// A token whose signature differs in its first character (the last one may carry only
/// padding bits, which lenient decoders ignore).
pub fn tampered(token: &str) -> String {
    let dot = token.rfind('.').expect("a JWT has dots") + 1;
    let mut t = token.to_string();
    let first = t.as_bytes()[dot];
    let replacement = if first == b'A' { "B" } else { "A" };
    t.replace_range(dot..dot + 1, replacement);
    t
}

/// Signs with HS256 and a `kid` in the header.
pub fn hs256_with_kid(secret: &[u8], kid: &str, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(kid.to_string());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(secret)).expect("sign")
}
