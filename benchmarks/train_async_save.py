"""How long a checkpoint blocks the training loop: synchronous save vs checkpoint.async_save, and the disk's speed.

    .venv/bin/python benchmarks/train_async_save.py [--hidden 2048] [--layers 6] [--batch 64] [--repeats 3] [--dir /tmp]

The state is what `mlc train` checkpoints: a model's weights plus AdamW's two moments (12 bytes per parameter), here
an MLP of `layers` square fp32 matrices. Each save goes through mlc's CheckpointManager into a fresh directory on
`--dir`. A training step is a forward and backward pass on `batch` rows and an AdamW step, as in the loop.

  sync blocking     the whole synchronous save (what the loop waited for before)
  async blocking    what the loop waited for with async_save: the `save` call (the state dict's structure, the
                    start of the staging copy) plus the wait of the next optimizer step for that copy to finish
                    (`staging_wait_s`; the copy overlaps the step's forward and backward)
  step / step after save   a training step alone, and the step right after an async save (it shares the CPU with
                    the staging copy and the background write: on a CPU-only machine the overlap is not free)
  async write       the background write's wall time, started at the same save (not waited for by the loop)
  dd                `dd bs=4M conv=fdatasync` of the same number of bytes to the same directory: the disk's speed
  staging           the copy to host memory alone, two ways on the same state: mlc's HostStaging (reused buffers,
                    Tensor.copy_) and DCP's DefaultStager (storage by storage), which async_save used before

Medians over --repeats (the first save of each kind allocates its buffers and is counted); the machine is shared, so
the ratio async/sync within the same run is what counts.
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
    ap.add_argument("--batch", type=int, default=64)
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

    def step() -> float:
        t0 = time.perf_counter()
        model(torch.randn(args.batch, args.hidden)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - t0

    keys = ("sync_blocking_s", "async_blocking_s", "async_save_call_s", "staging_wait_s", "step_s", "step_after_save_s",
            "async_write_s", "dd_s", "host_staging_s", "default_stager_s")
    figures: dict[str, list[float]] = {k: [] for k in keys}
    try:
        sync = CheckpointManager(work / "sync", keep_last_k=1)
        asyn = CheckpointManager(work / "async", keep_last_k=1, async_save=True)
        for r in range(args.repeats):
            figures["step_s"].append(step())
            t0 = time.perf_counter()
            sync.save(r + 1, state, {})
            figures["sync_blocking_s"].append(time.perf_counter() - t0)
            waited = asyn.writer.wait_s
            t0 = time.perf_counter()
            asyn.save(r + 1, state, {})
            figures["async_save_call_s"].append(time.perf_counter() - t0)
            figures["step_after_save_s"].append(step())  # training goes on while the copy and the write run
            figures["staging_wait_s"].append(asyn.writer.wait_s - waited)
            figures["async_blocking_s"].append(figures["async_save_call_s"][-1] + figures["staging_wait_s"][-1])
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
                staged = stager.stage(state_dict)
                if hasattr(staged, "result"):
                    staged.result()
                figures[name].append(time.perf_counter() - t0)
        asyn.close()
        host.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in figures.items()}
    out = {
        "state_mb": round(nbytes / 1e6, 1),
        **{k: round(v, 4) for k, v in med.items()},
        "async_over_sync_blocking": round(med["async_blocking_s"] / med["sync_blocking_s"], 4),
        "per_repeat_async_over_sync": [round(a / b, 4) for a, b in zip(figures["async_blocking_s"], figures["sync_blocking_s"])],
        "default_stager_over_host_staging": round(med["default_stager_s"] / med["host_staging_s"], 2),
        "sync_write_mb_s": round(nbytes / 1e6 / med["sync_blocking_s"], 1),
        "async_write_mb_s": round(nbytes / 1e6 / med["async_write_s"], 1),
        "dd_mb_s": round(nbytes / 1e6 / med["dd_s"], 1),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
