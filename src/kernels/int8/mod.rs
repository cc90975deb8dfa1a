//! Int8 kernels with TFLite's reference arithmetic, and the float kernels of the
//! fused ops the quantizer introduces (`_FusedConv2D`, `_FusedDepthwiseConv2dNative`,
//! `_FusedMatMul`).
//!
//! A step runs in int8 when its data input is an int8 value; the quantization of
//! every input and output comes with the step ([`StepQuant`]). Each kernel follows
//! the TFLite reference kernel (`BUILTIN_REF` resolver) of the op it lowers to, so
//! that an exported model gives the same bits in LiteRT. Every requantization goes
//! through [`super::rounding`].
//!
//! Which rounding each op uses, and where TFLite computes a multiplier in f32
//! rather than f64, is part of the arithmetic and is listed with each kernel.
//!
//! # Which LiteRT kernels qpipe follows
//!
//! LiteRT's own kernels disagree with each other, so "what LiteRT computes"
//! depends on the resolver. qpipe follows the reference kernels (`BUILTIN_REF`):
//! they are the specification the others approximate, they are the same on every
//! CPU, and they are what `tests/quantize_*litert.rs` checks bit for bit. Measured
//! with LiteRT 2.3.0 on x86-64:
//!
//! * FULLY_CONNECTED: the reference kernel requantizes in double
//!   (`round(acc * in * w / out)`); the optimized one uses the integer
//!   `MultiplyByQuantizedMultiplier`. They differ by one LSB on rounding ties.
//! * The XNNPACK delegate (default resolver) rounds requantization once, the
//!   reference kernels twice (gemmlowp): CONV_2D, DEPTHWISE_CONV_2D, ADD, MUL,
//!   MEAN and int8 → int8 QUANTIZE differ by one LSB on up to a few percent (MEAN,
//!   requantization) or a fraction of a percent (convolutions) of the elements.
//! * Without the delegate (`BUILTIN_WITHOUT_DEFAULT_DELEGATES`) the convolution,
//!   pooling and softmax models agree with the reference kernels bit for bit.
//!
//! Inside a network those one-LSB differences are amplified by steep functions:
//! one LSB of a logit (scale ≈ 0.09) moves a softmax probability by several 1/256
//! steps. So that qpipe can predict what the device computes too, the kernels
//! have a second profile, [`Arithmetic::LiteRt`], that reproduces the default
//! resolver op by op (XNNPACK for the ops it takes, the optimized builtins for
//! the rest); [`super::rounding`] describes each of its roundings.

mod activation;
mod conv;
mod depthwise512;
mod elementwise;
mod gemm;
mod hybrid;
mod math;
mod packed_cache;
mod patch;
mod pool;
mod reduce;
mod spatial;
#[cfg(test)]
mod windows_tests;

use super::elementwise::{BinaryOp, UnaryOp};
use super::math::Composite;
use super::ops::{Arithmetic, Kernel, StepQuant};
use super::rounding::Rounding;
use super::value::Value;
use crate::error::{Error, Result};
use crate::ir::op::LinearKind;
use crate::ir::{DType, QuantParams};

/// How TFLite was built: `TFLITE_SINGLE_ROUNDING` is off in LiteRT's release
/// builds, so `MultiplyByQuantizedMultiplier` rounds twice (gemmlowp).
pub const ROUNDING: Rounding = Rounding::Double;

/// Per-tensor int8 parameters of an activation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Affine {
    pub scale: f32,
    pub zero_point: i32,
}

impl Affine {
    pub fn from_params(q: &QuantParams, what: &str) -> Result<Affine> {
        match (q.scale.as_slice(), q.zero_point.as_slice(), q.axis) {
            ([s], [z], None) | ([s], [z], Some(_)) => {
                if !(s.is_finite() && *s > 0.0) {
                    return Err(Error::msg(format!("{what} has scale {s}")));
                }
                if !(-128..=127).contains(z) {
                    return Err(Error::msg(format!(
                        "{what} has zero point {z}, outside int8"
                    )));
                }
                Ok(Affine {
                    scale: *s,
                    zero_point: *z as i32,
                })
            }
            _ => Err(Error::msg(format!(
                "{what} must be quantized per tensor, it has {} scales",
                q.scale.len()
            ))),
        }
    }
}

fn input_affine(quant: &StepQuant, i: usize) -> Result<Affine> {
    let q = quant
        .inputs
        .get(i)
        .and_then(|q| q.as_ref())
        .ok_or_else(|| Error::msg(format!("int8 input {i} has no quantization parameters")))?;
    Affine::from_params(q, &format!("input {i}"))
}

fn output_affine(quant: &StepQuant) -> Result<Affine> {
    let q = quant
        .outputs
        .first()
        .and_then(|q| q.as_ref())
        .ok_or_else(|| {
            Error::msg("an int8 kernel's output has no quantization parameters".to_string())
        })?;
    Affine::from_params(q, "output")
}

/// Per-channel scales of a weight tensor with `channels` output channels
/// (a per-tensor scale is repeated).
fn channel_scales(quant: &StepQuant, i: usize, channels: usize) -> Result<Vec<f32>> {
    let q = quant
        .inputs
        .get(i)
        .and_then(|q| q.as_ref())
        .ok_or_else(|| Error::msg(format!("int8 weights (input {i}) have no quantization")))?;
    if q.zero_point.iter().any(|&z| z != 0) {
        return Err(Error::msg("int8 weights must have zero point 0"));
    }
    let s = match q.scale.len() {
        1 => vec![q.scale[0]; channels],
        n if n == channels => q.scale.clone(),
        n => {
            return Err(Error::msg(format!(
                "weights have {n} scales for {channels} output channels"
            )))
        }
    };
    if s.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
        return Err(Error::msg("weights have a non-positive scale"));
    }
    Ok(s)
}

/// Runs `kernel` in int8 when its data inputs are int8. `None` means the generic
/// (dtype-agnostic) kernel is right for int8 too, or the step is not int8.
pub fn exec(kernel: &Kernel, inputs: &[Value], quant: &StepQuant) -> Result<Option<Vec<Value>>> {
    let is_i8 = |i: usize| {
        inputs.get(i).is_some_and(|v| v.dtype() == DType::I8)
            && quant.inputs.get(i).is_some_and(|q| q.is_some())
    };
    if let Kernel::Quantize { .. } = kernel {
        let x = inputs
            .first()
            .ok_or_else(|| Error::msg("Quantize needs an input"))?;
        return elementwise::quantize(x, quant).map(|v| Some(vec![v]));
    }
    let kind = match kernel {
        Kernel::FusedConv2D { .. } => Some(LinearKind::Conv2D),
        Kernel::FusedDepthwise { .. } => Some(LinearKind::Depthwise),
        Kernel::FusedMatMul { .. } => Some(LinearKind::MatMul),
        _ => None,
    };
    let w = LinearKind::HYBRID_WEIGHTS;
    let hybrid = match (kind, inputs.first(), inputs.get(w)) {
        (Some(kind), Some(x), Some(wv)) => kind.is_hybrid(x.dtype(), wv.dtype()) && is_i8(w),
        _ => false,
    };
    match kernel {
        Kernel::FusedConv2D { win, act } if hybrid => {
            return Ok(Some(vec![hybrid::conv2d(inputs, win, *act, quant)?]))
        }
        Kernel::FusedMatMul { ta, tb, act } if hybrid => {
            if *ta {
                return Err(Error::msg(
                    "hybrid fully connected cannot transpose its input",
                ));
            }
            return Ok(Some(vec![hybrid::fully_connected(
                inputs, *tb, *act, quant,
            )?]));
        }
        _ => {}
    }
    // TRANSPOSE_CONV's data is its third input (output shape and filter come first).
    if let Kernel::TransposeConv { win, act } = kernel {
        if !is_i8(2) {
            return Ok(None);
        }
        return Ok(Some(vec![spatial::transpose_conv(
            inputs, win, *act, quant,
        )?]));
    }
    let binary = matches!(kernel, Kernel::Binary(_) | Kernel::BiasAdd { .. });
    if !(is_i8(0) || binary && is_i8(1)) {
        return Ok(None);
    }
    let one = |v: Value| Ok(Some(vec![v]));
    match kernel {
        Kernel::FusedConv2D { win, act } => one(conv::conv2d(inputs, win, *act, quant)?),
        Kernel::FusedDepthwise { win, act } => one(conv::depthwise(inputs, win, *act, quant)?),
        Kernel::FusedMatMul { ta, tb, act } => {
            one(conv::fully_connected(inputs, *ta, *tb, *act, quant)?)
        }
        Kernel::Pool { kind, ksize, win } => {
            one(pool::pool(&inputs[0], *kind, *ksize, win, quant)?)
        }
        Kernel::Binary(BinaryOp::SquaredDifference) => {
            one(math::squared_difference(&inputs[0], &inputs[1], quant)?)
        }
        Kernel::Binary(op) => one(elementwise::binary(*op, &inputs[0], &inputs[1], quant)?),
        // Exported as ADD, which broadcasts the bias over the last dimension.
        Kernel::BiasAdd {
            channels_first: false,
        } => one(elementwise::binary(
            super::elementwise::BinaryOp::Add,
            &inputs[0],
            &inputs[1],
            quant,
        )?),
        Kernel::Unary(op @ (UnaryOp::Exp | UnaryOp::Log | UnaryOp::Elu)) => {
            let t = match op {
                UnaryOp::Exp => math::Table::Exp,
                UnaryOp::Log => math::Table::Log,
                _ => math::Table::Elu,
            };
            one(math::lookup(t, &inputs[0], quant)?)
        }
        Kernel::Unary(UnaryOp::Rsqrt) => one(math::rsqrt(&inputs[0], quant)?),
        Kernel::Unary(UnaryOp::Abs) => one(math::abs(&inputs[0], quant)?),
        Kernel::Unary(UnaryOp::LeakyRelu(bits)) => {
            one(math::leaky_relu(&inputs[0], f32::from_bits(*bits), quant)?)
        }
        Kernel::Composite(Composite::Gelu { approximate }) => one(math::lookup(
            math::Table::Gelu {
                approximate: *approximate,
            },
            &inputs[0],
            quant,
        )?),
        Kernel::Composite(Composite::Prelu) => {
            let alpha = inputs
                .get(1)
                .ok_or_else(|| Error::msg("PReLU needs an alpha input"))?;
            one(math::prelu(&inputs[0], alpha, quant)?)
        }
        Kernel::Composite(Composite::L2Normalize) => one(math::l2_normalize(&inputs[0], quant)?),
        Kernel::BatchMatMul { adj_a, adj_b } => one(math::batch_matmul(
            &inputs[0], &inputs[1], *adj_a, *adj_b, quant,
        )?),
        Kernel::Unary(op) => one(elementwise::unary(*op, &inputs[0], quant)?),
        Kernel::HardSwish => one(activation::hard_swish(&inputs[0], quant)?),
        Kernel::ResizeBilinear(r) => {
            one(spatial::resize_bilinear(&inputs[0], &inputs[1], *r, quant)?)
        }
        Kernel::Softmax { log: false } => one(reduce::softmax(&inputs[0], quant)?),
        Kernel::Reduce { op, keep_dims } => one(reduce::reduce(
            &inputs[0], &inputs[1], *op, *keep_dims, quant,
        )?),
        Kernel::Pad | Kernel::PadV2 => one(elementwise::pad(inputs, quant)?),
        Kernel::Concat { .. } => {
            same_params_everywhere(quant, "concatenation")?;
            Ok(None)
        }
        // The zeros of the output's parameters (exported as SUB(x, x), which gives them exactly).
        Kernel::ZerosLike => {
            let zp = output_affine(quant)?.zero_point as i8;
            one(Value::from_vec(
                inputs[0].shape.clone(),
                vec![zp; inputs[0].len()],
            ))
        }
        Kernel::Pack(_) => {
            same_params_everywhere(quant, "pack")?;
            Ok(None)
        }
        Kernel::Forward
        | Kernel::ForwardAll
        | Kernel::Gather { .. }
        | Kernel::GatherTable { .. }
        | Kernel::TableConst(_)
        | Kernel::ExpandDims
        | Kernel::Squeeze(_)
        | Kernel::Reshape
        | Kernel::Shape(_)
        | Kernel::Size(_)
        | Kernel::Rank
        | Kernel::StridedSlice(_)
        | Kernel::Slice
        | Kernel::Transpose
        | Kernel::Tile
        | Kernel::Unpack(_)
        | Kernel::Split { .. }
        | Kernel::Dequantize
        | Kernel::Const(_)
        | Kernel::ResizeNearest(_)
        | Kernel::ArgReduce { .. } => Ok(None),
        other => Err(Error::msg(format!(
            "no int8 kernel for {}",
            kernel_name(other)
        ))),
    }
}

fn kernel_name(k: &Kernel) -> String {
    let s = format!("{k:?}");
    s.split(['(', ' ', '{']).next().unwrap_or("").to_string()
}

/// TFLite's int8 CONCATENATION requires every input to carry the output's parameters.
fn same_params_everywhere(quant: &StepQuant, what: &str) -> Result<()> {
    let out = output_affine(quant)?;
    for (i, q) in quant.inputs.iter().enumerate() {
        let Some(q) = q else { continue };
        let a = Affine::from_params(q, &format!("input {i}"))?;
        if a != out {
            return Err(Error::msg(format!(
                "int8 {what} input {i} has scale {} zero point {}, the output {} / {}; \
                 they must be equal",
                a.scale, a.zero_point, out.scale, out.zero_point
            )));
        }
    }
    Ok(())
}

/// Saturates an i32 into int8.
#[inline]
fn sat8(v: i32) -> i8 {
    v.clamp(-128, 127) as i8
}
