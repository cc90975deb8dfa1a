//! `TensorProto` ↔ [`Tensor`].
//!
//! Reading follows TensorFlow's `Tensor::FromProto` (tensor.cc): a non-empty
//! `tensor_content` holds the row-major little-endian elements and must be exactly
//! `elements × size` long; otherwise the typed field of the dtype is used, where an
//! empty field means zeros, fewer values than elements repeat the last value (the
//! "single-value splat" is the common case), and extra values are ignored.
//!
//! Those last rules let a few bytes describe a huge tensor, so the element count is
//! checked before anything is allocated: a tensor may have at most [`MAX_ELEMENTS`]
//! elements, and one expanded from fewer stored values at most [`MAX_EXPANDED_BYTES`]
//! bytes. Both equal the 2 GiB protobuf limit of the file that holds the tensor in
//! TensorFlow itself, so no tensor TensorFlow can save is refused.
//!
//! Writing puts numeric data in `tensor_content` (one byte copy, exact bits, stable
//! output) and strings in `string_val`.

use std::sync::Arc;

use prost::Message;

use super::proto::{tensor_shape_proto, DataType, TensorProto, TensorShapeProto};
use crate::error::{Error, Result};
use crate::ir::{DType, Tensor, TensorData};

/// Most elements any tensor read from a `TensorProto` may have.
pub const MAX_ELEMENTS: usize = 1 << 31;
/// Most bytes a tensor may take once expanded from fewer stored values (splat or zeros).
pub const MAX_EXPANDED_BYTES: usize = 1 << 31;

/// The dimensions of a fully known shape. Unknown rank or dimensions are an error.
pub fn known_shape(shape: Option<&TensorShapeProto>) -> Result<Vec<usize>> {
    let Some(shape) = shape else {
        return Ok(Vec::new());
    };
    if shape.unknown_rank {
        return Err(Error::msg("shape has unknown rank"));
    }
    shape
        .dim
        .iter()
        .map(|d| {
            usize::try_from(d.size)
                .map_err(|_| Error::msg(format!("shape {} has a negative dimension", show(shape))))
        })
        .collect()
}

/// A shape as TensorFlow prints it: `[2,-1,3]`, `<unknown>`.
pub fn show(shape: &TensorShapeProto) -> String {
    if shape.unknown_rank {
        return "<unknown>".into();
    }
    let dims: Vec<String> = shape.dim.iter().map(|d| d.size.to_string()).collect();
    format!("[{}]", dims.join(","))
}

/// A `TensorShapeProto` of known dimensions.
pub fn shape_proto(dims: &[usize]) -> TensorShapeProto {
    TensorShapeProto {
        dim: dims
            .iter()
            .map(|&d| tensor_shape_proto::Dim {
                size: d as i64,
                name: String::new(),
            })
            .collect(),
        unknown_rank: false,
    }
}

/// Whether the IR can hold a tensor of this proto dtype (numeric, bool or string).
pub fn holds_dtype(dtype: i32) -> bool {
    DataType::try_from(dtype)
        .ok()
        .filter(|d| !d.is_ref())
        .and_then(DataType::to_ir)
        .is_some_and(|d| d.size().is_some() || d == DType::String)
}

/// Decodes a tensor. Errors say what is wrong with the proto; the caller names where it is.
pub fn tensor_from_proto(tp: &TensorProto) -> Result<Tensor> {
    let dtype = DataType::try_from(tp.dtype)
        .ok()
        .filter(|d| !d.is_ref())
        .and_then(DataType::to_ir)
        .filter(|d| d.size().is_some() || *d == DType::String)
        .ok_or_else(|| {
            Error::msg(format!(
                "tensor of {} cannot be held",
                super::proto::dtype_name(tp.dtype)
            ))
        })?;
    let shape = known_shape(tp.tensor_shape.as_ref())?;
    let n = element_count(&shape)?;
    if dtype == DType::String {
        return string_tensor(tp, shape, n);
    }
    let size = dtype.size().unwrap_or(1);
    let bytes: Arc<[u8]> = if !tp.tensor_content.is_empty() {
        // n ≤ 2^31 and size ≤ 8, so this cannot overflow.
        if tp.tensor_content.len() != n * size {
            return Err(Error::msg(format!(
                "{dtype} tensor of shape {shape:?} needs {} bytes of tensor_content, has {}",
                n * size,
                tp.tensor_content.len()
            )));
        }
        Arc::from(&tp.tensor_content[..])
    } else {
        typed_values(tp, dtype, &shape, n, size)?.into()
    };
    Ok(Tensor::from_bytes(dtype, shape, bytes)?)
}

fn element_count(shape: &[usize]) -> Result<usize> {
    if shape.contains(&0) {
        return Ok(0);
    }
    match crate::ir::num_elements(shape) {
        Some(n) if n <= MAX_ELEMENTS => Ok(n),
        _ => Err(Error::msg(format!(
            "shape {shape:?} has more than {MAX_ELEMENTS} elements"
        ))),
    }
}

/// Refuses to expand `stored` values into `n` elements of `elem_bytes` each beyond the limit.
fn check_expansion(stored: usize, n: usize, elem_bytes: usize, shape: &[usize]) -> Result<()> {
    if stored < n && n.saturating_mul(elem_bytes) > MAX_EXPANDED_BYTES {
        return Err(Error::msg(format!(
            "tensor of shape {shape:?} would expand {stored} stored values to more than \
             {MAX_EXPANDED_BYTES} bytes"
        )));
    }
    Ok(())
}

/// TF's `FromProtoField`: element `i` is `src[min(i, len-1)]`, zeros when `src` is empty.
fn expand<S: Copy>(
    src: &[S],
    n: usize,
    size: usize,
    shape: &[usize],
    mut write: impl FnMut(S, &mut Vec<u8>),
) -> Result<Vec<u8>> {
    check_expansion(src.len(), n, size, shape)?;
    if src.is_empty() {
        return Ok(vec![0; n * size]);
    }
    let mut out = Vec::with_capacity(n * size);
    let last = src[src.len() - 1];
    for i in 0..n {
        write(src.get(i).copied().unwrap_or(last), &mut out);
    }
    Ok(out)
}

fn typed_values(
    tp: &TensorProto,
    dtype: DType,
    s: &[usize],
    n: usize,
    size: usize,
) -> Result<Vec<u8>> {
    match dtype {
        DType::F32 => expand(&tp.float_val, n, size, s, |v, o| {
            o.extend_from_slice(&v.to_le_bytes())
        }),
        DType::F64 => expand(&tp.double_val, n, size, s, |v, o| {
            o.extend_from_slice(&v.to_le_bytes())
        }),
        DType::F16 | DType::BF16 => expand(&tp.half_val, n, size, s, |v, o| {
            o.extend_from_slice(&(v as u16).to_le_bytes())
        }),
        DType::I32 => expand(&tp.int_val, n, size, s, |v, o| {
            o.extend_from_slice(&v.to_le_bytes())
        }),
        DType::I16 => expand(&tp.int_val, n, size, s, |v, o| {
            o.extend_from_slice(&(v as i16).to_le_bytes())
        }),
        DType::U16 => expand(&tp.int_val, n, size, s, |v, o| {
            o.extend_from_slice(&(v as u16).to_le_bytes())
        }),
        DType::I8 | DType::U8 => expand(&tp.int_val, n, size, s, |v, o| o.push(v as u8)),
        DType::I64 => expand(&tp.int64_val, n, size, s, |v, o| {
            o.extend_from_slice(&v.to_le_bytes())
        }),
        DType::U32 => expand(&tp.uint32_val, n, size, s, |v, o| {
            o.extend_from_slice(&v.to_le_bytes())
        }),
        DType::U64 => expand(&tp.uint64_val, n, size, s, |v, o| {
            o.extend_from_slice(&v.to_le_bytes())
        }),
        DType::Bool => expand(&tp.bool_val, n, size, s, |v, o| o.push(v as u8)),
        DType::String | DType::Resource | DType::Variant => Err(Error::msg(format!(
            "{dtype} tensors have no numeric values"
        ))),
    }
}

fn string_tensor(tp: &TensorProto, shape: Vec<usize>, n: usize) -> Result<Tensor> {
    let strings = if !tp.tensor_content.is_empty() {
        decode_string_list(&tp.tensor_content, n)?
    } else {
        let src = &tp.string_val;
        let last_len = src.last().map_or(0, Vec::len);
        check_expansion(
            src.len(),
            n,
            std::mem::size_of::<Vec<u8>>() + last_len,
            &shape,
        )?;
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            out.push(src.get(i).or(src.last()).cloned().unwrap_or_default());
        }
        out
    };
    Ok(Tensor::from_strings(shape, strings)?)
}

/// TF's `port::DecodeStringList`: `n` varint32 lengths, then exactly that many bytes.
fn decode_string_list(content: &[u8], n: usize) -> Result<Vec<Vec<u8>>> {
    if n > content.len() {
        return Err(Error::msg(format!(
            "string tensor_content of {} bytes cannot hold {n} lengths",
            content.len()
        )));
    }
    let mut buf = content;
    let mut lens = Vec::with_capacity(n);
    for _ in 0..n {
        let len = prost::encoding::decode_varint(&mut buf)
            .ok()
            .filter(|&l| l <= u32::MAX as u64)
            .ok_or_else(|| Error::msg("string tensor_content has a bad length varint"))?;
        lens.push(len as usize);
    }
    let total = lens.iter().try_fold(0usize, |a, &l| a.checked_add(l));
    if total != Some(buf.len()) {
        return Err(Error::msg(format!(
            "string tensor_content lengths do not add up to its {} data bytes",
            buf.len()
        )));
    }
    let mut out = Vec::with_capacity(n);
    for len in lens {
        let (s, rest) = buf.split_at(len);
        out.push(s.to_vec());
        buf = rest;
    }
    Ok(out)
}

/// Encodes a tensor: numeric data as `tensor_content`, strings as `string_val`.
pub fn tensor_to_proto(t: &Tensor) -> TensorProto {
    let mut tp = TensorProto {
        dtype: DataType::from_ir(t.dtype()) as i32,
        tensor_shape: Some(shape_proto(t.shape())),
        ..TensorProto::default()
    };
    match t.strings() {
        Some(strings) => tp.string_val = strings.to_vec(),
        // Shares the tensor's buffer: encoding the message is the only copy.
        None => {
            if let TensorData::Bytes(b) = t.data() {
                tp.tensor_content = prost::bytes::Bytes::from_owner(b.clone());
            }
        }
    }
    tp
}

/// Decodes a serialized `TensorProto`.
pub fn tensor_from_bytes(bytes: &[u8]) -> Result<Tensor> {
    let tp =
        TensorProto::decode(bytes).map_err(|e| Error::msg(format!("not a TensorProto: {e}")))?;
    tensor_from_proto(&tp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proto(dtype: DataType, dims: &[usize]) -> TensorProto {
        TensorProto {
            dtype: dtype as i32,
            tensor_shape: Some(shape_proto(dims)),
            ..TensorProto::default()
        }
    }

    #[test]
    fn tensor_content_is_taken_as_le_bytes() {
        let mut tp = proto(DataType::DtFloat, &[2]);
        tp.tensor_content = [1.5f32.to_le_bytes(), (-2.0f32).to_le_bytes()]
            .concat()
            .into();
        let t = tensor_from_proto(&tp).unwrap();
        assert_eq!(t.values::<f32>().unwrap(), [1.5, -2.0]);
        tp.tensor_content.truncate(7);
        let e = tensor_from_proto(&tp).unwrap_err().to_string();
        assert!(e.contains("needs 8 bytes of tensor_content, has 7"), "{e}");
    }

    #[test]
    fn one_value_splats_and_empty_field_is_zeros() {
        let mut tp = proto(DataType::DtFloat, &[2, 3]);
        tp.float_val = vec![0.25];
        assert_eq!(
            tensor_from_proto(&tp).unwrap().values::<f32>().unwrap(),
            [0.25; 6]
        );
        tp.float_val.clear();
        assert_eq!(
            tensor_from_proto(&tp).unwrap().values::<f32>().unwrap(),
            [0.0; 6]
        );
        // Fewer values than elements: the last one fills the rest (TF's FromProtoField).
        tp.float_val = vec![1.0, 2.0];
        assert_eq!(
            tensor_from_proto(&tp).unwrap().values::<f32>().unwrap(),
            [1.0, 2.0, 2.0, 2.0, 2.0, 2.0]
        );
    }

    #[test]
    fn half_val_holds_f16_and_bf16_bits() {
        let mut tp = proto(DataType::DtHalf, &[2]);
        tp.half_val = vec![
            half::f16::from_f32(1.5).to_bits() as i32,
            half::f16::from_f32(-65504.0).to_bits() as i32,
        ];
        let t = tensor_from_proto(&tp).unwrap();
        assert_eq!(t.dtype(), DType::F16);
        assert_eq!(t.to_f32_vec().unwrap(), [1.5, -65504.0]);

        let mut tp = proto(DataType::DtBfloat16, &[3]);
        tp.half_val = vec![half::bf16::from_f32(-3.0).to_bits() as i32];
        let t = tensor_from_proto(&tp).unwrap();
        assert_eq!(t.dtype(), DType::BF16);
        assert_eq!(t.to_f32_vec().unwrap(), [-3.0; 3]);
    }

    #[test]
    fn int_val_holds_small_integer_types() {
        let cases: [(DataType, DType, Vec<i32>, Vec<i64>); 5] = [
            (
                DataType::DtInt8,
                DType::I8,
                vec![-128, 127],
                vec![-128, 127],
            ),
            (DataType::DtUint8, DType::U8, vec![0, 255], vec![0, 255]),
            (
                DataType::DtInt16,
                DType::I16,
                vec![-32768, 7],
                vec![-32768, 7],
            ),
            (
                DataType::DtUint16,
                DType::U16,
                vec![65535, 1],
                vec![65535, 1],
            ),
            (
                DataType::DtInt32,
                DType::I32,
                vec![i32::MIN, 3],
                vec![i32::MIN as i64, 3],
            ),
        ];
        for (tf, ir, vals, want) in cases {
            let mut tp = proto(tf, &[2]);
            tp.int_val = vals;
            let t = tensor_from_proto(&tp).unwrap();
            assert_eq!(t.dtype(), ir);
            assert_eq!(t.to_i64_vec().unwrap(), want, "{ir}");
        }
    }

    #[test]
    fn wide_and_unsigned_fields() {
        let mut tp = proto(DataType::DtInt64, &[2]);
        tp.int64_val = vec![i64::MIN, i64::MAX];
        assert_eq!(
            tensor_from_proto(&tp).unwrap().values::<i64>().unwrap(),
            [i64::MIN, i64::MAX]
        );
        let mut tp = proto(DataType::DtUint32, &[2]);
        tp.uint32_val = vec![u32::MAX];
        assert_eq!(
            tensor_from_proto(&tp).unwrap().values::<u32>().unwrap(),
            [u32::MAX; 2]
        );
        let mut tp = proto(DataType::DtUint64, &[1]);
        tp.uint64_val = vec![u64::MAX];
        assert_eq!(
            tensor_from_proto(&tp).unwrap().values::<u64>().unwrap(),
            [u64::MAX]
        );
        let mut tp = proto(DataType::DtDouble, &[]);
        tp.double_val = vec![0.1];
        assert_eq!(
            tensor_from_proto(&tp).unwrap().values::<f64>().unwrap(),
            [0.1]
        );
        let mut tp = proto(DataType::DtBool, &[3]);
        tp.bool_val = vec![true, false];
        assert_eq!(
            tensor_from_proto(&tp).unwrap().values::<bool>().unwrap(),
            [true, false, false]
        );
    }

    #[test]
    fn strings_from_string_val_and_tensor_content() {
        let mut tp = proto(DataType::DtString, &[3]);
        tp.string_val = vec![b"a".to_vec(), b"\0\xff".to_vec(), Vec::new()];
        let t = tensor_from_proto(&tp).unwrap();
        assert_eq!(
            t.strings().unwrap(),
            [b"a".to_vec(), b"\0\xff".to_vec(), Vec::new()]
        );
        tp.string_val = vec![b"xy".to_vec()];
        let t = tensor_from_proto(&tp).unwrap();
        assert_eq!(
            t.strings().unwrap(),
            [b"xy".to_vec(), b"xy".to_vec(), b"xy".to_vec()]
        );

        let mut tp = proto(DataType::DtString, &[2]);
        tp.tensor_content = vec![1, 3, b'a', b'b', b'c', b'd'].into();
        let t = tensor_from_proto(&tp).unwrap();
        assert_eq!(t.strings().unwrap(), [b"a".to_vec(), b"bcd".to_vec()]);
        tp.tensor_content = vec![1, 3, b'a', b'b', b'c', b'd', 0].into();
        assert!(tensor_from_proto(&tp).is_err());
    }

    #[test]
    fn huge_splat_is_refused_before_allocating() {
        let mut tp = proto(DataType::DtFloat, &[1 << 20, 1 << 20]);
        tp.float_val = vec![1.0];
        let e = tensor_from_proto(&tp).unwrap_err().to_string();
        assert!(e.contains("more than 2147483648 elements"), "{e}");
        let mut tp = proto(DataType::DtDouble, &[1 << 29]);
        tp.double_val = vec![1.0];
        let e = tensor_from_proto(&tp).unwrap_err().to_string();
        assert!(e.contains("would expand 1 stored values"), "{e}");
        let mut tp = proto(DataType::DtString, &[1 << 30]);
        tp.string_val = vec![b"x".to_vec()];
        assert!(tensor_from_proto(&tp).is_err());
        // A zero dimension makes any other dimension harmless.
        let tp = proto(DataType::DtFloat, &[0, 1 << 40]);
        assert!(tensor_from_proto(&tp).unwrap().is_empty());
    }

    #[test]
    fn bad_dtypes_and_shapes_are_errors() {
        let tp = proto(DataType::DtComplex64, &[1]);
        assert!(tensor_from_proto(&tp)
            .unwrap_err()
            .to_string()
            .contains("DT_COMPLEX64"));
        let tp = proto(DataType::DtFloatRef, &[1]);
        assert!(tensor_from_proto(&tp).is_err());
        let tp = TensorProto {
            dtype: 77,
            ..TensorProto::default()
        };
        assert!(tensor_from_proto(&tp)
            .unwrap_err()
            .to_string()
            .contains("dtype 77"));
        let mut tp = proto(DataType::DtFloat, &[1]);
        tp.tensor_shape.as_mut().unwrap().dim[0].size = -1;
        assert!(tensor_from_proto(&tp).is_err());
    }

    #[test]
    fn every_ir_dtype_round_trips_through_tensor_content() {
        for dtype in DType::ALL {
            let Some(size) = dtype.size() else { continue };
            let bytes: Vec<u8> = (0..3 * size).map(|i| (i * 37 % 251) as u8).collect();
            let t = Tensor::from_bytes(dtype, vec![3], bytes).unwrap();
            let back = tensor_from_proto(&tensor_to_proto(&t)).unwrap();
            assert_eq!(back, t, "{dtype}");
        }
        let t = Tensor::from_strings(vec![2], vec![b"q".to_vec(), vec![0xff]]).unwrap();
        let tp = tensor_to_proto(&t);
        assert_eq!(tensor_from_bytes(&tp.encode_to_vec()).unwrap(), t);
    }
}
