use std::fmt;
use std::sync::Arc;

use super::{DType, IrError};

/// A dense tensor. Numeric data is held as little-endian bytes behind an `Arc`,
/// so cloning a graph or passing weights between stages never copies them.
#[derive(Clone, PartialEq)]
pub struct Tensor {
    dtype: DType,
    shape: Vec<usize>,
    data: TensorData,
}

#[derive(Clone, PartialEq)]
pub enum TensorData {
    /// Little-endian, row-major element bytes: `num_elements * dtype.size()` long.
    Bytes(Arc<[u8]>),
    /// One byte string per element (DT_STRING).
    Strings(Arc<[Vec<u8>]>),
}

/// A new buffer of `len` bytes, zeroed, then written by `fill` before anyone else can
/// see it; with what `fill` returned.
pub fn filled_buffer<R>(len: usize, fill: impl FnOnce(&mut [u8]) -> R) -> (Arc<[u8]>, R) {
    let mut data: Arc<[u8]> = std::iter::repeat_n(0u8, len).collect();
    let r = fill(Arc::get_mut(&mut data).expect("freshly allocated buffer is unshared"));
    (data, r)
}

/// Number of elements of a shape, or `None` when it overflows `usize`.
pub fn num_elements(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Rust scalar types that map one-to-one onto an IR dtype.
pub trait Element: Copy + Send + Sync + 'static {
    const DTYPE: DType;
    /// Bytes per element (a constant, so that per-element copies compile to moves).
    const SIZE: usize;
    fn read_le(b: &[u8]) -> Self;
    fn write_le(self, out: &mut Vec<u8>);
    /// Writes the element into `dst`, which is exactly its size.
    fn put_le(self, dst: &mut [u8]);
}

macro_rules! element {
    ($t:ty, $d:expr, $n:expr) => {
        impl Element for $t {
            const DTYPE: DType = $d;
            const SIZE: usize = $n;
            fn read_le(b: &[u8]) -> Self {
                let mut a = [0u8; $n];
                a.copy_from_slice(&b[..$n]);
                <$t>::from_le_bytes(a)
            }
            fn write_le(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            fn put_le(self, dst: &mut [u8]) {
                dst.copy_from_slice(&self.to_le_bytes());
            }
        }
    };
}
element!(f32, DType::F32, 4);
element!(f64, DType::F64, 8);
element!(i8, DType::I8, 1);
element!(i16, DType::I16, 2);
element!(i32, DType::I32, 4);
element!(i64, DType::I64, 8);
element!(u8, DType::U8, 1);
element!(u16, DType::U16, 2);
element!(u32, DType::U32, 4);
element!(u64, DType::U64, 8);
element!(half::f16, DType::F16, 2);
element!(half::bf16, DType::BF16, 2);

impl Element for bool {
    const DTYPE: DType = DType::Bool;
    const SIZE: usize = 1;
    fn read_le(b: &[u8]) -> Self {
        b[0] != 0
    }
    fn write_le(self, out: &mut Vec<u8>) {
        out.push(self as u8);
    }
    fn put_le(self, dst: &mut [u8]) {
        dst[0] = self as u8;
    }
}

impl Tensor {
    /// A numeric tensor from raw little-endian bytes; the length must match the shape.
    pub fn from_bytes(
        dtype: DType,
        shape: Vec<usize>,
        bytes: impl Into<Arc<[u8]>>,
    ) -> Result<Tensor, IrError> {
        let bytes = bytes.into();
        let size = dtype
            .size()
            .ok_or_else(|| IrError::new(format!("{dtype} tensors are not held as bytes")))?;
        let n = num_elements(&shape)
            .ok_or_else(|| IrError::new(format!("shape {shape:?} has too many elements")))?;
        let want = n
            .checked_mul(size)
            .ok_or_else(|| IrError::new(format!("shape {shape:?} is too large")))?;
        if bytes.len() != want {
            return Err(IrError::new(format!(
                "{dtype} tensor of shape {shape:?} needs {want} bytes, got {}",
                bytes.len()
            )));
        }
        Ok(Tensor {
            dtype,
            shape,
            data: TensorData::Bytes(bytes),
        })
    }

    pub fn from_strings(shape: Vec<usize>, strings: Vec<Vec<u8>>) -> Result<Tensor, IrError> {
        let n = num_elements(&shape)
            .ok_or_else(|| IrError::new(format!("shape {shape:?} has too many elements")))?;
        if strings.len() != n {
            return Err(IrError::new(format!(
                "string tensor of shape {shape:?} needs {n} elements, got {}",
                strings.len()
            )));
        }
        Ok(Tensor {
            dtype: DType::String,
            shape,
            data: TensorData::Strings(strings.into()),
        })
    }

    /// A tensor from typed values. Panics only if `values.len()` does not match the shape,
    /// which is a bug in the caller, never a property of input data.
    pub fn from_vec<T: Element>(shape: Vec<usize>, values: &[T]) -> Tensor {
        Tensor::from_fn(shape, values.len(), |i| values[i])
    }

    /// A tensor of `n` elements, element `i` being `f(i)`, written straight into the
    /// tensor's buffer (large ones in parallel). Panics only if `n` does not match
    /// the shape, a bug in the caller.
    pub fn from_fn<T: Element>(
        shape: Vec<usize>,
        n: usize,
        f: impl Fn(usize) -> T + Sync,
    ) -> Tensor {
        let size = T::SIZE;
        const BLOCK: usize = 1 << 16;
        let fill = |(b, chunk): (usize, &mut [u8])| {
            for (k, dst) in chunk.chunks_exact_mut(size).enumerate() {
                f(b * BLOCK + k).put_le(dst);
            }
        };
        let (data, ()) = filled_buffer(n * size, |buf| {
            if n >= 4 * BLOCK {
                use rayon::prelude::*;
                buf.par_chunks_mut(BLOCK * size).enumerate().for_each(fill);
            } else {
                buf.chunks_mut(BLOCK * size).enumerate().for_each(fill);
            }
        });
        Tensor::from_bytes(T::DTYPE, shape, data).expect("value count matches shape")
    }

    pub fn scalar<T: Element>(v: T) -> Tensor {
        Tensor::from_vec(vec![], &[v])
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn len(&self) -> usize {
        num_elements(&self.shape).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn data(&self) -> &TensorData {
        &self.data
    }

    /// The raw little-endian bytes of a numeric tensor (empty for strings).
    pub fn bytes(&self) -> &[u8] {
        match &self.data {
            TensorData::Bytes(b) => b,
            TensorData::Strings(_) => &[],
        }
    }

    pub fn strings(&self) -> Option<&[Vec<u8>]> {
        match &self.data {
            TensorData::Strings(s) => Some(s),
            TensorData::Bytes(_) => None,
        }
    }

    /// Whether two tensors share their data buffer (no copy was made).
    pub fn shares_data_with(&self, other: &Tensor) -> bool {
        match (&self.data, &other.data) {
            (TensorData::Bytes(a), TensorData::Bytes(b)) => Arc::ptr_eq(a, b),
            (TensorData::Strings(a), TensorData::Strings(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// Same data, new shape with the same element count.
    pub fn reshaped(&self, shape: Vec<usize>) -> Result<Tensor, IrError> {
        if num_elements(&shape) != Some(self.len()) {
            return Err(IrError::new(format!(
                "cannot reshape {:?} to {shape:?}",
                self.shape
            )));
        }
        Ok(Tensor {
            dtype: self.dtype,
            shape,
            data: self.data.clone(),
        })
    }

    /// The elements as `T`, which must be the tensor's own dtype.
    pub fn values<T: Element>(&self) -> Result<Vec<T>, IrError> {
        if T::DTYPE != self.dtype {
            return Err(IrError::new(format!(
                "tensor is {}, not {}",
                self.dtype,
                T::DTYPE
            )));
        }
        let size = self.dtype.size().unwrap_or(1);
        Ok(self.bytes().chunks_exact(size).map(T::read_le).collect())
    }

    /// Every numeric element converted to f64 (exact for all types but 64-bit integers
    /// beyond 2^53). Strings and resources give an error.
    pub fn to_f64_vec(&self) -> Result<Vec<f64>, IrError> {
        let b = self.bytes();
        Ok(match self.dtype {
            DType::F32 => b.chunks_exact(4).map(|c| f32::read_le(c) as f64).collect(),
            DType::F64 => b.chunks_exact(8).map(f64::read_le).collect(),
            DType::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::read_le(c).to_f64())
                .collect(),
            DType::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::read_le(c).to_f64())
                .collect(),
            DType::I8 => b.iter().map(|&v| v as i8 as f64).collect(),
            DType::U8 => b.iter().map(|&v| v as f64).collect(),
            DType::Bool => b.iter().map(|&v| (v != 0) as u8 as f64).collect(),
            DType::I16 => b.chunks_exact(2).map(|c| i16::read_le(c) as f64).collect(),
            DType::U16 => b.chunks_exact(2).map(|c| u16::read_le(c) as f64).collect(),
            DType::I32 => b.chunks_exact(4).map(|c| i32::read_le(c) as f64).collect(),
            DType::U32 => b.chunks_exact(4).map(|c| u32::read_le(c) as f64).collect(),
            DType::I64 => b.chunks_exact(8).map(|c| i64::read_le(c) as f64).collect(),
            DType::U64 => b.chunks_exact(8).map(|c| u64::read_le(c) as f64).collect(),
            DType::String | DType::Resource | DType::Variant => {
                return Err(IrError::new(format!(
                    "{} tensor has no numeric values",
                    self.dtype
                )))
            }
        })
    }

    /// Every element as f32 (f16/bf16 widened exactly, integers converted).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>, IrError> {
        match self.dtype {
            DType::F32 => self.values::<f32>(),
            DType::F16 => Ok(self
                .bytes()
                .chunks_exact(2)
                .map(|c| half::f16::read_le(c).to_f32())
                .collect()),
            DType::BF16 => Ok(self
                .bytes()
                .chunks_exact(2)
                .map(|c| half::bf16::read_le(c).to_f32())
                .collect()),
            _ => Ok(self.to_f64_vec()?.into_iter().map(|v| v as f32).collect()),
        }
    }

    /// Every integer element as i64 (bools as 0/1); floats give an error.
    pub fn to_i64_vec(&self) -> Result<Vec<i64>, IrError> {
        let b = self.bytes();
        Ok(match self.dtype {
            DType::I8 => b.iter().map(|&v| v as i8 as i64).collect(),
            DType::U8 | DType::Bool => b.iter().map(|&v| v as i64).collect(),
            DType::I16 => b.chunks_exact(2).map(|c| i16::read_le(c) as i64).collect(),
            DType::U16 => b.chunks_exact(2).map(|c| u16::read_le(c) as i64).collect(),
            DType::I32 => b.chunks_exact(4).map(|c| i32::read_le(c) as i64).collect(),
            DType::U32 => b.chunks_exact(4).map(|c| u32::read_le(c) as i64).collect(),
            DType::I64 => b.chunks_exact(8).map(i64::read_le).collect(),
            DType::U64 => b.chunks_exact(8).map(|c| u64::read_le(c) as i64).collect(),
            d => return Err(IrError::new(format!("{d} tensor has no integer values"))),
        })
    }

    /// Bytes this tensor occupies (string tensors: sum of element lengths).
    pub fn byte_size(&self) -> usize {
        match &self.data {
            TensorData::Bytes(b) => b.len(),
            TensorData::Strings(s) => s.iter().map(Vec::len).sum(),
        }
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Tensor({} {:?}, {} bytes)",
            self.dtype,
            self.shape,
            self.byte_size()
        )
    }
}

/// Affine quantization of a tensor: `real = (q - zero_point) * scale`.
/// One scale/zero point per tensor, or one per slice along `axis`.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantParams {
    pub scale: Vec<f32>,
    pub zero_point: Vec<i64>,
    /// `None` for per-tensor; `Some(axis)` when `scale` has one entry per index of `axis`.
    pub axis: Option<u32>,
}

impl QuantParams {
    pub fn per_tensor(scale: f32, zero_point: i64) -> QuantParams {
        QuantParams {
            scale: vec![scale],
            zero_point: vec![zero_point],
            axis: None,
        }
    }

    pub fn per_axis(scale: Vec<f32>, zero_point: Vec<i64>, axis: u32) -> QuantParams {
        QuantParams {
            scale,
            zero_point,
            axis: Some(axis),
        }
    }
}
