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
use std::collections::BinaryHeap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::mpsc;
use std::sync::Mutex;

use super::dag::Dag;
use super::engine::{lock, Engine, Msg};
use super::explain::DirtyReason;
use super::filehash::FileHasher;
use super::persist::Persist;
use super::recipe::Recipe;
use super::report::{RunReport, StageReport, StageStatus};
use super::store::{self, Store};
use crate::error::{Error, Result};

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
    /// The shared cache over HTTP (see [`super::remote`]).
    pub remote: Option<std::sync::Arc<super::remote::Remote>>,
    /// Build only these stages (closed upstream: [`super::remote::select_stages`]);
    /// the others are left out of the report.
    pub only: Option<std::collections::BTreeSet<usize>>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            jobs: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            fail_fast: false,
            verify_on_hit_max: store::VERIFY_ON_HIT_MAX,
            remote: None,
            only: None,
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
        opts.remote.clone(),
    );
    let selected = |i: usize| opts.only.as_ref().is_none_or(|s| s.contains(&i));
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
    let workers_started =
        std::thread::scope(|scope| {
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
            let mut ready: BinaryHeap<Reverse<usize>> = (0..n)
                .filter(|&i| indegree[i] == 0 && selected(i))
                .map(Reverse)
                .collect();
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
                        results[i] =
                            Some(StageReport {
                                id: stage.id.clone(),
                                kind: stage.kind.to_string(),
                                status: o.status,
                                seconds: o.seconds,
                                key: Some(o.key),
                                metrics: o.metrics,
                                error: None,
                                cache: (o.status == StageStatus::Cached)
                                    .then_some(if o.remote_hit { "remote" } else { "local" }),
                            });
                        for d in dag.dependents(i) {
                            indegree[d] -= 1;
                            if indegree[d] == 0 && results[d].is_none() && selected(d) {
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
                            cache: None,
                        });
                        let reason = format!("upstream stage '{}' failed", stage.id);
                        for d in dag.downstream_closure(i) {
                            if results[d].is_none() && selected(d) {
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
        if r.is_none() && selected(i) {
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
        remote: opts.remote.as_ref().map(|r| r.summary()),
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
        cache: None,
    }
}
