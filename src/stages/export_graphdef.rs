//! `export_graphdef`: writes the input graph as a TensorFlow GraphDef `.pb` under `out_dir`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{
    Artifact, ConfigError, ConfigTable, OutputFile, Stage, StageContext, StageDeps, StageOutput,
};
use crate::error::Result;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportGraphDefConfig {
    pub input: String,
    pub path: PathBuf,
}

pub struct ExportGraphDef {
    config: ExportGraphDefConfig,
}

pub fn build(table: &ConfigTable) -> Result<Box<dyn Stage>, ConfigError> {
    Ok(Box::new(ExportGraphDef {
        config: super::parse_config(table)?,
    }))
}

impl Stage for ExportGraphDef {
    fn kind(&self) -> &'static str {
        "export_graphdef"
    }
    fn version(&self) -> u32 {
        1
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
        let bytes = crate::formats::tf::export_graphdef(&graph)?;
        let mut metrics = serde_json::Map::new();
        metrics.insert("bytes".into(), bytes.len().into());
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
