//! `export_tflite`: lowers the input graph to TFLite builtin operators and writes
//! a `.tflite` file under `out_dir`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{
    Artifact, ConfigError, ConfigTable, OutputFile, Role, Stage, StageContext, StageDeps,
    StageOutput,
};
use crate::error::{Result, ResultExt};
use crate::ir::TensorRef;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportTfliteConfig {
    /// The stage whose graph is exported. Its declared inputs and outputs are
    /// used, or the recipe model's when the graph declares none.
    pub input: String,
    /// Output file, relative to the recipe's `out_dir`.
    pub path: PathBuf,
}

pub struct ExportTflite {
    config: ExportTfliteConfig,
}

pub fn build(table: &ConfigTable) -> std::result::Result<Box<dyn Stage>, ConfigError> {
    Ok(Box::new(ExportTflite {
        config: super::parse_config(table)?,
    }))
}

impl Stage for ExportTflite {
    fn role(&self) -> Role {
        Role::TfliteExport { input: "input" }
    }
    fn version(&self) -> u32 {
        // 2: data-movement ops, zero biases dropped, the spatial ops;
        // 3: composites fused (GELU, PReLU, l2_normalize), duplicates merged.
        3
    }
    fn deps(&self) -> StageDeps {
        StageDeps {
            stages: vec![("input".into(), self.config.input.clone())],
            outputs: vec![("path".into(), self.config.path.clone())],
            ..StageDeps::default()
        }
    }
    fn config(&self) -> serde_json::Value {
        super::config_json(&self.config)
    }
    fn run(&self, ctx: &StageContext) -> Result<StageOutput> {
        let graph = ctx.input_graph("input")?;
        let named = if graph.outputs.is_empty() || graph.inputs.is_empty() {
            let mut g = (*graph).clone();
            if g.outputs.is_empty() {
                g.outputs = ctx
                    .model
                    .outputs
                    .iter()
                    .filter_map(|o| TensorRef::parse(o))
                    .collect();
            }
            if g.inputs.is_empty() {
                g.inputs = ctx.model.inputs.clone();
            }
            std::borrow::Cow::Owned(g)
        } else {
            std::borrow::Cow::Borrowed(graph.as_ref())
        };
        let (model, bytes) = crate::formats::tflite::export(&named)
            .with_context(|| format!("stage '{}'", ctx.id))?;
        let mut metrics = serde_json::Map::new();
        metrics.insert("bytes".into(), bytes.len().into());
        metrics.insert("tensors".into(), model.tensors.len().into());
        metrics.insert("operators".into(), model.operators.len().into());
        let ops: serde_json::Map<String, serde_json::Value> = model
            .op_histogram()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.into()))
            .collect();
        metrics.insert("ops".into(), ops.into());
        Ok(StageOutput {
            artifact: Artifact::Graph(graph),
            metrics,
            files: vec![OutputFile {
                path: self.config.path.clone(),
                bytes,
            }],
        })
    }
}
