//! The pipeline's side of the layering (`ir ← {formats, kernels} ← stages ← pipeline ← cli`):
//! the pipeline knows a stage only through the `Stage` trait and the registry. One test
//! per rule; tests/layering.rs checks the layers below.

use std::path::{Path, PathBuf};

/// Imports of a stage kind's module that are waiting for a move elsewhere: (file, kind
/// module, why). Each must still occur, so that the entry goes when the import does.
const PENDING: &[(&str, &str, &str)] = &[];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(rust_files(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn rel(p: &Path) -> String {
    p.strip_prefix(root())
        .unwrap()
        .to_string_lossy()
        .replace('\\', "/")
}

/// The file's code before its `#[cfg(test)]` module, without `//` comments.
fn code(p: &Path) -> String {
    let text = std::fs::read_to_string(p).unwrap();
    let text = text.split("#[cfg(test)]").next().unwrap_or("");
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The stage kinds' modules: each kind in the registry lives in `src/stages/<kind>.rs`.
fn kind_modules() -> Vec<String> {
    let kinds = qpipe::stages::registry::kinds();
    for k in &kinds {
        assert!(
            root().join(format!("src/stages/{k}.rs")).is_file(),
            "stage kind '{k}' has no src/stages/{k}.rs"
        );
    }
    kinds.into_iter().map(str::to_string).collect()
}

/// Stage kind modules a file reaches through `stages::` paths, including `stages::{...}` groups.
fn kind_modules_used(code: &str, kinds: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    for (at, _) in code.match_indices("stages::") {
        let rest = &code[at + "stages::".len()..];
        let scope = match rest.strip_prefix('{') {
            Some(group) => &group[..group.find('}').unwrap_or(group.len())],
            None => rest
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .next()
                .unwrap_or(""),
        };
        let words: Vec<&str> = scope
            .split(|c: char| !(c.is_alphanumeric() || c == '_'))
            .collect();
        for k in kinds {
            if words.contains(&k.as_str()) && !found.contains(k) {
                found.push(k.clone());
            }
        }
    }
    found
}

#[test]
fn the_rule_finder_sees_imports_and_groups() {
    let kinds = vec!["quantize_int8".to_string(), "validate".to_string()];
    assert_eq!(
        kind_modules_used("use crate::stages::quantize_int8::rewrite::x;", &kinds),
        ["quantize_int8"]
    );
    assert_eq!(
        kind_modules_used("use crate::stages::{registry, validate::Validate};", &kinds),
        ["validate"]
    );
    assert!(kind_modules_used("use crate::stages::{Role, Stage};", &kinds).is_empty());
}

#[test]
fn pipeline_uses_stages_only_through_the_trait_and_the_registry() {
    let kinds = kind_modules();
    let mut bad = Vec::new();
    let mut pending_seen = Vec::new();
    for f in rust_files(&root().join("src/pipeline")) {
        let r = rel(&f);
        for k in kind_modules_used(&code(&f), &kinds) {
            match PENDING
                .iter()
                .find(|(file, kind, _)| *file == r && *kind == k)
            {
                Some(p) => pending_seen.push(p),
                None => bad.push(format!("{r} imports stages::{k}")),
            }
        }
    }
    assert!(
        bad.is_empty(),
        "the pipeline reaches into stage kinds:\n{}",
        bad.join("\n")
    );
    for p in PENDING {
        assert!(
            pending_seen.contains(&p),
            "{} no longer imports stages::{}: remove it from PENDING",
            p.0,
            p.1
        );
    }
}

#[test]
fn pipeline_names_no_stage_kind_outside_its_tests() {
    let kinds = qpipe::stages::registry::kinds();
    let mut bad = Vec::new();
    for f in rust_files(&root().join("src/pipeline")) {
        let c = code(&f);
        for k in &kinds {
            if c.contains(&format!("\"{k}\"")) {
                bad.push(format!("{} names the stage kind \"{k}\"", rel(&f)));
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// The pipeline's two largest files, split along their seams, stay readable.
#[test]
fn run_and_recipe_stay_under_700_lines() {
    for f in ["src/pipeline/run.rs", "src/pipeline/recipe.rs"] {
        let n = std::fs::read_to_string(root().join(f))
            .unwrap()
            .lines()
            .count();
        assert!(n < 700, "{f} has {n} lines; split it along a seam");
    }
}

/// Stages sit below the pipeline and the command line.
#[test]
fn stages_import_neither_pipeline_nor_cli() {
    let mut bad = Vec::new();
    for f in rust_files(&root().join("src/stages")) {
        let c = code(&f);
        for layer in ["pipeline", "cli"] {
            if c.contains(&format!("crate::{layer}")) || c.contains(&format!("qpipe::{layer}")) {
                bad.push(format!("{} imports {layer}", rel(&f)));
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}
