//! The `[datasets.*]` tables: each model input's `.npy` file and optional labels.

use std::collections::BTreeMap;

use super::{ExternalFile, Parser, Value};
use crate::error::Result;
use crate::pipeline::recipe_check::is_simple_id;
use crate::spec::{DatasetSpec, ModelSpec};

impl<'s, 't> Parser<'s, 't> {
    #[allow(clippy::type_complexity)]
    pub(super) fn datasets(
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
}
