//! `MetaGraphDef` (`<prefix>.meta`): the training graph with its saver and collections.

use std::collections::BTreeMap;
use std::path::Path;

use prost::Message;

use super::graph_def::graph_from_proto;
use super::proto::{collection_def, CollectionDef, MetaGraphDef, SaverDef, VariableDef};
use crate::error::{Error, Result};
use crate::ir::Graph;

/// A loaded `.meta` file.
#[derive(Debug, Clone)]
pub struct MetaGraph {
    pub graph: Graph,
    pub saver: Option<SaverDef>,
    /// The `variables` collection (global variables), decoded.
    pub variables: Vec<VariableDef>,
    /// The `trainable_variables` collection, decoded.
    pub trainable_variables: Vec<VariableDef>,
    /// Every collection as stored.
    pub collections: BTreeMap<String, CollectionDef>,
    /// `meta_info_def.tensorflow_version`, empty when absent.
    pub tensorflow_version: String,
    /// `meta_info_def.tags`.
    pub tags: Vec<String>,
    /// `meta_info_def.stripped_default_attrs`: attributes equal to their op's default were removed.
    pub stripped_default_attrs: bool,
}

/// Reads a `.meta` file. Errors name the file; one that does not decode as a
/// MetaGraphDef, or has no graph, says so.
pub fn read_meta_graph(path: &Path) -> Result<MetaGraph> {
    let bytes = crate::error::read_file(path)?;
    meta_graph_from_bytes(&bytes).map_err(|e| Error::file(path, e))
}

/// Decodes MetaGraphDef bytes and imports its graph.
pub fn meta_graph_from_bytes(bytes: &[u8]) -> Result<MetaGraph> {
    let mgd =
        MetaGraphDef::decode(bytes).map_err(|e| Error::msg(format!("not a MetaGraphDef: {e}")))?;
    meta_graph_from_proto(mgd)
}

/// Imports a decoded MetaGraphDef.
pub fn meta_graph_from_proto(mgd: MetaGraphDef) -> Result<MetaGraph> {
    let Some(gd) = mgd.graph_def.as_ref() else {
        return Err(Error::msg(
            "not a MetaGraphDef: it has no graph_def (a frozen GraphDef .pb is not a .meta file)",
        ));
    };
    if gd.node.is_empty() {
        return Err(Error::msg("MetaGraphDef's graph_def has no nodes"));
    }
    let graph = graph_from_proto(gd)?;
    let variables = variable_defs(&mgd.collection_def, "variables")?;
    let trainable_variables = variable_defs(&mgd.collection_def, "trainable_variables")?;
    let info = mgd.meta_info_def.unwrap_or_default();
    Ok(MetaGraph {
        graph,
        saver: mgd.saver_def,
        variables,
        trainable_variables,
        collections: mgd.collection_def,
        tensorflow_version: info.tensorflow_version,
        tags: info.tags,
        stripped_default_attrs: info.stripped_default_attrs,
    })
}

/// The VariableDefs of a bytes-list collection; an absent collection is empty.
fn variable_defs(
    collections: &BTreeMap<String, CollectionDef>,
    name: &str,
) -> Result<Vec<VariableDef>> {
    let Some(c) = collections.get(name) else {
        return Ok(Vec::new());
    };
    let Some(collection_def::Kind::BytesList(list)) = &c.kind else {
        return Err(Error::msg(format!(
            "collection '{name}' does not hold serialized VariableDefs"
        )));
    };
    list.value
        .iter()
        .enumerate()
        .map(|(i, b)| {
            VariableDef::decode(b.as_slice()).map_err(|e| {
                Error::msg(format!(
                    "collection '{name}' entry {i} is not a VariableDef: {e}"
                ))
            })
        })
        .collect()
}

/// The node name of a tensor name such as `conv1/weights:0`.
pub fn tensor_node(tensor_name: &str) -> &str {
    match tensor_name.rsplit_once(':') {
        Some((node, idx)) if idx.parse::<u32>().is_ok() => node,
        _ => tensor_name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::tf::proto::{collection_def::BytesList, GraphDef, NodeDef};

    #[test]
    fn graph_def_bytes_are_not_a_meta_graph() {
        let gd = GraphDef {
            node: vec![NodeDef {
                name: "x".into(),
                op: "Placeholder".into(),
                ..NodeDef::default()
            }],
            ..GraphDef::default()
        };
        let e = meta_graph_from_bytes(&gd.encode_to_vec()).unwrap_err();
        assert!(e.to_string().contains("not a MetaGraphDef"), "{e}");
        assert!(meta_graph_from_bytes(b"\xff\xff\xff").is_err());
    }

    #[test]
    fn variables_collection_is_decoded() {
        let vd = VariableDef {
            variable_name: "w:0".into(),
            snapshot_name: "w/read:0".into(),
            trainable: true,
            ..VariableDef::default()
        };
        let mut mgd = MetaGraphDef {
            graph_def: Some(GraphDef {
                node: vec![NodeDef {
                    name: "w".into(),
                    op: "VariableV2".into(),
                    ..NodeDef::default()
                }],
                ..GraphDef::default()
            }),
            ..MetaGraphDef::default()
        };
        mgd.collection_def.insert(
            "variables".into(),
            CollectionDef {
                kind: Some(collection_def::Kind::BytesList(BytesList {
                    value: vec![vd.encode_to_vec()],
                })),
            },
        );
        let mg = meta_graph_from_bytes(&mgd.encode_to_vec()).unwrap();
        assert_eq!(mg.variables, [vd]);
        assert!(mg.trainable_variables.is_empty());
        assert_eq!(tensor_node(&mg.variables[0].variable_name), "w");
        assert_eq!(tensor_node("a:b"), "a:b");
    }
}
