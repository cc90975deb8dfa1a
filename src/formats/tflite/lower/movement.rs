//! Lowering of the shape and data-movement ops (TRANSPOSE, TILE, SLICE,
//! STRIDED_SLICE, SPLIT, SPLIT_V, PACK, UNPACK, FILL, ZEROS_LIKE, SHAPE, GATHER,
//! ARG_MAX/ARG_MIN), and the clean-up the converter also does on the operators
//! they leave: chains of reshapes merged, identity reshapes and a transpose read
//! only by an unpack along an axis it keeps in order removed, dead operators and
//! tensors dropped.

use std::collections::{HashMap, HashSet};

use super::{node_err, norm_axis, single, Layout, Lowerer, Value};
use crate::error::Result;
use crate::formats::tflite::model::{Model, Op, TensorDef};
use crate::ir::op::Binary;
use crate::ir::shape_infer::strided_spec;
use crate::ir::{Attr, DType, Node, Op as IrOp, Tensor, TensorRef};

fn int_attr(node: &Node, key: &str, default: i64) -> i64 {
    match node.attr(key) {
        Some(Attr::Int(v)) => *v,
        _ => default,
    }
}

fn i32_of(node: &Node, v: i64) -> Result<i32> {
    i32::try_from(v).map_err(|_| node_err(node, format!("{v} does not fit int32")))
}

impl<'g> Lowerer<'g> {
    /// Emits `op` with one new output tensor per output of the node.
    fn emit_outputs(&mut self, node: &Node, op: Op, inputs: Vec<i32>, n: usize) -> Result<()> {
        let mut outs = Vec::with_capacity(n);
        for k in 0..n {
            let r = TensorRef::new(node.name.clone(), k as u32);
            let t = self.runtime_tensor(node, &r)?;
            self.values.insert(r, Value::Runtime(t));
            outs.push(t);
        }
        self.add_op(op, inputs, outs);
        Ok(())
    }

    fn int_vec(&mut self, node: &Node, what: &str, values: &[i64]) -> Result<i32> {
        self.int_const(
            node,
            format!("{}/{what}", node.name),
            &[values.len() as i64],
            values,
        )
    }

    /// Whether IR tensor `r` is a constant of zeros (FULLY_CONNECTED then takes
    /// no bias, as the converter writes it).
    pub(super) fn is_zero_const(&self, r: &TensorRef) -> bool {
        match self.values.get(r) {
            Some(Value::Const(t, _)) | Some(Value::Stored(t, _, _)) => {
                t.bytes().iter().all(|&b| b == 0)
            }
            _ => false,
        }
    }

    pub(super) fn lower_movement(&mut self, node: &'g Node, op: &IrOp) -> Result<()> {
        let x_ref = || {
            node.inputs
                .first()
                .cloned()
                .ok_or_else(|| node_err(node, "has no input"))
        };
        match op {
            IrOp::Transpose => {
                let perm = self.known_ints(node, 1, "permutation")?;
                let x = self.input(&x_ref()?, Layout::AsIs)?;
                let p = self.int_vec(node, "perm", &perm)?;
                self.emit(node, Op::Transpose, vec![x, p])
            }
            IrOp::Tile => {
                let m = self.known_ints(node, 1, "multiples")?;
                let x = self.input(&x_ref()?, Layout::AsIs)?;
                let p = self.int_vec(node, "multiples", &m)?;
                self.emit(node, Op::Tile, vec![x, p])
            }
            IrOp::Slice => {
                let begin = self.known_ints(node, 1, "begin")?;
                let size = self.known_ints(node, 2, "size")?;
                let x = self.input(&x_ref()?, Layout::AsIs)?;
                let b = self.int_vec(node, "begin", &begin)?;
                let s = self.int_vec(node, "size", &size)?;
                self.emit(node, Op::Slice, vec![x, b, s])
            }
            IrOp::StridedSlice => self.lower_strided_slice(node),
            IrOp::Split | IrOp::SplitV => {
                let v = *op == IrOp::SplitV;
                let (xi, ai) = if v { (0, 2) } else { (1, 0) };
                let axis = single(node, self.known_ints(node, ai, "axis")?)?;
                let axis = norm_axis(node, axis, self.input_rank(node, xi)?)?;
                let num = i32_of(node, int_attr(node, "num_split", 0))?;
                let x = self.input(&node.inputs[xi], Layout::AsIs)?;
                let a = self.int_const(node, format!("{}/axis", node.name), &[], &[axis])?;
                if v {
                    let sizes = self.known_ints(node, 1, "size_splits")?;
                    let s = self.int_vec(node, "size_splits", &sizes)?;
                    self.emit_outputs(node, Op::SplitV { num }, vec![x, s, a], num as usize)
                } else {
                    self.emit_outputs(node, Op::Split { num }, vec![a, x], num as usize)
                }
            }
            IrOp::Pack => {
                let rank = self.input_rank(node, 0)?;
                let axis = norm_axis(node, int_attr(node, "axis", 0), rank + 1)?;
                let mut ins = Vec::with_capacity(node.inputs.len());
                for r in &node.inputs {
                    ins.push(self.input(r, Layout::AsIs)?);
                }
                let count = i32_of(node, ins.len() as i64)?;
                let axis = axis as i32;
                self.emit(node, Op::Pack { count, axis }, ins)
            }
            IrOp::Unpack => {
                let r = x_ref()?;
                let shape = self.info(node, &r)?.shape.clone();
                let axis = norm_axis(node, int_attr(node, "axis", 0), shape.len())?;
                let num = shape[axis as usize];
                if num < 0 {
                    return Err(node_err(node, "unpacks a dimension of unknown size"));
                }
                let x = self.input(&r, Layout::AsIs)?;
                let op = Op::Unpack {
                    num: i32_of(node, num)?,
                    axis: axis as i32,
                };
                self.emit_outputs(node, op, vec![x], num as usize)
            }
            IrOp::Fill => self.lower_fill(node),
            IrOp::ZerosLike => {
                let x = self.input(&x_ref()?, Layout::AsIs)?;
                if matches!(self.tensor_dtype(x), Some(DType::I8 | DType::I16)) {
                    // TFLite's ZEROS_LIKE has no int8 or int16 kernel; x - x is
                    // exactly the zero point.
                    let op = Op::Sub {
                        activation: crate::formats::tflite::model::Activation::None,
                    };
                    return self.emit(node, op, vec![x, x]);
                }
                self.emit(node, Op::ZerosLike, vec![x])
            }
            IrOp::Shape => {
                let out = self
                    .info(node, &TensorRef::new(node.name.clone(), 0))?
                    .dtype;
                let x = self.input(&x_ref()?, Layout::AsIs)?;
                self.emit(node, Op::Shape { output: out }, vec![x])
            }
            IrOp::Gather => {
                let params = self.input(&x_ref()?, Layout::AsIs)?;
                let indices = self.input(&node.inputs[1], Layout::AsIs)?;
                let op = Op::Gather {
                    axis: 0,
                    batch_dims: 0,
                };
                self.emit(node, op, vec![params, indices])
            }
            IrOp::ArgMax | IrOp::ArgMin => {
                let axis = single(node, self.known_ints(node, 1, "axis")?)?;
                let axis = norm_axis(node, axis, self.input_rank(node, 0)?)?;
                let output = self
                    .info(node, &TensorRef::new(node.name.clone(), 0))?
                    .dtype;
                let x = self.input(&x_ref()?, Layout::AsIs)?;
                let a = self.int_vec(node, "axis", &[axis])?;
                let op = if *op == IrOp::ArgMax {
                    Op::ArgMax { output }
                } else {
                    Op::ArgMin { output }
                };
                self.emit(node, op, vec![x, a])
            }
            _ => Err(node_err(node, "is not a data-movement op")),
        }
    }

    /// STRIDED_SLICE over the input's dimensions (ellipsis expanded, new axes
    /// dropped, shrunk axes by TFLite's shrink mask), then a RESHAPE when new
    /// axes were asked for; a slice that takes everything is only the reshape.
    fn lower_strided_slice(&mut self, node: &Node) -> Result<()> {
        let begin = self.known_ints(node, 1, "begin")?;
        let end = self.known_ints(node, 2, "end")?;
        let strides = self.known_ints(node, 3, "strides")?;
        let xr = node.inputs[0].clone();
        let in_shape = self.info(node, &xr)?.shape.clone();
        let spec = strided_spec(node, &in_shape, &begin, &end, &strides)?;
        let x = self.input(&xr, Layout::AsIs)?;
        let out = TensorRef::new(node.name.clone(), 0);
        let info = self.info(node, &out)?.clone();
        let sliced: Vec<i64> = spec
            .dims
            .iter()
            .filter(|d| !d.shrink)
            .map(|d| d.size)
            .collect();
        let mut t = x;
        if !spec.dims.iter().all(|d| d.is_full()) {
            let (mut b, mut e, mut s) = (Vec::new(), Vec::new(), Vec::new());
            let (mut bm, mut em, mut sm) = (0i32, 0i32, 0i32);
            for (j, d) in spec.dims.iter().enumerate() {
                b.push(d.begin);
                s.push(d.stride);
                if d.shrink {
                    sm |= 1 << j;
                    e.push(d.begin + 1);
                    continue;
                }
                if d.begin_masked {
                    bm |= 1 << j;
                }
                match d.end {
                    Some(v) => e.push(v),
                    None => {
                        em |= 1 << j;
                        e.push(0);
                    }
                }
            }
            let bt = self.int_vec(node, "begin", &b)?;
            let et = self.int_vec(node, "end", &e)?;
            let st = self.int_vec(node, "strides", &s)?;
            let op = Op::StridedSlice {
                begin_mask: bm,
                end_mask: em,
                shrink_axis_mask: sm,
            };
            if sliced == info.shape {
                return self.emit(node, op, vec![x, bt, et, st]);
            }
            let q = self.graph.nodes[self.index[node.name.as_str()]]
                .output_quant
                .get(&0)
                .cloned();
            t = self.add_tensor(
                node,
                format!("{}/sliced", node.name),
                info.dtype,
                &sliced,
                None,
                q,
            )?;
            self.add_op(op, vec![x, bt, et, st], vec![t]);
        }
        if info.shape.iter().filter(|&&d| d < 0).count() > 1 {
            return Err(node_err(
                node,
                "adds axes to a slice with more than one dimension unknown before run time",
            ));
        }
        let shape = self.int_vec(node, "shape", &info.shape)?;
        self.emit(node, Op::Reshape, vec![t, shape])
    }

    /// A fill with a constant value is a constant; where the shape is known
    /// only at run time (a batch) and every reader broadcasts it against a
    /// tensor that has that dimension, a constant with 1 there, as the converter
    /// folds it. Otherwise FILL of the shape computed at run time.
    fn lower_fill(&mut self, node: &Node) -> Result<()> {
        let out = TensorRef::new(node.name.clone(), 0);
        let shape = self.info(node, &out)?.shape.clone();
        let (value, stored) = match self.input_value(node, 1)? {
            Value::Const(t, q) if t.len() == 1 => (Some((t, q)), None),
            Value::Stored(t, q, source) if t.len() == 1 => (Some((t, q)), Some(source)),
            _ => (None, None),
        };
        if let Some((v, q)) = value {
            let broadcast_ok = !self.outputs.contains(&out)
                && self
                    .consumers
                    .get(&out)
                    .is_some_and(|cs| cs.iter().all(|&c| self.broadcasts_fill(c, &out, &shape)));
            if !shape.contains(&-1) || broadcast_ok {
                let dims: Vec<usize> = shape.iter().map(|&d| d.max(1) as usize).collect();
                let n: usize = dims.iter().product();
                if n <= 1 << 24 {
                    let bytes = v.bytes().repeat(n);
                    let t = Tensor::from_bytes(v.dtype(), dims, bytes)
                        .map_err(|e| node_err(node, e))?;
                    match stored {
                        Some(source) => self.set(node, Value::Stored(t, q, source)),
                        None => self.set(node, Value::Const(t, q)),
                    }
                    return Ok(());
                }
            }
        }
        let dims = self.input(&node.inputs[0], Layout::AsIs)?;
        let v = self.input(&node.inputs[1], Layout::AsIs)?;
        self.emit(node, Op::Fill, vec![dims, v])
    }

    /// Whether node `c` is an element-wise binary op whose other operand has
    /// every dimension `fill` (of `shape`) leaves to run time, so that a fill
    /// with 1 there broadcasts to the same result.
    fn broadcasts_fill(&self, c: usize, fill: &TensorRef, shape: &[i64]) -> bool {
        let cn = &self.graph.nodes[c];
        let binary = matches!(
            self.ops[c],
            IrOp::Binary(
                Binary::Add
                    | Binary::AddV2
                    | Binary::Sub
                    | Binary::Mul
                    | Binary::RealDiv
                    | Binary::Maximum
                    | Binary::Minimum
            )
        );
        if !binary || cn.inputs.len() != 2 || cn.inputs[0] == cn.inputs[1] {
            return false;
        }
        let other = if &cn.inputs[0] == fill {
            &cn.inputs[1]
        } else {
            &cn.inputs[0]
        };
        let Some(o) = self.infos.get(other) else {
            return false;
        };
        if o.shape.len() < shape.len() {
            return false;
        }
        let off = o.shape.len() - shape.len();
        shape
            .iter()
            .enumerate()
            .all(|(j, &d)| d >= 0 || o.shape[off + j] == -1)
    }
}

/// The clean-up after lowering; see the module doc.
pub(super) fn tidy(model: &mut Model) {
    loop {
        let changed = merge_reshapes(model) | unpack_through_transpose(model);
        prune(model);
        if !changed {
            break;
        }
    }
}

fn is_reshape(op: &Op) -> bool {
    matches!(op, Op::Reshape | Op::ExpandDims | Op::Squeeze { .. })
}

fn uses(model: &Model) -> HashMap<i32, usize> {
    let mut n = HashMap::new();
    for op in &model.operators {
        for &t in &op.inputs {
            *n.entry(t).or_insert(0) += 1;
        }
    }
    for (_, t) in &model.outputs {
        *n.entry(*t).or_insert(0) += 1;
    }
    n
}

fn producer(model: &Model, t: i32) -> Option<usize> {
    model.operators.iter().position(|o| o.outputs.contains(&t))
}

fn signature(model: &Model, t: i32) -> Option<Vec<i32>> {
    let d = model.tensor(t)?;
    Some(d.shape_signature.clone().unwrap_or_else(|| d.shape.clone()))
}

/// A reshape of a reshape read by nothing else reads the first one's input
/// (as one RESHAPE); a reshape to its input's own shape is dropped.
fn merge_reshapes(model: &mut Model) -> bool {
    let outputs: HashSet<i32> = model.outputs.iter().map(|(_, t)| *t).collect();
    let mut changed = false;
    for i in 0..model.operators.len() {
        if !is_reshape(&model.operators[i].op) || model.operators[i].inputs.is_empty() {
            continue;
        }
        let out = model.operators[i].outputs[0];
        let Some(target) = signature(model, out) else {
            continue;
        };
        if target.iter().filter(|&&d| d < 0).count() > 1 {
            continue;
        }
        let mut src = model.operators[i].inputs[0];
        let counts = uses(model);
        while let Some(p) = producer(model, src) {
            let first = &model.operators[p];
            if !is_reshape(&first.op)
                || first.inputs.is_empty()
                || counts.get(&src) != Some(&1)
                || outputs.contains(&src)
            {
                break;
            }
            src = first.inputs[0];
        }
        let same_type = model.tensor(src).map(|t| (t.dtype, t.quant.clone()))
            == model.tensor(out).map(|t| (t.dtype, t.quant.clone()));
        if !same_type {
            continue;
        }
        if signature(model, src) == Some(target.clone()) && !outputs.contains(&out) {
            for op in &mut model.operators {
                for t in &mut op.inputs {
                    if *t == out {
                        *t = src;
                    }
                }
            }
            model.operators[i].inputs = vec![];
            changed = true;
            continue;
        }
        if src == model.operators[i].inputs[0] {
            continue;
        }
        let data: Vec<u8> = target.iter().flat_map(|d| d.to_le_bytes()).collect();
        let name = format!("{}/shape", model.tensors[out as usize].name);
        let shape_t = model.tensors.len() as i32;
        model.tensors.push(TensorDef {
            name,
            dtype: DType::I32,
            shape: vec![target.len() as i32],
            shape_signature: None,
            data: Some(data.into()),
            quant: None,
        });
        let op = &mut model.operators[i];
        op.op = Op::Reshape;
        op.inputs = vec![src, shape_t];
        changed = true;
    }
    // Reshapes emptied above are dead.
    model
        .operators
        .retain(|o| !(is_reshape(&o.op) && o.inputs.is_empty()));
    changed
}

/// UNPACK of a TRANSPOSE read by nothing else, where the transposition keeps
/// the other dimensions in order, unpacks the transpose's input directly.
fn unpack_through_transpose(model: &mut Model) -> bool {
    let outputs: HashSet<i32> = model.outputs.iter().map(|(_, t)| *t).collect();
    let counts = uses(model);
    for i in 0..model.operators.len() {
        let Op::Unpack { num, axis } = model.operators[i].op else {
            continue;
        };
        let src = model.operators[i].inputs[0];
        let Some(p) = producer(model, src) else {
            continue;
        };
        if model.operators[p].op != Op::Transpose
            || counts.get(&src) != Some(&1)
            || outputs.contains(&src)
        {
            continue;
        }
        let Some(perm) = model
            .tensor(model.operators[p].inputs[1])
            .and_then(|t| t.data.clone())
            .map(|d| {
                d.chunks_exact(4)
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect::<Vec<_>>()
            })
        else {
            continue;
        };
        let Some(&new_axis) = perm.get(axis as usize) else {
            continue;
        };
        let rest: Vec<i32> = perm
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != axis as usize)
            .map(|(_, &v)| v)
            .collect();
        if !rest.windows(2).all(|w| w[0] < w[1]) {
            continue;
        }
        let input = model.operators[p].inputs[0];
        let op = &mut model.operators[i];
        op.op = Op::Unpack {
            num,
            axis: new_axis,
        };
        op.inputs[0] = input;
        return true;
    }
    false
}

/// Drops operators whose outputs nothing reads, then tensors nothing refers
/// to, renumbering the rest in order.
fn prune(model: &mut Model) {
    loop {
        let counts = uses(model);
        let before = model.operators.len();
        model
            .operators
            .retain(|o| o.outputs.iter().any(|t| counts.contains_key(t)));
        if model.operators.len() == before {
            break;
        }
    }
    let mut used = vec![false; model.tensors.len()];
    let mut mark = |t: i32| {
        if let Some(u) = usize::try_from(t).ok().and_then(|t| used.get_mut(t)) {
            *u = true;
        }
    };
    for op in &model.operators {
        op.inputs.iter().chain(&op.outputs).for_each(|&t| mark(t));
    }
    for (_, t) in model.inputs.iter().chain(&model.outputs) {
        mark(*t);
    }
    let mut new_index = vec![-1i32; used.len()];
    let mut next = 0;
    for (i, u) in used.iter().enumerate() {
        if *u {
            new_index[i] = next;
            next += 1;
        }
    }
    if next as usize == used.len() {
        return;
    }
    let remap = |t: &mut i32| {
        if *t >= 0 {
            *t = new_index[*t as usize];
        }
    };
    for op in &mut model.operators {
        op.inputs
            .iter_mut()
            .chain(op.outputs.iter_mut())
            .for_each(remap);
    }
    for (_, t) in model.inputs.iter_mut().chain(model.outputs.iter_mut()) {
        remap(t);
    }
    let mut k = 0;
    model.tensors.retain(|_| {
        k += 1;
        used[k - 1]
    });
}
