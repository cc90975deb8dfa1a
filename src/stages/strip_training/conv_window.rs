//! Rewrites of a convolution's window that TF's converter makes:
//!
//! * `SpaceToBatchND → Conv2D|DepthwiseConv2dNative (VALID, stride 1) → BatchToSpaceND`
//!   (what `atrous_conv2d` and a dilated Keras conv make) is one dilated convolution.
//!   With paddings `(pb, pa)` and crops `(cb, ca)` per spatial axis, output `o` of the
//!   three reads padded input `o + cb - pb + t·rate` for tap `t`, so the chain is the
//!   dilated convolution with `pb - cb` leading zeros and `(pb + pa) - (cb + ca)`
//!   zeros in all: SAME when those are `⌊(k-1)·rate / 2⌋` and `(k-1)·rate`, VALID
//!   when both are zero (conditions that do not depend on the input size);
//! * an explicit zero `Pad` of the spatial axes before a VALID convolution (Keras
//!   `ZeroPadding2D` before a strided conv) is that convolution with SAME padding
//!   when the pads are exactly SAME's for the (known) input size.

use std::collections::HashMap;

use crate::error::Result;
use crate::ir::op::{Conv, Layout, Padding};
use crate::ir::shape_infer::infer_shapes;
use crate::ir::{Attr, DType, Graph, Node, Op, TensorRef};

/// Counters of what was rewritten.
#[derive(Debug, Default)]
pub struct WindowStats {
    pub dilated_convolutions: usize,
    pub pads_folded: usize,
}

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

fn const_ints(g: &Graph, idx: &HashMap<String, usize>, r: &TensorRef) -> Option<Vec<i64>> {
    let t = g.nodes[*idx.get(&r.node)?].const_value()?;
    (r.index == 0).then(|| t.to_i64_vec().ok()).flatten()
}

/// A NHWC convolution or depthwise convolution with constant 4-D weights.
fn conv_of(g: &Graph, idx: &HashMap<String, usize>, n: &Node) -> Option<(Conv, [i64; 2])> {
    let c = match Op::parse(n).ok()? {
        Op::Conv2D(c) | Op::DepthwiseConv2dNative(c) => c,
        _ => return None,
    };
    let w = g.nodes[*idx.get(&n.inputs.get(1)?.node)?].const_value()?;
    let s = w.shape();
    (c.layout == Layout::Nhwc && s.len() == 4 && n.inputs.len() == 2)
        .then_some((c, [s[0] as i64, s[1] as i64]))
}

fn set_window(n: &mut Node, padding: Padding, dilations: [i64; 2]) {
    let p: &[u8] = match padding {
        Padding::Same => b"SAME",
        _ => b"VALID",
    };
    n.attrs.insert("padding".into(), Attr::Str(p.to_vec()));
    n.attrs.remove("explicit_paddings");
    n.attrs.insert(
        "dilations".into(),
        Attr::Ints(vec![1, dilations[0], dilations[1], 1]),
    );
}

/// Folds every `SpaceToBatchND → conv → BatchToSpaceND` chain it can.
pub fn fold_space_to_batch(g: &mut Graph, stats: &mut WindowStats) -> Result<()> {
    loop {
        let idx = index(g);
        let rd = readers(g);
        let mut done = None;
        for (bi, b) in g.nodes.iter().enumerate() {
            if !matches!(Op::parse(b), Ok(Op::BatchToSpaceND)) || b.inputs.len() != 3 {
                continue;
            }
            let Some(&ci) = idx.get(&b.inputs[0].node) else {
                continue;
            };
            let c = &g.nodes[ci];
            let Some((conv, k)) = conv_of(g, &idx, c) else {
                continue;
            };
            if b.inputs[0].index != 0
                || rd.get(&b.inputs[0]).copied() != Some(1)
                || conv.strides != [1, 1]
                || conv.dilations != [1, 1]
                || conv.padding != Padding::Valid
            {
                continue;
            }
            let Some(&si) = idx.get(&c.inputs[0].node) else {
                continue;
            };
            let s = &g.nodes[si];
            if !matches!(Op::parse(s), Ok(Op::SpaceToBatchND))
                || s.inputs.len() != 3
                || c.inputs[0].index != 0
                || rd.get(&c.inputs[0]).copied() != Some(1)
            {
                continue;
            }
            let (Some(block), Some(block2), Some(pads), Some(crops)) = (
                const_ints(g, &idx, &s.inputs[1]),
                const_ints(g, &idx, &b.inputs[1]),
                const_ints(g, &idx, &s.inputs[2]),
                const_ints(g, &idx, &b.inputs[2]),
            ) else {
                continue;
            };
            if block.len() != 2 || block != block2 || pads.len() != 4 || crops.len() != 4 {
                continue;
            }
            if block.iter().any(|&r| r < 1) || pads.iter().chain(&crops).any(|&p| p < 0) {
                continue;
            }
            let fits = |same: bool| {
                (0..2).all(|a| {
                    let eff = (k[a] - 1) * block[a];
                    let (pb, pa, cb, ca) =
                        (pads[2 * a], pads[2 * a + 1], crops[2 * a], crops[2 * a + 1]);
                    let (lead, total) = (pb - cb, pb + pa - cb - ca);
                    if same {
                        lead == eff / 2 && total == eff
                    } else {
                        lead == 0 && total == 0
                    }
                })
            };
            let padding = if fits(true) {
                Padding::Same
            } else if fits(false) {
                Padding::Valid
            } else {
                continue;
            };
            done = Some((bi, ci, s.inputs[0].clone(), padding, [block[0], block[1]]));
            break;
        }
        let Some((bi, ci, x, padding, rate)) = done else {
            return Ok(());
        };
        // The convolution takes the BatchToSpaceND's place and name.
        let mut conv = g.nodes[ci].clone();
        conv.name = g.nodes[bi].name.clone();
        conv.inputs[0] = x;
        set_window(&mut conv, padding, rate);
        g.nodes[bi] = conv;
        g.prune_to_outputs()?;
        stats.dilated_convolutions += 1;
    }
}

/// SAME's (before, after) padding of one axis.
fn same_pads(size: i64, k: i64, stride: i64, dilation: i64) -> (i64, i64) {
    let out = (size + stride - 1) / stride;
    let total = ((out - 1) * stride + (k - 1) * dilation + 1 - size).max(0);
    (total / 2, total - total / 2)
}

/// Folds every zero `Pad` before a VALID convolution that equals SAME padding.
pub fn fold_pads(g: &mut Graph, stats: &mut WindowStats) -> Result<()> {
    loop {
        let idx = index(g);
        let rd = readers(g);
        let mut candidates = Vec::new();
        for (ci, c) in g.nodes.iter().enumerate() {
            let Some((conv, k)) = conv_of(g, &idx, c) else {
                continue;
            };
            if conv.padding != Padding::Valid || rd.get(&c.inputs[0]).copied() != Some(1) {
                continue;
            }
            let Some(&pi) = idx.get(&c.inputs[0].node) else {
                continue;
            };
            let p = &g.nodes[pi];
            if !matches!(Op::parse(p), Ok(Op::Pad))
                || p.inputs.len() != 2
                || c.inputs[0].index != 0
                || p.attr_type("T").unwrap_or(DType::F32) != DType::F32
            {
                continue;
            }
            let Some(pads) = const_ints(g, &idx, &p.inputs[1]) else {
                continue;
            };
            if pads.len() != 8 || pads[0..2] != [0, 0] || pads[6..8] != [0, 0] {
                continue;
            }
            candidates.push((ci, p.inputs[0].clone(), pads, conv, k));
        }
        if candidates.is_empty() {
            return Ok(());
        }
        // Shapes guide an optional rewrite only: without them the pads stay.
        let Ok(infos) = infer_shapes(g) else {
            return Ok(());
        };
        let mut changed = false;
        for (ci, x, pads, conv, k) in candidates {
            let Some(shape) = infos.get(&x).map(|i| i.shape.clone()) else {
                continue;
            };
            if shape.len() != 4 {
                continue;
            }
            let same = (0..2).all(|a| {
                let size = shape[1 + a];
                size > 0
                    && same_pads(size, k[a], conv.strides[a], conv.dilations[a])
                        == (pads[2 + 2 * a], pads[3 + 2 * a])
            });
            if !same {
                continue;
            }
            let n = &mut g.nodes[ci];
            n.inputs[0] = x;
            set_window(n, Padding::Same, conv.dilations);
            stats.pads_folded += 1;
            changed = true;
        }
        if !changed {
            return Ok(());
        }
        g.prune_to_outputs()?;
    }
}
