//! Packed float weights, made once per weight buffer rather than once per batch (as
//! `int8/packed_cache.rs` does for the int8 products): a plan's constant filters are the
//! same `Arc` on every run, so the convolutions of later batches (and of other threads)
//! reuse the panels of the first. MobileNet's batches are 4 rows (its activations are
//! large), so packing every filter per batch cost about 3% of its float `eval`.

use std::sync::{Arc, Mutex, Weak};

use super::sgemm::PackedB;
use crate::error::Result;
use crate::kernels::value::{Buf, Value};

struct Entry {
    /// Holding the allocation keeps its address from being reused while the entry
    /// exists, so a pointer match is the same buffer.
    buf: Weak<Buf>,
    k: usize,
    n: usize,
    packed: Arc<PackedB>,
}

static CACHE: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

/// Entries beyond this are not kept (weights computed per batch die at once anyway).
const MAX_ENTRIES: usize = 256;

/// `PackedB::new(w, k, n)` for a float `w` of `k * n` values or more, shared by every
/// call on the same buffer while it is alive.
pub(crate) fn packed(w: &Value, k: usize, n: usize) -> Result<Arc<PackedB>> {
    let ptr = Arc::as_ptr(&w.buf);
    {
        let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
        cache.retain(|e| e.buf.strong_count() > 0);
        if let Some(e) = cache
            .iter()
            .find(|e| std::ptr::eq(e.buf.as_ptr(), ptr) && (e.k, e.n) == (k, n))
        {
            return Ok(e.packed.clone());
        }
    }
    let packed = Arc::new(PackedB::new(w.slice::<f32>()?, k, n));
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if cache.len() < MAX_ENTRIES {
        cache.push(Entry {
            buf: Arc::downgrade(&w.buf),
            k,
            n,
            packed: packed.clone(),
        });
    }
    Ok(packed)
}
