"""Loading a quantised model for serving: seconds and CPU seconds, against the bf16 model it was made from.

    nice -n 10 .venv/bin/python benchmarks/quant_load_time.py [--model 1b|smollm2] [--reps 3] [--baseline DIR] [--serve]

Each row is a fresh process that imports mlc and torch (not timed), then times what `mlc serve` does with the
weights before it builds its engine: `load_model(path, dtype="bfloat16")` and `fuse_projections` (q/k/v and
gate/up stacked). Wall seconds and the process's CPU seconds (all threads) are the medians of --reps runs after one
untimed run (page cache warm). --baseline DIR runs the same rows with another mlc checkout (say a worktree of an
older commit) in the same run, interleaved, so both see the same machine load. --serve (SmolLM2 only) also times
`mlc serve` from launch to /health 200, with the server's CPU seconds, for bf16 and int4.

Models: 1b: benchmarks/quant_1b.py's 1.03B random Llama and its int4 (-g 32) and int8, as benchmarks/serve_vs_peers.py
--model 1b leaves them under $MLC_CACHE/bench; smollm2: SmolLM2-135M and its int4 and int8 (made once if absent).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from http.client import HTTPConnection
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.serve_vs_peers import quantized  # noqa: E402
from mlc.paths import cache_dir  # noqa: E402
from tests.conftest import smollm2_hf_dir  # noqa: E402

SCRIPT = """
import json, resource, sys, time
import torch, mlc
from mlc.models import load_model
from mlc.models.transformer import fuse_projections
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
t0, c0 = time.perf_counter(), cpu()
model = load_model(sys.argv[1], dtype="bfloat16")
t1, c1 = time.perf_counter(), cpu()
fuse_projections(model)
t2, c2 = time.perf_counter(), cpu()
print(json.dumps({"load_s": t1 - t0, "load_cpu": c1 - c0, "fuse_s": t2 - t1, "fuse_cpu": c2 - c1, "mlc": mlc.__file__,
                  "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def models(which: str) -> dict[str, Path]:
    if which == "smollm2":
        hf = smollm2_hf_dir()
        return {"bf16": hf, "int4": quantized(hf, "int4"), "int8": quantized(hf, "int8")}
    bench = cache_dir() / "bench"
    out = {"bf16": bench / "random-1b", "int4": bench / "random-1b-int4", "int8": bench / "random-1b-int8"}
    missing = [str(p) for p in out.values() if not (p / "config.json").is_file()]
    if missing:
        raise SystemExit(f"{missing[0]} is missing: run benchmarks/serve_vs_peers.py --model 1b once to make the 1B models "
                         "(then `mlc quantize <random-1b> -s int8 -o <random-1b-int8>`)")
    return out


def load_once(tree: Path, path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], capture_output=True, text=True, env=env, cwd=tree)
    if out.returncode:
        raise SystemExit(f"loading {path} with {tree} failed:\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    if not row.pop("mlc").startswith(str(tree)):
        raise SystemExit(f"the run for {tree} imported another mlc; is {tree} a checkout?")
    return row


def serve_health(tree: Path, path: Path) -> tuple[float, float]:
    """Seconds from launching `mlc serve` to /health 200, and the server's CPU seconds by then."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runs = tempfile.mkdtemp(prefix="load-bench-runs-")
    env = {**os.environ, "PYTHONPATH": str(tree), "MLC_RUNS_DIR": runs}
    cmd = [sys.executable, "-m", "mlc", "serve", str(path), "--port", str(port), "--kv-cache-memory", "256MiB", "--max-model-len", "1024"]
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=tree)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"mlc serve exited with {proc.returncode}:\n{proc.stderr.read().decode()[-3000:]}")
            try:
                conn = HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    seconds = time.perf_counter() - began
                    fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
                    return seconds, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except OSError:
                pass
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        shutil.rmtree(runs, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("1b", "smollm2"), default="1b")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--baseline", type=Path, default=None, help="another mlc checkout to time in the same run (e.g. a worktree of main)")
    ap.add_argument("--serve", action="store_true", help="also time `mlc serve` to /health 200 (bf16 and int4)")
    args = ap.parse_args()
    paths = models(args.model)
    trees = {"this": REPO, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    print(f"model {args.model}; load average at start {open('/proc/loadavg').read().split()[:3]}", flush=True)
    rows: dict[tuple[str, str], list[dict]] = {}
    for kind, path in paths.items():
        for tree in trees.values():
            load_once(tree, path)  # warm the page cache and the kernel build
        for _ in range(args.reps):
            for name, tree in trees.items():
                rows.setdefault((name, kind), []).append(load_once(tree, path))
    print(f"\n## load_model + fuse_projections (median of {args.reps}; seconds wall / CPU seconds)")
    print(f"{'checkout':9s} {'model':5s} {'load s':>7s} {'load CPU-s':>10s} {'fuse s':>7s} {'fuse CPU-s':>10s} {'total s':>8s} {'total CPU-s':>11s} {'peak RSS GB':>11s}")
    med: dict[tuple[str, str], dict[str, float]] = {}
    for (name, kind), runs in rows.items():
        m = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        m["total_s"] = statistics.median(r["load_s"] + r["fuse_s"] for r in runs)
        m["total_cpu"] = statistics.median(r["load_cpu"] + r["fuse_cpu"] for r in runs)
        med[(name, kind)] = m
        print(f"{name:9s} {kind:5s} {m['load_s']:7.2f} {m['load_cpu']:10.2f} {m['fuse_s']:7.2f} {m['fuse_cpu']:10.2f} "
              f"{m['total_s']:8.2f} {m['total_cpu']:11.2f} {m['rss_gb']:11.2f}")
    print()
    for name in trees:
        for kind in ("int4", "int8"):
            a, b = med[(name, kind)], med[(name, "bf16")]
            print(f"{name:9s} {kind} / bf16: {a['total_s'] / b['total_s']:.2f}x wall, {a['total_cpu'] / b['total_cpu']:.2f}x CPU-s (goal <= 2x)")
    if "baseline" in trees:
        for kind in ("int4", "int8", "bf16"):
            a, b = med[("baseline", kind)], med[("this", kind)]
            print(f"{kind}: baseline / this: {a['total_s'] / b['total_s']:.1f}x wall, {a['total_cpu'] / b['total_cpu']:.1f}x CPU-s")
    if args.serve:
        print(f"\n## mlc serve: launch to /health 200 (median of {args.reps}; seconds wall / server CPU seconds)")
        for kind in ("bf16", "int4"):
            for name, tree in trees.items():
                serve_health(tree, paths[kind])
                runs = [serve_health(tree, paths[kind]) for _ in range(args.reps)]
                print(f"{name:9s} {kind:5s} {statistics.median(r[0] for r in runs):7.2f} s {statistics.median(r[1] for r in runs):7.2f} CPU-s", flush=True)
    print(f"\nload average at end {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    main()
