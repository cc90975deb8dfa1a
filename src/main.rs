use std::process::ExitCode;

#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOC: huge::HugePageHint = huge::HugePageHint;

fn main() -> ExitCode {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    batch_buffers::keep();
    let code = qpipe::cli::main(
        std::env::args_os().collect(),
        qpipe::stages::registry::REGISTRY,
    );
    ExitCode::from(code.clamp(0, 255) as u8)
}

/// The system allocator, asking for transparent huge pages on large blocks.
///
/// A model's weight tables are copied through several buffers of hundreds of MB
/// (checkpoint → graph → typed values → serialized blobs); with 4 KiB pages the
/// page faults took half the CPU time of a cold run on a 200 MB embedding. Where
/// THP is `madvise` (Debian's default) this hint is what enables it; where it is
/// `always` or `never` the call changes nothing. Advice is best effort: a failing
/// `madvise` leaves the block as it was.
#[cfg(target_os = "linux")]
mod huge {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::ffi::{c_int, c_void};

    const LARGE: usize = 4 << 20;
    const PAGE: usize = 4096;
    const MADV_HUGEPAGE: c_int = 14;

    extern "C" {
        fn madvise(addr: *mut c_void, len: usize, advice: c_int) -> c_int;
    }

    fn hint(ptr: *mut u8, size: usize) {
        if ptr.is_null() || size < LARGE {
            return;
        }
        let start = (ptr as usize).next_multiple_of(PAGE);
        let end = (ptr as usize + size) & !(PAGE - 1);
        if end > start {
            // SAFETY: [start, end) lies inside a block we just allocated; the advice
            // changes how its pages are backed, never their contents.
            unsafe { madvise(start as *mut c_void, end - start, MADV_HUGEPAGE) };
        }
    }

    /// Blocks from this size up to glibc's mmap threshold (see `batch_buffers`) start on
    /// a cache line: the interpreter's activations are read and written in 64-byte
    /// vectors, and a block at 16 bytes past a line splits every one of them in two
    /// (conv_bn's depthwise took 25% longer in a plan whose buffers landed so).
    const ALIGN_FROM: usize = 4096;
    const ALIGN_TO: usize = 16 << 20;
    const LINE: usize = 64;

    fn lined(layout: Layout) -> Layout {
        if (ALIGN_FROM..ALIGN_TO).contains(&layout.size()) && layout.align() < LINE {
            // SAFETY: LINE is a power of two and the size is below ALIGN_TO, far from
            // isize::MAX.
            unsafe { Layout::from_size_align_unchecked(layout.size(), LINE) }
        } else {
            layout
        }
    }

    pub struct HugePageHint;

    // SAFETY: every call is forwarded to `System`, with the alignment `lined` gives the
    // size (the same for a block's allocation and its deallocation); `hint` only
    // advises the kernel.
    unsafe impl GlobalAlloc for HugePageHint {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let p = unsafe { System.alloc(lined(layout)) };
            hint(p, layout.size());
            p
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            let p = unsafe { System.alloc_zeroed(lined(layout)) };
            hint(p, layout.size());
            p
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { System.dealloc(ptr, lined(layout)) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            let old = lined(layout);
            // SAFETY: the caller guarantees new_size with layout's alignment is a valid
            // layout.
            let new = lined(unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) });
            let p = if old.align() == new.align() {
                unsafe { System.realloc(ptr, old, new_size) }
            } else {
                let p = unsafe { System.alloc(new) };
                if !p.is_null() {
                    // SAFETY: both blocks are live and at least this long; they are
                    // distinct allocations.
                    unsafe {
                        std::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new_size));
                        System.dealloc(ptr, old);
                    }
                }
                p
            };
            hint(p, new_size);
            p
        }
    }
}

/// Keeps the interpreter's per-batch buffers in the heap between batches.
///
/// A batch's activations are a few hundred KB to a few MB each (see
/// `kernels::dataset::BATCH_BYTES`); glibc maps blocks that large afresh and unmaps them
/// on free, so every op of every batch paid page faults and the kernel's page clearing
/// on its output (15% of the CPU of a small CNN's `eval`, about 8,700 faults per 1,000
/// rows of conv_bn). Served from the heap and left there on free (up to the trim
/// threshold), the next batch reuses the same pages. Blocks above the threshold (weight
/// and embedding tables) are still mapped and returned to the system.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod batch_buffers {
    use std::ffi::c_int;

    const M_TRIM_THRESHOLD: c_int = -1;
    const M_MMAP_THRESHOLD: c_int = -3;

    extern "C" {
        fn mallopt(param: c_int, value: c_int) -> c_int;
    }

    pub fn keep() {
        // SAFETY: mallopt only changes glibc's allocation policy; it is called before
        // any other thread exists. A failure (0) leaves the defaults, which are correct.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 16 << 20);
            mallopt(M_TRIM_THRESHOLD, 32 << 20);
        }
    }
}
