//! The calibration keys of `quantize_int8` (`method`, `percentile`, `equalize`,
//! `bias_correction`): their recipe checks and the steps around the calibration
//! pass. The order is: equalize the fused graph, calibrate it (histograms, and
//! per-channel histograms of layer inputs for bias correction; memoized without
//! the method), derive each tensor's range with the method, correct biases.

use std::collections::{BTreeSet, HashSet};

use serde_json::{json, Map, Value};

use super::calibration::{Method, Stats};
use crate::error::Result;
use crate::ir::{Graph, TensorRef};
use crate::stages::{ConfigError, ConfigTable};

/// `percentile`'s default.
pub const DEFAULT_PERCENTILE: f64 = 99.99;

#[derive(Debug, Clone, Copy)]
pub struct CalibOptions {
    pub method: Method,
    pub percentile: Option<f64>,
    pub equalize: bool,
    pub bias_correction: bool,
}

/// Refuses settings no input could make meaningful; `calibrates` is whether the
/// stage has a calibration pass (a data set, and not OPTIMIZE_FOR_SIZE).
pub fn check(
    table: &ConfigTable,
    o: &CalibOptions,
    calibrates: bool,
) -> std::result::Result<(), ConfigError> {
    if let Some(p) = o.percentile {
        if !(p > 0.0 && p <= 100.0) {
            return Err(table.error(
                "percentile",
                format!("percentile = {p} is outside (0, 100]; e.g. 99.99 keeps the central 99.99 % of the values"),
            ));
        }
        if o.method != Method::Percentile {
            return Err(table.error(
                "percentile",
                format!(
                    "percentile is read only by method = \"percentile\" (method is \"{}\")",
                    o.method
                ),
            ));
        }
    }
    if !calibrates {
        let why = "needs a calibration pass: a `calibration` data set and strategy DEFAULT or \
                   OPTIMIZE_FOR_LATENCY";
        if o.method != Method::Minmax {
            return Err(table.error("method", format!("method = \"{}\" {why}", o.method)));
        }
        for (key, on) in [
            ("equalize", o.equalize),
            ("bias_correction", o.bias_correction),
        ] {
            if on {
                return Err(table.error(key, format!("{key} = true {why}")));
            }
        }
    }
    Ok(())
}

/// The graph calibration runs (equalized if asked) and the tensors whose
/// per-channel histograms bias correction needs.
pub fn before_calibration(
    fused: &Graph,
    o: &CalibOptions,
    metrics: &mut Map<String, Value>,
) -> Result<(Graph, BTreeSet<TensorRef>)> {
    let g = if o.equalize {
        let (g, r) = super::equalize::equalize(fused)?;
        metrics.insert(
            "equalized_pairs".into(),
            r.pairs.iter().map(|(a, b)| json!([a, b])).collect(),
        );
        metrics.insert(
            "equalize_skipped".into(),
            r.skipped
                .iter()
                .map(|(a, b, why)| json!({"pair": [a, b], "reason": why}))
                .collect(),
        );
        g
    } else {
        fused.clone()
    };
    let per_channel = if o.bias_correction {
        super::bias_correction::layer_inputs(&g)?
    } else {
        BTreeSet::new()
    };
    Ok((g, per_channel))
}

/// The ranges `o.method` derives from `stats`, and the graph with biases corrected
/// if asked.
pub fn after_calibration(
    g: &Graph,
    stats: Stats,
    o: &CalibOptions,
    per_channel_dense: bool,
    exclude: &HashSet<String>,
    metrics: &mut Map<String, Value>,
) -> Result<(Graph, Stats)> {
    let p = o.percentile.unwrap_or(DEFAULT_PERCENTILE);
    if o.method == Method::Percentile {
        metrics.insert("percentile".into(), p.into());
    }
    let mut stats = stats.with_method(o.method, p);
    if o.method == Method::Auto {
        let narrowed = super::upstream::narrow(g, &mut stats)?;
        metrics.insert(
            "auto_narrowed".into(),
            narrowed
                .iter()
                .map(|(t, old, new)| json!({"tensor": t, "from": [old.min, old.max], "to": [new.min, new.max]}))
                .collect(),
        );
    }
    if !o.bias_correction {
        return Ok((g.clone(), stats));
    }
    let (g, r) = super::bias_correction::correct(g, &stats, per_channel_dense, exclude)?;
    metrics.insert("bias_corrected_layers".into(), r.layers.into());
    metrics.insert(
        "bias_max_relative_shift".into(),
        r.max_relative_shift.into(),
    );
    Ok((g, stats))
}
