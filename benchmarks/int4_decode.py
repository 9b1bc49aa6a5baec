"""int4 decode matrix-vector speed: mlc's native kernel against torch's int4 kernel and the bf16 gemv, in bytes/s.

One pass = every Linear of --layers decoder blocks of the model's shapes (fused q/k/v, o, fused gate/up, down, as
`mlc serve` runs them), each with its own random weights so that a pass streams from memory as a decode step does.
For each path it prints the median milliseconds per pass, the weight bytes read per second (int4 counts its
nibbles plus the bf16 scale and zero of each group) and the process CPU-seconds per pass, all in one process:

    .venv/bin/python benchmarks/int4_decode.py [--model 1b|smollm2] [--layers 4] [--rows 1] [--group 32] [--reps 15]
    .venv/bin/python benchmarks/int4_decode.py --vs-llamacpp [--model 1b|smollm2] [--compile] [--reps 3] [--decode-tokens 64]
        [--breakdown] [--no-eager] [--no-llamacpp]

Paths: `torch` is torch.ops.aten._weight_int4pack_mm_for_cpu (mlc's decode path before the native kernel),
`native` mlc_int4pack_mm_bf16 (mlc/kernels/quant_int4.c) on the same tiles, `bf16` mlc's native bf16 gemv on a bf16
copy of the shapes (one row only). Weights are random: speed does not depend on values.

--vs-llamacpp measures the whole decode step instead: batch-1 decode tokens/s and tokens/CPU-s of mlc's engine on
the int4 model (eager, and compiled with --compile) against llama.cpp on the same integers, in one run, with
benchmarks/serve_vs_peers.py's rows (its models, GGUFs, llama.cpp build and timing), without its other rows. The engine
runs one sequence at a time, so --compile compiles only the batch-1 kind of decode step (the graph `mlc serve --compile`
swaps in first). --breakdown also prints where each engine step's time goes (schedule, the model's forward, the output
head, sampling, handing the token out, the rest), wall and CPU milliseconds per step, timed in the same runs (the
compiled engine's prefill steps run eagerly and fall in "the rest"; the eager engine's are in its model forward).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mlc.kernels import native
from mlc.kernels.quant_linear import quant_linear
from mlc.kernels.quant_weights import IntWeight

# (hidden, intermediate, q heads x head dim, kv heads x head dim)
MODELS = {"1b": (2048, 5632, 2048, 256), "smollm2": (576, 1536, 576, 192)}


def block_shapes(model: str) -> list[tuple[int, int]]:
    hidden, inter, q, kv = MODELS[model]
    return [(q + 2 * kv, hidden), (hidden, q), (2 * inter, hidden), (hidden, inter)]


def _timed(fn, reps: int) -> tuple[float, float]:
    """(median wall seconds, mean process CPU-seconds) of fn over reps calls, after one warm-up call."""
    fn()
    walls = []
    cpu0 = time.process_time()
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t)
    return statistics.median(walls), (time.process_time() - cpu0) / reps


@torch.inference_mode()
def run(model: str, layers: int, rows: int, group: int, reps: int, bf16: bool) -> dict[str, dict[str, float]]:
    g = torch.Generator().manual_seed(0)
    shapes = block_shapes(model) * layers
    mods = [quant_linear(IntWeight(torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g),
                                   (torch.rand(n, k // group, generator=g) * 0.01).to(torch.bfloat16), None, 4, group))
            for n, k in shapes]
    assert all(m.path == "int4pack" for m in mods), "shapes or group outside torch's int4 kernel"
    xs = {k: torch.randn(rows, k, generator=g).to(torch.bfloat16) for _, k in shapes}
    int4_bytes = sum(n * k // 2 + n * (k // group) * 4 for n, k in shapes)

    def torch_pass():
        for m in mods:
            torch.ops.aten._weight_int4pack_mm_for_cpu(xs[m.in_features], m._tiles, group, m._scales_and_zeros)

    def native_pass():
        for m in mods:
            native.int4pack_mm_bf16(xs[m.in_features], m._tiles, m._scales_and_zeros, group, False)

    paths = {"torch": (torch_pass, int4_bytes)}
    if native.available():
        paths["native"] = (native_pass, int4_bytes)
    if bf16 and rows == 1 and native.available():
        weights = [torch.randn(n, k, generator=g).to(torch.bfloat16) for n, k in shapes]
        vectors = {k: v[0].contiguous() for k, v in xs.items()}
        paths["bf16"] = (lambda: [native.gemv_bf16(w, vectors[w.shape[1]]) for w in weights], sum(n * k * 2 for n, k in shapes))
    results = {}
    for name, (fn, nbytes) in paths.items():
        wall, cpu = _timed(fn, reps)
        results[name] = {"ms": 1e3 * wall, "gb_per_s": nbytes / wall / 1e9, "cpu_ms": 1e3 * cpu, "mb": nbytes / 1e6}
    return results


def int4_engine(path, compile: bool):
    """The engine serve_vs_peers.py's rows use (mlc serve's settings), for one sequence at a time: with compile, only the
    batch-1 kind of decode step is compiled (the same graph a default server compiles first, without the other four)."""
    from mlc.commands.serve.engine import Engine, EngineConfig
    from mlc.models import load_model
    from mlc.models.tokenizer import load_tokenizer
    from mlc.models.transformer import fuse_projections

    model = load_model(path, dtype="bfloat16")
    fuse_projections(model)
    engine = Engine(model, load_tokenizer(path), EngineConfig(num_blocks=512, block_size=16, max_batched_tokens=512, max_running=1,
                                                             compile=compile))
    engine.warm_up()
    if compile and engine.compiler.eager == ["single"]:
        print("(--compile leaves this model's batch-1 step eager, as mlc serve --compile does: the row below is what it serves)")
    elif compile and engine.compiled_kinds != {"single"}:
        raise SystemExit(f"the compiled decode step is not in use: {engine.compiler.error}")
    return engine


# The parts of an engine step timed by --breakdown: (label, object attribute path). Each is wrapped for the timed run.
PARTS = [("schedule", "scheduler.schedule"), ("model forward", "_decode_forward"), ("model forward (eager)", "model.forward"),
         ("output head", "model.lm_head.forward"), ("sample", "_sample"), ("hand out (advance, detokenise, emit)", "_advance")]


def decode_rate(engine, tokens: int, reps: int, breakdown: bool = False) -> tuple[float, float]:
    """(median tokens/s, median tokens/CPU-s) of batch-1 greedy decode on the engine, stepped in this thread, from the
    first to the last token (serve_vs_peers.py's mlc_decode_rate); with breakdown, also print each part's time per step."""
    from collections import defaultdict

    from mlc.commands.serve.requests import GenerationRequest
    from mlc.kernels.sampling import SamplingParams

    prompt = list(range(1000, 1032))
    spent: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])

    def timed(name, fn):
        def wrapper(*a, **k):
            t, c = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                spent[name][0] += time.perf_counter() - t
                spent[name][1] += time.process_time() - c
        return wrapper

    if breakdown:
        for name, attr in [*PARTS, ("whole step", "step")]:
            *owner, last = attr.split(".")
            obj = engine
            for a in owner:
                obj = getattr(obj, a)
            if getattr(obj, last) is not None and not (name.endswith("(eager)") and engine._decode_forward is not None):
                setattr(obj, last, timed(name, getattr(obj, last)))

    def once(n: int) -> tuple[float, float]:
        times: list[tuple[float, float]] = []

        def sink(ev):
            times.extend([(time.perf_counter(), time.process_time())] * len(ev.token_ids))

        engine.submit(GenerationRequest(f"r{time.perf_counter()}", prompt, SamplingParams(temperature=0), max_tokens=n, ignore_eos=True), sink)
        engine.run_until_idle()
        return (len(times) - 1) / (times[-1][0] - times[0][0]), (len(times) - 1) / (times[-1][1] - times[0][1])

    once(8)
    spent.clear()
    steps0 = engine.steps
    runs = [once(tokens) for _ in range(reps)]
    if breakdown:
        steps = engine.steps - steps0  # prefill steps included: one per run against `tokens` decode steps
        whole = spent.pop("whole step")
        print(f"  per step ({steps} steps, {reps} prefill steps among them): wall ms, CPU ms")
        for name, (wall, cpu) in spent.items():
            print(f"    {name:38s} {1e3 * wall / steps:7.3f} {1e3 * cpu / steps:7.3f}")
        rest = [whole[i] - sum(v[i] for v in spent.values()) for i in (0, 1)]
        print(f"    {'the rest of the step':38s} {1e3 * rest[0] / steps:7.3f} {1e3 * rest[1] / steps:7.3f}")
        print(f"    {'whole step':38s} {1e3 * whole[0] / steps:7.3f} {1e3 * whole[1] / steps:7.3f}", flush=True)
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def vs_llamacpp(model: str, reps: int, tokens: int, compile: bool, breakdown: bool = False, eager: bool = True,
                llamacpp: bool = True) -> None:
    """mlc int4 batch-1 decode (eager, compiled) against llama.cpp, in one run: serve_vs_peers.py's rows for int4 only."""
    import gc
    import os
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import serve_vs_peers as peers

    if model == "1b":
        from quant_1b import make_model

        path = make_model(peers.smollm2_hf_dir(), peers.cache_dir() / "bench" / "random-1b")
        gguf, gguf_type = peers.quantized(path, "int4", fmt="gguf"), "Q4_0"
    else:
        path, gguf, gguf_type = peers.smollm2_hf_dir(), peers.fetch_smollm2_gguf(peers.cache_dir()), "Q4_1"
    int4 = peers.quantized(path, "int4")
    print(f"{model}: batch-1 decode, {tokens} tokens, median of {reps}; {torch.get_num_threads()} threads; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    rows = {}
    if eager:
        rows["mlc int4"] = decode_rate(int4_engine(int4, False), tokens, reps, breakdown)
        print(f"{'mlc int4 (eager)':28s} {rows['mlc int4'][0]:8.1f} tok/s {rows['mlc int4'][1]:8.1f} tok/CPU-s", flush=True)
        gc.collect()
    if llamacpp:
        rows["llama.cpp"] = tuple(peers.llama_cpp(gguf, tokens, reps)["decode"])
        print(f"{'llama.cpp ' + gguf_type:28s} {rows['llama.cpp'][0]:8.1f} tok/s {rows['llama.cpp'][1]:8.1f} tok/CPU-s", flush=True)
    if compile:
        rows["mlc int4 compiled"] = decode_rate(int4_engine(int4, True), tokens, reps, breakdown)
        print(f"{'mlc int4 (--compile)':28s} {rows['mlc int4 compiled'][0]:8.1f} tok/s {rows['mlc int4 compiled'][1]:8.1f} tok/CPU-s", flush=True)
    if "llama.cpp" in rows:
        for name in [r for r in rows if r != "llama.cpp"]:
            a, b = rows[name], rows["llama.cpp"]
            print(f"{name} / llama.cpp: {a[0] / b[0]:.2f}x wall, {a[1] / b[1]:.2f}x per CPU-second")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="1b")
    ap.add_argument("--layers", type=int, default=4, help="decoder blocks, each with its own weights (default 4)")
    ap.add_argument("--rows", type=int, default=1, help="rows of x (batch size of a decode step, below 16)")
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, help="torch (and kernel) threads (default: torch's choice)")
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 gemv (it needs 4x the weight memory)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--vs-llamacpp", action="store_true", help="whole batch-1 decode steps of the int4 model against llama.cpp")
    ap.add_argument("--compile", action="store_true", help="with --vs-llamacpp: also mlc's compiled decode step (mlc serve --compile)")
    ap.add_argument("--decode-tokens", type=int, default=64, help="with --vs-llamacpp: tokens per timed generation")
    ap.add_argument("--breakdown", action="store_true", help="with --vs-llamacpp: where each engine step's time goes")
    ap.add_argument("--no-eager", action="store_true", help="with --vs-llamacpp --compile: leave out the eager row")
    ap.add_argument("--no-llamacpp", action="store_true", help="with --vs-llamacpp: leave out llama.cpp (mlc rows only)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.vs_llamacpp:
        vs_llamacpp(args.model, args.reps, args.decode_tokens, args.compile, args.breakdown, not args.no_eager, not args.no_llamacpp)
        return
    results = run(args.model, args.layers, args.rows, args.group, args.reps, not args.no_bf16)
    if args.json:
        print(json.dumps({"args": vars(args), "threads": torch.get_num_threads(), "results": results}, indent=2))
        return
    print(f"{args.model} x {args.layers} blocks, {args.rows} row(s), int4 g{args.group}, {torch.get_num_threads()} threads, "
          f"median of {args.reps} passes")
    print(f"{'path':<7} {'MB/pass':>8} {'ms/pass':>8} {'GB/s':>6} {'CPU ms/pass':>12} {'x torch (wall)':>15} {'x torch (CPU)':>14}")
    base = results["torch"]
    for name, r in results.items():
        print(f"{name:<7} {r['mb']:>8.1f} {r['ms']:>8.2f} {r['gb_per_s']:>6.1f} {r['cpu_ms']:>12.2f} {base['ms'] / r['ms']:>15.2f} "
              f"{base['cpu_ms'] / r['cpu_ms']:>14.2f}")


if __name__ == "__main__":
    main()
