//! Issue 14's graph rewrites in `strip_training` (the converter's): each keeps the
//! float function. On the family fixtures, the stripped graph's outputs are checked
//! against TensorFlow's (`tf_eval_out.npy`, computed by TF on the training graph);
//! on small synthetic graphs, against the graph before the rewrite, and the cases a
//! rewrite must leave alone are checked to stay.

mod support;

use qpipe::ir::{Attr, DType, Graph, Tensor};
use qpipe::stages::strip_training::{strip, StripOptions, StripReport};
use support::fixtures::{fixture_dir, fixture_npy, input_name, model_json};
use support::graph_builder::{f32t, i32t, ints, run1, s, G};
use support::numeric::{max_abs_diff, Rng};

fn strip_all(g: &Graph) -> (Graph, StripReport) {
    strip(g, &g.inputs, &g.outputs, &StripOptions::default()).unwrap()
}

/// A family fixture's `tf_frozen.pb` with its declared inputs and outputs.
fn frozen_graph(model: &str) -> Graph {
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
        .map(|o| qpipe::ir::TensorRef::new(o["name"].as_str().unwrap(), 0))
        .collect();
    g
}

fn ops(g: &Graph) -> Vec<String> {
    g.nodes.iter().map(|n| n.op.clone()).collect()
}

/// A fixture, the ops its rewrites remove, and what the strip report must say.
type Case = (
    &'static str,
    &'static [&'static str],
    fn(&StripReport) -> bool,
);

/// The stripped fixture computes TF's outputs (first 200 eval rows) within
/// 1e-5 · max(1, max|TF|), and lost the ops its rewrites remove.
#[test]
fn family_fixtures_keep_tf_outputs_through_the_rewrites() {
    let cases: &[Case] = &[
        ("fam_mlp_bn", &["Reshape", "Mul", "AddV2"], |r| {
            r.affine_folded_forward == 2 && r.affine_moved_before_reshape == 2
        }),
        ("fam_atrous", &["SpaceToBatchND", "BatchToSpaceND"], |r| {
            r.dilated_convolutions == 2
        }),
        ("fam_mobilenet_v2", &["Pad"], |r| r.pads_folded == 1),
        // Transposed convolution and every resize mode, against TF.
        ("fam_decoders", &[], |_| true),
        ("fam_mobilenet_v3", &["RealDiv"], |r| {
            r.divisions_to_multiplies == 3 && r.hard_swishes_fused == 2
        }),
    ];
    for (name, gone, report_ok) in cases {
        let g = frozen_graph(name);
        let (s, rep) = strip_all(&g);
        assert!(report_ok(&rep), "{name}: {:?}", rep);
        let left = ops(&s);
        for op in *gone {
            assert!(
                !left.contains(&op.to_string()),
                "{name}: {op} is still there: {left:?}"
            );
        }
        let x = fixture_npy(name, "eval_input_x.npy");
        let tf = fixture_npy(name, "tf_eval_out.npy");
        let n = 200;
        let rows = |t: &Tensor| {
            let mut shape = t.shape().to_vec();
            let per: usize = shape[1..].iter().product();
            shape[0] = n;
            Tensor::from_vec(shape, &t.to_f32_vec().unwrap()[..n * per])
        };
        let out = run1(
            &s,
            &[(input_name(name).as_str(), rows(&x))],
            &s.outputs[0].node,
        );
        let want = rows(&tf).to_f32_vec().unwrap();
        let got = out.to_f32_vec().unwrap();
        let tol = 1e-5 * want.iter().fold(1f32, |m, v| m.max(v.abs()));
        let d = max_abs_diff(&got, &want);
        assert!(d <= tol, "{name}: max |qpipe - TF| = {d} > {tol}");
    }
}

fn conv_attrs(pad: &str, stride: i64) -> Vec<(&str, Attr)> {
    vec![
        ("strides", ints(&[1, stride, stride, 1])),
        ("padding", s(pad)),
        ("data_format", s("NHWC")),
    ]
}

/// relu(x) → Mul(scale) → Add(shift) → layer: folds into a matrix product and a VALID
/// (depthwise) convolution, not into a SAME one.
#[test]
fn an_affine_after_an_activation_folds_into_the_next_layer_only_where_exact() {
    let mut rng = Rng::new(7);
    for (layer, pad, folds) in [
        ("MatMul", "VALID", true),
        ("Conv2D", "VALID", true),
        ("DepthwiseConv2dNative", "VALID", true),
        ("Conv2D", "SAME", false),
    ] {
        let mut b = G::new();
        let c = 3;
        let (xshape, feed_shape): (Vec<i64>, Vec<usize>) = if layer == "MatMul" {
            (vec![-1, c], vec![4, c as usize])
        } else {
            (vec![-1, 5, 5, c], vec![2, 5, 5, c as usize])
        };
        b.placeholder("x", DType::F32, Some(&xshape));
        b.op("relu", "Relu", &["x"], &[]);
        b.konst("scale", f32t(&[3], &[0.5, -1.5, 2.0]));
        b.konst("shift", f32t(&[3], &[0.25, 1.0, -0.75]));
        b.op("mul", "Mul", &["relu", "scale"], &[]);
        b.op("add", "AddV2", &["mul", "shift"], &[]);
        let attrs = conv_attrs(pad, 1);
        match layer {
            "MatMul" => {
                b.konst("w", f32t(&[3, 2], &rng.vec(6)));
                b.op("layer", "MatMul", &["add", "w"], &[]);
            }
            "Conv2D" => {
                b.konst("w", f32t(&[2, 2, 3, 4], &rng.vec(48)));
                b.op("layer", "Conv2D", &["add", "w"], &attrs);
            }
            _ => {
                b.konst("w", f32t(&[2, 2, 3, 2], &rng.vec(24)));
                b.op("layer", layer, &["add", "w"], &attrs);
            }
        }
        b.output("layer");
        let (st, rep) = strip_all(&b.g);
        let left = ops(&st);
        assert_eq!(
            rep.affine_folded_forward,
            if folds { 2 } else { 0 },
            "{layer} {pad}"
        );
        assert_eq!(
            left.contains(&"Mul".to_string()),
            !folds,
            "{layer} {pad}: {left:?}"
        );
        let n: usize = feed_shape.iter().product();
        let xv = f32t(&feed_shape, &rng.vec(n));
        let a = run1(&b.g, &[("x", xv.clone())], "layer")
            .to_f32_vec()
            .unwrap();
        let o = run1(&st, &[("x", xv)], "layer").to_f32_vec().unwrap();
        assert!(max_abs_diff(&a, &o) < 1e-5, "{layer} {pad}: {a:?} vs {o:?}");
    }
}

/// A zero Pad before a VALID convolution folds into SAME exactly when the pads are SAME's.
#[test]
fn a_pad_folds_into_same_padding_only_when_equal() {
    let mut rng = Rng::new(3);
    // (input size, stride, pads (before, after), folds)
    for (size, stride, pads, folds) in [
        (8i64, 2i64, (0, 1), true),
        (7, 1, (1, 1), true),
        (8, 2, (1, 1), false),
        (7, 1, (0, 2), false),
    ] {
        let mut b = G::new();
        b.placeholder("x", DType::F32, Some(&[-1, size, size, 2]));
        b.konst(
            "p",
            i32t(&[4, 2], &[0, 0, pads.0, pads.1, pads.0, pads.1, 0, 0]),
        );
        b.op("pad", "Pad", &["x", "p"], &[]);
        b.konst("w", f32t(&[3, 3, 2, 3], &rng.vec(54)));
        b.op(
            "conv",
            "Conv2D",
            &["pad", "w"],
            &conv_attrs("VALID", stride),
        );
        b.output("conv");
        let (st, rep) = strip_all(&b.g);
        assert_eq!(
            rep.pads_folded,
            usize::from(folds),
            "{size} {stride} {pads:?}"
        );
        assert_eq!(ops(&st).contains(&"Pad".to_string()), !folds);
        let u = size as usize;
        let xv = f32t(&[2, u, u, 2], &rng.vec(2 * u * u * 2));
        let a = run1(&b.g, &[("x", xv.clone())], "conv");
        let o = run1(&st, &[("x", xv)], "conv");
        assert_eq!(a.shape(), o.shape());
        let d = max_abs_diff(&a.to_f32_vec().unwrap(), &o.to_f32_vec().unwrap());
        assert!(d < 1e-5, "{size} {stride} {pads:?}: {d}");
    }
}

/// Both spellings of hard swish fuse into one HardSwish; a division by a constant
/// becomes a multiply; a near-miss (x + 2) stays as it is.
#[test]
fn hard_swish_fuses_in_both_spellings_and_divisions_become_multiplies() {
    let mut rng = Rng::new(11);
    for (form, add_c, fuses) in [(0, 3.0f32, true), (1, 3.0, true), (0, 2.0, false)] {
        let mut b = G::new();
        b.placeholder("x", DType::F32, Some(&[-1, 8]));
        b.konst("three", Tensor::scalar(add_c));
        b.konst("six", Tensor::scalar(6.0f32));
        b.op("add", "AddV2", &["x", "three"], &[]);
        b.op("relu6", "Relu6", &["add"], &[]);
        if form == 0 {
            b.op("mul", "Mul", &["x", "relu6"], &[]);
            b.op("out", "RealDiv", &["mul", "six"], &[]);
        } else {
            b.op("hsig", "RealDiv", &["relu6", "six"], &[]);
            b.op("out", "Mul", &["x", "hsig"], &[]);
        }
        b.output("out");
        let (st, rep) = strip_all(&b.g);
        assert_eq!(rep.divisions_to_multiplies, 1, "form {form}");
        assert_eq!(
            rep.hard_swishes_fused,
            usize::from(fuses),
            "form {form} +{add_c}"
        );
        let left = ops(&st);
        assert!(!left.contains(&"RealDiv".to_string()), "{left:?}");
        assert_eq!(st.node("out").unwrap().op == "HardSwish", fuses, "{left:?}");
        let xv = f32t(
            &[4, 8],
            &rng.vec(32).iter().map(|v| v * 5.0).collect::<Vec<_>>(),
        );
        let a = run1(&b.g, &[("x", xv.clone())], "out")
            .to_f32_vec()
            .unwrap();
        let o = run1(&st, &[("x", xv)], "out").to_f32_vec().unwrap();
        assert!(max_abs_diff(&a, &o) <= 1e-6, "form {form}: {a:?} vs {o:?}");
    }
}

/// MatMul → Reshape 4-D → per-channel Mul/Add → Reshape back folds into the MatMul,
/// and the reshapes that cancel go.
#[test]
fn an_affine_on_a_reshaped_matmul_folds_into_it() {
    let mut rng = Rng::new(5);
    let mut b = G::new();
    b.placeholder("x", DType::F32, Some(&[-1, 4]));
    b.konst("w", f32t(&[4, 3], &rng.vec(12)));
    b.op("mm", "MatMul", &["x", "w"], &[]);
    b.konst("s4", i32t(&[4], &[-1, 1, 1, 3]));
    b.op("r4", "Reshape", &["mm", "s4"], &[]);
    b.konst("scale", f32t(&[3], &[2.0, -0.5, 1.5]));
    b.konst("shift", f32t(&[3], &[0.1, 0.2, -0.3]));
    b.op("mul", "Mul", &["r4", "scale"], &[]);
    b.op("add", "AddV2", &["mul", "shift"], &[]);
    b.konst("s2", i32t(&[2], &[-1, 3]));
    b.op("r2", "Reshape", &["add", "s2"], &[]);
    b.op("out", "Relu", &["r2"], &[]);
    b.output("out");
    let (st, rep) = strip_all(&b.g);
    assert_eq!(rep.affine_moved_before_reshape, 2);
    assert_eq!(rep.reshapes_removed, 2);
    let mut left = ops(&st);
    left.retain(|o| o != "Const" && o != "Placeholder");
    left.sort();
    assert_eq!(left, ["BiasAdd", "MatMul", "Relu"]);
    let xv = f32t(&[5, 4], &rng.vec(20));
    let a = run1(&b.g, &[("x", xv.clone())], "out")
        .to_f32_vec()
        .unwrap();
    let o = run1(&st, &[("x", xv)], "out").to_f32_vec().unwrap();
    assert!(max_abs_diff(&a, &o) < 1e-5);
}
