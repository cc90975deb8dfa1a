//! Spatial ops with TensorFlow's float semantics: the transposed convolution
//! (`Conv2DBackpropInput`, TFLite TRANSPOSE_CONV) and image resizing
//! (`ResizeBilinear`, `ResizeNearestNeighbor`, with `align_corners` and
//! `half_pixel_centers`), NHWC.

use super::nn::{out_size, Window};
use super::value::{Buf, Value};
use crate::error::{Error, Result};
use crate::ir::op::Resize;
use crate::ir::FusedActivation;

fn dims4(v: &Value, what: &str) -> Result<[usize; 4]> {
    match v.shape[..] {
        [a, b, c, d] => Ok([a, b, c, d]),
        _ => Err(Error::msg(format!("{what} must be 4-D, got {:?}", v.shape))),
    }
}

fn f32s<'a>(v: &'a Value, what: &str) -> Result<&'a [f32]> {
    match &*v.buf {
        Buf::F32(x) => Ok(x),
        _ => Err(Error::msg(format!(
            "{what} must be float32, got {}",
            v.dtype()
        ))),
    }
}

/// The transposed convolution: the gradient of a convolution of an
/// `output_shape`-sized input (its batch is the input's), filter `[h, w, out, in]`.
pub fn conv2d_transpose(output_shape: &Value, w: &Value, x: &Value, win: &Window) -> Result<Value> {
    let [n, ih, iw, ic] = dims4(x, "input")?;
    let [kh, kw, oc, wic] = dims4(w, "filter")?;
    let os = output_shape.to_i64s()?;
    let [_, oh, ow, soc] = os[..] else {
        return Err(Error::msg(format!("output shape {os:?} is not 4-D")));
    };
    if oh <= 0 || ow <= 0 || soc as usize != oc || wic != ic {
        return Err(Error::msg(format!(
            "output shape {os:?}, filter {:?} and input {:?} do not fit",
            w.shape, x.shape
        )));
    }
    let (oh, ow) = (oh as usize, ow as usize);
    // The forward convolution of the output must give the input's size.
    let (fh, top) = out_size(oh, kh, win.strides[0], win.dilations[0], &win.padding, 0)?;
    let (fw, left) = out_size(ow, kw, win.strides[1], win.dilations[1], &win.padding, 1)?;
    if (fh, fw) != (ih, iw) {
        return Err(Error::msg(format!(
            "a {oh}x{ow} output convolves to {fh}x{fw}, not the input's {ih}x{iw}"
        )));
    }
    let (xv, wv) = (f32s(x, "input")?, f32s(w, "filter")?);
    let total = n
        .checked_mul(oh * ow * oc)
        .filter(|&t| t <= 1 << 31)
        .ok_or_else(|| Error::msg("output is too large"))?;
    let mut out = vec![0f32; total];
    for b in 0..n {
        for iy in 0..ih {
            for ix in 0..iw {
                let xs = &xv[((b * ih + iy) * iw + ix) * ic..][..ic];
                for ky in 0..kh {
                    let oy = (iy * win.strides[0] + ky * win.dilations[0]) as i64 - top as i64;
                    if oy < 0 || oy >= oh as i64 {
                        continue;
                    }
                    for kx in 0..kw {
                        let ox = (ix * win.strides[1] + kx * win.dilations[1]) as i64 - left as i64;
                        if ox < 0 || ox >= ow as i64 {
                            continue;
                        }
                        let o = &mut out[((b * oh + oy as usize) * ow + ox as usize) * oc..][..oc];
                        let wt = &wv[(ky * kw + kx) * oc * ic..][..oc * ic];
                        for (c, acc) in o.iter_mut().enumerate() {
                            let row = &wt[c * ic..][..ic];
                            *acc += row.iter().zip(xs).map(|(a, b)| a * b).sum::<f32>();
                        }
                    }
                }
            }
        }
    }
    Ok(Value::from_vec(vec![n, oh, ow, oc], out))
}

/// [`conv2d_transpose`] of `inputs` (output shape, filter, input), then, when
/// `passes::fuse` folded them in, the bias (input 3) and the activation, with the
/// same f32 arithmetic as the unfused ops.
pub fn conv2d_transpose_fused(
    inputs: &[Value],
    win: &Window,
    act: Option<FusedActivation>,
) -> Result<Value> {
    match (inputs, act) {
        ([os, w, x], None) => conv2d_transpose(os, w, x, win),
        ([os, w, x, b], Some(act)) => {
            let y = conv2d_transpose(os, w, x, win)?;
            super::fused::activate(super::elementwise::bias_add(y, b.clone(), false)?, act)
        }
        _ => Err(Error::msg(format!(
            "Conv2DBackpropInput has {} inputs (3, or 4 with a fused bias)",
            inputs.len()
        ))),
    }
}

fn target(size: &Value) -> Result<[usize; 2]> {
    match size.to_i64s()?[..] {
        [h, w] if h > 0 && w > 0 && h <= 1 << 16 && w <= 1 << 16 => Ok([h as usize, w as usize]),
        ref s => Err(Error::msg(format!(
            "resize size {s:?} must be two positive sizes"
        ))),
    }
}

/// TensorFlow's `CalculateResizeScale`.
fn scale(input: usize, output: usize, align_corners: bool) -> f32 {
    if align_corners && output > 1 {
        (input - 1) as f32 / (output - 1) as f32
    } else {
        input as f32 / output as f32
    }
}

/// `ResizeBilinear`, as TensorFlow's CPU kernel computes it.
pub fn resize_bilinear(x: &Value, size: &Value, r: Resize) -> Result<Value> {
    let [n, ih, iw, c] = dims4(x, "input")?;
    let [oh, ow] = target(size)?;
    let xv = f32s(x, "input")?;
    let weights = |o: usize, i: usize| -> Vec<(usize, usize, f32)> {
        let s = scale(i, o, r.align_corners);
        (0..o)
            .map(|k| {
                let v = if r.half_pixel_centers {
                    (k as f32 + 0.5) * s - 0.5
                } else {
                    k as f32 * s
                };
                let f = v.floor();
                let lo = (f as i64).max(0) as usize;
                let hi = (v.ceil() as i64).min(i as i64 - 1).max(0) as usize;
                (lo.min(i - 1), hi, v - f)
            })
            .collect()
    };
    let (ys, xs) = (weights(oh, ih), weights(ow, iw));
    let mut out = Vec::with_capacity(n * oh * ow * c);
    for b in 0..n {
        for &(y0, y1, ly) in &ys {
            for &(x0, x1, lx) in &xs {
                let at = |y: usize, xx: usize, ch: usize| xv[((b * ih + y) * iw + xx) * c + ch];
                for ch in 0..c {
                    let (tl, tr) = (at(y0, x0, ch), at(y0, x1, ch));
                    let (bl, br) = (at(y1, x0, ch), at(y1, x1, ch));
                    let top = tl + (tr - tl) * lx;
                    let bottom = bl + (br - bl) * lx;
                    out.push(top + (bottom - top) * ly);
                }
            }
        }
    }
    Ok(Value::from_vec(vec![n, oh, ow, c], out))
}

/// `ResizeNearestNeighbor`, as TensorFlow's CPU kernel computes it; it only moves
/// elements, so it runs on any element type (int8 keeps its parameters).
pub fn resize_nearest(x: &Value, size: &Value, r: Resize) -> Result<Value> {
    let [n, ih, iw, c] = dims4(x, "input")?;
    let [oh, ow] = target(size)?;
    let src = |o: usize, i: usize| -> Vec<usize> {
        let s = scale(i, o, r.align_corners);
        (0..o)
            .map(|k| {
                let v = if r.half_pixel_centers {
                    (k as f32 + 0.5) * s
                } else {
                    k as f32 * s
                };
                let v = if r.align_corners {
                    v.round()
                } else {
                    v.floor()
                };
                (v.max(0.0) as usize).min(i - 1)
            })
            .collect()
    };
    let (ys, xs) = (src(oh, ih), src(ow, iw));
    let mut idx = Vec::with_capacity(n * oh * ow * c);
    for b in 0..n {
        for &y in &ys {
            for &xx in &xs {
                let base = ((b * ih + y) * iw + xx) * c;
                idx.extend(base..base + c);
            }
        }
    }
    let shape = vec![n, oh, ow, c];
    Ok(match &*x.buf {
        Buf::F32(v) => Value::from_vec(shape, idx.iter().map(|&i| v[i]).collect::<Vec<_>>()),
        Buf::I8(v) => Value::from_vec(shape, idx.iter().map(|&i| v[i]).collect::<Vec<_>>()),
        Buf::I32(v) => Value::from_vec(shape, idx.iter().map(|&i| v[i]).collect::<Vec<_>>()),
        _ => {
            return Err(Error::msg(format!(
                "ResizeNearestNeighbor of a {} tensor",
                x.dtype()
            )))
        }
    })
}
