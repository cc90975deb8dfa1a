//! The int8 and hybrid convolutions whose patches are windows of the input
//! (`conv_windows`) give the bytes of the copied patches, on whatever vector path
//! this CPU takes: runs longer than a tile, patch lengths that are not a multiple of
//! four (the bytes read past the last window), 16, 32 and 40 output channels (the
//! register blocks and their tails), strides, dilations and whole-row filters.

use crate::ir::{FusedActivation, QuantParams};
use crate::kernels::conv_windows::{windows, with_copied_patches};
use crate::kernels::nn::{Padding, Window};
use crate::kernels::ops::{Arithmetic, StepQuant};
use crate::kernels::value::Value;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) as u32
    }
    fn i8s(&mut self, n: usize) -> Vec<i8> {
        (0..n).map(|_| self.next() as u8 as i8).collect()
    }
}

/// (input `[n, h, w, c]`, filter `[kh, kw]`, output channels, strides, dilations).
type Case = ([usize; 4], [usize; 2], usize, [usize; 2], [usize; 2]);

const CASES: [Case; 8] = [
    // push_student's conv1d: 40 steps of 32 channels, 16 filters.
    ([3, 1, 40, 32], [1, 3], 16, [1, 1], [1, 1]),
    // A run of 78 pixels: three pieces; 40 channels: a 32-column block and a tail.
    ([2, 1, 80, 8], [1, 3], 40, [1, 1], [1, 1]),
    // Patches of 9 bytes (the last window reads 3 bytes past the image).
    ([2, 1, 11, 3], [1, 3], 32, [1, 1], [1, 1]),
    ([2, 3, 17, 5], [1, 4], 20, [2, 3], [1, 1]),
    ([1, 3, 19, 4], [1, 3], 16, [1, 1], [2, 1]),
    // A filter spanning whole rows: one run down the image.
    ([2, 9, 5, 2], [3, 5], 16, [1, 1], [1, 1]),
    ([2, 40, 7, 1], [4, 7], 48, [2, 1], [1, 1]),
    ([1, 6, 3, 3], [1, 3], 8, [1, 1], [1, 1]),
];

fn window(s: [usize; 2], d: [usize; 2]) -> Window {
    Window {
        strides: s,
        dilations: d,
        padding: Padding::Valid,
    }
}

fn check_windows_apply(&([n, h, w, c], [kh, kw], _, s, d): &Case) {
    let (oh, ow) = (
        (h - (kh - 1) * d[0] - 1) / s[0] + 1,
        (w - (kw - 1) * d[1] - 1) / s[1] + 1,
    );
    assert!(
        n > 0 && windows([h, w, c], [kh, kw], s, d, [0, 0], [oh, ow]).is_some(),
        "the case does not take the windows"
    );
}

fn bytes(v: &Value) -> Vec<u8> {
    match v.dtype() {
        crate::ir::DType::I8 => v.slice::<i8>().unwrap().iter().map(|&x| x as u8).collect(),
        _ => v
            .slice::<f32>()
            .unwrap()
            .iter()
            .flat_map(|x| x.to_bits().to_le_bytes())
            .collect(),
    }
}

#[test]
fn int8_windows_give_the_copied_patches_bytes() {
    let mut rng = Rng(11);
    for case in &CASES {
        check_windows_apply(case);
        let &([n, h, w, c], [kh, kw], o, s, d) = case;
        let x = Value::from_vec(vec![n, h, w, c], rng.i8s(n * h * w * c));
        let f = Value::from_vec(vec![kh, kw, c, o], rng.i8s(kh * kw * c * o));
        let bias: Vec<i32> = (0..o)
            .map(|_| (rng.next() % 20_001) as i32 - 10_000)
            .collect();
        let b = Value::from_vec(vec![o], bias);
        let scales: Vec<f32> = (0..o).map(|j| 0.002 + 0.0001 * j as f32).collect();
        for arithmetic in [Arithmetic::Reference, Arithmetic::LiteRt] {
            for act in [FusedActivation::None, FusedActivation::Relu] {
                let quant = StepQuant {
                    inputs: vec![
                        Some(QuantParams::per_tensor(0.05, 3)),
                        Some(QuantParams::per_axis(scales.clone(), vec![0; o], 3)),
                        None,
                    ],
                    outputs: vec![Some(QuantParams::per_tensor(0.4, -5))],
                    arithmetic,
                };
                let inputs = [x.clone(), f.clone(), b.clone()];
                let win = window(s, d);
                let got = super::conv::conv2d(&inputs, &win, act, &quant).unwrap();
                let want = with_copied_patches(|| {
                    super::conv::conv2d(&inputs, &win, act, &quant).unwrap()
                });
                assert_eq!(got.shape, want.shape);
                assert_eq!(bytes(&got), bytes(&want), "{case:?} {arithmetic:?} {act:?}");
                // Not all one value: the requantization leaves something to compare.
                let v = got.slice::<i8>().unwrap();
                assert!(v.iter().any(|&q| q != v[0]), "{case:?}: constant output");
            }
        }
    }
}

#[test]
fn hybrid_windows_give_the_copied_patches_bits() {
    let mut rng = Rng(12);
    for case in &CASES {
        check_windows_apply(case);
        let &([n, h, w, c], [kh, kw], o, s, d) = case;
        let xv: Vec<f32> = (0..n * h * w * c)
            .map(|_| (rng.next() % 2001) as f32 / 500.0 - 2.0)
            .collect();
        let x = Value::from_vec(vec![n, h, w, c], xv);
        let f = Value::from_vec(vec![kh, kw, c, o], rng.i8s(kh * kw * c * o));
        let bias: Vec<f32> = (0..o).map(|j| j as f32 * 0.25 - 1.0).collect();
        let b = Value::from_vec(vec![o], bias);
        // Distinct scales (the per-channel path) and one scale.
        for scales in [
            (0..o).map(|j| 0.01 + 0.001 * j as f32).collect::<Vec<_>>(),
            vec![0.02; o],
        ] {
            for arithmetic in [Arithmetic::Reference, Arithmetic::LiteRt] {
                let quant = StepQuant {
                    inputs: vec![
                        None,
                        Some(QuantParams::per_axis(scales.clone(), vec![0; o], 3)),
                        None,
                    ],
                    outputs: vec![None],
                    arithmetic,
                };
                let inputs = [x.clone(), f.clone(), b.clone()];
                let win = window(s, d);
                let act = FusedActivation::Relu;
                let got = super::hybrid::conv2d(&inputs, &win, act, &quant).unwrap();
                // Another buffer, so that the quantized images are not the cached ones.
                let x2 = Value::from_vec(x.shape.clone(), x.slice::<f32>().unwrap().to_vec());
                let inputs2 = [x2, f.clone(), b.clone()];
                let want = with_copied_patches(|| {
                    super::hybrid::conv2d(&inputs2, &win, act, &quant).unwrap()
                });
                assert_eq!(got.shape, want.shape);
                assert_eq!(bytes(&got), bytes(&want), "{case:?} {arithmetic:?}");
                let v = got.slice::<f32>().unwrap();
                assert!(v.iter().any(|&q| q != v[0]), "{case:?}: constant output");
            }
        }
    }
}
