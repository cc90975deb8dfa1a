//! `qpipe inspect` on a checkpoint or a frozen graph lists every op of the model that
//! qpipe cannot run, quantize or export, each with the reasons its layers give
//! (`qpipe::stages::op_support`), in the human and the `--json` output.

mod support;

use std::path::Path;
use std::process::Command;

use qpipe::ir::{DType, Node};
use qpipe::stages::op_support::{model_problems, OpSupport};
use serde_json::Value;
use support::graph_builder::G;

fn qpipe(args: &[&str]) -> (String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_qpipe"))
        .args(args)
        .output()
        .expect("qpipe runs");
    assert!(
        o.status.success(),
        "qpipe {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    (
        String::from_utf8(o.stdout).unwrap(),
        String::from_utf8(o.stderr).unwrap(),
    )
}

/// `graph.unsupported_ops.ops` of `qpipe inspect PATH --json`, by op.
fn listed(path: &Path) -> Vec<(String, usize, Vec<String>)> {
    let (out, _) = qpipe(&["inspect", path.to_str().unwrap(), "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    v["graph"]["unsupported_ops"]["ops"]
        .as_array()
        .unwrap_or_else(|| panic!("no graph.unsupported_ops: {v}"))
        .iter()
        .map(|p| {
            (
                p["op"].as_str().unwrap().to_string(),
                p["nodes"].as_u64().unwrap() as usize,
                p["reasons"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn a_frozen_graph_lists_the_ops_qpipe_cannot_handle_with_the_reasons() {
    let mut g = G::new();
    g.placeholder("x", DType::F32, Some(&[-1, 4]));
    g.op("cos", "Cos", &["x"], &[]);
    g.op("cos_2", "Cos", &["cos"], &[]);
    g.op("odd", "Erfinv", &["cos_2"], &[]);
    g.op("out", "Relu", &["odd"], &[]);
    g.output("out");
    let dir = support::tmp_dir("inspect_ops");
    let pb = dir.join("g.pb");
    std::fs::write(
        &pb,
        qpipe::formats::tf::graph_def::graph_to_bytes(&g.g).unwrap(),
    )
    .unwrap();

    let ops = listed(&pb);
    let names: Vec<&str> = ops.iter().map(|(o, _, _)| o.as_str()).collect();
    assert_eq!(names, ["Cos", "Erfinv"], "{ops:?}");
    let (_, n, cos) = &ops[0];
    assert_eq!(*n, 2);
    assert_eq!(cos.len(), 2, "{cos:?}");
    assert!(
        cos[0].starts_with("no int8 kernel")
            && cos[0].contains("stays float under DEFAULT")
            && cos[0].contains("error under OPTIMIZE_FOR_LATENCY"),
        "{cos:?}"
    );
    assert!(cos[1].starts_with("no TFLite builtin"), "{cos:?}");
    let (_, _, erfinv) = &ops[1];
    assert!(erfinv[0].starts_with("no float kernel"), "{erfinv:?}");
    assert_eq!(erfinv.len(), 3, "{erfinv:?}");
    // the reasons are the layers' answers for the typed op
    let parsed = qpipe::ir::Op::parse(&Node::new("c", "Cos")).unwrap();
    assert_eq!(*cos, OpSupport::of(&parsed).problems());

    let (text, _) = qpipe(&["inspect", pb.to_str().unwrap()]);
    assert!(
        text.contains("ops qpipe cannot run, quantize or export (inference graph, 2):"),
        "{text}"
    );
    assert!(text.contains("  Cos (2 nodes, e.g. 'cos"), "{text}");
    assert!(text.contains("    - no TFLite builtin"), "{text}");
    assert!(text.contains("  Erfinv (1 node, e.g. 'odd'):"), "{text}");
}

#[test]
fn a_model_qpipe_handles_lists_none() {
    let mut g = G::new();
    g.placeholder("x", DType::F32, Some(&[-1, 4]));
    g.op("out", "Relu", &["x"], &[]);
    g.output("out");
    let dir = support::tmp_dir("inspect_ops_none");
    let pb = dir.join("g.pb");
    std::fs::write(
        &pb,
        qpipe::formats::tf::graph_def::graph_to_bytes(&g.g).unwrap(),
    )
    .unwrap();
    assert!(listed(&pb).is_empty());
    let (text, _) = qpipe(&["inspect", pb.to_str().unwrap()]);
    assert!(
        text.contains("ops qpipe cannot run, quantize or export (inference graph): none"),
        "{text}"
    );
    assert!(
        text.contains("ops that stay float under activations = \"int16\" (no 16x8 kernel): none"),
        "{text}"
    );
}

/// The ops with an int8 form but no 16x8 one are listed apart: they are no problem
/// unless the recipe asks for int16 activations.
#[test]
fn ops_without_a_16x8_kernel_are_listed_apart() {
    let mut g = G::new();
    g.placeholder("x", DType::F32, Some(&[-1, 4]));
    g.op("s", "Sigmoid", &["x"], &[]);
    g.op("e", "Elu", &["s"], &[]);
    g.op("e_2", "Elu", &["e"], &[]);
    g.op("out", "Tanh", &["e_2"], &[]);
    g.output("out");
    let dir = support::tmp_dir("inspect_ops_int16");
    let pb = dir.join("g.pb");
    std::fs::write(
        &pb,
        qpipe::formats::tf::graph_def::graph_to_bytes(&g.g).unwrap(),
    )
    .unwrap();
    assert!(listed(&pb).is_empty());
    let (out, _) = qpipe(&["inspect", pb.to_str().unwrap(), "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["graph"]["unsupported_ops"]["float_in_int16"],
        serde_json::json!([{"op": "Elu", "nodes": 2}]),
        "{v}"
    );
    let (text, _) = qpipe(&["inspect", pb.to_str().unwrap()]);
    assert!(
        text.contains(
            "ops that stay float under activations = \"int16\" (no 16x8 kernel; an error \
             under OPTIMIZE_FOR_LATENCY): Elu (2 nodes)"
        ),
        "{text}"
    );
}

#[test]
fn a_checkpoint_with_a_tf1_while_loop_says_to_unroll_it() {
    let fx = support::manifest_dir().join("fixtures/fam_dynamic_rnn/best_validation");
    let ops = listed(&fx);
    for op in [
        "Enter",
        "Exit",
        "LoopCond",
        "Merge",
        "NextIteration",
        "Switch",
    ] {
        let (_, _, reasons) = ops
            .iter()
            .find(|(o, _, _)| o == op)
            .unwrap_or_else(|| panic!("{op} not listed: {ops:?}"));
        assert!(
            reasons.len() == 1
                && reasons[0].contains("TF1 while loop")
                && reasons[0].contains("unroll"),
            "{op}: {reasons:?}"
        );
    }
    // the training step (gradients, optimizer, saver) is not part of what is listed
    assert!(
        ops.iter()
            .all(|(o, _, _)| !o.contains("Grad") && !o.contains("Apply") && o != "SaveV2"),
        "{ops:?}"
    );
}

#[test]
fn what_strip_folds_away_is_not_listed_and_the_cli_gives_the_library_answer() {
    // conv_bn: dropout, its RandomUniform and the flatten's shape arithmetic fold away,
    // and the batch norm folds into the convolution
    let p = support::manifest_dir().join("fixtures/conv_bn/best_validation");
    let ins = qpipe::formats::tf::inspect::inspect(&p).unwrap();
    let g = ins.graph.as_ref().unwrap();
    let raw: Vec<&str> = g.inference_ops.iter().map(|u| u.op.as_str()).collect();
    assert!(
        raw.contains(&"RandomUniform") && raw.contains(&"FusedBatchNormV3"),
        "{raw:?}"
    );
    let found = model_problems(&p, g);
    assert_eq!(found.graph, "inference graph");
    assert!(found.problems.is_empty(), "{found:?}");
    assert!(listed(&p).is_empty());

    for name in ["fam_arith", "fam_mlp_bn", "fam_decoders", "fam_atrous"] {
        for file in ["best_validation", "tf_frozen.pb"] {
            let p = support::manifest_dir()
                .join("fixtures")
                .join(name)
                .join(file);
            let ins = qpipe::formats::tf::inspect::inspect(&p).unwrap();
            let found = model_problems(&p, ins.graph.as_ref().unwrap());
            let want: Vec<(String, usize, Vec<String>)> = found
                .problems
                .iter()
                .map(|p| (p.op.clone(), p.nodes, p.reasons.clone()))
                .collect();
            assert_eq!(listed(&p), want, "{name}/{file}");
            for pr in &found.problems {
                assert!(!pr.reasons.is_empty(), "{name}/{file}: {pr:?}");
            }
        }
    }
}
