"""int4 prefill on one big layer against a bf16 GEMM: Llama-2-7B's 4096x11008 MLP shapes at M=256 rows.

Rows of the table, each the median of --reps calls in one process (wall time, and the process's CPU time,
which a busy machine inflates less):
- bf16: x @ W.T with the bf16 weight (the GEMM every quantised prefill path ends in);
- int4 (mlc): IntLinear's prefill, the native one-pass dequantise per cache-sized block (quant_int4.c);
- int4 (torch ops): the same blockwise dequantise in torch ops, the path without the native kernel;
- int4 (before): the old path, which unpacked the whole weight for every block of rows (issue 17).

    .venv/bin/python benchmarks/quant_prefill.py [--reps 5] [--group-size 128] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mlc.kernels import packing
from mlc.kernels.quant_linear import IntLinear, _blockwise
from mlc.kernels.quant_weights import IntWeight

SHAPES = [(11008, 4096), (4096, 11008)]  # (out, in): up/gate, then down


def _old_dequant_rows(lin: IntLinear):
    """The path before issue 17: the whole weight unpacked, then sliced, for every block of rows."""
    def rows(r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        k, g = lin.in_features, lin.group_size
        u = packing.unpack_int4pack_cpu(lin._tiles, lin.out_features, k)[r0:r1]
        sz = lin._scales_and_zeros[:, r0:r1].transpose(0, 1)
        return ((u.to(dtype) - 8).view(r1 - r0, k // g, g) * sz[..., :1].to(dtype) + sz[..., 1:].to(dtype)).view(r1 - r0, k)
    return rows


def _time(fn, reps: int) -> tuple[float, float]:
    fn()
    wall, cpu = [], []
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from mlc.kernels import native

    g = torch.Generator().manual_seed(0)
    results = []
    for n, k in SHAPES:
        q = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
        scale = (torch.rand(n, k // args.group_size, generator=g) * 0.01 + 1e-3).to(torch.bfloat16)
        lin = IntLinear(IntWeight(q, scale, None, 4, args.group_size))
        assert lin.path == "int4pack"
        w = lin.dequantize(torch.bfloat16).contiguous()
        del q
        x = torch.randn(args.rows, k, generator=g).to(torch.bfloat16)
        runs = {
            "bf16": lambda: x @ w.T,
            "int4 (mlc)": lambda: lin(x),
            "int4 (torch ops)": lambda: _blockwise(x, n, lin._dequant_rows, packing.TILE_N),
            "int4 (before)": lambda: _blockwise(x, n, _old_dequant_rows(lin)),
        }
        ref = (x.float() @ w.float().T)
        err = ((lin(x).float() - ref).abs().max() / ref.abs().max()).item()
        timed = {name: _time(fn, args.reps if name != "int4 (before)" else 1) for name, fn in runs.items()}
        for name, (wall, cpu) in timed.items():
            results.append({"layer": f"{k}->{n}", "path": name, "wall_ms": round(wall, 1), "cpu_ms": round(cpu, 1),
                            "x_bf16_wall": round(wall / timed["bf16"][0], 2), "x_bf16_cpu": round(cpu / timed["bf16"][1], 2),
                            "max_rel_error_vs_fp32": round(err, 5) if name == "int4 (mlc)" else None})
    meta = {"rows": args.rows, "group_size": args.group_size, "threads": torch.get_num_threads(),
            "native_kernels": native.available(), "native_unavailable": native.unavailable_reason()}
    if args.json:
        print(json.dumps({"meta": meta, "results": results}, indent=2))
        return
    print(f"M={args.rows}, int4 g{args.group_size} symmetric, {meta['threads']} threads, native kernels: {meta['native_kernels']}")
    print(f"{'layer':<12}{'path':<20}{'wall ms':>9}{'x bf16':>8}{'cpu ms':>9}{'x bf16':>8}")
    for r in results:
        print(f"{r['layer']:<12}{r['path']:<20}{r['wall_ms']:>9}{r['x_bf16_wall']:>8}{r['cpu_ms']:>9}{r['x_bf16_cpu']:>8}")


if __name__ == "__main__":
    main()
