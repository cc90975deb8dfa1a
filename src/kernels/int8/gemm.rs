//! The integer matrix products behind the int8 and hybrid convolutions and fully
//! connected ops: activations as byte patches built straight into the layout the
//! product reads (`x + 128` for an int8 value `x`, and for a padding tap, which the
//! reference kernels skip, the byte that stands for 0 after the input offset), int8
//! weights, wrapping i32 sums ([`crate::kernels::simd::igemm::igemm_u8`]). A 1×1
//! convolution with stride 1 and no padding reads its input pixels as they are. The
//! callers add the bias and requantize each accumulator exactly as before, so outputs
//! keep their bits.

use rayon::prelude::*;

use crate::kernels::nn::Window;
use crate::kernels::rounding::RowRequantizer;
use crate::kernels::simd::igemm::{igemm_u8, igemm_u8_requant, requant_fused, PackedWeights};

/// Output pixels per matrix product.
pub(super) const TILE: usize = 192;

/// Work (multiply-adds) below which a product stays on the calling thread.
const PAR_THRESHOLD: usize = 1 << 16;

/// Geometry of a convolution over NHWC input.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geom<'a> {
    pub win: &'a Window,
    pub h: usize,
    pub wd: usize,
    pub c: usize,
    pub kh: usize,
    pub kw: usize,
    pub oh: usize,
    pub ow: usize,
    pub pt: usize,
    pub pl: usize,
}

/// Runs a convolution with HWIO int8 weights over `n` images: `image(b)` gives image
/// `b`'s int8 values and the offset added to each (minus a zero point, so within
/// -127..=128: the products' `shift` of 128 - offset keeps every value in a byte). For each
/// tile of output pixels, `finish(first_pixel, acc, out)` turns the i32 sums
/// (`[pixels, o]`, bias not included) into the tile's outputs.
pub(super) fn conv<'a, T: Send>(
    g: Geom<'_>,
    n: usize,
    packed: &PackedWeights,
    out: &mut [T],
    image: impl Fn(usize) -> (&'a [i8], i32) + Sync,
    finish: impl Fn(usize, &[i32], &mut [T]) + Sync,
) {
    let o = packed.n;
    tiles(
        g,
        n,
        packed,
        out,
        image,
        |first, patches, ldu, shifts, out_t, acc_buf| {
            let acc = grown(acc_buf, shifts.len() * o);
            igemm_u8(shifts.len(), patches, ldu, packed, shifts, acc);
            finish(first, acc, out_t);
        },
    );
}

/// [`conv`] to int8 outputs, `rq.rows(sums, bias, out)` on each tile, fused into the
/// product ([`igemm_u8_requant`]): returns the outputs, or `None` where the product
/// has no such kernel (then [`conv`] does it in two steps).
pub(super) fn conv_requant<'a>(
    g: Geom<'_>,
    n: usize,
    packed: &PackedWeights,
    image: impl Fn(usize) -> (&'a [i8], i32) + Sync,
    bias: &[i32],
    rq: &RowRequantizer,
) -> Option<Vec<i8>> {
    if !requant_fused(packed, rq) {
        return None;
    }
    let len = n * g.oh * g.ow * packed.n;
    let mut out = Vec::with_capacity(len);
    let spare = &mut out.spare_capacity_mut()[..len];
    tiles(
        g,
        n,
        packed,
        spare,
        image,
        |_, patches, ldu, shifts, out_t, _| {
            let done =
                igemm_u8_requant(shifts.len(), patches, ldu, packed, shifts, bias, rq, out_t);
            debug_assert!(done);
        },
    );
    // SAFETY: the fused product wrote every output of every tile (`requant_fused`).
    unsafe { out.set_len(len) };
    Some(out)
}

/// Splits the output into tiles of at most [`TILE`] pixels (in parallel when the work
/// is large), builds each tile's patches (or finds them in the input, see
/// `conv_windows`) and calls `product(first_pixel, patches, row_stride, shifts,
/// out_tile, acc_buffer)`; the row stride may be less than the patch length.
fn tiles<'a, T: Send>(
    g: Geom<'_>,
    n: usize,
    packed: &PackedWeights,
    out: &mut [T],
    image: impl Fn(usize) -> (&'a [i8], i32) + Sync,
    product: impl Fn(usize, &[u8], usize, &[i32], &mut [T], &mut Vec<i32>) + Sync,
) {
    let (k, o) = (packed.k, packed.n);
    let ldu = packed.ldu();
    let pixels = n * g.oh * g.ow;
    if o == 0 || pixels == 0 {
        return;
    }
    // Every output pixel reads one input pixel, the one at its own position.
    let pointwise = g.kh == 1
        && g.kw == 1
        && g.win.strides == [1, 1]
        && (g.oh, g.ow, g.pt, g.pl) == (g.h, g.wd, 0, 0);
    let per_image = g.oh * g.ow;
    let windows = crate::kernels::conv_windows::windows(
        [g.h, g.wd, g.c],
        [g.kh, g.kw],
        g.win.strides,
        g.win.dilations,
        [g.pt, g.pl],
        [g.oh, g.ow],
    );
    if let (Some(wins), false) = (windows, pointwise) {
        // Each image's bytes `x + 128` once, then its runs' patches are rows of them
        // `wins.step` apart (and `ldu - k` bytes past the image, met by zero weights).
        let image_len = g.h * g.wd * g.c;
        let image_in = |b: usize, out_b: &mut [T], bytes: &mut Vec<u8>, acc_buf: &mut Vec<i32>| {
            let (xs, off) = image(b);
            let u = grown(bytes, image_len + ldu);
            xor_copy(&mut u[..image_len], &xs[..image_len]);
            u[image_len..].fill(0);
            let shifts = [128 - off; TILE];
            // Each run in near-equal pieces of at most `TILE` pixels.
            let pieces = wins.len.div_ceil(TILE);
            let piece = wins.len.div_ceil(pieces);
            for (r, out_r) in out_b.chunks_mut(wins.len * o).enumerate() {
                let start = wins.run_start(r);
                for (j, out_t) in out_r.chunks_mut(piece * o).enumerate() {
                    let rows = out_t.len() / o;
                    let at = start + j * piece * wins.step;
                    let first = b * per_image + r * wins.len + j * piece;
                    product(first, &u[at..], wins.step, &shifts[..rows], out_t, acc_buf);
                }
            }
        };
        let image_out = |b: usize, out_b: &mut [T]| with_scratch(|p, a| image_in(b, out_b, p, a));
        if pixels * k * o >= PAR_THRESHOLD {
            out.par_chunks_mut(per_image * o)
                .enumerate()
                .for_each(|(b, o)| image_out(b, o));
        } else {
            out.chunks_mut(per_image * o)
                .enumerate()
                .for_each(|(b, o)| image_out(b, o));
        }
        return;
    }
    let tile_in = |t: usize, out_t: &mut [T], patches_buf: &mut Vec<u8>, acc_buf: &mut Vec<i32>| {
        let rows = out_t.len() / o;
        let patches = grown(patches_buf, rows * ldu);
        let mut shifts = [0i32; TILE];
        let first = t * TILE;
        let (mut b, mut in_image) = (first / per_image, first % per_image);
        if pointwise && ldu == g.c && in_image + rows <= per_image {
            // The tile's input pixels lie one after the other, as its patches do.
            let (xs, off) = image(b);
            shifts[..rows].fill(128 - off);
            xor_copy(patches, &xs[in_image * g.c..(in_image + rows) * g.c]);
            product(first, patches, ldu, &shifts[..rows], out_t, acc_buf);
            return;
        }
        let mut j = 0;
        while j < rows {
            if in_image == per_image {
                (b, in_image) = (b + 1, 0);
            }
            let (xs, off) = image(b);
            // `(x + off) + shift` with `shift = 128 - off` is `x + 128` whatever the
            // offset; a padding tap stands for `x + off = 0`.
            if pointwise {
                shifts[j] = 128 - off;
                let patch = &mut patches[j * ldu..][..g.c];
                xor_copy(patch, &xs[in_image * g.c..(in_image + 1) * g.c]);
                (j, in_image) = (j + 1, in_image + 1);
                continue;
            }
            // The rest of this output row, as far as the tile goes.
            let count = (rows - j).min(g.ow - in_image % g.ow);
            shifts[j..j + count].fill(128 - off);
            let pad = (128 - off) as u8;
            let row = &mut patches[j * ldu..(j + count) * ldu];
            super::patch::fill_row(&g, xs, in_image, count, pad, row, ldu);
            (j, in_image) = (j + count, in_image + count);
        }
        product(first, patches, ldu, &shifts[..rows], out_t, acc_buf);
    };
    let tile = |t: usize, out_t: &mut [T]| with_scratch(|p, a| tile_in(t, out_t, p, a));
    if pixels * k * o >= PAR_THRESHOLD {
        out.par_chunks_mut(TILE * o)
            .enumerate()
            .for_each(|(t, o)| tile(t, o));
    } else {
        out.chunks_mut(TILE * o)
            .enumerate()
            .for_each(|(t, o)| tile(t, o));
    }
}

/// `dst[i] = src[i] + 128` as bytes.
#[inline(always)]
fn xor_copy(dst: &mut [u8], src: &[i8]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = s as u8 ^ 0x80;
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<(Vec<u8>, Vec<i32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Runs `f` with this thread's patch and accumulator buffers (fresh ones when a
/// caller up the stack holds them), so that tiles do not allocate and zero-fill.
pub(super) fn with_scratch<R>(f: impl FnOnce(&mut Vec<u8>, &mut Vec<i32>) -> R) -> R {
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut s) => {
            let (p, a) = &mut *s;
            f(p, a)
        }
        Err(_) => f(&mut Vec::new(), &mut Vec::new()),
    })
}

/// The first `n` values of `v`, grown to hold them. Their contents are whatever
/// the last user left: every user writes each value it reads (the products write
/// every accumulator; patches fill their bytes up to `k`, and the bytes past `k`
/// meet zero weights).
pub(super) fn grown<V: Copy + Default>(v: &mut Vec<V>, n: usize) -> &mut [V] {
    if v.len() < n {
        v.resize(n, V::default());
    }
    &mut v[..n]
}

/// A fully connected op over `batch` rows of `k` int8 values: `row(b)` gives row `b`
/// and the offset added to each value; `packed` the weights. `finish(row, acc, out)`
/// turns one row's sums into its outputs.
pub(super) fn fully_connected<'a, T: Send>(
    batch: usize,
    packed: &PackedWeights,
    out: &mut [T],
    row: impl Fn(usize) -> (&'a [i8], i32) + Sync,
    finish: impl Fn(usize, &[i32], &mut [T]) + Sync,
) {
    let (k, units) = (packed.k, packed.n);
    let ldu = packed.ldu();
    if units == 0 || batch == 0 {
        return;
    }
    const ROWS: usize = 16;
    let block = |blk: usize, out_b: &mut [T]| {
        let rows = out_b.len() / units;
        let mut a = vec![0u8; rows * ldu];
        let mut shifts = [0i32; ROWS];
        for (j, dst) in a.chunks_exact_mut(ldu).enumerate() {
            let (xs, off) = row(blk * ROWS + j);
            shifts[j] = 128 - off;
            for (d, &s) in dst.iter_mut().zip(&xs[..k]) {
                *d = s as u8 ^ 0x80;
            }
        }
        let mut acc = vec![0i32; rows * units];
        igemm_u8(rows, &a, ldu, packed, &shifts[..rows], &mut acc);
        for (j, (acc, out)) in acc
            .chunks_exact(units)
            .zip(out_b.chunks_exact_mut(units))
            .enumerate()
        {
            finish(blk * ROWS + j, acc, out);
        }
    };
    if batch * k * units >= PAR_THRESHOLD {
        out.par_chunks_mut(ROWS * units)
            .enumerate()
            .for_each(|(b, o)| block(b, o));
    } else {
        out.chunks_mut(ROWS * units)
            .enumerate()
            .for_each(|(b, o)| block(b, o));
    }
}
