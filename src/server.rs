//! Wires the parts into a running node: the log, the hub, the HTTP listener (API and
//! WebSocket), periodic retention, and graceful shutdown.
//!
//! [`Server::bind`] takes the listeners (port 0 works, for tests); [`Server::run`] takes the
//! shutdown signal as a future, so a test can stop the server at will.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use edgestream_ws::{OriginPolicy, WsConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::App;
use crate::auth::{AuthConfig, Authenticator, JwtAlg};
use crate::config::{AuthMode, Config, RedisTarget};
use crate::event::Encoding;
use crate::hub::Hub;
use crate::log::{durable::DurableLog, memory::MemoryLog, redis::RedisLog, EventLog};
use crate::metrics::Metrics;
use crate::model::Epoch;
use crate::session::{SessionEnv, SessionLimits};
use crate::time::unix_ms;
use crate::webtransport::{self, Certificates};

/// A node with its listeners bound, ready to run.
pub struct Server {
    app: Arc<App>,
    http: TcpListener,
    quic: quinn::Endpoint,
    /// `--http-tls`.
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// `--admin-listen`.
    admin: Option<TcpListener>,
}

/// A Redis URL without its password, for logs and errors.
fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("redacted"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// Connections the kernel queues for the HTTP listener before `accept` (the kernel caps it at
/// `net.core.somaxconn`). tokio's default, 1,024, overflowed when 10,000 WebSocket clients
/// reconnected at once: the kernel fell back to SYN cookies and clients waited for SYN
/// retransmits (1 s and more).
const LISTEN_BACKLOG: u32 = 16_384;

fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    // As the QUIC socket's buffers: say so when the kernel caps what a storm needs.
    let cap = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok());
    if let Some(cap) = cap.filter(|c| *c < LISTEN_BACKLOG) {
        tracing::warn!(
            asked = LISTEN_BACKLOG,
            cap,
            %addr,
            "HTTP listen backlog capped by the kernel; raise net.core.somaxconn \
             (a WebSocket reconnect storm overflows a short accept queue)"
        );
    }
    socket.listen(LISTEN_BACKLOG)
}

impl Server {
    /// Binds the listeners and builds the node over the configured log (in memory, or
    /// Redis Streams with `--redis`).
    pub async fn bind(config: Config) -> anyhow::Result<Server> {
        let log: Arc<dyn EventLog> = match &config.redis {
            Some(target) => {
                let mut log = match target {
                    RedisTarget::Single(url) => RedisLog::connect(url, config.retention)
                        .await
                        .with_context(|| format!("cannot use redis at {}", redact_url(url)))?,
                    RedisTarget::Cluster(seeds) => {
                        RedisLog::connect_cluster(seeds, config.retention)
                            .await
                            .with_context(|| {
                                let seeds: Vec<String> =
                                    seeds.iter().map(|s| redact_url(s)).collect();
                                format!("cannot use the redis cluster at {}", seeds.join(","))
                            })?
                    }
                };
                if config.redis_min_replicas > 0 {
                    log.require_replicas(config.redis_min_replicas, config.redis_replica_timeout)
                        .await
                        .context("cannot open the replicated-write connection to redis")?;
                }
                Arc::new(log)
            }
            None => match &config.durable {
                Some(d) => Arc::new(DurableLog::open(d.clone(), config.retention).with_context(
                    || format!("cannot use the data directory {}", d.dir.display()),
                )?),
                None => Arc::new(MemoryLog::new(config.retention)),
            },
        };
        Server::bind_with_log(config, log).await
    }

    /// Binds the listeners and builds the node over the given log.
    pub async fn bind_with_log(config: Config, log: Arc<dyn EventLog>) -> anyhow::Result<Server> {
        // The key first: a start refused for it binds nothing.
        let (auth_config, dev_secret) = match &config.auth {
            AuthMode::Keyed(c) => (c.clone(), None),
            AuthMode::Development => {
                use rand::distr::{Alphanumeric, SampleString};
                let secret = Alphanumeric
                    .sample_string(&mut rand::rng(), 43)
                    .into_bytes();
                tracing::warn!(
                    "development mode (--dev): tokens are signed with a random secret and served \
                     at /v1/dev/token to clients on this machine; every origin is allowed"
                );
                let c = AuthConfig {
                    alg: JwtAlg::HS256,
                    key: secret.clone(),
                    issuer: None,
                    audience: None,
                    leeway_secs: config.leeway.as_secs(),
                    kid: None,
                    max_lifetime_secs: None,
                };
                (c, Some(secret))
            }
        };
        let auth = Authenticator::new(&auth_config).map_err(anyhow::Error::msg)?;
        let http = listen(config.http_listen)
            .with_context(|| format!("cannot listen on {}", config.http_listen))?;
        let http_addr = http.local_addr()?;
        let admin = match config.admin_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("--admin-listen: cannot listen on {addr}"))?,
            ),
            None => None,
        };
        let certs = Arc::new(Certificates::load(
            &config.quic,
            webtransport::dev_cert_names(config.quic.listen),
        )?);
        let peers = webtransport::lb::Peers::new();
        let (quic, quic_socket) =
            webtransport::endpoint(&config.quic, certs.clone(), peers.clone())
                .with_context(|| format!("cannot listen on udp {}", config.quic.listen))?;
        if let (Some(redis), Some(id)) = (log.backbone(), &config.quic.server_id) {
            crate::peers::start(redis, id.clone(), config.node_ttl, &peers);
        }
        let quic_addr = quic.local_addr()?;
        let metrics = Arc::new(Metrics::default());
        if let Some(inode) = quic_socket {
            let _ = metrics.quic_socket.set(inode);
        }
        let hub = Hub::new(log.clone(), metrics.clone());
        // Development mode accepts uploads into a temporary directory, so the demo works
        // without set-up; otherwise uploads need --upload-dir.
        let upload_cfg = config.uploads.clone().or_else(|| {
            config
                .is_development()
                .then(|| crate::upload::UploadConfig {
                    // Unique per server (tests run several in one process); removed at shutdown.
                    dir: std::env::temp_dir().join(format!(
                        "edgestream-dev-uploads-{}-{}",
                        std::process::id(),
                        Epoch::random()
                    )),
                    max_bytes: 100 << 20,
                    max_org_bytes: 1 << 30,
                    max_org_uploads: 10_000,
                })
        });
        let uploads =
            match &upload_cfg {
                Some(u) => Some(crate::upload::Uploads::new(u.clone()).with_context(|| {
                    format!("cannot use the upload directory {}", u.dir.display())
                })?),
                None => None,
            };
        let env = Arc::new(SessionEnv {
            session_permits: Arc::new(tokio::sync::Semaphore::new(config.max_sessions)),
            uploads,
            presence: match log.backbone() {
                Some(redis) => crate::presence::Presence::shared(
                    hub.clone(),
                    redis,
                    config.presence_ttl,
                    config.presence,
                ),
                None => crate::presence::Presence::new(hub.clone(), config.presence),
            },
            hub,
            auth: Arc::new(auth),
            metrics,
            limits: SessionLimits {
                queue: config.session_queue,
                max_orgs: config.max_orgs_per_session,
                max_sessions: config.max_sessions,
                heartbeat: config.heartbeat,
                // A CHAT frame carries a body up to the event size limit.
                max_control_frame: (config.max_event_bytes + 1024).max(16 * 1024),
                max_event_bytes: config.max_event_bytes,
            },
            encoding: Encoding {
                brotli_min_bytes: config.brotli_min_bytes,
                ..Encoding::default()
            },
            shutdown: CancellationToken::new(),
        });
        let origins = if config.is_development() || config.allowed_origins == ["*"] {
            OriginPolicy::AllowAll
        } else {
            OriginPolicy::List(config.allowed_origins.clone())
        };
        let ws = WsConfig {
            ping_interval: config.heartbeat,
            idle_timeout: config.ws_idle_timeout,
            // The largest message a session sends: an event (binary or JSON, payload plus
            // framing) or a member list; at least 1 MiB.
            max_send_message: (2 * config.max_event_bytes + 4096).max(1 << 20),
            ..WsConfig::default()
        };
        let app = Arc::new(App {
            env,
            dev_secret,
            draining: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            sessions: TaskTracker::new(),
            origins,
            ws,
            http_addr,
            quic_addr,
            certs,
            config,
        });
        let tls = if app.config.http_tls {
            Some(webtransport::http_tls(app.certs.clone())?)
        } else {
            None
        };
        Ok(Server {
            app,
            http,
            admin,
            quic,
            tls,
        })
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.app.http_addr
    }

    /// The admin listener's address (`--admin-listen`).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn quic_addr(&self) -> SocketAddr {
        self.app.quic_addr
    }

    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// Serves until `shutdown` resolves, then drains: readyz turns 503, sessions close with
    /// 4503, requests in flight finish, and the call returns within the drain timeout.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let app = self.app;
        let sweeper = {
            let log = app.env.hub.log().clone();
            let uploads = app.env.uploads.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                let mut trimmer = crate::heap::Trimmer::default();
                loop {
                    tick.tick().await;
                    log.sweep(unix_ms());
                    if let Some(u) = &uploads {
                        u.sweep();
                    }
                    if trimmer.due(std::time::Instant::now()) {
                        // Off the workers: the trim holds the allocator's locks while it runs.
                        let floor = trimmer.floor();
                        let checked =
                            tokio::task::spawn_blocking(move || crate::heap::check(floor)).await;
                        if let Ok(Some(c)) = checked {
                            trimmer.record(c);
                            if let Some(took) = c.trimmed {
                                tracing::debug!(
                                    free_bytes = c.free,
                                    took_us = took.as_micros() as u64,
                                    "freed heap memory returned to the OS"
                                );
                            }
                        }
                    }
                }
            })
        };
        let rotation = {
            let certs = app.certs.clone();
            let metrics = app.env.metrics.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(3600));
                let mut warned: Option<time::OffsetDateTime> = None;
                loop {
                    tick.tick().await;
                    let now = time::OffsetDateTime::now_utc();
                    if let Err(e) = certs.rotate_if_due(now) {
                        tracing::error!(error = %e, "development certificate rotation failed");
                    }
                    let Some(end) = certs.not_after() else {
                        continue;
                    };
                    let left = end - now;
                    metrics
                        .certificate_days_left
                        .set(left.whole_days().max(0) as u64);
                    // A configured certificate near its end: once at start, then daily.
                    let configured = certs.dev_hash().is_none();
                    if configured
                        && left < crate::tls::EXPIRY_WARNING
                        && warned.is_none_or(|w| now - w >= time::Duration::days(1))
                    {
                        tracing::warn!(expires = %end, days_left = left.whole_days(), "the certificate expires soon: renew it and restart the node");
                        warned = Some(now);
                    }
                }
            })
        };
        let quic = self.quic;
        let quic_accept = tokio::spawn(webtransport::serve(
            quic.clone(),
            app.env.clone(),
            app.config.quic.clone(),
            app.origins.clone(),
            app.sessions.clone(),
        ));
        let stop_http = CancellationToken::new();
        let router = crate::http::router(app.clone());
        // The admin listener answers (readyz 503) through the drain, until the node exits.
        let stop_admin = CancellationToken::new();
        let admin = self.admin.map(|listener| {
            tokio::spawn(crate::http::listener::serve(
                listener,
                None,
                crate::http::admin_router(app.clone()),
                app.config.http,
                app.env.metrics.clone(),
                stop_admin.clone(),
            ))
        });
        let mut http = tokio::spawn(crate::http::listener::serve(
            self.http,
            self.tls,
            router,
            app.config.http,
            app.env.metrics.clone(),
            stop_http.clone(),
        ));
        let c = &app.config;
        let auth = match &c.auth {
            crate::config::AuthMode::Development => {
                "development (random secret, /v1/dev/token)".to_string()
            }
            crate::config::AuthMode::Keyed(a) => format!(
                "{:?}{}{}",
                a.alg,
                a.issuer
                    .as_deref()
                    .map(|i| format!(", iss {i}"))
                    .unwrap_or_default(),
                a.audience
                    .as_deref()
                    .map(|i| format!(", aud {i}"))
                    .unwrap_or_default()
            ),
        };
        let log_target = match (&c.redis, &c.durable) {
            (Some(crate::config::RedisTarget::Single(url)), _) => redact_url(url),
            (Some(crate::config::RedisTarget::Cluster(seeds)), _) => format!(
                "cluster {}",
                seeds
                    .iter()
                    .map(|s| redact_url(s))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            (None, Some(d)) => format!("{} (fsync {:?})", d.dir.display(), d.fsync),
            (None, None) => "memory".to_string(),
        };
        let cert = match (&c.quic.cert_files, app.certs.dev_hash()) {
            (Some((cert, _)), _) => format!(
                "{} ({}, expires {})",
                cert.display(),
                app.certs.configured_subject().unwrap_or("?"),
                app.certs
                    .not_after()
                    .map_or_else(|| "?".into(), |t| t.date().to_string())
            ),
            (None, Some(hash)) => format!("development, sha-256 {hash}"),
            (None, None) => "configured".to_string(),
        };
        // The effective configuration, without secrets.
        tracing::info!(
            version = crate::build::VERSION,
            commit = crate::build::COMMIT,
            http = %app.http_addr,
            http_tls = c.http_tls,
            quic = %app.quic_addr,
            auth = %auth,
            log = app.env.hub.log().kind(),
            log_target = %log_target,
            server_id = c.quic.server_id.as_deref().map(crate::peers::hex).unwrap_or_else(|| "random CIDs".into()),
            cert = %cert,
            public_webtransport_url = c.public_webtransport_url.as_deref().unwrap_or("(this node's)"),
            public_websocket_url = c.public_websocket_url.as_deref().unwrap_or("(this node's)"),
            allowed_origins = %if c.is_development() {
                "(any: development mode)".to_string()
            } else if c.allowed_origins.is_empty() {
                "(none: browsers are refused)".to_string()
            } else {
                c.allowed_origins.join(",")
            },
            drain_delay = ?c.drain_delay,
            "edgestream serving"
        );
        tokio::select! {
            _ = shutdown => {}
            r = &mut http => {
                sweeper.abort();
                rotation.abort();
                quic_accept.abort();
                r.context("http server task")?;
                anyhow::bail!("the http listener stopped");
            }
        }
        if !app.config.drain_delay.is_zero() {
            tracing::info!(
                delay = ?app.config.drain_delay,
                "stopping: /readyz answers 503, still serving until the drain"
            );
            app.stopping.store(true, Ordering::Release);
            tokio::time::sleep(app.config.drain_delay).await;
        }
        tracing::info!(sessions = app.env.open_sessions(), "draining");
        app.draining.store(true, Ordering::Release);
        app.env.shutdown.cancel();
        stop_http.cancel();
        app.sessions.close();
        let drained = tokio::time::timeout(app.config.drain_timeout, async {
            let _ = (&mut http).await;
            let _ = quic_accept.await;
            app.sessions.wait().await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                sessions = app.sessions.len(),
                "drain timeout: exiting with work left"
            );
            http.abort();
        }
        sweeper.abort();
        rotation.abort();
        stop_admin.cancel();
        if let Some(admin) = admin {
            let _ = tokio::time::timeout(Duration::from_secs(1), admin).await;
        }
        quic.close(0u32.into(), b"shutdown");
        let _ = tokio::time::timeout(Duration::from_secs(1), quic.wait_idle()).await;
        // Development mode's temporary upload directory goes with the process.
        if let (true, None, Some(u)) = (
            app.config.is_development(),
            &app.config.uploads,
            &app.env.uploads,
        ) {
            if let Err(e) = std::fs::remove_dir_all(u.dir()) {
                tracing::warn!(dir = %u.dir().display(), error = %e, "cannot remove the development upload directory");
            }
        }
        tracing::info!("stopped");
        Ok(())
    }
}
