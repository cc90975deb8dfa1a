//! Quantization parameters and quantized values exactly as the TFLite quantizer
//! computes them (`lite/tools/optimize/quantization_utils.cc`).

use crate::ir::QuantParams;
use crate::kernels::rounding::{quantize_value, round_half_away_f32};

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
pub fn symmetric_weights(
    values: &[f32],
    shape: &[usize],
    axis: Option<usize>,
) -> (Vec<i8>, QuantParams) {
    let (channels, inner) = match axis {
        Some(a) if a < shape.len() => (shape[a], shape[a + 1..].iter().product::<usize>().max(1)),
        _ => (1, values.len().max(1)),
    };
    let channel_of = |i: usize| (i / inner) % channels.max(1);
    let mut half = vec![0f32; channels.max(1)];
    for (i, &v) in values.iter().enumerate() {
        let c = channel_of(i);
        half[c] = half[c].max(v.abs());
    }
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
    let q = values
        .iter()
        .enumerate()
        .map(|(i, &v)| round_half_away_f32(v * inv[channel_of(i)]).clamp(-127.0, 127.0) as i8)
        .collect();
    let params = match axis {
        Some(a) if a < shape.len() => QuantParams::per_axis(scales, vec![0; channels], a as u32),
        _ => QuantParams::per_tensor(scales[0], 0),
    };
    (q, params)
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
pub fn quantize_with(values: &[f32], scale: f32, zp: i64) -> Vec<i8> {
    values
        .iter()
        .map(|&v| quantize_value(v, scale, zp as i32, -128, 127) as i8)
        .collect()
}
