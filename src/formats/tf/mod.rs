//! TensorFlow formats: protobuf messages, the checkpoint bundle, GraphDef/MetaGraphDef.

pub mod checkpoint;
pub mod crc32c;
pub mod proto;
pub mod snappy;
pub mod sstable;

use crate::error::{Error, Result};
use crate::ir::Graph;
use crate::stages::ModelSpec;

/// Loads the model a recipe names and freezes it to its outputs.
pub fn freeze_model(_model: &ModelSpec) -> Result<Graph> {
    Err(Error::msg("freeze is not implemented yet"))
}

/// Serializes a graph as a TensorFlow GraphDef.
pub fn export_graphdef(_graph: &Graph) -> Result<Vec<u8>> {
    Err(Error::msg("GraphDef export is not implemented yet"))
}
