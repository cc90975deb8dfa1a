//! Stage fingerprints: the cache key, and what it must cover for a cached result to be
//! as good as a fresh one.
//!
//! # The rule
//!
//! A stage is a pure function of (a) its implementation, (b) its typed config, (c) the
//! artifacts of the stages it names and (d) the external files it declares
//! ([`crate::stages::StageDeps`]). The key is a blake3 hash over exactly those four,
//! written down first as a [`Manifest`] — a small, inspectable JSON record stored next
//! to every cache entry — and then hashed in a canonical binary form. Anything a stage
//! can observe must be in the manifest, or a stale result would be handed back as fresh,
//! which is the one bug a build tool must not have. Conversely anything in the
//! manifest that the stage cannot observe only costs needless rebuilds.
//!
//! # What goes in, and how
//!
//! * `format` and `qpipe` (the crate version): a new qpipe may produce different bytes
//!   from the same inputs, so an upgrade invalidates everything (as ruff puts its
//!   version in the cache path). The store layout carries its own version (`v1/`).
//! * `kind` and `kind_version` ([`crate::stages::Stage::version`]): bumped by a stage
//!   author whenever outputs may change for the same inputs.
//! * `config`: [`crate::stages::Stage::config`], i.e. the *typed* config after serde
//!   defaults, so `strategy = "DEFAULT"` written out or left to its default give the
//!   same key, and a key order or whitespace change in the recipe gives the same key.
//!   Values are hashed canonically (below): maps sorted, floats by their bits. Config
//!   values naming upstream stages are hashed as a placeholder, because what the
//!   stage sees of its upstream is the artifact, which is hashed on its own: renaming
//!   a stage (or a matrix variant's `ID@value` name) rebuilds nothing. Export paths are
//!   config, relative to `out_dir`; `out_dir` itself is not in the key (outputs are
//!   restored wherever `out_dir` now points). The declared output paths are added to
//!   the config under `$outputs` ([`config_with_outputs`]), since a default path may
//!   derive from an upstream stage's name.
//! * `model_io`: the `[model]` inputs, outputs and input shapes, for every stage. Every
//!   stage receives them in its context; hashing them for all is cheap and safe.
//! * `inputs`: for each config key naming an upstream stage, the blake3 of the upstream
//!   **artifact's bytes** (its IR serialization, or canonical JSON for a report), not
//!   the upstream's key. See "early cut-off".
//! * `files`: the content hash and size of every external file the stage declared:
//!   all model files for `deps().model` (checkpoint `.meta`, `.index` and every
//!   `.data-NNNNN-of-MMMMM` shard, or the `.pb`), and every file of each dataset in
//!   `deps().datasets`. Files are named by role (`model.index`,
//!   `dataset.calib.input_x`), never by absolute path, so moving the project or the
//!   cache to another machine keeps keys stable; the recipe-relative path is kept in
//!   the manifest for explanations only. Undeclared files are invisible to the stage:
//!   the context holds only the declared datasets, and a stage without
//!   `deps().model` gets a model spec with no source path.
//!
//! Not in the key: absolute paths, mtimes, the machine, `--jobs`, the environment.
//! Stages read no environment variables, so there is no env allow-list to hash.
//!
//! # Canonical hashing
//!
//! [`hash_value`] feeds a `serde_json::Value` to blake3 with a type tag before every
//! item and a length before every string, array and map, maps in sorted key order,
//! integers as little-endian i64/u64 and floats by `f64::to_bits` (so `0.1` is exactly
//! `0.1`, and `-0.0` differs from `0.0`, as it may for a stage). `std::hash::Hash` is
//! never used: it is neither stable across releases nor meant for persistence.
//!
//! # Early cut-off: yes
//!
//! Downstream keys cover the upstream artifact's content hash. When a change upstream
//! (a touched config key, a re-saved checkpoint with identical tensors) reruns a stage
//! but it produces the same bytes as before, every stage below it keeps its key and is
//! served from the cache. The price: `qpipe status` cannot know a downstream key while
//! an upstream stage is stale, so it reports such stages as stale "because upstream X
//! is stale" (a rerun may then find them cached). This needs artifacts to be
//! deterministic, which the IR serialization is by construction (ordered attributes,
//! nodes in graph order). If a stage is nondeterministic, cut-off merely fails to
//! apply; correctness does not depend on it.
//!
//! # External files: content, with a stat cache that cannot lie
//!
//! Hashing a several-hundred-MB checkpoint on every no-op run would be slow, so
//! [`super::filehash`] reuses a file's hash while its (size, mtime, ctime, inode,
//! device) are unchanged, persisted in the cache directory. Two rules make that safe:
//!
//! * ctime is part of the stamp. Tools can set mtime back (`touch -r`, `rsync -t`,
//!   archive extraction) but not ctime, and any write updates it.
//! * Racily clean files are never trusted. File times are coarse (the kernel's coarse
//!   clock, 1 s on some filesystems, 2 s on FAT): a file written again within the same
//!   tick as it was hashed keeps its stamp. As in git's racy-git handling and cargo's
//!   mtime checks, a hash is only remembered when the file's mtime and ctime are at least
//!   two seconds older than the moment hashing began; a younger file is rehashed on
//!   every run until it ages. A file is stat'ed before and after hashing, and hashed
//!   again if it changed meanwhile.
//!
//! `touch` without a change therefore costs one rehash and reruns nothing, and any
//! changed byte is always detected. A file can still change *while a stage reads it*;
//! so after a stage runs, its files are checked again (stat, and a rehash for files too
//! young to trust), and if any changed the result is not cached and the stage fails
//! (the lesson of bazel#3360, where such a race poisoned a shared cache).
//!
//! # From key to result
//!
//! The store ([`super::store`]) maps a key to an action entry naming the blobs of the
//! artifact and the output files. An entry is published only after the stage succeeded
//! and all its blobs are durable; a hit re-checks the entry's own checksum, that the
//! key recomputed from its stored manifest is the key looked up, and the blobs. Each
//! `(pipeline, stage)` also keeps a ref to the manifest it last used: `qpipe status`
//! and `run -v` explain a miss by diffing the new manifest against it, field by field
//! in the order above ([`super::explain`]); `cache gc` keeps what the refs reach.
//!
//! # Memo
//!
//! A stage may cache intermediate values ([`crate::stages::Memo`]) under a key it
//! builds from the settings the value depends on. The store prefixes that with
//! [`Manifest::memo_base`]: everything in the manifest except the config, so the
//! stage's declared key only needs to cover its own settings, never its inputs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Bumped whenever the manifest or its hashing changes meaning.
pub const KEY_FORMAT: u32 = 1;

/// The config entry holding a stage's declared output paths (a leading `$` cannot
/// come from a typed config: [`super::canon`] doubles it).
pub const OUTPUTS_KEY: &str = "$outputs";

/// A stage's config with its declared output paths (relative to `out_dir`) under
/// [`OUTPUTS_KEY`]. A default output path may follow an upstream stage's name (validate's
/// `<candidate>.layers.json`), which the key otherwise hashes as a placeholder; without
/// this a rename kept the key and the cached entry's outputs no longer matched.
pub fn config_with_outputs(config: Value, outputs: &[(String, std::path::PathBuf)]) -> Value {
    match config {
        Value::Object(mut map) if !outputs.is_empty() => {
            let paths: serde_json::Map<String, Value> = outputs
                .iter()
                .map(|(k, p)| (k.clone(), Value::String(p.to_string_lossy().into_owned())))
                .collect();
            map.insert(OUTPUTS_KEY.into(), Value::Object(paths));
            Value::Object(map)
        }
        other => other,
    }
}

/// Hashed in place of a config value that names an upstream stage.
const STAGE_REF_PLACEHOLDER: &str = "<upstream stage>";

/// Everything a stage's result depends on, as recorded in the cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub qpipe: String,
    pub kind: String,
    pub kind_version: u32,
    pub config: Value,
    pub model_io: Value,
    /// Config key → the upstream artifact it names.
    pub inputs: BTreeMap<String, InputDigest>,
    /// Role → external file.
    pub files: BTreeMap<String, FileDigest>,
}

/// An upstream artifact as a stage sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputDigest {
    /// The upstream stage's id (for explanations; not hashed).
    pub stage: String,
    /// `graph` or `report`.
    pub artifact_kind: String,
    pub blake3: String,
}

/// An external file as a stage sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDigest {
    /// Relative to the recipe directory (for explanations; not hashed).
    pub path: String,
    pub size: u64,
    pub blake3: String,
}

impl Manifest {
    /// The cache key: 64 hex digits.
    pub fn key(&self) -> String {
        let mut h = blake3::Hasher::new();
        h.update(b"qpipe stage key\0");
        self.hash_common(&mut h);
        hash_value(&mut h, &self.hashed_config());
        h.finalize().to_hex().to_string()
    }

    /// The prefix of every memo key of this stage: the manifest without the config.
    pub fn memo_base(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(b"qpipe memo base\0");
        self.hash_common(&mut h);
        *h.finalize().as_bytes()
    }

    fn hash_common(&self, h: &mut blake3::Hasher) {
        let inputs: serde_json::Map<String, Value> = self
            .inputs
            .iter()
            .map(|(k, d)| {
                let v = serde_json::json!({"kind": d.artifact_kind, "blake3": d.blake3});
                (k.clone(), v)
            })
            .collect();
        let files: serde_json::Map<String, Value> = self
            .files
            .iter()
            .map(|(k, f)| {
                let v = serde_json::json!({"size": f.size, "blake3": f.blake3});
                (k.clone(), v)
            })
            .collect();
        let common = serde_json::json!({
            "format": self.format,
            "qpipe": self.qpipe,
            "kind": self.kind,
            "kind_version": self.kind_version,
            "model_io": self.model_io,
            "inputs": inputs,
            "files": files,
        });
        hash_value(h, &common);
    }

    /// The config with values naming upstream stages replaced by a placeholder.
    fn hashed_config(&self) -> Value {
        let mut config = self.config.clone();
        for (key, input) in &self.inputs {
            // A key may be a dotted path into a sub-table (`fallback.reference`).
            let v = key
                .split('.')
                .try_fold(&mut config, |v, k| v.as_object_mut()?.get_mut(k));
            if let Some(v) = v {
                if v.as_str() == Some(input.stage.as_str()) {
                    *v = Value::String(STAGE_REF_PLACEHOLDER.into());
                }
            }
        }
        config
    }
}

/// Feeds `v` to `h` canonically: tagged, length-prefixed, maps sorted, floats by bits.
pub fn hash_value(h: &mut blake3::Hasher, v: &Value) {
    fn len(h: &mut blake3::Hasher, n: usize) {
        h.update(&(n as u64).to_le_bytes());
    }
    fn string(h: &mut blake3::Hasher, s: &str) {
        len(h, s.len());
        h.update(s.as_bytes());
    }
    // An explicit stack keeps the depth of recursion independent of the input.
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        match v {
            Value::Null => {
                h.update(b"n");
            }
            Value::Bool(b) => {
                h.update(&[b'b', *b as u8]);
            }
            Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    h.update(b"i");
                    h.update(&i.to_le_bytes());
                } else if let Some(u) = n.as_u64() {
                    h.update(b"u");
                    h.update(&u.to_le_bytes());
                } else {
                    h.update(b"f");
                    h.update(&n.as_f64().unwrap_or(f64::NAN).to_bits().to_le_bytes());
                }
            }
            Value::String(s) => {
                h.update(b"s");
                string(h, s);
            }
            Value::Array(items) => {
                h.update(b"a");
                len(h, items.len());
                stack.extend(items.iter().rev());
            }
            Value::Object(map) => {
                h.update(b"o");
                len(h, map.len());
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                // Keys are hashed up front; values follow in the same order via the stack.
                for (k, _) in &entries {
                    string(h, k);
                }
                stack.extend(entries.iter().rev().map(|(_, v)| *v));
            }
        }
    }
}

/// The hex blake3 of a byte string.
pub fn blake3_hex(bytes: &[u8]) -> String {
    let mut h = blake3::Hasher::new();
    if bytes.len() >= 1 << 20 {
        h.update_rayon(bytes);
    } else {
        h.update(bytes);
    }
    h.finalize().to_hex().to_string()
}

/// The canonical bytes of a JSON value (sorted keys), used for report artifacts.
pub fn canonical_json(v: &Value) -> Vec<u8> {
    fn sort(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let mut entries: Vec<(&String, &Value)> = m.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                Value::Object(
                    entries
                        .into_iter()
                        .map(|(k, v)| (k.clone(), sort(v)))
                        .collect(),
                )
            }
            Value::Array(a) => Value::Array(a.iter().map(sort).collect()),
            other => other.clone(),
        }
    }
    serde_json::to_vec(&sort(v)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn manifest() -> Manifest {
        let mut inputs = BTreeMap::new();
        inputs.insert(
            "input".to_string(),
            InputDigest {
                stage: "strip".into(),
                artifact_kind: "graph".into(),
                blake3: "aa".repeat(32),
            },
        );
        let mut files = BTreeMap::new();
        files.insert(
            "dataset.calib.input_x".to_string(),
            FileDigest {
                path: "data/calib_x.npy".into(),
                size: 10,
                blake3: "bb".repeat(32),
            },
        );
        Manifest {
            format: KEY_FORMAT,
            qpipe: "0.1.0".into(),
            kind: "quantize_int8".into(),
            kind_version: 1,
            config: json!({"input": "strip", "strategy": "DEFAULT", "drop": 0.01}),
            model_io: json!({"inputs": ["x"], "outputs": ["y"], "input_shapes": {}}),
            inputs,
            files,
        }
    }

    #[test]
    fn key_is_stable_and_covers_every_hashed_field() {
        let base = manifest();
        assert_eq!(base.key(), manifest().key());
        assert_eq!(base.key().len(), 64);
        let mut variants: Vec<Manifest> = Vec::new();
        let mut m = manifest();
        m.qpipe = "0.2.0".into();
        variants.push(m);
        let mut m = manifest();
        m.kind_version = 2;
        variants.push(m);
        let mut m = manifest();
        m.config["strategy"] = json!("OPTIMIZE_FOR_SIZE");
        variants.push(m);
        let mut m = manifest();
        m.config["drop"] = json!(0.010000000000000002);
        variants.push(m);
        let mut m = manifest();
        m.model_io["outputs"] = json!(["z"]);
        variants.push(m);
        let mut m = manifest();
        if let Some(d) = m.inputs.get_mut("input") {
            d.blake3 = "cc".repeat(32);
        }
        variants.push(m);
        let mut m = manifest();
        m.files
            .values_mut()
            .for_each(|f| f.blake3 = "dd".repeat(32));
        variants.push(m);
        let mut m = manifest();
        m.files.values_mut().for_each(|f| f.size = 11);
        variants.push(m);
        for (i, v) in variants.iter().enumerate() {
            assert_ne!(v.key(), base.key(), "variant {i} must change the key");
        }
    }

    #[test]
    fn display_only_fields_do_not_change_the_key() {
        let base = manifest();
        let mut m = manifest();
        m.files
            .values_mut()
            .for_each(|f| f.path = "elsewhere/calib_x.npy".into());
        assert_eq!(m.key(), base.key());
        // Renaming the upstream stage (config value and input label together).
        let mut m = manifest();
        m.config["input"] = json!("strip@v2");
        if let Some(d) = m.inputs.get_mut("input") {
            d.stage = "strip@v2".into();
        }
        assert_eq!(m.key(), base.key());
    }

    #[test]
    fn map_order_does_not_matter_but_types_do() {
        let mut a = blake3::Hasher::new();
        hash_value(&mut a, &json!({"a": 1, "b": [1, "x"]}));
        let mut b = blake3::Hasher::new();
        hash_value(
            &mut b,
            &serde_json::from_str::<Value>(r#"{"b":[1,"x"],"a":1}"#).unwrap(),
        );
        assert_eq!(a.finalize(), b.finalize());
        let h = |v: Value| {
            let mut h = blake3::Hasher::new();
            hash_value(&mut h, &v);
            h.finalize()
        };
        assert_ne!(h(json!(1)), h(json!(1.0)));
        assert_ne!(h(json!("1")), h(json!(1)));
        assert_ne!(h(json!(["ab"])), h(json!(["a", "b"])));
        assert_ne!(h(json!({"a": {"b": 1}})), h(json!({"a": {}, "b": 1})));
    }

    #[test]
    fn memo_base_ignores_config_only() {
        let base = manifest();
        let mut m = manifest();
        m.config["strategy"] = json!("OPTIMIZE_FOR_SIZE");
        assert_eq!(m.memo_base(), base.memo_base());
        let mut m = manifest();
        m.files
            .values_mut()
            .for_each(|f| f.blake3 = "dd".repeat(32));
        assert_ne!(m.memo_base(), base.memo_base());
    }
}
