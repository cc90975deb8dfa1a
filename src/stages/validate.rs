//! `validate`: runs a `reference` and a `candidate` model on a data set with qpipe's
//! interpreter and measures what the candidate loses: accuracy (when the data set
//! has labels), top-1 agreement, output errors, and for every quantized tensor of
//! the candidate its error against the float tensor of the same name in the
//! reference (RMSE, RMSE / scale, SQNR), worst first.
//!
//! With `max_accuracy_drop` (a fraction: 0.01 is one percentage point) and/or
//! `min_agreement` (a fraction of samples) the stage is a gate: a candidate that
//! misses either fails the stage with the measured numbers and the worst layers.
//!
//! Config: `reference`, `candidate` (stage ids), `dataset`, `max_accuracy_drop`,
//! `min_agreement`, `samples` (default: every row), `report` (path of the
//! per-layer table under `out_dir`; default `<candidate>.layers.json`), `runtime`
//! (`"litert"`, the default: the int8 arithmetic of LiteRT's default interpreter,
//! XNNPACK included, i.e. what the device computes; `"litert-ref"`: LiteRT's
//! reference kernels).
//!
//! Reference tensors are matched by name after the reference is fused the way
//! `quantize_int8` fuses (which does not change its values), so a fused int8
//! convolution is compared with the float output of the same chain. An int8
//! `Quantize` of a float tensor is compared with that tensor.

use std::ops::Range;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{Artifact, OutputFile, Stage, StageContext, StageDeps, StageOutput};
use crate::error::{Error, Result};
use crate::ir::{DType, Graph, QuantParams, TensorRef};
use crate::kernels::dataset::{argmax_rows, Dataset};
use crate::kernels::rounding::quantize_value;
use crate::kernels::{Arithmetic, Buf, Plan, Value};

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
    #[serde(default)]
    pub samples: Option<usize>,
    #[serde(default)]
    pub report: Option<String>,
    /// Whose int8 arithmetic the models run with.
    #[serde(default)]
    pub runtime: Runtime,
}

/// The LiteRT kernels whose int8 arithmetic `validate` reproduces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Runtime {
    /// `Interpreter()` as it comes: the XNNPACK delegate and the optimized kernels.
    #[default]
    #[serde(rename = "litert")]
    LiteRt,
    /// The reference kernels (`OpResolverType.BUILTIN_REF`).
    #[serde(rename = "litert-ref")]
    LiteRtRef,
}

impl Runtime {
    pub fn arithmetic(self) -> Arithmetic {
        match self {
            Runtime::LiteRt => Arithmetic::LiteRt,
            Runtime::LiteRtRef => Arithmetic::Reference,
        }
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

#[derive(Debug, Clone, Default)]
struct Acc {
    rows: usize,
    ref_correct: usize,
    cand_correct: usize,
    agree: usize,
    abs_err: f64,
    max_abs: f64,
    out_n: u64,
    layers: Vec<LayerAcc>,
}

impl Acc {
    fn merge(&mut self, o: &Acc) {
        self.rows += o.rows;
        self.ref_correct += o.ref_correct;
        self.cand_correct += o.cand_correct;
        self.agree += o.agree;
        self.abs_err += o.abs_err;
        self.max_abs = self.max_abs.max(o.max_abs);
        self.out_n += o.out_n;
        if self.layers.len() < o.layers.len() {
            self.layers.resize(o.layers.len(), LayerAcc::default());
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

/// A value as f64, dequantizing int8/int32 with `q`.
fn real_values(v: &Value, q: Option<&QuantParams>) -> Result<Vec<f64>> {
    match (&*v.buf, q) {
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

struct Run<'a> {
    ds: &'a Dataset,
    ref_plan: Plan,
    cand_plan: Plan,
    /// For each candidate plan input: index of the reference feed with that name,
    /// and the parameters to quantize it with when the candidate takes int8.
    cand_feeds: Vec<(usize, Option<QuantParams>)>,
    n_ref_out: usize,
    n_cand_out: usize,
    out_quant: Option<QuantParams>,
    pairs: &'a [Pair],
}

impl Run<'_> {
    fn batch(&self, rows: Range<usize>) -> Result<Acc> {
        let ref_feeds = self.ds.feeds(&self.ref_plan, rows.clone())?;
        let mut cand_feeds = Vec::with_capacity(self.cand_feeds.len());
        for (k, q) in &self.cand_feeds {
            let v = ref_feeds[*k].clone();
            cand_feeds.push(match q {
                Some(q) => {
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
        let ro = self
            .ref_plan
            .run_values(ref_feeds)
            .map_err(|e| ctx(e, "reference"))?;
        let co = self
            .cand_plan
            .run_values(cand_feeds)
            .map_err(|e| ctx(e, "candidate"))?;
        let n = rows.end - rows.start;
        let mut acc = Acc {
            rows: n,
            layers: vec![LayerAcc::default(); self.pairs.len()],
            ..Acc::default()
        };
        let r0 = ro[0].to_f64s()?;
        let c0 = real_values(&co[0], self.out_quant.as_ref())?;
        if r0.len() != c0.len() {
            return Err(Error::msg(format!(
                "the reference output has shape {:?}, the candidate's {:?}",
                ro[0].shape, co[0].shape
            )));
        }
        for (a, b) in r0.iter().zip(&c0) {
            let d = (a - b).abs();
            acc.abs_err += d;
            acc.max_abs = acc.max_abs.max(d);
        }
        acc.out_n = r0.len() as u64;
        if ro[0].rank() == 2 && ro[0].shape[0] == n {
            let cols = ro[0].shape[1];
            let rp = argmax_rows(&r0, n, cols);
            let cp = argmax_rows(&c0, n, cols);
            acc.agree = rp.iter().zip(&cp).filter(|(a, b)| a == b).count();
            if let Some(labels) = self.ds.labels(rows.clone())? {
                acc.ref_correct = labels.iter().zip(&rp).filter(|(l, p)| l == p).count();
                acc.cand_correct = labels.iter().zip(&cp).filter(|(l, p)| l == p).count();
            }
        }
        for (k, p) in self.pairs.iter().enumerate() {
            let rv = &ro[self.n_ref_out + k];
            let cv = &co[self.n_cand_out + k];
            let la = &mut acc.layers[k];
            if rv.shape != cv.shape || rv.dtype() != DType::F32 {
                la.shape_mismatch = true;
                continue;
            }
            let rf = rv.to_f64s()?;
            let cf = real_values(cv, Some(&p.quant))?;
            for (a, b) in rf.iter().zip(&cf) {
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
    fn kind(&self) -> &'static str {
        "validate"
    }
    fn version(&self) -> u32 {
        1
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
        serde_json::to_value(&self.config).unwrap_or_default()
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
        let (ref_fused, _) = crate::ir::passes::fuse::fuse(&reference, true)?;
        let pairs = layer_pairs(&ref_fused, &candidate);
        let mut ref_fetch = ref_fused.outputs.clone();
        ref_fetch.extend(pairs.iter().map(|p| p.reference.clone()));
        let mut cand_fetch = candidate.outputs.clone();
        cand_fetch.extend(pairs.iter().map(|p| p.candidate.clone()));
        let ref_in: Vec<&str> = ref_fused.inputs.iter().map(String::as_str).collect();
        let cand_in: Vec<&str> = candidate.inputs.iter().map(String::as_str).collect();
        let arith = c.runtime.arithmetic();
        let ref_plan = Plan::compile(&ref_fused, &ref_in, &ref_fetch)
            .map_err(|e| e.context(format!("stage '{id}': reference")))?
            .with_arithmetic(arith);
        let cand_plan = Plan::compile(&candidate, &cand_in, &cand_fetch)
            .map_err(|e| e.context(format!("stage '{id}': candidate")))?
            .with_arithmetic(arith);
        let mut cand_feeds = Vec::new();
        for inp in cand_plan.inputs() {
            let k = ref_plan
                .inputs()
                .iter()
                .position(|r| r.name == inp.name)
                .ok_or_else(|| {
                    Error::msg(format!(
                        "stage '{id}': the candidate's input '{}' is not an input of the reference",
                        inp.name
                    ))
                })?;
            let q = (inp.dtype == Some(DType::I8))
                .then(|| producer_quant(&candidate, &TensorRef::new(inp.name.clone(), 0)))
                .flatten();
            cand_feeds.push((k, q));
        }
        let ds = Dataset::open(spec)?;
        let total = c.samples.map_or(ds.rows(), |s| s.min(ds.rows()));
        let run = Run {
            ds: &ds,
            n_ref_out: ref_fused.outputs.len(),
            n_cand_out: candidate.outputs.len(),
            out_quant: producer_quant(&candidate, &candidate.outputs[0]),
            ref_plan,
            cand_plan,
            cand_feeds,
            pairs: &pairs,
        };
        (ctx.progress)(&format!("{id}: validating on {total} samples"));
        let batches: Vec<Range<usize>> = (0..total)
            .step_by(BATCH)
            .map(|s| s..(s + BATCH).min(total))
            .collect();
        let mut acc = Acc {
            layers: vec![LayerAcc::default(); pairs.len()],
            ..Acc::default()
        };
        let window = (rayon::current_num_threads() * 2).max(1);
        for chunk in batches.chunks(window) {
            let parts: Vec<Result<Acc>> = chunk.par_iter().map(|r| run.batch(r.clone())).collect();
            for p in parts {
                acc.merge(&p.map_err(|e| e.context(format!("stage '{id}'")))?);
            }
        }
        let labels = ds.has_labels();
        let mut metrics = serde_json::Map::new();
        let ref_acc = fraction(acc.ref_correct, acc.rows);
        let cand_acc = fraction(acc.cand_correct, acc.rows);
        if labels {
            metrics.insert("reference_accuracy".into(), ref_acc.into());
            metrics.insert("candidate_accuracy".into(), cand_acc.into());
            metrics.insert("accuracy_drop".into(), (ref_acc - cand_acc).into());
        }
        let agreement = fraction(acc.agree, acc.rows);
        metrics.insert("agreement".into(), agreement.into());
        metrics.insert("max_abs_error".into(), acc.max_abs.into());
        metrics.insert(
            "mean_abs_error".into(),
            (if acc.out_n == 0 {
                0.0
            } else {
                acc.abs_err / acc.out_n as f64
            })
            .into(),
        );
        metrics.insert("samples".into(), acc.rows.into());
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
        if let Some(max) = c.max_accuracy_drop {
            if !labels {
                return Err(Error::usage(format!(
                    "stage '{id}': max_accuracy_drop needs labels in data set '{}'",
                    c.dataset
                )));
            }
            let drop = ref_acc - cand_acc;
            if drop > max {
                return Err(Error::msg(format!(
                    "stage '{id}': accuracy drop {:.2} points ({:.2}% → {:.2}% on {} samples) \
                     exceeds max_accuracy_drop {:.2} points; {worst_text}",
                    drop * 100.0,
                    ref_acc * 100.0,
                    cand_acc * 100.0,
                    acc.rows,
                    max * 100.0
                )));
            }
        }
        if let Some(min) = c.min_agreement {
            if agreement < min {
                return Err(Error::msg(format!(
                    "stage '{id}': top-1 agreement {:.2}% on {} samples is below min_agreement \
                     {:.2}%; {worst_text}",
                    agreement * 100.0,
                    acc.rows,
                    min * 100.0
                )));
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
