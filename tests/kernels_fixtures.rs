//! The interpreter on every fixture model against TensorFlow's recorded outputs.

mod support;

use qpipe::kernels::{evaluate, EvalOptions};
use support::fixtures::{eval_spec, fixture_dir, fixture_npy, frozen_graph, model_json, MODELS};
use support::graph_builder::r;
use support::numeric::max_abs_diff;
use support::tmp_dir;

#[test]
fn frozen_fixture_graphs_match_tensorflow() {
    for m in MODELS {
        let g = frozen_graph(m);
        let out = tmp_dir(m).join("outputs.npy");
        let t = std::time::Instant::now();
        let rep = evaluate(
            &g,
            &eval_spec(m),
            &EvalOptions {
                batch_size: 64,
                samples: None,
                outputs_npy: Some(out.clone()),
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("{m}: {e}"));
        let elapsed = t.elapsed();
        let got = qpipe::npy::read(&out).unwrap().to_f32_vec().unwrap();
        for reference in ["tf_frozen_eval_out.npy", "tf_eval_out.npy"] {
            let want = fixture_npy(m, reference).to_f32_vec().unwrap();
            let d = max_abs_diff(&got, &want);
            assert!(d <= 1e-5, "{m}: max abs diff {d} against {reference}");
        }
        let acc = model_json(m)["tf_eval_accuracy"].as_f64().unwrap();
        assert!(
            (rep.accuracy.unwrap() - acc).abs() < 1e-9,
            "{m}: {:?} vs {acc}",
            rep.accuracy
        );
        eprintln!(
            "{m}: {} samples in {elapsed:?}, accuracy {:?}",
            rep.samples, rep.accuracy
        );
        std::fs::remove_file(out).ok();
    }
}

#[test]
fn checkpoint_frozen_by_qpipe_runs_both_heads() {
    // push_student's teacher head, frozen from the checkpoint next to the student.
    let model = qpipe::spec::ModelSpec {
        source: qpipe::spec::ModelSource::Checkpoint(
            fixture_dir("push_student").join("best_validation"),
        ),
        inputs: vec!["input_x".into()],
        outputs: vec![
            "score_teacher/output_teacher".into(),
            "score_student/output_student".into(),
        ],
        input_shapes: Default::default(),
    };
    let g = qpipe::formats::tf::freeze_model(&model).unwrap();
    let x = fixture_npy("push_student", "eval_x.npy");
    let out = qpipe::kernels::run(
        &g,
        &[("input_x", x)],
        &[
            r("score_teacher/output_teacher"),
            r("score_student/output_student"),
        ],
    )
    .unwrap();
    let y = fixture_npy("push_student", "eval_y.npy");
    let labels = qpipe::kernels::dataset::class_ids(&y).unwrap();
    let t = out[0].to_f64_vec().unwrap();
    let preds = qpipe::kernels::dataset::argmax_rows(&t, labels.len(), 4);
    let acc =
        preds.iter().zip(&labels).filter(|(a, b)| a == b).count() as f64 / labels.len() as f64;
    let want = model_json("push_student")["secondary_outputs"]["score_teacher/output_teacher"]
        ["tf_eval_accuracy"]
        .as_f64()
        .unwrap();
    assert!((acc - want).abs() < 1e-9, "{acc} vs {want}");
    let student = fixture_npy("push_student", "tf_frozen_eval_out.npy")
        .to_f32_vec()
        .unwrap();
    assert!(max_abs_diff(&out[1].to_f32_vec().unwrap(), &student) <= 1e-5);
}
