//! `validate`: runs a `reference` and a `candidate` model on a data set with qpipe's
//! interpreter and measures what the candidate loses on every output: accuracy
//! (when the data set has labels), agreement, output errors, and for every
//! quantized tensor of the candidate its error against the float tensor of the
//! same name in the reference (RMSE, RMSE / scale, SQNR), worst first.
//!
//! Outputs by shape (`n` = samples): `[n, classes]` scores (class = argmax);
//! `[n]` or `[n, 1]` integer class ids (e.g. an ArgMax); `[n, 1]` float, a
//! sigmoid (class = value > 0.5); anything else is a regression output, with
//! errors but no accuracy or agreement. Labels pair with the first output, or
//! with `labels_output`.
//!
//! Gates (each fails the stage with the measured numbers and the worst layers):
//! `max_accuracy_drop` (a fraction: 0.01 is one percentage point; on the labelled
//! output), `min_agreement` (a fraction of samples; every output), and
//! `max_abs_error` (every output). A gate whose metric cannot be computed fails.
//!
//! Config: `reference`, `candidate` (stage ids), `dataset`, `max_accuracy_drop`,
//! `min_agreement`, `max_abs_error`, `labels_output`, `samples` (default: every
//! row), `report` (path of the per-layer table under `out_dir`; default
//! `<candidate>.layers.json`), `runtime` (`"litert-ref"`, the default: LiteRT's
//! reference kernels, the same on every CPU; `"xnnpack"`: the arithmetic of
//! LiteRT's default interpreter with XNNPACK as it runs on x86-64, which depends on
//! the CPU, so the detected CPU features are part of the cache key).
//!
//! Reference tensors are matched by name after the reference is fused the way
//! `quantize_int8` fuses (which does not change its values), so a fused int8
//! convolution is compared with the float output of the same chain. An int8
//! `Quantize` of a float tensor is compared with that tensor.

pub mod measure;
pub mod reference;

use std::ops::Range;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{Artifact, OutputFile, Role, Stage, StageContext, StageDeps, StageOutput};
use crate::error::{Error, Result};
use crate::ir::{DType, Graph, QuantParams, TensorRef};
use crate::kernels::dataset::{argmax_rows, batch_ranges, batch_rows, Dataset, PROBE_ROWS};
use crate::kernels::rounding::quantize_value;
use crate::kernels::{Arithmetic, Buf, Plan, Value};

/// The most rows in a batch (fewer when the models' tensors are large: see
/// [`crate::kernels::dataset::batch_rows`]).
const BATCH: usize = 64;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidateConfig {
    pub reference: String,
    pub candidate: String,
    pub dataset: String,
    #[serde(default)]
    pub max_accuracy_drop: Option<f64>,
    #[serde(default)]
    pub min_agreement: Option<f64>,
    /// The largest absolute difference allowed on any element of any output.
    #[serde(default)]
    pub max_abs_error: Option<f64>,
    /// The output the labels are class ids of (default: the first).
    #[serde(default)]
    pub labels_output: Option<String>,
    #[serde(default)]
    pub samples: Option<usize>,
    #[serde(default)]
    pub report: Option<String>,
    /// Whose int8 and hybrid arithmetic the models run with.
    #[serde(default)]
    pub runtime: Runtime,
}

/// The LiteRT kernels whose arithmetic `validate` and `qpipe eval` reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub enum Runtime {
    /// The reference kernels (`OpResolverType.BUILTIN_REF`; the builtin kernels
    /// without delegates give the same results): the same on every CPU.
    #[default]
    #[serde(rename = "litert-ref")]
    LiteRtRef,
    /// `Interpreter()` as it comes (the XNNPACK delegate and the optimized
    /// kernels) as LiteRT 2.3.0 runs on x86-64: its results depend on the CPU.
    #[serde(rename = "xnnpack")]
    Xnnpack,
}

impl Runtime {
    pub const NAMES: &'static str = "litert-ref (the default) or xnnpack";

    pub fn arithmetic(self) -> Arithmetic {
        match self {
            Runtime::Xnnpack => Arithmetic::LiteRt,
            Runtime::LiteRtRef => Arithmetic::Reference,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Runtime::LiteRtRef => "litert-ref",
            Runtime::Xnnpack => "xnnpack",
        }
    }

    /// A recipe's or command line's runtime name; the message says what to use instead.
    pub fn parse(s: &str) -> std::result::Result<Runtime, String> {
        match s {
            "litert-ref" => Ok(Runtime::LiteRtRef),
            "xnnpack" => Ok(Runtime::Xnnpack),
            "litert" => Err(
                "runtime \"litert\" was renamed: it emulated LiteRT's default \
                 interpreter (XNNPACK), whose results depend on the CPU; that is now \
                 \"xnnpack\". The default, \"litert-ref\", is LiteRT's reference kernels, \
                 the same on every CPU"
                    .into(),
            ),
            other => Err(format!(
                "unknown runtime \"{other}\"; expected {}",
                Runtime::NAMES
            )),
        }
    }
}

impl<'de> Deserialize<'de> for Runtime {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Runtime::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The CPU features the `xnnpack` runtime's results depend on (XNNPACK picks its
/// kernels by them), as a cache key component.
pub fn xnnpack_cpu() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        let mut f = vec!["x86_64"];
        for (name, on) in [
            ("avx2", std::arch::is_x86_feature_detected!("avx2")),
            ("fma", std::arch::is_x86_feature_detected!("fma")),
            ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
            (
                "avx512vnni",
                std::arch::is_x86_feature_detected!("avx512vnni"),
            ),
        ] {
            if on {
                f.push(name);
            }
        }
        f.join(" ")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::env::consts::ARCH.to_string()
    }
}

pub struct Validate {
    config: ValidateConfig,
}

pub fn build(
    table: &super::ConfigTable,
) -> std::result::Result<Box<dyn Stage>, super::ConfigError> {
    Ok(Box::new(Validate {
        config: super::parse_config(table)?,
    }))
}

/// A candidate tensor compared with a reference tensor.
#[derive(Debug, Clone)]
struct Pair {
    candidate: TensorRef,
    reference: TensorRef,
    op: String,
    quant: QuantParams,
}

/// Sums over the samples for one layer.
#[derive(Debug, Clone, Copy, Default)]
struct LayerAcc {
    sq_err: f64,
    sq_ref: f64,
    max_abs: f64,
    n: u64,
    shape_mismatch: bool,
}

/// What an output's values are, from its shape and dtype (`n` samples).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutKind {
    /// `[n, classes]` scores: the class is the argmax.
    Scores(usize),
    /// `[n]` or `[n, 1]` integer class ids.
    ClassIds,
    /// `[n, 1]` float: a sigmoid, class 1 when above 0.5.
    Sigmoid,
    /// Anything else: no classes, so no accuracy or agreement.
    Regression,
}

impl OutKind {
    fn of(s: &[usize], float: bool, n: usize) -> OutKind {
        let int = !float;
        match s {
            [r] if *r == n && int => OutKind::ClassIds,
            [r, 1] if *r == n && int => OutKind::ClassIds,
            [r, 1] if *r == n => OutKind::Sigmoid,
            [r, c] if *r == n && *c > 1 => OutKind::Scores(*c),
            _ => OutKind::Regression,
        }
    }

    fn name(self) -> &'static str {
        match self {
            OutKind::Scores(_) => "class scores",
            OutKind::ClassIds => "class ids",
            OutKind::Sigmoid => "sigmoid",
            OutKind::Regression => "regression",
        }
    }

    /// The class of each of the `n` rows, unless a regression output.
    fn classes(self, v: &[f64], n: usize) -> Option<Vec<i64>> {
        match self {
            OutKind::Scores(c) => Some(argmax_rows(v, n, c)),
            OutKind::ClassIds => Some(v.iter().map(|&x| x as i64).collect()),
            OutKind::Sigmoid => Some(v.iter().map(|&x| i64::from(x > 0.5)).collect()),
            OutKind::Regression => None,
        }
    }

    /// The number of classes, when the output says.
    fn class_count(self) -> Option<usize> {
        match self {
            OutKind::Scores(c) => Some(c),
            OutKind::Sigmoid => Some(2),
            _ => None,
        }
    }
}

/// Sums over the samples for one output.
#[derive(Debug, Clone, Copy, Default)]
struct OutAcc {
    abs_err: f64,
    /// Infinite once a difference is NaN, so that a NaN never passes a gate.
    max_abs: f64,
    n: u64,
    agree: usize,
    kind: Option<OutKind>,
}

#[derive(Debug, Clone, Default)]
struct Acc {
    rows: usize,
    ref_correct: usize,
    cand_correct: usize,
    outputs: Vec<OutAcc>,
    layers: Vec<LayerAcc>,
}

impl Acc {
    fn new(outputs: usize, layers: usize) -> Acc {
        Acc {
            outputs: vec![OutAcc::default(); outputs],
            layers: vec![LayerAcc::default(); layers],
            ..Acc::default()
        }
    }

    fn merge(&mut self, o: &Acc) {
        self.rows += o.rows;
        self.ref_correct += o.ref_correct;
        self.cand_correct += o.cand_correct;
        for (a, b) in self.outputs.iter_mut().zip(&o.outputs) {
            a.abs_err += b.abs_err;
            a.max_abs = a.max_abs.max(b.max_abs);
            a.n += b.n;
            a.agree += b.agree;
            // An output without a batch dimension can look like one in a batch of its
            // size, so batches may disagree on its kind: the first batch decides.
            a.kind = a.kind.or(b.kind);
        }
        for (a, b) in self.layers.iter_mut().zip(&o.layers) {
            a.sq_err += b.sq_err;
            a.sq_ref += b.sq_ref;
            a.max_abs = a.max_abs.max(b.max_abs);
            a.n += b.n;
            a.shape_mismatch |= b.shape_mismatch;
        }
    }
}

/// A value as f64, dequantizing int8/int16/int32 with `q`.
fn real_values(v: &Value, q: Option<&QuantParams>) -> Result<Vec<f64>> {
    match (&*v.buf, q) {
        (Buf::I16(x), Some(q)) if q.scale.len() == 1 => {
            let (s, z) = (q.scale[0] as f64, q.zero_point[0] as f64);
            Ok(x.iter().map(|&v| (v as f64 - z) * s).collect())
        }
        (Buf::I8(x), Some(q)) if q.scale.len() == 1 => {
            let (s, z) = (q.scale[0] as f64, q.zero_point[0] as f64);
            Ok(x.iter().map(|&v| (v as f64 - z) * s).collect())
        }
        _ => v.to_f64s(),
    }
}

fn layer_pairs(reference: &Graph, candidate: &Graph) -> Vec<Pair> {
    let ref_names: std::collections::HashSet<&str> =
        reference.nodes.iter().map(|n| n.name.as_str()).collect();
    let mut pairs = Vec::new();
    for n in &candidate.nodes {
        if n.is_const() {
            continue;
        }
        let Some(q) = n.output_quant.get(&0) else {
            continue;
        };
        if q.scale.len() != 1 {
            continue;
        }
        let reference_tensor = if ref_names.contains(n.name.as_str()) {
            Some(TensorRef::new(n.name.clone(), 0))
        } else if n.op == crate::ir::Op::Quantize.name() {
            n.inputs
                .first()
                .filter(|r| ref_names.contains(r.node.as_str()))
                .cloned()
        } else {
            None
        };
        if let Some(r) = reference_tensor {
            pairs.push(Pair {
                candidate: TensorRef::new(n.name.clone(), 0),
                reference: r,
                op: n.op.clone(),
                quant: q.clone(),
            });
        }
    }
    pairs
}

fn producer_quant(g: &Graph, r: &TensorRef) -> Option<QuantParams> {
    g.node(&r.node)
        .and_then(|n| n.output_quant.get(&r.index))
        .cloned()
}

/// A candidate input: its position among the reference's inputs, and for an int8 or
/// int16 input its quantization (and whether it is int16).
pub(crate) type CandFeed = (usize, Option<(QuantParams, bool)>);

/// For each input of the candidate's plan: its position among the reference's inputs,
/// and, for an int8 or int16 input, the parameters to quantize the float data with
/// (and whether it is int16).
pub(crate) fn candidate_feeds(
    ref_plan: &Plan,
    cand_plan: &Plan,
    candidate: &Graph,
) -> Result<Vec<CandFeed>> {
    let mut feeds = Vec::new();
    for inp in cand_plan.inputs() {
        let k = ref_plan
            .inputs()
            .iter()
            .position(|r| r.name == inp.name)
            .ok_or_else(|| {
                Error::msg(format!(
                    "the candidate's input '{}' is not an input of the reference",
                    inp.name
                ))
            })?;
        let int16 = inp.dtype == Some(DType::I16);
        let q = (inp.dtype == Some(DType::I8) || int16)
            .then(|| producer_quant(candidate, &TensorRef::new(inp.name.clone(), 0)))
            .flatten()
            .map(|q| (q, int16));
        feeds.push((k, q));
    }
    Ok(feeds)
}

/// Where the reference's results come from.
enum Reference<'a> {
    /// The memo (see [`reference`]).
    Memo(&'a reference::RefMemo),
    /// Run beside the candidate: the plan fetches the outputs and then the pairs'
    /// reference tensors that are in the layout's layer set (`pair_fetch`: each
    /// pair's index among those, if there).
    Run {
        layout: reference::Layout,
        pair_fetch: Vec<Option<usize>>,
    },
}

struct Run<'a> {
    ds: &'a Dataset,
    /// The reference's plan: it names the feeds, and runs when there is no memo.
    ref_plan: Plan,
    cand_plan: Plan,
    /// Per candidate input: the reference feed and, for an int8 (int16: `true`)
    /// input, its parameters.
    cand_feeds: Vec<CandFeed>,
    /// Output names (the reference's), and the candidate's quantization of each.
    out_names: Vec<String>,
    out_quant: Vec<Option<QuantParams>>,
    /// The output the labels pair with.
    labelled: usize,
    pairs: &'a [Pair],
    reference: Reference<'a>,
}

/// A reference output of a batch: its shape, whether float, its values.
type RefOutput<'a> = (Vec<usize>, bool, std::borrow::Cow<'a, [f64]>);

/// A reference tensor of a batch: its shape and values.
type RefTensor<'a> = (Vec<usize>, std::borrow::Cow<'a, [f32]>);

/// The reference's values of a batch as [`Run::batch`] compares them.
struct RefBatch<'a> {
    outputs: Vec<RefOutput<'a>>,
    /// Per pair, within the layer rows (else `None`).
    layers: Vec<Option<RefTensor<'a>>>,
}

impl<'a> Run<'a> {
    /// (bytes a row of the reference's largest tensor holds, the per-layer rows).
    fn layout(&self) -> (usize, usize) {
        match &self.reference {
            Reference::Memo(m) => m.layout_rows(),
            Reference::Run { layout, .. } => (layout.peak_per_row, layout.layer_rows),
        }
    }

    fn reference_batch(&self, rows: &Range<usize>, feeds: Vec<Value>) -> Result<RefBatch<'_>> {
        let (_, layer_rows) = self.layout();
        let in_layers = rows.end <= layer_rows;
        match &self.reference {
            Reference::Memo(m) => Ok(RefBatch {
                outputs: (0..self.out_names.len())
                    .map(|k| {
                        let (shape, float, v) = m.output(k, rows);
                        (shape, float, v.into())
                    })
                    .collect(),
                layers: self
                    .pairs
                    .iter()
                    .map(|p| {
                        in_layers
                            .then(|| m.layer(&p.reference.to_string(), rows))
                            .flatten()
                            .map(|(s, v)| (s, v.into()))
                    })
                    .collect(),
            }),
            Reference::Run { pair_fetch, .. } => {
                let ro = self.ref_plan.run_values(feeds).map_err(|e| {
                    e.context(format!("reference, rows {}..{}", rows.start, rows.end))
                })?;
                let n_out = self.out_names.len();
                let mut outputs = Vec::with_capacity(n_out);
                for v in &ro[..n_out] {
                    outputs.push((v.shape.clone(), v.dtype().is_float(), v.to_f64s()?.into()));
                }
                let layers = pair_fetch
                    .iter()
                    .map(|f| {
                        let v = &ro[n_out + (*f)?];
                        match (&*v.buf, in_layers) {
                            (Buf::F32(x), true) => Some((v.shape.clone(), x.clone().into())),
                            _ => None,
                        }
                    })
                    .collect();
                Ok(RefBatch { outputs, layers })
            }
        }
    }

    /// Every row of `[0, total)` compared, in the same batches with or without the
    /// memo: the probe rows first, then batches sized by both models' largest
    /// tensors, split where the per-layer rows end.
    fn all(&self, total: usize, inc: &dyn Fn(u64)) -> Result<Acc> {
        let (ref_per_row, layer_rows) = self.layout();
        let mut acc = Acc::new(self.out_names.len(), self.pairs.len());
        let probe = PROBE_ROWS.min(total).min(layer_rows).max(1);
        acc.merge(&self.batch(0..probe)?);
        inc(probe as u64);
        let per_row = ref_per_row.max(self.cand_plan.peak_bytes() / probe);
        let size = batch_rows(per_row, BATCH);
        let mut batches = batch_ranges(probe, layer_rows.max(probe), size);
        batches.extend(batch_ranges(layer_rows.max(probe), total, size));
        let window = (rayon::current_num_threads() * 2).max(1);
        for chunk in batches.chunks(window) {
            let parts: Vec<Result<Acc>> = chunk.par_iter().map(|r| self.batch(r.clone())).collect();
            for (r, p) in chunk.iter().zip(parts) {
                acc.merge(&p?);
                inc(r.len() as u64);
            }
        }
        Ok(acc)
    }

    fn batch(&self, rows: Range<usize>) -> Result<Acc> {
        let ref_feeds = self.ds.feeds(&self.ref_plan, rows.clone())?;
        let mut cand_feeds = Vec::with_capacity(self.cand_feeds.len());
        for (k, q) in &self.cand_feeds {
            let v = ref_feeds[*k].clone();
            cand_feeds.push(match q {
                Some((q, true)) => {
                    let (x, s) = (v.slice::<f32>()?, q.scale[0]);
                    let q16 = |&f: &f32| quantize_value(f, s, 0, -32768, 32767) as i16;
                    Value::from_vec(v.shape.clone(), x.iter().map(q16).collect())
                }
                Some((q, false)) => {
                    let x = v.slice::<f32>()?;
                    let (s, z) = (q.scale[0], q.zero_point[0] as i32);
                    Value::from_vec(
                        v.shape.clone(),
                        x.iter()
                            .map(|&f| quantize_value(f, s, z, -128, 127) as i8)
                            .collect(),
                    )
                }
                None => v,
            });
        }
        let ctx = |e: Error, which: &str| {
            e.context(format!("{which}, rows {}..{}", rows.start, rows.end))
        };
        let reference = self.reference_batch(&rows, ref_feeds)?;
        let co = self
            .cand_plan
            .run_values(cand_feeds)
            .map_err(|e| ctx(e, "candidate"))?;
        let n = rows.end - rows.start;
        let mut acc = Acc::new(self.out_names.len(), self.pairs.len());
        acc.rows = n;
        let labels = self.ds.labels(rows.clone())?;
        for (k, name) in self.out_names.iter().enumerate() {
            let (ref_shape, ref_float, rv) = &reference.outputs[k];
            let cv = real_values(&co[k], self.out_quant[k].as_ref())?;
            if *ref_shape != co[k].shape {
                return Err(Error::msg(format!(
                    "output '{name}': the reference's has shape {:?}, the candidate's {:?}",
                    ref_shape, co[k].shape
                )));
            }
            let oa = &mut acc.outputs[k];
            for (a, b) in rv.iter().zip(&cv) {
                let d = (a - b).abs();
                oa.abs_err += d;
                oa.max_abs = if d.is_nan() {
                    f64::INFINITY
                } else {
                    oa.max_abs.max(d)
                };
            }
            oa.n = rv.len() as u64;
            let kind = OutKind::of(ref_shape, *ref_float, n);
            oa.kind = Some(kind);
            let (Some(rp), Some(cp)) = (kind.classes(rv, n), kind.classes(&cv, n)) else {
                continue;
            };
            oa.agree = rp.iter().zip(&cp).filter(|(a, b)| a == b).count();
            if k != self.labelled {
                continue;
            }
            if let Some(labels) = &labels {
                for (i, &l) in labels.iter().enumerate() {
                    let out_of_range = l < 0 || kind.class_count().is_some_and(|c| l >= c as i64);
                    if out_of_range {
                        let range = kind
                            .class_count()
                            .map_or("a class id is never negative".to_string(), |c| {
                                format!("output '{name}' has classes 0..{}", c - 1)
                            });
                        return Err(Error::file(
                            self.ds
                                .labels_path()
                                .unwrap_or(std::path::Path::new("labels")),
                            format!(
                                "row {}: label {l} is outside the model's classes ({range})",
                                rows.start + i
                            ),
                        ));
                    }
                }
                acc.ref_correct = labels.iter().zip(&rp).filter(|(l, p)| l == p).count();
                acc.cand_correct = labels.iter().zip(&cp).filter(|(l, p)| l == p).count();
            }
        }
        let n_out = self.out_names.len();
        let (_, layer_rows) = self.layout();
        for (k, p) in self.pairs.iter().enumerate() {
            if rows.end > layer_rows {
                break;
            }
            let cv = &co[n_out + k];
            let la = &mut acc.layers[k];
            let Some((shape, rf)) = &reference.layers[k] else {
                la.shape_mismatch = true;
                continue;
            };
            if *shape != cv.shape {
                la.shape_mismatch = true;
                continue;
            }
            let cf = real_values(cv, Some(&p.quant))?;
            for (&a, b) in rf.iter().zip(&cf) {
                let a = a as f64;
                let d = a - b;
                la.sq_err += d * d;
                la.sq_ref += a * a;
                la.max_abs = la.max_abs.max(d.abs());
            }
            la.n += rf.len() as u64;
        }
        Ok(acc)
    }
}

fn fraction(x: usize, n: usize) -> f64 {
    if n == 0 {
        0.0
    } else {
        x as f64 / n as f64
    }
}

fn finite_or_null(x: f64) -> serde_json::Value {
    if x.is_finite() {
        serde_json::json!(x)
    } else {
        serde_json::Value::Null
    }
}

/// `x > limit`, or either is NaN: a gate never passes on a NaN.
fn exceeds(x: f64, limit: f64) -> bool {
    !matches!(
        x.partial_cmp(&limit),
        Some(std::cmp::Ordering::Less | std::cmp::Ordering::Equal)
    )
}

/// The index of the output `name` (a tensor `node:k` or a node name for its
/// output 0) among `outputs`.
fn find_output(outputs: &[TensorRef], name: &str) -> Option<usize> {
    outputs
        .iter()
        .position(|o| o.to_string() == name || (o.index == 0 && o.node == name))
}

/// The reference's plan (which names the feeds, and runs when there is no memo) and
/// where its results come from: the memo, or runs beside the candidate.
fn reference_source<'a>(
    ref_fused: &Graph,
    ds: &Dataset,
    total: usize,
    arith: Arithmetic,
    pairs: &[Pair],
    memo: Option<&'a reference::RefMemo>,
) -> Result<(Plan, Reference<'a>)> {
    let ref_in: Vec<&str> = ref_fused.inputs.iter().map(String::as_str).collect();
    let compile = |fetch: &[TensorRef]| -> Result<Plan> {
        Ok(Plan::compile(ref_fused, &ref_in, fetch)
            .map_err(|e| e.context("reference"))?
            .with_arithmetic(arith))
    };
    if let Some(m) = memo {
        return Ok((compile(&ref_fused.outputs)?, Reference::Memo(m)));
    }
    let layout = reference::layout(ref_fused, ds, total, arith)?;
    let mut fetch = ref_fused.outputs.clone();
    let mut pair_fetch = Vec::with_capacity(pairs.len());
    for p in pairs {
        if layout.layer_set.contains(&p.reference) {
            pair_fetch.push(Some(fetch.len() - ref_fused.outputs.len()));
            fetch.push(p.reference.clone());
        } else {
            pair_fetch.push(None);
        }
    }
    Ok((compile(&fetch)?, Reference::Run { layout, pair_fetch }))
}

impl Validate {
    /// Where the per-layer table goes under `out_dir`.
    fn report_path(&self) -> String {
        self.config
            .report
            .clone()
            .unwrap_or_else(|| format!("{}.layers.json", self.config.candidate))
    }
}

impl Stage for Validate {
    fn role(&self) -> Role {
        Role::Validation {
            reference: "reference",
            candidate: "candidate",
        }
    }
    fn version(&self) -> u32 {
        // 2: the default runtime is LiteRT's reference kernels; every output is measured.
        // 3: int8 SUM follows LiteRT's kernels (reference: bytes read as uint8).
        // 4: the per-layer table is measured on the first `layer_samples` rows.
        // Both models run in the float interpreter: its arithmetic is part of the version.
        crate::kernels::float_stage_version(4)
    }
    fn deps(&self) -> StageDeps {
        StageDeps {
            stages: vec![
                ("reference".into(), self.config.reference.clone()),
                ("candidate".into(), self.config.candidate.clone()),
            ],
            datasets: vec![self.config.dataset.clone()],
            outputs: vec![("report".into(), self.report_path().into())],
            ..StageDeps::default()
        }
    }
    fn config(&self) -> serde_json::Value {
        let mut v = super::config_json(&self.config);
        if self.config.runtime == Runtime::Xnnpack {
            // XNNPACK picks its kernels by the CPU, so the results are this CPU's.
            v["xnnpack_cpu"] = xnnpack_cpu().into();
        }
        v
    }
    fn run(&self, ctx: &StageContext) -> Result<StageOutput> {
        let c = &self.config;
        let id = ctx.id;
        let reference = ctx.input_graph("reference")?;
        let candidate = ctx.input_graph("candidate")?;
        let spec = ctx.datasets.get(&c.dataset).ok_or_else(|| {
            Error::usage(format!(
                "stage '{id}': data set '{}' is not defined",
                c.dataset
            ))
        })?;
        for (what, g) in [("reference", &reference), ("candidate", &candidate)] {
            if g.outputs.is_empty() {
                return Err(Error::msg(format!(
                    "stage '{id}': the {what} model declares no outputs"
                )));
            }
        }
        if reference.outputs.len() != candidate.outputs.len() {
            return Err(Error::msg(format!(
                "stage '{id}': the reference has {} outputs, the candidate {}",
                reference.outputs.len(),
                candidate.outputs.len()
            )));
        }
        let out_names: Vec<String> = reference.outputs.iter().map(|o| o.to_string()).collect();
        let labelled = match &c.labels_output {
            None => 0,
            Some(name) => find_output(&reference.outputs, name).ok_or_else(|| {
                Error::usage(format!(
                    "stage '{id}': labels_output '{name}' is not an output of the model \
                     (outputs: {})",
                    out_names.join(", ")
                ))
            })?,
        };
        let (ref_fused, _) = crate::ir::passes::fuse::fuse(&reference, true)?;
        let pairs = layer_pairs(&ref_fused, &candidate);
        let mut cand_fetch = candidate.outputs.clone();
        cand_fetch.extend(pairs.iter().map(|p| p.candidate.clone()));
        let cand_in: Vec<&str> = candidate.inputs.iter().map(String::as_str).collect();
        let arith = c.runtime.arithmetic();
        let cand_plan = Plan::compile(&candidate, &cand_in, &cand_fetch)
            .map_err(|e| e.context(format!("stage '{id}': candidate")))?
            .with_arithmetic(arith);
        let ds = Dataset::open(spec).map_err(|e| e.context(format!("stage '{id}'")))?;
        let total = c.samples.map_or(ds.rows(), |s| s.min(ds.rows()));
        if total == 0 {
            return Err(Error::usage(if c.samples == Some(0) {
                format!("stage '{id}': samples = 0 validates nothing; remove it to use every row")
            } else {
                format!(
                    "stage '{id}': data set '{}' has no rows; there is nothing to validate",
                    c.dataset
                )
            }));
        }
        let in_stage = |e: Error| e.context(format!("stage '{id}'"));
        let (memo, reference_cached) = reference::obtain(
            ctx.memo,
            "reference",
            &ref_fused,
            spec,
            &ds,
            total,
            c.runtime,
            Some(ctx.progress),
        )
        .map_err(in_stage)?;
        let (ref_plan, source) =
            reference_source(&ref_fused, &ds, total, arith, &pairs, memo.as_ref())
                .map_err(in_stage)?;
        let cand_feeds = candidate_feeds(&ref_plan, &cand_plan, &candidate).map_err(in_stage)?;
        let data_casts = ds.casts(&ref_plan);
        let run = Run {
            ds: &ds,
            out_quant: candidate
                .outputs
                .iter()
                .map(|o| producer_quant(&candidate, o))
                .collect(),
            out_names: out_names.clone(),
            labelled,
            ref_plan,
            cand_plan,
            cand_feeds,
            pairs: &pairs,
            reference: source,
        };
        let layer_rows = run.layout().1;
        let bar = ctx
            .progress
            .start("validating", total as u64, crate::progress::Unit::Samples);
        let acc = run.all(total, &|n| bar.inc(n)).map_err(in_stage)?;
        bar.finish();
        let kind = |k: usize| acc.outputs[k].kind.unwrap_or(OutKind::Regression);
        let has_classes = |k: usize| kind(k) != OutKind::Regression;
        let labels = ds.has_labels() && has_classes(labelled);
        let mut metrics = serde_json::Map::new();
        let ref_acc = fraction(acc.ref_correct, acc.rows);
        let cand_acc = fraction(acc.cand_correct, acc.rows);
        if labels {
            metrics.insert("reference_accuracy".into(), ref_acc.into());
            metrics.insert("candidate_accuracy".into(), cand_acc.into());
            metrics.insert("accuracy_drop".into(), (ref_acc - cand_acc).into());
        }
        let agreement = |k: usize| has_classes(k).then(|| fraction(acc.outputs[k].agree, acc.rows));
        let mean_abs = |k: usize| {
            let o = &acc.outputs[k];
            if o.n == 0 {
                0.0
            } else {
                o.abs_err / o.n as f64
            }
        };
        if let Some(a) = agreement(labelled) {
            metrics.insert("agreement".into(), a.into());
        }
        metrics.insert(
            "max_abs_error".into(),
            finite_or_null(acc.outputs[labelled].max_abs),
        );
        metrics.insert("mean_abs_error".into(), finite_or_null(mean_abs(labelled)));
        metrics.insert("labels_output".into(), out_names[labelled].clone().into());
        let mut outputs = serde_json::Map::new();
        for (k, name) in out_names.iter().enumerate() {
            let mut o = serde_json::Map::new();
            o.insert("kind".into(), kind(k).name().into());
            o.insert(
                "max_abs_error".into(),
                finite_or_null(acc.outputs[k].max_abs),
            );
            o.insert("mean_abs_error".into(), finite_or_null(mean_abs(k)));
            if let Some(a) = agreement(k) {
                o.insert("agreement".into(), a.into());
            }
            outputs.insert(name.clone(), o.into());
        }
        metrics.insert("outputs".into(), outputs.into());
        metrics.insert("samples".into(), acc.rows.into());
        metrics.insert("layer_samples".into(), layer_rows.min(acc.rows).into());
        metrics.insert("reference_cached".into(), reference_cached.into());
        metrics.insert("runtime".into(), c.runtime.name().into());
        if !data_casts.is_empty() {
            metrics.insert("data_casts".into(), data_casts.into());
        }
        // The per-layer table, worst (lowest SQNR) first.
        let mut layers: Vec<(f64, serde_json::Value)> = pairs
            .iter()
            .zip(&acc.layers)
            .filter(|(_, l)| !l.shape_mismatch && l.n > 0)
            .map(|(p, l)| {
                let rmse = (l.sq_err / l.n as f64).sqrt();
                let scale = p.quant.scale[0] as f64;
                let sqnr = 10.0 * (l.sq_ref / l.sq_err).log10();
                let key = if sqnr.is_nan() { f64::INFINITY } else { sqnr };
                (
                    key,
                    serde_json::json!({
                        "tensor": p.candidate.to_string(),
                        "reference": p.reference.to_string(),
                        "op": p.op,
                        "scale": p.quant.scale[0],
                        "zero_point": p.quant.zero_point[0],
                        "rmse": rmse,
                        "rmse_over_scale": rmse / scale,
                        "sqnr_db": finite_or_null(sqnr),
                        "max_abs_error": l.max_abs,
                        "elements": l.n,
                    }),
                )
            })
            .collect();
        layers.sort_by(|a, b| a.0.total_cmp(&b.0));
        let layers: Vec<serde_json::Value> = layers.into_iter().map(|(_, v)| v).collect();
        let worst: Vec<String> = layers
            .iter()
            .take(3)
            .map(|l| {
                format!(
                    "{} (SQNR {} dB, RMSE/scale {:.2})",
                    l["tensor"].as_str().unwrap_or(""),
                    l["sqnr_db"]
                        .as_f64()
                        .map_or("inf".to_string(), |v| format!("{v:.1}")),
                    l["rmse_over_scale"].as_f64().unwrap_or(0.0)
                )
            })
            .collect();
        metrics.insert("layers_compared".into(), layers.len().into());
        metrics.insert(
            "worst_layers".into(),
            serde_json::Value::Array(layers.iter().take(3).map(|l| l["tensor"].clone()).collect()),
        );
        let worst_text = if worst.is_empty() {
            "no quantized layers were compared".to_string()
        } else {
            format!("worst layers: {}", worst.join(", "))
        };
        let describe = |k: usize| format!("output '{}' ({})", out_names[k], kind(k).name());
        if let Some(max) = c.max_accuracy_drop {
            if !ds.has_labels() {
                return Err(Error::usage(format!(
                    "stage '{id}': max_accuracy_drop needs labels in data set '{}'",
                    c.dataset
                )));
            }
            if !has_classes(labelled) {
                return Err(Error::usage(format!(
                    "stage '{id}': max_accuracy_drop: the labels pair with {}, which has no \
                     classes and so no accuracy; set labels_output to a class output",
                    describe(labelled)
                )));
            }
            let drop = ref_acc - cand_acc;
            if exceeds(drop, max) {
                return Err(Error::msg(format!(
                    "stage '{id}': accuracy drop {:.2} points ({:.2}% → {:.2}% on {} samples, \
                     output '{}') exceeds max_accuracy_drop {:.2} points; {worst_text}",
                    drop * 100.0,
                    ref_acc * 100.0,
                    cand_acc * 100.0,
                    acc.rows,
                    out_names[labelled],
                    max * 100.0
                )));
            }
        }
        if let Some(min) = c.min_agreement {
            for (k, name) in out_names.iter().enumerate() {
                let Some(a) = agreement(k) else {
                    return Err(Error::usage(format!(
                        "stage '{id}': min_agreement: {} has no classes, so no agreement \
                         (the gate applies to every output)",
                        describe(k)
                    )));
                };
                if exceeds(min, a) {
                    return Err(Error::msg(format!(
                        "stage '{id}': agreement {:.2}% of output '{}' on {} samples is below \
                         min_agreement {:.2}%; {worst_text}",
                        a * 100.0,
                        name,
                        acc.rows,
                        min * 100.0
                    )));
                }
            }
        }
        if let Some(max) = c.max_abs_error {
            for (k, o) in acc.outputs.iter().enumerate() {
                if exceeds(o.max_abs, max) {
                    return Err(Error::msg(format!(
                        "stage '{id}': max abs error {:e} of output '{}' on {} samples exceeds \
                         max_abs_error {max:e}; {worst_text}",
                        o.max_abs, out_names[k], acc.rows
                    )));
                }
            }
        }
        let path = self.report_path();
        let table = serde_json::json!({ "layers": layers });
        let mut report = serde_json::Value::Object(metrics.clone());
        report["layers"] = table["layers"].clone();
        let bytes = serde_json::to_vec_pretty(&table).unwrap_or_default();
        metrics.insert("layers_file".into(), path.clone().into());
        Ok(StageOutput {
            artifact: Artifact::Report(report),
            metrics,
            files: vec![OutputFile {
                path: path.into(),
                bytes,
            }],
        })
    }
}
