//! Issue 17: qpipe reads TF2 SavedModels (`fixtures/sm_*`, made by TF 2.21 with TF's
//! outputs and what `TFLiteConverter.from_saved_model` made of each, `converter.json`).
//!
//! For every fixture one recipe freezes the SavedModel, strips it, and builds fp16 and
//! every int8 strategy (DEFAULT with and without calibration, OPTIMIZE_FOR_SIZE,
//! OPTIMIZE_FOR_LATENCY), exports each and validates int8 DEFAULT against the float
//! model. Then one LiteRT process (`BUILTIN_REF`) runs every fixture's float and int8
//! DEFAULT `.tflite` on the eval rows, and the test checks:
//! - every stage ran (except the gaps listed in `KNOWN_GAPS`, which must fail exactly so);
//! - the float `.tflite` matches TF's outputs: max|Δ| ≤ 1e-5·max(1, max|TF output|);
//! - int8 DEFAULT is no worse than the converter's int8 file + 0.2 points of accuracy,
//!   at no more than 1.02× its bytes;
//! - validate's reported accuracies equal LiteRT's on the exported files.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const FIXTURES: &[&str] = &[
    "sm_mlp",
    "sm_cnn",
    "sm_text",
    "sm_two_inputs",
    "sm_module",
    "sm_tf_keras",
];

/// Stages that fail today for an op other branches are adding, with the text their error
/// must contain. When one starts to pass, the test fails until it is removed here.
const KNOWN_GAPS: &[(&str, &str, &str)] = &[];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn qpipe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qpipe"))
        .args(args)
        .env_remove("QPIPE_CACHE_DIR")
        .output()
        .expect("qpipe runs")
}

fn read_json(p: &Path) -> Value {
    let text =
        std::fs::read_to_string(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", p.display()))
}

fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

fn inputs(model: &Value) -> Vec<String> {
    model["inputs"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

fn write_recipe(name: &str, model: &Value, dir: &Path) -> PathBuf {
    let fx = root().join("fixtures").join(name);
    let mut r = format!(
        "[pipeline]\nname = {}\n\n[model]\nsaved_model = {}\n\n",
        toml_str(name),
        toml_str(fx.join("saved_model").to_str().unwrap()),
    );
    for (set, key) in [("calib", "calib"), ("eval", "eval")] {
        r += &format!("[datasets.{set}]\n");
        for i in inputs(model) {
            let f = model["inputs"][&i][key].as_str().unwrap();
            r += &format!(
                "{} = {}\n",
                toml_str(&i),
                toml_str(fx.join(f).to_str().unwrap())
            );
        }
    }
    r += &format!(
        "labels = {}\n\n",
        toml_str(fx.join("eval_y.npy").to_str().unwrap())
    );
    r += "[stages.freeze]\nkind = \"freeze\"\n\n[stages.strip]\nkind = \"strip_training\"\ninput = \"freeze\"\n\n";
    r += "[stages.fp16]\nkind = \"fp16_cast\"\ninput = \"strip\"\n\n";
    for (stage, strategy, calib) in [
        ("q_int8_default", "DEFAULT", true),
        ("q_dynamic_range", "DEFAULT", false),
        ("q_optimize_for_size", "OPTIMIZE_FOR_SIZE", false),
        ("q_full_integer", "OPTIMIZE_FOR_LATENCY", true),
    ] {
        r += &format!(
            "[stages.{stage}]\nkind = \"quantize_int8\"\ninput = \"strip\"\nstrategy = \"{strategy}\"\n{}\n",
            if calib { "calibration = \"calib\"\n" } else { "" }
        );
    }
    for (variant, stage) in [
        ("float32", "strip"),
        ("fp16", "fp16"),
        ("int8_default", "q_int8_default"),
        ("dynamic_range", "q_dynamic_range"),
        ("optimize_for_size", "q_optimize_for_size"),
        ("full_integer", "q_full_integer"),
    ] {
        r += &format!(
            "[stages.x_{variant}]\nkind = \"export_tflite\"\ninput = \"{stage}\"\npath = \"{variant}.tflite\"\n\n"
        );
    }
    r += "[stages.check]\nkind = \"validate\"\nreference = \"strip\"\ncandidate = \"q_int8_default\"\ndataset = \"eval\"\n";
    let p = dir.join("recipe.toml");
    std::fs::write(&p, r).unwrap();
    p
}

struct Built {
    name: String,
    model: Value,
    converter: Value,
    out: PathBuf,
    stages: BTreeMap<String, Value>,
}

fn build(name: &str) -> Built {
    let fx = root().join("fixtures").join(name);
    let model = read_json(&fx.join("model.json"));
    let converter = read_json(&fx.join("converter.json"));
    let dir = root().join("target/tmp/saved_model").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let recipe = write_recipe(name, &model, &dir);
    let run = qpipe(&["run", recipe.to_str().unwrap(), "--json", "-q"]);
    let doc: Value = serde_json::from_slice(&run.stdout).unwrap_or_else(|e| {
        panic!(
            "{name}: qpipe run --json printed no JSON ({e}); stderr:\n{}",
            String::from_utf8_lossy(&run.stderr)
        )
    });
    let stages = doc["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .map(|s| (s["id"].as_str().unwrap().to_string(), s.clone()))
        .collect();
    Built {
        name: name.to_string(),
        model,
        converter,
        out: dir.join("out"),
        stages,
    }
}

fn npy_f32(p: &Path) -> (Vec<usize>, Vec<f32>) {
    let t = qpipe::npy::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (t.shape().to_vec(), t.values::<f32>().unwrap())
}

fn argmax_rows(shape: &[usize], v: &[f32]) -> Vec<usize> {
    let c = shape[1];
    v.chunks(c)
        .map(|r| {
            r.iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (i, &x)| if x > b.1 { (i, x) } else { b },
                )
                .0
        })
        .collect()
}

fn accuracy(shape: &[usize], v: &[f32], labels: &[i64]) -> f64 {
    let pred = argmax_rows(shape, v);
    assert_eq!(pred.len(), labels.len());
    pred.iter()
        .zip(labels)
        .filter(|(p, &l)| **p as i64 == l)
        .count() as f64
        / labels.len() as f64
}

#[test]
fn saved_model_fixtures_meet_the_converter() {
    let built: Vec<Built> = FIXTURES.iter().map(|n| build(n)).collect();
    let mut problems = Vec::new();

    // Every stage ran, or fails exactly as a known gap says.
    for b in &built {
        for (id, s) in &b.stages {
            let ok = s["status"] == "ran" || s["status"] == "cached";
            let err = s["error"].as_str().unwrap_or("");
            let gap = KNOWN_GAPS
                .iter()
                .find(|(f, st, _)| *f == b.name && st == id);
            match (ok, gap) {
                (true, None) => {}
                (true, Some(_)) => problems.push(format!(
                    "{}: stage {id} now runs; remove it from KNOWN_GAPS",
                    b.name
                )),
                (false, Some((_, _, text))) if err.contains(text) || s["status"] == "skipped" => {}
                (false, _) => {
                    problems.push(format!("{}: stage {id} {}: {err}", b.name, s["status"]))
                }
            }
        }
    }

    // One LiteRT process for every float and int8 DEFAULT file.
    let work = root().join("target/tmp/saved_model/litert");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let mut jobs = Vec::new();
    for b in &built {
        let fx = root().join("fixtures").join(&b.name);
        for variant in ["float32", "int8_default"] {
            let model = b.out.join(format!("{variant}.tflite"));
            if !model.exists() {
                continue;
            }
            let mut args = vec![model.to_str().unwrap().to_string()];
            for i in inputs(&b.model) {
                let f = b.model["inputs"][&i]["eval"].as_str().unwrap();
                args.push("--input".into());
                args.push(format!("{i}={}", fx.join(f).display()));
            }
            args.push("--out-dir".into());
            args.push(work.join(&b.name).join(variant).to_str().unwrap().into());
            args.push("--resolver".into());
            args.push("ref".into());
            jobs.push(serde_json::json!({ "args": args }));
        }
    }
    let jobs_file = work.join("jobs.json");
    std::fs::write(&jobs_file, serde_json::to_vec(&jobs).unwrap()).unwrap();
    let py = support::litert_oracle::litert_python();
    let o = Command::new(py)
        .arg(root().join("tests/litert/run_batch.py"))
        .arg(&jobs_file)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "run_batch.py failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    for b in &built {
        let fx = root().join("fixtures").join(&b.name);
        let labels = qpipe::npy::read(&fx.join("eval_y.npy"))
            .unwrap()
            .values::<i64>()
            .unwrap();
        let first = b.model["outputs"][0]["name"].as_str().unwrap();
        let tf_file = b.model["outputs"][0]["tf_eval_out"].as_str().unwrap();
        let (tf_shape, tf) = npy_f32(&fx.join(tf_file));
        let litert = |variant: &str| -> Option<(Vec<usize>, Vec<f32>)> {
            let d = work.join(&b.name).join(variant);
            if let Ok(e) = std::fs::read_to_string(d.join("error.txt")) {
                panic!("{}: LiteRT could not run {variant}.tflite: {e}", b.name);
            }
            let m = read_json(&d.join("outputs.json"));
            // Outputs are in the signature's key order, as in model.json.
            let file = m["outputs"][0]["file"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: no outputs in {m}", b.name))
                .to_string();
            Some(npy_f32(Path::new(&file)))
        };
        let has = |v: &str| b.out.join(format!("{v}.tflite")).exists();

        if has("float32") {
            let (shape, y) = litert("float32").unwrap();
            assert_eq!(shape, tf_shape, "{}: float output shape", b.name);
            let peak = tf.iter().fold(0f32, |m, v| m.max(v.abs()));
            let tol = 1e-5 * peak.max(1.0);
            let err = y
                .iter()
                .zip(&tf)
                .fold(0f32, |m, (a, t)| m.max((a - t).abs()));
            eprintln!("{}: float max|Δ| vs TF {err:.3e} (bound {tol:.1e})", b.name);
            if err > tol {
                problems.push(format!(
                    "{}: float .tflite is {err:.3e} from TF's outputs (bound {tol:.1e})",
                    b.name
                ));
            }
            let acc = accuracy(&shape, &y, &labels);
            let reported = b.stages["check"]["metrics"]["reference_accuracy"].as_f64();
            if b.stages["check"]["status"] == "ran" && reported != Some(acc) {
                problems.push(format!(
                    "{}: validate's reference accuracy {reported:?} != LiteRT's {acc}",
                    b.name
                ));
            }
        }
        if has("int8_default") {
            let (shape, y) = litert("int8_default").unwrap();
            let acc = accuracy(&shape, &y, &labels);
            let conv = &b.converter["variants"]["int8_default"];
            let conv_acc = conv["outputs"][first]["accuracy"].as_f64().unwrap();
            let conv_bytes = conv["bytes"].as_u64().unwrap();
            let bytes = std::fs::metadata(b.out.join("int8_default.tflite"))
                .unwrap()
                .len();
            eprintln!(
                "{}: int8 DEFAULT accuracy {acc:.4} (converter {conv_acc:.4}), {bytes} bytes \
                 (converter {conv_bytes}, ×{:.3})",
                b.name,
                bytes as f64 / conv_bytes as f64
            );
            if acc < conv_acc - 0.002 - 1e-12 {
                problems.push(format!(
                    "{}: int8 DEFAULT accuracy {acc} is worse than the converter's {conv_acc} - 0.2 points",
                    b.name
                ));
            }
            if bytes as f64 > 1.02 * conv_bytes as f64 {
                problems.push(format!(
                    "{}: int8 DEFAULT is {bytes} bytes, over 1.02× the converter's {conv_bytes}",
                    b.name
                ));
            }
            let reported = b.stages["check"]["metrics"]["candidate_accuracy"].as_f64();
            if reported != Some(acc) {
                problems.push(format!(
                    "{}: validate's candidate accuracy {reported:?} != LiteRT's {acc}",
                    b.name
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A copy of a fixture's SavedModel directory under `target/tmp/saved_model/bad/<case>`.
fn copy_saved_model(fixture: &str, case: &str) -> PathBuf {
    let src = root().join("fixtures").join(fixture).join("saved_model");
    let dst = root().join("target/tmp/saved_model/bad").join(case);
    let _ = std::fs::remove_dir_all(&dst);
    for e in walk(&src) {
        let rel = e.strip_prefix(&src).unwrap();
        let to = dst.join(rel);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&e, &to).unwrap();
    }
    dst
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Writes a recipe that freezes `sm` with `extra` lines in `[model]`; returns its path.
fn freeze_recipe(case: &str, model_lines: &str) -> PathBuf {
    let dir = root().join("target/tmp/saved_model/recipes").join(case);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("recipe.toml");
    std::fs::write(
        &p,
        format!("[model]\n{model_lines}\n\n[stages.freeze]\nkind = \"freeze\"\n"),
    )
    .unwrap();
    p
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn inspect_lists_signatures_functions_and_variables() {
    let dir = root().join("fixtures/sm_two_inputs/saved_model");
    let o = qpipe(&["inspect", dir.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let mg = &v["meta_graphs"][0];
    assert_eq!(mg["tags"], serde_json::json!(["serve"]));
    let sig = mg["signatures"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "serving_default")
        .expect("serving_default listed");
    let ins: Vec<(&str, &str, Value)> = sig["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["key"].as_str().unwrap(),
                t["dtype"].as_str().unwrap(),
                t["shape"].clone(),
            )
        })
        .collect();
    assert_eq!(
        ins,
        [
            ("input_a", "DT_FLOAT", serde_json::json!([null, 10])),
            ("input_b", "DT_FLOAT", serde_json::json!([null, 6]))
        ]
    );
    assert_eq!(sig["outputs"][0]["key"], "output_0");
    assert_eq!(sig["outputs"][0]["shape"], serde_json::json!([null, 3]));
    assert!(mg["functions"].as_array().unwrap().len() >= 2);
    // Dense(10→12): kernel 10×12 float32 = 480 bytes, under an object-based key.
    let vars = mg["variables"].as_array().unwrap();
    assert!(
        vars.iter()
            .any(|x| x["shape"] == serde_json::json!([10, 12])
                && x["bytes"] == 480
                && x["key"]
                    .as_str()
                    .unwrap()
                    .ends_with("/.ATTRIBUTES/VARIABLE_VALUE")),
        "{mg}"
    );
    let text = qpipe(&["inspect", dir.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("signature serving_default:") && text.contains("input_b"),
        "{text}"
    );
}

#[test]
fn bad_saved_models_give_clear_errors() {
    // A corrupt saved_model.pb.
    let dir = copy_saved_model("sm_module", "corrupt");
    std::fs::write(dir.join("saved_model.pb"), b"\x0a\xff\xff\xff\x0fgarbage").unwrap();
    let o = qpipe(&["inspect", dir.to_str().unwrap()]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("saved_model.pb") && e.contains("not a SavedModel"),
        "{e}"
    );

    // No variables/ directory.
    let dir = copy_saved_model("sm_module", "no_variables");
    std::fs::remove_dir_all(dir.join("variables")).unwrap();
    let recipe = freeze_recipe(
        "no_variables",
        &format!("saved_model = {}", toml_str(dir.to_str().unwrap())),
    );
    let o = qpipe(&["run", recipe.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("variables") && e.contains("missing"), "{e}");

    // A variable the object graph does not map: the concrete functions lose their
    // bound inputs.
    let dir = copy_saved_model("sm_module", "unmapped");
    let pb = dir.join("saved_model.pb");
    let mut sm = {
        use prost::Message;
        qpipe::formats::tf::proto::SavedModel::decode(std::fs::read(&pb).unwrap().as_slice())
            .unwrap()
    };
    for mg in &mut sm.meta_graphs {
        if let Some(og) = mg.object_graph_def.as_mut() {
            og.concrete_functions.clear();
        }
    }
    std::fs::write(&pb, prost::Message::encode_to_vec(&sm)).unwrap();
    let recipe = freeze_recipe(
        "unmapped",
        &format!("saved_model = {}", toml_str(dir.to_str().unwrap())),
    );
    let o = qpipe(&["run", recipe.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("saved_model.pb") && e.contains("is not mapped to a checkpoint value"),
        "{e}"
    );

    // An unknown signature: a recipe error at the key, naming the file.
    let sm_dir = root().join("fixtures/sm_module/saved_model");
    let recipe = freeze_recipe(
        "unknown_signature",
        &format!(
            "saved_model = {}\nsignature = \"nope\"",
            toml_str(sm_dir.to_str().unwrap())
        ),
    );
    let o = qpipe(&["run", recipe.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("recipe.toml:3:")
            && e.contains("no signature 'nope'")
            && e.contains("serving_default")
            && e.contains("saved_model.pb"),
        "{e}"
    );
}

#[test]
fn recipe_names_exactly_one_model_source() {
    let sm_dir = root().join("fixtures/sm_module/saved_model");
    let sm = toml_str(sm_dir.to_str().unwrap());
    let cases: &[(&str, String, &str)] = &[
        (
            "two_sources",
            format!("saved_model = {sm}\ngraph = \"x.pb\""),
            "give exactly one of checkpoint, graph and saved_model",
        ),
        (
            "keras_file",
            "saved_model = \"model.keras\"".into(),
            "model.export",
        ),
        ("h5_file", "graph = \"model.h5\"".into(), "model.export"),
        (
            "signature_without_saved_model",
            "graph = \"x.pb\"\nsignature = \"serving_default\"".into(),
            "model.signature: only a saved_model has this key",
        ),
        (
            "unknown_input",
            format!("saved_model = {sm}\ninputs = [\"y\"]"),
            "'y' is not one of signature 'serving_default''s inputs [\"x\"]",
        ),
    ];
    for (case, lines, want) in cases {
        let recipe = freeze_recipe(case, lines);
        std::fs::write(recipe.with_file_name("x.pb"), b"").unwrap();
        let o = qpipe(&["run", recipe.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(2), "{case}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(
            e.contains(want) && e.contains("recipe.toml:"),
            "{case}: {e}"
        );
    }
    // A subset of outputs by key works, and the inputs are the signature's keys.
    let recipe = freeze_recipe(
        "subset",
        &format!("saved_model = {sm}\noutputs = [\"probs\"]\ntags = [\"serve\"]"),
    );
    let o = qpipe(&["run", recipe.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn the_cache_key_covers_saved_model_pb_and_variables_only() {
    let dir = copy_saved_model("sm_module", "cache_key");
    let recipe = freeze_recipe(
        "cache_key",
        &format!("saved_model = {}", toml_str(dir.to_str().unwrap())),
    );
    let freeze_status = || {
        let o = qpipe(&["run", recipe.to_str().unwrap(), "--json"]);
        let doc: Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("no JSON ({e}): {}", stderr(&o)));
        doc["stages"][0]["status"].as_str().unwrap().to_string()
    };
    assert_eq!(freeze_status(), "ran");
    assert_eq!(freeze_status(), "cached");
    // Files the freeze does not read do not enter the key.
    std::fs::create_dir_all(dir.join("assets")).unwrap();
    std::fs::write(dir.join("assets/vocab.txt"), b"a\nb\n").unwrap();
    std::fs::write(dir.join("fingerprint.pb"), b"\x08\x01").unwrap();
    assert_eq!(freeze_status(), "cached");
    // Every file under variables/ does: a new one, and changed bytes.
    std::fs::write(dir.join("variables/extra.txt"), b"x").unwrap();
    assert_eq!(freeze_status(), "ran");
    let data = dir.join("variables/variables.data-00000-of-00001");
    let mut bytes = std::fs::read(&data).unwrap();
    bytes.push(0);
    std::fs::write(&data, bytes).unwrap();
    assert_ne!(freeze_status(), "cached");
}
