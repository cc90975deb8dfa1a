//! Progress on stderr: counts, rate and time left redrawn in place on a terminal;
//! no escape sequences when stderr is redirected, under `--json`, `--quiet` or `CI`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A workspace whose recipe validates fp16 against float32 on the push_student
/// eval inputs tiled `times` times (enough rows for the bar to be redrawn).
fn workspace(name: &str, times: usize) -> PathBuf {
    let dir = root().join("target/tmp/progress").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let src = root().join("fixtures/push_student/eval_x.npy");
    let bytes = std::fs::read(&src).unwrap();
    let h = qpipe::npy::parse_header(&bytes, bytes.len() as u64).unwrap();
    let mut shape = h.shape.clone();
    shape[0] *= times;
    let mut out = qpipe::npy::header_bytes(h.dtype, &shape).unwrap();
    for _ in 0..times {
        out.extend_from_slice(&bytes[h.data_offset as usize..]);
    }
    std::fs::write(dir.join("big_x.npy"), out).unwrap();
    let fixtures = root().join("fixtures/push_student");
    let recipe = format!(
        r#"[pipeline]
name = "progress"

[model]
checkpoint = "{f}/best_validation"
inputs = ["input_x"]
outputs = ["score_student/output_student"]

[datasets.big]
input_x = "big_x.npy"

[stages.freeze]
kind = "freeze"

[stages.strip]
kind = "strip_training"
input = "freeze"

[stages.fp16]
kind = "fp16_cast"
input = "strip"

[stages.check]
kind = "validate"
reference = "strip"
candidate = "fp16"
dataset = "big"
"#,
        f = fixtures.display()
    );
    std::fs::write(dir.join("recipe.toml"), recipe).unwrap();
    dir
}

fn qpipe(args: &[&str], cwd: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qpipe"));
    c.args(args)
        .current_dir(cwd)
        .env_remove("QPIPE_CACHE_DIR")
        .env_remove("CI");
    c
}

/// Runs qpipe with a pseudo-terminal (30x120) as stdin, stdout and stderr.
fn on_pty(args: &[&str], cwd: &Path) -> (Output, String) {
    let helper = root().join("tests/progress_util/pty_run.py");
    let out = Command::new("python3")
        .arg(helper)
        .arg(env!("CARGO_BIN_EXE_qpipe"))
        .args(args)
        .current_dir(cwd)
        .env_remove("QPIPE_CACHE_DIR")
        .env_remove("CI")
        .env("TERM", "xterm-256color")
        .output()
        .expect("python3 runs the pty helper");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out, text)
}

/// The distinct counts `N` in "N/TOTAL samples" lines of `label`.
fn counts(text: &str, label: &str, total: &str) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    let needle = format!("/{total} samples");
    for frame in text.split(['\r', '\n']) {
        let Some(at) = frame.find(label) else {
            continue;
        };
        let frame = &frame[at..];
        let Some(end) = frame.find(&needle) else {
            continue;
        };
        let n = frame[..end].rsplit(' ').next().unwrap().to_string();
        if !seen.contains(&n) {
            seen.push(n);
        }
    }
    seen
}

fn assert_bar_frames(text: &str, label: &str, total: &str) {
    let seen = counts(text, label, total);
    assert!(
        seen.len() >= 2,
        "at least two different counts of '{label}': {seen:?}\n{text:?}"
    );
    let frame = text
        .split(['\r', '\n'])
        .find(|f| f.contains(label) && f.contains(&format!("/{total} samples")))
        .unwrap();
    assert!(frame.contains("/s, "), "a rate: {frame:?}");
    assert!(frame.contains(" left"), "the time left: {frame:?}");
    // Redrawn in place: each frame clears the line it replaces.
    assert!(text.contains("\r\x1b[2K"), "{text:?}");
}

#[test]
fn validate_and_eval_show_counts_rate_and_time_left_on_a_terminal() {
    let ws = workspace("tty", 10);
    let (out, text) = on_pty(&["run", "recipe.toml"], &ws);
    assert!(out.status.success(), "{text}");
    assert_bar_frames(&text, "check: validating [", "10,000");
    assert!(
        !text.contains("check: check"),
        "the stage name once: {text:?}"
    );
    // Checkpoint reads count bytes.
    let read = text
        .split(['\r', '\n'])
        .find(|f| f.contains("freeze: reading the checkpoint ["))
        .unwrap_or_else(|| panic!("a checkpoint bar: {text:?}"));
    assert!(read.contains(" KiB/268.95 KiB, "), "{read:?}");
    assert!(read.contains("/s, ") && read.contains(" left"), "{read:?}");
    // The bar is gone once the stage is done: nothing but plain lines follow
    // the last frame's clearing.
    let last = text.rfind("samples, ").unwrap();
    let after = &text[last..];
    let cleared = after.find("\r\x1b[2K").expect("the last frame is cleared");
    assert!(
        after[cleared + 5..].starts_with("done      check"),
        "{after:?}"
    );
    assert!(!after[cleared + 5..].contains("\x1b["), "{after:?}");

    let (out, text) = on_pty(
        &["eval", "recipe.toml", "--stage", "fp16", "--dataset", "big"],
        &ws,
    );
    assert!(out.status.success(), "{text}");
    assert_bar_frames(&text, "fp16: evaluating [", "10,000");
    assert!(
        text.contains("stage fp16 on big: 10000 samples"),
        "{text:?}"
    );
}

#[test]
fn no_escape_sequences_when_redirected_under_json_quiet_or_ci() {
    let ws = workspace("quiet", 3);
    let check = |what: &str, text: &str| {
        assert!(!text.contains("\x1b["), "{what}: {text:?}");
        assert!(!text.contains("samples,"), "{what}: {text:?}");
    };
    // stderr a pipe.
    let o = qpipe(&["run", "recipe.toml"], &ws).output().unwrap();
    assert!(o.status.success(), "{o:?}");
    check("redirected", &String::from_utf8_lossy(&o.stderr));
    let o = qpipe(
        &["eval", "recipe.toml", "--stage", "fp16", "--dataset", "big"],
        &ws,
    )
    .output()
    .unwrap();
    assert!(o.status.success(), "{o:?}");
    check("redirected eval", &String::from_utf8_lossy(&o.stderr));

    // On a terminal: each way of asking for quiet.
    for (name, args, ci) in [
        (
            "--json",
            vec!["run", "recipe.toml", "--json", "--keep-going"],
            false,
        ),
        ("--quiet", vec!["run", "recipe.toml", "--quiet"], false),
        ("CI=1", vec!["run", "recipe.toml"], true),
        (
            "eval --json",
            vec![
                "eval",
                "recipe.toml",
                "--stage",
                "fp16",
                "--dataset",
                "big",
                "--json",
            ],
            false,
        ),
        (
            "eval --quiet",
            vec![
                "eval",
                "recipe.toml",
                "--stage",
                "fp16",
                "--dataset",
                "big",
                "-q",
            ],
            false,
        ),
        (
            "eval CI=1",
            vec!["eval", "recipe.toml", "--stage", "fp16", "--dataset", "big"],
            true,
        ),
    ] {
        // A fresh cache each time, so the validate stage runs.
        let _ = std::fs::remove_dir_all(ws.join(".qpipe"));
        let mut c = Command::new("python3");
        c.arg(root().join("tests/progress_util/pty_run.py"))
            .arg(env!("CARGO_BIN_EXE_qpipe"))
            .args(&args)
            .current_dir(&ws)
            .env_remove("QPIPE_CACHE_DIR")
            .env_remove("CI")
            .env("TERM", "xterm-256color");
        if ci {
            c.env("CI", "1");
        }
        if args[0] == "eval" {
            // eval needs the stage built.
            let o = qpipe(&["run", "recipe.toml"], &ws).output().unwrap();
            assert!(o.status.success(), "{o:?}");
        }
        let o = c.output().unwrap();
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{name}: {text}");
        check(name, &text);
    }
}

#[test]
fn the_pty_helper_sees_a_terminal() {
    // Guards the test above: without a terminal it would pass vacuously.
    let ws = workspace("probe", 1);
    let (out, text) = on_pty(&["run", "recipe.toml"], &ws);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("running   check"), "{text:?}");
}

/// Runs the recipe on a pty and sends `signal` (INT, TERM) to qpipe once a
/// validate bar is on the screen.
fn interrupted(name: &str, signal: &str) -> (Output, String) {
    let ws = workspace(name, 10);
    let out = Command::new("python3")
        .arg(root().join("tests/progress_util/pty_run.py"))
        .arg(env!("CARGO_BIN_EXE_qpipe"))
        .args(["run", "recipe.toml"])
        .current_dir(&ws)
        .env_remove("QPIPE_CACHE_DIR")
        .env_remove("CI")
        .env("TERM", "xterm-256color")
        .env("PTY_SIGNAL", signal)
        .env("PTY_SIGNAL_AFTER", "samples, ")
        .output()
        .expect("python3 runs the pty helper");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out, text)
}

#[test]
fn a_signal_clears_the_bars_and_exits_128_plus_its_number() {
    for (name, signal, code) in [("sigint", "INT", 130), ("sigterm", "TERM", 143)] {
        let (out, text) = interrupted(name, signal);
        assert_eq!(out.status.code(), Some(code), "{signal}: {text:?}");
        let last = text
            .rfind("samples, ")
            .unwrap_or_else(|| panic!("{signal}: a bar was drawn: {text:?}"));
        let after = &text[last..];
        let cleared = after
            .find("\r\x1b[2K")
            .unwrap_or_else(|| panic!("{signal}: the last frame is cleared: {after:?}"));
        let rest = &after[cleared + 5..];
        assert!(
            !rest.contains("samples") && !rest.contains("validating"),
            "{signal}: no bar after the clearing: {after:?}"
        );
        assert!(
            rest.ends_with("\x1b[?25h"),
            "{signal}: the cursor shown last: {after:?}"
        );
    }
}
