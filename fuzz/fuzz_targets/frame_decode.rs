//! Fuzzes the binary frame decoder, both as one message and as a stream, and checks that
//! whatever decodes re-encodes to bytes that decode to the same frame.
#![no_main]

use bytes::{Bytes, BytesMut};
use edgestream_codec::Frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = Frame::decode_exact(Bytes::copy_from_slice(data), 64 * 1024) {
        let again = Frame::decode_exact(frame.to_bytes(), 64 * 1024).expect("re-encoded frame decodes");
        assert_eq!(again, frame);
    }
    let mut buf = BytesMut::from(data);
    while let Ok(Some(_)) = Frame::decode(&mut buf, 4096) {}
});
