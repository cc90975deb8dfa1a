//! Convolutions and fully connected in int8 (TFLite `reference_integer_ops`
//! `ConvPerChannel`, `DepthwiseConvPerChannel`, `FullyConnected[PerChannel]`,
//! and the float kernels of the fused ops.

use std::sync::{Arc, Weak};

use rayon::prelude::*;

use super::{channel_scales, input_affine, output_affine, Arithmetic, ROUNDING};
use crate::error::{Error, Result};
use crate::ir::FusedActivation;
use crate::kernels::nn::{out_size, Window};
use crate::kernels::ops::StepQuant;
use crate::kernels::rounding::{
    activation_range, quantize_multiplier, xnn_activation_range, xnn_conv_scale,
    ChannelMultipliers, RowRequantizer,
};
use crate::kernels::value::{Buf, Value};

pub(super) fn dims4(v: &Value, what: &str) -> Result<[usize; 4]> {
    <[usize; 4]>::try_from(v.shape.as_slice())
        .map_err(|_| Error::msg(format!("{what} must have rank 4, got shape {:?}", v.shape)))
}

/// The int32 bias of a fused op with `channels` outputs.
pub(super) fn bias_i32(v: &Value, channels: usize) -> Result<&[i32]> {
    let b = v.slice::<i32>().map_err(|e| e.context("int8 bias"))?;
    if b.len() != channels || v.rank() != 1 {
        return Err(Error::msg(format!(
            "bias of shape {:?} for {channels} output channels",
            v.shape
        )));
    }
    Ok(b)
}

/// Per output channel requantization of an i32 accumulator (bias included) to
/// int8, clamped to the fused activation:
/// * reference convolutions: `PopulateConvolutionQuantizationParams`'s (multiplier,
///   shift) from `(f64)in_scale * (f64)w_scale[c] / (f64)out_scale`, double rounding;
/// * the reference FULLY_CONNECTED: in double, one rounding;
/// * XNNPACK: an f32 scale per channel, one rounding to even.
pub(super) fn requantizer(
    arith: Arithmetic,
    fully_connected: bool,
    in_scale: f32,
    w_scales: &[f32],
    out: super::Affine,
    act: FusedActivation,
) -> RowRequantizer {
    let (mult, (lo, hi)) = match arith {
        Arithmetic::LiteRt => (
            ChannelMultipliers::Fp32(
                w_scales
                    .iter()
                    .map(|&ws| xnn_conv_scale(in_scale, ws, out.scale))
                    .collect(),
            ),
            xnn_activation_range(act, out.scale, out.zero_point),
        ),
        Arithmetic::Reference => (
            if fully_connected {
                ChannelMultipliers::Double(
                    w_scales
                        .iter()
                        .map(|&ws| in_scale as f64 * ws as f64 / out.scale as f64)
                        .collect(),
                )
            } else {
                ChannelMultipliers::Quantized(
                    w_scales
                        .iter()
                        .map(|&ws| {
                            quantize_multiplier(in_scale as f64 * ws as f64 / out.scale as f64)
                        })
                        .collect(),
                    ROUNDING,
                )
            },
            activation_range(act, out.scale, out.zero_point, -128, 127),
        ),
    };
    RowRequantizer::new(mult, out.zero_point, lo, hi)
}

/// What a fused op derives from its constant filter, bias and quantization: the
/// requantizer and, for a depthwise convolution, the filter in its dot layout. Made
/// once per filter buffer ([`crate::kernels::derived`]), not once per batch.
pub(super) struct Prepared {
    key: PreparedKey,
    bias: Weak<Buf>,
    /// The input's quantization (that of `quant.inputs[0]`, which the key matched).
    pub(super) input: super::Affine,
    pub(super) requant: RowRequantizer,
    #[cfg(target_arch = "x86_64")]
    dot: std::sync::OnceLock<Option<super::depthwise512::DotFilter>>,
}

/// Everything besides the filter buffer that [`Prepared`] is made from.
struct PreparedKey {
    arithmetic: Arithmetic,
    fully_connected: bool,
    act: FusedActivation,
    input: (u32, i32),
    output: (u32, i32),
    w_scales: Vec<u32>,
    w_shape: Vec<usize>,
    channels: usize,
}

impl Prepared {
    /// The requantizer of the op with filter `w`, bias `b` (`channels` of them) and
    /// quantization `quant`, shared by every batch while `w` lives.
    pub(super) fn of(
        quant: &StepQuant,
        w: &Value,
        b: &Value,
        channels: usize,
        fully_connected: bool,
        act: FusedActivation,
    ) -> Result<Arc<Prepared>> {
        let xin = input_affine(quant, 0)?;
        let out = output_affine(quant)?;
        let raw_scales = quant
            .inputs
            .get(1)
            .and_then(|q| q.as_ref())
            .map(|q| &q.scale[..]);
        let matches = |p: &Prepared| {
            let k = &p.key;
            std::ptr::eq(p.bias.as_ptr(), Arc::as_ptr(&b.buf))
                && k.arithmetic == quant.arithmetic
                && k.fully_connected == fully_connected
                && k.act == act
                && k.input == (xin.scale.to_bits(), xin.zero_point)
                && k.output == (out.scale.to_bits(), out.zero_point)
                && k.channels == channels
                && k.w_shape == w.shape
                && raw_scales.is_some_and(|s| {
                    s.len() == k.w_scales.len()
                        && s.iter().zip(&k.w_scales).all(|(a, b)| a.to_bits() == *b)
                })
        };
        crate::kernels::derived::derived(&w.buf, matches, || {
            let ws = channel_scales(quant, 1, channels)?;
            bias_i32(b, channels)?;
            Ok(Prepared {
                key: PreparedKey {
                    arithmetic: quant.arithmetic,
                    fully_connected,
                    act,
                    input: (xin.scale.to_bits(), xin.zero_point),
                    output: (out.scale.to_bits(), out.zero_point),
                    w_scales: raw_scales
                        .unwrap_or_default()
                        .iter()
                        .map(|s| s.to_bits())
                        .collect(),
                    w_shape: w.shape.clone(),
                    channels,
                },
                bias: Arc::downgrade(&b.buf),
                input: xin,
                requant: requantizer(quant.arithmetic, fully_connected, xin.scale, &ws, out, act),
                #[cfg(target_arch = "x86_64")]
                dot: std::sync::OnceLock::new(),
            })
        })
    }

    /// The depthwise filter `wv` (`[kh · kw, c]`) in the layout of
    /// [`super::depthwise512::dot_row`], for input offset `off` (both fixed by the
    /// key: the filter buffer and shape, and the input zero point).
    #[cfg(target_arch = "x86_64")]
    fn dot(
        &self,
        wv: &[i8],
        kh_kw: (usize, usize),
        off: i32,
        bias: &[i32],
    ) -> Option<&super::depthwise512::DotFilter> {
        self.dot
            .get_or_init(|| {
                super::depthwise512::DotFilter::new(wv, kh_kw, off, bias, &self.requant)
            })
            .as_ref()
    }
}

/// `_FusedConv2D` on int8: input NHWC, filter HWIO (per output channel), int32 bias.
pub fn conv2d(
    inputs: &[Value],
    win: &Window,
    act: FusedActivation,
    quant: &StepQuant,
) -> Result<Value> {
    let [x, w, b] = inputs else {
        return Err(Error::msg("int8 convolution needs input, filter and bias"));
    };
    let [_, _, _, c] = dims4(x, "input")?;
    let [_, _, kc, o] = dims4(w, "filter")?;
    if kc != c {
        return Err(Error::msg(format!(
            "filter has {kc} input channels, the input has {c}"
        )));
    }
    let [n, h, wd, _] = dims4(x, "input")?;
    let [kh, kw, _, _] = dims4(w, "filter")?;
    let prepared = Prepared::of(quant, w, b, o, false, act)?;
    let xin = prepared.input;
    let requant = &prepared.requant;
    let bias = bias_i32(b, o)?;
    let (oh, pt) = out_size(h, kh, win.strides[0], win.dilations[0], &win.padding, 0)?;
    let (ow, pl) = out_size(wd, kw, win.strides[1], win.dilations[1], &win.padding, 1)?;
    let xs = x.slice::<i8>()?;
    let image = h * wd * c;
    let geom = super::gemm::Geom {
        win,
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
    let packed = super::packed_cache::packed(w, kh * kw * c, o, false)?;
    let input = |bi: usize| (&xs[bi * image..(bi + 1) * image], -xin.zero_point);
    let res = match super::gemm::conv_requant(geom, n, &packed, input, bias, requant) {
        Some(res) => res,
        None => {
            let mut res = vec![0i8; n * oh * ow * o];
            super::gemm::conv(geom, n, &packed, &mut res, input, |_, acc, out| {
                requant.rows(acc, bias, out)
            });
            res
        }
    };
    Ok(Value::from_vec(vec![n, oh, ow, o], res))
}

/// `_FusedDepthwiseConv2dNative` on int8: filter `[kh, kw, C, M]`, output channel
/// `c * M + m`, per output channel scales.
pub fn depthwise(
    inputs: &[Value],
    win: &Window,
    act: FusedActivation,
    quant: &StepQuant,
) -> Result<Value> {
    let [x, w, b] = inputs else {
        return Err(Error::msg(
            "int8 depthwise convolution needs input, filter and bias",
        ));
    };
    let [_, _, _, c] = dims4(x, "input")?;
    let [_, _, kc, m] = dims4(w, "filter")?;
    if kc != c {
        return Err(Error::msg(format!(
            "depthwise filter has {kc} channels, the input has {c}"
        )));
    }
    #[cfg(target_arch = "x86_64")]
    let pixel: Option<PixelFn> = if m == 1 && crate::kernels::simd::avx2() {
        Some(dw_x86::pixel)
    } else {
        None
    };
    #[cfg(not(target_arch = "x86_64"))]
    let pixel = None;
    windowed(
        x,
        w,
        b,
        c * m,
        win,
        act,
        quant,
        pixel,
        |acc, xs, wv, tap, in_off| {
            let wo = tap * c * m;
            if m == 1 {
                // An input plus its offset (-zero point) lies within ±255 and a weight
                // within ±128, so the product is exact in i16, which vectorizes twice
                // as wide.
                let off = in_off as i16;
                for ((a, &xq), &wq) in acc.iter_mut().zip(xs).zip(&wv[wo..wo + c]) {
                    *a = a.wrapping_add((wq as i16 * (xq as i16 + off)) as i32);
                }
                return;
            }
            for (ic, &xq) in xs.iter().enumerate() {
                let xv = xq as i32 + in_off;
                for mm in 0..m {
                    let oc = ic * m + mm;
                    acc[oc] = acc[oc].wrapping_add((wv[wo + oc] as i32).wrapping_mul(xv));
                }
            }
        },
    )
}

/// The filter taps of output position (`oy`, `ox`) that fall inside the `h`×`wd`
/// input, given the window, the filter size and the top/left padding: calls
/// `tap(tap_index, iy, ix)` for each, in filter order. Shared by the int8 and the
/// hybrid convolutions. Always inlined, so that the AVX2 copies of its callers
/// vectorize the per-tap work.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) fn for_each_tap(
    win: &Window,
    (h, wd): (usize, usize),
    (kh, kw): (usize, usize),
    (pt, pl): (usize, usize),
    oy: usize,
    ox: usize,
    mut tap: impl FnMut(usize, usize, usize),
) {
    for ky in 0..kh {
        let iy = (oy * win.strides[0] + ky * win.dilations[0]) as isize - pt as isize;
        if iy < 0 || iy >= h as isize {
            continue;
        }
        for kx in 0..kw {
            let ix = (ox * win.strides[1] + kx * win.dilations[1]) as isize - pl as isize;
            if ix < 0 || ix >= wd as isize {
                continue;
            }
            tap(ky * kw + kx, iy as usize, ix as usize);
        }
    }
}

/// `(batch, k, units)` of a fully connected op on `x` `[batch, k]` and weights `w`
/// (`[k, units]`, or `[units, k]` with `tb`).
/// Rows, depth and units of a fully connected layer. An input of rank above 2
/// (a `BatchMatMul` by a constant matrix) has its leading dimensions as rows, as
/// FULLY_CONNECTED with `keep_num_dims`; see [`fc_out_shape`].
pub(super) fn fc_dims(x: &Value, w: &Value, tb: bool, what: &str) -> Result<(usize, usize, usize)> {
    if x.rank() < 2 || w.rank() != 2 {
        return Err(Error::msg(format!(
            "{what} fully connected needs matrices, got {:?} and {:?}",
            x.shape, w.shape
        )));
    }
    let k = x.shape[x.rank() - 1];
    let batch = x.shape[..x.rank() - 1].iter().product();
    let (wk, units) = if tb {
        (w.shape[1], w.shape[0])
    } else {
        (w.shape[0], w.shape[1])
    };
    if wk != k {
        return Err(Error::msg(format!(
            "weights {:?} do not match input {:?}",
            w.shape, x.shape
        )));
    }
    Ok((batch, k, units))
}

/// The output shape of a fully connected layer: the input's with `units` last.
pub(super) fn fc_out_shape(x: &Value, units: usize) -> Vec<usize> {
    let mut s = x.shape.clone();
    if let Some(l) = s.last_mut() {
        *l = units;
    }
    s
}

type Dims9 = (
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
);

/// A whole output pixel of a depthwise convolution with one output per channel:
/// `pixel(acc, taps, input, filter, input_offset)` sets `acc[ch]` to the sum over
/// `taps` (offset of the input pixel, tap index) of `filter[tap · C + ch] ·
/// (input[offset + ch] + input_offset)`.
type PixelFn = unsafe fn(&mut [i32], &[(usize, usize)], &[i8], &[i8], i32);

/// Taps per output pixel that [`PixelFn`] takes at once (5×5 filters).
const MAX_PIXEL_TAPS: usize = 25;

#[cfg(target_arch = "x86_64")]
mod dw_x86 {
    use std::arch::x86_64::*;

    /// [`super::PixelFn`] with AVX2: 16 channels at a time, held in registers over
    /// the taps. An input plus its offset (minus a zero point) lies within ±255
    /// and a weight within ±128, so each product is exact in i16.
    ///
    /// # Safety
    /// AVX2 must be present; each tap's `offset + acc.len()` is at most
    /// `xs.len()` and `(tap + 1) · acc.len()` at most `wv.len()`.
    #[target_feature(enable = "avx2")]
    pub unsafe fn pixel(acc: &mut [i32], taps: &[(usize, usize)], xs: &[i8], wv: &[i8], off: i32) {
        pixel_at(acc, taps, xs, wv, off)
    }

    /// [`pixel`] for each of consecutive output pixels whose taps all lie inside the
    /// input: `taps` are the first pixel's, and pixel `p`'s input offsets lie
    /// `p · step` further.
    ///
    /// # Safety
    /// AVX2 must be present; `acc.len()` is a multiple of `c`, and pixel `p`'s taps,
    /// offset by `p · step`, satisfy [`pixel`]'s conditions.
    #[target_feature(enable = "avx2")]
    pub unsafe fn pixels(
        acc: &mut [i32],
        c: usize,
        taps: &[(usize, usize)],
        step: usize,
        xs: &[i8],
        wv: &[i8],
        off: i32,
    ) {
        for (p, acc) in acc.chunks_exact_mut(c).enumerate() {
            pixel_at(acc, taps, &xs[p * step..], wv, off);
        }
    }

    #[inline(always)]
    unsafe fn pixel_at(acc: &mut [i32], taps: &[(usize, usize)], xs: &[i8], wv: &[i8], off: i32) {
        let c = acc.len();
        let (xp, wp, ap) = (xs.as_ptr(), wv.as_ptr(), acc.as_mut_ptr());
        let off16 = _mm256_set1_epi16(off as i16);
        let mut ch = 0;
        while ch + 16 <= c {
            let (mut a0, mut a1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            for &(xo, tap) in taps {
                let x = _mm_loadu_si128(xp.add(xo + ch) as *const __m128i);
                let w = _mm_loadu_si128(wp.add(tap * c + ch) as *const __m128i);
                let x = _mm256_add_epi16(_mm256_cvtepi8_epi16(x), off16);
                let p = _mm256_mullo_epi16(x, _mm256_cvtepi8_epi16(w));
                a0 = _mm256_add_epi32(a0, _mm256_cvtepi16_epi32(_mm256_castsi256_si128(p)));
                a1 = _mm256_add_epi32(a1, _mm256_cvtepi16_epi32(_mm256_extracti128_si256::<1>(p)));
            }
            _mm256_storeu_si256(ap.add(ch) as *mut __m256i, a0);
            _mm256_storeu_si256(ap.add(ch + 8) as *mut __m256i, a1);
            ch += 16;
        }
        let off8 = _mm_set1_epi16(off as i16);
        while ch + 8 <= c {
            let mut a = _mm256_setzero_si256();
            for &(xo, tap) in taps {
                let x = _mm_loadl_epi64(xp.add(xo + ch) as *const __m128i);
                let w = _mm_loadl_epi64(wp.add(tap * c + ch) as *const __m128i);
                let x = _mm_add_epi16(_mm_cvtepi8_epi16(x), off8);
                let p = _mm_mullo_epi16(x, _mm_cvtepi8_epi16(w));
                a = _mm256_add_epi32(a, _mm256_cvtepi16_epi32(p));
            }
            _mm256_storeu_si256(ap.add(ch) as *mut __m256i, a);
            ch += 8;
        }
        for (cc, a) in acc.iter_mut().enumerate().skip(ch) {
            *a = taps.iter().fold(0i32, |s, &(xo, tap)| {
                let xv = xs[xo + cc] as i32 + off;
                s.wrapping_add((wv[tap * c + cc] as i32).wrapping_mul(xv))
            });
        }
    }
}

/// The depthwise convolution as TFLite's reference integer kernels do it:
/// walk the output positions (rows in parallel), skip out-of-bounds taps, let
/// `accumulate(acc, input_pixel, filter, tap, input_offset)` add one filter tap, then
/// add the bias, requantize per output channel and clamp to the fused activation.
#[allow(clippy::too_many_arguments)]
fn windowed(
    x: &Value,
    w: &Value,
    b: &Value,
    o: usize,
    win: &Window,
    act: FusedActivation,
    quant: &StepQuant,
    pixel: Option<PixelFn>,
    accumulate: impl Fn(&mut [i32], &[i8], &[i8], usize, i32) + Sync,
) -> Result<Value> {
    let [n, h, wd, c] = dims4(x, "input")?;
    let [kh, kw, _, _] = dims4(w, "filter")?;
    if x.slice::<i8>()?.len() != n * h * wd * c || w.slice::<i8>()?.len() != kh * kw * o {
        return Err(Error::msg(format!(
            "depthwise input {:?} or filter {:?} does not hold its shape's values",
            x.shape, w.shape
        )));
    }
    let prepared = Prepared::of(quant, w, b, o, false, act)?;
    let xin = prepared.input;
    let requant = &prepared.requant;
    let bias = bias_i32(b, o)?;
    let (oh, pt) = out_size(h, kh, win.strides[0], win.dilations[0], &win.padding, 0)?;
    let (ow, pl) = out_size(wd, kw, win.strides[1], win.dilations[1], &win.padding, 1)?;
    let xs = x.slice::<i8>()?;
    let wv = w.slice::<i8>()?;
    let in_off = -xin.zero_point;
    let row = ow * o;
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn accumulate_row(
        r: usize,
        acc: &mut [i32],
        (h, wd, c, kh, kw, oh, ow, pt, pl): Dims9,
        win: &Window,
        xs: &[i8],
        wv: &[i8],
        in_off: i32,
        pixel: Option<PixelFn>,
        accumulate: &impl Fn(&mut [i32], &[i8], &[i8], usize, i32),
    ) {
        let (bi, oy) = (r / oh, r % oh);
        let o = acc.len() / ow;
        let mut taps = [(0usize, 0usize); MAX_PIXEL_TAPS];
        // The columns whose taps all lie inside the input run in one call, their
        // taps those of the first shifted by the stride.
        #[cfg(target_arch = "x86_64")]
        let (inner_lo, inner_hi) = {
            let (s, span) = (win.strides[1], (kw.max(1) - 1) * win.dilations[1] + 1);
            let lo = pl.div_ceil(s.max(1)).min(ow);
            let hi = if wd + pl >= span && s > 0 {
                ((wd + pl - span) / s + 1).min(ow)
            } else {
                0
            };
            match pixel {
                Some(_) if hi > lo => {
                    let mut nt = 0;
                    for_each_tap(win, (h, wd), (kh, kw), (pt, pl), oy, lo, |t, iy, ix| {
                        if let Some(slot) = taps.get_mut(nt) {
                            *slot = (((bi * h + iy) * wd + ix) * c, t);
                        }
                        nt += 1;
                    });
                    if nt <= MAX_PIXEL_TAPS {
                        // SAFETY: `pixel` is only given with AVX2; the columns from `lo`
                        // to `hi` have every tap inside the input, at the first one's
                        // offsets plus `stride · c` per column.
                        unsafe {
                            dw_x86::pixels(
                                &mut acc[lo * o..hi * o],
                                o,
                                &taps[..nt],
                                s * c,
                                xs,
                                wv,
                                in_off,
                            )
                        };
                        (lo, hi)
                    } else {
                        (0, 0)
                    }
                }
                _ => (0, 0),
            }
        };
        #[cfg(not(target_arch = "x86_64"))]
        let (inner_lo, inner_hi) = (0, 0);
        for (ox, acc) in acc.chunks_exact_mut(o).enumerate() {
            if (inner_lo..inner_hi).contains(&ox) {
                continue;
            }
            if let Some(px) = pixel {
                let mut nt = 0;
                for_each_tap(win, (h, wd), (kh, kw), (pt, pl), oy, ox, |t, iy, ix| {
                    if let Some(slot) = taps.get_mut(nt) {
                        *slot = (((bi * h + iy) * wd + ix) * c, t);
                    }
                    nt += 1;
                });
                if nt <= MAX_PIXEL_TAPS {
                    // SAFETY: `pixel` is only given when its CPU features are present;
                    // the offsets are of in-bounds pixels and taps (`windowed` checked
                    // the lengths of the input and the filter against their shapes).
                    unsafe { px(acc, &taps[..nt], xs, wv, in_off) };
                    continue;
                }
            }
            acc.fill(0);
            for_each_tap(win, (h, wd), (kh, kw), (pt, pl), oy, ox, |t, iy, ix| {
                let xo = ((bi * h + iy) * wd + ix) * c;
                accumulate(acc, &xs[xo..xo + c], wv, t, in_off);
            });
        }
    }
    /// The same loops compiled for AVX2, which vectorizes the accumulation across
    /// channels (integer sums: the same results).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn accumulate_row_avx2(
        r: usize,
        acc: &mut [i32],
        dims: Dims9,
        win: &Window,
        xs: &[i8],
        wv: &[i8],
        in_off: i32,
        pixel: Option<PixelFn>,
        accumulate: &impl Fn(&mut [i32], &[i8], &[i8], usize, i32),
    ) {
        accumulate_row(r, acc, dims, win, xs, wv, in_off, pixel, accumulate)
    }
    let dims = (h, wd, c, kh, kw, oh, ow, pt, pl);
    // One output per channel with AVX-512: requantized in registers, a row at a time.
    #[cfg(target_arch = "x86_64")]
    let fused = pixel.is_some()
        && o == c
        && kh * kw <= super::depthwise512::MAX_TAPS
        && crate::kernels::simd::vnni()
        && requant.block_form().is_some();
    #[cfg(target_arch = "x86_64")]
    if fused && row > 0 {
        use super::depthwise512::{dot_available, DOT_MAX_KH};
        let len = n * oh * ow * o;
        let mut res = Vec::with_capacity(len);
        let dot = if kh <= DOT_MAX_KH && dot_available() {
            prepared.dot(wv, (kh, kw), in_off, bias)
        } else {
            None
        };
        let fused_row = |r: usize, out_row: &mut [std::mem::MaybeUninit<i8>]| {
            use super::depthwise512::{dot_row, row, DotRow, RowTaps, MAX_TAPS};
            let (bi, oy) = (r / oh, r % oh);
            if let Some(f) = dot {
                let mut rows = [None; DOT_MAX_KH];
                for (ky, slot) in rows.iter_mut().enumerate().take(kh) {
                    let iy = (oy * win.strides[0] + ky * win.dilations[0]) as isize - pt as isize;
                    if (0..h as isize).contains(&iy) {
                        *slot = Some((bi * h + iy as usize) * wd * c);
                    }
                }
                let taps = DotRow {
                    rows: &rows[..kh],
                    width: wd,
                    stride: win.strides[1],
                    dilation: win.dilations[1],
                    pad_left: pl,
                };
                // SAFETY: `dot_available` holds; the rows are of in-bounds pixels of
                // the input (`windowed` checked its length against its shape), `f`
                // was made for its `c` channels, and `out_row` holds `ow` pixels.
                super::gemm::with_scratch(|p, _| unsafe { dot_row(out_row, f, &taps, xs, p) });
                return;
            }
            let mut rows = [(0usize, 0usize); MAX_TAPS];
            let mut nr = 0;
            for ky in 0..kh {
                let iy = (oy * win.strides[0] + ky * win.dilations[0]) as isize - pt as isize;
                if (0..h as isize).contains(&iy) {
                    rows[nr] = ((bi * h + iy as usize) * wd * c, ky * kw);
                    nr += 1;
                }
            }
            let taps = RowTaps {
                rows: &rows[..nr],
                kw,
                width: wd,
                stride: win.strides[1],
                dilation: win.dilations[1],
                pad_left: pl,
            };
            // SAFETY: AVX-512F (with VNNI) and AVX2 are present and the requantizer
            // has a register-block form; the taps are of in-bounds pixels of the
            // input and of the filter (`windowed` checked their lengths against
            // their shapes, and `kh · kw` against `MAX_TAPS`), `out_row` holds `ow`
            // pixels of `o = c` channels, as do `bias` and `requant`.
            unsafe { row(out_row, &taps, xs, wv, in_off, bias, requant) };
        };
        res.spare_capacity_mut()[..len]
            .par_chunks_mut(row)
            .enumerate()
            .for_each(|(r, o)| fused_row(r, o));
        // SAFETY: every row wrote each of its outputs.
        unsafe { res.set_len(len) };
        return Ok(Value::from_vec(vec![n, oh, ow, o], res));
    }
    let mut res = vec![0i8; n * oh * ow * o];
    let compute_in = |r: usize, out_row: &mut [i8], acc_buf: &mut Vec<i32>| {
        // Each pixel's accumulators are zeroed before its taps.
        let acc = super::gemm::grown(acc_buf, ow * o);
        #[cfg(target_arch = "x86_64")]
        let done = crate::kernels::simd::avx2() && {
            // SAFETY: AVX2 is present.
            unsafe { accumulate_row_avx2(r, acc, dims, win, xs, wv, in_off, pixel, &accumulate) };
            true
        };
        #[cfg(not(target_arch = "x86_64"))]
        let done = false;
        if !done {
            accumulate_row(r, acc, dims, win, xs, wv, in_off, pixel, &accumulate);
        }
        requant.rows(acc, bias, out_row);
    };
    let compute =
        |r: usize, out_row: &mut [i8]| super::gemm::with_scratch(|_, a| compute_in(r, out_row, a));
    if row > 0 {
        res.par_chunks_mut(row)
            .enumerate()
            .for_each(|(r, o)| compute(r, o));
    }
    Ok(Value::from_vec(vec![n, oh, ow, o], res))
}

/// `_FusedMatMul` on int8 as TFLite's reference FULLY_CONNECTED computes it: the
/// accumulator is requantized in double, `round(acc * in * w[c] / out)`, per channel
/// or per tensor alike (the reference kernel's float-scale overloads); XNNPACK
/// requantizes it like a convolution.
pub fn fully_connected(
    inputs: &[Value],
    ta: bool,
    tb: bool,
    act: FusedActivation,
    quant: &StepQuant,
) -> Result<Value> {
    let [x, w, b] = inputs else {
        return Err(Error::msg(
            "int8 fully connected needs input, weights and bias",
        ));
    };
    if ta {
        return Err(Error::msg(
            "int8 fully connected cannot transpose its input",
        ));
    }
    let (batch, k, units) = fc_dims(x, w, tb, "int8")?;
    let prepared = Prepared::of(quant, w, b, units, true, act)?;
    let xin = prepared.input;
    let requant = &prepared.requant;
    let bias = bias_i32(b, units)?;
    let xs = x.slice::<i8>()?;
    let packed = super::packed_cache::packed(w, k, units, tb)?;
    let mut res = vec![0i8; batch * units];
    super::gemm::fully_connected(
        batch,
        &packed,
        &mut res,
        |bi| (&xs[bi * k..(bi + 1) * k], -xin.zero_point),
        |_, acc, out| requant.row(acc, bias, out),
    );
    Ok(Value::from_vec(fc_out_shape(x, units), res))
}
