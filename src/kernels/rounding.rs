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
//! # Where TFLite does not use the integer path
//!
//! * QUANTIZE (float → int8) divides in f32: `round(x / scale) + zp`, rounding half
//!   away from zero, then clamps. Multiplying by `1/scale` gives different results.
//! * The reference FULLY_CONNECTED kernel requantizes in double:
//!   `round((f64)acc * ((f64)in_scale * (f64)w_scale / (f64)out_scale))`.
//! * Fused activation bounds are `zp + round(bound / scale)` in f32, clamped to the
//!   type's range.

/// How a kernel rounds when it applies a quantized multiplier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rounding {
    /// gemmlowp: saturating rounding doubling high multiply, then rounding shift.
    Double,
    /// One rounding of the full i64 product.
    Single,
}

/// TFLite's `TfLiteRound`/`std::round`: half away from zero.
pub fn round_half_away_f32(x: f32) -> f32 {
    x.round()
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
pub fn quantize_value(x: f32, scale: f32, zero_point: i32, qmin: i32, qmax: i32) -> i32 {
    let v = round_half_away_f32(x / scale);
    let v = if v.is_nan() {
        0
    } else {
        v.clamp(i32::MIN as f32, i32::MAX as f32) as i64
    };
    (v + zero_point as i64).clamp(qmin as i64, qmax as i64) as i32
}

/// DEQUANTIZE: `(q - zp) * scale` in f32.
pub fn dequantize_value(q: i32, scale: f32, zero_point: i32) -> f32 {
    (q - zero_point) as f32 * scale
}

/// The reference FULLY_CONNECTED requantization: in double, one rounding.
pub fn requantize_in_double(acc: i32, in_scale: f32, w_scale: f32, out_scale: f32) -> i32 {
    let m = in_scale as f64 * w_scale as f64 / out_scale as f64;
    round_half_away_f64(acc as f64 * m) as i32
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

/// Activations TFLite fuses into the op that precedes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FusedActivation {
    None,
    Relu,
    Relu6,
    ReluN1To1,
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
