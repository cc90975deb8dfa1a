//! Element-wise kernels with NumPy broadcasting: unary math, binary arithmetic and
//! comparisons, `Select`, `Cast`.

use half::{bf16, f16};

use super::value::{Buf, Elem, Value};
use crate::error::{Error, Result};
use crate::ir::op::{Binary, Compare, Unary};
use crate::ir::{num_elements, DType, Node, Op};

/// The broadcast shape of two shapes (NumPy rules), or an error naming both.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let r = a.len().max(b.len());
    let mut out = vec![0; r];
    for i in 0..r {
        let da = if i + a.len() >= r {
            a[i + a.len() - r]
        } else {
            1
        };
        let db = if i + b.len() >= r {
            b[i + b.len() - r]
        } else {
            1
        };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return Err(Error::msg(format!(
                "shapes {a:?} and {b:?} cannot be broadcast together"
            )));
        };
    }
    super::value::checked_len(&out)?;
    Ok(out)
}

/// Strides of `shape` (row-major) aligned to `out` rank, 0 on broadcast dimensions.
fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let r = out.len();
    let mut strides = vec![0; r];
    let mut s = 1;
    for i in (0..shape.len()).rev() {
        let oi = i + r - shape.len();
        strides[oi] = if shape[i] == 1 && out[oi] != 1 { 0 } else { s };
        s *= shape[i];
    }
    strides
}

/// Visits every output position in row-major order with the matching flat offsets
/// into each broadcast operand.
fn for_each_offset<const N: usize>(
    out: &[usize],
    shapes: [&[usize]; N],
    mut f: impl FnMut([usize; N]),
) {
    let total = num_elements(out).unwrap_or(0);
    if total == 0 {
        return;
    }
    let r = out.len();
    let strides: Vec<Vec<usize>> = shapes.iter().map(|s| broadcast_strides(s, out)).collect();
    if r == 0 {
        f([0; N]);
        return;
    }
    let inner = out[r - 1];
    let inner_strides: [usize; N] = std::array::from_fn(|k| strides[k][r - 1]);
    let mut idx = vec![0usize; r - 1];
    let mut base = [0usize; N];
    loop {
        let mut off = base;
        for _ in 0..inner {
            f(off);
            for k in 0..N {
                off[k] += inner_strides[k];
            }
        }
        let mut d = r - 1;
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            idx[d] += 1;
            for k in 0..N {
                base[k] += strides[k][d];
            }
            if idx[d] < out[d] {
                break;
            }
            for k in 0..N {
                base[k] -= strides[k][d] * out[d];
            }
            idx[d] = 0;
        }
    }
}

/// Applies `f` element-wise with broadcasting.
pub fn broadcast_map<A: Copy, B: Copy, O>(
    a: &[A],
    ash: &[usize],
    b: &[B],
    bsh: &[usize],
    f: impl Fn(A, B) -> O,
) -> Result<(Vec<O>, Vec<usize>)> {
    let out = broadcast_shape(ash, bsh)?;
    if ash == bsh {
        return Ok((a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect(), out));
    }
    if b.len() == 1 && out.as_slice() == ash {
        let y = b[0];
        return Ok((a.iter().map(|&x| f(x, y)).collect(), out));
    }
    if a.len() == 1 && out.as_slice() == bsh {
        let x = a[0];
        return Ok((b.iter().map(|&y| f(x, y)).collect(), out));
    }
    let n = num_elements(&out).unwrap_or(0);
    let mut v = Vec::with_capacity(n);
    for_each_offset(&out, [ash, bsh], |[i, j]| v.push(f(a[i], b[j])));
    Ok((v, out))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnaryOp {
    Relu,
    Relu6,
    Elu,
    Selu,
    LeakyRelu(u32),
    Tanh,
    Sigmoid,
    Softplus,
    Rsqrt,
    Sqrt,
    Square,
    Exp,
    Log,
    Log1p,
    Neg,
    Abs,
    Floor,
    Ceil,
    Round,
    Sign,
    Reciprocal,
    Sin,
    Cos,
    LogicalNot,
    Erf,
}

impl UnaryOp {
    /// The kernel for a TensorFlow op name, if it is a unary element-wise op.
    pub fn from_tf(op: &str) -> Option<UnaryOp> {
        match Op::parse(&Node::new("", op)) {
            Ok(Op::Unary(u)) => Some(UnaryOp::from_ir(u)),
            _ => None,
        }
    }

    pub fn from_ir(u: Unary) -> UnaryOp {
        match u {
            Unary::Relu => UnaryOp::Relu,
            Unary::Relu6 => UnaryOp::Relu6,
            Unary::Elu => UnaryOp::Elu,
            Unary::Selu => UnaryOp::Selu,
            Unary::Tanh => UnaryOp::Tanh,
            Unary::Sigmoid => UnaryOp::Sigmoid,
            Unary::Softplus => UnaryOp::Softplus,
            Unary::Rsqrt => UnaryOp::Rsqrt,
            Unary::Sqrt => UnaryOp::Sqrt,
            Unary::Square => UnaryOp::Square,
            Unary::Exp => UnaryOp::Exp,
            Unary::Log => UnaryOp::Log,
            Unary::Log1p => UnaryOp::Log1p,
            Unary::Neg => UnaryOp::Neg,
            Unary::Abs => UnaryOp::Abs,
            Unary::Floor => UnaryOp::Floor,
            Unary::Ceil => UnaryOp::Ceil,
            Unary::Round | Unary::Rint => UnaryOp::Round,
            Unary::Sign => UnaryOp::Sign,
            Unary::Reciprocal | Unary::Inv => UnaryOp::Reciprocal,
            Unary::Sin => UnaryOp::Sin,
            Unary::Cos => UnaryOp::Cos,
            Unary::LogicalNot => UnaryOp::LogicalNot,
            Unary::Erf => UnaryOp::Erf,
        }
    }
}

macro_rules! float_unary {
    ($t:ty, $op:expr, $x:ident) => {{
        let op: UnaryOp = $op;
        let zero: $t = 0.0;
        let one: $t = 1.0;
        match op {
            UnaryOp::Relu => {
                if $x < zero {
                    zero
                } else {
                    $x
                }
            }
            UnaryOp::Relu6 => {
                if $x < zero {
                    zero
                } else if $x > 6.0 {
                    6.0
                } else {
                    $x
                }
            }
            UnaryOp::Elu => {
                if $x < zero {
                    $x.exp_m1()
                } else {
                    $x
                }
            }
            UnaryOp::Selu => {
                const SCALE: $t = 1.050_701;
                const ALPHA: $t = 1.673_263_2;
                if $x < zero {
                    SCALE * ALPHA * $x.exp_m1()
                } else {
                    SCALE * $x
                }
            }
            UnaryOp::LeakyRelu(bits) => {
                let alpha = f32::from_bits(bits) as $t;
                if $x < zero {
                    alpha * $x
                } else {
                    $x
                }
            }
            UnaryOp::Tanh => $x.tanh(),
            UnaryOp::Sigmoid => one / (one + (-$x).exp()),
            UnaryOp::Softplus => {
                if $x > 20.0 {
                    $x
                } else {
                    $x.exp().ln_1p()
                }
            }
            UnaryOp::Rsqrt => one / $x.sqrt(),
            UnaryOp::Sqrt => $x.sqrt(),
            UnaryOp::Square => $x * $x,
            UnaryOp::Exp => $x.exp(),
            UnaryOp::Log => $x.ln(),
            UnaryOp::Log1p => $x.ln_1p(),
            UnaryOp::Neg => -$x,
            UnaryOp::Abs => $x.abs(),
            UnaryOp::Floor => $x.floor(),
            UnaryOp::Ceil => $x.ceil(),
            UnaryOp::Round => $x.round_ties_even(),
            UnaryOp::Sign => {
                if $x > zero {
                    one
                } else if $x < zero {
                    -one
                } else {
                    $x
                }
            }
            UnaryOp::Reciprocal => one / $x,
            UnaryOp::Sin => $x.sin(),
            UnaryOp::Cos => $x.cos(),
            UnaryOp::Erf => super::math::erf(f64::from($x)) as $t,
            UnaryOp::LogicalNot => unreachable!("checked before dispatch"),
        }
    }};
}

macro_rules! int_unary {
    ($t:ty, $op:expr, $x:ident) => {{
        match $op {
            UnaryOp::Relu => Some($x.max(0)),
            UnaryOp::Relu6 => Some($x.clamp(0, 6)),
            UnaryOp::Neg => Some($x.wrapping_neg()),
            UnaryOp::Abs => Some($x.wrapping_abs()),
            UnaryOp::Square => Some($x.wrapping_mul($x)),
            UnaryOp::Sign => Some($x.signum()),
            _ => None,
        }
    }};
}

fn map_in_place<T: Elem + Copy>(v: Value, f: impl Fn(T) -> T) -> Result<Value> {
    let shape = v.shape.clone();
    let mut data = v.into_vec::<T>()?;
    for x in data.iter_mut() {
        *x = f(*x);
    }
    Ok(Value::from_vec(shape, data))
}

/// Applies a unary op; the input buffer is reused when this is its last reference.
pub fn unary(op: UnaryOp, x: Value) -> Result<Value> {
    match (op, x.dtype()) {
        (UnaryOp::LogicalNot, DType::Bool) => map_in_place::<bool>(x, |b| !b),
        (UnaryOp::LogicalNot, d) => Err(Error::msg(format!("LogicalNot needs bool, got {d}"))),
        (_, DType::F32) => {
            // One loop per op, so that each is compiled with its op known.
            macro_rules! each {
                ($($o:ident),*) => {
                    match op {
                        $(UnaryOp::$o => map_in_place::<f32>(x, |v| float_unary!(f32, UnaryOp::$o, v)),)*
                        _ => map_in_place::<f32>(x, |v| float_unary!(f32, op, v)),
                    }
                };
            }
            each!(Relu, Relu6, Tanh, Sigmoid, Rsqrt, Sqrt, Square, Exp, Neg, Abs, Floor)
        }
        (_, DType::F64) => map_in_place::<f64>(x, |v| float_unary!(f64, op, v)),
        (_, DType::F16) => map_in_place::<f16>(x, |v| {
            let v = v.to_f32();
            f16::from_f32(float_unary!(f32, op, v))
        }),
        (_, DType::BF16) => map_in_place::<bf16>(x, |v| {
            let v = v.to_f32();
            bf16::from_f32(float_unary!(f32, op, v))
        }),
        (_, d @ (DType::I32 | DType::I64)) => {
            let probe = 0i32;
            if int_unary!(i32, op, probe).is_none() {
                return Err(Error::msg(format!("{op:?} is not defined for {d}")));
            }
            if d == DType::I32 {
                map_in_place::<i32>(x, |v| int_unary!(i32, op, v).unwrap_or(v))
            } else {
                map_in_place::<i64>(x, |v| int_unary!(i64, op, v).unwrap_or(v))
            }
        }
        (_, d) => Err(Error::msg(format!("{op:?} is not defined for {d}"))),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    /// Float division; integer division truncating toward zero (TF `Div`, `TruncateDiv`).
    Div,
    FloorDiv,
    FloorMod,
    Maximum,
    Minimum,
    Pow,
    SquaredDifference,
    Greater,
    GreaterEqual,
    Less,
    LessEqual,
    Equal,
    NotEqual,
    LogicalAnd,
    LogicalOr,
}

impl BinaryOp {
    /// The kernel for a TensorFlow op name, if it is a binary element-wise op.
    pub fn from_tf(op: &str) -> Option<BinaryOp> {
        match Op::parse(&Node::new("", op)) {
            Ok(Op::Binary(b)) => Some(BinaryOp::from_ir(b)),
            Ok(Op::Compare(c)) => Some(BinaryOp::from_compare(c)),
            _ => None,
        }
    }

    pub fn from_ir(b: Binary) -> BinaryOp {
        match b {
            Binary::Add | Binary::AddV2 => BinaryOp::Add,
            Binary::Sub => BinaryOp::Sub,
            Binary::Mul => BinaryOp::Mul,
            Binary::RealDiv | Binary::Div | Binary::TruncateDiv => BinaryOp::Div,
            Binary::FloorDiv => BinaryOp::FloorDiv,
            Binary::FloorMod | Binary::Mod => BinaryOp::FloorMod,
            Binary::Maximum => BinaryOp::Maximum,
            Binary::Minimum => BinaryOp::Minimum,
            Binary::Pow => BinaryOp::Pow,
            Binary::SquaredDifference => BinaryOp::SquaredDifference,
        }
    }

    pub fn from_compare(c: Compare) -> BinaryOp {
        match c {
            Compare::Greater => BinaryOp::Greater,
            Compare::GreaterEqual => BinaryOp::GreaterEqual,
            Compare::Less => BinaryOp::Less,
            Compare::LessEqual => BinaryOp::LessEqual,
            Compare::Equal => BinaryOp::Equal,
            Compare::NotEqual => BinaryOp::NotEqual,
            Compare::LogicalAnd => BinaryOp::LogicalAnd,
            Compare::LogicalOr => BinaryOp::LogicalOr,
        }
    }

    fn is_comparison(self) -> bool {
        matches!(
            self,
            BinaryOp::Greater
                | BinaryOp::GreaterEqual
                | BinaryOp::Less
                | BinaryOp::LessEqual
                | BinaryOp::Equal
                | BinaryOp::NotEqual
        )
    }
}

fn compare<T: PartialOrd>(op: BinaryOp, a: T, b: T) -> bool {
    match op {
        BinaryOp::Greater => a > b,
        BinaryOp::GreaterEqual => a >= b,
        BinaryOp::Less => a < b,
        BinaryOp::LessEqual => a <= b,
        BinaryOp::Equal => a == b,
        _ => a != b,
    }
}

macro_rules! float_binary {
    ($t:ty, $op:expr, $a:ident, $b:ident) => {
        match $op {
            BinaryOp::Add => $a + $b,
            BinaryOp::Sub => $a - $b,
            BinaryOp::Mul => $a * $b,
            BinaryOp::Div => $a / $b,
            BinaryOp::FloorDiv => ($a / $b).floor(),
            BinaryOp::FloorMod => {
                let r = $a % $b;
                if r != 0.0 && ((r < 0.0) != ($b < 0.0)) {
                    r + $b
                } else {
                    r
                }
            }
            BinaryOp::Maximum => {
                if $a < $b {
                    $b
                } else {
                    $a
                }
            }
            BinaryOp::Minimum => {
                if $b < $a {
                    $b
                } else {
                    $a
                }
            }
            BinaryOp::Pow => $a.powf($b),
            BinaryOp::SquaredDifference => ($a - $b) * ($a - $b),
            _ => unreachable!("comparisons and logic are dispatched separately"),
        }
    };
}

macro_rules! int_binary {
    ($t:ty, $op:expr, $a:ident, $b:ident, $zero_div:expr) => {
        match $op {
            BinaryOp::Add => $a.wrapping_add($b),
            BinaryOp::Sub => $a.wrapping_sub($b),
            BinaryOp::Mul => $a.wrapping_mul($b),
            BinaryOp::Div => {
                if $b == 0 {
                    $zero_div = true;
                    0
                } else {
                    $a.wrapping_div($b)
                }
            }
            BinaryOp::FloorDiv => {
                if $b == 0 {
                    $zero_div = true;
                    0
                } else {
                    let q = $a.wrapping_div($b);
                    if ($a % $b != 0) && (($a < 0) != ($b < 0)) {
                        q - 1
                    } else {
                        q
                    }
                }
            }
            BinaryOp::FloorMod => {
                if $b == 0 {
                    $zero_div = true;
                    0
                } else {
                    let r = $a.wrapping_rem($b);
                    if r != 0 && ((r < 0) != ($b < 0)) {
                        r + $b
                    } else {
                        r
                    }
                }
            }
            BinaryOp::Maximum => $a.max($b),
            BinaryOp::Minimum => $a.min($b),
            BinaryOp::Pow => {
                if $b < 0 {
                    $zero_div = true;
                    0
                } else {
                    $a.wrapping_pow($b as u32)
                }
            }
            BinaryOp::SquaredDifference => $a.wrapping_sub($b).wrapping_mul($a.wrapping_sub($b)),
            _ => unreachable!("comparisons and logic are dispatched separately"),
        }
    };
}

fn same_dtype(op: BinaryOp, a: &Value, b: &Value) -> Result<DType> {
    if a.dtype() != b.dtype() {
        return Err(Error::msg(format!(
            "{op:?} of {} and {} tensors",
            a.dtype(),
            b.dtype()
        )));
    }
    Ok(a.dtype())
}

/// Whether `small` broadcasts against `big` only by repeating it whole: its shape,
/// without leading 1s, is a suffix of `big` (scalars, biases, per-channel vectors).
fn repeats_whole(small: &[usize], big: &[usize]) -> bool {
    let lead = small.iter().take_while(|&&d| d == 1).count();
    let core = &small[lead..];
    core.len() <= big.len() && big[big.len() - core.len()..] == *core
}

fn float_arith<T: Elem + Copy>(a: Value, b: Value, f: impl Fn(T, T) -> T) -> Result<Value> {
    let out_shape = broadcast_shape(&a.shape, &b.shape)?;
    // Output in the buffer of the full-size operand, which is reused when unshared.
    if out_shape == a.shape && !b.is_empty() && repeats_whole(&b.shape, &a.shape) {
        let bv = b.slice::<T>()?;
        let mut av = a.into_vec::<T>()?;
        for chunk in av.chunks_mut(bv.len()) {
            chunk.iter_mut().zip(bv).for_each(|(x, &y)| *x = f(*x, y));
        }
        return Ok(Value::from_vec(out_shape, av));
    }
    if out_shape == b.shape && !a.is_empty() && repeats_whole(&a.shape, &b.shape) {
        let av = a.slice::<T>()?;
        let mut bv = b.into_vec::<T>()?;
        for chunk in bv.chunks_mut(av.len()) {
            chunk.iter_mut().zip(av).for_each(|(y, &x)| *y = f(x, *y));
        }
        return Ok(Value::from_vec(out_shape, bv));
    }
    let (v, shape) = broadcast_map(a.slice::<T>()?, &a.shape, b.slice::<T>()?, &b.shape, f)?;
    Ok(Value::from_vec(shape, v))
}

fn int_arith<T: Elem + Copy>(
    op: BinaryOp,
    a: &Value,
    b: &Value,
    f: impl Fn(T, T, &mut bool) -> T,
) -> Result<Value> {
    let mut bad = false;
    let (v, shape) = {
        let badr = std::cell::Cell::new(false);
        let r = broadcast_map(
            a.slice::<T>()?,
            &a.shape,
            b.slice::<T>()?,
            &b.shape,
            |x, y| {
                let mut z = false;
                let out = f(x, y, &mut z);
                if z {
                    badr.set(true);
                }
                out
            },
        )?;
        bad |= badr.get();
        r
    };
    if bad {
        return Err(Error::msg(match op {
            BinaryOp::Pow => "integers cannot be raised to negative integer powers",
            _ => "integer division by zero",
        }));
    }
    Ok(Value::from_vec(shape, v))
}

fn cmp_values<T: Elem + Copy + PartialOrd>(op: BinaryOp, a: &Value, b: &Value) -> Result<Value> {
    let (v, shape) = broadcast_map(
        a.slice::<T>()?,
        &a.shape,
        b.slice::<T>()?,
        &b.shape,
        |x, y| compare(op, x, y),
    )?;
    Ok(Value::from_vec(shape, v))
}

/// Applies a binary op with broadcasting. Both operands must have the same dtype.
pub fn binary(op: BinaryOp, a: Value, b: Value) -> Result<Value> {
    let (a, b) = match super::fast_binary::try_binary(op, a, b) {
        Ok(done) => return done,
        Err(operands) => operands,
    };
    let dt = same_dtype(op, &a, &b)?;
    if matches!(op, BinaryOp::LogicalAnd | BinaryOp::LogicalOr) {
        if dt != DType::Bool {
            return Err(Error::msg(format!("{op:?} needs bool tensors, got {dt}")));
        }
        let and = op == BinaryOp::LogicalAnd;
        let (v, shape) = broadcast_map(
            a.slice::<bool>()?,
            &a.shape,
            b.slice::<bool>()?,
            &b.shape,
            |x, y| if and { x && y } else { x || y },
        )?;
        return Ok(Value::from_vec(shape, v));
    }
    if op.is_comparison() {
        return match dt {
            DType::F32 => cmp_values::<f32>(op, &a, &b),
            DType::F64 => cmp_values::<f64>(op, &a, &b),
            DType::F16 => cmp_values::<f16>(op, &a, &b),
            DType::I8 => cmp_values::<i8>(op, &a, &b),
            DType::I16 => cmp_values::<i16>(op, &a, &b),
            DType::I32 => cmp_values::<i32>(op, &a, &b),
            DType::I64 => cmp_values::<i64>(op, &a, &b),
            DType::U8 => cmp_values::<u8>(op, &a, &b),
            DType::U16 => cmp_values::<u16>(op, &a, &b),
            DType::U32 => cmp_values::<u32>(op, &a, &b),
            DType::U64 => cmp_values::<u64>(op, &a, &b),
            DType::Bool if matches!(op, BinaryOp::Equal | BinaryOp::NotEqual) => {
                cmp_values::<bool>(op, &a, &b)
            }
            d => Err(Error::msg(format!("{op:?} is not defined for {d}"))),
        };
    }
    match dt {
        DType::F32 => float_arith::<f32>(a, b, |x, y| float_binary!(f32, op, x, y)),
        DType::F64 => float_arith::<f64>(a, b, |x, y| float_binary!(f64, op, x, y)),
        DType::F16 => float_arith::<f16>(a, b, |x, y| {
            let (x, y) = (x.to_f32(), y.to_f32());
            f16::from_f32(float_binary!(f32, op, x, y))
        }),
        DType::I32 => int_arith::<i32>(op, &a, &b, |x, y, z| int_binary!(i32, op, x, y, *z)),
        DType::I64 => int_arith::<i64>(op, &a, &b, |x, y, z| int_binary!(i64, op, x, y, *z)),
        d => Err(Error::msg(format!("{op:?} is not defined for {d}"))),
    }
}

/// `BiasAdd`: adds a vector along the channel axis (last for NHWC, 1 for NCHW).
pub fn bias_add(x: Value, bias: Value, channels_first: bool) -> Result<Value> {
    if bias.rank() != 1 {
        return Err(Error::msg(format!(
            "bias must be a vector, got shape {:?}",
            bias.shape
        )));
    }
    let axis = if channels_first {
        1
    } else {
        x.rank().wrapping_sub(1)
    };
    if x.rank() < 2 || x.shape[axis] != bias.len() {
        return Err(Error::msg(format!(
            "bias of {} elements does not match input shape {:?}",
            bias.len(),
            x.shape
        )));
    }
    let mut bshape = vec![1; x.rank()];
    bshape[axis] = bias.len();
    let bias = bias.reshaped(bshape)?;
    binary(BinaryOp::Add, x, bias)
}

/// `Select` (v1: `cond` is a scalar, has `x`'s shape, or is a vector over its first dimension) and
/// `SelectV2` (all three broadcast).
pub fn select(cond: &Value, x: &Value, y: &Value, v2: bool) -> Result<Value> {
    if x.dtype() != y.dtype() {
        return Err(Error::msg(format!(
            "select between {} and {} tensors",
            x.dtype(),
            y.dtype()
        )));
    }
    let c = cond.slice::<bool>()?;
    let mut cshape = cond.shape.clone();
    if !v2 {
        if x.shape != y.shape {
            return Err(Error::msg(format!(
                "Select needs equal shapes, got {:?} and {:?}",
                x.shape, y.shape
            )));
        }
        if cond.shape != x.shape && cond.rank() > 0 {
            if cond.rank() == 1 && x.rank() >= 1 && cond.shape[0] == x.shape[0] {
                cshape.extend(std::iter::repeat_n(1, x.rank() - 1));
            } else {
                return Err(Error::msg(format!(
                    "Select condition shape {:?} does not match {:?}",
                    cond.shape, x.shape
                )));
            }
        }
    }
    let out = broadcast_shape(&broadcast_shape(&cshape, &x.shape)?, &y.shape)?;
    fn pick<T: Elem>(
        out: &[usize],
        c: &[bool],
        cs: &[usize],
        x: &Value,
        y: &Value,
    ) -> Result<Value> {
        let (xv, yv) = (x.slice::<T>()?, y.slice::<T>()?);
        let mut v = Vec::with_capacity(num_elements(out).unwrap_or(0));
        for_each_offset(out, [cs, &x.shape, &y.shape], |[i, j, k]| {
            v.push(if c[i] { xv[j].clone() } else { yv[k].clone() })
        });
        Ok(Value::from_vec(out.to_vec(), v))
    }
    super::value::dispatch_any!(x.dtype(), T => pick::<T>(&out, c, &cshape, x, y))
}

/// Converts every element to `to` as TensorFlow's `Cast` does: floats to integers
/// truncate toward zero (saturating), anything to bool is `!= 0`, bool is 0/1, and
/// narrowing float conversions round to nearest even.
pub fn cast(x: &Value, to: DType) -> Result<Value> {
    if x.dtype() == to {
        return Ok(x.clone());
    }
    enum Src<'a> {
        F(Vec<f64>),
        I(Vec<i64>),
        U(&'a [u64]),
    }
    let src = match &*x.buf {
        Buf::F32(_) | Buf::F64(_) | Buf::F16(_) | Buf::BF16(_) => Src::F(x.to_f64s()?),
        Buf::U64(v) => Src::U(v),
        Buf::Str(_) => return Err(Error::msg("cannot cast string tensors")),
        _ => Src::I(x.to_i64s().or_else(|_| {
            x.slice::<bool>()
                .map(|b| b.iter().map(|&v| v as i64).collect())
        })?),
    };
    macro_rules! conv {
        ($t:ty, $from_f:expr, $from_i:expr) => {{
            let v: Vec<$t> = match &src {
                Src::F(v) => v.iter().map(|&f| $from_f(f)).collect(),
                Src::I(v) => v.iter().map(|&i| $from_i(i)).collect(),
                Src::U(v) => v
                    .iter()
                    .map(|&u| $from_i(u.min(i64::MAX as u64) as i64))
                    .collect(),
            };
            Value::from_vec(x.shape.clone(), v)
        }};
    }
    Ok(match to {
        DType::F32 => match &*x.buf {
            Buf::F64(v) => Value::from_vec(x.shape.clone(), v.iter().map(|&f| f as f32).collect()),
            _ => conv!(f32, |f: f64| f as f32, |i: i64| i as f32),
        },
        DType::F64 => conv!(f64, |f: f64| f, |i: i64| i as f64),
        DType::F16 => match &*x.buf {
            Buf::F32(v) => Value::from_vec(
                x.shape.clone(),
                v.iter().map(|&f| f16::from_f32(f)).collect(),
            ),
            _ => conv!(f16, f16::from_f64, |i: i64| f16::from_f64(i as f64)),
        },
        DType::BF16 => match &*x.buf {
            Buf::F32(v) => Value::from_vec(
                x.shape.clone(),
                v.iter().map(|&f| bf16::from_f32(f)).collect(),
            ),
            _ => conv!(bf16, bf16::from_f64, |i: i64| bf16::from_f64(i as f64)),
        },
        DType::I8 => conv!(i8, |f: f64| f as i8, |i: i64| i as i8),
        DType::I16 => conv!(i16, |f: f64| f as i16, |i: i64| i as i16),
        DType::I32 => conv!(i32, |f: f64| f as i32, |i: i64| i as i32),
        DType::I64 => conv!(i64, |f: f64| f as i64, |i: i64| i),
        DType::U8 => conv!(u8, |f: f64| f as u8, |i: i64| i as u8),
        DType::U16 => conv!(u16, |f: f64| f as u16, |i: i64| i as u16),
        DType::U32 => conv!(u32, |f: f64| f as u32, |i: i64| i as u32),
        DType::U64 => match &src {
            Src::U(v) => Value::from_vec(x.shape.clone(), v.to_vec()),
            _ => conv!(u64, |f: f64| f as u64, |i: i64| i as u64),
        },
        DType::Bool => conv!(bool, |f: f64| f != 0.0, |i: i64| i != 0),
        d => return Err(Error::msg(format!("cannot cast to {d}"))),
    })
}
