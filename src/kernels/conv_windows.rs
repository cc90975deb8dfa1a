//! Convolutions whose patches need no copying: where every output pixel's patch
//! (`kh · kw · c` values in filter order) is one contiguous run of the NHWC input, and
//! the patches of consecutive output pixels start a fixed number of values apart, the
//! input itself is the patch matrix, with that step as its row stride (smaller than
//! the patch length: the rows overlap). A conv1d over a sequence (TextCNN: a `1 × kw`
//! filter over `[n, 1, t, c]`, or a `kh × w` filter spanning the whole width) is such a
//! convolution: its patches are windows of the sequence. The float and integer
//! products then read the input in place instead of copies of it, with the same terms
//! in the same order, so the same bits.

/// The output pixels of each image as runs whose patches are windows of the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Windows {
    /// Runs per image, in output order; each is `len` consecutive output pixels.
    pub runs: usize,
    pub len: usize,
    /// Input values from the first patch of one run to that of the next.
    pub run_step: usize,
    /// Input values from one patch to the next within a run.
    pub step: usize,
}

impl Windows {
    /// Offset, within its image, of the first patch of run `r`.
    pub fn run_start(&self, r: usize) -> usize {
        r * self.run_step
    }
}

#[cfg(test)]
thread_local! {
    static OFF: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the convolutions of this thread building patches as before, to
/// compare the two paths.
#[cfg(test)]
pub(crate) fn with_copied_patches<R>(f: impl FnOnce() -> R) -> R {
    OFF.with(|o| o.set(true));
    let r = f();
    OFF.with(|o| o.set(false));
    r
}

/// The windows of a convolution over `[h, wd, c]` images with a `[kh, kw]` filter,
/// `strides`, `dilations`, leading padding `pads` (top, left) and `[oh, ow]` output
/// pixels, when every patch is one run of the input (no tap in the padding).
pub(crate) fn windows(
    [h, wd, c]: [usize; 3],
    [kh, kw]: [usize; 2],
    [sy, sx]: [usize; 2],
    [dy, dx]: [usize; 2],
    [pt, pl]: [usize; 2],
    [oh, ow]: [usize; 2],
) -> Option<Windows> {
    #[cfg(test)]
    if OFF.with(|o| o.get()) {
        return None;
    }
    if h * wd * c * kh * kw * oh * ow == 0 || pt != 0 || pl != 0 {
        return None;
    }
    // A filter row's taps are adjacent pixels.
    let row_run = kw == 1 || dx == 1;
    // Every window inside the input (VALID, or padding only after the last one).
    let inside = (oh - 1) * sy + (kh - 1) * dy < h && (ow - 1) * sx + (kw - 1) * dx < wd;
    if !row_run || !inside {
        return None;
    }
    if ow == 1 && kw == wd && (kh == 1 || dy == 1) {
        // The filter spans whole rows: a patch is `kh` complete rows; one run down
        // the image.
        return Some(Windows {
            runs: 1,
            len: oh,
            run_step: 0,
            step: sy * wd * c,
        });
    }
    if kh == 1 {
        // One filter row: a run per output row.
        return Some(Windows {
            runs: oh,
            len: ow,
            run_step: sy * wd * c,
            step: sx * c,
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The patch of pixel `(oy, ox)` tap by tap, or `None` when a tap is outside.
    #[allow(clippy::too_many_arguments)]
    fn patch(
        x: &[f32],
        [h, wd, c]: [usize; 3],
        [kh, kw]: [usize; 2],
        s: [usize; 2],
        d: [usize; 2],
        oy: usize,
        ox: usize,
    ) -> Option<Vec<f32>> {
        let mut p = Vec::new();
        for ky in 0..kh {
            for kx in 0..kw {
                let (iy, ix) = (oy * s[0] + ky * d[0], ox * s[1] + kx * d[1]);
                if iy >= h || ix >= wd {
                    return None;
                }
                p.extend_from_slice(&x[(iy * wd + ix) * c..][..c]);
            }
        }
        Some(p)
    }

    #[test]
    fn windows_are_the_patches() {
        let mut found = [0usize; 2];
        for h in 1..5 {
            for wd in 1..6 {
                for c in [1, 3] {
                    for kh in 1..4 {
                        for kw in 1..4 {
                            for s in [[1, 1], [2, 1], [1, 2], [2, 3]] {
                                for d in [[1, 1], [2, 1], [1, 2]] {
                                    let (eh, ew) = ((kh - 1) * d[0] + 1, (kw - 1) * d[1] + 1);
                                    if eh > h || ew > wd {
                                        continue;
                                    }
                                    let (oh, ow) = ((h - eh) / s[0] + 1, (wd - ew) / s[1] + 1);
                                    let x: Vec<f32> = (0..h * wd * c).map(|i| i as f32).collect();
                                    let g = ([h, wd, c], [kh, kw], s, d);
                                    let Some(w) = windows(g.0, g.1, s, d, [0, 0], [oh, ow]) else {
                                        continue;
                                    };
                                    found[usize::from(w.runs == 1 && oh > 1)] += 1;
                                    assert_eq!(w.runs * w.len, oh * ow, "{g:?}");
                                    let k = kh * kw * c;
                                    for px in 0..oh * ow {
                                        let (r, j) = (px / w.len, px % w.len);
                                        let at = w.run_start(r) + j * w.step;
                                        let want = patch(&x, g.0, g.1, s, d, px / ow, px % ow)
                                            .expect("a window has a tap outside");
                                        assert_eq!(&x[at..at + k], &want[..], "{g:?} pixel {px}");
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        assert!(found[0] > 100 && found[1] > 20, "{found:?}");
        // Padding before, or a window past the end, is not a window.
        assert_eq!(
            windows([1, 8, 2], [1, 3], [1, 1], [1, 1], [0, 1], [1, 8]),
            None
        );
        assert_eq!(
            windows([1, 8, 2], [1, 3], [1, 1], [1, 1], [0, 0], [1, 7]),
            None
        );
        assert_eq!(
            windows([4, 8, 2], [2, 3], [1, 1], [1, 1], [0, 0], [3, 6]),
            None
        );
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    #[test]
    fn products_read_overlapping_rows() {
        use crate::kernels::simd::igemm::{igemm_u8, PackedWeights};
        use crate::kernels::simd::sgemm::sgemm;
        for &(m, k, n, lda) in &[
            (39, 64, 16, 32),
            (13, 96, 20, 32),
            (7, 12, 41, 3),
            (20, 9, 8, 1),
            (6, 30, 33, 10),
        ] {
            // Row `i` is `a[i * lda..][..k]` (the last row reads 3 more bytes when
            // the integer product rounds `k` up to 4).
            let a = values((m - 1) * lda + k + 3, 3);
            let b = values(k * n, 4);
            let dense: Vec<f32> = (0..m)
                .flat_map(|i| a[i * lda..i * lda + k].to_vec())
                .collect();
            let (mut got, mut want) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
            sgemm(m, k, n, &a, lda, &b, &mut got);
            sgemm(m, k, n, &dense, k, &b, &mut want);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "sgemm m={m} k={k} n={n} lda={lda}");
            assert!(got.iter().all(|x| x.is_finite()) && got.iter().any(|&x| x != got[0]));

            let u: Vec<u8> = a.iter().map(|&x| (x * 500.0) as i32 as u8).collect();
            let w: Vec<i8> = b.iter().map(|&x| (x * 250.0) as i8).collect();
            let packed = PackedWeights::pack(&w, k, n, false);
            let ldu = packed.ldu();
            let mut rows = vec![0u8; m * ldu];
            for i in 0..m {
                rows[i * ldu..i * ldu + k].copy_from_slice(&u[i * lda..i * lda + k]);
            }
            let shifts: Vec<i32> = (0..m as i32).map(|i| 128 - i % 7).collect();
            let (mut got, mut want) = (vec![0i32; m * n], vec![1i32; m * n]);
            igemm_u8(m, &u, lda, &packed, &shifts, &mut got);
            igemm_u8(m, &rows, ldu, &packed, &shifts, &mut want);
            assert_eq!(got, want, "igemm m={m} k={k} n={n} lda={lda}");
            assert!(got.iter().any(|&x| x != got[0]));
        }
    }

    #[test]
    fn float_windows_give_the_copied_patches_bits() {
        use crate::kernels::nn::{conv2d_ex, Act, Epilogue, Padding, Window};
        use crate::kernels::value::Value;
        for &([n, h, w, c], [kh, kw], o, s, d) in &[
            ([3, 1, 40, 32], [1, 3], 16, [1, 1], [1, 1]),
            ([2, 1, 80, 8], [1, 3], 40, [1, 1], [1, 1]),
            ([2, 3, 17, 5], [1, 4], 20, [2, 3], [1, 1]),
            ([1, 3, 19, 4], [1, 3], 16, [1, 1], [2, 1]),
            ([2, 9, 5, 2], [3, 5], 16, [1, 1], [1, 1]),
            ([2, 40, 7, 1], [4, 7], 48, [2, 1], [1, 1]),
            ([1, 6, 3, 3], [1, 3], 7, [1, 1], [1, 1]),
        ] {
            let x = Value::from_vec(vec![n, h, w, c], values(n * h * w * c, 5));
            let f = Value::from_vec(vec![kh, kw, c, o], values(kh * kw * c * o, 6));
            let bias = values(o, 7);
            let win = Window {
                strides: s,
                dilations: d,
                padding: Padding::Valid,
            };
            for act in [Act::None, Act::Relu, Act::Relu6] {
                let epi = Epilogue {
                    bias: Some(&bias),
                    act,
                };
                let got = conv2d_ex(&x, &f, &win, epi).unwrap();
                let want = with_copied_patches(|| conv2d_ex(&x, &f, &win, epi).unwrap());
                assert_eq!(got.shape, want.shape);
                let bits = |v: &Value| {
                    v.slice::<f32>()
                        .unwrap()
                        .iter()
                        .map(|x| x.to_bits())
                        .collect::<Vec<_>>()
                };
                let what = format!("{:?} {act:?}", (n, h, w, c, kh, kw, o, s, d));
                assert_eq!(bits(&got), bits(&want), "{what}");
                let v = got.slice::<f32>().unwrap();
                assert!(v.iter().any(|&y| y != v[0]), "{what}: constant output");
            }
        }
    }
}
