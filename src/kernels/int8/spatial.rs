//! The spatial ops in int8, as LiteRT's reference kernels compute them:
//! TRANSPOSE_CONV (`reference_integer_ops::TransposeConv`: per output channel
//! weights, int32 bias, fused activation) and RESIZE_BILINEAR
//! (`reference_ops::ResizeBilinearInteger`: 10-bit fixed-point coordinates,
//! `align_corners` / `half_pixel_centers`). RESIZE_NEAREST_NEIGHBOR only moves
//! values and runs the generic kernel.

use super::conv::{bias_i32, dims4, requantizer};
use super::{channel_scales, input_affine, output_affine};
use crate::error::{Error, Result};
use crate::ir::op::Resize;
use crate::ir::FusedActivation;
use crate::kernels::nn::{out_size, Window};
use crate::kernels::ops::StepQuant;
use crate::kernels::rounding::round_shift_20_half_away;
use crate::kernels::value::Value;

/// `Conv2DBackpropInput` on int8: inputs output shape, filter `[h, w, out, in]`
/// (int8, per output channel), input, then the int32 bias when `act` is set.
/// The reference kernel scatters `(x - x_zp) * w` of every input element into an
/// int32 scratch of the output's size, then adds the bias and requantizes each
/// output per channel.
pub fn transpose_conv(
    inputs: &[Value],
    win: &Window,
    act: Option<FusedActivation>,
    quant: &StepQuant,
) -> Result<Value> {
    let (os, w, x, b) = match inputs {
        [os, w, x] => (os, w, x, None),
        [os, w, x, b] => (os, w, x, Some(b)),
        _ => {
            return Err(Error::msg(
                "int8 transposed convolution needs 3 or 4 inputs",
            ))
        }
    };
    let [n, ih, iw, ic] = dims4(x, "input")?;
    let [kh, kw, oc, wic] = dims4(w, "filter")?;
    let shape = os.to_i64s()?;
    let [_, oh, ow, soc] = shape[..] else {
        return Err(Error::msg(format!("output shape {shape:?} is not 4-D")));
    };
    if oh <= 0 || ow <= 0 || soc as usize != oc || wic != ic {
        return Err(Error::msg(format!(
            "output shape {shape:?}, filter {:?} and input {:?} do not fit",
            w.shape, x.shape
        )));
    }
    if win.dilations != [1, 1] {
        return Err(Error::msg("int8 transposed convolution has no dilation"));
    }
    let (oh, ow) = (oh as usize, ow as usize);
    let (fh, top) = out_size(oh, kh, win.strides[0], 1, &win.padding, 0)?;
    let (fw, left) = out_size(ow, kw, win.strides[1], 1, &win.padding, 1)?;
    if (fh, fw) != (ih, iw) {
        return Err(Error::msg(format!(
            "a {oh}x{ow} output convolves to {fh}x{fw}, not the input's {ih}x{iw}"
        )));
    }
    let xin = input_affine(quant, 2)?;
    let out = output_affine(quant)?;
    let ws = channel_scales(quant, 1, oc)?;
    let bias = b.map(|b| bias_i32(b, oc)).transpose()?;
    let act = act.unwrap_or(FusedActivation::None);
    let requant = requantizer(quant.arithmetic, false, xin.scale, &ws, out, act);
    let total = n
        .checked_mul(oh * ow * oc)
        .filter(|&t| t <= 1 << 31)
        .ok_or_else(|| Error::msg("output is too large"))?;
    let (xv, wv) = (x.slice::<i8>()?, w.slice::<i8>()?);
    let mut scratch = vec![0i32; total];
    for bi in 0..n {
        for iy in 0..ih {
            for ix in 0..iw {
                let xs = &xv[((bi * ih + iy) * iw + ix) * ic..][..ic];
                for ky in 0..kh {
                    let oy = (iy * win.strides[0] + ky) as i64 - top as i64;
                    if oy < 0 || oy >= oh as i64 {
                        continue;
                    }
                    for kx in 0..kw {
                        let ox = (ix * win.strides[1] + kx) as i64 - left as i64;
                        if ox < 0 || ox >= ow as i64 {
                            continue;
                        }
                        let o =
                            &mut scratch[((bi * oh + oy as usize) * ow + ox as usize) * oc..][..oc];
                        let wt = &wv[(ky * kw + kx) * oc * ic..][..oc * ic];
                        for (c, acc) in o.iter_mut().enumerate() {
                            let row = &wt[c * ic..][..ic];
                            let s = row.iter().zip(xs).fold(0i32, |s, (&wk, &xk)| {
                                s.wrapping_add((xk as i32 - xin.zero_point) * wk as i32)
                            });
                            *acc = acc.wrapping_add(s);
                        }
                    }
                }
            }
        }
    }
    let res: Vec<i8> = scratch
        .iter()
        .enumerate()
        .map(|(k, &a)| {
            let c = k % oc;
            let a = bias.map_or(a, |b| a.wrapping_add(b[c]));
            requant.apply(a, c)
        })
        .collect();
    Ok(Value::from_vec(vec![n, oh, ow, oc], res))
}

/// TFLite's 10-bit resize scale: `round(2^10 * in / out)` (or `(in - 1) / (out - 1)`
/// with `align_corners`), in integer arithmetic.
fn scale_10(input: usize, output: usize, align_corners: bool) -> i64 {
    let (i, o) = (input as i64, output as i64);
    if align_corners && o > 1 {
        ((1 << 10) * (i - 1) + (o - 1) / 2) / (o - 1)
    } else {
        ((1 << 10) * i + o / 2) / o
    }
}

/// `ComputeInterpolationValuesInteger`: the 10-bit source coordinate of output
/// `k` and the two source indices around it (C++ integer division, toward zero).
fn coords(k: usize, scale: i64, half_pixel_centers: bool, input: usize) -> (i64, usize, usize) {
    let v = if half_pixel_centers {
        k as i64 * scale + scale / 2 - (1 << 9)
    } else {
        k as i64 * scale
    };
    let lo = (v / (1 << 10)).max(0);
    let hi = ((v + (1 << 10) - 1) / (1 << 10)).min(input as i64 - 1);
    (v, lo as usize, hi.max(0) as usize)
}

/// RESIZE_BILINEAR on int8: input and output share their parameters.
pub fn resize_bilinear(x: &Value, size: &Value, r: Resize, quant: &StepQuant) -> Result<Value> {
    let xin = input_affine(quant, 0)?;
    let out = output_affine(quant)?;
    if xin != out {
        return Err(Error::msg(format!(
            "int8 resize input has scale {} zero point {}, the output {} / {}; they must be equal",
            xin.scale, xin.zero_point, out.scale, out.zero_point
        )));
    }
    let [n, ih, iw, c] = dims4(x, "input")?;
    let (oh, ow) = match size.to_i64s()?[..] {
        [h, w] if h > 0 && w > 0 && h <= 1 << 16 && w <= 1 << 16 => (h as usize, w as usize),
        ref s => {
            return Err(Error::msg(format!(
                "resize size {s:?} must be two positive sizes"
            )))
        }
    };
    if ih == 0 || iw == 0 {
        return Err(Error::msg("resize of an empty image"));
    }
    let xv = x.slice::<i8>()?;
    let (sy, sx) = (
        scale_10(ih, oh, r.align_corners),
        scale_10(iw, ow, r.align_corners),
    );
    let ys: Vec<_> = (0..oh)
        .map(|k| coords(k, sy, r.half_pixel_centers, ih))
        .collect();
    let xs: Vec<_> = (0..ow)
        .map(|k| coords(k, sx, r.half_pixel_centers, iw))
        .collect();
    let mut res = Vec::with_capacity(n * oh * ow * c);
    for b in 0..n {
        for &(vy, y0, y1) in &ys {
            let dy = vy - (1 << 10) * y0 as i64;
            for &(vx, x0, x1) in &xs {
                let dx = vx - (1 << 10) * x0 as i64;
                let at =
                    |y: usize, xx: usize, ch: usize| xv[((b * ih + y) * iw + xx) * c + ch] as i64;
                for ch in 0..c {
                    let v = at(y0, x0, ch) * ((1 << 10) - dy) * ((1 << 10) - dx)
                        + at(y1, x0, ch) * dy * ((1 << 10) - dx)
                        + at(y0, x1, ch) * ((1 << 10) - dy) * dx
                        + at(y1, x1, ch) * dy * dx;
                    res.push(round_shift_20_half_away(v) as i8);
                }
            }
        }
    }
    Ok(Value::from_vec(vec![n, oh, ow, c], res))
}
