"""Start-up of `mlc serve --compile` on SmolLM2-135M int4: seconds to /health 200 and to the compiled decode step, cold and warm.

    nice -n 10 .venv/bin/python benchmarks/serve_compile_start.py [--tokens 64] [--reps 3] [--max-running 128] [--keep DIR]

Three launches of `mlc serve <SmolLM2 int4> --port P` (the int4 directory that benchmarks/serve_vs_peers.py makes under
$MLC_CACHE/bench), each with its own MLC_CACHE so torch's compile cache starts where this benchmark says (mlc's own
kernels are copied in from $MLC_CACHE/kernels, so no launch pays for building them):
  eager   without --compile;
  cold    with --compile and an empty compile cache (a fresh clone);
  warm    with --compile again, on the cache the cold launch left.
For each: seconds from launch to /health 200; with --compile, seconds until the batch-1 decode step is compiled and in
use (mlc:compiled_decode_kinds >= 1, polled) and until every kind is (mlc:compiled_decode_kinds ==
mlc:decode_kinds_to_compile); batch-1 decode tokens/s (median over --reps greedy completions of --tokens tokens, after
every kind is in use, so the compile does not share the cores); the server's CPU seconds (its compile subprocesses
included); graphs loaded from the compile cache and built, in all and for the batch-1 kind (what the load of the
machine does not change). Goals (issue 19): /health 200 within 15 s with or without --compile; compiled speed within 120 s cold and
20 s warm.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
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


def request(port: int, method: str, path: str, body: dict | None = None, timeout: float = 600) -> tuple[int, bytes]:
    conn = HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request(method, path, body=json.dumps(body) if body is not None else None, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, r.read()


def gauges(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(request(port, "GET", "/metrics")[1].decode()):
        for s in family.samples:
            out[s.name] = s.value
    return out


def decode_rate(port: int, tokens: int, reps: int) -> float:
    """Median batch-1 decode tokens/s: a greedy completion of `tokens` tokens (the prompt's prefill is short)."""
    rates = []
    for _ in range(reps):
        began = time.perf_counter()
        status, body = request(port, "POST", "/v1/completions",
                               {"model": "m", "prompt": "Once upon a time", "max_tokens": tokens, "temperature": 0, "ignore_eos": True})
        assert status == 200, body
        rates.append(json.loads(body)["usage"]["completion_tokens"] / (time.perf_counter() - began))
    return statistics.median(rates)


def launch(model: Path, cache: Path, compile: bool, tokens: int, reps: int, log: Path, max_running: int) -> dict[str, float | None]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLC_CACHE": str(cache), "MLC_RUNS_DIR": str(cache / "runs")}
    cmd = [sys.executable, "-m", "mlc", "serve", str(model), "--port", str(port), "--served-model-name", "m",
           "--kv-cache-memory", "256MiB", "--max-model-len", "1024", "--max-running", str(max_running),
           *(["--compile"] if compile else [])]
    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    out: dict[str, float | None] = {"health_s": None, "single_s": None, "all_s": None}
    try:
        while out["health_s"] is None:
            if proc.poll() is not None:
                raise SystemExit(f"mlc serve exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if request(port, "GET", "/health", timeout=5)[0] == 200:
                    out["health_s"] = time.perf_counter() - began
            except OSError:
                pass
            time.sleep(0.05)
        while compile and out["all_s"] is None:
            g = gauges(port)
            now = time.perf_counter() - began
            if g.get("mlc:compile_failed"):
                raise SystemExit(f"the compile failed:\n{log.read_text()}")
            if g["mlc:compiled_decode_kinds"] >= 1 and out["single_s"] is None:
                out["single_s"] = now
            if g["mlc:compiled_decode_kinds"] == g["mlc:decode_kinds_to_compile"]:
                out["all_s"] = now
            time.sleep(0.2)
        out["tok_s"] = decode_rate(port, tokens, reps)
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    out["cpu_s"] = usage.ru_utime + usage.ru_stime - usage0.ru_utime - usage0.ru_stime
    text = log.read_text()
    if m := re.search(r"(\d+) graphs loaded from the cache, (\d+) built", text):
        out["cache_hits"], out["built"] = int(m.group(1)), int(m.group(2))
    if re.search(r"stay eager \([^)]*\bsingle\b", text):  # int4 layers run natively at batch 1: full speed from the start
        out["single_s"], out["single_eager"] = out["health_s"], True
    if m := re.search(r"decode step 'single' in use after [0-9.]+s \(graphs: (\d+) loaded from the cache, (\d+) built\)", text):
        out["single_hits"], out["single_built"] = int(m.group(1)), int(m.group(2))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-running", type=int, default=128,
                    help="the servers' --max-running (1: only the batch-1 decode step is compiled, a quicker run on a busy machine)")
    ap.add_argument("--no-eager", action="store_true", help="skip the eager launch (no eager /health time or tok/s ratio)")
    ap.add_argument("--keep", type=Path, default=None, help="work directory to keep (default: a temporary one, deleted)")
    args = ap.parse_args()
    model = quantized(smollm2_hf_dir(), "int4")
    work = args.keep or Path(tempfile.mkdtemp(prefix="compile-bench-"))
    print(f"model {model}; load average at start {open('/proc/loadavg').read().split()[:3]}", flush=True)
    try:
        rows = {}
        launches = (("eager", False, "eager"), ("cold", True, "compile"), ("warm", True, "compile"))[args.no_eager:]
        for name, compile, cache in launches:
            (work / cache).mkdir(parents=True, exist_ok=True)
            if (cache_dir() / "kernels").is_dir() and not (work / cache / "kernels").exists():
                shutil.copytree(cache_dir() / "kernels", work / cache / "kernels")
            rows[name] = r = launch(model, work / cache, compile, args.tokens, args.reps, work / f"{name}.log", args.max_running)
            print(f"{name:6s} " + "  ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items())
                  + f"   load {open('/proc/loadavg').read().split()[:3]}", flush=True)
        eager = rows["eager"]["tok_s"] if "eager" in rows else None
        for name in ("cold", "warm"):
            r, goal = rows[name], {"cold": 120, "warm": 20}[name]
            print(f"{name}: /health 200 after {r['health_s']:.1f}s (goal 15: {'met' if r['health_s'] <= 15 else 'NOT met'}); "
                  f"batch-1 {'step at full speed (eager by design)' if r.get('single_eager') else 'compiled step in use'} after {r['single_s']:.1f}s (goal {goal}: {'met' if r['single_s'] <= goal else 'NOT met'}), "
                  f"every kind after {r['all_s']:.1f}s; decode {r['tok_s']:.1f} tok/s compiled"
                  + (f" vs {eager:.1f} eager ({r['tok_s'] / eager:.2f}x)" if eager else ""))
        if "eager" in rows:
            print(f"eager: /health 200 after {rows['eager']['health_s']:.1f}s (goal 15: {'met' if rows['eager']['health_s'] <= 15 else 'NOT met'})")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
