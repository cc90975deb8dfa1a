//! Float kernels of quantize_int8's fused ops (`_FusedConv2D`,
//! `_FusedDepthwiseConv2dNative`, `_FusedMatMul`): the matrix op, `BiasAdd`, then the
//! activation, with the same f32 arithmetic as the unfused ops.

use super::elementwise::{self, UnaryOp};
use super::nn::{self, Window};
use super::value::Value;
use crate::error::{Error, Result};
use crate::ir::FusedActivation;

pub(super) fn activate(v: Value, act: FusedActivation) -> Result<Value> {
    match act {
        FusedActivation::None => Ok(v),
        FusedActivation::Relu => elementwise::unary(UnaryOp::Relu, v),
        FusedActivation::Relu6 => elementwise::unary(UnaryOp::Relu6, v),
        FusedActivation::ReluN1To1 => Err(Error::msg("RELU_N1_TO_1 has no float fused form")),
    }
}

/// Float `_FusedConv2D`: `Conv2D`, `BiasAdd`, activation, in that order (the same
/// f32 arithmetic as the unfused ops).
pub fn fused_conv_float(inputs: &[Value], win: &Window, act: FusedActivation) -> Result<Value> {
    let [x, w, b] = inputs else {
        return Err(Error::msg("_FusedConv2D needs input, filter and bias"));
    };
    let y = nn::conv2d(x, w, win)?;
    activate(elementwise::bias_add(y, b.clone(), false)?, act)
}

/// Float `_FusedDepthwiseConv2dNative`.
pub fn fused_depthwise_float(
    inputs: &[Value],
    win: &Window,
    act: FusedActivation,
) -> Result<Value> {
    let [x, w, b] = inputs else {
        return Err(Error::msg(
            "_FusedDepthwiseConv2dNative needs input, filter and bias",
        ));
    };
    let y = nn::depthwise_conv2d(x, w, win)?;
    activate(elementwise::bias_add(y, b.clone(), false)?, act)
}

/// Float `_FusedMatMul`.
pub fn fused_matmul_float(
    inputs: &[Value],
    ta: bool,
    tb: bool,
    act: FusedActivation,
) -> Result<Value> {
    let [x, w, b] = inputs else {
        return Err(Error::msg("_FusedMatMul needs input, weights and bias"));
    };
    let y = nn::matmul(x, w, ta, tb)?;
    activate(elementwise::bias_add(y, b.clone(), false)?, act)
}
