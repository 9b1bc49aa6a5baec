"""Eager batch-1 decode with and without the fused decode paths, alternating in one process: ms and CPU-ms per token.

    .venv/bin/python benchmarks/eager_decode_ab.py [--model smollm2|1b] [--dtype int4|bf16] [--threads N] [--tokens 64] [--reps 3]

The engine is built as `int4_decode.py --vs-llamacpp` builds it (serve_vs_peers.py's mlc_engine: fused projections,
512 blocks of 16). Between generations the paths are switched in the process, so every mode sees the same load:
- `old`: the torch path (RoPE and attention in torch ops, the residual add, torch's silu and mul);
- `fused`: kernels/decode_attention.c's fused attention, the add + RMSNorm and silu * up kernels;
- `layer`: also models/native_decode.py's one native call per int4 layer (int4 models only; bf16 runs old and fused).
On a loaded machine compare CPU-ms per token, which waiting for a core inflates less than wall time; --threads 1
takes OpenMP's spinning and barriers out of the comparison.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import serve_vs_peers as peers

from mlc.commands.serve.engine import GenerationRequest
from mlc.kernels import native
from mlc.kernels.paged_attention import PagedBatch
from mlc.kernels.sampling import SamplingParams
from mlc.models import native_decode

ORIGINAL = {"add_rms_norm_bf16": native.add_rms_norm_bf16, "silu_mul_bf16": native.silu_mul_bf16,
            "attend_projected": PagedBatch.attend_projected, "decode_layer": native_decode.decode_layer}


def use(mode: str) -> None:
    """Switch the decode paths of this process to mode (old, fused or layer)."""
    native.add_rms_norm_bf16, native.silu_mul_bf16 = ORIGINAL["add_rms_norm_bf16"], ORIGINAL["silu_mul_bf16"]
    PagedBatch.attend_projected, native_decode.decode_layer = ORIGINAL["attend_projected"], ORIGINAL["decode_layer"]
    if mode in ("old", "fused"):
        native_decode.decode_layer = lambda *a: None
    if mode == "old":
        native.add_rms_norm_bf16 = native.silu_mul_bf16 = lambda *a: None
        PagedBatch.attend_projected = lambda self, *a, **k: None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["smollm2", "1b"], default="smollm2")
    ap.add_argument("--dtype", choices=["int4", "bf16"], default="int4")
    ap.add_argument("--threads", type=int, help="torch and kernel threads (default: torch's choice)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "1b":
        from quant_1b import make_model

        path = make_model(peers.smollm2_hf_dir(), peers.cache_dir() / "bench" / "random-1b")
    else:
        path = peers.smollm2_hf_dir()
    engine = peers.mlc_engine(peers.quantized(path, "int4") if args.dtype == "int4" else path, "bfloat16")
    prompt = list(range(1000, 1032))

    def once(tokens: int) -> tuple[float, float]:
        times: list[tuple[float, float]] = []
        engine.submit(GenerationRequest(f"r{time.perf_counter()}", prompt, SamplingParams(temperature=0), max_tokens=tokens, ignore_eos=True),
                      lambda ev: times.extend([(time.perf_counter(), time.process_time())] * len(ev.token_ids)))
        engine.run_until_idle()
        n = len(times) - 1
        return 1e3 * (times[-1][0] - times[0][0]) / n, 1e3 * (times[-1][1] - times[0][1]) / n

    modes = ["old", "fused", "layer"] if args.dtype == "int4" else ["old", "fused"]
    results: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    for m in modes:  # warm-up
        use(m)
        once(8)
    load = os.getloadavg()[0]
    for r in range(args.reps):
        for m in modes if r % 2 == 0 else modes[::-1]:
            use(m)
            results[m].append(once(args.tokens))
    print(f"{args.model} {args.dtype}, batch-1 decode of {args.tokens} tokens, median of {args.reps}, {torch.get_num_threads()} threads, "
          f"load average {load:.1f} -> {os.getloadavg()[0]:.1f}")
    for m, runs in results.items():
        print(f"{m:6s} {statistics.median(w for w, _ in runs):8.2f} ms/token {statistics.median(c for _, c in runs):8.2f} CPU-ms/token")


if __name__ == "__main__":
    main()
