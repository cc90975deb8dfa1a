//! Running a recipe: schedule stages over the DAG on a thread pool, serve what the
//! cache has, build the rest, publish results, restore and write outputs.
//!
//! A built stage's dependents start as soon as its artifact is hashed (its hash is
//! part of their keys); storing it (blobs, output files, fsyncs, then the entry) is
//! done meanwhile by one persister thread, first in first out, with the stage's key
//! lock held until the entry is published. The run ends when the persister is done;
//! a failure to store is that stage's failure. A kill at any point still leaves
//! either no entry or a complete one.
//!
//! Test hook (not a user feature): `QPIPE_TEST_PAUSE=<point>:<stage id>` makes the run
//! print `qpipe-test-pause <point> <stage id>` on stderr and block forever when that
//! stage reaches `<point>`, so a test can SIGKILL it at a known place. Points: `run`
//! (inputs ready, stage not started), `memo` (half of a memo's blob written), `store`
//! (half of the artifact blob written to a temporary file), `outblob` (half of an
//! output's blob written), `output` (half of an output file written to a temporary
//! file), `publish` (all blobs and outputs written, entry not yet published), `action`
//! (half of the entry written), `ref` (half of the stage's ref written), `done` (the
//! stage's entry and ref are written).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use serde_json::Value;

use super::dag::Dag;
use super::explain::{self, DirtyReason};
use super::filehash::{FileHasher, Hashed};
use super::fingerprint::{self, FileDigest, InputDigest, Manifest, KEY_FORMAT};
use super::fsutil::{self, FileLock};
use super::recipe::{ExternalFile, Recipe};
use super::report::{RunReport, StageReport, StageStatus, StatusReport, StatusRow};
use super::store::{self, ActionEntry, ArtifactRef, Miss, OutputRef, StageRef, Store};
use crate::error::{Error, Result};
use crate::ir;
use crate::stages::{Artifact, DatasetSpec, Memo, ModelSource, ModelSpec, StageContext};

/// How to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Stages run at once (at least 1).
    pub jobs: usize,
    /// After a failure, start nothing new (default: keep going with what does not depend on it).
    pub fail_fast: bool,
    /// Blobs up to this size are rehashed on every cache hit; larger ones are only
    /// size-checked on a hit and rehashed when read (default [`store::VERIFY_ON_HIT_MAX`]).
    pub verify_on_hit_max: u64,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            jobs: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            fail_fast: false,
            verify_on_hit_max: store::VERIFY_ON_HIT_MAX,
        }
    }
}

/// What happens during a run, for progress display.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// A stage's key is not in the cache; `reason` says why (for `-v`).
    Dirty {
        id: &'a str,
        reason: &'a DirtyReason,
    },
    Running {
        id: &'a str,
    },
    Cached {
        id: &'a str,
    },
    Ran {
        id: &'a str,
        seconds: f64,
    },
    Failed {
        id: &'a str,
        error: &'a str,
    },
    Skipped {
        id: &'a str,
        reason: &'a str,
    },
    /// An output file was missing or changed and was restored from the cache.
    Restored {
        id: &'a str,
        path: &'a Path,
    },
    Warning(&'a str),
}

/// Receives [`Event`]s (from several threads).
pub trait Observer: Sync {
    fn event(&self, event: Event<'_>);

    /// Where stage `id` draws counts of its long work (nowhere by default).
    fn progress(&self, _id: &str) -> crate::progress::Progress {
        crate::progress::Progress::disabled()
    }
}

/// An observer that ignores everything.
pub struct Silent;

impl Observer for Silent {
    fn event(&self, _: Event<'_>) {}
}

/// Runs `recipe`: builds what is out of date, serves the rest from the cache.
/// Stage failures are in the report (`ok == false`); `Err` is for failures of the
/// run itself (an unusable cache directory).
pub fn run(recipe: &Recipe, opts: &RunOptions, observer: &dyn Observer) -> Result<RunReport> {
    let store = Store::open(&recipe.cache_dir).map_err(|e| e.context("cache directory"))?;
    let _run_lock = store.run_lock()?;
    let (hasher, warning) = FileHasher::load(store.stat_cache_path());
    if let Some(w) = warning {
        observer.event(Event::Warning(&format!("stat cache: {w}")));
    }
    let dag = Dag::new(recipe);
    let n = recipe.stages.len();
    let engine = Engine::new(
        recipe,
        &dag,
        store,
        hasher,
        observer,
        opts.verify_on_hit_max,
    );
    let mut results: Vec<Option<StageReport>> = (0..n).map(|_| None).collect();
    let mut indegree: Vec<usize> = (0..n).map(|i| dag.upstream(i).len()).collect();
    // Stage workers are plain threads, not rayon tasks: stages use rayon inside, and a
    // rayon worker waiting in a stage's parallel loop may steal another queued task, so
    // a sibling stage could start on top of one that holds a lock it needs.
    let (job_tx, job_rx) = mpsc::channel::<usize>();
    let job_rx = Mutex::new(job_rx);
    let (res_tx, res_rx) = mpsc::channel::<Msg>();
    let (persist_tx, persist_rx) = mpsc::channel::<Persist>();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let workers_started = std::thread::scope(|scope| {
        let mut started = 0usize;
        for w in 0..opts.jobs.clamp(1, n.max(1)) {
            let job_rx = &job_rx;
            let res_tx = res_tx.clone();
            let engine = &engine;
            let stop = &stop;
            let spawned = std::thread::Builder::new()
                .name(format!("qpipe-stage-{w}"))
                .spawn_scoped(scope, move || loop {
                    let next = lock(job_rx).recv();
                    let Ok(i) = next else { break };
                    let r = (!stop.load(std::sync::atomic::Ordering::SeqCst))
                        .then(|| engine.execute(i));
                    if res_tx.send(Msg::Stage(i, r)).is_err() {
                        break;
                    }
                });
            started += spawned.is_ok() as usize;
        }
        // One persister, first in first out: a stage's blobs are durable before any
        // dependent that passes its artifact through publishes an entry naming them.
        {
            let res_tx = res_tx.clone();
            let engine = &engine;
            let spawned = std::thread::Builder::new()
                .name("qpipe-store".into())
                .spawn_scoped(scope, move || {
                    for job in persist_rx {
                        let i = job.i;
                        let held = job.held_bytes();
                        // A panic here must still report back, or the run would wait forever.
                        let r = catch_unwind(AssertUnwindSafe(|| engine.persist(job)))
                            .unwrap_or_else(|_| {
                                Err(Error::msg("storing panicked (a bug in qpipe)"))
                            })
                            .map_err(|e| e.to_string());
                        engine.backlog.release(held);
                        if res_tx.send(Msg::Stored(i, r)).is_err() {
                            break;
                        }
                    }
                });
            if spawned.is_ok() {
                *lock(&engine.persist_tx) = Some(persist_tx);
            }
        }
        drop(res_tx);
        if started == 0 {
            lock(&engine.persist_tx).take();
            return 0;
        }
        let mut ready: BinaryHeap<Reverse<usize>> =
            (0..n).filter(|&i| indegree[i] == 0).map(Reverse).collect();
        let mut running = 0usize;
        // Stages handed to the persister minus those it reported back. A stage's
        // `Stored` can arrive before its own `Stage` message, so this may dip below 0.
        let mut storing = 0isize;
        let mut store_errors: Vec<(usize, String)> = Vec::new();
        let mut stopped = false;
        loop {
            while let Some(Reverse(i)) = ready.pop().filter(|_| !stopped) {
                if job_tx.send(i).is_err() {
                    break;
                }
                running += 1;
            }
            if running == 0 && storing == 0 {
                break;
            }
            let Ok(msg) = res_rx.recv() else { break };
            let (i, r) = match msg {
                Msg::Stage(i, r) => (i, r),
                Msg::Stored(i, r) => {
                    storing -= 1;
                    if let Err(error) = r {
                        let error = Error::msg(format!("storing its result: {error}"))
                            .context(format!("stage '{}'", recipe.stages[i].id))
                            .to_string();
                        let stage = &recipe.stages[i];
                        observer.event(Event::Failed {
                            id: &stage.id,
                            error: &error,
                        });
                        store_errors.push((i, error));
                        if opts.fail_fast {
                            stopped = true;
                            stop.store(true, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                    continue;
                }
            };
            running -= 1;
            let stage = &recipe.stages[i];
            match r {
                None => {}
                Some(Ok(o)) => {
                    storing += o.persisting as isize;
                    match o.status {
                        StageStatus::Cached => observer.event(Event::Cached { id: &stage.id }),
                        _ => observer.event(Event::Ran {
                            id: &stage.id,
                            seconds: o.seconds,
                        }),
                    }
                    results[i] = Some(StageReport {
                        id: stage.id.clone(),
                        kind: stage.kind.to_string(),
                        status: o.status,
                        seconds: o.seconds,
                        key: Some(o.key),
                        metrics: o.metrics,
                        error: None,
                    });
                    for d in dag.dependents(i) {
                        indegree[d] -= 1;
                        if indegree[d] == 0 && results[d].is_none() {
                            ready.push(Reverse(d));
                        }
                    }
                }
                Some(Err(f)) => {
                    observer.event(Event::Failed {
                        id: &stage.id,
                        error: &f.error,
                    });
                    results[i] = Some(StageReport {
                        id: stage.id.clone(),
                        kind: stage.kind.to_string(),
                        status: StageStatus::Failed,
                        seconds: f.seconds,
                        key: f.key,
                        metrics: serde_json::Map::new(),
                        error: Some(f.error),
                    });
                    let reason = format!("upstream stage '{}' failed", stage.id);
                    for d in dag.downstream_closure(i) {
                        if results[d].is_none() {
                            observer.event(Event::Skipped {
                                id: &recipe.stages[d].id,
                                reason: &reason,
                            });
                            results[d] = Some(skipped(recipe, d, &reason));
                        }
                    }
                    if opts.fail_fast {
                        stopped = true;
                        stop.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                }
            }
            engine.release_inputs(i);
        }
        drop(job_tx);
        lock(&engine.persist_tx).take();
        for (i, error) in store_errors {
            if let Some(report) = results[i].as_mut() {
                report.status = StageStatus::Failed;
                report.error = Some(error);
            }
        }
        started
    });
    if workers_started == 0 {
        return Err(Error::msg("cannot start worker threads"));
    }
    for (i, r) in results.iter_mut().enumerate() {
        if r.is_none() {
            let reason = "not started: the run stopped after a failure (--fail-fast)";
            observer.event(Event::Skipped {
                id: &recipe.stages[i].id,
                reason,
            });
            *r = Some(skipped(recipe, i, reason));
        }
    }
    if let Err(e) = engine.hasher.save(&engine.store.tmp_dir()) {
        observer.event(Event::Warning(&format!("cannot save the stat cache: {e}")));
    }
    let stages: Vec<StageReport> = results.into_iter().flatten().collect();
    let mut report = RunReport {
        pipeline: recipe.name.clone(),
        ok: stages
            .iter()
            .all(|s| matches!(s.status, StageStatus::Ran | StageStatus::Cached)),
        stages,
        pruned: Vec::new(),
    };
    report.pruned = super::outdir::prune(recipe, &engine.store, &report, &|w| {
        observer.event(Event::Warning(w))
    });
    if let Err(e) = super::lastrun::record(&engine.store, &report) {
        observer.event(Event::Warning(&format!(
            "cannot record the run's outcome: {e}"
        )));
    }
    Ok(report)
}

fn skipped(recipe: &Recipe, i: usize, reason: &str) -> StageReport {
    StageReport {
        id: recipe.stages[i].id.clone(),
        kind: recipe.stages[i].kind.to_string(),
        status: StageStatus::Skipped,
        seconds: 0.0,
        key: None,
        metrics: serde_json::Map::new(),
        error: Some(reason.to_string()),
    }
}

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

type Inspection = (StatusReport, Vec<Option<ActionEntry>>);

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
fn stage_manifest<'r>(
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
fn check_entry(
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

fn artifact_kind(a: &Artifact) -> &'static str {
    match a {
        Artifact::Graph(_) => "graph",
        Artifact::Report(_) => "report",
    }
}

/// Streams an artifact's stored form (IR serialization or canonical JSON) to `sink`.
fn encode_artifact(a: &Artifact, sink: &mut dyn FnMut(&[u8])) {
    match a {
        Artifact::Graph(g) => ir::serialize::encode_to(g, sink),
        Artifact::Report(v) => sink(&fingerprint::canonical_json(v)),
    }
}

fn decode_artifact(kind: &str, bytes: &[u8]) -> std::result::Result<Artifact, String> {
    match kind {
        "graph" => ir::serialize::decode(bytes)
            .map(|g| Artifact::Graph(Arc::new(g)))
            .map_err(|e| e.to_string()),
        "report" => serde_json::from_slice::<Value>(bytes)
            .map(Artifact::Report)
            .map_err(|e| e.to_string()),
        other => Err(format!("unknown artifact kind '{other}'")),
    }
}

struct Outcome {
    status: StageStatus,
    key: String,
    seconds: f64,
    metrics: serde_json::Map<String, Value>,
    /// Built, and handed to the persister: a `Stored` message follows.
    persisting: bool,
}

/// A built stage's result on its way into the store.
struct Persist {
    i: usize,
    entry: ActionEntry,
    artifact: Arc<Artifact>,
    /// The artifact is an input's, stored by that stage's own (earlier) persist job.
    passed_through: bool,
    files: Vec<PendingFile>,
    /// The stage's key lock, held until its entry is published.
    lock: Option<FileLock>,
}

impl Persist {
    /// Memory only this job keeps alive: its output files' bytes.
    fn held_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes.len() as u64).sum()
    }
}

/// Output bytes waiting in the persister's queue. A stage whose outputs would take it
/// over the budget waits for room, so that writing behind the computation never costs
/// more memory than this (a lone job larger than the budget waits for an empty queue).
/// A waiting stage holds its worker, so a budget below two large exports idles the
/// CPU: on the 200k x 256 TextCNN (two 200 MB exports) 160 MiB gave 6.0 s and 0.72 GB
/// peak, 448 MiB 4.8-5.6 s and 0.97 GB.
struct Backlog {
    bytes: Mutex<u64>,
    room: std::sync::Condvar,
}

const BACKLOG_BUDGET: u64 = 448 << 20;

impl Backlog {
    fn acquire(&self, n: u64) {
        let mut held = lock(&self.bytes);
        while *held > 0 && *held + n > BACKLOG_BUDGET {
            held = self.room.wait(held).unwrap_or_else(|p| p.into_inner());
        }
        *held += n;
    }

    fn release(&self, n: u64) {
        let mut held = lock(&self.bytes);
        *held = held.saturating_sub(n);
        self.room.notify_all();
    }
}

struct PendingFile {
    decl: String,
    abs: std::path::PathBuf,
    bytes: Vec<u8>,
    blob: store::BlobRef,
}

enum Msg {
    /// A stage finished (`None`: not started, the run is stopping).
    Stage(usize, Option<std::result::Result<Outcome, Failure>>),
    /// A built stage's result is stored, or why it could not be.
    Stored(usize, std::result::Result<(), String>),
}

struct Failure {
    key: Option<String>,
    seconds: f64,
    error: String,
}

/// A finished stage, as its dependents see it.
struct Done {
    key: String,
    manifest: Manifest,
    artifact: ArtifactRef,
}

#[derive(Default)]
struct Slot {
    value: Option<Arc<Artifact>>,
    /// The stored copy failed to load (do not retry it; rebuild instead).
    store_bad: bool,
    /// Dependents that have not finished yet; at zero the in-memory artifact is dropped.
    consumers_left: usize,
}

struct Node {
    done: OnceLock<Done>,
    slot: Mutex<Slot>,
}

struct Engine<'r> {
    recipe: &'r Recipe,
    dag: &'r Dag,
    store: Store,
    hasher: FileHasher,
    observer: &'r dyn Observer,
    nodes: Vec<Node>,
    /// What stages that do not declare `deps().model` see of the model: no files.
    hidden_model: ModelSpec,
    pause: Option<(String, String)>,
    verify_max: u64,
    /// Where built stages go to be stored while their dependents run (none: store inline).
    persist_tx: Mutex<Option<mpsc::Sender<Persist>>>,
    backlog: Backlog,
}

thread_local! {
    static HELD_KEYS: std::cell::RefCell<BTreeSet<String>> = const { std::cell::RefCell::new(BTreeSet::new()) };
}

/// A key lock, re-entrant within a thread (a stage rebuilding an upstream stage that
/// happens to have the same key must not wait for itself).
struct KeyGuard {
    key: String,
    lock: Option<FileLock>,
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<'r> Engine<'r> {
    fn new(
        recipe: &'r Recipe,
        dag: &'r Dag,
        store: Store,
        hasher: FileHasher,
        observer: &'r dyn Observer,
        verify_max: u64,
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
                bytes: Mutex::new(0),
                room: std::sync::Condvar::new(),
            },
        }
    }

    fn warn(&self, msg: &str) {
        self.observer.event(Event::Warning(msg));
    }

    fn pause_point(&self, point: &str, i: usize) {
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

    fn execute(&self, i: usize) -> std::result::Result<Outcome, Failure> {
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
        let reason = match self.lookup(i, &key) {
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
        }
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
    fn write_ref(&self, i: usize, manifest: &Manifest, key: &str) {
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

    /// Stores what [`Engine::build`] made durable (artifact blob, output blobs, output
    /// files), then publishes its entry and ref, in that order, and releases its key lock.
    fn persist(&self, job: Persist) -> Result<()> {
        let i = job.i;
        // The files under out_dir are written on a second thread while the blobs are:
        // copying into the page cache is most of a large stage's storing time.
        let (blobs, outputs) = std::thread::scope(|scope| {
            let outputs = scope.spawn(|| -> Result<()> {
                for f in &job.files {
                    self.write_output(i, &f.abs, &f.bytes, &f.blob.blake3)?;
                }
                Ok(())
            });
            let blobs = self.persist_blobs(&job);
            let outputs = outputs
                .join()
                .unwrap_or_else(|_| Err(Error::msg("writing the output files panicked")));
            (blobs, outputs)
        });
        blobs?;
        outputs?;
        self.pause_point("publish", i);
        self.store
            .publish_action(&job.entry, &|| self.pause_point("action", i))?;
        self.write_ref(i, &job.entry.manifest, &job.entry.key);
        drop(job);
        self.pause_point("done", i);
        Ok(())
    }

    /// The artifact's blob (unless an input's, already stored) and the output files' blobs.
    fn persist_blobs(&self, job: &Persist) -> Result<()> {
        let i = job.i;
        let blob = &job.entry.artifact.blob;
        let produce = |sink: &mut dyn FnMut(&[u8])| encode_artifact(&job.artifact, sink);
        if !(job.passed_through && self.store.check_blob(blob, false).is_ok()) {
            if job.passed_through {
                let actual = store::blob_ref_of(&produce);
                if &actual != blob {
                    return Err(Error::msg(
                        "its input's artifact could not be stored (see that stage's error)",
                    ));
                }
            }
            self.store
                .put_blob_with(blob, &produce, &|| self.pause_point("store", i))?;
        }
        for f in &job.files {
            let half = f.bytes.len() / 2;
            self.store.put_blob_with(
                &f.blob,
                &|sink| {
                    sink(&f.bytes[..half]);
                    sink(&f.bytes[half..]);
                },
                &|| self.pause_point("outblob", i),
            )?;
        }
        Ok(())
    }

    /// Writes an output file under `out_dir` atomically, unless it already has these bytes.
    fn write_output(&self, i: usize, abs: &Path, bytes: &[u8], blake3: &str) -> Result<()> {
        let dir = abs.parent().unwrap_or(Path::new("."));
        if !self.recipe.allow_outside_out_dir {
            super::outdir::confine(&self.recipe.out_dir, abs)?;
        }
        fsutil::create_dir_all(dir)?;
        let _lock = self.store.output_lock(abs)?;
        if matches!(self.hasher.hash(abs), Ok(h) if h.blake3 == blake3) {
            return Ok(());
        }
        if let Some(name) = abs.file_name().map(|n| n.to_string_lossy().into_owned()) {
            // Temporary files for this output left by a killed run (we hold its lock).
            let orphan_prefix = format!(".{name}.qpipe-tmp.");
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if e.file_name().to_string_lossy().starts_with(&orphan_prefix) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        fsutil::write_atomic(dir, abs, bytes, &|| self.pause_point("output", i))
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
    fn release_inputs(&self, i: usize) {
        for u in self.dag.upstream(i) {
            let mut slot = lock(&self.nodes[u].slot);
            slot.consumers_left = slot.consumers_left.saturating_sub(1);
            if slot.consumers_left == 0 {
                slot.value = None;
            }
        }
    }
}

/// [`Memo`] over the store, keyed under the running stage's manifest (minus config).
struct StoreMemo<'e, 'r> {
    engine: &'e Engine<'r>,
    stage: usize,
    base: [u8; 32],
    used: Mutex<BTreeSet<String>>,
}

impl Memo for StoreMemo<'_, '_> {
    fn get_or_compute(
        &self,
        name: &str,
        key: &[u8],
        compute: &mut dyn FnMut() -> Result<Vec<u8>>,
    ) -> Result<Vec<u8>> {
        let mut h = blake3::Hasher::new();
        h.update(b"qpipe memo\0");
        h.update(&self.base);
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(&(key.len() as u64).to_le_bytes());
        h.update(key);
        let mkey = h.finalize().to_hex().to_string();
        lock(&self.used).insert(mkey.clone());
        let store = &self.engine.store;
        let id = &self.engine.recipe.stages[self.stage].id;
        let warn_corrupt = |m: Miss| {
            if let Miss::Corrupt(why) = m {
                self.engine.warn(&format!(
                    "stage '{id}': memo '{name}' is corrupt ({why}); recomputing"
                ));
            }
        };
        match store.read_memo(&mkey) {
            Ok(v) => return Ok(v),
            Err(m) => warn_corrupt(m),
        }
        let _lock = store.memo_lock(&mkey)?;
        if let Ok(v) = store.read_memo(&mkey) {
            return Ok(v);
        }
        let value = compute()?;
        let mid_write = || self.engine.pause_point("memo", self.stage);
        if let Err(e) = store.publish_memo(&mkey, name, &value, &mid_write) {
            self.engine
                .warn(&format!("stage '{id}': cannot cache memo '{name}': {e}"));
        }
        Ok(value)
    }
}
