//! Binary frames of the edgestream protocol (PROTOCOL.md section 2).
//!
//! A frame is `type: varint, length: varint, body`. This module owns the byte layout only: it
//! never touches a socket, a clock or a task. Decoding is strict about limits (a frame larger than
//! the receiver's limit is an error as soon as its header is read, before any body is buffered)
//! and lenient about the future: unknown frame types decode to [`Frame::Unknown`] so receivers
//! can skip them, and bytes after the known fields of a known frame are ignored.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::varint::{self, VarIntError};

/// Frame type numbers (PROTOCOL.md section 2).
pub mod kind {
    pub const SUBSCRIBED: u64 = 0x01;
    pub const EVENT: u64 = 0x02;
    pub const RESET: u64 = 0x03;
    pub const HEARTBEAT: u64 = 0x04;
    pub const ERROR: u64 = 0x05;
    pub const PONG: u64 = 0x06;
    pub const UNSUBSCRIBED: u64 = 0x07;
    pub const CHAT_ACK: u64 = 0x08;
    pub const PRESENCE: u64 = 0x09;
    pub const UPLOAD_PROGRESS: u64 = 0x0a;
    pub const UPLOAD_DONE: u64 = 0x0b;
    pub const SUBSCRIBE: u64 = 0x10;
    pub const UNSUBSCRIBE: u64 = 0x11;
    pub const REFRESH: u64 = 0x12;
    pub const PING: u64 = 0x13;
    pub const JOIN: u64 = 0x14;
    pub const LEAVE: u64 = 0x15;
    pub const CHAT: u64 = 0x16;
    pub const UPLOAD_BEGIN: u64 = 0x17;
    pub const UPLOAD_CHUNK: u64 = 0x18;
}

/// EVENT flag bit 0: the payload is brotli-compressed.
pub const FLAG_BROTLI: u64 = 0x01;

/// The largest PING (and so PONG) body, in bytes.
pub const MAX_PING_LEN: usize = 64;

/// How a subscription starts (the `resume` field of SUBSCRIBED).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resume {
    /// No `since` was given: live events after `head` follow.
    New = 0,
    /// The events after `since` follow, then live ones.
    Recovered = 1,
    /// `since` was unusable: live events after `head` follow; the client must resync.
    Reset = 2,
}

impl Resume {
    /// The name used by the JSON format.
    pub fn as_str(self) -> &'static str {
        match self {
            Resume::New => "new",
            Resume::Recovered => "recovered",
            Resume::Reset => "reset",
        }
    }

    fn from_wire(v: u64) -> Result<Self, DecodeError> {
        match v {
            0 => Ok(Resume::New),
            1 => Ok(Resume::Recovered),
            2 => Ok(Resume::Reset),
            other => Err(DecodeError::BadResume(other)),
        }
    }
}

/// One frame, in either direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// 0x01, server to client.
    Subscribed {
        org: String,
        epoch: String,
        head: u64,
        resume: Resume,
    },
    /// 0x02, server to client.
    Event {
        org: String,
        seq: u64,
        ts: u64,
        flags: u64,
        payload: Bytes,
    },
    /// 0x03, server to client.
    Reset {
        org: String,
        epoch: String,
        head: u64,
    },
    /// 0x04, server to client.
    Heartbeat { ts: u64, heads: Vec<(String, u64)> },
    /// 0x05, server to client.
    Error { code: u64, message: String },
    /// 0x06, server to client: the PING body, verbatim.
    Pong(Bytes),
    /// 0x07, server to client.
    Unsubscribed { org: String },
    /// 0x10, client to server. `epoch` is empty for no resume position.
    Subscribe {
        org: String,
        epoch: String,
        seq: u64,
    },
    /// 0x11, client to server.
    Unsubscribe { org: String },
    /// 0x12, client to server.
    Refresh { token: String },
    /// 0x13, client to server: at most [`MAX_PING_LEN`] bytes.
    Ping(Bytes),
    /// 0x08, server to client: the chat message `id` is the org's event `seq`.
    ChatAck { id: String, seq: u64 },
    /// 0x09, server to client: a batch of presence changes of `room` in `org` (an empty room:
    /// the org itself): each user whose presence changed since the previous batch, with their
    /// state now (`true`: present), and `online`, the users present after the changes. A
    /// snapshot lists every present user as joined; above the member limit `changes` is empty
    /// and only `online` travels.
    Presence {
        org: String,
        room: String,
        online: u64,
        changes: Vec<(String, bool)>,
    },
    /// 0x14, client to server.
    Join { org: String, room: String },
    /// 0x15, client to server.
    Leave { org: String, room: String },
    /// 0x16, client to server: `body` is a JSON value, the rest of the frame.
    Chat {
        org: String,
        room: String,
        id: String,
        body: Bytes,
    },
    /// 0x0a, server to client.
    UploadProgress {
        upload_id: String,
        received: u64,
        size: u64,
    },
    /// 0x0b, server to client: `sha256` in hex.
    UploadDone {
        upload_id: String,
        size: u64,
        sha256: String,
    },
    /// 0x17, client to server: starts (empty `upload_id`, offset 0) or resumes an upload.
    UploadBegin {
        org: String,
        name: String,
        size: u64,
        content_type: String,
        upload_id: String,
        offset: u64,
    },
    /// 0x18, client to server (WebSocket): bytes of an upload at `offset`, the rest of the frame.
    UploadChunk {
        upload_id: String,
        offset: u64,
        bytes: Bytes,
    },
    /// A frame type this version does not know; receivers skip it.
    Unknown { kind: u64, body: Bytes },
}

/// Why bytes could not be decoded as a frame. Every variant is a protocol error (close code
/// 4400) except [`DecodeError::TooLarge`], which maps to 4413 where the transport has a limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The frame's declared length exceeds the receiver's limit.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: u64, max: usize },
    /// The body ends before a field does.
    #[error("truncated frame body")]
    Truncated,
    /// A string field is not UTF-8.
    #[error("string field is not UTF-8")]
    BadUtf8,
    /// SUBSCRIBED carries a resume value this version does not know.
    #[error("unknown resume value {0}")]
    BadResume(u64),
    /// A PING body is longer than [`MAX_PING_LEN`].
    #[error("ping body of {0} bytes exceeds {MAX_PING_LEN}")]
    PingTooLong(usize),
    /// A message that must hold exactly one frame holds more bytes after it.
    #[error("{0} bytes after the frame")]
    TrailingBytes(usize),
    /// A message that must hold exactly one frame holds an incomplete one.
    #[error("incomplete frame")]
    Incomplete,
}

impl From<VarIntError> for DecodeError {
    fn from(_: VarIntError) -> Self {
        DecodeError::Truncated
    }
}

impl Frame {
    /// The type number of this frame.
    pub fn kind(&self) -> u64 {
        match self {
            Frame::Subscribed { .. } => kind::SUBSCRIBED,
            Frame::Event { .. } => kind::EVENT,
            Frame::Reset { .. } => kind::RESET,
            Frame::Heartbeat { .. } => kind::HEARTBEAT,
            Frame::Error { .. } => kind::ERROR,
            Frame::Pong(_) => kind::PONG,
            Frame::Unsubscribed { .. } => kind::UNSUBSCRIBED,
            Frame::Subscribe { .. } => kind::SUBSCRIBE,
            Frame::Unsubscribe { .. } => kind::UNSUBSCRIBE,
            Frame::Refresh { .. } => kind::REFRESH,
            Frame::Ping(_) => kind::PING,
            Frame::ChatAck { .. } => kind::CHAT_ACK,
            Frame::Presence { .. } => kind::PRESENCE,
            Frame::Join { .. } => kind::JOIN,
            Frame::Leave { .. } => kind::LEAVE,
            Frame::Chat { .. } => kind::CHAT,
            Frame::UploadProgress { .. } => kind::UPLOAD_PROGRESS,
            Frame::UploadDone { .. } => kind::UPLOAD_DONE,
            Frame::UploadBegin { .. } => kind::UPLOAD_BEGIN,
            Frame::UploadChunk { .. } => kind::UPLOAD_CHUNK,
            Frame::Unknown { kind, .. } => *kind,
        }
    }

    fn body_len(&self) -> usize {
        match self {
            Frame::Subscribed {
                org,
                epoch,
                head,
                resume,
            } => str_len(org) + str_len(epoch) + varint::len(*head) + varint::len(*resume as u64),
            Frame::Event {
                org,
                seq,
                ts,
                flags,
                payload,
            } => event_body_len(org, *seq, *ts, *flags, payload.len()),
            Frame::Reset { org, epoch, head } => str_len(org) + str_len(epoch) + varint::len(*head),
            Frame::Heartbeat { ts, heads } => {
                varint::len(*ts)
                    + varint::len(heads.len() as u64)
                    + heads
                        .iter()
                        .map(|(o, h)| str_len(o) + varint::len(*h))
                        .sum::<usize>()
            }
            Frame::Error { code, message } => varint::len(*code) + str_len(message),
            Frame::Pong(b) | Frame::Ping(b) => b.len(),
            Frame::Unsubscribed { org } | Frame::Unsubscribe { org } => str_len(org),
            Frame::Subscribe { org, epoch, seq } => {
                str_len(org) + str_len(epoch) + varint::len(*seq)
            }
            Frame::Refresh { token } => str_len(token),
            Frame::ChatAck { id, seq } => str_len(id) + varint::len(*seq),
            Frame::Presence {
                org,
                room,
                online,
                changes,
            } => {
                str_len(org)
                    + str_len(room)
                    + varint::len(*online)
                    + varint::len(changes.len() as u64)
                    + changes.iter().map(|(u, _)| str_len(u) + 1).sum::<usize>()
            }
            Frame::Join { org, room } | Frame::Leave { org, room } => str_len(org) + str_len(room),
            Frame::Chat {
                org,
                room,
                id,
                body,
            } => str_len(org) + str_len(room) + str_len(id) + body.len(),
            Frame::UploadProgress {
                upload_id,
                received,
                size,
            } => str_len(upload_id) + varint::len(*received) + varint::len(*size),
            Frame::UploadDone {
                upload_id,
                size,
                sha256,
            } => str_len(upload_id) + varint::len(*size) + str_len(sha256),
            Frame::UploadBegin {
                org,
                name,
                size,
                content_type,
                upload_id,
                offset,
            } => {
                str_len(org)
                    + str_len(name)
                    + varint::len(*size)
                    + str_len(content_type)
                    + str_len(upload_id)
                    + varint::len(*offset)
            }
            Frame::UploadChunk {
                upload_id,
                offset,
                bytes,
            } => str_len(upload_id) + varint::len(*offset) + bytes.len(),
            Frame::Unknown { body, .. } => body.len(),
        }
    }

    /// The number of bytes [`Frame::encode`] appends.
    pub fn encoded_len(&self) -> usize {
        let body = self.body_len();
        varint::len(self.kind()) + varint::len(body as u64) + body
    }

    /// Appends the frame to `buf`.
    pub fn encode<B: BufMut>(&self, buf: &mut B) {
        varint::write(buf, self.kind());
        varint::write(buf, self.body_len() as u64);
        match self {
            Frame::Subscribed {
                org,
                epoch,
                head,
                resume,
            } => {
                put_str(buf, org);
                put_str(buf, epoch);
                varint::write(buf, *head);
                varint::write(buf, *resume as u64);
            }
            Frame::Event {
                org,
                seq,
                ts,
                flags,
                payload,
            } => put_event_body(buf, org, *seq, *ts, *flags, payload),
            Frame::Reset { org, epoch, head } => {
                put_str(buf, org);
                put_str(buf, epoch);
                varint::write(buf, *head);
            }
            Frame::Heartbeat { ts, heads } => {
                varint::write(buf, *ts);
                varint::write(buf, heads.len() as u64);
                for (org, head) in heads {
                    put_str(buf, org);
                    varint::write(buf, *head);
                }
            }
            Frame::Error { code, message } => {
                varint::write(buf, *code);
                put_str(buf, message);
            }
            Frame::Pong(b) | Frame::Ping(b) | Frame::Unknown { body: b, .. } => buf.put_slice(b),
            Frame::Unsubscribed { org } | Frame::Unsubscribe { org } => put_str(buf, org),
            Frame::Subscribe { org, epoch, seq } => {
                put_str(buf, org);
                put_str(buf, epoch);
                varint::write(buf, *seq);
            }
            Frame::Refresh { token } => put_str(buf, token),
            Frame::ChatAck { id, seq } => {
                put_str(buf, id);
                varint::write(buf, *seq);
            }
            Frame::Presence {
                org,
                room,
                online,
                changes,
            } => {
                put_str(buf, org);
                put_str(buf, room);
                varint::write(buf, *online);
                varint::write(buf, changes.len() as u64);
                for (user, joined) in changes {
                    put_str(buf, user);
                    varint::write(buf, u64::from(*joined));
                }
            }
            Frame::Join { org, room } | Frame::Leave { org, room } => {
                put_str(buf, org);
                put_str(buf, room);
            }
            Frame::Chat {
                org,
                room,
                id,
                body,
            } => {
                put_str(buf, org);
                put_str(buf, room);
                put_str(buf, id);
                buf.put_slice(body);
            }
            Frame::UploadProgress {
                upload_id,
                received,
                size,
            } => {
                put_str(buf, upload_id);
                varint::write(buf, *received);
                varint::write(buf, *size);
            }
            Frame::UploadDone {
                upload_id,
                size,
                sha256,
            } => {
                put_str(buf, upload_id);
                varint::write(buf, *size);
                put_str(buf, sha256);
            }
            Frame::UploadBegin {
                org,
                name,
                size,
                content_type,
                upload_id,
                offset,
            } => {
                put_str(buf, org);
                put_str(buf, name);
                varint::write(buf, *size);
                put_str(buf, content_type);
                put_str(buf, upload_id);
                varint::write(buf, *offset);
            }
            Frame::UploadChunk {
                upload_id,
                offset,
                bytes,
            } => {
                put_str(buf, upload_id);
                varint::write(buf, *offset);
                buf.put_slice(bytes);
            }
        }
    }

    /// The frame as a new buffer of exactly its size.
    pub fn to_bytes(&self) -> Bytes {
        let mut buf = BytesMut::with_capacity(self.encoded_len());
        self.encode(&mut buf);
        buf.freeze()
    }

    /// Decodes one frame from the front of a stream buffer.
    ///
    /// Returns `Ok(None)` when `buf` does not yet hold a whole frame (nothing is consumed), and
    /// an error as soon as the header declares a frame over `max_len`.
    pub fn decode(buf: &mut BytesMut, max_len: usize) -> Result<Option<Frame>, DecodeError> {
        let Some((kind, body_len, header)) = peek_header(buf, max_len)? else {
            return Ok(None);
        };
        if buf.len() < header + body_len {
            return Ok(None);
        }
        buf.advance(header);
        let body = buf.split_to(body_len).freeze();
        decode_body(kind, body).map(Some)
    }

    /// Decodes a message that must hold exactly one frame (a WebSocket message, a datagram).
    pub fn decode_exact(msg: Bytes, max_len: usize) -> Result<Frame, DecodeError> {
        let Some((kind, body_len, header)) = peek_header(&msg, max_len)? else {
            return Err(DecodeError::Incomplete);
        };
        match msg.len().cmp(&(header + body_len)) {
            std::cmp::Ordering::Less => Err(DecodeError::Incomplete),
            std::cmp::Ordering::Greater => {
                Err(DecodeError::TrailingBytes(msg.len() - header - body_len))
            }
            std::cmp::Ordering::Equal => decode_body(kind, msg.slice(header..)),
        }
    }
}

/// `(kind, body length, header length)` if the header is complete.
fn peek_header(bytes: &[u8], max_len: usize) -> Result<Option<(u64, usize, usize)>, DecodeError> {
    let Ok((kind, a)) = varint::peek(bytes) else {
        return Ok(None);
    };
    let Ok((len, b)) = varint::peek(&bytes[a..]) else {
        return Ok(None);
    };
    if len > max_len as u64 {
        return Err(DecodeError::TooLarge { len, max: max_len });
    }
    Ok(Some((kind, len as usize, a + b)))
}

fn decode_body(kind: u64, mut body: Bytes) -> Result<Frame, DecodeError> {
    let b = &mut body;
    let frame = match kind {
        kind::SUBSCRIBED => Frame::Subscribed {
            org: get_str(b)?,
            epoch: get_str(b)?,
            head: varint::read(b)?,
            resume: Resume::from_wire(varint::read(b)?)?,
        },
        kind::EVENT => {
            let org = get_str(b)?;
            let seq = varint::read(b)?;
            let ts = varint::read(b)?;
            let flags = varint::read(b)?;
            Frame::Event {
                org,
                seq,
                ts,
                flags,
                payload: std::mem::take(b),
            }
        }
        kind::RESET => Frame::Reset {
            org: get_str(b)?,
            epoch: get_str(b)?,
            head: varint::read(b)?,
        },
        kind::HEARTBEAT => {
            let ts = varint::read(b)?;
            let count = varint::read(b)?;
            // Each entry takes at least two bytes: never trust `count` for the allocation.
            if count > (b.remaining() / 2) as u64 {
                return Err(DecodeError::Truncated);
            }
            let mut heads = Vec::with_capacity(count as usize);
            for _ in 0..count {
                heads.push((get_str(b)?, varint::read(b)?));
            }
            Frame::Heartbeat { ts, heads }
        }
        kind::ERROR => Frame::Error {
            code: varint::read(b)?,
            message: get_str(b)?,
        },
        kind::PONG => Frame::Pong(body),
        kind::UNSUBSCRIBED => Frame::Unsubscribed { org: get_str(b)? },
        kind::SUBSCRIBE => Frame::Subscribe {
            org: get_str(b)?,
            epoch: get_str(b)?,
            seq: varint::read(b)?,
        },
        kind::UNSUBSCRIBE => Frame::Unsubscribe { org: get_str(b)? },
        kind::REFRESH => Frame::Refresh { token: get_str(b)? },
        kind::PING => {
            if body.len() > MAX_PING_LEN {
                return Err(DecodeError::PingTooLong(body.len()));
            }
            Frame::Ping(body)
        }
        kind::CHAT_ACK => Frame::ChatAck {
            id: get_str(b)?,
            seq: varint::read(b)?,
        },
        kind::PRESENCE => {
            let org = get_str(b)?;
            let room = get_str(b)?;
            let online = varint::read(b)?;
            let count = varint::read(b)?;
            // Each change takes at least two bytes: never trust `count` for the allocation.
            if count > (b.remaining() / 2) as u64 {
                return Err(DecodeError::Truncated);
            }
            let mut changes = Vec::with_capacity(count as usize);
            for _ in 0..count {
                let user = get_str(b)?;
                changes.push((user, varint::read(b)? != 0));
            }
            Frame::Presence {
                org,
                room,
                online,
                changes,
            }
        }
        kind::JOIN => Frame::Join {
            org: get_str(b)?,
            room: get_str(b)?,
        },
        kind::LEAVE => Frame::Leave {
            org: get_str(b)?,
            room: get_str(b)?,
        },
        kind::CHAT => Frame::Chat {
            org: get_str(b)?,
            room: get_str(b)?,
            id: get_str(b)?,
            body: std::mem::take(b),
        },
        kind::UPLOAD_PROGRESS => Frame::UploadProgress {
            upload_id: get_str(b)?,
            received: varint::read(b)?,
            size: varint::read(b)?,
        },
        kind::UPLOAD_DONE => Frame::UploadDone {
            upload_id: get_str(b)?,
            size: varint::read(b)?,
            sha256: get_str(b)?,
        },
        kind::UPLOAD_BEGIN => Frame::UploadBegin {
            org: get_str(b)?,
            name: get_str(b)?,
            size: varint::read(b)?,
            content_type: get_str(b)?,
            upload_id: get_str(b)?,
            offset: varint::read(b)?,
        },
        kind::UPLOAD_CHUNK => Frame::UploadChunk {
            upload_id: get_str(b)?,
            offset: varint::read(b)?,
            bytes: std::mem::take(b),
        },
        kind => Frame::Unknown { kind, body },
    };
    Ok(frame)
}

fn str_len(s: &str) -> usize {
    varint::len(s.len() as u64) + s.len()
}

fn put_str<B: BufMut>(buf: &mut B, s: &str) {
    varint::write(buf, s.len() as u64);
    buf.put_slice(s.as_bytes());
}

fn get_str(b: &mut Bytes) -> Result<String, DecodeError> {
    let len = varint::read(b)?;
    if len > b.remaining() as u64 {
        return Err(DecodeError::Truncated);
    }
    let raw = b.split_to(len as usize);
    String::from_utf8(raw.to_vec()).map_err(|_| DecodeError::BadUtf8)
}

fn event_body_len(org: &str, seq: u64, ts: u64, flags: u64, payload: usize) -> usize {
    str_len(org) + varint::len(seq) + varint::len(ts) + varint::len(flags) + payload
}

/// Encodes an EVENT frame straight from borrowed parts, in one allocation of exactly its size.
/// This is the hot path: the server calls it once per event, not once per client.
pub fn encode_event(org: &str, seq: u64, ts: u64, flags: u64, payload: &[u8]) -> Bytes {
    let body = event_body_len(org, seq, ts, flags, payload.len());
    let mut buf =
        BytesMut::with_capacity(varint::len(kind::EVENT) + varint::len(body as u64) + body);
    varint::write(&mut buf, kind::EVENT);
    varint::write(&mut buf, body as u64);
    put_event_body(&mut buf, org, seq, ts, flags, payload);
    buf.freeze()
}

fn put_event_body<B: BufMut>(
    buf: &mut B,
    org: &str,
    seq: u64,
    ts: u64,
    flags: u64,
    payload: &[u8],
) {
    put_str(buf, org);
    varint::write(buf, seq);
    varint::write(buf, ts);
    varint::write(buf, flags);
    buf.put_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_string() -> impl Strategy<Value = String> {
        ".{0,40}"
    }

    fn any_bytes(max: usize) -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
    }

    fn any_u62() -> impl Strategy<Value = u64> {
        prop_oneof![0..64u64, 0..20_000u64, 0..=varint::MAX]
    }

    fn any_frame() -> impl Strategy<Value = Frame> {
        let resume = prop_oneof![
            Just(Resume::New),
            Just(Resume::Recovered),
            Just(Resume::Reset)
        ];
        prop_oneof![
            (any_string(), any_string(), any_u62(), resume).prop_map(
                |(org, epoch, head, resume)| {
                    Frame::Subscribed {
                        org,
                        epoch,
                        head,
                        resume,
                    }
                }
            ),
            (
                any_string(),
                any_u62(),
                any_u62(),
                any_u62(),
                any_bytes(300)
            )
                .prop_map(|(org, seq, ts, flags, payload)| Frame::Event {
                    org,
                    seq,
                    ts,
                    flags,
                    payload
                }),
            (any_string(), any_string(), any_u62()).prop_map(|(org, epoch, head)| Frame::Reset {
                org,
                epoch,
                head
            }),
            (
                any_u62(),
                proptest::collection::vec((any_string(), any_u62()), 0..20)
            )
                .prop_map(|(ts, heads)| Frame::Heartbeat { ts, heads }),
            (any_u62(), any_string()).prop_map(|(code, message)| Frame::Error { code, message }),
            any_bytes(200).prop_map(Frame::Pong),
            any_string().prop_map(|org| Frame::Unsubscribed { org }),
            (any_string(), any_string(), any_u62())
                .prop_map(|(org, epoch, seq)| Frame::Subscribe { org, epoch, seq }),
            any_string().prop_map(|org| Frame::Unsubscribe { org }),
            any_string().prop_map(|token| Frame::Refresh { token }),
            any_bytes(MAX_PING_LEN + 1).prop_map(Frame::Ping),
            (any_string(), any_u62()).prop_map(|(id, seq)| Frame::ChatAck { id, seq }),
            (
                any_string(),
                any_string(),
                any_u62(),
                proptest::collection::vec((any_string(), any::<bool>()), 0..4)
            )
                .prop_map(|(org, room, online, changes)| Frame::Presence {
                    org,
                    room,
                    online,
                    changes
                }),
            (any_string(), any_string()).prop_map(|(org, room)| Frame::Join { org, room }),
            (any_string(), any_string()).prop_map(|(org, room)| Frame::Leave { org, room }),
            (any_string(), any_string(), any_string(), any_bytes(100)).prop_map(
                |(org, room, id, body)| Frame::Chat {
                    org,
                    room,
                    id,
                    body
                }
            ),
            (0x30..varint::MAX, any_bytes(50))
                .prop_map(|(kind, body)| Frame::Unknown { kind, body }),
        ]
    }

    proptest! {
        #[test]
        fn round_trip_exact(frame in any_frame()) {
            let bytes = frame.to_bytes();
            prop_assert_eq!(bytes.len(), frame.encoded_len());
            prop_assert_eq!(Frame::decode_exact(bytes, 1 << 20).unwrap(), frame);
        }

        #[test]
        fn round_trip_stream_split_anywhere(frames in proptest::collection::vec(any_frame(), 1..6), cut in any::<prop::sample::Index>()) {
            let mut all = BytesMut::new();
            for f in &frames { f.encode(&mut all); }
            let all = all.freeze();
            let cut = cut.index(all.len() + 1);
            let mut buf = BytesMut::from(&all[..cut]);
            let mut out = Vec::new();
            while let Some(f) = Frame::decode(&mut buf, 1 << 20).unwrap() { out.push(f); }
            buf.extend_from_slice(&all[cut..]);
            while let Some(f) = Frame::decode(&mut buf, 1 << 20).unwrap() { out.push(f); }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(out, frames);
        }

        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Frame::decode_exact(Bytes::from(bytes.clone()), 128);
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = Frame::decode(&mut buf, 128) {}
        }

        #[test]
        fn encode_event_matches_frame(org in any_string(), seq in any_u62(), ts in any_u62(), payload in any_bytes(100)) {
            let f = Frame::Event { org: org.clone(), seq, ts, flags: 0, payload: payload.clone() };
            prop_assert_eq!(encode_event(&org, seq, ts, 0, &payload), f.to_bytes());
        }
    }

    #[test]
    fn oversized_header_rejected_before_body() {
        let mut buf = BytesMut::new();
        varint::write(&mut buf, kind::EVENT);
        varint::write(&mut buf, 10_000);
        assert_eq!(
            Frame::decode(&mut buf, 1024),
            Err(DecodeError::TooLarge {
                len: 10_000,
                max: 1024
            })
        );
    }

    #[test]
    fn exact_rejects_trailing_and_incomplete() {
        let mut b = Frame::Unsubscribe { org: "acme".into() }
            .to_bytes()
            .to_vec();
        b.push(0);
        assert_eq!(
            Frame::decode_exact(b.into(), 100),
            Err(DecodeError::TrailingBytes(1))
        );
        let b = Frame::Unsubscribe { org: "acme".into() }.to_bytes();
        assert_eq!(
            Frame::decode_exact(b.slice(..3), 100),
            Err(DecodeError::Incomplete)
        );
    }

    #[test]
    fn ping_limit_and_bad_utf8_and_bad_resume() {
        let p = Frame::Ping(Bytes::from(vec![0; 65])).to_bytes();
        assert_eq!(
            Frame::decode_exact(p, 1000),
            Err(DecodeError::PingTooLong(65))
        );
        let raw = Bytes::from_static(&[0x11, 0x02, 0x01, 0xff]);
        assert_eq!(Frame::decode_exact(raw, 1000), Err(DecodeError::BadUtf8));
        let raw = Bytes::from_static(&[0x01, 0x04, 0x00, 0x00, 0x00, 0x03]);
        assert_eq!(
            Frame::decode_exact(raw, 1000),
            Err(DecodeError::BadResume(3))
        );
    }

    #[test]
    fn heartbeat_count_cannot_force_allocation() {
        let mut buf = BytesMut::new();
        varint::write(&mut buf, kind::HEARTBEAT);
        varint::write(&mut buf, 9);
        varint::write(&mut buf, 0);
        buf.put_u64(0xc000_0000_ffff_ffff);
        assert_eq!(
            Frame::decode_exact(buf.freeze(), 100),
            Err(DecodeError::Truncated)
        );
    }

    #[test]
    fn known_frames_ignore_trailing_fields() {
        // A future version may append fields: the receiver decodes what it knows.
        let raw = Bytes::from_static(&[0x11, 0x03, 0x01, b'a', 0x07]);
        assert_eq!(
            Frame::decode_exact(raw, 100),
            Ok(Frame::Unsubscribe { org: "a".into() })
        );
    }
}
