//! `inspect` on the fixture checkpoints and graphs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use qpipe::formats::tf::inspect::{inspect, GraphFormat};
use qpipe::ir::DType;
use serde_json::{json, Value};

/// A fixture file; a missing one fails the test (they are committed, never optional).
fn fixture(rel: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel);
    assert!(p.exists(), "fixture {} is missing", p.display());
    p
}

fn expected_tensors(model: &str) -> BTreeMap<String, Value> {
    let bytes = std::fs::read(fixture(&format!("{model}/expected_tensors.json"))).unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[test]
fn a_meta_with_its_checkpoint_gives_both() {
    let i = inspect(&fixture("push_student/best_validation.meta")).unwrap();
    let c = i.checkpoint.as_ref().expect("checkpoint beside the .meta");
    assert_eq!(c.shards, 1);
    assert_eq!(c.tensors.len(), 71);
    assert!(c.tensors.windows(2).all(|w| w[0].key < w[1].key));
    assert_eq!(
        c.total_bytes,
        c.tensors.iter().map(|t| t.bytes).sum::<u64>()
    );
    let emb = c
        .tensors
        .iter()
        .find(|t| t.key == "student/embedding")
        .unwrap();
    assert_eq!(
        (emb.dtype, emb.shape.as_slice(), emb.bytes),
        (DType::F32, &[2000, 32][..], 256_000)
    );

    let g = i.graph.as_ref().unwrap();
    assert_eq!(g.format, GraphFormat::MetaGraphDef);
    assert_eq!(g.nodes, 1423);
    assert_eq!(g.ops["VariableV2"], 71);
    assert_eq!(g.tensorflow_version.as_deref(), Some("2.21.0"));
    let x = g.placeholders.iter().find(|p| p.name == "input_x").unwrap();
    assert_eq!((x.dtype, &x.shape), (Some(DType::I32), &Some(vec![-1, 40])));
    assert!(g.placeholders.iter().all(|p| !p.name.starts_with("save/")));
    let outs: Vec<&str> = g.likely_outputs.iter().map(|o| o.name.as_str()).collect();
    assert!(outs.contains(&"score_student/output_student"), "{outs:?}");
    assert!(outs.contains(&"score_teacher/output_teacher"), "{outs:?}");
    assert_eq!(g.variables.len(), 71);
    assert_eq!(g.variables.iter().filter(|v| v.trainable).count(), 22);
    assert!(g.variables.iter().all(|v| v.in_checkpoint == Some(true)));
}

#[test]
fn training_graph_outputs_leave_the_training_path() {
    for model in ["conv_bn", "mlp_res"] {
        let i = inspect(&fixture(&format!("{model}/best_validation.index"))).unwrap();
        let g = i.graph.as_ref().unwrap();
        let outs: Vec<&str> = g.likely_outputs.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(outs, ["output/probs"], "{model}");
        assert!(i.checkpoint.is_some());
    }
}

#[test]
fn a_frozen_pb_lists_its_output_and_input() {
    let i = inspect(&fixture("mlp_res/tf_frozen.pb")).unwrap();
    assert!(i.checkpoint.is_none());
    let g = i.graph.as_ref().unwrap();
    assert_eq!(g.format, GraphFormat::GraphDef);
    assert_eq!(g.nodes, 48);
    assert_eq!(g.likely_outputs.len(), 1);
    assert_eq!(g.likely_outputs[0].name, "output/probs");
    assert_eq!(g.placeholders.len(), 1);
    assert!(g.variables.is_empty());
    let text = i.to_string();
    assert!(text.contains("output/probs  Softmax"), "{text}");
    assert!(
        text.contains("input_x  Placeholder  int32  [?,12]"),
        "{text}"
    );
}

#[test]
fn sharded_checkpoint_matches_expected_tensors() {
    let i = inspect(&fixture("dtypes/best_validation.data-00001-of-00002")).unwrap();
    let c = i.checkpoint.as_ref().unwrap();
    assert_eq!(c.shards, 2);
    let expected = expected_tensors("dtypes");
    let keys: Vec<&str> = c.tensors.iter().map(|t| t.key.as_str()).collect();
    assert_eq!(
        keys,
        expected.keys().map(String::as_str).collect::<Vec<_>>()
    );
    for t in &c.tensors {
        let want = &expected[&t.key];
        assert_eq!(t.dtype.name(), want["dtype"].as_str().unwrap(), "{}", t.key);
        assert_eq!(json!(t.shape), want["shape"], "{}", t.key);
    }
    let part = c.tensors.iter().find(|t| t.key == "partitioned").unwrap();
    assert_eq!((part.slices, part.bytes), (2, 72));
    let g = i.graph.as_ref().expect(".meta beside the checkpoint");
    let p0 = g
        .variables
        .iter()
        .find(|v| v.name == "partitioned/part_1")
        .unwrap();
    assert_eq!(p0.key, "partitioned");
    assert_eq!(p0.slice, Some(vec![(3, 3), (0, 3)]));
    assert!(i.to_string().contains("partitioned[3:6,0:3]"));
}

#[test]
fn a_tf2_checkpoint_without_meta_and_a_directory() {
    let i = inspect(&fixture("dtypes/tf2ckpt/ckpt.index")).unwrap();
    assert!(i.graph.is_none());
    let c = i.checkpoint.as_ref().unwrap();
    assert!(c
        .tensors
        .iter()
        .any(|t| t.key == "_CHECKPOINTABLE_OBJECT_GRAPH"));

    let i = inspect(&fixture("conv_bn")).unwrap();
    assert_eq!(i.checkpoint.as_ref().unwrap().tensors.len(), 32);
    assert_eq!(i.graph.as_ref().unwrap().nodes, 633);
}

#[test]
fn json_form() {
    let i = inspect(&fixture("conv_bn").join("best_validation")).unwrap();
    let j = i.to_json();
    assert_eq!(j["kinds"], json!(["checkpoint", "meta_graph_def"]));
    assert_eq!(j["checkpoint"]["shards"], json!(1));
    let first = &j["checkpoint"]["tensors"][0];
    assert_eq!(first["key"], json!("conv1/bn/beta"));
    assert_eq!(first["dtype"], json!("float32"));
    assert_eq!(first["shape"], json!([16]));
    assert_eq!(first["bytes"], json!(64));
    let x = j["graph"]["placeholders"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "input_x")
        .unwrap();
    assert_eq!(x["shape"], json!([null, 16, 16, 3]));
    assert_eq!(
        j["graph"]["likely_outputs"],
        json!([{"name": "output/probs", "op": "Softmax"}])
    );
    assert_eq!(j["graph"]["ops"]["VarHandleOp"], json!(32));
    assert_eq!(j["graph"]["format"], json!("meta_graph_def"));
}

#[test]
fn bad_paths_are_named() {
    let missing = Path::new("/nonexistent/qpipe/model");
    let e = inspect(missing).unwrap_err().to_string();
    assert!(e.contains("/nonexistent/qpipe/model"), "{e}");

    let dir = std::env::temp_dir().join(format!("qpipe-inspect-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk.pb");
    std::fs::write(&junk, b"\xff\xff\xff\xff garbage").unwrap();
    let e = inspect(&junk).unwrap_err().to_string();
    assert!(e.contains("junk.pb") && e.contains("not a GraphDef"), "{e}");
    let meta = dir.join("m.meta");
    std::fs::write(
        &meta,
        std::fs::read(fixture("conv_bn/tf_frozen.pb")).unwrap(),
    )
    .unwrap();
    let e = inspect(&meta).unwrap_err().to_string();
    assert!(
        e.contains("m.meta") && e.contains("not a MetaGraphDef"),
        "{e}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// A Keras `compile`/`fit` graph, reduced: the loss reads the softmax itself (so the
/// head is on the training path), accuracy metrics read it with the labels, and the
/// Adam optimizer under `training/` computes step terms that nothing reads.
fn keras_fit_graph() -> qpipe::ir::Graph {
    use qpipe::ir::{Graph, Node, TensorRef};
    let mut g = Graph::default();
    let mut add = |name: &str, op: &str, inputs: &[&str]| {
        let mut n = Node::new(name, op);
        n.inputs = inputs
            .iter()
            .map(|i| TensorRef::parse(i).unwrap())
            .collect();
        g.nodes.push(n);
    };
    add("input_1", "Placeholder", &[]);
    add("dense/kernel", "VarHandleOp", &[]);
    add(
        "dense/MatMul/ReadVariableOp",
        "ReadVariableOp",
        &["dense/kernel"],
    );
    add(
        "dense/MatMul",
        "MatMul",
        &["input_1", "dense/MatMul/ReadVariableOp"],
    );
    add("dense/Softmax", "Softmax", &["dense/MatMul"]);
    add("dense_target", "Placeholder", &[]);
    add("loss/dense_loss/Log", "Log", &["dense/Softmax"]);
    add(
        "loss/dense_loss/mul",
        "Mul",
        &["dense_target", "loss/dense_loss/Log"],
    );
    add("loss/dense_loss/Sum", "Sum", &["loss/dense_loss/mul"]);
    add("metrics/acc/ArgMax", "ArgMax", &["dense/Softmax"]);
    add("metrics/acc/ArgMax_1", "ArgMax", &["dense_target"]);
    add(
        "metrics/acc/Equal",
        "Equal",
        &["metrics/acc/ArgMax", "metrics/acc/ArgMax_1"],
    );
    add(
        "training/Adam/gradients/loss/dense_loss/Sum_grad/Tile",
        "Tile",
        &["loss/dense_loss/Sum"],
    );
    add(
        "training/Adam/gradients/dense/MatMul_grad/MatMul_1",
        "MatMul",
        &[
            "input_1",
            "training/Adam/gradients/loss/dense_loss/Sum_grad/Tile",
        ],
    );
    add("training/Adam/iter", "VarHandleOp", &[]);
    add(
        "training/Adam/ReadVariableOp",
        "ReadVariableOp",
        &["training/Adam/iter"],
    );
    add(
        "training/Adam/add",
        "AddV2",
        &["training/Adam/ReadVariableOp"],
    );
    add("training/Adam/Cast", "Cast", &["training/Adam/add"]);
    add("training/Adam/beta_1", "VarHandleOp", &[]);
    add(
        "training/Adam/Identity_1/ReadVariableOp",
        "ReadVariableOp",
        &["training/Adam/beta_1"],
    );
    add(
        "training/Adam/Identity_1",
        "Identity",
        &["training/Adam/Identity_1/ReadVariableOp"],
    );
    add(
        "training/Adam/Pow",
        "Pow",
        &["training/Adam/Identity_1", "training/Adam/Cast"],
    );
    add("training/Adam/sub_2", "Sub", &["training/Adam/Identity_1"]);
    add("training/Adam/sub_3", "Sub", &["training/Adam/Pow"]);
    add(
        "training/Adam/Adam/update_dense/kernel/ResourceApplyAdam",
        "ResourceApplyAdam",
        &[
            "dense/kernel",
            "training/Adam/Pow",
            "training/Adam/Identity_1",
            "training/Adam/gradients/dense/MatMul_grad/MatMul_1",
        ],
    );
    add("save/SaveV2", "SaveV2", &["dense/kernel"]);
    g
}

#[test]
fn a_keras_fit_graph_lists_its_softmax_not_the_optimizer() {
    let g = keras_fit_graph();
    let s = qpipe::formats::tf::inspect::summarize_graph(
        Path::new("model.meta"),
        GraphFormat::MetaGraphDef,
        &g,
    );
    let outs: Vec<&str> = s.likely_outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(outs, ["dense/Softmax"]);
}
