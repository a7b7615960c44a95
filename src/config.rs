//! Configuration of `edgestream serve`: command-line flags, `EDGESTREAM_<FLAG>` environment
//! variables and a TOML file, in that order of precedence, then defaults.
//!
//! Owns parsing and validation only; the server reads the resolved [`Config`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::auth::JwtAlg;

/// A duration written as `5m`, `30s`, `1h30m`, `250ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s)
            .map(HumanDuration)
            .map_err(|e| format!("{s:?}: {e}"))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A comma-separated list (a TOML array also works in the file).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct List(pub Vec<String>);

/// A listen address: `IP:port`, or `host:port` with a name this machine resolves (the first
/// IPv4 address it resolves to, else the first address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr(pub SocketAddr);

impl FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(ListenAddr(a));
        }
        let hint = "give IP:port (127.0.0.1:8080, 0.0.0.0:8080, [::]:8080) or host:port with a name this machine resolves";
        if !s.contains(':') {
            return Err(format!("\"{s}\" has no port: {hint}"));
        }
        use std::net::ToSocketAddrs as _;
        let addrs: Vec<SocketAddr> = s
            .to_socket_addrs()
            .map_err(|e| format!("\"{s}\": {e}: {hint}"))?
            .collect();
        addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or(addrs.first())
            .map(|a| ListenAddr(*a))
            .ok_or_else(|| format!("\"{s}\" resolves to no address: {hint}"))
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl FromStr for List {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(List(
            s.split(',')
                .map(str::trim)
                .filter(|x| !x.is_empty())
                .map(String::from)
                .collect(),
        ))
    }
}

impl<'de> Deserialize<'de> for List {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(String),
            Many(Vec<String>),
        }
        Ok(match Raw::deserialize(d)? {
            Raw::One(s) => s.parse().map_err(serde::de::Error::custom)?,
            Raw::Many(v) => List(v),
        })
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

macro_rules! serve_options {
    ($( $(#[doc = $doc:expr])* $name:ident : $ty:ty ),* $(,)?) => {
        /// Flags of `edgestream serve`. Every flag is also read from `EDGESTREAM_<FLAG>`
        /// (e.g. `EDGESTREAM_JWT_SECRET`) and from the `--config` TOML file (kebab-case keys).
        #[derive(Debug, Default, Clone, clap::Args)]
        pub struct ServeArgs {
            /// TOML file with these options (keys as the flags, e.g. `http-listen = "..."`).
            #[arg(long)]
            pub config: Option<PathBuf>,
            /// Development mode: no JWT key; tokens are signed with a random secret and served
            /// at /v1/dev/token to loopback clients, every origin is allowed, uploads go to a
            /// temporary directory. Only on loopback listeners; never with a JWT key
            #[arg(long)]
            pub dev: bool,
            /// Serve HTTP and WebSocket over TLS (https, wss) with the QUIC listener's
            /// certificate (--cert/--key, or the development certificate with --dev)
            #[arg(long)]
            pub http_tls: bool,
            /// Serve the demo page at / (always on with --dev)
            #[arg(long)]
            pub demo: bool,
            $( $(#[doc = $doc])* #[arg(long)] pub $name: Option<$ty>, )*
        }

        /// The `--config` file: the same options, all optional, unknown keys refused.
        #[derive(Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields, rename_all = "kebab-case")]
        pub struct FileOptions {
            pub dev: Option<bool>,
            pub http_tls: Option<bool>,
            pub demo: Option<bool>,
            $( pub $name: Option<$ty>, )*
        }

        impl ServeArgs {
            /// Fills what flags and environment left unset from the file.
            pub fn merge_file(&mut self, file: FileOptions) {
                self.dev |= file.dev.unwrap_or(false);
                self.http_tls |= file.http_tls.unwrap_or(false);
                self.demo |= file.demo.unwrap_or(false);
                $( if self.$name.is_none() { self.$name = file.$name; } )*
            }
        }
    };
}

serve_options! {
    /// HTTP and WebSocket listen address, IP:port or host:port [default: 127.0.0.1:8080]
    http_listen: ListenAddr,
    /// A separate plain-HTTP listener for /metrics, /v1/metrics, /healthz and /readyz; with it the public listener no longer serves the metrics [default: none]
    admin_listen: ListenAddr,
    /// QUIC (WebTransport) listen address, UDP, IP:port or host:port [default: 127.0.0.1:4433]
    quic_listen: ListenAddr,
    /// HS256 shared secret (at least 16 bytes). Prefer the environment variable to the flag
    jwt_secret: String,
    /// A file holding the HS256 secret (e.g. a systemd credential: %d/jwt-secret); one trailing newline is ignored
    jwt_secret_file: PathBuf,
    /// PEM public key file for RS256, ES256 or EdDSA tokens (with --jwt-alg)
    jwt_public_key: PathBuf,
    /// Token algorithm [default: HS256 with a secret; required with a public key]
    jwt_alg: JwtAlg,
    /// Required `iss` claim
    jwt_issuer: String,
    /// Required `aud` claim
    jwt_audience: String,
    /// The key's id: tokens naming another `kid` in their header are refused (tokens without one are accepted) [default: any kid]
    jwt_kid: String,
    /// Clock skew tolerated on exp/nbf [default: 30s]
    jwt_leeway: HumanDuration,
    /// Refuse tokens whose `exp` lies further ahead than this (plus the leeway), e.g. 24h, so that no token opens an endless session [default: no maximum]
    jwt_max_lifetime: HumanDuration,
    /// Share the sequencer and replay log with other nodes through Redis Streams at this URL (redis://host:port/db) [default: the embedded in-memory log]
    redis: String,
    /// Or share it through a Redis Cluster: seed nodes, comma-separated (redis://host:port,...)
    redis_cluster: List,
    /// With --redis or --redis-cluster: acknowledge a publish only after this many replicas of the org's primary have it (WAIT); not confirmed within --redis-replica-timeout: 504, outcome unknown [default: 0, the primary's answer]
    redis_min_replicas: u32,
    /// With --redis-min-replicas: how long a publish waits for the replicas [default: 1s]
    redis_replica_timeout: HumanDuration,
    /// With --redis or --redis-cluster: a node refreshes its entry in the presence node registry every third of this; a node silent this long (dead, cut off) has its users leave [default: 15s]
    presence_ttl: HumanDuration,
    /// Presence batches: at most one PRESENCE frame per org (and room) per this, with the changes since the previous one [default: 500ms]
    presence_interval: HumanDuration,
    /// Presence frames of a group (an org, a room) with more users than this carry the count only; the HTTP routes still page the members [default: 1000]
    presence_max_members: usize,
    /// With --redis and --server-id: a node refreshes its entry in the node registry every third of this; a node silent this long counts as dead, and only then do its peers answer its connections with stateless resets [default: 3s]
    node_ttl: HumanDuration,
    /// Keep the embedded log on disk in this directory: a restart keeps epochs, seqs and the replay window [default: in memory only]
    data_dir: PathBuf,
    /// With --data-dir: always (sync per request), batch (group commit) or never (page cache only; a power loss loses the last moments) [default: batch]
    fsync: crate::log::durable::Fsync,
    /// With --data-dir: a segment file is closed at this size, in bytes [default: 67108864]
    data_segment_bytes: u64,
    /// Accept uploads (PROTOCOL.md section 9) into this directory [default: uploads off]
    upload_dir: PathBuf,
    /// Largest upload, in bytes [default: 104857600]
    max_upload_bytes: u64,
    /// Bytes of uploads one org may hold on this node [default: 1073741824]
    max_upload_bytes_per_org: u64,
    /// Uploads one org may hold on this node [default: 10000]
    max_uploads_per_org: usize,
    /// Replay log keeps at least this much history per org [default: 5m]
    replay_window: HumanDuration,
    /// Replay log cap in events per org [default: 100000]
    replay_max_events: usize,
    /// Replay log cap in bytes per org [default: 67108864]
    replay_max_bytes: usize,
    /// Embedded log: an org with nothing retained, no subscriber and no idempotency key leaves memory, keeping only its epoch and head (so a caught-up client still resumes `recovered`) for at most this many orgs, oldest forgotten first [default: 100000]
    max_idle_orgs: usize,
    /// Heartbeat interval [default: 5s]
    heartbeat: HumanDuration,
    /// Browser origins allowed to connect, comma-separated [default: all in development mode, none otherwise]
    allowed_origins: List,
    /// Log format, text or json [default: text]
    log_format: LogFormat,
    /// Largest event payload accepted for publishing, in bytes [default: 65536]
    max_event_bytes: usize,
    /// Largest publish request body, in bytes [default: 1048576]
    max_request_bytes: usize,
    /// Payloads at least this large are brotli-compressed for enc=br clients [default: 1024]
    brotli_min_bytes: usize,
    /// Live events queued per session before it is closed as a slow consumer [default: 4096]
    session_queue: usize,
    /// Sessions accepted at once on this node [default: 100000]
    max_sessions: usize,
    /// Orgs one session may subscribe to [default: 64]
    max_orgs_per_session: usize,
    /// How long a shutdown waits for sessions and publishes to finish [default: 10s]
    drain_timeout: HumanDuration,
    /// On SIGTERM, how long the node keeps serving with /readyz 503 (and `Connection: close` on HTTP answers) before it drains, so that a balancer polling /readyz stops sending it new work first [default: 5s; 0 with --dev]
    drain_delay: HumanDuration,
    /// A WebSocket client silent this long is closed [default: 30s]
    ws_idle_timeout: HumanDuration,
    /// TCP connections served at once on the HTTP listener, WebSocket sessions included; past it a few more are accepted for /healthz, /readyz and the metrics, the rest closed [default: 100000, at most the open-file limit less 256]
    max_connections: usize,
    /// A request's headers must arrive within this (counted from when the connection is ready for the request) [default: 10s]
    http_header_timeout: HumanDuration,
    /// A request's body must arrive within this; an upload's body may take longer but never pause longer than this [default: 30s]
    http_body_timeout: HumanDuration,
    /// An HTTP connection with no request in flight and no traffic for this long is closed [default: 30s]
    http_idle_timeout: HumanDuration,
    /// PEM certificate chain for the QUIC listener [default: a self-signed development certificate]
    cert: PathBuf,
    /// PEM private key for --cert
    key: PathBuf,
    /// A WebTransport client silent this long (no packet) is dropped [default: 15s]
    quic_idle_timeout: HumanDuration,
    /// A QUIC connection must complete its handshake and open its WebTransport session within this, or it is closed [default: 10s]
    quic_handshake_timeout: HumanDuration,
    /// QUIC address validation: auto (Retry under handshake load), always or never [default: auto]
    quic_retry: crate::webtransport::RetryPolicy,
    /// With --quic-retry auto: new connections per second above which clients must prove their address with a Retry (as must all while 256 handshakes are in flight) [default: 200]
    quic_retry_above_rate: u32,
    /// Kernel buffer (SO_RCVBUF, SO_SNDBUF) for the QUIC socket, in bytes; absorbs a burst of handshakes (a reconnect storm) and of fan-out [default: 16777216]
    quic_socket_buffer: usize,
    /// This node's server id in its QUIC connection IDs (QUIC-LB plaintext), 1 to 11 bytes in hex, e.g. 0a01 [default: random CIDs]
    server_id: String,
    /// Stateless-reset key shared by the nodes behind one balancer, at least 32 bytes. Prefer the environment variable [default: random per process]
    reset_key: String,
    /// A file holding the stateless-reset key (e.g. %d/reset-key); one trailing newline is ignored
    reset_key_file: PathBuf,
    /// WebTransport URL /v1/info reports, for a node behind a load balancer [default: this node's]
    public_webtransport_url: String,
    /// WebSocket URL /v1/info reports, for a node behind a load balancer [default: this node's]
    public_websocket_url: String,
    /// Percent of browser clients sent to WebTransport (0 to 100), advertised in /v1/info; the others use WebSocket, for a gradual rollout [default: 100]
    webtransport_share: u8,
}

/// How tokens are verified.
#[derive(Debug, Clone)]
pub enum AuthMode {
    /// No key configured: a random HS256 secret and `/v1/dev/token`.
    Development,
    /// A configured key.
    Keyed(crate::auth::AuthConfig),
}

/// The Redis deployment behind the shared log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server (or a primary with replicas behind one address).
    Single(String),
    /// Seed nodes of a Redis Cluster.
    Cluster(Vec<String>),
}

/// The resolved configuration of a server.
#[derive(Debug, Clone)]
pub struct Config {
    pub http_listen: SocketAddr,
    pub auth: AuthMode,
    pub leeway: Duration,
    pub retention: crate::log::Retention,
    /// Where the shared log is; `None`: the embedded log.
    pub redis: Option<RedisTarget>,
    /// Replicas that must confirm an append before it is acknowledged (0: none), and how long
    /// to wait for them.
    pub redis_min_replicas: u32,
    pub redis_replica_timeout: Duration,
    /// How long a node's shared presence entries live without a refresh.
    pub presence_ttl: Duration,
    /// How presence is batched.
    pub presence: crate::presence::Batching,
    /// How long a node stays in the node registry without a refresh.
    pub node_ttl: Duration,
    /// The embedded log's directory and sync policy; `None`: in memory.
    pub durable: Option<crate::log::durable::DurableConfig>,
    /// Where uploads go; `None`: uploads are refused (503).
    pub uploads: Option<crate::upload::UploadConfig>,
    pub heartbeat: Duration,
    pub allowed_origins: Vec<String>,
    pub log_format: LogFormat,
    pub max_event_bytes: usize,
    pub max_request_bytes: usize,
    pub brotli_min_bytes: usize,
    pub session_queue: usize,
    pub max_sessions: usize,
    pub max_orgs_per_session: usize,
    pub drain_timeout: Duration,
    /// SIGTERM to drain: serving, /readyz 503.
    pub drain_delay: Duration,
    pub ws_idle_timeout: Duration,
    pub http: crate::http::listener::HttpLimits,
    /// `--http-tls`: HTTP and WebSocket over TLS with the QUIC certificate.
    pub http_tls: bool,
    /// `--admin-listen`: metrics and health on their own listener.
    pub admin_listen: Option<SocketAddr>,
    /// The demo page at `/` (`--demo`, or development mode).
    pub demo: bool,
    pub quic: crate::webtransport::QuicConfig,
    pub public_webtransport_url: Option<String>,
    pub public_websocket_url: Option<String>,
    /// `--webtransport-share`: percent of browser clients told to use WebTransport.
    pub webtransport_share: u8,
}

impl Default for Config {
    /// The defaults in development mode (the only mode that needs no key).
    fn default() -> Self {
        Config::resolve(ServeArgs {
            dev: true,
            ..Default::default()
        })
        .expect("defaults are valid")
    }
}

impl Config {
    /// Loads the `--config` file (if any) under the flags and resolves defaults.
    pub fn load(mut args: ServeArgs) -> Result<Self, String> {
        if let Some(path) = &args.config {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
            let file: FileOptions = toml::from_str(&text)
                .map_err(|e| format!("config file {}: {e}", path.display()))?;
            args.merge_file(file);
        }
        Config::resolve(args)
    }

    /// Applies defaults and checks the combination.
    pub fn resolve(mut a: ServeArgs) -> Result<Self, String> {
        a.jwt_secret =
            secret_from_file(a.jwt_secret.take(), a.jwt_secret_file.take(), "jwt-secret")?;
        a.reset_key = secret_from_file(a.reset_key.take(), a.reset_key_file.take(), "reset-key")?;
        if a.data_dir.is_some() && (a.redis.is_some() || a.redis_cluster.is_some()) {
            return Err(
                "--data-dir is for the embedded log; with Redis the log lives there".into(),
            );
        }
        let dur = |d: Option<HumanDuration>, default: u64| {
            d.map_or(Duration::from_secs(default), |h| h.0)
        };
        let leeway = dur(a.jwt_leeway, 30);
        let max_lifetime_secs = a.jwt_max_lifetime.map(|d| d.0.as_secs());
        let shared = a.redis.is_some() || a.redis_cluster.is_some();
        let http_listen = a
            .http_listen
            .map(|l| l.0)
            .unwrap_or_else(|| "127.0.0.1:8080".parse().expect("valid"));
        let quic_listen = a
            .quic_listen
            .map(|l| l.0)
            .unwrap_or_else(|| "127.0.0.1:4433".parse().expect("valid"));
        let auth = match (a.jwt_secret, a.jwt_public_key) {
            (Some(_), _) | (_, Some(_)) if a.dev => {
                return Err("--dev signs tokens with a random secret: it excludes \
                            --jwt-secret and --jwt-public-key"
                    .into())
            }
            (Some(_), Some(_)) => {
                return Err("give either --jwt-secret or --jwt-public-key, not both".into())
            }
            (Some(secret), None) => {
                if a.jwt_alg.is_some_and(|alg| alg != JwtAlg::HS256) {
                    return Err("--jwt-secret works with HS256 only".into());
                }
                AuthMode::Keyed(crate::auth::AuthConfig {
                    alg: JwtAlg::HS256,
                    key: secret.into_bytes(),
                    issuer: a.jwt_issuer,
                    audience: a.jwt_audience,
                    leeway_secs: leeway.as_secs(),
                    kid: a.jwt_kid,
                    max_lifetime_secs,
                })
            }
            (None, Some(path)) => {
                let alg = match a.jwt_alg {
                    Some(JwtAlg::HS256) | None => {
                        return Err("--jwt-public-key needs --jwt-alg RS256, ES256 or EdDSA".into())
                    }
                    Some(alg) => alg,
                };
                let key = std::fs::read(&path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                AuthMode::Keyed(crate::auth::AuthConfig {
                    alg,
                    key,
                    issuer: a.jwt_issuer,
                    audience: a.jwt_audience,
                    leeway_secs: leeway.as_secs(),
                    kid: a.jwt_kid,
                    max_lifetime_secs,
                })
            }
            (None, None) if a.dev => {
                if !(http_listen.ip().is_loopback() && quic_listen.ip().is_loopback()) {
                    return Err(format!(
                        "--dev serves tokens to anyone who can reach it, so it listens on \
                         loopback only (not http {http_listen}, quic {quic_listen})"
                    ));
                }
                AuthMode::Development
            }
            (None, None) => {
                return Err("no JWT key configured: give --jwt-secret (better: the \
                            EDGESTREAM_JWT_SECRET variable) or --jwt-public-key with \
                            --jwt-alg; for a local trial without keys, --dev"
                    .into())
            }
        };
        let heartbeat = dur(a.heartbeat, 5);
        if heartbeat < Duration::from_millis(100) {
            return Err("--heartbeat must be at least 100ms".into());
        }
        let positive = |v: Option<usize>, default: usize, name: &str| match v {
            Some(0) => Err(format!("--{name} must be positive")),
            Some(v) => Ok(v),
            None => Ok(default),
        };
        Ok(Config {
            http_listen,
            auth,
            leeway,
            redis: match (a.redis, a.redis_cluster) {
                (Some(_), Some(_)) => {
                    return Err("--redis and --redis-cluster exclude each other".into())
                }
                (Some(url), None) => Some(RedisTarget::Single(url)),
                (None, Some(List(seeds))) if !seeds.is_empty() => Some(RedisTarget::Cluster(seeds)),
                (None, Some(_)) => return Err("--redis-cluster needs at least one node".into()),
                (None, None) => None,
            },
            redis_min_replicas: match a.redis_min_replicas {
                Some(n) if n > 0 && !shared => {
                    return Err("--redis-min-replicas needs --redis or --redis-cluster".into())
                }
                n => n.unwrap_or(0),
            },
            redis_replica_timeout: dur(a.redis_replica_timeout, 1),
            node_ttl: a
                .node_ttl
                .map_or(Duration::from_secs(3), |d| d.0)
                .max(Duration::from_millis(300)),
            presence_ttl: a
                .presence_ttl
                .map_or(Duration::from_secs(15), |d| d.0)
                .max(Duration::from_millis(300)),
            presence: crate::presence::Batching {
                interval: a
                    .presence_interval
                    .map_or(Duration::from_millis(500), |d| d.0)
                    .max(Duration::from_millis(10)),
                max_members: a.presence_max_members.unwrap_or(1000),
            },
            uploads: a.upload_dir.map(|dir| crate::upload::UploadConfig {
                dir,
                max_bytes: a.max_upload_bytes.unwrap_or(100 << 20),
                max_org_bytes: a.max_upload_bytes_per_org.unwrap_or(1 << 30),
                max_org_uploads: a.max_uploads_per_org.unwrap_or(10_000),
            }),
            durable: match a.data_dir {
                Some(dir) => Some(crate::log::durable::DurableConfig {
                    dir,
                    fsync: a.fsync.unwrap_or_default(),
                    segment_bytes: a.data_segment_bytes.unwrap_or(64 << 20).max(4096),
                }),
                None => None,
            },
            retention: crate::log::Retention {
                window_ms: dur(a.replay_window, 300).as_millis() as u64,
                max_events: positive(a.replay_max_events, 100_000, "replay-max-events")?,
                max_bytes: positive(a.replay_max_bytes, 64 << 20, "replay-max-bytes")?,
                max_idle_orgs: a.max_idle_orgs.unwrap_or(100_000),
            },
            heartbeat,
            allowed_origins: origins(a.allowed_origins.unwrap_or_default().0)?,
            log_format: a.log_format.unwrap_or_default(),
            max_event_bytes: positive(a.max_event_bytes, 64 * 1024, "max-event-bytes")?,
            max_request_bytes: positive(a.max_request_bytes, 1 << 20, "max-request-bytes")?,
            brotli_min_bytes: a.brotli_min_bytes.unwrap_or(1024),
            session_queue: positive(a.session_queue, 4096, "session-queue")?,
            max_sessions: positive(a.max_sessions, 100_000, "max-sessions")?,
            max_orgs_per_session: positive(a.max_orgs_per_session, 64, "max-orgs-per-session")?,
            drain_timeout: dur(a.drain_timeout, 10),
            drain_delay: a.drain_delay.map_or(
                if a.dev {
                    Duration::ZERO
                } else {
                    Duration::from_secs(5)
                },
                |d| d.0,
            ),
            ws_idle_timeout: dur(a.ws_idle_timeout, 30),
            http_tls: a.http_tls,
            admin_listen: a.admin_listen.map(|l| l.0),
            demo: a.demo || a.dev,
            http: crate::http::listener::HttpLimits {
                max_connections: positive(
                    a.max_connections,
                    default_max_connections(),
                    "max-connections",
                )?,
                header_timeout: dur(a.http_header_timeout, 10),
                body_timeout: dur(a.http_body_timeout, 30),
                idle_timeout: dur(a.http_idle_timeout, 30),
            },
            quic: crate::webtransport::QuicConfig {
                listen: quic_listen,
                idle_timeout: dur(a.quic_idle_timeout, 15),
                handshake_timeout: dur(a.quic_handshake_timeout, 10),
                retry: a.quic_retry.unwrap_or_default(),
                retry_above_rate: a.quic_retry_above_rate.unwrap_or(200),
                socket_buffer: positive(a.quic_socket_buffer, 16 << 20, "quic-socket-buffer")?,
                server_id: a
                    .server_id
                    .as_deref()
                    .map(crate::webtransport::lb::parse_server_id)
                    .transpose()?,
                reset_key: match a.reset_key {
                    Some(k) if k.len() < 32 => {
                        return Err("--reset-key must be at least 32 bytes".into())
                    }
                    Some(_) if a.server_id.is_none() => {
                        return Err("--reset-key needs --server-id: with random connection \
                                    IDs a shared key would let any node reset any peer's \
                                    connections"
                            .into())
                    }
                    k => k.map(String::into_bytes),
                },
                cert_files: match (a.cert, a.key) {
                    (Some(c), Some(k)) => Some((c, k)),
                    (None, None) => None,
                    _ => return Err("--cert and --key go together".into()),
                },
                ..Default::default()
            },
            public_webtransport_url: a.public_webtransport_url,
            public_websocket_url: a.public_websocket_url,
            webtransport_share: match a.webtransport_share {
                None => 100,
                Some(n) if n <= 100 => n,
                Some(n) => {
                    return Err(format!(
                        "--webtransport-share is a percentage (0 to 100), not {n}"
                    ))
                }
            },
        })
    }

    pub fn is_development(&self) -> bool {
        matches!(self.auth, AuthMode::Development)
    }
}

/// 100,000 connections, or fewer when the open-file limit is lower: it less 256 for the log,
/// the QUIC socket, Redis and files.
fn default_max_connections() -> usize {
    let nofile = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(u64::MAX, |(soft, _)| soft);
    nofile.saturating_sub(256).clamp(64, 100_000) as usize
}

/// `--allowed-origins`: each entry an origin as browsers send it (`scheme://host[:port]`, no
/// path, no trailing slash), or `*` alone for every origin. A malformed entry never matches a
/// browser, so it is refused here instead.
fn origins(list: Vec<String>) -> Result<Vec<String>, String> {
    if list.iter().any(|o| o == "*") {
        return match list.len() {
            1 => Ok(list),
            _ => Err("--allowed-origins: `*` (every origin) cannot be combined with others".into()),
        };
    }
    for o in &list {
        let hint = "an origin is scheme://host[:port] as the browser sends it, e.g. https://app.example.com (no path, no trailing slash); `*` allows every origin";
        let url =
            url::Url::parse(o).map_err(|e| format!("--allowed-origins \"{o}\": {e}; {hint}"))?;
        let clean = matches!(url.scheme(), "http" | "https")
            && url.host_str().is_some()
            && url.path() == "/"
            && !o.ends_with('/')
            && url.query().is_none()
            && url.username().is_empty();
        if !clean {
            return Err(format!(
                "--allowed-origins \"{o}\" is not an origin: {hint}"
            ));
        }
    }
    Ok(list)
}

/// `--NAME` or the contents of `--NAME-file` (not both), without one trailing newline.
fn secret_from_file(
    value: Option<String>,
    file: Option<PathBuf>,
    name: &str,
) -> Result<Option<String>, String> {
    match (value, file) {
        (Some(_), Some(_)) => Err(format!("give either --{name} or --{name}-file, not both")),
        (v, None) => Ok(v),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(&path).map_err(|e| {
                format!("--{name}-file {}: {e} (the service's user must be able to read it; with systemd use LoadCredential=)", path.display())
            })?;
            let text = text.strip_suffix('\n').unwrap_or(&text);
            let text = text.strip_suffix('\r').unwrap_or(text);
            if text.is_empty() {
                return Err(format!(
                    "--{name}-file {}: the file is empty",
                    path.display()
                ));
            }
            Ok(Some(text.to_string()))
        }
    }
}

/// Adds `EDGESTREAM_<FLAG>` environment fallbacks to every long flag of a command.
pub fn with_env(cmd: clap::Command) -> clap::Command {
    cmd.mut_args(|a| match a.get_long() {
        Some(long) if long != "help" && long != "version" => {
            let var = format!("EDGESTREAM_{}", long.replace('-', "_").to_ascii_uppercase());
            a.env(var)
        }
        _ => a,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = Config::default();
        assert_eq!(c.http_listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.retention.window_ms, 300_000);
        assert_eq!(c.heartbeat, Duration::from_secs(5));
        assert!(c.is_development());
    }

    #[test]
    fn file_under_flags() {
        let file: FileOptions = toml::from_str(
            "http-listen = \"127.0.0.1:9000\"\nheartbeat = \"2s\"\nallowed-origins = [\"https://a\", \"https://b\"]\n",
        )
        .unwrap();
        let mut args = ServeArgs {
            heartbeat: Some("7s".parse().unwrap()),
            dev: true,
            ..Default::default()
        };
        args.merge_file(file);
        let c = Config::resolve(args).unwrap();
        assert_eq!(c.http_listen.port(), 9000);
        assert_eq!(
            c.heartbeat,
            Duration::from_secs(7),
            "the flag wins over the file"
        );
        assert_eq!(c.allowed_origins, ["https://a", "https://b"]);
        assert!(toml::from_str::<FileOptions>("no-such-option = 1").is_err());
    }

    #[test]
    fn bad_combinations() {
        let a = ServeArgs {
            jwt_secret: Some("x".repeat(32)),
            jwt_alg: Some(JwtAlg::RS256),
            ..Default::default()
        };
        assert!(Config::resolve(a).is_err());
        let a = ServeArgs {
            jwt_public_key: Some("/nonexistent".into()),
            ..Default::default()
        };
        assert!(Config::resolve(a).is_err());
        let a = ServeArgs {
            replay_max_events: Some(0),
            ..Default::default()
        };
        assert!(Config::resolve(a).is_err());
    }

    #[test]
    fn origins_and_listen_addresses_are_checked_with_a_hint() {
        let keyed = |f: fn(&mut ServeArgs)| {
            let mut a = ServeArgs {
                jwt_secret: Some("s".repeat(32)),
                ..Default::default()
            };
            f(&mut a);
            Config::resolve(a)
        };
        let c = keyed(|a| a.allowed_origins = Some("*".parse().unwrap())).unwrap();
        assert_eq!(c.allowed_origins, ["*"]);
        for bad in [
            "https://app.example.com/",
            "app.example.com",
            "https://a.example/x",
            "*,https://a.example",
        ] {
            let e = Config::resolve(ServeArgs {
                jwt_secret: Some("s".repeat(32)),
                allowed_origins: Some(bad.parse().unwrap()),
                ..Default::default()
            })
            .unwrap_err();
            assert!(e.contains("--allowed-origins"), "{bad}: {e}");
        }
        assert!(keyed(|a| a.allowed_origins =
            Some("https://a.example,http://localhost:3000".parse().unwrap()))
        .is_ok());
        let l: ListenAddr = "localhost:28100".parse().unwrap();
        assert_eq!(l.0.port(), 28100);
        assert!(l.0.ip().is_loopback());
        let e = "localhost".parse::<ListenAddr>().unwrap_err();
        assert!(e.contains("no port") && e.contains("IP:port"), "{e}");
    }

    #[test]
    fn secrets_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwt-secret");
        std::fs::write(&path, format!("{}\n", "s".repeat(32))).unwrap();
        let c = Config::resolve(ServeArgs {
            jwt_secret_file: Some(path.clone()),
            ..Default::default()
        })
        .unwrap();
        assert!(!c.is_development());
        let both = Config::resolve(ServeArgs {
            jwt_secret: Some("s".repeat(32)),
            jwt_secret_file: Some(path),
            ..Default::default()
        })
        .unwrap_err();
        assert!(both.contains("not both"), "{both}");
        let missing = Config::resolve(ServeArgs {
            jwt_secret_file: Some(dir.path().join("none")),
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            missing.contains("--jwt-secret-file") && missing.contains("none"),
            "{missing}"
        );
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let e = Config::resolve(ServeArgs {
            reset_key_file: Some(empty),
            jwt_secret: Some("s".repeat(32)),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.contains("empty"), "{e}");
    }

    #[test]
    fn development_mode_is_explicit_and_local() {
        let e = Config::resolve(ServeArgs::default()).unwrap_err();
        assert!(e.contains("--dev"), "{e}");
        let dev = |f: fn(&mut ServeArgs)| {
            let mut a = ServeArgs {
                dev: true,
                ..Default::default()
            };
            f(&mut a);
            Config::resolve(a)
        };
        assert!(dev(|_| {}).unwrap().is_development());
        assert!(dev(|a| a.http_listen = Some("0.0.0.0:8080".parse().unwrap())).is_err());
        assert!(dev(|a| a.quic_listen = Some("[::]:4433".parse().unwrap())).is_err());
        assert!(dev(|a| a.http_listen = Some("[::1]:8080".parse().unwrap())).is_ok());
        assert!(dev(|a| a.jwt_secret = Some("x".repeat(32))).is_err());
        let file: FileOptions = toml::from_str("dev = true").unwrap();
        let mut a = ServeArgs::default();
        a.merge_file(file);
        assert!(Config::resolve(a).unwrap().is_development());
    }

    #[test]
    fn jwt_algorithms_by_their_jose_names() {
        for (text, alg) in [
            ("RS256", JwtAlg::RS256),
            ("rs256", JwtAlg::RS256),
            ("EdDSA", JwtAlg::EdDSA),
            ("eddsa", JwtAlg::EdDSA),
            ("ES256", JwtAlg::ES256),
        ] {
            assert_eq!(text.parse::<JwtAlg>(), Ok(alg));
            let file: FileOptions = toml::from_str(&format!("jwt-alg = \"{text}\"")).unwrap();
            assert_eq!(file.jwt_alg, Some(alg));
        }
        assert!("none".parse::<JwtAlg>().is_err());
    }
}
