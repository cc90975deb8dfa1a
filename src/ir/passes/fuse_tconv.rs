//! The transposed convolution's share of [`super::fuse`]: `Conv2DBackpropInput`
//! (NHWC, constant float filter) + `BiasAdd` (a constant of its output channels)
//! (+ `Relu|Relu6`) become one `Conv2DBackpropInput(output_shape, filter, input,
//! bias)` with `fused_ops = ["BiasAdd"(, act)]`, named after the last node of the
//! chain: TFLite's TRANSPOSE_CONV takes the bias and the activation, and in int8
//! the bias must be int32 in the accumulator's scale, so the quantizer needs them
//! on one node. A transposed convolution without a bias stays as it is (TFLite's
//! bias is optional).

use std::collections::{HashMap, HashSet};

use crate::ir::op::{Layout, Unary};
use crate::ir::{Attr, DType, Graph, IrError, Node, Op, TensorRef};

fn parsed(n: &Node) -> Option<Op> {
    Op::parse(n).ok()
}

/// Fuses every matching chain; returns the graph and how many it fused.
pub fn fuse(graph: &Graph) -> Result<(Graph, usize), IrError> {
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
    let const_shape = |r: &TensorRef| -> Option<(DType, Vec<usize>)> {
        index
            .get(r.node.as_str())
            .and_then(|&i| graph.nodes[i].const_value())
            .filter(|_| r.index == 0)
            .map(|t| (t.dtype(), t.shape().to_vec()))
    };
    // Node position → (replacement, nodes it absorbs).
    let mut replace: HashMap<usize, Node> = HashMap::new();
    let mut removed: HashSet<usize> = HashSet::new();
    for (i, n) in graph.nodes.iter().enumerate() {
        let Some(Op::Conv2DBackpropInput(c)) = parsed(n) else {
            continue;
        };
        if c.layout != Layout::Nhwc || n.inputs.len() != 3 || n.attr("fused_ops").is_some() {
            continue;
        }
        let channels = match const_shape(&n.inputs[1]) {
            Some((DType::F32, s)) if s.len() == 4 => s[2],
            _ => continue,
        };
        let Some(b) = sole_reader(&n.name) else {
            continue;
        };
        let bn = &graph.nodes[b];
        let bias_ok = matches!(
            parsed(bn),
            Some(Op::BiasAdd {
                v1: false,
                layout: Layout::Nhwc
            })
        ) && bn.inputs.len() == 2
            && bn.inputs[0].node == n.name
            && const_shape(&bn.inputs[1]) == Some((DType::F32, vec![channels]));
        if !bias_ok {
            continue;
        }
        let act = sole_reader(&bn.name).filter(|&a| {
            matches!(
                parsed(&graph.nodes[a]),
                Some(Op::Unary(Unary::Relu | Unary::Relu6))
            )
        });
        let last = act.unwrap_or(b);
        let mut f = n.clone();
        f.name = graph.nodes[last].name.clone();
        f.inputs.push(bn.inputs[1].clone());
        let mut ops: Vec<Vec<u8>> = vec![b"BiasAdd".to_vec()];
        if let Some(a) = act {
            ops.push(graph.nodes[a].op.as_bytes().to_vec());
        }
        f.attrs.insert("fused_ops".into(), Attr::Strs(ops));
        removed.extend([i, b]);
        removed.extend(act);
        replace.insert(last, f);
    }
    let fused = replace.len();
    let mut g = graph.clone();
    g.nodes.clear();
    for (i, n) in graph.nodes.iter().enumerate() {
        if let Some(rep) = replace.remove(&i) {
            g.nodes.push(rep);
        } else if !removed.contains(&i) {
            g.nodes.push(n.clone());
        }
    }
    Ok((g, fused))
}
