//! Why a stage is stale: the first difference between the manifest a stage last used
//! and the one it has now, in the order the key is built (tool, kind, config, model
//! settings, files, upstream artifacts).

use std::fmt;

use serde_json::Value;

use super::fingerprint::Manifest;
use super::store::short;

#[derive(Debug, Clone, PartialEq)]
pub enum DirtyReason {
    /// No cached result and no record of an earlier run of this stage.
    NeverRan,
    ToolVersion {
        old: String,
        new: String,
    },
    KindChanged {
        old: String,
        new: String,
    },
    KindVersion {
        old: u32,
        new: u32,
    },
    ConfigChanged {
        key: String,
        old: String,
        new: String,
    },
    ModelSettingChanged {
        key: String,
        old: String,
        new: String,
    },
    FileChanged {
        path: String,
        old: String,
        new: String,
    },
    FileAdded {
        path: String,
    },
    FileRemoved {
        path: String,
    },
    UpstreamChanged {
        key: String,
        stage: String,
        old: String,
        new: String,
    },
    InputAdded {
        key: String,
        stage: String,
    },
    InputRemoved {
        key: String,
    },
    /// Same manifest as last time, but the entry is gone (removed by `cache gc`, or never stored).
    EntryMissing,
    /// The cached entry exists but cannot be used.
    EntryCorrupt(String),
    /// An upstream stage must run first; this stage's key depends on its output.
    UpstreamStale {
        stage: String,
    },
}

impl fmt::Display for DirtyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use DirtyReason::*;
        match self {
            NeverRan => write!(f, "never ran"),
            ToolVersion { old, new } => write!(f, "qpipe version changed ({old} → {new})"),
            KindChanged { old, new } => write!(f, "stage kind changed ({old} → {new})"),
            KindVersion { old, new } => {
                write!(f, "stage implementation version changed ({old} → {new})")
            }
            ConfigChanged { key, old, new } => match key
                .strip_prefix(super::fingerprint::OUTPUTS_KEY)
                .and_then(|k| k.strip_prefix('.'))
            {
                Some(output) => write!(f, "output path of '{output}' changed ({old} → {new})"),
                None => write!(f, "config key '{key}' changed ({old} → {new})"),
            },
            ModelSettingChanged { key, old, new } => {
                write!(f, "[model] {key} changed ({old} → {new})")
            }
            FileChanged { path, old, new } => {
                write!(
                    f,
                    "input file {path} changed (blake3 {} → {})",
                    short(old),
                    short(new)
                )
            }
            FileAdded { path } => write!(f, "now reads file {path}"),
            FileRemoved { path } => write!(f, "no longer reads file {path}"),
            UpstreamChanged {
                key,
                stage,
                old,
                new,
            } => write!(
                f,
                "upstream stage '{stage}' ({key}) changed its output (blake3 {} → {})",
                short(old),
                short(new)
            ),
            InputAdded { key, stage } => write!(f, "now reads stage '{stage}' ({key})"),
            InputRemoved { key } => write!(f, "no longer reads '{key}'"),
            EntryMissing => write!(
                f,
                "cached result is gone (garbage-collected or never stored)"
            ),
            EntryCorrupt(why) => write!(f, "cached result is unusable ({why})"),
            UpstreamStale { stage } => write!(
                f,
                "upstream stage '{stage}' is stale (this stage reruns only if '{stage}' changes its output)"
            ),
        }
    }
}

/// The first difference between `old` (last used) and `new`.
pub fn diff(old: &Manifest, new: &Manifest) -> DirtyReason {
    use DirtyReason::*;
    if old.qpipe != new.qpipe || old.format != new.format {
        return ToolVersion {
            old: old.qpipe.clone(),
            new: new.qpipe.clone(),
        };
    }
    if old.kind != new.kind {
        return KindChanged {
            old: old.kind.clone(),
            new: new.kind.clone(),
        };
    }
    if old.kind_version != new.kind_version {
        return KindVersion {
            old: old.kind_version,
            new: new.kind_version,
        };
    }
    // The config as written first; the output paths it implies only when nothing else differs.
    let mut skip = new.inputs_keys();
    skip.push(super::fingerprint::OUTPUTS_KEY.to_string());
    let config_diff = first_difference(&old.config, &new.config, &skip)
        .or_else(|| first_difference(&old.config, &new.config, &new.inputs_keys()));
    if let Some((key, o, n)) = config_diff {
        return ConfigChanged {
            key,
            old: o,
            new: n,
        };
    }
    if let Some((key, o, n)) = first_difference(&old.model_io, &new.model_io, &[]) {
        return ModelSettingChanged {
            key,
            old: o,
            new: n,
        };
    }
    for (role, f) in &new.files {
        match old.files.get(role) {
            None => {
                return FileAdded {
                    path: f.path.clone(),
                }
            }
            Some(o) if o.blake3 != f.blake3 || o.size != f.size => {
                return FileChanged {
                    path: f.path.clone(),
                    old: o.blake3.clone(),
                    new: f.blake3.clone(),
                }
            }
            Some(_) => {}
        }
    }
    if let Some((_, o)) = old.files.iter().find(|(r, _)| !new.files.contains_key(*r)) {
        return FileRemoved {
            path: o.path.clone(),
        };
    }
    for (key, i) in &new.inputs {
        match old.inputs.get(key) {
            None => {
                return InputAdded {
                    key: key.clone(),
                    stage: i.stage.clone(),
                }
            }
            Some(o) if o.blake3 != i.blake3 || o.artifact_kind != i.artifact_kind => {
                return UpstreamChanged {
                    key: key.clone(),
                    stage: i.stage.clone(),
                    old: o.blake3.clone(),
                    new: i.blake3.clone(),
                }
            }
            Some(_) => {}
        }
    }
    if let Some((key, _)) = old
        .inputs
        .iter()
        .find(|(k, _)| !new.inputs.contains_key(*k))
    {
        return InputRemoved { key: key.clone() };
    }
    EntryMissing
}

impl Manifest {
    fn inputs_keys(&self) -> Vec<String> {
        self.inputs.keys().cloned().collect()
    }
}

/// The first differing key path between two JSON values, with both sides rendered.
/// Top-level keys in `skip` (references to upstream stages, which are compared by
/// artifact instead) are ignored.
fn first_difference(old: &Value, new: &Value, skip: &[String]) -> Option<(String, String, String)> {
    let mut stack: Vec<(String, Option<&Value>, Option<&Value>)> =
        vec![(String::new(), Some(old), Some(new))];
    while let Some((path, o, n)) = stack.pop() {
        match (o, n) {
            (Some(Value::Object(a)), Some(Value::Object(b))) => {
                let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
                keys.sort();
                keys.dedup();
                for k in keys.into_iter().rev() {
                    if path.is_empty() && skip.contains(k) {
                        continue;
                    }
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    stack.push((p, a.get(k), b.get(k)));
                }
            }
            (o, n) if o != n => {
                let render =
                    |v: Option<&Value>| v.map(|v| v.to_string()).unwrap_or_else(|| "unset".into());
                let key = if path.is_empty() {
                    "(whole config)".to_string()
                } else {
                    path
                };
                return Some((key, render(o), render(n)));
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::fingerprint::{FileDigest, InputDigest, KEY_FORMAT};
    use serde_json::json;
    use std::collections::BTreeMap;

    fn m() -> Manifest {
        let mut inputs = BTreeMap::new();
        inputs.insert(
            "input".into(),
            InputDigest {
                stage: "strip".into(),
                artifact_kind: "graph".into(),
                blake3: "a".repeat(64),
            },
        );
        let mut files = BTreeMap::new();
        files.insert(
            "dataset.calib.x".into(),
            FileDigest {
                path: "calib_x.npy".into(),
                size: 4,
                blake3: "b".repeat(64),
            },
        );
        Manifest {
            format: KEY_FORMAT,
            qpipe: "0.1.0".into(),
            kind: "quantize_int8".into(),
            kind_version: 1,
            config: json!({"input": "strip", "strategy": "DEFAULT", "opts": {"n": 1}}),
            model_io: json!({"inputs": ["x"]}),
            inputs,
            files,
        }
    }

    #[test]
    fn reports_the_first_difference_by_field() {
        let mut n = m();
        n.config["opts"]["n"] = json!(2);
        n.files.values_mut().for_each(|f| f.blake3 = "c".repeat(64));
        assert_eq!(
            diff(&m(), &n).to_string(),
            "config key 'opts.n' changed (1 → 2)",
            "config comes before files"
        );
        let mut n = m();
        n.files.values_mut().for_each(|f| f.blake3 = "c".repeat(64));
        assert!(diff(&m(), &n)
            .to_string()
            .starts_with("input file calib_x.npy changed (blake3 bbbbbbbbbbbb → cccccccccccc)"));
        let mut n = m();
        n.inputs
            .values_mut()
            .for_each(|i| i.blake3 = "d".repeat(64));
        assert!(
            matches!(diff(&m(), &n), DirtyReason::UpstreamChanged { ref stage, .. } if stage == "strip")
        );
        let mut n = m();
        n.config["strategy"] = json!("OPTIMIZE_FOR_SIZE");
        assert_eq!(
            diff(&m(), &n).to_string(),
            "config key 'strategy' changed (\"DEFAULT\" → \"OPTIMIZE_FOR_SIZE\")"
        );
        let mut n = m();
        n.config.as_object_mut().unwrap().remove("strategy");
        assert_eq!(
            diff(&m(), &n).to_string(),
            "config key 'strategy' changed (\"DEFAULT\" → unset)"
        );
        assert_eq!(diff(&m(), &m()), DirtyReason::EntryMissing);
        let mut n = m();
        n.kind_version = 2;
        assert_eq!(diff(&m(), &n), DirtyReason::KindVersion { old: 1, new: 2 });
    }

    #[test]
    fn a_renamed_upstream_is_not_a_config_change() {
        let mut n = m();
        n.config["input"] = json!("strip2");
        n.inputs
            .values_mut()
            .for_each(|i| i.stage = "strip2".into());
        assert_eq!(diff(&m(), &n), DirtyReason::EntryMissing);
    }
}
