//! Reader for TensorFlow's LevelDB-style immutable tables (`tensorflow/core/lib/io/table*`),
//! the format of a checkpoint's `.index` file.
//!
//! File = `[data block]* [metaindex block] [index block] [footer]`. Every block is
//! followed by a 5-byte trailer (`type: u8`, masked crc32c of contents + type).
//! The footer holds the metaindex and index block handles and a magic number.
//! The index block maps a separator key to each data block's handle.

use std::path::Path;

use super::crc32c;
use super::snappy;
use crate::error::{Error, Result};

/// `kTableMagicNumber`, stored little-endian in the last 8 bytes of the file.
pub const TABLE_MAGIC: u64 = 0xdb47_7524_8b80_fb57;
/// Footer size: two block handles padded to 40 bytes, then the 8-byte magic.
pub const FOOTER_LEN: usize = 48;
/// Block trailer: compression type byte + masked crc32c.
pub const BLOCK_TRAILER_LEN: usize = 5;

const NO_COMPRESSION: u8 = 0;
const SNAPPY_COMPRESSION: u8 = 1;
/// Upper bound for one decompressed block; TF writes 256 KiB blocks, larger only when a
/// single entry is larger.
const MAX_BLOCK_LEN: usize = 1 << 30;

/// Location of a block in the file; `size` excludes the trailer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockHandle {
    pub offset: u64,
    pub size: u64,
}

/// A key and its value.
pub type Entry = (Vec<u8>, Vec<u8>);

/// All key/value pairs of a table, in key order.
#[derive(Debug, Clone, Default)]
pub struct Table {
    pub entries: Vec<Entry>,
}

impl Table {
    /// Reads and fully verifies the table at `path`.
    pub fn open(path: &Path) -> Result<Table> {
        let data = crate::error::read_file(path)?;
        Table::parse(path, &data)
    }

    /// Parses a table held in memory; `path` only names it in errors.
    pub fn parse(path: &Path, data: &[u8]) -> Result<Table> {
        parse(data).map_err(|e| Error::file(path, e))
    }

    /// Binary search for an exact key.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.entries
            .binary_search_by(|(k, _)| k.as_slice().cmp(key))
            .ok()
            .map(|i| self.entries[i].1.as_slice())
    }
}

/// Reads a varint of at most 32 bits, advancing `pos`.
pub fn varint32(buf: &[u8], pos: &mut usize) -> std::result::Result<u32, String> {
    let v = varint(buf, pos, 5)?;
    u32::try_from(v).map_err(|_| format!("varint32 at byte {} overflows 32 bits", *pos))
}

/// Reads a varint of at most 64 bits, advancing `pos`.
pub fn varint64(buf: &[u8], pos: &mut usize) -> std::result::Result<u64, String> {
    varint(buf, pos, 10)
}

fn varint(buf: &[u8], pos: &mut usize, max_bytes: usize) -> std::result::Result<u64, String> {
    let start = *pos;
    let mut v: u64 = 0;
    for i in 0..max_bytes {
        let Some(&b) = buf.get(start + i) else {
            return Err(format!("truncated varint at byte {start}"));
        };
        let bits = u64::from(b & 0x7f);
        let shift = 7 * i as u32;
        if shift == 63 && bits > 1 {
            return Err(format!("varint at byte {start} overflows 64 bits"));
        }
        v |= bits << shift;
        if b & 0x80 == 0 {
            *pos = start + i + 1;
            return Ok(v);
        }
    }
    Err(format!(
        "varint at byte {start} is longer than {max_bytes} bytes"
    ))
}

fn decode_handle(buf: &[u8], pos: &mut usize) -> std::result::Result<BlockHandle, String> {
    let offset = varint64(buf, pos)?;
    let size = varint64(buf, pos)?;
    Ok(BlockHandle { offset, size })
}

/// Decodes a block handle that must make up the whole of `value`.
pub fn parse_handle(value: &[u8]) -> std::result::Result<BlockHandle, String> {
    let mut pos = 0;
    let h = decode_handle(value, &mut pos)?;
    if pos != value.len() {
        return Err(format!(
            "{} trailing bytes after block handle",
            value.len() - pos
        ));
    }
    Ok(h)
}

fn parse(data: &[u8]) -> std::result::Result<Table, String> {
    if data.len() < FOOTER_LEN {
        return Err(format!(
            "truncated table: {} bytes, but the footer alone is {FOOTER_LEN}",
            data.len()
        ));
    }
    let footer = &data[data.len() - FOOTER_LEN..];
    let mut magic = [0u8; 8];
    magic.copy_from_slice(&footer[40..]);
    if u64::from_le_bytes(magic) != TABLE_MAGIC {
        return Err(format!(
            "not an sstable (bad magic number {:016x} in the footer)",
            u64::from_le_bytes(magic)
        ));
    }
    let mut pos = 0;
    let handles = &footer[..40];
    let metaindex = decode_handle(handles, &mut pos).map_err(|e| format!("footer: {e}"))?;
    let index = decode_handle(handles, &mut pos).map_err(|e| format!("footer: {e}"))?;
    let blocks_end = (data.len() - FOOTER_LEN) as u64;
    // TF adds no meta blocks, but the (empty) metaindex block is checked like any other.
    let meta_block =
        read_block(data, metaindex, blocks_end).map_err(|e| format!("metaindex {e}"))?;
    parse_block(&meta_block).map_err(|e| format!("metaindex {}: {e}", describe(metaindex)))?;

    let index_block = read_block(data, index, blocks_end).map_err(|e| format!("index {e}"))?;
    let index_entries =
        parse_block(&index_block).map_err(|e| format!("index {}: {e}", describe(index)))?;

    let mut entries: Vec<Entry> = Vec::new();
    for (separator, value) in &index_entries {
        let handle = parse_handle(value).map_err(|e| {
            format!(
                "index {}: entry {}: {e}",
                describe(index),
                show_key(separator)
            )
        })?;
        let contents = read_block(data, handle, blocks_end).map_err(|e| format!("data {e}"))?;
        let block_entries =
            parse_block(&contents).map_err(|e| format!("data {}: {e}", describe(handle)))?;
        if let Some((last, _)) = block_entries.last() {
            if last > separator {
                return Err(format!(
                    "data {}: last key {} is past its index key {}",
                    describe(handle),
                    show_key(last),
                    show_key(separator)
                ));
            }
        }
        for (k, v) in block_entries {
            if let Some((prev, _)) = entries.last() {
                if *prev >= k {
                    return Err(format!(
                        "data {}: key {} does not sort after {}",
                        describe(handle),
                        show_key(&k),
                        show_key(prev)
                    ));
                }
            }
            entries.push((k, v));
        }
    }
    Ok(Table { entries })
}

fn describe(h: BlockHandle) -> String {
    format!("block at offset {} (size {})", h.offset, h.size)
}

/// Keys as text when printable, hex otherwise (slice keys are binary).
pub fn show_key(k: &[u8]) -> String {
    match std::str::from_utf8(k) {
        Ok(s) if !s.chars().any(char::is_control) => format!("{s:?}"),
        _ => format!(
            "0x{}",
            k.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ),
    }
}

fn block_range(h: BlockHandle, blocks_end: u64) -> std::result::Result<(usize, usize), String> {
    let end = h
        .offset
        .checked_add(h.size)
        .and_then(|e| e.checked_add(BLOCK_TRAILER_LEN as u64));
    match end {
        Some(end) if end <= blocks_end => Ok((h.offset as usize, h.size as usize)),
        _ => Err(format!(
            "{}: block handle points outside the file (blocks end at byte {blocks_end})",
            describe(h)
        )),
    }
}

/// Verifies a block's trailer crc and returns its (decompressed) contents.
fn read_block(
    data: &[u8],
    h: BlockHandle,
    blocks_end: u64,
) -> std::result::Result<Vec<u8>, String> {
    let (off, size) = block_range(h, blocks_end)?;
    let contents = &data[off..off + size];
    let kind = data[off + size];
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&data[off + size + 1..off + size + 5]);
    let stored = crc32c::unmask(u32::from_le_bytes(crc));
    let actual = crc32c::extend(crc32c::value(contents), &[kind]);
    if stored != actual {
        return Err(format!(
            "{}: block crc mismatch (stored {stored:08x}, computed {actual:08x})",
            describe(h)
        ));
    }
    match kind {
        NO_COMPRESSION => Ok(contents.to_vec()),
        SNAPPY_COMPRESSION => {
            snappy::decompress(contents, MAX_BLOCK_LEN).map_err(|e| format!("{}: {e}", describe(h)))
        }
        t => Err(format!(
            "{}: bad block type {t} (0 = uncompressed, 1 = snappy)",
            describe(h)
        )),
    }
}

/// Decodes every entry of a block, checking the restart array.
pub fn parse_block(block: &[u8]) -> std::result::Result<Vec<Entry>, String> {
    if block.len() < 4 {
        return Err(format!(
            "block of {} bytes is too short for its restart count",
            block.len()
        ));
    }
    let n = block.len();
    let num_restarts =
        u32::from_le_bytes([block[n - 4], block[n - 3], block[n - 2], block[n - 1]]) as usize;
    let max_restarts = (n - 4) / 4;
    if num_restarts > max_restarts {
        return Err(format!(
            "restart array out of range: {num_restarts} restarts in a {n}-byte block"
        ));
    }
    let limit = n - 4 * (num_restarts + 1);
    let restarts: Vec<usize> = block[limit..n - 4]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    if let Some(&bad) = restarts.iter().find(|&&r| r >= limit.max(1)) {
        return Err(format!(
            "restart array out of range: restart point {bad} is past the entries (which end at {limit})"
        ));
    }
    if restarts.windows(2).any(|w| w[0] >= w[1]) {
        return Err("restart array out of range: restart points are not increasing".into());
    }
    if limit > 0 && restarts.first() != Some(&0) {
        return Err("restart array out of range: first restart point is not 0".into());
    }
    if limit == 0 {
        // An empty block (e.g. the metaindex) has the single restart point 0.
        return Ok(Vec::new());
    }

    let mut entries = Vec::new();
    let mut key: Vec<u8> = Vec::new();
    let mut pos = 0;
    let mut next_restart = restarts.iter().peekable();
    while pos < limit {
        let at = pos;
        let is_restart = next_restart.peek() == Some(&&at);
        if is_restart {
            next_restart.next();
        }
        let head = &block[..limit];
        let shared = varint32(head, &mut pos)? as usize;
        let non_shared = varint32(head, &mut pos)? as usize;
        let value_len = varint32(head, &mut pos)? as usize;
        if shared > key.len() {
            return Err(format!(
                "entry at byte {at} shares {shared} bytes with a {}-byte previous key",
                key.len()
            ));
        }
        if is_restart && shared != 0 {
            return Err(format!(
                "entry at restart point {at} shares {shared} bytes with the previous key"
            ));
        }
        let end = pos + non_shared + value_len;
        if end > limit {
            return Err(format!(
                "entry at byte {at} ({non_shared} key bytes, {value_len} value bytes) runs past the entries (which end at {limit})"
            ));
        }
        key.truncate(shared);
        key.extend_from_slice(&block[pos..pos + non_shared]);
        pos += non_shared;
        entries.push((key.clone(), block[pos..pos + value_len].to_vec()));
        pos = end;
    }
    if let Some(r) = next_restart.next() {
        return Err(format!(
            "restart array out of range: restart point {r} is not at an entry boundary"
        ));
    }
    Ok(entries)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn put_varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    /// Encodes one block the way LevelDB's `BlockBuilder` does.
    pub fn build_block(entries: &[(&[u8], &[u8])], restart_interval: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut restarts = vec![];
        let mut prev: &[u8] = &[];
        for (i, (k, v)) in entries.iter().enumerate() {
            let shared = if i % restart_interval == 0 {
                restarts.push(out.len() as u32);
                0
            } else {
                prev.iter()
                    .zip(k.iter())
                    .take_while(|(a, b)| a == b)
                    .count()
            };
            put_varint(&mut out, shared as u64);
            put_varint(&mut out, (k.len() - shared) as u64);
            put_varint(&mut out, v.len() as u64);
            out.extend_from_slice(&k[shared..]);
            out.extend_from_slice(v);
            prev = k;
        }
        if restarts.is_empty() {
            restarts.push(0);
        }
        for r in &restarts {
            out.extend_from_slice(&r.to_le_bytes());
        }
        out.extend_from_slice(&(restarts.len() as u32).to_le_bytes());
        out
    }

    /// A naive Snappy compressor (longest earlier match of at least 4 bytes, emitted
    /// as 2-byte-offset copies), enough to produce real type-1 blocks.
    fn snappy_compress(data: &[u8]) -> Vec<u8> {
        fn literal(out: &mut Vec<u8>, lit: &[u8]) {
            for chunk in lit.chunks(60) {
                out.push(((chunk.len() - 1) as u8) << 2);
                out.extend_from_slice(chunk);
            }
        }
        let mut out = Vec::new();
        put_varint(&mut out, data.len() as u64);
        let (mut pos, mut lit_start) = (0, 0);
        while pos < data.len() {
            let best = (pos.saturating_sub(65535)..pos)
                .map(|from| {
                    let n = data[from..]
                        .iter()
                        .zip(&data[pos..])
                        .take(64)
                        .take_while(|(a, b)| a == b)
                        .count();
                    (n, pos - from)
                })
                .max();
            match best {
                Some((n, offset)) if n >= 4 => {
                    literal(&mut out, &data[lit_start..pos]);
                    out.push((((n - 1) as u8) << 2) | 2);
                    out.extend_from_slice(&(offset as u16).to_le_bytes());
                    pos += n;
                    lit_start = pos;
                }
                _ => pos += 1,
            }
        }
        literal(&mut out, &data[lit_start..]);
        out
    }

    fn append_block(file: &mut Vec<u8>, contents: &[u8], kind: u8) -> BlockHandle {
        let h = BlockHandle {
            offset: file.len() as u64,
            size: contents.len() as u64,
        };
        file.extend_from_slice(contents);
        file.push(kind);
        let crc = crc32c::extend(crc32c::value(contents), &[kind]);
        file.extend_from_slice(&crc32c::mask(crc).to_le_bytes());
        h
    }

    fn handle_bytes(h: BlockHandle) -> Vec<u8> {
        let mut v = Vec::new();
        put_varint(&mut v, h.offset);
        put_varint(&mut v, h.size);
        v
    }

    /// A table whose data blocks hold `blocks`; `snappy` compresses the data blocks.
    pub fn build_table(blocks: &[Vec<Entry>], snappy: bool) -> Vec<u8> {
        let mut file = Vec::new();
        let mut index: Vec<Entry> = Vec::new();
        for b in blocks {
            let refs: Vec<(&[u8], &[u8])> = b
                .iter()
                .map(|(k, v)| (k.as_slice(), v.as_slice()))
                .collect();
            let raw = build_block(&refs, 16);
            let h = if snappy {
                append_block(&mut file, &snappy_compress(&raw), SNAPPY_COMPRESSION)
            } else {
                append_block(&mut file, &raw, NO_COMPRESSION)
            };
            index.push((b.last().unwrap().0.clone(), handle_bytes(h)));
        }
        let meta = append_block(&mut file, &build_block(&[], 16), NO_COMPRESSION);
        let irefs: Vec<(&[u8], &[u8])> = index
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
            .collect();
        let ih = append_block(&mut file, &build_block(&irefs, 1), NO_COMPRESSION);
        let mut footer = handle_bytes(meta);
        footer.extend(handle_bytes(ih));
        footer.resize(40, 0);
        footer.extend_from_slice(&TABLE_MAGIC.to_le_bytes());
        file.extend(footer);
        file
    }

    fn kv(k: &str, v: &str) -> (Vec<u8>, Vec<u8>) {
        (k.as_bytes().to_vec(), v.as_bytes().to_vec())
    }

    fn sample_blocks() -> Vec<Vec<Entry>> {
        let mut first: Vec<_> = (0..40)
            .map(|i| kv(&format!("layer{i:03}/weights"), &format!("value-{i}")))
            .collect();
        first.insert(0, kv("", "header"));
        vec![
            first,
            vec![kv("zz/a", "repeat!!repeat!!tail"), kv("zz/b", "")],
        ]
    }

    fn parse_mem(data: &[u8]) -> std::result::Result<Table, String> {
        Table::parse(Path::new("mem.index"), data).map_err(|e| e.to_string())
    }

    #[test]
    fn round_trip_uncompressed_and_snappy() {
        let blocks = sample_blocks();
        let want: Vec<_> = blocks.concat();
        for snappy in [false, true] {
            let file = build_table(&blocks, snappy);
            let t = parse_mem(&file).unwrap();
            assert_eq!(t.entries, want, "snappy={snappy}");
            assert_eq!(t.get(b"layer007/weights"), Some(&b"value-7"[..]));
            assert_eq!(t.get(b"zz/b"), Some(&b""[..]));
            assert_eq!(t.get(b"layer007"), None);
        }
        // The snappy table really holds compressed type-1 blocks.
        let plain = build_table(&blocks, false);
        let packed = build_table(&blocks, true);
        let first = first_data_handle(&packed);
        assert_eq!(packed[first.size as usize], SNAPPY_COMPRESSION);
        assert!(
            first.size < first_data_handle(&plain).size / 2,
            "{first:?} vs {:?}",
            first_data_handle(&plain)
        );
    }

    #[test]
    fn varints() {
        let mut p = 0;
        assert_eq!(varint64(&[0xac, 0x02], &mut p), Ok(300));
        assert_eq!(p, 2);
        let max = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert_eq!(varint64(&max, &mut 0), Ok(u64::MAX));
        let over = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
        assert!(varint64(&over, &mut 0).unwrap_err().contains("overflows"));
        let long = [0x80; 11];
        assert!(varint64(&long, &mut 0).unwrap_err().contains("longer than"));
        assert!(varint64(&[0x80], &mut 0).unwrap_err().contains("truncated"));
        let v32 = [0xff, 0xff, 0xff, 0xff, 0x1f];
        assert!(varint32(&v32, &mut 0).unwrap_err().contains("overflows 32"));
        assert_eq!(
            varint32(&[0xff, 0xff, 0xff, 0xff, 0x0f], &mut 0),
            Ok(u32::MAX)
        );
    }

    fn index_handle(file: &[u8]) -> BlockHandle {
        let footer = &file[file.len() - FOOTER_LEN..];
        let mut p = 0;
        decode_handle(footer, &mut p).unwrap();
        decode_handle(footer, &mut p).unwrap()
    }

    fn first_data_handle(file: &[u8]) -> BlockHandle {
        let index = read_block(file, index_handle(file), file.len() as u64).unwrap();
        parse_handle(&parse_block(&index).unwrap()[0].1).unwrap()
    }

    fn refresh_crc(file: &mut [u8], h: BlockHandle) {
        let (o, s) = (h.offset as usize, h.size as usize);
        let crc = crc32c::extend(crc32c::value(&file[o..o + s]), &[file[o + s]]);
        file[o + s + 1..o + s + 5].copy_from_slice(&crc32c::mask(crc).to_le_bytes());
    }

    #[test]
    fn corruptions_give_clear_errors() {
        let good = build_table(&sample_blocks(), false);
        let first_data = first_data_handle(&good);

        let check = |file: &[u8], want: &str| {
            let e = parse_mem(file).unwrap_err();
            assert!(e.starts_with("mem.index: "), "{e}");
            assert!(e.contains(want), "expected {want:?} in {e:?}");
        };

        check(&good[..30], "truncated table");
        let mut f = good.clone();
        *f.last_mut().unwrap() ^= 1;
        check(&f, "bad magic");

        let mut f = good.clone();
        f[3] ^= 0x40;
        check(&f, "data block at offset 0");
        check(&f, "block crc mismatch");

        let mut f = good.clone();
        f[first_data.size as usize] = 7;
        refresh_crc(&mut f, first_data);
        check(&f, "bad block type 7");

        // Index handle pointing past the end.
        let mut f = good.clone();
        let n = f.len();
        let meta = decode_handle(&f[n - FOOTER_LEN..], &mut 0).unwrap();
        let mut footer = handle_bytes(meta);
        footer.extend(handle_bytes(BlockHandle {
            offset: 1 << 40,
            size: 10,
        }));
        footer.resize(40, 0);
        f[n - FOOTER_LEN..n - 8].copy_from_slice(&footer);
        check(&f, "points outside the file");

        // Overflowing varint in the footer.
        let mut f = good.clone();
        f[n - FOOTER_LEN..n - 8].copy_from_slice(&[0xff; 40]);
        check(&f, "footer: varint");

        // Restart count too large for the block.
        let mut f = good.clone();
        let s = first_data.size as usize;
        f[s - 4..s].copy_from_slice(&1000u32.to_le_bytes());
        refresh_crc(&mut f, first_data);
        check(&f, "restart array out of range");

        // Restart point past the entries.
        let mut f = good.clone();
        f[s - 8..s - 4].copy_from_slice(&(s as u32).to_le_bytes());
        refresh_crc(&mut f, first_data);
        check(&f, "restart array out of range");

        // An entry claiming a value longer than the block.
        let mut f = good.clone();
        f[2] = 0xff; // value_len of the first entry ("" -> "header") now runs into the value
        refresh_crc(&mut f, first_data);
        check(&f, "runs past the entries");
    }

    #[test]
    fn snappy_block_errors_name_the_block() {
        let mut f = build_table(&sample_blocks(), true);
        let first = first_data_handle(&f);
        // Make the first block's declared length wrong, keeping its crc valid.
        f[0] = f[0].wrapping_add(1);
        refresh_crc(&mut f, first);
        let e = parse_mem(&f).unwrap_err();
        assert!(
            e.contains("data block at offset 0") && e.contains("bad snappy data"),
            "{e}"
        );
    }
}
