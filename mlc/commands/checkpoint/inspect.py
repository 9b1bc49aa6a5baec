"""inspect: what a checkpoint holds, from its listing alone (no tensor is read)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlc.io.formats import ConvertOptions


def inspect(path: Path, source_format: str | None, with_tensors: bool) -> dict[str, Any]:
    from mlc.commands.checkpoint.sources import open_checkpoint
    from mlc.io.checkpoints.base import torch_dtype

    ckpt = open_checkpoint(path, source_format, ConvertOptions(with_optimizer=True))
    try:
        entries = ckpt.tensors()
        dtypes: dict[str, dict[str, int]] = {}
        params = weight_bytes = optim_bytes = 0
        for e in entries:
            nbytes = e.numel * torch_dtype(e.dtype).itemsize
            if e.is_optimizer:
                optim_bytes += nbytes
                continue
            params += e.numel
            weight_bytes += nbytes
            d = dtypes.setdefault(e.dtype, {"tensors": 0, "params": 0, "bytes": 0})
            d["tensors"] += 1
            d["params"] += e.numel
            d["bytes"] += nbytes
        config = ckpt.config or {}
        result: dict[str, Any] = {
            "format": ckpt.format,
            "path": str(ckpt.path),
            "step": ckpt.info.get("step"),
            "world_size": ckpt.info.get("world_size") or (ckpt.info.get("tp") and ckpt.info["tp"] * ckpt.info.get("ep", 1)),
            "architecture": (config.get("architectures") or [config.get("model_type")])[0] if config else None,
            "parameters": params,
            "tensors": sum(1 for e in entries if not e.is_optimizer),
            "weight_bytes": weight_bytes,
            "optimizer_state": any(e.is_optimizer for e in entries),
            "optimizer_bytes": optim_bytes,
            "total_bytes": weight_bytes + optim_bytes,
            "dtypes": dtypes,
            "info": ckpt.info,
        }
        if with_tensors:
            result["tensor_list"] = [{"name": e.name, "dtype": e.dtype, "shape": list(e.shape)} for e in entries]
        return result
    finally:
        ckpt.close()


def tensor_tree(entries: list[dict[str, Any]]) -> Any:
    """A rich Tree of dotted names: model > layers > 0 > self_attn > q_proj.weight [bfloat16 576x576]."""
    from rich.tree import Tree

    root = Tree("tensors")
    nodes: dict[str, Any] = {}
    for e in entries:
        name, _, state = e["name"].partition("/")
        parts = name.split(".")
        parent, key = root, ""
        for part in parts[:-2]:
            key = f"{key}.{part}"
            if key not in nodes:
                nodes[key] = parent.add(part)
            parent = nodes[key]
        leaf = ".".join(parts[-2:]) + (f" / {state}" if state else "")
        parent.add(f"{leaf}  [dim]{e['dtype']} {'x'.join(map(str, e['shape'])) or 'scalar'}[/dim]")
    return root
