//! `qpipe compare`: one row per model variant a recipe builds, from what the cache holds.
//!
//! A variant is a model stage that is exported as `.tflite` or checked by a `validate`
//! stage. Its file size comes from the export, its accuracy numbers from the `validate`
//! stage whose candidate it is, its op counts from the model graph. The float baseline
//! is the model the `validate` stages use as their reference. Nothing is built here;
//! the one thing measured live is the time per sample in qpipe's interpreter (batch 1,
//! one thread), because a time read from a shared cache would be another machine's.

pub mod html;

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;
use serde_json::Value;

use super::recipe::Recipe;
use super::report::table;
use super::status::{cached_results, load_artifact};
use super::store::ActionEntry;
use crate::error::{Error, Result};
use crate::ir::op::is_compute;
use crate::ir::Graph;
use crate::kernels::{Dataset, Plan};
use crate::stages::Role;

/// How [`compare`] measures time per sample.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// The data set to time on (default: the one the `validate` stages use).
    pub dataset: Option<String>,
    /// Samples to time each variant on; 0 skips the timing.
    pub latency_samples: usize,
}

impl Default for CompareOptions {
    fn default() -> Self {
        CompareOptions {
            dataset: None,
            latency_samples: 100,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub pipeline: String,
    pub recipe: String,
    /// The stage all accuracy drops are measured against.
    pub baseline: Option<String>,
    pub latency: LatencySetup,
    pub variants: Vec<Variant>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencySetup {
    pub dataset: Option<String>,
    pub samples: usize,
    pub batch: usize,
    pub threads: usize,
    pub statistic: &'static str,
    /// The CPU the times were measured on.
    pub machine: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Variant {
    /// `float32`, `fp16`, `int8 DEFAULT`, ...
    pub name: String,
    /// The model stage.
    pub stage: String,
    pub kind: String,
    /// The `.tflite` export of the model: stage id and path under `out_dir`.
    pub export: Option<String>,
    pub file: Option<String>,
    pub bytes: Option<u64>,
    pub ratio_to_float: Option<f64>,
    /// The `validate` stage the numbers below come from.
    pub validated_by: Option<String>,
    pub samples: Option<u64>,
    pub accuracy: Option<f64>,
    pub accuracy_drop: Option<f64>,
    pub agreement: Option<f64>,
    pub max_abs_error: Option<f64>,
    pub mean_abs_error: Option<f64>,
    pub int8_ops: u64,
    pub float_ops: u64,
    /// Median milliseconds per sample in qpipe's interpreter, batch 1, one thread.
    pub ms_per_sample: Option<f64>,
    /// The per-layer error table of the `validate` stage, worst first.
    pub layers: Vec<Layer>,
    /// Every model output's errors from the `validate` stage (the columns above are
    /// those of the labelled output, the first unless `labels_output` says).
    pub outputs: Vec<OutputMetrics>,
    /// What an accuracy-aware fallback did, from the model stage's `fallback` metrics.
    pub fallback: Option<FallbackMetrics>,
}

/// A model stage's accuracy-aware fallback: the ops it kept out of int8, the trials it
/// took and what it reached on its tuning set.
#[derive(Debug, Clone, Serialize)]
pub struct FallbackMetrics {
    pub dataset: String,
    pub target: String,
    pub met: bool,
    pub float_ops: Vec<String>,
    /// With `to = "int16"`: the reverted ops computed in int16.
    pub int16_ops: Vec<String>,
    pub trials: u64,
    pub samples: Option<u64>,
    pub accuracy_drop: Option<f64>,
    pub agreement: Option<f64>,
}

impl FallbackMetrics {
    fn from_metrics(m: &Value) -> Option<FallbackMetrics> {
        let s = |k: &str| m.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        Some(FallbackMetrics {
            dataset: s("dataset"),
            target: s("target"),
            met: m.get("met")?.as_bool()?,
            float_ops: m
                .get("float_ops")?
                .as_array()?
                .iter()
                .filter_map(|o| o.get("node").and_then(Value::as_str).map(String::from))
                .collect(),
            int16_ops: m
                .get("int16_ops")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|o| o.get("node").and_then(Value::as_str).map(String::from))
                .collect(),
            trials: m.get("trials")?.as_u64()?,
            samples: m.get("samples").and_then(Value::as_u64),
            accuracy_drop: m.get("accuracy_drop").and_then(Value::as_f64),
            agreement: m.get("agreement").and_then(Value::as_f64),
        })
    }

    /// One line: `int8 DEFAULT: fallback kept 2 ops in float (a, b) after 3 trials; ...`.
    pub fn describe(&self, variant: &str) -> String {
        let list = |ops: &[String]| {
            format!(
                "{} op{} ({})",
                ops.len(),
                if ops.len() == 1 { "" } else { "s" },
                ops.join(", ")
            )
        };
        let ops = match (self.float_ops.is_empty(), self.int16_ops.is_empty()) {
            (true, true) => "no op in float".to_string(),
            (false, true) => format!("{} in float", list(&self.float_ops)),
            (true, false) => format!("{} in int16", list(&self.int16_ops)),
            (false, false) => format!(
                "{} in int16 and {} in float",
                list(&self.int16_ops),
                list(&self.float_ops)
            ),
        };
        let reached = match (self.accuracy_drop, self.agreement) {
            (Some(d), _) => format!("drop {:+.2} pts", d * 100.0),
            (None, Some(a)) => format!("agreement {:.4}", a),
            _ => "-".to_string(),
        };
        format!(
            "{variant}: fallback kept {ops} after {} trial{}; on '{}' ({} samples) {reached}, target {}{}",
            self.trials,
            if self.trials == 1 { "" } else { "s" },
            self.dataset,
            self.samples.map_or("-".into(), |n| n.to_string()),
            self.target,
            if self.met { "" } else { " NOT met (best effort)" }
        )
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct OutputMetrics {
    pub name: String,
    /// `class scores`, `class ids`, `sigmoid` or `regression` (which has no agreement).
    pub kind: Option<String>,
    pub agreement: Option<f64>,
    pub max_abs_error: Option<f64>,
    pub mean_abs_error: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Layer {
    pub tensor: String,
    pub op: String,
    pub scale: f64,
    pub zero_point: i64,
    pub rmse: f64,
    pub rmse_over_scale: f64,
    pub sqnr_db: f64,
}

/// Builds the comparison from the recipe's cached results. Every stage it needs must be
/// fresh (built for the recipe as it is now); otherwise the error names the stale ones.
pub fn compare(recipe: &Recipe, opts: &CompareOptions) -> Result<Comparison> {
    let entries = cached_results(recipe)?;
    let stages = &recipe.stages;
    let input_of = |i: usize, key: &str| {
        stages[i]
            .inputs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, up)| *up)
    };

    let roles: Vec<Role> = stages.iter().map(|s| s.stage.role()).collect();
    let mut models: Vec<usize> = Vec::new();
    let mut export_of: BTreeMap<usize, usize> = BTreeMap::new();
    let mut validate_of: BTreeMap<usize, usize> = BTreeMap::new();
    let mut references: BTreeMap<usize, usize> = BTreeMap::new();
    let mut validations: Vec<(usize, usize)> = Vec::new();
    for (i, role) in roles.iter().enumerate() {
        match role {
            Role::TfliteExport { input } => {
                if let Some(m) = input_of(i, input) {
                    export_of.entry(m).or_insert(i);
                    models.push(m);
                }
            }
            Role::Validation {
                reference,
                candidate,
            } => {
                if let (Some(r), Some(c)) = (input_of(i, reference), input_of(i, candidate)) {
                    validate_of.entry(c).or_insert(i);
                    *references.entry(r).or_default() += 1;
                    validations.push((i, r));
                    models.push(r);
                    models.push(c);
                }
            }
            Role::Model { .. } | Role::SameModel { .. } | Role::Other => {}
        }
    }
    // The variant a stage builds, following stages that pass their input on.
    let model_role = |mut i: usize| {
        while let Role::SameModel { input } = &roles[i] {
            match input_of(i, input) {
                Some(up) => i = up,
                None => break,
            }
        }
        match &roles[i] {
            Role::Model { label, float } => (label.clone(), *float),
            _ => (stages[i].id.clone(), false),
        }
    };
    models.sort_unstable();
    models.dedup();
    if models.is_empty() {
        return Err(Error::usage(format!(
            "{}: no model variants to compare (no export_tflite or validate stage)",
            recipe.path.display()
        )));
    }
    let baseline = references
        .iter()
        .max_by_key(|(idx, n)| (**n, std::cmp::Reverse(**idx)))
        .map(|(idx, _)| *idx)
        .or_else(|| models.iter().copied().find(|m| model_role(*m).1));

    let mut needed: Vec<usize> = models.clone();
    needed.extend(export_of.values());
    needed.extend(validate_of.values());
    let stale: Vec<&str> = needed
        .iter()
        .filter(|i| entries[**i].is_none())
        .map(|i| stages[*i].id.as_str())
        .collect();
    if !stale.is_empty() {
        let hint = match super::lastrun::why_not_built(recipe) {
            Some(why) => why,
            None => format!(
                "run `qpipe run {}` first, or pass --run",
                recipe.path.display()
            ),
        };
        return Err(Error::msg(format!(
            "{}: not built (or out of date): {}; {hint}",
            recipe.path.display(),
            stale.join(", "),
        )));
    }
    let entry = |i: usize| entries[i].as_ref().expect("checked above");

    let dataset = match &opts.dataset {
        Some(d) => {
            if !recipe.datasets.contains_key(d) {
                let names: Vec<&str> = recipe.datasets.keys().map(String::as_str).collect();
                return Err(Error::usage(format!(
                    "{}: no dataset '{d}' (datasets: {})",
                    recipe.path.display(),
                    names.join(", ")
                )));
            }
            Some(d.clone())
        }
        None => validate_of
            .values()
            .find_map(|v| stages[*v].deps.datasets.first().cloned())
            .or_else(|| recipe.datasets.keys().next().cloned()),
    };
    let data = match (&dataset, opts.latency_samples) {
        (Some(d), n) if n > 0 => Some(Dataset::open(&recipe.datasets[d])?),
        _ => None,
    };
    let timed = data
        .as_ref()
        .map_or(0, |d| d.rows().min(opts.latency_samples));

    let float_bytes = baseline
        .and_then(|b| export_of.get(&b))
        .and_then(|e| metric_u64(entry(*e), "bytes"));
    let baseline_accuracy = validations
        .iter()
        .filter(|(_, r)| Some(*r) == baseline)
        .find_map(|(v, _)| metric_f64(entry(*v), "reference_accuracy"));

    let mut variants = Vec::new();
    let mut names_seen: BTreeMap<String, usize> = BTreeMap::new();
    for &m in &models {
        let s = &stages[m];
        let e = entry(m);
        let artifact = load_artifact(recipe, &e.artifact)?;
        let graph = artifact.graph().ok_or_else(|| {
            Error::msg(format!("stage '{}' produces a report, not a model", s.id))
        })?;
        let mut name = model_role(m).0;
        let seen = names_seen.entry(name.clone()).or_default();
        *seen += 1;
        if *seen > 1 {
            name = format!("{name} ({})", s.id);
        }
        let (int8_ops, float_ops) = count_ops(graph);
        let export = export_of.get(&m).copied();
        let bytes = export.and_then(|x| metric_u64(entry(x), "bytes"));
        let mut v = Variant {
            name,
            stage: s.id.clone(),
            kind: s.kind.to_string(),
            export: export.map(|x| stages[x].id.clone()),
            file: export.and_then(|x| stages[x].outputs.first().map(|o| o.0.clone())),
            bytes,
            ratio_to_float: match (bytes, float_bytes) {
                (Some(b), Some(f)) if f > 0 => Some(b as f64 / f as f64),
                _ => None,
            },
            validated_by: None,
            samples: None,
            accuracy: None,
            accuracy_drop: None,
            agreement: None,
            max_abs_error: None,
            mean_abs_error: None,
            int8_ops,
            float_ops,
            ms_per_sample: None,
            layers: Vec::new(),
            outputs: Vec::new(),
            fallback: e
                .metrics
                .get("fallback")
                .and_then(FallbackMetrics::from_metrics),
        };
        if let Some(&vi) = validate_of.get(&m) {
            let ve = entry(vi);
            v.validated_by = Some(stages[vi].id.clone());
            v.samples = metric_u64(ve, "samples");
            v.accuracy = metric_f64(ve, "candidate_accuracy");
            v.accuracy_drop = metric_f64(ve, "accuracy_drop");
            v.agreement = metric_f64(ve, "agreement");
            v.max_abs_error = metric_f64(ve, "max_abs_error");
            v.mean_abs_error = metric_f64(ve, "mean_abs_error");
            if let Some(Value::Object(outs)) = ve.metrics.get("outputs") {
                v.outputs = outs
                    .iter()
                    .map(|(name, o)| OutputMetrics {
                        name: name.clone(),
                        kind: o.get("kind").and_then(Value::as_str).map(String::from),
                        agreement: o.get("agreement").and_then(Value::as_f64),
                        max_abs_error: o.get("max_abs_error").and_then(Value::as_f64),
                        mean_abs_error: o.get("mean_abs_error").and_then(Value::as_f64),
                    })
                    .collect();
            }
            if let Some(report) = load_artifact(recipe, &ve.artifact)?.report() {
                v.layers = layers_of(report);
            }
        } else if Some(m) == baseline {
            v.accuracy = baseline_accuracy;
            v.accuracy_drop = baseline_accuracy.map(|_| 0.0);
            v.agreement = Some(1.0);
            v.max_abs_error = Some(0.0);
            v.mean_abs_error = Some(0.0);
        }
        if let Some(data) = &data {
            v.ms_per_sample = Some(
                time_per_sample(graph, data, timed)
                    .map_err(|err| err.context(format!("timing stage '{}'", s.id)))?,
            );
        }
        variants.push(v);
    }

    Ok(Comparison {
        pipeline: recipe.name.clone(),
        recipe: recipe.path.display().to_string(),
        baseline: baseline.map(|b| stages[b].id.clone()),
        latency: LatencySetup {
            dataset: data.as_ref().and(dataset),
            samples: timed,
            batch: 1,
            threads: 1,
            statistic: "median",
            machine: cpu_model(),
        },
        variants,
    })
}

fn metric_f64(e: &ActionEntry, key: &str) -> Option<f64> {
    e.metrics.get(key).and_then(Value::as_f64)
}

fn metric_u64(e: &ActionEntry, key: &str) -> Option<u64> {
    e.metrics.get(key).and_then(Value::as_u64)
}

/// Compute ops whose output is int8 (quantized), and the other compute ops.
fn count_ops(g: &Graph) -> (u64, u64) {
    let compute = g.nodes.iter().filter(|n| is_compute(&n.op));
    let int8 = compute
        .clone()
        .filter(|n| n.output_quant.contains_key(&0))
        .count() as u64;
    (int8, compute.count() as u64 - int8)
}

fn layers_of(report: &Value) -> Vec<Layer> {
    let Some(rows) = report.get("layers").and_then(Value::as_array) else {
        return Vec::new();
    };
    rows.iter()
        .filter_map(|l| {
            Some(Layer {
                tensor: l.get("tensor")?.as_str()?.to_string(),
                op: l
                    .get("op")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                scale: l.get("scale")?.as_f64()?,
                zero_point: l.get("zero_point")?.as_i64()?,
                rmse: l.get("rmse")?.as_f64()?,
                rmse_over_scale: l.get("rmse_over_scale")?.as_f64()?,
                sqnr_db: l.get("sqnr_db")?.as_f64()?,
            })
        })
        .collect()
}

/// Median wall time of one sample through `graph`, batch 1, on a one-thread pool, after
/// one untimed warm-up run.
fn time_per_sample(graph: &Graph, data: &Dataset, samples: usize) -> Result<f64> {
    let feeds: Vec<&str> = graph.inputs.iter().map(String::as_str).collect();
    let plan = Plan::compile(graph, &feeds, &graph.outputs)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .map_err(|e| Error::msg(format!("cannot start a timing thread: {e}")))?;
    pool.install(|| {
        if samples > 0 {
            plan.run_values(data.feeds(&plan, 0..1)?)?;
        }
        let mut times = Vec::with_capacity(samples);
        for i in 0..samples {
            let feed = data.feeds(&plan, i..i + 1)?;
            let start = Instant::now();
            plan.run_values(feed)?;
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        Ok(match times.len() {
            0 => 0.0,
            n if n % 2 == 1 => times[n / 2],
            n => (times[n / 2 - 1] + times[n / 2]) / 2.0,
        })
    })
}

fn cpu_model() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{model}, {cpus} CPUs")
}

impl Comparison {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    fn rows(&self) -> Vec<Vec<String>> {
        let mut rows = vec![[
            "variant",
            "stage",
            "bytes",
            "× float",
            "accuracy",
            "drop (pts)",
            "agreement",
            "max |err|",
            "int8/float ops",
            "ms/sample",
        ]
        .map(String::from)
        .to_vec()];
        for v in &self.variants {
            rows.push(vec![
                v.name.clone(),
                v.stage.clone(),
                v.bytes.map_or("-".into(), |b| b.to_string()),
                v.ratio_to_float.map_or("-".into(), |r| format!("{r:.3}")),
                v.accuracy.map_or("-".into(), |a| format!("{a:.4}")),
                v.accuracy_drop
                    .map_or("-".into(), |d| format!("{:+.2}", d * 100.0)),
                v.agreement.map_or("-".into(), |a| format!("{a:.4}")),
                v.max_abs_error.map_or("-".into(), |e| {
                    if e == 0.0 {
                        "0".into()
                    } else {
                        format!("{e:.2e}")
                    }
                }),
                format!("{}/{}", v.int8_ops, v.float_ops),
                v.ms_per_sample.map_or("-".into(), |t| format!("{t:.3}")),
            ]);
        }
        rows
    }

    /// What the time column means, in one sentence.
    pub fn latency_note(&self) -> String {
        let l = &self.latency;
        match &l.dataset {
            Some(d) if l.samples > 0 => format!(
                "ms/sample: median over {} samples of '{d}' in qpipe's interpreter, batch {}, {} thread, measured on this machine ({})",
                l.samples, l.batch, l.threads, l.machine
            ),
            _ => "ms/sample: not measured".to_string(),
        }
    }

    /// One line per output of each variant with several outputs, and one per
    /// variant an accuracy-aware fallback tuned.
    fn outputs_note(&self) -> Vec<String> {
        let num = |x: Option<f64>, f: &dyn Fn(f64) -> String| x.map_or("-".into(), f);
        let mut lines: Vec<String> = self
            .variants
            .iter()
            .filter_map(|v| v.fallback.as_ref().map(|f| f.describe(&v.name)))
            .collect();
        for v in self.variants.iter().filter(|v| v.outputs.len() > 1) {
            for o in &v.outputs {
                lines.push(format!(
                    "{} output '{}' ({}): agreement {}, max |err| {}, mean |err| {}",
                    v.name,
                    o.name,
                    o.kind.as_deref().unwrap_or("-"),
                    num(o.agreement, &|a| format!("{a:.4}")),
                    num(o.max_abs_error, &|e| format!("{e:.2e}")),
                    num(o.mean_abs_error, &|e| format!("{e:.2e}")),
                ));
            }
        }
        lines
    }

    fn baseline_note(&self) -> String {
        match &self.baseline {
            Some(b) => format!("drop and agreement are against '{b}' (drop in percentage points; negative is better)"),
            None => "no float baseline (no validate stage)".to_string(),
        }
    }

    /// The terminal table.
    pub fn render_text(&self) -> String {
        let mut out = format!("{} ({})\n", self.pipeline, self.recipe);
        out.push_str(&table(&self.rows()));
        for l in self.outputs_note() {
            out.push_str(&format!("{l}\n"));
        }
        out.push_str(&format!(
            "{}\n{}\n",
            self.baseline_note(),
            self.latency_note()
        ));
        out
    }

    /// A GitHub-flavoured Markdown table, e.g. for a CI comment.
    pub fn render_markdown(&self) -> String {
        let rows = self.rows();
        let mut out = format!("### qpipe compare: {}\n\n", md_escape(&self.pipeline));
        for (i, r) in rows.iter().enumerate() {
            let cells: Vec<String> = r.iter().map(|c| md_escape(c)).collect();
            out.push_str(&format!("| {} |\n", cells.join(" | ")));
            if i == 0 {
                let align: Vec<&str> = (0..r.len())
                    .map(|c| if c < 2 { "---" } else { "---:" })
                    .collect();
                out.push_str(&format!("| {} |\n", align.join(" | ")));
            }
        }
        if !self.outputs_note().is_empty() {
            out.push('\n');
        }
        for l in self.outputs_note() {
            out.push_str(&format!("- {}\n", md_escape(&l)));
        }
        out.push_str(&format!(
            "\n{}.  \n{}.\n",
            md_escape(&self.baseline_note()),
            md_escape(&self.latency_note())
        ));
        out
    }
}

fn md_escape(s: &str) -> String {
    s.replace('|', "\\|")
}
