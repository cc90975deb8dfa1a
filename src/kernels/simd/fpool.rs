//! Float max and average pooling of one output row, 16 and then 8 channels of a pixel
//! in AVX2 registers, with the arithmetic of `nn::pool`'s scalar loop: each output
//! starts from -inf (max) or 0.0 (average), takes the window's elements inside the input
//! in row-major order (`x > acc ? x : acc`, or `acc + x`), and an average is divided by
//! that count. A count that is a power of two (2 × 2 windows) multiplies by its
//! reciprocal instead, which is the same value: `1 / count` is exact, and `x · 2^-k`
//! and `x / 2^k` are both the exact quotient rounded once.

/// The geometry of one output row of a pooling (NHWC, one image's rows).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // read by the x86-64 kernel only
pub(crate) struct PoolRow {
    /// Offset of the image in the input.
    pub base: usize,
    pub h: usize,
    pub wd: usize,
    pub c: usize,
    pub ow: usize,
    pub ksize: [usize; 2],
    pub sx: usize,
    /// The output row's first window row (input coordinates, may be negative).
    pub y0: isize,
    pub pl: usize,
    pub max: bool,
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::row;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::PoolRow;
    use std::arch::x86_64::*;

    /// Writes the row's `ow · c` outputs into `out`.
    ///
    /// # Safety
    /// AVX2; `c` a multiple of 8; `xs` holds the image's `h · wd · c` values from
    /// `base`; `out` holds `ow · c` values.
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn row(g: &PoolRow, xs: &[f32], out: *mut f32) {
        let (c, wd) = (g.c, g.wd);
        let y0 = g.y0;
        let ys = (
            y0.max(0) as usize,
            (y0 + g.ksize[0] as isize).clamp(0, g.h as isize) as usize,
        );
        let ys = (ys.0.min(ys.1), ys.1);
        let xp = xs.as_ptr().add(g.base);
        for ox in 0..g.ow {
            let x0 = (ox * g.sx) as isize - g.pl as isize;
            let xr0 = x0.max(0) as usize;
            let xr1 = (x0 + g.ksize[1] as isize).clamp(0, wd as isize) as usize;
            let xr = (xr0.min(xr1), xr1);
            let count = (ys.1 - ys.0) * (xr.1 - xr.0);
            let dst = out.add(ox * c);
            let mut ch = 0;
            while ch + 16 <= c {
                pixel::<2>(g.max, xp, wd, c, ys, xr, count, ch, dst);
                ch += 16;
            }
            if ch < c {
                pixel::<1>(g.max, xp, wd, c, ys, xr, count, ch, dst);
            }
        }
    }

    /// Channels `ch..ch + 8 V` of one output pixel over input rows `ys` and columns
    /// `xr` (`count` elements).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn pixel<const V: usize>(
        max: bool,
        xp: *const f32,
        wd: usize,
        c: usize,
        ys: (usize, usize),
        xr: (usize, usize),
        count: usize,
        ch: usize,
        dst: *mut f32,
    ) {
        let init = if max {
            _mm256_set1_ps(f32::NEG_INFINITY)
        } else {
            _mm256_setzero_ps()
        };
        let mut acc = [init; V];
        for iy in ys.0..ys.1 {
            let rowp = xp.add((iy * wd) * c + ch);
            for ix in xr.0..xr.1 {
                let p = rowp.add(ix * c);
                for (v, a) in acc.iter_mut().enumerate() {
                    let x = _mm256_loadu_ps(p.add(8 * v));
                    // `max(x, acc)` is `x > acc ? x : acc` (NaN and -0 do not replace).
                    *a = if max {
                        _mm256_max_ps(x, *a)
                    } else {
                        _mm256_add_ps(*a, x)
                    };
                }
            }
        }
        if !max && count > 0 {
            if count.is_power_of_two() {
                let r = _mm256_set1_ps(1.0 / count as f32);
                for a in acc.iter_mut() {
                    *a = _mm256_mul_ps(*a, r);
                }
            } else {
                let d = _mm256_set1_ps(count as f32);
                for a in acc.iter_mut() {
                    *a = _mm256_div_ps(*a, d);
                }
            }
        }
        for (v, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(dst.add(ch + 8 * v), *a);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::kernels::nn::{pool, Padding, PoolKind, Window};
    use crate::kernels::value::Value;

    /// `nn::pool`'s scalar loop, element by element.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        xs: &[f32],
        [n, h, wd, c]: [usize; 4],
        k: [usize; 2],
        s: [usize; 2],
        (oh, pt): (usize, usize),
        (ow, pl): (usize, usize),
        max: bool,
    ) -> Vec<f32> {
        let mut out = Vec::new();
        for b in 0..n {
            for y in 0..oh {
                for x in 0..ow {
                    for ch in 0..c {
                        let mut acc = if max { f32::NEG_INFINITY } else { 0.0 };
                        let mut count = 0;
                        for ky in 0..k[0] {
                            for kx in 0..k[1] {
                                let iy = (y * s[0] + ky) as isize - pt as isize;
                                let ix = (x * s[1] + kx) as isize - pl as isize;
                                if iy < 0 || iy >= h as isize || ix < 0 || ix >= wd as isize {
                                    continue;
                                }
                                let v = xs[((b * h + iy as usize) * wd + ix as usize) * c + ch];
                                count += 1;
                                if max {
                                    if v > acc {
                                        acc = v;
                                    }
                                } else {
                                    acc += v;
                                }
                            }
                        }
                        if !max && count > 0 {
                            acc /= count as f32;
                        }
                        out.push(acc);
                    }
                }
            }
        }
        out
    }

    #[test]
    fn rows_equal_the_scalar_loop() {
        let mut seed = 3u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        let mut checked = 0;
        for &(h, wd, c, k, s, same) in &[
            (
                16usize,
                16usize,
                16usize,
                [2usize, 2usize],
                [2usize, 2usize],
                false,
            ),
            (3, 3, 32, [2, 2], [1, 1], false),
            (7, 9, 8, [3, 3], [2, 2], true),
            (5, 6, 24, [3, 2], [1, 2], true),
            (4, 4, 40, [4, 4], [1, 1], true),
            (6, 5, 8, [1, 3], [1, 1], false),
        ] {
            let n = 2;
            let mut xs: Vec<f32> = (0..n * h * wd * c).map(|_| next() * 1e3).collect();
            // Values the comparisons and sums must treat as the scalar loop does.
            for (i, v) in [f32::NAN, -0.0, 0.0, f32::INFINITY, f32::NEG_INFINITY, 1e-40]
                .into_iter()
                .enumerate()
            {
                xs[i * 37 % (n * h * wd * c)] = v;
            }
            let padding = if same { Padding::Same } else { Padding::Valid };
            let win = Window {
                strides: s,
                dilations: [1, 1],
                padding: padding.clone(),
            };
            let x = Value::from_vec(vec![n, h, wd, c], xs.clone());
            for max in [false, true] {
                let kind = if max { PoolKind::Max } else { PoolKind::Avg };
                let got = pool(&x, kind, k, &win).unwrap();
                let oh = crate::kernels::nn::out_size(h, k[0], s[0], 1, &padding, 0).unwrap();
                let ow = crate::kernels::nn::out_size(wd, k[1], s[1], 1, &padding, 1).unwrap();
                let want = naive(&xs, [n, h, wd, c], k, s, oh, ow, max);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(got.slice::<f32>().unwrap()),
                    bits(&want),
                    "{h}x{wd}x{c} k{k:?} s{s:?} same {same} max {max}"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 12);
    }
}
