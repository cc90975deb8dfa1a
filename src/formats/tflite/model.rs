//! A TFLite model as plain data: what [`super::lower`] decides and
//! [`super::writer`] serializes. Tensor and operator indices are positions in
//! [`Model::tensors`] and [`Model::operators`].

use std::sync::Arc;

use crate::ir::{DType, QuantParams};

/// Fused activation of CONV_2D, FULLY_CONNECTED, ADD, ... (`ActivationFunctionType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activation {
    #[default]
    None,
    Relu,
    ReluN1To1,
    Relu6,
    Tanh,
}

impl Activation {
    /// The schema's `ActivationFunctionType` value.
    pub fn code(self) -> i8 {
        match self {
            Activation::None => 0,
            Activation::Relu => 1,
            Activation::ReluN1To1 => 2,
            Activation::Relu6 => 3,
            Activation::Tanh => 4,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    Same,
    Valid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvOptions {
    pub padding: Padding,
    pub stride_h: i32,
    pub stride_w: i32,
    pub dilation_h: i32,
    pub dilation_w: i32,
    pub activation: Activation,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolOptions {
    pub padding: Padding,
    pub stride_h: i32,
    pub stride_w: i32,
    pub filter_h: i32,
    pub filter_w: i32,
    pub activation: Activation,
}

/// A builtin operator with its options.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Add {
        activation: Activation,
    },
    AveragePool2d(PoolOptions),
    Concatenation {
        axis: i32,
        activation: Activation,
    },
    Conv2d(ConvOptions),
    DepthwiseConv2d {
        conv: ConvOptions,
        depth_multiplier: i32,
    },
    Dequantize,
    FullyConnected {
        activation: Activation,
        keep_num_dims: bool,
        /// Hybrid (float input, int8 weights) kernels quantize each input row
        /// asymmetrically rather than symmetrically.
        asymmetric_quantize_inputs: bool,
    },
    Logistic,
    MaxPool2d(PoolOptions),
    Mul {
        activation: Activation,
    },
    Relu,
    Relu6,
    HardSwish,
    /// TRANSPOSE_CONV (inputs: output shape, filter `[out, h, w, in]`, input, bias).
    TransposeConv {
        padding: Padding,
        stride_h: i32,
        stride_w: i32,
        activation: Activation,
    },
    ResizeBilinear {
        align_corners: bool,
        half_pixel_centers: bool,
    },
    ResizeNearestNeighbor {
        align_corners: bool,
        half_pixel_centers: bool,
    },
    Reshape,
    Softmax {
        beta: f32,
    },
    Tanh,
    Pad,
    Gather {
        axis: i32,
        batch_dims: i32,
    },
    Mean {
        keep_dims: bool,
    },
    Sub {
        activation: Activation,
    },
    Div {
        activation: Activation,
    },
    Squeeze {
        dims: Vec<i32>,
    },
    Maximum,
    Minimum,
    ExpandDims,
    Sum {
        keep_dims: bool,
    },
    ReduceMax {
        keep_dims: bool,
    },
    ReduceMin {
        keep_dims: bool,
    },
    Quantize,
    Abs,
    Exp,
    Log,
    Neg,
    Rsqrt,
    Square,
    SquaredDifference,
    Pow,
    Elu,
    LeakyRelu {
        alpha: f32,
    },
    Prelu,
    Less,
    Greater,
    GreaterEqual,
    LessEqual,
    Equal,
    NotEqual,
    /// `SelectV2`: condition, then, else, broadcasting.
    SelectV2,
    BatchMatmul {
        adj_x: bool,
        adj_y: bool,
    },
    Gelu {
        approximate: bool,
    },
    L2Normalization,
    Transpose,
    Tile,
    Slice,
    /// Begin/end/strides are per input dimension; no ellipsis or new axes.
    StridedSlice {
        begin_mask: i32,
        end_mask: i32,
        shrink_axis_mask: i32,
    },
    Split {
        num: i32,
    },
    SplitV {
        num: i32,
    },
    Pack {
        count: i32,
        axis: i32,
    },
    Unpack {
        num: i32,
        axis: i32,
    },
    ArgMax {
        output: DType,
    },
    ArgMin {
        output: DType,
    },
    ZerosLike,
    Fill,
    Shape {
        output: DType,
    },
}

impl Op {
    /// The schema's `BuiltinOperator` value.
    pub fn builtin_code(&self) -> i32 {
        match self {
            Op::Add { .. } => 0,
            Op::AveragePool2d(_) => 1,
            Op::Concatenation { .. } => 2,
            Op::Conv2d(_) => 3,
            Op::DepthwiseConv2d { .. } => 4,
            Op::Dequantize => 6,
            Op::FullyConnected { .. } => 9,
            Op::Logistic => 14,
            Op::MaxPool2d(_) => 17,
            Op::Mul { .. } => 18,
            Op::Relu => 19,
            Op::Relu6 => 21,
            Op::HardSwish => 117,
            Op::TransposeConv { .. } => 67,
            Op::ResizeBilinear { .. } => 23,
            Op::ResizeNearestNeighbor { .. } => 97,
            Op::Reshape => 22,
            Op::Softmax { .. } => 25,
            Op::Tanh => 28,
            Op::Pad => 34,
            Op::Gather { .. } => 36,
            Op::Mean { .. } => 40,
            Op::Sub { .. } => 41,
            Op::Div { .. } => 42,
            Op::Squeeze { .. } => 43,
            Op::Maximum => 55,
            Op::Minimum => 57,
            Op::ExpandDims => 70,
            Op::Sum { .. } => 74,
            Op::ReduceMax { .. } => 82,
            Op::ReduceMin { .. } => 89,
            Op::Quantize => 114,
            Op::Abs => 101,
            Op::Exp => 47,
            Op::Log => 73,
            Op::Neg => 59,
            Op::Rsqrt => 76,
            Op::Square => 92,
            Op::SquaredDifference => 99,
            Op::Pow => 78,
            Op::Elu => 111,
            Op::LeakyRelu { .. } => 98,
            Op::Prelu => 54,
            Op::Less => 58,
            Op::Greater => 61,
            Op::GreaterEqual => 62,
            Op::LessEqual => 63,
            Op::Equal => 71,
            Op::NotEqual => 72,
            Op::SelectV2 => 123,
            Op::BatchMatmul { .. } => 126,
            Op::Gelu { .. } => 150,
            Op::L2Normalization => 11,
            Op::Transpose => 39,
            Op::StridedSlice { .. } => 45,
            Op::Split { .. } => 49,
            Op::ArgMax { .. } => 56,
            Op::Slice => 65,
            Op::Tile => 69,
            Op::Shape { .. } => 77,
            Op::ArgMin { .. } => 79,
            Op::Pack { .. } => 83,
            Op::Unpack { .. } => 88,
            Op::ZerosLike => 93,
            Op::Fill => 94,
            Op::SplitV { .. } => 102,
        }
    }

    /// The operator's name in TFLite (`CONV_2D`, ...).
    pub fn name(&self) -> &'static str {
        builtin_name(self.builtin_code())
    }
}

/// TFLite's name of a builtin operator code, `"UNKNOWN"` for codes qpipe does not know.
pub fn builtin_name(code: i32) -> &'static str {
    const NAMES: &[(i32, &str)] = &[
        (0, "ADD"),
        (1, "AVERAGE_POOL_2D"),
        (2, "CONCATENATION"),
        (3, "CONV_2D"),
        (4, "DEPTHWISE_CONV_2D"),
        (6, "DEQUANTIZE"),
        (9, "FULLY_CONNECTED"),
        (14, "LOGISTIC"),
        (17, "MAX_POOL_2D"),
        (18, "MUL"),
        (19, "RELU"),
        (21, "RELU6"),
        (22, "RESHAPE"),
        (23, "RESIZE_BILINEAR"),
        (25, "SOFTMAX"),
        (28, "TANH"),
        (34, "PAD"),
        (36, "GATHER"),
        (40, "MEAN"),
        (41, "SUB"),
        (42, "DIV"),
        (43, "SQUEEZE"),
        (55, "MAXIMUM"),
        (57, "MINIMUM"),
        (67, "TRANSPOSE_CONV"),
        (70, "EXPAND_DIMS"),
        (74, "SUM"),
        (82, "REDUCE_MAX"),
        (89, "REDUCE_MIN"),
        (97, "RESIZE_NEAREST_NEIGHBOR"),
        (114, "QUANTIZE"),
        (101, "ABS"),
        (47, "EXP"),
        (73, "LOG"),
        (59, "NEG"),
        (76, "RSQRT"),
        (92, "SQUARE"),
        (99, "SQUARED_DIFFERENCE"),
        (78, "POW"),
        (111, "ELU"),
        (98, "LEAKY_RELU"),
        (54, "PRELU"),
        (58, "LESS"),
        (61, "GREATER"),
        (62, "GREATER_EQUAL"),
        (63, "LESS_EQUAL"),
        (71, "EQUAL"),
        (72, "NOT_EQUAL"),
        (123, "SELECT_V2"),
        (126, "BATCH_MATMUL"),
        (150, "GELU"),
        (11, "L2_NORMALIZATION"),
        (39, "TRANSPOSE"),
        (45, "STRIDED_SLICE"),
        (49, "SPLIT"),
        (56, "ARG_MAX"),
        (65, "SLICE"),
        (69, "TILE"),
        (77, "SHAPE"),
        (79, "ARG_MIN"),
        (83, "PACK"),
        (88, "UNPACK"),
        (93, "ZEROS_LIKE"),
        (94, "FILL"),
        (102, "SPLIT_V"),
        (117, "HARD_SWISH"),
    ];
    NAMES
        .iter()
        .find(|(c, _)| *c == code)
        .map(|(_, n)| *n)
        .unwrap_or("UNKNOWN")
}

/// One tensor of the model's only subgraph.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorDef {
    pub name: String,
    pub dtype: DType,
    /// Static shape; dimensions unknown at conversion time are 1 here.
    pub shape: Vec<i32>,
    /// `shape` with -1 for unknown dimensions; `None` when every dimension is known.
    pub shape_signature: Option<Vec<i32>>,
    /// Little-endian contents of a constant tensor.
    pub data: Option<Arc<[u8]>>,
    pub quant: Option<QuantParams>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Operator {
    pub op: Op,
    /// Tensor indices; -1 marks an absent optional input.
    pub inputs: Vec<i32>,
    pub outputs: Vec<i32>,
}

/// A single-subgraph TFLite model.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Model {
    pub description: String,
    pub tensors: Vec<TensorDef>,
    /// In execution order.
    pub operators: Vec<Operator>,
    /// (signature name, tensor index) of the subgraph inputs and outputs, in order.
    pub inputs: Vec<(String, i32)>,
    pub outputs: Vec<(String, i32)>,
    /// Extra `Model.metadata` entries (name, buffer contents), written after
    /// `min_runtime_version`.
    pub metadata: Vec<(String, Vec<u8>)>,
}

impl Model {
    pub fn tensor(&self, index: i32) -> Option<&TensorDef> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.tensors.get(i))
    }

    /// Operator count by TFLite name, sorted by name.
    pub fn op_histogram(&self) -> std::collections::BTreeMap<&'static str, usize> {
        let mut h = std::collections::BTreeMap::new();
        for op in &self.operators {
            *h.entry(op.op.name()).or_insert(0) += 1;
        }
        h
    }
}
