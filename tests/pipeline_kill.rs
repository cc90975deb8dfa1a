//! `qpipe run recipes/push_student.toml` (the real binary) killed with SIGKILL at 20
//! points spread over its stages, including mid-write of every kind of cache record.
//! After each kill `qpipe cache verify` finds nothing corrupt, a rerun succeeds, its
//! outputs are byte-identical to a clean run's, and the cache still verifies.
//!
//! The first points start from an empty cache. The others start from a copy of a clean
//! run's cache with the killed stage's results removed (and every entry sharing a blob
//! with it, so the blob is really rewritten), which makes the run reach the point with
//! everything upstream served from the cache.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use support::child_process::{kill_at, status_of};
use support::{manifest_dir, tmp_dir};

/// A directory holding `recipe.toml`: push_student.toml with fixtures by absolute path,
/// its cache in `.qpipe` and outputs in `out`.
fn project(name: &str) -> PathBuf {
    let dir = tmp_dir(name);
    let text = std::fs::read_to_string(manifest_dir().join("recipes/push_student.toml")).unwrap();
    let fixtures = manifest_dir().join("fixtures");
    let text = text.replace("\"../fixtures", &format!("\"{}", fixtures.display()));
    assert!(!text.contains("../"), "{text}");
    std::fs::write(dir.join("recipe.toml"), text).unwrap();
    dir
}

fn qpipe(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qpipe"));
    c.args(args)
        .current_dir(dir)
        .env_remove("QPIPE_CACHE_DIR")
        .env_remove("QPIPE_TEST_PAUSE");
    c
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn run_json(dir: &Path) -> (Output, Value) {
    let out = qpipe(dir, &["run", "--json", "recipe.toml"])
        .output()
        .unwrap();
    let v = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {} {}", text(&out.stdout), text(&out.stderr)));
    (out, v)
}

fn verify(dir: &Path, what: &str) {
    let out = qpipe(dir, &["cache", "verify", "--cache-dir", ".qpipe"])
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{what}: {stdout}");
    assert!(stdout.contains(": 0 corrupt"), "{what}: {stdout}");
}

fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut m = BTreeMap::new();
    for e in walkdir::WalkDir::new(dir).into_iter().flatten() {
        if e.file_type().is_file() {
            let rel = e.path().strip_prefix(dir).unwrap().to_string_lossy();
            m.insert(rel.into_owned(), std::fs::read(e.path()).unwrap());
        }
    }
    m
}

fn copy_tree(from: &Path, to: &Path) {
    for e in walkdir::WalkDir::new(from).into_iter().flatten() {
        let dest = to.join(e.path().strip_prefix(from).unwrap());
        if e.file_type().is_dir() {
            std::fs::create_dir_all(&dest).unwrap();
        } else if e.file_type().is_file() {
            std::fs::copy(e.path(), &dest).unwrap();
        }
    }
}

/// A cache record (action entry, memo or ref): the JSON body after the checksum line.
fn record(path: &Path) -> Value {
    let bytes = std::fs::read(path).unwrap();
    let nl = bytes.iter().position(|&b| b == b'\n').unwrap();
    serde_json::from_slice(&bytes[nl + 1..]).unwrap()
}

fn files(dir: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .map(|e| e.into_path())
        .collect()
}

/// Blob hashes an action entry or memo record names.
fn blobs_of(r: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for b in [&r["artifact"]["blob"], &r["blob"]] {
        if let Some(h) = b["blake3"].as_str() {
            out.insert(h.to_string());
        }
    }
    for o in r["outputs"].as_array().into_iter().flatten() {
        out.insert(o["blob"]["blake3"].as_str().unwrap().to_string());
    }
    out
}

/// Removes from a copied clean cache everything that lets `stage` be served: its entry,
/// every entry sharing a blob with it, those entries' refs, blobs and output files (and
/// with `memo`, every memo record), leaving a cache that still verifies.
fn forget(dir: &Path, stage: &str, memo: bool) {
    let v1 = dir.join(".qpipe/v1");
    let actions: Vec<(PathBuf, Value)> = files(&v1.join("actions"))
        .into_iter()
        .map(|p| {
            let r = record(&p);
            (p, r)
        })
        .collect();
    let mut drop_stages: BTreeSet<String> = BTreeSet::from([stage.to_string()]);
    let mut dropped_blobs: BTreeSet<String> = BTreeSet::new();
    loop {
        let before = (drop_stages.len(), dropped_blobs.len());
        for (_, r) in &actions {
            let s = r["stage"].as_str().unwrap();
            if drop_stages.contains(s) {
                dropped_blobs.extend(blobs_of(r));
            } else if !blobs_of(r).is_disjoint(&dropped_blobs) {
                drop_stages.insert(s.to_string());
            }
        }
        if (drop_stages.len(), dropped_blobs.len()) == before {
            break;
        }
    }
    assert!(
        actions
            .iter()
            .any(|(_, r)| r["stage"].as_str() == Some(stage)),
        "no entry for {stage}"
    );
    for (p, r) in &actions {
        if drop_stages.contains(r["stage"].as_str().unwrap()) {
            std::fs::remove_file(p).unwrap();
            for o in r["outputs"].as_array().into_iter().flatten() {
                let _ = std::fs::remove_file(dir.join("out").join(o["path"].as_str().unwrap()));
            }
        }
    }
    for p in files(&v1.join("refs")) {
        if drop_stages.contains(record(&p)["stage"].as_str().unwrap()) {
            std::fs::remove_file(p).unwrap();
        }
    }
    if memo {
        for p in files(&v1.join("memo")) {
            dropped_blobs.extend(blobs_of(&record(&p)));
            std::fs::remove_file(p).unwrap();
        }
    }
    for p in files(&v1.join("objects")) {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if dropped_blobs.contains(&name) {
            std::fs::remove_file(p).unwrap();
        }
    }
}

/// (point, stage, start from an empty cache). Stages of push_student: freeze → strip →
/// fp16; int8@{DEFAULT,OPTIMIZE_FOR_SIZE} (calibration memo); exports of each; validates.
const POINTS: [(&str, &str, bool); 20] = [
    ("run", "freeze", true),
    ("store", "freeze", true),
    ("action", "strip", true),
    ("publish", "freeze", false),
    ("ref", "freeze", false),
    ("done", "freeze", false),
    ("run", "strip", false),
    ("store", "strip", false),
    ("store", "fp16", false),
    ("output", "frozen_pb", false),
    ("outblob", "tflite_float", false),
    ("publish", "tflite_fp16", false),
    ("memo", "int8@DEFAULT", false),
    ("store", "int8@DEFAULT", false),
    ("action", "int8@OPTIMIZE_FOR_SIZE", false),
    ("run", "check_fp16", false),
    ("output", "check_int8@DEFAULT", false),
    ("ref", "check_int8@OPTIMIZE_FOR_SIZE", false),
    ("output", "tflite_int8@DEFAULT", false),
    ("publish", "tflite_int8@OPTIMIZE_FOR_SIZE", false),
];

#[test]
fn push_student_killed_at_twenty_points_reruns_to_identical_outputs() {
    let clean = project("clean");
    let (out, v) = run_json(&clean);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stages: Vec<String> = v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    let want = tree(&clean.join("out"));
    assert!(want.len() >= 8, "{:?}", want.keys());

    let mut tested_stages = BTreeSet::new();
    for (n, &(point, stage, cold)) in POINTS.iter().enumerate() {
        assert!(stages.iter().any(|s| s == stage), "{stage} is not a stage");
        tested_stages.insert(stage);
        let what = format!("kill {n} at {point}:{stage}");
        let dir = project(&format!("{n}"));
        if !cold {
            copy_tree(&clean.join(".qpipe"), &dir.join(".qpipe"));
            copy_tree(&clean.join("out"), &dir.join("out"));
            forget(&dir, stage, point == "memo");
            verify(&dir, &format!("{what}, before the run"));
        }
        kill_at(qpipe(&dir, &["run", "recipe.toml"]), point, stage);
        verify(&dir, &format!("{what}, after the kill"));

        let (out, v) = run_json(&dir);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{what}: rerun: {}",
            text(&out.stderr)
        );
        let status = status_of(&v, stage);
        // A stage killed before its entry was published must run again; after (a kill
        // while writing its ref, or once it is done) its entry serves the rerun.
        let want_status = if matches!(point, "ref" | "done") {
            "cached"
        } else {
            "ran"
        };
        assert_eq!(status, want_status, "{what}: {v}");
        assert_eq!(
            tree(&dir.join("out")),
            want,
            "{what}: outputs differ from a clean run's"
        );
        verify(&dir, &format!("{what}, after the rerun"));
        let _ = std::fs::remove_dir_all(&dir);
    }
    assert!(tested_stages.len() >= 12, "{tested_stages:?}");
}
