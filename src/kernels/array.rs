//! Shape and data-movement kernels for every dtype: reshape, gather, slicing,
//! concatenation, padding, transposition, reductions.

use super::value::{dispatch_any, Elem, Value};
use crate::error::{Error, Result};
use crate::ir::{num_elements, DType, Tensor};

/// Resolves a possibly negative axis against `rank` (`rank` itself allowed when `extra`).
pub fn norm_axis(axis: i64, rank: usize, extra: bool) -> Result<usize> {
    let r = rank as i64 + extra as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r.max(if extra { 1 } else { 0 }) {
        return Err(Error::msg(format!(
            "axis {axis} is out of range for rank {rank}"
        )));
    }
    Ok(a as usize)
}

fn scalar_i64(v: &Value, what: &str) -> Result<i64> {
    let s = v.to_i64s()?;
    if s.len() != 1 {
        return Err(Error::msg(format!(
            "{what} must be a scalar, got shape {:?}",
            v.shape
        )));
    }
    Ok(s[0])
}

/// `Reshape` with at most one -1 dimension.
pub fn reshape(x: &Value, target: &Value) -> Result<Value> {
    let dims = target.to_i64s()?;
    let mut shape = Vec::with_capacity(dims.len());
    let mut infer = None;
    let mut known = 1usize;
    for (i, &d) in dims.iter().enumerate() {
        if d == -1 {
            if infer.replace(i).is_some() {
                return Err(Error::msg(format!(
                    "reshape target {dims:?} has more than one -1"
                )));
            }
            shape.push(1);
        } else if d < 0 {
            return Err(Error::msg(format!(
                "reshape target {dims:?} has a negative size"
            )));
        } else {
            shape.push(d as usize);
            known = known
                .checked_mul(d as usize)
                .ok_or_else(|| Error::msg(format!("reshape target {dims:?} is too large")))?;
        }
    }
    if let Some(i) = infer {
        if known == 0 || !x.len().is_multiple_of(known) {
            return Err(Error::msg(format!(
                "cannot reshape {:?} ({} elements) to {dims:?}",
                x.shape,
                x.len()
            )));
        }
        shape[i] = x.len() / known;
    }
    x.reshaped(shape)
}

pub fn expand_dims(x: &Value, axis: &Value) -> Result<Value> {
    let a = norm_axis(scalar_i64(axis, "ExpandDims axis")?, x.rank(), true)?;
    let mut shape = x.shape.clone();
    shape.insert(a, 1);
    x.reshaped(shape)
}

pub fn squeeze(x: &Value, dims: &[i64]) -> Result<Value> {
    let mut drop = vec![false; x.rank()];
    if dims.is_empty() {
        for (i, &d) in x.shape.iter().enumerate() {
            drop[i] = d == 1;
        }
    } else {
        for &d in dims {
            let a = norm_axis(d, x.rank(), false)?;
            if x.shape[a] != 1 {
                return Err(Error::msg(format!(
                    "cannot squeeze dimension {d} of shape {:?}: it is not 1",
                    x.shape
                )));
            }
            drop[a] = true;
        }
    }
    let shape = x
        .shape
        .iter()
        .zip(&drop)
        .filter(|(_, &d)| !d)
        .map(|(&s, _)| s)
        .collect();
    x.reshaped(shape)
}

/// A vector of sizes as int32 or int64.
pub fn int_vector(values: &[usize], dtype: DType) -> Result<Value> {
    Ok(match dtype {
        DType::I32 => Value::from_vec(
            vec![values.len()],
            values
                .iter()
                .map(|&v| i32::try_from(v).map_err(|_| Error::msg(format!("{v} overflows int32"))))
                .collect::<Result<Vec<_>>>()?,
        ),
        DType::I64 => Value::from_vec(
            vec![values.len()],
            values.iter().map(|&v| v as i64).collect(),
        ),
        d => {
            return Err(Error::msg(format!(
                "shape output type must be int32 or int64, not {d}"
            )))
        }
    })
}

/// `GatherV2` with `batch_dims = 0`.
pub fn gather(params: &Value, indices: &Value, axis: i64) -> Result<Value> {
    let a = norm_axis(axis, params.rank(), false)?;
    let idx = indices.to_i64s()?;
    let dim = params.shape[a];
    let outer: usize = params.shape[..a].iter().product();
    let inner: usize = params.shape[a + 1..].iter().product();
    for (i, &v) in idx.iter().enumerate() {
        if v < 0 || v as usize >= dim {
            return Err(Error::msg(format!(
                "index {v} (position {i}) is not in [0, {dim})"
            )));
        }
    }
    let mut shape = params.shape[..a].to_vec();
    shape.extend_from_slice(&indices.shape);
    shape.extend_from_slice(&params.shape[a + 1..]);
    super::value::checked_len(&shape)?;
    fn go<T: Elem>(p: &[T], idx: &[i64], outer: usize, dim: usize, inner: usize) -> Vec<T> {
        let mut out = Vec::with_capacity(outer * idx.len() * inner);
        for o in 0..outer {
            for &i in idx {
                let s = (o * dim + i as usize) * inner;
                out.extend_from_slice(&p[s..s + inner]);
            }
        }
        out
    }
    dispatch_any!(params.dtype(), T => {
        let v = go::<T>(params.slice::<T>()?, &idx, outer, dim, inner);
        Ok(Value::from_vec(shape, v))
    })
}

/// [`gather`] from a constant IR tensor: only the gathered rows are converted.
pub fn gather_table(table: &Tensor, indices: &Value, axis: i64) -> Result<Value> {
    let shape = table.shape();
    let a = norm_axis(axis, shape.len(), false)?;
    let size = table
        .dtype()
        .size()
        .ok_or_else(|| Error::msg(format!("cannot gather from a {} table", table.dtype())))?;
    let idx = indices.to_i64s()?;
    let dim = shape[a];
    let outer: usize = shape[..a].iter().product();
    let inner: usize = shape[a + 1..].iter().product::<usize>() * size;
    for (i, &v) in idx.iter().enumerate() {
        if v < 0 || v as usize >= dim {
            return Err(Error::msg(format!(
                "index {v} (position {i}) is not in [0, {dim})"
            )));
        }
    }
    let mut out_shape = shape[..a].to_vec();
    out_shape.extend_from_slice(&indices.shape);
    out_shape.extend_from_slice(&shape[a + 1..]);
    super::value::checked_len(&out_shape)?;
    let bytes = table.bytes();
    let mut out = Vec::with_capacity(outer * idx.len() * inner);
    for o in 0..outer {
        for &i in &idx {
            let s = (o * dim + i as usize) * inner;
            out.extend_from_slice(&bytes[s..s + inner]);
        }
    }
    let rows =
        Tensor::from_bytes(table.dtype(), out_shape, out).map_err(|e| Error::msg(e.to_string()))?;
    Value::from_tensor(&rows)
}

/// Gathers along every dimension: `out[i0..] = x[begin[d] + i_d * stride[d]]`.
fn strided_copy(x: &Value, begin: &[i64], strides: &[i64], sizes: &[usize]) -> Result<Value> {
    let r = x.rank();
    let mut in_strides = vec![1i64; r];
    for d in (0..r.saturating_sub(1)).rev() {
        in_strides[d] = in_strides[d + 1] * x.shape[d + 1] as i64;
    }
    let total = num_elements(sizes).unwrap_or(0);
    let mut offsets = Vec::with_capacity(total);
    let mut idx = vec![0usize; r];
    for _ in 0..total {
        let off: i64 = (0..r)
            .map(|d| (begin[d] + idx[d] as i64 * strides[d]) * in_strides[d])
            .sum();
        offsets.push(off as usize);
        for d in (0..r).rev() {
            idx[d] += 1;
            if idx[d] < sizes[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    dispatch_any!(x.dtype(), T => pick::<T>(x, &offsets, sizes.to_vec()))
}

/// The elements of `x` at `offsets`, as a tensor of `shape`.
fn pick<T: Elem>(x: &Value, offsets: &[usize], shape: Vec<usize>) -> Result<Value> {
    let s = x.slice::<T>()?;
    Ok(Value::from_vec(
        shape,
        offsets.iter().map(|&o| s[o].clone()).collect(),
    ))
}

/// TensorFlow `StridedSlice` masks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SliceMasks {
    pub begin: i64,
    pub end: i64,
    pub ellipsis: i64,
    pub new_axis: i64,
    pub shrink_axis: i64,
}

/// The dense form of a strided slice.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseSlice {
    /// Per input dimension: first index, stride, number of elements taken.
    pub begin: Vec<i64>,
    pub strides: Vec<i64>,
    pub sizes: Vec<usize>,
    /// The output shape (shrunk axes removed, new axes added).
    pub final_shape: Vec<usize>,
}

/// Resolves a strided slice against an input shape, as TensorFlow's `ValidateStridedSliceOp` does.
pub fn strided_slice_spec(
    shape: &[usize],
    begin: &[i64],
    end: &[i64],
    strides: &[i64],
    m: SliceMasks,
) -> Result<DenseSlice> {
    let n = begin.len();
    if end.len() != n || strides.len() != n {
        return Err(Error::msg(
            "StridedSlice begin, end and strides differ in length",
        ));
    }
    if n > 62 {
        return Err(Error::msg("StridedSlice spec is too long"));
    }
    if m.ellipsis & m.ellipsis.wrapping_sub(1) != 0 && m.ellipsis != 0 {
        return Err(Error::msg("StridedSlice has more than one ellipsis"));
    }
    let bit = |mask: i64, i: usize| (mask >> i) & 1 == 1;
    let (mut sparse_n, mut ellipsis) = (n, m.ellipsis);
    if ellipsis == 0 {
        ellipsis = 1 << n;
        sparse_n += 1;
    }
    let e_pos = ellipsis.trailing_zeros() as usize;
    let new_after = (e_pos + 1..n).filter(|&i| bit(m.new_axis, i)).count();
    let dims = shape.len();
    let (mut db, mut de, mut ds) = (vec![0i64; dims], vec![0i64; dims], vec![1i64; dims]);
    let (mut bm, mut em, mut sm) = (vec![false; dims], vec![false; dims], vec![false; dims]);
    enum G {
        Dim(usize),
        New,
        Shrink,
    }
    let mut gather = Vec::new();
    let mut full = 0usize;
    for i in 0..sparse_n {
        if bit(ellipsis, i) {
            let next = (dims as i64 - (sparse_n as i64 - i as i64) + 1 + new_after as i64)
                .clamp(0, dims as i64) as usize;
            while full < next {
                bm[full] = true;
                em[full] = true;
                gather.push(G::Dim(full));
                full += 1;
            }
        } else if bit(m.new_axis, i) {
            gather.push(G::New);
        } else {
            if full >= dims {
                return Err(Error::msg(format!(
                    "StridedSlice index {full} is out of range for a rank-{dims} input"
                )));
            }
            db[full] = begin[i];
            de[full] = end[i];
            ds[full] = strides[i];
            bm[full] = bit(m.begin, i);
            em[full] = bit(m.end, i);
            if bit(m.shrink_axis, i) {
                sm[full] = true;
                gather.push(G::Shrink);
            } else {
                gather.push(G::Dim(full));
            }
            full += 1;
        }
    }
    let mut sizes = vec![0usize; dims];
    for d in 0..dims {
        let s = ds[d];
        if s == 0 {
            return Err(Error::msg("StridedSlice stride is 0"));
        }
        let dim = shape[d] as i64;
        let valid = if s > 0 { [0, dim] } else { [-1, dim - 1] };
        let masks = [bm[d], em[d]];
        let canonical = |x: i64, c: usize| -> i64 {
            if masks[c] {
                if s > 0 {
                    valid[c]
                } else {
                    valid[(c + 1) & 1]
                }
            } else {
                let f = if x < 0 { dim + x } else { x };
                f.clamp(valid[0], valid[1])
            }
        };
        if sm[d] {
            if s <= 0 {
                return Err(Error::msg(
                    "StridedSlice shrink axis needs a positive stride",
                ));
            }
            let f = if db[d] < 0 { dim + db[d] } else { db[d] };
            if f < 0 || f >= dim {
                return Err(Error::msg(format!(
                    "StridedSlice index {} is out of bounds for dimension {d} of size {dim}",
                    db[d]
                )));
            }
            db[d] = f;
            de[d] = f + 1;
            sizes[d] = 1;
        } else {
            db[d] = canonical(db[d], 0);
            de[d] = canonical(de[d], 1);
            let len = de[d] - db[d];
            sizes[d] = if len == 0 || ((len < 0) != (s < 0)) {
                0
            } else {
                (len / s + i64::from(len % s != 0)) as usize
            };
        }
    }
    let final_shape = gather
        .iter()
        .filter_map(|g| match g {
            G::Dim(d) => Some(sizes[*d]),
            G::New => Some(1),
            G::Shrink => None,
        })
        .collect();
    Ok(DenseSlice {
        begin: db,
        strides: ds,
        sizes,
        final_shape,
    })
}

pub fn strided_slice(
    x: &Value,
    begin: &Value,
    end: &Value,
    strides: &Value,
    m: SliceMasks,
) -> Result<Value> {
    let d = strided_slice_spec(
        &x.shape,
        &begin.to_i64s()?,
        &end.to_i64s()?,
        &strides.to_i64s()?,
        m,
    )?;
    strided_copy(x, &d.begin, &d.strides, &d.sizes)?.reshaped(d.final_shape)
}

/// `Slice(x, begin, size)` with size -1 meaning "to the end".
pub fn slice(x: &Value, begin: &Value, size: &Value) -> Result<Value> {
    let (b, sz) = (begin.to_i64s()?, size.to_i64s()?);
    if b.len() != x.rank() || sz.len() != x.rank() {
        return Err(Error::msg("Slice begin/size do not match the input rank"));
    }
    let mut sizes = Vec::with_capacity(x.rank());
    for d in 0..x.rank() {
        let dim = x.shape[d] as i64;
        let s = if sz[d] == -1 { dim - b[d] } else { sz[d] };
        if b[d] < 0 || s < 0 || b[d] + s > dim {
            return Err(Error::msg(format!(
                "Slice [{}, +{}) is out of bounds for dimension {d} of size {dim}",
                b[d], sz[d]
            )));
        }
        sizes.push(s as usize);
    }
    strided_copy(x, &b, &vec![1; x.rank()], &sizes)
}

/// `ConcatV2` along `axis`.
pub fn concat(parts: &[Value], axis: i64) -> Result<Value> {
    let first = parts
        .first()
        .ok_or_else(|| Error::msg("concatenation of no tensors"))?;
    let a = norm_axis(axis, first.rank(), false)?;
    let mut out_shape = first.shape.clone();
    out_shape[a] = 0;
    for p in parts {
        if p.dtype() != first.dtype() || p.rank() != first.rank() {
            return Err(Error::msg(format!(
                "cannot concatenate {} {:?} with {} {:?}",
                first.dtype(),
                first.shape,
                p.dtype(),
                p.shape
            )));
        }
        for d in 0..p.rank() {
            if d != a && p.shape[d] != first.shape[d] {
                return Err(Error::msg(format!(
                    "cannot concatenate shapes {:?} and {:?} along axis {a}",
                    first.shape, p.shape
                )));
            }
        }
        out_shape[a] += p.shape[a];
    }
    let outer: usize = first.shape[..a].iter().product();
    dispatch_any!(first.dtype(), T => {
        let slices = parts.iter().map(|p| p.slice::<T>()).collect::<Result<Vec<_>>>()?;
        let chunk: Vec<usize> = parts.iter().map(|p| p.shape[a..].iter().product()).collect();
        let mut out = Vec::with_capacity(num_elements(&out_shape).unwrap_or(0));
        for o in 0..outer {
            for (s, &c) in slices.iter().zip(&chunk) {
                out.extend_from_slice(&s[o * c..(o + 1) * c]);
            }
        }
        Ok(Value::from_vec(out_shape, out))
    })
}

/// `Pack` (stack) along a new axis.
pub fn pack(parts: &[Value], axis: i64) -> Result<Value> {
    let first = parts
        .first()
        .ok_or_else(|| Error::msg("Pack of no tensors"))?;
    let a = norm_axis(axis, first.rank(), true)?;
    let mut shape = first.shape.clone();
    shape.insert(a, 1);
    let expanded = parts
        .iter()
        .map(|p| {
            if p.shape != first.shape {
                return Err(Error::msg(format!(
                    "Pack of shapes {:?} and {:?}",
                    first.shape, p.shape
                )));
            }
            p.reshaped(shape.clone())
        })
        .collect::<Result<Vec<_>>>()?;
    concat(&expanded, a as i64)
}

/// `Unpack` (unstack) along `axis`.
pub fn unpack(x: &Value, axis: i64) -> Result<Vec<Value>> {
    let a = norm_axis(axis, x.rank(), false)?;
    let mut out_shape = x.shape.clone();
    out_shape.remove(a);
    let mut sizes = x.shape.clone();
    sizes[a] = 1;
    (0..x.shape[a])
        .map(|i| {
            let mut b = vec![0i64; x.rank()];
            b[a] = i as i64;
            strided_copy(x, &b, &vec![1; x.rank()], &sizes)?.reshaped(out_shape.clone())
        })
        .collect()
}

/// `Pad`/`PadV2` with a constant, or `MirrorPad` (`reflect`: REFLECT vs SYMMETRIC).
pub fn pad(
    x: &Value,
    paddings: &Value,
    constant: Option<&Value>,
    mirror: Option<bool>,
) -> Result<Value> {
    let p = paddings.to_i64s()?;
    let r = x.rank();
    if paddings.shape != [r, 2] {
        return Err(Error::msg(format!(
            "paddings must have shape [{r}, 2], got {:?}",
            paddings.shape
        )));
    }
    let mut shape = Vec::with_capacity(r);
    for d in 0..r {
        let (b, a) = (p[2 * d], p[2 * d + 1]);
        if b < 0 || a < 0 {
            return Err(Error::msg(format!("negative padding {p:?}")));
        }
        if let Some(reflect) = mirror {
            let lim = x.shape[d] as i64 - i64::from(reflect);
            if b > lim || a > lim {
                return Err(Error::msg(format!(
                    "mirror padding {p:?} is too large for shape {:?}",
                    x.shape
                )));
            }
        }
        let grown = usize::try_from(b)
            .ok()
            .zip(usize::try_from(a).ok())
            .and_then(|(b, a)| x.shape[d].checked_add(b)?.checked_add(a))
            .ok_or_else(|| Error::msg(format!("padding {p:?} is too large")))?;
        shape.push(grown);
    }
    super::value::checked_len(&shape)?;
    if mirror.is_none() && r > 0 {
        return dispatch_any!(x.dtype(), T => super::pad_rows::pad_constant::<T>(x, &p, constant, shape));
    }
    let total = num_elements(&shape).unwrap_or(0);
    let mut src = Vec::with_capacity(total);
    let mut idx = vec![0usize; r];
    let mut in_strides = vec![1usize; r];
    for d in (0..r.saturating_sub(1)).rev() {
        in_strides[d] = in_strides[d + 1] * x.shape[d + 1];
    }
    for _ in 0..total {
        let mut off = Some(0usize);
        for d in 0..r {
            let i = idx[d] as i64 - p[2 * d];
            let n = x.shape[d] as i64;
            let j = if (0..n).contains(&i) {
                Some(i)
            } else {
                match mirror {
                    None => None,
                    Some(true) => Some(if i < 0 { -i } else { 2 * (n - 1) - i }),
                    Some(false) => Some(if i < 0 { -i - 1 } else { 2 * n - 1 - i }),
                }
            };
            off = match (off, j) {
                (Some(o), Some(j)) => Some(o + j as usize * in_strides[d]),
                _ => None,
            };
        }
        src.push(off);
        for d in (0..r).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    dispatch_any!(x.dtype(), T => pad_values::<T>(x, &src, constant, shape))
}

fn pad_values<T: Elem>(
    x: &Value,
    src: &[Option<usize>],
    constant: Option<&Value>,
    shape: Vec<usize>,
) -> Result<Value> {
    let s = x.slice::<T>()?;
    let fill = match constant {
        Some(c) => c
            .slice::<T>()?
            .first()
            .cloned()
            .ok_or_else(|| Error::msg("empty pad value"))?,
        None => T::zero(),
    };
    let out = src
        .iter()
        .map(|o| match o {
            Some(o) => s[*o].clone(),
            None => fill.clone(),
        })
        .collect();
    Ok(Value::from_vec(shape, out))
}

/// `Transpose` by a permutation.
pub fn transpose(x: &Value, perm: &Value) -> Result<Value> {
    let p = perm.to_i64s()?;
    let r = x.rank();
    let mut seen = vec![false; r];
    if p.len() != r
        || p.iter()
            .any(|&d| d < 0 || d as usize >= r || std::mem::replace(&mut seen[d as usize], true))
    {
        return Err(Error::msg(format!(
            "{p:?} is not a permutation of {r} dimensions"
        )));
    }
    let mut in_strides = vec![1i64; r];
    for d in (0..r.saturating_sub(1)).rev() {
        in_strides[d] = in_strides[d + 1] * x.shape[d + 1] as i64;
    }
    let sizes: Vec<usize> = p.iter().map(|&d| x.shape[d as usize]).collect();
    let strides: Vec<i64> = p.iter().map(|&d| in_strides[d as usize]).collect();
    let total = x.len();
    let mut offsets = Vec::with_capacity(total);
    let mut idx = vec![0usize; r];
    for _ in 0..total {
        offsets.push(
            idx.iter()
                .zip(&strides)
                .map(|(&i, &s)| i as i64 * s)
                .sum::<i64>() as usize,
        );
        for d in (0..r).rev() {
            idx[d] += 1;
            if idx[d] < sizes[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    dispatch_any!(x.dtype(), T => pick::<T>(x, &offsets, sizes))
}

/// `Tile` by per-dimension multiples.
pub fn tile(x: &Value, multiples: &Value) -> Result<Value> {
    let m = multiples.to_i64s()?;
    if m.len() != x.rank() || m.iter().any(|&v| v < 0) {
        return Err(Error::msg(format!(
            "Tile multiples {m:?} do not fit shape {:?}",
            x.shape
        )));
    }
    let tiled: Vec<usize> = x
        .shape
        .iter()
        .zip(&m)
        .map(|(&d, &k)| d.saturating_mul(k as usize))
        .collect();
    super::value::checked_len(&tiled)?;
    let mut out = x.clone();
    for (d, &k) in m.iter().enumerate() {
        if k != 1 {
            let parts = vec![out.clone(); k as usize];
            out = if k == 0 {
                let mut shape = out.shape.clone();
                shape[d] = 0;
                dispatch_any!(x.dtype(), T => Value::from_vec(shape, Vec::<T>::new()))
            } else {
                concat(&parts, d as i64)?
            };
        }
    }
    Ok(out)
}

/// `Fill(dims, value)`.
pub fn fill(dims: &Value, value: &Value) -> Result<Value> {
    let d = dims.to_i64s()?;
    if d.iter().any(|&v| v < 0) || value.len() != 1 {
        return Err(Error::msg(
            "Fill needs non-negative dims and a scalar value",
        ));
    }
    let shape: Vec<usize> = d.iter().map(|&v| v as usize).collect();
    let n = num_elements(&shape).ok_or_else(|| Error::msg("Fill shape is too large"))?;
    if n > 1 << 31 {
        return Err(Error::msg(format!("Fill of {n} elements is too large")));
    }
    dispatch_any!(value.dtype(), T => fill_values::<T>(value, shape, n))
}

fn fill_values<T: Elem>(value: &Value, shape: Vec<usize>, n: usize) -> Result<Value> {
    let v = value.slice::<T>()?[0].clone();
    Ok(Value::from_vec(shape, vec![v; n]))
}

/// `Range(start, limit, delta)` for int32/int64/float32.
pub fn range(start: &Value, limit: &Value, delta: &Value) -> Result<Value> {
    let (s, l, d) = (start.to_f64s()?, limit.to_f64s()?, delta.to_f64s()?);
    if s.len() != 1 || l.len() != 1 || d.len() != 1 || d[0] == 0.0 {
        return Err(Error::msg(
            "Range needs scalar start, limit and a non-zero delta",
        ));
    }
    let n = ((l[0] - s[0]) / d[0]).ceil().max(0.0) as usize;
    if n > 1 << 31 {
        return Err(Error::msg("Range is too large"));
    }
    let v: Vec<f64> = (0..n).map(|i| s[0] + i as f64 * d[0]).collect();
    let f = Value::from_vec(vec![n], v);
    super::elementwise::cast(&f, start.dtype())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
    Min,
    Prod,
    Any,
    All,
}

/// Reduces `x` over `axes` (negative allowed, duplicates ignored).
pub fn reduce(x: &Value, axes: &Value, op: ReduceOp, keep_dims: bool) -> Result<Value> {
    let r = x.rank();
    let mut red = vec![false; r];
    for a in axes.to_i64s()? {
        red[norm_axis(a, r, false)?] = true;
    }
    let out_full: Vec<usize> = (0..r)
        .map(|d| if red[d] { 1 } else { x.shape[d] })
        .collect();
    let out_shape: Vec<usize> = if keep_dims {
        out_full.clone()
    } else {
        (0..r).filter(|&d| !red[d]).map(|d| x.shape[d]).collect()
    };
    let n_out = num_elements(&out_full).unwrap_or(0);
    let count = x.len().checked_div(n_out).unwrap_or(0);
    // Reduced axes forming one contiguous block: [outer, reduced, inner] loops.
    let first = red.iter().position(|&b| b);
    let last = red.iter().rposition(|&b| b);
    if let (Some(f), Some(l), DType::F32) = (first, last, x.dtype()) {
        if red[f..=l].iter().all(|&b| b)
            && matches!(
                op,
                ReduceOp::Sum | ReduceOp::Mean | ReduceOp::Max | ReduceOp::Min
            )
        {
            let outer: usize = x.shape[..f].iter().product();
            let rn: usize = x.shape[f..=l].iter().product();
            let inner: usize = x.shape[l + 1..].iter().product();
            let xs = x.slice::<f32>()?;
            let init = match op {
                ReduceOp::Max => f32::NEG_INFINITY,
                ReduceOp::Min => f32::INFINITY,
                _ => 0.0,
            };
            let mut acc = vec![init; outer * inner];
            if inner > 0 && rn > 0 {
                let fold = match op {
                    ReduceOp::Max => super::float_rows::RowFold::Max,
                    ReduceOp::Min => super::float_rows::RowFold::Min,
                    _ => super::float_rows::RowFold::Sum,
                };
                super::float_rows::fold_middle(xs, rn, inner, fold, &mut acc);
            }
            if op == ReduceOp::Mean {
                let n = count as f32;
                acc.iter_mut().for_each(|a| *a /= n);
            }
            return Ok(Value::from_vec(out_shape, acc));
        }
    }
    let mut out_strides = vec![0usize; r];
    let mut s = 1;
    for d in (0..r).rev() {
        out_strides[d] = if red[d] { 0 } else { s };
        s *= out_full[d];
    }
    let mut map = Vec::with_capacity(x.len());
    let mut idx = vec![0usize; r];
    for _ in 0..x.len() {
        map.push(
            idx.iter()
                .zip(&out_strides)
                .map(|(i, s)| i * s)
                .sum::<usize>(),
        );
        for d in (0..r).rev() {
            idx[d] += 1;
            if idx[d] < x.shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    macro_rules! fold {
        ($t:ty, $init:expr, $f:expr, $fin:expr) => {{
            let xs = x.slice::<$t>()?;
            let mut acc: Vec<$t> = vec![$init; n_out];
            for (i, &v) in xs.iter().enumerate() {
                let a = &mut acc[map[i]];
                *a = $f(*a, v);
            }
            let fin = $fin;
            let acc: Vec<$t> = acc.into_iter().map(|a| fin(a)).collect();
            Value::from_vec(out_shape, acc)
        }};
    }
    macro_rules! numeric {
        ($t:ty, $min:expr, $max:expr, $div:expr) => {
            match op {
                ReduceOp::Sum => fold!($t, 0 as $t, |a: $t, v: $t| a + v, |a: $t| a),
                ReduceOp::Mean => fold!($t, 0 as $t, |a: $t, v: $t| a + v, |a: $t| $div(a, count)),
                ReduceOp::Prod => fold!($t, 1 as $t, |a: $t, v: $t| a * v, |a: $t| a),
                ReduceOp::Max => fold!(
                    $t,
                    $min,
                    |a: $t, v: $t| if v > a { v } else { a },
                    |a: $t| a
                ),
                ReduceOp::Min => fold!(
                    $t,
                    $max,
                    |a: $t, v: $t| if v < a { v } else { a },
                    |a: $t| a
                ),
                ReduceOp::Any | ReduceOp::All => {
                    return Err(Error::msg(format!(
                        "{op:?} needs bool input, got {}",
                        x.dtype()
                    )))
                }
            }
        };
    }
    Ok(match x.dtype() {
        DType::F32 => numeric!(f32, f32::NEG_INFINITY, f32::INFINITY, |a: f32, n: usize| a
            / n as f32),
        DType::F64 => numeric!(f64, f64::NEG_INFINITY, f64::INFINITY, |a: f64, n: usize| a
            / n as f64),
        DType::I32 => numeric!(i32, i32::MIN, i32::MAX, |a: i32, n: usize| if n == 0 {
            0
        } else {
            a / n as i32
        }),
        DType::I64 => numeric!(i64, i64::MIN, i64::MAX, |a: i64, n: usize| if n == 0 {
            0
        } else {
            a / n as i64
        }),
        DType::Bool => match op {
            ReduceOp::Any => fold!(bool, false, |a: bool, v: bool| a || v, |a: bool| a),
            ReduceOp::All => fold!(bool, true, |a: bool, v: bool| a && v, |a: bool| a),
            _ => return Err(Error::msg(format!("{op:?} is not defined for bool"))),
        },
        d => return Err(Error::msg(format!("{op:?} is not defined for {d}"))),
    })
}

/// `ArgMax`/`ArgMin` over one axis (first index wins ties), output int32 or int64.
pub fn arg_reduce(x: &Value, axis: &Value, max: bool, out: DType) -> Result<Value> {
    let a = norm_axis(scalar_i64(axis, "ArgMax axis")?, x.rank(), false)?;
    let xs = x.to_f64s()?;
    let outer: usize = x.shape[..a].iter().product();
    let dim = x.shape[a];
    let inner: usize = x.shape[a + 1..].iter().product();
    if dim == 0 {
        return Err(Error::msg("ArgMax over an empty dimension"));
    }
    let mut res = Vec::with_capacity(outer * inner);
    for o in 0..outer {
        for i in 0..inner {
            let mut best = 0;
            for k in 1..dim {
                let (v, b) = (
                    xs[(o * dim + k) * inner + i],
                    xs[(o * dim + best) * inner + i],
                );
                if (max && v > b) || (!max && v < b) {
                    best = k;
                }
            }
            res.push(best);
        }
    }
    let mut shape = x.shape.clone();
    shape.remove(a);
    int_vector(&res, out)?.reshaped(shape)
}
