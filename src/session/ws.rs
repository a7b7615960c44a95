//! The WebSocket driver (PROTOCOL.md sections 4.2 and 4.3): moves messages between
//! `edgestream-ws`'s pump and the [`SessionCore`], and makes the core's I/O. It decides
//! nothing about the protocol.
//!
//! The session starts on the first wake-up after the upgrade (or the client's first message),
//! so that a refusal is a close code the client can read.

use std::sync::Arc;

use edgestream_ws::{Close, Incoming, Outgoing, WsSession};
use tokio::time::Instant;

use super::core::{self, FrameBytes, Layout, Message, Read, SessionCore, Transmit};
use super::io::SessionIo;
use super::{ConnectParams, SessionEnv};
use crate::close::Refusal;
use crate::hub::{Live, Overflow};
use crate::metrics::Transport;

/// Live items handed to the core per wake-up before the socket is flushed.
const LIVE_BATCH: usize = 256;

/// What woke the session.
#[derive(Debug)]
pub enum Wake {
    Start,
    Live(Live),
    Read(Read),
    Timeout,
}

/// One WebSocket client.
pub struct WsStreamSession {
    env: Arc<SessionEnv>,
    io: SessionIo,
    queue: crate::hub::Queue,
    overflow: Arc<Overflow>,
    /// The query until the start, then the core.
    state: State,
    /// When the upgrade request arrived (for the handshake histogram).
    started: Instant,
}

enum State {
    New(Result<ConnectParams, Refusal>),
    Open(Box<SessionCore>),
    /// Starting, or refused at the start.
    Gone,
}

impl WsStreamSession {
    /// A session for a `/v1/stream` request; nothing is checked until it starts.
    /// `started`: when the upgrade request arrived.
    /// `engine`: the browser engine its User-Agent names (metrics only).
    pub fn new(
        env: Arc<SessionEnv>,
        query: &str,
        bearer: Option<&str>,
        engine: crate::metrics::Engine,
        started: Instant,
    ) -> Self {
        let (io, queue, overflow) = SessionIo::new(env.clone());
        let params = ConnectParams::parse(query, bearer).map(|mut p| {
            p.engine = engine;
            p
        });
        WsStreamSession {
            state: State::New(params),
            env,
            io,
            queue,
            overflow,
            started,
        }
    }

    async fn start(&mut self, out: &mut Vec<Outgoing<FrameBytes>>) -> Result<(), Close> {
        let State::New(params) = std::mem::replace(&mut self.state, State::Gone) else {
            return Ok(());
        };
        let now = Instant::now();
        let mut core = params
            .and_then(|p| {
                let layout = Layout::Socket(p.format);
                SessionCore::admit(self.env.clone(), &p, layout, now)
            })
            .map_err(close)?;
        self.env
            .metrics
            .transport(Transport::WebSocket)
            .handshake
            .observe(now.saturating_duration_since(self.started).as_secs_f64());
        self.io.drive(&mut core).await;
        self.state = State::Open(Box::new(core));
        self.flush(out)
    }

    fn core(&mut self) -> Option<&mut SessionCore> {
        match &mut self.state {
            State::Open(core) => Some(core),
            _ => None,
        }
    }

    /// Moves the core's transmits to the socket.
    fn flush(&mut self, out: &mut Vec<Outgoing<FrameBytes>>) -> Result<(), Close> {
        let Some(core) = self.core() else {
            return Ok(());
        };
        while let Some(t) = core.poll_transmit() {
            match t {
                Transmit::Control(Message::Binary(b)) => {
                    out.push(Outgoing::Binary(FrameBytes::Own(b)))
                }
                // The core makes text from JSON it built or validated: always UTF-8.
                Transmit::Control(Message::Text(t)) => out.push(Outgoing::Text(FrameBytes::Own(t))),
                Transmit::Control(Message::Event(f)) if f.is_text() => {
                    out.push(Outgoing::Text(FrameBytes::Event(f)))
                }
                Transmit::Control(Message::Event(f)) => {
                    out.push(Outgoing::Binary(FrameBytes::Event(f)))
                }
                Transmit::Close(r) => return Err(close(r)),
                // Streams and datagrams are WebTransport's; a socket core emits none.
                Transmit::Open(_)
                | Transmit::Stream(..)
                | Transmit::Finish(_)
                | Transmit::Abort(_)
                | Transmit::Datagram(_) => {}
            }
        }
        Ok(())
    }
}

fn close(r: Refusal) -> Close {
    Close::new(r.code.code(), r.reason)
}

impl WsSession for WsStreamSession {
    type Wake = Wake;
    type Payload = FrameBytes;

    async fn wait(&mut self) -> Wake {
        let core = match &mut self.state {
            State::New(_) => return Wake::Start,
            State::Open(core) => core,
            State::Gone => return std::future::pending().await,
        };
        // Timers first, so that a busy queue or a long replay never starves heartbeats (clients
        // treat three missing heartbeats as a dead link) or the token expiry.
        let deadline = core.poll_timeout();
        if Instant::now() >= deadline {
            return Wake::Timeout;
        }
        if core.wants_read() {
            // Keep the queue moving during a replay: live items first, then the next read.
            return match self.queue.try_recv() {
                Ok(e) => Wake::Live(e),
                Err(_) => match core.poll_read() {
                    Some(r) => Wake::Read(r),
                    None => Wake::Timeout,
                },
            };
        }
        tokio::select! {
            biased;
            e = self.queue.recv() => Wake::Live(e),
            _ = tokio::time::sleep_until(deadline) => Wake::Timeout,
        }
    }

    async fn on_wake(
        &mut self,
        wake: Wake,
        out: &mut Vec<Outgoing<FrameBytes>>,
    ) -> Result<(), Close> {
        if let Wake::Start = wake {
            return self.start(out).await;
        }
        let Some(core) = (match &mut self.state {
            State::Open(core) => Some(core),
            _ => None,
        }) else {
            return Ok(());
        };
        match wake {
            Wake::Start => {}
            Wake::Live(item) => {
                core.handle_live(item);
                for _ in 1..LIVE_BATCH {
                    match self.queue.try_recv() {
                        Ok(item) => core.handle_live(item),
                        Err(_) => break,
                    }
                }
            }
            Wake::Read(r) => {
                let (stream, result) = self.io.read(r).await;
                core.handle_read(stream, result, Instant::now());
            }
            Wake::Timeout => core.handle_timeout(Instant::now()),
        }
        self.flush(out)
    }

    async fn on_message(
        &mut self,
        msg: Incoming,
        out: &mut Vec<Outgoing<FrameBytes>>,
    ) -> Result<(), Close> {
        if let State::New(_) = self.state {
            // The client spoke first: authenticate and subscribe before handling it.
            self.start(out).await?;
        }
        let State::Open(core) = &mut self.state else {
            return Ok(());
        };
        let now = Instant::now();
        match msg {
            Incoming::Binary(b) => core.handle_binary(b, now),
            Incoming::Text(t) => core.handle_text(t.as_str(), now),
        }
        self.io.drive(core).await;
        self.flush(out)
    }

    fn on_close(&mut self, close: &Close) {
        self.env.metrics.record_close(close.code);
    }

    fn interrupted(&self) -> impl std::future::Future<Output = Close> + Send + 'static {
        let shutdown = self.env.shutdown.clone();
        let overflow = self.overflow.clone();
        async move {
            tokio::select! {
                _ = shutdown.cancelled() => close(core::draining()),
                _ = overflow.wait() => close(core::slow_consumer()),
            }
        }
    }
}
