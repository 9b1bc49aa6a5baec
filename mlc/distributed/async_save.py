"""Asynchronous checkpoint writes: the loop waits only for a copy of the state to host memory (torchtitan's recipe).

`AsyncWriter.start` copies every tensor of the state into host buffers (`HostStaging`), then DCP writes the staged
copy from a background thread while training goes on. The state itself may change right after `start` returns: the
write reads only the copy.

Why not DCP's `DefaultStager`: it allocates (or finds in its cache) a host storage per tensor, copies storage by
storage with `UntypedStorage.copy_` (one thread), then rebuilds the state dict by deep copy; on the benchmark's 302 MB
that was 0.33 s of copying against 0.07 s for the same bytes through `Tensor.copy_` (which torch splits over its
intra-op threads). `HostStaging` allocates its buffers once (pinned when a GPU is used), reuses them at every save
while the state's layout is unchanged, and copies tensor by tensor with `Tensor.copy_` (on a GPU: every copy queued
non-blocking on one stream, then one synchronisation). The bytes are the same: a copy.

Crash safety is the synchronous save's: the step directory counts only once its COMPLETE marker exists, and rank 0
writes the marker in the background only after DCP's write finished on every rank (DCP gathers every rank's write
result to rank 0 before its `.metadata` is written) and every rank wrote its RNG file (`any_failed`, a collective,
comes between). A kill before that leaves an incomplete directory that
`latest()` skips and the next save or prune removes.

The background DCP collectives run on a process group of their own (gloo, which DCP needs for its host-side
planning): the training thread keeps using the default group at the same time, and two threads issuing
collectives on one group would interleave them differently on each rank.

At most one write is in flight: the next `start` (and `wait`) first waits for the previous one, so the staging
buffers are never overwritten while being written.
"""

from __future__ import annotations

import copy
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch


class AsyncWriter:
    def __init__(self) -> None:
        import torch.distributed as dist

        self.stager = HostStaging()
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

    def any_failed(self, error: BaseException | None) -> bool:
        """Whether any process's part failed (a collective of the background thread, on the writer's own group)."""
        import torch.distributed as dist

        flag = torch.tensor([float(error is not None)])
        if self.group is not None:
            dist.all_reduce(flag, group=self.group)
        return bool(flag.item())

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


class HostStaging:
    """DCP's AsyncStager protocol: `stage` returns a copy of the state dict whose tensors live in host buffers that are
    allocated at the first save and reused by the next ones (the caller's one-write-at-a-time rule makes that safe)."""

    should_synchronize_after_execute = False

    def __init__(self) -> None:
        # Pinned buffers make the device-to-host copy a DMA at full bus speed; on a CPU-only machine there is no
        # device copy to speed up (and pinning needs CUDA).
        self.pin = torch.cuda.is_available()
        self.layout: list[tuple] | None = None
        self.buffers: list[torch.Tensor] = []

    @torch.no_grad()
    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        sources: list[Any] = []
        _collect(state_dict, sources)
        layout = [_signature(t) for t in sources]
        if layout != self.layout:  # the first save, or the state grew (e.g. optimizer moments appeared)
            self.buffers = [self._host_copy(t) for t in sources]
            self.layout = layout
        locals_ = [_local(t) for t in sources]
        for src, dst in zip(locals_, (_local(b) for b in self.buffers)):
            dst.copy_(src, non_blocking=self.pin and src.is_cuda)
        if self.pin:
            torch.cuda.synchronize()
        return _rebuild(state_dict, iter(self.buffers))

    def _host_copy(self, t: torch.Tensor) -> torch.Tensor:
        """An empty host tensor shaped as t (a DTensor keeps its sharding: only its local tensor lives on the host)."""
        from torch.distributed.tensor import DTensor

        local = _local(t)
        host = torch.empty(local.shape, dtype=local.dtype, device="cpu")
        if self.pin and host.numel():
            host = host.pin_memory()
        if isinstance(t, DTensor):
            out = copy.copy(t)  # a new DTensor object with the same spec, its local tensor swapped for the buffer
            out._local_tensor = host
            return out
        return host

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        self.buffers, self.layout = [], None


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t


def _signature(t: torch.Tensor) -> tuple:
    local = _local(t)
    return type(t), tuple(t.shape), tuple(local.shape), local.dtype, str(getattr(t, "placements", ""))


def _collect(tree: Any, out: list[Any]) -> None:
    """The tensors of a state dict in traversal order (dicts, lists and tuples, as DCP flattens them)."""
    if isinstance(tree, torch.Tensor):
        out.append(tree)
    elif isinstance(tree, dict):
        for v in tree.values():
            _collect(v, out)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            _collect(v, out)


def _rebuild(tree: Any, staged: Any) -> Any:
    """The tree with each tensor replaced by the next staged one; other values copied (they are taken now)."""
    if isinstance(tree, torch.Tensor):
        return next(staged)
    if isinstance(tree, dict):
        return {k: _rebuild(v, staged) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_rebuild(v, staged) for v in tree)
    return copy.deepcopy(tree)
