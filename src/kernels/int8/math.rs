//! Int8 kernels of the arithmetic ops, each as LiteRT's reference kernel computes
//! it (`BUILTIN_REF`): BATCH_MATMUL, EXP, LOG, ELU and GELU (lookup tables), RSQRT,
//! ABS, LEAKY_RELU, PRELU, SQUARED_DIFFERENCE and L2_NORMALIZATION.
//!
//! Where each multiplier is computed in f32 before it is widened to f64 (as the
//! C++ expression does) is part of the arithmetic and noted per kernel. The
//! `Arithmetic::LiteRt` profile (the default resolver) computes them the same way
//! except LEAKY_RELU, which XNNPACK takes (measured against LiteRT 2.3.0 on x86-64:
//! every other kernel here gives the reference kernels' bits there).

use super::{input_affine, output_affine, sat8, Affine, Arithmetic, ROUNDING};
use crate::error::{Error, Result};
use crate::kernels::elementwise::broadcast_map;
use crate::kernels::ops::StepQuant;
use crate::kernels::rounding::{
    inv_sqrt_quantized_multiplier, lut_int8, multiply_by_quantized_multiplier, quantize_multiplier,
    XnnLeakyRelu,
};
use crate::kernels::value::Value;

fn mbqm(x: i32, (q, shift): (i32, i32)) -> i32 {
    multiply_by_quantized_multiplier(x, q, shift, ROUNDING)
}

/// The element-wise functions LiteRT computes on int8 through a 256-entry table
/// (`LUTPopulate<int8_t>`: see [`lut_int8`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// `exp.cc`: `std::exp`.
    Exp,
    /// `elementwise.cc` `LogLUTPrepare`: `std::log`, and the output's lowest value
    /// for inputs ≤ 0.
    Log,
    /// `activations.cc` `EluPrepare`: `x < 0 ? expm1(x) : x`.
    Elu,
    /// `reference_ops::GeluTransform` / `GeluTransformApproximate`.
    Gelu { approximate: bool },
}

/// `erfcf` to within the f32 rounding of the f64 result (the continued fraction
/// above 2.5, where `1 - erf` would cancel).
fn erfc(z: f64) -> f64 {
    if z.is_nan() {
        return z;
    }
    if z < 2.5 {
        return 1.0 - crate::kernels::math::erf(z);
    }
    if z > 27.0 {
        return 0.0;
    }
    let mut f = z;
    for k in (1..80).rev() {
        f = z + (k as f64 / 2.0) / f;
    }
    (-z * z).exp() / (f * std::f64::consts::PI.sqrt())
}

/// `reference_ops::GeluTransform`: `0.5f * x * erfcf(x * (float)-M_SQRT1_2)`, in f32.
fn gelu_erfc(x: f32) -> f32 {
    let z = x * (-std::f64::consts::FRAC_1_SQRT_2 as f32);
    0.5f32 * x * (erfc(f64::from(z)) as f32)
}

/// `reference_ops::GeluTransformApproximate`, in f32 with the constant
/// `(float)(M_2_SQRTPI * M_SQRT1_2)`.
fn gelu_tanh(x: f32) -> f32 {
    let k = (std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2) as f32;
    0.5f32 * x * (1.0f32 + (k * (x + 0.044715f32 * x * x * x)).tanh())
}

/// The table of `f` for the step's input and output parameters.
pub fn table(f: Table, xin: Affine, out: Affine) -> [i8; 256] {
    let lut =
        |g: &dyn Fn(f32) -> f32| lut_int8(xin.scale, xin.zero_point, out.scale, out.zero_point, g);
    match f {
        Table::Exp => lut(&|v: f32| v.exp()),
        Table::Log => {
            // `(int8 min - zp) * scale`: the int difference converted to float.
            let output_min = (-128 - out.zero_point) as f32 * out.scale;
            lut(&|v: f32| if v <= 0.0 { output_min } else { v.ln() })
        }
        Table::Elu => lut(&|v: f32| if v < 0.0 { v.exp_m1() } else { v }),
        Table::Gelu { approximate: true } => lut(&gelu_tanh),
        Table::Gelu { approximate: false } => lut(&gelu_erfc),
    }
}

/// An element-wise op through its table.
pub fn lookup(f: Table, x: &Value, quant: &StepQuant) -> Result<Value> {
    let t = table(f, input_affine(quant, 0)?, output_affine(quant)?);
    let xs = x.slice::<i8>()?;
    Ok(Value::from_vec(
        x.shape.clone(),
        xs.iter().map(|&q| t[q as u8 as usize]).collect::<Vec<i8>>(),
    ))
}

/// RSQRT (`elementwise.cc` `RsqrtEvalQuantizedInt8`): `1/sqrt(q - zp)` as a
/// fixed-point multiplier ([`inv_sqrt_quantized_multiplier`]) applied to 1 with 20
/// extra bits, then the multiplier `1 / (sqrtf(in) * out)` (the product in f32, the
/// quotient in f64). Zero gives 127; a value below the zero point is an error, as
/// in LiteRT.
pub fn rsqrt(x: &Value, quant: &StepQuant) -> Result<Value> {
    let (xin, out) = (input_affine(quant, 0)?, output_affine(quant)?);
    let m = quantize_multiplier(1.0 / f64::from(xin.scale.sqrt() * out.scale));
    const SHIFT: i32 = 20;
    let xs = x.slice::<i8>()?;
    let mut v = Vec::with_capacity(xs.len());
    for &q in xs {
        let value = q as i32 - xin.zero_point;
        if value < 0 {
            return Err(Error::msg(format!(
                "int8 Rsqrt of a negative value (int8 {q}, zero point {})",
                xin.zero_point
            )));
        }
        if value == 0 {
            v.push(127i8);
            continue;
        }
        let (inv, shift) = inv_sqrt_quantized_multiplier(value);
        let data = mbqm(1, (inv, shift + SHIFT));
        v.push(sat8(mbqm(data, (m.0, m.1 - SHIFT)) + out.zero_point));
    }
    Ok(Value::from_vec(x.shape.clone(), v))
}

/// ABS (`elementwise.cc` `AbsEvalQuantized`): `|q - in_zp|`, rescaled by
/// `in / out` (f32 quotient) when the scales differ, plus the output zero point.
pub fn abs(x: &Value, quant: &StepQuant) -> Result<Value> {
    let (xin, out) = (input_affine(quant, 0)?, output_affine(quant)?);
    let m = (xin.scale != out.scale).then(|| quantize_multiplier(f64::from(xin.scale / out.scale)));
    let xs = x.slice::<i8>()?;
    let v: Vec<i8> = xs
        .iter()
        .map(|&q| {
            let value = (q as i32 - xin.zero_point).abs();
            let r = match m {
                Some(m) => mbqm(value, m),
                None => value,
            };
            sat8(r + out.zero_point)
        })
        .collect();
    Ok(Value::from_vec(x.shape.clone(), v))
}

/// LEAKY_RELU (`reference_ops::QuantizeLeakyRelu`): `q - in_zp` times `in / out`
/// when ≥ 0, else times `in * alpha / out` (both computed in f32).
///
/// With [`Arithmetic::LiteRt`], XNNPACK's ([`XnnLeakyRelu`]), which differs by one
/// LSB on some values.
pub fn leaky_relu(x: &Value, alpha: f32, quant: &StepQuant) -> Result<Value> {
    let (xin, out) = (input_affine(quant, 0)?, output_affine(quant)?);
    if quant.arithmetic == Arithmetic::LiteRt {
        let p = XnnLeakyRelu::new(xin.scale, xin.zero_point, out.scale, out.zero_point, alpha);
        let xs = x.slice::<i8>()?;
        return Ok(Value::from_vec(
            x.shape.clone(),
            xs.iter()
                .map(|&q| p.apply(q as i32) as i8)
                .collect::<Vec<i8>>(),
        ));
    }
    let m_alpha = quantize_multiplier(f64::from(xin.scale * alpha / out.scale));
    let m_identity = quantize_multiplier(f64::from(xin.scale / out.scale));
    let xs = x.slice::<i8>()?;
    let v: Vec<i8> = xs
        .iter()
        .map(|&q| {
            let value = q as i32 - xin.zero_point;
            let m = if value >= 0 { m_identity } else { m_alpha };
            sat8(out.zero_point + mbqm(value, m))
        })
        .collect();
    Ok(Value::from_vec(x.shape.clone(), v))
}

/// PRELU (`reference_ops::BroadcastPrelu4DSlow`): `x - x_zp` times `x / out` when
/// ≥ 0, else `(x - x_zp) * (alpha - alpha_zp)` times `x * alpha / out` (f32).
pub fn prelu(x: &Value, alpha: &Value, quant: &StepQuant) -> Result<Value> {
    let (xin, a, out) = (
        input_affine(quant, 0)?,
        input_affine(quant, 1)?,
        output_affine(quant)?,
    );
    let m1 = quantize_multiplier(f64::from(xin.scale / out.scale));
    let m2 = quantize_multiplier(f64::from(xin.scale * a.scale / out.scale));
    let (v, shape) = broadcast_map(
        x.slice::<i8>()?,
        &x.shape,
        alpha.slice::<i8>()?,
        &alpha.shape,
        |q, al| {
            let value = q as i32 - xin.zero_point;
            let r = if value >= 0 {
                mbqm(value, m1)
            } else {
                mbqm(value.wrapping_mul(al as i32 - a.zero_point), m2)
            };
            sat8(r + out.zero_point)
        },
    )?;
    Ok(Value::from_vec(shape, v))
}

/// SQUARED_DIFFERENCE (`squared_difference.cc`): each input shifted left by 7 and
/// rescaled to twice the larger input scale (`2 * max` in f32, the ratios in f64),
/// the difference squared, then rescaled by `(2·max)² / (2^14 · out)`; every
/// multiplier is below one (`QuantizeMultiplierSmallerThanOneExp`).
pub fn squared_difference(a: &Value, b: &Value, quant: &StepQuant) -> Result<Value> {
    let (pa, pb, out) = (
        input_affine(quant, 0)?,
        input_affine(quant, 1)?,
        output_affine(quant)?,
    );
    const LEFT_SHIFT: i32 = 7;
    let twice_max = f64::from(2.0f32 * pa.scale.max(pb.scale));
    let m1 = quantize_multiplier(f64::from(pa.scale) / twice_max);
    let m2 = quantize_multiplier(f64::from(pb.scale) / twice_max);
    let mo = quantize_multiplier(
        twice_max * twice_max / f64::from((1i32 << (2 * LEFT_SHIFT)) as f32 * out.scale),
    );
    if [m1, m2, mo].iter().any(|&(_, s)| s > 0) {
        return Err(Error::msg(format!(
            "int8 SquaredDifference: a multiplier is not below one (inputs {pa:?}, {pb:?}, \
             output {out:?})"
        )));
    }
    let (v, shape) = broadcast_map(
        a.slice::<i8>()?,
        &a.shape,
        b.slice::<i8>()?,
        &b.shape,
        |x, y| {
            let x = mbqm((x as i32 - pa.zero_point) * (1 << LEFT_SHIFT), m1);
            let y = mbqm((y as i32 - pb.zero_point) * (1 << LEFT_SHIFT), m2);
            let d = x - y;
            sat8(mbqm(d.wrapping_mul(d), mo) + out.zero_point)
        },
    )?;
    Ok(Value::from_vec(shape, v))
}

/// L2_NORMALIZATION over the last axis (`reference_integer_ops::L2Normalization`):
/// the sum of squares of `q - zp` in i32, its inverse square root as a fixed-point
/// multiplier ([`inv_sqrt_quantized_multiplier`]), applied with 7 more bits of
/// left shift: the output is in 1/128 steps with zero point 0, which LiteRT requires.
pub fn l2_normalize(x: &Value, quant: &StepQuant) -> Result<Value> {
    let (xin, out) = (input_affine(quant, 0)?, output_affine(quant)?);
    if out.scale != 1.0 / 128.0 || out.zero_point != 0 {
        return Err(Error::msg(format!(
            "int8 L2Normalize output must be quantized (1/128, 0), got {out:?}"
        )));
    }
    let depth = *x
        .shape
        .last()
        .ok_or_else(|| Error::msg("L2 normalization needs rank ≥ 1"))?;
    let xs = x.slice::<i8>()?;
    let mut v = Vec::with_capacity(xs.len());
    if depth > 0 {
        for row in xs.chunks(depth) {
            let acc = row.iter().fold(0i32, |acc, &q| {
                let d = q as i32 - xin.zero_point;
                acc.wrapping_add(d * d)
            });
            let (inv, shift) = inv_sqrt_quantized_multiplier(acc);
            v.extend(
                row.iter()
                    .map(|&q| sat8(mbqm(q as i32 - xin.zero_point, (inv, shift + 7)))),
            );
        }
    }
    Ok(Value::from_vec(x.shape.clone(), v))
}

/// BATCH_MATMUL of two int8 tensors (`batch_matmul.cc` `EvalInt8Int8` and
/// `reference_ops::BatchMatMul<int8_t, int32_t>`): `Σ (a - a_zp)(b - b_zp)` in
/// i32, requantized with the multiplier `(f64)(a_scale * b_scale) / out_scale`
/// (the product in f32), no activation. Batch dimensions broadcast.
pub fn batch_matmul(
    a: &Value,
    b: &Value,
    adj_a: bool,
    adj_b: bool,
    quant: &StepQuant,
) -> Result<Value> {
    let (pa, pb, out) = (
        input_affine(quant, 0)?,
        input_affine(quant, 1)?,
        output_affine(quant)?,
    );
    if a.rank() < 2 || b.rank() < 2 {
        return Err(Error::msg(format!(
            "int8 BatchMatMul needs rank ≥ 2 operands, got {:?} and {:?}",
            a.shape, b.shape
        )));
    }
    let (ra, rb) = (a.rank(), b.rank());
    let (m, ka) = if adj_a {
        (a.shape[ra - 1], a.shape[ra - 2])
    } else {
        (a.shape[ra - 2], a.shape[ra - 1])
    };
    let (kb, n) = if adj_b {
        (b.shape[rb - 1], b.shape[rb - 2])
    } else {
        (b.shape[rb - 2], b.shape[rb - 1])
    };
    if ka != kb {
        return Err(Error::msg(format!(
            "int8 BatchMatMul inner dimensions differ: {:?} x {:?}",
            a.shape, b.shape
        )));
    }
    let k = ka;
    // Batch dimensions, right-aligned and broadcast.
    let rank = ra.max(rb) - 2;
    let dim = |s: &[usize], r: usize, i: usize| -> usize {
        let lead = r - 2;
        if i + lead >= rank {
            s[i + lead - rank]
        } else {
            1
        }
    };
    let mut batch = Vec::with_capacity(rank);
    for i in 0..rank {
        let (da, db) = (dim(&a.shape, ra, i), dim(&b.shape, rb, i));
        batch.push(match (da, db) {
            _ if da == db => da,
            (1, d) | (d, 1) => d,
            _ => {
                return Err(Error::msg(format!(
                    "int8 BatchMatMul batch dimensions do not broadcast: {:?} x {:?}",
                    a.shape, b.shape
                )))
            }
        });
    }
    let mut shape = batch.clone();
    shape.extend([m, n]);
    let total = crate::kernels::value::checked_len(&shape)?;
    let batches: usize = batch.iter().product();
    let mult = quantize_multiplier(f64::from(pa.scale * pb.scale) / f64::from(out.scale));
    let (xa, xb) = (a.slice::<i8>()?, b.slice::<i8>()?);
    let mut res = Vec::with_capacity(total);
    let mut idx = vec![0usize; rank];
    for _ in 0..batches {
        // The flat matrix index of each operand for this batch position.
        let (mut oa, mut ob) = (0usize, 0usize);
        for (i, &at) in idx.iter().enumerate() {
            let (da, db) = (dim(&a.shape, ra, i), dim(&b.shape, rb, i));
            oa = oa * da + if da == 1 { 0 } else { at };
            ob = ob * db + if db == 1 { 0 } else { at };
        }
        let ma = &xa[oa * m * k..(oa + 1) * m * k];
        let mb = &xb[ob * k * n..(ob + 1) * k * n];
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0i32;
                for kk in 0..k {
                    let av = if adj_a {
                        ma[kk * m + i]
                    } else {
                        ma[i * k + kk]
                    };
                    let bv = if adj_b {
                        mb[j * k + kk]
                    } else {
                        mb[kk * n + j]
                    };
                    acc =
                        acc.wrapping_add((av as i32 - pa.zero_point) * (bv as i32 - pb.zero_point));
                }
                res.push(sat8(mbqm(acc, mult) + out.zero_point));
            }
        }
        for i in (0..rank).rev() {
            idx[i] += 1;
            if idx[i] < batch[i] {
                break;
            }
            idx[i] = 0;
        }
    }
    Ok(Value::from_vec(shape, res))
}
