//! TensorFlow formats: protobuf messages, the checkpoint bundle, GraphDef/MetaGraphDef.

pub mod checkpoint;
pub mod crc32c;
pub mod freeze;
pub mod graph_def;
pub mod inspect;
pub mod inspect_saved_model;
pub mod meta_graph;
pub mod proto;
pub mod saved_model;
pub mod snappy;
pub mod sstable;
pub mod tensor_proto;

use crate::error::Result;
use crate::ir::Graph;
use crate::spec::ModelSpec;

/// Loads the model a recipe names (checkpoint or frozen `.pb`) and freezes it, cut to
/// its outputs, with `inputs`/`outputs` set. See [`freeze`].
pub fn freeze_model(model: &ModelSpec) -> Result<Graph> {
    freeze::freeze_model(model)
}

/// Serializes a graph as a binary TensorFlow GraphDef that TensorFlow can run. See
/// [`graph_def`]. The fp16 weights of `fp16_cast` (a `Dequantize` from float16, qpipe's
/// and TFLite's form) become TensorFlow's `Cast`; an int8-quantized graph has no
/// TensorFlow form and is an error naming its first quantized node.
pub fn export_graphdef(graph: &Graph) -> Result<Vec<u8>> {
    use crate::ir::{Attr, DType};
    if let Some(n) = graph
        .nodes
        .iter()
        .find(|n| !n.output_quant.is_empty() && n.op != "Const" || n.op == "Quantize")
    {
        return Err(crate::error::Error::msg(format!(
            "node '{}' ({}) is int8-quantized; a quantized graph has no TensorFlow GraphDef \
             form (export it with export_tflite)",
            n.name, n.op
        )));
    }
    let widened = |n: &crate::ir::Node| {
        n.op == "Dequantize" && matches!(n.attr("T"), Some(Attr::Type(DType::F16)))
    };
    if !graph.nodes.iter().any(widened) {
        return graph_def::graph_to_bytes(graph);
    }
    let mut g = graph.clone();
    for n in g.nodes.iter_mut().filter(|n| widened(n)) {
        n.op = "Cast".into();
        n.attrs.clear();
        n.attrs.insert("SrcT".into(), Attr::Type(DType::F16));
        n.attrs.insert("DstT".into(), Attr::Type(DType::F32));
        n.attrs.insert("Truncate".into(), Attr::Bool(false));
    }
    graph_def::graph_to_bytes(&g)
}
