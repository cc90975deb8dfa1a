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
        if i + 8 <= n {
            let v = _mm_loadl_epi64(s.add(i) as *const __m128i);
            _mm_storel_epi64(d.add(i) as *mut __m128i, _mm_xor_si128(v, bias));
            i += 8;
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
        let step = dy * g.wd * c;
        let mut s = (iy0 as usize * g.wd + ix0 as usize) * c;
        for dst in patch[..g.kh * run].chunks_exact_mut(run) {
            flip(dst, &xs[s..s + run]);
            s += step;
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
