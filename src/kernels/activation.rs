//! Float activations that are one TFLite op but several TensorFlow ops.

use super::value::{Buf, Value};
use crate::error::{Error, Result};

/// HARD_SWISH: `x * relu6(x + 3) / 6`, in that order (as TensorFlow's
/// `x * tf.nn.relu6(x + 3) / 6` and LiteRT's float kernel compute it).
pub fn hard_swish(x: &Value) -> Result<Value> {
    match &*x.buf {
        Buf::F32(v) => Ok(Value::from_vec(
            x.shape.clone(),
            v.iter()
                .map(|&a| a * (a + 3.0).clamp(0.0, 6.0) / 6.0)
                .collect::<Vec<f32>>(),
        )),
        _ => Err(Error::msg(format!(
            "HardSwish takes float32 input, got {}",
            x.dtype()
        ))),
    }
}
