//! Composite patterns TF1 graphs spell with several ops, rewritten to the single op
//! TFLite has for them (as TF's converter does), before quantization and export:
//!
//! - GELU, tanh form `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))` and erf form
//!   `0.5·x·(1 + erf(x/√2))` → one `_QpipeGelu` (`approximate` for the tanh form);
//! - PReLU as `relu(x) − α·relu(−x)`, `relu(x) + α·(x − relu(x))` and Keras'
//!   `relu(x) + (−α)·relu(−x)`, α constant → one `_QpipePrelu(x, α)`;
//! - `tf.math.l2_normalize` over the last axis (`x · rsqrt(max(Σx², ε))`) →
//!   one `_QpipeL2Normalize`;
//! - `square(a − b)` → `SquaredDifference(a, b)` (LayerNorm's variance): TFLite has an
//!   int8 SQUARED_DIFFERENCE but no int8 SQUARE. The `Sub` stays for its other readers.
//!
//! Before matching, `Identity`/`StopGradient`/`Snapshot` are bypassed (what
//! `tf.nn.moments` puts between its mean and the squared difference) and identical
//! pure nodes are merged (Keras and `tf.nn` repeat `x − mean`, `relu(x)`, `−x`), as are
//! identical small constants that only elementwise ops or a `Dequantize` read (two LayerNorms'
//! ε: an fp16 file then dequantizes it once, as the converter's does). A constant another op reads
//! (a weight, a bias) keeps its own tensor, since its quantization depends on that op.
//! A fused node takes the name of the last node of its pattern, so graph outputs and
//! per-layer comparisons keep their names; nodes only the pattern read are dropped.

use std::collections::{HashMap, HashSet};

use crate::ir::op::{Binary, Forward, Reduce, Unary, GELU, L2_NORMALIZE, PRELU};
use crate::ir::shape_infer::infer_shapes;
use crate::ir::{Attr, DType, Graph, IrError, Node, Op, Tensor, TensorRef};

/// What [`rewrite`] did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PatternReport {
    pub forwarders_bypassed: usize,
    pub merged: usize,
    pub gelu: usize,
    pub prelu: usize,
    pub l2_normalize: usize,
    pub squared_difference: usize,
}

/// Applies every rewrite of the module documentation.
pub fn rewrite(graph: &Graph) -> Result<(Graph, PatternReport), IrError> {
    let mut g = graph.clone();
    let mut report = PatternReport {
        forwarders_bypassed: bypass_forwarders(&mut g),
        merged: merge_duplicates(&mut g)?,
        ..PatternReport::default()
    };
    fuse_composites(&mut g, &mut report)?;
    let changed = report != PatternReport::default();
    if changed && !g.outputs.is_empty() {
        let protected: HashSet<String> = g.inputs.iter().cloned().collect();
        let roots: Vec<&str> = g
            .outputs
            .iter()
            .map(|r| r.node.as_str())
            .chain(protected.iter().map(String::as_str))
            .collect();
        let keep = g.reachable_from(&roots)?;
        // Only what the rewrites orphaned goes; other unreachable nodes stay as they were.
        let before: HashSet<String> = {
            let roots: Vec<&str> = graph
                .outputs
                .iter()
                .map(|r| r.node.as_str())
                .chain(protected.iter().map(String::as_str))
                .collect();
            graph.reachable_from(&roots)?
        };
        g.nodes
            .retain(|n| keep.contains(&n.name) || !before.contains(&n.name));
    }
    Ok((g, report))
}

fn parsed(n: &Node) -> Option<Op> {
    Op::parse(n).ok()
}

/// Rewires readers of pure forwarding nodes to the forwarded tensor.
fn bypass_forwarders(g: &mut Graph) -> usize {
    let outputs: HashSet<String> = g.outputs.iter().map(|r| r.node.clone()).collect();
    let mut target: HashMap<String, TensorRef> = HashMap::new();
    for n in &g.nodes {
        let fwd = matches!(
            parsed(n),
            Some(Op::Forward(
                Forward::Identity | Forward::StopGradient | Forward::Snapshot
            ))
        );
        if fwd && n.inputs.len() == 1 && n.control_inputs.is_empty() && !outputs.contains(&n.name) {
            target.insert(n.name.clone(), n.inputs[0].clone());
        }
    }
    let resolve = |r: &TensorRef| -> Option<TensorRef> {
        let mut cur = r;
        let mut hops = 0;
        while let Some(t) = target.get(&cur.node).filter(|_| cur.index == 0) {
            cur = t;
            hops += 1;
            if hops > target.len() {
                return None;
            }
        }
        (hops > 0).then(|| cur.clone())
    };
    let mut n_bypassed = HashSet::new();
    for n in &mut g.nodes {
        for r in &mut n.inputs {
            if let Some(t) = resolve(r) {
                n_bypassed.insert(r.node.clone());
                *r = t;
            }
        }
    }
    n_bypassed.len()
}

/// Whether two nodes with the same op, inputs and attributes compute the same value.
fn pure(op: &Op) -> bool {
    matches!(
        op,
        Op::Unary(_)
            | Op::Binary(_)
            | Op::Compare(_)
            | Op::LeakyRelu
            | Op::BiasAdd { .. }
            | Op::Softmax
            | Op::Reduce { .. }
            | Op::Dequantize
    )
}

/// Merges identical pure nodes into the first of them; returns how many went.
fn merge_duplicates(g: &mut Graph) -> Result<usize, IrError> {
    const SMALL: usize = 64;
    let mut elementwise_only: HashMap<&str, bool> = HashMap::new();
    for n in &g.nodes {
        let ew = matches!(
            parsed(n),
            Some(Op::Binary(_) | Op::Compare(_) | Op::Dequantize)
        );
        for r in &n.inputs {
            *elementwise_only.entry(r.node.as_str()).or_insert(true) &= ew;
        }
    }
    let mergeable_const = |n: &Node| -> Option<String> {
        let t = n.const_value()?;
        (t.len() <= SMALL && elementwise_only.get(n.name.as_str()) == Some(&true)).then(|| {
            format!(
                "Const|{:?}|{:?}|{:?}|{:?}",
                t.dtype(),
                t.shape(),
                t.bytes(),
                n.output_quant
            )
        })
    };
    let const_keys: HashMap<String, String> = g
        .nodes
        .iter()
        .filter(|n| n.control_inputs.is_empty())
        .filter_map(|n| Some((n.name.clone(), mergeable_const(n)?)))
        .collect();
    let keep_names: HashSet<String> = g
        .outputs
        .iter()
        .map(|r| r.node.clone())
        .chain(g.inputs.iter().cloned())
        .collect();
    let order = g.topo_order()?;
    let mut seen: HashMap<String, String> = HashMap::new();
    let mut alias: HashMap<String, String> = HashMap::new();
    for i in order {
        let n = &mut g.nodes[i];
        for r in &mut n.inputs {
            if let Some(a) = alias.get(&r.node) {
                r.node = a.clone();
            }
        }
        let n = &g.nodes[i];
        if keep_names.contains(&n.name) || !n.control_inputs.is_empty() {
            continue;
        }
        let key = if let Some(k) = const_keys.get(&n.name) {
            k.clone()
        } else if parsed(n).as_ref().is_some_and(pure) {
            format!("{}|{:?}|{:?}|{:?}", n.op, n.inputs, n.attrs, n.output_quant)
        } else {
            continue;
        };
        match seen.get(&key) {
            Some(first) => {
                alias.insert(n.name.clone(), first.clone());
            }
            None => {
                seen.insert(key, n.name.clone());
            }
        }
    }
    if alias.is_empty() {
        return Ok(0);
    }
    for n in &mut g.nodes {
        for r in &mut n.inputs {
            if let Some(a) = alias.get(&r.node) {
                r.node = a.clone();
            }
        }
    }
    let n = alias.len();
    g.nodes.retain(|x| !alias.contains_key(&x.name));
    Ok(n)
}

struct View<'a> {
    g: &'a Graph,
    index: HashMap<&'a str, usize>,
    ops: Vec<Option<Op>>,
    consumers: HashMap<String, Vec<usize>>,
    outputs: HashSet<&'a str>,
}

impl<'a> View<'a> {
    fn new(g: &'a Graph) -> Result<View<'a>, IrError> {
        Ok(View {
            g,
            index: g.index()?,
            ops: g.nodes.iter().map(parsed).collect(),
            consumers: g.consumers(),
            outputs: g.outputs.iter().map(|r| r.node.as_str()).collect(),
        })
    }

    /// The node producing `r` (output 0 only) and its op.
    fn producer(&self, r: &TensorRef) -> Option<(usize, &Op)> {
        if r.index != 0 {
            return None;
        }
        let &i = self.index.get(r.node.as_str())?;
        self.ops[i].as_ref().map(|op| (i, op))
    }

    fn node(&self, i: usize) -> &'a Node {
        &self.g.nodes[i]
    }

    /// A float constant at `r`, also through the `Cast`/`Dequantize` to float32 that
    /// `fp16_cast` puts after each float16 constant.
    fn const_f32(&self, r: &TensorRef) -> Option<&'a Tensor> {
        let (i, op) = self.producer(r)?;
        let n = &self.g.nodes[i];
        let t = match op {
            Op::Cast | Op::Dequantize => {
                let (j, _) = self.producer(n.inputs.first()?)?;
                self.g.nodes[j].const_value()?
            }
            _ => n.const_value()?,
        };
        matches!(t.dtype(), DType::F32 | DType::F16).then_some(t)
    }

    fn scalar(&self, r: &TensorRef) -> Option<f32> {
        let t = self.const_f32(r)?;
        match t.to_f64_vec().ok()?.as_slice() {
            [v] => Some(*v as f32),
            _ => None,
        }
    }

    fn is_scalar(&self, r: &TensorRef, want: f32) -> bool {
        self.scalar(r)
            .is_some_and(|v| (v - want).abs() <= REL_TOL * want.abs().max(1e-6))
    }

    /// Whether node `i`'s only reader is `parent` (and it is not a graph output).
    fn sole_reader(&self, i: usize, parent: usize) -> bool {
        let name = self.g.nodes[i].name.as_str();
        !self.outputs.contains(name)
            && self
                .consumers
                .get(name)
                .is_some_and(|c| c.as_slice() == [parent])
    }

    /// The inputs of an op of two inputs, when `i` is one.
    fn pair(&self, i: usize) -> Option<(&'a TensorRef, &'a TensorRef)> {
        match self.g.nodes[i].inputs.as_slice() {
            [a, b] => Some((a, b)),
            _ => None,
        }
    }

    /// The factors of the product at `r`: through `Mul` nodes only it reads, or
    /// that scale by a constant (`0.5·x` shared by two GELUs). A shared `Mul` stays
    /// in the graph for its other readers, so looking through it is always sound.
    fn factors(&self, r: &TensorRef, parent: Option<usize>, out: &mut Vec<TensorRef>) {
        if let Some((i, Op::Binary(Binary::Mul))) = self.producer(r) {
            let scales = self
                .pair(i)
                .is_some_and(|(a, b)| self.scalar(a).is_some() || self.scalar(b).is_some());
            let through = parent.is_none_or(|p| scales || self.sole_reader(i, p));
            if through && out.len() < 8 {
                if let Some((a, b)) = self.pair(i) {
                    self.factors(a, Some(i), out);
                    self.factors(b, Some(i), out);
                    return;
                }
            }
        }
        out.push(r.clone());
    }

    fn unary_of(&self, r: &TensorRef, u: Unary) -> Option<&'a TensorRef> {
        match self.producer(r)? {
            (i, Op::Unary(v)) if *v == u => self.g.nodes[i].inputs.first(),
            _ => None,
        }
    }

    /// `1 + t` (either order), giving t.
    fn one_plus(&self, r: &TensorRef) -> Option<&'a TensorRef> {
        let (i, op) = self.producer(r)?;
        if !matches!(op, Op::Binary(Binary::Add | Binary::AddV2)) {
            return None;
        }
        let (a, b) = self.pair(i)?;
        if self.is_scalar(a, 1.0) {
            Some(b)
        } else if self.is_scalar(b, 1.0) {
            Some(a)
        } else {
            None
        }
    }
}

/// The non-constant factors of `r` with the constant scalars multiplied out.
fn split_product(v: &View, r: &TensorRef) -> (f32, Vec<TensorRef>) {
    let mut fs = Vec::new();
    v.factors(r, None, &mut fs);
    let mut c = 1.0f32;
    let mut rest = Vec::new();
    for f in fs {
        match v.scalar(&f) {
            Some(s) => c *= s,
            None => rest.push(f),
        }
    }
    (c, rest)
}

/// Relative tolerance for a pattern's constants: after `fp16_cast` they are float16,
/// rounded by up to 2^-11 ≈ 4.9e-4 (√2 becomes 1.4140625, 1.1e-4 off).
const REL_TOL: f32 = 1e-3;

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= REL_TOL * b.abs()
}

/// GELU at root `i` (a `Mul`): the input x and whether it is the tanh form.
fn match_gelu(v: &View, i: usize) -> Option<(TensorRef, bool)> {
    if !matches!(v.ops[i], Some(Op::Binary(Binary::Mul))) {
        return None;
    }
    let root = TensorRef::new(v.node(i).name.clone(), 0);
    let (c, rest) = split_product(v, &root);
    if !close(c, 0.5) || rest.len() != 2 {
        return None;
    }
    for (x, s) in [(&rest[0], &rest[1]), (&rest[1], &rest[0])] {
        let Some(t) = v.one_plus(s) else { continue };
        if let Some(arg) = v.unary_of(t, Unary::Erf) {
            // erf(x / √2) or erf(x · 1/√2)
            let (ai, aop) = v.producer(arg)?;
            let ok = match aop {
                Op::Binary(Binary::RealDiv | Binary::Div) => v
                    .pair(ai)
                    .is_some_and(|(a, b)| a == x && v.is_scalar(b, std::f32::consts::SQRT_2)),
                Op::Binary(Binary::Mul) => {
                    let (c, r) = split_product(v, arg);
                    r.as_slice() == [x.clone()] && close(c, std::f32::consts::FRAC_1_SQRT_2)
                }
                _ => false,
            };
            if ok {
                return Some((x.clone(), false));
            }
        }
        if let Some(arg) = v.unary_of(t, Unary::Tanh) {
            // tanh(√(2/π) · (x + 0.044715·x³))
            let (k, inner) = split_product(v, arg);
            if !close(k, 0.797_884_6) || inner.len() != 1 {
                continue;
            }
            let (ii, iop) = v.producer(&inner[0])?;
            if !matches!(iop, Op::Binary(Binary::Add | Binary::AddV2)) {
                continue;
            }
            let (a, b) = v.pair(ii)?;
            let cubic = if a == x {
                b
            } else if b == x {
                a
            } else {
                continue;
            };
            let (c3, pw) = split_product(v, cubic);
            if !close(c3, 0.044715) {
                continue;
            }
            let is_cube = match pw.as_slice() {
                [p] => v.producer(p).is_some_and(|(pi, pop)| {
                    matches!(pop, Op::Binary(Binary::Pow))
                        && v.pair(pi)
                            .is_some_and(|(base, e)| base == x && v.is_scalar(e, 3.0))
                }),
                [p, q, r] => p == x && q == x && r == x,
                _ => false,
            };
            if is_cube {
                return Some((x.clone(), true));
            }
        }
    }
    None
}

/// PReLU at root `i`: (x, alpha, whether alpha must be negated).
fn match_prelu(v: &View, i: usize) -> Option<(TensorRef, TensorRef, bool)> {
    let sub = match v.ops[i].as_ref()? {
        Op::Binary(Binary::Sub) => true,
        Op::Binary(Binary::Add | Binary::AddV2) => false,
        _ => return None,
    };
    let (a, b) = v.pair(i)?;
    let orders: &[(&TensorRef, &TensorRef)] = if sub { &[(a, b)] } else { &[(a, b), (b, a)] };
    for &(pos, other) in orders {
        let Some(x) = v.unary_of(pos, Unary::Relu) else {
            continue;
        };
        let (c, rest) = split_product(v, other);
        if c != 1.0 || rest.len() != 2 {
            continue;
        }
        for (al, term) in [(&rest[0], &rest[1]), (&rest[1], &rest[0])] {
            // alpha: a constant, or the negation of one (Keras writes −alpha).
            let (alpha, neg_alpha) = match v.const_f32(al) {
                Some(_) => (al.clone(), false),
                None => match v.unary_of(al, Unary::Neg) {
                    Some(inner) if v.const_f32(inner).is_some() => (inner.clone(), true),
                    _ => continue,
                },
            };
            // relu(−x): with `Sub` (TF1 form) the product is subtracted, with `Add` (Keras) added with −alpha.
            let relu_neg = v
                .unary_of(term, Unary::Relu)
                .and_then(|n| v.unary_of(n, Unary::Neg))
                .is_some_and(|nx| nx == x);
            if relu_neg {
                // sub: relu(x) − α·relu(−x) → α; add: relu(x) + α·relu(−x) → −α.
                return Some((x.clone(), alpha, neg_alpha ^ !sub));
            }
            // x − relu(x), added (TF1 second form).
            let minus_relu = !sub
                && v.producer(term).is_some_and(|(ti, top)| {
                    matches!(top, Op::Binary(Binary::Sub))
                        && v.pair(ti).is_some_and(|(p, q)| {
                            p == x && v.unary_of(q, Unary::Relu).is_some_and(|r| r == x)
                        })
                });
            if minus_relu {
                return Some((x.clone(), alpha, neg_alpha));
            }
        }
    }
    None
}

/// `x · rsqrt(max(Σ_last x², ε))` at root `i` (a `Mul`), ε ≤ 1e-12·(1 + 1e-3): x.
fn match_l2(v: &View, i: usize, ranks: &HashMap<TensorRef, usize>) -> Option<TensorRef> {
    if !matches!(v.ops[i], Some(Op::Binary(Binary::Mul))) {
        return None;
    }
    let (a, b) = v.pair(i)?;
    for (x, r) in [(a, b), (b, a)] {
        let Some(m) = v.unary_of(r, Unary::Rsqrt) else {
            continue;
        };
        let Some((mi, Op::Binary(Binary::Maximum))) = v.producer(m) else {
            continue;
        };
        let (p, q) = v.pair(mi)?;
        let (sum, eps) = if v.scalar(q).is_some() {
            (p, q)
        } else {
            (q, p)
        };
        if !v
            .scalar(eps)
            .is_some_and(|e| (0.0..=1.001e-12).contains(&e))
        {
            continue;
        }
        let Some((
            si,
            Op::Reduce {
                kind: Reduce::Sum,
                keep_dims: true,
            },
        )) = v.producer(sum)
        else {
            continue;
        };
        let (sq, axes) = v.pair(si)?;
        if v.unary_of(sq, Unary::Square) != Some(x) {
            continue;
        }
        let rank = *ranks.get(x)? as i64;
        let axes = v
            .producer(axes)
            .and_then(|(ai, _)| v.node(ai).const_value())
            .and_then(|t| t.to_i64_vec().ok())?;
        if matches!(axes.as_slice(), [a] if *a == -1 || *a == rank - 1) {
            return Some(x.clone());
        }
    }
    None
}

fn match_square_of_difference(v: &View, i: usize) -> Option<(TensorRef, TensorRef)> {
    if !matches!(parsed(v.node(i))?, Op::Unary(Unary::Square)) {
        return None;
    }
    let (j, op) = v.producer(v.node(i).inputs.first()?)?;
    if !matches!(op, Op::Binary(Binary::Sub)) {
        return None;
    }
    let (a, b) = v.pair(j)?;
    Some((a.clone(), b.clone()))
}

fn fuse_composites(g: &mut Graph, report: &mut PatternReport) -> Result<(), IrError> {
    let ranks: HashMap<TensorRef, usize> = infer_shapes(g)
        .map(|m| m.into_iter().map(|(r, i)| (r, i.shape.len())).collect())
        .unwrap_or_default();
    let mut replace: Vec<(usize, Node)> = Vec::new();
    let mut new_consts: Vec<Node> = Vec::new();
    {
        let v = View::new(g)?;
        let names: HashSet<&str> = g.nodes.iter().map(|n| n.name.as_str()).collect();
        for i in 0..g.nodes.len() {
            let n = &g.nodes[i];
            if !n.control_inputs.is_empty() {
                continue;
            }
            let dtype = n.attr("T").map(|_| n.attr_type("T")).transpose()?;
            if dtype.is_some_and(|d| d != DType::F32) {
                continue;
            }
            let fused = |op: &str, inputs: Vec<TensorRef>| {
                let mut f = Node::new(n.name.clone(), op);
                f.inputs = inputs;
                f.device = n.device.clone();
                f.attrs.insert("T".into(), Attr::Type(DType::F32));
                f
            };
            if let Some((x, approximate)) = match_gelu(&v, i) {
                let mut f = fused(GELU, vec![x]);
                f.attrs
                    .insert("approximate".into(), Attr::Bool(approximate));
                replace.push((i, f));
                report.gelu += 1;
            } else if let Some((x, alpha, negate)) = match_prelu(&v, i) {
                let alpha = if negate {
                    let t = v.const_f32(&alpha).expect("matched a constant");
                    let vals: Vec<f32> = t
                        .to_f64_vec()
                        .map_err(|e| IrError::new(format!("node '{}': {e}", n.name)))?
                        .iter()
                        .map(|&a| -(a as f32))
                        .collect();
                    let mut name = format!("{}/alpha", n.name);
                    let mut k = 1;
                    while names.contains(name.as_str()) {
                        name = format!("{}/alpha_{k}", n.name);
                        k += 1;
                    }
                    new_consts.push(Node::constant(
                        name.clone(),
                        Tensor::from_vec(t.shape().to_vec(), &vals),
                    ));
                    TensorRef::new(name, 0)
                } else {
                    alpha
                };
                replace.push((i, fused(PRELU, vec![x, alpha])));
                report.prelu += 1;
            } else if let Some(x) = match_l2(&v, i, &ranks) {
                replace.push((i, fused(L2_NORMALIZE, vec![x])));
                report.l2_normalize += 1;
            } else if let Some((a, b)) = match_square_of_difference(&v, i) {
                replace.push((i, fused("SquaredDifference", vec![a, b])));
                report.squared_difference += 1;
            }
        }
    }
    for (i, f) in replace {
        g.nodes[i] = f;
    }
    g.nodes.extend(new_consts);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, v: &[f32], shape: Vec<usize>) -> Node {
        Node::constant(name, Tensor::from_vec(shape, v))
    }
    fn op(name: &str, op: &str, ins: &[&str]) -> Node {
        let mut n = Node::new(name, op);
        for i in ins {
            n = n.with_input(TensorRef::new(*i, 0));
        }
        n
    }
    fn graph(mut nodes: Vec<Node>, out: &str) -> Graph {
        let x = Node::new("x", "Placeholder")
            .with_attr("dtype", Attr::Type(DType::F32))
            .with_attr("shape", Attr::Shape(Some(vec![-1, 4])));
        nodes.insert(0, x);
        Graph {
            nodes,
            inputs: vec!["x".into()],
            outputs: vec![TensorRef::new(out, 0)],
            ..Graph::default()
        }
    }

    #[test]
    fn the_three_prelu_forms_become_one_op_each() {
        let alpha = c("a", &[0.1, 0.2, 0.3, 0.4], vec![4]);
        // relu(x) - a*relu(-x)
        let g1 = graph(
            vec![
                alpha.clone(),
                op("r", "Relu", &["x"]),
                op("n", "Neg", &["x"]),
                op("rn", "Relu", &["n"]),
                op("m", "Mul", &["a", "rn"]),
                op("p", "Sub", &["r", "m"]),
            ],
            "p",
        );
        // relu(x) + a*(x - relu(x)) with a second relu node (merged first)
        let g2 = graph(
            vec![
                alpha.clone(),
                op("r", "Relu", &["x"]),
                op("r1", "Relu", &["x"]),
                op("s", "Sub", &["x", "r1"]),
                op("m", "Mul", &["a", "s"]),
                op("p", "AddV2", &["r", "m"]),
            ],
            "p",
        );
        // Keras: relu(x) + (-a)*relu(-x)
        let g3 = graph(
            vec![
                alpha,
                op("na", "Neg", &["a"]),
                op("r", "Relu", &["x"]),
                op("n", "Neg", &["x"]),
                op("rn", "Relu", &["n"]),
                op("m", "Mul", &["na", "rn"]),
                op("p", "AddV2", &["r", "m"]),
            ],
            "p",
        );
        for g in [g1, g2, g3] {
            let (out, rep) = rewrite(&g).unwrap();
            assert_eq!(rep.prelu, 1, "{:?}", g.nodes);
            let p = out.node("p").unwrap();
            assert_eq!(p.op, PRELU);
            let alpha = out.node(&p.inputs[1].node).unwrap().const_value().unwrap();
            assert_eq!(alpha.to_f64_vec().unwrap()[3] as f32, 0.4);
            let ops: Vec<&str> = out.nodes.iter().map(|n| n.op.as_str()).collect();
            assert_eq!(ops.iter().filter(|o| **o != "Const").count(), 2, "{ops:?}");
        }
    }

    #[test]
    fn gelu_forms_and_l2_normalize_are_fused() {
        let tanh = graph(
            vec![
                c("h", &[0.5], vec![]),
                c("three", &[3.0], vec![]),
                c("k3", &[0.044715], vec![]),
                c("k", &[0.797_884_6], vec![]),
                c("one", &[1.0], vec![]),
                op("half", "Mul", &["h", "x"]),
                op("pw", "Pow", &["x", "three"]),
                op("m1", "Mul", &["k3", "pw"]),
                op("in", "AddV2", &["x", "m1"]),
                op("m2", "Mul", &["k", "in"]),
                op("t", "Tanh", &["m2"]),
                op("a1", "AddV2", &["one", "t"]),
                op("g", "Mul", &["half", "a1"]),
            ],
            "g",
        );
        let erf = graph(
            vec![
                c("h", &[0.5], vec![]),
                c("s2", &[std::f32::consts::SQRT_2], vec![]),
                c("one", &[1.0], vec![]),
                op("half", "Mul", &["h", "x"]),
                op("d", "RealDiv", &["x", "s2"]),
                op("e", "Erf", &["d"]),
                op("a1", "AddV2", &["one", "e"]),
                op("g", "Mul", &["half", "a1"]),
            ],
            "g",
        );
        for (g, approx) in [(tanh, true), (erf, false)] {
            let (out, rep) = rewrite(&g).unwrap();
            assert_eq!(rep.gelu, 1);
            let n = out.node("g").unwrap();
            assert_eq!(
                (n.op.as_str(), n.attr_bool("approximate").unwrap()),
                (GELU, approx)
            );
            assert_eq!(out.nodes.len(), 2, "{:?}", out.nodes);
        }
        let l2 = graph(
            vec![
                c("ax", &[0.0], vec![]),
                c("eps", &[1e-12], vec![]),
                op("sq", "Square", &["x"]),
                op("s", "Sum", &["sq", "axes"]),
                op("mx", "Maximum", &["s", "eps"]),
                op("rs", "Rsqrt", &["mx"]),
                op("l2", "Mul", &["x", "rs"]),
            ],
            "l2",
        );
        let mut l2 = l2;
        l2.nodes[1] = Node::constant("axes", Tensor::from_vec(vec![1], &[1i32]));
        l2.nodes[4] = l2.nodes[4].clone().with_attr("keep_dims", Attr::Bool(true));
        let (out, rep) = rewrite(&l2).unwrap();
        assert_eq!(rep.l2_normalize, 1);
        assert_eq!(out.node("l2").unwrap().op, L2_NORMALIZE);
        // A different epsilon is not TFLite's: left alone.
        l2.nodes[2] = c("eps", &[1e-3], vec![]);
        assert_eq!(rewrite(&l2).unwrap().1.l2_normalize, 0);
    }

    #[test]
    fn stop_gradient_is_bypassed_and_duplicates_merge() {
        let g = graph(
            vec![
                op("sg", "StopGradient", &["x"]),
                op("a", "Neg", &["sg"]),
                op("b", "Neg", &["x"]),
                op("s", "AddV2", &["a", "b"]),
            ],
            "s",
        );
        let (out, rep) = rewrite(&g).unwrap();
        assert_eq!((rep.forwarders_bypassed, rep.merged), (1, 1));
        let s = out.node("s").unwrap();
        assert_eq!(s.inputs[0], s.inputs[1]);
        assert_eq!(out.nodes.len(), 3);
    }

    #[test]
    fn square_of_a_difference_becomes_squared_difference() {
        // LayerNorm's variance: the Sub also feeds the normalization, so it stays
        let g = graph(
            vec![
                c("mu", &[0.5], vec![]),
                op("d", "Sub", &["x", "mu"]),
                op("sq", "Square", &["d"]),
                op("y", "Mul", &["sq", "d"]),
            ],
            "y",
        );
        let (out, rep) = rewrite(&g).unwrap();
        assert_eq!(rep.squared_difference, 1);
        let sq = out.node("sq").unwrap();
        assert_eq!(sq.op, "SquaredDifference");
        let ins: Vec<&str> = sq.inputs.iter().map(|r| r.node.as_str()).collect();
        assert_eq!(ins, ["x", "mu"]);
        assert!(out.node("d").is_some());
        // a Square of anything else is left alone
        let g = graph(vec![op("sq", "Square", &["x"])], "sq");
        assert_eq!(rewrite(&g).unwrap().1.squared_difference, 0);
    }

    #[test]
    fn equal_small_constants_merge_only_where_elementwise_ops_read_them() {
        let g = graph(
            vec![
                c("eps1", &[1e-3], vec![]),
                c("eps2", &[1e-3], vec![]),
                c("w1", &[1.0; 16], vec![4, 4]),
                c("w2", &[1.0; 16], vec![4, 4]),
                op("a", "AddV2", &["x", "eps1"]),
                op("b", "AddV2", &["a", "eps2"]),
                op("m1", "MatMul", &["b", "w1"]),
                op("m2", "MatMul", &["m1", "w2"]),
            ],
            "m2",
        );
        let (out, rep) = rewrite(&g).unwrap();
        assert_eq!(rep.merged, 1);
        assert!(out.node("eps2").is_none());
        assert_eq!(out.node("b").unwrap().inputs[1].node, "eps1");
        assert!(out.node("w1").is_some() && out.node("w2").is_some());
    }
}
