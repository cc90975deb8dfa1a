//! Float32 `Add`, `Sub`, `Mul`, `Maximum` and `Minimum` where one operand repeats whole
//! over the other (a bias, a residual, a same-shape operand): one loop per op, so that
//! the compiler vectorizes it, with the arithmetic of [`super::elementwise::binary`]
//! (including which operand `Maximum` and `Minimum` return for NaN).

use super::elementwise::BinaryOp;
use super::value::Value;
use crate::error::Result;
use crate::ir::DType;

/// `Some(result)` when the fast path applies, else `None` with the operands back.
pub(super) fn try_binary(
    op: BinaryOp,
    a: Value,
    b: Value,
) -> std::result::Result<Result<Value>, (Value, Value)> {
    let ok_op = matches!(
        op,
        BinaryOp::Add | BinaryOp::Sub | BinaryOp::Mul | BinaryOp::Maximum | BinaryOp::Minimum
    );
    if !ok_op || a.dtype() != DType::F32 || b.dtype() != DType::F32 {
        return Err((a, b));
    }
    if !b.is_empty() && a.rank() >= b.rank() && repeats_whole(&b.shape, &a.shape) {
        return Ok(apply(op, a, b, false));
    }
    if !a.is_empty() && b.rank() >= a.rank() && repeats_whole(&a.shape, &b.shape) {
        return Ok(apply(op, b, a, true));
    }
    Err((a, b))
}

/// Whether `small`, without its leading 1s, is a suffix of `big`.
fn repeats_whole(small: &[usize], big: &[usize]) -> bool {
    let lead = small.iter().take_while(|&&d| d == 1).count();
    let core = &small[lead..];
    core.len() <= big.len() && big[big.len() - core.len()..] == *core
}

/// `big op small` (or `small op big` when `swapped`), in `big`'s buffer.
fn apply(op: BinaryOp, big: Value, small: Value, swapped: bool) -> Result<Value> {
    let shape = big.shape.clone();
    let sv = small.slice::<f32>()?;
    let mut bv = big.into_vec::<f32>()?;
    macro_rules! each {
        (|$x:ident, $y:ident| $e:expr) => {
            for chunk in bv.chunks_mut(sv.len()) {
                for (o, &s) in chunk.iter_mut().zip(sv) {
                    let ($x, $y) = if swapped { (s, *o) } else { (*o, s) };
                    *o = $e;
                }
            }
        };
    }
    match op {
        BinaryOp::Add => each!(|x, y| x + y),
        BinaryOp::Sub => each!(|x, y| x - y),
        BinaryOp::Mul => each!(|x, y| x * y),
        BinaryOp::Maximum => each!(|x, y| if x < y { y } else { x }),
        BinaryOp::Minimum => each!(|x, y| if y < x { y } else { x }),
        _ => unreachable!("checked by try_binary"),
    }
    Ok(Value::from_vec(shape, bv))
}
