//! One output pixel's byte patch for the integer products ([`super::gemm::conv`]):
//! `x + 128` for each input value under the filter, in filter order (HWC), and the
//! padding byte for each tap outside the input.

use super::gemm::Geom;

/// `dst[i] = src[i] + 128` as bytes, 16 and then 8 at a time (short runs, such as a
/// 3-channel image's 3-tap rows of 9 bytes, are most of a first layer's patches).
#[inline(always)]
fn flip(dst: &mut [u8], src: &[i8]) {
    let n = dst.len().min(src.len());
    let mut i = 0;
    while i + 16 <= n {
        let d: &mut [u8; 16] = (&mut dst[i..i + 16]).try_into().unwrap();
        let s: &[i8; 16] = src[i..i + 16].try_into().unwrap();
        for (d, &s) in d.iter_mut().zip(s) {
            *d = s as u8 ^ 0x80;
        }
        i += 16;
    }
    if i + 8 <= n {
        let s: &[i8; 8] = src[i..i + 8].try_into().unwrap();
        let v = u64::from_ne_bytes(s.map(|b| b as u8)) ^ 0x8080_8080_8080_8080;
        dst[i..i + 8].copy_from_slice(&v.to_ne_bytes());
        i += 8;
    }
    for (d, &s) in dst[i..n].iter_mut().zip(&src[i..n]) {
        *d = s as u8 ^ 0x80;
    }
}

/// Fills `patch` (at least `kh·kw·c` bytes) for output pixel `in_image` (`oy·ow + ox`)
/// of image `xs`: a filter row whose taps all lie inside the input with unit dilation
/// is one contiguous run of `kw·c` input values, copied at once; other taps go one by
/// one, `pad` standing for each outside the input.
#[inline]
pub(super) fn fill(g: &Geom<'_>, xs: &[i8], in_image: usize, pad: u8, patch: &mut [u8]) {
    let (oy, ox) = (in_image / g.ow, in_image % g.ow);
    let (c, kw) = (g.c, g.kw);
    let run = kw * c;
    let ix0 = (ox * g.win.strides[1]) as isize - g.pl as isize;
    let dx = g.win.dilations[1];
    let row_inside = ix0 >= 0 && (dx == 1 || kw <= 1) && ix0 as usize + kw <= g.wd;
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
