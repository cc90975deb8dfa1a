//! The int8 arithmetic kernels (`src/kernels/int8/math.rs`: BATCH_MATMUL, EXP, LOG,
//! ELU, GELU, RSQRT, ABS, LEAKY_RELU, PRELU, SQUARED_DIFFERENCE, L2_NORMALIZATION)
//! against LiteRT's reference kernels (`BUILTIN_REF`), bit for bit, on random
//! shapes, parameters and values: one int8 IR graph per seed with a branch per op,
//! exported with qpipe's TFLite writer and run in one LiteRT process for all seeds.
//! ELU (which `BUILTIN_REF` lacks) and LEAKY_RELU are also compared with the default
//! resolver, against qpipe's `Arithmetic::LiteRt`.

mod support;

use qpipe::formats::tflite;
use qpipe::ir::{Attr, DType, Graph, Node, QuantParams, Tensor, TensorRef};
use qpipe::kernels::Arithmetic;
use support::litert_oracle::{run_litert_batch, BatchJob, Resolver};
use support::numeric::Rng;
use support::tmp_dir;

fn pt(s: f32, z: i64) -> QuantParams {
    QuantParams::per_tensor(s, z)
}

struct B {
    g: Graph,
    r: Rng,
}

impl B {
    fn scale(&mut self, lo: f32, hi: f32) -> f32 {
        lo * (hi / lo).powf((self.r.f() + 1.0) / 2.0)
    }
    fn zp(&mut self) -> i64 {
        (self.r.next_u64() % 61) as i64 - 30
    }
    fn act(&mut self, lo: f32, hi: f32) -> QuantParams {
        let s = self.scale(lo, hi);
        let z = self.zp();
        pt(s, z)
    }
    fn i8s(&mut self, n: usize, lo: i64) -> Vec<i8> {
        let span = (127 - lo + 1) as u64;
        (0..n)
            .map(|_| (lo + (self.r.next_u64() % span) as i64) as i8)
            .collect()
    }
    fn placeholder(&mut self, name: &str, shape: &[usize], q: QuantParams) -> Tensor {
        let mut dims = vec![-1i64];
        dims.extend(shape.iter().map(|&d| d as i64));
        let mut n = Node::new(name, "Placeholder")
            .with_attr("dtype", Attr::Type(DType::I8))
            .with_attr("shape", Attr::Shape(Some(dims)));
        // Values from the zero point up where a kernel needs them non-negative.
        let lo = if name.ends_with("_pos") {
            q.zero_point[0]
        } else {
            -128
        };
        n.output_quant.insert(0, q);
        self.g.nodes.push(n);
        self.g.inputs.push(name.into());
        let batch = 3;
        let mut full = vec![batch];
        full.extend_from_slice(shape);
        let len = full.iter().product();
        Tensor::from_vec(full, &self.i8s(len, lo))
    }
    fn konst(&mut self, name: &str, t: Tensor, q: QuantParams) -> String {
        let mut n = Node::constant(name, t);
        n.output_quant.insert(0, q);
        self.g.nodes.push(n);
        name.into()
    }
    fn op(&mut self, name: &str, op: &str, ins: &[&str], attrs: Vec<(&str, Attr)>, q: QuantParams) {
        let mut n = Node::new(name, op);
        n.inputs = ins.iter().map(|i| TensorRef::new(*i, 0)).collect();
        for (k, v) in attrs {
            n.attrs.insert(k.into(), v);
        }
        n.attrs.insert("T".into(), Attr::Type(DType::I8));
        n.output_quant.insert(0, q);
        self.g.nodes.push(n);
        self.g.outputs.push(TensorRef::new(name, 0));
    }
}

/// One model with a branch per op, and its int8 feeds. With `default`, only the
/// branches for the default resolver: ELU (`BUILTIN_REF` has none) and LEAKY_RELU
/// (XNNPACK's arithmetic, `Arithmetic::LiteRt`).
fn build(seed: u64, default: bool) -> (Graph, Vec<(String, Tensor)>) {
    let mut b = B {
        g: Graph::default(),
        r: Rng::new(seed),
    };
    let (h, w, c) = (1 + b.r.below(4), 1 + b.r.below(4), 1 + b.r.below(6));
    let qx = b.act(0.01, 0.2);
    let x = b.placeholder("x", &[h, w, c], qx.clone());
    let qp = b.act(0.001, 0.05);
    let xp = b.placeholder("x_pos", &[h, w, c], qp.clone());
    let (m, k, n) = (1 + b.r.below(5), 1 + b.r.below(12), 1 + b.r.below(5));
    let qa = b.act(0.01, 0.1);
    let a = b.placeholder("a", &[m, k], qa);
    let qb = b.act(0.01, 0.1);
    let bm = b.placeholder("b", &[k, n], qb.clone());
    let bt = b.placeholder("bt", &[n, k], qb);
    let mut feeds = vec![
        ("x".to_string(), x),
        ("x_pos".to_string(), xp),
        ("a".to_string(), a),
        ("b".to_string(), bm),
        ("bt".to_string(), bt),
    ];
    feeds.sort_by(|p, q| p.0.cmp(&q.0));

    // Matrix products of two runtime tensors, plain and with the second transposed.
    let q = b.act(0.01, 0.5);
    b.op("bmm", "BatchMatMulV2", &["a", "b"], vec![], q);
    let q = b.act(0.01, 0.5);
    b.op(
        "bmm_t",
        "BatchMatMulV2",
        &["a", "bt"],
        vec![("adj_y", Attr::Bool(true))],
        q,
    );
    // Tables.
    let q = b.act(0.005, 0.5);
    b.op("exp", "Exp", &["x"], vec![], q);
    let q = b.act(0.01, 0.1);
    b.op("log", "Log", &["x"], vec![], q);
    let q = b.act(0.005, 0.05);
    b.op("elu", "Elu", &["x"], vec![], q);
    for approximate in [false, true] {
        let q = b.act(0.005, 0.05);
        b.op(
            &format!("gelu_{approximate}"),
            "_QpipeGelu",
            &["x"],
            vec![("approximate", Attr::Bool(approximate))],
            q,
        );
    }
    // Fixed-point and rescaling kernels.
    let q = b.act(0.02, 0.5);
    b.op("rsqrt", "Rsqrt", &["x_pos"], vec![], q);
    let q = b.act(0.005, 0.1);
    b.op("abs", "Abs", &["x"], vec![], q);
    b.op("abs_same", "Abs", &["x"], vec![], qx.clone());
    let q = b.act(0.005, 0.1);
    let alpha = 0.05 + 0.5 * (b.r.f() + 1.0) / 2.0;
    b.op(
        "leaky",
        "LeakyRelu",
        &["x"],
        vec![("alpha", Attr::Float(alpha))],
        q,
    );
    let only = ["elu", "leaky"];
    if default {
        b.g.outputs.retain(|r| only.contains(&r.node.as_str()));
        return (b.g, feeds);
    }
    b.g.outputs.retain(|r| r.node != "elu");
    let alpha_vals = b.i8s(c, -128);
    let qal = b.act(0.001, 0.01);
    let al = b.konst("alpha", Tensor::from_vec(vec![c], &alpha_vals), qal);
    let q = b.act(0.005, 0.1);
    b.op("prelu", "_QpipePrelu", &["x", &al], vec![], q);
    let other_vals = b.i8s(h * w * c, -128);
    let qo = b.act(0.01, 0.2);
    let other = b.konst("other", Tensor::from_vec(vec![1, h, w, c], &other_vals), qo);
    let q = b.act(0.02, 0.5);
    b.op("sqd", "SquaredDifference", &["x", &other], vec![], q);
    b.op(
        "l2",
        "_QpipeL2Normalize",
        &["x"],
        vec![],
        pt(1.0 / 128.0, 0),
    );
    (b.g, feeds)
}

/// `(q - zp) * scale` in f32, as the LiteRT runner dequantizes its int8 outputs.
fn dequantized(t: &Tensor, q: &QuantParams) -> Vec<f32> {
    t.to_i64_vec()
        .unwrap()
        .iter()
        .map(|&v| (v as f32 - q.zero_point[0] as f32) * q.scale[0])
        .collect()
}

#[test]
fn int8_math_kernels_match_litert_reference_bit_for_bit() {
    let dir = tmp_dir("int8_math_litert");
    let mut cases = Vec::new();
    let mut jobs = Vec::new();
    for (seed, default) in (1..=8u64).flat_map(|s| [(s, false), (s, true)]) {
        let (g, feeds) = build(seed, default);
        let (_, bytes) = tflite::export(&g).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let sd = dir.join(format!("seed{seed}_{default}"));
        std::fs::create_dir_all(&sd).unwrap();
        let model = sd.join("model.tflite");
        std::fs::write(&model, &bytes).unwrap();
        let inputs = feeds
            .iter()
            .map(|(name, t)| {
                let p = sd.join(format!("{name}.npy"));
                qpipe::npy::write(&p, t).unwrap();
                (name.clone(), p)
            })
            .collect();
        jobs.push(BatchJob {
            model,
            inputs,
            resolver: if default {
                Resolver::Default
            } else {
                Resolver::Reference
            },
            out_dir: sd.join("out"),
        });
        cases.push((seed, default, g, feeds));
    }
    let results = run_litert_batch(&jobs, &dir);
    let mut checked = 0;
    for ((seed, default, g, feeds), theirs) in cases.iter().zip(results) {
        let theirs = theirs.unwrap_or_else(|e| panic!("seed {seed}: LiteRT failed: {e}"));
        let fed: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        let arithmetic = if *default {
            Arithmetic::LiteRt
        } else {
            Arithmetic::Reference
        };
        let ours = qpipe::kernels::run_with(g, &fed, &g.outputs, arithmetic)
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert_eq!(ours.len(), theirs.len());
        for ((r, a), t) in g.outputs.iter().zip(&ours).zip(&theirs) {
            let q = g
                .nodes
                .iter()
                .find(|n| n.name == r.node)
                .and_then(|n| n.output_quant.get(&0))
                .unwrap();
            assert_eq!(a.shape(), t.shape(), "seed {seed} {r}");
            let x = dequantized(a, q);
            let y = t.values::<f32>().unwrap();
            let n = x.iter().zip(&y).filter(|(p, q)| p != q).count();
            assert_eq!(
                n,
                0,
                "seed {seed}: '{r}' differs from LiteRT (default resolver: {default}) in {n} of {} \
                 elements: ours {:?}, \
                 LiteRT {:?}",
                x.len(),
                &x[..x.len().min(12)],
                &y[..y.len().min(12)]
            );
            checked += x.len();
        }
    }
    assert!(checked > 0);
    eprintln!("{checked} int8 elements equal to BUILTIN_REF's");
}
