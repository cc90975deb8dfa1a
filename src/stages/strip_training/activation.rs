//! Activations TensorFlow spells as several ops and TFLite runs as one:
//! hard swish, `x * relu6(x + 3) / 6` (MobileNetV3), becomes one `HardSwish` node
//! (HARD_SWISH) under the name of the pattern's last node. Both groupings are
//! matched, `(x * relu6(x + 3)) / 6` and `x * (relu6(x + 3) / 6)`, once
//! [`super::affine::divisions_to_multiplies`] has turned the division by 6 into a
//! multiply by 1/6. The fused op computes `(x * relu6(x + 3)) / 6`, TensorFlow's
//! order for the first spelling.

use std::collections::HashMap;

use crate::error::Result;
use crate::ir::op::{Binary, Unary};
use crate::ir::{Attr, DType, Graph, Node, Op, TensorRef};

fn index(g: &Graph) -> HashMap<String, usize> {
    g.nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.clone(), i))
        .collect()
}

fn readers(g: &Graph) -> HashMap<TensorRef, usize> {
    let mut m: HashMap<TensorRef, usize> = HashMap::new();
    for n in &g.nodes {
        for r in &n.inputs {
            *m.entry(r.clone()).or_default() += 1;
        }
    }
    for r in &g.outputs {
        *m.entry(r.clone()).or_default() += 1000;
    }
    m
}

struct View<'a> {
    g: &'a Graph,
    idx: HashMap<String, usize>,
    rd: HashMap<TensorRef, usize>,
}

impl View<'_> {
    /// The node behind `r` when `r` is its float32 output 0 and has no other reader.
    fn sole(&self, r: &TensorRef) -> Option<&Node> {
        let n = &self.g.nodes[*self.idx.get(&r.node)?];
        (r.index == 0
            && self.rd.get(r).copied() == Some(1)
            && n.attr_type("T").unwrap_or(DType::F32) == DType::F32)
            .then_some(n)
    }

    /// Whether `r` is a float32 constant of one repeated value `v` that broadcasts
    /// to a scalar (so it does not change the other operand's shape).
    fn is_scalar(&self, r: &TensorRef, ok: impl Fn(f32) -> bool) -> bool {
        let Some(n) = self.idx.get(&r.node).map(|&i| &self.g.nodes[i]) else {
            return false;
        };
        let Some(t) = n.const_value() else {
            return false;
        };
        t.dtype() == DType::F32
            && t.len() == 1
            && t.shape().len() <= 1
            && t.values::<f32>().is_ok_and(|v| ok(v[0]))
    }

    fn is_sixth(&self, r: &TensorRef) -> bool {
        self.is_scalar(r, |v| (v * 6.0 - 1.0).abs() <= 1e-6)
    }

    /// The two operands of a binary `op` node, in both orders.
    fn operands(n: &Node, op: &[Binary]) -> Option<[(TensorRef, TensorRef); 2]> {
        let is_op = matches!(Op::parse(n), Ok(Op::Binary(b)) if op.contains(&b));
        (is_op && n.inputs.len() == 2).then(|| {
            [
                (n.inputs[0].clone(), n.inputs[1].clone()),
                (n.inputs[1].clone(), n.inputs[0].clone()),
            ]
        })
    }

    /// Whether `r` is `relu6(x + 3)` (every intermediate read only here).
    fn relu6_x_plus_3(&self, r: &TensorRef, x: &TensorRef) -> bool {
        let Some(relu) = self.sole(r) else {
            return false;
        };
        if !matches!(Op::parse(relu), Ok(Op::Unary(Unary::Relu6))) || relu.inputs.len() != 1 {
            return false;
        }
        let Some(add) = self.sole(&relu.inputs[0]) else {
            return false;
        };
        Self::operands(add, &[Binary::Add, Binary::AddV2]).is_some_and(|o| {
            o.iter()
                .any(|(a, c)| a == x && self.is_scalar(c, |v| v == 3.0))
        })
    }

    /// `x` when `r` is `relu6(x + 3) / 6` spelled `relu6(x + 3) * (1/6)`.
    fn hard_sigmoid_of(&self, r: &TensorRef, x: &TensorRef) -> bool {
        let Some(m) = self.sole(r) else { return false };
        Self::operands(m, &[Binary::Mul]).is_some_and(|o| {
            o.iter()
                .any(|(a, c)| self.is_sixth(c) && self.relu6_x_plus_3(a, x))
        })
    }

    /// The `x` of a hard swish whose last node is `n`.
    fn hard_swish_input(&self, n: &Node) -> Option<TensorRef> {
        if n.attr_type("T").unwrap_or(DType::F32) != DType::F32 {
            return None;
        }
        for (a, b) in Self::operands(n, &[Binary::Mul])? {
            // (x * relu6(x + 3)) * (1/6)
            if self.is_sixth(&b) {
                if let Some(m) = self.sole(&a) {
                    if let Some(o) = Self::operands(m, &[Binary::Mul]) {
                        for (x, r) in o {
                            if self.relu6_x_plus_3(&r, &x) {
                                return Some(x);
                            }
                        }
                    }
                }
            }
            // x * (relu6(x + 3) * (1/6))
            if self.hard_sigmoid_of(&b, &a) {
                return Some(a);
            }
        }
        None
    }
}

/// Fuses every hard swish; returns how many.
pub fn fuse_hard_swish(g: &mut Graph) -> Result<usize> {
    let mut fused = 0;
    loop {
        let found = {
            let v = View {
                g,
                idx: index(g),
                rd: readers(g),
            };
            g.nodes
                .iter()
                .enumerate()
                .find_map(|(i, n)| v.hard_swish_input(n).map(|x| (i, x)))
        };
        let Some((i, x)) = found else {
            return Ok(fused);
        };
        let old = &g.nodes[i];
        let mut hs = Node::new(old.name.clone(), Op::HardSwish.name())
            .with_input(x)
            .with_attr("T", Attr::Type(DType::F32));
        hs.device = old.device.clone();
        g.nodes[i] = hs;
        g.prune_to_outputs()?;
        fused += 1;
    }
}
