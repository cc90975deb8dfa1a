//! strip_training on hand-built graphs of the patterns TF writes: dropout (TF1 and
//! TF2), shape-computed reshape targets, fused and decomposed batch norms,
//! pass-through and debugging ops; outputs compared with the unstripped graph.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;

use qpipe::ir::{Attr, DType, Graph, Tensor};
use qpipe::stages::strip_training::{strip, StripOptions, StripReport};
use support::fixtures::{fixture_dir, fixture_npy, frozen_graph, model_json, MODELS};
use support::graph_builder::{f32t, i32t, ints, r, run1, s, G};
use support::numeric::{max_abs_diff, Rng};
use support::stage_runner::MemMemo;

fn strip_default(g: &Graph) -> qpipe::Result<(Graph, StripReport)> {
    strip(g, &g.inputs, &g.outputs, &StripOptions::default())
}

fn ops(g: &Graph) -> BTreeMap<String, usize> {
    g.op_histogram()
}

/// Runs both graphs on `x` and returns the max abs difference of the first output.
fn compare(a: &Graph, b: &Graph, x: Tensor) -> f32 {
    let out = a.outputs[0].node.clone();
    let ya = run1(a, &[("x", x.clone())], &out).to_f32_vec().unwrap();
    let yb = run1(b, &[("x", x)], &out).to_f32_vec().unwrap();
    max_abs_diff(&ya, &yb)
}

/// x [-1, 6] → Relu → (dropout built by `dropout`) → MatMul → Softmax "out".
fn with_dropout(dropout: impl FnOnce(&mut G, &str) -> String) -> Graph {
    let mut b = G::new();
    b.placeholder("x", DType::F32, Some(&[-1, 6]));
    b.op("h", "Relu", &["x"], &[]);
    let d = dropout(&mut b, "h");
    let mut rng = Rng::new(11);
    b.konst("w", f32t(&[6, 3], &rng.vec(18)));
    b.op("logits", "MatMul", &[&d, "w"], &[]);
    b.op("out", "Softmax", &["logits"], &[]);
    b.output("out");
    b.g
}

fn pwd(b: &mut G, name: &str, v: f32) {
    b.konst(&format!("{name}/input"), f32t(&[], &[v]));
    b.op(
        name,
        "PlaceholderWithDefault",
        &[&format!("{name}/input")],
        &[
            ("dtype", Attr::Type(DType::F32)),
            ("shape", Attr::Shape(Some(vec![]))),
        ],
    );
}

fn random_uniform(b: &mut G, x: &str) -> String {
    b.op(
        "drop/Shape",
        "Shape",
        &[x],
        &[("out_type", Attr::Type(DType::I32))],
    );
    b.op(
        "drop/random_uniform/RandomUniform",
        "RandomUniform",
        &["drop/Shape"],
        &[
            ("dtype", Attr::Type(DType::F32)),
            ("seed", Attr::Int(1)),
            ("T", Attr::Type(DType::I32)),
        ],
    )
}

/// TF 2.x `tf.nn.dropout(x, rate)`: `SelectV2(uniform >= rate, x / (1 - rate), 0)`.
fn tf2_dropout(rate: f32) -> impl FnOnce(&mut G, &str) -> String {
    move |b, x| {
        pwd(b, "rate", rate);
        b.konst("drop/one", f32t(&[], &[1.0]));
        b.op("drop/sub", "Sub", &["drop/one", "rate"], &[]);
        b.op("drop/RealDiv", "RealDiv", &[x, "drop/sub"], &[]);
        let ru = random_uniform(b, x);
        b.op("drop/GreaterEqual", "GreaterEqual", &[&ru, "rate"], &[]);
        b.konst("drop/zero", f32t(&[], &[0.0]));
        b.op(
            "drop/SelectV2",
            "SelectV2",
            &["drop/GreaterEqual", "drop/RealDiv", "drop/zero"],
            &[],
        )
    }
}

/// TF 1.x `tf.nn.dropout(x, keep_prob)`: `x / keep * floor(keep + uniform)`, with the
/// uniform scaled to [min, max) as old TF wrote it.
fn tf1_dropout(keep: f32) -> impl FnOnce(&mut G, &str) -> String {
    move |b, x| {
        pwd(b, "keep_prob", keep);
        let ru = random_uniform(b, x);
        b.konst("drop/max_min", f32t(&[], &[1.0]));
        b.op(
            "drop/random_uniform/mul",
            "Mul",
            &[&ru, "drop/max_min"],
            &[],
        );
        b.konst("drop/min", f32t(&[], &[0.0]));
        b.op(
            "drop/random_uniform",
            "Add",
            &["drop/random_uniform/mul", "drop/min"],
            &[],
        );
        b.op(
            "drop/add",
            "Add",
            &["keep_prob", "drop/random_uniform"],
            &[],
        );
        b.op("drop/Floor", "Floor", &["drop/add"], &[]);
        b.op("drop/div", "RealDiv", &[x, "keep_prob"], &[]);
        b.op("drop/mul", "Mul", &["drop/div", "drop/Floor"], &[])
    }
}

/// Keras-style `x * (1 / (1 - rate)) * cast(uniform >= rate)`.
fn cast_mul_dropout(b: &mut G, x: &str) -> String {
    pwd(b, "rate", 0.0);
    b.konst("drop/one", f32t(&[], &[1.0]));
    b.op("drop/sub", "Sub", &["drop/one", "rate"], &[]);
    b.op("drop/scale", "RealDiv", &["drop/one", "drop/sub"], &[]);
    b.op("drop/mul", "Mul", &[x, "drop/scale"], &[]);
    let ru = random_uniform(b, x);
    b.op("drop/ge", "GreaterEqual", &[&ru, "rate"], &[]);
    b.op(
        "drop/Cast",
        "Cast",
        &["drop/ge"],
        &[
            ("SrcT", Attr::Type(DType::Bool)),
            ("DstT", Attr::Type(DType::F32)),
        ],
    );
    b.op("drop/mul_1", "Mul", &["drop/mul", "drop/Cast"], &[])
}

fn assert_clean(g: &Graph) {
    for n in &g.nodes {
        assert!(
            !matches!(
                n.op.as_str(),
                "RandomUniform"
                    | "PlaceholderWithDefault"
                    | "SelectV2"
                    | "Floor"
                    | "Shape"
                    | "Identity"
            ) && !n.op.starts_with("FusedBatchNorm"),
            "{} ({}) left in {:?}",
            n.name,
            n.op,
            ops(g)
        );
    }
}

#[test]
fn removes_dropout_in_every_form() {
    let x = f32t(&[4, 6], &Rng::new(5).vec(24));
    for (name, g) in [
        ("tf2", with_dropout(tf2_dropout(0.0))),
        ("tf1", with_dropout(tf1_dropout(1.0))),
        ("cast_mul", with_dropout(cast_mul_dropout)),
    ] {
        let (s, rep) = strip_default(&g).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_clean(&s);
        assert_eq!(
            ops(&s),
            BTreeMap::from([
                ("Const".to_string(), 1),
                ("MatMul".to_string(), 1),
                ("Placeholder".to_string(), 1),
                ("Relu".to_string(), 1),
                ("Softmax".to_string(), 1),
            ]),
            "{name}"
        );
        assert_eq!(rep.removed.get("RandomUniform"), Some(&1), "{name}");
        assert_eq!(rep.placeholder_defaults_bound, 1);
        assert!(compare(&g, &s, x.clone()) <= 1e-6, "{name}");
        // The stripped graph still takes any batch size.
        let y = run1(&s, &[("x", f32t(&[1, 6], &[1.; 6]))], "out");
        assert_eq!(y.shape(), &[1, 3]);
    }
}

#[test]
fn active_or_controllable_dropout_is_an_error() {
    let g = with_dropout(tf2_dropout(0.5));
    let e = strip_default(&g).unwrap_err().to_string();
    assert!(
        e.contains("cannot strip node 'drop/random_uniform/RandomUniform' (RandomUniform)"),
        "{e}"
    );
    // keep_prob declared as an input: the mask can change at run time, so it stays.
    let g = with_dropout(tf1_dropout(1.0));
    let inputs = vec!["x".to_string(), "keep_prob".to_string()];
    let e = strip(&g, &inputs, &g.outputs, &StripOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("'drop/random_uniform/RandomUniform' (RandomUniform)"),
        "{e}"
    );
}

#[test]
fn resolves_reshape_targets_computed_from_shape() {
    let mut b = G::new();
    b.placeholder("x", DType::F32, Some(&[-1, 2, 2, 3]));
    b.op("h", "Relu", &["x"], &[]);
    b.op(
        "flatten/Shape",
        "Shape",
        &["h"],
        &[("out_type", Attr::Type(DType::I32))],
    );
    b.konst("flatten/b", i32t(&[1], &[0]));
    b.konst("flatten/e", i32t(&[1], &[1]));
    b.konst("flatten/s", i32t(&[1], &[1]));
    b.op(
        "flatten/strided_slice",
        "StridedSlice",
        &["flatten/Shape", "flatten/b", "flatten/e", "flatten/s"],
        &[
            ("shrink_axis_mask", Attr::Int(1)),
            ("T", Attr::Type(DType::I32)),
        ],
    );
    b.konst("flatten/12", i32t(&[], &[12]));
    b.op(
        "flatten/Reshape/shape",
        "Pack",
        &["flatten/strided_slice", "flatten/12"],
        &[("T", Attr::Type(DType::I32)), ("axis", Attr::Int(0))],
    );
    b.op("out", "Reshape", &["h", "flatten/Reshape/shape"], &[]);
    b.output("out");
    let (s, rep) = strip_default(&b.g).unwrap();
    assert_eq!(rep.reshape_targets_resolved, 1);
    let reshape = s.node("out").unwrap();
    let target = s
        .node(&reshape.inputs[1].node)
        .unwrap()
        .const_value()
        .unwrap();
    assert_eq!(target.values::<i32>().unwrap(), vec![-1, 12]);
    assert!(!ops(&s).contains_key("Shape") && !ops(&s).contains_key("Pack"));
    for n in [1, 5] {
        let x = f32t(&[n, 2, 2, 3], &Rng::new(n as u64).vec(n * 12));
        assert_eq!(compare(&b.g, &s, x), 0.0);
    }
}

fn bn_node(b: &mut G, name: &str, x: &str, c: usize, training: bool) -> String {
    let mut rng = Rng::new(c as u64 + 100);
    let gamma: Vec<f32> = rng.vec(c).iter().map(|v| 1.0 + 0.5 * v).collect();
    let var: Vec<f32> = rng.vec(c).iter().map(|v| 0.5 + 0.4 * v).collect();
    b.konst(&format!("{name}/gamma"), f32t(&[c], &gamma));
    b.konst(&format!("{name}/beta"), f32t(&[c], &rng.vec(c)));
    b.konst(&format!("{name}/mean"), f32t(&[c], &rng.vec(c)));
    b.konst(&format!("{name}/var"), f32t(&[c], &var));
    for p in ["gamma", "beta", "mean", "var"] {
        b.op(
            &format!("{name}/{p}/read"),
            "Identity",
            &[&format!("{name}/{p}")],
            &[],
        );
    }
    b.op(
        name,
        "FusedBatchNormV3",
        &[
            x,
            &format!("{name}/gamma/read"),
            &format!("{name}/beta/read"),
            &format!("{name}/mean/read"),
            &format!("{name}/var/read"),
        ],
        &[
            ("epsilon", Attr::Float(1e-3)),
            ("is_training", Attr::Bool(training)),
            ("data_format", s("NHWC")),
        ],
    )
}

fn conv(b: &mut G, name: &str, x: &str, w: &[usize; 4], depthwise: bool) -> String {
    let n: usize = w.iter().product();
    b.konst(
        &format!("{name}/weights"),
        f32t(w, &Rng::new(n as u64).vec(n)),
    );
    b.op(
        name,
        if depthwise {
            "DepthwiseConv2dNative"
        } else {
            "Conv2D"
        },
        &[x, &format!("{name}/weights")],
        &[("strides", ints(&[1, 1, 1, 1])), ("padding", s("SAME"))],
    )
}

#[test]
fn folds_fused_batch_norms_into_convolutions() {
    let mut b = G::new();
    b.placeholder("x", DType::F32, Some(&[-1, 5, 5, 3]));
    let c1 = conv(&mut b, "c1", "x", &[3, 3, 3, 4], false);
    let bn1 = bn_node(&mut b, "bn1", &c1, 4, false);
    b.op("r1", "Relu6", &[&bn1], &[]);
    let c2 = conv(&mut b, "c2", "r1", &[3, 3, 4, 2], true);
    b.konst("c2/bias", f32t(&[8], &Rng::new(9).vec(8)));
    b.op("c2/BiasAdd", "BiasAdd", &[&c2, "c2/bias"], &[]);
    let bn2 = bn_node(&mut b, "bn2", "c2/BiasAdd", 8, false);
    b.op("r2", "Relu", &[&bn2], &[]);
    // A batch norm straight on an input has nothing to fold into.
    let bn3 = bn_node(&mut b, "bn3", "r2", 8, false);
    b.op("out", "Identity", &[&bn3], &[]);
    b.output("out");
    let (s, rep) = strip_default(&b.g).unwrap();
    assert_eq!(rep.batch_norms_folded, 3);
    assert_eq!(rep.muls_folded_into_weights, 2);
    assert_eq!(rep.adds_folded_into_bias, 2);
    let h = ops(&s);
    assert!(!h.keys().any(|k| k.starts_with("FusedBatchNorm")), "{h:?}");
    assert_eq!(h.get("BiasAdd"), Some(&2), "{h:?}");
    assert_eq!(
        (h.get("Mul"), h.get("AddV2")),
        (Some(&1), Some(&1)),
        "{h:?}"
    );
    // The output keeps its name as an Identity; consumers of bn1 read its BiasAdd.
    assert_eq!(s.node("out").unwrap().op, "Identity");
    assert_eq!(s.node("bn1").unwrap().op, "BiasAdd");
    assert_eq!(s.node("r1").unwrap().inputs[0].node, "bn1");
    let x = f32t(&[2, 5, 5, 3], &Rng::new(1).vec(150));
    let scale = run1(&b.g, &[("x", x.clone())], "out")
        .to_f32_vec()
        .unwrap()
        .iter()
        .fold(1f32, |m, v| m.max(v.abs()));
    let d = compare(&b.g, &s, x);
    assert!(d <= 1e-6 * scale, "{d} (outputs up to {scale})");
}

#[test]
fn folds_decomposed_batch_norm_into_matmul() {
    let mut b = G::new();
    b.placeholder("x", DType::F32, Some(&[-1, 4]));
    let mut rng = Rng::new(21);
    b.konst("k", f32t(&[4, 3], &rng.vec(12)));
    b.op("mm", "MatMul", &["x", "k"], &[]);
    b.konst("var", f32t(&[3], &[0.01, 0.2, 1.5]));
    b.konst("eps", f32t(&[], &[1e-3]));
    b.op("bn/add", "AddV2", &["var", "eps"], &[]);
    b.op("bn/Rsqrt", "Rsqrt", &["bn/add"], &[]);
    b.konst("gamma", f32t(&[3], &[1.2, 0.8, 1.0]));
    b.op("bn/mul", "Mul", &["bn/Rsqrt", "gamma"], &[]);
    b.op("bn/mul_1", "Mul", &["mm", "bn/mul"], &[]);
    b.konst("mean", f32t(&[3], &[0.1, -0.2, 0.3]));
    b.op("bn/mul_2", "Mul", &["mean", "bn/mul"], &[]);
    b.konst("beta", f32t(&[3], &[0.0, 0.5, -0.5]));
    b.op("bn/sub", "Sub", &["beta", "bn/mul_2"], &[]);
    b.op("bn/add_1", "AddV2", &["bn/mul_1", "bn/sub"], &[]);
    b.op("out", "Tanh", &["bn/add_1"], &[]);
    b.output("out");
    let (s, rep) = strip_default(&b.g).unwrap();
    assert_eq!(
        (rep.muls_folded_into_weights, rep.adds_folded_into_bias),
        (1, 1)
    );
    assert_eq!(rep.folded.get("Rsqrt"), Some(&1));
    assert_eq!(
        ops(&s),
        BTreeMap::from([
            ("BiasAdd".to_string(), 1),
            ("Const".to_string(), 2),
            ("MatMul".to_string(), 1),
            ("Placeholder".to_string(), 1),
            ("Tanh".to_string(), 1),
        ])
    );
    let d = compare(&b.g, &s, f32t(&[3, 4], &rng.vec(12)));
    assert!(d <= 1e-6, "{d}");
    let keep = StripOptions {
        fold_batch_norm: false,
        ..StripOptions::default()
    };
    let (s2, _) = strip(&b.g, &b.g.inputs, &b.g.outputs, &keep).unwrap();
    assert!(ops(&s2).contains_key("Mul") && ops(&s2).contains_key("AddV2"));
}

#[test]
fn training_mode_batch_norm_is_an_error() {
    let mut b = G::new();
    b.placeholder("x", DType::F32, Some(&[-1, 2, 2, 3]));
    let c = conv(&mut b, "c", "x", &[1, 1, 3, 3], false);
    let bn = bn_node(&mut b, "net/bn", &c, 3, true);
    b.op("out", "Relu", &[&bn], &[]);
    b.output("out");
    let e = strip_default(&b.g).unwrap_err().to_string();
    assert!(
        e.contains("batch norm 'net/bn' (FusedBatchNormV3) is in training mode"),
        "{e}"
    );
    let nofold = StripOptions {
        fold_batch_norm: false,
        ..StripOptions::default()
    };
    let e = strip(&b.g, &b.g.inputs, &b.g.outputs, &nofold)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("'net/bn' (FusedBatchNormV3): a batch norm is in training mode"),
        "{e}"
    );
}

#[test]
fn removes_identities_debug_ops_and_control_edges() {
    let mut b = G::new();
    b.placeholder("x", DType::F32, Some(&[-1, 2]));
    b.placeholder("labels", DType::I64, Some(&[-1]));
    b.op("a", "Identity", &["x"], &[]);
    b.op("b", "StopGradient", &["a"], &[]);
    b.op("chk", "CheckNumerics", &["b"], &[("message", s("bad"))]);
    b.op("pr", "Print", &["chk", "labels"], &[]);
    b.op("assert", "Assert", &["x"], &[]);
    b.op("c", "Relu", &["pr"], &[]);
    b.g.nodes
        .last_mut()
        .unwrap()
        .control_inputs
        .push("assert".into());
    b.op("out", "Identity", &["c"], &[]);
    b.konst("w", f32t(&[2, 2], &[1.; 4]));
    b.op("train/ApplyAdam", "ApplyAdam", &["w", "w"], &[]);
    b.output("out");
    let inputs = vec!["x".to_string()];
    let (s, rep) = strip(&b.g, &inputs, &b.g.outputs, &StripOptions::default()).unwrap();
    assert_eq!(rep.control_edges_removed, 1);
    assert_eq!(
        ops(&s),
        BTreeMap::from([
            ("Identity".to_string(), 1),
            ("Placeholder".to_string(), 1),
            ("Relu".to_string(), 1),
        ])
    );
    assert_eq!(s.node("c").unwrap().inputs[0].node, "x");
    assert_eq!(s.node("out").unwrap().inputs[0].node, "c");
    for op in [
        "ApplyAdam",
        "Assert",
        "CheckNumerics",
        "Print",
        "StopGradient",
        "Const",
    ] {
        assert_eq!(rep.removed.get(op), Some(&1), "{op}: {:?}", rep.removed);
    }
    assert_eq!(rep.removed.get("Identity"), Some(&1));
    assert_eq!(s.inputs, vec!["x".to_string()]);
}

#[test]
fn an_undeclared_placeholder_on_the_path_is_named() {
    let mut b = G::new();
    b.placeholder("x", DType::F32, Some(&[-1, 2]));
    b.placeholder("temperature", DType::F32, Some(&[]));
    b.op("out", "RealDiv", &["x", "temperature"], &[]);
    b.output("out");
    let inputs = vec!["x".to_string()];
    let e = strip(&b.g, &inputs, &b.g.outputs, &StripOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cannot strip node 'temperature' (Placeholder)"),
        "{e}"
    );
    let e = strip(
        &b.g,
        &["nope".to_string()],
        &b.g.outputs,
        &StripOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("input 'nope' is not a node"), "{e}");
}

#[test]
fn a_declared_placeholder_with_default_becomes_a_placeholder() {
    let mut b = G::new();
    b.konst("d", f32t(&[2], &[1., 2.]));
    b.op(
        "x",
        "PlaceholderWithDefault",
        &["d"],
        &[
            ("dtype", Attr::Type(DType::F32)),
            ("shape", Attr::Shape(Some(vec![-1]))),
        ],
    );
    b.op("out", "Neg", &["x"], &[]);
    b.output("out");
    let (s, _) = strip(
        &b.g,
        &["x".to_string()],
        &b.g.outputs,
        &StripOptions::default(),
    )
    .unwrap();
    let x = s.node("x").unwrap();
    assert_eq!((x.op.as_str(), x.inputs.len()), ("Placeholder", 0));
    assert_eq!(x.attr_type("dtype").unwrap(), DType::F32);
    assert!(s.node("d").is_none());
}

#[test]
fn runs_as_a_stage_with_the_recipe_model_names() {
    let factory = qpipe::stages::registry::factory("strip_training").unwrap();
    let table = qpipe::stages::ConfigTable::parse("input = \"freeze\"").unwrap();
    let stage = (factory.build)(&table).unwrap();
    assert_eq!(
        stage.deps().stages,
        vec![("input".to_string(), "freeze".to_string())]
    );
    let bad =
        qpipe::stages::ConfigTable::parse("input = \"freeze\"\nfold_batchnorm = false").unwrap();
    assert!((factory.build)(&bad).is_err());

    let g = with_dropout(tf2_dropout(0.0));
    let model = qpipe::spec::ModelSpec {
        source: qpipe::spec::ModelSource::Graph("unused.pb".into()),
        inputs: vec!["x".into()],
        outputs: vec!["out".into()],
        input_shapes: BTreeMap::new(),
    };
    let datasets = BTreeMap::new();
    let ctx = qpipe::stages::StageContext {
        id: "strip",
        model: &model,
        datasets: &datasets,
        inputs: BTreeMap::from([(
            "input".to_string(),
            Arc::new(qpipe::stages::Artifact::Graph(Arc::new(Graph {
                inputs: vec![],
                outputs: vec![],
                ..g
            }))),
        )]),
        memo: &MemMemo::default(),
        progress: &qpipe::progress::Progress::disabled(),
    };
    let out = stage.run(&ctx).unwrap();
    let sg = out.artifact.graph().unwrap();
    assert_eq!(sg.inputs, vec!["x".to_string()]);
    assert_eq!(sg.outputs, vec![r("out")]);
    assert_eq!(out.metrics["removed"]["RandomUniform"], 1);
    assert_eq!(out.metrics["simplified"]["SelectV2"], 1);
    assert!(
        out.metrics["nodes_after"].as_u64().unwrap()
            < out.metrics["nodes_before"].as_u64().unwrap()
    );
}

fn eval_outputs(g: &Graph, m: &str) -> Vec<f32> {
    let x = fixture_npy(m, "eval_x.npy");
    let input = g.inputs[0].clone();
    let out = qpipe::kernels::run(g, &[(input.as_str(), x)], &g.outputs).unwrap();
    out[0].to_f32_vec().unwrap()
}

fn strip_and_check(m: &str, g: &Graph) -> StripReport {
    let (s, rep) = strip_default(g).unwrap_or_else(|e| panic!("{m}: {e}"));
    for n in &s.nodes {
        assert!(
            !matches!(
                n.op.as_str(),
                "RandomUniform"
                    | "Assert"
                    | "PlaceholderWithDefault"
                    | "Identity"
                    | "Shape"
                    | "StridedSlice"
                    | "Pack"
                    | "Rsqrt"
                    | "SelectV2"
                    | "GreaterEqual"
                    | "VariableV2"
                    | "VarHandleOp"
                    | "ReadVariableOp"
            ) && !n.op.starts_with("FusedBatchNorm"),
            "{m}: {} ({}) left",
            n.name,
            n.op
        );
        assert!(n.control_inputs.is_empty());
    }
    assert_eq!(s.outputs, g.outputs);
    let unstripped = eval_outputs(g, m);
    let stripped = eval_outputs(&s, m);
    let d = max_abs_diff(&unstripped, &stripped);
    assert!(d <= 1e-6, "{m}: stripped differs from unstripped by {d}");
    let tf = fixture_npy(m, "tf_eval_out.npy").to_f32_vec().unwrap();
    let d = max_abs_diff(&tf, &stripped);
    assert!(d <= 1e-5, "{m}: stripped differs from TensorFlow by {d}");
    rep
}

#[test]
fn strips_every_fixture_model() {
    for m in MODELS {
        let rep = strip_and_check(m, &frozen_graph(m));
        match m {
            "push_student" => {
                assert_eq!(rep.removed.get("RandomUniform"), Some(&1));
                assert_eq!(rep.placeholder_defaults_bound, 1);
            }
            "conv_bn" => {
                assert_eq!(rep.removed.get("RandomUniform"), Some(&1));
                assert_eq!(rep.reshape_targets_resolved, 1);
                assert_eq!(rep.batch_norms_folded, 1);
                assert_eq!(rep.removed.get("FusedBatchNormV3"), Some(&1));
            }
            _ => {
                assert_eq!(rep.folded.get("Rsqrt"), Some(&1));
                assert_eq!(
                    (rep.muls_folded_into_weights, rep.adds_folded_into_bias),
                    (1, 1)
                );
            }
        }
    }
}

#[test]
fn strips_graphs_qpipe_froze_from_the_checkpoints() {
    for m in MODELS {
        let info = model_json(m);
        let model = qpipe::spec::ModelSpec {
            source: qpipe::spec::ModelSource::Checkpoint(fixture_dir(m).join("best_validation")),
            inputs: info["inputs"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect(),
            outputs: info["outputs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| o.as_str().unwrap().to_string())
                .collect(),
            input_shapes: BTreeMap::new(),
        };
        let g = qpipe::formats::tf::freeze_model(&model).unwrap_or_else(|e| panic!("{m}: {e}"));
        strip_and_check(m, &g);
    }
}

#[test]
fn deep_chains_strip_in_linear_time() {
    let mut b = G::new();
    b.placeholder("x", DType::F32, Some(&[-1]));
    b.konst("one", f32t(&[], &[1.0]));
    let n = 100_000;
    let mut prev = "x".to_string();
    for i in 0..n {
        let name = format!("n{i}");
        match i % 4 {
            0 => b.op(&name, "Identity", &[&prev], &[]),
            1 => b.op(&name, "Relu", &[&prev], &[]),
            2 => b.op(&name, "Mul", &[&prev, "one"], &[]),
            _ => b.op(&name, "StopGradient", &[&prev], &[]),
        };
        prev = name;
    }
    b.op("out", "Identity", &[&prev], &[]);
    b.output("out");
    let t = std::time::Instant::now();
    let (s, rep) = strip_default(&b.g).unwrap();
    assert!(t.elapsed().as_secs() < 60, "{:?}", t.elapsed());
    assert_eq!(ops(&s).get("Relu"), Some(&(n / 4)));
    assert_eq!(rep.simplified.get("Mul"), Some(&(n / 4)));
    assert_eq!(s.nodes.len(), n / 4 + 2);
    let y = run1(&s, &[("x", f32t(&[2], &[-1., 2.]))], "out");
    assert_eq!(y.to_f32_vec().unwrap(), vec![0., 2.]);
}

#[test]
fn prunes_dead_branches_of_a_constant_learning_phase() {
    // TF1 Keras: cond(learning_phase, training_fn, inference_fn) as Switch/Merge.
    let mut b = G::new();
    b.placeholder("x", DType::F32, Some(&[-1, 3]));
    b.konst("lp/input", Tensor::scalar(false));
    b.op(
        "keras_learning_phase",
        "PlaceholderWithDefault",
        &["lp/input"],
        &[
            ("dtype", Attr::Type(DType::Bool)),
            ("shape", Attr::Shape(Some(vec![]))),
        ],
    );
    b.op("h", "Relu", &["x"], &[]);
    b.op(
        "cond/pred_id",
        "Identity",
        &["keras_learning_phase"],
        &[("T", Attr::Type(DType::Bool))],
    );
    b.op("cond/Switch_1", "Switch", &["h", "cond/pred_id"], &[]);
    // training branch (output 1): a dropout-like scale; inference branch (output 0): identity
    b.konst("cond/half", f32t(&[], &[0.5]));
    b.op("cond/mul", "Mul", &["cond/Switch_1:1", "cond/half"], &[]);
    b.op("cond/Identity", "Identity", &["cond/Switch_1"], &[]);
    b.op(
        "cond/Merge",
        "Merge",
        &["cond/Identity", "cond/mul"],
        &[("N", Attr::Int(2))],
    );
    b.op("out", "Neg", &["cond/Merge"], &[]);
    b.output("out");
    let (s, rep) = strip_default(&b.g).unwrap();
    assert_eq!(
        ops(&s),
        BTreeMap::from([
            ("Neg".to_string(), 1),
            ("Placeholder".to_string(), 1),
            ("Relu".to_string(), 1),
        ])
    );
    assert_eq!(s.node("out").unwrap().inputs[0].node, "h");
    assert_eq!(
        (rep.simplified.get("Switch"), rep.simplified.get("Merge")),
        (Some(&1), Some(&1))
    );
    // With the learning phase declared as an input the branches stay, and say so.
    let inputs = vec!["x".to_string(), "keras_learning_phase".to_string()];
    let e = strip(&b.g, &inputs, &b.g.outputs, &StripOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("(Switch): control flow"), "{e}");
}

#[test]
fn binds_plain_placeholders_to_constants() {
    // A TF1 script's `dropout_keep_prob = tf.placeholder(tf.float32)`.
    let mut g = with_dropout(tf1_dropout(1.0));
    let keep = g.node_mut("keep_prob").unwrap();
    keep.op = "Placeholder".into();
    keep.inputs.clear();
    let inputs = vec!["x".to_string()];
    let e = strip(&g, &inputs, &g.outputs, &StripOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("'keep_prob' (Placeholder)"), "{e}");
    let opts = StripOptions {
        bind: BTreeMap::from([("keep_prob".to_string(), 1.0)]),
        ..StripOptions::default()
    };
    let (s, _) = strip(&g, &inputs, &g.outputs, &opts).unwrap();
    assert_clean(&s);
    let x = f32t(&[2, 6], &Rng::new(2).vec(12));
    let want = run1(
        &g,
        &[("x", x.clone()), ("keep_prob", f32t(&[], &[1.0]))],
        "out",
    );
    assert_eq!(run1(&s, &[("x", x)], "out"), want);
    let bad = StripOptions {
        bind: BTreeMap::from([("w".to_string(), 1.0)]),
        ..StripOptions::default()
    };
    let e = strip(&g, &inputs, &g.outputs, &bad).unwrap_err();
    assert_eq!(e.exit_code(), 2);
    assert!(
        e.to_string()
            .contains("bind: 'w' is a Const node, not a placeholder"),
        "{e}"
    );

    let factory = qpipe::stages::registry::factory("strip_training").unwrap();
    let table = qpipe::stages::ConfigTable::parse(
        "input = \"freeze\"\nbind = { keep_prob = 1.0, is_training = false }",
    )
    .unwrap();
    let stage = (factory.build)(&table).unwrap();
    assert_eq!(stage.config()["bind"]["keep_prob"], 1.0);
}

/// x → Conv2DBackpropInput named as conv2d_transpose names it, or as a gradient.
fn transposed_conv(name: &str) -> Graph {
    let mut b = G::new();
    b.placeholder("x", DType::F32, Some(&[-1, 4, 4, 2]));
    b.konst("up/output_shape", i32t(&[4], &[1, 8, 8, 3]));
    b.konst("up/kernel", f32t(&[3, 3, 3, 2], &Rng::new(3).vec(54)));
    b.op(
        name,
        "Conv2DBackpropInput",
        &["up/output_shape", "up/kernel", "x"],
        &[("strides", ints(&[1, 2, 2, 1])), ("padding", s("SAME"))],
    );
    b.output(name);
    b.g
}

#[test]
fn a_transposed_convolution_is_kept_and_its_gradient_twin_refused() {
    // The forward op of conv2d_transpose is a layer: it survives stripping and runs.
    let g = transposed_conv("up/conv2d_transpose");
    let (st, _) = strip_default(&g).unwrap();
    assert_eq!(
        st.node("up/conv2d_transpose").unwrap().op,
        "Conv2DBackpropInput"
    );
    let x = f32t(&[1, 4, 4, 2], &Rng::new(4).vec(32));
    let y = run1(&st, &[("x", x)], "up/conv2d_transpose");
    assert_eq!(y.shape(), &[1, 8, 8, 3]);
    // The same op under `gradients/` is a gradient.
    let e = strip_default(&transposed_conv(
        "gradients/conv/Conv2D_grad/Conv2DBackpropInput",
    ))
    .unwrap_err()
    .to_string();
    assert!(e.ends_with("a gradient op is on the path"), "{e}");
}

/// `tf.nn.dynamic_rnn`'s TF1 while loop, reduced: x enters the frame, goes round
/// Merge → Switch → Tanh → NextIteration while LoopCond holds, and leaves by Exit.
fn tf1_while_loop() -> Graph {
    let mut b = G::new();
    b.placeholder("x", DType::F32, Some(&[-1, 3]));
    let frame = [("frame_name", s("rnn/while/while_context"))];
    b.op("rnn/while/Enter", "Enter", &["x"], &frame);
    b.konst("rnn/limit", f32t(&[], &[10.0]));
    b.op("rnn/while/Less/Enter", "Enter", &["rnn/limit"], &frame);
    b.op(
        "rnn/while/Merge",
        "Merge",
        &["rnn/while/Enter", "rnn/while/NextIteration"],
        &[],
    );
    b.op(
        "rnn/while/Sum",
        "Sum",
        &["rnn/while/Merge", "rnn/limit"],
        &[],
    );
    b.op(
        "rnn/while/Less",
        "Less",
        &["rnn/while/Sum", "rnn/while/Less/Enter"],
        &[],
    );
    b.op("rnn/while/LoopCond", "LoopCond", &["rnn/while/Less"], &[]);
    b.op(
        "rnn/while/Switch",
        "Switch",
        &["rnn/while/Merge", "rnn/while/LoopCond"],
        &[],
    );
    b.op("rnn/while/Tanh", "Tanh", &["rnn/while/Switch:1"], &[]);
    b.op(
        "rnn/while/NextIteration",
        "NextIteration",
        &["rnn/while/Tanh"],
        &[],
    );
    b.op("rnn/while/Exit", "Exit", &["rnn/while/Switch"], &[]);
    b.op("out", "Softmax", &["rnn/while/Exit"], &[]);
    b.output("out");
    b.g
}

fn assert_while_loop_message(e: &str) {
    assert!(
        e.contains("is part of the TF1 while loop 'rnn/while/while_context'")
            && e.contains("'rnn/while/Merge' (Merge)")
            && e.contains("unroll=True")
            && e.contains("static_rnn")
            && !e.contains("cycle"),
        "{e}"
    );
}

#[test]
fn a_tf1_while_loop_is_named_as_one_not_as_a_cycle() {
    let g = tf1_while_loop();
    assert_while_loop_message(&strip_default(&g).unwrap_err().to_string());
    let x = f32t(&[1, 3], &[0.1, 0.2, 0.3]);
    let e = qpipe::kernels::run(&g, &[("x", x)], &[r("out")]).unwrap_err();
    assert_while_loop_message(&e.to_string());
    let e = qpipe::ir::shape_infer::infer_shapes(&g).unwrap_err();
    assert_while_loop_message(&e.to_string());
    // An ordinary cycle is still called one.
    let mut b = G::new();
    b.placeholder("x", DType::F32, Some(&[-1, 3]));
    b.op("a", "Add", &["x", "b"], &[]);
    b.op("b", "Relu", &["a"], &[]);
    b.output("b");
    let e = strip_default(&b.g).unwrap_err().to_string();
    assert!(
        e.contains("the graph has a cycle through node 'a' (Add)"),
        "{e}"
    );
}

/// A node whose attributes are bad is named once, by whichever pass meets it first.
#[test]
fn a_bad_node_is_named_once() {
    let conv = |b: &mut G, x: &str| {
        b.konst("w", f32t(&[1, 1, 1, 1], &[2.0]));
        b.op("conv", "Conv2D", &[x, "w"], &[("padding", s("SAME"))]);
        b.output("conv");
    };
    // Constant folding meets a Cast with no target type.
    let mut b = G::new();
    b.placeholder("x", DType::F32, Some(&[-1, 2]));
    b.op("cast", "Cast", &["x"], &[("SrcT", Attr::Type(DType::F32))]);
    b.output("cast");
    let e = strip_default(&b.g).unwrap_err().to_string();
    assert_eq!(
        e,
        "constant folding: node 'cast' (Cast): attribute 'DstT' is missing"
    );
    // A fed input: the interpreter's plan meets it.
    let mut b = G::new();
    b.placeholder("x", DType::F32, Some(&[-1, 2, 2, 1]));
    conv(&mut b, "x");
    let x = f32t(&[1, 2, 2, 1], &[1.0; 4]);
    let e = qpipe::kernels::run(&b.g, &[("x", x)], &[r("conv")]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "node 'conv' (Conv2D): attribute 'strides' is missing"
    );
}
