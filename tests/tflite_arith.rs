//! Issue 14's arithmetic ops and composite patterns: a hand-built graph with every
//! one of them, exported and run in LiteRT, compared with qpipe's interpreter on the
//! unfused graph (so the fusions are checked against the ops they replace), and the
//! operators and versions the export chose.

mod support;

use std::collections::BTreeMap;

use qpipe::formats::tflite;
use qpipe::formats::tflite::reader;
use qpipe::ir::{Attr, DType, Graph, Tensor};
use support::graph_builder::{f32t, i32t, G};
use support::litert_oracle::{LiteRtCase, Resolver};
use support::numeric::{tensor_max_abs_diff, Rng};
use support::tmp_dir;

/// x[-1,6,8] → each op under test, each result an output.
fn arith(rng: &mut Rng) -> Graph {
    let mut b = G::new();
    b.placeholder("x", DType::F32, Some(&[-1, 6, 8]));
    let sc = |b: &mut G, name: &str, v: f32| b.konst(name, f32t(&[], &[v]));
    // Element-wise ops.
    b.op("square", "Square", &["x"], &[]);
    b.op("abs", "Abs", &["x"], &[]);
    sc(&mut b, "one", 1.0);
    b.op("abs1", "AddV2", &["abs", "one"], &[]);
    b.op("log", "Log", &["abs1"], &[]);
    b.op("rsqrt", "Rsqrt", &["abs1"], &[]);
    sc(&mut b, "p15", 1.5);
    b.op("pow", "Pow", &["abs1", "p15"], &[]);
    b.op("exp", "Exp", &["x"], &[]);
    b.op("neg", "Neg", &["x"], &[]);
    b.op("leaky", "LeakyRelu", &["x"], &[("alpha", Attr::Float(0.3))]);
    // LayerNorm via tf.nn.moments: mean, StopGradient, SquaredDifference.
    b.konst("axis", i32t(&[1], &[-1]));
    b.op(
        "mean",
        "Mean",
        &["x", "axis"],
        &[("keep_dims", Attr::Bool(true))],
    );
    b.op("sg", "StopGradient", &["mean"], &[]);
    b.op("sqd", "SquaredDifference", &["x", "sg"], &[]);
    // PReLU: relu(x) - a*relu(-x); relu(x) + a*(x - relu(x)); Keras relu(x) + (-a)*relu(-x).
    b.konst("alpha", f32t(&[8], &rng.vec(8)));
    b.op("relu", "Relu", &["x"], &[]);
    b.op("negx", "Neg", &["x"], &[]);
    b.op("reluneg", "Relu", &["negx"], &[]);
    b.op("am", "Mul", &["alpha", "reluneg"], &[]);
    b.op("prelu1", "Sub", &["relu", "am"], &[]);
    b.op("relu_b", "Relu", &["x"], &[]);
    b.op("xr", "Sub", &["x", "relu_b"], &[]);
    b.op("am2", "Mul", &["alpha", "xr"], &[]);
    b.op("prelu2", "AddV2", &["relu_b", "am2"], &[]);
    b.op("nalpha", "Neg", &["alpha"], &[]);
    b.op("negx3", "Neg", &["x"], &[]);
    b.op("reluneg3", "Relu", &["negx3"], &[]);
    b.op("am3", "Mul", &["nalpha", "reluneg3"], &[]);
    b.op("prelu3", "AddV2", &["relu", "am3"], &[]);
    // GELU, erf form: 0.5*x*(1+erf(x/sqrt(2))).
    sc(&mut b, "half", 0.5);
    sc(&mut b, "sqrt2", std::f32::consts::SQRT_2);
    b.op("hx", "Mul", &["half", "x"], &[]);
    b.op("xs", "RealDiv", &["x", "sqrt2"], &[]);
    b.op("erf", "Erf", &["xs"], &[]);
    b.op("erf1", "AddV2", &["one", "erf"], &[]);
    b.op("gelu_erf", "Mul", &["hx", "erf1"], &[]);
    // GELU, tanh form with x³ as Pow.
    sc(&mut b, "three", 3.0);
    sc(&mut b, "c3", 0.044715);
    sc(&mut b, "k", 0.797_884_6);
    b.op("hx2", "Mul", &["half", "x"], &[]);
    b.op("cube", "Pow", &["x", "three"], &[]);
    b.op("cc", "Mul", &["c3", "cube"], &[]);
    b.op("inner", "AddV2", &["x", "cc"], &[]);
    b.op("kin", "Mul", &["k", "inner"], &[]);
    b.op("th", "Tanh", &["kin"], &[]);
    b.op("th1", "AddV2", &["one", "th"], &[]);
    b.op("gelu_tanh", "Mul", &["hx2", "th1"], &[]);
    // l2_normalize over the last axis.
    b.op("l2sq", "Square", &["x"], &[]);
    b.op(
        "l2sum",
        "Sum",
        &["l2sq", "axis"],
        &[("keep_dims", Attr::Bool(true))],
    );
    sc(&mut b, "eps", 1e-12);
    b.op("l2max", "Maximum", &["l2sum", "eps"], &[]);
    b.op("l2rs", "Rsqrt", &["l2max"], &[]);
    b.op("l2", "Mul", &["x", "l2rs"], &[]);
    // swish
    b.op("sig", "Sigmoid", &["x"], &[]);
    b.op("swish", "Mul", &["x", "sig"], &[]);
    // Attention-style batch matmuls: by a constant (FULLY_CONNECTED) and of two activations.
    b.konst("wq", f32t(&[8, 8], &rng.vec(64)));
    b.konst("bq", f32t(&[8], &rng.vec(8)));
    b.op(
        "q",
        "BatchMatMulV2",
        &["x", "wq"],
        &[("adj_x", Attr::Bool(false)), ("adj_y", Attr::Bool(false))],
    );
    b.op("qb", "AddV2", &["q", "bq"], &[]);
    b.op(
        "scores",
        "BatchMatMulV2",
        &["qb", "x"],
        &[("adj_x", Attr::Bool(false)), ("adj_y", Attr::Bool(true))],
    );
    b.op("attn", "BatchMatMulV2", &["scores", "x"], &[]);
    for o in [
        "square",
        "log",
        "rsqrt",
        "pow",
        "exp",
        "neg",
        "leaky",
        "sqd",
        "prelu1",
        "prelu2",
        "prelu3",
        "gelu_erf",
        "gelu_tanh",
        "l2",
        "swish",
        "qb",
        "attn",
    ] {
        b.output(o);
    }
    b.g
}

/// Exports `g`, runs it in LiteRT with each of `resolvers`, compares every output
/// with qpipe's interpreter; returns the operator names and versions.
fn check(
    name: &str,
    g: &Graph,
    x: Tensor,
    resolvers: &[Resolver],
    tol: f32,
) -> BTreeMap<String, (usize, i32)> {
    let (_, bytes) = tflite::export(g).unwrap_or_else(|e| panic!("{name}: export failed: {e}"));
    let want = qpipe::kernels::run(g, &[("x", x.clone())], &g.outputs).unwrap();
    let case = LiteRtCase::write(&tmp_dir(name), &bytes, &[("x".to_string(), x)]);
    for &r in resolvers {
        let got = case.run(r).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got.len(), want.len(), "{name}: output count");
        for (k, (a, b)) in got.iter().zip(&want).enumerate() {
            let scale = b
                .to_f64_vec()
                .unwrap()
                .iter()
                .fold(1.0f64, |m, v| m.max(v.abs())) as f32;
            let d = tensor_max_abs_diff(a, b);
            assert!(
                d <= tol * scale,
                "{name} {r:?} output {k} ({}): max abs diff {d} > {tol}·{scale}",
                g.outputs[k]
            );
        }
    }
    let m = reader::read(&bytes, name).unwrap();
    let mut ops = BTreeMap::new();
    for o in &m.operators {
        let e = ops.entry(o.name.to_string()).or_insert((0, o.version));
        e.0 += 1;
    }
    ops
}

#[test]
fn arithmetic_ops_and_composites_export_and_match_litert() {
    let mut rng = Rng::new(14);
    let g = arith(&mut rng);
    let x = f32t(&[3, 6, 8], &rng.vec(144));
    let ops = check("arith", &g, x, &Resolver::ALL, 2e-6);
    let got: Vec<(&str, usize)> = ops.iter().map(|(k, v)| (k.as_str(), v.0)).collect();
    // Each PReLU form is one PRELU, each GELU form one GELU, l2_normalize one
    // L2_NORMALIZATION; the batch matmul by a constant (and its bias) one
    // FULLY_CONNECTED; StopGradient nothing.
    assert_eq!(
        got,
        [
            ("ABS", 1),
            ("ADD", 1),
            ("BATCH_MATMUL", 2),
            ("EXP", 1),
            ("FULLY_CONNECTED", 1),
            ("GELU", 2),
            ("L2_NORMALIZATION", 1),
            ("LEAKY_RELU", 1),
            ("LOG", 1),
            ("LOGISTIC", 1),
            ("MEAN", 1),
            ("MUL", 1),
            ("NEG", 1),
            ("POW", 1),
            ("PRELU", 3),
            ("RSQRT", 1),
            ("SQUARE", 1),
            ("SQUARED_DIFFERENCE", 1),
        ]
    );
    // FULLY_CONNECTED keeping the leading dimensions is version 5.
    assert_eq!(ops["FULLY_CONNECTED"].1, 5);
    assert!(ops.values().filter(|(_, v)| *v != 5).all(|(_, v)| *v == 1));
}

/// LiteRT 2.3.0's reference resolver has no ELU kernel: the default one runs it.
#[test]
fn elu_exports_as_elu() {
    let mut b = G::new();
    b.placeholder("x", DType::F32, Some(&[-1, 8]));
    b.op("elu", "Elu", &["x"], &[]);
    b.output("elu");
    let mut rng = Rng::new(15);
    let x = f32t(&[4, 8], &rng.vec(32));
    let ops = check("elu", &b.g, x, &[Resolver::Default], 1e-6);
    assert_eq!(ops.keys().collect::<Vec<_>>(), ["ELU"]);
}
