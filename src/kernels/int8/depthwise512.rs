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

/// Filter rows the dot-product row kernel takes (one byte each of a 32-bit lane).
pub(super) const DOT_MAX_KH: usize = 4;

/// Filter columns the dot-product row kernel takes.
const DOT_MAX_KW: usize = 8;

/// Whether [`dot_row`] can run on this CPU: AVX512-VNNI (`vpdpbusd`) and AVX512-BW
/// (byte unpacks, masked byte loads and stores).
pub(super) fn dot_available() -> bool {
    use std::sync::OnceLock;
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        crate::kernels::simd::vnni() && std::arch::is_x86_feature_detected!("avx512bw")
    })
}

/// The channel that lane `p` of [`dot_row`]'s accumulators holds, of `c`: in block
/// `p / 64`, accumulator `j`, lane `4g + i` holds channel `16g + 4j + i` of the block
/// (the order the byte and word unpacks within 128-bit lanes leave them in), or past
/// `c`. A last block of 16 or 32 channels ([`packed_tail`]) holds `64 / tail` pixels,
/// the same channels repeated.
fn dot_channel(p: usize, c: usize) -> usize {
    let (b, r) = (p / 64, p % 64);
    let (j, l) = (r / 16, r % 16);
    let g = match packed_tail(c) {
        Some(t) if b == c / 64 => l / 4 % (t / 16),
        _ => l / 4,
    };
    64 * b + 16 * g + 4 * j + l % 4
}

/// The channels past the last whole 64 when they are 16 or 32: [`dot_row`] then
/// runs `64 / tail` pixels at once in their vectors.
fn packed_tail(c: usize) -> Option<usize> {
    Some(c % 64).filter(|t| [16, 32].contains(t))
}

/// A depthwise filter (one output per channel, at most [`DOT_MAX_KH`] rows) laid out
/// for [`dot_row`], which sums a pixel's filter column of up to four taps in one
/// `vpdpbusd` lane: the inputs as unsigned bytes `x + 128`, the weights as signed
/// ones. Taps outside the input read the input zero point (`x + off = 0`), so every
/// pixel sums every tap, and `Σ w · (x + off) = Σ w · (x + 128) + (off - 128) · Σ w`:
/// the second term is folded into the bias.
pub(super) struct DotFilter {
    c: usize,
    kh: usize,
    kw: usize,
    /// `[block][kx][j]` vectors of 64 bytes: lane `l`'s byte `ky` is the weight of
    /// tap (`ky`, `kx`) of channel `dot_channel(64 · block + 16 j + l, c)` (0 past
    /// `kh` and past `c`).
    w: Vec<i8>,
    /// The bias plus `(off - 128) · Σ w`, per lane (0 past `c`).
    bias: Vec<i32>,
    /// The requantizer's channels in lane order.
    rq: RowRequantizer,
    /// The input value that a tap outside the input reads: the zero point.
    pad: i8,
}

impl DotFilter {
    /// From the filter `wv` `[kh · kw, c]`, the input offset (minus its zero point)
    /// `off`, the bias and requantizer of the `c` channels. `None` where the kernel
    /// does not take the filter (more than [`DOT_MAX_KH`] rows, no register-block
    /// requantization).
    pub(super) fn new(
        wv: &[i8],
        (kh, kw): (usize, usize),
        off: i32,
        bias: &[i32],
        rq: &RowRequantizer,
    ) -> Option<DotFilter> {
        let c = bias.len();
        if kh == 0
            || kh > DOT_MAX_KH
            || kw == 0
            || kw > DOT_MAX_KW
            || c == 0
            || wv.len() != kh * kw * c
        {
            return None;
        }
        rq.block_form()?;
        // The input value whose `x + off` is 0 (the zero point), if int8 has it.
        let pad = i8::try_from(off.checked_neg()?).ok()?;
        let blocks = c.div_ceil(64);
        let lanes = blocks * 64;
        let from: Vec<usize> = (0..lanes).map(|p| dot_channel(p, c).min(c - 1)).collect();
        let mut w = vec![0i8; blocks * kw * 4 * 64];
        let mut bias_l = vec![0i32; lanes];
        for (p, &ch) in from.iter().enumerate() {
            if dot_channel(p, c) >= c {
                continue;
            }
            let (b, j, l) = (p / 64, p % 64 / 16, p % 16);
            let mut sum = 0i32;
            for ky in 0..kh {
                for kx in 0..kw {
                    let v = wv[(ky * kw + kx) * c + ch];
                    w[((b * kw + kx) * 4 + j) * 64 + l * 4 + ky] = v;
                    sum = sum.wrapping_add(v as i32);
                }
            }
            bias_l[p] = bias[ch].wrapping_add(off.wrapping_sub(128).wrapping_mul(sum));
        }
        Some(DotFilter {
            c,
            kh,
            kw,
            w,
            bias: bias_l,
            rq: rq.permuted(&from),
            pad,
        })
    }
}

/// Where an output row of [`dot_row`] reads its input: `rows[ky]` is the offset in
/// `xs` of the first pixel of the input row under filter row `ky` (`None` above or
/// below the input); output pixel `ox` reads columns `ox · stride + kx · dilation -
/// pad_left`, those outside the `width` input columns as padding.
#[derive(Debug, Clone, Copy)]
pub(super) struct DotRow<'a> {
    pub rows: &'a [Option<usize>],
    pub width: usize,
    pub stride: usize,
    pub dilation: usize,
    pub pad_left: usize,
}

/// One output row of `out.len() / c` pixels, every output written (so `out` may be
/// uninitialized), as [`row`] computes it, through `vpdpbusd`: for each block of 64
/// channels, each input column's filter-column taps are interleaved once into
/// `scratch` (four vectors of sixteen 4-byte lanes), and each output pixel sums
/// `kw` of them per vector.
///
/// # Safety
/// [`dot_available`] must hold; `f` is of the `c` channels of the input, and every
/// pixel of `taps.rows` within `taps.width` lies within `xs` (its offset plus `c`);
/// `out.len()` is a multiple of `c`.
pub(super) unsafe fn dot_row(
    out: &mut [MaybeUninit<i8>],
    f: &DotFilter,
    taps: &DotRow<'_>,
    xs: &[i8],
    scratch: &mut Vec<u8>,
) {
    let Some(form) = f.rq.block_form() else {
        return;
    };
    match f.rq.consts512().kind(form) {
        block::FP32 => dot_row_with::<{ block::FP32 }>(out, f, taps, xs, scratch),
        block::TWO_STEP => dot_row_with::<{ block::TWO_STEP }>(out, f, taps, xs, scratch),
        block::FOLD_SIGNED => dot_row_with::<{ block::FOLD_SIGNED }>(out, f, taps, xs, scratch),
        _ => dot_row_with::<{ block::FOLD }>(out, f, taps, xs, scratch),
    }
}

#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn dot_row_with<const K: u8>(
    out: &mut [MaybeUninit<i8>],
    f: &DotFilter,
    taps: &DotRow<'_>,
    xs: &[i8],
    scratch: &mut Vec<u8>,
) {
    let (c, kw) = (f.c, f.kw);
    let pixels = out.len() / c;
    if pixels == 0 {
        return;
    }
    let (s, d, pl) = (taps.stride, taps.dilation, taps.pad_left);
    let ncols = (pixels - 1) * s + (kw - 1) * d + 1;
    let (xp, op) = (xs.as_ptr(), out.as_mut_ptr().cast::<i8>());
    let k = f.rq.consts512();
    let flip = _mm512_set1_epi8(-128);
    let zero = _mm512_setzero_si512();
    let padx = [f.pad; 64];
    // A column outside the input: every filter row reads the zero point (the bytes
    // past `kh` meet weights 0), so each of its interleaved vectors is all of it.
    let pad_cols = [_mm512_xor_si512(_mm512_set1_epi8(f.pad), flip); 4];
    let tail = packed_tail(c);
    for b in 0..c.div_ceil(64) {
        let ch = 64 * b;
        let left = (c - ch).min(64);
        let mask: __mmask64 = if left == 64 { !0 } else { (1u64 << left) - 1 };
        // A packed tail keeps each column's `left` bytes per vector, by phase of the
        // stride, so that the columns of `64 / left` consecutive pixels lie together.
        let packed = left < 64 && tail.is_some();
        let (unit, nq) = if packed {
            (left, ncols.div_ceil(s) + 64 / left)
        } else {
            (256, ncols)
        };
        let len = if packed {
            4 * s * nq * unit
        } else {
            ncols * 256
        };
        let cols = super::gemm::grown(scratch, len + 256).as_mut_ptr();
        // Column `col`'s vector `j`.
        let at = |col: usize, j: usize| {
            if packed {
                cols.add(((j * s + col % s) * nq + col / s) * unit)
            } else {
                cols.add(col * 256 + 64 * j)
            }
        };
        // Each filter row's first byte of the block (the zero points for the rows
        // outside the input, and for the slots past `kh`, whose weights are 0) and
        // its step per input column.
        let mut base = [(padx.as_ptr(), 0usize); DOT_MAX_KH];
        for (ky, b) in base.iter_mut().enumerate().take(f.kh) {
            if let Some(Some(row)) = taps.rows.get(ky) {
                *b = (xp.add(row + ch), c);
            }
        }
        let inside = pl.min(ncols)..(pl + taps.width).min(ncols);
        for col in 0..ncols {
            let mut v = pad_cols;
            if inside.contains(&col) {
                let ix = col - pl;
                let mut r = [zero; DOT_MAX_KH];
                for (v, &(p, step)) in r.iter_mut().zip(&base) {
                    let x = _mm512_maskz_loadu_epi8(mask, p.add(ix * step).cast());
                    *v = _mm512_xor_si512(x, flip);
                }
                let lo01 = _mm512_unpacklo_epi8(r[0], r[1]);
                let hi01 = _mm512_unpackhi_epi8(r[0], r[1]);
                let lo23 = _mm512_unpacklo_epi8(r[2], r[3]);
                let hi23 = _mm512_unpackhi_epi8(r[2], r[3]);
                v = [
                    _mm512_unpacklo_epi16(lo01, lo23),
                    _mm512_unpackhi_epi16(lo01, lo23),
                    _mm512_unpacklo_epi16(hi01, hi23),
                    _mm512_unpackhi_epi16(hi01, hi23),
                ];
            }
            for (j, &x) in v.iter().enumerate() {
                match unit {
                    16 => _mm_storeu_si128(at(col, j).cast(), _mm512_castsi512_si128(x)),
                    32 => _mm256_storeu_si256(at(col, j).cast(), _mm512_castsi512_si256(x)),
                    _ => _mm512_storeu_si512(at(col, j).cast(), x),
                }
            }
        }
        // Named vectors rather than arrays indexed in loops, which the compiler keeps
        // in memory (and four 16-byte stores read back as one 64-byte load stall).
        let (l0, l1, l2, l3) = (
            f.rq.lanes_for::<K>(ch, 0xffff),
            f.rq.lanes_for::<K>(ch + 16, 0xffff),
            f.rq.lanes_for::<K>(ch + 32, 0xffff),
            f.rq.lanes_for::<K>(ch + 48, 0xffff),
        );
        let bp = f.bias.as_ptr().add(ch);
        let (b0, b1, b2, b3) = (
            _mm512_loadu_si512(bp.cast()),
            _mm512_loadu_si512(bp.add(16).cast()),
            _mm512_loadu_si512(bp.add(32).cast()),
            _mm512_loadu_si512(bp.add(48).cast()),
        );
        let wb = f.w.as_ptr().add(b * kw * 256);
        let per = if packed { 64 / left } else { 1 };
        // `at(ox · s + kx · d, j)` is `cols + koff[kx] + ox · pstep + j · jstep`.
        let (pstep, jstep) = if packed {
            (unit, s * nq * unit)
        } else {
            (s * 256, 64)
        };
        let mut koff = [0usize; DOT_MAX_KW];
        for (kx, o) in koff.iter_mut().enumerate().take(kw) {
            *o = at(kx * d, 0).offset_from(cols) as usize;
        }
        let mut ox = 0;
        while ox < pixels {
            let (mut a0, mut a1, mut a2, mut a3) = (b0, b1, b2, b3);
            let po = cols.add(ox * pstep);
            for (kx, &ko) in koff.iter().enumerate().take(kw) {
                let (p, wp) = (po.add(ko), wb.add(kx * 256));
                macro_rules! dot {
                    ($a:ident, $j:expr) => {
                        $a = _mm512_dpbusd_epi32(
                            $a,
                            _mm512_loadu_si512(p.add($j * jstep).cast()),
                            _mm512_loadu_si512(wp.add(64 * $j).cast()),
                        )
                    };
                }
                dot!(a0, 0);
                dot!(a1, 1);
                dot!(a2, 2);
                dot!(a3, 3);
            }
            // The packs leave dword `4 g + j` = dword `g` of accumulator `j`: channels
            // `16 g + 4 j..`, in order.
            let z = block::pack64(
                &k,
                [
                    block::requant16::<K>(&k, &l0, a0),
                    block::requant16::<K>(&k, &l1, a1),
                    block::requant16::<K>(&k, &l2, a2),
                    block::requant16::<K>(&k, &l3, a3),
                ],
            );
            let dst = op.add(ox * c + ch);
            let n = per.min(pixels - ox);
            if left == 64 {
                _mm512_storeu_si512(dst.cast(), z);
            } else if !packed {
                _mm512_mask_storeu_epi8(dst, mask, z);
            } else if c == left {
                // The pixels' outputs lie together.
                let m = if n * left == 64 {
                    !0
                } else {
                    (1u64 << (n * left)) - 1
                };
                _mm512_mask_storeu_epi8(dst, m, z);
            } else {
                let mut bytes = [0i8; 64];
                _mm512_storeu_si512(bytes.as_mut_ptr().cast(), z);
                for p in 0..n {
                    std::ptr::copy_nonoverlapping(
                        bytes.as_ptr().add(p * left),
                        dst.add(p * c),
                        left,
                    );
                }
            }
            ox += per;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::rounding::{quantize_multiplier, ChannelMultipliers, Rounding};

    #[test]
    fn dot_row_equals_the_sums_then_the_requantization() {
        if !dot_available() {
            eprintln!("no AVX512-VNNI and BW on this CPU: the dot-product row cannot run here");
            return;
        }
        let mut seed = 17u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 16) as i32
        };
        let (h, wd) = (5usize, 9usize);
        let mut scratch = Vec::new();
        for (c, kh, kw, stride, dilation, pad_left, off) in [
            (16usize, 3usize, 3usize, 1usize, 1usize, 1usize, 7i32),
            (21, 3, 3, 2, 1, 0, -127),
            (48, 2, 3, 1, 2, 2, 128),
            (32, 3, 3, 2, 1, 1, 0),
            (96, 4, 5, 1, 1, 2, -3),
            (144, 1, 1, 1, 1, 0, 100),
            (200, 3, 2, 3, 1, 1, -57),
            (80, 3, 3, 2, 1, 1, 12),
            (160, 3, 3, 2, 2, 1, -1),
        ] {
            let xs: Vec<i8> = (0..h * wd * c).map(|_| next() as i8).collect();
            let wv: Vec<i8> = (0..kh * kw * c).map(|_| next() as i8).collect();
            let bias: Vec<i32> = (0..c).map(|_| next() % 4000 - 2000).collect();
            let scales: Vec<f64> = (0..c).map(|_| (1 + next() % 500) as f64 * 1e-5).collect();
            // Filter rows over input rows 1, 2, ..., with the first (even `c`) or the
            // last (odd `c`) outside the input.
            let outside = (c % 2) * (kh - 1);
            let rows: Vec<Option<usize>> = (0..kh)
                .map(|ky| (kh == 1 || ky != outside).then_some((ky + 1) * wd * c))
                .collect();
            let taps = DotRow {
                rows: &rows,
                width: wd,
                stride,
                dilation,
                pad_left,
            };
            let ow = (wd + 2 * pad_left).saturating_sub((kw - 1) * dilation + 1) / stride + 1;
            // Every requantization kind: scales above 1/2 (gemmlowp's two steps), the
            // folded form with its sign term and without it (a ReLU's bounds), f32.
            for ((zp, lo, hi), mult) in [(-4, -120, 127), (-4, -4, 100)].into_iter().flat_map(|b| {
                [
                    ChannelMultipliers::Quantized(
                        scales.iter().map(|&s| quantize_multiplier(s)).collect(),
                        Rounding::Double,
                    ),
                    ChannelMultipliers::Quantized(
                        scales
                            .iter()
                            .map(|&s| quantize_multiplier(s * 500.0))
                            .collect(),
                        Rounding::Double,
                    ),
                    ChannelMultipliers::Fp32(scales.iter().map(|&s| s as f32).collect()),
                ]
                .map(|m| (b, m))
            }) {
                let rq = RowRequantizer::new(mult, zp, lo, hi);
                let f = DotFilter::new(&wv, (kh, kw), off, &bias, &rq).expect("a dot filter");
                let mut got = vec![MaybeUninit::new(0i8); ow * c + 5];
                // SAFETY: `dot_available` holds; the rows lie within `xs`.
                unsafe { dot_row(&mut got[..ow * c], &f, &taps, &xs, &mut scratch) };
                // SAFETY: initialized above (and written by `dot_row`).
                let got: Vec<i8> = got.iter().map(|v| unsafe { v.assume_init() }).collect();
                assert!(got[ow * c..].iter().all(|&v| v == 0), "wrote past the row");
                for ox in 0..ow {
                    for ch in 0..c {
                        let mut sum = bias[ch];
                        for (ky, ro) in rows.iter().enumerate() {
                            let Some(ro) = ro else { continue };
                            for kx in 0..kw {
                                let ix = (ox * stride + kx * dilation) as isize - pad_left as isize;
                                if (0..wd as isize).contains(&ix) {
                                    let xv = xs[ro + ix as usize * c + ch] as i32 + off;
                                    sum += xv * wv[(ky * kw + kx) * c + ch] as i32;
                                }
                            }
                        }
                        let want = rq.apply(sum, ch);
                        assert_eq!(
                            got[ox * c + ch],
                            want,
                            "c={c} kh={kh} pixel {ox} channel {ch}"
                        );
                    }
                }
            }
        }
    }

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
