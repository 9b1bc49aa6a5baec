"""What a served model takes in memory once loaded (weights read from the safetensors headers, plus its KV cache), and
the check that it fits `--max-memory`: shared by one-model and several-model serving."""

from __future__ import annotations

from pathlib import Path

from mlc.errors import InputError


def footprint(path: Path, dtype: str, kv_bytes: int) -> tuple[int, int]:
    """(weight bytes, KV-cache bytes) a model takes once loaded: its tensors at the dtype they load in, from the headers."""
    import torch

    from mlc.io.hfdir import read_config
    from mlc.io.safetensors_reader import ModelTensors

    raw = read_config(path)
    target = None if dtype == "auto" else getattr(torch, dtype)
    if target is None and "quantization_config" in raw:
        target = torch.bfloat16  # what load_engine picks for quantised models' float tensors
    total = 0
    with ModelTensors(path) as tensors:
        for name, info in tensors.infos.items():
            if (name == "lm_head.weight" and raw.get("tie_word_embeddings")) or name.endswith("rotary_emb.inv_freq"):
                continue  # not loaded: the tied head is the embedding
            size = target.itemsize if target is not None and info.dtype.is_floating_point else info.dtype.itemsize
            total += info.numel * size
    return total, kv_bytes


def check_fits(name: str, need: tuple[int, int], max_memory: int) -> None:
    """InputError unless one model's weights and KV cache fit in --max-memory on their own."""
    if sum(need) > max_memory:
        raise InputError(f"model {name!r} needs {mib(sum(need))} (weights {mib(need[0])} + KV cache {mib(need[1])}), "
                         f"more than --max-memory {mib(max_memory)}", "raise --max-memory, or lower --kv-cache-memory")


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"
