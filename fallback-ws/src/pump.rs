//! The loop that moves messages between one WebSocket and one [`WsSession`].
//!
//! One task per connection. The loop waits for whichever comes first: a client message, the
//! session's next piece of work, a ping tick, or the session's interrupt (slow consumer,
//! shutdown). Messages produced by one wake-up are written together and flushed once. A write
//! that blocks (the client stopped reading) is raced against the interrupt, so a stuck socket
//! can always be closed. Never interprets message contents: that is the session's job.

use edgestream_codec::CloseCode as Code;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt, SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
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

/// A data message to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    Binary(Bytes),
    Text(Utf8Bytes),
}

/// The same message sent back (echo servers, tests).
impl From<Incoming> for Outgoing {
    fn from(m: Incoming) -> Self {
        match m {
            Incoming::Binary(b) => Outgoing::Binary(b),
            Incoming::Text(t) => Outgoing::Text(t),
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

    /// Waits until the session has work (an event to send, a timer). Must be cancel-safe: the
    /// pump drops this future whenever something else happens first.
    fn wait(&mut self) -> impl Future<Output = Self::Wake> + Send;

    /// Does the work found by [`WsSession::wait`], appending messages to `out`. `Err` closes
    /// the connection after `out` is written.
    fn on_wake(
        &mut self,
        wake: Self::Wake,
        out: &mut Vec<Outgoing>,
    ) -> impl Future<Output = Result<(), Close>> + Send;

    /// Handles one client message, appending replies to `out`. `Err` closes the connection
    /// after `out` is written.
    fn on_message(
        &mut self,
        msg: Incoming,
        out: &mut Vec<Outgoing>,
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
    let mut out: Vec<Outgoing> = Vec::new();
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
            let write = async {
                for m in out.drain(..) {
                    ws.feed(match m {
                        Outgoing::Binary(b) => Message::Binary(b),
                        Outgoing::Text(t) => Message::Text(t),
                    })
                    .await?;
                }
                ws.flush().await
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
            out.clear();
        }
        if let Err(c) = step {
            break c;
        }
    };
    session.on_close(&close);
    close_with(&mut ws, &close, cfg.close_timeout).await;
    End::Closed(close)
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
