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

#[test]
fn compare_reads_the_last_run_and_writes_table_markdown_json_and_html() {
    let ws = workspace("compare");
    let recipe = "recipes/push_student.toml";

    let before = qpipe(&["compare", recipe], &ws);
    assert_eq!(before.status.code(), Some(1), "{before:?}");
    let err = String::from_utf8_lossy(&before.stderr);
    assert!(
        err.contains("not built") && err.contains("int8@DEFAULT") && err.contains("--run"),
        "{err}"
    );

    let table = stdout(&qpipe(
        &["compare", recipe, "--run", "--latency-samples", "5"],
        &ws,
    ));
    let run = json(&qpipe(&["run", recipe, "--json"], &ws));
    assert!(
        run["stages"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["status"] == "cached"),
        "compare --run built everything: {run}"
    );
    let metrics = |id: &str| {
        run["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .unwrap_or_else(|| panic!("no stage {id}"))["metrics"]
            .clone()
    };
    for name in ["float32", "fp16", "int8 DEFAULT", "int8 OPTIMIZE_FOR_SIZE"] {
        assert!(
            table.lines().any(|l| l.starts_with(&format!("{name} "))),
            "{name}:\n{table}"
        );
    }
    assert!(table.contains("measured on this machine"), "{table}");

    let doc = json(&qpipe(
        &[
            "compare",
            recipe,
            "--format",
            "json",
            "--html",
            "compare.html",
            "--latency-samples",
            "5",
        ],
        &ws,
    ));
    let variants = doc["variants"].as_array().unwrap();
    assert_eq!(variants.len(), 4, "{doc}");
    assert_eq!(doc["baseline"], "strip");
    assert_eq!(doc["latency"]["samples"], 5);
    assert_eq!(doc["latency"]["threads"], 1);
    let float_bytes = std::fs::metadata(ws.join("recipes/out/push_student_float32.tflite"))
        .unwrap()
        .len();
    for v in variants {
        let file = ws.join("recipes/out").join(v["file"].as_str().unwrap());
        let bytes = std::fs::metadata(&file).unwrap().len();
        assert_eq!(v["bytes"].as_u64(), Some(bytes), "{v}");
        let ratio = v["ratio_to_float"].as_f64().unwrap();
        assert!((ratio - bytes as f64 / float_bytes as f64).abs() < 1e-12);
        assert!(v["ms_per_sample"].as_f64().unwrap() > 0.0, "{v}");
        if let Some(check) = v["validated_by"].as_str() {
            let m = metrics(check);
            for (ours, theirs) in [
                ("accuracy", "candidate_accuracy"),
                ("accuracy_drop", "accuracy_drop"),
                ("agreement", "agreement"),
                ("max_abs_error", "max_abs_error"),
            ] {
                assert_eq!(v[ours], m[theirs], "{ours} of {}", v["name"]);
            }
        }
    }
    for v in variants.iter().filter(|v| v["validated_by"].is_string()) {
        // Every output's metrics, by name.
        let m = metrics(v["validated_by"].as_str().unwrap());
        let outs = v["outputs"].as_array().unwrap();
        assert_eq!(outs.len(), 1, "{v}");
        assert_eq!(outs[0]["name"], "score_student/output_student");
        assert_eq!(
            outs[0]["max_abs_error"],
            m["outputs"]["score_student/output_student"]["max_abs_error"]
        );
    }
    let by_name = |n: &str| variants.iter().find(|v| v["name"] == n).unwrap();
    assert_eq!(
        by_name("float32")["accuracy"],
        metrics("check_fp16")["reference_accuracy"]
    );
    let default = by_name("int8 DEFAULT");
    assert!(default["int8_ops"].as_u64().unwrap() > 0);
    assert_eq!(default["float_ops"], 0);
    assert!(!default["layers"].as_array().unwrap().is_empty());
    assert_eq!(by_name("int8 OPTIMIZE_FOR_SIZE")["int8_ops"], 0);
    assert!(
        by_name("int8 OPTIMIZE_FOR_SIZE")["bytes"].as_u64()
            <= by_name("int8 DEFAULT")["bytes"].as_u64()
    );

    let md = stdout(&qpipe(
        &[
            "compare",
            recipe,
            "--format",
            "md",
            "--latency-samples",
            "0",
        ],
        &ws,
    ));
    let md_rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| ")).collect();
    assert_eq!(md_rows.len(), 2 + 4, "{md}");
    assert!(md_rows[1].starts_with("| --- | --- | ---: |"), "{md}");
    assert!(md.contains("| int8 OPTIMIZE_FOR_SIZE | int8@OPTIMIZE_FOR_SIZE |"));

    let html = std::fs::read_to_string(ws.join("compare.html")).unwrap();
    for forbidden in ["<script", "<link", "src=", "url(", "@import"] {
        assert!(
            !html.contains(forbidden),
            "self-contained page uses {forbidden}"
        );
    }
    let dom = chromium_dom(&ws.join("compare.html"));
    assert!(dom.contains("<title>qpipe compare: push_student</title>"));
    for v in variants {
        let row = format!("<tr data-variant=\"{}\">", v["name"].as_str().unwrap());
        assert_eq!(dom.matches(&row).count(), 1, "{row} in the parsed page");
        let point = format!("<g data-variant=\"{}\">", v["name"].as_str().unwrap());
        assert_eq!(dom.matches(&point).count(), 1, "{point} in the chart");
    }
    assert_eq!(dom.matches("data-chart=\"size-accuracy\"").count(), 1);
    let layer_charts = dom.matches("data-chart=\"layers\"").count();
    let layered = variants
        .iter()
        .filter(|v| !v["layers"].as_array().unwrap().is_empty())
        .count();
    assert_eq!(layer_charts, layered);
    let bars = dom.matches("<rect ").count();
    assert_eq!(bars, default["layers"].as_array().unwrap().len().min(60));
}

/// The page as headless Chromium parsed it (`--dump-dom`). Chromium is Debian's
/// `chromium`; where it is missing and this is a root Debian machine, it is installed
/// (as `.ci/run` does), otherwise the test fails and says how to get it.
fn chromium_dom(page: &Path) -> String {
    let exe = std::env::var_os("QPIPE_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if !exe.exists() {
        let installed = Command::new("sh")
            .args([
                "-c",
                "[ \"$(id -u)\" = 0 ] && command -v apt-get >/dev/null && \
                 (apt-get install -y chromium || (apt-get update && apt-get install -y chromium))",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(
            installed && exe.exists(),
            "headless Chromium is needed to check the HTML page: install Debian's `chromium` \
             (apt-get install chromium) or set QPIPE_CHROMIUM to a Chromium binary"
        );
    }
    let profile = page.with_extension("chromium-profile");
    let out = Command::new(&exe)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("file://{}", page.canonicalize().unwrap().display()))
        .output()
        .expect("chromium runs");
    assert!(out.status.success(), "chromium: {out:?}");
    String::from_utf8(out.stdout).expect("UTF-8 DOM")
}

/// A recipe of its own in a workspace.
fn write_recipe(ws: &Path, name: &str, text: &str) -> String {
    std::fs::write(ws.join("recipes").join(name), text).unwrap();
    format!("recipes/{name}")
}

#[test]
fn validate_and_compare_show_every_output_of_a_two_headed_model() {
    let ws = workspace("two_heads");
    let recipe = write_recipe(
        &ws,
        "two_heads.toml",
        r#"[pipeline]
name = "two_heads"
[model]
checkpoint = "../fixtures/push_student/best_validation"
inputs = ["input_x"]
outputs = ["score_student/output_student", "score_teacher/output_teacher"]
[datasets.calib]
input_x = "../fixtures/push_student/calib_x.npy"
[datasets.eval]
input_x = "../fixtures/push_student/eval_x.npy"
labels = "../fixtures/push_student/eval_y.npy"
[stages.freeze]
kind = "freeze"
[stages.strip]
kind = "strip_training"
input = "freeze"
[stages.int8]
kind = "quantize_int8"
input = "strip"
calibration = "calib"
[stages.check]
kind = "validate"
reference = "strip"
candidate = "int8"
dataset = "eval"
labels_output = "score_teacher/output_teacher"
max_abs_error = 0.5
[stages.tflite_int8]
kind = "export_tflite"
input = "int8"
path = "two_heads_int8.tflite"
"#,
    );
    let report = json(&qpipe(&["run", &recipe, "--json"], &ws));
    let check = report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "check")
        .unwrap()
        .clone();
    let m = &check["metrics"];
    // The labels pair with the teacher: TensorFlow measured 0.772 on it.
    assert_eq!(m["labels_output"], "score_teacher/output_teacher", "{m}");
    assert!(
        (m["reference_accuracy"].as_f64().unwrap() - 0.772).abs() < 1e-9,
        "{m}"
    );
    for head in [
        "score_student/output_student",
        "score_teacher/output_teacher",
    ] {
        let o = &m["outputs"][head];
        assert_eq!(o["kind"], "class scores", "{m}");
        assert!(o["max_abs_error"].as_f64().unwrap() > 0.0, "{m}");
        assert!(o["agreement"].as_f64().unwrap() > 0.9, "{m}");
    }
    let table = stdout(&qpipe(&["compare", &recipe, "--latency-samples", "0"], &ws));
    for head in [
        "score_student/output_student",
        "score_teacher/output_teacher",
    ] {
        assert!(
            table.contains(&format!(
                "int8 DEFAULT output '{head}' (class scores): agreement "
            )),
            "{table}"
        );
    }
    let doc = json(&qpipe(
        &[
            "compare",
            &recipe,
            "--format",
            "json",
            "--latency-samples",
            "0",
        ],
        &ws,
    ));
    let int8 = doc["variants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["stage"] == "int8")
        .unwrap();
    assert_eq!(int8["outputs"].as_array().unwrap().len(), 2, "{int8}");
    // A max_abs_error gate that the teacher head misses fails the run and names it.
    let strict = std::fs::read_to_string(ws.join(&recipe))
        .unwrap()
        .replace("max_abs_error = 0.5", "max_abs_error = 1e-6");
    let strict = write_recipe(&ws, "two_heads_strict.toml", &strict);
    let out = qpipe(&["run", &strict], &ws);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("max_abs_error") && err.contains("output 'score_"),
        "{err}"
    );
}

#[test]
fn eval_feeds_float_data_to_an_int8_input_model_and_names_the_runtimes() {
    let ws = workspace("eval_int8_input");
    let recipe = std::fs::read_to_string(ws.join("recipes/conv_bn.toml")).unwrap()
        + r#"
[stages.latency]
kind = "quantize_int8"
input = "strip"
strategy = "OPTIMIZE_FOR_LATENCY"
calibration = "calib"

[stages.check_latency]
kind = "validate"
reference = "strip"
candidate = "latency"
dataset = "eval"
"#;
    let recipe = write_recipe(&ws, "conv_bn_latency.toml", &recipe);
    let report = json(&qpipe(&["run", &recipe, "--json"], &ws));
    let validated = report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "check_latency")
        .unwrap()["metrics"]["candidate_accuracy"]
        .as_f64()
        .unwrap();
    let eval = json(&qpipe(
        &[
            "eval",
            &recipe,
            "--stage",
            "latency",
            "--dataset",
            "eval",
            "--json",
        ],
        &ws,
    ));
    // Fed as validate feeds it: the float data quantized with the input's parameters.
    assert_eq!(eval["accuracy"].as_f64(), Some(validated), "{eval}");
    let out = qpipe(
        &[
            "eval",
            &recipe,
            "--stage",
            "latency",
            "--dataset",
            "eval",
            "--runtime",
            "litert",
        ],
        &ws,
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("renamed") && err.contains("xnnpack"), "{err}");
    let xnn = json(&qpipe(
        &[
            "eval",
            &recipe,
            "--stage",
            "latency",
            "--dataset",
            "eval",
            "--runtime",
            "xnnpack",
            "--json",
        ],
        &ws,
    ));
    assert_eq!(xnn["samples"], 1000, "{xnn}");
}
