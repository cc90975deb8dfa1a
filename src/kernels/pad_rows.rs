//! Constant padding row by row: each innermost run of the output is the fill value,
//! or fill, a copy of an input run, fill. The same values as the element-by-element
//! walk `array::pad` uses for mirror padding, with one index computation per run.

use super::value::{Elem, Value};
use crate::error::{Error, Result};

/// `Pad` / `PadV2` of `x` (rank ≥ 1) by the checked `paddings` (`[before, after]` per
/// dimension) to `shape`.
pub(super) fn pad_constant<T: Elem>(
    x: &Value,
    paddings: &[i64],
    constant: Option<&Value>,
    shape: Vec<usize>,
) -> Result<Value> {
    let s = x.slice::<T>()?;
    let fill = match constant {
        Some(c) => c
            .slice::<T>()?
            .first()
            .cloned()
            .ok_or_else(|| Error::msg("empty pad value"))?,
        None => T::zero(),
    };
    let r = shape.len();
    let inner = shape[r - 1];
    let total: usize = shape.iter().product();
    let mut out: Vec<T> = Vec::with_capacity(total);
    if inner == 0 || total == 0 {
        return Ok(Value::from_vec(shape, out));
    }
    let before = paddings[2 * (r - 1)] as usize;
    let in_inner = x.shape[r - 1];
    let mut in_strides = vec![1usize; r];
    for d in (0..r - 1).rev() {
        in_strides[d] = in_strides[d + 1] * x.shape[d + 1];
    }
    // Output row `row` (all dimensions but the last) reads input row `src` when each of
    // its coordinates minus the padding before lies inside the input.
    let rows = total / inner;
    let mut idx = vec![0usize; r - 1];
    for _ in 0..rows {
        let mut src = Some(0usize);
        for d in 0..r - 1 {
            let i = idx[d] as i64 - paddings[2 * d];
            src = match src {
                Some(o) if (0..x.shape[d] as i64).contains(&i) => {
                    Some(o + i as usize * in_strides[d])
                }
                _ => None,
            };
        }
        match src {
            Some(o) => {
                out.extend(std::iter::repeat_n(fill.clone(), before));
                out.extend_from_slice(&s[o..o + in_inner]);
                out.extend(std::iter::repeat_n(fill.clone(), inner - before - in_inner));
            }
            None => out.extend(std::iter::repeat_n(fill.clone(), inner)),
        }
        for d in (0..r - 1).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Ok(Value::from_vec(shape, out))
}
