//! The typed op: a node's TensorFlow op name and the attributes qpipe acts on,
//! parsed in this one place into a closed enum. Every layer above (shape rules,
//! kernels, TFLite lowering, quantization) matches on [`Op`] without a `_` arm, so
//! adding a variant makes the compiler list each place that must handle it.
//!
//! A node keeps its op name and raw attributes (`Node::op`, `Node::attrs`): they are
//! what a GraphDef round-trips and what the IR serializes, so artifact hashes and the
//! cache keys built on them do not depend on this parse.

use std::collections::HashMap;

use super::{Attr, DType, Graph, IrError, Node};

/// Activations TFLite fuses into the op that precedes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FusedActivation {
    None,
    Relu,
    Relu6,
    ReluN1To1,
}

/// Where channels sit in a 4-D activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Nhwc,
    Nchw,
}

/// TensorFlow's window padding; explicit pads are (before, after) for height, width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    Same,
    Valid,
    Explicit([(i64, i64); 2]),
}

impl Padding {
    /// `SAME` / `VALID` / `EXPLICIT`, as TensorFlow spells it.
    pub fn tf_name(self) -> &'static str {
        match self {
            Padding::Same => "SAME",
            Padding::Valid => "VALID",
            Padding::Explicit(_) => "EXPLICIT",
        }
    }
}

/// The window of a 2-D convolution (`Conv2D`, `DepthwiseConv2dNative`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv {
    pub padding: Padding,
    /// (height, width).
    pub strides: [i64; 2],
    /// (height, width).
    pub dilations: [i64; 2],
    pub layout: Layout,
}

/// How `ResizeBilinear` / `ResizeNearestNeighbor` map output to input coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resize {
    pub align_corners: bool,
    pub half_pixel_centers: bool,
}

/// The window of `MaxPool` / `AvgPool`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    pub padding: Padding,
    /// (height, width).
    pub ksize: [i64; 2],
    /// (height, width).
    pub strides: [i64; 2],
    pub layout: Layout,
}

/// `MatMul`'s transposes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatMul {
    pub transpose_a: bool,
    pub transpose_b: bool,
}

/// The matrix op under one of quantize_int8's fused nodes (`_FusedConv2D`,
/// `_FusedDepthwiseConv2dNative`, `_FusedMatMul`: inputs x, weights, bias).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Linear {
    Conv2D(Conv),
    Depthwise(Conv),
    MatMul(MatMul),
}

/// Which matrix op a [`Linear`] (or a kernel compiled from one) is, without its
/// parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinearKind {
    Conv2D,
    Depthwise,
    MatMul,
}

impl Linear {
    pub fn kind(&self) -> LinearKind {
        match self {
            Linear::Conv2D(_) => LinearKind::Conv2D,
            Linear::Depthwise(_) => LinearKind::Depthwise,
            Linear::MatMul(_) => LinearKind::MatMul,
        }
    }
}

impl LinearKind {
    /// The input a hybrid kernel reads its int8 weights from.
    pub const HYBRID_WEIGHTS: usize = 1;

    /// Whether a hybrid kernel exists for this op (float input and output, int8
    /// weights read directly, the input quantized at run time), as LiteRT has for
    /// CONV_2D and FULLY_CONNECTED but not DEPTHWISE_CONV_2D.
    pub fn has_hybrid_kernel(self) -> bool {
        match self {
            LinearKind::Conv2D | LinearKind::MatMul => true,
            LinearKind::Depthwise => false,
        }
    }

    /// Whether the op runs hybrid given the dtypes of its input (0) and weights
    /// ([`Self::HYBRID_WEIGHTS`]): the one rule kernels, the TFLite lowering and the
    /// weight quantizer share.
    pub fn is_hybrid(self, input: DType, weights: DType) -> bool {
        self.has_hybrid_kernel() && input == DType::F32 && weights == DType::I8
    }
}

/// Element-wise ops of one input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unary {
    Relu,
    Relu6,
    Elu,
    Selu,
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
    Rint,
    Sign,
    Reciprocal,
    Inv,
    Sin,
    Cos,
    LogicalNot,
    Erf,
}

/// Element-wise, broadcasting ops of two inputs with the dtype of the first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binary {
    Add,
    AddV2,
    Sub,
    Mul,
    RealDiv,
    Div,
    TruncateDiv,
    FloorDiv,
    FloorMod,
    Mod,
    Maximum,
    Minimum,
    Pow,
    SquaredDifference,
}

/// Element-wise, broadcasting ops of two inputs with a bool result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compare {
    Greater,
    GreaterEqual,
    Less,
    LessEqual,
    Equal,
    NotEqual,
    LogicalAnd,
    LogicalOr,
}

/// Reductions over constant axes (input 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduce {
    Sum,
    Mean,
    Max,
    Min,
    Prod,
    Any,
    All,
}

/// Ops that pass their input through unchanged at inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    Identity,
    StopGradient,
    Snapshot,
    CheckNumerics,
    PreventGradient,
    EnsureShape,
}

/// Random sources (training-time noise, dropout masks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Random {
    Uniform,
    StandardNormal,
    TruncatedNormal,
}

/// A node's op with the attributes qpipe acts on.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Placeholder,
    PlaceholderWithDefault,
    Const,
    Forward(Forward),
    IdentityN,
    Print,
    Unary(Unary),
    LeakyRelu,
    Binary(Binary),
    Compare(Compare),
    /// `BiasAdd` / `BiasAddV1` (the latter is always NHWC).
    BiasAdd {
        layout: Layout,
        v1: bool,
    },
    Conv2D(Conv),
    DepthwiseConv2dNative(Conv),
    MatMul(MatMul),
    /// `BatchMatMul`, `BatchMatMulV2`, `BatchMatMulV3`.
    BatchMatMul {
        version: u8,
    },
    MaxPool(Pool),
    AvgPool(Pool),
    /// `FusedBatchNorm`, `FusedBatchNormV2`, `FusedBatchNormV3`.
    FusedBatchNorm {
        version: u8,
        layout: Layout,
    },
    Softmax,
    LogSoftmax,
    Reduce {
        kind: Reduce,
        keep_dims: bool,
    },
    ArgMax,
    ArgMin,
    Gather,
    GatherV2,
    ExpandDims,
    Squeeze,
    Reshape,
    Shape,
    Size,
    Rank,
    StridedSlice,
    Slice,
    Pack,
    Unpack,
    /// `Split` (axis first, then the value) into `num_split` equal parts.
    Split,
    /// `SplitV` (value, sizes, axis).
    SplitV,
    ConcatV2,
    Concat,
    Pad,
    PadV2,
    MirrorPad,
    Transpose,
    Tile,
    Fill,
    ZerosLike,
    OnesLike,
    Range,
    Cast,
    Select,
    SelectV2,
    Random(Random),
    /// qpipe's float view of a quantized or fp16 tensor.
    Dequantize,
    /// qpipe's quantization of a float tensor to the node's `output_quant`.
    Quantize,
    /// quantize_int8's fused matrix op: x, weights, bias, then the activation.
    Fused {
        linear: Linear,
        activation: FusedActivation,
    },
    NoOp,
    Assert,
    SaveV2,
    /// GELU, fused from its tanh (`approximate`) or erf form by `passes::patterns`.
    Gelu {
        approximate: bool,
    },
    /// PReLU (x, alpha), fused from its TF1 and Keras forms by `passes::patterns`.
    Prelu,
    /// `tf.math.l2_normalize` over the last axis (x), fused by `passes::patterns`.
    L2Normalize,
    /// `SpaceToBatchND` / `BatchToSpaceND`: qpipe handles them only around a
    /// convolution (what `atrous_conv2d` makes), folded into a dilated one.
    SpaceToBatchND,
    BatchToSpaceND,
    /// `x * relu6(x + 3) / 6`, which strip_training fuses into one node (TFLite's
    /// HARD_SWISH; TensorFlow has no such op, so a GraphDef holding it loads only in qpipe).
    HardSwish,
    /// `Conv2DBackpropInput` outside a gradient: the forward op of `conv2d_transpose`
    /// (inputs: output shape, filter `[h, w, out, in]`, input).
    Conv2DBackpropInput(Conv),
    ResizeBilinear(Resize),
    ResizeNearestNeighbor(Resize),
    /// Any other op: qpipe passes it through (freeze, strip, GraphDef export) but
    /// cannot compute, shape or lower it.
    Other(String),
}

/// Every op name [`Op::parse`] recognizes, for tools that look for op names (the
/// layering test checks that no other layer spells one).
pub const NAMES: &[&str] = &[
    "Placeholder",
    "PlaceholderWithDefault",
    "Const",
    "Identity",
    "StopGradient",
    "Snapshot",
    "CheckNumerics",
    "PreventGradient",
    "EnsureShape",
    "IdentityN",
    "Print",
    "Relu",
    "Relu6",
    "Elu",
    "Selu",
    "Tanh",
    "Sigmoid",
    "Softplus",
    "Rsqrt",
    "Sqrt",
    "Square",
    "Exp",
    "Log",
    "Log1p",
    "Neg",
    "Abs",
    "Floor",
    "Ceil",
    "Round",
    "Rint",
    "Sign",
    "Reciprocal",
    "Inv",
    "Sin",
    "Cos",
    "LogicalNot",
    "Erf",
    "LeakyRelu",
    "Add",
    "AddV2",
    "Sub",
    "Mul",
    "RealDiv",
    "Div",
    "TruncateDiv",
    "FloorDiv",
    "FloorMod",
    "Mod",
    "Maximum",
    "Minimum",
    "Pow",
    "SquaredDifference",
    "Greater",
    "GreaterEqual",
    "Less",
    "LessEqual",
    "Equal",
    "NotEqual",
    "LogicalAnd",
    "LogicalOr",
    "BiasAdd",
    "BiasAddV1",
    "Conv2D",
    "DepthwiseConv2dNative",
    "MatMul",
    "BatchMatMul",
    "BatchMatMulV2",
    "BatchMatMulV3",
    "MaxPool",
    "AvgPool",
    "FusedBatchNorm",
    "FusedBatchNormV2",
    "FusedBatchNormV3",
    "Softmax",
    "LogSoftmax",
    "Sum",
    "Mean",
    "Max",
    "Min",
    "Prod",
    "Any",
    "All",
    "ArgMax",
    "ArgMin",
    "Gather",
    "GatherV2",
    "ExpandDims",
    "Squeeze",
    "Reshape",
    "Shape",
    "Size",
    "Rank",
    "StridedSlice",
    "Slice",
    "Pack",
    "Unpack",
    "Split",
    "SplitV",
    "ConcatV2",
    "Concat",
    "Pad",
    "PadV2",
    "MirrorPad",
    "Transpose",
    "Tile",
    "Fill",
    "ZerosLike",
    "OnesLike",
    "Range",
    "Cast",
    "Select",
    "SelectV2",
    "RandomUniform",
    "RandomStandardNormal",
    "TruncatedNormal",
    "Dequantize",
    "Quantize",
    "_FusedConv2D",
    "_FusedDepthwiseConv2dNative",
    "_FusedMatMul",
    GELU,
    PRELU,
    L2_NORMALIZE,
    "NoOp",
    "Assert",
    "SaveV2",
    "SpaceToBatchND",
    "BatchToSpaceND",
    "HardSwish",
    "Conv2DBackpropInput",
    "ResizeBilinear",
    "ResizeNearestNeighbor",
];

/// qpipe's own ops for the composites `passes::patterns` fuses (TensorFlow has no
/// single op for them).
pub const GELU: &str = "_QpipeGelu";
pub const PRELU: &str = "_QpipePrelu";
pub const L2_NORMALIZE: &str = "_QpipeL2Normalize";

/// Variable ops: what `freeze` replaces by constants and what must not reach an
/// inference graph.
pub const VARIABLE_OPS: [&str; 3] = ["VariableV2", "Variable", "VarHandleOp"];

pub fn is_variable_op(op: &str) -> bool {
    VARIABLE_OPS.contains(&op)
}

/// How many tensors one output argument of an op stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgLen {
    One,
    /// A list whose length is this int attribute (`Split`'s `num_split`).
    Number(&'static str),
    /// A list with one tensor per entry of this list(type) attribute.
    TypeList(&'static str),
}

/// One output argument of an op: its name and length.
pub type OutputArg = (&'static str, ArgLen);

/// The output arguments of a TensorFlow op, in order: what a function body's
/// `node:arg:index` input refers to (TensorFlow's op registry, for the ops qpipe reads
/// and those a SavedModel's bodies hold). `None` for an op not listed.
pub fn output_args(op: &str) -> Option<&'static [OutputArg]> {
    use ArgLen::*;
    const OUTPUT: &[OutputArg] = &[("output", One)];
    const Y: &[OutputArg] = &[("y", One)];
    const Z: &[OutputArg] = &[("z", One)];
    const ACTIVATIONS: &[OutputArg] = &[("activations", One)];
    const NONE: &[OutputArg] = &[];
    Some(match op {
        "Placeholder"
        | "PlaceholderWithDefault"
        | "Const"
        | "Identity"
        | "StopGradient"
        | "Snapshot"
        | "CheckNumerics"
        | "PreventGradient"
        | "EnsureShape"
        | "Print"
        | "BiasAdd"
        | "BiasAddV1"
        | "Conv2D"
        | "Conv3D"
        | "DepthwiseConv2dNative"
        | "Conv2DBackpropInput"
        | "MaxPool"
        | "MaxPoolV2"
        | "AvgPool"
        | "Sum"
        | "Mean"
        | "Max"
        | "Min"
        | "Prod"
        | "Any"
        | "All"
        | "ArgMax"
        | "ArgMin"
        | "Gather"
        | "GatherV2"
        | "GatherNd"
        | "ResourceGather"
        | "ResourceGatherNd"
        | "ExpandDims"
        | "Squeeze"
        | "Reshape"
        | "Shape"
        | "Size"
        | "Rank"
        | "StridedSlice"
        | "Slice"
        | "Pack"
        | "ConcatV2"
        | "Concat"
        | "Pad"
        | "PadV2"
        | "MirrorPad"
        | "Tile"
        | "Fill"
        | "Range"
        | "Select"
        | "SelectV2"
        | "RandomUniform"
        | "RandomStandardNormal"
        | "TruncatedNormal"
        | "Dequantize"
        | "Quantize"
        | "BatchMatMul"
        | "BatchMatMulV2"
        | "BatchMatMulV3"
        | "_FusedConv2D"
        | "_FusedDepthwiseConv2dNative"
        | "_FusedMatMul"
        | "Einsum"
        | "SpaceToBatchND"
        | "BatchToSpaceND"
        | "DepthToSpace"
        | "SpaceToDepth"
        | "OneHot"
        | "BroadcastTo"
        | "ClipByValue"
        | "L2Loss"
        | "Cumsum"
        | "Cumprod"
        | "ReverseV2"
        | "ScatterNd"
        | "StaticRegexFullMatch"
        | "StringJoin"
        | "ResizeBilinear"
        | "ResizeNearestNeighbor"
        | "StatelessRandomUniformV2"
        | "StatelessRandomNormalV2"
        | "MatrixDiag"
        | "MatrixDiagV3" => OUTPUT,
        "Tanh" | "Sigmoid" | "Rsqrt" | "Sqrt" | "Square" | "Exp" | "Log" | "Log1p" | "Neg"
        | "Abs" | "Floor" | "Ceil" | "Round" | "Rint" | "Sign" | "Reciprocal" | "Inv" | "Sin"
        | "Cos" | "LogicalNot" | "Erf" | "Transpose" | "ZerosLike" | "OnesLike" | "Cast"
        | "Expm1" | "IsNan" | "IsInf" | "IsFinite" => Y,
        "Add" | "AddV2" | "Sub" | "Mul" | "RealDiv" | "Div" | "DivNoNan" | "TruncateDiv"
        | "FloorDiv" | "FloorMod" | "Mod" | "Maximum" | "Minimum" | "Pow" | "SquaredDifference"
        | "Greater" | "GreaterEqual" | "Less" | "LessEqual" | "Equal" | "NotEqual"
        | "LogicalAnd" | "LogicalOr" | "MulNoNan" | "Atan2" => Z,
        "Relu" | "Relu6" | "Elu" | "Selu" | "LeakyRelu" | "Softplus" | "Softsign" => ACTIVATIONS,
        "MatMul" => &[("product", One)],
        "Softmax" => &[("softmax", One)],
        "LogSoftmax" => &[("logsoftmax", One)],
        "AddN" => &[("sum", One)],
        "ReadVariableOp" => &[("value", One)],
        "VarHandleOp" => &[("resource", One)],
        "ShardedFilename" => &[("filename", One)],
        "Where" => &[("index", One)],
        "BroadcastArgs" => &[("r0", One)],
        "IdentityN" => &[("output", TypeList("T"))],
        "Split" | "SplitV" => &[("output", Number("num_split"))],
        "Unpack" => &[("output", Number("num"))],
        "ShapeN" => &[("output", Number("N"))],
        "TopKV2" => &[("values", One), ("indices", One)],
        "Unique" => &[("y", One), ("idx", One)],
        "FusedBatchNorm" | "FusedBatchNormV2" => &[
            ("y", One),
            ("batch_mean", One),
            ("batch_variance", One),
            ("reserve_space_1", One),
            ("reserve_space_2", One),
        ],
        "FusedBatchNormV3" => &[
            ("y", One),
            ("batch_mean", One),
            ("batch_variance", One),
            ("reserve_space_1", One),
            ("reserve_space_2", One),
            ("reserve_space_3", One),
        ],
        "RestoreV2" => &[("tensors", TypeList("dtypes"))],
        "StatefulPartitionedCall" | "PartitionedCall" | "If" | "StatelessIf" => {
            &[("output", TypeList("Tout"))]
        }
        "While" | "StatelessWhile" => &[("output", TypeList("T"))],
        "NoOp" | "Assert" | "SaveV2" | "MergeV2Checkpoints" | "AssignVariableOp"
        | "DisableCopyOnRead" => NONE,
        _ => return None,
    })
}

/// Ops that exist only for training, checkpointing or debugging and must not survive
/// into an inference graph (or that qpipe cannot handle yet), with why; `None` for
/// every other op. `name` is the node's: a backprop-input op under `gradients/` is a
/// gradient, elsewhere it is the forward op of a transposed convolution.
pub fn training_only(name: &str, op: &str) -> Option<&'static str> {
    let in_gradients = name.starts_with("gradients/") || name.contains("/gradients/");
    Some(match op {
        "RandomUniform" | "RandomUniformInt" | "RandomStandardNormal" | "TruncatedNormal"
        | "Multinomial" | "RandomShuffle" | "RandomGamma" | "RandomPoisson" | "RandomPoissonV2" => {
            "a random op is still on the path to the outputs (dropout that is not disabled, or noise)"
        }
        "Assert" | "Print" | "PrintV2" | "NoOp" | "CheckNumerics" => "a debugging op is still on the path",
        "Placeholder" | "PlaceholderWithDefault" => "a placeholder that is not a declared input is needed",
        "ReadVariableOp" | "ResourceGather" | "VarIsInitializedOp" => {
            "a variable is still in the graph; freeze the model first"
        }
        _ if is_variable_op(op) => "a variable is still in the graph; freeze the model first",
        "SaveV2" | "RestoreV2" | "MergeV2Checkpoints" => "a checkpoint op is on the path",
        "Switch" | "Merge" | "Enter" | "Exit" | "NextIteration" | "LoopCond" => {
            "control flow that does not fold away is on the path"
        }
        _ if is_batch_norm_family(op) => "a batch norm could not be folded",
        _ if op.starts_with("Apply") || op.starts_with("ResourceApply") || op.starts_with("Assign") => {
            "an optimizer or assignment op is on the path"
        }
        _ if op.ends_with("Summary") || op.ends_with("SummaryV2") => "a summary op is on the path",
        // The backprop-input op is also the forward op of transposed convolutions.
        "Conv2DBackpropInput" if !in_gradients => return None,
        _ if op.contains("BackpropInput") && !in_gradients => {
            "this transposed convolution (3-D or depthwise) is not supported yet"
        }
        _ if op.ends_with("Grad") || op.contains("Backprop") => "a gradient op is on the path",
        _ => return None,
    })
}

/// Ops that must never be evaluated at strip time (random, stateful, or inputs).
pub fn never_fold(op: &str) -> bool {
    matches!(
        op,
        "Placeholder"
            | "PlaceholderWithDefault"
            | "RandomUniform"
            | "RandomUniformInt"
            | "RandomStandardNormal"
            | "TruncatedNormal"
            | "Multinomial"
            | "RandomShuffle"
            | "RandomGamma"
            | "RandomPoisson"
            | "RandomPoissonV2"
            | "StatelessRandomUniform"
            | "Assert"
            | "Print"
            | "PrintV2"
    ) || op.starts_with("Variable")
        || op.starts_with("Var")
        || op.starts_with("Assign")
        || op.starts_with("Read")
        || op.starts_with("Resource")
        || op.starts_with("Stateful")
}

/// `FusedBatchNorm*`, gradients included.
pub fn is_batch_norm_family(op: &str) -> bool {
    op.starts_with("FusedBatchNorm")
}

/// Ops that pass input 0 (or, for `IdentityN`, input i) through unchanged.
pub fn passthrough(op: &str) -> bool {
    matches!(
        op,
        "Identity"
            | "IdentityN"
            | "StopGradient"
            | "Snapshot"
            | "PreventGradient"
            | "CheckNumerics"
            | "EnsureShape"
            | "Print"
            | "PlaceholderWithDefault"
            | "DebugIdentity"
    )
}

fn bad(node: &Node, msg: impl std::fmt::Display) -> IrError {
    IrError::new(format!("node '{}' ({}): {msg}", node.name, node.op))
}

fn bool_attr(node: &Node, key: &str) -> Result<bool, IrError> {
    match node.attr(key) {
        None => Ok(false),
        Some(_) => node.attr_bool(key),
    }
}

fn layout(node: &Node) -> Result<Layout, IrError> {
    match node.attr("data_format") {
        None => Ok(Layout::Nhwc),
        Some(_) => match node.attr_str("data_format")? {
            "NHWC" => Ok(Layout::Nhwc),
            "NCHW" => Ok(Layout::Nchw),
            other => Err(bad(node, format!("data_format {other} is not supported"))),
        },
    }
}

/// A 4-element window attribute as (height, width) for `layout`; `default` when absent.
fn spatial(
    node: &Node,
    key: &str,
    layout: Layout,
    default: Option<[i64; 2]>,
) -> Result<[i64; 2], IrError> {
    let v = match (node.attr(key), default) {
        (None, Some(d)) => return Ok(d),
        _ => node.attr_ints(key)?,
    };
    match (layout, v) {
        (Layout::Nhwc, [1, h, w, 1]) | (Layout::Nchw, [1, 1, h, w]) => Ok([*h, *w]),
        (Layout::Nhwc, _) => Err(bad(node, format!("{key} {v:?} must be [1, h, w, 1]"))),
        (Layout::Nchw, _) => Err(bad(node, format!("{key} {v:?} must be [1, 1, h, w]"))),
    }
}

fn padding(node: &Node, layout: Layout) -> Result<Padding, IrError> {
    match node.attr_str("padding")? {
        "SAME" => Ok(Padding::Same),
        "VALID" => Ok(Padding::Valid),
        "EXPLICIT" => {
            let p = node.attr_ints("explicit_paddings")?;
            let (h, w) = match layout {
                Layout::Nhwc => (2, 4),
                Layout::Nchw => (4, 6),
            };
            let zero_elsewhere = (0..8)
                .filter(|&i| i != h && i != h + 1 && i != w && i != w + 1)
                .all(|i| p.get(i) == Some(&0));
            if p.len() != 8 || p.iter().any(|&v| v < 0) || !zero_elsewhere {
                return Err(bad(node, format!("bad explicit_paddings {p:?}")));
            }
            Ok(Padding::Explicit([(p[h], p[h + 1]), (p[w], p[w + 1])]))
        }
        other => Err(bad(node, format!("padding '{other}' is not supported"))),
    }
}

fn conv(node: &Node) -> Result<Conv, IrError> {
    let layout = layout(node)?;
    Ok(Conv {
        padding: padding(node, layout)?,
        strides: spatial(node, "strides", layout, None)?,
        dilations: spatial(node, "dilations", layout, Some([1, 1]))?,
        layout,
    })
}

fn pool(node: &Node) -> Result<Pool, IrError> {
    let layout = layout(node)?;
    Ok(Pool {
        padding: padding(node, layout)?,
        ksize: spatial(node, "ksize", layout, None)?,
        strides: spatial(node, "strides", layout, None)?,
        layout,
    })
}

fn resize(node: &Node) -> Result<Resize, IrError> {
    let r = Resize {
        align_corners: bool_attr(node, "align_corners")?,
        half_pixel_centers: bool_attr(node, "half_pixel_centers")?,
    };
    if r.align_corners && r.half_pixel_centers {
        return Err(bad(
            node,
            "align_corners and half_pixel_centers are both set",
        ));
    }
    Ok(r)
}

fn matmul(node: &Node) -> Result<MatMul, IrError> {
    Ok(MatMul {
        transpose_a: bool_attr(node, "transpose_a")?,
        transpose_b: bool_attr(node, "transpose_b")?,
    })
}

/// The activation a fused node applies (`fused_ops` after `BiasAdd`).
fn fused_activation(node: &Node) -> Result<FusedActivation, IrError> {
    let ops: Vec<&[u8]> = match node.attr("fused_ops") {
        Some(Attr::Strs(v)) => v.iter().map(Vec::as_slice).collect(),
        Some(_) => return Err(bad(node, "attribute 'fused_ops' is not a list of strings")),
        None => return Err(bad(node, "attribute 'fused_ops' is missing")),
    };
    match ops.as_slice() {
        [b"BiasAdd"] => Ok(FusedActivation::None),
        [b"BiasAdd", b"Relu"] => Ok(FusedActivation::Relu),
        [b"BiasAdd", b"Relu6"] => Ok(FusedActivation::Relu6),
        other => {
            let names: Vec<String> = other
                .iter()
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect();
            Err(bad(
                node,
                format!(
                    "fused_ops {names:?} is not supported (BiasAdd, then optionally Relu or Relu6)"
                ),
            ))
        }
    }
}

/// The bias add and activation `passes::fuse` folded into a `Conv2DBackpropInput`
/// (a fourth input, the bias, and `fused_ops`); `None` when it has none.
pub fn transpose_conv_activation(node: &Node) -> Result<Option<FusedActivation>, IrError> {
    match node.attr("fused_ops") {
        None => Ok(None),
        Some(_) => fused_activation(node).map(Some),
    }
}

impl Op {
    /// The matrix op of an op that may run hybrid: only quantize_int8's fused ops
    /// read int8 weights directly (the others read them through a `Dequantize`).
    pub fn hybrid_candidate(&self) -> Option<LinearKind> {
        match self {
            Op::Fused { linear, .. } => Some(linear.kind()).filter(|k| k.has_hybrid_kernel()),
            // Plain Conv2D and MatMul read their quantized weights through a `Dequantize`.
            Op::Placeholder
            | Op::PlaceholderWithDefault
            | Op::Const
            | Op::Forward(_)
            | Op::IdentityN
            | Op::Print
            | Op::Unary(_)
            | Op::LeakyRelu
            | Op::Binary(_)
            | Op::Compare(_)
            | Op::BiasAdd { .. }
            | Op::Conv2D(_)
            | Op::DepthwiseConv2dNative(_)
            | Op::MatMul(_)
            | Op::BatchMatMul { .. }
            | Op::MaxPool(_)
            | Op::AvgPool(_)
            | Op::FusedBatchNorm { .. }
            | Op::Softmax
            | Op::LogSoftmax
            | Op::Reduce { .. }
            | Op::ArgMax
            | Op::ArgMin
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
            | Op::Pack
            | Op::Unpack
            | Op::Split
            | Op::SplitV
            | Op::ConcatV2
            | Op::Concat
            | Op::Pad
            | Op::PadV2
            | Op::MirrorPad
            | Op::Transpose
            | Op::Tile
            | Op::Fill
            | Op::ZerosLike
            | Op::OnesLike
            | Op::Range
            | Op::Cast
            | Op::Select
            | Op::SelectV2
            | Op::Random(_)
            | Op::Dequantize
            | Op::Quantize
            | Op::Gelu { .. }
            | Op::Prelu
            | Op::L2Normalize
            | Op::NoOp
            | Op::Assert
            | Op::SaveV2
            | Op::SpaceToBatchND
            | Op::HardSwish
            | Op::Conv2DBackpropInput(_)
            | Op::ResizeBilinear(_)
            | Op::ResizeNearestNeighbor(_)
            | Op::BatchToSpaceND
            | Op::Other(_) => None,
        }
    }

    /// The typed op of `node`; an attribute qpipe needs that is missing or malformed
    /// is an error naming the node.
    pub fn parse(node: &Node) -> Result<Op, IrError> {
        use Op as O;
        let op = node.op.as_str();
        Ok(match op {
            "Placeholder" => O::Placeholder,
            "PlaceholderWithDefault" => O::PlaceholderWithDefault,
            "Const" => O::Const,
            "Identity" => O::Forward(Forward::Identity),
            "StopGradient" => O::Forward(Forward::StopGradient),
            "Snapshot" => O::Forward(Forward::Snapshot),
            "CheckNumerics" => O::Forward(Forward::CheckNumerics),
            "PreventGradient" => O::Forward(Forward::PreventGradient),
            "EnsureShape" => O::Forward(Forward::EnsureShape),
            "IdentityN" => O::IdentityN,
            "Print" => O::Print,
            "Relu" => O::Unary(Unary::Relu),
            "Relu6" => O::Unary(Unary::Relu6),
            "Elu" => O::Unary(Unary::Elu),
            "Selu" => O::Unary(Unary::Selu),
            "Tanh" => O::Unary(Unary::Tanh),
            "Sigmoid" => O::Unary(Unary::Sigmoid),
            "Softplus" => O::Unary(Unary::Softplus),
            "Rsqrt" => O::Unary(Unary::Rsqrt),
            "Sqrt" => O::Unary(Unary::Sqrt),
            "Square" => O::Unary(Unary::Square),
            "Exp" => O::Unary(Unary::Exp),
            "Log" => O::Unary(Unary::Log),
            "Log1p" => O::Unary(Unary::Log1p),
            "Neg" => O::Unary(Unary::Neg),
            "Abs" => O::Unary(Unary::Abs),
            "Floor" => O::Unary(Unary::Floor),
            "Ceil" => O::Unary(Unary::Ceil),
            "Round" => O::Unary(Unary::Round),
            "Rint" => O::Unary(Unary::Rint),
            "Sign" => O::Unary(Unary::Sign),
            "Reciprocal" => O::Unary(Unary::Reciprocal),
            "Inv" => O::Unary(Unary::Inv),
            "Sin" => O::Unary(Unary::Sin),
            "Cos" => O::Unary(Unary::Cos),
            "LogicalNot" => O::Unary(Unary::LogicalNot),
            "Erf" => O::Unary(Unary::Erf),
            "LeakyRelu" => O::LeakyRelu,
            "Add" => O::Binary(Binary::Add),
            "AddV2" => O::Binary(Binary::AddV2),
            "Sub" => O::Binary(Binary::Sub),
            "Mul" => O::Binary(Binary::Mul),
            "RealDiv" => O::Binary(Binary::RealDiv),
            "Div" => O::Binary(Binary::Div),
            "TruncateDiv" => O::Binary(Binary::TruncateDiv),
            "FloorDiv" => O::Binary(Binary::FloorDiv),
            "FloorMod" => O::Binary(Binary::FloorMod),
            "Mod" => O::Binary(Binary::Mod),
            "Maximum" => O::Binary(Binary::Maximum),
            "Minimum" => O::Binary(Binary::Minimum),
            "Pow" => O::Binary(Binary::Pow),
            "SquaredDifference" => O::Binary(Binary::SquaredDifference),
            "Greater" => O::Compare(Compare::Greater),
            "GreaterEqual" => O::Compare(Compare::GreaterEqual),
            "Less" => O::Compare(Compare::Less),
            "LessEqual" => O::Compare(Compare::LessEqual),
            "Equal" => O::Compare(Compare::Equal),
            "NotEqual" => O::Compare(Compare::NotEqual),
            "LogicalAnd" => O::Compare(Compare::LogicalAnd),
            "LogicalOr" => O::Compare(Compare::LogicalOr),
            "BiasAdd" => O::BiasAdd {
                layout: layout(node)?,
                v1: false,
            },
            "BiasAddV1" => O::BiasAdd {
                layout: Layout::Nhwc,
                v1: true,
            },
            "Conv2D" => O::Conv2D(conv(node)?),
            "DepthwiseConv2dNative" => O::DepthwiseConv2dNative(conv(node)?),
            "MatMul" => O::MatMul(matmul(node)?),
            "BatchMatMul" => O::BatchMatMul { version: 1 },
            "BatchMatMulV2" => O::BatchMatMul { version: 2 },
            "BatchMatMulV3" => O::BatchMatMul { version: 3 },
            "MaxPool" => O::MaxPool(pool(node)?),
            "AvgPool" => O::AvgPool(pool(node)?),
            "FusedBatchNorm" | "FusedBatchNormV2" | "FusedBatchNormV3" => O::FusedBatchNorm {
                version: match op {
                    "FusedBatchNorm" => 1,
                    "FusedBatchNormV2" => 2,
                    _ => 3,
                },
                layout: layout(node)?,
            },
            "Softmax" => O::Softmax,
            "LogSoftmax" => O::LogSoftmax,
            "Sum" | "Mean" | "Max" | "Min" | "Prod" | "Any" | "All" => O::Reduce {
                kind: match op {
                    "Sum" => Reduce::Sum,
                    "Mean" => Reduce::Mean,
                    "Max" => Reduce::Max,
                    "Min" => Reduce::Min,
                    "Prod" => Reduce::Prod,
                    "Any" => Reduce::Any,
                    _ => Reduce::All,
                },
                keep_dims: bool_attr(node, "keep_dims")?,
            },
            "ArgMax" => O::ArgMax,
            "ArgMin" => O::ArgMin,
            "Gather" => O::Gather,
            "GatherV2" => O::GatherV2,
            "ExpandDims" => O::ExpandDims,
            "Squeeze" => O::Squeeze,
            "Reshape" => O::Reshape,
            "Shape" => O::Shape,
            "Size" => O::Size,
            "Rank" => O::Rank,
            "StridedSlice" => O::StridedSlice,
            "Slice" => O::Slice,
            "Pack" => O::Pack,
            "Unpack" => O::Unpack,
            "Split" => O::Split,
            "SplitV" => O::SplitV,
            "ConcatV2" => O::ConcatV2,
            "Concat" => O::Concat,
            "Pad" => O::Pad,
            "PadV2" => O::PadV2,
            "MirrorPad" => O::MirrorPad,
            "Transpose" => O::Transpose,
            "Tile" => O::Tile,
            "Fill" => O::Fill,
            "ZerosLike" => O::ZerosLike,
            "OnesLike" => O::OnesLike,
            "Range" => O::Range,
            "Cast" => O::Cast,
            "Select" => O::Select,
            "SelectV2" => O::SelectV2,
            "RandomUniform" => O::Random(Random::Uniform),
            "RandomStandardNormal" => O::Random(Random::StandardNormal),
            "TruncatedNormal" => O::Random(Random::TruncatedNormal),
            "Dequantize" => O::Dequantize,
            "Quantize" => O::Quantize,
            "_FusedConv2D" => O::Fused {
                linear: Linear::Conv2D(conv(node)?),
                activation: fused_activation(node)?,
            },
            "_FusedDepthwiseConv2dNative" => O::Fused {
                linear: Linear::Depthwise(conv(node)?),
                activation: fused_activation(node)?,
            },
            "_FusedMatMul" => O::Fused {
                linear: Linear::MatMul(matmul(node)?),
                activation: fused_activation(node)?,
            },
            GELU => O::Gelu {
                approximate: bool_attr(node, "approximate")?,
            },
            PRELU => O::Prelu,
            L2_NORMALIZE => O::L2Normalize,
            "NoOp" => O::NoOp,
            "Assert" => O::Assert,
            "SaveV2" => O::SaveV2,
            "SpaceToBatchND" => O::SpaceToBatchND,
            "BatchToSpaceND" => O::BatchToSpaceND,
            "HardSwish" => O::HardSwish,
            "Conv2DBackpropInput" => O::Conv2DBackpropInput(conv(node)?),
            "ResizeBilinear" => O::ResizeBilinear(resize(node)?),
            "ResizeNearestNeighbor" => O::ResizeNearestNeighbor(resize(node)?),
            other => O::Other(other.to_string()),
        })
    }
    /// The TensorFlow op name this op is written as.
    pub fn name(&self) -> &str {
        match self {
            Op::Placeholder => "Placeholder",
            Op::PlaceholderWithDefault => "PlaceholderWithDefault",
            Op::Const => "Const",
            Op::Forward(Forward::Identity) => "Identity",
            Op::Forward(Forward::StopGradient) => "StopGradient",
            Op::Forward(Forward::Snapshot) => "Snapshot",
            Op::Forward(Forward::CheckNumerics) => "CheckNumerics",
            Op::Forward(Forward::PreventGradient) => "PreventGradient",
            Op::Forward(Forward::EnsureShape) => "EnsureShape",
            Op::IdentityN => "IdentityN",
            Op::Print => "Print",
            Op::Unary(Unary::Relu) => "Relu",
            Op::Unary(Unary::Relu6) => "Relu6",
            Op::Unary(Unary::Elu) => "Elu",
            Op::Unary(Unary::Selu) => "Selu",
            Op::Unary(Unary::Tanh) => "Tanh",
            Op::Unary(Unary::Sigmoid) => "Sigmoid",
            Op::Unary(Unary::Softplus) => "Softplus",
            Op::Unary(Unary::Rsqrt) => "Rsqrt",
            Op::Unary(Unary::Sqrt) => "Sqrt",
            Op::Unary(Unary::Square) => "Square",
            Op::Unary(Unary::Exp) => "Exp",
            Op::Unary(Unary::Log) => "Log",
            Op::Unary(Unary::Log1p) => "Log1p",
            Op::Unary(Unary::Neg) => "Neg",
            Op::Unary(Unary::Abs) => "Abs",
            Op::Unary(Unary::Floor) => "Floor",
            Op::Unary(Unary::Ceil) => "Ceil",
            Op::Unary(Unary::Round) => "Round",
            Op::Unary(Unary::Rint) => "Rint",
            Op::Unary(Unary::Sign) => "Sign",
            Op::Unary(Unary::Reciprocal) => "Reciprocal",
            Op::Unary(Unary::Inv) => "Inv",
            Op::Unary(Unary::Sin) => "Sin",
            Op::Unary(Unary::Cos) => "Cos",
            Op::Unary(Unary::LogicalNot) => "LogicalNot",
            Op::Unary(Unary::Erf) => "Erf",
            Op::LeakyRelu => "LeakyRelu",
            Op::Binary(Binary::Add) => "Add",
            Op::Binary(Binary::AddV2) => "AddV2",
            Op::Binary(Binary::Sub) => "Sub",
            Op::Binary(Binary::Mul) => "Mul",
            Op::Binary(Binary::RealDiv) => "RealDiv",
            Op::Binary(Binary::Div) => "Div",
            Op::Binary(Binary::TruncateDiv) => "TruncateDiv",
            Op::Binary(Binary::FloorDiv) => "FloorDiv",
            Op::Binary(Binary::FloorMod) => "FloorMod",
            Op::Binary(Binary::Mod) => "Mod",
            Op::Binary(Binary::Maximum) => "Maximum",
            Op::Binary(Binary::Minimum) => "Minimum",
            Op::Binary(Binary::Pow) => "Pow",
            Op::Binary(Binary::SquaredDifference) => "SquaredDifference",
            Op::Compare(Compare::Greater) => "Greater",
            Op::Compare(Compare::GreaterEqual) => "GreaterEqual",
            Op::Compare(Compare::Less) => "Less",
            Op::Compare(Compare::LessEqual) => "LessEqual",
            Op::Compare(Compare::Equal) => "Equal",
            Op::Compare(Compare::NotEqual) => "NotEqual",
            Op::Compare(Compare::LogicalAnd) => "LogicalAnd",
            Op::Compare(Compare::LogicalOr) => "LogicalOr",
            Op::Softmax => "Softmax",
            Op::LogSoftmax => "LogSoftmax",
            Op::ArgMax => "ArgMax",
            Op::ArgMin => "ArgMin",
            Op::Gather => "Gather",
            Op::GatherV2 => "GatherV2",
            Op::ExpandDims => "ExpandDims",
            Op::Squeeze => "Squeeze",
            Op::Reshape => "Reshape",
            Op::Shape => "Shape",
            Op::Size => "Size",
            Op::Rank => "Rank",
            Op::StridedSlice => "StridedSlice",
            Op::Slice => "Slice",
            Op::Pack => "Pack",
            Op::Unpack => "Unpack",
            Op::Split => "Split",
            Op::SplitV => "SplitV",
            Op::ConcatV2 => "ConcatV2",
            Op::Concat => "Concat",
            Op::Pad => "Pad",
            Op::PadV2 => "PadV2",
            Op::MirrorPad => "MirrorPad",
            Op::Transpose => "Transpose",
            Op::Tile => "Tile",
            Op::Fill => "Fill",
            Op::ZerosLike => "ZerosLike",
            Op::OnesLike => "OnesLike",
            Op::Range => "Range",
            Op::Cast => "Cast",
            Op::Select => "Select",
            Op::SelectV2 => "SelectV2",
            Op::Random(Random::Uniform) => "RandomUniform",
            Op::Random(Random::StandardNormal) => "RandomStandardNormal",
            Op::Random(Random::TruncatedNormal) => "TruncatedNormal",
            Op::Dequantize => "Dequantize",
            Op::Quantize => "Quantize",
            Op::Gelu { .. } => GELU,
            Op::Prelu => PRELU,
            Op::L2Normalize => L2_NORMALIZE,
            Op::NoOp => "NoOp",
            Op::Assert => "Assert",
            Op::SaveV2 => "SaveV2",
            Op::SpaceToBatchND => "SpaceToBatchND",
            Op::BatchToSpaceND => "BatchToSpaceND",
            Op::HardSwish => "HardSwish",
            Op::Conv2DBackpropInput(_) => "Conv2DBackpropInput",
            Op::ResizeBilinear(_) => "ResizeBilinear",
            Op::ResizeNearestNeighbor(_) => "ResizeNearestNeighbor",
            Op::BiasAdd { v1: false, .. } => "BiasAdd",
            Op::BiasAdd { v1: true, .. } => "BiasAddV1",
            Op::Conv2D(_) => "Conv2D",
            Op::DepthwiseConv2dNative(_) => "DepthwiseConv2dNative",
            Op::MatMul(_) => "MatMul",
            Op::BatchMatMul { version: 1 } => "BatchMatMul",
            Op::BatchMatMul { version: 2 } => "BatchMatMulV2",
            Op::BatchMatMul { .. } => "BatchMatMulV3",
            Op::MaxPool(_) => "MaxPool",
            Op::AvgPool(_) => "AvgPool",
            Op::FusedBatchNorm { version: 1, .. } => "FusedBatchNorm",
            Op::FusedBatchNorm { version: 2, .. } => "FusedBatchNormV2",
            Op::FusedBatchNorm { .. } => "FusedBatchNormV3",
            Op::Reduce { kind, .. } => match kind {
                Reduce::Sum => "Sum",
                Reduce::Mean => "Mean",
                Reduce::Max => "Max",
                Reduce::Min => "Min",
                Reduce::Prod => "Prod",
                Reduce::Any => "Any",
                Reduce::All => "All",
            },
            Op::Fused { linear, .. } => match linear {
                Linear::Conv2D(_) => "_FusedConv2D",
                Linear::Depthwise(_) => "_FusedDepthwiseConv2dNative",
                Linear::MatMul(_) => "_FusedMatMul",
            },
            Op::Other(name) => name,
        }
    }
}

/// Whether `node` of `g` runs hybrid: its op may ([`Op::hybrid_candidate`]), its
/// input type `T` is float32 (the default) and its weights are an int8 constant.
/// `index` is `g.index()`.
pub fn is_hybrid_node(g: &Graph, index: &HashMap<&str, usize>, node: &Node) -> bool {
    let Some(kind) = Op::parse(node).ok().and_then(|op| op.hybrid_candidate()) else {
        return false;
    };
    let input = node.attr_type("T").unwrap_or(DType::F32);
    node.inputs
        .get(LinearKind::HYBRID_WEIGHTS)
        .and_then(|r| index.get(r.node.as_str()))
        .and_then(|&i| g.nodes[i].const_value())
        .is_some_and(|w| kind.is_hybrid(input, w.dtype()))
}

/// Whether an op computes something (as opposed to holding, feeding, forwarding or
/// converting a tensor): what counts when comparing float and int8 op counts.
pub fn is_compute(op: &str) -> bool {
    !matches!(
        op,
        "Const" | "Placeholder" | "Identity" | "Quantize" | "Dequantize"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_name_parses_to_a_typed_op() {
        for name in NAMES {
            let mut n = Node::new("n", *name)
                .with_attr("padding", Attr::Str(b"SAME".to_vec()))
                .with_attr("strides", Attr::Ints(vec![1, 1, 1, 1]))
                .with_attr("ksize", Attr::Ints(vec![1, 2, 2, 1]));
            if name.starts_with("_Fused") {
                n = n.with_attr("fused_ops", Attr::Strs(vec![b"BiasAdd".to_vec()]));
            }
            let op = Op::parse(&n).unwrap();
            assert!(!matches!(op, Op::Other(_)), "{name}");
            assert_eq!(op.name(), *name);
        }
        assert!(matches!(
            Op::parse(&Node::new("n", "Erfinv")).unwrap(),
            Op::Other(s) if s == "Erfinv"
        ));
    }

    #[test]
    fn hybrid_is_decided_by_the_op_and_the_dtypes_of_input_and_weights() {
        let x = Node::new("x", "Placeholder");
        let w = |dt: DType| {
            Node::new("w", "Const").with_attr(
                "value",
                Attr::Tensor(match dt {
                    DType::I8 => crate::ir::Tensor::from_vec(vec![1], &[1i8]),
                    _ => crate::ir::Tensor::from_vec(vec![1], &[1f32]),
                }),
            )
        };
        let fused = |op: &str| {
            Node::new("f", op)
                .with_input(crate::ir::TensorRef::new("x", 0))
                .with_input(crate::ir::TensorRef::new("w", 0))
                .with_attr("padding", Attr::Str(b"SAME".to_vec()))
                .with_attr("strides", Attr::Ints(vec![1, 1, 1, 1]))
                .with_attr("fused_ops", Attr::Strs(vec![b"BiasAdd".to_vec()]))
        };
        let hybrid = |op: &str, dt: DType| {
            let g = Graph {
                nodes: vec![x.clone(), w(dt), fused(op)],
                ..Graph::default()
            };
            let index = g.index().unwrap();
            is_hybrid_node(&g, &index, &g.nodes[2])
        };
        assert!(hybrid("_FusedConv2D", DType::I8));
        assert!(hybrid("_FusedMatMul", DType::I8));
        assert!(!hybrid("_FusedMatMul", DType::F32));
        assert!(!hybrid("_FusedDepthwiseConv2dNative", DType::I8));
        assert!(!hybrid("MatMul", DType::I8));
        assert!(!LinearKind::MatMul.is_hybrid(DType::I8, DType::I8));
    }

    #[test]
    fn conv_attributes_parse_once_for_both_layouts() {
        let n = Node::new("c", "Conv2D")
            .with_attr("padding", Attr::Str(b"VALID".to_vec()))
            .with_attr("strides", Attr::Ints(vec![1, 1, 2, 3]))
            .with_attr("data_format", Attr::Str(b"NCHW".to_vec()));
        assert_eq!(
            Op::parse(&n).unwrap(),
            Op::Conv2D(Conv {
                padding: Padding::Valid,
                strides: [2, 3],
                dilations: [1, 1],
                layout: Layout::Nchw
            })
        );
        let n = n.with_attr("data_format", Attr::Str(b"NHWC".to_vec()));
        let e = Op::parse(&n).unwrap_err().to_string();
        assert!(e.contains("'c'") && e.contains("[1, h, w, 1]"), "{e}");
    }
}
