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
pub use pump::{run, Close, Incoming, Outgoing, Payload, WsSession};
pub use tokio_tungstenite::tungstenite;

/// Bytes of the write buffer left for pongs beyond the largest message (a pong is at most 127).
const PONG_ROOM: usize = 16 * 1024;

/// Limits and timing of WebSocket connections.
#[derive(Debug, Clone)]
pub struct WsConfig {
    /// Largest message a client may send, in bytes (larger: close 4413).
    pub max_message_size: usize,
    /// Largest single WebSocket frame a client may send, in bytes.
    pub max_frame_size: usize,
    /// Bytes read from the socket at a time; allocated per connection, so keep it small (a
    /// larger client message makes room for itself once its header is read).
    pub read_buffer_size: usize,
    /// Bytes buffered before a write reaches the socket (messages of one wake-up are coalesced).
    pub write_buffer_size: usize,
    /// Largest message the session sends, in bytes. With `write_buffer_size` it bounds what
    /// one connection may hold unsent: a session whose next message does not fit (the client
    /// stopped reading while its pings' pongs piled up) is closed with 4008.
    pub max_send_message: usize,
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
            // Clients send little (commands, chat, upload chunks that reserve their own room):
            // 2 KiB here was 2 KiB of every idle session.
            read_buffer_size: 256,
            write_buffer_size: 64 * 1024,
            max_send_message: 1 << 20,
            ping_interval: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            close_timeout: Duration::from_secs(3),
        }
    }
}

impl WsConfig {
    /// Most bytes one connection holds unsent: the write buffer, one message, and room for
    /// pongs.
    pub fn max_write_buffer(&self) -> usize {
        self.write_buffer_size
            .saturating_add(self.max_send_message)
            .saturating_add(PONG_ROOM)
    }

    /// The tungstenite configuration these limits translate to.
    pub fn tungstenite(&self) -> tungstenite::protocol::WebSocketConfig {
        tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(self.read_buffer_size)
            .write_buffer_size(self.write_buffer_size)
            // tokio-tungstenite flushes before it takes a message once the buffer is past
            // `write_buffer_size`, so messages alone hold at most that plus one message. What
            // else lands there is tungstenite's automatic pongs, queued while the socket is
            // blocked: without a cap a client that pings and never reads grew it without limit
            // (1M pings: +120 MB). With one, pongs that do not fit wait as one pending pong
            // (newer ones replace it), and the pump closes such a client (4008). The cap
            // follows the largest message (a fixed 1 MiB failed larger ones in Autobahn 9).
            .max_write_buffer_size(self.max_write_buffer())
            .max_message_size(Some(self.max_message_size))
            .max_frame_size(Some(self.max_frame_size))
    }
}
