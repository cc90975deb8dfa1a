//! Interpreter kernels on hand-built graphs against hand-computed values (and, for
//! convolutions, against a naive reference on random shapes).

mod support;

use qpipe::ir::{Attr, DType, QuantParams, Tensor};
use support::graph_builder::{f32t, i32t, ints, r, run1, s, G};
use support::numeric::{assert_close, Rng};

fn unary(op: &str, x: &[f32]) -> Vec<f32> {
    let mut b = G::new();
    b.placeholder("x", DType::F32, None);
    b.op("y", op, &["x"], &[]);
    run1(&b.g, &[("x", f32t(&[x.len()], x))], "y")
        .to_f32_vec()
        .unwrap()
}

fn binary_t(op: &str, a: Tensor, bt: Tensor) -> Tensor {
    let mut b = G::new();
    b.konst("a", a);
    b.konst("b", bt);
    b.op("y", op, &["a", "b"], &[]);
    run1(&b.g, &[], "y")
}

#[test]
fn unary_math() {
    assert_eq!(unary("Relu", &[-1.0, 0.0, 2.5]), vec![0.0, 0.0, 2.5]);
    assert_eq!(unary("Relu6", &[-1.0, 3.0, 7.0]), vec![0.0, 3.0, 6.0]);
    assert_eq!(unary("Sigmoid", &[0.0]), vec![0.5]);
    let s = unary("Sigmoid", &[2.0])[0];
    assert!((s - 0.880_797_1).abs() < 1e-7, "{s}");
    let t = unary("Tanh", &[0.5, -20.0]);
    assert!((t[0] - 0.462_117_16).abs() < 1e-7 && t[1] == -1.0, "{t:?}");
    assert_eq!(unary("Rsqrt", &[4.0, 0.25]), vec![0.5, 2.0]);
    assert_eq!(unary("Sqrt", &[9.0]), vec![3.0]);
    assert_eq!(unary("Square", &[-3.0]), vec![9.0]);
    assert_eq!(unary("Floor", &[-1.5, 1.5]), vec![-2.0, 1.0]);
    assert_eq!(
        unary("Round", &[0.5, 1.5, 2.5, -0.5]),
        vec![0.0, 2.0, 2.0, -0.0]
    );
    assert_eq!(unary("Neg", &[1.0]), vec![-1.0]);
    assert_eq!(unary("Abs", &[-2.0]), vec![2.0]);
    assert!((unary("Exp", &[1.0])[0] - std::f32::consts::E).abs() < 1e-6);
}

#[test]
fn binary_broadcasting() {
    let a = f32t(&[2, 1], &[1.0, 2.0]);
    let b = f32t(&[3], &[10.0, 20.0, 30.0]);
    let y = binary_t("AddV2", a.clone(), b.clone());
    assert_eq!(y.shape(), &[2, 3]);
    assert_eq!(y.to_f32_vec().unwrap(), vec![11., 21., 31., 12., 22., 32.]);
    let y = binary_t("Sub", b.clone(), a.clone());
    assert_eq!(y.to_f32_vec().unwrap(), vec![9., 19., 29., 8., 18., 28.]);
    let y = binary_t(
        "Mul",
        f32t(&[2, 1, 3], &[1., 2., 3., 4., 5., 6.]),
        f32t(&[1, 2, 1], &[10., 100.]),
    );
    assert_eq!(y.shape(), &[2, 2, 3]);
    assert_eq!(
        y.to_f32_vec().unwrap(),
        vec![10., 20., 30., 100., 200., 300., 40., 50., 60., 400., 500., 600.]
    );
    let y = binary_t("RealDiv", f32t(&[2], &[1., 3.]), f32t(&[], &[2.]));
    assert_eq!(y.to_f32_vec().unwrap(), vec![0.5, 1.5]);
    let y = binary_t("Maximum", f32t(&[3], &[1., 5., -2.]), f32t(&[], &[0.]));
    assert_eq!(y.to_f32_vec().unwrap(), vec![1., 5., 0.]);
    let y = binary_t("Minimum", f32t(&[3], &[1., 5., -2.]), f32t(&[], &[0.9]));
    assert_eq!(y.to_f32_vec().unwrap(), vec![0.9, 0.9, -2.]);
    let y = binary_t("SquaredDifference", f32t(&[1], &[1.]), f32t(&[1], &[4.]));
    assert_eq!(y.to_f32_vec().unwrap(), vec![9.]);
    let y = binary_t(
        "GreaterEqual",
        f32t(&[3], &[0., 0.5, 1.]),
        f32t(&[], &[0.5]),
    );
    assert_eq!(y.dtype(), DType::Bool);
    assert_eq!(y.values::<bool>().unwrap(), vec![false, true, true]);
    let y = binary_t("FloorDiv", i32t(&[2], &[-7, 7]), i32t(&[], &[2]));
    assert_eq!(y.values::<i32>().unwrap(), vec![-4, 3]);
    let y = binary_t("FloorMod", i32t(&[2], &[-7, 7]), i32t(&[], &[3]));
    assert_eq!(y.values::<i32>().unwrap(), vec![2, 1]);
    let y = binary_t("Div", i32t(&[2], &[-7, 7]), i32t(&[], &[2]));
    assert_eq!(y.values::<i32>().unwrap(), vec![-3, 3]);

    let mut b = G::new();
    b.konst("a", f32t(&[2], &[1., 2.]));
    b.konst("b", f32t(&[3], &[1., 2., 3.]));
    b.op("y", "Add", &["a", "b"], &[]);
    let e = qpipe::kernels::run(&b.g, &[], &[r("y")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("node 'y' (Add)") && e.contains("[2] and [3]"),
        "{e}"
    );
    let mut b = G::new();
    b.konst("a", i32t(&[1], &[1]));
    b.konst("z", i32t(&[1], &[0]));
    b.op("y", "FloorDiv", &["a", "z"], &[]);
    let e = qpipe::kernels::run(&b.g, &[], &[r("y")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("division by zero"), "{e}");
}

fn conv_graph(
    op: &str,
    x: Tensor,
    w: Tensor,
    strides: [i64; 2],
    dil: [i64; 2],
    pad: &str,
) -> Tensor {
    let mut b = G::new();
    b.konst("x", x);
    b.konst("w", w);
    b.op(
        "y",
        op,
        &["x", "w"],
        &[
            ("strides", ints(&[1, strides[0], strides[1], 1])),
            ("dilations", ints(&[1, dil[0], dil[1], 1])),
            ("padding", s(pad)),
            ("data_format", s("NHWC")),
        ],
    );
    run1(&b.g, &[], "y")
}

#[test]
fn conv2d_hand_values() {
    let x = f32t(&[1, 3, 3, 1], &[1., 2., 3., 4., 5., 6., 7., 8., 9.]);
    let w = f32t(&[2, 2, 1, 1], &[1., 0., 0., 1.]);
    let y = conv_graph("Conv2D", x.clone(), w.clone(), [1, 1], [1, 1], "VALID");
    assert_eq!(y.shape(), &[1, 2, 2, 1]);
    assert_eq!(y.to_f32_vec().unwrap(), vec![6., 8., 12., 14.]);
    let y = conv_graph("Conv2D", x.clone(), w.clone(), [1, 1], [1, 1], "SAME");
    assert_eq!(
        y.to_f32_vec().unwrap(),
        vec![6., 8., 3., 12., 14., 6., 7., 8., 9.]
    );
    let y = conv_graph("Conv2D", x.clone(), w.clone(), [2, 2], [1, 1], "SAME");
    assert_eq!(y.to_f32_vec().unwrap(), vec![6., 3., 7., 9.]);
    let y = conv_graph("Conv2D", x.clone(), w.clone(), [1, 1], [2, 2], "VALID");
    assert_eq!(y.to_f32_vec().unwrap(), vec![10.]);
    // Two output channels: identity and sum of the window.
    let w2 = f32t(&[1, 1, 2, 2], &[1., 1., 0., 1.]);
    let x2 = f32t(&[1, 1, 2, 2], &[1., 2., 3., 4.]);
    let y = conv_graph("Conv2D", x2, w2, [1, 1], [1, 1], "VALID");
    assert_eq!(y.to_f32_vec().unwrap(), vec![1., 3., 3., 7.]);
    // Depthwise, multiplier 2: channel c produces c*2 and c*2+1.
    let xd = f32t(&[1, 1, 1, 2], &[2., 3.]);
    let wd = f32t(&[1, 1, 2, 2], &[1., 10., 100., 1000.]);
    let y = conv_graph("DepthwiseConv2dNative", xd, wd, [1, 1], [1, 1], "SAME");
    assert_eq!(y.shape(), &[1, 1, 1, 4]);
    assert_eq!(y.to_f32_vec().unwrap(), vec![2., 20., 300., 3000.]);
}

/// Naive NHWC convolution: the definition, one output element at a time.
#[allow(clippy::too_many_arguments)]
fn naive_conv(
    x: &[f32],
    [n, h, w, c]: [usize; 4],
    f: &[f32],
    [kh, kw, m]: [usize; 3],
    depthwise: bool,
    out_c: usize,
    s: [usize; 2],
    d: [usize; 2],
    same: bool,
) -> (Vec<f32>, [usize; 4]) {
    let eff = [(kh - 1) * d[0] + 1, (kw - 1) * d[1] + 1];
    let (oh, ow, pt, pl) = if same {
        let oh = h.div_ceil(s[0]);
        let ow = w.div_ceil(s[1]);
        let ph = ((oh - 1) * s[0] + eff[0]).saturating_sub(h);
        let pw = ((ow - 1) * s[1] + eff[1]).saturating_sub(w);
        (oh, ow, ph / 2, pw / 2)
    } else {
        ((h - eff[0]) / s[0] + 1, (w - eff[1]) / s[1] + 1, 0, 0)
    };
    let mut out = vec![0f32; n * oh * ow * out_c];
    for b in 0..n {
        for y in 0..oh {
            for xx in 0..ow {
                for o in 0..out_c {
                    let mut acc = 0f32;
                    for i in 0..kh {
                        for j in 0..kw {
                            let iy = (y * s[0] + i * d[0]) as isize - pt as isize;
                            let ix = (xx * s[1] + j * d[1]) as isize - pl as isize;
                            if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                continue;
                            }
                            let base = ((b * h + iy as usize) * w + ix as usize) * c;
                            if depthwise {
                                let (ci, mi) = (o / m, o % m);
                                acc += x[base + ci] * f[((i * kw + j) * c + ci) * m + mi];
                            } else {
                                for ci in 0..c {
                                    acc += x[base + ci] * f[((i * kw + j) * c + ci) * out_c + o];
                                }
                            }
                        }
                    }
                    out[((b * oh + y) * ow + xx) * out_c + o] = acc;
                }
            }
        }
    }
    (out, [n, oh, ow, out_c])
}

#[test]
fn conv_random_against_naive() {
    let mut rng = Rng::new(7);
    for case in 0..40 {
        let depthwise = case % 2 == 1;
        let (n, h, w, c) = (
            1 + rng.below(2),
            3 + rng.below(6),
            3 + rng.below(6),
            1 + rng.below(4),
        );
        let (kh, kw) = (1 + rng.below(3), 1 + rng.below(3));
        let m = if depthwise {
            1 + rng.below(2)
        } else {
            1 + rng.below(4)
        };
        let s = [1 + rng.below(2), 1 + rng.below(2)];
        let d = if rng.below(3) == 0 {
            [2, 1 + rng.below(2)]
        } else {
            [1, 1]
        };
        let same = rng.below(2) == 0;
        if !same && ((kh - 1) * d[0] + 1 > h || (kw - 1) * d[1] + 1 > w) {
            continue;
        }
        let x = rng.vec(n * h * w * c);
        let f = rng.vec(kh * kw * c * m);
        let out_c = if depthwise { c * m } else { m };
        let (want, shape) = naive_conv(
            &x,
            [n, h, w, c],
            &f,
            [kh, kw, m],
            depthwise,
            out_c,
            s,
            d,
            same,
        );
        let got = conv_graph(
            if depthwise {
                "DepthwiseConv2dNative"
            } else {
                "Conv2D"
            },
            f32t(&[n, h, w, c], &x),
            f32t(&[kh, kw, c, m], &f),
            [s[0] as i64, s[1] as i64],
            [d[0] as i64, d[1] as i64],
            if same { "SAME" } else { "VALID" },
        );
        assert_eq!(got.shape(), &shape, "case {case}");
        assert_close(&got, &want, 1e-5);
    }
}

#[test]
fn matmul_and_bias() {
    let a = f32t(&[2, 2], &[1., 2., 3., 4.]);
    let bm = f32t(&[2, 2], &[5., 6., 7., 8.]);
    for (ta, tb, want) in [
        (false, false, [19., 22., 43., 50.]),
        (true, false, [26., 30., 38., 44.]),
        (false, true, [17., 23., 39., 53.]),
        (true, true, [23., 31., 34., 46.]),
    ] {
        let mut b = G::new();
        b.konst("a", a.clone());
        b.konst("b", bm.clone());
        b.op(
            "y",
            "MatMul",
            &["a", "b"],
            &[
                ("transpose_a", Attr::Bool(ta)),
                ("transpose_b", Attr::Bool(tb)),
            ],
        );
        assert_eq!(
            run1(&b.g, &[], "y").to_f32_vec().unwrap(),
            want.to_vec(),
            "{ta} {tb}"
        );
    }
    let mut b = G::new();
    b.konst("x", f32t(&[1, 1, 2, 3], &[0., 0., 0., 1., 1., 1.]));
    b.konst("bias", f32t(&[3], &[1., 2., 3.]));
    b.op("y", "BiasAdd", &["x", "bias"], &[]);
    assert_eq!(
        run1(&b.g, &[], "y").to_f32_vec().unwrap(),
        vec![1., 2., 3., 2., 3., 4.]
    );
    let mut b = G::new();
    b.konst("a", f32t(&[2, 3], &[0.; 6]));
    b.konst("b", f32t(&[2, 3], &[0.; 6]));
    b.op("y", "MatMul", &["a", "b"], &[]);
    let e = qpipe::kernels::run(&b.g, &[], &[r("y")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("node 'y' (MatMul): MatMul inner dimensions differ"),
        "{e}"
    );
}

#[test]
fn pooling_softmax_reductions() {
    let x9 = f32t(&[1, 3, 3, 1], &[1., 2., 3., 4., 5., 6., 7., 8., 9.]);
    let pool = |op: &str, pad: &str, x: Tensor| {
        let mut b = G::new();
        b.konst("x", x);
        b.op(
            "y",
            op,
            &["x"],
            &[
                ("ksize", ints(&[1, 2, 2, 1])),
                ("strides", ints(&[1, 2, 2, 1])),
                ("padding", s(pad)),
            ],
        );
        run1(&b.g, &[], "y")
    };
    assert_eq!(
        pool("AvgPool", "SAME", x9.clone()).to_f32_vec().unwrap(),
        vec![3., 4.5, 7.5, 9.]
    );
    assert_eq!(
        pool("MaxPool", "SAME", x9.clone()).to_f32_vec().unwrap(),
        vec![5., 6., 8., 9.]
    );
    assert_eq!(
        pool("AvgPool", "VALID", x9.clone()).to_f32_vec().unwrap(),
        vec![3.]
    );
    let neg = f32t(&[1, 1, 3, 1], &[-5., -4., -3.]);
    assert_eq!(
        pool("MaxPool", "SAME", neg).to_f32_vec().unwrap(),
        vec![-4., -3.]
    );

    let mut b = G::new();
    b.konst("x", f32t(&[2, 3], &[1., 2., 3., 1000., 1000., 1000.]));
    b.op("y", "Softmax", &["x"], &[]);
    assert_close(
        &run1(&b.g, &[], "y"),
        &[
            0.090_030_57,
            0.244_728_47,
            0.665_240_96,
            1. / 3.,
            1. / 3.,
            1. / 3.,
        ],
        1e-7,
    );

    let red = |op: &str, axes: Tensor, keep: bool| {
        let mut b = G::new();
        b.konst("x", f32t(&[2, 3], &[1., 2., 3., 4., 5., 6.]));
        b.konst("a", axes);
        b.op("y", op, &["x", "a"], &[("keep_dims", Attr::Bool(keep))]);
        run1(&b.g, &[], "y")
    };
    let y = red("Sum", i32t(&[], &[0]), false);
    assert_eq!(
        (y.shape().to_vec(), y.to_f32_vec().unwrap()),
        (vec![3], vec![5., 7., 9.])
    );
    let y = red("Mean", i32t(&[1], &[1]), true);
    assert_eq!(
        (y.shape().to_vec(), y.to_f32_vec().unwrap()),
        (vec![2, 1], vec![2., 5.])
    );
    let y = red("Max", i32t(&[], &[-1]), false);
    assert_eq!(y.to_f32_vec().unwrap(), vec![3., 6.]);
    let y = red("Sum", i32t(&[2], &[0, 1]), false);
    assert_eq!(
        (y.shape().to_vec(), y.to_f32_vec().unwrap()),
        (vec![], vec![21.])
    );
    let y = red("Min", Tensor::from_vec(vec![1], &[0i64]), false);
    assert_eq!(y.to_f32_vec().unwrap(), vec![1., 2., 3.]);
    // Non-contiguous axes and integers take the general path.
    let mut b = G::new();
    b.konst("x", iota(&[2, 2, 2]));
    b.konst("a", i32t(&[2], &[0, 2]));
    b.op("y", "Sum", &["x", "a"], &[("T", Attr::Type(DType::I32))]);
    let y = run1(&b.g, &[], "y");
    assert_eq!(
        (y.shape().to_vec(), y.values::<i32>().unwrap()),
        (vec![2], vec![10, 18])
    );
    let mut b = G::new();
    b.konst("x", f32t(&[2, 2, 2], &[1., 2., 3., 4., 5., 6., 7., 8.]));
    b.konst("a", i32t(&[2], &[2, 0]));
    b.op("y", "Max", &["x", "a"], &[("keep_dims", Attr::Bool(true))]);
    let y = run1(&b.g, &[], "y");
    assert_eq!(
        (y.shape().to_vec(), y.to_f32_vec().unwrap()),
        (vec![1, 2, 1], vec![6., 8.])
    );
    let y = red("ArgMax", i32t(&[], &[1]), false);
    assert_eq!(y.values::<i64>().unwrap(), vec![2, 2]);
    let e = qpipe::kernels::run(
        &{
            let mut b = G::new();
            b.konst("x", f32t(&[2], &[1., 2.]));
            b.konst("a", i32t(&[], &[3]));
            b.op("bad_axis", "Sum", &["x", "a"], &[]);
            b.g
        },
        &[],
        &[r("bad_axis")],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("node 'bad_axis' (Sum): axis 3 is out of range for rank 1"),
        "{e}"
    );
}

#[test]
fn batch_norm_inference() {
    let mut b = G::new();
    b.konst("x", f32t(&[1, 1, 2, 2], &[1., 2., 3., 4.]));
    b.konst("scale", f32t(&[2], &[2., 1.]));
    b.konst("offset", f32t(&[2], &[0.5, 0.]));
    b.konst("mean", f32t(&[2], &[1., 2.]));
    b.konst("var", f32t(&[2], &[4., 0.25]));
    b.op(
        "bn",
        "FusedBatchNormV3",
        &["x", "scale", "offset", "mean", "var"],
        &[
            ("epsilon", Attr::Float(0.0)),
            ("is_training", Attr::Bool(false)),
        ],
    );
    // channel 0: (x-1)/2*2+0.5; channel 1: (x-2)/0.5
    assert_eq!(
        run1(&b.g, &[], "bn").to_f32_vec().unwrap(),
        vec![0.5, 0., 2.5, 4.]
    );
    b.g.nodes
        .last_mut()
        .unwrap()
        .attrs
        .insert("is_training".into(), Attr::Bool(true));
    let e = qpipe::kernels::run(&b.g, &[], &[r("bn")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("node 'bn' (FusedBatchNormV3)") && e.contains("training mode"),
        "{e}"
    );
}

fn iota(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_vec(shape.to_vec(), &(0..n as i32).collect::<Vec<_>>())
}

fn strided(x: Tensor, b: &[i32], e: &[i32], st: &[i32], masks: [i64; 5]) -> Tensor {
    let mut g = G::new();
    g.konst("x", x);
    g.konst("b", i32t(&[b.len()], b));
    g.konst("e", i32t(&[e.len()], e));
    g.konst("s", i32t(&[st.len()], st));
    g.op(
        "y",
        "StridedSlice",
        &["x", "b", "e", "s"],
        &[
            ("begin_mask", Attr::Int(masks[0])),
            ("end_mask", Attr::Int(masks[1])),
            ("ellipsis_mask", Attr::Int(masks[2])),
            ("new_axis_mask", Attr::Int(masks[3])),
            ("shrink_axis_mask", Attr::Int(masks[4])),
            ("T", Attr::Type(DType::I32)),
        ],
    );
    run1(&g.g, &[], "y")
}

#[test]
fn strided_slice_masks() {
    let x = iota(&[2, 3, 4]);
    // x[1, :, ::-2]
    let y = strided(
        x.clone(),
        &[1, 0, 0],
        &[2, 0, 0],
        &[1, 1, -2],
        [0b110, 0b110, 0, 0, 0b001],
    );
    assert_eq!(y.shape(), &[3, 2]);
    assert_eq!(y.values::<i32>().unwrap(), vec![15, 13, 19, 17, 23, 21]);
    // x[..., 1]
    let y = strided(x.clone(), &[0, 1], &[0, 2], &[1, 1], [0, 0, 0b01, 0, 0b10]);
    assert_eq!(y.shape(), &[2, 3]);
    assert_eq!(y.values::<i32>().unwrap(), vec![1, 5, 9, 13, 17, 21]);
    // x[:, newaxis, 1:3]
    let y = strided(
        x.clone(),
        &[0, 0, 1],
        &[0, 0, 3],
        &[1, 1, 1],
        [0b001, 0b001, 0, 0b010, 0],
    );
    assert_eq!(y.shape(), &[2, 1, 2, 4]);
    assert_eq!(y.values::<i32>().unwrap()[..4], [4, 5, 6, 7]);
    // x[-1]
    let y = strided(x.clone(), &[-1], &[0], &[1], [0, 0, 0, 0, 1]);
    assert_eq!(y.shape(), &[3, 4]);
    assert_eq!(y.values::<i32>().unwrap()[0], 12);
    // x[:, 1:100] clamps
    let y = strided(x.clone(), &[0, 1], &[0, 100], &[1, 1], [1, 1, 0, 0, 0]);
    assert_eq!(y.shape(), &[2, 2, 4]);
    // shape[0] of a shape vector, the reshape-target pattern
    let y = strided(
        i32t(&[4], &[5, 2, 2, 32]),
        &[0],
        &[1],
        &[1],
        [0, 0, 0, 0, 1],
    );
    assert_eq!(
        (y.shape().to_vec(), y.values::<i32>().unwrap()),
        (vec![], vec![5])
    );
    // x[::-1] on a vector
    let y = strided(i32t(&[3], &[1, 2, 3]), &[0], &[0], &[-1], [1, 1, 0, 0, 0]);
    assert_eq!(y.values::<i32>().unwrap(), vec![3, 2, 1]);
    let mut g = G::new();
    g.konst("x", iota(&[2]));
    g.konst("b", i32t(&[1], &[5]));
    g.konst("e", i32t(&[1], &[6]));
    g.konst("s", i32t(&[1], &[1]));
    g.op(
        "y",
        "StridedSlice",
        &["x", "b", "e", "s"],
        &[("shrink_axis_mask", Attr::Int(1))],
    );
    let e = qpipe::kernels::run(&g.g, &[], &[r("y")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("out of bounds"), "{e}");
}

#[test]
fn array_ops() {
    let mut b = G::new();
    b.konst("p", f32t(&[3, 2], &[1., 2., 3., 4., 5., 6.]));
    b.konst("i", i32t(&[1, 2], &[2, 0]));
    b.konst("i1", i32t(&[1], &[1]));
    b.konst("a0", i32t(&[], &[0]));
    b.konst("a1", i32t(&[], &[1]));
    b.op("g0", "GatherV2", &["p", "i", "a0"], &[]);
    b.op("g1", "GatherV2", &["p", "i1", "a1"], &[]);
    b.konst("bad", i32t(&[1], &[3]));
    b.op("gbad", "GatherV2", &["p", "bad", "a0"], &[]);
    let y = run1(&b.g, &[], "g0");
    assert_eq!(
        (y.shape().to_vec(), y.to_f32_vec().unwrap()),
        (vec![1, 2, 2], vec![5., 6., 1., 2.])
    );
    let y = run1(&b.g, &[], "g1");
    assert_eq!(
        (y.shape().to_vec(), y.to_f32_vec().unwrap()),
        (vec![3, 1], vec![2., 4., 6.])
    );
    let e = qpipe::kernels::run(&b.g, &[], &[r("gbad")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("node 'gbad' (GatherV2): index 3 (position 0) is not in [0, 3)"),
        "{e}"
    );

    b.konst("shape", i32t(&[2], &[-1, 3]));
    b.op("rs", "Reshape", &["p", "shape"], &[]);
    assert_eq!(run1(&b.g, &[], "rs").shape(), &[2, 3]);
    b.op("ed", "ExpandDims", &["p", "a1"], &[]);
    assert_eq!(run1(&b.g, &[], "ed").shape(), &[3, 1, 2]);
    b.op("sq", "Squeeze", &["ed"], &[("squeeze_dims", ints(&[-2]))]);
    assert_eq!(run1(&b.g, &[], "sq").shape(), &[3, 2]);
    b.op(
        "sh",
        "Shape",
        &["ed"],
        &[("out_type", Attr::Type(DType::I32))],
    );
    assert_eq!(
        run1(&b.g, &[], "sh").values::<i32>().unwrap(),
        vec![3, 1, 2]
    );
    b.op("cc", "ConcatV2", &["p", "p", "a1"], &[]);
    let y = run1(&b.g, &[], "cc");
    assert_eq!(y.shape(), &[3, 4]);
    assert_eq!(y.to_f32_vec().unwrap()[..4], [1., 2., 1., 2.]);
    b.op("pk", "Pack", &["p", "p"], &[("axis", Attr::Int(1))]);
    let y = run1(&b.g, &[], "pk");
    assert_eq!(y.shape(), &[3, 2, 2]);
    assert_eq!(y.to_f32_vec().unwrap()[..4], [1., 2., 1., 2.]);
    b.konst("pads", i32t(&[2, 2], &[1, 0, 0, 2]));
    b.op("pd", "Pad", &["p", "pads"], &[]);
    let y = run1(&b.g, &[], "pd");
    assert_eq!(y.shape(), &[4, 4]);
    assert_eq!(
        y.to_f32_vec().unwrap()[..8],
        [0., 0., 0., 0., 1., 2., 0., 0.]
    );
    b.konst("perm", i32t(&[2], &[1, 0]));
    b.op("tr", "Transpose", &["p", "perm"], &[]);
    assert_eq!(
        run1(&b.g, &[], "tr").to_f32_vec().unwrap(),
        vec![1., 3., 5., 2., 4., 6.]
    );
    b.konst("mult", i32t(&[2], &[1, 2]));
    b.op("tl", "Tile", &["p", "mult"], &[]);
    assert_eq!(
        run1(&b.g, &[], "tl").to_f32_vec().unwrap()[..4],
        [1., 2., 1., 2.]
    );
    b.konst("sb", i32t(&[2], &[1, 1]));
    b.konst("ss", i32t(&[2], &[-1, 1]));
    b.op("sl", "Slice", &["p", "sb", "ss"], &[]);
    assert_eq!(run1(&b.g, &[], "sl").to_f32_vec().unwrap(), vec![4., 6.]);
    b.op("ci", "Cast", &["p"], &[("DstT", Attr::Type(DType::I32))]);
    assert_eq!(
        run1(&b.g, &[], "ci").values::<i32>().unwrap(),
        vec![1, 2, 3, 4, 5, 6]
    );
    b.konst("frac", f32t(&[3], &[-1.7, 2.9, 0.0]));
    b.op("ct", "Cast", &["frac"], &[("DstT", Attr::Type(DType::I32))]);
    assert_eq!(
        run1(&b.g, &[], "ct").values::<i32>().unwrap(),
        vec![-1, 2, 0]
    );
    b.op(
        "cb",
        "Cast",
        &["frac"],
        &[("DstT", Attr::Type(DType::Bool))],
    );
    assert_eq!(
        run1(&b.g, &[], "cb").values::<bool>().unwrap(),
        vec![true, true, false]
    );
    b.konst("cond", Tensor::from_vec(vec![3, 1], &[true, false, true]));
    b.konst("zero", f32t(&[], &[0.]));
    b.op("sel", "SelectV2", &["cond", "p", "zero"], &[]);
    assert_eq!(
        run1(&b.g, &[], "sel").to_f32_vec().unwrap(),
        vec![1., 2., 0., 0., 5., 6.]
    );
    b.konst("cond1", Tensor::from_vec(vec![3], &[false, true, false]));
    b.konst("q", f32t(&[3, 2], &[9.; 6]));
    b.op("sel1", "Select", &["cond1", "p", "q"], &[]);
    assert_eq!(
        run1(&b.g, &[], "sel1").to_f32_vec().unwrap(),
        vec![9., 9., 3., 4., 9., 9.]
    );
}

#[test]
fn dequantize_fp16_and_int8() {
    let mut b = G::new();
    b.konst(
        "h",
        Tensor::from_vec(
            vec![2],
            &[half::f16::from_f32(0.1), half::f16::from_f32(-2.0)],
        ),
    );
    b.op(
        "d",
        "Dequantize",
        &["h"],
        &[
            ("T", Attr::Type(DType::F16)),
            ("dtype", Attr::Type(DType::F32)),
        ],
    );
    assert_eq!(
        run1(&b.g, &[], "d").to_f32_vec().unwrap(),
        vec![half::f16::from_f32(0.1).to_f32(), -2.0]
    );
    b.konst("q", Tensor::from_vec(vec![2, 2], &[-127i8, 0, 10, 127]));
    b.g.nodes
        .last_mut()
        .unwrap()
        .output_quant
        .insert(0, QuantParams::per_axis(vec![0.5, 0.25], vec![0, 2], 1));
    b.op(
        "dq",
        "Dequantize",
        &["q"],
        &[
            ("T", Attr::Type(DType::I8)),
            ("dtype", Attr::Type(DType::F32)),
        ],
    );
    assert_eq!(
        run1(&b.g, &[], "dq").to_f32_vec().unwrap(),
        vec![-63.5, -0.5, 5.0, 31.25]
    );
    b.konst("q2", Tensor::from_vec(vec![1], &[1i8]));
    b.op("dq2", "Dequantize", &["q2"], &[]);
    let e = qpipe::kernels::run(&b.g, &[], &[r("dq2")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("without quantization parameters"), "{e}");
}

#[test]
fn hostile_shapes_are_errors_not_aborts() {
    let err = |g: &G, y: &str| {
        qpipe::kernels::run(&g.g, &[], &[r(y)])
            .unwrap_err()
            .to_string()
    };
    let mut b = G::new();
    b.konst("col", f32t(&[100_000, 1], &vec![0.; 100_000]));
    b.konst("row", f32t(&[1, 100_000], &vec![0.; 100_000]));
    b.op("outer", "Add", &["col", "row"], &[]);
    assert!(err(&b, "outer").contains("more than 2147483648 elements"));
    b.konst(
        "pads",
        Tensor::from_vec(vec![2, 2], &[0i64, i64::MAX, 0, 1]),
    );
    b.op("pad", "Pad", &["col", "pads"], &[]);
    assert!(err(&b, "pad").contains("more than"), "{}", err(&b, "pad"));
    b.konst("mult", i32t(&[2], &[1 << 30, 4]));
    b.op("tile", "Tile", &["col", "mult"], &[]);
    assert!(err(&b, "tile").contains("more than"), "{}", err(&b, "tile"));
    b.konst("kdepth", f32t(&[100_000, 0], &[]));
    b.konst("kdepth2", f32t(&[0, 100_000], &[]));
    b.op("mm", "MatMul", &["kdepth", "kdepth2"], &[]);
    assert!(err(&b, "mm").contains("more than"), "{}", err(&b, "mm"));
    let long = vec![0i32; 64];
    b.konst("x", i32t(&[1], &[1]));
    b.konst("l", i32t(&[64], &long));
    b.op(
        "ss",
        "StridedSlice",
        &["x", "l", "l", "l"],
        &[("T", Attr::Type(DType::I32))],
    );
    assert!(err(&b, "ss").contains("too long"), "{}", err(&b, "ss"));
    b.konst("one", i32t(&[1], &[1]));
    b.op(
        "ss2",
        "StridedSlice",
        &["x", "one", "one", "one"],
        &[
            ("T", Attr::Type(DType::I32)),
            ("ellipsis_mask", Attr::Int(i64::MIN)),
        ],
    );
    // A mask bit beyond the spec is ignored, as TensorFlow does; it must not overflow.
    let y = qpipe::kernels::run(&b.g, &[], &[r("ss2")]).unwrap();
    assert_eq!(y[0].shape(), &[0]);
}
