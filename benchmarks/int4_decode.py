"""int4 decode matrix-vector speed: mlc's native kernel against torch's int4 kernel and the bf16 gemv, in bytes/s.

One pass = every Linear of --layers decoder blocks of the model's shapes (fused q/k/v, o, fused gate/up, down, as
`mlc serve` runs them), each with its own random weights so that a pass streams from memory as a decode step does.
For each path it prints the median milliseconds per pass, the weight bytes read per second (int4 counts its
nibbles plus the bf16 scale and zero of each group) and the process CPU-seconds per pass, all in one process:

    .venv/bin/python benchmarks/int4_decode.py [--model 1b|smollm2] [--layers 4] [--rows 1] [--group 32] [--reps 15]
    .venv/bin/python benchmarks/int4_decode.py --vs-llamacpp [--model 1b|smollm2] [--compile] [--reps 3] [--decode-tokens 64]

Paths: `torch` is torch.ops.aten._weight_int4pack_mm_for_cpu (mlc's decode path before the native kernel),
`native` mlc_int4pack_mm_bf16 (mlc/kernels/quant_int4.c) on the same tiles, `bf16` mlc's native bf16 gemv on a bf16
copy of the shapes (one row only). Weights are random: speed does not depend on values.

--vs-llamacpp measures the whole decode step instead: batch-1 decode tokens/s and tokens/CPU-s of mlc's engine on
the int4 model (eager, and compiled with --compile) against llama.cpp on the same integers, in one run, with
benchmarks/serve_vs_peers.py's rows (its models, GGUFs, llama.cpp build and timing), without its other rows.
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


def vs_llamacpp(model: str, reps: int, tokens: int, compile: bool) -> None:
    """mlc int4 batch-1 decode (eager, compiled) against llama.cpp, in one run: serve_vs_peers.py's rows for int4 only."""
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
    rows["mlc int4"] = peers.mlc_decode_rate(int4, "bfloat16", tokens, reps)
    print(f"{'mlc int4 (eager)':28s} {rows['mlc int4'][0]:8.1f} tok/s {rows['mlc int4'][1]:8.1f} tok/CPU-s", flush=True)
    rows["llama.cpp"] = tuple(peers.llama_cpp(gguf, tokens, reps)["decode"])
    print(f"{'llama.cpp ' + gguf_type:28s} {rows['llama.cpp'][0]:8.1f} tok/s {rows['llama.cpp'][1]:8.1f} tok/CPU-s", flush=True)
    if compile:
        rows["mlc int4 compiled"] = peers.mlc_decode_rate(int4, "bfloat16", tokens, reps, compile=True)
        print(f"{'mlc int4 (--compile)':28s} {rows['mlc int4 compiled'][0]:8.1f} tok/s {rows['mlc int4 compiled'][1]:8.1f} tok/CPU-s", flush=True)
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
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.vs_llamacpp:
        vs_llamacpp(args.model, args.reps, args.decode_tokens, args.compile)
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
