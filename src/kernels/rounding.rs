//! Integer requantization exactly as TFLite computes it. Every int8 kernel goes
//! through this file; nothing else in qpipe rounds a quantized value.
//!
//! # The arithmetic
//!
//! A quantized value `q` stands for `real = (q - zero_point) * scale`. An int8
//! kernel accumulates products in i32 (`acc = Σ (x - x_zp) * w + bias`) and must
//! turn `acc * (in_scale * w_scale / out_scale)` back into an int8 output. TFLite
//! never multiplies by that real multiplier in floating point at run time (with
//! one exception, below). At preparation time it splits the multiplier `m` with
//! [`quantize_multiplier`]: `m = q * 2^(shift - 31)` with `q` an i32 in
//! `[2^30, 2^31)`, computed as `frexp(m)` then `round(frac * 2^31)` (half away from
//! zero, in double). The effective multiplier itself is computed in **double**
//! from the f32 scales stored in the model: `(f64)in_scale * (f64)w_scale[c] /
//! (f64)out_scale`.
//!
//! At run time [`multiply_by_quantized_multiplier`] applies it. TFLite has two
//! variants, chosen at build time by `TFLITE_SINGLE_ROUNDING`:
//!
//! * **double rounding** (gemmlowp's, the default): a saturating rounding doubling
//!   high multiply (`(a*b + 2^30) / 2^31` with C's truncating division and a nudge
//!   of `1 - 2^30` for negative products), then a rounding right shift that rounds
//!   half away from zero (`rem > (mask >> 1) + (x < 0)`). Rounding twice can differ
//!   by one from rounding once.
//! * **single rounding**: `(x * q + 2^(30 - shift)) >> (31 - shift)` in i64, an
//!   arithmetic shift, i.e. round half up.
//!
//! [`Rounding`] names the variant; the per-op choice lives in the kernels' op
//! table, which the LiteRT comparison tests pin down.
//!
//! # The default resolver: XNNPACK and the optimized kernels
//!
//! `Interpreter()` without a resolver type hands most int8 ops to the XNNPACK
//! delegate, which requantizes differently (`Arithmetic::LiteRt` in the int8
//! kernels selects these functions):
//!
//! * CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, MUL ([`requantize_fp32`]): the
//!   scale is computed **in f32** from the f32 scales (`in * w / out`, left to
//!   right; MUL `a * b / out`), the i32 accumulator is converted to f32, multiplied
//!   by it (one f32 rounding), then rounded **half to even** (`lrintf`, or the
//!   magic-bias / `cvtps2dq` of the SIMD microkernels, which agree) and the zero
//!   point added. One rounding, to even, where the reference kernels round twice
//!   (or once in double, half away from zero).
//! * MEAN and SUM ([`xnn_reduce_requantize`]): the i32 sum of the raw values times
//!   `(in / out) * (1 / count)` (SUM: `in / out`) in f32, plus the zero point
//!   `out_zp - (count * in_zp) * s` folded in f32, rounded half to even.
//! * ADD and SUB ([`XnnAdd`]): integer, with 21-bit multipliers derived from the
//!   f32 ratios `a / out` and `b / out` and an arithmetic right shift whose bias
//!   rounds half up.
//! * int8 → int8 QUANTIZE ([`xnn_requantize_q8`]): a multiplier
//!   `lrintf(256 * in / out)` and `(x * m + 128) >> 8`, half up.
//! * float → int8 QUANTIZE ([`xnn_quantize_f32`]): multiplies by the f32 reciprocal
//!   of the scale and rounds half to even (the reference divides and rounds half
//!   away from zero).
//! * LOGISTIC and TANH ([`xnn_lut_int8`]): a 256-entry table built from the f32
//!   dequantized input, `tanhf`, or the logistic in double, then
//!   `round(y * (1 / out) + zp)` half away from zero.
//! * Fused activation bounds ([`xnn_activation_bound`]): `lrintf(bound / scale + zp)`.
//!
//! The ops the delegate does not take (SOFTMAX, AVERAGE_POOL_2D, MINIMUM, MAXIMUM,
//! RELU, RELU6 in int8) run LiteRT's optimized builtin kernels, which compute
//! these models' ops as the reference kernels do (measured bit for bit on random
//! cases with LiteRT 2.3.0 on x86-64).
//!
//! # Where TFLite does not use the integer path
//!
//! * QUANTIZE (float → int8) divides in f32: `round(x / scale) + zp`, rounding half
//!   away from zero, then clamps. Multiplying by `1/scale` gives different results.
//! * The reference FULLY_CONNECTED kernel requantizes in double:
//!   `round((f64)acc * ((f64)in_scale * (f64)w_scale / (f64)out_scale))`.
//! * Fused activation bounds are `zp + round(bound / scale)` in f32, clamped to the
//!   type's range.

use crate::ir::FusedActivation;

#[cfg(target_arch = "x86_64")]
pub mod block;
mod vector;
pub use vector::{quantize_f32_to_i8, xnn_quantize_f32_to_i8, RefAdd};

/// How a kernel rounds when it applies a quantized multiplier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rounding {
    /// gemmlowp: saturating rounding doubling high multiply, then rounding shift.
    Double,
    /// One rounding of the full i64 product.
    Single,
}

/// TFLite's `TfLiteRound`/`std::round`: half away from zero, equal to `f32::round`
/// for every input (a test checks all 2^32), without the libm call that `round`
/// costs on baseline x86-64 (no SSE4.1 `roundss`).
///
/// Below 2^23 in magnitude, truncation through `i32` is exact, and so is `x - t`
/// (for |x| ≥ 1, t ≤ x < 2t: Sterbenz; below 1, t = 0), so comparing the fraction
/// with ½ decides the rounding exactly. From 2^23 on every float is an integer;
/// infinities and NaN pass through. `copysign` keeps the zero of -0.3 negative.
#[inline]
pub fn round_half_away_f32(x: f32) -> f32 {
    // Selects rather than early returns, so that loops over it vectorize.
    let big = x.is_nan() || x.abs() >= 8_388_608.0;
    let t = x as i32 as f32;
    let f = x - t;
    let up = if f >= 0.5 { 1.0 } else { 0.0 };
    let down = if f <= -0.5 { 1.0 } else { 0.0 };
    if big {
        x
    } else {
        (t + up - down).copysign(x)
    }
}

pub fn round_half_away_f64(x: f64) -> f64 {
    x.round()
}

/// Splits a positive real multiplier into a Q31 fixed-point value and a power-of-two
/// shift: `m ≈ q * 2^(shift - 31)`. Zero (or a multiplier too small to represent)
/// gives `(0, 0)`.
pub fn quantize_multiplier(m: f64) -> (i32, i32) {
    if m == 0.0 || !m.is_finite() {
        return (0, 0);
    }
    let (frac, mut shift) = frexp(m);
    let mut q = round_half_away_f64(frac * (1i64 << 31) as f64) as i64;
    if q == 1i64 << 31 {
        q /= 2;
        shift += 1;
    }
    if shift < -31 {
        return (0, 0);
    }
    (q as i32, shift)
}

/// `frexp` for finite non-zero doubles: `m = frac * 2^exp` with `|frac|` in `[0.5, 1)`.
fn frexp(m: f64) -> (f64, i32) {
    let bits = m.to_bits();
    let exp_bits = ((bits >> 52) & 0x7ff) as i32;
    if exp_bits == 0 {
        // Subnormal: scale up into the normal range first.
        let (f, e) = frexp(m * (1u64 << 54) as f64);
        return (f, e - 54);
    }
    let exp = exp_bits - 1022;
    let frac_bits = (bits & !(0x7ffu64 << 52)) | (1022u64 << 52);
    (f64::from_bits(frac_bits), exp)
}

/// gemmlowp `SaturatingRoundingDoublingHighMul`.
pub fn saturating_rounding_doubling_high_mul(a: i32, b: i32) -> i32 {
    if a == i32::MIN && b == i32::MIN {
        return i32::MAX;
    }
    let ab = a as i64 * b as i64;
    let nudge: i64 = if ab >= 0 { 1 << 30 } else { 1 - (1 << 30) };
    // C++ integer division truncates toward zero; Rust's `/` does the same.
    ((ab + nudge) / (1i64 << 31)) as i32
}

/// gemmlowp `RoundingDivideByPOT`: `x / 2^exponent`, rounding half away from zero.
pub fn rounding_divide_by_pot(x: i32, exponent: i32) -> i32 {
    debug_assert!((0..=31).contains(&exponent));
    let mask: i32 = ((1i64 << exponent) - 1) as i32;
    let remainder = x & mask;
    let threshold = (mask >> 1) + i32::from(x < 0);
    (x >> exponent) + i32::from(remainder > threshold)
}

/// TFLite `MultiplyByQuantizedMultiplier(x, q, shift)`.
pub fn multiply_by_quantized_multiplier(x: i32, q: i32, shift: i32, rounding: Rounding) -> i32 {
    match rounding {
        Rounding::Double => {
            let left = shift.max(0);
            let right = (-shift).max(0);
            let shifted = x.wrapping_mul(1i32.wrapping_shl(left as u32));
            rounding_divide_by_pot(saturating_rounding_doubling_high_mul(shifted, q), right)
        }
        Rounding::Single => {
            let total = 31 - shift;
            let round = 1i64 << (total - 1);
            ((x as i64 * q as i64 + round) >> total) as i32
        }
    }
}

/// QUANTIZE (float → int8/uint8/int16): `clamp(round(x / scale) + zp)`, the division in f32.
#[inline]
pub fn quantize_value(x: f32, scale: f32, zero_point: i32, qmin: i32, qmax: i32) -> i32 {
    let v = round_half_away_f32(x / scale);
    let v = if v.is_nan() {
        0
    } else {
        v.clamp(i32::MIN as f32, i32::MAX as f32) as i64
    };
    (v + zero_point as i64).clamp(qmin as i64, qmax as i64) as i32
}

/// [`quantize_value`] to int8 for a run of little-endian float32 bytes (`src` holds
/// four bytes per `dst` byte), for quantizing a whole tensor at once.
pub fn quantize_f32le_to_i8(src: &[u8], dst: &mut [u8], scale: f32, zero_point: i32) {
    for (d, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
        let x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        *d = quantize_value(x, scale, zero_point, -128, 127) as i8 as u8;
    }
}

/// DEQUANTIZE: `(q - zp) * scale` in f32.
pub fn dequantize_value(q: i32, scale: f32, zero_point: i32) -> f32 {
    (q - zero_point) as f32 * scale
}

/// The reference FULLY_CONNECTED requantization: in double, one rounding, with
/// the multiplier `(f64)in_scale * (f64)w_scale / (f64)out_scale`.
pub fn requantize_in_double(acc: i32, multiplier: f64) -> i32 {
    round_half_away_f64(acc as f64 * multiplier) as i32
}

/// Fused activation as int8 bounds: TFLite `CalculateActivationRangeQuantizedImpl`.
pub fn activation_range(
    act: FusedActivation,
    scale: f32,
    zero_point: i32,
    qmin: i32,
    qmax: i32,
) -> (i32, i32) {
    let q = |f: f32| zero_point + round_half_away_f32(f / scale) as i32;
    match act {
        FusedActivation::None => (qmin, qmax),
        FusedActivation::Relu => (qmin.max(q(0.0)), qmax),
        FusedActivation::Relu6 => (qmin.max(q(0.0)), qmax.min(q(6.0))),
        FusedActivation::ReluN1To1 => (qmin.max(q(-1.0)), qmax.min(q(1.0))),
    }
}

/// `QuantizeMultiplierGreaterThanOne` applied at run time: gemmlowp's
/// `SaturatingRoundingDoublingHighMul(x * 2^left_shift, q)` (double-rounding build).
pub fn multiply_by_quantized_multiplier_greater_than_one(x: i32, q: i32, left_shift: i32) -> i32 {
    saturating_rounding_doubling_high_mul(x.wrapping_mul(1i32.wrapping_shl(left_shift as u32)), q)
}

/// The reference MEAN kernel folds `1 / count` into the input/output multiplier:
/// `shift = floor(log2(count))` (capped at 32 and at `31 + shift`), then
/// `q' = (q << shift) / count` with integer division, `shift' = shift - that`.
pub fn mean_multiplier(q: i32, shift: i32, count: i64) -> (i32, i32) {
    if count <= 0 {
        return (q, shift);
    }
    let s = (63 - (count as u64).leading_zeros() as i32)
        .min(32)
        .min(31 + shift);
    let s = s.max(0);
    ((((q as i64) << s) / count) as i32, shift - s)
}

/// An int8 → int8 lookup table for an element-wise function, as TFLite's
/// `LUTPopulate<int8_t>` builds it: dequantize in f32, apply `f` in f32, multiply by
/// `1 / out_scale` (f32), round half away from zero, add the zero point, clamp.
/// Indexed by the input's bits as `u8`.
pub fn lut_int8(
    in_scale: f32,
    in_zp: i32,
    out_scale: f32,
    out_zp: i32,
    f: impl Fn(f32) -> f32,
) -> [i8; 256] {
    let inverse = 1.0f32 / out_scale;
    let mut lut = [0i8; 256];
    for v in -128i32..=127 {
        let x = in_scale * (v - in_zp) as f32;
        let r = round_half_away_f32(f(x) * inverse);
        let q = if r.is_nan() {
            out_zp
        } else {
            (r.clamp(i32::MIN as f32, i32::MAX as f32) as i32).saturating_add(out_zp)
        };
        lut[(v as i8) as u8 as usize] = q.clamp(-128, 127) as i8;
    }
    lut
}

/// C's `lrintf` under the default rounding mode: half to even.
pub fn round_half_even_f32(x: f32) -> f32 {
    x.round_ties_even()
}

/// XNNPACK's fp32 requantization (`xnn_qs8_requantize_fp32` and the `fp32`
/// GEMM/IGEMM/DWCONV/VMUL microkernels): `(f32)acc * scale`, clamped to
/// `[lo - zp, hi - zp]`, rounded half to even, plus `zp`.
pub fn requantize_fp32(acc: i32, scale: f32, zero_point: i32, lo: i32, hi: i32) -> i32 {
    let v = (acc as f32 * scale).clamp((lo - zero_point) as f32, (hi - zero_point) as f32);
    if v.is_nan() {
        return zero_point.clamp(lo, hi);
    }
    round_half_even_f32(v) as i32 + zero_point
}

/// XNNPACK's int8 MEAN and SUM (`reduce-nd.c` since December 2024: an int32 sum of the
/// raw int8 values, then the reference int32 → qint8 convert): with
/// `s = (in / out) · (1 / count)` for MEAN or `in / out` for SUM and the zero point folded
/// in f32 as `zp' = out_zp − (count · in_zp) · s`, the result is
/// `nearbyint(sum · s + zp')` (half to even), saturated. The input zero point is not
/// subtracted from the integer sum, so ties fall differently from
/// `round((sum − count · in_zp) · s) + out_zp`.
pub fn xnn_reduce_requantize(
    sum: i32,
    in_scale: f32,
    in_zp: i32,
    out_scale: f32,
    out_zp: i32,
    count: usize,
    mean: bool,
) -> i8 {
    let mut s = in_scale / out_scale;
    if mean {
        s *= 1.0f32 / count as f32;
    }
    let zp = out_zp as f32 - ((count as i32) as f32 * in_zp as f32) * s;
    let v = sum as f32 * s + zp;
    if v.is_nan() {
        return 0;
    }
    round_half_even_f32(v.clamp(-128.0, 127.0)) as i8
}

/// The per-channel requantization scale XNNPACK computes for convolutions and
/// fully connected layers: `in * w / out` in f32.
pub fn xnn_conv_scale(in_scale: f32, w_scale: f32, out_scale: f32) -> f32 {
    in_scale * w_scale / out_scale
}

/// XNNPACK `xnn_qs8_quantize`: a float activation bound as int8,
/// `lrintf(clamp(bound / scale + zp, -128, 127))`.
pub fn xnn_activation_bound(bound: f32, scale: f32, zero_point: i32) -> i32 {
    round_half_even_f32((bound / scale + zero_point as f32).clamp(-128.0, 127.0)) as i32
}

/// Fused activation bounds as XNNPACK's subgraph derives them from the float
/// range the delegate passes (RELU `[0, inf)`, RELU6 `[0, 6]`, RELU_N1_TO_1 `[-1, 1]`).
pub fn xnn_activation_range(act: FusedActivation, scale: f32, zero_point: i32) -> (i32, i32) {
    let q = |f: f32| xnn_activation_bound(f, scale, zero_point);
    match act {
        FusedActivation::None => (-128, 127),
        FusedActivation::Relu => (q(0.0), 127),
        FusedActivation::Relu6 => (q(0.0), q(6.0)),
        FusedActivation::ReluN1To1 => (q(-1.0), q(1.0)),
    }
}

/// XNNPACK's int8 ADD (`xnn_init_qs8_add_minmax_scalar_params` and the `vadd`
/// microkernels): `out = (bias + a * a_mult + b * b_mult) >> shift + out_zp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XnnAdd {
    pub a_mult: i32,
    pub b_mult: i32,
    pub bias: i32,
    pub shift: u32,
}

impl XnnAdd {
    /// `a_ratio = a_scale / out_scale` and `b_ratio = b_scale / out_scale` in f32
    /// (SUB passes a negative `b_ratio`); `None` when either magnitude is outside
    /// `[2^-10, 2^8)`, which XNNPACK does not take. The shift puts the larger ratio's
    /// multiplier in `[2^20, 2^21)`; each multiplier is the ratio times `2^shift`
    /// (exact, an exponent change) rounded half to even.
    pub fn new(a_ratio: f32, b_ratio: f32, a_zp: i32, b_zp: i32) -> Option<XnnAdd> {
        let in_range = |r: f32| r.is_finite() && r.abs() >= 2f32.powi(-10) && r.abs() < 256.0;
        if !(in_range(a_ratio) && in_range(b_ratio)) {
            return None;
        }
        let max = a_ratio.abs().max(b_ratio.abs());
        let exponent = ((max.to_bits() >> 23) as i32) - 127;
        let shift = (20 - exponent) as u32;
        let mult = |r: f32| {
            let m = round_half_even_f32(r.abs() * 2f32.powi(shift as i32)) as i32;
            if r.is_sign_negative() {
                -m
            } else {
                m
            }
        };
        let (a_mult, b_mult) = (mult(a_ratio), mult(b_ratio));
        let bias = (1i32 << (shift - 1))
            .wrapping_sub(a_mult.wrapping_mul(a_zp))
            .wrapping_sub(b_mult.wrapping_mul(b_zp));
        Some(XnnAdd {
            a_mult,
            b_mult,
            bias,
            shift,
        })
    }

    /// The sum before the output zero point; the shift is arithmetic (floor), the
    /// bias's `2^(shift-1)` makes it round half up.
    pub fn apply(&self, a: i32, b: i32) -> i32 {
        self.bias
            .wrapping_add(a.wrapping_mul(self.a_mult))
            .wrapping_add(b.wrapping_mul(self.b_mult))
            >> self.shift
    }
}

/// XNNPACK's int8 → int8 conversion (`xnn_init_qs8_cvt_scalar_params`, `qs8-vcvt`):
/// `m = lrintf(256 * (in / out))`, then `((x - in_zp) * m + 128) >> 8 + out_zp`.
pub fn xnn_requantize_q8(x: i32, in_zp: i32, multiplier: i32, out_zp: i32) -> i32 {
    let acc = (x - in_zp).wrapping_mul(multiplier).wrapping_add(0x80) >> 8;
    (acc + out_zp).clamp(-128, 127)
}

/// The multiplier of [`xnn_requantize_q8`].
pub fn xnn_requantize_q8_multiplier(in_scale: f32, out_scale: f32) -> i32 {
    round_half_even_f32(256.0f32 * (in_scale / out_scale)) as i32
}

/// XNNPACK's float → int8 conversion (`f32-qs8-vcvt`): `x * (1 / scale)` in f32,
/// clamped, rounded half to even, plus the zero point.
pub fn xnn_quantize_f32(x: f32, scale: f32, zero_point: i32) -> i32 {
    let inv = 1.0f32 / scale;
    let v = (x * inv).clamp((-128 - zero_point) as f32, (127 - zero_point) as f32);
    if v.is_nan() {
        return zero_point;
    }
    round_half_even_f32(v) as i32 + zero_point
}

/// The lookup table XNNPACK builds for an int8 → int8 unary op from its reference
/// implementation: `x = (f32(q) - f32(in_zp)) * in_scale`, `y = f(x)`, then
/// `round(y * (1 / out_scale) + f32(out_zp))` half away from zero (NaN → 0),
/// saturated. Indexed by the input's bits as `u8`.
pub fn xnn_lut_int8(
    in_scale: f32,
    in_zp: i32,
    out_scale: f32,
    out_zp: i32,
    f: impl Fn(f32) -> f32,
) -> [i8; 256] {
    let inverse = 1.0f32 / out_scale;
    let mut lut = [0i8; 256];
    for v in -128i32..=127 {
        let x = (v as f32 - in_zp as f32) * in_scale;
        let y = f(x) * inverse + out_zp as f32;
        let r = if y.is_nan() {
            0.0
        } else {
            round_half_away_f32(y)
        };
        lut[(v as i8) as u8 as usize] = r.clamp(-128.0, 127.0) as i8;
    }
    lut
}

/// XNNPACK's reference logistic: in double, `e / (1 + e)` with `e = exp(x)`,
/// saturated beyond ±100.
pub fn xnn_sigmoid(x: f32) -> f32 {
    if x > 100.0 {
        1.0
    } else if x < -100.0 {
        0.0
    } else {
        let e = (x as f64).exp();
        (e / (1.0 + e)) as f32
    }
}

/// gemmlowp fixed-point arithmetic on raw i32 values (`FixedPoint<int32_t, N>`), as
/// used by TFLite's reference int8 SOFTMAX.
pub mod fixed {
    use super::{rounding_divide_by_pot, saturating_rounding_doubling_high_mul as srdhm};

    /// `RoundingHalfSum`: `(a + b) / 2` rounded half away from zero.
    pub fn rounding_half_sum(a: i32, b: i32) -> i32 {
        let sum = a as i64 + b as i64;
        let sign = if sum >= 0 { 1 } else { -1 };
        ((sum + sign) / 2) as i32
    }

    /// `SaturatingRoundingMultiplyByPOT<exponent>`.
    pub fn saturating_rounding_multiply_by_pot(x: i32, exponent: i32) -> i32 {
        match exponent.cmp(&0) {
            std::cmp::Ordering::Equal => x,
            std::cmp::Ordering::Less => rounding_divide_by_pot(x, -exponent),
            std::cmp::Ordering::Greater => {
                let threshold = (1i32 << (31 - exponent)) - 1;
                if x > threshold {
                    i32::MAX
                } else if x < -threshold {
                    i32::MIN
                } else {
                    x << exponent
                }
            }
        }
    }

    /// `Rescale<dst_bits>` of a value with `src_bits` integer bits.
    pub fn rescale(x: i32, src_bits: i32, dst_bits: i32) -> i32 {
        saturating_rounding_multiply_by_pot(x, src_bits - dst_bits)
    }

    /// `exp(x)` for `x` in `[-1/4, 0)`, Q0.31 in and out.
    fn exp_on_interval_between_negative_one_quarter_and_0_excl(a: i32) -> i32 {
        const CONSTANT_TERM: i32 = 1895147668; // exp(-1/8)
        const ONE_THIRD: i32 = 715827883;
        let x = a.wrapping_add(1 << 28);
        let x2 = srdhm(x, x);
        let x3 = srdhm(x2, x);
        let x4 = srdhm(x2, x2);
        let x4_over_4 = saturating_rounding_multiply_by_pot(x4, -2);
        let poly = saturating_rounding_multiply_by_pot(
            srdhm(x4_over_4.wrapping_add(x3), ONE_THIRD).wrapping_add(x2),
            -1,
        );
        CONSTANT_TERM.wrapping_add(srdhm(CONSTANT_TERM, x.wrapping_add(poly)))
    }

    /// `exp_on_negative_values` for a `FixedPoint<int32_t, integer_bits>` input; the
    /// result is Q0.31.
    pub fn exp_on_negative_values(a: i32, integer_bits: i32) -> i32 {
        let fractional_bits = 31 - integer_bits;
        let one_quarter = 1i32 << (fractional_bits - 2);
        let mask = one_quarter - 1;
        let a_mod_quarter_minus_one_quarter = (a & mask).wrapping_sub(one_quarter);
        let mut result = exp_on_interval_between_negative_one_quarter_and_0_excl(rescale(
            a_mod_quarter_minus_one_quarter,
            integer_bits,
            0,
        ));
        let remainder = a_mod_quarter_minus_one_quarter.wrapping_sub(a);
        let barrel: [(i32, i32); 7] = [
            (-2, 1672461947),
            (-1, 1302514674),
            (0, 790015084),
            (1, 290630308),
            (2, 39332535),
            (3, 720401),
            (4, 242),
        ];
        for (exponent, multiplier) in barrel {
            if integer_bits > exponent {
                let shift = fractional_bits + exponent;
                if remainder & (1i32 << shift) != 0 {
                    result = srdhm(result, multiplier);
                }
            }
        }
        if integer_bits > 5 {
            let clamp = -(1i32 << (36 - integer_bits));
            if a < clamp {
                result = 0;
            }
        }
        if a == 0 {
            result = i32::MAX;
        }
        result
    }

    /// `1 / (1 + x)` for `x` in `(0, 1)`, Q0.31 in and out (Newton-Raphson, 3 steps).
    pub fn one_over_one_plus_x_for_x_in_0_1(a: i32) -> i32 {
        const F2_ONE: i32 = 1 << 29;
        const C48_17: i32 = 1515870810;
        const CNEG32_17: i32 = -1010580540;
        let half_denominator = rounding_half_sum(a, i32::MAX);
        let mut x = C48_17.wrapping_add(srdhm(half_denominator, CNEG32_17));
        for _ in 0..3 {
            let half_denominator_times_x = srdhm(half_denominator, x);
            let one_minus = F2_ONE.wrapping_sub(half_denominator_times_x);
            x = x.wrapping_add(rescale(srdhm(x, one_minus), 4, 2));
        }
        // ExactMulByPot<-1> turns Q2 into Q1 (same raw), then Rescale<0>.
        rescale(x, 1, 0)
    }

    /// TFLite `GetReciprocal`: `1 / x` for `x` with `x_integer_digits` integer bits,
    /// as a Q0.31 value and the number of bits of `x` above 1.0.
    pub fn get_reciprocal(x: i32, x_integer_digits: i32) -> (i32, i32) {
        let headroom_plus_one = (x as u32).leading_zeros() as i32;
        let num_bits_over_unit = x_integer_digits - headroom_plus_one;
        let shifted_sum_minus_one =
            ((x as u32).wrapping_shl(headroom_plus_one as u32)).wrapping_sub(1u32 << 31) as i32;
        (
            one_over_one_plus_x_for_x_in_0_1(shifted_sum_minus_one),
            num_bits_over_unit,
        )
    }
}

/// TFLite `PreprocessSoftmaxScaling` (double-rounding build): the Q31 multiplier and
/// left shift that map an input difference to `FixedPoint<int32, input_integer_bits>`.
pub fn preprocess_softmax_scaling(
    beta: f64,
    input_scale: f64,
    input_integer_bits: i32,
) -> (i32, i32) {
    let max_real_multiplier = ((1i64 << 31) - 1) as f64;
    let m =
        (beta * input_scale * (1i64 << (31 - input_integer_bits)) as f64).min(max_real_multiplier);
    quantize_multiplier(m)
}

/// TFLite `CalculateInputRadius` (31 total signed bits).
pub fn calculate_input_radius(input_integer_bits: i32, input_left_shift: i32) -> i32 {
    let max_input_rescaled = ((1i64 << input_integer_bits) - 1) as f64
        * (1i64 << (31 - input_integer_bits)) as f64
        / (1i64 << input_left_shift) as f64;
    max_input_rescaled.floor() as i32
}

/// One batch row quantized on the fly by a dynamic-range (hybrid) kernel:
/// `real ≈ (q - offset) * scale`.
#[derive(Debug, Clone, PartialEq)]
pub struct DynamicRow {
    pub q: Vec<i8>,
    pub scale: f32,
    pub offset: i32,
}

/// A row's range widened to contain 0, as both dynamic quantizers take it (NaN never
/// wins a comparison, so it is skipped).
fn row_range(values: &[f32]) -> (f32, f32) {
    let (lo, hi) = row_min_max(values);
    (lo.min(0.0), hi.max(0.0))
}

/// TFLite `tensor_utils::AsymmetricQuantizeFloats` (hybrid kernels with
/// `asymmetric_quantize_inputs`) as LiteRT 2.3.0 computes it, pinned down against
/// it value by value: the range `rmin = min(0, min)`, `rmax = max(0, max)` in
/// f32, `scale = (f64)(rmax - rmin) / 255` (the difference rounded in f32, the
/// quotient in f64), the zero point from whichever end has the smaller error, in
/// f64, rounded half away from zero (so a symmetric range gives exactly -0.5 →
/// -1), the scale stored as f32, then each value `round(x * (1 / scale)) + offset`
/// (f32 reciprocal and product, rounded half away from zero *before* the offset
/// is added), clamped to int8. An all-zero row gets scale 1 and offset 0.
pub fn asymmetric_quantize_floats(values: &[f32]) -> DynamicRow {
    let (rmin, rmax) = row_range(values);
    if values.is_empty() || rmin == rmax {
        return DynamicRow {
            q: vec![0; values.len()],
            scale: 1.0,
            offset: 0,
        };
    }
    let (qmin, qmax) = (-128.0f64, 127.0f64);
    let span = rmax - rmin;
    let (rmin, rmax) = (rmin as f64, rmax as f64);
    let scale = span as f64 / (qmax - qmin);
    let zp_from_min = qmin - rmin / scale;
    let zp_from_max = qmax - rmax / scale;
    let err_min = qmin.abs() + (rmin / scale).abs();
    let err_max = qmax.abs() + (rmax / scale).abs();
    let zp = if err_min < err_max {
        zp_from_min
    } else {
        zp_from_max
    };
    let offset = if zp <= qmin {
        -128
    } else if zp >= qmax {
        127
    } else {
        round_half_away_f64(zp) as i32
    };
    let scale = scale as f32;
    let inv = 1.0f32 / scale;
    let q = scale_round_row(values, inv, offset, (-128, 127), false);
    DynamicRow { q, scale, offset }
}

/// TFLite `tensor_utils::SymmetricQuantizeFloats`: scale `max|x| / 127` in f32,
/// values `round(x * (127 / max|x|))` half away from zero, clamped to ±127; an
/// all-zero row gets scale 1. The offset is 0.
pub fn symmetric_quantize_floats(values: &[f32]) -> DynamicRow {
    let (lo, hi) = row_min_max(values);
    let range = if values.is_empty() {
        0.0
    } else {
        lo.abs().max(hi.abs())
    };
    if range == 0.0 {
        return DynamicRow {
            q: vec![0; values.len()],
            scale: 1.0,
            offset: 0,
        };
    }
    let inv = 127.0f32 / range;
    let q = scale_round_row(values, inv, 0, (-127, 127), false);
    DynamicRow {
        q,
        scale: range / 127.0,
        offset: 0,
    }
}

/// XNNPACK's dynamic quantization of one row (`xnn_qd8_asymmetric_quantization_params`
/// and the f32 → qd8 convert), which the default resolver uses for hybrid CONV_2D
/// (one row per image) and FULLY_CONNECTED (one per batch row), all in f32:
/// `m = 255 / (rmax - rmin)`, the zero point `-128 - rmin·m` when `(-128 + rmin·m)
/// + (127 + rmax·m) > 0`, else `127 - rmax·m`, clamped and rounded half to even;
/// values `round_even(x·m) + zp`, saturated; the row's scale is `1 / m`.
pub fn xnn_dynamic_quantize(values: &[f32]) -> DynamicRow {
    let (rmin, rmax) = row_range(values);
    let (qmin, qmax) = (-128.0f32, 127.0f32);
    let m = if values.is_empty() || rmin == rmax {
        1.0
    } else {
        (qmax - qmin) / (rmax - rmin)
    };
    let (rmin_m, rmax_m) = (rmin * m, rmax * m);
    let zp = if (qmin + rmin_m) + (qmax + rmax_m) > 0.0 {
        qmin - rmin_m
    } else {
        qmax - rmax_m
    };
    let offset = round_half_even_f32(zp.clamp(qmin, qmax)) as i32;
    let q = scale_round_row(values, m, offset, (-128, 127), true);
    DynamicRow {
        q,
        scale: 1.0 / m,
        offset,
    }
}

/// `clamp(round(v · m) + offset, lo, hi)` for each value ([`scale_round_into`]).
fn scale_round_row(values: &[f32], m: f32, offset: i32, range: (i32, i32), even: bool) -> Vec<i8> {
    let mut out = vec![0i8; values.len()];
    scale_round_into(values, m, offset, range, even, &mut out);
    out
}

/// How a hybrid kernel turns its i32 accumulator (already corrected for the input
/// offset) back into float, before the bias: the f32 products in the order each
/// LiteRT kernel writes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HybridScaling {
    /// `(acc * w_scale) * in_scale` (reference `HybridConvPerChannel`).
    AccTimesWeightFirst,
    /// `acc * (in_scale * w_scale)` (`MatrixBatchVectorMultiplyAccumulate`, the
    /// per-tensor hybrid CONV_2D).
    AccTimesProduct,
    /// XNNPACK's qd8-f32-qc8w GEMM on x86-64 (FMA microkernels): `fma(acc *
    /// in_scale, w_scale, bias)`, one rounding for the multiply-add.
    XnnFma,
}

/// The float value of a hybrid accumulator `acc`, plus `bias`.
#[inline]
pub fn hybrid_dequantize(
    acc: i32,
    in_scale: f32,
    w_scale: f32,
    bias: f32,
    how: HybridScaling,
) -> f32 {
    match how {
        HybridScaling::AccTimesWeightFirst => acc as f32 * w_scale * in_scale + bias,
        HybridScaling::AccTimesProduct => acc as f32 * (in_scale * w_scale) + bias,
        HybridScaling::XnnFma => (acc as f32 * in_scale).mul_add(w_scale, bias),
    }
}

/// The 16x8 kernels' `MultiplyByQuantizedMultiplier(int64_t x, q, shift)`: the Q31
/// multiplier is reduced to Q15 (`(q + 2^15) >> 16`, or `0x7FFF` from `0x7FFF0000`
/// on), then one rounding (half up) of `x * reduced` by `2^(15 - shift)`. TFLite
/// builds it the same way with and without `TFLITE_SINGLE_ROUNDING`.
pub fn multiply_by_quantized_multiplier_i64(x: i64, q: i32, shift: i32) -> i32 {
    let reduced: i64 = if q < 0x7FFF_0000 {
        (q as i64 + (1 << 15)) >> 16
    } else {
        0x7FFF
    };
    let total = (15 - shift).clamp(1, 62);
    (x.wrapping_mul(reduced).wrapping_add(1i64 << (total - 1)) >> total) as i32
}

/// The reference 16x8 FULLY_CONNECTED requantization: the i64 accumulator times
/// `(f64)in * (f64)w / (f64)out` in double, rounded once half away from zero
/// (saturated to i32 before the caller clamps it to int16).
pub fn requantize_i64_in_double(acc: i64, multiplier: f64) -> i32 {
    round_half_away_f64(acc as f64 * multiplier).clamp(i32::MIN as f64, i32::MAX as f64) as i32
}

/// The 513-entry int16 lookup table of TFLite's `LUTPopulateInt16<FloatT>`: 512
/// samples of `f` over the input range, each biased by half the error of linear
/// interpolation at the step's midpoint, plus the end value; all arithmetic in
/// `FloatT` (f32 for EXP, f64 for SOFTMAX's tables), `std::round` half away from zero.
macro_rules! lut_int16 {
    ($name:ident, $t:ty) => {
        pub fn $name(
            in_scale: $t,
            in_zp: i32,
            out_scale: $t,
            out_zp: i32,
            f: impl Fn($t) -> $t,
        ) -> [i16; 513] {
            let input_min = in_scale * (-32768 - in_zp) as $t;
            let input_max = in_scale * (32767 - in_zp) as $t;
            let output_min = out_scale * (-32768 - out_zp) as $t;
            let output_max = out_scale * (32767 - out_zp) as $t;
            let step = (input_max - input_min) / 512 as $t;
            let half_step = step / 2 as $t;
            let inv = 65536 as $t / (output_max - output_min);
            let clamp = |v: $t| v.max(-32768 as $t).min(32767 as $t) as i16;
            let mut lut = [0i16; 513];
            for (i, slot) in lut.iter_mut().enumerate().take(512) {
                let at = input_min + i as $t * step;
                let val = f(at);
                let val_mid = f(at + half_step);
                let val_next = f(input_min + (i + 1) as $t * step);
                let sample = (val * inv).round();
                let interp = ((val_next * inv + (val * inv).round()) / 2 as $t).round();
                let mid = (val_mid * inv).round();
                let bias = ((interp - mid) / 2 as $t).round();
                *slot = clamp(sample - bias);
            }
            lut[512] = clamp((f(input_max) * inv).round());
            lut
        }
    };
}
lut_int16!(lut_int16_f32, f32);
lut_int16!(lut_int16_f64, f64);

/// TFLite's int16 table lookup with linear interpolation between the 512 base values
/// (`lut_lookup_with_interpolation`): index `256 + (v >> 7)`, the low 7 bits weight
/// the slope to the next entry, rounded half up; the slope and the sum wrap to int16.
pub fn lut_lookup_int16(v: i16, lut: &[i16; 513]) -> i16 {
    let index = (256 + (v as i32 >> 7)) as usize;
    let offset = (v as i32) & 0x7f;
    let base = lut[index];
    let slope = lut[index + 1].wrapping_sub(base) as i32;
    let delta = (slope * offset + 64) >> 7;
    (base as i32 + delta) as i16
}

/// The tables of TFLite's int16 SOFTMAX: `exp` over [-10, 0] and `1 / (1 + x)`
/// over [0, 1], both to [-1, 1], built in double.
pub fn softmax_int16_luts() -> ([i16; 513], [i16; 513]) {
    let range = 65535.0f64;
    (
        lut_int16_f64(10.0 / range, 32767, 2.0 / range, 0, f64::exp),
        lut_int16_f64(1.0 / range, -32768, 2.0 / range, 0, |x| 1.0 / (1.0 + x)),
    )
}

/// One row of TFLite's reference int16 SOFTMAX (`SoftmaxInt16`): the differences to
/// the row's maximum are rescaled by `(multiplier, shift)` so that [-65535, 0] is
/// [-10, 0], looked up in the exp table, summed in Q16.15; the reciprocal of the
/// sum comes from the `1 / (1 + x)` table after normalizing it by its leading zeros.
pub fn softmax_int16_row(
    x: &[i16],
    out: &mut [i16],
    (multiplier, shift): (i32, i32),
    exp_lut: &[i16; 513],
    recip_lut: &[i16; 513],
) {
    let Some(&max) = x.iter().max() else { return };
    let mut sum: i32 = 0;
    for (o, &v) in out.iter_mut().zip(x) {
        let diff = v as i32 - max as i32;
        let scaled = multiply_by_quantized_multiplier(diff, multiplier, shift, Rounding::Double);
        let sym = (scaled + 32767).clamp(-32768, 32767) as i16;
        *o = lut_lookup_int16(sym, exp_lut);
        sum = sum.wrapping_add(*o as i32);
    }
    let headroom_plus_one = (sum as u32).leading_zeros() as i32;
    let shifted = ((((sum as i64) << (headroom_plus_one - 1).max(0)) + (1 << 13)) >> 14) as i32;
    let sym = (shifted - ((1 << 15) + (1 << 16))).clamp(-32768, 32767) as i16;
    let recip = lut_lookup_int16(sym, recip_lut) as i64;
    let right = (31 - headroom_plus_one).max(1);
    let round = 1i64 << (right - 1);
    for o in out.iter_mut() {
        let r = ((*o as i64 * recip + round) >> right) as i32;
        *o = r.clamp(0, 32767) as i16;
    }
}

/// `sigmoid(i / 24)` in 0.16 fixed point: TFLite's table for its int16 LOGISTIC and
/// TANH (`sigmoid_table_uint16`, common.h; tanh(x) = 2 sigmoid(2x) - 1).
#[rustfmt::skip]
const SIGMOID_TABLE_U16: [u16; 256] = [
    32768, 33451, 34133, 34813, 35493, 36169, 36843, 37513, 38180, 38841, 39498, 40149,
    40794, 41432, 42064, 42688, 43304, 43912, 44511, 45102, 45683, 46255, 46817, 47369,
    47911, 48443, 48964, 49475, 49975, 50464, 50942, 51409, 51865, 52311, 52745, 53169,
    53581, 53983, 54374, 54755, 55125, 55485, 55834, 56174, 56503, 56823, 57133, 57433,
    57724, 58007, 58280, 58544, 58800, 59048, 59288, 59519, 59743, 59959, 60168, 60370,
    60565, 60753, 60935, 61110, 61279, 61441, 61599, 61750, 61896, 62036, 62172, 62302,
    62428, 62549, 62666, 62778, 62886, 62990, 63090, 63186, 63279, 63368, 63454, 63536,
    63615, 63691, 63765, 63835, 63903, 63968, 64030, 64090, 64148, 64204, 64257, 64308,
    64357, 64405, 64450, 64494, 64536, 64576, 64614, 64652, 64687, 64721, 64754, 64786,
    64816, 64845, 64873, 64900, 64926, 64950, 64974, 64997, 65019, 65039, 65060, 65079,
    65097, 65115, 65132, 65149, 65164, 65179, 65194, 65208, 65221, 65234, 65246, 65258,
    65269, 65280, 65291, 65301, 65310, 65319, 65328, 65337, 65345, 65352, 65360, 65367,
    65374, 65381, 65387, 65393, 65399, 65404, 65410, 65415, 65420, 65425, 65429, 65433,
    65438, 65442, 65445, 65449, 65453, 65456, 65459, 65462, 65465, 65468, 65471, 65474,
    65476, 65479, 65481, 65483, 65485, 65488, 65489, 65491, 65493, 65495, 65497, 65498,
    65500, 65501, 65503, 65504, 65505, 65507, 65508, 65509, 65510, 65511, 65512, 65513,
    65514, 65515, 65516, 65517, 65517, 65518, 65519, 65520, 65520, 65521, 65522, 65522,
    65523, 65523, 65524, 65524, 65525, 65525, 65526, 65526, 65526, 65527, 65527, 65528,
    65528, 65528, 65529, 65529, 65529, 65529, 65530, 65530, 65530, 65530, 65531, 65531,
    65531, 65531, 65531, 65532, 65532, 65532, 65532, 65532, 65532, 65533, 65533, 65533,
    65533, 65533, 65533, 65533, 65533, 65534, 65534, 65534, 65534, 65534, 65534, 65534,
    65534, 65534, 65534, 65535,
];

/// TFLite's `CheckedLog2`: `round(log(x) / log(2))` in f32 and whether `x` is a power
/// of two to within 1e-3 of an octave.
fn checked_log2(x: f32) -> (i32, bool) {
    let l = x.ln() * (1.0f32 / 2.0f32.ln());
    let r = round_half_away_f32(l);
    (r as i32, (l - r).abs() < 1e-3)
}

/// The input rescaling of TFLite's int16 LOGISTIC (`tanh = false`) and TANH
/// (`SigmoidPrepare`/`TanhPrepare`, then the power-of-two fixup of
/// `reference_integer_ops::Logistic`/`Tanh`): `(multiplier, right_shift)` with which
/// `(x * multiplier + round) >> right_shift` puts the input in 1/(3·4096) units
/// (±2^17 is ±10.7). A scale of 2^-12 (TANH: also 2^-11) is the power-of-two case,
/// multiplier `3 << shift` and no shift.
pub fn sigmoid_tanh_int16_rescale(in_scale: f32, tanh: bool) -> (i32, i32) {
    let (log2, pot) = checked_log2(in_scale);
    let shift = 12 + log2;
    if pot && (shift == 0 || tanh && shift == 1) {
        return (3 << shift, 0);
    }
    let mut multiplier = in_scale as f64 * 4096.0 * 3.0;
    let mut shift = 0;
    while multiplier <= 32767.0 / 2.0 && shift <= 30 {
        shift += 1;
        multiplier *= 2.0;
    }
    (multiplier as i32, shift)
}

/// The rescaled input of [`logistic_int16`]/[`tanh_int16`] (int32 arithmetic, as C).
fn sigmoid_tanh_input(x: i16, (multiplier, shift): (i32, i32)) -> i32 {
    let round = if shift > 0 { 1 << (shift - 1) } else { 0 };
    (x as i32).wrapping_mul(multiplier).wrapping_add(round) >> shift
}

/// TFLite's reference int16 LOGISTIC (`reference_integer_ops::Logistic`): the table
/// interpolated over 9 fractional bits of |x|, mirrored for negative x, output in
/// 1/32768 units (zero point 0).
pub fn logistic_int16(x: i16, rescale: (i32, i32)) -> i16 {
    let input = sigmoid_tanh_input(x, rescale);
    let abs = input.unsigned_abs();
    let uh = abs >> 9;
    let result: u32 = if uh >= 255 {
        0x7FFF << 10
    } else {
        let ua = SIGMOID_TABLE_U16[uh as usize] as u32;
        let ub = SIGMOID_TABLE_U16[uh as usize + 1] as u32;
        (ua << 9).wrapping_add((abs & 0x1ff).wrapping_mul(ub.wrapping_sub(ua)))
    };
    let result = if input >= 0 {
        result.wrapping_add(1 << 9)
    } else {
        (1u32 << 25).wrapping_sub(result).wrapping_add((1 << 9) - 1)
    };
    (result >> 10) as i16
}

/// TFLite's reference int16 TANH (`reference_integer_ops::Tanh`): the sigmoid table
/// over 8 fractional bits of |x|, `2 sigmoid - 1`, output in 1/32768 units.
pub fn tanh_int16(x: i16, rescale: (i32, i32)) -> i16 {
    let input = sigmoid_tanh_input(x, rescale);
    let abs = input.unsigned_abs();
    let uh = abs >> 8;
    let result: i32 = if uh >= 255 {
        0xFFFF << 8
    } else {
        let ua = SIGMOID_TABLE_U16[uh as usize] as u32;
        let ub = SIGMOID_TABLE_U16[uh as usize + 1] as u32;
        (ua << 8).wrapping_add((abs & 0xFF).wrapping_mul(ub.wrapping_sub(ua))) as i32
    };
    let result = if input >= 0 {
        result - (1 << 23) + (1 << 7)
    } else {
        -result + (1 << 23) + (1 << 7) - 1
    };
    (result >> 8) as i16
}

/// XNNPACK's int8 LEAKY_RELU (`xnn_init_qs8_lrelu_scalar_params` and the `qs8-vlrelu`
/// microkernels), which the default resolver runs: multipliers `lrintf(-256 · s)`
/// for `s = in / out` and `s · slope` (f32), then `((zp - x) · m + (out_zp << 8) +
/// 128) >> 8`, saturated; the negative multiplier applies where `x ≤ zp`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct XnnLeakyRelu {
    input_zero_point: i32,
    positive_multiplier: i32,
    negative_multiplier: i32,
    bias: i32,
}

impl XnnLeakyRelu {
    pub fn new(in_scale: f32, in_zp: i32, out_scale: f32, out_zp: i32, slope: f32) -> XnnLeakyRelu {
        let positive_scale = in_scale / out_scale;
        let negative_scale = positive_scale * slope;
        XnnLeakyRelu {
            input_zero_point: in_zp,
            positive_multiplier: round_half_even_f32(-256.0 * positive_scale) as i32,
            negative_multiplier: round_half_even_f32(-256.0 * negative_scale) as i32,
            bias: (out_zp << 8) + 0x80,
        }
    }

    pub fn apply(&self, x: i32) -> i32 {
        let acc = self.input_zero_point - x;
        let m = if acc >= 0 {
            self.negative_multiplier
        } else {
            self.positive_multiplier
        };
        (self.bias.wrapping_add(acc.wrapping_mul(m)) >> 8).clamp(-128, 127)
    }
}

/// TFLite `GetInvSqrtQuantizedMultiplierExp(input, kReverseShift)`: `1 / sqrt(input)`
/// as a Q31 multiplier and a left shift for [`multiply_by_quantized_multiplier`],
/// by gemmlowp fixed-point Newton-Raphson (five steps in `FixedPoint<int32, 3>`).
/// Used by the int8 RSQRT and L2_NORMALIZATION. Inputs ≤ 1 give `(i32::MAX, 0)`.
pub fn inv_sqrt_quantized_multiplier(input: i32) -> (i32, i32) {
    use fixed::{rescale, saturating_rounding_multiply_by_pot};
    use saturating_rounding_doubling_high_mul as mul;
    if input <= 1 {
        return (i32::MAX, 0);
    }
    let mut input = input;
    let mut shift = 11;
    while input >= 1 << 29 {
        input /= 4;
        shift += 1;
    }
    let max_left_shift_bits = (input as u32).leading_zeros() as i32 - 1;
    let left_shift_bit_pairs = max_left_shift_bits / 2 - 1;
    shift -= left_shift_bit_pairs;
    input <<= 2 * left_shift_bit_pairs;
    // Raw values of FixedPoint<int32, 3>; a product of two has 6 integer bits.
    let half_input = saturating_rounding_multiply_by_pot(input >> 1, -1);
    let half_three = (1 << 28) + (1 << 27);
    let mut x = 1 << 28;
    for _ in 0..5 {
        let x3 = rescale(mul(mul(x, x), x), 9, 3);
        x = rescale(mul(half_three, x).wrapping_sub(mul(half_input, x3)), 6, 3);
    }
    const HALF_SQRT_2: i32 = 1518500250;
    x = mul(x, HALF_SQRT_2);
    if shift < 0 {
        x = x.wrapping_shl((-shift) as u32);
        shift = 0;
    }
    (x, -shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_int8_quantization_equals_quantize_value() {
        let mut xs: Vec<f32> = vec![
            0.0,
            -0.0,
            0.5,
            -0.5,
            1.5,
            -1.5,
            2.5,
            0.49999997,
            -0.49999997,
            1e30,
            -1e30,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            8_388_608.5,
            -8_388_609.0,
            f32::MIN_POSITIVE,
            127.5,
            -128.5,
            300.0,
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..200_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            xs.push(f32::from_bits(seed as u32));
            xs.push(((seed >> 32) as i32 as f32) / 65_536.0);
        }
        let src: Vec<u8> = xs.iter().flat_map(|x| x.to_le_bytes()).collect();
        let mut dst = vec![0u8; xs.len()];
        for (scale, zp) in [
            (1.0f32, 0),
            (0.5, -128),
            (0.0371, 17),
            (3e-5, 127),
            (250.0, -3),
        ] {
            quantize_f32le_to_i8(&src, &mut dst, scale, zp);
            for (i, &x) in xs.iter().enumerate() {
                let want = quantize_value(x, scale, zp, -128, 127) as i8;
                assert_eq!(
                    dst[i] as i8,
                    want,
                    "x {x:e} ({:08x}) scale {scale} zp {zp}",
                    x.to_bits()
                );
            }
        }
    }

    #[test]
    fn round_half_away_f32_equals_round_on_every_float() {
        use rayon::prelude::*;
        let bad: Vec<u32> = (0u32..1 << 16)
            .into_par_iter()
            .flat_map_iter(|hi| {
                (0u32..1 << 16).filter_map(move |lo| {
                    let bits = hi << 16 | lo;
                    let x = f32::from_bits(bits);
                    let (a, b) = (round_half_away_f32(x), x.round());
                    let same = a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
                    (!same).then_some(bits)
                })
            })
            .take_any(5)
            .collect();
        assert!(bad.is_empty(), "differs from f32::round at bits {bad:08x?}");
    }

    #[test]
    fn frexp_matches_libm() {
        for &m in &[1.0, 0.5, 0.75, 3.0, 1e-10, 123456.789, 2.0f64.powi(-1040)] {
            let (f, e) = frexp(m);
            assert!((0.5..1.0).contains(&f), "{m}: frac {f}");
            assert_eq!(f * 2f64.powi(e / 2) * 2f64.powi(e - e / 2), m);
        }
    }

    #[test]
    fn quantize_multiplier_known_values() {
        assert_eq!(quantize_multiplier(0.5), (1 << 30, 0));
        assert_eq!(quantize_multiplier(1.0), (1 << 30, 1));
        assert_eq!(quantize_multiplier(0.0), (0, 0));
        // 0.75 * 2^31 = 1610612736
        assert_eq!(quantize_multiplier(0.375), (1610612736, -1));
        // rounds up to 2^31 and renormalises
        let (q, s) = quantize_multiplier(1.0 - 1e-12);
        assert_eq!((q, s), (1 << 30, 1));
        assert_eq!(quantize_multiplier(1e-12), (0, 0));
    }

    #[test]
    fn srdhm_edge_cases() {
        assert_eq!(
            saturating_rounding_doubling_high_mul(i32::MIN, i32::MIN),
            i32::MAX
        );
        assert_eq!(
            saturating_rounding_doubling_high_mul(1 << 30, 1 << 30),
            1 << 29
        );
        // negative products truncate toward zero after the nudge
        assert_eq!(saturating_rounding_doubling_high_mul(-3, 1 << 30), -1);
        assert_eq!(saturating_rounding_doubling_high_mul(3, 1 << 30), 2);
    }

    #[test]
    fn rounding_divide_rounds_half_away() {
        assert_eq!(rounding_divide_by_pot(5, 1), 3);
        assert_eq!(rounding_divide_by_pot(-5, 1), -3);
        assert_eq!(rounding_divide_by_pot(4, 1), 2);
        assert_eq!(rounding_divide_by_pot(-7, 2), -2);
        assert_eq!(rounding_divide_by_pot(6, 2), 2);
    }

    #[test]
    fn single_and_double_rounding_differ_where_expected() {
        let (q, s) = quantize_multiplier(0.5);
        assert_eq!(
            multiply_by_quantized_multiplier(3, q, s, Rounding::Double),
            2
        );
        // -1.5: the doubling high multiply rounds half up, so -1 (not -2).
        assert_eq!(
            multiply_by_quantized_multiplier(-3, q, s, Rounding::Double),
            -1
        );
        assert_eq!(
            multiply_by_quantized_multiplier(-3, q, s, Rounding::Single),
            -1
        );
        let (q, s) = quantize_multiplier(0.3);
        let differs = (-5000..5000).any(|x| {
            multiply_by_quantized_multiplier(x, q, s, Rounding::Double)
                != multiply_by_quantized_multiplier(x, q, s, Rounding::Single)
        });
        assert!(
            differs,
            "double and single rounding never differ for m = 0.3"
        );
        for x in [-1000, -7, 0, 9, 12345] {
            let (q, s) = quantize_multiplier(0.0123);
            let d = multiply_by_quantized_multiplier(x, q, s, Rounding::Double);
            let si = multiply_by_quantized_multiplier(x, q, s, Rounding::Single);
            assert!((d - si).abs() <= 1);
            assert!((d as f64 - x as f64 * 0.0123).abs() <= 1.0);
        }
    }

    #[test]
    fn quantize_divides_in_f32() {
        assert_eq!(quantize_value(0.5, 1.0, 0, -128, 127), 1);
        assert_eq!(quantize_value(-0.5, 1.0, 0, -128, 127), -1);
        assert_eq!(quantize_value(1000.0, 0.1, -128, -128, 127), 127);
        assert_eq!(quantize_value(f32::NAN, 0.1, 3, -128, 127), 3);
        assert_eq!(
            activation_range(FusedActivation::Relu6, 0.05, -128, -128, 127),
            (-128, -8)
        );
    }

    #[test]
    fn gemmlowp_fixed_point_exp_and_reciprocal() {
        let q31 = |v: i32| v as f64 / 2f64.powi(31);
        for v in [0.0f64, -0.1, -0.25, -1.0, -3.7, -8.0, -20.0] {
            let raw = (v * (1u64 << 26) as f64) as i32;
            let e = q31(fixed::exp_on_negative_values(raw, 5));
            assert!((e - v.exp()).abs() < 5e-7, "exp({v}) = {e}");
        }
        for v in [0.0f64, 0.1, 0.5, 0.9] {
            let r = q31(fixed::one_over_one_plus_x_for_x_in_0_1(
                (v * 2f64.powi(31)) as i32,
            ));
            assert!((r - 1.0 / (1.0 + v)).abs() < 1e-8, "1/(1+{v}) = {r}");
        }
        let (r, bits) = fixed::get_reciprocal((2.5 * 2f64.powi(19)) as i32, 12);
        assert_eq!(bits, 1);
        assert!((q31(r) - 0.8).abs() < 1e-8);
        assert_eq!(fixed::rounding_half_sum(3, 4), 4);
        assert_eq!(fixed::rounding_half_sum(-3, -4), -4);
        assert_eq!(
            fixed::saturating_rounding_multiply_by_pot(1 << 29, 2),
            i32::MAX
        );
        assert_eq!(
            fixed::saturating_rounding_multiply_by_pot(-(1 << 29), 2),
            i32::MIN
        );
        assert_eq!(fixed::saturating_rounding_multiply_by_pot(5, -1), 3);
    }

    #[test]
    fn xnnpack_rounds_once_to_even() {
        // 5 * 0.5 = 2.5 → 2 (even), where the reference rounds half away → 3.
        assert_eq!(requantize_fp32(5, 0.5, 0, -128, 127), 2);
        assert_eq!(requantize_fp32(7, 0.5, 0, -128, 127), 4);
        assert_eq!(requantize_fp32(-5, 0.5, 3, -128, 127), 1);
        let (q, s) = quantize_multiplier(0.5);
        assert_eq!(
            multiply_by_quantized_multiplier(5, q, s, Rounding::Double),
            3
        );
        // Clamped before rounding, to the activation range less the zero point.
        assert_eq!(requantize_fp32(1000, 1.0, -10, -128, 20), 20);
        assert_eq!(requantize_fp32(i32::MIN, 200.0, 0, -128, 127), -128);
        assert_eq!(xnn_activation_bound(6.0, 0.05, -128), -8);
        assert_eq!(xnn_activation_bound(0.0, 0.05, 7), 7);
        assert_eq!(xnn_activation_bound(1000.0, 0.05, 0), 127);
        assert_eq!(xnn_quantize_f32(0.25, 0.5, 0), 0);
        assert_eq!(xnn_quantize_f32(0.75, 0.5, 0), 2);
        assert_eq!(quantize_value(0.25, 0.5, 0, -128, 127), 1);
        // MEAN of 8 raw values summing to 12 with in_zp 1: (12 - 8) / 8 = 0.5 exactly,
        // computed as 12 * 0.125 + (0 - 8 * 0.125) = 0.5, a tie rounded to even
        assert_eq!(xnn_reduce_requantize(12, 1.0, 1, 1.0, 0, 8, true), 0);
        assert_eq!(xnn_reduce_requantize(20, 1.0, 1, 1.0, 0, 8, true), 2);
        // the folded zero point is an f32: with in_zp 3, count 8 and s = 0.3 / 0.7 / 8 the
        // two roundings of (sum - 24) * s differ from sum * s + zp' on some sums
        let differs = (-1024..1024).any(|sum| {
            let s = (0.3f32 / 0.7) * (1.0 / 8.0);
            let separate = round_half_even_f32(((sum - 24) as f32 * s).clamp(-128.0, 127.0));
            xnn_reduce_requantize(sum, 0.3, 3, 0.7, 0, 8, true) as f32 != separate
        });
        assert!(differs);
        // SUM saturates
        assert_eq!(xnn_reduce_requantize(1000, 1.0, 0, 1.0, 0, 8, false), 127);
    }

    #[test]
    fn xnnpack_add_and_requantize_are_integer() {
        let p = XnnAdd::new(0.5, 0.25, 3, -2).unwrap();
        // max ratio 0.5 = 2^-1: shift 21, multipliers 2^20 and 2^19.
        assert_eq!((p.a_mult, p.b_mult, p.shift), (1 << 20, 1 << 19, 21));
        for (a, b) in [(3, -2), (10, 6), (-128, 127), (127, -128), (4, -2)] {
            let exact = 0.5 * (a - 3) as f64 + 0.25 * (b + 2) as f64;
            assert_eq!(p.apply(a, b), (exact + 0.5).floor() as i32, "{a} {b}");
        }
        let sub = XnnAdd::new(0.5, -0.25, 0, 0).unwrap();
        assert_eq!(sub.apply(4, 4), 1);
        assert!(XnnAdd::new(1000.0, 1.0, 0, 0).is_none());
        let m = xnn_requantize_q8_multiplier(0.1, 0.2);
        assert_eq!(m, 128);
        assert_eq!(xnn_requantize_q8(5, 0, m, 0), 3); // 2.5 rounds half up
        assert_eq!(xnn_requantize_q8(-5, 0, m, 0), -2);
        assert_eq!(xnn_requantize_q8(127, -128, m, 100), 127);
    }

    #[test]
    fn xnnpack_lut_rounds_after_adding_the_zero_point() {
        let lut = xnn_lut_int8(0.1, 0, 1.0 / 256.0, -128, xnn_sigmoid);
        assert_eq!(lut[0], 0); // sigmoid(0) * 256 - 128 = 0
        assert_eq!(lut[127], 127);
        assert_eq!(lut[128], -128 + (256.0 * xnn_sigmoid(-12.8)).round() as i8);
        assert_eq!(xnn_sigmoid(200.0), 1.0);
        assert_eq!(xnn_sigmoid(-200.0), 0.0);
    }

    #[test]
    fn int16_logistic_and_tanh_fixed_points() {
        // A power-of-two scale is rescaled by 3 without a shift (LOGISTIC: 2^-12 only);
        // any other scale · 12288 is doubled up past 16383.5.
        assert_eq!(sigmoid_tanh_int16_rescale(1.0 / 4096.0, false), (3, 0));
        assert_eq!(sigmoid_tanh_int16_rescale(1.0 / 2048.0, true), (6, 0));
        assert_eq!(sigmoid_tanh_int16_rescale(1.0 / 2048.0, false), (24576, 12));
        let r = sigmoid_tanh_int16_rescale(1e-3, false);
        assert_eq!(r, ((1e-3f32 as f64 * 12288.0 * 2048.0) as i32, 11));
        // sigmoid(0) = 1/2, tanh(0) = 0, odd/even symmetry, saturation.
        assert_eq!(logistic_int16(0, r), 16384);
        assert_eq!(tanh_int16(0, r), 0);
        assert_eq!(logistic_int16(32767, r), 32767);
        assert_eq!(logistic_int16(-32768, r), 1);
        assert_eq!(tanh_int16(32767, r), 32767);
        assert_eq!(tanh_int16(-32768, r), -32767);
        for x in [1i16, 100, 1000, 5000] {
            let (p, n) = (logistic_int16(x, r) as i32, logistic_int16(-x, r) as i32);
            assert!((p + n - 32768).abs() <= 1, "{x}: {p} {n}");
            let want = 32768.0 / (1.0 + (-(x as f64) * 1e-3).exp());
            assert!((p as f64 - want).abs() < 8.0, "{x}: {p} vs {want}");
            let t = tanh_int16(x, r) as f64;
            assert!(
                (t - 32768.0 * (x as f64 * 1e-3).tanh()).abs() < 16.0,
                "{x}: {t}"
            );
        }
    }

    #[test]
    fn mean_multiplier_folds_the_count() {
        let (q, s) = quantize_multiplier(0.8);
        let (q2, s2) = mean_multiplier(q, s, 12);
        let m = q2 as f64 * 2f64.powi(s2 - 31);
        assert!((m - 0.8 / 12.0).abs() < 1e-9, "{m}");
        assert_eq!(mean_multiplier(q, s, 1), (q, s));
    }

    #[test]
    fn lut_matches_direct_evaluation() {
        let lut = lut_int8(0.05, 3, 1.0 / 128.0, 0, f32::tanh);
        for v in -128i32..=127 {
            let want = ((0.05f32 * (v - 3) as f32).tanh() * 128.0)
                .round()
                .clamp(-128.0, 127.0);
            assert_eq!(lut[v as i8 as u8 as usize] as f32, want);
        }
        assert_eq!(
            preprocess_softmax_scaling(1.0, 0.5, 5),
            quantize_multiplier(0.5 * (1u64 << 26) as f64)
        );
        assert_eq!(calculate_input_radius(5, 20), ((31i64 << 26) >> 20) as i32);
    }

    #[test]
    fn dynamic_row_quantization() {
        // A symmetric range puts the zero point at exactly -0.5 in f64: -1.
        let r = asymmetric_quantize_floats(&[-0.25, 0.25, 0.1]);
        assert_eq!(r.offset, -1);
        assert_eq!(r.scale, (0.5f32 as f64 / 255.0) as f32);
        let inv = 1.0 / r.scale;
        let q = |v: f32| ((v * inv).round() as i32 - 1).clamp(-128, 127) as i8;
        assert_eq!(r.q, vec![-128, q(0.25), q(0.1)]);
        // Rounded before the offset is added: 0.5 * inv rounds away from zero.
        let r = asymmetric_quantize_floats(&[0.0, 2.55]);
        assert_eq!((r.offset, r.q.clone()), (-128, vec![-128, 127]));
        for f in [asymmetric_quantize_floats, symmetric_quantize_floats] {
            let z = f(&[0.0, 0.0]);
            assert_eq!((z.q, z.scale, z.offset), (vec![0, 0], 1.0, 0));
        }
        // XNNPACK's formula puts an all-zero row at zero point 127: still 0.0.
        let z = xnn_dynamic_quantize(&[0.0, 0.0]);
        assert_eq!((z.q, z.scale, z.offset), (vec![127, 127], 1.0, 127));
        let s = symmetric_quantize_floats(&[-1.27, 0.5]);
        assert_eq!((s.q.clone(), s.scale), (vec![-127, 50], 1.27f32 / 127.0));
        // XNNPACK: the zero point rounds half to even, values too.
        let x = xnn_dynamic_quantize(&[-1.0, 1.0]);
        assert_eq!(x.offset, 0);
        assert_eq!(x.q, vec![-128, 127]);
        assert_eq!(x.scale, 1.0 / (255.0f32 / 2.0));
    }

    #[test]
    fn hybrid_scalings_round_where_their_kernels_do() {
        let (acc, s, w, b) = (12345, 0.0123f32, 0.00456f32, 0.1f32);
        assert_eq!(
            hybrid_dequantize(acc, s, w, b, HybridScaling::AccTimesWeightFirst),
            acc as f32 * w * s + b
        );
        assert_eq!(
            hybrid_dequantize(acc, s, w, b, HybridScaling::AccTimesProduct),
            acc as f32 * (s * w) + b
        );
        assert_eq!(
            hybrid_dequantize(acc, s, w, b, HybridScaling::XnnFma),
            ((acc as f32 * s) as f64 * w as f64 + b as f64) as f32
        );
    }
}

/// The fixed-point parameters of LiteRT's int8 HARD_SWISH (`HardSwishPrepare` in
/// `kernels/activations.cc`): the input on a 2^-7 finer "hires" scale, its
/// multiplier to the output scale and to the "reluish" scale on which 3.0 is 2^15,
/// each a Q15 multiplier with an exponent. The ratios are computed in f32 and then
/// split like any multiplier (`QuantizeMultiplier` in f64, then rounded to 16 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HardSwishParams {
    pub input_zero_point: i32,
    pub output_zero_point: i32,
    pub output_multiplier: i16,
    pub output_exponent: i32,
    pub reluish_multiplier: i16,
    pub reluish_exponent: i32,
}

/// `DownScaleInt32ToInt16Multiplier`: a Q31 multiplier rounded to Q15.
fn down_scale_to_i16(m: i32) -> i16 {
    const OFFSET: i32 = 1 << 15;
    if m >= i32::MAX - OFFSET {
        return i16::MAX;
    }
    ((m + OFFSET) >> 16) as i16
}

impl HardSwishParams {
    /// `None` when the output scale is so much smaller than the input's that the
    /// output multiplier would need a left shift (LiteRT refuses such a model).
    pub fn new(
        in_scale: f32,
        in_zero_point: i32,
        out_scale: f32,
        out_zero_point: i32,
    ) -> Option<HardSwishParams> {
        let hires = (1.0f32 / 128.0) * in_scale;
        let reluish_scale = 3.0f32 / 32768.0;
        let (om, oe) = quantize_multiplier((hires / out_scale) as f64);
        let (rm, re) = quantize_multiplier((hires / reluish_scale) as f64);
        (oe <= 0).then_some(HardSwishParams {
            input_zero_point: in_zero_point,
            output_zero_point: out_zero_point,
            output_multiplier: down_scale_to_i16(om),
            output_exponent: oe,
            reluish_multiplier: down_scale_to_i16(rm),
            reluish_exponent: re,
        })
    }
}

/// gemmlowp's 16-bit `SaturatingRoundingDoublingHighMul`.
fn srdhm_i16(a: i16, b: i16) -> i16 {
    if a == i16::MIN && b == i16::MIN {
        return i16::MAX;
    }
    let ab = a as i32 * b as i32;
    let nudge = if ab >= 0 { 1 << 14 } else { 1 - (1 << 14) };
    ((ab + nudge) / (1 << 15)) as i16
}

/// The reference kernel's `SaturatingDoublingHighMul`: like [`srdhm_i16`] but
/// truncating toward zero.
fn sdhm_i16(a: i16, b: i16) -> i16 {
    if a == i16::MIN && b == i16::MIN {
        return i16::MAX;
    }
    ((a as i32 * b as i32) / (1 << 15)) as i16
}

fn saturating_left_shift_i16(v: i16, amount: i32) -> i16 {
    let r = (v as i64) * (1i64 << amount.clamp(0, 31));
    r.clamp(i16::MIN as i64, i16::MAX as i64) as i16
}

fn rounding_divide_by_pot_i16(x: i16, exponent: i32) -> i16 {
    rounding_divide_by_pot(x as i32, exponent.clamp(0, 31)) as i16
}

/// One element of LiteRT's reference int8 HARD_SWISH
/// (`reference_ops::HardSwish<int8_t>` in `reference/hard_swish.h`).
pub fn hard_swish_int8(q: i8, p: &HardSwishParams) -> i8 {
    let input = (q as i32 - p.input_zero_point) as i16;
    let hires = input.wrapping_mul(1 << 7);
    let preshift_out = srdhm_i16(hires, p.output_multiplier);
    let mut reluish = hires;
    if p.reluish_exponent > 0 {
        reluish = saturating_left_shift_i16(reluish, p.reluish_exponent - 1);
    }
    reluish = srdhm_i16(reluish, p.reluish_multiplier);
    if p.reluish_exponent > 0 {
        reluish = saturating_left_shift_i16(reluish, 1);
    }
    if p.reluish_exponent < 0 {
        reluish = rounding_divide_by_pot_i16(reluish, -p.reluish_exponent);
    }
    let reluish = ((reluish as i32 + (1 << 15)) >> 1) as i16;
    let pre = sdhm_i16(reluish, preshift_out);
    let out = rounding_divide_by_pot_i16(pre, -p.output_exponent) as i32 + p.output_zero_point;
    out.clamp(-128, 127) as i8
}

/// The per-channel multipliers of a convolution's or fully connected op's
/// requantization.
#[derive(Debug, Clone)]
pub enum ChannelMultipliers {
    /// [`multiply_by_quantized_multiplier`] with `(q, shift)` per channel.
    Quantized(Vec<(i32, i32)>, Rounding),
    /// [`requantize_in_double`] (the reference FULLY_CONNECTED).
    Double(Vec<f64>),
    /// [`requantize_fp32`] (XNNPACK).
    Fp32(Vec<f32>),
}

/// Requantizes rows of i32 accumulators (one value per output channel, bias not yet
/// added) to int8, clamped to `[lo, hi]`. [`RowRequantizer::row`] runs eight channels
/// per AVX2 instruction sequence when the parameters allow it and gives the bits of
/// [`RowRequantizer::apply`], the element-wise functions above, on every input
/// (tests below compare them on random and rounding-boundary inputs).
#[derive(Debug, Clone)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // the vector fields
pub struct RowRequantizer {
    mult: ChannelMultipliers,
    zero_point: i32,
    lo: i32,
    hi: i32,
    /// Whether every channel's parameters fit the vector path.
    vector: bool,
    /// For `Quantized` on the vector path, per channel: the left shift, `q`, the
    /// right shift, its mask and its mask / 2.
    left: Vec<i32>,
    q: Vec<i32>,
    right: Vec<i32>,
    mask: Vec<i32>,
    half: Vec<i32>,
    /// Whether some `left` is not 0.
    any_left: bool,
    /// Whether the register-block form may fold gemmlowp's two roundings and the
    /// zero point into one 64-bit shift (`rounding/block.rs`): no left shifts, every
    /// right shift at least 1, and `(|zero_point| + 1) · 2^(31 + right)` below 2^62.
    fold: bool,
}

/// Bounds within which the vector paths may clamp early (zero points, activation
/// bounds): any accumulator beyond ±2^24 then lands on the same bound.
const ROW_BOUND: i32 = 1 << 20;

impl RowRequantizer {
    pub fn new(mult: ChannelMultipliers, zero_point: i32, lo: i32, hi: i32) -> RowRequantizer {
        let small = |v: i32| (-ROW_BOUND..=ROW_BOUND).contains(&v);
        let bounds = small(zero_point) && small(lo) && small(hi) && lo <= hi;
        let (mut left, mut q, mut right, mut mask, mut half) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let vector = bounds
            && match &mult {
                ChannelMultipliers::Quantized(m, rounding) => {
                    *rounding == Rounding::Double
                        && m.iter()
                            .all(|&(qq, s)| qq != i32::MIN && (-31..=31).contains(&s))
                }
                ChannelMultipliers::Double(m) => m.iter().all(|v| v.is_finite()),
                ChannelMultipliers::Fp32(m) => m.iter().all(|v| v.is_finite()),
            };
        if let (true, ChannelMultipliers::Quantized(m, _)) = (vector, &mult) {
            for &(qq, s) in m {
                let r = (-s).max(0);
                let mk = ((1i64 << r) - 1) as i32;
                left.push(s.max(0));
                q.push(qq);
                right.push(r);
                mask.push(mk);
                half.push(mk >> 1);
            }
        }
        let any_left = left.iter().any(|&l| l != 0);
        let fold = vector
            && !any_left
            && !right.is_empty()
            && right.iter().all(|&r| {
                (1..=30).contains(&r) && ((zero_point.unsigned_abs() as i64 + 1) << r) < 1 << 31
            });
        RowRequantizer {
            any_left,
            fold,
            mult,
            zero_point,
            lo,
            hi,
            vector,
            left,
            q,
            right,
            mask,
            half,
        }
    }

    /// The output of accumulator `acc` (bias included) on `channel`.
    #[inline]
    pub fn apply(&self, acc: i32, channel: usize) -> i8 {
        let v = match &self.mult {
            ChannelMultipliers::Quantized(m, rounding) => {
                let (q, s) = m[channel];
                multiply_by_quantized_multiplier(acc, q, s, *rounding).wrapping_add(self.zero_point)
            }
            ChannelMultipliers::Double(m) => {
                requantize_in_double(acc, m[channel]).saturating_add(self.zero_point)
            }
            ChannelMultipliers::Fp32(m) => {
                requantize_fp32(acc, m[channel], self.zero_point, self.lo, self.hi)
            }
        };
        v.clamp(self.lo, self.hi).clamp(-128, 127) as i8
    }

    /// [`RowRequantizer::row`] of each of the consecutive rows of `acc` and `out`
    /// (`bias` has one value per channel; `acc` and `out` a multiple of that).
    pub fn rows(&self, acc: &[i32], bias: &[i32], out: &mut [i8]) {
        let n = bias.len();
        assert!(
            acc.len() == out.len() && (n == 0 || out.len().is_multiple_of(n)),
            "requantize: row lengths differ"
        );
        if n == 0 {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if self.vector && n >= 8 && crate::kernels::simd::avx2() {
            // SAFETY: AVX2 is present; the lengths were checked above.
            unsafe { rows_x86::rows(self, acc, bias, out) };
            return;
        }
        for (a, o) in acc.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
            self.row(a, bias, o);
        }
    }

    /// `out[c] = apply(acc[c] + bias[c], c)` (wrapping add) for the channels of one
    /// row; `acc`, `bias` and `out` have one value per channel.
    pub fn row(&self, acc: &[i32], bias: &[i32], out: &mut [i8]) {
        let n = out.len();
        assert!(
            acc.len() == n && bias.len() == n,
            "requantize: row lengths differ"
        );
        #[allow(unused_mut)]
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if self.vector && n >= 8 && crate::kernels::simd::avx2() {
            // SAFETY: AVX2 is present; the lengths were checked above.
            done = unsafe { row_x86::row(self, acc, bias, out) };
        }
        for c in done..n {
            out[c] = self.apply(acc[c].wrapping_add(bias[c]), c);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod row_x86 {
    use super::{ChannelMultipliers, RowRequantizer};
    use std::arch::x86_64::*;

    /// gemmlowp's saturating rounding doubling high multiply for `b` other than
    /// `i32::MIN`: `(a·b + nudge) / 2^31` truncated equals `⌊(a·b + 2^30) / 2^31⌋`
    /// for either sign, whose low 32 bits a logical 64-bit shift gives.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn srdhm(a: __m256i, b: __m256i) -> __m256i {
        let round = _mm256_set1_epi64x(1 << 30);
        let even = _mm256_add_epi64(_mm256_mul_epi32(a, b), round);
        let odd = _mm256_add_epi64(
            _mm256_mul_epi32(_mm256_srli_epi64::<32>(a), _mm256_srli_epi64::<32>(b)),
            round,
        );
        let even = _mm256_srli_epi64::<31>(even);
        let odd = _mm256_slli_epi64::<32>(_mm256_srli_epi64::<31>(odd));
        _mm256_blend_epi32::<0b1010_1010>(even, odd)
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load(p: &[i32], c: usize) -> __m256i {
        _mm256_loadu_si256(p.as_ptr().add(c) as *const __m256i)
    }

    /// Clamps to `[lo, hi]` and to int8 and stores eight bytes.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn store8(v: __m256i, lo: __m256i, hi: __m256i, out: *mut i8) {
        // The packs saturate to i16, then to int8: together the clamp to int8.
        let v = _mm256_min_epi32(_mm256_max_epi32(v, lo), hi);
        let w = _mm256_permute4x64_epi64::<0b1000>(_mm256_packs_epi32(v, v));
        let b = _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_castsi256_si128(w));
        _mm_storel_epi64(out as *mut __m128i, b);
    }

    /// The `Quantized` channels `[0, 16·⌊n/16⌋)` of [`RowRequantizer::row`] in
    /// 512-bit vectors, with the operations of the AVX2 loop below; returns how many.
    ///
    /// # Safety
    /// AVX-512F must be present, `r.vector` set with `Quantized` multipliers, and
    /// `acc`, `bias`, `out` of equal length.
    #[inline]
    #[target_feature(enable = "avx2,avx512f")]
    unsafe fn quantized_512(
        r: &RowRequantizer,
        acc: &[i32],
        bias: &[i32],
        out: &mut [i8],
    ) -> usize {
        let n = out.len() / 16 * 16;
        let ld = |p: &[i32], c: usize| _mm512_loadu_si512(p.as_ptr().add(c).cast());
        let zp = _mm512_set1_epi32(r.zero_point);
        let (lo, hi) = (_mm512_set1_epi32(r.lo), _mm512_set1_epi32(r.hi));
        let round = _mm512_set1_epi64(1 << 30);
        let one = _mm512_set1_epi32(1);
        for c in (0..n).step_by(16) {
            let x = _mm512_add_epi32(ld(acc, c), ld(bias, c));
            let a = _mm512_sllv_epi32(x, ld(&r.left, c));
            let b = ld(&r.q, c);
            // srdhm, as in the AVX2 version.
            let even = _mm512_add_epi64(_mm512_mul_epi32(a, b), round);
            let odd = _mm512_add_epi64(
                _mm512_mul_epi32(_mm512_srli_epi64::<32>(a), _mm512_srli_epi64::<32>(b)),
                round,
            );
            let even = _mm512_srli_epi64::<31>(even);
            let odd = _mm512_slli_epi64::<32>(_mm512_srli_epi64::<31>(odd));
            let x = _mm512_mask_blend_epi32(0xaaaa, even, odd);
            let rem = _mm512_and_si512(x, ld(&r.mask, c));
            let negative = _mm512_srai_epi32::<31>(x);
            let threshold = _mm512_sub_epi32(ld(&r.half, c), negative);
            let up = _mm512_cmpgt_epi32_mask(rem, threshold);
            let v = _mm512_srav_epi32(x, ld(&r.right, c));
            let v = _mm512_add_epi32(_mm512_mask_add_epi32(v, up, v, one), zp);
            let v = _mm512_min_epi32(_mm512_max_epi32(v, lo), hi);
            // Saturating to int8 is the clamp to int8.
            _mm_storeu_si128(
                out.as_mut_ptr().add(c) as *mut __m128i,
                _mm512_cvtsepi32_epi8(v),
            );
        }
        n
    }

    /// The channels `[0, 8·⌊n/8⌋)` of [`RowRequantizer::row`]; returns how many.
    ///
    /// # Safety
    /// AVX2 must be present, `r.vector` set, and `acc`, `bias`, `out` of equal length.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub unsafe fn row(r: &RowRequantizer, acc: &[i32], bias: &[i32], out: &mut [i8]) -> usize {
        let n = out.len() / 8 * 8;
        let zp = _mm256_set1_epi32(r.zero_point);
        let (lo, hi) = (_mm256_set1_epi32(r.lo), _mm256_set1_epi32(r.hi));
        let op = out.as_mut_ptr();
        match &r.mult {
            ChannelMultipliers::Quantized(..) => {
                let wide = if crate::kernels::simd::vnni() {
                    quantized_512(r, acc, bias, out)
                } else {
                    0
                };
                for c in (wide..n).step_by(8) {
                    let x = _mm256_add_epi32(load(acc, c), load(bias, c));
                    let x = _mm256_sllv_epi32(x, load(&r.left, c));
                    let x = srdhm(x, load(&r.q, c));
                    let (mask, e) = (load(&r.mask, c), load(&r.right, c));
                    let rem = _mm256_and_si256(x, mask);
                    let negative = _mm256_cmpgt_epi32(_mm256_setzero_si256(), x);
                    let threshold = _mm256_sub_epi32(load(&r.half, c), negative);
                    let up = _mm256_cmpgt_epi32(rem, threshold);
                    let v = _mm256_sub_epi32(_mm256_srav_epi32(x, e), up);
                    store8(_mm256_add_epi32(v, zp), lo, hi, op.add(c));
                }
            }
            ChannelMultipliers::Double(m) => {
                let bound = _mm256_set1_pd((1 << 24) as f64);
                let neg_bound = _mm256_set1_pd(-((1 << 24) as f64));
                let (half, one) = (_mm256_set1_pd(0.5), _mm256_set1_pd(1.0));
                let round = |x: __m128i, mp: *const f64| {
                    let v = _mm256_mul_pd(_mm256_cvtepi32_pd(x), _mm256_loadu_pd(mp));
                    let t = _mm256_round_pd::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
                    let f = _mm256_sub_pd(v, t);
                    let up = _mm256_and_pd(_mm256_cmp_pd::<_CMP_GE_OQ>(f, half), one);
                    let down = _mm256_and_pd(
                        _mm256_cmp_pd::<_CMP_LE_OQ>(f, _mm256_sub_pd(_mm256_setzero_pd(), half)),
                        one,
                    );
                    let v = _mm256_sub_pd(_mm256_add_pd(t, up), down);
                    _mm256_cvtpd_epi32(_mm256_min_pd(_mm256_max_pd(v, neg_bound), bound))
                };
                for c in (0..n).step_by(8) {
                    let x = _mm256_add_epi32(load(acc, c), load(bias, c));
                    let a = round(_mm256_castsi256_si128(x), m.as_ptr().add(c));
                    let b = round(_mm256_extracti128_si256::<1>(x), m.as_ptr().add(c + 4));
                    let v = _mm256_set_m128i(b, a);
                    store8(_mm256_add_epi32(v, zp), lo, hi, op.add(c));
                }
            }
            ChannelMultipliers::Fp32(m) => {
                let flo = _mm256_set1_ps((r.lo - r.zero_point) as f32);
                let fhi = _mm256_set1_ps((r.hi - r.zero_point) as f32);
                for c in (0..n).step_by(8) {
                    let x = _mm256_add_epi32(load(acc, c), load(bias, c));
                    let v =
                        _mm256_mul_ps(_mm256_cvtepi32_ps(x), _mm256_loadu_ps(m.as_ptr().add(c)));
                    let v = _mm256_min_ps(_mm256_max_ps(v, flo), fhi);
                    let v = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
                    store8(
                        _mm256_add_epi32(_mm256_cvtps_epi32(v), zp),
                        lo,
                        hi,
                        op.add(c),
                    );
                }
            }
        }
        n
    }
}

#[cfg(target_arch = "x86_64")]
mod rows_x86 {
    use super::{row_x86, RowRequantizer};

    /// [`RowRequantizer::rows`] in one call, so that short rows (few channels) do
    /// not pay a call and the feature checks per row.
    ///
    /// # Safety
    /// AVX2 must be present, `r.vector` set, `bias` at least 8 long and `acc`, `out`
    /// of equal lengths, a multiple of `bias.len()`.
    #[target_feature(enable = "avx2")]
    pub unsafe fn rows(r: &RowRequantizer, acc: &[i32], bias: &[i32], out: &mut [i8]) {
        let n = bias.len();
        for (a, o) in acc.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
            let done = row_x86::row(r, a, bias, o);
            for c in done..n {
                o[c] = r.apply(a[c].wrapping_add(bias[c]), c);
            }
        }
    }
}

#[cfg(test)]
mod row_tests {
    use super::*;

    pub(super) fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        }
    }

    /// Accumulators that hit the rounding boundaries of `shift` (halves and their
    /// neighbours) and the extremes, then random ones.
    pub(super) fn accumulators(next: &mut impl FnMut() -> u64, n: usize) -> Vec<i32> {
        let mut v = vec![
            0,
            1,
            -1,
            2,
            -2,
            3,
            -3,
            i32::MAX,
            i32::MIN,
            i32::MAX - 1,
            i32::MIN + 1,
        ];
        for e in 0..31 {
            let h = 1i64 << e;
            for k in [-3i64, -1, 0, 1, 2] {
                for d in [-1i64, 0, 1] {
                    v.push((k * 2 * h + h + d).clamp(i32::MIN as i64, i32::MAX as i64) as i32);
                }
            }
        }
        while v.len() < n {
            let r = next();
            let bits = (r >> 40) % 32;
            v.push((r as u32 as i32) >> bits);
        }
        v
    }

    fn check(mult: ChannelMultipliers, channels: usize, zp: i32, lo: i32, hi: i32, accs: &[i32]) {
        let r = RowRequantizer::new(mult, zp, lo, hi);
        let bias: Vec<i32> = (0..channels as i32)
            .map(|c| (c * 7919) % 301 - 150)
            .collect();
        let mut out = vec![0i8; channels];
        for chunk in accs.chunks(channels) {
            if chunk.len() < channels {
                break;
            }
            r.row(chunk, &bias, &mut out);
            for c in 0..channels {
                let want = r.apply(chunk[c].wrapping_add(bias[c]), c);
                assert_eq!(out[c], want, "{:?} acc {} channel {c}", r.mult, chunk[c]);
            }
        }
    }

    #[test]
    fn vector_rows_equal_the_scalar_requantization() {
        let mut next = rng(0x9e37_79b9_7f4a_7c15);
        let channels = 27; // three vectors and a tail
        let accs = accumulators(&mut next, 40_000);
        let reals = |next: &mut dyn FnMut() -> u64| -> Vec<f64> {
            let mut m = vec![0.5, 0.25, 1.0, 0.0, 2.0, 1.5, 0.75, 1e-9, 3.0e-10, 1234.5];
            while m.len() < channels {
                let exp = (next() % 40) as i32 - 30;
                m.push((1.0 + (next() % 1_000_000) as f64 / 1e6) * 2f64.powi(exp));
            }
            m
        };
        for (zp, lo, hi) in [
            (0, -128, 127),
            (-128, -128, 127),
            (5, -3, 100),
            (127, 127, 127),
        ] {
            let m = reals(&mut next);
            let q: Vec<(i32, i32)> = m.iter().map(|&v| quantize_multiplier(v)).collect();
            check(
                ChannelMultipliers::Quantized(q, Rounding::Double),
                channels,
                zp,
                lo,
                hi,
                &accs,
            );
            check(
                ChannelMultipliers::Double(m.clone()),
                channels,
                zp,
                lo,
                hi,
                &accs,
            );
            let f: Vec<f32> = m.iter().map(|&v| v as f32).collect();
            check(ChannelMultipliers::Fp32(f), channels, zp, lo, hi, &accs);
        }
        // Parameters outside the vector path's range still requantize (element-wise).
        let wide = vec![(1 << 30, -31); channels];
        check(
            ChannelMultipliers::Quantized(wide, Rounding::Single),
            channels,
            0,
            -128,
            127,
            &accs,
        );
        let odd = vec![f32::INFINITY; channels];
        check(ChannelMultipliers::Fp32(odd), channels, 3, -128, 127, &accs);
    }

    #[test]
    fn rows_equal_row_by_row() {
        let mut next = rng(0x1234_5678_9abc_def1);
        let accs = accumulators(&mut next, 27 * 200);
        for channels in [8usize, 13, 27] {
            let m: Vec<(i32, i32)> = (0..channels)
                .map(|c| quantize_multiplier(0.0007 * (c + 1) as f64))
                .collect();
            let r = RowRequantizer::new(
                ChannelMultipliers::Quantized(m, Rounding::Double),
                -7,
                -128,
                127,
            );
            let bias: Vec<i32> = (0..channels as i32).map(|c| c * 31 - 200).collect();
            let len = accs.len() / channels * channels;
            let mut all = vec![0i8; len];
            r.rows(&accs[..len], &bias, &mut all);
            for (a, o) in accs[..len].chunks(channels).zip(all.chunks(channels)) {
                for c in 0..channels {
                    assert_eq!(o[c], r.apply(a[c].wrapping_add(bias[c]), c));
                }
            }
        }
    }

    #[test]
    fn vector_path_is_taken_for_ordinary_parameters() {
        let q = vec![quantize_multiplier(0.003); 16];
        assert!(
            RowRequantizer::new(
                ChannelMultipliers::Quantized(q, Rounding::Double),
                -5,
                -128,
                127
            )
            .vector
        );
        assert!(
            !RowRequantizer::new(ChannelMultipliers::Fp32(vec![f32::NAN; 8]), 0, -128, 127).vector
        );
    }
}

/// RESIZE_BILINEAR's int8 interpolation (`ResizeBilinearInteger`): a sum in
/// 2^20 fixed point back to an integer, half away from zero (`(x ± 2^19) / 2^20`,
/// C++ division toward zero).
pub fn round_shift_20_half_away(x: i64) -> i64 {
    let round = if x > 0 { 1 << 19 } else { -(1 << 19) };
    (x + round) / (1 << 20)
}

/// The smallest and largest value of a row, NaN skipped (`(inf, -inf)` when every
/// value is NaN or the row is empty): the fold `if v < a { v } else { a }` (and `>`
/// for the largest). On AVX2 eight lanes fold at once with `vminps`/`vmaxps`, which
/// keep the accumulator when either operand is NaN, exactly as the fold does; the
/// order only changes which zero of ±0 wins, which no caller can tell (they widen the
/// range to contain 0.0, or take absolute values).
pub fn row_min_max(values: &[f32]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if values.len() >= 32 && crate::kernels::simd::avx512() {
        // SAFETY: AVX-512F is present.
        return unsafe { hybrid_x86::min_max512(values) };
    }
    #[cfg(target_arch = "x86_64")]
    if values.len() >= 16 && crate::kernels::simd::avx2() {
        // SAFETY: AVX2 is present.
        return unsafe { hybrid_x86::min_max(values) };
    }
    min_max_scalar(values, f32::INFINITY, f32::NEG_INFINITY)
}

#[inline(always)]
fn min_max_scalar(values: &[f32], lo: f32, hi: f32) -> (f32, f32) {
    values.iter().fold((lo, hi), |(a, b), &v| {
        (if v < a { v } else { a }, if v > b { v } else { b })
    })
}

/// `clamp(round(v · m) as i32 + offset, lo, hi)` into `out` for each value, rounded
/// half to even (`even`) or half away from zero ([`round_half_away_f32`]); `as i32`
/// saturates (NaN gives 0) and the offset is added wrapping, as in a release build of
/// the scalar loop. On AVX2 eight values per step with the same bits: the product is
/// one `vmulps`; half to even is `vroundps`; half away from zero truncates and
/// compares the exact remainder with ±½; out-of-range and NaN products are then fixed
/// up to what the saturating cast gives.
pub fn scale_round_into(
    values: &[f32],
    m: f32,
    offset: i32,
    (lo, hi): (i32, i32),
    even: bool,
    out: &mut [i8],
) {
    assert_eq!(values.len(), out.len(), "scale_round_into: lengths differ");
    #[allow(unused_mut)]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::simd::avx2() && (-128..=127).contains(&lo) && (-128..=127).contains(&hi) {
        if crate::kernels::simd::avx512() {
            // SAFETY: AVX-512F is present; the lengths are equal.
            done = unsafe { hybrid_x86::scale_round512(values, m, offset, lo, hi, even, out) };
        }
        // SAFETY: AVX2 is present; the lengths are equal.
        done += unsafe {
            hybrid_x86::scale_round(&values[done..], m, offset, lo, hi, even, &mut out[done..])
        };
    }
    for (o, &v) in out[done..].iter_mut().zip(&values[done..]) {
        let r = if even {
            round_half_even_f32(v * m)
        } else {
            round_half_away_f32(v * m)
        };
        *o = (r as i32).wrapping_add(offset).clamp(lo, hi) as i8;
    }
}

/// `v.max(lo).min(hi)` when `bounds` is `Some((lo, hi))` (TFLite's
/// `ActivationFunctionWithMinMax`: a NaN `v` becomes `lo`), else `v`.
#[inline(always)]
pub fn clamp_activation(v: f32, bounds: Option<(f32, f32)>) -> f32 {
    match bounds {
        Some((lo, hi)) => v.max(lo).min(hi),
        None => v,
    }
}

/// `out[c] = clamp_activation(hybrid_dequantize(acc[c], in_scale, ws[c], bias[c],
/// how), bounds)` for one output pixel's or batch row's channels. On AVX2 (and FMA
/// for [`HybridScaling::XnnFma`]) eight channels per step, each product and sum
/// rounded where the scalar expression rounds it (one fused multiply-add for
/// `XnnFma`, as `f32::mul_add`), the clamp with `vmaxps`/`vminps` ordered as the
/// compiler orders `f32::max`/`min` (ties give `v`, a NaN gives the bound): the same
/// bits.
pub fn hybrid_dequantize_row(
    acc: &[i32],
    in_scale: f32,
    ws: &[f32],
    bias: &[f32],
    how: HybridScaling,
    bounds: Option<(f32, f32)>,
    out: &mut [f32],
) {
    let n = out.len();
    assert!(
        acc.len() == n && ws.len() == n && bias.len() == n,
        "hybrid_dequantize_row: lengths differ"
    );
    #[allow(unused_mut)]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if n >= 16 && how != HybridScaling::XnnFma && crate::kernels::simd::avx512() {
        // SAFETY: AVX-512F is present; the lengths are equal.
        done = unsafe { hybrid_x86::dequantize512(acc, in_scale, ws, bias, how, bounds, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if n - done >= 8 && crate::kernels::simd::avx2() {
        let (acc, ws, bias, out) = (&acc[done..], &ws[done..], &bias[done..], &mut out[done..]);
        // SAFETY: AVX2 and FMA are present (`simd::avx2` checks both); the lengths are
        // equal.
        done += unsafe {
            match how {
                HybridScaling::XnnFma => {
                    hybrid_x86::dequantize_fma(acc, in_scale, ws, bias, bounds, out)
                }
                _ => hybrid_x86::dequantize(acc, in_scale, ws, bias, how, bounds, out),
            }
        };
    }
    for c in done..n {
        let v = hybrid_dequantize(acc[c], in_scale, ws[c], bias[c], how);
        out[c] = clamp_activation(v, bounds);
    }
}

/// [`hybrid_dequantize_row`] on each of the consecutive rows of `ws.len()` channels
/// in `acc` and `out` (the output pixels of one image, which share `in_scale`), in
/// one call rather than one per pixel: the same bits.
pub fn hybrid_dequantize_rows(
    acc: &[i32],
    in_scale: f32,
    ws: &[f32],
    bias: &[f32],
    how: HybridScaling,
    bounds: Option<(f32, f32)>,
    out: &mut [f32],
) {
    let n = ws.len();
    assert!(
        acc.len() == out.len() && bias.len() == n && out.len().is_multiple_of(n),
        "hybrid_dequantize_rows: lengths differ"
    );
    if n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if n.is_multiple_of(8) && crate::kernels::simd::avx2() {
        // SAFETY: AVX2 and FMA are present (`simd::avx2` checks both); the rows are
        // whole vectors.
        let done = unsafe {
            match how {
                HybridScaling::XnnFma => {
                    hybrid_x86::dequantize_fma_rows(acc, in_scale, ws, bias, bounds, out)
                }
                _ => hybrid_x86::dequantize_rows(acc, in_scale, ws, bias, how, bounds, out),
            }
        };
        if done {
            return;
        }
    }
    for (a, o) in acc.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        hybrid_dequantize_row(a, in_scale, ws, bias, how, bounds, o);
    }
}

/// [`hybrid_dequantize_rows`] into memory not yet initialized, all of which it
/// writes (without first clearing it where AVX-512F is present: the outputs of a
/// hybrid layer are large and the pass over them is bound by memory).
pub fn hybrid_dequantize_rows_uninit(
    acc: &[i32],
    in_scale: f32,
    ws: &[f32],
    bias: &[f32],
    how: HybridScaling,
    bounds: Option<(f32, f32)>,
    out: &mut [std::mem::MaybeUninit<f32>],
) {
    let n = ws.len();
    assert!(
        acc.len() == out.len() && bias.len() == n && (n == 0 || out.len().is_multiple_of(n)),
        "hybrid_dequantize_rows: lengths differ"
    );
    #[cfg(target_arch = "x86_64")]
    if n > 0 && crate::kernels::simd::avx512() {
        // SAFETY: AVX-512F and FMA are present (`simd::avx512` implies `simd::avx2`);
        // the rows are whole (checked above).
        unsafe { hybrid_x86::dequantize512_rows(acc, in_scale, ws, bias, how, bounds, out) };
        return;
    }
    for v in out.iter_mut() {
        v.write(0.0);
    }
    // SAFETY: every element was initialized just above.
    let out = unsafe { &mut *(out as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) };
    hybrid_dequantize_rows(acc, in_scale, ws, bias, how, bounds, out);
}

#[cfg(target_arch = "x86_64")]
mod hybrid_x86 {
    use super::HybridScaling;
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX2 must be present.
    #[target_feature(enable = "avx2")]
    pub unsafe fn min_max(values: &[f32]) -> (f32, f32) {
        let mut lo = _mm256_set1_ps(f32::INFINITY);
        let mut hi = _mm256_set1_ps(f32::NEG_INFINITY);
        let chunks = values.chunks_exact(8);
        let rest = chunks.remainder();
        for c in chunks {
            let v = _mm256_loadu_ps(c.as_ptr());
            // `vminps a, b` is `a < b ? a : b`: b (the accumulator) when either is NaN.
            lo = _mm256_min_ps(v, lo);
            hi = _mm256_max_ps(v, hi);
        }
        let (mut l, mut h) = ([0f32; 8], [0f32; 8]);
        _mm256_storeu_ps(l.as_mut_ptr(), lo);
        _mm256_storeu_ps(h.as_mut_ptr(), hi);
        let (a, _) = super::min_max_scalar(&l, f32::INFINITY, f32::NEG_INFINITY);
        let (_, b) = super::min_max_scalar(&h, f32::INFINITY, f32::NEG_INFINITY);
        super::min_max_scalar(rest, a, b)
    }

    /// Returns how many values it wrote (a multiple of 8); the caller does the rest.
    ///
    /// # Safety
    /// AVX2 must be present; `out` as long as `values`; `lo`, `hi` within int8.
    #[target_feature(enable = "avx2")]
    pub unsafe fn scale_round(
        values: &[f32],
        m: f32,
        offset: i32,
        lo: i32,
        hi: i32,
        even: bool,
        out: &mut [i8],
    ) -> usize {
        let n = values.len().min(out.len());
        let mv = _mm256_set1_ps(m);
        let off = _mm256_set1_epi32(offset);
        let (lov, hiv) = (_mm256_set1_epi32(lo), _mm256_set1_epi32(hi));
        let (half, mhalf) = (_mm256_set1_ps(0.5), _mm256_set1_ps(-0.5));
        let two31 = _mm256_set1_ps(2_147_483_648.0);
        let m_two31 = _mm256_set1_ps(-2_147_483_648.0);
        let (imax, imin) = (_mm256_set1_epi32(i32::MAX), _mm256_set1_epi32(i32::MIN));
        let mut i = 0;
        while i + 8 <= n {
            let x = _mm256_mul_ps(_mm256_loadu_ps(values.as_ptr().add(i)), mv);
            let q = if even {
                let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
                _mm256_cvttps_epi32(r)
            } else {
                // Below 2^31 in magnitude `x - trunc(x)` is exact (see
                // `round_half_away_f32`), and from 2^23 on it is 0.
                let t = _mm256_cvttps_epi32(x);
                let f = _mm256_sub_ps(x, _mm256_cvtepi32_ps(t));
                let up = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GE_OQ>(f, half));
                let down = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LE_OQ>(f, mhalf));
                _mm256_add_epi32(_mm256_sub_epi32(t, up), down)
            };
            // The saturating `as i32`: NaN → 0, ≥ 2^31 → MAX, < -2^31 → MIN.
            let big = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GE_OQ>(x, two31));
            let small = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(x, m_two31));
            let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(x, x));
            let q = _mm256_blendv_epi8(q, imax, big);
            let q = _mm256_blendv_epi8(q, imin, small);
            let q = _mm256_andnot_si256(nan, q);
            let q = _mm256_add_epi32(q, off);
            let q = _mm256_min_epi32(_mm256_max_epi32(q, lov), hiv);
            let w = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256::<1>(q));
            let b = _mm_packs_epi16(w, w);
            _mm_storel_epi64(out.as_mut_ptr().add(i) as *mut __m128i, b);
            i += 8;
        }
        i
    }

    /// [`min_max`] sixteen lanes at a time (`vminps`/`vmaxps` on 512 bits compare the
    /// same way).
    ///
    /// # Safety
    /// AVX-512F must be present.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn min_max512(values: &[f32]) -> (f32, f32) {
        let mut lo = _mm512_set1_ps(f32::INFINITY);
        let mut hi = _mm512_set1_ps(f32::NEG_INFINITY);
        let chunks = values.chunks_exact(16);
        let rest = chunks.remainder();
        for c in chunks {
            let v = _mm512_loadu_ps(c.as_ptr());
            lo = _mm512_min_ps(v, lo);
            hi = _mm512_max_ps(v, hi);
        }
        let (mut l, mut h) = ([0f32; 16], [0f32; 16]);
        _mm512_storeu_ps(l.as_mut_ptr(), lo);
        _mm512_storeu_ps(h.as_mut_ptr(), hi);
        let (a, _) = super::min_max_scalar(&l, f32::INFINITY, f32::NEG_INFINITY);
        let (_, b) = super::min_max_scalar(&h, f32::INFINITY, f32::NEG_INFINITY);
        super::min_max_scalar(rest, a, b)
    }

    /// [`scale_round`] sixteen values per step: the same product, rounding and
    /// fix-ups of the saturating cast, with the fix-ups as masked moves, and the
    /// clamped lanes narrowed by `vpmovsdb` (which changes nothing within int8).
    /// Returns how many values it wrote (a multiple of 16).
    ///
    /// # Safety
    /// AVX-512F must be present; `out` as long as `values`; `lo`, `hi` within int8.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn scale_round512(
        values: &[f32],
        m: f32,
        offset: i32,
        lo: i32,
        hi: i32,
        even: bool,
        out: &mut [i8],
    ) -> usize {
        let n = values.len().min(out.len());
        let mv = _mm512_set1_ps(m);
        let off = _mm512_set1_epi32(offset);
        let (lov, hiv) = (_mm512_set1_epi32(lo), _mm512_set1_epi32(hi));
        let (half, mhalf) = (_mm512_set1_ps(0.5), _mm512_set1_ps(-0.5));
        let one = _mm512_set1_epi32(1);
        let two31 = _mm512_set1_ps(2_147_483_648.0);
        let m_two31 = _mm512_set1_ps(-2_147_483_648.0);
        let (imax, imin) = (_mm512_set1_epi32(i32::MAX), _mm512_set1_epi32(i32::MIN));
        let lanes = |i: usize| {
            let x = _mm512_mul_ps(_mm512_loadu_ps(values.as_ptr().add(i)), mv);
            let q = if even {
                let r =
                    _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
                _mm512_cvttps_epi32(r)
            } else {
                // As in `scale_round`: the remainder is exact, compared with ±½.
                let t = _mm512_cvttps_epi32(x);
                let f = _mm512_sub_ps(x, _mm512_cvtepi32_ps(t));
                let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(f, half);
                let down = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(f, mhalf);
                let t = _mm512_mask_add_epi32(t, up, t, one);
                _mm512_mask_sub_epi32(t, down, t, one)
            };
            // The saturating `as i32`: NaN → 0, ≥ 2^31 → MAX, < -2^31 → MIN.
            let big = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, two31);
            let small = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, m_two31);
            let number = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(x, x);
            let q = _mm512_mask_mov_epi32(q, big, imax);
            let q = _mm512_mask_mov_epi32(q, small, imin);
            let q = _mm512_maskz_mov_epi32(number, q);
            let q = _mm512_add_epi32(q, off);
            _mm512_cvtsepi32_epi8(_mm512_min_epi32(_mm512_max_epi32(q, lov), hiv))
        };
        let mut i = 0;
        while i + 16 <= n {
            _mm_storeu_si128(out.as_mut_ptr().add(i) as *mut __m128i, lanes(i));
            i += 16;
        }
        i
    }

    /// `v.max(lo).min(hi)` as the compiler emits it for f32: `vmaxss lo, v` (ties
    /// give `v`) with a NaN `v` replaced by `lo`, then `vminss hi, ·` likewise.
    #[inline(always)]
    unsafe fn clamp(v: __m256, lo: __m256, hi: __m256) -> __m256 {
        let t = _mm256_blendv_ps(
            _mm256_max_ps(lo, v),
            lo,
            _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v),
        );
        _mm256_blendv_ps(
            _mm256_min_ps(hi, t),
            hi,
            _mm256_cmp_ps::<_CMP_UNORD_Q>(t, t),
        )
    }

    const WEIGHT_FIRST: u8 = 0;
    const PRODUCT: u8 = 1;
    const FMA: u8 = 2;

    /// Channels `[0, 8⌊n/8⌋)`; returns how many it wrote.
    #[inline(always)]
    unsafe fn dequantize_with<const HOW: u8>(
        acc: &[i32],
        in_scale: f32,
        ws: &[f32],
        bias: &[f32],
        bounds: Option<(f32, f32)>,
        out: &mut [f32],
    ) -> usize {
        let n = out.len();
        let s = _mm256_set1_ps(in_scale);
        let (lo, hi) = bounds.unwrap_or((0.0, 0.0));
        let (lov, hiv) = (_mm256_set1_ps(lo), _mm256_set1_ps(hi));
        let mut c = 0;
        while c + 8 <= n {
            let a = _mm256_cvtepi32_ps(_mm256_loadu_si256(acc.as_ptr().add(c) as *const __m256i));
            let w = _mm256_loadu_ps(ws.as_ptr().add(c));
            let b = _mm256_loadu_ps(bias.as_ptr().add(c));
            let mut v = match HOW {
                WEIGHT_FIRST => _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(a, w), s), b),
                PRODUCT => _mm256_add_ps(_mm256_mul_ps(a, _mm256_mul_ps(s, w)), b),
                _ => _mm256_fmadd_ps(_mm256_mul_ps(a, s), w, b),
            };
            if bounds.is_some() {
                v = clamp(v, lov, hiv);
            }
            _mm256_storeu_ps(out.as_mut_ptr().add(c), v);
            c += 8;
        }
        c
    }

    /// Returns how many channels it wrote (a multiple of 8).
    ///
    /// # Safety
    /// AVX2 must be present; `acc`, `ws` and `bias` as long as `out`.
    #[target_feature(enable = "avx2")]
    pub unsafe fn dequantize(
        acc: &[i32],
        in_scale: f32,
        ws: &[f32],
        bias: &[f32],
        how: HybridScaling,
        bounds: Option<(f32, f32)>,
        out: &mut [f32],
    ) -> usize {
        match how {
            HybridScaling::AccTimesWeightFirst => {
                dequantize_with::<WEIGHT_FIRST>(acc, in_scale, ws, bias, bounds, out)
            }
            HybridScaling::AccTimesProduct => {
                dequantize_with::<PRODUCT>(acc, in_scale, ws, bias, bounds, out)
            }
            HybridScaling::XnnFma => 0,
        }
    }

    /// [`dequantize`] sixteen channels at a time, with the same operations per lane
    /// (the clamp's NaN selection by mask); returns how many channels it wrote (a
    /// multiple of 16).
    ///
    /// # Safety
    /// AVX-512F must be present; `acc`, `ws` and `bias` as long as `out`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dequantize512(
        acc: &[i32],
        in_scale: f32,
        ws: &[f32],
        bias: &[f32],
        how: HybridScaling,
        bounds: Option<(f32, f32)>,
        out: &mut [f32],
    ) -> usize {
        let n = out.len();
        let k = Consts512::new(in_scale, bounds);
        let mut c = 0;
        while c + 16 <= n {
            let (a, w, b, o) = (acc.as_ptr(), ws.as_ptr(), bias.as_ptr(), out.as_mut_ptr());
            match how {
                HybridScaling::AccTimesProduct => {
                    vector512::<PRODUCT>(&k, !0, a.add(c), w.add(c), b.add(c), o.add(c))
                }
                HybridScaling::AccTimesWeightFirst => {
                    vector512::<WEIGHT_FIRST>(&k, !0, a.add(c), w.add(c), b.add(c), o.add(c))
                }
                HybridScaling::XnnFma => return c,
            }
            c += 16;
        }
        c
    }

    struct Consts512 {
        s: __m512,
        lo: __m512,
        hi: __m512,
        clamp: bool,
    }

    impl Consts512 {
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn new(in_scale: f32, bounds: Option<(f32, f32)>) -> Consts512 {
            let (lo, hi) = bounds.unwrap_or((0.0, 0.0));
            Consts512 {
                s: _mm512_set1_ps(in_scale),
                lo: _mm512_set1_ps(lo),
                hi: _mm512_set1_ps(hi),
                clamp: bounds.is_some(),
            }
        }
    }

    /// The lanes of `mask` of one vector of [`dequantize512`] (the others are
    /// neither read nor written).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn vector512<const HOW: u8>(
        k: &Consts512,
        mask: __mmask16,
        acc: *const i32,
        ws: *const f32,
        bias: *const f32,
        out: *mut f32,
    ) {
        let a = _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(mask, acc));
        let w = _mm512_maskz_loadu_ps(mask, ws);
        let b = _mm512_maskz_loadu_ps(mask, bias);
        let mut v = match HOW {
            WEIGHT_FIRST => _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(a, w), k.s), b),
            PRODUCT => _mm512_add_ps(_mm512_mul_ps(a, _mm512_mul_ps(k.s, w)), b),
            _ => _mm512_fmadd_ps(_mm512_mul_ps(a, k.s), w, b),
        };
        if k.clamp {
            // As `clamp`: `vmaxps lo, v` with a NaN `v` replaced by `lo`, then
            // `vminps hi, ·` likewise.
            let t = _mm512_max_ps(k.lo, v);
            let t = _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v), t, k.lo);
            let u = _mm512_min_ps(k.hi, t);
            v = _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_UNORD_Q>(t, t), u, k.hi);
        }
        _mm512_mask_storeu_ps(out, mask, v);
    }

    /// The dequantization of every row of `ws.len()` channels, sixteen at a time (the
    /// last vector of each row masked), into `out`, which it initializes.
    ///
    /// # Safety
    /// AVX-512F and FMA must be present; `bias` as long as `ws`, `acc` and `out`
    /// whole rows.
    #[target_feature(enable = "avx512f,fma")]
    pub unsafe fn dequantize512_rows(
        acc: &[i32],
        in_scale: f32,
        ws: &[f32],
        bias: &[f32],
        how: HybridScaling,
        bounds: Option<(f32, f32)>,
        out: &mut [std::mem::MaybeUninit<f32>],
    ) {
        match how {
            HybridScaling::AccTimesWeightFirst => {
                rows512::<WEIGHT_FIRST>(acc, in_scale, ws, bias, bounds, out)
            }
            HybridScaling::AccTimesProduct => {
                rows512::<PRODUCT>(acc, in_scale, ws, bias, bounds, out)
            }
            HybridScaling::XnnFma => rows512::<FMA>(acc, in_scale, ws, bias, bounds, out),
        }
    }

    #[inline(always)]
    unsafe fn rows512<const HOW: u8>(
        acc: &[i32],
        in_scale: f32,
        ws: &[f32],
        bias: &[f32],
        bounds: Option<(f32, f32)>,
        out: &mut [std::mem::MaybeUninit<f32>],
    ) {
        let n = ws.len();
        let k = Consts512::new(in_scale, bounds);
        let tail: __mmask16 = ((1u32 << (n % 16)) - 1) as __mmask16;
        let (w, b) = (ws.as_ptr(), bias.as_ptr());
        for (a, o) in acc.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
            let (a, o) = (a.as_ptr(), o.as_mut_ptr().cast::<f32>());
            let mut c = 0;
            while c + 16 <= n {
                vector512::<HOW>(&k, !0, a.add(c), w.add(c), b.add(c), o.add(c));
                c += 16;
            }
            if c < n {
                vector512::<HOW>(&k, tail, a.add(c), w.add(c), b.add(c), o.add(c));
            }
        }
    }

    /// `XnnFma`: `fma(acc * in_scale, w, bias)`; returns how many channels it wrote.
    ///
    /// # Safety
    /// AVX2 and FMA must be present; `acc`, `ws` and `bias` as long as `out`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dequantize_fma(
        acc: &[i32],
        in_scale: f32,
        ws: &[f32],
        bias: &[f32],
        bounds: Option<(f32, f32)>,
        out: &mut [f32],
    ) -> usize {
        dequantize_with::<FMA>(acc, in_scale, ws, bias, bounds, out)
    }

    /// [`dequantize_with`] on each row of `ws.len()` (a multiple of 8) channels.
    #[inline(always)]
    unsafe fn rows_with<const HOW: u8>(
        acc: &[i32],
        in_scale: f32,
        ws: &[f32],
        bias: &[f32],
        bounds: Option<(f32, f32)>,
        out: &mut [f32],
    ) {
        let n = ws.len();
        for (a, o) in acc.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
            dequantize_with::<HOW>(a, in_scale, ws, bias, bounds, o);
        }
    }

    /// Every row; `false` (nothing written) for `XnnFma`.
    ///
    /// # Safety
    /// AVX2 must be present; `ws.len()` a multiple of 8, `bias` as long, `acc` and
    /// `out` whole rows of it.
    #[target_feature(enable = "avx2")]
    pub unsafe fn dequantize_rows(
        acc: &[i32],
        in_scale: f32,
        ws: &[f32],
        bias: &[f32],
        how: HybridScaling,
        bounds: Option<(f32, f32)>,
        out: &mut [f32],
    ) -> bool {
        match how {
            HybridScaling::AccTimesWeightFirst => {
                rows_with::<WEIGHT_FIRST>(acc, in_scale, ws, bias, bounds, out)
            }
            HybridScaling::AccTimesProduct => {
                rows_with::<PRODUCT>(acc, in_scale, ws, bias, bounds, out)
            }
            HybridScaling::XnnFma => return false,
        }
        true
    }

    /// `XnnFma` on every row.
    ///
    /// # Safety
    /// AVX2 and FMA must be present; the lengths as for [`dequantize_rows`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dequantize_fma_rows(
        acc: &[i32],
        in_scale: f32,
        ws: &[f32],
        bias: &[f32],
        bounds: Option<(f32, f32)>,
        out: &mut [f32],
    ) -> bool {
        rows_with::<FMA>(acc, in_scale, ws, bias, bounds, out);
        true
    }
}

#[cfg(test)]
mod hybrid_row_tests {
    use super::*;

    /// Values around every rounding boundary of a few multipliers, plus the edges a
    /// saturating cast meets (NaN, ±inf, ±2^31, ±2^23, ±0).
    fn awkward(seed: &mut u32) -> Vec<f32> {
        let mut next = || {
            *seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            *seed
        };
        let mut v = vec![
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            2_147_483_648.0,
            -2_147_483_648.0,
            2_147_483_520.0,
            -2_147_483_904.0,
            8_388_608.0,
            -8_388_609.0,
            1e30,
            -1e30,
            f32::MIN_POSITIVE,
            -1e-45,
        ];
        for h in -300..300 {
            let x = h as f32 * 0.5;
            v.extend([
                x,
                f32::from_bits(x.to_bits() + 1),
                f32::from_bits(x.to_bits().wrapping_sub(1)),
            ]);
        }
        for _ in 0..2000 {
            v.push((next() as i32 as f32) / 2e7);
            v.push(f32::from_bits(next()));
        }
        v
    }

    #[test]
    fn scale_round_into_matches_the_scalar_expression() {
        let mut seed = 5;
        let values = awkward(&mut seed);
        for &m in &[1.0f32, 0.37, 3.0, 127.0 / 9.5, 1e-3, 0.0] {
            for &offset in &[0, -128, 127, 5, -17] {
                for &(lo, hi) in &[(-128, 127), (-127, 127)] {
                    for even in [false, true] {
                        let mut got = vec![0i8; values.len()];
                        scale_round_into(&values, m, offset, (lo, hi), even, &mut got);
                        // Each vector kernel alone (the dispatch takes the widest).
                        #[cfg(target_arch = "x86_64")]
                        for wide in [false, true] {
                            // Every byte differs from the answer until written.
                            let mut alone: Vec<i8> = got.iter().map(|&g| g ^ 1).collect();
                            let done = if !wide && crate::kernels::simd::avx2() {
                                // SAFETY: AVX2 is present; the lengths are equal.
                                unsafe {
                                    hybrid_x86::scale_round(
                                        &values, m, offset, lo, hi, even, &mut alone,
                                    )
                                }
                            } else if wide && crate::kernels::simd::avx512() {
                                // SAFETY: AVX-512F is present; the lengths are equal.
                                unsafe {
                                    hybrid_x86::scale_round512(
                                        &values, m, offset, lo, hi, even, &mut alone,
                                    )
                                }
                            } else {
                                0
                            };
                            assert_eq!(
                                alone[..done],
                                got[..done],
                                "wide {wide} m={m} offset={offset}"
                            );
                        }
                        for (i, (&v, &g)) in values.iter().zip(&got).enumerate() {
                            let r = if even {
                                (v * m).round_ties_even()
                            } else {
                                (v * m).round()
                            };
                            let want = (r as i32).wrapping_add(offset).clamp(lo, hi) as i8;
                            assert_eq!(g, want, "v={v:e} m={m} offset={offset} even={even} at {i}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn row_min_max_matches_the_fold() {
        let mut seed = 9;
        let all = awkward(&mut seed);
        for len in [0, 1, 7, 8, 15, 16, 17, 33, 100, all.len()] {
            for start in [0, 3, 16] {
                let v = &all[start.min(all.len())..(start + len).min(all.len())];
                let want = v
                    .iter()
                    .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| {
                        (if x < a { x } else { a }, if x > b { x } else { b })
                    });
                let got = row_min_max(v);
                // ±0 may differ (no caller can tell); every other value must not.
                assert!(
                    got.0 == want.0 && got.1 == want.1,
                    "{got:?} vs {want:?} len={len}"
                );
            }
        }
        let nans = [f32::NAN; 20];
        assert_eq!(row_min_max(&nans), (f32::INFINITY, f32::NEG_INFINITY));
    }

    #[test]
    fn hybrid_dequantize_row_matches_the_element_wise_function() {
        let mut seed = 3u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            seed
        };
        let n = 45;
        for round in 0..200 {
            let acc: Vec<i32> = (0..n)
                .map(|i| match (round + i) % 7 {
                    0 => 0,
                    1 => next() as i32,
                    _ => (next() as i32) >> 12,
                })
                .collect();
            let ws: Vec<f32> = (0..n)
                .map(|i| {
                    if i % 11 == 3 {
                        1e-40
                    } else {
                        (next() >> 8) as f32 * 1e-9
                    }
                })
                .collect();
            let bias: Vec<f32> = (0..n)
                .map(|i| match i % 9 {
                    0 => -0.0,
                    1 => f32::NAN,
                    2 => 6.0,
                    _ => (next() as i32) as f32 * 1e-9,
                })
                .collect();
            let in_scale = [0.013f32, 1.0, 3.7e-3, 1e-30][round % 4];
            for how in [
                HybridScaling::AccTimesWeightFirst,
                HybridScaling::AccTimesProduct,
                HybridScaling::XnnFma,
            ] {
                for bounds in [
                    None,
                    Some((0.0, f32::INFINITY)),
                    Some((0.0, 6.0)),
                    Some((-1.0, 1.0)),
                ] {
                    let mut got = vec![0f32; n];
                    hybrid_dequantize_row(&acc, in_scale, &ws, &bias, how, bounds, &mut got);
                    // The same values as rows of 8, 16 and 40 channels (the first 40
                    // channels' scales and biases for each row), in one call.
                    for width in [8, 16, 40] {
                        let rows = n / width;
                        let mut all = vec![f32::NAN; rows * width];
                        let (w, b) = (&ws[..width], &bias[..width]);
                        let a = &acc[..rows * width];
                        hybrid_dequantize_rows(a, in_scale, w, b, how, bounds, &mut all);
                        let mut fresh = vec![std::mem::MaybeUninit::<f32>::uninit(); rows * width];
                        hybrid_dequantize_rows_uninit(a, in_scale, w, b, how, bounds, &mut fresh);
                        // SAFETY: the call initialized every element.
                        let fresh: Vec<f32> =
                            fresh.iter().map(|v| unsafe { v.assume_init() }).collect();
                        assert_eq!(
                            fresh.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            all.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            "{how:?} {bounds:?} rows of {width} into fresh memory"
                        );
                        for (r, chunk) in all.chunks_exact(width).enumerate() {
                            let mut one = vec![0f32; width];
                            let a = &acc[r * width..(r + 1) * width];
                            hybrid_dequantize_row(a, in_scale, w, b, how, bounds, &mut one);
                            assert_eq!(
                                chunk.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                                one.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                                "{how:?} {bounds:?} rows of {width}, row {r}"
                            );
                        }
                    }
                    for c in 0..n {
                        let v = hybrid_dequantize(acc[c], in_scale, ws[c], bias[c], how);
                        let want = match bounds {
                            Some((lo, hi)) => v.max(lo).min(hi),
                            None => v,
                        };
                        assert_eq!(
                            got[c].to_bits(),
                            want.to_bits(),
                            "{how:?} {bounds:?} channel {c}"
                        );
                    }
                }
            }
        }
    }
}
