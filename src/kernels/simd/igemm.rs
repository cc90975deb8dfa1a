//! Integer matrix product for the int8 and hybrid kernels: int8 weights times
//! activations that fit i16 (an int8 value minus a zero point), summed in wrapping
//! i32. Integer sums do not depend on order, so every path gives the scalar kernels'
//! bits. On AVX2 the weights are packed as pairs of i16 rows so that one `vpmaddwd`
//! multiplies two reduction steps of 8 outputs at once. With AVX512-VNNI they are also
//! packed in groups of four int8 rows for `vpdpbusd`, which multiplies unsigned bytes by
//! signed ones: the activations are shifted into 0..=255 (`v + shift`) and
//! `shift · Σ_k w` is taken off each sum again, exactly, in wrapping i32.
//! [`igemm_u8_requant`] requantizes the sums of each register block before storing
//! them (with the register-block forms of `rounding.rs`).

use std::mem::MaybeUninit;

use crate::kernels::rounding::RowRequantizer;

/// Weights `[k, n]` packed for [`igemm`]: `data[(p * n + j) * 2 + t]` is the weight
/// of reduction step `2p + t` and output `j` (0 past `k`).
#[derive(Debug, Clone)]
pub struct PackedWeights {
    pub k: usize,
    pub n: usize,
    data: Vec<i16>,
    /// `quads[(q * n + j) * 4 + t]`: weight of step `4q + t`, output `j` (VNNI only).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    quads: Vec<i8>,
    /// `Σ_k w[k][j]` (VNNI only).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    colsum: Vec<i32>,
}

impl PackedWeights {
    /// From `w` as `[k, n]`, or as `[n, k]` when `transposed`.
    pub fn pack(w: &[i8], k: usize, n: usize, transposed: bool) -> PackedWeights {
        let pairs = k.div_ceil(2);
        let mut data = vec![0i16; pairs * n * 2];
        for kk in 0..k {
            let (p, t) = (kk / 2, kk % 2);
            for j in 0..n {
                let v = if transposed {
                    w[j * k + kk]
                } else {
                    w[kk * n + j]
                };
                data[(p * n + j) * 2 + t] = v as i16;
            }
        }
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))] // filled on x86-64 only
        let (mut quads, mut colsum) = (Vec::new(), Vec::new());
        #[cfg(target_arch = "x86_64")]
        if super::vnni() {
            quads = vec![0i8; k.div_ceil(4) * 4 * n];
            colsum = vec![0i32; n];
            for kk in 0..k {
                let (q, t) = (kk / 4, kk % 4);
                for j in 0..n {
                    let v = if transposed {
                        w[j * k + kk]
                    } else {
                        w[kk * n + j]
                    };
                    quads[(q * n + j) * 4 + t] = v;
                    colsum[j] = colsum[j].wrapping_add(v as i32);
                }
            }
        }
        PackedWeights {
            k,
            n,
            data,
            quads,
            colsum,
        }
    }

    /// The row stride [`igemm`] needs of its activations: `k` rounded up to even.
    pub fn lda(&self) -> usize {
        self.k.div_ceil(2) * 2
    }

    /// The row stride [`igemm_u8`] needs of its activations: `k` rounded up to 4.
    pub fn ldu(&self) -> usize {
        self.k.div_ceil(4) * 4
    }
}

/// `out[i * n + j] = Σ_kk (u[i * ldu + kk] - shifts[i]) · w[kk][j]` in wrapping i32,
/// for `i < m`: activations given as bytes `a + shift`, the layout the VNNI kernel
/// reads directly (so a caller builds its patches straight into it). Row `i` is the
/// [`PackedWeights::ldu`] bytes from `i * ldu`, and rows may overlap (`ldu` less than
/// that: a convolution's windows of its input); the bytes of a row past `k` are
/// ignored (their weights are 0).
pub fn igemm_u8(
    m: usize,
    u: &[u8],
    ldu: usize,
    w: &PackedWeights,
    shifts: &[i32],
    out: &mut [i32],
) {
    let n = w.n;
    if m == 0 || n == 0 {
        return;
    }
    assert!(u.len() >= (m - 1) * ldu + w.ldu(), "igemm: u is too short");
    assert!(
        out.len() >= m * n && shifts.len() >= m,
        "igemm: out or shifts is too short"
    );
    #[cfg(target_arch = "x86_64")]
    if !w.quads.is_empty() && super::vnni() {
        // SAFETY: AVX512-VNNI is present (the weights were packed for it); the bounds
        // were checked above.
        unsafe { x86::igemm_vnni_u8(m, u, ldu, w, shifts, out) };
        return;
    }
    let lda = w.lda();
    let mut a = vec![0i16; m * lda];
    for (i, row) in a.chunks_exact_mut(lda).enumerate() {
        let shift = shifts[i];
        for (d, &v) in row.iter_mut().zip(&u[i * ldu..i * ldu + w.k]) {
            *d = (v as i32 - shift) as i16;
        }
    }
    igemm(m, &a, lda, w, shifts, out);
}

/// Whether [`igemm_u8_requant`] has a kernel for this CPU, `w` and `rq`.
pub fn requant_fused(w: &PackedWeights, rq: &RowRequantizer) -> bool {
    #[cfg(target_arch = "x86_64")]
    if !w.quads.is_empty() && super::vnni() {
        use std::sync::OnceLock;
        // The fused kernel narrows with AVX-512BW's byte packs.
        static BW: OnceLock<bool> = OnceLock::new();
        let bw = *BW.get_or_init(|| std::arch::is_x86_feature_detected!("avx512bw"));
        return bw && rq.block_form().is_some();
    }
    let _ = (w, rq);
    false
}

/// [`igemm_u8`] then `rq.rows(sums, bias, out)` in one pass: each register block of
/// sums starts at its bias and is requantized while in registers and stored as int8,
/// where the product has a kernel for the CPU and `rq` a register-block form
/// (AVX512-VNNI; gemmlowp's or XNNPACK's requantization; [`requant_fused`]). It
/// writes every output of the `m` rows, so `out` may be uninitialized. Returns
/// `false`, having written nothing, where it has no kernel.
#[allow(clippy::too_many_arguments)]
pub fn igemm_u8_requant(
    m: usize,
    u: &[u8],
    ldu: usize,
    w: &PackedWeights,
    shifts: &[i32],
    bias: &[i32],
    rq: &RowRequantizer,
    out: &mut [MaybeUninit<i8>],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if requant_fused(w, rq) {
        let Some(form) = rq.block_form() else {
            return false;
        };
        let n = w.n;
        if m == 0 || n == 0 {
            return true;
        }
        assert!(u.len() >= (m - 1) * ldu + w.ldu(), "igemm: u is too short");
        assert!(
            out.len() >= m * n && shifts.len() >= m && bias.len() == n && rq.channels() == n,
            "igemm: out, shifts, bias or the requantizer do not match"
        );
        // SAFETY: AVX512-VNNI and BW are present (`requant_fused`); the bounds were
        // checked above.
        unsafe { x86::igemm_vnni_u8_requant(m, u, ldu, w, shifts, bias, rq, form, out) };
        return true;
    }
    let _ = (m, u, ldu, w, shifts, bias, rq, out);
    false
}

/// `out[i * n + j] = Σ_kk a[i * lda + kk] · w[kk][j]` in wrapping i32, for `i < m`.
/// `lda` is at least [`PackedWeights::lda`], and `a[i * lda + k]` is 0 when `k` is odd.
/// Every value of row `i` of `a` plus `shifts[i]` lies in `0..=255`.
pub fn igemm(m: usize, a: &[i16], lda: usize, w: &PackedWeights, shifts: &[i32], out: &mut [i32]) {
    let (k2, n) = (w.lda(), w.n);
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        lda >= k2 && a.len() >= (m - 1) * lda + k2,
        "igemm: a is too short"
    );
    assert!(
        out.len() >= m * n && shifts.len() >= m,
        "igemm: out or shifts is too short"
    );
    debug_assert!(w.k.is_multiple_of(2) || (0..m).all(|i| a[i * lda + w.k] == 0));
    #[cfg(target_arch = "x86_64")]
    if !w.quads.is_empty() && super::vnni() {
        // SAFETY: AVX512-VNNI is present (the weights were packed for it); the bounds
        // were checked above.
        unsafe { x86::igemm_vnni(m, a, lda, w, shifts, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if super::avx2() {
        // SAFETY: AVX2 is present; the bounds were checked above.
        unsafe { x86::igemm(m, a, lda, w, out) };
        return;
    }
    portable(m, a, lda, w, out, 0);
}

#[inline(always)]
fn portable(m: usize, a: &[i16], lda: usize, w: &PackedWeights, out: &mut [i32], j0: usize) {
    let n = w.n;
    let pairs = w.lda() / 2;
    for i in 0..m {
        let o = &mut out[i * n + j0..(i + 1) * n];
        o.fill(0);
        for p in 0..pairs {
            let (x0, x1) = (a[i * lda + 2 * p] as i32, a[i * lda + 2 * p + 1] as i32);
            let wp = &w.data[(p * n + j0) * 2..(p + 1) * n * 2];
            for (ov, wv) in o.iter_mut().zip(wp.chunks_exact(2)) {
                *ov = ov
                    .wrapping_add(x0 * wv[0] as i32)
                    .wrapping_add(x1 * wv[1] as i32);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::PackedWeights;
    use crate::kernels::rounding::{block, RowRequantizer};
    use std::arch::x86_64::*;

    /// Rows `[0, MR)` × outputs `[0, 8 NV)` of the pointers' origin.
    #[target_feature(enable = "avx2")]
    unsafe fn block<const MR: usize, const NV: usize>(
        pairs: usize,
        a: *const i16,
        lda: usize,
        w: *const i16,
        n: usize,
        out: *mut i32,
    ) {
        let mut acc = [[_mm256_setzero_si256(); NV]; MR];
        for p in 0..pairs {
            let wp = w.add(p * n * 2);
            let mut wv = [_mm256_setzero_si256(); NV];
            for (v, x) in wv.iter_mut().enumerate() {
                *x = _mm256_loadu_si256(wp.add(16 * v) as *const __m256i);
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let pair = (a.add(r * lda + 2 * p) as *const i32).read_unaligned();
                let av = _mm256_set1_epi32(pair);
                for (x, &wq) in row.iter_mut().zip(&wv) {
                    *x = _mm256_add_epi32(*x, _mm256_madd_epi16(av, wq));
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (v, &x) in row.iter().enumerate() {
                _mm256_storeu_si256(out.add(r * n + 8 * v) as *mut __m256i, x);
            }
        }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn columns<const NV: usize>(
        m: usize,
        pairs: usize,
        a: *const i16,
        lda: usize,
        w: *const i16,
        n: usize,
        out: *mut i32,
    ) {
        let mut r = 0;
        // Six rows of two vectors: twelve sums, the weights and a broadcast fill the
        // sixteen registers (fewer loads per multiply than four rows).
        while r + 6 <= m {
            block::<6, NV>(pairs, a.add(r * lda), lda, w, n, out.add(r * n));
            r += 6;
        }
        let (a, out) = (a.add(r * lda), out.add(r * n));
        match m - r {
            5 => block::<5, NV>(pairs, a, lda, w, n, out),
            4 => block::<4, NV>(pairs, a, lda, w, n, out),
            3 => block::<3, NV>(pairs, a, lda, w, n, out),
            2 => block::<2, NV>(pairs, a, lda, w, n, out),
            1 => block::<1, NV>(pairs, a, lda, w, n, out),
            _ => {}
        }
    }

    /// Rows `[0, MR)` × outputs `[0, 8 NV)`, four reduction steps per instruction.
    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
    unsafe fn block_vnni<const MR: usize, const NV: usize>(
        quads: usize,
        u: *const u8,
        ldu: usize,
        w: *const i8,
        n: usize,
        out: *mut i32,
    ) {
        let mut acc = [[_mm256_setzero_si256(); NV]; MR];
        for q in 0..quads {
            let wq = w.add(q * n * 4);
            let mut wv = [_mm256_setzero_si256(); NV];
            for (v, x) in wv.iter_mut().enumerate() {
                *x = _mm256_loadu_si256(wq.add(32 * v) as *const __m256i);
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let quad = (u.add(r * ldu + 4 * q) as *const i32).read_unaligned();
                let uv = _mm256_set1_epi32(quad);
                for (x, &wq) in row.iter_mut().zip(&wv) {
                    *x = _mm256_dpbusd_epi32(*x, uv, wq);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (v, &x) in row.iter().enumerate() {
                _mm256_storeu_si256(out.add(r * n + 8 * v) as *mut __m256i, x);
            }
        }
    }

    /// Adds the products of rows `[0, MR)` × columns `[0, 16 NV)` to `acc` in 512-bit
    /// vectors, four reduction steps per instruction (the weights of the lanes
    /// outside `mask` read as 0).
    #[inline]
    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
    unsafe fn dot_vnni512<const MR: usize, const NV: usize>(
        quads: usize,
        u: *const u8,
        ldu: usize,
        w: *const i8,
        n: usize,
        mask: &[__mmask16; NV],
        acc: &mut [[__m512i; NV]; MR],
    ) {
        for q in 0..quads {
            let wq = w.add(q * n * 4);
            let mut wv = [_mm512_setzero_si512(); NV];
            for (v, x) in wv.iter_mut().enumerate() {
                *x = _mm512_maskz_loadu_epi32(mask[v], wq.add(64 * v).cast());
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let quad = (u.add(r * ldu + 4 * q) as *const i32).read_unaligned();
                let uv = _mm512_set1_epi32(quad);
                for (x, &wq) in row.iter_mut().zip(&wv) {
                    *x = _mm512_dpbusd_epi32(*x, uv, wq);
                }
            }
        }
    }

    /// Rows `[0, MR)` × outputs `[0, 16 NV)` in 512-bit vectors, each sum started at
    /// `-shift · Σ_k w` of its row and column (`colsum` points at the first column).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
    unsafe fn block_vnni512<const MR: usize, const NV: usize>(
        quads: usize,
        u: *const u8,
        ldu: usize,
        w: *const i8,
        n: usize,
        shifts: *const i32,
        colsum: *const i32,
        out: *mut i32,
    ) {
        let mut acc = [[_mm512_setzero_si512(); NV]; MR];
        for (r, row) in acc.iter_mut().enumerate() {
            let neg = _mm512_set1_epi32(0i32.wrapping_sub(*shifts.add(r)));
            for (v, x) in row.iter_mut().enumerate() {
                *x = _mm512_mullo_epi32(neg, _mm512_loadu_si512(colsum.add(16 * v).cast()));
            }
        }
        dot_vnni512(quads, u, ldu, w, n, &[0xffff; NV], &mut acc);
        for (r, row) in acc.iter().enumerate() {
            for (v, &x) in row.iter().enumerate() {
                _mm512_storeu_si512(out.add(r * n + 16 * v).cast(), x);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
    unsafe fn columns_vnni512<const NV: usize>(
        m: usize,
        quads: usize,
        u: *const u8,
        ldu: usize,
        w: *const i8,
        n: usize,
        shifts: *const i32,
        colsum: *const i32,
        out: *mut i32,
    ) {
        let mut r = 0;
        while r + 4 <= m {
            let (ur, sr, or) = (u.add(r * ldu), shifts.add(r), out.add(r * n));
            block_vnni512::<4, NV>(quads, ur, ldu, w, n, sr, colsum, or);
            r += 4;
        }
        let (u, s, out) = (u.add(r * ldu), shifts.add(r), out.add(r * n));
        match m - r {
            3 => block_vnni512::<3, NV>(quads, u, ldu, w, n, s, colsum, out),
            2 => block_vnni512::<2, NV>(quads, u, ldu, w, n, s, colsum, out),
            1 => block_vnni512::<1, NV>(quads, u, ldu, w, n, s, colsum, out),
            _ => {}
        }
    }

    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
    unsafe fn columns_vnni<const NV: usize>(
        m: usize,
        quads: usize,
        u: *const u8,
        ldu: usize,
        w: *const i8,
        n: usize,
        out: *mut i32,
    ) {
        let mut r = 0;
        while r + 4 <= m {
            block_vnni::<4, NV>(quads, u.add(r * ldu), ldu, w, n, out.add(r * n));
            r += 4;
        }
        let (u, out) = (u.add(r * ldu), out.add(r * n));
        match m - r {
            3 => block_vnni::<3, NV>(quads, u, ldu, w, n, out),
            2 => block_vnni::<2, NV>(quads, u, ldu, w, n, out),
            1 => block_vnni::<1, NV>(quads, u, ldu, w, n, out),
            _ => {}
        }
    }

    /// # Safety
    /// AVX512-VNNI and VL must be present, `w` packed for them; `a` and `out` must hold
    /// what [`super::igemm`] checks.
    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
    pub unsafe fn igemm_vnni(
        m: usize,
        a: &[i16],
        lda: usize,
        w: &PackedWeights,
        shifts: &[i32],
        out: &mut [i32],
    ) {
        let ldu = w.ldu();
        let mut u = vec![0u8; m * ldu];
        for (i, row) in u.chunks_exact_mut(ldu).enumerate() {
            let shift = shifts[i];
            for (d, &v) in row.iter_mut().zip(&a[i * lda..i * lda + w.k]) {
                // In range by the caller's promise; a value outside would only wrap.
                *d = (v as i32 + shift) as u8;
            }
        }
        igemm_vnni_u8(m, &u, ldu, w, shifts, out)
    }

    /// # Safety
    /// AVX512-VNNI and VL must be present, `w` packed for them; `u` and `out` must hold
    /// what [`super::igemm_u8`] checks.
    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
    pub unsafe fn igemm_vnni_u8(
        m: usize,
        u: &[u8],
        ldu: usize,
        w: &PackedWeights,
        shifts: &[i32],
        out: &mut [i32],
    ) {
        let n = w.n;
        let quads = w.ldu() / 4;
        let (up, wp, op) = (u.as_ptr(), w.quads.as_ptr(), out.as_mut_ptr());
        let (sp, cp) = (shifts.as_ptr(), w.colsum.as_ptr());
        let mut j = 0;
        // Blocks of 32 columns include the shift's correction.
        while j + 32 <= n {
            columns_vnni512::<2>(
                m,
                quads,
                up,
                ldu,
                wp.add(j * 4),
                n,
                sp,
                cp.add(j),
                op.add(j),
            );
            j += 32;
        }
        let corrected = j;
        while j + 16 <= n {
            columns_vnni::<2>(m, quads, up, ldu, wp.add(j * 4), n, op.add(j));
            j += 16;
        }
        if j + 8 <= n {
            columns_vnni::<1>(m, quads, up, ldu, wp.add(j * 4), n, op.add(j));
            j += 8;
        }
        if j < n {
            // The last columns, over the same bytes (weights past `k` are 0).
            for i in 0..m {
                let row = &u[i * ldu..i * ldu + w.k];
                let o = &mut out[i * n + j..(i + 1) * n];
                o.fill(0);
                for (kk, &v) in row.iter().enumerate() {
                    let (q, t) = (kk / 4, kk % 4);
                    let x = v as i32;
                    for (jj, ov) in o.iter_mut().enumerate() {
                        let wv = w.quads[(q * n + j + jj) * 4 + t] as i32;
                        *ov = ov.wrapping_add(x.wrapping_mul(wv));
                    }
                }
            }
        }
        for (i, &shift) in shifts.iter().enumerate().take(m) {
            let row = &mut out[i * n + corrected..(i + 1) * n];
            for (o, &cs) in row.iter_mut().zip(&w.colsum[corrected..]) {
                *o = o.wrapping_sub(shift.wrapping_mul(cs));
            }
        }
    }

    /// Rows `[0, MR)` × columns `[0, 16 NV)` of [`igemm_vnni_u8_requant`]: each sum
    /// starts at `bias - shift · Σ_k w` of its row and column, and is requantized in
    /// registers (the kind `K` of `rounding::block`) and stored as int8, 64 values
    /// narrowed at once (two rows of two vectors, or four rows of one); the last
    /// vector's columns are those of `cols.mask`.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn block_requant<const MR: usize, const NV: usize, const K: u8>(
        quads: usize,
        u: *const u8,
        ldu: usize,
        w: *const i8,
        n: usize,
        shifts: *const i32,
        cols: &Cols<NV>,
        k: &block::Consts,
        out: *mut i8,
    ) {
        let mut acc = [cols.init; MR];
        if !cols.uniform {
            for (r, row) in acc.iter_mut().enumerate() {
                let neg = _mm512_set1_epi32(0i32.wrapping_sub(*shifts.add(r)));
                for (v, x) in row.iter_mut().enumerate() {
                    *x = _mm512_add_epi32(cols.bias[v], _mm512_mullo_epi32(neg, cols.colsum[v]));
                }
            }
        }
        dot_vnni512(quads, u, ldu, w, n, &cols.mask, &mut acc);
        // Groups spelled out, so that every index into `acc` is a constant and the
        // sums stay in registers.
        let per = 4 / NV;
        macro_rules! group {
            ($g:expr) => {
                if $g * per < MR {
                    store_group::<MR, NV, K>(&acc, $g * per, n, cols, k, out);
                }
            };
        }
        group!(0);
        group!(1);
        group!(2);
        group!(3);
    }

    /// Requantizes rows `[r0, r0 + 4 / NV)` of `acc` (those below `MR`) and stores
    /// them, narrowed to int8 in one vector.
    #[inline]
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn store_group<const MR: usize, const NV: usize, const K: u8>(
        acc: &[[__m512i; NV]; MR],
        r0: usize,
        n: usize,
        cols: &Cols<NV>,
        k: &block::Consts,
        out: *mut i8,
    ) {
        // The packs leave dword `4 L + j` = dword `L` of vector `j`; this puts the
        // four vectors' 16 bytes one after another.
        let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        let zero = _mm512_setzero_si512();
        let at = |i: usize| {
            let (r, c) = (r0 + i / NV, i % NV);
            if r < MR {
                block::requant16::<K>(k, &cols.lanes[c], acc[r][c])
            } else {
                zero
            }
        };
        let z = block::pack64(k, [at(0), at(1), at(2), at(3)]);
        let z = _mm512_permutexvar_epi32(order, z);
        let full = cols.mask[NV - 1] == 0xffff;
        if NV == 2 {
            let o = out.add(r0 * n);
            if full {
                _mm256_storeu_si256(o.cast(), _mm512_castsi512_si256(z));
            } else {
                _mm256_mask_storeu_epi8(o, cols.mask32, _mm512_castsi512_si256(z));
            }
            if r0 + 1 < MR {
                let (o, y) = (o.add(n), _mm512_extracti64x4_epi64::<1>(z));
                if full {
                    _mm256_storeu_si256(o.cast(), y);
                } else {
                    _mm256_mask_storeu_epi8(o, cols.mask32, y);
                }
            }
        } else {
            let rows = [
                _mm512_castsi512_si128(z),
                _mm512_extracti32x4_epi32::<1>(z),
                _mm512_extracti32x4_epi32::<2>(z),
                _mm512_extracti32x4_epi32::<3>(z),
            ];
            for (i, &y) in rows.iter().enumerate() {
                if r0 + i < MR {
                    let o = out.add((r0 + i) * n);
                    if full {
                        _mm_storeu_si128(o.cast(), y);
                    } else {
                        _mm_mask_storeu_epi8(o, cols.mask[0], y);
                    }
                }
            }
        }
    }

    /// What a block of columns needs of them: which lanes are columns, their bias,
    /// `Σ_k w` and requantization parameters; when every row has the same shift
    /// (`uniform`), `bias - shift · Σ_k w`, every row's first sums.
    struct Cols<const NV: usize> {
        mask: [__mmask16; NV],
        /// The columns of a two-vector block as one byte mask.
        mask32: __mmask32,
        bias: [__m512i; NV],
        colsum: [__m512i; NV],
        lanes: [block::Lanes; NV],
        uniform: bool,
        init: [__m512i; NV],
    }

    /// Every row of the columns `[j, j + 16 NV)` (the last vector's lanes past `n`
    /// left out).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn columns_requant<const NV: usize, const K: u8>(
        m: usize,
        j: usize,
        u: &[u8],
        ldu: usize,
        w: &PackedWeights,
        shifts: &[i32],
        bias: &[i32],
        rq: &RowRequantizer,
        out: &mut [std::mem::MaybeUninit<i8>],
    ) {
        let n = w.n;
        let quads = w.ldu() / 4;
        let mut mask = [0xffff as __mmask16; NV];
        let left = n - j - 16 * (NV - 1);
        mask[NV - 1] = ((1u32 << left.min(16)) - 1) as __mmask16;
        let mut cols = Cols {
            mask,
            mask32: mask[0] as __mmask32 | (mask[NV - 1] as __mmask32) << (16 * (NV - 1)),
            bias: [_mm512_setzero_si512(); NV],
            colsum: [_mm512_setzero_si512(); NV],
            lanes: [rq.lanes_for::<K>(j, mask[0]); NV],
            uniform: shifts[..m].iter().all(|&s| s == shifts[0]),
            init: [_mm512_setzero_si512(); NV],
        };
        let neg = _mm512_set1_epi32(0i32.wrapping_sub(shifts[0]));
        for (v, &mk) in mask.iter().enumerate() {
            let c = j + 16 * v;
            cols.bias[v] = _mm512_maskz_loadu_epi32(mk, bias.as_ptr().add(c));
            cols.colsum[v] = _mm512_maskz_loadu_epi32(mk, w.colsum.as_ptr().add(c));
            cols.lanes[v] = rq.lanes_for::<K>(c, mk);
            cols.init[v] = _mm512_add_epi32(cols.bias[v], _mm512_mullo_epi32(neg, cols.colsum[v]));
        }
        let k = rq.consts512();
        let (up, wp, sp) = (u.as_ptr(), w.quads.as_ptr().add(j * 4), shifts.as_ptr());
        let op = out.as_mut_ptr().cast::<i8>().add(j);
        let mut r = 0;
        // Eight rows keep enough independent sums in flight to cover `vpdpbusd`'s
        // latency when the block has one or two vectors of columns.
        while r + 8 <= m {
            let (ur, sr, or) = (up.add(r * ldu), sp.add(r), op.add(r * n));
            block_requant::<8, NV, K>(quads, ur, ldu, wp, n, sr, &cols, &k, or);
            r += 8;
        }
        if r + 4 <= m {
            let (ur, sr, or) = (up.add(r * ldu), sp.add(r), op.add(r * n));
            block_requant::<4, NV, K>(quads, ur, ldu, wp, n, sr, &cols, &k, or);
            r += 4;
        }
        let (ur, sr, or) = (up.add(r * ldu), sp.add(r), op.add(r * n));
        match m - r {
            3 => block_requant::<3, NV, K>(quads, ur, ldu, wp, n, sr, &cols, &k, or),
            2 => block_requant::<2, NV, K>(quads, ur, ldu, wp, n, sr, &cols, &k, or),
            1 => block_requant::<1, NV, K>(quads, ur, ldu, wp, n, sr, &cols, &k, or),
            _ => {}
        }
    }

    /// # Safety
    /// AVX512-VNNI, VL and BW must be present, `w` packed for them, `rq` of `form` with
    /// `n` channels; `u`, `shifts`, `bias` and `out` must hold what
    /// [`super::igemm_u8_requant`] checks.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn igemm_vnni_u8_requant(
        m: usize,
        u: &[u8],
        ldu: usize,
        w: &PackedWeights,
        shifts: &[i32],
        bias: &[i32],
        rq: &RowRequantizer,
        form: block::Form,
        out: &mut [std::mem::MaybeUninit<i8>],
    ) {
        match rq.consts512().kind(form) {
            block::FP32 => requant_all::<{ block::FP32 }>(m, u, ldu, w, shifts, bias, rq, out),
            block::TWO_STEP => {
                requant_all::<{ block::TWO_STEP }>(m, u, ldu, w, shifts, bias, rq, out)
            }
            block::FOLD_SIGNED => {
                requant_all::<{ block::FOLD_SIGNED }>(m, u, ldu, w, shifts, bias, rq, out)
            }
            _ => requant_all::<{ block::FOLD }>(m, u, ldu, w, shifts, bias, rq, out),
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn requant_all<const K: u8>(
        m: usize,
        u: &[u8],
        ldu: usize,
        w: &PackedWeights,
        shifts: &[i32],
        bias: &[i32],
        rq: &RowRequantizer,
        out: &mut [std::mem::MaybeUninit<i8>],
    ) {
        let n = w.n;
        let mut j = 0;
        while j + 32 <= n {
            columns_requant::<2, K>(m, j, u, ldu, w, shifts, bias, rq, out);
            j += 32;
        }
        // The last 1–31 columns: a 32-column block with a masked second vector, or
        // one (masked) vector.
        if j + 16 < n {
            columns_requant::<2, K>(m, j, u, ldu, w, shifts, bias, rq, out);
        } else if j < n {
            columns_requant::<1, K>(m, j, u, ldu, w, shifts, bias, rq, out);
        }
    }

    /// # Safety
    /// AVX2 must be present; `a` and `out` must hold what [`super::igemm`] checks.
    #[target_feature(enable = "avx2")]
    pub unsafe fn igemm(m: usize, a: &[i16], lda: usize, w: &PackedWeights, out: &mut [i32]) {
        let (n, pairs) = (w.n, w.lda() / 2);
        let (ap, wp, op) = (a.as_ptr(), w.data.as_ptr(), out.as_mut_ptr());
        let mut j = 0;
        while j + 16 <= n {
            columns::<2>(m, pairs, ap, lda, wp.add(j * 2), n, op.add(j));
            j += 16;
        }
        if j + 8 <= n {
            columns::<1>(m, pairs, ap, lda, wp.add(j * 2), n, op.add(j));
            j += 8;
        }
        if j < n {
            super::portable(m, a, lda, w, out, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_requantization_equals_the_product_then_rows() {
        use crate::kernels::rounding::{quantize_multiplier, ChannelMultipliers, Rounding};
        let mut seed = 29u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 16) as i32
        };
        let mut fused_ran = false;
        for &(m, k, n) in &[
            (1, 1, 1),
            (5, 7, 3),
            (9, 33, 16),
            (4, 64, 24),
            (13, 27, 32),
            (7, 70, 47),
            (32, 16, 96),
            (6, 40, 144),
        ] {
            let w: Vec<i8> = (0..k * n).map(|_| (next() % 256 - 128) as i8).collect();
            let packed = PackedWeights::pack(&w, k, n, false);
            let ldu = packed.ldu();
            let u: Vec<u8> = (0..m * ldu).map(|_| next() as u8).collect();
            let shifts: Vec<i32> = (0..m).map(|i| 128 + (i as i32 % 5) - 2).collect();
            let bias: Vec<i32> = (0..n).map(|_| next() % 20_000 - 10_000).collect();
            let scales: Vec<f64> = (0..n).map(|_| (1 + next() % 1000) as f64 * 1e-6).collect();
            // Scales above 1/2 shift left: gemmlowp's two-step form; a lower bound at
            // the zero point (a ReLU) drops the folded form's sign term.
            for ((zp, lo, hi), mult) in [(-3, -128, 100), (-3, -3, 127), (5, 5, 90)]
                .into_iter()
                .flat_map(|b| {
                    [
                        ChannelMultipliers::Quantized(
                            scales.iter().map(|&s| quantize_multiplier(s)).collect(),
                            Rounding::Double,
                        ),
                        ChannelMultipliers::Quantized(
                            scales
                                .iter()
                                .map(|&s| quantize_multiplier(s * 900.0))
                                .collect(),
                            Rounding::Double,
                        ),
                        ChannelMultipliers::Fp32(scales.iter().map(|&s| s as f32).collect()),
                        ChannelMultipliers::Double(scales.clone()),
                    ]
                    .map(|m| (b, m))
                })
            {
                let rq = RowRequantizer::new(mult, zp, lo, hi);
                let mut acc = vec![0i32; m * n];
                igemm_u8(m, &u, ldu, &packed, &shifts, &mut acc);
                let mut want = vec![0i8; m * n];
                rq.rows(&acc, &bias, &mut want);
                let mut got = vec![MaybeUninit::new(9i8); m * n];
                let fused = igemm_u8_requant(m, &u, ldu, &packed, &shifts, &bias, &rq, &mut got);
                assert_eq!(fused, requant_fused(&packed, &rq));
                // SAFETY: every element was initialized (to 9, or by the kernel).
                let got: Vec<i8> = got.iter().map(|v| unsafe { v.assume_init() }).collect();
                if fused {
                    fused_ran = true;
                    assert_eq!(got, want, "m={m} k={k} n={n}");
                } else {
                    assert!(got.iter().all(|&v| v == 9), "wrote without a fused kernel");
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        let vnni = super::super::vnni();
        #[cfg(not(target_arch = "x86_64"))]
        let vnni = false;
        assert_eq!(fused_ran, vnni, "the fused kernel runs with VNNI");
    }

    #[test]
    fn vector_and_scalar_paths_equal_the_plain_sum() {
        let mut seed = 11u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 16) as i32
        };
        for &(m, k, n, tr) in &[
            (1, 1, 1, false),
            (5, 7, 3, true),
            (9, 33, 41, false),
            (4, 64, 16, true),
            (13, 101, 25, false),
            (7, 70, 83, true),
            (6, 40, 96, false),
        ] {
            let w: Vec<i8> = (0..k * n).map(|_| (next() % 256 - 128) as i8).collect();
            let packed = PackedWeights::pack(&w, k, n, tr);
            let lda = packed.lda() + 2;
            let mut a = vec![0i16; m * lda];
            for i in 0..m {
                for kk in 0..k {
                    a[i * lda + kk] = (next() % 256 - 255) as i16;
                }
            }
            let mut fast = vec![7i32; m * n];
            igemm(m, &a, lda, &packed, &vec![255; m], &mut fast);
            let mut slow = vec![7i32; m * n];
            portable(m, &a, lda, &packed, &mut slow, 0);
            let ldu = packed.ldu() + 4;
            let mut u = vec![0u8; m * ldu];
            for i in 0..m {
                for kk in 0..ldu {
                    // Past `k` the bytes are anything: their weights are 0.
                    u[i * ldu + kk] = if kk < k {
                        (a[i * lda + kk] + 255) as u8
                    } else {
                        next() as u8
                    };
                }
            }
            let mut bytes = vec![7i32; m * n];
            igemm_u8(m, &u, ldu, &packed, &vec![255; m], &mut bytes);
            for i in 0..m {
                for j in 0..n {
                    let want: i32 = (0..k)
                        .map(|kk| {
                            let wv = if tr { w[j * k + kk] } else { w[kk * n + j] };
                            a[i * lda + kk] as i32 * wv as i32
                        })
                        .sum();
                    assert_eq!(fast[i * n + j], want, "m={m} k={k} n={n} ({i}, {j})");
                    assert_eq!(slow[i * n + j], want);
                    assert_eq!(bytes[i * n + j], want, "u8 m={m} k={k} n={n} ({i}, {j})");
                }
            }
        }
    }
}
