"""Asynchronous checkpoint writes: the loop waits for no disk, and for the copy to host memory only if the next
optimizer step comes before that copy is done (torchtitan's async save, with DataStates-LLM's lazy copy).

`AsyncWriter.start` takes the state dict's structure and every non-tensor value at once, then a thread copies the
tensors into host buffers (`HostStaging`) while the next forward and backward passes run (they only read the
weights and optimizer state); the first optimizer step after the save waits for that copy (a step pre-hook), as it
is what would change them. DCP then writes the staged copy from a background thread while training goes on.

Why not DCP's `DefaultStager`: it allocates (or finds in its cache) a host storage per tensor, copies storage by
storage with `UntypedStorage.copy_` (one thread) in the loop's thread, then rebuilds the state dict by deep copy.
`HostStaging` allocates its buffers once (pinned when a GPU is used), reuses them at every save while the state's
layout is unchanged, and copies tensor by tensor with `Tensor.copy_` (torch's intra-op threads; on a GPU every copy
queued non-blocking on a side stream after the compute stream's last writes, then one synchronisation). The bytes
are the same: a copy.

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
        self.hooks: list[Any] = []
        self.wait_s = 0.0  # time the loop waited at optimizer steps for staging copies to finish, all saves together

    def start(self, path: Path, state: Any, finalize: Callable[[], None]) -> None:
        """Stage `state` to host memory and write it to `path` in the background, then call finalize() there.

        The staging copy itself runs in the background too, while the next forward and backward passes read the
        same tensors (DataStates-LLM's lazy copy): the first optimizer step after the save waits for it (a step
        pre-hook), since that is what would change them. Call wait() first: one write at a time.
        """
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        assert self.pending is None, "wait() for the previous write first"
        t0 = time.perf_counter()
        response = dcp.async_save(
            {"train": state}, checkpoint_id=str(path), process_group=self.group, async_stager=self.stager,
            no_dist=not dist.is_initialized(),
        )
        upload = response.upload_completion
        self.hooks = [opt.register_step_pre_hook(lambda *_: self.staged()) for opt in state.optimizers]

        def finish() -> None:
            upload.result()  # raises what any rank's write raised (DCP gathers the failures)
            finalize()
            self.last_write_s = time.perf_counter() - t0

        self.pending = (path, self.pool.submit(finish))

    def staged(self) -> None:
        """Wait until the state is copied to host memory (before anything changes it); adds the wait to wait_s."""
        t0 = time.perf_counter()
        self.stager.synchronize_staging()
        self.wait_s += time.perf_counter() - t0
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def any_failed(self, error: BaseException | None) -> bool:
        """Whether any process's part failed (a collective of the background thread, on the writer's own group)."""
        import torch.distributed as dist

        flag = torch.tensor([float(error is not None)])
        if self.group is not None:
            dist.all_reduce(flag, group=self.group)
        return bool(flag.item())

    def wait(self) -> tuple[Path | None, BaseException | None]:
        """Wait for the write in flight: (its directory, or None if there was none; the error it raised, or None)."""
        self.staged()
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
    """DCP's AsyncStager protocol: `stage` returns a future of a copy of the state dict whose tensors live in host
    buffers, allocated at the first save and reused by the next ones (the caller's one-write-at-a-time rule makes that
    safe). The structure and every non-tensor value are taken at once; the tensor bytes are copied by a thread."""

    should_synchronize_after_execute = False

    def __init__(self) -> None:
        # Pinned buffers make the device-to-host copy a DMA at full bus speed; on a CPU-only machine there is no
        # device copy to speed up (and pinning needs CUDA).
        self.pin = torch.cuda.is_available()
        self.stream = torch.cuda.Stream() if self.pin else None
        self.layout: list[tuple] | None = None
        self.buffers: list[torch.Tensor] = []
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="mlc-stage")
        self.copying: Future | None = None

    def stage(self, state_dict: dict[str, Any]) -> Future:
        self.synchronize_staging()
        sources: list[Any] = []
        _collect(state_dict, sources)
        layout = [_signature(t) for t in sources]
        if layout != self.layout:  # the first save, or the state grew (e.g. optimizer moments appeared)
            self.buffers = [self._host_copy(t) for t in sources]
            self.layout = layout
        staged = _rebuild(state_dict, iter(self.buffers))
        # On a GPU the copies follow what the compute stream has queued so far (the last optimizer step's writes).
        ready = torch.cuda.current_stream().record_event() if self.pin else None
        self.copying = self.pool.submit(self._copy, [_local(t) for t in sources], staged, ready)
        return self.copying

    @torch.no_grad()
    def _copy(self, sources: list[torch.Tensor], staged: dict[str, Any], ready: Any) -> dict[str, Any]:
        if self.stream is not None:
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(ready)
                for src, dst in zip(sources, (_local(b) for b in self.buffers)):
                    dst.copy_(src, non_blocking=True)
            self.stream.synchronize()
        else:
            for src, dst in zip(sources, (_local(b) for b in self.buffers)):
                dst.copy_(src)
        return staged

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
        """Wait for the copy in flight, if any (raises what it raised)."""
        if self.copying is not None:
            copying, self.copying = self.copying, None
            copying.result()

    def close(self) -> None:
        self.synchronize_staging()
        self.pool.shutdown(wait=True)
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
