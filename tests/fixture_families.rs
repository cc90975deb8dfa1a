//! Issue 14's family fixtures (`fixtures/fam_*`, and issue 16's `q16_*`): what qpipe makes of each TF1 model today,
//! against what TF's converter made (`fixtures/<name>/converter.json`), as a ratchet.
//!
//! For every fixture the test runs `qpipe inspect` on the checkpoint, then one recipe that
//! freezes and strips it and builds every variant the converter was asked for (float32,
//! fp16, int8 `DEFAULT` with calibration, dynamic range, `OPTIMIZE_FOR_SIZE`, full integer
//! as `OPTIMIZE_FOR_LATENCY`), and reads the operator histogram of each exported `.tflite`
//! with `qpipe inspect`. `tests/golden/families_status.json` records per fixture and
//! variant what qpipe achieved when it was last updated; the test fails when anything got
//! worse (an export that now fails, more operators, a larger byte ratio to the converter's
//! file) and prints an "improved" note when something got better.
//! `QPIPE_UPDATE_FAMILIES=1 cargo test --test fixture_families` rewrites the file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};

const FIXTURES: &[&str] = &[
    "fam_mlp_bn",
    "fam_conv_gap",
    "fam_mobilenet_v2",
    "fam_mobilenet_v3",
    "fam_attention",
    "fam_lstm",
    "fam_decoders",
    "fam_atrous",
    "fam_multi_io",
    "fam_shapes",
    "fam_arith",
    "fam_dynamic_rnn",
    // issue 16's fixtures, where min/max int8 calibration is fragile
    "q16_outlier_inputs",
    "q16_outlier_channel",
    "q16_sensitive_act",
];

/// Converter variant -> (qpipe stage that builds the model, export stage).
const VARIANTS: &[(&str, &str, &str)] = &[
    ("float32", "strip", "x_float32"),
    ("fp16", "fp16", "x_fp16"),
    ("int8_default", "q_int8_default", "x_int8_default"),
    ("dynamic_range", "q_dynamic_range", "x_dynamic_range"),
    (
        "optimize_for_size",
        "q_optimize_for_size",
        "x_optimize_for_size",
    ),
    ("full_integer", "q_full_integer", "x_full_integer"),
];

const GOLDEN: &str = "tests/golden/families_status.json";
/// Byte ratios are recorded to 4 decimals; a change below this is not a change.
const RATIO_SLACK: f64 = 0.0005;

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

/// One recipe building every variant of a fixture, in a scratch directory.
fn write_recipe(name: &str, model: &Value, dir: &Path) -> PathBuf {
    let fx = root().join("fixtures").join(name);
    let inputs: Vec<&str> = model["inputs"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let outputs: Vec<&str> = model["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    let list = |v: &[&str]| v.iter().map(|s| toml_str(s)).collect::<Vec<_>>().join(", ");
    let mut r = format!(
        "[pipeline]\nname = {}\n\n[model]\ncheckpoint = {}\ninputs = [{}]\noutputs = [{}]\n\n",
        toml_str(name),
        toml_str(fx.join("best_validation").to_str().unwrap()),
        list(&inputs),
        list(&outputs)
    );
    r += "[datasets.calib]\n";
    for i in &inputs {
        let f = model["inputs"][i]["calib"].as_str().unwrap();
        r += &format!(
            "{} = {}\n",
            toml_str(i),
            toml_str(fx.join(f).to_str().unwrap())
        );
    }
    r += "\n[stages.freeze]\nkind = \"freeze\"\n\n[stages.strip]\nkind = \"strip_training\"\ninput = \"freeze\"\n\n";
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
    for (variant, model_stage, export) in VARIANTS {
        r += &format!(
            "[stages.{export}]\nkind = \"export_tflite\"\ninput = \"{model_stage}\"\npath = \"{variant}.tflite\"\n\n"
        );
    }
    let p = dir.join("recipe.toml");
    std::fs::write(&p, r).unwrap();
    p
}

/// Operator histogram of a `.tflite`, from `qpipe inspect --json`.
fn tflite_ops(path: &Path) -> BTreeMap<String, u64> {
    let o = qpipe(&["inspect", path.to_str().unwrap(), "--json"]);
    assert!(
        o.status.success(),
        "qpipe inspect {} failed: {}",
        path.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    let v: Value = serde_json::from_slice(&o.stdout).expect("inspect --json is JSON");
    v["operators"]
        .as_object()
        .unwrap_or_else(|| panic!("no operators in inspect output of {}: {v}", path.display()))
        .iter()
        .map(|(op, n)| (op.clone(), n.as_u64().expect("operator count")))
        .collect()
}

fn first_line(s: &str) -> String {
    let l = s.lines().next().unwrap_or("").trim();
    l.chars().take(800).collect()
}

/// Runs qpipe on one fixture; returns the per-variant status document.
fn measure(name: &str) -> Value {
    let fx = root().join("fixtures").join(name);
    let model = read_json(&fx.join("model.json"));
    let conv = read_json(&fx.join("converter.json"));
    let dir = root().join("target/tmp/fixture_families").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();

    let ins = qpipe(&[
        "inspect",
        fx.join("best_validation").to_str().unwrap(),
        "--json",
    ]);
    assert!(
        ins.status.success(),
        "{name}: qpipe inspect of the checkpoint failed: {}",
        String::from_utf8_lossy(&ins.stderr)
    );

    let recipe = write_recipe(name, &model, &dir);
    let run = qpipe(&["run", recipe.to_str().unwrap(), "--json"]);
    let doc: Value = serde_json::from_slice(&run.stdout).unwrap_or_else(|e| {
        panic!(
            "{name}: qpipe run --json printed no JSON ({e}); stderr:\n{}",
            String::from_utf8_lossy(&run.stderr)
        )
    });
    let stages: BTreeMap<String, Value> = doc["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .map(|s| (s["id"].as_str().unwrap().to_string(), s.clone()))
        .collect();
    let status = |id: &str| -> (bool, String) {
        let s = stages
            .get(id)
            .unwrap_or_else(|| panic!("{name}: no stage '{id}' in {doc}"));
        let ok = s["status"] == "ran" || s["status"] == "cached";
        (ok, s["error"].as_str().unwrap_or("").to_string())
    };

    let (freeze_ok, freeze_err) = status("freeze");
    let (strip_ok, strip_err) = status("strip");
    let mut variants = serde_json::Map::new();
    for (variant, model_stage, export) in VARIANTS {
        let c = &conv["variants"][variant];
        let mut rec = serde_json::Map::new();
        let (ok, _) = status(export);
        if ok {
            let file = dir.join("out").join(format!("{variant}.tflite"));
            let bytes = std::fs::metadata(&file)
                .unwrap_or_else(|e| panic!("{name}: {} missing: {e}", file.display()))
                .len();
            let ops = tflite_ops(&file);
            rec.insert("qpipe".into(), json!("exports"));
            rec.insert("bytes".into(), json!(bytes));
            rec.insert("ops".into(), json!(ops.values().sum::<u64>()));
            if let Some(cb) = c["bytes"].as_u64() {
                let ratio = bytes as f64 / cb as f64;
                rec.insert("bytes_ratio".into(), json!((ratio * 1e4).round() / 1e4));
            }
            rec.insert("op_histogram".into(), json!(ops));
        } else {
            // the first failing stage of the chain carries the error
            let err = ["freeze", "strip", model_stage, export]
                .iter()
                .map(|id| status(id).1)
                .find(|e| !e.is_empty())
                .unwrap_or_else(|| "skipped".into());
            rec.insert("qpipe".into(), json!("fails"));
            rec.insert("error".into(), json!(first_line(&err)));
        }
        rec.insert(
            "converter_ok".into(),
            json!(c["ok"].as_bool().unwrap_or(false)),
        );
        if let Some(n) = c["op_count"].as_u64() {
            rec.insert("converter_ops".into(), json!(n));
        }
        variants.insert(variant.to_string(), Value::Object(rec));
    }
    json!({
        "freeze": if freeze_ok { json!("ok") } else { json!(first_line(&freeze_err)) },
        "strip": if strip_ok { json!("ok") } else { json!(first_line(&strip_err)) },
        "variants": variants,
    })
}

/// Differences between the recorded and the current status: (worse, better).
fn compare(name: &str, old: &Value, new: &Value) -> (Vec<String>, Vec<String>) {
    let (mut worse, mut better) = (Vec::new(), Vec::new());
    for (variant, _, _) in VARIANTS {
        let (o, n) = (&old["variants"][variant], &new["variants"][variant]);
        let at = format!("{name}/{variant}");
        if o.is_null() {
            better.push(format!("{at}: not recorded yet"));
            continue;
        }
        match (o["qpipe"].as_str(), n["qpipe"].as_str()) {
            (Some("exports"), Some("fails")) => {
                worse.push(format!("{at}: exported before, now fails: {}", n["error"]))
            }
            (Some("fails"), Some("exports")) => better.push(format!("{at}: now exports")),
            (Some("exports"), Some("exports")) => {
                let (oo, no) = (o["ops"].as_u64().unwrap(), n["ops"].as_u64().unwrap());
                if no > oo {
                    worse.push(format!("{at}: {no} operators, recorded {oo}"));
                } else if no < oo {
                    better.push(format!("{at}: {no} operators, recorded {oo}"));
                }
                if let (Some(or), Some(nr)) = (o["bytes_ratio"].as_f64(), n["bytes_ratio"].as_f64())
                {
                    if nr > or + RATIO_SLACK {
                        worse.push(format!("{at}: {nr}x the converter's bytes, recorded {or}x"));
                    } else if nr < or - RATIO_SLACK {
                        better.push(format!("{at}: {nr}x the converter's bytes, recorded {or}x"));
                    }
                }
            }
            _ => {}
        }
    }
    for step in ["freeze", "strip"] {
        if old[step] == "ok" && new[step] != "ok" {
            worse.push(format!("{name}: {step} worked before, now: {}", new[step]));
        } else if old[step] != "ok" && new[step] == "ok" {
            better.push(format!("{name}: {step} now works"));
        }
    }
    (worse, better)
}

#[test]
fn family_fixtures_ratchet_against_the_converter() {
    let golden_path = root().join(GOLDEN);
    let update = std::env::var_os("QPIPE_UPDATE_FAMILIES").is_some();
    let golden = if golden_path.exists() {
        read_json(&golden_path)
    } else {
        assert!(
            update,
            "{GOLDEN} is missing; create it with QPIPE_UPDATE_FAMILIES=1"
        );
        json!({})
    };

    let mut current = serde_json::Map::new();
    let (mut worse, mut better) = (Vec::new(), Vec::new());
    let (mut exports, mut total, mut at_converter) = (0, 0, 0);
    for name in FIXTURES {
        let now = measure(name);
        let conv = read_json(&root().join("fixtures").join(name).join("converter.json"));
        println!(
            "== {name}: freeze {}, strip {}",
            now["freeze"], now["strip"]
        );
        for (variant, _, _) in VARIANTS {
            let v = &now["variants"][variant];
            let c = &conv["variants"][variant];
            if c["ok"] == true {
                total += 1;
            }
            println!(
                "  {variant:18} converter: {} | qpipe: {}",
                if c["ok"] == true {
                    format!("{} B, {}", c["bytes"], c["op_histogram"])
                } else {
                    "fails".into()
                },
                if v["qpipe"] == "exports" {
                    format!(
                        "{} B ({}x), {}",
                        v["bytes"], v["bytes_ratio"], v["op_histogram"]
                    )
                } else {
                    format!("fails: {}", v["error"])
                }
            );
            if v["qpipe"] == "exports" && c["ok"] == true {
                exports += 1;
                if v["ops"].as_u64() <= c["op_count"].as_u64()
                    && v["bytes_ratio"].as_f64().is_some_and(|r| r <= 1.02)
                {
                    at_converter += 1;
                }
            }
        }
        // freezing works for every family, and the TF1 while loop is refused by name
        assert_eq!(
            now["freeze"], "ok",
            "{name}: freeze failed: {}",
            now["freeze"]
        );
        if *name == "fam_dynamic_rnn" {
            for (variant, _, _) in VARIANTS {
                let v = &now["variants"][variant];
                assert_eq!(v["qpipe"], "fails", "{name}/{variant} should fail");
                let e = v["error"].as_str().unwrap();
                assert!(
                    e.contains("is part of the TF1 while loop 'rnn/while/")
                        && e.contains("is not supported; unroll the loop"),
                    "{name}/{variant}: not the TF1 while-loop error: {e}"
                );
            }
        }
        if let Some(old) = golden.get(*name) {
            let (w, b) = compare(name, old, &now);
            worse.extend(w);
            better.extend(b);
        } else {
            better.push(format!("{name}: not recorded yet"));
        }
        current.insert(name.to_string(), now);
    }
    println!(
        "qpipe exports {exports} of the {total} variants the converter made; \
         {at_converter} at no more operators and at most 1.02x its bytes"
    );
    if update {
        let text = serde_json::to_string_pretty(&Value::Object(current)).unwrap() + "\n";
        std::fs::create_dir_all(golden_path.parent().unwrap()).unwrap();
        std::fs::write(&golden_path, text).unwrap();
        println!("rewrote {GOLDEN}");
        return;
    }
    for b in &better {
        println!("improved — update the file ({GOLDEN}, QPIPE_UPDATE_FAMILIES=1): {b}");
    }
    assert!(
        worse.is_empty(),
        "worse than {GOLDEN} records:\n{}",
        worse.join("\n")
    );
}

#[test]
fn the_ratchet_flags_regressions_and_improvements() {
    let rec = |qpipe: &str, ops: u64, ratio: f64| json!({"qpipe": qpipe, "ops": ops, "bytes_ratio": ratio, "error": "x"});
    let doc = |v: Value, strip: &str| {
        let mut variants = serde_json::Map::new();
        for (name, _, _) in VARIANTS {
            variants.insert(name.to_string(), v.clone());
        }
        json!({"freeze": "ok", "strip": strip, "variants": variants})
    };
    let old = doc(rec("exports", 8, 1.10), "ok");
    let (w, b) = compare("f", &old, &old);
    assert!(w.is_empty() && b.is_empty(), "{w:?} {b:?}");
    let (w, _) = compare("f", &old, &doc(rec("exports", 9, 1.10), "ok"));
    assert_eq!(w.len(), VARIANTS.len(), "{w:?}");
    let (w, _) = compare("f", &old, &doc(rec("exports", 8, 1.11), "ok"));
    assert_eq!(w.len(), VARIANTS.len(), "{w:?}");
    let (w, _) = compare("f", &old, &doc(rec("fails", 0, 0.0), "broken"));
    assert_eq!(w.len(), VARIANTS.len() + 1, "{w:?}");
    let (w, b) = compare("f", &old, &doc(rec("exports", 4, 1.0), "ok"));
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(b.len(), 2 * VARIANTS.len(), "{b:?}");
}
