//! Moving entries between the local store and the remote: a run's remote hits and
//! uploads, and `pull` (the keys and entries a recipe's stages have on the remote,
//! for `plan` and `compare`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use super::client::{hash_file, Fault};
use super::{Remote, RemoteDoc, DOC_FORMAT};
use crate::error::{Error, Result};
use crate::pipeline::dag::Dag;
use crate::pipeline::filehash::FileHasher;
use crate::pipeline::fsutil;
use crate::pipeline::recipe::Recipe;
use crate::pipeline::status::{check_entry, stage_manifest};
use crate::pipeline::store::{self, ActionEntry, ArtifactRef, Store};

/// Blobs (by SHA-256) this process found corrupt on the server, or named by an entry
/// found corrupt: uploads replace them even though the server says it has them.
static BAD_BLOBS: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
/// Keys whose entry on the server was unusable: their upload replaces every blob.
static BAD_KEYS: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

fn bad_blobs() -> std::sync::MutexGuard<'static, BTreeSet<String>> {
    BAD_BLOBS.lock().unwrap_or_else(|p| p.into_inner())
}

fn bad_keys() -> std::sync::MutexGuard<'static, BTreeSet<String>> {
    BAD_KEYS.lock().unwrap_or_else(|p| p.into_inner())
}

impl Remote {
    fn report(&self, f: Fault, label: &str, key: &str, warn: &dyn Fn(&str)) {
        match f {
            Fault::Server(why) => {
                if let Some(w) = self.fault(&why) {
                    warn(&w);
                }
            }
            Fault::Corrupt(why) => {
                bad_keys().insert(key.to_string());
                warn(&format!(
                    "{label}: remote cache entry {} is unusable ({why}); treating it as a miss",
                    store::short(key)
                ))
            }
        }
    }

    /// The remote's entry for `key` (stage `label`, declaring `outputs`), checked. With
    /// `blobs`, every blob it names is downloaded (verified) into `store` and the entry
    /// is published there, so that it serves like a local hit.
    pub(crate) fn fetch_entry(
        &self,
        store: &Store,
        key: &str,
        label: &str,
        outputs: &BTreeSet<&str>,
        blobs: bool,
        warn: &dyn Fn(&str),
    ) -> Option<RemoteDoc> {
        if !self.client.is_on() {
            return None;
        }
        let stats = &self.client.stats;
        let bytes = match self.client.get_ac(key) {
            Ok(Some(b)) => b,
            Ok(None) => {
                stats.misses.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            Err(f) => {
                self.report(f, label, key, warn);
                return None;
            }
        };
        let corrupt = |why: String| {
            stats.misses.fetch_add(1, Ordering::Relaxed);
            self.report(Fault::Corrupt(why), label, key, warn);
        };
        let doc = match RemoteDoc::decode(key, &bytes) {
            Ok(d) => d,
            Err(why) => {
                corrupt(why);
                return None;
            }
        };
        let named: BTreeSet<&str> = doc.entry.outputs.iter().map(|o| o.path.as_str()).collect();
        if &named != outputs || named.len() != doc.entry.outputs.len() {
            corrupt("its output files are not the stage's declared outputs".into());
            return None;
        }
        if blobs {
            for b in doc.blobs() {
                if store
                    .check_blob(b, b.size <= store::VERIFY_ON_HIT_MAX)
                    .is_ok()
                {
                    continue;
                }
                let sha = &doc.sha256[&b.blake3];
                let tmp = store.tmp_dir().join(fsutil::unique_tmp_name("remote"));
                let got = self.client.get_blob(sha, &b.blake3, b.size, &tmp);
                if let Err(f) = got {
                    let _ = std::fs::remove_file(&tmp);
                    if matches!(f, Fault::Corrupt(_)) {
                        // The rest of the entry is suspect too; the rebuild replaces it all.
                        bad_blobs().extend(doc.sha256.values().cloned());
                        stats.misses.fetch_add(1, Ordering::Relaxed);
                    }
                    self.report(f, label, key, warn);
                    return None;
                }
                if let Err(e) = store.adopt_blob(b, &tmp) {
                    let _ = std::fs::remove_file(&tmp);
                    warn(&format!("{label}: cannot store a downloaded blob: {e}"));
                    return None;
                }
            }
            if let Err(e) = store.publish_action(&doc.entry, &|| {}) {
                warn(&format!("{label}: cannot store the remote entry: {e}"));
                return None;
            }
        }
        stats.hits.fetch_add(1, Ordering::Relaxed);
        Some(doc)
    }

    /// Uploads a published local entry: its blobs the server lacks, then its document.
    pub(crate) fn upload_entry(
        &self,
        store: &Store,
        entry: &ActionEntry,
        label: &str,
        warn: &dyn Fn(&str),
    ) {
        if !self.settings.upload || !self.client.is_on() {
            return;
        }
        let replace_all = bad_keys().contains(&entry.key);
        let mut sha256 = BTreeMap::new();
        let blobs =
            std::iter::once(&entry.artifact.blob).chain(entry.outputs.iter().map(|o| &o.blob));
        for b in blobs {
            if sha256.contains_key(&b.blake3) {
                continue;
            }
            let Some(path) = store.blob_path(b) else {
                return;
            };
            let sha = match hash_file(&path) {
                Ok((sha, b3)) if b3 == b.blake3 => sha,
                Ok(_) => {
                    warn(&format!(
                        "{label}: not uploaded: the local blob {} does not match its hash",
                        store::short(&b.blake3)
                    ));
                    return;
                }
                Err(e) => {
                    warn(&format!("{label}: not uploaded: {}: {e}", path.display()));
                    return;
                }
            };
            let replace = replace_all || bad_blobs().contains(&sha);
            let present = if replace {
                Ok(false)
            } else {
                self.client.has_blob(&sha)
            };
            let sent = match present {
                Ok(true) => Ok(()),
                Ok(false) => self.client.put_blob(&sha, &path, b.size),
                Err(f) => Err(f),
            };
            if let Err(f) = sent {
                self.report(f, label, &entry.key, warn);
                return;
            }
            if replace {
                bad_blobs().remove(&sha);
            }
            sha256.insert(b.blake3.clone(), sha);
        }
        let doc = RemoteDoc {
            qpipe_remote: DOC_FORMAT,
            entry: entry.clone(),
            sha256,
        };
        let bytes = match fsutil::to_checked_json(&doc) {
            Ok(b) => b,
            Err(e) => {
                warn(&format!("{label}: not uploaded: {e}"));
                return;
            }
        };
        match self.client.put_ac(&entry.key, &bytes) {
            Ok(()) => {
                bad_keys().remove(&entry.key);
                self.client.stats.uploads.fetch_add(1, Ordering::Relaxed);
            }
            Err(f) => self.report(f, label, &entry.key, warn),
        }
    }
}

/// Where a stage's result is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Local,
    Remote,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Local => "local",
            Source::Remote => "remote",
        }
    }
}

/// A stage as [`pull`] found it.
#[derive(Debug, Clone, Default)]
pub struct Resolved {
    /// The key, when every upstream stage has a result (local or remote).
    pub key: Option<String>,
    pub cached: Option<Source>,
    pub artifact: Option<ArtifactRef>,
}

/// What [`pull`] found, by stage index.
#[derive(Debug, Clone)]
pub struct PullReport {
    pub stages: Vec<Resolved>,
    /// Entries fetched from the remote into the local store (with `blobs`).
    pub pulled: usize,
}

/// Walks the recipe's stages in order, computing each key from its upstream results,
/// and looks each key up in the local store and then on `remote`. With `blobs`, remote
/// hits are downloaded into the local store (created if needed) so that reading the
/// cache (`compare`, `eval`) sees them; without, only `/ac` documents are read and the
/// local store is left as it is (`plan`).
pub fn pull(
    recipe: &Recipe,
    remote: Option<&Remote>,
    blobs: bool,
    warn: &dyn Fn(&str),
) -> Result<PullReport> {
    let store = if blobs && remote.is_some() {
        Store::open(&recipe.cache_dir).map_err(|e| e.context("cache directory"))?
    } else {
        Store::at(&recipe.cache_dir)
    };
    let _run_lock = if blobs && remote.is_some() {
        Some(store.run_lock()?)
    } else {
        None
    };
    let hasher = if store.exists() {
        FileHasher::load(store.stat_cache_path()).0
    } else {
        FileHasher::ephemeral()
    };
    let dag = Dag::new(recipe);
    let order = dag
        .topo_order()
        .ok_or_else(|| Error::msg("the stage graph has a cycle"))?;
    let mut out: Vec<Resolved> = vec![Resolved::default(); recipe.stages.len()];
    let mut pulled = 0;
    for i in order {
        let s = &recipe.stages[i];
        if s.inputs.iter().any(|(_, up)| out[*up].artifact.is_none()) {
            continue;
        }
        let (manifest, _) = stage_manifest(recipe, i, &hasher, &|u| out[u].artifact.clone())?;
        let key = manifest.key();
        let local = store.exists().then(|| {
            store
                .read_action(&key)
                .ok()
                .filter(|e| check_entry(recipe, &store, i, e, store::VERIFY_ON_HIT_MAX).is_ok())
        });
        if let Some(Some(e)) = local {
            out[i] = Resolved {
                key: Some(key),
                cached: Some(Source::Local),
                artifact: Some(e.artifact),
            };
            continue;
        }
        let outputs: BTreeSet<&str> = s.outputs.iter().map(|(p, _)| p.as_str()).collect();
        let label = format!("stage '{}'", s.id);
        let doc = remote.and_then(|r| r.fetch_entry(&store, &key, &label, &outputs, blobs, warn));
        out[i] = match doc {
            Some(d) => {
                pulled += blobs as usize;
                Resolved {
                    key: Some(key),
                    cached: Some(Source::Remote),
                    artifact: Some(d.entry.artifact),
                }
            }
            None => Resolved {
                key: Some(key),
                cached: None,
                artifact: None,
            },
        };
    }
    Ok(PullReport {
        stages: out,
        pulled,
    })
}
