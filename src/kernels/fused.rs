//! Float kernels of quantize_int8's fused ops (`_FusedConv2D`,
//! `_FusedDepthwiseConv2dNative`, `_FusedMatMul`): the matrix op, `BiasAdd`, then the
//! activation, with the same f32 arithmetic as the unfused ops (applied by the matrix
//! kernel to each tile of outputs while it is in cache: [`nn::Epilogue`]).

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

/// The epilogue of a fused op: its bias (a vector) and activation.
pub(super) fn epilogue<'a>(b: &'a Value, act: FusedActivation) -> Result<nn::Epilogue<'a>> {
    if b.rank() != 1 {
        return Err(Error::msg(format!(
            "bias must be a vector, got shape {:?}",
            b.shape
        )));
    }
    let act = match act {
        FusedActivation::None => nn::Act::None,
        FusedActivation::Relu => nn::Act::Relu,
        FusedActivation::Relu6 => nn::Act::Relu6,
        FusedActivation::ReluN1To1 => {
            return Err(Error::msg("RELU_N1_TO_1 has no float fused form"))
        }
    };
    Ok(nn::Epilogue {
        bias: Some(b.slice::<f32>()?),
        act,
    })
}

/// Float `_FusedConv2D`: `Conv2D`, `BiasAdd`, activation, in that order (the same
/// f32 arithmetic as the unfused ops).
pub fn fused_conv_float(inputs: &[Value], win: &Window, act: FusedActivation) -> Result<Value> {
    let [x, w, b] = inputs else {
        return Err(Error::msg("_FusedConv2D needs input, filter and bias"));
    };
    nn::conv2d_ex(x, w, win, epilogue(b, act)?)
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
    nn::depthwise_conv2d_ex(x, w, win, epilogue(b, act)?)
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
    let epi = epilogue(b, act)?;
    // A `BatchMatMul` by a constant matrix: the leading dimensions are rows.
    if x.rank() > 2 && !ta {
        let k = x.shape[x.rank() - 1];
        let rows = x.shape[..x.rank() - 1].iter().product();
        let y = nn::matmul_ex(&x.reshaped(vec![rows, k])?, w, ta, tb, epi)?;
        let mut shape = x.shape.clone();
        *shape.last_mut().expect("rank > 2") = y.shape[1];
        y.reshaped(shape)
    } else {
        nn::matmul_ex(x, w, ta, tb, epi)
    }
}
