//! DEFAULT without a calibration set: dynamic-range quantization with hybrid
//! CONV_2D and FULLY_CONNECTED (float input and output, int8 weights), exported
//! and run in LiteRT 2.3.0 with both resolvers. Compared with the TFLite
//! converter's file for the same strategy (bench/int8_converter.py, "DEFAULT,
//! no data"): the same hybrid ops, and at most 2% more bytes.

mod support;

use std::sync::Arc;

use qpipe::formats::tflite;
use qpipe::ir::DType;
use qpipe::kernels::Arithmetic;
use qpipe::stages::Artifact;
use support::fixtures::{eval_accuracy, fixture, fixture_datasets, stripped_fixture};
use support::litert_oracle::{run_litert, Resolver};
use support::numeric::{lsb_diff, tensor_max_abs_diff};
use support::stage_runner::{quantize_fixture, run_qpipe_with, run_stage, MemMemo};
use support::tmp_dir;

/// The converter's file bytes and hybrid (CONV_2D, FULLY_CONNECTED) op counts
/// for "DEFAULT, no data" (TensorFlow 2.21, bench/int8_converter.py).
const CONVERTER: [(&str, usize, usize, usize); 3] = [
    ("push_student", 76_728, 3, 0),
    ("conv_bn", 14_168, 1, 0),
    ("mlp_res", 15_992, 0, 1),
];

/// How far LiteRT's default interpreter (XNNPACK) may be from qpipe's hybrid
/// outputs (either arithmetic), per model. XNNPACK picks its kernels by CPU; where
/// it computes a hybrid convolution the reference way (the AVX2 EPYC:
/// conv_bn 1.95e-4 from the `xnnpack` arithmetic, the reference kernels' distance)
/// its outputs sit at the reference kernels' results, elsewhere at XNNPACK's qd8
/// results. Measured max |default - BUILTIN_REF| (AVX-512 native; AVX2 under QEMU
/// `-cpu Haswell` and `EPYC-Rome` the same to 1.2e-7): push_student 3.15e-3,
/// conv_bn 1.95e-4, mlp_res 1.96e-5; qpipe's `xnnpack` arithmetic is within 1.8e-7
/// of the default on x86-64 (AVX-512 native) for push_student, 2e-5 for mlp_res, and
/// 8.4e-5 for conv_bn (see [`REFERENCE_TOLERANCE`]). Twice the measured distance
/// bounds both arithmetics.
const DEFAULT_TOLERANCE: [(&str, f32); 3] = [
    ("push_student", 6.3e-3),
    ("conv_bn", 3.9e-4),
    ("mlp_res", 3.9e-5),
];

/// How far `BUILTIN_REF` may be from qpipe's hybrid outputs under the reference
/// arithmetic, per model. The hybrid kernels are bit-exact
/// (quantize_hybrid_kernels_litert); what differs is the float ops: qpipe's float
/// products sum by fused multiply-adds, the reference kernels by a multiply and an
/// add, a few ulps apart (push_student 1.8e-7, mlp_res 2.4e-7). conv_bn's first
/// convolution stays float (432 weights, too few to quantize) and feeds, through the
/// float depthwise and pool, the hybrid one, whose input is quantized per row at run
/// time: an ulp there moves some inputs by a quantization step, 8.4e-5 on the
/// probabilities (the same from the default resolver; accuracy equal). Measured on
/// AVX-512 native, with margin.
const REFERENCE_TOLERANCE: [(&str, f32); 3] = [
    ("push_student", 3e-7),
    ("conv_bn", 1.3e-4),
    ("mlp_res", 3.6e-7),
];

#[test]
fn dynamic_range_fixture_models_are_hybrid_and_match_litert() {
    for (model, converter_bytes, conv, fc) in CONVERTER {
        let (g, out) = quantize_fixture(model, "");
        assert_eq!(
            out.metrics["hybrid_ops"].as_u64(),
            Some((conv + fc) as u64),
            "{model}"
        );
        let (m, bytes) = tflite::export(&g).unwrap_or_else(|e| panic!("{model}: {e}"));
        let hybrid = |code: i32| {
            m.operators
                .iter()
                .filter(|op| {
                    let dt = |i: usize| m.tensors[op.inputs[i] as usize].dtype;
                    op.op.builtin_code() == code && dt(0) == DType::F32 && dt(1) == DType::I8
                })
                .count()
        };
        assert_eq!((hybrid(3), hybrid(9)), (conv, fc), "{model}: hybrid ops");
        for op in &m.operators {
            if let tflite::model::Op::FullyConnected {
                asymmetric_quantize_inputs,
                ..
            } = op.op
            {
                let w = m.tensors[op.inputs[1] as usize].dtype;
                assert_eq!(asymmetric_quantize_inputs, w == DType::I8, "{model}");
            }
        }
        eprintln!(
            "{model}: {} bytes, converter {converter_bytes} ({:.4}x)",
            bytes.len(),
            bytes.len() as f64 / converter_bytes as f64
        );
        assert!(
            bytes.len() * 100 <= converter_bytes * 102,
            "{model}: {} bytes, the converter's {converter_bytes}",
            bytes.len()
        );

        let dir = tmp_dir(&format!("hybrid_{model}"));
        let path = dir.join("model.tflite");
        std::fs::write(&path, &bytes).unwrap();
        let x = fixture(&format!("{model}/eval_x.npy"));
        let reference = stripped_fixture(model);
        let checked = validate(model, reference.clone(), g.clone(), "litert-ref");
        for resolver in [Resolver::Reference, Resolver::Default] {
            let got = run_litert(
                &path,
                &[("input_x", &x)],
                resolver,
                &dir.join(format!("{resolver:?}")),
            )
            .unwrap_or_else(|e| panic!("{model}: {e}"));
            let arith = match resolver {
                Resolver::Reference => Arithmetic::Reference,
                Resolver::Default => Arithmetic::LiteRt,
            };
            let ours = run_qpipe_with(&g, &x, arith);
            let diff = tensor_max_abs_diff(&got[0], &ours[0]);
            let ref_diff =
                tensor_max_abs_diff(&got[0], &run_qpipe_with(&g, &x, Arithmetic::Reference)[0]);
            let (n, _) = lsb_diff(&got[0], &ours[0], 1.0);
            let litert_acc = eval_accuracy(model, &got[0]);
            eprintln!(
                "{model} LiteRT {resolver:?} vs qpipe: {n}/{} outputs differ, max abs diff \
                 {diff:e}, accuracy LiteRT {litert_acc} qpipe {}",
                ours[0].len(),
                eval_accuracy(model, &ours[0]),
            );
            match resolver {
                Resolver::Reference => {
                    let tol = REFERENCE_TOLERANCE.iter().find(|t| t.0 == model).unwrap().1;
                    assert!(diff <= tol, "{model}: {diff:e} off BUILTIN_REF");
                    assert_eq!(litert_acc, checked, "{model}: validate's accuracy");
                }
                Resolver::Default => {
                    let tol = DEFAULT_TOLERANCE.iter().find(|t| t.0 == model).unwrap().1;
                    eprintln!("{model}: the reference arithmetic is {ref_diff:e} off the default");
                    for (what, d) in [("xnnpack", diff), ("litert-ref", ref_diff)] {
                        assert!(
                            d <= tol,
                            "{model}: qpipe's {what} arithmetic is {d:e} off the default \
                             resolver (tolerance {tol:e})"
                        );
                    }
                    // Measured: 0 or 1 sample from validate's (BUILTIN_REF) accuracy.
                    assert!(
                        (litert_acc - checked).abs() * got[0].shape()[0] as f64 <= 1.0 + 1e-9,
                        "{model}: the default resolver's accuracy {litert_acc} is more than \
                         one sample from validate's {checked}"
                    );
                }
            }
        }
    }
}

/// `candidate_accuracy` of `validate` with the given `runtime`.
fn validate(
    model: &str,
    reference: qpipe::ir::Graph,
    candidate: qpipe::ir::Graph,
    runtime: &str,
) -> f64 {
    let out = run_stage(
        "validate",
        &format!(
            "reference = \"strip\"\ncandidate = \"quant\"\ndataset = \"eval\"\nruntime = \"{runtime}\""
        ),
        vec![
            ("reference", Artifact::Graph(Arc::new(reference))),
            ("candidate", Artifact::Graph(Arc::new(candidate))),
        ],
        &fixture_datasets(model),
        &MemMemo::default(),
    )
    .unwrap_or_else(|e| panic!("{model}: validate: {e}"));
    out.metrics["candidate_accuracy"].as_f64().unwrap()
}
