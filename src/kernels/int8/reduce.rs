//! Int8 reductions and softmax: MEAN (`reference_ops::QuantizedMeanOrSum`, or
//! XNNPACK's fp32 mean),
//! REDUCE_MAX (raw int8 maximum, equal parameters) and SOFTMAX
//! (`reference_ops::Softmax` with gemmlowp fixed-point exp).

use super::{input_affine, output_affine, sat8, Arithmetic, ROUNDING};
use crate::error::{Error, Result};
use crate::kernels::array::{norm_axis, ReduceOp};
use crate::kernels::ops::StepQuant;
use crate::kernels::rounding::{
    calculate_input_radius, fixed, mean_multiplier, multiply_by_quantized_multiplier,
    multiply_by_quantized_multiplier_greater_than_one, preprocess_softmax_scaling,
    quantize_multiplier, rounding_divide_by_pot, saturating_rounding_doubling_high_mul,
    xnn_reduce_requantize,
};
use crate::kernels::value::Value;

/// Output shape, for every input element the index of its output element (empty
/// unless `with_map`) and the number of input elements per output element.
fn reduction_map(
    shape: &[usize],
    axes: &Value,
    keep_dims: bool,
    with_map: bool,
) -> Result<(Vec<usize>, Vec<usize>, usize)> {
    let r = shape.len();
    let mut red = vec![false; r];
    for a in axes.to_i64s()? {
        red[norm_axis(a, r, false)?] = true;
    }
    let full: Vec<usize> = (0..r).map(|d| if red[d] { 1 } else { shape[d] }).collect();
    let out_shape = if keep_dims {
        full.clone()
    } else {
        (0..r).filter(|&d| !red[d]).map(|d| shape[d]).collect()
    };
    let mut strides = vec![0usize; r];
    let mut s = 1;
    for d in (0..r).rev() {
        strides[d] = if red[d] { 0 } else { s };
        s *= full[d];
    }
    let n_in: usize = shape.iter().product();
    let n_out: usize = full.iter().product();
    let mut map = Vec::with_capacity(if with_map { n_in } else { 0 });
    let mut idx = vec![0usize; r];
    for _ in 0..if with_map { n_in } else { 0 } {
        map.push(idx.iter().zip(&strides).map(|(i, s)| i * s).sum());
        for d in (0..r).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    let count = n_in.checked_div(n_out).unwrap_or(0);
    Ok((out_shape, map, count))
}

/// The reduced axes as one block of consecutive dimensions: the input is then
/// `[outer, reduced, inner]` and output element `(o, i)` reduces
/// `x[o, 0..reduced, i]`. `None` when the reduced axes are not consecutive.
fn consecutive_block(shape: &[usize], axes: &Value) -> Result<Option<(usize, usize, usize)>> {
    let r = shape.len();
    let mut red = vec![false; r];
    for a in axes.to_i64s()? {
        red[norm_axis(a, r, false)?] = true;
    }
    let (Some(first), Some(last)) = (red.iter().position(|&b| b), red.iter().rposition(|&b| b))
    else {
        return Ok(None);
    };
    if !red[first..=last].iter().all(|&b| b) {
        return Ok(None);
    }
    let prod = |d: &[usize]| d.iter().product::<usize>();
    Ok(Some((
        prod(&shape[..first]),
        prod(&shape[first..=last]),
        prod(&shape[last + 1..]),
    )))
}

/// `acc[i] = max/min(acc[i], x[r · inner + i])` over the `reduced` rows of `xs`.
#[inline(always)]
fn extreme_rows(xs: &[i8], acc: &mut [i8], max: bool) {
    let inner = acc.len();
    for row in xs.chunks_exact(inner) {
        if max {
            for (a, &v) in acc.iter_mut().zip(row) {
                *a = (*a).max(v);
            }
        } else {
            for (a, &v) in acc.iter_mut().zip(row) {
                *a = (*a).min(v);
            }
        }
    }
}

/// [`extreme_rows`] with AVX2: each block of 32 (then 16) columns held in a register
/// over all the rows (`vpmaxsb`/`vpminsb`), the rest by the scalar loop. A max over
/// time has few channels per row (16 in push_student), so the row loop is the work.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn extreme_rows_avx2(xs: &[i8], acc: &mut [i8], max: bool) {
    use std::arch::x86_64::*;
    let inner = acc.len();
    let rows = xs.len() / inner.max(1);
    let (xp, ap) = (xs.as_ptr(), acc.as_mut_ptr());
    let mut j = 0;
    while j + 32 <= inner {
        let mut a = _mm256_loadu_si256(ap.add(j) as *const __m256i);
        for r in 0..rows {
            let v = _mm256_loadu_si256(xp.add(r * inner + j) as *const __m256i);
            a = if max {
                _mm256_max_epi8(a, v)
            } else {
                _mm256_min_epi8(a, v)
            };
        }
        _mm256_storeu_si256(ap.add(j) as *mut __m256i, a);
        j += 32;
    }
    if j + 16 <= inner {
        let mut a = _mm_loadu_si128(ap.add(j) as *const __m128i);
        for r in 0..rows {
            let v = _mm_loadu_si128(xp.add(r * inner + j) as *const __m128i);
            a = if max {
                _mm_max_epi8(a, v)
            } else {
                _mm_min_epi8(a, v)
            };
        }
        _mm_storeu_si128(ap.add(j) as *mut __m128i, a);
        j += 16;
    }
    if j < inner {
        for row in xs.chunks_exact(inner) {
            for (a, &v) in acc[j..].iter_mut().zip(&row[j..]) {
                *a = if max { (*a).max(v) } else { (*a).min(v) };
            }
        }
    }
}

/// The int8 maximum or minimum over a block of consecutive axes.
fn extreme_block(xs: &[i8], (outer, reduced, inner): (usize, usize, usize), max: bool) -> Vec<i8> {
    let mut acc = vec![if max { i8::MIN } else { i8::MAX }; outer * inner];
    if inner == 0 || reduced == 0 {
        return acc;
    }
    for (x, a) in xs
        .chunks_exact(reduced * inner)
        .zip(acc.chunks_exact_mut(inner))
    {
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::simd::avx2() {
            // SAFETY: AVX2 is present.
            unsafe { extreme_rows_avx2(x, a, max) };
            continue;
        }
        extreme_rows(x, a, max);
    }
    acc
}

/// The i32 sums over a block of consecutive axes, of the values or (`as_u8`) of their
/// bytes read as 0..=255.
fn sum_block(xs: &[i8], (outer, reduced, inner): (usize, usize, usize), as_u8: bool) -> Vec<i32> {
    let mut sums = vec![0i32; outer * inner];
    if inner == 0 || reduced == 0 {
        return sums;
    }
    for (x, s) in xs
        .chunks_exact(reduced * inner)
        .zip(sums.chunks_exact_mut(inner))
    {
        for row in x.chunks_exact(inner) {
            for (a, &v) in s.iter_mut().zip(row) {
                let v = if as_u8 { v as u8 as i32 } else { v as i32 };
                *a = a.wrapping_add(v);
            }
        }
    }
    sums
}

pub fn reduce(
    x: &Value,
    axes: &Value,
    op: ReduceOp,
    keep_dims: bool,
    quant: &StepQuant,
) -> Result<Value> {
    let xs = x.slice::<i8>()?;
    let xin = input_affine(quant, 0)?;
    let out = output_affine(quant)?;
    let block = consecutive_block(&x.shape, axes)?;
    let (shape, map, count) = reduction_map(&x.shape, axes, keep_dims, block.is_none())?;
    let n_out: usize = shape.iter().product();
    match op {
        ReduceOp::Max | ReduceOp::Min => {
            if xin != out {
                return Err(Error::msg(format!(
                    "int8 {op:?} needs equal input and output parameters, got {xin:?} and {out:?}"
                )));
            }
            let max = op == ReduceOp::Max;
            if let Some(block) = block {
                return Ok(Value::from_vec(shape, extreme_block(xs, block, max)));
            }
            let mut acc = vec![if max { i8::MIN } else { i8::MAX }; n_out];
            for (&v, &o) in xs.iter().zip(&map) {
                acc[o] = if max { acc[o].max(v) } else { acc[o].min(v) };
            }
            Ok(Value::from_vec(shape, acc))
        }
        ReduceOp::Mean | ReduceOp::Sum => {
            // LiteRT's reference SUM kernel instantiates the reduction for uint8
            // whatever the type: it reads int8 bytes as 0..255 and saturates to
            // 0..255 (reduce.cc, `QuantizedMeanOrSum` with `GetTensorData<uint8_t>`).
            let as_u8 = op == ReduceOp::Sum && quant.arithmetic == Arithmetic::Reference;
            let sums = match block {
                Some(block) => sum_block(xs, block, as_u8),
                None => {
                    let mut sums = vec![0i32; n_out];
                    for (&v, &o) in xs.iter().zip(&map) {
                        let v = if as_u8 { v as u8 as i32 } else { v as i32 };
                        sums[o] = sums[o].wrapping_add(v);
                    }
                    sums
                }
            };
            if quant.arithmetic == Arithmetic::LiteRt && count > 0 {
                let mean = op == ReduceOp::Mean;
                let res: Vec<i8> = sums
                    .iter()
                    .map(|&sum| {
                        xnn_reduce_requantize(
                            sum,
                            xin.scale,
                            xin.zero_point,
                            out.scale,
                            out.zero_point,
                            count,
                            mean,
                        )
                    })
                    .collect();
                return Ok(Value::from_vec(shape, res));
            }
            let (q, s) = quantize_multiplier(xin.scale as f64 / out.scale as f64);
            let (q, s) = if op == ReduceOp::Mean {
                mean_multiplier(q, s, count as i64)
            } else {
                (q, s)
            };
            let res: Vec<i8> = if count == 0 {
                vec![0; n_out]
            } else {
                sums.iter()
                    .map(|&sum| {
                        let shifted = (sum as i64 - xin.zero_point as i64 * count as i64) as i32;
                        let v = multiply_by_quantized_multiplier(shifted, q, s, ROUNDING)
                            + out.zero_point;
                        if as_u8 {
                            v.clamp(0, 255) as u8 as i8
                        } else {
                            sat8(v)
                        }
                    })
                    .collect()
            };
            Ok(Value::from_vec(shape, res))
        }
        other => Err(Error::msg(format!(
            "no int8 kernel for reduction {other:?}"
        ))),
    }
}

/// Integer bits of the scaled input difference (`kScaledDiffIntegerBits`) and of the
/// sum of exponentials (`kAccumulationIntegerBits`).
const SCALED_DIFF_BITS: i32 = 5;
const ACCUM_BITS: i32 = 12;

/// An [`exp_table`] and the (multiplier, shift) it is for.
type ExpTable = ((i32, i32), std::rc::Rc<[i32; 256]>);

thread_local! {
    /// The last [`exp_table`] this thread made.
    static EXP_TABLE: std::cell::RefCell<Option<ExpTable>> =
        const { std::cell::RefCell::new(None) };
}

/// `exp(diff · input scale)` in gemmlowp's fixed point, as the reference SOFTMAX
/// computes it for each element, for every difference from a row's maximum
/// (`table[-diff]`, `diff` in -255..=0 and at least the input radius's negative):
/// a function of the input scale's (multiplier,
/// shift) only, so computed once per scale rather than twice per element.
fn exp_table(mult: i32, left_shift: i32) -> std::rc::Rc<[i32; 256]> {
    EXP_TABLE.with_borrow_mut(|last| {
        if let Some((key, t)) = last.as_ref() {
            if *key == (mult, left_shift) {
                return t.clone();
            }
        }
        // Differences below -radius are not exponentiated (their rescaling would
        // overflow); their entries stay 0 and are never read.
        let radius = calculate_input_radius(SCALED_DIFF_BITS, left_shift).max(0) as usize;
        let mut t = [0i32; 256];
        for (i, e) in t.iter_mut().enumerate().take(radius.saturating_add(1)) {
            let diff = -(i as i32);
            let rescaled =
                multiply_by_quantized_multiplier_greater_than_one(diff, mult, left_shift);
            *e = fixed::exp_on_negative_values(rescaled, SCALED_DIFF_BITS);
        }
        let t = std::rc::Rc::new(t);
        *last = Some(((mult, left_shift), t.clone()));
        t
    })
}

pub fn softmax(x: &Value, quant: &StepQuant) -> Result<Value> {
    let xs = x.slice::<i8>()?;
    let xin = input_affine(quant, 0)?;
    let out = output_affine(quant)?;
    if out.zero_point != -128 || (out.scale - 1.0 / 256.0).abs() > 0.001 / 256.0 {
        return Err(Error::msg(format!(
            "int8 Softmax output must be quantized (1/256, -128), got {out:?}"
        )));
    }
    let depth = *x
        .shape
        .last()
        .ok_or_else(|| Error::msg("Softmax needs rank ≥ 1"))?;
    let (mult, left_shift) = preprocess_softmax_scaling(1.0, xin.scale as f64, SCALED_DIFF_BITS);
    let diff_min = -calculate_input_radius(SCALED_DIFF_BITS, left_shift);
    let mut res = vec![0i8; xs.len()];
    if depth == 0 {
        return Ok(Value::from_vec(x.shape.clone(), res));
    }
    let table = exp_table(mult, left_shift);
    // A difference from the row's maximum lies in -255..=0.
    let exp_of = |diff: i32| table[(-diff) as usize];
    for (row, orow) in xs.chunks(depth).zip(res.chunks_mut(depth)) {
        let max = row.iter().copied().max().unwrap_or(i8::MIN) as i32;
        let mut sum = 0i32;
        for &v in row {
            let diff = v as i32 - max;
            if diff >= diff_min {
                sum = sum.wrapping_add(fixed::rescale(exp_of(diff), 0, ACCUM_BITS));
            }
        }
        let (scale, bits_over_unit) = fixed::get_reciprocal(sum, ACCUM_BITS);
        let exponent = bits_over_unit + 31 - 8;
        if !(0..=31).contains(&exponent) {
            return Err(Error::msg(format!(
                "softmax exponent {exponent} out of range"
            )));
        }
        for (&v, o) in row.iter().zip(orow.iter_mut()) {
            let diff = v as i32 - max;
            *o = if diff >= diff_min {
                let unsat = rounding_divide_by_pot(
                    saturating_rounding_doubling_high_mul(scale, exp_of(diff)),
                    exponent,
                );
                sat8(unsat - 128)
            } else {
                -128
            };
        }
    }
    Ok(Value::from_vec(x.shape.clone(), res))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extreme_rows_in_registers_match_the_scalar_loop() {
        let mut seed = 5u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 24) as u8 as i8
        };
        for inner in [1, 3, 15, 16, 17, 32, 48, 50, 64, 70] {
            for rows in [0, 1, 2, 39] {
                let xs: Vec<i8> = (0..rows * inner).map(|_| next()).collect();
                for max in [true, false] {
                    let start = if max { i8::MIN } else { i8::MAX };
                    let mut want = vec![start; inner];
                    extreme_rows(&xs, &mut want, max);
                    let mut got = vec![start; inner];
                    #[cfg(target_arch = "x86_64")]
                    if crate::kernels::simd::avx2() {
                        // SAFETY: AVX2 is present.
                        unsafe { extreme_rows_avx2(&xs, &mut got, max) };
                    } else {
                        extreme_rows(&xs, &mut got, max);
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    extreme_rows(&xs, &mut got, max);
                    assert_eq!(got, want, "inner {inner} rows {rows} max {max}");
                    if rows > 1 {
                        assert!(got.iter().any(|&v| v != start));
                    }
                }
            }
        }
    }

    #[test]
    fn exp_table_is_the_per_element_exp_for_each_scale() {
        // Alternating scales: a table made for one is never used for another.
        for scale in [0.1f64, 0.05, 0.1, 1.0 / 256.0, 0.3, 0.05] {
            let (mult, shift) = preprocess_softmax_scaling(1.0, scale, SCALED_DIFF_BITS);
            let t = exp_table(mult, shift);
            let radius = calculate_input_radius(SCALED_DIFF_BITS, shift) as usize;
            for i in 0..256.min(radius + 1) {
                let rescaled =
                    multiply_by_quantized_multiplier_greater_than_one(-(i as i32), mult, shift);
                let want = fixed::exp_on_negative_values(rescaled, SCALED_DIFF_BITS);
                assert_eq!(t[i], want, "scale {scale} diff -{i}");
            }
            assert!(t[0] > t[1] && t[1] > t[20], "scale {scale}: not decreasing");
        }
    }
}
