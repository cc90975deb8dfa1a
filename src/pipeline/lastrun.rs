//! The outcome of a pipeline's last run, kept in the cache so that a command that
//! needs built stages (`compare`, `eval`) can say *why* they are not built.
//!
//! `<cache>/v1/runs/<pipeline>.json`: written at the end of every run (under the run
//! lock), read by nobody else. It describes that run only; the recipe may have
//! changed since, which the messages built from it say.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::fsutil;
use super::recipe::Recipe;
use super::report::{RunReport, StageStatus};
use super::store::{Store, LAYOUT};

#[derive(Debug, Serialize, Deserialize)]
struct LastRun {
    pipeline: String,
    ok: bool,
    /// (stage id, first line of its error) of the stages that failed.
    failed: Vec<(String, String)>,
    skipped: usize,
}

fn path(cache_dir: &std::path::Path, pipeline: &str) -> PathBuf {
    fsutil::absolute(cache_dir)
        .join(LAYOUT)
        .join("runs")
        .join(format!("{pipeline}.json"))
}

/// Records `report` as the pipeline's last run. Best effort: a failure to record
/// only loses the explanation later.
pub fn record(store: &Store, report: &RunReport) -> crate::error::Result<()> {
    let failed = report
        .stages
        .iter()
        .filter(|s| s.status == StageStatus::Failed)
        .map(|s| {
            let e = s
                .error
                .as_deref()
                .unwrap_or("")
                .lines()
                .next()
                .unwrap_or("");
            (s.id.clone(), fsutil::shorten(e))
        })
        .collect();
    let skipped = report
        .stages
        .iter()
        .filter(|s| s.status == StageStatus::Skipped)
        .count();
    let rec = LastRun {
        pipeline: report.pipeline.clone(),
        ok: report.ok,
        failed,
        skipped,
    };
    let p = path(store.root(), &report.pipeline);
    if let Some(dir) = p.parent() {
        fsutil::create_dir_all(dir)?;
    }
    let bytes = serde_json::to_vec_pretty(&rec)
        .map_err(|e| crate::error::Error::msg(format!("last run record: {e}")))?;
    fsutil::write_atomic(&store.tmp_dir(), &p, &bytes, &|| {})
}

/// A sentence for "stages X are not built": what the last run did, if it failed.
/// `None` when there is no record or the last run succeeded (then the recipe or its
/// inputs changed since, and `qpipe status` says what).
pub fn why_not_built(recipe: &Recipe) -> Option<String> {
    let bytes = fsutil::read_optional(&path(&recipe.cache_dir, &recipe.name)).ok()??;
    let rec: LastRun = serde_json::from_slice(&bytes).ok()?;
    if rec.ok {
        return None;
    }
    let failed: Vec<String> = rec
        .failed
        .iter()
        .map(|(id, e)| {
            // A stage's error already starts with its name; say it once.
            let e = e.strip_prefix(&format!("stage '{id}': ")).unwrap_or(e);
            format!("stage '{id}' failed: {e}")
        })
        .collect();
    let what = if failed.is_empty() {
        "stopped before every stage ran".to_string()
    } else {
        failed.join("; ")
    };
    let skipped = match rec.skipped {
        0 => String::new(),
        n => format!(" ({n} stage(s) skipped after it)"),
    };
    Some(format!(
        "the last run of pipeline '{}' failed: {what}{skipped}. Fix that and run `qpipe run {}` again (it shows the full error; `qpipe status {}` says what is stale)",
        rec.pipeline,
        recipe.path.display(),
        recipe.path.display()
    ))
}
