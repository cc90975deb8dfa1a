//! Graph-building helpers shared by the interpreter, strip and fp16 tests.
#![allow(dead_code)]

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

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn assert_close(got: &Tensor, want: &[f32], tol: f32) {
    let g = got.to_f32_vec().unwrap();
    let d = max_abs_diff(&g, want);
    assert!(
        d <= tol,
        "max abs diff {d} > {tol}\n got {g:?}\nwant {want:?}"
    );
}

/// A deterministic pseudo-random stream for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-1, 1).
    pub fn f(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f()).collect()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// The fixture models with their declared input and output.
pub const FIXTURES: [&str; 3] = ["push_student", "conv_bn", "mlp_res"];

pub fn fixture_dir(model: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(model)
}

pub fn model_json(model: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture_dir(model).join("model.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// `tf_frozen.pb` (TF's convert_variables_to_constants) with inputs/outputs from model.json.
pub fn frozen_graph(model: &str) -> Graph {
    let mut g =
        qpipe::formats::tf::graph_def::read_graph_def(&fixture_dir(model).join("tf_frozen.pb"))
            .unwrap_or_else(|e| panic!("{model}: {e}"));
    let info = model_json(model);
    g.inputs = info["inputs"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    g.outputs = info["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| r(o.as_str().unwrap()))
        .collect();
    g
}

pub fn fixture_npy(model: &str, file: &str) -> Tensor {
    qpipe::npy::read(&fixture_dir(model).join(file)).unwrap()
}

/// The eval set of a fixture as a data set spec (input tensor and labels).
pub fn eval_spec(model: &str) -> qpipe::spec::DatasetSpec {
    let info = model_json(model);
    let input = info["inputs"]
        .as_object()
        .unwrap()
        .keys()
        .next()
        .unwrap()
        .clone();
    qpipe::spec::DatasetSpec {
        tensors: std::collections::BTreeMap::from([(input, fixture_dir(model).join("eval_x.npy"))]),
        labels: Some(fixture_dir(model).join("eval_y.npy")),
    }
}
