"""How long a checkpoint blocks the training loop: synchronous save vs checkpoint.async_save, and the disk's speed.

    .venv/bin/python benchmarks/train_async_save.py [--hidden 2048] [--layers 6] [--repeats 3] [--dir /tmp]

The state is what `mlc train` checkpoints: a model's weights plus AdamW's two moments (12 bytes per parameter), here
an MLP of `layers` square fp32 matrices. Each save goes through mlc's CheckpointManager into a fresh directory on
`--dir`; between async saves one "training step" (an in-place AdamW update of every tensor) runs, as in the loop.

  sync blocking     the whole synchronous save (what the loop waited for before)
  async blocking    the time `save` took with async_save (staging copy to host memory + the small files)
  *_cpu_s           this process's CPU seconds over the same call (all its threads; steadier than wall time on a
                    shared machine, but the sync save's waits on the disk count in its wall time only)
  async write       the background write's wall time, started at the same save (not waited for by the loop)
  dd                `dd bs=4M conv=fdatasync` of the same number of bytes to the same directory: the disk's speed
  staging           the copy to host memory alone, two ways on the same state: mlc's HostStaging (reused buffers,
                    Tensor.copy_) and DCP's DefaultStager (storage by storage), which async_save used before

Medians over --repeats (the first save of each kind allocates its buffers and is counted); the machine is shared, so the ratio async/sync within the same run is what counts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    import torch
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    from torch.distributed.checkpoint.state_dict_saver import _stateful_to_state_dict

    from mlc.distributed.async_save import HostStaging
    from mlc.distributed.checkpoint import CheckpointManager, TrainState

    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    args = ap.parse_args()

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(args.hidden, args.hidden) for _ in range(args.layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, args.hidden)).sum().backward()
    opt.step()  # creates AdamW's moments
    state = TrainState(model, [opt])
    nbytes = sum(p.numel() for p in model.parameters()) * 12
    work = Path(tempfile.mkdtemp(prefix="mlc-async-bench-", dir=args.dir))
    host, default = HostStaging(), DefaultStager(StagingOptions(False, False, False, False))

    def step() -> None:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-6)

    figures: dict[str, list[float]] = {
        "sync_blocking_s": [], "async_blocking_s": [], "sync_blocking_cpu_s": [], "async_blocking_cpu_s": [], "async_write_s": [], "dd_s": [], "host_staging_s": [], "default_stager_s": [],
    }
    try:
        sync = CheckpointManager(work / "sync", keep_last_k=1)
        asyn = CheckpointManager(work / "async", keep_last_k=1, async_save=True)
        for r in range(args.repeats):
            for name, manager in (("sync", sync), ("async", asyn)):
                c0, t0 = time.process_time(), time.perf_counter()
                manager.save(r + 1, state, {})
                figures[f"{name}_blocking_s"].append(time.perf_counter() - t0)
                figures[f"{name}_blocking_cpu_s"].append(time.process_time() - c0)
            step()  # training goes on while the write runs
            asyn.wait()
            figures["async_write_s"].append(asyn.writer.last_write_s)
            t0 = time.perf_counter()
            subprocess.run(["dd", "if=/dev/zero", f"of={work / 'dd.bin'}", "bs=4M", f"count={max(1, nbytes >> 22)}", "conv=fdatasync"],
                           check=True, capture_output=True)
            figures["dd_s"].append(time.perf_counter() - t0)
            (work / "dd.bin").unlink()
            for name, stager in (("host_staging_s", host), ("default_stager_s", default)):
                state_dict = _stateful_to_state_dict({"train": state})
                t0 = time.perf_counter()
                stager.stage(state_dict)
                figures[name].append(time.perf_counter() - t0)
        asyn.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in figures.items()}
    out = {
        "state_mb": round(nbytes / 1e6, 1),
        **{k: round(v, 4) for k, v in med.items()},
        "async_over_sync_blocking": round(med["async_blocking_s"] / med["sync_blocking_s"], 4),
        "async_over_sync_blocking_cpu": round(med["async_blocking_cpu_s"] / med["sync_blocking_cpu_s"], 4),
        "per_repeat_async_over_sync": [round(a / b, 4) for a, b in zip(figures["async_blocking_s"], figures["sync_blocking_s"])],
        "default_stager_over_host_staging": round(med["default_stager_s"] / med["host_staging_s"], 2),
        "sync_write_mb_s": round(nbytes / 1e6 / med["sync_blocking_s"], 1),
        "async_write_mb_s": round(nbytes / 1e6 / med["async_write_s"], 1),
        "dd_mb_s": round(nbytes / 1e6 / med["dd_s"], 1),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
