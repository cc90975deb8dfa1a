#!/usr/bin/env python3
"""A second machine's run against a warm remote cache, compared with a cold run, on the
large TextCNN (bench/textcnn_large.toml; make its model first with
`python3 bench/gen_large_textcnn.py target/bench/large_textcnn`). Not a test.

    python3 bench/remote_cache.py [N]      (default N=3 runs of each scenario)

Starts Debian's nginx with WebDAV on 127.0.0.1 (a free port) as the shared cache, and
times whole `qpipe run --json` processes, each on a machine of its own (a fresh cache
and out_dir), after `sync`:
  cold      no remote: everything built
  upload    an empty remote: everything built and uploaded (the first CI machine)
  warm      a warm remote: everything downloaded, nothing built (every later machine)
  warm-ro   the same with --no-remote-upload
Prints medians of wall time and the bytes the run moved over HTTP (from `run --json`).
"""
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, "target", "bench-remote")
MODEL = os.path.join(ROOT, "target", "bench", "large_textcnn")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_nginx(d):
    shutil.rmtree(d, ignore_errors=True)
    for sub in ("root", "tmp"):
        os.makedirs(os.path.join(d, sub))
    port = free_port()
    conf = f"""worker_processes 1; daemon off; master_process off;
pid {d}/nginx.pid; error_log {d}/error.log;
events {{}}
http {{ client_body_temp_path {d}/tmp; client_max_body_size 4g;
  proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp; uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
  access_log off;
  server {{ listen 127.0.0.1:{port}; root {d}/root;
    location / {{ dav_methods PUT; create_full_put_path on; dav_access user:rw group:rw all:r; }} }} }}
"""
    with open(os.path.join(d, "nginx.conf"), "w") as f:
        f.write(conf)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    p = subprocess.Popen([nginx, "-e", f"{d}/error.log", "-c", f"{d}/nginx.conf", "-p", d])
    for _ in range(500):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return p, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.02)
    p.kill()
    sys.exit("nginx did not start: " + open(f"{d}/error.log").read())


def machine(name):
    """A recipe of its own with its own cache and out_dir, reading the shared model."""
    d = os.path.join(WORK, "machines", name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    with open(os.path.join(ROOT, "bench", "textcnn_large.toml")) as f:
        text = f.read()
    text = text.replace('cache_dir = "../target/bench/textcnn_large.qpipe"', 'cache_dir = "cache"')
    text = text.replace('out_dir = "../target/bench/textcnn_large.out"', 'out_dir = "out"')
    text = text.replace('"../target/bench/large_textcnn/', f'"{MODEL}/')
    recipe = os.path.join(d, "textcnn_large.toml")
    with open(recipe, "w") as f:
        f.write(text)
    return recipe


def run(qpipe, recipe, args):
    subprocess.check_call(["sync"])
    t0 = time.perf_counter()
    out = subprocess.run([qpipe, "run", recipe, "--json", "-q"] + args, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"qpipe failed:\n{out.stderr}")
    doc = json.loads(out.stdout)
    statuses = sorted({(s["status"], s.get("cache")) for s in doc["stages"]}, key=str)
    remote = doc.get("remote") or {}
    return wall, remote.get("bytes_downloaded", 0), remote.get("bytes_uploaded", 0), statuses, out.stderr


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    if not os.path.exists(os.path.join(MODEL, "best_validation.index")):
        sys.exit(f"no model in {MODEL}: run python3 bench/gen_large_textcnn.py {MODEL}")
    subprocess.check_call(["cargo", "build", "--release", "--quiet"], cwd=ROOT)
    qpipe = os.path.join(ROOT, "target", "release", "qpipe")
    server, url = start_nginx(os.path.join(WORK, "server"))
    rows = {}
    try:
        def scenario(name, args, fresh_server=False):
            results = []
            for k in range(n):
                if fresh_server:
                    shutil.rmtree(os.path.join(WORK, "server", "root", "ac"), ignore_errors=True)
                    shutil.rmtree(os.path.join(WORK, "server", "root", "cas"), ignore_errors=True)
                r = run(qpipe, machine(f"{name}{k}"), args)
                results.append(r)
                print(f"{name} #{k + 1}: {r[0]:.2f} s, down {r[1] / 1e6:.1f} MB, up {r[2] / 1e6:.1f} MB, {r[3]}",
                      flush=True)
                if r[4].strip():
                    print(r[4].strip())
                shutil.rmtree(os.path.dirname(machine_path(name, k)), ignore_errors=True)
            rows[name] = results

        scenario("cold", [])
        scenario("upload", ["--remote-cache", url], fresh_server=True)
        scenario("warm", ["--remote-cache", url])
        scenario("warm-ro", ["--remote-cache", url, "--no-remote-upload"])
        stored = sum(os.path.getsize(os.path.join(dp, f))
                     for dp, _, fs in os.walk(os.path.join(WORK, "server", "root")) for f in fs)
    finally:
        server.kill()
        server.wait()
    print()
    print(f"server holds {stored / 1e6:.1f} MB; medians of {n} runs on {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}")
    print("| scenario | wall | downloaded | uploaded |")
    print("|---|---|---|---|")
    for name, rs in rows.items():
        print(f"| {name} | {statistics.median(r[0] for r in rs):.2f} s "
              f"| {statistics.median(r[1] for r in rs) / 1e6:.1f} MB "
              f"| {statistics.median(r[2] for r in rs) / 1e6:.1f} MB |")
    cold = statistics.median(r[0] for r in rows["cold"])
    warm = statistics.median(r[0] for r in rows["warm"])
    print(f"warm remote vs cold: {cold / warm:.1f}x faster")


def machine_path(name, k):
    return os.path.join(WORK, "machines", f"{name}{k}", "textcnn_large.toml")


if __name__ == "__main__":
    main()
