//! Float depthwise convolution (multiplier 1) on AVX2 + FMA / AVX-512F, one output row at
//! a time. Each output sums its taps from 0.0 in filter order (taps that fall in the
//! padding are left out, as in the scalar loop), each tap a fused multiply-add (one
//! rounding: `vfmadd231ps`, the scalar loop's `f32::mul_add`), then adds the bias and
//! applies the activation: the bits of `nn::depthwise_conv2d`'s scalar loop. The vectors
//! run across channels; several horizontally adjacent pixels are summed at once, so that
//! their independent sums overlap instead of waiting on one another.

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{interior, interior512};

/// The geometry of one output row: the input rows it reads and its window.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // read by the x86-64 kernels only
pub(crate) struct DwRow<'a> {
    /// The whole input and filter (`[kh, kw, c]`), and the bias (`[c]`).
    pub xs: &'a [f32],
    pub ws: &'a [f32],
    pub bias: Option<&'a [f32]>,
    /// 0: none, 1: ReLU, 2: ReLU6.
    pub act: u8,
    /// (offset of input row `iy` at column 0, filter row `ky`), in filter order, for
    /// the filter rows inside the input.
    pub rows: &'a [(usize, usize)],
    /// Channels of the input (the stride between pixels), and how many of them, from
    /// the start of `xs`, `ws`, `bias` and `out`, the kernels cover.
    pub c: usize,
    pub chans: usize,
    pub kw: usize,
    pub sx: usize,
    pub dx: usize,
    pub pl: usize,
    /// The input's width.
    pub wd: usize,
}

/// The row kernel for one vector width: `$lanes` channels per vector, blocks of two
/// vectors then one, four pixels at a time; eight at a time when the channels fill
/// one vector but not two.
#[cfg(target_arch = "x86_64")]
macro_rules! dw_kernel {
    ($name:ident, $feat:literal, $v:ty, $lanes:literal, $zero:ident, $set1:ident, $load:ident,
     $store:ident, $add:ident, $fmadd:ident, $max:ident, $min:ident) => {
        /// Writes channels `0..chans / $lanes * $lanes` of the `ow` output pixels of
        /// the row into `out` (the row, `[ow, c]`). Pixels `lo..hi` have their whole
        /// window inside the input horizontally; the others skip the taps outside it.
        ///
        /// # Safety
        /// The CPU must have the features; for every `ox` in `lo..hi`, `ox * sx >= pl`
        /// and `ox * sx + (kw - 1) * dx < wd + pl`; every `rows` offset is that of a
        /// whole input row of `wd * c` values in `xs`, every filter row `< kh` of `ws`;
        /// `out` holds `ow * c` values; `dx > 0`.
        #[target_feature(enable = $feat)]
        pub(crate) unsafe fn $name(g: &DwRow, lo: usize, hi: usize, ow: usize, out: *mut f32) {
            #[inline(always)]
            unsafe fn pixels<const P: usize>(g: &DwRow, ox: usize, out: *mut f32) {
                let mut ch = 0;
                // With strides and dilations of 1, pixel p's tap kx reads what pixel
                // p + 1's tap kx - 1 reads: with both steps the same `c`, the
                // compiler loads each input vector once for the block's taps.
                let unit = g.sx == 1 && g.dx == 1;
                while ch + 2 * $lanes <= g.chans {
                    if g.kw == 3 && unit {
                        block::<P, 2, true>(g, 0, 3, 3, ox, ch, out);
                    } else if g.kw == 3 {
                        block::<P, 2, false>(g, 0, 3, 3, ox, ch, out);
                    } else {
                        block::<P, 2, false>(g, 0, g.kw, g.kw, ox, ch, out);
                    }
                    ch += 2 * $lanes;
                }
                if ch + $lanes <= g.chans {
                    if g.kw == 3 && unit {
                        block::<P, 1, true>(g, 0, 3, 3, ox, ch, out);
                    } else if g.kw == 3 {
                        block::<P, 1, false>(g, 0, 3, 3, ox, ch, out);
                    } else {
                        block::<P, 1, false>(g, 0, g.kw, g.kw, ox, ch, out);
                    }
                }
            }

            /// Pixel `ox`, whose window may reach into the padding horizontally: only
            /// its taps `k0..k1` are inside the input.
            #[inline(always)]
            unsafe fn edge(g: &DwRow, ox: usize, out: *mut f32) {
                let (x0, end) = (ox * g.sx, g.wd + g.pl);
                // (Without a division for dilation 1: a division per edge pixel
                // costs about as much as its sums.)
                let k0 = if x0 >= g.pl {
                    0
                } else if g.dx == 1 {
                    g.pl - x0
                } else {
                    (g.pl - x0).div_ceil(g.dx)
                };
                let k1 = if x0 >= end {
                    0
                } else if g.dx == 1 {
                    g.kw.min(end - x0)
                } else {
                    g.kw.min((end - x0 - 1) / g.dx + 1)
                };
                let (k0, k1) = if k0 < k1 { (k0, k1) } else { (0, 0) };
                let mut ch = 0;
                while ch + 2 * $lanes <= g.chans {
                    block::<1, 2, false>(g, k0, k1, g.kw, ox, ch, out);
                    ch += 2 * $lanes;
                }
                if ch + $lanes <= g.chans {
                    block::<1, 1, false>(g, k0, k1, g.kw, ox, ch, out);
                }
            }

            /// Channels `ch..ch + $lanes * V` of pixels `ox..ox + P`, from their taps
            /// `k0..k1` of each filter row (of `kw`); `UNIT`: the strides and
            /// dilations are 1.
            #[inline(always)]
            unsafe fn block<const P: usize, const V: usize, const UNIT: bool>(
                g: &DwRow,
                k0: usize,
                k1: usize,
                kw: usize,
                ox: usize,
                ch: usize,
                out: *mut f32,
            ) {
                let c = g.c;
                let (xs, ws) = (g.xs.as_ptr(), g.ws.as_ptr());
                // Unused (and possibly wrapped) when k0 == k1.
                let col0 = (ox * g.sx + k0 * g.dx).wrapping_sub(g.pl).wrapping_mul(c) + ch;
                let (pstep, kstep) = if UNIT { (c, c) } else { (g.sx * c, g.dx * c) };
                let mut acc: [[$v; V]; P] = [[$zero(); V]; P];
                for &(base, ky) in g.rows {
                    let xrow = xs.wrapping_add(base.wrapping_add(col0));
                    let wrow = ws.add(ky * kw * c + ch);
                    for kx in k0..k1 {
                        let mut wv: [$v; V] = [$zero(); V];
                        for (v, w) in wv.iter_mut().enumerate() {
                            *w = $load(wrow.add(kx * c + $lanes * v));
                        }
                        for (p, a) in acc.iter_mut().enumerate() {
                            let xp = xrow.add(p * pstep + (kx - k0) * kstep);
                            for v in 0..V {
                                let xv = $load(xp.add($lanes * v));
                                a[v] = $fmadd(xv, wv[v], a[v]);
                            }
                        }
                    }
                }
                let zero = $zero();
                let six = $set1(6.0);
                for (p, a) in acc.iter_mut().enumerate() {
                    let dst = out.add((ox + p) * c + ch);
                    for (v, &sum) in a.iter().enumerate() {
                        let mut s = sum;
                        if let Some(b) = g.bias {
                            s = $add(s, $load(b.as_ptr().add(ch + $lanes * v)));
                        }
                        // max(0, s) is `s < 0 ? 0 : s` (NaN stays NaN), min(6, r)
                        // `r > 6 ? 6 : r`: the scalar ReLU and ReLU6.
                        match g.act {
                            1 => s = $max(zero, s),
                            2 => s = $min(six, $max(zero, s)),
                            _ => {}
                        }
                        $store(dst.add($lanes * v), s);
                    }
                }
            }

            /// One vector of channels (16 on AVX-512, 8 on AVX2) of pixels
            /// `ox..ox + 8`, so that eight sums overlap.
            #[inline(always)]
            unsafe fn narrow(g: &DwRow, ox: usize, out: *mut f32) {
                if g.kw == 3 && g.sx == 1 && g.dx == 1 {
                    block::<8, 1, true>(g, 0, 3, 3, ox, 0, out);
                } else if g.kw == 3 {
                    block::<8, 1, false>(g, 0, 3, 3, ox, 0, out);
                } else {
                    block::<8, 1, false>(g, 0, g.kw, g.kw, ox, 0, out);
                }
            }

            let lo = lo.min(ow);
            let hi = hi.clamp(lo, ow);
            for ox in 0..lo {
                edge(g, ox, out);
            }
            // Blocks of `p` pixels; the last few by a block that overlaps the one
            // before it (its pixels computed again, to the same bits), or one pixel at
            // a time when there are fewer than `p`.
            let narrow_row = g.chans >= $lanes && g.chans < 2 * $lanes;
            let p = if narrow_row { 8 } else { 4 };
            let mut ox = lo;
            let mut last = false;
            while ox < hi {
                if ox + p > hi {
                    if hi - lo < p {
                        pixels::<1>(g, ox, out);
                        ox += 1;
                        continue;
                    }
                    ox = hi - p;
                    last = true;
                }
                if narrow_row {
                    narrow(g, ox, out);
                } else {
                    pixels::<4>(g, ox, out);
                }
                if last {
                    break;
                }
                ox += p;
            }
            for ox in hi..ow {
                edge(g, ox, out);
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::DwRow;
    use std::arch::x86_64::*;

    dw_kernel!(
        interior,
        "avx2,fma",
        __m256,
        8,
        _mm256_setzero_ps,
        _mm256_set1_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_add_ps,
        _mm256_fmadd_ps,
        _mm256_max_ps,
        _mm256_min_ps
    );
    dw_kernel!(
        interior512,
        "avx512f",
        __m512,
        16,
        _mm512_setzero_ps,
        _mm512_set1_ps,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_add_ps,
        _mm512_fmadd_ps,
        _mm512_max_ps,
        _mm512_min_ps
    );
}
