//! The `[model]` table: a checkpoint prefix or a frozen graph, its inputs, outputs and
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
