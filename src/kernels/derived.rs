//! Values derived from a plan's constant buffers (packed filters, per-channel
//! requantizers, depthwise filter layouts), made once per buffer rather than once per
//! batch. A plan's constants are the same `Arc` on every run, so the kernels of later
//! batches (and of other threads) reuse what the first one derived. MobileNet's
//! batches are 4 rows (its activations are large), so deriving per batch cost about
//! 3% of its float `eval` and 6% of its int8 one.

use std::any::Any;
use std::sync::{Arc, Mutex, Weak};

use crate::error::Result;
use crate::kernels::value::Buf;

struct Entry {
    /// Holding the allocation keeps its address from being reused while the entry
    /// exists, so a pointer match is the same buffer.
    buf: Weak<Buf>,
    value: Arc<dyn Any + Send + Sync>,
}

static CACHE: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

/// Entries beyond this are not kept (buffers computed per batch die at once anyway).
const MAX_ENTRIES: usize = 1024;

/// The `T` derived from `buf` for which `matches` holds, made by `make` on the first
/// call and shared by every later one while `buf` is alive. `matches` must compare
/// everything besides `buf` that `make` reads.
pub(crate) fn derived<T: Any + Send + Sync>(
    buf: &Arc<Buf>,
    matches: impl Fn(&T) -> bool,
    make: impl FnOnce() -> Result<T>,
) -> Result<Arc<T>> {
    let ptr = Arc::as_ptr(buf);
    let find = |cache: &[Entry]| {
        cache.iter().find_map(|e| {
            if !std::ptr::eq(e.buf.as_ptr(), ptr) {
                return None;
            }
            let v = e.value.clone().downcast::<T>().ok()?;
            matches(&v).then_some(v)
        })
    };
    {
        let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
        cache.retain(|e| e.buf.strong_count() > 0);
        if let Some(v) = find(&cache) {
            return Ok(v);
        }
    }
    let value = Arc::new(make()?);
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    // Another thread may have made the same value meanwhile; either serves.
    if cache.len() < MAX_ENTRIES && find(&cache).is_none() {
        cache.push(Entry {
            buf: Arc::downgrade(buf),
            value: value.clone(),
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_per_buffer_and_key_and_dropped_with_the_buffer() {
        let a = Arc::new(Buf::F32(vec![1.0, 2.0]));
        let b = Arc::new(Buf::F32(vec![1.0, 2.0]));
        let made = std::sync::atomic::AtomicUsize::new(0);
        let get = |buf: &Arc<Buf>, key: u32| {
            derived(
                buf,
                |v: &(u32, usize)| v.0 == key,
                || Ok((key, made.fetch_add(1, std::sync::atomic::Ordering::SeqCst))),
            )
            .unwrap()
        };
        let first = get(&a, 1);
        assert!(Arc::ptr_eq(&first, &get(&a, 1)));
        assert!(!Arc::ptr_eq(&first, &get(&a, 2)));
        assert!(!Arc::ptr_eq(&first, &get(&b, 1)));
        assert_eq!(made.load(std::sync::atomic::Ordering::SeqCst), 3);
        let weak = Arc::downgrade(&a);
        drop(a);
        let _ = get(&b, 1);
        let cache = CACHE.lock().unwrap();
        assert!(!cache
            .iter()
            .any(|e| std::ptr::eq(e.buf.as_ptr(), weak.as_ptr())));
    }
}
