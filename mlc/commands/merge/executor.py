"""Streaming execution of a merge plan: read a tensor's inputs, merge, write, free; I/O overlaps compute.

Reader threads prefetch the inputs of the next jobs while worker threads merge and write earlier
ones (pwrite into each tensor's precomputed place in the shards). A byte budget caps what is in
flight (inputs read but not merged, outputs merged but not written) at the largest single job, so
peak memory is about (inputs + 1) x the largest tensor plus the methods' scratch (at most about two
tensors' worth, shared between concurrent jobs), whatever the model size.
"""

from __future__ import annotations

import ctypes
import mmap
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from mlc.commands.merge import threads, tokenizer  # noqa: F401  threads first: it reads torch's default thread count
from mlc.commands.merge.plan import Job, MergePlan
from mlc.errors import MlcError
from mlc.io.dense import DenseModel
from mlc.io.safetensors_reader import TensorInfo
from mlc.io.safetensors_writer import DEFAULT_MAX_SHARD_BYTES, ShardedWriter
from mlc.rng import keyed_generator

MIN_BUDGET = 32 * 2**20  # lets many small layer tensors be prefetched at once


class Budget:
    """Bytes in flight, with blocking acquire; a request larger than the limit waits for an empty budget."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._cond = threading.Condition()

    def acquire(self, n: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: not self.used or self.used + n <= self.limit)
            self.used += n

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


def return_freed_memory_to_os() -> None:
    """Make glibc serve big buffers with mmap and give them back on free, so RSS tracks live tensors.

    By default glibc raises its mmap threshold after the first large free, after which freed tensors
    stay in the heap and RSS only grows; pinning the threshold keeps it at 1 MiB. The heap below that
    keeps up to 64 MiB of free space at its top: trimming it eagerly made every small temporary of the
    combine step fault in fresh pages (a million page faults and a second of system time per TIES merge).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD
        libc.mallopt(-2, 64 << 20)  # M_TOP_PAD: grow the heap in 64 MiB steps
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def merge_job(plan: MergePlan, job: Job, tensors: list[torch.Tensor]) -> torch.Tensor:
    """One output tensor from its inputs (base last when the job has one), in the output dtype."""
    method = plan.method
    out_dtype = plan.output_dtype(job)
    if not all(t.is_floating_point() for t in tensors):
        first = tensors[0]
        if any(t.dtype != first.dtype or not torch.equal(t, first) for t in tensors[1:]):
            raise MlcError(f"non-floating tensor {job.name} differs between the models", "such buffers must be identical to merge")
        return first
    dtype = plan.compute_dtype(job)
    for i, t in enumerate(tensors):
        if t.dtype != dtype:
            tensors[i] = t.to(dtype)
    base = tensors.pop() if job.base is not None else None
    rng = keyed_generator(plan.seed, job.name) if method.random else None
    if job.vocab:
        out = tokenizer.reindex_merge(plan, job, tensors, base, rng)
    else:
        out = method.fn(tensors, base, job.params, rng)
    tensors.clear()
    if tuple(out.shape) != job.shape:
        raise MlcError(f"merge method {method.name} returned shape {tuple(out.shape)} for {job.name}, expected {job.shape}")
    # As mergekit: the method's result is in the compute dtype (`dtype`), then cast to `out_dtype`.
    return out.to(method.result_dtype(dtype)).to(out_dtype)


def read_job(plan: MergePlan, job: Job, min_mapped: int = 0) -> list[torch.Tensor]:
    refs = job.inputs + ([job.base] if job.base is not None else [])
    return [read_input(plan.models[m].tensors, name, min_mapped) for m, name in refs]


MADV_POPULATE_READ = 22  # Linux 5.14+ (not in Python 3.11's mmap module)
MAPPED_IN_FLIGHT = 256  # at most about this many mapped tensors (each holds a file descriptor) within the budget


def read_input(model: DenseModel, name: str, min_mapped: int = 0) -> torch.Tensor:
    """One input tensor: mapped copy-on-write from its safetensors file when stored as is and min_mapped bytes or more, else read.

    A mapping copies nothing and faults no fresh pages: the page cache's pages are mapped in one call,
    here in the reader thread (reading the file if it is not cached), and a method that writes to its
    inputs gets private copies of the pages it writes. Reading into fresh memory instead cost most of
    a 1B-parameter linear merge's CPU time (a page fault per 4 KiB, then the copy). As with the reads,
    the mapped pages count in RSS until the tensor is freed. (Like mergekit's reads, which map the
    files too, a file truncated during the merge would end it with SIGBUS.)
    """
    info = model.info(name)
    if model.source != "hf" or not isinstance(info, TensorInfo) or info.nbytes == 0 or info.nbytes < min_mapped:
        return model.read(name)
    start = info.start - info.start % mmap.ALLOCATIONGRANULARITY
    try:
        with open(info.file, "rb") as f:
            m = mmap.mmap(f.fileno(), info.start + info.nbytes - start, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
    except (OSError, ValueError):
        return model.read(name)  # a file system that cannot map files
    try:
        m.madvise(MADV_POPULATE_READ)
    except (OSError, ValueError):
        pass  # an older kernel: the pages are mapped on first touch instead
    return torch.frombuffer(m, dtype=info.dtype, count=info.numel, offset=info.start - start).reshape(info.shape)


def execute(
    plan: MergePlan,
    out_dir: Path,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    on_done: Callable[[Job], None] | None = None,
    workers: int = 2,
    readers: int = 2,
) -> list[str]:
    """Merge every job of the plan into safetensors shards (plus index) in out_dir; return the file names.

    Jobs run on `workers` threads, each doing one job's torch work single-threaded: on a shared or
    busy machine that scales where torch's own thread pool (OpenMP, spin-waiting at every op) slows
    to a crawl, and it needs no barrier per operation on an idle one.
    """
    return_freed_memory_to_os()
    jobs = plan.jobs
    out_bytes = [job_out_bytes(plan, j) for j in jobs]
    costs = [plan.input_bytes(j) + o for j, o in zip(jobs, out_bytes)]
    budget = Budget(max(max(costs, default=0), MIN_BUDGET))
    min_mapped = budget.limit // MAPPED_IN_FLIGHT
    layout = [(j.name, plan.output_dtype(j), j.shape) for j in jobs]
    writer = ShardedWriter(out_dir, layout, max_shard_bytes=max_shard_bytes, metadata={"merged_by": "mlc"})
    failed = threading.Event()

    def run(i: int, read: Future[list[torch.Tensor]]) -> None:
        job = jobs[i]
        held = costs[i]
        try:
            if failed.is_set():
                return
            tensors = read.result()
            if costs[i] * 2 > budget.limit:
                # No other job can hold budget beside this one (the embeddings, typically), so nothing
                # else computes meanwhile: give it every worker's core instead of leaving them idle.
                torch.set_num_threads(workers)
                try:
                    out = merge_job(plan, job, tensors)
                finally:
                    torch.set_num_threads(1)
            else:
                out = merge_job(plan, job, tensors)
            del tensors
            budget.release(held - out_bytes[i])
            held = out_bytes[i]
            writer.write(job.name, out)
            del out
        except BaseException:
            failed.set()
            raise
        finally:
            budget.release(held)
        if on_done is not None:
            on_done(job)

    caller_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    done: list[Future[None]] = []
    try:
        with ThreadPoolExecutor(readers, thread_name_prefix="merge-read") as read_pool, ThreadPoolExecutor(
            workers, thread_name_prefix="merge"
        ) as work_pool:
            for i, job in enumerate(jobs):
                budget.acquire(costs[i])  # released in two parts: inputs once merged, output once written
                if failed.is_set():
                    budget.release(costs[i])
                    break
                done.append(work_pool.submit(run, i, read_pool.submit(read_job, plan, job, min_mapped)))
                done = [f for f in done if not _done(f)]
            for f in done:
                f.result()
    except BaseException:
        writer.abort()
        raise
    finally:
        torch.set_num_threads(caller_threads)
    return writer.close()


def _done(future: Future[None]) -> bool:
    if future.done():
        future.result()  # surface a writer error now
        return True
    return False


def job_out_bytes(plan: MergePlan, job: Job) -> int:
    n = plan.output_dtype(job).itemsize
    for d in job.shape:
        n *= d
    return n
