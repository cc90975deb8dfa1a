//! Quantized fixture models exported to TFLite and run in LiteRT 2.3.0.
//!
//! With the reference kernels (`BUILTIN_REF`) LiteRT's outputs equal qpipe's
//! int8 interpreter's bit for bit. With the default resolver (optimized kernels
//! plus the XNNPACK delegate) LiteRT itself computes differently: XNNPACK rounds
//! its requantization once where the reference kernels round twice, and the
//! optimized FULLY_CONNECTED requantizes in integers where the reference one uses
//! double precision. Those 1-LSB differences inside the network grow through the
//! slopes of tanh, logistic and softmax (one LSB of a logit of scale 0.09 moves a
//! probability by several 1/256 steps), so the final outputs are compared there by
//! top-1 agreement and the differences are reported.

mod q8_util;
mod tfl_util;

use q8_util::*;
use qpipe::formats::tflite;
use tfl_util::*;

fn check_model(model: &str, config: &str, tag: &str) {
    let (g, _) = quantize_fixture(model, config);
    let dir = scratch(&format!("q8_{model}_{tag}"));
    let (_, bytes) = tflite::export(&g).unwrap_or_else(|e| panic!("{model} {tag}: {e}"));
    let path = dir.join("model.tflite");
    std::fs::write(&path, &bytes).unwrap();
    let x = fixture(&format!("{model}/eval_x.npy"));
    let ours = run_qpipe(&g, &x);
    for resolver in [Resolver::Reference, Resolver::Default] {
        let got = run_litert(
            &path,
            &[("input_x", &x)],
            resolver,
            &dir.join(format!("{resolver:?}")),
        )
        .unwrap_or_else(|e| panic!("{model} {tag}: {e}"));
        assert_eq!(got.len(), ours.len());
        let (n, worst) = lsb_diff(&got[0], &ours[0], 1.0 / 256.0);
        let total = ours[0].len();
        let agree = top1_agreement(&got[0], &ours[0]);
        eprintln!(
            "{model} {tag} {resolver:?}: {} bytes, {n}/{total} outputs differ (max {worst} LSB), \
             top-1 agreement {agree}",
            bytes.len()
        );
        match resolver {
            Resolver::Reference => {
                assert_eq!(n, 0, "{model} {tag}: not bit-exact with BUILTIN_REF")
            }
            Resolver::Default => assert!(agree >= 0.97, "{model} {tag}: agreement {agree}"),
        }
    }
}

#[test]
fn default_int8_fixture_models_match_litert() {
    for model in MODELS {
        check_model(model, "calibration = \"calib\"", "default");
    }
}

#[test]
fn per_tensor_dense_int8_models_match_litert() {
    for model in MODELS {
        check_model(
            model,
            "calibration = \"calib\"\nper_channel_dense = false",
            "per_tensor_fc",
        );
    }
}
