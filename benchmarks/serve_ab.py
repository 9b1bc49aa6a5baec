"""mlc serve's speed at two checkouts, measured alternately in one run: did a change slow serving down?

    git worktree add /tmp/serve-base <commit>      # the baseline checkout (any older commit)
    .venv/bin/python benchmarks/serve_ab.py --baseline /tmp/serve-base [--rounds 3]

Each round measures both checkouts, in alternating order (the machine's speed drifts, so each figure is
compared with the other checkout's next to it): (1) batch-1 greedy decode tokens/s of the engine in
bf16 (prefill excluded: (N - 1) / time from the first to the last token), stepped in the loading
thread as `mlc serve` does; (2) `mlc serve` over HTTP with 32 concurrent streams of 256 random prompt
tokens and 128 output tokens (EOS ignored, greedy): aggregate output tokens/s, TTFT p50 and p99. Next to
wall-clock rates, tokens per CPU-second of the measured process (all threads). Reported: the median
over rounds for each checkout and the ratio current / baseline. Each checkout's code runs with its own
`mlc` (PYTHONPATH and working directory set to the checkout), in this repository's venv.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from http.client import HTTPConnection
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import smollm2_hf_dir  # noqa: E402

PROMPT_LEN, OUTPUT_LEN, CONCURRENCY = 256, 128, 32

DECODE = r"""
import json, sys, time
import torch
from mlc.commands.serve.engine import Engine, EngineConfig, GenerationRequest
from mlc.kernels.sampling import SamplingParams
from mlc.models import load_model
from mlc.models.tokenizer import load_tokenizer
from mlc.models.transformer import fuse_projections
path, n = sys.argv[1], int(sys.argv[2])
model = load_model(path, dtype="bfloat16")
fuse_projections(model)
engine = Engine(model, load_tokenizer(path), EngineConfig(num_blocks=512, block_size=16, max_batched_tokens=512))
def once(tokens):
    times = []
    def sink(ev):
        times.extend([(time.perf_counter(), time.process_time())] * len(ev.token_ids))
    engine.submit(GenerationRequest(f"r{time.perf_counter()}", list(range(1000, 1032)), SamplingParams(temperature=0), max_tokens=tokens, ignore_eos=True), sink)
    engine.run_until_idle()
    return (len(times) - 1) / (times[-1][0] - times[0][0]), (len(times) - 1) / (times[-1][1] - times[0][1])
once(8)
runs = [once(n) for _ in range(3)]
print(json.dumps({"decode_tok_s": sorted(r[0] for r in runs)[1], "decode_tok_cpu_s": sorted(r[1] for r in runs)[1]}))
"""


THREADS: int | None = None  # --threads: torch threads of both checkouts (OMP_NUM_THREADS)


def env_for(tree: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(tree), "MLC_RUNS_DIR": str(Path("/tmp") / f"serve-ab-runs-{os.getpid()}")}
    if THREADS:
        env["OMP_NUM_THREADS"] = str(THREADS)
    return env


def decode(tree: Path, model: Path, n: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", DECODE, str(model), str(n)], cwd=tree, env=env_for(tree), capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def load(tree: Path, model: Path, prompts: list[list[int]]) -> dict[str, float]:
    port = 18500 + os.getpid() % 400
    proc = subprocess.Popen([sys.executable, "-m", "mlc", "serve", str(model), "--port", str(port), "--dtype", "bfloat16",
                             "--kv-cache-memory", "1GiB", "--max-model-len", "1024"], cwd=tree, env=env_for(tree),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                c = HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"mlc serve in {tree} exited with {proc.returncode}")
            time.sleep(0.2)
        c = HTTPConnection("127.0.0.1", port)
        c.request("GET", "/v1/models")
        name = json.loads(c.getresponse().read())["data"][0]["id"]

        def stream(prompt: list[int], ttfts: list[float]) -> None:
            body = {"model": name, "prompt": prompt, "max_tokens": OUTPUT_LEN, "ignore_eos": True, "temperature": 0, "stream": True}
            conn = HTTPConnection("127.0.0.1", port, timeout=600)
            t = time.perf_counter()
            conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            first = None
            for line in conn.getresponse():
                if first is None and line.startswith(b"data: {"):
                    first = time.perf_counter() - t
            ttfts.append(first)

        def cpu() -> float:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        def run() -> dict[str, float]:
            ttfts: list[float] = []
            threads = [threading.Thread(target=stream, args=(p, ttfts)) for p in prompts]
            c0, t0 = cpu(), time.perf_counter()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            wall, used = time.perf_counter() - t0, cpu() - c0
            ttfts.sort()
            tokens = len(prompts) * OUTPUT_LEN
            return {"load_tok_s": tokens / wall, "load_tok_cpu_s": tokens / used, "ttft_p50_s": ttfts[len(ttfts) // 2], "ttft_p99_s": ttfts[-1]}

        run()  # warm-up (and the prefix cache is irrelevant: every prompt differs)
        return run()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=Path, required=True, help="A checkout of the commit to compare with.")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--streams", type=int, default=CONCURRENCY, help="Concurrent HTTP streams of the load part.")
    ap.add_argument("--threads", type=int, default=None,
                    help="Torch threads of both checkouts (OMP_NUM_THREADS); 1 on a machine other jobs oversubscribe, where "
                         "OpenMP barriers wait on descheduled threads.")
    args = ap.parse_args()
    global THREADS
    THREADS = args.threads
    model = smollm2_hf_dir()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(100, 40000, (PROMPT_LEN,), generator=gen).tolist() for _ in range(args.streams)]
    trees = {"baseline": args.baseline.resolve(), "current": REPO}
    results: dict[str, list[dict[str, float]]] = {k: [] for k in trees}
    for r in range(args.rounds):
        for name in (["baseline", "current"] if r % 2 == 0 else ["current", "baseline"]):
            row = {**decode(trees[name], model, args.decode_tokens), **load(trees[name], model, prompts)}
            results[name].append(row)
            print(f"round {r + 1} {name:8s} " + "  ".join(f"{k} {v:.3g}" for k, v in row.items()), flush=True)
    med = {name: {k: statistics.median(row[k] for row in rows) for k in rows[0]} for name, rows in results.items()}
    print("\nmedians over rounds   " + "   ".join(f"{k}" for k in med["current"]))
    for name in trees:
        print(f"{name:20s}  " + "   ".join(f"{v:.3g}" for v in med[name].values()))
    print("current / baseline    " + "   ".join(f"{med['current'][k] / med['baseline'][k]:.3f}" for k in med["current"]))


if __name__ == "__main__":
    main()
