//! `quantize_int8`: post-training int8 quantization with TFLite's arithmetic.
//!
//! # The quantized IR
//!
//! This is the contract between the quantizer, the interpreter's int8 kernels
//! ([`crate::kernels::int8`]) and the TFLite exporter.
//!
//! * **Fusion** (as TF's grappler remapper): `Conv2D`, `DepthwiseConv2dNative`,
//!   `MatMul` or a `BatchMatMul*` by a constant matrix (`x @ W` on rank-3 input,
//!   FULLY_CONNECTED over the leading dimensions) followed by `BiasAdd` or an `Add`
//!   of a constant vector (and `Relu` or `Relu6`) becomes one
//!   `_FusedConv2D`, `_FusedDepthwiseConv2dNative` or `_FusedMatMul(x, filter,
//!   bias)` with `fused_ops = ["BiasAdd"(, "Relu"|"Relu6")]`, `num_args = 1` and the
//!   matrix op's attributes, named after the last node of the chain. A `Conv2D`
//!   followed by a channel-preserving `Squeeze`/`Reshape` before its bias
//!   (`tf.nn.conv1d`) keeps its own name and the `Squeeze`/`Reshape` moves after it
//!   under the chain's last name. Without a bias, a zero bias is added (full integer
//!   only). See [`fuse`].
//! * **Int8 weights**: a `Const` of `DType::I8` whose `output_quant[0]` is symmetric
//!   (zero points 0), per axis along the output channel of the TF layout: Conv2D
//!   filter HWIO → axis 3; depthwise `[H, W, C, M]` → axis 2 when `M == 1`, per
//!   tensor otherwise; MatMul `[in, out]` → axis 1 (axis 0 with `transpose_b`), or
//!   per tensor with `per_channel_dense = false`.
//! * **Biases**: `Const` of `DType::I32`, `output_quant[0]` per axis 0 with
//!   `scale[c] = in_scale * w_scale[c]` (f32 product), zero points 0.
//! * **Activations**: the producer of every int8 tensor has `output_quant[index]`
//!   per tensor (scale, zero point). A node computes in int8 when its data inputs
//!   are int8; it keeps its op name (`"T"` becomes int8).
//! * **`Quantize`** (TFLite QUANTIZE): float → int8 with the parameters in its
//!   `output_quant[0]` (`T = float32`), or int8 → int8 requantization (`T = int8`).
//!   Named `<tensor>/quantize` and `<tensor>/requantize`.
//! * **`Dequantize`** (TFLite DEQUANTIZE, shared with `fp16_cast`): int8 (or
//!   float16) → float32 with its input's parameters, `T` = input type, `dtype =
//!   float32`. Named `<tensor>/dequantize`. Graph outputs of the float interface
//!   point at these nodes.
//! * **Weight-only**: weight constants become int8 constants of the same name read
//!   through `<name>/dequantize`; compute stays float.
//! * **Dynamic range** (DEFAULT without calibration): weights of ≥ 1024 elements
//!   become int8 constants as above. A weight read only as the filter of a
//!   `_FusedConv2D` or the weights of a `_FusedMatMul` is read by it directly,
//!   with no `Dequantize`: such a node, with a float data input, a float bias and
//!   an int8 weight input carrying per-channel `output_quant`, is **hybrid**. Its
//!   output is float; at run time each batch row of its input is quantized to
//!   int8 (FULLY_CONNECTED: asymmetric, exported with `asymmetric_quantize_inputs`
//!   as the converter sets it; CONV_2D: asymmetric when the channel scales differ,
//!   symmetric otherwise, as LiteRT decides), see [`crate::kernels::int8`]. Other
//!   weights (depthwise filters, embedding tables) keep the `Dequantize`.
//!
//! # Parameters
//!
//! Activations: `GetAsymmetricQuantizationParams` over the calibrated min/max.
//! Softmax and Sigmoid outputs are (1/256, -128), Tanh (1/128, 0). Ops whose int8
//! kernels need equal input and output parameters (pools, reshapes, concat,
//! gather, pad, reduce max/min, maximum/minimum) put all their tensors in one group
//! whose range is the union of the members' ranges; a conflict between two fixed
//! groups is resolved with a requantizing `Quantize`. Embedding tables read by
//! `GatherV2` are quantized like activations, with the gather's parameters.
//!
//! # Strategies
//!
//! * `DEFAULT`: with `calibration`, full integer with a float interface; ops with no
//!   int8 kernel (and `exclude`d nodes) stay float between `Dequantize`/`Quantize`.
//!   Without calibration, dynamic range (int8 weights ≥ 1024 elements, hybrid
//!   CONV_2D and FULLY_CONNECTED).
//! * `OPTIMIZE_FOR_SIZE`: weight-only int8 of every weight (conv, depthwise and
//!   matmul weights, embedding tables), float compute, no calibration.
//! * `OPTIMIZE_FOR_LATENCY`: full integer with int8 inputs and outputs; any op left
//!   in float that was not excluded is an error naming it.
//!
//! Config: `input` (required), `strategy` (`"DEFAULT"`), `calibration` (a data set
//! name), `samples` (default: every row), `method` (`"minmax"`), `percentile`,
//! `equalize`, `bias_correction` (see [`methods`]), `per_channel_dense` (`true`),
//! `exclude` (`[]`), `activations` (`"int8"`, or `"int16"` for TFLite's 16x8 mode, see
//! [`int16`]), and the `fallback` table ([`fallback`]: ops kept in float until a tuning
//! data set's accuracy holds).

pub mod bias_correction;
pub mod calibration;
pub mod equalize;
pub mod fallback;
pub mod histogram;
pub mod int16;
pub mod methods;
mod movement;
pub mod params;
pub mod rewrite;
mod upstream;
pub mod weights;

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::{Artifact, Role, Stage, StageContext, StageDeps, StageOutput};
use crate::error::{Error, Result};
use crate::ir::Graph;
use crate::progress::Unit;
use calibration::{Method, Stats};

/// Calibration batch size (memory is bounded by a few batches per thread).
const CALIBRATION_BATCH: usize = 32;
/// TFLite's `kWeightsMinNumElementsDefault` for dynamic-range quantization.
const DYNAMIC_RANGE_MIN_ELEMENTS: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Strategy {
    #[default]
    Default,
    OptimizeForSize,
    OptimizeForLatency,
}

/// The name as written in recipes, from the serde names.
impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.serialize(f)
    }
}

/// The activation type of full-integer quantization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activations {
    #[default]
    Int8,
    /// TFLite's 16x8 mode (see [`int16`]).
    Int16,
}

impl Activations {
    fn is_int8(&self) -> bool {
        *self == Activations::Int8
    }
}

fn default_method() -> Method {
    Method::Minmax
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantizeInt8Config {
    pub input: String,
    #[serde(default)]
    pub strategy: Strategy,
    #[serde(default)]
    pub calibration: Option<String>,
    #[serde(default)]
    pub samples: Option<usize>,
    #[serde(default = "default_method")]
    pub method: Method,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentile: Option<f64>,
    /// Unset: on under `activations = "int16"`, off otherwise (see [`int16`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equalize: Option<bool>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bias_correction: bool,
    #[serde(default = "yes")]
    pub per_channel_dense: bool,
    #[serde(default)]
    pub exclude: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<fallback::FallbackConfig>,
    /// Left out of the cache key when int8, so int8 stages keep their keys.
    #[serde(default, skip_serializing_if = "Activations::is_int8")]
    pub activations: Activations,
}

pub struct QuantizeInt8 {
    config: QuantizeInt8Config,
}

const LATENCY_NEEDS_CALIBRATION: &str =
    "OPTIMIZE_FOR_LATENCY needs a calibration data set (calibration = \"<dataset>\")";

/// Builds the stage, refusing at recipe load what no input could make work.
pub fn build(
    table: &super::ConfigTable,
) -> std::result::Result<Box<dyn Stage>, super::ConfigError> {
    let config: QuantizeInt8Config = super::parse_config(table)?;
    if config.strategy == Strategy::OptimizeForLatency && config.calibration.is_none() {
        return Err(table.error("strategy", LATENCY_NEEDS_CALIBRATION));
    }
    let calibrates = config.calibration.is_some() && config.strategy != Strategy::OptimizeForSize;
    // Checked as written: int16's default `equalize` is not the user's setting.
    let written = methods::CalibOptions {
        equalize: config.equalize == Some(true),
        ..config.calib()
    };
    methods::check(table, &written, calibrates)?;
    if let Some(f) = &config.fallback {
        fallback::check(table, &config, f)?;
        if config.activations == Activations::Int16 && f.to == fallback::FallbackTo::Int16 {
            return Err(table.error(
                "fallback.to",
                "to = \"int16\" on an int16 (16x8) stage: its ops are int16 already; \
                 use to = \"float\", or activations = \"int8\" to mix int8 and int16",
            ));
        }
    }
    if config.activations == Activations::Int16 {
        if config.strategy == Strategy::OptimizeForSize {
            return Err(table.error(
                "activations",
                "activations = \"int16\" quantizes activations, but OPTIMIZE_FOR_SIZE is \
                 weight-only (float compute); use DEFAULT or OPTIMIZE_FOR_LATENCY",
            ));
        }
        if matches!(
            config.method,
            calibration::Method::Mse | calibration::Method::Kl | calibration::Method::Auto
        ) {
            return Err(table.error(
                "method",
                "method = \"mse\", \"kl\" and \"auto\" choose ranges for the 8-bit grid, \
                 not for activations = \"int16\"; use \"minmax\" or \"percentile\" (equalize \
                 and bias_correction apply to int16 as they do to int8)",
            ));
        }
        if config.calibration.is_none() {
            return Err(table.error(
                "activations",
                "activations = \"int16\" needs a calibration data set (calibration = \
                 \"<dataset>\") for the activation ranges",
            ));
        }
    }
    Ok(Box::new(QuantizeInt8 { config }))
}

fn weight_bytes(g: &Graph) -> usize {
    g.nodes
        .iter()
        .filter_map(|n| n.const_value())
        .map(|t| t.byte_size())
        .sum()
}

/// The key under which calibration statistics are cached, within the stage's memo
/// namespace. That namespace already covers the input graph's hash, the data set
/// files, the qpipe version and the stage kind's version, and the fused graph that is
/// calibrated is a function of those; so the key adds only what the config chooses.
/// Strategies that calibrate the same way (DEFAULT, OPTIMIZE_FOR_LATENCY) share it.
/// The statistics hold histograms from which every `method` derives its ranges, so
/// the method and percentile are not part of the key; `equalize` (the graph that
/// runs) and `bias_correction` (per-channel histograms) are.
/// The interpreter's float arithmetic ([`crate::kernels::FLOAT_ARITHMETIC`]) is named
/// too, so that the key does not rest on the stage's version alone for it.
pub fn calibration_key(
    dataset: &str,
    digest: &[u8; 32],
    samples: Option<usize>,
    calib: &methods::CalibOptions,
) -> Vec<u8> {
    let mut h = blake3::Hasher::new();
    h.update(b"qpipe calibration v4\0");
    h.update(&crate::kernels::FLOAT_ARITHMETIC.to_le_bytes());
    h.update(dataset.as_bytes());
    h.update(&[0]);
    h.update(digest);
    h.update(format!("{samples:?}/{}/{}", calib.equalize, calib.bias_correction).as_bytes());
    h.finalize().as_bytes().to_vec()
}

impl QuantizeInt8Config {
    /// The calibration options as run: `equalize` defaults to on under int16.
    fn calib(&self) -> methods::CalibOptions {
        methods::CalibOptions {
            method: self.method,
            percentile: self.percentile,
            equalize: self
                .equalize
                .unwrap_or(self.activations == Activations::Int16),
            bias_correction: self.bias_correction,
        }
    }

    /// The config as the cache key sees it: `equalize` as run, and absent when off,
    /// so that int8 stages keep their keys whether `equalize = false` is written.
    fn key_view(&self) -> Self {
        let mut c = self.clone();
        c.equalize = Some(c.calib().equalize).filter(|&on| on);
        c
    }
}

impl QuantizeInt8 {
    fn calibration_used(&self) -> Option<&str> {
        match self.config.strategy {
            Strategy::OptimizeForSize => None,
            _ => self.config.calibration.as_deref(),
        }
    }
}

impl Stage for QuantizeInt8 {
    fn role(&self) -> Role {
        Role::Model {
            label: match (self.config.activations, &self.config.fallback) {
                (Activations::Int8, None) => format!("int8 {}", self.config.strategy),
                (Activations::Int8, Some(_)) => format!("int8 {} + fallback", self.config.strategy),
                (Activations::Int16, None) => format!("int16x8 {}", self.config.strategy),
                (Activations::Int16, Some(_)) => {
                    format!("int16x8 {} + fallback", self.config.strategy)
                }
            },
            float: false,
        }
    }
    fn version(&self) -> u32 {
        // 2: data-movement ops, zero biases dropped, the spatial ops;
        // 3: composites fused (GELU, PReLU, l2_normalize), duplicates merged.
        // Calibration runs the float interpreter: its arithmetic is part of the version.
        crate::kernels::float_stage_version(3)
    }
    fn deps(&self) -> StageDeps {
        let mut deps = StageDeps {
            stages: vec![("input".into(), self.config.input.clone())],
            datasets: self
                .calibration_used()
                .map(|d| vec![d.to_string()])
                .unwrap_or_default(),
            ..StageDeps::default()
        };
        if let Some(f) = &self.config.fallback {
            fallback::add_deps(f, &mut deps);
        }
        deps
    }
    fn config(&self) -> serde_json::Value {
        super::config_json(&self.config.key_view())
    }
    fn run(&self, ctx: &StageContext) -> Result<StageOutput> {
        let graph = ctx.input_graph("input")?;
        let (graph, _) = crate::ir::passes::patterns::rewrite(&graph)?;
        let c = &self.config;
        let names: HashSet<&str> = graph.nodes.iter().map(|n| n.name.as_str()).collect();
        for e in &c.exclude {
            if !names.contains(e.as_str()) {
                return Err(Error::usage(format!(
                    "stage '{}': exclude names '{e}', which is not a node of the input graph",
                    ctx.id
                )));
            }
        }
        let exclude: HashSet<String> = c.exclude.iter().cloned().collect();
        let mut metrics = serde_json::Map::new();
        metrics.insert("strategy".into(), c.strategy.to_string().into());
        if self.calibration_used().is_some() {
            metrics.insert("method".into(), c.method.to_string().into());
        }
        metrics.insert("weight_bytes_before".into(), weight_bytes(&graph).into());
        let full = match (c.strategy, self.calibration_used()) {
            (Strategy::OptimizeForSize, _) => None,
            (Strategy::Default, None) => None,
            (Strategy::OptimizeForLatency, None) => {
                return Err(Error::usage(format!(
                    "stage '{}': {LATENCY_NEEDS_CALIBRATION}",
                    ctx.id
                )))
            }
            (_, Some(ds)) => Some(ds),
        };
        let out = match full {
            None => {
                let (fused, _) = crate::ir::passes::fuse::fuse(&graph, false)?;
                let min = if c.strategy == Strategy::OptimizeForSize {
                    1
                } else {
                    DYNAMIC_RANGE_MIN_ELEMENTS
                };
                let mode = if c.strategy == Strategy::Default {
                    weights::WeightMode::DynamicRange
                } else {
                    weights::WeightMode::WeightOnly
                };
                let (g, r) = weights::quantize_weights(
                    &fused,
                    &weights::WeightOptions {
                        min_elements: min,
                        per_channel_dense: c.per_channel_dense,
                        exclude: &exclude,
                        mode,
                    },
                )?;
                metrics.insert(
                    "mode".into(),
                    if c.strategy == Strategy::OptimizeForSize {
                        "weight_only"
                    } else {
                        "dynamic_range"
                    }
                    .into(),
                );
                metrics.insert("weights_quantized".into(), r.tensors.into());
                metrics.insert("weights_per_channel".into(), r.per_channel.into());
                let float_ops = g
                    .nodes
                    .iter()
                    .filter(|n| crate::ir::op::is_compute(&n.op))
                    .count();
                metrics.insert("int8_ops".into(), 0.into());
                metrics.insert("hybrid_ops".into(), r.hybrid_ops.into());
                metrics.insert("float_ops".into(), (float_ops - r.hybrid_ops).into());
                g
            }
            Some(ds) => {
                let spec = ctx.datasets.get(ds).ok_or_else(|| {
                    Error::usage(format!(
                        "stage '{}': calibration data set '{ds}' is not defined",
                        ctx.id
                    ))
                })?;
                let (fused, _) = crate::ir::passes::fuse::fuse(&graph, true)?;
                let (fused, per_channel) =
                    methods::before_calibration(&fused, &c.calib(), &mut metrics)?;
                let digest = calibration::dataset_digest(spec)?;
                let key = calibration_key(ds, &digest, c.samples, &c.calib());
                let mut computed = false;
                let bytes = ctx.memo.get_or_compute("calibration", &key, &mut || {
                    computed = true;
                    let label = format!("calibrating on '{ds}'");
                    calibration::calibrate(
                        &fused,
                        spec,
                        c.samples,
                        &per_channel,
                        CALIBRATION_BATCH,
                        &|total| ctx.progress.start(&label, total, Unit::Samples),
                    )
                    .map(|s| s.to_bytes())
                })?;
                let stats = Stats::from_bytes(&bytes)?;
                let (fused, stats) = methods::after_calibration(
                    &fused,
                    stats,
                    &c.calib(),
                    c.per_channel_dense,
                    &exclude,
                    &mut metrics,
                )?;
                let opts = rewrite::FullOptions {
                    per_channel_dense: c.per_channel_dense,
                    exclude: exclude.clone(),
                    int8_io: c.strategy == Strategy::OptimizeForLatency,
                    int16: c.activations == Activations::Int16,
                    int16_nodes: HashSet::new(),
                };
                let (g, r) = match &c.fallback {
                    None => rewrite::quantize_full(&fused, &stats, &opts)
                        .map_err(|e| e.context(format!("stage '{}'", ctx.id)))?,
                    Some(f) => {
                        let (g, r, m) = fallback::tune(ctx, f, &fused, &stats, &opts)?;
                        metrics.insert("fallback".into(), m);
                        (g, r)
                    }
                };
                if c.strategy == Strategy::OptimizeForLatency {
                    let blocking: Vec<String> = r
                        .float_nodes
                        .iter()
                        .filter(|(n, op, _)| !exclude.contains(n) && crate::ir::op::is_compute(op))
                        .map(|(n, op, why)| format!("'{n}' ({op}): {why}"))
                        .collect();
                    if !blocking.is_empty() {
                        return Err(Error::msg(format!(
                            "stage '{}': OPTIMIZE_FOR_LATENCY needs every op in {}, but {} \
                             cannot be: {}",
                            ctx.id,
                            if opts.int16 { "int16" } else { "int8" },
                            blocking.len(),
                            blocking.join("; ")
                        )));
                    }
                }
                metrics.insert("mode".into(), "full_integer".into());
                if opts.int16 {
                    metrics.insert("activations".into(), "int16".into());
                }
                metrics.insert("calibration_samples".into(), stats.samples.into());
                let casts = crate::kernels::dataset::Dataset::open(spec)?.graph_casts(&graph);
                if !casts.is_empty() {
                    metrics.insert("calibration_casts".into(), casts.into());
                }
                metrics.insert("calibration_cached".into(), (!computed).into());
                metrics.insert("int8_ops".into(), r.int8_ops.into());
                metrics.insert("float_ops".into(), r.float_ops.into());
                metrics.insert("quantize_ops".into(), r.quantize_ops.into());
                metrics.insert("requantize_ops".into(), r.requantize_ops.into());
                metrics.insert("dequantize_ops".into(), r.dequantize_ops.into());
                metrics.insert(
                    "float_nodes".into(),
                    serde_json::Value::Array(
                        r.float_nodes
                            .iter()
                            .map(|(n, op, why)| serde_json::json!({"node": n, "op": op, "reason": why}))
                            .collect(),
                    ),
                );
                g
            }
        };
        metrics.insert("weight_bytes_after".into(), weight_bytes(&out).into());
        Ok(StageOutput {
            artifact: Artifact::Graph(out.into()),
            metrics,
            files: vec![],
        })
    }
}
