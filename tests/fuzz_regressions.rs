//! Every input the fuzzers found a problem with (`tests/fuzz/regressions/<target>/`) and
//! every seed of their corpora (`tests/fuzz/corpus/<target>/`), run through the fuzz
//! targets' own code (`tests/fuzz/src/targets.rs`): each must give `Ok` or `Err`,
//! never a panic.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

#[path = "fuzz/src/targets.rs"]
#[allow(dead_code)]
mod targets;

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    out.sort();
    out
}

/// Feeds every file of the target's corpus and regressions to `f`; returns how many
/// regression inputs there were.
fn check(target: &str, f: fn(&[u8])) -> usize {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz");
    let corpus = files(&base.join("corpus").join(target));
    assert!(!corpus.is_empty(), "{target}: no seed corpus");
    let regressions = files(&base.join("regressions").join(target));
    let mut panicked = Vec::new();
    for p in corpus.iter().chain(&regressions) {
        let bytes = std::fs::read(p).unwrap();
        if catch_unwind(AssertUnwindSafe(|| f(&bytes))).is_err() {
            panicked.push(p.display().to_string());
        }
    }
    assert!(panicked.is_empty(), "{target}: panicked on {panicked:?}");
    regressions.len()
}

#[test]
fn checkpoint_index_inputs() {
    check("checkpoint_index", targets::checkpoint_index);
}

#[test]
fn checkpoint_data_inputs() {
    check("checkpoint_data", targets::checkpoint_data);
}

#[test]
fn graph_def_inputs() {
    check("graph_def", targets::graph_def);
}

#[test]
fn meta_graph_inputs() {
    check("meta_graph", targets::meta_graph);
}

#[test]
fn saved_model_inputs() {
    check("saved_model", targets::saved_model);
}

#[test]
fn npy_inputs() {
    check("npy", targets::npy);
}

#[test]
fn recipe_inputs() {
    check("recipe", targets::recipe);
}

#[test]
fn tflite_inputs() {
    check("tflite", targets::tflite);
}
