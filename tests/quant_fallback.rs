//! Issue 16's accuracy-aware fallback (`[stages.<id>.fallback]` on `quantize_int8`): on
//! each `q16_*` fixture, tuned on the fixture's labelled tuning split, the model is
//! within 0.7 points of float on the eval split, and LiteRT's accuracy on the exported
//! file equals validate's (one LiteRT process for all); the file is the same bytes
//! from run to run; the config and the tuning data are in the cache key; an
//! unreachable target fails with the best drop reached unless `best_effort`; and bad
//! fallback tables are recipe errors naming line:col.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use support::litert_oracle::{run_litert_batch, BatchJob, Resolver};
use support::{manifest_dir, tmp_dir};

const FIXTURES: [&str; 3] = [
    "q16_outlier_inputs",
    "q16_outlier_channel",
    "q16_sensitive_act",
];

fn qpipe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qpipe"))
        .args(args)
        .env_remove("QPIPE_CACHE_DIR")
        .env("CI", "1")
        .output()
        .expect("qpipe runs")
}

fn fixture(name: &str) -> PathBuf {
    manifest_dir().join("fixtures").join(name)
}

fn q(p: &Path) -> String {
    serde_json::to_string(p.to_str().unwrap()).unwrap()
}

/// Freeze, strip, plain int8 (`plain`) and int8 with `fallback` (a TOML body for
/// `[stages.int8.fallback]`), both exported and validated on eval against the float
/// model. `tune` is the directory of the tuning split's files.
fn recipe(name: &str, tune: &Path, fallback: &str) -> String {
    let fx = fixture(name);
    format!(
        r#"[pipeline]
name = "fallback"

[model]
checkpoint = {ckpt}
inputs = ["input_x"]
outputs = ["output/probs"]

[datasets.calib]
input_x = {calib}

[datasets.tune]
input_x = {tune_x}
labels = {tune_y}

[datasets.eval]
input_x = {eval_x}
labels = {eval_y}

[stages.freeze]
kind = "freeze"

[stages.strip]
kind = "strip_training"
input = "freeze"

[stages.plain]
kind = "quantize_int8"
input = "strip"
calibration = "calib"

[stages.int8]
kind = "quantize_int8"
input = "strip"
calibration = "calib"

[stages.int8.fallback]
{fallback}
[stages.export_float]
kind = "export_tflite"
input = "strip"
path = "float.tflite"

[stages.export_int8]
kind = "export_tflite"
input = "int8"
path = "int8.tflite"

[stages.v_int8]
kind = "validate"
reference = "strip"
candidate = "int8"
dataset = "eval"

[stages.v_plain]
kind = "validate"
reference = "strip"
candidate = "plain"
dataset = "eval"
"#,
        ckpt = q(&fx.join("best_validation")),
        calib = q(&fx.join("calib_input_x.npy")),
        tune_x = q(&tune.join("tune_input_x.npy")),
        tune_y = q(&tune.join("tune_y.npy")),
        eval_x = q(&fx.join("eval_input_x.npy")),
        eval_y = q(&fx.join("eval_y.npy")),
    )
}

const TARGET: &str = "dataset = \"tune\"\nmax_accuracy_drop = 0.005\n";

fn write(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("recipe.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// `qpipe run --json` (extra args after the recipe); panics with stderr on failure.
fn run_ok(recipe: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["run", recipe.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    let o = qpipe(&args);
    assert!(
        o.status.success(),
        "qpipe run {} failed:\n{}",
        recipe.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("run --json prints JSON")
}

fn stage<'a>(run: &'a Value, id: &str) -> &'a Value {
    run["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("no stage '{id}' in {run}"))
}

fn metric(run: &Value, id: &str, key: &str) -> f64 {
    stage(run, id)["metrics"][key]
        .as_f64()
        .unwrap_or_else(|| panic!("stage '{id}' has no metric '{key}'"))
}

fn argmax_accuracy(probs: &qpipe::ir::Tensor, labels: &[i64]) -> f64 {
    let v = probs.to_f64_vec().unwrap();
    let classes = probs.shape()[1];
    assert_eq!(probs.shape()[0], labels.len());
    let correct = labels
        .iter()
        .enumerate()
        .filter(|(r, &l)| {
            let row = &v[r * classes..(r + 1) * classes];
            let best = (0..classes).fold(0, |b, c| if row[c] > row[b] { c } else { b });
            best as i64 == l
        })
        .count();
    correct as f64 / labels.len() as f64
}

#[test]
fn fallback_is_within_0_7_points_of_float_on_eval_and_litert_agrees() {
    fallback_on_the_fixtures(FallbackTo::Float);
}

/// `to = "int16"`: the reverted ops compute in 16x8 between QUANTIZE ops converting
/// int8 <-> int16, in a file LiteRT runs with validate's accuracy.
#[test]
fn fallback_to_int16_mixes_int8_and_int16_and_litert_agrees() {
    fallback_on_the_fixtures(FallbackTo::Int16);
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum FallbackTo {
    Float,
    Int16,
}

fn fallback_on_the_fixtures(to: FallbackTo) {
    let (body, reverted, reason, label) = match to {
        FallbackTo::Float => (
            TARGET.to_string(),
            "float_ops",
            "fallback: kept in float",
            "float",
        ),
        FallbackTo::Int16 => (
            format!("{TARGET}to = \"int16\"\n"),
            "int16_ops",
            "",
            "int16",
        ),
    };
    let mut jobs = Vec::new();
    let mut expect = Vec::new();
    let mut lines = Vec::new();
    for name in FIXTURES {
        let dir = tmp_dir(&format!("fallback-{label}-{name}"));
        let recipe = write(&dir, &recipe(name, &fixture(name), &body));
        if to == FallbackTo::Int16 && name == "q16_outlier_channel" {
            // Its loss is in the int8 weights, which 16x8 keeps: no int16 region
            // recovers it (equalize = true does, with every op left in int8).
            let o = qpipe(&["run", recipe.to_str().unwrap(), "--only", "int8"]);
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                !o.status.success()
                    && err.contains("is not met on 'tune' (600 samples) after 5 trials")
                    && err.contains("the best reached was an accuracy drop of 5.83 points")
                    && err.contains("ops in int16 (Relu, Relu_1)"),
                "{name}: {err}"
            );
            continue;
        }
        let run = run_ok(&recipe, &[]);
        let plain_drop = metric(&run, "v_plain", "accuracy_drop");
        assert!(
            plain_drop >= 0.03,
            "{name}: plain int8 loses {:.2} points on eval; the fixture should make it lose >= 3",
            plain_drop * 100.0
        );
        let f = &stage(&run, "int8")["metrics"]["fallback"];
        assert_eq!(f["met"], true, "{name}: {f}");
        assert_eq!(f["samples"], 600, "{name}: the whole tuning split: {f}");
        let tune_drop = f["accuracy_drop"].as_f64().unwrap();
        assert!(
            tune_drop <= 0.005 + 1e-9,
            "{name}: tuning drop {tune_drop}: {f}"
        );
        assert!(
            f["int8_accuracy_drop"].as_f64().unwrap() > 0.005,
            "{name}: all-int8 already met the target, nothing was tested: {f}"
        );
        let float_ops: Vec<&str> = f[reverted]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["node"].as_str().unwrap())
            .collect();
        assert!(!float_ops.is_empty(), "{name}: {f}");
        if to == FallbackTo::Int16 {
            // Every op of these models has a 16x8 kernel: none falls back to float.
            assert_eq!(f["float_ops"], serde_json::json!([]), "{name}: {f}");
            assert_eq!(stage(&run, "int8")["metrics"]["float_ops"], 0, "{name}");
        }
        let trials = f["trials"].as_u64().unwrap();
        assert!(
            trials > float_ops.len() as u64 && trials <= 50,
            "{name}: trial 1 is the all-int8 model, then one per revert: {f}"
        );
        // The rewrite's own report names each op kept in float, and why.
        let nodes = stage(&run, "int8")["metrics"]["float_nodes"].to_string();
        for op in float_ops.iter().filter(|_| !reason.is_empty()) {
            assert!(
                nodes.contains(&format!("\"node\":\"{op}\",\"op\"")) && nodes.contains(reason),
                "{name}: {op} missing from float_nodes {nodes}"
            );
        }
        let drop = metric(&run, "v_int8", "accuracy_drop");
        assert!(
            drop <= 0.007 + 1e-12,
            "{name}: the fallback model is {:.2} points below float on eval (want <= 0.7)",
            drop * 100.0
        );
        let bytes = std::fs::metadata(dir.join("out/int8.tflite"))
            .unwrap()
            .len();
        lines.push(format!(
            "{name}: plain int8 drop {:+.2} pts; fallback kept {float_ops:?} in {label} after \
             {trials} trials, tune drop {:+.2} pts, eval drop {:+.2} pts, {bytes} bytes",
            plain_drop * 100.0,
            tune_drop * 100.0,
            drop * 100.0
        ));
        let cmp = qpipe(&[
            "compare",
            recipe.to_str().unwrap(),
            "--latency-samples",
            "0",
        ]);
        let text = String::from_utf8_lossy(&cmp.stdout);
        assert!(
            cmp.status.success(),
            "{}",
            String::from_utf8_lossy(&cmp.stderr)
        );
        let line = text
            .lines()
            .find(|l| l.contains("fallback kept"))
            .unwrap_or_else(|| panic!("{name}: compare shows no fallback:\n{text}"));
        assert!(
            float_ops.iter().all(|op| line.contains(op))
                && line.contains(&format!("in {label} after {trials} trials")),
            "{name}: {line}"
        );
        for (file, accuracy) in [
            ("int8.tflite", metric(&run, "v_int8", "candidate_accuracy")),
            ("float.tflite", metric(&run, "v_int8", "reference_accuracy")),
        ] {
            let out_dir = dir.join(format!("litert-{file}"));
            jobs.push(BatchJob {
                model: dir.join("out").join(file),
                inputs: vec![("input_x".into(), fixture(name).join("eval_input_x.npy"))],
                resolver: Resolver::Reference,
                out_dir,
            });
            expect.push((name, file, accuracy));
        }
    }
    for l in &lines {
        eprintln!("{l}");
    }
    let results = run_litert_batch(&jobs, &tmp_dir(&format!("fallback-litert-{label}")));
    for ((name, file, accuracy), r) in expect.iter().zip(results) {
        let outs = r.unwrap_or_else(|e| panic!("{name} {file}: LiteRT failed: {e}"));
        let labels = qpipe::npy::read(&fixture(name).join("eval_y.npy")).unwrap();
        let labels: Vec<i64> = labels.to_i64_vec().unwrap();
        let litert = argmax_accuracy(&outs[0], &labels);
        assert_eq!(
            (litert * labels.len() as f64).round(),
            (accuracy * labels.len() as f64).round(),
            "{name} {file}: LiteRT's accuracy {litert} differs from validate's {accuracy}"
        );
    }
}

/// A copy of a fixture's tuning split in `dir` (so that a test may change it).
fn copy_tune(name: &str, dir: &Path) {
    for f in ["tune_input_x.npy", "tune_y.npy"] {
        std::fs::copy(fixture(name).join(f), dir.join(f)).unwrap();
    }
}

#[test]
fn same_inputs_give_a_byte_identical_file() {
    for (name, to, reverted) in [
        ("q16_outlier_channel", "", "float_ops"),
        ("q16_sensitive_act", "to = \"int16\"\n", "int16_ops"),
    ] {
        let mut files = Vec::new();
        let mut metrics = Vec::new();
        // Fresh caches, and a different number of threads each time.
        for jobs in ["1", "2"] {
            let dir = tmp_dir("fallback-determinism");
            let recipe = write(
                &dir,
                &recipe(name, &fixture(name), &format!("{TARGET}{to}")),
            );
            let run = run_ok(&recipe, &["--jobs", jobs, "--only", "export_int8"]);
            assert_eq!(stage(&run, "int8")["status"], "ran");
            metrics.push(stage(&run, "int8")["metrics"]["fallback"].clone());
            files.push(std::fs::read(dir.join("out/int8.tflite")).unwrap());
        }
        assert!(
            metrics[0][reverted]
                .as_array()
                .is_some_and(|a| !a.is_empty()),
            "{to}: {}",
            metrics[0]
        );
        assert_eq!(metrics[0], metrics[1], "{to}");
        assert!(
            files[0] == files[1],
            "{to}: the two int8.tflite files differ"
        );
    }
}

#[test]
fn fallback_config_and_tuning_data_are_in_the_cache_key() {
    let name = "q16_sensitive_act";
    let dir = tmp_dir("fallback-key");
    copy_tune(name, &dir);
    let recipe = write(&dir, &recipe(name, &dir, TARGET));
    let status = |extra: &[&str]| {
        let run = run_ok(&recipe, extra);
        stage(&run, "int8")["status"].as_str().unwrap().to_string()
    };
    let only = ["--only", "int8"];
    assert_eq!(status(&only), "ran");
    assert_eq!(status(&only), "cached");
    let edit = |from: &str, to: &str| {
        let text = std::fs::read_to_string(&recipe).unwrap();
        assert!(text.contains(from), "{from:?}");
        std::fs::write(&recipe, text.replacen(from, to, 1)).unwrap();
    };
    for (from, to) in [
        ("max_accuracy_drop = 0.005\n", "max_accuracy_drop = 0.006\n"),
        (
            "dataset = \"tune\"\n",
            "dataset = \"tune\"\nmax_trials = 49\n",
        ),
        ("max_trials = 49\n", "max_trials = 49\nbest_effort = true\n"),
        (
            "best_effort = true\n",
            "best_effort = true\nreference = \"strip\"\n",
        ),
    ] {
        edit(from, to);
        assert_eq!(status(&only), "ran", "after {to:?}");
        assert_eq!(status(&only), "cached", "after {to:?}");
    }
    // One tuning label changed: same config, other data.
    let y = dir.join("tune_y.npy");
    let mut labels = qpipe::npy::read(&y).unwrap().to_i64_vec().unwrap();
    labels[0] = (labels[0] + 1) % 4;
    let t = qpipe::ir::Tensor::from_vec(vec![labels.len()], &labels);
    qpipe::npy::write(&y, &t).unwrap();
    assert_eq!(status(&only), "ran", "after changing tune_y.npy");
    assert_eq!(status(&only), "cached");
}

#[test]
fn an_unreachable_target_fails_with_the_best_reached_unless_best_effort() {
    let name = "q16_outlier_channel";
    let dir = tmp_dir("fallback-unreachable");
    // The calibration set has no labels: the target is agreement with the reference.
    let body = "dataset = \"calib\"\nmin_agreement = 1.0\nmax_trials = 2\n";
    let recipe = write(&dir, &recipe(name, &fixture(name), body));
    let o = qpipe(&["run", recipe.to_str().unwrap(), "--only", "int8"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("min_agreement 100.00% is not met on 'calib' (200 samples) after 2 trials")
            && err.contains("the best reached was an agreement of"),
        "{err}"
    );
    let text = std::fs::read_to_string(&recipe).unwrap();
    std::fs::write(
        &recipe,
        text.replacen(body, &format!("{body}best_effort = true\n"), 1),
    )
    .unwrap();
    let run = run_ok(&recipe, &["--only", "int8"]);
    let f = &stage(&run, "int8")["metrics"]["fallback"];
    assert_eq!(f["met"], false, "{f}");
    assert_eq!(f["trials"], 2, "{f}");
    let best = f["agreement"].as_f64().unwrap();
    assert!(
        best < 1.0 && best >= f["int8_agreement"].as_f64().unwrap(),
        "{f}"
    );
    assert!(
        f.get("accuracy_drop").is_none(),
        "no labels, no accuracy: {f}"
    );
    // An accuracy target on data without labels is refused when the stage runs.
    let text = std::fs::read_to_string(&recipe).unwrap();
    std::fs::write(
        &recipe,
        text.replacen("min_agreement = 1.0\n", "max_accuracy_drop = 0.01\n", 1),
    )
    .unwrap();
    let o = qpipe(&["run", recipe.to_str().unwrap(), "--only", "int8"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("max_accuracy_drop needs labels in data set 'calib'"),
        "{err}"
    );
}

/// 1-based line and column of the first `needle` after `after`.
fn pos(text: &str, after: &str, needle: &str) -> (usize, usize) {
    let start = text.find(after).unwrap();
    let at = start + text[start..].find(needle).unwrap();
    let before = &text[..at];
    (
        before.matches('\n').count() + 1,
        before.rsplit('\n').next().unwrap().chars().count() + 1,
    )
}

#[test]
fn bad_fallback_tables_are_recipe_errors_at_line_and_column() {
    const HEAD: &str = "[stages.int8.fallback]\n";
    // (fallback body, text the error points at, the key named, part of the message)
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "dataset = \"tune\"\nmax_accuracy_drop = 0.01\nmin_agreement = 0.9\n",
            "0.9",
            "fallback.min_agreement",
            "not both",
        ),
        ("dataset = \"tune\"\n", HEAD, "fallback", "needs a target"),
        (
            "dataset = \"tune\"\nmin_agreement = 0.9\nreference = \"nosuch\"\n",
            "\"nosuch\"",
            "fallback.reference",
            "unknown stage 'nosuch'",
        ),
        (
            "dataset = \"nosuch\"\nmin_agreement = 0.9\n",
            "\"nosuch\"",
            "fallback.dataset",
            "unknown dataset 'nosuch'",
        ),
        (
            "dataset = \"tune\"\nmin_agreement = 0.9\nto = \"bf16\"\n",
            "\"bf16\"",
            "fallback.to",
            "expected \"float\" or \"int16\"",
        ),
        (
            "dataset = \"tune\"\nmax_accuracy_drop = 1.5\n",
            "1.5",
            "fallback.max_accuracy_drop",
            "not a fraction",
        ),
        (
            "dataset = \"tune\"\nmin_agreement = -0.1\n",
            "-0.1",
            "fallback.min_agreement",
            "not a fraction",
        ),
        (
            "dataset = \"tune\"\nmin_agreement = 0.9\nmax_trials = 0\n",
            "0\n",
            "fallback.max_trials",
            "at least 1",
        ),
        (
            "dataset = \"tune\"\nmin_agreement = 0.9\nbogus = 1\n",
            "bogus",
            "fallback.bogus",
            "unknown field `bogus`",
        ),
        (
            "min_agreement = 0.9\n",
            HEAD,
            "fallback",
            "missing field `dataset`",
        ),
    ];
    let dir = tmp_dir("fallback-errors");
    for (body, at, key, message) in cases {
        let text = recipe("q16_sensitive_act", &fixture("q16_sensitive_act"), body);
        let recipe = write(&dir, &text);
        let o = qpipe(&["run", recipe.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{body}: {err}");
        let (line, col) = pos(&text, HEAD, at);
        let want = format!("recipe.toml:{line}:{col}: stages.int8.{key}: ");
        assert!(
            err.contains(&want) && err.contains(message),
            "{body}: want {want}…{message}, got: {err}"
        );
        assert!(!dir.join("out").exists(), "{body}: something ran");
    }
    // A fallback on a stage that does not make a full-integer model.
    let text = recipe("q16_sensitive_act", &fixture("q16_sensitive_act"), TARGET);
    let bad = text.replacen(
        "[stages.int8]\nkind = \"quantize_int8\"\ninput = \"strip\"\ncalibration = \"calib\"\n",
        "[stages.int8]\nkind = \"quantize_int8\"\ninput = \"strip\"\n",
        1,
    );
    assert_ne!(bad, text);
    write(&dir, &bad);
    let o = qpipe(&["run", dir.join("recipe.toml").to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    let (line, col) = pos(&bad, HEAD, HEAD);
    assert!(
        o.status.code() == Some(2)
            && err.contains(&format!("recipe.toml:{line}:{col}: stages.int8.fallback: "))
            && err.contains("needs strategy = \"DEFAULT\" with calibration"),
        "{err}"
    );
    // to = "int16" on a stage whose ops are all int16 already.
    let text = recipe(
        "q16_sensitive_act",
        &fixture("q16_sensitive_act"),
        "dataset = \"tune\"\nmin_agreement = 0.9\nto = \"int16\"\n",
    );
    let bad = text.replacen(
        "[stages.int8]\nkind = \"quantize_int8\"\ninput = \"strip\"\ncalibration = \"calib\"\n",
        "[stages.int8]\nkind = \"quantize_int8\"\ninput = \"strip\"\ncalibration = \"calib\"\n\
         activations = \"int16\"\n",
        1,
    );
    assert_ne!(bad, text);
    write(&dir, &bad);
    let o = qpipe(&["run", dir.join("recipe.toml").to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    let (line, col) = pos(&bad, HEAD, "\"int16\"");
    assert!(
        o.status.code() == Some(2)
            && err.contains(&format!(
                "recipe.toml:{line}:{col}: stages.int8.fallback.to: "
            ))
            && err.contains("its ops are int16 already"),
        "{err}"
    );
}

/// A fallback on an `activations = "int16"` stage reverts 16x8 ops to float, with the
/// same search and metrics.
#[test]
fn a_fallback_on_an_int16_stage_reverts_int16_ops_to_float() {
    let name = "q16_sensitive_act";
    let dir = tmp_dir("fallback-on-int16");
    let body = "dataset = \"tune\"\nmin_agreement = 0.999\nbest_effort = true\nmax_trials = 3\n";
    let text = recipe(name, &fixture(name), body).replacen(
        "[stages.int8]\nkind = \"quantize_int8\"\ninput = \"strip\"\ncalibration = \"calib\"\n",
        "[stages.int8]\nkind = \"quantize_int8\"\ninput = \"strip\"\ncalibration = \"calib\"\n\
         activations = \"int16\"\n",
        1,
    );
    let recipe = write(&dir, &text);
    let run = run_ok(&recipe, &["--only", "v_int8"]);
    let m = &stage(&run, "int8")["metrics"];
    assert_eq!(m["activations"], "int16", "{m}");
    let f = &m["fallback"];
    assert_eq!(f["trials"], 3, "{f}");
    let reverted: Vec<&str> = f["float_ops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["node"].as_str().unwrap())
        .collect();
    assert_eq!(reverted.len(), 2, "{f}");
    let nodes = m["float_nodes"].to_string();
    for op in &reverted {
        assert!(
            nodes.contains(&format!("\"node\":\"{op}\",\"op\""))
                && nodes.contains("fallback: kept in float"),
            "{op} missing from float_nodes {nodes}"
        );
    }
    assert!(f["agreement"].as_f64().unwrap() >= f["int8_agreement"].as_f64().unwrap());
}
