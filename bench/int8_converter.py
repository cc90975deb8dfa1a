#!/usr/bin/env python3
"""qpipe's int8 and float16 .tflite files next to TensorFlow's TFLiteConverter.

For every fixture model it converts the frozen graph (fixtures/<model>/tf_frozen.pb)
with the real converter: Optimize.DEFAULT with the fixture's calibration set
(calib_x.npy) as representative data set, Optimize.DEFAULT without one (dynamic
range), and float16. It builds qpipe's files for the same strategies with
`qpipe run` on a generated recipe (strip_training → quantize_int8 DEFAULT with
`calibration`, DEFAULT without, fp16_cast → export_tflite), runs every file in
TensorFlow's TFLite interpreter with the reference kernels on the eval set, and
prints file bytes, accuracy, accuracy drop from the float32 model and top-1
agreement with it.

    python3 bench/int8_converter.py [--out-dir DIR] [--tf-python PY] [--qpipe BIN]

TensorFlow is needed (the tests never need it); see bench/tflite_converter.py for
how it is found. Exit status 1 when a qpipe int8 file is more than 2% larger than
the converter's, or qpipe's accuracy drop is worse than the converter's by more
than 0.2 points.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ensure_tensorflow(args):
    """Re-runs this script with a Python that has TensorFlow (see tflite_converter.py)."""
    try:
        import tensorflow  # noqa: F401
        return
    except ImportError:
        pass
    python = args.tf_python or os.environ.get("QPIPE_TF_PYTHON")
    if not python:
        venv = os.path.join(ROOT, "target", "bench-tf-venv")
        python = os.path.join(venv, "bin", "python")
        if not os.path.exists(python):
            print(f"creating {venv} with fixtures/requirements.txt", file=sys.stderr)
            subprocess.check_call([sys.executable, "-m", "venv", venv])
            subprocess.check_call([python, "-m", "pip", "install", "--disable-pip-version-check",
                                   "-r", os.path.join(ROOT, "fixtures", "requirements.txt")])
    if os.environ.get("QPIPE_BENCH_REEXEC"):
        sys.exit("int8_converter.py: error: TensorFlow is not importable in " + sys.executable)
    os.environ["QPIPE_BENCH_REEXEC"] = "1"
    os.execv(python, [python, os.path.abspath(__file__)] + sys.argv[1:])

MODELS = ["push_student", "conv_bn", "mlp_res"]
VARIANTS = [("int8_calib", "DEFAULT + calibration"), ("int8_dynamic", "DEFAULT, no data"),
            ("fp16", "float16")]

RECIPE = """\
[pipeline]
name = "{model}"
out_dir = "out"

[model]
graph = "{root}/fixtures/{model}/tf_frozen.pb"
inputs = {inputs}
outputs = {outputs}

[datasets.calib]
input_x = "{root}/fixtures/{model}/calib_x.npy"

[stages.freeze]
kind = "freeze"

[stages.strip]
kind = "strip_training"
input = "freeze"

[stages.int8_calib]
kind = "quantize_int8"
input = "strip"
calibration = "calib"

[stages.int8_dynamic]
kind = "quantize_int8"
input = "strip"

[stages.fp16]
kind = "fp16_cast"
input = "strip"

[stages.f32]
kind = "export_tflite"
input = "strip"
path = "{model}_f32.tflite"
"""


def recipe(model):
    meta = json.load(open(os.path.join(ROOT, "fixtures", model, "model.json")))
    text = RECIPE.format(model=model, root=ROOT, inputs=json.dumps(list(meta["inputs"])),
                         outputs=json.dumps(meta["outputs"]))
    for v, _ in VARIANTS:
        text += (f'\n[stages.export_{v}]\nkind = "export_tflite"\ninput = "{v}"\n'
                 f'path = "{model}_{v}.tflite"\n')
    return text


def convert(model, variant):
    import numpy as np
    import tensorflow as tf
    d = os.path.join(ROOT, "fixtures", model)
    meta = json.load(open(os.path.join(d, "model.json")))
    conv = tf.compat.v1.lite.TFLiteConverter.from_frozen_graph(
        os.path.join(d, "tf_frozen.pb"), list(meta["inputs"]), meta["outputs"])
    if variant != "f32":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == "fp16":
        conv.target_spec.supported_types = [tf.float16]
    if variant == "int8_calib":
        calib = np.load(os.path.join(d, "calib_x.npy"))

        def gen():
            for i in range(calib.shape[0]):
                yield [calib[i:i + 1]]
        conv.representative_dataset = gen
    return conv.convert()


def run(path, model):
    import numpy as np
    import tensorflow as tf
    d = os.path.join(ROOT, "fixtures", model)
    x = np.load(os.path.join(d, "eval_x.npy"))
    it = tf.lite.Interpreter(
        model_path=path,
        experimental_op_resolver_type=tf.lite.experimental.OpResolverType.BUILTIN_REF)
    inp = it.get_input_details()[0]
    it.resize_tensor_input(inp["index"], list(x.shape))
    it.allocate_tensors()
    it.set_tensor(inp["index"], x.astype(inp["dtype"]))
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default=os.path.join(ROOT, "target", "bench-int8"))
    p.add_argument("--tf-python", help="a Python with tensorflow-cpu installed")
    p.add_argument("--qpipe", help="the qpipe binary (default: cargo run --release)")
    args = p.parse_args()
    ensure_tensorflow(args)
    import warnings
    import numpy as np
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.makedirs(args.out_dir, exist_ok=True)
    qpipe = [args.qpipe] if args.qpipe else ["cargo", "run", "--quiet", "--release", "--"]

    rows, failed = [], []
    for model in MODELS:
        mdir = os.path.join(args.out_dir, model)
        os.makedirs(mdir, exist_ok=True)
        rpath = os.path.join(mdir, "recipe.toml")
        with open(rpath, "w") as f:
            f.write(recipe(model))
        subprocess.check_call(qpipe + ["run", rpath], cwd=ROOT, stdout=subprocess.DEVNULL)
        d = os.path.join(ROOT, "fixtures", model)
        y = np.load(os.path.join(d, "eval_y.npy"))
        labels = y.argmax(1) if y.ndim == 2 else y
        float_out = run(os.path.join(mdir, "out", f"{model}_f32.tflite"), model)
        float_pred = float_out.argmax(1)
        float_acc = float((float_pred == labels).mean())
        for v, label in VARIANTS:
            conv_path = os.path.join(mdir, f"{model}_{v}_converter.tflite")
            with open(conv_path, "wb") as f:
                f.write(convert(model, v))
            q_path = os.path.join(mdir, "out", f"{model}_{v}.tflite")
            cells = []
            for path in (conv_path, q_path):
                pred = run(path, model).argmax(1)
                acc = float((pred == labels).mean())
                cells.append((os.path.getsize(path), acc, float_acc - acc,
                              float((pred == float_pred).mean())))
            rows.append((model, label, float_acc, cells))
            (cb, _, cdrop, _), (qb, _, qdrop, _) = cells
            if v.startswith("int8") and (qb > 1.02 * cb or qdrop > cdrop + 0.002):
                failed.append(f"{model} {label}")

    print(f"{'model':<13} {'strategy':<22} {'float acc':>9} | {'bytes conv':>10} {'acc':>6} "
          f"{'drop':>7} {'agree':>6} | {'bytes qpipe':>11} {'acc':>6} {'drop':>7} {'agree':>6}"
          f" | {'size q/c':>8}")
    for model, label, float_acc, cells in rows:
        (cb, ca, cd, cg), (qb, qa, qd, qg) = cells
        print(f"{model:<13} {label:<22} {float_acc:>9.3f} | {cb:>10} {ca:>6.3f} {cd * 100:>6.2f}p "
              f"{cg:>6.3f} | {qb:>11} {qa:>6.3f} {qd * 100:>6.2f}p {qg:>6.3f} | {qb / cb:>8.3f}")
    print("(drop: float32 accuracy minus the variant's, in points; agree: top-1 agreement "
          "with the float32 model; all run with TFLite's reference kernels)")
    if failed:
        print("qpipe misses the bar (≤ 2% larger, drop ≤ converter's + 0.2 points) on: "
              + ", ".join(failed), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
