//! The int8 depthwise convolution with one output per channel, requantized in
//! registers (AVX-512F): an output row at a time, sixteen channels at a time, the
//! bias, the filter (widened to i16 once per row and block of channels) and the
//! requantization parameters loaded once for the whole row, each pixel's sums
//! requantized by the register-block forms of `rounding.rs` and stored as int8.
//! The products are those of the AVX2 kernel (`conv.rs`): an input plus its offset
//! lies within ±255 and a weight within ±128, so each product is exact in i16; the
//! integer sums do not depend on order, so the outputs are those of the two-pass path.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use crate::kernels::rounding::block::{self, Form};
use crate::kernels::rounding::RowRequantizer;

/// Filter taps the row kernel takes (5×5 filters).
pub(super) const MAX_TAPS: usize = 25;

/// Where an output row reads its input: `rows` are the filter rows that fall inside
/// the input (offset in `xs` of the input row's first pixel, `ky · kw`); output pixel
/// `ox` reads columns `ox · stride + kx · dilation - pad_left` for the `kx < kw` that
/// fall inside the `width` input columns.
#[derive(Debug, Clone, Copy)]
pub(super) struct RowTaps<'a> {
    pub rows: &'a [(usize, usize)],
    pub kw: usize,
    pub width: usize,
    pub stride: usize,
    pub dilation: usize,
    pub pad_left: usize,
}

impl RowTaps<'_> {
    /// The filter columns `[kx0, kx1)` of output pixel `ox` inside the input, and the
    /// input column of `kx0`.
    #[inline(always)]
    fn columns(&self, ox: usize) -> (usize, usize, usize) {
        let x0 = (ox * self.stride) as isize - self.pad_left as isize;
        let d = self.dilation as isize;
        let kw = self.kw as isize;
        let kx0 = if x0 >= 0 { 0 } else { (-x0 + d - 1) / d }.min(kw);
        let kx1 = (self.width as isize - x0 + d - 1)
            .div_euclid(d)
            .clamp(kx0, kw);
        (kx0 as usize, kx1 as usize, (x0 + kx0 * d).max(0) as usize)
    }
}

/// One output row of `out.len() / c` pixels of `c` channels (every output written,
/// so `out` may be uninitialized): pixel `ox`, channel
/// `ch` is the requantization of `bias[ch] + Σ filter[tap · c + ch] · (input + off)`
/// over the taps of [`RowTaps`]; `wv` is the filter `[kh · kw, c]`, `bias` and `rq`
/// have `c` channels, `off` is the input offset (minus its zero point).
///
/// # Safety
/// AVX-512F and AVX2 must be present, `rq.block_form()` must be `Some`, `kh · kw`
/// at most [`MAX_TAPS`]; every input pixel a tap reads lies within `xs` (its offset
/// plus `c`), and `wv.len() == kh · kw · c`, `bias.len() == rq.channels() == c`,
/// `out.len()` a multiple of `c`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn row(
    out: &mut [MaybeUninit<i8>],
    taps: &RowTaps<'_>,
    xs: &[i8],
    wv: &[i8],
    off: i32,
    bias: &[i32],
    rq: &RowRequantizer,
) {
    match rq.block_form() {
        Some(Form::Gemmlowp) => row_with::<false>(out, taps, xs, wv, off, bias, rq),
        Some(Form::Fp32) => row_with::<true>(out, taps, xs, wv, off, bias, rq),
        None => {}
    }
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,avx512f")]
unsafe fn row_with<const FP32: bool>(
    out: &mut [MaybeUninit<i8>],
    taps: &RowTaps<'_>,
    xs: &[i8],
    wv: &[i8],
    off: i32,
    bias: &[i32],
    rq: &RowRequantizer,
) {
    let c = bias.len();
    if c == 0 {
        return;
    }
    let pixels = out.len() / c;
    let (xp, wp, op) = (xs.as_ptr(), wv.as_ptr(), out.as_mut_ptr().cast::<i8>());
    let ntaps = wv.len() / c;
    let step = taps.dilation * c;
    let off16 = _mm256_set1_epi16(off as i16);
    let k = rq.consts512();
    let mut wide = [_mm256_setzero_si256(); MAX_TAPS];
    let mut ch = 0;
    while ch + 16 <= c {
        for (t, w) in wide.iter_mut().enumerate().take(ntaps.min(MAX_TAPS)) {
            *w = _mm256_cvtepi8_epi16(_mm_loadu_si128(wp.add(t * c + ch).cast()));
        }
        let lanes = rq.lanes512::<FP32>(ch, 0xffff);
        let b = _mm512_loadu_si512(bias.as_ptr().add(ch).cast());
        for ox in 0..pixels {
            let (kx0, kx1, ix0) = taps.columns(ox);
            let mut acc = b;
            for &(row, tk) in taps.rows {
                let mut xo = row + ix0 * c + ch;
                for kx in kx0..kx1 {
                    let x = _mm256_cvtepi8_epi16(_mm_loadu_si128(xp.add(xo).cast()));
                    let w = *wide.get_unchecked(tk + kx);
                    let prod = _mm256_mullo_epi16(_mm256_add_epi16(x, off16), w);
                    acc = _mm512_add_epi32(acc, _mm512_cvtepi16_epi32(prod));
                    xo += step;
                }
            }
            let y = block::requantize512::<FP32>(&k, &lanes, acc);
            block::store16(op.add(ox * c + ch), 0xffff, y);
        }
        ch += 16;
    }
    for cc in ch..c {
        for ox in 0..pixels {
            let (kx0, kx1, ix0) = taps.columns(ox);
            let mut sum = 0i32;
            for &(row, tk) in taps.rows {
                for (i, kx) in (kx0..kx1).enumerate() {
                    let xv = xs[row + ix0 * c + i * step + cc] as i32 + off;
                    sum = sum.wrapping_add((wv[(tk + kx) * c + cc] as i32).wrapping_mul(xv));
                }
            }
            out[ox * c + cc] = MaybeUninit::new(rq.apply(sum.wrapping_add(bias[cc]), cc));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::rounding::{quantize_multiplier, ChannelMultipliers, Rounding};

    #[test]
    fn fused_row_equals_the_sums_then_the_requantization() {
        if !crate::kernels::simd::vnni() {
            eprintln!("no AVX512-VNNI on this CPU: the fused depthwise row cannot run here");
            return;
        }
        let mut seed = 7u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 16) as i32
        };
        let (h, wd, kh, kw) = (3usize, 7usize, 3usize, 3usize);
        for (c, stride, dilation, pad_left) in [
            (16usize, 1usize, 1usize, 1usize),
            (21, 2, 1, 0),
            (48, 1, 2, 2),
            (32, 2, 1, 1),
        ] {
            let xs: Vec<i8> = (0..h * wd * c).map(|_| next() as i8).collect();
            let wv: Vec<i8> = (0..kh * kw * c).map(|_| next() as i8).collect();
            let bias: Vec<i32> = (0..c).map(|_| next() % 4000 - 2000).collect();
            let scales: Vec<f64> = (0..c).map(|_| (1 + next() % 500) as f64 * 1e-5).collect();
            // Filter rows 0 and 2 inside the input (row 1 above it, say).
            let rows = [(0usize, 0usize), (2 * wd * c, 2 * kw)];
            let taps = RowTaps {
                rows: &rows,
                kw,
                width: wd,
                stride,
                dilation,
                pad_left,
            };
            let ow = (wd + pad_left).div_ceil(stride) + 1;
            for mult in [
                ChannelMultipliers::Quantized(
                    scales.iter().map(|&s| quantize_multiplier(s)).collect(),
                    Rounding::Double,
                ),
                ChannelMultipliers::Fp32(scales.iter().map(|&s| s as f32).collect()),
            ] {
                let rq = RowRequantizer::new(mult, 4, -128, 127);
                let off = 7;
                let mut got = vec![MaybeUninit::new(0i8); ow * c];
                // SAFETY: VNNI (so AVX-512F) and AVX2 are present; the taps read
                // columns inside `wd` of rows 0 and 2 of `xs`, the lengths as `row`
                // needs them.
                unsafe { row(&mut got, &taps, &xs, &wv, off, &bias, &rq) };
                // SAFETY: initialized above (and written by `row`).
                let got: Vec<i8> = got.iter().map(|v| unsafe { v.assume_init() }).collect();
                for ox in 0..ow {
                    for ch in 0..c {
                        let mut sum = bias[ch];
                        for &(ro, tk) in &rows {
                            for kx in 0..kw {
                                let ix = (ox * stride + kx * dilation) as isize - pad_left as isize;
                                if (0..wd as isize).contains(&ix) {
                                    let xv = xs[ro + ix as usize * c + ch] as i32 + off;
                                    sum += xv * wv[(tk + kx) * c + ch] as i32;
                                }
                            }
                        }
                        let want = rq.apply(sum, ch);
                        assert_eq!(got[ox * c + ch], want, "c={c} pixel {ox} channel {ch}");
                    }
                }
            }
        }
    }
}
