#!/usr/bin/env python3
"""Runs a .tflite model in LiteRT (the `ai-edge-litert` interpreter) on .npy inputs.

    run_model.py MODEL --input NAME=FILE.npy [--input ...] --out-dir DIR
                 [--resolver auto|builtin|ref|no-delegates] [--batch N]

Inputs are matched to the model's input tensors by name (the tensor name or
its signature name); a model with one input also accepts any single input.
The first dimension of every input is the sample dimension. When the model's
input has a dynamic batch (shape_signature -1) the inputs are fed in chunks of
up to N samples (resizing the input), otherwise one sample at a time.
Each output is written to DIR/output_K.npy (K = position in the model's
output list) and DIR/outputs.json lists {"name", "file", "dtype", "shape"}.
Errors go to stderr as one line starting with "run_model.py: error:" and the
exit code is 1.
"""
import argparse
import json
import os
import sys


def fail(msg):
    print(f"run_model.py: error: {msg}", file=sys.stderr)
    sys.exit(1)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--input", action="append", default=[], metavar="NAME=FILE")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--resolver", default="auto",
                   choices=["auto", "builtin", "ref", "no-delegates"])
    p.add_argument("--batch", type=int, default=256)
    args = p.parse_args()

    try:
        import numpy as np
        from ai_edge_litert import interpreter as litert
    except ImportError as e:
        fail(f"cannot import the LiteRT runtime ({e}); install ai-edge-litert and numpy")

    resolvers = {
        "auto": litert.OpResolverType.AUTO,
        "builtin": litert.OpResolverType.BUILTIN,
        "ref": litert.OpResolverType.BUILTIN_REF,
        "no-delegates": litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    }
    try:
        interp = litert.Interpreter(model_path=args.model,
                                    experimental_op_resolver_type=resolvers[args.resolver])
    except Exception as e:  # the runtime raises ValueError/RuntimeError with its own message
        fail(f"LiteRT cannot load {args.model}: {e}")

    in_details = interp.get_input_details()
    out_details = interp.get_output_details()
    sig_names = {}
    try:
        for key, sig in interp.get_signature_list().items():
            runner_inputs = interp.get_signature_runner(key).get_input_details()
            for name, d in runner_inputs.items():
                sig_names[d["index"]] = name
    except Exception:
        pass

    given = {}
    for item in args.input:
        if "=" not in item:
            fail(f"--input {item!r} must be NAME=FILE.npy")
        name, path = item.split("=", 1)
        try:
            given[name] = np.load(path, allow_pickle=False)
        except Exception as e:
            fail(f"cannot read {path}: {e}")

    feeds = []
    for d in in_details:
        names = {d["name"], sig_names.get(d["index"], d["name"])}
        match = [n for n in given if n in names]
        if not match and len(in_details) == 1 and len(given) == 1:
            match = list(given)
        if not match:
            fail(f"no --input for model input {d['name']!r} (given: {sorted(given)})")
        arr = given[match[0]]
        if arr.dtype != d["dtype"]:
            fail(f"input {d['name']!r} is {d['dtype'].__name__} in the model, "
                 f"but {match[0]!r} holds {arr.dtype}")
        if arr.ndim != len(d["shape"]) or tuple(arr.shape[1:]) != tuple(d["shape"][1:]):
            fail(f"input {d['name']!r} has shape {list(d['shape_signature'])} in the model, "
                 f"but {match[0]!r} has shape {list(arr.shape)}")
        feeds.append((d, arr))
    if not feeds:
        fail("the model has no inputs")
    n = feeds[0][1].shape[0]
    if any(a.shape[0] != n for _, a in feeds):
        fail("inputs have different sample counts")

    dynamic = all(len(d["shape_signature"]) > 0 and d["shape_signature"][0] == -1
                  for d, _ in feeds)
    step = max(1, args.batch) if dynamic else int(feeds[0][0]["shape"][0])
    if not dynamic and step != 1:
        fail(f"model input has a static batch of {step}; only 1 or a dynamic batch is supported")

    results = [[] for _ in out_details]
    current = None
    try:
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
    except Exception as e:
        fail(f"LiteRT failed to run {args.model}: {e}")

    os.makedirs(args.out_dir, exist_ok=True)
    manifest = []
    for k, d in enumerate(out_details):
        out = np.concatenate(results[k], axis=0) if results[k] else np.zeros((0,))
        path = os.path.join(args.out_dir, f"output_{k}.npy")
        np.save(path, out)
        manifest.append({"name": d["name"], "file": path, "dtype": str(out.dtype),
                         "shape": list(out.shape)})
    with open(os.path.join(args.out_dir, "outputs.json"), "w") as f:
        json.dump({"resolver": args.resolver, "samples": n, "outputs": manifest}, f, indent=1)


if __name__ == "__main__":
    main()
