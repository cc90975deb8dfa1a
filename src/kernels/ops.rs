//! Op dispatch: a node's op and attributes are resolved once into a [`Kernel`],
//! which then runs on input values with no further name lookups.

use super::array::{self, ReduceOp, SliceMasks};
use super::elementwise::{self, BinaryOp, UnaryOp};
use super::nn::{self, Padding, PoolKind, Window};
use super::value::{Buf, Value};
use crate::error::{Error, Result};
use crate::ir::op::{Conv, Forward, Layout, Linear, Padding as IrPadding, Random, Reduce};
use crate::ir::{Attr, DType, FusedActivation, Node, Op, QuantParams, Tensor, TensorData};

/// Quantization of a step's inputs and outputs, as the graph declares it
/// (`output_quant` of the producing nodes).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepQuant {
    pub inputs: Vec<Option<QuantParams>>,
    pub outputs: Vec<Option<QuantParams>>,
    /// Whose int8 arithmetic the step reproduces.
    pub arithmetic: Arithmetic,
}

/// Whose int8 arithmetic the kernels reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Arithmetic {
    /// LiteRT's reference kernels (`OpResolverType.BUILTIN_REF`).
    #[default]
    Reference,
    /// LiteRT's default resolver (`Interpreter()`): the XNNPACK delegate and the
    /// optimized builtin kernels, as LiteRT 2.3.0 runs them on x86-64.
    LiteRt,
}

impl Arithmetic {
    /// The name used in recipes and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Arithmetic::Reference => "litert-ref",
            Arithmetic::LiteRt => "litert",
        }
    }

    pub fn parse(s: &str) -> Option<Arithmetic> {
        match s {
            "litert-ref" => Some(Arithmetic::Reference),
            "litert" => Some(Arithmetic::LiteRt),
            _ => None,
        }
    }
}

/// Constants from this size on are candidates for [`Kernel::GatherTable`].
const TABLE_MIN_BYTES: usize = 1 << 20;

/// A node's computation with its attributes parsed.
#[derive(Debug, Clone)]
pub enum Kernel {
    Const(Value),
    /// A large constant, kept as the IR tensor until the plan knows its readers: a
    /// table only a gather reads becomes [`Kernel::GatherTable`], any other is
    /// converted into a [`Kernel::Const`].
    TableConst(Tensor),
    /// `Gather` from a constant table, reading the rows it needs straight from the
    /// tensor's bytes (inputs: indices, then the axis for GatherV2).
    GatherTable {
        table: Tensor,
        axis_input: bool,
    },
    /// Output 0 is input 0 (Identity, StopGradient, unfed PlaceholderWithDefault, ...).
    Forward,
    /// Output i is input i.
    ForwardAll,
    Unary(UnaryOp),
    Binary(BinaryOp),
    BiasAdd {
        channels_first: bool,
    },
    Conv2D(Window),
    Depthwise(Window),
    MatMul {
        ta: bool,
        tb: bool,
    },
    BatchMatMul {
        adj_a: bool,
        adj_b: bool,
    },
    Pool {
        kind: PoolKind,
        ksize: [usize; 2],
        win: Window,
    },
    BatchNorm {
        epsilon: f32,
        channels_first: bool,
    },
    Softmax {
        log: bool,
    },
    Reduce {
        op: ReduceOp,
        keep_dims: bool,
    },
    ArgReduce {
        max: bool,
        out: DType,
    },
    Gather {
        axis_input: bool,
    },
    ExpandDims,
    Squeeze(Vec<i64>),
    Reshape,
    Shape(DType),
    Size(DType),
    Rank,
    StridedSlice(SliceMasks),
    Slice,
    Pack(i64),
    Unpack(i64),
    /// `Split` (axis, value) or, with `v`, `SplitV` (value, sizes, axis).
    Split {
        num: usize,
        v: bool,
    },
    /// `ConcatV2` (axis last) or `Concat` (axis first).
    Concat {
        axis_first: bool,
    },
    Pad,
    PadV2,
    MirrorPad {
        reflect: bool,
    },
    Transpose,
    Tile,
    Fill,
    ZerosLike,
    OnesLike,
    Range,
    Cast(DType),
    Select {
        v2: bool,
    },
    RandomUniform {
        dtype: DType,
        seed: u64,
    },
    Dequantize,
    /// `_FusedConv2D` (`BiasAdd`, then an optional activation).
    FusedConv2D {
        win: Window,
        act: FusedActivation,
    },
    /// `_FusedDepthwiseConv2dNative`.
    FusedDepthwise {
        win: Window,
        act: FusedActivation,
    },
    /// `_FusedMatMul`.
    FusedMatMul {
        ta: bool,
        tb: bool,
        act: FusedActivation,
    },
    /// `Quantize` (TFLite QUANTIZE): to int8 (or int16) with the output's parameters.
    Quantize {
        to: DType,
    },
    /// GELU, PReLU, L2 normalization (`super::math`).
    Composite(super::math::Composite),
    /// `x * relu6(x + 3) / 6`.
    HardSwish,
    /// `Conv2DBackpropInput` (output shape, filter, input), with the bias (a fourth
    /// input) and activation `passes::fuse` folds into it.
    TransposeConv {
        win: Window,
        act: Option<FusedActivation>,
    },
    ResizeBilinear(crate::ir::op::Resize),
    ResizeNearest(crate::ir::op::Resize),
}

fn bool_attr(node: &Node, key: &str, default: bool) -> Result<bool> {
    match node.attr(key) {
        None => Ok(default),
        Some(_) => Ok(node.attr_bool(key)?),
    }
}

fn int_attr(node: &Node, key: &str, default: i64) -> Result<i64> {
    match node.attr(key) {
        None => Ok(default),
        Some(_) => Ok(node.attr_int(key)?),
    }
}

fn positive(v: [i64; 2], what: &str) -> Result<[usize; 2]> {
    match v {
        [h, w] if h > 0 && w > 0 => Ok([h as usize, w as usize]),
        _ => Err(Error::msg(format!("{what} must be positive, got {v:?}"))),
    }
}

fn nhwc(layout: Layout) -> Result<()> {
    match layout {
        Layout::Nhwc => Ok(()),
        Layout::Nchw => Err(Error::msg("data_format NCHW is not supported (only NHWC)")),
    }
}

fn padding(p: IrPadding) -> Result<Padding> {
    Ok(match p {
        IrPadding::Same => Padding::Same,
        IrPadding::Valid => Padding::Valid,
        IrPadding::Explicit(pads) => {
            let [(t, b), (l, r)] = pads;
            Padding::Explicit([(t as usize, b as usize), (l as usize, r as usize)])
        }
    })
}

fn window(c: &Conv) -> Result<Window> {
    nhwc(c.layout)?;
    Ok(Window {
        strides: positive(c.strides, "strides")?,
        dilations: positive(c.dilations, "dilations")?,
        padding: padding(c.padding)?,
    })
}

fn type_attr(node: &Node, key: &str, default: DType) -> Result<DType> {
    match node.attr(key) {
        None => Ok(default),
        Some(_) => Ok(node.attr_type(key)?),
    }
}

impl Kernel {
    /// Resolves a node into a kernel, checking its attributes and input count.
    /// An op the interpreter cannot run is an error naming it.
    pub fn compile(node: &Node) -> Result<Kernel> {
        let n_in = node.inputs.len();
        let arity = |lo: usize, hi: usize| -> Result<()> {
            if n_in < lo || n_in > hi {
                let want = if lo == hi {
                    lo.to_string()
                } else {
                    format!("{lo}..={hi}")
                };
                return Err(Error::msg(format!("expects {want} inputs, has {n_in}")));
            }
            Ok(())
        };
        let k = match Op::parse(node)? {
            Op::Unary(u) => {
                arity(1, 1)?;
                Kernel::Unary(UnaryOp::from_ir(u))
            }
            Op::HardSwish => {
                arity(1, 1)?;
                Kernel::HardSwish
            }
            Op::Conv2DBackpropInput(c) => {
                let act = crate::ir::op::transpose_conv_activation(node)?;
                let n = if act.is_some() { 4 } else { 3 };
                arity(n, n)?;
                Kernel::TransposeConv {
                    win: window(&c)?,
                    act,
                }
            }
            Op::ResizeBilinear(r) => {
                arity(2, 2)?;
                Kernel::ResizeBilinear(r)
            }
            Op::ResizeNearestNeighbor(r) => {
                arity(2, 2)?;
                Kernel::ResizeNearest(r)
            }
            Op::Binary(b) => {
                arity(2, 2)?;
                Kernel::Binary(BinaryOp::from_ir(b))
            }
            Op::Compare(c) => {
                arity(2, 2)?;
                Kernel::Binary(BinaryOp::from_compare(c))
            }
            Op::Const => {
                arity(0, 0)?;
                let t = node.attr_tensor("value")?;
                match t.data() {
                    TensorData::Bytes(b) if b.len() >= TABLE_MIN_BYTES => {
                        Kernel::TableConst(t.clone())
                    }
                    _ => Kernel::Const(Value::from_const_tensor(t)?),
                }
            }
            Op::Forward(
                Forward::Identity
                | Forward::StopGradient
                | Forward::Snapshot
                | Forward::PreventGradient
                | Forward::CheckNumerics
                | Forward::EnsureShape,
            )
            | Op::PlaceholderWithDefault => {
                arity(1, 1)?;
                Kernel::Forward
            }
            Op::Print => {
                arity(1, usize::MAX)?;
                Kernel::Forward
            }
            Op::IdentityN => Kernel::ForwardAll,
            Op::Gelu { approximate } => {
                arity(1, 1)?;
                Kernel::Composite(super::math::Composite::Gelu { approximate })
            }
            Op::Prelu => {
                arity(2, 2)?;
                Kernel::Composite(super::math::Composite::Prelu)
            }
            Op::L2Normalize => {
                arity(1, 1)?;
                Kernel::Composite(super::math::Composite::L2Normalize)
            }
            Op::LeakyRelu => {
                arity(1, 1)?;
                let alpha = match node.attr("alpha") {
                    None => 0.2,
                    Some(_) => node.attr_float("alpha")?,
                };
                Kernel::Unary(UnaryOp::LeakyRelu(alpha.to_bits()))
            }
            Op::BiasAdd { layout, .. } => {
                arity(2, 2)?;
                Kernel::BiasAdd {
                    channels_first: layout == Layout::Nchw,
                }
            }
            Op::Conv2D(c) => {
                arity(2, 2)?;
                Kernel::Conv2D(window(&c)?)
            }
            Op::DepthwiseConv2dNative(c) => {
                arity(2, 2)?;
                Kernel::Depthwise(window(&c)?)
            }
            Op::MatMul(m) => {
                arity(2, 2)?;
                Kernel::MatMul {
                    ta: m.transpose_a,
                    tb: m.transpose_b,
                }
            }
            Op::BatchMatMul { .. } => {
                arity(2, 2)?;
                Kernel::BatchMatMul {
                    adj_a: bool_attr(node, "adj_x", false)?,
                    adj_b: bool_attr(node, "adj_y", false)?,
                }
            }
            op @ (Op::MaxPool(p) | Op::AvgPool(p)) => {
                arity(1, 1)?;
                nhwc(p.layout)?;
                Kernel::Pool {
                    kind: if matches!(op, Op::MaxPool(_)) {
                        PoolKind::Max
                    } else {
                        PoolKind::Avg
                    },
                    ksize: positive(p.ksize, "ksize")?,
                    win: Window {
                        strides: positive(p.strides, "strides")?,
                        dilations: [1, 1],
                        padding: padding(p.padding)?,
                    },
                }
            }
            Op::FusedBatchNorm { layout, .. } => {
                arity(5, 5)?;
                if bool_attr(node, "is_training", true)? {
                    return Err(Error::msg(
                        "batch norm in training mode (is_training=true) computes batch statistics; \
                         only inference mode is supported",
                    ));
                }
                Kernel::BatchNorm {
                    epsilon: match node.attr("epsilon") {
                        None => 1e-4,
                        Some(_) => node.attr_float("epsilon")?,
                    },
                    channels_first: layout == Layout::Nchw,
                }
            }
            Op::Softmax => {
                arity(1, 1)?;
                Kernel::Softmax { log: false }
            }
            Op::LogSoftmax => {
                arity(1, 1)?;
                Kernel::Softmax { log: true }
            }
            Op::Reduce { kind, keep_dims } => {
                arity(2, 2)?;
                Kernel::Reduce {
                    op: match kind {
                        Reduce::Sum => ReduceOp::Sum,
                        Reduce::Mean => ReduceOp::Mean,
                        Reduce::Max => ReduceOp::Max,
                        Reduce::Min => ReduceOp::Min,
                        Reduce::Prod => ReduceOp::Prod,
                        Reduce::Any => ReduceOp::Any,
                        Reduce::All => ReduceOp::All,
                    },
                    keep_dims,
                }
            }
            op @ (Op::ArgMax | Op::ArgMin) => {
                arity(2, 2)?;
                Kernel::ArgReduce {
                    max: op == Op::ArgMax,
                    out: type_attr(node, "output_type", DType::I64)?,
                }
            }
            Op::GatherV2 => {
                arity(3, 3)?;
                if int_attr(node, "batch_dims", 0)? != 0 {
                    return Err(Error::msg("GatherV2 with batch_dims != 0 is not supported"));
                }
                Kernel::Gather { axis_input: true }
            }
            Op::Gather => {
                arity(2, 2)?;
                Kernel::Gather { axis_input: false }
            }
            Op::ExpandDims => {
                arity(2, 2)?;
                Kernel::ExpandDims
            }
            Op::Squeeze => {
                arity(1, 1)?;
                Kernel::Squeeze(match node.attr("squeeze_dims") {
                    None => vec![],
                    Some(_) => node.attr_ints("squeeze_dims")?.to_vec(),
                })
            }
            Op::Reshape => {
                arity(2, 2)?;
                Kernel::Reshape
            }
            Op::Shape => {
                arity(1, 1)?;
                Kernel::Shape(type_attr(node, "out_type", DType::I32)?)
            }
            Op::Size => {
                arity(1, 1)?;
                Kernel::Size(type_attr(node, "out_type", DType::I32)?)
            }
            Op::Rank => {
                arity(1, 1)?;
                Kernel::Rank
            }
            Op::StridedSlice => {
                arity(4, 4)?;
                Kernel::StridedSlice(SliceMasks {
                    begin: int_attr(node, "begin_mask", 0)?,
                    end: int_attr(node, "end_mask", 0)?,
                    ellipsis: int_attr(node, "ellipsis_mask", 0)?,
                    new_axis: int_attr(node, "new_axis_mask", 0)?,
                    shrink_axis: int_attr(node, "shrink_axis_mask", 0)?,
                })
            }
            Op::Slice => {
                arity(3, 3)?;
                Kernel::Slice
            }
            Op::Pack => {
                arity(1, usize::MAX)?;
                Kernel::Pack(int_attr(node, "axis", 0)?)
            }
            Op::Unpack => {
                arity(1, 1)?;
                Kernel::Unpack(int_attr(node, "axis", 0)?)
            }
            op @ (Op::Split | Op::SplitV) => {
                let v = op == Op::SplitV;
                arity(if v { 3 } else { 2 }, if v { 3 } else { 2 })?;
                let num = int_attr(node, "num_split", 0)?;
                Kernel::Split {
                    num: usize::try_from(num)
                        .ok()
                        .filter(|n| (1..=1 << 16).contains(n))
                        .ok_or_else(|| Error::msg(format!("num_split {num} is out of range")))?,
                    v,
                }
            }
            Op::ConcatV2 => {
                arity(2, usize::MAX)?;
                Kernel::Concat { axis_first: false }
            }
            Op::Concat => {
                arity(2, usize::MAX)?;
                Kernel::Concat { axis_first: true }
            }
            Op::Pad => {
                arity(2, 2)?;
                Kernel::Pad
            }
            Op::PadV2 => {
                arity(3, 3)?;
                Kernel::PadV2
            }
            Op::MirrorPad => {
                arity(2, 2)?;
                Kernel::MirrorPad {
                    reflect: match node.attr_str("mode")? {
                        "REFLECT" => true,
                        "SYMMETRIC" => false,
                        m => return Err(Error::msg(format!("unknown MirrorPad mode {m}"))),
                    },
                }
            }
            Op::Transpose => {
                arity(2, 2)?;
                Kernel::Transpose
            }
            Op::Tile => {
                arity(2, 2)?;
                Kernel::Tile
            }
            Op::Fill => {
                arity(2, 2)?;
                Kernel::Fill
            }
            Op::ZerosLike => {
                arity(1, 1)?;
                Kernel::ZerosLike
            }
            Op::OnesLike => {
                arity(1, 1)?;
                Kernel::OnesLike
            }
            Op::Range => {
                arity(3, 3)?;
                Kernel::Range
            }
            Op::Cast => {
                arity(1, 1)?;
                Kernel::Cast(node.attr_type("DstT")?)
            }
            Op::Select => {
                arity(3, 3)?;
                Kernel::Select { v2: false }
            }
            Op::SelectV2 => {
                arity(3, 3)?;
                Kernel::Select { v2: true }
            }
            Op::Random(Random::Uniform) => {
                arity(1, 1)?;
                let s1 = int_attr(node, "seed", 0)? as u64;
                let s2 = int_attr(node, "seed2", 0)? as u64;
                Kernel::RandomUniform {
                    dtype: type_attr(node, "dtype", DType::F32)?,
                    seed: s1.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ s2,
                }
            }
            Op::Dequantize => {
                arity(1, 1)?;
                if type_attr(node, "dtype", DType::F32)? != DType::F32 {
                    return Err(Error::msg("Dequantize must produce float32"));
                }
                Kernel::Dequantize
            }
            Op::Fused { linear, activation } => {
                arity(3, 3)?;
                match linear {
                    Linear::Conv2D(c) => Kernel::FusedConv2D {
                        win: window(&c)?,
                        act: activation,
                    },
                    Linear::Depthwise(c) => Kernel::FusedDepthwise {
                        win: window(&c)?,
                        act: activation,
                    },
                    Linear::MatMul(m) => Kernel::FusedMatMul {
                        ta: m.transpose_a,
                        tb: m.transpose_b,
                        act: activation,
                    },
                }
            }
            Op::Quantize => {
                arity(1, 1)?;
                Kernel::Quantize {
                    to: match node.attr("dtype") {
                        Some(Attr::Type(DType::I16)) => DType::I16,
                        _ => DType::I8,
                    },
                }
            }
            Op::Placeholder => {
                return Err(Error::msg("placeholder is needed but was not fed"));
            }
            Op::Random(Random::StandardNormal | Random::TruncatedNormal)
            | Op::NoOp
            | Op::Assert
            | Op::SaveV2
            | Op::SpaceToBatchND
            | Op::BatchToSpaceND
            | Op::Other(_) => {
                return Err(Error::msg(
                    "the interpreter has no kernel for this op".to_string(),
                ))
            }
        };
        Ok(k)
    }

    /// Runs the generic (float, or dtype-agnostic) kernel; [`super::exec_kernel`]
    /// tries the int8 one first. `inputs` are owned so that element-wise kernels can
    /// reuse a buffer nobody else holds.
    pub(crate) fn exec(&self, mut inputs: Vec<Value>, quant: &StepQuant) -> Result<Vec<Value>> {
        let one = |v: Value| Ok(vec![v]);
        let x = |i: usize| -> &Value { &inputs[i] };
        match self {
            Kernel::Const(v) => one(v.clone()),
            Kernel::TableConst(t) => one(Value::from_const_tensor(t)?),
            Kernel::GatherTable { table, axis_input } => {
                let axis = if *axis_input {
                    scalar(x(1), "GatherV2 axis")?
                } else {
                    0
                };
                one(array::gather_table(table, x(0), axis)?)
            }
            Kernel::Forward => {
                inputs.truncate(1);
                Ok(inputs)
            }
            Kernel::ForwardAll => Ok(inputs),
            Kernel::Composite(op) => one(super::math::composite(*op, &inputs)?),
            Kernel::Unary(op) => one(elementwise::unary(*op, inputs.swap_remove(0))?),
            Kernel::Binary(op) => {
                let b = inputs.pop().expect("arity checked");
                let a = inputs.pop().expect("arity checked");
                one(elementwise::binary(*op, a, b)?)
            }
            Kernel::BiasAdd { channels_first } => {
                let b = inputs.pop().expect("arity checked");
                let a = inputs.pop().expect("arity checked");
                one(elementwise::bias_add(a, b, *channels_first)?)
            }
            Kernel::Conv2D(w) => one(nn::conv2d(x(0), x(1), w)?),
            Kernel::Depthwise(w) => one(nn::depthwise_conv2d(x(0), x(1), w)?),
            Kernel::MatMul { ta, tb } => one(nn::matmul(x(0), x(1), *ta, *tb)?),
            Kernel::BatchMatMul { adj_a, adj_b } => {
                one(nn::batch_matmul(x(0), x(1), *adj_a, *adj_b)?)
            }
            Kernel::Pool { kind, ksize, win } => one(nn::pool(x(0), *kind, *ksize, win)?),
            Kernel::BatchNorm {
                epsilon,
                channels_first,
            } => {
                let y = nn::batch_norm_inference(
                    x(0),
                    x(1),
                    x(2),
                    x(3),
                    x(4),
                    *epsilon,
                    *channels_first,
                )?;
                let empty = Value::from_vec(vec![0], Vec::<f32>::new());
                Ok(vec![
                    y,
                    x(3).clone(),
                    x(4).clone(),
                    x(3).clone(),
                    x(4).clone(),
                    empty,
                ])
            }
            Kernel::Softmax { log } => one(nn::softmax(x(0), *log)?),
            Kernel::Reduce { op, keep_dims } => one(array::reduce(x(0), x(1), *op, *keep_dims)?),
            Kernel::ArgReduce { max, out } => one(array::arg_reduce(x(0), x(1), *max, *out)?),
            Kernel::Gather { axis_input } => {
                let axis = if *axis_input {
                    scalar(x(2), "GatherV2 axis")?
                } else {
                    0
                };
                one(array::gather(x(0), x(1), axis)?)
            }
            Kernel::ExpandDims => one(array::expand_dims(x(0), x(1))?),
            Kernel::Squeeze(dims) => one(array::squeeze(x(0), dims)?),
            Kernel::Reshape => one(array::reshape(x(0), x(1))?),
            Kernel::Shape(dt) => one(array::int_vector(&x(0).shape, *dt)?),
            Kernel::Size(dt) => one(array::int_vector(&[x(0).len()], *dt)?.reshaped(vec![])?),
            Kernel::Rank => one(Value::scalar(x(0).rank() as i32)),
            Kernel::StridedSlice(m) => one(array::strided_slice(x(0), x(1), x(2), x(3), *m)?),
            Kernel::Slice => one(array::slice(x(0), x(1), x(2))?),
            Kernel::Pack(axis) => one(array::pack(&inputs, *axis)?),
            Kernel::Unpack(axis) => array::unpack(x(0), *axis),
            Kernel::Split { num, v } => super::movement::split_op(&inputs, *num, *v),
            Kernel::Concat { axis_first } => {
                let (axis, parts) = if *axis_first {
                    (scalar(x(0), "Concat axis")?, &inputs[1..])
                } else {
                    let n = inputs.len();
                    (scalar(x(n - 1), "ConcatV2 axis")?, &inputs[..n - 1])
                };
                one(array::concat(parts, axis)?)
            }
            Kernel::Pad => one(array::pad(x(0), x(1), None, None)?),
            Kernel::PadV2 => one(array::pad(x(0), x(1), Some(x(2)), None)?),
            Kernel::MirrorPad { reflect } => one(array::pad(x(0), x(1), None, Some(*reflect))?),
            Kernel::Transpose => one(array::transpose(x(0), x(1))?),
            Kernel::Tile => one(array::tile(x(0), x(1))?),
            Kernel::Fill => one(array::fill(x(0), x(1))?),
            Kernel::ZerosLike | Kernel::OnesLike => {
                let v = if matches!(self, Kernel::OnesLike) {
                    1u8
                } else {
                    0
                };
                let s = elementwise::cast(&Value::scalar(v), x(0).dtype())?;
                let dims = array::int_vector(&x(0).shape, DType::I64)?;
                one(array::fill(&dims, &s)?)
            }
            Kernel::Range => one(array::range(x(0), x(1), x(2))?),
            Kernel::Cast(to) => one(elementwise::cast(x(0), *to)?),
            Kernel::Select { v2 } => one(elementwise::select(x(0), x(1), x(2), *v2)?),
            Kernel::RandomUniform { dtype, seed } => one(random_uniform(x(0), *dtype, *seed)?),
            Kernel::Dequantize => one(dequantize(
                x(0),
                quant.inputs.first().and_then(|q| q.as_ref()),
            )?),
            Kernel::FusedConv2D { win, act } => {
                one(super::fused::fused_conv_float(&inputs, win, *act)?)
            }
            Kernel::FusedDepthwise { win, act } => {
                one(super::fused::fused_depthwise_float(&inputs, win, *act)?)
            }
            Kernel::FusedMatMul { ta, tb, act } => {
                one(super::fused::fused_matmul_float(&inputs, *ta, *tb, *act)?)
            }
            Kernel::Quantize { .. } => Err(Error::msg("Quantize of a non-float, non-int8 tensor")),
            Kernel::HardSwish => one(super::activation::hard_swish(x(0))?),
            Kernel::TransposeConv { win, act } => {
                one(super::spatial::conv2d_transpose_fused(&inputs, win, *act)?)
            }
            Kernel::ResizeBilinear(r) => one(super::spatial::resize_bilinear(x(0), x(1), *r)?),
            Kernel::ResizeNearest(r) => one(super::spatial::resize_nearest(x(0), x(1), *r)?),
        }
    }
}

fn scalar(v: &Value, what: &str) -> Result<i64> {
    match v.to_i64s()?.as_slice() {
        [a] => Ok(*a),
        _ => Err(Error::msg(format!(
            "{what} must be a scalar, got shape {:?}",
            v.shape
        ))),
    }
}

/// Uniform values in [0, 1) from a SplitMix64 stream keyed by the op's seeds. The
/// values differ from TensorFlow's Philox stream; graphs whose outputs depend on
/// them (dropout in training mode) are not expected to match TensorFlow.
fn random_uniform(shape: &Value, dtype: DType, seed: u64) -> Result<Value> {
    let dims = shape.to_i64s()?;
    if dims.iter().any(|&d| d < 0) {
        return Err(Error::msg(format!("negative shape {dims:?}")));
    }
    let shape: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
    let n = crate::ir::num_elements(&shape)
        .filter(|&n| n <= 1 << 31)
        .ok_or_else(|| Error::msg(format!("shape {dims:?} is too large")))?;
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let v: Vec<f64> = (0..n)
        .map(|_| (next() >> 40) as f64 / (1u64 << 24) as f64)
        .collect();
    elementwise::cast(&Value::from_vec(shape, v), dtype)
}

/// Float16 → float32, or an affine-quantized integer tensor → float32 with the
/// quantization of its producer (`(q - zero_point) * scale`, per tensor or per axis).
pub fn dequantize(x: &Value, q: Option<&QuantParams>) -> Result<Value> {
    match &*x.buf {
        Buf::F16(v) => Ok(Value::from_vec(
            x.shape.clone(),
            super::float_rows::f16_to_f32(v),
        )),
        Buf::I8(_) | Buf::U8(_) | Buf::I16(_) | Buf::I32(_) => {
            let q = q.ok_or_else(|| {
                Error::msg(format!(
                    "Dequantize of a {} tensor without quantization parameters",
                    x.dtype()
                ))
            })?;
            let (channels, inner) = match q.axis {
                None => (1, x.len().max(1)),
                Some(a) => {
                    let a = a as usize;
                    if a >= x.rank() {
                        return Err(Error::msg(format!(
                            "quantization axis {a} is out of range for shape {:?}",
                            x.shape
                        )));
                    }
                    (
                        x.shape[a],
                        x.shape[a + 1..].iter().product::<usize>().max(1),
                    )
                }
            };
            if q.scale.len() != channels || q.zero_point.len() != channels {
                return Err(Error::msg(format!(
                    "{} scales / {} zero points for {channels} channels",
                    q.scale.len(),
                    q.zero_point.len()
                )));
            }
            // The same expression per element, without widening the input first or
            // dividing to find each element's channel.
            if let Buf::I8(xs) = &*x.buf {
                let mut out = Vec::with_capacity(xs.len());
                for (i, run) in xs.chunks(inner).enumerate() {
                    let (zp, s) = (q.zero_point[i % channels], q.scale[i % channels]);
                    super::float_rows::dequantize_i8_run(run, zp, s, &mut out);
                }
                return Ok(Value::from_vec(x.shape.clone(), out));
            }
            let vals = x.to_i64s()?;
            let out = vals
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    let c = (i / inner) % channels;
                    (v - q.zero_point[c]) as f32 * q.scale[c]
                })
                .collect();
            Ok(Value::from_vec(x.shape.clone(), out))
        }
        _ => Err(Error::msg(format!("Dequantize of a {} tensor", x.dtype()))),
    }
}

/// Reads a `Shape` attribute (`None` = unknown rank).
pub fn shape_attr(node: &Node, key: &str) -> Option<Vec<i64>> {
    match node.attr(key) {
        Some(Attr::Shape(s)) => s.clone(),
        _ => None,
    }
}

/// What the interpreter can compute of an op: `float` (a float or dtype-agnostic
/// kernel, what `validate`, calibration and constant folding run) and `int8` (a
/// kernel on int8 data, bit-exact with LiteRT's reference kernels, or one that only
/// moves int8 data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelSupport {
    pub float: bool,
    pub int8: bool,
}

/// [`KernelSupport`] of `op`, the answer [`Kernel::compile`] and [`super::int8::exec`]
/// give for it (one exhaustive match, kept beside theirs).
pub fn kernel_support(op: &Op) -> KernelSupport {
    use crate::ir::op::{Binary, Unary};
    let (float, int8) = match op {
        Op::Fused { .. }
        | Op::MaxPool(_)
        | Op::AvgPool(_)
        | Op::Softmax
        | Op::Pad
        | Op::PadV2
        | Op::ConcatV2
        | Op::Concat
        | Op::Quantize
        | Op::Reduce {
            kind: Reduce::Max | Reduce::Min | Reduce::Mean | Reduce::Sum,
            ..
        }
        | Op::Binary(Binary::Add | Binary::AddV2 | Binary::Sub | Binary::Mul)
        | Op::Binary(Binary::Maximum | Binary::Minimum)
        | Op::Unary(Unary::Relu | Unary::Relu6 | Unary::Sigmoid | Unary::Tanh) => (true, true),
        // kernels/int8/math.rs.
        Op::Unary(Unary::Exp | Unary::Log | Unary::Elu | Unary::Rsqrt | Unary::Abs)
        | Op::Binary(Binary::SquaredDifference)
        | Op::LeakyRelu
        | Op::BatchMatMul { .. }
        | Op::Gelu { .. }
        | Op::Prelu
        | Op::L2Normalize => (true, true),
        // Fed, or kernels that move or index data whatever its type.
        Op::Placeholder
        | Op::Const
        | Op::PlaceholderWithDefault
        | Op::Forward(_)
        | Op::IdentityN
        | Op::Print
        | Op::Gather
        | Op::GatherV2
        | Op::ExpandDims
        | Op::Squeeze
        | Op::Reshape
        | Op::Shape
        | Op::Size
        | Op::Rank
        | Op::StridedSlice
        | Op::Slice
        | Op::Transpose
        | Op::Tile
        | Op::Split
        | Op::SplitV
        | Op::Pack
        | Op::Unpack
        | Op::ZerosLike
        | Op::BiasAdd { .. }
        | Op::Dequantize
        | Op::ArgMax
        | Op::ArgMin
        | Op::HardSwish
        | Op::ResizeNearestNeighbor(_)
        | Op::ResizeBilinear(_)
        | Op::Conv2DBackpropInput(_) => (true, true),
        Op::Unary(_)
        | Op::Binary(_)
        | Op::Compare(_)
        | Op::Conv2D(_)
        | Op::DepthwiseConv2dNative(_)
        | Op::MatMul(_)
        | Op::FusedBatchNorm { .. }
        | Op::LogSoftmax
        | Op::Reduce { .. }
        | Op::MirrorPad
        | Op::Fill
        | Op::OnesLike
        | Op::Range
        | Op::Cast
        | Op::Select
        | Op::SelectV2
        | Op::Random(Random::Uniform) => (true, false),
        Op::Random(Random::StandardNormal | Random::TruncatedNormal)
        | Op::SpaceToBatchND
        | Op::BatchToSpaceND
        | Op::NoOp
        | Op::Assert
        | Op::SaveV2
        | Op::Other(_) => (false, false),
    };
    KernelSupport { float, int8 }
}
