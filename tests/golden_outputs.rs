//! The `.tflite` and `.pb` files `qpipe run` builds from every fixture model, compared
//! byte for byte (by blake3) with the list in `tests/golden/outputs.txt`.
//!
//! The list pins qpipe's outputs across refactors that must not change them. When an
//! output is meant to change, regenerate the list and review the diff in the commit:
//!
//!     QPIPE_GOLDEN_REGENERATE=1 cargo test --test golden_outputs
//!
//! A structure-only change must pass without regenerating.

use std::path::{Path, PathBuf};
use std::process::Command;

const MODELS: [(&str, &str); 3] = [
    ("push_student", "score_student/output_student"),
    ("conv_bn", "output/probs"),
    ("mlp_res", "output/probs"),
];

/// Every output kind users build: the frozen and stripped `.pb`, float32 and fp16
/// `.tflite`, int8 with calibration under each strategy, and dynamic range (DEFAULT
/// without calibration).
const STAGES: &str = r#"
[datasets.calib]
input_x = "calib_x.npy"

[stages.freeze]
kind = "freeze"

[stages.strip]
kind = "strip_training"
input = "freeze"

[stages.fp16]
kind = "fp16_cast"
input = "strip"

[stages.int8]
kind = "quantize_int8"
input = "strip"
matrix = { strategy = ["DEFAULT", "OPTIMIZE_FOR_SIZE", "OPTIMIZE_FOR_LATENCY"] }
calibration = "calib"

[stages.dynamic]
kind = "quantize_int8"
input = "strip"

[stages.frozen_pb]
kind = "export_graphdef"
input = "freeze"
path = "frozen.pb"

[stages.stripped_pb]
kind = "export_graphdef"
input = "strip"
path = "stripped.pb"

[stages.tflite_float]
kind = "export_tflite"
input = "strip"
path = "float32.tflite"

[stages.tflite_fp16]
kind = "export_tflite"
input = "fp16"
path = "fp16.tflite"

[stages.tflite_int8]
kind = "export_tflite"
input = "int8"
path = "int8_${strategy}.tflite"

[stages.tflite_dynamic]
kind = "export_tflite"
input = "dynamic"
path = "dynamic.tflite"
"#;

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn work_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("golden-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs the recipe for `model` read from `source` (a checkpoint or the TF-frozen `.pb`)
/// and returns one line per output file: `model/source/file blake3 bytes`.
fn build(work: &Path, model: &str, output: &str, source: &str) -> Vec<String> {
    let fixture = manifest_dir().join("fixtures").join(model);
    let dir = work.join(format!("{model}-{source}"));
    std::fs::create_dir_all(&dir).unwrap();
    for f in [
        "best_validation.meta",
        "best_validation.index",
        "best_validation.data-00000-of-00001",
        "tf_frozen.pb",
        "calib_x.npy",
    ] {
        std::fs::copy(fixture.join(f), dir.join(f)).unwrap();
    }
    let model_line = match source {
        "checkpoint" => r#"checkpoint = "best_validation""#,
        _ => r#"graph = "tf_frozen.pb""#,
    };
    let recipe = format!(
        "[pipeline]\nname = \"golden\"\n\n[model]\n{model_line}\ninputs = [\"input_x\"]\noutputs = [\"{output}\"]\n{STAGES}"
    );
    std::fs::write(dir.join("recipe.toml"), recipe).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_qpipe"))
        .args(["run", "recipe.toml"])
        .current_dir(&dir)
        .env_remove("QPIPE_CACHE_DIR")
        .env_remove("QPIPE_TEST_PAUSE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{model} from {source}: qpipe run failed\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The model files only: out_dir also holds qpipe's own bookkeeping (its manifest).
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("out"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "tflite" || x == "pb"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 8, "{model} from {source}: {files:?}");
    files
        .iter()
        .map(|p| {
            let bytes = std::fs::read(p).unwrap();
            format!(
                "{model}/{source}/{} {} {}",
                p.file_name().unwrap().to_string_lossy(),
                blake3::hash(&bytes).to_hex(),
                bytes.len()
            )
        })
        .collect()
}

#[test]
fn fixture_outputs_are_byte_identical_to_the_golden_list() {
    let work = work_dir();
    let mut lines = Vec::new();
    for (model, output) in MODELS {
        for source in ["checkpoint", "frozen_pb"] {
            lines.extend(build(&work, model, output, source));
        }
    }
    let actual = lines.join("\n") + "\n";
    let golden = manifest_dir().join("tests/golden/outputs.txt");
    if std::env::var_os("QPIPE_GOLDEN_REGENERATE").is_some() {
        std::fs::create_dir_all(golden.parent().unwrap()).unwrap();
        std::fs::write(&golden, &actual).unwrap();
        eprintln!("wrote {}", golden.display());
    }
    let expected = std::fs::read_to_string(&golden).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (regenerate with QPIPE_GOLDEN_REGENERATE=1)",
            golden.display()
        )
    });
    let differ: Vec<String> = expected
        .lines()
        .zip(actual.lines())
        .filter(|(e, a)| e != a)
        .map(|(e, a)| format!("  expected {e}\n  got      {a}"))
        .collect();
    assert!(
        differ.is_empty() && expected.lines().count() == actual.lines().count(),
        "outputs differ from {}:\n{}\n(expected {} files, got {})",
        golden.display(),
        differ.join("\n"),
        expected.lines().count(),
        actual.lines().count()
    );
    let _ = std::fs::remove_dir_all(&work);
}
