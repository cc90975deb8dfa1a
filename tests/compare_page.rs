//! The `compare --html` page in a real browser at 1200x900: chart labels do not
//! overlap each other or the markers, and the table fits the window. Measured
//! by a script injected into a test copy of the page (the page itself has none).

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn qpipe(args: &[&str], cwd: &Path) {
    let o = Command::new(env!("CARGO_BIN_EXE_qpipe"))
        .args(args)
        .current_dir(cwd)
        .env_remove("QPIPE_CACHE_DIR")
        .output()
        .expect("qpipe runs");
    assert!(o.status.success(), "qpipe {args:?}: {o:?}");
}

fn workspace(name: &str) -> PathBuf {
    let dir = root().join("target/tmp/compare_page").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("recipes")).unwrap();
    std::fs::copy(
        root().join("recipes/push_student.toml"),
        dir.join("recipes/push_student.toml"),
    )
    .unwrap();
    std::os::unix::fs::symlink(root().join("fixtures"), dir.join("fixtures")).unwrap();
    dir
}

/// Six variants: push_student's four and two more int8 ones calibrated on fewer
/// samples, which land on the same point as two of the first.
const SIX_EXTRA: &str = r#"
[stages.int8_small]
kind = "quantize_int8"
input = "strip"
matrix = { strategy = ["DEFAULT", "OPTIMIZE_FOR_SIZE"] }
calibration = "calib"
samples = 32

[stages.check_small]
kind = "validate"
reference = "strip"
candidate = "int8_small"
dataset = "eval"

[stages.tflite_small]
kind = "export_tflite"
input = "int8_small"
path = "six_small_${strategy}.tflite"
"#;

const MEASURE: &str = r#"<script>
const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
const svg = document.querySelector('svg[data-chart="size-accuracy"]');
const doc = document.documentElement;
const out = {
  viewport: doc.clientWidth,
  scroll: doc.scrollWidth,
  table: box(document.querySelector('table')),
  labels: [...svg.querySelectorAll('text.label')].map(box),
  markers: [...svg.querySelectorAll('circle')].map(box),
  points: svg.querySelectorAll('g[data-variant]').length,
};
const pre = document.createElement('pre');
pre.id = 'measure';
pre.textContent = JSON.stringify(out);
document.body.appendChild(pre);
</script>"#;

fn chromium() -> PathBuf {
    let exe = std::env::var_os("QPIPE_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if !exe.exists() {
        let installed = Command::new("sh")
            .args([
                "-c",
                "[ \"$(id -u)\" = 0 ] && command -v apt-get >/dev/null && \
                 (apt-get install -y chromium || (apt-get update && apt-get install -y chromium))",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(
            installed && exe.exists(),
            "headless Chromium is needed to check the HTML page: install Debian's `chromium` \
             or set QPIPE_CHROMIUM to a Chromium binary"
        );
    }
    exe
}

fn headless(page: &Path, what: &[String]) -> std::process::Output {
    let profile = page.with_extension("chromium-profile");
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1200,900",
        ])
        .args(what)
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("file://{}", page.canonicalize().unwrap().display()))
        .output()
        .expect("chromium runs");
    assert!(out.status.success(), "chromium: {out:?}");
    out
}

fn overlap(a: &[f64], b: &[f64]) -> bool {
    a[0] < b[2] && b[0] < a[2] && a[1] < b[3] && b[1] < a[3]
}

fn check_page(ws: &Path, recipe: &str, variants: usize) {
    qpipe(&["run", recipe, "--quiet"], ws);
    qpipe(
        &[
            "compare",
            recipe,
            "--html",
            "compare.html",
            "--latency-samples",
            "3",
        ],
        ws,
    );
    let html = std::fs::read_to_string(ws.join("compare.html")).unwrap();
    assert!(
        !html.contains("<script"),
        "the page itself stays script-free"
    );
    // Every number column names its unit.
    for unit in ["(KiB)", "(%)", "(pp)", "(ms/sample)", "(× float)"] {
        assert!(html.contains(unit), "a header with {unit}");
    }
    let shot = ws.join("compare.png");
    headless(
        &ws.join("compare.html"),
        &[format!("--screenshot={}", shot.display())],
    );
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 10_000,
        "a screenshot"
    );

    let measured = ws.join("measured.html");
    std::fs::write(
        &measured,
        html.replace("</body>", &format!("{MEASURE}\n</body>")),
    )
    .unwrap();
    let dom = String::from_utf8(headless(&measured, &["--dump-dom".into()]).stdout).unwrap();
    let json = dom
        .split("<pre id=\"measure\">")
        .nth(1)
        .and_then(|s| s.split("</pre>").next())
        .unwrap_or_else(|| panic!("the measuring script ran: {dom}"));
    let m: serde_json::Value = serde_json::from_str(json).unwrap();
    let boxes = |k: &str| -> Vec<Vec<f64>> {
        m[k].as_array()
            .unwrap()
            .iter()
            .map(|b| {
                b.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .collect()
            })
            .collect()
    };
    assert_eq!(m["viewport"], 1200, "{m}");
    assert_eq!(m["points"], variants, "{m}");
    let labels = boxes("labels");
    assert!(!labels.is_empty(), "{m}");
    for (i, a) in labels.iter().enumerate() {
        for b in &labels[i + 1..] {
            assert!(!overlap(a, b), "labels {a:?} and {b:?} overlap: {m}");
        }
        for c in boxes("markers") {
            assert!(!overlap(a, &c), "label {a:?} covers marker {c:?}: {m}");
        }
    }
    let table: Vec<f64> = m["table"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert!(table[2] <= 1200.0, "the table ends at {} px: {m}", table[2]);
    assert!(
        m["scroll"].as_f64().unwrap() <= 1200.0,
        "the page scrolls sideways: {m}"
    );
}

#[test]
fn push_student_page_reads_at_1200_px() {
    let ws = workspace("push_student");
    check_page(&ws, "recipes/push_student.toml", 4);
}

#[test]
fn six_variant_page_reads_at_1200_px() {
    let ws = workspace("six");
    let text = std::fs::read_to_string(ws.join("recipes/push_student.toml"))
        .unwrap()
        .replace("name = \"push_student\"", "name = \"six\"")
        .replace("push_student_", "six_");
    std::fs::write(ws.join("recipes/six.toml"), text + SIX_EXTRA).unwrap();
    check_page(&ws, "recipes/six.toml", 6);
    let html = std::fs::read_to_string(ws.join("compare.html")).unwrap();
    assert!(html.contains(">×4</text>"), "the shared marker says ×4");
}
