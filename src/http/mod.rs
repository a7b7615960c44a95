//! The HTTP API (PROTOCOL.md section 7) and the WebSocket endpoint, on one axum router.
//!
//! Owns request parsing, JSON errors and status codes. Talks to the log for publishing and
//! history, and hands upgraded WebSocket connections to [`crate::session::ws`]. Never logs a
//! token: request logging redacts `access_token`.

mod cors;
pub mod listener;
mod publish;
mod upload;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::app::App;
use crate::auth::{mint_hs256, Claims, Grant};
use crate::close::Refusal;
use crate::log::ReadOutcome;
use crate::metrics::TextFormat;
use crate::model::{parse_org_list, OrgId, Position};
use crate::session::{redact_query, ws::WsStreamSession};
use crate::time::unix_secs;

/// The browser client and the demo page, built into the binary (`client/` in the repository).
const CLIENT_JS: &str = include_str!("../../client/edgestream.js");
const CLIENT_DTS: &str = include_str!("../../client/edgestream.d.ts");
const DEMO_PAGE: &str = include_str!("../../client/index.html");

fn static_file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// An error answered as `{"error": "..."}` with a status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> Self {
        ApiError::new(crate::close::status(r.code), r.reason)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

/// What the admin listener serves (`--admin-listen`): metrics and health only.
pub fn admin_router(app: Arc<App>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/v1/metrics", get(metrics_json))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "the admin listener serves /metrics, /v1/metrics, /healthz and /readyz",
            )
        })
        .layer(middleware::from_fn(json_errors))
        .with_state(app)
}

/// The router of a server.
pub fn router(app: Arc<App>) -> Router {
    let mut r = Router::new()
        .route("/v1/orgs/{org}/events", post(publish::publish).get(history))
        .route("/v1/events", post(publish::publish_batch))
        .route("/v1/orgs/{org}/presence", get(org_presence))
        .route("/v1/orgs/{org}/uploads", axum::routing::put(upload::put))
        .route("/v1/uploads/{id}", get(upload::status))
        .route("/v1/orgs/{org}/rooms/{room}", get(room_view))
        .route("/v1/stream", get(stream))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/v1/info", get(info))
        .route("/v1/cert-hash", get(cert_hash))
        .route(
            "/edgestream.js",
            get(|| async { static_file("text/javascript; charset=utf-8", CLIENT_JS) }),
        )
        .route(
            "/edgestream.d.ts",
            get(|| async { static_file("application/typescript; charset=utf-8", CLIENT_DTS) }),
        );
    if app.dev_secret.is_some() {
        r = r.route("/v1/dev/token", get(dev_token));
    }
    // With an admin listener, the metrics are served there only.
    if app.config.admin_listen.is_none() {
        r = r
            .route("/metrics", get(metrics_text))
            .route("/v1/metrics", get(metrics_json));
    }
    if app.config.demo {
        r = r.route(
            "/",
            get(|| async { static_file("text/html; charset=utf-8", DEMO_PAGE) }),
        );
    }
    r.fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .layer(middleware::from_fn_with_state(app.clone(), timed_bodies))
        .layer(middleware::from_fn(json_errors))
        .layer(middleware::from_fn_with_state(
            app.clone(),
            close_when_leaving,
        ))
        .layer(middleware::from_fn_with_state(app.clone(), cors::cors))
        .layer(middleware::from_fn(log_request))
        .with_state(app)
}

/// Request bodies must arrive within `--http-body-timeout` (uploads: never pause longer).
async fn timed_bodies(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let upload = req.uri().path().ends_with("/uploads");
    let limit = app.config.http.body_timeout;
    next.run(req.map(|b| listener::timed_body(b, limit, upload)))
        .await
}

/// An error reading a request body: 408 when it did not arrive in time, else 400.
pub(crate) fn body_error(context: &str, e: &(dyn std::error::Error + 'static)) -> ApiError {
    if listener::is_body_timeout(e) {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!("{context}: body not received within the time limit (--http-body-timeout)"),
        )
    } else {
        ApiError::new(StatusCode::BAD_REQUEST, format!("{context}: {e}"))
    }
}

/// Every error answer is `{"error": "..."}`: the ones axum makes itself (a query or path it
/// cannot parse, 405, a body it refused) carry plain text, which is wrapped here.
async fn json_errors(req: Request, next: Next) -> Response {
    let res = next.run(req).await;
    let status = res.status();
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return res;
    }
    let (parts, body) = res.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let message = match String::from_utf8_lossy(&text).trim() {
        "" => status
            .canonical_reason()
            .unwrap_or("error")
            .to_ascii_lowercase(),
        t => t.to_string(),
    };
    let mut res = ApiError::new(status, message).into_response();
    // Keep what the answer said besides its body (`Allow` on a 405, for example).
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            res.headers_mut().insert(name.clone(), value.clone());
        }
    }
    res
}

/// Logs each request with `access_token` redacted.
async fn log_request(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(redact_query);
    let res = next.run(req).await;
    tracing::debug!(%method, %path, query = query.as_deref().unwrap_or(""), status = res.status().as_u16(), "http");
    res
}

/// The `Authorization: Bearer` token of a request (the scheme is case-insensitive).
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Verifies the request's token ([`crate::auth::request_token`]: header and query agree).
fn authenticate(app: &App, headers: &HeaderMap, query: Option<&str>) -> Result<Grant, ApiError> {
    let token =
        crate::auth::request_token(bearer(headers), query.unwrap_or("")).map_err(Refusal::from)?;
    Ok(app.env.auth.verify(&token).map_err(Refusal::from)?)
}

fn org_param(org: &str) -> Result<OrgId, ApiError> {
    Ok(OrgId::parse(org).map_err(Refusal::from)?)
}

#[derive(Deserialize)]
struct HistoryQuery {
    since: Option<String>,
    limit: Option<usize>,
}

/// Most events one history read returns.
const HISTORY_MAX: usize = 1000;

/// The org, for a token that may read its presence (named, not `*`; subscribe or chat).
fn granted_org(app: &App, org: &str, headers: &HeaderMap, uri: &Uri) -> Result<OrgId, ApiError> {
    let org = org_param(org)?;
    let grant = authenticate(app, headers, uri.query())?;
    grant.check_presence(&org).map_err(Refusal::from)?;
    Ok(org)
}

/// `?limit=N&after=SUB` of the member routes.
#[derive(Deserialize)]
struct PageQuery {
    limit: Option<usize>,
    after: Option<String>,
}

/// Members per page: the default and the most.
const PAGE_MAX: usize = 1000;

impl PageQuery {
    fn limit(&self) -> Result<usize, ApiError> {
        match self.limit {
            Some(0) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "limit must be 1 to 1000",
            )),
            l => Ok(l.unwrap_or(PAGE_MAX).min(PAGE_MAX)),
        }
    }
}

/// `GET /v1/orgs/{org}/presence?limit=N&after=SUB`: a page of the users online in the org (on
/// every node sharing the log), in `sub` order; `next` continues it.
async fn org_presence(
    State(app): State<Arc<App>>,
    Path(org): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    Query(q): Query<PageQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let org = granted_org(&app, &org, &headers, &uri)?;
    let limit = q.limit()?;
    let r = app
        .env
        .presence
        .room(&org, "", q.after.as_deref(), limit)
        .await;
    Ok(Json(json!({
        "org": org.as_str(),
        "online": r.online,
        "users": r.members.iter().map(|(sub, n)| json!({"sub": sub, "sessions": n})).collect::<Vec<_>>(),
        "next": r.next,
    })))
}

/// `GET /v1/orgs/{org}/rooms/{room}?limit=N&after=SUB`: a room's chat figures and a page of
/// its members (on every node sharing the log); `next` continues it.
async fn room_view(
    State(app): State<Arc<App>>,
    Path((org, room)): Path<(String, String)>,
    headers: HeaderMap,
    uri: Uri,
    Query(q): Query<PageQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let org = granted_org(&app, &org, &headers, &uri)?;
    if OrgId::parse(&room).is_err() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid room: 1 to 64 bytes of [A-Za-z0-9_.-]",
        ));
    }
    let limit = q.limit()?;
    let r = app
        .env
        .presence
        .room(&org, &room, q.after.as_deref(), limit)
        .await;
    let members: Vec<&str> = r.members.iter().map(|(m, _)| m.as_str()).collect();
    Ok(Json(json!({
        "org": org.as_str(), "room": room, "online": r.online, "members": members,
        "next": r.next, "messages": r.messages, "last_message_ts": r.last_message_ts,
    })))
}

/// `GET /v1/orgs/{org}/events?since=epoch:seq&limit=N`: retained events after a position. An
/// unusable position gives `reset: true` and the events from the oldest retained.
async fn history(
    State(app): State<Arc<App>>,
    Path(org): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    Query(q): Query<HistoryQuery>,
) -> Result<Response, ApiError> {
    let org = org_param(&org)?;
    let grant = authenticate(&app, &headers, uri.query())?;
    grant.check_subscribe(&org).map_err(Refusal::from)?;
    // `limit=0` answers the position (epoch, head, reset) with no events.
    let want = q.limit.unwrap_or(100).min(HISTORY_MAX);
    let limit = want.max(1);
    let since = q
        .since
        .as_deref()
        .map(Position::parse)
        .transpose()
        .map_err(Refusal::from)?;
    let log = app.env.hub.log();
    let state = log.state(&org).await.map_err(Refusal::from)?;
    let oldest = Position {
        epoch: state.epoch.clone(),
        seq: state.first - 1,
    };
    let (reset, outcome) = match since {
        None => (false, log.read(&org, &oldest, limit).await),
        Some(p) => match log.read(&org, &p, limit).await.map_err(Refusal::from)? {
            ReadOutcome::Unusable { .. } => (true, log.read(&org, &oldest, limit).await),
            events => (false, Ok(events)),
        },
    };
    let (state, mut events) = match outcome.map_err(Refusal::from)? {
        ReadOutcome::Events { state, events } => (state, events),
        ReadOutcome::Unusable { state } => (state, Vec::new()),
    };
    events.truncate(want);
    // Built by hand: payloads are embedded verbatim, never re-parsed (a stored payload may be
    // valid JSON that serde_json cannot hold as a value, e.g. `1e99999` or a lone surrogate).
    let mut body =
        String::with_capacity(96 + events.iter().map(|e| e.payload.len() + 48).sum::<usize>());
    let _ = write!(
        body,
        r#"{{"org":{},"epoch":{},"head":{},"reset":{reset},"events":["#,
        json!(org.as_str()),
        json!(state.epoch.as_str()),
        state.head
    );
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        // Logged payloads were validated as JSON text, so they are UTF-8.
        let data = std::str::from_utf8(&e.payload).unwrap_or("null");
        let _ = write!(body, r#"{{"seq":{},"ts":{},"data":{data}}}"#, e.seq, e.ts);
    }
    body.push_str("]}");
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// While the node stops (`--drain-delay`) or drains, HTTP answers carry `Connection: close`,
/// so that keep-alive clients (publishers) open their next connection through the balancer,
/// to another node, before this one closes its listener.
async fn close_when_leaving(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    if app.leaving() && res.status() != StatusCode::SWITCHING_PROTOCOLS {
        res.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    res
}

/// `GET /v1/stream`: the WebSocket transport. The `Origin` check is the only refusal before
/// the upgrade (HTTP 403); everything else is a close code after it.
async fn stream(State(app): State<Arc<App>>, mut req: Request) -> Response {
    if !app.origins.allows(req.headers()) {
        return ApiError::new(StatusCode::FORBIDDEN, "origin not allowed").into_response();
    }
    if app.draining.load(Ordering::Acquire) {
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "draining").into_response();
    }
    let started = tokio::time::Instant::now();
    let query = req.uri().query().unwrap_or("").to_owned();
    let bearer = bearer(req.headers()).map(str::to_owned);
    let engine = crate::metrics::Engine::from_user_agent(
        req.headers()
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok()),
    );
    let (response, on_upgrade) = match edgestream_ws::upgrade(&mut req) {
        Ok(ok) => ok,
        Err(e) => return ApiError::new(e.status(), e.to_string()).into_response(),
    };
    let env = app.env.clone();
    let ws_config = app.ws.clone();
    // The TCP connection's permit (--max-connections) stays with it for the session's life.
    let permit = req
        .extensions()
        .get::<listener::ConnectionPermit>()
        .and_then(|p| p.take());
    let span = crate::session::session_span("websocket");
    app.sessions.spawn(tracing::Instrument::instrument(
        async move {
            let _permit = permit;
            let Ok(upgraded) = on_upgrade.await else {
                return;
            };
            let session = WsStreamSession::new(env, &query, bearer.as_deref(), engine, started);
            // The query holds the token: free it for the session's life.
            drop((query, bearer));
            let end = edgestream_ws::pump::run(upgraded, session, &ws_config).await;
            tracing::debug!(?end, "websocket session ended");
        },
        span,
    ));
    response.map(|()| axum::body::Body::empty())
}

async fn metrics_text(State(app): State<Arc<App>>, headers: HeaderMap) -> impl IntoResponse {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = TextFormat::negotiate(accept);
    let body = app
        .env
        .metrics
        .render_text(app.env.hub.log().usage(), app.leaving(), format);
    ([(header::CONTENT_TYPE, format.content_type())], body)
}

async fn metrics_json(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    let mut v = app
        .env
        .metrics
        .to_json(app.env.hub.log().usage(), app.leaving());
    v["log_backend"] = json!(app.env.hub.log().kind());
    let (rooms, users) = app.env.presence.counts();
    v["presence"] = json!({"rooms": rooms, "users": users});
    Json(v)
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    if app.leaving() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining"})),
        )
            .into_response()
    } else if let Err(e) =
        tokio::time::timeout(std::time::Duration::from_secs(3), app.env.hub.log().ready())
            .await
            .unwrap_or_else(|_| Err(crate::log::LogError::Unavailable("no answer in 3 s".into())))
    {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "log unavailable", "reason": e.to_string()})),
        )
            .into_response()
    } else {
        Json(json!({"status": "ready"})).into_response()
    }
}

/// The host part of a `Host` header when it is a plain DNS name or IP literal (anything else,
/// e.g. a header crafted to inject into the URLs below, is not used).
fn plain_host(host: &str) -> Option<&str> {
    let name = match host.strip_prefix('[') {
        Some(_) => host.split_once(']').map(|(a, _)| &host[..a.len() + 1])?,
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    let ok = !name.is_empty()
        && name.len() <= 253
        && (name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            || (name.starts_with('[')
                && name[1..name.len() - 1]
                    .parse::<std::net::Ipv6Addr>()
                    .is_ok()));
    ok.then_some(name)
}

/// `GET /v1/info`: how a client reaches this node: the configured public URLs, else the host
/// the client used (when it is a plain name or address) with this node's ports. Never cached,
/// since it may depend on the request's `Host`.
async fn info(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(plain_host)
        .map(str::to_owned)
        .unwrap_or_else(|| match app.http_addr.ip() {
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        });
    let cert_hash = app
        .certs
        .dev_hash()
        .map(|h| json!({"algorithm": "sha-256", "value": h}));
    let body = Json(json!({
        "webtransport": app.config.public_webtransport_url.clone()
            .unwrap_or_else(|| format!("https://{host}:{}/v1/stream", app.quic_addr.port())),
        "websocket": app.config.public_websocket_url.clone()
            .unwrap_or_else(|| {
                let scheme = if app.config.http_tls { "wss" } else { "ws" };
                format!("{scheme}://{host}:{}/v1/stream", app.http_addr.port())
            }),
        "cert_hash": cert_hash,
        "heartbeat_ms": app.env.limits.heartbeat.as_millis() as u64,
        "webtransport_share": app.config.webtransport_share,
    }));
    ([(header::CACHE_CONTROL, "no-store")], body).into_response()
}

/// `GET /v1/cert-hash`: the development certificate's hash (404 with a configured one).
async fn cert_hash(State(app): State<Arc<App>>) -> Result<Json<serde_json::Value>, ApiError> {
    match app.certs.dev_hash() {
        Some(h) => Ok(Json(json!({"algorithm": "sha-256", "value": h}))),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "a CA-issued certificate is configured",
        )),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn plain_hosts() {
        use super::plain_host;
        assert_eq!(
            plain_host("edge.example.com:8080"),
            Some("edge.example.com")
        );
        assert_eq!(plain_host("[::1]:8080"), Some("[::1]"));
        assert_eq!(plain_host("10.0.0.1"), Some("10.0.0.1"));
        for bad in ["evil.com/x?", "a b", "evil.com\"", "[zz]:1", "", "a@b"] {
            assert_eq!(plain_host(bad), None, "{bad}");
        }
    }

    #[test]
    fn loopback_hosts() {
        for h in [
            "localhost",
            "localhost:8080",
            "LOCALHOST.",
            "app.localhost:1",
            "127.0.0.1",
            "127.1.2.3:80",
            "[::1]",
            "[::1]:8080",
            "[::ffff:127.0.0.1]:8080",
        ] {
            assert!(super::is_loopback_host(h), "{h}");
        }
        for h in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "10.0.0.1",
            "[::2]",
            "",
            "[::1",
            "127.0.0.1.nip.io",
        ] {
            assert!(!super::is_loopback_host(h), "{h}");
        }
    }
}

#[derive(Deserialize)]
struct DevTokenQuery {
    sub: Option<String>,
    orgs: Option<String>,
    scope: Option<String>,
    ttl: Option<String>,
}

/// Whether a `Host` header names this machine: `localhost` (or a name under it), a loopback
/// IPv4 address or `[::1]`, with or without a port. A page on another name that resolves here
/// (DNS rebinding) sends its own name.
fn is_loopback_host(host: &str) -> bool {
    let Some(name) = plain_host(host) else {
        return false;
    };
    let name = name.trim_start_matches('[').trim_end_matches([']', '.']);
    let name = name.to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// Headers a forwarding proxy adds: a request that carries one came from elsewhere.
const FORWARDING_HEADERS: [&str; 5] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-real-ip",
    "via",
];

/// `GET /v1/dev/token`: development mode only, for clients on this machine only: a loopback
/// peer (IPv4-mapped included), a loopback `Host` and no forwarding headers.
async fn dev_token(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<DevTokenQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let local_host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .is_some_and(is_loopback_host);
    let forwarded = FORWARDING_HEADERS.iter().any(|h| headers.contains_key(*h));
    if !peer.ip().to_canonical().is_loopback() || !local_host || forwarded {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "development tokens are for clients on this machine only (loopback peer and Host, \
             no forwarding headers)",
        ));
    }
    let secret = app
        .dev_secret
        .as_ref()
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "no such route"))?;
    let orgs = parse_org_list(q.orgs.as_deref().unwrap_or(""), app.env.limits.max_orgs)
        .map_err(Refusal::from)?;
    let ttl = match q.ttl.as_deref() {
        Some(t) => humantime::parse_duration(t)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("ttl: {e}")))?,
        None => std::time::Duration::from_secs(3600),
    };
    let sub = q
        .sub
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "dev".into());
    let exp = unix_secs()
        .checked_add(ttl.as_secs())
        .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "ttl: too large"))?;
    let claims = Claims {
        sub,
        exp,
        nbf: None,
        orgs: orgs.iter().map(|o| o.to_string()).collect(),
        scope: Some(q.scope.unwrap_or_else(|| "subscribe publish".into())),
        iss: None,
        aud: None,
    };
    Ok(Json(json!({ "token": mint_hs256(secret, &claims) })))
}
