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

fn stage_error(report: &pipeline::RunReport, id: &str) -> String {
    report
        .stage(id)
        .and_then(|s| s.error.clone())
        .unwrap_or_default()
}

/// `out/link` is a symlink to a directory elsewhere: `path = "link/float.bin"` passed the
/// textual check and wrote there.
#[test]
fn an_export_cannot_escape_out_dir_through_a_symlinked_directory() {
    let p = Project::new("symlink-dir");
    let elsewhere = p.dir.join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::create_dir_all(p.dir.join("out")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, p.out("link")).unwrap();
    p.edit_recipe("path = \"float.bin\"", "path = \"link/sub/float.bin\"");
    let (report, _) = p.run();
    assert!(!report.ok);
    let err = stage_error(&report, "float_out");
    assert!(
        err.starts_with("stage 'float_out': output link/sub/float.bin would be written to ")
            && err.contains("through the symlink")
            && err.contains("allow_outside_out_dir = true"),
        "{err}"
    );
    assert_eq!(
        report.stage("float_out").and_then(|s| s.key.clone()),
        None,
        "it never ran"
    );
    assert_eq!(
        std::fs::read_dir(&elsewhere).unwrap().count(),
        0,
        "nothing may be written (or created) outside out_dir"
    );
    // Nothing was pruned after the failed run, and the other outputs are there.
    assert!(report.pruned.is_empty());
    assert!(p.out("int8_DEFAULT.bin").is_file());

    // Allowed explicitly, it goes where the link points.
    p.edit_recipe(
        "name = \"test_pipeline\"",
        "name = \"test_pipeline\"\nallow_outside_out_dir = true",
    );
    let (report, _) = p.run();
    assert!(report.ok, "{:?}", stage_error(&report, "float_out"));
    assert!(elsewhere.join("sub/float.bin").is_file());
}

/// A symlinked output *file* is replaced, never written through.
#[test]
fn a_symlinked_output_file_is_replaced_not_followed() {
    let p = Project::new("symlink-file");
    let target = p.dir.join("precious.bin");
    std::fs::write(&target, b"keep me").unwrap();
    std::fs::create_dir_all(p.dir.join("out")).unwrap();
    std::os::unix::fs::symlink(&target, p.out("float.bin")).unwrap();
    let (report, _) = p.run();
    assert!(report.ok, "{}", stage_error(&report, "float_out"));
    assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
    let meta = std::fs::symlink_metadata(p.out("float.bin")).unwrap();
    assert!(
        meta.file_type().is_file(),
        "the link was replaced by the output"
    );
}

/// Outputs of removed or renamed stages are removed after a successful full run, and
/// nothing else is: not after a failed run, not files another pipeline sharing out_dir
/// wrote, not files qpipe did not write, not a stale output someone changed.
#[test]
fn stale_outputs_are_pruned_after_a_successful_full_run_only() {
    let p = Project::new("prune");
    // Another pipeline sharing out_dir writes float.bin too, and its own files.
    let other_text = common::RECIPE
        .replace("name = \"test_pipeline\"", "name = \"other\"")
        .replace("int8_${strategy}.bin", "other_${strategy}.bin");
    let other_path = p.dir.join("other.toml");
    std::fs::write(&other_path, &other_text).unwrap();
    let mut other = qpipe::pipeline::Recipe::parse(&other_text, &other_path, common::TEST_REGISTRY)
        .unwrap_or_else(|e| panic!("{e}"));
    other.cache_dir = p.cache();
    assert!(pipeline::run(&other, &opts(), &Seen::default()).unwrap().ok);

    let (report, _) = p.run();
    assert!(report.ok);
    assert!(report.pruned.is_empty());
    assert!(p.out(".qpipe-manifest-test_pipeline.json").is_file());
    assert!(p.out(".qpipe-manifest-other.json").is_file());
    std::fs::write(p.out("notes.txt"), b"mine").unwrap();

    // Rename the int8 outputs and move the float one, with a failing stage: no pruning.
    p.edit_recipe(
        "path = \"int8_${strategy}.bin\"",
        "path = \"q/${strategy}.bin\"",
    );
    p.edit_recipe("path = \"float.bin\"", "path = \"float2.bin\"");
    let good = p.recipe_text();
    p.write_recipe(&format!(
        "{good}\n[stages.bad]\nkind = \"t_map\"\ninput = \"freeze\"\ntag = \"x\"\nfail = true\n"
    ));
    let (report, _) = p.run();
    assert!(!report.ok);
    assert!(report.pruned.is_empty());
    assert!(p.out("int8_DEFAULT.bin").is_file());

    // Someone changed one stale output by hand: it stays, with a warning.
    std::fs::write(p.out("int8_OPTIMIZE_FOR_SIZE.bin"), b"edited").unwrap();
    p.write_recipe(&good);
    let (report, seen) = p.run();
    assert!(report.ok);
    assert_eq!(report.pruned, vec!["int8_DEFAULT.bin".to_string()]);
    assert!(!p.out("int8_DEFAULT.bin").exists());
    assert!(p.out("q/DEFAULT.bin").is_file() && p.out("float2.bin").is_file());
    assert_eq!(
        std::fs::read(p.out("int8_OPTIMIZE_FOR_SIZE.bin")).unwrap(),
        b"edited"
    );
    assert!(
        seen.warnings()
            .iter()
            .any(|w| w.contains("int8_OPTIMIZE_FOR_SIZE.bin is no longer declared, but it changed")),
        "{:?}",
        seen.warnings()
    );
    // float.bin is the other pipeline's too; its own files and notes.txt are not ours.
    for keep in [
        "float.bin",
        "other_DEFAULT.bin",
        "other_OPTIMIZE_FOR_SIZE.bin",
        "notes.txt",
    ] {
        assert!(p.out(keep).is_file(), "{keep} must stay");
    }
    // The JSON report lists what was removed.
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    assert_eq!(json["pruned"], serde_json::json!(["int8_DEFAULT.bin"]));

    // Moving q/ back prunes q/ and its now empty directory; a no-op run prunes nothing.
    p.edit_recipe(
        "path = \"q/${strategy}.bin\"",
        "path = \"int8_${strategy}.bin\"",
    );
    let (report, _) = p.run();
    assert_eq!(
        report.pruned,
        vec![
            "q/DEFAULT.bin".to_string(),
            "q/OPTIMIZE_FOR_SIZE.bin".to_string()
        ]
    );
    assert!(!p.out("q").exists());
    let manifest = p.out(".qpipe-manifest-test_pipeline.json");
    let inode =
        |f: &std::path::Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(f).unwrap());
    let before = inode(&manifest);
    let (report, _) = p.run();
    assert!(report.ok && report.pruned.is_empty());
    assert_eq!(
        inode(&manifest),
        before,
        "a no-op run does not rewrite the manifest"
    );
}

/// A 10 MB export path was echoed whole in the error.
#[test]
fn a_huge_path_is_shortened_in_messages() {
    let p = Project::new("huge-path");
    let huge = "x".repeat(10 << 20);
    p.edit_recipe("path = \"float.bin\"", &format!("path = \"{huge}.bin\""));
    let (report, _) = p.run();
    let err = stage_error(&report, "float_out");
    assert!(!err.is_empty(), "writing a 10 MB file name must fail");
    assert!(err.len() < 2000, "{} bytes of message", err.len());
    assert!(err.contains(" characters)"), "{err}");
    // The recipe's own check shortens it too.
    p.edit_recipe(
        &format!("path = \"{huge}.bin\""),
        &format!("path = \"../{huge}\""),
    );
    let text = p.recipe_text();
    let e = qpipe::pipeline::Recipe::parse(&text, &p.recipe, common::TEST_REGISTRY)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("is outside out_dir") && e.len() < 2000,
        "{} bytes",
        e.len()
    );
}

// ---- t_layers: like validate, writes a report named after its candidate by default ----

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LayersConfig {
    reference: String,
    candidate: String,
    #[serde(default)]
    report: Option<String>,
}

struct Layers(LayersConfig);

impl Layers {
    fn report_path(&self) -> String {
        self.0
            .report
            .clone()
            .unwrap_or_else(|| format!("{}.layers.json", self.0.candidate))
    }
}

impl qpipe::stages::Stage for Layers {
    fn kind(&self) -> &'static str {
        "t_layers"
    }
    fn version(&self) -> u32 {
        1
    }
    fn deps(&self) -> qpipe::stages::StageDeps {
        qpipe::stages::StageDeps {
            stages: vec![
                ("reference".into(), self.0.reference.clone()),
                ("candidate".into(), self.0.candidate.clone()),
            ],
            outputs: vec![("report".into(), self.report_path().into())],
            ..Default::default()
        }
    }
    fn config(&self) -> serde_json::Value {
        qpipe::stages::config_json(&self.0)
    }
    fn run(&self, ctx: &qpipe::stages::StageContext) -> qpipe::Result<qpipe::stages::StageOutput> {
        let n = ctx.input_graph("candidate")?.nodes.len();
        let report = serde_json::json!({ "candidate_nodes": n });
        Ok(qpipe::stages::StageOutput {
            files: vec![qpipe::stages::OutputFile {
                path: self.report_path().into(),
                bytes: report.to_string().into_bytes(),
            }],
            artifact: qpipe::stages::Artifact::Report(report),
            metrics: Default::default(),
        })
    }
}

fn build_layers(
    t: &qpipe::stages::ConfigTable,
) -> Result<Box<dyn qpipe::stages::Stage>, qpipe::stages::ConfigError> {
    Ok(Box::new(Layers(qpipe::stages::parse_config(t)?)))
}

/// Renaming the candidate of a stage whose default output path follows the
/// candidate's name reran it with a false "cache entry … is corrupt" warning: the key
/// (which hashes the candidate as a placeholder) did not cover the output path.
#[test]
fn renaming_a_candidate_is_an_honest_rebuild_not_corruption() {
    let mut registry: Vec<qpipe::stages::registry::StageFactory> = common::TEST_REGISTRY
        .iter()
        .map(|f| qpipe::stages::registry::StageFactory {
            kind: f.kind,
            build: f.build,
        })
        .collect();
    registry.push(qpipe::stages::registry::StageFactory {
        kind: "t_layers",
        build: build_layers,
    });
    let text = |cand: &str| {
        format!(
            "[pipeline]\nname = \"rename\"\n\n[model]\ncheckpoint = \"ckpt/best_validation\"\ninputs = [\"input_x\"]\noutputs = [\"out\"]\n\n\
             [stages.freeze]\nkind = \"t_load\"\n\n[stages.{cand}]\nkind = \"t_map\"\ninput = \"freeze\"\ntag = \"strip\"\n\n\
             [stages.check]\nkind = \"t_layers\"\nreference = \"freeze\"\ncandidate = \"{cand}\"\n"
        )
    };
    let p = Project::with_recipe("rename-candidate", &text("strip"));
    let load = || {
        let t = p.recipe_text();
        let mut r = qpipe::pipeline::Recipe::parse(&t, &p.recipe, &registry)
            .unwrap_or_else(|e| panic!("{e}"));
        r.cache_dir = p.cache();
        r
    };
    let seen = Seen::default();
    assert!(pipeline::run(&load(), &opts(), &seen).unwrap().ok);
    assert!(p.out("strip.layers.json").is_file());
    p.write_recipe(&text("strip2"));
    let seen = Seen::default();
    let report = pipeline::run(&load(), &opts(), &seen).unwrap();
    assert!(report.ok);
    assert!(
        seen.warnings().iter().all(|w| !w.contains("corrupt")),
        "{:?}",
        seen.warnings()
    );
    let reason = seen.reason("check").expect("check reruns");
    assert_eq!(
        reason,
        "output path of 'report' changed (\"strip.layers.json\" → \"strip2.layers.json\")"
    );
    assert!(p.out("strip2.layers.json").is_file());
    // The old report is pruned: the pipeline no longer declares it.
    assert_eq!(report.pruned, vec!["strip.layers.json".to_string()]);
}

/// After a failed run, "not built … run `qpipe run` first" sent the user in a circle:
/// the cache now records the last run's outcome, and `compare`/`eval` quote it.
#[test]
fn a_failed_last_run_is_what_not_built_explains() {
    let p = Project::new("last-run");
    p.edit_recipe("tag = \"strip\"", "tag = \"strip\"\nfail = true");
    let (report, _) = p.run();
    assert!(!report.ok);
    let why = qpipe::pipeline::lastrun::why_not_built(&p.load()).expect("a failed run is recorded");
    assert!(
        why.contains("the last run of pipeline 'test_pipeline' failed: stage 'strip' failed: t_map failed on purpose")
            && why.contains("skipped after it")
            && why.contains("qpipe run"),
        "{why}"
    );
    p.edit_recipe("tag = \"strip\"\nfail = true", "tag = \"strip\"");
    let (report, _) = p.run();
    assert!(report.ok);
    assert_eq!(qpipe::pipeline::lastrun::why_not_built(&p.load()), None);
}
