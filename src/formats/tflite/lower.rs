//! IR graph → TFLite [`Model`]: picks builtin operators, fuses biases and
//! activations where TFLite fuses them, converts weight layouts, and gives every
//! tensor its TFLite shape.
//!
//! The graph is a frozen inference graph (after `strip_training`). Conventions
//! for constants that are not float32:
//! - a float16 `Const` read through `Cast` (to float32) or `Dequantize` is
//!   stored as a FLOAT16 tensor followed by a DEQUANTIZE operator, as the TFLite
//!   converter writes float16 models;
//! - a `Const` with `output_quant` (int8 weights, int32 biases) is written with
//!   its scales and zero points; through a `Dequantize` node it is stored int8
//!   and dequantized at run time. Per-axis `axis` refers to the TF layout of the
//!   weight and is moved with the data to TFLite's layout: Conv2D HWIO axis 3
//!   → OHWI axis 0; depthwise HWCM axis 3 with C·M scales (or axis 2 when
//!   M = 1) → 1HW(C·M) axis 3; MatMul `[in, out]` axis 1 → `[out, in]` axis 0.
//!   Biases are int32 per-axis along axis 0.
//! - `Quantize` (attribute `dtype`, e.g. int8) becomes QUANTIZE and
//!   `Dequantize` of a runtime tensor DEQUANTIZE; runtime tensors take their
//!   dtype from shape inference and their scales and zero points from the
//!   producing node's `output_quant`. Operator versions follow from the tensor
//!   types (int8 CONV_2D is version 3, hybrid float-in/int8-weight 2 or 5, ...).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

mod movement;

use super::model::{Activation, ConvOptions, Model, Op, Operator, Padding, PoolOptions, TensorDef};
use crate::error::{Error, Result};
use crate::ir::op::{Binary, Compare, Forward, Linear, Padding as IrPadding, Reduce, Unary};
use crate::ir::shape_infer::{infer_shapes, TensorInfo};
use crate::ir::{
    Attr, DType, FusedActivation, Graph, Node, Op as IrOp, QuantParams, Tensor, TensorRef,
};

/// Description written into every model qpipe exports.
pub const DESCRIPTION: &str = "qpipe";

/// What an IR tensor is once lowered.
#[derive(Debug, Clone)]
enum Value {
    /// A TFLite tensor computed at run time (or a subgraph input).
    Runtime(i32),
    /// A constant known at export time.
    Const(Tensor, Option<QuantParams>),
    /// A constant stored in a compact type (float16, int8) and dequantized to float32 at run time.
    /// The last field names the constant the data comes from.
    Stored(Tensor, Option<QuantParams>, String),
}

/// How a weight constant's data is rearranged for its TFLite operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Layout {
    AsIs,
    /// Conv2D filter HWIO → OHWI.
    Ohwi,
    /// Depthwise filter HWCM → 1HW(C·M).
    Depthwise,
    /// MatMul `[in, out]` → FULLY_CONNECTED `[out, in]`.
    Transposed,
    /// Conv2DBackpropInput filter `[h, w, out, in]` → TRANSPOSE_CONV `[out, h, w, in]`.
    TransposeConv,
}

/// Lowers `graph` to a TFLite model. An op with no TFLite equivalent, or a
/// pattern qpipe cannot express, is an error naming the node and op.
pub fn lower(graph: &Graph) -> Result<Model> {
    let (graph, _) = crate::ir::passes::patterns::rewrite(graph)?;
    Lowerer::new(&graph)?.run()
}

struct Lowerer<'g> {
    graph: &'g Graph,
    /// The typed op of each node, by position.
    ops: Vec<IrOp>,
    index: HashMap<&'g str, usize>,
    infos: HashMap<TensorRef, TensorInfo>,
    /// Needed nodes reading each tensor (data edges).
    consumers: HashMap<TensorRef, Vec<usize>>,
    outputs: HashSet<TensorRef>,
    needed: Vec<bool>,
    values: HashMap<TensorRef, Value>,
    /// Constant tensors already written, by source tensor and layout.
    materialized: HashMap<(TensorRef, Layout), i32>,
    /// Nodes already emitted as part of a fused operator.
    absorbed: HashSet<usize>,
    /// A TRANSPOSE_CONV's output shape was written for batch 1 (see `lower_transpose_conv`).
    batch_one: bool,
    model: Model,
}

fn node_err(node: &Node, msg: impl std::fmt::Display) -> Error {
    Error::msg(format!("node '{}' ({}): {msg}", node.name, node.op))
}

/// Ops that, given constant inputs, give a constant without computing anything.
fn const_like(op: &IrOp) -> bool {
    match op {
        IrOp::Const
        | IrOp::Forward(Forward::Identity | Forward::StopGradient | Forward::Snapshot)
        | IrOp::Cast
        | IrOp::Dequantize
        | IrOp::Reshape
        | IrOp::ExpandDims
        | IrOp::Squeeze => true,
        IrOp::Forward(Forward::CheckNumerics | Forward::PreventGradient | Forward::EnsureShape)
        | IrOp::Placeholder
        | IrOp::PlaceholderWithDefault
        | IrOp::IdentityN
        | IrOp::Print
        | IrOp::Unary(_)
        | IrOp::LeakyRelu
        | IrOp::Binary(_)
        | IrOp::Compare(_)
        | IrOp::BiasAdd { .. }
        | IrOp::Conv2D(_)
        | IrOp::DepthwiseConv2dNative(_)
        | IrOp::MatMul(_)
        | IrOp::BatchMatMul { .. }
        | IrOp::MaxPool(_)
        | IrOp::AvgPool(_)
        | IrOp::FusedBatchNorm { .. }
        | IrOp::Softmax
        | IrOp::LogSoftmax
        | IrOp::Reduce { .. }
        | IrOp::ArgMax
        | IrOp::ArgMin
        | IrOp::Gather
        | IrOp::GatherV2
        | IrOp::Shape
        | IrOp::Size
        | IrOp::Rank
        | IrOp::StridedSlice
        | IrOp::Slice
        | IrOp::Pack
        | IrOp::Unpack
        | IrOp::Split
        | IrOp::SplitV
        | IrOp::ConcatV2
        | IrOp::Concat
        | IrOp::Pad
        | IrOp::PadV2
        | IrOp::MirrorPad
        | IrOp::Transpose
        | IrOp::Tile
        | IrOp::Fill
        | IrOp::ZerosLike
        | IrOp::OnesLike
        | IrOp::Range
        | IrOp::Select
        | IrOp::SelectV2
        | IrOp::Random(_)
        | IrOp::Quantize
        | IrOp::Fused { .. }
        | IrOp::Gelu { .. }
        | IrOp::Prelu
        | IrOp::L2Normalize
        | IrOp::NoOp
        | IrOp::Assert
        | IrOp::SaveV2
        | IrOp::SpaceToBatchND
        | IrOp::HardSwish
        | IrOp::Conv2DBackpropInput(_)
        | IrOp::ResizeBilinear(_)
        | IrOp::ResizeNearestNeighbor(_)
        | IrOp::BatchToSpaceND
        | IrOp::Other(_) => false,
    }
}

/// The inputs of `node` whose values it needs at run time; the others (axes,
/// target shapes, paddings) are read from shape inference at export time.
fn runtime_inputs(node: &Node, op: &IrOp) -> Vec<usize> {
    let n = node.inputs.len();
    // A transposed convolution's output shape (input 0) is read from shape inference;
    // the filter, the input and a fused bias are operands.
    if let IrOp::Conv2DBackpropInput(_) = op {
        return (1..n.min(4)).collect();
    }
    let k = match op {
        IrOp::Reshape
        | IrOp::ExpandDims
        | IrOp::Reduce {
            kind: Reduce::Max | Reduce::Min | Reduce::Sum | Reduce::Mean,
            ..
        }
        | IrOp::Pad
        | IrOp::PadV2 => 1,
        IrOp::ConcatV2 => n.saturating_sub(1),
        IrOp::GatherV2 => 2,
        IrOp::Shape | IrOp::Size | IrOp::Rank => 0,
        IrOp::Reduce {
            kind: Reduce::Prod | Reduce::Any | Reduce::All,
            ..
        }
        | IrOp::Placeholder
        | IrOp::PlaceholderWithDefault
        | IrOp::Const
        | IrOp::Forward(_)
        | IrOp::IdentityN
        | IrOp::Print
        | IrOp::Unary(_)
        | IrOp::LeakyRelu
        | IrOp::Binary(_)
        | IrOp::Compare(_)
        | IrOp::BiasAdd { .. }
        | IrOp::Conv2D(_)
        | IrOp::DepthwiseConv2dNative(_)
        | IrOp::MatMul(_)
        | IrOp::BatchMatMul { .. }
        | IrOp::MaxPool(_)
        | IrOp::AvgPool(_)
        | IrOp::FusedBatchNorm { .. }
        | IrOp::Softmax
        | IrOp::LogSoftmax
        | IrOp::ArgMax
        | IrOp::ArgMin
        | IrOp::Gather
        | IrOp::Squeeze
        | IrOp::StridedSlice
        | IrOp::Slice
        | IrOp::Pack
        | IrOp::Unpack
        | IrOp::Split
        | IrOp::SplitV
        | IrOp::Concat
        | IrOp::MirrorPad
        | IrOp::Transpose
        | IrOp::Tile
        | IrOp::Fill
        | IrOp::ZerosLike
        | IrOp::OnesLike
        | IrOp::Range
        | IrOp::Cast
        | IrOp::Select
        | IrOp::SelectV2
        | IrOp::Random(_)
        | IrOp::Dequantize
        | IrOp::Quantize
        | IrOp::Fused { .. }
        | IrOp::Gelu { .. }
        | IrOp::Prelu
        | IrOp::L2Normalize
        | IrOp::NoOp
        | IrOp::Assert
        | IrOp::SaveV2
        | IrOp::SpaceToBatchND
        | IrOp::HardSwish
        | IrOp::Conv2DBackpropInput(_)
        | IrOp::ResizeBilinear(_)
        | IrOp::ResizeNearestNeighbor(_)
        | IrOp::BatchToSpaceND
        | IrOp::Other(_) => n,
    };
    (0..k.min(n)).collect()
}

impl<'g> Lowerer<'g> {
    fn new(graph: &'g Graph) -> Result<Lowerer<'g>> {
        let index = graph.index()?;
        let infos = infer_shapes(graph)?;
        let ops = graph
            .nodes
            .iter()
            .map(IrOp::parse)
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let outputs: HashSet<TensorRef> = graph.outputs.iter().cloned().collect();
        if outputs.is_empty() {
            return Err(Error::msg("the graph declares no outputs"));
        }
        let mut needed = vec![false; graph.nodes.len()];
        let mut stack: Vec<usize> = Vec::new();
        for r in &graph.outputs {
            let i = *index
                .get(r.node.as_str())
                .ok_or_else(|| Error::msg(format!("output '{r}' is not a node of the graph")))?;
            stack.push(i);
        }
        let mut is_input = vec![false; graph.nodes.len()];
        for name in &graph.inputs {
            let i = *index
                .get(name.as_str())
                .ok_or_else(|| Error::msg(format!("input '{name}' is not a node of the graph")))?;
            is_input[i] = true;
            needed[i] = true;
        }
        // Walk back from the outputs through the inputs each node reads at run
        // time; declared inputs end the walk (a PlaceholderWithDefault input
        // does not read its default).
        let mut visited = vec![false; graph.nodes.len()];
        let mut consumers: HashMap<TensorRef, Vec<usize>> = HashMap::new();
        while let Some(i) = stack.pop() {
            if std::mem::replace(&mut visited[i], true) {
                continue;
            }
            needed[i] = true;
            if is_input[i] {
                continue;
            }
            let node = &graph.nodes[i];
            for k in runtime_inputs(node, &ops[i]) {
                let r = &node.inputs[k];
                consumers.entry(r.clone()).or_default().push(i);
                let j = *index.get(r.node.as_str()).ok_or_else(|| {
                    node_err(node, format!("input '{r}' is not a node of the graph"))
                })?;
                if !visited[j] {
                    stack.push(j);
                }
            }
        }
        Ok(Lowerer {
            graph,
            ops,
            index,
            infos,
            consumers,
            outputs,
            needed,
            values: HashMap::new(),
            materialized: HashMap::new(),
            absorbed: HashSet::new(),
            batch_one: false,
            model: Model {
                description: DESCRIPTION.to_string(),
                ..Model::default()
            },
        })
    }

    fn run(mut self) -> Result<Model> {
        let graph = self.graph;
        let declared: Vec<usize> = if graph.inputs.is_empty() {
            (0..graph.nodes.len())
                .filter(|&i| self.needed[i] && self.ops[i] == IrOp::Placeholder)
                .collect()
        } else {
            graph
                .inputs
                .iter()
                .map(|n| self.index[n.as_str()])
                .collect()
        };
        for &i in &declared {
            let node = &graph.nodes[i];
            let r = TensorRef::new(node.name.clone(), 0);
            let t = self.runtime_tensor(node, &r)?;
            self.values.insert(r, Value::Runtime(t));
            self.model.inputs.push((node.name.clone(), t));
        }
        let inputs: HashSet<usize> = declared.into_iter().collect();
        let order = graph.topo_order()?;
        // Constants first (and what only reshapes, casts or passes them on), so
        // that fusing a bias never depends on where its node sits in the graph.
        for &i in &order {
            let node = &graph.nodes[i];
            if !self.needed[i] || inputs.contains(&i) || !const_like(&self.ops[i]) {
                continue;
            }
            let all_const = runtime_inputs(node, &self.ops[i]).into_iter().all(|k| {
                matches!(
                    self.values.get(&node.inputs[k]),
                    Some(Value::Const(..)) | Some(Value::Stored(..))
                )
            });
            if all_const {
                self.lower_node(i, node)
                    .map_err(|e| e.context(format!("node '{}' ({})", node.name, node.op)))?;
            }
        }
        for i in order {
            let done = self
                .values
                .contains_key(&TensorRef::new(graph.nodes[i].name.clone(), 0));
            if !self.needed[i] || inputs.contains(&i) || self.absorbed.contains(&i) || done {
                continue;
            }
            let node = &graph.nodes[i];
            self.lower_node(i, node)
                .map_err(|e| e.context(format!("node '{}' ({})", node.name, node.op)))?;
        }
        for r in &graph.outputs {
            let t = match self.values.get(r).cloned() {
                Some(Value::Runtime(t)) => t,
                Some(Value::Stored(..)) => self.input(r, Layout::AsIs)?,
                Some(Value::Const(..)) => {
                    return Err(Error::msg(format!(
                        "output '{r}' is a constant; a TFLite model needs a computed output"
                    )))
                }
                None => return Err(Error::msg(format!("output '{r}' was not lowered"))),
            };
            self.model.outputs.push((r.to_string(), t));
        }
        if self.batch_one {
            // The file runs at batch 1 only: say so in the signatures, as the
            // converter's file does, rather than let a runtime resize the batch.
            for t in &mut self.model.tensors {
                if let Some(sig) = &mut t.shape_signature {
                    if sig.first() == Some(&-1) {
                        sig[0] = 1;
                    }
                    if sig.iter().all(|&d| d >= 0) {
                        t.shape_signature = None;
                    }
                }
            }
        }
        movement::tidy(&mut self.model);
        if self.model.operators.iter().any(|op| {
            op.op == Op::Dequantize && self.tensor_dtype(op.inputs[0]) == Some(DType::F16)
        }) {
            self.model
                .metadata
                .push(("reduced_precision_support".into(), b"fp16accfp32".to_vec()));
        }
        Ok(self.model)
    }

    fn tensor_dtype(&self, t: i32) -> Option<DType> {
        self.model.tensor(t).map(|t| t.dtype)
    }

    fn info(&self, node: &Node, r: &TensorRef) -> Result<&TensorInfo> {
        self.infos
            .get(r)
            .ok_or_else(|| node_err(node, format!("no shape was inferred for '{r}'")))
    }

    /// A new runtime tensor for IR tensor `r` (named after it).
    fn runtime_tensor(&mut self, node: &Node, r: &TensorRef) -> Result<i32> {
        let info = self.info(node, r)?.clone();
        let producer = &self.graph.nodes[self.index[r.node.as_str()]];
        let quant = producer.output_quant.get(&r.index).cloned();
        self.add_tensor(node, r.to_string(), info.dtype, &info.shape, None, quant)
    }

    fn add_tensor(
        &mut self,
        node: &Node,
        name: String,
        dtype: DType,
        dims: &[i64],
        data: Option<Arc<[u8]>>,
        quant: Option<QuantParams>,
    ) -> Result<i32> {
        if matches!(dtype, DType::String | DType::Resource | DType::Variant) {
            return Err(node_err(
                node,
                format!("{dtype} tensors cannot be exported"),
            ));
        }
        let mut shape = Vec::with_capacity(dims.len());
        for &d in dims {
            shape.push(if d < 0 {
                1
            } else {
                i32::try_from(d)
                    .map_err(|_| node_err(node, format!("dimension {d} is too large")))?
            });
        }
        let shape_signature = dims.iter().any(|&d| d < 0).then(|| {
            dims.iter()
                .map(|&d| if d < 0 { -1 } else { d as i32 })
                .collect()
        });
        let index = i32::try_from(self.model.tensors.len())
            .map_err(|_| node_err(node, "too many tensors"))?;
        self.model.tensors.push(TensorDef {
            name,
            dtype,
            shape,
            shape_signature,
            data,
            quant,
        });
        Ok(index)
    }

    fn add_op(&mut self, op: Op, inputs: Vec<i32>, outputs: Vec<i32>) {
        self.model.operators.push(Operator {
            op,
            inputs,
            outputs,
        });
    }

    /// An int32 constant tensor for an operator parameter (axes, shapes, paddings).
    fn int_const(
        &mut self,
        node: &Node,
        name: String,
        dims: &[i64],
        values: &[i64],
    ) -> Result<i32> {
        let mut bytes = Vec::with_capacity(values.len() * 4);
        for &v in values {
            let v = i32::try_from(v)
                .map_err(|_| node_err(node, format!("value {v} does not fit int32")))?;
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        self.add_tensor(node, name, DType::I32, dims, Some(bytes.into()), None)
    }

    /// The TFLite tensor that holds IR tensor `r` at run time, writing a constant
    /// (rearranged to `layout`) or a stored constant plus its DEQUANTIZE on first use.
    fn input(&mut self, r: &TensorRef, layout: Layout) -> Result<i32> {
        let producer = &self.graph.nodes[self.index[r.node.as_str()]];
        let value =
            self.values.get(r).cloned().ok_or_else(|| {
                node_err(producer, format!("'{r}' is needed but was not lowered"))
            })?;
        if let Value::Runtime(t) = value {
            if layout != Layout::AsIs {
                return Err(node_err(
                    producer,
                    "weights computed at run time are not supported; they must be constant",
                ));
            }
            return Ok(t);
        }
        if let Some(&t) = self.materialized.get(&(r.clone(), layout)) {
            return Ok(t);
        }
        let (tensor, quant, source) = match value {
            Value::Const(t, q) => (t, q, None),
            Value::Stored(t, q, source) => (t, q, Some(source)),
            Value::Runtime(_) => unreachable!("handled above"),
        };
        let (tensor, quant) = rearrange(producer, &tensor, quant, layout)?;
        let dims: Vec<i64> = tensor.shape().iter().map(|&d| d as i64).collect();
        let name = r.to_string();
        // Shares the constant's bytes: a copy would hold a second 200 MB embedding
        // while the flatbuffer is written.
        let data = Some(match tensor.data() {
            crate::ir::TensorData::Bytes(b) => b.clone(),
            crate::ir::TensorData::Strings(_) => Arc::<[u8]>::from(tensor.bytes()),
        });
        let t = if let Some(source) = source {
            let src = self.add_tensor(producer, source, tensor.dtype(), &dims, data, quant)?;
            let out = self.add_tensor(producer, name, DType::F32, &dims, None, None)?;
            self.add_op(Op::Dequantize, vec![src], vec![out]);
            out
        } else {
            self.add_tensor(producer, name, tensor.dtype(), &dims, data, quant)?
        };
        self.materialized.insert((r.clone(), layout), t);
        Ok(t)
    }

    /// The only needed consumer of `r`, when there is exactly one and `r` is not a graph output.
    fn sole_consumer(&self, r: &TensorRef) -> Option<usize> {
        if self.outputs.contains(r) {
            return None;
        }
        match self.consumers.get(r).map(Vec::as_slice) {
            Some([c]) => Some(*c),
            _ => None,
        }
    }

    fn known_ints(&self, node: &Node, k: usize, what: &str) -> Result<Vec<i64>> {
        let r = node
            .inputs
            .get(k)
            .ok_or_else(|| node_err(node, format!("has no {what} input")))?;
        self.info(node, r)?
            .known_value()
            .ok_or_else(|| node_err(node, format!("{what} ('{r}') is not known before run time")))
    }

    fn out_shape(&self, node: &Node) -> Result<Vec<i64>> {
        Ok(self
            .info(node, &TensorRef::new(node.name.clone(), 0))?
            .shape
            .clone())
    }

    fn set(&mut self, node: &Node, value: Value) {
        self.values
            .insert(TensorRef::new(node.name.clone(), 0), value);
    }

    fn lower_node(&mut self, i: usize, node: &'g Node) -> Result<()> {
        let out = TensorRef::new(node.name.clone(), 0);
        // Shape arithmetic whose value is known before run time is a constant.
        if let Some(info) = self.infos.get(&out) {
            if !matches!(self.ops[i], IrOp::Const | IrOp::Placeholder) {
                if let Some(v) = info.known_value() {
                    let dims: Vec<usize> = info.shape.iter().map(|&d| d as usize).collect();
                    let t = match info.dtype {
                        DType::I64 => Some(Tensor::from_vec(dims, &v)),
                        DType::I32 => {
                            let v: Option<Vec<i32>> =
                                v.iter().map(|&x| i32::try_from(x).ok()).collect();
                            v.map(|v| Tensor::from_vec(dims, &v))
                        }
                        _ => None,
                    };
                    if let Some(t) = t {
                        self.set(node, Value::Const(t, None));
                        return Ok(());
                    }
                }
            }
        }
        let op = self.ops[i].clone();
        match op {
            IrOp::Const => {
                let t = node.attr_tensor("value")?.clone();
                let q = node.output_quant.get(&0).cloned();
                self.set(node, Value::Const(t, q));
            }
            IrOp::Placeholder => {
                return Err(node_err(
                    node,
                    "is a placeholder the graph does not declare as an input",
                ))
            }
            IrOp::Forward(
                Forward::Identity
                | Forward::StopGradient
                | Forward::Snapshot
                | Forward::EnsureShape,
            )
            | IrOp::PlaceholderWithDefault => {
                let v = self.input_value(node, 0)?;
                self.set(node, v);
            }
            IrOp::Cast => self.lower_cast(node, false)?,
            IrOp::Dequantize => self.lower_cast(node, true)?,
            IrOp::Reshape | IrOp::ExpandDims | IrOp::Squeeze => self.lower_reshape(node, &op)?,
            IrOp::Conv2D(c) => self.lower_linear(i, node, Linear::Conv2D(c))?,
            IrOp::DepthwiseConv2dNative(c) => self.lower_linear(i, node, Linear::Depthwise(c))?,
            IrOp::MatMul(m) => self.lower_linear(i, node, Linear::MatMul(m))?,
            IrOp::Fused { linear, activation } => self.lower_fused(node, linear, activation)?,
            IrOp::BiasAdd { v1: false, .. } => self.binary(
                node,
                Op::Add {
                    activation: Activation::None,
                },
            )?,
            IrOp::Binary(Binary::Add | Binary::AddV2) => self.binary(
                node,
                Op::Add {
                    activation: Activation::None,
                },
            )?,
            IrOp::Binary(Binary::Sub) => self.binary(
                node,
                Op::Sub {
                    activation: Activation::None,
                },
            )?,
            IrOp::Binary(Binary::Mul) => self.binary(
                node,
                Op::Mul {
                    activation: Activation::None,
                },
            )?,
            IrOp::Binary(Binary::RealDiv) => self.binary(
                node,
                Op::Div {
                    activation: Activation::None,
                },
            )?,
            IrOp::Binary(Binary::Maximum) => self.binary(node, Op::Maximum)?,
            IrOp::Binary(Binary::Minimum) => self.binary(node, Op::Minimum)?,
            IrOp::Unary(Unary::Relu) => self.unary(node, Op::Relu)?,
            IrOp::Unary(Unary::Relu6) => self.unary(node, Op::Relu6)?,
            IrOp::HardSwish => self.unary(node, Op::HardSwish)?,
            IrOp::Conv2DBackpropInput(c) => self.lower_transpose_conv(i, node, c)?,
            IrOp::ResizeBilinear(r) | IrOp::ResizeNearestNeighbor(r) => {
                let size = self.known_ints(node, 1, "size")?;
                let x = self.input(&node.inputs[0], Layout::AsIs)?;
                let s = self.int_const(node, format!("{}/size", node.name), &[2], &size)?;
                let (align_corners, half_pixel_centers) = (r.align_corners, r.half_pixel_centers);
                let op = if matches!(op, IrOp::ResizeBilinear(_)) {
                    Op::ResizeBilinear {
                        align_corners,
                        half_pixel_centers,
                    }
                } else {
                    Op::ResizeNearestNeighbor {
                        align_corners,
                        half_pixel_centers,
                    }
                };
                self.emit(node, op, vec![x, s])?
            }
            IrOp::Unary(Unary::Tanh) => self.unary(node, Op::Tanh)?,
            IrOp::Unary(Unary::Sigmoid) => self.unary(node, Op::Logistic)?,
            IrOp::Unary(Unary::Abs) => self.unary(node, Op::Abs)?,
            IrOp::Unary(Unary::Exp) => self.unary(node, Op::Exp)?,
            IrOp::Unary(Unary::Log) => self.unary(node, Op::Log)?,
            IrOp::Unary(Unary::Neg) => self.unary(node, Op::Neg)?,
            IrOp::Unary(Unary::Rsqrt) => self.unary(node, Op::Rsqrt)?,
            IrOp::Unary(Unary::Square) => self.unary(node, Op::Square)?,
            IrOp::Unary(Unary::Elu) => self.unary(node, Op::Elu)?,
            IrOp::Binary(Binary::SquaredDifference) => self.binary(node, Op::SquaredDifference)?,
            IrOp::Binary(Binary::Pow) => self.binary(node, Op::Pow)?,
            IrOp::Compare(c) if compare_op(&c).is_some() => {
                self.binary(node, compare_op(&c).expect("checked by the guard"))?
            }
            IrOp::SelectV2 => {
                if node.inputs.len() != 3 {
                    return Err(node_err(node, "needs three inputs"));
                }
                let ins = node
                    .inputs
                    .iter()
                    .map(|r| self.input(r, Layout::AsIs))
                    .collect::<Result<Vec<_>>>()?;
                self.emit(node, Op::SelectV2, ins)?
            }
            IrOp::LeakyRelu => {
                let alpha = match node.attr("alpha") {
                    None => 0.2,
                    Some(_) => node.attr_float("alpha")?,
                };
                self.unary(node, Op::LeakyRelu { alpha })?
            }
            IrOp::Gelu { approximate } => self.unary(node, Op::Gelu { approximate })?,
            IrOp::Prelu => self.binary(node, Op::Prelu)?,
            IrOp::L2Normalize => self.unary(node, Op::L2Normalization)?,
            IrOp::BatchMatMul { .. } => self.lower_batch_matmul(i, node)?,
            IrOp::Quantize => self.unary(node, Op::Quantize)?,
            IrOp::Softmax => self.unary(node, Op::Softmax { beta: 1.0 })?,
            IrOp::Reduce {
                kind: kind @ (Reduce::Max | Reduce::Min | Reduce::Sum | Reduce::Mean),
                keep_dims,
            } => {
                let op = match kind {
                    Reduce::Max => Op::ReduceMax { keep_dims },
                    Reduce::Min => Op::ReduceMin { keep_dims },
                    Reduce::Sum => Op::Sum { keep_dims },
                    _ => Op::Mean { keep_dims },
                };
                let rank = self.input_rank(node, 0)?;
                let axes = self
                    .known_ints(node, 1, "reduction axes")?
                    .into_iter()
                    .map(|a| norm_axis(node, a, rank))
                    .collect::<Result<Vec<_>>>()?;
                let x = self.input(&node.inputs[0], Layout::AsIs)?;
                let a = self.int_const(
                    node,
                    format!("{}/axes", node.name),
                    &[axes.len() as i64],
                    &axes,
                )?;
                self.emit(node, op, vec![x, a])?;
            }
            IrOp::ConcatV2 => {
                let n = node.inputs.len().saturating_sub(1);
                let axis = single(node, self.known_ints(node, n, "axis")?)?;
                let axis = norm_axis(node, axis, self.input_rank(node, 0)?)?;
                let mut ins = Vec::with_capacity(n);
                for r in &node.inputs[..n] {
                    ins.push(self.input(r, Layout::AsIs)?);
                }
                self.emit(
                    node,
                    Op::Concatenation {
                        axis: axis as i32,
                        activation: Activation::None,
                    },
                    ins,
                )?;
            }
            IrOp::GatherV2 => {
                let axis = single(node, self.known_ints(node, 2, "axis")?)?;
                let axis = norm_axis(node, axis, self.input_rank(node, 0)?)?;
                let batch_dims = match node.attr("batch_dims") {
                    Some(Attr::Int(b)) => *b as i32,
                    _ => 0,
                };
                let params = self.input(&node.inputs[0], Layout::AsIs)?;
                let indices = self.input(&node.inputs[1], Layout::AsIs)?;
                self.emit(
                    node,
                    Op::Gather {
                        axis: axis as i32,
                        batch_dims,
                    },
                    vec![params, indices],
                )?;
            }
            IrOp::Pad | IrOp::PadV2 => {
                if op == IrOp::PadV2 {
                    let c = self.input_value(node, 2)?;
                    let zero = matches!(&c, Value::Const(t, None) if t.to_f64_vec().is_ok_and(|v| v.iter().all(|x| *x == 0.0)));
                    if !zero {
                        return Err(node_err(node, "only zero padding is supported"));
                    }
                }
                let pads = self.known_ints(node, 1, "paddings")?;
                let rank = pads.len() as i64 / 2;
                let x = self.input(&node.inputs[0], Layout::AsIs)?;
                let p =
                    self.int_const(node, format!("{}/paddings", node.name), &[rank, 2], &pads)?;
                self.emit(node, Op::Pad, vec![x, p])?;
            }
            IrOp::MaxPool(p) | IrOp::AvgPool(p) => {
                nhwc(node, p.layout)?;
                let [kh, kw] = window_i32(node, "ksize", p.ksize)?;
                let [sh, sw] = window_i32(node, "strides", p.strides)?;
                let opts = PoolOptions {
                    padding: padding(node, p.padding)?,
                    stride_h: sh,
                    stride_w: sw,
                    filter_h: kh,
                    filter_w: kw,
                    activation: Activation::None,
                };
                let op = if matches!(op, IrOp::MaxPool(_)) {
                    Op::MaxPool2d(opts)
                } else {
                    Op::AveragePool2d(opts)
                };
                self.unary(node, op)?;
            }
            IrOp::Transpose
            | IrOp::Tile
            | IrOp::Slice
            | IrOp::StridedSlice
            | IrOp::Split
            | IrOp::SplitV
            | IrOp::Pack
            | IrOp::Unpack
            | IrOp::Fill
            | IrOp::ZerosLike
            | IrOp::Shape
            | IrOp::Gather
            | IrOp::ArgMax
            | IrOp::ArgMin => self.lower_movement(node, &op)?,
            IrOp::Forward(Forward::CheckNumerics | Forward::PreventGradient)
            | IrOp::IdentityN
            | IrOp::Print
            | IrOp::Unary(
                Unary::Selu
                | Unary::Softplus
                | Unary::Sqrt
                | Unary::Log1p
                | Unary::Erf
                | Unary::Floor
                | Unary::Ceil
                | Unary::Round
                | Unary::Rint
                | Unary::Sign
                | Unary::Reciprocal
                | Unary::Inv
                | Unary::Sin
                | Unary::Cos
                | Unary::LogicalNot,
            )
            | IrOp::Binary(
                Binary::Div
                | Binary::TruncateDiv
                | Binary::FloorDiv
                | Binary::FloorMod
                | Binary::Mod,
            )
            | IrOp::Compare(_)
            | IrOp::BiasAdd { v1: true, .. }
            | IrOp::FusedBatchNorm { .. }
            | IrOp::LogSoftmax
            | IrOp::Reduce {
                kind: Reduce::Prod | Reduce::Any | Reduce::All,
                ..
            }
            | IrOp::Size
            | IrOp::Rank
            | IrOp::Concat
            | IrOp::MirrorPad
            | IrOp::OnesLike
            | IrOp::Range
            | IrOp::Select
            | IrOp::Random(_)
            | IrOp::NoOp
            | IrOp::Assert
            | IrOp::SaveV2
            | IrOp::SpaceToBatchND
            | IrOp::BatchToSpaceND
            | IrOp::Other(_) => {
                return Err(node_err(
                    node,
                    "has no TFLite equivalent that qpipe can export",
                ))
            }
        }
        Ok(())
    }

    fn input_value(&self, node: &Node, k: usize) -> Result<Value> {
        let r = node
            .inputs
            .get(k)
            .ok_or_else(|| node_err(node, format!("has no input {k}")))?;
        self.values
            .get(r)
            .cloned()
            .ok_or_else(|| node_err(node, format!("input '{r}' was not lowered")))
    }

    fn input_rank(&self, node: &Node, k: usize) -> Result<usize> {
        let r = node
            .inputs
            .get(k)
            .ok_or_else(|| node_err(node, format!("has no input {k}")))?;
        Ok(self.info(node, r)?.shape.len())
    }

    /// Emits `op` with a new output tensor for the node's output 0.
    fn emit(&mut self, node: &Node, op: Op, inputs: Vec<i32>) -> Result<()> {
        let out = TensorRef::new(node.name.clone(), 0);
        let t = self.runtime_tensor(node, &out)?;
        self.add_op(op, inputs, vec![t]);
        self.set(node, Value::Runtime(t));
        Ok(())
    }

    fn unary(&mut self, node: &Node, op: Op) -> Result<()> {
        let r = node
            .inputs
            .first()
            .ok_or_else(|| node_err(node, "has no input"))?
            .clone();
        let x = self.input(&r, Layout::AsIs)?;
        self.emit(node, op, vec![x])
    }

    fn binary(&mut self, node: &Node, op: Op) -> Result<()> {
        if node.inputs.len() != 2 {
            return Err(node_err(node, "needs two inputs"));
        }
        let a = self.input(&node.inputs[0], Layout::AsIs)?;
        let b = self.input(&node.inputs[1], Layout::AsIs)?;
        self.emit(node, op, vec![a, b])
    }

    /// `Cast`/`Dequantize`: of a compact constant → a stored constant; of a
    /// runtime tensor → DEQUANTIZE (or nothing, for a cast to the same type).
    fn lower_cast(&mut self, node: &Node, dequantize: bool) -> Result<()> {
        let out = self
            .info(node, &TensorRef::new(node.name.clone(), 0))?
            .dtype;
        match self.input_value(node, 0)? {
            Value::Const(t, q) => {
                if out == DType::F32
                    && (t.dtype() == DType::F16 || (q.is_some() && t.dtype() == DType::I8))
                {
                    self.set(node, Value::Stored(t, q, node.inputs[0].to_string()));
                } else if t.dtype() == out {
                    self.set(node, Value::Const(t, q));
                } else {
                    return Err(node_err(
                        node,
                        format!(
                            "a constant {} → {out} cast was not folded (run strip_training first)",
                            t.dtype()
                        ),
                    ));
                }
            }
            Value::Stored(..) => {
                return Err(node_err(
                    node,
                    "dequantizes an already dequantized constant",
                ))
            }
            Value::Runtime(t) => {
                let from = self.tensor_dtype(t);
                if from == Some(out) {
                    self.set(node, Value::Runtime(t));
                } else if dequantize && out == DType::F32 {
                    self.emit(node, Op::Dequantize, vec![t])?;
                } else {
                    return Err(node_err(
                        node,
                        format!(
                            "casting {} to {out} at run time has no TFLite builtin qpipe exports",
                            from.map_or("?", |d| d.name())
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn lower_reshape(&mut self, node: &Node, op: &IrOp) -> Result<()> {
        let shape = self.out_shape(node)?;
        match self.input_value(node, 0)? {
            Value::Const(t, q) => {
                let (t, q) = reshape_const(node, &t, q, &shape)?;
                self.set(node, Value::Const(t, q));
                return Ok(());
            }
            Value::Stored(t, q, source) => {
                let (t, q) = reshape_const(node, &t, q, &shape)?;
                self.set(node, Value::Stored(t, q, source));
                return Ok(());
            }
            Value::Runtime(_) => {}
        }
        let x = self.input(&node.inputs[0], Layout::AsIs)?;
        match op {
            IrOp::Reshape => {
                if shape.iter().filter(|&&d| d < 0).count() > 1 {
                    return Err(node_err(
                        node,
                        format!("output shape {shape:?} has more than one dimension unknown before run time"),
                    ));
                }
                let s = self.int_const(
                    node,
                    format!("{}/shape", node.name),
                    &[shape.len() as i64],
                    &shape,
                )?;
                self.emit(node, Op::Reshape, vec![x, s])
            }
            IrOp::ExpandDims => {
                let axis = single(node, self.known_ints(node, 1, "axis")?)?;
                let axis = norm_axis(node, axis, shape.len())?;
                let a = self.int_const(node, format!("{}/axis", node.name), &[1], &[axis])?;
                self.emit(node, Op::ExpandDims, vec![x, a])
            }
            _ => {
                let in_shape = self.info(node, &node.inputs[0])?.shape.clone();
                let listed = match node.attr("squeeze_dims").or(node.attr("axis")) {
                    Some(Attr::Ints(v)) if !v.is_empty() => v
                        .iter()
                        .map(|&a| norm_axis(node, a, in_shape.len()).map(|a| a as i32))
                        .collect::<Result<Vec<_>>>()?,
                    _ => (0..in_shape.len() as i32)
                        .filter(|&j| in_shape[j as usize] == 1)
                        .collect(),
                };
                self.emit(node, Op::Squeeze { dims: listed }, vec![x])
            }
        }
    }

    /// CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED, absorbing a following
    /// bias add and ReLU/ReLU6 when nothing else reads the intermediate tensors.
    fn lower_linear(&mut self, i: usize, node: &'g Node, linear: Linear) -> Result<()> {
        let graph = self.graph;
        if node.inputs.len() != 2 {
            return Err(node_err(node, "needs two inputs"));
        }
        let out_channels = *self.out_shape(node)?.last().unwrap_or(&-1);
        // Find the chain: node [→ bias add] [→ relu/relu6].
        let mut tail = i;
        let mut bias: Option<TensorRef> = None;
        let mut activation = Activation::None;
        let here = TensorRef::new(node.name.clone(), 0);
        if let Some(c) = self.sole_consumer(&here) {
            if let Some(b) = self.bias_operand(c, &here, out_channels) {
                bias = Some(b);
                tail = c;
            }
        }
        let tail_ref = TensorRef::new(graph.nodes[tail].name.clone(), 0);
        if let Some(c) = self.sole_consumer(&tail_ref) {
            let cn = &graph.nodes[c];
            let act = match self.ops[c] {
                IrOp::Unary(Unary::Relu) => Some(Activation::Relu),
                IrOp::Unary(Unary::Relu6) => Some(Activation::Relu6),
                _ => None,
            };
            if let (Some(a), true) = (act, cn.inputs.len() == 1) {
                let same_quant = !graph.nodes[tail].output_quant.contains_key(&0)
                    || cn.output_quant.contains_key(&0);
                if same_quant {
                    activation = a;
                    tail = c;
                }
            }
        }
        let x = self.input(&node.inputs[0], Layout::AsIs)?;
        let (operator, w) = self.linear_op(node, &linear, activation)?;
        let b = match (&bias, linear) {
            (Some(r), Linear::MatMul(_)) if self.is_zero_const(r) => -1,
            (Some(r), _) => self.input(r, Layout::AsIs)?,
            (None, Linear::MatMul(_)) => -1,
            // CONV_2D and DEPTHWISE_CONV_2D kernels require a bias tensor.
            (None, Linear::Conv2D(_)) => self.zero_bias(node, x, w, true)?,
            (None, Linear::Depthwise(_)) => self.zero_bias(node, x, w, false)?,
        };
        let tail_node = &graph.nodes[tail];
        let out_ref = TensorRef::new(tail_node.name.clone(), 0);
        let t = self.runtime_tensor(tail_node, &out_ref)?;
        self.add_op(operator, vec![x, w, b], vec![t]);
        self.values.insert(out_ref, Value::Runtime(t));
        let mut k = i;
        while k != tail {
            let r = TensorRef::new(graph.nodes[k].name.clone(), 0);
            k = self.consumers[&r][0];
            self.absorbed.insert(k);
        }
        Ok(())
    }

    /// `Conv2DBackpropInput` → TRANSPOSE_CONV with its bias add and Relu/Relu6 fused
    /// (by `passes::fuse`, or here), as the converter emits it. The output shape is
    /// a constant from shape inference. Where its batch is known only at run time
    /// it is written as 1 and the whole file is made batch 1, as the converter's
    /// file is: LiteRT sizes the output from a constant shape once, so a constant
    /// cannot follow a resized batch, and computing it (SHAPE, STRIDED_SLICE, PACK,
    /// what the converter writes for a dynamic batch) would cost three operators.
    fn lower_transpose_conv(
        &mut self,
        i: usize,
        node: &'g Node,
        c: crate::ir::op::Conv,
    ) -> Result<()> {
        let graph = self.graph;
        nhwc(node, c.layout)?;
        if c.dilations != [1, 1] {
            return Err(node_err(node, "TRANSPOSE_CONV has no dilation"));
        }
        let fused =
            crate::ir::op::transpose_conv_activation(node).map_err(|e| node_err(node, e))?;
        let want = if fused.is_some() { 4 } else { 3 };
        if node.inputs.len() != want {
            return Err(node_err(node, format!("needs {want} inputs")));
        }
        let shape = self.out_shape(node)?;
        let out_channels = *shape.last().unwrap_or(&-1);
        let mut tail = i;
        let mut bias = None;
        let mut activation = Activation::None;
        let here = TensorRef::new(node.name.clone(), 0);
        if let Some(act) = fused {
            bias = Some(node.inputs[3].clone());
            activation = match act {
                FusedActivation::None => Activation::None,
                FusedActivation::Relu => Activation::Relu,
                FusedActivation::Relu6 => Activation::Relu6,
                FusedActivation::ReluN1To1 => Activation::ReluN1To1,
            };
        } else if let Some(k) = self.sole_consumer(&here) {
            if let Some(b) = self.bias_operand(k, &here, out_channels) {
                bias = Some(b);
                tail = k;
            }
        }
        let tail_ref = TensorRef::new(graph.nodes[tail].name.clone(), 0);
        let chain = fused.is_none();
        if let Some(k) = self.sole_consumer(&tail_ref).filter(|_| chain) {
            let act = match self.ops[k] {
                IrOp::Unary(Unary::Relu) => Some(Activation::Relu),
                IrOp::Unary(Unary::Relu6) => Some(Activation::Relu6),
                _ => None,
            };
            let same_quant = !graph.nodes[tail].output_quant.contains_key(&0)
                || graph.nodes[k].output_quant.contains_key(&0);
            if let (Some(a), true) = (act, same_quant) {
                activation = a;
                tail = k;
            }
        }
        if shape.first().is_some_and(|&d| d < 0) {
            self.batch_one = true;
        }
        let dims: Vec<i64> = shape.iter().map(|&d| if d < 0 { 1 } else { d }).collect();
        let os = self.int_const(node, format!("{}/output_shape", node.name), &[4], &dims)?;
        let w = self.input(&node.inputs[1], Layout::TransposeConv)?;
        let x = self.input(&node.inputs[2], Layout::AsIs)?;
        let b = match &bias {
            Some(r) => self.input(r, Layout::AsIs)?,
            None => -1,
        };
        let [sh, sw] = window_i32(node, "strides", c.strides)?;
        let op = Op::TransposeConv {
            padding: padding(node, c.padding)?,
            stride_h: sh,
            stride_w: sw,
            activation,
        };
        let tail_node = &graph.nodes[tail];
        let out_ref = TensorRef::new(tail_node.name.clone(), 0);
        let t = self.runtime_tensor(tail_node, &out_ref)?;
        self.add_op(op, vec![os, w, x, b], vec![t]);
        self.values.insert(out_ref, Value::Runtime(t));
        let mut k = i;
        while k != tail {
            let r = TensorRef::new(graph.nodes[k].name.clone(), 0);
            k = self.consumers[&r][0];
            self.absorbed.insert(k);
        }
        Ok(())
    }

    /// The TFLite operator of a `Conv2D`, `DepthwiseConv2dNative` or `MatMul`
    /// (`op`) with its weights in TFLite's layout.
    fn linear_op(
        &mut self,
        node: &Node,
        linear: &Linear,
        activation: Activation,
    ) -> Result<(Op, i32)> {
        Ok(match linear {
            Linear::Conv2D(c) => {
                nhwc(node, c.layout)?;
                let [sh, sw] = window_i32(node, "strides", c.strides)?;
                let [dh, dw] = window_i32(node, "dilations", c.dilations)?;
                let w = self.input(&node.inputs[1], Layout::Ohwi)?;
                let o = ConvOptions {
                    padding: padding(node, c.padding)?,
                    stride_h: sh,
                    stride_w: sw,
                    dilation_h: dh,
                    dilation_w: dw,
                    activation,
                };
                (Op::Conv2d(o), w)
            }
            Linear::Depthwise(c) => {
                nhwc(node, c.layout)?;
                let [sh, sw] = window_i32(node, "strides", c.strides)?;
                let [dh, dw] = window_i32(node, "dilations", c.dilations)?;
                let fshape = self.info(node, &node.inputs[1])?.shape.clone();
                let m = fshape.get(3).copied().unwrap_or(1);
                let w = self.input(&node.inputs[1], Layout::Depthwise)?;
                let conv = ConvOptions {
                    padding: padding(node, c.padding)?,
                    stride_h: sh,
                    stride_w: sw,
                    dilation_h: dh,
                    dilation_w: dw,
                    activation,
                };
                (
                    Op::DepthwiseConv2d {
                        conv,
                        depth_multiplier: m as i32,
                    },
                    w,
                )
            }
            Linear::MatMul(m) => {
                if m.transpose_a {
                    return Err(node_err(node, "transpose_a is not supported"));
                }
                let layout = if m.transpose_b {
                    Layout::AsIs
                } else {
                    Layout::Transposed
                };
                let w = self.input(&node.inputs[1], layout)?;
                // qpipe's hybrid kernel, like the converter, quantizes inputs asymmetrically.
                let hybrid = linear.kind().is_hybrid(
                    self.info(node, &node.inputs[0])?.dtype,
                    self.model.tensors[w as usize].dtype,
                );
                (
                    Op::FullyConnected {
                        activation,
                        keep_num_dims: self.input_rank(node, 0)? > 2,
                        asymmetric_quantize_inputs: hybrid,
                    },
                    w,
                )
            }
        })
    }

    /// `BatchMatMul*`: by a constant matrix → FULLY_CONNECTED (keeping the leading
    /// dimensions, bias and activation fused as for `MatMul`), as the converter
    /// does; of two runtime tensors → BATCH_MATMUL.
    fn lower_batch_matmul(&mut self, i: usize, node: &'g Node) -> Result<()> {
        if node.inputs.len() != 2 {
            return Err(node_err(node, "needs two inputs"));
        }
        let adj = |k: &str| -> Result<bool> {
            Ok(match node.attr(k) {
                None => false,
                Some(_) => node.attr_bool(k)?,
            })
        };
        let (adj_x, adj_y) = (adj("adj_x")?, adj("adj_y")?);
        let weights_const = matches!(
            self.values.get(&node.inputs[1]),
            Some(Value::Const(..)) | Some(Value::Stored(..))
        );
        if weights_const && !adj_x && self.input_rank(node, 1)? == 2 {
            let m = crate::ir::op::MatMul {
                transpose_a: false,
                transpose_b: adj_y,
            };
            return self.lower_linear(i, node, Linear::MatMul(m));
        }
        self.binary(node, Op::BatchMatmul { adj_x, adj_y })
    }

    /// `_FusedConv2D`, `_FusedDepthwiseConv2dNative`, `_FusedMatMul` (from
    /// `quantize_int8`): inputs (x, weights, bias), activation from `fused_ops`.
    fn lower_fused(
        &mut self,
        node: &Node,
        linear: Linear,
        activation: FusedActivation,
    ) -> Result<()> {
        if node.inputs.len() != 3 {
            return Err(node_err(node, "needs three inputs"));
        }
        let activation = match activation {
            FusedActivation::None => Activation::None,
            FusedActivation::Relu => Activation::Relu,
            FusedActivation::Relu6 => Activation::Relu6,
            FusedActivation::ReluN1To1 => Activation::ReluN1To1,
        };
        let x = self.input(&node.inputs[0], Layout::AsIs)?;
        let (operator, w) = self.linear_op(node, &linear, activation)?;
        let b = match linear {
            Linear::MatMul(_) if self.is_zero_const(&node.inputs[2]) => -1,
            _ => self.input(&node.inputs[2], Layout::AsIs)?,
        };
        self.emit(node, operator, vec![x, w, b])
    }

    /// A zero bias for a convolution that has none: float32 for float (and
    /// hybrid) kernels; for int8 ones int32 with scale input_scale × weight_scale
    /// per output channel, as TFLite's quantization spec requires.
    fn zero_bias(&mut self, node: &Node, x: i32, w: i32, conv2d: bool) -> Result<i32> {
        let (xt, wt) = (
            &self.model.tensors[x as usize],
            &self.model.tensors[w as usize],
        );
        let channels = match (conv2d, wt.shape.as_slice()) {
            (true, [o, ..]) => *o as usize,
            (_, [.., c]) => *c as usize,
            _ => return Err(node_err(node, "filter has no channel dimension")),
        };
        let name = format!("{}/bias", node.name);
        let (dtype, quant) = match (xt.dtype, wt.dtype) {
            (DType::I8, DType::I8) => {
                let (Some(xq), Some(wq)) = (&xt.quant, &wt.quant) else {
                    return Err(node_err(
                        node,
                        "int8 convolution without quantization parameters",
                    ));
                };
                let xs = xq.scale.first().copied().unwrap_or(0.0);
                let scale: Vec<f32> = (0..channels)
                    .map(|c| xs * wq.scale.get(c).or(wq.scale.first()).copied().unwrap_or(0.0))
                    .collect();
                (
                    DType::I32,
                    Some(QuantParams::per_axis(scale, vec![0; channels], 0)),
                )
            }
            (DType::I16, _) => (DType::I64, None),
            _ => (DType::F32, None),
        };
        let size = dtype.size().unwrap_or(4);
        let data: Arc<[u8]> = vec![0u8; channels * size].into();
        self.add_tensor(node, name, dtype, &[channels as i64], Some(data), quant)
    }

    /// The bias operand when `add` adds a constant vector of `channels` values to `x`.
    fn bias_operand(&self, add: usize, x: &TensorRef, channels: i64) -> Option<TensorRef> {
        let bias_add = match self.ops[add] {
            IrOp::BiasAdd { .. } => true,
            IrOp::Binary(Binary::Add | Binary::AddV2) => false,
            _ => return None,
        };
        let add = &self.graph.nodes[add];
        if add.inputs.len() != 2 {
            return None;
        }
        let other = if &add.inputs[0] == x {
            &add.inputs[1]
        } else if !bias_add && &add.inputs[1] == x {
            &add.inputs[0]
        } else {
            return None;
        };
        if &add.inputs[0] == other && &add.inputs[1] == other {
            return None;
        }
        let is_const = matches!(
            self.values.get(other),
            Some(Value::Const(..)) | Some(Value::Stored(..))
        );
        let shape = &self.infos.get(other)?.shape;
        (is_const && channels >= 0 && shape.as_slice() == [channels]).then(|| other.clone())
    }
}

fn single(node: &Node, v: Vec<i64>) -> Result<i64> {
    match v[..] {
        [a] => Ok(a),
        _ => Err(node_err(node, format!("expected a single axis, got {v:?}"))),
    }
}

fn norm_axis(node: &Node, axis: i64, rank: usize) -> Result<i64> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r.max(1) {
        return Err(node_err(
            node,
            format!("axis {axis} is out of range for rank {rank}"),
        ));
    }
    Ok(a)
}

fn padding(node: &Node, p: IrPadding) -> Result<Padding> {
    match p {
        IrPadding::Same => Ok(Padding::Same),
        IrPadding::Valid => Ok(Padding::Valid),
        p => Err(node_err(
            node,
            format!("padding {} has no TFLite equivalent", p.tf_name()),
        )),
    }
}

fn nhwc(node: &Node, layout: crate::ir::op::Layout) -> Result<()> {
    match layout {
        crate::ir::op::Layout::Nhwc => Ok(()),
        crate::ir::op::Layout::Nchw => Err(node_err(
            node,
            "data_format NCHW has no TFLite equivalent (only NHWC)",
        )),
    }
}

/// A (height, width) window attribute as TFLite's i32s.
fn window_i32(node: &Node, key: &str, v: [i64; 2]) -> Result<[i32; 2]> {
    let c =
        |x: i64| i32::try_from(x).map_err(|_| node_err(node, format!("{key} {v:?} is too large")));
    Ok([c(v[0])?, c(v[1])?])
}

/// A constant reshaped to `shape`; a per-axis quantization follows its axis
/// (the dimension with the same size and the same number of elements before it).
fn reshape_const(
    node: &Node,
    t: &Tensor,
    quant: Option<QuantParams>,
    shape: &[i64],
) -> Result<(Tensor, Option<QuantParams>)> {
    let dims: Vec<usize> = shape.iter().map(|&d| d.max(0) as usize).collect();
    let quant = match quant {
        Some(q) if q.axis.is_some() => {
            let old = t.shape();
            let axis = q.axis.unwrap_or_default() as usize;
            let before: usize = old.iter().take(axis).product();
            let size = old.get(axis).copied();
            let new_axis = (0..dims.len())
                .find(|&k| Some(dims[k]) == size && dims[..k].iter().product::<usize>() == before);
            match new_axis {
                Some(k) => Some(QuantParams {
                    axis: Some(k as u32),
                    ..q
                }),
                None => {
                    return Err(node_err(
                        node,
                        format!("reshaping {old:?} to {dims:?} splits the quantized axis {axis}"),
                    ))
                }
            }
        }
        q => q,
    };
    let t = t.reshaped(dims).map_err(|e| node_err(node, e))?;
    Ok((t, quant))
}

/// Rearranges a weight constant for its TFLite operator, moving its per-axis quantization with it.
fn rearrange(
    node: &Node,
    t: &Tensor,
    quant: Option<QuantParams>,
    layout: Layout,
) -> Result<(Tensor, Option<QuantParams>)> {
    let s = t.shape().to_vec();
    let move_axis = |from: &[u32],
                     to: u32,
                     q: Option<QuantParams>,
                     channels: usize|
     -> Result<Option<QuantParams>> {
        match q {
            Some(q) if q.axis.is_some() => {
                let axis = q.axis.unwrap_or_default();
                if !from.contains(&axis) || q.scale.len() != channels {
                    return Err(node_err(
                        node,
                        format!("per-axis quantization along axis {axis} with {} scales does not fit weights {s:?}", q.scale.len()),
                    ));
                }
                Ok(Some(QuantParams {
                    axis: Some(to),
                    ..q
                }))
            }
            q => Ok(q),
        }
    };
    match layout {
        Layout::AsIs => Ok((t.clone(), quant)),
        Layout::Ohwi => {
            let [h, w, i, o] = s[..] else {
                return Err(node_err(node, format!("filter shape {s:?} is not HWIO")));
            };
            let t2 = transpose(node, t, &[3, 0, 1, 2])?;
            debug_assert_eq!(t2.shape(), [o, h, w, i]);
            Ok((t2, move_axis(&[3], 0, quant, o)?))
        }
        Layout::TransposeConv => {
            let [h, w, o, i] = s[..] else {
                return Err(node_err(node, format!("filter shape {s:?} is not HWOI")));
            };
            let t2 = transpose(node, t, &[2, 0, 1, 3])?;
            debug_assert_eq!(t2.shape(), [o, h, w, i]);
            Ok((t2, move_axis(&[2], 0, quant, o)?))
        }
        Layout::Depthwise => {
            let [h, w, c, m] = s[..] else {
                return Err(node_err(node, format!("filter shape {s:?} is not HWCM")));
            };
            let t2 = t
                .reshaped(vec![1, h, w, c * m])
                .map_err(|e| node_err(node, e))?;
            let from: &[u32] = if m == 1 { &[2, 3] } else { &[3] };
            Ok((t2, move_axis(from, 3, quant, c * m)?))
        }
        Layout::Transposed => {
            let [i, o] = s[..] else {
                return Err(node_err(node, format!("weight shape {s:?} is not 2-D")));
            };
            let _ = i;
            Ok((transpose(node, t, &[1, 0])?, move_axis(&[1], 0, quant, o)?))
        }
    }
}

/// Permutes the dimensions of a numeric tensor (`perm[k]` = source dim of output dim k).
fn transpose(node: &Node, t: &Tensor, perm: &[usize]) -> Result<Tensor> {
    let s = t.shape();
    let size = t
        .dtype()
        .size()
        .ok_or_else(|| node_err(node, format!("cannot rearrange a {} tensor", t.dtype())))?;
    let rank = s.len();
    let out_shape: Vec<usize> = perm.iter().map(|&p| s[p]).collect();
    let mut in_strides = vec![1usize; rank];
    for k in (0..rank.saturating_sub(1)).rev() {
        in_strides[k] = in_strides[k + 1] * s[k + 1];
    }
    let src = t.bytes();
    let n = t.len();
    let mut out = Vec::with_capacity(src.len());
    let mut idx = vec![0usize; rank];
    for _ in 0..n {
        let off: usize = (0..rank).map(|k| idx[k] * in_strides[perm[k]]).sum();
        out.extend_from_slice(&src[off * size..(off + 1) * size]);
        for k in (0..rank).rev() {
            idx[k] += 1;
            if idx[k] < out_shape[k] {
                break;
            }
            idx[k] = 0;
        }
    }
    Tensor::from_bytes(t.dtype(), out_shape, out).map_err(|e| node_err(node, e))
}

/// The TFLite comparison for `c` (the logical ones have none qpipe writes).
fn compare_op(c: &Compare) -> Option<Op> {
    Some(match c {
        Compare::Less => Op::Less,
        Compare::Greater => Op::Greater,
        Compare::GreaterEqual => Op::GreaterEqual,
        Compare::LessEqual => Op::LessEqual,
        Compare::Equal => Op::Equal,
        Compare::NotEqual => Op::NotEqual,
        Compare::LogicalAnd | Compare::LogicalOr => return None,
    })
}

/// What [`lower`] makes of an op.
#[derive(Debug, Clone, PartialEq)]
pub enum Lowering {
    /// This builtin (options at their defaults; the real ones come from the node).
    Builtin(Op),
    /// No operator of its own: a constant, an input, or its input passed on.
    NoOperator,
    /// No TFLite builtin qpipe exports.
    None,
}

/// [`Lowering`] of `op`: the builtin `lower_node` emits for it (one exhaustive match,
/// kept beside that one).
pub fn lowering(op: &IrOp) -> Lowering {
    let conv = ConvOptions {
        padding: Padding::Same,
        stride_h: 1,
        stride_w: 1,
        dilation_h: 1,
        dilation_w: 1,
        activation: Activation::None,
    };
    let pool = PoolOptions {
        padding: Padding::Same,
        stride_h: 1,
        stride_w: 1,
        filter_h: 1,
        filter_w: 1,
        activation: Activation::None,
    };
    let activation = Activation::None;
    let linear = |l: &Linear| match l {
        Linear::Conv2D(_) => Op::Conv2d(conv),
        Linear::Depthwise(_) => Op::DepthwiseConv2d {
            conv,
            depth_multiplier: 1,
        },
        Linear::MatMul(_) => Op::FullyConnected {
            activation,
            keep_num_dims: false,
            asymmetric_quantize_inputs: false,
        },
    };
    Lowering::Builtin(match op {
        IrOp::Const
        | IrOp::Placeholder
        | IrOp::PlaceholderWithDefault
        | IrOp::Forward(
            Forward::Identity | Forward::StopGradient | Forward::Snapshot | Forward::EnsureShape,
        )
        | IrOp::Cast => return Lowering::NoOperator,
        IrOp::Dequantize => Op::Dequantize,
        IrOp::Quantize => Op::Quantize,
        IrOp::Reshape => Op::Reshape,
        IrOp::ExpandDims => Op::ExpandDims,
        IrOp::Squeeze => Op::Squeeze { dims: vec![] },
        IrOp::Conv2D(c) => linear(&Linear::Conv2D(*c)),
        IrOp::DepthwiseConv2dNative(c) => linear(&Linear::Depthwise(*c)),
        IrOp::MatMul(m) => linear(&Linear::MatMul(*m)),
        IrOp::Fused { linear: l, .. } => linear(l),
        IrOp::BiasAdd { v1: false, .. } | IrOp::Binary(Binary::Add | Binary::AddV2) => {
            Op::Add { activation }
        }
        IrOp::Binary(Binary::Sub) => Op::Sub { activation },
        IrOp::Binary(Binary::Mul) => Op::Mul { activation },
        IrOp::Binary(Binary::RealDiv) => Op::Div { activation },
        IrOp::Binary(Binary::Maximum) => Op::Maximum,
        IrOp::Binary(Binary::Minimum) => Op::Minimum,
        IrOp::Unary(Unary::Relu) => Op::Relu,
        IrOp::Unary(Unary::Relu6) => Op::Relu6,
        IrOp::Unary(Unary::Tanh) => Op::Tanh,
        IrOp::Unary(Unary::Sigmoid) => Op::Logistic,
        IrOp::Softmax => Op::Softmax { beta: 1.0 },
        IrOp::Reduce {
            kind: Reduce::Max,
            keep_dims,
        } => Op::ReduceMax {
            keep_dims: *keep_dims,
        },
        IrOp::Reduce {
            kind: Reduce::Min,
            keep_dims,
        } => Op::ReduceMin {
            keep_dims: *keep_dims,
        },
        IrOp::Reduce {
            kind: Reduce::Sum,
            keep_dims,
        } => Op::Sum {
            keep_dims: *keep_dims,
        },
        IrOp::Reduce {
            kind: Reduce::Mean,
            keep_dims,
        } => Op::Mean {
            keep_dims: *keep_dims,
        },
        IrOp::ConcatV2 => Op::Concatenation {
            axis: 0,
            activation,
        },
        IrOp::GatherV2 => Op::Gather {
            axis: 0,
            batch_dims: 0,
        },
        IrOp::Pad | IrOp::PadV2 => Op::Pad,
        IrOp::Transpose => Op::Transpose,
        IrOp::Tile => Op::Tile,
        IrOp::Slice => Op::Slice,
        IrOp::StridedSlice => Op::StridedSlice {
            begin_mask: 0,
            end_mask: 0,
            shrink_axis_mask: 0,
        },
        IrOp::Split => Op::Split { num: 2 },
        IrOp::SplitV => Op::SplitV { num: 2 },
        IrOp::Pack => Op::Pack { count: 2, axis: 0 },
        IrOp::Unpack => Op::Unpack { num: 2, axis: 0 },
        IrOp::Fill => Op::Fill,
        IrOp::ZerosLike => Op::ZerosLike,
        IrOp::Shape => Op::Shape { output: DType::I32 },
        IrOp::Gather => Op::Gather {
            axis: 0,
            batch_dims: 0,
        },
        IrOp::ArgMax => Op::ArgMax { output: DType::I64 },
        IrOp::ArgMin => Op::ArgMin { output: DType::I64 },
        IrOp::HardSwish => Op::HardSwish,
        IrOp::Unary(Unary::Abs) => Op::Abs,
        IrOp::Unary(Unary::Exp) => Op::Exp,
        IrOp::Unary(Unary::Log) => Op::Log,
        IrOp::Unary(Unary::Neg) => Op::Neg,
        IrOp::Unary(Unary::Rsqrt) => Op::Rsqrt,
        IrOp::Unary(Unary::Square) => Op::Square,
        IrOp::Unary(Unary::Elu) => Op::Elu,
        IrOp::Binary(Binary::SquaredDifference) => Op::SquaredDifference,
        IrOp::Binary(Binary::Pow) => Op::Pow,
        IrOp::Compare(c) if compare_op(c).is_some() => compare_op(c).expect("checked by the guard"),
        IrOp::SelectV2 => Op::SelectV2,
        IrOp::LeakyRelu => Op::LeakyRelu { alpha: 0.2 },
        IrOp::Gelu { approximate } => Op::Gelu {
            approximate: *approximate,
        },
        IrOp::Prelu => Op::Prelu,
        IrOp::L2Normalize => Op::L2Normalization,
        // By a constant 2-D operand it is a FULLY_CONNECTED, as the converter writes it.
        IrOp::BatchMatMul { .. } => Op::BatchMatmul {
            adj_x: false,
            adj_y: false,
        },
        IrOp::Conv2DBackpropInput(_) => Op::TransposeConv {
            padding: Padding::Same,
            stride_h: 1,
            stride_w: 1,
            activation,
        },
        IrOp::ResizeBilinear(r) => Op::ResizeBilinear {
            align_corners: r.align_corners,
            half_pixel_centers: r.half_pixel_centers,
        },
        IrOp::ResizeNearestNeighbor(r) => Op::ResizeNearestNeighbor {
            align_corners: r.align_corners,
            half_pixel_centers: r.half_pixel_centers,
        },
        IrOp::MaxPool(_) => Op::MaxPool2d(pool),
        IrOp::AvgPool(_) => Op::AveragePool2d(pool),
        IrOp::Forward(Forward::CheckNumerics | Forward::PreventGradient)
        | IrOp::IdentityN
        | IrOp::Print
        | IrOp::Unary(_)
        | IrOp::Binary(_)
        | IrOp::Compare(_)
        | IrOp::BiasAdd { v1: true, .. }
        | IrOp::FusedBatchNorm { .. }
        | IrOp::LogSoftmax
        | IrOp::Reduce { .. }
        | IrOp::Size
        | IrOp::Rank
        | IrOp::Concat
        | IrOp::MirrorPad
        | IrOp::OnesLike
        | IrOp::Range
        | IrOp::Select
        | IrOp::Random(_)
        | IrOp::NoOp
        | IrOp::Assert
        | IrOp::SaveV2
        | IrOp::SpaceToBatchND
        | IrOp::BatchToSpaceND
        | IrOp::Other(_) => return Lowering::None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_hwio_to_ohwi_moves_elements() {
        let vals: Vec<f32> = (0..24).map(|v| v as f32).collect();
        let t = Tensor::from_vec(vec![1, 2, 3, 4], &vals);
        let node = Node::constant("w", t.clone());
        let out = transpose(&node, &t, &[3, 0, 1, 2]).unwrap();
        assert_eq!(out.shape(), [4, 1, 2, 3]);
        let o: Vec<f32> = out.values().unwrap();
        // out[o][0][w][i] = in[0][w][i][o] = w*12 + i*4 + o
        for oc in 0..4 {
            for w in 0..2 {
                for i in 0..3 {
                    assert_eq!(o[oc * 6 + w * 3 + i], (w * 12 + i * 4 + oc) as f32);
                }
            }
        }
    }

    #[test]
    fn per_axis_quant_follows_the_output_channel() {
        let t = Tensor::from_vec(vec![2, 3], &[1i8, 2, 3, 4, 5, 6]);
        let node = Node::constant("w", t.clone());
        let q = QuantParams::per_axis(vec![0.1, 0.2, 0.3], vec![0, 0, 0], 1);
        let (t2, q2) = rearrange(&node, &t, Some(q), Layout::Transposed).unwrap();
        assert_eq!(t2.shape(), [3, 2]);
        assert_eq!(t2.values::<i8>().unwrap(), vec![1, 4, 2, 5, 3, 6]);
        assert_eq!(q2.unwrap().axis, Some(0));
        let bad = QuantParams::per_axis(vec![0.1, 0.2], vec![0, 0], 0);
        assert!(rearrange(&node, &t, Some(bad), Layout::Transposed).is_err());
    }
}
