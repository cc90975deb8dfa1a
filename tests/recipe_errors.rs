//! Every recipe error names FILE:LINE:COL and the key, exits with code 2, and happens
//! before anything runs (no cache directory, no outputs).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{tmp_dir, TEST_REGISTRY};
use qpipe::pipeline::Recipe;

const GOOD: &str = r#"[pipeline]
name = "errs"

[model]
checkpoint = "ckpt/model"
inputs = ["input_x"]
outputs = ["out"]

[datasets.calib]
input_x = "calib_x.npy"

[stages.freeze]
kind = "freeze"

[stages.pb]
kind = "export_graphdef"
input = "freeze"
path = "frozen.pb"
"#;

struct Case {
    dir: PathBuf,
    recipe: PathBuf,
    text: String,
}

fn case(name: &str, text: &str) -> Case {
    let dir = tmp_dir(name);
    std::fs::create_dir_all(dir.join("ckpt")).unwrap();
    for f in [
        "model.meta",
        "model.index",
        "model.data-00000-of-00002",
        "model.data-00001-of-00002",
    ] {
        std::fs::write(dir.join("ckpt").join(f), b"x").unwrap();
    }
    std::fs::write(dir.join("calib_x.npy"), b"x").unwrap();
    std::fs::write(dir.join("model.pb"), b"x").unwrap();
    let recipe = dir.join("recipe.toml");
    std::fs::write(&recipe, text).unwrap();
    Case {
        dir,
        recipe,
        text: text.to_string(),
    }
}

/// The recipe `GOOD` with one textual edit.
fn edited(name: &str, from: &str, to: &str) -> Case {
    assert!(GOOD.contains(from), "{from:?}");
    case(name, &GOOD.replacen(from, to, 1))
}

/// 1-based line and column of the first occurrence of `needle` (after `after`).
fn pos(text: &str, after: &str, needle: &str) -> (usize, usize) {
    let start = text
        .find(after)
        .unwrap_or_else(|| panic!("{after:?} not in recipe"));
    let at = start
        + text[start..]
            .find(needle)
            .unwrap_or_else(|| panic!("{needle:?} not in recipe"));
    let before = &text[..at];
    (
        before.matches('\n').count() + 1,
        before.rsplit('\n').next().unwrap().chars().count() + 1,
    )
}

fn qpipe(args: &[&str], dir: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_qpipe"))
        .args(args)
        .current_dir(dir)
        .env_remove("QPIPE_CACHE_DIR")
        .output()
        .unwrap()
}

/// Runs `qpipe run` on the case and checks: exit code 2, one error line
/// `recipe.toml:LINE:COL: KEY: ...MESSAGE...`, nothing written.
fn expect_error(c: &Case, at: (usize, usize), key: &str, message: &str) {
    let out = qpipe(&["run", "recipe.toml"], &c.dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    let want = format!("error: recipe.toml:{}:{}: {key}: ", at.0, at.1);
    assert!(
        stderr.starts_with(&want),
        "expected {want:?}…, got:\n{stderr}\nrecipe:\n{}",
        c.text
    );
    assert!(
        stderr.contains(message),
        "expected {message:?} in:\n{stderr}"
    );
    assert!(out.stdout.is_empty());
    assert!(
        !c.dir.join(".qpipe").exists(),
        "nothing may run or be cached"
    );
    assert!(!c.dir.join("out").exists());
}

#[test]
fn the_good_recipe_parses() {
    let c = case("good", GOOD);
    let out = qpipe(&["graph", "recipe.toml"], &c.dir);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("pb      export_graphdef  <- input=freeze  -> frozen.pb"),
        "{text}"
    );
}

#[test]
fn syntax_error() {
    let c = edited("syntax", "[stages.pb]", "[stages.pb");
    let out = qpipe(&["run", "recipe.toml"], &c.dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    let (line, _) = pos(&c.text, "", "[stages.pb");
    assert!(
        stderr.starts_with(&format!("error: recipe.toml:{line}:")),
        "{stderr}"
    );
    assert!(stderr.contains("syntax error"), "{stderr}");
}

#[test]
fn unknown_table() {
    let c = edited("unknown-table", "[stages.freeze]", "[stagez.freeze]");
    expect_error(&c, pos(&c.text, "", "stagez"), "stagez", "unknown table");
}

#[test]
fn unknown_key_in_pipeline_and_model() {
    let c = edited(
        "unknown-pipeline-key",
        "name = \"errs\"",
        "name = \"errs\"\nnmae = \"x\"",
    );
    expect_error(
        &c,
        pos(&c.text, "", "nmae"),
        "pipeline.nmae",
        "unknown key (expected one of: name, cache_dir",
    );
    let c = edited(
        "unknown-model-key",
        "outputs = [\"out\"]",
        "outputs = [\"out\"]\ninput_shape = {}",
    );
    expect_error(
        &c,
        pos(&c.text, "", "input_shape"),
        "model.input_shape",
        "unknown key",
    );
}

#[test]
fn unknown_key_in_a_stage() {
    let c = edited(
        "unknown-stage-key",
        "path = \"frozen.pb\"",
        "path = \"frozen.pb\"\ncompress = true",
    );
    expect_error(
        &c,
        pos(&c.text, "", "compress"),
        "stages.pb.compress",
        "unknown field `compress`",
    );
}

#[test]
fn wrong_types() {
    let c = edited("wrong-type-stage", "path = \"frozen.pb\"", "path = 3");
    expect_error(
        &c,
        pos(&c.text, "path = ", "3"),
        "stages.pb.path",
        "invalid type: integer `3`",
    );
    let c = edited(
        "wrong-type-pipeline",
        "name = \"errs\"",
        "name = \"errs\"\nallow_outside_out_dir = \"yes\"",
    );
    expect_error(
        &c,
        pos(&c.text, "allow_outside_out_dir", "\"yes\""),
        "pipeline.allow_outside_out_dir",
        "expected a boolean, found string",
    );
    let c = edited(
        "wrong-type-model",
        "inputs = [\"input_x\"]",
        "inputs = \"input_x\"",
    );
    expect_error(
        &c,
        pos(&c.text, "inputs = ", "\"input_x\""),
        "model.inputs",
        "expected an array, found string",
    );
}

#[test]
fn missing_required_keys() {
    let c = edited("missing-field", "path = \"frozen.pb\"\n", "");
    expect_error(
        &c,
        pos(&c.text, "", "[stages.pb]"),
        "stages.pb",
        "missing field `path`",
    );
    let c = edited("missing-kind", "kind = \"freeze\"\n", "");
    expect_error(
        &c,
        pos(&c.text, "", "[stages.freeze]"),
        "stages.freeze.kind",
        "missing",
    );
}

#[test]
fn unknown_stage_kind() {
    let c = edited("unknown-kind", "kind = \"freeze\"", "kind = \"freez\"");
    expect_error(
        &c,
        pos(&c.text, "", "\"freez\""),
        "stages.freeze.kind",
        "unknown stage kind 'freez' (kinds: freeze, ",
    );
}

#[test]
fn reference_to_a_missing_stage() {
    let c = edited("unknown-stage", "input = \"freeze\"", "input = \"frezee\"");
    expect_error(
        &c,
        pos(&c.text, "", "\"frezee\""),
        "stages.pb.input",
        "unknown stage 'frezee' (stages: freeze, pb)",
    );
    let c = edited(
        "unknown-variant",
        "input = \"freeze\"",
        "input = \"freeze@x\"",
    );
    expect_error(
        &c,
        pos(&c.text, "", "\"freeze@x\""),
        "stages.pb.input",
        "unknown stage variant 'freeze@x'",
    );
}

#[test]
fn reference_to_a_missing_dataset() {
    let text = r#"
[model]
graph = "model.pb"
inputs = ["input_x"]
outputs = ["out"]

[datasets.calib]
input_x = "calib_x.npy"

[stages.load]
kind = "t_load"

[stages.q]
kind = "t_calib"
input = "load"
dataset = "calbi"
strategy = "DEFAULT"
"#;
    let c = case("unknown-dataset", text);
    let err = Recipe::parse(text, &c.recipe, TEST_REGISTRY).unwrap_err();
    assert_eq!(err.exit_code(), 2);
    let (l, col) = pos(text, "dataset = ", "\"calbi\"");
    assert_eq!(
        err.to_string(),
        format!(
            "{}:{l}:{col}: stages.q.dataset: unknown dataset 'calbi' (datasets: calib)",
            c.recipe.display()
        )
    );
    // The same through the CLI (a child process running the test stage kinds).
    let out = common::qpipe_child(&["run", c.recipe.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stages.q.dataset: unknown dataset 'calbi'")
    );
    assert!(!c.dir.join(".qpipe").exists());
}

#[test]
#[ignore = "entry point for child processes"]
fn child_qpipe() {
    common::child_entry();
}

#[test]
fn a_stage_config_check_names_its_key() {
    let text = r#"
[model]
graph = "model.pb"
inputs = ["input_x"]
outputs = ["out"]

[stages.load]
kind = "t_load"
scale = -1.0
"#;
    let c = case("config-check", text);
    let err = Recipe::parse(text, &c.recipe, TEST_REGISTRY).unwrap_err();
    let (l, col) = pos(text, "scale = ", "-1.0");
    assert_eq!(
        err.to_string(),
        format!(
            "{}:{l}:{col}: stages.load.scale: must be positive",
            c.recipe.display()
        )
    );
}

#[test]
fn dataset_keys_must_be_model_inputs() {
    let c = edited(
        "dataset-key",
        "input_x = \"calib_x.npy\"",
        "input_y = \"calib_x.npy\"",
    );
    expect_error(
        &c,
        pos(&c.text, "[datasets.calib]", "input_y"),
        "datasets.calib.input_y",
        "expected one of: input_x, labels",
    );
}

#[test]
fn cycle() {
    let text = GOOD.replacen(
        "kind = \"freeze\"",
        "kind = \"export_graphdef\"\ninput = \"pb\"\npath = \"a.pb\"",
        1,
    );
    let c = case("cycle", &text);
    let out = qpipe(&["run", "recipe.toml"], &c.dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("dependency cycle: "), "{stderr}");
    assert!(
        stderr.contains("freeze → pb → freeze") || stderr.contains("pb → freeze → pb"),
        "{stderr}"
    );
    let key_ok =
        stderr.contains(": stages.freeze.input: ") || stderr.contains(": stages.pb.input: ");
    assert!(key_ok, "{stderr}");
    assert!(!c.dir.join(".qpipe").exists());
}

#[test]
fn missing_files() {
    let c = edited(
        "missing-ckpt",
        "checkpoint = \"ckpt/model\"",
        "checkpoint = \"ckpt/nope\"",
    );
    expect_error(
        &c,
        pos(&c.text, "checkpoint = ", "\"ckpt/nope\""),
        "model.checkpoint",
        "cannot read 'ckpt/nope.meta'",
    );

    let c = edited("missing-shard", "[pipeline]", "[pipeline]");
    std::fs::remove_file(c.dir.join("ckpt/model.data-00001-of-00002")).unwrap();
    expect_error(
        &c,
        pos(&c.text, "checkpoint = ", "\"ckpt/model\""),
        "model.checkpoint",
        "missing checkpoint shard 'ckpt/model.data-00001-of-00002'",
    );

    let c = edited(
        "missing-dataset-file",
        "input_x = \"calib_x.npy\"",
        "input_x = \"calib_y.npy\"",
    );
    expect_error(
        &c,
        pos(&c.text, "", "\"calib_y.npy\""),
        "datasets.calib.input_x",
        "cannot read 'calib_y.npy'",
    );

    let c = edited(
        "missing-graph",
        "checkpoint = \"ckpt/model\"",
        "graph = \"nope.pb\"",
    );
    expect_error(
        &c,
        pos(&c.text, "", "\"nope.pb\""),
        "model.graph",
        "cannot read 'nope.pb'",
    );

    let c = case("missing-recipe", GOOD);
    let out = qpipe(&["run", "nope.toml"], &c.dir);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.toml: cannot read recipe"));
}

#[test]
fn export_paths_stay_in_out_dir() {
    for (name, bad) in [
        ("dotdot", "../frozen.pb"),
        ("nested-dotdot", "a/../../frozen.pb"),
        ("absolute", "/tmp/frozen.pb"),
    ] {
        let c = edited(
            &format!("escape-{name}"),
            "path = \"frozen.pb\"",
            &format!("path = {bad:?}"),
        );
        expect_error(
            &c,
            pos(&c.text, "path = ", &format!("{bad:?}")),
            "stages.pb.path",
            "is outside out_dir (absolute or with '..'); set allow_outside_out_dir = true",
        );
    }
    let allowed = GOOD
        .replacen(
            "path = \"frozen.pb\"",
            "path = \"../elsewhere/frozen.pb\"",
            1,
        )
        .replacen(
            "name = \"errs\"",
            "name = \"errs\"\nallow_outside_out_dir = true",
            1,
        );
    let c = case("escape-allowed", &allowed);
    let out = qpipe(&["graph", "recipe.toml"], &c.dir);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn two_stages_writing_one_file() {
    let text = format!("{GOOD}\n[stages.pb2]\nkind = \"export_graphdef\"\ninput = \"freeze\"\npath = \"./frozen.pb\"\n");
    let c = case("duplicate-output", &text);
    expect_error(
        &c,
        pos(&c.text, "[stages.pb2]", "\"./frozen.pb\""),
        "stages.pb2.path",
        "'./frozen.pb' is also written by stage 'pb'",
    );
}

#[test]
fn matrix_errors_point_into_the_matrix() {
    let c = edited(
        "matrix-type",
        "path = \"frozen.pb\"",
        "matrix = { path = [\"a.pb\", 3] }",
    );
    expect_error(
        &c,
        pos(&c.text, "\"a.pb\", ", "3"),
        "stages.pb.path",
        "invalid type: integer `3`",
    );
    let c = edited(
        "matrix-placeholder",
        "path = \"frozen.pb\"",
        "path = \"f_${strategy}.pb\"",
    );
    expect_error(
        &c,
        pos(&c.text, "path = ", "\"f_"),
        "stages.pb.path",
        "'${strategy}' used, but no matrix applies to this stage",
    );
    let c = edited(
        "matrix-dup",
        "path = \"frozen.pb\"",
        "path = \"frozen.pb\"\nmatrix = { path = [\"a.pb\"] }",
    );
    expect_error(
        &c,
        pos(&c.text, "matrix = { ", "path"),
        "stages.pb.matrix.path",
        "also set outside the matrix",
    );
    let c = edited("matrix-collide", "path = \"frozen.pb\"", "matrix = { path = [\"a.pb\"] }\n[stages.pb2]\nkind = \"export_graphdef\"\ninput = \"pb\"\npath = \"same.pb\"\n[stages.pb3]\nkind = \"export_graphdef\"\ninput = \"pb\"\npath = \"same.pb\"");
    expect_error(
        &c,
        pos(&c.text, "[stages.pb3]", "\"same.pb\""),
        "stages.pb3.path",
        "also written by stage 'pb2@a.pb'",
    );
}

#[test]
fn bad_command_lines_exit_with_2() {
    let c = case("usage", GOOD);
    for args in [
        &["run"][..],
        &["frobnicate"],
        &["run", "recipe.toml", "--jobs", "0"],
        &["cache", "ls", "--cache-dir", "nowhere"],
    ] {
        let out = qpipe(args, &c.dir);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = qpipe(&["--help"], &c.dir);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in ["run", "status", "graph", "cache"] {
        assert!(help.contains(cmd), "{help}");
    }
}

/// NaN and ±inf mean nothing in any stage setting; they were also hashed like an absent
/// value, so `max_accuracy_drop = -inf` added after a passing run was served from the cache.
#[test]
fn non_finite_floats_in_stage_tables() {
    for (name, stage, key, bad) in [
        (
            "drop-neg-inf",
            "kind = \"validate\"\nreference = \"freeze\"\ncandidate = \"freeze\"\ndataset = \"calib\"\nmax_accuracy_drop = -inf",
            "stages.extra.max_accuracy_drop",
            "-inf",
        ),
        (
            "drop-nan",
            "kind = \"validate\"\nreference = \"freeze\"\ncandidate = \"freeze\"\ndataset = \"calib\"\nmax_accuracy_drop = nan",
            "stages.extra.max_accuracy_drop",
            "nan",
        ),
        (
            "agreement-inf",
            "kind = \"validate\"\nreference = \"freeze\"\ncandidate = \"freeze\"\ndataset = \"calib\"\nmin_agreement = inf",
            "stages.extra.min_agreement",
            "inf",
        ),
        (
            "bind-nan",
            "kind = \"strip_training\"\ninput = \"freeze\"\nbind = { keep_prob = nan }",
            "stages.extra.bind.keep_prob",
            "nan",
        ),
        (
            "matrix-inf",
            "kind = \"strip_training\"\ninput = \"freeze\"\nmatrix = { x = [1.0, +inf] }",
            "stages.extra.matrix.x",
            "+inf",
        ),
    ] {
        let text = format!("{GOOD}\n[stages.extra]\n{stage}\n");
        let c = case(&format!("non-finite-{name}"), &text);
        expect_error(
            &c,
            pos(&c.text, "[stages.extra]", bad),
            key,
            &format!("{bad} is not a finite number"),
        );
    }
}

#[test]
fn pipeline_names_are_validated_like_stage_ids() {
    let c = edited(
        "pipeline-name-html",
        "name = \"errs\"",
        "name = \"<img src=x onerror=alert(3)>\"",
    );
    expect_error(
        &c,
        pos(&c.text, "name = ", "\"<img"),
        "pipeline.name",
        "pipeline names use letters, digits, '_', '-' and '.'",
    );
    // A name taken from the recipe's file name must be valid too.
    let text = GOOD.replacen("[pipeline]\nname = \"errs\"\n", "", 1);
    let c = case("pipeline-name-from-file", &text);
    let bad = c.dir.join("my recipe.toml");
    std::fs::write(&bad, &text).unwrap();
    let out = qpipe(&["run", "my recipe.toml"], &c.dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("pipeline.name: the pipeline is named after the recipe file, but 'my recipe' is not a valid name"),
        "{stderr}"
    );
    assert!(!c.dir.join(".qpipe").exists());
}
