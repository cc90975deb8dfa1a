//! The committed fixture models (`fixtures/<model>/`): files, graphs, data sets.

use std::collections::BTreeMap;
use std::path::PathBuf;

use qpipe::ir::{Graph, Tensor};
use qpipe::spec::DatasetSpec;
use qpipe::stages::strip_training::{strip, StripOptions};

use super::graph_builder::r;
use super::manifest_dir;

/// The fixture models.
pub const MODELS: [&str; 3] = ["push_student", "conv_bn", "mlp_res"];

/// A committed fixture file; a missing one fails the test.
pub fn fixture(rel: &str) -> PathBuf {
    let p = manifest_dir().join("fixtures").join(rel);
    assert!(p.exists(), "fixture {} is missing", p.display());
    p
}

pub fn fixture_dir(model: &str) -> PathBuf {
    manifest_dir().join("fixtures").join(model)
}

pub fn model_json(model: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture_dir(model).join("model.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// `tf_frozen.pb` (TF's convert_variables_to_constants) with inputs/outputs from model.json.
pub fn frozen_graph(model: &str) -> Graph {
    let mut g =
        qpipe::formats::tf::graph_def::read_graph_def(&fixture_dir(model).join("tf_frozen.pb"))
            .unwrap_or_else(|e| panic!("{model}: {e}"));
    let info = model_json(model);
    g.inputs = info["inputs"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    g.outputs = info["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| r(o.as_str().unwrap()))
        .collect();
    g
}

/// [`frozen_graph`] after `strip_training`.
pub fn stripped_fixture(model: &str) -> Graph {
    let g = frozen_graph(model);
    let (g, _) = strip(&g, &g.inputs, &g.outputs, &StripOptions::default()).unwrap();
    g
}

pub fn fixture_npy(model: &str, file: &str) -> Tensor {
    qpipe::npy::read(&fixture_dir(model).join(file)).unwrap()
}

/// The name of the fixture model's (first) input.
pub fn input_name(model: &str) -> String {
    model_json(model)["inputs"]
        .as_object()
        .unwrap()
        .keys()
        .next()
        .unwrap()
        .clone()
}

/// The eval set of a fixture as a data set spec (input tensor and labels).
pub fn eval_spec(model: &str) -> DatasetSpec {
    let input = input_name(model);
    DatasetSpec {
        tensors: BTreeMap::from([(input, fixture_dir(model).join("eval_x.npy"))]),
        labels: Some(fixture_dir(model).join("eval_y.npy")),
    }
}

/// The fixture's data sets: `calib` (calib_x) and `eval` (eval_x with eval_y).
pub fn fixture_datasets(model: &str) -> BTreeMap<String, DatasetSpec> {
    BTreeMap::from([
        (
            "calib".to_string(),
            DatasetSpec {
                tensors: BTreeMap::from([(
                    "input_x".to_string(),
                    fixture(&format!("{model}/calib_x.npy")),
                )]),
                labels: None,
            },
        ),
        (
            "eval".to_string(),
            DatasetSpec {
                tensors: BTreeMap::from([(
                    "input_x".to_string(),
                    fixture(&format!("{model}/eval_x.npy")),
                )]),
                labels: Some(fixture(&format!("{model}/eval_y.npy"))),
            },
        ),
    ])
}

/// Top-1 accuracy of class scores against the fixture's eval labels.
pub fn eval_accuracy(model: &str, scores: &Tensor) -> f64 {
    let labels = qpipe::npy::read(&fixture(&format!("{model}/eval_y.npy"))).unwrap();
    let ids = qpipe::kernels::dataset::class_ids(&labels).unwrap();
    let s = scores.to_f64_vec().unwrap();
    let cols = scores.shape()[1];
    let pred = qpipe::kernels::dataset::argmax_rows(&s, ids.len(), cols);
    pred.iter().zip(&ids).filter(|(a, b)| a == b).count() as f64 / ids.len() as f64
}
