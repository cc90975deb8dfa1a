//! Run and status reports: the `--json` documents and the terminal tables.

use std::fmt::Write;

use serde::Serialize;
use serde_json::Value;

use super::explain::DirtyReason;
use super::recipe::RecipeStage;
use super::store::short;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StageStatus {
    Ran,
    Cached,
    Failed,
    Skipped,
}

impl StageStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            StageStatus::Ran => "ran",
            StageStatus::Cached => "cached",
            StageStatus::Failed => "failed",
            StageStatus::Skipped => "skipped",
        }
    }
}

/// One stage of a run, as `qpipe run --json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    pub id: String,
    pub kind: String,
    pub status: StageStatus,
    pub seconds: f64,
    pub key: Option<String>,
    pub metrics: serde_json::Map<String, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For a cached stage, where the result came from: `local` or `remote`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<&'static str>,
}

/// The result of `qpipe run`.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub pipeline: String,
    pub ok: bool,
    pub stages: Vec<StageReport>,
    /// Files removed from out_dir after this successful full run: outputs an earlier
    /// run of this pipeline wrote that the recipe no longer declares (relative to out_dir).
    pub pruned: Vec<String>,
    /// The remote cache's counters (`--remote-cache`), absent without one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote: Option<Value>,
}

impl RunReport {
    pub fn stage(&self, id: &str) -> Option<&StageReport> {
        self.stages.iter().find(|s| s.id == id)
    }

    /// Ids of the stages with the given status, in recipe order.
    pub fn with_status(&self, status: StageStatus) -> Vec<&str> {
        self.stages
            .iter()
            .filter(|s| s.status == status)
            .map(|s| s.id.as_str())
            .collect()
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    /// The closing summary table.
    pub fn summary_table(&self) -> String {
        let mut rows = vec![["STAGE", "KIND", "STATUS", "TIME", "KEY", "METRICS"]
            .map(String::from)
            .to_vec()];
        for s in &self.stages {
            let metrics = if let Some(e) = &s.error {
                // The row names the stage already.
                first_line(e.strip_prefix(&format!("stage '{}': ", s.id)).unwrap_or(e))
            } else {
                render_metrics(&s.metrics)
            };
            rows.push(vec![
                s.id.clone(),
                s.kind.clone(),
                s.status.as_str().to_string(),
                if s.status == StageStatus::Skipped {
                    "-".into()
                } else {
                    format!("{:.2}s", s.seconds)
                },
                s.key.as_deref().map(short).unwrap_or("-").to_string(),
                metrics,
            ]);
        }
        let mut out = table(&rows);
        let count = |st| self.stages.iter().filter(|s| s.status == st).count();
        let _ = writeln!(
            out,
            "{}: {} stages, {} ran, {} cached, {} failed, {} skipped",
            self.pipeline,
            self.stages.len(),
            count(StageStatus::Ran),
            count(StageStatus::Cached),
            count(StageStatus::Failed),
            count(StageStatus::Skipped)
        );
        if !self.pruned.is_empty() {
            let _ = writeln!(
                out,
                "removed {} stale file(s) from out_dir (no longer declared): {}",
                self.pruned.len(),
                self.pruned.join(", ")
            );
        }
        out
    }
}

fn first_line(s: &str) -> String {
    let l = s.lines().next().unwrap_or("");
    if l.chars().count() > 100 {
        format!("{}…", l.chars().take(99).collect::<String>())
    } else {
        l.to_string()
    }
}

/// `k=v` pairs of the scalar metrics, compact.
pub fn render_metrics(m: &serde_json::Map<String, Value>) -> String {
    let parts: Vec<String> = m
        .iter()
        .filter_map(|(k, v)| match v {
            Value::Number(n) => Some(match n.as_f64() {
                Some(f) if n.is_f64() => format!("{k}={}", trim_float(f)),
                _ => format!("{k}={n}"),
            }),
            Value::Bool(b) => Some(format!("{k}={b}")),
            Value::String(s) if s.len() <= 24 => Some(format!("{k}={s}")),
            _ => None,
        })
        .collect();
    first_line(&parts.join(" "))
}

fn trim_float(f: f64) -> String {
    if f != 0.0 && (f.abs() < 1e-3 || f.abs() >= 1e6) {
        format!("{f:.3e}")
    } else {
        let s = format!("{f:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// Left-aligned columns separated by two spaces.
pub fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map(|s| s.chars().count()).unwrap_or(0))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            line.push_str(cell);
            if c + 1 < r.len() {
                line.push_str(&" ".repeat(widths[c] - cell.chars().count() + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// One stage in `qpipe status`.
#[derive(Debug, Clone, Serialize)]
pub struct StatusRow {
    pub id: String,
    pub kind: String,
    /// `fresh` or `stale`.
    pub state: &'static str,
    pub key: Option<String>,
    /// Why it is stale (or what a fresh stage's outputs need).
    pub reason: Option<String>,
}

impl StatusRow {
    pub fn fresh(s: &RecipeStage, key: String) -> Self {
        StatusRow {
            id: s.id.clone(),
            kind: s.kind.to_string(),
            state: "fresh",
            key: Some(key),
            reason: None,
        }
    }

    /// Cached, but an output file needs restoring: reported stale, as something will happen.
    pub fn fresh_but(s: &RecipeStage, key: String, problem: String) -> Self {
        StatusRow {
            id: s.id.clone(),
            kind: s.kind.to_string(),
            state: "stale",
            key: Some(key),
            reason: Some(problem),
        }
    }

    pub fn stale(s: &RecipeStage, key: Option<String>, reason: DirtyReason) -> Self {
        StatusRow {
            id: s.id.clone(),
            kind: s.kind.to_string(),
            state: "stale",
            key,
            reason: Some(reason.to_string()),
        }
    }
}

/// The result of `qpipe status`.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub pipeline: String,
    pub stages: Vec<StatusRow>,
}

impl StatusReport {
    pub fn all_fresh(&self) -> bool {
        self.stages.iter().all(|s| s.state == "fresh")
    }

    pub fn row(&self, id: &str) -> Option<&StatusRow> {
        self.stages.iter().find(|s| s.id == id)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    pub fn render(&self) -> String {
        let mut rows = vec![["STAGE", "KIND", "STATE", "KEY", "REASON"]
            .map(String::from)
            .to_vec()];
        for s in &self.stages {
            rows.push(vec![
                s.id.clone(),
                s.kind.clone(),
                s.state.to_string(),
                s.key.as_deref().map(short).unwrap_or("-").to_string(),
                s.reason.clone().unwrap_or_default(),
            ]);
        }
        let mut out = table(&rows);
        let stale = self.stages.iter().filter(|s| s.state == "stale").count();
        let _ = writeln!(
            out,
            "{}: {} fresh, {} stale",
            self.pipeline,
            self.stages.len() - stale,
            stale
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_the_documented_shape() {
        let mut metrics = serde_json::Map::new();
        metrics.insert("accuracy".into(), serde_json::json!(0.9375));
        let r = RunReport {
            pipeline: "p".into(),
            ok: false,
            stages: vec![
                StageReport {
                    id: "a".into(),
                    kind: "freeze".into(),
                    status: StageStatus::Cached,
                    seconds: 0.5,
                    key: Some("k".repeat(64)),
                    metrics,
                    error: None,
                    cache: Some("remote"),
                },
                StageReport {
                    id: "b".into(),
                    kind: "validate".into(),
                    status: StageStatus::Failed,
                    seconds: 0.0,
                    key: None,
                    metrics: Default::default(),
                    error: Some("gate".into()),
                    cache: None,
                },
            ],
            pruned: vec!["old.tflite".into()],
            remote: None,
        };
        let v: Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["pipeline"], "p");
        assert_eq!(v["ok"], false);
        assert_eq!(v["stages"][0]["status"], "cached");
        assert_eq!(v["stages"][0]["cache"], "remote");
        assert!(v["stages"][1].get("cache").is_none());
        assert!(v.get("remote").is_none());
        assert_eq!(v["stages"][0]["metrics"]["accuracy"], 0.9375);
        assert!(v["stages"][0].get("error").is_none());
        assert_eq!(v["stages"][1]["error"], "gate");
        assert!(v["stages"][1]["key"].is_null());
        assert_eq!(v["pruned"][0], "old.tflite");
        let t = r.summary_table();
        assert!(t.contains("accuracy=0.9375"), "{t}");
        assert!(
            t.contains("p: 2 stages, 0 ran, 1 cached, 1 failed, 0 skipped"),
            "{t}"
        );
        assert!(
            t.contains("removed 1 stale file(s) from out_dir (no longer declared): old.tflite"),
            "{t}"
        );
    }
}
