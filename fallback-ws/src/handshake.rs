//! The RFC 6455 opening handshake on a hyper request, and the `Origin` allow-list.
//!
//! Never reads the request body and never decides anything about authentication: the session
//! authenticates after the upgrade, so that a browser can read the close code (PROTOCOL.md 3).

use base64::Engine as _;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use sha1::{Digest, Sha1};

/// Why a request cannot be upgraded to a WebSocket.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// Not a GET.
    #[error("WebSocket upgrade needs GET")]
    Method,
    /// `Connection: upgrade` / `Upgrade: websocket` missing.
    #[error("not a WebSocket upgrade request")]
    NotUpgrade,
    /// `Sec-WebSocket-Version` is not 13.
    #[error("unsupported WebSocket version (need 13)")]
    Version,
    /// `Sec-WebSocket-Key` missing.
    #[error("missing Sec-WebSocket-Key")]
    Key,
    /// The server did not hand over the connection (not HTTP/1.1, or already taken).
    #[error("connection cannot be upgraded")]
    NoUpgrade,
}

impl HandshakeError {
    /// The HTTP status to refuse with.
    pub fn status(&self) -> StatusCode {
        match self {
            HandshakeError::Method => StatusCode::METHOD_NOT_ALLOWED,
            HandshakeError::Version => StatusCode::UPGRADE_REQUIRED,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

/// The `Sec-WebSocket-Accept` value for a key (RFC 6455, section 4.2.2).
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// Validates an upgrade request and takes its connection.
///
/// Returns the `101 Switching Protocols` response to send and the future that yields the raw
/// connection once the response is written.
pub fn upgrade<B>(
    req: &mut Request<B>,
) -> Result<(Response<()>, hyper::upgrade::OnUpgrade), HandshakeError> {
    if req.method() != Method::GET {
        return Err(HandshakeError::Method);
    }
    let h = req.headers();
    if !header_has_token(h, header::CONNECTION, "upgrade")
        || !header_has_token(h, header::UPGRADE, "websocket")
    {
        return Err(HandshakeError::NotUpgrade);
    }
    if h.get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        return Err(HandshakeError::Version);
    }
    let key = h
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or(HandshakeError::Key)?;
    let accept = accept_key(key.as_bytes());
    if req
        .extensions()
        .get::<hyper::upgrade::OnUpgrade>()
        .is_none()
    {
        return Err(HandshakeError::NoUpgrade);
    }
    let on_upgrade = hyper::upgrade::on(req);
    let mut res = Response::new(());
    *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let rh = res.headers_mut();
    rh.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    rh.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    rh.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
    );
    Ok((res, on_upgrade))
}

/// Which browser origins may open sessions (PROTOCOL.md section 3).
///
/// Requests without an `Origin` header (non-browser clients) are always allowed.
#[derive(Debug, Clone)]
pub enum OriginPolicy {
    /// Every origin (development mode).
    AllowAll,
    /// Exactly these origins, compared case-insensitively (`https://app.example.com`).
    List(Vec<String>),
}

impl OriginPolicy {
    /// Whether a request with these headers may proceed.
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        let Some(origin) = headers.get(header::ORIGIN) else {
            return true;
        };
        match self {
            OriginPolicy::AllowAll => true,
            OriginPolicy::List(list) => {
                let Ok(origin) = origin.to_str() else {
                    return false;
                };
                let origin = origin.trim_end_matches('/');
                list.iter()
                    .any(|o| o.trim_end_matches('/').eq_ignore_ascii_case(origin))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6455_accept_example() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn origin_policy() {
        let mut h = HeaderMap::new();
        let list = OriginPolicy::List(vec!["https://app.example.com".into()]);
        assert!(list.allows(&h), "no Origin: not a browser, allowed");
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://APP.example.com"),
        );
        assert!(list.allows(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example.com"),
        );
        assert!(!list.allows(&h));
        assert!(OriginPolicy::AllowAll.allows(&h));
        h.insert(header::ORIGIN, HeaderValue::from_static("null"));
        assert!(!list.allows(&h));
    }

    #[test]
    fn rejects_non_upgrades() {
        let mut req = Request::builder().method("POST").body(()).unwrap();
        assert_eq!(upgrade(&mut req).unwrap_err(), HandshakeError::Method);
        let mut req = Request::builder().uri("/").body(()).unwrap();
        assert_eq!(upgrade(&mut req).unwrap_err(), HandshakeError::NotUpgrade);
        let mut req = Request::builder()
            .header("connection", "keep-alive, Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "8")
            .body(())
            .unwrap();
        assert_eq!(upgrade(&mut req).unwrap_err(), HandshakeError::Version);
    }
}
