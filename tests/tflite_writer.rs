//! The `.tflite` layout qpipe writes, checked on the flatbuffer itself: buffer
//! alignment, operator codes and versions, signature, metadata, determinism;
//! the reader on damaged files; errors for graphs TFLite cannot express; the
//! `export_tflite` stage.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;

use qpipe::formats::tflite::{self, reader, schema};
use qpipe::ir::{DType, Graph, Tensor};
use qpipe::stages::fp16_cast::cast_fp16;
use support::fixtures::{stripped_fixture, MODELS};
use support::graph_builder::{f32t, ints, s, G};
use support::numeric::Rng;
use support::stage_runner::MemMemo;

fn small_graph() -> Graph {
    let mut rng = Rng::new(7);
    let mut b = G::new();
    b.placeholder("x", DType::F32, Some(&[-1, 6, 6, 2]));
    b.konst("w", f32t(&[3, 3, 2, 3], &rng.vec(54)));
    b.op(
        "conv",
        "Conv2D",
        &["x", "w"],
        &[("strides", ints(&[1, 1, 1, 1])), ("padding", s("VALID"))],
    );
    b.konst("b", f32t(&[3], &rng.vec(3)));
    b.op("bias", "BiasAdd", &["conv", "b"], &[]);
    b.op("relu", "Relu", &["bias"], &[]);
    b.konst("shape", support::graph_builder::i32t(&[2], &[-1, 48]));
    b.op("flat", "Reshape", &["relu", "shape"], &[]);
    b.konst("fc", f32t(&[48, 2], &rng.vec(96)));
    b.op("logits", "MatMul", &["flat", "fc"], &[]);
    b.op("probs", "Softmax", &["logits"], &[]);
    b.output("probs");
    b.g
}

/// Every exported model of the tests: the fixture models (float32 and float16) and a small graph.
fn exported() -> Vec<(String, Vec<u8>)> {
    let mut out = vec![(
        "small".to_string(),
        tflite::export(&small_graph()).unwrap().1,
    )];
    for m in MODELS {
        let g = stripped_fixture(m);
        out.push((format!("{m} f32"), tflite::export(&g).unwrap().1));
        let (g16, _) = cast_fp16(&g, 1, &[]).unwrap();
        out.push((format!("{m} f16"), tflite::export(&g16).unwrap().1));
    }
    out
}

#[test]
fn buffers_are_16_byte_aligned_and_buffer_0_is_empty() {
    for (name, bytes) in exported() {
        let model = schema::root_as_model(&bytes).unwrap();
        let buffers = model.buffers().unwrap();
        assert!(
            buffers.get(0).data().is_none_or(|d| d.is_empty()),
            "{name}: buffer 0 must be the empty sentinel"
        );
        let base = bytes.as_ptr() as usize;
        let mut with_data = 0;
        for (i, b) in buffers.iter().enumerate() {
            if let Some(d) = b.data() {
                if d.is_empty() {
                    continue;
                }
                with_data += 1;
                let off = d.bytes().as_ptr() as usize - base;
                assert_eq!(off % 16, 0, "{name}: buffer {i} data at offset {off}");
            }
        }
        assert!(with_data > 2, "{name}: expected constant buffers");
    }
}

#[test]
fn header_opcodes_signature_and_metadata() {
    for (name, bytes) in exported() {
        assert_eq!(&bytes[4..8], b"TFL3", "{name}: file identifier");
        let model = schema::root_as_model(&bytes).unwrap();
        assert_eq!(model.version(), 3, "{name}");
        assert_eq!(model.description(), Some("qpipe"), "{name}");
        let codes: Vec<_> = model.operator_codes().unwrap().iter().collect();
        let mut seen = std::collections::HashSet::new();
        for c in &codes {
            let code = c.builtin_code().0;
            assert!(
                seen.insert(code),
                "{name}: operator code {code} listed twice"
            );
            assert_eq!(
                i32::from(c.deprecated_builtin_code()),
                code.min(127),
                "{name}: deprecated_builtin_code"
            );
            let want = if code == 6 { 3 } else { 1 };
            assert_eq!(c.version(), want, "{name}: version of operator {code}");
        }
        let sg = model.subgraphs().unwrap().get(0);
        let ops: Vec<_> = sg.operators().unwrap().iter().collect();
        let first_use: Vec<u32> = {
            let mut v = Vec::new();
            for op in &ops {
                if !v.contains(&op.opcode_index()) {
                    v.push(op.opcode_index());
                }
            }
            v
        };
        assert_eq!(
            first_use,
            (0..codes.len() as u32).collect::<Vec<_>>(),
            "{name}: operator codes in first-use order"
        );

        let sigs = model.signature_defs().unwrap();
        assert_eq!(sigs.len(), 1);
        let sig = sigs.get(0);
        assert_eq!(sig.signature_key(), Some("serving_default"));
        let sin = sig.inputs().unwrap().get(0);
        let tensors = sg.tensors().unwrap();
        assert_eq!(
            tensors.get(sin.tensor_index() as usize).name(),
            sin.name(),
            "{name}: signature input names its tensor"
        );
        assert_eq!(sg.inputs().unwrap().get(0), sin.tensor_index() as i32);
        let sout = sig.outputs().unwrap().get(0);
        assert_eq!(sg.outputs().unwrap().get(0), sout.tensor_index() as i32);
        let input = tensors.get(sin.tensor_index() as usize);
        assert_eq!(input.shape().unwrap().get(0), 1, "{name}: batch 1 in shape");
        assert_eq!(
            input.shape_signature().unwrap().get(0),
            -1,
            "{name}: batch -1 in shape_signature"
        );

        let meta = model.metadata().unwrap();
        let m = meta
            .iter()
            .find(|m| m.name() == Some("min_runtime_version"))
            .expect("min_runtime_version metadata");
        let data = model
            .buffers()
            .unwrap()
            .get(m.buffer() as usize)
            .data()
            .unwrap();
        assert_eq!(data.len(), 16, "{name}: min_runtime_version is 16 bytes");
        let text = std::str::from_utf8(data.bytes())
            .unwrap()
            .trim_end_matches('\0');
        // The newest operator decides: REDUCE_MAX 1.11.0, MAXIMUM/TANH/LOGISTIC
        // 1.14.0, DEQUANTIZE (float16, version 3) 1.15.0.
        let want = match name.as_str() {
            "push_student f32" => "1.11.0",
            "mlp_res f32" => "1.14.0",
            n if n.ends_with("f16") => "1.15.0",
            _ => "1.5.0",
        };
        assert_eq!(text, want, "{name}");
    }
}

#[test]
fn the_same_graph_gives_the_same_bytes() {
    for m in MODELS {
        let g = stripped_fixture(m);
        let a = tflite::export(&g).unwrap().1;
        let b = tflite::export(&g.clone()).unwrap().1;
        assert!(a == b, "{m}: two exports differ");
        let round_trip = qpipe::ir::serialize::decode(&qpipe::ir::serialize::encode(&g)).unwrap();
        let c = tflite::export(&round_trip).unwrap().1;
        assert!(a == c, "{m}: export after an IR round trip differs");
        let again = stripped_fixture(m);
        assert!(
            a == tflite::export(&again).unwrap().1,
            "{m}: a second import differs"
        );
    }
}

#[test]
fn identical_constants_share_one_buffer() {
    // larger than what the pattern pass merges into one tensor: two tensors, one buffer
    let v: Vec<f32> = (0..80).map(|i| i as f32).collect();
    let mut b = G::new();
    b.placeholder("x", DType::F32, Some(&[-1, 80]));
    b.konst("c1", f32t(&[80], &v));
    b.konst("c2", f32t(&[80], &v));
    b.op("a", "AddV2", &["x", "c1"], &[]);
    b.op("m", "Mul", &["a", "c2"], &[]);
    b.output("m");
    let (_, bytes) = tflite::export(&b.g).unwrap();
    let m = reader::read(&bytes, "shared").unwrap();
    let c1 = m.tensors.iter().find(|t| t.name == "c1").unwrap();
    let c2 = m.tensors.iter().find(|t| t.name == "c2").unwrap();
    assert_ne!(c1.buffer, 0);
    assert_eq!(c1.buffer, c2.buffer);
}

#[test]
fn identical_small_constants_of_elementwise_ops_become_one_tensor() {
    let mut b = G::new();
    b.placeholder("x", DType::F32, Some(&[-1, 4]));
    b.konst("c1", f32t(&[4], &[1.0, 2.0, 3.0, 4.0]));
    b.konst("c2", f32t(&[4], &[1.0, 2.0, 3.0, 4.0]));
    b.op("a", "AddV2", &["x", "c1"], &[]);
    b.op("m", "Mul", &["a", "c2"], &[]);
    b.output("m");
    let (_, bytes) = tflite::export(&b.g).unwrap();
    let m = reader::read(&bytes, "shared").unwrap();
    assert!(m.tensors.iter().any(|t| t.name == "c1"));
    assert!(!m.tensors.iter().any(|t| t.name == "c2"));
}

#[test]
fn reader_lists_what_the_writer_wrote() {
    let (model, bytes) = tflite::export(&small_graph()).unwrap();
    let m = reader::read(&bytes, "small.tflite").unwrap();
    assert_eq!(m.tensors.len(), model.tensors.len());
    let names: Vec<&str> = m.operators.iter().map(|o| o.name).collect();
    assert_eq!(names, ["CONV_2D", "RESHAPE", "FULLY_CONNECTED", "SOFTMAX"]);
    let w = m.tensors.iter().find(|t| t.name == "w").unwrap();
    assert_eq!(
        (w.type_name, w.shape.as_slice()),
        ("FLOAT32", &[3, 3, 3, 2][..])
    );
    assert_eq!(w.data.as_ref().unwrap().len(), 54 * 4);
    let flat = m.tensors.iter().find(|t| t.name == "flat").unwrap();
    assert_eq!(flat.shape_signature.as_deref(), Some(&[-1, 48][..]));
    assert_eq!(m.constant_bytes(), (54 + 3 + 96) * 4 + 8);
    let text = m.render();
    assert!(
        text.contains("CONV_2D v1") && text.contains("min_runtime_version"),
        "{text}"
    );
}

#[test]
fn reader_rejects_damaged_files_without_panicking() {
    let (_, bytes) = tflite::export(&small_graph()).unwrap();
    assert!(reader::read(b"", "empty").is_err());
    assert!(reader::read(&[0u8; 64], "zeros").is_err());
    let e = reader::read(b"not a model at all", "text.tflite").unwrap_err();
    assert!(e.to_string().contains("text.tflite"), "{e}");
    for cut in (0..bytes.len()).step_by(7) {
        let _ = reader::read(&bytes[..cut], "cut");
    }
    let mut rng = Rng::new(11);
    let mut rejected = 0;
    for _ in 0..2000 {
        let mut b = bytes.clone();
        for _ in 0..4 {
            let i = rng.below(b.len());
            b[i] ^= 1 << rng.below(8);
        }
        if reader::read(&b, "flipped").is_err() {
            rejected += 1;
        }
    }
    assert!(rejected > 0, "no damaged file was rejected");
}

#[test]
fn ops_without_a_tflite_equivalent_are_named() {
    let mut b = G::new();
    b.placeholder("x", DType::F32, Some(&[-1, 4]));
    b.op("e", "Softplus", &["x"], &[]);
    b.output("e");
    let err = tflite::export(&b.g).unwrap_err().to_string();
    assert!(err.contains("'e'") && err.contains("Softplus"), "{err}");

    let mut b = G::new();
    b.placeholder("x", DType::F32, Some(&[-1, 4]));
    b.op("weird", "Erfinv", &["x"], &[]);
    b.output("weird");
    let err = tflite::export(&b.g).unwrap_err().to_string();
    assert!(err.contains("'weird'") && err.contains("Erfinv"), "{err}");

    let mut b = G::new();
    b.placeholder("x", DType::F32, Some(&[-1, 6, 6, 2]));
    b.konst("w", f32t(&[1, 1, 2, 2], &[1.0; 4]));
    b.op(
        "conv",
        "Conv2D",
        &["x", "w"],
        &[
            ("strides", ints(&[1, 1, 1, 1])),
            ("padding", s("SAME")),
            ("data_format", s("NCHW")),
        ],
    );
    b.output("conv");
    let err = tflite::export(&b.g).unwrap_err().to_string();
    assert!(err.contains("'conv'") && err.contains("NCHW"), "{err}");

    let mut b = G::new();
    b.placeholder("x", DType::F32, Some(&[-1, 4]));
    b.placeholder("y", DType::F32, Some(&[4, 3]));
    b.op("mm", "MatMul", &["x", "y"], &[]);
    b.output("mm");
    let err = tflite::export(&b.g).unwrap_err().to_string();
    assert!(err.contains("'y'") && err.contains("constant"), "{err}");
}

/// Ops the interpreter runs: a rule where one is easy (the export then names the op as
/// having no TFLite equivalent), else an error that says export cannot handle the op.
#[test]
fn interpreter_ops_without_an_export_say_so() {
    for (op, extra) in [("Softplus", None), ("Sin", None), ("Mod", Some("x"))] {
        let mut b = G::new();
        b.placeholder("x", DType::F32, Some(&[-1, 4]));
        let inputs: Vec<&str> = std::iter::once("x").chain(extra).collect();
        b.op("n", op, &inputs, &[]);
        b.output("n");
        let err = tflite::export(&b.g).unwrap_err().to_string();
        assert_eq!(
            err,
            format!("node 'n' ({op}): has no TFLite equivalent that qpipe can export"),
            "{op}"
        );
    }
    let mut b = G::new();
    b.placeholder("x", DType::F32, Some(&[-1, 4]));
    b.konst("axis", Tensor::scalar(0i32));
    b.op("joined", "Concat", &["axis", "x", "x"], &[]);
    b.output("joined");
    let err = tflite::export(&b.g).unwrap_err().to_string();
    assert_eq!(
        err,
        "node 'joined' (Concat): this op cannot be exported to .tflite (qpipe has no shape rule for it)"
    );
}

#[test]
fn a_100k_node_chain_exports_and_reads_back() {
    let mut b = G::new();
    b.placeholder("x", DType::F32, Some(&[-1, 4]));
    let mut prev = "x".to_string();
    for i in 0..100_000 {
        let name = format!("n{i}");
        let op = if i % 2 == 0 { "Relu" } else { "Tanh" };
        b.op(&name, op, &[&prev], &[]);
        prev = name;
    }
    b.output(&prev);
    let (model, bytes) = tflite::export(&b.g).unwrap();
    assert_eq!(model.operators.len(), 100_000);
    let m = reader::read(&bytes, "chain").unwrap();
    assert_eq!(m.operators.len(), 100_000);
    assert_eq!(m.tensors.len(), 100_001);
}

#[test]
fn export_tflite_stage_writes_the_file_and_reports_metrics() {
    let factory = qpipe::stages::registry::factory("export_tflite").unwrap();
    let table =
        qpipe::stages::ConfigTable::parse("input = \"strip\"\npath = \"m.tflite\"").unwrap();
    let stage = (factory.build)(&table).unwrap();
    assert_eq!(stage.deps().stages, vec![("input".into(), "strip".into())]);
    assert_eq!(
        stage.deps().outputs,
        vec![("path".into(), "m.tflite".into())]
    );
    let bad =
        qpipe::stages::ConfigTable::parse("input = \"strip\"\npath = \"m\"\nfoo = 1").unwrap();
    assert!((factory.build)(&bad).is_err(), "unknown keys are rejected");

    let mut g = small_graph();
    g.inputs.clear();
    g.outputs.clear();
    let model = qpipe::spec::ModelSpec {
        source: qpipe::spec::ModelSource::Graph("unused.pb".into()),
        inputs: vec!["x".into()],
        outputs: vec!["probs".into()],
        input_shapes: BTreeMap::new(),
    };
    let datasets = BTreeMap::new();
    let ctx = qpipe::stages::StageContext {
        id: "export",
        model: &model,
        datasets: &datasets,
        inputs: BTreeMap::from([(
            "input".to_string(),
            Arc::new(qpipe::stages::Artifact::Graph(Arc::new(g))),
        )]),
        memo: &MemMemo::default(),
        progress: &qpipe::progress::Progress::disabled(),
    };
    let out = stage.run(&ctx).unwrap();
    assert_eq!(out.files.len(), 1);
    assert_eq!(out.files[0].path, std::path::Path::new("m.tflite"));
    let bytes = &out.files[0].bytes;
    assert_eq!(out.metrics["bytes"], bytes.len());
    assert_eq!(out.metrics["ops"]["CONV_2D"], 1);
    assert_eq!(out.metrics["ops"]["FULLY_CONNECTED"], 1);
    let m = reader::read(bytes, "m.tflite").unwrap();
    assert_eq!(out.metrics["tensors"], m.tensors.len());
    assert_eq!(m.signatures[0].outputs[0].0, "probs");
}

/// A constant's shape that does not match its buffer (a huge or negative dimension, an
/// element count past the data) is an error naming the tensor, not a trusted size.
#[test]
fn reader_checks_constant_data_against_its_shape() {
    let (_, bytes) = tflite::export(&small_graph()).unwrap();
    let m = reader::read(&bytes, "small.tflite").unwrap();
    let fc = m.tensors.iter().find(|t| t.shape == [2, 48]).unwrap();
    assert_eq!(fc.data.as_ref().unwrap().len(), 48 * 2 * 4);
    let vector = |dims: &[i32]| -> Vec<u8> {
        let mut v = (dims.len() as u32).to_le_bytes().to_vec();
        for d in dims {
            v.extend_from_slice(&d.to_le_bytes());
        }
        v
    };
    let at: Vec<usize> = bytes
        .windows(12)
        .enumerate()
        .filter(|(_, w)| *w == vector(&[2, 48]))
        .map(|(i, _)| i)
        .collect();
    assert!(!at.is_empty());
    for (dims, want) in [
        (
            [3, 48],
            "384 bytes of data, but shape [3, 48] of FLOAT32 needs 576",
        ),
        ([i32::MAX, i32::MAX], "needs 18446744056529682436"),
        ([-1, 48], "a constant has shape [-1, 48]"),
    ] {
        let mut b = bytes.clone();
        for &i in &at {
            b[i..i + 12].copy_from_slice(&vector(&dims));
        }
        let e = reader::read(&b, "bad.tflite").unwrap_err().to_string();
        assert!(
            e.contains("bad.tflite") && e.contains(&format!("tensor '{}'", fc.name)),
            "{e}"
        );
        assert!(e.contains(want), "{e}");
    }
}
