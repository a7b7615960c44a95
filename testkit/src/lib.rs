//! # edgestream-testkit
//!
//! Protocol clients written against PROTOCOL.md, for the end-to-end tests and the bench tool:
//! tokens, HTTP publishing, and a WebSocket client (binary and JSON formats). Depends on the
//! codec only, never on the server crate, so the tests exercise the server from outside.

pub mod http;
pub mod token;
pub mod ws;
pub mod wt;

/// How long a test helper waits for something that should happen promptly before it reports a
/// hang. Not a performance threshold: it only turns a hang into a failure with a message.
pub const HANG_GUARD: std::time::Duration = std::time::Duration::from_secs(20);

/// The frame with what differs between two nodes replaced: epochs by `"E"`, event timestamps
/// by 0. For comparing what two servers sent for the same history.
pub fn node_neutral(f: edgestream_codec::Frame) -> edgestream_codec::Frame {
    use edgestream_codec::Frame;
    match f {
        Frame::Subscribed {
            org, head, resume, ..
        } => Frame::Subscribed {
            org,
            epoch: "E".into(),
            head,
            resume,
        },
        Frame::Reset { org, head, .. } => Frame::Reset {
            org,
            epoch: "E".into(),
            head,
        },
        Frame::Event {
            org,
            seq,
            flags,
            payload,
            ..
        } => Frame::Event {
            org,
            seq,
            ts: 0,
            flags,
            payload,
        },
        f => f,
    }
}
