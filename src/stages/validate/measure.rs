//! Validate's comparison of a candidate with a reference as a function, for
//! `quantize_int8`'s accuracy-aware fallback: the same plans, feeds, arithmetic, batches
//! and class rules as the stage ([`Run::batch`]), without the per-layer table, so
//! that what the fallback tunes for is what a `validate` stage then reports.

use super::reference::RefMemo;
use super::{fraction, producer_quant, reference_source, Dataset, OutKind, Run, Runtime};
use crate::error::{Error, Result};
use crate::ir::Graph;
use crate::kernels::Plan;
use crate::spec::DatasetSpec;

/// What [`measure`] found on the first (labelled) output.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measured {
    pub samples: usize,
    /// The accuracies, when the data set has labels and the output has classes.
    pub reference_accuracy: Option<f64>,
    pub candidate_accuracy: Option<f64>,
    /// Top-1 agreement with the reference, when the output has classes.
    pub agreement: Option<f64>,
    /// Mean absolute difference from the reference's output.
    pub mean_abs_error: f64,
}

/// Runs `reference` and `candidate` on every row of `spec` as `validate` does. With
/// `memo` (the reference's on every row of `spec`, from [`super::reference::obtain`])
/// the reference does not run.
pub fn measure(
    reference: &Graph,
    candidate: &Graph,
    spec: &DatasetSpec,
    runtime: Runtime,
    memo: Option<&RefMemo>,
) -> Result<Measured> {
    if reference.outputs.is_empty() || reference.outputs.len() != candidate.outputs.len() {
        return Err(Error::msg(format!(
            "the reference has {} outputs, the candidate {}",
            reference.outputs.len(),
            candidate.outputs.len()
        )));
    }
    let (ref_fused, _) = crate::ir::passes::fuse::fuse(reference, true)?;
    let cand_in: Vec<&str> = candidate.inputs.iter().map(String::as_str).collect();
    let arith = runtime.arithmetic();
    let cand_plan = Plan::compile(candidate, &cand_in, &candidate.outputs)
        .map_err(|e| e.context("candidate"))?
        .with_arithmetic(arith);
    let ds = Dataset::open(spec)?;
    let total = ds.rows();
    if total == 0 {
        return Err(Error::usage("the data set has no rows"));
    }
    let memo = memo.filter(|m| m.rows == total);
    let (ref_plan, source) = reference_source(&ref_fused, &ds, total, arith, &[], memo)?;
    let cand_feeds = super::candidate_feeds(&ref_plan, &cand_plan, candidate)?;
    let run = Run {
        ds: &ds,
        out_quant: candidate
            .outputs
            .iter()
            .map(|o| producer_quant(candidate, o))
            .collect(),
        out_names: reference.outputs.iter().map(|o| o.to_string()).collect(),
        labelled: 0,
        ref_plan,
        cand_plan,
        cand_feeds,
        pairs: &[],
        reference: source,
    };
    let acc = run.all(total, &|_| {})?;
    let out = &acc.outputs[0];
    let classes = out.kind.unwrap_or(OutKind::Regression) != OutKind::Regression;
    let labels = classes && ds.has_labels();
    Ok(Measured {
        samples: acc.rows,
        reference_accuracy: labels.then(|| fraction(acc.ref_correct, acc.rows)),
        candidate_accuracy: labels.then(|| fraction(acc.cand_correct, acc.rows)),
        agreement: classes.then(|| fraction(out.agree, acc.rows)),
        mean_abs_error: if out.n == 0 {
            0.0
        } else {
            out.abs_err / out.n as f64
        },
    })
}
