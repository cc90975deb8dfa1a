//! Reader for TensorFlow V2 checkpoints ("tensor bundles", TF
//! `tensorflow/core/util/tensor_bundle/tensor_bundle.cc`).
//!
//! A bundle is `<prefix>.index`, a table (see [`super::sstable`]) mapping each tensor
//! name to a `BundleEntryProto` (the key `""` holds the `BundleHeaderProto`), plus
//! `<prefix>.data-NNNNN-of-MMMMM` shards holding the tensor bytes. Opening reads the
//! index only; tensors are read on demand, each verified against its crc32c.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use prost::Message;

use super::crc32c;
use super::proto::{bundle_header_proto, BundleEntryProto, BundleHeaderProto, DataType};
use super::sstable::{self, show_key, Table};
use crate::error::{Error, Result};
use crate::ir::{filled_buffer, num_elements, DType, Tensor};

/// `kTensorBundleVersion`: the consumer version this reader implements.
const BUNDLE_VERSION: i32 = 1;
/// More shards than this is taken as a corrupt header rather than a real checkpoint.
const MAX_SHARDS: i32 = 1 << 16;
/// Partitions of one variable; reading checks every pair of slices for overlap.
const MAX_SLICES: usize = 1 << 14;

/// One extent of a [`Slice`]: `length: None` means the whole dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub start: i64,
    pub length: Option<i64>,
}

/// A hyper-rectangle of a partitioned tensor, one extent per dimension
/// (`TensorSliceProto`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slice {
    pub extents: Vec<Extent>,
}

/// What the index says about one tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct EntryInfo {
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Shard number, offset and size of the stored bytes (unused when `slices` is non-empty).
    pub shard: usize,
    pub offset: u64,
    pub size: u64,
    /// Unmasked crc32c of the stored bytes.
    pub crc32c: u32,
    /// Non-empty for a partitioned variable: the slices, each stored under
    /// [`encode_slice_key`]`(name, slice)`.
    pub slices: Vec<Slice>,
}

/// An opened checkpoint. Reading is `&self` and opens shard files per call, so one
/// bundle can be shared between threads.
#[derive(Debug)]
pub struct Bundle {
    prefix: PathBuf,
    index_path: PathBuf,
    num_shards: usize,
    big_endian: bool,
    shard_lens: Vec<u64>,
    /// The shards' bytes for a bundle held in memory; `None`: read from the files.
    in_memory: Option<Vec<Vec<u8>>>,
    entries: BTreeMap<String, EntryInfo>,
    /// Entries under encoded slice keys (those starting with a 0 byte).
    slice_entries: BTreeMap<Vec<u8>, std::result::Result<EntryInfo, String>>,
    /// Tensors whose dtype this reader cannot hold, with the reason.
    unsupported: BTreeMap<String, String>,
}

/// `<prefix>.index`
pub fn index_filename(prefix: &Path) -> PathBuf {
    with_suffix(prefix, ".index")
}

/// `<prefix>.data-%05d-of-%05d`
pub fn data_filename(prefix: &Path, shard: usize, num_shards: usize) -> PathBuf {
    with_suffix(prefix, &format!(".data-{shard:05}-of-{num_shards:05}"))
}

fn with_suffix(prefix: &Path, suffix: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// Turns what a user may name into a checkpoint prefix: a directory holding a
/// `checkpoint` state file (its `model_checkpoint_path`), a `.index` file, or a prefix.
pub fn resolve_prefix(path: &Path) -> Result<PathBuf> {
    if path.is_dir() {
        let state = path.join("checkpoint");
        let text = std::fs::read_to_string(&state).map_err(|e| Error::io(&state, e))?;
        let line = text
            .lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix("model_checkpoint_path:"))
            .ok_or_else(|| Error::file(&state, "no model_checkpoint_path line"))?;
        let name = line.trim().trim_matches('"');
        if name.is_empty() {
            return Err(Error::file(&state, "model_checkpoint_path is empty"));
        }
        let p = Path::new(name);
        return Ok(if p.is_absolute() {
            p.to_path_buf()
        } else {
            path.join(p)
        });
    }
    if let Some(stem) = path.to_str().and_then(|s| s.strip_suffix(".index")) {
        return Ok(PathBuf::from(stem));
    }
    Ok(path.to_path_buf())
}

// ---------------------------------------------------------------------------------
// Slice keys: `checkpoint::EncodeTensorNameSlice` (TF saved_tensor_slice_util.cc),
// built from OrderedCode (TF core/lib/strings/ordered_code.cc):
//   WriteNumIncreasing(0) WriteString(name) WriteNumIncreasing(rank)
//   then per dimension WriteSignedNumIncreasing(start), WriteSignedNumIncreasing(length)
// with length -1 for a whole dimension.
// ---------------------------------------------------------------------------------

/// The table key under which TensorFlow stores `slice` of tensor `name`.
pub fn encode_slice_key(name: &str, slice: &Slice) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len() + 4 + 4 * slice.extents.len());
    write_num_increasing(&mut out, 0);
    for &b in name.as_bytes() {
        match b {
            0x00 => out.extend_from_slice(&[0x00, 0xff]),
            0xff => out.extend_from_slice(&[0xff, 0x00]),
            _ => out.push(b),
        }
    }
    out.extend_from_slice(&[0x00, 0x01]);
    write_num_increasing(&mut out, slice.extents.len() as u64);
    for e in &slice.extents {
        write_signed_num_increasing(&mut out, e.start);
        write_signed_num_increasing(&mut out, e.length.unwrap_or(-1));
    }
    out
}

/// Inverse of [`encode_slice_key`]; `None` when `key` is not a well-formed slice key.
pub fn decode_slice_key(key: &[u8]) -> Option<(String, Slice)> {
    let mut pos = 0;
    if read_num_increasing(key, &mut pos)? != 0 {
        return None;
    }
    let mut name = Vec::new();
    loop {
        let b = *key.get(pos)?;
        match b {
            0x00 => {
                match *key.get(pos + 1)? {
                    0x01 => {
                        pos += 2;
                        break;
                    }
                    0xff => name.push(0),
                    _ => return None,
                }
                pos += 2;
            }
            0xff => {
                if *key.get(pos + 1)? != 0x00 {
                    return None;
                }
                name.push(0xff);
                pos += 2;
            }
            _ => {
                name.push(b);
                pos += 1;
            }
        }
    }
    let rank = read_num_increasing(key, &mut pos)?;
    if rank == 0 || rank > 255 {
        return None;
    }
    let mut extents = Vec::with_capacity(rank as usize);
    for _ in 0..rank {
        let start = read_signed_num_increasing(key, &mut pos)?;
        let length = read_signed_num_increasing(key, &mut pos)?;
        extents.push(Extent {
            start,
            length: (length >= 0).then_some(length),
        });
    }
    if pos != key.len() {
        return None;
    }
    Some((String::from_utf8(name).ok()?, Slice { extents }))
}

fn write_num_increasing(out: &mut Vec<u8>, v: u64) {
    let bytes = v.to_be_bytes();
    let skip = bytes.iter().take_while(|&&b| b == 0).count();
    out.push((8 - skip) as u8);
    out.extend_from_slice(&bytes[skip..]);
}

fn read_num_increasing(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let len = *buf.get(*pos)? as usize;
    if len > 8 {
        return None;
    }
    let digits = buf.get(*pos + 1..*pos + 1 + len)?;
    *pos += 1 + len;
    Some(
        digits
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)),
    )
}

/// Bytes of the signed encoding of `v`: n bytes hold values in [-2^(7n-1), 2^(7n-1)).
fn signed_len(v: i64) -> usize {
    let x = if v < 0 { !v } else { v } as u64;
    let bits = 64 - x.leading_zeros() as usize + 1; // payload bits including sign
    bits.div_ceil(7).clamp(1, 10)
}

fn write_signed_num_increasing(out: &mut Vec<u8>, v: i64) {
    let len = signed_len(v);
    // Sign-extended big-endian value in 10 bytes, of which the last `len` are used.
    let sign = if v < 0 { 0xff } else { 0x00 };
    let mut buf = [sign; 10];
    buf[2..].copy_from_slice(&v.to_be_bytes());
    let enc = &mut buf[10 - len..];
    // Flip the top `len` bits: the length header (TF kLengthToHeaderBits).
    let header: [u8; 2] = match len {
        1 => [0x80, 0],
        2 => [0xc0, 0],
        3 => [0xe0, 0],
        4 => [0xf0, 0],
        5 => [0xf8, 0],
        6 => [0xfc, 0],
        7 => [0xfe, 0],
        8 => [0xff, 0],
        9 => [0xff, 0x80],
        _ => [0xff, 0xc0],
    };
    enc[0] ^= header[0];
    if len > 1 {
        enc[1] ^= header[1];
    }
    out.extend_from_slice(enc);
}

fn read_signed_num_increasing(buf: &[u8], pos: &mut usize) -> Option<i64> {
    let first = *buf.get(*pos)?;
    let neg = first & 0x80 == 0;
    let inv = |b: u8| if neg { !b } else { b };
    // Length = 1 + number of header bits after the sign bit that equal the sign bit.
    let mut len = 1 + (inv(first) << 1).leading_ones() as usize;
    if len == 8 {
        let second = inv(*buf.get(*pos + 1)?);
        len += second.leading_ones() as usize;
        if len > 10 {
            return None;
        }
    }
    let bytes = buf.get(*pos..*pos + len)?;
    // Raw big-endian value with the sign-extension of a negative number.
    let mut x: u128 = if neg { u128::MAX } else { 0 };
    for &b in bytes {
        x = (x << 8) | u128::from(b);
    }
    // The top `len` bits are the header; the value is the low 7*len bits, sign-extended.
    let payload_bits = 7 * len;
    let mask: u128 = (1u128 << payload_bits) - 1;
    let v = if neg {
        !(!x & mask) as i128
    } else {
        (x & mask) as i128
    };
    let v = i64::try_from(v).ok()?;
    if signed_len(v) != len {
        return None;
    }
    *pos += len;
    Some(v)
}

// ---------------------------------------------------------------------------------

/// The IR dtype of a stored entry, or why it cannot be read.
fn entry_dtype(code: i32) -> std::result::Result<DType, String> {
    let d = DataType::try_from(code).map_err(|_| format!("unknown dtype code {code}"))?;
    let unsupported = || format!("dtype {} is not supported", d.as_str_name());
    match d.to_ir() {
        Some(DType::Resource | DType::Variant) | None => Err(unsupported()),
        Some(_) if code > 100 => Err(unsupported()),
        Some(t) => Ok(t),
    }
}

fn parse_shape(e: &BundleEntryProto) -> std::result::Result<Vec<usize>, String> {
    let Some(shape) = &e.shape else {
        return Ok(Vec::new());
    };
    if shape.unknown_rank {
        return Err("shape has unknown rank".into());
    }
    let dims = shape
        .dim
        .iter()
        .map(|d| usize::try_from(d.size).map_err(|_| format!("dimension {} is invalid", d.size)))
        .collect::<std::result::Result<Vec<usize>, String>>()?;
    num_elements(&dims).ok_or_else(|| format!("element count of shape {dims:?} overflows"))?;
    Ok(dims)
}

fn parse_slices(e: &BundleEntryProto, shape: &[usize]) -> std::result::Result<Vec<Slice>, String> {
    if e.slices.len() > MAX_SLICES {
        return Err(format!(
            "{} slices (at most {MAX_SLICES} are supported)",
            e.slices.len()
        ));
    }
    let mut out = Vec::with_capacity(e.slices.len());
    for (i, s) in e.slices.iter().enumerate() {
        if s.extent.len() != shape.len() {
            return Err(format!(
                "slice {i} has {} extents for a rank-{} tensor",
                s.extent.len(),
                shape.len()
            ));
        }
        let mut extents = Vec::with_capacity(shape.len());
        for (d, (x, &dim)) in s.extent.iter().zip(shape).enumerate() {
            use super::proto::tensor_slice_proto::extent::HasLength;
            let length = x.has_length.map(|HasLength::Length(l)| l);
            let end = match length {
                Some(l) if l >= 0 && x.start >= 0 => x.start.checked_add(l),
                None if x.start == 0 => Some(dim as i64),
                _ => None,
            };
            if !matches!(end, Some(end) if end as u64 <= dim as u64) {
                let length = length.map_or("all".to_string(), |l| l.to_string());
                return Err(format!(
                    "slice {i} extent {d} (start {}, length {length}) does not fit dimension {dim}",
                    x.start
                ));
            }
            extents.push(Extent {
                start: x.start,
                length,
            });
        }
        out.push(Slice { extents });
    }
    Ok(out)
}

/// Checks and converts one stored entry; `Err` is why it cannot be read.
fn entry_info(
    e: &BundleEntryProto,
    num_shards: usize,
    shard_lens: &[u64],
    shard_path: impl Fn(usize) -> PathBuf,
) -> std::result::Result<std::result::Result<EntryInfo, String>, String> {
    let shape = parse_shape(e)?;
    let n = num_elements(&shape).unwrap_or(0) as u64;
    let slices = parse_slices(e, &shape)?;
    let dtype = match entry_dtype(e.dtype) {
        Ok(d) => d,
        Err(why) => return Ok(Err(why)),
    };
    if !slices.is_empty() {
        return Ok(Ok(EntryInfo {
            dtype,
            shape,
            shard: 0,
            offset: 0,
            size: 0,
            crc32c: 0,
            slices,
        }));
    }
    let shard = usize::try_from(e.shard_id)
        .ok()
        .filter(|&s| s < num_shards)
        .ok_or_else(|| {
            format!(
                "shard {} is out of range (bundle has {num_shards})",
                e.shard_id
            )
        })?;
    let offset = u64::try_from(e.offset).map_err(|_| format!("negative offset {}", e.offset))?;
    let size = u64::try_from(e.size).map_err(|_| format!("negative size {}", e.size))?;
    match dtype.size() {
        Some(elem) => {
            let want = n.checked_mul(elem as u64);
            if want != Some(size) {
                return Err(format!(
                    "stored size {size} does not match {n} elements of {dtype} ({} bytes)",
                    want.map_or("overflowing".to_string(), |w| w.to_string())
                ));
            }
        }
        None => {
            // Each string has a length varint of at least one byte, then a 4-byte checksum.
            let min = if n == 0 { 0 } else { n.saturating_add(4) };
            if size < min {
                return Err(format!(
                    "stored size {size} is too small for {n} strings (at least {min} bytes)"
                ));
            }
        }
    }
    let len = shard_lens[shard];
    if offset.checked_add(size).is_none_or(|end| end > len) {
        return Err(format!(
            "bytes {offset}..{} are past the end of {} ({len} bytes)",
            offset.saturating_add(size),
            shard_path(shard).display()
        ));
    }
    Ok(Ok(EntryInfo {
        dtype,
        shape,
        shard,
        offset,
        size,
        crc32c: crc32c::unmask(e.crc32c),
        slices,
    }))
}

impl Bundle {
    /// Opens `<prefix>.index`, reads the header and every entry, and checks that the
    /// data shards exist and hold every entry's bytes. No tensor data is read.
    pub fn open(prefix: &Path) -> Result<Bundle> {
        let index_path = index_filename(prefix);
        let table = Table::open(&index_path)?;
        Bundle::from_table(prefix, table, None)
    }

    /// A bundle held in memory: the `.index` bytes and every data shard's bytes.
    /// `prefix` only names the files in errors.
    pub fn from_bytes(prefix: &Path, index: &[u8], shards: Vec<Vec<u8>>) -> Result<Bundle> {
        let table = Table::parse(&index_filename(prefix), index)?;
        Bundle::from_table(prefix, table, Some(shards))
    }

    fn from_table(prefix: &Path, table: Table, in_memory: Option<Vec<Vec<u8>>>) -> Result<Bundle> {
        let index_path = index_filename(prefix);
        let ierr = |msg: String| Error::file(&index_path, msg);

        let Some((first_key, header_bytes)) = table.entries.first() else {
            return Err(ierr("table is empty: no bundle header".into()));
        };
        if !first_key.is_empty() {
            return Err(ierr(format!(
                "first key is {}, not the bundle header \"\"",
                show_key(first_key)
            )));
        }
        let header = BundleHeaderProto::decode(header_bytes.as_slice())
            .map_err(|e| ierr(format!("bundle header is not a BundleHeaderProto: {e}")))?;
        if header.num_shards < 1 || header.num_shards > MAX_SHARDS {
            return Err(ierr(format!(
                "bundle header has {} shards",
                header.num_shards
            )));
        }
        let num_shards = header.num_shards as usize;
        let big_endian = match bundle_header_proto::Endianness::try_from(header.endianness) {
            Ok(bundle_header_proto::Endianness::Little) => false,
            Ok(bundle_header_proto::Endianness::Big) => true,
            Err(_) => {
                return Err(ierr(format!(
                    "bundle header has unknown endianness {}",
                    header.endianness
                )))
            }
        };
        if let Some(v) = &header.version {
            if v.producer < 0 {
                return Err(ierr(format!(
                    "bundle producer version {} is invalid",
                    v.producer
                )));
            }
            if v.min_consumer > BUNDLE_VERSION {
                return Err(ierr(format!(
                    "checkpoint needs reader version {} or newer; this reader is version {BUNDLE_VERSION}",
                    v.min_consumer
                )));
            }
            if v.bad_consumers.contains(&BUNDLE_VERSION) {
                return Err(ierr(format!(
                    "checkpoint disallows reader version {BUNDLE_VERSION}"
                )));
            }
        }

        let shard_lens = match &in_memory {
            Some(shards) if shards.len() != num_shards => {
                return Err(ierr(format!(
                    "bundle header has {num_shards} shards, {} were given",
                    shards.len()
                )))
            }
            Some(shards) => shards.iter().map(|d| d.len() as u64).collect(),
            None => {
                let mut lens = Vec::with_capacity(num_shards);
                for s in 0..num_shards {
                    let p = data_filename(prefix, s, num_shards);
                    let meta = std::fs::metadata(&p).map_err(|e| {
                        Error::file(&p, format!("data shard {s} of {num_shards}: {e}"))
                    })?;
                    lens.push(meta.len());
                }
                lens
            }
        };

        let mut bundle = Bundle {
            prefix: prefix.to_path_buf(),
            index_path: index_path.clone(),
            num_shards,
            big_endian,
            shard_lens,
            in_memory,
            entries: BTreeMap::new(),
            slice_entries: BTreeMap::new(),
            unsupported: BTreeMap::new(),
        };
        for (key, value) in &table.entries[1..] {
            let shown = show_key(key);
            let proto = BundleEntryProto::decode(value.as_slice()).map_err(|e| {
                ierr(format!(
                    "tensor {shown}: entry is not a BundleEntryProto: {e}"
                ))
            })?;
            let info = entry_info(&proto, num_shards, &bundle.shard_lens, |s| {
                data_filename(prefix, s, num_shards)
            })
            .map_err(|e| ierr(format!("tensor {shown}: {e}")))?;
            if key.first() == Some(&0) {
                bundle.slice_entries.insert(key.clone(), info);
                continue;
            }
            let name = String::from_utf8(key.clone())
                .map_err(|_| ierr(format!("tensor key {shown} is not UTF-8")))?;
            match info {
                Ok(info) => {
                    bundle.entries.insert(name, info);
                }
                Err(why) => {
                    bundle.unsupported.insert(name, why);
                }
            }
        }
        Ok(bundle)
    }

    /// Tensor names, sorted; excludes the header and the per-slice entries of
    /// partitioned variables (the partitioned variable itself is listed).
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn entry(&self, key: &str) -> Option<&EntryInfo> {
        self.entries.get(key)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    /// Tensors present in the checkpoint that cannot be read (e.g. complex or
    /// variant dtypes), with the reason.
    pub fn unsupported(&self) -> impl Iterator<Item = (&str, &str)> {
        self.unsupported
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn num_shards(&self) -> usize {
        self.num_shards
    }

    pub fn prefix(&self) -> &Path {
        &self.prefix
    }

    pub fn index_path(&self) -> &Path {
        &self.index_path
    }

    /// Whether the data was written big-endian (it is byte-swapped on read).
    pub fn is_big_endian(&self) -> bool {
        self.big_endian
    }

    pub fn shard_path(&self, shard: usize) -> PathBuf {
        data_filename(&self.prefix, shard, self.num_shards)
    }

    /// Reads one tensor, verifying its checksum; partitioned variables are
    /// reassembled from their slices.
    pub fn read(&self, key: &str) -> Result<Tensor> {
        let Some(info) = self.entries.get(key) else {
            if let Some(why) = self.unsupported.get(key) {
                return Err(Error::file(
                    &self.index_path,
                    format!("tensor {key:?}: {why}"),
                ));
            }
            return Err(Error::file(
                &self.index_path,
                format!(
                    "tensor {key:?} is not in the checkpoint ({} tensors)",
                    self.entries.len()
                ),
            ));
        };
        if info.slices.is_empty() {
            self.read_stored(key, info)
        } else {
            self.read_partitioned(key, info)
        }
    }

    /// Reads one stored (unpartitioned) entry. `what` names it in errors.
    fn read_stored(&self, what: &str, info: &EntryInfo) -> Result<Tensor> {
        let path = self.shard_path(info.shard);
        let ferr = |msg: String| Error::file(&path, format!("tensor {what:?}: {msg}"));
        let mut file = match &self.in_memory {
            Some(shards) => Shard::Memory(shards.get(info.shard).map_or(&[], Vec::as_slice)),
            None => Shard::File(File::open(&path).map_err(|e| ferr(e.to_string()))?),
        };
        let len = file.len().map_err(|e| ferr(e.to_string()))?;
        let end = info.offset.checked_add(info.size);
        if end.is_none_or(|end| end > len) {
            return Err(ferr(format!(
                "bytes {}..{} are past the end of the file ({len} bytes)",
                info.offset,
                info.offset.saturating_add(info.size)
            )));
        }
        // Fits in memory terms: `size` is at most the file's length.
        let size = usize::try_from(info.size)
            .map_err(|_| ferr(format!("{} bytes do not fit in memory", info.size)))?;

        if info.dtype == DType::String {
            let mut raw = vec![0u8; size];
            file.read_at(info.offset, &mut raw)
                .map_err(|e| ferr(e.to_string()))?;
            let n = num_elements(&info.shape).unwrap_or(0);
            let (strings, crc) = parse_strings(&raw, n, self.big_endian).map_err(ferr)?;
            check_crc(info.crc32c, crc).map_err(ferr)?;
            return Tensor::from_strings(info.shape.clone(), strings)
                .map_err(|e| ferr(e.to_string()));
        }

        let (data, read) = filled_buffer(size, |buf| -> Result<()> {
            file.read_at(info.offset, buf)
                .map_err(|e| ferr(e.to_string()))?;
            check_crc(info.crc32c, crc32c::value(buf)).map_err(ferr)?;
            if self.big_endian {
                let elem = info.dtype.size().unwrap_or(1);
                if elem > 1 {
                    for c in buf.chunks_exact_mut(elem) {
                        c.reverse();
                    }
                }
            }
            Ok(())
        });
        read?;
        Tensor::from_bytes(info.dtype, info.shape.clone(), data).map_err(|e| ferr(e.to_string()))
    }

    fn read_partitioned(&self, key: &str, info: &EntryInfo) -> Result<Tensor> {
        let ierr = |msg: String| Error::file(&self.index_path, format!("tensor {key:?}: {msg}"));
        let rank = info.shape.len();
        if rank == 0 {
            return Err(ierr("a scalar cannot be partitioned".into()));
        }
        let total = num_elements(&info.shape).unwrap_or(0);

        // Resolve every slice to (start, length) per dimension and its stored entry.
        let mut parts: Vec<Part> = Vec::new();
        let mut covered: usize = 0;
        for slice in &info.slices {
            let region: Vec<(usize, usize)> = slice
                .extents
                .iter()
                .zip(&info.shape)
                .map(|(e, &dim)| {
                    let start = e.start as usize;
                    (start, e.length.map_or(dim - start, |l| l as usize))
                })
                .collect();
            let lens: Vec<usize> = region.iter().map(|r| r.1).collect();
            let skey = encode_slice_key(key, slice);
            let label = format!("{key}{}", slice_label(&region));
            let stored = match self.slice_entries.get(&skey) {
                Some(Ok(e)) => e,
                Some(Err(why)) => return Err(ierr(format!("slice {label}: {why}"))),
                None => {
                    return Err(ierr(format!(
                        "slice {label} has no entry (key {})",
                        show_key(&skey)
                    )))
                }
            };
            if stored.dtype != info.dtype || stored.shape != lens || !stored.slices.is_empty() {
                return Err(ierr(format!(
                    "slice {label} is stored as {} {:?}, expected {} {lens:?}",
                    stored.dtype, stored.shape, info.dtype
                )));
            }
            let volume = num_elements(&lens).unwrap_or(0);
            for other in &parts {
                let overlap = region
                    .iter()
                    .zip(&other.region)
                    .all(|(&(a, al), &(b, bl))| a < b + bl && b < a + al);
                if overlap && volume > 0 {
                    return Err(ierr(format!("slices {} and {label} overlap", other.label)));
                }
            }
            covered += volume;
            parts.push(Part {
                region,
                stored,
                label,
            });
        }
        if covered != total {
            return Err(ierr(format!("slices cover {covered} of {total} elements")));
        }

        let strides = row_major_strides(&info.shape);
        match info.dtype.size() {
            Some(elem) => {
                let (out, read) = filled_buffer(total * elem, |buf| -> Result<()> {
                    for p in &parts {
                        let t = self.read_stored(&p.label, p.stored)?;
                        copy_region(&p.region, &strides, |src_el, dst_el, n| {
                            buf[dst_el * elem..(dst_el + n) * elem]
                                .copy_from_slice(&t.bytes()[src_el * elem..(src_el + n) * elem]);
                        });
                    }
                    Ok(())
                });
                read?;
                Tensor::from_bytes(info.dtype, info.shape.clone(), out)
                    .map_err(|e| ierr(e.to_string()))
            }
            None => {
                let mut out: Vec<Vec<u8>> = vec![Vec::new(); total];
                for p in &parts {
                    let t = self.read_stored(&p.label, p.stored)?;
                    let src = t.strings().unwrap_or(&[]);
                    copy_region(&p.region, &strides, |src_el, dst_el, n| {
                        out[dst_el..dst_el + n].clone_from_slice(&src[src_el..src_el + n]);
                    });
                }
                Tensor::from_strings(info.shape.clone(), out).map_err(|e| ierr(e.to_string()))
            }
        }
    }
}

/// Where a stored entry's bytes come from.
enum Shard<'a> {
    File(File),
    Memory(&'a [u8]),
}

impl Shard<'_> {
    fn len(&self) -> std::io::Result<u64> {
        match self {
            Shard::File(f) => Ok(f.metadata()?.len()),
            Shard::Memory(m) => Ok(m.len() as u64),
        }
    }

    /// Fills `buf` from `offset`; the caller has checked the range against [`Shard::len`].
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        match self {
            Shard::File(f) => {
                f.seek(SeekFrom::Start(offset))?;
                f.read_exact(buf)
            }
            Shard::Memory(m) => {
                let src = usize::try_from(offset)
                    .ok()
                    .and_then(|o| m.get(o..o.checked_add(buf.len())?))
                    .ok_or(std::io::ErrorKind::UnexpectedEof)?;
                buf.copy_from_slice(src);
                Ok(())
            }
        }
    }
}

/// One stored slice of a partitioned tensor: its (start, length) per dimension.
struct Part<'a> {
    region: Vec<(usize, usize)>,
    stored: &'a EntryInfo,
    label: String,
}

fn slice_label(region: &[(usize, usize)]) -> String {
    let parts: Vec<String> = region
        .iter()
        .map(|&(s, l)| format!("{s}:{}", s + l))
        .collect();
    format!("[{}]", parts.join(", "))
}

fn row_major_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1usize; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    strides
}

/// Calls `copy(src_element, dst_element, count)` for each contiguous row of `region`
/// (start, length per dimension) within a tensor with `strides`; the source is the
/// region stored densely in row-major order.
fn copy_region(
    region: &[(usize, usize)],
    strides: &[usize],
    mut copy: impl FnMut(usize, usize, usize),
) {
    let rank = region.len();
    if region.iter().any(|r| r.1 == 0) {
        return;
    }
    let row = region[rank - 1].1;
    let mut idx = vec![0usize; rank - 1];
    let mut src = 0;
    loop {
        let dst: usize = idx
            .iter()
            .zip(region)
            .zip(strides)
            .map(|((i, r), s)| (r.0 + i) * s)
            .sum::<usize>()
            + region[rank - 1].0;
        copy(src, dst, row);
        src += row;
        // Odometer increment over the outer dimensions.
        let mut d = rank - 1;
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < region[d].1 {
                break;
            }
            idx[d] = 0;
        }
    }
}

fn check_crc(stored: u32, actual: u32) -> std::result::Result<(), String> {
    if stored != actual {
        return Err(format!(
            "crc32c mismatch (index says {stored:08x}, data has {actual:08x})"
        ));
    }
    Ok(())
}

/// Decodes a DT_STRING entry: `[varint64 len]*n [u32 masked crc of lengths] [bytes]*n`,
/// returning the strings and the crc32c of the entry as TensorFlow computes it.
fn parse_strings(
    raw: &[u8],
    n: usize,
    big_endian: bool,
) -> std::result::Result<(Vec<Vec<u8>>, u32), String> {
    if raw.is_empty() && n == 0 {
        return Ok((Vec::new(), 0));
    }
    // At least one varint byte per element: n is bounded by the entry size.
    if n > raw.len() {
        return Err(format!("{n} strings cannot fit in {} bytes", raw.len()));
    }
    let mut pos = 0;
    let mut lens = Vec::with_capacity(n);
    let mut crc = 0u32;
    let mut total: u64 = 0;
    for i in 0..n {
        let len =
            sstable::varint64(raw, &mut pos).map_err(|e| format!("string {i} length: {e}"))?;
        crc = if let Ok(l32) = u32::try_from(len) {
            let b = if big_endian {
                l32.to_be_bytes()
            } else {
                l32.to_le_bytes()
            };
            crc32c::extend(crc, &b)
        } else {
            let b = if big_endian {
                len.to_be_bytes()
            } else {
                len.to_le_bytes()
            };
            crc32c::extend(crc, &b)
        };
        total = total.saturating_add(len);
        lens.push(len);
    }
    let Some(raw_sum) = raw.get(pos..pos + 4) else {
        return Err("string lengths run into the end of the entry".into());
    };
    let raw_sum: [u8; 4] = [raw_sum[0], raw_sum[1], raw_sum[2], raw_sum[3]];
    let stored = if big_endian {
        u32::from_be_bytes(raw_sum)
    } else {
        u32::from_le_bytes(raw_sum)
    };
    if crc32c::unmask(stored) != crc {
        return Err(format!(
            "string length checksum mismatch (stored {:08x}, computed {crc:08x})",
            crc32c::unmask(stored)
        ));
    }
    crc = crc32c::extend(crc, &raw_sum);
    pos += 4;
    let rest = (raw.len() - pos) as u64;
    if total != rest {
        return Err(format!(
            "string lengths add up to {total} bytes but the entry has {rest} left"
        ));
    }
    let mut strings = Vec::with_capacity(n);
    for len in lens {
        let s = &raw[pos..pos + len as usize];
        crc = crc32c::extend(crc, s);
        strings.push(s.to_vec());
        pos += len as usize;
    }
    Ok((strings, crc))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(ext: &[(i64, Option<i64>)]) -> Slice {
        Slice {
            extents: ext
                .iter()
                .map(|&(start, length)| Extent { start, length })
                .collect(),
        }
    }

    #[test]
    fn slice_key_matches_tensorflow() {
        // Keys TensorFlow wrote into fixtures/dtypes (see its index_dump.json).
        let k = encode_slice_key("partitioned", &slice(&[(0, Some(3)), (0, Some(3))]));
        assert_eq!(
            k,
            [
                &[0u8][..],
                b"partitioned",
                &[0, 1, 1, 2, 0x80, 0x83, 0x80, 0x83]
            ]
            .concat()
        );
        let k = encode_slice_key("partitioned", &slice(&[(3, Some(3)), (0, Some(3))]));
        assert_eq!(
            decode_slice_key(&k).unwrap().1,
            slice(&[(3, Some(3)), (0, Some(3))])
        );
        assert_eq!(&k[k.len() - 4..], [0x83, 0x83, 0x80, 0x83]);
        // Whole-dimension extent is written as length -1.
        let k = encode_slice_key("a", &slice(&[(0, None)]));
        assert_eq!(k, [0, b'a', 0, 1, 1, 1, 0x80, 0x7f]);
    }

    #[test]
    fn signed_numbers_match_ordered_code_examples() {
        let enc = |v: i64| {
            let mut o = Vec::new();
            write_signed_num_increasing(&mut o, v);
            o
        };
        // Examples from TF ordered_code.cc's comments.
        assert_eq!(enc(0x424242), [0xf0, 0x42, 0x42, 0x42]);
        assert_eq!(enc(-0x800), [0x38, 0x00]);
        assert_eq!(enc(0), [0x80]);
        assert_eq!(enc(-1), [0x7f]);
        assert_eq!(enc(63), [0xbf]);
        assert_eq!(enc(64), [0xc0, 0x40]);
        assert_eq!(enc(-64), [0x40]);
        assert_eq!(enc(-65), [0x3f, 0xbf]);
        let mut prev: Option<Vec<u8>> = None;
        let mut values: Vec<i64> = vec![i64::MIN, i64::MIN + 1, i64::MAX, i64::MAX - 1];
        for s in 0..63 {
            for v in [1i64 << s, (1i64 << s) - 1, (1i64 << s) + 1] {
                values.extend([v, -v]);
            }
        }
        values.sort();
        values.dedup();
        for v in values {
            let e = enc(v);
            let mut p = 0;
            assert_eq!(
                read_signed_num_increasing(&e, &mut p),
                Some(v),
                "{v}: {e:02x?}"
            );
            assert_eq!(p, e.len());
            if let Some(prev) = &prev {
                assert!(prev < &e, "encoding must sort like the numbers ({v})");
            }
            prev = Some(e);
        }
    }

    #[test]
    fn malformed_slice_keys_are_rejected() {
        let good = encode_slice_key("x\0y\u{ff}", &slice(&[(2, Some(5)), (0, None)]));
        assert_eq!(
            decode_slice_key(&good),
            Some(("x\0y\u{ff}".to_string(), slice(&[(2, Some(5)), (0, None)])))
        );
        for cut in 0..good.len() {
            assert_eq!(decode_slice_key(&good[..cut]), None, "cut at {cut}");
        }
        let mut extra = good.clone();
        extra.push(0x80);
        assert_eq!(decode_slice_key(&extra), None);
        assert_eq!(decode_slice_key(b"plain/name"), None);
    }

    #[test]
    fn copy_region_places_rows() {
        // A 2x3 block at rows 1..3, cols 1..4 of a 4x5 matrix.
        let strides = row_major_strides(&[4, 5]);
        let mut calls = vec![];
        copy_region(&[(1, 2), (1, 3)], &strides, |s, d, n| calls.push((s, d, n)));
        assert_eq!(calls, [(0, 6, 3), (3, 11, 3)]);
        let strides = row_major_strides(&[2, 2, 2]);
        let mut calls = vec![];
        copy_region(&[(1, 1), (0, 2), (0, 2)], &strides, |s, d, n| {
            calls.push((s, d, n))
        });
        assert_eq!(calls, [(0, 4, 2), (2, 6, 2)]);
    }

    fn string_entry(strings: &[&[u8]], big_endian: bool) -> (Vec<u8>, u32) {
        let mut out = Vec::new();
        let mut crc = 0;
        for s in strings {
            let mut v = s.len() as u64;
            while v >= 0x80 {
                out.push(v as u8 | 0x80);
                v >>= 7;
            }
            out.push(v as u8);
            let l = s.len() as u32;
            crc = crc32c::extend(
                crc,
                &if big_endian {
                    l.to_be_bytes()
                } else {
                    l.to_le_bytes()
                },
            );
        }
        let m = crc32c::mask(crc);
        let mb = if big_endian {
            m.to_be_bytes()
        } else {
            m.to_le_bytes()
        };
        out.extend_from_slice(&mb);
        crc = crc32c::extend(crc, &mb);
        for s in strings {
            out.extend_from_slice(s);
            crc = crc32c::extend(crc, s);
        }
        (out, crc)
    }

    #[test]
    fn strings_decode_and_reject_corruption() {
        let items: [&[u8]; 3] = [b"hello", b"", &[0u8; 200]];
        for be in [false, true] {
            let (raw, crc) = string_entry(&items, be);
            let (got, c) = parse_strings(&raw, 3, be).unwrap();
            assert_eq!(got, items.iter().map(|s| s.to_vec()).collect::<Vec<_>>());
            assert_eq!(c, crc);
        }
        let (raw, _) = string_entry(&items, false);
        let e = parse_strings(&raw, 3, true).unwrap_err();
        assert!(e.contains("length checksum mismatch"), "{e}");
        let mut bad = raw.clone();
        bad[0] = 6;
        assert!(parse_strings(&bad, 3, false)
            .unwrap_err()
            .contains("length checksum"));
        assert!(parse_strings(&raw[..raw.len() - 1], 3, false)
            .unwrap_err()
            .contains("add up to"));
        assert!(parse_strings(&raw, 300, false)
            .unwrap_err()
            .contains("cannot fit"));
        let over = [0xff; 12];
        assert!(parse_strings(&over, 1, false)
            .unwrap_err()
            .contains("string 0 length"));
    }
}
