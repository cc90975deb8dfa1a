#!/usr/bin/env python3
"""The compute-heavy models of bench/interp_vs_litert.py, as frozen GraphDefs with their
data sets (random weights: the benchmark measures speed; the labels are the float
model's own classes, so accuracies are 1.0 for float and say what quantization loses).

    python3 bench/gen_bench_models.py OUT_DIR [--models textcnn,mobilenet] [--eval N]

* textcnn: embedding 200,000 x 256, sequence 64, 256 filters for each of k = 2, 3, 4
  (Conv2D over [1, 64, 256] rows, ReLU, max over time), concat, dense to 4 classes.
  36.4 M multiply-adds (73 MFLOP) per sample.
* mobilenet: a MobileNetV2-style CNN on 96 x 96 x 3: stride-2 stem, inverted residual
  blocks (1x1 expand, ReLU6, 3x3 depthwise, ReLU6, 1x1 project, residual add where the
  shape allows), batch norm everywhere (folded by qpipe), width 1.0 channels
  16-24-32-64-96, 1x1 to 320, global average pool, dense to 10 classes.

Writes OUT_DIR/NAME/{model.pb, calib_x.npy, eval_x.npy, eval_y.npy, model.json}.
Needs TensorFlow (e.g. /work/venv-tf/bin/python).
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "fixtures", "gen"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import famlib as F  # noqa: E402

SEED = 2026


def textcnn(rng):
    vocab, seq, embed, filters = 200_000, 64, 256, 256
    x = tf.compat.v1.placeholder(tf.int32, [None, seq], name="input_x")
    table = F.var("embedding", [vocab, embed],
                  F.const_init(rng.normal(0, 0.5, (vocab, embed)).astype(np.float32)))
    emb = tf.nn.embedding_lookup(table, x)
    pooled = []
    for k in (2, 3, 4):
        with tf.compat.v1.variable_scope("conv-maxpool-%d" % k):
            w = F.var("W", [k, embed, filters],
                      F.const_init(rng.normal(0, 1 / np.sqrt(k * embed), (k, embed, filters))
                                   .astype(np.float32)))
            b = F.var("b", [filters], F.const_init(np.full(filters, 0.05, np.float32)))
            h = tf.nn.relu(tf.nn.bias_add(tf.nn.conv1d(emb, w, stride=1, padding="VALID"), b))
            pooled.append(tf.reduce_max(h, axis=1, name="gmp"))
    h = tf.concat(pooled, axis=1, name="concat")
    logits = F.dense(h, 3 * filters, 4, "fc")
    out = tf.nn.softmax(logits, name="output")

    def data(n):
        return {"input_x": rng.integers(1, vocab, (n, seq)).astype(np.int32)}
    return "input_x", "output", data


def mobilenet(rng):
    x = tf.compat.v1.placeholder(tf.float32, [None, 96, 96, 3], name="input_x")
    h = tf.pad(x, [[0, 0], [0, 1], [0, 1], [0, 0]])
    h = F.conv(h, 3, 3, 32, "Conv1", stride=2, padding="VALID", bias=False)
    h = tf.nn.relu6(F.fused_bn(h, 32, "bn_Conv1", rng))
    c = 32
    # (expansion, out channels, repeats, first stride), as MobileNetV2 up to 96 channels.
    cfg = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 2, 2), (6, 96, 2, 1)]
    i = 0
    for t, cout, n, s in cfg:
        for r in range(n):
            stride = s if r == 0 else 1
            with tf.compat.v1.variable_scope("block_%d" % i):
                e = h
                if t != 1:
                    e = F.conv(e, 1, c, c * t, "expand", bias=False)
                    e = tf.nn.relu6(F.fused_bn(e, c * t, "expand_BN", rng))
                if stride == 2:
                    e = tf.pad(e, [[0, 0], [0, 1], [0, 1], [0, 0]])
                d = F.dwconv(e, 3, c * t, 1, "depthwise", stride=stride,
                             padding="VALID" if stride == 2 else "SAME", bias=False)
                d = tf.nn.relu6(F.fused_bn(d, c * t, "depthwise_BN", rng))
                p = F.conv(d, 1, c * t, cout, "project", bias=False)
                p = F.fused_bn(p, cout, "project_BN", rng)
                h = tf.add(h, p, name="add") if stride == 1 and c == cout else p
            c = cout
            i += 1
    h = F.conv(h, 1, c, 320, "Conv_1", bias=False)
    h = tf.nn.relu6(F.fused_bn(h, 320, "Conv_1_bn", rng))
    gap = tf.reduce_mean(h, axis=[1, 2], name="gap")
    logits = F.dense(gap, 320, 10, "logits")
    tf.nn.softmax(logits, name="output")

    def data(n):
        return {"input_x": rng.normal(0, 1, (n, 96, 96, 3)).astype(np.float32)}
    return "input_x", "output", data


MODELS = {"textcnn": textcnn, "mobilenet": mobilenet}


def generate(name, out_dir, n_eval, n_calib):
    d = os.path.join(out_dir, name)
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(SEED)
    g = tf.Graph()
    with g.as_default():
        tf.compat.v1.set_random_seed(SEED)
        inp, out, data = MODELS[name](rng)
        with tf.compat.v1.Session(graph=g) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            frozen = tf.compat.v1.graph_util.convert_variables_to_constants(
                sess, g.as_graph_def(), [out])
            calib = data(n_calib)[inp]
            ev = data(n_eval)[inp]
            y = np.concatenate([sess.run(out + ":0", {inp + ":0": ev[i:i + 256]})
                                for i in range(0, n_eval, 256)])
    with open(os.path.join(d, "model.pb"), "wb") as f:
        f.write(frozen.SerializeToString())
    np.save(os.path.join(d, "calib_x.npy"), calib)
    np.save(os.path.join(d, "eval_x.npy"), ev)
    np.save(os.path.join(d, "eval_y.npy"), np.argmax(y, 1).astype(np.int64))
    with open(os.path.join(d, "model.json"), "w") as f:
        json.dump({"inputs": [inp], "outputs": [out], "tf_version": tf.__version__,
                   "eval": n_eval, "calib": n_calib}, f, indent=1)
    print("%s: %d bytes, eval %s" % (d, os.path.getsize(os.path.join(d, "model.pb")), ev.shape))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--models", default="textcnn,mobilenet")
    p.add_argument("--eval", type=int, help="eval rows (default: textcnn 2000, mobilenet 500)")
    p.add_argument("--calib", type=int, default=100)
    a = p.parse_args()
    tf.compat.v1.disable_v2_behavior()
    for m in a.models.split(","):
        generate(m, a.out_dir, a.eval or {"textcnn": 2000, "mobilenet": 500}[m], a.calib)


if __name__ == "__main__":
    main()
