//! Register-block forms of [`RowRequantizer`] for kernels that requantize their
//! accumulators while they are still in registers (the AVX-512 int8 products and
//! depthwise convolution): sixteen channels per 512-bit vector, with the operations
//! of [`RowRequantizer::row`]'s vector path, so with the bits of
//! [`RowRequantizer::apply`] (the tests below compare them on random and
//! rounding-boundary accumulators). A kernel loads a block of columns' parameters
//! once ([`RowRequantizer::lanes512`]) and applies them to every row of the block
//! ([`requantize512`], [`store16`]).

use super::{ChannelMultipliers, Rounding, RowRequantizer};
use std::arch::x86_64::*;

/// Which requantization a register block runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// gemmlowp's (double rounding): the reference convolutions.
    Gemmlowp,
    /// XNNPACK's f32 scale, rounded to even.
    Fp32,
}

/// The broadcast constants of a requantizer.
#[derive(Clone, Copy)]
pub struct Consts {
    zp: __m512i,
    lo: __m512i,
    hi: __m512i,
    round: __m512i,
    one: __m512i,
    flo: __m512,
    fhi: __m512,
    /// Whether some channel shifts left before its multiplier (gemmlowp's form).
    left: bool,
    /// Whether the lanes hold the folded form (`RowRequantizer::fold`).
    fold: bool,
    /// 2^31 in 64-bit lanes (the folded form's sign term).
    sign: __m512i,
    /// Whether the lower bound is below the zero point (else the folded form may
    /// leave out its sign term).
    signed: bool,
    /// Whether the bounds are narrower than int8 (else the saturating store clamps).
    clamp: bool,
    /// The bounds saturated to int8, in every byte ([`pack64`]'s clamp).
    lo8: __m512i,
    hi8: __m512i,
}

/// The requantization a kernel runs in its loops, fixed at compile time so that no
/// branch on the parameters is left there ([`Consts::kind`]).
pub const FP32: u8 = 0;
/// gemmlowp's two roundings ([`RowRequantizer::fold`] does not hold).
pub const TWO_STEP: u8 = 1;
/// The folded form with its sign term (the lower bound is below the zero point).
pub const FOLD_SIGNED: u8 = 2;
/// The folded form without it.
pub const FOLD: u8 = 3;

impl Consts {
    /// Which of [`FP32`], [`TWO_STEP`], [`FOLD_SIGNED`], [`FOLD`] the requantizer of
    /// `form` runs ([`requant16`]'s `K`).
    pub fn kind(&self, form: Form) -> u8 {
        match form {
            Form::Fp32 => FP32,
            Form::Gemmlowp if !self.fold => TWO_STEP,
            Form::Gemmlowp if self.signed => FOLD_SIGNED,
            Form::Gemmlowp => FOLD,
        }
    }
}

/// Sixteen channels' parameters: for [`Form::Gemmlowp`] the left shift, `q`, `q` of
/// the odd lanes moved to the even ones, the right shift, its mask and mask / 2, or
/// in the folded form `q`, the odd `q`, then for the even and the odd channels in
/// 64-bit lanes the rounding constant (zero point included) and the total shift;
/// for [`Form::Fp32`] the scales' bits in `p[0]`.
#[derive(Clone, Copy)]
pub struct Lanes {
    p: [__m512i; 6],
}

impl RowRequantizer {
    /// The register-block form of this requantizer, when its parameters take the
    /// vector path (the double-precision form of the reference FULLY_CONNECTED has
    /// none).
    pub fn block_form(&self) -> Option<Form> {
        if !self.vector {
            return None;
        }
        match &self.mult {
            ChannelMultipliers::Quantized(_, Rounding::Double) => Some(Form::Gemmlowp),
            ChannelMultipliers::Fp32(_) => Some(Form::Fp32),
            _ => None,
        }
    }

    /// How many channels the requantizer has.
    pub fn channels(&self) -> usize {
        match &self.mult {
            ChannelMultipliers::Quantized(m, _) => m.len(),
            ChannelMultipliers::Double(m) => m.len(),
            ChannelMultipliers::Fp32(m) => m.len(),
        }
    }

    /// This requantizer with its channels reordered: channel `p` of the result is
    /// channel `from[p]` of this one (for kernels whose register lanes hold the
    /// channels in another order).
    pub fn permuted(&self, from: &[usize]) -> RowRequantizer {
        let mult = match &self.mult {
            ChannelMultipliers::Quantized(m, r) => {
                ChannelMultipliers::Quantized(from.iter().map(|&c| m[c]).collect(), *r)
            }
            ChannelMultipliers::Double(m) => {
                ChannelMultipliers::Double(from.iter().map(|&c| m[c]).collect())
            }
            ChannelMultipliers::Fp32(m) => {
                ChannelMultipliers::Fp32(from.iter().map(|&c| m[c]).collect())
            }
        };
        RowRequantizer::new(mult, self.zero_point, self.lo, self.hi)
    }

    /// # Safety
    /// AVX-512F must be present.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn consts512(&self) -> Consts {
        Consts {
            zp: _mm512_set1_epi32(self.zero_point),
            lo: _mm512_set1_epi32(self.lo),
            hi: _mm512_set1_epi32(self.hi),
            round: _mm512_set1_epi64(1 << 30),
            one: _mm512_set1_epi32(1),
            flo: _mm512_set1_ps(self.lo.wrapping_sub(self.zero_point) as f32),
            fhi: _mm512_set1_ps(self.hi.wrapping_sub(self.zero_point) as f32),
            left: self.any_left,
            fold: self.fold,
            sign: _mm512_set1_epi64(1 << 31),
            signed: self.lo < self.zero_point,
            clamp: self.lo > -128 || self.hi < 127,
            lo8: _mm512_set1_epi8(self.lo.clamp(-128, 127) as i8),
            hi8: _mm512_set1_epi8(self.hi.clamp(-128, 127) as i8),
        }
    }

    /// The parameters of channels `[c, c + 16)`, of those lanes that `mask` selects.
    ///
    /// # Safety
    /// AVX-512F must be present, [`RowRequantizer::block_form`] must be `Some` of the
    /// form `FP32` names, and every selected channel below [`RowRequantizer::channels`].
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn lanes512<const FP32: bool>(&self, c: usize, mask: __mmask16) -> Lanes {
        let ld = |v: &[i32]| _mm512_maskz_loadu_epi32(mask, v.as_ptr().add(c));
        let zero = _mm512_setzero_si512();
        if FP32 {
            let ChannelMultipliers::Fp32(m) = &self.mult else {
                return Lanes { p: [zero; 6] };
            };
            let s = _mm512_castps_si512(_mm512_maskz_loadu_ps(mask, m.as_ptr().add(c)));
            return Lanes {
                p: [s, zero, zero, zero, zero, zero],
            };
        }
        let q = ld(&self.q);
        if self.fold {
            // The channel's `r = right` in 64-bit lanes: `2^30 + 2^(30 + r) + zp · 2^(31 + r)`
            // and `31 + r`.
            let r = ld(&self.right);
            let (re, ro) = (
                _mm512_and_si512(r, _mm512_set1_epi64(0xffff_ffff)),
                _mm512_srli_epi64::<32>(r),
            );
            let half = _mm512_set1_epi64(1 << 30);
            let zp = _mm512_set1_epi64(self.zero_point as i64);
            let shift = |r: __m512i| _mm512_add_epi64(r, _mm512_set1_epi64(31));
            let round = |r: __m512i| {
                _mm512_add_epi64(
                    _mm512_add_epi64(half, _mm512_sllv_epi64(half, r)),
                    _mm512_sllv_epi64(zp, shift(r)),
                )
            };
            return Lanes {
                p: [
                    q,
                    _mm512_srli_epi64::<32>(q),
                    round(re),
                    round(ro),
                    shift(re),
                    shift(ro),
                ],
            };
        }
        Lanes {
            p: [
                ld(&self.left),
                q,
                _mm512_srli_epi64::<32>(q),
                ld(&self.right),
                ld(&self.mask),
                ld(&self.half),
            ],
        }
    }
}

impl RowRequantizer {
    /// [`RowRequantizer::lanes512`] for the kernel kind `K` ([`Consts::kind`]).
    ///
    /// # Safety
    /// As for [`RowRequantizer::lanes512`], with `K` of this requantizer.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn lanes_for<const K: u8>(&self, c: usize, mask: __mmask16) -> Lanes {
        if K == FP32 {
            self.lanes512::<true>(c, mask)
        } else {
            self.lanes512::<false>(c, mask)
        }
    }
}

/// [`requantize512`] of the kind `K` ([`Consts::kind`]) without the clamp to the
/// bounds: [`pack64`] saturates and clamps four of these at once.
///
/// # Safety
/// AVX-512F must be present; `k` and `l` come from the same requantizer, `l` by
/// [`RowRequantizer::lanes_for`]`::<K>`, and `K` is `k.kind(..)` of its form.
#[inline]
#[target_feature(enable = "avx512f")]
pub unsafe fn requant16<const K: u8>(k: &Consts, l: &Lanes, x: __m512i) -> __m512i {
    match K {
        FP32 => {
            let v = _mm512_mul_ps(_mm512_cvtepi32_ps(x), _mm512_castsi512_ps(l.p[0]));
            let v = _mm512_min_ps(_mm512_max_ps(v, k.flo), k.fhi);
            let v =
                _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
            _mm512_add_epi32(v, k.zp)
        }
        FOLD_SIGNED | FOLD => {
            // As in `requantize512`.
            let [q, q_odd, round_e, round_o, shift_e, shift_o] = l.p;
            let pe = _mm512_mul_epi32(x, q);
            let po = _mm512_mul_epi32(_mm512_srli_epi64::<32>(x), q_odd);
            let (mut te, mut to) = (_mm512_add_epi64(pe, round_e), _mm512_add_epi64(po, round_o));
            if K == FOLD_SIGNED {
                let zero = _mm512_setzero_si512();
                te = _mm512_mask_sub_epi64(te, _mm512_cmplt_epi64_mask(pe, zero), te, k.sign);
                to = _mm512_mask_sub_epi64(to, _mm512_cmplt_epi64_mask(po, zero), to, k.sign);
            }
            let (ye, yo) = (
                _mm512_srav_epi64(te, shift_e),
                _mm512_srav_epi64(to, shift_o),
            );
            _mm512_mask_shuffle_epi32::<0b1010_0000>(ye, 0xaaaa, yo)
        }
        _ => {
            let c = Consts { clamp: false, ..*k };
            requantize512::<false>(&c, l, x)
        }
    }
}

/// Four vectors of [`requant16`] values as 64 int8, saturated and clamped to the
/// requantizer's bounds: dword `4 L + j` of the result holds dword `L` (lanes
/// `4 L..4 L + 4`) of vector `j`, the order of the pack instructions.
///
/// # Safety
/// AVX-512F and AVX-512BW must be present.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn pack64(k: &Consts, v: [__m512i; 4]) -> __m512i {
    let z = _mm512_packs_epi16(
        _mm512_packs_epi32(v[0], v[1]),
        _mm512_packs_epi32(v[2], v[3]),
    );
    // Without a branch: for bounds as wide as int8 the clamp changes nothing.
    _mm512_min_epi8(_mm512_max_epi8(z, k.lo8), k.hi8)
}

/// The requantized values of sixteen accumulators `x` (bias included), clamped to
/// the requantizer's bounds where they are narrower than int8; [`store16`]
/// saturates to int8.
///
/// # Safety
/// AVX-512F must be present; `k` and `l` come from the same requantizer, `l` by
/// `lanes512::<FP32>`.
#[inline]
#[target_feature(enable = "avx512f")]
pub unsafe fn requantize512<const FP32: bool>(k: &Consts, l: &Lanes, x: __m512i) -> __m512i {
    if FP32 {
        let v = _mm512_mul_ps(_mm512_cvtepi32_ps(x), _mm512_castsi512_ps(l.p[0]));
        let v = _mm512_min_ps(_mm512_max_ps(v, k.flo), k.fhi);
        let v = _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
        // Within `[lo, hi]` already, by the clamp before the rounding.
        return _mm512_add_epi32(v, k.zp);
    }
    if k.fold {
        // gemmlowp's `RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(x, q), r)`
        // with `r ≥ 1`, plus the zero point, is `⌊(x·q + 2^30 + (2^(r-1) - s) · 2^31 +
        // zp · 2^(31+r)) / 2^(31+r)⌋` with `s = [x < 0]` (the inner rounding's floor
        // folds into the outer one; with `x·q` in `[-2^30, 0)` both give 0), exact in
        // i64 by the bound `RowRequantizer::fold` checked. Its low 32 bits are the
        // wrapping sum of the two-step form.
        let [q, q_odd, round_e, round_o, shift_e, shift_o] = l.p;
        let zero = _mm512_setzero_si512();
        let pe = _mm512_mul_epi32(x, q);
        let po = _mm512_mul_epi32(_mm512_srli_epi64::<32>(x), q_odd);
        let (te, to) = (_mm512_add_epi64(pe, round_e), _mm512_add_epi64(po, round_o));
        // Where the lower bound is at least the zero point, `s` does not matter:
        // with `x < 0` both forms give at most the zero point, clamped to `lo`.
        let (te, to) = if k.signed {
            (
                _mm512_mask_sub_epi64(te, _mm512_cmplt_epi64_mask(pe, zero), te, k.sign),
                _mm512_mask_sub_epi64(to, _mm512_cmplt_epi64_mask(po, zero), to, k.sign),
            )
        } else {
            (te, to)
        };
        let (ye, yo) = (
            _mm512_srav_epi64(te, shift_e),
            _mm512_srav_epi64(to, shift_o),
        );
        // The odd channels' low halves into the high halves of their lanes.
        let v = _mm512_mask_shuffle_epi32::<0b1010_0000>(ye, 0xaaaa, yo);
        return if k.clamp {
            _mm512_min_epi32(_mm512_max_epi32(v, k.lo), k.hi)
        } else {
            v
        };
    }
    let [left, q, q_odd, right, mask, half] = l.p;
    let a = if k.left {
        _mm512_sllv_epi32(x, left)
    } else {
        x
    };
    // gemmlowp's saturating rounding doubling high multiply, as in `row_x86::srdhm`:
    // bits 31..62 of each 64-bit `a · q + 2^30`, which a right shift by 31 puts in the
    // low half of an even lane and a left shift by 1 in the high half of an odd one.
    let even = _mm512_add_epi64(_mm512_mul_epi32(a, q), k.round);
    let odd = _mm512_add_epi64(_mm512_mul_epi32(_mm512_srli_epi64::<32>(a), q_odd), k.round);
    let even = _mm512_srli_epi64::<31>(even);
    let odd = _mm512_slli_epi64::<1>(odd);
    let x = _mm512_mask_blend_epi32(0xaaaa, even, odd);
    // The rounding right shift, half away from zero.
    let rem = _mm512_and_si512(x, mask);
    let threshold = _mm512_sub_epi32(half, _mm512_srai_epi32::<31>(x));
    let up = _mm512_cmpgt_epi32_mask(rem, threshold);
    let v = _mm512_srav_epi32(x, right);
    let v = _mm512_add_epi32(_mm512_mask_add_epi32(v, up, v, k.one), k.zp);
    if k.clamp {
        _mm512_min_epi32(_mm512_max_epi32(v, k.lo), k.hi)
    } else {
        v
    }
}

/// Stores the lanes of `v` that `mask` selects as int8 (saturating) at `out`.
///
/// # Safety
/// AVX-512F must be present and `out` valid for the selected bytes.
#[inline]
#[target_feature(enable = "avx512f")]
pub unsafe fn store16(out: *mut i8, mask: __mmask16, v: __m512i) {
    if mask == 0xffff {
        // The narrowing store to memory is several times slower than narrowing in a
        // register and storing that.
        _mm_storeu_si128(out.cast(), _mm512_cvtsepi32_epi8(v));
    } else {
        _mm512_mask_cvtsepi32_storeu_epi8(out, mask, v);
    }
}

#[cfg(test)]
mod tests {
    use super::super::row_tests::{accumulators, rng};
    use super::super::{quantize_multiplier, ChannelMultipliers, Rounding, RowRequantizer};
    use super::*;

    /// Requantizes `accs` as rows of `channels` through the register-block form and
    /// compares every byte with [`RowRequantizer::apply`], and checks that the masked
    /// stores write nothing past the row.
    fn check(mult: ChannelMultipliers, channels: usize, zp: i32, lo: i32, hi: i32, accs: &[i32]) {
        let r = RowRequantizer::new(mult, zp, lo, hi);
        let form = r.block_form().expect("a register-block form");
        let bias: Vec<i32> = (0..channels as i32)
            .map(|c| (c * 7919) % 301 - 150)
            .collect();
        let mut out = vec![0x55u8 as i8; channels + 16];
        for chunk in accs.chunks_exact(channels) {
            // SAFETY: the caller checked AVX-512F; the lanes are below `channels`
            // and the stores within `out`.
            unsafe {
                let k = r.consts512();
                for c in (0..channels).step_by(16) {
                    let mask = ((1u32 << (channels - c).min(16)) - 1) as __mmask16;
                    let ld = |v: &[i32]| _mm512_maskz_loadu_epi32(mask, v.as_ptr().add(c));
                    let x = _mm512_add_epi32(ld(chunk), ld(&bias));
                    let v = match form {
                        Form::Gemmlowp => {
                            requantize512::<false>(&k, &r.lanes512::<false>(c, mask), x)
                        }
                        Form::Fp32 => requantize512::<true>(&k, &r.lanes512::<true>(c, mask), x),
                    };
                    store16(out.as_mut_ptr().add(c), mask, v);
                }
            }
            for c in 0..channels {
                let want = r.apply(chunk[c].wrapping_add(bias[c]), c);
                assert_eq!(out[c], want, "{form:?} acc {} channel {c}", chunk[c]);
            }
            if std::arch::is_x86_feature_detected!("avx512bw") {
                // SAFETY: as above, and AVX-512BW is present.
                let packed = unsafe { packed_kind(&r, form, chunk, &bias) };
                for c in 0..channels.min(64) {
                    let (j, l) = (c / 16, c % 16);
                    let want = r.apply(chunk[c].wrapping_add(bias[c]), c);
                    let got = packed[16 * (l / 4) + 4 * j + l % 4];
                    assert_eq!(got, want, "packed {form:?} acc {} channel {c}", chunk[c]);
                }
            }
            assert!(
                out[channels..].iter().all(|&b| b == 0x55),
                "stored past the row"
            );
        }
    }

    /// The first (up to) 64 channels of `chunk` plus `bias` through [`requant16`] of
    /// the requantizer's kind and [`pack64`], in the packed byte order.
    ///
    /// # Safety
    /// AVX-512F and AVX-512BW must be present.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn packed_kind(r: &RowRequantizer, form: Form, chunk: &[i32], bias: &[i32]) -> [i8; 64] {
        let k = r.consts512();
        let kind = k.kind(form);
        assert_eq!(
            kind == TWO_STEP,
            form == Form::Gemmlowp && !r.fold,
            "the two-step kind where the form does not fold"
        );
        let mut v = [_mm512_setzero_si512(); 4];
        for (j, x) in v.iter_mut().enumerate() {
            let c = 16 * j;
            if c >= chunk.len() {
                break;
            }
            let mask = ((1u32 << (chunk.len() - c).min(16)) - 1) as __mmask16;
            let ld = |v: &[i32]| _mm512_maskz_loadu_epi32(mask, v.as_ptr().add(c));
            let acc = _mm512_add_epi32(ld(chunk), ld(bias));
            *x = match kind {
                FP32 => requant16::<FP32>(&k, &r.lanes_for::<FP32>(c, mask), acc),
                TWO_STEP => requant16::<TWO_STEP>(&k, &r.lanes_for::<TWO_STEP>(c, mask), acc),
                FOLD_SIGNED => {
                    requant16::<FOLD_SIGNED>(&k, &r.lanes_for::<FOLD_SIGNED>(c, mask), acc)
                }
                _ => requant16::<FOLD>(&k, &r.lanes_for::<FOLD>(c, mask), acc),
            };
        }
        let mut out = [0i8; 64];
        _mm512_storeu_si512(out.as_mut_ptr().cast(), pack64(&k, v));
        out
    }

    #[test]
    fn register_blocks_equal_the_scalar_requantization() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            eprintln!("no AVX-512F on this CPU: the register-block forms cannot run here");
            return;
        }
        let mut next = rng(0x2545_f491_4f6c_dd1d);
        let channels = 27; // a whole vector and a masked one
        let accs = accumulators(&mut next, 40_000);
        for (zp, lo, hi) in [
            (0, -128, 127),
            (-128, -128, 127),
            (5, -3, 100),
            (127, 127, 127),
            (-7, -7, 127),
            (3, 10, 120),
        ] {
            let mut m = vec![0.5, 0.25, 1.0, 0.0, 2.0, 1.5, 0.75, 1e-9, 3.0e-10, 1234.5];
            while m.len() < channels {
                let exp = (next() % 40) as i32 - 30;
                m.push((1.0 + (next() % 1_000_000) as f64 / 1e6) * 2f64.powi(exp));
            }
            let q: Vec<(i32, i32)> = m.iter().map(|&v| quantize_multiplier(v)).collect();
            check(
                ChannelMultipliers::Quantized(q, Rounding::Double),
                channels,
                zp,
                lo,
                hi,
                &accs,
            );
            let f: Vec<f32> = m.iter().map(|&v| v as f32).collect();
            check(ChannelMultipliers::Fp32(f), channels, zp, lo, hi, &accs);
            // Multipliers below 1 only: no channel shifts left.
            let small: Vec<(i32, i32)> = m
                .iter()
                .map(|&v| quantize_multiplier(v.min(0.99)))
                .collect();
            assert!(small.iter().all(|&(_, s)| s <= 0));
            check(
                ChannelMultipliers::Quantized(small, Rounding::Double),
                channels,
                zp,
                lo,
                hi,
                &accs,
            );
            // Multipliers below 1/2 only: every right shift at least 1, the folded
            // form (with 1e-9 and 3e-10 shifting by 29 and 31: 31 keeps two steps).
            let half: Vec<(i32, i32)> = m
                .iter()
                .map(|&v| quantize_multiplier(v.min(0.49)))
                .collect();
            let folding: Vec<(i32, i32)> = m
                .iter()
                .filter(|&&v| v > 1e-8)
                .map(|&v| quantize_multiplier(v.min(0.49)))
                .collect();
            let r = RowRequantizer::new(
                ChannelMultipliers::Quantized(folding.clone(), Rounding::Double),
                zp,
                lo,
                hi,
            );
            assert!(r.fold, "multipliers in (1e-8, 1/2) fold");
            for q in [half, folding] {
                let n = q.len();
                check(
                    ChannelMultipliers::Quantized(q, Rounding::Double),
                    n,
                    zp,
                    lo,
                    hi,
                    &accs[..accs.len() / n * n],
                );
            }
        }
    }

    #[test]
    fn only_vector_parameters_have_a_block_form() {
        let q = vec![quantize_multiplier(0.003); 16];
        let r = RowRequantizer::new(
            ChannelMultipliers::Quantized(q.clone(), Rounding::Double),
            -5,
            -128,
            127,
        );
        assert_eq!((r.block_form(), r.channels()), (Some(Form::Gemmlowp), 16));
        let single = RowRequantizer::new(
            ChannelMultipliers::Quantized(q, Rounding::Single),
            -5,
            -128,
            127,
        );
        assert_eq!(single.block_form(), None);
        let double = RowRequantizer::new(ChannelMultipliers::Double(vec![0.01; 4]), 0, -128, 127);
        assert_eq!(double.block_form(), None);
        let fp = RowRequantizer::new(ChannelMultipliers::Fp32(vec![0.01; 4]), 0, -128, 127);
        assert_eq!(fp.block_form(), Some(Form::Fp32));
        let nan = RowRequantizer::new(ChannelMultipliers::Fp32(vec![f32::NAN; 4]), 0, -128, 127);
        assert_eq!(nan.block_form(), None);
    }
}
