//! 16x8 kernels: int16 activations (symmetric, zero point 0), int8 weights and
//! int64 biases, as LiteRT's reference kernels (`BUILTIN_REF`) compute TFLite's
//! `EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8` mode.
//!
//! A step runs here when its data input is an int16 value, or when it is a
//! QUANTIZE to or from int16. The ops with a kernel are the ones LiteRT has a
//! 16x8 kernel for and `quantize_int8` puts in int16 ([`SUPPORTED`]); any other op
//! on int16 data is an error naming it, never a float kernel run on integers.
//! Every requantization goes through [`super::rounding`]:
//!
//! * FULLY_CONNECTED, CONV_2D, DEPTHWISE_CONV_2D accumulate `w * x` in i64 (no
//!   input offset) and add the int64 bias; the convolutions requantize with the i64
//!   `MultiplyByQuantizedMultiplier` (Q15-reduced multiplier, one rounding),
//!   FULLY_CONNECTED in double (`round(acc * in * w[c] / out)`, as its int8 kernel;
//!   measured: the fixed-point form is one LSB off on ties), the multiplier from
//!   `(f64)in * (f64)w[c] / (f64)out`.
//! * ADD, SUB: the general-scale path (`pot_scale_int16 = false`): int8's
//!   arithmetic with `left_shift = 15`.
//! * MUL: `MBQM((x - zx) * (y - zy))` with the multiplier `in1 * in2 / out` in f32.
//! * QUANTIZE: float → int16 `round(x / scale)`; int8/int16 → int16/int8 with
//!   `MBQM(x - zp_in, in / out) + zp_out` (LiteRT has no int8 → int16 QUANTIZE, see
//!   `tests/int16_activations.rs`; qpipe never writes one).
//! * EXP: TFLite's 513-entry interpolated table (`LUTPopulate<int16_t>`, in f32).
//! * SOFTMAX: `SoftmaxInt16` with its exp and reciprocal tables (in f64).

mod conv;
mod more;

use super::elementwise::{broadcast_map, BinaryOp, UnaryOp};
use super::int8::ROUNDING;
use super::ops::{Kernel, StepQuant};
use super::rounding::{
    activation_range, lut_int16_f32, lut_lookup_int16, multiply_by_quantized_multiplier,
    quantize_multiplier, quantize_value, softmax_int16_luts, softmax_int16_row,
};
use super::value::{Buf, Value};
use crate::error::{Error, Result};
use crate::ir::{DType, FusedActivation, QuantParams};

/// What the 16x8 kernels cover, by kernel: what `quantize_int8` may put in int16.
pub const SUPPORTED: &[&str] = &[
    "FULLY_CONNECTED",
    "CONV_2D",
    "DEPTHWISE_CONV_2D",
    "ADD",
    "SUB",
    "MUL",
    "RELU",
    "EXP",
    "SOFTMAX",
    "MAX_POOL_2D",
    "AVERAGE_POOL_2D",
    "QUANTIZE",
    "DEQUANTIZE",
    "RESHAPE",
    "SQUEEZE",
    "EXPAND_DIMS",
    "CONCATENATION",
    "LOGISTIC",
    "TANH",
    "RELU6",
    "LEAKY_RELU",
    "ABS",
    "RSQRT",
    "MEAN",
    "MAXIMUM",
    "MINIMUM",
    "REDUCE_MAX",
    "REDUCE_MIN",
    "TRANSPOSE",
    "SLICE",
    "STRIDED_SLICE",
    "PAD",
    "GATHER",
    "SPLIT",
    "SPLIT_V",
    "PACK",
    "UNPACK",
    "TILE",
];

/// The scale of an int16 activation (per tensor, zero point 0, as every 16x8
/// kernel of LiteRT requires).
fn scale_of(q: Option<&QuantParams>, what: &str) -> Result<f32> {
    let q = q.ok_or_else(|| Error::msg(format!("int16 {what} has no quantization parameters")))?;
    match (q.scale.as_slice(), q.zero_point.as_slice()) {
        ([s], [0]) if s.is_finite() && *s > 0.0 => Ok(*s),
        ([s], [z]) => Err(Error::msg(format!(
            "int16 {what} must have a positive scale and zero point 0, got {s} / {z}"
        ))),
        _ => Err(Error::msg(format!(
            "int16 {what} must be quantized per tensor, it has {} scales",
            q.scale.len()
        ))),
    }
}

fn in_scale(quant: &StepQuant, i: usize) -> Result<f32> {
    scale_of(
        quant.inputs.get(i).and_then(|q| q.as_ref()),
        &format!("input {i}"),
    )
}

fn out_scale(quant: &StepQuant) -> Result<f32> {
    scale_of(quant.outputs.first().and_then(|q| q.as_ref()), "output")
}

#[inline]
fn sat16(v: i32) -> i16 {
    v.clamp(-32768, 32767) as i16
}

/// Runs `kernel` in 16x8 when its data input is int16 (or it quantizes to or from
/// int16). `None`: not an int16 step, or a dtype-agnostic kernel is right for it.
pub fn exec(kernel: &Kernel, inputs: &[Value], quant: &StepQuant) -> Result<Option<Vec<Value>>> {
    let is16 = |i: usize| inputs.get(i).is_some_and(|v| v.dtype() == DType::I16);
    let one = |v: Value| Ok(Some(vec![v]));
    if let Kernel::Quantize { to } = kernel {
        if *to == DType::I16 || is16(0) {
            let x = inputs
                .first()
                .ok_or_else(|| Error::msg("Quantize needs an input"))?;
            return one(quantize(x, *to, quant)?);
        }
        return Ok(None);
    }
    let binary = matches!(kernel, Kernel::Binary(_) | Kernel::BiasAdd { .. });
    if !(is16(0) || binary && is16(1)) {
        return Ok(None);
    }
    match kernel {
        Kernel::FusedMatMul { ta, tb, act } => {
            if *ta {
                return Err(Error::msg(
                    "int16 fully connected cannot transpose its input",
                ));
            }
            one(conv::fully_connected(inputs, *tb, *act, quant)?)
        }
        Kernel::FusedConv2D { win, act } => one(conv::conv2d(inputs, win, *act, quant)?),
        Kernel::FusedDepthwise { win, act } => one(conv::depthwise(inputs, win, *act, quant)?),
        Kernel::Pool { kind, ksize, win } => {
            one(conv::pool(&inputs[0], *kind, *ksize, win, quant)?)
        }
        Kernel::Binary(op @ (BinaryOp::Add | BinaryOp::Sub | BinaryOp::Mul)) => {
            one(binary_op(*op, &inputs[0], &inputs[1], quant)?)
        }
        Kernel::BiasAdd {
            channels_first: false,
        } => one(binary_op(BinaryOp::Add, &inputs[0], &inputs[1], quant)?),
        Kernel::Unary(UnaryOp::Relu) => one(relu(&inputs[0], quant)?),
        Kernel::Unary(UnaryOp::Exp) => one(exp(&inputs[0], quant)?),
        Kernel::Unary(UnaryOp::Sigmoid) => one(more::sigmoid_tanh(&inputs[0], false, quant)?),
        Kernel::Unary(UnaryOp::Tanh) => one(more::sigmoid_tanh(&inputs[0], true, quant)?),
        Kernel::Unary(UnaryOp::Relu6) => one(more::relu6(&inputs[0], quant)?),
        Kernel::Unary(UnaryOp::Abs) => one(more::abs(&inputs[0], quant)?),
        Kernel::Unary(UnaryOp::Rsqrt) => one(more::rsqrt(&inputs[0], quant)?),
        Kernel::Unary(UnaryOp::LeakyRelu(bits)) => {
            one(more::leaky_relu(&inputs[0], f32::from_bits(*bits), quant)?)
        }
        Kernel::Binary(op @ (BinaryOp::Maximum | BinaryOp::Minimum)) => one(more::max_min(
            &inputs[0],
            &inputs[1],
            *op == BinaryOp::Maximum,
            quant,
        )?),
        Kernel::Reduce { op, keep_dims } => one(more::reduce(
            &inputs[0], &inputs[1], *op, *keep_dims, quant,
        )?),
        Kernel::Softmax { log: false } => one(softmax(&inputs[0], quant)?),
        // Exported as SUB(x, x), which gives exactly 0 in 16x8.
        Kernel::ZerosLike => one(Value::from_vec(
            inputs[0].shape.clone(),
            vec![0i16; inputs[0].len()],
        )),
        Kernel::Concat { .. } | Kernel::Pack(_) => {
            let out = out_scale(quant)?;
            for (i, q) in quant.inputs.iter().enumerate() {
                if q.is_some() && in_scale(quant, i)? != out {
                    return Err(Error::msg(format!(
                        "int16 concatenation or pack input {i} is not quantized like its output"
                    )));
                }
            }
            Ok(None)
        }
        // Data movement, whatever the element type: LiteRT's kernels switch on the
        // element size (TRANSPOSE, SLICE, STRIDED_SLICE, TILE) or list int16 (the rest);
        // PAD pads with the output's zero point, 0.
        Kernel::Forward
        | Kernel::ForwardAll
        | Kernel::Transpose
        | Kernel::Slice
        | Kernel::StridedSlice(_)
        | Kernel::Pad
        | Kernel::Gather { .. }
        | Kernel::GatherTable { .. }
        | Kernel::Split { .. }
        | Kernel::Unpack(_)
        | Kernel::Tile
        | Kernel::ExpandDims
        | Kernel::Squeeze(_)
        | Kernel::Reshape
        | Kernel::Shape(_)
        | Kernel::Size(_)
        | Kernel::Rank
        | Kernel::Dequantize
        | Kernel::Const(_) => Ok(None),
        other => Err(Error::msg(format!(
            "no int16 kernel for {}",
            format!("{other:?}")
                .split(['(', ' ', '{'])
                .next()
                .unwrap_or("")
        ))),
    }
}

/// QUANTIZE to `to` (int16 or int8) from float32, int8 or int16.
fn quantize(x: &Value, to: DType, quant: &StepQuant) -> Result<Value> {
    let oq = quant
        .outputs
        .first()
        .and_then(|q| q.as_ref())
        .ok_or_else(|| Error::msg("Quantize output has no quantization parameters"))?;
    let (os, oz) = match (oq.scale.as_slice(), oq.zero_point.as_slice()) {
        ([s], [z]) if s.is_finite() && *s > 0.0 => (*s, *z as i32),
        _ => return Err(Error::msg("Quantize output must be quantized per tensor")),
    };
    let (lo, hi) = match to {
        DType::I16 => (-32768, 32767),
        DType::I8 => (-128, 127),
        other => return Err(Error::msg(format!("Quantize to {other} has no kernel"))),
    };
    let vals: Vec<i32> = match &*x.buf {
        Buf::F32(v) => v
            .iter()
            .map(|&f| quantize_value(f, os, oz, lo, hi))
            .collect(),
        Buf::I8(_) | Buf::I16(_) => {
            let iq = quant
                .inputs
                .first()
                .and_then(|q| q.as_ref())
                .ok_or_else(|| Error::msg("Quantize input has no quantization parameters"))?;
            let (is, iz) = match (iq.scale.as_slice(), iq.zero_point.as_slice()) {
                ([s], [z]) if s.is_finite() && *s > 0.0 => (*s, *z as i32),
                _ => return Err(Error::msg("Quantize input must be quantized per tensor")),
            };
            let (m, s) = quantize_multiplier(is as f64 / os as f64);
            x.to_i64s()?
                .into_iter()
                .map(|a| {
                    let r = multiply_by_quantized_multiplier(a as i32 - iz, m, s, ROUNDING);
                    (r + oz).clamp(lo, hi)
                })
                .collect()
        }
        _ => {
            return Err(Error::msg(format!(
                "Quantize takes float32, int8 or int16 input, got {}",
                x.dtype()
            )))
        }
    };
    Ok(match to {
        DType::I16 => Value::from_vec(x.shape.clone(), vals.iter().map(|&v| v as i16).collect()),
        _ => Value::from_vec(x.shape.clone(), vals.iter().map(|&v| v as i8).collect()),
    })
}

/// ADD and SUB (general scales, `left_shift = 15`) and MUL on int16.
fn binary_op(op: BinaryOp, a: &Value, b: &Value, quant: &StepQuant) -> Result<Value> {
    let (xa, xb) = (a.slice::<i16>()?, b.slice::<i16>()?);
    let (sa, sb, so) = (in_scale(quant, 0)?, in_scale(quant, 1)?, out_scale(quant)?);
    let mbqm = |v: i32, (q, s): (i32, i32)| multiply_by_quantized_multiplier(v, q, s, ROUNDING);
    let (v, shape) = match op {
        BinaryOp::Add | BinaryOp::Sub => {
            const LEFT_SHIFT: i32 = 15;
            let twice_max = 2.0 * sa.max(sb) as f64;
            let m1 = quantize_multiplier(sa as f64 / twice_max);
            let m2 = quantize_multiplier(sb as f64 / twice_max);
            let real_out = twice_max / ((1i64 << LEFT_SHIFT) as f64 * so as f64);
            if real_out >= 1.0 {
                return Err(Error::msg(format!(
                    "int16 {op:?}: output scale {so} is below 2·max(input scales) / 32768 \
                     ({sa}, {sb}); LiteRT aborts on such a model"
                )));
            }
            let mo = quantize_multiplier(real_out);
            let sub = op == BinaryOp::Sub;
            broadcast_map(xa, &a.shape, xb, &b.shape, |x, y| {
                let sx = mbqm((x as i32) << LEFT_SHIFT, m1);
                let sy = mbqm((y as i32) << LEFT_SHIFT, m2);
                let raw = if sub { sx - sy } else { sx + sy };
                sat16(mbqm(raw, mo))
            })?
        }
        BinaryOp::Mul => {
            let m = quantize_multiplier((sa * sb / so) as f64);
            broadcast_map(xa, &a.shape, xb, &b.shape, |x, y| {
                sat16(mbqm(x as i32 * y as i32, m))
            })?
        }
        other => return Err(Error::msg(format!("no int16 kernel for {other:?}"))),
    };
    Ok(Value::from_vec(shape, v))
}

/// RELU on int16: `MBQM(x, in / out)` clamped below at 0.
fn relu(x: &Value, quant: &StepQuant) -> Result<Value> {
    let (si, so) = (in_scale(quant, 0)?, out_scale(quant)?);
    let (m, s) = quantize_multiplier((si / so) as f64);
    let (lo, hi) = activation_range(FusedActivation::Relu, so, 0, -32768, 32767);
    let v: Vec<i16> = x
        .slice::<i16>()?
        .iter()
        .map(|&a| multiply_by_quantized_multiplier(a as i32, m, s, ROUNDING).clamp(lo, hi) as i16)
        .collect();
    Ok(Value::from_vec(x.shape.clone(), v))
}

/// EXP on int16 through TFLite's interpolated table.
fn exp(x: &Value, quant: &StepQuant) -> Result<Value> {
    let lut = lut_int16_f32(in_scale(quant, 0)?, 0, out_scale(quant)?, 0, f32::exp);
    let v: Vec<i16> = x
        .slice::<i16>()?
        .iter()
        .map(|&a| lut_lookup_int16(a, &lut))
        .collect();
    Ok(Value::from_vec(x.shape.clone(), v))
}

/// SOFTMAX (beta 1) over the last dimension; the output must be (1/32768, 0).
fn softmax(x: &Value, quant: &StepQuant) -> Result<Value> {
    let si = in_scale(quant, 0)?;
    let so = out_scale(quant)?;
    if (so - 1.0 / 32768.0).abs() > 0.001 / 32768.0 {
        return Err(Error::msg(format!(
            "int16 Softmax output must be quantized (1/32768, 0), got scale {so}"
        )));
    }
    let m = quantize_multiplier(si as f64 / (10.0 / 65535.0));
    let (exp_lut, recip_lut) = softmax_int16_luts();
    let xs = x.slice::<i16>()?;
    let depth = x.shape.last().copied().unwrap_or(1).max(1);
    let mut out = vec![0i16; xs.len()];
    for (row, o) in xs.chunks(depth).zip(out.chunks_mut(depth)) {
        softmax_int16_row(row, o, m, &exp_lut, &recip_lut);
    }
    Ok(Value::from_vec(x.shape.clone(), out))
}
