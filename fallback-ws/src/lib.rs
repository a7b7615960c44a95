//! # edgestream-ws
//!
//! The WebSocket transport of edgestream (PROTOCOL.md section 4.2), as a library that knows
//! nothing of orgs, logs or tokens. It owns:
//!
//! - [`handshake`]: the RFC 6455 upgrade on a hyper request, and the `Origin` allow-list;
//! - [`WsConfig`]: message, frame and buffer limits, ping and idle timing;
//! - [`pump::run`]: the loop that moves messages between a socket and a [`WsSession`].
//!
//! The session logic (what to subscribe, what to send) is the caller's, behind the small
//! [`WsSession`] trait. That keeps the dependency one way: the `edgestream` crate depends on this
//! crate, never the reverse, and this crate can be tested over a real socket with a toy session.

pub mod handshake;
pub mod pump;

use std::time::Duration;

pub use handshake::{upgrade, HandshakeError, OriginPolicy};
pub use pump::{run, Close, Incoming, Outgoing, WsSession};
pub use tokio_tungstenite::tungstenite;

/// Limits and timing of WebSocket connections.
#[derive(Debug, Clone)]
pub struct WsConfig {
    /// Largest message a client may send, in bytes (larger: close 4413).
    pub max_message_size: usize,
    /// Largest single WebSocket frame a client may send, in bytes.
    pub max_frame_size: usize,
    /// Bytes read from the socket at a time; allocated per connection, so keep it small.
    pub read_buffer_size: usize,
    /// Bytes buffered before a write reaches the socket (messages of one wake-up are coalesced).
    pub write_buffer_size: usize,
    /// How often a WebSocket ping is sent when the client has been silent.
    pub ping_interval: Duration,
    /// A client silent (no message, no pong) for this long is closed.
    pub idle_timeout: Duration,
    /// How long the closing handshake may take before the connection is dropped.
    pub close_timeout: Duration,
}

impl Default for WsConfig {
    fn default() -> Self {
        WsConfig {
            max_message_size: 128 * 1024,
            max_frame_size: 128 * 1024,
            read_buffer_size: 2 * 1024,
            write_buffer_size: 64 * 1024,
            ping_interval: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            close_timeout: Duration::from_secs(3),
        }
    }
}

impl WsConfig {
    /// The tungstenite configuration these limits translate to.
    pub fn tungstenite(&self) -> tungstenite::protocol::WebSocketConfig {
        tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(self.read_buffer_size)
            .write_buffer_size(self.write_buffer_size)
            // No cap of its own: tokio-tungstenite flushes before it takes a message once the
            // buffer is past `write_buffer_size`, so it holds at most that plus one message.
            // (A fixed cap of 1 MiB failed every message larger than it, whatever the event
            // size the server allows; Autobahn section 9 found it.)
            .max_write_buffer_size(usize::MAX)
            .max_message_size(Some(self.max_message_size))
            .max_frame_size(Some(self.max_frame_size))
    }
}
