#!/usr/bin/env python3
"""A large TextCNN checkpoint for bench/tf_vs_qpipe.py: the push_student graph
(fixtures/gen/push_student.py: TF1 ref variables, teacher/student distilled with Adam,
input `input_x`, output `score_student/output_student`) with a 200,000-word vocabulary
and a 256-wide student embedding, so the checkpoint holds a 200 MB embedding and twice
that again in its Adam slots.

    python3 bench/gen_large_textcnn.py OUT_DIR [--vocab N] [--embed N] [--steps N]

Writes OUT_DIR/best_validation.{meta,index,data-*}, checkpoint, calib_x.npy, eval_x.npy,
eval_y.npy, tf_eval_out.npy and model.json. Needs TensorFlow (fixtures/requirements.txt).
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "fixtures", "gen"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_DETERMINISTIC_OPS", "1")

import common  # noqa: E402
import push_student  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def finish(sess, saver, d, *, input_name, input_dtype, input_shape, output_name, num_classes,
           eval_x, eval_y, calib_x, tf_eval_out, notes, extra=None):
    """common.finish_model without the per-tensor dumps and the frozen copy, which
    would take minutes and gigabytes for this checkpoint."""
    saver.save(sess, os.path.join(d, common.PREFIX_NAME), write_meta_graph=True)
    common.fix_checkpoint_file(d)
    common.save_npy(os.path.join(d, "calib_x.npy"), calib_x)
    common.save_npy(os.path.join(d, "eval_x.npy"), eval_x)
    common.save_npy(os.path.join(d, "eval_y.npy"), eval_y.astype(np.int64))
    common.save_npy(os.path.join(d, "tf_eval_out.npy"), tf_eval_out.astype(np.float32))
    acc = float(np.mean(np.argmax(tf_eval_out, axis=1) == eval_y))
    info = {"inputs": {input_name: {"dtype": input_dtype, "shape": input_shape}},
            "outputs": [output_name], "num_classes": num_classes, "tf_version": tf.__version__,
            "tf_eval_accuracy": acc, "notes": notes}
    info.update(extra or {})
    common.write_json(os.path.join(d, "model.json"), info)
    print("%s: eval accuracy %.4f" % (d, acc))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--vocab", type=int, default=200_000)
    p.add_argument("--embed", type=int, default=256, help="student embedding width")
    p.add_argument("--steps", type=int, default=300, help="training steps per phase")
    args = p.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    tf.compat.v1.disable_v2_behavior()
    push_student.build(args.out_dir, finish, vocab=args.vocab, teacher_embed=32,
                       student_embed=args.embed, teacher_steps=args.steps,
                       student_steps=args.steps)


if __name__ == "__main__":
    main()
