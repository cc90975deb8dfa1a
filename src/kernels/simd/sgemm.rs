//! Float matrix product with the scalar kernels' exact arithmetic (see the module
//! above): `out[i][j] = Σ_kk a[i][kk] · b[kk][j]`, from 0.0, in `kk` order, each product
//! and each sum rounded. Blocks of 4 rows × 16 columns stay in AVX2 registers for the
//! whole sum; `b` is first copied into panels of 16 columns, so that each step of the
//! sum reads one contiguous 64-byte line of it.

use std::mem::MaybeUninit;

/// `b` (`[k, n]`) as the vector kernels read it: panels of 16 columns (then one of 8),
/// each `[k, width]`; the last `n % 8` columns are read from `b` itself.
pub struct PackedB<'a> {
    b: &'a [f32],
    k: usize,
    n: usize,
    panels: Vec<f32>,
}

impl<'a> PackedB<'a> {
    pub fn new(b: &'a [f32], k: usize, n: usize) -> PackedB<'a> {
        assert!(b.len() >= k * n, "sgemm: b is too short");
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))] // filled on x86-64 only
        let mut panels = Vec::new();
        #[cfg(target_arch = "x86_64")]
        if super::avx2() {
            panels.reserve(k * (n / 8 * 8));
            let mut j = 0;
            while j + 8 <= n {
                let width = if j + 16 <= n { 16 } else { 8 };
                for kk in 0..k {
                    panels.extend_from_slice(&b[kk * n + j..kk * n + j + width]);
                }
                j += width;
            }
        }
        PackedB { b, k, n, panels }
    }
}

/// `out[i * n + j] = Σ_kk a[i * lda + kk] * b[kk * n + j]` for `i < m`, `j < n`.
pub fn sgemm(m: usize, k: usize, n: usize, a: &[f32], lda: usize, b: &[f32], out: &mut [f32]) {
    sgemm_packed(m, a, lda, &PackedB::new(b, k, n), out);
}

/// [`sgemm`] with `b` packed once for many calls.
pub fn sgemm_packed(m: usize, a: &[f32], lda: usize, b: &PackedB, out: &mut [f32]) {
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`, and only initialized values
    // are written through the view.
    let out = unsafe { &mut *(out as *mut [f32] as *mut [MaybeUninit<f32>]) };
    sgemm_packed_uninit(m, a, lda, b, out);
}

/// [`sgemm_packed`] into memory that need not be initialized (no zero fill first):
/// every one of the `m * n` outputs is written; returns them.
pub fn sgemm_packed_uninit<'o>(
    m: usize,
    a: &[f32],
    lda: usize,
    b: &PackedB,
    out: &'o mut [MaybeUninit<f32>],
) -> &'o mut [f32] {
    let (k, n) = (b.k, b.n);
    assert!(out.len() >= m * n, "sgemm: out is too short");
    let out = &mut out[..m * n];
    if m > 0 && n > 0 {
        assert!(
            lda >= k && a.len() >= (m - 1) * lda + k,
            "sgemm: a is too short"
        );
        let op = out.as_mut_ptr() as *mut f32;
        #[cfg(target_arch = "x86_64")]
        let done = if super::avx2() && b.panels.len() == k * (n / 8 * 8) {
            // SAFETY: AVX2 is present; the bounds were checked above and by PackedB::new.
            unsafe { x86::sgemm(m, a, lda, b, op) };
            true
        } else {
            false
        };
        #[cfg(not(target_arch = "x86_64"))]
        let done = false;
        if !done {
            // SAFETY: `op` holds `m * n` elements (checked above).
            unsafe { portable(m, k, n, a, lda, b.b, op, 0) };
        }
    }
    // SAFETY: every element was written above.
    unsafe { &mut *(out as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// The scalar loop over columns `j0..n` (what the vector kernels compute on the rest),
/// writing `out` (which need not be initialized) before reading it.
///
/// # Safety
/// `out` must be valid for `m * n` elements.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn portable(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    out: *mut f32,
    j0: usize,
) {
    for i in 0..m {
        let row = out.add(i * n + j0);
        for j in 0..n - j0 {
            row.add(j).write(0.0);
        }
        let o = std::slice::from_raw_parts_mut(row, n - j0);
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
    use super::PackedB;
    use std::arch::x86_64::*;

    /// Rows `[0, MR)` × columns `[0, 8 NV)` of the pointers' origins; `b` advances by
    /// `8 NV` a step (a panel), `out` by `ldo` a row.
    #[target_feature(enable = "avx2")]
    unsafe fn block<const MR: usize, const NV: usize>(
        k: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        out: *mut f32,
        ldo: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); NV]; MR];
        for kk in 0..k {
            let bp = b.add(kk * 8 * NV);
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
                _mm256_storeu_ps(out.add(r * ldo + 8 * v), x);
            }
        }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn columns<const NV: usize>(
        m: usize,
        k: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        out: *mut f32,
        ldo: usize,
    ) {
        let mut r = 0;
        while r + 4 <= m {
            block::<4, NV>(k, a.add(r * lda), lda, b, out.add(r * ldo), ldo);
            r += 4;
        }
        let (a, out) = (a.add(r * lda), out.add(r * ldo));
        match m - r {
            3 => block::<3, NV>(k, a, lda, b, out, ldo),
            2 => block::<2, NV>(k, a, lda, b, out, ldo),
            1 => block::<1, NV>(k, a, lda, b, out, ldo),
            _ => {}
        }
    }

    /// # Safety
    /// AVX2 must be present; `a`, `b` and `op` (`m * n` elements, written, never read
    /// before) must hold what [`super::sgemm_packed_uninit`] checks, with `b` packed.
    #[target_feature(enable = "avx2")]
    pub unsafe fn sgemm(m: usize, a: &[f32], lda: usize, b: &PackedB, op: *mut f32) {
        let (k, n) = (b.k, b.n);
        let ap = a.as_ptr();
        let mut panel = b.panels.as_ptr();
        let mut j = 0;
        while j + 16 <= n {
            columns::<2>(m, k, ap, lda, panel, op.add(j), n);
            panel = panel.add(16 * k);
            j += 16;
        }
        if j + 8 <= n {
            columns::<1>(m, k, ap, lda, panel, op.add(j), n);
            j += 8;
        }
        if j < n {
            super::portable(m, k, n, a, lda, b.b, op, j);
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
            unsafe { portable(m, k, n, &a, lda, &b, slow.as_mut_ptr(), 0) };
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fast), bits(&slow), "m={m} k={k} n={n}");
        }
    }
}
