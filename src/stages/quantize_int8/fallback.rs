//! Accuracy-aware fallback (`[stages.<id>.fallback]`): keeps the ops whose int8 form
//! costs the most accuracy in float, until the full-integer model meets a target on a
//! tuning data set.
//!
//! Every model is measured as a `validate` stage measures it: qpipe's interpreter with
//! LiteRT's reference arithmetic, against the `reference` model (default: the stage's
//! input) on every row of `dataset` ([`crate::stages::validate::measure`]). With
//! `max_accuracy_drop` the data set needs labels and the target is the accuracy drop;
//! with `min_agreement` it is the top-1 agreement with the reference, labels or not.
//!
//! # Ranking
//!
//! An op's sensitivity is the mean absolute error of the model output against the
//! reference when that op alone is int8 and every other candidate is float. This
//! measures the noise the op itself adds (its input, weight and output quantization),
//! whatever the others do. Two other measures mislead on the failures the fallback is
//! for: the SQNR of each tensor of the all-int8 model against the reference's grows
//! worse downstream because every tensor inherits the error of the layers above it,
//! so it blames the last layers; and the gain from reverting one op of the all-int8
//! model is nil for both ops around a badly quantized tensor (a heavy-tailed
//! activation is quantized at its producer's output and again at its consumer's
//! input, so each stays harmful while the other is int8), where alone each shows the
//! whole error.
//!
//! # Search
//!
//! The all-int8 model is trial 1. Then the most sensitive op not yet reverted is
//! kept in float and the model measured again (one trial each), until the target
//! holds. When a revert makes the tuning metric worse, the remaining ops are ranked
//! again in the current model: by the output error each gives when reverted next.
//! A revert is kept either way, so the search ends at the float model at worst. It
//! stops at the target, after `max_trials` trials, or when every op is float; then
//! the best model seen (the lowest drop, the fewer float ops on a tie) is the
//! result with `best_effort = true`, and an error stating its drop otherwise.
//!
//! Ties are broken by graph order and every measurement is deterministic, so the
//! same inputs give the same file.

use std::collections::{BTreeSet, HashSet};

use serde::{Deserialize, Serialize};

use super::calibration::Stats;
use super::rewrite::{quantize_full, FullOptions, FullReport};
use super::{QuantizeInt8Config, Strategy};
use crate::error::{Error, Result};
use crate::ir::{Graph, Op};
use crate::stages::validate::measure::{measure, Measured};
use crate::stages::validate::reference::{obtain, RefMemo};
use crate::stages::validate::Runtime;
use crate::stages::{ConfigError, ConfigTable, StageContext, StageDeps};

/// The config key (in [`StageDeps::stages`]) of an explicit `reference`.
pub const REFERENCE_KEY: &str = "fallback.reference";

fn default_trials() -> usize {
    50
}

/// What a sensitive op falls back to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FallbackTo {
    #[default]
    Float,
    /// 16x8 for the reverted ops that have a 16x8 kernel (float for the others),
    /// between QUANTIZE ops converting int8 <-> int16.
    Int16,
}

impl<'de> Deserialize<'de> for FallbackTo {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        match String::deserialize(d)?.as_str() {
            "float" => Ok(FallbackTo::Float),
            "int16" => Ok(FallbackTo::Int16),
            other => Err(serde::de::Error::custom(format!(
                "unknown fallback \"{other}\"; expected \"float\" or \"int16\""
            ))),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FallbackConfig {
    /// The tuning data set.
    pub dataset: String,
    /// The stage whose model the candidates are measured against (default: `input`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_accuracy_drop: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_agreement: Option<f64>,
    #[serde(default)]
    pub to: FallbackTo,
    #[serde(default = "default_trials")]
    pub max_trials: usize,
    #[serde(default)]
    pub best_effort: bool,
}

/// Refuses at recipe load a fallback table no input could make work.
pub fn check(
    table: &ConfigTable,
    c: &QuantizeInt8Config,
    f: &FallbackConfig,
) -> std::result::Result<(), ConfigError> {
    let k = |key: &str| format!("fallback.{key}");
    match (f.max_accuracy_drop, f.min_agreement) {
        (Some(_), Some(_)) => {
            return Err(table.error(
                &k("min_agreement"),
                "set max_accuracy_drop or min_agreement, not both",
            ))
        }
        (None, None) => {
            return Err(table.error(
                "fallback",
                "the fallback needs a target: max_accuracy_drop = <fraction> (labelled data) \
                 or min_agreement = <fraction>",
            ))
        }
        _ => {}
    }
    for (key, v) in [
        ("max_accuracy_drop", f.max_accuracy_drop),
        ("min_agreement", f.min_agreement),
    ] {
        if let Some(v) = v {
            if !(0.0..=1.0).contains(&v) {
                return Err(table.error(
                    &k(key),
                    format!("{v} is not a fraction between 0 and 1 (0.01 is one point)"),
                ));
            }
        }
    }
    if f.max_trials == 0 {
        return Err(table.error(&k("max_trials"), "max_trials must be at least 1"));
    }
    if f.dataset.is_empty() {
        return Err(table.error(&k("dataset"), "names no data set"));
    }
    if f.reference.as_deref() == Some("") {
        return Err(table.error(&k("reference"), "names no stage"));
    }
    if c.strategy == Strategy::OptimizeForLatency {
        return Err(table.error(
            "fallback",
            "OPTIMIZE_FOR_LATENCY keeps every op in int8, so nothing can fall back to float; \
             use strategy = \"DEFAULT\"",
        ));
    }
    if c.strategy == Strategy::OptimizeForSize || c.calibration.is_none() {
        return Err(table.error(
            "fallback",
            "the fallback tunes a full-integer model: it needs strategy = \"DEFAULT\" with \
             calibration = \"<dataset>\"",
        ));
    }
    Ok(())
}

/// Adds what the fallback reads to the stage's deps.
pub fn add_deps(f: &FallbackConfig, deps: &mut StageDeps) {
    if !deps.datasets.contains(&f.dataset) {
        deps.datasets.push(f.dataset.clone());
    }
    if let Some(r) = &f.reference {
        deps.stages.push((REFERENCE_KEY.into(), r.clone()));
    }
}

/// The quantity the search lowers: the accuracy drop, or the share of disagreement.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Score {
    m: Measured,
    shortfall: f64,
}

struct Tuner<'a> {
    id: &'a str,
    f: &'a FallbackConfig,
    reference: &'a Graph,
    fused: &'a Graph,
    stats: &'a Stats,
    opts: &'a FullOptions,
    spec: &'a crate::spec::DatasetSpec,
    /// The reference's results on `spec`, shared with validate stages (see
    /// [`crate::stages::validate::reference`]), when the pipeline could memoize them.
    memo: Option<RefMemo>,
}

impl Tuner<'_> {
    fn quantize(&self, float: &BTreeSet<String>) -> Result<(Graph, FullReport)> {
        let mut opts = self.opts.clone();
        match self.f.to {
            FallbackTo::Float => opts.exclude.extend(float.iter().cloned()),
            FallbackTo::Int16 => opts.int16_nodes.extend(float.iter().cloned()),
        }
        quantize_full(self.fused, self.stats, &opts)
    }

    fn score(&self, float: &BTreeSet<String>) -> Result<Score> {
        let (g, _) = self.quantize(float)?;
        let m = measure(
            self.reference,
            &g,
            self.spec,
            Runtime::LiteRtRef,
            self.memo.as_ref(),
        )
        .map_err(|e| {
            e.context(format!(
                "stage '{}': fallback: measuring on '{}'",
                self.id, self.f.dataset
            ))
        })?;
        let shortfall = if self.f.max_accuracy_drop.is_some() {
            match (m.reference_accuracy, m.candidate_accuracy) {
                (Some(r), Some(c)) => r - c,
                _ => {
                    return Err(Error::usage(format!(
                        "stage '{}': fallback: max_accuracy_drop needs labels in data set '{}' \
                         and a class output (use min_agreement otherwise)",
                        self.id, self.f.dataset
                    )))
                }
            }
        } else {
            match m.agreement {
                Some(a) => 1.0 - a,
                None => {
                    return Err(Error::usage(format!(
                        "stage '{}': fallback: min_agreement needs a class output; the model's \
                         first output is a regression output",
                        self.id
                    )))
                }
            }
        };
        Ok(Score { m, shortfall })
    }

    fn met(&self, s: &Score) -> bool {
        // The slack absorbs the rounding of `r - c`: 3 samples of 600 meet 0.005.
        match (self.f.max_accuracy_drop, self.f.min_agreement) {
            (Some(max), _) => s.shortfall <= max + 1e-9,
            (None, Some(min)) => 1.0 - s.shortfall >= min - 1e-9,
            (None, None) => false,
        }
    }

    fn describe(&self, s: &Score) -> String {
        if self.f.max_accuracy_drop.is_some() {
            format!("an accuracy drop of {:.2} points", s.shortfall * 100.0)
        } else {
            format!("an agreement of {:.2}%", (1.0 - s.shortfall) * 100.0)
        }
    }

    fn trial_json(&self, reverted: Option<&str>, s: &Score) -> serde_json::Value {
        let key = if self.f.max_accuracy_drop.is_some() {
            "accuracy_drop"
        } else {
            "agreement"
        };
        let value = if self.f.max_accuracy_drop.is_some() {
            s.shortfall
        } else {
            1.0 - s.shortfall
        };
        serde_json::json!({ "reverted": reverted, key: value, "mean_abs_error": s.m.mean_abs_error })
    }

    fn target(&self) -> String {
        match (self.f.max_accuracy_drop, self.f.min_agreement) {
            (Some(max), _) => format!("max_accuracy_drop {:.2} points", max * 100.0),
            (_, Some(min)) => format!("min_agreement {:.2}%", min * 100.0),
            _ => String::new(),
        }
    }
}

/// Quantizes `fused` to full integer, keeping in float the ops the search reverts;
/// returns the model, the rewrite's report and the `fallback` metrics.
pub fn tune(
    ctx: &StageContext,
    f: &FallbackConfig,
    fused: &Graph,
    stats: &Stats,
    opts: &FullOptions,
) -> Result<(Graph, FullReport, serde_json::Value)> {
    let id = ctx.id;
    let reference = match &f.reference {
        Some(_) => ctx.input_graph(REFERENCE_KEY)?,
        None => ctx.input_graph("input")?,
    };
    let spec = ctx.datasets.get(&f.dataset).ok_or_else(|| {
        Error::usage(format!(
            "stage '{id}': fallback data set '{}' is not defined",
            f.dataset
        ))
    })?;
    let key = if f.reference.is_some() {
        REFERENCE_KEY
    } else {
        "input"
    };
    let (ref_fused, _) = crate::ir::passes::fuse::fuse(&reference, true)?;
    let in_fallback = |e: Error| {
        e.context(format!(
            "stage '{id}': fallback: the reference on '{}'",
            f.dataset
        ))
    };
    let ds = crate::kernels::dataset::Dataset::open(spec).map_err(in_fallback)?;
    let memo = if ds.rows() == 0 {
        None // measure says so
    } else {
        obtain(
            ctx.memo,
            key,
            &ref_fused,
            spec,
            &ds,
            ds.rows(),
            Runtime::LiteRtRef,
            Some(ctx.progress),
        )
        .map_err(in_fallback)?
        .0
    };
    drop(ref_fused);
    let t = Tuner {
        id,
        f,
        reference: &reference,
        fused,
        stats,
        opts,
        spec,
        memo,
    };
    let none = BTreeSet::new();
    let (_, first) = t.quantize(&none)?;
    let left: HashSet<&str> = first.float_nodes.iter().map(|n| n.0.as_str()).collect();
    // The ops the rewrite puts in int8, in graph order.
    let candidates: Vec<(String, String)> = fused
        .nodes
        .iter()
        .filter(|n| {
            !n.is_const()
                && n.op != Op::Placeholder.name()
                && crate::ir::op::is_compute(&n.op)
                && !left.contains(n.name.as_str())
        })
        .map(|n| (n.name.clone(), n.op.clone()))
        .collect();
    let mut trials = 1usize;
    let mut evaluations = 1usize;
    let initial = t.score(&none)?;
    let mut current = initial;
    let mut float: BTreeSet<String> = BTreeSet::new();
    let mut best = (initial, float.clone());
    let mut order: Vec<String> = Vec::new();
    let mut sensitivity = Vec::new();
    let mut reranks = 0usize;
    // Each trial: the op it reverted (none for the all-int8 model) and what it reached.
    let mut history = vec![t.trial_json(None, &initial)];
    if !t.met(&initial) && trials < f.max_trials {
        // Each op alone in int8: the error it adds by itself.
        let all: BTreeSet<String> = candidates.iter().map(|c| c.0.clone()).collect();
        let mut ranked: Vec<(f64, usize)> = Vec::new();
        for (k, (name, op)) in candidates.iter().enumerate() {
            let mut others = all.clone();
            others.remove(name);
            let s = t.score(&others)?;
            evaluations += 1;
            ranked.push((s.m.mean_abs_error, k));
            sensitivity.push(serde_json::json!({
                "node": name,
                "op": op,
                "mean_abs_error": s.m.mean_abs_error,
                "shortfall": s.shortfall,
            }));
        }
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut queue: Vec<usize> = ranked.iter().map(|r| r.1).collect();
        sensitivity = ranked
            .iter()
            .map(|r| sensitivity[r.1].clone())
            .collect::<Vec<_>>();
        while !queue.is_empty() && trials < f.max_trials && !t.met(&current) {
            let k = queue.remove(0);
            float.insert(candidates[k].0.clone());
            order.push(candidates[k].0.clone());
            let s = t.score(&float)?;
            trials += 1;
            evaluations += 1;
            history.push(t.trial_json(Some(&candidates[k].0), &s));
            let worse = s.shortfall > current.shortfall;
            current = s;
            if s.shortfall < best.0.shortfall {
                best = (s, float.clone());
            }
            if worse && queue.len() > 1 && !t.met(&current) {
                // Rank what is left again, in the model as it now is.
                reranks += 1;
                let mut again: Vec<(f64, usize, usize)> = Vec::new();
                for (pos, &j) in queue.iter().enumerate() {
                    let mut next = float.clone();
                    next.insert(candidates[j].0.clone());
                    let e = t.score(&next)?;
                    evaluations += 1;
                    again.push((e.m.mean_abs_error, pos, j));
                }
                again.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                queue = again.into_iter().map(|a| a.2).collect();
            }
        }
    }
    let (chosen, set) = if t.met(&current) {
        (current, float)
    } else {
        best
    };
    let met = t.met(&chosen);
    if !met && !f.best_effort {
        return Err(Error::msg(format!(
            "stage '{id}': fallback: {} is not met on '{}' ({} samples) after {trials} trials; \
             the best reached was {} with {} of {} ops in {} ({}); set best_effort = true \
             to keep that model",
            t.target(),
            f.dataset,
            chosen.m.samples,
            t.describe(&chosen),
            set.len(),
            candidates.len(),
            match f.to {
                FallbackTo::Float => "float",
                FallbackTo::Int16 => "int16",
            },
            if set.is_empty() {
                "none".to_string()
            } else {
                set.iter().cloned().collect::<Vec<_>>().join(", ")
            }
        )));
    }
    let (g, mut report) = t.quantize(&set)?;
    // With to = "int16", a reverted op without a 16x8 kernel is float.
    let in_float: HashSet<String> = report.float_nodes.iter().map(|n| n.0.clone()).collect();
    for n in &mut report.float_nodes {
        if set.contains(&n.0) {
            n.2 = match f.to {
                FallbackTo::Float => "fallback: kept in float for accuracy".into(),
                FallbackTo::Int16 => format!("fallback: reverted to int16, but {}", n.2),
            };
        }
    }
    // The reverted ops in the order they were reverted (only those of the result).
    let listed = |float: bool| -> Vec<serde_json::Value> {
        order
            .iter()
            .filter(|n| set.contains(*n) && in_float.contains(*n) == float)
            .map(|n| {
                let op = candidates
                    .iter()
                    .find(|c| &c.0 == n)
                    .map_or("", |c| c.1.as_str());
                serde_json::json!({"node": n, "op": op})
            })
            .collect()
    };
    let mut m = serde_json::json!({
        "dataset": f.dataset,
        "reference": f.reference.clone().unwrap_or_else(|| "input".into()),
        "target": t.target(),
        "met": met,
        "float_ops": listed(true),
        "candidates": candidates.len(),
        "trials": trials,
        "evaluations": evaluations,
        "reranks": reranks,
        "samples": chosen.m.samples,
        "sensitivity": sensitivity,
        "history": history,
    });
    if let (Some(r), Some(c)) = (chosen.m.reference_accuracy, chosen.m.candidate_accuracy) {
        m["reference_accuracy"] = r.into();
        m["accuracy"] = c.into();
        m["accuracy_drop"] = (r - c).into();
        if let (Some(r0), Some(c0)) = (initial.m.reference_accuracy, initial.m.candidate_accuracy) {
            m["int8_accuracy_drop"] = (r0 - c0).into();
        }
    }
    if let Some(a) = chosen.m.agreement {
        m["agreement"] = a.into();
    }
    if let Some(a) = initial.m.agreement {
        m["int8_agreement"] = a.into();
    }
    if f.to == FallbackTo::Int16 {
        m["to"] = "int16".into();
        m["int16_ops"] = listed(false).into();
    }
    Ok((g, report, m))
}
