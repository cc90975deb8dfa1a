//! Exported models checked against the real interpreter: every fixture model,
//! float32 and float16, run in LiteRT with the default and the reference op
//! resolver, compared with the outputs TensorFlow recorded.

mod tfl_util;

use qpipe::formats::tflite;
use qpipe::stages::fp16_cast::cast_fp16;
use tfl_util::*;

/// Exports `graph`, runs it on the fixture's eval set with both resolvers and
/// checks it against TensorFlow's recorded outputs. The default resolver's float
/// kernels depend on the CPU: measured at most 6.9e-7 from BUILTIN_REF on the
/// fixtures (float32 and float16), AVX-512 and AVX2 (QEMU -cpu Haswell, EPYC-Rome)
/// within 1.5e-7 of each other, and the same accuracy; `tol` covers both.
fn check_against_tf(model: &str, variant: &str, graph: &qpipe::ir::Graph, tol: f32) {
    let dir = scratch(&format!("{model}_{variant}"));
    let (_, bytes) = tflite::export(graph).unwrap();
    let path = dir.join("model.tflite");
    std::fs::write(&path, &bytes).unwrap();
    let x = fixture(&format!("{model}/eval_x.npy"));
    let want = qpipe::npy::read(&fixture(&format!("{model}/tf_eval_out.npy"))).unwrap();
    for resolver in Resolver::ALL {
        let out_dir = dir.join(format!("{resolver:?}"));
        let got = run_litert(&path, &[("input_x", &x)], resolver, &out_dir)
            .unwrap_or_else(|e| panic!("{model} {variant}: {e}"));
        assert_eq!(got.len(), 1);
        let diff = max_abs_diff(&got[0], &want);
        let agree = top1_agreement(&got[0], &want);
        eprintln!(
            "{model} {variant} {resolver:?}: {} bytes, max abs diff {diff:e}, top-1 agreement {agree}",
            bytes.len()
        );
        assert!(
            diff <= tol,
            "{model} {variant} {resolver:?}: max abs diff {diff} > {tol}"
        );
        assert!(
            agree >= 0.999,
            "{model} {variant} {resolver:?}: top-1 agreement {agree} < 0.999"
        );
    }
}

#[test]
fn float32_fixture_models_match_tensorflow_in_litert() {
    for model in MODELS {
        let g = stripped_fixture(model);
        check_against_tf(model, "f32", &g, 1e-5);
    }
}

#[test]
fn float16_fixture_models_match_tensorflow_in_litert() {
    for model in MODELS {
        let g = stripped_fixture(model);
        let (g16, report) = cast_fp16(&g, 1, &[]).unwrap();
        assert!(report.tensors_cast > 0);
        check_against_tf(model, "f16", &g16, 2e-3);
    }
}

/// The whole path from the training checkpoint: qpipe's freeze, strip_training,
/// export_tflite; LiteRT's outputs match TensorFlow's.
#[test]
fn checkpoints_frozen_by_qpipe_export_and_match_tensorflow() {
    use qpipe::stages::strip_training::{strip, StripOptions};
    use qpipe::stages::{ModelSource, ModelSpec};
    for model in MODELS {
        let json: serde_json::Value = serde_json::from_slice(
            &std::fs::read(fixture(&format!("{model}/model.json"))).unwrap(),
        )
        .unwrap();
        let spec = ModelSpec {
            source: ModelSource::Checkpoint(fixture(model).join("best_validation")),
            inputs: json["inputs"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect(),
            outputs: json["outputs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| o.as_str().unwrap().to_string())
                .collect(),
            input_shapes: Default::default(),
        };
        let frozen = qpipe::formats::tf::freeze_model(&spec).unwrap();
        let (g, _) = strip(
            &frozen,
            &frozen.inputs,
            &frozen.outputs,
            &StripOptions::default(),
        )
        .unwrap();
        check_against_tf(model, "ckpt", &g, 1e-5);
    }
}
