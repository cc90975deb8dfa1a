#!/usr/bin/env python3
"""Runs many .tflite models in LiteRT in one process (one interpreter start-up for all).

    run_jobs.py JOBS.json

JOBS.json is a list of {"model", "inputs": {NAME: FILE.npy}, "resolver": "ref"|"builtin",
"out_dir"}. Inputs are matched to the model's inputs by tensor name (a model with one
input takes the single given file). Float data for an int8, uint8 or int16 input is quantized
with the input's scale and zero point, and an int8/uint8/int16 output is dequantized with its
own, so that every output can be compared with float references. Rows are fed one at a
time, or in chunks of 256 when the batch dimension is dynamic.

Each job's outputs go to OUT_DIR/output_K.npy (K = position in the model's output list).
A job that fails (the model does not load, an op has no kernel, an input is missing)
does not stop the others. The result, one entry per job in order, is printed on stdout
as JSON: {"ok": true, "outputs": [FILE, ...]} or {"ok": false, "error": TEXT}.
"""
import json
import os
import sys

import numpy as np
from ai_edge_litert import interpreter as litert

RESOLVERS = {
    "ref": litert.OpResolverType.BUILTIN_REF,
    "builtin": litert.OpResolverType.BUILTIN,
}


def quantize_feed(d, arr):
    if d["dtype"] in (np.int8, np.uint8, np.int16) and arr.dtype == np.float32:
        scale, zp = d["quantization"]
        info = np.iinfo(d["dtype"])
        q = np.round(arr / scale) + zp
        return np.clip(q, info.min, info.max).astype(d["dtype"])
    return arr


def dequantize_output(d, arr):
    if d["dtype"] in (np.int8, np.uint8, np.int16):
        scale, zp = d["quantization"]
        return ((arr.astype(np.float32) - zp) * scale).astype(np.float32)
    return arr


def run(job):
    interp = litert.Interpreter(model_path=job["model"],
                                experimental_op_resolver_type=RESOLVERS[job["resolver"]])
    ins = interp.get_input_details()
    outs = interp.get_output_details()
    given = {k: np.load(v, allow_pickle=False) for k, v in job["inputs"].items()}
    feeds = []
    for d in ins:
        if d["name"] in given:
            arr = given[d["name"]]
        elif len(ins) == 1 and len(given) == 1:
            arr = next(iter(given.values()))
        else:
            raise ValueError(f"no input for model input {d['name']!r} (given {sorted(given)})")
        feeds.append((d, quantize_feed(d, arr)))
    n = feeds[0][1].shape[0]
    dynamic = all(len(d["shape_signature"]) > 0 and d["shape_signature"][0] == -1
                  for d, _ in feeds)
    step = 256 if dynamic else 1
    results = [[] for _ in outs]
    current = None
    for start in range(0, n, step):
        stop = min(n, start + step)
        if dynamic and current != stop - start:
            for d, a in feeds:
                interp.resize_tensor_input(d["index"], [stop - start] + list(a.shape[1:]),
                                           strict=True)
            interp.allocate_tensors()
            current = stop - start
        elif current is None:
            interp.allocate_tensors()
            current = step
        for d, a in feeds:
            interp.set_tensor(d["index"], np.ascontiguousarray(a[start:stop]))
        interp.invoke()
        for k, d in enumerate(interp.get_output_details()):
            results[k].append(interp.get_tensor(d["index"]).copy())
    os.makedirs(job["out_dir"], exist_ok=True)
    files = []
    for k, d in enumerate(outs):
        out = dequantize_output(d, np.concatenate(results[k], axis=0))
        path = os.path.join(job["out_dir"], f"output_{k}.npy")
        np.save(path, out)
        files.append(path)
    return files


def main():
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    report = []
    for job in jobs:
        try:
            report.append({"ok": True, "outputs": run(job)})
        except Exception as e:  # LiteRT raises ValueError/RuntimeError with its own text
            report.append({"ok": False, "error": f"{type(e).__name__}: {e}".strip()})
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
