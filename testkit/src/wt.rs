//! A WebTransport client of `/v1/stream` (PROTOCOL.md section 4.1), pinned to the server's
//! certificate hash like a browser with `serverCertificateHashes`.
//!
//! Every org stream is read by a task that forwards its frames, tagged with the org, into one
//! channel; an org can be stalled (its stream left unread) to test per-org flow control.

use std::collections::HashSet;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use bytes::{Bytes, BytesMut};
use edgestream_codec::Frame;
use tokio::sync::{mpsc, watch, Mutex};
use web_transport_quinn::{SendStream, Session, SessionError, WebTransportError};

use crate::ws::{as_event, Ev};
use crate::HANG_GUARD;

/// Something that arrived on an org stream.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamItem {
    Frame {
        org: String,
        frame: Frame,
    },
    /// The stream ended (FIN) after these frames.
    Finished {
        org: String,
    },
    /// Reading the stream failed (reset, or the session or connection closed).
    Failed {
        org: String,
        error: String,
    },
}

pub struct WtClient {
    pub session: Session,
    control: Option<SendStream>,
    control_frames: mpsc::UnboundedReceiver<Frame>,
    control_tx: mpsc::UnboundedSender<Frame>,
    items: mpsc::UnboundedReceiver<StreamItem>,
    stalled: watch::Sender<HashSet<String>>,
    datagrams: Arc<Mutex<()>>,
}

/// Connects to `url` (`https://127.0.0.1:PORT/v1/stream?...`), trusting the certificate with
/// this base64 SHA-256 (from `/v1/cert-hash`).
pub async fn connect(url: &str, cert_sha256_b64: &str) -> anyhow::Result<WtClient> {
    Connector::new(cert_sha256_b64)?.connect(url).await
}

/// One client endpoint (one UDP socket) for many sessions, as a load generator wants.
pub struct Connector {
    client: web_transport_quinn::Client,
}

/// Kernel buffers asked for each client socket: many sessions share one socket, and the
/// default (about 208 KiB) drops datagrams under a fan-out burst.
const SOCKET_BUFFER: usize = 4 << 20;

/// TLS 1.3 with ALPN h3, trusting exactly the certificate with this base64 SHA-256 (tests
/// that speak raw QUIC start from it).
pub fn client_crypto(cert_sha256_b64: &str) -> anyhow::Result<rustls::ClientConfig> {
    use base64::Engine as _;
    let hash = base64::engine::general_purpose::STANDARD.decode(cert_sha256_b64)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(CertHash { hash, provider }))
        .with_no_client_auth();
    crypto.alpn_protocols = vec![web_transport_quinn::ALPN.as_bytes().to_vec()];
    Ok(crypto)
}

impl Connector {
    pub fn new(cert_sha256_b64: &str) -> anyhow::Result<Self> {
        Self::bound(cert_sha256_b64, std::net::Ipv4Addr::LOCALHOST)
    }

    /// A connector whose UDP socket is bound to `ip` (load tests spread over 127.0.0.x).
    pub fn bound(cert_sha256_b64: &str, ip: std::net::Ipv4Addr) -> anyhow::Result<Self> {
        let config = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(client_crypto(cert_sha256_b64)?)?,
        ));
        let socket = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
        let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
        socket.bind(&std::net::SocketAddr::from((ip, 0)).into())?;
        socket.set_nonblocking(true)?;
        let runtime = quinn::default_runtime().context("no async runtime")?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            None,
            socket.into(),
            runtime,
        )?;
        Ok(Connector {
            client: web_transport_quinn::Client::new(endpoint, config),
        })
    }

    pub async fn connect(&self, url: &str) -> anyhow::Result<WtClient> {
        let url = url::Url::parse(url)?;
        let session = tokio::time::timeout(HANG_GUARD, self.client.connect(url))
            .await
            .context("connect timed out")??;
        Ok(WtClient::from_session(session))
    }
}

/// Trusts exactly the certificate with this SHA-256 (what a browser does with
/// `serverCertificateHashes`); signatures are still checked.
#[derive(Debug)]
struct CertHash {
    hash: Vec<u8>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for CertHash {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use sha2::Digest as _;
        if sha2::Sha256::digest(end_entity.as_ref())[..] == self.hash[..] {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl WtClient {
    fn from_session(session: Session) -> WtClient {
        let (items_tx, items) = mpsc::unbounded_channel();
        let (stalled, _) = watch::channel(HashSet::new());
        let (control_tx, control_frames) = mpsc::unbounded_channel();
        // Accept org streams as they come.
        {
            let session = session.clone();
            let stalled = stalled.clone();
            tokio::spawn(async move {
                while let Ok(recv) = session.accept_uni().await {
                    tokio::spawn(read_org_stream(
                        recv,
                        session.clone(),
                        items_tx.clone(),
                        stalled.subscribe(),
                    ));
                }
            });
        }
        WtClient {
            session,
            control: None,
            control_frames,
            control_tx,
            items,
            stalled,
            datagrams: Arc::new(Mutex::new(())),
        }
    }
}

async fn read_org_stream(
    mut recv: web_transport_quinn::RecvStream,
    session: Session,
    tx: mpsc::UnboundedSender<StreamItem>,
    mut stalled: watch::Receiver<HashSet<String>>,
) {
    let mut buf = BytesMut::new();
    let mut org: Option<String> = None;
    loop {
        while let Ok(Some(frame)) = Frame::decode(&mut buf, 1 << 24) {
            if let Frame::Subscribed { org: o, .. } = &frame {
                org = Some(o.clone());
            }
            let o = org.clone().unwrap_or_default();
            if tx.send(StreamItem::Frame { org: o, frame }).is_err() {
                return;
            }
        }
        if let Some(o) = &org {
            // A stalled org's stream is left unread until released.
            let _ = stalled.wait_for(|s| !s.contains(o)).await;
        }
        match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(c)) => buf.extend_from_slice(&c.bytes),
            Ok(None) => {
                let _ = tx.send(StreamItem::Finished {
                    org: org.unwrap_or_default(),
                });
                return;
            }
            Err(e) => {
                // The session error can hide the QUIC one (a CONNECT stream that ended without
                // a capsule reads as "closed"); name both.
                let quic = (*session)
                    .close_reason()
                    .map_or_else(String::new, |r| format!(" (QUIC: {r})"));
                let _ = tx.send(StreamItem::Failed {
                    org: org.unwrap_or_default(),
                    error: format!("{e}{quic}"),
                });
                return;
            }
        }
    }
}

impl WtClient {
    /// The next frame from any org stream (or the end of one), presence changes skipped
    /// (PRESENCE goes to every subscriber of an org; tests of presence read
    /// [`Self::next_any_item`]).
    pub async fn next_item(&mut self) -> anyhow::Result<StreamItem> {
        loop {
            match self.next_any_item().await? {
                StreamItem::Frame {
                    frame: Frame::Presence { .. },
                    ..
                } => continue,
                other => return Ok(other),
            }
        }
    }

    /// The next item from any org stream, whatever it is.
    pub async fn next_any_item(&mut self) -> anyhow::Result<StreamItem> {
        tokio::time::timeout(HANG_GUARD, self.items.recv())
            .await
            .context("nothing on the org streams in time")?
            .context("session ended")
    }

    /// The next frame from any org stream, waiting as long as it takes (an idle session's
    /// heartbeats are datagrams: its streams can be silent for good).
    pub async fn next_frame_patient(&mut self) -> anyhow::Result<Frame> {
        match self.items.recv().await.context("session ended")? {
            StreamItem::Frame { frame, .. } => Ok(frame),
            StreamItem::Finished { org } => bail!("stream of {org} finished"),
            StreamItem::Failed { org, error } => bail!("stream of {org} failed: {error}"),
        }
    }

    /// The next frame from any org stream (presence changes skipped).
    pub async fn next_frame(&mut self) -> anyhow::Result<Frame> {
        match self.next_item().await? {
            StreamItem::Frame { frame, .. } => Ok(frame),
            StreamItem::Finished { org } => bail!("stream of {org} finished"),
            StreamItem::Failed { org, error } => bail!("stream of {org} failed: {error}"),
        }
    }

    /// Collects `n` events (all orgs), failing on any other frame.
    pub async fn events(&mut self, n: usize) -> anyhow::Result<Vec<Ev>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let f = self.next_frame().await?;
            match as_event(f.clone())? {
                Some(e) => out.push(e),
                None => bail!("expected an event, got {f:?}"),
            }
        }
        Ok(out)
    }

    /// Leaves the org's stream unread (true) or reads it again (false).
    pub fn stall(&self, org: &str, stalled: bool) {
        self.stalled.send_modify(|s| {
            if stalled {
                s.insert(org.to_string());
            } else {
                s.remove(org);
            }
        });
    }

    /// Sends a frame on the control stream (opened on first use).
    pub async fn send_control(&mut self, f: &Frame) -> anyhow::Result<()> {
        if self.control.is_none() {
            let (send, mut recv) = self.session.open_bi().await?;
            let tx = self.control_tx.clone();
            tokio::spawn(async move {
                let mut buf = BytesMut::new();
                loop {
                    while let Ok(Some(f)) = Frame::decode(&mut buf, 1 << 20) {
                        if tx.send(f).is_err() {
                            return;
                        }
                    }
                    match recv.read_chunk(64 * 1024, true).await {
                        Ok(Some(c)) => buf.extend_from_slice(&c.bytes),
                        _ => return,
                    }
                }
            });
            self.control = Some(send);
        }
        let send = self.control.as_mut().expect("opened above");
        send.write_all(&f.to_bytes()).await?;
        Ok(())
    }

    /// Sends raw bytes on the control stream.
    pub async fn send_control_raw(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        if self.control.is_none() {
            self.send_control(&Frame::Unknown {
                kind: 0x3f,
                body: Bytes::new(),
            })
            .await?;
        }
        self.control
            .as_mut()
            .expect("opened")
            .write_all(bytes)
            .await?;
        Ok(())
    }

    /// The next frame the server wrote on the control stream.
    pub async fn next_control(&mut self) -> anyhow::Result<Frame> {
        tokio::time::timeout(HANG_GUARD, self.control_frames.recv())
            .await
            .context("nothing on the control stream in time")?
            .context("control stream ended")
    }

    /// The next datagram, decoded.
    pub async fn next_datagram(&self) -> anyhow::Result<Frame> {
        let _one_reader = self.datagrams.lock().await;
        let d = tokio::time::timeout(HANG_GUARD, self.session.read_datagram())
            .await
            .context("no datagram in time")??;
        Ok(Frame::decode_exact(d, 1 << 16)?)
    }

    pub fn send_datagram(&self, f: &Frame) -> anyhow::Result<()> {
        self.session.send_datagram(f.to_bytes())?;
        Ok(())
    }

    /// Waits for the server to close the session; returns its code and reason.
    pub async fn closed(&self) -> anyhow::Result<(u32, String)> {
        let e = tokio::time::timeout(HANG_GUARD, self.session.closed())
            .await
            .context("session not closed in time")?;
        close_code(&e).with_context(|| format!("closed without a session close code: {e}"))
    }

    /// Waits for the server to close the session; its code as one of the contract's.
    pub async fn closed_code(&self) -> anyhow::Result<edgestream_codec::CloseCode> {
        let (code, reason) = self.closed().await?;
        u16::try_from(code)
            .ok()
            .and_then(edgestream_codec::CloseCode::from_code)
            .with_context(|| format!("close code {code} ({reason}) is not the contract's"))
    }

    /// Closes the session from the client side.
    pub fn close(&self, code: u32) {
        self.session.close(code, b"client done");
    }
}

/// The WebTransport close code and reason in a session error, if any.
pub fn close_code(e: &SessionError) -> Option<(u32, String)> {
    match e {
        SessionError::WebTransportError(WebTransportError::Closed(code, reason)) => {
            Some((*code, reason.clone()))
        }
        _ => None,
    }
}
