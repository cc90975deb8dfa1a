//! CRC-32C (Castagnoli), as used by TensorFlow's table and tensor-bundle formats,
//! and the "masked" form those formats store.

const POLY: u32 = 0x82F6_3B78;
const MASK_DELTA: u32 = 0xa282_ead8;

/// Slicing-by-8 tables: `TABLES[0]` is the classic byte table, `TABLES[k][b]` is the
/// CRC of byte `b` followed by `k` zero bytes.
static TABLES: [[u32; 256]; 8] = make_tables();

const fn make_tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut s = 1;
    while s < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = t[s - 1][i];
            t[s][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            i += 1;
        }
        s += 1;
    }
    t
}

/// CRC-32C of `data`.
pub fn value(data: &[u8]) -> u32 {
    extend(0, data)
}

/// The CRC-32C of `A || data`, given `crc = value(A)`.
pub fn extend(crc: u32, data: &[u8]) -> u32 {
    let t = &TABLES;
    let mut c = !crc;
    let mut chunks = data.chunks_exact(8);
    for ch in &mut chunks {
        let lo = u32::from_le_bytes([ch[0], ch[1], ch[2], ch[3]]) ^ c;
        let hi = u32::from_le_bytes([ch[4], ch[5], ch[6], ch[7]]);
        c = t[7][(lo & 0xff) as usize]
            ^ t[6][((lo >> 8) & 0xff) as usize]
            ^ t[5][((lo >> 16) & 0xff) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][(hi & 0xff) as usize]
            ^ t[2][((hi >> 8) & 0xff) as usize]
            ^ t[1][((hi >> 16) & 0xff) as usize]
            ^ t[0][(hi >> 24) as usize];
    }
    for &b in chunks.remainder() {
        c = (c >> 8) ^ t[0][((c ^ b as u32) & 0xff) as usize];
    }
    !c
}

/// The form TensorFlow stores: rotated and offset, so that a CRC of data that itself
/// contains CRCs is not trivially related to them.
pub fn mask(crc: u32) -> u32 {
    crc.rotate_right(15).wrapping_add(MASK_DELTA)
}

/// Inverse of [`mask`].
pub fn unmask(masked: u32) -> u32 {
    masked.wrapping_sub(MASK_DELTA).rotate_left(15)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bitwise(data: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in data {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            }
        }
        !c
    }

    #[test]
    fn known_vectors() {
        assert_eq!(value(b"123456789"), 0xE306_9283);
        assert_eq!(value(b""), 0);
        // RFC 3720 (iSCSI) B.4 test patterns.
        assert_eq!(value(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(value(&[0xffu8; 32]), 0x62A8_AB43);
        let inc: Vec<u8> = (0..32).collect();
        assert_eq!(value(&inc), 0x46DD_794E);
        let dec: Vec<u8> = (0..32).rev().collect();
        assert_eq!(value(&dec), 0x113F_DB5C);
    }

    #[test]
    fn slicing_matches_bitwise_at_every_length_and_split() {
        let data: Vec<u8> = (0..300u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for n in 0..data.len() {
            assert_eq!(value(&data[..n]), bitwise(&data[..n]), "length {n}");
        }
        let whole = value(&data);
        for split in [0, 1, 7, 8, 9, 150, 299, 300] {
            assert_eq!(extend(value(&data[..split]), &data[split..]), whole);
        }
    }

    #[test]
    fn mask_round_trip() {
        for c in [0u32, 1, 0xE306_9283, 0xffff_ffff, 0x8000_0000, 12345] {
            assert_ne!(mask(c), c);
            assert_eq!(unmask(mask(c)), c);
            assert_eq!(mask(unmask(c)), c);
        }
        // The pair from the dtypes fixture's index_dump.json (written by TensorFlow).
        assert_eq!(unmask(2_982_866_127), 16_484_260);
        assert_eq!(mask(16_484_260), 2_982_866_127);
    }
}
