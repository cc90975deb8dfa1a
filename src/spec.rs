//! What a recipe names outside the pipeline: the model's files and tensors, and the
//! data sets. Below `formats`, `kernels` and `stages`, which all read them.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// Where the recipe's model comes from; paths are absolute (resolved against the recipe).
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// A TF1 checkpoint prefix: `<prefix>.meta`, `<prefix>.index`, `<prefix>.data-*`.
    Checkpoint(PathBuf),
    /// An already frozen GraphDef (`.pb`).
    Graph(PathBuf),
    /// A TF2 SavedModel directory (`saved_model.pb`, `variables/`): the signature and
    /// tag set to read. The model's inputs and outputs are the signature's keys.
    SavedModel {
        dir: PathBuf,
        signature: String,
        tags: Vec<String>,
    },
}

/// The recipe's `[model]` table, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub source: ModelSource,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    /// Input name → dims fixing unknown dimensions (-1 stays unknown).
    pub input_shapes: BTreeMap<String, Vec<i64>>,
}

/// One `[datasets.NAME]` table, resolved: model input name → `.npy` file, plus optional labels.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DatasetSpec {
    pub tensors: BTreeMap<String, PathBuf>,
    pub labels: Option<PathBuf>,
}
