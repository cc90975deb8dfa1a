//! The fusion `quantize_int8` applies before quantizing (and `validate` applies to
//! its reference): chains it fuses, chains it must leave alone, and float results
//! that do not change.

mod support;

use qpipe::ir::passes::fuse::fuse;
use qpipe::ir::{Attr, DType, Graph};
use support::graph_builder::{f32t, ints, r, run1, s, G};
use support::numeric::Rng;

fn conv_chain(act: Option<&str>, squeeze: bool) -> Graph {
    let mut b = G::new();
    let mut rng = Rng::new(5);
    b.placeholder("x", DType::F32, Some(&[-1, 1, 9, 3]));
    b.konst("w", f32t(&[1, 2, 3, 4], &rng.vec(24)));
    b.konst("bias", f32t(&[4], &rng.vec(4)));
    b.op(
        "conv",
        "Conv2D",
        &["x", "w"],
        &[
            ("strides", ints(&[1, 1, 1, 1])),
            ("padding", s("VALID")),
            ("data_format", s("NHWC")),
        ],
    );
    let mut last = "conv".to_string();
    if squeeze {
        b.op("sq", "Squeeze", &["conv"], &[("squeeze_dims", ints(&[1]))]);
        last = "sq".into();
    }
    b.op("badd", "BiasAdd", &[&last, "bias"], &[]);
    last = "badd".into();
    if let Some(a) = act {
        b.op("act", a, &[&last], &[]);
        last = "act".into();
    }
    b.op("out", "Identity", &[&last], &[]);
    b.output("out");
    b.g
}

fn x() -> qpipe::ir::Tensor {
    f32t(&[2, 1, 9, 3], &Rng::new(9).vec(54))
}

fn fused_ops(g: &Graph, name: &str) -> Vec<String> {
    match g.node(name).unwrap().attr("fused_ops") {
        Some(Attr::Strs(v)) => v
            .iter()
            .map(|s| String::from_utf8_lossy(s).into())
            .collect(),
        _ => panic!("{name} has no fused_ops"),
    }
}

#[test]
fn conv_bias_and_activation_become_one_node_named_after_the_last() {
    for act in [None, Some("Relu"), Some("Relu6")] {
        let g = conv_chain(act, false);
        let (f, r) = fuse(&g, false).unwrap();
        assert_eq!(r.fused, 1);
        let last = if act.is_some() { "act" } else { "badd" };
        let n = f.node(last).unwrap();
        assert_eq!(n.op, "_FusedConv2D");
        assert_eq!(n.inputs.len(), 3);
        assert_eq!(n.attr_int("num_args").unwrap(), 1);
        assert_eq!(n.attr_str("padding").unwrap(), "VALID");
        let mut want = vec!["BiasAdd".to_string()];
        want.extend(act.map(String::from));
        assert_eq!(fused_ops(&f, last), want);
        assert!(f.node("conv").is_none());
        if last == "act" {
            assert!(f.node("badd").is_none());
        }
        let a = run1(&g, &[("x", x())], "out").to_f32_vec().unwrap();
        let b = run1(&f, &[("x", x())], "out").to_f32_vec().unwrap();
        assert_eq!(a, b, "fusion changed float results");
    }
}

#[test]
fn a_channel_preserving_squeeze_moves_after_the_fused_conv() {
    let g = conv_chain(Some("Relu"), true);
    let (f, r) = fuse(&g, false).unwrap();
    assert_eq!(r.fused, 1);
    assert_eq!(f.node("conv").unwrap().op, "_FusedConv2D");
    assert_eq!(fused_ops(&f, "conv"), vec!["BiasAdd", "Relu"]);
    let sq = f.node("act").unwrap();
    assert_eq!(sq.op, "Squeeze");
    assert_eq!(sq.inputs[0].node, "conv");
    assert!(f.node("badd").is_none() && f.node("sq").is_none());
    let a = run1(&g, &[("x", x())], "out").to_f32_vec().unwrap();
    let b = run1(&f, &[("x", x())], "out").to_f32_vec().unwrap();
    assert_eq!(a, b);
}

#[test]
fn shared_or_output_tensors_stop_the_fusion() {
    // The pre-activation tensor is a graph output: the activation stays separate.
    let mut g = conv_chain(Some("Relu"), false);
    g.outputs.push(r("badd"));
    let (f, _) = fuse(&g, false).unwrap();
    assert_eq!(f.node("badd").unwrap().op, "_FusedConv2D");
    assert_eq!(fused_ops(&f, "badd"), vec!["BiasAdd"]);
    assert_eq!(f.node("act").unwrap().op, "Relu");
    // The convolution output has a second reader: nothing fuses.
    let mut g = conv_chain(None, false);
    let mut extra = qpipe::ir::Node::new("other", "Relu").with_input(r("conv"));
    extra.attrs.insert("T".into(), Attr::Type(DType::F32));
    g.nodes.push(extra);
    g.outputs.push(r("other"));
    let (f, rep) = fuse(&g, false).unwrap();
    assert_eq!(rep.fused, 0);
    assert_eq!(f.node("conv").unwrap().op, "Conv2D");
}

#[test]
fn a_matmul_without_bias_gets_a_zero_one_when_asked() {
    let mut b = G::new();
    let mut rng = Rng::new(2);
    b.placeholder("x", DType::F32, Some(&[-1, 5]));
    b.konst("w", f32t(&[5, 3], &rng.vec(15)));
    b.op(
        "mm",
        "MatMul",
        &["x", "w"],
        &[("transpose_b", Attr::Bool(false))],
    );
    b.output("mm");
    let (f, r0) = fuse(&b.g, false).unwrap();
    assert_eq!(r0.fused, 0);
    assert_eq!(f.node("mm").unwrap().op, "MatMul");
    let (f, r1) = fuse(&b.g, true).unwrap();
    assert_eq!((r1.fused, r1.zero_biases), (1, 1));
    let n = f.node("mm").unwrap();
    assert_eq!(n.op, "_FusedMatMul");
    let bias = f.node(&n.inputs[2].node).unwrap().const_value().unwrap();
    assert_eq!(bias.to_f32_vec().unwrap(), vec![0.0; 3]);
    let xv = f32t(&[2, 5], &rng.vec(10));
    assert_eq!(
        run1(&b.g, &[("x", xv.clone())], "mm").to_f32_vec().unwrap(),
        run1(&f, &[("x", xv)], "mm").to_f32_vec().unwrap()
    );
}

#[test]
fn a_biasless_conv_fuses_its_relu_when_it_gets_a_zero_bias() {
    for act in ["Relu", "Relu6"] {
        let mut b = G::new();
        let mut rng = Rng::new(3);
        b.placeholder("x", DType::F32, Some(&[-1, 1, 9, 3]));
        b.konst("w", f32t(&[1, 2, 3, 4], &rng.vec(24)));
        b.op(
            "conv",
            "Conv2D",
            &["x", "w"],
            &[
                ("strides", ints(&[1, 1, 1, 1])),
                ("padding", s("VALID")),
                ("data_format", s("NHWC")),
            ],
        );
        b.op("act", act, &["conv"], &[]);
        b.output("act");
        // Without a zero bias nothing fuses; with one, the activation joins it.
        let (f, r0) = fuse(&b.g, false).unwrap();
        assert_eq!(r0.fused, 0);
        assert_eq!(f.node("act").unwrap().op, act);
        let (f, r1) = fuse(&b.g, true).unwrap();
        assert_eq!((r1.fused, r1.zero_biases), (1, 1));
        assert_eq!(f.node("act").unwrap().op, "_FusedConv2D");
        assert_eq!(fused_ops(&f, "act"), vec!["BiasAdd", act]);
        assert!(f.node("conv").is_none());
        let xv = x();
        assert_eq!(
            run1(&b.g, &[("x", xv.clone())], "act")
                .to_f32_vec()
                .unwrap(),
            run1(&f, &[("x", xv)], "act").to_f32_vec().unwrap()
        );
    }
}

/// `conv2d_transpose` as TF1 writes it: the output shape packs the input's run-time
/// batch (`tf.stack([tf.shape(x)[0], ...])`), then a bias add and `act`.
fn transpose_conv_chain(act: Option<&str>) -> Graph {
    use support::graph_builder::i32t;
    let mut b = G::new();
    let mut rng = Rng::new(14);
    b.placeholder("x", DType::F32, Some(&[-1, 4, 4, 3]));
    b.konst("w", f32t(&[3, 3, 5, 3], &rng.vec(135)));
    b.konst("bias", f32t(&[5], &rng.vec(5)));
    b.op(
        "shape",
        "Shape",
        &["x"],
        &[("out_type", Attr::Type(DType::I32))],
    );
    b.konst("begin", i32t(&[1], &[0]));
    b.konst("end", i32t(&[1], &[1]));
    b.konst("step", i32t(&[1], &[1]));
    b.op(
        "n",
        "StridedSlice",
        &["shape", "begin", "end", "step"],
        &[
            ("Index", Attr::Type(DType::I32)),
            ("shrink_axis_mask", Attr::Int(1)),
        ],
    );
    for (k, v) in [("h", 8), ("w_", 8), ("c", 5)] {
        b.konst(k, i32t(&[], &[v]));
    }
    b.op(
        "os",
        "Pack",
        &["n", "h", "w_", "c"],
        &[("N", Attr::Int(4)), ("axis", Attr::Int(0))],
    );
    b.op(
        "deconv",
        "Conv2DBackpropInput",
        &["os", "w", "x"],
        &[("strides", ints(&[1, 2, 2, 1])), ("padding", s("SAME"))],
    );
    b.op("badd", "BiasAdd", &["deconv", "bias"], &[]);
    let mut last = "badd".to_string();
    if let Some(a) = act {
        b.op("act", a, &["badd"], &[]);
        last = "act".into();
    }
    b.op("out", "Identity", &[&last], &[]);
    b.output("out");
    b.g
}

#[test]
fn transposed_conv_bias_and_activation_become_one_node_that_keeps_its_op() {
    let x = f32t(&[2, 4, 4, 3], &Rng::new(3).vec(96));
    for act in [None, Some("Relu"), Some("Relu6")] {
        let g = transpose_conv_chain(act);
        let (f, r) = fuse(&g, false).unwrap();
        assert_eq!(r.fused, 1, "{act:?}");
        let last = if act.is_some() { "act" } else { "badd" };
        let n = f.node(last).unwrap();
        assert_eq!(n.op, "Conv2DBackpropInput");
        assert_eq!(n.inputs.len(), 4);
        assert_eq!(n.inputs[3].node, "bias");
        let mut want = vec!["BiasAdd".to_string()];
        want.extend(act.map(String::from));
        assert_eq!(fused_ops(&f, last), want);
        assert!(f.node("deconv").is_none());
        if last == "act" {
            assert!(f.node("badd").is_none());
        }
        let a = run1(&g, &[("x", x.clone())], "out").to_f32_vec().unwrap();
        let b = run1(&f, &[("x", x.clone())], "out").to_f32_vec().unwrap();
        assert_eq!(a, b, "fusion changed float results");
        assert_eq!(a.len(), 2 * 8 * 8 * 5);
    }
}

/// LiteRT sizes TRANSPOSE_CONV's output from a constant shape once, so a file whose
/// output shape was folded at batch 1 is written as a batch-1 file (as the
/// converter's is) instead of declaring a batch it cannot run; the fused bias and
/// activation are TRANSPOSE_CONV's own.
#[test]
fn a_run_time_batch_transposed_conv_exports_as_a_batch_one_file() {
    use qpipe::formats::tflite;
    let (f, _) = fuse(&transpose_conv_chain(Some("Relu")), false).unwrap();
    let (_, bytes) = tflite::export(&f).unwrap();
    let m = tflite::reader::read(&bytes, "model").unwrap();
    let names: Vec<&str> = m.operators.iter().map(|o| o.name).collect();
    assert_eq!(names, ["TRANSPOSE_CONV"]);
    assert_eq!(m.operators[0].inputs.len(), 4);
    let input = &m.tensors[m.inputs[0] as usize];
    assert_eq!(input.shape, [1, 4, 4, 3]);
    assert_eq!(input.shape_signature, None);
    assert!(m.tensors.iter().all(|t| t.shape_signature.is_none()));
    // Without the transposed convolution the batch stays dynamic.
    let g = conv_chain(None, false);
    let (_, bytes) = tflite::export(&g).unwrap();
    let m = tflite::reader::read(&bytes, "model").unwrap();
    let input = &m.tensors[m.inputs[0] as usize];
    assert_eq!(input.shape_signature, Some(vec![-1, 1, 9, 3]));
}
