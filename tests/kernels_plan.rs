//! Execution plans (order, feeds, errors, deep graphs) and the batched data-set runner.

mod support;

use std::collections::BTreeMap;

use qpipe::ir::{Attr, DType, Graph, Node, Tensor};
use qpipe::kernels::{evaluate, EvalOptions, Plan};
use qpipe::spec::DatasetSpec;
use support::graph_builder::{f32t, i32t, r, run1, G};
use support::numeric::Rng;
use support::tmp_dir;

#[test]
fn order_is_topological_regardless_of_node_order() {
    let mut b = G::new();
    b.op("y", "Relu", &["s"], &[]);
    b.op("s", "Sub", &["x", "one"], &[]);
    b.konst("one", f32t(&[], &[1.0]));
    b.placeholder("x", DType::F32, Some(&[-1]));
    let y = run1(&b.g, &[("x", f32t(&[3], &[0., 1., 5.]))], "y");
    assert_eq!(y.to_f32_vec().unwrap(), vec![0., 0., 4.]);
}

#[test]
fn unneeded_nodes_are_not_compiled_and_control_edges_are_ignored() {
    let mut b = G::new();
    b.placeholder("x", DType::F32, None);
    b.op("unsupported", "Frobnicate", &["x"], &[]);
    b.op("assert", "Assert", &["x"], &[]);
    b.op("y", "Neg", &["x"], &[]);
    b.g.nodes
        .last_mut()
        .unwrap()
        .control_inputs
        .push("assert".into());
    let y = run1(&b.g, &[("x", f32t(&[1], &[2.]))], "y");
    assert_eq!(y.to_f32_vec().unwrap(), vec![-2.]);
    let e = Plan::compile(&b.g, &["x"], &[r("unsupported")])
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "node 'unsupported' (Frobnicate): the interpreter has no kernel for this op"
    );
}

#[test]
fn feed_errors_name_the_input() {
    let mut b = G::new();
    b.placeholder("x", DType::F32, Some(&[-1, 2]));
    b.op("y", "Relu", &["x"], &[]);
    let e = qpipe::kernels::run(&b.g, &[("x", i32t(&[1, 2], &[1, 2]))], &[r("y")])
        .unwrap_err()
        .to_string();
    assert_eq!(e, "input 'x' is float32, the fed tensor is int32");
    let e = qpipe::kernels::run(&b.g, &[("x", f32t(&[1, 3], &[1., 2., 3.]))], &[r("y")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("input 'x' has shape [-1, 2], the fed tensor has [1, 3]"),
        "{e}"
    );
    let e = qpipe::kernels::run(&b.g, &[], &[r("y")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("node 'x' (Placeholder): placeholder is needed but was not fed"),
        "{e}"
    );
    let e = qpipe::kernels::run(&b.g, &[("nope", f32t(&[1], &[1.]))], &[r("y")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("feed 'nope' is not a node of the graph"), "{e}");
    let e = qpipe::kernels::run(&b.g, &[], &[r("missing")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("fetch 'missing' is not a node"), "{e}");
}

#[test]
fn placeholder_with_default_runs_its_default_unless_fed() {
    let mut b = G::new();
    b.konst("d", f32t(&[], &[1.0]));
    b.op(
        "keep",
        "PlaceholderWithDefault",
        &["d"],
        &[("dtype", Attr::Type(DType::F32))],
    );
    b.op("y", "Mul", &["keep", "keep"], &[]);
    assert_eq!(run1(&b.g, &[], "y").to_f32_vec().unwrap(), vec![1.0]);
    assert_eq!(
        run1(&b.g, &[("keep", f32t(&[], &[3.0]))], "y")
            .to_f32_vec()
            .unwrap(),
        vec![9.0]
    );
}

#[test]
fn fetching_an_intermediate_keeps_it_alive() {
    let mut b = G::new();
    b.placeholder("x", DType::F32, None);
    b.op("a", "Relu", &["x"], &[]);
    b.op("b", "Neg", &["a"], &[]);
    b.op("c", "Add", &["a", "b"], &[]);
    let out = qpipe::kernels::run(
        &b.g,
        &[("x", f32t(&[2], &[-1., 2.]))],
        &[r("a"), r("c"), r("a")],
    )
    .unwrap();
    assert_eq!(out[0].to_f32_vec().unwrap(), vec![0., 2.]);
    assert_eq!(out[1].to_f32_vec().unwrap(), vec![0., 0.]);
    assert_eq!(out[2], out[0]);
}

#[test]
fn deep_chains_run_iteratively() {
    let mut g = Graph::default();
    g.nodes
        .push(Node::new("x", "Placeholder").with_attr("dtype", Attr::Type(DType::F32)));
    let n = 100_000;
    for i in 0..n {
        let prev = if i == 0 {
            "x".to_string()
        } else {
            format!("n{}", i - 1)
        };
        g.nodes
            .push(Node::new(format!("n{i}"), "Identity").with_input(r(&prev)));
    }
    g.nodes.reverse();
    let out = qpipe::kernels::run(
        &g,
        &[("x", f32t(&[1], &[4.0]))],
        &[r(&format!("n{}", n - 1))],
    )
    .unwrap();
    assert_eq!(out[0].to_f32_vec().unwrap(), vec![4.0]);
}

#[test]
fn cycles_are_reported() {
    let mut b = G::new();
    b.op("a", "Neg", &["b"], &[]);
    b.op("b", "Neg", &["a"], &[]);
    let e = qpipe::kernels::run(&b.g, &[], &[r("a")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("cycle through node"), "{e}");
}

/// x [n, 3] → MatMul W [3, 2] → Softmax; class 1 wins when x0 > x1.
fn classifier() -> Graph {
    let mut b = G::new();
    b.placeholder("x", DType::F32, Some(&[-1, 3]));
    b.konst("w", f32t(&[3, 2], &[-1., 1., 1., -1., 0., 0.]));
    b.op("logits", "MatMul", &["x", "w"], &[]);
    b.op("probs", "Softmax", &["logits"], &[]);
    b.output("probs");
    b.g
}

#[test]
fn evaluate_streams_batches_and_writes_outputs() {
    let dir = tmp_dir("eval");
    let mut rng = Rng::new(3);
    let n = 23;
    let x: Vec<f32> = rng.vec(n * 3);
    let want_cls: Vec<i64> = (0..n).map(|i| (x[i * 3] > x[i * 3 + 1]) as i64).collect();
    let mut labels = want_cls.clone();
    labels[0] = 1 - labels[0];
    labels[5] = 1 - labels[5];
    // Inputs as float64 (converted to the placeholder's float32), labels as int64 class ids.
    let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    qpipe::npy::write(&dir.join("x.npy"), &Tensor::from_vec(vec![n, 3], &x64)).unwrap();
    qpipe::npy::write(&dir.join("y.npy"), &Tensor::from_vec(vec![n], &labels)).unwrap();
    let spec = DatasetSpec {
        tensors: BTreeMap::from([("x".to_string(), dir.join("x.npy"))]),
        labels: Some(dir.join("y.npy")),
    };
    let g = classifier();
    let whole = run1(&g, &[("x", f32t(&[n, 3], &x))], "probs");
    for batch in [1, 4, 7, 64] {
        let out = dir.join(format!("out{batch}.npy"));
        let rep = evaluate(
            &g,
            &spec,
            &EvalOptions {
                batch_size: batch,
                samples: None,
                outputs_npy: Some(out.clone()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(rep.samples, n);
        assert_eq!(rep.correct, n - 2, "batch {batch}");
        assert_eq!(rep.accuracy, Some((n - 2) as f64 / n as f64));
        assert_eq!(rep.written, vec![out.clone()]);
        assert_eq!(qpipe::npy::read(&out).unwrap(), whole, "batch {batch}");
    }
    let rep = evaluate(
        &g,
        &spec,
        &EvalOptions {
            batch_size: 5,
            samples: Some(6),
            outputs_npy: None,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!((rep.samples, rep.correct), (6, 4));

    // One-hot labels give the same accuracy.
    let onehot: Vec<f32> = labels
        .iter()
        .flat_map(|&c| if c == 0 { [1., 0.] } else { [0., 1.] })
        .collect();
    qpipe::npy::write(&dir.join("y1.npy"), &Tensor::from_vec(vec![n, 2], &onehot)).unwrap();
    let spec1 = DatasetSpec {
        labels: Some(dir.join("y1.npy")),
        ..spec.clone()
    };
    assert_eq!(
        evaluate(&g, &spec1, &EvalOptions::default())
            .unwrap()
            .correct,
        n - 2
    );

    // No labels: no accuracy.
    let spec2 = DatasetSpec {
        labels: None,
        ..spec.clone()
    };
    assert_eq!(
        evaluate(&g, &spec2, &EvalOptions::default())
            .unwrap()
            .accuracy,
        None
    );
}

#[test]
fn data_set_errors() {
    let dir = tmp_dir("errors");
    qpipe::npy::write(&dir.join("x.npy"), &f32t(&[4, 3], &[0.; 12])).unwrap();
    qpipe::npy::write(&dir.join("y.npy"), &Tensor::from_vec(vec![5], &[0i64; 5])).unwrap();
    let spec = DatasetSpec {
        tensors: BTreeMap::from([("x".to_string(), dir.join("x.npy"))]),
        labels: Some(dir.join("y.npy")),
    };
    let e = evaluate(&classifier(), &spec, &EvalOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("y.npy") && e.contains("has 5 rows, other files of the data set have 4"),
        "{e}"
    );

    let spec = DatasetSpec {
        tensors: BTreeMap::from([("other".to_string(), dir.join("x.npy"))]),
        labels: None,
    };
    let e = evaluate(&classifier(), &spec, &EvalOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("the data set has no tensor for input 'x'"),
        "{e}"
    );

    // int64 data into an int32 input: converted when it fits, an error when it does not.
    let mut b = G::new();
    b.placeholder("ids", DType::I32, Some(&[-1]));
    b.op("y", "Cast", &["ids"], &[("DstT", Attr::Type(DType::F32))]);
    b.op("probs", "ExpandDims", &["y", "ax"], &[]);
    b.konst("ax", i32t(&[], &[1]));
    b.output("probs");
    qpipe::npy::write(&dir.join("ids.npy"), &Tensor::from_vec(vec![2], &[1i64, 2])).unwrap();
    let spec = DatasetSpec {
        tensors: BTreeMap::from([("ids".to_string(), dir.join("ids.npy"))]),
        labels: None,
    };
    assert_eq!(
        evaluate(&b.g, &spec, &EvalOptions::default())
            .unwrap()
            .samples,
        2
    );
    qpipe::npy::write(
        &dir.join("big.npy"),
        &Tensor::from_vec(vec![1], &[1i64 << 40]),
    )
    .unwrap();
    let spec = DatasetSpec {
        tensors: BTreeMap::from([("ids".to_string(), dir.join("big.npy"))]),
        labels: None,
    };
    let e = evaluate(&b.g, &spec, &EvalOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("big.npy") && e.contains("do not fit the input's int32"),
        "{e}"
    );
}

/// An embedding table behind a `Dequantize` (float16, int8 per tensor, int8 per axis)
/// read by a gather gives what dequantizing the whole table then gathering gives.
#[test]
fn gathers_from_dequantized_tables_match_dequantize_then_gather() {
    use qpipe::ir::QuantParams;
    let (rows, cols) = (7usize, 3usize);
    let q8: Vec<i8> = (0..rows * cols)
        .map(|i| (i as i64 * 37 % 255 - 127) as i8)
        .collect();
    let f16: Vec<half::f16> = (0..rows * cols)
        .map(|i| half::f16::from_f32(i as f32 * 0.37 - 3.0))
        .collect();
    let tables: Vec<(Tensor, Option<QuantParams>, DType)> = vec![
        (Tensor::from_vec(vec![rows, cols], &f16), None, DType::F16),
        (
            Tensor::from_vec(vec![rows, cols], &q8),
            Some(QuantParams::per_tensor(0.05, 3)),
            DType::I8,
        ),
        (
            Tensor::from_vec(vec![rows, cols], &q8),
            Some(QuantParams::per_axis(
                vec![0.5, 0.25, 0.125],
                vec![0, 1, -2],
                1,
            )),
            DType::I8,
        ),
    ];
    let ids = i32t(&[2, 3], &[6, 0, 6, 2, 1, 5]);
    for (table, q, dt) in tables {
        let mut b = G::new();
        b.placeholder("ids", DType::I32, Some(&[-1, 3]));
        b.konst("table", table);
        if let Some(q) = q.clone() {
            b.g.nodes.last_mut().unwrap().output_quant.insert(0, q);
        }
        let dq = [("T", Attr::Type(dt)), ("dtype", Attr::Type(DType::F32))];
        b.op("dq", "Dequantize", &["table"], &dq);
        b.konst("axis", i32t(&[], &[0]));
        b.op("emb", "GatherV2", &["dq", "ids", "axis"], &[]);
        b.op("y", "Relu", &["emb"], &[]);
        let plan = format!("{:?}", Plan::compile(&b.g, &["ids"], &[r("y")]).unwrap());
        let (at_gather, at_dq) = (plan.find("\"emb\"").unwrap(), plan.find("\"dq\"").unwrap());
        let elementwise = q.as_ref().is_none_or(|q| q.axis.is_none());
        assert_eq!(at_gather < at_dq, elementwise, "{dt} {q:?}: {plan}");
        let got = run1(&b.g, &[("ids", ids.clone())], "y");
        // Reference: the whole table dequantized (fetched, so it cannot be moved).
        let outs = qpipe::kernels::run(&b.g, &[("ids", ids.clone())], &[r("dq"), r("y")]).unwrap();
        let full = outs[0].to_f32_vec().unwrap();
        let idx = ids.to_i64_vec().unwrap();
        let want: Vec<f32> = idx
            .iter()
            .flat_map(|&i| full[i as usize * cols..(i as usize + 1) * cols].to_vec())
            .map(|v| v.max(0.0))
            .collect();
        assert_eq!(got.shape(), &[2, 3, cols], "{dt}");
        assert_eq!(got.to_f32_vec().unwrap(), want, "{dt} {q:?}");
        assert_eq!(outs[1].to_f32_vec().unwrap(), want, "{dt} {q:?}");
        assert!(want.iter().any(|&v| v > 0.0));
    }
}

/// A constant table of 1 MiB or more that only a gather reads is gathered from in
/// place (the plan shows `GatherTable`), along axis 0 or 1, behind a float16 or int8
/// `Dequantize` or plain float32, with the same results as gathering from the whole
/// table; one that something else also reads is converted whole and still correct.
#[test]
fn gathers_from_large_constant_tables_read_rows_in_place() {
    use qpipe::ir::QuantParams;
    let (rows, cols) = (70_000usize, 4usize);
    let f32s: Vec<f32> = (0..rows * cols)
        .map(|i| (i % 1013) as f32 * 0.25 - 100.0)
        .collect();
    // Float16 needs twice the rows, int8 four times, to reach 1 MiB.
    let f16s: Vec<half::f16> = (0..2 * rows * cols)
        .map(|i| half::f16::from_f32((i % 1013) as f32 * 0.25 - 100.0))
        .collect();
    let q8_table = rows * 5;
    let q8_big: Vec<i8> = (0..q8_table * cols).map(|i| (i % 251) as i8).collect();
    let ids_vals = [69_999i32, 0, 12_345, 69_999, 7, 31_000];
    let ids = i32t(&[2, 3], &ids_vals);
    // (table, dequantize as, dequantize params, row values as f32)
    let row_f32 = |i: usize| f32s[i * cols..(i + 1) * cols].to_vec();
    type Case<'a> = (
        &'a str,
        Tensor,
        Option<(DType, Option<QuantParams>)>,
        Box<dyn Fn(usize) -> Vec<f32> + 'a>,
    );
    let cases: Vec<Case> = vec![
        (
            "f32",
            Tensor::from_vec(vec![rows, cols], &f32s),
            None,
            Box::new(row_f32),
        ),
        (
            "f16",
            Tensor::from_vec(vec![2 * rows, cols], &f16s),
            Some((DType::F16, None)),
            Box::new(|i| {
                f16s[i * cols..(i + 1) * cols]
                    .iter()
                    .map(|h| h.to_f32())
                    .collect()
            }),
        ),
        (
            "int8",
            Tensor::from_vec(vec![q8_table, cols], &q8_big),
            Some((DType::I8, Some(QuantParams::per_tensor(0.5, 3)))),
            Box::new(|i| {
                q8_big[i * cols..(i + 1) * cols]
                    .iter()
                    .map(|&q| (q as i32 - 3) as f32 * 0.5)
                    .collect()
            }),
        ),
    ];
    for (what, table, dq, row) in cases {
        for shared in [false, true] {
            let mut b = G::new();
            b.placeholder("ids", DType::I32, Some(&[-1, 3]));
            b.konst("table", table.clone());
            let mut src = "table";
            if let Some((dt, q)) = &dq {
                if let Some(q) = q {
                    b.g.nodes
                        .last_mut()
                        .unwrap()
                        .output_quant
                        .insert(0, q.clone());
                }
                let attrs = [("T", Attr::Type(*dt)), ("dtype", Attr::Type(DType::F32))];
                b.op("dq", "Dequantize", &["table"], &attrs);
                src = "dq";
            }
            b.konst("axis", i32t(&[], &[0]));
            b.op("emb", "GatherV2", &[src, "ids", "axis"], &[]);
            let mut fetch = vec![r("emb")];
            if shared {
                // A second reader of the table: it must be converted whole.
                b.op(
                    "n",
                    "Size",
                    &["table"],
                    &[("out_type", Attr::Type(DType::I32))],
                );
                fetch.push(r("n"));
            }
            let plan = format!("{:?}", Plan::compile(&b.g, &["ids"], &fetch).unwrap());
            assert_eq!(
                plan.contains("GatherTable"),
                !shared,
                "{what} shared={shared}"
            );
            let outs = qpipe::kernels::run(&b.g, &[("ids", ids.clone())], &fetch).unwrap();
            let want: Vec<f32> = ids_vals.iter().flat_map(|&i| row(i as usize)).collect();
            assert_eq!(outs[0].shape(), &[2, 3, cols], "{what}");
            assert_eq!(
                outs[0].to_f32_vec().unwrap(),
                want,
                "{what} shared={shared}"
            );
        }
    }

    // Along axis 1 of a [cols, rows] table, and an index out of range.
    let t: Vec<f32> = (0..cols * rows).map(|i| i as f32).collect();
    let mut b = G::new();
    b.placeholder("ids", DType::I32, Some(&[-1]));
    b.konst("table", Tensor::from_vec(vec![cols, rows], &t));
    b.konst("axis", i32t(&[], &[1]));
    b.op("emb", "GatherV2", &["table", "ids", "axis"], &[]);
    let got = run1(&b.g, &[("ids", i32t(&[2], &[5, 69_000]))], "emb");
    let want: Vec<f32> = (0..cols)
        .flat_map(|c| [(c * rows + 5) as f32, (c * rows + 69_000) as f32])
        .collect();
    assert_eq!(got.shape(), &[cols, 2]);
    assert_eq!(got.to_f32_vec().unwrap(), want);
    let e = qpipe::kernels::run(&b.g, &[("ids", i32t(&[1], &[70_000]))], &[r("emb")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("70000") && e.contains("emb"), "{e}");
}

/// The plan fuses BiasAdd and Relu/Relu6 into the float Conv2D, depthwise and MatMul
/// before them (fewer steps); the outputs keep the bits of the ops run one by one,
/// which fetching the intermediates (so that nothing fuses) shows.
#[test]
fn fused_bias_and_activation_give_the_bits_of_the_separate_ops() {
    let (n, h, w, c, o) = (3usize, 7usize, 6usize, 5usize, 19usize);
    let mut rng = Rng::new(11);
    let scaled = |rng: &mut Rng, len: usize, s: f32| -> Vec<f32> {
        rng.vec(len).into_iter().map(|v| v * s).collect()
    };
    let mut b = G::new();
    b.placeholder("x", DType::F32, None);
    b.konst("k1", f32t(&[3, 3, c, o], &scaled(&mut rng, 9 * c * o, 4.0)));
    b.konst("b1", f32t(&[o], &scaled(&mut rng, o, 3.0)));
    b.konst("k2", f32t(&[3, 3, o, 1], &scaled(&mut rng, 9 * o, 2.0)));
    b.konst("b2", f32t(&[o], &scaled(&mut rng, o, 1.0)));
    let (oh, ow) = (h.div_ceil(2), w.div_ceil(2));
    let flat = oh * ow * o;
    b.konst("k3", f32t(&[flat, 10], &scaled(&mut rng, flat * 10, 1.0)));
    b.konst("b3", f32t(&[10], &scaled(&mut rng, 10, 1.0)));
    b.konst("shape", i32t(&[2], &[-1, flat as i32]));
    let conv = |stride: i64| {
        vec![
            ("strides", Attr::Ints(vec![1, stride, stride, 1])),
            ("dilations", Attr::Ints(vec![1, 1, 1, 1])),
            ("padding", Attr::Str(b"SAME".to_vec())),
            ("data_format", Attr::Str(b"NHWC".to_vec())),
        ]
    };
    b.op("c1", "Conv2D", &["x", "k1"], &conv(1));
    b.op("a1", "BiasAdd", &["c1", "b1"], &[]);
    b.op("r1", "Relu6", &["a1"], &[]);
    b.op("c2", "DepthwiseConv2dNative", &["r1", "k2"], &conv(2));
    b.op("a2", "BiasAdd", &["c2", "b2"], &[]);
    b.op("r2", "Relu", &["a2"], &[]);
    b.op("f", "Reshape", &["r2", "shape"], &[]);
    b.op("m", "MatMul", &["f", "k3"], &[]);
    b.op("y", "BiasAdd", &["m", "b3"], &[]);
    let x = f32t(&[n, h, w, c], &rng.vec(n * h * w * c));
    let fused = Plan::compile(&b.g, &["x"], &[r("y")]).unwrap();
    let inter = ["c1", "a1", "c2", "a2", "m", "y"].map(r);
    let separate = Plan::compile(&b.g, &["x"], &inter).unwrap();
    assert!(
        fused.len() + 5 <= separate.len(),
        "{} steps fused, {} separate",
        fused.len(),
        separate.len()
    );
    let bits = |t: &Tensor| -> Vec<u32> {
        t.to_f32_vec()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    let y = fused.run(&[("x", x.clone())]).unwrap().remove(0);
    let y_sep = separate.run(&[("x", x)]).unwrap().remove(5);
    assert_eq!(bits(&y), bits(&y_sep));
    let v = y.to_f32_vec().unwrap();
    assert!(v.iter().any(|&e| e != 0.0) && v.iter().all(|e| e.is_finite()));
}

/// A conv1d as TensorFlow writes it (`Conv2D` over `[n, 1, t, c]`, then `Squeeze`,
/// `BiasAdd`, `Relu`): the bias and activation fuse into the product and the squeeze
/// moves after it, with the bits of the ops one by one. With one output channel the
/// squeeze removes the channel axis, the bias runs along the sequence, and nothing
/// moves.
#[test]
fn bias_and_activation_after_a_squeeze_fuse_into_the_conv1d() {
    let mut rng = Rng::new(12);
    let (n, t, c) = (4usize, 21usize, 6usize);
    for o in [8usize, 1] {
        let mut b = G::new();
        b.placeholder("x", DType::F32, None);
        let k: Vec<f32> = rng.vec(3 * c * o).into_iter().map(|v| v * 3.0).collect();
        b.konst("k", f32t(&[1, 3, c, o], &k));
        let bias_len = if o == 1 { t - 2 } else { o };
        b.konst("b", f32t(&[bias_len], &rng.vec(bias_len)));
        b.op(
            "c",
            "Conv2D",
            &["x", "k"],
            &[
                ("strides", Attr::Ints(vec![1, 1, 1, 1])),
                ("dilations", Attr::Ints(vec![1, 1, 1, 1])),
                ("padding", Attr::Str(b"VALID".to_vec())),
                ("data_format", Attr::Str(b"NHWC".to_vec())),
            ],
        );
        let dims = if o == 1 { vec![1, 3] } else { vec![1] };
        b.op(
            "s",
            "Squeeze",
            &["c"],
            &[("squeeze_dims", Attr::Ints(dims))],
        );
        b.op("a", "BiasAdd", &["s", "b"], &[]);
        b.op("y", "Relu", &["a"], &[]);
        let x = f32t(&[n, 1, t, c], &rng.vec(n * t * c));
        let fused = Plan::compile(&b.g, &["x"], &[r("y")]).unwrap();
        let separate = Plan::compile(&b.g, &["x"], &["c", "s", "a", "y"].map(r)).unwrap();
        let absorbed = if o == 1 { 0 } else { 2 };
        assert_eq!(fused.len() + absorbed, separate.len(), "o = {o}");
        let y = fused.run(&[("x", x.clone())]).unwrap().remove(0);
        let y_sep = separate.run(&[("x", x)]).unwrap().remove(3);
        assert_eq!(y.shape(), y_sep.shape());
        let bits = |t: &Tensor| -> Vec<u32> {
            t.to_f32_vec()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        assert_eq!(bits(&y), bits(&y_sep), "o = {o}");
        let v = y.to_f32_vec().unwrap();
        assert!(v.iter().any(|&e| e > 0.0) && v.contains(&0.0), "o = {o}");
    }
}
