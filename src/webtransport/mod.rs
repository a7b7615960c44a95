//! The WebTransport transport (PROTOCOL.md section 4.1): the QUIC listener, its TLS
//! certificate, and the accept path up to a session.
//!
//! This module, [`h3`] and [`session`] are the only places that name quinn: swapping the QUIC
//! library touches nothing else. Staged accept: QUIC handshake (with a
//! deadline, and Retry when asked or under handshake load), then the HTTP/3 CONNECT request
//! (with a deadline), then path and `Origin` checks (refused with an HTTP status, as the
//! WebTransport draft asks), then the session, which authenticates before subscribing.

pub mod h3;
pub mod lb;
pub mod session;
mod upload;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use parking_lot::RwLock;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::task::TaskTracker;

use crate::session::SessionEnv;
use crate::tls::DevCertificate;

/// When to make clients prove their address with a Retry before the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RetryPolicy {
    /// Only while many handshakes are in flight.
    #[default]
    Auto,
    /// For every new connection.
    Always,
    /// Never.
    Never,
}

/// QUIC settings of the listener.
#[derive(Debug, Clone)]
pub struct QuicConfig {
    pub listen: SocketAddr,
    /// A session idle this long (no packet from the client) is dropped.
    pub idle_timeout: Duration,
    /// Deadline for the QUIC handshake plus the WebTransport CONNECT.
    pub handshake_timeout: Duration,
    pub retry: RetryPolicy,
    /// Handshakes in flight above which `Auto` sends Retry.
    pub retry_above: usize,
    /// New connections per second above which `Auto` sends Retry.
    pub retry_above_rate: u32,
    /// PEM certificate chain and key; `None`: a self-signed development certificate.
    pub cert_files: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// Validity of the development certificate (at most 14 days).
    pub dev_cert_validity: Duration,
    /// SO_RCVBUF and SO_SNDBUF asked for the UDP socket (the kernel caps them at
    /// net.core.rmem_max / wmem_max).
    pub socket_buffer: usize,
    /// This node's id in its connection IDs (QUIC-LB plaintext), for CID-aware balancers.
    pub server_id: Option<Vec<u8>>,
    /// The stateless-reset key shared by the nodes behind one balancer (at least 32 bytes).
    pub reset_key: Option<Vec<u8>>,
}

impl Default for QuicConfig {
    fn default() -> Self {
        QuicConfig {
            listen: "127.0.0.1:4433".parse().expect("valid"),
            idle_timeout: Duration::from_secs(15),
            handshake_timeout: Duration::from_secs(10),
            retry: RetryPolicy::Auto,
            retry_above: 256,
            retry_above_rate: 200,
            cert_files: None,
            dev_cert_validity: Duration::from_secs(10 * 24 * 3600),
            socket_buffer: 16 << 20,
            server_id: None,
            reset_key: None,
        }
    }
}

/// The certificate served on UDP, replaceable while the listener runs.
pub struct Certificates {
    /// What the start-up checks learned of a configured certificate.
    configured: Option<crate::tls::ConfiguredCert>,
    current: RwLock<Arc<CertifiedKey>>,
    /// The development certificate, when no files were configured.
    dev: RwLock<Option<DevCertificate>>,
    names: Vec<String>,
    validity: time::Duration,
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificates")
            .field("dev", &*self.dev.read())
            .finish_non_exhaustive()
    }
}

/// Reads `--cert` and `--key` and checks them (parsable, a chain in order, valid now, a key of
/// a supported type that matches the certificate): every refusal names the file and what to do.
fn load_files(
    cert: &std::path::Path,
    key: &std::path::Path,
    now: time::OffsetDateTime,
) -> anyhow::Result<(CertifiedKey, crate::tls::ConfiguredCert)> {
    use rustls::pki_types::pem::{self, PemObject};
    let (c, k) = (cert.display(), key.display());
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    };
    let (cert_pem, key_pem) = (read(cert)?, read(key)?);
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{c}: not a PEM certificate file ({e})"))?;
    anyhow::ensure!(
        !chain.is_empty(),
        "{c}: no certificate found (expected PEM blocks -----BEGIN CERTIFICATE-----)"
    );
    let text = String::from_utf8_lossy(&key_pem);
    anyhow::ensure!(
        !text.contains("ENCRYPTED"),
        "{k}: the private key is encrypted; edgestream needs it decrypted \
         (openssl pkey -in {k} -out key-decrypted.pem) and readable by the service only"
    );
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        pem::Error::NoItemsFound => anyhow::anyhow!(
            "{k}: no private key found (expected a PEM block BEGIN PRIVATE KEY, \
             BEGIN EC PRIVATE KEY or BEGIN RSA PRIVATE KEY)"
        ),
        e => anyhow::anyhow!("{k}: not a PEM private key ({e})"),
    })?;
    let ders: Vec<Vec<u8>> = chain.iter().map(|d| d.to_vec()).collect();
    let found = crate::tls::check_configured(&ders, cert, now).map_err(anyhow::Error::msg)?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&private).map_err(|e| {
        anyhow::anyhow!(
            "{k}: unsupported private key ({e}); use ECDSA P-256 or P-384, RSA (2048 bits or more) or Ed25519"
        )
    })?;
    let certified = CertifiedKey::new(chain, signer);
    certified.keys_match().map_err(|e| {
        anyhow::anyhow!("{k} does not belong to the certificate in {c} ({e}): give the key the certificate was issued for")
    })?;
    Ok((certified, found))
}

fn certified(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> anyhow::Result<CertifiedKey> {
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| anyhow::anyhow!("unsupported private key: {e}"))?;
    Ok(CertifiedKey::new(chain, signer))
}

impl Certificates {
    /// Loads PEM files, or makes a development certificate for `names`.
    pub fn load(cfg: &QuicConfig, names: Vec<String>) -> anyhow::Result<Self> {
        let validity = time::Duration::try_from(cfg.dev_cert_validity)
            .map_err(|e| anyhow::anyhow!("certificate validity: {e}"))?;
        let (key, dev, configured) = match &cfg.cert_files {
            Some((cert, key)) => {
                let (certified, found) = load_files(cert, key, time::OffsetDateTime::now_utc())?;
                (certified, None, Some(found))
            }
            None => {
                let dev =
                    DevCertificate::generate(&names, time::OffsetDateTime::now_utc(), validity)?;
                (Self::certified_dev(&dev)?, Some(dev), None)
            }
        };
        Ok(Certificates {
            configured,
            current: RwLock::new(Arc::new(key)),
            dev: RwLock::new(dev),
            names,
            validity,
        })
    }

    fn certified_dev(dev: &DevCertificate) -> anyhow::Result<CertifiedKey> {
        certified(
            vec![CertificateDer::from(dev.cert_der.clone())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(dev.key_der.clone())),
        )
    }

    /// A configured certificate's subject, for the start line.
    pub fn configured_subject(&self) -> Option<&str> {
        self.configured.as_ref().map(|c| c.subject.as_str())
    }

    /// When the certificate served now expires.
    pub fn not_after(&self) -> Option<time::OffsetDateTime> {
        match &self.configured {
            Some(c) => Some(c.not_after),
            None => self.dev.read().as_ref().map(|d| d.not_after),
        }
    }

    /// The base64 SHA-256 of the development certificate (`None` with a configured one).
    pub fn dev_hash(&self) -> Option<String> {
        self.dev.read().as_ref().map(DevCertificate::sha256_base64)
    }

    /// Replaces the development certificate when it nears its end. New handshakes get the new
    /// one; sessions already open keep going. Returns whether it rotated.
    pub fn rotate_if_due(&self, now: time::OffsetDateTime) -> anyhow::Result<bool> {
        let due = self
            .dev
            .read()
            .as_ref()
            .is_some_and(|d| d.needs_rotation(now));
        if !due {
            return Ok(false);
        }
        let dev = DevCertificate::generate(&self.names, now, self.validity)?;
        *self.current.write() = Arc::new(Self::certified_dev(&dev)?);
        tracing::info!(sha256 = %dev.sha256_base64(), "development certificate rotated");
        *self.dev.write() = Some(dev);
        Ok(true)
    }
}

#[derive(Debug)]
struct Resolver(Arc<Certificates>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current.read().clone())
    }
}

/// TLS for the HTTP listener (`--http-tls`): the same certificate as QUIC (rotations included),
/// TLS 1.2 and 1.3, ALPN `http/1.1` (WebSocket upgrades need HTTP/1.1).
pub fn http_tls(certs: Arc<Certificates>) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Resolver(certs)));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The names the development certificate is made for.
pub fn dev_cert_names(listen: SocketAddr) -> Vec<String> {
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if !listen.ip().is_unspecified() && !names.contains(&listen.ip().to_string()) {
        names.push(listen.ip().to_string());
    }
    names
}

/// Builds the quinn endpoint: TLS 1.3 only, ALPN h3, no 0-RTT, limits fit for a push server.
/// `peers`: who is alive, for the stateless-reset rule (`lb`). Also returns the UDP socket's
/// inode, by which the kernel's drop count for it is read (`metrics::udp_socket_drops`).
pub fn endpoint(
    cfg: &QuicConfig,
    certs: Arc<Certificates>,
    peers: Arc<lb::Peers>,
) -> anyhow::Result<(quinn::Endpoint, Option<u64>)> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Resolver(certs)));
    tls.alpn_protocols = vec![b"h3".to_vec()];
    // No early data: a session must never be opened from replayable 0-RTT data.
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(quinn::IdleTimeout::try_from(cfg.idle_timeout)?));
    // Clients open the HTTP/3 control and QPACK streams, the control stream and, later,
    // uploads: a handful of streams, not the defaults of 100 and 256 KiB windows everywhere.
    t.max_concurrent_uni_streams(8u32.into());
    t.max_concurrent_bidi_streams(8u32.into());
    t.stream_receive_window((256u32 * 1024).into());
    t.receive_window((1024u32 * 1024).into());
    t.send_window(2 * 1024 * 1024);
    t.datagram_receive_buffer_size(Some(64 * 1024));
    t.datagram_send_buffer_size(256 * 1024);
    server.transport_config(Arc::new(t));
    let socket = udp_socket(cfg.listen, cfg.socket_buffer)?;
    let inode = socket_inode(&socket);
    let runtime = quinn::default_runtime().context("no async runtime")?;
    let endpoint = quinn::Endpoint::new(
        lb::endpoint_config(cfg.server_id.as_deref(), cfg.reset_key.as_deref(), peers)?,
        Some(server),
        socket,
        runtime,
    )?;
    Ok((endpoint, inode))
}

/// The socket's inode (what /proc/net/udp lists it by), from /proc/self/fd; `None` off Linux.
fn socket_inode(socket: &std::net::UdpSocket) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let link = std::fs::read_link(format!("/proc/self/fd/{}", socket.as_raw_fd())).ok()?;
    link.to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The listener's UDP socket with large kernel buffers. One socket carries every session, and
/// the kernel's default receive buffer (about 208 KiB) overflows under a fan-out burst: in the
/// bench at 1,000 sessions, 10-20% of datagrams were dropped at the sockets, congestion
/// control collapsed and sessions hit the idle timeout.
pub fn udp_socket(addr: SocketAddr, buffer: usize) -> anyhow::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Accept IPv4-mapped clients too when bound to [::].
        let _ = socket.set_only_v6(false);
    }
    if let Err(e) = socket.set_recv_buffer_size(buffer) {
        tracing::warn!(error = %e, "cannot set the UDP receive buffer");
    }
    if let Err(e) = socket.set_send_buffer_size(buffer) {
        tracing::warn!(error = %e, "cannot set the UDP send buffer");
    }
    let (recv, send) = (socket.recv_buffer_size()?, socket.send_buffer_size()?);
    // Linux reports twice the size it was asked for (bookkeeping overhead included).
    if recv < buffer || send < buffer {
        tracing::warn!(
            asked = buffer,
            recv,
            send,
            "UDP socket buffers capped by the kernel; raise net.core.rmem_max and wmem_max"
        );
    }
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Accepts connections until `env.shutdown` is cancelled; each session runs in `tracker`.
/// The caller closes the endpoint after the sessions have drained.
pub async fn serve(
    endpoint: quinn::Endpoint,
    env: Arc<SessionEnv>,
    cfg: QuicConfig,
    origins: edgestream_ws::OriginPolicy,
    tracker: TaskTracker,
) {
    let handshaking = Arc::new(AtomicUsize::new(0));
    let control = h3::wire::control_stream(&session::WINDOWS);
    let mut rate = HandshakeRate::default();
    let origins = Arc::new(origins);
    loop {
        let incoming = tokio::select! {
            _ = env.shutdown.cancelled() => break,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
        };
        let retry = match cfg.retry {
            RetryPolicy::Always => true,
            RetryPolicy::Never => false,
            RetryPolicy::Auto => {
                let per_second = rate.count(std::time::Instant::now());
                handshaking.load(Ordering::Relaxed) >= cfg.retry_above
                    || per_second > cfg.retry_above_rate
            }
        };
        if retry && !incoming.remote_address_validated() && incoming.may_retry() {
            let _ = incoming.retry();
            continue;
        }
        let (env, cfg, origins, handshaking, control) = (
            env.clone(),
            cfg.clone(),
            origins.clone(),
            handshaking.clone(),
            control.clone(),
        );
        let sessions = tracker.clone();
        let started = tokio::time::Instant::now();
        tracker.spawn(async move {
            handshaking.fetch_add(1, Ordering::Relaxed);
            let accepted =
                tokio::time::timeout(cfg.handshake_timeout, accept(incoming, &origins, control))
                    .await;
            handshaking.fetch_sub(1, Ordering::Relaxed);
            match accepted {
                // A task of its own: the handshake's state (the larger future) is freed
                // rather than kept for the session's life.
                Ok(Some((wt, query))) => {
                    let span = crate::session::session_span("webtransport");
                    let task = span.in_scope(|| session::run(env, wt, &query, started));
                    sessions.spawn(tracing::Instrument::instrument(task, span));
                }
                Ok(None) => {}
                Err(_) => tracing::debug!("QUIC handshake or CONNECT timed out"),
            }
        });
    }
    // The endpoint stays open: sessions are closing with 4503 and their capsules must get
    // out. The server closes it once they are done.
}

/// New connections in the current one-second window (for `RetryPolicy::Auto`).
#[derive(Debug, Default)]
struct HandshakeRate {
    window: Option<std::time::Instant>,
    count: u32,
}

impl HandshakeRate {
    /// Counts one new connection at `now`; returns the count in its window.
    fn count(&mut self, now: std::time::Instant) -> u32 {
        match self.window {
            Some(start) if now.duration_since(start) < Duration::from_secs(1) => {
                self.count = self.count.saturating_add(1)
            }
            _ => {
                self.window = Some(now);
                self.count = 1;
            }
        }
        self.count
    }
}

/// Handshake and CONNECT: the session and its query, or `None` when refused.
async fn accept(
    incoming: quinn::Incoming,
    origins: &edgestream_ws::OriginPolicy,
    control: bytes::Bytes,
) -> Option<(h3::Session, String)> {
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "QUIC handshake failed");
            return None;
        }
    };
    let request = match h3::accept(conn.clone(), control).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(error = %e, "WebTransport CONNECT failed");
            conn.close(quinn::VarInt::from_u32(h3::wire::H3_REQUEST_REJECTED), b"");
            return None;
        }
    };
    if request.url.path() != "/v1/stream" {
        request.reject(h3::http::StatusCode::NOT_FOUND).await;
        return None;
    }
    if !origins.allows(&request.headers) {
        request.reject(h3::http::StatusCode::FORBIDDEN).await;
        return None;
    }
    let query = request.url.query().unwrap_or("").to_owned();
    match request.ok().await {
        Ok(s) => Some((s, query)),
        Err(e) => {
            tracing::debug!(error = %e, "WebTransport CONNECT answer failed");
            None
        }
    }
}
