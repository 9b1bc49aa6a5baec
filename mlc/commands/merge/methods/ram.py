"""RAM (2601.13572): sum the task vectors, averaging entries several models change and keeping unique ones whole.

RAM+ (tensor-local) also boosts each model's unique entries by 1 + r * min(alpha, shared / unique),
its counts of entries shared with other models and of entries only it changes.
"""

from __future__ import annotations

from typing import Any

import torch

from mlc.contracts import Param, in_range, merge_method

EPSILON = Param("epsilon", float, 1e-5, check=in_range(0, float("inf")), help="a task-vector entry counts as changed above this magnitude")


@merge_method("ram", params=(EPSILON,), base="required")
def ram(models: list[torch.Tensor], base: torch.Tensor, params: dict[str, Any], rng: Any = None) -> torch.Tensor:
    """base + sum of the changed entries, each divided by how many models change it."""
    if not models:
        return base
    tv, changed, counts, shared, unique = _changes(models, base, params["epsilon"])
    tv = tv * changed
    merged = (tv * unique + tv * shared / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


@merge_method(
    "ramplus_tl",
    params=(
        Param("r", float, 0.1, help="strength of the boost of unique entries"),
        Param("alpha", float, 0.2, help="cap on the shared/unique ratio"),
        EPSILON,
    ),
    base="required",
    promotes_to_float32=True,
)
def ramplus_tl(models: list[torch.Tensor], base: torch.Tensor, params: dict[str, Any], rng: Any = None) -> torch.Tensor:
    """RAM with each model's unique entries scaled by 1 + r * clamp(shared_i / unique_i, 0, alpha) (float32 for 16-bit inputs, as mergekit)."""
    if not models:
        return base
    eps = params["epsilon"]
    tv, changed, counts, shared, unique = _changes(models, base, eps)
    rho = (changed & shared).sum(dim=1) / (changed & unique).sum(dim=1).clamp(min=eps)
    boost = 1 + params["r"] * rho.clamp(min=0, max=params["alpha"])
    tv = tv * changed
    merged = (tv * unique * boost.unsqueeze(-1) + tv * shared / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def _changes(models: list[torch.Tensor], base: torch.Tensor, eps: float) -> tuple[torch.Tensor, ...]:
    """Flat task vectors [N, n], which entries each changes, how many models change each, and where that is > 1 or == 1."""
    tv = torch.stack([x - base for x in models], dim=0).view(len(models), -1)
    models.clear()
    changed = tv.abs() > eps
    counts = changed.sum(dim=0, keepdim=True)
    return tv, changed, counts, counts > 1, counts == 1
