//! Reader and writer of NumPy `.npy` files (data sets and outputs).
//!
//! Format versions 1.0, 2.0 and 3.0; little-endian numeric and bool dtypes; C order
//! only. The header's shape is checked against the file size before anything is
//! allocated, and rows can be read in ranges so a data set streams batch by batch.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Result};
use crate::ir::{num_elements, DType, Tensor};

const MAGIC: &[u8; 6] = b"\x93NUMPY";
/// Headers larger than this are refused (NumPy itself refuses above 10,000 bytes by default).
const MAX_HEADER: usize = 1 << 20;
const MAX_RANK: usize = 32;

/// The `descr` NumPy writes for a dtype.
pub fn descr(dtype: DType) -> Option<&'static str> {
    Some(match dtype {
        DType::F32 => "<f4",
        DType::F64 => "<f8",
        DType::F16 => "<f2",
        DType::I8 => "|i1",
        DType::U8 => "|u1",
        DType::Bool => "|b1",
        DType::I16 => "<i2",
        DType::I32 => "<i4",
        DType::I64 => "<i8",
        DType::U16 => "<u2",
        DType::U32 => "<u4",
        DType::U64 => "<u8",
        _ => return None,
    })
}

fn parse_descr(d: &str) -> std::result::Result<DType, String> {
    // A version 3 header is UTF-8: the first character may be longer than a byte.
    let first = d.chars().next().map_or(0, char::len_utf8);
    let (order, code) = d.split_at(first);
    let dtype = match code {
        "f4" => DType::F32,
        "f8" => DType::F64,
        "f2" => DType::F16,
        "i1" => DType::I8,
        "u1" => DType::U8,
        "b1" => DType::Bool,
        "i2" => DType::I16,
        "i4" => DType::I32,
        "i8" => DType::I64,
        "u2" => DType::U16,
        "u4" => DType::U32,
        "u8" => DType::U64,
        _ => return Err(format!("unsupported dtype '{d}'")),
    };
    let one_byte = dtype.size() == Some(1);
    match order {
        "<" => Ok(dtype),
        "|" if one_byte => Ok(dtype),
        ">" if one_byte => Ok(dtype),
        ">" => Err(format!(
            "big-endian dtype '{d}' is not supported; convert with arr.astype(arr.dtype.newbyteorder('<'))"
        )),
        _ => Err(format!("unsupported dtype '{d}'")),
    }
}

/// A parsed `.npy` header.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Byte offset of the data in the file.
    pub data_offset: u64,
}

impl Header {
    /// Bytes of one row (one index of the first dimension).
    pub fn row_bytes(&self) -> usize {
        self.shape.iter().skip(1).product::<usize>() * self.dtype.size().unwrap_or(1)
    }

    /// Number of rows (first dimension; 1 for a scalar).
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }
}

/// A tiny parser for the Python dict literal NumPy writes as its header.
struct Lit<'a> {
    s: &'a [u8],
    pos: usize,
}

#[derive(Debug)]
enum PyVal {
    Str(String),
    Bool(bool),
    Tuple(Vec<u64>),
}

impl<'a> Lit<'a> {
    fn ws(&mut self) {
        while self.pos < self.s.len() && self.s[self.pos].is_ascii_whitespace() {
            self.pos += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.s.get(self.pos) == Some(&c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: u8) -> std::result::Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!(
                "expected '{}' at byte {} of the header",
                c as char, self.pos
            ))
        }
    }

    fn string(&mut self) -> std::result::Result<String, String> {
        self.ws();
        let q = *self.s.get(self.pos).ok_or("unexpected end of header")?;
        if q != b'\'' && q != b'"' {
            return Err(format!(
                "expected a string at byte {} of the header",
                self.pos
            ));
        }
        let start = self.pos + 1;
        let end = self.s[start..]
            .iter()
            .position(|&c| c == q)
            .ok_or("unterminated string in header")?
            + start;
        self.pos = end + 1;
        String::from_utf8(self.s[start..end].to_vec()).map_err(|_| "header is not UTF-8".into())
    }

    fn int(&mut self) -> std::result::Result<u64, String> {
        self.ws();
        let start = self.pos;
        while self.pos < self.s.len() && self.s[self.pos].is_ascii_digit() {
            self.pos += 1;
        }
        if self.s.get(self.pos) == Some(&b'L') {
            self.pos += 1;
        }
        std::str::from_utf8(&self.s[start..self.pos])
            .ok()
            .map(|t| t.trim_end_matches('L'))
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| format!("expected a non-negative dimension at byte {start}"))
    }

    fn value(&mut self) -> std::result::Result<PyVal, String> {
        self.ws();
        match self.s.get(self.pos) {
            Some(b'\'') | Some(b'"') => Ok(PyVal::Str(self.string()?)),
            Some(b'[') => Err("structured dtypes are not supported".into()),
            Some(b'(') => {
                self.pos += 1;
                let mut dims = Vec::new();
                loop {
                    if self.eat(b')') {
                        break;
                    }
                    if dims.len() >= MAX_RANK {
                        return Err(format!("shape has more than {MAX_RANK} dimensions"));
                    }
                    dims.push(self.int()?);
                    if !self.eat(b',') {
                        self.expect(b')')?;
                        break;
                    }
                }
                Ok(PyVal::Tuple(dims))
            }
            _ => {
                let rest = &self.s[self.pos..];
                if rest.starts_with(b"True") {
                    self.pos += 4;
                    Ok(PyVal::Bool(true))
                } else if rest.starts_with(b"False") {
                    self.pos += 5;
                    Ok(PyVal::Bool(false))
                } else {
                    Err(format!(
                        "unexpected value at byte {} of the header",
                        self.pos
                    ))
                }
            }
        }
    }
}

fn parse_dict(text: &[u8]) -> std::result::Result<(DType, Vec<usize>), String> {
    let mut p = Lit { s: text, pos: 0 };
    p.expect(b'{')?;
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    loop {
        if p.eat(b'}') {
            break;
        }
        let key = p.string()?;
        if !matches!(key.as_str(), "descr" | "fortran_order" | "shape") {
            return Err(format!("unexpected header key '{key}'"));
        }
        p.expect(b':')?;
        let val = p.value()?;
        match (key.as_str(), val) {
            ("descr", PyVal::Str(s)) => descr = Some(s),
            ("descr", _) => {
                return Err("structured dtypes are not supported ('descr' is not a string)".into())
            }
            ("fortran_order", PyVal::Bool(b)) => fortran = Some(b),
            ("shape", PyVal::Tuple(t)) => shape = Some(t),
            (k @ ("fortran_order" | "shape"), v) => {
                return Err(format!("header key '{k}' has an invalid value {v:?}"))
            }
            (k, _) => return Err(format!("header key '{k}' has an invalid value")),
        }
        if !p.eat(b',') {
            p.expect(b'}')?;
            break;
        }
    }
    p.ws();
    if p.pos != text.len() {
        return Err("trailing characters after the header dictionary".into());
    }
    let descr = descr.ok_or("header has no 'descr'")?;
    let fortran = fortran.ok_or("header has no 'fortran_order'")?;
    let shape = shape.ok_or("header has no 'shape'")?;
    let dtype = parse_descr(&descr)?;
    if fortran {
        return Err(
            "fortran_order=True arrays are not supported; save with np.ascontiguousarray".into(),
        );
    }
    let shape = shape
        .into_iter()
        .map(|d| usize::try_from(d).map_err(|_| format!("dimension {d} is too large")))
        .collect::<std::result::Result<_, _>>()?;
    Ok((dtype, shape))
}

/// Parses the header at the start of `bytes`, checking the data size against `file_len`.
pub fn parse_header(bytes: &[u8], file_len: u64) -> std::result::Result<Header, String> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err("not a .npy file (bad magic)".into());
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let (len, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err("truncated header".into());
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        _ => return Err(format!("unsupported .npy format version {major}.{minor}")),
    };
    if len > MAX_HEADER {
        return Err(format!("header of {len} bytes is too large"));
    }
    let end = start + len;
    if bytes.len() < end {
        return Err(format!(
            "header says {len} bytes, the file has only {}",
            bytes.len().saturating_sub(start)
        ));
    }
    let text = &bytes[start..end];
    if major < 3 && !text.is_ascii() {
        return Err("header of a version 1/2 file is not ASCII".into());
    }
    let (dtype, shape) = parse_dict(text)?;
    let size = dtype.size().unwrap_or(1) as u64;
    let n = num_elements(&shape).ok_or_else(|| format!("shape {shape:?} is too large"))?;
    let want = (n as u64)
        .checked_mul(size)
        .ok_or_else(|| format!("shape {shape:?} is too large"))?;
    let have = file_len.saturating_sub(end as u64);
    if have != want {
        return Err(format!(
            "shape {shape:?} of {} needs {want} data bytes, the file has {have}",
            dtype
        ));
    }
    Ok(Header {
        dtype,
        shape,
        data_offset: end as u64,
    })
}

fn tensor_from_bytes(dtype: DType, shape: Vec<usize>, mut bytes: Vec<u8>) -> Result<Tensor> {
    if dtype == DType::Bool {
        for b in bytes.iter_mut() {
            *b = (*b != 0) as u8;
        }
    }
    Ok(Tensor::from_bytes(dtype, shape, bytes)?)
}

/// Decodes a whole `.npy` file held in memory; `name` is used in errors.
pub fn decode(bytes: &[u8], name: &Path) -> Result<Tensor> {
    let h = parse_header(bytes, bytes.len() as u64).map_err(|e| Error::file(name, e))?;
    let data = bytes[h.data_offset as usize..].to_vec();
    tensor_from_bytes(h.dtype, h.shape, data).map_err(|e| e.context(name.display().to_string()))
}

/// A `.npy` file opened for reading rows on demand. Safe to share between threads.
pub struct NpyReader {
    path: PathBuf,
    header: Header,
    file: Mutex<File>,
}

impl NpyReader {
    pub fn open(path: &Path) -> Result<NpyReader> {
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut prefix = vec![0u8; 12.min(len as usize)];
        file.read_exact(&mut prefix)
            .map_err(|e| Error::io(path, e))?;
        let hlen = match prefix.get(6) {
            Some(1) if prefix.len() >= 10 => {
                u16::from_le_bytes([prefix[8], prefix[9]]) as usize + 10
            }
            Some(2 | 3) if prefix.len() >= 12 => {
                u32::from_le_bytes([prefix[8], prefix[9], prefix[10], prefix[11]]) as usize + 12
            }
            _ => 12,
        };
        if hlen > MAX_HEADER + 12 {
            return Err(Error::file(
                path,
                format!("header of {hlen} bytes is too large"),
            ));
        }
        let mut head = vec![0u8; hlen.min(len as usize)];
        file.seek(SeekFrom::Start(0))
            .map_err(|e| Error::io(path, e))?;
        file.read_exact(&mut head).map_err(|e| Error::io(path, e))?;
        let header = parse_header(&head, len).map_err(|e| Error::file(path, e))?;
        Ok(NpyReader {
            path: path.to_path_buf(),
            header,
            file: Mutex::new(file),
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn dtype(&self) -> DType {
        self.header.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.header.shape
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of rows (first dimension).
    pub fn rows(&self) -> usize {
        self.header.rows()
    }

    fn check_rows(&self, start: usize, end: usize) -> Result<()> {
        if self.header.shape.is_empty() {
            return Err(Error::file(&self.path, "a scalar array has no rows"));
        }
        if start > end || end > self.rows() {
            return Err(Error::file(
                &self.path,
                format!(
                    "rows {start}..{end} are out of range (the file has {})",
                    self.rows()
                ),
            ));
        }
        Ok(())
    }

    /// Rows `[start, end)` as a tensor of shape `[end - start, ...]`.
    pub fn read_rows(&self, start: usize, end: usize) -> Result<Tensor> {
        self.check_rows(start, end)?;
        let mut buf = vec![0u8; (end - start) * self.header.row_bytes()];
        let shape = self.read_rows_into(start, end, &mut buf)?;
        tensor_from_bytes(self.header.dtype, shape, buf)
            .map_err(|e| e.context(self.path.display().to_string()))
    }

    /// Rows `start..end` (checked as by [`NpyReader::read_rows`]) as the file holds
    /// them (little-endian elements) into `out`, which must hold exactly their bytes;
    /// returns their shape. Lets a caller read rows straight into a typed buffer.
    pub fn read_rows_into(&self, start: usize, end: usize, out: &mut [u8]) -> Result<Vec<usize>> {
        self.check_rows(start, end)?;
        let rb = self.header.row_bytes();
        if out.len() != (end - start) * rb {
            return Err(Error::file(
                &self.path,
                format!(
                    "{} bytes asked for rows {start}..{end} of {rb} bytes each",
                    out.len()
                ),
            ));
        }
        {
            let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
            f.seek(SeekFrom::Start(
                self.header.data_offset + (start * rb) as u64,
            ))
            .map_err(|e| Error::io(&self.path, e))?;
            f.read_exact(out).map_err(|e| Error::io(&self.path, e))?;
        }
        let mut shape = self.header.shape.clone();
        shape[0] = end - start;
        Ok(shape)
    }

    /// The whole array.
    pub fn read_all(&self) -> Result<Tensor> {
        if self.header.shape.is_empty() {
            let size = self.header.dtype.size().unwrap_or(1);
            let mut buf = vec![0u8; size];
            let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
            f.seek(SeekFrom::Start(self.header.data_offset))
                .map_err(|e| Error::io(&self.path, e))?;
            f.read_exact(&mut buf)
                .map_err(|e| Error::io(&self.path, e))?;
            return tensor_from_bytes(self.header.dtype, vec![], buf);
        }
        self.read_rows(0, self.rows())
    }
}

/// Reads a whole `.npy` file.
pub fn read(path: &Path) -> Result<Tensor> {
    NpyReader::open(path)?.read_all()
}

/// The header bytes (magic, version, length, padded dict) for an array.
pub fn header_bytes(dtype: DType, shape: &[usize]) -> Result<Vec<u8>> {
    let d = descr(dtype)
        .ok_or_else(|| Error::msg(format!("{dtype} tensors cannot be written as .npy")))?;
    let dims = match shape {
        [] => "()".to_string(),
        [a] => format!("({a},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let dict = format!("{{'descr': '{d}', 'fortran_order': False, 'shape': {dims}, }}");
    let mut out = MAGIC.to_vec();
    let unpadded = dict.len() + 1;
    let (prefix, version) = if 10 + unpadded <= u16::MAX as usize {
        (10, 1u8)
    } else {
        (12, 2u8)
    };
    let total = (prefix + unpadded).div_ceil(64) * 64;
    let hlen = total - prefix;
    out.extend_from_slice(&[version, 0]);
    if version == 1 {
        out.extend_from_slice(&(hlen as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&(hlen as u32).to_le_bytes());
    }
    out.extend_from_slice(dict.as_bytes());
    out.resize(total - 1, b' ');
    out.push(b'\n');
    Ok(out)
}

/// Encodes a tensor as a `.npy` file image.
pub fn encode(t: &Tensor) -> Result<Vec<u8>> {
    let mut out = header_bytes(t.dtype(), t.shape())?;
    out.extend_from_slice(t.bytes());
    Ok(out)
}

/// Writes a tensor as a `.npy` file.
pub fn write(path: &Path, t: &Tensor) -> Result<()> {
    std::fs::write(path, encode(t)?).map_err(|e| Error::io(path, e))
}

/// Writes a `.npy` file row block by row block, for outputs too large to hold at once.
pub struct NpyWriter {
    path: PathBuf,
    file: std::io::BufWriter<File>,
    dtype: DType,
    row_shape: Vec<usize>,
    rows: usize,
    written: usize,
}

impl NpyWriter {
    /// Creates the file for `rows` rows of `row_shape` elements each.
    pub fn create(
        path: &Path,
        dtype: DType,
        rows: usize,
        row_shape: &[usize],
    ) -> Result<NpyWriter> {
        let mut shape = vec![rows];
        shape.extend_from_slice(row_shape);
        let header = header_bytes(dtype, &shape)?;
        let file = File::create(path).map_err(|e| Error::io(path, e))?;
        let mut file = std::io::BufWriter::new(file);
        file.write_all(&header).map_err(|e| Error::io(path, e))?;
        Ok(NpyWriter {
            path: path.to_path_buf(),
            file,
            dtype,
            row_shape: row_shape.to_vec(),
            rows,
            written: 0,
        })
    }

    /// Appends rows; their dtype and trailing shape must match.
    pub fn write_rows(&mut self, t: &Tensor) -> Result<()> {
        if t.dtype() != self.dtype || t.shape().get(1..) != Some(&self.row_shape[..]) {
            return Err(Error::file(
                &self.path,
                format!(
                    "rows of {} {:?} do not fit an array of {} rows of {:?}",
                    t.dtype(),
                    t.shape(),
                    self.dtype,
                    self.row_shape
                ),
            ));
        }
        let n = t.shape()[0];
        if self.written + n > self.rows {
            return Err(Error::file(
                &self.path,
                format!("more than the declared {} rows written", self.rows),
            ));
        }
        self.file
            .write_all(t.bytes())
            .map_err(|e| Error::io(&self.path, e))?;
        self.written += n;
        Ok(())
    }

    /// Flushes the file; every declared row must have been written.
    pub fn finish(mut self) -> Result<()> {
        if self.written != self.rows {
            return Err(Error::file(
                &self.path,
                format!("{} of {} rows written", self.written, self.rows),
            ));
        }
        self.file.flush().map_err(|e| Error::io(&self.path, e))
    }
}
