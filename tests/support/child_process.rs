//! Child processes: the CLI with the test stage kinds, and killing a run at a pause point.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::pipeline_stages::TEST_REGISTRY;

/// A command that runs `qpipe ARGS` (with [`TEST_REGISTRY`]) in a child process: the
/// current test binary re-executed on its `child_qpipe` entry point, which the calling
/// test file must define with [`child_entry`].
pub fn qpipe_child(args: &[&str]) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args([
        "child_qpipe",
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
        "-q",
    ]);
    c.env("QPIPE_CHILD_ARGS", serde_json::to_string(args).unwrap());
    c.env_remove("QPIPE_CACHE_DIR");
    c.env_remove("QPIPE_TEST_PAUSE");
    c
}

/// The body of the `child_qpipe` entry point.
pub fn child_entry() {
    let Ok(args) = std::env::var("QPIPE_CHILD_ARGS") else {
        return;
    };
    let args: Vec<String> = serde_json::from_str(&args).unwrap();
    let mut full = vec!["qpipe".to_string()];
    full.extend(args);
    let code = qpipe::cli::main(full.into_iter().map(Into::into).collect(), TEST_REGISTRY);
    std::process::exit(code);
}

/// A child's stdout without the test harness's preamble.
pub fn child_stdout(out: &Output) -> String {
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.strip_prefix("\nrunning 1 test\n")
        .map(str::to_string)
        .unwrap_or(s)
}

/// The JSON document a `run --json` child printed.
pub fn child_json(out: &Output) -> serde_json::Value {
    let s = child_stdout(out);
    let start = s.find('{').unwrap_or_else(|| panic!("no JSON in {s:?}"));
    serde_json::from_str(s[start..].trim()).unwrap_or_else(|e| panic!("{e}: {s}"))
}

/// Starts `run` (a `qpipe run` command) with `QPIPE_TEST_PAUSE=point:stage`, waits until
/// the run reports that it paused there, and SIGKILLs it.
pub fn kill_at(mut run: Command, point: &str, stage: &str) {
    let mut child = run
        .env("QPIPE_TEST_PAUSE", format!("{point}:{stage}"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if line.starts_with("qpipe-test-pause ") {
                let _ = tx.send(Ok(line));
                return;
            }
            seen.push(line);
        }
        let _ = tx.send(Err(seen.join("\n")));
    });
    let got = rx.recv_timeout(Duration::from_secs(120));
    child.kill().unwrap();
    child.wait().unwrap();
    match got {
        Ok(Ok(line)) => assert_eq!(line, format!("qpipe-test-pause {point} {stage}")),
        Ok(Err(stderr)) => panic!("the run ended before {point}:{stage}: {stderr}"),
        Err(_) => panic!("the run did not reach {point}:{stage}"),
    }
}

/// The status (`ran`, `cached`, ...) of stage `id` in a `run --json` document.
pub fn status_of(v: &serde_json::Value, id: &str) -> String {
    v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap()["status"]
        .as_str()
        .unwrap()
        .to_string()
}
