//! Int8 `AVERAGE_POOL_2D` and `MAX_POOL_2D` (TFLite's reference integer kernels), one
//! output pixel at a time with its channels in vectors: the same sums, maxima and
//! rounded quotients as the element-wise expressions.

use super::conv::dims4;
use super::{input_affine, output_affine};
use crate::error::{Error, Result};
use crate::kernels::nn::{out_size, PoolKind, Window};
use crate::kernels::ops::StepQuant;
use crate::kernels::value::Value;

/// Windows of at most this many values sum in i32 and divide in f32: the sum plus
/// half the count is below 2^24 in magnitude, so f32 holds it and the quotient
/// exactly, and the truncated f32 quotient is the integer one (see [`avg_of`]).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const VECTOR_COUNT: usize = 1 << 16;

/// The average of `count` int8 values summing to `sum`, rounded half away from
/// zero: `(sum ± count/2) / count`, truncated, clamped to int8.
///
/// The vector path computes it as `trunc(f32(a) / f32(count))` with `a = sum ±
/// count/2`: when |a| < 2^24 both are exact in f32, and the rounded quotient lies
/// within |a/count|·2^-24 < 1/count of the exact one, which is either an integer
/// (then exact) or at least 1/count away from every integer, so truncation gives the
/// integer quotient.
#[inline(always)]
fn avg_of(sum: i64, count: i64) -> i8 {
    let q = if sum > 0 {
        (sum + count / 2) / count
    } else {
        (sum - count / 2) / count
    };
    q.clamp(-128, 127) as i8
}

/// Int8 pooling. Both require the output's parameters to equal the input's; the
/// average is the rounded (half away from zero) quotient of the raw int8 sum.
pub fn pool(
    x: &Value,
    kind: PoolKind,
    ksize: [usize; 2],
    win: &Window,
    quant: &StepQuant,
) -> Result<Value> {
    let xin = input_affine(quant, 0)?;
    let out = output_affine(quant)?;
    if xin != out {
        return Err(Error::msg(format!(
            "int8 pooling needs equal input and output parameters, got {xin:?} and {out:?}"
        )));
    }
    let [n, h, wd, c] = dims4(x, "input")?;
    let (oh, pt) = out_size(h, ksize[0], win.strides[0], 1, &win.padding, 0)?;
    let (ow, pl) = out_size(wd, ksize[1], win.strides[1], 1, &win.padding, 1)?;
    crate::kernels::value::checked_len(&[n, oh, ow, c])?;
    let xs = x.slice::<i8>()?;
    if xs.len() != n * h * wd * c {
        return Err(Error::msg(format!(
            "int8 pooling input {:?} does not hold its shape's values",
            x.shape
        )));
    }
    let mut res = vec![0i8; n * oh * ow * c];
    if c == 0 {
        return Ok(Value::from_vec(vec![n, oh, ow, c], res));
    }
    #[cfg(target_arch = "x86_64")]
    let simd = crate::kernels::simd::avx2();
    let mut taps: Vec<usize> = Vec::with_capacity(ksize[0].saturating_mul(ksize[1]).min(1024));
    // The taps of a window wholly inside the input, from its first pixel: the taps of
    // such a pixel are these plus its first pixel's offset, and are not listed again.
    #[cfg(target_arch = "x86_64")]
    let whole: Vec<usize> = if ksize[0] <= h && ksize[1] <= wd {
        (0..ksize[0])
            .flat_map(|dy| (0..ksize[1]).map(move |dx| (dy * wd + dx) * c))
            .collect()
    } else {
        Vec::new()
    };
    for (p, out_px) in res.chunks_exact_mut(c).enumerate() {
        let (bi, oy, ox) = (p / (oh * ow), p / ow % oh, p % ow);
        let y0 = (oy * win.strides[0]) as isize - pt as isize;
        let x0 = (ox * win.strides[1]) as isize - pl as isize;
        #[cfg(target_arch = "x86_64")]
        if simd
            && !whole.is_empty()
            && whole.len() <= VECTOR_COUNT
            && y0 >= 0
            && x0 >= 0
            && y0 as usize + ksize[0] <= h
            && x0 as usize + ksize[1] <= wd
        {
            let first = ((bi * h + y0 as usize) * wd + x0 as usize) * c;
            // SAFETY: AVX2 is present; the window lies inside image `bi`, so every tap
            // plus `c` is within `xs[first..]`; `out_px` holds `c` values.
            unsafe {
                match kind {
                    PoolKind::Max => x86::max_pixel(&xs[first..], &whole, out_px),
                    PoolKind::Avg => x86::avg_pixel(&xs[first..], &whole, out_px),
                }
            }
            continue;
        }
        let ys = y0.max(0) as usize..((y0 + ksize[0] as isize).min(h as isize)).max(0) as usize;
        let xr = x0.max(0) as usize..((x0 + ksize[1] as isize).min(wd as isize)).max(0) as usize;
        taps.clear();
        for iy in ys {
            taps.extend(xr.clone().map(|ix| ((bi * h + iy) * wd + ix) * c));
        }
        let count = taps.len();
        if matches!(kind, PoolKind::Avg) && count == 0 {
            return Err(Error::msg("average pool over an empty window"));
        }
        #[cfg(target_arch = "x86_64")]
        if simd && count <= VECTOR_COUNT {
            // SAFETY: AVX2 is present; every tap is the offset of a whole input pixel
            // (`xs` holds n·h·wd·c values) and `out_px` holds `c` values.
            unsafe {
                match kind {
                    PoolKind::Max => x86::max_pixel(xs, &taps, out_px),
                    PoolKind::Avg => x86::avg_pixel(xs, &taps, out_px),
                }
            }
            continue;
        }
        for (ch, o) in out_px.iter_mut().enumerate() {
            *o = match kind {
                PoolKind::Max => taps.iter().fold(i8::MIN, |m, &t| m.max(xs[t + ch])),
                PoolKind::Avg => {
                    avg_of(taps.iter().map(|&t| xs[t + ch] as i64).sum(), count as i64)
                }
            };
        }
    }
    Ok(Value::from_vec(vec![n, oh, ow, c], res))
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// The maximum over `taps` (offsets of input pixels in `xs`) of each channel,
    /// `i8::MIN` for no taps.
    ///
    /// # Safety
    /// AVX2 must be present; every `tap + out.len()` is at most `xs.len()`.
    #[target_feature(enable = "avx2")]
    pub unsafe fn max_pixel(xs: &[i8], taps: &[usize], out: &mut [i8]) {
        let c = out.len();
        let xp = xs.as_ptr();
        let mut ch = 0;
        while ch + 16 <= c {
            let mut m = _mm_set1_epi8(i8::MIN);
            for &t in taps {
                m = _mm_max_epi8(m, _mm_loadu_si128(xp.add(t + ch) as *const __m128i));
            }
            _mm_storeu_si128(out.as_mut_ptr().add(ch) as *mut __m128i, m);
            ch += 16;
        }
        for (cc, o) in out.iter_mut().enumerate().skip(ch) {
            *o = taps.iter().fold(i8::MIN, |m, &t| m.max(*xp.add(t + cc)));
        }
    }

    /// [`super::avg_of`] of each channel's sum over `taps`, eight channels at a time
    /// (sums in i32, the quotient in f32; `taps.len()` is at most
    /// [`super::VECTOR_COUNT`] and at least 1).
    ///
    /// # Safety
    /// AVX2 must be present; every `tap + out.len()` is at most `xs.len()`.
    #[target_feature(enable = "avx2")]
    pub unsafe fn avg_pixel(xs: &[i8], taps: &[usize], out: &mut [i8]) {
        let c = out.len();
        let xp = xs.as_ptr();
        let count = taps.len() as i32;
        let half = _mm256_set1_epi32(count / 2);
        let countf = _mm256_set1_ps(count as f32);
        let pow2 = (count as u32).is_power_of_two();
        let recip = _mm256_set1_ps(1.0 / count as f32);
        let zero = _mm256_setzero_si256();
        let mut ch = 0;
        while ch + 8 <= c {
            let mut s = _mm256_setzero_si256();
            for &t in taps {
                let v = _mm_loadl_epi64(xp.add(t + ch) as *const __m128i);
                s = _mm256_add_epi32(s, _mm256_cvtepi8_epi32(v));
            }
            // sum > 0 ? sum + half : sum - half
            let pos = _mm256_cmpgt_epi32(s, zero);
            let a = _mm256_blendv_epi8(_mm256_sub_epi32(s, half), _mm256_add_epi32(s, half), pos);
            let af = _mm256_cvtepi32_ps(a);
            // For a power-of-two count the product with its exact reciprocal is the
            // quotient (both are exact here), without the division's latency.
            let quot = if pow2 {
                _mm256_mul_ps(af, recip)
            } else {
                _mm256_div_ps(af, countf)
            };
            let q = _mm256_cvttps_epi32(quot);
            // Saturating packs clamp to int8.
            let w = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256::<1>(q));
            let b = _mm_packs_epi16(w, w);
            _mm_storel_epi64(out.as_mut_ptr().add(ch) as *mut __m128i, b);
            ch += 8;
        }
        for (cc, o) in out.iter_mut().enumerate().skip(ch) {
            let sum: i64 = taps.iter().map(|&t| *xp.add(t + cc) as i64).sum();
            *o = super::avg_of(sum, count as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The f32 quotient the vector path takes, for every sum a window of `count`
    /// int8 values can have.
    #[test]
    fn f32_quotient_is_the_integer_one() {
        let counts = (1..=64).chain([81, 100, 255, 256, 1000, 4095, 65535, VECTOR_COUNT]);
        for count in counts {
            let c = count as i64;
            let step = (c / 64).max(1);
            let mut sums: Vec<i64> = (-128 * c..=127 * c).step_by(step as usize).collect();
            // Every rounding boundary near the ends and near zero.
            for q in [-128i64, -127, -1, 0, 1, 126, 127] {
                sums.extend((q * c - c..=q * c + c).filter(|s| (-128 * c..=127 * c).contains(s)));
            }
            for sum in sums {
                let a = if sum > 0 { sum + c / 2 } else { sum - c / 2 };
                let f = ((a as f32 / c as f32) as i64).clamp(-128, 127) as i8;
                assert_eq!(f, avg_of(sum, c), "sum {sum} count {count}");
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_pixels_match_the_scalar_expressions() {
        if !crate::kernels::simd::avx2() {
            return;
        }
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for c in [1usize, 7, 8, 15, 16, 17, 33] {
            for ntaps in [1usize, 2, 3, 4, 8, 9, 16, 25, 64] {
                let pixels = ntaps + 3;
                let mut xs: Vec<i8> = (0..pixels * c).map(|_| next() as i8).collect();
                // Extremes, so that sums reach their bounds.
                xs[..c].fill(i8::MIN);
                xs[c..2 * c].fill(i8::MAX);
                let taps: Vec<usize> = (0..ntaps).map(|_| (next() as usize % pixels) * c).collect();
                let (mut mx, mut av) = (vec![0i8; c], vec![0i8; c]);
                // SAFETY: AVX2 is present; the taps are whole pixels of `xs`.
                unsafe {
                    x86::max_pixel(&xs, &taps, &mut mx);
                    x86::avg_pixel(&xs, &taps, &mut av);
                }
                for ch in 0..c {
                    let vals = taps.iter().map(|&t| xs[t + ch]);
                    assert_eq!(mx[ch], vals.clone().max().unwrap(), "max c {c} ch {ch}");
                    let sum = vals.map(|v| v as i64).sum();
                    assert_eq!(av[ch], avg_of(sum, ntaps as i64), "avg c {c} ch {ch}");
                }
            }
        }
    }
}
