"""Floating-point dtypes by the names users write (float32, bf16, torch.float16): one table for every command.

torch is imported only when a name is turned into a torch.dtype, so config validation stays torch-free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mlc.errors import InputError

if TYPE_CHECKING:
    import torch

FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")  # what a merge may compute or write in
MODEL_DTYPES = ("float32", "bfloat16", "float16")  # what a native model loads, trains and serves in
ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of one of FLOAT_DTYPES."""
    import torch

    return getattr(torch, name)


def parse_dtype(name: str | torch.dtype | None, allowed: tuple[str, ...] = MODEL_DTYPES) -> torch.dtype | None:
    """A torch dtype from 'bf16', 'bfloat16', 'torch.bfloat16' or a dtype; None stays None."""
    if name is None:
        return None
    if not isinstance(name, str):
        import torch

        if isinstance(name, torch.dtype):
            return name
    key = str(name).removeprefix("torch.").lower()
    key = ALIASES.get(key, key)
    if key not in allowed:
        raise InputError(f"unsupported dtype {name!r}", f"use {', '.join(allowed[:-1])} or {allowed[-1]}")
    return torch_dtype(key)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
