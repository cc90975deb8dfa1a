//! Int8 HARD_SWISH with LiteRT's reference arithmetic ([`hard_swish_int8`]).

use super::{input_affine, output_affine};
use crate::error::{Error, Result};
use crate::kernels::ops::StepQuant;
use crate::kernels::rounding::{hard_swish_int8, HardSwishParams};
use crate::kernels::value::{Buf, Value};

pub fn hard_swish(x: &Value, quant: &StepQuant) -> Result<Value> {
    let (i, o) = (input_affine(quant, 0)?, output_affine(quant)?);
    let p =
        HardSwishParams::new(i.scale, i.zero_point, o.scale, o.zero_point).ok_or_else(|| {
            Error::msg(format!(
                "int8 HARD_SWISH: output scale {} is too small for input scale {} \
             (LiteRT needs input_scale / 128 <= output_scale)",
                o.scale, i.scale
            ))
        })?;
    match &*x.buf {
        Buf::I8(v) => Ok(Value::from_vec(
            x.shape.clone(),
            v.iter()
                .map(|&q| hard_swish_int8(q, &p))
                .collect::<Vec<i8>>(),
        )),
        _ => Err(Error::msg("int8 HARD_SWISH of a non-int8 tensor")),
    }
}
