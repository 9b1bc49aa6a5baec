"""Sharded safetensors writing that streams: tensors go to disk one at a time, in any order.

The writer is given the plan (name, dtype, shape of every output tensor) up front, so each shard's
header is written first and each tensor lands at its precomputed offset with pwrite. Nothing is
buffered beyond the tensor being written, and several threads may write at once.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch

from mlc.errors import MlcError
from mlc.io.safetensors_reader import DTYPE_NAMES

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


@dataclass
class _Shard:
    filename: str
    tensors: list[PlannedTensor]
    data_start: int = 0
    offsets: dict[str, int] | None = None


class ShardedWriter:
    """Write a planned set of tensors as model.safetensors or model-0000i-of-0000n.safetensors + index."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        plan: Iterable[PlannedTensor | tuple[str, torch.dtype, tuple[int, ...]]],
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        metadata: Mapping[str, str] | None = None,
        prefix: str = "model",
    ):
        self.out_dir = Path(out_dir)
        self.plan = [p if isinstance(p, PlannedTensor) else PlannedTensor(p[0], p[1], tuple(p[2])) for p in plan]
        names = [p.name for p in self.plan]
        if len(set(names)) != len(names):
            raise MlcError("duplicate tensor names in the output plan", "this is a bug in the caller")
        self.metadata = {"format": "pt", **(metadata or {})}
        self.prefix = prefix
        self.shards = self._assign_shards(max_shard_bytes)
        self._where: dict[str, tuple[int, _Shard, PlannedTensor]] = {}
        self._fds: list[int] = []
        self._written: set[str] = set()
        self._lock = threading.Lock()
        self._open_files()

    def _assign_shards(self, max_bytes: int) -> list[_Shard]:
        groups: list[list[PlannedTensor]] = [[]]
        size = 0
        for p in self.plan:
            if groups[-1] and size + p.nbytes > max_bytes:
                groups.append([])
                size = 0
            groups[-1].append(p)
            size += p.nbytes
        n = len(groups)
        if n == 1:
            return [_Shard(f"{self.prefix}.safetensors", groups[0])]
        return [_Shard(f"{self.prefix}-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]

    def _open_files(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for shard in self.shards:
            header: dict[str, object] = {"__metadata__": self.metadata}
            offset = 0
            shard.offsets = {}
            for p in shard.tensors:
                header[p.name] = {"dtype": DTYPE_NAMES[p.dtype], "shape": list(p.shape), "data_offsets": [offset, offset + p.nbytes]}
                shard.offsets[p.name] = offset
                offset += p.nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # the format aligns the data section to 8 bytes
            shard.data_start = 8 + len(raw)
            fd = os.open(self.out_dir / shard.filename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            os.pwrite(fd, len(raw).to_bytes(8, "little") + raw, 0)
            os.ftruncate(fd, shard.data_start + offset)
            for p in shard.tensors:
                self._where[p.name] = (fd, shard, p)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one planned tensor, converting it to the planned dtype; safe to call from several threads."""
        fd, shard, planned = self._where[name]
        if tuple(tensor.shape) != planned.shape:
            raise MlcError(f"tensor {name!r} has shape {tuple(tensor.shape)}, planned {planned.shape}", "this is a bug in the caller")
        data = tensor.detach().to("cpu", planned.dtype).contiguous().reshape(-1).view(torch.uint8).numpy()
        start = shard.data_start + shard.offsets[name]
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], start + done)
        with self._lock:
            self._written.add(name)

    def close(self) -> list[str]:
        """Check every planned tensor was written, flush, and write the index; return the file names."""
        missing = [p.name for p in self.plan if p.name not in self._written]
        for fd in self._fds:
            os.fsync(fd)
            os.close(fd)
        self._fds = []
        if missing:
            raise MlcError(f"{len(missing)} planned tensors were never written (first: {missing[0]!r})", "this is a bug in the caller")
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(p.nbytes for p in self.plan)},
                "weight_map": {p.name: s.filename for s in self.shards for p in s.tensors},
            }
            (self.out_dir / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return [s.filename for s in self.shards]

    def abort(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def save_tensors(
    tensors: Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> list[str]:
    """Save a state dict as (sharded) safetensors in out_dir, optionally converting floating tensors to dtype."""

    def target(t: torch.Tensor) -> torch.dtype:
        return dtype if dtype is not None and t.is_floating_point() else t.dtype

    plan = [PlannedTensor(n, target(t), tuple(t.shape)) for n, t in tensors.items()]
    with ShardedWriter(out_dir, plan, max_shard_bytes, metadata) as w:
        for name, t in tensors.items():
            w.write(name, t)
    return [s.filename for s in w.shards]
