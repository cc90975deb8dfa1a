//! The stored form of an artifact: IR serialization for graphs, canonical JSON for reports.

use std::sync::Arc;

use serde_json::Value;

use super::fingerprint;
use crate::ir;
use crate::stages::Artifact;

pub(super) fn artifact_kind(a: &Artifact) -> &'static str {
    match a {
        Artifact::Graph(_) => "graph",
        Artifact::Report(_) => "report",
    }
}

/// Streams an artifact's stored form (IR serialization or canonical JSON) to `sink`.
pub(super) fn encode_artifact(a: &Artifact, sink: &mut dyn FnMut(&[u8])) {
    match a {
        Artifact::Graph(g) => ir::serialize::encode_to(g, sink),
        Artifact::Report(v) => sink(&fingerprint::canonical_json(v)),
    }
}

pub(super) fn decode_artifact(kind: &str, bytes: &[u8]) -> std::result::Result<Artifact, String> {
    match kind {
        "graph" => ir::serialize::decode(bytes)
            .map(|g| Artifact::Graph(Arc::new(g)))
            .map_err(|e| e.to_string()),
        "report" => serde_json::from_slice::<Value>(bytes)
            .map(Artifact::Report)
            .map_err(|e| e.to_string()),
        other => Err(format!("unknown artifact kind '{other}'")),
    }
}
