//! # edgestream-codec
//!
//! The edgestream wire contract (PROTOCOL.md sections 2 and 4.3) as pure code: no tokio, no
//! sockets, no clock. Both transports and every Rust client (tests, the bench tool) use it.
//!
//! # Layout
//! - [`varint`]: QUIC variable-length integers (RFC 9000, section 16).
//! - [`frame`]: binary frames, encode and decode, with limits.
//! - [`json`]: the JSON text format of the WebSocket transport.
//! - [`command`]: a client command, from either encoding.
//! - [`close`]: the close codes.

pub mod close;
pub mod command;
pub mod frame;
#[doc(hidden)]
pub mod fuzzing;
pub mod json;
pub mod varint;

pub use close::CloseCode;
pub use command::{ClientCommand, CommandError, Since};
pub use frame::{encode_event, DecodeError, Frame, Resume, FLAG_BROTLI};
