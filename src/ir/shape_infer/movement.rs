//! Shape rules of the data-movement ops: slices (every `StridedSlice` mask),
//! splits, unpacking and tiling.

use super::{err, int_value, norm_axis, small_value, want_inputs, TensorInfo};
use crate::ir::{Attr, IrError, Node};

fn int_attr(node: &Node, key: &str, default: i64) -> i64 {
    match node.attr(key) {
        Some(Attr::Int(v)) => *v,
        _ => default,
    }
}

/// One input dimension of a strided slice in dense form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SliceDim {
    /// First index (canonical, within the dimension, when its size is known).
    pub begin: i64,
    /// One past the last index in the direction of `stride`; `None` runs to the
    /// end of the dimension in that direction.
    pub end: Option<i64>,
    pub stride: i64,
    /// `begin` is the start of the dimension in the direction of `stride`
    /// (known only as a mask when the size is not).
    pub begin_masked: bool,
    /// The dimension is indexed (`begin`) and removed.
    pub shrink: bool,
    /// Elements taken (1 when shrunk); -1 when known only at run time.
    pub size: i64,
}

impl SliceDim {
    /// Takes the whole dimension in order.
    pub fn is_full(&self) -> bool {
        !self.shrink && self.stride == 1 && self.begin_masked && self.end.is_none()
    }
}

/// A `StridedSlice` resolved against its input's shape, as TensorFlow's
/// `ValidateStridedSliceOp` does: one [`SliceDim`] per input dimension (the
/// ellipsis expanded, new axes taken out) and the output shape (new axes in).
#[derive(Debug, Clone, PartialEq)]
pub struct StridedSpec {
    pub dims: Vec<SliceDim>,
    pub out_shape: Vec<i64>,
}

/// Resolves `node`'s strided slice of a tensor of `shape` (-1 = unknown size).
pub fn strided_spec(
    node: &Node,
    shape: &[i64],
    begin: &[i64],
    end: &[i64],
    strides: &[i64],
) -> Result<StridedSpec, IrError> {
    let mask = |k: &str| int_attr(node, k, 0);
    let (bm, em, elm, nam, sm) = (
        mask("begin_mask"),
        mask("end_mask"),
        mask("ellipsis_mask"),
        mask("new_axis_mask"),
        mask("shrink_axis_mask"),
    );
    let n = begin.len();
    if end.len() != n || strides.len() != n || n > 63 {
        return Err(err(node, "begin, end and strides differ in length"));
    }
    let bit = |m: i64, i: usize| m & (1 << i) != 0;
    if (0..n).filter(|&i| bit(elm, i)).count() > 1 {
        return Err(err(node, "more than one ellipsis"));
    }
    let rank = shape.len();
    let consumed = (0..n).filter(|&i| !bit(elm, i) && !bit(nam, i)).count();
    if consumed > rank {
        return Err(err(
            node,
            format!("{consumed} indices for an input of rank {rank}"),
        ));
    }
    let full = |d: i64| SliceDim {
        begin: 0,
        end: None,
        stride: 1,
        begin_masked: true,
        shrink: false,
        size: d,
    };
    let mut dims = Vec::with_capacity(rank);
    let mut out_shape = Vec::new();
    let mut has_ellipsis = false;
    for i in 0..n {
        if bit(elm, i) {
            has_ellipsis = true;
            for _ in 0..rank - consumed {
                let d = shape[dims.len()];
                dims.push(full(d));
                out_shape.push(d);
            }
            continue;
        }
        if bit(nam, i) {
            out_shape.push(1);
            continue;
        }
        let d = shape[dims.len()];
        let dim = slice_dim(
            node,
            d,
            begin[i],
            end[i],
            strides[i],
            bit(bm, i),
            bit(em, i),
            bit(sm, i),
        )?;
        if !dim.shrink {
            out_shape.push(dim.size);
        }
        dims.push(dim);
    }
    if !has_ellipsis {
        while dims.len() < rank {
            let d = shape[dims.len()];
            dims.push(full(d));
            out_shape.push(d);
        }
    }
    Ok(StridedSpec { dims, out_shape })
}

#[allow(clippy::too_many_arguments)]
fn slice_dim(
    node: &Node,
    d: i64,
    begin: i64,
    end: i64,
    s: i64,
    begin_masked: bool,
    end_masked: bool,
    shrink: bool,
) -> Result<SliceDim, IrError> {
    if s == 0 {
        return Err(err(node, "stride 0"));
    }
    if shrink {
        let b = if begin < 0 && d >= 0 {
            begin + d
        } else {
            begin
        };
        if d >= 0 && (b < 0 || b >= d) {
            return Err(err(
                node,
                format!("index {begin} out of range for size {d}"),
            ));
        }
        return Ok(SliceDim {
            begin: b,
            end: None,
            stride: 1,
            begin_masked: false,
            shrink: true,
            size: 1,
        });
    }
    if d < 0 {
        // The size is known only at run time: the runtime resolves the indices.
        return Ok(SliceDim {
            begin,
            end: (!end_masked).then_some(end),
            stride: s,
            begin_masked,
            shrink: false,
            size: -1,
        });
    }
    let (lo, hi) = if s > 0 { (0, d) } else { (-1, d - 1) };
    let canon = |v: i64| {
        let v = if v < 0 { v.saturating_add(d) } else { v };
        v.clamp(lo, hi)
    };
    let b = if begin_masked {
        if s > 0 {
            0
        } else {
            d - 1
        }
    } else {
        canon(begin)
    };
    let e = if end_masked {
        if s > 0 {
            d
        } else {
            -1
        }
    } else {
        canon(end)
    };
    let (span, step) = if s > 0 {
        ((e - b).max(0), s)
    } else {
        ((b - e).max(0), s.checked_neg().unwrap_or(i64::MAX))
    };
    let size = span / step + i64::from(span % step != 0);
    let starts_at_edge = if s > 0 { b == 0 } else { b == d - 1 };
    let ends_at_edge = if s > 0 { e == d } else { e == -1 };
    Ok(SliceDim {
        begin: b,
        end: (!ends_at_edge).then_some(e),
        stride: s,
        begin_masked: starts_at_edge,
        shrink: false,
        size,
    })
}

pub(super) fn strided_slice(node: &Node, ins: &[TensorInfo]) -> Result<Vec<TensorInfo>, IrError> {
    want_inputs(node, ins, 4)?;
    let begin = int_value(node, ins, 1, "begin")?;
    let end = int_value(node, ins, 2, "end")?;
    let strides = int_value(node, ins, 3, "strides")?;
    let x = &ins[0];
    let spec = strided_spec(node, &x.shape, &begin, &end, &strides)?;
    // The elements of a small 1-D integer tensor (shape arithmetic).
    let value = match (&x.value, spec.dims.as_slice(), spec.out_shape.len()) {
        (Some(v), [dim], r) if r <= 1 && dim.size >= 0 => {
            let mut out = Vec::new();
            let mut i = dim.begin;
            for _ in 0..dim.size {
                out.push(
                    usize::try_from(i)
                        .ok()
                        .and_then(|i| v.get(i).copied().flatten()),
                );
                i = i.saturating_add(dim.stride);
            }
            Some(out)
        }
        _ => None,
    };
    Ok(vec![TensorInfo {
        dtype: x.dtype,
        shape: spec.out_shape,
        value: value.and_then(|v| small_value(x.dtype, v)),
    }])
}

pub(super) fn slice(node: &Node, ins: &[TensorInfo]) -> Result<Vec<TensorInfo>, IrError> {
    want_inputs(node, ins, 3)?;
    let begin = int_value(node, ins, 1, "begin")?;
    let size = int_value(node, ins, 2, "size")?;
    let x = &ins[0];
    if begin.len() != x.shape.len() || size.len() != x.shape.len() {
        return Err(err(
            node,
            "begin and size must have one entry per dimension",
        ));
    }
    let mut shape = Vec::with_capacity(size.len());
    for ((&d, &b), &s) in x.shape.iter().zip(&begin).zip(&size) {
        let bad = || err(node, format!("slice {begin:?} + {size:?} is out of range"));
        if b < 0
            || s < -1
            || (d >= 0 && (b > d || (s >= 0 && b.checked_add(s).is_none_or(|e| e > d))))
        {
            return Err(bad());
        }
        shape.push(match (s, d) {
            (-1, d) if d >= 0 => d - b,
            (-1, _) => -1,
            (s, _) => s,
        });
    }
    Ok(vec![TensorInfo::new(x.dtype, shape)])
}

pub(super) fn unpack(node: &Node, ins: &[TensorInfo]) -> Result<Vec<TensorInfo>, IrError> {
    want_inputs(node, ins, 1)?;
    let x = &ins[0];
    let a = norm_axis(node, int_attr(node, "axis", 0), x.shape.len())?;
    let n = match (x.shape[a], node.attr("num")) {
        (d, _) if d >= 0 => d,
        (_, Some(Attr::Int(n))) if *n >= 0 => *n,
        _ => return Err(err(node, "the number of outputs is not known")),
    };
    if n > 1 << 16 {
        return Err(err(node, format!("{n} outputs are too many")));
    }
    let mut shape = x.shape.clone();
    shape.remove(a);
    Ok((0..n)
        .map(|_| TensorInfo::new(x.dtype, shape.clone()))
        .collect())
}

pub(super) fn tile(node: &Node, ins: &[TensorInfo]) -> Result<Vec<TensorInfo>, IrError> {
    want_inputs(node, ins, 2)?;
    let m = int_value(node, ins, 1, "multiples")?;
    let x = &ins[0];
    if m.len() != x.shape.len() || m.iter().any(|&k| k < 0) {
        return Err(err(
            node,
            format!("multiples {m:?} do not fit rank {}", x.shape.len()),
        ));
    }
    let shape = x
        .shape
        .iter()
        .zip(&m)
        .map(|(&d, &k)| {
            if d < 0 {
                Ok(-1)
            } else {
                d.checked_mul(k)
                    .ok_or_else(|| err(node, format!("multiples {m:?} overflow")))
            }
        })
        .collect::<Result<_, _>>()?;
    Ok(vec![TensorInfo::new(x.dtype, shape)])
}

/// `Split` (axis, value) and `SplitV` (value, sizes, axis): the part sizes along the axis.
pub fn split_sizes(
    node: &Node,
    dim: i64,
    num: i64,
    sizes: Option<&[i64]>,
) -> Result<Vec<i64>, IrError> {
    if !(1..=1 << 16).contains(&num) {
        return Err(err(node, format!("num_split {num} is out of range")));
    }
    let Some(sizes) = sizes else {
        if dim < 0 {
            return Ok(vec![-1; num as usize]);
        }
        if dim % num != 0 {
            return Err(err(
                node,
                format!("size {dim} does not split into {num} parts"),
            ));
        }
        return Ok(vec![dim / num; num as usize]);
    };
    if sizes.len() as i64 != num || sizes.iter().filter(|&&s| s == -1).count() > 1 {
        return Err(err(
            node,
            format!("size_splits {sizes:?} do not match num_split {num}"),
        ));
    }
    let known: i64 = sizes.iter().filter(|&&s| s != -1).sum();
    if sizes.iter().any(|&s| s < -1) || (dim >= 0 && known > dim) {
        return Err(err(
            node,
            format!("size_splits {sizes:?} do not fit size {dim}"),
        ));
    }
    let all_known = !sizes.contains(&-1);
    if dim >= 0 && all_known && known != dim {
        return Err(err(
            node,
            format!("size_splits {sizes:?} do not add up to {dim}"),
        ));
    }
    Ok(sizes
        .iter()
        .map(|&s| match s {
            -1 if dim >= 0 => dim - known,
            s => s,
        })
        .collect())
}

pub(super) fn split(node: &Node, ins: &[TensorInfo], v: bool) -> Result<Vec<TensorInfo>, IrError> {
    let (xi, ai) = if v { (0, 2) } else { (1, 0) };
    want_inputs(node, ins, if v { 3 } else { 2 })?;
    let axis = int_value(node, ins, ai, "axis")?;
    let [axis] = axis[..] else {
        return Err(err(node, "axis must be a single value"));
    };
    let x = &ins[xi];
    let a = norm_axis(node, axis, x.shape.len())?;
    let num = int_attr(node, "num_split", -1);
    let sizes = if v {
        Some(int_value(node, ins, 1, "size_splits")?)
    } else {
        None
    };
    let parts = split_sizes(node, x.shape[a], num, sizes.as_deref())?;
    Ok(parts
        .into_iter()
        .map(|p| {
            let mut shape = x.shape.clone();
            shape[a] = p;
            TensorInfo::new(x.dtype, shape)
        })
        .collect())
}
