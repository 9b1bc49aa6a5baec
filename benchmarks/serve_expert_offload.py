"""`mlc serve --expert-offload`: batch-1 decode speed, expert-cache hit rate and peak RSS against holding every expert.

    nice -n 10 .venv/bin/python benchmarks/serve_expert_offload.py [--tokens 48] [--prompts 3] [--threads 1] [--work /tmp/offload]

The model: SmolLM2-135M-Instruct upcycled by `mlc upcycle --experts 8 --top-k 2 --dtype bfloat16` (a random router,
every expert a copy of the dense MLP: 240 experts of 5.3 MB, 1.27 GB of 1.37 GB), written under --work and deleted at the
end. Each configuration runs in its own process (so peak RSS is its own): the engine is built by serve's load_engine from
a ServeConfig as `mlc serve` builds it, then greedy completions of --tokens tokens are decoded for --prompts chat prompts,
one at a time. Configurations: every expert in memory (no offload); --expert-offload with --max-memory set so that the
cache holds 100%, 50% and 25% of the experts; and 50% with --no-expert-prefetch (the LRU cache alone). Reported: decode tok/s
(after the first token) and the process's CPU time per decoded token (prefetch thread included; steadier than wall
time on a shared machine), its ratio to in-memory, the hit rate (hits / expert calls) in the decode steps and over
everything (prefills included), experts prefetched and how many of
those were used, MB read from disk (the page cache, once warm), peak RSS, and whether the tokens equal in-memory's.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import smollm2_hf_dir  # noqa: E402

PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle works.", "What should I cook for dinner tonight?",
           "Describe the water cycle to a child."]
CONFIGS = [("in memory", None, True), ("offload 100%", 1.0, True), ("offload 50%", 0.5, True), ("offload 25%", 0.25, True),
           ("offload 50%, no prefetch", 0.5, False)]
KV = 32 << 20


def child(model: Path, fraction: float | None, prefetch: bool, args: argparse.Namespace) -> dict:
    """One configuration, in this process: decode timings, cache counters and peak RSS."""
    import torch

    from mlc.commands.serve import expert_cache
    from mlc.commands.serve.engine import GenerationRequest
    from mlc.commands.serve.server import ServeConfig, load_engine
    from mlc.kernels.sampling import SamplingParams

    cfg = ServeConfig(str(model), max_model_len=512, threads=args.threads)
    if fraction is not None:
        sizes = expert_cache.expert_sizes(model, "auto")
        budget = sizes.other_bytes + KV + int(fraction * sizes.all_experts_bytes)
        cfg = ServeConfig(str(model), max_model_len=512, threads=args.threads, expert_offload=True, max_memory=str(budget),
                          expert_prefetch=prefetch)
    engine, tokenizer, _ = load_engine(cfg, "moe", model, KV)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cache = getattr(engine.model, "expert_cache", None)
    tokens, decode_s, decode_cpu, decoded, decode_hits, decode_misses = [], 0.0, 0.0, 0, 0, 0
    for i, prompt in enumerate(PROMPTS[: args.prompts]):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
        times: list[tuple[float, float]] = []  # (wall, CPU of the process: the prefetch thread included) at each token
        out: list[int] = []

        def sink(ev, times=times, out=out) -> None:
            out.extend(ev.token_ids)
            counts = (cache.hits, cache.misses) if cache is not None else (0, 0)
            times.extend((time.perf_counter(), time.process_time(), *counts) for _ in ev.token_ids)

        engine.submit(GenerationRequest(str(i), ids, SamplingParams(temperature=0), max_tokens=args.tokens, ignore_eos=True), sink)
        with torch.inference_mode():
            engine.run_until_idle()
        tokens.append(out)
        decode_s += times[-1][0] - times[0][0]
        decode_cpu += times[-1][1] - times[0][1]
        decode_hits += times[-1][2] - times[0][2]
        decode_misses += times[-1][3] - times[0][3]
        decoded += len(out) - 1
    result = {"tokens": tokens, "decode_tok_s": decoded / decode_s, "cpu_ms_per_token": 1000 * decode_cpu / decoded, "rss_loaded": rss_loaded,
              "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if cache is not None:
        cache.close()
        result |= cache.summary() | {"decode_hit_rate": decode_hits / (decode_hits + decode_misses)}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=48, help="tokens decoded per prompt")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the prefetch thread comes on top)")
    ap.add_argument("--work", default="/tmp/offload/bench")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work)
    model = work / "smollm2-moe-8x2"
    if args.child is not None:
        fraction, prefetch = json.loads(args.child)
        print(json.dumps(child(model, fraction, prefetch, args)))
        return
    print(f"load average at start: {open('/proc/loadavg').read().strip()}", flush=True)
    work.mkdir(parents=True, exist_ok=True)
    try:
        if not (model / "config.json").exists():
            subprocess.run([sys.executable, "-m", "mlc", "--runs-dir", str(work / "runs"), "upcycle", str(smollm2_hf_dir()), "--experts", "8",
                            "--top-k", "2", "--dtype", "bfloat16", "--out", str(model)], check=True, stdout=subprocess.DEVNULL)
        rows = []
        for name, fraction, prefetch in CONFIGS:
            cmd = [sys.executable, __file__, "--child", json.dumps([fraction, prefetch]), "--tokens", str(args.tokens),
                   "--prompts", str(args.prompts), "--threads", str(args.threads), "--work", str(work)]
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            rows.append((name, r))
            print(f"{name}: {r['decode_tok_s']:.2f} tok/s, decode hit rate {r.get('decode_hit_rate', 1.0):.3f}, peak RSS {r['peak_rss'] / 2**20:.0f} MiB",
                  flush=True)
        base = rows[0][1]
        print("\n| configuration | cache (MiB) | decode tok/s | vs in memory | hit rate decode (all) | prefetched (used) | read (MiB) | peak RSS (MiB) | decode CPU ms/token | tokens equal |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for name, r in rows:
            cache = f"{r['expert_cache_capacity_bytes'] / 2**20:.0f}" if "expert_cache_hits" in r else "all"
            hit = f"{r['decode_hit_rate']:.3f} ({r['expert_cache_hit_rate']:.3f})" if "expert_cache_hits" in r else "-"
            pre = f"{r['expert_cache_prefetched']:.0f} ({r['expert_cache_prefetch_hits']:.0f})" if "expert_cache_hits" in r else "-"
            read = f"{r['expert_cache_loaded_bytes'] / 2**20:.0f}" if "expert_cache_hits" in r else "-"
            print(f"| {name} | {cache} | {r['decode_tok_s']:.2f} | {r['decode_tok_s'] / base['decode_tok_s']:.2f}x | {hit} | {pre} | {read} | "
                  f"{r['peak_rss'] / 2**20:.0f} | {r['cpu_ms_per_token']:.0f} | {r['tokens'] == base['tokens']} |")
        print(f"\nload average at end: {open('/proc/loadavg').read().strip()}")
    finally:
        if args.work == ap.get_default("work"):
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
