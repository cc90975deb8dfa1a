//! 16x8 FULLY_CONNECTED, CONV_2D, DEPTHWISE_CONV_2D (TFLite
//! `reference_integer_ops` with `AccumScalar = int64_t`) and int16 pooling.

use rayon::prelude::*;

use super::{in_scale, out_scale, sat16};
use crate::error::{Error, Result};
use crate::ir::FusedActivation;
use crate::kernels::nn::{out_size, PoolKind, Window};
use crate::kernels::ops::StepQuant;
use crate::kernels::rounding::{
    activation_range, multiply_by_quantized_multiplier_i64, quantize_multiplier,
    requantize_i64_in_double,
};
use crate::kernels::value::Value;

fn dims4(v: &Value, what: &str) -> Result<[usize; 4]> {
    <[usize; 4]>::try_from(v.shape.as_slice())
        .map_err(|_| Error::msg(format!("{what} must have rank 4, got shape {:?}", v.shape)))
}

/// How an accumulator is requantized, per output channel.
enum Multiplier {
    /// CONV_2D, DEPTHWISE_CONV_2D: `(multiplier, shift)` for the i64
    /// `MultiplyByQuantizedMultiplier`.
    Fixed(Vec<(i32, i32)>),
    /// FULLY_CONNECTED: the reference kernel requantizes in double, as for int8.
    Double(Vec<f64>),
}

/// The per output channel requantization from `(f64)in * (f64)w[c] / (f64)out` (a
/// per-tensor weight scale is repeated), and the fused activation's bounds.
struct Requant {
    requant: Multiplier,
    lo: i32,
    hi: i32,
}

impl Requant {
    fn new(
        quant: &StepQuant,
        channels: usize,
        act: FusedActivation,
        fully_connected: bool,
    ) -> Result<Requant> {
        let si = in_scale(quant, 0)?;
        let so = out_scale(quant)?;
        let q = quant
            .inputs
            .get(1)
            .and_then(|q| q.as_ref())
            .ok_or_else(|| Error::msg("int8 weights (input 1) have no quantization"))?;
        if q.zero_point.iter().any(|&z| z != 0) {
            return Err(Error::msg("int8 weights must have zero point 0"));
        }
        let ws = match q.scale.len() {
            1 => vec![q.scale[0]; channels],
            n if n == channels => q.scale.clone(),
            n => {
                return Err(Error::msg(format!(
                    "weights have {n} scales for {channels} output channels"
                )))
            }
        };
        if ws.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
            return Err(Error::msg("weights have a non-positive scale"));
        }
        let real: Vec<f64> = ws
            .iter()
            .map(|&w| si as f64 * w as f64 / so as f64)
            .collect();
        let requant = if fully_connected {
            Multiplier::Double(real)
        } else {
            Multiplier::Fixed(real.iter().map(|&m| quantize_multiplier(m)).collect())
        };
        let (lo, hi) = activation_range(act, so, 0, -32768, 32767);
        Ok(Requant { requant, lo, hi })
    }

    #[inline]
    fn apply(&self, acc: i64, c: usize) -> i16 {
        let v = match &self.requant {
            Multiplier::Fixed(m) => multiply_by_quantized_multiplier_i64(acc, m[c].0, m[c].1),
            Multiplier::Double(m) => requantize_i64_in_double(acc, m[c]),
        };
        sat16(v.clamp(self.lo, self.hi))
    }
}

/// The int64 bias (int32 is accepted too, as LiteRT does).
fn bias_i64(v: &Value, channels: usize) -> Result<Vec<i64>> {
    if v.rank() != 1 || v.len() != channels {
        return Err(Error::msg(format!(
            "bias of shape {:?} for {channels} output channels",
            v.shape
        )));
    }
    match v.slice::<i64>() {
        Ok(b) => Ok(b.to_vec()),
        Err(_) => Ok(v.slice::<i32>()?.iter().map(|&b| b as i64).collect()),
    }
}

/// `_FusedMatMul` on int16 input with int8 weights `[k, units]` (`[units, k]` with
/// `tb`) and an int64 bias.
pub fn fully_connected(
    inputs: &[Value],
    tb: bool,
    act: FusedActivation,
    quant: &StepQuant,
) -> Result<Value> {
    let [x, w, b] = inputs else {
        return Err(Error::msg(
            "int16 fully connected needs input, weights and bias",
        ));
    };
    if x.rank() != 2 || w.rank() != 2 {
        return Err(Error::msg(format!(
            "int16 fully connected needs matrices, got {:?} and {:?}",
            x.shape, w.shape
        )));
    }
    let (batch, k) = (x.shape[0], x.shape[1]);
    let (wk, units) = if tb {
        (w.shape[1], w.shape[0])
    } else {
        (w.shape[0], w.shape[1])
    };
    if wk != k {
        return Err(Error::msg(format!(
            "weights {:?} do not match input {:?}",
            w.shape, x.shape
        )));
    }
    let requant = Requant::new(quant, units, act, true)?;
    let bias = bias_i64(b, units)?;
    let xs = x.slice::<i16>()?;
    let wv = w.slice::<i8>()?;
    // Weights as [units][k] rows.
    let rows: Vec<i32> = (0..units * k)
        .map(|i| {
            let (u, d) = (i / k.max(1), i % k.max(1));
            (if tb { wv[u * k + d] } else { wv[d * units + u] }) as i32
        })
        .collect();
    let mut res = vec![0i16; batch * units];
    if units > 0 {
        res.par_chunks_mut(units).enumerate().for_each(|(bi, out)| {
            let xr = &xs[bi * k..(bi + 1) * k];
            for (u, o) in out.iter_mut().enumerate() {
                let wr = &rows[u * k..(u + 1) * k];
                let acc: i64 = xr
                    .iter()
                    .zip(wr)
                    .map(|(&xv, &wq)| (xv as i32 * wq) as i64)
                    .sum();
                *o = requant.apply(acc + bias[u], u);
            }
        });
    }
    Ok(Value::from_vec(vec![batch, units], res))
}

/// Convolution and depthwise convolution on int16: walk the output positions,
/// skip out-of-bounds taps, accumulate in i64.
#[allow(clippy::too_many_arguments)]
fn windowed(
    x: &Value,
    w: &Value,
    b: &Value,
    o: usize,
    win: &Window,
    act: FusedActivation,
    quant: &StepQuant,
    depthwise_m: Option<usize>,
) -> Result<Value> {
    let [n, h, wd, c] = dims4(x, "input")?;
    let [kh, kw, _, _] = dims4(w, "filter")?;
    let requant = Requant::new(quant, o, act, false)?;
    let bias = bias_i64(b, o)?;
    let (oh, pt) = out_size(h, kh, win.strides[0], win.dilations[0], &win.padding, 0)?;
    let (ow, pl) = out_size(wd, kw, win.strides[1], win.dilations[1], &win.padding, 1)?;
    let xs = x.slice::<i16>()?;
    let wv = w.slice::<i8>()?;
    let mut res = vec![0i16; n * oh * ow * o];
    let row = ow * o;
    let compute = |r: usize, out_row: &mut [i16]| {
        let (bi, oy) = (r / oh, r % oh);
        let mut acc = vec![0i64; o];
        for (ox, px) in out_row.chunks_exact_mut(o).enumerate() {
            acc.fill(0);
            for ky in 0..kh {
                let iy = (oy * win.strides[0] + ky * win.dilations[0]) as isize - pt as isize;
                if iy < 0 || iy >= h as isize {
                    continue;
                }
                for kx in 0..kw {
                    let ix = (ox * win.strides[1] + kx * win.dilations[1]) as isize - pl as isize;
                    if ix < 0 || ix >= wd as isize {
                        continue;
                    }
                    let xo = ((bi * h + iy as usize) * wd + ix as usize) * c;
                    let xp = &xs[xo..xo + c];
                    let tap = ky * kw + kx;
                    match depthwise_m {
                        None => {
                            let wo = tap * c * o;
                            for (ic, &xv) in xp.iter().enumerate() {
                                let wr = &wv[wo + ic * o..wo + (ic + 1) * o];
                                for (a, &wq) in acc.iter_mut().zip(wr) {
                                    *a += (xv as i32 * wq as i32) as i64;
                                }
                            }
                        }
                        Some(m) => {
                            let wo = tap * c * m;
                            for (ic, &xv) in xp.iter().enumerate() {
                                for mm in 0..m {
                                    let oc = ic * m + mm;
                                    acc[oc] += (xv as i32 * wv[wo + oc] as i32) as i64;
                                }
                            }
                        }
                    }
                }
            }
            for (oc, (p, &a)) in px.iter_mut().zip(&acc).enumerate() {
                *p = requant.apply(a + bias[oc], oc);
            }
        }
    };
    if row > 0 {
        res.par_chunks_mut(row)
            .enumerate()
            .for_each(|(r, o)| compute(r, o));
    }
    Ok(Value::from_vec(vec![n, oh, ow, o], res))
}

/// `_FusedConv2D` on int16: input NHWC, filter HWIO (per output channel).
pub fn conv2d(
    inputs: &[Value],
    win: &Window,
    act: FusedActivation,
    quant: &StepQuant,
) -> Result<Value> {
    let [x, w, b] = inputs else {
        return Err(Error::msg("int16 convolution needs input, filter and bias"));
    };
    let [_, _, _, c] = dims4(x, "input")?;
    let [_, _, kc, o] = dims4(w, "filter")?;
    if kc != c {
        return Err(Error::msg(format!(
            "filter has {kc} input channels, the input has {c}"
        )));
    }
    windowed(x, w, b, o, win, act, quant, None)
}

/// `_FusedDepthwiseConv2dNative` on int16: filter `[kh, kw, C, M]`, output channel
/// `c * M + m`.
pub fn depthwise(
    inputs: &[Value],
    win: &Window,
    act: FusedActivation,
    quant: &StepQuant,
) -> Result<Value> {
    let [x, w, b] = inputs else {
        return Err(Error::msg(
            "int16 depthwise convolution needs input, filter and bias",
        ));
    };
    let [_, _, _, c] = dims4(x, "input")?;
    let [_, _, kc, m] = dims4(w, "filter")?;
    if kc != c {
        return Err(Error::msg(format!(
            "depthwise filter has {kc} channels, the input has {c}"
        )));
    }
    windowed(x, w, b, c * m, win, act, quant, Some(m))
}

/// MAX_POOL_2D and AVERAGE_POOL_2D on int16 (input and output quantized alike);
/// the average rounds half away from zero.
pub fn pool(
    x: &Value,
    kind: PoolKind,
    ksize: [usize; 2],
    win: &Window,
    quant: &StepQuant,
) -> Result<Value> {
    let (si, so) = (in_scale(quant, 0)?, out_scale(quant)?);
    if si != so {
        return Err(Error::msg(format!(
            "int16 pooling needs equal input and output scales, got {si} and {so}"
        )));
    }
    let [n, h, wd, c] = dims4(x, "input")?;
    let (oh, pt) = out_size(h, ksize[0], win.strides[0], 1, &win.padding, 0)?;
    let (ow, pl) = out_size(wd, ksize[1], win.strides[1], 1, &win.padding, 1)?;
    let xs = x.slice::<i16>()?;
    let mut res = vec![0i16; n * oh * ow * c];
    for bi in 0..n {
        for oy in 0..oh {
            let y0 = (oy * win.strides[0]) as isize - pt as isize;
            let ys = y0.max(0) as usize..((y0 + ksize[0] as isize).min(h as isize)).max(0) as usize;
            for ox in 0..ow {
                let x0 = (ox * win.strides[1]) as isize - pl as isize;
                let xr =
                    x0.max(0) as usize..((x0 + ksize[1] as isize).min(wd as isize)).max(0) as usize;
                for ch in 0..c {
                    let (mut count, mut sum, mut max) = (0i64, 0i64, i16::MIN);
                    for iy in ys.clone() {
                        for ix in xr.clone() {
                            let v = xs[((bi * h + iy) * wd + ix) * c + ch];
                            sum += v as i64;
                            max = max.max(v);
                            count += 1;
                        }
                    }
                    res[((bi * oh + oy) * ow + ox) * c + ch] = match kind {
                        PoolKind::Max => max,
                        PoolKind::Avg => {
                            if count == 0 {
                                return Err(Error::msg("average pool over an empty window"));
                            }
                            let q = if sum > 0 {
                                (sum + count / 2) / count
                            } else {
                                (sum - count / 2) / count
                            };
                            q.clamp(-32768, 32767) as i16
                        }
                    };
                }
            }
        }
    }
    Ok(Value::from_vec(vec![n, oh, ow, c], res))
}
