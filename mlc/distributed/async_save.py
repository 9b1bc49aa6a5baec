"""Asynchronous checkpoint writes: the loop waits only for a copy of the state to host memory (torchtitan's recipe).

`AsyncWriter.start` stages every tensor of the state into host buffers (pinned when a GPU is used; the buffers are
kept and reused by the next save, so staging allocates once), then DCP writes the staged copy from a background
thread while training goes on. The state itself may change right after `start` returns: the write reads only the
copy.

Crash safety is the synchronous save's: the step directory counts only once its COMPLETE marker exists, and rank 0
writes the marker in the background only after DCP's write finished on every rank (DCP gathers every rank's write
result to rank 0 before its `.metadata` is written). A kill before that leaves an incomplete directory that
`latest()` skips and the next save or prune removes.

The background DCP collectives run on a process group of their own (gloo, which DCP needs for its host-side
planning): the training thread keeps using the default group at the same time, and two threads issuing
collectives on one group would interleave them differently on each rank.

At most one write is in flight: the next `start` (and `wait`) first waits for the previous one, so the staging
buffers are never overwritten while being written.
"""

from __future__ import annotations

import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch


class AsyncWriter:
    def __init__(self) -> None:
        import torch.distributed as dist
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        gpu = torch.cuda.is_available()
        # Pinned host buffers make the device-to-host copy a DMA at full bus speed; on a CPU-only machine there is no
        # device copy to speed up (and pinning needs CUDA).
        self.stager = DefaultStager(StagingOptions(use_pinned_memory=gpu, use_shared_memory=False, use_async_staging=False, use_non_blocking_copy=False))
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        if self.group is None:
            # A lone process writes without a process group, as intended; DCP warns of it from its own writer thread,
            # where a catch_warnings block here cannot reach (it is not thread-safe), so the filter is process-wide.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="mlc-ckpt")
        self.pending: tuple[Path, Future] | None = None
        self.last_write_s: float | None = None  # wall time of the latest finished background write

    def start(self, path: Path, state: Any, finalize: Callable[[], None]) -> None:
        """Stage `state` to host memory and write it to `path` in the background, then call finalize() there.

        Call wait() first: one write at a time.
        """
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        assert self.pending is None, "wait() for the previous write first"
        t0 = time.perf_counter()
        upload = dcp.async_save(
            {"train": state}, checkpoint_id=str(path), process_group=self.group, async_stager=self.stager,
            no_dist=not dist.is_initialized(),
        )

        def finish() -> None:
            upload.result()  # raises what any rank's write raised (DCP gathers the failures)
            finalize()
            self.last_write_s = time.perf_counter() - t0

        self.pending = (path, self.pool.submit(finish))

    def wait(self) -> tuple[Path | None, BaseException | None]:
        """Wait for the write in flight: (its directory, or None if there was none; the error it raised, or None)."""
        if self.pending is None:
            return None, None
        path, future = self.pending
        self.pending = None
        try:
            future.result()
        except BaseException as e:  # noqa: BLE001 - the caller turns any rank's failure into one error on every rank
            return path, e
        return path, None

    def close(self) -> None:
        self.wait()
        self.pool.shutdown(wait=True)
        self.stager.close()
