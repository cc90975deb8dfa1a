//! `validate` on the fixture models: the metrics it reports, the per-layer table,
//! the gate, int8-interface candidates, and its accuracy against LiteRT's on the
//! exported model.

mod support;

use std::sync::Arc;

use qpipe::formats::tflite;
use qpipe::ir::Graph;
use qpipe::stages::{Artifact, StageOutput};
use support::fixtures::{eval_accuracy, fixture, fixture_datasets, stripped_fixture, MODELS};
use support::litert_oracle::{run_litert, Resolver};
use support::stage_runner::{quantize_fixture, run_stage, MemMemo};
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

        // The accuracy validate reports is the one LiteRT gives on the exported
        // model: by default that of `Interpreter()` (the default resolver), with
        // `runtime = "litert-ref"` that of the reference kernels.
        let dir = tmp_dir(&format!("validate_{model}"));
        let (_, bytes) = tflite::export(&candidate).unwrap();
        let path = dir.join("model.tflite");
        std::fs::write(&path, bytes).unwrap();
        let x = fixture(&format!("{model}/eval_x.npy"));
        let reference = stripped_fixture(model);
        let with_ref = validate(model, reference, candidate, "runtime = \"litert-ref\"").unwrap();
        for (resolver, out) in [(Resolver::Default, &out), (Resolver::Reference, &with_ref)] {
            let got = run_litert(
                &path,
                &[("input_x", &x)],
                resolver,
                &dir.join(format!("{resolver:?}")),
            )
            .unwrap();
            let litert = eval_accuracy(model, &got[0]);
            eprintln!(
                "{model}: LiteRT {resolver:?} accuracy {litert}, validate {}",
                num(out, "candidate_accuracy")
            );
            assert_eq!(
                litert,
                num(out, "candidate_accuracy"),
                "{model} {resolver:?}"
            );
        }
    }
}

#[test]
fn the_runtime_is_part_of_the_stage_config_and_defaults_to_litert() {
    let config = |extra: &str| {
        let toml = format!("reference = \"a\"\ncandidate = \"b\"\ndataset = \"eval\"\n{extra}");
        let table = qpipe::stages::ConfigTable::parse(&toml).unwrap();
        match (qpipe::stages::registry::factory("validate").unwrap().build)(&table) {
            Ok(stage) => stage.config(),
            Err(e) => panic!("{}", e.message),
        }
    };
    assert_eq!(config("")["runtime"], "litert");
    assert_eq!(config(""), config("runtime = \"litert\""));
    assert_ne!(config(""), config("runtime = \"litert-ref\""));
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
