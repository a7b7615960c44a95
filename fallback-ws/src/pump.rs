//! The loop that moves messages between one WebSocket and one [`WsSession`].
//!
//! One task per connection. The loop waits for whichever comes first: a client message, the
//! session's next piece of work, a ping tick, or the session's interrupt (slow consumer,
//! shutdown). Messages produced by one wake-up are written together and flushed once. A write
//! that blocks (the client stopped reading) is raced against the interrupt, so a stuck socket
//! can always be closed. Never interprets message contents: that is the session's job.
//!
//! Data messages do not go through tungstenite's write buffer: a server's frames are unmasked,
//! so a message's bytes on the wire are a 2-10 byte header and the payload as the session
//! handed it. The pump writes them with vectored writes ([`Frames`]), all the messages of a
//! wake-up in one syscall when the socket takes them: a large payload (an event's bytes are
//! built once and shared by every session) is written from the shared buffer, a small one is
//! copied next to its header. tungstenite still reads, and writes the
//! control frames (pings, pongs, close); its buffer is flushed before data frames are written,
//! and data frames are written whole before it writes again, so frames never interleave.

use edgestream_codec::CloseCode as Code;
use std::future::Future;
use std::time::Duration;

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{FutureExt, SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::time::{interval, timeout, Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::{
    self,
    protocol::{frame::coding::CloseCode, CloseFrame, Role},
    Message, Utf8Bytes,
};
use tokio_tungstenite::WebSocketStream;

use crate::WsConfig;

/// A data message from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    Binary(Bytes),
    Text(Utf8Bytes),
}

/// A data message to the client, its bytes held by `P` (`Bytes`, or something a session
/// shares with many others and lends the pump: it copies small messages out of [`Payload::bytes`]
/// and clones only large ones).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing<P = Bytes> {
    Binary(P),
    /// Must be UTF-8 (the pump writes it as it is; a client closes with 1007 otherwise).
    Text(P),
}

/// What holds the bytes of an [`Outgoing`] message.
pub trait Payload: Send + 'static {
    fn bytes(&self) -> &Bytes;
}

impl Payload for Bytes {
    fn bytes(&self) -> &Bytes {
        self
    }
}

/// The same message sent back (echo servers, tests).
impl From<Incoming> for Outgoing {
    fn from(m: Incoming) -> Self {
        match m {
            Incoming::Binary(b) => Outgoing::Binary(b),
            Incoming::Text(t) => Outgoing::Text(t.into()),
        }
    }
}

/// A close code and reason to end the connection with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    pub code: u16,
    pub reason: String,
}

impl Close {
    pub fn new(code: u16, reason: impl Into<String>) -> Self {
        Close {
            code,
            reason: reason.into(),
        }
    }
}

/// What a session does; the pump calls it and handles the socket.
pub trait WsSession: Send {
    /// What [`WsSession::wait`] found to do.
    type Wake: Send;
    /// What holds the bytes of the session's messages.
    type Payload: Payload;

    /// Waits until the session has work (an event to send, a timer). Must be cancel-safe: the
    /// pump drops this future whenever something else happens first.
    fn wait(&mut self) -> impl Future<Output = Self::Wake> + Send;

    /// Does the work found by [`WsSession::wait`], appending messages to `out`. `Err` closes
    /// the connection after `out` is written.
    fn on_wake(
        &mut self,
        wake: Self::Wake,
        out: &mut Vec<Outgoing<Self::Payload>>,
    ) -> impl Future<Output = Result<(), Close>> + Send;

    /// Handles one client message, appending replies to `out`. `Err` closes the connection
    /// after `out` is written.
    fn on_message(
        &mut self,
        msg: Incoming,
        out: &mut Vec<Outgoing<Self::Payload>>,
    ) -> impl Future<Output = Result<(), Close>> + Send;

    /// Resolves when the connection must close at once, even mid-write (called once).
    fn interrupted(&self) -> impl Future<Output = Close> + Send + 'static;

    /// Told the close code when the server decides to close, before the closing handshake
    /// (which may take up to the close timeout on a congested socket).
    fn on_close(&mut self, _close: &Close) {}
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The server closed with this code.
    Closed(Close),
    /// The client closed (with its code, if any).
    PeerClosed(Option<u16>),
    /// The connection failed (I/O error, reset).
    Failed(String),
}

/// Runs a session over an upgraded connection until either side closes.
pub async fn run<S: WsSession>(
    upgraded: hyper::upgrade::Upgraded,
    session: S,
    cfg: &WsConfig,
) -> End {
    let ws = WebSocketStream::from_raw_socket(
        TokioIo::new(upgraded),
        Role::Server,
        Some(cfg.tungstenite()),
    )
    .await;
    run_on(ws, session, cfg).await
}

/// [`run`] over any WebSocket stream (tests use it with in-memory pipes).
pub async fn run_on<T, S>(mut ws: WebSocketStream<T>, mut session: S, cfg: &WsConfig) -> End
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
    S: WsSession,
{
    let interrupt = session.interrupted();
    tokio::pin!(interrupt);
    let mut out: Vec<Outgoing<S::Payload>> = Vec::new();
    let mut frames = Frames::default();
    let mut last_rx = Instant::now();
    // Pings received since the socket last took everything written to it (the pongs
    // included): past PING_BURST the socket is checked, and a client whose pongs cannot be
    // written (it pings but never reads) is closed as a slow consumer.
    let mut pings = 0u32;
    let mut ticks = interval(cfg.ping_interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticks.reset();

    let close = loop {
        let step: Result<(), Close> = tokio::select! {
            biased;
            c = &mut interrupt => Err(c),
            msg = ws.next() => match msg {
                None => return End::Failed("connection reset".into()),
                Some(Err(e)) => match read_error(e) {
                    Ok(close) => Err(close),
                    Err(end) => return end,
                },
                Some(Ok(msg)) => {
                    last_rx = Instant::now();
                    match msg {
                        Message::Binary(b) => session.on_message(Incoming::Binary(b), &mut out).await,
                        Message::Text(t) => session.on_message(Incoming::Text(t), &mut out).await,
                        Message::Ping(_) => {
                            pings += 1;
                            if pings <= PING_BURST {
                                Ok(())
                            } else {
                                // One poll: ready when the socket took every byte queued.
                                match ws.flush().now_or_never() {
                                    Some(Ok(())) => {
                                        pings = 0;
                                        Ok(())
                                    }
                                    Some(Err(e)) => return End::Failed(e.to_string()),
                                    None => Err(Close::new(
                                        Code::SlowConsumer.code(),
                                        "slow consumer: pings sent while their pongs are not read",
                                    )),
                                }
                            }
                        }
                        Message::Pong(_) | Message::Frame(_) => Ok(()),
                        Message::Close(frame) => {
                            // tungstenite queued the close reply (echoing the code): flush it,
                            // then drop the TCP connection, as the server should first (RFC
                            // 6455, section 7.1.1). `close()` here would fail (the state is
                            // closing already) without sending the reply.
                            let _ = timeout(cfg.close_timeout, ws.flush()).await;
                            return End::PeerClosed(frame.map(|f| u16::from(f.code)));
                        }
                    }
                }
            },
            wake = session.wait() => session.on_wake(wake, &mut out).await,
            _ = ticks.tick() => {
                let silent = last_rx.elapsed();
                if silent >= cfg.idle_timeout {
                    Err(Close::new(1001, "idle timeout"))
                } else {
                    if silent >= cfg.ping_interval {
                        // Never waits: on a socket that takes nothing the ping is skipped and
                        // the idle timeout above ends the connection.
                        if let Some(Ok(())) = ws.feed(Message::Ping(Bytes::new())).now_or_never() {
                            let _ = ws.flush().now_or_never();
                        }
                    }
                    Ok(())
                }
            }
        };
        if !out.is_empty() {
            for m in out.drain(..) {
                frames.push(m);
            }
            let write = async {
                // tungstenite's own frames (pongs, a ping) first, then the data frames whole.
                ws.flush().await?;
                frames
                    .write_to(ws.get_mut())
                    .await
                    .map_err(tungstenite::Error::Io)
            };
            let written = tokio::select! {
                biased;
                c = &mut interrupt => Err(c),
                r = write => Ok(r),
            };
            match written {
                Err(c) => break c,
                // The buffer's cap (WsConfig::max_write_buffer) was reached: the client does
                // not read what it is sent.
                Ok(Err(tungstenite::Error::WriteBufferFull(_))) => {
                    break Close::new(
                        Code::SlowConsumer.code(),
                        "slow consumer: write buffer full",
                    )
                }
                Ok(Err(e)) => return End::Failed(e.to_string()),
                Ok(Ok(())) => pings = 0,
            }
        }
        if let Err(c) = step {
            break c;
        }
    };
    session.on_close(&close);
    // A data frame cut short by the interrupt is finished first, so that the close frame
    // starts on a frame boundary (bounded: a client that reads nothing gets no close frame).
    if !frames.is_empty() {
        match timeout(cfg.close_timeout, frames.write_to(ws.get_mut())).await {
            Ok(Ok(())) => {}
            _ => return End::Closed(close),
        }
    }
    close_with(&mut ws, &close, cfg.close_timeout).await;
    End::Closed(close)
}

/// Data frames waiting for the socket, as chunks for vectored writes. A small message is
/// copied with its header into one staging buffer (the kernel copies per slice, and a few
/// hundred small slices cost more than one copy of a few KiB); a large payload is its own
/// slice, shared, never copied. A write cancelled by the interrupt leaves the rest here (the
/// offset into the first chunk included), so the stream can be finished on a frame boundary.
#[derive(Default)]
struct Frames {
    chunks: VecDeque<Bytes>,
    /// Headers and small messages not yet cut into a chunk.
    staging: BytesMut,
}

/// Slices per vectored write (Linux takes up to 1024).
const MAX_SLICES: usize = 128;
/// Payloads up to this size are copied into the staging buffer with their header.
const COPY_AT_MOST: usize = 1024;

impl Frames {
    fn is_empty(&self) -> bool {
        self.chunks.is_empty() && self.staging.is_empty()
    }

    /// Queues one unmasked, unfragmented data frame (RFC 6455, section 5.2).
    fn push<P: Payload>(&mut self, m: Outgoing<P>) {
        let (opcode, held) = match m {
            Outgoing::Binary(b) => (0x2, b),
            Outgoing::Text(t) => (0x1, t),
        };
        let payload = held.bytes();
        let len = payload.len();
        self.staging
            .reserve(10 + if len <= COPY_AT_MOST { len } else { 0 });
        self.staging.put_u8(0x80 | opcode);
        if len < 126 {
            self.staging.put_u8(len as u8);
        } else if let Ok(len) = u16::try_from(len) {
            self.staging.put_u8(126);
            self.staging.put_u16(len);
        } else {
            self.staging.put_u8(127);
            self.staging.put_u64(len as u64);
        }
        if len <= COPY_AT_MOST {
            self.staging.extend_from_slice(payload);
        } else {
            self.cut();
            self.chunks.push_back(payload.clone());
        }
    }

    /// Moves the staged bytes into a chunk.
    fn cut(&mut self) {
        if !self.staging.is_empty() {
            self.chunks.push_back(self.staging.split().freeze());
        }
    }

    /// Writes every queued frame and flushes. Cancel-safe: a chunk leaves the queue only once
    /// the socket took it.
    async fn write_to<T: AsyncWrite + Unpin>(&mut self, io: &mut T) -> std::io::Result<()> {
        self.cut();
        while !self.chunks.is_empty() {
            if self.chunks.len() == 1 {
                // One chunk (small frames are staged together, so usually the whole wake-up):
                // a plain write, which on a socket is `send`; `writev` goes through the VFS
                // (`vfs_writev`, `fdget_pos`), 5% of the server's CPU at one event per write.
                let chunk = &mut self.chunks[0];
                let written = io.write(chunk).await?;
                if written == 0 {
                    return Err(std::io::ErrorKind::WriteZero.into());
                }
                chunk.advance(written);
                if chunk.is_empty() {
                    self.chunks.pop_front();
                }
                continue;
            }
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let n = self.chunks.len().min(MAX_SLICES);
            for (slot, chunk) in slices.iter_mut().zip(&self.chunks) {
                *slot = IoSlice::new(chunk);
            }
            let mut written = io.write_vectored(&slices[..n]).await?;
            if written == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            while written > 0 {
                let first = &mut self.chunks[0];
                if written >= first.len() {
                    written -= first.len();
                    self.chunks.pop_front();
                } else {
                    first.advance(written);
                    written = 0;
                }
            }
        }
        io.flush().await
    }
}

/// Pings a client may send while the socket holds unwritten data before it is checked.
const PING_BURST: u32 = 32;

/// Maps a read error to the close to send, or to the end when nothing more can be sent.
fn read_error(e: tungstenite::Error) -> Result<Close, End> {
    use tungstenite::error::{CapacityError, Error};
    match e {
        Error::Capacity(CapacityError::MessageTooLong { size, max_size }) => Ok(Close::new(
            4413,
            format!("message of {size} bytes exceeds {max_size}"),
        )),
        Error::Capacity(e) => Ok(Close::new(4413, e.to_string())),
        Error::Protocol(e) => Ok(Close::new(1002, e.to_string())),
        Error::Utf8(_) => Ok(Close::new(1007, "invalid UTF-8 in text message")),
        Error::ConnectionClosed | Error::AlreadyClosed => Err(End::PeerClosed(None)),
        other => Err(End::Failed(other.to_string())),
    }
}

/// Sends a close frame and waits (bounded) for the client's reply before dropping the socket.
async fn close_with<T>(ws: &mut WebSocketStream<T>, close: &Close, limit: Duration)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    let mut reason = close.reason.clone();
    // A close frame's reason is at most 123 bytes (RFC 6455, section 5.5).
    if reason.len() > 123 {
        let mut cut = 123;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
    }
    let frame = CloseFrame {
        code: CloseCode::from(close.code),
        reason: reason.into(),
    };
    let _ = timeout(limit, async {
        if ws.close(Some(frame)).await.is_err() {
            return;
        }
        // Read until the client's close arrives (or the connection ends).
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}
