//! Decompression of raw Snappy blocks (the format of LevelDB/TF table blocks of type 1).
//!
//! Format: `varint32 uncompressed_length`, then elements; the low two bits of each tag
//! byte select a literal (0), or a copy with a 1-, 2- or 4-byte offset (1, 2, 3).

use std::fmt;

/// Why a Snappy block could not be decompressed. The caller adds which file and block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnappyError(String);

impl fmt::Display for SnappyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad snappy data: {}", self.0)
    }
}

impl std::error::Error for SnappyError {}

fn err<T>(msg: impl Into<String>) -> Result<T, SnappyError> {
    Err(SnappyError(msg.into()))
}

/// The most output one input byte can produce (a 3-byte copy of 64 bytes), rounded up.
const MAX_EXPANSION: usize = 22;

/// The uncompressed length a block declares, and where its elements start.
pub fn decompressed_len(input: &[u8]) -> Result<(usize, usize), SnappyError> {
    let mut v: u64 = 0;
    for (i, &b) in input.iter().enumerate().take(5) {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            if v > u64::from(u32::MAX) {
                return err("uncompressed length does not fit in 32 bits");
            }
            return Ok((v as usize, i + 1));
        }
    }
    if input.len() < 5 {
        err("truncated uncompressed-length varint")
    } else {
        err("uncompressed-length varint is longer than 5 bytes")
    }
}

/// Decompresses one raw Snappy block. `max_len` bounds the declared output length,
/// which is also checked against what the input could possibly expand to before
/// anything is allocated.
pub fn decompress(input: &[u8], max_len: usize) -> Result<Vec<u8>, SnappyError> {
    let (len, mut pos) = decompressed_len(input)?;
    if len > max_len {
        return err(format!(
            "declared uncompressed length {len} exceeds the limit {max_len}"
        ));
    }
    if len > input.len().saturating_mul(MAX_EXPANSION) {
        return err(format!(
            "declared uncompressed length {len} is impossible for {} compressed bytes",
            input.len()
        ));
    }
    let mut out: Vec<u8> = Vec::with_capacity(len);
    while pos < input.len() {
        let tag = input[pos];
        pos += 1;
        match tag & 3 {
            0 => {
                let mut n = (tag >> 2) as usize;
                if n >= 60 {
                    let extra = n - 59;
                    let Some(b) = input.get(pos..pos + extra) else {
                        return err(format!("truncated literal length at byte {}", pos - 1));
                    };
                    n = b
                        .iter()
                        .rev()
                        .fold(0usize, |acc, &x| (acc << 8) | x as usize);
                    pos += extra;
                }
                let n = n + 1;
                let Some(lit) = input.get(pos..).and_then(|r| r.get(..n)) else {
                    return err(format!(
                        "literal of {n} bytes at byte {pos} runs past the end of the input"
                    ));
                };
                if out.len() + n > len {
                    return err(format!(
                        "literal overflows the declared length {len} at byte {pos}"
                    ));
                }
                out.extend_from_slice(lit);
                pos += n;
            }
            kind => {
                let (n, offset, used) = match kind {
                    1 => {
                        let Some(&b) = input.get(pos) else {
                            return err("truncated 1-byte-offset copy");
                        };
                        (
                            4 + ((tag >> 2) & 7) as usize,
                            ((tag as usize >> 5) << 8) | b as usize,
                            1,
                        )
                    }
                    2 => {
                        let Some(b) = input.get(pos..pos + 2) else {
                            return err("truncated 2-byte-offset copy");
                        };
                        (
                            1 + (tag >> 2) as usize,
                            u16::from_le_bytes([b[0], b[1]]) as usize,
                            2,
                        )
                    }
                    _ => {
                        let Some(b) = input.get(pos..pos + 4) else {
                            return err("truncated 4-byte-offset copy");
                        };
                        (
                            1 + (tag >> 2) as usize,
                            u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize,
                            4,
                        )
                    }
                };
                if offset == 0 || offset > out.len() {
                    return err(format!(
                        "copy at byte {} has offset {offset} but only {} bytes are decoded",
                        pos - 1,
                        out.len()
                    ));
                }
                if out.len() + n > len {
                    return err(format!(
                        "copy overflows the declared length {len} at byte {}",
                        pos - 1
                    ));
                }
                pos += used;
                let start = out.len() - offset;
                if offset >= n {
                    out.extend_from_within(start..start + n);
                } else {
                    // Overlapping copy: the pattern of `offset` bytes repeats.
                    for i in 0..n {
                        let b = out[start + i];
                        out.push(b);
                    }
                }
            }
        }
    }
    if out.len() != len {
        return err(format!(
            "decoded {} bytes but the block declares {len}",
            out.len()
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_and_copies() {
        // len 11: literal "abcd", copy-1 (len 4, off 4) -> "abcd", copy-2 (len 3, off 2) -> "cdc"
        let block = [
            11,
            (3 << 2),
            b'a',
            b'b',
            b'c',
            b'd',
            0b0000_0001,
            4,
            ((3 - 1) << 2) | 2,
            2,
            0,
        ];
        assert_eq!(decompress(&block, 1 << 20).unwrap(), b"abcdabcdcdc");
    }

    #[test]
    fn overlapping_copy_repeats_pattern() {
        // "ab" then copy len 10 offset 2, via 4-byte-offset form.
        let block = [12, (1 << 2), b'a', b'b', ((10 - 1) << 2) | 3, 2, 0, 0, 0];
        assert_eq!(decompress(&block, 100).unwrap(), b"abababababab");
    }

    #[test]
    fn long_literal_with_extra_length_bytes() {
        let payload: Vec<u8> = (0..300u32).map(|i| (i % 251) as u8).collect();
        let mut block = vec![0xac, 0x02]; // varint 300
        block.push(61 << 2); // literal, 2 length bytes follow
        block.extend_from_slice(&(299u16).to_le_bytes());
        block.extend_from_slice(&payload);
        assert_eq!(decompress(&block, 1000).unwrap(), payload);
    }

    #[test]
    fn rejects_bad_blocks() {
        let cases: &[(&[u8], &str)] = &[
            (&[], "truncated"),
            (&[0x80, 0x80, 0x80, 0x80, 0x80, 0x01], "longer than 5"),
            (&[0xff, 0xff, 0xff, 0xff, 0x1f], "32 bits"),
            (&[5, 4 << 2, b'a'], "past the end"),
            (&[4, 0, b'a', 0b0000_0001, 0], "offset 0"),
            (&[8, 0, b'a', 0b0000_0001, 2], "offset 2 but only 1"),
            (&[2, 2 << 2, b'a', b'b', b'c'], "overflows"),
            (&[3, 0, b'a'], "declares 3"),
            (&[4, 60 << 2], "truncated literal length"),
            (&[4, 0, b'a', 2, 1], "truncated 2-byte"),
            (&[4, 0, b'a', 3, 1, 0], "truncated 4-byte"),
            (&[0xff, 0xff, 0x03, 0], "impossible"),
        ];
        for (block, want) in cases {
            let e = decompress(block, 1 << 30).unwrap_err().to_string();
            assert!(e.contains(want), "{block:?}: {e}");
        }
        let e = decompress(&[100, 0, b'a'], 10).unwrap_err().to_string();
        assert!(e.contains("exceeds the limit"), "{e}");
    }
}
