//! Results do not depend on batching: every fixture model in every variant (float32,
//! fp16, int8 full integer, hybrid, weight-only), in both arithmetic profiles, gives
//! the same outputs for a batch of rows as for each row run alone (batch 1). The int8
//! and hybrid outputs must be bit-identical (integer sums; hybrid rows are quantized
//! one at a time). The float kernels sum every output in a fixed order whatever the
//! batch (see src/kernels/simd), so float outputs are held to the same standard: the
//! stated tolerance for float is 0.

mod support;

use qpipe::ir::{Graph, Tensor};
use qpipe::kernels::{Arithmetic, Plan, Value};
use qpipe::npy::NpyReader;
use qpipe::stages::fp16_cast::cast_fp16;
use support::fixtures::{fixture_dir, input_name, stripped_fixture, MODELS};
use support::stage_runner::quantize_fixture;

/// Rows per batch: more than one tile of every kernel (32 pixels, 16 rows) and not a
/// multiple of any.
const ROWS: usize = 37;

fn variants(model: &str) -> Vec<(&'static str, Graph)> {
    let float = stripped_fixture(model);
    let (fp16, _) = cast_fp16(&float, 1, &[]).unwrap();
    vec![
        ("int8", quantize_fixture(model, "calibration = \"calib\"").0),
        ("hybrid", quantize_fixture(model, "").0),
        (
            "weight_only",
            quantize_fixture(model, "strategy = \"OPTIMIZE_FOR_SIZE\"").0,
        ),
        ("fp16", fp16),
        ("float", float),
    ]
}

fn bits(v: &Value) -> (Vec<usize>, Vec<u8>) {
    let t = v.to_tensor();
    (t.shape().to_vec(), t.bytes().to_vec())
}

#[test]
fn a_batch_gives_the_bits_of_its_rows_run_one_at_a_time() {
    for model in MODELS {
        let x: Tensor = NpyReader::open(&fixture_dir(model).join("eval_x.npy"))
            .unwrap()
            .read_rows(0, ROWS)
            .unwrap();
        let input = input_name(model);
        for (variant, g) in variants(model) {
            for arith in [Arithmetic::Reference, Arithmetic::LiteRt] {
                let what = format!("{model} {variant} {arith:?}");
                let plan = Plan::compile(&g, &[input.as_str()], &g.outputs)
                    .unwrap()
                    .with_arithmetic(arith);
                let feed = |t: &Tensor| {
                    let v = Value::from_tensor(t).unwrap();
                    plan.run_values(vec![v]).unwrap()
                };
                let batch = feed(&x);
                assert_eq!(batch.len(), g.outputs.len(), "{what}");
                let reader = NpyReader::open(&fixture_dir(model).join("eval_x.npy")).unwrap();
                for row in 0..ROWS {
                    let one = feed(&reader.read_rows(row, row + 1).unwrap());
                    for (k, (b, o)) in batch.iter().zip(&one).enumerate() {
                        let (bs, bb) = bits(b);
                        let (os, ob) = bits(o);
                        assert_eq!(&bs[1..], &os[1..], "{what} output {k}");
                        let n = ob.len();
                        assert_eq!(
                            &bb[row * n..(row + 1) * n],
                            &ob[..],
                            "{what}: output {k} of row {row} differs between batch {ROWS} and \
                             batch 1"
                        );
                    }
                }
            }
        }
    }
}
