//! Float matrix product with the scalar kernels' exact arithmetic (see the module
//! above): `out[i][j] = Σ_kk a[i][kk] · b[kk][j]`, from 0.0, in `kk` order, each product
//! and each sum rounded. Blocks of 4 rows × 16 columns stay in AVX2 registers for the
//! whole sum.

/// `out[i * n + j] = Σ_kk a[i * lda + kk] * b[kk * n + j]` for `i < m`, `j < n`.
pub fn sgemm(m: usize, k: usize, n: usize, a: &[f32], lda: usize, b: &[f32], out: &mut [f32]) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        lda >= k && a.len() >= (m - 1) * lda + k,
        "sgemm: a is too short"
    );
    assert!(
        b.len() >= k * n && out.len() >= m * n,
        "sgemm: b or out is too short"
    );
    #[cfg(target_arch = "x86_64")]
    if super::avx2() {
        // SAFETY: AVX2 is present; the bounds were checked above.
        unsafe { x86::sgemm(m, k, n, a, lda, b, out) };
        return;
    }
    portable(m, k, n, a, lda, b, out, 0);
}

/// The scalar loop over columns `j0..n` (what the vector kernels compute on the rest).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn portable(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    out: &mut [f32],
    j0: usize,
) {
    for i in 0..m {
        let o = &mut out[i * n + j0..(i + 1) * n];
        o.fill(0.0);
        let ar = &a[i * lda..i * lda + k];
        for (kk, &av) in ar.iter().enumerate() {
            let br = &b[kk * n + j0..(kk + 1) * n];
            for (ov, &bv) in o.iter_mut().zip(br) {
                *ov += av * bv;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Rows `[r, r + MR)` × columns `[j, j + 8 NV)`.
    #[target_feature(enable = "avx2")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<const MR: usize, const NV: usize>(
        k: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        n: usize,
        out: *mut f32,
    ) {
        let mut acc = [[_mm256_setzero_ps(); NV]; MR];
        for kk in 0..k {
            let bp = b.add(kk * n);
            let mut bv = [_mm256_setzero_ps(); NV];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(bp.add(8 * v));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let av = _mm256_set1_ps(*a.add(r * lda + kk));
                for (x, &w) in row.iter_mut().zip(&bv) {
                    *x = _mm256_add_ps(*x, _mm256_mul_ps(av, w));
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (v, &x) in row.iter().enumerate() {
                _mm256_storeu_ps(out.add(r * n + 8 * v), x);
            }
        }
    }

    #[target_feature(enable = "avx2")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn columns<const NV: usize>(
        m: usize,
        k: usize,
        n: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        out: *mut f32,
    ) {
        let mut r = 0;
        while r + 4 <= m {
            block::<4, NV>(k, a.add(r * lda), lda, b, n, out.add(r * n));
            r += 4;
        }
        let (a, out) = (a.add(r * lda), out.add(r * n));
        match m - r {
            3 => block::<3, NV>(k, a, lda, b, n, out),
            2 => block::<2, NV>(k, a, lda, b, n, out),
            1 => block::<1, NV>(k, a, lda, b, n, out),
            _ => {}
        }
    }

    /// # Safety
    /// AVX2 must be present; `a`, `b` and `out` must hold what [`super::sgemm`] checks.
    #[target_feature(enable = "avx2")]
    pub unsafe fn sgemm(
        m: usize,
        k: usize,
        n: usize,
        a: &[f32],
        lda: usize,
        b: &[f32],
        out: &mut [f32],
    ) {
        let (ap, bp, op) = (a.as_ptr(), b.as_ptr(), out.as_mut_ptr());
        let mut j = 0;
        while j + 16 <= n {
            columns::<2>(m, k, n, ap, lda, bp.add(j), op.add(j));
            j += 16;
        }
        if j + 8 <= n {
            columns::<1>(m, k, n, ap, lda, bp.add(j), op.add(j));
            j += 8;
        }
        if j < n {
            super::portable(m, k, n, a, lda, b, out, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_and_scalar_paths_agree_bit_for_bit() {
        let mut seed = 7u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        for &(m, k, n) in &[
            (1, 1, 1),
            (5, 7, 3),
            (9, 33, 41),
            (4, 64, 16),
            (13, 100, 25),
        ] {
            let lda = k + 3;
            let a: Vec<f32> = (0..m * lda).map(|_| next()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| next() * 1e3).collect();
            let mut fast = vec![f32::NAN; m * n];
            sgemm(m, k, n, &a, lda, &b, &mut fast);
            let mut slow = vec![f32::NAN; m * n];
            portable(m, k, n, &a, lda, &b, &mut slow, 0);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fast), bits(&slow), "m={m} k={k} n={n}");
        }
    }
}
