"""What the hardware can do at most: memory bandwidth (bytes/s) and matrix-multiply throughput (FLOP/s).

`cpu:auto` measures this machine in a few seconds with torch, using all of torch's threads as mlc serve
does: the bandwidth of reading a 256 MiB buffer that no cache holds (the fastest of three readers:
reads only, as decoding reads weights), and the FLOP/s of a 2048x2048 matrix product in the compute dtype. Each is
the best of several repeats, so other work on a shared machine lowers it less. Each is also taken per
CPU-second of this process (bytes or FLOPs over the process's CPU time, best of the repeats): what one busy
core reads or computes while it runs, the figure that other jobs on the same cores disturb least (wall-clock
rates fall with the time this process waits for a core; per CPU-second rates do not), and the one to set a
server's tokens per CPU-second against. Presets are the vendors' datasheet figures (dense BF16 tensor-core
FLOP/s, no sparsity).
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass

import numpy as np

from mlc.errors import MlcUsageError

# name: (memory bandwidth B/s, dense BF16 FLOP/s, where the figures come from)
PRESETS: dict[str, tuple[float, float, str]] = {
    "h100-sxm": (3.35e12, 989.4e12, "NVIDIA H100 SXM5 datasheet"),
    "h100-pcie": (2.0e12, 756.5e12, "NVIDIA H100 PCIe datasheet"),
    "h200": (4.8e12, 989.4e12, "NVIDIA H200 SXM datasheet"),
    "a100-80gb": (2.039e12, 312e12, "NVIDIA A100 80GB SXM datasheet"),
    "a100-40gb": (1.555e12, 312e12, "NVIDIA A100 40GB datasheet"),
    "l4": (300e9, 121e12, "NVIDIA L4 datasheet"),
}
PREFIX = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


@dataclass
class Hardware:
    name: str
    mem_bw: float  # bytes/s
    flops: float  # FLOP/s
    source: str
    threads: int | None = None  # cpu:auto: the threads it was measured with (its figures are for that many cores busy)
    mem_bw_per_cpu_s: float | None = None  # cpu:auto: bytes read per CPU-second of the measuring process (per busy core)
    flops_per_cpu_s: float | None = None  # cpu:auto: FLOPs per CPU-second

    @property
    def ridge(self) -> float:
        """FLOPs per byte above which a kernel is compute-bound."""
        return self.flops / self.mem_bw


def parse_rate(text: str, what: str) -> float:
    """3.35TB/s, 3.35e12, 989T, 989 TFLOP/s, 20GB/s -> a number per second."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgGtTpP]i?)?\s*(?:B|FLOP|FLOPS|FLOP/s|B/s|/s)?\s*(?:/s)?\s*", text)
    if not m:
        example = {"mem-bw": "3.35TB/s", "flops": "989T", "kv-budget": "2GiB"}.get(what, "1.5G")
        raise MlcUsageError(f"--{what} {text!r} is not a number with an optional unit", f"write e.g. {example}")
    value = float(m.group(1)) * PREFIX[(m.group(2) or "").lower()]
    if value <= 0:
        raise MlcUsageError(f"--{what} must be positive", "give the hardware's peak")
    return value


def measure_cpu(dtype: str = "bfloat16", repeats: int = 5, threads: int | None = None) -> tuple[float, float, float, float]:
    """(read bandwidth B/s, matmul FLOP/s, bytes per CPU-second, FLOPs per CPU-second) of this machine with `threads`
    threads (default: torch's), each the best of `repeats`."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    # Reads only, as decoding reads weights, of 256 MiB that no cache holds: the fastest of torch's sum and fp32
    # matrix-vector product (all threads) and numpy's sum split over as many threads (numpy's pairwise sum streams
    # faster than torch's on some CPUs; either alone can fall well short of the bus).
    mat, vec = torch.ones(8192, 8192, dtype=torch.float32), torch.ones(8192, dtype=torch.float32)
    flat = mat.view(-1)
    parts = np.array_split(flat.numpy(), torch.get_num_threads())

    def numpy_sum() -> None:
        threads = [threading.Thread(target=np.sum, args=(p,)) for p in parts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    readers = [lambda: flat.sum(), lambda: torch.mv(mat, vec), numpy_sum]
    for read in readers:
        read()
    reads = [_timed(read) for _ in range(repeats) for read in readers]
    nbytes = mat.numel() * mat.element_size()
    bw, bw_cpu = nbytes / min(w for w, _ in reads), nbytes / min(c for _, c in reads)
    mat = flat = parts = None  # free the 256 MiB (the readers' closures hold it) before the matmuls
    n = 2048
    dt = getattr(torch, dtype)
    a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
    a @ b
    mms = [_timed(lambda: a @ b) for _ in range(repeats)]
    return bw, 2 * n**3 / min(w for w, _ in mms), bw_cpu, 2 * n**3 / min(c for _, c in mms)


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds, all threads) of fn()."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, max(time.process_time() - c, 1e-9)


def resolve_hardware(spec: str | None, mem_bw: str | None, flops: str | None, compute_dtype: str, threads: int | None = None) -> Hardware:
    """A preset, cpu:auto (measured now), or explicit figures; explicit --mem-bw/--flops override either."""
    if spec is None:
        if mem_bw is None or flops is None:
            raise MlcUsageError("say what hardware: --hardware cpu:auto | " + " | ".join(PRESETS) + ", or both --mem-bw and --flops", "e.g. --hardware cpu:auto")
        hw = Hardware("explicit", 0.0, 0.0, "given")
    elif spec == "cpu:auto":
        bw, fl, bw_cpu, fl_cpu = measure_cpu(compute_dtype, threads=threads)
        threads = __import__("torch").get_num_threads()
        hw = Hardware("cpu:auto", bw, fl, f"measured here: 256 MiB read, {compute_dtype} 2048^3 matmul, {threads} threads, load average {os.getloadavg()[0]:.2f}",
                      threads, bw_cpu, fl_cpu)
    elif spec in PRESETS:
        bw, fl, source = PRESETS[spec]
        hw = Hardware(spec, bw, fl, source)
    else:
        raise MlcUsageError(f"unknown --hardware {spec!r}", "use cpu:auto or one of " + ", ".join(PRESETS))
    if mem_bw is not None:
        hw.mem_bw, hw.source = parse_rate(mem_bw, "mem-bw"), hw.source + "; --mem-bw given"
    if flops is not None:
        hw.flops, hw.source = parse_rate(flops, "flops"), hw.source + "; --flops given"
    return hw
