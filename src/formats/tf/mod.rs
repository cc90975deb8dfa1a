//! TensorFlow formats: protobuf messages, the checkpoint bundle, GraphDef/MetaGraphDef.

pub mod checkpoint;
pub mod crc32c;
pub mod freeze;
pub mod graph_def;
pub mod inspect;
pub mod meta_graph;
pub mod proto;
pub mod snappy;
pub mod sstable;
pub mod tensor_proto;

use crate::error::Result;
use crate::ir::Graph;
use crate::stages::ModelSpec;

/// Loads the model a recipe names (checkpoint or frozen `.pb`) and freezes it, cut to
/// its outputs, with `inputs`/`outputs` set. See [`freeze`].
pub fn freeze_model(model: &ModelSpec) -> Result<Graph> {
    freeze::freeze_model(model)
}

/// Serializes a graph as a binary TensorFlow GraphDef. See [`graph_def`].
pub fn export_graphdef(graph: &Graph) -> Result<Vec<u8>> {
    graph_def::graph_to_bytes(graph)
}
