"""NearSwap: move to the other model's value where it is within t of the base, less so further away."""

from __future__ import annotations

from typing import Any

import torch

from mlc.contracts import Param, merge_method


@merge_method(
    "nearswap",
    params=(Param("t", float, help="distance under which the other model's value is taken whole"),),
    base="required",
    min_models=1,
    max_models=1,
)
def nearswap(models: list[torch.Tensor], base: torch.Tensor, params: dict[str, Any], rng: Any = None) -> torch.Tensor:
    """w * x + (1 - w) * base with w = clamp(t / |x - base|, 0, 1)."""
    x = models[0]
    w = (params["t"] / torch.abs(base - x).clamp(min=1e-6)).clamp(min=0, max=1)
    return w * x + (1 - w) * base
