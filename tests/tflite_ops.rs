//! Hand-built graphs covering every op the TFLite lowering handles, exported and
//! run in LiteRT (default and reference resolver), compared with qpipe's own
//! interpreter on the same graph.

mod kern_util;
mod tfl_util;

use kern_util::{f32t, i32t, ints, s, Rng, G};
use qpipe::formats::tflite;
use qpipe::formats::tflite::reader;
use qpipe::ir::{Attr, DType, Graph, Tensor};
use qpipe::stages::fp16_cast::cast_fp16;
use tfl_util::{max_abs_diff, run_litert, scratch, Resolver};

/// Exports `g`, runs it in LiteRT on `feeds` with both resolvers, and checks
/// every output against qpipe's interpreter. Returns the exported bytes.
/// The default resolver's float kernels depend on the CPU: measured at most
/// 1.2e-7 from BUILTIN_REF on these graphs, the same with AVX-512 (native) and
/// AVX2 (QEMU -cpu Haswell, EPYC-Rome) to 1.5e-8; `tol` is far above both.
fn check(name: &str, g: &Graph, feeds: &[(&str, Tensor)], tol: f32) -> Vec<u8> {
    let dir = scratch(name);
    let (_, bytes) = tflite::export(g).unwrap_or_else(|e| panic!("{name}: export failed: {e}"));
    let path = dir.join("model.tflite");
    std::fs::write(&path, &bytes).unwrap();
    let mut files = Vec::new();
    for (input, t) in feeds {
        let f = dir.join(format!("{input}.npy"));
        qpipe::npy::write(&f, t).unwrap();
        files.push((*input, f));
    }
    let want = qpipe::kernels::run(g, feeds, &g.outputs).unwrap();
    let inputs: Vec<(&str, &std::path::Path)> =
        files.iter().map(|(n, f)| (*n, f.as_path())).collect();
    for resolver in Resolver::ALL {
        let got = run_litert(&path, &inputs, resolver, &dir.join(format!("{resolver:?}")))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got.len(), want.len(), "{name}: output count");
        for (k, (a, b)) in got.iter().zip(&want).enumerate() {
            let d = max_abs_diff(a, b);
            assert!(
                d <= tol,
                "{name} {resolver:?} output {k} ({}): max abs diff {d} > {tol}",
                g.outputs[k]
            );
        }
    }
    bytes
}

fn conv_attrs(strides: [i64; 2], padding: &str) -> Vec<(&'static str, Attr)> {
    vec![
        ("strides", ints(&[1, strides[0], strides[1], 1])),
        ("padding", s(padding)),
        ("data_format", s("NHWC")),
    ]
}

/// x[-1,8,8,3] → Conv2D (no bias) → Relu → depthwise (multiplier 2, stride 2,
/// bias) → Relu6 → MaxPool → AvgPool → Pad → Mean → MatMul (no bias) → Softmax.
fn cnn(rng: &mut Rng) -> Graph {
    let mut b = G::new();
    b.placeholder("x", DType::F32, Some(&[-1, 8, 8, 3]));
    b.konst("w1", f32t(&[3, 3, 3, 4], &rng.vec(108)));
    b.op("conv1", "Conv2D", &["x", "w1"], &conv_attrs([1, 1], "SAME"));
    b.op("relu1", "Relu", &["conv1"], &[]);
    b.konst("dw", f32t(&[3, 3, 4, 2], &rng.vec(72)));
    b.op(
        "dwconv",
        "DepthwiseConv2dNative",
        &["relu1", "dw"],
        &conv_attrs([2, 2], "VALID"),
    );
    b.konst("db", f32t(&[8], &rng.vec(8)));
    b.op("dbias", "BiasAdd", &["dwconv", "db"], &[]);
    b.op("relu6", "Relu6", &["dbias"], &[]);
    let pool = |k: i64, st: i64, pad: &str| {
        vec![
            ("ksize", ints(&[1, k, k, 1])),
            ("strides", ints(&[1, st, st, 1])),
            ("padding", s(pad)),
            ("data_format", s("NHWC")),
        ]
    };
    b.op("maxpool", "MaxPool", &["relu6"], &pool(2, 2, "SAME"));
    b.op("avgpool", "AvgPool", &["maxpool"], &pool(2, 1, "SAME"));
    b.konst("pads", i32t(&[4, 2], &[0, 0, 1, 0, 0, 1, 0, 0]));
    b.op("pad", "Pad", &["avgpool", "pads"], &[]);
    b.konst("axes", i32t(&[2], &[1, 2]));
    b.op(
        "mean",
        "Mean",
        &["pad", "axes"],
        &[("keep_dims", Attr::Bool(false))],
    );
    b.konst("fc", f32t(&[8, 5], &rng.vec(40)));
    b.op("logits", "MatMul", &["mean", "fc"], &[]);
    b.op("probs", "Softmax", &["logits"], &[]);
    b.output("probs");
    b.g
}

/// ids[-1,10] → Gather → conv1d (ExpandDims, Conv2D, BiasAdd, Relu, Squeeze)
/// → Max over time, concatenated with Mean over time → MatMul(transpose_b) +
/// Add bias → Tanh gated by Sigmoid → Sub, RealDiv, Minimum/Maximum clip → Reshape.
fn text(rng: &mut Rng) -> Graph {
    let mut b = G::new();
    b.placeholder("ids", DType::I32, Some(&[-1, 10]));
    b.konst("emb", f32t(&[50, 6], &rng.vec(300)));
    b.konst("gaxis", Tensor::scalar(0i32));
    b.op(
        "embed",
        "GatherV2",
        &["emb", "ids", "gaxis"],
        &[("batch_dims", Attr::Int(0))],
    );
    b.konst("one", Tensor::scalar(1i32));
    b.op("expand", "ExpandDims", &["embed", "one"], &[]);
    b.konst("w", f32t(&[3, 6, 4], &rng.vec(72)));
    b.konst("zero", Tensor::scalar(0i32));
    b.op("wexp", "ExpandDims", &["w", "zero"], &[]);
    b.op(
        "conv",
        "Conv2D",
        &["expand", "wexp"],
        &conv_attrs([1, 1], "VALID"),
    );
    b.konst("cb", f32t(&[4], &rng.vec(4)));
    b.op("cbias", "BiasAdd", &["conv", "cb"], &[]);
    b.op("crelu", "Relu", &["cbias"], &[]);
    b.op(
        "squeeze",
        "Squeeze",
        &["crelu"],
        &[("squeeze_dims", ints(&[-3]))],
    );
    b.op(
        "gmp",
        "Max",
        &["squeeze", "one"],
        &[("keep_dims", Attr::Bool(false))],
    );
    b.op(
        "avg",
        "Mean",
        &["embed", "one"],
        &[("keep_dims", Attr::Bool(false))],
    );
    b.op(
        "concat",
        "ConcatV2",
        &["gmp", "avg", "one"],
        &[("N", Attr::Int(2))],
    );
    b.konst("fw", f32t(&[3, 10], &rng.vec(30)));
    b.op(
        "fc",
        "MatMul",
        &["concat", "fw"],
        &[("transpose_b", Attr::Bool(true))],
    );
    b.konst("fb", f32t(&[3], &rng.vec(3)));
    b.op("fcb", "AddV2", &["fc", "fb"], &[]);
    b.op("tanh", "Tanh", &["fcb"], &[]);
    b.op("gate", "Sigmoid", &["fcb"], &[]);
    b.op("gated", "Mul", &["tanh", "gate"], &[]);
    b.konst("shift", f32t(&[3], &[0.1, -0.2, 0.3]));
    b.op("sub", "Sub", &["gated", "shift"], &[]);
    b.konst("two", Tensor::scalar(2.0f32));
    b.op("div", "RealDiv", &["sub", "two"], &[]);
    b.konst("hi", Tensor::scalar(0.2f32));
    b.op("clip_hi", "Minimum", &["div", "hi"], &[]);
    b.konst("lo", Tensor::scalar(-0.2f32));
    b.op("clip", "Maximum", &["clip_hi", "lo"], &[]);
    b.konst("shape", i32t(&[3], &[-1, 3, 1]));
    b.op("out", "Reshape", &["clip", "shape"], &[]);
    b.output("out");
    b.g
}

fn images(rng: &mut Rng, n: usize) -> Tensor {
    f32t(&[n, 8, 8, 3], &rng.vec(n * 192))
}

fn token_ids(rng: &mut Rng, n: usize) -> Tensor {
    let v: Vec<i32> = (0..n * 10).map(|_| rng.below(50) as i32).collect();
    i32t(&[n, 10], &v)
}

#[test]
fn convolutional_graph_runs_in_litert() {
    let mut rng = Rng::new(1);
    let g = cnn(&mut rng);
    let x = images(&mut rng, 5);
    let bytes = check("cnn", &g, &[("x", x)], 1e-5);
    let m = reader::read(&bytes, "cnn").unwrap();
    let names: Vec<&str> = m.operators.iter().map(|o| o.name).collect();
    assert_eq!(
        names,
        [
            "CONV_2D",
            "DEPTHWISE_CONV_2D",
            "MAX_POOL_2D",
            "AVERAGE_POOL_2D",
            "PAD",
            "MEAN",
            "FULLY_CONNECTED",
            "SOFTMAX"
        ],
        "Relu, the bias and Relu6 are fused"
    );
    let fc = &m.operators[6];
    assert_eq!(fc.inputs[2], -1, "MatMul without a bias has no bias input");
    let conv = &m.operators[0];
    let bias = &m.tensors[conv.inputs[2] as usize];
    assert_eq!(
        bias.shape,
        [4],
        "a convolution without bias gets a zero bias"
    );
    let dw = &m.tensors[m.operators[1].inputs[1] as usize];
    assert_eq!(dw.shape, [1, 3, 3, 8], "depthwise filter HWCM -> 1HW(C*M)");
    let w1 = &m.tensors[conv.inputs[1] as usize];
    assert_eq!(w1.shape, [4, 3, 3, 3], "conv filter HWIO -> OHWI");
}

#[test]
fn text_graph_runs_in_litert() {
    let mut rng = Rng::new(2);
    let g = text(&mut rng);
    let ids = token_ids(&mut rng, 7);
    let bytes = check("text", &g, &[("ids", ids)], 1e-5);
    let m = reader::read(&bytes, "text").unwrap();
    let names: Vec<&str> = m.operators.iter().map(|o| o.name).collect();
    for want in [
        "GATHER",
        "EXPAND_DIMS",
        "CONV_2D",
        "SQUEEZE",
        "REDUCE_MAX",
        "MEAN",
        "CONCATENATION",
        "FULLY_CONNECTED",
        "TANH",
        "LOGISTIC",
        "MUL",
        "SUB",
        "DIV",
        "MINIMUM",
        "MAXIMUM",
        "RESHAPE",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    assert!(!names.contains(&"ADD"), "the FC bias is fused: {names:?}");
    assert!(
        !names.contains(&"RELU"),
        "the conv ReLU is fused: {names:?}"
    );
}

#[test]
fn intermediate_outputs_block_fusion() {
    let mut rng = Rng::new(3);
    let mut b = G::new();
    b.placeholder("x", DType::F32, Some(&[-1, 6]));
    b.konst("w", f32t(&[6, 4], &rng.vec(24)));
    b.op("mm", "MatMul", &["x", "w"], &[]);
    b.konst("bias", f32t(&[4], &rng.vec(4)));
    b.op("biased", "BiasAdd", &["mm", "bias"], &[]);
    b.op("relu", "Relu", &["biased"], &[]);
    b.op("relu6", "Relu6", &["biased"], &[]);
    b.output("biased");
    b.output("relu");
    b.output("relu6");
    let x = f32t(&[4, 6], &rng.vec(24));
    let bytes = check("outputs", &b.g, &[("x", x)], 1e-5);
    let m = reader::read(&bytes, "outputs").unwrap();
    let names: Vec<&str> = m.operators.iter().map(|o| o.name).collect();
    assert_eq!(names, ["FULLY_CONNECTED", "RELU", "RELU6"]);
    let sig = &m.signatures[0];
    let outs: Vec<&str> = sig.outputs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(outs, ["biased", "relu", "relu6"]);
}

#[test]
fn float16_graphs_run_in_litert_like_the_interpreter() {
    let mut rng = Rng::new(4);
    for (name, g, feed) in [
        ("cnn16", cnn(&mut rng), ("x", images(&mut rng, 5))),
        ("text16", text(&mut rng), ("ids", token_ids(&mut rng, 5))),
    ] {
        let (g16, report) = cast_fp16(&g, 1, &[]).unwrap();
        assert!(report.tensors_cast >= 4);
        let bytes = check(name, &g16, &[feed], 1e-5);
        let m = reader::read(&bytes, name).unwrap();
        let dq: Vec<_> = m
            .operators
            .iter()
            .filter(|o| o.name == "DEQUANTIZE")
            .collect();
        assert!(!dq.is_empty());
        for op in dq {
            assert_eq!(op.version, 3, "DEQUANTIZE of float16 is version 3");
            assert_eq!(m.tensors[op.inputs[0] as usize].type_name, "FLOAT16");
            assert_eq!(m.tensors[op.outputs[0] as usize].type_name, "FLOAT32");
        }
        let meta: Vec<&str> = m.metadata.iter().map(|(n, _)| n.as_str()).collect();
        assert!(meta.contains(&"reduced_precision_support"), "{meta:?}");
    }
}
