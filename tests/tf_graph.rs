//! GraphDef ↔ IR on the fixture graphs TensorFlow wrote, and on graphs built here.

mod support;

use prost::Message;
use qpipe::formats::tf::graph_def::{
    decode_graph_def, extract_sub_graph, graph_from_proto, graph_to_bytes, read_graph_def,
};
use qpipe::formats::tf::meta_graph::{meta_graph_from_bytes, read_meta_graph};
use qpipe::formats::tf::proto::{
    attr_value, tensor_shape_proto, AttrValue, DataType, GraphDef, MetaGraphDef, NodeDef,
    TensorProto, TensorShapeProto,
};
use qpipe::ir::{Attr, DType, Graph, Node, TensorRef};
use support::fixtures::fixture;

/// IR → GraphDef → IR gives the same graph, and exporting twice gives the same bytes.
fn assert_round_trips(g1: &Graph, what: &str) {
    let bytes1 = graph_to_bytes(g1).unwrap();
    let g2 = graph_from_proto(&decode_graph_def(&bytes1).unwrap()).unwrap();
    assert_eq!(&g2, g1, "{what}: IR changed through a GraphDef");
    let bytes2 = graph_to_bytes(&g2).unwrap();
    assert_eq!(bytes1, bytes2, "{what}: export is not stable");
}

/// The exported NodeDefs say what the original ones said (tensors compared as values).
fn assert_same_nodes(original: &GraphDef, g: &Graph, what: &str) {
    let exported = decode_graph_def(&graph_to_bytes(g).unwrap()).unwrap();
    assert_eq!(exported.node.len(), original.node.len(), "{what}");
    for (a, b) in original.node.iter().zip(&exported.node) {
        assert_eq!(
            (&a.name, &a.op, &a.input, &a.device),
            (&b.name, &b.op, &b.input, &b.device),
            "{what}"
        );
        assert_eq!(
            a.attr.keys().collect::<Vec<_>>(),
            b.attr.keys().collect::<Vec<_>>(),
            "{what}: node '{}'",
            a.name
        );
        for (k, av) in &a.attr {
            if let Some(attr_value::Value::Tensor(_)) = av.value {
                continue;
            }
            assert_eq!(av, &b.attr[k], "{what}: node '{}' attr '{k}'", a.name);
        }
    }
    assert_eq!(
        original.versions.as_ref().map(|v| v.producer),
        exported.versions.as_ref().map(|v| v.producer)
    );
}

#[test]
fn frozen_fixture_graphs_round_trip() {
    for model in ["push_student", "conv_bn", "mlp_res"] {
        let path = fixture(&format!("{model}/tf_frozen.pb"));
        let original = decode_graph_def(&std::fs::read(&path).unwrap()).unwrap();
        let g = read_graph_def(&path).unwrap();
        assert!(g.nodes.len() > 40, "{model}");
        assert_eq!(g.producer, 2474);
        assert_same_nodes(&original, &g, model);
        assert_round_trips(&g, model);
    }
}

#[test]
fn meta_fixture_graphs_round_trip() {
    for model in ["push_student", "conv_bn", "mlp_res", "dtypes"] {
        let path = fixture(&format!("{model}/best_validation.meta"));
        let mgd = MetaGraphDef::decode(std::fs::read(&path).unwrap().as_slice()).unwrap();
        let mg = read_meta_graph(&path).unwrap();
        assert!(mg.saver.is_some(), "{model}");
        assert!(!mg.variables.is_empty(), "{model}");
        assert_eq!(mg.tensorflow_version, "2.21.0");
        assert_same_nodes(mgd.graph_def.as_ref().unwrap(), &mg.graph, model);
        assert_round_trips(&mg.graph, model);
    }
}

#[test]
fn meta_graph_sizes_match_the_fixture_readme() {
    let sizes = [("push_student", 1423), ("conv_bn", 633), ("mlp_res", 699)];
    for (model, nodes) in sizes {
        let mg = read_meta_graph(&fixture(&format!("{model}/best_validation.meta"))).unwrap();
        assert_eq!(mg.graph.nodes.len(), nodes, "{model}");
    }
    let mg = read_meta_graph(&fixture("push_student/best_validation.meta")).unwrap();
    assert_eq!(mg.variables.len(), 71);
    assert_eq!(mg.trainable_variables.len(), 22);
    assert_eq!(mg.graph.op_histogram()["VariableV2"], 71);
}

#[test]
fn a_graph_def_is_not_a_meta_graph() {
    let bytes = std::fs::read(fixture("conv_bn/tf_frozen.pb")).unwrap();
    let e = meta_graph_from_bytes(&bytes).unwrap_err().to_string();
    assert!(e.contains("not a MetaGraphDef"), "{e}");
}

#[test]
fn truncated_files_are_errors_not_panics() {
    let path = fixture("mlp_res/tf_frozen.pb");
    let bytes = std::fs::read(&path).unwrap();
    for cut in [1, 7, bytes.len() / 3, bytes.len() / 2, bytes.len() - 1] {
        assert!(decode_graph_def(&bytes[..cut]).is_err(), "cut at {cut}");
    }
    let meta = std::fs::read(fixture("mlp_res/best_validation.meta")).unwrap();
    for cut in [3, meta.len() / 2, meta.len() - 2] {
        assert!(meta_graph_from_bytes(&meta[..cut]).is_err(), "cut at {cut}");
    }
}

fn shape(dims: &[i64]) -> TensorShapeProto {
    TensorShapeProto {
        dim: dims
            .iter()
            .map(|&size| tensor_shape_proto::Dim {
                size,
                name: String::new(),
            })
            .collect(),
        unknown_rank: false,
    }
}

fn const_node(name: &str, tp: TensorProto) -> NodeDef {
    let mut nd = NodeDef {
        name: name.into(),
        op: "Const".into(),
        ..NodeDef::default()
    };
    nd.attr.insert(
        "dtype".into(),
        AttrValue {
            value: Some(attr_value::Value::Type(tp.dtype)),
        },
    );
    nd.attr.insert(
        "value".into(),
        AttrValue {
            value: Some(attr_value::Value::Tensor(tp)),
        },
    );
    nd
}

#[test]
fn every_tensor_encoding_imports_and_round_trips() {
    let tp = |dtype: DataType, dims: &[i64]| TensorProto {
        dtype: dtype as i32,
        tensor_shape: Some(shape(dims)),
        ..TensorProto::default()
    };
    let mut nodes = Vec::new();
    let mut t = tp(DataType::DtFloat, &[2, 2]);
    t.float_val = vec![7.5];
    nodes.push(const_node("splat", t));
    let mut t = tp(DataType::DtFloat, &[3]);
    t.tensor_content = [1.0f32, 2.0, 3.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect::<Vec<u8>>()
        .into();
    nodes.push(const_node("content", t));
    let mut t = tp(DataType::DtHalf, &[2]);
    t.half_val = vec![0x3c00, 0xfbff];
    nodes.push(const_node("half", t));
    let mut t = tp(DataType::DtBfloat16, &[2]);
    t.half_val = vec![0x3f80, 0xc040];
    nodes.push(const_node("bf16", t));
    let mut t = tp(DataType::DtInt8, &[3]);
    t.int_val = vec![-1, 0, 127];
    nodes.push(const_node("i8", t));
    let mut t = tp(DataType::DtUint8, &[2]);
    t.int_val = vec![255, 3];
    nodes.push(const_node("u8", t));
    let mut t = tp(DataType::DtInt16, &[1]);
    t.int_val = vec![-300];
    nodes.push(const_node("i16", t));
    let mut t = tp(DataType::DtString, &[2]);
    t.string_val = vec![b"a".to_vec(), b"bc".to_vec()];
    nodes.push(const_node("str", t));
    nodes.push(const_node("zeros", tp(DataType::DtInt64, &[4])));
    let mut t = tp(DataType::DtBool, &[]);
    t.bool_val = vec![true];
    nodes.push(const_node("flag", t));
    let gd = GraphDef {
        node: nodes,
        ..GraphDef::default()
    };
    let g = graph_from_proto(&decode_graph_def(&gd.encode_to_vec()).unwrap()).unwrap();
    let value = |n: &str| g.node(n).unwrap().const_value().unwrap().clone();
    assert_eq!(value("splat").values::<f32>().unwrap(), [7.5; 4]);
    assert_eq!(value("content").values::<f32>().unwrap(), [1.0, 2.0, 3.0]);
    assert_eq!(value("half").to_f32_vec().unwrap(), [1.0, -65504.0]);
    assert_eq!(value("bf16").to_f32_vec().unwrap(), [1.0, -3.0]);
    assert_eq!(value("i8").values::<i8>().unwrap(), [-1, 0, 127]);
    assert_eq!(value("u8").values::<u8>().unwrap(), [255, 3]);
    assert_eq!(value("i16").values::<i16>().unwrap(), [-300]);
    assert_eq!(
        value("str").strings().unwrap(),
        [b"a".to_vec(), b"bc".to_vec()]
    );
    assert_eq!(value("zeros").values::<i64>().unwrap(), [0; 4]);
    assert_eq!(value("flag").values::<bool>().unwrap(), [true]);
    assert_round_trips(&g, "encodings");
}

#[test]
fn unmodelled_attrs_and_the_library_survive_export() {
    let mut nd = NodeDef {
        name: "call".into(),
        op: "PartitionedCall".into(),
        input: vec!["x:1".into(), "^init".into()],
        ..NodeDef::default()
    };
    nd.attr.insert(
        "f".into(),
        AttrValue {
            value: Some(attr_value::Value::Func(
                qpipe::formats::tf::proto::NameAttrList {
                    name: "my_fn".into(),
                    attr: Default::default(),
                },
            )),
        },
    );
    nd.attr.insert(
        "Tout".into(),
        AttrValue {
            value: Some(attr_value::Value::Type(DataType::DtFloatRef as i32)),
        },
    );
    let gd = GraphDef {
        node: vec![nd],
        library: vec![0x0a, 0x02, 0x0a, 0x00],
        ..GraphDef::default()
    };
    let g = graph_from_proto(&gd).unwrap();
    let n = g.node("call").unwrap();
    assert!(matches!(n.attrs["f"], Attr::Opaque(_)));
    assert!(matches!(n.attrs["Tout"], Attr::Opaque(_)));
    assert_eq!(n.inputs, [TensorRef::new("x", 1)]);
    assert_eq!(n.control_inputs, ["init"]);
    let back = decode_graph_def(&graph_to_bytes(&g).unwrap()).unwrap();
    assert_eq!(back.node, gd.node);
    assert_eq!(back.library, gd.library);
}

#[test]
fn a_hundred_thousand_node_chain_does_not_recurse() {
    let n = 100_000;
    let mut g = Graph::default();
    g.nodes
        .push(Node::new("n0", "Placeholder").with_attr("dtype", Attr::Type(DType::F32)));
    for i in 1..n {
        g.nodes.push(
            Node::new(format!("n{i}"), "Relu")
                .with_input(TensorRef::new(format!("n{}", i - 1), 0))
                .with_attr("T", Attr::Type(DType::F32)),
        );
    }
    g.nodes
        .push(Node::new("dead", "Relu").with_input(TensorRef::new("n5", 0)));
    let bytes = graph_to_bytes(&g).unwrap();
    let mut back = graph_from_proto(&decode_graph_def(&bytes).unwrap()).unwrap();
    assert_eq!(back.nodes.len(), n + 1);
    extract_sub_graph(&mut back, &[&format!("n{}", n - 1)]).unwrap();
    assert_eq!(back.nodes.len(), n);
    assert!(back.node("dead").is_none());
}

fn import_err(nodes: Vec<NodeDef>) -> String {
    let gd = GraphDef {
        node: nodes,
        ..GraphDef::default()
    };
    let bytes = gd.encode_to_vec();
    graph_from_proto(&decode_graph_def(&bytes).unwrap())
        .unwrap_err()
        .to_string()
}

/// A Const's shape and contents are checked before its tensor is allocated.
#[test]
fn const_shapes_and_contents_are_bounded_before_allocating() {
    let f32s = |dims: &[i64], content: Vec<u8>, values: Vec<f32>| TensorProto {
        dtype: DataType::DtFloat as i32,
        tensor_shape: Some(shape(dims)),
        tensor_content: content.into(),
        float_val: values,
        ..TensorProto::default()
    };
    // Element count overflowing usize.
    let e = import_err(vec![const_node(
        "w",
        f32s(&[1 << 40, 1 << 40], vec![0; 4], vec![]),
    )]);
    assert!(e.contains("'w'") && e.contains("elements"), "{e}");
    // Far more elements than the contents hold.
    let e = import_err(vec![const_node("w", f32s(&[1 << 30], vec![0; 8], vec![]))]);
    assert!(e.contains("'w'") && e.contains("tensor_content"), "{e}");
    // One stored value expanded to a huge tensor.
    let e = import_err(vec![const_node("w", f32s(&[1 << 30], vec![], vec![1.0]))]);
    assert!(e.contains("'w'") && e.contains("would expand"), "{e}");
    // Negative and unknown dimensions in a constant.
    let e = import_err(vec![const_node("w", f32s(&[-1], vec![], vec![1.0]))]);
    assert!(e.contains("'w'") && e.contains("negative"), "{e}");
}

#[test]
fn cycles_and_dangling_inputs_are_errors_naming_a_node() {
    let node = |name: &str, op: &str, inputs: &[&str]| NodeDef {
        name: name.into(),
        op: op.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        ..NodeDef::default()
    };
    let import = |nodes: Vec<NodeDef>| {
        let gd = GraphDef {
            node: nodes,
            ..GraphDef::default()
        };
        graph_from_proto(&gd).unwrap()
    };
    // a → b → c → a, fed by x; the cycle is found without recursion or a hang.
    let g = import(vec![
        node("x", "Placeholder", &[]),
        node("a", "AddV2", &["x", "c"]),
        node("b", "Relu", &["a"]),
        node("c", "Relu", &["^b"]),
    ]);
    let e = g.topo_order().unwrap_err().to_string();
    assert!(e.contains("cycle through node 'a'"), "{e}");
    let e = qpipe::ir::shape_infer::infer_shapes(&g)
        .unwrap_err()
        .to_string();
    assert!(e.contains("cycle"), "{e}");
    let mut cut = g.clone();
    extract_sub_graph(&mut cut, &["c"]).unwrap();
    assert_eq!(cut.nodes.len(), 4);

    // An input naming no node.
    let g = import(vec![
        node("x", "Placeholder", &[]),
        node("y", "Relu", &["ghost:1"]),
    ]);
    let e = g.topo_order().unwrap_err().to_string();
    assert!(e.contains("'y'") && e.contains("'ghost'"), "{e}");
    let mut cut = g.clone();
    let e = extract_sub_graph(&mut cut, &["y"]).unwrap_err().to_string();
    assert!(e.contains("'y'") && e.contains("'ghost'"), "{e}");
    let e = qpipe::ir::shape_infer::infer_shapes(&g)
        .unwrap_err()
        .to_string();
    assert!(e.contains("'ghost'"), "{e}");
}

#[test]
fn tensor_shapes_whose_element_count_overflows_are_errors() {
    use qpipe::ir::Tensor;
    let huge = vec![usize::MAX / 2 + 1, 2];
    assert_eq!(qpipe::ir::num_elements(&huge), None);
    let e = Tensor::from_bytes(DType::F32, huge.clone(), vec![0u8; 4]).unwrap_err();
    assert!(e.to_string().contains("too many elements"), "{e}");
    // The element count fits, the byte count does not.
    let e = Tensor::from_bytes(DType::F64, vec![usize::MAX / 4], vec![0u8; 8]).unwrap_err();
    assert!(e.to_string().contains("too large"), "{e}");
    assert!(Tensor::from_strings(huge, vec![Vec::new()]).is_err());
    // u64 overflow of a TensorShapeProto's dims (each fits i64) in a GraphDef Const.
    let tp = TensorProto {
        dtype: DataType::DtInt8 as i32,
        tensor_shape: Some(shape(&[i64::MAX, i64::MAX, 2])),
        int_val: vec![1],
        ..TensorProto::default()
    };
    let e = import_err(vec![const_node("big", tp)]);
    assert!(e.contains("'big'") && e.contains("elements"), "{e}");
}
