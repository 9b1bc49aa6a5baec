"""The cost of `mlc bench serve`'s own client, so it is known never to be what a benchmark measures.

    .venv/bin/python benchmarks/bench_client_overhead.py [--skip-serve] [--streams 64]

1. Against an instant server (tests/bench/scripted_server.py: every token of a response in one write,
   its own process pinned to core 1) with the client pinned to core 0: the TTFT floor (one request at
   a time, one token), the highest request rate (one-token responses, 64 in flight) and the most
   streamed tokens/s (256-token responses, 64 in flight) one core sustains, each with the client's CPU
   use (process CPU time / wall time: 100% means the client is the limit) and rates per CPU-second of
   the client (the steadier figure when other jobs share the core). The token figure is also
   taken with httpx (httpx2, the openai client's transport) parsing the same stream the same way, the
   alternative the client's choice of aiohttp was weighed against.
2. Against `mlc serve` on SmolLM2-135M (bf16), sharing the machine's cores as a user's run would:
   --streams concurrent streams of 128-token prompts and 64 output tokens. The client's CPU seconds
   against the server's, and its cost per token against its one-core capacity from step 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mlc.commands.bench.client import SSEParser, Target, request_body  # noqa: E402
from mlc.commands.bench.datasets import DatasetOptions, Sample, load_samples  # noqa: E402
from mlc.commands.bench.runner import Load, run_benchmark  # noqa: E402
from mlc.commands.bench.server import ManagedServer, first_model, free_port  # noqa: E402
from mlc.paths import cache_dir  # noqa: E402


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(fn, server_pid: int) -> tuple[object, float, float, float]:
    """(fn(), wall s, this process's CPU s, the server's CPU s)."""
    w, c, s = time.perf_counter(), time.process_time(), proc_cpu(server_pid)
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c, proc_cpu(server_pid) - s


def instant(n: int, tokens: int, concurrency: int | None, url: str, pid: int) -> dict[str, float]:
    samples = [Sample("x", 1, tokens)] * n
    out, wall, cpu, server_cpu = measured(lambda: run_benchmark(Target(url + "/v1/completions", "m", False), samples,
                                                                 Load(max_concurrency=concurrency), None, [50, 99], {}), pid)
    r = out.result
    return {"req_s": r["request_throughput"], "tok_s": r["output_throughput"], "req_per_cpu_s": r["completed"] / cpu,
            "tok_per_cpu_s": r["total_output_tokens"] / cpu, "ttft_p50_ms": r["median_ttft_ms"], "ttft_p99_ms": r["p99_ttft_ms"],
            "client_cpu": cpu / wall, "server_cpu": server_cpu / wall, "failed": r["failed"]}


def httpx_tokens(n: int, tokens: int, concurrency: int, url: str, pid: int) -> dict[str, float]:
    """The same stream parsed the same way (SSEParser, json.loads per message), read through httpx2."""
    import httpx2

    target = Target(url + "/v1/completions", "m", False)

    async def main() -> int:
        sem = asyncio.Semaphore(concurrency)
        async with httpx2.AsyncClient(timeout=None, limits=httpx2.Limits(max_connections=None, max_keepalive_connections=concurrency)) as client:
            async def one() -> int:
                async with sem:
                    parser, count = SSEParser(), 0
                    async with client.stream("POST", target.url, json=request_body(target, "x", tokens)) as resp:
                        async for chunk in resp.aiter_raw():
                            for data in parser.feed(chunk):
                                if json.loads(data).get("choices"):
                                    count += 1
                    return count

            return sum(await asyncio.gather(*(one() for _ in range(n))))

    count, wall, cpu, server_cpu = measured(lambda: asyncio.run(main()), pid)
    return {"tok_s": count / wall, "tok_per_cpu_s": count / cpu, "client_cpu": cpu / wall, "server_cpu": server_cpu / wall}


def against_mlc_serve(streams: int, threads: int | None) -> dict[str, float]:
    from mlc.commands.bench.tokens import TokenCounter
    from tests.conftest import smollm2_hf_dir

    model = smollm2_hf_dir()
    tok = TokenCounter(model / "tokenizer.json")
    samples = load_samples(DatasetOptions("random", input_len=128, output_len=64), streams, tok, chat=False)
    log = Path("/tmp") / f"bench-overhead-serve-{os.getpid()}.log"
    server = ManagedServer.start(f"mlc serve {model} --port {{port}} --dtype bfloat16 --kv-cache-memory 2GiB --max-model-len 1024"
                                 + (f" --threads {threads}" if threads else ""),
                                 None, cache_dir() / "bench" / "runs", log)
    try:
        server.wait_healthy({}, 600)
        name = first_model(server.base_url, {})
        target = Target(server.base_url + "/v1/completions", name, False, extra_body={"ignore_eos": True, "temperature": 0})
        run_benchmark(target, samples[:2], Load(), tok, [50], {})  # warm the server
        out, wall, cpu, server_cpu = measured(lambda: run_benchmark(target, samples, Load(max_concurrency=streams), tok, [50, 99], {}), server.proc.pid)
    finally:
        server.stop()
    r = out.result
    return {"streams": streams, "tok_s": r["output_throughput"], "ttft_p50_ms": r["median_ttft_ms"], "tpot_p50_ms": r["median_tpot_ms"],
            "wall_s": wall, "client_cpu_s": cpu, "server_cpu_s": server_cpu, "client_share": cpu / (cpu + server_cpu),
            "client_cpu_ms_per_token": 1000 * cpu / max(r["total_output_tokens"], 1), "failed": r["failed"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-serve", action="store_true", help="Only the instant-server figures.")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--server-threads", type=int, default=None, help="mlc serve --threads (default: all cores).")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout's SIGTERM still stops the servers (finally blocks)
    two = (os.cpu_count() or 1) >= 2
    port = free_port()
    cmd = ([*(["taskset", "-c", "1"] if two else []), sys.executable, "-m", "tests.bench.scripted_server", str(port)])
    server = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "ready"
    if two:
        os.sched_setaffinity(0, {0})  # the client on one core, the server on the other
    url = f"http://127.0.0.1:{port}"
    rows = {}
    try:
        instant(50, 1, 1, url, server.pid)  # warm-up
        rows["ttft floor (1 at a time, 1 token)"] = instant(300, 1, 1, url, server.pid)
        rows["request rate (64 in flight, 1 token)"] = instant(3000, 1, 64, url, server.pid)
        rows["streamed tokens (64 in flight, 256 tokens)"] = instant(400, 256, 64, url, server.pid)
        rows["streamed tokens, httpx2 instead of aiohttp"] = httpx_tokens(400, 256, 64, url, server.pid)
    finally:
        server.terminate()
        server.wait()
    print(f"## client against an instant server (client on core 0, server on core 1), load average {os.getloadavg()[0]:.2f}")
    for name, r in rows.items():
        print(f"{name:44s} " + "  ".join(f"{k} {v:,.2f}" for k, v in r.items()), flush=True)
    if args.skip_serve:
        return
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    r = against_mlc_serve(args.streams, args.server_threads)
    capacity = rows["streamed tokens (64 in flight, 256 tokens)"]
    print(f"\n## next to mlc serve (SmolLM2-135M bf16, both on all cores), load average {os.getloadavg()[0]:.2f}")
    print("  ".join(f"{k} {v:,.3f}" for k, v in r.items()))
    print(f"the client spent {r['client_share']:.1%} of the run's CPU time; at its one-core capacity ({capacity['tok_per_cpu_s']:,.0f} "
          f"tokens per CPU-second) mlc serve's {r['tok_s']:.0f} tok/s take {r['tok_s'] / capacity['tok_per_cpu_s']:.1%} of one core")


if __name__ == "__main__":
    main()
