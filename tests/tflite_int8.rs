//! The int8 side of the writer, ahead of the quantize stage: a hand-quantized
//! graph (per-channel int8 weights, int32 biases, int8 activations with
//! QUANTIZE/DEQUANTIZE at the edges) and a weight-only one (int8 weights
//! dequantized at run time) export with their scales and zero points and
//! the operator versions TFLite's rules give, load in LiteRT, and compute what
//! the float graph computes up to the quantization error.

mod kern_util;
mod tfl_util;

use kern_util::{f32t, i32t, ints, s, Rng, G};
use qpipe::formats::tflite::{self, reader};
use qpipe::ir::{Attr, DType, Graph, QuantParams, Tensor};
use tfl_util::{max_abs_diff, run_litert, scratch, top1_agreement, Resolver};

/// TFLite's asymmetric int8 parameters for a range (`GetAsymmetricQuantizationParams`).
fn asym(min: f32, max: f32) -> QuantParams {
    let (min, max) = (min.min(0.0), max.max(0.0));
    let scale = (max - min) / 255.0;
    let zp = (-128.0 - min / scale).round().clamp(-128.0, 127.0) as i64;
    QuantParams::per_tensor(scale, zp)
}

/// Symmetric per-channel int8 weights along `axis` (the last one here).
fn quantize_weights(w: &[f32], channels: usize) -> (Vec<i8>, Vec<f32>) {
    let mut scale = vec![0f32; channels];
    for (i, v) in w.iter().enumerate() {
        let c = i % channels;
        scale[c] = scale[c].max(v.abs() / 127.0);
    }
    let q = w
        .iter()
        .enumerate()
        .map(|(i, v)| (v / scale[i % channels]).round().clamp(-127.0, 127.0) as i8)
        .collect();
    (q, scale)
}

fn range(t: &Tensor) -> (f32, f32) {
    let v = t.to_f32_vec().unwrap();
    let min = v.iter().copied().fold(f32::INFINITY, f32::min);
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    (min, max)
}

struct Weights {
    w: Vec<f32>,
    b: Vec<f32>,
    fw: Vec<f32>,
    fb: Vec<f32>,
}

/// x[-1,6,6,2] → Conv2D 3x3x2x4 + bias + Relu → MaxPool 2x2 → Reshape [-1,36]
/// → MatMul 36x3 + bias → Softmax, in float.
fn float_graph(wt: &Weights) -> Graph {
    let mut b = G::new();
    b.placeholder("x", DType::F32, Some(&[-1, 6, 6, 2]));
    b.konst("w", f32t(&[3, 3, 2, 4], &wt.w));
    b.op(
        "conv",
        "Conv2D",
        &["x", "w"],
        &[("strides", ints(&[1, 1, 1, 1])), ("padding", s("SAME"))],
    );
    b.konst("b", f32t(&[4], &wt.b));
    b.op("bias", "BiasAdd", &["conv", "b"], &[]);
    b.op("relu", "Relu", &["bias"], &[]);
    b.op(
        "pool",
        "MaxPool",
        &["relu"],
        &[
            ("ksize", ints(&[1, 2, 2, 1])),
            ("strides", ints(&[1, 2, 2, 1])),
            ("padding", s("VALID")),
        ],
    );
    b.konst("shape", i32t(&[2], &[-1, 36]));
    b.op("flat", "Reshape", &["pool", "shape"], &[]);
    b.konst("fw", f32t(&[36, 3], &wt.fw));
    b.op("fc", "MatMul", &["flat", "fw"], &[]);
    b.konst("fb", f32t(&[3], &wt.fb));
    b.op("logits", "BiasAdd", &["fc", "fb"], &[]);
    b.op("probs", "Softmax", &["logits"], &[]);
    b.output("probs");
    b.g
}

/// The same graph fully quantized, with the parameters calibrated on `x`.
fn int8_graph(wt: &Weights, x: &Tensor) -> Graph {
    let f = float_graph(wt);
    let fetch: Vec<_> = ["relu", "logits"].iter().map(|n| kern_util::r(n)).collect();
    let acts = qpipe::kernels::run(&f, &[("x", x.clone())], &fetch).unwrap();
    let (xmin, xmax) = range(x);
    let qx = asym(xmin, xmax);
    let (rmin, rmax) = range(&acts[0]);
    let qrelu = asym(rmin, rmax);
    let (lmin, lmax) = range(&acts[1]);
    let qlogits = asym(lmin, lmax);

    let (w8, ws) = quantize_weights(&wt.w, 4);
    let (fw8, fws) = quantize_weights(&wt.fw, 3);
    let bias32 = |b: &[f32], in_scale: f32, ws: &[f32]| -> (Vec<i32>, Vec<f32>) {
        let scales: Vec<f32> = ws.iter().map(|s| in_scale * s).collect();
        let q = b
            .iter()
            .zip(&scales)
            .map(|(v, s)| (v / s).round() as i32)
            .collect();
        (q, scales)
    };
    let (b32, bs) = bias32(&wt.b, qx.scale[0], &ws);
    let (fb32, fbs) = bias32(&wt.fb, qrelu.scale[0], &fws);

    let mut g = f.clone();
    let set = |g: &mut Graph, name: &str, q: QuantParams| {
        g.node_mut(name).unwrap().output_quant.insert(0, q);
    };
    let replace_const = |g: &mut Graph, name: &str, t: Tensor, q: QuantParams| {
        let n = g.node_mut(name).unwrap();
        n.attrs.insert("dtype".into(), Attr::Type(t.dtype()));
        n.attrs.insert("value".into(), Attr::Tensor(t));
        n.output_quant.insert(0, q);
    };
    replace_const(
        &mut g,
        "w",
        Tensor::from_vec(vec![3, 3, 2, 4], &w8),
        QuantParams::per_axis(ws, vec![0; 4], 3),
    );
    replace_const(
        &mut g,
        "b",
        Tensor::from_vec(vec![4], &b32),
        QuantParams::per_axis(bs, vec![0; 4], 0),
    );
    replace_const(
        &mut g,
        "fw",
        Tensor::from_vec(vec![36, 3], &fw8),
        QuantParams::per_axis(fws, vec![0; 3], 1),
    );
    replace_const(
        &mut g,
        "fb",
        Tensor::from_vec(vec![3], &fb32),
        QuantParams::per_axis(fbs, vec![0; 3], 0),
    );
    // Quantize the input, dequantize the output.
    let mut q = qpipe::ir::Node::new("x/quantize", "Quantize")
        .with_input(kern_util::r("x"))
        .with_attr("dtype", Attr::Type(DType::I8));
    q.output_quant.insert(0, qx);
    g.nodes.push(q);
    g.node_mut("conv").unwrap().inputs[0] = kern_util::r("x/quantize");
    for n in ["conv", "bias", "relu", "pool", "flat"] {
        set(&mut g, n, qrelu.clone());
    }
    for n in ["fc", "logits"] {
        set(&mut g, n, qlogits.clone());
    }
    set(&mut g, "probs", QuantParams::per_tensor(1.0 / 256.0, -128));
    g.nodes.push(
        qpipe::ir::Node::new("probs/dequantize", "Dequantize")
            .with_input(kern_util::r("probs"))
            .with_attr("dtype", Attr::Type(DType::F32)),
    );
    g.outputs = vec![kern_util::r("probs/dequantize")];
    g
}

fn weights(rng: &mut Rng) -> Weights {
    Weights {
        w: rng.vec(72),
        b: rng.vec(4).iter().map(|v| v * 0.1).collect(),
        fw: rng.vec(108),
        fb: rng.vec(3).iter().map(|v| v * 0.1).collect(),
    }
}

#[test]
fn fully_quantized_graph_loads_and_runs_in_litert() {
    let mut rng = Rng::new(21);
    let wt = weights(&mut rng);
    let x = f32t(&[64, 6, 6, 2], &rng.vec(64 * 72));
    let g = int8_graph(&wt, &x);
    let (_, bytes) = tflite::export(&g).unwrap();
    let m = reader::read(&bytes, "int8").unwrap();

    let ops: Vec<(&str, i32)> = m.operators.iter().map(|o| (o.name, o.version)).collect();
    assert_eq!(
        ops,
        [
            ("QUANTIZE", 1),
            ("CONV_2D", 3),
            ("MAX_POOL_2D", 2),
            ("RESHAPE", 1),
            ("FULLY_CONNECTED", 4),
            ("SOFTMAX", 2),
            ("DEQUANTIZE", 2),
        ]
    );
    let conv = &m.operators[1];
    let w = &m.tensors[conv.inputs[1] as usize];
    assert_eq!(
        (w.type_name, w.shape.as_slice()),
        ("INT8", &[4, 3, 3, 2][..])
    );
    let wq = w.quant.as_ref().unwrap();
    assert_eq!(
        (wq.scale.len(), wq.quantized_dimension),
        (4, 0),
        "per output channel, OHWI axis 0"
    );
    let b = &m.tensors[conv.inputs[2] as usize];
    assert_eq!(b.type_name, "INT32");
    assert_eq!(b.quant.as_ref().unwrap().scale.len(), 4);
    let fc = &m.operators[4];
    let fw = &m.tensors[fc.inputs[1] as usize];
    assert_eq!(fw.shape, [3, 36]);
    assert_eq!(fw.quant.as_ref().unwrap().quantized_dimension, 0);
    let probs = &m.tensors[m.operators[5].outputs[0] as usize];
    let pq = probs.quant.as_ref().unwrap();
    assert_eq!((pq.scale[0], pq.zero_point[0]), (1.0 / 256.0, -128));

    let dir = scratch("int8");
    let path = dir.join("model.tflite");
    std::fs::write(&path, &bytes).unwrap();
    let xf = dir.join("x.npy");
    qpipe::npy::write(&xf, &x).unwrap();
    let want = qpipe::kernels::run(
        &float_graph(&wt),
        &[("x", x.clone())],
        &[kern_util::r("probs")],
    )
    .unwrap()
    .remove(0);
    // Against the float model, so the bounds hold for any resolver and CPU: the default
    // resolver was measured bit-identical to BUILTIN_REF here (AVX-512 native, AVX2
    // under QEMU -cpu Haswell and EPYC-Rome).
    for resolver in Resolver::ALL {
        let got = run_litert(
            &path,
            &[("x", &xf)],
            resolver,
            &dir.join(format!("{resolver:?}")),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let d = max_abs_diff(&got[0], &want);
        let agree = top1_agreement(&got[0], &want);
        eprintln!("int8 {resolver:?}: max abs diff {d}, top-1 agreement {agree}");
        assert!(d < 0.05, "{resolver:?}: int8 vs float max abs diff {d}");
        assert!(agree >= 0.95, "{resolver:?}: top-1 agreement {agree}");
    }
}

#[test]
fn weight_only_int8_graph_dequantizes_at_run_time() {
    let mut rng = Rng::new(22);
    let wt = weights(&mut rng);
    let f = float_graph(&wt);
    let mut g = f.clone();
    let (fw8, fws) = quantize_weights(&wt.fw, 3);
    let dequantized: Vec<f32> = fw8
        .iter()
        .enumerate()
        .map(|(i, &q)| q as f32 * fws[i % 3])
        .collect();
    {
        let n = g.node_mut("fw").unwrap();
        n.attrs.insert("dtype".into(), Attr::Type(DType::I8));
        n.attrs.insert(
            "value".into(),
            Attr::Tensor(Tensor::from_vec(vec![36, 3], &fw8)),
        );
        n.output_quant
            .insert(0, QuantParams::per_axis(fws, vec![0; 3], 1));
    }
    g.nodes.push(
        qpipe::ir::Node::new("fw/dequantize", "Dequantize")
            .with_input(kern_util::r("fw"))
            .with_attr("T", Attr::Type(DType::I8))
            .with_attr("dtype", Attr::Type(DType::F32)),
    );
    g.node_mut("fc").unwrap().inputs[1] = kern_util::r("fw/dequantize");
    let (_, bytes) = tflite::export(&g).unwrap();
    let m = reader::read(&bytes, "weight-only").unwrap();
    let dq = m.operators.iter().find(|o| o.name == "DEQUANTIZE").unwrap();
    assert_eq!(dq.version, 5, "per-channel int8 DEQUANTIZE is version 5");
    let src = &m.tensors[dq.inputs[0] as usize];
    assert_eq!(
        (src.type_name, src.shape.as_slice()),
        ("INT8", &[3, 36][..])
    );

    // The reference: the float graph with the dequantized weights.
    let mut r = f.clone();
    r.node_mut("fw")
        .unwrap()
        .attrs
        .insert("value".into(), Attr::Tensor(f32t(&[36, 3], &dequantized)));
    let x = f32t(&[16, 6, 6, 2], &rng.vec(16 * 72));
    let want = qpipe::kernels::run(&r, &[("x", x.clone())], &r.outputs)
        .unwrap()
        .remove(0);
    let dir = scratch("weight_only");
    let path = dir.join("model.tflite");
    std::fs::write(&path, &bytes).unwrap();
    let xf = dir.join("x.npy");
    qpipe::npy::write(&xf, &x).unwrap();
    // The default resolver's float kernels: measured 2.4e-7 from BUILTIN_REF, the same
    // with AVX-512 and AVX2 (QEMU); 1e-5 covers both.
    for resolver in Resolver::ALL {
        let got = run_litert(
            &path,
            &[("x", &xf)],
            resolver,
            &dir.join(format!("{resolver:?}")),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let d = max_abs_diff(&got[0], &want);
        assert!(d <= 1e-5, "{resolver:?}: max abs diff {d}");
    }
}
