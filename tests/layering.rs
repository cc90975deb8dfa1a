//! The layering the architecture promises, checked on the source text of src/:
//! `ir ← {formats, kernels} ← stages ← pipeline ← cli`, and TensorFlow op names spelled
//! only where ops are parsed (src/ir, src/formats/tf). One test per rule.
//!
//! A rule that is not met everywhere yet lists the files that still break it; each
//! listed file must still break it (so the list only shrinks), and no other file may.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every .rs file under src/, as a path relative to the crate root ("src/…").
fn sources() -> Vec<(String, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(&src(), &mut files);
    files.sort();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    files
        .into_iter()
        .map(|p| {
            let rel = p
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            (rel, std::fs::read_to_string(&p).unwrap())
        })
        .collect()
}

/// Code lines (not `//` comments).
fn code_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim_start().starts_with("//"))
        .map(|(i, l)| (i + 1, l))
}

/// The string literals of one line that are a plain identifier.
fn identifier_literals(line: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut parts = line.split('"');
    parts.next();
    while let Some(lit) = parts.next() {
        if !lit.is_empty() && lit.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.push(lit);
        }
        parts.next();
    }
    out
}

/// Checks `offending` (file → first finding) against the files still allowed to break
/// the rule.
fn check(rule: &str, offending: Vec<(String, String)>, not_yet: &[&str]) {
    let found: BTreeSet<&str> = offending.iter().map(|(f, _)| f.as_str()).collect();
    let new: Vec<&(String, String)> = offending
        .iter()
        .filter(|(f, _)| !not_yet.contains(&f.as_str()))
        .collect();
    assert!(
        new.is_empty(),
        "{rule}:\n{}",
        new.iter()
            .map(|(f, what)| format!("  {f}: {what}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let stale: Vec<&&str> = not_yet.iter().filter(|f| !found.contains(**f)).collect();
    assert!(
        stale.is_empty(),
        "{rule}: these files no longer break the rule; remove them from its list: {stale:?}"
    );
}

#[test]
fn no_tf_op_name_is_spelled_outside_ir_and_the_tf_format() {
    let names: BTreeSet<&str> = qpipe::ir::op::NAMES.iter().copied().collect();
    assert!(names.contains("Conv2D") && names.contains("Relu6"));
    let mut offending = Vec::new();
    for (file, text) in sources() {
        if file.starts_with("src/ir/") || file.starts_with("src/formats/tf/") {
            continue;
        }
        let hit = code_lines(&text).find_map(|(n, l)| {
            identifier_literals(l)
                .into_iter()
                .find(|lit| names.contains(lit))
                .map(|lit| format!("line {n}: \"{lit}\""))
        });
        if let Some(h) = hit {
            offending.push((file, h));
        }
    }
    check(
        "TF op names outside src/ir and src/formats/tf (match on ir::Op instead)",
        offending,
        &[],
    );
}

/// Where a file under `layers` names a module of `above` through `crate::`.
fn imports(layers: &[&str], above: &[&str]) -> Vec<(String, String)> {
    let mut offending = Vec::new();
    for (file, text) in sources() {
        if !layers.iter().any(|l| file.starts_with(l)) {
            continue;
        }
        let hit = code_lines(&text).find_map(|(n, l)| {
            above
                .iter()
                .find(|m| {
                    l.contains(&format!("crate::{m}"))
                        || (l.contains("crate::{") && l.contains(&format!("{m}::")))
                })
                .map(|m| format!("line {n} imports {m}: {}", l.trim()))
        });
        if let Some(h) = hit {
            offending.push((file, h));
        }
    }
    offending
}

/// Files allowed to break the rule below: none since the specs moved to `src/spec.rs`.
const SPECS_NOT_YET_BELOW_STAGES: &[&str] = &[];

#[test]
fn ir_kernels_and_formats_do_not_import_stages_pipeline_or_cli() {
    check(
        "src/ir, src/kernels, src/formats import a layer above them",
        imports(
            &["src/ir/", "src/kernels/", "src/formats/"],
            &["stages", "pipeline", "cli"],
        ),
        SPECS_NOT_YET_BELOW_STAGES,
    );
}

#[test]
fn ir_and_formats_do_not_import_kernels() {
    check(
        "src/ir and src/formats import kernels",
        imports(&["src/ir/", "src/formats/"], &["kernels"]),
        &[],
    );
}

#[test]
fn the_scan_sees_what_it_looks_for() {
    assert_eq!(
        identifier_literals(r#"match op { "Conv2D" => 1, "a b" => 2, x => "Relu6" }"#),
        ["Conv2D", "Relu6"]
    );
    let found = imports(&["src/ir/"], &["kernels", "stages"]);
    assert!(found.is_empty(), "{found:?}");
    let found = imports(&["src/pipeline/"], &["stages"]);
    assert!(!found.is_empty());
}
