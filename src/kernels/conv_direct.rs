//! Float convolution with few input channels (an image's RGB, say) straight from a
//! zero-padded copy of the input rows, without patches: with `c = 3` every patch row is
//! a copy of 9 floats, and building them cost as much as the product.
//!
//! Each output sums its `kh · kw · c` taps from 0.0 in filter order (`[kh, kw, c]`), the
//! padding's taps included as `0 · w`, each step a fused multiply-add: the order and the
//! operations of the patch product (`nn::conv2d_ex`), so the same bits. A
//! pixel whose window lies wholly in the padding is exactly 0 there, and here too. The
//! filter is read in its HWIO layout: a step of the sum loads 16 (or 8) output channels
//! of one tap, contiguous.

use std::cell::RefCell;
use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::conv_patches::Geom;
use super::nn::Epilogue;

/// At most this many floats of one filter row (`kw · c`) take this path: past that a
/// patch row is long enough for its copy to cost little against its products.
#[cfg(target_arch = "x86_64")]
const MAX_ROW: usize = 16;

/// Pixels per unit of work (a few output rows of one image) that share one padded band.
const UNIT_PIXELS: usize = 256;

thread_local! {
    /// The padded input rows of the current unit of work.
    static BAND: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Whether [`run`] takes a convolution of this geometry with `o` output channels.
pub(super) fn applies(g: &Geom, o: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        g.dilations == [1, 1]
            && g.c > 0
            && g.kh > 0
            && g.kw * g.c <= MAX_ROW
            && g.kh <= 16
            && g.strides[0] > 0
            && g.strides[1] > 0
            && o >= 8
            && o.is_multiple_of(8)
            && g.oh > 0
            && g.ow > 0
            && super::simd::avx2()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (g, o);
        false
    }
}

/// The convolution of `xs` (NHWC, `n` images of `g`'s geometry) with `ws` (HWIO,
/// `o` output channels) into `out` (`n · oh · ow · o`, every element written), then
/// `epi`. Only for a geometry [`applies`] accepts; `par` splits the work across the
/// rayon pool.
#[allow(clippy::too_many_arguments)]
pub(super) fn run(
    g: &Geom,
    n: usize,
    o: usize,
    xs: &[f32],
    ws: &[f32],
    epi: Epilogue,
    out: &mut [MaybeUninit<f32>],
    par: bool,
) {
    assert!(applies(g, o));
    let k = g.kh * g.kw * g.c;
    assert!(xs.len() >= n * g.h * g.wd * g.c && ws.len() >= k * o);
    assert_eq!(out.len(), n * g.oh * g.ow * o);
    if let Some(b) = epi.bias {
        assert!(b.len() >= o);
    }
    let rows = UNIT_PIXELS.div_ceil(g.ow).clamp(1, g.oh);
    // Whether some pixel's window lies wholly in the padding.
    let dead = (0..g.oh).any(|y| !rows_live(g, y)) || (0..g.ow).any(|x| !cols_live(g, x));
    let image = g.oh * g.ow * o;
    let unit = |b: usize, part: usize, dst: &mut [MaybeUninit<f32>]| {
        let y0 = part * rows;
        let y1 = y0 + dst.len() / (g.ow * o);
        BAND.with_borrow_mut(|band| {
            rows_of(g, o, xs, ws, &epi, b, y0, y1, dead, band, dst);
        });
    };
    if par {
        out.par_chunks_mut(image).enumerate().for_each(|(b, img)| {
            img.par_chunks_mut(rows * g.ow * o)
                .enumerate()
                .for_each(|(p, dst)| unit(b, p, dst));
        });
    } else {
        for (b, img) in out.chunks_mut(image).enumerate() {
            for (p, dst) in img.chunks_mut(rows * g.ow * o).enumerate() {
                unit(b, p, dst);
            }
        }
    }
}

/// Output rows `y0..y1` of image `b` into `dst`.
#[allow(clippy::too_many_arguments)]
fn rows_of(
    g: &Geom,
    o: usize,
    xs: &[f32],
    ws: &[f32],
    epi: &Epilogue,
    b: usize,
    y0: usize,
    y1: usize,
    dead: bool,
    band: &mut Vec<f32>,
    dst: &mut [MaybeUninit<f32>],
) {
    let Geom {
        h,
        wd,
        c,
        kh,
        kw,
        strides: [sy, sx],
        pt,
        pl,
        ow,
        ..
    } = *g;
    // Padded rows y0 · sy .. (y1 - 1) · sy + kh, padded columns 0..wp (input column
    // ix is padded column ix + pl).
    let wp = (ow - 1) * sx + kw;
    let nrows = (y1 - 1 - y0) * sy + kh;
    let rs = wp * c;
    band.resize(nrows * rs, 0.0);
    let (in_lo, in_hi) = (pl.min(wp), (pl + wd).min(wp));
    for (i, row) in band.chunks_exact_mut(rs).enumerate() {
        let iy = (y0 * sy + i) as isize - pt as isize;
        if iy < 0 || iy as usize >= h || in_lo >= in_hi {
            row.fill(0.0);
            continue;
        }
        let src = ((b * h + iy as usize) * wd + in_lo - pl) * c;
        row[..in_lo * c].fill(0.0);
        row[in_lo * c..in_hi * c].copy_from_slice(&xs[src..src + (in_hi - in_lo) * c]);
        row[in_hi * c..].fill(0.0);
    }
    #[cfg(target_arch = "x86_64")]
    let pixels = (y1 - y0) * ow;
    let op = dst.as_mut_ptr() as *mut f32;
    // SAFETY: `applies` checked AVX2 and FMA; every pixel's window (kh rows of kw · c floats
    // from its origin, rs apart) lies in the band, the filter holds k · o floats, the
    // bias (if any) o, and dst pixels · o.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        x86::pixels(
            band.as_ptr(),
            rs,
            sy * rs,
            sx * c,
            ow,
            pixels,
            kh,
            kw * c,
            ws.as_ptr(),
            o,
            epi.bias.map_or(std::ptr::null(), |b| b.as_ptr()),
            act(epi),
            op,
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (ws, op);
    if !dead {
        return;
    }
    // A pixel whose window lies wholly in the padding: exactly 0 before the epilogue.
    for y in y0..y1 {
        let row_live = rows_live(g, y);
        for x in 0..ow {
            if !row_live || !cols_live(g, x) {
                let px = &mut dst[((y - y0) * ow + x) * o..][..o];
                px.iter_mut().for_each(|v| {
                    v.write(0.0);
                });
                // SAFETY: written just above.
                let px = unsafe { &mut *(px as *mut [MaybeUninit<f32>] as *mut [f32]) };
                epi.apply(px, o);
            }
        }
    }
}

/// Whether output row `y` reads an input row.
fn rows_live(g: &Geom, y: usize) -> bool {
    (0..g.kh).any(|ky| (y * g.strides[0] + ky).wrapping_sub(g.pt) < g.h)
}

/// Whether output column `x` reads an input column.
fn cols_live(g: &Geom, x: usize) -> bool {
    (0..g.kw).any(|kx| (x * g.strides[1] + kx).wrapping_sub(g.pl) < g.wd)
}

#[cfg(target_arch = "x86_64")]
fn act(epi: &Epilogue) -> u8 {
    match epi.act {
        super::nn::Act::None => 0,
        super::nn::Act::Relu => 1,
        super::nn::Act::Relu6 => 2,
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// `MR` pixels (origins `px`, outputs `out[r]`) × output channels `8 NV` (from
    /// `w`, whose taps are `o` apart), summed over `kh` filter rows of `krow` floats
    /// (`rs` apart in the band), then the bias and activation of the sgemm epilogue.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<const MR: usize, const NV: usize>(
        px: &[*const f32; MR],
        rs: usize,
        kh: usize,
        krow: usize,
        w: *const f32,
        o: usize,
        bias: *const f32,
        act: u8,
        out: &[*mut f32; MR],
    ) {
        let mut acc = [[_mm256_setzero_ps(); NV]; MR];
        let mut wp = w;
        for ky in 0..kh {
            let off = ky * rs;
            for j in 0..krow {
                let mut bv = [_mm256_setzero_ps(); NV];
                for (v, x) in bv.iter_mut().enumerate() {
                    *x = _mm256_loadu_ps(wp.add(8 * v));
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    let av = _mm256_set1_ps(*px[r].add(off + j));
                    for (x, &wv) in row.iter_mut().zip(&bv) {
                        *x = _mm256_fmadd_ps(av, wv, *x);
                    }
                }
                wp = wp.add(o);
            }
        }
        let zero = _mm256_setzero_ps();
        let six = _mm256_set1_ps(6.0);
        for (r, row) in acc.iter().enumerate() {
            for (v, &x) in row.iter().enumerate() {
                let mut y = x;
                if !bias.is_null() {
                    y = _mm256_add_ps(y, _mm256_loadu_ps(bias.add(8 * v)));
                }
                // `max(0, y)` is `0 > y ? 0 : y`, `min(6, y)` `6 < y ? 6 : y`: NaN and
                // -0 pass through, as in the scalar selects.
                if act != 0 {
                    y = _mm256_max_ps(zero, y);
                }
                if act == 2 {
                    y = _mm256_min_ps(six, y);
                }
                _mm256_storeu_ps(out[r].add(8 * v), y);
            }
        }
    }

    /// Every output channel of `MR` consecutive pixels from pixel `p`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn pixel_block<const MR: usize>(
        band: *const f32,
        rs: usize,
        ystep: usize,
        xstep: usize,
        ow: usize,
        p: usize,
        kh: usize,
        krow: usize,
        w: *const f32,
        o: usize,
        bias: *const f32,
        act: u8,
        out: *mut f32,
    ) {
        let mut px = [band; MR];
        let mut dst = [out; MR];
        for r in 0..MR {
            let q = p + r;
            px[r] = band.add(q / ow * ystep + q % ow * xstep);
            dst[r] = out.add(q * o);
        }
        let bias_at = |j: usize| if bias.is_null() { bias } else { bias.add(j) };
        let mut j = 0;
        while j + 16 <= o {
            let d = dst.map(|d| d.add(j));
            block::<MR, 2>(&px, rs, kh, krow, w.add(j), o, bias_at(j), act, &d);
            j += 16;
        }
        if j < o {
            let d = dst.map(|d| d.add(j));
            block::<MR, 1>(&px, rs, kh, krow, w.add(j), o, bias_at(j), act, &d);
        }
    }

    /// Pixels `0..pixels` (rows of `ow`; origins `ystep` apart a row, `xstep` a
    /// pixel) into `out` (`o` a pixel).
    ///
    /// # Safety
    /// AVX2 and FMA; the band holds every pixel's window, `w` `kh · krow · o` floats, `bias`
    /// (null for none) `o`, `out` `pixels · o`; `o` a multiple of 8.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn pixels(
        band: *const f32,
        rs: usize,
        ystep: usize,
        xstep: usize,
        ow: usize,
        pixels: usize,
        kh: usize,
        krow: usize,
        w: *const f32,
        o: usize,
        bias: *const f32,
        act: u8,
        out: *mut f32,
    ) {
        const MR: usize = 6;
        let mut p = 0;
        while p + MR <= pixels {
            pixel_block::<MR>(
                band, rs, ystep, xstep, ow, p, kh, krow, w, o, bias, act, out,
            );
            p += MR;
        }
        macro_rules! tail {
            ($($m:literal)*) => {
                match pixels - p {
                    $($m => pixel_block::<$m>(
                        band, rs, ystep, xstep, ow, p, kh, krow, w, o, bias, act, out,
                    ),)*
                    _ => {}
                }
            };
        }
        tail!(1 2 3 4 5);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::nn::{self, Act, Padding, Window};
    use crate::kernels::value::Value;

    /// Every output summed tap by tap from 0.0 in filter order (fused multiply-adds),
    /// padding taps as 0 · w, then the bias and activation (the patch product's arithmetic).
    #[allow(clippy::too_many_arguments)]
    fn naive(
        g: &Geom,
        n: usize,
        o: usize,
        xs: &[f32],
        ws: &[f32],
        bias: Option<&[f32]>,
        act: Act,
    ) -> Vec<f32> {
        let mut out = Vec::new();
        for b in 0..n {
            for y in 0..g.oh {
                for x in 0..g.ow {
                    let mut live = false;
                    for j in 0..o {
                        let mut s = 0.0f32;
                        for ky in 0..g.kh {
                            for kx in 0..g.kw {
                                let iy = (y * g.strides[0] + ky) as isize - g.pt as isize;
                                let ix = (x * g.strides[1] + kx) as isize - g.pl as isize;
                                let inside = iy >= 0
                                    && (iy as usize) < g.h
                                    && ix >= 0
                                    && (ix as usize) < g.wd;
                                live |= inside;
                                for ci in 0..g.c {
                                    let xv = if inside {
                                        xs[((b * g.h + iy as usize) * g.wd + ix as usize) * g.c
                                            + ci]
                                    } else {
                                        0.0
                                    };
                                    let wv = ws[((ky * g.kw + kx) * g.c + ci) * o + j];
                                    s = xv.mul_add(wv, s);
                                }
                            }
                        }
                        out.push(s);
                    }
                    if !live {
                        let at = out.len() - o;
                        out[at..].fill(0.0);
                    }
                }
            }
        }
        let epi = Epilogue { bias, act };
        epi.apply(&mut out, o);
        out
    }

    #[test]
    fn equal_to_tap_by_tap_sums() {
        if !applies(
            &Geom {
                h: 1,
                wd: 1,
                c: 1,
                kh: 1,
                kw: 1,
                strides: [1, 1],
                dilations: [1, 1],
                pt: 0,
                pl: 0,
                oh: 1,
                ow: 1,
                call: 0,
            },
            8,
        ) {
            eprintln!("no AVX2: the direct convolution is not used on this CPU");
            return;
        }
        let mut seed = 11u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        let mut checked = 0;
        // (h, w, c, kh, kw, stride, padding (top, bottom, left, right), o)
        for &(h, wd, c, kh, kw, s, pad, o) in &[
            (
                16usize,
                16usize,
                3usize,
                3usize,
                3usize,
                1usize,
                (1, 1, 1, 1),
                16usize,
            ),
            (16, 16, 3, 3, 3, 2, (0, 1, 0, 1), 32),
            (7, 9, 1, 5, 5, 1, (2, 2, 2, 2), 8),
            (5, 6, 4, 3, 3, 2, (0, 0, 0, 0), 24),
            (9, 7, 2, 3, 5, 1, (1, 1, 2, 2), 40),
            (3, 3, 3, 3, 3, 1, (4, 4, 4, 4), 16),
            (6, 5, 3, 2, 2, 3, (0, 1, 1, 0), 8),
        ] {
            let (pt, pb, pl, pr) = pad;
            let oh = (h + pt + pb - kh) / s + 1;
            let ow = (wd + pl + pr - kw) / s + 1;
            let n = 3;
            let g = Geom {
                h,
                wd,
                c,
                kh,
                kw,
                strides: [s, s],
                dilations: [1, 1],
                pt,
                pl,
                oh,
                ow,
                call: 0,
            };
            assert!(applies(&g, o));
            let xs: Vec<f32> = (0..n * h * wd * c).map(|_| next() * 4.0).collect();
            let mut ws: Vec<f32> = (0..kh * kw * c * o).map(|_| next()).collect();
            if c == 3 && s == 1 && pt == 4 {
                // An infinite and a NaN weight: the padding's 0 · w is NaN then, and a
                // window wholly in the padding stays 0.
                ws[5] = f32::INFINITY;
                ws[o + 3] = f32::NAN;
            }
            let bias: Vec<f32> = (0..o)
                .map(|j| match j % 7 {
                    3 => f32::NAN,
                    5 => -0.0,
                    _ => next() * 8.0,
                })
                .collect();
            for (with_bias, act) in [
                (false, Act::None),
                (true, Act::None),
                (true, Act::Relu),
                (true, Act::Relu6),
                (false, Act::Relu6),
            ] {
                let b = with_bias.then_some(&bias[..]);
                let want = naive(&g, n, o, &xs, &ws, b, act);
                let epi = Epilogue { bias: b, act };
                for par in [false, true] {
                    let mut got = vec![MaybeUninit::new(f32::NAN); n * oh * ow * o];
                    run(&g, n, o, &xs, &ws, epi, &mut got, par);
                    let got: Vec<u32> = got
                        .iter()
                        .map(|v| unsafe { v.assume_init() }.to_bits())
                        .collect();
                    let want: Vec<u32> = want.iter().map(|v| v.to_bits()).collect();
                    assert_eq!(
                        got, want,
                        "{h}x{wd}x{c} k{kh}x{kw} s{s} pad {pad:?} o{o} bias {with_bias} {act:?}"
                    );
                }
                checked += 1;
            }
            // And what nn::conv2d_ex gives (this path or the patches, the same bits).
            let win = Window {
                strides: [s, s],
                dilations: [1, 1],
                padding: Padding::Explicit([(pt, pb), (pl, pr)]),
            };
            let x = Value::from_vec(vec![n, h, wd, c], xs.clone());
            let w = Value::from_vec(vec![kh, kw, c, o], ws.clone());
            let epi = Epilogue {
                bias: Some(&bias),
                act: Act::Relu6,
            };
            let got = nn::conv2d_ex(&x, &w, &win, epi).unwrap();
            let want = naive(&g, n, o, &xs, &ws, Some(&bias), Act::Relu6);
            assert_eq!(
                got.slice::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
        assert_eq!(checked, 35);
    }
}
