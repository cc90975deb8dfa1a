//! Serializes a [`Model`] as a `.tflite` flatbuffer. Every choice about the model
//! was made before (by [`super::lower`]); this only lays it out: buffer 0 empty,
//! constant data 16-byte aligned in the file, identical constant data stored
//! once, operator codes in first-use order at the versions of
//! [`super::versions`], a `serving_default` signature and the
//! `min_runtime_version` metadata. The same model always gives the same bytes.

use std::collections::HashMap;

use flatbuffers::{FlatBufferBuilder, Push, Vector, WIPOffset};

use super::model::{Model, Op, Padding, TensorDef};
use super::schema as fb;
use super::versions::{min_runtime_version, op_codes};
use crate::error::{Error, Result};
use crate::ir::DType;

/// Flatbuffers address with 32-bit offsets; leave room for the tables around the data.
const MAX_FLATBUFFER: usize = (1 << 31) - (16 << 20);

/// The `Model.version` of schema 3.
const SCHEMA_VERSION: u32 = 3;

/// The element type of a byte vector aligned to 16 bytes: the Rust flatbuffers
/// generator ignores the schema's `force_align: 16` on `Buffer.data`, and the builder
/// aligns a vector to its element's `Output` type. Its size is one byte; the bytes
/// themselves are pushed as [`Piece`]s and `u8`s.
struct Align16;

#[repr(align(16))]
struct Align16Marker;

impl Push for Align16 {
    type Output = Align16Marker;
    unsafe fn push(&self, _dst: &mut [u8], _written_len: usize) {}
    fn size() -> usize {
        1
    }
}

/// A run of a constant's bytes pushed as one piece (alignment 1: no padding).
struct Piece<'d>(&'d [u8; PIECE]);

const PIECE: usize = 4096;

impl Push for Piece<'_> {
    type Output = u8;
    unsafe fn push(&self, dst: &mut [u8], _written_len: usize) {
        dst.copy_from_slice(self.0);
    }
    fn size() -> usize {
        PIECE
    }
}

/// A `[ubyte]` vector whose data starts 16-byte aligned in the finished file
/// (the builder also raises the buffer's minimum alignment to 16). The bytes are
/// the same as `create_vector` of `Align16`s would lay out, copied straight from
/// `data` in pieces (the builder fills back to front, so the last piece goes first).
fn aligned_bytes<'a>(fbb: &mut FlatBufferBuilder<'a>, data: &[u8]) -> WIPOffset<Vector<'a, u8>> {
    fbb.start_vector::<Align16>(data.len());
    let (body, tail) = data.split_at(data.len() / PIECE * PIECE);
    for &b in tail.iter().rev() {
        fbb.push(b);
    }
    for piece in body.rchunks_exact(PIECE) {
        fbb.push(Piece(
            piece.try_into().expect("rchunks_exact gives PIECE bytes"),
        ));
    }
    let v = fbb.end_vector::<Align16>(data.len());
    WIPOffset::new(v.value())
}

/// A hash of up to 512 bytes spread over `d` (FNV-1a): a cheap first filter for
/// identical constants.
fn sample_hash(d: &[u8]) -> u64 {
    let step = (d.len() / 512).max(1);
    d.iter()
        .step_by(step)
        .take(512)
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        })
}

/// The schema's `TensorType` for an IR dtype.
pub fn tensor_type(dtype: DType) -> Option<fb::TensorType> {
    Some(match dtype {
        DType::F32 => fb::TensorType::FLOAT32,
        DType::F16 => fb::TensorType::FLOAT16,
        DType::I32 => fb::TensorType::INT32,
        DType::U8 => fb::TensorType::UINT8,
        DType::I64 => fb::TensorType::INT64,
        DType::Bool => fb::TensorType::BOOL,
        DType::I16 => fb::TensorType::INT16,
        DType::I8 => fb::TensorType::INT8,
        DType::F64 => fb::TensorType::FLOAT64,
        DType::U64 => fb::TensorType::UINT64,
        DType::U32 => fb::TensorType::UINT32,
        DType::U16 => fb::TensorType::UINT16,
        DType::BF16 => fb::TensorType::BFLOAT16,
        DType::String | DType::Resource | DType::Variant => return None,
    })
}

fn padding(p: Padding) -> fb::Padding {
    match p {
        Padding::Same => fb::Padding::SAME,
        Padding::Valid => fb::Padding::VALID,
    }
}

/// Writes `model` as TFLite flatbuffer bytes.
pub fn write(model: &Model) -> Result<Vec<u8>> {
    let data_bytes: usize = model
        .tensors
        .iter()
        .filter_map(|t| t.data.as_ref())
        .map(|d| d.len() + 16)
        .sum();
    if data_bytes > MAX_FLATBUFFER {
        return Err(Error::msg(format!(
            "the model's constants take {data_bytes} bytes, more than a single TFLite flatbuffer can hold (2 GiB)"
        )));
    }
    check(model)?;
    let (codes, code_index) = op_codes(model);
    let mut fbb = FlatBufferBuilder::with_capacity(data_bytes + 4096 + model.tensors.len() * 128);

    // Buffers: 0 = empty sentinel, then constant data in tensor order (identical
    // contents share one buffer), then metadata.
    let mut buffer_of_tensor = vec![0u32; model.tensors.len()];
    let mut buffer_data: Vec<&[u8]> = Vec::new();
    // Candidates are found by length and a sample of the bytes, then compared whole:
    // hashing every byte of a large model would cost more than the comparisons.
    let mut seen: HashMap<(usize, u64), Vec<u32>> = HashMap::new();
    for (i, t) in model.tensors.iter().enumerate() {
        if let Some(d) = &t.data {
            let d: &[u8] = d;
            if d.is_empty() {
                continue;
            }
            let same = seen.entry((d.len(), sample_hash(d))).or_default();
            let b = match same.iter().find(|&&b| buffer_data[b as usize - 1] == d) {
                Some(&b) => b,
                None => {
                    buffer_data.push(d);
                    same.push(buffer_data.len() as u32);
                    buffer_data.len() as u32
                }
            };
            buffer_of_tensor[i] = b;
        }
    }
    let mut metadata: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut version = min_runtime_version(&codes).into_bytes();
    version.resize(16, 0);
    metadata.push(("min_runtime_version", version));
    for (name, bytes) in &model.metadata {
        metadata.push((name, bytes.clone()));
    }

    let mut buffers = Vec::with_capacity(buffer_data.len() + metadata.len() + 1);
    buffers.push(fb::Buffer::create(&mut fbb, &fb::BufferArgs::default()));
    for d in buffer_data
        .iter()
        .copied()
        .chain(metadata.iter().map(|(_, b)| b.as_slice()))
    {
        let data = aligned_bytes(&mut fbb, d);
        buffers.push(fb::Buffer::create(
            &mut fbb,
            &fb::BufferArgs {
                data: Some(data),
                ..Default::default()
            },
        ));
    }
    let first_metadata_buffer = (buffer_data.len() + 1) as u32;

    let mut tensors = Vec::with_capacity(model.tensors.len());
    for (i, t) in model.tensors.iter().enumerate() {
        tensors.push(write_tensor(&mut fbb, t, buffer_of_tensor[i]));
    }

    let mut operators = Vec::with_capacity(model.operators.len());
    for (op, &code) in model.operators.iter().zip(&code_index) {
        let int16 = op
            .inputs
            .first()
            .and_then(|&i| model.tensor(i))
            .is_some_and(|t| t.dtype == DType::I16);
        let (options_type, options) = write_options(&mut fbb, &op.op, int16);
        let inputs = fbb.create_vector(&op.inputs);
        let outputs = fbb.create_vector(&op.outputs);
        operators.push(fb::Operator::create(
            &mut fbb,
            &fb::OperatorArgs {
                opcode_index: code,
                inputs: Some(inputs),
                outputs: Some(outputs),
                builtin_options_type: options_type,
                builtin_options: options,
                ..Default::default()
            },
        ));
    }

    let input_ids: Vec<i32> = model.inputs.iter().map(|(_, t)| *t).collect();
    let output_ids: Vec<i32> = model.outputs.iter().map(|(_, t)| *t).collect();
    let tensors = fbb.create_vector(&tensors);
    let sg_inputs = fbb.create_vector(&input_ids);
    let sg_outputs = fbb.create_vector(&output_ids);
    let operators = fbb.create_vector(&operators);
    let sg_name = fbb.create_string("main");
    let subgraph = fb::SubGraph::create(
        &mut fbb,
        &fb::SubGraphArgs {
            tensors: Some(tensors),
            inputs: Some(sg_inputs),
            outputs: Some(sg_outputs),
            operators: Some(operators),
            name: Some(sg_name),
        },
    );
    let subgraphs = fbb.create_vector(&[subgraph]);

    let op_codes: Vec<_> = codes
        .iter()
        .map(|&(code, version)| {
            fb::OperatorCode::create(
                &mut fbb,
                &fb::OperatorCodeArgs {
                    deprecated_builtin_code: code.min(127) as i8,
                    custom_code: None,
                    version,
                    builtin_code: fb::BuiltinOperator(code),
                },
            )
        })
        .collect();
    let op_codes = fbb.create_vector(&op_codes);

    fn tensor_maps<'a>(
        fbb: &mut FlatBufferBuilder<'a>,
        list: &[(String, i32)],
    ) -> WIPOffset<Vector<'a, flatbuffers::ForwardsUOffset<fb::TensorMap<'a>>>> {
        let maps: Vec<_> = list
            .iter()
            .map(|(name, t)| {
                let name = fbb.create_string(name);
                fb::TensorMap::create(
                    fbb,
                    &fb::TensorMapArgs {
                        name: Some(name),
                        tensor_index: *t as u32,
                    },
                )
            })
            .collect();
        fbb.create_vector(&maps)
    }
    let sig_inputs = tensor_maps(&mut fbb, &model.inputs);
    let sig_outputs = tensor_maps(&mut fbb, &model.outputs);
    let key = fbb.create_string("serving_default");
    let signature = fb::SignatureDef::create(
        &mut fbb,
        &fb::SignatureDefArgs {
            inputs: Some(sig_inputs),
            outputs: Some(sig_outputs),
            signature_key: Some(key),
            subgraph_index: 0,
        },
    );
    let signatures = fbb.create_vector(&[signature]);

    let metadata: Vec<_> = metadata
        .iter()
        .enumerate()
        .map(|(k, (name, _))| {
            let name = fbb.create_string(name);
            fb::Metadata::create(
                &mut fbb,
                &fb::MetadataArgs {
                    name: Some(name),
                    buffer: first_metadata_buffer + k as u32,
                },
            )
        })
        .collect();
    let metadata = fbb.create_vector(&metadata);
    let buffers = fbb.create_vector(&buffers);
    let description = fbb.create_string(&model.description);
    let root = fb::Model::create(
        &mut fbb,
        &fb::ModelArgs {
            version: SCHEMA_VERSION,
            operator_codes: Some(op_codes),
            subgraphs: Some(subgraphs),
            description: Some(description),
            buffers: Some(buffers),
            metadata_buffer: None,
            metadata: Some(metadata),
            signature_defs: Some(signatures),
        },
    );
    fb::finish_model_buffer(&mut fbb, root);
    // The builder filled its buffer from the back: move the model to the front in
    // place rather than copying it out.
    let (mut bytes, head) = fbb.collapse();
    bytes.drain(..head);
    Ok(bytes)
}

/// Indices and types the flatbuffer cannot represent are a bug upstream; say so
/// instead of writing a file the interpreter rejects.
fn check(model: &Model) -> Result<()> {
    let n = model.tensors.len() as i64;
    for (k, op) in model.operators.iter().enumerate() {
        for &t in op.inputs.iter().chain(&op.outputs) {
            if t < -1 || i64::from(t) >= n || (t == -1 && op.outputs.contains(&t)) {
                return Err(Error::msg(format!(
                    "operator {k} ({}) refers to tensor {t}, which does not exist",
                    op.op.name()
                )));
            }
        }
    }
    for (name, t) in model.inputs.iter().chain(&model.outputs) {
        if *t < 0 || i64::from(*t) >= n {
            return Err(Error::msg(format!(
                "signature tensor '{name}' refers to tensor {t}, which does not exist"
            )));
        }
    }
    for t in &model.tensors {
        if tensor_type(t.dtype).is_none() {
            return Err(Error::msg(format!(
                "tensor '{}' has type {}, which TFLite cannot hold",
                t.name, t.dtype
            )));
        }
    }
    Ok(())
}

fn write_tensor<'a>(
    fbb: &mut FlatBufferBuilder<'a>,
    t: &TensorDef,
    buffer: u32,
) -> WIPOffset<fb::Tensor<'a>> {
    let shape = fbb.create_vector(&t.shape);
    let shape_signature = t.shape_signature.as_ref().map(|s| fbb.create_vector(s));
    let name = fbb.create_string(&t.name);
    let quantization = t.quant.as_ref().map(|q| {
        let scale = fbb.create_vector(&q.scale);
        let zero_point = fbb.create_vector(&q.zero_point);
        fb::QuantizationParameters::create(
            fbb,
            &fb::QuantizationParametersArgs {
                scale: Some(scale),
                zero_point: Some(zero_point),
                quantized_dimension: q.axis.unwrap_or(0) as i32,
                ..Default::default()
            },
        )
    });
    fb::Tensor::create(
        fbb,
        &fb::TensorArgs {
            shape: Some(shape),
            type_: tensor_type(t.dtype).unwrap_or(fb::TensorType::FLOAT32),
            buffer,
            name: Some(name),
            quantization,
            is_variable: false,
            sparsity: None,
            shape_signature,
            has_rank: true,
        },
    )
}

/// `int16`: the op reads int16 data (ADD and SUB then take the general-scale
/// 16x8 path, `pot_scale_int16 = false`, as TF's converter writes them).
fn write_options(
    fbb: &mut FlatBufferBuilder,
    op: &Op,
    int16: bool,
) -> (
    fb::BuiltinOptions,
    Option<WIPOffset<flatbuffers::UnionWIPOffset>>,
) {
    use fb::BuiltinOptions as B;
    let act = |a: super::model::Activation| fb::ActivationFunctionType(a.code());
    // Options tables whose fields qpipe's vendored schema subset leaves out, written
    // slot by slot (vtable slot k at offset 4 + 2k, in schema.fbs field order).
    let table = |fbb: &mut FlatBufferBuilder, slots: &[(u16, i32)], ints: &[(u16, i32)]| {
        let start = fbb.start_table();
        for &(slot, v) in slots {
            fbb.push_slot::<i8>(4 + 2 * slot, v as i8, 0);
        }
        for &(slot, v) in ints {
            fbb.push_slot::<i32>(4 + 2 * slot, v, 0);
        }
        Some(fbb.end_table(start).as_union_value())
    };
    match op {
        // TransposeConvOptions { padding, stride_w, stride_h, fused_activation_function }
        Op::TransposeConv {
            padding: p,
            stride_h,
            stride_w,
            activation,
        } => (
            B::TransposeConvOptions,
            table(
                fbb,
                &[(0, padding(*p).0 as i32), (3, activation.code() as i32)],
                &[(1, *stride_w), (2, *stride_h)],
            ),
        ),
        // ResizeBilinearOptions { new_height, new_width (deprecated), align_corners, half_pixel_centers }
        Op::ResizeBilinear {
            align_corners,
            half_pixel_centers,
        } => (
            B::ResizeBilinearOptions,
            table(
                fbb,
                &[(2, *align_corners as i32), (3, *half_pixel_centers as i32)],
                &[],
            ),
        ),
        // ResizeNearestNeighborOptions { align_corners, half_pixel_centers }
        Op::ResizeNearestNeighbor {
            align_corners,
            half_pixel_centers,
        } => (
            B::ResizeNearestNeighborOptions,
            table(
                fbb,
                &[(0, *align_corners as i32), (1, *half_pixel_centers as i32)],
                &[],
            ),
        ),
        Op::Conv2d(o) => {
            let t = fb::Conv2DOptions::create(
                fbb,
                &fb::Conv2DOptionsArgs {
                    padding: padding(o.padding),
                    stride_w: o.stride_w,
                    stride_h: o.stride_h,
                    fused_activation_function: act(o.activation),
                    dilation_w_factor: o.dilation_w,
                    dilation_h_factor: o.dilation_h,
                    quantized_bias_type: fb::TensorType::FLOAT32,
                },
            );
            (B::Conv2DOptions, Some(t.as_union_value()))
        }
        Op::DepthwiseConv2d {
            conv: o,
            depth_multiplier,
        } => {
            let t = fb::DepthwiseConv2DOptions::create(
                fbb,
                &fb::DepthwiseConv2DOptionsArgs {
                    padding: padding(o.padding),
                    stride_w: o.stride_w,
                    stride_h: o.stride_h,
                    depth_multiplier: *depth_multiplier,
                    fused_activation_function: act(o.activation),
                    dilation_w_factor: o.dilation_w,
                    dilation_h_factor: o.dilation_h,
                },
            );
            (B::DepthwiseConv2DOptions, Some(t.as_union_value()))
        }
        Op::AveragePool2d(o) | Op::MaxPool2d(o) => {
            let t = fb::Pool2DOptions::create(
                fbb,
                &fb::Pool2DOptionsArgs {
                    padding: padding(o.padding),
                    stride_w: o.stride_w,
                    stride_h: o.stride_h,
                    filter_width: o.filter_w,
                    filter_height: o.filter_h,
                    fused_activation_function: act(o.activation),
                },
            );
            (B::Pool2DOptions, Some(t.as_union_value()))
        }
        Op::FullyConnected {
            activation,
            keep_num_dims,
            asymmetric_quantize_inputs,
        } => {
            let t = fb::FullyConnectedOptions::create(
                fbb,
                &fb::FullyConnectedOptionsArgs {
                    fused_activation_function: act(*activation),
                    keep_num_dims: *keep_num_dims,
                    asymmetric_quantize_inputs: *asymmetric_quantize_inputs,
                    ..Default::default()
                },
            );
            (B::FullyConnectedOptions, Some(t.as_union_value()))
        }
        Op::Softmax { beta } => {
            let t = fb::SoftmaxOptions::create(fbb, &fb::SoftmaxOptionsArgs { beta: *beta });
            (B::SoftmaxOptions, Some(t.as_union_value()))
        }
        Op::Concatenation { axis, activation } => {
            let t = fb::ConcatenationOptions::create(
                fbb,
                &fb::ConcatenationOptionsArgs {
                    axis: *axis,
                    fused_activation_function: act(*activation),
                },
            );
            (B::ConcatenationOptions, Some(t.as_union_value()))
        }
        Op::Add { activation } => {
            let t = fb::AddOptions::create(
                fbb,
                &fb::AddOptionsArgs {
                    fused_activation_function: act(*activation),
                    pot_scale_int16: !int16,
                },
            );
            (B::AddOptions, Some(t.as_union_value()))
        }
        Op::Sub { activation } => {
            let t = fb::SubOptions::create(
                fbb,
                &fb::SubOptionsArgs {
                    fused_activation_function: act(*activation),
                    pot_scale_int16: !int16,
                },
            );
            (B::SubOptions, Some(t.as_union_value()))
        }
        Op::Mul { activation } => {
            let t = fb::MulOptions::create(
                fbb,
                &fb::MulOptionsArgs {
                    fused_activation_function: act(*activation),
                },
            );
            (B::MulOptions, Some(t.as_union_value()))
        }
        Op::Div { activation } => {
            let t = fb::DivOptions::create(
                fbb,
                &fb::DivOptionsArgs {
                    fused_activation_function: act(*activation),
                },
            );
            (B::DivOptions, Some(t.as_union_value()))
        }
        Op::Gather { axis, batch_dims } => {
            let t = fb::GatherOptions::create(
                fbb,
                &fb::GatherOptionsArgs {
                    axis: *axis,
                    batch_dims: *batch_dims,
                },
            );
            (B::GatherOptions, Some(t.as_union_value()))
        }
        Op::Mean { keep_dims }
        | Op::Sum { keep_dims }
        | Op::ReduceMax { keep_dims }
        | Op::ReduceMin { keep_dims } => {
            let t = fb::ReducerOptions::create(
                fbb,
                &fb::ReducerOptionsArgs {
                    keep_dims: *keep_dims,
                },
            );
            (B::ReducerOptions, Some(t.as_union_value()))
        }
        Op::Squeeze { dims } => {
            let d = fbb.create_vector(dims);
            let t = fb::SqueezeOptions::create(
                fbb,
                &fb::SqueezeOptionsArgs {
                    squeeze_dims: Some(d),
                },
            );
            (B::SqueezeOptions, Some(t.as_union_value()))
        }
        Op::StridedSlice {
            begin_mask,
            end_mask,
            shrink_axis_mask,
        } => {
            // StridedSliceOptions { begin_mask, end_mask, ellipsis_mask,
            // new_axis_mask, shrink_axis_mask, offset }: slots 0, 1 and 4.
            let t = raw_table(
                fbb,
                &[(0, *begin_mask), (1, *end_mask), (4, *shrink_axis_mask)],
            );
            (B::StridedSliceOptions, Some(t))
        }
        // SplitOptions / SplitVOptions { num_splits }.
        Op::Split { num } => (B::SplitOptions, Some(raw_table(fbb, &[(0, *num)]))),
        Op::SplitV { num } => (B::SplitVOptions, Some(raw_table(fbb, &[(0, *num)]))),
        // PackOptions { values_count, axis }, UnpackOptions { num, axis }.
        Op::Pack { count, axis } => (
            B::PackOptions,
            Some(raw_table(fbb, &[(0, *count), (1, *axis)])),
        ),
        Op::Unpack { num, axis } => (
            B::UnpackOptions,
            Some(raw_table(fbb, &[(0, *num), (1, *axis)])),
        ),
        // ArgMaxOptions / ArgMinOptions { output_type: TensorType (byte) }.
        Op::ArgMax { output } | Op::ArgMin { output } | Op::Shape { output } => {
            let code = tensor_type(*output).map_or(0, |t| t.0);
            let start = fbb.start_table();
            fbb.push_slot::<i8>(4, code, 0);
            let t = fbb.end_table(start).as_union_value();
            let kind = match op {
                Op::ArgMax { .. } => B::ArgMaxOptions,
                Op::ArgMin { .. } => B::ArgMinOptions,
                _ => B::ShapeOptions,
            };
            (kind, Some(t))
        }
        Op::Transpose => empty_options(fbb, B::TransposeOptions),
        Op::Tile => empty_options(fbb, B::TileOptions),
        Op::Slice => empty_options(fbb, B::SliceOptions),
        Op::ZerosLike => empty_options(fbb, B::ZerosLikeOptions),
        Op::Fill => empty_options(fbb, B::FillOptions),
        Op::Reshape
        | Op::Pad
        | Op::Maximum
        | Op::Minimum
        | Op::ExpandDims
        | Op::Dequantize
        | Op::Quantize
        | Op::Relu
        | Op::Relu6
        | Op::HardSwish
        | Op::Tanh
        | Op::Logistic
        | Op::Abs
        | Op::Exp
        | Op::Log
        | Op::Rsqrt
        | Op::SquaredDifference
        | Op::Pow
        | Op::Elu
        | Op::Prelu => (B::NONE, None),
        Op::Less => empty_options(fbb, B::LessOptions),
        Op::Greater => empty_options(fbb, B::GreaterOptions),
        Op::GreaterEqual => empty_options(fbb, B::GreaterEqualOptions),
        Op::LessEqual => empty_options(fbb, B::LessEqualOptions),
        Op::Equal => empty_options(fbb, B::EqualOptions),
        Op::NotEqual => empty_options(fbb, B::NotEqualOptions),
        // SELECT_V2's options table has no fields; LiteRT reads none.
        Op::SelectV2 => (B::NONE, None),
        // Options tables the schema subset leaves out (or declares without
        // fields), written slot by slot: the field ids are upstream schema.fbs's.
        Op::Neg | Op::Square | Op::L2Normalization => {
            let t = fbb.start_table();
            let t = fbb.end_table(t);
            let kind = match op {
                Op::Neg => B::NegOptions,
                Op::Square => B::SquareOptions,
                _ => B::L2NormOptions,
            };
            (kind, Some(t.as_union_value()))
        }
        Op::LeakyRelu { alpha } => {
            let t = fbb.start_table();
            fbb.push_slot::<f32>(4, *alpha, 0.0);
            let t = fbb.end_table(t);
            (B::LeakyReluOptions, Some(t.as_union_value()))
        }
        Op::BatchMatmul { adj_x, adj_y } => {
            let t = fbb.start_table();
            fbb.push_slot::<bool>(4, *adj_x, false);
            fbb.push_slot::<bool>(6, *adj_y, false);
            let t = fbb.end_table(t);
            (B(101), Some(t.as_union_value()))
        }
        Op::Gelu { approximate } => {
            let t = fbb.start_table();
            fbb.push_slot::<bool>(4, *approximate, false);
            let t = fbb.end_table(t);
            (B(116), Some(t.as_union_value()))
        }
    }
}

/// A table of int32 fields by slot (the generated schema keeps only the option
/// tables qpipe had used, so newer ones are written by field position).
fn raw_table(
    fbb: &mut FlatBufferBuilder,
    fields: &[(u16, i32)],
) -> WIPOffset<flatbuffers::UnionWIPOffset> {
    let start = fbb.start_table();
    for &(slot, v) in fields {
        fbb.push_slot::<i32>(4 + 2 * slot, v, 0);
    }
    fbb.end_table(start).as_union_value()
}

/// An option table without fields, as the converter writes for these operators.
fn empty_options(
    fbb: &mut FlatBufferBuilder,
    kind: fb::BuiltinOptions,
) -> (
    fb::BuiltinOptions,
    Option<WIPOffset<flatbuffers::UnionWIPOffset>>,
) {
    let start = fbb.start_table();
    (kind, Some(fbb.end_table(start).as_union_value()))
}
