"""diff: how far two checkpoints are apart, tensor by tensor, and which layers moved most."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mlc.io.formats import ConvertOptions

LAYER = re.compile(r"\.layers\.(\d+)\.")


def diff(a_path: Path, b_path: Path, a_format: str | None, b_format: str | None) -> dict[str, Any]:
    """Per tensor: max |a-b|, ||a-b|| / ||a|| and cosine(a, b); per layer: the mean relative change."""
    import torch

    from mlc.commands.checkpoint.sources import open_checkpoint

    a = open_checkpoint(a_path, a_format, ConvertOptions())
    b = open_checkpoint(b_path, b_format, ConvertOptions())
    try:
        ea = {e.name: e for e in a.tensors() if not e.is_optimizer}
        eb = {e.name: e for e in b.tensors() if not e.is_optimizer}
        rows, shape_mismatch = [], []
        for name in [n for n in ea if n in eb]:
            if ea[name].shape != eb[name].shape:
                shape_mismatch.append({"name": name, "a": list(ea[name].shape), "b": list(eb[name].shape)})
                continue
            x, y = a.read(name).double(), b.read(name).double()
            delta = (x - y).flatten()
            nx, ny = x.norm().item(), y.norm().item()
            rows.append({
                "name": name,
                "max_abs": delta.abs().max().item() if delta.numel() else 0.0,
                "relative": delta.norm().item() / nx if nx else (0.0 if not delta.any() else float("inf")),
                "cosine": torch.dot(x.flatten(), y.flatten()).item() / (nx * ny) if nx and ny else (1.0 if nx == ny else 0.0),
            })
            del x, y, delta
        layers: dict[str, list[float]] = {}
        for r in rows:
            m = LAYER.search(r["name"])
            layers.setdefault(f"layer {m[1]}" if m else "other", []).append(r["relative"])
        by_layer = sorted(({"layer": k, "mean_relative": sum(v) / len(v), "tensors": len(v)} for k, v in layers.items()), key=lambda d: -d["mean_relative"])
        return {
            "a": str(a.path), "b": str(b.path), "tensors": rows, "layers": by_layer,
            "only_in_a": sorted(set(ea) - set(eb)), "only_in_b": sorted(set(eb) - set(ea)), "shape_mismatch": shape_mismatch,
            "identical": all(r["max_abs"] == 0 for r in rows) and set(ea) == set(eb) and not shape_mismatch,
        }
    finally:
        a.close()
        b.close()
