//! Packed float weights, made once per weight buffer rather than once per batch
//! (see [`crate::kernels::derived`]).

use std::sync::Arc;

use super::sgemm::PackedB;
use crate::error::Result;
use crate::kernels::value::Value;

/// `PackedB::new(w, k, n)` for a float `w` of `k * n` values or more, shared by every
/// call on the same buffer while it is alive.
pub(crate) fn packed(w: &Value, k: usize, n: usize) -> Result<Arc<PackedB>> {
    let p = crate::kernels::derived::derived(
        &w.buf,
        |p: &(usize, usize, Arc<PackedB>)| (p.0, p.1) == (k, n),
        || Ok((k, n, Arc::new(PackedB::new(w.slice::<f32>()?, k, n)))),
    )?;
    Ok(p.2.clone())
}
