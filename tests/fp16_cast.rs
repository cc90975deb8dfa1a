//! fp16_cast: which constants are cast, how they are rounded, and that the
//! interpreter computes with the rounded weights in float32, as LiteRT does.

mod support;

use half::f16;
use qpipe::ir::{DType, Graph, Tensor};
use qpipe::stages::fp16_cast::cast_fp16;
use support::fixtures::{fixture_npy, frozen_graph, MODELS};
use support::graph_builder::{f32t, i32t, run1, G};
use support::numeric::{max_abs_diff, Rng};

fn dense() -> Graph {
    let mut b = G::new();
    b.placeholder("x", DType::F32, Some(&[-1, 3]));
    let w: Vec<f32> = Rng::new(4).vec(6).iter().map(|v| v * 3.0).collect();
    b.konst("w", f32t(&[3, 2], &w));
    b.op("mm", "MatMul", &["x", "w"], &[]);
    b.konst("bias", f32t(&[2], &[0.1, -0.3]));
    b.op("out", "BiasAdd", &["mm", "bias"], &[]);
    b.konst("unused_axis", i32t(&[], &[0]));
    b.output("out");
    b.g
}

#[test]
fn casts_weights_behind_dequantize_and_computes_in_f32() {
    let g = dense();
    let (h, rep) = cast_fp16(&g, 1, &[]).unwrap();
    assert_eq!((rep.tensors_cast, rep.tensors_kept_float), (2, 0));
    assert_eq!((rep.bytes_before, rep.bytes_after), (32, 16));
    let w = h.node("w").unwrap();
    assert_eq!(w.const_value().unwrap().dtype(), DType::F16);
    assert_eq!(w.attr_type("dtype").unwrap(), DType::F16);
    let dq = h.node("w/dequantize").unwrap();
    assert_eq!(dq.op, "Dequantize");
    assert_eq!(
        (dq.attr_type("T").unwrap(), dq.attr_type("dtype").unwrap()),
        (DType::F16, DType::F32)
    );
    assert_eq!(h.node("mm").unwrap().inputs[1].node, "w/dequantize");
    assert_eq!(
        h.node("unused_axis")
            .unwrap()
            .const_value()
            .unwrap()
            .dtype(),
        DType::I32
    );

    let x: Vec<f32> = Rng::new(8).vec(12);
    let got = run1(&h, &[("x", f32t(&[4, 3], &x))], "out")
        .to_f32_vec()
        .unwrap();
    let round = |t: &Tensor| -> Vec<f32> {
        t.values::<f32>()
            .unwrap()
            .iter()
            .map(|&v| f16::from_f32(v).to_f32())
            .collect()
    };
    let wr = round(g.node("w").unwrap().const_value().unwrap());
    let br = round(g.node("bias").unwrap().const_value().unwrap());
    let mut want = Vec::new();
    for i in 0..4 {
        for j in 0..2 {
            let mut acc = 0f32;
            for k in 0..3 {
                acc = x[i * 3 + k].mul_add(wr[k * 2 + j], acc);
            }
            want.push(acc + br[j]);
        }
    }
    assert_eq!(
        got, want,
        "float32 arithmetic on float16-rounded weights, bit for bit"
    );
    let float = run1(&g, &[("x", f32t(&[4, 3], &x))], "out")
        .to_f32_vec()
        .unwrap();
    let d = max_abs_diff(&got, &float);
    assert!(d > 0.0 && d < 2e-3, "{d}");
}

#[test]
fn rounds_to_nearest_even() {
    let mut b = G::new();
    let vals = [
        1.0 + 2f32.powi(-11),
        1.0 + 3.0 * 2f32.powi(-11),
        65504.0,
        -2.5e-8,
    ];
    b.konst("c", f32t(&[4], &vals));
    b.op("out", "Neg", &["c"], &[]);
    b.output("out");
    let (h, _) = cast_fp16(&b.g, 1, &[]).unwrap();
    let t = h.node("c").unwrap().const_value().unwrap();
    let bits: Vec<u16> = t
        .values::<f16>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect();
    assert_eq!(bits, vec![0x3c00, 0x3c02, 0x7bff, 0x8000]);
}

#[test]
fn min_elements_and_keep_float() {
    let g = dense();
    let (h, rep) = cast_fp16(&g, 3, &[]).unwrap();
    assert_eq!((rep.tensors_cast, rep.tensors_kept_float), (1, 1));
    assert_eq!(
        h.node("bias").unwrap().const_value().unwrap().dtype(),
        DType::F32
    );
    let (h, rep) = cast_fp16(&g, 1, &["w".to_string()]).unwrap();
    assert_eq!((rep.tensors_cast, rep.tensors_kept_float), (1, 1));
    assert_eq!(
        h.node("w").unwrap().const_value().unwrap().dtype(),
        DType::F32
    );
    assert!(h.node("w/dequantize").is_none());
    assert!(h.node("bias/dequantize").is_some());
    let e = cast_fp16(&g, 1, &["nope".to_string()]).unwrap_err();
    assert_eq!(e.exit_code(), 2);
    assert!(
        e.to_string()
            .contains("keep_float: 'nope' is not a constant node"),
        "{e}"
    );
    let e = cast_fp16(&g, 1, &["unused_axis".to_string()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("'unused_axis' is a int32 constant"), "{e}");
}

#[test]
fn overflow_is_an_error_naming_the_constant() {
    let mut b = G::new();
    b.konst("big", f32t(&[2], &[1.0, 1e5]));
    b.op("out", "Neg", &["big"], &[]);
    b.output("out");
    let e = cast_fp16(&b.g, 1, &[]).unwrap_err().to_string();
    assert!(
        e.contains("constant 'big': element 1 (100000) overflows float16"),
        "{e}"
    );
    assert!(cast_fp16(&b.g, 1, &["big".to_string()]).is_ok());
}

/// A constant large enough to be cast in parallel blocks: every element rounds as
/// `f16::from_f32` does, and of several overflows the first is the one named.
#[test]
fn large_constants_cast_elementwise_and_name_the_first_overflow() {
    let n = 100_000usize;
    let vals: Vec<f32> = (0..n)
        .map(|i| ((i as f32) * 0.7311).sin() * 60_000.0 + (i % 7) as f32 * 1e-3)
        .collect();
    let mut b = G::new();
    b.konst("w", f32t(&[n], &vals));
    b.op("out", "Neg", &["w"], &[]);
    b.output("out");
    let (g, _) = cast_fp16(&b.g, 1, &[]).unwrap();
    let w = g.node("w").unwrap().const_value().unwrap();
    assert_eq!(w.dtype(), DType::F16);
    let want: Vec<f16> = vals.iter().map(|&v| f16::from_f32(v)).collect();
    assert_eq!(w.values::<f16>().unwrap(), want);

    let mut bad = vals.clone();
    bad[90_001] = 1e6;
    bad[70_003] = -7e4;
    bad[99_999] = 3e5;
    let mut b = G::new();
    b.konst("w", f32t(&[n], &bad));
    b.op("out", "Neg", &["w"], &[]);
    b.output("out");
    let e = cast_fp16(&b.g, 1, &[]).unwrap_err().to_string();
    assert!(
        e.contains("constant 'w': element 70003 (-70000) overflows float16"),
        "{e}"
    );
}

#[test]
fn stage_reports_metrics() {
    let factory = qpipe::stages::registry::factory("fp16_cast").unwrap();
    let table =
        qpipe::stages::ConfigTable::parse("input = \"strip\"\nmin_elements = 4\nkeep_float = []")
            .unwrap();
    let stage = (factory.build)(&table).unwrap();
    assert_eq!(
        stage.role(),
        qpipe::stages::Role::Model {
            label: "fp16".into(),
            float: false
        }
    );
    assert_eq!(stage.config()["min_elements"], 4);
    let table = qpipe::stages::ConfigTable::parse("input = \"strip\"").unwrap();
    assert_eq!((factory.build)(&table).unwrap().config()["min_elements"], 1);
}

#[test]
fn fp16_fixture_models_stay_within_2e_3() {
    for m in MODELS {
        let g = frozen_graph(m);
        let (s, _) =
            qpipe::stages::strip_training::strip(&g, &g.inputs, &g.outputs, &Default::default())
                .unwrap();
        let (h, rep) = cast_fp16(&s, 1, &[]).unwrap();
        assert!(
            rep.tensors_cast > 0 && rep.bytes_after * 2 == rep.bytes_before,
            "{m}: {rep:?}"
        );
        let x = fixture_npy(m, "eval_x.npy");
        let input = g.inputs[0].clone();
        let float = qpipe::kernels::run(&s, &[(input.as_str(), x.clone())], &s.outputs).unwrap();
        let half = qpipe::kernels::run(&h, &[(input.as_str(), x)], &h.outputs).unwrap();
        let (f, hv) = (
            float[0].to_f32_vec().unwrap(),
            half[0].to_f32_vec().unwrap(),
        );
        let d = max_abs_diff(&f, &hv);
        assert!(
            d > 0.0 && d <= 2e-3,
            "{m}: fp16 differs from float32 by {d}"
        );
        let classes = float[0].shape()[1];
        let n = f.len() / classes;
        let top = |v: &[f32]| {
            let v: Vec<f64> = v.iter().map(|&x| x as f64).collect();
            qpipe::kernels::dataset::argmax_rows(&v, n, classes)
        };
        let agree = top(&f)
            .iter()
            .zip(top(&hv))
            .filter(|(a, b)| **a == *b)
            .count();
        assert!(
            agree as f64 >= 0.999 * n as f64,
            "{m}: top-1 agreement {agree}/{n}"
        );
        eprintln!("{m}: fp16 max abs diff {d:e}, top-1 agreement {agree}/{n}");
    }
}

#[test]
fn exports_as_a_graphdef_with_tensorflow_casts_that_computes_the_same() {
    let g = dense();
    let (h, _) = cast_fp16(&g, 1, &[]).unwrap();
    let bytes = qpipe::formats::tf::export_graphdef(&h).unwrap();
    let gd = qpipe::formats::tf::graph_def::decode_graph_def(&bytes).unwrap();
    let back = qpipe::formats::tf::graph_def::graph_from_proto(&gd).unwrap();
    let cast = back.node("w/dequantize").unwrap();
    assert_eq!(cast.op, "Cast");
    assert_eq!(
        (
            cast.attr_type("SrcT").unwrap(),
            cast.attr_type("DstT").unwrap()
        ),
        (DType::F16, DType::F32)
    );
    assert!(back.nodes.iter().all(|n| n.op != "Dequantize"));
    let x: Vec<f32> = Rng::new(9).vec(12);
    let feed = [("x", f32t(&[4, 3], &x))];
    assert_eq!(
        run1(&back, &feed, "out").to_f32_vec().unwrap(),
        run1(&h, &feed, "out").to_f32_vec().unwrap()
    );
}
