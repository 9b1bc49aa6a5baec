"""Lazy safetensors reading: one tensor at a time, across the shards of a model directory.

Tensors are read with pread into fresh buffers rather than memory-mapped, so a tensor's memory is
released when the caller drops it; a merge over many large files then holds only what it is using.
The header is validated against the file size first, so a truncated file or a lying header fails
with a one-line error instead of a crash deep inside a merge.
"""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from mlc.errors import InputError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100 * 2**20
READ_CHUNK = 2**30


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class SafetensorsFile:
    """One .safetensors file: its validated header, and tensors read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{self.path} does not exist or is not a file", "check the path")
        self._fd: int | None = None
        self._lock = threading.Lock()
        self.metadata, self.tensors = self._read_header()

    def _corrupt(self, what: str) -> InputError:
        return InputError(
            f"{self.path} is not a valid safetensors file: {what}",
            "the file is truncated or corrupt; re-download or re-export it",
        )

    def _read_header(self) -> tuple[dict[str, str], dict[str, TensorInfo]]:
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise self._corrupt(f"only {size} bytes, shorter than the 8-byte header length")
            header_len = int.from_bytes(prefix, "little")
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise self._corrupt(f"header length {header_len} does not fit in a file of {size} bytes")
            raw = f.read(header_len)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._corrupt(f"header is not JSON ({e.__class__.__name__})") from None
        if not isinstance(header, dict):
            raise self._corrupt("header is not a JSON object")
        data_start = 8 + header_len
        data_size = size - data_start
        metadata = header.pop("__metadata__", None) or {}
        tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            tensors[name] = self._check_entry(name, entry, data_start, data_size)
        return metadata, tensors

    def _check_entry(self, name: str, entry: object, data_start: int, data_size: int) -> TensorInfo:
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise self._corrupt(f"tensor {name!r} lacks dtype, shape or data_offsets")
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise self._corrupt(f"tensor {name!r} has unknown dtype {entry['dtype']!r}")
        shape = entry["shape"]
        offsets = entry["data_offsets"]
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise self._corrupt(f"tensor {name!r} has a bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise self._corrupt(f"tensor {name!r} has bad data_offsets {offsets!r}")
        begin, end = offsets
        numel = 1
        for d in shape:
            numel *= d
        expected = numel * dtype.itemsize
        if not 0 <= begin <= end or end - begin != expected:
            raise self._corrupt(
                f"tensor {name!r} claims {end - begin} bytes but shape {shape} of {entry['dtype']} needs {expected}"
            )
        if end > data_size:
            raise self._corrupt(f"tensor {name!r} ends at byte {end} but the data section holds {data_size}")
        return TensorInfo(name, dtype, tuple(shape), self.path, data_start + begin, expected)

    def _fileno(self) -> int:
        with self._lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            return self._fd

    def read(self, name: str) -> torch.Tensor:
        """Return tensor `name` in its stored dtype, in memory owned by the caller."""
        info = self.tensors[name]
        return read_tensor(self._fileno(), info)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - a destructor must not raise
            pass


def read_tensor(fd: int, info: TensorInfo) -> torch.Tensor:
    """Read one tensor's bytes with pread (thread-safe: no shared file position)."""
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    buf = bytearray(info.nbytes)
    view = memoryview(buf)
    done = 0
    while done < info.nbytes:
        n = os.preadv(fd, [view[done : done + READ_CHUNK]], info.start + done)
        if n <= 0:
            raise InputError(f"{info.file} ended while reading tensor {info.name!r}", "the file is truncated")
        done += n
    return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)


class ModelTensors:
    """All tensors of a model: a directory of (sharded) safetensors files, or one file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.files: dict[Path, SafetensorsFile] = {}
        self.infos: dict[str, TensorInfo] = {}
        for file in weight_files(self.path):
            sf = SafetensorsFile(file)
            self.files[file] = sf
            for name, info in sf.tensors.items():
                if name in self.infos:
                    raise InputError(
                        f"tensor {name!r} appears in both {self.infos[name].file.name} and {file.name}",
                        "the model directory mixes two checkpoints; keep one set of shards",
                    )
                self.infos[name] = info
        self._check_index()

    def _check_index(self) -> None:
        index = self.path / "model.safetensors.index.json" if self.path.is_dir() else None
        if index is None or not index.exists():
            return
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        missing = [n for n in weight_map if n not in self.infos]
        if missing:
            raise InputError(
                f"{index.name} lists {len(missing)} tensors that no shard holds (first: {missing[0]!r})",
                "a shard is missing or truncated; re-download the model",
            )

    def names(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def __len__(self) -> int:
        return len(self.infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.infos[name]
        except KeyError:
            raise InputError(f"{self.path} has no tensor {name!r}", "check the tensor name") from None

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        info = self.info(name)
        t = self.files[info.file].read(name)
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def items(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.infos:
            yield name, self.read(name, dtype)

    def metadata(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for sf in self.files.values():
            merged.update(sf.metadata)
        return merged

    def close(self) -> None:
        for sf in self.files.values():
            sf.close()

    def __enter__(self) -> "ModelTensors":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def weight_files(path: Path) -> list[Path]:
    """Return the safetensors files of a model directory (via its index when it has one) or [path]."""
    if not path.exists():
        raise InputError(f"{path} does not exist", "check the path")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise InputError(f"{path} is not a .safetensors file", "pass a model directory or a .safetensors file")
        return [path]
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError(f"{index} is not a valid index file", "it needs a weight_map object") from None
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise InputError(f"{path} is missing shard {missing[0]} named in its index", "re-download the model")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        hint = "convert it first with `mlc checkpoint convert`" if any(path.glob("*.bin")) else "is this a model directory?"
        raise InputError(f"{path} holds no .safetensors weights", hint)
    return files
