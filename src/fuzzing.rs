//! The parsers of untrusted input as the fuzz targets (`fuzz/`) drive them, and as
//! `tests/fuzz_corpus.rs` replays their seeds and corpus: one copy of each harness (the
//! codec's are in `edgestream_codec::fuzzing`, so its targets build without the server). Each
//! takes arbitrary bytes and must neither panic nor hang; where a result can be checked
//! (a re-encoding, an invariant of what was accepted), it is.

use std::sync::OnceLock;

pub use edgestream_codec::fuzzing::{frame, json_client};

use crate::auth::{AuthConfig, Authenticator, JwtAlg};
use crate::model::OrgId;
use crate::session::ConnectParams;
use crate::upload::UploadRequest;

/// The `/v1/stream` query (orgs, since lists, enc, format): what is accepted is valid.
pub fn connect_query(data: &[u8]) {
    let query = String::from_utf8_lossy(data);
    if let Ok((orgs, since)) = ConnectParams::parse(&query, None).and_then(|p| p.lists(64)) {
        assert!(orgs.as_ref().is_none_or(|o| o.len() <= 64) && since.len() <= 64);
        for org in orgs.iter().flatten().chain(since.iter().map(|(o, _)| o)) {
            assert!(OrgId::parse(org.as_str()).is_ok(), "accepted org {org:?}");
        }
    }
}

const SECRET: &[u8] = b"fuzzing-secret-0123456789abcdef";

fn authenticator() -> &'static Authenticator {
    static AUTH: OnceLock<Authenticator> = OnceLock::new();
    AUTH.get_or_init(|| {
        Authenticator::new(&AuthConfig {
            alg: JwtAlg::HS256,
            key: SECRET.to_vec(),
            issuer: None,
            audience: None,
            leeway_secs: 30,
            kid: Some("k1".into()),
            max_lifetime_secs: Some(86_400),
        })
        .expect("valid config")
    })
}

/// JWT handling: the bytes as a token (headers, base64, signatures), and, when they are a
/// JSON value, as claims signed with the right key (so claim handling past the signature is
/// reached): whatever is accepted names a subject and only valid orgs.
pub fn jwt(data: &[u8]) {
    let auth = authenticator();
    let _ = auth.verify(&String::from_utf8_lossy(data));
    if let Ok(claims) = serde_json::from_slice::<serde_json::Value>(data) {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        header.kid = claims
            .get("kid")
            .and_then(|k| k.as_str())
            .map(str::to_owned);
        let Ok(token) = jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET),
        ) else {
            return;
        };
        if let Ok(grant) = auth.verify(&token) {
            assert!(!grant.sub.is_empty());
            for org in grant.orgs() {
                assert!(OrgId::parse(org.as_str()).is_ok());
            }
        }
    }
}

/// HTTP upload requests: `name`, `Upload-Id`, `Upload-Offset`, `Content-Length`, as the bytes
/// split at NUL; what is accepted has a usable name and id.
pub fn upload_request(data: &[u8]) {
    let mut parts = data.splitn(4, |b| *b == 0);
    let name = parts.next().map(String::from_utf8_lossy);
    let (id, offset, length) = (parts.next(), parts.next(), parts.next());
    if let Ok(r) = UploadRequest::parse(name.as_deref(), id, offset, length) {
        assert!(!r.name.is_empty() && !r.name.contains('/'));
        assert!(r.id.is_none_or(|id| !id.contains(['/', '.'])));
    }
}

/// A harness: arbitrary bytes in, a panic on a finding.
pub type Harness = fn(&[u8]);

/// The harness of each fuzz target, by its name.
pub const TARGETS: &[(&str, Harness)] = &[
    ("frame_decode", frame),
    ("json_client", json_client),
    ("connect_query", connect_query),
    ("jwt", jwt),
    ("upload_request", upload_request),
];
