//! What a run must survive and must not do: maintenance and other runs beside it,
//! outputs escaping out_dir, stale outputs left in out_dir, renames looking like corruption.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{Project, Seen};
use qpipe::pipeline::store::Store;
use qpipe::pipeline::{self, RunOptions};

fn opts() -> RunOptions {
    RunOptions {
        jobs: 2,
        ..RunOptions::default()
    }
}

/// `cache gc` and `cache verify` looping beside runs on a new cache, and two runs at
/// once: no run may fail. (A run on a new cache wrote CACHEDIR.TAG through v1/tmp
/// before taking its lock, and gc emptied v1/tmp under it.)
#[test]
fn gc_verify_and_other_runs_never_fail_a_run() {
    let p = Project::new("race");
    for round in 0..12 {
        let cache = p.dir.join(format!("cache-{round}"));
        let stop = Arc::new(AtomicBool::new(false));
        let maintenance: Vec<_> = (0..2)
            .map(|which| {
                let (stop, cache) = (stop.clone(), cache.clone());
                std::thread::spawn(move || {
                    let mut passes = 0u32;
                    // Bounded: at most 20k passes even if the runs hang.
                    while !stop.load(Ordering::Relaxed) && passes < 20_000 {
                        let store = Store::at(&cache);
                        // Errors here (no cache yet) are the maintenance command's own.
                        let _ = if which == 0 {
                            store.gc(None).map(|_| ())
                        } else {
                            store.verify().map(|_| ())
                        };
                        passes += 1;
                    }
                })
            })
            .collect();
        let runs: Vec<_> = (0..2)
            .map(|_| {
                let mut recipe = p.load();
                recipe.cache_dir = cache.clone();
                std::thread::spawn(move || {
                    let seen = Seen::default();
                    pipeline::run(&recipe, &opts(), &seen).map(|r| r.ok)
                })
            })
            .collect();
        let results: Vec<_> = runs.into_iter().map(|h| h.join().unwrap()).collect();
        stop.store(true, Ordering::Relaxed);
        for m in maintenance {
            m.join().unwrap();
        }
        for r in results {
            match r {
                Ok(ok) => assert!(ok, "round {round}: a stage failed"),
                Err(e) => panic!("round {round}: the run failed: {e}"),
            }
        }
    }
}

#[test]
fn a_dangling_cache_dir_symlink_is_named() {
    let p = Project::new("dangling-cache");
    let mut recipe = p.load();
    let link = p.dir.join("cache-link");
    std::os::unix::fs::symlink(p.dir.join("gone"), &link).unwrap();
    recipe.cache_dir = link.clone();
    let Err(err) = pipeline::run(&recipe, &opts(), &Seen::default()) else {
        panic!("a dangling cache_dir must fail the run");
    };
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("{} is a dangling symlink", link.display()))
            && msg.contains("gone, which does not exist"),
        "{msg}"
    );
    assert!(!msg.contains("os error 17"), "{msg}");
}
