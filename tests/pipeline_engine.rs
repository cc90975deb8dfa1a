//! The engine in process: freshness, rebuild reasons, early cut-off, outputs, corruption,
//! failures, memo, gc/verify. Stage kinds are the test kinds of `common`.

mod common;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use common::*;
use qpipe::pipeline::store::Store;
use qpipe::pipeline::{self, RunOptions, StageStatus};

const ALL: [&str; 9] = [
    "freeze",
    "strip",
    "float_out",
    "int8@DEFAULT",
    "int8@OPTIMIZE_FOR_SIZE",
    "int8_out@DEFAULT",
    "int8_out@OPTIMIZE_FOR_SIZE",
    "check@DEFAULT",
    "check@OPTIMIZE_FOR_SIZE",
];

fn key_of(report: &pipeline::RunReport, id: &str) -> String {
    report
        .stage(id)
        .and_then(|s| s.key.clone())
        .unwrap_or_else(|| panic!("no key for {id}"))
}

fn action_path(p: &Project, key: &str) -> PathBuf {
    p.cache()
        .join("v1/actions")
        .join(&key[..2])
        .join(format!("{key}.json"))
}

fn artifact_blob_path(p: &Project, key: &str) -> PathBuf {
    let e = Store::at(&p.cache()).read_action(key).unwrap();
    let h = e.artifact.blob.blake3;
    p.cache().join("v1/objects").join(&h[..2]).join(h)
}

#[test]
fn a_second_run_runs_nothing() {
    let p = Project::new("second-run");
    let (r1, seen) = p.run();
    assert!(r1.ok, "{}", r1.to_json());
    assert_eq!(ids(&r1, StageStatus::Ran), sorted(&ALL));
    assert!(seen.warnings().is_empty(), "{:?}", seen.warnings());
    assert_eq!(seen.reason("freeze").as_deref(), Some("never ran"));
    let out1 = p.outputs();
    assert_eq!(
        out1.keys().cloned().collect::<Vec<_>>(),
        [
            "float.bin",
            "int8_DEFAULT.bin",
            "int8_OPTIMIZE_FOR_SIZE.bin"
        ]
    );

    let status = pipeline::status(&p.load()).unwrap();
    assert!(status.all_fresh(), "{}", status.render());
    // What a report over the last run reads: every stage's entry and artifact.
    let recipe = p.load();
    let cached = pipeline::cached_results(&recipe).unwrap();
    let i = recipe.stage_index("check@DEFAULT").unwrap();
    let entry = cached[i].as_ref().unwrap();
    assert_eq!(entry.metrics, r1.stage("check@DEFAULT").unwrap().metrics);
    match pipeline::load_artifact(&recipe, &entry.artifact).unwrap() {
        qpipe::stages::Artifact::Report(v) => assert_eq!(v["candidate_nodes"], 4),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        recipe.stages[i].variant.get("strategy").map(String::as_str),
        Some("DEFAULT")
    );

    let (r2, seen) = p.run();
    assert!(r2.ok);
    assert_eq!(ids(&r2, StageStatus::Cached), sorted(&ALL));
    assert!(seen.warnings().is_empty());
    assert!(seen.dirty.lock().unwrap().is_empty());
    assert_eq!(p.outputs(), out1);
    for id in ALL {
        assert_eq!(key_of(&r1, id), key_of(&r2, id));
        assert_eq!(
            r1.stage(id).unwrap().metrics,
            r2.stage(id).unwrap().metrics,
            "{id}"
        );
    }
}

#[test]
fn changing_one_stage_config_reruns_exactly_it_and_its_dependents() {
    let p = Project::new("config-change");
    p.run();
    p.edit_recipe("tag = \"strip\"", "tag = \"strip2\"");

    let status = pipeline::status(&p.load()).unwrap();
    assert_eq!(status.row("freeze").unwrap().state, "fresh");
    assert_eq!(
        status.row("strip").unwrap().reason.as_deref(),
        Some("config key 'tag' changed (\"strip\" → \"strip2\")")
    );
    assert_eq!(
        status.row("int8@DEFAULT").unwrap().reason.as_deref(),
        Some("upstream stage 'strip' is stale (this stage reruns only if 'strip' changes its output)")
    );

    let (r, seen) = p.run();
    assert!(r.ok);
    assert_eq!(ids(&r, StageStatus::Cached), ["freeze"]);
    let mut rerun: Vec<&str> = ALL.to_vec();
    rerun.retain(|s| *s != "freeze");
    assert_eq!(ids(&r, StageStatus::Ran), sorted(&rerun));
    assert_eq!(
        seen.reason("strip").as_deref(),
        Some("config key 'tag' changed (\"strip\" → \"strip2\")")
    );
    assert!(seen
        .reason("int8@DEFAULT")
        .unwrap()
        .starts_with("upstream stage 'strip' (input) changed its output"));

    // A leaf's config: only that leaf (both variants of it).
    p.edit_recipe(
        "path = \"int8_${strategy}.bin\"",
        "path = \"q_${strategy}.bin\"",
    );
    let (r, _) = p.run();
    assert_eq!(
        ids(&r, StageStatus::Ran),
        sorted(&["int8_out@DEFAULT", "int8_out@OPTIMIZE_FOR_SIZE"])
    );
    assert!(p.out("q_DEFAULT.bin").exists());

    // A new matrix value: only the new variants.
    p.edit_recipe(
        "\"OPTIMIZE_FOR_SIZE\"]",
        "\"OPTIMIZE_FOR_SIZE\", \"OPTIMIZE_FOR_LATENCY\"]",
    );
    let (r, _) = p.run();
    assert_eq!(
        ids(&r, StageStatus::Ran),
        sorted(&[
            "int8@OPTIMIZE_FOR_LATENCY",
            "int8_out@OPTIMIZE_FOR_LATENCY",
            "check@OPTIMIZE_FOR_LATENCY"
        ])
    );
    assert_eq!(r.stages.len(), 12);
}

#[test]
fn a_rerun_that_reproduces_the_same_bytes_rebuilds_nothing_downstream() {
    let p = Project::new("cutoff");
    p.run();
    // `note` is config (so the stage reruns) but does not change its artifact.
    p.edit_recipe(
        "kind = \"t_load\"",
        "kind = \"t_load\"\nnote = \"re-saved\"",
    );
    let (r, seen) = p.run();
    assert_eq!(ids(&r, StageStatus::Ran), ["freeze"]);
    assert_eq!(r.with_status(StageStatus::Cached).len(), ALL.len() - 1);
    assert_eq!(
        seen.reason("freeze").as_deref(),
        Some("config key 'note' changed (\"\" → \"re-saved\")")
    );
}

#[test]
fn touching_files_without_changing_them_reruns_nothing() {
    let p = Project::new("touch");
    let inputs = [
        "ckpt/best_validation.meta",
        "ckpt/best_validation.index",
        "ckpt/best_validation.data-00000-of-00002",
        "ckpt/best_validation.data-00001-of-00002",
        "data/calib_x.npy",
        "data/eval_x.npy",
        "data/eval_y.npy",
    ];
    let touch = |rel: &str, when: SystemTime| {
        let path = p.dir.join(rel);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(when)
            .unwrap();
    };
    // Freshly written files are "racy": hashed on every run, never trusted by stamp.
    p.run();
    for f in inputs {
        touch(f, SystemTime::now());
    }
    let (r, _) = p.run();
    assert_eq!(ids(&r, StageStatus::Cached), sorted(&ALL));

    // Once files are older than the racy window, their stamps are trusted...
    std::thread::sleep(Duration::from_millis(2200));
    let (r, _) = p.run();
    assert_eq!(ids(&r, StageStatus::Cached), sorted(&ALL));
    let stat_cache = std::fs::read_to_string(p.cache().join("v1/stat-cache.json")).unwrap();
    assert!(
        stat_cache.contains("calib_x.npy"),
        "aged files must enter the stat cache"
    );
    for f in inputs {
        touch(f, SystemTime::now() + Duration::from_secs(5));
    }
    let (r, _) = p.run();
    assert_eq!(ids(&r, StageStatus::Cached), sorted(&ALL));

    // ...but a same-size edit with the old mtime put back is still seen (ctime changed).
    let shard = p.dir.join("ckpt/best_validation.data-00000-of-00002");
    let mtime = std::fs::metadata(&shard).unwrap().modified().unwrap();
    std::thread::sleep(Duration::from_millis(2200));
    flip_bit(&shard, 10);
    std::fs::File::options()
        .write(true)
        .open(&shard)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let (r, seen) = p.run();
    assert!(ids(&r, StageStatus::Ran).contains(&"freeze".to_string()));
    assert!(
        seen.reason("freeze")
            .unwrap()
            .starts_with("input file ckpt/best_validation.data-00000-of-00002 changed"),
        "{:?}",
        seen.reason("freeze")
    );
}

#[test]
fn one_changed_byte_reruns_exactly_what_reads_the_file() {
    let p = Project::new("one-byte");
    p.run();
    flip_bit(&p.dir.join("data/calib_x.npy"), 7);
    let (r, seen) = p.run();
    assert_eq!(
        ids(&r, StageStatus::Ran),
        sorted(&[
            "int8@DEFAULT",
            "int8@OPTIMIZE_FOR_SIZE",
            "int8_out@DEFAULT",
            "int8_out@OPTIMIZE_FOR_SIZE",
            "check@DEFAULT",
            "check@OPTIMIZE_FOR_SIZE"
        ])
    );
    assert!(seen
        .reason("int8@DEFAULT")
        .unwrap()
        .starts_with("input file data/calib_x.npy changed (blake3 "));

    // No stage reads the eval set.
    flip_bit(&p.dir.join("data/eval_y.npy"), 3);
    let (r, _) = p.run();
    assert_eq!(ids(&r, StageStatus::Cached), sorted(&ALL));

    // A checkpoint shard: the model reader and everything below it.
    flip_bit(&p.dir.join("ckpt/best_validation.data-00001-of-00002"), 99);
    let (r, seen) = p.run();
    assert_eq!(ids(&r, StageStatus::Ran), sorted(&ALL));
    assert!(seen
        .reason("freeze")
        .unwrap()
        .starts_with("input file ckpt/best_validation.data-00001-of-00002 changed"));
}

#[test]
fn deleted_or_edited_outputs_are_restored_from_the_cache() {
    let p = Project::new("restore");
    p.run();
    let before = p.outputs();
    std::fs::remove_file(p.out("float.bin")).unwrap();
    std::fs::write(p.out("int8_DEFAULT.bin"), b"edited by hand").unwrap();
    let status = pipeline::status(&p.load()).unwrap();
    assert!(status
        .row("float_out")
        .unwrap()
        .reason
        .as_deref()
        .unwrap()
        .contains("is missing"));
    assert!(status
        .row("int8_out@DEFAULT")
        .unwrap()
        .reason
        .as_deref()
        .unwrap()
        .contains("was changed"));
    let (r, seen) = p.run();
    assert_eq!(ids(&r, StageStatus::Cached), sorted(&ALL));
    assert_eq!(p.outputs(), before);
    let mut restored = seen.restored();
    restored.sort();
    assert_eq!(
        restored,
        vec![p.out("float.bin"), p.out("int8_DEFAULT.bin")]
    );
    // Restoring leaves no temporary files behind.
    let names: Vec<String> = std::fs::read_dir(p.dir.join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 4, "three outputs and the manifest: {names:?}");
    assert!(names.contains(&".qpipe-manifest-test_pipeline.json".to_string()));
}

#[test]
fn a_corrupt_cache_entry_is_rebuilt_with_a_warning() {
    let p = Project::new("corrupt-entry");
    let (r1, _) = p.run();
    let out1 = p.outputs();

    flip_bit(&action_path(&p, &key_of(&r1, "strip")), 200);
    let (r, seen) = p.run();
    assert!(r.ok);
    assert_eq!(
        ids(&r, StageStatus::Ran),
        ["strip"],
        "early cut-off keeps the rest cached"
    );
    let w = seen.warnings();
    assert!(
        w.iter()
            .any(|w| w.contains("stage 'strip': cache entry") && w.contains("corrupt")),
        "{w:?}"
    );
    assert_eq!(p.outputs(), out1);

    // A truncated output blob: the hit check fails, the stage reruns.
    let e = Store::at(&p.cache())
        .read_action(&key_of(&r1, "float_out"))
        .unwrap();
    let h = &e.outputs[0].blob.blake3;
    let blob = p.cache().join("v1/objects").join(&h[..2]).join(h);
    let len = std::fs::metadata(&blob).unwrap().len();
    std::fs::File::options()
        .write(true)
        .open(&blob)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let (r, seen) = p.run();
    assert_eq!(ids(&r, StageStatus::Ran), ["float_out"]);
    assert!(seen.warnings().iter().any(|w| w.contains("float_out")));
    assert_eq!(p.outputs(), out1);
    let (r, seen) = p.run();
    assert_eq!(ids(&r, StageStatus::Cached), sorted(&ALL));
    assert!(seen.warnings().is_empty(), "{:?}", seen.warnings());
}

#[test]
fn a_corrupt_upstream_artifact_is_rebuilt_on_hit_or_when_a_downstream_stage_needs_it() {
    let p = Project::new("corrupt-upstream");
    let (r1, _) = p.run();
    let freeze_key = key_of(&r1, "freeze");
    let freeze_blob = artifact_blob_path(&p, &freeze_key);

    // Small blobs are rehashed on every hit: the stage itself notices and reruns.
    flip_bit(&freeze_blob, 17);
    let (r, seen) = p.run();
    assert!(r.ok);
    assert_eq!(ids(&r, StageStatus::Ran), ["freeze"]);
    assert!(seen
        .warnings()
        .iter()
        .any(|w| w.contains("stage 'freeze'") && w.contains("corrupt")));

    // Blobs above the threshold are only size-checked on a hit; the first stage that
    // reads one rehashes it, warns, and rebuilds the upstream stage before going on.
    flip_bit(&freeze_blob, 17);
    p.edit_recipe("tag = \"strip\"", "tag = \"strip3\"");
    let (r, seen) = p.run_with(&RunOptions {
        verify_on_hit_max: 0,
        ..RunOptions::default()
    });
    assert!(r.ok, "{}", r.to_json());
    assert_eq!(r.stage("freeze").unwrap().status, StageStatus::Cached);
    assert_eq!(r.stage("strip").unwrap().status, StageStatus::Ran);
    let w = seen.warnings();
    assert!(
        w.iter()
            .any(|w| w.contains("stage 'freeze': cached artifact") && w.contains("rebuilding")),
        "{w:?}"
    );
    assert_eq!(key_of(&r, "freeze"), freeze_key);
    let report = Store::at(&p.cache()).verify().unwrap();
    assert!(
        report.corrupt.is_empty(),
        "the rebuild repaired the blob: {:?}",
        report.corrupt
    );
}

#[test]
fn a_failed_stage_stops_only_what_depends_on_it() {
    let recipe = format!(
        "{RECIPE}\n[stages.bad]\nkind = \"t_map\"\ninput = \"freeze\"\ntag = \"bad\"\nfail = true\n\n\
         [stages.bad_out]\nkind = \"t_export\"\ninput = \"bad\"\npath = \"bad.bin\"\n"
    );
    let p = Project::with_recipe("keep-going", &recipe);
    let (r, _) = p.run();
    assert!(!r.ok);
    assert_eq!(ids(&r, StageStatus::Failed), ["bad"]);
    assert_eq!(ids(&r, StageStatus::Skipped), ["bad_out"]);
    assert_eq!(ids(&r, StageStatus::Ran), sorted(&ALL));
    assert_eq!(
        r.stage("bad").unwrap().error.as_deref(),
        Some("stage 'bad': t_map failed on purpose")
    );
    assert_eq!(
        r.stage("bad_out").unwrap().error.as_deref(),
        Some("upstream stage 'bad' failed")
    );
    let status = pipeline::status(&p.load()).unwrap();
    assert_eq!(
        status.row("bad").unwrap().reason.as_deref(),
        Some("never ran"),
        "a failure caches nothing"
    );

    // Fail fast, one job: stages run in recipe order as they become ready, and
    // nothing starts after the failure (`bad` is queued before the int8 exports).
    let (r, _) = p.run_with(&RunOptions {
        jobs: 1,
        fail_fast: true,
        ..RunOptions::default()
    });
    assert!(!r.ok);
    assert_eq!(ids(&r, StageStatus::Failed), ["bad"]);
    assert_eq!(
        r.stage("bad_out").unwrap().error.as_deref(),
        Some("upstream stage 'bad' failed")
    );
    let not_started = r.stage("int8_out@DEFAULT").unwrap();
    assert_eq!(not_started.status, StageStatus::Skipped);
    assert!(not_started
        .error
        .as_deref()
        .unwrap()
        .contains("--fail-fast"));
}

/// Storing happens behind the computation; a stage whose output file cannot be written
/// is still that stage's failure, with the path in the error, and caches nothing.
#[test]
fn an_output_that_cannot_be_written_fails_its_stage_and_caches_nothing() {
    let p = Project::new("blocked-output");
    let blocker = p.out("float.bin");
    std::fs::create_dir_all(blocker.join("in-the-way")).unwrap();
    let (r, _) = p.run();
    assert!(!r.ok);
    assert_eq!(ids(&r, StageStatus::Failed), ["float_out"]);
    let others: Vec<&str> = ALL.iter().copied().filter(|s| *s != "float_out").collect();
    assert_eq!(ids(&r, StageStatus::Ran), sorted(&others));
    let e = r.stage("float_out").unwrap().error.clone().unwrap();
    assert!(
        e.contains("storing its result") && e.contains("float.bin"),
        "{e}"
    );
    let status = pipeline::status(&p.load()).unwrap();
    assert_eq!(
        status.row("float_out").unwrap().reason.as_deref(),
        Some("never ran")
    );

    std::fs::remove_dir_all(&blocker).unwrap();
    let (r, _) = p.run();
    assert!(r.ok);
    assert_eq!(ids(&r, StageStatus::Ran), ["float_out"]);
    assert!(blocker.is_file());
}

#[test]
fn a_panicking_stage_is_a_failure_not_a_crash() {
    let p = Project::new("panic");
    p.edit_recipe("tag = \"strip\"", "tag = \"strip\"\npanic = true");
    let (r, _) = p.run();
    assert_eq!(ids(&r, StageStatus::Failed), ["strip"]);
    assert!(r
        .stage("strip")
        .unwrap()
        .error
        .as_deref()
        .unwrap()
        .contains("t_map panicked on purpose"));
    assert_eq!(ids(&r, StageStatus::Ran), ["freeze"]);
}

#[test]
fn memo_values_are_shared_across_variants_and_config_changes() {
    let p = Project::new("memo");
    let count_file = p.dir.join("count.txt");
    p.edit_recipe(
        "dataset = \"calib\"",
        &format!(
            "dataset = \"calib\"\ncount_file = {:?}",
            count_file.to_str().unwrap()
        ),
    );
    let computed = || {
        std::fs::read_to_string(&count_file)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    let (r, _) = p.run();
    assert!(r.ok);
    assert_eq!(computed(), 1, "both variants share one memo computation");
    p.edit_recipe(
        "\"OPTIMIZE_FOR_SIZE\"]",
        "\"OPTIMIZE_FOR_SIZE\", \"OPTIMIZE_FOR_LATENCY\"]",
    );
    let (r, _) = p.run();
    assert_eq!(
        r.stage("int8@OPTIMIZE_FOR_LATENCY").unwrap().status,
        StageStatus::Ran
    );
    assert_eq!(computed(), 1, "a new strategy reuses the statistics");
    flip_bit(&p.dir.join("data/calib_x.npy"), 1);
    p.run();
    assert_eq!(computed(), 2, "new data, new statistics");
}

#[test]
fn a_stage_writing_an_undeclared_output_fails() {
    let p = Project::new("undeclared");
    p.edit_recipe(
        "path = \"float.bin\"",
        "path = \"float.bin\"\nextra_output = true",
    );
    let (r, _) = p.run();
    assert_eq!(ids(&r, StageStatus::Failed), ["float_out"]);
    assert!(r
        .stage("float_out")
        .unwrap()
        .error
        .as_deref()
        .unwrap()
        .contains("'undeclared.bin' that its deps() do not declare"));
    assert!(!p.out("undeclared.bin").exists());
}

#[test]
fn an_input_changed_while_its_stage_runs_is_not_cached() {
    let p = Project::new("mutate");
    p.edit_recipe(
        "kind = \"t_load\"",
        "kind = \"t_load\"\nmutate_model = true",
    );
    let (r, _) = p.run();
    assert_eq!(ids(&r, StageStatus::Failed), ["freeze"]);
    assert!(r
        .stage("freeze")
        .unwrap()
        .error
        .as_deref()
        .unwrap()
        .contains("changed while the stage ran"));
    p.edit_recipe("mutate_model = true", "mutate_model = false");
    let (r, _) = p.run();
    assert!(r.ok);
    assert_eq!(r.stage("freeze").unwrap().status, StageStatus::Ran);
}

#[test]
fn gc_keeps_what_the_last_run_uses_and_verify_removes_corruption() {
    let p = Project::new("gc");
    p.run();
    p.edit_recipe("tag = \"strip\"", "tag = \"other\"");
    p.run();
    let store = Store::at(&p.cache());
    let listing = store.listing();
    assert!(listing.unreferenced_actions >= 8, "{listing:?}");
    let gc = store.gc(None).unwrap();
    assert!(gc.removed_actions >= 8 && gc.removed_objects >= 1, "{gc:?}");
    assert_eq!(store.listing().unreferenced_actions, 0);
    let (r, _) = p.run();
    assert_eq!(
        ids(&r, StageStatus::Cached),
        sorted(&ALL),
        "gc kept everything the recipe uses"
    );
    assert!(store.verify().unwrap().corrupt.is_empty());

    let objects = cache_files(&p.cache(), "objects");
    flip_bit(&objects[0], 5);
    let v = store.verify().unwrap();
    assert!(!v.corrupt.is_empty());
    assert!(v.corrupt[0].starts_with("object "), "{:?}", v.corrupt);
    assert!(!objects[0].exists(), "corrupt blobs are removed");
    assert!(store.verify().unwrap().corrupt.is_empty());
    let (r, _) = p.run();
    assert!(r.ok);
    assert!(!ids(&r, StageStatus::Ran).is_empty());
    let (r, _) = p.run();
    assert_eq!(ids(&r, StageStatus::Cached), sorted(&ALL));
}

#[test]
fn keys_and_outputs_do_not_depend_on_jobs_or_the_project_location() {
    let a = Project::new("loc-a");
    let b = Project::new("loc-b");
    let (ra, _) = a.run_with(&RunOptions {
        jobs: 1,
        ..RunOptions::default()
    });
    let (rb, _) = b.run_with(&RunOptions {
        jobs: 4,
        ..RunOptions::default()
    });
    for id in ALL {
        assert_eq!(key_of(&ra, id), key_of(&rb, id), "{id}");
    }
    assert_eq!(a.outputs(), b.outputs());
}

#[test]
fn status_never_writes_to_the_cache() {
    let p = Project::new("status-readonly");
    let status = pipeline::status(&p.load()).unwrap();
    assert!(status.stages.iter().all(|s| s.state == "stale"));
    assert_eq!(
        status.row("freeze").unwrap().reason.as_deref(),
        Some("never ran")
    );
    assert!(!p.cache().exists());
}

#[test]
fn damaging_any_cache_file_never_yields_a_wrong_output() {
    let clean = Project::new("damage-clean");
    clean.run();
    let want = clean.outputs();
    let template = Project::new("damage");
    template.run();
    let files: Vec<PathBuf> = walkdir::WalkDir::new(template.cache().join("v1"))
        .into_iter()
        .flatten()
        .filter(|e| {
            e.file_type().is_file() && !e.path().starts_with(template.cache().join("v1/locks"))
        })
        .map(|e| {
            e.path()
                .strip_prefix(template.cache())
                .unwrap()
                .to_path_buf()
        })
        .collect();
    assert!(files.len() > 25, "{files:?}");
    // Blobs named by a stage result (the memo blob is named only by its memo entry).
    let action_text: String = cache_files(&template.cache(), "actions")
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    let memo_only = |rel: &PathBuf| {
        rel.starts_with("v1/memo")
            || (rel.starts_with("v1/objects")
                && !action_text.contains(rel.file_name().unwrap().to_str().unwrap()))
    };
    for rel in &files {
        for damage in ["truncate", "flip", "delete"] {
            let p = Project::new("damage-case");
            p.run();
            let target = p.cache().join(rel);
            assert!(
                target.exists(),
                "{rel:?} differs between identical projects"
            );
            match damage {
                "truncate" => {
                    let len = std::fs::metadata(&target).unwrap().len();
                    std::fs::File::options()
                        .write(true)
                        .open(&target)
                        .unwrap()
                        .set_len(len / 2)
                        .unwrap();
                }
                "flip" => flip_bit(&target, 37),
                _ => std::fs::remove_file(&target).unwrap(),
            }
            let (r, seen) = p.run();
            assert!(r.ok, "{damage} {rel:?}: {}", r.to_json());
            assert_eq!(p.outputs(), want, "{damage} {rel:?}");
            let essential =
                (rel.starts_with("v1/objects") || rel.starts_with("v1/actions")) && !memo_only(rel);
            if essential {
                let rebuilt = !r.with_status(StageStatus::Ran).is_empty();
                assert!(rebuilt, "{damage} {rel:?} must cause a rebuild");
                if damage != "delete" || rel.starts_with("v1/objects") {
                    assert!(!seen.warnings().is_empty(), "{damage} {rel:?} must warn");
                }
            }
            let (r, seen) = p.run();
            assert_eq!(
                ids(&r, StageStatus::Cached),
                sorted(&ALL),
                "{damage} {rel:?}: the cache is whole again"
            );
            assert!(
                seen.warnings().is_empty(),
                "{damage} {rel:?}: {:?}",
                seen.warnings()
            );
            let v = Store::at(&p.cache()).verify().unwrap();
            assert!(
                v.corrupt.is_empty() || memo_only(rel),
                "{damage} {rel:?}: {:?}",
                v.corrupt
            );
        }
    }
}
