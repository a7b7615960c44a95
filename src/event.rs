//! A sequenced event and its wire encodings, computed at most once each and shared by every
//! session that sends it (binary frame, brotli binary frame, JSON text).
//!
//! Never sends anything: sessions take the bytes and write them.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use edgestream_codec::{encode_event, json, FLAG_BROTLI};

use crate::model::{Epoch, OrgId};

/// How events are encoded for clients.
#[derive(Debug, Clone, Copy)]
pub struct Encoding {
    /// Payloads of at least this many bytes are brotli-compressed for `enc=br` clients.
    pub brotli_min_bytes: usize,
    /// brotli quality (0-11); 5 trades ratio for speed on the publish path.
    pub brotli_quality: u32,
}

impl Default for Encoding {
    fn default() -> Self {
        Encoding {
            brotli_min_bytes: 1024,
            brotli_quality: 5,
        }
    }
}

/// One event as logged: the org's position and the publisher's bytes.
#[derive(Debug)]
pub struct Event {
    pub org: OrgId,
    pub epoch: Epoch,
    pub seq: u64,
    /// Unix milliseconds at sequencing.
    pub ts: u64,
    /// The published JSON object, byte for byte.
    pub payload: Bytes,
    binary: OnceLock<Bytes>,
    brotli: OnceLock<Option<Bytes>>,
    json: OnceLock<Bytes>,
}

impl Event {
    pub fn new(org: OrgId, epoch: Epoch, seq: u64, ts: u64, payload: Bytes) -> Arc<Self> {
        Arc::new(Event {
            org,
            epoch,
            seq,
            ts,
            payload,
            binary: OnceLock::new(),
            brotli: OnceLock::new(),
            json: OnceLock::new(),
        })
    }

    /// The EVENT frame with the payload as published.
    pub fn binary(&self) -> &Bytes {
        self.binary
            .get_or_init(|| encode_event(self.org.as_str(), self.seq, self.ts, 0, &self.payload))
    }

    /// The EVENT frame for a client that accepts brotli: compressed when the payload is large
    /// enough and compression makes it smaller, the plain frame otherwise.
    pub fn binary_for_brotli(&self, enc: &Encoding) -> &Bytes {
        if self.payload.len() < enc.brotli_min_bytes {
            return self.binary();
        }
        let compressed = self.brotli.get_or_init(|| {
            let c = compress(&self.payload, enc.brotli_quality);
            (c.len() < self.payload.len())
                .then(|| encode_event(self.org.as_str(), self.seq, self.ts, FLAG_BROTLI, &c))
        });
        compressed.as_ref().unwrap_or_else(|| self.binary())
    }

    /// The JSON-format message (`{"t":"event",...}`), UTF-8.
    pub fn json(&self) -> &Bytes {
        self.json.get_or_init(|| {
            // Payloads are validated as JSON (so UTF-8) before they are logged.
            let data = std::str::from_utf8(&self.payload).unwrap_or("null");
            Bytes::from(json::event(self.org.as_str(), self.seq, self.ts, data))
        })
    }

    /// Bytes this event holds in memory (for byte-capped retention).
    pub fn size(&self) -> usize {
        self.payload.len() + 96
    }
}

/// Which of an event's encodings a session sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoded {
    Binary,
    /// [`Event::binary_for_brotli`].
    Brotli,
    Json,
}

/// One event's frame as a session sends it: the event and which encoding, so that the bytes
/// stay the event's. A delivery moves the session's `Arc<Event>` into it; cloning the frame's
/// `Bytes` per delivery (and dropping it once written) was two more atomic operations on a
/// counter every core's sessions touch, 15% of the server in a 1 -> 1,000 fan-out (perf).
#[derive(Debug, Clone)]
pub struct EventFrame {
    event: Arc<Event>,
    encoded: Encoded,
}

impl EventFrame {
    /// `event` in `encoded`, encoded now if it was not yet (`enc`: when to compress).
    pub fn new(event: Arc<Event>, encoded: Encoded, enc: &Encoding) -> Self {
        match encoded {
            Encoded::Binary => drop(event.binary()),
            Encoded::Brotli => drop(event.binary_for_brotli(enc)),
            Encoded::Json => drop(event.json()),
        }
        EventFrame { event, encoded }
    }

    /// The frame's bytes (the binary frame, compressed or not, or the JSON text).
    pub fn bytes(&self) -> &Bytes {
        let e = &self.event;
        match self.encoded {
            Encoded::Binary => e.binary(),
            Encoded::Json => e.json(),
            // Compressed at `new` when the payload was large enough and compression paid.
            Encoded::Brotli => e
                .brotli
                .get()
                .and_then(Option::as_ref)
                .unwrap_or_else(|| e.binary()),
        }
    }

    pub fn is_text(&self) -> bool {
        self.encoded == Encoded::Json
    }
}

/// Compresses with brotli, with a window just large enough for the input.
pub fn compress(input: &[u8], quality: u32) -> Vec<u8> {
    let lgwin = (usize::BITS - input.len().max(1024).leading_zeros()).clamp(10, 24);
    let params = brotli::enc::BrotliEncoderParams {
        quality: quality as i32,
        lgwin: lgwin as i32,
        ..Default::default()
    };
    let mut out = Vec::with_capacity(input.len() / 2 + 64);
    let mut reader = input;
    // Writing into a Vec cannot fail.
    let _ = brotli::BrotliCompress(&mut reader, &mut out, &params);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgestream_codec::Frame;
    use std::io::Read;

    fn ev(payload: &str) -> Arc<Event> {
        Event::new(
            OrgId::parse("acme").unwrap(),
            Epoch::parse("e1").unwrap(),
            7,
            99,
            payload.to_string().into(),
        )
    }

    #[test]
    fn encodings_round_trip() {
        let big = format!(r#"{{"text":"{}"}}"#, "hello brotli ".repeat(200));
        let e = ev(&big);
        let enc = Encoding::default();
        let Frame::Event {
            flags,
            payload,
            seq,
            ..
        } = Frame::decode_exact(e.binary_for_brotli(&enc).clone(), 1 << 20).unwrap()
        else {
            panic!("not an event")
        };
        assert_eq!((flags, seq), (FLAG_BROTLI, 7));
        let mut plain = Vec::new();
        brotli::Decompressor::new(&payload[..], 4096)
            .read_to_end(&mut plain)
            .unwrap();
        assert_eq!(plain, big.as_bytes());
        // Encoded once: the same bytes come back.
        assert_eq!(
            e.binary_for_brotli(&enc).as_ptr(),
            e.binary_for_brotli(&enc).as_ptr()
        );

        let small = ev(r#"{"a":1}"#);
        assert_eq!(small.binary_for_brotli(&enc), small.binary());
        let v: serde_json::Value = serde_json::from_slice(small.json()).unwrap();
        assert_eq!(v["data"]["a"], 1);
        assert_eq!(v["seq"], 7);
    }

    #[test]
    fn an_event_frame_lends_the_events_own_bytes() {
        let enc = Encoding::default();
        let big = ev(&format!(r#"{{"text":"{}"}}"#, "hello brotli ".repeat(200)));
        let small = ev(r#"{"a":1}"#);
        for e in [&big, &small] {
            let frame = |encoded| EventFrame::new((*e).clone(), encoded, &enc);
            // The same allocation the event holds: nothing copied, nothing encoded twice.
            assert_eq!(frame(Encoded::Binary).bytes().as_ptr(), e.binary().as_ptr());
            assert_eq!(frame(Encoded::Json).bytes().as_ptr(), e.json().as_ptr());
            assert_eq!(
                frame(Encoded::Brotli).bytes().as_ptr(),
                e.binary_for_brotli(&enc).as_ptr()
            );
            assert!(frame(Encoded::Json).is_text() && !frame(Encoded::Brotli).is_text());
        }
        // Compressed when large enough, the plain frame otherwise.
        assert_ne!(big.binary_for_brotli(&enc), big.binary());
        assert_eq!(
            EventFrame::new(small.clone(), Encoded::Brotli, &enc).bytes(),
            small.binary()
        );
    }
}
