//! Shared helpers for the pipeline tests: small stage kinds that exercise every engine
//! path (model files, datasets, memo, outputs, reports, failures) without needing the
//! TensorFlow importer, a project directory builder, and a child-process runner.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use qpipe::ir::{Attr, Graph, Node, Tensor};
use qpipe::pipeline::{self, Event, Observer, Recipe, RunOptions, RunReport};
use qpipe::stages::registry::StageFactory;
use qpipe::stages::{
    parse_config, Artifact, ConfigError, ConfigTable, ModelSource, OutputFile, Stage, StageContext,
    StageDeps, StageOutput,
};

pub const TEST_REGISTRY: &[StageFactory] = &[
    StageFactory {
        kind: "t_load",
        build: build_load,
    },
    StageFactory {
        kind: "t_map",
        build: build_map,
    },
    StageFactory {
        kind: "t_calib",
        build: build_calib,
    },
    StageFactory {
        kind: "t_export",
        build: build_export,
    },
    StageFactory {
        kind: "t_gate",
        build: build_gate,
    },
];

fn metrics(pairs: &[(&str, serde_json::Value)]) -> serde_json::Map<String, serde_json::Value> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn sleep(ms: u64) {
    if ms > 0 {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

fn one() -> f64 {
    1.0
}

// ---- t_load: reads every model file into a Const ----

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadConfig {
    #[serde(default = "one")]
    scale: f64,
    /// Changes the key but not the artifact (for early cut-off).
    #[serde(default)]
    note: String,
    #[serde(default)]
    sleep_ms: u64,
    /// Appends a byte to the model's `.meta` while running (input changed mid-run).
    #[serde(default)]
    mutate_model: bool,
}

struct Load(LoadConfig);

fn build_load(t: &ConfigTable) -> Result<Box<dyn Stage>, ConfigError> {
    let c: LoadConfig = parse_config(t)?;
    if c.scale <= 0.0 {
        return Err(t.error("scale", "must be positive"));
    }
    Ok(Box::new(Load(c)))
}

pub fn model_file_paths(source: &ModelSource) -> Vec<PathBuf> {
    match source {
        ModelSource::Graph(p) => vec![p.clone()],
        ModelSource::Checkpoint(prefix) => {
            let dir = prefix.parent().unwrap();
            let base = prefix.file_name().unwrap().to_string_lossy().into_owned();
            let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .unwrap()
                        .to_string_lossy()
                        .starts_with(&format!("{base}."))
                })
                .collect();
            v.sort();
            v
        }
    }
}

impl Stage for Load {
    fn kind(&self) -> &'static str {
        "t_load"
    }
    fn version(&self) -> u32 {
        1
    }
    fn deps(&self) -> StageDeps {
        StageDeps {
            model: true,
            ..StageDeps::default()
        }
    }
    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.0).unwrap()
    }
    fn run(&self, ctx: &StageContext) -> qpipe::Result<StageOutput> {
        let mut bytes = Vec::new();
        for p in model_file_paths(&ctx.model.source) {
            bytes.extend(qpipe::error::read_file(&p)?);
        }
        sleep(self.0.sleep_ms);
        if self.0.mutate_model {
            if let ModelSource::Checkpoint(prefix) = &ctx.model.source {
                let meta = PathBuf::from(format!("{}.meta", prefix.display()));
                let mut f = std::fs::OpenOptions::new().append(true).open(meta).unwrap();
                f.write_all(b"!").unwrap();
            }
        }
        let n = bytes.len();
        let g = Graph {
            nodes: vec![
                Node::constant("model_bytes", Tensor::from_vec(vec![n], &bytes)),
                Node::constant("scale", Tensor::scalar(self.0.scale as f32)),
            ],
            inputs: vec![],
            outputs: vec![],
            producer: 1,
            library: vec![],
        };
        Ok(StageOutput {
            artifact: Artifact::Graph(Arc::new(g)),
            metrics: metrics(&[("bytes", n.into())]),
            files: vec![],
        })
    }
}

// ---- t_map: appends a node ----

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MapConfig {
    input: String,
    tag: String,
    #[serde(default)]
    note: String,
    #[serde(default)]
    fail: bool,
    #[serde(default)]
    panic: bool,
    #[serde(default)]
    sleep_ms: u64,
}

struct Map(MapConfig);

fn build_map(t: &ConfigTable) -> Result<Box<dyn Stage>, ConfigError> {
    Ok(Box::new(Map(parse_config(t)?)))
}

impl Stage for Map {
    fn kind(&self) -> &'static str {
        "t_map"
    }
    fn version(&self) -> u32 {
        1
    }
    fn deps(&self) -> StageDeps {
        StageDeps {
            stages: vec![("input".into(), self.0.input.clone())],
            ..StageDeps::default()
        }
    }
    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.0).unwrap()
    }
    fn run(&self, ctx: &StageContext) -> qpipe::Result<StageOutput> {
        let bar = ctx
            .progress
            .start("mapping", 1, qpipe::progress::Unit::Samples);
        sleep(self.0.sleep_ms);
        bar.inc(1);
        if self.0.fail {
            return Err(qpipe::Error::msg("t_map failed on purpose"));
        }
        if self.0.panic {
            panic!("t_map panicked on purpose");
        }
        let mut g = (*ctx.input_graph("input")?).clone();
        g.nodes.push(
            Node::new(format!("map/{}", self.0.tag), "Identity")
                .with_attr("tag", Attr::Str(self.0.tag.clone().into_bytes())),
        );
        let n = g.nodes.len();
        Ok(StageOutput {
            artifact: Artifact::Graph(Arc::new(g)),
            metrics: metrics(&[("nodes", n.into())]),
            files: vec![],
        })
    }
}

// ---- t_calib: reads a dataset, memoizes its statistics ----

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CalibConfig {
    input: String,
    dataset: String,
    strategy: String,
    /// Each memo computation appends a line here (to count them).
    #[serde(default)]
    count_file: Option<PathBuf>,
}

struct Calib(CalibConfig);

fn build_calib(t: &ConfigTable) -> Result<Box<dyn Stage>, ConfigError> {
    let c: CalibConfig = parse_config(t)?;
    if !["DEFAULT", "OPTIMIZE_FOR_SIZE", "OPTIMIZE_FOR_LATENCY"].contains(&c.strategy.as_str()) {
        return Err(t.error("strategy", format!("unknown strategy '{}'", c.strategy)));
    }
    Ok(Box::new(Calib(c)))
}

impl Stage for Calib {
    fn kind(&self) -> &'static str {
        "t_calib"
    }
    fn version(&self) -> u32 {
        1
    }
    fn deps(&self) -> StageDeps {
        StageDeps {
            stages: vec![("input".into(), self.0.input.clone())],
            datasets: vec![self.0.dataset.clone()],
            ..StageDeps::default()
        }
    }
    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.0).unwrap()
    }
    fn run(&self, ctx: &StageContext) -> qpipe::Result<StageOutput> {
        let ds = ctx
            .datasets
            .get(&self.0.dataset)
            .ok_or_else(|| qpipe::Error::msg("dataset not in context"))?;
        let stats = ctx.memo.get_or_compute("stats", b"v1", &mut || {
            if let Some(f) = &self.0.count_file {
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(f)
                    .unwrap();
                writeln!(f, "computed").unwrap();
            }
            let mut h = blake3::Hasher::new();
            for p in ds.tensors.values().chain(ds.labels.iter()) {
                h.update(&qpipe::error::read_file(p)?);
            }
            Ok(h.finalize().as_bytes().to_vec())
        })?;
        let mut g = (*ctx.input_graph("input")?).clone();
        g.nodes.push(Node::constant(
            format!("calib/{}", self.0.strategy),
            Tensor::from_vec(vec![stats.len()], &stats),
        ));
        Ok(StageOutput {
            artifact: Artifact::Graph(Arc::new(g)),
            metrics: metrics(&[("strategy", self.0.strategy.clone().into())]),
            files: vec![],
        })
    }
}

// ---- t_export: writes the input graph to a file ----

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportConfig {
    input: String,
    path: PathBuf,
    #[serde(default)]
    extra_output: bool,
}

struct Export(ExportConfig);

fn build_export(t: &ConfigTable) -> Result<Box<dyn Stage>, ConfigError> {
    Ok(Box::new(Export(parse_config(t)?)))
}

impl Stage for Export {
    fn kind(&self) -> &'static str {
        "t_export"
    }
    fn version(&self) -> u32 {
        1
    }
    fn deps(&self) -> StageDeps {
        StageDeps {
            stages: vec![("input".into(), self.0.input.clone())],
            outputs: vec![("path".into(), self.0.path.clone())],
            ..StageDeps::default()
        }
    }
    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.0).unwrap()
    }
    fn run(&self, ctx: &StageContext) -> qpipe::Result<StageOutput> {
        let g = ctx.input_graph("input")?;
        let mut bytes = b"TEST".to_vec();
        bytes.extend(qpipe::ir::serialize::encode(&g));
        let mut files = vec![OutputFile {
            path: self.0.path.clone(),
            bytes,
        }];
        if self.0.extra_output {
            files.push(OutputFile {
                path: "undeclared.bin".into(),
                bytes: vec![1],
            });
        }
        let n = files[0].bytes.len();
        Ok(StageOutput {
            artifact: Artifact::Graph(g),
            metrics: metrics(&[("bytes", n.into())]),
            files,
        })
    }
}

// ---- t_gate: compares two graphs, may fail ----

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct GateConfig {
    reference: String,
    candidate: String,
    #[serde(default)]
    max_extra_nodes: Option<u64>,
}

struct Gate(GateConfig);

fn build_gate(t: &ConfigTable) -> Result<Box<dyn Stage>, ConfigError> {
    Ok(Box::new(Gate(parse_config(t)?)))
}

impl Stage for Gate {
    fn kind(&self) -> &'static str {
        "t_gate"
    }
    fn version(&self) -> u32 {
        1
    }
    fn deps(&self) -> StageDeps {
        StageDeps {
            stages: vec![
                ("reference".into(), self.0.reference.clone()),
                ("candidate".into(), self.0.candidate.clone()),
            ],
            ..StageDeps::default()
        }
    }
    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.0).unwrap()
    }
    fn run(&self, ctx: &StageContext) -> qpipe::Result<StageOutput> {
        let r = ctx.input_graph("reference")?.nodes.len() as u64;
        let c = ctx.input_graph("candidate")?.nodes.len() as u64;
        let extra = c.saturating_sub(r);
        if let Some(max) = self.0.max_extra_nodes {
            if extra > max {
                return Err(qpipe::Error::msg(format!(
                    "gate: {extra} extra nodes > {max}"
                )));
            }
        }
        let report = serde_json::json!({"reference_nodes": r, "candidate_nodes": c, "ratio": c as f64 / r as f64});
        Ok(StageOutput {
            artifact: Artifact::Report(report),
            metrics: metrics(&[
                ("extra_nodes", extra.into()),
                ("ratio", (c as f64 / r as f64).into()),
            ]),
            files: vec![],
        })
    }
}

// ---- project directories ----

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh directory under cargo's per-target temporary directory.
pub fn tmp_dir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "{name}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Deterministic filler bytes.
pub fn bytes(seed: u8, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A project: a checkpoint with two data shards, three dataset files, a recipe.
pub struct Project {
    pub dir: PathBuf,
    pub recipe: PathBuf,
}

/// The standard test recipe: load → map (strip) → calib (int8, matrix over two
/// strategies) → export per variant; a gate per variant; a float export.
pub const RECIPE: &str = r#"
[pipeline]
name = "test_pipeline"

[model]
checkpoint = "ckpt/best_validation"
inputs = ["input_x"]
outputs = ["out"]

[datasets.calib]
input_x = "data/calib_x.npy"

[datasets.eval]
input_x = "data/eval_x.npy"
labels = "data/eval_y.npy"

[stages.freeze]
kind = "t_load"

[stages.strip]
kind = "t_map"
input = "freeze"
tag = "strip"

[stages.float_out]
kind = "t_export"
input = "strip"
path = "float.bin"

[stages.int8]
kind = "t_calib"
input = "strip"
dataset = "calib"
matrix = { strategy = ["DEFAULT", "OPTIMIZE_FOR_SIZE"] }

[stages.int8_out]
kind = "t_export"
input = "int8"
path = "int8_${strategy}.bin"

[stages.check]
kind = "t_gate"
reference = "strip"
candidate = "int8"
max_extra_nodes = 1
"#;

impl Project {
    pub fn new(name: &str) -> Project {
        Project::with_recipe(name, RECIPE)
    }

    pub fn with_recipe(name: &str, recipe: &str) -> Project {
        let dir = tmp_dir(name);
        std::fs::create_dir_all(dir.join("ckpt")).unwrap();
        std::fs::create_dir_all(dir.join("data")).unwrap();
        std::fs::write(dir.join("ckpt/best_validation.meta"), bytes(1, 300)).unwrap();
        std::fs::write(dir.join("ckpt/best_validation.index"), bytes(2, 100)).unwrap();
        std::fs::write(
            dir.join("ckpt/best_validation.data-00000-of-00002"),
            bytes(3, 1000),
        )
        .unwrap();
        std::fs::write(
            dir.join("ckpt/best_validation.data-00001-of-00002"),
            bytes(4, 1000),
        )
        .unwrap();
        std::fs::write(dir.join("data/calib_x.npy"), bytes(5, 400)).unwrap();
        std::fs::write(dir.join("data/eval_x.npy"), bytes(6, 400)).unwrap();
        std::fs::write(dir.join("data/eval_y.npy"), bytes(7, 40)).unwrap();
        let p = Project {
            recipe: dir.join("recipe.toml"),
            dir,
        };
        p.write_recipe(recipe);
        p
    }

    pub fn write_recipe(&self, text: &str) {
        std::fs::write(&self.recipe, text).unwrap();
    }

    pub fn recipe_text(&self) -> String {
        std::fs::read_to_string(&self.recipe).unwrap()
    }

    /// Edits the recipe with a textual replacement (which must apply).
    pub fn edit_recipe(&self, from: &str, to: &str) {
        let t = self.recipe_text();
        assert!(t.contains(from), "recipe has no {from:?}");
        self.write_recipe(&t.replacen(from, to, 1));
    }

    pub fn load(&self) -> Recipe {
        let text = self.recipe_text();
        let mut r =
            Recipe::parse(&text, &self.recipe, TEST_REGISTRY).unwrap_or_else(|e| panic!("{e}"));
        r.cache_dir = self.dir.join(".qpipe");
        r
    }

    pub fn cache(&self) -> PathBuf {
        self.dir.join(".qpipe")
    }

    pub fn out(&self, rel: &str) -> PathBuf {
        self.dir.join("out").join(rel)
    }

    /// Runs in process; returns the report and what the observer saw.
    pub fn run(&self) -> (RunReport, Seen) {
        self.run_with(&RunOptions {
            jobs: 2,
            ..RunOptions::default()
        })
    }

    pub fn run_with(&self, opts: &RunOptions) -> (RunReport, Seen) {
        let seen = Seen::default();
        let report = pipeline::run(&self.load(), opts, &seen).unwrap_or_else(|e| panic!("{e}"));
        (report, seen)
    }

    /// Every output file under out/, with its bytes.
    pub fn outputs(&self) -> BTreeMap<String, Vec<u8>> {
        let mut m = BTreeMap::new();
        for e in walkdir::WalkDir::new(self.dir.join("out"))
            .into_iter()
            .flatten()
        {
            // The out_dir manifest is qpipe's bookkeeping, not an output.
            let manifest = e
                .file_name()
                .to_string_lossy()
                .starts_with(".qpipe-manifest-");
            if e.file_type().is_file() && !manifest {
                let rel = e.path().strip_prefix(self.dir.join("out")).unwrap();
                m.insert(
                    rel.to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                );
            }
        }
        m
    }
}

/// Collects events.
#[derive(Default)]
pub struct Seen {
    pub warnings: Mutex<Vec<String>>,
    pub dirty: Mutex<Vec<(String, String)>>,
    pub restored: Mutex<Vec<PathBuf>>,
}

impl Seen {
    pub fn warnings(&self) -> Vec<String> {
        self.warnings.lock().unwrap().clone()
    }
    pub fn reason(&self, id: &str) -> Option<String> {
        self.dirty
            .lock()
            .unwrap()
            .iter()
            .find(|(i, _)| i == id)
            .map(|(_, r)| r.clone())
    }
    pub fn restored(&self) -> Vec<PathBuf> {
        self.restored.lock().unwrap().clone()
    }
}

impl Observer for Seen {
    fn event(&self, e: Event<'_>) {
        match e {
            Event::Warning(w) => self.warnings.lock().unwrap().push(w.to_string()),
            Event::Dirty { id, reason } => self
                .dirty
                .lock()
                .unwrap()
                .push((id.to_string(), reason.to_string())),
            Event::Restored { path, .. } => self.restored.lock().unwrap().push(path.to_path_buf()),
            _ => {}
        }
    }
}

/// Sorted ids of stages with the given status.
pub fn ids(report: &RunReport, status: pipeline::StageStatus) -> Vec<String> {
    let mut v: Vec<String> = report
        .with_status(status)
        .into_iter()
        .map(String::from)
        .collect();
    v.sort();
    v
}

pub fn all_ids(report: &RunReport) -> Vec<String> {
    let mut v: Vec<String> = report.stages.iter().map(|s| s.id.clone()).collect();
    v.sort();
    v
}

pub fn sorted(v: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

/// Flips one bit of a file in place.
pub fn flip_bit(path: &Path, at: usize) {
    let mut b = std::fs::read(path).unwrap();
    let i = at % b.len();
    b[i] ^= 0x10;
    std::fs::write(path, b).unwrap();
}

/// Files under `dir/v1/<sub>` (recursively).
pub fn cache_files(cache: &Path, sub: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = walkdir::WalkDir::new(cache.join("v1").join(sub))
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .map(|e| e.path().to_path_buf())
        .collect();
    v.sort();
    v
}

// ---- child processes running the CLI with the test stage kinds ----

/// A command that runs `qpipe ARGS` (with [`TEST_REGISTRY`]) in a child process: the
/// current test binary re-executed on its `child_qpipe` entry point, which the calling
/// test file must define with [`child_entry`].
pub fn qpipe_child(args: &[&str]) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args([
        "child_qpipe",
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
        "-q",
    ]);
    c.env("QPIPE_CHILD_ARGS", serde_json::to_string(args).unwrap());
    c.env_remove("QPIPE_CACHE_DIR");
    c.env_remove("QPIPE_TEST_PAUSE");
    c
}

/// The body of the `child_qpipe` entry point.
pub fn child_entry() {
    let Ok(args) = std::env::var("QPIPE_CHILD_ARGS") else {
        return;
    };
    let args: Vec<String> = serde_json::from_str(&args).unwrap();
    let mut full = vec!["qpipe".to_string()];
    full.extend(args);
    let code = qpipe::cli::main(full.into_iter().map(Into::into).collect(), TEST_REGISTRY);
    std::process::exit(code);
}

/// A child's stdout without the test harness's preamble.
pub fn child_stdout(out: &Output) -> String {
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.strip_prefix("\nrunning 1 test\n")
        .map(str::to_string)
        .unwrap_or(s)
}

/// The JSON document a `run --json` child printed.
pub fn child_json(out: &Output) -> serde_json::Value {
    let s = child_stdout(out);
    let start = s.find('{').unwrap_or_else(|| panic!("no JSON in {s:?}"));
    serde_json::from_str(s[start..].trim()).unwrap_or_else(|e| panic!("{e}: {s}"))
}
