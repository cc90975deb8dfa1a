//! Cache keys over the real stage kinds: no two different configs may share a key.

use std::collections::{BTreeMap, BTreeSet};

use qpipe::pipeline::fingerprint::{Manifest, KEY_FORMAT};
use qpipe::stages::registry::REGISTRY;
use qpipe::stages::{ConfigTable, Stage};

/// A table every kind builds from (its required keys only).
fn minimal(kind: &str) -> &'static str {
    match kind {
        "freeze" => "",
        "strip_training" | "fp16_cast" | "quantize_int8" => "input = \"up\"\n",
        "export_graphdef" => "input = \"up\"\npath = \"m.pb\"\n",
        "export_tflite" => "input = \"up\"\npath = \"m.tflite\"\n",
        "validate" => "reference = \"up\"\ncandidate = \"up2\"\ndataset = \"eval\"\n",
        other => panic!("add a minimal table for the new stage kind '{other}' to this test"),
    }
}

fn build(kind: &str, toml: &str) -> Option<Box<dyn Stage>> {
    let factory = REGISTRY.iter().find(|f| f.kind == kind).unwrap();
    let table = ConfigTable::parse(toml).ok()?;
    (factory.build)(&table).ok()
}

fn key(stage: &dyn Stage) -> String {
    Manifest {
        format: KEY_FORMAT,
        qpipe: "test".into(),
        kind: stage.kind().into(),
        kind_version: stage.version(),
        config: stage.config(),
        model_io: serde_json::json!({}),
        inputs: BTreeMap::new(),
        files: BTreeMap::new(),
    }
    .key()
}

/// For every kind in the registry, every config key that takes a float (directly or
/// as the values of a map) is tried with NaN, +inf, -inf, a finite value and absent:
/// the five must give five keys. (Recipes reject the non-finite ones; the key must not
/// depend on that check.)
#[test]
fn non_finite_floats_never_share_a_key_in_any_stage_kind() {
    let mut probed: BTreeSet<String> = BTreeSet::new();
    for factory in REGISTRY {
        let kind = factory.kind;
        let base = minimal(kind);
        let stage = build(kind, base).unwrap_or_else(|| panic!("{kind}: minimal table"));
        let serde_json::Value::Object(fields) = stage.config() else {
            panic!("{kind}: config is not an object");
        };
        for field in fields.keys() {
            if base.contains(&format!("{field} =")) {
                continue;
            }
            // The field as a float, and as a map of floats (like `bind`).
            for (finite, name) in [
                (format!("{field} = 0.5\n"), field.clone()),
                (
                    format!("{field} = {{ probe = 0.5 }}\n"),
                    format!("{field}.probe"),
                ),
            ] {
                let with = |v: &str| format!("{base}{}", finite.replace("0.5", v));
                if build(kind, &with("0.5")).is_none() {
                    continue;
                }
                let variants = [
                    with("nan"),
                    with("inf"),
                    with("-inf"),
                    with("0.5"),
                    base.to_string(),
                ];
                let mut keys: BTreeMap<String, &str> = BTreeMap::new();
                for v in &variants {
                    let s =
                        build(kind, v).unwrap_or_else(|| panic!("{kind}: {v:?} does not build"));
                    if let Some(prev) = keys.insert(key(s.as_ref()), v) {
                        panic!("{kind}.{name}: {prev:?} and {v:?} share a cache key");
                    }
                }
                probed.insert(format!("{kind}.{name}"));
            }
        }
    }
    for must in [
        "validate.max_accuracy_drop",
        "validate.min_agreement",
        "strip_training.bind.probe",
    ] {
        assert!(probed.contains(must), "{must} not probed: {probed:?}");
    }
}
