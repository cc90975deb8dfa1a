//! Float matrix product with the scalar kernels' exact arithmetic (see the module
//! above): `out[i][j] = Σ_kk a[i][kk] · b[kk][j]`, from 0.0, in `kk` order, each step
//! a fused multiply-add (`acc = a · b + acc`, one rounding). Blocks of 6 rows × 16
//! columns stay in AVX2 registers for the sum (12 accumulators, the two vectors of `b`
//! and a broadcast of `a`), with blocks of 4 rows for the rest (a 32-row tile is 6+6+6+6+4+4). `b`
//! is first copied into panels of 16 columns (then one of 8), so that each step of the
//! sum reads one contiguous 64-byte line of it. Sums of more than 256 terms run in
//! chunks of at most 256, each chunk over every panel before the next, the partial
//! sums waiting in `out` (the terms are added in the same order, so the bits are the
//! same): a chunk of a panel then stays in L1 across the row blocks.
//!
//! AVX-512 did not help here: on the AMD CPUs that have it, 512-bit multiplies and adds
//! run at no more lanes per cycle than 256-bit ones (a register-only loop measured 42
//! against 58 G products a second), and a 12-row block in AVX-512VL's 32 registers was
//! slower than this one (so was an 8 × 24 block, and a 6 × 16 one multiplying by
//! AVX-512's broadcast memory operands). Those were measured with a separate multiply
//! and add per step, before the kernels used FMA.

use std::mem::MaybeUninit;

/// How [`PackedB`]'s panels are laid out, which decides the kernels that read them.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Layout {
    /// Panels of 16 columns, then one of 8; the last `n % 8` columns as a `[k, n % 8]`
    /// matrix after them.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx2,
    /// `b` as it is (`[k, n]`).
    Portable,
}

/// `b` (`[k, n]`) copied into the layout the kernels of this CPU read; it owns its
/// copy, so it can outlive `b` (a plan's constant weights are packed once).
pub struct PackedB {
    k: usize,
    n: usize,
    layout: Layout,
    /// The panels start at `panels[start..]`, on a 64-byte boundary (a step of a
    /// 16-column panel is then one cache line rather than parts of two).
    panels: Vec<f32>,
    start: usize,
}

impl PackedB {
    pub fn new(b: &[f32], k: usize, n: usize) -> PackedB {
        PackedB::with_layout(b, k, n, default_layout())
    }

    fn with_layout(b: &[f32], k: usize, n: usize, layout: Layout) -> PackedB {
        assert!(b.len() >= k * n, "sgemm: b is too short");
        let mut panels = Vec::with_capacity(k * n + 16);
        let start = (64 - panels.as_ptr() as usize % 64) % 64 / 4;
        panels.resize(start, 0.0);
        let mut j = 0;
        match layout {
            Layout::Avx2 => {
                while j + 8 <= n {
                    let width = if j + 16 <= n { 16 } else { 8 };
                    for kk in 0..k {
                        panels.extend_from_slice(&b[kk * n + j..kk * n + j + width]);
                    }
                    j += width;
                }
            }
            Layout::Portable => {}
        }
        for kk in 0..k {
            panels.extend_from_slice(&b[kk * n + j..(kk + 1) * n]);
        }
        PackedB {
            k,
            n,
            layout,
            panels,
            start,
        }
    }

    /// The packed values (without the alignment padding before them).
    fn data(&self) -> &[f32] {
        &self.panels[self.start..]
    }

    /// The first column the vector panels do not cover, and the `[k, n - j0]` matrix of
    /// the columns from it on.
    fn rest(&self) -> (usize, &[f32]) {
        let j0 = match self.layout {
            Layout::Avx2 => self.n / 8 * 8,
            Layout::Portable => 0,
        };
        (j0, &self.data()[self.k * j0..])
    }
}

fn default_layout() -> Layout {
    #[cfg(target_arch = "x86_64")]
    {
        if super::avx2() {
            return Layout::Avx2;
        }
    }
    Layout::Portable
}

/// `out[i * n + j] = Σ_kk a[i * lda + kk] * b[kk * n + j]` for `i < m`, `j < n`. The
/// rows of `a` may overlap (`lda < k`).
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
    sgemm_packed_uninit_epi(m, a, lda, b, out, Epi::default())
}

/// What the product does to each output as it stores it: `+ bias[j]` (f32, rounded),
/// then the activation, as `nn`'s `BiasAdd` and `Relu`/`Relu6` kernels compute them
/// (`x < 0 → 0`, then `x > 6 → 6`; NaN and -0 pass through), so the bits are those of
/// the ops run one by one after the product.
#[derive(Clone, Copy, Default, Debug)]
pub struct Epi<'a> {
    /// `n` values.
    pub bias: Option<&'a [f32]>,
    /// 0: none, 1: ReLU, 2: ReLU6.
    pub act: u8,
}

impl Epi<'_> {
    #[inline(always)]
    fn scalar(&self, x: f32, j: usize) -> f32 {
        let x = match self.bias {
            Some(b) => x + b[j],
            None => x,
        };
        let y = if self.act != 0 && x < 0.0 { 0.0 } else { x };
        if self.act == 2 && y > 6.0 {
            6.0
        } else {
            y
        }
    }
}

/// [`sgemm_packed_uninit`], applying `epi` to each output as it is stored (while it
/// is still in a register, rather than in a pass over the outputs afterwards).
pub fn sgemm_packed_uninit_epi<'o>(
    m: usize,
    a: &[f32],
    lda: usize,
    b: &PackedB,
    out: &'o mut [MaybeUninit<f32>],
    epi: Epi,
) -> &'o mut [f32] {
    let (k, n) = (b.k, b.n);
    assert!(out.len() >= m * n, "sgemm: out is too short");
    assert!(
        epi.bias.is_none_or(|bias| bias.len() >= n) && epi.act <= 2,
        "sgemm: bad epilogue"
    );
    let out = &mut out[..m * n];
    if m > 0 && n > 0 {
        // `lda < k` is allowed: rows that overlap (a convolution's windows).
        assert!(a.len() >= (m - 1) * lda + k, "sgemm: a is too short");
        let op = out.as_mut_ptr() as *mut f32;
        match b.layout {
            // SAFETY: the layout was chosen for this CPU's features (or a test checked
            // them); the bounds were checked above and by PackedB::new.
            #[cfg(target_arch = "x86_64")]
            Layout::Avx2 => unsafe { x86::sgemm(m, a, lda, b, op, epi) },
            _ => {
                let (j0, rest) = b.rest();
                // SAFETY: `op` holds `m * n` elements (checked above).
                unsafe { portable(m, k, n, a, lda, rest, op, j0, epi) };
            }
        }
    }
    // SAFETY: every element was written above.
    unsafe { &mut *(out as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// The scalar loop over columns `j0..n` (what the vector kernels compute on the rest),
/// with `b` those columns (`[k, n - j0]`), writing `out` (which need not be
/// initialized) before reading it, then `epi` on them.
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
    epi: Epi,
) {
    let w = n - j0;
    for i in 0..m {
        let row = out.add(i * n + j0);
        for j in 0..w {
            row.add(j).write(0.0);
        }
        let o = std::slice::from_raw_parts_mut(row, w);
        let ar = &a[i * lda..i * lda + k];
        for (kk, &av) in ar.iter().enumerate() {
            let br = &b[kk * w..(kk + 1) * w];
            for (ov, &bv) in o.iter_mut().zip(br) {
                *ov = av.mul_add(bv, *ov);
            }
        }
        if epi.bias.is_some() || epi.act != 0 {
            for (j, ov) in o.iter_mut().enumerate() {
                *ov = epi.scalar(*ov, j0 + j);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Epi, PackedB};
    use std::arch::asm;
    use std::arch::x86_64::*;

    /// Sums longer than this run in chunks of at most this many terms, each chunk over
    /// every panel before the next (the partial sums wait in `out`, the order of the
    /// terms is the same): a chunk of a 16-column panel (16 KiB) and of 6 rows of `a`
    /// then stay in the 32 KiB L1 across the row blocks. 512 terms measured 10% slower.
    const KC: usize = 256;

    // The inner loops are written in assembly: compiled from intrinsics they spent an
    // address computation per row and step on top of the 2 loads, 6 broadcasts and
    // 24 multiplies and adds of a 6 × 16 step (48 against 54 G products a second on
    // one Zen 4 core from L1, when they were separate; a loop of the arithmetic alone
    // runs 58). With 12 FMAs a step the 6 × 16 loop runs 57-59 (peak 58.5), against
    // 53-54 for the same loop with a multiply and an add (interleaved runs). The
    // accumulators are ymm0-11, row `r` in ymm(NV·r)..; ymm12-13 hold the step's
    // vectors of `b`, ymm14 the broadcast of `a`. Rows 0-2 are addressed from {a0},
    // rows 3-5 from {a3} = {a0} + 3 {l} ({l}: lda in bytes).
    macro_rules! row_addr {
        (0, $o:literal) => {
            concat!("[{a0} + ", $o, "]")
        };
        (1, $o:literal) => {
            concat!("[{a0} + {l} + ", $o, "]")
        };
        (2, $o:literal) => {
            concat!("[{a0} + {l}*2 + ", $o, "]")
        };
        (3, $o:literal) => {
            concat!("[{a3} + ", $o, "]")
        };
        (4, $o:literal) => {
            concat!("[{a3} + {l} + ", $o, "]")
        };
        (5, $o:literal) => {
            concat!("[{a3} + {l}*2 + ", $o, "]")
        };
    }

    /// One row of a step: `acc = a[r] · b + acc`, rounded once.
    macro_rules! row_step {
        ($r:tt, $o:literal; $($c:literal / $bv:literal),+) => {
            concat!(
                "vbroadcastss ymm14, dword ptr ", row_addr!($r, $o), "\n",
                $(
                    "vfmadd231ps ", $c, ", ymm14, ", $bv, "\n",
                )+
            )
        };
    }

    /// One step (`a` at byte offset `$o` of each row, `b` at byte offset `$ob`).
    macro_rules! step {
        (6x2, $o:literal, $ob:literal, $ob1:literal) => {
            concat!(
                "vmovups ymm12, [{b} + ", $ob, "]\n",
                "vmovups ymm13, [{b} + ", $ob1, "]\n",
                row_step!(0, $o; "ymm0" / "ymm12", "ymm1" / "ymm13"),
                row_step!(1, $o; "ymm2" / "ymm12", "ymm3" / "ymm13"),
                row_step!(2, $o; "ymm4" / "ymm12", "ymm5" / "ymm13"),
                row_step!(3, $o; "ymm6" / "ymm12", "ymm7" / "ymm13"),
                row_step!(4, $o; "ymm8" / "ymm12", "ymm9" / "ymm13"),
                row_step!(5, $o; "ymm10" / "ymm12", "ymm11" / "ymm13"),
            )
        };
        (5x2, $o:literal, $ob:literal, $ob1:literal) => {
            concat!(
                "vmovups ymm12, [{b} + ", $ob, "]\n",
                "vmovups ymm13, [{b} + ", $ob1, "]\n",
                row_step!(0, $o; "ymm0" / "ymm12", "ymm1" / "ymm13"),
                row_step!(1, $o; "ymm2" / "ymm12", "ymm3" / "ymm13"),
                row_step!(2, $o; "ymm4" / "ymm12", "ymm5" / "ymm13"),
                row_step!(3, $o; "ymm6" / "ymm12", "ymm7" / "ymm13"),
                row_step!(4, $o; "ymm8" / "ymm12", "ymm9" / "ymm13"),
            )
        };
        (4x2, $o:literal, $ob:literal, $ob1:literal) => {
            concat!(
                "vmovups ymm12, [{b} + ", $ob, "]\n",
                "vmovups ymm13, [{b} + ", $ob1, "]\n",
                row_step!(0, $o; "ymm0" / "ymm12", "ymm1" / "ymm13"),
                row_step!(1, $o; "ymm2" / "ymm12", "ymm3" / "ymm13"),
                row_step!(2, $o; "ymm4" / "ymm12", "ymm5" / "ymm13"),
                row_step!(3, $o; "ymm6" / "ymm12", "ymm7" / "ymm13"),
            )
        };
        (6x1, $o:literal, $ob:literal, $ob1:literal) => {
            concat!(
                "vmovups ymm12, [{b} + ", $ob, "]\n",
                row_step!(0, $o; "ymm0" / "ymm12"),
                row_step!(1, $o; "ymm1" / "ymm12"),
                row_step!(2, $o; "ymm2" / "ymm12"),
                row_step!(3, $o; "ymm3" / "ymm12"),
                row_step!(4, $o; "ymm4" / "ymm12"),
                row_step!(5, $o; "ymm5" / "ymm12"),
            )
        };
        (5x1, $o:literal, $ob:literal, $ob1:literal) => {
            concat!(
                "vmovups ymm12, [{b} + ", $ob, "]\n",
                row_step!(0, $o; "ymm0" / "ymm12"),
                row_step!(1, $o; "ymm1" / "ymm12"),
                row_step!(2, $o; "ymm2" / "ymm12"),
                row_step!(3, $o; "ymm3" / "ymm12"),
                row_step!(4, $o; "ymm4" / "ymm12"),
            )
        };
        (4x1, $o:literal, $ob:literal, $ob1:literal) => {
            concat!(
                "vmovups ymm12, [{b} + ", $ob, "]\n",
                row_step!(0, $o; "ymm0" / "ymm12"),
                row_step!(1, $o; "ymm1" / "ymm12"),
                row_step!(2, $o; "ymm2" / "ymm12"),
                row_step!(3, $o; "ymm3" / "ymm12"),
            )
        };
    }

    /// `$name(k, a, lda, b, acc)`: adds the `k` steps of a `$mr` × `8 $nv` block to
    /// `acc` (`b` advancing by `32 $nv` bytes a step), two steps an iteration, then
    /// the odd one.
    macro_rules! sum_kernel {
        ($name:ident, $shape:tt, $mr:literal, $nv:literal, $b2:literal,
         $bo1:literal, $bo2:literal, $bo3:literal; $($reg:tt = [$r:tt][$v:tt]),+) => {
            #[target_feature(enable = "avx2,fma")]
            #[inline]
            unsafe fn $name(
                k: usize,
                a: *const f32,
                lda: usize,
                b: *const f32,
                acc: &mut [[__m256; $nv]; $mr],
            ) {
                asm!(
                    "test {n}, {n}",
                    "jz 3f",
                    ".p2align 4",
                    "2:",
                    step!($shape, "0", "0", $bo1),
                    step!($shape, "4", $bo2, $bo3),
                    "add {a0}, 8",
                    "add {a3}, 8",
                    concat!("add {b}, ", $b2),
                    "dec {n}",
                    "jnz 2b",
                    "3:",
                    "test {odd}, {odd}",
                    "jz 4f",
                    step!($shape, "0", "0", $bo1),
                    "4:",
                    n = inout(reg) k / 2 => _,
                    odd = in(reg) k % 2,
                    a0 = inout(reg) a => _,
                    a3 = inout(reg) a.wrapping_add(3 * lda) => _,
                    b = inout(reg) b => _,
                    l = in(reg) lda * 4,
                    $(inout($reg) acc[$r][$v],)+
                    out("ymm12") _,
                    out("ymm13") _,
                    out("ymm14") _,
                    options(nostack, readonly),
                );
            }
        };
    }

    sum_kernel!(sum6x2, 6x2, 6, 2, "128", "32", "64", "96";
        "ymm0" = [0][0], "ymm1" = [0][1], "ymm2" = [1][0], "ymm3" = [1][1], "ymm4" = [2][0], "ymm5" = [2][1],
        "ymm6" = [3][0], "ymm7" = [3][1], "ymm8" = [4][0], "ymm9" = [4][1], "ymm10" = [5][0], "ymm11" = [5][1]);
    sum_kernel!(sum5x2, 5x2, 5, 2, "128", "32", "64", "96";
        "ymm0" = [0][0], "ymm1" = [0][1], "ymm2" = [1][0], "ymm3" = [1][1], "ymm4" = [2][0],
        "ymm5" = [2][1], "ymm6" = [3][0], "ymm7" = [3][1], "ymm8" = [4][0], "ymm9" = [4][1]);
    sum_kernel!(sum4x2, 4x2, 4, 2, "128", "32", "64", "96";
        "ymm0" = [0][0], "ymm1" = [0][1], "ymm2" = [1][0], "ymm3" = [1][1],
        "ymm4" = [2][0], "ymm5" = [2][1], "ymm6" = [3][0], "ymm7" = [3][1]);
    sum_kernel!(sum6x1, 6x1, 6, 1, "64", "0", "32", "0";
        "ymm0" = [0][0], "ymm1" = [1][0], "ymm2" = [2][0], "ymm3" = [3][0], "ymm4" = [4][0], "ymm5" = [5][0]);
    sum_kernel!(sum5x1, 5x1, 5, 1, "64", "0", "32", "0";
        "ymm0" = [0][0], "ymm1" = [1][0], "ymm2" = [2][0], "ymm3" = [3][0], "ymm4" = [4][0]);
    sum_kernel!(sum4x1, 4x1, 4, 1, "64", "0", "32", "0";
        "ymm0" = [0][0], "ymm1" = [1][0], "ymm2" = [2][0], "ymm3" = [3][0]);

    /// Rows `[0, MR)` × columns `[0, 8 NV)` of the pointers' origins, over the `k`
    /// steps of `b` (which advances by `8 NV` a step, a panel), `out` by `ldo` a row.
    /// The sums start from `out`'s values when `resume` (a previous chunk's partial
    /// sums), else from zero. When `finish`, the epilogue is applied as they are
    /// stored: `bias` (null for none) holds the block's `8 NV` biases, `act` is
    /// [`super::Epi::act`].
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<const MR: usize, const NV: usize>(
        k: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        out: *mut f32,
        ldo: usize,
        resume: bool,
        finish: bool,
        bias: *const f32,
        act: u8,
    ) {
        /// Adds step `kk` of the sum to every accumulator.
        #[inline(always)]
        unsafe fn step<const MR: usize, const NV: usize>(
            acc: &mut [[__m256; NV]; MR],
            a: *const f32,
            lda: usize,
            b: *const f32,
            kk: usize,
        ) {
            let bp = b.add(kk * 8 * NV);
            let mut bv = [_mm256_setzero_ps(); NV];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(bp.add(8 * v));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let av = _mm256_set1_ps(*a.add(r * lda + kk));
                for (x, &w) in row.iter_mut().zip(&bv) {
                    *x = _mm256_fmadd_ps(av, w, *x);
                }
            }
        }
        let mut acc = [[_mm256_setzero_ps(); NV]; MR];
        if resume {
            for (r, row) in acc.iter_mut().enumerate() {
                for (v, x) in row.iter_mut().enumerate() {
                    *x = _mm256_loadu_ps(out.add(r * ldo + 8 * v));
                }
            }
        }
        // Each arm casts `acc` to the array type its sizes make it.
        let p = acc.as_mut_ptr();
        match (MR, NV) {
            (6, 2) => sum6x2(k, a, lda, b, &mut *p.cast()),
            (5, 2) => sum5x2(k, a, lda, b, &mut *p.cast()),
            (4, 2) => sum4x2(k, a, lda, b, &mut *p.cast()),
            (6, 1) => sum6x1(k, a, lda, b, &mut *p.cast()),
            (5, 1) => sum5x1(k, a, lda, b, &mut *p.cast()),
            (4, 1) => sum4x1(k, a, lda, b, &mut *p.cast()),
            _ => {
                for kk in 0..k {
                    step(&mut acc, a, lda, b, kk);
                }
            }
        }
        let zero = _mm256_setzero_ps();
        let six = _mm256_set1_ps(6.0);
        for (r, row) in acc.iter().enumerate() {
            for (v, &x) in row.iter().enumerate() {
                let mut y = x;
                if finish {
                    if !bias.is_null() {
                        y = _mm256_add_ps(y, _mm256_loadu_ps(bias.add(8 * v)));
                    }
                    // `max(0, y)` is `0 > y ? 0 : y` and `min(6, y)` is `6 < y ? 6 : y`:
                    // NaN and -0 pass through, as in the scalar selects.
                    if act != 0 {
                        y = _mm256_max_ps(zero, y);
                    }
                    if act == 2 {
                        y = _mm256_min_ps(six, y);
                    }
                }
                _mm256_storeu_ps(out.add(r * ldo + 8 * v), y);
            }
        }
    }

    /// All `m` rows of one panel: blocks of 6 rows, then at most one of 5, then of 4,
    /// so that no block of 1-3 rows is left when `m` is 8 or more: a 32-row tile is
    /// 6+6+6+6+4+4, 63 rows (a TextCNN's 2-wide filter over 64 steps) 6·9+5+4, 61 rows
    /// 6·8+5+4+4. A block of fewer than 4 rows keeps fewer than the 8 sums in flight
    /// that the FMA units need (2 a cycle, 4 cycles each): a 1-row block runs at a
    /// quarter of the speed.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn columns<const NV: usize>(
        m: usize,
        k: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        out: *mut f32,
        ldo: usize,
        resume: bool,
        finish: bool,
        bias: *const f32,
        act: u8,
    ) {
        // Blocks of 6, then of 5 and 4: 6q + 1 as 6(q - 2) + 5 + 4 + 4, 6q + 2 as
        // 6(q - 1) + 4 + 4, 6q + 3 as 6(q - 1) + 5 + 4, 6q + 5 as 6q + 5.
        let q = m / 6;
        let (sixes, fives) = match m % 6 {
            1 if q >= 2 => (q - 2, 1),
            2 if q >= 1 => (q - 1, 0),
            3 if q >= 1 => (q - 1, 1),
            5 => (q, 1),
            _ => (q, 0),
        };
        let mut r = 0;
        while r < 6 * sixes {
            let (a, out) = (a.add(r * lda), out.add(r * ldo));
            block::<6, NV>(k, a, lda, b, out, ldo, resume, finish, bias, act);
            r += 6;
        }
        if fives == 1 {
            let (a, out) = (a.add(r * lda), out.add(r * ldo));
            block::<5, NV>(k, a, lda, b, out, ldo, resume, finish, bias, act);
            r += 5;
        }
        while r + 4 <= m {
            let (a, out) = (a.add(r * lda), out.add(r * ldo));
            block::<4, NV>(k, a, lda, b, out, ldo, resume, finish, bias, act);
            r += 4;
        }
        let (a, out) = (a.add(r * lda), out.add(r * ldo));
        match m - r {
            3 => block::<3, NV>(k, a, lda, b, out, ldo, resume, finish, bias, act),
            2 => block::<2, NV>(k, a, lda, b, out, ldo, resume, finish, bias, act),
            1 => block::<1, NV>(k, a, lda, b, out, ldo, resume, finish, bias, act),
            _ => {}
        }
    }

    /// # Safety
    /// AVX2 and FMA must be present; `a`, `b` and `op` (`m * n` elements, written, never read
    /// before) must hold what [`super::sgemm_packed_uninit`] checks, with `b` packed
    /// for AVX2.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn sgemm(m: usize, a: &[f32], lda: usize, b: &PackedB, op: *mut f32, epi: Epi) {
        let (k, n) = (b.k, b.n);
        let ap = a.as_ptr();
        let bias = |j: usize| epi.bias.map_or(std::ptr::null(), |b| b[j..].as_ptr());
        let chunks = k.div_ceil(KC).max(1);
        let kc = k.div_ceil(chunks);
        for c in 0..chunks {
            let k0 = c * kc;
            let len = kc.min(k - k0);
            let (resume, finish) = (c > 0, c + 1 == chunks);
            let ak = ap.add(k0);
            let mut panel = b.data().as_ptr();
            let mut j = 0;
            while j + 16 <= n {
                let (pb, bj, oj) = (panel.add(16 * k0), bias(j), op.add(j));
                columns::<2>(m, len, ak, lda, pb, oj, n, resume, finish, bj, epi.act);
                panel = panel.add(16 * k);
                j += 16;
            }
            if j + 8 <= n {
                let (pb, bj, oj) = (panel.add(8 * k0), bias(j), op.add(j));
                columns::<1>(m, len, ak, lda, pb, oj, n, resume, finish, bj, epi.act);
            }
        }
        if n % 8 != 0 {
            let (j0, rest) = b.rest();
            tail(m, k, n, a, lda, rest, op, j0, epi);
        }
    }

    /// The last `n - j0` (< 8) columns, as [`super::portable`] sums them, with the columns
    /// in the lanes of one masked vector and 4 rows at a time: a narrow product (a
    /// classifier's FullyConnected to 4 classes) is then not one scalar chain per output.
    ///
    /// # Safety
    /// AVX2 and FMA must be present; as for [`super::portable`], with `rest` the
    /// `[k, n - j0]` columns.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tail(
        m: usize,
        k: usize,
        n: usize,
        a: &[f32],
        lda: usize,
        rest: &[f32],
        op: *mut f32,
        j0: usize,
        epi: Epi,
    ) {
        let w = n - j0;
        debug_assert!(w > 0 && w < 8 && rest.len() >= k * w);
        let lanes: [i32; 8] = std::array::from_fn(|l| if l < w { -1 } else { 0 });
        let mask = _mm256_loadu_si256(lanes.as_ptr() as *const __m256i);
        let (ap, bp) = (a.as_ptr(), rest.as_ptr());
        let store = |i: usize, acc: __m256| {
            let row = op.add(i * n + j0);
            _mm256_maskstore_ps(row, mask, acc);
            if epi.bias.is_some() || epi.act != 0 {
                for j in 0..w {
                    *row.add(j) = epi.scalar(*row.add(j), j0 + j);
                }
            }
        };
        let mut i = 0;
        while i + 4 <= m {
            let mut acc = [_mm256_setzero_ps(); 4];
            for kk in 0..k {
                let bv = _mm256_maskload_ps(bp.add(kk * w), mask);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let av = _mm256_broadcast_ss(&*ap.add((i + r) * lda + kk));
                    *acc = _mm256_fmadd_ps(av, bv, *acc);
                }
            }
            for (r, &acc) in acc.iter().enumerate() {
                store(i + r, acc);
            }
            i += 4;
        }
        while i < m {
            let mut acc = _mm256_setzero_ps();
            for kk in 0..k {
                let bv = _mm256_maskload_ps(bp.add(kk * w), mask);
                let av = _mm256_broadcast_ss(&*ap.add(i * lda + kk));
                acc = _mm256_fmadd_ps(av, bv, acc);
            }
            store(i, acc);
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Kernel = unsafe fn(usize, &[f32], usize, &PackedB, *mut f32, Epi);

    /// `BiasAdd` then `Relu` / `Relu6` as nn's element-wise kernels compute them.
    fn reference_epilogue(x: f32, bias: Option<f32>, act: u8) -> f32 {
        let x = bias.map_or(x, |b| x + b);
        match act {
            0 => x,
            1 => {
                if x < 0.0 {
                    0.0
                } else {
                    x
                }
            }
            _ => {
                let y = if x < 0.0 { 0.0 } else { x };
                if y > 6.0 {
                    6.0
                } else {
                    y
                }
            }
        }
    }

    #[test]
    fn vector_and_scalar_paths_agree_bit_for_bit() {
        let mut seed = 7u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut kernels: Vec<(&str, Kernel)> = Vec::new();
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            kernels.push(("avx2", x86::sgemm));
        }
        for &(m, k, n) in &[
            (1, 1, 1),
            (5, 7, 3),
            (9, 33, 41),
            (4, 64, 16),
            (13, 100, 25),
            (17, 20, 48),
            (8, 9, 24),
            (35, 40, 71),
            (24, 12, 16),
            (16, 0, 20),
            (15, 300, 41),
            // Sums in chunks (more than 256 terms), 32 rows as 6+6+6+6+4+4.
            (32, 520, 40),
            (8, 257, 16),
            (11, 600, 24),
            (7, 769, 8),
            // 6·9+5+4, 6·8+5+4+4, 5, 5+4+4, 6+5+4+4, 5+4.
            (63, 40, 24),
            (61, 300, 16),
            (5, 20, 8),
            (13, 9, 24),
            (19, 30, 17),
            (9, 11, 40),
        ] {
            let lda = k + 3;
            let a: Vec<f32> = (0..m * lda).map(|_| next()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| next() * 1e2).collect();
            // Biases around the sums' range, with the special values the selects
            // must pass through.
            let bias: Vec<f32> = (0..n)
                .map(|j| match j % 11 {
                    3 => f32::NAN,
                    5 => -0.0,
                    7 => 0.0,
                    _ => next() * 40.0,
                })
                .collect();
            let mut sums = vec![f32::NAN; m * n];
            unsafe {
                portable(m, k, n, &a, lda, &b, sums.as_mut_ptr(), 0, Epi::default());
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let packed = PackedB::with_layout(&b, k, n, Layout::Avx2);
            let portable_packed = PackedB::with_layout(&b, k, n, Layout::Portable);
            for (with_bias, act) in [(false, 0), (true, 0), (true, 1), (true, 2), (false, 2)] {
                let epi = Epi {
                    bias: with_bias.then_some(&bias[..]),
                    act,
                };
                let want: Vec<f32> = sums
                    .iter()
                    .enumerate()
                    .map(|(i, &x)| reference_epilogue(x, with_bias.then(|| bias[i % n]), act))
                    .collect();
                let what = format!("m={m} k={k} n={n} bias={with_bias} act={act}");
                let mut got = vec![f32::NAN; m * n];
                let out =
                    unsafe { &mut *(got.as_mut_slice() as *mut [f32] as *mut [MaybeUninit<f32>]) };
                sgemm_packed_uninit_epi(m, &a, lda, &portable_packed, out, epi);
                assert_eq!(bits(&got), bits(&want), "portable {what}");
                for &(name, kernel) in &kernels {
                    // One more row than the product, to catch a store past the end.
                    let mut got = vec![f32::NAN; (m + 1) * n];
                    unsafe { kernel(m, &a, lda, &packed, got.as_mut_ptr(), epi) };
                    assert_eq!(bits(&got[..m * n]), bits(&want), "{name} {what}");
                    assert!(
                        got[m * n..].iter().all(|x| x.is_nan()),
                        "{name}: wrote past the end"
                    );
                }
            }
            let mut got = vec![f32::NAN; m * n];
            sgemm(m, k, n, &a, lda, &b, &mut got);
            assert_eq!(bits(&got), bits(&sums), "default m={m} k={k} n={n}");
        }
    }
}
