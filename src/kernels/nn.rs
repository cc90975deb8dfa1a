//! Float32 neural-network kernels in NHWC: convolutions, matrix products, pooling,
//! batch norm (inference), softmax. Accumulation is in f32, as TensorFlow's CPU kernels do.

use rayon::prelude::*;

use super::value::Value;
use crate::error::{Error, Result};

/// Work (multiply-adds) below which a kernel stays on the calling thread.
const PAR_THRESHOLD: usize = 1 << 16;

/// An activation a float matrix kernel applies as it stores its outputs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Act {
    #[default]
    None,
    Relu,
    Relu6,
}

/// What a float convolution or matrix product does to each output before it leaves
/// the cache: `BiasAdd` (over the last axis), then the activation, with the f32
/// arithmetic of those ops (the plan fuses them into the product; see
/// `plan::fuse_float_epilogues`), so the bits are those of the ops run one by one.
#[derive(Debug, Clone, Copy, Default)]
pub struct Epilogue<'a> {
    pub bias: Option<&'a [f32]>,
    pub act: Act,
}

impl Epilogue<'_> {
    fn check(&self, shape: &[usize]) -> Result<()> {
        match (self.bias, shape.last()) {
            (Some(b), Some(&c)) if b.len() != c => Err(Error::msg(format!(
                "bias of {} elements does not match input shape {shape:?}",
                b.len()
            ))),
            _ => Ok(()),
        }
    }

    /// The same, applied by the matrix product as it stores its outputs.
    fn for_sgemm(&self) -> super::simd::sgemm::Epi<'_> {
        let act = match self.act {
            Act::None => 0,
            Act::Relu => 1,
            Act::Relu6 => 2,
        };
        super::simd::sgemm::Epi {
            bias: self.bias,
            act,
        }
    }

    /// Applies it to whole rows of `o` channels.
    #[inline(always)]
    pub(super) fn apply(&self, rows: &mut [f32], o: usize) {
        if o == 0 {
            return;
        }
        match self.bias {
            Some(b) => match self.act {
                Act::None => epilogue_rows(rows, b, |v| v),
                Act::Relu => epilogue_rows(rows, b, relu),
                Act::Relu6 => epilogue_rows(rows, b, relu6),
            },
            None => match self.act {
                Act::None => {}
                Act::Relu => rows.iter_mut().for_each(|v| *v = relu(*v)),
                Act::Relu6 => rows.iter_mut().for_each(|v| *v = relu6(*v)),
            },
        }
    }
}

#[inline(always)]
fn epilogue_rows(rows: &mut [f32], b: &[f32], act: impl Fn(f32) -> f32) {
    for r in rows.chunks_exact_mut(b.len()) {
        for (v, &bv) in r.iter_mut().zip(b) {
            *v = act(*v + bv);
        }
    }
}

/// `Relu` as the element-wise kernel computes it (NaN and -0 pass through).
#[inline(always)]
fn relu(x: f32) -> f32 {
    if x < 0.0 {
        0.0
    } else {
        x
    }
}

/// `Relu6` as the element-wise kernel computes it (two selects, which vectorize).
#[inline(always)]
fn relu6(x: f32) -> f32 {
    let y = if x < 0.0 { 0.0 } else { x };
    if y > 6.0 {
        6.0
    } else {
        y
    }
}

/// A vector of `len` floats whose elements the caller writes (each exactly once)
/// through the spare capacity before `set_len`, without a zero fill first.
fn output_vec(len: usize) -> Vec<f32> {
    Vec::with_capacity(len)
}

thread_local! {
    /// Patch rows of the current convolution tile, reused across tiles and calls.
    static PATCHES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[derive(Debug, Clone, PartialEq)]
pub enum Padding {
    Same,
    Valid,
    /// (before, after) for height and width.
    Explicit([(usize, usize); 2]),
}

/// Spatial parameters of a convolution or pooling window.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    pub strides: [usize; 2],
    pub dilations: [usize; 2],
    pub padding: Padding,
}

/// Output size and leading padding of one spatial dimension, as TensorFlow computes them.
pub fn out_size(
    input: usize,
    k: usize,
    stride: usize,
    dilation: usize,
    padding: &Padding,
    dim: usize,
) -> Result<(usize, usize)> {
    let eff = (k.max(1) - 1) * dilation + 1;
    match padding {
        Padding::Valid => {
            if input < eff {
                return Err(Error::msg(format!(
                    "window of {eff} is larger than the input ({input}) with VALID padding"
                )));
            }
            Ok(((input - eff) / stride + 1, 0))
        }
        Padding::Same => {
            let out = input.div_ceil(stride);
            let needed = ((out.max(1) - 1) * stride + eff).saturating_sub(input);
            Ok((out, needed / 2))
        }
        Padding::Explicit(p) => {
            let (before, after) = p[dim];
            let padded = input + before + after;
            if padded < eff {
                return Err(Error::msg("window is larger than the padded input"));
            }
            Ok(((padded - eff) / stride + 1, before))
        }
    }
}

fn dims4(v: &Value, what: &str) -> Result<[usize; 4]> {
    <[usize; 4]>::try_from(v.shape.as_slice())
        .map_err(|_| Error::msg(format!("{what} must have rank 4, got shape {:?}", v.shape)))
}

/// `Conv2D` in NHWC with an HWIO filter.
pub fn conv2d(x: &Value, w: &Value, win: &Window) -> Result<Value> {
    conv2d_ex(x, w, win, Epilogue::default())
}

/// [`conv2d`], then `epi` on each tile of outputs.
pub fn conv2d_ex(x: &Value, w: &Value, win: &Window, epi: Epilogue) -> Result<Value> {
    let [n, h, wd, c] = dims4(x, "input")?;
    let [kh, kw, kc, o] = dims4(w, "filter")?;
    if kc != c {
        return Err(Error::msg(format!(
            "filter has {kc} input channels, the input has {c} (grouped convolution is not supported)"
        )));
    }
    let (oh, pt) = out_size(h, kh, win.strides[0], win.dilations[0], &win.padding, 0)?;
    let (ow, pl) = out_size(wd, kw, win.strides[1], win.dilations[1], &win.padding, 1)?;
    super::value::checked_len(&[n, oh, ow, o])?;
    epi.check(&[o])?;
    let xs = x.slice::<f32>()?;
    let k = kh * kw * c;
    let len = n * oh * ow * o;
    let mut out = output_vec(len);
    let work = n * oh * ow * k * o;
    let pixels = n * oh * ow;
    // A 1×1 stride-1 convolution without padding is a matrix product of the input
    // rows as they are.
    let pointwise =
        kh == 1 && kw == 1 && win.strides == [1, 1] && (oh, ow, pt, pl) == (h, wd, 0, 0);
    // Otherwise output pixels (anywhere in the batch) are computed `TILE` at a time
    // from their patches, one matrix product per tile. Every output element sums its
    // taps from zero in filter order (padding taps add 0 · w), as one pixel at a
    // time would.
    const TILE: usize = 32;
    let geom = super::conv_patches::Geom {
        h,
        wd,
        c,
        kh,
        kw,
        strides: win.strides,
        dilations: win.dilations,
        pt,
        pl,
        oh,
        ow,
        call: super::conv_patches::next_call(),
    };
    if !pointwise && pixels > 0 && super::conv_direct::applies(&geom, o) {
        let ws = w.slice::<f32>()?;
        let spare = &mut out.spare_capacity_mut()[..len];
        super::conv_direct::run(&geom, n, o, xs, ws, epi, spare, work >= PAR_THRESHOLD);
        // SAFETY: `run` wrote every element.
        unsafe { out.set_len(len) };
        return Ok(Value::from_vec(vec![n, oh, ow, o], out));
    }
    let packed = super::simd::sgemm_cache::packed(w, k, o)?;
    let sg_epi = epi.for_sgemm();
    let compute_tile = |t: usize, out_t: &mut [std::mem::MaybeUninit<f32>]| {
        let rows = out_t.len() / o;
        if pointwise {
            let a = &xs[t * TILE * c..(t * TILE + rows) * c];
            super::simd::sgemm::sgemm_packed_uninit_epi(rows, a, c, &packed, out_t, sg_epi);
            return;
        }
        PATCHES.with_borrow_mut(|patches| {
            if patches.len() < rows * k {
                patches.resize(rows * k, 0.0);
            }
            let mut live = [false; TILE];
            let patches = &mut patches[..rows * k];
            super::conv_patches::build(&geom, xs, t * TILE, patches, &mut live[..rows]);
            if live[..rows].iter().all(|&l| l) {
                super::simd::sgemm::sgemm_packed_uninit_epi(
                    rows, patches, k, &packed, out_t, sg_epi,
                );
                return;
            }
            let done = super::simd::sgemm::sgemm_packed_uninit(rows, patches, k, &packed, out_t);
            // A pixel whose window lies wholly in the padding stays exactly zero.
            for (j, acc) in done.chunks_exact_mut(o).enumerate() {
                if !live[j] {
                    acc.fill(0.0);
                }
            }
            epi.apply(done, o);
        });
    };
    let windows = super::conv_windows::windows(
        [h, wd, c],
        [kh, kw],
        win.strides,
        win.dilations,
        [pt, pl],
        [oh, ow],
    )
    .filter(|_| !pointwise);
    if let (Some(wins), true) = (windows, o > 0 && pixels > 0) {
        // Each run's patches are rows of the input `wins.step` apart.
        let image = h * wd * c;
        let run = |r: usize, out_r: &mut [std::mem::MaybeUninit<f32>]| {
            let at = r / wins.runs * image + wins.run_start(r % wins.runs);
            let a = &xs[at..];
            super::simd::sgemm::sgemm_packed_uninit_epi(
                wins.len, a, wins.step, &packed, out_r, sg_epi,
            );
        };
        let spare = &mut out.spare_capacity_mut()[..len];
        if work >= PAR_THRESHOLD {
            spare
                .par_chunks_mut(wins.len * o)
                .enumerate()
                .for_each(|(r, t)| run(r, t));
        } else {
            spare
                .chunks_mut(wins.len * o)
                .enumerate()
                .for_each(|(r, t)| run(r, t));
        }
    } else if o > 0 && pixels > 0 {
        let spare = &mut out.spare_capacity_mut()[..len];
        if work >= PAR_THRESHOLD {
            spare
                .par_chunks_mut(TILE * o)
                .enumerate()
                .for_each(|(i, t)| compute_tile(i, t));
        } else {
            spare
                .chunks_mut(TILE * o)
                .enumerate()
                .for_each(|(i, t)| compute_tile(i, t));
        }
    }
    // SAFETY: the tiles wrote every element (or there are none).
    unsafe { out.set_len(if o > 0 && pixels > 0 { len } else { 0 }) };
    out.resize(len, 0.0);
    Ok(Value::from_vec(vec![n, oh, ow, o], out))
}

/// `DepthwiseConv2dNative` in NHWC with a `[kh, kw, c, multiplier]` filter.
pub fn depthwise_conv2d(x: &Value, w: &Value, win: &Window) -> Result<Value> {
    depthwise_conv2d_ex(x, w, win, Epilogue::default())
}

/// [`depthwise_conv2d`], then `epi` on each output.
pub fn depthwise_conv2d_ex(x: &Value, w: &Value, win: &Window, epi: Epilogue) -> Result<Value> {
    let [n, h, wd, c] = dims4(x, "input")?;
    let [kh, kw, kc, m] = dims4(w, "filter")?;
    if kc != c {
        return Err(Error::msg(format!(
            "filter has {kc} input channels, the input has {c}"
        )));
    }
    let (oh, pt) = out_size(h, kh, win.strides[0], win.dilations[0], &win.padding, 0)?;
    let (ow, pl) = out_size(wd, kw, win.strides[1], win.dilations[1], &win.padding, 1)?;
    super::value::checked_len(&[n, oh, ow, c, m])?;
    epi.check(&[c * m])?;
    let xs = x.slice::<f32>()?;
    let ws = w.slice::<f32>()?;
    let oc = c * m;
    let row = ow * oc;
    let len = n * oh * row;
    let mut out = output_vec(len);
    let dw = Depthwise {
        xs,
        ws,
        win,
        epi,
        dims: [h, wd, c, m, kh, kw, oh, ow, pt, pl],
    };
    if row > 0 {
        let spare = &mut out.spare_capacity_mut()[..len];
        if n * oh * ow * oc * kh * kw >= PAR_THRESHOLD {
            spare
                .par_chunks_mut(row)
                .enumerate()
                .for_each(|(r, o)| dw.run_row(r, o));
        } else {
            spare
                .chunks_mut(row)
                .enumerate()
                .for_each(|(r, o)| dw.run_row(r, o));
        }
    }
    // SAFETY: every row wrote each of its elements (or there are none).
    unsafe { out.set_len(if row > 0 { len } else { 0 }) };
    out.resize(len, 0.0);
    Ok(Value::from_vec(vec![n, oh, ow, oc], out))
}

/// One output row of a float depthwise convolution (see [`depthwise_conv2d`]). Each
/// output sums its taps from 0.0 in filter order, skipping those in the padding, each
/// tap a fused multiply-add (`f32::mul_add`, one rounding); then the epilogue.
struct Depthwise<'a> {
    xs: &'a [f32],
    ws: &'a [f32],
    win: &'a Window,
    epi: Epilogue<'a>,
    /// h, wd, c, m, kh, kw, oh, ow, pt, pl.
    dims: [usize; 10],
}

impl Depthwise<'_> {
    fn run_row(&self, r: usize, out_row: &mut [std::mem::MaybeUninit<f32>]) {
        #[cfg(target_arch = "x86_64")]
        if super::simd::avx2() {
            // SAFETY: AVX2 and FMA are present.
            unsafe { self.row_avx2(r, out_row) };
            return;
        }
        self.row(r, out_row, 0..0, 0)
    }

    /// The same loops compiled for AVX2 and FMA, which vectorizes them across channels
    /// (`f32::mul_add` becomes `vfmadd231ps`: the same fused multiply-adds).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn row_avx2(&self, r: usize, out_row: &mut [std::mem::MaybeUninit<f32>]) {
        let [h, wd, c, m, kh, kw, oh, ow, pt, pl] = self.dims;
        let (sx, dx) = (self.win.strides[1], self.win.dilations[1]);
        let c8 = c / 8 * 8;
        if m != 1 || c8 == 0 || kw == 0 || sx == 0 || dx == 0 {
            return self.row(r, out_row, 0..0, 0);
        }
        // Pixels lo..hi have their whole window inside the input horizontally.
        let lo = pl.div_ceil(sx);
        let hi = match (wd + pl).checked_sub((kw - 1) * dx + 1) {
            Some(last) => ow.min(last / sx + 1),
            None => 0,
        };
        let (b, y) = (r / oh, r % oh);
        // The filter rows inside the input, on the stack for the usual filter heights.
        let mut stack = [(0usize, 0usize); 8];
        let mut heap = Vec::new();
        let mut n_rows = 0;
        for ky in 0..kh {
            let Some(iy) = (y * self.win.strides[0] + ky * self.win.dilations[0]).checked_sub(pt)
            else {
                continue;
            };
            if iy < h {
                let entry = ((b * h + iy) * wd * c, ky);
                if kh <= stack.len() {
                    stack[n_rows] = entry;
                } else {
                    heap.push(entry);
                }
                n_rows += 1;
            }
        }
        let rows = if kh <= stack.len() {
            &stack[..n_rows]
        } else {
            &heap[..]
        };
        let g = super::simd::dwconv::DwRow {
            xs: self.xs,
            ws: self.ws,
            bias: self.epi.bias,
            act: match self.epi.act {
                Act::None => 0,
                Act::Relu => 1,
                Act::Relu6 => 2,
            },
            rows,
            c,
            chans: c,
            kw,
            sx,
            dx,
            pl,
            wd,
        };
        assert!(out_row.len() >= ow * c && self.ws.len() >= kh * kw * c);
        let op = out_row.as_mut_ptr() as *mut f32;
        if super::simd::avx512() {
            let c16 = c / 16 * 16;
            // SAFETY: AVX-512F is present; lo..hi are the pixels inside the input
            // (above), the rows are whole input rows, and out_row holds the row.
            unsafe { super::simd::dwconv::interior512(&g, lo, hi, ow, op) };
            if c16 < c8 {
                // Channels c16..c8: one block of 8 lanes.
                let g8 = super::simd::dwconv::DwRow {
                    xs: &self.xs[c16..],
                    ws: &self.ws[c16..],
                    bias: self.epi.bias.map(|b| &b[c16..]),
                    chans: c8 - c16,
                    ..g
                };
                // SAFETY: as above (AVX2 too), every offset shifted by c16 < c8 <= c.
                unsafe { super::simd::dwconv::interior(&g8, lo, hi, ow, op.add(c16)) };
            }
        } else {
            // SAFETY: AVX2 is present; lo..hi are the pixels inside the input (above),
            // the rows are whole input rows, and out_row holds the row.
            unsafe { super::simd::dwconv::interior(&g, lo, hi, ow, op) };
        }
        self.row(r, out_row, 0..ow, c8)
    }

    /// Channels `done..` only of the pixels in `skip` (multiplier 1), all of the others.
    #[inline(always)]
    fn row(
        &self,
        r: usize,
        out_row: &mut [std::mem::MaybeUninit<f32>],
        skip: std::ops::Range<usize>,
        done: usize,
    ) {
        let [h, wd, c, m, kh, kw, oh, ow, pt, pl] = self.dims;
        let (xs, ws, win) = (self.xs, self.ws, self.win);
        let oc = c * m;
        let (b, y) = (r / oh, r % oh);
        // (input offset, filter offset) of each tap inside the input, in filter order.
        // On the stack for filters of up to 5 × 5.
        let mut stack = [(0usize, 0usize); 25];
        let mut heap = Vec::new();
        let buf: &mut [(usize, usize)] = if kh * kw <= stack.len() {
            &mut stack
        } else {
            heap.resize(kh * kw, (0, 0));
            &mut heap
        };
        for ox in 0..ow {
            if done == oc && skip.contains(&ox) {
                continue;
            }
            let mut n_taps = 0;
            for ky in 0..kh {
                let iy = (y * win.strides[0] + ky * win.dilations[0]) as isize - pt as isize;
                if iy < 0 || iy as usize >= h {
                    continue;
                }
                for kx in 0..kw {
                    let ix = (ox * win.strides[1] + kx * win.dilations[1]) as isize - pl as isize;
                    if ix < 0 || ix as usize >= wd {
                        continue;
                    }
                    let off = ((b * h + iy as usize) * wd + ix as usize) * c;
                    buf[n_taps] = (off, (ky * kw + kx) * oc);
                    n_taps += 1;
                }
            }
            let taps = &buf[..n_taps];
            let dst = &mut out_row[ox * oc..(ox + 1) * oc];
            if m == 1 {
                let mut ch = if skip.contains(&ox) { done } else { 0 };
                while ch + 16 <= c {
                    self.channels::<16>(taps, ch, dst);
                    ch += 16;
                }
                while ch + 8 <= c {
                    self.channels::<8>(taps, ch, dst);
                    ch += 8;
                }
                while ch < c {
                    self.channels::<1>(taps, ch, dst);
                    ch += 1;
                }
            } else {
                let acc: &mut [f32] = {
                    for d in dst.iter_mut() {
                        d.write(0.0);
                    }
                    // SAFETY: initialized just above.
                    unsafe { &mut *(dst as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) }
                };
                for &(off, wo) in taps {
                    let (xin, wk) = (&xs[off..off + c], &ws[wo..wo + oc]);
                    for (ci, &xv) in xin.iter().enumerate() {
                        for mi in 0..m {
                            acc[ci * m + mi] = xv.mul_add(wk[ci * m + mi], acc[ci * m + mi]);
                        }
                    }
                }
                self.epi.apply(acc, oc);
            }
        }
    }

    /// Channels `ch..ch + W` of one output pixel (multiplier 1), in registers.
    #[inline(always)]
    fn channels<const W: usize>(
        &self,
        taps: &[(usize, usize)],
        ch: usize,
        dst: &mut [std::mem::MaybeUninit<f32>],
    ) {
        let mut acc = [0f32; W];
        for &(off, wo) in taps {
            let xv: &[f32; W] = self.xs[off + ch..off + ch + W].try_into().expect("W");
            let wv: &[f32; W] = self.ws[wo + ch..wo + ch + W].try_into().expect("W");
            for i in 0..W {
                acc[i] = xv[i].mul_add(wv[i], acc[i]);
            }
        }
        if let Some(bias) = self.epi.bias {
            let bv: &[f32; W] = bias[ch..ch + W].try_into().expect("W");
            for i in 0..W {
                acc[i] += bv[i];
            }
        }
        match self.epi.act {
            Act::None => {}
            Act::Relu => acc.iter_mut().for_each(|v| *v = relu(*v)),
            Act::Relu6 => acc.iter_mut().for_each(|v| *v = relu6(*v)),
        }
        for (d, &v) in dst[ch..ch + W].iter_mut().zip(&acc) {
            d.write(v);
        }
    }
}

fn transpose2(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; v.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = v[r * cols + c];
        }
    }
    t
}

/// `[m, k] x [k, n]` into `out` (row-major), accumulating each output in k order.
pub fn gemm(a: &[f32], b: &[f32], out: &mut [f32], m: usize, k: usize, n: usize) {
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`; only values are written.
    let out = unsafe { &mut *(out as *mut [f32] as *mut [std::mem::MaybeUninit<f32>]) };
    gemm_ex(a, b, out, m, k, n, Epilogue::default());
}

/// [`gemm`] into memory that need not be initialized (every output is written), then
/// `epi` on each block of rows.
fn gemm_ex(
    a: &[f32],
    b: &[f32],
    out: &mut [std::mem::MaybeUninit<f32>],
    m: usize,
    k: usize,
    n: usize,
    epi: Epilogue,
) {
    if n == 0 || m == 0 {
        return;
    }
    // Rows in blocks, each block one vectorized product over the whole of `b`.
    const ROWS: usize = 16;
    let packed = super::simd::sgemm::PackedB::new(b, k, n);
    let block = |i: usize, o: &mut [std::mem::MaybeUninit<f32>]| {
        let rows = o.len() / n;
        let a = &a[i * ROWS * k..];
        super::simd::sgemm::sgemm_packed_uninit_epi(rows, a, k, &packed, o, epi.for_sgemm());
    };
    let out = &mut out[..m * n];
    if m * k * n >= PAR_THRESHOLD {
        out.par_chunks_mut(ROWS * n)
            .enumerate()
            .for_each(|(i, o)| block(i, o));
    } else {
        out.chunks_mut(ROWS * n)
            .enumerate()
            .for_each(|(i, o)| block(i, o));
    }
}

/// `MatMul` of two matrices with TensorFlow's transpose flags.
pub fn matmul(a: &Value, b: &Value, ta: bool, tb: bool) -> Result<Value> {
    matmul_ex(a, b, ta, tb, Epilogue::default())
}

/// [`matmul`], then `epi` on each output.
pub fn matmul_ex(a: &Value, b: &Value, ta: bool, tb: bool, epi: Epilogue) -> Result<Value> {
    if a.rank() != 2 || b.rank() != 2 {
        return Err(Error::msg(format!(
            "MatMul needs matrices, got shapes {:?} and {:?}",
            a.shape, b.shape
        )));
    }
    let (m, k) = if ta {
        (a.shape[1], a.shape[0])
    } else {
        (a.shape[0], a.shape[1])
    };
    let (k2, n) = if tb {
        (b.shape[1], b.shape[0])
    } else {
        (b.shape[0], b.shape[1])
    };
    if k != k2 {
        return Err(Error::msg(format!(
            "MatMul inner dimensions differ: {:?}{} x {:?}{}",
            a.shape,
            if ta { "ᵀ" } else { "" },
            b.shape,
            if tb { "ᵀ" } else { "" }
        )));
    }
    super::value::checked_len(&[m, n])?;
    epi.check(&[n])?;
    let av = a.slice::<f32>()?;
    let bv = b.slice::<f32>()?;
    let at;
    let bt;
    let av = if ta {
        at = transpose2(av, a.shape[0], a.shape[1]);
        &at[..]
    } else {
        av
    };
    let bv = if tb {
        bt = transpose2(bv, b.shape[0], b.shape[1]);
        &bt[..]
    } else {
        bv
    };
    let mut out = output_vec(m * n);
    gemm_ex(av, bv, out.spare_capacity_mut(), m, k, n, epi);
    // SAFETY: gemm_ex wrote every element (none when m or n is 0).
    unsafe { out.set_len(if m > 0 && n > 0 { m * n } else { 0 }) };
    out.resize(m * n, 0.0);
    Ok(Value::from_vec(vec![m, n], out))
}

/// `BatchMatMulV2`: batched `[.., m, k] x [.., k, n]` with broadcast batch dimensions.
pub fn batch_matmul(a: &Value, b: &Value, adj_a: bool, adj_b: bool) -> Result<Value> {
    if a.rank() < 2 || b.rank() < 2 {
        return Err(Error::msg("BatchMatMul needs rank ≥ 2 operands"));
    }
    let (ra, rb) = (a.rank(), b.rank());
    let batch = super::elementwise::broadcast_shape(&a.shape[..ra - 2], &b.shape[..rb - 2])?;
    let nb: usize = batch.iter().product();
    let (am, ak) = (a.shape[ra - 2], a.shape[ra - 1]);
    let (bm, bk) = (b.shape[rb - 2], b.shape[rb - 1]);
    let (m, k) = if adj_a { (ak, am) } else { (am, ak) };
    let (k2, n) = if adj_b { (bk, bm) } else { (bm, bk) };
    if k != k2 {
        return Err(Error::msg(format!(
            "BatchMatMul inner dimensions differ: {:?} x {:?}",
            a.shape, b.shape
        )));
    }
    super::value::checked_len(&[nb, m, n])?;
    let av = a.slice::<f32>()?;
    let bv = b.slice::<f32>()?;
    let index_of = |shape: &[usize], bi: usize| -> usize {
        let mut idx = 0;
        let mut rem = bi;
        let mut stride = 1;
        let mut strides = vec![0; batch.len()];
        for d in (0..batch.len()).rev() {
            strides[d] = stride;
            stride *= batch[d];
        }
        let off = batch.len() - shape.len();
        let mut mul = 1;
        let mut sidx = vec![0; shape.len()];
        for d in 0..batch.len() {
            let coord = rem / strides[d];
            rem %= strides[d];
            if d >= off {
                sidx[d - off] = if shape[d - off] == 1 { 0 } else { coord };
            }
        }
        for d in (0..shape.len()).rev() {
            idx += sidx[d] * mul;
            mul *= shape[d];
        }
        idx
    };
    let mut out = vec![0f32; nb * m * n];
    for bi in 0..nb {
        let ai = index_of(&a.shape[..ra - 2], bi);
        let bj = index_of(&b.shape[..rb - 2], bi);
        let amat = &av[ai * am * ak..(ai + 1) * am * ak];
        let bmat = &bv[bj * bm * bk..(bj + 1) * bm * bk];
        let at = if adj_a {
            transpose2(amat, am, ak)
        } else {
            amat.to_vec()
        };
        let bt = if adj_b {
            transpose2(bmat, bm, bk)
        } else {
            bmat.to_vec()
        };
        gemm(&at, &bt, &mut out[bi * m * n..(bi + 1) * m * n], m, k, n);
    }
    let mut shape = batch;
    shape.extend([m, n]);
    Ok(Value::from_vec(shape, out))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolKind {
    Max,
    Avg,
}

/// `MaxPool` / `AvgPool` in NHWC. Padded positions are ignored: they never win a
/// max and are not counted in an average, as in TensorFlow.
pub fn pool(x: &Value, kind: PoolKind, ksize: [usize; 2], win: &Window) -> Result<Value> {
    let [n, h, wd, c] = dims4(x, "input")?;
    let (oh, pt) = out_size(h, ksize[0], win.strides[0], 1, &win.padding, 0)?;
    let (ow, pl) = out_size(wd, ksize[1], win.strides[1], 1, &win.padding, 1)?;
    super::value::checked_len(&[n, oh, ow, c])?;
    let xs = x.slice::<f32>()?;
    let len = n * oh * ow * c;
    let mut out = output_vec(len);
    let row = ow * c;
    let p = Pool {
        xs,
        kind,
        ksize,
        strides: win.strides,
        dims: [h, wd, c, oh, ow, pt, pl],
    };
    if row > 0 {
        out.spare_capacity_mut()[..len]
            .chunks_mut(row)
            .enumerate()
            .for_each(|(r, o)| p.run_row(r, o));
    }
    // SAFETY: every row wrote each of its elements (or there are none).
    unsafe { out.set_len(if row > 0 { len } else { 0 }) };
    out.resize(len, 0.0);
    Ok(Value::from_vec(vec![n, oh, ow, c], out))
}

/// One output row of [`pool`]: each output starts from -inf (max) or 0.0 (average),
/// takes the window's elements in row-major order (`if x > acc { acc = x }`, or
/// `acc += x`), and an average is then divided by the count of elements inside the
/// input; a block of channels at a time in registers.
struct Pool<'a> {
    xs: &'a [f32],
    kind: PoolKind,
    ksize: [usize; 2],
    strides: [usize; 2],
    /// h, wd, c, oh, ow, pt, pl.
    dims: [usize; 7],
}

impl Pool<'_> {
    fn run_row(&self, r: usize, out_row: &mut [std::mem::MaybeUninit<f32>]) {
        #[cfg(target_arch = "x86_64")]
        if super::simd::avx2() {
            // SAFETY: AVX2 is present.
            unsafe { self.row_avx2(r, out_row) };
            return;
        }
        self.row(r, out_row)
    }

    /// The same loops compiled for AVX2, which vectorizes them across channels (the
    /// same comparisons, sums and division per element).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn row_avx2(&self, r: usize, out_row: &mut [std::mem::MaybeUninit<f32>]) {
        let [h, wd, c, oh, ow, pt, pl] = self.dims;
        if c.is_multiple_of(8) && c > 0 {
            let (b, y) = (r / oh, r % oh);
            let g = super::simd::fpool::PoolRow {
                base: b * h * wd * c,
                h,
                wd,
                c,
                ow,
                ksize: self.ksize,
                sx: self.strides[1],
                y0: (y * self.strides[0]) as isize - pt as isize,
                pl,
                max: matches!(self.kind, PoolKind::Max),
            };
            assert!(out_row.len() >= ow * c && self.xs.len() >= (b + 1) * h * wd * c);
            // SAFETY: AVX2 is present, c is a multiple of 8, the image and the row
            // are in bounds (above).
            unsafe { super::simd::fpool::row(&g, self.xs, out_row.as_mut_ptr() as *mut f32) };
            return;
        }
        self.row(r, out_row)
    }

    #[inline(always)]
    fn row(&self, r: usize, out_row: &mut [std::mem::MaybeUninit<f32>]) {
        match self.kind {
            PoolKind::Max => self.row_of::<true>(r, out_row),
            PoolKind::Avg => self.row_of::<false>(r, out_row),
        }
    }

    #[inline(always)]
    fn row_of<const MAX: bool>(&self, r: usize, out_row: &mut [std::mem::MaybeUninit<f32>]) {
        let [h, wd, c, oh, ow, pt, pl] = self.dims;
        let (b, y) = (r / oh, r % oh);
        let y0 = (y * self.strides[0]) as isize - pt as isize;
        let ys =
            y0.max(0) as usize..((y0 + self.ksize[0] as isize).min(h as isize)).max(0) as usize;
        for (ox, dst) in out_row.chunks_exact_mut(c).take(ow).enumerate() {
            let x0 = (ox * self.strides[1]) as isize - pl as isize;
            let xr = x0.max(0) as usize
                ..((x0 + self.ksize[1] as isize).min(wd as isize)).max(0) as usize;
            let base = b * h * wd * c;
            let win = (base, ys.clone(), xr);
            let mut ch = 0;
            while ch + 16 <= c {
                self.block::<16, MAX>(&win, ch, dst);
                ch += 16;
            }
            while ch + 8 <= c {
                self.block::<8, MAX>(&win, ch, dst);
                ch += 8;
            }
            while ch < c {
                self.block::<1, MAX>(&win, ch, dst);
                ch += 1;
            }
        }
    }

    /// Channels `ch..ch + W` of one output pixel whose window is `(image offset,
    /// input rows, input columns)`.
    #[inline(always)]
    fn block<const W: usize, const MAX: bool>(
        &self,
        (base, ys, xr): &(usize, std::ops::Range<usize>, std::ops::Range<usize>),
        ch: usize,
        dst: &mut [std::mem::MaybeUninit<f32>],
    ) {
        let [_, wd, c, ..] = self.dims;
        let mut acc = [if MAX { f32::NEG_INFINITY } else { 0.0 }; W];
        for iy in ys.clone() {
            for ix in xr.clone() {
                let off = base + (iy * wd + ix) * c + ch;
                let v: &[f32; W] = self.xs[off..off + W].try_into().expect("W");
                for i in 0..W {
                    if MAX {
                        if v[i] > acc[i] {
                            acc[i] = v[i];
                        }
                    } else {
                        acc[i] += v[i];
                    }
                }
            }
        }
        let count = ys.len() * xr.len();
        if !MAX && count > 0 {
            let d = count as f32;
            acc.iter_mut().for_each(|a| *a /= d);
        }
        for (d, &v) in dst[ch..ch + W].iter_mut().zip(&acc) {
            d.write(v);
        }
    }
}

/// `FusedBatchNorm*` in inference mode: `(x - mean) * (scale * rsqrt(var + eps)) + offset`
/// along the channel axis, computed in TensorFlow's order.
pub fn batch_norm_inference(
    x: &Value,
    scale: &Value,
    offset: &Value,
    mean: &Value,
    var: &Value,
    epsilon: f32,
    channels_first: bool,
) -> Result<Value> {
    let axis = if channels_first {
        1
    } else {
        x.rank().wrapping_sub(1)
    };
    if x.rank() < 2 {
        return Err(Error::msg("batch norm input must have rank ≥ 2"));
    }
    let c = x.shape[axis];
    let (s, o, m, v) = (
        scale.slice::<f32>()?,
        offset.slice::<f32>()?,
        mean.slice::<f32>()?,
        var.slice::<f32>()?,
    );
    for (name, t) in [("scale", s), ("offset", o), ("mean", m), ("variance", v)] {
        if t.len() != c {
            return Err(Error::msg(format!(
                "batch norm {name} has {} elements, the input has {c} channels",
                t.len()
            )));
        }
    }
    let factor: Vec<f32> = (0..c)
        .map(|i| (1.0 / (v[i] + epsilon).sqrt()) * s[i])
        .collect();
    let inner: usize = x.shape[axis + 1..].iter().product();
    let mut out = x.slice::<f32>()?.to_vec();
    if c > 0 && inner == 1 {
        for px in out.chunks_mut(c) {
            for (i, v) in px.iter_mut().enumerate() {
                *v = (*v - m[i]) * factor[i] + o[i];
            }
        }
    } else if c > 0 && inner > 0 {
        for (k, run) in out.chunks_mut(inner).enumerate() {
            let ch = k % c;
            let (mc, fc, oc) = (m[ch], factor[ch], o[ch]);
            run.iter_mut().for_each(|v| *v = (*v - mc) * fc + oc);
        }
    }
    Ok(Value::from_vec(x.shape.clone(), out))
}

/// `Softmax` (or `LogSoftmax`) over the last axis.
pub fn softmax(x: &Value, log: bool) -> Result<Value> {
    let c = *x
        .shape
        .last()
        .ok_or_else(|| Error::msg("softmax needs rank ≥ 1"))?;
    let mut out = x.slice::<f32>()?.to_vec();
    if c == 0 {
        return Ok(Value::from_vec(x.shape.clone(), out));
    }
    for row in out.chunks_mut(c) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if log {
            row.iter_mut().for_each(|v| *v -= max);
            let sum: f32 = row.iter().map(|v| v.exp()).sum();
            let ls = sum.ln();
            row.iter_mut().for_each(|v| *v -= ls);
        } else {
            row.iter_mut().for_each(|v| *v = (*v - max).exp());
            let sum: f32 = row.iter().sum();
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|v| *v *= inv);
        }
    }
    Ok(Value::from_vec(x.shape.clone(), out))
}

// The AVX2 rows exist on x86-64 only.
#[cfg(all(test, target_arch = "x86_64"))]
#[path = "nn_dw_tests.rs"]
mod dw_tests;
