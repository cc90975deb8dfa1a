//! Shared by the `tflite_*` tests: the LiteRT oracle (a Python virtual
//! environment with the pinned `ai-edge-litert`, installed on first use),
//! fixture loading, and output comparisons.
#![allow(dead_code)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use qpipe::formats::tf::graph_def::read_graph_def;
use qpipe::ir::{Attr, Graph, Tensor, TensorRef};
use qpipe::stages::strip_training::{strip, StripOptions};

/// The LiteRT release the tests run, installed from PyPI into `target/litert-venv`.
pub const LITERT_REQUIREMENT: &str = "ai-edge-litert==2.3.0";

pub fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A scratch directory for one test, emptied first.
pub fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("tflite")
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run_checked(cmd: &mut Command, what: &str) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("{what}: cannot start {:?}: {e}", cmd.get_program()))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Creates the virtual environment and installs the pinned LiteRT into it,
/// unless a previous run did. Guarded by a file lock so that parallel tests
/// (and parallel test binaries) install once.
fn install() -> Result<PathBuf, String> {
    let target = manifest_dir().join("target");
    std::fs::create_dir_all(&target).map_err(|e| format!("{}: {e}", target.display()))?;
    let venv = target.join("litert-venv");
    let python = venv.join("bin").join("python");
    let marker = venv.join("qpipe-installed.txt");
    let lock_path = target.join("litert-venv.lock");
    let lock = File::create(&lock_path).map_err(|e| format!("{}: {e}", lock_path.display()))?;
    lock.lock()
        .map_err(|e| format!("locking {}: {e}", lock_path.display()))?;
    let ready = std::fs::read_to_string(&marker)
        .map(|m| m.lines().next() == Some(LITERT_REQUIREMENT))
        .unwrap_or(false);
    if ready && python.exists() {
        return Ok(python);
    }
    if venv.exists() {
        std::fs::remove_dir_all(&venv).map_err(|e| format!("{}: {e}", venv.display()))?;
    }
    let base = std::env::var("QPIPE_PYTHON").unwrap_or_else(|_| "python3".into());
    eprintln!(
        "installing {LITERT_REQUIREMENT} into {} (first run only)",
        venv.display()
    );
    run_checked(
        Command::new(&base).arg("-m").arg("venv").arg(&venv),
        &format!("creating the LiteRT virtual environment with {base} -m venv"),
    )?;
    run_checked(
        Command::new(&python).args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            LITERT_REQUIREMENT,
            "numpy",
        ]),
        &format!("pip install {LITERT_REQUIREMENT} numpy"),
    )?;
    let versions = run_checked(
        Command::new(&python).args([
            "-c",
            "import importlib.metadata as m, numpy, ai_edge_litert.interpreter; \
             print('ai-edge-litert', m.version('ai-edge-litert'), 'numpy', numpy.__version__)",
        ]),
        "importing the installed LiteRT",
    )?;
    std::fs::write(&marker, format!("{LITERT_REQUIREMENT}\n{versions}"))
        .map_err(|e| format!("{}: {e}", marker.display()))?;
    Ok(python)
}

/// The Python of the LiteRT environment. A failed installation fails the test
/// with pip's message; it never skips.
pub fn litert_python() -> &'static Path {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match PYTHON.get_or_init(install) {
        Ok(p) => p,
        Err(e) => panic!("the LiteRT test runtime could not be installed: {e}"),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolver {
    /// The interpreter's default (builtin kernels with the XNNPACK delegate).
    Default,
    /// TFLite's reference kernels (`OpResolverType.BUILTIN_REF`).
    Reference,
}

impl Resolver {
    pub const ALL: [Resolver; 2] = [Resolver::Default, Resolver::Reference];
    fn arg(self) -> &'static str {
        match self {
            Resolver::Default => "auto",
            Resolver::Reference => "ref",
        }
    }
}

/// Runs `model` in LiteRT on `.npy` inputs and returns its outputs in order.
///
/// With `QPIPE_LITERT_WRAPPER` set (e.g. `qemu-x86_64 -cpu Haswell`), LiteRT's Python
/// runs under that command: a way to see what the default resolver, which picks
/// its kernels by CPU, computes on a CPU without AVX-512.
pub fn run_litert(
    model: &Path,
    inputs: &[(&str, &Path)],
    resolver: Resolver,
    out_dir: &Path,
) -> Result<Vec<Tensor>, String> {
    let script = manifest_dir().join("tests/litert/run_model.py");
    let wrapper = std::env::var("QPIPE_LITERT_WRAPPER").unwrap_or_default();
    let mut words = wrapper.split_whitespace();
    let mut cmd = match words.next() {
        Some(program) => {
            let mut c = Command::new(program);
            c.args(words).arg(litert_python());
            c
        }
        None => Command::new(litert_python()),
    };
    cmd.arg(&script)
        .arg(model)
        .arg("--out-dir")
        .arg(out_dir)
        .arg("--resolver")
        .arg(resolver.arg());
    for (name, path) in inputs {
        cmd.arg("--input").arg(format!("{name}={}", path.display()));
    }
    run_checked(
        &mut cmd,
        &format!("LiteRT ({resolver:?}) on {}", model.display()),
    )?;
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("outputs.json")).unwrap()).unwrap();
    let outputs = manifest["outputs"]
        .as_array()
        .expect("outputs.json lists outputs");
    Ok(outputs
        .iter()
        .map(|o| qpipe::npy::read(Path::new(o["file"].as_str().unwrap())).unwrap())
        .collect())
}

/// A committed fixture file; a missing one fails the test.
pub fn fixture(rel: &str) -> PathBuf {
    let p = manifest_dir().join("fixtures").join(rel);
    assert!(p.exists(), "fixture {} is missing", p.display());
    p
}

pub const MODELS: [&str; 3] = ["push_student", "conv_bn", "mlp_res"];

/// A fixture's frozen graph (TensorFlow's `convert_variables_to_constants`)
/// with its declared inputs and outputs, after `strip_training`.
pub fn stripped_fixture(model: &str) -> Graph {
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture(&format!("{model}/model.json"))).unwrap())
            .unwrap();
    let mut g = read_graph_def(&fixture(&format!("{model}/tf_frozen.pb"))).unwrap();
    g.inputs = json["inputs"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    g.outputs = json["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| TensorRef::parse(o.as_str().unwrap()).unwrap())
        .collect();
    let (g, _) = strip(&g, &g.inputs, &g.outputs, &StripOptions::default()).unwrap();
    g
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.shape(), b.shape(), "output shapes differ");
    let (a, b) = (a.to_f32_vec().unwrap(), b.to_f32_vec().unwrap());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(
            0.0f32,
            |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
        )
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// Fraction of rows (first dimension) whose arg-max agrees.
pub fn top1_agreement(a: &Tensor, b: &Tensor) -> f64 {
    let rows = a.shape()[0];
    let (a, b) = (a.to_f32_vec().unwrap(), b.to_f32_vec().unwrap());
    let w = a.len() / rows.max(1);
    let same = (0..rows)
        .filter(|&r| argmax(&a[r * w..(r + 1) * w]) == argmax(&b[r * w..(r + 1) * w]))
        .count();
    same as f64 / rows.max(1) as f64
}

/// The `fused_ops` attribute of a `_Fused*` node: BiasAdd, then no activation (0),
/// Relu (1) or Relu6 (otherwise).
pub fn fused(act: usize) -> Attr {
    let ops: &[&str] = match act {
        0 => &["BiasAdd"],
        1 => &["BiasAdd", "Relu"],
        _ => &["BiasAdd", "Relu6"],
    };
    Attr::Strs(ops.iter().map(|o| o.as_bytes().to_vec()).collect())
}
