//! What a run may do in `out_dir`: stay inside it, and clean up after itself.
//!
//! # Confinement
//!
//! The recipe check on export paths is textual (no `..`, not absolute). A directory
//! inside `out_dir` may still be a symlink to somewhere else, so before an output is
//! written, [`confine`] resolves every existing directory on its way and requires it
//! to stay inside the resolved `out_dir` (unless `allow_outside_out_dir = true`). The
//! file itself is never followed: outputs are written to a temporary file and
//! renamed over the path, which replaces a symlink rather than writing through it.
//!
//! # Pruning
//!
//! Each pipeline keeps `out_dir/.qpipe-manifest-<pipeline name>.json`: the outputs
//! under `out_dir` it wrote in its last successful full run, with their content hash.
//! After the next successful full run (every stage ran or was cached), files in the
//! old manifest that the recipe no longer declares are removed, so a collector of
//! `out/*.tflite` does not ship a model of a stage that was renamed or removed. A file
//! is left alone, with a warning, when its content is no longer what qpipe wrote
//! (someone replaced it), and silently when another pipeline's manifest in the same
//! directory claims it. Files no manifest names were not written by qpipe and are
//! never touched. A run with a failed or skipped stage neither prunes nor rewrites
//! the manifest. Outputs outside `out_dir` (`allow_outside_out_dir`) are not tracked.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::fsutil;
use super::recipe::Recipe;
use super::report::{RunReport, StageStatus};
use super::store::Store;
use crate::error::{Error, Result};

/// The manifest's file name for a pipeline (names are simple ids, see `recipe_check`).
pub fn manifest_name(pipeline: &str) -> String {
    format!(".qpipe-manifest-{pipeline}.json")
}

const MANIFEST_PREFIX: &str = ".qpipe-manifest-";

/// Checks that writing `abs` (under `out_dir` as written) cannot leave the resolved
/// `out_dir` through a symlinked directory. Creates `out_dir` if needed.
pub fn confine(out_dir: &Path, abs: &Path) -> Result<()> {
    let Ok(rel) = abs.strip_prefix(out_dir) else {
        return Err(Error::msg(format!(
            "output {} is not under out_dir {}",
            fsutil::shorten(&abs.display().to_string()),
            out_dir.display()
        )));
    };
    fsutil::create_dir_all(out_dir)?;
    let root = fs::canonicalize(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let mut cur = out_dir.to_path_buf();
    let parents: Vec<Component> = rel
        .parent()
        .map(|p| p.components().collect())
        .unwrap_or_default();
    for c in parents {
        cur.push(c.as_os_str());
        if fs::symlink_metadata(&cur).is_err() {
            break; // created below as a plain directory
        }
        let resolved = fs::canonicalize(&cur).map_err(|e| Error::io(&cur, e))?;
        if !resolved.starts_with(&root) {
            return Err(Error::msg(format!(
                "output {} would be written to {} through the symlink {}, outside out_dir {}; \
                 set allow_outside_out_dir = true in [pipeline] to allow it",
                fsutil::shorten(&rel.display().to_string()),
                fsutil::shorten(
                    &resolved
                        .join(abs.file_name().unwrap_or_default())
                        .display()
                        .to_string()
                ),
                fsutil::shorten(&cur.display().to_string()),
                root.display()
            )));
        }
    }
    Ok(())
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutManifest {
    pipeline: String,
    /// Path relative to `out_dir` → blake3 of the content qpipe wrote.
    files: BTreeMap<String, String>,
}

/// Holds an exclusive lock on the `out_dir` directory itself (no lock file to litter
/// it), so two pipelines sharing it do not prune against half-written manifests.
struct DirLock(#[allow(dead_code)] File);

fn lock_dir(dir: &Path) -> Result<DirLock> {
    let f = File::open(dir).map_err(|e| Error::io(dir, e))?;
    f.lock().map_err(|e| Error::io(dir, e))?;
    Ok(DirLock(f))
}

/// The relative path of an output under `out_dir`, if it is under it.
fn tracked(out_dir: &Path, abs: &Path) -> Option<String> {
    let rel = abs.strip_prefix(out_dir).ok()?;
    let plain = rel.components().all(|c| matches!(c, Component::Normal(_)));
    (plain && !rel.as_os_str().is_empty()).then(|| rel.to_string_lossy().into_owned())
}

fn read_manifest(path: &Path) -> std::result::Result<Option<OutManifest>, String> {
    match fsutil::read_optional(path) {
        Ok(None) => Ok(None),
        Ok(Some(bytes)) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) => Err(e.to_string()),
    }
}

/// After a successful full run: removes the files this pipeline wrote before and no
/// longer declares, and records what it declares now. Returns the removed files
/// (relative to `out_dir`); problems are warnings (`warn`), never a failed run.
pub fn prune(
    recipe: &Recipe,
    store: &Store,
    report: &RunReport,
    warn: &dyn Fn(&str),
) -> Vec<String> {
    let full = report.stages.len() == recipe.stages.len()
        && report
            .stages
            .iter()
            .all(|s| matches!(s.status, StageStatus::Ran | StageStatus::Cached));
    if !full {
        return Vec::new();
    }
    match prune_inner(recipe, store, report, warn) {
        Ok(v) => v,
        Err(e) => {
            warn(&format!("out_dir: not pruned: {e}"));
            Vec::new()
        }
    }
}

fn prune_inner(
    recipe: &Recipe,
    store: &Store,
    report: &RunReport,
    warn: &dyn Fn(&str),
) -> Result<Vec<String>> {
    let out_dir = &recipe.out_dir;
    // Declared outputs under out_dir, with the hash of what the run left there.
    let mut now: BTreeMap<String, String> = BTreeMap::new();
    for (s, r) in recipe.stages.iter().zip(&report.stages) {
        if s.outputs.is_empty() {
            continue;
        }
        let entry = r.key.as_deref().and_then(|k| store.read_action(k).ok());
        for (decl, abs) in &s.outputs {
            let Some(rel) = tracked(out_dir, abs) else {
                continue;
            };
            let hash = entry
                .as_ref()
                .and_then(|e| e.outputs.iter().find(|o| &o.path == decl))
                .map(|o| o.blob.blake3.clone())
                .unwrap_or_default();
            now.insert(rel, hash);
        }
    }
    if now.is_empty() && !out_dir.is_dir() {
        return Ok(Vec::new());
    }
    fsutil::create_dir_all(out_dir)?;
    let _lock = lock_dir(out_dir)?;
    let own = out_dir.join(manifest_name(&recipe.name));
    let old = match read_manifest(&own) {
        Ok(m) => m.unwrap_or_default(),
        Err(e) => {
            warn(&format!(
                "out_dir manifest unreadable ({e}); nothing pruned"
            ));
            OutManifest::default()
        }
    };
    // What the other pipelines sharing this directory wrote.
    let mut others: BTreeSet<String> = BTreeSet::new();
    for e in fs::read_dir(out_dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(MANIFEST_PREFIX) && e.path() != own {
            if let Ok(Some(m)) = read_manifest(&e.path()) {
                others.extend(m.files.into_keys());
            }
        }
    }
    let mut pruned = Vec::new();
    for (rel, hash) in &old.files {
        if now.contains_key(rel) || others.contains(rel) {
            continue;
        }
        let path = out_dir.join(rel);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_file() => {}
            _ => continue, // gone, or replaced by something qpipe does not write
        }
        let same = super::filehash::hash_file(&path).is_ok_and(|h| &h == hash);
        if !same {
            warn(&format!(
                "out_dir: {rel} is no longer declared, but it changed since qpipe wrote it; left in place"
            ));
            continue;
        }
        match fs::remove_file(&path) {
            Ok(()) => {
                remove_empty_parents(out_dir, &path);
                pruned.push(rel.clone());
            }
            Err(e) => warn(&format!("out_dir: cannot remove stale {rel}: {e}")),
        }
    }
    if old.pipeline == recipe.name && old.files == now && pruned.is_empty() {
        return Ok(pruned); // a no-op run leaves out_dir untouched
    }
    let manifest = OutManifest {
        pipeline: recipe.name.clone(),
        files: now,
    };
    let bytes = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| Error::msg(format!("out_dir manifest: {e}")))?;
    fsutil::write_atomic(out_dir, &own, &bytes, &|| {})?;
    Ok(pruned)
}

fn remove_empty_parents(out_dir: &Path, file: &Path) {
    let mut dir: Option<PathBuf> = file.parent().map(Path::to_path_buf);
    while let Some(d) = dir {
        if d == out_dir || !d.starts_with(out_dir) || fs::remove_dir(&d).is_err() {
            break;
        }
        dir = d.parent().map(Path::to_path_buf);
    }
}
