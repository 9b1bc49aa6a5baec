"""Load and unload times of `mlc serve A B --max-memory` (room for one model): what a request pays when its model is swapped in.

    .venv/bin/python benchmarks/serve_model_swap.py [--rounds 4] [--dtype bfloat16] [--threads 2]

Serves SmolLM2-135M-Instruct twice (served as `a` and `b`, the same directory: each load reads its weights from disk,
the page cache warm after the first) with --max-memory that holds one of them, then alternates one-token completions
a, b, a, b, ... (every request after the first unloads one model and loads the other), and for comparison as many
requests to the model already loaded. Reported: the server's own load and unload times (mlc:model_load_seconds,
mlc:model_unload_seconds from /metrics, means over the swaps) and the median latency of a request that swaps against
one that does not (their ratio). Then, in a second server without --max-memory, the decode cost of a neighbour in memory:
the median latency of a 32-token greedy completion of `a` before and after `b` was loaded (idle, its engine thread
waiting), as each model's engine thread has its own OpenMP pool.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from http.client import HTTPConnection
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import smollm2_hf_dir  # noqa: E402


def request(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
    conn = HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request(method, path, body=json.dumps(body) if body is not None else None, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, r.read()


def samples(port: int) -> dict[tuple[str, str], float]:
    """{(sample name, model_name): value} from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(request(port, "GET", "/metrics")[1].decode()):
        for s in family.samples:
            out[(s.name, s.labels.get("model_name", ""))] = s.value
    return out


def complete(port: int, model: str, tokens: int = 1) -> float:
    began = time.perf_counter()
    status, body = request(port, "POST", "/v1/completions",
                           {"model": model, "prompt": "Hello", "max_tokens": tokens, "temperature": 0, "ignore_eos": True})
    assert status == 200, body
    return time.perf_counter() - began


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--kv-cache-memory", default="64MiB")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from mlc.commands.serve.modelset import footprint
    from mlc.commands.serve.server import parse_memory

    model = smollm2_hf_dir()
    kv = parse_memory(args.kv_cache_memory, 0)
    one = sum(footprint(model, args.dtype, kv))
    work = Path(tempfile.mkdtemp(prefix="serve-swap-"))

    def start(port: int, *extra: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "mlc", "--runs-dir", str(work / "runs"), "serve", str(model), str(model), "--served-model-name", "a",
               "--served-model-name", "b", "--dtype", args.dtype, "--kv-cache-memory", args.kv_cache_memory, "--port", str(port),
               "--threads", str(args.threads), *extra]
        proc = subprocess.Popen(cmd, stdout=open(work / f"server-{port}.log", "w"), stderr=subprocess.STDOUT)
        for _ in range(1200):
            try:
                if request(port, "GET", "/health")[0] == 200:
                    return proc
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError((work / f"server-{port}.log").read_text())

    port = 21000 + os.getpid() % 1000
    proc = start(port, "--max-memory", str(one))
    try:
        complete(port, "a")  # warm: the first request of a process pays for more than the model
        swaps = [complete(port, m) for _ in range(args.rounds) for m in ("b", "a")]
        warm = [complete(port, "a") for _ in range(len(swaps))]
        s = samples(port)
    finally:
        proc.terminate()
        proc.wait(60)
    proc = start(port + 1)
    try:
        complete(port + 1, "a")
        alone = [complete(port + 1, "a", 32) for _ in range(args.rounds)]
        complete(port + 1, "b")
        neighbour = [complete(port + 1, "a", 32) for _ in range(args.rounds)]
    finally:
        proc.terminate()
        proc.wait(60)
    loads = {m: (s[("mlc:model_load_seconds_sum", m)], s[("mlc:model_load_seconds_count", m)]) for m in "ab"}
    unloads = {m: (s[("mlc:model_unload_seconds_sum", m)], s[("mlc:model_unload_seconds_count", m)]) for m in "ab"}
    load_mean = sum(v[0] for v in loads.values()) / sum(v[1] for v in loads.values())
    unload_mean = sum(v[0] for v in unloads.values()) / sum(v[1] for v in unloads.values())
    result = {
        "model": str(model), "dtype": args.dtype, "footprint_mib": round(one / 2**20, 1), "swaps": len(swaps),
        "loads": int(sum(v[1] for v in loads.values())), "unloads": int(sum(v[1] for v in unloads.values())),
        "load_s_mean": round(load_mean, 3), "unload_s_mean": round(unload_mean, 3),
        "swap_request_s_median": round(statistics.median(swaps), 3), "warm_request_s_median": round(statistics.median(warm), 3),
        "swap_over_warm": round(statistics.median(swaps) / statistics.median(warm), 1),
        "decode32_s_alone": round(statistics.median(alone), 3), "decode32_s_with_neighbour": round(statistics.median(neighbour), 3),
        "neighbour_over_alone": round(statistics.median(neighbour) / statistics.median(alone), 2),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }
    print(json.dumps(result, indent=1))
    subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
