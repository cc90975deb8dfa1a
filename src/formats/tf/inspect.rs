//! What `qpipe inspect PATH` shows about a TensorFlow file: the tensors of a
//! checkpoint, and the ops, placeholders, likely outputs and variables of a graph.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::checkpoint::{index_filename, Bundle};
use super::freeze::{checkpoint_prefix, meta_path, variable_keys};
use super::graph_def::{decode_graph_def, graph_from_proto};
use super::meta_graph::{meta_graph_from_bytes, tensor_node, MetaGraph};
use crate::error::{read_file, Error, Result};
use crate::ir::{Attr, DType, Graph, Node};

/// Everything `inspect` found at a path.
#[derive(Debug, Clone, PartialEq)]
pub struct Inspection {
    /// The path as given.
    pub path: PathBuf,
    pub checkpoint: Option<CheckpointSummary>,
    pub graph: Option<GraphSummary>,
}

/// The tensors of a checkpoint bundle.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointSummary {
    pub prefix: PathBuf,
    pub shards: usize,
    /// Sorted by key.
    pub tensors: Vec<TensorSummary>,
    /// Sum of the tensors' data sizes.
    pub total_bytes: u64,
    /// Tensors stored in the bundle that qpipe cannot read, with the reason.
    pub unsupported: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TensorSummary {
    pub key: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Stored bytes (for a partitioned tensor: elements × element size).
    pub bytes: u64,
    /// Number of slices of a partitioned tensor; 0 for an ordinary one.
    pub slices: usize,
}

/// Whether a graph came from a `.meta` file or a plain GraphDef.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphFormat {
    MetaGraphDef,
    GraphDef,
}

/// The shape of a graph.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphSummary {
    pub file: PathBuf,
    pub format: GraphFormat,
    /// `meta_info_def.tensorflow_version` of a `.meta`.
    pub tensorflow_version: Option<String>,
    pub producer: i32,
    pub nodes: usize,
    /// Node count by op, sorted by op.
    pub ops: BTreeMap<String, usize>,
    pub placeholders: Vec<PlaceholderSummary>,
    /// Where the model's outputs probably are (see [`likely_outputs`]).
    pub likely_outputs: Vec<OutputSummary>,
    pub variables: Vec<VariableSummary>,
    /// The ops the likely outputs are computed with (variables and training-only nodes
    /// left out, variable reads as `freeze` rewrites them), sorted by op.
    pub inference_ops: Vec<OpUse>,
}

/// An op of the inference part of a graph: how many nodes use it, and the first one
/// (with its attributes, for the typed op).
#[derive(Debug, Clone, PartialEq)]
pub struct OpUse {
    pub op: String,
    pub nodes: usize,
    pub first: Node,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PlaceholderSummary {
    pub name: String,
    /// `Placeholder` or `PlaceholderWithDefault`.
    pub op: String,
    pub dtype: Option<DType>,
    /// `None` = unknown rank; -1 = unknown dimension.
    pub shape: Option<Vec<i64>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OutputSummary {
    pub name: String,
    pub op: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VariableSummary {
    pub name: String,
    pub op: String,
    pub dtype: Option<DType>,
    pub shape: Option<Vec<i64>>,
    /// The checkpoint key the Saver restores it from.
    pub key: String,
    /// For part of a partitioned variable: `(start, length)` per dimension of `key`.
    pub slice: Option<Vec<(usize, usize)>>,
    pub trainable: bool,
    /// Whether the checkpoint beside the graph has `key`; `None` without a checkpoint.
    pub in_checkpoint: Option<bool>,
}

/// Inspects a checkpoint (its prefix, a directory with a `checkpoint` file, or its
/// `.index`/`.data-*`/`.meta` file), a `.meta` file or a GraphDef `.pb`. A checkpoint
/// with a `.meta` beside it gives both the tensors and the graph.
pub fn inspect(path: &Path) -> Result<Inspection> {
    let name = path.to_string_lossy();
    let is_graph_file = name.ends_with(".pb") || name.ends_with(".graphdef");
    let mut checkpoint = None;
    let mut graph = None;
    if is_graph_file {
        graph = Some(graph_file(path)?);
    } else {
        let prefix = checkpoint_prefix(path)?;
        let index = index_filename(&prefix);
        let meta = meta_path(&prefix);
        if index.exists() {
            checkpoint = Some(summarize_bundle(&Bundle::open(&prefix)?));
        }
        if meta.exists() {
            let bytes = read_file(&meta)?;
            let mg = meta_graph_from_bytes(&bytes).map_err(|e| Error::file(&meta, e))?;
            let bundle = checkpoint.as_ref().map(|c: &CheckpointSummary| &c.tensors);
            graph = Some(summarize_meta(&meta, &mg, bundle).map_err(|e| Error::file(&meta, e))?);
        }
        if checkpoint.is_none() && graph.is_none() {
            if path.is_file() {
                graph = Some(graph_file(path)?);
            } else {
                return Err(Error::file(
                    path,
                    format!(
                        "not a checkpoint ({} does not exist) or a graph file",
                        index.display()
                    ),
                ));
            }
        }
    }
    Ok(Inspection {
        path: path.to_path_buf(),
        checkpoint,
        graph,
    })
}

/// A `.pb`: a GraphDef, or else a MetaGraphDef saved under another name.
fn graph_file(path: &Path) -> Result<GraphSummary> {
    let bytes = read_file(path)?;
    match decode_graph_def(&bytes) {
        Ok(gd) if !gd.node.is_empty() => {
            let g = graph_from_proto(&gd).map_err(|e| Error::file(path, e))?;
            Ok(summarize_graph(path, GraphFormat::GraphDef, &g))
        }
        graph_result => match meta_graph_from_bytes(&bytes) {
            Ok(mg) => summarize_meta(path, &mg, None).map_err(|e| Error::file(path, e)),
            Err(_) => Err(Error::file(
                path,
                match graph_result {
                    Err(e) => e.to_string(),
                    Ok(_) => "not a GraphDef: it has no nodes".into(),
                },
            )),
        },
    }
}

/// Lists a bundle's tensors.
pub fn summarize_bundle(bundle: &Bundle) -> CheckpointSummary {
    let mut tensors: Vec<TensorSummary> = bundle
        .keys()
        .filter_map(|k| {
            let e = bundle.entry(k)?;
            let elements: u64 = e.shape.iter().map(|&d| d as u64).product();
            let bytes = if e.slices.is_empty() {
                e.size
            } else {
                elements * e.dtype.size().unwrap_or(0) as u64
            };
            Some(TensorSummary {
                key: k.to_string(),
                dtype: e.dtype,
                shape: e.shape.clone(),
                bytes,
                slices: e.slices.len(),
            })
        })
        .collect();
    tensors.sort_by(|a, b| a.key.cmp(&b.key));
    CheckpointSummary {
        prefix: bundle.prefix().to_path_buf(),
        shards: bundle.num_shards(),
        total_bytes: tensors.iter().map(|t| t.bytes).sum(),
        tensors,
        unsupported: bundle
            .unsupported()
            .map(|(k, why)| (k.to_string(), why.to_string()))
            .collect(),
    }
}

fn summarize_meta(
    file: &Path,
    mg: &MetaGraph,
    bundle: Option<&Vec<TensorSummary>>,
) -> Result<GraphSummary> {
    let mut s = summarize_graph(file, GraphFormat::MetaGraphDef, &mg.graph);
    s.tensorflow_version = Some(mg.tensorflow_version.clone()).filter(|v| !v.is_empty());
    let keys = variable_keys(&mg.graph, mg.saver.as_ref(), &mg.variables)?;
    let trainable: HashSet<&str> = mg
        .trainable_variables
        .iter()
        .map(|v| tensor_node(&v.variable_name))
        .collect();
    let in_bundle: Option<HashSet<&str>> =
        bundle.map(|b| b.iter().map(|t| t.key.as_str()).collect());
    for v in &mut s.variables {
        if let Some(k) = keys.get(&v.name) {
            v.key = k.key.clone();
            v.slice = k.slice.as_ref().map(|s| s.extents.clone());
        }
        v.trainable = trainable.contains(v.name.as_str());
        v.in_checkpoint = in_bundle.as_ref().map(|b| b.contains(v.key.as_str()));
    }
    Ok(s)
}

/// Nodes that update or save state, or compute gradients: the training step.
fn is_training_step(node: &Node) -> bool {
    const PREFIXES: [&str; 7] = [
        "Assign",
        "Apply",
        "ResourceApply",
        "SparseApply",
        "ResourceSparseApply",
        "Scatter",
        "ResourceScatter",
    ];
    const OPS: [&str; 6] = [
        "Save",
        "SaveV2",
        "SaveSlices",
        "MergeV2Checkpoints",
        "CountUpTo",
        "DestroyResourceOp",
    ];
    let op = node.op.as_str();
    let name = node.name.as_str();
    OPS.contains(&op)
        || PREFIXES.iter().any(|p| op.starts_with(p))
        || op.ends_with("Grad")
        || name.starts_with("gradients/")
        || name.contains("/gradients/")
        || name.contains("_grad/")
}

/// Nodes that only matter for training, saving, initialization or monitoring.
fn is_training_only(node: &Node) -> bool {
    const OPS: [&str; 13] = [
        "NoOp",
        "Restore",
        "RestoreV2",
        "RestoreSlice",
        "ShardedFilename",
        "StringJoin",
        "VarIsInitializedOp",
        "IsVariableInitialized",
        "Assert",
        "Print",
        "PrintV2",
        "StopGradient",
        "BroadcastGradientArgs",
    ];
    let op = node.op.as_str();
    is_training_step(node)
        || OPS.contains(&op)
        || op.ends_with("Summary")
        || op.ends_with("SummaryV2")
        || op.starts_with("Write")
        || node.name.starts_with("save/")
        // Keras (compile/fit) builds its optimizer and training function here.
        || node.name.starts_with("training/")
}

/// Ops that end a classifier or regressor: what a model's output usually is.
fn is_head(op: &str) -> bool {
    matches!(op, "Softmax" | "LogSoftmax" | "Sigmoid")
}

/// Nodes that hold values rather than compute them, or only describe shapes.
fn is_source_or_shape(op: &str) -> bool {
    is_variable(op)
        || matches!(
            op,
            "Const"
                | "Placeholder"
                | "PlaceholderWithDefault"
                | "ReadVariableOp"
                | "Shape"
                | "ShapeN"
                | "Size"
                | "Rank"
        )
}

/// Likely model outputs, by position.
///
/// In a training graph (one with a training step), the model's outputs are where the
/// computation leaves the training path: nodes that do not feed the training step,
/// whose inputs all do (e.g. a `Softmax` over the logits the loss reads; the metrics
/// computed from it further on are not reported). In an inference graph they are the
/// nodes nothing reads, as TF's `summarize_graph` reports them. Source, shape and
/// training-only nodes are never reported.
///
/// A loss also leaves the training path that way, but it reads one more placeholder
/// (the labels) than the predictions: a candidate whose placeholders strictly include
/// another candidate's is dropped.
fn likely_outputs(g: &Graph) -> Vec<usize> {
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(g.nodes.len());
    for (i, n) in g.nodes.iter().enumerate() {
        index.entry(n.name.as_str()).or_insert(i);
    }
    let inputs: Vec<Vec<usize>> = g
        .nodes
        .iter()
        .map(|n| {
            n.inputs
                .iter()
                .filter_map(|r| index.get(r.node.as_str()).copied())
                .collect()
        })
        .collect();
    let candidate = |n: &Node| !is_training_only(n) && !is_source_or_shape(&n.op);

    let mut feeds_training = vec![false; g.nodes.len()];
    let mut stack: Vec<usize> = (0..g.nodes.len())
        .filter(|&i| is_training_step(&g.nodes[i]))
        .collect();
    let training_graph = !stack.is_empty();
    while let Some(i) = stack.pop() {
        if std::mem::replace(&mut feeds_training[i], true) {
            continue;
        }
        stack.extend(inputs[i].iter().filter(|&&j| !feeds_training[j]));
    }
    if training_graph {
        let off_path: Vec<bool> = (0..g.nodes.len())
            .map(|i| !feeds_training[i] && candidate(&g.nodes[i]))
            .collect();
        let frontier: Vec<usize> = (0..g.nodes.len())
            .filter(|&i| off_path[i])
            .filter(|&i| inputs[i].iter().all(|&j| !off_path[j]))
            .filter(|&i| {
                inputs[i]
                    .iter()
                    .any(|&j| feeds_training[j] && !is_source_or_shape(&g.nodes[j].op))
            })
            .collect();
        let found = without_label_consumers(g, &inputs, frontier);
        if found.iter().any(|&i| is_head(&g.nodes[i].op)) {
            return found;
        }
        // Keras losses read the probabilities themselves, so the head is on the training
        // path and what leaves it is metrics (which read the labels too): prefer heads.
        let heads = final_heads(g, &inputs, candidate);
        if !heads.is_empty() {
            return heads;
        }
        if !found.is_empty() {
            return found;
        }
    }
    let mut read = vec![false; g.nodes.len()];
    for (i, n) in g.nodes.iter().enumerate() {
        for &j in &inputs[i] {
            read[j] = true;
        }
        for c in &n.control_inputs {
            if let Some(&j) = index.get(c.as_str()) {
                read[j] = true;
            }
        }
    }
    (0..g.nodes.len())
        .filter(|&i| !read[i] && candidate(&g.nodes[i]))
        .collect()
}

/// Head ops (softmax, sigmoid) that no other head op depends on: the last ones on
/// each path, not an attention softmax inside the model.
fn final_heads(g: &Graph, inputs: &[Vec<usize>], candidate: impl Fn(&Node) -> bool) -> Vec<usize> {
    let heads: Vec<usize> = (0..g.nodes.len())
        .filter(|&i| is_head(&g.nodes[i].op) && candidate(&g.nodes[i]))
        .collect();
    let mut below_a_head = vec![false; g.nodes.len()];
    let mut stack: Vec<usize> = heads.iter().flat_map(|&h| inputs[h].clone()).collect();
    while let Some(i) = stack.pop() {
        if !std::mem::replace(&mut below_a_head[i], true) {
            stack.extend(inputs[i].iter().filter(|&&j| !below_a_head[j]));
        }
    }
    heads.into_iter().filter(|&h| !below_a_head[h]).collect()
}

/// Drops candidates that read a strict superset of another candidate's placeholders,
/// and candidates that read no placeholder at all (computed from variables and
/// constants only, such as an optimizer's unused step terms) when others read one.
fn without_label_consumers(g: &Graph, inputs: &[Vec<usize>], candidates: Vec<usize>) -> Vec<usize> {
    let placeholders: Vec<BTreeSet<usize>> = candidates
        .iter()
        .map(|&c| {
            let mut seen = vec![false; g.nodes.len()];
            let mut found = BTreeSet::new();
            let mut stack = vec![c];
            while let Some(i) = stack.pop() {
                if std::mem::replace(&mut seen[i], true) {
                    continue;
                }
                if matches!(
                    g.nodes[i].op.as_str(),
                    "Placeholder" | "PlaceholderWithDefault"
                ) {
                    found.insert(i);
                }
                stack.extend(inputs[i].iter().filter(|&&j| !seen[j]));
            }
            found
        })
        .collect();
    let any_fed = placeholders.iter().any(|p| !p.is_empty());
    candidates
        .iter()
        .enumerate()
        .filter(|(a, _)| !(any_fed && placeholders[*a].is_empty()))
        .filter(|(a, _)| {
            !placeholders.iter().any(|p| {
                !p.is_empty() && p.len() < placeholders[*a].len() && p.is_subset(&placeholders[*a])
            })
        })
        .map(|(_, &c)| c)
        .collect()
}

fn is_variable(op: &str) -> bool {
    crate::ir::op::is_variable_op(op)
}

fn shape_attr(n: &Node, key: &str) -> Option<Vec<i64>> {
    match n.attrs.get(key) {
        Some(Attr::Shape(s)) => s.clone(),
        _ => None,
    }
}

fn type_attr(n: &Node, key: &str) -> Option<DType> {
    match n.attrs.get(key) {
        Some(Attr::Type(t)) => Some(*t),
        _ => None,
    }
}

/// The ops of the nodes `roots` depend on through data edges, as they will be after
/// `freeze`: variables and their reads are constants then, a `ResourceGather` a
/// `GatherV2`; training-only nodes (`StopGradient`, debugging) are passed through.
fn inference_ops(g: &Graph, roots: &[usize]) -> Vec<OpUse> {
    let index: HashMap<&str, usize> = g
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.as_str(), i))
        .collect();
    let mut seen = vec![false; g.nodes.len()];
    let mut stack = roots.to_vec();
    let mut uses: BTreeMap<String, OpUse> = BTreeMap::new();
    while let Some(i) = stack.pop() {
        if std::mem::replace(&mut seen[i], true) {
            continue;
        }
        let n = &g.nodes[i];
        stack.extend(
            n.inputs
                .iter()
                .filter_map(|r| index.get(r.node.as_str()).copied())
                .filter(|&j| !seen[j]),
        );
        if is_variable(&n.op) || n.op == "ReadVariableOp" || is_training_only(n) {
            continue;
        }
        let mut node = n.clone();
        if n.op == "ResourceGather" {
            node.op = "GatherV2".into();
        }
        uses.entry(node.op.clone())
            .and_modify(|u| u.nodes += 1)
            .or_insert(OpUse {
                op: node.op.clone(),
                nodes: 1,
                first: node,
            });
    }
    uses.into_values().collect()
}

/// Ops, placeholders, likely outputs and variables of any graph.
pub fn summarize_graph(file: &Path, format: GraphFormat, g: &Graph) -> GraphSummary {
    let placeholders = g
        .nodes
        .iter()
        .filter(|n| n.op == "Placeholder" || n.op == "PlaceholderWithDefault")
        .filter(|n| !is_training_only(n))
        .map(|n| PlaceholderSummary {
            name: n.name.clone(),
            op: n.op.clone(),
            dtype: type_attr(n, "dtype"),
            shape: shape_attr(n, "shape"),
        })
        .collect();
    let outputs = likely_outputs(g);
    let inference_ops = inference_ops(g, &outputs);
    let likely_outputs = outputs
        .into_iter()
        .map(|i| &g.nodes[i])
        .map(|n| OutputSummary {
            name: n.name.clone(),
            op: n.op.clone(),
        })
        .collect();
    let variables = g
        .nodes
        .iter()
        .filter(|n| is_variable(&n.op))
        .map(|n| VariableSummary {
            name: n.name.clone(),
            op: n.op.clone(),
            dtype: type_attr(n, "dtype"),
            shape: shape_attr(n, "shape"),
            key: n.name.clone(),
            slice: None,
            trainable: false,
            in_checkpoint: None,
        })
        .collect();
    GraphSummary {
        file: file.to_path_buf(),
        format,
        tensorflow_version: None,
        producer: g.producer,
        nodes: g.nodes.len(),
        ops: g.op_histogram(),
        placeholders,
        likely_outputs,
        variables,
        inference_ops,
    }
}

fn show_dtype(d: Option<DType>) -> &'static str {
    d.map_or("?", DType::name)
}

pub(crate) fn show_shape(s: &Option<Vec<i64>>) -> String {
    match s {
        None => "<unknown>".into(),
        Some(dims) => format!(
            "[{}]",
            dims.iter()
                .map(|&d| if d < 0 {
                    "?".to_string()
                } else {
                    d.to_string()
                })
                .collect::<Vec<_>>()
                .join(",")
        ),
    }
}

fn show_dims(s: &[usize]) -> String {
    format!(
        "[{}]",
        s.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
    )
}

pub(crate) fn shape_json(s: &Option<Vec<i64>>) -> Value {
    match s {
        None => Value::Null,
        Some(dims) => dims
            .iter()
            .map(|&d| if d < 0 { Value::Null } else { json!(d) })
            .collect(),
    }
}

/// Human-readable byte count.
pub(crate) fn show_bytes(b: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Writes rows as left-aligned columns, two spaces apart, indented by two.
pub(crate) fn table(f: &mut fmt::Formatter<'_>, rows: &[Vec<String>]) -> fmt::Result {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let mut line = String::from("  ");
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[c]));
            }
        }
        writeln!(f, "{}", line.trim_end())?;
    }
    Ok(())
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(c) = &self.checkpoint {
            writeln!(
                f,
                "checkpoint {}: {} tensors, {} in {} shard{}",
                c.prefix.display(),
                c.tensors.len(),
                show_bytes(c.total_bytes),
                c.shards,
                if c.shards == 1 { "" } else { "s" }
            )?;
            let mut rows = vec![vec![
                "key".into(),
                "dtype".into(),
                "shape".into(),
                "bytes".into(),
            ]];
            for t in &c.tensors {
                let mut bytes = t.bytes.to_string();
                if t.slices > 0 {
                    bytes.push_str(&format!(" ({} slices)", t.slices));
                }
                rows.push(vec![
                    t.key.clone(),
                    t.dtype.name().into(),
                    show_dims(&t.shape),
                    bytes,
                ]);
            }
            table(f, &rows)?;
            for (k, why) in &c.unsupported {
                writeln!(f, "  unreadable: {k}: {why}")?;
            }
        }
        if let Some(g) = &self.graph {
            if self.checkpoint.is_some() {
                writeln!(f)?;
            }
            let format = match g.format {
                GraphFormat::MetaGraphDef => "MetaGraphDef",
                GraphFormat::GraphDef => "GraphDef",
            };
            let version = g
                .tensorflow_version
                .as_ref()
                .map(|v| format!(", TensorFlow {v}"))
                .unwrap_or_default();
            writeln!(
                f,
                "graph {} ({format}{version}, producer {}): {} nodes",
                g.file.display(),
                g.producer,
                g.nodes
            )?;
            writeln!(f, "placeholders:")?;
            let mut rows = Vec::new();
            for p in &g.placeholders {
                rows.push(vec![
                    p.name.clone(),
                    p.op.clone(),
                    show_dtype(p.dtype).into(),
                    show_shape(&p.shape),
                ]);
            }
            table(f, &rows)?;
            writeln!(f, "likely outputs:")?;
            let rows: Vec<Vec<String>> = g
                .likely_outputs
                .iter()
                .map(|o| vec![o.name.clone(), o.op.clone()])
                .collect();
            table(f, &rows)?;
            let trainable = g.variables.iter().filter(|v| v.trainable).count();
            writeln!(
                f,
                "variables: {} ({trainable} trainable)",
                g.variables.len()
            )?;
            if !g.variables.is_empty() {
                let mut rows = vec![vec![
                    "name".into(),
                    "op".into(),
                    "dtype".into(),
                    "shape".into(),
                    "checkpoint key".into(),
                ]];
                for v in &g.variables {
                    let mut key = v.key.clone();
                    if let Some(slice) = &v.slice {
                        let dims: Vec<String> = slice
                            .iter()
                            .map(|(s, l)| format!("{s}:{}", s + l))
                            .collect();
                        key.push_str(&format!("[{}]", dims.join(",")));
                    }
                    if v.in_checkpoint == Some(false) {
                        key.push_str(" (missing)");
                    }
                    if v.trainable {
                        key.push_str(" [trainable]");
                    }
                    rows.push(vec![
                        v.name.clone(),
                        v.op.clone(),
                        show_dtype(v.dtype).into(),
                        show_shape(&v.shape),
                        key,
                    ]);
                }
                table(f, &rows)?;
            }
            let ops: Vec<String> = g.ops.iter().map(|(op, n)| format!("{op}×{n}")).collect();
            writeln!(f, "ops: {}", ops.join(", "))?;
        }
        Ok(())
    }
}

impl Inspection {
    /// The inspection as JSON (stable key names; shapes use `null` for unknown dimensions).
    pub fn to_json(&self) -> Value {
        let checkpoint = self.checkpoint.as_ref().map(|c| {
            json!({
                "prefix": c.prefix.display().to_string(),
                "shards": c.shards,
                "total_bytes": c.total_bytes,
                "tensors": c.tensors.iter().map(|t| json!({
                    "key": t.key,
                    "dtype": t.dtype.name(),
                    "shape": t.shape,
                    "bytes": t.bytes,
                    "slices": t.slices,
                })).collect::<Vec<_>>(),
                "unsupported": c.unsupported.iter().map(|(k, why)| json!({
                    "key": k, "reason": why,
                })).collect::<Vec<_>>(),
            })
        });
        let graph = self.graph.as_ref().map(|g| {
            json!({
                "file": g.file.display().to_string(),
                "format": match g.format {
                    GraphFormat::MetaGraphDef => "meta_graph_def",
                    GraphFormat::GraphDef => "graph_def",
                },
                "tensorflow_version": g.tensorflow_version,
                "producer": g.producer,
                "nodes": g.nodes,
                "ops": g.ops,
                "placeholders": g.placeholders.iter().map(|p| json!({
                    "name": p.name,
                    "op": p.op,
                    "dtype": p.dtype.map(DType::name),
                    "shape": shape_json(&p.shape),
                })).collect::<Vec<_>>(),
                "likely_outputs": g.likely_outputs.iter().map(|o| json!({
                    "name": o.name, "op": o.op,
                })).collect::<Vec<_>>(),
                "variables": g.variables.iter().map(|v| json!({
                    "name": v.name,
                    "op": v.op,
                    "dtype": v.dtype.map(DType::name),
                    "shape": shape_json(&v.shape),
                    "key": v.key,
                    "slice": v.slice,
                    "trainable": v.trainable,
                    "in_checkpoint": v.in_checkpoint,
                })).collect::<Vec<_>>(),
            })
        });
        let kinds: BTreeSet<&str> = [
            self.checkpoint.as_ref().map(|_| "checkpoint"),
            self.graph.as_ref().map(|g| match g.format {
                GraphFormat::MetaGraphDef => "meta_graph_def",
                GraphFormat::GraphDef => "graph_def",
            }),
        ]
        .into_iter()
        .flatten()
        .collect();
        json!({
            "path": self.path.display().to_string(),
            "kinds": kinds.into_iter().collect::<Vec<_>>(),
            "checkpoint": checkpoint,
            "graph": graph,
        })
    }
}
