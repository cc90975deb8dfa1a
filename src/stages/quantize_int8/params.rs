//! Quantization parameters and quantized values exactly as the TFLite quantizer
//! computes them (`lite/tools/optimize/quantization_utils.cc`).

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::ir::{DType, QuantParams, Tensor};
use crate::kernels::rounding::{quantize_f32le_to_i8, round_half_away_f32};

/// `GetAsymmetricQuantizationParams(min, max, -128, 127)`: the range is widened to
/// contain 0, `scale = (max - min) / 255` in f32, and the zero point is
/// `round(-128 - min / scale)` clamped to int8. For an empty range (a tensor that
/// was always 0) TFLite yields scale 0, which makes every multiplier infinite; qpipe
/// uses scale 1 with zero point -128 there.
pub fn asymmetric(min: f32, max: f32) -> (f32, i64) {
    let min = min.min(0.0);
    let max = max.max(0.0);
    let qmin = -128.0f32;
    let qmax = 127.0f32;
    let scale = (max - min) / (qmax - qmin);
    if scale == 0.0 || !scale.is_finite() {
        return (1.0, -128);
    }
    let zero_point_from_min = qmin - min / scale;
    let zp = if zero_point_from_min < qmin {
        qmin
    } else if zero_point_from_min > qmax {
        qmax
    } else {
        round_half_away_f32(zero_point_from_min)
    };
    (scale, zp as i64)
}

pub fn asymmetric_params(min: f32, max: f32) -> QuantParams {
    let (s, z) = asymmetric(min, max);
    QuantParams::per_tensor(s, z)
}

/// Symmetric int8 weights along `axis` (or per tensor when `axis` is `None`):
/// `scale = max(|min|, |max|) / 127`, `q = clamp(round(w * (127 / half_range)))`
/// with the inverse computed in f32. A channel that is all zero gets scale 1.
pub fn symmetric_weights(t: &Tensor, axis: Option<usize>) -> Result<(Tensor, QuantParams)> {
    let bytes = f32_bytes(t)?;
    let shape = t.shape();
    let n = t.len();
    let (channels, inner) = match axis {
        Some(a) if a < shape.len() => (shape[a], shape[a + 1..].iter().product::<usize>().max(1)),
        _ => (1, n.max(1)),
    };
    let ch = channels.max(1);
    // Max and min are order-free, so the parallel reductions give the serial result.
    let abs_max = |b: &[u8]| {
        b.chunks_exact(4)
            .map(|c| le_f32(c).abs())
            .fold(0f32, f32::max)
    };
    let half: Vec<f32> = if ch == 1 {
        vec![bytes
            .par_chunks(4 << 16)
            .map(abs_max)
            .reduce(|| 0f32, f32::max)]
    } else {
        let mut half = vec![0f32; ch];
        let runs: Vec<f32> = bytes.par_chunks(4 * inner).map(abs_max).collect();
        for (k, m) in runs.into_iter().enumerate() {
            half[k % ch] = half[k % ch].max(m);
        }
        half
    };
    let mut scales = Vec::with_capacity(half.len());
    let mut inv = Vec::with_capacity(half.len());
    for &h in &half {
        if h > 0.0 && h.is_finite() {
            scales.push(h / 127.0);
            inv.push(127.0 / h);
        } else {
            scales.push(1.0);
            inv.push(0.0);
        }
    }
    // Rows of `inner` elements share a channel; blocks are whole rows when rows are
    // short, so each block needs one channel lookup per row, not per element.
    let block = if ch == 1 {
        1 << 16
    } else {
        inner * (1usize << 16).div_ceil(inner)
    };
    let (data, ()) = crate::ir::filled_buffer(n, |dst| {
        dst.par_chunks_mut(block)
            .zip(bytes.par_chunks(4 * block))
            .enumerate()
            .for_each(|(b, (d, s))| {
                for (r, (d, s)) in d.chunks_mut(inner).zip(s.chunks(4 * inner)).enumerate() {
                    let m = if ch == 1 {
                        inv[0]
                    } else {
                        inv[(b * block / inner + r) % ch]
                    };
                    for (o, c) in d.iter_mut().zip(s.chunks_exact(4)) {
                        let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                        *o = round_half_away_f32(v * m).clamp(-127.0, 127.0) as i8 as u8;
                    }
                }
            });
    });
    let q = Tensor::from_bytes(DType::I8, shape.to_vec(), data)
        .map_err(|e| Error::msg(e.to_string()))?;
    let params = match axis {
        Some(a) if a < shape.len() => QuantParams::per_axis(scales, vec![0; channels], a as u32),
        _ => QuantParams::per_tensor(scales[0], 0),
    };
    Ok((q, params))
}

/// The little-endian float32 bytes of `t`, or an error if it is not float32.
fn f32_bytes(t: &Tensor) -> Result<&[u8]> {
    if t.dtype() != DType::F32 {
        return Err(Error::msg(format!(
            "expected a float32 tensor, got {}",
            t.dtype()
        )));
    }
    Ok(t.bytes())
}

fn le_f32(b: &[u8]) -> f32 {
    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// The smallest and largest finite element of a float32 tensor, widened to contain 0.
pub fn finite_range(t: &Tensor) -> Result<(f32, f32)> {
    let bytes = f32_bytes(t)?;
    Ok(bytes
        .par_chunks(4 << 16)
        .map(|b| {
            b.chunks_exact(4)
                .map(le_f32)
                .filter(|v| v.is_finite())
                .fold((0f32, 0f32), |(lo, hi), v| (lo.min(v), hi.max(v)))
        })
        .reduce(|| (0f32, 0f32), |a, b| (a.0.min(b.0), a.1.max(b.1))))
}

/// Depthwise weights `[h, w, c, m]` with one scale per output channel `c·m + j`
/// (what TFLite reads along axis 3 of its `[1, h, w, c·m]` filter); the parameters
/// say axis 3 with `c·m` scales, the convention the TFLite lowering and the int8
/// kernel share for a depth multiplier above 1.
pub fn symmetric_depthwise_weights(t: &Tensor) -> Result<(Tensor, QuantParams)> {
    let s = t.shape().to_vec();
    let [h, w, c, m] = s[..] else {
        return Err(Error::msg(format!(
            "depthwise weights {s:?} are not [h, w, c, m]"
        )));
    };
    let flat = t.reshaped(vec![h * w, c * m])?;
    let (q, mut p) = symmetric_weights(&flat, Some(1))?;
    p.axis = Some(3);
    Ok((q.reshaped(s)?, p))
}

/// Int32 bias: `round(b / (in_scale * w_scale[c]))` (the product in f32), clamped to
/// ±(2^31 - 1); its scales are those products, zero points 0, along axis 0 (per
/// tensor when the weights are).
pub fn bias_int32(bias: &[f32], in_scale: f32, w_scales: &[f32]) -> (Vec<i32>, QuantParams) {
    let scales: Vec<f32> = (0..bias.len())
        .map(|c| in_scale * w_scales[if w_scales.len() == 1 { 0 } else { c }])
        .collect();
    let q = bias
        .iter()
        .zip(&scales)
        .map(|(&b, &s)| {
            let v = (b as f64 / s as f64).round();
            v.clamp(-(i32::MAX as f64), i32::MAX as f64) as i32
        })
        .collect();
    let n = scales.len();
    if w_scales.len() == 1 {
        // Per-tensor weights: a per-tensor bias (TFLite checks the legacy scalar
        // scales of the two against each other).
        return (q, QuantParams::per_tensor(in_scale * w_scales[0], 0));
    }
    (q, QuantParams::per_axis(scales, vec![0; n], 0))
}

/// A float tensor quantized per tensor with given (activation) parameters, as
/// QUANTIZE would.
pub fn quantize_with(t: &Tensor, scale: f32, zp: i64) -> Result<Tensor> {
    const BLOCK: usize = 1 << 16;
    let src = f32_bytes(t)?;
    let (data, ()) = crate::ir::filled_buffer(t.len(), |dst| {
        dst.par_chunks_mut(BLOCK)
            .zip(src.par_chunks(4 * BLOCK))
            .for_each(|(d, s)| quantize_f32le_to_i8(s, d, scale, zp as i32))
    });
    Tensor::from_bytes(DType::I8, t.shape().to_vec(), data).map_err(|e| Error::msg(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32) * 0.377).sin() * (1.0 + (i % 13) as f32))
            .collect()
    }

    /// The one-element-at-a-time definition the parallel code must reproduce.
    fn serial(values: &[f32], channels: usize, inner: usize) -> (Vec<i8>, Vec<f32>) {
        let mut half = vec![0f32; channels];
        for (i, v) in values.iter().enumerate() {
            let c = (i / inner) % channels;
            half[c] = half[c].max(v.abs());
        }
        let inv: Vec<f32> = half
            .iter()
            .map(|&h| {
                if h > 0.0 && h.is_finite() {
                    127.0 / h
                } else {
                    0.0
                }
            })
            .collect();
        let q = values
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                (v * inv[(i / inner) % channels])
                    .round()
                    .clamp(-127.0, 127.0) as i8
            })
            .collect();
        let scales = half
            .iter()
            .map(|&h| {
                if h > 0.0 && h.is_finite() {
                    h / 127.0
                } else {
                    1.0
                }
            })
            .collect();
        (q, scales)
    }

    #[test]
    fn depthwise_weights_with_a_multiplier_get_one_scale_per_output_channel() {
        let (h, w, c, m) = (3, 3, 4, 2);
        let v = values(h * w * c * m);
        let t = Tensor::from_vec(vec![h, w, c, m], &v);
        let (q, p) = symmetric_depthwise_weights(&t).unwrap();
        // Output channel k = c·m + j is the flat index modulo C·M.
        let (want_q, want_scales) = serial(&v, c * m, 1);
        assert_eq!(q.shape(), &[h, w, c, m]);
        assert_eq!(q.values::<i8>().unwrap(), want_q);
        assert_eq!(p.scale, want_scales);
        assert_eq!((p.axis, p.scale.len()), (Some(3), c * m));
    }

    #[test]
    fn symmetric_weights_match_the_serial_definition_per_tensor_and_per_axis() {
        let mut v = values(300_000);
        v[12] = f32::NAN;
        v[250_001] = -40.0;
        let shape = [100, 3, 1000];
        let t = Tensor::from_vec(shape.to_vec(), &v);
        for (axis, channels, inner) in [(None, 1, v.len()), (Some(1), 3, 1000), (Some(2), 1000, 1)]
        {
            let (q, p) = symmetric_weights(&t, axis).unwrap();
            let (want_q, want_scales) = serial(&v, channels, inner);
            assert_eq!(q.values::<i8>().unwrap(), want_q, "axis {axis:?}");
            assert_eq!(q.shape(), &shape);
            assert_eq!(p.scale, want_scales, "axis {axis:?}");
            assert_eq!(p.axis, axis.map(|a| a as u32));
        }
    }

    #[test]
    fn finite_range_ignores_non_finite_values_and_contains_zero() {
        let mut v = values(200_000);
        v[5] = f32::INFINITY;
        v[150_000] = f32::NAN;
        v[199_999] = -33.5;
        let t = Tensor::from_vec(vec![v.len()], &v);
        let (lo, hi) = finite_range(&t).unwrap();
        let finite = v.iter().filter(|x| x.is_finite());
        assert_eq!(lo, finite.clone().fold(0f32, |a, &b| a.min(b)));
        assert_eq!(hi, finite.fold(0f32, |a, &b| a.max(b)));
        assert_eq!(lo, -33.5);
        let pos = Tensor::from_vec(vec![3], &[1.0f32, 2.0, 3.0]);
        assert_eq!(finite_range(&pos).unwrap(), (0.0, 3.0));
        let ints = Tensor::from_vec(vec![1], &[1i32]);
        assert!(finite_range(&ints)
            .unwrap_err()
            .to_string()
            .contains("int32"));
    }
}
