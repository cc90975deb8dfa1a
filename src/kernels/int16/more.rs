//! 16x8 kernels beyond the matrix ops, as LiteRT's reference kernels compute them:
//!
//! * LOGISTIC, TANH: TFLite's fixed-point table paths (`reference_integer_ops::Logistic`
//!   and `Tanh` over `sigmoid_table_uint16`), input rescaled to 1/(3·4096) units,
//!   output fixed at (1/32768, 0).
//! * RELU6: `MBQM(x, in / out)` clamped to [0, round(6 / out)].
//! * ABS: `|x|`, times `in / out` when the scales differ. RSQRT: TFLite's interpolated
//!   int16 table of `1 / sqrt(x)` (`32767 · out` at x ≤ 0), built in f32.
//! * LEAKY_RELU: `MBQM(x, in / out)` for x ≥ 0, else `MBQM(x, in · alpha / out)` (the
//!   multipliers in f32, a negative one applied as its magnitude and negated).
//! * MEAN: `reference_ops::QuantizedMeanOrSum` (int32 sum, `1 / count` folded into the
//!   `in / out` multiplier). SUM has no int16 form: LiteRT's reference SUM reads int16
//!   data as uint8 (see `quantize_int8::int16`).
//! * MAXIMUM, MINIMUM, REDUCE_MAX, REDUCE_MIN: raw int16 comparisons, the inputs and
//!   the output sharing one scale.

use super::{in_scale, out_scale, scale_of};
use crate::error::{Error, Result};
use crate::ir::FusedActivation;
use crate::kernels::array::{reduce as array_reduce, ReduceOp};
use crate::kernels::elementwise::broadcast_map;
use crate::kernels::int8::ROUNDING;
use crate::kernels::ops::StepQuant;
use crate::kernels::rounding::{
    activation_range, logistic_int16, lut_int16_f32, lut_lookup_int16, mean_multiplier,
    multiply_by_quantized_multiplier, quantize_multiplier, sigmoid_tanh_int16_rescale, tanh_int16,
};
use crate::kernels::value::{Buf, Value};

/// LOGISTIC (`tanh = false`) or TANH on int16; the output must be (1/32768, 0).
pub fn sigmoid_tanh(x: &Value, tanh: bool, quant: &StepQuant) -> Result<Value> {
    let what = if tanh { "TANH" } else { "LOGISTIC" };
    let so = out_scale(quant)?;
    if so != 1.0 / 32768.0 {
        return Err(Error::msg(format!(
            "int16 {what} output must be quantized (1/32768, 0), got scale {so}"
        )));
    }
    let rescale = sigmoid_tanh_int16_rescale(in_scale(quant, 0)?, tanh);
    let f = if tanh { tanh_int16 } else { logistic_int16 };
    let v: Vec<i16> = x.slice::<i16>()?.iter().map(|&a| f(a, rescale)).collect();
    Ok(Value::from_vec(x.shape.clone(), v))
}

/// RELU6 on int16 (`QuantizedReluX<int16_t>`).
pub fn relu6(x: &Value, quant: &StepQuant) -> Result<Value> {
    let (si, so) = (in_scale(quant, 0)?, out_scale(quant)?);
    let (m, s) = quantize_multiplier((si / so) as f64);
    let (lo, hi) = activation_range(FusedActivation::Relu6, so, 0, -32768, 32767);
    let v: Vec<i16> = x
        .slice::<i16>()?
        .iter()
        .map(|&a| multiply_by_quantized_multiplier(a as i32, m, s, ROUNDING).clamp(lo, hi) as i16)
        .collect();
    Ok(Value::from_vec(x.shape.clone(), v))
}

/// ABS on int16 (`AbsEvalQuantized<int16_t>`).
pub fn abs(x: &Value, quant: &StepQuant) -> Result<Value> {
    let (si, so) = (in_scale(quant, 0)?, out_scale(quant)?);
    let m = (si != so).then(|| quantize_multiplier(f64::from(si / so)));
    let v: Vec<i16> = x
        .slice::<i16>()?
        .iter()
        .map(|&a| {
            let value = (a as i32).abs();
            let r = match m {
                Some((q, s)) => multiply_by_quantized_multiplier(value, q, s, ROUNDING),
                None => value,
            };
            r.clamp(-32768, 32767) as i16
        })
        .collect();
    Ok(Value::from_vec(x.shape.clone(), v))
}

/// RSQRT on int16 through TFLite's interpolated table (elementwise.cc's `Prepare`).
pub fn rsqrt(x: &Value, quant: &StepQuant) -> Result<Value> {
    let so = out_scale(quant)?;
    let xs = x.slice::<i16>()?;
    if xs.iter().any(|&a| a < 0) {
        return Err(Error::msg(
            "int16 RSQRT of a negative value (LiteRT fails: only defined for positive values)",
        ));
    }
    let lut = lut_int16_f32(in_scale(quant, 0)?, 0, so, 0, |v| {
        if v <= 0.0 {
            32767.0 * so
        } else {
            1.0 / v.sqrt()
        }
    });
    let v: Vec<i16> = xs.iter().map(|&a| lut_lookup_int16(a, &lut)).collect();
    Ok(Value::from_vec(x.shape.clone(), v))
}

/// LEAKY_RELU on int16 (`reference_ops::QuantizeLeakyRelu<int16_t>`).
pub fn leaky_relu(x: &Value, alpha: f32, quant: &StepQuant) -> Result<Value> {
    let (si, so) = (in_scale(quant, 0)?, out_scale(quant)?);
    let m_alpha = si * alpha / so;
    let (qa, sa) = quantize_multiplier(f64::from(m_alpha.abs()));
    let (qi, shi) = quantize_multiplier(f64::from(si / so));
    let v: Vec<i16> = x
        .slice::<i16>()?
        .iter()
        .map(|&a| {
            let a = a as i32;
            let r = if a >= 0 {
                multiply_by_quantized_multiplier(a, qi, shi, ROUNDING)
            } else {
                let r = multiply_by_quantized_multiplier(a, qa, sa, ROUNDING);
                if m_alpha < 0.0 {
                    -r
                } else {
                    r
                }
            };
            r.clamp(-32768, 32767) as i16
        })
        .collect();
    Ok(Value::from_vec(x.shape.clone(), v))
}

/// The inputs of a raw comparison and the output must share one scale.
fn same_scales(quant: &StepQuant, what: &str) -> Result<()> {
    let out = out_scale(quant)?;
    for (i, q) in quant.inputs.iter().enumerate() {
        if let Some(q) = q {
            let s = scale_of(Some(q), &format!("{what} input {i}"))?;
            if s != out {
                return Err(Error::msg(format!(
                    "int16 {what} input {i} has scale {s}, the output {out}; they must be equal"
                )));
            }
        }
    }
    Ok(())
}

/// MAXIMUM (`max = true`) or MINIMUM, broadcasting.
pub fn max_min(a: &Value, b: &Value, max: bool, quant: &StepQuant) -> Result<Value> {
    same_scales(quant, if max { "MAXIMUM" } else { "MINIMUM" })?;
    let (v, shape) = broadcast_map(
        a.slice::<i16>()?,
        &a.shape,
        b.slice::<i16>()?,
        &b.shape,
        |x: i16, y: i16| if max { x.max(y) } else { x.min(y) },
    )?;
    Ok(Value::from_vec(shape, v))
}

/// MEAN, REDUCE_MAX and REDUCE_MIN over `axes`.
pub fn reduce(
    x: &Value,
    axes: &Value,
    op: ReduceOp,
    keep_dims: bool,
    quant: &StepQuant,
) -> Result<Value> {
    let xs = x.slice::<i16>()?;
    match op {
        ReduceOp::Max | ReduceOp::Min => {
            same_scales(quant, "reduction")?;
            let wide = Value::from_vec(x.shape.clone(), xs.iter().map(|&v| v as i32).collect());
            let r = array_reduce(&wide, axes, op, keep_dims)?;
            let v: Vec<i16> = r.slice::<i32>()?.iter().map(|&v| v as i16).collect();
            Ok(Value::from_vec(r.shape.clone(), v))
        }
        ReduceOp::Mean => {
            let (si, so) = (in_scale(quant, 0)?, out_scale(quant)?);
            let wide = Value::from_vec(x.shape.clone(), xs.iter().map(|&v| v as i64).collect());
            let sums = array_reduce(&wide, axes, ReduceOp::Sum, keep_dims)?;
            let n_out = sums.len();
            let count = xs.len().checked_div(n_out).unwrap_or(0);
            if count == 0 {
                return Ok(Value::from_vec(sums.shape.clone(), vec![0i16; n_out]));
            }
            let (q, s) = quantize_multiplier(si as f64 / so as f64);
            let (q, s) = mean_multiplier(q, s, count as i64);
            let v: Vec<i16> = match &*sums.buf {
                Buf::I64(v) => v
                    .iter()
                    .map(|&sum| {
                        multiply_by_quantized_multiplier(sum as i32, q, s, ROUNDING)
                            .clamp(-32768, 32767) as i16
                    })
                    .collect(),
                _ => return Err(Error::msg("int16 Mean: the sum is not int64")),
            };
            Ok(Value::from_vec(sums.shape.clone(), v))
        }
        other => Err(Error::msg(format!(
            "no int16 kernel for reduction {other:?}"
        ))),
    }
}
