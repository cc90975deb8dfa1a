//! Freezing the fixture checkpoints (written by TensorFlow 2.21) and comparing with the
//! `tf_frozen.pb` TensorFlow's `convert_variables_to_constants` produced from them.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use prost::Message;
use qpipe::formats::tf::checkpoint::Bundle;
use qpipe::formats::tf::freeze::{freeze_checkpoint, freeze_model};
use qpipe::formats::tf::graph_def::{graph_to_bytes, read_graph_def};
use qpipe::formats::tf::proto::{attr_value, MetaGraphDef, TensorShapeProto};
use qpipe::ir::{Attr, Graph};
use qpipe::spec::{ModelSource, ModelSpec};
use support::fixtures::{fixture, MODELS};
use support::tmp_dir;

/// A fixture checkpoint prefix whose `.meta` and `.index` exist.
fn prefix(model: &str) -> PathBuf {
    fixture(&format!("{model}/best_validation.meta"));
    fixture(&format!("{model}/best_validation.index"));
    fixture(model).join("best_validation")
}

fn model_json(model: &str) -> serde_json::Value {
    let path = fixture(&format!("{model}/model.json"));
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

fn spec(model: &str) -> ModelSpec {
    let json = model_json(model);
    let outputs: Vec<String> = json["outputs"]
        .as_array()
        .expect("model.json outputs")
        .iter()
        .map(|o| o.as_str().unwrap().to_string())
        .collect();
    let inputs: Vec<String> = json["inputs"]
        .as_object()
        .expect("model.json inputs")
        .keys()
        .cloned()
        .collect();
    ModelSpec {
        source: ModelSource::Checkpoint(prefix(model)),
        inputs,
        outputs,
        input_shapes: BTreeMap::new(),
    }
}

fn names(g: &Graph) -> BTreeSet<String> {
    g.nodes.iter().map(|n| n.name.clone()).collect()
}

/// Attributes that differ by design: the `.meta` graph carries `_output_shapes`,
/// TensorFlow's live-session graph did not.
fn comparable_attrs(n: &qpipe::ir::Node) -> BTreeMap<&String, &Attr> {
    n.attrs
        .iter()
        .filter(|(k, _)| k.as_str() != "_output_shapes")
        .collect()
}

#[test]
fn push_student_freezes_to_the_student_output() {
    let g = freeze_model(&spec("push_student")).unwrap();
    assert_eq!(g.outputs[0].to_string(), "score_student/output_student");
    assert_eq!(g.inputs, ["input_x"]);
    assert!(
        g.node("teacher/embedding").is_none(),
        "teacher is not needed"
    );
    assert!(g.nodes.iter().all(|n| n.op != "VariableV2"));
    let emb = g.node("student/embedding").unwrap();
    assert_eq!(emb.op, "Const");
    assert_eq!(emb.const_value().unwrap().shape(), [2000, 32]);
}

#[test]
fn frozen_graphs_match_tensorflow() {
    for model in MODELS {
        let ours = freeze_model(&spec(model)).unwrap();
        let tf_path = fixture(&format!("{model}/tf_frozen.pb"));
        let tf = read_graph_def(&tf_path).unwrap();
        assert_eq!(names(&ours), names(&tf), "{model}: node sets differ");
        let mut consts = 0;
        for theirs in &tf.nodes {
            let mine = ours.node(&theirs.name).unwrap();
            let at = format!("{model}: node '{}'", theirs.name);
            assert_eq!(mine.op, theirs.op, "{at}");
            assert_eq!(mine.inputs, theirs.inputs, "{at}");
            assert_eq!(mine.control_inputs, theirs.control_inputs, "{at}");
            assert_eq!(mine.device, theirs.device, "{at}");
            assert_eq!(comparable_attrs(mine), comparable_attrs(theirs), "{at}");
            if let Some(t) = theirs.const_value() {
                let m = mine.const_value().unwrap();
                assert_eq!((m.dtype(), m.shape()), (t.dtype(), t.shape()), "{at}");
                assert_eq!(m.bytes(), t.bytes(), "{at}: constant bits differ");
                assert_eq!(m.strings(), t.strings(), "{at}");
                consts += 1;
            }
        }
        assert!(consts >= 16, "{model}: only {consts} constants compared");
        assert_eq!(ours.producer, tf.producer, "{model}");
    }
}

#[test]
fn freezing_is_deterministic_and_exports_stably() {
    let a = graph_to_bytes(&freeze_model(&spec("conv_bn")).unwrap()).unwrap();
    let b = graph_to_bytes(&freeze_model(&spec("conv_bn")).unwrap()).unwrap();
    assert_eq!(a, b);
}

#[test]
fn resource_gather_becomes_gather_v2_with_an_axis_const() {
    let g = freeze_model(&spec("mlp_res")).unwrap();
    let gather = g.node("embed/embedding_lookup").unwrap();
    assert_eq!(gather.op, "GatherV2");
    assert_eq!(gather.inputs[2].node, "embed/embedding_lookup/axis");
    let axis = g.node("embed/embedding_lookup/axis").unwrap();
    assert_eq!(axis.const_value().unwrap().values::<i32>().unwrap(), [0]);
}

#[test]
fn a_frozen_pb_is_cut_to_its_outputs() {
    let mut spec = spec("push_student");
    spec.source = ModelSource::Graph(fixture("push_student/tf_frozen.pb"));
    let g = freeze_model(&spec).unwrap();
    assert_eq!(g.nodes.len(), 69);
    assert_eq!(g.inputs, ["input_x"]);

    spec.outputs = vec!["student/concat:0".into()];
    let g = freeze_model(&spec).unwrap();
    assert!(g.node("score_student/output_student").is_none());
    assert!(g.node("keep_prob").is_none());
    assert_eq!(g.outputs[0].to_string(), "student/concat");
}

#[test]
fn input_shapes_fix_the_placeholder_shape() {
    let mut spec = spec("conv_bn");
    spec.input_shapes
        .insert("input_x".into(), vec![1, -1, -1, -1]);
    let g = freeze_model(&spec).unwrap();
    assert_eq!(
        g.node("input_x").unwrap().attrs["shape"],
        Attr::Shape(Some(vec![1, 16, 16, 3]))
    );
    spec.input_shapes.insert("input_x".into(), vec![1, 8, 8, 3]);
    let e = freeze_model(&spec).unwrap_err().to_string();
    assert!(e.contains("input_x") && e.contains("conflicts"), "{e}");
}

#[test]
fn dtypes_checkpoint_freezes_every_dtype_and_partitioned_slices() {
    let prefix = prefix("dtypes");
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("dtypes/expected_tensors.json")).unwrap())
            .unwrap();
    let vars = [
        "f32_3d",
        "f16_vec",
        "bf16_3d",
        "f64_scalar",
        "i8_vec",
        "i16_2d",
        "i32_scalar",
        "i64_2d",
        "u8_vec",
        "u16_vec",
        "bool_2d",
        "bool_scalar",
        "f32_scalar",
    ];
    let mut outputs: Vec<String> = vars.iter().map(|v| format!("{v}/read")).collect();
    outputs.extend(
        [
            "str_vec/read",
            "partitioned/part_0/read",
            "partitioned/part_1/read",
        ]
        .map(String::from),
    );
    let g = freeze_checkpoint(&prefix, &outputs).unwrap();
    for v in vars {
        let t = g.node(v).unwrap().const_value().unwrap();
        let want = &expected[v];
        assert_eq!(t.dtype().name(), want["dtype"].as_str().unwrap(), "{v}");
        assert_eq!(
            blake3::hash(t.bytes()).to_hex().as_str(),
            want["blake3"].as_str().unwrap(),
            "{v}"
        );
    }
    let s = g.node("str_vec").unwrap().const_value().unwrap();
    assert_eq!(s.strings().unwrap().len(), 4);
    assert_eq!(s.strings().unwrap()[0], b"hello");

    let p0 = g.node("partitioned/part_0").unwrap().const_value().unwrap();
    let p1 = g.node("partitioned/part_1").unwrap().const_value().unwrap();
    assert_eq!((p0.shape(), p1.shape()), (&[3, 3][..], &[3, 3][..]));
    let full = [p0.bytes(), p1.bytes()].concat();
    assert_eq!(
        blake3::hash(&full).to_hex().as_str(),
        expected["partitioned"]["blake3"].as_str().unwrap()
    );
}

/// A scratch directory holding copies of fixture files under new names.
fn scratch(name: &str, files: &[(&str, &[u8])]) -> PathBuf {
    let dir = tmp_dir(name);
    for (file, bytes) in files {
        std::fs::write(dir.join(file), bytes).unwrap();
    }
    dir
}

fn read(rel: &str) -> Vec<u8> {
    std::fs::read(fixture(rel)).unwrap()
}

#[test]
fn a_meta_that_is_not_a_meta_graph_is_named() {
    let dir = scratch(
        "notmeta",
        &[
            ("m.meta", &read("mlp_res/tf_frozen.pb")),
            ("m.index", &read("mlp_res/best_validation.index")),
            (
                "m.data-00000-of-00001",
                &read("mlp_res/best_validation.data-00000-of-00001"),
            ),
        ],
    );
    let e = freeze_checkpoint(&dir.join("m"), &["output/probs".into()])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("m.meta") && e.contains("not a MetaGraphDef"),
        "{e}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn an_unknown_output_is_named_with_the_file() {
    let mut spec = spec("conv_bn");
    spec.outputs = vec!["output/nope:0".into()];
    let e = freeze_model(&spec).unwrap_err().to_string();
    assert!(
        e.contains("'output/nope'") && e.contains("best_validation.meta"),
        "{e}"
    );
    let mut spec = self::spec("conv_bn");
    spec.source = ModelSource::Graph(fixture("conv_bn/tf_frozen.pb"));
    spec.outputs = vec!["output/nope".into()];
    let e = freeze_model(&spec).unwrap_err().to_string();
    assert!(
        e.contains("'output/nope'") && e.contains("tf_frozen.pb"),
        "{e}"
    );
}

#[test]
fn an_input_not_in_the_graph_is_an_error() {
    let mut spec = spec("conv_bn");
    spec.inputs = vec!["labels".into()];
    let e = freeze_model(&spec).unwrap_err().to_string();
    assert!(
        e.contains("input 'labels'") && e.contains("best_validation.meta"),
        "{e}"
    );
}

#[test]
fn a_variable_missing_from_the_bundle_is_named() {
    // conv_bn's graph with mlp_res's checkpoint: conv1/weights has no entry.
    let dir = scratch(
        "missingvar",
        &[
            ("m.meta", &read("conv_bn/best_validation.meta")),
            ("m.index", &read("mlp_res/best_validation.index")),
            (
                "m.data-00000-of-00001",
                &read("mlp_res/best_validation.data-00000-of-00001"),
            ),
        ],
    );
    let e = freeze_checkpoint(&dir.join("m"), &["output/probs".into()])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("m.meta") && e.contains("variable 'conv1/") && e.contains("m.index"),
        "{e}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// push_student's `.meta` with one variable's attribute replaced.
fn meta_with_changed_attr(node: &str, key: &str, value: attr_value::Value) -> Vec<u8> {
    let mut mgd =
        MetaGraphDef::decode(read("push_student/best_validation.meta").as_slice()).unwrap();
    let gd = mgd.graph_def.as_mut().unwrap();
    let nd = gd.node.iter_mut().find(|n| n.name == node).unwrap();
    nd.attr.get_mut(key).unwrap().value = Some(value);
    mgd.encode_to_vec()
}

#[test]
fn variable_dtype_and_shape_are_checked_against_the_bundle() {
    let shape = TensorShapeProto {
        dim: vec![qpipe::formats::tf::proto::tensor_shape_proto::Dim {
            size: 5,
            name: String::new(),
        }],
        unknown_rank: false,
    };
    let cases = [
        (
            meta_with_changed_attr(
                "score_student/fc/bias",
                "shape",
                attr_value::Value::Shape(shape),
            ),
            "has shape [5], but checkpoint tensor 'score_student/fc/bias' has shape [4]",
        ),
        (
            meta_with_changed_attr(
                "score_student/fc/bias",
                "dtype",
                attr_value::Value::Type(qpipe::formats::tf::proto::DataType::DtDouble as i32),
            ),
            "is float64, but checkpoint tensor 'score_student/fc/bias' is float32",
        ),
    ];
    for (i, (meta, want)) in cases.iter().enumerate() {
        let dir = scratch(
            &format!("mismatch{i}"),
            &[
                ("m.meta", meta),
                ("m.index", &read("push_student/best_validation.index")),
                (
                    "m.data-00000-of-00001",
                    &read("push_student/best_validation.data-00000-of-00001"),
                ),
            ],
        );
        let e = freeze_checkpoint(&dir.join("m"), &["score_student/output_student".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("variable 'score_student/fc/bias' (VariableV2)") && e.contains(want),
            "{e}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
fn restore_graph_keys_match_the_bundle() {
    // Every variable of each training graph maps to a key the bundle holds.
    for model in MODELS {
        let prefix = prefix(model);
        let mg = qpipe::formats::tf::meta_graph::read_meta_graph(
            &qpipe::formats::tf::freeze::meta_path(&prefix),
        )
        .unwrap();
        let bundle = Bundle::open(&prefix).unwrap();
        let keys =
            qpipe::formats::tf::freeze::variable_keys(&mg.graph, mg.saver.as_ref(), &mg.variables)
                .unwrap();
        let vars: Vec<_> = mg
            .graph
            .nodes
            .iter()
            .filter(|n| n.op == "VariableV2" || n.op == "VarHandleOp")
            .collect();
        assert!(!vars.is_empty());
        for v in vars {
            let k = &keys[&v.name];
            assert!(bundle.contains(&k.key), "{model}: {} → {}", v.name, k.key);
        }
        assert_eq!(
            keys.len(),
            bundle.len(),
            "{model}: every bundle key is a variable"
        );
    }
}

#[test]
fn an_unfrozen_pb_is_refused() {
    let mgd = MetaGraphDef::decode(read("conv_bn/best_validation.meta").as_slice()).unwrap();
    let dir = scratch(
        "unfrozen",
        &[("g.pb", &mgd.graph_def.unwrap().encode_to_vec())],
    );
    let mut spec = spec("conv_bn");
    spec.source = ModelSource::Graph(dir.join("g.pb"));
    let e = freeze_model(&spec).unwrap_err().to_string();
    assert!(
        e.contains("g.pb") && e.contains("not frozen") && e.contains("VarHandleOp"),
        "{e}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
