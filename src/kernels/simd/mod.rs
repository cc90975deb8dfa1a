//! Vectorized inner loops of the matrix kernels, chosen at run time by the CPU's
//! features (AVX2 with FMA on x86-64), with a portable fallback that computes the same
//! bits.
//!
//! Float products keep the arithmetic of the scalar kernels exactly: every output sums
//! its terms from 0.0 in the order of the reduction index, each step a fused
//! multiply-add (`acc = a · b + acc`, rounded once: `vfmadd231ps` in the vector paths,
//! `f32::mul_add` in the portable ones, which is correctly rounded on every CPU).
//! Vectors run across independent outputs (output channels, rows of a block), never
//! across the terms of one sum, so the results are bit for bit those of the scalar
//! loops, on every CPU. That matters beyond `validate`: calibration ranges, and through
//! them the bytes of every int8 model, come from these float kernels (the cache keys
//! carry [`crate::kernels::FLOAT_ARITHMETIC`] for that reason).
//!
//! Integer products accumulate in wrapping i32, whose sums do not depend on order.

pub(crate) mod dwconv;
pub(crate) mod fpool;
pub mod igemm;
pub mod sgemm;
pub(crate) mod sgemm_cache;

/// Whether AVX2 and FMA may be used (detected once; `QPIPE_NO_SIMD` set to anything
/// turns the vector paths off, to compare them with the portable ones). The float
/// kernels need both; a CPU with AVX2 but no FMA takes the portable paths.
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx2() -> bool {
    use std::sync::OnceLock;
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var_os("QPIPE_NO_SIMD").is_none()
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
    })
}

/// Whether AVX-512F may be used for float vectors of 16 lanes (`QPIPE_NO_AVX512` set
/// to anything keeps AVX2, as on a CPU without AVX-512).
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx512() -> bool {
    use std::sync::OnceLock;
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        avx2()
            && std::env::var_os("QPIPE_NO_AVX512").is_none()
            && std::arch::is_x86_feature_detected!("avx512f")
    })
}

/// Whether AVX512-VNNI (with VL, for 256-bit vectors) may be used for int8 products
/// (`QPIPE_NO_VNNI` set to anything keeps the AVX2 ones, as on a CPU without AVX-512).
#[cfg(target_arch = "x86_64")]
pub(crate) fn vnni() -> bool {
    use std::sync::OnceLock;
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        avx2()
            && std::env::var_os("QPIPE_NO_VNNI").is_none()
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    })
}
