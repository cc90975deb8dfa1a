//! The commands the README shows, run as a user would on the main recipe.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn qpipe(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qpipe"))
        .args(args)
        .current_dir(cwd)
        .env_remove("QPIPE_CACHE_DIR")
        .output()
        .expect("qpipe runs")
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_str(&stdout(o)).expect("one JSON document on stdout")
}

/// A copy of the repository's recipes next to a link to its fixtures, so that runs
/// write their cache and outputs outside the source tree.
fn workspace(name: &str) -> PathBuf {
    let dir = root().join("target/tmp/cli_workflow").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("recipes")).unwrap();
    for entry in std::fs::read_dir(root().join("recipes")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "toml") {
            std::fs::copy(&p, dir.join("recipes").join(p.file_name().unwrap())).unwrap();
        }
    }
    std::os::unix::fs::symlink(root().join("fixtures"), dir.join("fixtures")).unwrap();
    dir
}

#[test]
fn main_recipe_builds_then_is_a_no_op_and_every_shown_command_works() {
    let ws = workspace("main");
    let first = json(&qpipe(&["run", "recipes/push_student.toml", "--json"], &ws));
    assert_eq!(first["ok"], true);
    let stages = first["stages"].as_array().unwrap();
    assert!(stages.len() >= 6);
    assert!(stages.iter().all(|s| s["status"] == "ran"), "{first}");
    for f in [
        "push_student_frozen.pb",
        "push_student_float32.tflite",
        "push_student_fp16.tflite",
    ] {
        let p = ws.join("recipes/out").join(f);
        assert!(
            std::fs::metadata(&p)
                .map(|m| m.len() > 1000)
                .unwrap_or(false),
            "{} missing",
            p.display()
        );
    }

    let second = json(&qpipe(&["run", "recipes/push_student.toml", "--json"], &ws));
    assert!(
        second["stages"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["status"] == "cached"),
        "{second}"
    );

    let status = stdout(&qpipe(&["status", "recipes/push_student.toml"], &ws));
    assert!(status.contains(" fresh, 0 stale"), "{status}");

    let graph = stdout(&qpipe(&["graph", "recipes/push_student.toml"], &ws));
    assert!(
        graph.contains("strip") && graph.contains("freeze"),
        "{graph}"
    );

    let model: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("fixtures/push_student/model.json")).unwrap(),
    )
    .unwrap();
    let tf_accuracy = model["tf_eval_accuracy"].as_f64().unwrap();
    let eval = json(&qpipe(
        &[
            "eval",
            "recipes/push_student.toml",
            "--stage",
            "strip",
            "--dataset",
            "eval",
            "--json",
            "--out",
            "strip_out.npy",
        ],
        &ws,
    ));
    assert_eq!(eval["samples"], 1000);
    assert!(
        (eval["accuracy"].as_f64().unwrap() - tf_accuracy).abs() < 1e-9,
        "{eval} vs TF {tf_accuracy}"
    );
    assert!(ws.join("strip_out.npy").exists());

    let inspect = stdout(&qpipe(
        &["inspect", "fixtures/push_student/best_validation"],
        &ws,
    ));
    assert!(inspect.contains("score_student/fc/kernel"), "{inspect}");
    let tfl = json(&qpipe(
        &["inspect", "recipes/out/push_student_fp16.tflite", "--json"],
        &ws,
    ));
    assert!(
        tfl["operators"]["DEQUANTIZE"].as_u64().unwrap() > 0,
        "{tfl}"
    );
    assert_eq!(tfl["inputs"][0]["name"], "input_x");
}

#[test]
fn eval_names_what_is_missing() {
    let ws = workspace("eval_errors");
    let out = qpipe(
        &[
            "eval",
            "recipes/push_student.toml",
            "--stage",
            "nope",
            "--dataset",
            "eval",
        ],
        &ws,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no stage 'nope'"));
    let out = qpipe(
        &[
            "eval",
            "recipes/push_student.toml",
            "--stage",
            "strip",
            "--dataset",
            "eval",
            "--runtime",
            "tflite",
        ],
        &ws,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("litert-ref"),
        "{out:?}"
    );
    let out = qpipe(
        &[
            "eval",
            "recipes/push_student.toml",
            "--stage",
            "strip",
            "--dataset",
            "eval",
        ],
        &ws,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("run `qpipe run"),
        "{:?}",
        out
    );
}

#[test]
fn every_recipe_in_the_repository_builds_and_passes_its_gates() {
    let ws = workspace("all_recipes");
    let mut names: Vec<String> = std::fs::read_dir(ws.join("recipes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    names.sort();
    assert!(names.len() >= 3, "{names:?}");
    for name in names {
        let recipe = format!("recipes/{name}");
        let report = json(&qpipe(&["run", &recipe, "--json"], &ws));
        assert_eq!(report["ok"], true, "{recipe}: {report}");
        let validated = report["stages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["kind"] == "validate")
            .count();
        assert!(validated >= 2, "{recipe} validates fp16 and int8");
        let again = json(&qpipe(&["run", &recipe, "--json"], &ws));
        assert!(
            again["stages"]
                .as_array()
                .unwrap()
                .iter()
                .all(|s| s["status"] == "cached"),
            "{recipe}: second run is a no-op: {again}"
        );
    }
}
