"""Linear-layer throughput of each quantisation scheme against bf16 and fp32 on SmolLM2-135M's shapes.

One pass = every Linear of SmolLM2-135M (30 blocks x q,k,v,o,gate,up,down = 210 matmuls) plus the
49152x576 head, each with its own weights (decode is memory-bound, so sharing weights would flatter
it). Decode is M=1 row, prefill M=256 rows. Weights are random: speed does not depend on values.
Prints the median pass time of --reps passes and the ratio to bf16 and fp32, all in one process.

    .venv/bin/python benchmarks/quant_matmul.py [--reps 15] [--layers 30] [--device cpu|cuda] [--json]

On CUDA the quantised layers take the optional dequantise-then-GEMM path and activations are bf16.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mlc.kernels.quant_linear import PREFILL_ROWS, quant_linear
from mlc.kernels.quant_weights import NF4_CODEBOOK, CodebookWeight, Fp8Weight, IntWeight, OutlierInt8Weight

HIDDEN, INTER, KV = 576, 1536, 192
BLOCK_SHAPES = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN), (INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER)]
HEAD = (49152, HIDDEN)


def _weight(scheme: str, n: int, k: int, g: torch.Generator):
    if scheme == "int8":
        return IntWeight(torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g), torch.rand(n, 1, generator=g).bfloat16() * 0.01, None, 8, None)
    if scheme.startswith("int4-g"):
        gs = int(scheme.split("-g")[1])
        return IntWeight(torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g), torch.rand(n, k // gs, generator=g).bfloat16() * 0.01, None, 4, gs)
    if scheme == "nf4":
        return CodebookWeight(torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g), torch.tensor(NF4_CODEBOOK),
                              torch.rand(n, k // 64, generator=g).bfloat16(), None, 64, "nf4")
    if scheme == "fp8":
        return Fp8Weight(torch.randn(n, k, generator=g).to(torch.float8_e4m3fn), torch.rand(n, 1, generator=g) * 0.01)
    if scheme == "llm-int8":
        cols = torch.arange(0, k, k // 4)[:4]  # 4 outlier features per layer: more than LLM.int8() sees in practice
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g).index_fill(1, cols, 0)
        return OutlierInt8Weight(q, torch.rand(n, 1, generator=g) * 0.01, cols, torch.randn(n, 4, generator=g).half())
    raise ValueError(scheme)


def build(scheme: str, layers: int, device: str = "cpu") -> list[torch.nn.Module]:
    g = torch.Generator().manual_seed(0)
    shapes = BLOCK_SHAPES * layers + [HEAD]
    if scheme in ("fp32", "bf16"):
        dtype = torch.float32 if scheme == "fp32" else torch.bfloat16
        mods = []
        for n, k in shapes:
            m = torch.nn.Linear(k, n, bias=False, dtype=dtype)
            m.weight.requires_grad_(False)
            mods.append(m.to(device))
        return mods
    return [quant_linear(_weight(scheme, n, k, g)).to(device) for n, k in shapes]


@torch.inference_mode()
def pass_time(mods: list[torch.nn.Module], rows: int, dtype: torch.dtype, reps: int, device: str = "cpu") -> float:
    """Median seconds of one pass over all modules, each on its own input of `rows` rows."""
    inputs = {k: torch.randn(rows, k, dtype=dtype, device=device) for k in (HIDDEN, INTER)}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for m in mods:  # warm up: first calls build kernel layouts and caches
        m(inputs[m.in_features])
    times = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        for m in mods:
            m(inputs[m.in_features])
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# No int4-g128: 128 does not divide SmolLM2's hidden size 576.
SCHEMES = ["fp32", "bf16", "int8", "int4-g32", "int4-g64", "nf4", "fp8", "llm-int8"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for scheme in SCHEMES:
        mods = build(scheme, args.layers, args.device)
        # Activations: the model's own dtype. On CPU a quantised layer in an fp32 model is fed fp32 (it
        # casts to bf16 inside); on CUDA everything but the fp32 baseline runs in bf16.
        act = torch.bfloat16 if scheme == "bf16" or (args.device == "cuda" and scheme != "fp32") else torch.float32
        path = getattr(mods[0], "path", "dense")
        results[scheme] = {
            "path": path,
            "decode_ms": 1e3 * pass_time(mods, 1, act, args.reps, args.device),
            "prefill_ms": 1e3 * pass_time(mods, 256, act, max(3, args.reps // 3), args.device),
        }
        del mods
    for r in results.values():
        for phase in ("decode", "prefill"):
            r[f"{phase}_vs_bf16"] = results["bf16"][f"{phase}_ms"] / r[f"{phase}_ms"]
            r[f"{phase}_vs_fp32"] = results["fp32"][f"{phase}_ms"] / r[f"{phase}_ms"]
    meta = {"device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__, "layers": args.layers, "prefill_rows": 256,
            "prefill_from_rows": PREFILL_ROWS}
    if args.json:
        print(json.dumps({"meta": meta, "results": results}, indent=2))
        return
    print(f"SmolLM2-135M linear layers ({args.layers} blocks + head) on {args.device}, torch {meta['torch']}, {meta['threads']} threads; "
          f"median of {args.reps} decode / {max(3, args.reps // 3)} prefill passes")
    print(f"{'scheme':<10} {'path':<9} {'decode ms':>10} {'x bf16':>7} {'x fp32':>7} {'prefill ms':>11} {'x bf16':>7} {'x fp32':>7}")
    for s, r in results.items():
        print(f"{s:<10} {r['path']:<9} {r['decode_ms']:>10.2f} {r['decode_vs_bf16']:>7.2f} {r['decode_vs_fp32']:>7.2f} "
              f"{r['prefill_ms']:>11.1f} {r['prefill_vs_bf16']:>7.2f} {r['prefill_vs_fp32']:>7.2f}")


if __name__ == "__main__":
    main()
