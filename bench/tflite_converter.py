#!/usr/bin/env python3
"""File sizes of qpipe's .tflite exports next to TensorFlow's TFLiteConverter.

For every fixture model it converts the frozen graph (fixtures/<model>/tf_frozen.pb)
with the real converter, float32 and float16 (Optimize.DEFAULT with
supported_types=[float16]), builds qpipe's exports of the same graph
(`cargo run --example tflite_fixtures`: strip_training, fp16_cast, export_tflite),
runs all of them in TensorFlow's TFLite interpreter on the eval set and prints
bytes, size ratio, accuracy and max abs difference from TensorFlow's recorded
outputs.

    python3 bench/tflite_converter.py [--qpipe-dir DIR] [--out-dir DIR] [--tf-python PY]

TensorFlow is needed (the tests never need it). When `import tensorflow` fails the
script re-runs itself with --tf-python, $QPIPE_TF_PYTHON, or a virtual environment
it creates at target/bench-tf-venv with fixtures/requirements.txt.
Exit status 1 when a qpipe file is more than 1% larger than the converter's.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ["push_student", "conv_bn", "mlp_res"]
VENV = os.path.join(ROOT, "target", "bench-tf-venv")


def ensure_tensorflow(args):
    try:
        import tensorflow  # noqa: F401
        return
    except ImportError:
        pass
    python = args.tf_python or os.environ.get("QPIPE_TF_PYTHON")
    if not python:
        python = os.path.join(VENV, "bin", "python")
        if not os.path.exists(python):
            print(f"creating {VENV} with fixtures/requirements.txt", file=sys.stderr)
            subprocess.check_call([sys.executable, "-m", "venv", VENV])
            subprocess.check_call([python, "-m", "pip", "install", "--disable-pip-version-check",
                                   "-r", os.path.join(ROOT, "fixtures", "requirements.txt")])
    if os.environ.get("QPIPE_BENCH_REEXEC"):
        sys.exit("tflite_converter.py: error: TensorFlow is not importable in " + sys.executable)
    os.environ["QPIPE_BENCH_REEXEC"] = "1"
    os.execv(python, [python, os.path.abspath(__file__)] + sys.argv[1:])


def convert(model, fp16):
    import tensorflow as tf
    meta = json.load(open(os.path.join(ROOT, "fixtures", model, "model.json")))
    conv = tf.compat.v1.lite.TFLiteConverter.from_frozen_graph(
        os.path.join(ROOT, "fixtures", model, "tf_frozen.pb"),
        list(meta["inputs"]), meta["outputs"])
    if fp16:
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
    return conv.convert()


def evaluate(path, model):
    """(accuracy, max abs diff from TF's outputs) of a .tflite on the fixture's eval set."""
    import warnings
    import numpy as np
    import tensorflow as tf
    warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated.*")
    d = os.path.join(ROOT, "fixtures", model)
    x = np.load(os.path.join(d, "eval_x.npy"))
    y = np.load(os.path.join(d, "eval_y.npy"))
    want = np.load(os.path.join(d, "tf_eval_out.npy"))
    it = tf.lite.Interpreter(model_path=path)
    inp = it.get_input_details()[0]
    it.resize_tensor_input(inp["index"], list(x.shape))
    it.allocate_tensors()
    it.set_tensor(inp["index"], x)
    it.invoke()
    out = it.get_tensor(it.get_output_details()[0]["index"])
    labels = y.argmax(1) if y.ndim == 2 else y
    return float((out.argmax(1) == labels).mean()), float(np.abs(out - want).max())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--qpipe-dir", help="directory with <model>_{f32,f16}.tflite from qpipe "
                   "(default: build them with cargo into --out-dir)")
    p.add_argument("--out-dir", default=os.path.join(ROOT, "target", "bench-tflite"))
    p.add_argument("--tf-python", help="a Python with tensorflow-cpu installed")
    args = p.parse_args()
    ensure_tensorflow(args)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    os.makedirs(args.out_dir, exist_ok=True)
    qdir = args.qpipe_dir
    if not qdir:
        qdir = os.path.join(args.out_dir, "qpipe")
        subprocess.check_call(["cargo", "run", "--quiet", "--example", "tflite_fixtures", "--", qdir],
                              cwd=ROOT)

    rows = []
    for model in MODELS:
        for variant in ["f32", "f16"]:
            tf_path = os.path.join(args.out_dir, f"{model}_{variant}_converter.tflite")
            with open(tf_path, "wb") as f:
                f.write(convert(model, variant == "f16"))
            q_path = os.path.join(qdir, f"{model}_{variant}.tflite")
            tb, qb = os.path.getsize(tf_path), os.path.getsize(q_path)
            (tacc, tdiff), (qacc, qdiff) = evaluate(tf_path, model), evaluate(q_path, model)
            rows.append((model, variant, tb, qb, tacc, qacc, tdiff, qdiff))

    print(f"{'model':<13} {'type':<4} {'converter':>10} {'qpipe':>10} {'qpipe/conv':>10}"
          f" {'acc conv':>9} {'acc qpipe':>9} {'maxdiff conv':>12} {'maxdiff qpipe':>13}")
    worst = 0.0
    for model, variant, tb, qb, tacc, qacc, tdiff, qdiff in rows:
        ratio = qb / tb
        worst = max(worst, ratio)
        print(f"{model:<13} {variant:<4} {tb:>10} {qb:>10} {ratio:>10.4f}"
              f" {tacc:>9.3f} {qacc:>9.3f} {tdiff:>12.2e} {qdiff:>13.2e}")
    print("(maxdiff: max abs difference from TensorFlow's recorded outputs on the eval set)")
    if worst > 1.01:
        print(f"qpipe is {100 * (worst - 1):.2f}% larger than the converter on some model "
              "(limit 1%)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
