#!/usr/bin/env python3
"""Loads a GraphDef that qpipe exported into real TensorFlow and checks it gives the
same outputs as TensorFlow's own frozen graph of the same checkpoint.

Usage (in a virtualenv with tensorflow-cpu, e.g. the one fixtures/requirements.txt pins):
    python bench/verify_graphdef_in_tf.py out/push_student_frozen.pb fixtures/push_student

Exits non-zero on any mismatch. Not part of the tests (tests never need TensorFlow).
"""
import json
import sys

import numpy as np
import tensorflow as tf


def main():
    pb_path, fixture = sys.argv[1], sys.argv[2]
    model = json.load(open(f"{fixture}/model.json"))
    (inp,) = model["inputs"].keys()
    out = model["outputs"][0]
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(open(pb_path, "rb").read())
    with tf.Graph().as_default() as g:
        tf.compat.v1.import_graph_def(graph_def, name="")
        with tf.compat.v1.Session(graph=g) as sess:
            x = np.load(f"{fixture}/eval_x.npy")
            y = sess.run(f"{out}:0", {f"{inp}:0": x})
    want = np.load(f"{fixture}/tf_frozen_eval_out.npy")
    diff = float(np.max(np.abs(y - want)))
    print(f"{pb_path}: {len(graph_def.node)} nodes, max abs diff vs TF's frozen graph = {diff:.3g}")
    sys.exit(0 if diff <= 1e-6 else 1)


if __name__ == "__main__":
    main()
