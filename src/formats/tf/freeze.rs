//! Freezing: a training graph plus its checkpoint → an inference graph of constants.
//!
//! This does what TensorFlow's `convert_variables_to_constants` does (TF
//! `python/framework/convert_to_constants.py`), with the values taken from the bundle
//! instead of a live session:
//!
//! 1. `extract_sub_graph`: keep what the outputs need (data, control and `_class`
//!    colocation dependencies).
//! 2. `VariableV2`/`Variable`/`VarHandleOp` → `Const` of the same name holding the
//!    checkpoint value (attrs `dtype` and `value` only, as TF clears the node).
//! 3. Readers of resource variables: `ReadVariableOp` → `Identity` (`T` = its `dtype`,
//!    keeps inputs and `_class`), `ResourceGather` → `GatherV2(params, indices,
//!    <name>/axis)` with a new scalar `Const` axis (`batch_dims` must be 0),
//!    `ResourceGatherNd` → `GatherNd`; `Identity`/`Enter`/`Exit`/`NextIteration`/
//!    `Switch`/`_SwitchN`/`Merge` carrying the handle get `T` = the variable dtype and
//!    lose `_output_shapes`, and pass the handle on.
//!
//! Any other op that reads or writes a variable and is needed by the outputs is an
//! error naming it: its frozen form would not be a valid graph.
//!
//! Differences from TF's output: attributes of kept nodes are those of the `.meta`
//! graph, so `_output_shapes` stays where TF's live-session graph had none.
//!
//! Variables map to checkpoint keys the way the Saver restores them: the `RestoreV2`
//! ops under the SaverDef's scope name a key (and for partitioned variables a slice)
//! per output, and `Assign`/`AssignVariableOp` nodes fed by that output (possibly
//! through `Identity`) name the variable. Variables the restore graph does not cover
//! use their VariableDef's `save_slice_info_def`, else `shared_name` (resource
//! variables), else the op name.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use super::checkpoint::Bundle;
use super::graph_def::{extract_sub_graph, read_graph_def};
use super::meta_graph::{read_meta_graph, tensor_node, MetaGraph};
use super::proto::SaverDef;
use crate::error::{Error, Result};
use crate::ir::{num_elements, Attr, DType, Graph, Node, Tensor, TensorData, TensorRef};
use crate::progress::{Progress, Unit};
use crate::spec::{ModelSource, ModelSpec};

/// Ops that hold a variable.
use crate::ir::op::VARIABLE_OPS;
/// Ops that pass a resource handle through unchanged (TF's `_Intermediate` and `Merge`).
const HANDLE_PASSING_OPS: [&str; 7] = [
    "Identity",
    "Enter",
    "Exit",
    "NextIteration",
    "Switch",
    "_SwitchN",
    "Merge",
];

/// Loads and freezes the recipe's model, cut to its outputs, with `inputs`/`outputs`
/// set and `input_shapes` applied to the input placeholders.
pub fn freeze_model(model: &ModelSpec) -> Result<Graph> {
    freeze_model_with(model, &Progress::disabled())
}

/// [`freeze_model`], counting the checkpoint bytes read on `progress`.
pub fn freeze_model_with(model: &ModelSpec, progress: &Progress) -> Result<Graph> {
    if model.outputs.is_empty() {
        return Err(Error::usage("the model names no outputs"));
    }
    let (mut graph, file) = match &model.source {
        ModelSource::Checkpoint(path) => {
            let prefix = checkpoint_prefix(path)?;
            let meta = meta_path(&prefix);
            let mg = read_meta_graph(&meta)?;
            let bundle = Bundle::open(&prefix)?;
            let graph = freeze_meta_graph_with(mg, &bundle, &model.outputs, progress)
                .map_err(|e| Error::file(&meta, e))?;
            (graph, meta_path(&prefix))
        }
        ModelSource::Graph(path) => (cut_frozen_graph(path, &model.outputs)?, path.clone()),
        ModelSource::SavedModel {
            dir,
            signature,
            tags,
        } => {
            let req = super::saved_model::SavedModelRequest {
                dir,
                tags,
                signature,
                outputs: &model.outputs,
            };
            let graph = super::saved_model::freeze_saved_model(&req, progress)?;
            (graph, super::saved_model::pb_path(dir))
        }
    };
    bind_model_spec(&mut graph, model).map_err(|e| Error::file(&file, e))?;
    Ok(graph)
}

/// The checkpoint prefix of what a user may name: the prefix itself, its `.meta`,
/// `.index` or `.data-NNNNN-of-NNNNN` file, or a directory with a `checkpoint` file.
pub fn checkpoint_prefix(path: &Path) -> Result<PathBuf> {
    let Some(s) = path.to_str() else {
        return super::checkpoint::resolve_prefix(path);
    };
    if let Some(stem) = s.strip_suffix(".meta") {
        return Ok(PathBuf::from(stem));
    }
    if let Some((stem, shard)) = s.rsplit_once(".data-") {
        let is_shard = shard.len() == 14
            && shard.as_bytes()[5..9] == *b"-of-"
            && shard[..5]
                .bytes()
                .chain(shard[9..].bytes())
                .all(|b| b.is_ascii_digit());
        if is_shard {
            return Ok(PathBuf::from(stem));
        }
    }
    super::checkpoint::resolve_prefix(path)
}

/// `<prefix>.meta`
pub fn meta_path(prefix: &Path) -> PathBuf {
    let mut s = prefix.as_os_str().to_os_string();
    s.push(".meta");
    PathBuf::from(s)
}

/// Parses output names (`name` or `name:N`).
fn parse_outputs(outputs: &[String]) -> Result<Vec<TensorRef>> {
    outputs
        .iter()
        .map(|o| {
            TensorRef::parse(o)
                .ok_or_else(|| Error::usage(format!("'{o}' is not a valid output tensor name")))
        })
        .collect()
}

/// Freezes `<prefix>.meta` with the values in the bundle at `prefix`, cut to `outputs`.
/// `Graph::outputs` is set; `Graph::inputs` is left empty.
pub fn freeze_checkpoint(prefix: &Path, outputs: &[String]) -> Result<Graph> {
    let meta = meta_path(prefix);
    let mg = read_meta_graph(&meta)?;
    let bundle = Bundle::open(prefix)?;
    freeze_meta_graph(mg, &bundle, outputs).map_err(|e| Error::file(&meta, e))
}

/// Freezes a loaded meta graph with the values in `bundle`. Errors name the node.
pub fn freeze_meta_graph(mg: MetaGraph, bundle: &Bundle, outputs: &[String]) -> Result<Graph> {
    freeze_meta_graph_with(mg, bundle, outputs, &Progress::disabled())
}

fn freeze_meta_graph_with(
    mg: MetaGraph,
    bundle: &Bundle,
    outputs: &[String],
    progress: &Progress,
) -> Result<Graph> {
    let outputs = parse_outputs(outputs)?;
    let mut graph = mg.graph;
    let keys = variable_keys(&graph, mg.saver.as_ref(), &mg.variables)?;
    let roots: Vec<&str> = outputs.iter().map(|r| r.node.as_str()).collect();
    extract_sub_graph(&mut graph, &roots)?;
    // The bytes of a checkpoint tensor, as read (all slices of a partitioned one).
    let bytes = |key: &str| {
        bundle.entry(key).map_or(0, |e| {
            (e.shape.iter().product::<usize>() * e.dtype.size().unwrap_or(1)) as u64
        })
    };
    let total = keys
        .iter()
        .filter(|(node, _)| graph.node(node).is_some())
        .map(|(_, vk)| bytes(&vk.key))
        .sum();
    let bar = progress.start("reading the checkpoint", total, Unit::Bytes);
    convert_variables(&mut graph, &keys, &mut |node, vk| {
        let t = load_variable(bundle, node, vk)?;
        bar.inc(bytes(&vk.key));
        Ok(t)
    })?;
    bar.finish();
    graph.outputs = outputs;
    Ok(graph)
}

/// Loads an already frozen GraphDef and cuts it to `outputs`. Variables left in it are
/// an error: a checkpoint is needed to freeze them.
pub fn cut_frozen_graph(path: &Path, outputs: &[String]) -> Result<Graph> {
    let mut graph = read_graph_def(path)?;
    let outputs = parse_outputs(outputs)?;
    let roots: Vec<&str> = outputs.iter().map(|r| r.node.as_str()).collect();
    extract_sub_graph(&mut graph, &roots).map_err(|e| Error::file(path, e))?;
    if let Some(v) = graph
        .nodes
        .iter()
        .find(|n| VARIABLE_OPS.contains(&n.op.as_str()))
    {
        return Err(Error::file(
            path,
            format!(
                "the graph is not frozen: node '{}' is a variable ({}); name the checkpoint \
                 prefix instead",
                v.name, v.op
            ),
        ));
    }
    graph.outputs = outputs;
    Ok(graph)
}

/// Sets `Graph::inputs` from the model spec (each must be a node of the frozen graph)
/// and applies `input_shapes` to those placeholders' `shape` attributes: a -1 in the
/// spec keeps the graph's dimension, an unknown graph dimension takes the spec's, and
/// a known dimension that differs is an error.
pub fn bind_model_spec(graph: &mut Graph, model: &ModelSpec) -> Result<()> {
    let mut inputs = Vec::with_capacity(model.inputs.len());
    for name in &model.inputs {
        let node_name = tensor_node(name);
        if graph.node(node_name).is_none() {
            return Err(Error::msg(format!(
                "input '{name}' is not a node of the graph cut to outputs [{}]",
                graph
                    .outputs
                    .iter()
                    .map(TensorRef::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        inputs.push(node_name.to_string());
    }
    for (name, dims) in &model.input_shapes {
        let node_name = tensor_node(name);
        if !inputs.iter().any(|i| i == node_name) {
            return Err(Error::msg(format!(
                "input_shapes names '{name}', which is not one of the model's inputs"
            )));
        }
        let node = graph
            .node_mut(node_name)
            .ok_or_else(|| Error::msg(format!("input '{name}' is not a node of the graph")))?;
        let merged = merge_shape(node.attrs.get("shape"), dims)
            .map_err(|e| Error::msg(format!("input '{name}' ({}): {e}", node.op)))?;
        node.attrs.insert("shape".into(), Attr::Shape(Some(merged)));
    }
    graph.inputs = inputs;
    Ok(())
}

fn merge_shape(current: Option<&Attr>, spec: &[i64]) -> Result<Vec<i64>, String> {
    let graph_dims = match current {
        Some(Attr::Shape(Some(d))) => Some(d.as_slice()),
        Some(Attr::Shape(None)) | None => None,
        Some(other) => return Err(format!("its shape attribute is not a shape: {other:?}")),
    };
    if spec.iter().any(|&d| d < -1) {
        return Err(format!("input_shapes {spec:?} has a dimension below -1"));
    }
    let Some(graph_dims) = graph_dims else {
        return Ok(spec.to_vec());
    };
    if graph_dims.len() != spec.len() {
        return Err(format!(
            "input_shapes {spec:?} has rank {}, the graph's shape {graph_dims:?} rank {}",
            spec.len(),
            graph_dims.len()
        ));
    }
    graph_dims
        .iter()
        .zip(spec)
        .map(|(&g, &s)| match (g, s) {
            (g, -1) => Ok(g),
            (-1, s) => Ok(s),
            (g, s) if g == s => Ok(g),
            _ => Err(format!(
                "input_shapes {spec:?} conflicts with the graph's shape {graph_dims:?}"
            )),
        })
        .collect()
}

/// Where a variable's value is in the checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct VariableKey {
    pub key: String,
    /// For one part of a partitioned variable: its place in the full tensor.
    pub slice: Option<SliceSpec>,
}

/// A `shape_and_slices` entry: the full tensor's shape and, per dimension, `(start, length)`.
#[derive(Debug, Clone, PartialEq)]
pub struct SliceSpec {
    pub full_shape: Vec<usize>,
    pub extents: Vec<(usize, usize)>,
}

impl SliceSpec {
    /// Parses TF's `"6 3 0,3:0,3"` form (`-` = whole dimension). An empty string is `None`.
    pub fn parse(s: &str) -> Result<Option<SliceSpec>> {
        let s = s.trim();
        if s.is_empty() {
            return Ok(None);
        }
        let bad = || Error::msg(format!("bad shape_and_slices entry '{s}'"));
        let mut parts: Vec<&str> = s.split(' ').collect();
        let slice = parts.pop().ok_or_else(bad)?;
        let full_shape = parts
            .iter()
            .map(|d| d.parse::<usize>().map_err(|_| bad()))
            .collect::<Result<Vec<_>>>()?;
        let extents = slice
            .split(':')
            .zip(&full_shape)
            .map(|(e, &dim)| {
                if e == "-" {
                    return Ok((0, dim));
                }
                let (a, b) = e.split_once(',').ok_or_else(bad)?;
                let (start, len) = (
                    a.parse::<usize>().map_err(|_| bad())?,
                    b.parse::<usize>().map_err(|_| bad())?,
                );
                match start.checked_add(len) {
                    Some(end) if end <= dim => Ok((start, len)),
                    _ => Err(bad()),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        if extents.len() != full_shape.len() || slice.split(':').count() != full_shape.len() {
            return Err(bad());
        }
        Ok(Some(SliceSpec {
            full_shape,
            extents,
        }))
    }

    pub fn shape(&self) -> Vec<usize> {
        self.extents.iter().map(|&(_, len)| len).collect()
    }

    /// The part of `full` this slice covers.
    pub fn extract(&self, full: &Tensor) -> Result<Tensor> {
        if full.shape() != self.full_shape.as_slice() {
            return Err(Error::msg(format!(
                "the checkpoint tensor has shape {:?}, the slice expects {:?}",
                full.shape(),
                self.full_shape
            )));
        }
        let shape = self.shape();
        let runs = self.runs();
        match full.data() {
            TensorData::Bytes(b) => {
                let size = full.dtype().size().unwrap_or(1);
                let mut out = Vec::with_capacity(num_elements(&shape).unwrap_or(0) * size);
                for (start, len) in runs {
                    out.extend_from_slice(&b[start * size..(start + len) * size]);
                }
                Ok(Tensor::from_bytes(full.dtype(), shape, out)?)
            }
            TensorData::Strings(s) => {
                let mut out = Vec::new();
                for (start, len) in runs {
                    out.extend_from_slice(&s[start..start + len]);
                }
                Ok(Tensor::from_strings(shape, out)?)
            }
        }
    }

    /// Contiguous `(first element, count)` runs of the slice in the full tensor, in order.
    fn runs(&self) -> Vec<(usize, usize)> {
        let rank = self.full_shape.len();
        if rank == 0 {
            return vec![(0, 1)];
        }
        let shape = self.shape();
        if shape.contains(&0) {
            return Vec::new();
        }
        let mut strides = vec![1usize; rank];
        for d in (0..rank - 1).rev() {
            strides[d] = strides[d + 1] * self.full_shape[d + 1];
        }
        let inner = shape[rank - 1];
        let mut runs = Vec::new();
        let mut idx = vec![0usize; rank - 1];
        loop {
            let start: usize = (0..rank)
                .map(|d| {
                    let i = if d < rank - 1 { idx[d] } else { 0 };
                    (self.extents[d].0 + i) * strides[d]
                })
                .sum();
            runs.push((start, inner));
            let mut d = rank - 1;
            loop {
                if d == 0 {
                    return runs;
                }
                d -= 1;
                idx[d] += 1;
                if idx[d] < shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
    }
}

/// Maps every variable node of the (uncut) graph to its checkpoint key.
pub fn variable_keys(
    graph: &Graph,
    saver: Option<&SaverDef>,
    variables: &[super::proto::VariableDef],
) -> Result<HashMap<String, VariableKey>> {
    let mut keys = restore_graph_keys(graph, saver)?;
    for vd in variables {
        let node = tensor_node(&vd.variable_name);
        if keys.contains_key(node) {
            continue;
        }
        if let Some(info) = &vd.save_slice_info_def {
            let to_usize = |v: &[i64]| -> Option<Vec<usize>> {
                v.iter().map(|&d| usize::try_from(d).ok()).collect()
            };
            let (Some(full), Some(off), Some(len)) = (
                to_usize(&info.full_shape),
                to_usize(&info.var_offset),
                to_usize(&info.var_shape),
            ) else {
                return Err(Error::msg(format!(
                    "variable '{node}': save_slice_info_def has negative dimensions"
                )));
            };
            if full.len() != off.len() || full.len() != len.len() {
                return Err(Error::msg(format!(
                    "variable '{node}': save_slice_info_def ranks disagree"
                )));
            }
            keys.insert(
                node.to_string(),
                VariableKey {
                    key: info.full_name.clone(),
                    slice: Some(SliceSpec {
                        full_shape: full,
                        extents: off.into_iter().zip(len).collect(),
                    }),
                },
            );
        }
    }
    for n in &graph.nodes {
        if !VARIABLE_OPS.contains(&n.op.as_str()) || keys.contains_key(&n.name) {
            continue;
        }
        let key = match (n.op.as_str(), n.attrs.get("shared_name")) {
            ("VarHandleOp", Some(Attr::Str(s))) if !s.is_empty() => {
                String::from_utf8_lossy(s).into_owned()
            }
            _ => n.name.clone(),
        };
        keys.insert(n.name.clone(), VariableKey { key, slice: None });
    }
    Ok(keys)
}

/// Keys from the restore ops: `RestoreV2` output `i` restores `tensor_names[i]`
/// (slice `shape_and_slices[i]`) into the variable that an `Assign`/`AssignVariableOp`
/// fed by that output (directly or through `Identity` nodes) writes.
fn restore_graph_keys(
    graph: &Graph,
    saver: Option<&SaverDef>,
) -> Result<HashMap<String, VariableKey>> {
    let scope = saver
        .and_then(|s| s.restore_op_name.rsplit_once('/'))
        .map(|(scope, _)| format!("{scope}/"));
    let index = graph.index()?;
    let mut consumers: HashMap<(&str, u32), Vec<usize>> = HashMap::new();
    for (i, n) in graph.nodes.iter().enumerate() {
        for r in &n.inputs {
            consumers
                .entry((r.node.as_str(), r.index))
                .or_default()
                .push(i);
        }
    }
    let string_const = |r: Option<&TensorRef>| -> Option<Vec<String>> {
        let node = &graph.nodes[*index.get(r?.node.as_str())?];
        let strings = node.const_value()?.strings()?;
        Some(
            strings
                .iter()
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect(),
        )
    };
    let mut keys = HashMap::new();
    for restore in graph.nodes.iter().filter(|n| n.op == "RestoreV2") {
        if let Some(scope) = &scope {
            if !restore.name.starts_with(scope.as_str()) {
                continue;
            }
        }
        let ctx = |msg: &str| Error::msg(format!("restore op '{}': {msg}", restore.name));
        let names = string_const(restore.inputs.get(1))
            .ok_or_else(|| ctx("tensor_names is not a string Const"))?;
        let slices = string_const(restore.inputs.get(2))
            .ok_or_else(|| ctx("shape_and_slices is not a string Const"))?;
        if slices.len() != names.len() {
            return Err(ctx("tensor_names and shape_and_slices differ in length"));
        }
        for (i, (name, slice)) in names.iter().zip(&slices).enumerate() {
            let slice = SliceSpec::parse(slice).map_err(|e| ctx(&e.to_string()))?;
            let mut frontier = vec![(restore.name.as_str(), i as u32)];
            let mut seen = HashSet::new();
            while let Some(t) = frontier.pop() {
                if !seen.insert(t) {
                    continue;
                }
                for &c in consumers.get(&t).map_or(&[][..], Vec::as_slice) {
                    let n = &graph.nodes[c];
                    let writes_value =
                        n.inputs.get(1).map(|r| (r.node.as_str(), r.index)) == Some(t);
                    match n.op.as_str() {
                        "Identity" => frontier.push((n.name.as_str(), 0)),
                        "Assign" | "AssignVariableOp" if writes_value => {
                            let var = &n.inputs[0].node;
                            keys.entry(var.clone()).or_insert_with(|| VariableKey {
                                key: name.clone(),
                                slice: slice.clone(),
                            });
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    Ok(keys)
}

/// Reads a variable's value and checks it against the variable's `dtype` and `shape`.
pub(crate) fn load_variable(bundle: &Bundle, node: &Node, vk: &VariableKey) -> Result<Tensor> {
    let what = format!("variable '{}' ({})", node.name, node.op);
    if !bundle.contains(&vk.key) {
        return Err(Error::msg(format!(
            "{what}: the checkpoint {} has no tensor '{}'",
            bundle.index_path().display(),
            vk.key
        )));
    }
    let full = bundle
        .read(&vk.key)
        .map_err(|e| Error::msg(format!("{what}: {e}")))?;
    let value = match &vk.slice {
        Some(slice) => slice
            .extract(&full)
            .map_err(|e| Error::msg(format!("{what}, checkpoint tensor '{}': {e}", vk.key)))?,
        None => full,
    };
    let dtype = node.attr_type("dtype")?;
    if value.dtype() != dtype {
        return Err(Error::msg(format!(
            "{what} is {dtype}, but checkpoint tensor '{}' is {}",
            vk.key,
            value.dtype()
        )));
    }
    if let Some(Attr::Shape(Some(dims))) = node.attrs.get("shape") {
        let fits = dims.len() == value.shape().len()
            && dims
                .iter()
                .zip(value.shape())
                .all(|(&d, &v)| d < 0 || d as usize == v);
        if !fits {
            return Err(Error::msg(format!(
                "{what} has shape {dims:?}, but checkpoint tensor '{}' has shape {:?}",
                vk.key,
                value.shape()
            )));
        }
    }
    Ok(value)
}

/// Whether an op only makes sense on a live variable (so it cannot be frozen).
fn uses_variable_state(op: &str) -> bool {
    op.starts_with("Assign")
        || op.starts_with("Scatter")
        || op.starts_with("ResourceScatter")
        || op.starts_with("Apply")
        || op.starts_with("ResourceApply")
        || op.starts_with("SparseApply")
        || op.starts_with("ResourceSparseApply")
        || matches!(
            op,
            "IsVariableInitialized" | "VarIsInitializedOp" | "CountUpTo" | "DestroyResourceOp"
        )
}

/// Replaces every variable of the cut graph by a `Const` holding what `load` gives
/// for it, and rewrites its readers.
pub fn convert_variables(
    graph: &mut Graph,
    keys: &HashMap<String, VariableKey>,
    load: &mut dyn FnMut(&Node, &VariableKey) -> Result<Tensor>,
) -> Result<()> {
    let mut handles: Vec<(String, DType)> = Vec::new();
    let mut refs: Vec<String> = Vec::new();
    for node in graph.nodes.iter_mut() {
        if !VARIABLE_OPS.contains(&node.op.as_str()) {
            continue;
        }
        let vk = keys
            .get(&node.name)
            .ok_or_else(|| Error::msg(format!("variable '{}' has no checkpoint key", node.name)))?;
        let value = load(node, vk)?;
        if node.op == "VarHandleOp" {
            handles.push((node.name.clone(), value.dtype()));
        } else {
            refs.push(node.name.clone());
        }
        *node = Node::constant(node.name.clone(), value);
    }

    let consumers = graph.consumers();
    for var in &refs {
        for &c in consumers.get(var).map_or(&[][..], Vec::as_slice) {
            let n = &graph.nodes[c];
            if uses_variable_state(&n.op) {
                return Err(Error::msg(format!(
                    "node '{}' ({}) changes variable '{var}' and is needed by the outputs, \
                     so the graph cannot be frozen",
                    n.name, n.op
                )));
            }
        }
    }

    let mut added: Vec<Node> = Vec::new();
    let mut done: HashSet<String> = HashSet::new();
    let mut queue = handles;
    while let Some((handle, dtype)) = queue.pop() {
        for &c in consumers.get(&handle).map_or(&[][..], Vec::as_slice) {
            let n = &mut graph.nodes[c];
            if !done.insert(n.name.clone()) {
                continue;
            }
            match n.op.as_str() {
                "ReadVariableOp" => *n = read_as_identity(n)?,
                "ResourceGather" => {
                    let (gather, axis) = gather_as_gather_v2(n)?;
                    *n = gather;
                    added.push(axis);
                }
                "ResourceGatherNd" => *n = gather_nd(n)?,
                op if HANDLE_PASSING_OPS.contains(&op)
                    && n.attrs.get("T") == Some(&Attr::Type(DType::Resource)) =>
                {
                    n.attrs.insert("T".into(), Attr::Type(dtype));
                    n.attrs.remove("_output_shapes");
                    queue.push((n.name.clone(), dtype));
                }
                op => {
                    return Err(Error::msg(format!(
                        "node '{}' ({op}) uses resource variable '{handle}' in a way that \
                         cannot be frozen",
                        n.name
                    )))
                }
            }
        }
    }
    for axis in added {
        if graph.node(&axis.name).is_some() {
            return Err(Error::msg(format!(
                "cannot add the gather axis constant '{}': a node of that name exists",
                axis.name
            )));
        }
        graph.nodes.push(axis);
    }
    Ok(())
}

/// `ReadVariableOp` → `Identity` with `T` = its `dtype`, same inputs, `_class` kept.
fn read_as_identity(n: &Node) -> Result<Node> {
    let mut out = Node::new(n.name.clone(), "Identity");
    out.inputs = n.inputs.clone();
    out.control_inputs = n.control_inputs.clone();
    out.attrs
        .insert("T".into(), Attr::Type(n.attr_type("dtype")?));
    copy_class(n, &mut out);
    Ok(out)
}

/// `ResourceGather` → `GatherV2(params, indices, <name>/axis)` plus the axis `Const`.
fn gather_as_gather_v2(n: &Node) -> Result<(Node, Node)> {
    let batch_dims = match n.attrs.get("batch_dims") {
        Some(Attr::Int(b)) => *b,
        None => 0,
        Some(_) => return Err(n.attr_int("batch_dims").unwrap_err().into()),
    };
    if batch_dims != 0 {
        return Err(Error::msg(format!(
            "node '{}' (ResourceGather) has batch_dims {batch_dims}; only 0 can be frozen",
            n.name
        )));
    }
    let tindices = n.attr_type("Tindices")?;
    let axis_value = match tindices {
        DType::I32 => Tensor::scalar(0i32),
        DType::I64 => Tensor::scalar(0i64),
        d => {
            return Err(Error::msg(format!(
                "node '{}' (ResourceGather) has Tindices {d}",
                n.name
            )))
        }
    };
    let [params, indices] = two_inputs(n)?;
    let axis_name = format!("{}/axis", n.name);
    let axis = Node::constant(axis_name.clone(), axis_value);
    let mut out = Node::new(n.name.clone(), "GatherV2")
        .with_input(params)
        .with_input(indices)
        .with_input(TensorRef::new(axis_name, 0))
        .with_attr("Tparams", Attr::Type(n.attr_type("dtype")?))
        .with_attr("Tindices", Attr::Type(tindices))
        .with_attr("Taxis", Attr::Type(tindices));
    copy_class(n, &mut out);
    Ok((out, axis))
}

/// `ResourceGatherNd` → `GatherNd(params, indices)`.
fn gather_nd(n: &Node) -> Result<Node> {
    let [params, indices] = two_inputs(n)?;
    let mut out = Node::new(n.name.clone(), "GatherNd")
        .with_input(params)
        .with_input(indices)
        .with_attr("Tparams", Attr::Type(n.attr_type("dtype")?))
        .with_attr("Tindices", Attr::Type(n.attr_type("Tindices")?));
    copy_class(n, &mut out);
    Ok(out)
}

fn two_inputs(n: &Node) -> Result<[TensorRef; 2]> {
    match n.inputs.as_slice() {
        [a, b] => Ok([a.clone(), b.clone()]),
        _ => Err(Error::msg(format!(
            "node '{}' ({}) has {} inputs, expected 2",
            n.name,
            n.op,
            n.inputs.len()
        ))),
    }
}

fn copy_class(from: &Node, to: &mut Node) {
    if let Some(c) = from.attrs.get("_class") {
        to.attrs.insert("_class".into(), c.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_specs_parse_and_extract() {
        assert_eq!(SliceSpec::parse("").unwrap(), None);
        let s = SliceSpec::parse("6 3 3,3:-").unwrap().unwrap();
        assert_eq!(s.full_shape, [6, 3]);
        assert_eq!(s.extents, [(3, 3), (0, 3)]);
        let full = Tensor::from_vec(vec![6, 3], &(0..18).map(|v| v as f32).collect::<Vec<_>>());
        let part = s.extract(&full).unwrap();
        assert_eq!(part.shape(), [3, 3]);
        assert_eq!(
            part.values::<f32>().unwrap(),
            (9..18).map(|v| v as f32).collect::<Vec<_>>()
        );
        let s = SliceSpec::parse("2 3 4 0,2:1,2:2,2").unwrap().unwrap();
        let full = Tensor::from_vec(vec![2, 3, 4], &(0..24).collect::<Vec<i32>>());
        assert_eq!(
            s.extract(&full).unwrap().values::<i32>().unwrap(),
            [6, 7, 10, 11, 18, 19, 22, 23]
        );
        assert!(SliceSpec::parse("6 3 5,3:-").is_err());
        assert!(SliceSpec::parse("6 3 0,3").is_err());
        assert!(SliceSpec::parse("x 0,1").is_err());
        let wrong = Tensor::from_vec(vec![3], &[1i32, 2, 3]);
        assert!(s.extract(&wrong).is_err());
    }

    #[test]
    fn checkpoint_prefix_strips_file_suffixes() {
        let p = |s: &str| checkpoint_prefix(Path::new(s)).unwrap();
        assert_eq!(p("/x/best.meta"), PathBuf::from("/x/best"));
        assert_eq!(p("/x/best.index"), PathBuf::from("/x/best"));
        assert_eq!(p("/x/best.data-00001-of-00002"), PathBuf::from("/x/best"));
        assert_eq!(p("/x/best"), PathBuf::from("/x/best"));
        assert_eq!(p("/x/my.data-set"), PathBuf::from("/x/my.data-set"));
    }

    #[test]
    fn input_shapes_merge_with_the_graph() {
        let g = Attr::Shape(Some(vec![-1, 40]));
        assert_eq!(merge_shape(Some(&g), &[1, -1]).unwrap(), [1, 40]);
        assert_eq!(merge_shape(Some(&g), &[8, 40]).unwrap(), [8, 40]);
        assert!(merge_shape(Some(&g), &[8, 41]).is_err());
        assert!(merge_shape(Some(&g), &[8]).is_err());
        assert_eq!(
            merge_shape(Some(&Attr::Shape(None)), &[2, 3]).unwrap(),
            [2, 3]
        );
        assert_eq!(merge_shape(None, &[2]).unwrap(), [2]);
    }

    fn keys_of(g: &Graph) -> HashMap<String, VariableKey> {
        variable_keys(g, None, &[]).unwrap()
    }

    fn freeze_with_ones(g: &mut Graph) -> Result<()> {
        let keys = keys_of(g);
        convert_variables(g, &keys, &mut |node, _| {
            let dims = match node.attrs.get("shape") {
                Some(Attr::Shape(Some(d))) => d.iter().map(|&d| d as usize).collect(),
                _ => vec![],
            };
            let n = num_elements(&dims).unwrap();
            Ok(Tensor::from_vec(dims, &vec![1.0f32; n]))
        })
    }

    fn handle(name: &str) -> Node {
        Node::new(name, "VarHandleOp")
            .with_attr("dtype", Attr::Type(DType::F32))
            .with_attr("shape", Attr::Shape(Some(vec![2])))
            .with_attr("shared_name", Attr::Str(name.as_bytes().to_vec()))
    }

    #[test]
    fn handles_passed_through_identity_and_merge_are_retyped() {
        let mut g = Graph::default();
        g.nodes.push(handle("v"));
        g.nodes.push(
            Node::new("v/id", "Identity")
                .with_input(TensorRef::new("v", 0))
                .with_attr("T", Attr::Type(DType::Resource))
                .with_attr("_output_shapes", Attr::Shapes(vec![Some(vec![])])),
        );
        g.nodes.push(
            Node::new("m", "Merge")
                .with_input(TensorRef::new("v/id", 0))
                .with_attr("T", Attr::Type(DType::Resource)),
        );
        g.nodes.push(
            Node::new("read", "ReadVariableOp")
                .with_input(TensorRef::new("m", 0))
                .with_attr("dtype", Attr::Type(DType::F32)),
        );
        freeze_with_ones(&mut g).unwrap();
        assert_eq!(g.node("v").unwrap().op, "Const");
        let id = g.node("v/id").unwrap();
        assert_eq!(id.attr_type("T").unwrap(), DType::F32);
        assert!(!id.attrs.contains_key("_output_shapes"));
        assert_eq!(g.node("m").unwrap().attr_type("T").unwrap(), DType::F32);
        assert_eq!(g.node("read").unwrap().op, "Identity");
    }

    #[test]
    fn state_changing_readers_cannot_be_frozen() {
        let mut g = Graph::default();
        g.nodes.push(handle("v"));
        g.nodes.push(
            Node::new("assign", "AssignVariableOp")
                .with_input(TensorRef::new("v", 0))
                .with_input(TensorRef::new("x", 0)),
        );
        let e = freeze_with_ones(&mut g).unwrap_err().to_string();
        assert!(
            e.contains("'assign' (AssignVariableOp)") && e.contains("'v'"),
            "{e}"
        );

        let mut g = Graph::default();
        g.nodes.push(
            Node::new("w", "VariableV2")
                .with_attr("dtype", Attr::Type(DType::F32))
                .with_attr("shape", Attr::Shape(Some(vec![2]))),
        );
        g.nodes.push(
            Node::new("upd", "AssignAdd")
                .with_input(TensorRef::new("w", 0))
                .with_input(TensorRef::new("d", 0)),
        );
        let e = freeze_with_ones(&mut g).unwrap_err().to_string();
        assert!(e.contains("'upd' (AssignAdd) changes variable 'w'"), "{e}");
    }

    #[test]
    fn default_keys_are_shared_name_then_op_name() {
        let mut g = Graph::default();
        g.nodes
            .push(handle("h").with_attr("shared_name", Attr::Str(b"other".to_vec())));
        g.nodes.push(Node::new("r", "VariableV2"));
        let keys = keys_of(&g);
        assert_eq!(keys["h"].key, "other");
        assert_eq!(keys["r"].key, "r");
    }

    #[test]
    fn resource_readers_are_rewritten_like_tf() {
        let read = Node::new("r", "ReadVariableOp")
            .with_input(TensorRef::new("v", 0))
            .with_attr("dtype", Attr::Type(DType::F32))
            .with_attr("_class", Attr::Strs(vec![b"loc:@v".to_vec()]))
            .with_attr("_output_shapes", Attr::Shapes(vec![Some(vec![2])]));
        let id = read_as_identity(&read).unwrap();
        assert_eq!(id.op, "Identity");
        assert_eq!(id.attrs.keys().collect::<Vec<_>>(), ["T", "_class"]);
        assert_eq!(id.attr_type("T").unwrap(), DType::F32);

        let gather = Node::new("g", "ResourceGather")
            .with_input(TensorRef::new("v", 0))
            .with_input(TensorRef::new("ids", 0))
            .with_attr("dtype", Attr::Type(DType::F32))
            .with_attr("Tindices", Attr::Type(DType::I64))
            .with_attr("batch_dims", Attr::Int(0));
        let (g, axis) = gather_as_gather_v2(&gather).unwrap();
        assert_eq!(g.op, "GatherV2");
        assert_eq!(g.inputs[2], TensorRef::new("g/axis", 0));
        assert_eq!(g.attr_type("Taxis").unwrap(), DType::I64);
        assert_eq!(axis.const_value().unwrap().values::<i64>().unwrap(), [0]);
        let bad = gather.with_attr("batch_dims", Attr::Int(1));
        let e = gather_as_gather_v2(&bad).unwrap_err().to_string();
        assert!(e.contains("'g'") && e.contains("batch_dims 1"), "{e}");
    }
}
