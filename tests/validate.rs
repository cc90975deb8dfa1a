//! `validate` on the fixture models: the metrics it reports, the per-layer table,
//! the gate, int8-interface candidates, and its accuracy against LiteRT's on the
//! exported model.

mod support;

use std::sync::Arc;

use qpipe::formats::tflite;
use qpipe::ir::Graph;
use qpipe::stages::{Artifact, StageOutput};
use support::fixtures::{eval_accuracy, fixture, fixture_datasets, stripped_fixture, MODELS};
use support::graph_builder::{f32t, G};
use support::litert_oracle::{run_litert, Resolver};
use support::stage_runner::{graph_of, quantize_fixture, run_stage, MemMemo};
use support::tmp_dir;

fn validate(
    model: &str,
    reference: Graph,
    candidate: Graph,
    extra: &str,
) -> qpipe::Result<StageOutput> {
    let ds = fixture_datasets(model);
    run_stage(
        "validate",
        &format!("reference = \"strip\"\ncandidate = \"quant\"\ndataset = \"eval\"\n{extra}"),
        vec![
            ("reference", Artifact::Graph(Arc::new(reference))),
            ("candidate", Artifact::Graph(Arc::new(candidate))),
        ],
        &ds,
        &MemMemo::default(),
    )
}

fn num(out: &StageOutput, key: &str) -> f64 {
    out.metrics
        .get(key)
        .and_then(|v| v.as_f64())
        .unwrap_or_else(|| panic!("metric {key} missing in {:?}", out.metrics))
}

#[test]
fn reports_accuracy_agreement_errors_and_a_layer_table() {
    for model in MODELS {
        let reference = stripped_fixture(model);
        let (candidate, _) = quantize_fixture(model, "calibration = \"calib\"");
        let out = validate(model, reference, candidate.clone(), "").unwrap();
        for key in [
            "reference_accuracy",
            "candidate_accuracy",
            "accuracy_drop",
            "agreement",
            "max_abs_error",
            "mean_abs_error",
            "samples",
        ] {
            assert!(out.metrics.contains_key(key), "{model}: no {key}");
        }
        let json: serde_json::Value = serde_json::from_slice(
            &std::fs::read(fixture(&format!("{model}/model.json"))).unwrap(),
        )
        .unwrap();
        let tf_acc = json["tf_eval_accuracy"].as_f64().unwrap();
        assert!(
            (num(&out, "reference_accuracy") - tf_acc).abs() < 1e-9,
            "{model}"
        );
        let drop = num(&out, "accuracy_drop");
        assert!(
            (num(&out, "reference_accuracy") - num(&out, "candidate_accuracy") - drop).abs()
                < 1e-12
        );
        assert!(drop.abs() < 0.02, "{model}: drop {drop}");
        assert!(num(&out, "agreement") > 0.95, "{model}");
        assert_eq!(num(&out, "samples"), 1000.0);
        assert!(num(&out, "max_abs_error") >= num(&out, "mean_abs_error"));
        // The per-layer table: worst SQNR first, every quantized activation compared.
        let Artifact::Report(report) = &out.artifact else {
            panic!("validate returns a report")
        };
        let layers = report["layers"].as_array().unwrap();
        assert!(layers.len() >= 5, "{model}: {} layers", layers.len());
        let sqnr: Vec<f64> = layers
            .iter()
            .map(|l| l["sqnr_db"].as_f64().unwrap_or(f64::INFINITY))
            .collect();
        assert!(sqnr.windows(2).all(|w| w[0] <= w[1]), "{model}: {sqnr:?}");
        for l in layers {
            let ratio = l["rmse_over_scale"].as_f64().unwrap();
            assert!(ratio < 10.0, "{model}: {l}");
            assert!(l["scale"].as_f64().unwrap() > 0.0);
        }
        assert_eq!(out.files.len(), 1);
        assert_eq!(out.files[0].path.to_str(), Some("quant.layers.json"));
        let file: serde_json::Value = serde_json::from_slice(&out.files[0].bytes).unwrap();
        assert_eq!(file["layers"].as_array().unwrap().len(), layers.len());

        assert_eq!(out.metrics["runtime"], "litert-ref");
        // Full-integer int8: XNNPACK requantizes with one rounding, the reference
        // kernels with two, and the one-LSB differences move top-1 predictions.
        // Measured correct samples of 1000, BUILTIN_REF / default interpreter (AVX-512
        // native and AVX2 under QEMU -cpu Haswell and EPYC-Rome alike): conv_bn
        // 832 / 830, mlp_res 769 / 769, push_student 757 / 757. So two samples.
        check_against_litert(model, &candidate, &out, "int8", 2);
    }
}

/// The accuracy validate reports by default is the one LiteRT's reference kernels
/// (`BUILTIN_REF`) give on the exported model, to the sample, on every CPU. The
/// default `Interpreter()` (XNNPACK) picks kernels by CPU; its accuracy is at
/// most `max_samples` samples from it.
fn check_against_litert(
    model: &str,
    candidate: &Graph,
    out: &StageOutput,
    tag: &str,
    max_samples: u32,
) {
    let dir = tmp_dir(&format!("validate_{model}_{tag}"));
    let (_, bytes) = tflite::export(candidate).unwrap();
    let path = dir.join("model.tflite");
    std::fs::write(&path, bytes).unwrap();
    let x = fixture(&format!("{model}/eval_x.npy"));
    let validated = num(out, "candidate_accuracy");
    let samples = num(out, "samples");
    for resolver in Resolver::ALL {
        let got = run_litert(
            &path,
            &[("input_x", &x)],
            resolver,
            &dir.join(format!("{resolver:?}")),
        )
        .unwrap();
        let litert = eval_accuracy(model, &got[0]);
        eprintln!("{model} {tag}: LiteRT {resolver:?} accuracy {litert}, validate {validated}");
        match resolver {
            Resolver::Reference => assert_eq!(litert, validated, "{model} {tag}"),
            Resolver::Default => assert!(
                ((litert - validated) * samples).abs() <= max_samples as f64 + 1e-9,
                "{model} {tag}: the default interpreter's accuracy {litert} is more than \
                 {max_samples} samples from validate's {validated}"
            ),
        }
    }
}

#[test]
fn validate_of_hybrid_models_matches_litert_reference_accuracy() {
    for model in MODELS {
        let reference = stripped_fixture(model);
        let (candidate, _) = quantize_fixture(model, "");
        let out = validate(model, reference, candidate.clone(), "").unwrap();
        // Hybrid: measured conv_bn 830 / 830, mlp_res 768 / 768, push_student 756 / 757.
        check_against_litert(model, &candidate, &out, "hybrid", 1);
    }
}

#[test]
fn the_runtime_is_part_of_the_stage_config_and_defaults_to_litert_ref() {
    let config = |extra: &str| {
        let toml = format!("reference = \"a\"\ncandidate = \"b\"\ndataset = \"eval\"\n{extra}");
        let table = qpipe::stages::ConfigTable::parse(&toml).unwrap();
        match (qpipe::stages::registry::factory("validate").unwrap().build)(&table) {
            Ok(stage) => stage.config(),
            Err(e) => panic!("{}", e.message),
        }
    };
    assert_eq!(config("")["runtime"], "litert-ref");
    assert_eq!(config(""), config("runtime = \"litert-ref\""));
    assert!(config("").get("xnnpack_cpu").is_none());
    // XNNPACK's results depend on the CPU: its features are part of the key.
    let x = config("runtime = \"xnnpack\"");
    assert_ne!(config(""), x);
    assert_eq!(
        x["xnnpack_cpu"],
        qpipe::stages::validate::xnnpack_cpu().as_str()
    );
    if cfg!(target_arch = "x86_64") {
        assert!(x["xnnpack_cpu"].as_str().unwrap().starts_with("x86_64"));
    }
}

#[test]
fn the_old_litert_runtime_name_is_an_error_explaining_the_rename() {
    let table = qpipe::stages::ConfigTable::parse(
        "reference = \"a\"\ncandidate = \"b\"\ndataset = \"eval\"\nruntime = \"litert\"",
    )
    .unwrap();
    let err = match (qpipe::stages::registry::factory("validate").unwrap().build)(&table) {
        Ok(_) => panic!("runtime = \"litert\" was accepted"),
        Err(e) => e,
    };
    assert!(
        err.message.contains("renamed") && err.message.contains("xnnpack"),
        "{}",
        err.message
    );
}

#[test]
fn an_unknown_runtime_is_a_config_error() {
    let table = qpipe::stages::ConfigTable::parse(
        "reference = \"a\"\ncandidate = \"b\"\ndataset = \"eval\"\nruntime = \"tflite\"",
    )
    .unwrap();
    let err = match (qpipe::stages::registry::factory("validate").unwrap().build)(&table) {
        Ok(_) => panic!("runtime = \"tflite\" was accepted"),
        Err(e) => e,
    };
    assert!(
        err.message.contains("litert-ref") && err.message.contains("tflite"),
        "{}",
        err.message
    );
}

#[test]
fn the_gate_fails_with_the_measured_drop_and_the_worst_layers() {
    let model = "push_student";
    let reference = stripped_fixture(model);
    let (candidate, _) = quantize_fixture(model, "calibration = \"calib\"");
    let err = validate(
        model,
        reference.clone(),
        candidate.clone(),
        "max_accuracy_drop = -0.05",
    )
    .unwrap_err();
    let msg = err.to_string();
    assert_eq!(err.exit_code(), 1);
    assert!(msg.contains("accuracy drop"), "{msg}");
    assert!(
        msg.contains("exceeds max_accuracy_drop -5.00 points"),
        "{msg}"
    );
    assert!(msg.contains("worst layers: "), "{msg}");
    assert!(msg.contains("SQNR"), "{msg}");
    let err = validate(
        model,
        reference.clone(),
        candidate.clone(),
        "min_agreement = 1.01",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("below min_agreement 101.00%"), "{err}");
    // A generous gate passes.
    validate(
        model,
        reference,
        candidate,
        "max_accuracy_drop = 0.02\nmin_agreement = 0.9",
    )
    .unwrap();
}

#[test]
fn a_gate_on_accuracy_needs_labels() {
    let model = "mlp_res";
    let reference = stripped_fixture(model);
    let ds = fixture_datasets(model);
    let err = run_stage(
        "validate",
        "reference = \"a\"\ncandidate = \"b\"\ndataset = \"calib\"\nmax_accuracy_drop = 0.01",
        vec![
            ("reference", Artifact::Graph(Arc::new(reference.clone()))),
            ("candidate", Artifact::Graph(Arc::new(reference))),
        ],
        &ds,
        &MemMemo::default(),
    )
    .unwrap_err();
    assert_eq!(err.exit_code(), 2, "{err}");
    assert!(err.to_string().contains("needs labels"), "{err}");
}

#[test]
fn an_int8_interface_candidate_is_fed_quantized_inputs() {
    let model = "conv_bn";
    let reference = stripped_fixture(model);
    let (latency, _) = quantize_fixture(
        model,
        "calibration = \"calib\"\nstrategy = \"OPTIMIZE_FOR_LATENCY\"",
    );
    let (default, _) = quantize_fixture(model, "calibration = \"calib\"");
    let a = validate(model, reference.clone(), latency, "").unwrap();
    let b = validate(model, reference, default, "").unwrap();
    // Same int8 computation; only the interface differs.
    assert_eq!(num(&a, "candidate_accuracy"), num(&b, "candidate_accuracy"));
    assert_eq!(num(&a, "agreement"), num(&b, "agreement"));
    assert!((num(&a, "mean_abs_error") - num(&b, "mean_abs_error")).abs() < 1e-12);
}

use qpipe::ir::{Attr, DType, Tensor};
use qpipe::spec::DatasetSpec;
use std::collections::BTreeMap;

/// x[-1, 4] → three heads: `probs` (softmax over 3), `sig` ([n, 1] sigmoid), and
/// optionally `cls` (ArgMax of probs, int64 [n]) and `reg` (a float [n]: regression).
/// `shift` is added to the sigmoid head's bias.
fn heads(shift: f32, cls: bool, reg: bool) -> Graph {
    let mut b = G::new();
    b.placeholder("x", DType::F32, Some(&[-1, 4]));
    let w: Vec<f32> = (0..12).map(|i| ((i * 7 % 11) as f32 - 5.0) / 5.0).collect();
    b.konst("w1", f32t(&[4, 3], &w));
    b.op("logits", "MatMul", &["x", "w1"], &[]);
    b.op("probs", "Softmax", &["logits"], &[]);
    b.konst("w2", f32t(&[4, 1], &[0.5, -0.25, 0.75, -1.0]));
    b.op("z", "MatMul", &["x", "w2"], &[]);
    b.konst("b2", f32t(&[1], &[shift]));
    b.op("zb", "BiasAdd", &["z", "b2"], &[]);
    b.op("sig", "Sigmoid", &["zb"], &[]);
    b.output("probs");
    b.output("sig");
    if cls {
        b.konst("axis", Tensor::from_vec(vec![], &[1i32]));
        b.op(
            "cls",
            "ArgMax",
            &["probs", "axis"],
            &[
                ("Tidx", Attr::Type(DType::I32)),
                ("output_type", Attr::Type(DType::I64)),
            ],
        );
        b.output("cls");
    }
    if reg {
        b.konst("ax1", Tensor::from_vec(vec![1], &[1i32]));
        b.op(
            "reg",
            "Sum",
            &["x", "ax1"],
            &[
                ("keep_dims", Attr::Bool(false)),
                ("Tidx", Attr::Type(DType::I32)),
            ],
        );
        b.output("reg");
    }
    b.g
}

/// A data set of `n` rows of x (and labels, when given) written under `dir`.
fn heads_data(dir: &str, x: &[f32], labels: Option<Tensor>) -> BTreeMap<String, DatasetSpec> {
    let d = tmp_dir(dir);
    let xp = d.join("x.npy");
    qpipe::npy::write(&xp, &f32t(&[x.len() / 4, 4], x)).unwrap();
    let labels = labels.map(|t| {
        let p = d.join("y.npy");
        qpipe::npy::write(&p, &t).unwrap();
        p
    });
    BTreeMap::from([(
        "eval".to_string(),
        DatasetSpec {
            tensors: BTreeMap::from([("x".to_string(), xp)]),
            labels,
        },
    )])
}

fn rows(n: usize) -> Vec<f32> {
    let mut rng = support::numeric::Rng::new(7);
    rng.vec(n * 4).iter().map(|v| v * 2.0).collect()
}

fn validate_on(
    reference: Graph,
    candidate: Graph,
    ds: &BTreeMap<String, DatasetSpec>,
    extra: &str,
) -> qpipe::Result<StageOutput> {
    run_stage(
        "validate",
        &format!("reference = \"strip\"\ncandidate = \"quant\"\ndataset = \"eval\"\n{extra}"),
        vec![
            ("reference", Artifact::Graph(Arc::new(reference))),
            ("candidate", Artifact::Graph(Arc::new(candidate))),
        ],
        ds,
        &MemMemo::default(),
    )
}

#[test]
fn every_output_is_measured_and_gated() {
    let ds = heads_data("heads_every_output", &rows(200), None);
    let out = validate_on(heads(0.0, true, true), heads(0.3, true, true), &ds, "").unwrap();
    let outs = &out.metrics["outputs"];
    eprintln!("{outs}");
    for name in ["probs", "sig", "cls", "reg"] {
        assert!(outs[name]["max_abs_error"].is_number(), "{name}: {outs}");
        assert!(outs[name]["mean_abs_error"].is_number(), "{name}: {outs}");
    }
    assert_eq!(outs["probs"]["kind"], "class scores");
    assert_eq!(outs["sig"]["kind"], "sigmoid");
    assert_eq!(outs["cls"]["kind"], "class ids");
    assert_eq!(outs["reg"]["kind"], "regression");
    // Only the sigmoid head differs; the top-level keys are the first output's.
    assert_eq!(outs["probs"]["max_abs_error"], 0.0);
    assert_eq!(outs["probs"]["agreement"], 1.0);
    assert_eq!(outs["cls"]["agreement"], 1.0);
    assert!(outs["reg"].get("agreement").is_none());
    assert_eq!(num(&out, "max_abs_error"), 0.0);
    let sig_err = outs["sig"]["max_abs_error"].as_f64().unwrap();
    assert!(sig_err > 0.05, "{sig_err}");
    // A sigmoid's class is value > 0.5: shifting the logit flips some rows.
    let sig_agree = outs["sig"]["agreement"].as_f64().unwrap();
    assert!(sig_agree < 1.0 && sig_agree > 0.5, "{sig_agree}");

    // max_abs_error gates every output, naming the one that misses.
    let err = validate_on(
        heads(0.0, true, true),
        heads(0.3, true, true),
        &ds,
        "max_abs_error = 0.01",
    )
    .unwrap_err();
    assert_eq!(err.exit_code(), 1, "{err}");
    assert!(err.to_string().contains("output 'sig'"), "{err}");
    validate_on(
        heads(0.0, true, true),
        heads(0.3, true, true),
        &ds,
        &format!("max_abs_error = {}", sig_err * 1.01),
    )
    .unwrap();
    // min_agreement too; on a regression output it cannot be computed: that fails.
    let err = validate_on(
        heads(0.0, true, false),
        heads(0.3, true, false),
        &ds,
        "min_agreement = 0.99",
    )
    .unwrap_err();
    assert!(err.to_string().contains("output 'sig'"), "{err}");
    let err = validate_on(
        heads(0.0, true, true),
        heads(0.0, true, true),
        &ds,
        "min_agreement = 0.5",
    )
    .unwrap_err();
    assert_eq!(err.exit_code(), 2, "{err}");
    assert!(
        err.to_string().contains("output 'reg' (regression)"),
        "{err}"
    );
}

#[test]
fn labels_pair_with_the_first_output_or_labels_output() {
    let n = 100;
    let x = rows(n);
    let reference = heads(0.0, true, true);
    // The sigmoid's own classes as labels: the reference is always right.
    let sig = qpipe::kernels::run(
        &reference,
        &[("x", f32t(&[n, 4], &x))],
        &[support::graph_builder::r("sig")],
    )
    .unwrap()
    .remove(0)
    .to_f32_vec()
    .unwrap();
    let y: Vec<i64> = sig.iter().map(|&v| i64::from(v > 0.5)).collect();
    let ds = heads_data("heads_labels", &x, Some(Tensor::from_vec(vec![n], &y)));
    let out = validate_on(
        reference.clone(),
        heads(0.3, true, true),
        &ds,
        "labels_output = \"sig\"",
    )
    .unwrap();
    assert_eq!(num(&out, "reference_accuracy"), 1.0);
    assert_eq!(out.metrics["labels_output"], "sig");
    assert!(num(&out, "candidate_accuracy") < 1.0);
    // Labels of a binary head paired with the 3-class first output: still in range.
    let first = validate_on(reference.clone(), heads(0.3, true, true), &ds, "").unwrap();
    assert_eq!(first.metrics["labels_output"], "probs");
    // An accuracy gate on a regression output is an error naming it.
    let err = validate_on(
        reference.clone(),
        reference.clone(),
        &ds,
        "labels_output = \"reg\"\nmax_accuracy_drop = 0.01",
    )
    .unwrap_err();
    assert_eq!(err.exit_code(), 2, "{err}");
    assert!(err.to_string().contains("'reg' (regression)"), "{err}");
    // An unknown output name is an error naming it.
    let err = validate_on(
        reference.clone(),
        reference,
        &ds,
        "labels_output = \"nope\"",
    )
    .unwrap_err();
    assert_eq!(err.exit_code(), 2, "{err}");
    assert!(err.to_string().contains("'nope'"), "{err}");
    assert!(err.to_string().contains("probs, sig, cls, reg"), "{err}");
}

#[test]
fn nothing_validated_is_an_error() {
    let reference = heads(0.0, false, false);
    // An empty data set.
    let ds = heads_data(
        "heads_empty",
        &[],
        Some(Tensor::from_vec(vec![0], &[0i64; 0])),
    );
    let err = validate_on(
        reference.clone(),
        reference.clone(),
        &ds,
        "max_accuracy_drop = 0.0",
    )
    .unwrap_err();
    assert!(err.to_string().contains("has no rows"), "{err}");
    // samples = 0.
    let n = 10;
    let y = Tensor::from_vec(vec![n], &[0i64; 10]);
    let ds = heads_data("heads_samples0", &rows(n), Some(y));
    let err = validate_on(
        reference.clone(),
        reference.clone(),
        &ds,
        "samples = 0\nmax_accuracy_drop = 0.0",
    )
    .unwrap_err();
    assert!(err.to_string().contains("samples = 0"), "{err}");
    // A label outside the first output's 3 classes names the file and row.
    let mut labels = vec![0i64; n];
    labels[7] = 3;
    let ds = heads_data(
        "heads_label_range",
        &rows(n),
        Some(Tensor::from_vec(vec![n], &labels)),
    );
    let err =
        validate_on(reference.clone(), reference, &ds, "max_accuracy_drop = 0.0").unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("y.npy") && msg.contains("row 7") && msg.contains("label 3"),
        "{msg}"
    );
}

#[test]
fn non_finite_eval_data_is_an_error_naming_file_and_row() {
    let reference = heads(0.0, false, false);
    let mut x = rows(80);
    x[70 * 4 + 2] = f32::NAN;
    let ds = heads_data("heads_nan", &x, None);
    let err = validate_on(reference.clone(), reference, &ds, "").unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("x.npy") && msg.contains("row 70"), "{msg}");
}

// Data sets as validate and quantize_int8's calibration read them.

/// conv_bn's calibration set converted to `f` and written under `dir`, as data set
/// "calib" (and "eval", for validate).
fn converted_calib(
    dir: &str,
    f: impl Fn(&[f32], Vec<usize>) -> Tensor,
) -> BTreeMap<String, DatasetSpec> {
    let t = qpipe::npy::read(&fixture("conv_bn/calib_x.npy")).unwrap();
    let d = tmp_dir(dir);
    let p = d.join("calib_x.npy");
    qpipe::npy::write(&p, &f(&t.to_f32_vec().unwrap(), t.shape().to_vec())).unwrap();
    let spec = DatasetSpec {
        tensors: BTreeMap::from([("input_x".to_string(), p)]),
        labels: None,
    };
    BTreeMap::from([
        ("calib".to_string(), spec.clone()),
        ("eval".to_string(), spec),
    ])
}

fn quantize_on(ds: &BTreeMap<String, DatasetSpec>, extra: &str) -> qpipe::Result<StageOutput> {
    run_stage(
        "quantize_int8",
        &format!("input = \"strip\"\ncalibration = \"calib\"\n{extra}"),
        vec![(
            "input",
            Artifact::Graph(Arc::new(stripped_fixture("conv_bn"))),
        )],
        ds,
        &MemMemo::default(),
    )
}

#[test]
fn quantize_with_samples_0_says_so() {
    let err = quantize_on(&fixture_datasets("conv_bn"), "samples = 0").unwrap_err();
    assert!(err.to_string().contains("samples = 0"), "{err}");
}

#[test]
fn float64_data_is_cast_and_reported_in_the_metrics() {
    let ds = converted_calib("calib_f64", |v, s| {
        Tensor::from_vec(s, &v.iter().map(|&x| x as f64 + 1e-9).collect::<Vec<f64>>())
    });
    let out = quantize_on(&ds, "").unwrap();
    let casts = out.metrics["calibration_casts"].to_string();
    assert!(casts.contains("input_x: float64 → float32"), "{casts}");
    let v = validate_on(stripped_fixture("conv_bn"), graph_of(&out), &ds, "").unwrap();
    let casts = v.metrics["data_casts"].to_string();
    assert!(casts.contains("input_x: float64 → float32"), "{casts}");
    // float32 data needs no cast and reports none.
    let (g, plain) = quantize_fixture("conv_bn", "calibration = \"calib\"");
    assert!(plain.metrics.get("calibration_casts").is_none());
    let v = validate("conv_bn", stripped_fixture("conv_bn"), g, "").unwrap();
    assert!(v.metrics.get("data_casts").is_none());
}

#[test]
fn integer_data_that_float32_cannot_hold_is_an_error() {
    let ds = converted_calib("calib_i32", |v, s| {
        let mut x: Vec<i32> = v.iter().map(|&f| (f * 100.0) as i32).collect();
        x[5] = (1 << 24) + 1;
        Tensor::from_vec(s, &x)
    });
    let err = quantize_on(&ds, "").unwrap_err().to_string();
    assert!(
        err.contains("16777217") && err.contains("calib_x.npy") && err.contains("no exact float32"),
        "{err}"
    );
}

/// The metrics and the per-layer table of a validate output, without the flag that
/// says where the reference's results came from.
fn comparable(out: &StageOutput) -> (serde_json::Value, Vec<u8>) {
    let mut m = serde_json::Value::Object(out.metrics.clone());
    m.as_object_mut().unwrap().remove("reference_cached");
    (m, out.files[0].bytes.clone())
}

#[test]
fn the_reference_runs_once_and_the_memo_changes_no_metric() {
    use std::sync::atomic::Ordering;
    for model in MODELS {
        let reference = stripped_fixture(model);
        let (int8, _) = quantize_fixture(model, "calibration = \"calib\"");
        let (hybrid, _) = quantize_fixture(model, "");
        let ds = fixture_datasets(model);
        let config = "reference = \"strip\"\ncandidate = \"quant\"\ndataset = \"eval\"\n";
        let run = |candidate: &Graph, memo: &MemMemo| {
            run_stage(
                "validate",
                config,
                vec![
                    ("reference", Artifact::Graph(Arc::new(reference.clone()))),
                    ("candidate", Artifact::Graph(Arc::new(candidate.clone()))),
                ],
                &ds,
                memo,
            )
            .unwrap()
        };
        let memo = MemMemo::default();
        memo.digests
            .lock()
            .unwrap()
            .insert("reference".into(), format!("{model} stripped"));
        let without = MemMemo::default();
        for (i, candidate) in [&int8, &hybrid, &int8].into_iter().enumerate() {
            let shared = run(candidate, &memo);
            let direct = run(candidate, &without);
            // The first validate computes the reference's results; the others read them.
            assert_eq!(shared.metrics["reference_cached"], i > 0, "{model} #{i}");
            assert_eq!(
                memo.shared_computed.load(Ordering::SeqCst),
                1,
                "{model} #{i}"
            );
            assert_eq!(direct.metrics["reference_cached"], false);
            assert_eq!(comparable(&shared), comparable(&direct), "{model} #{i}");
            // The per-layer table is measured on the leading rows whose reference
            // tensors fit the memo's budget (945 of push_student's 1000 rows, 796 of
            // conv_bn's): every layer's element count is a multiple of them.
            let rows = shared.metrics["layer_samples"].as_u64().unwrap();
            assert!((500..=1000).contains(&rows), "{model}: {rows}");
            let Artifact::Report(report) = &shared.artifact else {
                panic!("validate returns a report")
            };
            for l in report["layers"].as_array().unwrap() {
                assert_eq!(l["elements"].as_u64().unwrap() % rows, 0, "{model}: {l}");
            }
        }
        // Without the reference's hash nothing is shared.
        assert_eq!(without.shared_computed.load(Ordering::SeqCst), 0);
    }
}
