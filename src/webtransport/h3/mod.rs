//! WebTransport over HTTP/3 on quinn, the server's side, written here (issue 20): the HTTP/3
//! control streams and SETTINGS, the extended CONNECT, and a session's streams, datagrams and
//! capsules. Only what a WebTransport server needs: one session per connection, no HTTP
//! requests other than the CONNECT, no QPACK dynamic table (the SETTINGS leave its capacity
//! at 0, so the client's QPACK streams carry nothing we must read; they are held open, as
//! closing a critical stream is a connection error).
//!
//! The bytes are [`wire`]'s (sans-IO, unit tested); this module moves them on quinn. The
//! session driver (`super::session`) polls the session's sources itself: no task of this
//! layer runs beside it.

pub mod wire;

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use web_transport_proto::{ConnectRequest, ConnectResponse, VarInt};

pub use web_transport_proto::http;

use wire::PeerSettings;

/// Why a connection did not become a session.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("stream: {0}")]
    Read(#[from] quinn::ReadExactError),
    #[error("stream write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("CONNECT: {0}")]
    Connect(#[from] web_transport_proto::ConnectError),
    #[error("{0}")]
    Protocol(&'static str),
}

/// A CONNECT request waiting for its answer.
pub struct Request {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    control: quinn::SendStream,
    held: Vec<quinn::RecvStream>,
    peer: PeerSettings,
    /// The request's URL (path and query; the access token is in the query: never log it).
    pub url: url::Url,
    pub headers: http::HeaderMap,
}

/// Reads a varint from a stream, byte by byte as needed (no byte past it is consumed).
async fn read_varint(r: &mut quinn::RecvStream) -> Result<u64, AcceptError> {
    let mut first = [0u8; 1];
    r.read_exact(&mut first).await?;
    let len = 1usize << (first[0] >> 6);
    let mut buf = [0u8; 8];
    buf[0] = first[0];
    r.read_exact(&mut buf[1..len]).await?;
    let mut s = &buf[..len];
    VarInt::decode(&mut s)
        .map(VarInt::into_inner)
        .map_err(|_| AcceptError::Protocol("bad varint"))
}

/// The client's control stream: its SETTINGS frame (which must come first, RFC 9114 6.2.1).
async fn read_settings(r: &mut quinn::RecvStream) -> Result<PeerSettings, AcceptError> {
    let typ = read_varint(r).await?;
    if typ != 0x04 {
        return Err(AcceptError::Protocol(
            "the control stream does not start with SETTINGS",
        ));
    }
    let len = read_varint(r).await?;
    if len > wire::MAX_SETTINGS_FRAME {
        return Err(AcceptError::Protocol("SETTINGS too large"));
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).await?;
    wire::peer_settings(&payload).map_err(AcceptError::Protocol)
}

/// Reads the type of a unidirectional stream the client opened; `None` for types this server
/// does not read (stopped, as RFC 9114 section 6.2 allows).
pub async fn uni_stream(mut r: quinn::RecvStream) -> Option<(u64, quinn::RecvStream)> {
    let typ = read_varint(&mut r).await.ok()?;
    match typ {
        // Control and QPACK streams: held for the connection's life.
        0x00 | 0x02 | 0x03 => Some((typ, r)),
        _ => {
            let _ = r.stop(quinn::VarInt::from_u32(wire::H3_STREAM_CREATION_ERROR));
            None
        }
    }
}

/// Reads the signal of a bidirectional stream the client opened: `Some` for a WebTransport
/// stream of `session`; anything else is refused.
pub async fn bidi_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    session: u64,
) -> Option<(quinn::SendStream, quinn::RecvStream)> {
    let ok = read_varint(&mut recv).await.ok() == Some(0x41)
        && read_varint(&mut recv).await.ok() == Some(session);
    if ok {
        Some((send, recv))
    } else {
        let code = quinn::VarInt::from_u32(wire::H3_REQUEST_REJECTED);
        let _ = send.reset(code);
        let _ = recv.stop(code);
        None
    }
}

/// The HTTP/3 handshake and the CONNECT request. `control`: this server's control stream bytes
/// ([`wire::control_stream`], built once).
pub async fn accept(conn: quinn::Connection, control: Bytes) -> Result<Request, AcceptError> {
    let open = async {
        let mut s = conn.open_uni().await?;
        s.write_all(&control).await?;
        Ok::<_, AcceptError>(s)
    };
    let settings = async {
        let mut held = Vec::new();
        loop {
            let r = conn.accept_uni().await?;
            match uni_stream(r).await {
                Some((0x00, mut r)) => {
                    let peer = read_settings(&mut r).await?;
                    held.push(r);
                    return Ok::<_, AcceptError>((peer, held));
                }
                Some((_, r)) => held.push(r),
                None => {}
            }
        }
    };
    let connect = async {
        let (send, mut recv) = conn.accept_bi().await?;
        let req = ConnectRequest::read(&mut recv).await?;
        Ok::<_, AcceptError>((send, recv, req))
    };
    let (control, (peer, held), (send, recv, req)) = tokio::try_join!(open, settings, connect)?;
    if !peer.webtransport {
        return Err(AcceptError::Protocol(
            "the client's SETTINGS do not enable WebTransport with datagrams",
        ));
    }
    Ok(Request {
        conn,
        send,
        recv,
        control,
        held,
        peer,
        url: req.url,
        headers: req.headers,
    })
}

impl Request {
    /// Refuses the session with an HTTP status (the stream then ends; the client closes).
    pub async fn reject(mut self, status: http::StatusCode) {
        let mut buf = BytesMut::new();
        if ConnectResponse::new(status).encode(&mut buf).is_ok()
            && self.send.write_all(&buf).await.is_ok()
        {
            let _ = self.send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(1), self.send.stopped()).await;
        }
        self.conn
            .close(quinn::VarInt::from_u32(wire::H3_REQUEST_REJECTED), b"");
    }

    /// Accepts: 200, and the session.
    pub async fn ok(mut self) -> Result<Session, AcceptError> {
        let mut buf = BytesMut::new();
        ConnectResponse::OK.encode(&mut buf)?;
        self.send.write_all(&buf).await?;
        let id = quinn::VarInt::from(self.send.id()).into_inner();
        let engine = crate::metrics::Engine::from_user_agent(
            self.headers
                .get(http::header::USER_AGENT)
                .and_then(|v| v.to_str().ok()),
        );
        Ok(Session {
            engine,
            conn: self.conn,
            id,
            connect: self.send,
            connect_recv: Some(self.recv),
            _control: self.control,
            held: self.held,
            peer: self.peer,
        })
    }
}

/// An accepted session: the connection, the CONNECT stream (capsules both ways) and the
/// HTTP/3 streams that must stay open.
pub struct Session {
    conn: quinn::Connection,
    /// The session id: the CONNECT stream's id.
    id: u64,
    connect: quinn::SendStream,
    connect_recv: Option<quinn::RecvStream>,
    _control: quinn::SendStream,
    held: Vec<quinn::RecvStream>,
    /// What the client's SETTINGS allow this server.
    pub peer: PeerSettings,
    /// The browser engine of the CONNECT's User-Agent (metrics).
    pub engine: crate::metrics::Engine,
}

impl Session {
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// The client's side of the CONNECT stream (capsules), taken once by the driver.
    pub fn take_connect_recv(&mut self) -> Option<quinn::RecvStream> {
        self.connect_recv.take()
    }

    /// Keeps a stream of the HTTP/3 layer open (a QPACK stream that came late).
    pub fn hold(&mut self, r: quinn::RecvStream) {
        self.held.push(r);
    }

    /// The largest datagram payload the path takes now (0: none).
    pub fn max_datagram_size(&self) -> usize {
        self.conn
            .max_datagram_size()
            .map_or(0, |m| m.saturating_sub(wire::datagram_overhead(self.id)))
    }

    pub fn send_datagram(&self, payload: &[u8]) {
        let _ = self.conn.send_datagram(wire::datagram(self.id, payload));
    }

    /// Writes capsule bytes on the CONNECT stream if quinn takes them now; returns what is
    /// left (written at the next call).
    pub fn write_capsules(&mut self, pending: &mut BytesMut) {
        use futures_util::FutureExt;
        while !pending.is_empty() {
            match self.connect.write(pending).now_or_never() {
                Some(Ok(n)) if n > 0 => {
                    let _ = pending.split_to(n);
                }
                Some(Err(_)) => {
                    pending.clear();
                    return;
                }
                _ => return,
            }
        }
    }

    /// Closes the session: the CLOSE capsule and the CONNECT stream's end, then, once the
    /// client has them (or after `timeout`), the connection.
    pub async fn close(&mut self, code: u32, reason: &str, timeout: Duration) {
        let capsule = wire::close_capsule(code, reason);
        let h3 = web_transport_proto::error_to_http3(code);
        let delivered = async {
            self.connect.write_all(&capsule).await.ok()?;
            self.connect.finish().ok()?;
            self.connect.stopped().await.ok()
        };
        let _ = tokio::time::timeout(timeout, delivered).await;
        // The client closes once it has the capsule; give it a few round trips to.
        let grace = (self.conn.rtt() * 3).clamp(Duration::from_millis(100), timeout);
        let _ = tokio::time::timeout(grace, self.conn.closed()).await;
        let code =
            quinn::VarInt::from_u64(h3).unwrap_or(quinn::VarInt::from_u32(wire::H3_NO_ERROR));
        self.conn
            .close(code, &reason.as_bytes()[..reason.len().min(512)]);
    }
}
