//! Packed int8 weights, made once per weight buffer rather than once per batch
//! (see [`crate::kernels::derived`]).

use std::sync::Arc;

use crate::error::Result;
use crate::kernels::simd::igemm::PackedWeights;
use crate::kernels::value::Value;

/// `PackedWeights::pack(w, k, n, transposed)`, shared by every call on the same
/// buffer while it is alive.
pub(super) fn packed(
    w: &Value,
    k: usize,
    n: usize,
    transposed: bool,
) -> Result<Arc<PackedWeights>> {
    type Key = (usize, usize, bool);
    let p = crate::kernels::derived::derived(
        &w.buf,
        |p: &(Key, Arc<PackedWeights>)| p.0 == (k, n, transposed),
        || {
            let packed = PackedWeights::pack(w.slice::<i8>()?, k, n, transposed);
            Ok(((k, n, transposed), Arc::new(packed)))
        },
    )?;
    Ok(p.1.clone())
}
