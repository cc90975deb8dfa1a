#!/usr/bin/env python3
"""The TensorFlow program equivalent to a qpipe recipe like recipes/push_student.toml,
as one process, for bench/tf_vs_qpipe.py to time against `qpipe run`:

  freeze    import the .meta, restore the checkpoint, convert_variables_to_constants
            to the output, write the frozen .pb            (qpipe: freeze, export_graphdef)
  strip     graph_util.remove_training_nodes               (qpipe: strip_training)
  convert   TFLiteConverter from the stripped graph: float32, float16
            (Optimize.DEFAULT + supported_types float16), int8 Optimize.DEFAULT with the
            calibration set as representative data set, and int8 OPTIMIZE_FOR_SIZE with
            the same set; each written as .tflite         (qpipe: fp16_cast, quantize_int8
                                                           x2, export_tflite x4)
  evaluate  every .tflite in LiteRT on the evaluation set: accuracy, drop from the
            float32 model, top-1 agreement; gates as in the recipe (fp16 0.005,
            int8 0.02)                                     (qpipe: validate x3)

With --graph (a frozen GraphDef, as bench/gen_bench_models.py writes) "freeze" imports
it and runs convert_variables_to_constants on it, cut to the output, as qpipe's freeze
does with a .pb. --variants picks the converter calls: float32, fp16, int8_DEFAULT and
int8_OPTIMIZE_FOR_SIZE (with the calibration set), hybrid_DEFAULT and weight_only
(Optimize.DEFAULT and OPTIMIZE_FOR_SIZE without it: dynamic-range quantization).

In TF 2.21, Optimize.OPTIMIZE_FOR_SIZE is deprecated and does what Optimize.DEFAULT
does, so both int8 files come out the same; the program still converts twice, as a
user comparing the two would. qpipe's validate also writes a per-layer error report for
each int8 model; this program does not (TF's QuantizationDebugger would add a lot).

    python tf_pipeline.py (--checkpoint PREFIX | --graph FROZEN.pb) --calib X.npy
                          --eval-x X.npy --eval-y Y.npy --out-dir DIR [--input input_x]
                          [--output score_student/output_student] [--name NAME]
                          [--variants float32,fp16,int8_DEFAULT,int8_OPTIMIZE_FOR_SIZE]

Prints one JSON document (per-step seconds, file sizes, accuracies) on stdout; exit 1
when a gate is missed.
"""
import argparse
import json
import os
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint prefix (PREFIX.meta, .index)")
    src.add_argument("--graph", help="a frozen GraphDef .pb")
    p.add_argument("--variants", default="float32,fp16,int8_DEFAULT,int8_OPTIMIZE_FOR_SIZE")
    p.add_argument("--calib", required=True)
    p.add_argument("--eval-x", required=True)
    p.add_argument("--eval-y", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--input", default="input_x")
    p.add_argument("--output", default="score_student/output_student")
    p.add_argument("--name", default="model")
    args = p.parse_args()

    steps = {}
    t = time.perf_counter()

    def lap(name):
        nonlocal t
        now = time.perf_counter()
        steps[name] = round(now - t, 4)
        t = now

    import numpy as np
    import tensorflow as tf
    try:
        from ai_edge_litert.interpreter import Interpreter
        runtime = "ai_edge_litert"
    except ImportError:
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated.*")
        Interpreter = tf.lite.Interpreter
        runtime = "tf.lite.Interpreter"
    lap("import")

    os.makedirs(args.out_dir, exist_ok=True)
    out = lambda f: os.path.join(args.out_dir, f)  # noqa: E731
    output_node = args.output.split(":")[0]

    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as sess:
        if args.checkpoint:
            saver = tf.compat.v1.train.import_meta_graph(args.checkpoint + ".meta",
                                                         clear_devices=True)
            saver.restore(sess, args.checkpoint)
        else:
            gd = tf.compat.v1.GraphDef()
            with open(args.graph, "rb") as f:
                gd.ParseFromString(f.read())
            tf.compat.v1.import_graph_def(gd, name="")
            del gd
        frozen = tf.compat.v1.graph_util.convert_variables_to_constants(
            sess, graph.as_graph_def(), [output_node])
    frozen_pb = out(f"{args.name}_frozen.pb")
    with open(frozen_pb, "wb") as f:
        f.write(frozen.SerializeToString())
    lap("freeze")

    stripped = tf.compat.v1.graph_util.remove_training_nodes(frozen, protected_nodes=[output_node])
    stripped_pb = out(f"{args.name}_stripped.pb")
    with open(stripped_pb, "wb") as f:
        f.write(stripped.SerializeToString())
    lap("strip")

    calib = np.load(args.calib)

    def representative():
        for i in range(len(calib)):
            yield [calib[i:i + 1]]

    def converter():
        return tf.compat.v1.lite.TFLiteConverter.from_frozen_graph(
            stripped_pb, [args.input], [output_node])

    # name -> (optimization, float16, calibrated)
    kinds = {"float32": (None, False, False), "fp16": ("DEFAULT", True, False),
             "int8_DEFAULT": ("DEFAULT", False, True),
             "int8_OPTIMIZE_FOR_SIZE": ("OPTIMIZE_FOR_SIZE", False, True),
             "hybrid_DEFAULT": ("DEFAULT", False, False),
             "weight_only": ("OPTIMIZE_FOR_SIZE", False, False)}
    variants = {}
    for name in args.variants.split(","):
        opt, fp16, calibrated = kinds[name]
        c = converter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if opt:
                c.optimizations = [getattr(tf.lite.Optimize, opt)]
            if fp16:
                c.target_spec.supported_types = [tf.float16]
            if calibrated:
                c.representative_dataset = representative
            variants[name] = c.convert()
        lap(f"convert_{name}")
    files = {}
    for name, blob in variants.items():
        files[name] = out(f"{args.name}_{name}.tflite")
        with open(files[name], "wb") as f:
            f.write(blob)
    lap("write_tflite")

    x = np.load(args.eval_x)
    y = np.load(args.eval_y)
    labels = y.argmax(1) if y.ndim == 2 else y
    preds = {}
    for name, path in files.items():
        it = Interpreter(model_path=path)
        inp = it.get_input_details()[0]
        it.resize_tensor_input(inp["index"], list(x.shape))
        it.allocate_tensors()
        it.set_tensor(inp["index"], x.astype(inp["dtype"]))
        it.invoke()
        preds[name] = it.get_tensor(it.get_output_details()[0]["index"]).argmax(1)
        lap(f"evaluate_{name}")

    gates = {"fp16": 0.005, "int8_DEFAULT": 0.02, "int8_OPTIMIZE_FOR_SIZE": 0.02,
             "hybrid_DEFAULT": 0.02, "weight_only": 0.02}
    ref_acc = float((preds["float32"] == labels).mean())
    models, ok = {}, True
    for name in files:
        acc = float((preds[name] == labels).mean())
        row = {"bytes": os.path.getsize(files[name]), "accuracy": acc,
               "agreement": float((preds[name] == preds["float32"]).mean())}
        if name in gates:
            row["accuracy_drop"] = ref_acc - acc
            row["gate_ok"] = ref_acc - acc <= gates[name]
            ok &= row["gate_ok"]
        models[name] = row
    json.dump({"ok": ok, "runtime": runtime, "tf_version": tf.__version__,
               "seconds": steps, "frozen_pb_bytes": os.path.getsize(frozen_pb),
               "models": models}, sys.stdout, indent=1)
    print()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
