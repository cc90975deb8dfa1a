//! Per-channel affine constants that [`super::bn`] cannot fold backwards, folded the
//! way TF's converter folds them:
//!
//! * forwards into the next layer: a multiply or add by a per-channel constant that
//!   feeds a matrix product (or a VALID convolution) becomes part of that layer's
//!   weights and bias (a batch norm after an activation, `Dense(relu) → BN → Dense`).
//!   Into a convolution only with VALID padding: with SAME, the zero padding would
//!   be added to as well, so the fold would not be exact;
//! * backwards through a `Reshape` that keeps the last axis (the
//!   `MatMul → Reshape 4-D → FusedBatchNorm → Reshape` of
//!   `tf.layers.batch_normalization(fused=True)` on 2-D input): the multiply or add
//!   moves before the reshape, where [`super::bn`] folds it into the matrix product,
//!   and [`collapse_reshapes`] then removes the reshapes that cancel;
//! * a division by a constant becomes a multiply by its reciprocal (which then folds
//!   like any multiply, or runs as MUL where DIV has no int8 kernel).

use std::collections::{HashMap, HashSet};

use crate::error::Result;
use crate::ir::op::{Binary, Layout, Padding};
use crate::ir::shape_infer::{infer_shapes, TensorInfo};
use crate::ir::{Attr, DType, Graph, Node, Op, Tensor, TensorRef};

use super::bn::per_channel;

fn unique_name(taken: &HashSet<String>, base: String) -> String {
    if !taken.contains(&base) {
        return base;
    }
    (1..)
        .map(|i| format!("{base}_{i}"))
        .find(|n| !taken.contains(n))
        .unwrap_or(base)
}

/// Counters of what was rewritten.
#[derive(Debug, Default)]
pub struct AffineStats {
    pub folded_forward: usize,
    pub moved_before_reshape: usize,
    pub reshapes_removed: usize,
    pub divisions_to_multiplies: usize,
}

fn index(g: &Graph) -> HashMap<String, usize> {
    g.nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.clone(), i))
        .collect()
}

/// Data readers of each tensor; a graph output counts as many readers.
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

fn const_f32(g: &Graph, idx: &HashMap<String, usize>, r: &TensorRef) -> Option<Tensor> {
    let t = g.nodes[*idx.get(&r.node)?].const_value()?;
    (r.index == 0 && t.dtype() == DType::F32).then(|| t.clone())
}

fn is_f32(n: &Node) -> bool {
    n.attr_type("T").unwrap_or(DType::F32) == DType::F32
}

/// Every reader of `from` reads `to` instead.
fn redirect(g: &mut Graph, from: &TensorRef, to: &TensorRef) {
    for n in g.nodes.iter_mut() {
        for r in n.inputs.iter_mut() {
            if r == from {
                *r = to.clone();
            }
        }
    }
}

/// `RealDiv(x, c)` / `Div(x, c)` of float32 by a constant without zeros →
/// `Mul(x, 1/c)` under the same name.
pub fn divisions_to_multiplies(g: &mut Graph, stats: &mut AffineStats) -> Result<()> {
    let idx = index(g);
    let mut added = Vec::new();
    let mut taken: HashSet<String> = idx.keys().cloned().collect();
    for i in 0..g.nodes.len() {
        let n = &g.nodes[i];
        let div = matches!(Op::parse(n), Ok(Op::Binary(Binary::RealDiv | Binary::Div)));
        if !div || n.inputs.len() != 2 || !is_f32(n) {
            continue;
        }
        let Some(c) = const_f32(g, &idx, &n.inputs[1]) else {
            continue;
        };
        let v = c.values::<f32>()?;
        if v.iter().any(|&x| x == 0.0 || !x.is_finite()) {
            continue;
        }
        let recip: Vec<f32> = v.iter().map(|&x| 1.0 / x).collect();
        let cname = unique_name(&taken, format!("{}/reciprocal", n.name));
        taken.insert(cname.clone());
        added.push(Node::constant(
            cname.clone(),
            Tensor::from_vec(c.shape().to_vec(), &recip),
        ));
        let n = &mut g.nodes[i];
        n.op = Op::Binary(Binary::Mul).name().to_string();
        n.inputs[1] = TensorRef::new(cname, 0);
        stats.divisions_to_multiplies += 1;
    }
    g.nodes.extend(added);
    Ok(())
}

/// A layer an affine constant can fold into from its input side: the number of
/// input channels and, per flat weight index, its (input, output) channel.
struct Layer {
    in_channels: usize,
    out_channels: usize,
    channels_of: Box<dyn Fn(usize) -> (usize, usize)>,
    /// The rank of the data input.
    rank: usize,
}

fn layer(n: &Node, w: &Tensor) -> Option<Layer> {
    let s = w.shape().to_vec();
    let valid = |p: Padding| match p {
        Padding::Valid => true,
        Padding::Explicit(p) => p.iter().all(|&(a, b)| a == 0 && b == 0),
        Padding::Same => false,
    };
    match Op::parse(n).ok()? {
        Op::MatMul(m) if s.len() == 2 && !m.transpose_a => {
            let (k, o) = if m.transpose_b {
                (s[1], s[0])
            } else {
                (s[0], s[1])
            };
            Some(Layer {
                in_channels: k,
                out_channels: o,
                channels_of: if m.transpose_b {
                    Box::new(move |i| (i % k, i / k))
                } else {
                    Box::new(move |i| (i / o, i % o))
                },
                rank: 2,
            })
        }
        Op::Conv2D(c) if s.len() == 4 && c.layout == Layout::Nhwc && valid(c.padding) => {
            let (ci, co) = (s[2], s[3]);
            Some(Layer {
                in_channels: ci,
                out_channels: co,
                channels_of: Box::new(move |i| ((i / co) % ci, i % co)),
                rank: 4,
            })
        }
        Op::DepthwiseConv2dNative(c)
            if s.len() == 4 && c.layout == Layout::Nhwc && valid(c.padding) =>
        {
            let (ci, m) = (s[2], s[3]);
            Some(Layer {
                in_channels: ci,
                out_channels: ci * m,
                channels_of: Box::new(move |i| ((i / m) % ci, i % (ci * m))),
                rank: 4,
            })
        }
        _ => None,
    }
}

/// The per-channel multiply or add (`Sub` of a constant included) that `r` is, as
/// (its data input, whether it multiplies, its constant per channel).
fn affine_producer(
    g: &Graph,
    idx: &HashMap<String, usize>,
    r: &TensorRef,
    channels: usize,
    rank: usize,
) -> Option<(TensorRef, bool, Vec<f32>)> {
    let n = &g.nodes[*idx.get(&r.node)?];
    let op = Op::parse(n).ok()?;
    let (mul, sub) = match op {
        Op::Binary(Binary::Mul) => (true, false),
        Op::Binary(Binary::Add | Binary::AddV2) => (false, false),
        Op::Binary(Binary::Sub) => (false, true),
        _ => return None,
    };
    if r.index != 0 || n.inputs.len() != 2 || !is_f32(n) {
        return None;
    }
    let (x, c) = match (
        const_f32(g, idx, &n.inputs[1]),
        const_f32(g, idx, &n.inputs[0]).filter(|_| !sub),
    ) {
        (Some(c), _) => (n.inputs[0].clone(), c),
        (None, Some(c)) => (n.inputs[1].clone(), c),
        _ => return None,
    };
    // The constant must not change the shape of x (it broadcasts along channels only).
    let mut v = per_channel(&c.values::<f32>().ok()?, c.shape(), channels, rank)?;
    if sub {
        v.iter_mut().for_each(|a| *a = -*a);
    }
    Some((x, mul, v))
}

/// One forward fold; returns whether something changed.
pub fn fold_forward_once(g: &mut Graph, stats: &mut AffineStats) -> Result<bool> {
    let idx = index(g);
    let rd = readers(g);
    for i in 0..g.nodes.len() {
        let n = &g.nodes[i];
        if n.inputs.len() != 2 || !is_f32(n) {
            continue;
        }
        let Some(w) = const_f32(g, &idx, &n.inputs[1]) else {
            continue;
        };
        let Some(l) = layer(n, &w) else { continue };
        let a_ref = n.inputs[0].clone();
        if rd.get(&a_ref).copied() != Some(1) {
            continue;
        }
        let Some((x, mul, v)) = affine_producer(g, &idx, &a_ref, l.in_channels, l.rank) else {
            continue;
        };
        let wv = w.values::<f32>()?;
        let name = n.name.clone();
        let taken: HashSet<String> = idx.keys().cloned().collect();
        if mul {
            let scaled: Vec<f32> = wv
                .iter()
                .enumerate()
                .map(|(k, &x)| x * v[(l.channels_of)(k).0])
                .collect();
            let wname = unique_name(&taken, format!("{name}/folded_weights"));
            g.nodes.push(Node::constant(
                wname.clone(),
                Tensor::from_vec(w.shape().to_vec(), &scaled),
            ));
            g.nodes[i].inputs = vec![x, TensorRef::new(wname, 0)];
        } else {
            let mut shift = vec![0f32; l.out_channels];
            for (k, &x) in wv.iter().enumerate() {
                let (ci, co) = (l.channels_of)(k);
                shift[co] += v[ci] * x;
            }
            g.nodes[i].inputs[0] = x;
            add_bias(g, i, &shift, &rd, &idx, &taken)?;
        }
        stats.folded_forward += 1;
        return Ok(true);
    }
    Ok(false)
}

/// Adds `shift` to the bias of layer `i`: into the constant of a `BiasAdd` that is its
/// only reader, else through a new `BiasAdd` that takes the layer's name.
fn add_bias(
    g: &mut Graph,
    i: usize,
    shift: &[f32],
    rd: &HashMap<TensorRef, usize>,
    idx: &HashMap<String, usize>,
    taken: &HashSet<String>,
) -> Result<()> {
    let name = g.nodes[i].name.clone();
    let out = TensorRef::new(name.clone(), 0);
    if rd.get(&out).copied() == Some(1) {
        let reader = g
            .nodes
            .iter()
            .position(|m| m.inputs.first() == Some(&out))
            .filter(|&j| {
                let m = &g.nodes[j];
                matches!(
                    Op::parse(m),
                    Ok(Op::BiasAdd {
                        layout: Layout::Nhwc,
                        ..
                    })
                ) && m.inputs.len() == 2
            });
        if let Some(j) = reader {
            if let Some(b) = const_f32(g, idx, &g.nodes[j].inputs[1]) {
                let bv = b.values::<f32>()?;
                if bv.len() == shift.len() {
                    let nb: Vec<f32> = bv.iter().zip(shift).map(|(a, b)| a + b).collect();
                    let bname = unique_name(taken, format!("{}/folded_bias", g.nodes[j].name));
                    g.nodes.push(Node::constant(
                        bname.clone(),
                        Tensor::from_vec(vec![nb.len()], &nb),
                    ));
                    g.nodes[j].inputs[1] = TensorRef::new(bname, 0);
                    return Ok(());
                }
            }
        }
    }
    let inner = unique_name(taken, format!("{name}/folded"));
    let bname = unique_name(taken, format!("{name}/folded_bias"));
    g.nodes[i].name = inner.clone();
    let device = g.nodes[i].device.clone();
    let mut ba = Node::new(
        name,
        Op::BiasAdd {
            layout: Layout::Nhwc,
            v1: false,
        }
        .name(),
    )
    .with_input(TensorRef::new(inner, 0))
    .with_input(TensorRef::new(bname.clone(), 0))
    .with_attr("T", Attr::Type(DType::F32))
    .with_attr("data_format", Attr::Str(b"NHWC".to_vec()));
    ba.device = device;
    g.nodes.push(ba);
    g.nodes.push(Node::constant(
        bname,
        Tensor::from_vec(vec![shift.len()], shift),
    ));
    Ok(())
}

fn shapes(g: &Graph) -> Option<HashMap<TensorRef, TensorInfo>> {
    // Shapes guide optional rewrites only: a graph whose shapes cannot be inferred
    // (an op without a shape rule) is left as it is.
    infer_shapes(g).ok()
}

/// Moves one per-channel multiply/add that reads a last-axis-preserving `Reshape`
/// before that reshape; returns whether something changed.
pub fn move_before_reshape_once(g: &mut Graph, stats: &mut AffineStats) -> Result<bool> {
    let idx = index(g);
    let rd = readers(g);
    let mut infos = None;
    for i in 0..g.nodes.len() {
        let n = &g.nodes[i];
        let affine = matches!(
            Op::parse(n),
            Ok(Op::Binary(
                Binary::Mul | Binary::Add | Binary::AddV2 | Binary::Sub
            ))
        );
        if !affine || n.inputs.len() != 2 || !is_f32(n) {
            continue;
        }
        let r_ref = &n.inputs[0];
        let Some(&ri) = idx.get(&r_ref.node) else {
            continue;
        };
        if !matches!(Op::parse(&g.nodes[ri]), Ok(Op::Reshape))
            || r_ref.index != 0
            || rd.get(r_ref).copied() != Some(1)
            || g.outputs.iter().any(|o| o.node == n.name)
        {
            continue;
        }
        let infos = match &infos {
            Some(i) => i,
            None => match shapes(g) {
                Some(s) => infos.insert(s),
                None => return Ok(false),
            },
        };
        let x = g.nodes[ri].inputs[0].clone();
        let (Some(xi), Some(ri_info)) = (infos.get(&x), infos.get(r_ref)) else {
            continue;
        };
        let c = match (xi.shape.last(), ri_info.shape.last()) {
            (Some(&a), Some(&b)) if a == b && a > 0 => a as usize,
            _ => continue,
        };
        if xi.shape.is_empty() {
            continue;
        }
        let rank = ri_info.shape.len().min(xi.shape.len());
        if affine_producer(g, &idx, &TensorRef::new(n.name.clone(), 0), c, rank).is_none() {
            continue;
        }
        let name = n.name.clone();
        let rname = g.nodes[ri].name.clone();
        let out = TensorRef::new(name.clone(), 0);
        let rout = TensorRef::new(rname, 0);
        // Readers of the affine node read the reshape; the reshape reads the affine node.
        redirect(g, &out, &rout);
        g.nodes[i].inputs[0] = x;
        g.nodes[ri].inputs[0] = out;
        stats.moved_before_reshape += 1;
        return Ok(true);
    }
    Ok(false)
}

/// `Reshape(Reshape(x, a), b)` → `Reshape(x, b)` when the inner one has no other
/// reader, and a `Reshape` that keeps its input's shape is bypassed.
pub fn collapse_reshapes(g: &mut Graph, stats: &mut AffineStats) -> Result<()> {
    loop {
        let idx = index(g);
        let rd = readers(g);
        let mut changed = false;
        for i in 0..g.nodes.len() {
            if !matches!(Op::parse(&g.nodes[i]), Ok(Op::Reshape)) || g.nodes[i].inputs.len() != 2 {
                continue;
            }
            let x = g.nodes[i].inputs[0].clone();
            let Some(&xi) = idx.get(&x.node) else {
                continue;
            };
            if matches!(Op::parse(&g.nodes[xi]), Ok(Op::Reshape)) && rd.get(&x).copied() == Some(1)
            {
                g.nodes[i].inputs[0] = g.nodes[xi].inputs[0].clone();
                stats.reshapes_removed += 1;
                changed = true;
                break;
            }
        }
        if changed {
            g.prune_to_outputs()?;
            continue;
        }
        let Some(infos) = shapes(g) else {
            return Ok(());
        };
        for i in 0..g.nodes.len() {
            let n = &g.nodes[i];
            if !matches!(Op::parse(n), Ok(Op::Reshape))
                || n.inputs.len() != 2
                || g.outputs.iter().any(|o| o.node == n.name)
            {
                continue;
            }
            let out = TensorRef::new(n.name.clone(), 0);
            let (Some(a), Some(b)) = (infos.get(&n.inputs[0]), infos.get(&out)) else {
                continue;
            };
            // Equal shapes with at most one unknown dimension (equal element counts
            // then fix it) are the same tensor.
            if a.shape == b.shape && a.shape.iter().filter(|&&d| d < 0).count() <= 1 {
                let x = n.inputs[0].clone();
                redirect(g, &out, &x);
                stats.reshapes_removed += 1;
                changed = true;
                break;
            }
        }
        if !changed {
            return Ok(());
        }
        g.prune_to_outputs()?;
    }
}
