//! Operator versions and the minimum runtime version, by the rules of TFLite's
//! `lite/tools/versioning/op_version.cc` (`GetBuiltinOperatorVersion`) and
//! `runtime_version.cc`. An interpreter refuses an (operator, version) pair it
//! has no kernel registered for, so these must match what the kernels need.

use super::model::{Model, Op, Operator};
use crate::ir::DType;

/// The version TFLite's versioning rules give `op` in `model`. The checks run
/// in the same order as upstream, since several can match.
pub fn op_version(model: &Model, op: &Operator) -> i32 {
    use DType::*;
    let input = |i: usize| {
        op.inputs
            .get(i)
            .and_then(|&t| model.tensor(t))
            .map(|t| t.dtype)
    };
    let output = |i: usize| {
        op.outputs
            .get(i)
            .and_then(|&t| model.tensor(t))
            .map(|t| t.dtype)
    };
    let input_dims = |i: usize| {
        op.inputs
            .get(i)
            .and_then(|&t| model.tensor(t))
            .map(|t| t.shape.as_slice())
    };
    let per_channel = |tensor: Option<i32>| {
        tensor
            .and_then(|t| model.tensor(t))
            .and_then(|t| t.quant.as_ref())
            .is_some_and(|q| q.scale.len() > 1)
    };
    let input_scale = |i: usize| {
        op.inputs
            .get(i)
            .and_then(|&t| model.tensor(t))
            .and_then(|t| t.quant.as_ref())
            .and_then(|q| q.scale.first().copied())
    };
    let output_scale = op
        .outputs
        .first()
        .and_then(|&t| model.tensor(t))
        .and_then(|t| t.quant.as_ref())
        .and_then(|q| q.scale.first().copied());
    let (in0, in1, out0) = (input(0), input(1), output(0));
    let broadcast_over_4d = || {
        let (a, b) = (input_dims(0), input_dims(1));
        a != b && a.map_or(0, <[i32]>::len).max(b.map_or(0, <[i32]>::len)) > 4
    };
    let int8_or_int16 = |t: Option<DType>, v8: i32, v16: i32, default: i32| match t {
        Some(I16) => v16,
        Some(I8) => v8,
        _ => default,
    };
    let hybrid = in0 == Some(F32) && in1 == Some(I8) && out0 == Some(F32);
    let int8 = in0 == Some(I8) && in1 == Some(I8) && out0 == Some(I8);
    // 16x8 (int16 activations, int8 weights): op_version.cc versions these only when
    // `quantized_bias_type` is set, which qpipe does not write; TF 2.21's converter
    // writes FULLY_CONNECTED 4, CONV_2D and DEPTHWISE_CONV_2D 3 for them, and so does qpipe.
    let w16x8 = in0 == Some(I16) && in1 == Some(I8) && out0 == Some(I16);

    match &op.op {
        Op::Conv2d(_) => {
            let grouped = match (input_dims(0), input_dims(1)) {
                (Some(x), Some(w)) if x.len() == 4 && w.len() == 4 => x[3] != w[3],
                _ => false,
            };
            if grouped {
                6
            } else if int8 || w16x8 {
                3
            } else if hybrid {
                if per_channel(op.inputs.get(1).copied()) {
                    5
                } else {
                    2
                }
            } else {
                1
            }
        }
        Op::DepthwiseConv2d { conv, .. } => {
            if in0 == Some(I16) && in1 == Some(I16) {
                5
            } else if hybrid {
                if per_channel(op.inputs.get(1).copied()) {
                    6
                } else {
                    4
                }
            } else if int8 || w16x8 {
                3
            } else if conv.dilation_h != 1 || conv.dilation_w != 1 {
                2
            } else {
                1
            }
        }
        Op::FullyConnected {
            keep_num_dims,
            asymmetric_quantize_inputs,
            ..
        } => {
            if hybrid && per_channel(op.inputs.get(1).copied()) {
                12
            } else if in0 == Some(I16) && in1 == Some(I16) && out0 == Some(I16) {
                7
            } else if op.inputs.len() == 2 {
                6
            } else if *keep_num_dims {
                5
            } else if int8 || w16x8 {
                4
            } else if hybrid && *asymmetric_quantize_inputs {
                9
            } else if hybrid {
                3
            } else {
                1
            }
        }
        Op::Gather { batch_dims, .. } => {
            if in1 == Some(I16) {
                6
            } else if *batch_dims != 0 {
                5
            } else if in0 == Some(I16) {
                4
            } else if in0 == Some(Bool) {
                3
            } else if in0 == Some(I8) {
                2
            } else {
                1
            }
        }
        Op::Mul { .. } => {
            let rescale = match (input_scale(0), input_scale(1), output_scale) {
                (Some(a), Some(b), Some(o)) if a != 0.0 && b != 0.0 && o != 0.0 => a * b / o,
                _ => 0.0,
            };
            if in0 == Some(I64) {
                5
            } else if in0 == Some(I16) {
                4
            } else if rescale >= 1.0 {
                3
            } else if in0 == Some(I8) {
                2
            } else {
                1
            }
        }
        Op::MaxPool2d(_) | Op::AveragePool2d(_) => {
            if in0 == Some(I16) && out0 == Some(I16) {
                3
            } else if in0 == Some(I8) {
                2
            } else {
                1
            }
        }
        Op::Dequantize => match in0 {
            Some(I16) | Some(F16) => 3,
            Some(I8) if per_channel(op.inputs.first().copied()) => 5,
            Some(I8) => 2,
            _ => 1,
        },
        Op::Quantize => {
            if per_channel(op.outputs.first().copied()) {
                3
            } else if out0 == Some(I16) {
                2
            } else {
                1
            }
        }
        Op::Relu => match in0 {
            Some(I16) => 3,
            Some(I8) | Some(U8) => 2,
            _ => 1,
        },
        Op::Maximum | Op::Minimum => {
            if in0 == Some(I16) && out0 == Some(I16) {
                4
            } else if broadcast_over_4d() {
                3
            } else if in0 == Some(I8) {
                2
            } else {
                1
            }
        }
        Op::Squeeze { .. } => {
            if in0 == Some(String) {
                2
            } else {
                1
            }
        }
        // int16 ADD and SUB are written with `pot_scale_int16 = false` (writer.rs).
        Op::Add { .. } => match in0 {
            Some(I64) => 4,
            Some(I16) if out0 == Some(I16) => 3,
            Some(I8) => 2,
            _ => 1,
        },
        Op::Sub { .. } => {
            if in0 == Some(I16) && out0 == Some(I16) {
                5
            } else if in0 == Some(I64) {
                4
            } else if broadcast_over_4d() {
                3
            } else if in0 == Some(I8) {
                2
            } else {
                1
            }
        }
        Op::Div { .. } => {
            if broadcast_over_4d() {
                2
            } else {
                1
            }
        }
        Op::Tanh | Op::Logistic => {
            if in0 == Some(I16) && out0 == Some(I16) {
                3
            } else if in0 == Some(I8) {
                2
            } else {
                1
            }
        }
        Op::Pad => {
            if input_dims(0).map_or(0, <[i32]>::len) > 4 {
                4
            } else {
                int8_or_int16(in0, 2, 3, 1)
            }
        }
        Op::Concatenation { .. }
        | Op::Softmax { .. }
        | Op::Mean { .. }
        | Op::ReduceMax { .. }
        | Op::ReduceMin { .. }
        | Op::Relu6 => int8_or_int16(in0, 2, 3, 1),
        Op::Sum { .. } => int8_or_int16(in0, 2, 1, 1),
        Op::Reshape | Op::ExpandDims => 1,
        Op::Abs => match in0 {
            Some(I32) => 5,
            Some(I16) => 3,
            Some(I8) | Some(U8) => 2,
            _ => 1,
        },
        Op::Exp | Op::Log => int8_or_int16(in0, 2, 2, 1),
        Op::Rsqrt => int8_or_int16(in0, 2, 3, 1),
        Op::SquaredDifference => int8_or_int16(in0, 2, 1, 1),
        Op::LeakyRelu { .. } => int8_or_int16(in0, 1, 2, 1),
        Op::BatchMatmul { .. } => int8_or_int16(in0, 2, 3, 1),
        Op::Gelu { .. } => int8_or_int16(in0, 2, 1, 1),
        Op::L2Normalization => int8_or_int16(out0, 2, 1, 1),
        Op::Neg | Op::Square | Op::Pow | Op::Elu | Op::Prelu => 1,
        // op_version.cc: the comparisons are 2 for int8 (3 for int16), EQUAL and
        // NOT_EQUAL 3 for strings; SELECT_V2 is 2 only past 4-D broadcasting.
        Op::Less | Op::Greater | Op::GreaterEqual | Op::LessEqual => int8_or_int16(in0, 2, 3, 1),
        Op::Equal | Op::NotEqual => match in0 {
            Some(String) => 3,
            Some(I8) => 2,
            Some(I16) => 4,
            _ => 1,
        },
        Op::SelectV2 => 1,
        Op::ZerosLike | Op::Shape { .. } => 1,
        Op::Transpose => {
            let rank = input_dims(0).map_or(0, <[i32]>::len);
            if rank > 5 {
                6
            } else if in0 == Some(I16) {
                5
            } else if rank > 4 {
                4
            } else if in0 == Some(Bool) {
                3
            } else {
                int8_or_int16(in0, 2, 5, 1)
            }
        }
        Op::Tile => match in0 {
            Some(I8) => 3,
            Some(String) => 2,
            _ => 1,
        },
        Op::Slice => {
            if input_dims(0).map_or(0, <[i32]>::len) > 4 {
                5
            } else {
                int8_or_int16(in0, 2, 4, 1)
            }
        }
        Op::TransposeConv { activation, .. } => {
            if *activation != super::model::Activation::None {
                4
            } else if op.inputs.len() == 4 && op.inputs[3] >= 0 {
                3
            } else if input(1) == Some(I8) {
                2
            } else {
                1
            }
        }
        Op::ResizeBilinear {
            half_pixel_centers, ..
        } => {
            if in0 == Some(I16) {
                4
            } else if *half_pixel_centers {
                3
            } else {
                int8_or_int16(in0, 2, 4, 1)
            }
        }
        Op::StridedSlice { .. } => {
            if input_dims(0).map_or(0, <[i32]>::len) > 4 {
                4
            } else if in0 == Some(Bool) {
                3
            } else {
                int8_or_int16(in0, 2, 1, 1)
            }
        }
        // SPLIT's data is input 1 (the axis comes first).
        Op::Split { .. } => match in1 {
            Some(I16) => 4,
            Some(I32) => 3,
            Some(I8) => 2,
            _ => 1,
        },
        Op::SplitV { .. } => int8_or_int16(in0, 2, 3, 1),
        Op::Pack { .. } => int8_or_int16(in0, 2, 3, 1),
        Op::Unpack { .. } => match in0 {
            Some(I8) | Some(U8) => 2,
            Some(Bool) => 3,
            Some(I16) => 4,
            _ => 1,
        },
        Op::ArgMax { .. } | Op::ArgMin { .. } => int8_or_int16(in0, 2, 1, 1),
        Op::Fill => match in1 {
            Some(F16) => 4,
            Some(I8) | Some(I16) => 3,
            Some(Bool) | Some(String) => 2,
            _ => 1,
        },
        Op::ResizeNearestNeighbor {
            align_corners,
            half_pixel_centers,
        } => {
            if in0 == Some(I16) {
                4
            } else if *align_corners || *half_pixel_centers {
                3
            } else {
                int8_or_int16(in0, 2, 4, 1)
            }
        }
        // op_version.cc has no rule for HARD_SWISH: version 1 for float and int8.
        Op::HardSwish => 1,
    }
}

/// The runtime release that first registered `version` of builtin `code`
/// (TFLite's `FindMinimumRuntimeVersionForOp`), for the operators qpipe writes.
pub fn min_runtime_for_op(code: i32, version: i32) -> Option<&'static str> {
    let table: &[&str] = match code {
        0 => &["1.5.0", "1.14.0", "2.4.0", "2.6.0", "2.13.0"],
        1 | 17 => &["1.5.0", "1.14.0", "2.3.0"],
        2 => &["1.5.0", "1.14.0", "2.3.0", "2.14.0"],
        3 => &[
            "1.5.0", "1.14.0", "1.14.0", "2.3.0", "2.4.0", "2.9.0", "2.11.0", "2.15.0",
        ],
        4 => &[
            "1.5.0", "1.12.0", "1.14.0", "2.2.0", "2.3.0", "2.3.0", "2.11.0",
        ],
        6 => &["1.13.1", "1.14.0", "1.15.0", "2.2.0", "2.7.0", "2.18.0"],
        9 => &[
            "1.5.0", "1.10.0", "1.14.0", "1.14.0", "2.0.0", "2.1.0", "2.3.0", "2.3.0", "2.3.0",
            "2.11.0", "2.15.0", "2.17.0",
        ],
        14 | 28 => &["1.14.0", "1.14.0", "2.3.0"],
        18 => &[
            "1.5.0", "1.14.0", "1.15.0", "2.3.0", "2.6.0", "2.11.0", "2.13.0",
        ],
        19 => &["1.5.0", "2.1.0", "2.5.0"],
        21 => &["1.5.0", "1.14.0", "2.5.0"],
        22 => &["1.5.0"],
        23 => &["1.7.0", "1.14.0", "2.2.0", "2.5.0"],
        67 => &["1.9.0", "2.2.0", "2.4.0", "2.13.0"],
        97 => &["1.13.1", "1.14.0", "2.3.0", "2.4.0"],
        25 => &["1.5.0", "1.14.0", "2.3.0"],
        34 => &["1.5.0", "1.14.0", "2.4.0", "2.6.0"],
        36 => &[
            "1.6.0", "1.14.0", "1.15.0", "2.4.0", "2.5.0", "2.13.0", "2.15.0",
        ],
        40 => &["1.6.0", "1.14.0", "2.4.0"],
        41 => &["1.6.0", "1.14.0", "2.3.0", "2.4.0", "2.4.0"],
        42 => &["1.6.0", "2.3.0"],
        43 => &["1.6.0", "2.5.0"],
        55 | 57 => &["1.14.0", "1.14.0", "2.3.0", "2.3.0"],
        70 => &["1.10.0"],
        74 => &["1.10.0", "1.15.0"],
        82 | 89 => &["1.11.0", "1.14.0", "2.5.0"],
        114 => &["1.14.0", "1.15.0", "2.7.0"],
        101 => &["1.13.0", "2.4.0", "2.5.0", "2.6.0"],
        47 => &["1.7.0"],
        73 => &["1.14.0"],
        92 => &["1.12.0"],
        59 => &["1.9.0"],
        76 => &["1.10.0", "2.5.0"],
        99 => &["1.13.1", "2.5.0"],
        78 => &["1.10.0"],
        111 => &["1.14.0"],
        98 => &["1.13.1", "2.3.0"],
        54 => &["1.8.0"],
        126 => &["2.3.0", "2.3.0", "2.4.0", "2.5.0"],
        150 => &["2.9.0", "2.9.0"],
        11 => &["1.5.0", "1.14.0"],
        39 => &["1.6.0", "1.14.0", "1.15.0", "2.4.0", "2.5.0", "2.13.0"],
        45 => &[
            "1.6.0", "1.14.0", "2.1.0", "2.3.0", "2.5.0", "2.6.0", "2.14.0", "2.14.0",
        ],
        49 => &["1.5.0", "1.14.0", "1.14.0", "2.3.0"],
        56 | 79 => &["1.9.0", "1.14.0", "2.9.0"],
        65 => &["1.14.0", "1.14.0", "1.14.0", "2.3.0", "2.5.0", "2.14.0"],
        69 => &["1.10.1", "1.15.0", "2.10.0"],
        77 => &["1.10.0", "2.10.0"],
        83 => &["1.11.0", "1.14.0", "2.3.0", "2.14.0"],
        88 => &["1.11.0", "1.14.0", "2.2.0", "2.3.0"],
        93 => &["1.12.0"],
        94 => &["1.13.0", "2.3.0", "2.5.0", "2.14.0"],
        102 => &["1.13.1", "1.14.0", "2.3.0"],
        117 => &["1.15.0"],
        _ => &[],
    };
    usize::try_from(version)
        .ok()
        .and_then(|v| v.checked_sub(1))
        .and_then(|i| table.get(i))
        .copied()
}

/// Whether runtime version `a` is older than `b` (numeric, dot-separated).
fn older(a: &str, b: &str) -> bool {
    let parse = |s: &str| -> Vec<u32> { s.split('.').map(|p| p.parse().unwrap_or(0)).collect() };
    parse(a) < parse(b)
}

/// The oldest runtime that has every (operator, version) pair in `codes`.
pub fn min_runtime_version(codes: &[(i32, i32)]) -> String {
    let mut min = "1.5.0";
    for &(code, version) in codes {
        if let Some(v) = min_runtime_for_op(code, version) {
            if older(min, v) {
                min = v;
            }
        }
    }
    min.to_string()
}

/// The operator-code table: one entry per builtin in first-use order, at the
/// highest version any of its operators needs, and each operator's index into it.
pub fn op_codes(model: &Model) -> (Vec<(i32, i32)>, Vec<u32>) {
    let mut codes: Vec<(i32, i32)> = Vec::new();
    let mut index = Vec::with_capacity(model.operators.len());
    for op in &model.operators {
        let code = op.op.builtin_code();
        let version = op_version(model, op);
        let i = match codes.iter().position(|(c, _)| *c == code) {
            Some(i) => {
                codes[i].1 = codes[i].1.max(version);
                i
            }
            None => {
                codes.push((code, version));
                codes.len() - 1
            }
        };
        index.push(i as u32);
    }
    (codes, index)
}

/// The versions [`op_version`] gives `op` on float32 data and on int8 data (int8
/// activations and weights, int32 bias), for a typical operand shape: rank-4 data, a
/// second operand of the data's shape and a bias. Where the version depends on more
/// (dilation, broadcasting, per-channel weights) the export picks it per operator.
pub fn typical_versions(op: &Op) -> (i32, i32) {
    use crate::formats::tflite::model::TensorDef;
    use crate::ir::QuantParams;
    let tensor = |dtype: DType, shape: &[i32]| TensorDef {
        name: String::new(),
        dtype,
        shape: shape.to_vec(),
        shape_signature: None,
        data: None,
        quant: (dtype != DType::F32).then(|| QuantParams::per_tensor(0.05, 0)),
    };
    let version = |data: DType, bias: DType| {
        let model = Model {
            tensors: vec![
                tensor(data, &[1, 4, 4, 4]),
                tensor(data, &[1, 4, 4, 4]),
                tensor(bias, &[4]),
                tensor(data, &[1, 4, 4, 4]),
            ],
            ..Model::default()
        };
        let operator = Operator {
            op: op.clone(),
            inputs: vec![0, 1, 2],
            outputs: vec![3],
        };
        op_version(&model, &operator)
    };
    (
        version(DType::F32, DType::F32),
        version(DType::I8, DType::I32),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::tflite::model::{Activation, TensorDef};
    use crate::ir::QuantParams;

    fn tensor(dtype: DType, shape: &[i32], quant: Option<QuantParams>) -> TensorDef {
        TensorDef {
            name: String::new(),
            dtype,
            shape: shape.to_vec(),
            shape_signature: None,
            data: None,
            quant,
        }
    }

    fn model(tensors: Vec<TensorDef>, op: Op, inputs: &[i32]) -> (Model, Operator) {
        let out = tensors.len() as i32 - 1;
        let operator = Operator {
            op,
            inputs: inputs.to_vec(),
            outputs: vec![out],
        };
        let m = Model {
            tensors,
            operators: vec![operator.clone()],
            ..Model::default()
        };
        (m, operator)
    }

    #[test]
    fn fully_connected_versions_follow_upstream_order() {
        let fc = Op::FullyConnected {
            activation: Activation::None,
            keep_num_dims: false,
            asymmetric_quantize_inputs: false,
        };
        let f = |d| tensor(d, &[1, 4], None);
        let (m, op) = model(
            vec![f(DType::F32), f(DType::F32), f(DType::F32)],
            fc.clone(),
            &[0, 1, -1],
        );
        assert_eq!(op_version(&m, &op), 1);
        let (m, op) = model(
            vec![f(DType::F32), f(DType::F32), f(DType::F32)],
            fc.clone(),
            &[0, 1],
        );
        assert_eq!(op_version(&m, &op), 6);
        let (m, op) = model(
            vec![f(DType::I8), f(DType::I8), f(DType::I8)],
            fc.clone(),
            &[0, 1, -1],
        );
        assert_eq!(op_version(&m, &op), 4);
        let (m, op) = model(
            vec![f(DType::F32), f(DType::I8), f(DType::F32)],
            fc,
            &[0, 1, -1],
        );
        assert_eq!(op_version(&m, &op), 3);
    }

    #[test]
    fn dequantize_and_mul_versions() {
        let (m, op) = model(
            vec![
                tensor(DType::F16, &[3], None),
                tensor(DType::F32, &[3], None),
            ],
            Op::Dequantize,
            &[0],
        );
        assert_eq!(op_version(&m, &op), 3);
        let pc = QuantParams::per_axis(vec![0.1, 0.2], vec![0, 0], 0);
        let (m, op) = model(
            vec![
                tensor(DType::I8, &[2, 3], Some(pc)),
                tensor(DType::F32, &[2, 3], None),
            ],
            Op::Dequantize,
            &[0],
        );
        assert_eq!(op_version(&m, &op), 5);
        let q = |s| Some(QuantParams::per_tensor(s, 0));
        let mul = Op::Mul {
            activation: Activation::None,
        };
        let (m, op) = model(
            vec![
                tensor(DType::I8, &[4], q(0.5)),
                tensor(DType::I8, &[4], q(0.5)),
                tensor(DType::I8, &[4], q(0.1)),
            ],
            mul.clone(),
            &[0, 1],
        );
        assert_eq!(op_version(&m, &op), 3, "0.5*0.5/0.1 >= 1");
        let (m, op) = model(
            vec![
                tensor(DType::I8, &[4], q(0.1)),
                tensor(DType::I8, &[4], q(0.1)),
                tensor(DType::I8, &[4], q(0.5)),
            ],
            mul,
            &[0, 1],
        );
        assert_eq!(op_version(&m, &op), 2);
    }

    #[test]
    fn min_runtime_version_takes_the_newest() {
        assert_eq!(min_runtime_version(&[]), "1.5.0");
        assert_eq!(min_runtime_version(&[(3, 1), (6, 3)]), "1.15.0");
        assert_eq!(min_runtime_version(&[(6, 3), (3, 1), (9, 6)]), "2.1.0");
        assert!(older("1.5.0", "1.14.0"));
        assert!(!older("2.10.0", "2.9.0"));
    }
}
