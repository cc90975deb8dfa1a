//! Weight-only int8 (OPTIMIZE_FOR_SIZE) and dynamic range (DEFAULT without a
//! calibration set): float weight constants become symmetric int8 constants of the
//! same name. Weight-only, and dynamic range for the weights of ops that have no
//! hybrid kernel, read them through a `Dequantize` node (`<name>/dequantize`) and
//! compute in float. In dynamic range, a weight read only as the filter of
//! `_FusedConv2D` or the weights of `_FusedMatMul` is read by those ops directly:
//! they become hybrid (float input and output, int8 weights, input quantized at
//! run time), as LiteRT runs CONV_2D and FULLY_CONNECTED with an int8 filter.

use std::collections::{HashMap, HashSet};

use super::params::symmetric_weights;
use crate::error::Result;
use crate::ir::op::{is_hybrid_node, Linear, LinearKind};
use crate::ir::{Attr, DType, Graph, Node, Op, Tensor, TensorRef};

/// What [`quantize_weights`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WeightReport {
    pub tensors: usize,
    pub per_channel: usize,
    pub bytes_before: usize,
    pub bytes_after: usize,
    /// Ops that read their int8 weights directly (hybrid).
    pub hybrid_ops: usize,
}

/// The axis a consumer quantizes weight input `k` along: `Some(Some(axis))` per
/// channel, `Some(None)` per tensor, `None` when this is not a weight use.
fn weight_use(op: &Op, k: usize, w: &Tensor, per_channel_dense: bool) -> Option<Option<usize>> {
    let rank = w.shape().len();
    let linear = match op {
        Op::Conv2D(c) => Linear::Conv2D(*c),
        Op::DepthwiseConv2dNative(c) => Linear::Depthwise(*c),
        Op::MatMul(m) => Linear::MatMul(*m),
        Op::Fused { linear, .. } => *linear,
        Op::GatherV2 | Op::Gather => return (k == 0).then_some(None),
        // Filter `[h, w, out, in]`, per output channel (TRANSPOSE_CONV's axis 0).
        Op::Conv2DBackpropInput(_) => return (k == 1 && rank == 4).then_some(Some(2)),
        Op::Placeholder
        | Op::PlaceholderWithDefault
        | Op::Const
        | Op::Forward(_)
        | Op::IdentityN
        | Op::Print
        | Op::Unary(_)
        | Op::Gelu { .. }
        | Op::Prelu
        | Op::L2Normalize
        | Op::HardSwish
        | Op::ResizeBilinear(_)
        | Op::ResizeNearestNeighbor(_)
        | Op::LeakyRelu
        | Op::Binary(_)
        | Op::Compare(_)
        | Op::BiasAdd { .. }
        | Op::BatchMatMul { .. }
        | Op::MaxPool(_)
        | Op::AvgPool(_)
        | Op::FusedBatchNorm { .. }
        | Op::Softmax
        | Op::LogSoftmax
        | Op::Reduce { .. }
        | Op::ArgMax
        | Op::ArgMin
        | Op::ExpandDims
        | Op::Squeeze
        | Op::Reshape
        | Op::Shape
        | Op::Size
        | Op::Rank
        | Op::StridedSlice
        | Op::Slice
        | Op::Pack
        | Op::Unpack
        | Op::Split
        | Op::SplitV
        | Op::ConcatV2
        | Op::Concat
        | Op::Pad
        | Op::PadV2
        | Op::MirrorPad
        | Op::Transpose
        | Op::Tile
        | Op::Fill
        | Op::ZerosLike
        | Op::OnesLike
        | Op::Range
        | Op::Cast
        | Op::Select
        | Op::SelectV2
        | Op::Random(_)
        | Op::Dequantize
        | Op::Quantize
        | Op::NoOp
        | Op::Assert
        | Op::SaveV2
        | Op::SpaceToBatchND
        | Op::BatchToSpaceND
        | Op::Other(_) => return None,
    };
    if k != 1 {
        return None;
    }
    match linear {
        Linear::Conv2D(_) => (rank == 4).then_some(Some(3)),
        Linear::Depthwise(_) => (rank == 4).then(|| (w.shape()[3] == 1).then_some(2)),
        Linear::MatMul(m) => {
            (rank == 2).then(|| per_channel_dense.then_some(if m.transpose_b { 0 } else { 1 }))
        }
    }
}

/// Whether input `k` of an op is the weight operand of a hybrid kernel.
fn hybrid_use(op: &Op, k: usize) -> bool {
    k == LinearKind::HYBRID_WEIGHTS && op.hybrid_candidate().is_some()
}

/// How the weights are read after quantization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightMode {
    /// Every quantized weight is read through a `Dequantize` (OPTIMIZE_FOR_SIZE).
    WeightOnly,
    /// Ops with hybrid kernels read their int8 weights directly; other uses go
    /// through a `Dequantize` (DEFAULT without calibration).
    DynamicRange,
}

/// What [`quantize_weights`] quantizes and how.
#[derive(Debug, Clone, Copy)]
pub struct WeightOptions<'a> {
    /// Constants with fewer elements stay float.
    pub min_elements: usize,
    /// Per-channel scales for `MatMul` weights (per-tensor otherwise).
    pub per_channel_dense: bool,
    /// Nodes whose weights stay float.
    pub exclude: &'a HashSet<String>,
    pub mode: WeightMode,
}

/// Quantizes the weight constants of `g` with at least `min_elements` elements;
/// with `hybrid`, the ops that have hybrid kernels read theirs without a
/// `Dequantize`.
pub fn quantize_weights(g: &Graph, opts: &WeightOptions) -> Result<(Graph, WeightReport)> {
    let WeightOptions {
        min_elements,
        per_channel_dense,
        exclude,
        mode,
    } = *opts;
    let hybrid = mode == WeightMode::DynamicRange;
    let index = g.index()?;
    let outputs: HashSet<&str> = g.outputs.iter().map(|r| r.node.as_str()).collect();
    // Constant → (axis, ok) from all its uses.
    let mut uses: HashMap<&str, Option<Option<usize>>> = HashMap::new();
    let mut blocked: HashSet<&str> = HashSet::new();
    // Constants with a use that is not a hybrid one.
    let mut not_hybrid: HashSet<&str> = HashSet::new();
    for n in &g.nodes {
        let op = Op::parse(n).ok();
        for (k, r) in n.inputs.iter().enumerate() {
            let Some(&ci) = index.get(r.node.as_str()) else {
                continue;
            };
            let Some(t) = g.nodes[ci].const_value() else {
                continue;
            };
            if t.dtype() != DType::F32 {
                continue;
            }
            if !op.as_ref().is_some_and(|op| hybrid_use(op, k)) {
                not_hybrid.insert(r.node.as_str());
            }
            match op
                .as_ref()
                .and_then(|op| weight_use(op, k, t, per_channel_dense))
            {
                Some(axis) if !exclude.contains(&n.name) => {
                    let e = uses.entry(r.node.as_str()).or_insert(Some(axis));
                    if *e != Some(axis) {
                        *e = Some(None);
                    }
                }
                _ => {
                    blocked.insert(r.node.as_str());
                }
            }
        }
    }
    let mut report = WeightReport::default();
    let mut renamed: HashMap<String, String> = HashMap::new();
    let mut names: HashSet<String> = g.nodes.iter().map(|n| n.name.clone()).collect();
    let mut out = g.clone();
    let mut added = Vec::new();
    for n in out.nodes.iter_mut() {
        let Some(Some(axis)) = uses.get(n.name.as_str()).copied() else {
            continue;
        };
        if blocked.contains(n.name.as_str())
            || exclude.contains(&n.name)
            || outputs.contains(n.name.as_str())
        {
            continue;
        }
        let Some(t) = n.const_value() else { continue };
        if t.len() < min_elements.max(1) {
            continue;
        }
        let (vals, q) = symmetric_weights(t, axis)?;
        report.tensors += 1;
        report.per_channel += usize::from(q.axis.is_some());
        report.bytes_before += t.byte_size();
        report.bytes_after += vals.byte_size();
        n.attrs.insert("dtype".into(), Attr::Type(DType::I8));
        n.attrs.insert("value".into(), Attr::Tensor(vals));
        n.output_quant.insert(0, q);
        if hybrid && !not_hybrid.contains(n.name.as_str()) {
            continue;
        }
        let mut name = format!("{}/dequantize", n.name);
        let mut k = 1;
        while names.contains(&name) {
            name = format!("{}/dequantize_{k}", n.name);
            k += 1;
        }
        names.insert(name.clone());
        let mut dq = Node::new(name.clone(), Op::Dequantize.name())
            .with_input(TensorRef::new(n.name.clone(), 0))
            .with_attr("T", Attr::Type(DType::I8))
            .with_attr("dtype", Attr::Type(DType::F32));
        dq.device = n.device.clone();
        added.push(dq);
        renamed.insert(n.name.clone(), name);
    }
    for n in out.nodes.iter_mut() {
        for r in n.inputs.iter_mut() {
            if let Some(d) = renamed.get(&r.node) {
                *r = TensorRef::new(d.clone(), r.index);
            }
        }
    }
    out.nodes.extend(added);
    if hybrid {
        let index = out.index()?;
        report.hybrid_ops = out
            .nodes
            .iter()
            .filter(|n| is_hybrid_node(&out, &index, n))
            .count();
    }
    Ok((out, report))
}
