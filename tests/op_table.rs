//! The README's op table is generated from the op enum (`qpipe ops --markdown`, from
//! `qpipe::stages::op_support::markdown_table`, which asks each layer about each `Op`).
//! This test fails when the README's copy is stale;
//! `QPIPE_UPDATE_OP_TABLE=1 cargo test --test op_table` rewrites it.

use std::process::Command;

use qpipe::stages::op_support::markdown_table;

const BEGIN: &str = "<!-- BEGIN OP TABLE: `qpipe ops --markdown`; QPIPE_UPDATE_OP_TABLE=1 cargo test --test op_table rewrites it -->";
const END: &str = "<!-- END OP TABLE -->";

#[test]
fn the_readme_op_table_is_the_generated_one() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let readme = std::fs::read_to_string(&path).unwrap();
    let start = readme
        .find(BEGIN)
        .unwrap_or_else(|| panic!("README.md has no line {BEGIN}"));
    let body = start + BEGIN.len() + 1;
    let end = readme[body..]
        .find(END)
        .map(|e| body + e)
        .unwrap_or_else(|| panic!("README.md has no {END} after {BEGIN}"));
    let want = markdown_table();
    if readme[body..end] == want {
        return;
    }
    if std::env::var_os("QPIPE_UPDATE_OP_TABLE").is_some() {
        let updated = format!("{}{want}{}", &readme[..body], &readme[end..]);
        std::fs::write(&path, updated).unwrap();
        println!("rewrote the op table of README.md");
        return;
    }
    let (old, new): (Vec<&str>, Vec<&str>) =
        (readme[body..end].lines().collect(), want.lines().collect());
    let stale: Vec<String> = new
        .iter()
        .filter(|l| !old.contains(l))
        .map(|l| format!("  now: {l}"))
        .chain(
            old.iter()
                .filter(|l| !new.contains(l))
                .map(|l| format!("  was: {l}")),
        )
        .collect();
    panic!(
        "README.md's op table is stale; regenerate it with \
         QPIPE_UPDATE_OP_TABLE=1 cargo test --test op_table (or paste `qpipe ops --markdown`):\n{}",
        stale.join("\n")
    );
}

#[test]
fn qpipe_ops_prints_the_table_and_json() {
    let run = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_qpipe"))
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    assert_eq!(run(&["ops", "--markdown"]), markdown_table());
    let v: serde_json::Value = serde_json::from_str(&run(&["ops", "--json"])).unwrap();
    let ops = v.as_array().unwrap();
    assert_eq!(ops.len(), qpipe::ir::op::NAMES.len());
    let conv = ops.iter().find(|o| o["op"] == "Conv2D").unwrap();
    assert_eq!(conv["tflite_builtin"], "CONV_2D");
    assert_eq!(conv["quantize_int8"], "int8+hybrid");
    assert_eq!(conv["tflite_versions"]["int8"], 3);
    assert_eq!(conv["int16"], true);
    let int16 = |name: &str| ops.iter().find(|o| o["op"] == name).unwrap()["int16"].clone();
    assert_eq!(int16("Sigmoid"), true);
    assert_eq!(int16("Mean"), true);
    assert_eq!(
        int16("Sum"),
        false,
        "LiteRT's reference SUM reads int16 as uint8"
    );
    assert_eq!(int16("Elu"), false);
    let text = run(&["ops"]);
    assert!(
        text.lines()
            .any(|l| l.starts_with("Relu ") && l.ends_with("runs, quantizes and exports")),
        "{text}"
    );
}
