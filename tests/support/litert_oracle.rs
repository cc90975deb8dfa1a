//! The LiteRT oracle: a Python virtual environment with the pinned `ai-edge-litert`,
//! installed on first use, running `.tflite` models on `.npy` inputs.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use qpipe::ir::Tensor;

use super::manifest_dir;

/// The LiteRT release the tests run, installed from PyPI into `target/litert-venv`.
pub const LITERT_REQUIREMENT: &str = "ai-edge-litert==2.3.0";

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

/// A model and its feeds written to a directory, ready for [`LiteRtCase::run`].
pub struct LiteRtCase {
    dir: PathBuf,
    pub model: PathBuf,
    inputs: Vec<(String, PathBuf)>,
}

impl LiteRtCase {
    /// Writes `model.tflite` and one `.npy` file per feed under `dir`.
    pub fn write(dir: &Path, tflite: &[u8], feeds: &[(String, Tensor)]) -> LiteRtCase {
        let model = dir.join("model.tflite");
        std::fs::write(&model, tflite).unwrap();
        let inputs = feeds
            .iter()
            .map(|(name, t)| {
                let p = dir.join(format!("{name}.npy"));
                qpipe::npy::write(&p, t).unwrap();
                (name.clone(), p)
            })
            .collect();
        LiteRtCase {
            dir: dir.to_path_buf(),
            model,
            inputs,
        }
    }

    /// The model's outputs in LiteRT with `resolver`.
    pub fn run(&self, resolver: Resolver) -> Result<Vec<Tensor>, String> {
        let inputs: Vec<(&str, &Path)> = self
            .inputs
            .iter()
            .map(|(n, p)| (n.as_str(), p.as_path()))
            .collect();
        run_litert(
            &self.model,
            &inputs,
            resolver,
            &self.dir.join(format!("{resolver:?}")),
        )
    }
}

/// One model of a [`run_litert_batch`] call: `.npy` inputs by model input name, and
/// the directory its outputs are written to.
pub struct BatchJob {
    pub model: PathBuf,
    pub inputs: Vec<(String, PathBuf)>,
    pub resolver: Resolver,
    pub out_dir: PathBuf,
}

/// Runs every job in one LiteRT process (`tests/litert/run_jobs.py`): float data for an
/// int8 input is quantized with the input's parameters and int8 outputs are dequantized.
/// Per job, the outputs in the model's order or LiteRT's error; a job that fails does not
/// stop the others. Failing to start the process fails the test.
pub fn run_litert_batch(jobs: &[BatchJob], dir: &Path) -> Vec<Result<Vec<Tensor>, String>> {
    if jobs.is_empty() {
        return Vec::new();
    }
    let list: Vec<serde_json::Value> = jobs
        .iter()
        .map(|j| {
            let inputs: serde_json::Map<String, serde_json::Value> = j
                .inputs
                .iter()
                .map(|(n, p)| (n.clone(), p.display().to_string().into()))
                .collect();
            serde_json::json!({
                "model": j.model.display().to_string(),
                "inputs": inputs,
                "resolver": match j.resolver {
                    Resolver::Default => "builtin",
                    Resolver::Reference => "ref",
                },
                "out_dir": j.out_dir.display().to_string(),
            })
        })
        .collect();
    std::fs::create_dir_all(dir).unwrap();
    let jobs_file = dir.join("litert_jobs.json");
    std::fs::write(&jobs_file, serde_json::to_vec(&list).unwrap()).unwrap();
    let script = manifest_dir().join("tests/litert/run_jobs.py");
    let out = run_checked(
        Command::new(litert_python()).arg(&script).arg(&jobs_file),
        &format!("LiteRT batch of {} models", jobs.len()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let report: Vec<serde_json::Value> = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("run_jobs.py printed no JSON list ({e}): {out}"));
    assert_eq!(report.len(), jobs.len(), "run_jobs.py answered {report:?}");
    report
        .iter()
        .map(|r| {
            if r["ok"] == true {
                Ok(r["outputs"]
                    .as_array()
                    .expect("outputs")
                    .iter()
                    .map(|f| qpipe::npy::read(Path::new(f.as_str().unwrap())).unwrap())
                    .collect())
            } else {
                Err(r["error"].as_str().unwrap_or("?").to_string())
            }
        })
        .collect()
}
