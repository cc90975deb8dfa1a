//! Issue 14's activation and spatial kernels against LiteRT's reference kernels
//! (`BUILTIN_REF`): HARD_SWISH in int8 bit for bit, on every int8 input value and
//! random input/output parameters, and in float32. One LiteRT process for all.

mod support;

use qpipe::formats::tflite;
use qpipe::ir::{Attr, DType, Graph, Node, QuantParams, Tensor, TensorRef};
use qpipe::kernels::Arithmetic;
use support::litert_oracle::{LiteRtCase, Resolver};
use support::numeric::Rng;
use support::tmp_dir;

fn placeholder(g: &mut Graph, name: &str, dt: DType, shape: &[i64], q: Option<QuantParams>) {
    let mut n = Node::new(name, "Placeholder")
        .with_attr("dtype", Attr::Type(dt))
        .with_attr("shape", Attr::Shape(Some(shape.to_vec())));
    if let Some(q) = q {
        n.output_quant.insert(0, q);
    }
    g.nodes.push(n);
    g.inputs.push(name.into());
}

fn hard_swish(g: &mut Graph, name: &str, x: &str, dt: DType, q: Option<QuantParams>) {
    let mut n = Node::new(name, "HardSwish")
        .with_input(TensorRef::new(x, 0))
        .with_attr("T", Attr::Type(dt));
    if let Some(q) = q {
        n.output_quant.insert(0, q);
    }
    g.nodes.push(n);
    g.outputs.push(TensorRef::new(name, 0));
}

#[test]
fn hard_swish_matches_litert_reference_in_int8_and_float() {
    let mut rng = Rng::new(14);
    let mut g = Graph::default();
    let mut feeds = Vec::new();
    // Every int8 value, for several input parameters; each input feeds several
    // output parameters (larger and smaller scales, both signs of zero point).
    for i in 0..6 {
        let in_scale = 0.005 * (1.0 + 40.0 * (rng.f() + 1.0) / 2.0);
        let in_zp = (rng.next_u64() % 101) as i64 - 50;
        let x = format!("x{i}");
        placeholder(
            &mut g,
            &x,
            DType::I8,
            &[1, 256],
            Some(QuantParams::per_tensor(in_scale, in_zp)),
        );
        let all: Vec<i8> = (-128..=127).map(|v| v as i8).collect();
        feeds.push((x.clone(), Tensor::from_vec(vec![1, 256], &all)));
        for j in 0..5 {
            let ratio = [0.02f32, 0.3, 1.0, 2.5, 0.9][j] * (1.0 + 0.1 * rng.f());
            let out_zp = (rng.next_u64() % 201) as i64 - 100;
            hard_swish(
                &mut g,
                &format!("hs{i}_{j}"),
                &x,
                DType::I8,
                Some(QuantParams::per_tensor(in_scale * ratio, out_zp)),
            );
        }
    }
    placeholder(&mut g, "xf", DType::F32, &[1, 64], None);
    let xf: Vec<f32> = (0..64)
        .map(|k| (k as f32 - 32.0) * 0.21 + rng.f() * 0.1)
        .collect();
    feeds.push(("xf".into(), Tensor::from_vec(vec![1, 64], &xf)));
    hard_swish(&mut g, "hsf", "xf", DType::F32, None);

    let dir = tmp_dir("spatial_hard_swish");
    let (_, bytes) = tflite::export(&g).unwrap();
    let case = LiteRtCase::write(&dir, &bytes, &feeds);
    let theirs = case.run(Resolver::Reference).unwrap();
    let fed: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let ours = qpipe::kernels::run_with(&g, &fed, &g.outputs, Arithmetic::Reference).unwrap();
    assert_eq!(ours.len(), theirs.len());
    for ((r, a), b) in g.outputs.iter().zip(&ours).zip(&theirs) {
        if a.dtype() == DType::F32 {
            let (x, y) = (a.to_f32_vec().unwrap(), b.to_f32_vec().unwrap());
            assert_eq!(x, y, "{r}: float HARD_SWISH differs from LiteRT's");
            continue;
        }
        let (x, y) = (a.to_i64_vec().unwrap(), b.to_i64_vec().unwrap());
        let bad: Vec<(usize, i64, i64)> = x
            .iter()
            .zip(&y)
            .enumerate()
            .filter(|(_, (p, q))| p != q)
            .map(|(k, (p, q))| (k, *p, *q))
            .collect();
        assert!(
            bad.is_empty(),
            "{r}: differs from BUILTIN_REF at (index, qpipe, LiteRT) {bad:?}"
        );
        // The op is not trivial on these parameters: outputs span many values.
        let distinct: std::collections::BTreeSet<i64> = x.iter().copied().collect();
        assert!(
            distinct.len() > 8,
            "{r}: only {} distinct outputs",
            distinct.len()
        );
    }
}

/// A depthwise convolution with depth multiplier 2 and one weight scale per output
/// channel (C·M scales along axis 3, what quantize_int8 now gives it) exports and
/// runs bit for bit like LiteRT's reference kernel.
#[test]
fn depthwise_with_a_depth_multiplier_runs_per_channel_like_litert() {
    let mut rng = Rng::new(21);
    let mut g = Graph::default();
    let (c, m) = (3usize, 2usize);
    let in_q = QuantParams::per_tensor(0.05, -7);
    placeholder(&mut g, "x", DType::I8, &[1, 6, 6, c as i64], Some(in_q));
    let n = 6 * 6 * c;
    let xv: Vec<i8> = (0..n)
        .map(|_| (rng.next_u64() % 256) as i64 as u8 as i8)
        .collect();
    let feeds = vec![("x".to_string(), Tensor::from_vec(vec![1, 6, 6, c], &xv))];
    let ws: Vec<f32> = (0..c * m).map(|k| 0.004 * (1.0 + k as f32)).collect();
    let wv: Vec<i8> = (0..9 * c * m)
        .map(|_| ((rng.next_u64() % 255) as i64 - 127) as i8)
        .collect();
    let mut w = Node::constant("w", Tensor::from_vec(vec![3, 3, c, m], &wv));
    w.output_quant
        .insert(0, QuantParams::per_axis(ws.clone(), vec![0; c * m], 3));
    let bias: Vec<i32> = (0..c * m).map(|k| k as i32 * 100 - 250).collect();
    let mut b = Node::constant("b", Tensor::from_vec(vec![c * m], &bias));
    b.output_quant.insert(
        0,
        QuantParams::per_axis(ws.iter().map(|s| s * 0.05).collect(), vec![0; c * m], 0),
    );
    g.nodes.push(w);
    g.nodes.push(b);
    for (name, pad) in [("dw_same", "SAME"), ("dw_valid", "VALID")] {
        let mut d = Node::new(name, "_FusedDepthwiseConv2dNative")
            .with_input(TensorRef::new("x", 0))
            .with_input(TensorRef::new("w", 0))
            .with_input(TensorRef::new("b", 0))
            .with_attr("T", Attr::Type(DType::I8))
            .with_attr("strides", Attr::Ints(vec![1, 1, 1, 1]))
            .with_attr("padding", Attr::Str(pad.as_bytes().to_vec()))
            .with_attr("fused_ops", Attr::Strs(vec![b"BiasAdd".to_vec()]))
            .with_attr("num_args", Attr::Int(1));
        d.output_quant.insert(0, QuantParams::per_tensor(0.03, 5));
        g.nodes.push(d);
        g.outputs.push(TensorRef::new(name, 0));
    }
    let dir = tmp_dir("spatial_depthwise_multiplier");
    let (_, bytes) = tflite::export(&g).unwrap();
    let case = LiteRtCase::write(&dir, &bytes, &feeds);
    let theirs = case.run(Resolver::Reference).unwrap();
    let fed: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let ours = qpipe::kernels::run_with(&g, &fed, &g.outputs, Arithmetic::Reference).unwrap();
    for ((r, a), b) in g.outputs.iter().zip(&ours).zip(&theirs) {
        assert_eq!(a.shape(), b.shape(), "{r}");
        assert_eq!(a.to_i64_vec().unwrap(), b.to_i64_vec().unwrap(), "{r}");
    }
}

/// TRANSPOSE_CONV (bias and Relu fused, SAME and VALID, strides 1 and 2) and
/// RESIZE_BILINEAR / RESIZE_NEAREST_NEIGHBOR in every coordinate mode, in float32:
/// qpipe's kernels (TensorFlow's semantics) against LiteRT's reference kernels.
#[test]
fn transposed_convolution_and_resizes_match_litert_in_float() {
    use support::graph_builder::{f32t, i32t, ints, s, G};
    let mut rng = Rng::new(8);
    let mut b = G::new();
    b.placeholder("x", DType::F32, Some(&[1, 5, 5, 3]));
    let xv = f32t(&[1, 5, 5, 3], &rng.vec(75));
    for (k, (pad, stride, out)) in [("SAME", 2i64, 10i32), ("VALID", 2, 11), ("SAME", 1, 5)]
        .into_iter()
        .enumerate()
    {
        let w = b.konst(&format!("w{k}"), f32t(&[3, 3, 4, 3], &rng.vec(108)));
        let os = b.konst(&format!("os{k}"), i32t(&[4], &[1, out, out, 4]));
        let d = b.op(
            &format!("deconv{k}"),
            "Conv2DBackpropInput",
            &[&os, &w, "x"],
            &[
                ("strides", ints(&[1, stride, stride, 1])),
                ("padding", s(pad)),
            ],
        );
        let bias = b.konst(&format!("b{k}"), f32t(&[4], &rng.vec(4)));
        let ba = b.op(&format!("badd{k}"), "BiasAdd", &[&d, &bias], &[]);
        b.op(&format!("relu{k}"), "Relu", &[&ba], &[]);
        b.output(&format!("relu{k}"));
    }
    let size = b.konst("size", i32t(&[2], &[8, 7]));
    for (op, ac, hp) in [
        ("ResizeBilinear", false, false),
        ("ResizeBilinear", true, false),
        ("ResizeBilinear", false, true),
        ("ResizeNearestNeighbor", false, false),
        ("ResizeNearestNeighbor", true, false),
        ("ResizeNearestNeighbor", false, true),
    ] {
        let name = format!("{op}_{ac}_{hp}");
        b.op(
            &name,
            op,
            &["x", &size],
            &[
                ("align_corners", Attr::Bool(ac)),
                ("half_pixel_centers", Attr::Bool(hp)),
            ],
        );
        b.output(&name);
    }
    let g = b.g;
    let (_, bytes) = tflite::export(&g).unwrap();
    let feeds = vec![("x".to_string(), xv.clone())];
    let dir = tmp_dir("spatial_float_ops");
    let case = LiteRtCase::write(&dir, &bytes, &feeds);
    let theirs = case.run(Resolver::Reference).unwrap();
    let ours = qpipe::kernels::run(&g, &[("x", xv)], &g.outputs).unwrap();
    assert_eq!(ours.len(), theirs.len());
    for ((r, a), t) in g.outputs.iter().zip(&ours).zip(&theirs) {
        assert_eq!(a.shape(), t.shape(), "{r}");
        let (x, y) = (a.to_f32_vec().unwrap(), t.to_f32_vec().unwrap());
        let d = x
            .iter()
            .zip(&y)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(d <= 1e-5, "{r}: max |qpipe - LiteRT| = {d}");
    }
}

/// The int8 TRANSPOSE_CONV (per output channel weights, int32 bias, with and
/// without a fused Relu, SAME and VALID, strides 1 and 2, and without a bias),
/// RESIZE_BILINEAR (up and down, in every coordinate mode) and
/// RESIZE_NEAREST_NEIGHBOR give LiteRT's reference kernels' bits. One model, one
/// LiteRT process.
#[test]
fn int8_transposed_convolution_and_resizes_match_litert_reference() {
    let mut rng = Rng::new(1407);
    let mut g = Graph::default();
    let (c, o) = (3usize, 4usize);
    let in_scale = 0.05f32;
    let in_q = QuantParams::per_tensor(in_scale, -7);
    placeholder(
        &mut g,
        "x",
        DType::I8,
        &[1, 5, 5, c as i64],
        Some(in_q.clone()),
    );
    let xv: Vec<i8> = (0..25 * c)
        .map(|_| (rng.next_u64() % 256) as i64 as u8 as i8)
        .collect();
    let feeds = vec![("x".to_string(), Tensor::from_vec(vec![1, 5, 5, c], &xv))];
    let cases: [(&str, i64, i32, Option<&str>, bool); 5] = [
        ("SAME", 2, 10, Some("Relu"), true),
        ("VALID", 2, 11, None, true),
        ("SAME", 1, 5, Some("Relu"), true),
        ("VALID", 1, 7, Some("Relu6"), true),
        ("SAME", 2, 9, None, false),
    ];
    for (k, (pad, stride, out, act, with_bias)) in cases.into_iter().enumerate() {
        let ws: Vec<f32> = (0..o)
            .map(|j| 0.003 * (1.0 + j as f32) * (1.0 + rng.f().abs()))
            .collect();
        let wv: Vec<i8> = (0..9 * o * c)
            .map(|_| ((rng.next_u64() % 255) as i64 - 127) as i8)
            .collect();
        let mut w = Node::constant(format!("w{k}"), Tensor::from_vec(vec![3, 3, o, c], &wv));
        w.output_quant
            .insert(0, QuantParams::per_axis(ws.clone(), vec![0; o], 2));
        g.nodes.push(w);
        g.nodes.push(Node::constant(
            format!("os{k}"),
            Tensor::from_vec(vec![4], &[1, out, out, o as i32]),
        ));
        let mut d = Node::new(format!("deconv{k}"), "Conv2DBackpropInput")
            .with_input(TensorRef::new(format!("os{k}"), 0))
            .with_input(TensorRef::new(format!("w{k}"), 0))
            .with_input(TensorRef::new("x", 0))
            .with_attr("T", Attr::Type(DType::I8))
            .with_attr("strides", Attr::Ints(vec![1, stride, stride, 1]))
            .with_attr("padding", Attr::Str(pad.as_bytes().to_vec()));
        if with_bias {
            let bias: Vec<i32> = (0..o)
                .map(|_| (rng.next_u64() % 4001) as i32 - 2000)
                .collect();
            let mut b = Node::constant(format!("b{k}"), Tensor::from_vec(vec![o], &bias));
            b.output_quant.insert(
                0,
                QuantParams::per_axis(ws.iter().map(|s| s * in_scale).collect(), vec![0; o], 0),
            );
            g.nodes.push(b);
            let mut ops = vec![b"BiasAdd".to_vec()];
            ops.extend(act.map(|a| a.as_bytes().to_vec()));
            d = d
                .with_input(TensorRef::new(format!("b{k}"), 0))
                .with_attr("fused_ops", Attr::Strs(ops));
        }
        d.output_quant.insert(
            0,
            QuantParams::per_tensor(0.02 + 0.01 * k as f32, 3 - k as i64),
        );
        g.nodes.push(d);
        g.outputs.push(TensorRef::new(format!("deconv{k}"), 0));
    }
    for (s, hw) in [("up", [8, 7]), ("down", [3, 4])] {
        g.nodes.push(Node::constant(
            format!("size_{s}"),
            Tensor::from_vec(vec![2], &hw),
        ));
        for (op, ac, hp) in [
            ("ResizeBilinear", false, false),
            ("ResizeBilinear", true, false),
            ("ResizeBilinear", false, true),
            ("ResizeNearestNeighbor", false, false),
            ("ResizeNearestNeighbor", true, false),
            ("ResizeNearestNeighbor", false, true),
        ] {
            let name = format!("{op}_{s}_{ac}_{hp}");
            let mut n = Node::new(name.clone(), op)
                .with_input(TensorRef::new("x", 0))
                .with_input(TensorRef::new(format!("size_{s}"), 0))
                .with_attr("T", Attr::Type(DType::I8))
                .with_attr("align_corners", Attr::Bool(ac))
                .with_attr("half_pixel_centers", Attr::Bool(hp));
            n.output_quant.insert(0, in_q.clone());
            g.nodes.push(n);
            g.outputs.push(TensorRef::new(name, 0));
        }
    }
    let dir = tmp_dir("spatial_int8_ops");
    let (_, bytes) = tflite::export(&g).unwrap();
    let case = LiteRtCase::write(&dir, &bytes, &feeds);
    let theirs = case.run(Resolver::Reference).unwrap();
    let fed: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let ours = qpipe::kernels::run_with(&g, &fed, &g.outputs, Arithmetic::Reference).unwrap();
    assert_eq!(ours.len(), theirs.len());
    for ((r, a), b) in g.outputs.iter().zip(&ours).zip(&theirs) {
        assert_eq!(a.dtype(), DType::I8, "{r}");
        assert_eq!(a.shape(), b.shape(), "{r}");
        let (x, y) = (a.to_i64_vec().unwrap(), b.to_i64_vec().unwrap());
        let bad: Vec<(usize, i64, i64)> = x
            .iter()
            .zip(&y)
            .enumerate()
            .filter(|(_, (p, q))| p != q)
            .map(|(k, (p, q))| (k, *p, *q))
            .collect();
        assert!(
            bad.is_empty(),
            "{r}: differs from BUILTIN_REF at (index, qpipe, LiteRT) {bad:?}"
        );
        let distinct: std::collections::BTreeSet<i64> = x.iter().copied().collect();
        assert!(
            distinct.len() > 8,
            "{r}: only {} distinct outputs",
            distinct.len()
        );
    }
}
