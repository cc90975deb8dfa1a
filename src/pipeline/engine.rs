//! The engine of a run: one stage's lookup, build or cache hit, with its key lock, the
//! artifacts kept in memory for dependents, and rebuilding what the store lost.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use serde_json::Value;

use super::artifact_codec::{artifact_kind, decode_artifact, encode_artifact};
use super::dag::Dag;
use super::explain::{self, DirtyReason};
use super::filehash::{FileHasher, Hashed};
use super::fingerprint::{self, Manifest};
use super::fsutil::FileLock;
use super::persist::{Backlog, PendingFile, Persist, StoreMemo};
use super::recipe::{ExternalFile, Recipe};
use super::report::StageStatus;
use super::run::{Event, Observer};
use super::status::{check_entry, stage_manifest};
use super::store::{self, ActionEntry, ArtifactRef, Miss, OutputRef, StageRef, Store};
use crate::error::{Error, Result};
use crate::spec::{DatasetSpec, ModelSource, ModelSpec};
use crate::stages::{Artifact, StageContext};

pub(super) struct Outcome {
    pub(super) status: StageStatus,
    pub(super) key: String,
    pub(super) seconds: f64,
    pub(super) metrics: serde_json::Map<String, Value>,
    /// Built, and handed to the persister: a `Stored` message follows.
    pub(super) persisting: bool,
    /// A cache hit fetched from the remote cache.
    pub(super) remote_hit: bool,
}

pub(super) enum Msg {
    /// A stage finished (`None`: not started, the run is stopping).
    Stage(usize, Option<std::result::Result<Outcome, Failure>>),
    /// A built stage's result is stored, or why it could not be.
    Stored(usize, std::result::Result<(), String>),
}

pub(super) struct Failure {
    pub(super) key: Option<String>,
    pub(super) seconds: f64,
    pub(super) error: String,
}

/// A finished stage, as its dependents see it.
pub(super) struct Done {
    pub(super) key: String,
    pub(super) manifest: Manifest,
    pub(super) artifact: ArtifactRef,
}

#[derive(Default)]
pub(super) struct Slot {
    pub(super) value: Option<Arc<Artifact>>,
    /// The stored copy failed to load (do not retry it; rebuild instead).
    pub(super) store_bad: bool,
    /// Dependents that have not finished yet; at zero the in-memory artifact is dropped.
    pub(super) consumers_left: usize,
}

pub(super) struct Node {
    pub(super) done: OnceLock<Done>,
    pub(super) slot: Mutex<Slot>,
}

pub(super) struct Engine<'r> {
    pub(super) recipe: &'r Recipe,
    pub(super) dag: &'r Dag,
    pub(super) store: Store,
    pub(super) hasher: FileHasher,
    pub(super) observer: &'r dyn Observer,
    pub(super) nodes: Vec<Node>,
    /// What stages that do not declare `deps().model` see of the model: no files.
    pub(super) hidden_model: ModelSpec,
    pub(super) pause: Option<(String, String)>,
    pub(super) verify_max: u64,
    /// Where built stages go to be stored while their dependents run (none: store inline).
    pub(super) persist_tx: Mutex<Option<mpsc::Sender<Persist>>>,
    pub(super) backlog: Backlog,
    pub(super) remote: Option<Arc<super::remote::Remote>>,
}

thread_local! {
    static HELD_KEYS: std::cell::RefCell<BTreeSet<String>> = const { std::cell::RefCell::new(BTreeSet::new()) };
}

/// A key lock, re-entrant within a thread (a stage rebuilding an upstream stage that
/// happens to have the same key must not wait for itself).
pub(super) struct KeyGuard {
    pub(super) key: String,
    pub(super) lock: Option<FileLock>,
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        if self.lock.take().is_some() {
            HELD_KEYS.with(|h| h.borrow_mut().remove(&self.key));
        }
    }
}

impl KeyGuard {
    /// The lock itself, to hold on another thread (`None` if an outer guard holds it).
    fn detach(mut self) -> Option<FileLock> {
        let lock = self.lock.take();
        if lock.is_some() {
            HELD_KEYS.with(|h| h.borrow_mut().remove(&self.key));
        }
        lock
    }
}

fn key_lock(store: &Store, key: &str) -> Result<KeyGuard> {
    if HELD_KEYS.with(|h| h.borrow().contains(key)) {
        return Ok(KeyGuard {
            key: key.to_string(),
            lock: None,
        });
    }
    let lock = store.key_lock(key)?;
    HELD_KEYS.with(|h| h.borrow_mut().insert(key.to_string()));
    Ok(KeyGuard {
        key: key.to_string(),
        lock: Some(lock),
    })
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<'r> Engine<'r> {
    pub(super) fn new(
        recipe: &'r Recipe,
        dag: &'r Dag,
        store: Store,
        hasher: FileHasher,
        observer: &'r dyn Observer,
        verify_max: u64,
        remote: Option<Arc<super::remote::Remote>>,
    ) -> Self {
        let nodes = (0..recipe.stages.len())
            .map(|i| Node {
                done: OnceLock::new(),
                slot: Mutex::new(Slot {
                    consumers_left: dag.dependents(i).len(),
                    ..Slot::default()
                }),
            })
            .collect();
        let pause = std::env::var("QPIPE_TEST_PAUSE").ok().and_then(|v| {
            v.split_once(':')
                .map(|(p, s)| (p.to_string(), s.to_string()))
        });
        Engine {
            recipe,
            dag,
            store,
            hasher,
            observer,
            nodes,
            hidden_model: ModelSpec {
                source: ModelSource::Graph(Default::default()),
                ..recipe.model.clone()
            },
            pause,
            verify_max,
            persist_tx: Mutex::new(None),
            backlog: Backlog {
                budget: super::persist::backlog_budget(),
                bytes: Mutex::new(0),
                room: std::sync::Condvar::new(),
            },
            remote,
        }
    }

    pub(super) fn warn(&self, msg: &str) {
        self.observer.event(Event::Warning(msg));
    }

    pub(super) fn pause_point(&self, point: &str, i: usize) {
        if let Some((p, s)) = &self.pause {
            if p == point && *s == self.recipe.stages[i].id {
                eprintln!("qpipe-test-pause {point} {s}");
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(3600));
                }
            }
        }
    }

    fn done_artifact(&self, i: usize) -> Option<ArtifactRef> {
        self.nodes[i].done.get().map(|d| d.artifact.clone())
    }

    pub(super) fn execute(&self, i: usize) -> std::result::Result<Outcome, Failure> {
        let t0 = Instant::now();
        let mut key = None;
        let r = self.execute_inner(i, &mut key, t0);
        r.map_err(|e| Failure {
            key,
            seconds: t0.elapsed().as_secs_f64(),
            error: e
                .context(format!("stage '{}'", self.recipe.stages[i].id))
                .to_string(),
        })
    }

    fn execute_inner(
        &self,
        i: usize,
        key_out: &mut Option<String>,
        t0: Instant,
    ) -> Result<Outcome> {
        let s = &self.recipe.stages[i];
        // Checked again when each output is written; here so a doomed stage does not run.
        if !self.recipe.allow_outside_out_dir {
            for (_, abs) in &s.outputs {
                super::outdir::confine(&self.recipe.out_dir, abs)?;
            }
        }
        let (manifest, hashes) =
            stage_manifest(self.recipe, i, &self.hasher, &|u| self.done_artifact(u))?;
        let key = manifest.key();
        *key_out = Some(key.clone());
        let local = self.lookup(i, &key);
        if local.is_err() {
            if let Some(entry) = self.remote_entry(i, &key) {
                if let Some(metrics) = self.serve(i, &manifest, entry)? {
                    let mut o = self.outcome(StageStatus::Cached, key, t0, metrics);
                    o.remote_hit = true;
                    return Ok(o);
                }
            }
        }
        let reason = match local {
            Ok(entry) => match self.serve(i, &manifest, entry)? {
                Some(metrics) => return Ok(self.outcome(StageStatus::Cached, key, t0, metrics)),
                None => DirtyReason::EntryCorrupt("an output blob is unusable".into()),
            },
            Err(Miss::Corrupt(why)) => DirtyReason::EntryCorrupt(why),
            Err(Miss::Absent) => match self.store.read_ref(&self.recipe.name, &s.id) {
                Ok(r) => explain::diff(&r.manifest, &manifest),
                Err(_) => DirtyReason::NeverRan,
            },
        };
        self.observer.event(Event::Dirty {
            id: &s.id,
            reason: &reason,
        });
        self.observer.event(Event::Running { id: &s.id });
        let key_lock = key_lock(&self.store, &key)?;
        // Another thread or process may have built it while we waited.
        if let Ok(entry) = self.store.read_action(&key) {
            if check_entry(self.recipe, &self.store, i, &entry, self.verify_max).is_ok() {
                if let Some(metrics) = self.serve(i, &manifest, entry)? {
                    return Ok(self.outcome(StageStatus::Cached, key, t0, metrics));
                }
            }
        }
        let mut job = self.build(i, manifest.clone(), key.clone(), &hashes)?;
        let metrics = job.entry.metrics.clone();
        self.mark_done(i, manifest, &key, &job.entry.artifact);
        job.lock = key_lock.detach();
        let mut outcome = self.outcome(StageStatus::Ran, key, t0, metrics);
        let tx = lock(&self.persist_tx).clone();
        match tx {
            // Dependents start now; the persister thread stores this stage meanwhile.
            Some(tx) => {
                self.backlog.acquire(job.held_bytes());
                outcome.persisting = true;
                if let Err(mpsc::SendError(job)) = tx.send(job) {
                    self.backlog.release(job.held_bytes());
                    outcome.persisting = false;
                    self.persist(job)?;
                }
            }
            None => self.persist(job)?,
        }
        Ok(outcome)
    }

    fn outcome(
        &self,
        status: StageStatus,
        key: String,
        t0: Instant,
        metrics: serde_json::Map<String, Value>,
    ) -> Outcome {
        Outcome {
            status,
            key,
            seconds: t0.elapsed().as_secs_f64(),
            metrics,
            persisting: false,
            remote_hit: false,
        }
    }

    /// Stage `i`'s entry for `key` from the remote cache, downloaded into the store.
    fn remote_entry(&self, i: usize, key: &str) -> Option<ActionEntry> {
        let remote = self.remote.as_ref()?;
        let s = &self.recipe.stages[i];
        let outputs: BTreeSet<&str> = s.outputs.iter().map(|(p, _)| p.as_str()).collect();
        let label = format!("stage '{}'", s.id);
        remote
            .fetch_entry(&self.store, key, &label, &outputs, true, &|w| self.warn(w))
            .map(|doc| doc.entry)
    }

    /// A usable entry for `key`, or why there is none (a corrupt one is also a warning).
    fn lookup(&self, i: usize, key: &str) -> std::result::Result<ActionEntry, Miss> {
        let r = self
            .store
            .read_action(key)
            .and_then(|e| check_entry(self.recipe, &self.store, i, &e, self.verify_max).map(|_| e));
        if let Err(Miss::Corrupt(why)) = &r {
            self.warn(&format!(
                "stage '{}': cache entry {} is corrupt ({why}); rebuilding",
                self.recipe.stages[i].id,
                store::short(key)
            ));
        }
        r
    }

    /// Serves a cache hit: restores missing or changed outputs, records the result.
    /// `None` if an output blob turned out unusable (the caller rebuilds).
    fn serve(
        &self,
        i: usize,
        manifest: &Manifest,
        entry: ActionEntry,
    ) -> Result<Option<serde_json::Map<String, Value>>> {
        let s = &self.recipe.stages[i];
        for (decl, abs) in &s.outputs {
            let Some(o) = entry.outputs.iter().find(|o| &o.path == decl) else {
                return Ok(None);
            };
            if matches!(self.hasher.hash(abs), Ok(h) if h.blake3 == o.blob.blake3) {
                continue;
            }
            let bytes = match self.store.read_blob(&o.blob) {
                Ok(b) => b,
                Err(m) => {
                    let why = match m {
                        Miss::Absent => "missing".to_string(),
                        Miss::Corrupt(w) => w,
                    };
                    self.warn(&format!(
                        "stage '{}': cached copy of output {decl} is unusable ({why}); rebuilding",
                        s.id
                    ));
                    return Ok(None);
                }
            };
            self.write_output(i, abs, &bytes, &o.blob.blake3)?;
            self.observer.event(Event::Restored {
                id: &s.id,
                path: abs,
            });
        }
        let metrics = entry.metrics.clone();
        self.finish(i, manifest.clone(), &entry)?;
        Ok(Some(metrics))
    }

    /// Records stage `i` as done and points its ref at the entry.
    fn finish(&self, i: usize, manifest: Manifest, entry: &ActionEntry) -> Result<()> {
        self.write_ref(i, &manifest, &entry.key);
        self.mark_done(i, manifest, &entry.key, &entry.artifact);
        Ok(())
    }

    /// Points stage `i`'s ref at entry `key` (a failure is only a warning: refs are gc roots
    /// and `status` explanations, not results).
    pub(super) fn write_ref(&self, i: usize, manifest: &Manifest, key: &str) {
        let s = &self.recipe.stages[i];
        let stale_ref = match self.store.read_ref(&self.recipe.name, &s.id) {
            Ok(r) => r.key != key,
            Err(_) => true,
        };
        if stale_ref {
            let r = StageRef {
                pipeline: self.recipe.name.clone(),
                stage: s.id.clone(),
                key: key.to_string(),
                manifest: manifest.clone(),
            };
            if let Err(e) = self.store.write_ref(&r, &|| self.pause_point("ref", i)) {
                self.warn(&format!(
                    "stage '{}': cannot record its cache ref: {e}",
                    s.id
                ));
            }
        }
    }

    /// Lets dependents of stage `i` compute their keys from its artifact.
    fn mark_done(&self, i: usize, manifest: Manifest, key: &str, artifact: &ArtifactRef) {
        let _ = self.nodes[i].done.set(Done {
            key: key.to_string(),
            manifest,
            artifact: artifact.clone(),
        });
    }

    /// Runs stage `i` and hashes its result: what [`Engine::persist`] then stores and
    /// publishes. The caller holds the key lock.
    fn build(
        &self,
        i: usize,
        manifest: Manifest,
        key: String,
        hashes: &[(&ExternalFile, Hashed)],
    ) -> Result<Persist> {
        let s = &self.recipe.stages[i];
        let mut inputs = BTreeMap::new();
        for (k, up) in &s.inputs {
            let a = self.materialize(*up).map_err(|e| {
                e.context(format!(
                    "loading input '{k}' from stage '{}'",
                    self.recipe.stages[*up].id
                ))
            })?;
            inputs.insert(k.clone(), a);
        }
        self.pause_point("run", i);
        let datasets: BTreeMap<String, DatasetSpec> = s
            .deps
            .datasets
            .iter()
            .filter_map(|d| {
                self.recipe
                    .datasets
                    .get(d)
                    .map(|spec| (d.clone(), spec.clone()))
            })
            .collect();
        let memo = StoreMemo {
            engine: self,
            stage: i,
            base: manifest.memo_base(),
            inputs: manifest
                .inputs
                .iter()
                .map(|(k, d)| (k.clone(), d.blake3.clone()))
                .collect(),
            used: Mutex::new(BTreeSet::new()),
        };
        let progress = self.observer.progress(&s.id);
        let ctx = StageContext {
            id: &s.id,
            model: if s.deps.model {
                &self.recipe.model
            } else {
                &self.hidden_model
            },
            datasets: &datasets,
            inputs,
            memo: &memo,
            progress: &progress,
        };
        let t0 = Instant::now();
        let output = match catch_unwind(AssertUnwindSafe(|| s.stage.run(&ctx))) {
            Ok(r) => r?,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                return Err(Error::msg(format!(
                    "stage panicked (a bug in qpipe): {what}"
                )));
            }
        };
        let seconds = t0.elapsed().as_secs_f64();
        // A stage that hands an input graph on unchanged (an export) has that input's
        // artifact: no need to serialize and store it again.
        let passed_through =
            match &output.artifact {
                Artifact::Graph(g) => s.inputs.iter().find_map(|(k, up)| {
                    match ctx.inputs.get(k).map(|a| a.as_ref()) {
                        Some(Artifact::Graph(h)) if Arc::ptr_eq(g, h) => self.done_artifact(*up),
                        _ => None,
                    }
                }),
                Artifact::Report(_) => None,
            };
        drop(ctx);
        for (f, before) in hashes {
            if !self.hasher.unchanged(&f.path, before)? {
                return Err(Error::msg(format!(
                    "input file {} changed while the stage ran; its result was not cached (run again)",
                    f.display
                )));
            }
        }
        let mut files = Vec::new();
        let mut produced = output.files;
        for (decl, abs) in &s.outputs {
            let matching: Vec<usize> = (0..produced.len())
                .filter(|&k| produced[k].path.to_string_lossy() == decl.as_str())
                .collect();
            match matching.as_slice() {
                [k] => {
                    let bytes = std::mem::take(&mut produced[*k].bytes);
                    let blob = store::BlobRef {
                        blake3: fingerprint::blake3_hex(&bytes),
                        size: bytes.len() as u64,
                    };
                    files.push(PendingFile {
                        decl: decl.clone(),
                        abs: abs.clone(),
                        bytes,
                        blob,
                    });
                }
                [] => {
                    return Err(Error::msg(format!(
                        "stage declared output '{decl}' but did not produce it"
                    )))
                }
                _ => return Err(Error::msg(format!("stage produced output '{decl}' twice"))),
            }
        }
        if let Some(extra) = produced.iter().find(|f| {
            !s.outputs
                .iter()
                .any(|(d, _)| f.path.to_string_lossy() == d.as_str())
        }) {
            return Err(Error::msg(format!(
                "stage produced output '{}' that its deps() do not declare (a bug in the stage)",
                extra.path.display()
            )));
        }
        let artifact = Arc::new(output.artifact);
        let (artifact_ref, passed_through) = match passed_through {
            Some(a) => (a, true),
            None => (
                ArtifactRef {
                    kind: artifact_kind(&artifact).to_string(),
                    blob: store::blob_ref_of(&|sink| encode_artifact(&artifact, sink)),
                },
                false,
            ),
        };
        let mut slot = lock(&self.nodes[i].slot);
        if slot.consumers_left > 0 {
            slot.value = Some(artifact.clone());
            slot.store_bad = false;
        }
        drop(slot);
        let memo_used: Vec<String> = lock(&memo.used).iter().cloned().collect();
        Ok(Persist {
            i,
            entry: ActionEntry {
                key,
                stage: s.id.clone(),
                manifest,
                artifact: artifact_ref,
                outputs: files
                    .iter()
                    .map(|f| OutputRef {
                        path: f.decl.clone(),
                        blob: f.blob.clone(),
                    })
                    .collect(),
                metrics: output.metrics,
                memo: memo_used,
                seconds,
            },
            artifact,
            passed_through,
            files,
            lock: None,
        })
    }

    /// The artifact of a finished stage: in memory, from the store (verified), or, if
    /// the stored copy is unusable, rebuilt (its own inputs loaded the same way).
    fn materialize(&self, idx: usize) -> Result<Arc<Artifact>> {
        let mut stack = vec![idx];
        while let Some(&top) = stack.last() {
            if self.try_load(top) {
                stack.pop();
                continue;
            }
            let missing: Vec<usize> = self.recipe.stages[top]
                .inputs
                .iter()
                .map(|(_, u)| *u)
                .filter(|&u| !self.try_load(u))
                .collect();
            if missing.is_empty() {
                self.rebuild(top)?;
                stack.pop();
            } else {
                stack.extend(missing);
            }
        }
        lock(&self.nodes[idx].slot).value.clone().ok_or_else(|| {
            Error::msg(format!(
                "stage '{}' has no artifact",
                self.recipe.stages[idx].id
            ))
        })
    }

    fn try_load(&self, i: usize) -> bool {
        let mut slot = lock(&self.nodes[i].slot);
        if slot.value.is_some() {
            return true;
        }
        if slot.store_bad {
            return false;
        }
        let Some(done) = self.nodes[i].done.get() else {
            return false;
        };
        let loaded = self
            .store
            .read_blob(&done.artifact.blob)
            .map_err(|m| match m {
                Miss::Absent => "missing".to_string(),
                Miss::Corrupt(w) => w,
            })
            .and_then(|bytes| decode_artifact(&done.artifact.kind, &bytes));
        match loaded {
            Ok(a) => {
                slot.value = Some(Arc::new(a));
                true
            }
            Err(why) => {
                slot.store_bad = true;
                drop(slot);
                self.warn(&format!(
                    "stage '{}': cached artifact {} is unusable ({why}); rebuilding it",
                    self.recipe.stages[i].id,
                    store::short(&done.artifact.blob.blake3)
                ));
                false
            }
        }
    }

    /// Rebuilds a finished stage whose stored artifact is unusable; its inputs are loaded.
    fn rebuild(&self, i: usize) -> Result<()> {
        let s = &self.recipe.stages[i];
        let done = self.nodes[i]
            .done
            .get()
            .ok_or_else(|| Error::msg(format!("stage '{}' has not finished", s.id)))?;
        let _key_lock = key_lock(&self.store, &done.key)?;
        if lock(&self.nodes[i].slot).value.is_some() {
            return Ok(());
        }
        let mut hashes = Vec::new();
        for f in self.recipe.external_files(i) {
            let h = self.hasher.hash(&f.path)?;
            if done.manifest.files.get(&f.role).map(|d| &d.blake3) != Some(&h.blake3) {
                return Err(Error::msg(format!(
                    "stage '{}' must be rebuilt, but its input file {} changed during this run",
                    s.id, f.display
                )));
            }
            hashes.push((f, h));
        }
        // Keep the regenerated artifact in memory even if no consumer is counted yet.
        lock(&self.nodes[i].slot).consumers_left += 1;
        let job = self.build(i, done.manifest.clone(), done.key.clone(), &hashes);
        lock(&self.nodes[i].slot).consumers_left -= 1;
        let job = job?;
        let artifact = job.entry.artifact.clone();
        self.persist(job)?;
        if artifact != done.artifact {
            lock(&self.nodes[i].slot).value = None;
            return Err(Error::msg(format!(
                "stage '{}' rebuilt to a different artifact than before (blake3 {} → {}): it is not deterministic",
                s.id,
                store::short(&done.artifact.blob.blake3),
                store::short(&artifact.blob.blake3)
            )));
        }
        Ok(())
    }

    /// Stage `i` finished: its upstream artifacts may leave memory.
    pub(super) fn release_inputs(&self, i: usize) {
        for u in self.dag.upstream(i) {
            let mut slot = lock(&self.nodes[u].slot);
            slot.consumers_left = slot.consumers_left.saturating_sub(1);
            if slot.consumers_left == 0 {
                slot.value = None;
            }
        }
    }
}
