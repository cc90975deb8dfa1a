#!/usr/bin/env python3
"""Runs several .tflite models in one LiteRT process (one interpreter import for all).

    run_batch.py JOBS.json

JOBS.json is a list of {"args": [...]}: each is the argument list of run_model.py
(MODEL --input NAME=FILE ... --out-dir DIR --resolver R). Every job runs; a job that
fails writes DIR/error.txt with run_model.py's message instead of outputs.json. The exit
code is 0 once every job ran.
"""
import contextlib
import io
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_model  # noqa: E402


def main():
    jobs = json.load(open(sys.argv[1]))
    for job in jobs:
        args = job["args"]
        out_dir = args[args.index("--out-dir") + 1]
        os.makedirs(out_dir, exist_ok=True)
        err = io.StringIO()
        sys.argv = ["run_model.py"] + args
        try:
            with contextlib.redirect_stderr(err):
                run_model.main()
        except SystemExit as e:
            if e.code:
                with open(os.path.join(out_dir, "error.txt"), "w") as f:
                    f.write(err.getvalue() or "run_model.py exited with %r" % e.code)


if __name__ == "__main__":
    main()
