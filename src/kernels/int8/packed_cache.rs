//! Packed int8 weights, made once per weight buffer rather than once per batch: a
//! plan's constant filters are the same `Arc` on every run, so the convolutions and
//! fully connected ops of later batches (and of other threads) reuse the packing of
//! the first.

use std::sync::{Arc, Mutex, Weak};

use crate::error::Result;
use crate::kernels::simd::igemm::PackedWeights;
use crate::kernels::value::{Buf, Value};

struct Entry {
    /// Holding the allocation keeps its address from being reused while the entry
    /// exists, so a pointer match is the same buffer.
    buf: Weak<Buf>,
    k: usize,
    n: usize,
    transposed: bool,
    packed: Arc<PackedWeights>,
}

static CACHE: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

/// Entries beyond this are not kept (weights computed per batch die at once anyway).
const MAX_ENTRIES: usize = 256;

/// `PackedWeights::pack(w, k, n, transposed)`, shared by every call on the same
/// buffer while it is alive.
pub(super) fn packed(
    w: &Value,
    k: usize,
    n: usize,
    transposed: bool,
) -> Result<Arc<PackedWeights>> {
    let ptr = Arc::as_ptr(&w.buf);
    {
        let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
        cache.retain(|e| e.buf.strong_count() > 0);
        if let Some(e) = cache.iter().find(|e| {
            std::ptr::eq(e.buf.as_ptr(), ptr) && (e.k, e.n, e.transposed) == (k, n, transposed)
        }) {
            return Ok(e.packed.clone());
        }
    }
    let packed = Arc::new(PackedWeights::pack(w.slice::<i8>()?, k, n, transposed));
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if cache.len() < MAX_ENTRIES {
        cache.push(Entry {
            buf: Arc::downgrade(&w.buf),
            k,
            n,
            transposed,
            packed: packed.clone(),
        });
    }
    Ok(packed)
}
