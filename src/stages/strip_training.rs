//! `strip_training`: turns a frozen training graph into an inference graph.
//!
//! In order: control edges are dropped (they only order `Assert`/`Print`/`NoOp`/
//! update ops, none of which an inference graph runs); declared inputs become
//! placeholders and the graph is cut to the declared outputs; pass-through ops
//! (`Identity` chains, `StopGradient`, `CheckNumerics`, `Print`, undeclared
//! `PlaceholderWithDefault` = its default) are bypassed; constant folding by abstract
//! interpretation ([`fold`]) resolves shape computations, removes dropout and prunes
//! `Switch`/`Merge` branches of constant predicates (a Keras learning phase); batch
//! norms are folded into weights ([`bn`]). What is left must be an inference op:
//! random, stateful, training-mode or undeclared-input nodes are reported by name.
//!
//! Inputs and outputs are the upstream graph's (which `freeze` takes from the recipe's
//! `[model]`), or the recipe's when the graph declares none.
//!
//! Config: `input` (upstream stage, required); `fold_batch_norm` (default `true`);
//! `bind` (default empty): placeholders to replace by scalar constants, for graphs
//! whose keep probability or training flag is a plain placeholder.

mod activation;
mod affine;
mod bn;
mod conv_window;
mod fold;

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::{
    Artifact, ConfigError, ConfigTable, Role, Stage, StageContext, StageDeps, StageOutput,
};
use crate::error::{Error, Result};
use crate::ir::op::{passthrough, Forward};
use crate::ir::{Attr, Graph, Node, Op, TensorRef};

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StripTrainingConfig {
    pub input: String,
    /// Fold batch norms (and per-channel constant multiplies/adds after convolutions
    /// and matrix products) into weights and biases.
    #[serde(default = "yes")]
    pub fold_batch_norm: bool,
    /// Placeholders to replace by a scalar constant, e.g. `{ dropout_keep_prob = 1.0 }`
    /// for a TF1 script whose keep probability is a plain placeholder.
    #[serde(default)]
    pub bind: BTreeMap<String, toml::Value>,
}

pub struct StripTraining {
    config: StripTrainingConfig,
}

pub fn build(table: &ConfigTable) -> std::result::Result<Box<dyn Stage>, ConfigError> {
    Ok(Box::new(StripTraining {
        config: super::parse_config(table)?,
    }))
}

/// Options of [`strip`].
#[derive(Debug, Clone)]
pub struct StripOptions {
    pub fold_batch_norm: bool,
    /// Placeholder name → the scalar it is bound to (cast to the placeholder's dtype).
    pub bind: BTreeMap<String, f64>,
}

impl Default for StripOptions {
    fn default() -> Self {
        StripOptions {
            fold_batch_norm: true,
            bind: BTreeMap::new(),
        }
    }
}

/// Replaces each bound placeholder by a scalar constant of its dtype.
fn bind_placeholders(g: &mut Graph, bind: &BTreeMap<String, f64>, inputs: &[String]) -> Result<()> {
    for (name, &v) in bind {
        if inputs.contains(name) {
            return Err(Error::usage(format!(
                "bind: '{name}' is a declared model input; it cannot also be bound"
            )));
        }
        let n = g
            .node_mut(name)
            .ok_or_else(|| Error::usage(format!("bind: '{name}' is not a node of the graph")))?;
        if n.op != Op::Placeholder.name() && n.op != Op::PlaceholderWithDefault.name() {
            return Err(Error::usage(format!(
                "bind: '{name}' is a {} node, not a placeholder",
                n.op
            )));
        }
        if let Some(Attr::Shape(Some(dims))) = n.attr("shape") {
            if !dims.is_empty() {
                return Err(Error::usage(format!(
                    "bind: '{name}' has shape {dims:?}; only scalars can be bound"
                )));
            }
        }
        let dtype = n.attr_type("dtype")?;
        let value = crate::kernels::elementwise::cast(&crate::kernels::Value::scalar(v), dtype)
            .map_err(|e| e.context(format!("bind: '{name}'")))?;
        let mut c = Node::constant(name.clone(), value.to_tensor());
        c.device = n.device.clone();
        *n = c;
    }
    Ok(())
}

/// What [`strip`] did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct StripReport {
    pub nodes_before: usize,
    pub nodes_after: usize,
    /// Nodes that are gone, by op (pruned, bypassed, folded away).
    pub removed: BTreeMap<String, usize>,
    /// Nodes replaced by constants, by their op.
    pub folded: BTreeMap<String, usize>,
    /// Nodes bypassed because they compute an input unchanged, by op.
    pub simplified: BTreeMap<String, usize>,
    pub control_edges_removed: usize,
    pub placeholder_defaults_bound: usize,
    pub reshape_targets_resolved: usize,
    pub batch_norms_folded: usize,
    pub muls_folded_into_weights: usize,
    pub adds_folded_into_bias: usize,
    /// Multiplies and adds by a per-channel constant folded into the layer after them.
    pub affine_folded_forward: usize,
    /// Multiplies and adds moved before a reshape (to fold into the layer before it).
    pub affine_moved_before_reshape: usize,
    pub reshapes_removed: usize,
    pub divisions_to_multiplies: usize,
    /// `SpaceToBatchND → conv → BatchToSpaceND` chains made one dilated convolution.
    pub dilated_convolutions: usize,
    /// Zero `Pad`s before a VALID convolution folded into SAME padding.
    pub pads_folded: usize,
    /// `x * relu6(x + 3) / 6` patterns fused into one `HardSwish`.
    pub hard_swishes_fused: usize,
}

impl StripReport {
    pub fn metrics(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        let map = |h: &BTreeMap<String, usize>| {
            serde_json::Value::Object(
                h.iter()
                    .map(|(k, v)| (k.clone(), serde_json::Value::from(*v)))
                    .collect(),
            )
        };
        m.insert("nodes_before".into(), self.nodes_before.into());
        m.insert("nodes_after".into(), self.nodes_after.into());
        m.insert("removed".into(), map(&self.removed));
        m.insert("folded".into(), map(&self.folded));
        m.insert("simplified".into(), map(&self.simplified));
        m.insert(
            "control_edges_removed".into(),
            self.control_edges_removed.into(),
        );
        m.insert(
            "placeholder_defaults_bound".into(),
            self.placeholder_defaults_bound.into(),
        );
        m.insert(
            "reshape_targets_resolved".into(),
            self.reshape_targets_resolved.into(),
        );
        m.insert("batch_norms_folded".into(), self.batch_norms_folded.into());
        m.insert(
            "muls_folded_into_weights".into(),
            self.muls_folded_into_weights.into(),
        );
        m.insert(
            "adds_folded_into_bias".into(),
            self.adds_folded_into_bias.into(),
        );
        for (k, v) in [
            ("affine_folded_forward", self.affine_folded_forward),
            (
                "affine_moved_before_reshape",
                self.affine_moved_before_reshape,
            ),
            ("reshapes_removed", self.reshapes_removed),
            ("divisions_to_multiplies", self.divisions_to_multiplies),
            ("dilated_convolutions", self.dilated_convolutions),
            ("pads_folded", self.pads_folded),
            ("hard_swishes_fused", self.hard_swishes_fused),
        ] {
            m.insert(k.into(), v.into());
        }
        m
    }
}

/// Ops that must not survive into an inference graph (or that qpipe cannot handle yet).
fn forbidden(name: &str, op: &str) -> Option<&'static str> {
    crate::ir::op::training_only(name, op)
}

fn prune(g: &mut Graph) -> Result<()> {
    g.prune_to_outputs()?;
    Ok(())
}

/// Bypasses pass-through nodes: every reader reads the original tensor. Graph
/// outputs keep their names (as an `Identity` of the resolved tensor).
fn bypass_passthroughs(g: &mut Graph, declared: &HashSet<String>) -> Result<()> {
    let idx: HashMap<String, usize> = g
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.clone(), i))
        .collect();
    let is_pt =
        |n: &Node| passthrough(&n.op) && !declared.contains(&n.name) && !n.inputs.is_empty();
    // In topological order a pass-through's own inputs are already resolved, so one
    // hop resolves a whole chain.
    for i in g.topo_order()? {
        let mut inputs = std::mem::take(&mut g.nodes[i].inputs);
        for r in inputs.iter_mut() {
            let Some(&j) = idx.get(&r.node) else { continue };
            let n = &g.nodes[j];
            if !is_pt(n) {
                continue;
            }
            let k = match (n.op == Op::IdentityN.name(), r.index) {
                (true, k) => k as usize,
                (_, 0) => 0,
                _ => continue,
            };
            *r = n.inputs.get(k).cloned().ok_or_else(|| {
                Error::msg(format!("node '{}' ({}) has no input {k}", n.name, n.op))
            })?;
        }
        g.nodes[i].inputs = inputs;
    }
    let outputs: HashSet<String> = g.outputs.iter().map(|r| r.node.clone()).collect();
    let keep_as_identity: Vec<usize> = (0..g.nodes.len())
        .filter(|&i| {
            let n = &g.nodes[i];
            is_pt(n) && outputs.contains(&n.name) && n.op != Op::IdentityN.name()
        })
        .collect();
    for i in keep_as_identity {
        let n = &mut g.nodes[i];
        let identity = Op::Forward(Forward::Identity);
        if n.op != identity.name() {
            let dt = n.attr_type("T").or_else(|_| n.attr_type("dtype")).ok();
            let mut id = Node::new(n.name.clone(), identity.name()).with_input(n.inputs[0].clone());
            if let Some(dt) = dt {
                id = id.with_attr("T", Attr::Type(dt));
            }
            id.device = n.device.clone();
            *n = id;
        } else {
            n.inputs.truncate(1);
        }
    }
    Ok(())
}

/// Strips `graph` to an inference graph from `inputs` to `outputs`.
pub fn strip(
    graph: &Graph,
    inputs: &[String],
    outputs: &[TensorRef],
    opts: &StripOptions,
) -> Result<(Graph, StripReport)> {
    let mut g = graph.clone();
    let mut report = StripReport {
        nodes_before: g.nodes.len(),
        ..StripReport::default()
    };
    let before = g.op_histogram();
    if outputs.is_empty() {
        return Err(Error::usage(
            "strip_training needs at least one model output",
        ));
    }
    let idx = g.index()?;
    for r in outputs {
        if !idx.contains_key(r.node.as_str()) {
            return Err(Error::msg(format!(
                "output '{r}' is not a node of the graph"
            )));
        }
    }
    for name in inputs {
        if !idx.contains_key(name.as_str()) {
            return Err(Error::msg(format!(
                "input '{name}' is not a node of the graph"
            )));
        }
    }
    drop(idx);
    g.inputs = inputs.to_vec();
    g.outputs = outputs.to_vec();

    for n in g.nodes.iter_mut() {
        report.control_edges_removed += n.control_inputs.len();
        n.control_inputs.clear();
    }
    bind_placeholders(&mut g, &opts.bind, inputs)?;
    let declared: HashSet<String> = inputs.iter().cloned().collect();
    for n in g.nodes.iter_mut() {
        if !declared.contains(&n.name) || n.op == Op::Placeholder.name() {
            continue;
        }
        let dtype = n
            .attr_type("dtype")
            .or_else(|_| n.attr_type("T"))
            .map_err(|_| {
                Error::msg(format!(
                    "input '{}' ({}) has no dtype attribute to make a placeholder from",
                    n.name, n.op
                ))
            })?;
        let shape = match n.attr("shape") {
            Some(Attr::Shape(s)) => s.clone(),
            _ => None,
        };
        let mut p = Node::new(n.name.clone(), Op::Placeholder.name())
            .with_attr("dtype", Attr::Type(dtype))
            .with_attr("shape", Attr::Shape(shape));
        p.device = n.device.clone();
        *n = p;
    }
    let placeholders: Vec<Node> = g
        .nodes
        .iter()
        .filter(|n| declared.contains(&n.name))
        .cloned()
        .collect();
    prune(&mut g)?;
    report.placeholder_defaults_bound = g
        .nodes
        .iter()
        .filter(|n| n.op == Op::PlaceholderWithDefault.name())
        .count();
    bypass_passthroughs(&mut g, &declared)?;
    prune(&mut g)?;

    let fs = fold::fold(&mut g, inputs)?;
    report.folded = fs.folded;
    report.simplified = fs.simplified;
    report.reshape_targets_resolved = fs.reshape_targets;
    bypass_passthroughs(&mut g, &declared)?;
    prune(&mut g)?;

    let mut ws = conv_window::WindowStats::default();
    conv_window::fold_space_to_batch(&mut g, &mut ws)?;
    let mut af = affine::AffineStats::default();
    affine::divisions_to_multiplies(&mut g, &mut af)?;
    if opts.fold_batch_norm {
        let mut bs = bn::fold_batch_norms(&mut g)?;
        // Backwards first (into the layer before); what cannot go backwards goes
        // through a reshape or forwards into the layer after.
        let limit = g.nodes.len() + 16;
        for _ in 0..limit {
            if !(affine::move_before_reshape_once(&mut g, &mut af)?
                || affine::fold_forward_once(&mut g, &mut af)?)
            {
                break;
            }
            prune(&mut g)?;
            bn::fold_backward(&mut g, &mut bs)?;
        }
        prune(&mut g)?;
        affine::collapse_reshapes(&mut g, &mut af)?;
        report.batch_norms_folded = bs.fused_batch_norms;
        report.muls_folded_into_weights = bs.muls_into_weights;
        report.adds_folded_into_bias = bs.adds_into_bias;
        // Folding leaves constant-only subgraphs (e.g. the decomposed form's statistics) dead.
        bypass_passthroughs(&mut g, &declared)?;
        prune(&mut g)?;
    }
    conv_window::fold_pads(&mut g, &mut ws)?;
    report.hard_swishes_fused = activation::fuse_hard_swish(&mut g)?;
    report.affine_folded_forward = af.folded_forward;
    report.affine_moved_before_reshape = af.moved_before_reshape;
    report.reshapes_removed = af.reshapes_removed;
    report.divisions_to_multiplies = af.divisions_to_multiplies;
    report.dilated_convolutions = ws.dilated_convolutions;
    report.pads_folded = ws.pads_folded;

    for n in &g.nodes {
        if declared.contains(&n.name) {
            continue;
        }
        if let Some(why) = forbidden(&n.name, &n.op) {
            let bn_training = crate::ir::op::is_batch_norm_family(&n.op)
                && n.attr_bool("is_training").unwrap_or(false);
            let why = if bn_training {
                "a batch norm is in training mode (is_training=true)"
            } else {
                why
            };
            return Err(Error::msg(format!(
                "cannot strip node '{}' ({}): {why}",
                n.name, n.op
            )));
        }
    }
    for p in placeholders.into_iter().rev() {
        if g.node(&p.name).is_none() {
            g.nodes.insert(0, p);
        }
    }
    let names: HashSet<String> = g.nodes.iter().map(|n| n.name.clone()).collect();
    for n in g.nodes.iter_mut() {
        if let Some(Attr::Strs(locs)) = n.attrs.get_mut("_class") {
            locs.retain(|l| {
                l.strip_prefix(b"loc:@")
                    .map(|t| names.contains(&*String::from_utf8_lossy(t)))
                    .unwrap_or(true)
            });
            if locs.is_empty() {
                n.attrs.remove("_class");
            }
        }
        n.attrs.remove("_output_shapes");
    }
    report.nodes_after = g.nodes.len();
    let after = g.op_histogram();
    for (op, &c) in &before {
        let a = after.get(op).copied().unwrap_or(0);
        if c > a {
            report.removed.insert(op.clone(), c - a);
        }
    }
    Ok((g, report))
}

impl Stage for StripTraining {
    fn role(&self) -> Role {
        Role::Model {
            label: "float32".into(),
            float: true,
        }
    }
    fn version(&self) -> u32 {
        // Constant folding runs the interpreter's float kernels.
        crate::kernels::float_stage_version(2)
    }
    fn deps(&self) -> StageDeps {
        StageDeps {
            stages: vec![("input".into(), self.config.input.clone())],
            model: false,
            ..StageDeps::default()
        }
    }
    fn config(&self) -> serde_json::Value {
        super::config_json(&self.config)
    }
    fn run(&self, ctx: &StageContext) -> Result<StageOutput> {
        let graph = ctx.input_graph("input")?;
        // The upstream graph carries the recipe's inputs/outputs (freeze sets them), which
        // keeps this stage a function of its input artifact; the recipe is the fallback.
        let inputs = if graph.inputs.is_empty() {
            ctx.model.inputs.clone()
        } else {
            graph.inputs.clone()
        };
        let outputs: Vec<TensorRef> = if graph.outputs.is_empty() {
            ctx.model
                .outputs
                .iter()
                .map(|s| {
                    TensorRef::parse(s)
                        .ok_or_else(|| Error::usage(format!("bad output name '{s}'")))
                })
                .collect::<Result<_>>()?
        } else {
            graph.outputs.clone()
        };
        let mut bind = BTreeMap::new();
        for (k, v) in &self.config.bind {
            let f = match v {
                toml::Value::Float(f) => *f,
                toml::Value::Integer(i) => *i as f64,
                toml::Value::Boolean(b) => *b as u8 as f64,
                other => {
                    return Err(Error::usage(format!(
                        "stage '{}': bind.{k} must be a number or a boolean, not {}",
                        ctx.id,
                        other.type_str()
                    )))
                }
            };
            bind.insert(k.clone(), f);
        }
        let opts = StripOptions {
            fold_batch_norm: self.config.fold_batch_norm,
            bind,
        };
        let (g, report) = strip(&graph, &inputs, &outputs, &opts)
            .map_err(|e| e.context(format!("stage '{}'", ctx.id)))?;
        Ok(StageOutput {
            artifact: Artifact::Graph(g.into()),
            metrics: report.metrics(),
            files: vec![],
        })
    }
}
