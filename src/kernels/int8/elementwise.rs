//! Element-wise int8 kernels: QUANTIZE (float → int8 and int8 → int8), ADD, SUB,
//! MUL, MAXIMUM, MINIMUM, RELU, RELU6, LOGISTIC, TANH, PAD.

use super::{input_affine, output_affine, sat8, Arithmetic, ROUNDING};
use crate::error::{Error, Result};
use crate::kernels::array;
use crate::kernels::elementwise::{broadcast_map, BinaryOp, UnaryOp};
use crate::kernels::ops::StepQuant;
use crate::kernels::rounding::{
    lut_int8, multiply_by_quantized_multiplier, quantize_f32_to_i8, quantize_multiplier,
    quantize_value, requantize_fp32, round_half_away_f32, xnn_lut_int8, xnn_quantize_f32_to_i8,
    xnn_requantize_q8, xnn_requantize_q8_multiplier, xnn_sigmoid, RefAdd, XnnAdd,
};
use crate::kernels::value::{Buf, Value};

/// QUANTIZE: float → int8 (`round(x / scale) + zp`, the division in f32), or an
/// int8 → int8 requantization (`MBQM(x - in_zp, in/out in f64) + out_zp`); with
/// XNNPACK's arithmetic, see [`xnn_quantize_f32`] and [`xnn_requantize_q8`].
pub fn quantize(x: &Value, quant: &StepQuant) -> Result<Value> {
    let out = output_affine(quant)?;
    let xnn = quant.arithmetic == Arithmetic::LiteRt;
    match &*x.buf {
        Buf::F32(v) => {
            let mut q = vec![0i8; v.len()];
            if xnn {
                xnn_quantize_f32_to_i8(v, &mut q, out.scale, out.zero_point);
            } else {
                quantize_f32_to_i8(v, &mut q, out.scale, out.zero_point);
            }
            Ok(Value::from_vec(x.shape.clone(), q))
        }
        Buf::I8(v) if xnn => {
            let xin = input_affine(quant, 0)?;
            let m = xnn_requantize_q8_multiplier(xin.scale, out.scale);
            let q: Vec<i8> = v
                .iter()
                .map(|&a| xnn_requantize_q8(a as i32, xin.zero_point, m, out.zero_point) as i8)
                .collect();
            Ok(Value::from_vec(x.shape.clone(), q))
        }
        Buf::I8(v) => {
            let xin = input_affine(quant, 0)?;
            let (m, s) = quantize_multiplier(xin.scale as f64 / out.scale as f64);
            let q: Vec<i8> = v
                .iter()
                .map(|&a| {
                    let r =
                        multiply_by_quantized_multiplier(a as i32 - xin.zero_point, m, s, ROUNDING);
                    sat8(r + out.zero_point)
                })
                .collect();
            Ok(Value::from_vec(x.shape.clone(), q))
        }
        _ => Err(Error::msg(format!(
            "Quantize takes float32 or int8 input, got {}",
            x.dtype()
        ))),
    }
}

pub fn binary(op: BinaryOp, a: &Value, b: &Value, quant: &StepQuant) -> Result<Value> {
    let (xa, xb) = (a.slice::<i8>()?, b.slice::<i8>()?);
    let pa = input_affine(quant, 0)?;
    let pb = input_affine(quant, 1)?;
    let out = output_affine(quant)?;
    let mbqm = |v: i32, (q, s): (i32, i32)| multiply_by_quantized_multiplier(v, q, s, ROUNDING);
    let xnn = quant.arithmetic == Arithmetic::LiteRt;
    let sign = if op == BinaryOp::Sub { -1.0 } else { 1.0 };
    // XNNPACK declines scale ratios outside its range; LiteRT then runs its
    // optimized ADD, which computes as the reference one.
    let xnn_add = XnnAdd::new(
        pa.scale / out.scale,
        sign * (pb.scale / out.scale),
        pa.zero_point,
        pb.zero_point,
    )
    .filter(|_| xnn);
    let (v, shape) = match (op, xnn_add) {
        (BinaryOp::Add | BinaryOp::Sub, Some(p)) if a.shape == b.shape => {
            let mut v = vec![0i8; xa.len()];
            p.slices(xa, xb, out.zero_point, &mut v);
            (v, a.shape.clone())
        }
        (BinaryOp::Add | BinaryOp::Sub, Some(p)) => {
            broadcast_map(xa, &a.shape, xb, &b.shape, |x, y| {
                sat8(p.apply(x as i32, y as i32) + out.zero_point)
            })?
        }
        (BinaryOp::Mul, _) if xnn => {
            let scale = pa.scale * pb.scale / out.scale;
            broadcast_map(xa, &a.shape, xb, &b.shape, |x, y| {
                let p = (x as i32 - pa.zero_point) * (y as i32 - pb.zero_point);
                sat8(requantize_fp32(p, scale, out.zero_point, -128, 127))
            })?
        }
        (BinaryOp::Add | BinaryOp::Sub, _) => {
            let p = RefAdd::new(
                (pa.scale, pa.zero_point),
                (pb.scale, pb.zero_point),
                (out.scale, out.zero_point),
                op == BinaryOp::Sub,
                ROUNDING,
            );
            if a.shape == b.shape {
                let mut v = vec![0i8; xa.len()];
                p.slices(xa, xb, &mut v);
                (v, a.shape.clone())
            } else {
                broadcast_map(xa, &a.shape, xb, &b.shape, |x, y| p.apply(x, y))?
            }
        }
        (BinaryOp::Mul, _) => {
            // mul.cc computes `in1 * in2 / out` in f32 before widening it.
            let m = quantize_multiplier((pa.scale * pb.scale / out.scale) as f64);
            broadcast_map(xa, &a.shape, xb, &b.shape, |x, y| {
                let p = (x as i32 - pa.zero_point) * (y as i32 - pb.zero_point);
                sat8(mbqm(p, m) + out.zero_point)
            })?
        }
        (BinaryOp::Maximum | BinaryOp::Minimum, _) => {
            if pa != out || pb != out {
                return Err(Error::msg(format!(
                    "int8 {op:?} needs both inputs quantized like its output, got {pa:?}, {pb:?} \
                     and {out:?}"
                )));
            }
            let max = op == BinaryOp::Maximum;
            broadcast_map(xa, &a.shape, xb, &b.shape, |x, y| {
                if max {
                    x.max(y)
                } else {
                    x.min(y)
                }
            })?
        }
        (other, _) => return Err(Error::msg(format!("no int8 kernel for {other:?}"))),
    };
    Ok(Value::from_vec(shape, v))
}

pub fn unary(op: UnaryOp, x: &Value, quant: &StepQuant) -> Result<Value> {
    let xs = x.slice::<i8>()?;
    let xin = input_affine(quant, 0)?;
    let out = output_affine(quant)?;
    let v: Vec<i8> = match op {
        UnaryOp::Relu | UnaryOp::Relu6 => {
            // activations.cc: `double m = in_scale / out_scale` divides in f32.
            let (m, s) = quantize_multiplier((xin.scale / out.scale) as f64);
            let lo = (-128).max(out.zero_point + round_half_away_f32(0.0 / out.scale) as i32);
            let hi = if op == UnaryOp::Relu6 {
                127.min(out.zero_point + round_half_away_f32(6.0 / out.scale) as i32)
            } else {
                127
            };
            xs.iter()
                .map(|&a| {
                    let r = out.zero_point
                        + multiply_by_quantized_multiplier(
                            a as i32 - xin.zero_point,
                            m,
                            s,
                            ROUNDING,
                        );
                    r.clamp(lo, hi) as i8
                })
                .collect()
        }
        UnaryOp::Sigmoid | UnaryOp::Tanh => {
            if op == UnaryOp::Sigmoid && (out.scale != 1.0 / 256.0 || out.zero_point != -128) {
                return Err(Error::msg(format!(
                    "int8 Sigmoid output must be quantized (1/256, -128), got {out:?}"
                )));
            }
            let lut = if quant.arithmetic == Arithmetic::LiteRt {
                let f = if op == UnaryOp::Sigmoid {
                    xnn_sigmoid
                } else {
                    f32::tanh
                };
                xnn_lut_int8(xin.scale, xin.zero_point, out.scale, out.zero_point, f)
            } else if op == UnaryOp::Sigmoid {
                lut_int8(xin.scale, xin.zero_point, out.scale, out.zero_point, |v| {
                    1.0f32 / (1.0f32 + (-v).exp())
                })
            } else {
                lut_int8(
                    xin.scale,
                    xin.zero_point,
                    out.scale,
                    out.zero_point,
                    f32::tanh,
                )
            };
            xs.iter().map(|&a| lut[a as u8 as usize]).collect()
        }
        other => return Err(Error::msg(format!("no int8 kernel for {other:?}"))),
    };
    Ok(Value::from_vec(x.shape.clone(), v))
}

/// PAD/PADV2 on int8: the padding value is the output zero point (or the int8
/// constant given), input and output share their parameters.
pub fn pad(inputs: &[Value], quant: &StepQuant) -> Result<Value> {
    let xin = input_affine(quant, 0)?;
    let out = output_affine(quant)?;
    if xin != out {
        return Err(Error::msg(format!(
            "int8 Pad needs equal input and output parameters, got {xin:?} and {out:?}"
        )));
    }
    let fill = match inputs.get(2) {
        Some(c) => match &*c.buf {
            Buf::I8(v) if v.len() == 1 => v[0],
            Buf::F32(v) if v.len() == 1 => {
                quantize_value(v[0], out.scale, out.zero_point, -128, 127) as i8
            }
            _ => return Err(Error::msg("PadV2 constant must be a scalar")),
        },
        None => sat8(out.zero_point),
    };
    let paddings = inputs
        .get(1)
        .ok_or_else(|| Error::msg("Pad needs paddings"))?;
    array::pad(&inputs[0], paddings, Some(&Value::scalar(fill)), None)
}
