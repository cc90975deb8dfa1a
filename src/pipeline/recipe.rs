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
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};

use petgraph::graph::DiGraph;
use toml::de::{DeArray, DeTable, DeValue};
use toml::Spanned;

use super::fsutil;
use super::recipe_check::{is_simple_id, non_finite_float};
use crate::error::{Error, Result};
use crate::stages::registry::{StageFactory, REGISTRY};
use crate::stages::{
    ConfigError, ConfigTable, DatasetSpec, ModelSource, ModelSpec, Stage, StageDeps,
};

/// The most stages a recipe may expand to.
const MAX_STAGES: usize = 10_000;

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

/// A `[stages.ID]` table as written.
struct Proto<'t> {
    id: String,
    id_span: Range<usize>,
    kind: &'static str,
    build: crate::stages::registry::BuildFn,
    table: Spanned<DeTable<'t>>,
    /// (key, key span, values)
    matrix: Vec<(String, Range<usize>, Vec<Value<'t>>)>,
}

/// A matrix dimension: the stage that declares it and the key.
type Dim = (usize, String);

/// A stage being expanded: its variant so far and the references rewritten to variants.
type Partial = (BTreeMap<Dim, String>, Vec<(String, String)>);

/// An expanded stage, built, with the config table it was built from.
type Built<'t> = (Instance, Box<dyn Stage>, ConfigTable<'t>);

/// One expanded stage before it is built for good.
struct Instance {
    name: String,
    variant: BTreeMap<Dim, String>,
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
                _ => {
                    return Err(self.unknown_key(
                        k,
                        &key,
                        &["name", "cache_dir", "out_dir", "allow_outside_out_dir"],
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

    // ---- [model] ----

    fn model(&self, v: &Value<'t>) -> Result<(ModelSpec, Vec<ExternalFile>)> {
        let t = self.table(v, "model")?;
        let mut source: Option<(ModelSource, Vec<ExternalFile>)> = None;
        let mut inputs = None;
        let mut outputs = None;
        let mut shapes_v = None;
        for (k, val) in t.iter() {
            let key = format!("model.{}", k.get_ref());
            match k.get_ref().as_ref() {
                "checkpoint" | "graph" => {
                    if source.is_some() {
                        return Err(self.src.err(
                            k.span(),
                            &key,
                            "give either checkpoint or graph, not both",
                        ));
                    }
                    let written = self.string(val, &key)?;
                    let path = self.dir.join(written);
                    source = Some(if k.get_ref() == "graph" {
                        self.existing_file(val, &key, written, &path)?;
                        let f = ExternalFile {
                            role: "model.graph".into(),
                            path: path.clone(),
                            display: written.to_string(),
                        };
                        (ModelSource::Graph(path), vec![f])
                    } else {
                        let files = self.checkpoint_files(val, &key, written, &path)?;
                        (ModelSource::Checkpoint(path), files)
                    });
                }
                "inputs" => inputs = Some(self.strings(val, &key)?),
                "outputs" => {
                    let o = self.strings(val, &key)?;
                    if o.is_empty() {
                        return Err(self.src.err(val.span(), &key, "name at least one output"));
                    }
                    outputs = Some(o);
                }
                "input_shapes" => shapes_v = Some(val),
                _ => {
                    return Err(self.unknown_key(
                        k,
                        &key,
                        &["checkpoint", "graph", "inputs", "outputs", "input_shapes"],
                    ))
                }
            }
        }
        let Some((source, files)) = source else {
            return Err(self.src.err(
                v.span(),
                "model",
                "set checkpoint (a checkpoint prefix) or graph (a .pb file)",
            ));
        };
        let inputs = inputs.ok_or_else(|| {
            self.src.err(
                v.span(),
                "model.inputs",
                "missing (the model's input names)",
            )
        })?;
        let outputs = outputs.ok_or_else(|| {
            self.src.err(
                v.span(),
                "model.outputs",
                "missing (the model's output names)",
            )
        })?;
        let mut input_shapes = BTreeMap::new();
        if let Some(sv) = shapes_v {
            for (k, dims_v) in self.table(sv, "model.input_shapes")?.iter() {
                let key = format!("model.input_shapes.{}", k.get_ref());
                if !inputs.iter().any(|i| i == k.get_ref().as_ref()) {
                    return Err(self.src.err(
                        k.span(),
                        &key,
                        format!("'{}' is not one of model.inputs {inputs:?}", k.get_ref()),
                    ));
                }
                let dims = self
                    .array(dims_v, &key)?
                    .iter()
                    .map(|d| {
                        d.get_ref()
                            .as_integer()
                            .and_then(|i| i64::from_str_radix(i.as_str(), i.radix()).ok())
                            .filter(|&i| i >= -1)
                            .ok_or_else(|| {
                                self.src.err(
                                    d.span(),
                                    &key,
                                    "dimensions are integers ≥ -1 (-1: unknown)",
                                )
                            })
                    })
                    .collect::<Result<Vec<i64>>>()?;
                input_shapes.insert(k.get_ref().to_string(), dims);
            }
        }
        Ok((
            ModelSpec {
                source,
                inputs,
                outputs,
                input_shapes,
            },
            files,
        ))
    }

    /// `<prefix>.meta`, `<prefix>.index` and every `<prefix>.data-NNNNN-of-MMMMM`.
    fn checkpoint_files(
        &self,
        v: &Value<'t>,
        key: &str,
        written: &str,
        prefix: &Path,
    ) -> Result<Vec<ExternalFile>> {
        let mut files = Vec::new();
        for suffix in ["meta", "index"] {
            let path = PathBuf::from(format!("{}.{suffix}", prefix.display()));
            let w = format!("{written}.{suffix}");
            self.existing_file(v, key, &w, &path)?;
            files.push(ExternalFile {
                role: format!("model.{suffix}"),
                path,
                display: w,
            });
        }
        let dir = prefix.parent().unwrap_or(Path::new("."));
        let base = prefix
            .file_name()
            .map(|b| b.to_string_lossy().into_owned())
            .unwrap_or_default();
        let lead = format!("{base}.data-");
        let mut shards: BTreeMap<u64, String> = BTreeMap::new();
        let mut total: Option<u64> = None;
        let entries = std::fs::read_dir(dir).map_err(|e| {
            self.src.err(
                v.span(),
                key,
                format!("cannot list the checkpoint directory: {e}"),
            )
        })?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(&lead) else {
                continue;
            };
            let parsed = rest
                .split_once("-of-")
                .and_then(|(i, n)| Some((i.parse::<u64>().ok()?, n.parse::<u64>().ok()?)));
            let Some((i, n)) = parsed else {
                return Err(self.src.err(
                    v.span(),
                    key,
                    format!("unexpected checkpoint file name '{name}'"),
                ));
            };
            if *total.get_or_insert(n) != n || i >= n {
                return Err(self.src.err(
                    v.span(),
                    key,
                    format!("checkpoint shard '{name}' does not match the other shards"),
                ));
            }
            shards.insert(i, name);
        }
        let n = total.ok_or_else(|| {
            self.src.err(
                v.span(),
                key,
                format!("no data shards '{written}.data-*' found"),
            )
        })?;
        if shards.len() as u64 != n {
            let missing = (0..n).find(|i| !shards.contains_key(i)).unwrap_or(0);
            return Err(self.src.err(
                v.span(),
                key,
                format!("missing checkpoint shard '{written}.data-{missing:05}-of-{n:05}'"),
            ));
        }
        for name in shards.into_values() {
            let path = dir.join(&name);
            let w = format!("{written}{}", &name[base.len()..]);
            self.existing_file(v, key, &w, &path)?;
            files.push(ExternalFile {
                role: format!("model{}", &name[base.len()..]),
                path,
                display: w,
            });
        }
        Ok(files)
    }

    // ---- [datasets.*] ----

    #[allow(clippy::type_complexity)]
    fn datasets(
        &self,
        v: &Value<'t>,
        model: &ModelSpec,
    ) -> Result<(
        BTreeMap<String, DatasetSpec>,
        BTreeMap<String, Vec<ExternalFile>>,
    )> {
        let mut specs = BTreeMap::new();
        let mut all_files = BTreeMap::new();
        for (name, dv) in self.table(v, "datasets")?.iter() {
            let dkey = format!("datasets.{}", name.get_ref());
            if !is_simple_id(name.get_ref()) {
                return Err(self.src.err(
                    name.span(),
                    &dkey,
                    "dataset names use letters, digits, '_', '-' and '.'",
                ));
            }
            let mut spec = DatasetSpec::default();
            let mut files = Vec::new();
            for (k, fv) in self.table(dv, &dkey)?.iter() {
                let key = format!("{dkey}.{}", k.get_ref());
                let written = self.string(fv, &key)?;
                let path = self.dir.join(written);
                if k.get_ref() != "labels"
                    && !model.inputs.iter().any(|i| i == k.get_ref().as_ref())
                {
                    let mut known: Vec<&str> = model.inputs.iter().map(String::as_str).collect();
                    known.push("labels");
                    return Err(self.unknown_key(k, &key, &known));
                }
                self.existing_file(fv, &key, written, &path)?;
                files.push(ExternalFile {
                    role: format!("dataset.{}.{}", name.get_ref(), k.get_ref()),
                    path: path.clone(),
                    display: written.to_string(),
                });
                if k.get_ref() == "labels" {
                    spec.labels = Some(path);
                } else {
                    spec.tensors.insert(k.get_ref().to_string(), path);
                }
            }
            if spec.tensors.is_empty() {
                return Err(self.src.err(
                    dv.span(),
                    &dkey,
                    "a dataset maps at least one model input to a .npy file",
                ));
            }
            specs.insert(name.get_ref().to_string(), spec);
            all_files.insert(name.get_ref().to_string(), files);
        }
        Ok((specs, all_files))
    }

    // ---- [stages.*] ----

    fn stages(
        &self,
        v: &Value<'t>,
        datasets: &BTreeMap<String, DatasetSpec>,
        out_dir: &Path,
        allow_outside: bool,
    ) -> Result<Vec<RecipeStage>> {
        let mut protos = Vec::new();
        for (id, sv) in self.table(v, "stages")?.iter() {
            protos.push(self.proto(id, sv)?);
        }
        protos.sort_by_key(|p| p.table.span().start);
        let index: HashMap<&str, usize> = protos
            .iter()
            .enumerate()
            .map(|(i, p)| (p.id.as_str(), i))
            .collect();

        // Pass 1: build each combination once to learn its references.
        let mut combos: Vec<Vec<Vec<(String, Value<'t>)>>> = Vec::new();
        let mut refs: Vec<Vec<Vec<(String, String)>>> = Vec::new();
        let mut edges: Vec<(usize, usize, String, String)> = Vec::new();
        for (pi, p) in protos.iter().enumerate() {
            let cs = self.combinations(p)?;
            let mut proto_refs = Vec::new();
            for c in &cs {
                let own: BTreeMap<String, String> = c
                    .iter()
                    .map(|(k, v)| (k.clone(), scalar_text(v.get_ref())))
                    .collect();
                let table = self.instance_table(p, c, &own, false)?;
                let stage = self.build(p, &table)?;
                let deps = stage.deps();
                for (key, target) in &deps.stages {
                    let base = target.split('@').next().unwrap_or(target);
                    let Some(&ti) = index.get(base) else {
                        let span = table
                            .get(key.as_str())
                            .map(|v| v.span())
                            .unwrap_or(p.table.span());
                        let known: Vec<&str> = protos.iter().map(|p| p.id.as_str()).collect();
                        return Err(self.src.err(
                            span,
                            &format!("stages.{}.{key}", p.id),
                            format!("unknown stage '{target}' (stages: {})", known.join(", ")),
                        ));
                    };
                    edges.push((ti, pi, key.clone(), target.clone()));
                }
                proto_refs.push(deps.stages);
            }
            combos.push(cs);
            refs.push(proto_refs);
        }
        let order = self.topo_order(&protos, &edges)?;

        // Pass 2: expand in dependency order and build for good.
        let mut instances: Vec<Vec<Instance>> = (0..protos.len()).map(|_| Vec::new()).collect();
        let mut built: Vec<Vec<Built<'t>>> = (0..protos.len()).map(|_| Vec::new()).collect();
        let mut total = 0usize;
        for &pi in &order {
            let p = &protos[pi];
            for (c, crefs) in combos[pi].iter().zip(&refs[pi]) {
                let own: BTreeMap<Dim, String> = c
                    .iter()
                    .map(|(k, v)| ((pi, k.clone()), scalar_text(v.get_ref())))
                    .collect();
                let mut partial: Vec<Partial> = vec![(own, Vec::new())];
                for (key, target) in crefs {
                    let base = target.split('@').next().unwrap_or(target);
                    let Some(&ti) = index.get(base) else {
                        continue; // unreachable: pass 1 resolved every reference
                    };
                    let span = || {
                        p.table
                            .get_ref()
                            .get(key.as_str())
                            .map(|v| v.span())
                            .unwrap_or(p.table.span())
                    };
                    if base != target {
                        if !instances[ti].iter().any(|i| &i.name == target) {
                            let names: Vec<&str> =
                                instances[ti].iter().map(|i| i.name.as_str()).collect();
                            return Err(self.src.err(
                                span(),
                                &format!("stages.{}.{key}", p.id),
                                format!(
                                    "unknown stage variant '{target}' (variants: {})",
                                    names.join(", ")
                                ),
                            ));
                        }
                        continue;
                    }
                    let ups = &instances[ti];
                    if ups.len() == 1 && ups[0].variant.is_empty() {
                        continue;
                    }
                    let mut next = Vec::new();
                    for (variant, rewrites) in &partial {
                        for up in ups {
                            let compatible = up
                                .variant
                                .iter()
                                .all(|(d, v)| variant.get(d).is_none_or(|w| w == v));
                            if compatible {
                                let mut merged = variant.clone();
                                merged
                                    .extend(up.variant.iter().map(|(d, v)| (d.clone(), v.clone())));
                                let mut rw = rewrites.clone();
                                rw.push((key.clone(), up.name.clone()));
                                next.push((merged, rw));
                            }
                        }
                    }
                    partial = next;
                }
                for (variant, rewrites) in partial {
                    let name = if variant.is_empty() {
                        p.id.clone()
                    } else {
                        let values: Vec<&str> = variant.values().map(String::as_str).collect();
                        format!("{}@{}", p.id, values.join(","))
                    };
                    let mut by_key: BTreeMap<String, String> = BTreeMap::new();
                    let mut ambiguous: BTreeSet<String> = BTreeSet::new();
                    for ((_, k), v) in &variant {
                        if let Some(prev) = by_key.insert(k.clone(), v.clone()) {
                            if &prev != v {
                                ambiguous.insert(k.clone());
                            }
                        }
                    }
                    let mut table = self.instance_table(p, c, &BTreeMap::new(), true)?;
                    for (key, up_name) in &rewrites {
                        if let Some(v) = table.get_mut(key.as_str()) {
                            *v.get_mut() = DeValue::String(Cow::Owned(up_name.clone()));
                        }
                    }
                    self.substitute(p, &mut table, &by_key, &ambiguous)?;
                    let config = ConfigTable::new(Spanned::new(p.table.span(), table));
                    let stage = self.build_config(p, &config)?;
                    total += 1;
                    if total > MAX_STAGES {
                        return Err(self.src.err(
                            p.id_span.clone(),
                            &format!("stages.{}", p.id),
                            format!("the recipe expands to more than {MAX_STAGES} stages"),
                        ));
                    }
                    if built[pi].iter().any(|(i, _, _)| i.name == name) {
                        return Err(self.src.err(
                            p.id_span.clone(),
                            &format!("stages.{}", p.id),
                            format!("matrix values give two stages named '{name}'"),
                        ));
                    }
                    instances[pi].push(Instance {
                        name: name.clone(),
                        variant: variant.clone(),
                    });
                    built[pi].push((Instance { name, variant }, stage, config));
                }
            }
        }

        // Flatten in declaration order and resolve references, datasets and outputs.
        let mut stages: Vec<RecipeStage> = Vec::new();
        let mut configs: Vec<ConfigTable<'t>> = Vec::new();
        for (pi, list) in built.into_iter().enumerate() {
            for (inst, stage, config) in list {
                let deps = stage.deps();
                stages.push(RecipeStage {
                    id: inst.name,
                    kind: protos[pi].kind,
                    deps,
                    stage,
                    inputs: Vec::new(),
                    outputs: Vec::new(),
                    base_id: protos[pi].id.clone(),
                    variant: inst.variant.into_iter().map(|((_, k), v)| (k, v)).collect(),
                });
                configs.push(config);
            }
        }
        let by_name: HashMap<String, usize> = stages
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.clone(), i))
            .collect();
        let mut claimed: HashMap<PathBuf, String> = HashMap::new();
        for (i, config) in configs.iter().enumerate() {
            let base = stages[i].base_id.clone();
            let mut inputs = Vec::new();
            for (key, target) in &stages[i].deps.stages {
                let at = config.get(key).map(|v| v.span()).unwrap_or(config.span());
                let up = by_name.get(target).copied().ok_or_else(|| {
                    self.src.err(
                        at.clone(),
                        &format!("stages.{base}.{key}"),
                        format!("unknown stage '{target}'"),
                    )
                })?;
                if up == i {
                    return Err(self.src.err(
                        at,
                        &format!("stages.{base}.{key}"),
                        "a stage cannot read its own output",
                    ));
                }
                inputs.push((key.clone(), up));
            }
            for d in &stages[i].deps.datasets {
                if !datasets.contains_key(d) {
                    let (key, at) = config
                        .table()
                        .iter()
                        .find(|(_, v)| v.get_ref().as_str() == Some(d.as_str()))
                        .map(|(k, v)| (format!("stages.{base}.{}", k.get_ref()), v.span()))
                        .unwrap_or((format!("stages.{base}"), config.span()));
                    let known: Vec<&str> = datasets.keys().map(String::as_str).collect();
                    return Err(self.src.err(
                        at,
                        &key,
                        format!("unknown dataset '{d}' (datasets: {})", known.join(", ")),
                    ));
                }
            }
            let mut outputs = Vec::new();
            for (key, path) in &stages[i].deps.outputs {
                let at = config.get(key).map(|v| v.span()).unwrap_or(config.span());
                let full_key = format!("stages.{base}.{key}");
                let resolved = self.output_path(&at, &full_key, path, out_dir, allow_outside)?;
                if let Some(other) = claimed.insert(resolved.clone(), stages[i].id.clone()) {
                    let hint = if stages[i].variant.is_empty() {
                        String::new()
                    } else {
                        let k = stages[i].variant.keys().next().cloned().unwrap_or_default();
                        format!(" (use ${{{k}}} in the path to tell variants apart)")
                    };
                    return Err(self.src.err(
                        at,
                        &full_key,
                        format!(
                            "'{}' is also written by stage '{other}'{hint}",
                            fsutil::shorten(&path.display().to_string())
                        ),
                    ));
                }
                outputs.push((path.to_string_lossy().into_owned(), resolved));
            }
            stages[i].inputs = inputs;
            stages[i].outputs = outputs;
        }
        Ok(stages)
    }

    fn proto(&self, id: &Spanned<Cow<'t, str>>, sv: &Value<'t>) -> Result<Proto<'t>> {
        let key = format!("stages.{}", id.get_ref());
        if !is_simple_id(id.get_ref()) {
            return Err(self.src.err(
                id.span(),
                &key,
                "stage ids use letters, digits, '_', '-' and '.' ('@' is for matrix variants)",
            ));
        }
        let mut table = self.table(sv, &key)?.clone();
        if let Some((path, span, text)) = non_finite_float(&table) {
            return Err(self.src.err(
                span,
                &format!("{key}.{path}"),
                format!("{text} is not a finite number (NaN and infinities mean nothing in a stage setting)"),
            ));
        }
        let kind_v = table.remove("kind").ok_or_else(|| {
            self.src.err(
                sv.span(),
                &format!("{key}.kind"),
                "missing (the stage kind)",
            )
        })?;
        let kind = self.string(&kind_v, &format!("{key}.kind"))?;
        let factory = self
            .registry
            .iter()
            .find(|f| f.kind == kind)
            .ok_or_else(|| {
                let kinds: Vec<&str> = self.registry.iter().map(|f| f.kind).collect();
                self.src.err(
                    kind_v.span(),
                    &format!("{key}.kind"),
                    format!("unknown stage kind '{kind}' (kinds: {})", kinds.join(", ")),
                )
            })?;
        let mut matrix = Vec::new();
        if let Some(mv) = table.remove("matrix") {
            let mkey = format!("{key}.matrix");
            for (k, vals) in self.table(&mv, &mkey)?.iter() {
                let kk = format!("{mkey}.{}", k.get_ref());
                if matches!(k.get_ref().as_ref(), "kind" | "matrix") {
                    return Err(self
                        .src
                        .err(k.span(), &kk, "cannot vary the kind or the matrix"));
                }
                if table.contains_key(k.get_ref().as_ref()) {
                    return Err(self.src.err(
                        k.span(),
                        &kk,
                        "this key is also set outside the matrix",
                    ));
                }
                let arr = self.array(vals, &kk)?;
                if arr.is_empty() {
                    return Err(self.src.err(vals.span(), &kk, "give at least one value"));
                }
                for e in arr.iter() {
                    if !matches!(
                        e.get_ref(),
                        DeValue::String(_)
                            | DeValue::Integer(_)
                            | DeValue::Float(_)
                            | DeValue::Boolean(_)
                    ) {
                        return Err(self.src.err(
                            e.span(),
                            &kk,
                            "matrix values are strings, numbers or booleans",
                        ));
                    }
                }
                matrix.push((
                    k.get_ref().to_string(),
                    k.span(),
                    arr.iter().cloned().collect(),
                ));
            }
        }
        Ok(Proto {
            id: id.get_ref().to_string(),
            id_span: id.span(),
            kind: factory.kind,
            build: factory.build,
            table: Spanned::new(sv.span(), table),
            matrix,
        })
    }

    /// Every combination of a stage's matrix values (one empty combination without a matrix).
    fn combinations(&self, p: &Proto<'t>) -> Result<Vec<Vec<(String, Value<'t>)>>> {
        let mut out: Vec<Vec<(String, Value<'t>)>> = vec![Vec::new()];
        for (k, _, vals) in &p.matrix {
            if out.len().saturating_mul(vals.len()) > MAX_STAGES {
                return Err(self.src.err(
                    p.id_span.clone(),
                    &format!("stages.{}.matrix", p.id),
                    format!("more than {MAX_STAGES} combinations"),
                ));
            }
            out = out
                .into_iter()
                .flat_map(|c| {
                    vals.iter().map(move |v| {
                        let mut c = c.clone();
                        c.push((k.clone(), v.clone()));
                        c
                    })
                })
                .collect();
        }
        Ok(out)
    }

    /// The stage table with one matrix combination filled in. In the first pass
    /// (`final_pass == false`) `${key}` is replaced only for the stage's own matrix keys.
    fn instance_table(
        &self,
        p: &Proto<'t>,
        combo: &[(String, Value<'t>)],
        own: &BTreeMap<String, String>,
        final_pass: bool,
    ) -> Result<DeTable<'t>> {
        let mut table = p.table.get_ref().clone();
        for (k, v) in combo {
            let span = p
                .matrix
                .iter()
                .find(|(mk, _, _)| mk == k)
                .map(|m| m.1.clone())
                .unwrap_or(0..0);
            table.insert(Spanned::new(span, Cow::Owned(k.clone())), v.clone());
        }
        if !final_pass {
            substitute_known(&mut table, own);
        }
        Ok(table)
    }

    /// Replaces `${key}` in every string of an expanded stage's table.
    fn substitute(
        &self,
        p: &Proto<'t>,
        table: &mut DeTable<'t>,
        values: &BTreeMap<String, String>,
        ambiguous: &BTreeSet<String>,
    ) -> Result<()> {
        let mut stack: Vec<(String, &mut Value<'t>)> = Vec::new();
        for (k, v) in table.iter_mut() {
            stack.push((format!("stages.{}.{}", p.id, k.get_ref()), v));
        }
        while let Some((key, v)) = stack.pop() {
            let span = v.span();
            match v.get_mut() {
                DeValue::String(s) if s.contains("${") => {
                    let replaced = expand_placeholders(s, values, ambiguous)
                        .map_err(|m| self.src.err(span, &key, m))?;
                    *s = Cow::Owned(replaced);
                }
                DeValue::Array(a) => stack.extend(a.iter_mut().map(|e| (key.clone(), e))),
                DeValue::Table(t) => {
                    for (k, e) in t.iter_mut() {
                        stack.push((format!("{key}.{}", k.get_ref()), e));
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn build(&self, p: &Proto<'t>, table: &DeTable<'t>) -> Result<Box<dyn Stage>> {
        let config = ConfigTable::new(Spanned::new(p.table.span(), table.clone()));
        self.build_config(p, &config)
    }

    fn build_config(&self, p: &Proto<'t>, config: &ConfigTable<'t>) -> Result<Box<dyn Stage>> {
        (p.build)(config).map_err(|e| self.config_error(p, config, e))
    }

    fn config_error(&self, p: &Proto<'t>, config: &ConfigTable<'t>, e: ConfigError) -> Error {
        let span = e.span.clone().unwrap_or(config.span());
        let key = match &e.key {
            Some(k) => format!("stages.{}.{k}", p.id),
            None => match key_at(config.table(), span.start) {
                Some(path) => format!("stages.{}.{path}", p.id),
                None => format!("stages.{}", p.id),
            },
        };
        self.src.err(span, &key, &e.message)
    }

    fn topo_order(
        &self,
        protos: &[Proto<'t>],
        edges: &[(usize, usize, String, String)],
    ) -> Result<Vec<usize>> {
        let mut g: DiGraph<usize, usize> = DiGraph::new();
        let nodes: Vec<_> = (0..protos.len()).map(|i| g.add_node(i)).collect();
        for (ei, (from, to, _, _)) in edges.iter().enumerate() {
            g.add_edge(nodes[*from], nodes[*to], ei);
        }
        match petgraph::algo::toposort(&g, None) {
            Ok(order) => Ok(order.into_iter().map(|n| g[n]).collect()),
            Err(_) => {
                let cycle = super::dag::find_cycle(&g).unwrap_or_default();
                let names: Vec<&str> = cycle.iter().map(|&n| protos[g[n]].id.as_str()).collect();
                // Report at the reference that closes the cycle.
                let first = cycle.first().map(|&n| g[n]).unwrap_or(0);
                let last = cycle.last().map(|&n| g[n]).unwrap_or(0);
                let (_, to, key, _) = edges
                    .iter()
                    .find(|(f, t, _, _)| *f == last && *t == first)
                    .or_else(|| edges.first())
                    .cloned()
                    .unwrap_or((0, 0, String::new(), String::new()));
                let p = &protos[to];
                let span = p
                    .table
                    .get_ref()
                    .get(key.as_str())
                    .map(|v| v.span())
                    .unwrap_or(p.table.span());
                let mut path = names.join(" → ");
                if let Some(f) = names.first() {
                    path.push_str(&format!(" → {f}"));
                }
                Err(self.src.err(
                    span,
                    &format!("stages.{}.{key}", p.id),
                    format!("dependency cycle: {path}"),
                ))
            }
        }
    }

    fn output_path(
        &self,
        at: &Range<usize>,
        key: &str,
        path: &Path,
        out_dir: &Path,
        allow_outside: bool,
    ) -> Result<PathBuf> {
        if path.as_os_str().is_empty() {
            return Err(self.src.err(at.clone(), key, "the output path is empty"));
        }
        let escapes = path.is_absolute()
            || path.components().any(|c| {
                matches!(
                    c,
                    Component::ParentDir | Component::RootDir | Component::Prefix(_)
                )
            });
        if escapes && !allow_outside {
            return Err(self.src.err(
                at.clone(),
                key,
                format!(
                    "'{}' is outside out_dir (absolute or with '..'); set allow_outside_out_dir = true in [pipeline] to allow it",
                    fsutil::shorten(&path.display().to_string())
                ),
            ));
        }
        let mut resolved = out_dir.to_path_buf();
        for c in path.components() {
            match c {
                Component::CurDir => {}
                Component::ParentDir => {
                    resolved.pop();
                }
                other => resolved.push(other.as_os_str()),
            }
        }
        if resolved == out_dir {
            return Err(self
                .src
                .err(at.clone(), key, "the output path names out_dir itself"));
        }
        Ok(resolved)
    }
}

/// The dotted key path (inside `table`) whose key or value contains `offset`.
fn key_at(table: &DeTable<'_>, offset: usize) -> Option<String> {
    let mut best: Option<String> = None;
    let mut stack: Vec<(String, &Value<'_>)> = Vec::new();
    for (k, v) in table.iter() {
        if k.span().contains(&offset) {
            return Some(k.get_ref().to_string());
        }
        stack.push((k.get_ref().to_string(), v));
    }
    while let Some((path, v)) = stack.pop() {
        if !v.span().contains(&offset) {
            continue;
        }
        best = Some(path.clone());
        if let DeValue::Table(t) = v.get_ref() {
            for (k, e) in t.iter() {
                let p = format!("{path}.{}", k.get_ref());
                if k.span().contains(&offset) {
                    return Some(p);
                }
                stack.push((p, e));
            }
        }
    }
    best
}

/// How a matrix value appears in stage names and `${key}`.
fn scalar_text(v: &DeValue<'_>) -> String {
    match v {
        DeValue::String(s) => s.to_string(),
        DeValue::Integer(i) => i.to_string(),
        DeValue::Float(f) => f.to_string(),
        DeValue::Boolean(b) => b.to_string(),
        other => other.type_str().to_string(),
    }
}

/// `${key}` → value for the given keys, leaving other placeholders alone.
fn substitute_known(table: &mut DeTable<'_>, values: &BTreeMap<String, String>) {
    if values.is_empty() {
        return;
    }
    let mut stack: Vec<&mut Value<'_>> = table.iter_mut().map(|(_, v)| v).collect();
    while let Some(v) = stack.pop() {
        match v.get_mut() {
            DeValue::String(s) if s.contains("${") => {
                let mut out = s.to_string();
                for (k, val) in values {
                    out = out.replace(&format!("${{{k}}}"), val);
                }
                *s = Cow::Owned(out);
            }
            DeValue::Array(a) => stack.extend(a.iter_mut()),
            DeValue::Table(t) => stack.extend(t.iter_mut().map(|(_, v)| v)),
            _ => {}
        }
    }
}

fn expand_placeholders(
    s: &str,
    values: &BTreeMap<String, String>,
    ambiguous: &BTreeSet<String>,
) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unclosed '${{' in '{s}'"))?;
        let name = &after[..end];
        if ambiguous.contains(name) {
            return Err(format!(
                "'${{{name}}}' is ambiguous: two matrices vary '{name}' for this stage"
            ));
        }
        let v = values.get(name).ok_or_else(|| {
            if values.is_empty() {
                format!("'${{{name}}}' used, but no matrix applies to this stage")
            } else {
                let known: Vec<&str> = values.keys().map(String::as_str).collect();
                format!(
                    "'${{{name}}}' is not a matrix key of this stage (keys: {})",
                    known.join(", ")
                )
            }
        })?;
        out.push_str(v);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
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
