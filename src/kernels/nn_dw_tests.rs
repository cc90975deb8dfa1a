//! The AVX2 depthwise rows give the scalar loop's bits, on windows that cross the
//! padding, strides, dilations, channel counts off the vector widths, bias and each
//! activation, with NaN and infinities among the values. Both vector widths are
//! compared when the CPU has AVX-512 (run again with `QPIPE_NO_AVX512=1`).

use super::*;
use std::mem::MaybeUninit;

/// Deterministic values in about [-4, 4), with a NaN, an infinity and a -0.0 mixed in.
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|i| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            match i % 97 {
                13 => f32::NAN,
                41 => f32::INFINITY,
                77 => -0.0,
                _ => ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0,
            }
        })
        .collect()
}

#[test]
fn avx2_rows_give_the_scalar_bits() {
    if !super::super::simd::avx2() {
        eprintln!("no AVX2 with FMA on this CPU: only the scalar loop exists here");
        return;
    }
    let mut cases = 0;
    for (i, (h, wd, c, k, s, d, pad)) in [
        (9, 11, 16, 3, 1, 1, Padding::Same),
        (9, 12, 24, 3, 2, 1, Padding::Same),
        (8, 13, 40, 3, 1, 1, Padding::Valid),
        // Stride and dilation 1 with 2 + 1 vectors of channels (the `UNIT` blocks).
        (6, 12, 48, 3, 1, 1, Padding::Same),
        (10, 10, 13, 3, 1, 2, Padding::Same),
        (7, 15, 8, 5, 2, 1, Padding::Same),
        (6, 9, 3, 3, 1, 1, Padding::Same),
        (6, 21, 32, 1, 1, 1, Padding::Valid),
        (5, 17, 48, 3, 2, 1, Padding::Explicit([(1, 0), (2, 1)])),
        // Windows wholly in the padding, and no pixel wholly inside the input.
        (3, 2, 24, 3, 1, 1, Padding::Explicit([(3, 3), (4, 4)])),
        (4, 3, 16, 5, 2, 1, Padding::Same),
        // One vector per pixel (16 channels on AVX-512, 8 on AVX2): rows of eight
        // pixels and a last block overlapping the one before it.
        (4, 20, 16, 3, 1, 1, Padding::Same),
        (3, 19, 8, 3, 1, 1, Padding::Valid),
        (3, 26, 24, 3, 1, 1, Padding::Same),
        (4, 23, 16, 5, 1, 2, Padding::Same),
        (3, 16, 16, 3, 1, 1, Padding::Same),
        // Long rows with two or more vectors of channels: many blocks of pixels,
        // stride 1 and 2, a 5-tap filter, and a last block that overlaps.
        (3, 21, 48, 3, 1, 1, Padding::Same),
        (4, 41, 32, 3, 2, 1, Padding::Same),
        (5, 22, 40, 5, 1, 1, Padding::Valid),
    ]
    .into_iter()
    .enumerate()
    {
        for (j, act) in [Act::None, Act::Relu, Act::Relu6].into_iter().enumerate() {
            let n = 2;
            let xs = values(n * h * wd * c, i as u64 * 7 + j as u64);
            let ws = values(k * k * c, 100 + i as u64);
            let bias = values(c, 200 + i as u64);
            let win = Window {
                strides: [s, s],
                dilations: [d, d],
                padding: pad.clone(),
            };
            let (oh, pt) = out_size(h, k, s, d, &win.padding, 0).unwrap();
            let (ow, pl) = out_size(wd, k, s, d, &win.padding, 1).unwrap();
            let dw = Depthwise {
                xs: &xs,
                ws: &ws,
                win: &win,
                epi: Epilogue {
                    bias: (j != 1).then_some(&bias[..]),
                    act,
                },
                dims: [h, wd, c, 1, k, k, oh, ow, pt, pl],
            };
            for r in 0..n * oh {
                let mut a = vec![MaybeUninit::new(1.5f32); ow * c];
                let mut b = vec![MaybeUninit::new(-2.5f32); ow * c];
                dw.row(r, &mut a, 0..0, 0);
                // SAFETY: AVX2 and FMA are present (checked above).
                unsafe { dw.row_avx2(r, &mut b) };
                // Bits, every NaN as one: which NaN an operation returns (its sign and
                // payload) is not specified, and it may differ between compilations of
                // the same loop.
                let bits = |v: &[MaybeUninit<f32>]| -> Vec<u32> {
                    v.iter()
                        // SAFETY: both rows were initialized above.
                        .map(|x| unsafe { x.assume_init() })
                        .map(|x| if x.is_nan() { u32::MAX } else { x.to_bits() })
                        .collect()
                };
                assert_eq!(bits(&a), bits(&b), "case {i} act {act:?} row {r}");
                cases += 1;
            }
        }
    }
    assert!(cases > 100, "{cases} rows compared");
}

/// Each tap is one fused multiply-add on every path (the vector rows of both widths,
/// the channels past them, the scalar loop): with `(1 + 2^-12)^2 = 1 + 2^-11 + 2^-24`
/// added to -1, a rounded product would lose the 2^-24.
#[test]
fn taps_are_fused_multiply_adds() {
    let e = 1.0 + f32::powi(2.0, -12);
    let want = f32::powi(2.0, -11) + f32::powi(2.0, -24);
    assert_ne!(e * e - 1.0, want, "the product alone rounds");
    for c in [3, 8, 16, 24, 27, 56] {
        // One row of 6 pixels, a 1 x 2 filter: output pixel p sums x[p] * -1, then
        // x[p + 1] * e, with x alternating 1 and e.
        let wd = 6;
        let xs: Vec<f32> = (0..wd * c)
            .map(|i| if (i / c) % 2 == 0 { 1.0 } else { e })
            .collect();
        let ws: Vec<f32> = (0..2 * c).map(|i| if i < c { -1.0 } else { e }).collect();
        let x = Value::from_vec(vec![1, 1, wd, c], xs);
        let w = Value::from_vec(vec![1, 2, c, 1], ws);
        let win = Window {
            strides: [1, 1],
            dilations: [1, 1],
            padding: Padding::Valid,
        };
        let y = depthwise_conv2d(&x, &w, &win).unwrap();
        let ys = y.slice::<f32>().unwrap();
        assert_eq!(ys.len(), (wd - 1) * c);
        for (i, &v) in ys.iter().enumerate() {
            // Even pixels: fma(e, e, -1); odd ones: fma(1, e, -e) = 0.
            let want = if (i / c) % 2 == 0 { want } else { 0.0 };
            assert_eq!(v.to_bits(), want.to_bits(), "c {c} element {i}");
        }
    }
}
