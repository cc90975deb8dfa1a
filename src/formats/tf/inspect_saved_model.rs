//! `qpipe inspect DIR` on a SavedModel: its signatures (inputs and outputs with dtype and
//! shape), its functions and its variables with their checkpoint keys and bytes.

use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::checkpoint::Bundle;
use super::inspect::{shape_json, show_bytes, show_shape, table};
use super::proto::saved_object::Kind;
use super::saved_model::{
    checkpoint_object_graph, function_library, read_saved_model, signatures, variables_prefix,
    Signature,
};
use crate::error::{Error, Result};

/// One MetaGraphDef of a SavedModel.
#[derive(Debug, Clone, PartialEq)]
pub struct MetaGraphSummary {
    pub tags: Vec<String>,
    pub tensorflow_version: String,
    pub signatures: Vec<Signature>,
    /// Library functions: name and body node count, sorted by name.
    pub functions: Vec<(String, usize)>,
    pub variables: Vec<SavedVariableSummary>,
}

/// A variable of the saved object graph.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedVariableSummary {
    /// Object-graph node id.
    pub id: usize,
    pub name: String,
    pub dtype: String,
    pub shape: Option<Vec<i64>>,
    /// Its checkpoint key, when the checkpoint's object graph gives one.
    pub key: Option<String>,
    /// Bytes of its value in `variables/`, when the key is there.
    pub bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SavedModelSummary {
    pub dir: PathBuf,
    pub meta_graphs: Vec<MetaGraphSummary>,
    /// Shards of `variables/`, `None` when there is no `variables/`.
    pub variable_shards: Option<usize>,
}

/// Inspects a SavedModel directory. Errors name the file.
pub fn inspect_saved_model(dir: &Path) -> Result<SavedModelSummary> {
    let sm = read_saved_model(dir)?;
    let pb = super::saved_model::pb_path(dir);
    let vars_dir = dir.join("variables");
    let (bundle, ckpt) = if vars_dir.is_dir() {
        let b = Bundle::open(&variables_prefix(dir))?;
        let c = checkpoint_object_graph(&b)?;
        (Some(b), Some(c))
    } else {
        (None, None)
    };
    let mut meta_graphs = Vec::new();
    for mg in &sm.meta_graphs {
        let info = mg.meta_info_def.clone().unwrap_or_default();
        let gd = mg.graph_def.clone().unwrap_or_default();
        let lib = function_library(&gd).map_err(|e| Error::file(&pb, e))?;
        let mut functions: Vec<(String, usize)> = lib
            .iter()
            .map(|(n, f)| (n.clone(), f.node_def.len()))
            .collect();
        functions.sort();
        let mut variables = Vec::new();
        for (id, node) in mg
            .object_graph_def
            .as_ref()
            .map_or(&[][..], |o| &o.nodes[..])
            .iter()
            .enumerate()
        {
            let Some(Kind::Variable(v)) = &node.kind else {
                continue;
            };
            let key = ckpt.as_ref().and_then(|c| {
                c.nodes.get(id).and_then(|n| {
                    n.attributes
                        .iter()
                        .find(|a| a.name == "VARIABLE_VALUE")
                        .map(|a| a.checkpoint_key.clone())
                })
            });
            let bytes = key.as_ref().and_then(|k| {
                let e = bundle.as_ref()?.entry(k)?;
                Some(e.shape.iter().product::<usize>() as u64 * e.dtype.size().unwrap_or(1) as u64)
            });
            variables.push(SavedVariableSummary {
                id,
                name: v.name.clone(),
                dtype: super::proto::dtype_name(v.dtype),
                shape: v.shape.as_ref().and_then(|s| {
                    (!s.unknown_rank).then(|| s.dim.iter().map(|d| d.size).collect())
                }),
                key,
                bytes,
            });
        }
        meta_graphs.push(MetaGraphSummary {
            tags: info.tags,
            tensorflow_version: info.tensorflow_version,
            signatures: signatures(mg).map_err(|e| Error::file(&pb, e))?,
            functions,
            variables,
        });
    }
    Ok(SavedModelSummary {
        dir: dir.to_path_buf(),
        meta_graphs,
        variable_shards: bundle.as_ref().map(Bundle::num_shards),
    })
}

fn tensor_rows(ts: &[super::saved_model::SignatureTensor]) -> Vec<Vec<String>> {
    ts.iter()
        .map(|t| {
            vec![
                format!("    {}", t.key),
                t.dtype.clone(),
                show_shape(&t.shape),
                t.tensor.clone(),
            ]
        })
        .collect()
}

impl fmt::Display for SavedModelSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "SavedModel {}: {} MetaGraphDef{}",
            self.dir.display(),
            self.meta_graphs.len(),
            if self.meta_graphs.len() == 1 { "" } else { "s" }
        )?;
        for mg in &self.meta_graphs {
            writeln!(
                f,
                "tags {:?}{}",
                mg.tags,
                if mg.tensorflow_version.is_empty() {
                    String::new()
                } else {
                    format!(", TensorFlow {}", mg.tensorflow_version)
                }
            )?;
            for s in &mg.signatures {
                writeln!(f, "signature {}:", s.name)?;
                writeln!(f, "  inputs:")?;
                table(f, &tensor_rows(&s.inputs))?;
                writeln!(f, "  outputs:")?;
                table(f, &tensor_rows(&s.outputs))?;
            }
            writeln!(f, "functions: {}", mg.functions.len())?;
            let rows: Vec<Vec<String>> = mg
                .functions
                .iter()
                .map(|(n, k)| vec![format!("  {n}"), format!("{k} nodes")])
                .collect();
            table(f, &rows)?;
            let total: u64 = mg.variables.iter().filter_map(|v| v.bytes).sum();
            writeln!(
                f,
                "variables: {} ({})",
                mg.variables.len(),
                show_bytes(total)
            )?;
            let mut rows = vec![vec![
                "  name".into(),
                "dtype".into(),
                "shape".into(),
                "bytes".into(),
                "checkpoint key".into(),
            ]];
            for v in &mg.variables {
                rows.push(vec![
                    format!("  {}", v.name),
                    v.dtype.clone(),
                    show_shape(&v.shape),
                    v.bytes.map_or("-".into(), |b| b.to_string()),
                    v.key
                        .clone()
                        .unwrap_or_else(|| "(not in the checkpoint)".into()),
                ]);
            }
            table(f, &rows)?;
        }
        Ok(())
    }
}

fn tensors_json(ts: &[super::saved_model::SignatureTensor]) -> Value {
    ts.iter()
        .map(|t| {
            json!({
                "key": t.key, "tensor": t.tensor, "dtype": t.dtype, "shape": shape_json(&t.shape),
            })
        })
        .collect()
}

impl SavedModelSummary {
    /// The inspection as JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "path": self.dir.display().to_string(),
            "kinds": ["saved_model"],
            "variable_shards": self.variable_shards,
            "meta_graphs": self.meta_graphs.iter().map(|mg| json!({
                "tags": mg.tags,
                "tensorflow_version": mg.tensorflow_version,
                "signatures": mg.signatures.iter().map(|s| json!({
                    "name": s.name,
                    "inputs": tensors_json(&s.inputs),
                    "outputs": tensors_json(&s.outputs),
                })).collect::<Vec<_>>(),
                "functions": mg.functions.iter().map(|(n, k)| json!({"name": n, "nodes": k}))
                    .collect::<Vec<_>>(),
                "variables": mg.variables.iter().map(|v| json!({
                    "id": v.id, "name": v.name, "dtype": v.dtype,
                    "shape": shape_json(&v.shape), "key": v.key, "bytes": v.bytes,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
    }
}
