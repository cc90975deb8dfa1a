//! `Split` and `SplitV`: one input cut into parts along an axis, for every dtype
//! (int8 parts keep the input's scale and zero point, as TFLite's SPLIT does).

use super::array::norm_axis;
use super::value::{dispatch_any, Value};
use crate::error::{Error, Result};

/// The parts of `x` along `axis`, of `sizes` elements each.
pub fn split(x: &Value, axis: i64, sizes: &[usize]) -> Result<Vec<Value>> {
    let a = norm_axis(axis, x.rank(), false)?;
    if sizes.iter().sum::<usize>() != x.shape[a] {
        return Err(Error::msg(format!(
            "split sizes {sizes:?} do not add up to dimension {a} of {:?}",
            x.shape
        )));
    }
    let outer: usize = x.shape[..a].iter().product();
    let inner: usize = x.shape[a + 1..].iter().product();
    let row = x.shape[a] * inner;
    dispatch_any!(x.dtype(), T => {
        let s = x.slice::<T>()?;
        let mut start = 0;
        let mut parts = Vec::with_capacity(sizes.len());
        for &n in sizes {
            let mut out = Vec::with_capacity(outer * n * inner);
            for o in 0..outer {
                let base = o * row + start * inner;
                out.extend_from_slice(&s[base..base + n * inner]);
            }
            let mut shape = x.shape.clone();
            shape[a] = n;
            parts.push(Value::from_vec(shape, out));
            start += n;
        }
        Ok(parts)
    })
}

/// `Split` (inputs: axis, value) into `num` equal parts, or `SplitV` (value,
/// size_splits, axis) with at most one size of -1.
pub fn split_op(inputs: &[Value], num: usize, v: bool) -> Result<Vec<Value>> {
    let (x, axis) = if v {
        (&inputs[0], &inputs[2])
    } else {
        (&inputs[1], &inputs[0])
    };
    let axis = match axis.to_i64s()?[..] {
        [a] => a,
        _ => return Err(Error::msg("the split axis must be a scalar")),
    };
    let a = norm_axis(axis, x.rank(), false)?;
    let dim = x.shape[a];
    let sizes: Vec<usize> = if v {
        let raw = inputs[1].to_i64s()?;
        if raw.len() != num || raw.iter().filter(|&&s| s == -1).count() > 1 {
            return Err(Error::msg(format!(
                "size_splits {raw:?} do not match num_split {num}"
            )));
        }
        let known: i64 = raw.iter().filter(|&&s| s != -1).sum();
        raw.iter()
            .map(|&s| {
                let s = if s == -1 { dim as i64 - known } else { s };
                usize::try_from(s)
                    .map_err(|_| Error::msg(format!("size_splits {raw:?} do not fit {dim}")))
            })
            .collect::<Result<_>>()?
    } else {
        if num == 0 || dim % num != 0 {
            return Err(Error::msg(format!(
                "dimension {a} of size {dim} does not split into {num} parts"
            )));
        }
        vec![dim / num; num]
    };
    split(x, a as i64, &sizes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_and_splitv_cut_along_the_axis() {
        let x = Value::from_vec(vec![2, 3], vec![0f32, 1., 2., 3., 4., 5.]);
        let axis = Value::from_vec(vec![], vec![1i32]);
        let sizes = Value::from_vec(vec![2], vec![-1i32, 2]);
        let parts = split_op(&[x.clone(), sizes, axis.clone()], 2, true).unwrap();
        assert_eq!(parts[0].shape, vec![2, 1]);
        assert_eq!(parts[0].slice::<f32>().unwrap(), &[0., 3.]);
        assert_eq!(parts[1].slice::<f32>().unwrap(), &[1., 2., 4., 5.]);
        let e = split_op(&[axis, x], 2, false).unwrap_err().to_string();
        assert!(e.contains("does not split"), "{e}");
    }
}
