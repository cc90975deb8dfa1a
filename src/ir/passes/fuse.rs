//! Grappler-style fusion of a matrix op with its bias and activation:
//! `Conv2D|DepthwiseConv2dNative|MatMul` + `BiasAdd` (+ `Relu|Relu6`) become one
//! `_FusedConv2D|_FusedDepthwiseConv2dNative|_FusedMatMul(x, w, bias)` with
//! `fused_ops = ["BiasAdd"(, act)]` and `num_args = 1`, named after the last node
//! of the chain, so that graph outputs and comparisons by name keep working.
//!
//! A `Conv2D` whose output is squeezed or reshaped before the bias (what
//! `tf.nn.conv1d` and Keras `Conv1D` produce) is fused across that node as long as
//! it keeps the channel axis last: the fused convolution keeps the `Conv2D`'s name
//! and the `Squeeze`/`Reshape` moves after it under the last node's name.
//!
//! A `Conv2DBackpropInput` with a bias (and activation) is fused too, keeping its
//! op (see [`super::fuse_tconv`]).
//!
//! With `zero_bias`, a convolution or matrix product that has no bias gets a zero
//! one, so that every such op of a graph to quantize has the fused form.

use std::collections::{HashMap, HashSet};

use crate::ir::op::{Layout, Linear, Unary};
use crate::ir::{Attr, DType, FusedActivation, Graph, IrError, Node, Op, Tensor, TensorRef};

/// What [`fuse`] did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct FuseReport {
    pub fused: usize,
    pub zero_biases: usize,
}

/// The matrix op of `op` when it has a fused form (NHWC convolutions, matrix products).
fn linear_of(op: &Op) -> Option<Linear> {
    match op {
        Op::Conv2D(c) if c.layout == Layout::Nhwc => Some(Linear::Conv2D(*c)),
        Op::DepthwiseConv2dNative(c) if c.layout == Layout::Nhwc => Some(Linear::Depthwise(*c)),
        Op::MatMul(m) => Some(Linear::MatMul(*m)),
        _ => None,
    }
}

/// Output channels of a matrix op from its constant weights.
fn out_channels(linear: &Linear, w: &Tensor) -> Option<usize> {
    let s = w.shape();
    match linear {
        Linear::Conv2D(_) if s.len() == 4 => Some(s[3]),
        Linear::Depthwise(_) if s.len() == 4 => Some(s[2] * s[3]),
        Linear::MatMul(m) if s.len() == 2 => Some(if m.transpose_b { s[0] } else { s[1] }),
        _ => None,
    }
}

fn parsed(n: &Node) -> Option<Op> {
    Op::parse(n).ok()
}

struct Chain {
    op: usize,
    linear: Linear,
    /// A `Squeeze`/`Reshape` between the op and its bias.
    mid: Option<usize>,
    bias: Option<usize>,
    act: Option<usize>,
}

/// Fuses every matching chain; see the module documentation.
pub fn fuse(graph: &Graph, zero_bias: bool) -> Result<(Graph, FuseReport), IrError> {
    let index = graph.index()?;
    let consumers = graph.consumers();
    let outputs: HashSet<&str> = graph.outputs.iter().map(|r| r.node.as_str()).collect();
    let sole_reader = |name: &str| -> Option<usize> {
        if outputs.contains(name) {
            return None;
        }
        match consumers.get(name).map(Vec::as_slice) {
            Some([c]) => {
                let n = &graph.nodes[*c];
                let reads = n.inputs.iter().filter(|r| r.node == name).count();
                (reads == 1 && n.inputs.iter().all(|r| r.node != name || r.index == 0))
                    .then_some(*c)
            }
            _ => None,
        }
    };
    let const_of = |r: &TensorRef| -> Option<&Tensor> {
        index
            .get(r.node.as_str())
            .and_then(|&i| graph.nodes[i].const_value())
            .filter(|_| r.index == 0)
    };
    let mut chains = Vec::new();
    for (i, n) in graph.nodes.iter().enumerate() {
        let Some(linear) = parsed(n).as_ref().and_then(linear_of) else {
            continue;
        };
        if n.inputs.len() != 2 {
            continue;
        }
        let Some(w) = const_of(&n.inputs[1]) else {
            continue;
        };
        if w.dtype() != DType::F32 {
            continue;
        }
        if matches!(linear, Linear::MatMul(m) if m.transpose_a) {
            continue;
        }
        let Some(channels) = out_channels(&linear, w) else {
            continue;
        };
        let mut chain = Chain {
            op: i,
            linear,
            mid: None,
            bias: None,
            act: None,
        };
        let mut cur = n.name.as_str();
        if let Some(next) = sole_reader(cur) {
            let m = &graph.nodes[next];
            let conv2d = matches!(linear, Linear::Conv2D(_));
            let keeps_channels = match parsed(m) {
                Some(Op::Squeeze) if conv2d => match m.attr("squeeze_dims") {
                    Some(Attr::Ints(d)) if !d.is_empty() => d.iter().all(|&a| a != 3 && a != -1),
                    _ => channels != 1,
                },
                Some(Op::Reshape) if conv2d => index
                    .get(m.inputs.get(1).map(|r| r.node.as_str()).unwrap_or(""))
                    .and_then(|&j| graph.nodes[j].const_value())
                    .and_then(|t| t.to_i64_vec().ok())
                    .is_some_and(|s| s.last() == Some(&(channels as i64))),
                _ => false,
            };
            if keeps_channels {
                if let Some(b) = sole_reader(&m.name) {
                    if matches!(parsed(&graph.nodes[b]), Some(Op::BiasAdd { v1: false, .. })) {
                        chain.mid = Some(next);
                        cur = m.name.as_str();
                    }
                }
            }
        }
        if let Some(b) = sole_reader(cur) {
            let bn = &graph.nodes[b];
            let bias_ok = matches!(
                parsed(bn),
                Some(Op::BiasAdd {
                    v1: false,
                    layout: Layout::Nhwc
                })
            ) && bn.inputs.len() == 2
                && bn.inputs[0].node == cur
                && const_of(&bn.inputs[1])
                    .is_some_and(|t| t.dtype() == DType::F32 && t.shape() == [channels]);
            if bias_ok {
                chain.bias = Some(b);
                if let Some(a) = sole_reader(&bn.name) {
                    if matches!(
                        parsed(&graph.nodes[a]),
                        Some(Op::Unary(Unary::Relu | Unary::Relu6))
                    ) {
                        chain.act = Some(a);
                    }
                }
            }
        }
        if chain.bias.is_none() {
            chain.mid = None;
            if !zero_bias {
                continue;
            }
            // A biasless op gets a zero bias; its activation fuses all the same.
            if let Some(a) = sole_reader(&n.name) {
                if matches!(
                    parsed(&graph.nodes[a]),
                    Some(Op::Unary(Unary::Relu | Unary::Relu6))
                ) {
                    chain.act = Some(a);
                }
            }
        }
        chains.push((chain, channels));
    }

    let names: HashSet<&str> = graph.nodes.iter().map(|n| n.name.as_str()).collect();
    let mut report = FuseReport::default();
    // Node position → what replaces it (possibly nothing).
    let mut replace: HashMap<usize, Vec<Node>> = HashMap::new();
    let mut removed: HashSet<usize> = HashSet::new();
    let mut extra_consts = Vec::new();
    for (c, channels) in chains {
        let op = &graph.nodes[c.op];
        let last = c.act.or(c.bias).or(c.mid).unwrap_or(c.op);
        let fused_name = if c.mid.is_some() {
            op.name.clone()
        } else {
            graph.nodes[last].name.clone()
        };
        let bias_ref = match c.bias {
            Some(b) => graph.nodes[b].inputs[1].clone(),
            None => {
                let mut name = format!("{}/bias", op.name);
                let mut k = 1;
                while names.contains(name.as_str()) {
                    name = format!("{}/bias_{k}", op.name);
                    k += 1;
                }
                extra_consts.push(Node::constant(
                    name.clone(),
                    Tensor::from_vec(vec![channels], &vec![0f32; channels]),
                ));
                report.zero_biases += 1;
                TensorRef::new(name, 0)
            }
        };
        let fused = Op::Fused {
            linear: c.linear,
            activation: FusedActivation::None,
        };
        let mut f = Node::new(fused_name, fused.name());
        f.inputs = vec![op.inputs[0].clone(), op.inputs[1].clone(), bias_ref];
        f.device = op.device.clone();
        for key in [
            "T",
            "strides",
            "padding",
            "explicit_paddings",
            "dilations",
            "data_format",
            "transpose_a",
            "transpose_b",
        ] {
            if let Some(v) = op.attr(key) {
                f.attrs.insert(key.into(), v.clone());
            }
        }
        let mut ops: Vec<Vec<u8>> = vec![b"BiasAdd".to_vec()];
        if let Some(a) = c.act {
            ops.push(graph.nodes[a].op.as_bytes().to_vec());
        }
        f.attrs.insert("fused_ops".into(), Attr::Strs(ops));
        f.attrs.insert("num_args".into(), Attr::Int(1));
        let mut out = vec![f];
        if let Some(m) = c.mid {
            let mut mid = graph.nodes[m].clone();
            mid.name = graph.nodes[last].name.clone();
            mid.inputs[0] = TensorRef::new(op.name.clone(), 0);
            out.push(mid);
        }
        for i in [Some(c.op), c.mid, c.bias, c.act].into_iter().flatten() {
            removed.insert(i);
        }
        replace.insert(last, out);
        report.fused += 1;
    }
    let mut g = graph.clone();
    g.nodes.clear();
    g.nodes.extend(extra_consts);
    for (i, n) in graph.nodes.iter().enumerate() {
        if let Some(rep) = replace.remove(&i) {
            g.nodes.extend(rep);
        } else if !removed.contains(&i) {
            g.nodes.push(n.clone());
        }
    }
    let (g, tconv) = super::fuse_tconv::fuse(&g)?;
    report.fused += tconv;
    Ok((g, report))
}
