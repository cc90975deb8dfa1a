//! The `[model]` table: a checkpoint prefix, a frozen graph or a SavedModel, its inputs, outputs and
//! input shapes, and the model files that feed the cache keys.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{ExternalFile, Parser, Value};
use crate::error::Result;
use crate::spec::{ModelSource, ModelSpec};

impl<'s, 't> Parser<'s, 't> {
    pub(super) fn model(&self, v: &Value<'t>) -> Result<(ModelSpec, Vec<ExternalFile>)> {
        let t = self.table(v, "model")?;
        let mut source: Option<(ModelSource, Vec<ExternalFile>)> = None;
        let mut source_key: Option<&str> = None;
        let mut inputs = None;
        let mut outputs = None;
        let mut shapes_v = None;
        let mut signature: Option<(String, &Value<'t>)> = None;
        let mut tags: Option<(Vec<String>, &Value<'t>)> = None;
        for (k, val) in t.iter() {
            let key = format!("model.{}", k.get_ref());
            match k.get_ref().as_ref() {
                kind @ ("checkpoint" | "graph" | "saved_model") => {
                    if let Some(prev) = source_key {
                        return Err(self.src.err(
                            k.span(),
                            &key,
                            format!(
                                "give exactly one of checkpoint, graph and saved_model \
                                 ({prev} is already given)"
                            ),
                        ));
                    }
                    source_key = Some(kind);
                    let written = self.string(val, &key)?;
                    let lower = written.to_ascii_lowercase();
                    if lower.ends_with(".keras") || lower.ends_with(".h5") {
                        return Err(self.src.err(
                            val.span(),
                            &key,
                            format!(
                                "'{written}' is a Keras file, which qpipe does not read; run \
                                 `model.export(\"DIR\")` in Python and set saved_model = \"DIR\""
                            ),
                        ));
                    }
                    let path = self.dir.join(written);
                    source = Some(match kind {
                        "graph" => {
                            self.existing_file(val, &key, written, &path)?;
                            let f = ExternalFile {
                                role: "model.graph".into(),
                                path: path.clone(),
                                display: written.to_string(),
                            };
                            (ModelSource::Graph(path), vec![f])
                        }
                        "checkpoint" => {
                            let files = self.checkpoint_files(val, &key, written, &path)?;
                            (ModelSource::Checkpoint(path), files)
                        }
                        _ => {
                            let files = self.saved_model_files(val, &key, written, &path)?;
                            let src = ModelSource::SavedModel {
                                dir: path,
                                signature: String::new(),
                                tags: Vec::new(),
                            };
                            (src, files)
                        }
                    });
                }
                "signature" => signature = Some((self.string(val, &key)?.to_string(), val)),
                "tags" => {
                    let list = self.strings(val, &key)?;
                    if list.is_empty() {
                        return Err(self.src.err(val.span(), &key, "name at least one tag"));
                    }
                    tags = Some((list, val));
                }
                "inputs" => inputs = Some((self.strings(val, &key)?, val)),
                "outputs" => {
                    let o = self.strings(val, &key)?;
                    if o.is_empty() {
                        return Err(self.src.err(val.span(), &key, "name at least one output"));
                    }
                    outputs = Some((o, val));
                }
                "input_shapes" => shapes_v = Some(val),
                _ => {
                    return Err(self.unknown_key(
                        k,
                        &key,
                        &[
                            "checkpoint",
                            "graph",
                            "saved_model",
                            "signature",
                            "tags",
                            "inputs",
                            "outputs",
                            "input_shapes",
                        ],
                    ))
                }
            }
        }
        let Some((mut source, files)) = source else {
            return Err(self.src.err(
                v.span(),
                "model",
                "set one of checkpoint (a checkpoint prefix), graph (a .pb file) or \
                 saved_model (a SavedModel directory)",
            ));
        };
        let (inputs, outputs) = if let ModelSource::SavedModel {
            dir,
            signature: sig_name,
            tags: tag_set,
        } = &mut source
        {
            *sig_name = signature.as_ref().map_or_else(
                || crate::formats::tf::saved_model::DEFAULT_SIGNATURE.to_string(),
                |(s, _)| s.clone(),
            );
            *tag_set = tags.as_ref().map_or_else(
                || {
                    crate::formats::tf::saved_model::DEFAULT_TAGS
                        .iter()
                        .map(|t| t.to_string())
                        .collect()
                },
                |(t, _)| t.clone(),
            );
            let at = signature.as_ref().map_or(v.span(), |(_, val)| val.span());
            let sig = crate::formats::tf::saved_model::read_signature(dir, tag_set, sig_name)
                .map_err(|e| self.src.err(at, "model.signature", e.to_string()))?;
            let pick = |given: Option<(Vec<String>, &Value<'t>)>,
                        all: Vec<String>,
                        what: &str|
             -> Result<Vec<String>> {
                let Some((names, val)) = given else {
                    return Ok(all);
                };
                if let Some(bad) = names.iter().find(|n| !all.contains(n)) {
                    return Err(self.src.err(
                        val.span(),
                        &format!("model.{what}"),
                        format!("'{bad}' is not one of signature '{sig_name}''s {what} {all:?}"),
                    ));
                }
                Ok(names)
            };
            let ins = pick(
                inputs,
                sig.inputs.iter().map(|t| t.key.clone()).collect(),
                "inputs",
            )?;
            let outs = pick(
                outputs,
                sig.outputs.iter().map(|t| t.key.clone()).collect(),
                "outputs",
            )?;
            (ins, outs)
        } else {
            let extra = [
                signature
                    .as_ref()
                    .map(|(_, val)| (val.span(), "model.signature")),
                tags.as_ref().map(|(_, val)| (val.span(), "model.tags")),
            ];
            if let Some((span, key)) = extra.into_iter().flatten().next() {
                return Err(self.src.err(span, key, "only a saved_model has this key"));
            }
            let inputs = inputs.map(|(i, _)| i).ok_or_else(|| {
                self.src.err(
                    v.span(),
                    "model.inputs",
                    "missing (the model's input names)",
                )
            })?;
            let outputs = outputs.map(|(o, _)| o).ok_or_else(|| {
                self.src.err(
                    v.span(),
                    "model.outputs",
                    "missing (the model's output names)",
                )
            })?;
            (inputs, outputs)
        };
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

    /// `DIR/saved_model.pb` and every file under `DIR/variables/` (the freeze reads
    /// neither `assets/` nor `fingerprint.pb`).
    pub(super) fn saved_model_files(
        &self,
        v: &Value<'t>,
        key: &str,
        written: &str,
        dir: &Path,
    ) -> Result<Vec<ExternalFile>> {
        if !dir.is_dir() {
            return Err(self.src.err(
                v.span(),
                key,
                format!("'{written}' is not a directory (a SavedModel is one)"),
            ));
        }
        let pb = dir.join("saved_model.pb");
        let w = format!("{written}/saved_model.pb");
        self.existing_file(v, key, &w, &pb)?;
        let mut files = vec![ExternalFile {
            role: "model.saved_model.pb".into(),
            path: pb,
            display: w,
        }];
        let vars = dir.join("variables");
        if vars.is_dir() {
            let mut found = Vec::new();
            for e in walkdir::WalkDir::new(&vars).sort_by_file_name() {
                let e = e.map_err(|e| {
                    self.src.err(
                        v.span(),
                        key,
                        format!("cannot list '{written}/variables': {e}"),
                    )
                })?;
                if e.file_type().is_file() {
                    found.push(e.into_path());
                }
            }
            for path in found {
                let rel = path.strip_prefix(dir).unwrap_or(&path).to_string_lossy();
                let w = format!("{written}/{rel}");
                files.push(ExternalFile {
                    role: format!("model.{rel}"),
                    path: path.clone(),
                    display: w,
                });
            }
        }
        Ok(files)
    }

    /// `<prefix>.meta`, `<prefix>.index` and every `<prefix>.data-NNNNN-of-MMMMM`.
    pub(super) fn checkpoint_files(
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
}
