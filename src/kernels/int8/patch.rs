//! One output pixel's byte patch for the integer products ([`super::gemm::conv`]):
//! `x + 128` for each input value under the filter, in filter order (HWC), and the
//! padding byte for each tap outside the input.

use super::gemm::Geom;

/// `dst[i] = src[i] + 128` as bytes, 16 and then 8 at a time (short runs, such as a
/// 3-channel image's 3-tap rows of 9 bytes, are most of a first layer's patches).
#[inline(always)]
fn flip(dst: &mut [u8], src: &[i8]) {
    let n = dst.len().min(src.len());
    #[allow(unused_mut)]
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE2 is part of x86-64; every load and store is within the first `n`
    // values of both slices.
    unsafe {
        use std::arch::x86_64::*;
        let bias = _mm_set1_epi8(i8::MIN);
        let (d, s) = (dst.as_mut_ptr(), src.as_ptr());
        while i + 16 <= n {
            let v = _mm_loadu_si128(s.add(i) as *const __m128i);
            _mm_storeu_si128(d.add(i) as *mut __m128i, _mm_xor_si128(v, bias));
            i += 16;
        }
        // The rest as one or two (overlapping) moves of 8, or of 4, bytes: a byte's
        // value does not depend on which move writes it.
        let rest = n - i;
        if rest >= 8 {
            for at in [i, n - 8] {
                let v = _mm_loadl_epi64(s.add(at) as *const __m128i);
                _mm_storel_epi64(d.add(at) as *mut __m128i, _mm_xor_si128(v, bias));
            }
            i = n;
        } else if rest >= 4 {
            for at in [i, n - 4] {
                let v = (s.add(at) as *const u32).read_unaligned();
                (d.add(at) as *mut u32).write_unaligned(v ^ 0x8080_8080);
            }
            i = n;
        }
    }
    for (d, &s) in dst[i..n].iter_mut().zip(&src[i..n]) {
        *d = s as u8 ^ 0x80;
    }
}

/// Fills `patch` (at least `kh·kw·c` bytes) for output pixel `in_image` (`oy·ow + ox`)
/// of image `xs`: a filter row whose taps all lie inside the input with unit dilation
/// is one contiguous run of `kw·c` input values, copied at once; other taps go one by
/// one, `pad` standing for each outside the input.
#[inline(never)]
pub(super) fn fill(g: &Geom<'_>, xs: &[i8], in_image: usize, pad: u8, patch: &mut [u8]) {
    let (oy, ox) = (in_image / g.ow, in_image % g.ow);
    let (c, kw) = (g.c, g.kw);
    let run = kw * c;
    let ix0 = (ox * g.win.strides[1]) as isize - g.pl as isize;
    let dx = g.win.dilations[1];
    let row_inside = ix0 >= 0 && (dx == 1 || kw <= 1) && ix0 as usize + kw <= g.wd;
    let iy0 = (oy * g.win.strides[0]) as isize - g.pt as isize;
    let dy = g.win.dilations[0];
    if row_inside && run > 0 && g.kh > 0 && iy0 >= 0 && iy0 as usize + (g.kh - 1) * dy < g.h {
        // The whole window inside the input (most pixels): kh runs, a row apart.
        // (Indexed rather than `chunks_exact`, whose length division cost as much as
        // a 3-channel pixel's copies.)
        let step = dy * g.wd * c;
        let s = (iy0 as usize * g.wd + ix0 as usize) * c;
        let (xs, patch) = (
            &xs[s..s + (g.kh - 1) * step + run],
            &mut patch[..g.kh * run],
        );
        for ky in 0..g.kh {
            flip(&mut patch[ky * run..][..run], &xs[ky * step..][..run]);
        }
        return;
    }
    for ky in 0..g.kh {
        let dst = &mut patch[ky * run..(ky + 1) * run];
        let iy = (oy * g.win.strides[0] + ky * g.win.dilations[0]) as isize - g.pt as isize;
        if iy < 0 || iy >= g.h as isize {
            dst.fill(pad);
            continue;
        }
        let base = iy as usize * g.wd;
        if row_inside {
            let s = (base + ix0 as usize) * c;
            flip(dst, &xs[s..s + run]);
            continue;
        }
        if dx == 1 {
            // Taps lo..hi of the row lie inside the input, as one run.
            let lo = ((-ix0).max(0) as usize).min(kw);
            let hi = ((g.wd as isize - ix0).max(0) as usize).clamp(lo, kw);
            dst[..lo * c].fill(pad);
            if lo < hi {
                let s = (base + (ix0 + lo as isize) as usize) * c;
                flip(&mut dst[lo * c..hi * c], &xs[s..s + (hi - lo) * c]);
            }
            dst[hi * c..].fill(pad);
            continue;
        }
        for (kx, d) in dst.chunks_exact_mut(c.max(1)).enumerate() {
            let ix = ix0 + (kx * dx) as isize;
            if ix < 0 || ix >= g.wd as isize {
                d.fill(pad);
            } else {
                let s = (base + ix as usize) * c;
                flip(d, &xs[s..s + c]);
            }
        }
    }
}

/// Fills the patches of `count` consecutive output pixels of one output row, from
/// `in_image` on, into `patches` (`ldu` bytes apart, `ldu >= kh·kw·c`). The pixels
/// whose windows lie wholly inside the input (unit column dilation) share their tap
/// offsets, shifted by `stride·c` values per pixel: their `kh` runs are copied
/// without working out each pixel's geometry; the others go through [`fill`].
pub(super) fn fill_row(
    g: &Geom<'_>,
    xs: &[i8],
    in_image: usize,
    count: usize,
    pad: u8,
    patches: &mut [u8],
    ldu: usize,
) {
    let (oy, ox0) = (in_image / g.ow, in_image % g.ow);
    debug_assert!(ox0 + count <= g.ow);
    let (c, kw, kh) = (g.c, g.kw, g.kh);
    let run = kw * c;
    let k = kh * run;
    let (sy, sx) = (g.win.strides[0], g.win.strides[1]);
    let dy = g.win.dilations[0];
    let iy0 = (oy * sy) as isize - g.pt as isize;
    let rows_inside = kh > 0 && iy0 >= 0 && iy0 as usize + (kh - 1) * dy < g.h;
    let cols_ok = g.win.dilations[1] == 1 || kw <= 1;
    // Output columns lo..hi: `ox·sx - pl >= 0` and `ox·sx - pl + kw <= wd`.
    let (lo, hi) = if rows_inside && cols_ok && run > 0 && sx > 0 && g.wd + g.pl >= kw {
        (g.pl.div_ceil(sx), (g.wd + g.pl - kw) / sx + 1)
    } else {
        (0, 0)
    };
    let (lo, hi) = (lo.clamp(ox0, ox0 + count), hi.clamp(ox0, ox0 + count));
    let (lo, hi) = if lo < hi {
        (lo, hi)
    } else {
        (ox0 + count, ox0 + count)
    };
    for ox in (ox0..lo).chain(hi..ox0 + count) {
        let j = ox - ox0;
        fill(g, xs, in_image + j, pad, &mut patches[j * ldu..][..k]);
    }
    if lo == hi {
        return;
    }
    let step = dy * g.wd * c;
    let mut s = (iy0 as usize * g.wd + lo * sx - g.pl) * c;
    #[cfg(target_arch = "x86_64")]
    if run <= 16 && crate::kernels::simd::vnni() {
        let last = s + (hi - 1 - lo) * sx * c + (kh - 1) * step + run;
        let (from, to) = ((lo - ox0) * ldu, (hi - 1 - ox0) * ldu + k);
        // SAFETY: AVX-512BW and VL are present (with VNNI); the last pixel's runs end
        // within `xs` (checked here) and within its patch, and each earlier one's
        // lie before them.
        unsafe {
            short_runs(
                &mut patches[from..to],
                ldu,
                &xs[s..last],
                hi - lo,
                (kh, run, step, sx * c),
            )
        };
        return;
    }
    for ox in lo..hi {
        let j = ox - ox0;
        let patch = &mut patches[j * ldu..][..k];
        let src = &xs[s..s + (kh - 1) * step + run];
        for ky in 0..kh {
            flip(&mut patch[ky * run..][..run], &src[ky * step..][..run]);
        }
        s += sx * c;
    }
}

/// The interior patches of [`fill_row`] whose filter rows are runs of at most 16
/// bytes, one masked move each: `pixels` patches `ldu` bytes apart, their `kh` runs
/// of `run` bytes from `xs` at `ky · step` plus `pstep` per pixel.
///
/// # Safety
/// AVX-512BW and AVX-512VL must be present, `run <= 16`, and the slices hold every
/// run (`patches` the last patch's `kh · run` bytes, `xs` its last run).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn short_runs(
    patches: &mut [u8],
    ldu: usize,
    xs: &[i8],
    pixels: usize,
    (kh, run, step, pstep): (usize, usize, usize, usize),
) {
    use std::arch::x86_64::*;
    debug_assert!(run <= 16 && pixels > 0);
    debug_assert!(patches.len() >= (pixels - 1) * ldu + kh * run);
    debug_assert!(xs.len() >= (pixels - 1) * pstep + (kh - 1) * step + run);
    let mask: __mmask16 = ((1u32 << run) - 1) as __mmask16;
    let flip = _mm_set1_epi8(i8::MIN);
    let (d, x) = (patches.as_mut_ptr().cast::<i8>(), xs.as_ptr());
    for p in 0..pixels {
        let (dp, xp) = (d.add(p * ldu), x.add(p * pstep));
        for ky in 0..kh {
            let v = _mm_maskz_loadu_epi8(mask, xp.add(ky * step));
            _mm_mask_storeu_epi8(dp.add(ky * run), mask, _mm_xor_si128(v, flip));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::nn::{Padding, Window};

    #[test]
    fn flip_covers_every_length() {
        for n in 0..40 {
            let src: Vec<i8> = (0..n).map(|i| (i as i8).wrapping_mul(37)).collect();
            let mut dst = vec![0x55u8; n + 2];
            flip(&mut dst[1..n + 1], &src);
            assert_eq!(dst[0], 0x55, "flip {n} wrote before");
            assert_eq!(dst[n + 1], 0x55, "flip {n} wrote after");
            for (i, (&d, &s)) in dst[1..n + 1].iter().zip(&src).enumerate() {
                assert_eq!(d as i32, s as i32 + 128, "flip {n} at {i}");
            }
        }
    }

    #[test]
    fn equal_to_tap_by_tap_bytes() {
        let mut checked = 0;
        let mut rows_checked = 0;
        // (h, w, c, kh, kw, stride, dilation, pad top, pad left)
        for &(h, wd, c, kh, kw, s, d, pt, pl) in &[
            (
                16usize, 16usize, 3usize, 3usize, 3usize, 1usize, 1usize, 1usize, 1usize,
            ),
            (8, 8, 16, 3, 3, 2, 1, 0, 0),
            (7, 9, 5, 3, 5, 2, 1, 1, 2),
            (5, 6, 1, 5, 5, 1, 1, 4, 4),
            (9, 11, 2, 3, 3, 1, 2, 2, 2),
            (6, 5, 7, 1, 4, 1, 1, 0, 3),
            (4, 4, 3, 3, 7, 1, 1, 1, 5),
            (16, 16, 3, 3, 3, 2, 1, 1, 1),
            (10, 13, 2, 2, 3, 3, 1, 0, 1),
        ] {
            let (eh, ew) = ((kh - 1) * d + 1, (kw - 1) * d + 1);
            let oh = (h + 2 * pt).saturating_sub(eh) / s + 1;
            let ow = (wd + 2 * pl).saturating_sub(ew) / s + 1;
            let win = Window {
                strides: [s, s],
                dilations: [d, d],
                padding: Padding::Explicit([(pt, pt), (pl, pl)]),
            };
            let g = Geom {
                win: &win,
                h,
                wd,
                c,
                kh,
                kw,
                oh,
                ow,
                pt,
                pl,
            };
            let xs: Vec<i8> = (0..h * wd * c)
                .map(|i| (i as i32 * 29 - 100) as i8)
                .collect();
            let k = kh * kw * c;
            let pad = 0x33u8;
            let mut wants = Vec::with_capacity(oh * ow);
            for px in 0..oh * ow {
                let (y, x) = (px / ow, px % ow);
                let mut want = Vec::with_capacity(k);
                for ky in 0..kh {
                    for kx in 0..kw {
                        let iy = (y * s + ky * d) as isize - pt as isize;
                        let ix = (x * s + kx * d) as isize - pl as isize;
                        for ci in 0..c {
                            if iy < 0 || iy >= h as isize || ix < 0 || ix >= wd as isize {
                                want.push(pad);
                            } else {
                                let v = xs[(iy as usize * wd + ix as usize) * c + ci];
                                want.push((v as i32 + 128) as u8);
                            }
                        }
                    }
                }
                let mut got = vec![0xAAu8; k + 1];
                fill(&g, &xs, px, pad, &mut got[..k]);
                assert_eq!(got[k], 0xAA, "wrote past the patch");
                assert_eq!(
                    &got[..k],
                    &want[..],
                    "{h}x{wd}x{c} k{kh}x{kw} s{s} d{d} pad {pt},{pl} pixel {px}"
                );
                wants.push(want);
                checked += 1;
            }
            // Every run of pixels along a row, with room after each patch.
            let ldu = k + 3;
            for y in 0..oh {
                for x0 in 0..ow {
                    for count in 1..=ow - x0 {
                        let mut got = vec![0xAAu8; count * ldu];
                        fill_row(&g, &xs, y * ow + x0, count, pad, &mut got, ldu);
                        for j in 0..count {
                            let p = &got[j * ldu..][..ldu];
                            assert_eq!(
                                &p[..k],
                                &wants[y * ow + x0 + j][..],
                                "{h}x{wd}x{c} k{kh}x{kw} s{s} d{d} pad {pt},{pl} row {y} from {x0} count {count} pixel {j}"
                            );
                            assert!(
                                p[k..].iter().all(|&b| b == 0xAA),
                                "fill_row wrote past a patch"
                            );
                        }
                        rows_checked += 1;
                    }
                }
            }
        }
        assert!(checked > 500, "{checked}");
        assert!(rows_checked > 2000, "{rows_checked}");
    }
}
