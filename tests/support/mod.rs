//! Helpers shared by the integration tests. A test file declares `mod support;` and uses
//! the parts it needs; each module says what it holds.
#![allow(dead_code)]

pub mod child_process;
pub mod fixtures;
pub mod graph_builder;
pub mod litert_oracle;
pub mod numeric;
pub mod pipeline_stages;
pub mod project;
pub mod stage_runner;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

pub fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh, empty directory under cargo's per-target temporary directory, unique to
/// this call.
pub fn tmp_dir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "{name}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
