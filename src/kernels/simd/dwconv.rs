//! Float depthwise convolution (multiplier 1) on AVX2, for the output pixels of a row
//! whose window lies wholly inside the input horizontally. Each output sums its taps
//! from 0.0 in filter order (rows of the filter that fall in the padding are left out,
//! as in the scalar loop), each product and each sum rounded, then adds the bias and
//! applies the activation: the bits of `nn::depthwise_conv2d`'s scalar loop. The vectors
//! run across channels; several horizontally adjacent pixels are summed at once, so that
//! their independent sums overlap instead of waiting on one another.

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::interior;

/// The geometry of one output row: the input rows it reads and its window.
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
    pub c: usize,
    pub kw: usize,
    pub sx: usize,
    pub dx: usize,
    pub pl: usize,
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::DwRow;
    use std::arch::x86_64::*;

    /// Writes channels `0..c / 8 * 8` of output pixels `lo..hi` of the row into `out`
    /// (the row, `[ow, c]`).
    ///
    /// # Safety
    /// AVX2 must be present; for every `ox` in `lo..hi`, `ox * sx >= pl` and
    /// `ox * sx + (kw - 1) * dx < wd + pl`, every `rows` offset is that of a whole input
    /// row of `wd * c` values in `xs`, every filter row `< kh` of `ws`, and `out` holds
    /// `hi * c` values.
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn interior(g: &DwRow, lo: usize, hi: usize, out: *mut f32) {
        let mut ox = lo;
        while ox + 4 <= hi {
            pixels::<4>(g, ox, out);
            ox += 4;
        }
        while ox < hi {
            pixels::<1>(g, ox, out);
            ox += 1;
        }
    }

    #[inline(always)]
    unsafe fn pixels<const P: usize>(g: &DwRow, ox: usize, out: *mut f32) {
        let c = g.c;
        let mut ch = 0;
        while ch + 16 <= c {
            if g.kw == 3 {
                block::<P, 2>(g, 3, ox, ch, out);
            } else {
                block::<P, 2>(g, g.kw, ox, ch, out);
            }
            ch += 16;
        }
        if ch + 8 <= c {
            if g.kw == 3 {
                block::<P, 1>(g, 3, ox, ch, out);
            } else {
                block::<P, 1>(g, g.kw, ox, ch, out);
            }
        }
    }

    /// Channels `ch..ch + 8 * V` of pixels `ox..ox + P`.
    #[inline(always)]
    unsafe fn block<const P: usize, const V: usize>(
        g: &DwRow,
        kw: usize,
        ox: usize,
        ch: usize,
        out: *mut f32,
    ) {
        let c = g.c;
        let (xs, ws) = (g.xs.as_ptr(), g.ws.as_ptr());
        let col0 = (ox * g.sx - g.pl) * c + ch;
        let (pstep, kstep) = (g.sx * c, g.dx * c);
        let mut acc = [[_mm256_setzero_ps(); V]; P];
        for &(base, ky) in g.rows {
            let xrow = xs.add(base + col0);
            let wrow = ws.add(ky * kw * c + ch);
            for kx in 0..kw {
                let mut wv = [_mm256_setzero_ps(); V];
                for (v, w) in wv.iter_mut().enumerate() {
                    *w = _mm256_loadu_ps(wrow.add(kx * c + 8 * v));
                }
                for (p, a) in acc.iter_mut().enumerate() {
                    let xp = xrow.add(p * pstep + kx * kstep);
                    for v in 0..V {
                        let xv = _mm256_loadu_ps(xp.add(8 * v));
                        a[v] = _mm256_add_ps(a[v], _mm256_mul_ps(xv, wv[v]));
                    }
                }
            }
        }
        let zero = _mm256_setzero_ps();
        let six = _mm256_set1_ps(6.0);
        for (p, a) in acc.iter_mut().enumerate() {
            let dst = out.add((ox + p) * c + ch);
            for (v, &sum) in a.iter().enumerate() {
                let mut s = sum;
                if let Some(b) = g.bias {
                    s = _mm256_add_ps(s, _mm256_loadu_ps(b.as_ptr().add(ch + 8 * v)));
                }
                // max(0, s) is `s < 0 ? 0 : s` (NaN stays NaN), min(6, r) `r > 6 ? 6 : r`.
                match g.act {
                    1 => s = _mm256_max_ps(zero, s),
                    2 => s = _mm256_min_ps(six, _mm256_max_ps(zero, s)),
                    _ => {}
                }
                _mm256_storeu_ps(dst.add(8 * v), s);
            }
        }
    }
}
