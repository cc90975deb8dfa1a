//! Recipes: the TOML file a user writes, parsed strictly into the stages to run.
//!
//! Every problem (syntax, an unknown key, a wrong type, a reference to a stage or
//! dataset that does not exist, a cycle, a missing file, an export path leaving
//! `out_dir`) is a usage error (exit code 2) reported as `FILE:LINE:COL: KEY: message`
//! before anything runs.
//!
//! A stage may declare `matrix = { key = [v1, v2], ... }`: it expands into one stage per
//! combination, named `ID@v1` (several keys: `ID@v1,w1`, keys in sorted order), and
//! every stage downstream of it expands with it; a stage reading two stages expanded
//! from the same matrix pairs their variants instead of crossing them. Strings in an
//! expanded stage may use `${key}` for its variant's value of a matrix key (for example
//! `path = "model_${strategy}.tflite"`). A reference may name one variant directly
//! (`input = "int8@DEFAULT"`), which does not expand the referring stage.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::de::{DeArray, DeTable, DeValue};
use toml::Spanned;

use super::fsutil;
use super::recipe_check::is_simple_id;
use crate::error::{Error, Result};
use crate::spec::{DatasetSpec, ModelSpec};
use crate::stages::registry::{StageFactory, REGISTRY};
use crate::stages::{Stage, StageDeps};

mod datasets;
mod model;
mod stage_tables;

/// A parsed recipe, with paths resolved and every stage built.
pub struct Recipe {
    /// The recipe file as named on the command line (for messages).
    pub path: PathBuf,
    /// The directory relative paths in the recipe are resolved against (absolute).
    pub dir: PathBuf,
    pub name: String,
    pub cache_dir: PathBuf,
    pub out_dir: PathBuf,
    pub allow_outside_out_dir: bool,
    /// `remote_cache = "http://…"` under `[pipeline]` (see [`super::remote`]).
    pub remote_cache: Option<String>,
    pub model: ModelSpec,
    /// Every file of the model (checkpoint `.meta`, `.index`, all data shards; or the `.pb`).
    pub model_files: Vec<ExternalFile>,
    pub datasets: BTreeMap<String, DatasetSpec>,
    pub dataset_files: BTreeMap<String, Vec<ExternalFile>>,
    /// Stages after matrix expansion, in declaration order.
    pub stages: Vec<RecipeStage>,
}

/// A file a stage reads besides its inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct ExternalFile {
    /// Stable name in the cache key (`model.index`, `dataset.calib.input_x`).
    pub role: String,
    pub path: PathBuf,
    /// As written in (or derived from) the recipe, for messages.
    pub display: String,
}

/// One stage of a recipe.
pub struct RecipeStage {
    pub id: String,
    pub kind: &'static str,
    pub stage: Box<dyn Stage>,
    pub deps: StageDeps,
    /// (config key, index of the upstream stage in [`Recipe::stages`]).
    pub inputs: Vec<(String, usize)>,
    /// Declared outputs resolved under `out_dir`: (path as declared, absolute path).
    pub outputs: Vec<(String, PathBuf)>,
    /// The stage id as written, before matrix expansion.
    pub base_id: String,
    /// Matrix key → value, for expanded stages (empty otherwise).
    pub variant: BTreeMap<String, String>,
}

impl fmt::Debug for RecipeStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecipeStage")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("inputs", &self.inputs)
            .field("variant", &self.variant)
            .finish()
    }
}

impl Recipe {
    /// Loads a recipe with the built-in stage kinds. `QPIPE_CACHE_DIR` overrides its cache directory.
    pub fn load(path: &Path) -> Result<Recipe> {
        Recipe::load_with(path, REGISTRY)
    }

    /// Loads a recipe with the given stage kinds. `QPIPE_CACHE_DIR` overrides its cache directory.
    pub fn load_with(path: &Path, registry: &[StageFactory]) -> Result<Recipe> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::usage(format!("{}: cannot read recipe: {e}", path.display())))?;
        let mut recipe = Recipe::parse(&text, path, registry)?;
        if let Some(dir) = std::env::var_os("QPIPE_CACHE_DIR").filter(|d| !d.is_empty()) {
            recipe.cache_dir = fsutil::absolute(Path::new(&dir));
        }
        Ok(recipe)
    }

    /// Parses recipe text; `path` names it in messages and anchors relative paths.
    pub fn parse(text: &str, path: &Path, registry: &[StageFactory]) -> Result<Recipe> {
        let src = Src {
            display: path.display().to_string(),
            text,
        };
        let dir = fsutil::absolute(path.parent().unwrap_or(Path::new("")));
        let dir = if dir.as_os_str().is_empty() {
            fsutil::absolute(Path::new("."))
        } else {
            dir
        };
        let doc = DeTable::parse(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            let (line, col) = src.line_col(span.start);
            Error::usage(format!(
                "{}:{line}:{col}: syntax error: {}",
                src.display,
                e.message().trim()
            ))
        })?;
        Parser {
            src: &src,
            dir,
            path: path.to_path_buf(),
            registry,
        }
        .recipe(doc.get_ref())
    }

    pub fn stage_index(&self, id: &str) -> Option<usize> {
        self.stages.iter().position(|s| s.id == id)
    }

    /// The external files stage `i` reads (model files, then its datasets' files).
    pub fn external_files(&self, i: usize) -> Vec<&ExternalFile> {
        let deps = &self.stages[i].deps;
        let mut files: Vec<&ExternalFile> = Vec::new();
        if deps.model {
            files.extend(self.model_files.iter());
        }
        for d in &deps.datasets {
            files.extend(self.dataset_files.get(d).into_iter().flatten());
        }
        files
    }

    /// The `[model]` settings every stage's key covers.
    pub fn model_io(&self) -> serde_json::Value {
        serde_json::json!({
            "inputs": self.model.inputs,
            "outputs": self.model.outputs,
            "input_shapes": self.model.input_shapes,
        })
    }
}

struct Src<'t> {
    display: String,
    text: &'t str,
}

impl Src<'_> {
    fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = self.text.get(..offset).unwrap_or("");
        let line = before.matches('\n').count() + 1;
        let col = before
            .rsplit('\n')
            .next()
            .map(|l| l.chars().count())
            .unwrap_or(0)
            + 1;
        (line, col)
    }

    fn err(&self, span: Range<usize>, key: &str, msg: impl fmt::Display) -> Error {
        let (line, col) = self.line_col(span.start);
        Error::usage(format!("{}:{line}:{col}: {key}: {msg}", self.display))
    }
}

type Value<'t> = Spanned<DeValue<'t>>;

struct Parser<'s, 't> {
    src: &'s Src<'t>,
    dir: PathBuf,
    path: PathBuf,
    registry: &'s [StageFactory],
}

impl<'s, 't> Parser<'s, 't> {
    fn recipe(&self, doc: &DeTable<'t>) -> Result<Recipe> {
        for (k, _) in doc.iter() {
            if !matches!(
                k.get_ref().as_ref(),
                "pipeline" | "model" | "datasets" | "stages"
            ) {
                return Err(self.src.err(
                    k.span(),
                    k.get_ref(),
                    "unknown table (expected pipeline, model, datasets, stages)",
                ));
            }
        }
        let empty = DeTable::new();
        let pipeline = match doc.get("pipeline") {
            Some(v) => self.table(v, "pipeline")?,
            None => &empty,
        };
        let mut name = self
            .path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "pipeline".into());
        let mut cache_dir = self.dir.join(".qpipe");
        let mut out_dir = self.dir.join("out");
        let mut allow_outside_out_dir = false;
        let mut remote_cache = None;
        let mut name_set = false;
        for (k, v) in pipeline.iter() {
            let key = format!("pipeline.{}", k.get_ref());
            match k.get_ref().as_ref() {
                "name" => {
                    name = self.string(v, &key)?.to_string();
                    if !is_simple_id(&name) {
                        return Err(self.src.err(
                            v.span(),
                            &key,
                            "pipeline names use letters, digits, '_', '-' and '.'",
                        ));
                    }
                    name_set = true;
                }
                "cache_dir" => cache_dir = self.dir.join(self.string(v, &key)?),
                "out_dir" => out_dir = self.dir.join(self.string(v, &key)?),
                "allow_outside_out_dir" => allow_outside_out_dir = self.boolean(v, &key)?,
                "remote_cache" => {
                    let url = self.string(v, &key)?;
                    if let Err(e) = super::remote::check_recipe_url(url) {
                        return Err(self.src.err(v.span(), &key, e));
                    }
                    remote_cache = Some(url.to_string());
                }
                _ => {
                    return Err(self.unknown_key(
                        k,
                        &key,
                        &[
                            "name",
                            "cache_dir",
                            "out_dir",
                            "allow_outside_out_dir",
                            "remote_cache",
                        ],
                    ))
                }
            }
        }
        if !name_set && !is_simple_id(&name) {
            return Err(self.src.err(
                0..0,
                "pipeline.name",
                format!(
                    "the pipeline is named after the recipe file, but '{name}' is not a valid name \
                     (letters, digits, '_', '-' and '.'); set name = \"...\" in [pipeline]"
                ),
            ));
        }
        let Some(model_v) = doc.get("model") else {
            return Err(self
                .src
                .err(0..0, "model", "the recipe has no [model] table"));
        };
        let (model, model_files) = self.model(model_v)?;
        let (datasets, dataset_files) = match doc.get("datasets") {
            Some(v) => self.datasets(v, &model)?,
            None => (BTreeMap::new(), BTreeMap::new()),
        };
        let stages_v = doc.get("stages");
        let stages = match stages_v {
            Some(v) => self.stages(v, &datasets, &out_dir, allow_outside_out_dir)?,
            None => Vec::new(),
        };
        if stages.is_empty() {
            let span = stages_v.map(|v| v.span()).unwrap_or(0..0);
            return Err(self
                .src
                .err(span, "stages", "the recipe declares no stages"));
        }
        Ok(Recipe {
            path: self.path.clone(),
            dir: self.dir.clone(),
            name,
            cache_dir,
            out_dir,
            allow_outside_out_dir,
            remote_cache,
            model,
            model_files,
            datasets,
            dataset_files,
            stages,
        })
    }

    // ---- typed accessors ----

    fn table<'v>(&self, v: &'v Value<'t>, key: &str) -> Result<&'v DeTable<'t>> {
        v.get_ref().as_table().ok_or_else(|| {
            self.src.err(
                v.span(),
                key,
                format!("expected a table, found {}", v.get_ref().type_str()),
            )
        })
    }

    fn string<'v>(&self, v: &'v Value<'t>, key: &str) -> Result<&'v str> {
        v.get_ref().as_str().ok_or_else(|| {
            self.src.err(
                v.span(),
                key,
                format!("expected a string, found {}", v.get_ref().type_str()),
            )
        })
    }

    fn boolean(&self, v: &Value<'t>, key: &str) -> Result<bool> {
        v.get_ref().as_bool().ok_or_else(|| {
            self.src.err(
                v.span(),
                key,
                format!("expected a boolean, found {}", v.get_ref().type_str()),
            )
        })
    }

    fn array<'v>(&self, v: &'v Value<'t>, key: &str) -> Result<&'v DeArray<'t>> {
        v.get_ref().as_array().ok_or_else(|| {
            self.src.err(
                v.span(),
                key,
                format!("expected an array, found {}", v.get_ref().type_str()),
            )
        })
    }

    fn strings(&self, v: &Value<'t>, key: &str) -> Result<Vec<String>> {
        self.array(v, key)?
            .iter()
            .map(|e| self.string(e, key).map(str::to_string))
            .collect()
    }

    fn unknown_key(&self, k: &Spanned<Cow<'t, str>>, key: &str, known: &[&str]) -> Error {
        self.src.err(
            k.span(),
            key,
            format!("unknown key (expected one of: {})", known.join(", ")),
        )
    }

    fn existing_file(&self, v: &Value<'t>, key: &str, written: &str, path: &Path) -> Result<()> {
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() => Ok(()),
            Ok(_) => Err(self
                .src
                .err(v.span(), key, format!("'{written}' is not a regular file"))),
            Err(e) => Err(self
                .src
                .err(v.span(), key, format!("cannot read '{written}': {e}"))),
        }
    }
}

impl fmt::Debug for Recipe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recipe")
            .field("path", &self.path)
            .field("name", &self.name)
            .field("stages", &self.stages)
            .finish()
    }
}
