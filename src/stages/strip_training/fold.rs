//! Constant folding by abstract interpretation.
//!
//! Every tensor gets an abstract value: a constant, a tensor whose elements all equal
//! one scalar (`Uniform`), a random tensor whose elements lie in an interval
//! (`Range`), a vector of dimensions some of which are symbolic (`Dims`, what
//! `Shape` of a batch-sized tensor gives), or an unknown tensor with a possibly
//! symbolic shape. Shapes are symbolic: an unknown dimension is a symbol, and two
//! dimensions are equal only when they are the same known size or the same symbol.
//!
//! With these, one pass in topological order folds constant subgraphs, resolves
//! reshape targets computed from `Shape`, and removes dropout: `RandomUniform` gives a
//! `[0, 1)` range, comparing it with a rate of 0 gives an all-true mask, selecting or
//! multiplying with an all-true/all-one mask whose shape does not widen the other
//! operand is that operand. A rewrite happens only when the shapes prove it exact.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::ir::op::{never_fold, Forward, Layout, Random};
use crate::ir::shape_infer::window_out;
use crate::ir::{Attr, DType, Graph, Node, Op, Tensor, TensorRef};
use crate::kernels::array::{norm_axis, strided_slice_spec, SliceMasks};
use crate::kernels::elementwise::{cast, BinaryOp, UnaryOp};
use crate::kernels::{eval_node, StepQuant, Value};

/// A dimension or shape-vector element: known, or a symbol standing for an unknown size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum D {
    K(i64),
    S(u32),
}

pub type Shape = Vec<D>;

/// An interval of real values with open or closed ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    pub lo: f64,
    pub hi: f64,
    pub lo_closed: bool,
    pub hi_closed: bool,
}

#[derive(Debug, Clone)]
pub enum Abs {
    Const(Value),
    /// Every element equals this scalar.
    Uniform(Value, Shape),
    /// Random elements within an interval.
    Range(Interval, Shape, DType),
    /// An integer vector (or scalar) of dimensions.
    Dims(Vec<D>, bool, DType),
    Unknown(Option<Shape>),
    /// On a branch of a `Switch` whose predicate is constant and selects the other branch.
    Dead,
}

impl Abs {
    pub fn shape(&self) -> Option<Shape> {
        match self {
            Abs::Const(v) => Some(v.shape.iter().map(|&d| D::K(d as i64)).collect()),
            Abs::Uniform(_, s) | Abs::Range(_, s, _) => Some(s.clone()),
            Abs::Dims(d, scalar, _) => Some(if *scalar {
                vec![]
            } else {
                vec![D::K(d.len() as i64)]
            }),
            Abs::Unknown(s) => s.clone(),
            Abs::Dead => None,
        }
    }

    fn konst(&self) -> Option<&Value> {
        match self {
            Abs::Const(v) => Some(v),
            _ => None,
        }
    }

    /// The single value every element has, if that is known.
    fn uniform_value(&self) -> Option<f64> {
        match self {
            Abs::Const(v) => {
                let f = v.to_f64s().ok()?;
                let first = *f.first()?;
                f.iter().all(|&x| x == first).then_some(first)
            }
            Abs::Uniform(v, _) => v.to_f64s().ok()?.first().copied(),
            _ => None,
        }
    }
}

/// Counters the pass reports.
#[derive(Debug, Default)]
pub struct FoldStats {
    /// Nodes replaced by constants, by their original op.
    pub folded: BTreeMap<String, usize>,
    /// Nodes bypassed because they compute their input unchanged (x*1, x/1, select on an all-true mask, ...).
    pub simplified: BTreeMap<String, usize>,
    /// Reshape targets computed from `Shape` that became constants with -1.
    pub reshape_targets: usize,
}

struct Ctx {
    next_sym: u32,
}

impl Ctx {
    fn fresh(&mut self) -> D {
        self.next_sym += 1;
        D::S(self.next_sym)
    }
}

fn known(s: &[D]) -> Option<Vec<usize>> {
    s.iter()
        .map(|d| match d {
            D::K(k) if *k >= 0 => Some(*k as usize),
            _ => None,
        })
        .collect()
}

fn broadcast(a: &[D], b: &[D], cx: &mut Ctx) -> Option<Shape> {
    let r = a.len().max(b.len());
    let mut out = Vec::with_capacity(r);
    for i in 0..r {
        let da = if i + a.len() >= r {
            a[i + a.len() - r]
        } else {
            D::K(1)
        };
        let db = if i + b.len() >= r {
            b[i + b.len() - r]
        } else {
            D::K(1)
        };
        out.push(match (da, db) {
            (x, y) if x == y => x,
            (D::K(1), y) => y,
            (x, D::K(1)) => x,
            (D::K(_), D::K(_)) => return None,
            (D::K(k), D::S(_)) | (D::S(_), D::K(k)) => D::K(k),
            (D::S(_), D::S(_)) => cx.fresh(),
        });
    }
    Some(out)
}

/// Node output → abstract value of output 0 (strip only folds single-result values).
struct Pass<'a> {
    cx: Ctx,
    abs: HashMap<String, Vec<Abs>>,
    declared: &'a HashSet<String>,
    /// Bypass: a node output → the tensor it equals (an input, or a live `Switch` input).
    alias: HashMap<(String, u32), TensorRef>,
    /// New constant nodes to add (resolved reshape targets, uniform operands made scalar).
    new_consts: Vec<Node>,
    /// Every node name in use, so that new constants get fresh ones.
    names: HashSet<String>,
    stats: FoldStats,
    /// The tensor each `Const` node's value was read from, by the value's buffer (held
    /// in `abs` for the whole pass, so the address is not reused): a node folded to the
    /// same buffer (an `Identity` of a constant) shares the tensor instead of copying it.
    origin: HashMap<usize, Tensor>,
}

fn as_shape_value(a: &Abs) -> Option<Vec<D>> {
    match a {
        Abs::Const(v) if v.rank() <= 1 => {
            v.to_i64s().ok().map(|v| v.into_iter().map(D::K).collect())
        }
        Abs::Dims(d, false, _) => Some(d.clone()),
        _ => None,
    }
}

fn dims_or_const(d: Vec<D>, scalar: bool, dtype: DType) -> Result<Abs> {
    if let Some(k) = d
        .iter()
        .map(|x| match x {
            D::K(k) => Some(*k),
            D::S(_) => None,
        })
        .collect::<Option<Vec<i64>>>()
    {
        let shape = if scalar { vec![] } else { vec![k.len()] };
        let v = Value::from_vec(shape, k);
        return Ok(Abs::Const(cast(&v, dtype)?));
    }
    Ok(Abs::Dims(d, scalar, dtype))
}

impl Pass<'_> {
    fn input_abs(&self, r: &TensorRef) -> Abs {
        match self.abs.get(&r.node) {
            Some(v) if matches!(v.first(), Some(Abs::Dead)) && v.len() == 1 => Abs::Dead,
            Some(v) => v
                .get(r.index as usize)
                .cloned()
                .unwrap_or(Abs::Unknown(None)),
            None => Abs::Unknown(None),
        }
    }

    fn shape_from_attr(&mut self, node: &Node) -> Option<Shape> {
        match node.attr("shape") {
            Some(Attr::Shape(Some(dims))) => Some(
                dims.iter()
                    .map(|&d| if d < 0 { self.cx.fresh() } else { D::K(d) })
                    .collect(),
            ),
            _ => None,
        }
    }

    /// Computes the abstract outputs of `node`; may record an alias or rewrite inputs.
    fn visit(&mut self, node: &mut Node) -> Result<Vec<Abs>> {
        let ins: Vec<Abs> = node.inputs.iter().map(|r| self.input_abs(r)).collect();
        let op = node.op.clone();
        if self.declared.contains(&node.name) {
            let s = self.shape_from_attr(node);
            return Ok(vec![Abs::Unknown(s)]);
        }
        if node.is_const() {
            return Ok(vec![match node.const_value() {
                Some(t) => match Value::from_tensor(t) {
                    Ok(v) => {
                        self.origin.insert(Arc::as_ptr(&v.buf) as usize, t.clone());
                        Abs::Const(v)
                    }
                    Err(_) => Abs::Unknown(None),
                },
                None => Abs::Unknown(None),
            }]);
        }
        if op == "Switch" || op == "RefSwitch" {
            return Ok(self.switch(node, &ins));
        }
        if op == "Merge" || op == "RefMerge" {
            return Ok(self.merge(node, &ins));
        }
        if ins.iter().any(|a| matches!(a, Abs::Dead)) {
            return Ok(vec![Abs::Dead]);
        }
        if !never_fold(&op) && !ins.is_empty() && ins.iter().all(|a| a.konst().is_some()) {
            let vals: Vec<Value> = ins.iter().filter_map(|a| a.konst().cloned()).collect();
            let in_elems: usize = vals.iter().map(|v| v.len()).sum();
            if let Ok(outs) = eval_node(node, vals, &StepQuant::default()) {
                let out_elems: usize = outs.iter().map(|v| v.len()).sum();
                if out_elems <= 2 * in_elems + (1 << 20) {
                    return Ok(outs.into_iter().map(Abs::Const).collect());
                }
            }
        }
        let a = |i: usize| ins.get(i).cloned().unwrap_or(Abs::Unknown(None));
        let sh = |i: usize| ins.get(i).and_then(Abs::shape);
        // An op whose attributes do not parse is not folded: its result is unknown.
        let parsed = Op::parse(node).unwrap_or_else(|_| Op::Other(op.clone()));
        let out = match parsed {
            Op::Placeholder => {
                let s = self.shape_from_attr(node);
                Abs::Unknown(s)
            }
            Op::Random(Random::Uniform) => {
                let dt = node.attr_type("dtype").unwrap_or(DType::F32);
                match as_shape_value(&a(0)) {
                    Some(s) if dt.is_float() => Abs::Range(
                        Interval {
                            lo: 0.0,
                            hi: 1.0,
                            lo_closed: true,
                            hi_closed: false,
                        },
                        s,
                        dt,
                    ),
                    s => Abs::Unknown(s),
                }
            }
            Op::Shape => match sh(0) {
                Some(s) => {
                    let dt = node.attr_type("out_type").unwrap_or(DType::I32);
                    dims_or_const(s, false, dt)?
                }
                None => Abs::Unknown(None),
            },
            Op::Size | Op::Rank => Abs::Unknown(Some(vec![])),
            Op::StridedSlice => self.strided_slice(node, &ins)?,
            Op::Pack => {
                let dt = node.attr_type("T").unwrap_or(DType::I32);
                let axis = node.attr_int("axis").unwrap_or(0);
                let mut dims = Vec::new();
                let mut all = axis == 0 && !dt.is_float();
                for x in &ins {
                    match x {
                        Abs::Dims(d, true, _) => dims.push(d[0]),
                        Abs::Const(v) if v.rank() == 0 => match v.to_i64s() {
                            Ok(k) => dims.push(D::K(k[0])),
                            Err(_) => all = false,
                        },
                        _ => all = false,
                    }
                }
                if all {
                    dims_or_const(dims, false, dt)?
                } else {
                    let mut s = sh(0);
                    if let Some(s) = s.as_mut() {
                        match norm_axis(axis, s.len(), true) {
                            Ok(ax) => s.insert(ax, D::K(ins.len() as i64)),
                            Err(_) => return Ok(vec![Abs::Unknown(None)]),
                        }
                    }
                    Abs::Unknown(s)
                }
            }
            Op::ConcatV2 => self.concat(node, &ins)?,
            Op::Cast => {
                let to = node.attr_type("DstT")?;
                match a(0) {
                    Abs::Uniform(v, s) => Abs::Uniform(cast(&v, to)?, s),
                    Abs::Dims(d, sc, from) if !from.is_float() && !to.is_float() => {
                        dims_or_const(d, sc, to)?
                    }
                    x => {
                        if node.attr_type("SrcT").ok() == Some(to) {
                            self.bypass(node, 0);
                        }
                        Abs::Unknown(x.shape())
                    }
                }
            }
            Op::Reshape => self.reshape(node, &ins)?,
            Op::Select | Op::SelectV2 => self.select(node, &ins)?,
            Op::Unary(u) => self.unary(UnaryOp::from_ir(u), &a(0))?,
            Op::Binary(b) => self.binary(node, BinaryOp::from_ir(b), &ins)?,
            Op::Compare(c) => self.binary(node, BinaryOp::from_compare(c), &ins)?,
            other => Abs::Unknown(self.infer_shape(node, &other, &ins)),
        };
        Ok(vec![out])
    }

    /// Adds a constant named after `base` (made unique) and returns its name.
    fn add_const(&mut self, base: String, v: &Value) -> String {
        let mut name = base.clone();
        let mut k = 1;
        while self.names.contains(&name) {
            name = format!("{base}_{k}");
            k += 1;
        }
        self.names.insert(name.clone());
        self.new_consts
            .push(Node::constant(name.clone(), v.to_tensor()));
        self.abs.insert(name.clone(), vec![Abs::Const(v.clone())]);
        name
    }

    /// `Switch(data, pred)` with a constant predicate: output `pred` (1 = true) is
    /// the data, the other output is dead.
    fn switch(&mut self, node: &Node, ins: &[Abs]) -> Vec<Abs> {
        let (Some(data), Some(pred)) = (ins.first(), ins.get(1)) else {
            return vec![Abs::Unknown(None), Abs::Unknown(None)];
        };
        if matches!(data, Abs::Dead) || matches!(pred, Abs::Dead) {
            return vec![Abs::Dead];
        }
        match pred.uniform_value() {
            Some(p) => {
                let live = (p != 0.0) as u32;
                self.alias
                    .insert((node.name.clone(), live), node.inputs[0].clone());
                *self.stats.simplified.entry(node.op.clone()).or_default() += 1;
                let mut out = vec![Abs::Dead, Abs::Dead];
                out[live as usize] = data.clone();
                out
            }
            None => vec![Abs::Unknown(data.shape()), Abs::Unknown(data.shape())],
        }
    }

    /// `Merge` with exactly one live input is that input.
    fn merge(&mut self, node: &Node, ins: &[Abs]) -> Vec<Abs> {
        let live: Vec<usize> = (0..ins.len())
            .filter(|&i| !matches!(ins[i], Abs::Dead))
            .collect();
        match live.as_slice() {
            [] => vec![Abs::Dead],
            [i] => {
                self.alias
                    .insert((node.name.clone(), 0), node.inputs[*i].clone());
                *self.stats.simplified.entry(node.op.clone()).or_default() += 1;
                vec![ins[*i].clone(), Abs::Const(Value::scalar(*i as i32))]
            }
            _ => vec![Abs::Unknown(None), Abs::Unknown(Some(vec![]))],
        }
    }

    fn bypass(&mut self, node: &Node, input: usize) {
        if let Some(r) = node.inputs.get(input) {
            self.alias.insert((node.name.clone(), 0), r.clone());
            *self.stats.simplified.entry(node.op.clone()).or_default() += 1;
        }
    }

    fn strided_slice(&mut self, node: &Node, ins: &[Abs]) -> Result<Abs> {
        let (Some(dims), Some(b), Some(e), Some(s)) = (
            ins.first()
                .and_then(as_shape_value)
                .filter(|_| matches!(ins.first(), Some(Abs::Dims(..)))),
            ins.get(1).and_then(Abs::konst),
            ins.get(2).and_then(Abs::konst),
            ins.get(3).and_then(Abs::konst),
        ) else {
            return Ok(Abs::Unknown(None));
        };
        let m = SliceMasks {
            begin: node.attr_int("begin_mask").unwrap_or(0),
            end: node.attr_int("end_mask").unwrap_or(0),
            ellipsis: node.attr_int("ellipsis_mask").unwrap_or(0),
            new_axis: node.attr_int("new_axis_mask").unwrap_or(0),
            shrink_axis: node.attr_int("shrink_axis_mask").unwrap_or(0),
        };
        let spec = match strided_slice_spec(
            &[dims.len()],
            &b.to_i64s()?,
            &e.to_i64s()?,
            &s.to_i64s()?,
            m,
        ) {
            Ok(s) => s,
            Err(_) => return Ok(Abs::Unknown(None)),
        };
        if spec.final_shape.len() > 1 {
            return Ok(Abs::Unknown(None));
        }
        let picked: Vec<D> = (0..spec.sizes[0])
            .map(|i| dims[(spec.begin[0] + i as i64 * spec.strides[0]) as usize])
            .collect();
        let dt = match ins.first() {
            Some(Abs::Dims(_, _, dt)) => *dt,
            _ => DType::I32,
        };
        dims_or_const(picked, spec.final_shape.is_empty(), dt)
    }

    fn concat(&mut self, node: &Node, ins: &[Abs]) -> Result<Abs> {
        let n = ins.len();
        let Some(axis) = ins
            .last()
            .and_then(Abs::konst)
            .and_then(|v| v.to_i64s().ok())
            .and_then(|v| v.first().copied())
        else {
            return Ok(Abs::Unknown(None));
        };
        let parts = &ins[..n.saturating_sub(1)];
        let dt = node.attr_type("T").unwrap_or(DType::F32);
        if !dt.is_float()
            && parts.iter().all(|p| as_shape_value(p).is_some())
            && (axis == 0 || axis == -1)
        {
            let d: Vec<D> = parts
                .iter()
                .flat_map(|p| as_shape_value(p).unwrap_or_default())
                .collect();
            return dims_or_const(d, false, dt);
        }
        let shapes: Option<Vec<Shape>> = parts.iter().map(Abs::shape).collect();
        let Some(shapes) = shapes else {
            return Ok(Abs::Unknown(None));
        };
        let Some(first) = shapes.first() else {
            return Ok(Abs::Unknown(None));
        };
        let Ok(ax) = norm_axis(axis, first.len(), false) else {
            return Ok(Abs::Unknown(None));
        };
        let mut out = first.clone();
        let total: Option<i64> = shapes
            .iter()
            .map(|s| match s.get(ax) {
                Some(D::K(k)) => Some(*k),
                _ => None,
            })
            .sum();
        out[ax] = match total {
            Some(t) => D::K(t),
            None => self.cx.fresh(),
        };
        Ok(Abs::Unknown(Some(out)))
    }

    fn reshape(&mut self, node: &mut Node, ins: &[Abs]) -> Result<Abs> {
        let x_shape = ins.first().and_then(Abs::shape);
        let target = ins.get(1).and_then(as_shape_value);
        let Some(target) = target else {
            return Ok(Abs::Unknown(None));
        };
        let tdt = match ins.get(1) {
            Some(Abs::Dims(_, _, dt)) => *dt,
            Some(Abs::Const(v)) => v.dtype(),
            _ => DType::I32,
        };
        // Symbolic element counts: known product and the multiset of symbols.
        let count = |s: &[D]| -> (i64, Vec<u32>, usize) {
            let mut k = 1i64;
            let mut syms = Vec::new();
            let mut minus = 0;
            for d in s {
                match d {
                    D::K(-1) => minus += 1,
                    D::K(v) => k = k.saturating_mul(*v),
                    D::S(s) => syms.push(*s),
                }
            }
            syms.sort_unstable();
            (k, syms, minus)
        };
        let (tk, tsyms, tminus) = count(&target);
        let mut out = target.clone();
        if let Some(xs) = &x_shape {
            let (xk, xsyms, _) = count(xs);
            if tminus == 0 && tsyms.len() == 1 && tsyms == xsyms && tk == xk {
                let dims: Vec<i64> = target
                    .iter()
                    .map(|d| match d {
                        D::K(k) => *k,
                        D::S(_) => -1,
                    })
                    .collect();
                let v = cast(&Value::from_vec(vec![dims.len()], dims), tdt)?;
                let name = self.add_const(format!("{}/shape_resolved", node.name), &v);
                node.inputs[1] = TensorRef::new(name, 0);
                self.stats.reshape_targets += 1;
                return Ok(Abs::Unknown(Some(target)));
            }
            if tminus == 1 && tsyms.is_empty() && xsyms.is_empty() && tk > 0 && xk % tk == 0 {
                for d in out.iter_mut() {
                    if *d == D::K(-1) {
                        *d = D::K(xk / tk);
                    }
                }
                return Ok(Abs::Unknown(Some(out)));
            }
            if tminus == 1 && tsyms.is_empty() && xsyms.len() == 1 && tk > 0 && xk == tk {
                for d in out.iter_mut() {
                    if *d == D::K(-1) {
                        *d = D::S(xsyms[0]);
                    }
                }
                return Ok(Abs::Unknown(Some(out)));
            }
        }
        for d in out.iter_mut() {
            if *d == D::K(-1) {
                *d = self.cx.fresh();
            }
        }
        Ok(Abs::Unknown(Some(out)))
    }

    fn select(&mut self, node: &Node, ins: &[Abs]) -> Result<Abs> {
        let (c, x, y) = match ins {
            [c, x, y] => (c, x, y),
            _ => return Ok(Abs::Unknown(None)),
        };
        let (Some(cs), Some(xs), Some(ys)) = (c.shape(), x.shape(), y.shape()) else {
            return Ok(Abs::Unknown(None));
        };
        let v2 = node.op == Op::SelectV2.name();
        let out = if v2 {
            broadcast(&cs, &xs, &mut self.cx).and_then(|s| broadcast(&s, &ys, &mut self.cx))
        } else if xs == ys {
            Some(xs.clone())
        } else {
            None
        };
        let Some(out) = out else {
            return Ok(Abs::Unknown(None));
        };
        let cond = match c {
            Abs::Uniform(..) | Abs::Const(_) if c.uniform_value().is_some() => {
                c.uniform_value().map(|v| v != 0.0)
            }
            _ => None,
        };
        let cond_ok = v2 || cs == xs || cs.len() == 1;
        if let (Some(pick), true) = (cond, cond_ok) {
            let (idx, chosen) = if pick { (1, &xs) } else { (2, &ys) };
            if *chosen == out {
                self.bypass(node, idx);
                return Ok(if pick { x.clone() } else { y.clone() });
            }
        }
        Ok(Abs::Unknown(Some(out)))
    }

    fn unary(&mut self, u: UnaryOp, x: &Abs) -> Result<Abs> {
        Ok(match x {
            Abs::Uniform(v, s) => {
                Abs::Uniform(crate::kernels::elementwise::unary(u, v.clone())?, s.clone())
            }
            Abs::Range(iv, s, dt) if u == UnaryOp::Floor => {
                let f = iv.lo.floor();
                let top = if iv.hi_closed {
                    iv.hi.floor()
                } else if iv.hi == iv.hi.floor() {
                    iv.hi - 1.0
                } else {
                    iv.hi.floor()
                };
                if f == top {
                    Abs::Uniform(cast(&Value::scalar(f), *dt)?, s.clone())
                } else {
                    Abs::Unknown(Some(s.clone()))
                }
            }
            other => Abs::Unknown(other.shape()),
        })
    }

    fn binary(&mut self, node: &mut Node, op: BinaryOp, ins: &[Abs]) -> Result<Abs> {
        let (a, b) = match ins {
            [a, b] => (a, b),
            _ => return Ok(Abs::Unknown(None)),
        };
        let (Some(sa), Some(sb)) = (a.shape(), b.shape()) else {
            return Ok(Abs::Unknown(None));
        };
        let Some(out) = broadcast(&sa, &sb, &mut self.cx) else {
            return Ok(Abs::Unknown(None));
        };
        let scalar_of = |x: &Abs| -> Option<Value> {
            match x {
                Abs::Const(v) if v.len() == 1 => Some(v.reshaped(vec![]).ok()?),
                Abs::Uniform(v, _) => Some(v.clone()),
                _ => None,
            }
        };
        // Uniform (op) uniform-or-scalar.
        if matches!(a, Abs::Uniform(..)) || matches!(b, Abs::Uniform(..)) {
            if let (Some(x), Some(y)) = (scalar_of(a), scalar_of(b)) {
                if let Ok(v) = crate::kernels::elementwise::binary(op, x, y) {
                    return Ok(Abs::Uniform(v, out));
                }
            }
        }
        // Interval arithmetic on random values.
        if let Some(r) = self.range_op(op, a, b, &out)? {
            return Ok(r);
        }
        // Identity elements: x*1, 1*x, x/1, x+0, 0+x, x-0.
        let is = |x: &Abs, v: f64| x.uniform_value() == Some(v);
        let keep = match op {
            BinaryOp::Mul if is(b, 1.0) => Some(0),
            BinaryOp::Mul if is(a, 1.0) => Some(1),
            BinaryOp::Div if is(b, 1.0) => Some(0),
            BinaryOp::Add if is(b, 0.0) => Some(0),
            BinaryOp::Add if is(a, 0.0) => Some(1),
            BinaryOp::Sub if is(b, 0.0) => Some(0),
            _ => None,
        };
        if let Some(k) = keep {
            let kept_shape = if k == 0 { &sa } else { &sb };
            let kept = if k == 0 { a } else { b };
            let dt_ok = match (kept, if k == 0 { b } else { a }) {
                (_, Abs::Const(v)) | (_, Abs::Uniform(v, _)) => {
                    v.dtype().is_float() || !matches!(op, BinaryOp::Div)
                }
                _ => false,
            };
            if *kept_shape == out && dt_ok {
                self.bypass(node, k);
                return Ok(kept.clone());
            }
        }
        // A uniform operand that does not widen the result becomes a scalar constant.
        for (k, (this, other_shape)) in [(a, &sb), (b, &sa)].into_iter().enumerate() {
            if let Abs::Uniform(v, _) = this {
                if *other_shape == out {
                    let name = self.add_const(format!("{}/uniform_{k}", node.name), v);
                    node.inputs[k] = TensorRef::new(name, 0);
                    let mut ins2 = ins.to_vec();
                    ins2[k] = Abs::Const(v.clone());
                    return self.binary(node, op, &ins2);
                }
            }
        }
        Ok(Abs::Unknown(Some(out)))
    }

    fn range_op(&mut self, op: BinaryOp, a: &Abs, b: &Abs, out: &Shape) -> Result<Option<Abs>> {
        let scalar_f = |x: &Abs| match x {
            Abs::Const(v) if v.len() == 1 => v.to_f64s().ok().map(|f| f[0]),
            _ => None,
        };
        let (iv, s, dt, c, range_left) = match (a, b) {
            (Abs::Range(iv, s, dt), other) => match scalar_f(other) {
                Some(c) => (*iv, s, *dt, c, true),
                None => return Ok(None),
            },
            (other, Abs::Range(iv, s, dt)) => match scalar_f(other) {
                Some(c) => (*iv, s, *dt, c, false),
                None => return Ok(None),
            },
            _ => return Ok(None),
        };
        if s != out {
            return Ok(None);
        }
        let flip = |iv: Interval| Interval {
            lo: -iv.hi,
            hi: -iv.lo,
            lo_closed: iv.hi_closed,
            hi_closed: iv.lo_closed,
        };
        let shifted = |iv: Interval, c: f64| Interval {
            lo: iv.lo + c,
            hi: iv.hi + c,
            ..iv
        };
        let scaled = |iv: Interval, c: f64| {
            let r = Interval {
                lo: iv.lo * c.abs(),
                hi: iv.hi * c.abs(),
                ..iv
            };
            if c < 0.0 {
                flip(r)
            } else {
                r
            }
        };
        let new = match op {
            BinaryOp::Add => Some(shifted(iv, c)),
            BinaryOp::Sub if range_left => Some(shifted(iv, -c)),
            BinaryOp::Sub => Some(shifted(flip(iv), c)),
            BinaryOp::Mul if c != 0.0 => Some(scaled(iv, c)),
            BinaryOp::Div if range_left && c != 0.0 => Some(scaled(iv, 1.0 / c)),
            _ => None,
        };
        if let Some(n) = new {
            return Ok(Some(Abs::Range(n, s.clone(), dt)));
        }
        // Comparisons, written as `range OP c`.
        let (op, iv) = if range_left {
            (op, iv)
        } else {
            let mirrored = match op {
                BinaryOp::Greater => BinaryOp::Less,
                BinaryOp::GreaterEqual => BinaryOp::LessEqual,
                BinaryOp::Less => BinaryOp::Greater,
                BinaryOp::LessEqual => BinaryOp::GreaterEqual,
                o => o,
            };
            (mirrored, iv)
        };
        let above = |strict: bool| {
            if strict {
                iv.lo > c || (iv.lo == c && !iv.lo_closed)
            } else {
                iv.lo >= c
            }
        };
        let below = |strict: bool| {
            if strict {
                iv.hi < c || (iv.hi == c && !iv.hi_closed)
            } else {
                iv.hi <= c
            }
        };
        let verdict = match op {
            BinaryOp::GreaterEqual if above(false) => Some(true),
            BinaryOp::GreaterEqual if below(true) => Some(false),
            BinaryOp::Greater if above(true) => Some(true),
            BinaryOp::Greater if below(false) => Some(false),
            BinaryOp::Less if below(true) => Some(true),
            BinaryOp::Less if above(false) => Some(false),
            BinaryOp::LessEqual if below(false) => Some(true),
            BinaryOp::LessEqual if above(true) => Some(false),
            _ => None,
        };
        Ok(verdict.map(|v| Abs::Uniform(Value::scalar(v), s.clone())))
    }

    /// Shapes of common ops whose values are unknown.
    fn infer_shape(&mut self, node: &Node, op: &Op, ins: &[Abs]) -> Option<Shape> {
        let sh = |i: usize| ins.get(i).and_then(Abs::shape);
        let konst = |i: usize| {
            ins.get(i)
                .and_then(Abs::konst)
                .and_then(|v| v.to_i64s().ok())
        };
        match op {
            Op::Forward(
                Forward::Identity
                | Forward::StopGradient
                | Forward::Snapshot
                | Forward::CheckNumerics
                | Forward::PreventGradient
                | Forward::EnsureShape,
            )
            | Op::Print
            | Op::BiasAdd { .. }
            | Op::Softmax
            | Op::LogSoftmax
            | Op::LeakyRelu
            | Op::Gelu { .. }
            | Op::Prelu
            | Op::L2Normalize
            | Op::HardSwish
            | Op::FusedBatchNorm { .. }
            | Op::PlaceholderWithDefault
            | Op::Dequantize
            | Op::ZerosLike
            | Op::OnesLike => sh(0),
            Op::Conv2D(_) | Op::DepthwiseConv2dNative(_) | Op::MaxPool(_) | Op::AvgPool(_) => {
                let x = sh(0)?;
                if x.len() != 4 {
                    return None;
                }
                let (layout, padding, strides, dil) = match op {
                    Op::Conv2D(c) | Op::DepthwiseConv2dNative(c) => {
                        (c.layout, c.padding, c.strides, c.dilations)
                    }
                    Op::MaxPool(p) | Op::AvgPool(p) => (p.layout, p.padding, p.strides, [1, 1]),
                    _ => return None,
                };
                if layout != Layout::Nhwc {
                    return None;
                }
                let (k, c) = match op {
                    Op::Conv2D(_) | Op::DepthwiseConv2dNative(_) => {
                        let w = known(&sh(1)?)?;
                        if w.len() != 4 {
                            return None;
                        }
                        let c = if matches!(op, Op::Conv2D(_)) {
                            w[3]
                        } else {
                            w[2] * w[3]
                        };
                        ([w[0] as i64, w[1] as i64], D::K(c as i64))
                    }
                    Op::MaxPool(p) | Op::AvgPool(p) => (p.ksize, x[3]),
                    _ => return None,
                };
                let mut out = vec![x[0]];
                for d in 0..2 {
                    out.push(match x[d + 1] {
                        D::K(n) => {
                            D::K(window_out(node, n, k[d], strides[d], dil[d], padding).ok()?)
                        }
                        D::S(_) => self.cx.fresh(),
                    });
                }
                out.push(c);
                Some(out)
            }
            Op::MatMul(m) => {
                let (a, b) = (sh(0)?, sh(1)?);
                if a.len() != 2 || b.len() != 2 {
                    return None;
                }
                let (ta, tb) = (m.transpose_a, m.transpose_b);
                Some(vec![
                    if ta { a[1] } else { a[0] },
                    if tb { b[0] } else { b[1] },
                ])
            }
            Op::Reduce { keep_dims, .. } => {
                let x = sh(0)?;
                let axes = konst(1)?;
                let keep = *keep_dims;
                let mut red = vec![false; x.len()];
                for a in axes {
                    red[norm_axis(a, x.len(), false).ok()?] = true;
                }
                Some(
                    x.iter()
                        .zip(&red)
                        .filter_map(|(&d, &r)| match (r, keep) {
                            (true, true) => Some(D::K(1)),
                            (true, false) => None,
                            (false, _) => Some(d),
                        })
                        .collect(),
                )
            }
            Op::ArgMax | Op::ArgMin => {
                let mut x = sh(0)?;
                let a = norm_axis(*konst(1)?.first()?, x.len(), false).ok()?;
                x.remove(a);
                Some(x)
            }
            Op::GatherV2 | Op::Gather => {
                let (p, i) = (sh(0)?, sh(1)?);
                let axis = if *op == Op::GatherV2 {
                    *konst(2)?.first()?
                } else {
                    0
                };
                let a = norm_axis(axis, p.len(), false).ok()?;
                let mut out = p[..a].to_vec();
                out.extend(i);
                out.extend_from_slice(&p[a + 1..]);
                Some(out)
            }
            Op::ExpandDims => {
                let mut x = sh(0)?;
                let a = norm_axis(*konst(1)?.first()?, x.len(), true).ok()?;
                x.insert(a, D::K(1));
                Some(x)
            }
            Op::Squeeze => {
                let x = sh(0)?;
                let dims = node
                    .attr_ints("squeeze_dims")
                    .map(|d| d.to_vec())
                    .unwrap_or_default();
                if dims.is_empty() {
                    return None;
                }
                let drop: Vec<usize> = dims
                    .iter()
                    .map(|&d| norm_axis(d, x.len(), false).ok())
                    .collect::<Option<_>>()?;
                Some(
                    x.iter()
                        .enumerate()
                        .filter(|(i, _)| !drop.contains(i))
                        .map(|(_, &d)| d)
                        .collect(),
                )
            }
            Op::Pad | Op::PadV2 | Op::MirrorPad => {
                let x = sh(0)?;
                let p = konst(1)?;
                if p.len() != 2 * x.len() {
                    return None;
                }
                Some(
                    x.iter()
                        .enumerate()
                        .map(|(i, &d)| match d {
                            D::K(k) => D::K(k + p[2 * i] + p[2 * i + 1]),
                            s if p[2 * i] == 0 && p[2 * i + 1] == 0 => s,
                            _ => self.cx.fresh(),
                        })
                        .collect(),
                )
            }
            Op::Placeholder
            | Op::Const
            | Op::IdentityN
            | Op::Unary(_)
            | Op::Binary(_)
            | Op::Compare(_)
            | Op::BatchMatMul { .. }
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
            | Op::Transpose
            | Op::Tile
            | Op::Fill
            | Op::Range
            | Op::Cast
            | Op::Select
            | Op::SelectV2
            | Op::Random(_)
            | Op::Quantize
            | Op::Fused { .. }
            | Op::NoOp
            | Op::Assert
            | Op::SaveV2
            | Op::SpaceToBatchND
            | Op::Conv2DBackpropInput(_)
            | Op::ResizeBilinear(_)
            | Op::ResizeNearestNeighbor(_)
            | Op::BatchToSpaceND
            | Op::Other(_) => None,
        }
    }
}

/// Runs the folding pass: returns statistics. Nodes computing constants become `Const`
/// nodes of the same name; bypassed nodes are rewired around (graph outputs that were
/// bypassed become `Identity` of what they compute, keeping their names).
pub fn fold(graph: &mut Graph, declared_inputs: &[String]) -> Result<FoldStats> {
    let order = graph.topo_order()?;
    let declared: HashSet<String> = declared_inputs.iter().cloned().collect();
    let mut pass = Pass {
        cx: Ctx { next_sym: 0 },
        abs: HashMap::new(),
        declared: &declared,
        alias: HashMap::new(),
        new_consts: Vec::new(),
        names: graph.nodes.iter().map(|n| n.name.clone()).collect(),
        stats: FoldStats::default(),
        origin: HashMap::new(),
    };
    for &i in &order {
        let mut node = std::mem::take(&mut graph.nodes[i]);
        for r in node.inputs.iter_mut() {
            if let Some(t) = pass.alias.get(&(r.node.clone(), r.index)) {
                *r = t.clone();
            }
        }
        let outs = pass.visit(&mut node).map_err(|e: Error| {
            e.context(format!("node '{}' ({})", node.name, node.op))
                .context("constant folding")
        })?;
        pass.abs.insert(node.name.clone(), outs);
        graph.nodes[i] = node;
    }
    let outputs: HashSet<String> = graph.outputs.iter().map(|r| r.node.clone()).collect();
    for node in graph.nodes.iter_mut() {
        if let Some(target) = pass.alias.get(&(node.name.clone(), 0)) {
            if outputs.contains(&node.name) {
                let dt = node.attr_type("T").ok();
                let mut id = Node::new(node.name.clone(), Op::Forward(Forward::Identity).name())
                    .with_input(target.clone());
                if let Some(dt) = dt {
                    id = id.with_attr("T", Attr::Type(dt));
                }
                *node = id;
            }
            continue;
        }
        if node.is_const() || declared.contains(&node.name) {
            continue;
        }
        let single = pass.abs.get(&node.name).map(|v| v.len()) == Some(1);
        if let (true, Some(Abs::Const(v))) =
            (single, pass.abs.get(&node.name).and_then(|v| v.first()))
        {
            *pass.stats.folded.entry(node.op.clone()).or_default() += 1;
            let t = pass
                .origin
                .get(&(Arc::as_ptr(&v.buf) as usize))
                .and_then(|t| t.reshaped(v.shape.clone()).ok())
                .unwrap_or_else(|| v.to_tensor());
            let mut c = Node::constant(node.name.clone(), t);
            c.device = node.device.clone();
            *node = c;
        }
    }
    graph.nodes.append(&mut pass.new_consts);
    Ok(pass.stats)
}
