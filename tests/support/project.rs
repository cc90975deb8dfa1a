//! A test project on disk (checkpoint files, data sets, the standard [`RECIPE`] over the
//! test stage kinds), running it in process, and reading its cache and outputs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use qpipe::pipeline::{self, Event, Observer, Recipe, RunOptions, RunReport};

use super::pipeline_stages::TEST_REGISTRY;
use super::tmp_dir;

/// Deterministic filler bytes.
pub fn bytes(seed: u8, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A project: a checkpoint with two data shards, three dataset files, a recipe.
pub struct Project {
    pub dir: PathBuf,
    pub recipe: PathBuf,
}

/// The standard test recipe: load → map (strip) → calib (int8, matrix over two
/// strategies) → export per variant; a gate per variant; a float export.
pub const RECIPE: &str = r#"
[pipeline]
name = "test_pipeline"

[model]
checkpoint = "ckpt/best_validation"
inputs = ["input_x"]
outputs = ["out"]

[datasets.calib]
input_x = "data/calib_x.npy"

[datasets.eval]
input_x = "data/eval_x.npy"
labels = "data/eval_y.npy"

[stages.freeze]
kind = "t_load"

[stages.strip]
kind = "t_map"
input = "freeze"
tag = "strip"

[stages.float_out]
kind = "t_export"
input = "strip"
path = "float.bin"

[stages.int8]
kind = "t_calib"
input = "strip"
dataset = "calib"
matrix = { strategy = ["DEFAULT", "OPTIMIZE_FOR_SIZE"] }

[stages.int8_out]
kind = "t_export"
input = "int8"
path = "int8_${strategy}.bin"

[stages.check]
kind = "t_gate"
reference = "strip"
candidate = "int8"
max_extra_nodes = 1
"#;

impl Project {
    pub fn new(name: &str) -> Project {
        Project::with_recipe(name, RECIPE)
    }

    pub fn with_recipe(name: &str, recipe: &str) -> Project {
        let dir = tmp_dir(name);
        std::fs::create_dir_all(dir.join("ckpt")).unwrap();
        std::fs::create_dir_all(dir.join("data")).unwrap();
        std::fs::write(dir.join("ckpt/best_validation.meta"), bytes(1, 300)).unwrap();
        std::fs::write(dir.join("ckpt/best_validation.index"), bytes(2, 100)).unwrap();
        std::fs::write(
            dir.join("ckpt/best_validation.data-00000-of-00002"),
            bytes(3, 1000),
        )
        .unwrap();
        std::fs::write(
            dir.join("ckpt/best_validation.data-00001-of-00002"),
            bytes(4, 1000),
        )
        .unwrap();
        std::fs::write(dir.join("data/calib_x.npy"), bytes(5, 400)).unwrap();
        std::fs::write(dir.join("data/eval_x.npy"), bytes(6, 400)).unwrap();
        std::fs::write(dir.join("data/eval_y.npy"), bytes(7, 40)).unwrap();
        let p = Project {
            recipe: dir.join("recipe.toml"),
            dir,
        };
        p.write_recipe(recipe);
        p
    }

    pub fn write_recipe(&self, text: &str) {
        std::fs::write(&self.recipe, text).unwrap();
    }

    pub fn recipe_text(&self) -> String {
        std::fs::read_to_string(&self.recipe).unwrap()
    }

    /// Edits the recipe with a textual replacement (which must apply).
    pub fn edit_recipe(&self, from: &str, to: &str) {
        let t = self.recipe_text();
        assert!(t.contains(from), "recipe has no {from:?}");
        self.write_recipe(&t.replacen(from, to, 1));
    }

    pub fn load(&self) -> Recipe {
        let text = self.recipe_text();
        let mut r =
            Recipe::parse(&text, &self.recipe, TEST_REGISTRY).unwrap_or_else(|e| panic!("{e}"));
        r.cache_dir = self.dir.join(".qpipe");
        r
    }

    pub fn cache(&self) -> PathBuf {
        self.dir.join(".qpipe")
    }

    pub fn out(&self, rel: &str) -> PathBuf {
        self.dir.join("out").join(rel)
    }

    /// Runs in process; returns the report and what the observer saw.
    pub fn run(&self) -> (RunReport, Seen) {
        self.run_with(&RunOptions {
            jobs: 2,
            ..RunOptions::default()
        })
    }

    pub fn run_with(&self, opts: &RunOptions) -> (RunReport, Seen) {
        let seen = Seen::default();
        let report = pipeline::run(&self.load(), opts, &seen).unwrap_or_else(|e| panic!("{e}"));
        (report, seen)
    }

    /// Every output file under out/, with its bytes.
    pub fn outputs(&self) -> BTreeMap<String, Vec<u8>> {
        let mut m = BTreeMap::new();
        for e in walkdir::WalkDir::new(self.dir.join("out"))
            .into_iter()
            .flatten()
        {
            // The out_dir manifest is qpipe's bookkeeping, not an output.
            let manifest = e
                .file_name()
                .to_string_lossy()
                .starts_with(".qpipe-manifest-");
            if e.file_type().is_file() && !manifest {
                let rel = e.path().strip_prefix(self.dir.join("out")).unwrap();
                m.insert(
                    rel.to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                );
            }
        }
        m
    }
}

/// Collects events.
#[derive(Default)]
pub struct Seen {
    pub warnings: Mutex<Vec<String>>,
    pub dirty: Mutex<Vec<(String, String)>>,
    pub restored: Mutex<Vec<PathBuf>>,
}

impl Seen {
    pub fn warnings(&self) -> Vec<String> {
        self.warnings.lock().unwrap().clone()
    }
    pub fn reason(&self, id: &str) -> Option<String> {
        self.dirty
            .lock()
            .unwrap()
            .iter()
            .find(|(i, _)| i == id)
            .map(|(_, r)| r.clone())
    }
    pub fn restored(&self) -> Vec<PathBuf> {
        self.restored.lock().unwrap().clone()
    }
}

impl Observer for Seen {
    fn event(&self, e: Event<'_>) {
        match e {
            Event::Warning(w) => self.warnings.lock().unwrap().push(w.to_string()),
            Event::Dirty { id, reason } => self
                .dirty
                .lock()
                .unwrap()
                .push((id.to_string(), reason.to_string())),
            Event::Restored { path, .. } => self.restored.lock().unwrap().push(path.to_path_buf()),
            _ => {}
        }
    }
}

/// Sorted ids of stages with the given status.
pub fn ids(report: &RunReport, status: pipeline::StageStatus) -> Vec<String> {
    let mut v: Vec<String> = report
        .with_status(status)
        .into_iter()
        .map(String::from)
        .collect();
    v.sort();
    v
}

pub fn all_ids(report: &RunReport) -> Vec<String> {
    let mut v: Vec<String> = report.stages.iter().map(|s| s.id.clone()).collect();
    v.sort();
    v
}

pub fn sorted(v: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

/// Flips one bit of a file in place.
pub fn flip_bit(path: &Path, at: usize) {
    let mut b = std::fs::read(path).unwrap();
    let i = at % b.len();
    b[i] ^= 0x10;
    std::fs::write(path, b).unwrap();
}

/// Files under `dir/v1/<sub>` (recursively).
pub fn cache_files(cache: &Path, sub: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = walkdir::WalkDir::new(cache.join("v1").join(sub))
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .map(|e| e.path().to_path_buf())
        .collect();
    v.sort();
    v
}
