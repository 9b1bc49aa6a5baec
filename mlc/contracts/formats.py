"""The checkpoint-format contract: what a plugin in the `mlc.formats.v1` entry-point group provides.

A format plugin is an object registered as "module:object" with:

    name: str                  what users type after --from / --to
    description: str           one line for listings
    detect(path) -> bool       cheap: does this file or directory look like my format?
    open(path, options) -> Checkpoint
                               read side: the checkpoint's tensors under Hugging Face names, read one at a time
    write(ckpt, out_dir, options) -> None          (optional: formats mlc can write)
                               write side: stream `ckpt` into out_dir, which exists and is empty

Every route goes through the one neutral `Checkpoint` (HF tensor names, the HF config when known, the
directory holding tokenizer files), so n formats need n readers and n writers, not n² converters.
Optimizer state travels as tensors named `<parameter>/<state>` (e.g. `model.norm.weight/exp_avg`).

Old plugins that only have `to_hf(src, out_dir, dtype)` (the first contract) still convert to hf.
Discovery checks each format object with `format_problem` and reports one that lacks these as broken.
plugins/mlc-gguf is the worked example. No torch import here: listing formats stays cheap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

OPTIM_SEP = "/"  # parameter names never contain a slash


@dataclass(frozen=True)
class TensorEntry:
    """A tensor as listed, without reading it: HF name, torch dtype name ("bfloat16"), shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_optimizer(self) -> bool:
        return OPTIM_SEP in self.name


@dataclass
class ConvertOptions:
    """What a conversion asks of the reader and the writer (options a format does not use are refused by the CLI)."""

    dtype: str | None = None  # cast floating weights on write (None keeps the stored dtype)
    with_optimizer: bool = False  # read and write optimizer state too
    max_shard_bytes: int = 5 * 2**30  # hf: size of one safetensors shard
    quant: str | None = None  # gguf: F32, F16, BF16, Q8_0, Q4_0, Q4_K_M
    spec: str | None = None  # tp: a shipped spec name or a TOML file
    tp: int | None = None  # tp: how many tensor-parallel shards to write
    config: str | None = None  # a config.json (or its directory) for sources that carry none
    # Format-specific: gguf takes "int_weights", a function HF tensor name -> mlc IntWeight or None, for
    # weights already quantised by mlc (written as GGML blocks of the same integers; `mlc quantize --format gguf`).
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Checkpoint(Protocol):
    """An opened checkpoint: lists tensors cheaply and reads each on demand (the caller frees it)."""

    format: str
    path: Path
    config: dict[str, Any] | None  # the model's HF config.json, when the checkpoint knows it
    assets: Path | None  # a directory with tokenizer files and generation_config.json to carry along
    info: dict[str, Any]  # what inspect shows: step, world_size, ...

    def tensors(self) -> list[TensorEntry]: ...

    def read(self, name: str) -> Any: ...  # a torch.Tensor

    def close(self) -> None: ...


@runtime_checkable
class CheckpointFormat(Protocol):
    name: str
    description: str

    def detect(self, path: Path) -> bool: ...

    def open(self, path: Path, options: ConvertOptions) -> Checkpoint: ...


def can_write(fmt: Any) -> bool:
    return callable(getattr(fmt, "write", None))


def format_problem(obj: Any) -> str | None:
    """Why obj cannot be a format plugin, or None: it needs name, description, detect() and open() (or to_hf())."""
    missing = [a for a in ("name", "description") if not isinstance(getattr(obj, a, None), str)]
    missing += [f"{a}()" for a in ("detect",) if not callable(getattr(obj, a, None))]
    if not callable(getattr(obj, "open", None)) and not callable(getattr(obj, "to_hf", None)):
        missing.append("open()")
    return f"it has no {', '.join(missing)}" if missing else None
