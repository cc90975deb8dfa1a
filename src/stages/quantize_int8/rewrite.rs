//! Full-integer rewrite: decides which nodes compute in int8, gives every int8
//! tensor its parameters (calibrated ranges, TFLite's fixed output parameters, and
//! the same-scale constraints), and rewrites the graph with int8 weights, int32
//! biases and `Quantize`/`Dequantize` nodes at the float/int8 boundaries.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::calibration::{Range32, Stats};
use super::params::{
    asymmetric_params, bias_int32, quantize_with, symmetric_depthwise_weights, symmetric_weights,
};
use crate::error::{Error, Result};
use crate::ir::op::{Binary, Forward, Layout, Linear, Padding, Reduce, Unary};
use crate::ir::{Attr, DType, Graph, Node, Op, QuantParams, Tensor, TensorRef};

/// Options of [`quantize_full`].
#[derive(Debug, Clone, Default)]
pub struct FullOptions {
    /// Per-channel weights for `_FusedMatMul` (per tensor otherwise).
    pub per_channel_dense: bool,
    /// Nodes kept in float.
    pub exclude: HashSet<String>,
    /// Int8 model inputs and outputs (no float interface).
    pub int8_io: bool,
    /// 16x8: int16 activations, int64 biases (`activations = "int16"`).
    pub int16: bool,
    /// Nodes computed in 16x8 in an int8 model (the fallback's `to = "int16"`), with
    /// QUANTIZE bridges between the int8 and int16 tensors; a node with no 16x8
    /// kernel among them stays float.
    pub int16_nodes: HashSet<String>,
}

/// What [`quantize_full`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FullReport {
    pub int8_ops: usize,
    pub float_ops: usize,
    pub quantize_ops: usize,
    pub requantize_ops: usize,
    pub dequantize_ops: usize,
    /// Float compute nodes left, with the reason each could not be quantized.
    pub float_nodes: Vec<(String, String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Role {
    /// A float activation (or a float constant, quantized like one).
    Data,
    /// Symmetric int8 weights, per channel along the axis when there is one.
    Weight(Option<usize>),
    /// The int32 bias of a fused op.
    Bias,
    /// Shapes, axes, indices, paddings: left as they are.
    Aux,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Kind {
    /// Output parameters come from its calibrated range.
    Free,
    /// Inputs and output share parameters.
    Same,
    /// TFLite fixes the output parameters.
    Fixed(f32, i64),
    /// The output is not quantized (an index, as ARG_MAX gives).
    Unquantized,
}

pub(super) struct Spec {
    pub(super) kind: Kind,
    pub(super) roles: Vec<Role>,
}

/// The window forms the int8 conv and pool kernels have.
fn window_ok(padding: Padding, layout: Layout) -> bool {
    matches!(padding, Padding::Same | Padding::Valid) && layout == Layout::Nhwc
}

struct Ctx<'a> {
    g: &'a Graph,
    index: HashMap<&'a str, usize>,
    stats: &'a Stats,
}

impl<'a> Ctx<'a> {
    fn node_of(&self, r: &TensorRef) -> Option<&'a Node> {
        self.index.get(r.node.as_str()).map(|&i| &self.g.nodes[i])
    }

    fn const_f32(&self, r: &TensorRef) -> Option<&'a Tensor> {
        self.node_of(r)
            .and_then(Node::const_value)
            .filter(|t| t.dtype() == DType::F32 && r.index == 0)
    }

    fn is_float_activation(&self, r: &TensorRef) -> bool {
        self.stats.get(r).is_some()
    }

    fn data_ok(&self, r: &TensorRef) -> bool {
        self.is_float_activation(r) || self.const_f32(r).is_some()
    }
}

/// The int8 form of `n`, or why it has none.
fn spec(cx: &Ctx, n: &Node, per_channel_dense: bool) -> std::result::Result<Spec, String> {
    use Role::*;
    let ins = &n.inputs;
    let need_data = |idx: &[usize]| -> std::result::Result<(), String> {
        for &i in idx {
            let r = ins.get(i).ok_or_else(|| format!("has no input {i}"))?;
            if !cx.data_ok(r) {
                return Err(format!("input '{r}' is not a float tensor"));
            }
        }
        Ok(())
    };
    let weights = |i: usize, rank: usize| -> std::result::Result<&Tensor, String> {
        let t = ins
            .get(i)
            .and_then(|r| cx.const_f32(r))
            .ok_or_else(|| format!("input {i} is not a float32 constant"))?;
        if t.shape().len() != rank {
            return Err(format!("input {i} has shape {:?}", t.shape()));
        }
        Ok(t)
    };
    let op = Op::parse(n).map_err(|e| e.to_string())?;
    let no_kernel = || Err(format!("no int8 kernel for {}", n.op));
    let spec = match op {
        Op::Fused { linear, .. } => {
            if ins.len() != 3 {
                return Err("expects 3 inputs".into());
            }
            need_data(&[0])?;
            if cx.const_f32(&ins[0]).is_some() {
                return Err("its input is a constant".into());
            }
            let axis = match linear {
                Linear::Conv2D(c) => {
                    weights(1, 4)?;
                    if !window_ok(c.padding, c.layout) {
                        return Err("only SAME/VALID padding in NHWC has an int8 kernel".into());
                    }
                    Some(3)
                }
                Linear::Depthwise(c) => {
                    let w = weights(1, 4)?;
                    if !window_ok(c.padding, c.layout) {
                        return Err("only SAME/VALID padding in NHWC has an int8 kernel".into());
                    }
                    // Per output channel: along C when M = 1, else along C·M (see
                    // `symmetric_depthwise_weights`).
                    Some(if w.shape()[3] == 1 { 2 } else { 3 })
                }
                Linear::MatMul(m) => {
                    weights(1, 2)?;
                    if m.transpose_a {
                        return Err("FULLY_CONNECTED cannot transpose its input".into());
                    }
                    per_channel_dense.then_some(if m.transpose_b { 0 } else { 1 })
                }
            };
            if cx.const_f32(&ins[2]).is_none() {
                return Err("its bias is not a float32 constant".into());
            }
            Spec {
                kind: Kind::Free,
                roles: vec![Data, Weight(axis), Bias],
            }
        }
        // TRANSPOSE_CONV: output shape, filter `[h, w, out, in]` per output channel,
        // input, and the int32 bias `passes::fuse` folded in.
        Op::Conv2DBackpropInput(c) => {
            if !window_ok(c.padding, c.layout) || c.dilations != [1, 1] {
                return Err(
                    "only SAME/VALID padding in NHWC without dilation has an int8 kernel".into(),
                );
            }
            need_data(&[2])?;
            if cx.const_f32(&ins[2]).is_some() {
                return Err("its input is a constant".into());
            }
            weights(1, 4)?;
            let mut roles = vec![Aux, Weight(Some(2)), Data];
            if ins.len() == 4 {
                if cx.const_f32(&ins[3]).is_none() {
                    return Err("its bias is not a float32 constant".into());
                }
                roles.push(Bias);
            }
            Spec {
                kind: Kind::Free,
                roles,
            }
        }
        // The int8 resizes move or interpolate values in the input's parameters.
        Op::ResizeBilinear(_) | Op::ResizeNearestNeighbor(_) => {
            need_data(&[0])?;
            Spec {
                kind: Kind::Same,
                roles: vec![Data, Aux],
            }
        }
        Op::MaxPool(p) | Op::AvgPool(p) => {
            if !window_ok(p.padding, p.layout) {
                return Err("only SAME/VALID padding in NHWC has an int8 kernel".into());
            }
            need_data(&[0])?;
            Spec {
                kind: Kind::Same,
                roles: vec![Data],
            }
        }
        Op::Reshape | Op::ExpandDims => {
            need_data(&[0])?;
            Spec {
                kind: Kind::Same,
                roles: vec![Data, Aux],
            }
        }
        Op::Squeeze | Op::Forward(Forward::Identity) => {
            need_data(&[0])?;
            Spec {
                kind: Kind::Same,
                roles: vec![Data],
            }
        }
        Op::ConcatV2 => {
            let k = ins.len().saturating_sub(1);
            need_data(&(0..k).collect::<Vec<_>>())?;
            let mut roles = vec![Data; k];
            roles.push(Aux);
            Spec {
                kind: Kind::Same,
                roles,
            }
        }
        Op::GatherV2 => {
            need_data(&[0])?;
            if ins.get(1).is_some_and(|r| cx.is_float_activation(r)) {
                return Err("its indices are float".into());
            }
            if matches!(n.attr("batch_dims"), Some(Attr::Int(b)) if *b != 0) {
                return Err("batch_dims != 0".into());
            }
            Spec {
                kind: Kind::Same,
                roles: vec![Data, Aux, Aux],
            }
        }
        Op::Reduce {
            kind: Reduce::Max | Reduce::Min,
            ..
        }
        | Op::Pad => {
            need_data(&[0])?;
            Spec {
                kind: Kind::Same,
                roles: vec![Data, Aux],
            }
        }
        Op::Reduce {
            kind: Reduce::Mean | Reduce::Sum,
            ..
        } => {
            need_data(&[0])?;
            Spec {
                kind: Kind::Free,
                roles: vec![Data, Aux],
            }
        }
        Op::Binary(
            b @ (Binary::Add
            | Binary::AddV2
            | Binary::Sub
            | Binary::Mul
            | Binary::Maximum
            | Binary::Minimum),
        ) => {
            need_data(&[0, 1])?;
            if cx.const_f32(&ins[0]).is_some() && cx.const_f32(&ins[1]).is_some() {
                return Err("both inputs are constants".into());
            }
            Spec {
                kind: if matches!(b, Binary::Maximum | Binary::Minimum) {
                    Kind::Same
                } else {
                    Kind::Free
                },
                roles: vec![Data, Data],
            }
        }
        // LiteRT's int8 HARD_SWISH takes any output scale.
        Op::Unary(Unary::Relu | Unary::Relu6) | Op::HardSwish => {
            need_data(&[0])?;
            Spec {
                kind: Kind::Free,
                roles: vec![Data],
            }
        }
        // Element-wise ops with int8 kernels in LiteRT (tables, fixed-point RSQRT,
        // rescaling ABS and LEAKY_RELU), output parameters from calibration.
        Op::Unary(Unary::Exp | Unary::Log | Unary::Elu | Unary::Rsqrt | Unary::Abs)
        | Op::LeakyRelu
        | Op::Gelu { .. } => {
            need_data(&[0])?;
            Spec {
                kind: Kind::Free,
                roles: vec![Data],
            }
        }
        // PRELU's alpha is quantized per tensor like an activation constant.
        Op::Prelu | Op::Binary(Binary::SquaredDifference) | Op::BatchMatMul { .. } => {
            need_data(&[0, 1])?;
            if cx.const_f32(&ins[0]).is_some() && cx.const_f32(&ins[1]).is_some() {
                return Err("both inputs are constants".into());
            }
            Spec {
                kind: Kind::Free,
                roles: vec![Data, Data],
            }
        }
        // LiteRT's int8 L2_NORMALIZATION fixes its output to (1/128, 0).
        Op::L2Normalize => {
            need_data(&[0])?;
            Spec {
                kind: Kind::Fixed(1.0 / 128.0, 0),
                roles: vec![Data],
            }
        }
        Op::Softmax | Op::Unary(Unary::Sigmoid | Unary::Tanh) => {
            need_data(&[0])?;
            let kind = if op == Op::Unary(Unary::Tanh) {
                Kind::Fixed(1.0 / 128.0, 0)
            } else {
                Kind::Fixed(1.0 / 256.0, -128)
            };
            Spec {
                kind,
                roles: vec![Data],
            }
        }
        Op::Transpose
        | Op::Tile
        | Op::StridedSlice
        | Op::Slice
        | Op::Split
        | Op::SplitV
        | Op::Pack
        | Op::Unpack
        | Op::ZerosLike
        | Op::ArgMax
        | Op::ArgMin
        | Op::Fill
        | Op::Shape
        | Op::BiasAdd {
            layout: Layout::Nhwc,
            v1: false,
        } => super::movement::spec(n, &op, ins.len(), |i| need_data(&[i]))?,
        Op::Placeholder
        | Op::PlaceholderWithDefault
        | Op::Const
        | Op::Forward(
            Forward::StopGradient
            | Forward::Snapshot
            | Forward::CheckNumerics
            | Forward::PreventGradient
            | Forward::EnsureShape,
        )
        | Op::IdentityN
        | Op::Print
        | Op::Unary(
            Unary::Selu
            | Unary::Softplus
            | Unary::Sqrt
            | Unary::Square
            | Unary::Log1p
            | Unary::Neg
            | Unary::Floor
            | Unary::Ceil
            | Unary::Round
            | Unary::Rint
            | Unary::Sign
            | Unary::Reciprocal
            | Unary::Inv
            | Unary::Sin
            | Unary::Cos
            | Unary::Erf
            | Unary::LogicalNot,
        )
        | Op::Binary(
            Binary::RealDiv
            | Binary::Div
            | Binary::TruncateDiv
            | Binary::FloorDiv
            | Binary::FloorMod
            | Binary::Mod
            | Binary::Pow,
        )
        | Op::Compare(_)
        | Op::BiasAdd { .. }
        | Op::Conv2D(_)
        | Op::DepthwiseConv2dNative(_)
        | Op::MatMul(_)
        | Op::FusedBatchNorm { .. }
        | Op::LogSoftmax
        | Op::Reduce {
            kind: Reduce::Prod | Reduce::Any | Reduce::All,
            ..
        }
        | Op::Gather
        | Op::Size
        | Op::Rank
        | Op::Concat
        | Op::PadV2
        | Op::MirrorPad
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
        | Op::Other(_) => return no_kernel(),
    };
    if spec.roles.len() != ins.len() {
        return Err(format!(
            "expects {} inputs, has {}",
            spec.roles.len(),
            ins.len()
        ));
    }
    for (r, role) in ins.iter().zip(&spec.roles) {
        if *role == Data && cx.const_f32(r).is_none() && !cx.is_float_activation(r) {
            return Err(format!("input '{r}' is not a float tensor"));
        }
    }
    Ok(spec)
}

/// Union-find over tensor keys, each group with an optional fixed parameter pair.
#[derive(Default)]
struct Groups {
    parent: Vec<usize>,
    fixed: Vec<Option<(f32, i64)>>,
    ids: HashMap<String, usize>,
}

impl Groups {
    fn id(&mut self, key: &str) -> usize {
        if let Some(&i) = self.ids.get(key) {
            return i;
        }
        let i = self.parent.len();
        self.parent.push(i);
        self.fixed.push(None);
        self.ids.insert(key.to_string(), i);
        i
    }

    fn find(&mut self, mut i: usize) -> usize {
        while self.parent[i] != i {
            self.parent[i] = self.parent[self.parent[i]];
            i = self.parent[i];
        }
        i
    }

    /// Merges two groups unless both are fixed to different parameters.
    fn union(&mut self, a: usize, b: usize) -> bool {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra == rb {
            return true;
        }
        match (self.fixed[ra], self.fixed[rb]) {
            (Some(x), Some(y)) if x != y => false,
            (fa, fb) => {
                self.parent[rb] = ra;
                self.fixed[ra] = fa.or(fb);
                true
            }
        }
    }
}

fn key(r: &TensorRef) -> String {
    r.to_string()
}

fn const_key(consumer: &str, input: usize) -> String {
    format!("\u{0}const:{consumer}:{input}")
}

fn range_of(t: &Tensor) -> Result<Range32> {
    let (min, max) = super::params::finite_range(t)?;
    Ok(Range32 { min, max })
}

struct Names {
    used: HashSet<String>,
}

impl Names {
    fn fresh(&mut self, base: &str) -> String {
        let base = base.replace(':', "_");
        let mut name = base.clone();
        let mut k = 1;
        while self.used.contains(&name) {
            name = format!("{base}_{k}");
            k += 1;
        }
        self.used.insert(name.clone());
        name
    }
}

fn int8_const(name: String, values: Tensor, q: QuantParams) -> Node {
    let mut n = Node::constant(name, values);
    n.output_quant.insert(0, q);
    n
}

/// Quantizes `g` (already fused) to full int8 with the calibration `stats`.
pub fn quantize_full(g: &Graph, stats: &Stats, opts: &FullOptions) -> Result<(Graph, FullReport)> {
    let cx = Ctx {
        g,
        index: g.index()?,
        stats,
    };
    let order = g.topo_order()?;
    let mut report = FullReport::default();
    let wide = |name: &str| opts.int16 || opts.int16_nodes.contains(name);
    // A tensor read or written by an int16 node of a mixed model has its own
    // parameter group: `gk` keys it apart from the int8 tensor of the same value.
    let mixed = !opts.int16 && !opts.int16_nodes.is_empty();
    let gk = |r: &TensorRef, w: bool| {
        if w && mixed {
            format!("{}\u{0}16", key(r))
        } else {
            key(r)
        }
    };
    // 1. Which nodes run in int8.
    let mut specs: HashMap<usize, Spec> = HashMap::new();
    for &i in &order {
        let n = &g.nodes[i];
        if n.is_const() || n.op == Op::Placeholder.name() {
            continue;
        }
        if opts.exclude.contains(&n.name) {
            report
                .float_nodes
                .push((n.name.clone(), n.op.clone(), "excluded".into()));
            continue;
        }
        let s = spec(&cx, n, opts.per_channel_dense);
        let s = match (wide(&n.name), Op::parse(n)) {
            (true, Ok(op)) => {
                super::int16::spec(&op, s, n.inputs.first().is_some_and(|r| cx.data_ok(r)))
            }
            _ => s,
        };
        match s {
            Ok(s) => {
                specs.insert(i, s);
            }
            // Shape arithmetic on integers is not a float op left behind.
            Err(_) if !n.inputs.iter().any(|r| cx.data_ok(r)) => {}
            Err(why) => report.float_nodes.push((n.name.clone(), n.op.clone(), why)),
        }
    }
    // 2. Parameter groups.
    let mut groups = Groups::default();
    let mut requant: HashSet<(usize, usize)> = HashSet::new();
    let mut members: Vec<(usize, Range32)> = Vec::new();
    for &i in &order {
        let Some(s) = specs.get(&i) else { continue };
        let n = &g.nodes[i];
        let w = wide(&n.name);
        let out = groups.id(&gk(&TensorRef::new(n.name.clone(), 0), w));
        for k in 1..super::movement::outputs(n) {
            let id = groups.id(&gk(&TensorRef::new(n.name.clone(), k as u32), w));
            groups.union(out, id);
        }
        if s.kind == Kind::Unquantized {
        } else if let Kind::Fixed(sc, zp) = s.kind {
            let r = groups.find(out);
            groups.fixed[r] = Some((sc, zp));
        } else if let Some(r) = stats.get(&TensorRef::new(n.name.clone(), 0)) {
            members.push((out, r));
        }
        for (k, (r, role)) in n.inputs.iter().zip(&s.roles).enumerate() {
            if *role != Role::Data {
                continue;
            }
            let id = if let Some(t) = cx.const_f32(r) {
                let id = groups.id(&const_key(&n.name, k));
                members.push((id, range_of(t)?));
                id
            } else {
                let id = groups.id(&gk(r, w));
                if let Some(rg) = stats.get(r) {
                    members.push((id, rg));
                }
                id
            };
            // A fixed input (LOGISTIC, L2_NORMALIZATION) of a concatenation is
            // requantized rather than fixing the other inputs' parameters too.
            let several = matches!(Op::parse(n), Ok(Op::ConcatV2 | Op::Pack));
            if s.kind == Kind::Same {
                let root = groups.find(id);
                if several && groups.fixed[root].is_some() || !groups.union(out, id) {
                    requant.insert((i, k));
                }
            }
        }
    }
    let mut ranges: HashMap<usize, Range32> = HashMap::new();
    for (id, r) in members {
        let root = groups.find(id);
        let e = ranges.entry(root).or_insert(r);
        e.min = e.min.min(r.min);
        e.max = e.max.max(r.max);
    }
    let params_of = |groups: &mut Groups, k: &str, w: bool| -> Option<QuantParams> {
        let id = *groups.ids.get(k)?;
        let root = groups.find(id);
        if let Some((s, z)) = groups.fixed[root] {
            return Some(QuantParams::per_tensor(s, z));
        }
        let r = ranges
            .get(&root)
            .copied()
            .unwrap_or(Range32 { min: 0.0, max: 0.0 });
        Some(if w {
            super::int16::symmetric_params(r.min, r.max)
        } else {
            asymmetric_params(r.min, r.max)
        })
    };
    let act = super::int16::dtype(opts.int16);

    // 3. Rewrite.
    let mut names = Names {
        used: g.nodes.iter().map(|n| n.name.clone()).collect(),
    };
    // Tensors that are int8 in the new graph, with their parameters.
    let mut int8_tensors: HashMap<String, QuantParams> = HashMap::new();
    // Their type: `act`, or int16 for the outputs of int16 nodes of a mixed model.
    let mut dtype_of: HashMap<String, DType> = HashMap::new();
    let mut new_nodes: Vec<Node> = Vec::new();
    let mut quantized_of: HashMap<String, TensorRef> = HashMap::new();
    let mut dequantized_of: HashMap<String, TensorRef> = HashMap::new();
    let mut weight_cache: HashMap<(String, Option<usize>), (TensorRef, QuantParams)> =
        HashMap::new();
    let consumers = g.consumers();

    for &i in &order {
        let n = &g.nodes[i];
        if n.op == Op::Placeholder.name() {
            let mut p = n.clone();
            let k = key(&TensorRef::new(n.name.clone(), 0));
            let float = matches!(n.attr("dtype"), Some(Attr::Type(DType::F32)));
            if opts.int8_io && float {
                if let Some(q) = params_of(&mut groups, &k, opts.int16) {
                    p.attrs.insert("dtype".into(), Attr::Type(act));
                    p.output_quant.insert(0, q.clone());
                    int8_tensors.insert(k, q);
                }
            }
            new_nodes.push(p);
            continue;
        }
        if n.is_const() {
            new_nodes.push(n.clone());
            continue;
        }
        let Some(s) = specs.get(&i) else {
            // A float node: int8 inputs are dequantized first.
            let mut f = n.clone();
            for r in f.inputs.iter_mut() {
                let k = key(r);
                if int8_tensors.contains_key(&k) {
                    let t = dtype_of.get(&k).copied().unwrap_or(act);
                    let dq = dequantized_of.entry(k.clone()).or_insert_with(|| {
                        let name = names.fresh(&format!("{k}/dequantize"));
                        let mut d = Node::new(name.clone(), Op::Dequantize.name())
                            .with_input(r.clone())
                            .with_attr("T", Attr::Type(t))
                            .with_attr("dtype", Attr::Type(DType::F32));
                        d.device = n.device.clone();
                        new_nodes.push(d);
                        report.dequantize_ops += 1;
                        TensorRef::new(name, 0)
                    });
                    *r = dq.clone();
                }
            }
            new_nodes.push(f);
            continue;
        };
        let w = wide(&n.name);
        let node_act = super::int16::dtype(w);
        let out_key = key(&TensorRef::new(n.name.clone(), 0));
        let out_q = params_of(&mut groups, &gk(&TensorRef::new(n.name.clone(), 0), w), w)
            .ok_or_else(|| Error::msg(format!("node '{}' has no output parameters", n.name)))?;
        let mut q = n.clone();
        let mut in_scale = None;
        for (k, role) in s.roles.iter().enumerate() {
            let r = n.inputs[k].clone();
            match role {
                Role::Aux => {}
                Role::Data => {
                    if let Some(t) = cx.const_f32(&r) {
                        let ck = const_key(&n.name, k);
                        let p = params_of(&mut groups, &ck, w).unwrap_or_else(|| out_q.clone());
                        let sole = consumers.get(&r.node).is_some_and(|c| c.len() == 1);
                        let name = if sole {
                            r.node.clone()
                        } else {
                            names.fresh(&format!("{}/int8", r.node))
                        };
                        let vals = if w {
                            super::int16::quantize_const(t, p.scale[0])?
                        } else {
                            quantize_with(t, p.scale[0], p.zero_point[0])?
                        };
                        new_nodes.retain(|x| x.name != name);
                        let mut c = int8_const(name.clone(), vals, p.clone());
                        if let Some(orig) = cx.node_of(&r) {
                            c.device = orig.device.clone();
                        }
                        new_nodes.push(c);
                        q.inputs[k] = TensorRef::new(name, 0);
                        if in_scale.is_none() {
                            in_scale = Some(p.scale[0]);
                        }
                        continue;
                    }
                    let tk = key(&r);
                    let want = if requant.contains(&(i, k)) {
                        out_q.clone()
                    } else {
                        params_of(&mut groups, &gk(&r, w), w).unwrap_or_else(|| out_q.clone())
                    };
                    let src = if let Some(have) = int8_tensors.get(&tk) {
                        let have_t = dtype_of.get(&tk).copied().unwrap_or(act);
                        if *have == want && have_t == node_act {
                            r.clone()
                        } else {
                            // Between int8 and int16 too: LiteRT's QUANTIZE converts
                            // both ways (tests/int16_kernels_litert.rs).
                            let name = names.fresh(&format!("{tk}/requantize"));
                            let mut rq = Node::new(name.clone(), Op::Quantize.name())
                                .with_input(r.clone())
                                .with_attr("T", Attr::Type(have_t))
                                .with_attr("dtype", Attr::Type(node_act));
                            rq.output_quant.insert(0, want.clone());
                            new_nodes.push(rq);
                            report.requantize_ops += 1;
                            TensorRef::new(name, 0)
                        }
                    } else {
                        quantized_of
                            .entry(format!(
                                "{tk}@{:e}/{}/{node_act:?}",
                                want.scale[0], want.zero_point[0]
                            ))
                            .or_insert_with(|| {
                                let name = names.fresh(&format!("{tk}/quantize"));
                                let mut qn = Node::new(name.clone(), Op::Quantize.name())
                                    .with_input(r.clone())
                                    .with_attr("T", Attr::Type(DType::F32))
                                    .with_attr("dtype", Attr::Type(node_act));
                                qn.output_quant.insert(0, want.clone());
                                new_nodes.push(qn);
                                report.quantize_ops += 1;
                                TensorRef::new(name, 0)
                            })
                            .clone()
                    };
                    q.inputs[k] = src;
                    if in_scale.is_none() {
                        in_scale = Some(want.scale[0]);
                    }
                }
                Role::Weight(axis) => {
                    let t = cx
                        .const_f32(&r)
                        .ok_or_else(|| Error::msg(format!("weights '{r}' are not constant")))?;
                    let ck = (r.node.clone(), *axis);
                    let (wr, _) = match weight_cache.get(&ck) {
                        Some(v) => v.clone(),
                        None => {
                            let depthwise = matches!(
                                Op::parse(n),
                                Ok(Op::Fused {
                                    linear: Linear::Depthwise(_),
                                    ..
                                })
                            );
                            let (vals, p) = if depthwise && *axis == Some(3) {
                                symmetric_depthwise_weights(t)?
                            } else {
                                symmetric_weights(t, *axis)?
                            };
                            let sole = consumers.get(&r.node).is_some_and(|c| c.len() == 1);
                            let name = if sole {
                                r.node.clone()
                            } else {
                                names.fresh(&format!("{}/int8", r.node))
                            };
                            let mut c = int8_const(name.clone(), vals, p.clone());
                            if let Some(orig) = cx.node_of(&r) {
                                c.device = orig.device.clone();
                            }
                            new_nodes.retain(|x| x.name != name);
                            new_nodes.push(c);
                            let v = (TensorRef::new(name, 0), p);
                            weight_cache.insert(ck.clone(), v.clone());
                            v
                        }
                    };
                    q.inputs[k] = wr;
                }
                Role::Bias => {}
            }
        }
        if let Some(bk) = s.roles.iter().position(|r| *r == Role::Bias) {
            let r = n.inputs[bk].clone();
            let t = cx
                .const_f32(&r)
                .ok_or_else(|| Error::msg(format!("bias '{r}' is not constant")))?;
            let wk = s
                .roles
                .iter()
                .position(|r| matches!(r, Role::Weight(_)))
                .unwrap_or(1);
            let wq = weight_cache
                .get(&(
                    n.inputs[wk].node.clone(),
                    match s.roles[wk] {
                        Role::Weight(a) => a,
                        _ => None,
                    },
                ))
                .map(|v| v.1.clone())
                .ok_or_else(|| Error::msg("weights were not quantized before the bias"))?;
            let s_in = in_scale.ok_or_else(|| Error::msg("no input scale for the bias"))?;
            let b = t.values::<f32>()?;
            let (vals, bq) = if w {
                let (v, q) = super::int16::bias_int64(&b, s_in, &wq.scale);
                (Tensor::from_vec(t.shape().to_vec(), &v), q)
            } else {
                let (v, q) = bias_int32(&b, s_in, &wq.scale);
                (Tensor::from_vec(t.shape().to_vec(), &v), q)
            };
            let sole = consumers.get(&r.node).is_some_and(|c| c.len() == 1);
            let name = if sole {
                r.node.clone()
            } else {
                names.fresh(&format!("{}/{}", r.node, if w { "int64" } else { "int32" }))
            };
            new_nodes.retain(|x| x.name != name);
            let mut b = Node::constant(name.clone(), vals);
            b.output_quant.insert(0, bq);
            new_nodes.push(b);
            q.inputs[bk] = TensorRef::new(name, 0);
        }
        for key_name in ["T", "Tparams"] {
            if q.attrs.contains_key(key_name) {
                q.attrs.insert(key_name.into(), Attr::Type(node_act));
            }
        }
        if s.kind != Kind::Unquantized {
            for k in 1..super::movement::outputs(n) {
                let r = TensorRef::new(n.name.clone(), k as u32);
                q.output_quant.insert(k as u32, out_q.clone());
                dtype_of.insert(key(&r), node_act);
                int8_tensors.insert(key(&r), out_q.clone());
            }
            q.output_quant.insert(0, out_q.clone());
            dtype_of.insert(out_key.clone(), node_act);
            int8_tensors.insert(out_key, out_q);
        }
        new_nodes.push(q);
        report.int8_ops += 1;
    }
    // Constants replaced in place by their int8 form are pushed twice above; keep the
    // last (quantized) one.
    let mut seen = HashSet::new();
    let mut dedup = Vec::with_capacity(new_nodes.len());
    for n in new_nodes.into_iter().rev() {
        if seen.insert(n.name.clone()) {
            dedup.push(n);
        }
    }
    dedup.reverse();
    let mut out = g.clone();
    out.nodes = dedup;
    // Graph outputs: dequantized unless the interface is int8.
    let mut outputs = Vec::new();
    for r in &g.outputs {
        let k = key(r);
        if int8_tensors.contains_key(&k) && !opts.int8_io {
            let t = dtype_of.get(&k).copied().unwrap_or(act);
            let d = match dequantized_of.get(&k) {
                Some(d) => d.clone(),
                None => {
                    let name = names.fresh(&format!("{k}/dequantize"));
                    out.nodes.push(
                        Node::new(name.clone(), Op::Dequantize.name())
                            .with_input(r.clone())
                            .with_attr("T", Attr::Type(t))
                            .with_attr("dtype", Attr::Type(DType::F32)),
                    );
                    report.dequantize_ops += 1;
                    TensorRef::new(name, 0)
                }
            };
            outputs.push(d);
        } else {
            outputs.push(r.clone());
        }
    }
    out.outputs = outputs;
    out.prune_to_outputs()?;
    report.float_ops = out
        .nodes
        .iter()
        .filter(|n| {
            !matches!(
                Op::parse(n),
                Ok(Op::Const | Op::Placeholder | Op::Quantize | Op::Dequantize)
            ) && !n.output_quant.contains_key(&0)
        })
        .count();
    report
        .float_nodes
        .retain(|(name, _, _)| out.nodes.iter().any(|n| &n.name == name));
    Ok((out, report))
}

/// The quantized tensors of a graph: name → parameters (for reports).
pub fn quantized_tensors(g: &Graph) -> BTreeMap<String, QuantParams> {
    g.nodes
        .iter()
        .filter(|n| !n.is_const())
        .filter_map(|n| n.output_quant.get(&0).map(|q| (n.name.clone(), q.clone())))
        .collect()
}

/// How `quantize_int8` treats an op, whatever its graph: the op-level answer of
/// [`spec`] (which also checks inputs, windows and constants per node).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int8Form {
    /// int8 under `DEFAULT` with calibration and `OPTIMIZE_FOR_LATENCY` (a matrix op
    /// after fusing the bias add that follows it); `hybrid`: under dynamic range its
    /// weights are int8 and its input is quantized at run time.
    Int8 { hybrid: bool },
    /// Computes in float only: stays float with QUANTIZE/DEQUANTIZE around it under
    /// `DEFAULT`, and is an error under `OPTIMIZE_FOR_LATENCY`.
    Float,
    /// Computes nothing quantize_int8 sees: constants, inputs, forwarding, shape
    /// arithmetic and batch norms folded by `strip_training`, training-only ops.
    NotComputed,
}

/// [`Int8Form`] of `op` (one exhaustive match, kept beside [`spec`]'s).
pub fn int8_form(op: &Op) -> Int8Form {
    let int8 = Int8Form::Int8 { hybrid: false };
    match op {
        Op::Fused { linear, .. } => Int8Form::Int8 {
            hybrid: linear.kind().has_hybrid_kernel(),
        },
        // A `BatchMatMul` by a constant matrix becomes a fully connected layer.
        Op::Conv2D(_) | Op::MatMul(_) | Op::BatchMatMul { .. } => Int8Form::Int8 { hybrid: true },
        Op::DepthwiseConv2dNative(_) | Op::BiasAdd { v1: false, .. } => int8,
        Op::MaxPool(_)
        | Op::AvgPool(_)
        | Op::Reshape
        | Op::ExpandDims
        | Op::Squeeze
        | Op::Forward(Forward::Identity)
        | Op::ConcatV2
        | Op::GatherV2
        | Op::Pad
        | Op::Reduce {
            kind: Reduce::Max | Reduce::Min | Reduce::Mean | Reduce::Sum,
            ..
        }
        | Op::Binary(
            Binary::Add
            | Binary::AddV2
            | Binary::Sub
            | Binary::Mul
            | Binary::Maximum
            | Binary::Minimum,
        )
        | Op::Unary(
            Unary::Relu
            | Unary::Relu6
            | Unary::Sigmoid
            | Unary::Tanh
            | Unary::Exp
            | Unary::Log
            | Unary::Elu
            | Unary::Rsqrt
            | Unary::Abs,
        )
        | Op::Binary(Binary::SquaredDifference)
        | Op::LeakyRelu
        | Op::Gelu { .. }
        | Op::Prelu
        | Op::L2Normalize
        | Op::Softmax
        | Op::Transpose
        | Op::Tile
        | Op::StridedSlice
        | Op::Slice
        | Op::Split
        | Op::SplitV
        | Op::Pack
        | Op::Unpack
        | Op::ZerosLike
        | Op::ArgMax
        | Op::ArgMin
        | Op::Fill
        | Op::HardSwish
        | Op::Conv2DBackpropInput(_)
        | Op::ResizeBilinear(_)
        | Op::ResizeNearestNeighbor(_) => int8,
        Op::Placeholder
        | Op::PlaceholderWithDefault
        | Op::Const
        | Op::Forward(_)
        | Op::IdentityN
        | Op::Print
        | Op::FusedBatchNorm { .. }
        | Op::Shape
        | Op::Size
        | Op::Rank
        | Op::Random(_)
        | Op::Dequantize
        | Op::Quantize
        | Op::NoOp
        | Op::Assert
        | Op::SaveV2 => Int8Form::NotComputed,
        Op::Unary(_)
        | Op::Binary(_)
        | Op::Compare(_)
        | Op::BiasAdd { v1: true, .. }
        | Op::LogSoftmax
        | Op::Reduce { .. }
        | Op::Gather
        | Op::Concat
        | Op::PadV2
        | Op::MirrorPad
        | Op::OnesLike
        | Op::Range
        | Op::Cast
        | Op::Select
        | Op::SelectV2
        | Op::SpaceToBatchND
        | Op::BatchToSpaceND
        | Op::Other(_) => Int8Form::Float,
    }
}
