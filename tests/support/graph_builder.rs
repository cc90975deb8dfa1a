//! Building small IR graphs by hand, and running them.

use qpipe::ir::{Attr, DType, Graph, Node, Tensor, TensorRef};

/// A graph under construction; node names double as tensor names (output 0).
#[derive(Default)]
pub struct G {
    pub g: Graph,
}

pub fn r(s: &str) -> TensorRef {
    TensorRef::parse(s).expect("tensor name")
}

impl G {
    pub fn new() -> G {
        G::default()
    }

    pub fn placeholder(&mut self, name: &str, dtype: DType, shape: Option<&[i64]>) -> String {
        let n = Node::new(name, "Placeholder")
            .with_attr("dtype", Attr::Type(dtype))
            .with_attr("shape", Attr::Shape(shape.map(|s| s.to_vec())));
        self.g.nodes.push(n);
        self.g.inputs.push(name.to_string());
        name.to_string()
    }

    pub fn konst(&mut self, name: &str, t: Tensor) -> String {
        self.g.nodes.push(Node::constant(name, t));
        name.to_string()
    }

    pub fn op(&mut self, name: &str, op: &str, inputs: &[&str], attrs: &[(&str, Attr)]) -> String {
        let mut n = Node::new(name, op);
        for i in inputs {
            n.inputs.push(r(i));
        }
        for (k, v) in attrs {
            n.attrs.insert(k.to_string(), v.clone());
        }
        if !n.attrs.contains_key("T") && !matches!(op, "Cast" | "Placeholder" | "Const") {
            n.attrs.insert("T".into(), Attr::Type(DType::F32));
        }
        self.g.nodes.push(n);
        name.to_string()
    }

    pub fn output(&mut self, name: &str) {
        self.g.outputs.push(r(name));
    }
}

pub fn f32t(shape: &[usize], v: &[f32]) -> Tensor {
    Tensor::from_vec(shape.to_vec(), v)
}

pub fn i32t(shape: &[usize], v: &[i32]) -> Tensor {
    Tensor::from_vec(shape.to_vec(), v)
}

pub fn ints(v: &[i64]) -> Attr {
    Attr::Ints(v.to_vec())
}

pub fn s(v: &str) -> Attr {
    Attr::Str(v.as_bytes().to_vec())
}

/// Runs `g` with feeds and returns the first fetch.
pub fn run1(g: &Graph, feeds: &[(&str, Tensor)], fetch: &str) -> Tensor {
    qpipe::kernels::run(g, feeds, &[r(fetch)])
        .unwrap_or_else(|e| panic!("run failed: {e}"))
        .remove(0)
}

/// The `fused_ops` attribute of a `_Fused*` node: BiasAdd, then no activation (0),
/// Relu (1) or Relu6 (otherwise).
pub fn fused(act: usize) -> Attr {
    let ops: &[&str] = match act {
        0 => &["BiasAdd"],
        1 => &["BiasAdd", "Relu"],
        _ => &["BiasAdd", "Relu6"],
    };
    Attr::Strs(ops.iter().map(|o| o.as_bytes().to_vec()).collect())
}
