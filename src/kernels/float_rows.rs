//! Element-wise loops of small float ops, written as blocks of lanes that the compiler
//! keeps in registers and compiled a second time for AVX2 (chosen at run time). Every
//! element gets the expression of the scalar loop it replaces, so the bits do not
//! depend on the path.

use half::f16;

/// A reduction of `[outer, rn, inner]` over its middle axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowFold {
    /// `if v > acc { acc = v }` from -inf.
    Max,
    /// `if v < acc { acc = v }` from +inf.
    Min,
    /// `acc += v` from 0.0, in order.
    Sum,
}

/// `out[o * inner + i]` = the fold of `xs[(o * rn + k) * inner + i]` over `k` in order
/// (`out` holds `outer * inner` elements).
pub fn fold_middle(xs: &[f32], rn: usize, inner: usize, op: RowFold, out: &mut [f32]) {
    assert!(inner > 0 && xs.len() >= out.len() / inner * rn * inner);
    #[cfg(target_arch = "x86_64")]
    if super::simd::avx2() {
        // SAFETY: AVX2 is present.
        unsafe { fold_middle_avx2(xs, rn, inner, op, out) };
        return;
    }
    fold_middle_any(xs, rn, inner, op, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn fold_middle_avx2(xs: &[f32], rn: usize, inner: usize, op: RowFold, out: &mut [f32]) {
    fold_middle_any(xs, rn, inner, op, out)
}

#[inline(always)]
fn fold_middle_any(xs: &[f32], rn: usize, inner: usize, op: RowFold, out: &mut [f32]) {
    match op {
        RowFold::Max => fold_op::<0>(xs, rn, inner, out),
        RowFold::Min => fold_op::<1>(xs, rn, inner, out),
        RowFold::Sum => fold_op::<2>(xs, rn, inner, out),
    }
}

#[inline(always)]
fn fold_op<const OP: u8>(xs: &[f32], rn: usize, inner: usize, out: &mut [f32]) {
    for (o, dst) in out.chunks_exact_mut(inner).enumerate() {
        let block = &xs[o * rn * inner..(o + 1) * rn * inner];
        let mut ch = 0;
        while ch + 16 <= inner {
            fold_lanes::<16, OP>(block, rn, inner, ch, dst);
            ch += 16;
        }
        while ch + 8 <= inner {
            fold_lanes::<8, OP>(block, rn, inner, ch, dst);
            ch += 8;
        }
        while ch < inner {
            fold_lanes::<1, OP>(block, rn, inner, ch, dst);
            ch += 1;
        }
    }
}

#[inline(always)]
fn fold_lanes<const W: usize, const OP: u8>(
    block: &[f32],
    rn: usize,
    inner: usize,
    ch: usize,
    dst: &mut [f32],
) {
    let mut acc = [match OP {
        0 => f32::NEG_INFINITY,
        1 => f32::INFINITY,
        _ => 0.0,
    }; W];
    for k in 0..rn {
        let v: &[f32; W] = block[k * inner + ch..k * inner + ch + W]
            .try_into()
            .expect("W");
        for i in 0..W {
            match OP {
                0 => {
                    if v[i] > acc[i] {
                        acc[i] = v[i];
                    }
                }
                1 => {
                    if v[i] < acc[i] {
                        acc[i] = v[i];
                    }
                }
                _ => acc[i] += v[i],
            }
        }
    }
    dst[ch..ch + W].copy_from_slice(&acc);
}

/// float16 → float32 (exact), eight at a time with F16C where the CPU has it.
pub fn f16_to_f32(xs: &[f16]) -> Vec<f32> {
    use half::slice::HalfFloatSliceExt;
    let mut out = vec![0f32; xs.len()];
    xs.convert_to_f32_slice(&mut out);
    out
}

/// `(v - zp) as f32 * s` for every element of a run of int8 values of one channel,
/// appended to `out` (the difference is exact in i32 and converts as the i64 one does).
pub fn dequantize_i8_run(run: &[i8], zp: i64, s: f32, out: &mut Vec<f32>) {
    let Ok(zp32) = i32::try_from(zp) else {
        out.extend(run.iter().map(|&v| (v as i64 - zp) as f32 * s));
        return;
    };
    if zp32.checked_sub(128).is_none() || zp32.checked_add(128).is_none() {
        out.extend(run.iter().map(|&v| (v as i64 - zp) as f32 * s));
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if super::simd::avx2() {
        // SAFETY: AVX2 is present.
        unsafe { dequantize_i8_avx2(run, zp32, s, out) };
        return;
    }
    dequantize_i8_any(run, zp32, s, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dequantize_i8_avx2(run: &[i8], zp: i32, s: f32, out: &mut Vec<f32>) {
    dequantize_i8_any(run, zp, s, out)
}

#[inline(always)]
fn dequantize_i8_any(run: &[i8], zp: i32, s: f32, out: &mut Vec<f32>) {
    let start = out.len();
    out.resize(start + run.len(), 0.0);
    for (o, &v) in out[start..].iter_mut().zip(run) {
        *o = (v as i32 - zp) as f32 * s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_equal_the_scalar_loops() {
        let specials = [f32::NAN, -0.0, 0.0, f32::INFINITY, f32::NEG_INFINITY, 1e-40];
        for &(outer, rn, inner) in &[(3, 5, 16), (2, 7, 27), (4, 1, 8), (1, 9, 3), (2, 3, 40)] {
            let xs: Vec<f32> = (0..outer * rn * inner)
                .map(|i| {
                    if i % 11 == 3 {
                        specials[i / 11 % specials.len()]
                    } else {
                        ((i * 7919) % 1000) as f32 * 0.37 - 150.0
                    }
                })
                .collect();
            for op in [RowFold::Max, RowFold::Min, RowFold::Sum] {
                let mut want = vec![
                    match op {
                        RowFold::Max => f32::NEG_INFINITY,
                        RowFold::Min => f32::INFINITY,
                        RowFold::Sum => 0.0,
                    };
                    outer * inner
                ];
                for o in 0..outer {
                    for k in 0..rn {
                        for i in 0..inner {
                            let (a, v) = (&mut want[o * inner + i], xs[(o * rn + k) * inner + i]);
                            match op {
                                RowFold::Max if v > *a => *a = v,
                                RowFold::Min if v < *a => *a = v,
                                RowFold::Sum => *a += v,
                                _ => {}
                            }
                        }
                    }
                }
                let mut got = vec![f32::NAN; outer * inner];
                fold_middle(&xs, rn, inner, op, &mut got);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{op:?} {outer}x{rn}x{inner}");
            }
        }
    }

    #[test]
    fn dequantize_runs_equal_the_i64_expression() {
        let run: Vec<i8> = (-128..=127).collect();
        for &(zp, s) in &[
            (0i64, 0.5f32),
            (-128, 0.0123),
            (127, 3.7e-3),
            (5, -1.5),
            (1 << 40, 1e-9),
            (i32::MAX as i64, 1.0),
        ] {
            let mut got = vec![1.0];
            dequantize_i8_run(&run, zp, s, &mut got);
            let want: Vec<f32> = std::iter::once(1.0)
                .chain(run.iter().map(|&v| (v as i64 - zp) as f32 * s))
                .collect();
            assert_eq!(
                got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "zp {zp} s {s}"
            );
        }
    }

    #[test]
    fn f16_widening_is_exact() {
        let xs: Vec<f16> = (0..=u16::MAX).step_by(7).map(f16::from_bits).collect();
        let got = f16_to_f32(&xs);
        for (h, f) in xs.iter().zip(&got) {
            if h.is_nan() {
                assert!(f.is_nan());
            } else {
                assert_eq!(f.to_bits(), h.to_f32().to_bits());
            }
        }
    }
}
