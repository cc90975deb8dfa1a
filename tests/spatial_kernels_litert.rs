//! Issue 14's activation and spatial kernels against LiteRT's reference kernels
//! (`BUILTIN_REF`): HARD_SWISH in int8 bit for bit, on every int8 input value and
//! random input/output parameters, and in float32. One LiteRT process for all.

mod support;

use qpipe::formats::tflite;
use qpipe::ir::{Attr, DType, Graph, Node, QuantParams, Tensor, TensorRef};
use qpipe::kernels::Arithmetic;
use support::litert_oracle::{LiteRtCase, Resolver};
use support::numeric::Rng;
use support::tmp_dir;

fn placeholder(g: &mut Graph, name: &str, dt: DType, shape: &[i64], q: Option<QuantParams>) {
    let mut n = Node::new(name, "Placeholder")
        .with_attr("dtype", Attr::Type(dt))
        .with_attr("shape", Attr::Shape(Some(shape.to_vec())));
    if let Some(q) = q {
        n.output_quant.insert(0, q);
    }
    g.nodes.push(n);
    g.inputs.push(name.into());
}

fn hard_swish(g: &mut Graph, name: &str, x: &str, dt: DType, q: Option<QuantParams>) {
    let mut n = Node::new(name, "HardSwish")
        .with_input(TensorRef::new(x, 0))
        .with_attr("T", Attr::Type(dt));
    if let Some(q) = q {
        n.output_quant.insert(0, q);
    }
    g.nodes.push(n);
    g.outputs.push(TensorRef::new(name, 0));
}

#[test]
fn hard_swish_matches_litert_reference_in_int8_and_float() {
    let mut rng = Rng::new(14);
    let mut g = Graph::default();
    let mut feeds = Vec::new();
    // Every int8 value, for several input parameters; each input feeds several
    // output parameters (larger and smaller scales, both signs of zero point).
    for i in 0..6 {
        let in_scale = 0.005 * (1.0 + 40.0 * (rng.f() + 1.0) / 2.0);
        let in_zp = (rng.next_u64() % 101) as i64 - 50;
        let x = format!("x{i}");
        placeholder(
            &mut g,
            &x,
            DType::I8,
            &[1, 256],
            Some(QuantParams::per_tensor(in_scale, in_zp)),
        );
        let all: Vec<i8> = (-128..=127).map(|v| v as i8).collect();
        feeds.push((x.clone(), Tensor::from_vec(vec![1, 256], &all)));
        for j in 0..5 {
            let ratio = [0.02f32, 0.3, 1.0, 2.5, 0.9][j] * (1.0 + 0.1 * rng.f());
            let out_zp = (rng.next_u64() % 201) as i64 - 100;
            hard_swish(
                &mut g,
                &format!("hs{i}_{j}"),
                &x,
                DType::I8,
                Some(QuantParams::per_tensor(in_scale * ratio, out_zp)),
            );
        }
    }
    placeholder(&mut g, "xf", DType::F32, &[1, 64], None);
    let xf: Vec<f32> = (0..64)
        .map(|k| (k as f32 - 32.0) * 0.21 + rng.f() * 0.1)
        .collect();
    feeds.push(("xf".into(), Tensor::from_vec(vec![1, 64], &xf)));
    hard_swish(&mut g, "hsf", "xf", DType::F32, None);

    let dir = tmp_dir("spatial_hard_swish");
    let (_, bytes) = tflite::export(&g).unwrap();
    let case = LiteRtCase::write(&dir, &bytes, &feeds);
    let theirs = case.run(Resolver::Reference).unwrap();
    let fed: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let ours = qpipe::kernels::run_with(&g, &fed, &g.outputs, Arithmetic::Reference).unwrap();
    assert_eq!(ours.len(), theirs.len());
    for ((r, a), b) in g.outputs.iter().zip(&ours).zip(&theirs) {
        if a.dtype() == DType::F32 {
            let (x, y) = (a.to_f32_vec().unwrap(), b.to_f32_vec().unwrap());
            assert_eq!(x, y, "{r}: float HARD_SWISH differs from LiteRT's");
            continue;
        }
        let (x, y) = (a.to_i64_vec().unwrap(), b.to_i64_vec().unwrap());
        let bad: Vec<(usize, i64, i64)> = x
            .iter()
            .zip(&y)
            .enumerate()
            .filter(|(_, (p, q))| p != q)
            .map(|(k, (p, q))| (k, *p, *q))
            .collect();
        assert!(
            bad.is_empty(),
            "{r}: differs from BUILTIN_REF at (index, qpipe, LiteRT) {bad:?}"
        );
        // The op is not trivial on these parameters: outputs span many values.
        let distinct: std::collections::BTreeSet<i64> = x.iter().copied().collect();
        assert!(
            distinct.len() > 8,
            "{r}: only {} distinct outputs",
            distinct.len()
        );
    }
}
