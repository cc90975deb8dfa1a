//! What qpipe can do with an op, asked of the layers that do it: the interpreter (a
//! float kernel, an int8 kernel: [`kernel_support`]), `quantize_int8` (int8, hybrid or
//! float only: [`int8_form`]) and the TFLite lowering (the builtin and its versions, or
//! none: [`lowering`]). Each answers through its own exhaustive match on [`Op`], so a new
//! op is described here as soon as those layers handle it. `qpipe inspect` lists the
//! ops of a model one of them cannot handle, with the reason; `qpipe ops --markdown`
//! prints the table of every op that the README carries.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::formats::tf::freeze::{checkpoint_prefix, cut_frozen_graph, freeze_checkpoint};
use crate::formats::tf::inspect::{GraphFormat, GraphSummary, OpUse};
use crate::formats::tflite::lower::{lowering, Lowering};
use crate::formats::tflite::versions::typical_versions;
use crate::ir::op::{training_only, NAMES};
use crate::ir::{Attr, Node, Op, LOOP_OPS};
use crate::kernels::ops::{kernel_support, KernelSupport};
use crate::stages::quantize_int8::rewrite::{int16_form, int8_form, Int8Form};

/// Every layer's answer for one op.
#[derive(Debug, Clone, PartialEq)]
pub struct OpSupport {
    /// The TensorFlow op name.
    pub name: String,
    pub kernels: KernelSupport,
    pub int8: Int8Form,
    /// `activations = "int16"` computes it in 16x8 (int16 activations).
    pub int16: bool,
    pub tflite: Lowering,
}

impl OpSupport {
    pub fn of(op: &Op) -> OpSupport {
        OpSupport {
            name: op.name().to_string(),
            kernels: kernel_support(op),
            int8: int8_form(op),
            int16: int16_form(op),
            tflite: lowering(op),
        }
    }

    /// Why qpipe cannot run, quantize or export the op; empty when it can do all three.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.kernels.float {
            out.push(
                "no float kernel: qpipe cannot run it (calibration, validate, eval and \
                 quantize_int8 fail)"
                    .to_string(),
            );
        }
        if self.int8 == Int8Form::Float {
            out.push(
                "no int8 kernel: stays float under DEFAULT (QUANTIZE/DEQUANTIZE around it), \
                 error under OPTIMIZE_FOR_LATENCY"
                    .to_string(),
            );
        }
        if self.tflite == Lowering::None {
            out.push(
                "no TFLite builtin: export_tflite fails unless strip_training folds it away"
                    .to_string(),
            );
        }
        out
    }

    fn quantize_text(&self) -> &'static str {
        match self.int8 {
            Int8Form::Int8 { hybrid: true } => "int8; hybrid under dynamic range",
            Int8Form::Int8 { hybrid: false } => "int8",
            Int8Form::Float => "float only",
            Int8Form::NotComputed => "–",
        }
    }

    fn tflite_text(&self) -> String {
        match &self.tflite {
            Lowering::Builtin(op) => {
                let (f, q) = typical_versions(op);
                format!("{} (v{f} float, v{q} int8)", op.name())
            }
            Lowering::NoOperator => "no operator".into(),
            Lowering::None => "none".into(),
        }
    }

    pub fn to_json(&self) -> Value {
        let (builtin, versions) = match &self.tflite {
            Lowering::Builtin(op) => {
                let (f, q) = typical_versions(op);
                (json!(op.name()), json!({"float": f, "int8": q}))
            }
            Lowering::NoOperator => (json!("no operator"), Value::Null),
            Lowering::None => (Value::Null, Value::Null),
        };
        json!({
            "op": self.name,
            "float_kernel": self.kernels.float,
            "int8_kernel": self.kernels.int8,
            "quantize_int8": match self.int8 {
                Int8Form::Int8 { hybrid: true } => "int8+hybrid",
                Int8Form::Int8 { hybrid: false } => "int8",
                Int8Form::Float => "float",
                Int8Form::NotComputed => "not_computed",
            },
            "int16": self.int16,
            "tflite_builtin": builtin,
            "tflite_versions": versions,
        })
    }
}

/// The typed op of every op name qpipe recognizes, in [`NAMES`] order (attributes the
/// parse needs are given typical values).
pub fn every_op() -> Vec<OpSupport> {
    NAMES
        .iter()
        .filter_map(|name| Op::parse(&typical_node(name)).ok())
        .map(|op| OpSupport::of(&op))
        .collect()
}

/// A node of op `name` with the attributes [`Op::parse`] needs at typical values.
fn typical_node(name: &str) -> Node {
    let mut n = Node::new("n", name)
        .with_attr("padding", Attr::Str(b"SAME".to_vec()))
        .with_attr("strides", Attr::Ints(vec![1, 1, 1, 1]))
        .with_attr("ksize", Attr::Ints(vec![1, 2, 2, 1]));
    if name.starts_with('_') {
        let bias_add = Op::BiasAdd {
            layout: crate::ir::op::Layout::Nhwc,
            v1: false,
        };
        n = n.with_attr("fused_ops", Attr::Strs(vec![bias_add.name().into()]));
    }
    n
}

/// The op table of the README: every op with each layer's answer.
pub fn markdown_table() -> String {
    let yes = |b: bool| if b { "yes" } else { "–" };
    let mut s = String::from(
        "| TF op | float kernel | int8 kernel | quantize_int8 | 16x8 | TFLite builtin |\n\
         |---|---|---|---|---|---|\n",
    );
    for o in every_op() {
        s += &format!(
            "| `{}` | {} | {} | {} | {} | {} |\n",
            o.name,
            yes(o.kernels.float),
            yes(o.kernels.int8),
            o.quantize_text(),
            if o.int16 { "int16" } else { "–" },
            o.tflite_text()
        );
    }
    s
}

/// An op of a model that qpipe cannot run, quantize or export.
#[derive(Debug, Clone, PartialEq)]
pub struct OpProblem {
    pub op: String,
    /// How many nodes use it, and the first one.
    pub nodes: usize,
    pub first: String,
    pub reasons: Vec<String>,
}

impl OpProblem {
    pub fn to_json(&self) -> Value {
        json!({
            "op": self.op,
            "nodes": self.nodes,
            "first_node": self.first,
            "reasons": self.reasons,
        })
    }
}

/// Why qpipe cannot handle the op of `node` (its attributes included); empty when it can.
pub fn node_problems(node: &Node) -> Vec<String> {
    if LOOP_OPS.contains(&node.op.as_str()) {
        return vec![
            "TF1 while loop control flow (tf.while_loop, dynamic_rnn) is not supported, nor by \
             TF's converter without Flex ops: unroll the loop when building the model \
             (tf.keras.layers.RNN(..., unroll=True) or tf.compat.v1.nn.static_rnn)"
                .to_string(),
        ];
    }
    let op = match Op::parse(node) {
        Ok(op) => op,
        Err(e) => return vec![format!("qpipe cannot read its attributes: {e}")],
    };
    if matches!(op, Op::Placeholder | Op::PlaceholderWithDefault) {
        return Vec::new();
    }
    // strip_training folds batch norms into the weights (and fails where it cannot)
    if !matches!(op, Op::FusedBatchNorm { .. }) {
        if let Some(why) = training_only(&node.name, &node.op) {
            return vec![format!(
                "{why}: strip_training removes it where it folds away, and fails otherwise"
            )];
        }
    }
    OpSupport::of(&op).problems()
}

/// The ops of `uses` (the inference part of a graph, from `inspect`) that qpipe cannot
/// run, quantize or export, with the reasons.
pub fn graph_problems(uses: &[OpUse]) -> Vec<OpProblem> {
    uses.iter()
        .filter_map(|u| {
            let reasons = node_problems(&u.first);
            (!reasons.is_empty()).then(|| OpProblem {
                op: u.op.clone(),
                nodes: u.nodes,
                first: u.first.name.clone(),
                reasons,
            })
        })
        .collect()
}

/// The ops of a model qpipe cannot run, quantize or export, and which graph they are
/// the ops of.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelProblems {
    /// `"inference graph"` when freeze and strip_training worked on the graph's likely
    /// outputs, else why not (the ops are then those of the unstripped graph).
    pub graph: String,
    pub problems: Vec<OpProblem>,
    /// The ops (and node counts) that have an int8 form but no 16x8 one: under
    /// `activations = "int16"` they stay float (`DEFAULT`) or are an error
    /// (`OPTIMIZE_FOR_LATENCY`).
    pub float_in_int16: Vec<(String, usize)>,
}

impl ModelProblems {
    pub fn to_json(&self) -> Value {
        json!({
            "graph": self.graph,
            "ops": self.problems.iter().map(OpProblem::to_json).collect::<Vec<_>>(),
            "float_in_int16": self
                .float_in_int16
                .iter()
                .map(|(op, nodes)| json!({"op": op, "nodes": nodes}))
                .collect::<Vec<_>>(),
        })
    }
}

/// The ops of `uses` with an int8 form and no 16x8 form.
fn float_in_int16(uses: &[OpUse]) -> Vec<(String, usize)> {
    uses.iter()
        .filter(|u| {
            Op::parse(&u.first).is_ok_and(|op| {
                let s = OpSupport::of(&op);
                matches!(s.int8, Int8Form::Int8 { .. }) && !s.int16
            })
        })
        .map(|u| (u.op.clone(), u.nodes))
        .collect()
}

/// What [`graph_problems`] finds in the model at `path` (a checkpoint or a GraphDef that
/// `inspect` summarized as `summary`) once frozen and stripped to its likely outputs,
/// the way a recipe's `freeze` and `strip_training` would: shape arithmetic, dropout and
/// batch norms that fold away are not reported. When freezing or stripping fails, the
/// ops of the graph's inference part are reported, with the error.
pub fn model_problems(path: &Path, summary: &GraphSummary) -> ModelProblems {
    let outputs: Vec<String> = summary
        .likely_outputs
        .iter()
        .map(|o| o.name.clone())
        .collect();
    let stripped = || -> crate::error::Result<Vec<OpUse>> {
        let frozen = match summary.format {
            GraphFormat::MetaGraphDef => freeze_checkpoint(&checkpoint_prefix(path)?, &outputs)?,
            GraphFormat::GraphDef => cut_frozen_graph(path, &outputs)?,
        };
        let inputs: Vec<String> = frozen
            .nodes
            .iter()
            .filter(|n| matches!(Op::parse(n), Ok(Op::Placeholder)))
            .map(|n| n.name.clone())
            .collect();
        let (g, _) = crate::stages::strip_training::strip(
            &frozen,
            &inputs,
            &frozen.outputs,
            &Default::default(),
        )?;
        // The composites (GELU, PReLU, l2_normalize) are fused before quantize_int8
        // and export see them; report the fused ops, not their parts.
        let (g, _) = crate::ir::passes::patterns::rewrite(&g)?;
        let mut uses: BTreeMap<String, OpUse> = BTreeMap::new();
        for n in g.nodes {
            match uses.get_mut(&n.op) {
                Some(u) => u.nodes += 1,
                None => {
                    uses.insert(
                        n.op.clone(),
                        OpUse {
                            op: n.op.clone(),
                            nodes: 1,
                            first: n,
                        },
                    );
                }
            }
        }
        Ok(uses.into_values().collect())
    };
    match (outputs.is_empty(), stripped()) {
        (false, Ok(uses)) => ModelProblems {
            graph: "inference graph".into(),
            problems: graph_problems(&uses),
            float_in_int16: float_in_int16(&uses),
        },
        (empty, result) => ModelProblems {
            graph: match (empty, result) {
                (true, _) => "the graph as it is (no likely outputs to strip it to)".into(),
                (_, Err(e)) => format!(
                    "the graph as it is (freeze and strip_training to the likely outputs fail: {})",
                    e.to_string().lines().next().unwrap_or("")
                ),
                (_, Ok(_)) => unreachable!("handled above"),
            },
            problems: graph_problems(&summary.inference_ops),
            float_in_int16: float_in_int16(&summary.inference_ops),
        },
    }
}

/// The human-readable list `qpipe inspect` prints.
pub fn render_problems(found: &ModelProblems) -> String {
    let problems = &found.problems;
    let int16 = if found.float_in_int16.is_empty() {
        "ops that stay float under activations = \"int16\" (no 16x8 kernel): none\n".to_string()
    } else {
        let ops: Vec<String> = found
            .float_in_int16
            .iter()
            .map(|(op, n)| format!("{op} ({n} node{})", if *n == 1 { "" } else { "s" }))
            .collect();
        format!(
            "ops that stay float under activations = \"int16\" (no 16x8 kernel; an error \
             under OPTIMIZE_FOR_LATENCY): {}\n",
            ops.join(", ")
        )
    };
    if problems.is_empty() {
        return format!(
            "ops qpipe cannot run, quantize or export ({}): none\n{int16}",
            found.graph
        );
    }
    let mut s = format!(
        "ops qpipe cannot run, quantize or export ({}, {}):\n",
        found.graph,
        problems.len()
    );
    for p in problems {
        s += &format!(
            "  {} ({} node{}, e.g. '{}'):\n",
            p.op,
            p.nodes,
            if p.nodes == 1 { "" } else { "s" },
            p.first
        );
        for r in &p.reasons {
            s += &format!("    - {r}\n");
        }
    }
    s + &int16
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::op::Unary;

    #[test]
    fn each_layer_answers_for_the_op() {
        let relu = OpSupport::of(&Op::Unary(Unary::Relu));
        assert!(relu.problems().is_empty(), "{relu:?}");
        let softplus = OpSupport::of(&Op::Unary(Unary::Softplus));
        let p = softplus.problems();
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("no int8 kernel") && p[0].contains("OPTIMIZE_FOR_LATENCY"));
        assert!(p[1].contains("no TFLite builtin"));
        let other = OpSupport::of(&Op::Other("Erfinv".into()));
        assert_eq!(other.problems().len(), 3);
        assert!(other.problems()[0].contains("no float kernel"));
    }

    #[test]
    fn the_table_lists_every_op_with_builtin_and_versions() {
        let t = markdown_table();
        assert_eq!(t.lines().count(), NAMES.len() + 2, "{t}");
        assert!(t.contains("| `Conv2D` | yes | – | int8; hybrid under dynamic range | int16 | CONV_2D (v1 float, v3 int8) |"), "{t}");
        assert!(
            t.contains("| `Identity` | yes | yes | int8 | int16 | no operator |"),
            "{t}"
        );
        assert!(
            t.contains("| `Sigmoid` | yes | yes | int8 | int16 |"),
            "{t}"
        );
        assert!(t.contains("| `Sum` | yes | yes | int8 | – |"), "{t}");
    }

    /// `kernel_support` says what `Kernel::compile` does: an op it has no kernel for is
    /// refused with that message (a kernel that exists may still refuse the node's
    /// inputs or attributes, which the typical node does not give).
    #[test]
    fn kernel_support_agrees_with_the_kernel_compiler() {
        for name in NAMES {
            let node = typical_node(name);
            let op = Op::parse(&node).unwrap();
            let refused = match crate::kernels::Kernel::compile(&node) {
                Err(e) => e.to_string().contains("no kernel for this op"),
                Ok(_) => false,
            };
            assert_eq!(
                kernel_support(&op).float,
                !refused,
                "{name}: kernel_support and Kernel::compile disagree"
            );
        }
    }

    #[test]
    fn loop_and_training_ops_say_what_to_do() {
        let merge = node_problems(&Node::new("rnn/while/Merge", LOOP_OPS[0]));
        assert!(merge[0].contains("unroll"), "{merge:?}");
        let uniform = Op::Random(crate::ir::op::Random::Uniform);
        let random = node_problems(&Node::new("dropout/random", uniform.name()));
        assert_eq!(random.len(), 1, "{random:?}");
        assert!(
            random[0].contains("strip_training removes it"),
            "{random:?}"
        );
    }
}
