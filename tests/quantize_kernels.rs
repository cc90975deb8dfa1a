//! Int8 kernels against float arithmetic on the dequantized operands: each result
//! must be the float result rounded to the output grid, give or take one step
//! (no LiteRT needed; `quantize_kernels_litert.rs` checks the exact bits).

mod support;

use qpipe::ir::{Attr, DType, Graph, Node, QuantParams, Tensor, TensorRef};
use support::numeric::Rng;

fn pt(s: f32, z: i64) -> QuantParams {
    QuantParams::per_tensor(s, z)
}

fn deq(t: &Tensor, q: &QuantParams) -> Vec<f32> {
    t.to_i64_vec()
        .unwrap()
        .iter()
        .map(|&v| (v - q.zero_point[0]) as f32 * q.scale[0])
        .collect()
}

fn placeholder(name: &str, dt: DType, shape: &[usize], q: Option<QuantParams>) -> Node {
    let mut n = Node::new(name, "Placeholder")
        .with_attr("dtype", Attr::Type(dt))
        .with_attr(
            "shape",
            Attr::Shape(Some(shape.iter().map(|&d| d as i64).collect())),
        );
    if let Some(q) = q {
        n.output_quant.insert(0, q);
    }
    n
}

fn node(
    name: &str,
    op: &str,
    ins: &[&str],
    attrs: Vec<(&str, Attr)>,
    q: Option<QuantParams>,
) -> Node {
    let mut n = Node::new(name, op);
    n.inputs = ins.iter().map(|i| TensorRef::new(*i, 0)).collect();
    for (k, v) in attrs {
        n.attrs.insert(k.into(), v);
    }
    if let Some(q) = q {
        n.output_quant.insert(0, q);
    }
    n
}

fn run(nodes: Vec<Node>, feeds: &[(&str, Tensor)]) -> Tensor {
    let g = Graph {
        nodes,
        inputs: feeds.iter().map(|f| f.0.to_string()).collect(),
        outputs: vec![TensorRef::new("y", 0)],
        ..Graph::default()
    };
    qpipe::kernels::run(&g, feeds, &g.outputs)
        .unwrap()
        .remove(0)
}

fn i8s(r: &mut Rng, n: usize) -> Vec<i8> {
    (0..n).map(|_| (r.next_u64() % 256) as i64 as i8).collect()
}

/// Every int8 output within one output step of the float result (after clamping
/// the float result to the representable range).
fn check(tag: &str, got: &Tensor, q: &QuantParams, want: &[f32]) {
    let g = deq(got, q);
    let (s, z) = (q.scale[0], q.zero_point[0] as f32);
    let (lo, hi) = ((-128.0 - z) * s, (127.0 - z) * s);
    for (i, (a, w)) in g.iter().zip(want).enumerate() {
        let w = w.clamp(lo, hi);
        assert!(
            (a - w).abs() <= s * 1.001 + 1e-6,
            "{tag}: element {i}: int8 gives {a}, float {w} (scale {s})"
        );
    }
}

#[test]
fn int8_convolution_and_fully_connected_track_float() {
    for seed in 0..8u64 {
        let mut r = Rng::new(seed + 40);
        let (n, h, w, c, o) = (2, 6, 5, 3, 4);
        let xq = pt(0.05, (r.next_u64() % 21) as i64 - 10);
        let oq = pt(0.08, (r.next_u64() % 21) as i64 - 10);
        let ws: Vec<f32> = (0..o).map(|k| 0.004 + 0.002 * k as f32).collect();
        let x = Tensor::from_vec(vec![n, h, w, c], &i8s(&mut r, n * h * w * c));
        let wv: Vec<i8> = (0..9 * c * o)
            .map(|_| ((r.next_u64() % 255) as i64 - 127) as i8)
            .collect();
        let bias: Vec<i32> = (0..o)
            .map(|_| (r.next_u64() % 2001) as i32 - 1000)
            .collect();
        let wt = Tensor::from_vec(vec![3, 3, c, o], &wv);
        let mut wn = Node::constant("w", wt.clone());
        wn.output_quant
            .insert(0, QuantParams::per_axis(ws.clone(), vec![0; o], 3));
        let bs: Vec<f32> = ws.iter().map(|s| s * xq.scale[0]).collect();
        let mut bn = Node::constant("b", Tensor::from_vec(vec![o], &bias));
        bn.output_quant
            .insert(0, QuantParams::per_axis(bs.clone(), vec![0; o], 0));
        let y = run(
            vec![
                placeholder("x", DType::I8, &[n, h, w, c], Some(xq.clone())),
                wn,
                bn,
                node(
                    "y",
                    "_FusedConv2D",
                    &["x", "w", "b"],
                    vec![
                        ("strides", Attr::Ints(vec![1, 1, 1, 1])),
                        ("padding", Attr::Str(b"SAME".to_vec())),
                        (
                            "fused_ops",
                            Attr::Strs(vec![b"BiasAdd".to_vec(), b"Relu".to_vec()]),
                        ),
                    ],
                    Some(oq.clone()),
                ),
            ],
            &[("x", x.clone())],
        );
        // The same convolution in float on dequantized values.
        let xf = Tensor::from_vec(vec![n, h, w, c], &deq(&x, &xq));
        let wf: Vec<f32> = wv
            .iter()
            .enumerate()
            .map(|(i, &v)| v as f32 * ws[i % o])
            .collect();
        let bf: Vec<f32> = bias.iter().zip(&bs).map(|(&b, s)| b as f32 * s).collect();
        let yf = run(
            vec![
                placeholder("x", DType::F32, &[n, h, w, c], None),
                Node::constant("w", Tensor::from_vec(vec![3, 3, c, o], &wf)),
                Node::constant("b", Tensor::from_vec(vec![o], &bf)),
                node(
                    "y",
                    "_FusedConv2D",
                    &["x", "w", "b"],
                    vec![
                        ("strides", Attr::Ints(vec![1, 1, 1, 1])),
                        ("padding", Attr::Str(b"SAME".to_vec())),
                        (
                            "fused_ops",
                            Attr::Strs(vec![b"BiasAdd".to_vec(), b"Relu".to_vec()]),
                        ),
                    ],
                    None,
                ),
            ],
            &[("x", xf)],
        );
        check(&format!("conv {seed}"), &y, &oq, &yf.to_f32_vec().unwrap());

        // Fully connected over the flattened input.
        let k = h * w * c;
        let x2 = x.reshaped(vec![n, k]).unwrap();
        let fw: Vec<i8> = (0..k * o)
            .map(|_| ((r.next_u64() % 255) as i64 - 127) as i8)
            .collect();
        let fs = 0.002f32;
        let mut wn = Node::constant("w", Tensor::from_vec(vec![k, o], &fw));
        wn.output_quant.insert(0, pt(fs, 0));
        let mut bn = Node::constant("b", Tensor::from_vec(vec![o], &bias));
        bn.output_quant.insert(0, pt(fs * xq.scale[0], 0));
        let oq2 = pt(0.3, 5);
        let y = run(
            vec![
                placeholder("x", DType::I8, &[n, k], Some(xq.clone())),
                wn,
                bn,
                node(
                    "y",
                    "_FusedMatMul",
                    &["x", "w", "b"],
                    vec![("fused_ops", Attr::Strs(vec![b"BiasAdd".to_vec()]))],
                    Some(oq2.clone()),
                ),
            ],
            &[("x", x2.clone())],
        );
        let xd = deq(&x2, &xq);
        let want: Vec<f32> = (0..n * o)
            .map(|i| {
                let (b, u) = (i / o, i % o);
                (0..k)
                    .map(|kk| xd[b * k + kk] * fw[kk * o + u] as f32 * fs)
                    .sum::<f32>()
                    + bias[u] as f32 * fs * xq.scale[0]
            })
            .collect();
        check(&format!("fc {seed}"), &y, &oq2, &want);
    }
}

#[test]
fn int8_elementwise_reductions_and_activations_track_float() {
    for seed in 0..8u64 {
        let mut r = Rng::new(seed + 90);
        let shape = vec![3, 4, 5, 2];
        let nel: usize = shape.iter().product();
        let xq = pt(0.04, (r.next_u64() % 41) as i64 - 20);
        let x = Tensor::from_vec(shape.clone(), &i8s(&mut r, nel));
        let xd = deq(&x, &xq);
        let unary = |op: &str,
                     oq: QuantParams,
                     attrs: Vec<(&str, Attr)>,
                     extra: Vec<Node>,
                     ins: &[&str]| {
            let mut nodes = vec![placeholder("x", DType::I8, &shape, Some(xq.clone()))];
            nodes.extend(extra);
            nodes.push(node("y", op, ins, attrs, Some(oq)));
            run(nodes, &[("x", x.clone())])
        };
        let sig = pt(1.0 / 256.0, -128);
        let y = unary("Sigmoid", sig.clone(), vec![], vec![], &["x"]);
        let want: Vec<f32> = xd.iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect();
        check("sigmoid", &y, &sig, &want);
        let th = pt(1.0 / 128.0, 0);
        let y = unary("Tanh", th.clone(), vec![], vec![], &["x"]);
        check(
            "tanh",
            &y,
            &th,
            &xd.iter().map(|v| v.tanh()).collect::<Vec<_>>(),
        );
        // Add and Mul with a second int8 tensor of other parameters.
        let q2 = pt(0.07, 3);
        let other = Tensor::from_vec(shape.clone(), &i8s(&mut r, nel));
        let od = deq(&other, &q2);
        let mut c = Node::constant("c", other);
        c.output_quant.insert(0, q2);
        let aq = pt(0.1, -4);
        let y = unary("AddV2", aq.clone(), vec![], vec![c.clone()], &["x", "c"]);
        check(
            "add",
            &y,
            &aq,
            &xd.iter().zip(&od).map(|(a, b)| a + b).collect::<Vec<_>>(),
        );
        let mq = pt(0.05, 0);
        let y = unary("Mul", mq.clone(), vec![], vec![c], &["x", "c"]);
        check(
            "mul",
            &y,
            &mq,
            &xd.iter().zip(&od).map(|(a, b)| a * b).collect::<Vec<_>>(),
        );
        // Mean over axis 1 with other output parameters.
        let axis = Node::constant("axis", Tensor::from_vec(vec![1], &[1i32]));
        let meq = pt(0.01, 7);
        let y = unary(
            "Mean",
            meq.clone(),
            vec![("keep_dims", Attr::Bool(false))],
            vec![axis],
            &["x", "axis"],
        );
        let want: Vec<f32> = (0..3 * 5 * 2)
            .map(|i| {
                let (b, rest) = (i / 10, i % 10);
                (0..4).map(|h| xd[b * 40 + h * 10 + rest]).sum::<f32>() / 4.0
            })
            .collect();
        check("mean", &y, &meq, &want);
        // Average pooling keeps the parameters.
        let y = unary(
            "AvgPool",
            xq.clone(),
            vec![
                ("ksize", Attr::Ints(vec![1, 2, 2, 1])),
                ("strides", Attr::Ints(vec![1, 2, 2, 1])),
                ("padding", Attr::Str(b"VALID".to_vec())),
            ],
            vec![],
            &["x"],
        );
        let want: Vec<f32> = (0..3 * 2 * 2 * 2)
            .map(|i| {
                let (b, oy, ox, ch) = (i / 8, (i / 4) % 2, (i / 2) % 2, i % 2);
                let at = |y: usize, x: usize| xd[((b * 4 + y) * 5 + x) * 2 + ch];
                (at(2 * oy, 2 * ox)
                    + at(2 * oy + 1, 2 * ox)
                    + at(2 * oy, 2 * ox + 1)
                    + at(2 * oy + 1, 2 * ox + 1))
                    / 4.0
            })
            .collect();
        check("avgpool", &y, &xq, &want);
        // Softmax over the last axis.
        let x2 = x.reshaped(vec![12, 10]).unwrap();
        let sq = pt(1.0 / 256.0, -128);
        let y = run(
            vec![
                placeholder("x", DType::I8, &[12, 10], Some(xq.clone())),
                node("y", "Softmax", &["x"], vec![], Some(sq.clone())),
            ],
            &[("x", x2)],
        );
        let want: Vec<f32> = xd
            .chunks(10)
            .flat_map(|row| {
                let m = row.iter().cloned().fold(f32::MIN, f32::max);
                let e: Vec<f32> = row.iter().map(|v| (v - m).exp()).collect();
                let s: f32 = e.iter().sum();
                e.into_iter().map(move |v| v / s)
            })
            .collect();
        check("softmax", &y, &sq, &want);
    }
}
