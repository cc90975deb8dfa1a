//! The vector kernels give the portable kernels' bits: `qpipe eval` writes the same
//! outputs with every path this CPU has (VNNI and AVX-512, AVX2 only as on a CPU without
//! AVX-512 via `QPIPE_NO_VNNI` and `QPIPE_NO_AVX512`, and the portable loops of other CPUs via `QPIPE_NO_SIMD`), for
//! float, int8 (convolutions, fully connected, reductions) and hybrid models.

mod support;

use std::path::Path;
use std::process::Command;

fn qpipe(dir: &Path, env: &[(&str, &str)], args: &[&str]) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qpipe"));
    c.current_dir(dir).args(args).env_remove("QPIPE_NO_SIMD");
    c.env_remove("QPIPE_NO_VNNI").env_remove("QPIPE_NO_AVX512");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "qpipe {args:?} {env:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_vector_path_gives_the_portable_bits() {
    let fixtures = support::manifest_dir().join("fixtures");
    for model in ["conv_bn", "push_student"] {
        let dir = support::tmp_dir(&format!("simd_paths_{model}"));
        let fx = fixtures.join(model);
        let p = |f: &str| format!("{:?}", fx.join(f).to_str().unwrap());
        let (out, labels) = match model {
            "conv_bn" => ("output/probs", "eval_y.npy"),
            _ => ("score_student/output_student", "eval_y.npy"),
        };
        let input = "input_x";
        let recipe = format!(
            "[pipeline]\nname = \"{model}\"\n\n[model]\ncheckpoint = {}\ninputs = [\"{input}\"]\n\
             outputs = [\"{out}\"]\n\n[datasets.calib]\n{input} = {}\n\n[datasets.eval]\n\
             {input} = {}\nlabels = {}\n\n[stages.freeze]\nkind = \"freeze\"\n\n\
             [stages.strip]\nkind = \"strip_training\"\ninput = \"freeze\"\n\n\
             [stages.int8]\nkind = \"quantize_int8\"\ninput = \"strip\"\ncalibration = \"calib\"\n\n\
             [stages.hybrid]\nkind = \"quantize_int8\"\ninput = \"strip\"\n",
            p("best_validation"),
            p("calib_x.npy"),
            p("eval_x.npy"),
            p(labels),
        );
        std::fs::write(dir.join("recipe.toml"), recipe).unwrap();
        qpipe(&dir, &[], &["run", "recipe.toml", "-q"]);
        for stage in ["strip", "int8", "hybrid"] {
            let outputs: Vec<Vec<u8>> = [
                &[][..],
                &[("QPIPE_NO_VNNI", "1"), ("QPIPE_NO_AVX512", "1")][..],
                &[("QPIPE_NO_SIMD", "1")][..],
            ]
            .iter()
            .enumerate()
            .map(|(k, env)| {
                let f = format!("{stage}_{k}.npy");
                qpipe(
                    &dir,
                    env,
                    &[
                        "eval",
                        "recipe.toml",
                        "--stage",
                        stage,
                        "--dataset",
                        "eval",
                        "-q",
                        "--out",
                        &f,
                    ],
                );
                std::fs::read(dir.join(&f)).unwrap()
            })
            .collect();
            assert!(outputs[0].len() > 128, "{model} {stage}: no outputs");
            assert!(
                outputs[0] == outputs[1],
                "{model} {stage}: the AVX2-only path differs from the default"
            );
            assert!(
                outputs[0] == outputs[2],
                "{model} {stage}: the portable path differs from the default"
            );
        }
    }
}
