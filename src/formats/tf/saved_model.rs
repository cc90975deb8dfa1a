//! TF2 SavedModels (`saved_model.pb` + `variables/`): signatures, and freezing one
//! signature into a graph of constants, as TensorFlow's `convert_variables_to_constants_v2`
//! does.
//!
//! 1. Pick the `MetaGraphDef` whose tags are the requested ones and the signature.
//! 2. Cut the outer graph to the signature's outputs (data edges only: what a frozen
//!    inference graph computes does not depend on control edges once every variable is
//!    a constant).
//! 3. Map each variable handle that a call captures to its checkpoint key: the called
//!    function's `SavedConcreteFunction.bound_inputs` name object-graph nodes for its
//!    trailing inputs, and the same node ids index the checkpoint's
//!    `_CHECKPOINTABLE_OBJECT_GRAPH`, whose `VARIABLE_VALUE` attribute holds the key.
//! 4. Inline `StatefulPartitionedCall` / `PartitionedCall` (and direct calls of a
//!    library function), nested ones too. A body node `n` of call `c` becomes `c/n`,
//!    as TensorFlow's inliner names it; `node:out_arg:index` inputs become flat output
//!    indices through the op table ([`crate::ir::op::output_args`]).
//!    `If`/`StatelessIf` with a constant condition inline the branch taken; other
//!    version-2 control flow is an error naming the node.
//! 5. Rename the signature's placeholders to its input keys and add an `Identity` per
//!    output key, so that recipes, data sets and reports use the signature's names.
//! 6. Replace variables with constants and rewrite their readers (shared with TF1
//!    freezing: [`super::freeze::convert_variables`]).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};

use prost::Message;

use super::checkpoint::Bundle;
use super::freeze::{convert_variables, VariableKey};
use super::graph_def::{extract_sub_graph, graph_from_proto};
use super::proto::{
    attr_value, AttrValue, FunctionDef, FunctionDefLibrary, GraphDef, MetaGraphDef, NodeDef,
    SavedModel, SavedObjectGraph, SignatureDef, TensorInfo, TrackableObjectGraph, VersionDef,
};
use crate::error::{Error, Result};
use crate::ir::op::{output_args, ArgLen};
use crate::ir::{Graph, Node, TensorRef};
use crate::progress::{Progress, Unit};

/// The signature used when a recipe names none.
pub const DEFAULT_SIGNATURE: &str = "serving_default";
/// The tag set used when a recipe names none.
pub const DEFAULT_TAGS: &[&str] = &["serve"];
/// The checkpoint tensor holding the serialized `TrackableObjectGraph`.
const OBJECT_GRAPH_KEY: &str = "_CHECKPOINTABLE_OBJECT_GRAPH";
/// Inlined nodes at most, so that a recursive or exploding library is an error, not a hang.
const MAX_INLINED_NODES: usize = 4_000_000;
/// Nested calls at most.
const MAX_CALL_DEPTH: usize = 64;

/// `DIR/saved_model.pb`
pub fn pb_path(dir: &Path) -> PathBuf {
    dir.join("saved_model.pb")
}

/// `DIR/variables/variables`, the bundle prefix.
pub fn variables_prefix(dir: &Path) -> PathBuf {
    dir.join("variables").join("variables")
}

/// Whether `dir` looks like a SavedModel directory.
pub fn is_saved_model_dir(dir: &Path) -> bool {
    dir.is_dir() && pb_path(dir).is_file()
}

/// Decodes `saved_model.pb` bytes; the error says why they are not a SavedModel.
pub fn decode_saved_model(bytes: &[u8]) -> Result<SavedModel> {
    let sm = SavedModel::decode(bytes).map_err(|e| Error::msg(format!("not a SavedModel: {e}")))?;
    if sm.meta_graphs.is_empty() {
        return Err(Error::msg("not a SavedModel: it holds no MetaGraphDef"));
    }
    Ok(sm)
}

/// Reads `DIR/saved_model.pb`. Errors name the file.
pub fn read_saved_model(dir: &Path) -> Result<SavedModel> {
    let path = pb_path(dir);
    if !dir.is_dir() {
        return Err(Error::file(dir, "is not a SavedModel directory"));
    }
    if !path.is_file() {
        return Err(Error::file(
            dir,
            "has no saved_model.pb (is it a SavedModel directory?)",
        ));
    }
    let bytes = crate::error::read_file(&path)?;
    decode_saved_model(&bytes).map_err(|e| Error::file(&path, e))
}

/// The MetaGraphDef whose tag set is `tags` (order does not matter).
pub fn select_meta_graph(sm: SavedModel, tags: &[String]) -> Result<MetaGraphDef> {
    let want: HashSet<&str> = tags.iter().map(String::as_str).collect();
    let mut available = Vec::new();
    for mg in sm.meta_graphs {
        let have: Vec<String> = mg
            .meta_info_def
            .as_ref()
            .map(|i| i.tags.clone())
            .unwrap_or_default();
        if have.iter().map(String::as_str).collect::<HashSet<_>>() == want {
            return Ok(mg);
        }
        available.push(format!("{have:?}"));
    }
    Err(Error::msg(format!(
        "no MetaGraphDef has tags {tags:?} (it has {})",
        available.join(", ")
    )))
}

/// One tensor of a signature: its key, graph tensor name, dtype and shape.
#[derive(Debug, Clone, PartialEq)]
pub struct SignatureTensor {
    pub key: String,
    pub tensor: String,
    pub dtype: String,
    /// `None`: unknown rank; -1: unknown dimension.
    pub shape: Option<Vec<i64>>,
}

/// A signature's inputs and outputs, in key order.
#[derive(Debug, Clone, PartialEq)]
pub struct Signature {
    pub name: String,
    pub inputs: Vec<SignatureTensor>,
    pub outputs: Vec<SignatureTensor>,
}

fn signature_tensors(
    map: &BTreeMap<String, TensorInfo>,
    sig: &str,
) -> Result<Vec<SignatureTensor>> {
    use super::proto::tensor_info::Encoding;
    map.iter()
        .map(|(key, info)| {
            let tensor = match &info.encoding {
                Some(Encoding::Name(n)) if !n.is_empty() => n.clone(),
                _ => {
                    return Err(Error::msg(format!(
                        "signature '{sig}': tensor '{key}' is not a dense tensor; only dense \
                         inputs and outputs are supported"
                    )))
                }
            };
            let shape = info
                .tensor_shape
                .as_ref()
                .and_then(|s| (!s.unknown_rank).then(|| s.dim.iter().map(|d| d.size).collect()));
            Ok(SignatureTensor {
                key: key.clone(),
                tensor,
                dtype: super::proto::dtype_name(info.dtype),
                shape,
            })
        })
        .collect()
}

/// Every signature of a MetaGraphDef except TF's internal `__saved_model_init_op`.
pub fn signatures(mg: &MetaGraphDef) -> Result<Vec<Signature>> {
    mg.signature_def
        .iter()
        .filter(|(name, _)| !name.starts_with("__"))
        .map(|(name, s)| signature_of(name, s))
        .collect()
}

fn signature_of(name: &str, s: &SignatureDef) -> Result<Signature> {
    Ok(Signature {
        name: name.to_string(),
        inputs: signature_tensors(&s.inputs, name)?,
        outputs: signature_tensors(&s.outputs, name)?,
    })
}

/// The named signature; an unknown name is an error listing the available ones.
pub fn find_signature(mg: &MetaGraphDef, name: &str) -> Result<Signature> {
    match mg.signature_def.get(name) {
        Some(s) => signature_of(name, s),
        None => {
            let names: Vec<&str> = mg
                .signature_def
                .keys()
                .map(String::as_str)
                .filter(|n| !n.starts_with("__"))
                .collect();
            Err(Error::msg(format!(
                "no signature '{name}' (the SavedModel has {names:?})"
            )))
        }
    }
}

/// Reads a SavedModel directory's signature (for the recipe: its input and output keys).
/// Errors name `saved_model.pb`.
pub fn read_signature(dir: &Path, tags: &[String], signature: &str) -> Result<Signature> {
    let sm = read_saved_model(dir)?;
    let path = pb_path(dir);
    let mg = select_meta_graph(sm, tags).map_err(|e| Error::file(&path, e))?;
    find_signature(&mg, signature).map_err(|e| Error::file(&path, e))
}

/// The function library of a MetaGraphDef's graph, decoded, by name.
pub fn function_library(gd: &GraphDef) -> Result<HashMap<String, FunctionDef>> {
    let lib = FunctionDefLibrary::decode(gd.library.as_slice())
        .map_err(|e| Error::msg(format!("the function library does not decode: {e}")))?;
    let mut out = HashMap::with_capacity(lib.function.len());
    for (i, bytes) in lib.function.iter().enumerate() {
        let f = FunctionDef::decode(bytes.as_slice())
            .map_err(|e| Error::msg(format!("function {i} of the library does not decode: {e}")))?;
        let name = f
            .signature
            .as_ref()
            .map(|s| s.name.clone())
            .unwrap_or_default();
        if name.is_empty() {
            return Err(Error::msg(format!(
                "function {i} of the library has no name"
            )));
        }
        if out.insert(name.clone(), f).is_some() {
            return Err(Error::msg(format!("function '{name}' is defined twice")));
        }
    }
    Ok(out)
}

/// The checkpoint's object graph, from its `_CHECKPOINTABLE_OBJECT_GRAPH` string tensor.
pub fn checkpoint_object_graph(bundle: &Bundle) -> Result<TrackableObjectGraph> {
    let index = bundle.index_path().display().to_string();
    if !bundle.contains(OBJECT_GRAPH_KEY) {
        return Err(Error::msg(format!(
            "{index}: no '{OBJECT_GRAPH_KEY}' tensor (not an object-based TF2 checkpoint)"
        )));
    }
    let t = bundle.read(OBJECT_GRAPH_KEY)?;
    let bytes = match t.strings() {
        Some([s]) => s,
        _ => {
            return Err(Error::msg(format!(
                "{index}: '{OBJECT_GRAPH_KEY}' is not a scalar string"
            )))
        }
    };
    TrackableObjectGraph::decode(bytes.as_slice()).map_err(|e| {
        Error::msg(format!(
            "{index}: '{OBJECT_GRAPH_KEY}' is not a TrackableObjectGraph: {e}"
        ))
    })
}

/// The checkpoint key of object-graph node `id` (its `VARIABLE_VALUE` attribute).
fn variable_value_key(ckpt: &TrackableObjectGraph, id: i32) -> Option<&str> {
    let node = ckpt.nodes.get(usize::try_from(id).ok()?)?;
    node.attributes
        .iter()
        .find(|a| a.name == "VARIABLE_VALUE")
        .map(|a| a.checkpoint_key.as_str())
}

/// The function a call node runs: `f` of a (Stateful)PartitionedCall, or the op itself
/// when it names a library function.
fn called_function<'a>(nd: &'a NodeDef, library: &HashMap<String, FunctionDef>) -> Option<&'a str> {
    match nd.op.as_str() {
        "StatefulPartitionedCall" | "PartitionedCall" => match nd.attr.get("f") {
            Some(AttrValue {
                value: Some(attr_value::Value::Func(f)),
            }) => Some(f.name.as_str()),
            _ => Some(""),
        },
        op if library.contains_key(op) => Some(op),
        _ => None,
    }
}

fn data_inputs(nd: &NodeDef) -> impl Iterator<Item = &String> {
    nd.input.iter().filter(|i| !i.starts_with('^'))
}

/// The node and output index of an outer-graph input (`name` or `name:N`).
fn split_ref(s: &str) -> (&str, usize) {
    match s.rsplit_once(':') {
        Some((n, i)) => match i.parse() {
            Ok(i) => (n, i),
            Err(_) => (s, 0),
        },
        None => (s, 0),
    }
}

fn tensor_string(node: &str, index: usize) -> String {
    if index == 0 {
        node.to_string()
    } else {
        format!("{node}:{index}")
    }
}

/// Maps the variable handles captured by the outer graph's calls to checkpoint keys.
fn captured_variable_keys(
    outer: &[NodeDef],
    library: &HashMap<String, FunctionDef>,
    objects: &SavedObjectGraph,
    ckpt: &TrackableObjectGraph,
) -> Result<HashMap<String, VariableKey>> {
    let by_name: HashMap<&str, &NodeDef> = outer.iter().map(|n| (n.name.as_str(), n)).collect();
    let mut keys: HashMap<String, VariableKey> = HashMap::new();
    for call in outer {
        let Some(fname) = called_function(call, library) else {
            continue;
        };
        let Some(cf) = objects.concrete_functions.get(fname) else {
            continue;
        };
        let inputs: Vec<&String> = data_inputs(call).collect();
        let bound = &cf.bound_inputs;
        if bound.len() > inputs.len() {
            return Err(Error::msg(format!(
                "call '{}' of '{fname}' has {} inputs, but the object graph binds {} captures",
                call.name,
                inputs.len(),
                bound.len()
            )));
        }
        let first = inputs.len() - bound.len();
        for (k, (&input, &id)) in inputs[first..].iter().zip(bound).enumerate() {
            let (node, _) = split_ref(input);
            let Some(nd) = by_name.get(node) else {
                continue;
            };
            if nd.op != "VarHandleOp" {
                continue;
            }
            let what = || {
                format!(
                    "variable '{node}' (captured input {} of call '{}', object {id})",
                    first + k,
                    call.name
                )
            };
            let saved = usize::try_from(id).ok().and_then(|i| objects.nodes.get(i));
            let is_variable = matches!(
                saved.and_then(|o| o.kind.as_ref()),
                Some(super::proto::saved_object::Kind::Variable(_))
            );
            if !is_variable {
                return Err(Error::msg(format!(
                    "{}: the saved object graph has no variable at that node",
                    what()
                )));
            }
            let key = variable_value_key(ckpt, id).ok_or_else(|| {
                Error::msg(format!(
                    "{}: the checkpoint's object graph gives it no VARIABLE_VALUE",
                    what()
                ))
            })?;
            let vk = VariableKey {
                key: key.to_string(),
                slice: None,
            };
            if let Some(prev) = keys.insert(node.to_string(), vk.clone()) {
                if prev != vk {
                    return Err(Error::msg(format!(
                        "{}: mapped to both '{}' and '{}'",
                        what(),
                        prev.key,
                        vk.key
                    )));
                }
            }
        }
    }
    Ok(keys)
}

/// The outer nodes the given tensors need, through data edges, in graph order.
fn cut_outer(outer: Vec<NodeDef>, roots: &[&str]) -> Result<Vec<NodeDef>> {
    let index: HashMap<&str, usize> = outer
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.as_str(), i))
        .collect();
    let mut keep = vec![false; outer.len()];
    let mut stack = Vec::new();
    for r in roots {
        stack.push(*index.get(r).ok_or_else(|| {
            Error::msg(format!("signature tensor node '{r}' is not in the graph"))
        })?);
    }
    while let Some(i) = stack.pop() {
        if std::mem::replace(&mut keep[i], true) {
            continue;
        }
        for input in data_inputs(&outer[i]) {
            let (n, _) = split_ref(input);
            let j = *index.get(n).ok_or_else(|| {
                Error::msg(format!(
                    "node '{}' ({}) reads '{n}', which is not in the graph",
                    outer[i].name, outer[i].op
                ))
            })?;
            stack.push(j);
        }
    }
    Ok(outer
        .into_iter()
        .zip(keep)
        .filter_map(|(n, k)| k.then_some(n))
        .collect())
}

/// The flat output index of `out_arg:index` of body node `nd`.
fn flat_output(
    nd: &NodeDef,
    arg: &str,
    index: usize,
    library: &HashMap<String, FunctionDef>,
) -> Result<usize> {
    let list_len = |attr: &str, typed: bool| -> Result<usize> {
        let v = nd.attr.get(attr).and_then(|a| a.value.as_ref());
        match v {
            Some(attr_value::Value::I(n)) if !typed && *n >= 0 => Ok(*n as usize),
            Some(attr_value::Value::List(l)) if typed => Ok(l.r#type.len()),
            _ => Err(Error::msg(format!(
                "node '{}' ({}) has no usable attribute '{attr}'",
                nd.name, nd.op
            ))),
        }
    };
    let mut offset = 0usize;
    if let Some(f) = library.get(&nd.op) {
        let sig = f.signature.as_ref();
        for (i, a) in sig
            .map_or(&[][..], |s| &s.output_arg[..])
            .iter()
            .enumerate()
        {
            if a.name == arg && index == 0 {
                return Ok(i);
            }
        }
    } else if let Some(args) = output_args(&nd.op) {
        for &(name, len) in args {
            let n = match len {
                ArgLen::One => 1,
                ArgLen::Number(a) => list_len(a, false)?,
                ArgLen::TypeList(a) => list_len(a, true)?,
            };
            if name == arg {
                if index < n {
                    return Ok(offset + index);
                }
                break;
            }
            offset += n;
        }
    } else {
        return Err(Error::msg(format!(
            "node '{}' ({}): qpipe does not know the output arguments of op {} (needed to \
             resolve '{arg}:{index}')",
            nd.name, nd.op, nd.op
        )));
    }
    Err(Error::msg(format!(
        "node '{}' ({}) has no output '{arg}:{index}'",
        nd.name, nd.op
    )))
}

/// Where a call's outputs went once inlined: call name → its outputs' tensor strings.
type Aliases = HashMap<String, Vec<String>>;

/// Resolves `s` (`node` or `node:N`) through inlined calls.
fn resolve(s: &str, aliases: &Aliases) -> Result<String> {
    let mut cur = s.to_string();
    for _ in 0..=MAX_CALL_DEPTH * 4 {
        let (n, i) = split_ref(&cur);
        let Some(outs) = aliases.get(n) else {
            return Ok(cur);
        };
        cur = outs.get(i).cloned().ok_or_else(|| {
            Error::msg(format!(
                "'{cur}' reads output {i} of call '{n}', which has {}",
                outs.len()
            ))
        })?;
    }
    Err(Error::msg(format!(
        "'{s}' does not resolve (a cycle of calls)"
    )))
}

/// Inlines every call in `nodes` (outer graph, cut), nested calls too.
fn inline_calls(
    nodes: Vec<NodeDef>,
    library: &HashMap<String, FunctionDef>,
) -> Result<(Vec<NodeDef>, Aliases)> {
    let mut out: Vec<NodeDef> = Vec::with_capacity(nodes.len());
    let mut aliases: Aliases = HashMap::new();
    // (node, call depth)
    let mut queue: VecDeque<(NodeDef, usize)> = nodes.into_iter().map(|n| (n, 0)).collect();
    let mut total = 0usize;
    while let Some((nd, depth)) = queue.pop_front() {
        let is_if = matches!(nd.op.as_str(), "If" | "StatelessIf");
        if matches!(nd.op.as_str(), "While" | "StatelessWhile") {
            return Err(Error::msg(format!(
                "node '{}' ({}) is version-2 control flow, which qpipe cannot freeze",
                nd.name, nd.op
            )));
        }
        let fname: Option<String> = if is_if {
            Some(taken_branch(&nd, &out, &queue, &aliases)?)
        } else {
            called_function(&nd, library).map(str::to_string)
        };
        let Some(fname) = fname else {
            out.push(nd);
            continue;
        };
        let f = library.get(&fname).ok_or_else(|| {
            Error::msg(format!(
                "node '{}' ({}) calls function '{fname}', which is not in the library",
                nd.name, nd.op
            ))
        })?;
        if depth >= MAX_CALL_DEPTH {
            return Err(Error::msg(format!(
                "node '{}' ({}): calls nest deeper than {MAX_CALL_DEPTH} (recursive functions?)",
                nd.name, nd.op
            )));
        }
        let sig = f.signature.clone().unwrap_or_default();
        let mut inputs: Vec<&String> = data_inputs(&nd).collect();
        if is_if {
            inputs.remove(0);
        }
        if inputs.len() != sig.input_arg.len() {
            return Err(Error::msg(format!(
                "node '{}' ({}) passes {} inputs to function '{fname}', which takes {}",
                nd.name,
                nd.op,
                inputs.len(),
                sig.input_arg.len()
            )));
        }
        let args: HashMap<&str, &String> = sig
            .input_arg
            .iter()
            .map(|a| a.name.as_str())
            .zip(inputs.iter().copied())
            .collect();
        let body: HashMap<&str, &NodeDef> =
            f.node_def.iter().map(|b| (b.name.as_str(), b)).collect();
        let prefix = format!("{}/", nd.name);
        let rewrite = |input: &str| -> Result<String> {
            if let Some(a) = args.get(input) {
                return Ok((*a).clone());
            }
            let mut parts = input.splitn(3, ':');
            let (n, arg, idx) = (parts.next(), parts.next(), parts.next());
            match (n.and_then(|n| body.get(n)), arg, idx) {
                (Some(b), Some(arg), Some(idx)) => {
                    let idx: usize = idx.parse().map_err(|_| {
                        Error::msg(format!("function '{fname}': bad input '{input}'"))
                    })?;
                    let flat = flat_output(b, arg, idx, library)
                        .map_err(|e| Error::msg(format!("function '{fname}': {e}")))?;
                    Ok(tensor_string(&format!("{prefix}{}", b.name), flat))
                }
                (Some(b), None, None) => Ok(format!("{prefix}{}", b.name)),
                _ => Err(Error::msg(format!(
                    "function '{fname}': input '{input}' names no argument or node of the body"
                ))),
            }
        };
        for b in &f.node_def {
            let mut nb = b.clone();
            nb.name = format!("{prefix}{}", b.name);
            nb.input = b
                .input
                .iter()
                .filter(|i| !i.starts_with('^'))
                .map(|i| rewrite(i))
                .collect::<Result<_>>()?;
            total += 1;
            if total > MAX_INLINED_NODES {
                return Err(Error::msg(format!(
                    "inlining the calls gives more than {MAX_INLINED_NODES} nodes"
                )));
            }
            queue.push_back((nb, depth + 1));
        }
        let outs = sig
            .output_arg
            .iter()
            .map(|a| {
                let r = f.ret.get(&a.name).ok_or_else(|| {
                    Error::msg(format!(
                        "function '{fname}' does not bind its output '{}'",
                        a.name
                    ))
                })?;
                rewrite(r)
            })
            .collect::<Result<Vec<_>>>()?;
        aliases.insert(nd.name.clone(), outs);
    }
    for nd in &mut out {
        let mut new = Vec::with_capacity(nd.input.len());
        for i in &nd.input {
            if i.starts_with('^') {
                continue;
            }
            new.push(resolve(i, &aliases)?);
        }
        nd.input = new;
    }
    Ok((out, aliases))
}

/// The branch an `If` with a constant condition takes; any other `If` is an error.
fn taken_branch(
    nd: &NodeDef,
    done: &[NodeDef],
    pending: &VecDeque<(NodeDef, usize)>,
    aliases: &Aliases,
) -> Result<String> {
    let err = || {
        Error::msg(format!(
            "node '{}' ({}) is version-2 control flow with a condition that is not a \
             constant, which qpipe cannot freeze",
            nd.name, nd.op
        ))
    };
    let cond = data_inputs(nd).next().ok_or_else(err)?;
    let cond = resolve(cond, aliases)?;
    let (cn, _) = split_ref(&cond);
    let c = done
        .iter()
        .chain(pending.iter().map(|(n, _)| n))
        .find(|n| n.name == cn)
        .filter(|n| n.op == "Const")
        .ok_or_else(err)?;
    let value = match c.attr.get("value").and_then(|a| a.value.as_ref()) {
        Some(attr_value::Value::Tensor(t)) => super::tensor_proto::tensor_from_proto(t)?,
        _ => return Err(err()),
    };
    let truth = match value.dtype() {
        crate::ir::DType::Bool => value.values::<bool>().ok().and_then(|v| v.first().copied()),
        crate::ir::DType::I32 => value
            .values::<i32>()
            .ok()
            .and_then(|v| v.first().map(|&x| x != 0)),
        crate::ir::DType::F32 => value
            .values::<f32>()
            .ok()
            .and_then(|v| v.first().map(|&x| x != 0.0)),
        _ => None,
    };
    let truth = truth
        .filter(|_| value.shape().iter().product::<usize>() == 1)
        .ok_or_else(err)?;
    let branch = if truth { "then_branch" } else { "else_branch" };
    match nd.attr.get(branch).and_then(|a| a.value.as_ref()) {
        Some(attr_value::Value::Func(f)) => Ok(f.name.clone()),
        _ => Err(Error::msg(format!(
            "node '{}' ({}) has no function '{branch}'",
            nd.name, nd.op
        ))),
    }
}

/// Renames node `from` to `to`, fixing every reference to it (in `targets` too).
fn rename(nodes: &mut [NodeDef], targets: &mut [String], from: &str, to: &str) {
    for t in targets.iter_mut() {
        let (n, k) = split_ref(t);
        if n == from {
            *t = tensor_string(to, k);
        }
    }
    for nd in nodes.iter_mut() {
        if nd.name == from {
            nd.name = to.to_string();
        }
        for i in nd.input.iter_mut() {
            let (n, k) = split_ref(i);
            if n == from {
                *i = tensor_string(to, k);
            }
        }
    }
}

/// A name no node has, starting from `base`.
fn free_name(nodes: &[NodeDef], base: &str) -> String {
    let names: HashSet<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    (1..)
        .map(|i| format!("{base}_{i}"))
        .find(|n| !names.contains(n.as_str()))
        .unwrap_or_default()
}

/// A signature's graph before freezing: inputs and outputs named by the signature's
/// keys, calls inlined, variables still `VarHandleOp`s, with their checkpoint keys.
pub struct Unfrozen {
    pub graph: Graph,
    pub keys: HashMap<String, VariableKey>,
}

/// Builds [`Unfrozen`] for `signature` of a MetaGraphDef, cut to `outputs` (keys; empty
/// = all). `load_object_graph` gives the checkpoint's object graph, asked for only when
/// the outputs read variables.
pub fn signature_graph(
    mg: &MetaGraphDef,
    signature: &str,
    outputs: &[String],
    load_object_graph: &mut dyn FnMut() -> Result<TrackableObjectGraph>,
) -> Result<Unfrozen> {
    let sig = find_signature(mg, signature)?;
    let outputs: Vec<&SignatureTensor> = if outputs.is_empty() {
        sig.outputs.iter().collect()
    } else {
        outputs
            .iter()
            .map(|k| {
                sig.outputs.iter().find(|o| &o.key == k).ok_or_else(|| {
                    Error::msg(format!(
                        "signature '{}' has no output '{k}' (it has {:?})",
                        sig.name,
                        sig.outputs.iter().map(|o| &o.key).collect::<Vec<_>>()
                    ))
                })
            })
            .collect::<Result<_>>()?
    };
    let gd = mg.graph_def.clone().unwrap_or_default();
    let library = function_library(&gd)?;
    let roots: Vec<&str> = outputs.iter().map(|o| split_ref(&o.tensor).0).collect();
    let outer = cut_outer(gd.node, &roots)?;

    let keys = if outer.iter().any(|n| n.op == "VarHandleOp") {
        let ckpt = load_object_graph()?;
        let objects = mg.object_graph_def.clone().unwrap_or_default();
        captured_variable_keys(&outer, &library, &objects, &ckpt)?
    } else {
        HashMap::new()
    };
    if let Some(v) = outer
        .iter()
        .find(|n| n.op == "VarHandleOp" && !keys.contains_key(&n.name))
    {
        return Err(Error::msg(format!(
            "variable '{}' (VarHandleOp) is not mapped to a checkpoint value by the object \
             graph (no call of a saved concrete function captures it)",
            v.name
        )));
    }

    let (mut nodes, aliases) = inline_calls(outer, &library)?;
    let mut targets = outputs
        .iter()
        .map(|o| resolve(&o.tensor, &aliases))
        .collect::<Result<Vec<_>>>()?;

    // Placeholders take the signature's input keys; outputs become Identity nodes
    // named by the output keys. A node already holding such a name gets another one.
    let wanted = sig
        .inputs
        .iter()
        .filter_map(|i| {
            let (node, k) = split_ref(&i.tensor);
            (k == 0 && nodes.iter().any(|n| n.name == node)).then(|| (node.to_string(), &i.key))
        })
        .collect::<Vec<_>>();
    for (node, key) in wanted {
        if node == *key {
            continue;
        }
        if nodes.iter().any(|n| &n.name == key) {
            let free = free_name(&nodes, key);
            rename(&mut nodes, &mut targets, key, &free);
        }
        rename(&mut nodes, &mut targets, &node, key);
    }
    for o in &outputs {
        if nodes.iter().any(|n| n.name == o.key) {
            let free = free_name(&nodes, &o.key);
            rename(&mut nodes, &mut targets, &o.key, &free);
        }
    }
    let mut out_refs = Vec::new();
    for (o, target) in outputs.iter().zip(targets) {
        if !nodes.iter().any(|n| n.name == split_ref(&target).0) {
            return Err(Error::msg(format!(
                "signature output '{}' ({}) is not computed by the graph",
                o.key, o.tensor
            )));
        }
        let dtype = mg.signature_def[&sig.name].outputs[&o.key].dtype;
        let mut attr = BTreeMap::new();
        attr.insert(
            "T".to_string(),
            AttrValue {
                value: Some(attr_value::Value::Type(dtype)),
            },
        );
        nodes.push(NodeDef {
            name: o.key.clone(),
            op: "Identity".into(),
            input: vec![target],
            attr,
            ..NodeDef::default()
        });
        out_refs.push(TensorRef::new(o.key.clone(), 0));
    }

    let frozen = GraphDef {
        node: nodes,
        versions: Some(VersionDef {
            producer: gd.versions.as_ref().map_or(0, |v| v.producer),
            ..VersionDef::default()
        }),
        ..GraphDef::default()
    };
    let mut graph = graph_from_proto(&frozen)?;
    let roots: Vec<String> = out_refs.iter().map(|r| r.node.clone()).collect();
    let roots: Vec<&str> = roots.iter().map(String::as_str).collect();
    extract_sub_graph(&mut graph, &roots)?;
    graph.outputs = out_refs;
    Ok(Unfrozen { graph, keys })
}

/// What to freeze: a SavedModel directory, the tag set, the signature and which of
/// its inputs and outputs (keys; empty = all).
#[derive(Debug, Clone)]
pub struct SavedModelRequest<'a> {
    pub dir: &'a Path,
    pub tags: &'a [String],
    pub signature: &'a str,
    pub outputs: &'a [String],
}

/// Freezes one signature of a SavedModel: a graph whose inputs are placeholders named
/// by the signature's input keys and whose outputs are `Identity` nodes named by its
/// output keys (`outputs`, or all). Errors name the file and the item.
pub fn freeze_saved_model(req: &SavedModelRequest, progress: &Progress) -> Result<Graph> {
    let sm = read_saved_model(req.dir)?;
    let pb = pb_path(req.dir);
    let in_pb = |e: Error| Error::file(&pb, e);
    let mg = select_meta_graph(sm, req.tags).map_err(in_pb)?;
    let vdir = req.dir.join("variables");
    let mut bundle = None;
    // Errors of reading variables/ name their own files; the others are saved_model.pb's.
    let mut variables_failed = false;
    let result = signature_graph(&mg, req.signature, req.outputs, &mut || {
        let loaded = (|| {
            if !vdir.is_dir() {
                return Err(Error::file(
                    &vdir,
                    "missing: the signature reads variables, whose values are in variables/",
                ));
            }
            let b = Bundle::open(&variables_prefix(req.dir))?;
            let ckpt = checkpoint_object_graph(&b)?;
            Ok((b, ckpt))
        })();
        match loaded {
            Ok((b, ckpt)) => {
                bundle = Some(b);
                Ok(ckpt)
            }
            Err(e) => {
                variables_failed = true;
                Err(e)
            }
        }
    });
    let Unfrozen { mut graph, keys } = match result {
        Ok(u) => u,
        Err(e) if variables_failed => return Err(e),
        Err(e) => return Err(in_pb(e)),
    };
    if let Some(bundle) = bundle {
        let bytes = |key: &str| {
            bundle.entry(key).map_or(0, |e| {
                (e.shape.iter().product::<usize>() * e.dtype.size().unwrap_or(1)) as u64
            })
        };
        let total = keys.values().map(|vk| bytes(&vk.key)).sum();
        let bar = progress.start("reading the variables", total, Unit::Bytes);
        convert_variables(&mut graph, &keys, &mut |node: &Node, vk| {
            let t = super::freeze::load_variable(&bundle, node, vk)?;
            bar.inc(bytes(&vk.key));
            Ok(t)
        })
        .map_err(in_pb)?;
        bar.finish();
    }
    Ok(graph)
}

#[cfg(test)]
mod tests {
    use super::super::proto::{
        op_def::ArgDef, tensor_info::Encoding, DataType, NameAttrList, OpDef, TensorProto,
        TensorShapeProto,
    };
    use super::*;

    fn av(v: attr_value::Value) -> AttrValue {
        AttrValue { value: Some(v) }
    }

    fn func(name: &str) -> AttrValue {
        av(attr_value::Value::Func(NameAttrList {
            name: name.into(),
            attr: BTreeMap::new(),
        }))
    }

    fn floats(n: usize) -> AttrValue {
        av(attr_value::Value::List(attr_value::ListValue {
            r#type: vec![DataType::DtFloat as i32; n],
            ..Default::default()
        }))
    }

    fn node(name: &str, op: &str, inputs: &[&str], attrs: Vec<(&str, AttrValue)>) -> NodeDef {
        NodeDef {
            name: name.into(),
            op: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            attr: attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            ..NodeDef::default()
        }
    }

    fn bool_const(name: &str, v: bool) -> NodeDef {
        let t = TensorProto {
            dtype: DataType::DtBool as i32,
            tensor_shape: Some(TensorShapeProto::default()),
            bool_val: vec![v],
            ..TensorProto::default()
        };
        node(
            name,
            "Const",
            &[],
            vec![
                (
                    "dtype",
                    av(attr_value::Value::Type(DataType::DtBool as i32)),
                ),
                ("value", av(attr_value::Value::Tensor(t))),
            ],
        )
    }

    fn arg(name: &str) -> ArgDef {
        ArgDef {
            name: name.into(),
            r#type: DataType::DtFloat as i32,
            ..ArgDef::default()
        }
    }

    fn function(name: &str, ins: &[&str], nodes: Vec<NodeDef>, ret: &str) -> Vec<u8> {
        FunctionDef {
            signature: Some(OpDef {
                name: name.into(),
                input_arg: ins.iter().map(|a| arg(a)).collect(),
                output_arg: vec![arg("out")],
                ..OpDef::default()
            }),
            node_def: nodes,
            ret: [("out".to_string(), ret.to_string())].into(),
            ..FunctionDef::default()
        }
        .encode_to_vec()
    }

    /// A MetaGraphDef whose `serving_default` maps `x` → placeholder `px`, `y` → `out`.
    fn meta_graph(outer: Vec<NodeDef>, out: &str, functions: Vec<Vec<u8>>) -> MetaGraphDef {
        let info = |name: &str| TensorInfo {
            encoding: Some(Encoding::Name(name.into())),
            dtype: DataType::DtFloat as i32,
            tensor_shape: None,
        };
        let sig = SignatureDef {
            inputs: [("x".to_string(), info("px:0"))].into(),
            outputs: [("y".to_string(), info(out))].into(),
            ..SignatureDef::default()
        };
        MetaGraphDef {
            graph_def: Some(GraphDef {
                node: outer,
                library: FunctionDefLibrary {
                    function: functions,
                    ..FunctionDefLibrary::default()
                }
                .encode_to_vec(),
                ..GraphDef::default()
            }),
            signature_def: [("serving_default".to_string(), sig)].into(),
            ..MetaGraphDef::default()
        }
    }

    fn placeholder() -> NodeDef {
        node(
            "px",
            "Placeholder",
            &[],
            vec![(
                "dtype",
                av(attr_value::Value::Type(DataType::DtFloat as i32)),
            )],
        )
    }

    fn build(mg: &MetaGraphDef) -> Result<Graph> {
        let mut no_variables = || -> Result<TrackableObjectGraph> { panic!("no variables here") };
        signature_graph(mg, DEFAULT_SIGNATURE, &[], &mut no_variables).map(|u| u.graph)
    }

    #[test]
    fn nested_calls_and_constant_ifs_are_inlined() {
        let outer_fn = function(
            "outer_fn",
            &["a"],
            vec![
                bool_const("k", true),
                node(
                    "iff",
                    "StatelessIf",
                    &["k:output:0", "a", "^k"],
                    vec![
                        ("then_branch", func("neg_fn")),
                        ("else_branch", func("missing_fn")),
                        ("Tout", floats(1)),
                    ],
                ),
                node("id", "Identity", &["iff:output:0"], vec![]),
            ],
            "id:output:0",
        );
        let neg_fn = function(
            "neg_fn",
            &["b"],
            vec![node("n", "Neg", &["b"], vec![])],
            "n:y:0",
        );
        let call = node(
            "call",
            "StatefulPartitionedCall",
            &["px"],
            vec![("f", func("outer_fn")), ("Tout", floats(1))],
        );
        let mg = meta_graph(vec![placeholder(), call], "call:0", vec![outer_fn, neg_fn]);
        let g = build(&mg).unwrap();
        let neg = g.node("call/iff/n").expect("the then branch is inlined");
        assert_eq!(neg.op, "Neg");
        assert_eq!(neg.inputs, [TensorRef::new("x", 0)]);
        let y = g.node("y").unwrap();
        assert_eq!(
            (y.op.as_str(), &y.inputs[..]),
            ("Identity", &[TensorRef::new("call/id", 0)][..])
        );
        assert_eq!(
            g.node("call/id").unwrap().inputs,
            [TensorRef::new("call/iff/n", 0)]
        );
        assert_eq!(g.outputs, [TensorRef::new("y", 0)]);
        assert!(g.node("call").is_none() && g.node("px").is_none() && g.node("x").is_some());
    }

    #[test]
    fn other_control_flow_is_an_error_naming_the_node() {
        let body = function("body", &["a"], vec![], "a");
        let w = node(
            "loop",
            "While",
            &["px"],
            vec![
                ("body", func("body")),
                ("cond", func("body")),
                ("T", floats(1)),
            ],
        );
        let e = build(&meta_graph(
            vec![placeholder(), w],
            "loop:0",
            vec![body.clone()],
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("'loop' (While)") && e.contains("control flow"),
            "{e}"
        );

        let iff = node(
            "branch",
            "If",
            &["px", "px"],
            vec![
                ("then_branch", func("body")),
                ("else_branch", func("body")),
                ("Tout", floats(1)),
            ],
        );
        let e = build(&meta_graph(
            vec![placeholder(), iff],
            "branch:0",
            vec![body],
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("'branch' (If)") && e.contains("not a constant"),
            "{e}"
        );
    }

    #[test]
    fn body_outputs_need_the_op_table() {
        let f = function(
            "f",
            &["a"],
            vec![node("s", "FancyOp", &["a"], vec![])],
            "s:out:0",
        );
        let call = node(
            "call",
            "PartitionedCall",
            &["px"],
            vec![("f", func("f")), ("Tout", floats(1))],
        );
        let e = build(&meta_graph(vec![placeholder(), call], "call:0", vec![f]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("'s' (FancyOp)") && e.contains("output arguments"),
            "{e}"
        );
    }
}
