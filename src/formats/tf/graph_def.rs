//! TensorFlow `GraphDef` ↔ IR [`Graph`].
//!
//! Import keeps everything a later export needs: node names, ops, inputs (`name`,
//! `name:N`, `^ctrl`), devices, every attribute (`_output_shapes`, `_class`, ...),
//! `versions.producer` and the function library (as raw bytes). Attributes the IR does
//! not model (functions, tensor lists, `_REF` or complex dtypes, named dimensions,
//! tensors of dtypes the IR cannot hold) become [`Attr::Opaque`] with the serialized
//! `AttrValue`, so they round-trip unchanged.
//!
//! What a GraphDef cannot say is not written: `Graph::inputs`/`outputs` (a GraphDef has
//! no such list) and node debug info / full types (dropped on import). Quantization
//! parameters cannot be written at all, so exporting a graph that has them is an error.
//! Export is deterministic: the same graph always gives the same bytes (attributes are
//! a sorted map, tensors are written as `tensor_content`).

use std::collections::HashSet;
use std::path::Path;

use prost::Message;

use super::proto::{
    attr_value, tensor_shape_proto, AttrValue, DataType, GraphDef, NodeDef, TensorShapeProto,
    VersionDef,
};
use super::tensor_proto::{holds_dtype, tensor_from_proto, tensor_to_proto};
use crate::error::{Error, Result, ResultExt};
use crate::ir::{Attr, DType, Graph, Node, TensorRef};

/// Reads and imports a binary GraphDef (`.pb`) file.
pub fn read_graph_def(path: &Path) -> Result<Graph> {
    let bytes = crate::error::read_file(path)?;
    let gd = decode_graph_def(&bytes).map_err(|e| Error::file(path, e))?;
    graph_from_proto(&gd).map_err(|e| Error::file(path, e))
}

/// Decodes GraphDef bytes; the error says why they are not a GraphDef.
pub fn decode_graph_def(bytes: &[u8]) -> Result<GraphDef> {
    GraphDef::decode(bytes).map_err(|e| Error::msg(format!("not a GraphDef: {e}")))
}

/// Imports a decoded GraphDef. Errors name the node (and attribute) at fault.
pub fn graph_from_proto(gd: &GraphDef) -> Result<Graph> {
    let mut nodes = Vec::with_capacity(gd.node.len());
    let mut names = HashSet::with_capacity(gd.node.len());
    for nd in &gd.node {
        let node = node_from_proto(nd)?;
        if !names.insert(nd.name.as_str()) {
            return Err(Error::msg(format!(
                "node '{}' ({}) appears twice",
                nd.name, nd.op
            )));
        }
        nodes.push(node);
    }
    Ok(Graph {
        nodes,
        inputs: Vec::new(),
        outputs: Vec::new(),
        producer: gd.versions.as_ref().map_or(0, |v| v.producer),
        library: gd.library.clone(),
    })
}

/// Imports one node.
pub fn node_from_proto(nd: &NodeDef) -> Result<Node> {
    if nd.name.is_empty() {
        return Err(Error::msg(format!("a node ({}) has an empty name", nd.op)));
    }
    let mut node = Node::new(nd.name.clone(), nd.op.clone());
    node.device = nd.device.clone();
    for input in &nd.input {
        if let Some(ctrl) = input.strip_prefix('^') {
            node.control_inputs.push(ctrl.to_string());
        } else {
            let r = TensorRef::parse(input).ok_or_else(|| {
                Error::msg(format!(
                    "node '{}' ({}) has an empty input name",
                    nd.name, nd.op
                ))
            })?;
            node.inputs.push(r);
        }
    }
    for (key, value) in &nd.attr {
        let attr = attr_from_proto(value)
            .with_context(|| format!("node '{}' ({}) attribute '{key}'", nd.name, nd.op))?;
        node.attrs.insert(key.clone(), attr);
    }
    Ok(node)
}

/// Exports a graph as GraphDef bytes.
pub fn graph_to_bytes(graph: &Graph) -> Result<Vec<u8>> {
    Ok(graph_to_proto(graph)?.encode_to_vec())
}

/// Exports a graph as a GraphDef message.
pub fn graph_to_proto(graph: &Graph) -> Result<GraphDef> {
    let node = graph
        .nodes
        .iter()
        .map(node_to_proto)
        .collect::<Result<Vec<_>>>()?;
    Ok(GraphDef {
        node,
        versions: Some(VersionDef {
            producer: graph.producer,
            ..VersionDef::default()
        }),
        library: graph.library.clone(),
        ..GraphDef::default()
    })
}

/// Exports one node.
pub fn node_to_proto(node: &Node) -> Result<NodeDef> {
    if !node.output_quant.is_empty() {
        return Err(Error::msg(format!(
            "node '{}' ({}) has quantization parameters, which a GraphDef cannot hold",
            node.name, node.op
        )));
    }
    let input = node
        .inputs
        .iter()
        .map(TensorRef::to_string)
        .chain(node.control_inputs.iter().map(|c| format!("^{c}")))
        .collect();
    let mut attr = std::collections::BTreeMap::new();
    for (key, value) in &node.attrs {
        let av = attr_to_proto(value)
            .with_context(|| format!("node '{}' ({}) attribute '{key}'", node.name, node.op))?;
        attr.insert(key.clone(), av);
    }
    Ok(NodeDef {
        name: node.name.clone(),
        op: node.op.clone(),
        input,
        device: node.device.clone(),
        attr,
        ..NodeDef::default()
    })
}

/// The IR dtype of a plain (non-`_REF`) proto dtype the IR knows.
fn plain_dtype(code: i32) -> Option<DType> {
    DataType::try_from(code)
        .ok()
        .filter(|d| !d.is_ref())
        .and_then(DataType::to_ir)
}

/// A shape the IR can hold: no named dimensions.
fn shape_from_proto(s: &TensorShapeProto) -> Option<Option<Vec<i64>>> {
    if s.dim.iter().any(|d| !d.name.is_empty()) {
        return None;
    }
    if s.unknown_rank {
        return if s.dim.is_empty() { Some(None) } else { None };
    }
    Some(Some(s.dim.iter().map(|d| d.size).collect()))
}

fn shape_to_proto(s: &Option<Vec<i64>>) -> TensorShapeProto {
    match s {
        None => TensorShapeProto {
            dim: Vec::new(),
            unknown_rank: true,
        },
        Some(dims) => TensorShapeProto {
            dim: dims
                .iter()
                .map(|&size| tensor_shape_proto::Dim {
                    size,
                    name: String::new(),
                })
                .collect(),
            unknown_rank: false,
        },
    }
}

/// An `AttrValue` as an IR attribute; anything the IR does not model is kept opaque.
/// A tensor of a dtype the IR holds must decode, or it is an error.
pub fn attr_from_proto(av: &AttrValue) -> Result<Attr> {
    use attr_value::Value;
    let opaque = || Attr::Opaque(av.encode_to_vec());
    Ok(match &av.value {
        Some(Value::S(s)) => Attr::Str(s.clone()),
        Some(Value::I(i)) => Attr::Int(*i),
        Some(Value::F(f)) => Attr::Float(*f),
        Some(Value::B(b)) => Attr::Bool(*b),
        Some(Value::Type(t)) => plain_dtype(*t).map_or_else(opaque, Attr::Type),
        Some(Value::Shape(s)) => shape_from_proto(s).map_or_else(opaque, Attr::Shape),
        Some(Value::Tensor(t)) if holds_dtype(t.dtype) => Attr::Tensor(tensor_from_proto(t)?),
        Some(Value::List(l)) => list_from_proto(l).unwrap_or_else(opaque),
        Some(Value::Tensor(_) | Value::Func(_) | Value::Placeholder(_)) | None => opaque(),
    })
}

/// A list attribute with at most one kind of element; an empty list is `Ints([])`.
fn list_from_proto(l: &attr_value::ListValue) -> Option<Attr> {
    let kinds = [
        !l.s.is_empty(),
        !l.i.is_empty(),
        !l.f.is_empty(),
        !l.b.is_empty(),
        !l.r#type.is_empty(),
        !l.shape.is_empty(),
        !l.tensor.is_empty(),
        !l.func.is_empty(),
    ];
    match kinds.iter().filter(|&&k| k).count() {
        0 => return Some(Attr::Ints(Vec::new())),
        1 => {}
        _ => return None,
    }
    if !l.s.is_empty() {
        Some(Attr::Strs(l.s.clone()))
    } else if !l.i.is_empty() {
        Some(Attr::Ints(l.i.clone()))
    } else if !l.f.is_empty() {
        Some(Attr::Floats(l.f.clone()))
    } else if !l.b.is_empty() {
        Some(Attr::Bools(l.b.clone()))
    } else if !l.r#type.is_empty() {
        l.r#type
            .iter()
            .map(|&t| plain_dtype(t))
            .collect::<Option<Vec<_>>>()
            .map(Attr::Types)
    } else if !l.shape.is_empty() {
        l.shape
            .iter()
            .map(shape_from_proto)
            .collect::<Option<Vec<_>>>()
            .map(Attr::Shapes)
    } else {
        None
    }
}

/// An IR attribute as an `AttrValue`.
pub fn attr_to_proto(attr: &Attr) -> Result<AttrValue> {
    use attr_value::{ListValue, Value};
    let list = |l: ListValue| Some(Value::List(l));
    let value = match attr {
        Attr::Int(i) => Some(Value::I(*i)),
        Attr::Float(f) => Some(Value::F(*f)),
        Attr::Bool(b) => Some(Value::B(*b)),
        Attr::Str(s) => Some(Value::S(s.clone())),
        Attr::Type(t) => Some(Value::Type(DataType::from_ir(*t) as i32)),
        Attr::Shape(s) => Some(Value::Shape(shape_to_proto(s))),
        Attr::Tensor(t) => Some(Value::Tensor(tensor_to_proto(t))),
        Attr::Ints(v) => list(ListValue {
            i: v.clone(),
            ..ListValue::default()
        }),
        Attr::Floats(v) => list(ListValue {
            f: v.clone(),
            ..ListValue::default()
        }),
        Attr::Bools(v) => list(ListValue {
            b: v.clone(),
            ..ListValue::default()
        }),
        Attr::Strs(v) => list(ListValue {
            s: v.clone(),
            ..ListValue::default()
        }),
        Attr::Types(v) => list(ListValue {
            r#type: v.iter().map(|&t| DataType::from_ir(t) as i32).collect(),
            ..ListValue::default()
        }),
        Attr::Shapes(v) => list(ListValue {
            shape: v.iter().map(shape_to_proto).collect(),
            ..ListValue::default()
        }),
        Attr::Opaque(bytes) => {
            return AttrValue::decode(bytes.as_slice())
                .map_err(|e| Error::msg(format!("opaque value is not an AttrValue: {e}")))
        }
    };
    Ok(AttrValue { value })
}

/// The node names a node depends on: data inputs, control inputs and, as TF's
/// `extract_sub_graph` does, the nodes named by `_class` colocation attributes (`loc:@name`).
pub fn dependencies(node: &Node) -> impl Iterator<Item = &str> {
    let colocated: &[Vec<u8>] = match node.attrs.get("_class") {
        Some(Attr::Strs(v)) => v,
        _ => &[],
    };
    node.inputs
        .iter()
        .map(|r| r.node.as_str())
        .chain(node.control_inputs.iter().map(String::as_str))
        .chain(colocated.iter().filter_map(|c| {
            std::str::from_utf8(c)
                .ok()
                .and_then(|s| s.strip_prefix("loc:@"))
        }))
}

/// TF's `extract_sub_graph`: keeps the nodes `outputs` depend on (through data, control
/// and colocation edges), in their original order. Every output and every dependency
/// must exist; errors name the missing node.
pub fn extract_sub_graph(graph: &mut Graph, outputs: &[&str]) -> Result<()> {
    let index = graph.index()?;
    let mut keep = vec![false; graph.nodes.len()];
    let mut stack = Vec::with_capacity(outputs.len());
    for name in outputs {
        let i = *index
            .get(name)
            .ok_or_else(|| Error::msg(format!("output '{name}' is not a node of the graph")))?;
        stack.push(i);
    }
    while let Some(i) = stack.pop() {
        if std::mem::replace(&mut keep[i], true) {
            continue;
        }
        let node = &graph.nodes[i];
        for dep in dependencies(node) {
            let j = *index.get(dep).ok_or_else(|| {
                Error::msg(format!(
                    "node '{}' ({}) depends on '{dep}', which is not in the graph",
                    node.name, node.op
                ))
            })?;
            if !keep[j] {
                stack.push(j);
            }
        }
    }
    let mut it = keep.into_iter();
    graph.nodes.retain(|_| it.next().unwrap_or(false));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::Tensor;

    fn attr_round_trip(a: Attr) {
        let av = attr_to_proto(&a).unwrap();
        assert_eq!(attr_from_proto(&av).unwrap(), a);
    }

    #[test]
    fn modelled_attrs_round_trip() {
        attr_round_trip(Attr::Int(-7));
        attr_round_trip(Attr::Float(0.5));
        attr_round_trip(Attr::Bool(true));
        attr_round_trip(Attr::Str(b"SAME".to_vec()));
        attr_round_trip(Attr::Type(DType::BF16));
        attr_round_trip(Attr::Type(DType::Resource));
        attr_round_trip(Attr::Shape(None));
        attr_round_trip(Attr::Shape(Some(vec![-1, 40])));
        attr_round_trip(Attr::Shape(Some(vec![])));
        attr_round_trip(Attr::Tensor(Tensor::from_vec(vec![2], &[1i32, 2])));
        attr_round_trip(Attr::Ints(vec![1, 2, 2, 1]));
        attr_round_trip(Attr::Ints(vec![]));
        attr_round_trip(Attr::Floats(vec![0.1, 2.0]));
        attr_round_trip(Attr::Bools(vec![false, true]));
        attr_round_trip(Attr::Strs(vec![b"loc:@w".to_vec()]));
        attr_round_trip(Attr::Types(vec![DType::F32, DType::I64]));
        attr_round_trip(Attr::Shapes(vec![None, Some(vec![-1, 4])]));
    }

    #[test]
    fn unmodelled_attrs_stay_opaque() {
        use attr_value::{ListValue, Value};
        let cases = [
            Value::Type(DataType::DtFloatRef as i32),
            Value::Type(DataType::DtComplex64 as i32),
            Value::Type(999),
            Value::Func(super::super::proto::NameAttrList {
                name: "f".into(),
                attr: Default::default(),
            }),
            Value::Placeholder("T".into()),
            Value::Shape(TensorShapeProto {
                dim: vec![tensor_shape_proto::Dim {
                    size: 3,
                    name: "batch".into(),
                }],
                unknown_rank: false,
            }),
            Value::List(ListValue {
                i: vec![1],
                f: vec![1.0],
                ..ListValue::default()
            }),
            Value::List(ListValue {
                tensor: vec![tensor_to_proto(&Tensor::scalar(1.0f32))],
                ..ListValue::default()
            }),
            Value::Tensor(super::super::proto::TensorProto {
                dtype: DataType::DtComplex64 as i32,
                ..Default::default()
            }),
        ];
        for v in cases {
            let av = AttrValue { value: Some(v) };
            let a = attr_from_proto(&av).unwrap();
            assert!(matches!(a, Attr::Opaque(_)), "{a:?}");
            assert_eq!(attr_to_proto(&a).unwrap(), av);
        }
    }

    #[test]
    fn malformed_tensor_attr_is_an_error_naming_the_node() {
        let mut tp = tensor_to_proto(&Tensor::from_vec(vec![2], &[1.0f32, 2.0]));
        tp.tensor_content.truncate(5);
        let mut nd = NodeDef {
            name: "w".into(),
            op: "Const".into(),
            ..NodeDef::default()
        };
        nd.attr.insert(
            "value".into(),
            AttrValue {
                value: Some(attr_value::Value::Tensor(tp)),
            },
        );
        let e = node_from_proto(&nd).unwrap_err().to_string();
        assert!(e.contains("node 'w' (Const) attribute 'value'"), "{e}");
    }

    #[test]
    fn inputs_control_inputs_and_duplicates() {
        let nd = NodeDef {
            name: "add".into(),
            op: "AddV2".into(),
            input: vec!["a".into(), "b:2".into(), "^init".into()],
            device: "/device:CPU:0".into(),
            ..NodeDef::default()
        };
        let n = node_from_proto(&nd).unwrap();
        assert_eq!(n.inputs, [TensorRef::new("a", 0), TensorRef::new("b", 2)]);
        assert_eq!(n.control_inputs, ["init"]);
        assert_eq!(node_to_proto(&n).unwrap(), nd);

        let gd = GraphDef {
            node: vec![nd.clone(), nd],
            ..GraphDef::default()
        };
        let e = graph_from_proto(&gd).unwrap_err().to_string();
        assert!(e.contains("node 'add' (AddV2) appears twice"), "{e}");
    }

    #[test]
    fn quantized_nodes_cannot_be_exported() {
        let mut n = Node::new("q", "Relu");
        n.output_quant
            .insert(0, crate::ir::QuantParams::per_tensor(0.1, 3));
        let e = node_to_proto(&n).unwrap_err().to_string();
        assert!(e.contains("'q'"), "{e}");
    }

    #[test]
    fn sub_graph_follows_data_control_and_colocation() {
        let mut g = Graph::default();
        g.nodes.push(Node::new("v", "VariableV2"));
        g.nodes.push(Node::new("init", "NoOp"));
        g.nodes.push(Node::new("unused", "Const"));
        g.nodes.push(Node::new("coloc", "Const"));
        let mut read = Node::new("read", "Identity").with_input(TensorRef::new("v", 0));
        read.attrs
            .insert("_class".into(), Attr::Strs(vec![b"loc:@coloc".to_vec()]));
        read.control_inputs.push("init".into());
        g.nodes.push(read);
        extract_sub_graph(&mut g, &["read"]).unwrap();
        let names: Vec<&str> = g.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["v", "init", "coloc", "read"]);
        let e = extract_sub_graph(&mut g, &["nope"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("'nope'"), "{e}");
    }
}
