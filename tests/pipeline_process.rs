//! The CLI as whole processes: concurrent runs on one cache, runs killed with SIGKILL
//! at chosen points, `--json`, exit codes, `-v`, `status`, `cache` subcommands.
//! Children run this test binary's `child_qpipe` entry (the CLI with the test stage kinds).

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;

#[test]
#[ignore = "entry point for child processes"]
fn child_qpipe() {
    common::child_entry();
}

fn run_child(args: &[&str]) -> std::process::Output {
    qpipe_child(args).output().unwrap()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn run_json_reports_every_stage_and_exit_codes_follow_failures() {
    let p = Project::new("json");
    p.edit_recipe("max_extra_nodes = 1", "max_extra_nodes = 0");
    let recipe = p.recipe.to_str().unwrap();
    let out = run_child(&["run", "--json", recipe]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a failed gate exits with 1: {}",
        stderr(&out)
    );
    let v = child_json(&out);
    assert_eq!(v["pipeline"], "test_pipeline");
    assert_eq!(v["ok"], false);
    let stages = v["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 9);
    for s in stages {
        for k in ["id", "kind", "status", "seconds", "key", "metrics"] {
            assert!(s.get(k).is_some(), "{k} missing in {s}");
        }
    }
    let by_id = |id: &str| stages.iter().find(|s| s["id"] == id).unwrap().clone();
    assert_eq!(by_id("freeze")["status"], "ran");
    assert_eq!(by_id("freeze")["kind"], "t_load");
    assert_eq!(by_id("freeze")["key"].as_str().unwrap().len(), 64);
    assert_eq!(by_id("freeze")["metrics"]["bytes"], 2400);
    assert_eq!(by_id("check@DEFAULT")["status"], "failed");
    assert_eq!(
        by_id("check@DEFAULT")["error"],
        "stage 'check@DEFAULT': gate: 1 extra nodes > 0"
    );
    assert!(by_id("int8@DEFAULT").get("error").is_none());

    p.edit_recipe("max_extra_nodes = 0", "max_extra_nodes = 1");
    let out = run_child(&["run", "--json", recipe]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v = child_json(&out);
    assert_eq!(v["ok"], true);
    let statuses: Vec<&str> = v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses.iter().filter(|s| **s == "cached").count(), 7);
    assert_eq!(
        statuses.iter().filter(|s| **s == "ran").count(),
        2,
        "only the two gates ran"
    );
}

#[test]
fn verbose_run_and_status_explain_rebuilds() {
    let p = Project::new("verbose");
    let recipe = p.recipe.to_str().unwrap();
    let out = run_child(&["run", recipe]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let table = child_stdout(&out);
    assert!(table.contains("STAGE"), "{table}");
    assert!(
        table.contains("test_pipeline: 9 stages, 9 ran, 0 cached, 0 failed, 0 skipped"),
        "{table}"
    );

    p.edit_recipe("tag = \"strip\"", "tag = \"stripped\"");
    let out = run_child(&["status", recipe]);
    assert_eq!(out.status.code(), Some(0));
    let text = child_stdout(&out);
    assert!(
        text.contains("config key 'tag' changed (\"strip\" → \"stripped\")"),
        "{text}"
    );
    let out = run_child(&["status", "--json", recipe]);
    let v = child_json(&out);
    let strip = v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "strip")
        .unwrap()
        .clone();
    assert_eq!(strip["state"], "stale");
    let freeze = v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "freeze")
        .unwrap()
        .clone();
    assert_eq!(freeze["state"], "fresh");

    let out = run_child(&["run", "-v", recipe]);
    assert_eq!(out.status.code(), Some(0));
    let err = stderr(&out);
    assert!(
        err.contains("[dirty]   strip: config key 'tag' changed (\"strip\" → \"stripped\")"),
        "{err}"
    );
    assert!(
        err.contains("[dirty]   float_out: upstream stage 'strip' (input) changed its output"),
        "{err}"
    );
    assert!(!err.contains("[dirty]   freeze"), "{err}");
}

#[test]
fn cache_subcommands() {
    let p = Project::new("cache-cli");
    let recipe = p.recipe.to_str().unwrap();
    run_child(&["run", recipe]);
    p.edit_recipe("tag = \"strip\"", "tag = \"s2\"");
    run_child(&["run", recipe]);
    let cache = p.cache();
    let cache = cache.to_str().unwrap();
    let out = run_child(&["cache", "ls", "--cache-dir", cache]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = child_stdout(&out);
    assert!(
        text.contains("test_pipeline  int8_out@OPTIMIZE_FOR_SIZE  t_export"),
        "{text}"
    );
    assert!(
        text.contains("(8 not referenced by any recipe's last run)"),
        "{text}"
    );
    let out = run_child(&["cache", "gc", recipe]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        child_stdout(&out).contains("kept 9 stage results; removed 8 stage results"),
        "{}",
        child_stdout(&out)
    );
    let out = run_child(&["cache", "verify", "--cache-dir", cache]);
    assert_eq!(out.status.code(), Some(0));
    assert!(child_stdout(&out).contains(": 0 corrupt"));
    flip_bit(&cache_files(&p.cache(), "actions")[0], 100);
    let out = run_child(&["cache", "verify", "--cache-dir", cache]);
    assert_eq!(out.status.code(), Some(1), "corruption found → exit 1");
    assert!(
        child_stdout(&out).contains("corrupt (removed): action "),
        "{}",
        child_stdout(&out)
    );
}

/// A second recipe sharing the cache (and stages) with [`RECIPE`]: another pipeline
/// name, another out_dir, one more stage.
fn overlapping_recipe() -> String {
    RECIPE.replacen(
        "name = \"test_pipeline\"",
        "name = \"other\"\nout_dir = \"out_b\"",
        1,
    ) + "\n[stages.strip_out]\nkind = \"t_export\"\ninput = \"strip\"\npath = \"strip.bin\"\n"
}

fn slow(recipe: &str) -> String {
    recipe
        .replacen("kind = \"t_load\"", "kind = \"t_load\"\nsleep_ms = 300", 1)
        .replacen("tag = \"strip\"", "tag = \"strip\"\nsleep_ms = 200", 1)
}

fn tree(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut m = std::collections::BTreeMap::new();
    for e in walkdir::WalkDir::new(dir).into_iter().flatten() {
        if e.file_type().is_file() {
            m.insert(
                e.path()
                    .strip_prefix(dir)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
                std::fs::read(e.path()).unwrap(),
            );
        }
    }
    m
}

#[test]
fn four_concurrent_runs_on_one_cache_all_succeed_with_identical_outputs() {
    // Reference: the two recipes run one after the other on their own cache.
    let seq = Project::with_recipe("concurrent-seq", &slow(RECIPE));
    std::fs::write(seq.dir.join("b.toml"), slow(&overlapping_recipe())).unwrap();
    assert!(run_child(&["run", seq.recipe.to_str().unwrap()])
        .status
        .success());
    assert!(
        run_child(&["run", seq.dir.join("b.toml").to_str().unwrap()])
            .status
            .success()
    );

    let p = Project::with_recipe("concurrent", &slow(RECIPE));
    std::fs::write(p.dir.join("b.toml"), slow(&overlapping_recipe())).unwrap();
    let a = p.recipe.to_str().unwrap().to_string();
    let b = p.dir.join("b.toml").to_str().unwrap().to_string();
    let children: Vec<Child> = [&a, &b, &a, &b]
        .iter()
        .map(|r| {
            qpipe_child(&["run", "--json", "--jobs", "2", r])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<std::process::Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let mut ran_per_key: std::collections::BTreeMap<String, usize> = Default::default();
    for out in &outs {
        assert_eq!(out.status.code(), Some(0), "{}", stderr(out));
        let v = child_json(out);
        assert_eq!(v["ok"], true);
        for s in v["stages"].as_array().unwrap() {
            let n = ran_per_key
                .entry(s["key"].as_str().unwrap().to_string())
                .or_default();
            if s["status"] == "ran" {
                *n += 1;
            } else {
                assert_eq!(s["status"], "cached", "{s}");
            }
        }
    }
    for (key, n) in &ran_per_key {
        assert_eq!(
            *n, 1,
            "key {key} was built {n} times; the key lock should make it once"
        );
    }
    assert_eq!(tree(&p.dir.join("out")), tree(&seq.dir.join("out")));
    assert_eq!(tree(&p.dir.join("out_b")), tree(&seq.dir.join("out_b")));
    let out = run_child(&[
        "cache",
        "verify",
        "--cache-dir",
        p.cache().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", child_stdout(&out));
}

/// Starts a run that blocks at `point` of `stage`, waits until it is there, kills it.
fn kill_at(recipe: &Path, point: &str, stage: &str) {
    let mut child = qpipe_child(&["run", recipe.to_str().unwrap()])
        .env("QPIPE_TEST_PAUSE", format!("{point}:{stage}"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if line.starts_with("qpipe-test-pause ") {
                let _ = tx.send(line);
                return;
            }
        }
    });
    let got = rx.recv_timeout(Duration::from_secs(60));
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        got.ok().as_deref(),
        Some(format!("qpipe-test-pause {point} {stage}").as_str())
    );
}

#[test]
fn runs_killed_at_any_point_leave_nothing_a_later_run_trusts() {
    let clean = Project::new("kill-clean");
    assert!(run_child(&["run", clean.recipe.to_str().unwrap()])
        .status
        .success());
    let want = clean.outputs();
    let points = [
        ("run", "freeze"),
        ("store", "freeze"),
        ("publish", "strip"),
        ("store", "int8@DEFAULT"),
        ("output", "float_out"),
        ("output", "int8_out@OPTIMIZE_FOR_SIZE"),
        ("publish", "int8_out@DEFAULT"),
        ("publish", "check@OPTIMIZE_FOR_SIZE"),
    ];
    for (point, stage) in points {
        let p = Project::new(&format!("kill-{point}"));
        // For later stages, kill a run that first reran an upstream stage and served
        // others from the cache: drop the stage's entry (and output) from a full run.
        if stage.starts_with("int8_out") || stage.starts_with("check") {
            assert!(run_child(&["run", p.recipe.to_str().unwrap()])
                .status
                .success());
            p.edit_recipe("tag = \"strip\"", "tag = \"strip\"\nnote = \"again\"");
            for f in cache_files(&p.cache(), "actions") {
                let text = std::fs::read_to_string(&f).unwrap();
                if text.contains(&format!("\"stage\": \"{stage}\"")) {
                    std::fs::remove_file(f).unwrap();
                }
            }
            if let Some(variant) = stage.strip_prefix("int8_out@") {
                std::fs::remove_file(p.out(&format!("int8_{variant}.bin"))).unwrap();
            }
        }
        kill_at(&p.recipe, point, stage);
        let verify = run_child(&[
            "cache",
            "verify",
            "--cache-dir",
            p.cache().to_str().unwrap(),
        ]);
        assert_eq!(
            verify.status.code(),
            Some(0),
            "after kill at {point}:{stage}: {}",
            child_stdout(&verify)
        );
        let rerun = run_child(&["run", "--json", p.recipe.to_str().unwrap()]);
        assert_eq!(
            rerun.status.code(),
            Some(0),
            "rerun after kill at {point}:{stage}: {}",
            stderr(&rerun)
        );
        let v = child_json(&rerun);
        let st = v["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == stage)
            .unwrap()["status"]
            .clone();
        assert_eq!(
            st, "ran",
            "the killed stage {stage} must not be served from the cache"
        );
        assert_eq!(p.outputs(), want, "outputs after kill at {point}:{stage}");
        let verify = run_child(&[
            "cache",
            "verify",
            "--cache-dir",
            p.cache().to_str().unwrap(),
        ]);
        assert_eq!(verify.status.code(), Some(0));
        let again = run_child(&["run", "--json", p.recipe.to_str().unwrap()]);
        let v = child_json(&again);
        assert!(v["stages"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["status"] == "cached"));
    }
}

#[test]
fn qpipe_cache_dir_overrides_the_recipe_cache_dir() {
    let p = Project::new("env-cache");
    p.edit_recipe(
        "name = \"test_pipeline\"",
        "name = \"test_pipeline\"\ncache_dir = \"recipe-cache\"",
    );
    let shared = tmp_dir("env-cache-shared");
    let out = qpipe_child(&["run", "--keep-going", p.recipe.to_str().unwrap()])
        .env("QPIPE_CACHE_DIR", &shared)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(shared.join("v1/actions").is_dir());
    assert!(shared.join("CACHEDIR.TAG").is_file());
    assert!(!p.dir.join("recipe-cache").exists() && !p.cache().exists());
    let out = run_child(&["run", "--json", p.recipe.to_str().unwrap()]);
    let v = child_json(&out);
    assert!(
        v["stages"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["status"] == "ran"),
        "without the override: the recipe's own cache"
    );
    assert!(p.dir.join("recipe-cache/v1").is_dir());
}
