//! `freeze`: the recipe's model (checkpoint or frozen `.pb`) as a frozen graph cut to its outputs.

use serde::{Deserialize, Serialize};

use super::{
    Artifact, ConfigError, ConfigTable, Role, Stage, StageContext, StageDeps, StageOutput,
};
use crate::error::Result;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FreezeConfig {}

pub struct Freeze {
    #[allow(dead_code)]
    config: FreezeConfig,
}

pub fn build(table: &ConfigTable) -> Result<Box<dyn Stage>, ConfigError> {
    Ok(Box::new(Freeze {
        config: super::parse_config(table)?,
    }))
}

impl Stage for Freeze {
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
        super::config_json(&self.config)
    }
    fn run(&self, ctx: &StageContext) -> Result<StageOutput> {
        let graph = crate::formats::tf::freeze::freeze_model_with(ctx.model, ctx.progress)?;
        let mut metrics = serde_json::Map::new();
        metrics.insert("nodes".into(), graph.nodes.len().into());
        let consts = graph
            .nodes
            .iter()
            .filter_map(|n| n.const_value())
            .map(|t| t.byte_size())
            .sum::<usize>();
        metrics.insert("weight_bytes".into(), consts.into());
        Ok(StageOutput {
            artifact: Artifact::Graph(graph.into()),
            metrics,
            files: vec![],
        })
    }
}
