//! The bytes of WebTransport over HTTP/3, without I/O: the SETTINGS this server sends and how it
//! reads the client's, the stream and datagram headers, the capsules on the CONNECT stream
//! (inside HTTP/3 DATA frames, RFC 9297 section 3.2) and the session-level flow-control
//! windows of draft-ietf-webtrans-http3-13/14 section 5.
//!
//! Encoders and decoders of `web-transport-proto` are used where they fit (varints, SETTINGS
//! identifiers, the CONNECT request's QPACK); the session-level flow-control capsules and the
//! settings of drafts 13/14 are not in that crate and are written here.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use web_transport_proto::{Setting, Settings, VarInt};

/// `SETTINGS_WT_MAX_SESSIONS` of drafts 13/14 (Safari 26.4 refuses a server without it).
pub const SETTINGS_WT_MAX_SESSIONS: u64 = 0x14e9_cd29;
/// Session-level data a peer may send before a `WT_MAX_DATA` capsule (drafts 13/14).
pub const SETTINGS_WT_INITIAL_MAX_DATA: u64 = 0x2b61;
/// Unidirectional streams a peer may open in a session (drafts 13/14).
pub const SETTINGS_WT_INITIAL_MAX_STREAMS_UNI: u64 = 0x2b64;
/// Bidirectional streams a peer may open in a session (drafts 13/14).
pub const SETTINGS_WT_INITIAL_MAX_STREAMS_BIDI: u64 = 0x2b65;
/// `SETTINGS_ENABLE_WEBTRANSPORT` of draft-02 (Chromium).
pub const SETTINGS_ENABLE_WEBTRANSPORT_DRAFT02: u64 = 0x2b60_3742;
/// `SETTINGS_WEBTRANSPORT_MAX_SESSIONS` of draft-02 (Chromium).
pub const SETTINGS_WEBTRANSPORT_MAX_SESSIONS_DRAFT02: u64 = 0x2b60_3743;
/// `SETTINGS_WEBTRANSPORT_MAX_SESSIONS` of drafts 07-12.
pub const SETTINGS_WEBTRANSPORT_MAX_SESSIONS_DRAFT07: u64 = 0xc671_706a;
/// `SETTINGS_H3_DATAGRAM` (RFC 9297) and its draft-04 identifier (older Chromium).
pub const SETTINGS_H3_DATAGRAM: u64 = 0x33;
pub const SETTINGS_H3_DATAGRAM_DRAFT04: u64 = 0xff_d277;
/// `SETTINGS_ENABLE_CONNECT_PROTOCOL` (RFC 9220).
pub const SETTINGS_ENABLE_CONNECT_PROTOCOL: u64 = 0x08;
/// `SETTINGS_MAX_FIELD_SECTION_SIZE` (RFC 9114).
pub const SETTINGS_MAX_FIELD_SECTION_SIZE: u64 = 0x06;

/// `CLOSE_WEBTRANSPORT_SESSION`.
pub const CAPSULE_CLOSE: u64 = 0x2843;
/// `DRAIN_WEBTRANSPORT_SESSION`.
pub const CAPSULE_DRAIN: u64 = 0x78ae;
pub const CAPSULE_MAX_DATA: u64 = 0x190b_4d3d;
pub const CAPSULE_MAX_STREAMS_BIDI: u64 = 0x190b_4d3f;
pub const CAPSULE_MAX_STREAMS_UNI: u64 = 0x190b_4d40;
pub const CAPSULE_DATA_BLOCKED: u64 = 0x190b_4d41;
pub const CAPSULE_STREAMS_BLOCKED_BIDI: u64 = 0x190b_4d43;
pub const CAPSULE_STREAMS_BLOCKED_UNI: u64 = 0x190b_4d44;

/// HTTP/3 error codes used here (RFC 9114 section 8.1).
pub const H3_NO_ERROR: u32 = 0x100;
pub const H3_STREAM_CREATION_ERROR: u32 = 0x103;
pub const H3_REQUEST_REJECTED: u32 = 0x10b;

/// A capsule's payload at most (a CLOSE reason is at most 1,024 bytes; nothing else is large).
const MAX_CAPSULE: u64 = 16 * 1024;
/// An HTTP/3 SETTINGS frame at most.
pub const MAX_SETTINGS_FRAME: u64 = 16 * 1024;

/// The session-level limits this server gives a client (drafts 13/14).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    /// Bytes on all the client's streams of the session, refilled as they are read.
    pub max_data: u64,
    /// Unidirectional streams the client may open (refilled as they end).
    pub max_streams_uni: u64,
    /// Bidirectional streams the client may open: the control stream and uploads.
    pub max_streams_bidi: u64,
}

/// The control stream's bytes: the stream type and one SETTINGS frame.
///
/// Every generation of WebTransport over HTTP/3 a browser ships is enabled: draft-02 (Chromium:
/// `ENABLE_WEBTRANSPORT`, `H3_DATAGRAM` in its draft-04 and RFC forms), drafts 07-12
/// (Firefox) and drafts 13/14 (Safari 26.4: `WT_MAX_SESSIONS` and the initial flow-control
/// windows). One session per connection.
pub fn control_stream(windows: &Windows) -> Bytes {
    let mut s = Settings::default();
    let mut set = |id: u64, v: u64| {
        let (Ok(id), Ok(v)) = (VarInt::from_u64(id), VarInt::from_u64(v)) else {
            unreachable!("setting identifiers and values are below 2^62");
        };
        s.insert(Setting(id), v);
    };
    set(SETTINGS_MAX_FIELD_SECTION_SIZE, 16 * 1024);
    set(SETTINGS_ENABLE_CONNECT_PROTOCOL, 1);
    set(SETTINGS_H3_DATAGRAM, 1);
    set(SETTINGS_H3_DATAGRAM_DRAFT04, 1);
    set(SETTINGS_ENABLE_WEBTRANSPORT_DRAFT02, 1);
    set(SETTINGS_WEBTRANSPORT_MAX_SESSIONS_DRAFT02, 1);
    set(SETTINGS_WEBTRANSPORT_MAX_SESSIONS_DRAFT07, 1);
    set(SETTINGS_WT_MAX_SESSIONS, 1);
    set(SETTINGS_WT_INITIAL_MAX_DATA, windows.max_data);
    set(SETTINGS_WT_INITIAL_MAX_STREAMS_UNI, windows.max_streams_uni);
    set(
        SETTINGS_WT_INITIAL_MAX_STREAMS_BIDI,
        windows.max_streams_bidi,
    );
    let mut buf = BytesMut::with_capacity(128);
    s.encode(&mut buf);
    buf.freeze()
}

/// What the client's SETTINGS say that matters here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerSettings {
    /// The client speaks some generation of WebTransport over HTTP/3 with datagrams.
    pub webtransport: bool,
    /// The client's session-level limits on what this server sends (drafts 13/14; `None`: the
    /// client uses no session-level flow control, as draft-02 and 07 clients).
    pub max_data: Option<u64>,
    pub max_streams_uni: Option<u64>,
}

/// Decodes a SETTINGS frame's payload (after its type and length).
pub fn peer_settings(mut payload: &[u8]) -> Result<PeerSettings, &'static str> {
    let mut get = std::collections::HashMap::new();
    while payload.has_remaining() {
        let id = VarInt::decode(&mut payload).map_err(|_| "truncated SETTINGS")?;
        let v = VarInt::decode(&mut payload).map_err(|_| "truncated SETTINGS")?;
        get.insert(id.into_inner(), v.into_inner());
    }
    let one = |id| get.get(&id).copied();
    let datagrams =
        one(SETTINGS_H3_DATAGRAM) == Some(1) || one(SETTINGS_H3_DATAGRAM_DRAFT04) == Some(1);
    let enabled = one(SETTINGS_WT_MAX_SESSIONS).is_some_and(|n| n > 0)
        || one(SETTINGS_WEBTRANSPORT_MAX_SESSIONS_DRAFT07).is_some_and(|n| n > 0)
        || one(SETTINGS_ENABLE_WEBTRANSPORT_DRAFT02) == Some(1);
    Ok(PeerSettings {
        webtransport: datagrams && enabled,
        max_data: one(SETTINGS_WT_INITIAL_MAX_DATA),
        max_streams_uni: one(SETTINGS_WT_INITIAL_MAX_STREAMS_UNI),
    })
}

/// The header of a unidirectional stream this server opens in session `session`.
pub fn uni_header(session: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(9);
    web_transport_proto::StreamUni::WEBTRANSPORT.encode(&mut b);
    varint(session).encode(&mut b);
    b.freeze()
}

fn varint(v: u64) -> VarInt {
    VarInt::from_u64(v).unwrap_or_else(|_| unreachable!("QUIC stream ids are below 2^62"))
}

/// Reads one varint from the front of `buf`: `None` when more bytes are needed.
pub fn take_varint(buf: &mut BytesMut) -> Option<u64> {
    let mut peek = &buf[..];
    let v = VarInt::decode(&mut peek).ok()?;
    let used = buf.len() - peek.len();
    buf.advance(used);
    Some(v.into_inner())
}

/// A datagram of the session whose CONNECT stream is `session`: its quarter stream id, then
/// the payload (RFC 9297 section 2.1).
pub fn datagram(session: u64, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(8 + payload.len());
    varint(session / 4).encode(&mut b);
    b.put_slice(payload);
    b.freeze()
}

/// The payload of a received datagram, if it belongs to `session`.
pub fn datagram_payload(session: u64, mut d: Bytes) -> Option<Bytes> {
    let mut peek = &d[..];
    let quarter = VarInt::decode(&mut peek).ok()?.into_inner();
    let used = d.len() - peek.len();
    (quarter == session / 4).then(|| d.split_off(used))
}

/// How many bytes the datagram header takes for `session`.
pub fn datagram_overhead(session: u64) -> usize {
    varint(session / 4).size()
}

/// A capsule read from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capsule {
    Close {
        code: u32,
        reason: String,
    },
    Drain,
    MaxData(u64),
    MaxStreamsBidi(u64),
    MaxStreamsUni(u64),
    /// Anything else (blocked signals, grease, unknown): ignored, as RFC 9297 asks.
    Other,
}

/// Encodes a capsule this server sends, inside one HTTP/3 DATA frame.
pub fn encode_capsule(typ: u64, payload: &[u8]) -> Bytes {
    let mut capsule = BytesMut::with_capacity(16 + payload.len());
    varint(typ).encode(&mut capsule);
    varint(payload.len() as u64).encode(&mut capsule);
    capsule.put_slice(payload);
    let mut frame = BytesMut::with_capacity(16 + capsule.len());
    web_transport_proto::Frame::DATA.encode(&mut frame);
    varint(capsule.len() as u64).encode(&mut frame);
    frame.put_slice(&capsule);
    frame.freeze()
}

/// A `CLOSE_WEBTRANSPORT_SESSION` capsule (the reason cut to 1,024 bytes at a char boundary).
pub fn close_capsule(code: u32, reason: &str) -> Bytes {
    let mut end = reason.len().min(1024);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut p = Vec::with_capacity(4 + end);
    p.put_u32(code);
    p.put_slice(&reason.as_bytes()[..end]);
    encode_capsule(CAPSULE_CLOSE, &p)
}

/// A capsule whose payload is one varint (`WT_MAX_DATA`, `WT_MAX_STREAMS_*`).
pub fn limit_capsule(typ: u64, value: u64) -> Bytes {
    let mut p = Vec::with_capacity(8);
    varint(value).encode(&mut p);
    encode_capsule(typ, &p)
}

/// Why the CONNECT stream's bytes cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("capsule of {0} bytes is too large")]
    TooLarge(u64),
    #[error("malformed capsule")]
    Malformed,
}

/// Reads the client's side of the CONNECT stream: HTTP/3 frames whose DATA payloads carry
/// capsules. Feed it bytes as they come; take capsules out.
#[derive(Debug, Default)]
pub struct ConnectStream {
    /// Bytes of HTTP/3 frames not yet parsed.
    frames: BytesMut,
    /// Bytes of a frame other than DATA still to skip.
    skip: u64,
    /// DATA bytes not yet taken into `capsules`.
    data_left: u64,
    /// Capsule bytes not yet parsed.
    capsules: BytesMut,
}

impl ConnectStream {
    pub fn feed(&mut self, bytes: &[u8]) {
        self.frames.extend_from_slice(bytes);
    }

    /// The next complete capsule, `Ok(None)` when more bytes are needed.
    pub fn next_capsule(&mut self) -> Result<Option<Capsule>, StreamError> {
        loop {
            if let Some(c) = self.capsule()? {
                return Ok(Some(c));
            }
            // Move more DATA payload into the capsule buffer.
            if self.skip > 0 {
                let n = self.skip.min(self.frames.len() as u64) as usize;
                self.frames.advance(n);
                self.skip -= n as u64;
                if self.skip > 0 {
                    return Ok(None);
                }
            }
            if self.data_left > 0 {
                let n = self.data_left.min(self.frames.len() as u64) as usize;
                if n == 0 {
                    return Ok(None);
                }
                self.capsules.extend_from_slice(&self.frames.split_to(n));
                self.data_left -= n as u64;
                continue;
            }
            // A frame header.
            let mut peek = &self.frames[..];
            let (Ok(typ), Ok(len)) = (VarInt::decode(&mut peek), VarInt::decode(&mut peek)) else {
                return Ok(None);
            };
            let used = self.frames.len() - peek.len();
            self.frames.advance(used);
            if typ.into_inner() == 0 {
                self.data_left = len.into_inner();
            } else {
                // HEADERS (trailers), grease and unknown frames carry no capsules.
                self.skip = len.into_inner();
            }
        }
    }

    fn capsule(&mut self) -> Result<Option<Capsule>, StreamError> {
        let mut peek = &self.capsules[..];
        let (Ok(typ), Ok(len)) = (VarInt::decode(&mut peek), VarInt::decode(&mut peek)) else {
            return Ok(None);
        };
        let len = len.into_inner();
        if len > MAX_CAPSULE {
            return Err(StreamError::TooLarge(len));
        }
        if (peek.len() as u64) < len {
            return Ok(None);
        }
        let head = self.capsules.len() - peek.len();
        self.capsules.advance(head);
        let mut payload = self.capsules.split_to(len as usize).freeze();
        let value = |p: &mut Bytes| {
            let mut s = &p[..];
            let v = VarInt::decode(&mut s).map_err(|_| StreamError::Malformed)?;
            Ok::<_, StreamError>(v.into_inner())
        };
        Ok(Some(match typ.into_inner() {
            CAPSULE_CLOSE => {
                if payload.len() < 4 {
                    return Err(StreamError::Malformed);
                }
                let code = payload.get_u32();
                let reason = String::from_utf8_lossy(&payload).into_owned();
                Capsule::Close { code, reason }
            }
            CAPSULE_DRAIN => Capsule::Drain,
            CAPSULE_MAX_DATA => Capsule::MaxData(value(&mut payload)?),
            CAPSULE_MAX_STREAMS_BIDI => Capsule::MaxStreamsBidi(value(&mut payload)?),
            CAPSULE_MAX_STREAMS_UNI => Capsule::MaxStreamsUni(value(&mut payload)?),
            _ => Capsule::Other,
        }))
    }
}

/// A receive window refilled by capsules: the limit given to the peer moves forward by the
/// window once half of it has been used (as QUIC's own stream windows do).
#[derive(Debug, Clone, Copy)]
pub struct Window {
    window: u64,
    used: u64,
    limit: u64,
}

impl Window {
    pub fn new(window: u64) -> Self {
        Window {
            window,
            used: 0,
            limit: window,
        }
    }

    /// `n` more units were used (read, or streams ended); returns a new limit to announce.
    pub fn used(&mut self, n: u64) -> Option<u64> {
        self.used = self.used.saturating_add(n);
        if self.limit.saturating_sub(self.used) <= self.window / 2 {
            self.limit = self.used.saturating_add(self.window);
            Some(self.limit)
        } else {
            None
        }
    }
}

/// What the client lets this server send in the session (drafts 13/14): bytes on all its
/// streams and streams opened. Unlimited when the client announced no such settings.
#[derive(Debug, Clone, Copy)]
pub struct Credit {
    limit: Option<u64>,
    spent: u64,
}

impl Credit {
    pub fn new(limit: Option<u64>) -> Self {
        Credit { limit, spent: 0 }
    }

    /// How much may be spent now.
    pub fn available(&self) -> u64 {
        self.limit
            .map_or(u64::MAX, |l| l.saturating_sub(self.spent))
    }

    pub fn spend(&mut self, n: u64) {
        self.spent = self.spent.saturating_add(n);
    }

    /// A capsule raised the limit (limits never go down).
    pub fn raise(&mut self, to: u64) {
        if let Some(l) = self.limit.as_mut() {
            *l = (*l).max(to);
        }
    }

    /// The limit now (`None`: unlimited).
    pub fn limit(&self) -> Option<u64> {
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes the control stream this server sends into (identifier, value) pairs.
    fn sent_settings(windows: &Windows) -> std::collections::HashMap<u64, u64> {
        let mut b = BytesMut::from(&control_stream(windows)[..]);
        assert_eq!(take_varint(&mut b), Some(0x00), "control stream type");
        assert_eq!(take_varint(&mut b), Some(0x04), "SETTINGS frame");
        let len = take_varint(&mut b).expect("length") as usize;
        assert_eq!(b.len(), len);
        let mut out = std::collections::HashMap::new();
        while !b.is_empty() {
            let id = take_varint(&mut b).expect("id");
            let v = take_varint(&mut b).expect("value");
            assert!(out.insert(id, v).is_none(), "setting {id:#x} twice");
        }
        out
    }

    #[test]
    fn settings_enable_every_draft_and_safaris_flow_control() {
        let w = Windows {
            max_data: 1 << 20,
            max_streams_uni: 4,
            max_streams_bidi: 16,
        };
        let s = sent_settings(&w);
        assert_eq!(s[&SETTINGS_WT_MAX_SESSIONS], 1);
        assert_eq!(s[&SETTINGS_WT_INITIAL_MAX_DATA], 1 << 20);
        assert_eq!(s[&SETTINGS_WT_INITIAL_MAX_STREAMS_UNI], 4);
        assert_eq!(s[&SETTINGS_WT_INITIAL_MAX_STREAMS_BIDI], 16);
        assert_eq!(s[&SETTINGS_ENABLE_WEBTRANSPORT_DRAFT02], 1);
        assert_eq!(s[&SETTINGS_WEBTRANSPORT_MAX_SESSIONS_DRAFT07], 1);
        assert_eq!(s[&SETTINGS_H3_DATAGRAM], 1);
        assert_eq!(s[&SETTINGS_ENABLE_CONNECT_PROTOCOL], 1);
    }

    fn settings_payload(pairs: &[(u64, u64)]) -> Vec<u8> {
        let mut p = Vec::new();
        for &(id, v) in pairs {
            varint(id).encode(&mut p);
            varint(v).encode(&mut p);
        }
        p
    }

    #[test]
    fn peer_settings_of_each_browser_generation() {
        // Chromium (draft-02).
        let chromium = settings_payload(&[
            (0x01, 65536),
            (0x06, 16384),
            (0x33, 1),
            (0xffd277, 1),
            (0x2b603742, 1),
        ]);
        let p = peer_settings(&chromium).expect("decodes");
        assert!(p.webtransport);
        assert_eq!(p.max_data, None);
        // Drafts 13/14 with flow control.
        let safari = settings_payload(&[
            (0x33, 1),
            (0x08, 1),
            (SETTINGS_WT_MAX_SESSIONS, 1),
            (SETTINGS_WT_INITIAL_MAX_DATA, 65536),
            (SETTINGS_WT_INITIAL_MAX_STREAMS_UNI, 2),
        ]);
        let p = peer_settings(&safari).expect("decodes");
        assert!(p.webtransport);
        assert_eq!(p.max_data, Some(65536));
        assert_eq!(p.max_streams_uni, Some(2));
        // No datagrams: not WebTransport.
        let p = peer_settings(&settings_payload(&[(0x2b603742, 1)])).expect("decodes");
        assert!(!p.webtransport);
        assert!(peer_settings(&[0x40]).is_err());
    }

    #[test]
    fn datagram_header_is_the_quarter_stream_id() {
        let d = datagram(8, b"hi");
        assert_eq!(&d[..], &[2, b'h', b'i']);
        assert_eq!(datagram_payload(8, d.clone()).as_deref(), Some(&b"hi"[..]));
        assert_eq!(datagram_payload(0, d), None);
        assert_eq!(datagram_overhead(0), 1);
    }

    #[test]
    fn capsules_across_data_frames_and_other_frames() {
        let mut wire = BytesMut::new();
        // A grease frame, then a MAX_DATA capsule split over two DATA frames, then CLOSE in
        // a DATA frame of its own.
        wire.extend_from_slice(&[0x21, 2, 9, 9]);
        let mut capsule = Vec::new();
        varint(CAPSULE_MAX_DATA).encode(&mut capsule);
        varint(4).encode(&mut capsule);
        varint(100_000).encode(&mut capsule);
        let (a, c) = capsule.split_at(3);
        for part in [a, c] {
            wire.extend_from_slice(&[0, part.len() as u8]);
            wire.extend_from_slice(part);
        }
        wire.extend_from_slice(&close_capsule(4001, "expired"));
        let mut s = ConnectStream::default();
        let mut got = Vec::new();
        for byte in wire.iter() {
            s.feed(&[*byte]);
            while let Some(c) = s.next_capsule().expect("well formed") {
                got.push(c);
            }
        }
        assert_eq!(
            got,
            vec![
                Capsule::MaxData(100_000),
                Capsule::Close {
                    code: 4001,
                    reason: "expired".into()
                }
            ]
        );
        let mut huge = ConnectStream::default();
        let mut w = Vec::new();
        varint(0).encode(&mut w);
        varint(100).encode(&mut w);
        varint(CAPSULE_DRAIN).encode(&mut w);
        varint(1 << 20).encode(&mut w);
        huge.feed(&w);
        assert_eq!(huge.next_capsule(), Err(StreamError::TooLarge(1 << 20)));
    }

    #[test]
    fn window_moves_once_half_is_used() {
        let mut w = Window::new(100);
        assert_eq!(w.used(49), None);
        assert_eq!(w.used(1), Some(150));
        assert_eq!(w.used(10), None);
        assert_eq!(w.used(90), Some(250));
    }

    #[test]
    fn credit_is_unlimited_without_a_setting() {
        let mut c = Credit::new(None);
        c.spend(1 << 40);
        assert_eq!(c.available(), u64::MAX);
        let mut c = Credit::new(Some(10));
        c.spend(4);
        assert_eq!(c.available(), 6);
        c.raise(5);
        assert_eq!(c.available(), 6, "limits never go down");
        c.raise(20);
        assert_eq!(c.available(), 16);
    }

    #[test]
    fn close_reason_is_cut_at_a_char_boundary() {
        let long = "é".repeat(600);
        let c = close_capsule(1, &long);
        let mut s = ConnectStream::default();
        s.feed(&c);
        match s.next_capsule().expect("ok") {
            Some(Capsule::Close { code: 1, reason }) => assert_eq!(reason.len(), 1024),
            other => panic!("{other:?}"),
        }
    }
}
