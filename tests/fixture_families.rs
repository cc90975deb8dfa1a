//! Issue 14's family fixtures (`fixtures/fam_*`, and issue 16's `q16_*`): what qpipe makes of each
//! TF1 model, against what TF's converter made (`fixtures/<name>/converter.json`), as a ratchet.
//!
//! For every fixture the test runs `qpipe inspect` on the checkpoint, then one recipe that
//! freezes and strips it, builds and exports every variant the converter was asked for
//! (float32, fp16, int8 `DEFAULT` with calibration, dynamic range, `OPTIMIZE_FOR_SIZE`, full
//! integer as `OPTIMIZE_FOR_LATENCY`) and validates each against the float model on the eval
//! rows. All exported files then run in LiteRT in one Python process (the resolver the
//! converter's numbers were measured with, `BUILTIN_REF` except where `converter.json` says
//! otherwise). Per variant it checks issue 14's "Done when":
//!
//! - `exports`: qpipe makes the file; `litert_runs`: LiteRT loads and runs it;
//! - `matches_tf` (float32, fp16): every output within 1e-5·max(1, max|TF output|) of TF's
//!   committed outputs (fp16: 2e-3·max(1, max|TF output|), or 1.02× the converter's own
//!   fp16 file's error where that is larger);
//! - `validate_matches_litert`: for a classifier, validate's accuracy (runtime `litert-ref`,
//!   or `xnnpack` where the variant runs under the default resolver)
//!   is LiteRT's to the sample; otherwise validate's `max_abs_error` of the first output is
//!   within [`VALIDATE_ERROR_TOLERANCE`]·max(1, max|TF output|) of LiteRT's error against TF;
//! - `bytes`: at most 1.02× the converter's file;
//! - `ops` and `histogram`: no more operators than the converter's file, in total and per
//!   builtin (not for `optimize_for_size`, which TF 2.x makes as `DEFAULT` dynamic range:
//!   compared in bytes only). Each histogram is printed next to the converter's.
//!
//! A deliberate difference from the converter is recorded in `fixtures/<name>/expected.json`
//! with its reason (see [`Expected`]); the test honours it and says so.
//!
//! `tests/golden/families_status.json` records per fixture and variant each criterion and
//! the numbers behind it. The test fails when a criterion that passed now fails, an export
//! gains operators or grows against the converter's bytes, and prints an "improved — update
//! the file" note when something got better.
//! `QPIPE_UPDATE_FAMILIES=1 cargo test --test fixture_families` rewrites the file.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};
use support::litert_oracle::{run_litert_batch, BatchJob, Resolver};

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

/// The criteria recorded per variant, in the order they are printed.
const CRITERIA: &[&str] = &[
    "exports",
    "litert_runs",
    "matches_tf",
    "validate_matches_litert",
    "bytes",
    "ops",
    "histogram",
];

const GOLDEN: &str = "tests/golden/families_status.json";
/// Byte ratios are recorded to 4 decimals; a change below this is not a change.
const RATIO_SLACK: f64 = 0.0005;
/// Issue 14: float32 outputs within 1e-5·max(1, max|TF output|) of TF's, fp16 within 2e-3.
const FLOAT32_TOLERANCE: f64 = 1e-5;
const FP16_TOLERANCE: f64 = 2e-3;
/// How far validate's `max_abs_error` (candidate against qpipe's float model, on qpipe's
/// interpreter) may be from LiteRT's (the exported file against TF's outputs) on a model
/// that is not a classifier, times max(1, max|TF output|). The two differ by qpipe's float
/// model against TF plus what LiteRT's kernels compute differently from qpipe's. Measured
/// on the first output of all 35 variants qpipe exported when this was written (float,
/// fp16, int8, hybrid): at most 4.2e-7; the test prints the widest gap of every run (each
/// variant's `validate_error_gap` is in the status file).
const VALIDATE_ERROR_TOLERANCE: f64 = 1e-5;
const MAX_BYTES_RATIO: f64 = 1.02;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn qpipe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qpipe"))
        .args(args)
        .env_remove("QPIPE_CACHE_DIR")
        .env("CI", "1")
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

fn input_names(model: &Value) -> Vec<&str> {
    model["inputs"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect()
}

/// One recipe building, exporting and validating every variant of a fixture, in a
/// scratch directory.
fn write_recipe(name: &str, model: &Value, conv: &Value, dir: &Path) -> PathBuf {
    let fx = root().join("fixtures").join(name);
    let inputs = input_names(model);
    let outputs: Vec<&str> = model["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    let list = |v: &[&str]| v.iter().map(|s| toml_str(s)).collect::<Vec<_>>().join(", ");
    let path = |f: &str| toml_str(fx.join(f).to_str().unwrap());
    let mut r = format!(
        "[pipeline]\nname = {}\n\n[model]\ncheckpoint = {}\ninputs = [{}]\noutputs = [{}]\n\n",
        toml_str(name),
        path("best_validation"),
        list(&inputs),
        list(&outputs)
    );
    for set in ["calib", "eval"] {
        r += &format!("[datasets.{set}]\n");
        for i in &inputs {
            let f = model["inputs"][i][set].as_str().unwrap();
            r += &format!("{} = {}\n", toml_str(i), path(f));
        }
        if let (Some(labels), "eval") = (model["labels"].as_str(), set) {
            r += &format!("labels = {}\n", path(labels));
        }
        r += "\n";
    }
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
    for (variant, model_stage, export) in VARIANTS {
        // validate emulates the kernels LiteRT runs the file with: BUILTIN_REF's where the
        // reference resolver can run the converter's file, else the default resolver's.
        let runtime = match resolver_of(conv, variant) {
            Resolver::Reference => "litert-ref",
            Resolver::Default => "xnnpack",
        };
        r += &format!(
            "[stages.{export}]\nkind = \"export_tflite\"\ninput = \"{model_stage}\"\npath = \"{variant}.tflite\"\n\n"
        );
        r += &format!(
            "[stages.v_{variant}]\nkind = \"validate\"\nreference = \"strip\"\ncandidate = \"{model_stage}\"\n\
             dataset = \"eval\"\nruntime = \"{runtime}\"\nreport = \"{variant}.layers.json\"\n\n"
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

/// Three significant digits: enough to read, stable in the status file.
fn sig3(x: f64) -> Value {
    if x.is_finite() {
        json!(format!("{x:.2e}").parse::<f64>().unwrap())
    } else {
        json!(null)
    }
}

/// A deliberate difference from the converter, from `fixtures/<name>/expected.json`:
///
/// ```json
/// { "int8_default": { "reason": "why the converter's choice is wrong for the device",
///                     "max_ops": 9, "max_bytes_ratio": 1.05, "extra_ops": {"QUANTIZE": 1},
///                     "fails": "text qpipe's error contains" } }
/// ```
///
/// `max_ops` / `max_bytes_ratio` replace the converter's op count / 1.02; `extra_ops` is how
/// many more of a builtin than the converter's are accepted; `fails` says qpipe refuses
/// the variant on purpose, with an error containing that text. `reason` is required.
#[derive(Debug, Default, Clone)]
struct Expected {
    reason: String,
    max_ops: Option<u64>,
    max_bytes_ratio: Option<f64>,
    extra_ops: BTreeMap<String, u64>,
    fails: Option<String>,
}

fn expected_differences(name: &str) -> BTreeMap<String, Expected> {
    let p = root().join("fixtures").join(name).join("expected.json");
    if !p.exists() {
        return BTreeMap::new();
    }
    parse_expected(&read_json(&p)).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn parse_expected(v: &Value) -> Result<BTreeMap<String, Expected>, String> {
    let obj = v.as_object().ok_or("must be an object of variants")?;
    let mut out = BTreeMap::new();
    for (variant, e) in obj {
        if !VARIANTS.iter().any(|(v, _, _)| v == variant) {
            return Err(format!("unknown variant '{variant}'"));
        }
        let e = e
            .as_object()
            .ok_or(format!("{variant}: must be an object"))?;
        let mut x = Expected::default();
        for (k, val) in e {
            let bad = || format!("{variant}.{k}: bad value {val}");
            match k.as_str() {
                "reason" => x.reason = val.as_str().ok_or_else(bad)?.trim().to_string(),
                "max_ops" => x.max_ops = Some(val.as_u64().ok_or_else(bad)?),
                "max_bytes_ratio" => x.max_bytes_ratio = Some(val.as_f64().ok_or_else(bad)?),
                "fails" => x.fails = Some(val.as_str().ok_or_else(bad)?.to_string()),
                "extra_ops" => {
                    for (op, n) in val.as_object().ok_or_else(bad)? {
                        x.extra_ops.insert(op.clone(), n.as_u64().ok_or_else(bad)?);
                    }
                }
                _ => return Err(format!("{variant}: unknown key '{k}'")),
            }
        }
        if x.reason.is_empty() {
            return Err(format!("{variant}: a difference needs its \"reason\""));
        }
        out.insert(variant.clone(), x);
    }
    Ok(out)
}

/// What qpipe's run of one fixture gave, before LiteRT.
struct Run {
    name: &'static str,
    model: Value,
    conv: Value,
    expected: BTreeMap<String, Expected>,
    /// The status document (criteria are added by [`judge`]).
    doc: Value,
    /// Validate's metrics per variant.
    validate: BTreeMap<String, Value>,
    /// The ops `qpipe inspect` of the checkpoint says qpipe cannot run, quantize or export.
    inspect_lists: Vec<String>,
    /// Ops of nodes `quantize_int8` kept in float under `DEFAULT` for want of an int8 kernel.
    float_for_want_of_int8: Vec<String>,
    /// Inspect's reasons per listed op.
    inspect_reasons: BTreeMap<String, Vec<String>>,
}

/// Runs qpipe on one fixture.
fn measure(name: &'static str) -> Run {
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

    let listed: Value = serde_json::from_slice(&ins.stdout).expect("inspect --json is JSON");
    let inspect_reasons: BTreeMap<String, Vec<String>> = listed["graph"]["unsupported_ops"]["ops"]
        .as_array()
        .unwrap_or_else(|| panic!("{name}: no graph.unsupported_ops in {listed}"))
        .iter()
        .map(|p| {
            let reasons = p["reasons"].as_array().unwrap();
            (
                p["op"].as_str().unwrap().to_string(),
                reasons
                    .iter()
                    .map(|r| r.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect();
    let inspect_lists = inspect_reasons.keys().cloned().collect();

    let recipe = write_recipe(name, &model, &conv, &dir);
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

    // nodes quantize_int8 (DEFAULT with calibration) left in float for want of an int8 kernel
    let mut float_for_want_of_int8 = Vec::new();
    for n in stages["q_int8_default"]["metrics"]["float_nodes"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if n["reason"]
            .as_str()
            .unwrap_or("")
            .starts_with("no int8 kernel")
        {
            let op = n["op"].as_str().unwrap().to_string();
            if !float_for_want_of_int8.contains(&op) {
                float_for_want_of_int8.push(op);
            }
        }
    }
    let (freeze_ok, freeze_err) = status("freeze");
    let (strip_ok, strip_err) = status("strip");
    let mut variants = serde_json::Map::new();
    let mut validate = BTreeMap::new();
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
            rec.insert("file".into(), json!(file.display().to_string()));
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
        let v_id = format!("v_{variant}");
        match status(&v_id) {
            (true, _) => {
                validate.insert(variant.to_string(), stages[&v_id]["metrics"].clone());
            }
            (false, e) if ok => {
                rec.insert("validate_error".into(), json!(first_line(&e)));
            }
            _ => {}
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
    Run {
        name,
        expected: expected_differences(name),
        model,
        conv,
        doc: json!({
            "freeze": if freeze_ok { json!("ok") } else { json!(first_line(&freeze_err)) },
            "strip": if strip_ok { json!("ok") } else { json!(first_line(&strip_err)) },
            "variants": variants,
        }),
        validate,
        inspect_lists,
        float_for_want_of_int8,
        inspect_reasons,
    }
}

/// The ops an error blames on the op itself (no kernel, no int8 kernel, no TFLite
/// equivalent), as `node 'NAME' (OP): ...` or `'NAME' (OP): ...` say it.
fn ops_blamed(error: &str) -> Vec<String> {
    const MARKERS: [&str; 4] = [
        ": no int8 kernel",
        ": has no TFLite equivalent",
        ": the interpreter has no kernel",
        ": this op cannot be exported",
    ];
    let mut out = Vec::new();
    for m in MARKERS {
        for (at, _) in error.match_indices(m) {
            let before = &error[..at];
            if let Some(head) = before.strip_suffix(')') {
                if let Some(open) = head.rfind('(') {
                    let op = head[open + 1..].to_string();
                    if !out.contains(&op) {
                        out.push(op);
                    }
                }
            }
        }
    }
    out
}

/// The LiteRT resolver the converter's numbers of `variant` were measured with.
fn resolver_of(conv: &Value, variant: &str) -> Resolver {
    match conv["variants"][variant]["resolver"].as_str() {
        // "BUILTIN (BUILTIN_REF failed: …)": the generator fell back to the default resolver
        // because the reference one lacks a kernel (ELU, int8 TILE).
        Some(s) if s == "BUILTIN" || s.starts_with("BUILTIN (") => Resolver::Default,
        _ => Resolver::Reference,
    }
}

/// One LiteRT job per exported file of every run.
fn litert_jobs(runs: &[Run], dir: &Path) -> (Vec<(usize, &'static str)>, Vec<BatchJob>) {
    let (mut keys, mut jobs) = (Vec::new(), Vec::new());
    for (k, r) in runs.iter().enumerate() {
        let fx = root().join("fixtures").join(r.name);
        for (variant, _, _) in VARIANTS {
            let v = &r.doc["variants"][variant];
            let Some(file) = v["file"].as_str() else {
                continue;
            };
            let inputs = input_names(&r.model)
                .into_iter()
                .map(|i| {
                    let f = r.model["inputs"][i]["eval"].as_str().unwrap();
                    (i.to_string(), fx.join(f))
                })
                .collect();
            keys.push((k, *variant));
            jobs.push(BatchJob {
                model: PathBuf::from(file),
                inputs,
                resolver: resolver_of(&r.conv, variant),
                out_dir: dir.join(r.name).join(variant),
            });
        }
    }
    (keys, jobs)
}

fn tf_outputs(r: &Run) -> Vec<(String, Vec<f64>)> {
    let fx = root().join("fixtures").join(r.name);
    r.model["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            let t = qpipe::npy::read(&fx.join(o["tf_eval_out"].as_str().unwrap())).unwrap();
            (
                o["name"].as_str().unwrap().to_string(),
                t.to_f64_vec().unwrap(),
            )
        })
        .collect()
}

/// max |a - b| (NaN counts as infinite), and max |b|.
fn max_abs_error(a: &[f64], b: &[f64]) -> (f64, f64) {
    let mut err = 0f64;
    for (x, y) in a.iter().zip(b) {
        let d = (x - y).abs();
        err = if d.is_nan() {
            f64::INFINITY
        } else {
            err.max(d)
        };
    }
    let scale = b.iter().fold(0f64, |m, y| m.max(y.abs()));
    (err, scale)
}

fn argmax_rows(v: &[f64], classes: usize) -> Vec<usize> {
    v.chunks(classes)
        .map(|row| {
            let mut best = 0;
            for (i, x) in row.iter().enumerate() {
                if *x > row[best] {
                    best = i;
                }
            }
            best
        })
        .collect()
}

/// Sets every criterion of every variant of `r` from its LiteRT results, honouring the
/// fixture's expected differences. Returns the largest gap between validate's and
/// LiteRT's errors of the first output (for the tolerance's measurement).
fn judge(r: &mut Run, litert: &BTreeMap<&str, Result<Vec<qpipe::ir::Tensor>, String>>) -> f64 {
    let tf = tf_outputs(r);
    let labels: Option<Vec<i64>> = r.model["labels"].as_str().map(|f| {
        let t = qpipe::npy::read(&root().join("fixtures").join(r.name).join(f)).unwrap();
        t.to_f64_vec().unwrap().iter().map(|&x| x as i64).collect()
    });
    let classes = r.model["classes"].as_u64().map(|c| c as usize);
    let mut widest_gap = 0f64;
    for (variant, _, _) in VARIANTS {
        let conv = r.conv["variants"][variant].clone();
        let exp = r.expected.get(*variant).cloned();
        let rec = r.doc["variants"][variant].as_object_mut().unwrap();
        let mut crit = BTreeMap::new();
        let exports = rec["qpipe"] == "exports";
        let refused_on_purpose = !exports
            && exp
                .as_ref()
                .and_then(|e| e.fails.as_deref())
                .is_some_and(|t| rec["error"].as_str().is_some_and(|e| e.contains(t)));
        if let Some(e) = &exp {
            rec.insert("expected_difference".into(), json!(e.reason));
        }
        if refused_on_purpose {
            rec.insert("refused_on_purpose".into(), json!(true));
        }
        crit.insert("exports", exports || refused_on_purpose);
        if exports {
            let outs = &litert[variant];
            crit.insert("litert_runs", outs.is_ok());
            match outs {
                Err(e) => {
                    rec.insert("litert_error".into(), json!(first_line(e)));
                }
                Ok(outs) => {
                    let mut errs = serde_json::Map::new();
                    let mut within = outs.len() == tf.len();
                    let tol = match *variant {
                        "float32" => Some(FLOAT32_TOLERANCE),
                        "fp16" => Some(FP16_TOLERANCE),
                        _ => None,
                    };
                    let (mut first_err, mut first_scale) = (f64::NAN, 0f64);
                    for (k, (name, want)) in tf.iter().enumerate() {
                        let Some(got) = outs.get(k) else { break };
                        let got = got.to_f64_vec().unwrap();
                        if got.len() != want.len() {
                            within = false;
                            errs.insert(name.clone(), json!("shape differs"));
                            continue;
                        }
                        let (err, scale) = max_abs_error(&got, want);
                        if k == 0 {
                            (first_err, first_scale) = (err, scale);
                        }
                        if let Some(t) = tol {
                            // fp16: TF's own fp16 file can be further from TF's float output
                            // than 2e-3 (q16_sensitive_act's exp amplifies the weights'
                            // rounding); qpipe's may then be as far, and no further.
                            let converters = match *variant {
                                "fp16" => conv["outputs"][name]["max_abs_error"]
                                    .as_f64()
                                    .map_or(0.0, |e| e * 1.02),
                                _ => 0.0,
                            };
                            within &= err <= (t * scale.max(1.0)).max(converters);
                        }
                        errs.insert(name.clone(), sig3(err));
                    }
                    rec.insert("litert_max_abs_error".into(), Value::Object(errs));
                    if tol.is_some() {
                        crit.insert("matches_tf", within);
                    }
                    let v = r.validate.get(*variant);
                    // validate's error of the first output against LiteRT's, on every model
                    // (the tolerance's measurement), gating only where there are no classes
                    let gap = v.map(|v| {
                        let reported = v["outputs"][&tf[0].0]["max_abs_error"]
                            .as_f64()
                            .unwrap_or(f64::INFINITY);
                        (reported - first_err).abs()
                    });
                    if let Some(g) = gap {
                        widest_gap = widest_gap.max(g);
                        rec.insert("validate_error_gap".into(), sig3(g));
                    }
                    let agrees = match (v, &labels, classes) {
                        (Some(v), Some(labels), Some(c)) => {
                            let scores = outs[0].to_f64_vec().unwrap();
                            let correct = argmax_rows(&scores, c)
                                .iter()
                                .zip(labels)
                                .filter(|(p, l)| **p as i64 == **l)
                                .count();
                            let n = v["samples"].as_f64().unwrap_or(0.0);
                            let reported = (v["candidate_accuracy"].as_f64().unwrap_or(-1.0) * n)
                                .round() as usize;
                            rec.insert(
                                "accuracy".into(),
                                json!({"validate": reported, "litert": correct, "of": labels.len()}),
                            );
                            reported == correct && n as usize == labels.len()
                        }
                        (Some(_), _, _) => gap
                            .is_some_and(|g| g <= VALIDATE_ERROR_TOLERANCE * first_scale.max(1.0)),
                        (None, _, _) => false,
                    };
                    crit.insert("validate_matches_litert", agrees);
                }
            }
            if conv["ok"] == true {
                let max_ratio = exp
                    .as_ref()
                    .and_then(|e| e.max_bytes_ratio)
                    .unwrap_or(MAX_BYTES_RATIO);
                let ratio = rec["bytes_ratio"].as_f64().unwrap_or(f64::INFINITY);
                crit.insert("bytes", ratio <= max_ratio);
                if *variant != "optimize_for_size" {
                    let max_ops = exp
                        .as_ref()
                        .and_then(|e| e.max_ops)
                        .or(conv["op_count"].as_u64())
                        .unwrap_or(0);
                    crit.insert("ops", rec["ops"].as_u64().unwrap() <= max_ops);
                    let extra = exp
                        .as_ref()
                        .map(|e| e.extra_ops.clone())
                        .unwrap_or_default();
                    crit.insert(
                        "histogram",
                        histogram_excess(&rec["op_histogram"], &conv["op_histogram"], &extra)
                            .is_empty(),
                    );
                }
                // an allowance the file no longer needs is worth knowing about
                let strict = ratio <= MAX_BYTES_RATIO
                    && (*variant == "optimize_for_size"
                        || rec["ops"].as_u64() <= conv["op_count"].as_u64()
                            && histogram_excess(
                                &rec["op_histogram"],
                                &conv["op_histogram"],
                                &BTreeMap::new(),
                            )
                            .is_empty());
                if strict && exp.as_ref().is_some_and(|e| e.fails.is_none()) {
                    rec.insert("expected_difference_unneeded".into(), json!(true));
                }
            }
        }
        let crit: serde_json::Map<String, Value> = crit
            .into_iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        rec.insert("criteria".into(), Value::Object(crit));
        rec.remove("file");
    }
    widest_gap
}

/// Builtins of which qpipe's file has more than the converter's (plus what `extra` accepts):
/// `(builtin, qpipe's count, the converter's)`.
fn histogram_excess(
    qpipe: &Value,
    converter: &Value,
    extra: &BTreeMap<String, u64>,
) -> Vec<(String, u64, u64)> {
    let mut out = Vec::new();
    for (op, n) in qpipe.as_object().into_iter().flatten() {
        let n = n.as_u64().unwrap_or(0);
        let c = converter[op].as_u64().unwrap_or(0);
        if n > c + extra.get(op).copied().unwrap_or(0) {
            out.push((op.clone(), n, c));
        }
    }
    out
}

fn show_histogram(h: &Value) -> String {
    h.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}×{v}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
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
        for c in CRITERIA {
            match (o["criteria"][c].as_bool(), n["criteria"][c].as_bool()) {
                (Some(true), Some(true)) => {}
                (Some(true), _) => worse.push(format!(
                    "{at}: '{c}' passed before, now {}",
                    if n["criteria"][c].is_null() {
                        "not measured".to_string()
                    } else {
                        format!("fails ({})", why(c, n))
                    }
                )),
                (_, Some(true)) => better.push(format!("{at}: '{c}' now passes")),
                _ => {}
            }
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

/// The numbers behind a failed criterion, for the message.
fn why(criterion: &str, v: &Value) -> String {
    match criterion {
        "exports" => v["error"].to_string(),
        "litert_runs" => v["litert_error"].to_string(),
        "matches_tf" => format!("max abs error {}", v["litert_max_abs_error"]),
        "validate_matches_litert" => format!(
            "accuracy {} / error gap {} / validate {}",
            v["accuracy"], v["validate_error_gap"], v["validate_error"]
        ),
        "bytes" => format!("{}x the converter's bytes", v["bytes_ratio"]),
        "ops" => format!(
            "{} operators, the converter {}",
            v["ops"], v["converter_ops"]
        ),
        "histogram" => show_histogram(&v["op_histogram"]),
        _ => String::new(),
    }
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

    let mut runs: Vec<Run> = FIXTURES.iter().map(|n| measure(n)).collect();

    // every exported file of every fixture in one LiteRT process
    let dir = root().join("target/tmp/fixture_families/litert");
    let _ = std::fs::remove_dir_all(&dir);
    let (keys, jobs) = litert_jobs(&runs, &dir);
    let results = run_litert_batch(&jobs, &dir);
    let mut per_run: Vec<BTreeMap<&str, _>> = runs.iter().map(|_| BTreeMap::new()).collect();
    for ((k, variant), res) in keys.iter().zip(results) {
        per_run[*k].insert(*variant, res);
    }
    let mut widest_gap = 0f64;
    for (r, lite) in runs.iter_mut().zip(&per_run) {
        widest_gap = widest_gap.max(judge(r, lite));
    }

    let mut current = serde_json::Map::new();
    let (mut worse, mut better) = (Vec::new(), Vec::new());
    let mut tally: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let mut unpredicted = Vec::new();
    let mut all_criteria = 0;
    let mut demanded = 0;
    for r in &runs {
        let name = r.name;
        let now = &r.doc;
        println!(
            "== {name}: freeze {}, strip {}",
            now["freeze"], now["strip"]
        );
        for (variant, _, _) in VARIANTS {
            let v = &now["variants"][variant];
            let c = &r.conv["variants"][variant];
            println!(
                "  {variant:18} converter: {}",
                if c["ok"] == true {
                    format!(
                        "{} B, {} ops: {}",
                        c["bytes"],
                        c["op_count"],
                        show_histogram(&c["op_histogram"])
                    )
                } else {
                    "fails".into()
                }
            );
            if v["qpipe"] == "exports" {
                println!(
                    "  {:18} qpipe:     {} B ({}x), {} ops: {}",
                    "",
                    v["bytes"],
                    v["bytes_ratio"],
                    v["ops"],
                    show_histogram(&v["op_histogram"])
                );
                let excess =
                    histogram_excess(&v["op_histogram"], &c["op_histogram"], &BTreeMap::new());
                if c["ok"] == true && !excess.is_empty() {
                    let e: Vec<String> = excess
                        .iter()
                        .map(|(op, n, c)| format!("{op} {n} > {c}"))
                        .collect();
                    println!("  {:18} more than the converter: {}", "", e.join(", "));
                }
            } else {
                println!("  {:18} qpipe:     fails: {}", "", v["error"]);
            }
            let crit = &v["criteria"];
            let shown: Vec<String> = CRITERIA
                .iter()
                .filter_map(|c| {
                    crit[c]
                        .as_bool()
                        .map(|b| format!("{c} {}", if b { "ok" } else { "NO" }))
                })
                .collect();
            println!("  {:18} {}", "", shown.join(", "));
            if v["expected_difference_unneeded"] == true {
                println!(
                    "  {:18} matches the converter without its expected difference: \
                     remove it from fixtures/{name}/expected.json",
                    ""
                );
            }
            if let Some(reason) = v["expected_difference"].as_str() {
                println!(
                    "  {:18} expected difference (fixtures/{name}/expected.json): {reason}",
                    ""
                );
            }
            if c["ok"] == true {
                demanded += 1;
                let all = CRITERIA.iter().all(|k| crit[k].as_bool() != Some(false))
                    && crit["exports"] == true;
                if all {
                    all_criteria += 1;
                }
                for k in CRITERIA {
                    if let Some(b) = crit[k].as_bool() {
                        let t = tally.entry(k).or_default();
                        t.1 += 1;
                        if b {
                            t.0 += 1;
                        }
                    }
                }
            }
        }
        // freezing works for every family, and the TF1 while loop is refused by name
        assert_eq!(
            now["freeze"], "ok",
            "{name}: freeze failed: {}",
            now["freeze"]
        );
        // what inspect said before any recipe ran covers what the run blamed on an op
        // and inspect claims nothing the run disproves: its list is of the stripped graph,
        // so an op it says has no TFLite builtin cannot be in a float32 file qpipe wrote,
        // nor one without a float kernel in a model validate ran
        let exported = now["variants"]["float32"]["qpipe"] == "exports";
        let validated = r.validate.contains_key("float32");
        for (op, reasons) in &r.inspect_reasons {
            for why in reasons {
                let disproved = (exported && why.starts_with("no TFLite builtin"))
                    || (validated && why.starts_with("no float kernel"));
                if disproved {
                    unpredicted.push(format!(
                        "{name}: `qpipe inspect` says {op}: {why}, but the run did it \
                         (update the query function of that layer)"
                    ));
                }
            }
        }
        for op in &r.float_for_want_of_int8 {
            if !r.inspect_lists.contains(op) {
                unpredicted.push(format!(
                    "{name}/int8_default: quantize_int8 kept {op} in float for want of an int8 \
                     kernel, which `qpipe inspect` does not list ({:?})",
                    r.inspect_lists
                ));
            }
        }
        for (variant, _, _) in VARIANTS {
            let err = now["variants"][variant]["error"].as_str().unwrap_or("");
            for op in ops_blamed(err) {
                if !r.inspect_lists.contains(&op) {
                    unpredicted.push(format!(
                        "{name}/{variant}: the run blames {op}, which `qpipe inspect` does not list ({:?}): {err}",
                        r.inspect_lists
                    ));
                }
            }
        }
        if let Some(old) = golden.get(name) {
            let (w, b) = compare(name, old, now);
            worse.extend(w);
            better.extend(b);
        } else {
            better.push(format!("{name}: not recorded yet"));
        }
        current.insert(name.to_string(), now.clone());
    }
    println!(
        "\nOf the {demanded} variants TF's converter made, qpipe meets every criterion on {all_criteria}:"
    );
    for k in CRITERIA {
        if let Some((pass, of)) = tally.get(k) {
            println!("  {k:24} {pass} of {of}");
        }
    }
    println!(
        "widest gap between validate's max_abs_error and LiteRT's against TF (first output, every \
         exported variant): {widest_gap:e}; the tolerance for a regression output is \
         {VALIDATE_ERROR_TOLERANCE:e}·max(1, max|TF output|)"
    );
    assert!(
        unpredicted.is_empty(),
        "qpipe inspect and the layers' query functions (stages/op_support.rs) disagree with \
         what the run did:\n{}",
        unpredicted.join("\n")
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

/// The TF1 while loop of `dynamic_rnn` is refused by name, saying it is not supported and
/// suggesting to unroll it, in every variant (the converter refuses it too).
#[test]
fn a_tf1_while_loop_is_refused_with_a_suggestion_to_unroll() {
    let r = measure("fam_dynamic_rnn");
    for (variant, _, _) in VARIANTS {
        let v = &r.doc["variants"][variant];
        assert_eq!(v["qpipe"], "fails", "fam_dynamic_rnn/{variant} should fail");
        let e = v["error"].as_str().unwrap();
        assert!(
            e.contains("is part of the TF1 while loop 'rnn/while/")
                && e.contains("is not supported")
                && e.contains("unroll"),
            "fam_dynamic_rnn/{variant}: not the TF1 while-loop error: {e}"
        );
        assert_eq!(r.conv["variants"][variant]["ok"], false);
    }
}

#[test]
fn errors_blame_the_ops_they_name() {
    assert_eq!(
        ops_blamed(
            "stage 'q': OPTIMIZE_FOR_LATENCY needs every op in int8, but 2 cannot be: \
             'a/Neg' (Neg): no int8 kernel for Neg; 'Elu' (Elu): no int8 kernel for Elu"
        ),
        ["Neg", "Elu"]
    );
    assert_eq!(
        ops_blamed("stage 'x': node 'p/Neg' (Neg): has no TFLite equivalent that qpipe can export"),
        ["Neg"]
    );
    assert!(ops_blamed("stage 'x': node 'p' (PadV2): only zero padding is supported").is_empty());
}

#[test]
fn expected_differences_need_a_reason_and_known_keys() {
    let ok = parse_expected(&json!({"int8_default": {"reason": "x", "max_ops": 9,
        "extra_ops": {"QUANTIZE": 1}, "max_bytes_ratio": 1.05, "fails": "no int8"}}))
    .unwrap();
    let e = &ok["int8_default"];
    assert_eq!((e.max_ops, e.extra_ops["QUANTIZE"]), (Some(9), 1));
    assert!(parse_expected(&json!({"int8_default": {"max_ops": 9}}))
        .unwrap_err()
        .contains("reason"));
    assert!(parse_expected(&json!({"int8": {"reason": "x"}}))
        .unwrap_err()
        .contains("unknown variant"));
    assert!(
        parse_expected(&json!({"fp16": {"reason": "x", "max_op": 1}}))
            .unwrap_err()
            .contains("unknown key")
    );
    // every committed expected file parses
    for name in FIXTURES {
        expected_differences(name);
    }
    let extra = BTreeMap::from([("QUANTIZE".to_string(), 1)]);
    let q = json!({"QUANTIZE": 2, "ADD": 1});
    let c = json!({"QUANTIZE": 1, "ADD": 1});
    assert!(histogram_excess(&q, &c, &extra).is_empty());
    assert_eq!(
        histogram_excess(&q, &c, &BTreeMap::new()),
        vec![("QUANTIZE".to_string(), 2, 1)]
    );
}

#[test]
fn the_ratchet_flags_regressions_and_improvements() {
    let rec = |qpipe: &str, ops: u64, ratio: f64, pass: bool| {
        let crit: serde_json::Map<String, Value> = CRITERIA
            .iter()
            .map(|c| (c.to_string(), json!(pass)))
            .collect();
        json!({"qpipe": qpipe, "ops": ops, "bytes_ratio": ratio, "error": "x", "criteria": crit})
    };
    let doc = |v: Value, strip: &str| {
        let mut variants = serde_json::Map::new();
        for (name, _, _) in VARIANTS {
            variants.insert(name.to_string(), v.clone());
        }
        json!({"freeze": "ok", "strip": strip, "variants": variants})
    };
    let n = VARIANTS.len();
    let old = doc(rec("exports", 8, 1.10, false), "ok");
    let (w, b) = compare("f", &old, &old);
    assert!(w.is_empty() && b.is_empty(), "{w:?} {b:?}");
    let (w, _) = compare("f", &old, &doc(rec("exports", 9, 1.10, false), "ok"));
    assert_eq!(w.len(), n, "{w:?}");
    let (w, _) = compare("f", &old, &doc(rec("exports", 8, 1.11, false), "ok"));
    assert_eq!(w.len(), n, "{w:?}");
    let (w, _) = compare("f", &old, &doc(rec("fails", 0, 0.0, false), "broken"));
    assert_eq!(w.len(), n + 1, "{w:?}");
    let (w, b) = compare("f", &old, &doc(rec("exports", 4, 1.0, false), "ok"));
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(b.len(), 2 * n, "{b:?}");
    // a criterion that passed and now fails is a regression; one that now passes, a note
    let passing = doc(rec("exports", 8, 1.10, true), "ok");
    let (w, b) = compare("f", &old, &passing);
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(b.len(), n * CRITERIA.len(), "{b:?}");
    let (w, _) = compare("f", &passing, &old);
    assert_eq!(w.len(), n * CRITERIA.len(), "{w:?}");
    assert!(w[0].contains("passed before, now fails"), "{w:?}");
}
