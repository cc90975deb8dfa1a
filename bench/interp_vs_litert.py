#!/usr/bin/env python3
"""qpipe's interpreter against LiteRT on the same .tflite files and samples: CPU time per
sample on one core, for the float, fp16, int8 full-integer, hybrid (dynamic range) and
weight-only variants of each model. Not a test; prints a table and writes
WORK/results.{json,md}.

    python3 bench/interp_vs_litert.py [--work DIR] [--models a,b] [--samples N]
                                      [--repeats R] [--litert-python PY] [--tf-python PY]
                                      [--ref] [--cold] [--runtime litert-ref|xnnpack]

For each model a recipe (WORK/NAME/recipe.toml) builds the five variants and exports
each as .tflite; `qpipe run` builds it (with --cold, timed as a cold whole-recipe run:
wall, CPU and peak RSS, with a validate stage per variant over the whole eval set).
Then, per variant:

* qpipe: `qpipe eval --stage VARIANT --samples N --json` under RAYON_NUM_THREADS=1
  (one core; eval runs batches of up to 64 rows, fewer when the tensors are large),
  the CPU time it reports for the evaluation (`cpu_seconds`: reading the rows,
  running the plan; not loading the cached model) divided by N when that is a second or
  more (it counts 1/100 s ticks), else the child's CPU time (wait4) minus that of the
  same command with --samples 0, divided by N.
  The model qpipe evaluates is the graph the .tflite is an export of.
* LiteRT: ai-edge-litert's `Interpreter(model_path, num_threads=1)` (the default
  resolver: builtin optimized kernels with the XNNPACK delegate), a batch-1 loop over
  the same N rows (set_tensor, invoke, get_tensor), process CPU time around the loop
  after one warm-up invoke. With --ref also OpResolverType.BUILTIN_REF, the kernels whose
  arithmetic qpipe's default runtime reproduces.

qpipe evaluates with its default runtime (`litert-ref`: the int8 and hybrid arithmetic of
BUILTIN_REF); --runtime xnnpack times it with the arithmetic of the default resolver it is
compared with (XNNPACK's f32 requantization), which only changes the int8 and hybrid ops.

The eval rows are repeated (WORK/NAME/timing_*.npy, the recipe's `timing` data set): the
fixtures' to 20,000 rows, the generated models' five times (TextCNN 10,000, MobileNet 2,500),
so that qpipe's own CPU figure is over a second and the whole-process fallback, whose
loading of a large model varies by tenths of a second, is not needed.

Both take the median of R repeats. CPU time rather than wall, since the machine may be
shared. Models: the fixtures push_student, conv_bn, mlp_res, and the generated textcnn
(200k x 256 embedding, sequence 64, 256 filters for each of k = 2, 3, 4) and mobilenet
(MobileNetV2-style, 96 x 96 x 3) of bench/gen_bench_models.py, generated on demand
into WORK/models with --tf-python (TensorFlow; e.g. /work/venv-tf/bin/python).

The LiteRT python defaults to target/litert-venv/bin/python, the venv the tests create
(ai-edge-litert 2.3.0).
"""
import argparse
import json
import os
import selectors
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ["float", "fp16", "int8", "hybrid", "weight_only"]
FIXTURES = ["push_student", "conv_bn", "mlp_res"]
GENERATED = ["textcnn", "mobilenet"]

RECIPE = """[pipeline]
name = "{name}"
cache_dir = "cache"
out_dir = "out"

[model]
{model}
inputs = ["{inp}"]
outputs = ["{out}"]

[datasets.calib]
{inp} = "{calib}"

[datasets.eval]
{inp} = "{eval}"
labels = "{labels}"

[datasets.timing]
{inp} = "{timing}"
labels = "{timing_labels}"

[stages.freeze]
kind = "freeze"

[stages.float]
kind = "strip_training"
input = "freeze"

[stages.fp16]
kind = "fp16_cast"
input = "float"

[stages.int8]
kind = "quantize_int8"
input = "float"
strategy = "DEFAULT"
calibration = "calib"

[stages.hybrid]
kind = "quantize_int8"
input = "float"
strategy = "DEFAULT"

[stages.weight_only]
kind = "quantize_int8"
input = "float"
strategy = "OPTIMIZE_FOR_SIZE"
"""

EXPORT = """
[stages.tflite_{v}]
kind = "export_tflite"
input = "{v}"
path = "{v}.tflite"
"""

CHECK = """
[stages.check_{v}]
kind = "validate"
reference = "float"
candidate = "{v}"
dataset = "eval"
report = "{v}.layers.json"
"""

LITERT_SCRIPT = r"""
import json, sys, time, statistics
import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType
job = json.load(sys.stdin)
x_all = np.load(job["eval"], mmap_mode="r")
res = {}
for v, path in job["files"].items():
    for resolver in job["resolvers"]:
        kw = {"num_threads": 1}
        if resolver == "BUILTIN_REF":
            kw["experimental_op_resolver_type"] = OpResolverType.BUILTIN_REF
        it = Interpreter(model_path=path, **kw)
        it.allocate_tensors()
        d = it.get_input_details()[0]
        o = it.get_output_details()[0]
        if list(d["shape"][1:]) != list(x_all.shape[1:]) or d["shape"][0] != 1:
            it.resize_tensor_input(d["index"], [1] + list(x_all.shape[1:]))
            it.allocate_tensors()
        n = job["samples"]
        rows = [np.ascontiguousarray(x_all[i:i + 1]).astype(d["dtype"]) for i in range(n)]
        it.set_tensor(d["index"], rows[0]); it.invoke()
        times = []
        for _ in range(job["repeats"]):
            t0 = time.process_time()
            for r in rows:
                it.set_tensor(d["index"], r)
                it.invoke()
                it.get_tensor(o["index"])
            times.append((time.process_time() - t0) / n * 1e3)
        res["%s/%s" % (v, resolver)] = statistics.median(times)
print(json.dumps(res))
"""


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def run_child(cmd, env=None, cwd=None):
    """Runs cmd; returns (rc, wall s, CPU s, peak RSS bytes, stdout, stderr), the
    rusage from wait4 on this child alone."""
    r_out, w_out = os.pipe()
    r_err, w_err = os.pipe()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            if cwd:
                os.chdir(cwd)
            os.dup2(w_out, 1)
            os.dup2(w_err, 2)
            os.execvpe(cmd[0], cmd, env or os.environ)
        finally:
            os._exit(127)
    os.close(w_out)
    os.close(w_err)
    out = b""
    err = b""
    sel = selectors.DefaultSelector()
    sel.register(r_out, selectors.EVENT_READ, "out")
    sel.register(r_err, selectors.EVENT_READ, "err")
    open_fds = 2
    while open_fds:
        for key, _ in sel.select():
            chunk = os.read(key.fd, 65536)
            if not chunk:
                sel.unregister(key.fd)
                os.close(key.fd)
                open_fds -= 1
            elif key.data == "out":
                out += chunk
            else:
                err += chunk
    _, status, ru = os.wait4(pid, 0)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    return rc, wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss * 1024, out.decode(), err.decode()


def npy_rows(path):
    """The first dimension of a .npy file, from its header (no numpy needed)."""
    import ast
    with open(path, "rb") as f:
        head = f.read(10)
        n = int.from_bytes(head[8:10], "little") if head[6] == 1 else int.from_bytes(
            head[8:10] + f.read(2), "little")
        header = ast.literal_eval(f.read(n).decode("latin1"))
    return header["shape"][0]


def tiled(evalf, labels, n, d, py):
    """The eval rows (and labels) repeated up to n rows, as d/timing_{x,y}.npy: the fixtures
    have 1,000 rows or fewer, which at microseconds a row is too little CPU time to measure."""
    out = (os.path.join(d, "timing_x.npy"), os.path.join(d, "timing_y.npy"))
    if all(os.path.exists(f) for f in out) and npy_rows(out[0]) == n and all(
            os.path.getmtime(f) >= os.path.getmtime(src) for f, src in zip(out, (evalf, labels))):
        return out
    script = ("import sys, numpy as np\n"
              "n = int(sys.argv[1])\n"
              "for src, dst in zip(sys.argv[2:4], sys.argv[4:6]):\n"
              "    a = np.load(src)\n"
              "    np.save(dst, np.concatenate([a] * (-(-n // len(a))))[:n])\n")
    subprocess.run([py, "-c", script, str(n), evalf, labels, out[0], out[1]], check=True)
    return out


def model_files(name, work, tf_python):
    """(model line, input, output, calib, eval, labels) of a model, generating it if needed."""
    if name in FIXTURES:
        d = os.path.join(ROOT, "fixtures", name)
        info = json.load(open(os.path.join(d, "model.json")))
        inp = next(iter(info["inputs"]))
        return ('checkpoint = "%s"' % os.path.join(d, "best_validation"), inp, info["outputs"][0],
                os.path.join(d, "calib_x.npy"), os.path.join(d, "eval_x.npy"),
                os.path.join(d, "eval_y.npy"))
    d = os.path.join(work, "models", name)
    if not os.path.exists(os.path.join(d, "model.json")):
        if not tf_python:
            sys.exit("%s is not generated in %s; pass --tf-python (a Python with TensorFlow)" % (name, d))
        log("generating %s ..." % name)
        subprocess.run(["nice", "-n", "10", tf_python, os.path.join(ROOT, "bench", "gen_bench_models.py"),
                        os.path.join(work, "models"), "--models", name], check=True)
    info = json.load(open(os.path.join(d, "model.json")))
    return ('graph = "%s"' % os.path.join(d, "model.pb"), info["inputs"][0], info["outputs"][0],
            os.path.join(d, "calib_x.npy"), os.path.join(d, "eval_x.npy"), os.path.join(d, "eval_y.npy"))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=os.path.join(ROOT, "target", "bench", "interp"))
    p.add_argument("--models", default=",".join(FIXTURES + GENERATED))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--samples", type=int, default=0,
                   help="rows timed per variant (default: 20,000 for the fixtures, their eval rows "
                   "repeated; the generated models' eval rows five times)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--qpipe", default=os.path.join(ROOT, "target", "release", "qpipe"))
    p.add_argument("--litert-python", default=os.path.join(ROOT, "target", "litert-venv", "bin", "python"))
    p.add_argument("--tf-python", default=os.environ.get("QPIPE_BENCH_TF_PYTHON"))
    p.add_argument("--ref", action="store_true", help="also time LiteRT's BUILTIN_REF resolver")
    p.add_argument("--cold", action="store_true",
                   help="time the first qpipe run (with a validate stage per variant) as a cold run")
    p.add_argument("--threads", type=int, default=1, help="RAYON_NUM_THREADS for qpipe eval")
    p.add_argument("--runtime", choices=["litert-ref", "xnnpack"], default="litert-ref",
                   help="qpipe eval's --runtime (the int8/hybrid arithmetic)")
    a = p.parse_args()
    a.work = os.path.abspath(a.work)
    if not os.path.exists(a.qpipe):
        sys.exit("%s is missing: cargo build --release" % a.qpipe)
    variants = a.variants.split(",")
    results = {"machine": open("/proc/loadavg").read().split()[:3], "qpipe_runtime": a.runtime,
               "models": {}}
    resolvers = ["default"] + (["BUILTIN_REF"] if a.ref else [])
    for name in a.models.split(","):
        model, inp, out, calib, evalf, labels = model_files(name, a.work, a.tf_python)
        d = os.path.join(a.work, name)
        os.makedirs(d, exist_ok=True)
        recipe = os.path.join(d, "recipe.toml")
        rows = npy_rows(evalf)
        n = a.samples or (20000 if name in FIXTURES else 5 * rows)
        timing, timing_labels = evalf, labels
        if n > rows:
            timing, timing_labels = tiled(evalf, labels, n, d, a.litert_python)
        n = min(n, npy_rows(timing))
        text = RECIPE.format(name=name, model=model, inp=inp, out=out, calib=calib, eval=evalf,
                             labels=labels, timing=timing, timing_labels=timing_labels)
        text += "".join(EXPORT.format(v=v) for v in variants)
        if a.cold:
            text += "".join(CHECK.format(v=v) for v in variants if v != "float")
        old = open(recipe).read() if os.path.exists(recipe) else None
        if old != text:
            with open(recipe, "w") as f:
                f.write(text)
        rec = {"variants": {}}
        if a.cold:
            subprocess.run(["rm", "-rf", os.path.join(d, "cache"), os.path.join(d, "out")], check=True)
            os.sync()
        rc, wall, cpu, rss, so, se = run_child([a.qpipe, "run", recipe, "-q"])
        if rc != 0:
            sys.exit("qpipe run %s failed:\n%s%s" % (recipe, so, se))
        if a.cold:
            rec["cold_run"] = {"wall_s": wall, "cpu_s": cpu, "peak_rss_mib": rss / 2**20,
                               "load": open("/proc/loadavg").read().split()[:3]}
            log("%s: cold run %.2f s wall, %.2f s CPU, %.0f MiB" % (name, wall, cpu, rss / 2**20))
        env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
        for v in variants:
            def cpu_of(samples):
                rc, _, cpu, rss, so, se = run_child(
                    [a.qpipe, "eval", recipe, "--stage", v, "--dataset", "timing", "--samples",
                     str(samples), "--runtime", a.runtime, "--json", "-q"], env=env)
                if rc != 0:
                    sys.exit("qpipe eval %s %s failed:\n%s%s" % (name, v, so, se))
                return cpu, rss, json.loads(so)
            runs = [cpu_of(n) for _ in range(a.repeats)]
            reported = [r[2].get("cpu_seconds") for r in runs]
            # The reported time counts 1/100 s ticks: use it from a second on.
            if all(c is not None for c in reported) and statistics.median(reported) >= 1.0:
                base = 0.0
                full = statistics.median(reported)
            else:
                base = statistics.median(cpu_of(0)[0] for _ in range(a.repeats))
                full = statistics.median(r[0] for r in runs)
            rec["variants"][v] = {
                "qpipe_ms": (full - base) / n * 1e3,
                "qpipe_load_s": base,
                "qpipe_peak_rss_mib": max(r[1] for r in runs) / 2**20,
                "qpipe_accuracy": runs[0][2].get("accuracy"),
                "tflite_bytes": os.path.getsize(os.path.join(d, "out", v + ".tflite")),
            }
        job = {"eval": timing, "samples": n, "repeats": a.repeats, "resolvers": resolvers,
               "files": {v: os.path.join(d, "out", v + ".tflite") for v in variants}}
        r = subprocess.run(["nice", "-n", "0", a.litert_python, "-c", LITERT_SCRIPT],
                           input=json.dumps(job), capture_output=True, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
        if r.returncode != 0:
            sys.exit("LiteRT failed on %s:\n%s" % (name, r.stderr[-4000:]))
        lt = json.loads(r.stdout.strip().splitlines()[-1])
        for v in variants:
            for res in resolvers:
                rec["variants"][v]["litert_%s_ms" % res] = lt["%s/%s" % (v, res)]
        rec["samples"] = n
        results["models"][name] = rec
        for v in variants:
            x = rec["variants"][v]
            log("%-12s %-11s qpipe %8.3f ms  litert %8.3f ms  (%.2fx)" % (
                name, v, x["qpipe_ms"], x["litert_default_ms"], x["qpipe_ms"] / x["litert_default_ms"]))
    lines = ["| model | samples | variant | qpipe ms | LiteRT ms | qpipe / LiteRT |"
             + (" LiteRT REF ms |" if a.ref else ""),
             "|---|---:|---|---:|---:|---:|" + ("---:|" if a.ref else "")]
    for name, rec in results["models"].items():
        for v, x in rec["variants"].items():
            line = "| %s | %d | %s | %.3f | %.3f | %.2f× |" % (
                name, rec["samples"], v, x["qpipe_ms"], x["litert_default_ms"],
                x["qpipe_ms"] / x["litert_default_ms"])
            if a.ref:
                line += " %.3f |" % x["litert_BUILTIN_REF_ms"]
            lines.append(line)
        if "cold_run" in rec:
            c = rec["cold_run"]
            lines.append("| %s | cold run | | %.2f s wall, %.2f s CPU, %.0f MiB | | |" % (
                name, c["wall_s"], c["cpu_s"], c["peak_rss_mib"]))
    md = "\n".join(lines) + "\n"
    print(md)
    with open(os.path.join(a.work, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(a.work, "results.md"), "w") as f:
        f.write(md)


if __name__ == "__main__":
    main()
