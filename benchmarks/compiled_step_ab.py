"""Interleaved A/B of mlc serve's compiled decode step under different inductor options (SmolLM2 int4, batch 1).

    nice -n 10 .venv/bin/python benchmarks/compiled_step_ab.py [--threads T] [--rounds 24] [--tokens 16]
        [--variant NAME=JSON ...]

One process, one engine (mlc serve's settings, one sequence at a time); each variant is the model's forward compiled
with torch.compile(options=JSON) on the compile cache `mlc serve --compile` uses (so a variant compiled before loads
from it). Requests of --tokens greedy tokens are then decoded with each variant in turn, round after round (the order
reversed every other round), so that a change in the machine's load falls on all variants alike. For each variant it
prints the median and 20th percentile of the compiled forward's wall and CPU milliseconds per decode step (the
output head, sampling and the engine's own work are outside it and the same for all), and the ratios to the first
variant. Default variants: `python` (inductor's defaults, as `mlc serve --compile` compiles now) and `cpp_wrapper`
(inductor's C++ wrapper: the graph's calls of kernels and operators made from C++ rather than Python statements).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    from mlc.commands.serve import compiling

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, help="torch (and kernel) threads (default: torch's choice)")
    ap.add_argument("--rounds", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=16, help="greedy tokens per request")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=JSON", help="torch.compile options of a variant")
    args = ap.parse_args()
    variants = dict(v.split("=", 1) for v in args.variant) or {"python": "{}", "cpp_wrapper": '{"cpp_wrapper": true}'}
    variants = {name: json.loads(options) for name, options in variants.items()}
    if args.threads:
        torch.set_num_threads(args.threads)

    import serve_vs_peers as peers
    from int4_decode import int4_engine

    from mlc.commands.serve.requests import GenerationRequest
    from mlc.kernels.sampling import SamplingParams

    engine = int4_engine(peers.quantized(peers.smollm2_hf_dir(), "int4"), False)
    compiling.use_compile_cache(engine.model, engine.dtype)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 8 * len(variants))
    prompt = list(range(1000, 1032))

    def decode(n: int) -> None:
        engine.submit(GenerationRequest(f"r{time.perf_counter()}", prompt, SamplingParams(temperature=0), max_tokens=n, ignore_eos=True),
                      lambda ev: None)
        engine.run_until_idle()

    samples: dict[str, list[tuple[float, float]]] = {}
    forwards = {}
    for name, options in variants.items():
        began = time.perf_counter()
        compiled = torch.compile(engine.model.forward, options=options or None)
        engine.use_compiled(compiled, ["single"])
        decode(4)
        print(f"{name}: {options} compiled (or loaded) in {time.perf_counter() - began:.1f}s", flush=True)
        samples[name] = []

        def timed(*a, _f=compiled, _s=samples[name], **k):
            t, c = time.perf_counter(), time.process_time()
            out = _f(*a, **k)
            _s.append((time.perf_counter() - t, time.process_time() - c))
            return out

        forwards[name] = timed
    for name in forwards:  # one request each before timing
        engine._decode_forward = forwards[name]
        decode(4)
        samples[name].clear()
    load = os.getloadavg()[0]
    for r in range(args.rounds):
        for name in list(forwards)[:: 1 if r % 2 == 0 else -1]:
            engine._decode_forward = forwards[name]
            decode(args.tokens)
    print(f"{torch.get_num_threads()} threads; load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; "
          f"{args.rounds} rounds of {args.tokens} tokens per variant")
    first = None
    for name, s in samples.items():
        wall, cpu = sorted(x[0] for x in s), sorted(x[1] for x in s)
        row = [1e3 * statistics.median(wall), 1e3 * wall[len(wall) // 5], 1e3 * statistics.median(cpu), 1e3 * cpu[len(cpu) // 5]]
        first = first or row
        print(f"{name:10s} compiled forward ms/step: wall median {row[0]:6.2f} p20 {row[1]:6.2f}, CPU median {row[2]:6.2f} p20 {row[3]:6.2f}"
              f" | / {list(samples)[0]}: wall {row[0] / first[0]:.3f} {row[1] / first[1]:.3f}, CPU {row[2] / first[2]:.3f} "
              f"{row[3] / first[3]:.3f} ({len(s)} steps)")


if __name__ == "__main__":
    main()
