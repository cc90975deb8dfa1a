//! Cross-layer equalization (Nagel et al. 2019, §3.6 of the methods reference) on
//! the fused graph: for a fused Conv2D/MatMul `A` whose output feeds only another
//! fused Conv2D/MatMul `B`, through no activation or a ReLU, scale `A`'s output
//! channel `i` by `1/s_i` and `B`'s input channel `i` by `s_i`, with
//! `s_i = sqrt(r1_i / r2_i)` (`r1`, `r2` the channel's largest weight magnitude in
//! `A` and in `B`). ReLU is positively homogeneous (`relu(x/s)·s = relu(x)` for
//! `s > 0`), so the float function is unchanged, and both layers' per-channel
//! ranges become `sqrt(r1_i·r2_i)`: an outlier channel no longer stretches the
//! per-tensor activation range between them.
//!
//! ReLU6 (and ReLU-N1-to-1) is not positively homogeneous: `relu6(x/s)·s` caps at
//! `6s`. A pair through one is equalized only where the cap is provably never
//! reached, before or after scaling: when `A`'s input is bounded (the output of a
//! ReLU6, sigmoid, tanh or softmax) and the bound propagated through `A`'s weights
//! and bias keeps channel `i` below the cap, `s_i` is raised as needed to keep it
//! there. Otherwise the pair is left alone and reported.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::ir::op::{FusedActivation, Layout, Linear, Unary};
use crate::ir::{Graph, Node, Op, Tensor, TensorRef};

/// Sweeps over the pairs (chains A→B→C need several to settle).
const SWEEPS: usize = 8;

#[derive(Debug, Default)]
pub struct Report {
    /// (A, B) pairs equalized.
    pub pairs: Vec<(String, String)>,
    /// Pairs left alone, with why.
    pub skipped: Vec<(String, String, String)>,
}

/// A fused layer equalization can rescale: its weight and bias constants, and the
/// axes of its weights that hold output and input channels.
struct Layer {
    node: usize,
    weights: usize,
    bias: usize,
    out_axis: usize,
    in_axis: usize,
    activation: FusedActivation,
}

fn layer(g: &Graph, index: &HashMap<&str, usize>, i: usize) -> Option<Layer> {
    let n = &g.nodes[i];
    let Ok(Op::Fused { linear, activation }) = Op::parse(n) else {
        return None;
    };
    let (out_axis, in_axis) = match linear {
        Linear::MatMul(m) if !m.transpose_a => {
            if m.transpose_b {
                (0, 1)
            } else {
                (1, 0)
            }
        }
        Linear::Conv2D(c) if c.layout == Layout::Nhwc => (3, 2),
        _ => return None,
    };
    let konst = |k: usize| -> Option<usize> {
        let r = n.inputs.get(k)?;
        let j = *index.get(r.node.as_str())?;
        let t = g.nodes[j].const_value()?;
        (r.index == 0 && t.dtype() == crate::ir::DType::F32).then_some(j)
    };
    Some(Layer {
        node: i,
        weights: konst(1)?,
        bias: konst(2)?,
        out_axis,
        in_axis,
        activation,
    })
}

/// Per-channel largest magnitude along `axis`.
fn channel_max(t: &[f32], shape: &[usize], axis: usize) -> Vec<f32> {
    let c = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    let mut m = vec![0f32; c];
    for (k, v) in t.iter().enumerate() {
        let ch = (k / inner) % c;
        m[ch] = m[ch].max(v.abs());
    }
    m
}

/// Per-channel sum of magnitudes along `axis` (for the bound through a layer).
fn channel_abs_sum(t: &[f32], shape: &[usize], axis: usize) -> Vec<f64> {
    let c = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    let mut m = vec![0f64; c];
    for (k, v) in t.iter().enumerate() {
        m[(k / inner) % c] += v.abs() as f64;
    }
    m
}

fn scale_channels(t: &mut [f32], shape: &[usize], axis: usize, s: &[f32], divide: bool) {
    let c = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    for (k, v) in t.iter_mut().enumerate() {
        let f = s[(k / inner) % c];
        *v = if divide { *v / f } else { *v * f };
    }
}

/// Largest magnitude an op's output can have whatever its input, if it has one.
fn output_bound(g: &Graph, index: &HashMap<&str, usize>, r: &TensorRef) -> Option<f64> {
    let n = &g.nodes[*index.get(r.node.as_str())?];
    match Op::parse(n).ok()? {
        Op::Fused {
            activation: FusedActivation::Relu6,
            ..
        } => Some(6.0),
        Op::Fused {
            activation: FusedActivation::ReluN1To1,
            ..
        } => Some(1.0),
        Op::Unary(Unary::Relu6) => Some(6.0),
        Op::Unary(Unary::Sigmoid | Unary::Tanh) | Op::Softmax => Some(1.0),
        _ => None,
    }
}

/// Equalizes every eligible pair of `g` (already fused); the float function is
/// unchanged up to float rounding.
pub fn equalize(g: &Graph) -> Result<(Graph, Report)> {
    let mut g = g.clone();
    let mut report = Report::default();
    let index: HashMap<&str, usize> = g.index().map_err(|e| Error::msg(e.to_string()))?;
    let consumers = g.consumers();
    let outputs: std::collections::HashSet<&str> =
        g.outputs.iter().map(|r| r.node.as_str()).collect();
    let mut pairs: Vec<(Layer, Layer, Option<f64>)> = Vec::new();
    let order = g.topo_order().map_err(|e| Error::msg(e.to_string()))?;
    for &i in &order {
        let Some(a) = layer(&g, &index, i) else {
            continue;
        };
        let name = &g.nodes[i].name;
        let readers = consumers.get(name).map(Vec::as_slice).unwrap_or(&[]);
        let [j] = readers else { continue };
        if outputs.contains(name.as_str()) {
            continue;
        }
        let Some(b) = layer(&g, &index, *j) else {
            continue;
        };
        let bn = &g.nodes[*j];
        let bname = bn.name.clone();
        if bn.inputs.first() != Some(&TensorRef::new(name.clone(), 0))
            || bn.inputs.iter().skip(1).any(|r| r.node == *name)
        {
            continue;
        }
        // A weight or bias another node also reads cannot be rescaled for this pair.
        let shared = [a.weights, a.bias, b.weights].iter().any(|&c| {
            consumers
                .get(&g.nodes[c].name)
                .is_some_and(|v| v.len() != 1)
        });
        if shared {
            report.skipped.push((
                name.clone(),
                bname,
                "a weight or bias is shared with another node".into(),
            ));
            continue;
        }
        let wa = g.nodes[a.weights].const_value().map(|t| t.shape().to_vec());
        let wb = g.nodes[b.weights].const_value().map(|t| t.shape().to_vec());
        let (Some(wa), Some(wb)) = (wa, wb) else {
            continue;
        };
        let channels = wa.get(a.out_axis).copied();
        if channels.is_none() || channels != wb.get(b.in_axis).copied() {
            report.skipped.push((
                name.clone(),
                bname,
                "the layers' channel counts differ (grouped convolution)".into(),
            ));
            continue;
        }
        let cap = match a.activation {
            FusedActivation::None | FusedActivation::Relu => None,
            FusedActivation::Relu6 | FusedActivation::ReluN1To1 => {
                let bound = g.nodes[i]
                    .inputs
                    .first()
                    .and_then(|r| output_bound(&g, &index, r));
                match bound {
                    Some(bd) => Some(bd),
                    None => {
                        report.skipped.push((
                            name.clone(),
                            bname,
                            "its activation caps (ReLU6) and its input is unbounded, so the \
                             cap may be reached"
                                .into(),
                        ));
                        continue;
                    }
                }
            }
        };
        pairs.push((a, b, cap));
    }
    let mut done = vec![false; pairs.len()];
    for _ in 0..SWEEPS {
        let mut moved = 0f32;
        for (k, (a, b, input_bound)) in pairs.iter().enumerate() {
            let w1 = g.nodes[a.weights].const_value().cloned();
            let b1 = g.nodes[a.bias].const_value().cloned();
            let w2 = g.nodes[b.weights].const_value().cloned();
            let (Some(w1), Some(b1), Some(w2)) = (w1, b1, w2) else {
                continue;
            };
            let (s1, s2) = (w1.shape().to_vec(), w2.shape().to_vec());
            let mut v1: Vec<f32> = w1.values().map_err(|e| Error::msg(e.to_string()))?;
            let mut vb: Vec<f32> = b1.values().map_err(|e| Error::msg(e.to_string()))?;
            let mut v2: Vec<f32> = w2.values().map_err(|e| Error::msg(e.to_string()))?;
            if vb.len() != s1[a.out_axis] {
                continue;
            }
            let r1 = channel_max(&v1, &s1, a.out_axis);
            let r2 = channel_max(&v2, &s2, b.in_axis);
            let cap = match a.activation {
                FusedActivation::ReluN1To1 => 1.0,
                _ => 6.0,
            };
            // The largest pre-activation of each channel, when A's input is bounded.
            let reach: Option<Vec<f64>> = input_bound.map(|bd| {
                channel_abs_sum(&v1, &s1, a.out_axis)
                    .iter()
                    .zip(&vb)
                    .map(|(s, b)| s * bd + b.abs() as f64)
                    .collect()
            });
            let s: Vec<f32> = (0..r1.len())
                .map(|i| {
                    if r1[i] <= 0.0 || r2[i] <= 0.0 {
                        return 1.0;
                    }
                    let mut s = (r1[i] / r2[i]).sqrt();
                    if let Some(u) = &reach {
                        if u[i] >= cap {
                            return 1.0;
                        }
                        // Keep the scaled channel below the cap too: u/s < cap.
                        s = s.max((u[i] / cap * 1.0001) as f32);
                    }
                    if s.is_finite() && s > 0.0 {
                        s
                    } else {
                        1.0
                    }
                })
                .collect();
            if s.iter().all(|&x| x == 1.0) {
                continue;
            }
            scale_channels(&mut v1, &s1, a.out_axis, &s, true);
            for (b, f) in vb.iter_mut().zip(&s) {
                *b /= f;
            }
            scale_channels(&mut v2, &s2, b.in_axis, &s, false);
            for (c, vals, shape) in [
                (a.weights, &v1, &s1),
                (a.bias, &vb, &b1.shape().to_vec()),
                (b.weights, &v2, &s2),
            ] {
                let old = &g.nodes[c];
                let mut n = Node::constant(old.name.clone(), Tensor::from_vec(shape.clone(), vals));
                n.device = old.device.clone();
                g.nodes[c] = n;
            }
            done[k] = true;
            moved = s.iter().fold(moved, |m, &x| m.max(x.ln().abs()));
        }
        if moved < 1e-3 {
            break;
        }
    }
    for ((a, b, _), d) in pairs.iter().zip(done) {
        let (an, bn) = (g.nodes[a.node].name.clone(), g.nodes[b.node].name.clone());
        if d {
            report.pairs.push((an, bn));
        } else {
            report
                .skipped
                .push((an, bn, "already balanced (every scale 1)".into()));
        }
    }
    Ok((g, report))
}
