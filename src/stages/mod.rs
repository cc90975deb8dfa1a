//! Stage plugins. Each stage kind lives in its own file and is listed once in
//! [`registry::REGISTRY`]; the pipeline knows stages only through [`Stage`].

pub mod canon;
pub mod export_graphdef;
pub mod export_tflite;
pub mod fp16_cast;
pub mod freeze;
pub mod op_support;
pub mod quantize_int8;
pub mod registry;
pub mod strip_training;
pub mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

use crate::error::Result;
use crate::ir::Graph;
use crate::spec::{DatasetSpec, ModelSpec};

/// What a stage produces and the cache stores.
#[derive(Debug, Clone)]
pub enum Artifact {
    Graph(Arc<Graph>),
    /// A report with no model, e.g. what `validate` measured.
    Report(serde_json::Value),
}

impl Artifact {
    pub fn graph(&self) -> Option<&Arc<Graph>> {
        match self {
            Artifact::Graph(g) => Some(g),
            Artifact::Report(_) => None,
        }
    }

    pub fn report(&self) -> Option<&serde_json::Value> {
        match self {
            Artifact::Report(r) => Some(r),
            Artifact::Graph(_) => None,
        }
    }
}

/// A file a stage asks to be written under the recipe's `out_dir`.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputFile {
    /// Relative to `out_dir`, as written in the recipe.
    pub path: PathBuf,
    pub bytes: Vec<u8>,
}

/// The result of running a stage.
#[derive(Debug, Clone)]
pub struct StageOutput {
    pub artifact: Artifact,
    /// Numbers and facts for `--json` and the summary table. Keys are stable names.
    pub metrics: serde_json::Map<String, serde_json::Value>,
    pub files: Vec<OutputFile>,
}

/// What a stage reads besides its own config.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StageDeps {
    /// (config key, upstream stage id), e.g. `("input", "strip")`.
    pub stages: Vec<(String, String)>,
    /// Names of `[datasets.*]` the stage reads.
    pub datasets: Vec<String>,
    /// Whether it reads the `[model]` files.
    pub model: bool,
    /// Files it writes under `out_dir`: (config key, path relative to `out_dir`). Every
    /// [`OutputFile`] a run returns must be declared here; the pipeline checks the paths
    /// before anything runs and restores cached outputs to exactly these paths.
    pub outputs: Vec<(String, PathBuf)>,
}

/// A store for intermediate results a stage wants cached on their own key (for
/// example calibration statistics), so that a change to later settings does not
/// redo them. The pipeline provides it; `key` must describe everything the value
/// depends on beyond the stage's upstream artifacts.
pub trait Memo: Sync {
    fn get_or_compute(
        &self,
        name: &str,
        key: &[u8],
        compute: &mut dyn FnMut() -> Result<Vec<u8>>,
    ) -> Result<Vec<u8>>;

    /// The content hash of the upstream artifact under config key `key`, when the
    /// pipeline knows it (a stage run outside a pipeline may not: then nothing it
    /// computes from that artifact can be shared).
    fn input_digest(&self, _key: &str) -> Option<String> {
        None
    }

    /// Like [`Memo::get_or_compute`], but shared by every stage of any kind, in this
    /// run and later ones, that asks with the same `name` and `key`: `key` must
    /// describe everything the value depends on (qpipe's version aside, which the
    /// pipeline adds). Stages asking at once compute it once. Without a store, computes.
    fn get_or_compute_shared(
        &self,
        _name: &str,
        _key: &[u8],
        compute: &mut dyn FnMut() -> Result<Vec<u8>>,
    ) -> Result<Vec<u8>> {
        compute()
    }
}

/// Everything a stage may look at while it runs.
pub struct StageContext<'a> {
    pub id: &'a str,
    pub model: &'a ModelSpec,
    pub datasets: &'a BTreeMap<String, DatasetSpec>,
    /// Upstream artifacts by the config key that named them.
    pub inputs: BTreeMap<String, Arc<Artifact>>,
    pub memo: &'a dyn Memo,
    /// Counts of long work (bars on a terminal, nothing otherwise).
    pub progress: &'a crate::progress::Progress,
}

impl StageContext<'_> {
    /// The graph an upstream stage produced under config key `key`.
    pub fn input_graph(&self, key: &str) -> Result<Arc<Graph>> {
        match self.inputs.get(key).map(|a| a.as_ref()) {
            Some(Artifact::Graph(g)) => Ok(g.clone()),
            Some(Artifact::Report(_)) => Err(crate::Error::msg(format!(
                "stage '{}': input '{key}' is a report, not a model",
                self.id
            ))),
            None => Err(crate::Error::msg(format!(
                "stage '{}': no input '{key}'",
                self.id
            ))),
        }
    }
}

/// A stage kind. Implementations are pure functions of their config, their inputs
/// and the files named by [`StageDeps`]: that is what makes caching them sound.
///
/// A stage does not know its kind's name: the [`registry`] entry that built it does.
pub trait Stage: Send + Sync {
    /// Bumped whenever the stage's output for the same inputs may change.
    fn version(&self) -> u32;
    fn deps(&self) -> StageDeps;
    /// The typed config as canonical JSON (what the cache key and `status` explain use).
    fn config(&self) -> serde_json::Value;
    fn run(&self, ctx: &StageContext) -> Result<StageOutput>;
    /// What the stage is to `qpipe compare`, which reads stages only through this.
    fn role(&self) -> Role;
}

/// What a stage is among a recipe's model variants (see [`Stage::role`]). Config keys
/// name the upstream stages, as in [`StageDeps::stages`].
#[derive(Debug, Clone, PartialEq)]
pub enum Role {
    /// Builds a model variant. `label` names it in a comparison (`float32`, `fp16`,
    /// `int8 DEFAULT`); only a `float` variant may stand in as the float baseline.
    Model { label: String, float: bool },
    /// Passes on the model under config key `input` unchanged (writing it somewhere, say).
    SameModel { input: &'static str },
    /// Writes the model under config key `input` as a `.tflite` file; metric `bytes` is its size.
    TfliteExport { input: &'static str },
    /// Measures the model under `candidate` against the one under `reference` on a data
    /// set: metrics `samples`, `reference_accuracy`, `candidate_accuracy`, `accuracy_drop`,
    /// `agreement`, `max_abs_error`, `mean_abs_error`, and a report with a `layers` table.
    Validation {
        reference: &'static str,
        candidate: &'static str,
    },
    /// Neither builds nor judges a model.
    Other,
}

/// A typed config as the canonical JSON [`Stage::config`] returns: unlike
/// `serde_json::to_value`, it keeps NaN and ±inf apart from an absent value
/// ([`canon`]).
pub fn config_json<T: Serialize>(config: &T) -> serde_json::Value {
    canon::to_value(config)
        .unwrap_or_else(|e| serde_json::json!({ "$unserializable config": e.to_string() }))
}

/// A stage's table from the recipe (without `kind` and `matrix`), keeping source
/// positions so that a config error can name the recipe line, column and key.
#[derive(Debug, Clone)]
pub struct ConfigTable<'a> {
    table: Spanned<DeTable<'a>>,
}

impl<'a> ConfigTable<'a> {
    pub fn new(table: Spanned<DeTable<'a>>) -> Self {
        ConfigTable { table }
    }

    /// Parses a TOML snippet as a stage table (for tests and programmatic recipes).
    pub fn parse(toml: &'a str) -> Result<Self, ConfigError> {
        Ok(ConfigTable {
            table: DeTable::parse(toml)?,
        })
    }

    pub fn table(&self) -> &DeTable<'a> {
        self.table.get_ref()
    }

    /// Byte range of the whole table in the recipe.
    pub fn span(&self) -> Range<usize> {
        self.table.span()
    }

    /// The value at `key`, or at a dotted path into sub-tables (`fallback.dataset`).
    pub fn get(&self, key: &str) -> Option<&Spanned<DeValue<'a>>> {
        lookup(self.table.get_ref(), key)
    }

    /// A string value, if `key` is present and holds one.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(|v| v.get_ref().as_str())
    }

    /// An error about `key`, pointing at its value in the recipe (for checks serde cannot express).
    pub fn error(&self, key: &str, message: impl fmt::Display) -> ConfigError {
        ConfigError {
            message: message.to_string(),
            key: Some(key.to_string()),
            span: self.get(key).map(|v| v.span()),
        }
    }
}

/// The value at `key` in `table`, or at a dotted path into its sub-tables: stage
/// deps and config errors may name a key of a sub-table (`fallback.reference`).
pub fn lookup<'s, 'a>(table: &'s DeTable<'a>, key: &str) -> Option<&'s Spanned<DeValue<'a>>> {
    if let Some(v) = table.get(key) {
        return Some(v);
    }
    let (head, rest) = key.split_once('.')?;
    match table.get(head)?.get_ref() {
        DeValue::Table(t) => lookup(t, rest),
        _ => None,
    }
}

/// [`lookup`], for changing the value.
pub fn lookup_mut<'s, 'a>(
    table: &'s mut DeTable<'a>,
    key: &str,
) -> Option<&'s mut Spanned<DeValue<'a>>> {
    if table.contains_key(key) {
        return table.get_mut(key);
    }
    let (head, rest) = key.split_once('.')?;
    match table.get_mut(head)?.get_mut() {
        DeValue::Table(t) => lookup_mut(t, rest),
        _ => None,
    }
}

/// A stage config that does not fit the stage's typed config.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub message: String,
    /// The config key it is about, when known (the recipe finds it from `span` otherwise).
    pub key: Option<String>,
    /// Byte range in the recipe.
    pub span: Option<Range<usize>>,
}

impl From<toml::de::Error> for ConfigError {
    fn from(e: toml::de::Error) -> Self {
        ConfigError {
            message: e.message().to_string(),
            key: None,
            span: e.span(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(k) => write!(f, "{k}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// Parses a stage's config table into its typed form (unknown keys are denied by the
/// type). Errors carry the position of the offending key or value.
pub fn parse_config<T: DeserializeOwned>(table: &ConfigTable) -> Result<T, ConfigError> {
    let value = Spanned::new(table.span(), DeValue::Table(table.table().clone()));
    Ok(T::deserialize(ValueDeserializer::from(value))?)
}
