//! Cache inspection behind `qpipe status` and `qpipe compare`: which stages are fresh for
//! the recipe as it is now, their entries, and loading a stored artifact. Runs and
//! writes nothing.

use std::collections::{BTreeMap, BTreeSet};

use super::artifact_codec::decode_artifact;
use super::dag::Dag;
use super::explain::{self, DirtyReason};
use super::filehash::{FileHasher, Hashed};
use super::fingerprint::{FileDigest, InputDigest, Manifest, KEY_FORMAT};
use super::recipe::{ExternalFile, Recipe};
use super::report::{StatusReport, StatusRow};
use super::store::{self, ActionEntry, ArtifactRef, Miss, Store};
use crate::error::{Error, Result};
use crate::stages::Artifact;

/// Lists every stage as fresh or stale without running or writing anything.
pub fn status(recipe: &Recipe) -> Result<StatusReport> {
    Ok(inspect_cache(recipe)?.0)
}

/// What the cache holds for a recipe's current inputs, by stage index: the entry of
/// every fresh stage (`None` for stale ones). Runs and writes nothing; this is what a
/// report over the last run (such as `qpipe compare`) reads. Load an artifact with
/// [`load_artifact`].
pub fn cached_results(recipe: &Recipe) -> Result<Vec<Option<ActionEntry>>> {
    Ok(inspect_cache(recipe)?.1)
}

/// Reads (verifying its hash) and decodes an artifact named by a cached entry.
pub fn load_artifact(recipe: &Recipe, artifact: &ArtifactRef) -> Result<Artifact> {
    let store = Store::at(&recipe.cache_dir);
    let bytes = store.read_blob(&artifact.blob).map_err(|m| {
        let why = match m {
            Miss::Absent => "missing".to_string(),
            Miss::Corrupt(w) => w,
        };
        Error::msg(format!(
            "cached artifact {} is unusable: {why}",
            store::short(&artifact.blob.blake3)
        ))
    })?;
    decode_artifact(&artifact.kind, &bytes).map_err(|e| Error::msg(format!("cached artifact: {e}")))
}

pub(super) type Inspection = (StatusReport, Vec<Option<ActionEntry>>);

fn inspect_cache(recipe: &Recipe) -> Result<Inspection> {
    let store = Store::at(&recipe.cache_dir);
    let hasher = if store.exists() {
        FileHasher::load(store.stat_cache_path()).0
    } else {
        FileHasher::ephemeral()
    };
    let dag = Dag::new(recipe);
    let order = dag
        .topo_order()
        .ok_or_else(|| Error::msg("the stage graph has a cycle"))?;
    let mut done: Vec<Option<ArtifactRef>> = vec![None; recipe.stages.len()];
    let mut entries: Vec<Option<ActionEntry>> = vec![None; recipe.stages.len()];
    let mut rows: Vec<Option<StatusRow>> = (0..recipe.stages.len()).map(|_| None).collect();
    for i in order {
        let s = &recipe.stages[i];
        let stale_up = s.inputs.iter().find(|(_, up)| done[*up].is_none());
        let row = if let Some((_, up)) = stale_up {
            StatusRow::stale(
                s,
                None,
                DirtyReason::UpstreamStale {
                    stage: recipe.stages[*up].id.clone(),
                },
            )
        } else {
            let (manifest, _) = stage_manifest(recipe, i, &hasher, &|u| done[u].clone())?;
            let key = manifest.key();
            match store.read_action(&key).and_then(|e| {
                check_entry(recipe, &store, i, &e, store::VERIFY_ON_HIT_MAX).map(|_| e)
            }) {
                Ok(entry) => {
                    let missing = first_output_problem(recipe, i, &entry, &hasher);
                    done[i] = Some(entry.artifact.clone());
                    entries[i] = Some(entry);
                    match missing {
                        Some(problem) => StatusRow::fresh_but(s, key, problem),
                        None => StatusRow::fresh(s, key),
                    }
                }
                Err(Miss::Corrupt(why)) => {
                    StatusRow::stale(s, Some(key), DirtyReason::EntryCorrupt(why))
                }
                Err(Miss::Absent) => {
                    let reason = match store.read_ref(&recipe.name, &s.id) {
                        Ok(r) => explain::diff(&r.manifest, &manifest),
                        Err(_) => DirtyReason::NeverRan,
                    };
                    StatusRow::stale(s, Some(key), reason)
                }
            }
        };
        rows[i] = Some(row);
    }
    let report = StatusReport {
        pipeline: recipe.name.clone(),
        stages: rows.into_iter().flatten().collect(),
    };
    Ok((report, entries))
}

/// The manifest of stage `i`, given its upstream artifacts, and the hashes of the
/// files it reads (to check after it ran that they did not change meanwhile).
pub(super) fn stage_manifest<'r>(
    recipe: &'r Recipe,
    i: usize,
    hasher: &FileHasher,
    upstream: &dyn Fn(usize) -> Option<ArtifactRef>,
) -> Result<(Manifest, Vec<(&'r ExternalFile, Hashed)>)> {
    let s = &recipe.stages[i];
    let mut inputs = BTreeMap::new();
    for (key, up) in &s.inputs {
        let a = upstream(*up).ok_or_else(|| {
            Error::msg(format!(
                "upstream stage '{}' has no result",
                recipe.stages[*up].id
            ))
        })?;
        inputs.insert(
            key.clone(),
            InputDigest {
                stage: recipe.stages[*up].id.clone(),
                artifact_kind: a.kind,
                blake3: a.blob.blake3,
            },
        );
    }
    let mut files = BTreeMap::new();
    let mut hashed = Vec::new();
    for f in recipe.external_files(i) {
        let h = hasher
            .hash(&f.path)
            .map_err(|e| e.context(format!("input file {}", f.display)))?;
        files.insert(
            f.role.clone(),
            FileDigest {
                path: f.display.clone(),
                size: h.stat.size,
                blake3: h.blake3.clone(),
            },
        );
        hashed.push((f, h));
    }
    let manifest = Manifest {
        format: KEY_FORMAT,
        qpipe: env!("CARGO_PKG_VERSION").to_string(),
        kind: s.kind.to_string(),
        kind_version: s.stage.version(),
        config: super::fingerprint::config_with_outputs(s.stage.config(), &s.deps.outputs),
        model_io: recipe.model_io(),
        inputs,
        files,
    };
    Ok((manifest, hashed))
}

/// Checks that an entry can serve stage `i`: artifact blob present (and verified when
/// small), and exactly the stage's declared outputs, each blob present (verified when small).
pub(super) fn check_entry(
    recipe: &Recipe,
    store: &Store,
    i: usize,
    e: &ActionEntry,
    verify_max: u64,
) -> std::result::Result<(), Miss> {
    if !matches!(e.artifact.kind.as_str(), "graph" | "report") {
        return Err(Miss::Corrupt(format!(
            "unknown artifact kind '{}'",
            e.artifact.kind
        )));
    }
    let verify = |b: &store::BlobRef| store.check_blob(b, b.size <= verify_max);
    verify(&e.artifact.blob).map_err(absent_is_corrupt)?;
    let declared: BTreeSet<&str> = recipe.stages[i]
        .outputs
        .iter()
        .map(|(p, _)| p.as_str())
        .collect();
    let cached: BTreeSet<&str> = e.outputs.iter().map(|o| o.path.as_str()).collect();
    if declared != cached || e.outputs.len() != cached.len() {
        return Err(Miss::Corrupt(
            "its output files are not the stage's declared outputs".into(),
        ));
    }
    for o in &e.outputs {
        verify(&o.blob).map_err(absent_is_corrupt)?;
    }
    Ok(())
}

fn absent_is_corrupt(m: Miss) -> Miss {
    match m {
        Miss::Absent => Miss::Corrupt("a blob it names is missing".into()),
        other => other,
    }
}

/// The first declared output of a cached stage that is missing or differs from the cache.
fn first_output_problem(
    recipe: &Recipe,
    i: usize,
    e: &ActionEntry,
    hasher: &FileHasher,
) -> Option<String> {
    for (decl, abs) in &recipe.stages[i].outputs {
        let want = e.outputs.iter().find(|o| &o.path == decl)?;
        match hasher.hash(abs) {
            Err(_) => {
                return Some(format!(
                    "output file {} is missing (the next run restores it)",
                    abs.display()
                ))
            }
            Ok(h) if h.blake3 != want.blob.blake3 => {
                return Some(format!(
                    "output file {} was changed (the next run restores it)",
                    abs.display()
                ))
            }
            Ok(_) => {}
        }
    }
    None
}
