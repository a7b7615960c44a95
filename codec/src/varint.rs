//! QUIC variable-length integers (RFC 9000, section 16).
//!
//! Owns only the integer encoding. Decoding accepts non-minimal encodings, as the RFC allows.

use bytes::{Buf, BufMut};

/// The largest value a varint can carry: 2^62 - 1.
pub const MAX: u64 = (1 << 62) - 1;

/// Why a varint could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VarIntError {
    /// The buffer ends inside the integer.
    #[error("truncated varint")]
    Truncated,
}

/// Bytes needed to encode `v` (1, 2, 4 or 8).
///
/// # Panics
/// Never for values up to [`MAX`]; larger values are clamped by [`write`]'s debug assertion.
pub const fn len(v: u64) -> usize {
    if v < (1 << 6) {
        1
    } else if v < (1 << 14) {
        2
    } else if v < (1 << 30) {
        4
    } else {
        8
    }
}

/// Appends `v`. Values above [`MAX`] are a caller bug: they are masked to 62 bits in release
/// builds and assert in debug builds.
pub fn write<B: BufMut>(buf: &mut B, v: u64) {
    debug_assert!(v <= MAX, "varint out of range: {v}");
    let v = v & MAX;
    match len(v) {
        1 => buf.put_u8(v as u8),
        2 => buf.put_u16(0x4000 | v as u16),
        4 => buf.put_u32(0x8000_0000 | v as u32),
        _ => buf.put_u64(0xc000_0000_0000_0000 | v),
    }
}

/// Reads one varint from the front of `buf`, advancing it.
pub fn read<B: Buf>(buf: &mut B) -> Result<u64, VarIntError> {
    if !buf.has_remaining() {
        return Err(VarIntError::Truncated);
    }
    let first = buf.chunk()[0];
    let n = 1usize << (first >> 6);
    if buf.remaining() < n {
        return Err(VarIntError::Truncated);
    }
    let v = match n {
        1 => u64::from(buf.get_u8()),
        2 => u64::from(buf.get_u16() & 0x3fff),
        4 => u64::from(buf.get_u32() & 0x3fff_ffff),
        _ => buf.get_u64() & MAX,
    };
    Ok(v)
}

/// Reads a varint from the front of a slice without consuming: `(value, bytes used)`.
pub fn peek(bytes: &[u8]) -> Result<(u64, usize), VarIntError> {
    let mut b = bytes;
    let v = read(&mut b)?;
    Ok((v, bytes.len() - b.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc9000_examples() {
        // RFC 9000, appendix A.1.
        let cases: &[(&[u8], u64)] = &[
            (
                &[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c],
                151_288_809_941_952_652,
            ),
            (&[0x9d, 0x7f, 0x3e, 0x7d], 494_878_333),
            (&[0x7b, 0xbd], 15_293),
            (&[0x25], 37),
            (&[0x40, 0x25], 37),
        ];
        for (bytes, value) in cases {
            let mut b: &[u8] = bytes;
            assert_eq!(read(&mut b).unwrap(), *value);
            assert!(b.is_empty());
        }
    }

    #[test]
    fn truncated() {
        let mut b: &[u8] = &[0x40];
        assert_eq!(read(&mut b), Err(VarIntError::Truncated));
        let mut e: &[u8] = &[];
        assert_eq!(read(&mut e), Err(VarIntError::Truncated));
    }

    #[test]
    fn boundaries_round_trip() {
        for v in [0, 63, 64, 16_383, 16_384, (1 << 30) - 1, 1 << 30, MAX] {
            let mut out = Vec::new();
            write(&mut out, v);
            assert_eq!(out.len(), len(v));
            assert_eq!(peek(&out).unwrap(), (v, out.len()));
        }
    }
}
