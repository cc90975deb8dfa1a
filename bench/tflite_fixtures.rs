//! Writes qpipe's float32 and float16 `.tflite` exports of every fixture model
//! (frozen graph → strip_training → [fp16_cast] → export_tflite) into a directory,
//! for `bench/tflite_converter.py` to compare with TensorFlow's converter.
//!
//!     cargo run --release --example tflite_fixtures -- OUT_DIR

use std::path::{Path, PathBuf};

use qpipe::formats::tf::graph_def::read_graph_def;
use qpipe::formats::tflite;
use qpipe::ir::TensorRef;
use qpipe::stages::fp16_cast::cast_fp16;
use qpipe::stages::strip_training::{strip, StripOptions};

fn main() -> qpipe::Result<()> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .ok_or_else(|| qpipe::Error::usage("usage: tflite_fixtures OUT_DIR"))?,
    );
    std::fs::create_dir_all(&out).map_err(|e| qpipe::Error::io(&out, e))?;
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    for model in ["push_student", "conv_bn", "mlp_res"] {
        let dir = fixtures.join(model);
        let json_path = dir.join("model.json");
        let json: serde_json::Value = serde_json::from_slice(&qpipe::error::read_file(&json_path)?)
            .map_err(|e| qpipe::Error::file(&json_path, e))?;
        let mut g = read_graph_def(&dir.join("tf_frozen.pb"))?;
        g.inputs = json["inputs"]
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        g.outputs = json["outputs"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|o| o.as_str().and_then(TensorRef::parse))
                    .collect()
            })
            .unwrap_or_default();
        let (g, _) = strip(&g, &g.inputs, &g.outputs, &StripOptions::default())?;
        let (g16, _) = cast_fp16(&g, 1, &[])?;
        for (variant, graph) in [("f32", &g), ("f16", &g16)] {
            let (_, bytes) = tflite::export(graph)?;
            let path = out.join(format!("{model}_{variant}.tflite"));
            std::fs::write(&path, &bytes).map_err(|e| qpipe::Error::io(&path, e))?;
            println!("{} {} bytes", path.display(), bytes.len());
        }
    }
    Ok(())
}
