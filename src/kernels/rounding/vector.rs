//! Whole-slice forms of the element-wise requantizations: int8 ADD/SUB with both
//! runtimes' formulas ([`RefAdd`], [`XnnAdd::slices`]) and float → int8 QUANTIZE
//! ([`quantize_f32_to_i8`], [`xnn_quantize_f32_to_i8`]). On x86-64 with AVX2 (or
//! AVX-512F) they run eight (sixteen) elements per instruction sequence with the same
//! integer and f32 operations as the element-wise functions, so they give the same
//! bits (tests below compare them on random inputs and edge cases); otherwise, and
//! for the tails, they call the element-wise functions. The reference ADD of a long
//! slice looks its results up in a table those computed for every input pair.

use super::{
    multiply_by_quantized_multiplier, quantize_multiplier, quantize_value, xnn_quantize_f32,
    Rounding, XnnAdd,
};

/// The reference int8 ADD/SUB (`add.cc`/`sub.cc`, integer path): each input minus
/// its zero point, shifted left by 20, rescaled to twice the larger input scale with
/// [`multiply_by_quantized_multiplier`], added (or subtracted), rescaled to the
/// output, plus its zero point, saturated to int8. The multipliers are computed in
/// f64 from the f32 scales.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefAdd {
    a_zp: i32,
    b_zp: i32,
    out_zp: i32,
    in1: (i32, i32),
    in2: (i32, i32),
    out: (i32, i32),
    sub: bool,
    rounding: Rounding,
}

const ADD_LEFT_SHIFT: i32 = 20;

/// The length from which [`RefAdd::slices`] uses its table.
const TABLE_MIN: usize = 1 << 12;

impl RefAdd {
    pub fn new(
        (a_scale, a_zp): (f32, i32),
        (b_scale, b_zp): (f32, i32),
        (out_scale, out_zp): (f32, i32),
        sub: bool,
        rounding: Rounding,
    ) -> RefAdd {
        let twice_max = 2.0 * a_scale.max(b_scale) as f64;
        RefAdd {
            a_zp,
            b_zp,
            out_zp,
            in1: quantize_multiplier(a_scale as f64 / twice_max),
            in2: quantize_multiplier(b_scale as f64 / twice_max),
            out: quantize_multiplier(
                twice_max / ((1i64 << ADD_LEFT_SHIFT) as f64 * out_scale as f64),
            ),
            sub,
            rounding,
        }
    }

    #[inline]
    pub fn apply(&self, x: i8, y: i8) -> i8 {
        let mbqm =
            |v: i32, (q, s): (i32, i32)| multiply_by_quantized_multiplier(v, q, s, self.rounding);
        let x = (x as i32 - self.a_zp) * (1 << ADD_LEFT_SHIFT);
        let y = (y as i32 - self.b_zp) * (1 << ADD_LEFT_SHIFT);
        let (sx, sy) = (mbqm(x, self.in1), mbqm(y, self.in2));
        let raw = if self.sub { sx - sy } else { sx + sy };
        (mbqm(raw, self.out) + self.out_zp).clamp(-128, 127) as i8
    }

    /// `out[i] = apply(a[i], b[i])`; the three slices have equal lengths. Long slices
    /// look each result up in a table of every input pair (about two cycles an
    /// element less than computing it, even sixteen at a time).
    pub fn slices(&self, a: &[i8], b: &[i8], out: &mut [i8]) {
        assert!(
            a.len() == out.len() && b.len() == out.len(),
            "add: lengths differ"
        );
        if out.len() >= TABLE_MIN {
            let t = self.table();
            let t: &[i8; 1 << 16] = t.as_ref().try_into().expect("a table of every pair");
            for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
                *o = t[(x as u8 as usize) << 8 | y as u8 as usize];
            }
            return;
        }
        self.compute(a, b, out);
    }

    /// [`RefAdd::apply`] of every input pair, `(x as u8) << 8 | y as u8` → result,
    /// made once per parameter set and shared.
    fn table(&self) -> std::sync::Arc<[i8]> {
        use std::sync::{Arc, Mutex};
        static TABLES: Mutex<Vec<(RefAdd, Arc<[i8]>)>> = Mutex::new(Vec::new());
        let find = |tables: &[(RefAdd, Arc<[i8]>)]| {
            tables
                .iter()
                .find(|(p, _)| p == self)
                .map(|(_, t)| t.clone())
        };
        if let Some(t) = find(&TABLES.lock().unwrap_or_else(|p| p.into_inner())) {
            return t;
        }
        let x: Vec<i8> = (0..1usize << 16).map(|i| (i >> 8) as u8 as i8).collect();
        let y: Vec<i8> = (0..1usize << 16).map(|i| i as u8 as i8).collect();
        let mut t = vec![0i8; 1 << 16];
        self.compute(&x, &y, &mut t);
        let t: Arc<[i8]> = t.into();
        let mut tables = TABLES.lock().unwrap_or_else(|p| p.into_inner());
        if tables.len() < 256 && find(&tables).is_none() {
            tables.push((*self, t.clone()));
        }
        t
    }

    /// [`RefAdd::slices`] computed element by element (in vectors where it can).
    fn compute(&self, a: &[i8], b: &[i8], out: &mut [i8]) {
        #[allow(unused_mut)]
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if self.vector() && crate::kernels::simd::avx512() {
            // SAFETY: AVX-512F is present; the lengths were checked above.
            done = unsafe { x86::ref_add512(self, a, b, out) };
        }
        #[cfg(target_arch = "x86_64")]
        if self.vector() && crate::kernels::simd::avx2() {
            // SAFETY: AVX2 is present; the lengths were checked above.
            done += unsafe { x86::ref_add(self, &a[done..], &b[done..], &mut out[done..]) };
        }
        for i in done..out.len() {
            out[i] = self.apply(a[i], b[i]);
        }
    }

    /// Whether the vector path computes [`RefAdd::apply`]: double rounding, and
    /// multipliers whose doubling high multiply never saturates.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn vector(&self) -> bool {
        let ok = |(q, s): (i32, i32)| q != i32::MIN && (-31..=31).contains(&s);
        self.rounding == Rounding::Double && ok(self.in1) && ok(self.in2) && ok(self.out)
    }
}

impl XnnAdd {
    /// `out[i] = sat8(apply(a[i], b[i]) + out_zp)`; the three slices have equal
    /// lengths.
    pub fn slices(&self, a: &[i8], b: &[i8], out_zp: i32, out: &mut [i8]) {
        assert!(
            a.len() == out.len() && b.len() == out.len(),
            "add: lengths differ"
        );
        #[allow(unused_mut)]
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::simd::avx2() {
            // SAFETY: AVX2 is present; the lengths were checked above.
            done = unsafe { x86::xnn_add(self, a, b, out_zp, out) };
        }
        for i in done..out.len() {
            out[i] = self
                .apply(a[i] as i32, b[i] as i32)
                .wrapping_add(out_zp)
                .clamp(-128, 127) as i8;
        }
    }
}

/// [`quantize_value`] to int8 of every element: `dst[i] = quantize_value(src[i],
/// scale, zero_point, -128, 127)`; the slices have equal lengths.
pub fn quantize_f32_to_i8(src: &[f32], dst: &mut [i8], scale: f32, zero_point: i32) {
    assert_eq!(src.len(), dst.len(), "quantize: lengths differ");
    #[allow(unused_mut)]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if (-128..=127).contains(&zero_point) && crate::kernels::simd::avx512() {
        // SAFETY: AVX-512F is present; the lengths were checked above.
        done = unsafe { x86::quantize512(src, dst, scale, zero_point, false) };
    }
    #[cfg(target_arch = "x86_64")]
    if (-128..=127).contains(&zero_point) && crate::kernels::simd::avx2() {
        // SAFETY: AVX2 is present; the lengths were checked above.
        done += unsafe { x86::quantize(&src[done..], &mut dst[done..], scale, zero_point, false) };
    }
    for i in done..dst.len() {
        dst[i] = quantize_value(src[i], scale, zero_point, -128, 127) as i8;
    }
}

/// [`xnn_quantize_f32`] of every element; the slices have equal lengths.
pub fn xnn_quantize_f32_to_i8(src: &[f32], dst: &mut [i8], scale: f32, zero_point: i32) {
    assert_eq!(src.len(), dst.len(), "quantize: lengths differ");
    #[allow(unused_mut)]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if (-128..=127).contains(&zero_point) && crate::kernels::simd::avx512() {
        // SAFETY: AVX-512F is present; the lengths were checked above.
        done = unsafe { x86::quantize512(src, dst, scale, zero_point, true) };
    }
    #[cfg(target_arch = "x86_64")]
    if (-128..=127).contains(&zero_point) && crate::kernels::simd::avx2() {
        // SAFETY: AVX2 is present; the lengths were checked above.
        done += unsafe { x86::quantize(&src[done..], &mut dst[done..], scale, zero_point, true) };
    }
    for i in done..dst.len() {
        dst[i] = xnn_quantize_f32(src[i], scale, zero_point) as i8;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::row_x86::srdhm;
    use super::{RefAdd, XnnAdd};
    use std::arch::x86_64::*;

    /// Eight int8 values at `p`, sign-extended.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load8(p: *const i8) -> __m256i {
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i))
    }

    /// Saturates eight i32 to int8 and stores them at `p`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn store8(v: __m256i, p: *mut i8) {
        let w = _mm256_packs_epi32(v, v); // lane 0: v0..3 twice, lane 1: v4..7 twice
        let w = _mm256_permute4x64_epi64::<0b1000>(w); // v0..3, v4..7 in the low lane
        let b = _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_castsi256_si128(w));
        _mm_storel_epi64(p as *mut __m128i, b);
    }

    /// [`super::super::multiply_by_quantized_multiplier`] with double rounding by a
    /// multiplier `q` other than `i32::MIN` and a shift in `-31..=31`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn mbqm(x: __m256i, (q, shift): (i32, i32)) -> __m256i {
        let left = _mm_cvtsi32_si128(shift.max(0));
        let right = (-shift).max(0);
        let mask = ((1i64 << right) - 1) as i32;
        let x = srdhm(_mm256_sll_epi32(x, left), _mm256_set1_epi32(q));
        let rem = _mm256_and_si256(x, _mm256_set1_epi32(mask));
        let negative = _mm256_cmpgt_epi32(_mm256_setzero_si256(), x);
        let threshold = _mm256_sub_epi32(_mm256_set1_epi32(mask >> 1), negative);
        let up = _mm256_cmpgt_epi32(rem, threshold);
        _mm256_sub_epi32(_mm256_sra_epi32(x, _mm_cvtsi32_si128(right)), up)
    }

    /// The elements `[0, 8·⌊n/8⌋)` of [`RefAdd::slices`]; returns how many.
    ///
    /// # Safety
    /// AVX2 must be present, `r.vector()` hold, and the slices have equal lengths.
    #[target_feature(enable = "avx2")]
    pub unsafe fn ref_add(r: &RefAdd, a: &[i8], b: &[i8], out: &mut [i8]) -> usize {
        let n = out.len() / 8 * 8;
        let (azp, bzp) = (_mm256_set1_epi32(r.a_zp), _mm256_set1_epi32(r.b_zp));
        let ozp = _mm256_set1_epi32(r.out_zp);
        let (ap, bp, op) = (a.as_ptr(), b.as_ptr(), out.as_mut_ptr());
        for i in (0..n).step_by(8) {
            let x = _mm256_slli_epi32::<20>(_mm256_sub_epi32(load8(ap.add(i)), azp));
            let y = _mm256_slli_epi32::<20>(_mm256_sub_epi32(load8(bp.add(i)), bzp));
            let (sx, sy) = (mbqm(x, r.in1), mbqm(y, r.in2));
            let raw = if r.sub {
                _mm256_sub_epi32(sx, sy)
            } else {
                _mm256_add_epi32(sx, sy)
            };
            store8(_mm256_add_epi32(mbqm(raw, r.out), ozp), op.add(i));
        }
        n
    }

    /// [`mbqm`] in 512-bit vectors: the same operations, sixteen lanes at a time.
    #[inline]
    #[target_feature(enable = "avx2,avx512f")]
    unsafe fn mbqm512(x: __m512i, (q, shift): (i32, i32)) -> __m512i {
        let right = (-shift).max(0);
        let mask = ((1i64 << right) - 1) as i32;
        let x = _mm512_sll_epi32(x, _mm_cvtsi32_si128(shift.max(0)));
        // srdhm as in `row_x86::srdhm`; `q` in both halves of each 64-bit lane serves
        // the even and the odd products.
        let (q, round) = (_mm512_set1_epi32(q), _mm512_set1_epi64(1 << 30));
        let even = _mm512_add_epi64(_mm512_mul_epi32(x, q), round);
        let odd = _mm512_add_epi64(_mm512_mul_epi32(_mm512_srli_epi64::<32>(x), q), round);
        let even = _mm512_srli_epi64::<31>(even);
        let odd = _mm512_slli_epi64::<1>(odd);
        let x = _mm512_mask_blend_epi32(0xaaaa, even, odd);
        let rem = _mm512_and_si512(x, _mm512_set1_epi32(mask));
        let threshold = _mm512_sub_epi32(_mm512_set1_epi32(mask >> 1), _mm512_srai_epi32::<31>(x));
        let up = _mm512_cmpgt_epi32_mask(rem, threshold);
        let v = _mm512_sra_epi32(x, _mm_cvtsi32_si128(right));
        _mm512_mask_add_epi32(v, up, v, _mm512_set1_epi32(1))
    }

    /// The elements `[0, 16·⌊n/16⌋)` of [`RefAdd::slices`] in 512-bit vectors;
    /// returns how many.
    ///
    /// # Safety
    /// AVX-512F must be present, `r.vector()` hold, and the slices have equal lengths.
    #[target_feature(enable = "avx2,avx512f")]
    pub unsafe fn ref_add512(r: &RefAdd, a: &[i8], b: &[i8], out: &mut [i8]) -> usize {
        let n = out.len() / 16 * 16;
        let (azp, bzp) = (_mm512_set1_epi32(r.a_zp), _mm512_set1_epi32(r.b_zp));
        let ozp = _mm512_set1_epi32(r.out_zp);
        let (ap, bp, op) = (a.as_ptr(), b.as_ptr(), out.as_mut_ptr());
        let load16 = |p: *const i8| _mm512_cvtepi8_epi32(_mm_loadu_si128(p.cast()));
        for i in (0..n).step_by(16) {
            let x = _mm512_slli_epi32::<20>(_mm512_sub_epi32(load16(ap.add(i)), azp));
            let y = _mm512_slli_epi32::<20>(_mm512_sub_epi32(load16(bp.add(i)), bzp));
            let (sx, sy) = (mbqm512(x, r.in1), mbqm512(y, r.in2));
            let raw = if r.sub {
                _mm512_sub_epi32(sx, sy)
            } else {
                _mm512_add_epi32(sx, sy)
            };
            // Saturating to int8 is the clamp to int8.
            let v = _mm512_add_epi32(mbqm512(raw, r.out), ozp);
            _mm_storeu_si128(op.add(i).cast(), _mm512_cvtsepi32_epi8(v));
        }
        n
    }

    /// The elements `[0, 8·⌊n/8⌋)` of [`XnnAdd::slices`]; returns how many.
    ///
    /// # Safety
    /// AVX2 must be present and the slices have equal lengths.
    #[target_feature(enable = "avx2")]
    pub unsafe fn xnn_add(p: &XnnAdd, a: &[i8], b: &[i8], out_zp: i32, out: &mut [i8]) -> usize {
        let n = out.len() / 8 * 8;
        let (am, bm) = (_mm256_set1_epi32(p.a_mult), _mm256_set1_epi32(p.b_mult));
        let (bias, ozp) = (_mm256_set1_epi32(p.bias), _mm256_set1_epi32(out_zp));
        let shift = _mm_cvtsi32_si128(p.shift as i32);
        let (ap, bp, op) = (a.as_ptr(), b.as_ptr(), out.as_mut_ptr());
        for i in (0..n).step_by(8) {
            let x = _mm256_mullo_epi32(load8(ap.add(i)), am);
            let y = _mm256_mullo_epi32(load8(bp.add(i)), bm);
            let v = _mm256_sra_epi32(_mm256_add_epi32(_mm256_add_epi32(bias, x), y), shift);
            store8(_mm256_add_epi32(v, ozp), op.add(i));
        }
        n
    }

    /// The elements `[0, 16·⌊n/16⌋)` of [`quantize`] in 512-bit vectors: the same
    /// operations, sixteen lanes at a time; returns how many.
    ///
    /// # Safety
    /// AVX-512F must be present, the slices have equal lengths and `zero_point` is
    /// within int8.
    #[target_feature(enable = "avx2,avx512f")]
    pub unsafe fn quantize512(
        src: &[f32],
        dst: &mut [i8],
        scale: f32,
        zero_point: i32,
        xnn: bool,
    ) -> usize {
        let n = dst.len() / 16 * 16;
        let lo = _mm512_set1_ps((-128 - zero_point) as f32);
        let hi = _mm512_set1_ps((127 - zero_point) as f32);
        let zp = _mm512_set1_epi32(zero_point);
        let (sc, inv) = (_mm512_set1_ps(scale), _mm512_set1_ps(1.0f32 / scale));
        let (half, one) = (_mm512_set1_ps(0.5), _mm512_set1_ps(1.0));
        let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
        for i in (0..n).step_by(16) {
            let x = _mm512_loadu_ps(sp.add(i));
            let v = if xnn {
                _mm512_mul_ps(x, inv)
            } else {
                _mm512_div_ps(x, sc)
            };
            let r = if xnn {
                let c = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
                _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(c)
            } else {
                // As in `quantize`.
                let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
                let f = _mm512_sub_ps(v, t);
                let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(f, half);
                let down =
                    _mm512_cmp_ps_mask::<_CMP_LE_OQ>(f, _mm512_sub_ps(_mm512_setzero_ps(), half));
                let r = _mm512_mask_add_ps(t, up, t, one);
                let r = _mm512_mask_sub_ps(r, down, r, one);
                _mm512_min_ps(_mm512_max_ps(r, lo), hi)
            };
            let number = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(v, v);
            let q = _mm512_maskz_cvtps_epi32(number, r);
            // Within int8 already (the clamp), or the zero point for NaN.
            let q = _mm512_add_epi32(q, zp);
            _mm_storeu_si128(dp.add(i).cast(), _mm512_cvtsepi32_epi8(q));
        }
        n
    }

    /// The elements `[0, 8·⌊n/8⌋)` of [`super::quantize_f32_to_i8`] (`xnn` false:
    /// divide, round half away from zero) or [`super::xnn_quantize_f32_to_i8`]
    /// (`xnn`: multiply by the f32 reciprocal, clamp, round half to even); NaN
    /// gives the zero point in both. Returns how many.
    ///
    /// # Safety
    /// AVX2 must be present, the slices have equal lengths and `zero_point` is
    /// within int8.
    #[target_feature(enable = "avx2")]
    pub unsafe fn quantize(
        src: &[f32],
        dst: &mut [i8],
        scale: f32,
        zero_point: i32,
        xnn: bool,
    ) -> usize {
        let n = dst.len() / 8 * 8;
        let lo = _mm256_set1_ps((-128 - zero_point) as f32);
        let hi = _mm256_set1_ps((127 - zero_point) as f32);
        let zp = _mm256_set1_epi32(zero_point);
        let (sc, inv) = (_mm256_set1_ps(scale), _mm256_set1_ps(1.0f32 / scale));
        let (half, one) = (_mm256_set1_ps(0.5), _mm256_set1_ps(1.0));
        let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
        for i in (0..n).step_by(8) {
            let x = _mm256_loadu_ps(sp.add(i));
            let v = if xnn {
                _mm256_mul_ps(x, inv)
            } else {
                _mm256_div_ps(x, sc)
            };
            let r = if xnn {
                let c = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
                _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(c)
            } else {
                // Truncate, then step away from zero when the fraction's magnitude
                // is at least 1/2 (infinities keep their value: their fraction is
                // NaN, which compares false); then clamp, which is exact on integers.
                let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
                let f = _mm256_sub_ps(v, t);
                let up = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(f, half), one);
                let down = _mm256_and_ps(
                    _mm256_cmp_ps::<_CMP_LE_OQ>(f, _mm256_sub_ps(_mm256_setzero_ps(), half)),
                    one,
                );
                let r = _mm256_sub_ps(_mm256_add_ps(t, up), down);
                _mm256_min_ps(_mm256_max_ps(r, lo), hi)
            };
            let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v);
            let q = _mm256_andnot_si256(_mm256_castps_si256(nan), _mm256_cvtps_epi32(r));
            store8(_mm256_add_epi32(q, zp), dp.add(i));
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        }
    }

    /// Every pair of int8 values, then the same values in a rotated order, so that
    /// each lane of a vector sees every pair (the length is not a multiple of 8, so
    /// the tail runs too).
    fn pairs() -> (Vec<i8>, Vec<i8>) {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for x in -128..=127i32 {
            for y in -128..=127i32 {
                a.push(x as i8);
                b.push(y as i8);
            }
        }
        let n = a.len();
        for i in 0..n + 5 {
            a.push(a[(i * 7) % n]);
            b.push(b[(i * 13 + 3) % n]);
        }
        (a, b)
    }

    #[test]
    fn vector_adds_equal_the_element_wise_formulas() {
        let (a, b) = pairs();
        let mut out = vec![0i8; a.len()];
        let mut next = rng(0x2545_f491_4f6c_dd1d);
        let mut scales: Vec<f32> = vec![1.0, 0.5, 0.0078125, 0.1, 3.3, 1e-4, 2e-3, 40.0];
        for _ in 0..24 {
            let e = (next() % 20) as i32 - 12;
            scales.push((1.0 + (next() % 1000) as f32 / 1000.0) * 2f32.powi(e));
        }
        let zps = [0, -128, 127, 5, -37];
        let mut cases = 0;
        for (i, &sa) in scales.iter().enumerate() {
            let sb = scales[(i * 5 + 3) % scales.len()];
            let so = scales[(i * 11 + 1) % scales.len()];
            let (za, zb, zo) = (zps[i % 5], zps[(i + 2) % 5], zps[(i + 4) % 5]);
            for sub in [false, true] {
                let r = RefAdd::new((sa, za), (sb, zb), (so, zo), sub, Rounding::Double);
                r.slices(&a, &b, &mut out);
                for k in 0..a.len() {
                    assert_eq!(out[k], r.apply(a[k], b[k]), "{r:?} {} {}", a[k], b[k]);
                }
                // The table serves long slices; computed, as for short ones:
                out.fill(0);
                r.compute(&a, &b, &mut out);
                for k in 0..a.len() {
                    assert_eq!(out[k], r.apply(a[k], b[k]), "{r:?} {} {}", a[k], b[k]);
                }
                // `compute` takes the widest vectors; the AVX2 loop serves the rest and
                // CPUs without AVX-512.
                #[cfg(target_arch = "x86_64")]
                if r.vector() && crate::kernels::simd::avx2() {
                    out.fill(0);
                    // SAFETY: AVX2 is present; the slices have equal lengths.
                    let n = unsafe { x86::ref_add(&r, &a, &b, &mut out) };
                    assert_eq!(n, a.len() / 8 * 8);
                    for k in 0..n {
                        assert_eq!(out[k], r.apply(a[k], b[k]), "{r:?} {} {}", a[k], b[k]);
                    }
                }
                let sign = if sub { -1.0 } else { 1.0 };
                if let Some(p) = XnnAdd::new(sa / so, sign * (sb / so), za, zb) {
                    p.slices(&a, &b, zo, &mut out);
                    for k in 0..a.len() {
                        let want = (p.apply(a[k] as i32, b[k] as i32) + zo).clamp(-128, 127);
                        assert_eq!(out[k] as i32, want, "{p:?} {} {}", a[k], b[k]);
                    }
                    cases += 1;
                }
            }
        }
        assert!(cases > 20, "only {cases} XNNPACK cases");
        // Single rounding takes the element-wise path and still agrees.
        let r = RefAdd::new((0.1, 3), (0.2, -4), (0.25, 1), false, Rounding::Single);
        r.slices(&a, &b, &mut out);
        assert!((0..a.len()).all(|k| out[k] == r.apply(a[k], b[k])));
    }

    #[test]
    fn vector_quantize_equals_the_element_wise_formulas() {
        let mut xs: Vec<f32> = vec![
            0.0,
            -0.0,
            0.5,
            -0.5,
            1.5,
            -1.5,
            2.5,
            -2.5,
            0.49999997,
            -0.49999997,
            1e30,
            -1e30,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            8_388_608.5,
            -8_388_609.0,
            16_777_217.0,
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE,
            127.5,
            -128.5,
            127.49999,
            -128.49998,
            300.0,
            f32::MAX,
            f32::MIN,
        ];
        let mut next = rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..100_000 {
            let r = next();
            xs.push(f32::from_bits(r as u32));
            xs.push(((r >> 32) as i32 as f32) / 65_536.0);
            xs.push(((r >> 40) as i32 as f32) / 2.0);
        }
        // Halves of every quotient near the int8 range for the scales below.
        for k in -600..600 {
            xs.push(k as f32 * 0.5 * 0.0371);
            xs.push(k as f32 * 0.5);
        }
        let mut dst = vec![0i8; xs.len()];
        for (scale, zp) in [
            (1.0f32, 0),
            (0.5, -128),
            (0.0371, 17),
            (3e-5, 127),
            (250.0, -3),
            (0.1, 0),
            (1e-39, 4),
        ] {
            quantize_f32_to_i8(&xs, &mut dst, scale, zp);
            for (i, &x) in xs.iter().enumerate() {
                let want = quantize_value(x, scale, zp, -128, 127) as i8;
                assert_eq!(dst[i], want, "x {x:e} ({:08x}) {scale} {zp}", x.to_bits());
            }
            xnn_quantize_f32_to_i8(&xs, &mut dst, scale, zp);
            for (i, &x) in xs.iter().enumerate() {
                let want = xnn_quantize_f32(x, scale, zp) as i8;
                assert_eq!(
                    dst[i],
                    want,
                    "xnn x {x:e} ({:08x}) {scale} {zp}",
                    x.to_bits()
                );
            }
            // The AVX2 loops directly: the functions above take the 512-bit ones
            // where AVX-512F is present.
            #[cfg(target_arch = "x86_64")]
            if crate::kernels::simd::avx2() {
                for xnn in [false, true] {
                    dst.fill(0);
                    // SAFETY: AVX2 is present; the slices have equal lengths.
                    let n = unsafe { x86::quantize(&xs, &mut dst, scale, zp, xnn) };
                    assert_eq!(n, xs.len() / 8 * 8);
                    for (i, &x) in xs[..n].iter().enumerate() {
                        let want = if xnn {
                            xnn_quantize_f32(x, scale, zp)
                        } else {
                            quantize_value(x, scale, zp, -128, 127)
                        };
                        assert_eq!(dst[i] as i32, want, "avx2 {xnn} x {x:e} {scale} {zp}");
                    }
                }
            }
        }
    }
}
