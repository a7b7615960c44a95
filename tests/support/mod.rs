//! Shared helpers of the end-to-end tests: an in-process server on port 0 with a known secret,
//! tokens for it, and bounded polling of its metrics.

#![allow(dead_code)] // each test binary uses a different subset

pub mod nginx;
pub mod node;
pub mod redis;
pub mod relay;

use std::net::SocketAddr;
use std::time::Duration;

use edgestream::app::App;
use edgestream::config::{Config, ServeArgs};
use edgestream::server::Server;
use edgestream_testkit::{http::Api, token, ws::WsClient};
use serde_json::Value;
use std::sync::Arc;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use edgestream_testkit::HANG_GUARD;

/// A loopback TCP port free now, for a child process that must be told its port (redis-server,
/// nginx, a node restarted on the same address). The one copy of this in the tests.
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free TCP port")
}

/// A loopback UDP port free now (see [`free_tcp_port`]).
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("a free UDP port")
}

/// The Python with aioquic and prometheus_client: `target/python-venv` (scripts/test-all creates
/// it), or `EDGESTREAM_PYTHON`.
pub fn python() -> String {
    std::env::var("EDGESTREAM_PYTHON").unwrap_or_else(|_| {
        let p = concat!(env!("CARGO_MANIFEST_DIR"), "/target/python-venv/bin/python");
        assert!(
            std::path::Path::new(p).exists(),
            "{p} is missing: run scripts/test-all (it creates it) or `python3 -m venv \
             target/python-venv && target/python-venv/bin/pip install aioquic prometheus_client`"
        );
        p.to_string()
    })
}

/// Polls `check` every 20 ms until it returns `Some`, for at most [`HANG_GUARD`]; panics
/// naming `what` if it never does. The one bounded wait of the tests.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + HANG_GUARD;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened within {HANG_GUARD:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub const SECRET: &str = "test-secret-0123456789abcdef-xyz";

/// A subscribe+publish token for `orgs` (user `alice`) signed with [`SECRET`].
pub fn token(orgs: &[&str]) -> String {
    token::hs256(
        SECRET.as_bytes(),
        &token::claims("alice", orgs, "subscribe publish"),
    )
}

/// A token for `sub` with these orgs and scopes, signed with [`SECRET`].
pub fn token_for(sub: &str, orgs: &[&str], scope: &str) -> String {
    token::hs256(SECRET.as_bytes(), &token::claims(sub, orgs, scope))
}

pub struct TestServer {
    pub app: Arc<App>,
    pub addr: SocketAddr,
    /// `--admin-listen`'s address, when set.
    pub admin: Option<SocketAddr>,
    pub quic_addr: SocketAddr,
    pub api: Api,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    /// A server with HS256 [`SECRET`] and defaults otherwise.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// A server with HS256 [`SECRET`], adjusted by `f` (which may also clear the secret).
    pub async fn start_with(f: impl FnOnce(&mut ServeArgs)) -> Self {
        let mut args = ServeArgs {
            http_listen: Some("127.0.0.1:0".parse().unwrap()),
            quic_listen: Some("127.0.0.1:0".parse().unwrap()),
            jwt_secret: Some(SECRET.into()),
            // Tests that stop a node want the drain at once (one test sets a delay).
            drain_delay: Some("0s".parse().unwrap()),
            ..Default::default()
        };
        f(&mut args);
        let config = Config::resolve(args).expect("valid test config");
        let server = Server::bind(config).await.expect("bind");
        let addr = server.http_addr();
        let admin = server.admin_addr();
        let quic_addr = server.quic_addr();
        let app = server.app().clone();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        TestServer {
            app,
            addr,
            admin,
            quic_addr,
            api: Api::new(format!("http://{addr}")),
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn wt_url(&self, query: &str) -> String {
        format!(
            "https://127.0.0.1:{}/v1/stream?{query}",
            self.quic_addr.port()
        )
    }

    /// The development certificate's hash, as `/v1/cert-hash` reports it.
    pub async fn cert_hash(&self) -> String {
        let (st, v) = self
            .api
            .get("/v1/cert-hash", None)
            .await
            .expect("cert-hash");
        assert_eq!(st, 200, "{v}");
        v["value"].as_str().expect("value").to_string()
    }

    /// Connects a WebTransport client with a token for `orgs` and extra query parameters.
    pub async fn wt_client(&self, orgs: &[&str], extra: &str) -> edgestream_testkit::wt::WtClient {
        let q = format!("access_token={}&{extra}", self.token(orgs));
        edgestream_testkit::wt::connect(&self.wt_url(&q), &self.cert_hash().await)
            .await
            .expect("connect")
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/v1/stream?{query}", self.addr)
    }

    /// A subscribe+publish token for `orgs` (user `alice`).
    /// POSTs a multi-org publish (`POST /v1/events`); the status and the JSON answer.
    pub async fn publish_many(
        &self,
        tok: &str,
        body: impl Into<reqwest::Body>,
        key: Option<&str>,
    ) -> (u16, serde_json::Value) {
        let mut req = self
            .api
            .client
            .post(format!("{}/v1/events", self.api.base))
            .bearer_auth(tok)
            .header("content-type", "application/json")
            .body(body);
        if let Some(k) = key {
            req = req.header("idempotency-key", k);
        }
        let res = req.send().await.expect("POST /v1/events");
        let status = res.status().as_u16();
        (status, res.json().await.expect("a JSON answer"))
    }

    pub fn token(&self, orgs: &[&str]) -> String {
        token(orgs)
    }

    pub fn token_for(&self, sub: &str, orgs: &[&str], scope: &str) -> String {
        token::hs256(SECRET.as_bytes(), &token::claims(sub, orgs, scope))
    }

    /// Connects a WebSocket client with a token for `orgs` and extra query parameters.
    pub async fn client(&self, orgs: &[&str], extra: &str) -> WsClient {
        let q = format!("access_token={}&{extra}", self.token(orgs));
        WsClient::connect(&self.ws_url(&q)).await.expect("connect")
    }

    /// Publishes one batch of `{"i": i}` for each `i` in `range`; returns the answer.
    pub async fn publish_numbered(
        &self,
        token: &str,
        org: &str,
        range: impl Iterator<Item = u64>,
    ) -> Value {
        let batch: Vec<Value> = range.map(|i| serde_json::json!({ "i": i })).collect();
        self.api
            .publish(token, org, &Value::Array(batch))
            .await
            .expect("publish")
    }

    pub async fn metrics(&self) -> Value {
        self.api.get("/v1/metrics", None).await.expect("metrics").1
    }

    /// Polls `/v1/metrics` until `cond` holds (bounded: fails after the hang guard).
    pub async fn wait_metrics(&self, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
        let what = format!("metrics showing {what}");
        eventually(&what, || async {
            let m = self.metrics().await;
            cond(&m).then_some(m)
        })
        .await
    }

    /// Triggers the graceful shutdown and waits for `run` to return.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.begin_stop();
        self.join().await
    }

    pub fn begin_stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    pub async fn join(&mut self) -> anyhow::Result<()> {
        match self.task.take() {
            Some(t) => tokio::time::timeout(HANG_GUARD, t).await??,
            None => Ok(()),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.begin_stop();
    }
}

/// Waits for SUBSCRIBED (binary or JSON) on a WebSocket; anything else first fails.
pub async fn subscribed(c: &mut WsClient) {
    use edgestream_codec::Frame;
    use edgestream_testkit::ws::Msg;
    match c.next_non_heartbeat().await.unwrap() {
        Msg::Frame(Frame::Subscribed { .. }) => {}
        Msg::Json(v) if v["t"] == "subscribed" => {}
        other => panic!("expected SUBSCRIBED, got {other:?}"),
    }
}

/// JOIN (true) or LEAVE (false) of a room of acme.
pub fn acme_room(join: bool, room: &str) -> edgestream_codec::Frame {
    use edgestream_codec::Frame;
    let (org, room) = ("acme".to_string(), room.to_string());
    if join {
        Frame::Join { org, room }
    } else {
        Frame::Leave { org, room }
    }
}
