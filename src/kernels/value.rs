//! Typed tensor values the kernels compute on. Buffers are behind an `Arc`, so
//! reshapes and identities share data; a kernel that holds the only reference may
//! reuse its input buffer in place.

use std::sync::{Arc, Mutex, Weak};

use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::ir::{num_elements, DType, Element, Tensor, TensorData};

/// A large constant already converted for some live plan.
struct SharedConst {
    /// Held so that its address is not reused while the entry exists.
    data: Arc<[u8]>,
    dtype: DType,
    buf: Weak<Buf>,
}

/// Large constants are converted once and shared by every plan compiled while one of
/// them is alive: the validate stages and the calibration pass of one run compile the
/// same float model, and each would otherwise hold its own copy of an embedding table.
static SHARED_CONSTS: Mutex<Vec<SharedConst>> = Mutex::new(Vec::new());
const SHARE_MIN_BYTES: usize = 1 << 20;

fn shared_consts() -> std::sync::MutexGuard<'static, Vec<SharedConst>> {
    SHARED_CONSTS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Forgets shared constants no plan uses any more (called when a plan is dropped).
pub fn prune_shared_consts() {
    shared_consts().retain(|e| e.buf.strong_count() > 0);
}

/// One tensor's elements, in row-major order.
#[derive(Clone, Debug, PartialEq)]
pub enum Buf {
    F32(Vec<f32>),
    F64(Vec<f64>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    I8(Vec<i8>),
    I16(Vec<i16>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    U8(Vec<u8>),
    U16(Vec<u16>),
    U32(Vec<u32>),
    U64(Vec<u64>),
    Bool(Vec<bool>),
    Str(Vec<Vec<u8>>),
}

/// Element types a [`Buf`] can hold.
pub trait Elem: Clone + Send + Sync + 'static {
    const DTYPE: DType;
    fn slice(b: &Buf) -> Option<&[Self]>;
    fn wrap(v: Vec<Self>) -> Buf;
    fn unwrap(b: Buf) -> std::result::Result<Vec<Self>, Buf>;
    fn zero() -> Self;
}

macro_rules! elem {
    ($t:ty, $var:ident, $dt:expr, $zero:expr) => {
        impl Elem for $t {
            const DTYPE: DType = $dt;
            fn zero() -> Self {
                $zero
            }
            fn slice(b: &Buf) -> Option<&[Self]> {
                match b {
                    Buf::$var(v) => Some(v),
                    _ => None,
                }
            }
            fn wrap(v: Vec<Self>) -> Buf {
                Buf::$var(v)
            }
            fn unwrap(b: Buf) -> std::result::Result<Vec<Self>, Buf> {
                match b {
                    Buf::$var(v) => Ok(v),
                    other => Err(other),
                }
            }
        }
    };
}
elem!(f32, F32, DType::F32, 0.0);
elem!(f64, F64, DType::F64, 0.0);
elem!(f16, F16, DType::F16, f16::ZERO);
elem!(bf16, BF16, DType::BF16, bf16::ZERO);
elem!(i8, I8, DType::I8, 0);
elem!(i16, I16, DType::I16, 0);
elem!(i32, I32, DType::I32, 0);
elem!(i64, I64, DType::I64, 0);
elem!(u8, U8, DType::U8, 0);
elem!(u16, U16, DType::U16, 0);
elem!(u32, U32, DType::U32, 0);
elem!(u64, U64, DType::U64, 0);
elem!(bool, Bool, DType::Bool, false);
elem!(Vec<u8>, Str, DType::String, Vec::new());

/// Runs `$body` with `$T` bound to the Rust type of dtype `$dt` (every storable dtype).
macro_rules! dispatch_any {
    ($dt:expr, $T:ident => $body:expr) => {{
        use $crate::ir::DType as D;
        match $dt {
            D::F32 => {
                type $T = f32;
                $body
            }
            D::F64 => {
                type $T = f64;
                $body
            }
            D::F16 => {
                type $T = half::f16;
                $body
            }
            D::BF16 => {
                type $T = half::bf16;
                $body
            }
            D::I8 => {
                type $T = i8;
                $body
            }
            D::I16 => {
                type $T = i16;
                $body
            }
            D::I32 => {
                type $T = i32;
                $body
            }
            D::I64 => {
                type $T = i64;
                $body
            }
            D::U8 => {
                type $T = u8;
                $body
            }
            D::U16 => {
                type $T = u16;
                $body
            }
            D::U32 => {
                type $T = u32;
                $body
            }
            D::U64 => {
                type $T = u64;
                $body
            }
            D::Bool => {
                type $T = bool;
                $body
            }
            D::String => {
                type $T = Vec<u8>;
                $body
            }
            other => {
                return Err($crate::error::Error::msg(format!(
                    "{other} tensors cannot be computed on"
                )))
            }
        }
    }};
}
pub(crate) use dispatch_any;

impl Buf {
    pub fn dtype(&self) -> DType {
        match self {
            Buf::F32(_) => DType::F32,
            Buf::F64(_) => DType::F64,
            Buf::F16(_) => DType::F16,
            Buf::BF16(_) => DType::BF16,
            Buf::I8(_) => DType::I8,
            Buf::I16(_) => DType::I16,
            Buf::I32(_) => DType::I32,
            Buf::I64(_) => DType::I64,
            Buf::U8(_) => DType::U8,
            Buf::U16(_) => DType::U16,
            Buf::U32(_) => DType::U32,
            Buf::U64(_) => DType::U64,
            Buf::Bool(_) => DType::Bool,
            Buf::Str(_) => DType::String,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Buf::F32(v) => v.len(),
            Buf::F64(v) => v.len(),
            Buf::F16(v) => v.len(),
            Buf::BF16(v) => v.len(),
            Buf::I8(v) => v.len(),
            Buf::I16(v) => v.len(),
            Buf::I32(v) => v.len(),
            Buf::I64(v) => v.len(),
            Buf::U8(v) => v.len(),
            Buf::U16(v) => v.len(),
            Buf::U32(v) => v.len(),
            Buf::U64(v) => v.len(),
            Buf::Bool(v) => v.len(),
            Buf::Str(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The most elements a kernel will allocate for one output (2^31: 8 GiB of float32).
pub const MAX_ELEMENTS: usize = 1 << 31;

/// The element count of an output shape, or an error when it is absurdly large (a
/// malformed graph must not abort the process by exhausting memory).
pub fn checked_len(shape: &[usize]) -> Result<usize> {
    num_elements(shape)
        .filter(|&n| n <= MAX_ELEMENTS)
        .ok_or_else(|| {
            Error::msg(format!(
                "an output of shape {shape:?} would have more than {MAX_ELEMENTS} elements"
            ))
        })
}

/// A tensor value during interpretation.
#[derive(Clone, Debug, PartialEq)]
pub struct Value {
    pub shape: Vec<usize>,
    pub buf: Arc<Buf>,
}

impl Value {
    /// A value from a buffer whose length must match the shape (a kernel bug otherwise).
    pub fn new(shape: Vec<usize>, buf: Buf) -> Value {
        debug_assert_eq!(num_elements(&shape), Some(buf.len()), "shape {shape:?}");
        Value {
            shape,
            buf: Arc::new(buf),
        }
    }

    pub fn from_vec<T: Elem>(shape: Vec<usize>, v: Vec<T>) -> Value {
        Value::new(shape, T::wrap(v))
    }

    pub fn scalar<T: Elem>(v: T) -> Value {
        Value::from_vec(vec![], vec![v])
    }

    pub fn dtype(&self) -> DType {
        self.buf.dtype()
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// The elements as `T`, or an error naming both dtypes.
    pub fn slice<T: Elem>(&self) -> Result<&[T]> {
        T::slice(&self.buf).ok_or_else(|| {
            Error::msg(format!(
                "expected a {} tensor, got {}",
                T::DTYPE,
                self.dtype()
            ))
        })
    }

    /// The elements as an owned vector, without copying when this value holds the only reference.
    pub fn into_vec<T: Elem>(self) -> Result<Vec<T>> {
        let dtype = self.dtype();
        let buf = Arc::try_unwrap(self.buf).unwrap_or_else(|a| (*a).clone());
        T::unwrap(buf)
            .map_err(|_| Error::msg(format!("expected a {} tensor, got {dtype}", T::DTYPE)))
    }

    /// Same data, new shape (element count must match).
    pub fn reshaped(&self, shape: Vec<usize>) -> Result<Value> {
        if num_elements(&shape) != Some(self.len()) {
            return Err(Error::msg(format!(
                "cannot reshape a tensor of shape {:?} ({} elements) to {shape:?}",
                self.shape,
                self.len()
            )));
        }
        Ok(Value {
            shape,
            buf: self.buf.clone(),
        })
    }

    /// Integer elements (any integer dtype) as i64, for shapes, axes and indices.
    pub fn to_i64s(&self) -> Result<Vec<i64>> {
        Ok(match &*self.buf {
            Buf::I32(v) => v.iter().map(|&x| x as i64).collect(),
            Buf::I64(v) => v.clone(),
            Buf::I8(v) => v.iter().map(|&x| x as i64).collect(),
            Buf::I16(v) => v.iter().map(|&x| x as i64).collect(),
            Buf::U8(v) => v.iter().map(|&x| x as i64).collect(),
            Buf::U16(v) => v.iter().map(|&x| x as i64).collect(),
            Buf::U32(v) => v.iter().map(|&x| x as i64).collect(),
            Buf::U64(v) => v
                .iter()
                .map(|&x| i64::try_from(x).map_err(|_| Error::msg(format!("{x} is too large"))))
                .collect::<Result<_>>()?,
            _ => {
                return Err(Error::msg(format!(
                    "expected an integer tensor, got {}",
                    self.dtype()
                )))
            }
        })
    }

    /// Numeric elements widened to f64 (for folding decisions and tests).
    pub fn to_f64s(&self) -> Result<Vec<f64>> {
        Ok(match &*self.buf {
            Buf::F32(v) => v.iter().map(|&x| x as f64).collect(),
            Buf::F64(v) => v.clone(),
            Buf::F16(v) => v.iter().map(|x| x.to_f64()).collect(),
            Buf::BF16(v) => v.iter().map(|x| x.to_f64()).collect(),
            Buf::Bool(v) => v.iter().map(|&x| x as u8 as f64).collect(),
            Buf::Str(_) => return Err(Error::msg("string tensor has no numeric values")),
            _ => self.to_i64s()?.into_iter().map(|x| x as f64).collect(),
        })
    }

    /// [`Value::from_tensor`] for a constant of a plan: a large one is converted once
    /// and shared with every other live plan that holds the same tensor data.
    pub fn from_const_tensor(t: &Tensor) -> Result<Value> {
        let TensorData::Bytes(data) = t.data() else {
            return Value::from_tensor(t);
        };
        if data.len() < SHARE_MIN_BYTES {
            return Value::from_tensor(t);
        }
        // Converting under the lock makes concurrent compiles wait for one copy
        // instead of making one each.
        let mut reg = shared_consts();
        reg.retain(|e| e.buf.strong_count() > 0);
        let found = reg
            .iter()
            .filter(|e| e.dtype == t.dtype() && Arc::ptr_eq(&e.data, data))
            .find_map(|e| e.buf.upgrade());
        if let Some(buf) = found {
            return Ok(Value {
                shape: t.shape().to_vec(),
                buf,
            });
        }
        let v = Value::from_tensor(t)?;
        reg.push(SharedConst {
            data: data.clone(),
            dtype: t.dtype(),
            buf: Arc::downgrade(&v.buf),
        });
        Ok(v)
    }

    /// Converts an IR tensor (copies its bytes into a typed buffer).
    pub fn from_tensor(t: &Tensor) -> Result<Value> {
        fn read<T: Element + Elem>(t: &Tensor) -> Result<Buf> {
            Ok(T::wrap(t.values::<T>()?))
        }
        let buf = match t.dtype() {
            DType::F32 => read::<f32>(t)?,
            DType::F64 => read::<f64>(t)?,
            DType::F16 => read::<f16>(t)?,
            DType::BF16 => read::<bf16>(t)?,
            DType::I8 => read::<i8>(t)?,
            DType::I16 => read::<i16>(t)?,
            DType::I32 => read::<i32>(t)?,
            DType::I64 => read::<i64>(t)?,
            DType::U8 => read::<u8>(t)?,
            DType::U16 => read::<u16>(t)?,
            DType::U32 => read::<u32>(t)?,
            DType::U64 => read::<u64>(t)?,
            DType::Bool => Buf::Bool(t.bytes().iter().map(|&b| b != 0).collect()),
            DType::String => Buf::Str(t.strings().unwrap_or(&[]).to_vec()),
            d => return Err(Error::msg(format!("{d} tensors cannot be computed on"))),
        };
        Ok(Value {
            shape: t.shape().to_vec(),
            buf: Arc::new(buf),
        })
    }

    /// Converts back to an IR tensor.
    pub fn to_tensor(&self) -> Tensor {
        fn write<T: Element>(shape: &[usize], v: &[T]) -> Tensor {
            Tensor::from_vec(shape.to_vec(), v)
        }
        match &*self.buf {
            Buf::F32(v) => write(&self.shape, v),
            Buf::F64(v) => write(&self.shape, v),
            Buf::F16(v) => write(&self.shape, v),
            Buf::BF16(v) => write(&self.shape, v),
            Buf::I8(v) => write(&self.shape, v),
            Buf::I16(v) => write(&self.shape, v),
            Buf::I32(v) => write(&self.shape, v),
            Buf::I64(v) => write(&self.shape, v),
            Buf::U8(v) => write(&self.shape, v),
            Buf::U16(v) => write(&self.shape, v),
            Buf::U32(v) => write(&self.shape, v),
            Buf::U64(v) => write(&self.shape, v),
            Buf::Bool(v) => write(&self.shape, v),
            Buf::Str(v) => Tensor::from_strings(self.shape.clone(), v.clone())
                .expect("string count matches shape"),
        }
    }
}
