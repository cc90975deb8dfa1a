//! The one list of stage kinds. Adding a kind = its own file plus one line here.

use super::{ConfigError, ConfigTable, Stage};

/// Builds a stage from its recipe table (without the `kind` and `matrix` keys).
pub type BuildFn = fn(&ConfigTable) -> Result<Box<dyn Stage>, ConfigError>;

pub struct StageFactory {
    pub kind: &'static str,
    pub build: BuildFn,
}

pub const REGISTRY: &[StageFactory] = &[
    StageFactory {
        kind: "freeze",
        build: super::freeze::build,
    },
    StageFactory {
        kind: "strip_training",
        build: super::strip_training::build,
    },
    StageFactory {
        kind: "fp16_cast",
        build: super::fp16_cast::build,
    },
    StageFactory {
        kind: "export_graphdef",
        build: super::export_graphdef::build,
    },
    StageFactory {
        kind: "export_tflite",
        build: super::export_tflite::build,
    },
];

pub fn factory(kind: &str) -> Option<&'static StageFactory> {
    REGISTRY.iter().find(|f| f.kind == kind)
}

pub fn kinds() -> Vec<&'static str> {
    REGISTRY.iter().map(|f| f.kind).collect()
}
