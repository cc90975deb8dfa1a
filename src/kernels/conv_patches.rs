//! Patch rows of a float convolution tile (`[kh, kw, c]` taps per output pixel, zeros
//! for the taps in the padding), built a filter row at a time: with dilation 1 the taps
//! of one filter row that lie inside the input are one contiguous run of `kw' * c`
//! input floats, copied at once. The values written are those of a tap-by-tap copy.
//!
//! With dilation 1 along the width, the filter rows an output row reads are first
//! copied into a zero-padded band (`kh` rows of the padded width), so that every
//! pixel's patch is `kh` copies of `kw * c` floats at a fixed stride, without bounds
//! logic per tap.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

/// A number no other convolution call gets, which keys the cached band.
pub(super) fn next_call() -> u64 {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    CALLS.fetch_add(1, Ordering::Relaxed)
}

/// The padded input rows of one output row, reused across the tiles a thread runs.
#[derive(Default)]
struct Band {
    /// (call, image, output row) it holds, when it holds one.
    key: Option<(u64, usize, usize)>,
    rows: Vec<f32>,
    /// Whether any of its rows lies inside the input.
    any: bool,
}

thread_local! {
    static BAND: RefCell<Band> = RefCell::new(Band::default());
}

/// Bands larger than this (floats) are not built.
const MAX_BAND: usize = 1 << 20;

/// A convolution's geometry (NHWC input, HWIO filter).
#[derive(Debug, Clone, Copy)]
pub(super) struct Geom {
    pub h: usize,
    pub wd: usize,
    pub c: usize,
    pub kh: usize,
    pub kw: usize,
    pub strides: [usize; 2],
    pub dilations: [usize; 2],
    /// Leading padding (top, left).
    pub pt: usize,
    pub pl: usize,
    pub oh: usize,
    pub ow: usize,
    /// From [`next_call`], once per convolution call.
    pub call: u64,
}

/// Writes the patches of output pixels `first..first + live.len()` (pixels counted over
/// the whole batch) into `patches` (`kh * kw * c` floats each) and sets `live[j]` to
/// whether pixel `first + j` reads any input element.
pub(super) fn build(g: &Geom, xs: &[f32], first: usize, patches: &mut [f32], live: &mut [bool]) {
    let wp = (g.ow.max(1) - 1) * g.strides[1] + g.kw;
    let banded = g.dilations[1] == 1
        && g.kh * g.kw * g.c > 0
        && g.oh * g.ow > 0
        && wp <= 2 * (g.wd + g.kw)
        && g.kh * wp * g.c <= MAX_BAND;
    if banded {
        BAND.with_borrow_mut(|band| build_banded(g, band, xs, first, patches, live));
    } else {
        build_any(g, xs, first, patches, live);
    }
}

/// [`build`] through a padded band (dilation 1 along the width).
fn build_banded(
    g: &Geom,
    band: &mut Band,
    xs: &[f32],
    first: usize,
    patches: &mut [f32],
    live: &mut [bool],
) {
    let Geom {
        h,
        wd,
        c,
        kh,
        kw,
        strides: [sy, sx],
        dilations: [dy, _],
        pt,
        pl,
        oh,
        ow,
        call,
    } = *g;
    let wp = (ow - 1) * sx + kw;
    let (k, krow, rowlen) = (kh * kw * c, kw * c, wp * c);
    // Padded columns pl..pl + wd hold the input's columns.
    let (in_lo, in_hi) = (pl.min(wp), (pl + wd).min(wp));
    let (mut b, mut y, mut ox) = (first / (oh * ow), first / ow % oh, first % ow);
    for (patch, live) in patches.chunks_exact_mut(k).zip(live.iter_mut()) {
        if band.key != Some((call, b, y)) {
            band.rows.resize(kh * rowlen, 0.0);
            band.any = false;
            for (ky, row) in band.rows.chunks_exact_mut(rowlen).enumerate() {
                let iy = (y * sy + ky * dy) as isize - pt as isize;
                if iy < 0 || iy as usize >= h || in_lo >= in_hi {
                    row.fill(0.0);
                    continue;
                }
                band.any = true;
                let src = ((b * h + iy as usize) * wd + in_lo - pl) * c;
                row[..in_lo * c].fill(0.0);
                row[in_lo * c..in_hi * c].copy_from_slice(&xs[src..src + (in_hi - in_lo) * c]);
                row[in_hi * c..].fill(0.0);
            }
            band.key = Some((call, b, y));
        }
        // The window's columns ox * sx .. + kw (padded) meet the input's.
        let x0 = ox * sx;
        *live = band.any && x0 < in_hi && x0 + kw > in_lo;
        for (dst, row) in patch
            .chunks_exact_mut(krow)
            .zip(band.rows.chunks_exact(rowlen))
        {
            copy_short(dst, &row[x0 * c..x0 * c + krow]);
        }
        ox += 1;
        if ox == ow {
            ox = 0;
            y += 1;
            if y == oh {
                y = 0;
                b += 1;
            }
        }
    }
}

/// [`build`] tap row by tap row, for any geometry.
fn build_any(g: &Geom, xs: &[f32], first: usize, patches: &mut [f32], live: &mut [bool]) {
    let Geom {
        h,
        wd,
        c,
        kh,
        kw,
        strides: [sy, sx],
        dilations: [dy, dx],
        pt,
        pl,
        oh,
        ow,
        call: _,
    } = *g;
    let k = kh * kw * c;
    let krow = kw * c;
    if k == 0 || oh == 0 || ow == 0 {
        live.fill(false);
        return;
    }
    let (mut b, mut y, mut ox) = (first / (oh * ow), first / ow % oh, first % ow);
    // Filter columns lo..hi land inside the input: 0 <= x0 + kx * dx < wd.
    let cols = |ox: usize| {
        let x0 = (ox * sx) as isize - pl as isize;
        let lo = if x0 >= 0 {
            0
        } else if dx == 1 {
            ((-x0) as usize).min(kw)
        } else {
            ((-x0) as usize).div_ceil(dx).min(kw)
        };
        let hi = if x0 >= wd as isize {
            0
        } else if dx == 1 {
            ((wd as isize - x0) as usize).min(kw)
        } else {
            ((wd as isize - x0) as usize).div_ceil(dx).min(kw)
        };
        (x0, lo, hi.max(lo))
    };
    let (mut x0, mut lo, mut hi) = cols(ox);
    for (patch, live) in patches.chunks_exact_mut(k).zip(live.iter_mut()) {
        let mut any = false;
        for (ky, dst) in patch.chunks_exact_mut(krow).enumerate() {
            let iy = (y * sy + ky * dy) as isize - pt as isize;
            if iy < 0 || iy as usize >= h || lo == hi {
                zero_short(dst);
                continue;
            }
            any = true;
            let row = (b * h + iy as usize) * wd;
            zero_short(&mut dst[..lo * c]);
            let ix = (x0 + (lo * dx) as isize) as usize;
            if dx == 1 {
                let src = &xs[(row + ix) * c..(row + ix + hi - lo) * c];
                copy_short(&mut dst[lo * c..hi * c], src);
            } else {
                for (i, tap) in dst[lo * c..hi * c].chunks_exact_mut(c).enumerate() {
                    let off = (row + ix + i * dx) * c;
                    copy_short(tap, &xs[off..off + c]);
                }
            }
            zero_short(&mut dst[hi * c..]);
        }
        *live = any;
        ox += 1;
        if ox == ow {
            ox = 0;
            y += 1;
            if y == oh {
                y = 0;
                b += 1;
            }
        }
        (x0, lo, hi) = cols(ox);
    }
}

/// `dst.copy_from_slice(src)`, with runs shorter than 32 as a few (overlapping)
/// unaligned moves rather than a `memcpy` call each.
#[inline(always)]
fn copy_short(dst: &mut [f32], src: &[f32]) {
    let n = dst.len();
    assert_eq!(n, src.len());
    if n >= 32 {
        dst.copy_from_slice(src);
        return;
    }
    let (d, s) = (dst.as_mut_ptr(), src.as_ptr());
    // SAFETY: every access below is `w` floats at an offset in 0..=n - w of both slices.
    unsafe {
        macro_rules! mv {
            ($w:literal, $at:expr) => {
                (d.add($at) as *mut [f32; $w])
                    .write_unaligned((s.add($at) as *const [f32; $w]).read_unaligned())
            };
        }
        if n >= 16 {
            mv!(16, 0);
            mv!(16, n - 16);
        } else if n >= 8 {
            mv!(8, 0);
            mv!(8, n - 8);
        } else if n >= 4 {
            mv!(4, 0);
            mv!(4, n - 4);
        } else if n >= 2 {
            mv!(2, 0);
            mv!(2, n - 2);
        } else if n == 1 {
            mv!(1, 0);
        }
    }
}

/// `dst.fill(0.0)`, with short runs as straight-line stores (see [`copy_short`]).
#[inline(always)]
fn zero_short(dst: &mut [f32]) {
    let n = dst.len();
    if n >= 32 {
        dst.fill(0.0);
        return;
    }
    let d = dst.as_mut_ptr();
    // SAFETY: every store below is `w` floats at an offset in 0..=n - w of `dst`.
    unsafe {
        macro_rules! z {
            ($w:literal, $at:expr) => {
                (d.add($at) as *mut [f32; $w]).write_unaligned([0.0; $w])
            };
        }
        if n >= 16 {
            z!(16, 0);
            z!(16, n - 16);
        } else if n >= 8 {
            z!(8, 0);
            z!(8, n - 8);
        } else if n >= 4 {
            z!(4, 0);
            z!(4, n - 4);
        } else if n >= 2 {
            z!(2, 0);
            z!(2, n - 2);
        } else if n == 1 {
            z!(1, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tap-by-tap patches the convolution used to build.
    fn naive(g: &Geom, xs: &[f32], first: usize, rows: usize) -> (Vec<f32>, Vec<bool>) {
        let k = g.kh * g.kw * g.c;
        let mut p = vec![f32::NAN; rows * k];
        let mut live = vec![false; rows];
        for j in 0..rows {
            let px = first + j;
            let (b, y, ox) = (px / (g.oh * g.ow), px / g.ow % g.oh, px % g.ow);
            for ky in 0..g.kh {
                for kx in 0..g.kw {
                    let iy = (y * g.strides[0] + ky * g.dilations[0]) as isize - g.pt as isize;
                    let ix = (ox * g.strides[1] + kx * g.dilations[1]) as isize - g.pl as isize;
                    let dst = &mut p[j * k + (ky * g.kw + kx) * g.c..][..g.c];
                    if iy < 0 || iy as usize >= g.h || ix < 0 || ix as usize >= g.wd {
                        dst.fill(0.0);
                    } else {
                        let off = ((b * g.h + iy as usize) * g.wd + ix as usize) * g.c;
                        dst.copy_from_slice(&xs[off..off + g.c]);
                        live[j] = true;
                    }
                }
            }
        }
        (p, live)
    }

    #[test]
    fn equal_to_tap_by_tap_copies() {
        let mut checked = 0;
        for &(h, wd, c, kh, kw, s, d, pt, pl) in &[
            (
                16usize, 16usize, 3usize, 3usize, 3usize, 1usize, 1usize, 1usize, 1usize,
            ),
            (8, 8, 16, 3, 3, 2, 1, 0, 0),
            (7, 9, 5, 3, 5, 2, 1, 1, 2),
            (9, 11, 2, 3, 3, 1, 2, 2, 2),
            (5, 6, 33, 2, 2, 3, 3, 4, 4),
            (4, 4, 1, 5, 5, 1, 1, 4, 4),
            (6, 5, 7, 1, 4, 1, 1, 0, 3),
        ] {
            let n = 2;
            let (eh, ew) = ((kh - 1) * d + 1, (kw - 1) * d + 1);
            let oh = (h + 2 * pt).saturating_sub(eh) / s + 1;
            let ow = (wd + 2 * pl).saturating_sub(ew) / s + 1;
            let g = Geom {
                h,
                wd,
                c,
                kh,
                kw,
                strides: [s, s],
                dilations: [d, d],
                pt,
                pl,
                oh,
                ow,
                call: next_call(),
            };
            let xs: Vec<f32> = (0..n * h * wd * c).map(|i| i as f32 + 0.5).collect();
            let total = n * oh * ow;
            let k = kh * kw * c;
            for (first, rows) in [(0, total), (1, total - 1), (total / 2, 3.min(total / 2))] {
                let (want, want_live) = naive(&g, &xs, first, rows);
                // The band (when the geometry takes it) and the tap-row path; the
                // band path twice, the second time from the band it left.
                for path in 0..3 {
                    let mut got = vec![f32::NAN; rows * k];
                    let mut live = vec![true; rows];
                    if path == 0 {
                        build_any(&g, &xs, first, &mut got, &mut live);
                    } else {
                        build(&g, &xs, first, &mut got, &mut live);
                    }
                    assert_eq!(
                        got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "{h}x{wd}x{c} k{kh}x{kw} s{s} d{d} pad {pt},{pl} from {first} path {path}"
                    );
                    assert_eq!(live, want_live);
                }
                // Another call on other data at the same addresses' rows: the band
                // left by this one must not be reused.
                let g2 = Geom {
                    call: next_call(),
                    ..g
                };
                let xs2: Vec<f32> = xs.iter().map(|v| -v).collect();
                let (want2, _) = naive(&g2, &xs2, first, rows);
                let mut got2 = vec![f32::NAN; rows * k];
                build(&g2, &xs2, first, &mut got2, &mut vec![false; rows]);
                assert_eq!(
                    got2.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want2.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 21);
    }

    #[test]
    fn short_copies_and_fills_cover_every_length() {
        for n in 0..70 {
            let src: Vec<f32> = (0..n).map(|i| i as f32 + 1.0).collect();
            let mut dst = vec![f32::NAN; n + 2];
            copy_short(&mut dst[1..n + 1], &src);
            assert!(
                dst[0].is_nan() && dst[n + 1].is_nan(),
                "copy {n} wrote outside"
            );
            assert_eq!(&dst[1..n + 1], &src[..], "copy {n}");
            zero_short(&mut dst[1..n + 1]);
            assert!(
                dst[0].is_nan() && dst[n + 1].is_nan(),
                "zero {n} wrote outside"
            );
            assert!(dst[1..n + 1].iter().all(|v| v.to_bits() == 0), "zero {n}");
        }
    }
}
