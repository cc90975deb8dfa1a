//! The `quantize_int8` stage: strategies, metrics, calibration caching and its
//! errors, exclusions, and the structure of the graphs it produces.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;

use qpipe::formats::tflite;
use qpipe::ir::{DType, Graph};
use qpipe::spec::DatasetSpec;
use qpipe::stages::{registry, Artifact, ConfigTable};
use support::fixtures::{fixture, fixture_datasets, stripped_fixture, MODELS};
use support::graph_builder::{f32t, r, run1, G};
use support::litert_oracle::{run_litert, Resolver};
use support::numeric::{top1_agreement, Rng};
use support::stage_runner::{graph_of, quantize_fixture, run_qpipe, run_stage, MemMemo};
use support::tmp_dir;

fn metric<'a>(out: &'a qpipe::stages::StageOutput, key: &str) -> &'a serde_json::Value {
    out.metrics
        .get(key)
        .unwrap_or_else(|| panic!("no metric {key} in {:?}", out.metrics))
}

fn int8_consts(g: &Graph) -> usize {
    g.nodes
        .iter()
        .filter(|n| n.const_value().is_some_and(|t| t.dtype() == DType::I8))
        .count()
}

fn ops(g: &Graph, op: &str) -> usize {
    g.nodes.iter().filter(|n| n.op == op).count()
}

#[test]
fn full_integer_default_quantizes_every_op_of_the_fixtures() {
    for model in MODELS {
        let (g, out) = quantize_fixture(model, "calibration = \"calib\"");
        assert_eq!(metric(&out, "strategy"), "DEFAULT");
        assert_eq!(metric(&out, "mode"), "full_integer");
        assert_eq!(metric(&out, "float_ops"), 0, "{model}: {:?}", out.metrics);
        assert!(metric(&out, "int8_ops").as_u64().unwrap() >= 8, "{model}");
        assert_eq!(metric(&out, "calibration_samples"), 200);
        let before = metric(&out, "weight_bytes_before").as_u64().unwrap();
        let after = metric(&out, "weight_bytes_after").as_u64().unwrap();
        assert!(after * 3 < before, "{model}: {before} → {after}");
        // Float interface: the output is a Dequantize, every compute node has int8 output.
        assert_eq!(ops(&g, "Dequantize"), 1, "{model}");
        let out_node = g.node(&g.outputs[0].node).unwrap();
        assert_eq!(out_node.op, "Dequantize");
        for n in &g.nodes {
            if !matches!(n.op.as_str(), "Const" | "Placeholder" | "Dequantize") {
                let q = n
                    .output_quant
                    .get(&0)
                    .unwrap_or_else(|| panic!("{} has no quant", n.name));
                assert_eq!(q.scale.len(), 1);
                assert!((-128..=127).contains(&q.zero_point[0]));
            }
            if matches!(n.op.as_str(), "Softmax" | "Sigmoid") {
                assert_eq!(n.output_quant[&0].scale[0], 1.0 / 256.0);
                assert_eq!(n.output_quant[&0].zero_point[0], -128);
            }
            if n.op == "Tanh" {
                assert_eq!(n.output_quant[&0].scale[0], 1.0 / 128.0);
                assert_eq!(n.output_quant[&0].zero_point[0], 0);
            }
        }
        // Weights: int8 per channel along the TF output axis; biases int32 with
        // scale = input scale × weight scale.
        for n in &g.nodes {
            if !n.op.starts_with("_Fused") {
                continue;
            }
            let w = g.node(&n.inputs[1].node).unwrap();
            let b = g.node(&n.inputs[2].node).unwrap();
            let wt = w.const_value().unwrap();
            assert_eq!(wt.dtype(), DType::I8);
            let wq = &w.output_quant[&0];
            let axis = wq.axis.expect("per-channel weights") as usize;
            assert_eq!(wq.scale.len(), wt.shape()[axis]);
            assert!(wq.zero_point.iter().all(|&z| z == 0));
            assert!(wt
                .to_i64_vec()
                .unwrap()
                .iter()
                .all(|v| (-127..=127).contains(v)));
            assert_eq!(b.const_value().unwrap().dtype(), DType::I32);
            let x = g.node(&n.inputs[0].node).unwrap();
            let in_scale = x.output_quant[&0].scale[0];
            for (bs, ws) in b.output_quant[&0].scale.iter().zip(&wq.scale) {
                assert_eq!(*bs, in_scale * ws);
            }
        }
    }
}

#[test]
fn calibration_is_cached_apart_from_the_quantization_settings() {
    let model = "conv_bn";
    let g = Arc::new(stripped_fixture(model));
    let ds = fixture_datasets(model);
    let memo = MemMemo::default();
    let run = |extra: &str| {
        run_stage(
            "quantize_int8",
            &format!("input = \"strip\"\ncalibration = \"calib\"\n{extra}"),
            vec![("input", Artifact::Graph(g.clone()))],
            &ds,
            &memo,
        )
        .unwrap()
    };
    let a = run("");
    assert_eq!(memo.computed(), 1);
    assert_eq!(metric(&a, "calibration_cached"), false);
    let b = run("per_channel_dense = false");
    let c = run("strategy = \"OPTIMIZE_FOR_LATENCY\"");
    assert_eq!(
        memo.computed(),
        1,
        "changing only quantization settings recalibrated"
    );
    assert_eq!(metric(&b, "calibration_cached"), true);
    assert_eq!(metric(&c, "calibration_cached"), true);
    // A different sample count is a different calibration.
    run("samples = 50");
    assert_eq!(memo.computed(), 2);
    let d = run("samples = 50");
    assert_eq!(memo.computed(), 2);
    assert_eq!(metric(&d, "calibration_samples"), 50);
}

#[test]
fn the_stage_declares_its_calibration_data_set() {
    let build = |cfg: &str| {
        let t = ConfigTable::parse(cfg).unwrap();
        (registry::factory("quantize_int8").unwrap().build)(&t).unwrap()
    };
    let s = build("input = \"a\"\ncalibration = \"calib\"");
    assert_eq!(s.deps().datasets, vec!["calib".to_string()]);
    assert_eq!(s.deps().stages, vec![("input".into(), "a".into())]);
    let s = build("input = \"a\"\ncalibration = \"calib\"\nstrategy = \"OPTIMIZE_FOR_SIZE\"");
    assert!(s.deps().datasets.is_empty());
    let t = ConfigTable::parse("input = \"a\"\nstrategy = \"FAST\"").unwrap();
    assert!((registry::factory("quantize_int8").unwrap().build)(&t).is_err());
    let t = ConfigTable::parse("input = \"a\"\nsamplez = 3").unwrap();
    assert!((registry::factory("quantize_int8").unwrap().build)(&t).is_err());
    // The variant's label uses the strategy's name as the recipe spells it.
    for name in ["DEFAULT", "OPTIMIZE_FOR_SIZE", "OPTIMIZE_FOR_LATENCY"] {
        let s = build(&format!(
            "input = \"a\"\ncalibration = \"c\"\nstrategy = \"{name}\""
        ));
        assert_eq!(
            s.role(),
            qpipe::stages::Role::Model {
                label: format!("int8 {name}"),
                float: false
            }
        );
    }
    // OPTIMIZE_FOR_LATENCY without calibration is refused when the recipe loads.
    let t = ConfigTable::parse("input = \"a\"\nstrategy = \"OPTIMIZE_FOR_LATENCY\"").unwrap();
    let err = (registry::factory("quantize_int8").unwrap().build)(&t)
        .err()
        .expect("refused");
    assert_eq!(err.key.as_deref(), Some("strategy"));
    assert!(err.message.contains("needs a calibration"), "{err}");
}

/// x [-1, 4] → MatMul → Log → MatMul → Softmax, with a data set that makes Log see 0.
fn log_graph(dir: &std::path::Path) -> (Graph, BTreeMap<String, DatasetSpec>) {
    let mut b = G::new();
    b.placeholder("x", DType::F32, Some(&[-1, 4]));
    let mut rng = Rng::new(3);
    b.konst("w1", f32t(&[4, 4], &rng.vec(16)));
    b.op("h", "MatMul", &["x", "w1"], &[]);
    b.op("relu", "Relu", &["h"], &[]);
    b.op("log", "Log", &["relu"], &[]);
    b.konst("w2", f32t(&[4, 3], &rng.vec(12)));
    b.op("logits", "MatMul", &["log", "w2"], &[]);
    b.op("probs", "Softmax", &["logits"], &[]);
    b.output("probs");
    let x = f32t(&[8, 4], &rng.vec(32));
    let p = dir.join("x.npy");
    qpipe::npy::write(&p, &x).unwrap();
    let ds = BTreeMap::from([(
        "calib".to_string(),
        DatasetSpec {
            tensors: BTreeMap::from([("x".to_string(), p)]),
            labels: None,
        },
    )]);
    (b.g, ds)
}

#[test]
fn non_finite_activations_are_an_error_naming_the_tensor() {
    let dir = tmp_dir("q8_nan");
    let (g, ds) = log_graph(&dir);
    let err = run_stage(
        "quantize_int8",
        "input = \"s\"\ncalibration = \"calib\"",
        vec![("input", Artifact::Graph(Arc::new(g)))],
        &ds,
        &MemMemo::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("tensor 'log'"), "{err}");
    assert!(err.contains("-inf"), "{err}");
}

#[test]
fn ops_without_int8_kernels_stay_float_or_block_latency() {
    let dir = tmp_dir("q8_float_fallback");
    let (mut g, ds) = log_graph(&dir);
    // An op with no int8 kernel (LiteRT has int8 LOG): softplus(relu + 1).
    g.nodes
        .push(qpipe::ir::Node::constant("one", f32t(&[], &[1.0])));
    let mut add = qpipe::ir::Node::new("relu1", "AddV2")
        .with_input(r("relu"))
        .with_input(r("one"));
    add.attrs
        .insert("T".into(), qpipe::ir::Attr::Type(DType::F32));
    g.nodes.push(add);
    g.node_mut("log").unwrap().inputs[0] = r("relu1");
    g.node_mut("log").unwrap().op = "Softplus".into();
    let run = |extra: &str| {
        run_stage(
            "quantize_int8",
            &format!("input = \"s\"\ncalibration = \"calib\"\n{extra}"),
            vec![("input", Artifact::Graph(Arc::new(g.clone())))],
            &ds,
            &MemMemo::default(),
        )
    };
    let out = run("").unwrap();
    let q = graph_of(&out);
    assert_eq!(metric(&out, "float_ops"), 1);
    let floats = metric(&out, "float_nodes").as_array().unwrap();
    assert_eq!(floats.len(), 1);
    assert_eq!(floats[0]["node"], "log");
    assert!(floats[0]["reason"]
        .as_str()
        .unwrap()
        .contains("no int8 kernel for Softplus"));
    // Softplus reads a dequantized tensor and feeds a quantized one.
    let log = q.node("log").unwrap();
    assert_eq!(q.node(&log.inputs[0].node).unwrap().op, "Dequantize");
    let logits = q.node("logits").unwrap();
    assert_eq!(q.node(&logits.inputs[0].node).unwrap().op, "Quantize");
    // The float fallback still computes close to the float model.
    let x = qpipe::npy::read(&ds["calib"].tensors["x"]).unwrap();
    let a = run1(&g, &[("x", x.clone())], "probs").to_f32_vec().unwrap();
    let b = qpipe::kernels::run(&q, &[("x", x)], &q.outputs)
        .unwrap()
        .remove(0);
    assert!(support::numeric::max_abs_diff(&a, &b.to_f32_vec().unwrap()) < 0.03);
    // OPTIMIZE_FOR_LATENCY names the blocking op.
    let err = run("strategy = \"OPTIMIZE_FOR_LATENCY\"")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("'log' (Softplus): no int8 kernel for Softplus"),
        "{err}"
    );
    // ... unless it is excluded explicitly.
    let out = run("strategy = \"OPTIMIZE_FOR_LATENCY\"\nexclude = [\"log\"]").unwrap();
    let q = graph_of(&out);
    assert_eq!(q.node("x").unwrap().attr_type("dtype").unwrap(), DType::I8);
    assert_eq!(q.node(&q.outputs[0].node).unwrap().op, "Softmax");
    // An excluded quantizable op stays float too; unknown names are a usage error.
    let out = run("exclude = [\"logits\"]").unwrap();
    let q = graph_of(&out);
    assert!(!q.node("logits").unwrap().output_quant.contains_key(&0));
    assert_eq!(metric(&out, "float_ops"), 2);
    let err = run("exclude = [\"nope\"]").unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("'nope'"));
}

#[test]
fn optimize_for_size_stores_every_weight_in_int8_and_is_smallest() {
    for model in MODELS {
        let (size, out) = quantize_fixture(model, "strategy = \"OPTIMIZE_FOR_SIZE\"");
        assert_eq!(metric(&out, "mode"), "weight_only");
        assert_eq!(metric(&out, "int8_ops"), 0);
        let n = metric(&out, "weights_quantized").as_u64().unwrap() as usize;
        assert_eq!(n, int8_consts(&size), "{model}");
        assert_eq!(ops(&size, "Dequantize"), n, "{model}");
        // Embedding tables are weights too.
        if model != "conv_bn" {
            let gather = size.nodes.iter().find(|n| n.op == "GatherV2").unwrap();
            assert_eq!(size.node(&gather.inputs[0].node).unwrap().op, "Dequantize");
        }
        // Float compute on dequantized weights stays close to the float model.
        let g = stripped_fixture(model);
        let x = fixture(&format!("{model}/eval_x.npy"));
        let a = run_qpipe(&g, &x);
        let b = run_qpipe(&size, &x);
        assert!(top1_agreement(&a[0], &b[0]) > 0.97, "{model}");
        let (full, _) = quantize_fixture(model, "calibration = \"calib\"");
        let (_, size_bytes) = tflite::export(&size).unwrap();
        let (_, full_bytes) = tflite::export(&full).unwrap();
        eprintln!(
            "{model}: OPTIMIZE_FOR_SIZE {} bytes, DEFAULT {} bytes",
            size_bytes.len(),
            full_bytes.len()
        );
        assert!(size_bytes.len() <= full_bytes.len(), "{model}");
    }
}

#[test]
fn default_without_calibration_is_dynamic_range() {
    for model in MODELS {
        let (g, out) = quantize_fixture(model, "");
        assert_eq!(metric(&out, "mode"), "dynamic_range");
        for n in &g.nodes {
            if let Some(t) = n.const_value() {
                if t.dtype() == DType::I8 {
                    assert!(
                        t.len() >= 1024,
                        "{model}: {} has {} elements",
                        n.name,
                        t.len()
                    );
                } else if t.dtype() == DType::F32 {
                    let feeds_weight = g
                        .nodes
                        .iter()
                        .any(|c| c.op.starts_with("_Fused") && c.inputs[1].node == n.name);
                    assert!(!feeds_weight || t.len() < 1024, "{model}: {}", n.name);
                }
            }
        }
        assert!(
            metric(&out, "weights_quantized").as_u64().unwrap() >= 1,
            "{model}"
        );
    }
}

#[test]
fn optimize_for_latency_has_an_int8_interface_that_runs_in_litert() {
    let model = "conv_bn";
    let (g, out) = quantize_fixture(
        model,
        "calibration = \"calib\"\nstrategy = \"OPTIMIZE_FOR_LATENCY\"",
    );
    assert_eq!(metric(&out, "strategy"), "OPTIMIZE_FOR_LATENCY");
    assert_eq!(ops(&g, "Quantize") + ops(&g, "Dequantize"), 0);
    let input = g.node("input_x").unwrap();
    assert_eq!(input.attr_type("dtype").unwrap(), DType::I8);
    let q = input.output_quant[&0].clone();
    // Feed LiteRT and qpipe the same int8 input.
    let x = qpipe::npy::read(&fixture(&format!("{model}/eval_x.npy"))).unwrap();
    let xq: Vec<i8> = x
        .to_f32_vec()
        .unwrap()
        .iter()
        .map(|&v| {
            qpipe::kernels::rounding::quantize_value(
                v,
                q.scale[0],
                q.zero_point[0] as i32,
                -128,
                127,
            ) as i8
        })
        .collect();
    let xq = qpipe::ir::Tensor::from_vec(x.shape().to_vec(), &xq);
    let dir = tmp_dir("q8_latency_conv_bn");
    let xp = dir.join("x.npy");
    qpipe::npy::write(&xp, &xq).unwrap();
    let (_, bytes) = tflite::export(&g).unwrap();
    let path = dir.join("model.tflite");
    std::fs::write(&path, bytes).unwrap();
    let ours = qpipe::kernels::run(&g, &[("input_x", xq)], &g.outputs).unwrap();
    assert_eq!(ours[0].dtype(), DType::I8);
    let theirs = run_litert(&path, &[("input_x", &xp)], Resolver::Reference, &dir).unwrap();
    assert_eq!(theirs[0].dtype(), DType::I8);
    assert_eq!(theirs[0].bytes(), ours[0].bytes());
}

#[test]
fn an_int8_graph_is_not_exported_as_a_graphdef() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let frozen = qpipe::formats::tf::graph_def::read_graph_def(
        &root.join("fixtures/push_student/tf_frozen.pb"),
    );
    assert!(frozen.is_ok());
    let mut g = frozen.unwrap();
    let victim = g.nodes.iter().position(|n| n.op == "Relu").expect("a Relu");
    g.nodes[victim]
        .output_quant
        .insert(0, qpipe::ir::QuantParams::per_tensor(0.1, -128));
    let err = qpipe::formats::tf::export_graphdef(&g)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&g.nodes[victim].name) && err.contains("export_tflite"),
        "{err}"
    );
}
