//! Every 16x8 kernel (int16 activations, int8 weights, int64 biases) against
//! LiteRT's reference kernels on random shapes, scales and values: int16 IR graphs
//! (one branch per op, all reading the same inputs) are exported with qpipe's
//! TFLite writer and run in LiteRT 2.3.0 (`BUILTIN_REF`, every seed in one Python
//! process), and compared bit for bit with qpipe's interpreter. Also: which
//! QUANTIZE conversions between int8 and int16 LiteRT runs, under both resolvers.

mod support;

use qpipe::formats::tflite;
use qpipe::ir::{Attr, DType, Graph, Node, QuantParams, Tensor, TensorRef};
use qpipe::kernels::Arithmetic;
use support::graph_builder::fused;
use support::litert_oracle::{run_litert_batch, BatchJob, Resolver};
use support::numeric::Rng;
use support::tmp_dir;

fn sym(s: f32) -> QuantParams {
    QuantParams::per_tensor(s, 0)
}

struct B {
    g: Graph,
    r: Rng,
}

impl B {
    fn scale(&mut self, lo: f32, hi: f32) -> f32 {
        lo * (hi / lo).powf((self.r.f() + 1.0) / 2.0)
    }
    fn act(&mut self) -> QuantParams {
        let s = self.scale(2e-5, 2e-3);
        sym(s)
    }
    fn i16s(&mut self, n: usize) -> Vec<i16> {
        (0..n)
            .map(|_| (self.r.next_u64() % 65536) as i64 as i16)
            .collect()
    }
    fn i8s(&mut self, n: usize) -> Vec<i8> {
        (0..n)
            .map(|_| ((self.r.next_u64() % 255) as i64 - 127) as i8)
            .collect()
    }
    fn placeholder(&mut self, name: &str, dt: DType, shape: &[i64], q: Option<QuantParams>) {
        let mut n = Node::new(name, "Placeholder")
            .with_attr("dtype", Attr::Type(dt))
            .with_attr("shape", Attr::Shape(Some(shape.to_vec())));
        if let Some(q) = q {
            n.output_quant.insert(0, q);
        }
        self.g.nodes.push(n);
        self.g.inputs.push(name.into());
    }
    fn konst(&mut self, name: &str, t: Tensor, q: Option<QuantParams>) -> String {
        let mut n = Node::constant(name, t);
        if let Some(q) = q {
            n.output_quant.insert(0, q);
        }
        self.g.nodes.push(n);
        name.into()
    }
    fn op(&mut self, name: &str, op: &str, ins: &[&str], attrs: Vec<(&str, Attr)>, q: QuantParams) {
        let mut n = Node::new(name, op);
        n.inputs = ins.iter().map(|i| TensorRef::new(*i, 0)).collect();
        for (k, v) in attrs {
            n.attrs.insert(k.into(), v);
        }
        n.attrs.entry("T".into()).or_insert(Attr::Type(DType::I16));
        n.output_quant.insert(0, q);
        self.g.nodes.push(n);
        self.g.outputs.push(TensorRef::new(name, 0));
    }
    /// An op with `k` outputs, all quantized with `q`.
    fn op_n(
        &mut self,
        name: &str,
        op: &str,
        ins: &[&str],
        attrs: Vec<(&str, Attr)>,
        q: &QuantParams,
        k: usize,
    ) {
        self.op(name, op, ins, attrs, q.clone());
        let n = self.g.nodes.last_mut().unwrap();
        for i in 1..k as u32 {
            n.output_quant.insert(i, q.clone());
            self.g.outputs.push(TensorRef::new(name, i));
        }
    }
}

fn ints(v: &[i64]) -> Attr {
    Attr::Ints(v.to_vec())
}
fn s(v: &str) -> Attr {
    Attr::Str(v.as_bytes().to_vec())
}

/// The outputs (by node name prefix) whose LiteRT kernel is the same under the
/// default resolver as under BUILTIN_REF for int16 (XNNPACK takes no int16), and which
/// the test therefore also compares under the default resolver. Not LOGISTIC/TANH on
/// a power-of-two input scale (`_p12`, `_p11`): there the default resolver runs
/// `optimized_ops::Logistic`/`Tanh` (gemmlowp fixed point), measured up to a few
/// 1/32768 steps off the reference; qpipe follows BUILTIN_REF.
const DEFAULT_IS_REFERENCE: &[&str] = &[
    "sigmoid",
    "tanh",
    "relu6",
    "mean_",
    "reduce_",
    "maximum",
    "minimum",
    "transpose",
    "slice",
    "strided",
    "pad",
    "gather",
    "tile",
    "pack",
    "split",
    "unpack",
];

/// One model with a branch per 16x8 op; returns it with its inputs.
fn build(seed: u64) -> (Graph, Vec<(String, Tensor)>) {
    let mut b = B {
        g: Graph::default(),
        r: Rng::new(seed),
    };
    let batch = 16;
    let (h, w, c) = (3 + b.r.below(5), 3 + b.r.below(5), 1 + b.r.below(5));
    let k = 1 + b.r.below(40);
    let q4 = b.act();
    let q2 = b.act();
    let dims = [-1, h as i64, w as i64, c as i64];
    b.placeholder("x4", DType::I16, &dims, Some(q4.clone()));
    b.placeholder("x2", DType::I16, &[-1, k as i64], Some(q2.clone()));
    b.placeholder("xf", DType::F32, &dims, None);
    b.placeholder(
        "x8",
        DType::I8,
        &dims,
        Some(QuantParams::per_tensor(0.02, 3)),
    );
    let x4 = Tensor::from_vec(vec![batch, h, w, c], &b.i16s(batch * h * w * c));
    let x2 = Tensor::from_vec(vec![batch, k], &b.i16s(batch * k));
    let xf_vals: Vec<f32> = (0..batch * h * w * c).map(|_| b.r.f() * 4.0).collect();
    let xf = Tensor::from_vec(vec![batch, h, w, c], &xf_vals);
    let x8 = Tensor::from_vec(vec![batch, h, w, c], &b.i8s(batch * h * w * c));
    let s4 = q4.scale[0];

    // Convolutions: per-channel int8 weights, int64 biases, fused activations.
    for (idx, depthwise) in [(0, false), (1, true)] {
        let (kh, kw) = (1 + b.r.below(3), 1 + b.r.below(3));
        let st = 1 + b.r.below(2) as i64;
        let pad = if b.r.below(2) == 0 { "SAME" } else { "VALID" };
        let o = if depthwise { c } else { 1 + b.r.below(6) };
        let wshape = if depthwise {
            vec![kh, kw, c, 1]
        } else {
            vec![kh, kw, c, o]
        };
        let ws: Vec<f32> = (0..o).map(|_| b.scale(0.001, 0.03)).collect();
        let n: usize = wshape.iter().product();
        let wv = b.i8s(n);
        let axis = if depthwise { 2 } else { 3 };
        let wn = b.konst(
            &format!("w{idx}"),
            Tensor::from_vec(wshape, &wv),
            Some(QuantParams::per_axis(ws.clone(), vec![0; o], axis)),
        );
        let bias: Vec<i64> = (0..o)
            .map(|_| (b.r.next_u64() % 2_000_001) as i64 - 1_000_000)
            .collect();
        let bn = b.konst(
            &format!("b{idx}"),
            Tensor::from_vec(vec![o], &bias),
            Some(QuantParams::per_axis(
                ws.iter().map(|x| x * s4).collect(),
                vec![0; o],
                0,
            )),
        );
        let a = b.r.below(3);
        let oq = b.act();
        let op = if depthwise {
            "_FusedDepthwiseConv2dNative"
        } else {
            "_FusedConv2D"
        };
        b.op(
            &format!("conv{idx}"),
            op,
            &["x4", &wn, &bn],
            vec![
                ("strides", ints(&[1, st, st, 1])),
                ("padding", s(pad)),
                ("fused_ops", fused(a)),
                ("num_args", Attr::Int(1)),
            ],
            oq,
        );
    }
    // Fully connected, per channel and per tensor.
    for (idx, per_channel) in [(0, true), (1, false)] {
        let u = 1 + b.r.below(10);
        let ws: Vec<f32> = (0..if per_channel { u } else { 1 })
            .map(|_| b.scale(0.001, 0.05))
            .collect();
        let wv = b.i8s(k * u);
        let wq = if per_channel {
            QuantParams::per_axis(ws.clone(), vec![0; u], 1)
        } else {
            sym(ws[0])
        };
        let wn = b.konst(
            &format!("fw{idx}"),
            Tensor::from_vec(vec![k, u], &wv),
            Some(wq),
        );
        let bias: Vec<i64> = (0..u)
            .map(|_| (b.r.next_u64() % 2_000_001) as i64 - 1_000_000)
            .collect();
        let bs: Vec<f32> = (0..u)
            .map(|i| ws[if per_channel { i } else { 0 }] * q2.scale[0])
            .collect();
        let bq = if per_channel {
            QuantParams::per_axis(bs, vec![0; u], 0)
        } else {
            sym(bs[0])
        };
        let bn = b.konst(
            &format!("fb{idx}"),
            Tensor::from_vec(vec![u], &bias),
            Some(bq),
        );
        let a = b.r.below(3);
        let oq = b.act();
        b.op(
            &format!("fc{idx}"),
            "_FusedMatMul",
            &["x2", &wn, &bn],
            vec![("fused_ops", fused(a)), ("num_args", Attr::Int(1))],
            oq,
        );
    }
    // Pools keep the input's parameters.
    let kk = 1 + b.r.below(3) as i64;
    let st = 1 + b.r.below(2) as i64;
    let pad = if b.r.below(2) == 0 { "SAME" } else { "VALID" };
    for op in ["AvgPool", "MaxPool"] {
        b.op(
            &op.to_lowercase(),
            op,
            &["x4"],
            vec![
                ("ksize", ints(&[1, kk, kk, 1])),
                ("strides", ints(&[1, st, st, 1])),
                ("padding", s(pad)),
            ],
            q4.clone(),
        );
    }
    // Arithmetic with a same-shape and a broadcast second operand.
    let q_other = b.act();
    let other_vals = b.i16s(h * w * c);
    let other = b.konst(
        "other",
        Tensor::from_vec(vec![1, h, w, c], &other_vals),
        Some(q_other.clone()),
    );
    let chan_vals = b.i16s(c);
    let chan = b.konst("chan", Tensor::from_vec(vec![c], &chan_vals), Some(q_other));
    for (name, op, rhs) in [
        ("add", "AddV2", &other),
        ("sub", "Sub", &other),
        ("mul", "Mul", &other),
        ("add_b", "AddV2", &chan),
        ("sub_b", "Sub", &chan),
        ("mul_b", "Mul", &chan),
    ] {
        let q = b.act();
        b.op(name, op, &["x4", rhs], vec![], q);
    }
    let q = b.act();
    b.op("relu", "Relu", &["x4"], vec![], q);
    let q = QuantParams::per_tensor(b.scale(1e-4, 1e-1), 0);
    b.op("exp", "Exp", &["x4"], vec![], q);
    b.op("softmax", "Softmax", &["x2"], vec![], sym(1.0 / 32768.0));
    // Quantize: float → int16, int16 → int16, int16 → int8.
    let q = b.act();
    b.op(
        "quant",
        "Quantize",
        &["xf"],
        vec![
            ("T", Attr::Type(DType::F32)),
            ("dtype", Attr::Type(DType::I16)),
        ],
        q,
    );
    let q = b.act();
    b.op(
        "requant",
        "Quantize",
        &["x4"],
        vec![("dtype", Attr::Type(DType::I16))],
        q,
    );
    b.op(
        "to_int8",
        "Quantize",
        &["x4"],
        vec![("dtype", Attr::Type(DType::I8))],
        QuantParams::per_tensor(s4 * 300.0, -5),
    );
    // Reshape and concatenation keep the parameters.
    let shape = b.konst(
        "shape",
        Tensor::from_vec(vec![2], &[-1i32, (h * w * c) as i32]),
        None,
    );
    b.op("reshape", "Reshape", &["x4", &shape], vec![], q4.clone());
    let cat_axis = b.konst("cat_axis", Tensor::scalar(3i32), None);
    b.op(
        "concat",
        "ConcatV2",
        &["x4", "x4", &cat_axis],
        vec![],
        q4.clone(),
    );
    // LOGISTIC and TANH: output (1/32768, 0); general input scales, and the
    // power-of-two scales their fixed-point paths special-case (2^-12; TANH 2^-11).
    let q2p = sym(1.0 / 4096.0);
    let q1p = sym(1.0 / 2048.0);
    b.placeholder("xp12", DType::I16, &[-1, k as i64], Some(q2p));
    b.placeholder("xp11", DType::I16, &[-1, k as i64], Some(q1p));
    let xp12 = Tensor::from_vec(vec![batch, k], &b.i16s(batch * k));
    let xp11 = Tensor::from_vec(vec![batch, k], &b.i16s(batch * k));
    for (x, tag) in [("x4", ""), ("x2", "_2"), ("xp12", "_p12"), ("xp11", "_p11")] {
        b.op(
            &format!("sigmoid{tag}"),
            "Sigmoid",
            &[x],
            vec![],
            sym(1.0 / 32768.0),
        );
        b.op(
            &format!("tanh{tag}"),
            "Tanh",
            &[x],
            vec![],
            sym(1.0 / 32768.0),
        );
    }
    let q = b.act();
    b.op("relu6", "Relu6", &["x4"], vec![], q);
    b.op("abs_same", "Abs", &["x4"], vec![], q4.clone());
    let q = QuantParams::per_tensor(b.scale(1e-4, 1e-1), 0);
    b.op("abs", "Abs", &["x4"], vec![], q);
    // LiteRT's int16 RSQRT refuses negative inputs: |x4| feeds it.
    let q = QuantParams::per_tensor(b.scale(1e-4, 1e-1), 0);
    b.op("rsqrt", "Rsqrt", &["abs_same"], vec![], q);
    for (name, alpha) in [("leaky", 0.2f32), ("leaky_neg", -0.3), ("leaky_big", 1.7)] {
        let q = b.act();
        b.op(
            name,
            "LeakyRelu",
            &["x4"],
            vec![("alpha", Attr::Float(alpha))],
            q,
        );
    }
    // MEAN (spatial with keep_dims, and the last axis), REDUCE_MAX/MIN.
    let hw = b.konst("hw", Tensor::from_vec(vec![2], &[1i32, 2]), None);
    let last = b.konst("last", Tensor::from_vec(vec![1], &[-1i32]), None);
    for (name, axes, keep) in [("mean_hw", &hw, true), ("mean_c", &last, false)] {
        let q = b.act();
        b.op(
            name,
            "Mean",
            &["x4", axes],
            vec![("keep_dims", Attr::Bool(keep))],
            q,
        );
    }
    for op in ["Max", "Min"] {
        b.op(
            &format!("reduce_{}", op.to_lowercase()),
            op,
            &["x4", &hw],
            vec![("keep_dims", Attr::Bool(false))],
            q4.clone(),
        );
    }
    // MAXIMUM/MINIMUM: inputs and output share the scale.
    let same_vals = b.i16s(h * w * c);
    let same = b.konst(
        "same",
        Tensor::from_vec(vec![1, h, w, c], &same_vals),
        Some(q4.clone()),
    );
    let chan4_vals = b.i16s(c);
    let chan4 = b.konst(
        "chan4",
        Tensor::from_vec(vec![c], &chan4_vals),
        Some(q4.clone()),
    );
    for (name, op, rhs) in [
        ("maximum", "Maximum", &same),
        ("minimum", "Minimum", &same),
        ("maximum_b", "Maximum", &chan4),
        ("minimum_b", "Minimum", &chan4),
    ] {
        b.op(name, op, &["x4", rhs], vec![], q4.clone());
    }
    // Data movement in the input's parameters.
    let i32s = |v: &[i32]| Tensor::from_vec(vec![v.len()], v);
    let perm = b.konst("perm", i32s(&[0, 3, 1, 2]), None);
    b.op("transpose", "Transpose", &["x4", &perm], vec![], q4.clone());
    let begin = b.konst("begin", i32s(&[0, 1, 0, 0]), None);
    let size = b.konst("size", i32s(&[-1, h as i32 - 1, w as i32, c as i32]), None);
    b.op("slice", "Slice", &["x4", &begin, &size], vec![], q4.clone());
    let sb = b.konst("sb", i32s(&[0, 0, 1, 0]), None);
    let se = b.konst("se", i32s(&[0, h as i32, w as i32, c as i32]), None);
    let ss = b.konst("ss", i32s(&[1, 2, 1, 1]), None);
    b.op(
        "strided",
        "StridedSlice",
        &["x4", &sb, &se, &ss],
        vec![("begin_mask", Attr::Int(1)), ("end_mask", Attr::Int(1))],
        q4.clone(),
    );
    let pads = b.konst(
        "pads",
        Tensor::from_vec(vec![4, 2], &[0i32, 0, 1, 2, 0, 1, 0, 0]),
        None,
    );
    b.op("pad", "Pad", &["x4", &pads], vec![], q4.clone());
    let idx = b.konst("idx", i32s(&[2, 0, 1, 2]), None);
    let gaxis = b.konst("gaxis", Tensor::scalar(1i32), None);
    b.op(
        "gather",
        "GatherV2",
        &["x4", &idx, &gaxis],
        vec![],
        q4.clone(),
    );
    let mult = b.konst("mult", i32s(&[1, 2, 1, 2]), None);
    b.op("tile", "Tile", &["x4", &mult], vec![], q4.clone());
    b.op(
        "pack",
        "Pack",
        &["x4", "x4"],
        vec![("N", Attr::Int(2)), ("axis", Attr::Int(1))],
        q4.clone(),
    );
    let split_axis = b.konst("split_axis", Tensor::scalar(3i32), None);
    b.op_n(
        "split",
        "Split",
        &[&split_axis, "x4"],
        vec![("num_split", Attr::Int(c as i64))],
        &q4,
        c,
    );
    let sizes = b.konst("sizes", i32s(&[1, w as i32 - 1]), None);
    let vaxis = b.konst("vaxis", Tensor::scalar(2i32), None);
    b.op_n(
        "splitv",
        "SplitV",
        &["x4", &sizes, &vaxis],
        vec![("num_split", Attr::Int(2))],
        &q4,
        2,
    );
    b.op_n(
        "unpack",
        "Unpack",
        &["x4"],
        vec![("num", Attr::Int(h as i64)), ("axis", Attr::Int(1))],
        &q4,
        h,
    );
    let feeds = vec![
        ("x4".into(), x4),
        ("x2".into(), x2),
        ("xf".into(), xf),
        ("x8".into(), x8),
        ("xp12".into(), xp12),
        ("xp11".into(), xp11),
    ];
    (b.g, feeds)
}

/// Output values as f64 after dequantizing integer outputs with their parameters,
/// which is what `run_jobs.py` hands back for int8 and int16 outputs.
fn as_real(g: &Graph, r: &TensorRef, t: &Tensor) -> Vec<f64> {
    if t.dtype() == DType::F32 {
        return t
            .values::<f32>()
            .unwrap()
            .iter()
            .map(|&v| v as f64)
            .collect();
    }
    let n = g.nodes.iter().find(|n| n.name == r.node).unwrap();
    let q = &n.output_quant[&r.index];
    t.to_i64_vec()
        .unwrap()
        .iter()
        .map(|&v| ((v - q.zero_point[0]) as f32 * q.scale[0]) as f64)
        .collect()
}

#[test]
fn int16_kernels_match_litert_reference_bit_for_bit() {
    let seeds = 1..=8u64;
    let dir = tmp_dir("q16_kernels");
    let mut cases = Vec::new();
    let mut jobs = Vec::new();
    for seed in seeds {
        let (g, feeds) = build(seed);
        let d = dir.join(format!("seed{seed}"));
        std::fs::create_dir_all(&d).unwrap();
        let (_, bytes) = tflite::export(&g).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let model = d.join("model.tflite");
        std::fs::write(&model, &bytes).unwrap();
        let mut inputs = Vec::new();
        for (name, t) in &feeds {
            let p = d.join(format!("{name}.npy"));
            qpipe::npy::write(&p, t).unwrap();
            inputs.push((name.clone(), p));
        }
        for resolver in [Resolver::Reference, Resolver::Default] {
            jobs.push(BatchJob {
                model: model.clone(),
                inputs: inputs.clone(),
                resolver,
                out_dir: d.join(format!("out_{resolver:?}")),
            });
            cases.push((seed, resolver, g.clone(), feeds.clone()));
        }
    }
    let results = run_litert_batch(&jobs, &dir);
    let mut checked = 0;
    for ((seed, resolver, g, feeds), res) in cases.iter().zip(results) {
        // Under the default resolver, only the kernels that are the reference ones
        // there too are compared (the matrix ops and ADD/SUB/MUL have optimized paths).
        let compared = |r: &TensorRef| {
            *resolver == Resolver::Reference
                || DEFAULT_IS_REFERENCE.iter().any(|p| r.node.starts_with(p))
                    && !r.node.ends_with("_p12")
                    && !r.node.ends_with("_p11")
        };
        let theirs = res.unwrap_or_else(|e| panic!("seed {seed}: LiteRT failed: {e}"));
        let fed: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        let ours = qpipe::kernels::run_with(g, &fed, &g.outputs, Arithmetic::Reference).unwrap();
        assert_eq!(theirs.len(), ours.len());
        for ((r, a), b) in g.outputs.iter().zip(&ours).zip(&theirs) {
            if !compared(r) {
                continue;
            }
            assert_eq!(a.shape(), b.shape(), "seed {seed} {r}");
            let (x, y) = (as_real(g, r, a), as_real(g, r, b));
            let diff: Vec<(usize, f64, f64)> = x
                .iter()
                .zip(&y)
                .enumerate()
                .filter(|(_, (p, q))| p != q)
                .map(|(i, (p, q))| (i, *p, *q))
                .collect();
            assert!(
                diff.is_empty(),
                "seed {seed}: '{r}' differs from LiteRT ({resolver:?}) in {} of {} elements \
                 (index, qpipe, LiteRT): {:?}",
                diff.len(),
                x.len(),
                &diff[..diff.len().min(5)]
            );
            checked += 1;
        }
    }
    assert!(checked >= 8 * 70, "only {checked} outputs compared");
}

/// A one-op model: `from` input → QUANTIZE → `to` output.
fn quantize_model(from: DType, to: DType) -> (Graph, Vec<(String, Tensor)>) {
    let mut b = B {
        g: Graph::default(),
        r: Rng::new(7),
    };
    let (qin, qout) = match from {
        DType::I8 => (QuantParams::per_tensor(0.05, 3), sym(0.05 / 200.0)),
        _ => (sym(0.05 / 200.0), QuantParams::per_tensor(0.05, 3)),
    };
    b.placeholder("x", from, &[-1, 16], Some(qin));
    let x = match from {
        DType::I8 => Tensor::from_vec(vec![4, 16], &b.i8s(64)),
        _ => Tensor::from_vec(vec![4, 16], &b.i16s(64)),
    };
    b.op(
        "q",
        "Quantize",
        &["x"],
        vec![("T", Attr::Type(from)), ("dtype", Attr::Type(to))],
        qout,
    );
    (b.g, vec![("x".into(), x)])
}

/// Whether LiteRT 2.3.0's QUANTIZE converts int8 → int16 and int16 → int8 (the
/// bridges a mixed int8/int16 model would need), under BUILTIN and BUILTIN_REF, on
/// files written by qpipe's writer. Measured: both directions run under both
/// resolvers, and equal qpipe's QUANTIZE kernel bit for bit.
#[test]
fn litert_quantize_converts_between_int8_and_int16_under_both_resolvers() {
    let dir = tmp_dir("q16_bridges");
    let mut jobs = Vec::new();
    let mut cases = Vec::new();
    for (from, to) in [(DType::I8, DType::I16), (DType::I16, DType::I8)] {
        let (g, feeds) = quantize_model(from, to);
        let d = dir.join(format!("{from}_{to}"));
        std::fs::create_dir_all(&d).unwrap();
        let (_, bytes) = tflite::export(&g).unwrap();
        let model = d.join("model.tflite");
        std::fs::write(&model, &bytes).unwrap();
        let x = d.join("x.npy");
        qpipe::npy::write(&x, &feeds[0].1).unwrap();
        for resolver in [Resolver::Reference, Resolver::Default] {
            jobs.push(BatchJob {
                model: model.clone(),
                inputs: vec![("x".into(), x.clone())],
                resolver,
                out_dir: d.join(format!("{resolver:?}")),
            });
            cases.push((from, to, resolver, g.clone(), feeds.clone()));
        }
    }
    let results = run_litert_batch(&jobs, &dir);
    for ((from, to, resolver, g, feeds), res) in cases.iter().zip(results) {
        let theirs = res.unwrap_or_else(|e| {
            panic!("LiteRT does not run QUANTIZE {from} -> {to} under {resolver:?}: {e}")
        });
        let fed: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        let ours = qpipe::kernels::run_with(g, &fed, &g.outputs, Arithmetic::Reference).unwrap();
        let r = &g.outputs[0];
        assert_eq!(
            as_real(g, r, &ours[0]),
            as_real(g, r, &theirs[0]),
            "QUANTIZE {from} -> {to} under {resolver:?}"
        );
    }
}
