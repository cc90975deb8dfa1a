//! Issue 16, calibration: `method` (minmax, percentile, mse, kl, auto) over one
//! memoized histogram, `equalize` and `bias_correction` on `quantize_int8`.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use qpipe::formats::tflite;
use qpipe::ir::{Graph, Tensor};
use qpipe::pipeline::Recipe;
use qpipe::spec::DatasetSpec;
use qpipe::stages::strip_training::{strip, StripOptions};
use qpipe::stages::{registry, Artifact, StageOutput};
use support::fixtures::{fixture_dir, model_json};
use support::graph_builder::{f32t, r, G};
use support::litert_oracle::{run_litert_batch, BatchJob, Resolver};
use support::stage_runner::{graph_of, run_stage, MemMemo};
use support::tmp_dir;

/// The fixture's frozen graph after strip_training, and its `calib` and `eval` data
/// sets, for both fixture layouts (`model.json` with per-input files, or the older
/// `calib_x.npy` / `eval_x.npy`).
fn fixture(model: &str) -> (Graph, BTreeMap<String, DatasetSpec>) {
    let dir = fixture_dir(model);
    let mut g = qpipe::formats::tf::graph_def::read_graph_def(&dir.join("tf_frozen.pb")).unwrap();
    let info = model_json(model);
    let inputs = info["inputs"].as_object().unwrap();
    g.inputs = inputs.keys().cloned().collect();
    g.outputs = info["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| r(o.as_str().or(o["name"].as_str()).unwrap()))
        .collect();
    let (g, _) = strip(&g, &g.inputs, &g.outputs, &StripOptions::default()).unwrap();
    let files = |split: &str| -> BTreeMap<String, PathBuf> {
        inputs
            .iter()
            .map(|(k, v)| {
                let f = v[split]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or(format!("{split}_x.npy"));
                (k.clone(), dir.join(f))
            })
            .collect()
    };
    let ds = BTreeMap::from([
        (
            "calib".to_string(),
            DatasetSpec {
                tensors: files("calib"),
                labels: None,
            },
        ),
        (
            "eval".to_string(),
            DatasetSpec {
                tensors: files("eval"),
                labels: Some(dir.join("eval_y.npy")),
            },
        ),
    ]);
    (g, ds)
}

fn quantize(
    g: &Graph,
    ds: &BTreeMap<String, DatasetSpec>,
    cfg: &str,
    memo: &MemMemo,
) -> StageOutput {
    run_stage(
        "quantize_int8",
        &format!("input = \"strip\"\ncalibration = \"calib\"\n{cfg}"),
        vec![("input", Artifact::Graph(Arc::new(g.clone())))],
        ds,
        memo,
    )
    .unwrap_or_else(|e| panic!("{cfg}: {e}"))
}

/// validate's (reference accuracy, candidate accuracy, samples) on `eval`.
fn validate(
    reference: &Graph,
    candidate: &Graph,
    ds: &BTreeMap<String, DatasetSpec>,
) -> (f64, f64, f64) {
    let out = run_stage(
        "validate",
        "reference = \"strip\"\ncandidate = \"q\"\ndataset = \"eval\"",
        vec![
            ("reference", Artifact::Graph(Arc::new(reference.clone()))),
            ("candidate", Artifact::Graph(Arc::new(candidate.clone()))),
        ],
        ds,
        &MemMemo::default(),
    )
    .unwrap();
    let n = |k: &str| {
        out.metrics[k]
            .as_f64()
            .unwrap_or_else(|| panic!("{k}: {:?}", out.metrics))
    };
    (
        n("reference_accuracy"),
        n("candidate_accuracy"),
        n("samples"),
    )
}

fn accuracy(scores: &Tensor, labels: &std::path::Path) -> f64 {
    let labels = qpipe::npy::read(labels).unwrap();
    let ids = qpipe::kernels::dataset::class_ids(&labels).unwrap();
    let s = scores.to_f64_vec().unwrap();
    let pred = qpipe::kernels::dataset::argmax_rows(&s, ids.len(), scores.shape()[1]);
    pred.iter().zip(&ids).filter(|(a, b)| a == b).count() as f64 / ids.len() as f64
}

const Q16: [&str; 3] = [
    "q16_outlier_inputs",
    "q16_outlier_channel",
    "q16_sensitive_act",
];

/// Done-when of issue 16 (calibration half): on each q16 fixture, where min/max
/// loses at least 3 points, `auto` + equalization + bias correction is within one
/// point of float, full integer with a float interface
/// (DEFAULT) and with int8 I/O (OPTIMIZE_FOR_LATENCY); and LiteRT's reference
/// kernels score the exported file exactly as validate does (one batched LiteRT
/// process).
#[test]
fn auto_with_equalization_and_bias_correction_is_within_a_point_of_float() {
    let dir = tmp_dir("calibration_methods_q16");
    let mut jobs = Vec::new();
    let mut expected = Vec::new();
    for model in Q16 {
        let (g, ds) = fixture(model);
        let memo = MemMemo::default();
        let minmax = graph_of(&quantize(&g, &ds, "", &memo));
        let (float_acc, minmax_acc, _) = validate(&g, &minmax, &ds);
        assert!(
            float_acc - minmax_acc >= 0.03 - 1e-9,
            "{model}: min/max loses only {} points",
            100.0 * (float_acc - minmax_acc)
        );
        for strategy in ["DEFAULT", "OPTIMIZE_FOR_LATENCY"] {
            let cfg = format!(
                "strategy = \"{strategy}\"\nmethod = \"auto\"\nequalize = true\n\
                 bias_correction = true"
            );
            let out = quantize(&g, &ds, &cfg, &memo);
            assert_eq!(out.metrics["method"], "auto");
            assert!(
                out.metrics["bias_corrected_layers"].as_u64().unwrap() >= 2,
                "{model}"
            );
            let q = graph_of(&out);
            let (_, acc, samples) = validate(&g, &q, &ds);
            eprintln!(
                "{model} {strategy}: float {float_acc:.4}, minmax {minmax_acc:.4}, auto+eq+bc {acc:.4}"
            );
            assert!(samples >= 1000.0, "{model}: only {samples} eval rows");
            assert!(
                float_acc - acc <= 0.01 + 1e-9,
                "{model} {strategy}: auto + equalize + bias_correction loses {} points",
                100.0 * (float_acc - acc)
            );
            let (_, bytes) = tflite::export(&q).unwrap();
            let path = dir.join(format!("{model}_{strategy}.tflite"));
            std::fs::write(&path, bytes).unwrap();
            jobs.push(BatchJob {
                model: path,
                inputs: ds["eval"]
                    .tensors
                    .iter()
                    .map(|(k, p)| (k.clone(), p.clone()))
                    .collect(),
                resolver: Resolver::Reference,
                out_dir: dir.join(format!("{model}_{strategy}")),
            });
            expected.push((model, strategy, acc, samples));
        }
    }
    let results = run_litert_batch(&jobs, &dir);
    for ((model, strategy, acc, samples), res) in expected.into_iter().zip(results) {
        let outs = res.unwrap_or_else(|e| panic!("{model} {strategy}: LiteRT: {e}"));
        let litert = accuracy(&outs[0], &fixture_dir(model).join("eval_y.npy"));
        assert_eq!(
            (litert * samples).round(),
            (acc * samples).round(),
            "{model} {strategy}: LiteRT {litert}, validate {acc}"
        );
    }
}

/// On the existing fixtures `auto` is no worse than min/max by more than one
/// sample in a thousand (fam_dynamic_rnn does not strip, fam_decoders has no labels).
#[test]
fn auto_is_no_worse_than_minmax_on_the_existing_fixtures() {
    let models = [
        "push_student",
        "conv_bn",
        "mlp_res",
        "fam_arith",
        "fam_atrous",
        "fam_attention",
        "fam_conv_gap",
        "fam_lstm",
        "fam_mlp_bn",
        "fam_mobilenet_v2",
        "fam_mobilenet_v3",
        "fam_multi_io",
        "fam_shapes",
    ];
    for model in models {
        let (g, ds) = fixture(model);
        let memo = MemMemo::default();
        let minmax = graph_of(&quantize(&g, &ds, "", &memo));
        let auto = quantize(&g, &ds, "method = \"auto\"", &memo);
        assert_eq!(auto.metrics["calibration_cached"], true, "{model}");
        let (_, a, samples) = validate(&g, &minmax, &ds);
        let (_, b, _) = validate(&g, &graph_of(&auto), &ds);
        eprintln!("{model}: minmax {a:.4}, auto {b:.4} ({samples} samples)");
        assert!(
            a - b <= 0.001 + 1e-9,
            "{model}: auto {b} is more than one sample in a thousand below min/max {a}"
        );
    }
}

/// The histograms are part of the calibration memo: another method or percentile
/// reuses them (no pass over the model), while `equalize` (another graph runs) and
/// `bias_correction` (per-channel means are recorded) calibrate again. The method is
/// in the metrics. min/max ranges are unchanged by the histograms.
#[test]
fn changing_the_method_does_not_rerun_the_model() {
    let (g, ds) = fixture("q16_sensitive_act");
    let memo = MemMemo::default();
    let first = quantize(&g, &ds, "method = \"auto\"", &memo);
    assert_eq!(memo.computed(), 1);
    assert_eq!(first.metrics["calibration_cached"], false);
    let mut ranges = BTreeMap::new();
    for cfg in [
        "method = \"kl\"",
        "method = \"mse\"",
        "method = \"percentile\"\npercentile = 99.9",
        "method = \"percentile\"",
        "",
    ] {
        let out = quantize(&g, &ds, cfg, &memo);
        assert_eq!(memo.computed(), 1, "{cfg} ran the calibration pass again");
        assert_eq!(out.metrics["calibration_cached"], true, "{cfg}");
        let q = graph_of(&out);
        let exp = q
            .nodes
            .iter()
            .find(|n| n.name == "sensitive/Exp")
            .and_then(|n| n.output_quant.get(&0))
            .map(|p| p.scale[0]);
        ranges.insert(cfg.to_string(), (out.metrics["method"].clone(), exp));
    }
    assert_eq!(ranges["method = \"kl\""].0, "kl");
    assert_eq!(ranges[""].0, "minmax");
    // The methods clip the heavy-tailed exp differently from min/max.
    assert_ne!(ranges["method = \"kl\""].1, ranges[""].1);
    assert_ne!(
        ranges["method = \"percentile\"\npercentile = 99.9"].1,
        ranges["method = \"percentile\""].1
    );
    quantize(&g, &ds, "equalize = true", &memo);
    assert_eq!(memo.computed(), 2, "equalize must recalibrate");
    quantize(&g, &ds, "equalize = true\nmethod = \"mse\"", &memo);
    assert_eq!(memo.computed(), 2);
    quantize(&g, &ds, "bias_correction = true", &memo);
    assert_eq!(memo.computed(), 3, "bias_correction must recalibrate");
}

fn outputs(g: &Graph, ds: &DatasetSpec) -> Vec<f32> {
    let feeds: Vec<(&str, Tensor)> = ds
        .tensors
        .iter()
        .map(|(k, p)| (k.as_str(), qpipe::npy::read(p).unwrap()))
        .collect();
    let out =
        qpipe::kernels::run_with(g, &feeds, &g.outputs, qpipe::kernels::Arithmetic::Reference)
            .unwrap();
    out.iter()
        .flat_map(|t| t.to_f64_vec().unwrap())
        .map(|v| v as f32)
        .collect()
}

/// Equalization leaves the float function as it was (outputs within 1e-5) and
/// balances the outlier channel; a pair through a ReLU6 with an unbounded input is
/// left alone.
#[test]
fn equalization_preserves_the_float_outputs() {
    use qpipe::stages::quantize_int8::equalize::equalize;
    for model in ["q16_outlier_channel", "conv_bn", "fam_mlp_bn"] {
        let (g, ds) = fixture(model);
        let (fused, _) = qpipe::ir::passes::fuse::fuse(&g, true).unwrap();
        let (eq, report) = equalize(&fused).unwrap();
        let (a, b) = (outputs(&fused, &ds["eval"]), outputs(&eq, &ds["eval"]));
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        eprintln!(
            "{model}: {} pairs equalized, max |Δ| {worst:e}",
            report.pairs.len()
        );
        assert!(worst <= 1e-5, "{model}: outputs moved by {worst}");
        if model == "q16_outlier_channel" {
            assert!(!report.pairs.is_empty());
            // dense_1's outlier unit (×300) no longer dominates its weights' range.
            // dense_1's kernel, [16, 8].
            let w = |gr: &Graph| -> Vec<f32> {
                gr.nodes
                    .iter()
                    .filter_map(|n| n.const_value())
                    .find(|t| t.shape() == [16, 8])
                    .unwrap()
                    .values::<f32>()
                    .unwrap()
            };
            let spread = |v: &[f32]| {
                let cols = 8;
                let m: Vec<f32> = (0..cols)
                    .map(|c| {
                        v.iter()
                            .skip(c)
                            .step_by(cols)
                            .fold(0f32, |a, x| a.max(x.abs()))
                    })
                    .collect();
                m.iter().cloned().fold(0f32, f32::max) / m.iter().cloned().fold(f32::MAX, f32::min)
            };
            let (before, after) = (spread(&w(&fused)), spread(&w(&eq)));
            assert!(after * 10.0 < before, "channel spread {before} → {after}");
        }
    }
    // MatMul → BiasAdd → Relu6 → MatMul → BiasAdd on an unbounded input.
    let mut b = G::new();
    b.placeholder("x", qpipe::ir::DType::F32, Some(&[-1, 2]));
    b.konst("w1", f32t(&[2, 2], &[100.0, 0.01, 1.0, 0.02]));
    b.konst("b1", f32t(&[2], &[0.0, 0.0]));
    b.konst("w2", f32t(&[2, 2], &[0.01, 0.01, 1.0, 1.0]));
    b.konst("b2", f32t(&[2], &[0.0, 0.0]));
    b.op("m1", "MatMul", &["x", "w1"], &[]);
    b.op("a1", "BiasAdd", &["m1", "b1"], &[]);
    b.op("r1", "Relu6", &["a1"], &[]);
    b.op("m2", "MatMul", &["r1", "w2"], &[]);
    b.op("a2", "BiasAdd", &["m2", "b2"], &[]);
    b.output("a2");
    let (f, _) = qpipe::ir::passes::fuse::fuse(&b.g, true).unwrap();
    let (_, report) = equalize(&f).unwrap();
    assert!(report.pairs.is_empty());
    assert!(
        report
            .skipped
            .iter()
            .any(|(_, _, why)| why.contains("ReLU6")),
        "{:?}",
        report.skipped
    );
}

/// Bad values of the new keys are recipe errors at their line:col.
#[test]
fn bad_calibration_settings_are_recipe_errors() {
    let dir = tmp_dir("calibration_methods_recipes");
    std::fs::write(dir.join("model.pb"), b"x").unwrap();
    std::fs::write(dir.join("calib_x.npy"), b"x").unwrap();
    let base =
        "[pipeline]\nname = \"c\"\n\n[model]\ngraph = \"model.pb\"\ninputs = [\"input_x\"]\n\
                outputs = [\"out\"]\n\n[datasets.calib]\ninput_x = \"calib_x.npy\"\n\n\
                [stages.freeze]\nkind = \"freeze\"\n\n[stages.q]\nkind = \"quantize_int8\"\n\
                input = \"freeze\"\n";
    let cases = [
        (
            "calibration = \"calib\"\nmethod = \"entropy\"\n",
            "method",
            "entropy",
        ),
        (
            "calibration = \"calib\"\nmethod = \"percentile\"\npercentile = 0.0\n",
            "percentile",
            "outside (0, 100]",
        ),
        (
            "calibration = \"calib\"\nmethod = \"percentile\"\npercentile = 100.5\n",
            "percentile",
            "outside (0, 100]",
        ),
        (
            "calibration = \"calib\"\npercentile = 99.9\n",
            "percentile",
            "method = \"percentile\"",
        ),
        ("method = \"kl\"\n", "method", "needs a calibration pass"),
        (
            "calibration = \"calib\"\nstrategy = \"OPTIMIZE_FOR_SIZE\"\nmethod = \"auto\"\n",
            "method",
            "needs a calibration pass",
        ),
        ("equalize = true\n", "equalize", "needs a calibration pass"),
        (
            "bias_correction = true\n",
            "bias_correction",
            "needs a calibration pass",
        ),
    ];
    for (extra, key, message) in cases {
        let text = format!("{base}{extra}");
        let path = dir.join("recipe.toml");
        std::fs::write(&path, &text).unwrap();
        let err = Recipe::parse(&text, &path, registry::REGISTRY)
            .err()
            .unwrap_or_else(|| panic!("{extra} was accepted"))
            .to_string();
        // The line of the offending key's value.
        let line = text[..text.rfind(&format!("{key} =")).unwrap()]
            .matches('\n')
            .count()
            + 1;
        assert!(
            err.contains(&format!("recipe.toml:{line}:")),
            "{extra}: {err}"
        );
        assert!(err.contains(message), "{extra}: {err}");
    }
    let text =
        format!("{base}calibration = \"calib\"\nmethod = \"percentile\"\npercentile = 99.9\n");
    let path = dir.join("recipe.toml");
    std::fs::write(&path, &text).unwrap();
    assert!(Recipe::parse(&text, &path, registry::REGISTRY).is_ok());
}
