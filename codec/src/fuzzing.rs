//! The codec's parsers as the fuzz targets drive them (`fuzz/`: `frame_decode`,
//! `json_client`), also replayed by the server crate's `tests/fuzz_corpus.rs` through
//! `edgestream::fuzzing`. Arbitrary bytes in; a panic is a finding.

use bytes::{Bytes, BytesMut};

use crate::json::ClientMessage;
use crate::Frame;

/// Binary frames: as one message and as a stream; what decodes re-encodes to the same frame.
pub fn frame(data: &[u8]) {
    if let Ok(frame) = Frame::decode_exact(Bytes::copy_from_slice(data), 64 * 1024) {
        let again =
            Frame::decode_exact(frame.to_bytes(), 64 * 1024).expect("a re-encoded frame decodes");
        assert_eq!(again, frame);
    }
    let mut buf = BytesMut::from(data);
    while let Ok(Some(_)) = Frame::decode(&mut buf, 4096) {}
}

/// JSON control messages of the `format=json` WebSocket.
pub fn json_client(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ClientMessage::parse(text);
    }
}
