//! Batch-norm folding. A fused batch norm in inference mode becomes a per-channel
//! multiply and add; then any per-channel constant multiply that follows a
//! convolution or matrix product is folded into its weights, and any per-channel
//! constant add into a bias. The decomposed form (`x * (gamma * rsqrt(var + eps)) +
//! (beta - mean * ...)`), once constant-folded, is the same multiply and add.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::ir::op::{is_batch_norm_family, Binary, Forward, Layout};
use crate::ir::{Attr, DType, Graph, Node, Op, Tensor, TensorRef};

/// Counters of what was folded.
#[derive(Debug, Default)]
pub struct BnStats {
    pub fused_batch_norms: usize,
    pub muls_into_weights: usize,
    pub adds_into_bias: usize,
}

fn const_f32(
    g: &Graph,
    idx: &HashMap<String, usize>,
    r: &TensorRef,
) -> Option<(Vec<f32>, Vec<usize>)> {
    let n = &g.nodes[*idx.get(&r.node)?];
    let t = n.const_value()?;
    if t.dtype() != DType::F32 || r.index != 0 {
        return None;
    }
    Some((t.values::<f32>().ok()?, t.shape().to_vec()))
}

fn index(g: &Graph) -> HashMap<String, usize> {
    g.nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.clone(), i))
        .collect()
}

/// Number of data consumers of each (node, output) and whether it is a graph output.
fn readers(g: &Graph) -> HashMap<(String, u32), usize> {
    let mut m: HashMap<(String, u32), usize> = HashMap::new();
    for n in &g.nodes {
        for r in &n.inputs {
            *m.entry((r.node.clone(), r.index)).or_default() += 1;
        }
    }
    for r in &g.outputs {
        *m.entry((r.node.clone(), r.index)).or_default() += 1000;
    }
    m
}

fn unique_name(idx: &HashMap<String, usize>, base: String) -> String {
    if !idx.contains_key(&base) {
        return base;
    }
    (1..)
        .map(|i| format!("{base}_{i}"))
        .find(|n| !idx.contains_key(n))
        .unwrap_or(base)
}

/// Rewrites every `FusedBatchNorm*` (inference mode, constant parameters) into
/// `Mul(x, scale)` followed by an `AddV2` that keeps the batch norm's name.
fn rewrite_fused(g: &mut Graph, stats: &mut BnStats) -> Result<()> {
    let rd = readers(g);
    let mut added = Vec::new();
    let mut idx = index(g);
    for i in 0..g.nodes.len() {
        let n = &g.nodes[i];
        if !is_batch_norm_family(&n.op) {
            continue;
        }
        let who = format!("batch norm '{}' ({})", n.name, n.op);
        if n.attr_bool("is_training").unwrap_or(true) {
            return Err(Error::msg(format!(
                "{who} is in training mode (is_training=true): it normalizes with the statistics \
                 of each batch and cannot be folded; export the model with is_training=false"
            )));
        }
        if n.inputs.len() != 5 {
            return Err(Error::msg(format!(
                "{who} has {} inputs, expected 5",
                n.inputs.len()
            )));
        }
        for k in 1..6u32 {
            if rd.get(&(n.name.clone(), k)).copied().unwrap_or(0) > 0 {
                return Err(Error::msg(format!(
                    "{who}: its output {k} (batch statistics) is used, so it cannot be folded"
                )));
            }
        }
        let mut params = Vec::new();
        for (k, what) in [(1, "scale"), (2, "offset"), (3, "mean"), (4, "variance")] {
            let (v, _) = const_f32(g, &idx, &n.inputs[k]).ok_or_else(|| {
                Error::msg(format!(
                    "{who}: its {what} ('{}') is not a float32 constant; freeze the model first",
                    n.inputs[k]
                ))
            })?;
            params.push(v);
        }
        let c = params[0].len();
        if params.iter().any(|p| p.len() != c) {
            return Err(Error::msg(format!("{who}: parameters differ in length")));
        }
        let eps = n.attr_float("epsilon").unwrap_or(1e-4);
        let factor: Vec<f32> = (0..c)
            .map(|j| (1.0 / (params[3][j] + eps).sqrt()) * params[0][j])
            .collect();
        let shift: Vec<f32> = (0..c)
            .map(|j| params[1][j] - params[2][j] * factor[j])
            .collect();
        let nchw = matches!(
            Op::parse(n),
            Ok(Op::FusedBatchNorm {
                layout: Layout::Nchw,
                ..
            })
        );
        let pshape = if nchw { vec![c, 1, 1] } else { vec![c] };
        let name = n.name.clone();
        let x = n.inputs[0].clone();
        let device = n.device.clone();
        let scale_name = unique_name(&idx, format!("{name}/folded_scale"));
        idx.insert(scale_name.clone(), usize::MAX);
        let shift_name = unique_name(&idx, format!("{name}/folded_shift"));
        idx.insert(shift_name.clone(), usize::MAX);
        let mul_name = unique_name(&idx, format!("{name}/mul"));
        idx.insert(mul_name.clone(), usize::MAX);
        added.push(Node::constant(
            scale_name.clone(),
            Tensor::from_vec(pshape.clone(), &factor),
        ));
        added.push(Node::constant(
            shift_name.clone(),
            Tensor::from_vec(pshape, &shift),
        ));
        let mut mul = Node::new(mul_name.clone(), Op::Binary(Binary::Mul).name())
            .with_input(x)
            .with_input(TensorRef::new(scale_name, 0))
            .with_attr("T", Attr::Type(DType::F32));
        mul.device = device.clone();
        added.push(mul);
        let mut add = Node::new(name, Op::Binary(Binary::AddV2).name())
            .with_input(TensorRef::new(mul_name, 0))
            .with_input(TensorRef::new(shift_name, 0))
            .with_attr("T", Attr::Type(DType::F32));
        add.device = device;
        g.nodes[i] = add;
        stats.fused_batch_norms += 1;
    }
    g.nodes.extend(added);
    Ok(())
}

/// The (NHWC) bias add batch norms fold into.
const BIAS_ADD: Op = Op::BiasAdd {
    layout: Layout::Nhwc,
    v1: false,
};

/// Output channels of a weighted op and how to scale its weights per channel.
struct Weighted {
    weight: TensorRef,
    channels: usize,
    /// For element `i` of the flattened weights, its output channel.
    channel_of: Box<dyn Fn(usize) -> usize>,
}

fn weighted(g: &Graph, idx: &HashMap<String, usize>, n: &Node) -> Option<Weighted> {
    let w = n.inputs.get(1)?;
    let (_, shape) = const_f32(g, idx, w)?;
    match Op::parse(n).ok()? {
        Op::Conv2D(_) if shape.len() == 4 => {
            let o = shape[3];
            Some(Weighted {
                weight: w.clone(),
                channels: o,
                channel_of: Box::new(move |i| i % o),
            })
        }
        Op::DepthwiseConv2dNative(_) if shape.len() == 4 => {
            let o = shape[2] * shape[3];
            Some(Weighted {
                weight: w.clone(),
                channels: o,
                channel_of: Box::new(move |i| i % o),
            })
        }
        Op::MatMul(m) if shape.len() == 2 && !m.transpose_a => {
            if m.transpose_b {
                let (o, k) = (shape[0], shape[1]);
                Some(Weighted {
                    weight: w.clone(),
                    channels: o,
                    channel_of: Box::new(move |i| i / k),
                })
            } else {
                let o = shape[1];
                Some(Weighted {
                    weight: w.clone(),
                    channels: o,
                    channel_of: Box::new(move |i| i % o),
                })
            }
        }
        _ => None,
    }
}

/// A per-channel vector from a constant that broadcasts only along the last axis of
/// a rank-`rank` tensor with `channels` channels.
pub(super) fn per_channel(
    v: &[f32],
    shape: &[usize],
    channels: usize,
    rank: usize,
) -> Option<Vec<f32>> {
    if v.len() == 1 && shape.len() <= rank {
        return Some(vec![v[0]; channels]);
    }
    let last_only = shape.len() <= rank
        && shape.last() == Some(&channels)
        && shape[..shape.len() - 1].iter().all(|&d| d == 1);
    last_only.then(|| v.to_vec())
}

fn output_rank(n: &Node) -> usize {
    if matches!(Op::parse(n), Ok(Op::MatMul(_))) {
        2
    } else {
        4
    }
}

/// One folding step; returns whether something changed.
fn fold_once(g: &mut Graph, stats: &mut BnStats) -> Result<bool> {
    let idx = index(g);
    let rd = readers(g);
    let single = |r: &TensorRef| rd.get(&(r.node.clone(), r.index)).copied() == Some(1);
    let is_output = |name: &str| g.outputs.iter().any(|r| r.node == name);
    for i in 0..g.nodes.len() {
        let n = &g.nodes[i];
        let op = Op::parse(n).ok();
        let is_mul = matches!(op, Some(Op::Binary(Binary::Mul)));
        let is_sub = matches!(op, Some(Op::Binary(Binary::Sub)));
        let is_add = is_sub || matches!(op, Some(Op::Binary(Binary::Add | Binary::AddV2)));
        if !(is_mul || is_add)
            || n.inputs.len() != 2
            || n.attr_type("T").unwrap_or(DType::F32) != DType::F32
        {
            continue;
        }
        let (y_ref, c_ref) = match (
            const_f32(g, &idx, &n.inputs[1]).is_some(),
            const_f32(g, &idx, &n.inputs[0]).is_some() && !is_sub,
        ) {
            (true, _) => (&n.inputs[0], &n.inputs[1]),
            (false, true) => (&n.inputs[1], &n.inputs[0]),
            _ => continue,
        };
        if y_ref.index != 0 || !single(y_ref) {
            continue;
        }
        let Some(&yi) = idx.get(&y_ref.node) else {
            continue;
        };
        let y = &g.nodes[yi];
        let (c, cshape) = const_f32(g, &idx, c_ref).unwrap_or_default();
        // y is either the weighted op itself or BiasAdd(weighted op, const bias).
        let (wi, bias) = if y.op == BIAS_ADD.name() {
            let Some(&wi) = idx.get(&y.inputs[0].node) else {
                continue;
            };
            if y.inputs[0].index != 0 || !single(&y.inputs[0]) || is_output(&g.nodes[wi].name) {
                continue;
            }
            match const_f32(g, &idx, &y.inputs[1]) {
                Some(b) => (wi, Some((y.inputs[1].clone(), b.0))),
                None => continue,
            }
        } else {
            (yi, None)
        };
        let wnode = &g.nodes[wi];
        let Some(w) = weighted(g, &idx, wnode) else {
            continue;
        };
        let Some(mut cv) = per_channel(&c, &cshape, w.channels, output_rank(wnode)) else {
            continue;
        };
        if is_sub {
            cv.iter_mut().for_each(|v| *v = -*v);
        }
        let name = n.name.clone();
        let device = n.device.clone();
        let name_is_output = is_output(&name);
        let y_out = y_ref.clone();
        let y_name = y_ref.node.clone();
        let y_src = y.inputs[0].clone();
        let wnode_name = wnode.name.clone();
        let weight_ref = w.weight.clone();
        let (wv, wshape) = const_f32(g, &idx, &w.weight).unwrap_or_default();
        let scaled: Vec<f32> = wv
            .iter()
            .enumerate()
            .map(|(k, &v)| v * cv[(w.channel_of)(k)])
            .collect();
        if is_mul {
            let wname = set_const(
                g,
                &idx,
                &rd,
                &weight_ref,
                &format!("{wnode_name}/folded_weights"),
                Tensor::from_vec(wshape, &scaled),
            );
            g.nodes[wi].inputs[1] = TensorRef::new(wname, 0);
            if let Some((bref, b)) = &bias {
                let nb: Vec<f32> = b.iter().zip(&cv).map(|(b, s)| b * s).collect();
                let bname = set_const(
                    g,
                    &idx,
                    &rd,
                    bref,
                    &format!("{y_name}/folded_bias"),
                    Tensor::from_vec(vec![nb.len()], &nb),
                );
                g.nodes[yi].inputs[1] = TensorRef::new(bname, 0);
            }
            // The multiply is now the identity: its readers read y instead.
            if name_is_output {
                g.nodes[i] = Node::new(name, Op::Forward(Forward::Identity).name())
                    .with_input(y_out)
                    .with_attr("T", Attr::Type(DType::F32));
            } else {
                for m in g.nodes.iter_mut() {
                    for r in m.inputs.iter_mut() {
                        if r.node == name && r.index == 0 {
                            *r = y_out.clone();
                        }
                    }
                }
                g.nodes.remove(i);
            }
            stats.muls_into_weights += 1;
        } else {
            let (src, newb) = match &bias {
                Some((_, b)) => (
                    y_src,
                    b.iter().zip(&cv).map(|(b, s)| b + s).collect::<Vec<f32>>(),
                ),
                None => (y_out, cv),
            };
            let bname = unique_name(&idx, format!("{name}/folded_bias"));
            let mut ba = Node::new(name, BIAS_ADD.name())
                .with_input(src)
                .with_input(TensorRef::new(bname.clone(), 0))
                .with_attr("T", Attr::Type(DType::F32))
                .with_attr("data_format", Attr::Str(b"NHWC".to_vec()));
            ba.device = device;
            g.nodes[i] = ba;
            g.nodes.push(Node::constant(
                bname,
                Tensor::from_vec(vec![newb.len()], &newb),
            ));
            if bias.is_some() {
                g.nodes.remove(yi);
            }
            stats.adds_into_bias += 1;
        }
        return Ok(true);
    }
    Ok(false)
}

/// Replaces the value of constant `r` when nothing else reads it, or adds a new
/// constant named `fallback`; returns the name to read.
fn set_const(
    g: &mut Graph,
    idx: &HashMap<String, usize>,
    rd: &HashMap<(String, u32), usize>,
    r: &TensorRef,
    fallback: &str,
    value: Tensor,
) -> String {
    if rd.get(&(r.node.clone(), r.index)).copied() == Some(1) {
        if let Some(&i) = idx.get(&r.node) {
            g.nodes[i].attrs.insert("value".into(), Attr::Tensor(value));
            return r.node.clone();
        }
    }
    let name = unique_name(idx, fallback.to_string());
    g.nodes.push(Node::constant(name.clone(), value));
    name
}

/// Folds every batch norm and per-channel affine constant it can.
pub fn fold_batch_norms(g: &mut Graph) -> Result<BnStats> {
    let mut stats = BnStats::default();
    rewrite_fused(g, &mut stats)?;
    fold_backward(g, &mut stats)?;
    Ok(stats)
}

/// Folds per-channel constant multiplies and adds into the op before them, as long as
/// there are any.
pub fn fold_backward(g: &mut Graph, stats: &mut BnStats) -> Result<()> {
    let limit = g.nodes.len() * 2 + 16;
    for _ in 0..limit {
        if !fold_once(g, stats)? {
            break;
        }
    }
    Ok(())
}
