//! `qpipe run` (the real binary and stage kinds) on copies of the fixture models:
//! the freshness guarantees end to end.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::SystemTime;

use serde_json::Value;
use support::child_process::{kill_at, status_of};
use support::fixtures::{input_name, model_json};
use support::project::flip_bit;
use support::tmp_dir;

const CKPT_FILES: [&str; 3] = [
    "best_validation.meta",
    "best_validation.index",
    "best_validation.data-00000-of-00001",
];

const RECIPE: &str = r#"[pipeline]
name = "push_student"

[model]
checkpoint = "model/best_validation"
inputs = ["input_x"]
outputs = ["score_student/output_student"]

[datasets.eval]
input_x = "model/eval_x.npy"
labels = "model/eval_y.npy"

[stages.freeze]
kind = "freeze"

[stages.pb]
kind = "export_graphdef"
input = "freeze"
path = "frozen.pb"

[stages.pb_copy]
kind = "export_graphdef"
input = "freeze"
path = "copies/frozen.pb"
"#;

struct Fixture {
    dir: PathBuf,
}

impl Fixture {
    /// A copy of `fixtures/<model>` under `model/`, with `recipe` as recipe.toml.
    fn new(name: &str, model: &str, recipe: &str) -> Fixture {
        let dir = tmp_dir(name);
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures")
            .join(model);
        std::fs::create_dir_all(dir.join("model")).unwrap();
        for f in CKPT_FILES
            .iter()
            .chain(&["tf_frozen.pb", "eval_x.npy", "eval_y.npy"])
        {
            std::fs::copy(src.join(f), dir.join("model").join(f)).unwrap();
        }
        std::fs::write(dir.join("recipe.toml"), recipe).unwrap();
        Fixture { dir }
    }

    fn qpipe(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_qpipe"));
        c.args(args)
            .current_dir(&self.dir)
            .env_remove("QPIPE_CACHE_DIR")
            .env_remove("QPIPE_TEST_PAUSE");
        c
    }

    /// `qpipe run --json`: exit code and the document.
    fn run(&self) -> (i32, Value, String) {
        let out = self
            .qpipe(&["run", "--json", "recipe.toml"])
            .output()
            .unwrap();
        let v = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
        (
            out.status.code().unwrap(),
            v,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn out(&self, rel: &str) -> PathBuf {
        self.dir.join("out").join(rel)
    }

    fn edit_recipe(&self, from: &str, to: &str) {
        let p = self.dir.join("recipe.toml");
        let t = std::fs::read_to_string(&p).unwrap();
        assert!(t.contains(from));
        std::fs::write(p, t.replacen(from, to, 1)).unwrap();
    }
}

/// Where a tensor's bytes start in the fixture's (single) data shard.
fn tensor_offset(model: &str, key: &str) -> usize {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(model)
        .join("index_dump.json");
    let dump: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let e = dump["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["key"] == key)
        .unwrap_or_else(|| panic!("no {key}"));
    assert!(e["size"].as_u64().unwrap() >= 4);
    e["offset"].as_u64().unwrap() as usize
}

fn statuses(v: &Value) -> Vec<(String, String)> {
    v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_string(),
                s["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn all(v: &Value, status: &str) -> bool {
    statuses(v).iter().all(|(_, s)| s == status)
}

#[test]
fn push_student_second_run_runs_nothing_and_config_changes_rerun_exactly_their_stages() {
    let f = Fixture::new("fx-second", "push_student", RECIPE);
    let (code, v, err) = f.run();
    assert_eq!(code, 0, "{err}");
    assert!(all(&v, "ran"), "{v}");
    let pb = std::fs::read(f.out("frozen.pb")).unwrap();
    assert_eq!(v["stages"][0]["metrics"]["nodes"], 69, "{v}");
    assert_eq!(std::fs::read(f.out("copies/frozen.pb")).unwrap(), pb);

    let (code, v, err) = f.run();
    assert_eq!(code, 0);
    assert!(all(&v, "cached"), "{v}");
    assert!(
        err.is_empty(),
        "a no-op run prints nothing on stderr off a terminal: {err}"
    );
    assert_eq!(std::fs::read(f.out("frozen.pb")).unwrap(), pb);

    f.edit_recipe(
        "path = \"copies/frozen.pb\"",
        "path = \"copies/student.pb\"",
    );
    let (_, v, _) = f.run();
    assert_eq!(
        statuses(&v),
        [
            ("freeze".into(), "cached".into()),
            ("pb".into(), "cached".into()),
            ("pb_copy".into(), "ran".into())
        ]
    );
    f.edit_recipe(
        "outputs = [\"score_student/output_student\"]",
        "outputs = [\"score_teacher/output_teacher\"]",
    );
    let (code, v, err) = f.run();
    assert_eq!(code, 0, "{err}");
    assert!(all(&v, "ran"), "a model setting reaches every stage: {v}");
    assert_ne!(std::fs::read(f.out("frozen.pb")).unwrap(), pb);
}

#[test]
fn push_student_touch_reruns_nothing_and_a_changed_byte_reruns_what_reads_it() {
    let f = Fixture::new("fx-bytes", "push_student", RECIPE);
    assert_eq!(f.run().0, 0);
    for name in CKPT_FILES.iter().chain(&["eval_x.npy"]) {
        let p = f.dir.join("model").join(name);
        let b = std::fs::read(&p).unwrap();
        std::fs::write(&p, b).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(SystemTime::now())
            .unwrap();
    }
    let (_, v, _) = f.run();
    assert!(all(&v, "cached"), "{v}");

    // No stage of this recipe reads the eval set.
    flip_bit(&f.dir.join("model/eval_x.npy"), 1000);
    let (_, v, _) = f.run();
    assert!(all(&v, "cached"), "{v}");

    // A byte of a tensor the student graph does not use (an Adam slot): freeze
    // reruns, produces the same graph, and early cut-off keeps the exports cached.
    let shard = f.dir.join("model/best_validation.data-00000-of-00001");
    let original = std::fs::read(&shard).unwrap();
    flip_bit(
        &shard,
        tensor_offset("push_student", "score_student/fc/kernel/Adam") + 3,
    );
    let out = f.qpipe(&["status", "recipe.toml"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("input file model/best_validation.data-00000-of-00001 changed (blake3 "),
        "{text}"
    );
    let (code, v, err) = f.run();
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        statuses(&v),
        [
            ("freeze".into(), "ran".into()),
            ("pb".into(), "cached".into()),
            ("pb_copy".into(), "cached".into())
        ]
    );

    // A byte of a tensor it does use: freeze reruns, and the reader's checksum rejects it.
    std::fs::write(&shard, &original).unwrap();
    flip_bit(
        &shard,
        tensor_offset("push_student", "score_student/fc/bias") + 1,
    );
    let (code, v, err) = f.run();
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        statuses(&v),
        [
            ("freeze".into(), "failed".into()),
            ("pb".into(), "skipped".into()),
            ("pb_copy".into(), "skipped".into())
        ]
    );
    assert!(err.contains("FAILED    freeze: "), "{err}");
    // Putting the bytes back makes everything fresh again: the old entries are still there.
    std::fs::write(&shard, &original).unwrap();
    let (code, v, _) = f.run();
    assert_eq!(code, 0);
    assert!(all(&v, "cached"), "{v}");
}

#[test]
fn conv_bn_frozen_graph_with_a_changed_weight_reruns_and_rewrites_the_output() {
    let recipe = RECIPE
        .replacen(
            "checkpoint = \"model/best_validation\"",
            "graph = \"model/tf_frozen.pb\"",
            1,
        )
        .replacen("score_student/output_student", "output", 1)
        .replacen("[\"input_x\"]", "[\"input\"]", 1)
        .replacen(
            "input_x = \"model/eval_x.npy\"",
            "input = \"model/eval_x.npy\"",
            1,
        );
    let f = Fixture::new("fx-graph", "conv_bn", &recipe);
    let model = model_json("conv_bn");
    let input = input_name("conv_bn");
    let output = model["outputs"][0].as_str().unwrap().to_string();
    f.edit_recipe("inputs = [\"input\"]", &format!("inputs = [\"{input}\"]"));
    f.edit_recipe(
        "input = \"model/eval_x.npy\"",
        &format!("{input} = \"model/eval_x.npy\""),
    );
    f.edit_recipe(
        "outputs = [\"output\"]",
        &format!("outputs = [\"{output}\"]"),
    );
    let (code, v, err) = f.run();
    assert_eq!(code, 0, "{err}\n{v}");
    let before = std::fs::read(f.out("frozen.pb")).unwrap();

    let pb = f.dir.join("model/tf_frozen.pb");
    let mut bytes = std::fs::read(&pb).unwrap();
    let at = weight_offset_in_pb("conv_bn", &bytes);
    bytes[at] ^= 0x01;
    std::fs::write(&pb, &bytes).unwrap();
    let (code, v, err) = f.run();
    assert_eq!(code, 0, "{err}\n{v}");
    assert!(all(&v, "ran"), "{v}");
    assert_ne!(std::fs::read(f.out("frozen.pb")).unwrap(), before);
}

/// The offset of a byte in the middle of a weight inside a frozen `.pb`: the largest
/// checkpoint tensor whose raw bytes appear verbatim in it (as `tensor_content`).
fn weight_offset_in_pb(model: &str, pb: &[u8]) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(model);
    let dump: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("index_dump.json")).unwrap())
            .unwrap();
    let data = std::fs::read(dir.join("best_validation.data-00000-of-00001")).unwrap();
    let mut entries: Vec<&Value> = dump["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["size"].as_u64().unwrap_or(0) >= 64)
        .collect();
    entries.sort_by_key(|e| std::cmp::Reverse(e["size"].as_u64().unwrap()));
    for e in entries {
        let (o, n) = (
            e["offset"].as_u64().unwrap() as usize,
            e["size"].as_u64().unwrap() as usize,
        );
        let needle = &data[o..o + n];
        if let Some(at) = pb.windows(n).position(|w| w == needle) {
            return at + n / 2;
        }
    }
    panic!("no checkpoint tensor found in the frozen graph");
}

#[test]
fn push_student_outputs_are_restored_and_corrupt_entries_rebuilt_with_a_warning() {
    let f = Fixture::new("fx-restore", "push_student", RECIPE);
    assert_eq!(f.run().0, 0);
    let pb = std::fs::read(f.out("frozen.pb")).unwrap();
    std::fs::remove_file(f.out("frozen.pb")).unwrap();
    std::fs::write(f.out("copies/frozen.pb"), b"scribbled").unwrap();
    let (code, v, _) = f.run();
    assert_eq!(code, 0);
    assert!(all(&v, "cached"), "{v}");
    assert_eq!(std::fs::read(f.out("frozen.pb")).unwrap(), pb);
    assert_eq!(std::fs::read(f.out("copies/frozen.pb")).unwrap(), pb);

    // Corrupt every action entry: each stage warns and rebuilds, outputs stay right.
    for e in support::project::cache_files(&f.dir.join(".qpipe"), "actions") {
        flip_bit(&e, 150);
    }
    let (code, v, err) = f.run();
    assert_eq!(code, 0, "{err}");
    assert!(all(&v, "ran"), "{v}");
    assert_eq!(err.matches("warning: stage '").count(), 3, "{err}");
    assert!(err.contains("is corrupt (checksum mismatch"), "{err}");
    assert_eq!(std::fs::read(f.out("frozen.pb")).unwrap(), pb);
    let (_, v, err) = f.run();
    assert!(all(&v, "cached") && err.is_empty(), "{v} {err}");
}

#[test]
fn push_student_concurrent_runs_and_killed_runs() {
    let clean = Fixture::new("fx-clean", "push_student", RECIPE);
    assert_eq!(clean.run().0, 0);
    let want = std::fs::read(clean.out("frozen.pb")).unwrap();

    let f = Fixture::new("fx-concurrent", "push_student", RECIPE);
    let children: Vec<_> = (0..3)
        .map(|_| {
            f.qpipe(&["run", "--json", "recipe.toml"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out: Output = c.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(std::fs::read(f.out("frozen.pb")).unwrap(), want);
    assert_eq!(std::fs::read(f.out("copies/frozen.pb")).unwrap(), want);

    for (point, stage) in [
        ("run", "freeze"),
        ("store", "freeze"),
        ("output", "pb"),
        ("publish", "pb_copy"),
    ] {
        let k = Fixture::new(&format!("fx-kill-{point}"), "push_student", RECIPE);
        kill_at(k.qpipe(&["run", "recipe.toml"]), point, stage);
        let (code, v, err) = k.run();
        assert_eq!(code, 0, "{err}");
        assert_eq!(
            status_of(&v, stage),
            "ran",
            "after a kill at {point}:{stage}: {v}"
        );
        assert_eq!(std::fs::read(k.out("frozen.pb")).unwrap(), want);
        assert_eq!(std::fs::read(k.out("copies/frozen.pb")).unwrap(), want);
        let verify = k
            .qpipe(&["cache", "verify", "recipe.toml"])
            .output()
            .unwrap();
        assert_eq!(
            verify.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&verify.stdout)
        );
    }
}

/// Every failed stage's error starts with `stage 'ID': ` exactly once, whether the stage
/// put it there itself or not; the terminal's FAILED line names the stage once too.
#[test]
fn stage_errors_carry_their_stage_id_exactly_once() {
    let recipe = r#"[pipeline]
name = "conv_bn"

[model]
checkpoint = "model/best_validation"
inputs = ["input_x"]
outputs = ["output/probs"]

[datasets.calib]
input_x = "model/eval_y.npy"

[stages.freeze]
kind = "freeze"

[stages.strip]
kind = "strip_training"
input = "freeze"
bind = { nope = 1.0 }

[stages.int8]
kind = "quantize_int8"
input = "freeze"
matrix = { strategy = ["DEFAULT", "OPTIMIZE_FOR_LATENCY"] }
calibration = "calib"
"#;
    let f = Fixture::new("stage-error-prefix", "conv_bn", recipe);
    let (code, v, err) = f.run();
    assert_eq!(code, 1, "{err}");
    for id in ["strip", "int8@DEFAULT", "int8@OPTIMIZE_FOR_LATENCY"] {
        let s = v["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .unwrap();
        assert_eq!(s["status"], "failed", "{s}");
        let e = s["error"].as_str().unwrap();
        let prefix = format!("stage '{id}': ");
        assert!(e.starts_with(&prefix), "{e}");
        assert_eq!(e.matches(&format!("stage '{id}'")).count(), 1, "{e}");
        let line = err
            .lines()
            .find(|l| l.starts_with(&format!("FAILED    {id}: ")))
            .unwrap_or_else(|| panic!("no FAILED line for {id}: {err}"));
        assert!(!line.contains(&prefix), "{line}");
    }
    // The summary table's row names the stage once as well.
    let out = f.qpipe(&["run", "recipe.toml"]).output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    let row = table
        .lines()
        .find(|l| l.starts_with("int8@DEFAULT "))
        .unwrap();
    assert_eq!(row.matches("int8@DEFAULT").count(), 1, "{row}");
}

const VALIDATES: &str = r#"[pipeline]
name = "push_student"

[model]
checkpoint = "model/best_validation"
inputs = ["input_x"]
outputs = ["score_student/output_student"]

[datasets.eval]
input_x = "model/eval_x.npy"
labels = "model/eval_y.npy"

[stages.freeze]
kind = "freeze"

[stages.strip]
kind = "strip_training"
input = "freeze"

[stages.fp16]
kind = "fp16_cast"
input = "strip"

[stages.hybrid]
kind = "quantize_int8"
input = "strip"

[stages.check_fp16]
kind = "validate"
reference = "strip"
candidate = "fp16"
dataset = "eval"

[stages.check_hybrid]
kind = "validate"
reference = "strip"
candidate = "hybrid"
dataset = "eval"
"#;

fn stage<'a>(v: &'a Value, id: &str) -> &'a Value {
    v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("no stage {id} in {v}"))
}

#[test]
fn validates_of_one_reference_share_its_run_within_a_run_and_across_runs() {
    let f = Fixture::new("fx-refmemo", "push_student", VALIDATES);
    let (code, v, err) = f.run();
    assert_eq!(code, 0, "{err}");
    let cached: Vec<bool> = ["check_fp16", "check_hybrid"]
        .iter()
        .map(|id| {
            stage(&v, id)["metrics"]["reference_cached"]
                .as_bool()
                .unwrap()
        })
        .collect();
    // Both may ask at once: one computes the reference's results, the other reads them.
    assert_eq!(cached.iter().filter(|&&c| c).count(), 1, "{v}");
    let drop = stage(&v, "check_hybrid")["metrics"]["accuracy_drop"].clone();
    // A changed gate reruns the stage, which reads the reference's results from the cache.
    f.edit_recipe(
        "candidate = \"hybrid\"\ndataset = \"eval\"",
        "candidate = \"hybrid\"\ndataset = \"eval\"\nmax_abs_error = 100.0",
    );
    let (code, v, err) = f.run();
    assert_eq!(code, 0, "{err}");
    let s = stage(&v, "check_hybrid");
    assert_eq!(s["status"], "ran", "{v}");
    assert_eq!(s["metrics"]["reference_cached"], true, "{v}");
    assert_eq!(s["metrics"]["accuracy_drop"], drop);
    assert_eq!(stage(&v, "check_fp16")["status"], "cached");
}
