//! The HTTP API (PROTOCOL.md section 7) and the WebSocket endpoint, on one axum router.
//!
//! Owns request parsing, JSON errors and status codes. Talks to the log for publishing and
//! history, and hands upgraded WebSocket connections to [`crate::session::ws`]. Never logs a
//! token: request logging redacts `access_token`.

mod publish;
mod upload;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::auth::{mint_hs256, Claims, Grant};
use crate::close::Refusal;
use crate::log::ReadOutcome;
use crate::model::{parse_org_list, OrgId, Position};
use crate::server::App;
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
        ApiError::new(r.code.status(), r.reason)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

/// The router of a server.
pub fn router(app: Arc<App>) -> Router {
    let mut r = Router::new()
        .route("/v1/orgs/{org}/events", post(publish::publish).get(history))
        .route("/v1/orgs/{org}/presence", get(org_presence))
        .route("/v1/orgs/{org}/uploads", axum::routing::put(upload::put))
        .route("/v1/uploads/{id}", get(upload::status))
        .route("/v1/orgs/{org}/rooms/{room}", get(room_view))
        .route("/v1/stream", get(stream))
        .route("/metrics", get(metrics_text))
        .route("/v1/metrics", get(metrics_json))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/v1/info", get(info))
        .route("/v1/cert-hash", get(cert_hash))
        .route(
            "/",
            get(|| async { static_file("text/html; charset=utf-8", DEMO_PAGE) }),
        )
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
    r.fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .layer(middleware::from_fn(log_request))
        .with_state(app)
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

/// The bearer token of a request: `Authorization: Bearer`, else `access_token` in the query.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

fn authenticate(
    app: &App,
    headers: &HeaderMap,
    query_token: Option<&str>,
) -> Result<Grant, ApiError> {
    let token = bearer(headers).or(query_token).unwrap_or_default();
    Ok(app.env.auth.verify(token).map_err(Refusal::from)?)
}

fn org_param(org: &str) -> Result<OrgId, ApiError> {
    Ok(OrgId::parse(org).map_err(Refusal::from)?)
}

#[derive(Deserialize)]
struct HistoryQuery {
    since: Option<String>,
    limit: Option<usize>,
    access_token: Option<String>,
}

/// Most events one history read returns.
const HISTORY_MAX: usize = 1000;

/// A token in the query (browsers) for the presence routes.
#[derive(serde::Deserialize)]
struct TokenQuery {
    access_token: Option<String>,
}

/// The org named by a token that may subscribe to, chat in or publish to it.
fn granted_org(
    app: &App,
    org: &str,
    headers: &HeaderMap,
    token: Option<&str>,
) -> Result<OrgId, ApiError> {
    let org = org_param(org)?;
    let grant = authenticate(app, headers, token)?;
    if grant.check_subscribe(&org).is_err() {
        grant.check_chat(&org).map_err(Refusal::from)?;
    }
    Ok(org)
}

/// `GET /v1/orgs/{org}/presence`: the users online in the org (on every node sharing the log).
async fn org_presence(
    State(app): State<Arc<App>>,
    Path(org): Path<String>,
    headers: HeaderMap,
    Query(q): Query<TokenQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let org = granted_org(&app, &org, &headers, q.access_token.as_deref())?;
    let users = app.env.presence.org_users(&org).await;
    Ok(Json(json!({
        "org": org.as_str(),
        "online": users.len(),
        "users": users.iter().map(|(sub, n)| json!({"sub": sub, "sessions": n})).collect::<Vec<_>>(),
    })))
}

/// `GET /v1/orgs/{org}/rooms/{room}`: a room's members and chat figures (on every node sharing the log).
async fn room_view(
    State(app): State<Arc<App>>,
    Path((org, room)): Path<(String, String)>,
    headers: HeaderMap,
    Query(q): Query<TokenQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let org = granted_org(&app, &org, &headers, q.access_token.as_deref())?;
    if OrgId::parse(&room).is_err() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid room: 1 to 64 bytes of [A-Za-z0-9_.-]",
        ));
    }
    let r = app.env.presence.room(&org, &room).await;
    let members: Vec<&str> = r.members.iter().map(|(m, _)| m.as_str()).collect();
    Ok(Json(json!({
        "org": org.as_str(), "room": room, "online": members.len(), "members": members,
        "messages": r.messages, "last_message_ts": r.last_message_ts,
    })))
}

/// `GET /v1/orgs/{org}/events?since=epoch:seq&limit=N`: retained events after a position. An
/// unusable position gives `reset: true` and the events from the oldest retained.
async fn history(
    State(app): State<Arc<App>>,
    Path(org): Path<String>,
    headers: HeaderMap,
    Query(q): Query<HistoryQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let org = org_param(&org)?;
    let grant = authenticate(&app, &headers, q.access_token.as_deref())?;
    grant.check_subscribe(&org).map_err(Refusal::from)?;
    let limit = q.limit.unwrap_or(100).clamp(1, HISTORY_MAX);
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
    let (state, events) = match outcome.map_err(Refusal::from)? {
        ReadOutcome::Events { state, events } => (state, events),
        ReadOutcome::Unusable { state } => (state, Vec::new()),
    };
    let events: Vec<serde_json::Value> = events
        .iter()
        .map(|e| {
            let data: Box<serde_json::value::RawValue> = serde_json::from_slice(&e.payload)
                .unwrap_or_else(|_| {
                    serde_json::value::RawValue::from_string("null".into()).expect("valid")
                });
            json!({"seq": e.seq, "ts": e.ts, "data": data})
        })
        .collect();
    Ok(Json(json!({
        "org": org.as_str(),
        "epoch": state.epoch.as_str(),
        "head": state.head,
        "reset": reset,
        "events": events,
    })))
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
    let query = req.uri().query().unwrap_or("").to_owned();
    let bearer = bearer(req.headers()).map(str::to_owned);
    let (response, on_upgrade) = match edgestream_ws::upgrade(&mut req) {
        Ok(ok) => ok,
        Err(e) => return ApiError::new(e.status(), e.to_string()).into_response(),
    };
    let env = app.env.clone();
    let ws_config = app.ws.clone();
    app.sessions.spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let session = WsStreamSession::new(env, &query, bearer.as_deref());
        // The query holds the token: free it for the session's life.
        drop((query, bearer));
        let end = edgestream_ws::pump::run(upgraded, session, &ws_config).await;
        tracing::debug!(?end, "websocket session ended");
    });
    response.map(|()| axum::body::Body::empty())
}

async fn metrics_text(State(app): State<Arc<App>>) -> impl IntoResponse {
    let body = app.env.metrics.render_prometheus(
        app.env.hub.log().usage(),
        app.draining.load(Ordering::Acquire),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

async fn metrics_json(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    let mut v = app.env.metrics.to_json(
        app.env.hub.log().usage(),
        app.draining.load(Ordering::Acquire),
    );
    v["log_backend"] = json!(app.env.hub.log().kind());
    let (rooms, users) = app.env.presence.counts();
    v["presence"] = json!({"rooms": rooms, "users": users});
    Json(v)
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    if app.draining.load(Ordering::Acquire) {
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

/// `GET /v1/info`: how a client reaches this node.
async fn info(State(app): State<Arc<App>>, headers: HeaderMap) -> Json<serde_json::Value> {
    // The host the client used, with this node's ports.
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| h.rsplit_once(':').map_or(h, |(host, _)| host).to_owned())
        .unwrap_or_else(|| app.http_addr.ip().to_string());
    let cert_hash = app
        .certs
        .dev_hash()
        .map(|h| json!({"algorithm": "sha-256", "value": h}));
    Json(json!({
        "webtransport": app.config.public_webtransport_url.clone()
            .unwrap_or_else(|| format!("https://{host}:{}/v1/stream", app.quic_addr.port())),
        "websocket": app.config.public_websocket_url.clone()
            .unwrap_or_else(|| format!("ws://{host}:{}/v1/stream", app.http_addr.port())),
        "cert_hash": cert_hash,
        "heartbeat_ms": app.env.limits.heartbeat.as_millis() as u64,
    }))
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

#[derive(Deserialize)]
struct DevTokenQuery {
    sub: Option<String>,
    orgs: Option<String>,
    scope: Option<String>,
    ttl: Option<String>,
}

/// `GET /v1/dev/token`: development mode only, loopback clients only.
async fn dev_token(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(q): Query<DevTokenQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if !peer.ip().is_loopback() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "development tokens are for loopback clients only",
        ));
    }
    let secret = app
        .dev_secret
        .as_ref()
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "no such route"))?;
    let orgs = parse_org_list(q.orgs.as_deref().unwrap_or("")).map_err(Refusal::from)?;
    let ttl = match q.ttl.as_deref() {
        Some(t) => humantime::parse_duration(t)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("ttl: {e}")))?,
        None => std::time::Duration::from_secs(3600),
    };
    let sub = q
        .sub
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "dev".into());
    let claims = Claims {
        sub,
        exp: unix_secs() + ttl.as_secs(),
        nbf: None,
        orgs: orgs.iter().map(|o| o.to_string()).collect(),
        scope: Some(q.scope.unwrap_or_else(|| "subscribe publish".into())),
        iss: None,
        aud: None,
    };
    Ok(Json(json!({ "token": mint_hs256(secret, &claims) })))
}
