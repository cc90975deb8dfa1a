//! How the int8 rewrite treats the data-movement ops: they move int8 values
//! with their input's scale and zero point (TFLite's TRANSPOSE, TILE, SLICE,
//! STRIDED_SLICE, SPLIT, SPLIT_V, PACK, UNPACK restrict them to be equal), and
//! ARG_MAX/ARG_MIN read int8 and give an unquantized index.

use super::rewrite::{Kind, Role, Spec};
use crate::ir::{Attr, Node, Op};

/// The int8 form of a data-movement op; `need_data(i)` checks that input `i`
/// is a float tensor.
pub(super) fn spec(
    n: &Node,
    op: &Op,
    inputs: usize,
    need_data: impl Fn(usize) -> Result<(), String>,
) -> Result<Spec, String> {
    use Role::*;
    let (kind, roles) = match op {
        Op::Transpose | Op::Tile => (Kind::Same, vec![Data, Aux]),
        Op::StridedSlice => (Kind::Same, vec![Data, Aux, Aux, Aux]),
        Op::Slice | Op::SplitV => (Kind::Same, vec![Data, Aux, Aux]),
        Op::Split => (Kind::Same, vec![Aux, Data]),
        Op::Pack => (Kind::Same, vec![Data; inputs]),
        // Zeros in the input's parameters (exported as SUB(x, x), exact in int8).
        Op::Unpack | Op::ZerosLike => (Kind::Same, vec![Data]),
        Op::ArgMax | Op::ArgMin => (Kind::Unquantized, vec![Data, Aux]),
        Op::Shape => (Kind::Unquantized, vec![Data]),
        // The value in its own parameters.
        Op::Fill => (Kind::Same, vec![Aux, Data]),
        // A bias add is an element-wise ADD (NHWC; the caller checks the layout).
        Op::BiasAdd { .. } => (Kind::Free, vec![Data, Data]),
        _ => return Err(format!("no int8 kernel for {}", n.op)),
    };
    for (i, r) in roles.iter().enumerate() {
        if *r == Data {
            need_data(i)?;
        }
    }
    Ok(Spec { kind, roles })
}

/// How many outputs `n` has (the parts of a split or unpack; 1 otherwise).
pub(super) fn outputs(n: &Node) -> usize {
    let attr = |k: &str| match n.attr(k) {
        Some(Attr::Int(v)) => usize::try_from(*v).unwrap_or(1).max(1),
        _ => 1,
    };
    match Op::parse(n) {
        Ok(Op::Split | Op::SplitV) => attr("num_split"),
        Ok(Op::Unpack) => attr("num"),
        _ => 1,
    }
}
