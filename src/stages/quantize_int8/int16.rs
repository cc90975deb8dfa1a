//! `activations = "int16"`: TFLite's 16x8 mode on top of the int8 rewrite.
//! Activations are int16, symmetric (`scale = max(|min|, |max|) / 32767` in f32,
//! zero point 0, as TF's converter computes them), weights stay int8 (per channel
//! as in int8) and the biases of FULLY_CONNECTED and CONV_2D/DEPTHWISE_CONV_2D are
//! int64 at `in_scale * w_scale`. An op is put in int16 only when LiteRT has a
//! 16x8 kernel for it *and* qpipe's interpreter has it ([`crate::kernels::int16`]);
//! every other op stays float (DEFAULT) or is an error (OPTIMIZE_FOR_LATENCY).

use super::rewrite::{Kind, Role, Spec};
use crate::error::Result;
use crate::ir::op::{Binary, Forward, Reduce, Unary};
use crate::ir::{DType, Op, QuantParams, Tensor};

/// Why SUM stays float in 16x8 (`reduce.cc`'s reference `QuantizedMeanOrSum` call).
const SUM_READS_UINT8: &str =
    "LiteRT's reference SUM reads int16 data as uint8, so it stays float in 16x8";

/// Symmetric int16 parameters of a calibrated range. An empty range (a tensor that is
/// always 0, such as an LSTM's first `h @ U`) gets a small scale: LiteRT's int16 ADD
/// and SUB abort (`QuantizeMultiplierSmallerThanOneExp`) unless
/// `2 · max(in) / (2^15 · out) < 1`, which scale 1 beside real scales breaks.
pub fn symmetric_params(min: f32, max: f32) -> QuantParams {
    let half = min.abs().max(max.abs());
    let scale = half / 32767.0;
    if scale > 0.0 && scale.is_finite() {
        QuantParams::per_tensor(scale, 0)
    } else {
        QuantParams::per_tensor(1e-6, 0)
    }
}

/// The 16x8 form of an op whose int8 form is `int8` (or which has none), or why it
/// has none. `data_ok` tells whether the op's first input is a float tensor.
pub(super) fn spec(
    op: &Op,
    int8: std::result::Result<Spec, String>,
    data_ok: bool,
) -> std::result::Result<Spec, String> {
    if let Op::Unary(Unary::Exp) = op {
        if !data_ok {
            return Err("its input is not a float tensor".into());
        }
        return Ok(Spec {
            kind: Kind::Free,
            roles: vec![Role::Data],
        });
    }
    let mut s = int8?;
    match op {
        Op::Fused { .. }
        | Op::MaxPool(_)
        | Op::AvgPool(_)
        | Op::Reshape
        | Op::ExpandDims
        | Op::Squeeze
        | Op::Forward(Forward::Identity)
        | Op::ConcatV2
        | Op::Binary(Binary::Add | Binary::AddV2 | Binary::Sub | Binary::Mul)
        | Op::BiasAdd { .. }
        | Op::Unary(Unary::Relu | Unary::Relu6 | Unary::Abs | Unary::Rsqrt)
        | Op::LeakyRelu
        | Op::Binary(Binary::Maximum | Binary::Minimum)
        | Op::Reduce {
            kind: Reduce::Mean | Reduce::Max | Reduce::Min,
            ..
        }
        | Op::Transpose
        | Op::Slice
        | Op::StridedSlice
        | Op::Pad
        | Op::GatherV2
        | Op::Split
        | Op::SplitV
        | Op::Pack
        | Op::Unpack
        | Op::Tile
        | Op::ZerosLike
        | Op::Shape => {}
        Op::Softmax | Op::Unary(Unary::Sigmoid | Unary::Tanh) => {
            s.kind = Kind::Fixed(1.0 / 32768.0, 0)
        }
        Op::Reduce {
            kind: Reduce::Sum, ..
        } => return Err(SUM_READS_UINT8.into()),
        _ => {
            return Err(format!(
                "no int16 kernel in qpipe for {op:?}, so it stays float in 16x8"
            ))
        }
    }
    Ok(s)
}

/// A float tensor quantized to int16 with an activation's (symmetric) scale.
pub fn quantize_const(t: &Tensor, scale: f32) -> Result<Tensor> {
    let v = t.values::<f32>()?;
    let q: Vec<i16> = v
        .iter()
        .map(|&f| crate::kernels::rounding::quantize_value(f, scale, 0, -32768, 32767) as i16)
        .collect();
    Ok(Tensor::from_vec(t.shape().to_vec(), &q))
}

/// The int64 bias of a 16x8 FULLY_CONNECTED or convolution: `round(b / (in * w[c]))`
/// (the product in f32, the division in f64), per channel like the weights.
pub fn bias_int64(bias: &[f32], in_scale: f32, w_scales: &[f32]) -> (Vec<i64>, QuantParams) {
    let scales: Vec<f32> = (0..bias.len())
        .map(|c| in_scale * w_scales[if w_scales.len() == 1 { 0 } else { c }])
        .collect();
    let q = bias
        .iter()
        .zip(&scales)
        .map(|(&b, &s)| (b as f64 / s as f64).round() as i64)
        .collect();
    if w_scales.len() == 1 {
        return (q, QuantParams::per_tensor(in_scale * w_scales[0], 0));
    }
    let n = scales.len();
    (q, QuantParams::per_axis(scales, vec![0; n], 0))
}

/// The activation dtype of the rewrite.
pub fn dtype(int16: bool) -> DType {
    if int16 {
        DType::I16
    } else {
        DType::I8
    }
}
