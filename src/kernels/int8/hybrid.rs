//! Dynamic-range (hybrid) kernels: float input and output, int8 weights with
//! per-channel scales, as LiteRT's FULLY_CONNECTED and CONV_2D compute them when
//! the filter is int8 and the input float32. Each batch row of the input is
//! quantized on the fly ([`asymmetric_quantize_floats`] or
//! [`symmetric_quantize_floats`]), multiplied in i32, and the accumulator is
//! scaled back to float ([`hybrid_dequantize`]) before the float bias and the
//! fused activation.
//!
//! * FULLY_CONNECTED (`fully_connected.cc` `EvalHybrid`, the same code in every
//!   resolver): asymmetric input quantization per batch row
//!   (`asymmetric_quantize_inputs`, which qpipe always sets, as the converter does),
//!   `acc = Σ w·x_q − row_sum(w)·offset`, then `bias + acc * (in_scale *
//!   w_scale[c])` (`MatrixBatchVectorMultiplyAccumulate`).
//! * CONV_2D with per-channel scales that are not all equal (`conv.cc`
//!   `EvalHybridPerChannel`, reference `HybridConvPerChannel`): asymmetric
//!   quantization of each image, padding taps skipped (they stand for 0.0), then
//!   `(acc * w_scale[c]) * in_scale + bias`.
//! * CONV_2D with one scale (`EvalHybrid`): symmetric quantization per image,
//!   `acc * (in_scale * w_scale) + bias`.
//!
//! With [`Arithmetic::Reference`] these are the reference resolver's results, bit
//! for bit. LiteRT's default resolver hands hybrid CONV_2D and FULLY_CONNECTED
//! to the XNNPACK delegate's dynamically quantized (qd8-f32-qc8w) kernels, which
//! [`Arithmetic::LiteRt`] follows: [`xnn_dynamic_quantize`] per image or batch
//! row, then `fma(acc * in_scale, w_scale[c], bias)` ([`HybridScaling::XnnFma`], as
//! XNNPACK's FMA microkernels on x86-64 compute it; a CPU without FMA rounds the
//! product and the sum separately). Both are checked in
//! tests/quantize_hybrid_kernels_litert.rs and tests/quantize_hybrid_litert.rs.

use rayon::prelude::*;

use super::conv::{dims4, fc_dims, fc_out_shape};
use super::{channel_scales, Arithmetic};
use crate::error::{Error, Result};
use crate::ir::FusedActivation;
use crate::kernels::nn::{out_size, Window};
use crate::kernels::ops::StepQuant;
use crate::kernels::rounding::{
    asymmetric_quantize_floats, hybrid_dequantize, symmetric_quantize_floats, xnn_dynamic_quantize,
    DynamicRow, HybridScaling,
};
use crate::kernels::simd::igemm::PackedWeights;
use crate::kernels::value::Value;

/// TFLite `ActivationFunctionWithMinMax` for the float fused activations.
fn activate(v: f32, act: FusedActivation) -> f32 {
    let (lo, hi) = match act {
        FusedActivation::None => return v,
        FusedActivation::Relu => (0.0, f32::INFINITY),
        FusedActivation::Relu6 => (0.0, 6.0),
        FusedActivation::ReluN1To1 => (-1.0, 1.0),
    };
    v.max(lo).min(hi)
}

fn float_bias(b: &Value, channels: usize) -> Result<&[f32]> {
    let v = b.slice::<f32>().map_err(|e| e.context("hybrid bias"))?;
    if v.len() != channels || b.rank() != 1 {
        return Err(Error::msg(format!(
            "hybrid bias of shape {:?} for {channels} output channels",
            b.shape
        )));
    }
    Ok(v)
}

/// Whether the weights' scales make LiteRT take its per-channel (asymmetric) path.
fn distinct_scales(ws: &[f32]) -> bool {
    ws.iter().any(|&s| s != ws[0])
}

/// `_FusedMatMul` with float input, int8 weights (`[in, out]`, or `[out, in]` with
/// `transpose_b`) and float bias: LiteRT's hybrid FULLY_CONNECTED with
/// `asymmetric_quantize_inputs`.
pub fn fully_connected(
    inputs: &[Value],
    tb: bool,
    act: FusedActivation,
    quant: &StepQuant,
) -> Result<Value> {
    let [x, w, b] = inputs else {
        return Err(Error::msg(
            "hybrid fully connected needs input, weights and bias",
        ));
    };
    let (batch, k, units) = fc_dims(x, w, tb, "hybrid")?;
    let ws = channel_scales(quant, 1, units)?;
    let bias = float_bias(b, units)?;
    let xs = x.slice::<f32>()?;
    let packed = PackedWeights::pack(w.slice::<i8>()?, k, units, tb);
    let scaling = match quant.arithmetic {
        Arithmetic::Reference => HybridScaling::AccTimesProduct,
        Arithmetic::LiteRt => HybridScaling::XnnFma,
    };
    let wv = w.slice::<i8>()?;
    let row_sums: Vec<i32> = (0..units)
        .map(|u| {
            (0..k)
                .map(|kk| {
                    (if tb {
                        wv[u * k + kk]
                    } else {
                        wv[kk * units + u]
                    }) as i32
                })
                .sum()
        })
        .collect();
    let rows: Vec<DynamicRow> = (0..batch)
        .into_par_iter()
        .map(|bi| {
            let v = &xs[bi * k..(bi + 1) * k];
            match quant.arithmetic {
                Arithmetic::Reference => asymmetric_quantize_floats(v),
                Arithmetic::LiteRt => xnn_dynamic_quantize(v),
            }
        })
        .collect();
    let mut res = vec![0f32; batch * units];
    super::gemm::fully_connected(
        batch,
        &packed,
        &mut res,
        |bi| (&rows[bi].q[..], 0),
        |bi, dots, out| {
            let row = &rows[bi];
            for (u, (&dot, o)) in dots.iter().zip(out).enumerate() {
                let acc = dot.wrapping_sub(row_sums[u].wrapping_mul(row.offset));
                let v = hybrid_dequantize(acc, row.scale, ws[u], bias[u], scaling);
                *o = activate(v, act);
            }
        },
    );
    Ok(Value::from_vec(fc_out_shape(x, units), res))
}

/// `out[c] = activate(hybrid_dequantize(acc[c], …))` for the channels of one output
/// pixel; on AVX2 the same expressions compiled for it (multiplies and adds, no
/// fused multiply-add unless `scaling` asks for one: the same bits).
#[allow(clippy::too_many_arguments)]
fn dequantize_pixel(
    acc: &[i32],
    in_scale: f32,
    ws: &[f32],
    bias: &[f32],
    scaling: HybridScaling,
    act: FusedActivation,
    out: &mut [f32],
) {
    #[inline(always)]
    fn body(
        acc: &[i32],
        in_scale: f32,
        ws: &[f32],
        bias: &[f32],
        scaling: HybridScaling,
        act: FusedActivation,
        out: &mut [f32],
    ) {
        for (((&a, &w), &b), r) in acc.iter().zip(ws).zip(bias).zip(out) {
            *r = activate(hybrid_dequantize(a, in_scale, w, b, scaling), act);
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn body_avx2(
        acc: &[i32],
        in_scale: f32,
        ws: &[f32],
        bias: &[f32],
        scaling: HybridScaling,
        act: FusedActivation,
        out: &mut [f32],
    ) {
        body(acc, in_scale, ws, bias, scaling, act, out)
    }
    #[cfg(target_arch = "x86_64")]
    if scaling != HybridScaling::XnnFma && crate::kernels::simd::avx2() {
        // SAFETY: AVX2 is present.
        unsafe { body_avx2(acc, in_scale, ws, bias, scaling, act, out) };
        return;
    }
    body(acc, in_scale, ws, bias, scaling, act, out)
}

/// `_FusedConv2D` with float input (NHWC), int8 filter (HWIO) and float bias:
/// LiteRT's hybrid CONV_2D.
pub fn conv2d(
    inputs: &[Value],
    win: &Window,
    act: FusedActivation,
    quant: &StepQuant,
) -> Result<Value> {
    let [x, w, b] = inputs else {
        return Err(Error::msg(
            "hybrid convolution needs input, filter and bias",
        ));
    };
    let [n, h, wd, c] = dims4(x, "input")?;
    let [kh, kw, kc, o] = dims4(w, "filter")?;
    if kc != c {
        return Err(Error::msg(format!(
            "filter has {kc} input channels, the input has {c}"
        )));
    }
    let ws = channel_scales(quant, 1, o)?;
    let bias = float_bias(b, o)?;
    let per_channel = distinct_scales(&ws);
    let scaling = match (quant.arithmetic, per_channel) {
        (Arithmetic::LiteRt, _) => HybridScaling::XnnFma,
        (Arithmetic::Reference, true) => HybridScaling::AccTimesWeightFirst,
        (Arithmetic::Reference, false) => HybridScaling::AccTimesProduct,
    };
    let (oh, pt) = out_size(h, kh, win.strides[0], win.dilations[0], &win.padding, 0)?;
    let (ow, pl) = out_size(wd, kw, win.strides[1], win.dilations[1], &win.padding, 1)?;
    let xs = x.slice::<f32>()?;
    let image = h * wd * c;
    let rows: Vec<DynamicRow> = (0..n)
        .into_par_iter()
        .map(|bi| {
            let v = &xs[bi * image..(bi + 1) * image];
            match (quant.arithmetic, per_channel) {
                (Arithmetic::LiteRt, _) => xnn_dynamic_quantize(v),
                (Arithmetic::Reference, true) => asymmetric_quantize_floats(v),
                (Arithmetic::Reference, false) => symmetric_quantize_floats(v),
            }
        })
        .collect();
    let mut res = vec![0f32; n * oh * ow * o];
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
    let per_image = oh * ow;
    super::gemm::conv(
        geom,
        n,
        w.slice::<i8>()?,
        o,
        &mut res,
        |bi| (&rows[bi].q[..], -rows[bi].offset),
        |px0, acc, out| {
            for (j, (px_acc, px_out)) in
                acc.chunks_exact(o).zip(out.chunks_exact_mut(o)).enumerate()
            {
                let row = &rows[(px0 + j) / per_image];
                dequantize_pixel(px_acc, row.scale, &ws, bias, scaling, act, px_out);
            }
        },
    );
    Ok(Value::from_vec(vec![n, oh, ow, o], res))
}
