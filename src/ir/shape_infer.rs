//! Static shape and dtype inference over a graph, with the values of small
//! integer tensors where they are known before the graph runs (the
//! `Shape`/`StridedSlice`/`Pack` chains that compute reshape targets).
//!
//! Dimensions unknown until run time (a batch of `-1`) stay `-1` and propagate:
//! `Shape` of a `[-1, 4]` tensor is the value `[?, 4]`, and a `Reshape` to
//! `Pack(?, 16)` gives `[-1, 16]`.

use std::collections::HashMap;

mod movement;
pub use movement::{split_sizes, strided_spec, SliceDim, StridedSpec};

use super::op::{Binary, Conv, Forward, Layout, Linear, MatMul, Op, Padding, Pool, Unary};
use super::{Attr, DType, Graph, IrError, Node, Tensor, TensorRef};

/// What is known about one tensor before the graph runs.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub dtype: DType,
    /// One entry per dimension; -1 where the size is known only at run time.
    pub shape: Vec<i64>,
    /// Elements of a small integer tensor (row-major), `None` per element that
    /// is known only at run time. `None` altogether when not tracked.
    pub value: Option<Vec<Option<i64>>>,
}

impl TensorInfo {
    fn new(dtype: DType, shape: Vec<i64>) -> TensorInfo {
        TensorInfo {
            dtype,
            shape,
            value: None,
        }
    }

    /// The value when every element is known.
    pub fn known_value(&self) -> Option<Vec<i64>> {
        self.value.as_ref()?.iter().copied().collect()
    }

    /// Number of elements, when every dimension is known.
    pub fn num_elements(&self) -> Option<i64> {
        self.shape.iter().try_fold(
            1i64,
            |acc, &d| if d < 0 { None } else { acc.checked_mul(d) },
        )
    }
}

/// Integer tensors up to this many elements have their values tracked.
const MAX_TRACKED: usize = 64;

/// Shapes, dtypes and known small values of every tensor the graph computes.
/// An op it does not know, or inputs it cannot reconcile, is an error naming the node.
pub fn infer_shapes(graph: &Graph) -> Result<HashMap<TensorRef, TensorInfo>, IrError> {
    let order = graph.topo_order()?;
    let mut infos: HashMap<TensorRef, TensorInfo> = HashMap::with_capacity(graph.nodes.len());
    for i in order {
        let node = &graph.nodes[i];
        let inputs = node
            .inputs
            .iter()
            .map(|r| {
                infos.get(r).cloned().ok_or_else(|| {
                    err(
                        node,
                        format!(
                            "input '{r}' has no inferred shape (its producer has no such output)"
                        ),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let outputs = infer_node(node, &Op::parse(node)?, &inputs)?;
        for (k, info) in outputs.into_iter().enumerate() {
            infos.insert(TensorRef::new(node.name.clone(), k as u32), info);
        }
    }
    Ok(infos)
}

fn err(node: &Node, msg: impl std::fmt::Display) -> IrError {
    IrError::new(format!("node '{}' ({}): {msg}", node.name, node.op))
}

fn want_inputs(node: &Node, inputs: &[TensorInfo], n: usize) -> Result<(), IrError> {
    if inputs.len() < n {
        return Err(err(node, format!("needs {n} inputs, has {}", inputs.len())));
    }
    Ok(())
}

fn const_info(t: &Tensor) -> TensorInfo {
    let shape = t.shape().iter().map(|&d| d as i64).collect();
    let mut info = TensorInfo::new(t.dtype(), shape);
    if matches!(
        t.dtype(),
        DType::I32 | DType::I64 | DType::I16 | DType::I8 | DType::U8
    ) && t.len() <= MAX_TRACKED
    {
        info.value = t
            .to_i64_vec()
            .ok()
            .map(|v| v.into_iter().map(Some).collect());
    }
    info
}

/// The known integer value of input `i` (every element), or an error saying what is missing.
fn int_value(
    node: &Node,
    inputs: &[TensorInfo],
    i: usize,
    what: &str,
) -> Result<Vec<i64>, IrError> {
    inputs
        .get(i)
        .and_then(TensorInfo::known_value)
        .ok_or_else(|| err(node, format!("{what} (input {i}) is not a constant")))
}

fn norm_axis(node: &Node, axis: i64, rank: usize) -> Result<usize, IrError> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r.max(1) {
        return Err(err(
            node,
            format!("axis {axis} is out of range for rank {rank}"),
        ));
    }
    Ok(a as usize)
}

fn broadcast(node: &Node, shapes: &[&[i64]]) -> Result<Vec<i64>, IrError> {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut out = vec![1i64; rank];
    for s in shapes {
        let off = rank - s.len();
        for (j, &d) in s.iter().enumerate() {
            let o = &mut out[off + j];
            *o = match (*o, d) {
                (1, d) => d,
                (o, 1) => o,
                (-1, d) | (d, -1) => d.max(-1),
                (a, b) if a == b => a,
                (a, b) => {
                    return Err(err(
                        node,
                        format!("shapes {shapes:?} do not broadcast (dimension {a} vs {b})"),
                    ))
                }
            };
        }
    }
    Ok(out)
}

fn dtype_attr(node: &Node, keys: &[&str]) -> Result<DType, IrError> {
    for k in keys {
        if let Some(Attr::Type(t)) = node.attr(k) {
            return Ok(*t);
        }
    }
    Err(err(
        node,
        format!("has no dtype attribute ({})", keys.join(", ")),
    ))
}

/// Output size of a windowed op along one spatial dimension (TF's SAME/VALID rule);
/// -1 for a size known only at run time. The one window rule: strip_training's
/// symbolic folding uses it for its known dimensions.
pub fn window_out(
    node: &Node,
    size: i64,
    k: i64,
    stride: i64,
    dilation: i64,
    padding: Padding,
) -> Result<i64, IrError> {
    let limit = i64::from(i32::MAX);
    if !(1..=limit).contains(&stride)
        || !(1..=limit).contains(&k)
        || !(1..=limit).contains(&dilation)
    {
        return Err(err(
            node,
            format!(
            "window {k}, stride {stride} and dilation {dilation} must be positive 32-bit values"
        ),
        ));
    }
    if size < 0 {
        return Ok(-1);
    }
    if size > limit {
        return Err(err(node, format!("input size {size} is out of range")));
    }
    let eff = (k - 1) * dilation + 1;
    Ok(match padding {
        Padding::Same => (size + stride - 1) / stride,
        Padding::Valid => {
            if size < eff {
                return Err(err(
                    node,
                    format!("VALID window of {eff} does not fit input size {size}"),
                ));
            }
            (size - eff) / stride + 1
        }
        Padding::Explicit(_) => {
            return Err(err(node, "padding 'EXPLICIT' is not supported"));
        }
    })
}

fn require_nhwc(node: &Node, layout: Layout) -> Result<(), IrError> {
    match layout {
        Layout::Nhwc => Ok(()),
        Layout::Nchw => Err(err(node, "data_format NCHW is not supported (only NHWC)")),
    }
}

fn rank_of(node: &Node, info: &TensorInfo, want: usize, what: &str) -> Result<(), IrError> {
    if info.shape.len() != want {
        return Err(err(
            node,
            format!("{what} must have rank {want}, has shape {:?}", info.shape),
        ));
    }
    Ok(())
}

fn small_value(dtype: DType, v: Vec<Option<i64>>) -> Option<Vec<Option<i64>>> {
    (matches!(dtype, DType::I32 | DType::I64) && v.len() <= MAX_TRACKED).then_some(v)
}

fn infer_node(node: &Node, op: &Op, ins: &[TensorInfo]) -> Result<Vec<TensorInfo>, IrError> {
    let first = || {
        ins.first()
            .cloned()
            .ok_or_else(|| err(node, "needs an input"))
    };
    let same = |dtype: Option<DType>| -> Result<Vec<TensorInfo>, IrError> {
        let mut i = first()?;
        if let Some(d) = dtype {
            i.dtype = d;
            i.value = None;
        }
        Ok(vec![i])
    };
    Ok(match op {
        // quantize_int8's fused ops (x, weights, bias): shaped like the matrix op.
        Op::Fused { linear, .. } => {
            want_inputs(node, ins, 3)?;
            match linear {
                Linear::Conv2D(c) => conv_shape(node, c, false, ins)?,
                Linear::Depthwise(c) => conv_shape(node, c, true, ins)?,
                Linear::MatMul(m) => matmul_shape(node, m, ins)?,
            }
        }
        Op::Placeholder => {
            let dtype = dtype_attr(node, &["dtype"])?;
            let shape = match node.attr("shape") {
                Some(Attr::Shape(Some(dims))) => {
                    if let Some(d) = dims.iter().find(|&&d| d > i64::from(i32::MAX)) {
                        return Err(err(node, format!("dimension {d} is out of range")));
                    }
                    dims.iter().map(|&d| d.max(-1)).collect()
                }
                _ => return Err(err(node, "has no static rank (shape attribute)")),
            };
            vec![TensorInfo::new(dtype, shape)]
        }
        Op::Const => {
            let t = node.attr_tensor("value")?;
            vec![const_info(t)]
        }
        Op::Forward(
            Forward::Identity
            | Forward::StopGradient
            | Forward::Snapshot
            | Forward::CheckNumerics
            | Forward::PreventGradient
            | Forward::EnsureShape,
        )
        | Op::PlaceholderWithDefault => same(None)?,
        Op::IdentityN => ins.to_vec(),
        Op::Unary(Unary::LogicalNot) => same(Some(DType::Bool))?,
        // Element-wise ops the interpreter runs; the value (of small int tensors) is dropped.
        Op::Unary(
            Unary::Softplus | Unary::Log1p | Unary::Rint | Unary::Inv | Unary::Sin | Unary::Cos,
        )
        | Op::BiasAdd { v1: true, .. } => same(Some(first()?.dtype))?,
        Op::Unary(_)
        | Op::Gelu { .. }
        | Op::Prelu
        | Op::L2Normalize
        | Op::HardSwish
        | Op::Softmax
        | Op::LogSoftmax
        | Op::LeakyRelu
        | Op::BiasAdd { .. }
        | Op::ZerosLike
        | Op::OnesLike => same(None)?,
        Op::Cast => {
            let dst = dtype_attr(node, &["DstT"])?;
            let mut i = first()?;
            i.dtype = dst;
            if !matches!(dst, DType::I32 | DType::I64) {
                i.value = None;
            }
            vec![i]
        }
        // qpipe's own (de)quantization nodes: same shape, dtype from the attribute.
        Op::Dequantize => {
            let dtype = dtype_attr(node, &["dtype", "DstT"]).unwrap_or(DType::F32);
            same(Some(dtype))?
        }
        Op::Quantize => same(Some(dtype_attr(node, &["dtype", "T", "DstT"])?))?,
        Op::Shape => {
            let x = first()?;
            let dtype = dtype_attr(node, &["out_type"]).unwrap_or(DType::I32);
            let value = x.shape.iter().map(|&d| (d >= 0).then_some(d)).collect();
            vec![TensorInfo {
                dtype,
                shape: vec![x.shape.len() as i64],
                value: small_value(dtype, value),
            }]
        }
        Op::Size | Op::Rank => {
            let x = first()?;
            let dtype = dtype_attr(node, &["out_type"]).unwrap_or(DType::I32);
            let v = if *op == Op::Rank {
                Some(x.shape.len() as i64)
            } else {
                x.num_elements()
            };
            vec![TensorInfo {
                dtype,
                shape: vec![],
                value: Some(vec![v]),
            }]
        }
        Op::Binary(b) => {
            want_inputs(node, ins, 2)?;
            let shape = broadcast(node, &[&ins[0].shape, &ins[1].shape])?;
            let value = int_binary(*b, &ins[0], &ins[1], &shape);
            vec![TensorInfo {
                dtype: ins[0].dtype,
                shape,
                value,
            }]
        }
        Op::Compare(_) => {
            want_inputs(node, ins, 2)?;
            vec![TensorInfo::new(
                DType::Bool,
                broadcast(node, &[&ins[0].shape, &ins[1].shape])?,
            )]
        }
        Op::Select | Op::SelectV2 => {
            want_inputs(node, ins, 3)?;
            let shape = if *op == Op::Select && ins[0].shape.len() == 1 && ins[1].shape.len() > 1 {
                ins[1].shape.clone()
            } else {
                broadcast(node, &[&ins[0].shape, &ins[1].shape, &ins[2].shape])?
            };
            vec![TensorInfo::new(ins[1].dtype, shape)]
        }
        Op::MatMul(m) => matmul_shape(node, m, ins)?,
        Op::Conv2D(c) => conv_shape(node, c, false, ins)?,
        Op::DepthwiseConv2dNative(c) => conv_shape(node, c, true, ins)?,
        Op::MaxPool(p) | Op::AvgPool(p) => pool_shape(node, p, ins)?,
        Op::FusedBatchNorm { version, .. } => {
            let x = first()?;
            rank_of(node, &x, 4, "input")?;
            let c = x.shape[3];
            let stat = TensorInfo::new(DType::F32, vec![c]);
            let mut outs = vec![TensorInfo::new(x.dtype, x.shape.clone())];
            let n_stats = if *version == 3 { 5 } else { 4 };
            outs.extend(std::iter::repeat_n(stat, n_stats));
            outs
        }
        Op::Reshape => {
            want_inputs(node, ins, 2)?;
            let target = ins[1]
                .value
                .clone()
                .ok_or_else(|| err(node, "the target shape is not known before run time"))?;
            vec![TensorInfo::new(
                ins[0].dtype,
                reshape_dims(node, &ins[0], &target)?,
            )]
        }
        Op::ExpandDims => {
            want_inputs(node, ins, 2)?;
            let axis = int_value(node, ins, 1, "axis")?;
            let [axis] = axis[..] else {
                return Err(err(node, "axis must be a single value"));
            };
            let mut shape = ins[0].shape.clone();
            let a = norm_axis(node, axis, shape.len() + 1)?;
            shape.insert(a, 1);
            let value = ins[0].value.clone();
            vec![TensorInfo {
                dtype: ins[0].dtype,
                shape,
                value,
            }]
        }
        Op::Squeeze => {
            let x = first()?;
            let dims = match node.attr("squeeze_dims").or(node.attr("axis")) {
                Some(Attr::Ints(v)) => v.clone(),
                _ => vec![],
            };
            let rank = x.shape.len();
            let axes = dims
                .iter()
                .map(|&a| norm_axis(node, a, rank))
                .collect::<Result<Vec<_>, _>>()?;
            let mut shape = Vec::new();
            for (j, &d) in x.shape.iter().enumerate() {
                let listed = axes.contains(&j);
                if listed && d != 1 && d != -1 {
                    return Err(err(
                        node,
                        format!("cannot squeeze dimension {j} of size {d}"),
                    ));
                }
                if listed || (axes.is_empty() && d == 1) {
                    continue;
                }
                shape.push(d);
            }
            vec![TensorInfo {
                dtype: x.dtype,
                shape,
                value: x.value,
            }]
        }
        Op::Reduce { .. } | Op::ArgMax | Op::ArgMin => {
            want_inputs(node, ins, 2)?;
            let axes = int_value(node, ins, 1, "reduction axes")?;
            let rank = ins[0].shape.len();
            let axes = axes
                .iter()
                .map(|&a| norm_axis(node, a, rank))
                .collect::<Result<Vec<_>, _>>()?;
            let (arg, keep) = match op {
                Op::Reduce { keep_dims, .. } => (false, *keep_dims),
                _ => (true, false),
            };
            let mut shape = Vec::new();
            for (j, &d) in ins[0].shape.iter().enumerate() {
                if axes.contains(&j) {
                    if keep {
                        shape.push(1);
                    }
                } else {
                    shape.push(d);
                }
            }
            let dtype = if arg {
                dtype_attr(node, &["output_type"]).unwrap_or(DType::I64)
            } else {
                ins[0].dtype
            };
            vec![TensorInfo::new(dtype, shape)]
        }
        Op::ConcatV2 => {
            want_inputs(node, ins, 2)?;
            let n = ins.len() - 1;
            let axis = int_value(node, ins, n, "axis")?;
            let [axis] = axis[..] else {
                return Err(err(node, "axis must be a single value"));
            };
            let rank = ins[0].shape.len();
            let a = norm_axis(node, axis, rank)?;
            let mut shape = ins[0].shape.clone();
            let mut total = 0i64;
            for x in &ins[..n] {
                if x.shape.len() != rank {
                    return Err(err(node, "inputs have different ranks"));
                }
                total = if total < 0 || x.shape[a] < 0 {
                    -1
                } else {
                    total + x.shape[a]
                };
                for (j, &d) in x.shape.iter().enumerate() {
                    if j != a && shape[j] < 0 {
                        shape[j] = d;
                    }
                }
            }
            shape[a] = total;
            let value = if rank == 1 {
                ins[..n]
                    .iter()
                    .map(|x| x.value.clone())
                    .collect::<Option<Vec<_>>>()
                    .map(|vs| vs.concat())
            } else {
                None
            };
            vec![TensorInfo {
                dtype: ins[0].dtype,
                shape,
                value: value.and_then(|v| small_value(ins[0].dtype, v)),
            }]
        }
        Op::Pack => {
            let x = first()?;
            let axis = match node.attr("axis") {
                Some(Attr::Int(a)) => *a,
                _ => 0,
            };
            let a = norm_axis(node, axis, x.shape.len() + 1)?;
            let mut shape = x.shape.clone();
            shape.insert(a, ins.len() as i64);
            let value = if x.shape.is_empty() {
                ins.iter()
                    .map(|i| i.value.as_ref().and_then(|v| v.first().copied()))
                    .collect::<Option<Vec<_>>>()
            } else {
                None
            };
            vec![TensorInfo {
                dtype: x.dtype,
                shape,
                value: value.and_then(|v| small_value(x.dtype, v)),
            }]
        }
        Op::StridedSlice => movement::strided_slice(node, ins)?,
        Op::Slice => movement::slice(node, ins)?,
        Op::Unpack => movement::unpack(node, ins)?,
        Op::Tile => movement::tile(node, ins)?,
        Op::Split => movement::split(node, ins, false)?,
        Op::SplitV => movement::split(node, ins, true)?,
        Op::GatherV2 | Op::Gather => {
            want_inputs(node, ins, 2)?;
            let axis = if *op == Op::GatherV2 {
                let v = int_value(node, ins, 2, "axis")?;
                let [a] = v[..] else {
                    return Err(err(node, "axis must be a single value"));
                };
                a
            } else {
                0
            };
            let batch_dims = match node.attr("batch_dims") {
                Some(Attr::Int(b)) => *b,
                _ => 0,
            };
            let (p, idx) = (&ins[0].shape, &ins[1].shape);
            let a = norm_axis(node, axis, p.len())?;
            let b = usize::try_from(if batch_dims < 0 {
                batch_dims + idx.len() as i64
            } else {
                batch_dims
            })
            .map_err(|_| err(node, format!("batch_dims {batch_dims} is out of range")))?;
            if b > idx.len() || b > a {
                return Err(err(
                    node,
                    format!("batch_dims {batch_dims} is out of range"),
                ));
            }
            let mut shape = p[..a].to_vec();
            shape.extend_from_slice(&idx[b..]);
            shape.extend_from_slice(&p[a + 1..]);
            vec![TensorInfo::new(ins[0].dtype, shape)]
        }
        Op::Conv2DBackpropInput(_) => {
            want_inputs(node, ins, 3)?;
            let shape: Vec<i64> = ins[0]
                .value
                .as_ref()
                .ok_or_else(|| err(node, "its output shape (input 0) is not known"))?
                .iter()
                .map(|d| d.unwrap_or(-1))
                .collect();
            if shape.len() != 4 || ins[2].shape.len() != 4 {
                return Err(err(node, "only 4-D transposed convolutions are supported"));
            }
            vec![TensorInfo::new(ins[2].dtype, shape)]
        }
        Op::ResizeBilinear(_) | Op::ResizeNearestNeighbor(_) => {
            want_inputs(node, ins, 2)?;
            let size = int_value(node, ins, 1, "size")?;
            let x = &ins[0];
            if x.shape.len() != 4 || size.len() != 2 || size.iter().any(|&d| d <= 0) {
                return Err(err(node, format!("needs a 4-D input and a positive size, got {:?} and {size:?}", x.shape)));
            }
            // TensorFlow's bilinear resize gives float; qpipe's int8 form keeps int8.
            let dtype = if matches!(op, Op::ResizeBilinear(_)) && x.dtype != DType::I8 { DType::F32 } else { x.dtype };
            vec![TensorInfo::new(dtype, vec![x.shape[0], size[0], size[1], x.shape[3]])]
        }
        Op::Pad | Op::PadV2 | Op::MirrorPad => {
            want_inputs(node, ins, 2)?;
            let pads = int_value(node, ins, 1, "paddings")?;
            let x = &ins[0];
            if pads.len() != 2 * x.shape.len() {
                return Err(err(
                    node,
                    format!("paddings {pads:?} do not match rank {}", x.shape.len()),
                ));
            }
            let shape = x
                .shape
                .iter()
                .enumerate()
                .map(|(j, &d)| {
                    if d < 0 {
                        return Ok(-1);
                    }
                    d.checked_add(pads[2 * j])
                        .and_then(|v| v.checked_add(pads[2 * j + 1]))
                        .filter(|&v| v >= 0)
                        .ok_or_else(|| err(node, format!("paddings {pads:?} are out of range")))
                })
                .collect::<Result<_, _>>()?;
            vec![TensorInfo::new(x.dtype, shape)]
        }
        Op::Transpose => {
            want_inputs(node, ins, 2)?;
            let perm = int_value(node, ins, 1, "permutation")?;
            let x = &ins[0];
            if perm.len() != x.shape.len() {
                return Err(err(
                    node,
                    format!("permutation {perm:?} does not match rank"),
                ));
            }
            let shape = perm
                .iter()
                .map(|&p| {
                    usize::try_from(p)
                        .ok()
                        .and_then(|p| x.shape.get(p).copied())
                        .ok_or_else(|| err(node, format!("permutation {perm:?} is invalid")))
                })
                .collect::<Result<_, _>>()?;
            vec![TensorInfo::new(x.dtype, shape)]
        }
        Op::Fill | Op::Random(_) => {
            // A dimension known only at run time (a batch) stays -1.
            let dims: Vec<i64> = ins
                .first()
                .and_then(|i| i.value.clone())
                .ok_or_else(|| err(node, "shape (input 0) has no known length"))?
                .into_iter()
                .map(|d| d.unwrap_or(-1))
                .collect();
            if dims.iter().any(|&d| d < -1) {
                return Err(err(node, format!("shape {dims:?} has a negative dimension")));
            }
            let dtype = if *op == Op::Fill {
                want_inputs(node, ins, 2)?;
                ins[1].dtype
            } else {
                dtype_attr(node, &["dtype"])?
            };
            vec![TensorInfo::new(dtype, dims)]
        }
        Op::NoOp | Op::Assert | Op::SaveV2 | Op::Print => vec![],
        Op::BatchMatMul { .. } => batch_matmul_shape(node, ins)?,
        Op::Concat
        | Op::Range
        // Shapes are inferred for export; an op without a rule has no .tflite lowering either.
        | Op::SpaceToBatchND
        | Op::BatchToSpaceND
        | Op::Other(_) => {
            return Err(err(
                node,
                "this op cannot be exported to .tflite (qpipe has no shape rule for it)",
            ))
        }
    })
}

fn matmul_shape(node: &Node, m: &MatMul, ins: &[TensorInfo]) -> Result<Vec<TensorInfo>, IrError> {
    want_inputs(node, ins, 2)?;
    rank_of(node, &ins[0], 2, "input a")?;
    rank_of(node, &ins[1], 2, "input b")?;
    let (m_, ka) = if m.transpose_a {
        (ins[0].shape[1], ins[0].shape[0])
    } else {
        (ins[0].shape[0], ins[0].shape[1])
    };
    let (kb, n) = if m.transpose_b {
        (ins[1].shape[1], ins[1].shape[0])
    } else {
        (ins[1].shape[0], ins[1].shape[1])
    };
    if ka >= 0 && kb >= 0 && ka != kb {
        return Err(err(
            node,
            format!(
                "inner dimensions differ: {:?} x {:?}",
                ins[0].shape, ins[1].shape
            ),
        ));
    }
    Ok(vec![TensorInfo::new(ins[0].dtype, vec![m_, n])])
}

/// `BatchMatMul*`: `[.., m, k] x [.., k, n]` (adjoints from `adj_x`/`adj_y`), batch
/// dimensions broadcast.
fn batch_matmul_shape(node: &Node, ins: &[TensorInfo]) -> Result<Vec<TensorInfo>, IrError> {
    want_inputs(node, ins, 2)?;
    let adj = |k: &str| match node.attr(k) {
        None => Ok(false),
        Some(_) => node.attr_bool(k),
    };
    let (adj_x, adj_y) = (adj("adj_x")?, adj("adj_y")?);
    let (a, b) = (&ins[0].shape, &ins[1].shape);
    if a.len() < 2 || b.len() < 2 {
        return Err(err(
            node,
            format!("operands must have rank ≥ 2, got {a:?} x {b:?}"),
        ));
    }
    let (ra, rb) = (a.len(), b.len());
    let (m, ka) = if adj_x {
        (a[ra - 1], a[ra - 2])
    } else {
        (a[ra - 2], a[ra - 1])
    };
    let (kb, n) = if adj_y {
        (b[rb - 1], b[rb - 2])
    } else {
        (b[rb - 2], b[rb - 1])
    };
    if ka >= 0 && kb >= 0 && ka != kb {
        return Err(err(node, format!("inner dimensions differ: {a:?} x {b:?}")));
    }
    let mut shape = broadcast(node, &[&a[..ra - 2], &b[..rb - 2]])?;
    shape.extend([m, n]);
    Ok(vec![TensorInfo::new(ins[0].dtype, shape)])
}

fn conv_shape(
    node: &Node,
    c: &Conv,
    depthwise: bool,
    ins: &[TensorInfo],
) -> Result<Vec<TensorInfo>, IrError> {
    want_inputs(node, ins, 2)?;
    rank_of(node, &ins[0], 4, "input")?;
    rank_of(node, &ins[1], 4, "filter")?;
    require_nhwc(node, c.layout)?;
    let ([sh, sw], [dh, dw]) = (c.strides, c.dilations);
    let (x, f) = (&ins[0].shape, &ins[1].shape);
    if x[3] >= 0 && f[2] >= 0 && depthwise && x[3] != f[2] {
        return Err(err(
            node,
            format!("input channels {} != filter channels {}", x[3], f[2]),
        ));
    }
    if x[3] >= 0 && f[2] > 0 && !depthwise && x[3] % f[2] != 0 {
        return Err(err(
            node,
            format!("input channels {} do not match filter {:?}", x[3], f),
        ));
    }
    let oh = window_out(node, x[1], f[0], sh, dh, c.padding)?;
    let ow = window_out(node, x[2], f[1], sw, dw, c.padding)?;
    let oc = if !depthwise {
        f[3]
    } else if f[2] >= 0 && f[3] >= 0 {
        f[2] * f[3]
    } else {
        -1
    };
    Ok(vec![TensorInfo::new(ins[0].dtype, vec![x[0], oh, ow, oc])])
}

fn pool_shape(node: &Node, p: &Pool, ins: &[TensorInfo]) -> Result<Vec<TensorInfo>, IrError> {
    let x = ins.first().ok_or_else(|| err(node, "needs an input"))?;
    rank_of(node, x, 4, "input")?;
    require_nhwc(node, p.layout)?;
    let ([kh, kw], [sh, sw]) = (p.ksize, p.strides);
    let oh = window_out(node, x.shape[1], kh, sh, 1, p.padding)?;
    let ow = window_out(node, x.shape[2], kw, sw, 1, p.padding)?;
    Ok(vec![TensorInfo::new(
        x.dtype,
        vec![x.shape[0], oh, ow, x.shape[3]],
    )])
}

fn int_binary(
    op: Binary,
    a: &TensorInfo,
    b: &TensorInfo,
    shape: &[i64],
) -> Option<Vec<Option<i64>>> {
    let (va, vb) = (a.value.as_ref()?, b.value.as_ref()?);
    if shape.len() > 1 || !matches!(a.dtype, DType::I32 | DType::I64) {
        return None;
    }
    let n = shape.first().copied().unwrap_or(1);
    let n = usize::try_from(n).ok()?;
    let get = |v: &Vec<Option<i64>>, i: usize| {
        if v.len() == 1 {
            v[0]
        } else {
            v.get(i).copied().flatten()
        }
    };
    let out = (0..n)
        .map(|i| {
            let (x, y) = (get(va, i)?, get(vb, i)?);
            match op {
                Binary::Add | Binary::AddV2 => x.checked_add(y),
                Binary::Sub => x.checked_sub(y),
                Binary::Mul => x.checked_mul(y),
                Binary::FloorDiv | Binary::Div if y != 0 => Some(x.div_euclid(y)),
                Binary::Maximum => Some(x.max(y)),
                Binary::Minimum => Some(x.min(y)),
                Binary::FloorDiv
                | Binary::Div
                | Binary::RealDiv
                | Binary::TruncateDiv
                | Binary::FloorMod
                | Binary::Mod
                | Binary::Pow
                | Binary::SquaredDifference => None,
            }
        })
        .collect();
    Some(out)
}

/// The output dims of a reshape of `x` to `target` (entries: known, -1 = infer, None = run time).
fn reshape_dims(node: &Node, x: &TensorInfo, target: &[Option<i64>]) -> Result<Vec<i64>, IrError> {
    let infer_count = target.iter().filter(|t| **t == Some(-1)).count();
    if infer_count > 1 || target.iter().any(|t| matches!(t, Some(v) if *v < -1)) {
        return Err(err(node, format!("invalid target shape {target:?}")));
    }
    let known: Option<i64> = target
        .iter()
        .filter(|t| **t != Some(-1))
        .try_fold(1i64, |acc, t| acc.checked_mul((*t)?));
    let mut dims: Vec<i64> = target.iter().map(|t| t.unwrap_or(-1)).collect();
    if let Some(pos) = target.iter().position(|t| *t == Some(-1)) {
        dims[pos] = match (x.num_elements(), known) {
            (Some(n), Some(k)) if k > 0 => {
                if n % k != 0 {
                    return Err(err(
                        node,
                        format!("cannot reshape {:?} to {target:?}", x.shape),
                    ));
                }
                n / k
            }
            _ => -1,
        };
    } else if let (Some(n), Some(k)) = (x.num_elements(), known) {
        if n != k {
            return Err(err(
                node,
                format!("cannot reshape {:?} to {dims:?}", x.shape),
            ));
        }
    }
    Ok(dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::Node;

    fn placeholder(name: &str, dtype: DType, shape: &[i64]) -> Node {
        Node::new(name, "Placeholder")
            .with_attr("dtype", Attr::Type(dtype))
            .with_attr("shape", Attr::Shape(Some(shape.to_vec())))
    }

    fn r(name: &str) -> TensorRef {
        TensorRef::new(name, 0)
    }

    #[test]
    fn flatten_through_shape_strided_slice_pack() {
        let mut g = Graph::default();
        g.nodes.push(placeholder("x", DType::F32, &[-1, 2, 2, 32]));
        g.nodes.push(Node::new("shape", "Shape").with_input(r("x")));
        for (n, v) in [("b", 0), ("e", 1), ("s", 1)] {
            g.nodes
                .push(Node::constant(n, Tensor::from_vec(vec![1], &[v])));
        }
        g.nodes.push(
            Node::new("slice", "StridedSlice")
                .with_input(r("shape"))
                .with_input(r("b"))
                .with_input(r("e"))
                .with_input(r("s"))
                .with_attr("shrink_axis_mask", Attr::Int(1)),
        );
        g.nodes.push(Node::constant("k", Tensor::scalar(128i32)));
        g.nodes.push(
            Node::new("pack", "Pack")
                .with_input(r("slice"))
                .with_input(r("k")),
        );
        g.nodes.push(
            Node::new("flat", "Reshape")
                .with_input(r("x"))
                .with_input(r("pack")),
        );
        let infos = infer_shapes(&g).unwrap();
        assert_eq!(infos[&r("slice")].shape, Vec::<i64>::new());
        assert_eq!(infos[&r("pack")].value, Some(vec![None, Some(128)]));
        assert_eq!(infos[&r("flat")].shape, vec![-1, 128]);
    }

    #[test]
    fn conv_pool_and_matmul_shapes() {
        let mut g = Graph::default();
        g.nodes.push(placeholder("x", DType::F32, &[-1, 16, 16, 3]));
        g.nodes.push(Node::constant(
            "w",
            Tensor::from_vec(vec![3, 3, 3, 8], &[0f32; 216]),
        ));
        g.nodes.push(
            Node::new("conv", "Conv2D")
                .with_input(r("x"))
                .with_input(r("w"))
                .with_attr("strides", Attr::Ints(vec![1, 2, 2, 1]))
                .with_attr("padding", Attr::Str(b"VALID".to_vec())),
        );
        g.nodes.push(
            Node::new("pool", "MaxPool")
                .with_input(r("conv"))
                .with_attr("ksize", Attr::Ints(vec![1, 2, 2, 1]))
                .with_attr("strides", Attr::Ints(vec![1, 2, 2, 1]))
                .with_attr("padding", Attr::Str(b"SAME".to_vec())),
        );
        let infos = infer_shapes(&g).unwrap();
        assert_eq!(infos[&r("conv")].shape, vec![-1, 7, 7, 8]);
        assert_eq!(infos[&r("pool")].shape, vec![-1, 4, 4, 8]);
    }

    #[test]
    fn unknown_op_and_bad_reshape_are_errors_naming_the_node() {
        let mut g = Graph::default();
        g.nodes.push(placeholder("x", DType::F32, &[2, 3]));
        g.nodes
            .push(Node::new("weird", "FancyOp").with_input(r("x")));
        let e = infer_shapes(&g).unwrap_err().to_string();
        assert!(e.contains("'weird'") && e.contains("FancyOp"), "{e}");

        let mut g = Graph::default();
        g.nodes.push(placeholder("x", DType::F32, &[2, 3]));
        g.nodes
            .push(Node::constant("t", Tensor::from_vec(vec![2], &[4i32, -1])));
        g.nodes.push(
            Node::new("rs", "Reshape")
                .with_input(r("x"))
                .with_input(r("t")),
        );
        let e = infer_shapes(&g).unwrap_err().to_string();
        assert!(e.contains("'rs'"), "{e}");
    }

    #[test]
    fn extreme_values_are_errors_not_overflows() {
        let mut g = Graph::default();
        g.nodes.push(placeholder("x", DType::F32, &[1 << 40, 2]));
        assert!(infer_shapes(&g).unwrap_err().to_string().contains("'x'"));

        let mut g = Graph::default();
        g.nodes.push(placeholder("x", DType::F32, &[-1, 2]));
        g.nodes.push(Node::constant(
            "p",
            Tensor::from_vec(vec![2, 2], &[0i64, 0, i64::MAX, 1]),
        ));
        g.nodes.push(
            Node::new("pad", "Pad")
                .with_input(r("x"))
                .with_input(r("p")),
        );
        assert!(infer_shapes(&g).unwrap_err().to_string().contains("'pad'"));

        let mut g = Graph::default();
        g.nodes.push(placeholder("x", DType::F32, &[-1, 5, 3]));
        g.nodes.push(Node::new("shape", "Shape").with_input(r("x")));
        for (n, v) in [("b", 1i64), ("e", i64::MAX), ("s", i64::MAX)] {
            g.nodes
                .push(Node::constant(n, Tensor::from_vec(vec![1], &[v])));
        }
        g.nodes.push(
            Node::new("slice", "StridedSlice")
                .with_input(r("shape"))
                .with_input(r("b"))
                .with_input(r("e"))
                .with_input(r("s")),
        );
        let infos = infer_shapes(&g).unwrap();
        assert_eq!(infos[&r("slice")].shape, vec![1]);
        assert_eq!(infos[&r("slice")].value, Some(vec![Some(5)]));
    }
}
