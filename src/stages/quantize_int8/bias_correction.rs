//! Empirical bias correction of the weights' quantization error (§3.5 of the
//! methods reference, NNCF's fast bias correction): with int8 weights a layer
//! computes `W_q·x + b` where the float one computes `W·x + b`, and over the
//! calibration data the mean of the difference, `(W − W_q)·E[x]`, is a systematic
//! shift of each output channel, which is folded into the bias:
//! `b_c += Σ_i (W − W_q)[i, c] · E[x_i]`. `E[x_i]` is measured on the calibration
//! data (per-channel means of each layer's input, recorded by the calibration pass
//! when `bias_correction` is on); `W_q` is exactly the int8 weights the rewrite
//! writes (symmetric, per channel as configured). No new pass over the model is
//! needed when the method changes.
//!
//! The activations' own quantization error is deliberately left out: its mean
//! shift comes from clipping, and a clipping range that drops rare outliers
//! (percentile, KL, auto) would turn their mean into a bias added to every sample,
//! undoing the point of clipping them (measured on q16_sensitive_act: 17 points
//! lost instead of none).
//!
//! Convolutions use the channel mean of the input for every tap, which ignores the
//! zero padding at the borders; depthwise convolutions are not corrected.

use std::collections::{BTreeSet, HashSet};

use crate::error::{Error, Result};
use crate::ir::op::{Layout, Linear};
use crate::ir::{DType, Graph, Node, Op, Tensor, TensorRef};

use super::calibration::Stats;
use super::params::symmetric_weights;

/// A correctable layer: its data input, weight and bias constants, the weight
/// axes of output and input channels, and the axis TFLite quantizes along.
struct Layer {
    node: usize,
    input: TensorRef,
    weights: usize,
    bias: usize,
    out_axis: usize,
    in_axis: usize,
    quant_axis: Option<usize>,
}

fn layers(g: &Graph, per_channel_dense: bool) -> Result<Vec<Layer>> {
    let index = g.index().map_err(|e| Error::msg(e.to_string()))?;
    let consumers = g.consumers();
    let mut out = Vec::new();
    for (i, n) in g.nodes.iter().enumerate() {
        let Ok(Op::Fused { linear, .. }) = Op::parse(n) else {
            continue;
        };
        let (out_axis, in_axis, quant_axis) = match linear {
            Linear::MatMul(m) if !m.transpose_a => {
                let (o, i) = if m.transpose_b { (0, 1) } else { (1, 0) };
                (o, i, per_channel_dense.then_some(o))
            }
            Linear::Conv2D(c) if c.layout == Layout::Nhwc => (3, 2, Some(3)),
            _ => continue,
        };
        let konst = |k: usize| -> Option<usize> {
            let r = n.inputs.get(k)?;
            let j = *index.get(r.node.as_str())?;
            let t = g.nodes[j].const_value()?;
            // A constant another node reads too would be corrected for both.
            let sole = consumers
                .get(&g.nodes[j].name)
                .is_some_and(|v| v.len() == 1);
            (r.index == 0 && t.dtype() == DType::F32 && sole).then_some(j)
        };
        let (Some(input), Some(weights), Some(bias)) = (n.inputs.first(), konst(1), konst(2))
        else {
            continue;
        };
        if index
            .get(input.node.as_str())
            .is_some_and(|&j| g.nodes[j].is_const())
        {
            continue;
        }
        out.push(Layer {
            node: i,
            input: input.clone(),
            weights,
            bias,
            out_axis,
            in_axis,
            quant_axis,
        });
    }
    Ok(out)
}

/// The tensors whose per-channel means calibration must record.
pub fn layer_inputs(g: &Graph) -> Result<BTreeSet<TensorRef>> {
    Ok(layers(g, true)?.into_iter().map(|l| l.input).collect())
}

#[derive(Debug, Default)]
pub struct Report {
    pub layers: usize,
    /// The largest shift of a bias, relative to that layer's largest |bias| (or
    /// absolute when the biases are all 0).
    pub max_relative_shift: f64,
}

/// `g` with the bias of every correctable layer not in `exclude` corrected, using
/// the per-channel means in `stats`.
pub fn correct(
    g: &Graph,
    stats: &Stats,
    per_channel_dense: bool,
    exclude: &HashSet<String>,
) -> Result<(Graph, Report)> {
    let mut out = g.clone();
    let mut report = Report::default();
    for l in layers(g, per_channel_dense)? {
        if exclude.contains(&g.nodes[l.node].name) {
            continue;
        }
        let key = l.input.to_string();
        let Some(means) = stats.channel_means.get(&key) else {
            continue;
        };
        let (Some(w), Some(b)) = (
            g.nodes[l.weights].const_value(),
            g.nodes[l.bias].const_value(),
        ) else {
            continue;
        };
        let shape = w.shape().to_vec();
        if shape.len() <= l.out_axis.max(l.in_axis) || shape[l.in_axis] != means.len() {
            continue;
        }
        let wv: Vec<f32> = w.values().map_err(|e| Error::msg(e.to_string()))?;
        let mut bv: Vec<f32> = b.values().map_err(|e| Error::msg(e.to_string()))?;
        if bv.len() != shape[l.out_axis] {
            continue;
        }
        let (q, p) = symmetric_weights(w, l.quant_axis)?;
        let qv: Vec<i8> = q.values().map_err(|e| Error::msg(e.to_string()))?;
        let (cin, cout) = (shape[l.in_axis], shape[l.out_axis]);
        let in_inner: usize = shape[l.in_axis + 1..].iter().product();
        let out_inner: usize = shape[l.out_axis + 1..].iter().product();
        let mut shift = vec![0f64; cout];
        for (k, (&wf, &wq)) in wv.iter().zip(&qv).enumerate() {
            let i = (k / in_inner) % cin;
            let c = (k / out_inner) % cout;
            let s = if p.scale.len() == 1 {
                p.scale[0]
            } else {
                p.scale[c]
            };
            let deq = wq as f64 * s as f64;
            shift[c] += (wf as f64 - deq) * means[i];
        }
        let scale = bv.iter().fold(0f64, |m, &x| m.max(x.abs() as f64));
        for (b, d) in bv.iter_mut().zip(&shift) {
            *b += *d as f32;
            let rel = if scale > 0.0 {
                d.abs() / scale
            } else {
                d.abs()
            };
            report.max_relative_shift = report.max_relative_shift.max(rel);
        }
        let old = &out.nodes[l.bias];
        let mut n = Node::constant(old.name.clone(), Tensor::from_vec(b.shape().to_vec(), &bv));
        n.device = old.device.clone();
        out.nodes[l.bias] = n;
        report.layers += 1;
    }
    Ok((out, report))
}
