//! Small stage kinds (`t_load`, `t_map`, `t_calib`, `t_export`, `t_gate`) that exercise
//! every engine path (model files, datasets, memo, outputs, reports, failures) without
//! the TensorFlow importer, and [`TEST_REGISTRY`] listing them.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use qpipe::ir::{Attr, Graph, Node, Tensor};
use qpipe::spec::ModelSource;
use qpipe::stages::registry::StageFactory;
use qpipe::stages::{
    parse_config, Artifact, ConfigError, ConfigTable, OutputFile, Role, Stage, StageContext,
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
        ModelSource::SavedModel { dir, .. } => {
            let mut v = vec![dir.join("saved_model.pb")];
            let vars = dir.join("variables");
            let mut files: Vec<PathBuf> = std::fs::read_dir(&vars)
                .map(|d| d.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            files.sort();
            v.extend(files);
            v
        }
    }
}

impl Stage for Load {
    fn role(&self) -> Role {
        Role::Model {
            label: "float32".into(),
            float: true,
        }
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
    fn role(&self) -> Role {
        Role::Model {
            label: "mapped".into(),
            float: true,
        }
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
    fn role(&self) -> Role {
        Role::Model {
            label: "calibrated".into(),
            float: false,
        }
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
    fn role(&self) -> Role {
        Role::Other
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
    fn role(&self) -> Role {
        Role::Other
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
