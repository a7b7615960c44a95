//! CORS for the HTTP API, limited to `--allowed-origins` (every origin in development mode).
//!
//! A page on an allowed origin may read history, presence and upload records and may publish
//! and upload (`fetch` with an `Authorization` header needs a preflight). Tokens travel in
//! headers or the query, never in cookies, so credentials are never allowed and the allowed
//! origin is echoed, never `*`. A request from an origin that is not allowed gets no CORS
//! headers (the browser hides the answer) and its preflight a 403.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::ApiError;
use crate::app::App;

const ALLOW_METHODS: &str = "GET, POST, PUT, OPTIONS";
const ALLOW_HEADERS: &str =
    "authorization, content-type, idempotency-key, upload-id, upload-offset";
const EXPOSE_HEADERS: &str = "upload-id, upload-offset";

pub(super) async fn cors(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let Some(origin) = req.headers().get(header::ORIGIN).cloned() else {
        return next.run(req).await;
    };
    let allowed = app.origins.allows(req.headers());
    let preflight = req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut res = if preflight {
        if !allowed {
            return ApiError::new(StatusCode::FORBIDDEN, "origin not allowed").into_response();
        }
        let mut res = StatusCode::NO_CONTENT.into_response();
        let h = res.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(ALLOW_METHODS),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static(ALLOW_HEADERS),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        res
    } else {
        next.run(req).await
    };
    let h = res.headers_mut();
    h.append(header::VARY, HeaderValue::from_static("origin"));
    if allowed {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(EXPOSE_HEADERS),
        );
    }
    res
}
