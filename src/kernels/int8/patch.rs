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
                checked += 1;
            }
        }
        assert!(checked > 500, "{checked}");
    }
}
