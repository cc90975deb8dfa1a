//! The shape and data-movement ops (issue 14) against LiteRT: one float graph
//! and one int8 graph hold every op, exported with qpipe's TFLite lowering and
//! run in LiteRT 2.3.0, each output compared with qpipe's interpreter (float
//! within 1e-5; int8 bit for bit with `BUILTIN_REF`, and with the default resolver
//! under `Arithmetic::LiteRt`). Five Python processes in all.

mod support;

use qpipe::formats::tflite;
use qpipe::formats::tflite::reader;
use qpipe::ir::{Attr, DType, Graph, Node, QuantParams, Tensor, TensorRef};
use qpipe::kernels::Arithmetic;
use support::graph_builder::{f32t, i32t, ints, G};
use support::litert_oracle::{LiteRtCase, Resolver};
use support::numeric::{tensor_max_abs_diff, Rng};
use support::tmp_dir;

fn int(v: i64) -> Attr {
    Attr::Int(v)
}

fn keep(k: bool) -> (&'static str, Attr) {
    ("keep_dims", Attr::Bool(k))
}

/// The strided slices of the `fam_shapes` fixture: masks, an ellipsis, a new
/// axis with a shrunk one, a negative stride.
fn slices(b: &mut G, x: &str) -> Vec<String> {
    let mut outs = Vec::new();
    let ss = |b: &mut G, name: &str, be: &[i32], en: &[i32], st: &[i32], m: [i64; 5]| {
        let n = be.len();
        b.konst(&format!("{name}/b"), i32t(&[n], be));
        b.konst(&format!("{name}/e"), i32t(&[n], en));
        b.konst(&format!("{name}/s"), i32t(&[n], st));
        b.op(
            name,
            "StridedSlice",
            &[
                x,
                &format!("{name}/b"),
                &format!("{name}/e"),
                &format!("{name}/s"),
            ],
            &[
                ("begin_mask", int(m[0])),
                ("end_mask", int(m[1])),
                ("ellipsis_mask", int(m[2])),
                ("new_axis_mask", int(m[3])),
                ("shrink_axis_mask", int(m[4])),
                ("Index", Attr::Type(DType::I32)),
            ],
        );
        name.to_string()
    };
    outs.push(ss(
        b,
        "ss_masks",
        &[0, 0, 0],
        &[0, 2, 0],
        &[1, 1, 1],
        [7, 5, 0, 0, 0],
    ));
    outs.push(ss(
        b,
        "ss_ellipsis",
        &[0, 1],
        &[0, 7],
        &[1, 2],
        [0, 0, 1, 0, 0],
    ));
    outs.push(ss(
        b,
        "ss_new_shrink",
        &[0, 0, 3, 0],
        &[0, 0, 4, 0],
        &[1, 1, 1, 1],
        [9, 9, 0, 2, 4],
    ));
    outs.push(ss(
        b,
        "ss_negative",
        &[0, 0, 0],
        &[0, 0, 4],
        &[1, -2, 1],
        [7, 3, 0, 0, 0],
    ));
    outs.push(ss(
        b,
        "ss_shrink_last",
        &[0, -1],
        &[0, 0],
        &[1, 1],
        [1, 1, 0, 0, 2],
    ));
    outs
}

/// x[-1, 6, 8] through every data-movement op; the graph's outputs.
fn float_graph() -> Graph {
    let mut b = G::new();
    b.placeholder("x", DType::F32, Some(&[-1, 6, 8]));
    let mut outs = slices(&mut b, "x");
    // Read only by a squeeze: the slice's new-axis reshape and the squeeze merge.
    outs.retain(|o| o != "ss_new_shrink");
    b.konst("perm", i32t(&[3], &[0, 2, 1]));
    b.op("t", "Transpose", &["x", "perm"], &[]);
    b.konst("mult", i32t(&[3], &[1, 2, 1]));
    b.op("tile", "Tile", &["ss_masks", "mult"], &[]);
    b.konst("sbegin", i32t(&[3], &[0, 1, 2]));
    b.konst("ssize", i32t(&[3], &[-1, 4, 4]));
    b.op("slice", "Slice", &["x", "sbegin", "ssize"], &[]);
    b.op(
        "unstack",
        "Unpack",
        &["slice"],
        &[("axis", int(1)), ("num", int(4))],
    );
    b.op("mul", "Mul", &["unstack", "unstack:3"], &[]);
    b.op("add", "AddV2", &["unstack:1", "unstack:2"], &[]);
    b.op(
        "stack",
        "Pack",
        &["mul", "add"],
        &[("axis", int(1)), ("N", int(2))],
    );
    b.konst("one", Tensor::scalar(1i32));
    b.op("split", "Split", &["one", "t"], &[("num_split", int(2))]);
    b.op("sub", "Sub", &["split", "split:1"], &[]);
    b.konst("sizes", i32t(&[3], &[1, -1, 3]));
    b.op(
        "splitv",
        "SplitV",
        &["x", "sizes", "one"],
        &[("num_split", int(3))],
    );
    // Fill of a runtime shape [batch, 4]: folded where it broadcasts, FILL otherwise.
    b.op(
        "shape",
        "Shape",
        &["x"],
        &[("out_type", Attr::Type(DType::I32))],
    );
    b.konst("b0", i32t(&[1], &[0]));
    b.konst("b1", i32t(&[1], &[1]));
    b.op(
        "batch",
        "StridedSlice",
        &["shape", "b0", "b1", "b1"],
        &[("shrink_axis_mask", int(1)), ("T", Attr::Type(DType::I32))],
    );
    b.konst("four", Tensor::scalar(4i32));
    b.op(
        "dims",
        "Pack",
        &["batch", "four"],
        &[("T", Attr::Type(DType::I32))],
    );
    b.konst("half", Tensor::scalar(0.5f32));
    b.op("fill", "Fill", &["dims", "half"], &[]);
    b.konst("axes12", i32t(&[2], &[1, 2]));
    b.op("sum", "Sum", &["x", "axes12"], &[keep(false)]);
    b.konst("minus1", Tensor::scalar(-1i32));
    b.op("expand", "ExpandDims", &["sum", "minus1"], &[]);
    b.op("expand_m", "ExpandDims", &["sum", "minus1"], &[]);
    b.op("scaled", "Mul", &["fill", "expand_m"], &[]);
    b.konst("quarter", Tensor::scalar(0.25f32));
    b.op("fill_out", "Fill", &["dims", "quarter"], &[]);
    b.op(
        "squeeze",
        "Squeeze",
        &["expand"],
        &[("squeeze_dims", ints(&[-1]))],
    );
    b.op("relu", "Relu", &["squeeze"], &[]);
    b.op(
        "squeeze2",
        "Squeeze",
        &["ss_new_shrink"],
        &[("squeeze_dims", ints(&[1]))],
    );
    b.konst("idx", i32t(&[3], &[5, 0, 2]));
    b.op(
        "gather",
        "GatherV2",
        &["x", "idx", "one"],
        &[("batch_dims", int(0))],
    );
    b.op("mean", "Mean", &["t", "one"], &[keep(true)]);
    b.konst("two", Tensor::scalar(2i32));
    b.op("max", "Max", &["x", "two"], &[keep(false)]);
    b.op(
        "argmax",
        "ArgMax",
        &["x", "two"],
        &[("output_type", Attr::Type(DType::I64))],
    );
    b.op(
        "argmin",
        "ArgMin",
        &["x", "one"],
        &[("output_type", Attr::Type(DType::I32))],
    );
    b.op("zeros", "ZerosLike", &["mean"], &[]);
    b.konst("perm_seq", i32t(&[3], &[1, 0, 2]));
    b.op("time_major", "Transpose", &["x", "perm_seq"], &[]);
    b.op(
        "steps",
        "Unpack",
        &["time_major"],
        &[("axis", int(0)), ("num", int(6))],
    );
    outs.extend(
        [
            "t", "tile", "stack", "sub", "splitv", "splitv:2", "scaled", "fill_out", "relu",
            "squeeze2", "gather", "mean", "max", "argmax", "argmin", "zeros", "steps", "steps:5",
        ]
        .map(String::from),
    );
    for o in &outs {
        b.output(o);
    }
    b.g
}

#[test]
fn data_movement_ops_run_in_litert_like_the_interpreter() {
    let g = float_graph();
    let mut rng = Rng::new(14);
    let x = f32t(&[3, 6, 8], &rng.vec(144));
    let dir = tmp_dir("movement_float");
    let (_, bytes) = tflite::export(&g).unwrap_or_else(|e| panic!("export: {e}"));
    let case = LiteRtCase::write(&dir, &bytes, &[("x".into(), x.clone())]);
    let want = qpipe::kernels::run(&g, &[("x", x)], &g.outputs).unwrap();
    for resolver in Resolver::ALL {
        let got = case.run(resolver).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got.len(), want.len());
        for ((r, a), b) in g.outputs.iter().zip(&got).zip(&want) {
            assert_eq!(a.dtype(), b.dtype(), "{r} {resolver:?}");
            let d = tensor_max_abs_diff(a, b);
            assert!(d <= 1e-5, "{r} {resolver:?}: max abs diff {d}");
        }
    }
    let m = reader::read(&bytes, "movement").unwrap();
    let count = |name: &str| m.operators.iter().filter(|o| o.name == name).count();
    // The ExpandDims → Squeeze pair is an identity, the new-axis reshape of a slice
    // and the squeeze after it are one RESHAPE, the transpose read only by the
    // unpack is folded into it, the broadcast fill is a constant.
    assert_eq!(count("EXPAND_DIMS"), 1, "only expand_m");
    assert_eq!(count("SQUEEZE"), 0);
    assert_eq!(count("TRANSPOSE"), 1, "only x → t remains");
    assert_eq!(count("FILL"), 1, "only the fill that is an output");
    assert_eq!(count("STRIDED_SLICE"), 6, "5 slices and the batch size");
    for name in [
        "TILE", "SLICE", "SPLIT", "SPLIT_V", "PACK", "UNPACK", "GATHER",
    ] {
        assert!(count(name) >= 1, "{name} missing");
    }
    let unpack = m
        .operators
        .iter()
        .find(|o| o.name == "UNPACK" && o.outputs.len() == 6);
    assert!(unpack.is_some(), "the time-major unpack reads x directly");
}

struct Q {
    g: Graph,
}

impl Q {
    fn node(
        &mut self,
        name: &str,
        op: &str,
        ins: &[&str],
        attrs: &[(&str, Attr)],
        q: Option<&QuantParams>,
        outs: u32,
    ) {
        let mut n = Node::new(name, op);
        n.inputs = ins
            .iter()
            .map(|i| TensorRef::parse(i).expect("tensor"))
            .collect();
        for (k, v) in attrs {
            n.attrs.insert(k.to_string(), v.clone());
        }
        n.attrs.insert("T".into(), Attr::Type(DType::I8));
        if let Some(q) = q {
            for k in 0..outs {
                n.output_quant.insert(k, q.clone());
            }
        }
        self.g.nodes.push(n);
    }
    fn konst(&mut self, name: &str, t: Tensor) {
        self.g.nodes.push(Node::constant(name, t));
    }
    fn out(&mut self, r: &str) {
        self.g.outputs.push(TensorRef::parse(r).expect("tensor"));
    }
}

/// The int8 graph: data movement keeps the input's parameters, MEAN and SUM
/// requantize to their own, ARG_MAX gives an index, ZEROS_LIKE the zero point.
fn int8_graph(tile_only: bool) -> Graph {
    let q = QuantParams::per_tensor(0.043, -7);
    let mut b = Q {
        g: Graph::default(),
    };
    let x = Node::new("x", "Placeholder")
        .with_attr("dtype", Attr::Type(DType::I8))
        .with_attr("shape", Attr::Shape(Some(vec![-1, 6, 8])));
    let mut x = x;
    x.output_quant.insert(0, q.clone());
    b.g.nodes.push(x);
    b.g.inputs.push("x".into());
    b.konst("mult", i32t(&[3], &[1, 2, 1]));
    if tile_only {
        b.node("tile", "Tile", &["x", "mult"], &[], Some(&q), 1);
        b.out("tile");
        return b.g;
    }
    let mut fb = G { g: b.g };
    let names = slices(&mut fb, "x");
    let mut b = Q { g: fb.g };
    for n in &names {
        let node = b.g.nodes.iter_mut().find(|x| &x.name == n).unwrap();
        node.attrs.insert("T".into(), Attr::Type(DType::I8));
        node.output_quant.insert(0, q.clone());
        b.out(n);
    }
    b.konst("perm", i32t(&[3], &[0, 2, 1]));
    b.node("t", "Transpose", &["x", "perm"], &[], Some(&q), 1);
    b.konst("sbegin", i32t(&[3], &[0, 1, 2]));
    b.konst("ssize", i32t(&[3], &[-1, 4, 4]));
    b.node(
        "slice",
        "Slice",
        &["x", "sbegin", "ssize"],
        &[],
        Some(&q),
        1,
    );
    b.node(
        "unstack",
        "Unpack",
        &["slice"],
        &[("axis", int(1)), ("num", int(4))],
        Some(&q),
        4,
    );
    b.node(
        "stack",
        "Pack",
        &["unstack:3", "unstack"],
        &[("axis", int(1)), ("N", int(2))],
        Some(&q),
        1,
    );
    b.konst("one", Tensor::scalar(1i32));
    b.node(
        "split",
        "Split",
        &["one", "t"],
        &[("num_split", int(2))],
        Some(&q),
        2,
    );
    b.konst("sizes", i32t(&[3], &[1, -1, 3]));
    b.node(
        "splitv",
        "SplitV",
        &["x", "sizes", "one"],
        &[("num_split", int(3))],
        Some(&q),
        3,
    );
    b.konst("idx", i32t(&[3], &[5, 0, 2]));
    b.node(
        "gather",
        "GatherV2",
        &["x", "idx", "one"],
        &[("batch_dims", int(0))],
        Some(&q),
        1,
    );
    b.konst("axes12", i32t(&[2], &[1, 2]));
    b.node(
        "mean",
        "Mean",
        &["x", "axes12"],
        &[keep(true)],
        Some(&QuantParams::per_tensor(0.011, 5)),
        1,
    );
    b.node(
        "sum",
        "Sum",
        &["x", "one"],
        &[keep(false)],
        Some(&QuantParams::per_tensor(0.17, -3)),
        1,
    );
    b.konst("two", Tensor::scalar(2i32));
    b.node("max", "Max", &["t", "two"], &[keep(false)], Some(&q), 1);
    b.node(
        "argmax",
        "ArgMax",
        &["x", "two"],
        &[("output_type", Attr::Type(DType::I64))],
        None,
        1,
    );
    b.node("zeros", "ZerosLike", &["x"], &[], Some(&q), 1);
    for o in [
        "t", "slice", "stack", "split:1", "splitv", "splitv:1", "gather", "mean", "sum", "max",
        "argmax", "zeros",
    ] {
        b.out(o);
    }
    b.g
}

#[test]
fn int8_data_movement_matches_litert_bit_for_bit() {
    let mut rng = Rng::new(41);
    let v: Vec<i8> = (0..3 * 48)
        .map(|_| (rng.next_u64() % 256) as u8 as i8)
        .collect();
    let x = Tensor::from_vec(vec![3, 6, 8], &v);
    // LiteRT's reference resolver registers no int8 TILE (version 3, as the
    // converter writes it too): TILE runs with the default resolver.
    for (tile_only, resolver) in [
        (false, Resolver::Reference),
        (false, Resolver::Default),
        (true, Resolver::Default),
    ] {
        let g = int8_graph(tile_only);
        let dir = tmp_dir(&format!("movement_int8_{tile_only}"));
        let (_, bytes) = tflite::export(&g).unwrap_or_else(|e| panic!("export: {e}"));
        let case = LiteRtCase::write(&dir, &bytes, &[("x".into(), x.clone())]);
        let arith = match resolver {
            Resolver::Reference => Arithmetic::Reference,
            Resolver::Default => Arithmetic::LiteRt,
        };
        let ours = qpipe::kernels::run_with(&g, &[("x", x.clone())], &g.outputs, arith).unwrap();
        let theirs = case.run(resolver).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ours.len(), theirs.len());
        for ((r, a), b) in g.outputs.iter().zip(&ours).zip(&theirs) {
            assert_eq!(a.shape(), b.shape(), "{r}");
            assert_eq!(a.dtype(), b.dtype(), "{r}");
            assert_eq!(
                a.to_i64_vec().unwrap(),
                b.to_i64_vec().unwrap(),
                "{r} {resolver:?}"
            );
        }
        let m = reader::read(&bytes, "int8").unwrap();
        for op in &m.operators {
            let want = match op.name {
                "TILE" => 3,
                "RESHAPE" => 1,
                _ => 2,
            };
            assert_eq!(op.version, want, "{} version", op.name);
        }
    }
}
